"""The chat function as the entry process sees it: requests relayed to the generation service (its own
process, services/functions/generation.py), deterministic answers kept in the response cache.

Every protocol calls this: OpenAI chat and completions, Triton's generate over REST and OIP gRPC, batch
lines. It speaks none of them: a protocol builds a `GenerationRequest` and reads `Delta`s and a `Done`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from bentoml.exceptions import InvalidArgument

from models.catalog import CATALOG
from services.admission import seconds_left
from services.config import Settings
from services.functions.batching import BACKGROUND, answered_by
from services.functions.cache import ResponseCache, cache_key, count_lookups
from services.functions.types import RefusalKind, Refused

EVENTS = "deltas-with-logprobs"  # the cached answers' format: a change must not read older entries
# The longest event line read from the generation service. aiohttp's own limit (twice the session's read
# buffer: 512 KiB for BentoML's session) is reached by one delta where a long stop string holds the text
# back: the logprobs of every held token (top 20: about 600 bytes a token) go out with the text that
# follows, past 900 tokens once FNSERVE_GENERATION_MAX_TOKENS allows that many. A delta holding every
# token of the window's logprobs is a few MB.
EVENT_LINE_BYTES = 64 * 2**20

# The generation service's error events carry an HTTP-like status; these are the kinds they mean.
KINDS: dict[int, RefusalKind] = {
    400: "invalid",
    404: "not_found",
    429: "queue_full",
    503: "loading",
    504: "deadline",
}


@dataclass
class GenerationRequest:
    """Exactly one of `messages` (a chat, through the model's template) and `prompt` (raw text)."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_k: int = 0
    """sample from the k likeliest tokens; 0 = all"""
    ignore_eos: bool = False
    """generate `max_tokens`, past the model's end of text"""
    skip_special_tokens: bool = True
    logprobs: int | None = None
    """None: no logprobs; n: each token's, and the n likeliest tokens' at its place"""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    speculate: bool = True
    """False: the engine never drafts for it, so its answer is plain decoding's, bit for bit"""

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None


VLLM_SAMPLING = ("ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens")


def vllm_sampling(params: Any) -> dict[str, Any]:
    """The `GenerationRequest` fields a protocol takes under vLLM's names (OpenAI's extensions, Triton's
    vLLM backend), from its parsed request; `top_k` -1 is vLLM's "off", as 0 is here."""
    return {name: getattr(params, name) for name in VLLM_SAMPLING} | {"top_k": max(0, params.top_k)}


@dataclass
class Delta:
    text: str
    completion_tokens: int = 0
    """tokens generated so far, this delta's included"""
    logprobs: list[dict[str, Any]] | None = None
    """with logprobs asked: `token`, `logprob` and `top` ([token, logprob] pairs) of the tokens since
    the previous delta"""


@dataclass
class Done:
    finish_reason: str
    """`stop` (end of text or a stop string) or `length`"""
    completion_tokens: int


@dataclass
class Answer:
    text: str
    done: Done
    logprobs: list[dict[str, Any]]
    """every token's entry (as in `Delta`), when asked"""


class Generation:
    """One answer on its way. Iterating yields `Delta`s then one `Done`, or raises `Refused`; closing it
    early cancels the request in the engine at its next step."""

    def __init__(self, prompt_tokens: int, cached: bool | None, events: AsyncIterator[dict[str, Any]]):
        self.prompt_tokens = prompt_tokens
        self.cached = cached
        """True: replayed from the cache; False: generated and stored; None: not cacheable"""
        self._events = events

    def __aiter__(self) -> AsyncIterator[Delta | Done]:
        return self._items()

    async def _items(self) -> AsyncIterator[Delta | Done]:
        async for item in self._events:
            if item["type"] == "delta":
                yield Delta(item["text"], item["tokens"], item.get("logprobs"))
            elif item["type"] == "done":
                yield Done(item["finish_reason"], item["completion_tokens"])
                return
            else:
                raise refusal(item)
        raise Refused("failed", "the generation service ended the stream early")

    async def text(self) -> Answer:
        """The whole answer."""
        parts: list[str] = []
        logprobs: list[dict[str, Any]] = []
        async with self:
            async for item in self:
                if isinstance(item, Delta):
                    parts.append(item.text)
                    logprobs.extend(item.logprobs or [])
                else:
                    return Answer("".join(parts), item, logprobs)
        raise Refused("failed", "the generation service ended the stream early")

    async def aclose(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


def message_of(exc: InvalidArgument) -> str:
    """The generation service's own words in a 400 its client raised (a JSON body `{"error": ...}`)."""
    try:
        return str(orjson.loads(exc.message)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return exc.message


def refusal(item: dict[str, Any]) -> Refused:
    kind = KINDS.get(item.get("status", 500), "failed")
    return Refused(kind, item["message"], item.get("param"), item.get("retry_after"))


class ChatFunction:
    def __init__(self, generator: Any, settings: Settings, cache: ResponseCache | None) -> None:
        """`generator` is the entry service's dependency on the generation service."""
        self._generator, self._settings, self._cache = generator, settings, cache
        self.model_id = settings.generation_model
        self._started: dict[str, Any] | None = None

    async def started(self) -> dict[str, Any]:
        """The generation service's model entry at start-up (its choices and window); asked once.
        Answers only once that service is up."""
        if self._started is None:
            (self._started,) = (await self._generator.status()).values()
        return self._started

    async def scope(self) -> tuple[str, ...]:
        """What the generation service chose at start-up that changes its answers (dtype, KV-cache
        size), for the cache's keys."""
        choices = (await self.started())["choices"]
        return choices["dtype"]["value"], choices["cache_blocks"]["value"]

    async def status(self) -> dict[str, Any]:
        return await self._generator.status()

    async def max_model_len(self) -> int:
        """The longest prompt and answer one request may have."""
        return int((await self.started())["max_model_len"])

    async def tokenize(
        self, messages: list[dict[str, str]] | None, prompt: str | None, special: bool
    ) -> list[int]:
        """Token ids as the model is served them; refuses (invalid) unless exactly one is given."""
        try:
            return await self._generator.tokenize(
                messages=messages, prompt=prompt, add_special_tokens=special
            )
        except InvalidArgument as exc:
            raise Refused("invalid", message_of(exc)) from None

    async def detokenize(self, tokens: list[int]) -> str:
        try:
            return await self._generator.detokenize(tokens=tokens)
        except InvalidArgument as exc:
            raise Refused("invalid", message_of(exc), "tokens") from None

    async def token_strings(self, tokens: list[int]) -> list[str]:
        return await self._generator.token_strings(tokens=tokens)

    async def stats(self) -> dict[str, float]:
        return await self._generator.stats()

    async def start(
        self, request: GenerationRequest, deadline: float | None = None, sample: int = 0
    ) -> Generation:
        """Admits the request: refusals that come before any generation (bad input, a full queue, a
        loading model) raise here, so a protocol can still answer them with its error status. `sample`
        numbers the independent answers one caller asks for at once (OpenAI's `n`): a seeded request's
        answers are cached apart, so that a repeat gets each of them back, not n copies of one."""
        async with answered_by(deadline):  # its cache key asks the generation service once, unbounded
            key, cached = await self._cached(request, sample)
        events = replay(cached) if cached else self._recorded(self._relay(request, deadline), key)
        first = await anext(events)
        if first["type"] == "error":
            await events.aclose()
            raise refusal(first)
        return Generation(first["prompt_tokens"], None if key is None else cached is not None, events)

    async def _cached(self, request: GenerationRequest, sample: int) -> tuple[str | None, bytes | None]:
        """The cache key of a deterministic request (None for others) and its cached answer, if any.
        Greedy answers are one answer, whatever `sample`; a seeded request's other samples have keys
        of their own (the first keeps the key it has when asked alone)."""
        if self._cache is None or not request.deterministic:
            return None, None
        model = (CATALOG[self.model_id].tag, *await self.scope())
        caps = (self._settings.generation_max_tokens,)  # without max_tokens they set the answer's length
        own = (sample,) if sample and request.temperature != 0 else ()
        key = cache_key("generation", EVENTS, *model, *caps, asdict(request), *own)
        (value,) = await self._cache.get_many([key])
        count_lookups("generation", value is not None, 1)
        return key, value

    async def _relay(
        self, request: GenerationRequest, deadline: float | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Parsed events from the generation service (newline-delimited JSON over a streamed call).

        Calls through the dependency's own HTTP session rather than the proxy method: the proxy's stream
        wrapper (BentoML 1.4.40) does not close the response when closed early, so the generation would
        run on until the garbage collector found it. Closing this iterator closes the call, which
        cancels the request in the engine."""
        session = await self._generator.to_async._session_manager.get_session()
        body = {
            "messages": request.messages,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop,
            "top_k": request.top_k,
            "ignore_eos": request.ignore_eos,
            "skip_special_tokens": request.skip_special_tokens,
            "logprobs": request.logprobs,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "repetition_penalty": request.repetition_penalty,
            "min_tokens": request.min_tokens,
            "speculate": request.speculate,
            "timeout": seconds_left(deadline),
            "background": BACKGROUND.get(),
        }
        # Under the deadline until the service answers: one that is not serving (restarting, stopped)
        # leaves the call in its socket's backlog, and it had waited there past any deadline.
        async with answered_by(deadline):
            response = await session.post("/generate", json={k: v for k, v in body.items() if v is not None})
        try:
            if response.status != 200:
                detail = (await response.read()).decode(errors="replace")
                yield {
                    "type": "error",
                    "status": response.status if response.status < 500 else 500,
                    "message": detail,
                }
                return
            while line := await response.content.readline(max_line_length=EVENT_LINE_BYTES):
                if line.strip():
                    yield orjson.loads(line)
        finally:
            response.close()

    async def _recorded(
        self, events: AsyncIterator[dict[str, Any]], key: str | None
    ) -> AsyncIterator[dict[str, Any]]:
        """The events, passed on; a complete answer is stored under `key` (errors and cut streams are
        not)."""
        saved: dict[str, Any] = {"deltas": []}
        try:
            async for item in events:
                if item["type"] == "start":
                    saved["prompt_tokens"] = item["prompt_tokens"]
                elif item["type"] == "delta":
                    saved["deltas"].append([item["text"], item["tokens"], item.get("logprobs")])
                elif item["type"] == "done" and key and self._cache:
                    await self._cache.set_many({key: orjson.dumps({**saved, "done": item})})
                yield item
        finally:
            await events.aclose()  # type: ignore[attr-defined]


async def replay(answer: bytes) -> AsyncIterator[dict[str, Any]]:
    """A cached answer as the generation service's events, the same deltas as when it was generated."""
    saved = orjson.loads(answer)
    yield {"type": "start", "prompt_tokens": saved["prompt_tokens"]}
    for text, tokens, logprobs in saved["deltas"]:
        yield {"type": "delta", "text": text, "tokens": tokens, "logprobs": logprobs}
    yield {"type": "done", **saved["done"]}
