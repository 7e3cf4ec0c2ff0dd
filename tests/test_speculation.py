"""Speculative decoding inside the continuous batch (services/functions/speculation.py), on the real model:
the engine itself, in this process, in fp32, with drafting on and off; then the served route."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from services.functions.engine import Sampling, TransformersEngine
from services.functions.generation import engine_runs
from services.functions.lifecycle import ModelSlot
from services.functions.speculation import Drafting, Speculator, StepCost, propose, reclaimable_share
from tests.reference import _model
from tests.server import LONG, counter
from tests.test_chat import MODEL, ask

PARAGRAPH = (
    "The lighthouse on the northern cape was built in 1871 from granite quarried on the island itself. "
    "For more than a century its keepers climbed one hundred and twelve steps every evening to light the "
    "lamp, and every morning they climbed them again to clean the lens."
)
GROUNDED = f"Write out this paragraph again, word for word:\n\n{PARAGRAPH}"
OPEN = "Write a story about a dragon who is afraid of the dark."


def test_propose_takes_the_latest_longest_match() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 4, 5, 7, 1, 2]
    assert propose(tokens, 3) == [4, 5, 7]  # "1 2" last seen before 4 5 7 (not before 3 9 1)
    assert propose([5, 6, 7, 8, 6], 2) == [7, 8]  # only a 1-gram matches
    assert propose([1, 2, 3], 4) == [] and propose([7], 2) == []
    assert propose([4, 4, 4, 4], 8) == [4]  # what follows the latest match: only the last token


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[TransformersEngine, TransformersEngine, Any]]:
    """Drafting on and off over the same fp32 weights, and the tokenizer. Drafts cost nothing to this
    engine, so that it drafts wherever it can (what the policy chooses is tested apart)."""
    tokenizer, model = _model()
    free = Drafting(StepCost.free())
    on = TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, 64, free)
    off = TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, 64)
    try:
        yield on, off, tokenizer
    finally:
        on.shutdown()
        off.shutdown()


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


async def answer(engine: TransformersEngine, ids: list[int], sampling: Sampling) -> list[int]:
    tokens: list[int] = []
    async for step in engine.stream(ids, sampling):
        tokens.extend(step.token_ids)
    return tokens


def answers(engine: TransformersEngine, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    async def run() -> list[list[int]]:
        return await asyncio.gather(*(answer(engine, ids, sampling) for ids in prompts))

    return asyncio.run(run())


def drafted(engine: TransformersEngine) -> tuple[float, float]:
    stats = engine.stats().speculation
    return stats["speculation_draft_tokens"], stats["speculation_accepted_tokens"]


@pytest.fixture(scope="module")
def greedy(engines: Any) -> tuple[list[list[int]], list[list[int]]]:
    """The two chat prompts and their 64-token greedy answers without drafting. In one batch: fp32
    greedy text does not depend on the batch (the served engine's sixteen concurrent streams,
    tests/test_chat.py), and one at a time their 128 steps took 9.4 s on the Xeon 6/207, 4.9 s together."""
    _, off, tokenizer = engines
    prompts = [chat_ids(tokenizer, GROUNDED), chat_ids(tokenizer, OPEN)]
    return prompts, answers(off, prompts, Sampling(64))


def test_greedy_fp32_is_token_identical_alone_and_in_a_batch_of_16(engines: Any, greedy: Any) -> None:
    on, _, _ = engines
    prompts, reference = greedy
    before = drafted(on)
    for ids, answer in zip(prompts, reference, strict=True):
        assert answers(on, [ids], Sampling(64)) == [answer]
    alone = drafted(on)
    assert alone[1] > before[1]  # drafts were made and accepted
    # Against the same answers, cut to 32 tokens: the engine without drafting need not run the batch too.
    batch = [prompts[i % 2] for i in range(16)]
    assert answers(on, batch, Sampling(32)) == [reference[i % 2][:32] for i in range(16)]
    assert drafted(on)[1] > alone[1]


def test_max_tokens_is_exact_when_a_draft_runs_past_it(engines: Any, greedy: Any) -> None:
    on, _, _ = engines
    [ids, _], [whole, _] = greedy
    for limit in (3, 9, 17, 33):
        (cut,) = answers(on, [ids], Sampling(limit))
        assert cut == whole[:limit] and len(cut) == limit


def test_sampled_tokens_keep_their_distribution(engines: Any) -> None:
    """Point-mass rejection leaves the output distribution as it was. At each of the first places, the
    tokens sampled with drafting on and off are compared by a chi-square test over the five likeliest
    tokens there and the rest: 21.0 is its 0.1% point at 5 degrees of freedom. A rule that kept every
    draft moves the drafted places far past it: measured on the Zen 3 (AMD EPYC 25/1), its largest was
    43 at 100 samples a side and 88 at 200, against at most 15 for the rule served."""
    on, off, tokenizer = engines
    # A bare prompt, not a chat: a third of the chat template's tokens, and the prefill of 20 copies of
    # it was most of this test's time. Its repeats give the proposer drafts at every place.
    ids = tokenizer("red, blue, green, red, blue, green, red, blue, green, red,")["input_ids"]
    sampling = Sampling(8, temperature=0.7)
    before = drafted(on)
    runs: dict[str, list[list[int]]] = {"on": [], "off": []}
    for _ in range(5):  # 125 samples each, in batches that leave drafting its cache (MIN_FREE_CACHE)
        runs["on"] += answers(on, [ids] * 25, sampling)
        runs["off"] += answers(off, [ids] * 25, sampling)
    tokens, accepted = (now - then for now, then in zip(drafted(on), before, strict=True))
    assert 0 < accepted < tokens  # drafts were both kept and refused
    for place in range(1, 8):
        seen = {name: Counter(a[place] if len(a) > place else -1 for a in runs[name]) for name in runs}
        pooled = seen["on"] + seen["off"]
        top = [token for token, _ in pooled.most_common(5)]
        table = [
            [counts[t] for t in top] + [sum(counts.values()) - sum(counts[t] for t in top)]
            for counts in seen.values()
        ]
        columns = [a + b for a, b in zip(*table, strict=True)]
        rows, total = [sum(row) for row in table], sum(columns)
        chi2 = sum(
            (table[r][c] - rows[r] * columns[c] / total) ** 2 / (rows[r] * columns[c] / total)
            for r in range(2)
            for c in range(len(columns))
            if columns[c]
        )
        assert chi2 < 21.0, (place, seen["on"].most_common(6), seen["off"].most_common(6))


def test_a_request_cancelled_mid_draft_frees_its_cache(engines: Any) -> None:
    on, _, tokenizer = engines
    ids = chat_ids(tokenizer, GROUNDED)

    async def read_then_close() -> float:
        """The free cache while the request runs, past its prompt's blocks and mid-draft."""
        stream = on.stream(ids, Sampling(200))
        seen = 0
        async for step in stream:
            seen += len(step.token_ids)
            if seen >= 40 and len(step.token_ids) > 1:  # a step that accepted a draft
                break
        busy = on.stats()
        await stream.aclose()
        assert busy.running == 1
        return busy.free_cache

    busy = asyncio.run(read_then_close())
    deadline = time.monotonic() + LONG
    while (stats := on.stats()).running:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    # Its partly filled block is freed (complete blocks stay cached for prefix sharing, evictable).
    assert stats.free_cache > busy and stats.waiting == 0
    assert answers(on, [ids], Sampling(8)) == answers(on, [ids], Sampling(8))  # and it serves on
    # What drafting counts as room: the cached blocks too, which the library's free share leaves out.
    cache = on._manager.batch_processor.cache
    assert cache.compute_free_capacity(relative=True) < 1.0 and reclaimable_share(cache) == pytest.approx(1.0)


def test_the_served_route_drafts_changes_nothing_in_fp32_and_reports_it(client: httpx.Client) -> None:
    question = f"Copy this paragraph out exactly:\n\n{PARAGRAPH}"
    before = client.get("/engine/stats").json()
    plain = ask(client, question, max_tokens=96, speculation="off")["choices"][0]["message"]["content"]
    after_off = client.get("/engine/stats").json()
    assert after_off["speculation_draft_tokens"] == before["speculation_draft_tokens"]
    drafted_answer = ask(client, question, max_tokens=96)["choices"][0]["message"]["content"]
    after = client.get("/engine/stats").json()
    assert drafted_answer == plain
    assert after["speculation_accepted_tokens"] > after_off["speculation_accepted_tokens"]
    # A stop string inside the copied text cuts there, with or without drafts.
    url = str(client.base_url).rstrip("/")
    tokens_out = counter(url, "fnserve_generation_completion_tokens_total")
    stopped = ask(client, question, max_tokens=96, stop=["twelve"])
    tokens_out = counter(url, "fnserve_generation_completion_tokens_total") - tokens_out
    assert tokens_out == stopped["usage"]["completion_tokens"]  # what the metric counts out, too
    assert stopped["choices"][0]["message"]["content"] == plain[: plain.index("twelve")]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    # Drafted tokens past the stop are no part of the answer: its usage is the undrafted one's.
    undrafted = ask(client, question, max_tokens=96, stop=["twelve"], speculation="off")
    assert stopped["usage"] == undrafted["usage"]
    status = client.get("/models/status").json()[MODEL]["choices"]["speculation"]
    assert status["value"] == "auto"
    cost = client.get("/models/status").json()[MODEL]["choices"]["speculation_step_cost"]
    assert cost["source"] == "measured" and "ms/token" in cost["value"]
    assert after["speculation_cost_steps"] > 0  # the engine's own steps refine it
    assert 'fnserve_speculation_total{count="accepted_tokens"' in client.get("/metrics").text
    bad = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "speculation": "maybe"})
    assert bad.status_code == 400
    assert ask(client, question, max_tokens=96)["choices"][0]["message"]["content"] == plain


def cost_of(fixed: float, per_token: float, learn: bool = False) -> StepCost:
    """A step cost whose prior alone is a step of `fixed` seconds plus `per_token` per token."""
    points = [(n, kv, fixed + per_token * n) for n in (2, 8, 32) for kv in (256, 2048)]
    return StepCost(points, learn=learn)


def running(request_id: str, answer: list[int]) -> SimpleNamespace:
    """A decoding request's state as the policy reads it (transformers' RequestState's fields)."""
    return SimpleNamespace(
        request_id=request_id,
        status=SimpleNamespace(name="DECODING"),
        initial_tokens=[1, 2, 3],
        generated_tokens=list(answer),
        tokens_to_process=[answer[-1]],
        logit_processor_kwargs={},
        _new_tokens_limit=256,
        generated_len=lambda: len(answer),
        position_offset=2 + len(answer),
    )


def test_step_cost_learns_the_steps_it_times() -> None:
    def truth(n: int, kv: int) -> float:
        return 0.08 + 0.0015 * n + 0.02 * kv / 1000 + 0.0003 * n * kv / 1000

    cost = cost_of(0.04, 0.002, learn=True)  # as a bare forward pass: cheaper than the engine's step
    steps = [(n, kv) for n in (1, 4, 9, 16, 30) for kv in (300, 1500, 6000)]
    for n, kv in steps * 20:
        cost.observe(n, kv, truth(n, kv))
    for n, kv in [(1, 400), (16, 6400), (40, 3000)]:
        assert cost.seconds(n, kv) == pytest.approx(truth(n, kv), rel=0.05)
    assert cost.as_dict()["speculation_cost_steps"] == len(steps) * 20


def test_the_policy_drafts_where_a_token_is_worth_its_time() -> None:
    """A repeating answer offers a long draft. Where a step's fixed cost dominates, it is taken; where a
    token costs as much as a whole step, none is; and none while a prompt waits to be prefilled."""
    answer = [5, 6, 7, 8] * 6

    def drafts(cost: StepCost, waiting: dict[str, Any] | None = None) -> dict[str, int]:
        speculator = Speculator(cost)
        states = {name: running(name, answer) for name in ("a", "b")}
        speculator.draft(SimpleNamespace(active_requests=states, waiting_requests=waiting or {}), 1.0, 512)
        return {name: len(planned.drafts) for name, planned in speculator.planned.items()}

    cheap = drafts(cost_of(0.08, 0.001))
    assert set(cheap) == {"a", "b"} and min(cheap.values()) >= 4
    assert drafts(cost_of(0.001, 0.05)) == {}
    assert drafts(cost_of(0.0, 0.0)) == {}  # a step priced at nothing is not divided by
    idle = Speculator(cost_of(0.0, 0.001))
    idle.draft(SimpleNamespace(active_requests={}, waiting_requests={}), 1.0, 512)  # no request, no step
    assert idle.planned == {}
    assert drafts(cost_of(0.08, 0.001), waiting={"c": running("c", answer)}) == {}


def test_a_request_the_engine_dropped_leaves_no_record_behind() -> None:
    """A stream cut short forgets its request; the engine drafts for it once more before it drops it.
    Its record, made again then, must go with it: one was left for every request cut short."""
    speculator = Speculator(cost_of(0.08, 0.001))

    def step(names: tuple[str, ...]) -> SimpleNamespace:
        """The scheduler at a decode step: these requests, each with its one token to process."""
        scheduler = SimpleNamespace(
            active_requests={name: running(name, [5, 6, 7, 8] * 6) for name in names}, waiting_requests={}
        )
        speculator.draft(scheduler, 1.0, 512)
        return scheduler

    step(("kept", "cut"))
    speculator.forget("cut")  # the stream's end, on the event loop
    step(("kept", "cut"))  # the engine's next step, before it drops the request
    assert set(speculator._records) == {"kept", "cut"}
    speculator.keep_held(SimpleNamespace(active_requests={"kept": None}, waiting_requests={}))
    assert set(speculator._records) == {"kept"}


def test_a_request_whose_copying_ended_stops_drafting_in_a_full_batch() -> None:
    """In a batch of 32, where a draft token pays only at a chance of about 2 in 3, a request that has
    just had 16 drafts accepted drafts; three rejections later it no longer does, however long its run
    was."""
    cost = cost_of(0.1, 0.006)
    speculator = Speculator(cost)
    states = {f"r{i}": running(f"r{i}", [9]) for i in range(31)}  # no earlier n-gram: nothing to offer
    scheduler = SimpleNamespace(active_requests=states, waiting_requests={})
    speculator._record("copier").learn(16, 16)
    states["copier"] = running("copier", [5, 6, 7, 8] * 6)
    speculator.draft(scheduler, 1.0, 512)
    assert set(speculator.planned) == {"copier"}
    for _ in range(3):
        speculator._record("copier").learn(4, 0)
    states["copier"] = running("copier", [5, 6, 7, 8] * 6)  # the step ran: one token to process again
    speculator.draft(scheduler, 1.0, 512)
    assert speculator.planned == {}


def test_an_engine_whose_loop_died_is_started_again_on_the_next_request() -> None:
    """The model slot hands out a working engine: one whose loop has stopped is replaced, not used."""
    tokenizer, model = _model()
    ids = chat_ids(tokenizer, OPEN)

    def start() -> TransformersEngine:
        return TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, 16)

    slot = ModelSlot("chat", start, TransformersEngine.shutdown, 0, alive=engine_runs)
    slot.load_now()

    async def ask_slot() -> list[int]:
        async with slot.use() as engine:
            return await answer(engine, ids, Sampling(6))

    first = slot.current
    expected = asyncio.run(ask_slot())
    assert first is not None and first.shutdown()  # its loop is gone, as when the loop fails
    assert asyncio.run(ask_slot()) == expected
    assert slot.current is not first and slot.current.running
    slot.current.shutdown()
