"""The models as the Open Inference Protocol names them: which tensors go in and come out, onto the
functions' API. Shared by the REST and gRPC translations, which only move tensors on and off the wire.

The chat model follows Triton's vLLM backend: `text_input` (a raw prompt) and optional `stream` and
`sampling_parameters` (JSON) in; `text_output`, `finish_reason`, `num_input_tokens`, `num_output_tokens`
out."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.functions.api import Functions
from services.functions.chat import Done, GenerationRequest, vllm_sampling
from services.functions.types import (
    MaxTokens,
    MinTokens,
    Penalty,
    Refused,
    RepetitionPenalty,
    Seed,
    Stops,
    Temperature,
    TopK,
    TopP,
)
from services.protocols.oip.tensors import Tensor, bytes_tensor, scalar

VERSION = "1"
# Request parameters that belong to the protocol or to Triton's clients, not to sampling.
PROTOCOL_PARAMETERS = frozenset(
    {
        "stream",
        "exclude_input_in_output",
        "triton_enable_empty_final_response",
        "binary_data_output",
        "timeout",
        "priority",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "headers",
    }
)


def invalid(message: str) -> Refused:
    return Refused("invalid", message)


@dataclass
class Spec:
    name: str
    datatype: str
    shape: list[int]
    optional: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


class Model:
    name: str
    inputs: list[Spec]
    outputs: list[Spec]
    decoupled = False
    """True when one request may get many responses (Triton's term), as a streamed generation does"""

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": "pytorch",
            "inputs": [spec.as_dict() for spec in self.inputs],
            "outputs": [spec.as_dict() for spec in self.outputs],
        }

    async def infer(
        self, inputs: dict[str, Tensor], parameters: dict[str, Any], deadline: float | None
    ) -> list[Tensor]:
        """One whole answer to one request."""
        raise NotImplementedError

    def check_inputs(self, inputs: dict[str, Tensor]) -> None:
        specs = {spec.name: spec for spec in self.inputs}
        for name, tensor in inputs.items():
            spec = specs.get(name)
            if spec is None:
                raise invalid(f"model '{self.name}' has no input '{name}'; its inputs are {sorted(specs)}")
            if tensor.datatype != spec.datatype:
                raise invalid(f"input '{name}' must be {spec.datatype}, not {tensor.datatype}")
        for spec in self.inputs:
            if not spec.optional and spec.name not in inputs:
                raise invalid(f"model '{self.name}' needs input '{spec.name}' ({spec.datatype})")

    def check_outputs(self, requested: list[str]) -> None:
        names = {spec.name for spec in self.outputs}
        for name in requested:
            if name not in names:
                raise invalid(f"model '{self.name}' has no output '{name}'; its outputs are {sorted(names)}")


def texts_of(tensor: Tensor) -> list[str]:
    """A BYTES tensor of one text per row ([n] or [n, 1]) as strings."""
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise invalid(f"input '{tensor.name}' must have shape [n] or [n, 1], not {tensor.shape}")
    assert isinstance(tensor.data, list)
    try:
        return [item.decode("utf-8") for item in tensor.data]
    except UnicodeDecodeError as exc:
        raise invalid(f"input '{tensor.name}': an element is not UTF-8 ({exc.reason})") from None


class EmbeddingModel(Model):
    def __init__(self, fns: Functions) -> None:
        self.fn = fns.embedding
        self.name = self.fn.model_id
        self.inputs = [Spec("text", "BYTES", [-1])]
        self.outputs = [Spec("embedding", "FP32", [-1, self.fn.dimensions])]

    async def infer(
        self, inputs: dict[str, Tensor], parameters: dict[str, Any], deadline: float | None
    ) -> list[Tensor]:
        """Unit vectors for the texts, batched with every other protocol's and answered from the same
        response cache."""
        self.check_inputs(inputs)
        texts = texts_of(inputs["text"])
        await self.fn.check(texts, field="text")
        result = await self.fn.embed(texts, deadline)
        return [Tensor("embedding", "FP32", [len(texts), self.fn.dimensions], result.vectors)]


class ImageModel(Model):
    """Encoded files in BYTES `image` [n], or preprocessed FP32 `input` [n, 3, 224, 224]; the top-k
    (request parameter `top_k`) labels, probabilities and class ids out."""

    def __init__(self, fns: Functions) -> None:
        self.fn = fns.image
        self.name = self.fn.model_id
        self.inputs = [
            Spec("image", "BYTES", [-1], optional=True),
            Spec("input", "FP32", [-1, 3, 224, 224], optional=True),
        ]
        self.outputs = [
            Spec("labels", "BYTES", [-1, -1]),
            Spec("scores", "FP32", [-1, -1]),
            Spec("class_ids", "INT64", [-1, -1]),
        ]

    async def infer(
        self, inputs: dict[str, Tensor], parameters: dict[str, Any], deadline: float | None
    ) -> list[Tensor]:
        self.check_inputs(inputs)
        if len(inputs) != 1:
            raise invalid("send exactly one of 'image' (BYTES files) and 'input' (FP32 [n, 3, 224, 224])")
        top_k = parameters.get("top_k", self.fn.settings.image_top_k)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(self.fn.labels):
            raise invalid(f"parameter 'top_k' must be an integer from 1 to {len(self.fn.labels)}")
        if "image" in inputs:
            tensor = inputs["image"]
            if len(tensor.shape) != 1:
                raise invalid(f"input 'image' must have shape [n], not {tensor.shape}")
            assert isinstance(tensor.data, list)
            model_inputs = await self.fn.preprocess(tensor.data, field="image", deadline=deadline)
        else:
            assert isinstance(inputs["input"].data, np.ndarray)
            model_inputs = self.fn.check_tensor(inputs["input"].data, field="input")
        best = self.fn.top((await self.fn.classify(model_inputs, deadline)).scores, top_k)
        n = len(best)
        labels = [name.encode() for row in best for _, name, _ in row]
        return [
            Tensor("labels", "BYTES", [n, top_k], labels),
            Tensor(
                "scores",
                "FP32",
                [n, top_k],
                np.array([[p for *_, p in row] for row in best], dtype=np.float32),
            ),
            Tensor(
                "class_ids",
                "INT64",
                [n, top_k],
                np.array([[c for c, *_ in row] for row in best], dtype=np.int64),
            ),
        ]


class SamplingParameters(BaseModel):
    """The sampling parameters this server takes, from `sampling_parameters` JSON, request parameters
    or input tensors of the same names."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stop: Stops | None = None
    seed: Seed | None = None
    # vLLM's SamplingParams names, which Triton's vLLM backend takes in `sampling_parameters`
    top_k: TopK = Field(0, description="0 or -1: every token")
    ignore_eos: bool = False
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    min_tokens: MinTokens = 0


SAMPLING_INPUTS = [
    Spec("max_tokens", "INT32", [1], optional=True),
    Spec("temperature", "FP32", [1], optional=True),
    Spec("top_p", "FP32", [1], optional=True),
    Spec("seed", "INT64", [1], optional=True),
    Spec("stop", "BYTES", [-1], optional=True),
]


class GenerationModel(Model):
    decoupled = True

    def __init__(self, fns: Functions) -> None:
        self.fn = fns.chat
        self.name = self.fn.model_id
        self.inputs = [
            Spec("text_input", "BYTES", [1]),
            Spec("stream", "BOOL", [1], optional=True),
            Spec("sampling_parameters", "BYTES", [1], optional=True),
            Spec("exclude_input_in_output", "BOOL", [1], optional=True),
            *SAMPLING_INPUTS,
        ]
        self.outputs = [
            Spec("text_output", "BYTES", [-1]),
            Spec("finish_reason", "BYTES", [-1]),
            Spec("num_input_tokens", "INT32", [1]),
            Spec("num_output_tokens", "INT32", [1]),
        ]

    def request(
        self, inputs: dict[str, Tensor], parameters: dict[str, Any]
    ) -> tuple[GenerationRequest, bool]:
        """The generation request, and whether its answer is streamed (the `stream` input or parameter)."""
        self.check_inputs(inputs)
        (prompt,) = one_text(inputs["text_input"])
        stream = parameters.get("stream", False)
        if "stream" in inputs:
            stream = bool(single(inputs["stream"]))  # a BOOL tensor
        elif not isinstance(stream, bool):  # bool("false") is True
            raise invalid("parameter 'stream' must be a boolean")
        asked: dict[str, Any] = {}
        if "sampling_parameters" in inputs:
            (raw,) = one_text(inputs["sampling_parameters"])
            try:  # orjson: strict where the json module takes NaN, lone surrogates and any depth or size
                asked = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise invalid(f"input 'sampling_parameters' is not JSON: {exc}") from None
            if not isinstance(asked, dict):
                raise invalid("input 'sampling_parameters' must be a JSON object")
        asked.update({k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS})
        for spec in SAMPLING_INPUTS:
            if spec.name in inputs:
                tensor = inputs[spec.name]
                asked[spec.name] = texts_of(tensor) if spec.name == "stop" else single(tensor)
        try:
            sampling = SamplingParameters.model_validate(asked)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            if first["type"] == "extra_forbidden":
                known = ", ".join(SamplingParameters.model_fields)
                raise invalid(f"unknown sampling parameter '{where}'; this server takes {known}") from None
            raise invalid(f"sampling parameter '{where}': {first['msg']}") from None
        request = GenerationRequest(
            prompt=prompt,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=sampling.stop or [],
            **vllm_sampling(sampling),
        )
        return request, stream

    async def infer(
        self, inputs: dict[str, Tensor], parameters: dict[str, Any], deadline: float | None
    ) -> list[Tensor]:
        """The whole answer, whether `stream` was asked or not (a unary call has one response)."""
        asked, _ = self.request(inputs, parameters)
        return await self.whole(asked, deadline)

    async def whole(self, asked: GenerationRequest, deadline: float | None) -> list[Tensor]:
        generation = await self.fn.start(asked, deadline)
        answer = await generation.text()
        return self.final(answer.text, generation.prompt_tokens, answer.done)

    def delta(self, text: str) -> list[Tensor]:
        return [bytes_tensor("text_output", text)]

    def final(self, text: str, prompt_tokens: int, done: Done) -> list[Tensor]:
        return [
            bytes_tensor("text_output", text),
            bytes_tensor("finish_reason", done.finish_reason),
            scalar("num_input_tokens", "INT32", prompt_tokens),
            scalar("num_output_tokens", "INT32", done.completion_tokens),
        ]


def one_text(tensor: Tensor) -> list[str]:
    texts = texts_of(tensor)
    if len(texts) != 1:
        raise invalid(f"input '{tensor.name}' takes one element per request, not {len(texts)}")
    return texts


def single(tensor: Tensor) -> Any:
    if tensor.count != 1:
        raise invalid(f"input '{tensor.name}' takes one element, not {tensor.count}")
    assert isinstance(tensor.data, np.ndarray)
    return tensor.data.reshape(-1)[0].item()


class Repository:
    """The models this server serves over the protocol, by name."""

    def __init__(self, fns: Functions) -> None:
        self.fns = fns
        models: list[Model] = [EmbeddingModel(fns), ImageModel(fns), GenerationModel(fns)]
        self.models = {m.name: m for m in models}

    def get(self, name: str, version: str = "") -> Model:
        model = self.models.get(name)
        if model is None:
            raise Refused("not_found", f"no model '{name}'; this server serves {sorted(self.models)}")
        if version not in ("", VERSION):
            raise Refused("not_found", f"model '{name}' has no version '{version}'; it has '{VERSION}'")
        return model


@lru_cache(maxsize=4)
def repository_of(fns: Functions) -> Repository:
    return Repository(fns)
