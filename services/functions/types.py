"""What the functions take and how they refuse, in no protocol's terms: each protocol maps a refusal's
kind onto its own status (an HTTP code, a gRPC code) and error shape."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

RefusalKind = Literal["invalid", "not_found", "queue_full", "loading", "overloaded", "deadline", "failed"]


def encodable(text: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer or UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from exc
    return text


Text = Annotated[str, AfterValidator(encodable)]
# Up to four stop strings, as OpenAI bounds them, for every protocol and the generation API.
StopList = Annotated[list[Text], Field(max_length=4)]


def one_or_more(value: object) -> object:
    """One stop string is a list of one."""
    return [value] if isinstance(value, str) else value


# What the protocols take: one stop string or a list. Validated as a list, so that a refusal names the
# field and its problem; as a union of the two it named a member ("stop.function-after[...]") and the
# wrong problem (five strings: "Input should be a valid string").
Stops = Annotated[StopList, BeforeValidator(one_or_more, json_schema_input_type=Text | StopList)]
# Sampling bounds as OpenAI and vLLM set them, for every protocol that takes them.
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=10)]
# Integers the engine and the cache carry in fixed widths: transformers builds top_k into an int32 tensor
# inside the running batch (an overflow there stopped the engine for every request in it), and the cache
# key is JSON that orjson writes only within 64 bits (a larger count or seed was a 500).
INT32_MAX = 2**31 - 1
TopK = Annotated[int, Field(ge=-1, le=INT32_MAX)]
MaxTokens = Annotated[int, Field(ge=1, le=INT32_MAX)]
MinTokens = Annotated[int, Field(ge=0, le=INT32_MAX)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class Refused(Exception):
    """A request a function will not or could not serve. `param` names the input at fault, in the
    words of the caller's protocol where the protocol passed them in (`field=`); `retry_after` (whole
    seconds) is when a refusal for load is worth trying again."""

    def __init__(
        self, kind: RefusalKind, message: str, param: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.kind, self.message, self.param, self.retry_after = kind, message, param, retry_after
