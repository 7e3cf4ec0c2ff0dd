"""Iteration-level continuous batching behind a small interface.

`Engine` is what the generation service needs from a batching engine; `TransformersEngine` implements it
with transformers' ContinuousBatchingManager (new requests join the running batch between decode steps,
finished and cancelled ones leave it). A GPU engine such as vLLM can implement the same three methods.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.functions.speculation import Drafting, Speculator, StepCost
from services.functions.speculation import install as install_speculation


class EngineError(RuntimeError):
    """The engine failed a request (the request only: the engine keeps serving others)."""


@dataclass(frozen=True)
class TokenLogprob:
    """The model's own log-probability of a generated token, before any penalty, temperature or cut,
    and the likeliest tokens at that position (as vLLM reports them by default)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Step:
    """Tokens a request produced since its previous step; `finished` marks its last step. `logprobs`
    has one entry per token when the request asked for them."""

    token_ids: list[int]
    finished: bool
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = every token
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n: the chosen token's and the n likeliest
    presence_penalty: float = 0.0  # subtracted once from every token the answer already holds
    frequency_penalty: float = 0.0  # subtracted per time the answer holds the token
    repetition_penalty: float = 1.0  # divides (or multiplies, if negative) seen tokens' logits
    min_tokens: int = 0  # the end of text is not chosen before this many tokens
    speculate: bool = True  # False: never drafted, for answers identical to plain decoding in bf16

    @property
    def penalised(self) -> bool:
        return any(getattr(self, name) != neutral for name, neutral in PENALTIES.items())

    @property
    def processed(self) -> bool:
        """Whether the engine must run its logits processing for this request (see GreedyBatches)."""
        return self.temperature > 0 or self.logprobs is not None or self.penalised


# In a batch where any request samples, the engine samples every row (do_sample is one setting for the
# whole batch); a request asking for greedy decoding gets this temperature, which makes its softmax
# one-hot on the argmax unless two logits lie within about 1e-4 of each other.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    free_cache: float  # share of the KV cache free, 0..1
    speculation: dict[str, float] = field(default_factory=dict)  # SpeculationStats.as_dict()


class Engine(Protocol):
    def stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Step]:
        """Tokens for one request as they are produced. Closing the iterator early cancels the request
        in the engine, which frees its cache at the next step."""
        ...

    def stats(self) -> EngineStats: ...

    @property
    def running(self) -> bool:
        """False once the engine loop has stopped or died: nothing it is given would be served."""
        ...

    def shutdown(self) -> bool:
        """Stops the engine loop; False if it is still running when the wait ends."""
        ...


def top_p_only_where_asked() -> None:
    """Makes the engine's per-request top-p skip the rows that do not ask for it. Its own warper sorts the
    whole vocabulary for every row at every step; with greedy or top_p=1 requests that sort was pure cost
    (bf16, 16 streams: 90 tokens/s with it, 114 without). Installed through the engine's own map from
    classic to per-request processors, before the engine is built."""
    import torch
    from transformers.generation.continuous_batching import cb_logits_processors as cb
    from transformers.generation.logits_process import TopPLogitsWarper

    class TopPWhereAsked(cb.ContinuousBatchingTopPLogitsWarper):
        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
            rows = (top_p < 1.0).nonzero().squeeze(-1)
            if rows.numel():
                scores[rows] = super().__call__(scores[rows], tensor_arg[rows])
            return scores

    cb.CLASSIC_TO_CB_PROCESSORS_MAP[TopPLogitsWarper] = TopPWhereAsked


def top_k_only_where_asked() -> None:
    """As `top_p_only_where_asked`, for top-k: only the rows that ask for it (k > 0) are sorted and cut,
    so that requests without a top-k sample from every token, as they did before it existed."""
    import torch
    from transformers.generation.continuous_batching import cb_logits_processors as cb
    from transformers.generation.logits_process import TopKLogitsWarper

    class TopKWhereAsked(cb.ContinuousBatchingTopKLogitsWarper):
        def prepare_tensor_args(self, requests: list[Any]) -> torch.Tensor:
            asked = [request.state.logit_processor_kwargs.get("top_k", 0) for request in requests]
            return torch.tensor(asked, dtype=torch.int32, device="cpu")

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            rows = (tensor_arg[: scores.size(0)] > 0).nonzero().squeeze(-1)
            if rows.numel():
                scores[rows] = super().__call__(scores[rows], tensor_arg[rows])
            return scores

    cb.CLASSIC_TO_CB_PROCESSORS_MAP[TopKLogitsWarper] = TopKWhereAsked


# The penalties with their neutral values, as `Sampling` names them and the History processor reads them.
PENALTIES: dict[str, float | int] = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
}


def history_processing() -> None:
    """Installs fnserve's per-request processor for what reads a request's own tokens: its log-probabilities
    and vLLM's penalties and `min_tokens`. transformers 5.24's per-request processors pass each row one
    int32, not its tokens, so this processor keeps the rows' request states from `prepare_tensor_args`
    (called with the batch's rows just before its forward pass) for its call. It takes the place of the
    classic repetition penalty, which the engine builds first of all processors, so it sees the raw
    logits: logprobs are the model's own, as vLLM reports them by default."""
    import torch
    from transformers.generation.continuous_batching import cb_logits_processors as cb
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    class History(cb.ContinuousBatchingLogitsProcessor):
        supported_kwargs: dict[str, type] = {
            "logprobs": int,
            **{name: type(neutral) for name, neutral in PENALTIES.items()},
        }
        ignored_kwargs: tuple[str, ...] = ()

        def __init__(self, _classic: RepetitionPenaltyLogitsProcessor) -> None:
            self.sink: dict[str, deque[Any]] = {}  # request id -> one entry per step, filled here
            self._rows: list[tuple[int, Any]] = []

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(0)

        def move_rows(self, first_rows: dict[str, int]) -> None:
            """Speculation widened the step's rows (services/functions/speculation.py); these rows
            never draft, so each is one row, now at `first_rows[its request]`."""
            self._rows = [(first_rows[state.request_id], state) for _, state in self._rows]

        def prepare_tensor_args(self, requests: list[Any]) -> torch.Tensor:
            self._rows = [
                (row, request.state)
                for row, request in enumerate(requests)
                if request.state.logit_processor_kwargs.keys() & self.supported_kwargs.keys()
            ]
            return torch.zeros(len(requests), dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            if not self._rows:
                return scores
            self._record_logprobs(scores)
            for row, state in self._rows:
                self._penalise(scores, row, state)
            return scores

        def _record_logprobs(self, scores: torch.Tensor) -> None:
            asking = [(row, state) for row, state in self._rows if "logprobs" in state.logit_processor_kwargs]
            if not asking:
                return
            rows = torch.tensor([row for row, _ in asking], device=scores.device)
            logprobs = scores[rows].log_softmax(dim=-1)
            most = max(state.logit_processor_kwargs["logprobs"] for _, state in asking)
            values, indices = logprobs.topk(most, dim=-1)
            values, indices = values.tolist(), indices.tolist()
            for i, (_, state) in enumerate(asking):
                if (steps := self.sink.get(state.request_id)) is not None:
                    n = state.logit_processor_kwargs["logprobs"]
                    steps.append((logprobs[i], list(zip(indices[i][:n], values[i][:n], strict=True))))

        @staticmethod
        def _penalise(scores: torch.Tensor, row: int, state: Any) -> None:
            asked = state.logit_processor_kwargs
            # A request the engine restarted (its cache evicted) holds its earlier answer in its prompt.
            prompt_length = state._true_initial_tokens or len(state.initial_tokens)
            answer = state.initial_tokens[prompt_length:] + state.generated_tokens
            presence, frequency = asked.get("presence_penalty", 0.0), asked.get("frequency_penalty", 0.0)
            if answer and (presence or frequency):
                ids = torch.tensor(answer, device=scores.device)
                counts = torch.bincount(ids, minlength=scores.size(-1)).to(scores.dtype)
                scores[row] -= frequency * counts + presence * (counts > 0).to(scores.dtype)
            if (penalty := asked.get("repetition_penalty", 1.0)) != 1.0:  # prompt and answer, as vLLM
                seen_ids = sorted(set(state.initial_tokens + state.generated_tokens))
                seen = torch.tensor(seen_ids, device=scores.device)
                logits = scores[row, seen]
                scores[row, seen] = torch.where(logits > 0, logits / penalty, logits * penalty)
            if len(answer) < asked.get("min_tokens", 0) and state._eos_token_ids:
                ends = torch.tensor(sorted(state._eos_token_ids), device=scores.device)
                scores[row, ends] = float("-inf")

    cb.CLASSIC_TO_CB_PROCESSORS_MAP[RepetitionPenaltyLogitsProcessor] = History


def sample_by_inverse_cdf() -> None:
    """Draws each row's token from its cumulative distribution with one uniform number. The engine's
    `torch.multinomial` took 16 ms per step for 16 rows of SmolLM2's 49k-token vocabulary on this CPU
    (inverse CDF: 0.4 ms), a sixth of a decode step at 16 streams; the distribution is the same."""
    import torch
    from transformers.generation.continuous_batching.model_runner import ModelRunner

    library_sample, library_step = ModelRunner._sample, ModelRunner._forward_process_and_sample
    if getattr(library_sample, "inverse_cdf", False):
        return

    def sample(runner: Any, scores: torch.Tensor, output_ids: torch.Tensor) -> None:
        if runner.return_logprobs:
            library_sample(runner, scores, output_ids)
            return
        if not runner.do_sample or not runner.logit_processor.do_processing:  # all greedy: see GreedyBatches
            tokens = scores[0].argmax(dim=-1)
        else:
            cdf = scores[0].softmax(dim=-1).cumsum(dim=-1)  # [rows, vocab]
            draws = torch.rand(cdf.size(0), 1, device=cdf.device) * cdf[:, -1:]
            # "right": the first token whose cumulative probability exceeds the draw, never one of
            # probability 0
            tokens = torch.searchsorted(cdf, draws, side="right").clamp_(max=cdf.size(-1) - 1).squeeze(-1)
            # A row with no finite distribution (NaN logits) takes its argmax rather than a made-up draw.
            broken = ~(cdf[:, -1] > 0)
            if broken.any():
                tokens = torch.where(broken, scores[0].nan_to_num(nan=float("-inf")).argmax(dim=-1), tokens)
        output_ids[0, : tokens.size(0)].copy_(tokens)

    def step(runner: Any, *args: Any) -> None:
        """Reads GreedyBatches' wish once, in the engine's thread, so that processing and sampling in one
        step agree: a flip from the event loop between the two would sample unprocessed greedy rows."""
        processors = runner.logit_processor
        processors.do_processing = getattr(processors, "wanted", processors.do_processing)
        library_step(runner, *args)

    sample.inverse_cdf = True  # type: ignore[attr-defined]
    ModelRunner._sample, ModelRunner._forward_process_and_sample = sample, step


SDPA_GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers at every attention call


def attention_on_kv_heads() -> None:
    """Lets SDPA read SmolLM2's 3 key/value heads directly (`enable_gqa`) instead of copying them out to
    its 9 query heads first, which transformers does whenever there is a mask, as there always is in a
    continuous batch. On this CPU the results are bit-identical, the attention 1.7-2.3x faster at 16
    packed queries (1.6k-3.2k cached tokens), and the engine at 16 greedy streams 3-7% faster in bf16,
    7-9% in fp32 (loadtests/bench_engine.py). CPU only: transformers notes that CUDA kernels fall back to
    plain math with a mask. This is the switch transformers offers for it; an explicit setting of the
    variable is left alone."""
    os.environ.setdefault(SDPA_GQA_SWITCH, "1")


class GreedyBatches:
    """Turns the engine's logits processing off while no running request samples (or asks for logprobs
    or penalties), so that an all-greedy
    batch is decoded with a plain argmax, as vLLM's sampler does for its all-greedy batches. The
    per-request temperature and top-p, and sampling every row, cost fnserve about 4% of its tokens/s
    at 16 greedy streams against the same engine built greedy-only (the engine alone, bf16). Only where
    nothing is captured: a CUDA graph would replay whichever path it captured."""

    def __init__(self, processors: Any, enabled: bool) -> None:
        self._processors, self._enabled = processors, enabled
        self._sampling = 0
        self._update()

    @contextmanager
    def request(self, processed: bool) -> Iterator[None]:
        """Around a request's whole life in the engine; processing is on before it is added."""
        self._sampling += processed
        self._update()
        try:
            yield
        finally:
            self._sampling -= processed
            self._update()

    def _update(self) -> None:
        """Taken up by the engine thread at its next step (see `sample_by_inverse_cdf`)."""
        self._processors.wanted = self._sampling > 0 or not self._enabled


def logprobs_of(tokens: list[int], steps: deque[Any]) -> list[TokenLogprob]:
    """The chosen tokens' entries from what the History processor recorded, one step per token."""
    if len(steps) < len(tokens):
        raise EngineError("the engine produced tokens without their logprobs")
    entries = []
    for token in tokens:
        logprobs, top = steps.popleft()
        entries.append(TokenLogprob(token, float(logprobs[token]), top))
    return entries


class TransformersEngine:
    def __init__(
        self,
        model: Any,
        eos_token_id: int,
        pad_token_id: int | None,
        cache_blocks: int,
        speculation: Drafting | None = None,
    ) -> None:
        """`speculation`: draft n-grams (services/functions/speculation.py) where its step cost says
        they pay."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        top_p_only_where_asked()
        top_k_only_where_asked()
        history_processing()
        sample_by_inverse_cdf()
        if model.device.type == "cpu":
            attention_on_kv_heads()

        # Temperature, top-p, top-k and a repetition penalty set here make transformers build their
        # processors; every request then sets its own values (per-request processors).
        generation = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_p=0.5,
            top_k=50,
            repetition_penalty=1.5,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        # Sized explicitly: the default sizing targets GPU memory and reserved ~10 GiB of RAM on CPU.
        batching = ContinuousBatchingConfig(
            num_blocks=cache_blocks, page_size=64, max_batch_tokens=512, per_request_processors=True
        )
        self._manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        processors = self._manager.logit_processor
        first = processors.logits_processor[0]
        if type(first).__name__ != "History":  # logprobs must see the raw logits
            raise RuntimeError(f"the engine's first logits processor is {type(first).__name__}, not History")
        self._history: Any = first
        self._greedy = GreedyBatches(processors, enabled=model.device.type == "cpu")
        drafting = speculation or Drafting(StepCost.free())  # never asked to draft: not installed
        self._speculator = Speculator(drafting.cost, set(first.supported_kwargs), stats=drafting.stats)
        self._drafting = speculation
        if speculation is not None:
            install_speculation()
            self._manager.fn_speculator = self._speculator
        self._manager.start()
        self._ids = itertools.count()

    async def stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Step]:
        request_id = f"req-{next(self._ids)}"
        results: asyncio.Queue[Any] = asyncio.Queue()
        sent = 0
        finished = False
        extras: dict[str, Any] = {}
        if sampling.penalised:  # as History's kwargs, typed as it checks them
            extras = {name: type(default)(getattr(sampling, name)) for name, default in PENALTIES.items()}
        steps: deque[Any] | None = None
        if sampling.logprobs is not None:
            extras["logprobs"] = sampling.logprobs
            steps = self._history.sink[request_id] = deque()
        if not sampling.speculate:
            self._speculator.opted_out.add(request_id)
        with self._greedy.request(sampling.processed):
            try:
                # Registered before the request is added, so that no result can arrive unheard.
                self._manager.register_result_handler(request_id, results.put_nowait)
                added = self._manager.add_request(
                    prompt_ids,
                    request_id=request_id,
                    max_new_tokens=sampling.max_new_tokens,
                    streaming=True,
                    temperature=max(sampling.temperature, GREEDY_TEMPERATURE),
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    eos_token_id=-1 if sampling.ignore_eos else None,  # -1: the engine's "no end token"
                    **extras,
                )
                if added is None:  # the manager refuses work once its loop has stopped or failed
                    raise EngineError("the generation engine is not running")
                while not finished:
                    output = await results.get()
                    if output.error:
                        raise EngineError(output.error)
                    finished = output.is_finished()
                    tokens = list(output.generated_tokens)
                    if len(tokens) > sent or finished:
                        new = tokens[sent:]
                        yield Step(new, finished, None if steps is None else logprobs_of(new, steps))
                        sent = len(tokens)
            finally:
                self._history.sink.pop(request_id, None)
                self._speculator.forget(request_id)
                if not finished:
                    self._manager.cancel_request(request_id)
                    # The manager drops a handler only when its request finishes; a cancelled one would stay.
                    with self._manager.output_router._lock:
                        self._manager.output_router.result_handlers.pop(request_id, None)
                self._drop_orphans()

    def _drop_orphans(self) -> None:
        """Outputs of requests whose handler is gone (a step already running when they were cancelled)
        land in the manager's shared queue, which this engine never reads: drop them."""
        orphans = self._manager.output_router.output_queue
        while not orphans.empty():
            orphans.get_nowait()

    def stats(self) -> EngineStats:
        processor = self._manager.batch_processor
        speculation = self._drafting.as_dict() if self._drafting else self._speculator.stats.as_dict()
        if processor is None:
            return EngineStats(running=0, waiting=0, free_cache=1.0, speculation=speculation)
        return EngineStats(
            running=len(processor.scheduler.active_requests),
            waiting=len(processor.scheduler.waiting_requests),
            free_cache=float(processor.cache.compute_free_capacity(relative=True)),
            speculation=speculation,
        )

    @property
    def running(self) -> bool:
        return self._manager.is_running()

    def shutdown(self) -> bool:
        self._manager.stop(block=True, timeout=10)
        return not self._manager.is_running()
