"""The text-generation function: SmolLM2-135M-Instruct with continuous batching and token streaming."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, aclosing
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import bentoml
from bentoml.exceptions import BadInput
from pydantic import Field

from models.catalog import CATALOG
from services.admission import DEADLINE_PASSED, rejected, seconds_left
from services.config import TIMEOUT_GRACE_SECONDS, get_settings, pick_device, usable_cores
from services.functions.engine import Engine, EngineError, Sampling, TokenLogprob, TransformersEngine
from services.functions.hardware import Choices, model_status, once_per_server, server_instance, share_the_gil
from services.functions.lifecycle import ModelSlot, Reloadable
from services.functions.pacing import BEAT, EngineBeat, ServiceRate, admit
from services.functions.speculation import Drafting, SpeculationStats, StepCost, measure_step_cost
from services.functions.types import (
    ChatMessage,
    MaxTokens,
    MinTokens,
    Penalty,
    Refused,
    RepetitionPenalty,
    StopList,
    Temperature,
    Text,
    TopK,
    TopP,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("bentoml.fnserve.generation")  # under "bentoml": the server only logs that tree
settings = get_settings()
MODEL = CATALOG[settings.generation_model]


# The native chat endpoint's parameters, shared with its relay on the entry service.
ChatMessages = Annotated[list[ChatMessage], Field(min_length=1)]
ChatMaxTokens = Annotated[int, Field(ge=1, le=settings.generation_max_tokens)]
CHAT_DEFAULT_TOKENS = min(128, settings.generation_max_tokens)
MAX_TOP_LOGPROBS = 20  # OpenAI's cap
WAIT_SETTING = "FNSERVE_GENERATION_MAX_WAIT_SECONDS"


def event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}) + "\n"


TTFT = bentoml.metrics.Histogram(
    name="fnserve_generation_time_to_first_token_seconds",
    documentation="From a request's admission to its first generated token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
INTER_TOKEN = bentoml.metrics.Histogram(
    name="fnserve_generation_inter_token_seconds",
    documentation="Between consecutive generated tokens of one request",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
PROMPT_TOKENS = bentoml.metrics.Counter(name="fnserve_generation_prompt_tokens", documentation="Tokens in")
COMPLETION_TOKENS = bentoml.metrics.Counter(
    name="fnserve_generation_completion_tokens", documentation="Tokens out"
)
SPECULATION = bentoml.metrics.Counter(
    name="fnserve_speculation",
    documentation="The chat engine's speculative decoding: steps, steps that drafted, drafts, draft tokens, "
    "accepted draft tokens (their ratio is the acceptance rate)",
    labelnames=["count"],
)
QUEUE_REQUESTS = bentoml.metrics.Gauge(
    name="fnserve_generation_queue_requests",
    documentation="Chat requests admitted that have no token yet (queued in the engine, or in prefill)",
    multiprocess_mode="livesum",
)

T = TypeVar("T")


def probe_decoding(model: torch.nn.Module) -> None:
    """What the engine's steps cost: 16 packed decode tokens, and a 64-token prefill."""
    import torch

    for tokens in (16, 64):
        ids = torch.arange(1000, 1000 + tokens, device=model.device).unsqueeze(0)
        model(input_ids=ids, use_cache=False)


async def until(deadline: float | None, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """The items, until the deadline (time.monotonic()); TimeoutError after it. Each wait has its own
    timeout: one around a generator's yields would cancel whoever iterates it, not the wait."""
    while True:
        try:
            async with asyncio.timeout(seconds_left(deadline)):
                item = await anext(items)
        except StopAsyncIteration:
            return
        yield item


class TokenClock:
    """Records one request's time to first token, inter-token latencies and token counts."""

    def __init__(self, prompt_tokens: int) -> None:
        PROMPT_TOKENS.inc(prompt_tokens)
        self._last = time.perf_counter()
        self._first = True

    def tick(self, tokens: int) -> None:
        """`tokens` arrived together (a step that accepted drafts): its gap is spread over them, so that
        inter-token latencies stay one per token after the first and sum to the decoding time."""
        if not tokens:
            return
        now = time.perf_counter()
        gap, rest = now - self._last, tokens
        if self._first:
            TTFT.observe(gap)
            gap, rest = 0.0, tokens - 1
        for _ in range(rest):
            INTER_TOKEN.observe(gap / rest)
        self._first, self._last = False, now
        COMPLETION_TOKENS.inc(tokens)


class StopMatcher:
    """Cuts text at the first stop string. Text that could still be the start of a stop string is held
    back until it is resolved, so a stop string never reaches the client, even split across tokens."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._hold = max((len(stop) for stop in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        self._pending += delta
        cuts = [i for i in (self._pending.find(stop) for stop in self._stops) if i >= 0]
        if cuts:
            self.stopped = True
            out, self._pending = self._pending[: min(cuts)], ""
            return out
        cut = max(len(self._pending) - self._hold, 0)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class IncrementalDecoder:
    """Text deltas from a growing token list. Decoding the whole list each step keeps merges across token
    boundaries right; a trailing U+FFFD means a multi-byte character is still incomplete, so it waits."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self.text = ""

    def push(self, token_ids: list[int], last: bool = False) -> str:
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        if text.endswith("\ufffd") and not last:
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


def engine_runs(engine: Engine) -> bool:
    return engine.running


@bentoml.service(
    name="generation",
    workers=1,
    traffic={"timeout": settings.request_timeout_seconds + TIMEOUT_GRACE_SECONDS},
    logging={"access": {"enabled": False}},
    tracing=settings.tracing,
    # BentoML's client recycles its session every 100 calls by default and kills the calls in flight
    # (about one 500 per 100 concurrent calls, field notes); streams live long, so never recycle.
    runner_connection={"max_requests": 10**9, "max_age": 1e9},
)
class Generator:
    """Owns the chat model and its engine loop (one per process)."""

    model_ref = bentoml.models.BentoModel(MODEL.tag)

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.choices = Choices("generation")
        threads = self.choices.setting_or(
            "threads", "FNSERVE_GENERATION_THREADS", settings.generation_threads, usable_cores(),
            "one engine loop per server: its forward passes may use every core",
        )  # fmt: skip
        torch.set_num_threads(threads)
        share_the_gil(self.choices, settings.gil_switch_microseconds)
        self.cache_blocks = self.choices.setting_or(
            "cache_blocks", "FNSERVE_GENERATION_CACHE_BLOCKS", settings.generation_cache_blocks,
            settings.cache_blocks, "KV-cache blocks of 64 tokens: a CPU's step time grows with the batch, a "
            "GPU's hardly",
        )  # fmt: skip
        self.model_id = MODEL.name
        self.device = pick_device(settings)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref.path)
        # One thread for the tokenizer (it lets the GIL go): a long prompt took the event loop, and every
        # stream's deltas with it, for as long as it took to read (0.5-0.7 s a megabyte on the Zen 4).
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="fnserve-tokenize")
        # No token spans more characters than the longest one in the vocabulary (in byte-level BPE, its
        # bytes): a prompt of more characters than the window times that has more tokens than the window.
        self._token_chars = max(len(token) for token in self.tokenizer.get_vocab())
        stored = AutoModelForCausalLM.from_pretrained(self.model_ref.path).to(self.device).eval()
        self.context_window: int = stored.config.max_position_embeddings
        self.cache_tokens = (self.cache_blocks - 1) * 64  # one block of headroom
        self.dtype: torch.dtype = self.choices.dtype(
            settings.generation_dtype, "FNSERVE_GENERATION_DTYPE", stored, probe_decoding, key=str(MODEL.tag)
        )
        served = stored.to(self.dtype)
        self.drafting = self.decide_speculation(served)
        self.weights = Reloadable(lambda: served, self.model_ref.path, self.dtype, self.device)
        self.slot = ModelSlot(
            MODEL.name, self.start_engine, self.stop_engine, settings.idle_release_seconds, alive=engine_runs
        )
        self.slot.load_now()
        logger.info("generation model %s on %s", MODEL.tag, self.device)
        self._release_task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._waiting = 0  # admitted requests without a token yet: the bounded queue
        self._active = 0  # online requests in the engine or waiting for it
        self.first_tokens = ServiceRate()  # seconds to first token per request waiting
        self.beat = EngineBeat(server_instance())

    def decide_speculation(self, model: torch.nn.Module) -> Drafting | None:
        """How the engine drafts, or None. Only the synchronous CPU engine runs the drafting patches; a
        GPU engine batches asynchronously and replays CUDA graphs."""
        if settings.speculation == "off":
            self.choices.add("speculation", "off", "setting", "FNSERVE_SPECULATION=off")
            return None
        if self.device != "cpu":
            self.choices.add("speculation", "off", "rule", "drafting is implemented for the CPU engine only")
            return None
        reason = "n-gram drafts where the step cost says they pay (a CPU step of few tokens costs about one)"
        self.choices.add("speculation", "auto", "rule", reason)

        def decide() -> dict[str, object]:
            points, why = measure_step_cost(model)
            return {"points": points, "reason": why}

        # Under the server's lock: the image function's measurement would otherwise time its passes
        # on the same cores.
        key = f"{MODEL.tag}-step-cost-{model.dtype}"
        decided = once_per_server(server_instance(), key, decide, remember=True)
        cost = StepCost(decided["points"])
        self.choices.add("speculation_step_cost", cost.summary(), "measured", decided["reason"])
        return Drafting(cost)

    def start_engine(self) -> Engine:
        """The weights from the model store and a fresh engine loop."""
        return TransformersEngine(
            self.weights.load(),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            cache_blocks=self.cache_blocks,
            speculation=self.drafting,
        )

    def stop_engine(self, engine: Engine) -> None:
        if engine.shutdown():
            self.weights.release()
        else:  # a loop still running would read released weights; the next wake reads them in again
            logger.warning("the engine loop did not stop within its wait; its weights stay in memory")

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                [m.model_dump() for m in messages], add_generation_prompt=True, return_dict=False
            )
        )

    def prompt_ids(
        self, messages: list[ChatMessage] | None, prompt: str | None, add_special_tokens: bool = True
    ) -> list[int]:
        """A chat through the model's template (which places its own special tokens), or a raw prompt."""
        if messages is not None:
            return self.chat_prompt(messages)
        return list(self.tokenizer(prompt or "", add_special_tokens=add_special_tokens)["input_ids"])

    async def tokenized(
        self, messages: list[ChatMessage] | None, prompt: str | None, add_special_tokens: bool = True
    ) -> list[int]:
        """`prompt_ids` off the event loop; ValueError, before any tokenizing, for a prompt of more
        characters than the window's tokens can span (a 16 MB body would have taken seconds to read)."""
        chars = len(prompt or "") if messages is None else sum(len(m.content) for m in messages)
        window = self.window
        if chars > window * self._token_chars:
            raise ValueError(
                f"the prompt is {chars} characters, more tokens than the {window}-token window this server "
                f"holds per request (no token here spans more than {self._token_chars} characters)"
            )
        read = partial(self.prompt_ids, messages, prompt, add_special_tokens)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, read)

    @property
    def window(self) -> int:
        """Tokens one request may hold, prompt and answer: the model's context or the KV cache, the
        smaller (a request the cache cannot hold would stop the engine, not just fail)."""
        return min(self.context_window, self.cache_tokens)

    @bentoml.api
    async def generate(
        self,
        messages: list[ChatMessage] | None = None,
        prompt: Text | None = None,
        max_tokens: MaxTokens | None = None,
        temperature: Temperature = 1.0,
        top_p: TopP = 1.0,
        stop: StopList = [],  # noqa: B006 - pydantic copies defaults
        top_k: TopK = 0,
        ignore_eos: bool = False,
        skip_special_tokens: bool = True,
        logprobs: Annotated[
            int | None, Field(ge=0, le=MAX_TOP_LOGPROBS, description="the chosen token's and the n likeliest")
        ] = None,
        presence_penalty: Penalty = 0.0,
        frequency_penalty: Penalty = 0.0,
        repetition_penalty: RepetitionPenalty = 1.0,
        min_tokens: MinTokens = 0,
        speculate: Annotated[
            bool, Field(description="false: never drafted (services/functions/speculation.py)")
        ] = True,
        timeout: Annotated[float | None, Field(description="seconds left to the request's deadline")] = None,
        background: Annotated[
            bool, Field(description="a batch line: never refused for a full queue")
        ] = False,
    ) -> AsyncGenerator[str, None]:
        """Newline-delimited JSON events for the OpenAI routes: first `start` (prompt tokens) or `error`
        (status, message, param, code), then `delta` (text; with `logprobs`, each token's entry), then
        `done` (finish reason, completion tokens) or `error`. The first event comes before any
        generation, so callers can still answer 4xx, 429 (queue full) or 503 (queue full while the model
        loads)."""
        if not background and self._waiting >= settings.generation_max_queue:
            loading = self.slot.state == "loading"
            rejected("loading" if loading else "queue_full")
            message = f"{self._waiting} chat requests are waiting for the model; try again shortly"
            code = "model_loading" if loading else "queue_full"
            yield event("error", status=503 if loading else 429, message=message, code=code)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        ahead = self._waiting + 1  # this request included
        if not background:
            try:
                expected = self.first_tokens.seconds_for(ahead)
                target, idle = settings.generation_max_wait_seconds, self._waiting == 0
                admit("generation", expected, target, deadline, WAIT_SETTING, idle=idle)
            except Refused as refusal:
                late = refusal.kind == "deadline"
                status, code = (504, "deadline_exceeded") if late else (429, "queue_full")
                yield event("error", status=status, message=refusal.message, code=code,
                            retry_after=refusal.retry_after)  # fmt: skip
                return
        # Counted from admission, before any await, so that requests arriving together cannot all pass
        # the check; uncounted at the first token or at the end, whichever comes first.
        self._queued(1)
        online = not background  # the encoders yield to online chats, never to batch lines
        self._active += online
        waiting, admitted = [True], time.monotonic()

        def leave_queue() -> bool:
            """True the first time: the request no longer waits for a token."""
            if not waiting:
                return False
            waiting.clear()
            self._queued(-1)
            return True

        def first_token() -> None:
            if leave_queue():
                self.first_tokens.observe(ahead, time.monotonic() - admitted)

        sampling = Sampling(
            0, temperature, top_p, max(0, top_k), ignore_eos, logprobs,
            presence_penalty, frequency_penalty, repetition_penalty, min_tokens, speculate,
        )  # fmt: skip
        request = (messages, prompt, max_tokens, sampling, stop, skip_special_tokens, deadline)
        try:
            if online:
                self.beat.busy()
            async with aclosing(self._events(*request, first_token)) as events:
                async for line in events:
                    yield line
        finally:
            leave_queue()  # refused, failed or cancelled before a token: not a measure of the queue
            self._active -= online

    async def _events(
        self,
        messages: list[ChatMessage] | None,
        prompt: str | None,
        max_tokens: int | None,
        sampling: Sampling,
        stop: list[str],
        skip_special_tokens: bool,
        deadline: float | None,
        first_token: Callable[[], None],
    ) -> AsyncGenerator[str, None]:
        problem = self.check(messages, prompt, max_tokens)
        ids: list[int] = []
        budget = 0
        if problem is None:
            try:
                ids = await self.tokenized(messages, prompt)
                budget = self.token_budget(ids, max_tokens)
            except ValueError as exc:
                problem = (str(exc), "messages" if messages else "prompt")
        if problem is None and sampling.min_tokens > budget:
            message = f"min_tokens {sampling.min_tokens} is over the {budget} tokens this request may have"
            problem = (message, "min_tokens")
        if problem:
            yield event("error", status=400, message=problem[0], param=problem[1])
            return
        yield event("start", prompt_tokens=len(ids))
        clock = TokenClock(len(ids))
        decoder, matcher = IncrementalDecoder(self.tokenizer, skip_special_tokens), StopMatcher(stop)
        generated: list[int] = []
        scored: list[dict[str, Any]] = []  # logprobs of tokens whose text has not been sent yet

        def delta(text: str) -> str:
            """A delta event; with logprobs, those of every token up to it."""
            extra = {"logprobs": scored[:]} if sampling.logprobs is not None else {}
            scored.clear()
            return event("delta", text=text, tokens=len(generated), **extra)

        try:
            async with AsyncExitStack() as stack:
                async with asyncio.timeout(seconds_left(deadline)):
                    engine = await stack.enter_async_context(self.slot.use())  # a sleeping model loads
                stream = engine.stream(ids, replace(sampling, max_new_tokens=budget))
                steps = await stack.enter_async_context(aclosing(stream))
                async for step in until(deadline, steps):
                    first_token()
                    entries, last = self.logprob_entries(step.logprobs or []), len(step.token_ids) - 1
                    text, before = "", len(generated)
                    # A token at a time: a stop string can end the answer inside a step of drafted
                    # tokens, and those after it are no part of the answer, its usage, its logprobs or
                    # the tokens counted out.
                    for i, token in enumerate(step.token_ids):
                        generated.append(token)
                        scored.extend(entries[i : i + 1])
                        piece = decoder.push([token], step.finished and i == last)
                        if len(generated) >= sampling.min_tokens:  # as vLLM: no stop string before them
                            piece = matcher.push(piece)
                        text += piece
                        if matcher.stopped:
                            break
                    clock.tick(len(generated) - before)
                    if text:
                        yield delta(text)  # the step's tokens at once, as they came
                    if matcher.stopped:
                        break  # leaving the block closes the stream, which cancels the request
        except EngineError as exc:
            yield event("error", status=500, message=f"generation failed: {exc}")
            return
        except TimeoutError:
            rejected("deadline")
            yield event("error", status=504, message=DEADLINE_PASSED, code="deadline_exceeded")
            return
        rest = "" if matcher.stopped else matcher.flush()
        if rest or scored:
            yield delta(rest)
        at_eos = not sampling.ignore_eos and generated and generated[-1] == self.tokenizer.eos_token_id
        ended = matcher.stopped or at_eos
        yield event("done", finish_reason="stop" if ended else "length", completion_tokens=len(generated))

    def logprob_entries(self, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
        """Each token as its text, its logprob and the likeliest tokens' texts and logprobs."""
        text = self.tokenizer.decode
        return [
            {
                "token": text([entry.token_id]),
                "logprob": entry.logprob,
                "top": [[text([token]), logprob] for token, logprob in entry.top],
            }
            for entry in logprobs
        ]

    def _queued(self, change: int) -> None:
        self._waiting += change
        QUEUE_REQUESTS.set(self._waiting)

    def token_budget(self, ids: list[int], max_tokens: int | None) -> int:
        """Tokens the request may generate within the window."""
        window = self.window
        room = window - len(ids)
        if not ids:
            raise ValueError("the prompt is empty")
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise ValueError(
                f"the prompt is {len(ids)} tokens; with max_tokens {max_tokens or 1} that is over the "
                f"{window}-token window this server holds per request"
            )
        return min(max_tokens or settings.generation_max_tokens, room)

    def check(
        self, messages: list[ChatMessage] | None, prompt: str | None, max_tokens: int | None
    ) -> tuple[str, str] | None:
        """A client error as (message, param), or None."""
        if (messages is None) == (prompt is None):
            return "send exactly one of messages and prompt", "messages"
        if messages is not None and not messages:
            return "messages must not be empty", "messages"
        if max_tokens is not None and max_tokens > settings.generation_max_tokens:
            return f"max_tokens is capped at {settings.generation_max_tokens}", "max_tokens"
        return None

    @bentoml.api
    async def chat(
        self,
        messages: ChatMessages,
        max_tokens: ChatMaxTokens = CHAT_DEFAULT_TOKENS,
    ) -> AsyncGenerator[str, None]:
        """Native streaming endpoint: greedy text deltas as the model produces them."""
        try:
            ids = await self.tokenized(messages, None)
            budget = self.token_budget(ids, max_tokens)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        decoder, clock = IncrementalDecoder(self.tokenizer), TokenClock(len(ids))
        async with self.slot.use() as engine, aclosing(engine.stream(ids, Sampling(budget))) as steps:
            async for step in steps:
                clock.tick(len(step.token_ids))
                if delta := decoder.push(step.token_ids, step.finished):
                    yield delta

    @bentoml.api
    async def stats(self) -> dict[str, float]:
        """Engine occupancy: running and waiting requests, free share of the KV cache, and the wait a
        new request is expected to have for its first token (what admission compares with its target)."""
        expected = {"expected_first_token_seconds": self.first_tokens.seconds_for(self._waiting + 1)}
        speculation = self.drafting.as_dict() if self.drafting else {}
        if (engine := self.slot.current) is None:
            return {"running": 0, "waiting": 0, "free_cache": 1.0, **expected, **speculation}
        stats = engine.stats()
        return {
            "running": stats.running,
            "waiting": stats.waiting,
            "free_cache": stats.free_cache,
            **expected,
            **speculation,
        }

    @bentoml.api
    async def status(self) -> dict[str, Any]:
        """The model's state, device, the choices made for it at start-up, and the longest prompt plus
        answer one request may have (the smaller of the model's context and the KV cache)."""
        return {
            self.model_id: {
                **model_status(self.slot.state, self.device, self.choices),
                "max_model_len": self.window,
            }
        }

    @bentoml.api
    async def tokenize(
        self,
        messages: list[ChatMessage] | None = None,
        prompt: Text | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        """The token ids a chat (through the model's template) or a raw prompt is served as."""
        if problem := self.check(messages, prompt, None):
            raise BadInput(problem[0])
        try:
            return await self.tokenized(messages, prompt, add_special_tokens)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc

    @bentoml.api
    async def detokenize(self, tokens: list[int]) -> str:
        self.check_vocabulary(tokens)
        return self.tokenizer.decode(tokens)

    @bentoml.api
    async def token_strings(self, tokens: list[int]) -> list[str]:
        """The vocabulary's own spelling of each token (byte-level pieces), as vLLM's `token_strs`."""
        self.check_vocabulary(tokens)
        return self.tokenizer.convert_ids_to_tokens(tokens)

    def check_vocabulary(self, tokens: list[int]) -> None:
        vocabulary = len(self.tokenizer)
        for i, token in enumerate(tokens):
            if not 0 <= token < vocabulary:
                raise BadInput(f"tokens[{i}] is {token}, outside the vocabulary of {vocabulary} tokens")

    @bentoml.on_startup
    async def start_idle_release(self) -> None:
        self._release_task = asyncio.create_task(self.slot.release_when_idle())
        self._beat_task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        """Tells the encoders of this server that the engine has work (services/functions/pacing.py),
        and brings the speculation counters up to date."""
        counted = SpeculationStats()
        while True:
            if self._active:
                self.beat.busy()
            if self.drafting:
                for name, value in vars(self.drafting.stats).items():
                    if added := value - getattr(counted, name):
                        SPECULATION.labels(count=name).inc(added)
                        setattr(counted, name, value)
            await asyncio.sleep(BEAT)

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        """The engine loop stops, after a load or an idle release under way; the tasks end after it (a
        release cancelled mid-way would leave its thread stopping the engine beside this one)."""
        try:
            await self.slot.close(lambda engine: engine.shutdown())
        finally:
            for task in (self._release_task, self._beat_task):
                if task:
                    task.cancel()
