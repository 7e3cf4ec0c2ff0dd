"""Iteration-level continuous batching behind a small interface.

`Engine` is what the generation service needs from a batching engine; `TransformersEngine` implements it
with transformers' ContinuousBatchingManager (new requests join the running batch between decode steps,
finished and cancelled ones leave it). A GPU engine such as vLLM can implement the same three methods.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol


class EngineError(RuntimeError):
    """The engine failed a request (the request only: the engine keeps serving others)."""


@dataclass(frozen=True)
class Step:
    """Tokens a request produced since its previous step; `finished` marks its last step."""

    token_ids: list[int]
    finished: bool


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = every token
    ignore_eos: bool = False


# In a batch where any request samples, the engine samples every row (do_sample is one setting for the
# whole batch); a request asking for greedy decoding gets this temperature, which makes its softmax
# one-hot on the argmax unless two logits lie within about 1e-4 of each other.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    free_cache: float  # share of the KV cache free, 0..1


class Engine(Protocol):
    def stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Step]:
        """Tokens for one request as they are produced. Closing the iterator early cancels the request
        in the engine, which frees its cache at the next step."""
        ...

    def stats(self) -> EngineStats: ...

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
    """Turns the engine's logits processing off while no running request samples, so that an all-greedy
    batch is decoded with a plain argmax, as vLLM's sampler does for its all-greedy batches. The
    per-request temperature and top-p, and sampling every row, cost fnserve about 4% of its tokens/s
    at 16 greedy streams against the same engine built greedy-only (the engine alone, bf16). Only where
    nothing is captured: a CUDA graph would replay whichever path it captured."""

    def __init__(self, processors: Any, enabled: bool) -> None:
        self._processors, self._enabled = processors, enabled
        self._sampling = 0
        self._update()

    @contextmanager
    def request(self, samples: bool) -> Iterator[None]:
        """Around a request's whole life in the engine; processing is on before it is added."""
        self._sampling += samples
        self._update()
        try:
            yield
        finally:
            self._sampling -= samples
            self._update()

    def _update(self) -> None:
        """Taken up by the engine thread at its next step (see `sample_by_inverse_cdf`)."""
        self._processors.wanted = self._sampling > 0 or not self._enabled


class TransformersEngine:
    def __init__(self, model: Any, eos_token_id: int, pad_token_id: int | None, cache_blocks: int) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        top_p_only_where_asked()
        top_k_only_where_asked()
        sample_by_inverse_cdf()
        if model.device.type == "cpu":
            attention_on_kv_heads()

        # Temperature, top-p and top-k set here make transformers build their warpers; every request
        # then sets its own values (per-request processors).
        generation = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_p=0.5,
            top_k=50,
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
        self._greedy = GreedyBatches(self._manager.logit_processor, enabled=model.device.type == "cpu")
        self._manager.start()
        self._ids = itertools.count()

    async def stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Step]:
        request_id = f"req-{next(self._ids)}"
        results: asyncio.Queue[Any] = asyncio.Queue()
        sent = 0
        finished = False
        with self._greedy.request(sampling.temperature > 0):
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
                        yield Step(tokens[sent:], finished)
                        sent = len(tokens)
            finally:
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
        if processor is None:
            return EngineStats(running=0, waiting=0, free_cache=1.0)
        return EngineStats(
            running=len(processor.scheduler.active_requests),
            waiting=len(processor.scheduler.waiting_requests),
            free_cache=float(processor.cache.compute_free_capacity(relative=True)),
        )

    def shutdown(self) -> bool:
        self._manager.stop(block=True, timeout=10)
        return not self._manager.is_running()
