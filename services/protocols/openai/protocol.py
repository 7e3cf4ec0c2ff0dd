"""OpenAI API shapes, kept apart from serving logic (as vLLM keeps entrypoints/openai/protocol.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, ValidationInfo, field_validator
from starlette.responses import JSONResponse, Response

from services.functions.types import (
    ChatMessage,
    MaxTokens,
    MinTokens,
    Penalty,
    Refused,
    RepetitionPenalty,
    Seed,
    Stops,
    Temperature,
    Text,
    TopK,
    TopP,
    encodable,
)
from services.protocols.nulls import RequestModel
from services.protocols.status import HTTP_STATUS


class OpenAIModel(RequestModel):
    """An OpenAI request body, or part of one."""


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, Any] | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    """The OpenAI error shape; refusals for load (429, 503) say when to try again."""
    retry = {"Retry-After": str(retry_after or 1)} if status in (429, 503) else {}
    body = error_body(status, message, param, code)
    return JSONResponse(body, status_code=status, headers={**retry, **(headers or {})})


class APIError(Exception):
    """Raised anywhere in request handling; answered in the OpenAI error shape with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    @classmethod
    def of(cls, refusal: Refused) -> APIError:
        status, code = HTTP_STATUS[refusal.kind], REFUSAL_CODES[refusal.kind]
        return cls(status, refusal.message, refusal.param, code, refusal.retry_after)


class OrjsonResponse(Response):
    """JSON written by orjson, which serialises numpy arrays natively: validating 384 floats per input
    through a response model costs more than the forward pass of a short input."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def invalid(errors: Sequence[Any]) -> APIError:
    """A 400 that names the first problem pydantic found, and how many more there are."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # A JSON syntax error's location is a character offset, not a parameter.
    param = location[0] if location and first.get("type") != "json_invalid" else None
    message = f"{'.'.join(location)}: {first['msg']}" if location else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return APIError(400, message, param, first.get("type"))


def check_model(asked: str, served: str) -> None:
    if asked.lower() != served:
        raise APIError(404, f"The model `{asked}` does not exist", "model", "model_not_found")


REFUSAL_CODES: dict[str, str | None] = {
    "invalid": None,
    "not_found": "model_not_found",
    "queue_full": "queue_full",
    "loading": "model_loading",
    "overloaded": "overloaded",
    "deadline": "deadline_exceeded",
    "failed": None,
}


MAX_CHOICES = 16  # choices in one request (n, times the prompts of a completion)


def one_or_many(value: str | list[str]) -> list[str]:
    """A field OpenAI takes as one string or a list of them, as the list."""
    return [value] if isinstance(value, str) else value


def text_not_token_ids(value: object) -> object:
    """OpenAI's inputs may be token ids (a list of ints, or of lists); the served models take text."""
    if isinstance(value, list) and value and isinstance(value[0], int | list):
        raise ValueError("token-id arrays are not supported by this server; send text")
    return value


class EmbeddingRequest(OpenAIModel):
    input: Text | list[Text] = Field(description="one text or a list of texts; each non-empty")
    model: Text
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64 is little-endian float32, as the openai client expects"
    )
    dimensions: int | None = Field(None, gt=0, description="only the model's own width is accepted")
    user: Text | None = None
    truncate_prompt_tokens: Literal[-1] | None = Field(
        None, description="vLLM's: -1 cuts each input to the window, whatever the server's overflow rule"
    )

    @field_validator("input", mode="before")
    @classmethod
    def reject_token_arrays(cls, value: object) -> object:
        return text_not_token_ids(value)

    @property
    def texts(self) -> list[str]:
        return one_or_many(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fnserve"
    max_model_len: int | None = Field(None, description="vLLM's: the longest input (chat: prompt and answer)")


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize: a raw prompt, or a chat through the model's template."""

    model: Text
    prompt: Text | None = None
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="for a prompt; a chat's template places its own")
    add_generation_prompt: Literal[True] = Field(True, description="the template's assistant turn is added")
    return_token_strs: bool = Field(False, description="each token as the vocabulary spells it")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: Text
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="vLLM's: with include_usage, usage on every chunk"
    )


class ResponseFormat(OpenAIModel):
    type: Literal["text"] = Field(
        description="only text: JSON modes and schemas are refused until the engine can constrain output"
    )
    json_schema: dict[str, Any] | None = None

    @field_validator("type", mode="before")
    @classmethod
    def text_only(cls, value: object) -> object:
        if value in ("json_object", "json_schema"):
            raise ValueError(f"response_format {value} is not supported by this server; use text")
        return value


class ChatMessageIn(OpenAIModel):
    """A message as OpenAI's API takes it: content as a string or as a list of parts. Text parts are
    joined with newlines, as vLLM joins them; other parts are refused by name, since no served model
    reads them. `developer` is OpenAI's newer name for `system`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[dict[str, Any]]
    name: Text | None = Field(None, description="accepted and ignored")

    @field_validator("content", mode="before")
    @classmethod
    def text_parts(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                shown = f"of type {kind!r}" if kind else "not a content part with a type"
                raise ValueError(f"content[{i}] is {shown}; the served models read text parts only")
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ValueError(f"content[{i}] must be {{'type': 'text', 'text': <string>}}")
            encodable(part["text"])
        return value

    def plain(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "\n".join(p["text"] for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


def plain_messages(messages: list[ChatMessageIn]) -> list[dict[str, str]]:
    """Messages as the chat function takes them: string content, roles the template knows."""
    return [message.plain().model_dump() for message in messages]


class GenerationParams(OpenAIModel):
    """Fields shared by chat completions and completions: OpenAI's, and the vLLM extensions that
    benchmark tools send. Fields with no meaning here are accepted and ignored (README)."""

    model: Text
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = Field(None, description="the newer name of max_tokens")
    temperature: Temperature = Field(1.0, description="0 = greedy")
    top_p: TopP = 1.0
    seed: Seed | None = Field(
        None, description="a seeded request is cached: its repeats get the first answer (README)"
    )
    stop: Stops | None = Field(None, description="up to 4 strings; the stop text is not returned")
    n: int = Field(
        1, ge=1, le=MAX_CHOICES, description="choices, generated side by side in the running batch"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(None, description="accepted and ignored")
    metadata: dict[Text, Text] | None = Field(None, description="accepted and ignored")
    service_tier: Text | None = Field(None, description="accepted and ignored")
    store: bool | None = Field(None, description="accepted and ignored: nothing is stored")
    response_format: ResponseFormat | None = None
    presence_penalty: Penalty = Field(
        0.0, description="subtracted from the logit of every token the answer already holds"
    )
    frequency_penalty: Penalty = Field(
        0.0, description="subtracted from a token's logit once per time the answer holds it"
    )
    ignore_eos: bool = Field(False, description="vLLM's: generate max_tokens, past the end of text")
    top_k: TopK = Field(0, description="vLLM's: sample from the k likeliest tokens; 0 or -1 = off")
    min_tokens: MinTokens = Field(0, description="vLLM's: no end of text before this many tokens")
    repetition_penalty: RepetitionPenalty = Field(
        1.0, description="vLLM's: divides the logits of tokens in the prompt or answer (>1)"
    )
    skip_special_tokens: bool = Field(True, description="vLLM's: leave special tokens out of the text")
    speculation: Literal["auto", "off"] = Field(
        "auto", description="fnserve's: off never drafts tokens for this request, so its answer is plain "
        "decoding's exactly (in bf16, drafting can change close greedy choices)",
    )  # fmt: skip

    @field_validator("stream_options")
    @classmethod
    def options_need_a_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; n: each token's logprob and the n likeliest at its place."""
        return None


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessageIn] = Field(min_length=1)
    logprobs: bool = Field(False, description="each answer token's log-probability under the model")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="the n likeliest tokens at each place")

    @field_validator("top_logprobs")
    @classmethod
    def top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationParams):
    prompt: Text | list[Text] = Field(
        description="one prompt, or a list: each gets n choices, prompt i's j-th at index i·n + j (vLLM's "
        f"order); at most {MAX_CHOICES} choices in all"
    )
    logprobs: int | None = Field(
        None, ge=0, le=20, description="the chosen token's log-probability and the n likeliest (vLLM's cap)"
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def text_prompts(cls, value: object) -> object:
        return text_not_token_ids(value)

    @field_validator("prompt")
    @classmethod
    def choices_in_bounds(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        count = len(one_or_many(value))
        n = info.data.get("n", 1)
        if count == 0:
            raise ValueError("a list of prompts must hold at least one")
        if count * n > MAX_CHOICES:
            raise ValueError(f"{count} prompts with n={n} make {count * n} choices; at most {MAX_CHOICES}")
        return value

    @property
    def prompts(self) -> list[str]:
        return one_or_many(self.prompt)

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The function's per-token entries in chat's shape: `content`, a list of tokens with their bytes."""

    def token(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**token(e["token"], e["logprob"]), "top_logprobs": [token(*top) for top in e["top"]]}
            for e in entries
        ]
    }


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The legacy completions' shape: parallel lists, `text_offset` counted from `offset` (the answer's
    characters before these tokens). The chosen token is among each place's `top_logprobs`, as OpenAI
    documents it (so up to n + 1 of them)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{**dict(e["top"]), e["token"]: e["logprob"]} for e in entries],
        "text_offset": offsets,
    }


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChatLogprobs | None = Field(None, description="only when asked")


class CompletionBase(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(CompletionBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = Field(None, description="only when asked")


class Completion(CompletionBase):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


BatchEndpoint = Literal[
    "/v1/embeddings", "/v1/chat/completions", "/v1/completions", "/v1/images/classifications"
]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreateRequest(OpenAIModel):
    input_file_id: Text
    endpoint: BatchEndpoint
    completion_window: Text = Field("24h", description="hours, as `<n>h`; OpenAI accepts only 24h")
    metadata: dict[Text, Text] | None = Field(None, max_length=16)

    @field_validator("completion_window")
    @classmethod
    def hours(cls, window: str) -> str:
        if not (window.endswith("h") and window[:-1].isdigit() and 0 < int(window[:-1]) <= 24 * 7):
            raise ValueError("completion_window must be hours between 1h and 168h, like 24h")
        return window

    @property
    def window_seconds(self) -> int:
        return int(self.completion_window[:-1]) * 3600


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: None = None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
