"""The Open Inference Protocol v2 over gRPC and REST, with Triton's official clients against a real
`bentoml serve`: the same functions as the OpenAI routes, the same admission, errors the caller can act on."""

from __future__ import annotations

import json
import queue
import time
import zlib
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

import services
from services.protocols.oip.tensors import MAX_DIMENSIONS
from tests.oip_client import CHAT, Stream, generation_inputs, text_input
from tests.server import KEYS, LONG, MAX_BODY, ONE_WORKER, counter, free_port, serve
from tests.server import http_client as httpx_client
from tests.test_chat import TOKENS

KEY = KEYS[0]


def auth() -> dict[str, str]:
    """A fresh dict for each call: tritonclient adds its own entries to the headers it is given."""
    return {"authorization": f"Bearer {KEY}"}


EMBEDDER = "all-minilm-l6-v2"
STORY = "Once upon a time, in a land far away, there lived a dragon who"  # runs on for 500 tokens
TEXTS = ["Grüße aus Köln", "日本語の文章です", "emoji 🚀 and ascii"]


@dataclass
class Server:
    url: str
    grpc: str

    def grpc_client(self) -> tg.InferenceServerClient:
        return tg.InferenceServerClient(self.grpc)

    def http_client(self) -> th.InferenceServerClient:
        return th.InferenceServerClient(self.url.removeprefix("http://"), network_timeout=LONG)


@pytest.fixture(scope="module")
def server(keyed_server: tuple[str, str]) -> Server:
    """fp32 and no caches (conftest): greedy answers then do not depend on what else is in the batch,
    and every answer is computed, so the protocols can be compared token for token."""
    return Server(*keyed_server)


def http(server: Server) -> httpx.Client:
    return httpx_client(server.url, headers=auth())


def openai_completion(server: Server, prompt: str, max_tokens: int, **extra: Any) -> str:
    body = {"model": CHAT, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    with http(server) as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def openai_vectors(server: Server, texts: list[str]) -> np.ndarray:
    with http(server) as client:
        response = client.post("/v1/embeddings", json={"model": EMBEDDER, "input": texts})
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def grpc_error(call: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_health_and_metadata_over_grpc_and_http(server: Server) -> None:
    grpc_client, http_client = server.grpc_client(), server.http_client()
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert http_client.is_server_live() and http_client.is_server_ready()
    for model in (EMBEDDER, CHAT):
        assert grpc_client.is_model_ready(model, headers=auth())
        assert http_client.is_model_ready(model, headers=auth())
    meta = grpc_client.get_model_metadata(EMBEDDER, headers=auth(), as_json=True)
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "384"]}]
    chat = http_client.get_model_metadata(CHAT, headers=auth())
    assert [t["name"] for t in chat["outputs"]] == [
        "text_output",
        "finish_reason",
        "num_input_tokens",
        "num_output_tokens",
    ]
    config = grpc_client.get_model_config(CHAT, headers=auth(), as_json=True)["config"]
    assert config["model_transaction_policy"]["decoupled"] is True
    served = grpc_client.get_server_metadata(headers=auth())
    # The version the sources hold (a Bento installs no fnserve distribution to read it from), which
    # the package's metadata reads too.
    assert (
        (served.name, served.version) == ("fnserve", services.__version__) == ("fnserve", version("fnserve"))
    )
    assert http_client.get_server_metadata(headers=auth())["version"] == services.__version__
    missing = grpc_error(lambda: grpc_client.get_model_metadata("no-such-model", headers=auth()))
    assert missing.status() == "StatusCode.NOT_FOUND" and "no-such-model" in missing.message()
    with http(server) as client:
        response = client.get("/v2/models/no-such-model")
    assert response.status_code == 404 and "no-such-model" in response.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status", "allowed"),
    [
        ("GET", f"/v2/models/{EMBEDDER}/infer", 405, "POST"),
        ("PUT", f"/v2/models/{CHAT}/generate", 405, "POST"),
        ("POST", "/v2/health/live", 405, "GET"),
        ("OPTIONS", f"/v2/models/{EMBEDDER}/infer", 405, "POST"),
        ("GET", "/v2/nothing-here", 404, None),
    ],
)
def test_a_wrong_method_gets_405_with_the_methods_the_path_takes(
    server: Server, method: str, path: str, status: int, allowed: str | None
) -> None:
    """The protocol's catch-all (its 404 shape) had answered a wrong method 404 "no route"."""
    with http(server) as client:
        response = client.request(method, path)
    assert response.status_code == status and response.headers.get("allow") == allowed
    assert response.json()["error"]


def test_embeddings_over_grpc_and_http_equal_the_openai_route(server: Server) -> None:
    expected = openai_vectors(server, TEXTS)
    over_grpc = server.grpc_client().infer(EMBEDDER, [text_input("text", TEXTS)], headers=auth())
    over_http = server.http_client().infer(EMBEDDER, [text_input("text", TEXTS, th)], headers=auth())
    compressed = [  # tritonclient's option; Triton inflates such bodies
        server.http_client().infer(
            EMBEDDER, [text_input("text", TEXTS, th)], headers=auth(), request_compression_algorithm=algorithm
        )
        for algorithm in ("gzip", "deflate")
    ]
    for result in (over_grpc, over_http, *compressed):
        vectors = result.as_numpy("embedding")
        assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
        np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)


def test_the_body_kserves_rest_client_sends_is_served(server: Server) -> None:
    """KServe's InferRequest.to_rest names the model in the body too; its data model leaves optional
    parts null. A body naming another model than the path's is refused."""
    tensor = {"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS, "parameters": None}
    body = {"id": "kserve-1", "model_name": EMBEDDER, "inputs": [tensor], "parameters": None, "outputs": None}
    with http(server) as client:
        answer = client.post(f"/v2/models/{EMBEDDER}/infer", json=body).json()
        assert answer["id"] == "kserve-1" and answer["model_name"] == EMBEDDER
        [output] = answer["outputs"]
        vectors = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
        np.testing.assert_allclose(vectors, openai_vectors(server, TEXTS), rtol=0, atol=1e-6)
        other = client.post(f"/v2/models/{EMBEDDER}/infer", json={**body, "model_name": CHAT})
        assert other.status_code == 400 and "must agree" in other.json()["error"], other.text


def test_an_output_the_model_lacks_is_refused_before_any_work(server: Server) -> None:
    """Over REST, unary gRPC and a gRPC stream: refused before the 500 tokens it asks for, not after."""
    inputs = generation_inputs(STORY, 500, stream=False, ignore_eos=True)
    wrong = tg.InferRequestedOutput("txt_output")

    before = generated_tokens(server)
    refused = grpc_error(lambda: server.grpc_client().infer(CHAT, inputs, outputs=[wrong], headers=auth()))
    assert refused.status() == "StatusCode.INVALID_ARGUMENT" and "no output 'txt_output'" in refused.message()
    stream = Stream(server.grpc_client(), headers=auth())
    stream.client.async_stream_infer(
        CHAT, generation_inputs(STORY, 500, ignore_eos=True), request_id="wrong", outputs=[wrong]
    )
    _, error = stream.next()
    stream.client.stop_stream(cancel_requests=True)
    assert error is not None and "no output 'txt_output'" in str(error), error
    with http(server) as client:
        text = {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [STORY]}
        body = {"inputs": [text], "parameters": {"max_tokens": 500, "ignore_eos": True}}
        answer = client.post(f"/v2/models/{CHAT}/infer", json={**body, "outputs": [{"name": "txt_output"}]})
    assert answer.status_code == 400 and "no output 'txt_output'" in answer.json()["error"], answer.text
    assert generated_tokens(server) == before


def test_an_empty_text_is_invalid_argument_as_rest_refuses_it(server: Server) -> None:
    texts = ["fine", ""]
    error = grpc_error(
        lambda: server.grpc_client().infer(EMBEDDER, [text_input("text", texts)], headers=auth())
    )
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "text[1] is an empty string" in error.message()
    with http(server) as client:
        openai_route = client.post("/v1/embeddings", json={"model": EMBEDDER, "input": texts})
        assert openai_route.status_code == 400
        body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}
        oip_route = client.post(f"/v2/models/{EMBEDDER}/infer", json=body)
    assert oip_route.status_code == 400 and "text[1] is an empty string" in oip_route.json()["error"]
    result = server.grpc_client().infer(EMBEDDER, [text_input("text", ["next"])], headers=auth())
    assert result.as_numpy("embedding").shape == (1, 384)


def test_streamed_generation_equals_the_openai_answer(server: Server) -> None:
    prompt = "The three primary colours are"
    expected = openai_completion(server, prompt, 24)
    stream = Stream(server.grpc_client(), auth())
    try:
        stream.send("only", generation_inputs(prompt, 24))
        texts, order = stream.collect({"only"})
    finally:
        stream.client.stop_stream()
    assert texts["only"] == expected
    assert len(order) > 3  # token by token, not one answer
    unary = server.grpc_client().infer(CHAT, generation_inputs(prompt, 24, stream=False), headers=auth())
    assert unary.as_numpy("text_output")[0].decode() == expected
    assert unary.as_numpy("num_output_tokens")[0] == 24
    assert unary.as_numpy("finish_reason")[0] == b"length"


def test_two_requests_interleave_on_one_stream(server: Server) -> None:
    prompts = {"first": "Count from one to twenty:", "second": "List some fruits:"}
    expected = {rid: openai_completion(server, prompt, 32) for rid, prompt in prompts.items()}
    stream = Stream(server.grpc_client(), auth())
    try:
        for rid, prompt in prompts.items():
            stream.send(rid, generation_inputs(prompt, 32))
        texts, order = stream.collect(set(prompts))
    finally:
        stream.client.stop_stream()
    assert texts == expected
    # Both were generated together: the second began before the first was done.
    assert order.index("second") < len(order) - 1 - order[::-1].index("first")


def test_a_bad_request_on_a_stream_fails_alone(server: Server) -> None:
    stream = Stream(server.grpc_client(), auth())
    try:
        bad = generation_inputs("Hello", 8)
        bad[2] = text_input("sampling_parameters", ['{"temperature": 0, "beam_width": 4}'])
        stream.send("bad", bad)
        result, error = stream.next()
        assert result is None and "INVALID_ARGUMENT" in str(error) and "beam_width" in str(error)
        stream.send("good", generation_inputs("Hello", 8))
        texts, _ = stream.collect({"good"})
    finally:
        stream.client.stop_stream()
    assert texts["good"] == openai_completion(server, "Hello", 8)


# What Python's json module would take but no request can carry: a lone surrogate (its refusal, which
# quoted the name, could not be written, and the unary call then had no answer at all), an integer past
# its 4,300 digits, nesting past its recursion limit, NaN; and more stop strings than OpenAI's four.
SAMPLING_REFUSED = [
    pytest.param('{"\\ud800": 1}', "not JSON", id="lone-surrogate"),
    pytest.param('{"max_tokens": 1' + "0" * 5000 + "}", "not JSON", id="5000-digits"),
    pytest.param("[" * 2000, "not JSON", id="deep"),
    pytest.param('{"temperature": NaN}', "not JSON", id="nan"),
    pytest.param(
        '{"stop": ["a", "b", "c", "d", "e"]}', "'stop': List should have at most 4", id="five-stops"
    ),
]


@pytest.mark.parametrize(("sampling", "problem"), SAMPLING_REFUSED)
def test_sampling_parameters_no_request_can_carry_are_invalid_argument(
    server: Server, sampling: str, problem: str
) -> None:
    inputs = generation_inputs("Hello", 4, stream=False)
    inputs[2] = text_input("sampling_parameters", [sampling])
    error = grpc_error(lambda: server.grpc_client().infer(CHAT, inputs, headers=auth(), client_timeout=LONG))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and problem in error.message(), error
    stream = Stream(server.grpc_client(), auth())
    try:
        stream.send("bad", inputs)
        result, error = stream.next()
        assert result is None and "INVALID_ARGUMENT" in str(error) and problem in str(error), error
        stream.send("good", generation_inputs("Hello", 4))
        texts, _ = stream.collect({"good"})
    finally:
        stream.client.stop_stream()
    assert texts["good"]


def test_a_stream_parameter_that_is_not_a_boolean_is_refused(server: Server) -> None:
    """bool("false") is True: a request on a stream that asked for its answer whole in a string got it
    token by token."""
    inputs = [generation_inputs("Hello", 4)[0], generation_inputs("Hello", 4)[2]]  # no `stream` tensor
    stream = Stream(server.grpc_client(), auth())
    try:
        stream.client.async_stream_infer(CHAT, inputs, request_id="bad", parameters={"stream": "false"})
        result, error = stream.next()
        assert result is None and "INVALID_ARGUMENT" in str(error), error
        assert "'stream' must be a boolean" in str(error)
    finally:
        stream.client.stop_stream()


def test_vllm_sampling_parameters_apply_over_grpc(server: Server) -> None:
    """Triton's vLLM backend takes vLLM's SamplingParams names; they do here what the OpenAI fields do."""
    prompt, vllm = "Write a short poem about the sea.", {"repetition_penalty": 1.3, "min_tokens": 20}
    inputs = generation_inputs(prompt, 24, stream=False)
    sampling = json.dumps({"temperature": 0, "max_tokens": 24, **vllm})
    inputs[2] = text_input("sampling_parameters", [sampling])
    answer = server.grpc_client().infer(CHAT, inputs, headers=auth())
    text = answer.as_numpy("text_output")[0].decode()
    assert text == openai_completion(server, prompt, 24, **vllm) != openai_completion(server, prompt, 24)
    assert answer.as_numpy("num_output_tokens")[0] >= 20


def engine_idle(server: Server) -> None:
    wait_until = time.monotonic() + LONG
    with http(server) as client:
        while (stats := client.get("/engine/stats").json())["running"] or stats["waiting"]:
            assert time.monotonic() < wait_until, stats
            time.sleep(0.1)


def generated_tokens(server: Server) -> float:
    return counter(server.url, TOKENS, headers=auth())


def test_cancelling_a_stream_frees_its_request_in_the_engine(server: Server) -> None:
    before = generated_tokens(server)
    stream = Stream(server.grpc_client(), auth())
    stream.send("long", generation_inputs(STORY, 500))
    for _ in range(5):
        result, error = stream.next()
        assert error is None, error
    with http(server) as client:
        assert client.get("/engine/stats").json()["running"] == 1
    stream.client.stop_stream(cancel_requests=True)
    engine_idle(server)
    assert generated_tokens(server) - before < 450  # cut: far from the 500 tokens it asked for


def test_a_missing_or_wrong_key_is_unauthenticated(server: Server) -> None:
    refused_before = counter(server.url, "fnserve_rejections_total", headers=auth(), reason="unauthorized")
    client = server.grpc_client()
    for headers in ({}, {"authorization": "Bearer wrong"}):
        error = grpc_error(lambda h=headers: client.infer(EMBEDDER, [text_input("text", ["x"])], headers=h))
        assert error.status() == "StatusCode.UNAUTHENTICATED"
    # Refused before the message is parsed: bytes that are no request get the same answer, as does a stream.
    garbage = b"\xff\xff\xff"
    with grpc.insecure_channel(server.grpc) as channel:
        unary = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=bytes)
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=bytes
        )
        for call in (
            lambda: unary(garbage, timeout=LONG),
            lambda: list(stream(iter([garbage]), timeout=LONG)),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value
            assert "API key" in caught.value.details()
    assert (
        counter(server.url, "fnserve_rejections_total", headers=auth(), reason="unauthorized")
        - refused_before
        == 4
    )
    assert client.is_server_live()  # probes need no key, as over HTTP
    with httpx_client(server.url) as anonymous:
        response = anonymous.get(f"/v2/models/{EMBEDDER}")
    assert response.status_code == 401 and "API key" in response.json()["error"]


def test_a_grpc_deadline_cancels_the_generation(server: Server) -> None:
    # Sized from this machine's own speed: 16 tokens' time, from a short answer, so a request for 400
    # tokens always runs past it.
    client = server.grpc_client()
    prompt = STORY
    start = time.monotonic()
    client.infer(CHAT, generation_inputs(prompt, 16, stream=False), headers=auth())
    per_token = (time.monotonic() - start) / 16
    before = generated_tokens(server)
    error = grpc_error(
        lambda: client.infer(
            CHAT, generation_inputs(prompt, 400, stream=False), headers=auth(), client_timeout=16 * per_token
        )
    )
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    engine_idle(server)
    assert generated_tokens(server) - before < 400
    again = client.infer(CHAT, generation_inputs("Hi", 4, stream=False), headers=auth())
    assert again.as_numpy("num_output_tokens")[0] == 4


def raw_infer(server: Server, request: pb.ModelInferRequest) -> grpc.RpcError | pb.ModelInferResponse:
    with grpc.insecure_channel(server.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            return stub.ModelInfer(request, metadata=tuple(auth().items()), timeout=LONG)
        except grpc.RpcError as error:
            return error


def test_bytes_that_are_no_request_end_the_call_invalid_argument_and_the_next_is_served(
    server: Server,
) -> None:
    """Over a stream and in a unary call. The stream once waited on forever (and would hold the
    server's shutdown for its whole grace); both once ended UNKNOWN, a server fault."""
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        garbage = iter([b"\xff\xff\xff"])
        with pytest.raises(grpc.RpcError) as caught:
            list(call(garbage, metadata=tuple(auth().items()), timeout=LONG))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "not a ModelStreamInfer request" in caught.value.details()
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff", metadata=tuple(auth().items()), timeout=LONG)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "not a ModelInfer request" in caught.value.details()
    stream = Stream(server.grpc_client(), auth())
    try:
        stream.send("next", generation_inputs("Hi", 4))
        texts, _ = stream.collect({"next"})
    finally:
        stream.client.stop_stream()
    assert texts["next"]


def tensor(name: str, datatype: str, shape: list[int]) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)


@pytest.mark.parametrize(
    ("inputs", "raw", "problem"),
    [
        ([tensor("text", "FP32", [1])], [b"\0\0\0\0"], "must be BYTES"),
        ([tensor("text", "BYTES", [1, 2])], [b"\1\0\0\0a\1\0\0\0b"], "shape [n] or [n, 1]"),
        ([tensor("text", "BYTES", [2])], [b"\1\0\0\0a"], "needs 2 elements"),
        ([tensor("text", "BYTES", [1])], [b"\x09\0\0\0a"], "runs past the end"),
        ([tensor("text", "BYTES", [1])], [], "needs 1 elements, the data has 0"),
        ([tensor("text", "FP16", [1])], [], "must come in raw_input_contents"),
        ([tensor("text", "BYTES", [1]), tensor("text", "BYTES", [1])], [b"\1\0\0\0a"] * 2, "given twice"),
        ([tensor("words", "BYTES", [1])], [b"\1\0\0\0a"], "no input 'words'"),
        ([tensor("text", "BYTES", [1])], [b"\2\0\0\0\xff\xfe"], "not UTF-8"),
        ([tensor("text", "NOPE", [1])], [b""], "unknown datatype"),
        ([tensor("text", "FP32", [0, 2**62, 4])], [b""], "cannot be held"),
    ],
)
def test_malformed_tensors_are_invalid_argument_and_the_next_call_is_served(
    server: Server, inputs: list[pb.ModelInferRequest.InferInputTensor], raw: list[bytes], problem: str
) -> None:
    request = pb.ModelInferRequest(model_name=EMBEDDER, inputs=inputs, raw_input_contents=raw)
    error = raw_infer(server, request)
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert problem in error.details()
    good = pb.ModelInferRequest(
        model_name=EMBEDDER, inputs=[tensor("text", "BYTES", [1])], raw_input_contents=[b"\2\0\0\0ok"]
    )
    answer = raw_infer(server, good)
    assert isinstance(answer, pb.ModelInferResponse) and answer.outputs[0].shape == [1, 384]


def test_a_request_parameter_without_a_value_is_invalid_argument(server: Server) -> None:
    request = pb.ModelInferRequest(
        model_name=EMBEDDER, inputs=[tensor("text", "BYTES", [1])], raw_input_contents=[b"\2\0\0\0ok"]
    )
    request.parameters["top_k"].CopyFrom(pb.InferParameter())
    error = raw_infer(server, request)
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "parameter 'top_k' has no value" in error.details()


BINARY_HEAD = orjson.dumps(
    {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 99}}]}
)


@pytest.mark.parametrize(
    ("body", "headers", "problem"),
    [
        (b"{not json", {}, "malformed request"),
        (b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}', {}, "neither data nor"),
        (
            BINARY_HEAD + b"\1\0\0\0a",
            {"Inference-Header-Content-Length": str(len(BINARY_HEAD))},
            "binary_data_size",
        ),
        (
            b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [3]}]}',
            {},
            "must be strings",
        ),
        (
            orjson.dumps(
                {"inputs": [{"name": "text", "shape": [1] * 65, "datatype": "FP32", "data": [1.0]}]}
            ),
            {},
            "cannot be held",
        ),
        (  # refused before the product of its dimensions, which had held the event loop
            orjson.dumps(
                {"inputs": [{"name": "text", "shape": [2] * 40_000, "datatype": "BYTES", "data": ["x"]}]}
            ),
            {},
            "40000 dimensions cannot be held",
        ),
        (BINARY_HEAD, {"Inference-Header-Content-Length": b"\xb2"}, "must be the JSON header's size"),
        (b"{}", {"Content-Encoding": "gzip"}, "not gzip data"),
        (zlib.compress(b"{}") + b"more", {"Content-Encoding": "deflate"}, "not one whole deflate stream"),
        (b"{}", {"Content-Encoding": "br"}, "Content-Encoding br is not taken"),
        (zlib.compress(bytes(MAX_BODY + 1)), {"Content-Encoding": "deflate"}, "once inflated"),  # a bomb
    ],
)
def test_malformed_rest_infer_bodies_get_400(
    server: Server, body: bytes, headers: dict[str, str | bytes], problem: str
) -> None:
    with http(server) as client:
        response = client.post(f"/v2/models/{EMBEDDER}/infer", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert problem in response.json()["error"]
        ok = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["ok"]}]}
        assert client.post(f"/v2/models/{EMBEDDER}/infer", json=ok).status_code == 200


def test_numpy_holds_as_many_dimensions_as_tensors_may_have() -> None:
    np.zeros([1] * MAX_DIMENSIONS)
    with pytest.raises(ValueError):
        np.zeros([1] * (MAX_DIMENSIONS + 1))


def test_triton_generate_and_generate_stream(server: Server) -> None:
    prompt = "The capital of France is"
    expected = openai_completion(server, prompt, 12)
    body = {"text_input": prompt, "parameters": {"temperature": 0, "max_tokens": 12}}
    with http(server) as client:
        whole = client.post(f"/v2/models/{CHAT}/generate", json=body).json()
        with client.stream("POST", f"/v2/models/{CHAT}/generate_stream", json=body) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        unknown = {"text_input": prompt, "parameters": {"use_beam_search": True}}
        refused = client.post(f"/v2/models/{CHAT}/generate", json=unknown)
        # orjson reads JSON nested deeper than it writes: that had been a 500 (and a deep `id`, echoed in
        # the answer, a 500 after the whole generation).
        deep: object = 1
        for _ in range(300):
            deep = [deep]
        nested = [
            client.post(f"/v2/models/{CHAT}/{route}", json=body)
            for route in ("generate", "generate_stream")
            for body in (
                {"text_input": prompt, "sampling_parameters": {"max_tokens": deep}},
                {"text_input": prompt, "id": deep},
            )
        ]
        # The vLLM backend's input as a key of the body, as a string or an object; a version in the path.
        as_input = {"text_input": prompt, "sampling_parameters": json.dumps(body["parameters"])}
        as_object = {"text_input": prompt, "sampling_parameters": body["parameters"]}
        versioned = [
            client.post(f"/v2/models/{CHAT}/versions/1/generate", json=b) for b in (as_input, as_object)
        ]
    assert [answer.json()["text_output"] for answer in versioned] == [expected] * 2
    assert whole["text_output"] == expected and whole["num_output_tokens"] == 12
    parts = [httpx.Response(200, content=line[6:]).json() for line in events]
    assert "".join(part["text_output"] for part in parts) == expected
    # Several parts: the first token comes alone, and a step that accepts drafts sends its tokens at once.
    assert parts[-1]["finish_reason"] == "length" and len(parts) > 1
    assert refused.status_code == 400 and "use_beam_search" in refused.json()["error"]
    assert [(r.status_code, r.json()["error"]) for r in nested] == [
        (400, "`sampling_parameters` is nested too deeply"),
        (400, "`id` must be a string"),
    ] * 2


def test_one_concurrency_bound_covers_both_ports() -> None:
    """One worker that takes one request at a time: while a gRPC stream's request runs, a gRPC call and
    an HTTP request are both refused for load, each in its protocol's terms, and served once it ends."""
    port = free_port()
    env = {**ONE_WORKER, "FNSERVE_GRPC_PORT": str(port), "FNSERVE_MAX_CONCURRENCY": "1"}
    with serve(env=env) as url:
        server = Server(url, f"127.0.0.1:{port}")
        client = server.grpc_client()
        answers: queue.Queue[tuple[object, object]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(CHAT, generation_inputs(STORY, 500), request_id="long")
        result, error = answers.get(timeout=LONG)
        assert error is None, error  # a token came: the request holds the worker's one place
        busy = grpc_error(lambda: client.infer(EMBEDDER, [text_input("text", ["x"])]))
        assert busy.status() == "StatusCode.RESOURCE_EXHAUSTED" and "limit of 1" in busy.message()
        refused = httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDER, "input": "x"}, timeout=LONG)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency"
        # Calls open are bounded too, at twice the requests: a stream holds no place until a request of
        # its runs, so idle ones had piled up without limit. A second stream is the second call...
        idle = server.grpc_client()
        idle_answers: queue.Queue[tuple[object, object]] = queue.Queue()
        idle.start_stream(callback=lambda result, error: idle_answers.put((result, error)))
        idle.async_stream_infer(EMBEDDER, [text_input("text", ["x"])], request_id="idle")
        _, idle_error = idle_answers.get(timeout=LONG)
        # Refused for load in the stream, which stays open.
        assert isinstance(idle_error, InferenceServerException) and "limit of 1" in idle_error.message()
        # ... and a third is refused by gRPC before it is taken.
        past = grpc_error(lambda: server.grpc_client().infer(EMBEDDER, [text_input("text", ["x"])]))
        assert past.status() == "StatusCode.RESOURCE_EXHAUSTED" and "limit of 1" not in past.message()
        idle.stop_stream()
        client.stop_stream(cancel_requests=True)
        wait_until = time.monotonic() + LONG
        while True:  # the stream's place is given back once its request has been cancelled
            try:
                vectors = client.infer(EMBEDDER, [text_input("text", ["x"])]).as_numpy("embedding")
                break
            except InferenceServerException as exc:
                assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED" and time.monotonic() < wait_until
                time.sleep(0.1)
        assert vectors.shape == (1, 384)
