"""Speculative decoding inside the continuous batch: n-gram (prompt lookup) drafts, verified in one pass.

Each step, a running request may feed `[last, d1..dk]` instead of `[last]`, where `d1..dk` follow the
latest earlier occurrence of its last n tokens in its prompt and answer. The engine keeps the logits at
every one of those places and samples each one as usual (greedy, or the request's own sampling); the
drafts are accepted while they equal what was sampled, and the first sample that differs is kept too.
For greedy requests that is the same answer; for sampled ones it is the point-mass rejection rule, since
a sample equal to the draft is accepted with exactly the draft's probability and a different one is
drawn from the rest of the distribution, so the output distribution is unchanged. The cache positions
of rejected drafts are given back (the request's length rolls back) and overwritten by the next step;
only blocks of accepted tokens are hashed for prefix sharing.

The policy: drafts are worth it while a step is cheap, so the drafts of a step share a token budget,
measured for the device at start-up (`measure_step_budget`), that the running requests themselves use
up (at 16 streams on a 2-core CPU, drafting stops); a request
whose drafts keep failing drafts less, then pauses. Requests with logprobs or penalties (whose
processing reads the answer token by token) and requests that opt out never draft.

transformers 5.24's continuous batching keeps one logit per request and appends one token per step; the
patches below (`install`) widen that for drafted requests only and leave every other step as it was.
They are tested against the library by tests/test_speculation.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_NGRAM, MIN_NGRAM = 3, 1
MAX_DRAFT = 8  # draft tokens per request and step
STEP_COST = 1.35  # a step may hold as many tokens as cost at most this much more than one (measured)
PAUSE_STEPS = 16  # steps a request waits to draft again after three drafts in a row failed
MIN_FREE_CACHE = 0.3  # drafting never competes with requests for the last blocks of the cache


def propose(tokens: list[int], k: int, max_n: int = MAX_NGRAM, min_n: int = MIN_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the last n tokens (n from max_n
    down to min_n), or none."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = tokens[length - n :]
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []


@dataclass
class Record:
    """A request's recent drafting, for its next draft's length."""

    k: int = 4
    failures: int = 0
    paused_until: int = 0


@dataclass
class SpeculationStats:
    steps: int = 0
    speculating_steps: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0  # tokens produced by drafted requests (accepted drafts and one sample each)

    def as_dict(self) -> dict[str, float]:
        rate = self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
        per_draft = self.emitted_tokens / self.drafts if self.drafts else 0.0
        share = self.speculating_steps / self.steps if self.steps else 0.0
        return {
            "speculation_steps": self.steps,
            "speculation_share_of_steps": share,
            "speculation_drafts": self.drafts,
            "speculation_draft_tokens": self.draft_tokens,
            "speculation_accepted_tokens": self.accepted_tokens,
            "speculation_acceptance_rate": rate,
            "speculation_tokens_per_drafted_step": per_draft,
        }


@dataclass
class Planned:
    state: Any
    drafts: list[int]
    prior_length: int  # the request's cached length before this step


@dataclass
class Drafting:
    """What an engine drafts with: the most tokens a step may hold (decided for the device) and the stats
    it counts into (kept across engine restarts)."""

    step_budget: int
    stats: SpeculationStats = field(default_factory=SpeculationStats)


def measure_step_budget(model: Any, context: int = 256) -> tuple[int, str]:
    """The most tokens one forward pass may take (after `context` cached ones) while it costs at most
    STEP_COST times a 2-token pass: where a step's cost is near flat, drafts are nearly free. The base is
    2 tokens because a continuous batch attends under a mask at every step, and 2 is the smallest pass
    that does (one token alone takes a maskless path). Best of three each, after a warm-up. On a 2-core
    Zen 4 in bf16: 41 ms for 2 tokens, 54 for 16, 67 for 32."""
    import time

    import torch

    def best(tokens: int, cache: Any) -> float:
        ids = torch.arange(2000, 2000 + tokens, device=model.device).unsqueeze(0)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            model(ids, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - start)
            cache.crop(-tokens)
        return min(times[1:])

    with torch.no_grad():
        cache = model(torch.arange(1000, 1000 + context, device=model.device).unsqueeze(0)).past_key_values
        base = best(2, cache)
        budget, cost = 2, 1.0
        for tokens in (4, 8, 12, 16, 24, 32):
            ratio = best(tokens, cache) / base
            if ratio > STEP_COST:
                break
            budget, cost = tokens, ratio
    return budget, f"a {budget}-token step cost {cost:.2f}x a 2-token step ({base * 1000:.0f} ms) here"


@dataclass
class Speculator:
    """Chooses each step's drafts and settles them; runs on the engine's thread only."""

    step_budget: int
    history_kwargs: set[str] = field(default_factory=set)  # processing that reads the answer per token
    opted_out: set[str] = field(default_factory=set)  # request ids; written by the event loop
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    _records: dict[str, Record] = field(default_factory=dict)
    _planned: dict[str, Planned] = field(default_factory=dict)

    def draft(self, scheduler: Any, free_cache: float) -> None:
        """Sets the drafts of this step's requests (their tokens to process), within the step budget."""
        self._planned = {}
        active = scheduler.active_requests
        decoding = [s for s in active.values() if s.status.name == "DECODING" and s.generated_tokens]
        budget = self.step_budget - len(active) - len(scheduler.waiting_requests)
        if budget <= 0 or free_cache < MIN_FREE_CACHE:
            return
        candidates = [
            state
            for state in decoding
            if state.request_id not in self.opted_out
            and not state.logit_processor_kwargs.keys() & self.history_kwargs
            and self._record(state).paused_until <= self.stats.steps
        ]
        for state in candidates:
            record = self._record(state)
            room = state._new_tokens_limit - state.generated_len() - 1  # the sample after the drafts
            k = min(record.k, MAX_DRAFT, budget, room)
            if k <= 0:
                continue
            last = state.tokens_to_process[-1] if len(state.tokens_to_process) == 1 else None
            if last is None or last < 0:
                continue
            drafts = propose(state.initial_tokens + state.generated_tokens, k)
            if not drafts:
                continue
            state.tokens_to_process = [last, *drafts]
            self._planned[state.request_id] = Planned(state, drafts, state.position_offset)
            budget -= len(drafts)

    def _record(self, state: Any) -> Record:
        return self._records.setdefault(state.request_id, Record())

    def scheduled(self, scheduled: list[Any]) -> None:
        """Counts the step (if there is one); a drafted request the scheduler left out of it goes back to
        its one token."""
        self.stats.steps += bool(scheduled)
        ids = {future.state.request_id for future in scheduled}
        for request_id in [r for r in self._planned if r not in ids]:
            planned = self._planned.pop(request_id)
            planned.state.tokens_to_process = planned.state.tokens_to_process[:1]
        for future in scheduled:
            planned = self._planned.get(future.state.request_id)
            if planned and (not future.has_new_token or future.query_length != 1 + len(planned.drafts)):
                raise RuntimeError(f"a drafted request was split by the scheduler: {future.state.request_id}")
        self.stats.speculating_steps += bool(self._planned)

    def rows(self, requests_in_batch: list[Any]) -> tuple[list[int], list[int], dict[str, int]]:
        """This step's logits rows: the position of each, the library's row it takes its processing
        arguments from, and each request's first row."""
        positions: list[int] = []
        sources: list[int] = []
        first_rows: dict[str, int] = {}
        end = 0
        for future in requests_in_batch:
            end += future.query_length
            if not future.has_new_token:
                continue
            planned = self._planned.get(future.state.request_id)
            width = 1 + len(planned.drafts) if planned else 1
            first_rows[future.state.request_id] = len(positions)
            sources.extend([len(first_rows) - 1] * width)  # the library's row of this request
            positions.extend(range(end - width, end))
        return positions, sources, first_rows

    def settle(self, future: Any, samples: list[int]) -> tuple[list[int], int]:
        """For a drafted request, from the samples of its rows: the tokens it keeps, and the number of
        cached places that hold them (its last token and the accepted drafts)."""
        planned = self._planned[future.state.request_id]
        accepted = 0
        while accepted < len(planned.drafts) and samples[accepted] == planned.drafts[accepted]:
            accepted += 1
        self._learn(future.state.request_id, len(planned.drafts), accepted)
        return samples[: accepted + 1], 1 + accepted

    def _learn(self, request_id: str, drafted: int, accepted: int) -> None:
        record = self._records.setdefault(request_id, Record())
        self.stats.drafts += 1
        self.stats.draft_tokens += drafted
        self.stats.accepted_tokens += accepted
        self.stats.emitted_tokens += accepted + 1
        if accepted == drafted:
            record.k, record.failures = min(record.k * 2, MAX_DRAFT), 0
        elif accepted == 0:
            record.k, record.failures = max(record.k // 2, 1), record.failures + 1
            if record.failures >= 3:
                record.paused_until, record.failures = self.stats.steps + PAUSE_STEPS, 0
        else:
            record.k, record.failures = max(accepted + 1, 1), 0

    def forget(self, request_id: str) -> None:
        self._records.pop(request_id, None)
        self.opted_out.discard(request_id)

    @property
    def planned(self) -> dict[str, Planned]:
        return self._planned


def install() -> None:
    """Widens transformers 5.24's continuous batching for drafted requests (once per process). A batch
    processor takes part when its manager has a `_fn_speculator`; steps without drafts run the library's
    own code unchanged. The engine must be synchronous (no async batching, no CUDA graphs): the CPU
    engine here."""
    import torch
    from transformers.generation.continuous_batching import continuous_api as api
    from transformers.generation.continuous_batching import input_outputs as ios

    processor_class, io_class = api.ContinuousBatchProcessor, ios.ContinuousBatchingIOs
    if getattr(processor_class, "fn_speculation", False):
        return
    library_create = api.ContinuousBatchingManager._create_batch_processor
    library_prepare, library_update = processor_class.prepare_next_batch, processor_class.update_batch
    library_kwargs, library_outputs = io_class.get_model_kwargs, io_class.prepare_batch_update

    def create(manager: Any) -> Any:
        processor = library_create(manager)
        processor.fn_speculator = getattr(manager, "fn_speculator", None)
        return processor

    def prepare_next_batch(self: Any) -> bool:
        speculator: Speculator | None = getattr(self, "fn_speculator", None)
        io = self.inputs_and_outputs
        io.fn_rows = None
        if speculator is None:
            return library_prepare(self)
        free = float(self.cache.compute_free_capacity(relative=True))
        speculator.draft(self.scheduler, free)
        ready = library_prepare(self)
        speculator.scheduled(io.requests_in_batch if ready else [])
        if ready and speculator.planned:
            positions, sources, first_rows = speculator.rows(io.requests_in_batch)
            device = io.logits_indices.device
            io.fn_rows = (
                torch.tensor(positions, dtype=io.logits_indices.dtype, device=device),
                torch.tensor(sources, dtype=torch.long, device=device),
                first_rows,
            )
            for processor in self.logit_processor.logits_processor:
                if hasattr(processor, "move_rows"):  # rows it noted while the library prepared them
                    processor.move_rows(first_rows)
        return ready

    def get_model_kwargs(self: Any, use_padding: bool = False) -> Any:
        kwargs = library_kwargs(self, use_padding)
        if (rows := getattr(self, "fn_rows", None)) is not None:
            positions, sources, _ = rows
            kwargs["logits_indices"] = positions
            arguments = self._bulk_input_tensor[self.static_inputs :]
            kwargs["logits_processor_args"] = arguments.index_select(1, sources)
        return kwargs

    def prepare_batch_update(self: Any) -> Any:
        return getattr(self, "fn_update", None) or library_outputs(self)

    def update_batch(self: Any) -> None:
        """Settles the drafted requests here, as the library's update would settle one token at a time,
        then lets the library update the others with their one token each."""
        speculator: Speculator | None = getattr(self, "fn_speculator", None)
        io = self.inputs_and_outputs
        if speculator is None or io.fn_rows is None:
            return library_update(self)
        positions, _, first_rows = io.fn_rows
        samples = io.output_ids[0, : positions.numel()].tolist()
        others, their_tokens, outputs = [], [], []
        for future in io.requests_in_batch:
            state = future.state
            planned = speculator.planned.get(state.request_id)
            if planned is None:
                others.append(future)
                if future.has_new_token:
                    their_tokens.append(samples[first_rows[state.request_id]])
                continue
            if state.status.name != "DECODING":  # cancelled or finished meanwhile: nothing to settle
                continue
            first = first_rows[state.request_id]
            kept, cached = speculator.settle(future, samples[first : first + 1 + len(planned.drafts)])
            state.position_offset = planned.prior_length  # rejected drafts' places are given back
            complete_blocks = self.cache.count_new_complete_blocks(state, cached)
            state.position_offset += cached
            finished = False
            for token in kept:
                if finished := state.update_and_check_completion(token, None):
                    break
            self.cache.mark_complete_blocks(state, complete_blocks)
            if finished:
                self.scheduler.finish_request(state.request_id)
                self.scheduler.block_new_requests = False
            if state.streaming or finished:
                outputs.append(state.to_generation_output())
        if outputs:
            self.output_router.deliver_batch(outputs)
        io.fn_update = (others, their_tokens, None)
        try:
            library_update(self)
        finally:
            io.fn_update = None

    api.ContinuousBatchingManager._create_batch_processor = create
    processor_class.prepare_next_batch, processor_class.update_batch = prepare_next_batch, update_batch
    io_class.get_model_kwargs, io_class.prepare_batch_update = get_model_kwargs, prepare_batch_update
    processor_class.fn_speculation = True
