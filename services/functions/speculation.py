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

The policy: a step's drafts are chosen for the step's expected tokens per second. The engine fits its
own step time as a function of the tokens it processes and the cached tokens they attend to (`StepCost`,
least squares over its recent decode steps, from a start-up measurement), and each request's chance that
a draft token is accepted (`Record`, from its recent drafts). Draft tokens are taken likeliest first
while each one's chance is worth more than the time it adds at the step's current tokens per second: a
cheap step with good drafts takes many, a full step whose next token costs as much as a request's share
takes none. No step that prefills a prompt drafts (a new request's first token waits for no draft).
Requests with logprobs or penalties (whose processing reads the answer token by token) and requests that
opt out never draft.

transformers 5.24's continuous batching keeps one logit per request and appends one token per step; the
patches below (`install`) widen that for drafted requests only and leave every other step as it was.
They are tested against the library by tests/test_speculation.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_NGRAM, MIN_NGRAM = 3, 1
MAX_DRAFT = 16  # draft tokens per request and step
MIN_FREE_CACHE = 0.3  # drafting never competes with requests for the last blocks of the cache
MAX_ACCEPTANCE = 0.95  # no request's drafts are taken as certain
CONTEXTS = (1024, 256)  # cached tokens of the start-up passes, longest first: one prefill, then cropped
MEMORY = 0.8  # weight of a request's earlier draft outcomes against its latest one
POOL_MEMORY = 0.98  # the same for all requests' outcomes, a new request's prior


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
    """Recent draft outcomes (of a request, or of all): each accepted draft token counts as a success,
    and each rejection that ended a draft as a failure; every outcome weighs `memory` times the next
    one. Their ratio is the chance that the next draft token is accepted, given the one before it was
    (the maximum-likelihood rate of a geometric run). The weight is per outcome, not per draft: weighed
    per draft, one long accepted run outweighed the five rejections after it, and at 32 open-ended
    streams requests whose copying had ended went on drafting at an acceptance of 0.17. A request's
    counts start from two outcomes at the rate of all requests' recent ones."""

    accepted: float = 1.0
    rejected: float = 1.0
    memory: float = MEMORY

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    @property
    def acceptance(self) -> float:
        return min(self.rate, MAX_ACCEPTANCE)

    def learn(self, drafted: int, accepted: int) -> None:
        for kept in [True] * accepted + [False] * (accepted < drafted):
            self.accepted = self.memory * self.accepted + kept
            self.rejected = self.memory * self.rejected + (not kept)


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


class StepCost:
    """A decode step's seconds for n tokens to process over kv cached ones, as a + b·n + c·kv + d·n·kv
    (kv in thousands): the fixed cost of a step (scheduling, sampling, the weights' pass), each token's
    own, reading the cache, and each token's attention over it. Least squares over the engine's recent
    decode steps (each weighs FORGET times the next one), held near a start-up prior that weighs as much
    as PRIOR_STEPS steps; a coefficient that fits below zero is left out. The engine's own steps carry
    what a bare forward pass does not (on a 2-core Zen 4 in bf16, a 4-request step took 85 ms against 40
    for the pass alone), so they, not the prior, decide once they come."""

    FORGET = 0.995
    PRIOR_STEPS = 4
    RIDGE = 1e-9  # keeps the fit solvable whatever the steps seen

    def __init__(self, prior: list[tuple[int, int, float]], learn: bool = True) -> None:
        import numpy as np

        self._np, self.learn = np, learn
        self._prior_gram, self._prior_moment = np.zeros((4, 4)), np.zeros(4)
        for n, kv, seconds in prior:
            x = self._features(n, kv)
            self._prior_gram += self.PRIOR_STEPS / len(prior) * np.outer(x, x)
            self._prior_moment += self.PRIOR_STEPS / len(prior) * seconds * x
        self._gram, self._moment = np.zeros((4, 4)), np.zeros(4)
        self.steps = 0
        self._fit()

    @classmethod
    def free(cls) -> StepCost:
        """Draft tokens that cost nothing, whatever the steps take: drafting at every step it can (for
        tests of the drafting itself, not of the policy)."""
        return cls([(2, 256, 0.05), (64, 256, 0.05), (2, 4096, 0.05), (64, 4096, 0.05)], learn=False)

    def _features(self, n: int, kv: int) -> Any:
        return self._np.array([1.0, n, kv / 1000, n * kv / 1000])

    def observe(self, n: int, kv: int, seconds: float) -> None:
        if not self.learn:
            return
        x = self._features(n, kv)
        self._gram = self.FORGET * self._gram + self._np.outer(x, x)
        self._moment = self.FORGET * self._moment + seconds * x
        self.steps += 1
        self._fit()

    def _fit(self) -> None:
        gram = self._prior_gram + self._gram + self.RIDGE * self._np.eye(4)
        moment = self._prior_moment + self._moment
        kept = [0, 1, 2, 3]
        while True:
            coefficients = self._np.zeros(4)
            coefficients[kept] = self._np.linalg.solve(gram[self._np.ix_(kept, kept)], moment[kept])
            negative = [i for i in kept if coefficients[i] < 0]
            if not negative:
                break
            kept.remove(negative[0])
        self.coefficients = coefficients

    def seconds(self, n: int, kv: int) -> float:
        return float(self.coefficients @ self._features(n, kv))

    def summary(self) -> str:
        a, b, c, d = (float(v) * 1000 for v in self.coefficients)
        return f"{a:.1f} ms + {b:.2f} ms/token + {c:.2f} ms/1k cached + {d:.3f} ms/token/1k cached"

    def as_dict(self) -> dict[str, float]:
        a, b, c, d = (float(v) * 1000 for v in self.coefficients)
        return {
            "speculation_cost_steps": self.steps,
            "speculation_cost_fixed_ms": a,
            "speculation_cost_per_token_ms": b,
            "speculation_cost_per_kcached_ms": c,
            "speculation_cost_per_token_kcached_ms": d,
        }


def measure_step_cost(model: Any) -> tuple[list[tuple[int, int, float]], str]:
    """The prior of a StepCost: forward passes of 2 to 32 tokens over 1024 and 256 cached ones, best of
    two each after a warm-up (2 is the smallest pass a continuous batch makes under its mask; one token
    alone takes a maskless path). One prefill serves both contexts (cropped for the shorter), since the
    prefill is most of the measurement and it delays every start-up; the prior weighs only PRIOR_STEPS
    steps, so the engine's own steps soon carry the long contexts it was not measured at."""
    import time

    import torch

    points: list[tuple[int, int, float]] = []
    with torch.no_grad():
        prompt = torch.arange(1000, 1000 + CONTEXTS[0], device=model.device).unsqueeze(0)
        cache = model(prompt).past_key_values
        for context in CONTEXTS:
            if cache.get_seq_length() > context:
                cache.crop(context - cache.get_seq_length())  # the library crops by a negative count only
            for tokens in (2, 8, 32):
                ids = torch.arange(2000, 2000 + tokens, device=model.device).unsqueeze(0)
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    model(ids, past_key_values=cache, use_cache=True)
                    times.append(time.perf_counter() - start)
                    cache.crop(-tokens)
                points.append((tokens, context, min(times[1:])))
    shown = ", ".join(f"{n} over {kv}: {seconds * 1000:.0f} ms" for n, kv, seconds in points)
    return points, f"forward passes here ({shown}); the engine's own steps refine it"


@dataclass
class Drafting:
    """What an engine drafts with: its step cost (measured for the device, refined by its steps) and the
    stats it counts into, both kept across engine restarts."""

    cost: StepCost
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def as_dict(self) -> dict[str, float]:
        return {**self.stats.as_dict(), **self.cost.as_dict()}


@dataclass
class Speculator:
    """Chooses each step's drafts and settles them; runs on the engine's thread only."""

    cost: StepCost
    history_kwargs: set[str] = field(default_factory=set)  # processing that reads the answer per token
    opted_out: set[str] = field(default_factory=set)  # request ids; written by the event loop
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    _records: dict[str, Record] = field(default_factory=dict)
    _pool: Record = field(default_factory=lambda: Record(memory=POOL_MEMORY))
    _planned: dict[str, Planned] = field(default_factory=dict)

    def draft(self, scheduler: Any, free_cache: float, max_tokens: int) -> None:
        """Sets the drafts of this step's requests (their tokens to process): draft tokens likeliest
        first, while a token's chance of acceptance is worth the time it adds to the step at the
        step's expected tokens per second; at most `max_tokens` in the step."""
        self._planned = {}
        active = list(scheduler.active_requests.values())
        if scheduler.waiting_requests or free_cache < MIN_FREE_CACHE:
            return
        if any(s.status.name != "DECODING" or len(s.tokens_to_process) != 1 for s in active):
            return  # a prompt is being prefilled
        tokens, cached = len(active), sum(s.position_offset + 1 for s in active)
        expected, seconds = float(tokens), self.cost.seconds(tokens, cached)
        if not tokens or seconds <= 0:  # nothing to draft for, or a fit that cannot price a step
            return
        # The least chance a first draft token needs: a request below it is not even looked up.
        least = expected * (self.cost.seconds(tokens + 1, cached + 1) - seconds) / seconds
        offers: list[tuple[float, int, Any, list[int]]] = []  # (chance, place, request, drafts)
        for state in active:
            if (
                not state.generated_tokens
                or state.request_id in self.opted_out
                or state.logit_processor_kwargs.keys() & self.history_kwargs
                or state.tokens_to_process[-1] < 0
                or (acceptance := self._record(state.request_id).acceptance) < least
            ):
                continue
            room = state._new_tokens_limit - state.generated_len() - 1  # the sample after the drafts
            drafts = propose(state.initial_tokens + state.generated_tokens, min(MAX_DRAFT, room))
            offers.extend((acceptance**place, place, state, drafts) for place in range(1, len(drafts) + 1))
        taken: dict[str, tuple[Any, list[int], int]] = {}
        for chance, place, state, drafts in sorted(offers, key=lambda offer: -offer[0]):
            more = self.cost.seconds(tokens + 1, cached + 1)
            if tokens >= max_tokens or chance * seconds < expected * (more - seconds):
                break  # (expected + chance) / more < expected / seconds
            taken[state.request_id] = (state, drafts, place)
            tokens, cached, expected, seconds = tokens + 1, cached + 1, expected + chance, more
        for request_id, (state, drafts, count) in taken.items():
            state.tokens_to_process = [state.tokens_to_process[-1], *drafts[:count]]
            self._planned[request_id] = Planned(state, drafts[:count], state.position_offset)

    def _record(self, request_id: str) -> Record:
        if (record := self._records.get(request_id)) is None:
            rate = self._pool.rate
            record = self._records[request_id] = Record(2 * rate, 2 * (1 - rate))
        return record

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

    @staticmethod
    def decode_step(requests_in_batch: list[Any], started: float) -> tuple[int, int, float] | None:
        """A step that only decodes (a drafted request's query is its last token and its drafts): its
        tokens, the cached tokens they attend to and when it began, for the step cost; None for a
        step that prefills, whose cost is another kind."""
        if not all(f.has_new_token and f.state.status.name == "DECODING" for f in requests_in_batch):
            return None
        tokens = sum(future.query_length for future in requests_in_batch)
        cached = sum(future.state.position_offset for future in requests_in_batch)  # this step included
        return tokens, cached, started

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
        if record := self._records.get(request_id):  # none once the request is forgotten
            record.learn(drafted, accepted)
        self._pool.learn(drafted, accepted)
        self.stats.drafts += 1
        self.stats.draft_tokens += drafted
        self.stats.accepted_tokens += accepted
        self.stats.emitted_tokens += accepted + 1

    def forget(self, request_id: str) -> None:
        self._records.pop(request_id, None)
        self.opted_out.discard(request_id)

    def keep_held(self, scheduler: Any) -> None:
        """Drops the records of requests the engine no longer holds. A stream that ends early forgets
        its request before the engine drops it, and a draft in between made its record again: one left
        behind for every request cut short (a stop string, a client gone, a deadline)."""
        held = scheduler.active_requests.keys() | scheduler.waiting_requests.keys()
        for request_id in self._records.keys() - held:
            # pop, not del: `forget`, on the event loop's thread, may have taken it meanwhile, and a
            # KeyError here would end the engine's loop
            self._records.pop(request_id, None)

    @property
    def planned(self) -> dict[str, Planned]:
        return self._planned


def reclaimable_share(cache: Any) -> float:
    """The share of the cache that requests could take: its free blocks and its cached ones (complete
    blocks kept for prefix sharing, which the library evicts when it needs room; its own free capacity
    counts them as used, so a server that has answered many prompts would look full)."""
    cached = sum(len(a.ledger.cached_blocks) * a.bytes_per_block for a in cache.cache_allocators.values())
    total = cache.num_sectors * cache.bytes_per_sector
    return float(cache.compute_free_capacity(relative=False) + cached) / total


def install() -> None:
    """Widens transformers 5.24's continuous batching for drafted requests (once per process). A batch
    processor takes part when its manager has a `_fn_speculator`; steps without drafts run the library's
    own code unchanged. The engine must be synchronous (no async batching, no CUDA graphs): the CPU
    engine here."""
    import time

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
        started = time.perf_counter()
        speculator.draft(self.scheduler, reclaimable_share(self.cache), self.max_batch_tokens)
        ready = library_prepare(self)
        speculator.keep_held(self.scheduler)
        speculator.scheduled(io.requests_in_batch if ready else [])
        self.fn_step = speculator.decode_step(io.requests_in_batch, started) if ready else None
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
        """Settles the step, then counts its time into the step cost if it only decoded."""
        speculator: Speculator | None = getattr(self, "fn_speculator", None)
        if speculator is None:
            return library_update(self)
        settle(self, speculator)
        if (step := getattr(self, "fn_step", None)) is not None:
            tokens, cached, started = step
            speculator.cost.observe(tokens, cached, time.perf_counter() - started)

    def settle(self: Any, speculator: Speculator) -> None:
        """Settles the drafted requests here, as the library's update would settle one token at a time,
        then lets the library update the others with their one token each."""
        io = self.inputs_and_outputs
        if io.fn_rows is None:
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
