"""The greedy batcher's shedding and admission by time, in-process: what waits too long to start is
refused as overloaded, which every protocol answers as "try again" (503, gRPC UNAVAILABLE), and a request
larger than one forward pass is never shed for waiting behind its own passes. The forward is a plain
function that holds on an event, so the waits are made by the test, not by the machine's speed."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import get_args

import grpc
import pytest

from services.functions.batching import GreedyBatcher, passes
from services.functions.pacing import EncoderTurns, EngineBeat, ServiceRate, Share, Turns, admit
from services.functions.types import RefusalKind, Refused
from services.protocols.oip.grpc import CODES
from services.protocols.openai.protocol import REFUSAL_CODES
from services.protocols.status import HTTP_STATUS

SHED_AFTER = 0.05  # seconds a request may wait to start
LONG = 600.0


def doubling(started: threading.Event, release: threading.Event, batches: list[list[int]]):
    def run(items: list[int]) -> list[int]:
        batches.append(list(items))
        started.set()
        assert release.wait(LONG)
        time.sleep(2 * SHED_AFTER)  # every later pass has waited past SHED_AFTER when this one ends
        return [2 * item for item in items]

    return run


def batcher(run, max_batch_size: int) -> GreedyBatcher[int, int]:
    return GreedyBatcher(run, max_batch_size=max_batch_size, max_queue_seconds=SHED_AFTER, max_queue=10_000)


def test_a_request_larger_than_a_batch_is_never_shed_behind_its_own_passes() -> None:
    started, release, batches = threading.Event(), threading.Event(), []
    release.set()

    async def main() -> list[int]:
        return await batcher(doubling(started, release, batches), max_batch_size=4).submit(list(range(10)))

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_passes_hold_their_padded_tokens_and_pad_texts_to_about_their_own_length() -> None:
    # Shortest first: in the order given, each 50 would have padded the shorter texts with it to 50.
    assert passes([5, 1, 50, 2, 50], max_items=4, max_tokens=100) == [[1, 3, 0], [2, 4]]
    assert passes([300, 1], max_items=4, max_tokens=100) == [[1], [0]]  # one over the bound: alone
    assert passes([1] * 10, max_items=4, max_tokens=float("inf")) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def held_behind_a_pass(
    requests: Callable[[GreedyBatcher[str, str]], Awaitable[list[asyncio.Task[list[str]]]]],
    turns: Turns | None = None,
) -> tuple[list[list[str]], list[list[str]]]:
    """Answers and passes of a batcher (8 texts, 12 padded tokens, a text's length its tokens; answers in
    capitals) that gets `requests` while a pass of "x" holds, and runs them once it is let go."""
    started, release, seen = threading.Event(), threading.Event(), []

    def run(items: list[str]) -> list[str]:
        seen.append(list(items))
        started.set()
        assert release.wait(LONG)
        return [item.upper() for item in items]

    async def main() -> list[list[str]]:
        shared = GreedyBatcher(
            run,
            max_batch_size=8,
            max_queue_seconds=LONG,
            max_queue=10_000,
            max_batch_tokens=12,
            tokens=len,
            turns=turns,
        )
        first = asyncio.create_task(shared.submit(["x"]))
        assert await asyncio.to_thread(started.wait, LONG)
        queued = await requests(shared)
        await asyncio.sleep(0)  # queued behind the pass that holds
        release.set()
        return await asyncio.gather(first, *queued)

    return asyncio.run(main()), seen


def test_queued_requests_share_a_pass_up_to_its_padded_tokens_and_answers_keep_their_order() -> None:
    async def requests(shared: GreedyBatcher[str, str]) -> list[asyncio.Task[list[str]]]:
        return [asyncio.create_task(shared.submit(w)) for w in (["aa"], ["bbb", "c"], ["dddddd"], ["e"])]

    answers, seen = held_behind_a_pass(requests)
    assert answers == [["X"], ["AA"], ["BBB", "C"], ["DDDDDD"], ["E"]]
    # 3 texts padded to 3 tokens, then 2 padded to 6: "dddddd" would have made the second pass 24.
    assert seen == [["x"], ["aa", "c", "bbb"], ["dddddd", "e"]]


# The pass under way (1 token), then the passes the queue makes: 2 texts x 3, and 2 texts x 6; at 12
# padded tokens a second, that is 19/12 s. While the engine has work, at a share of 0.5, twice as long;
# and where recent passes waited 3 s each for their turn (the other encoder's passes and rests), each of
# the three passes ahead waits as long. The pass under way started with the engine idle, and its wait
# (none) is no part of that average: it would halve it.
WAITS = {"engine idle": (0.0, 19 / 12), "engine busy": (0.0, 19 / 6), "passes waited": (3.0, 19 / 12 + 9)}


@pytest.mark.parametrize("case", list(WAITS))
def test_the_expected_wait_is_the_padded_tokens_ahead_at_their_recent_rate(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted in inputs, a rate learned on short texts made a queue of long ones look as short as a
    queue of short ones: admitted, then shed for waiting."""
    waited, expected = WAITS[case]
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    share = Share("1-2.000", 0.5)
    share.path.parent.mkdir(parents=True, exist_ok=True)
    waits: list[float] = []

    async def requests(shared: GreedyBatcher[str, str]) -> list[asyncio.Task[list[str]]]:
        shared.rate.observe(12, 1.0)  # a pass of 12 padded tokens took a second
        shared.waits.observe(1, waited)
        queued = [asyncio.create_task(shared.submit(w)) for w in (["bbb", "c"], ["dddddd"], ["e"])]
        await asyncio.sleep(0)  # all three queued
        if case != "engine idle":
            share.path.touch()
        waits.append(shared.expected_wait)
        return queued

    answers, seen = held_behind_a_pass(requests, EncoderTurns(share, "embedding"))
    assert answers == [["X"], ["BBB", "C"], ["DDDDDD"], ["E"]]
    assert seen == [["x"], ["c", "bbb"], ["dddddd", "e"]]
    assert waits == [pytest.approx(expected)]


def test_a_cancelled_request_that_would_not_fit_leaves_room_for_the_next() -> None:
    async def requests(shared: GreedyBatcher[str, str]) -> list[asyncio.Task[list[str]]]:
        queued = [asyncio.create_task(shared.submit([words])) for words in ("bb", "aaaaaaa", "cc")]
        await asyncio.sleep(0)  # all three queued
        queued[1].cancel()  # then its caller gives up: 2 x 7 tokens would not have fitted beside "bb"
        return [queued[0], queued[2]]

    answers, seen = held_behind_a_pass(requests)
    assert answers == [["X"], ["BB"], ["CC"]]
    assert seen == [["x"], ["bb", "cc"]]


def test_a_request_that_waits_too_long_to_start_is_refused_as_overloaded() -> None:
    started, release, batches = threading.Event(), threading.Event(), []

    async def main() -> tuple[object, object, list[int]]:
        shared = batcher(doubling(started, release, batches), max_batch_size=4)
        first = asyncio.create_task(shared.submit([1]))
        assert await asyncio.to_thread(started.wait, LONG)
        second = asyncio.create_task(shared.submit([2, 3]))
        await asyncio.sleep(0)  # queued behind the pass that holds
        release.set()
        answers = await asyncio.gather(first, second, return_exceptions=True)
        after = await shared.submit([5])  # the batcher serves on
        return answers[0], answers[1], after

    first, second, after = asyncio.run(main())
    assert first == [2] and after == [10]
    assert isinstance(second, Refused) and second.kind == "overloaded", second
    assert second.retry_after == 1 and f"{SHED_AFTER:g} s" in second.message
    assert batches == [[1], [5]]


@pytest.mark.parametrize("kind", get_args(RefusalKind))
def test_every_refusal_has_a_status_in_every_protocol(kind: str) -> None:
    assert kind in HTTP_STATUS and kind in CODES and kind in REFUSAL_CODES
    if kind == "overloaded":
        assert HTTP_STATUS[kind] == HTTPStatus.SERVICE_UNAVAILABLE
        assert CODES[kind] == grpc.StatusCode.UNAVAILABLE


def test_admission_by_time_holds_an_idle_function_to_the_request_deadline_only() -> None:
    """One slow first token (a long prompt) must not shut the chat out: with nothing waiting ahead a
    request is admitted past the target, as it starts at once; with a queue ahead the target refuses;
    a request that cannot be served within its own deadline, or whose deadline has passed, is refused
    either way."""
    target, soon, later = 5.0, time.monotonic() + 1.0, time.monotonic() + LONG
    admit("generation", 7.0, target, None, "SETTING", idle=True)
    admit("generation", 7.0, target, later, "SETTING", idle=True)
    with pytest.raises(Refused) as queued:
        admit("generation", 7.0, target, None, "SETTING")
    assert queued.value.kind == "queue_full" and "SETTING" in queued.value.message
    assert queued.value.retry_after == 2
    with pytest.raises(Refused) as short:
        admit("generation", 7.0, target, soon, "SETTING", idle=True)
    assert short.value.kind == "queue_full" and "the request's deadline" in short.value.message
    with pytest.raises(Refused) as late:
        admit("generation", 0.0, target, time.monotonic() - 0.5, "SETTING", idle=True)
    assert late.value.kind == "deadline" and HTTP_STATUS["deadline"] == HTTPStatus.GATEWAY_TIMEOUT


def test_a_rate_forgets_what_it_saw_long_ago() -> None:
    """The encoders' waits for their turn under a spell of two floods long past had held (until 32 more
    passes) when the engine got work again, and refused requests for waits no longer there."""
    now = [0.0]
    waits = ServiceRate(max_age=30.0, clock=lambda: now[0])
    waits.observe(1, 3.0)
    now[0] = 20.0
    waits.observe(1, 1.0)
    assert waits.seconds_for(2) == 4.0  # both recent: 2 passes at 2 s
    now[0] = 40.0
    assert waits.seconds_for(2) == 2.0  # the first is 40 s old: the second alone
    now[0] = 60.0
    assert waits.seconds_for(2) == 0.0


def test_the_engine_beat_outlives_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's sign of work to the encoders is made again if its folder was removed under the
    running server (the beat task died of it, and the encoders stopped yielding to chat for good)."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    beat = EngineBeat("1-2.000")
    shutil.rmtree(beat.path.parent)
    beat.busy()
    assert beat.path.exists()


def test_one_worker_s_encoders_share_one_rest_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the engine has work, a worker's encoders together keep to the share: passes of the two that
    overlap are charged once, and a pass of either waits for the rest the other's pass left. (Each had
    rested after its own passes only: together, up to twice the share.) The clock is the test's."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    now = [0.0]
    share = Share("1-2.000", 0.5, clock=lambda: now[0])

    def at(seconds: float) -> None:
        now[0] = seconds

    assert share.wait_seconds() == 0
    share.begin()  # the engine idle: no rest
    at(1.0)
    share.end()
    assert share.wait_seconds() == 0
    EngineBeat("1-2.000").busy()
    share.begin()  # an embedding pass
    at(1.5)
    share.begin()  # an image pass: both busy from 1.5 to 2
    at(2.0)
    share.end()  # the embedding pass
    assert share.wait_seconds() == 1.0  # the embedding pass's second is owed: no pass starts
    at(3.0)
    share.end()  # the image pass
    # And the image pass's second not charged yet (2 to 3). The rest begins once neither runs: 2 s busy
    # (1 to 3), then 2 s of rest (3 to 5), the share.
    assert share.wait_seconds() == 2.0
    at(5.0)
    assert share.wait_seconds() == 0
    # The other order: a short pass that starts and ends inside a long one. 3 s busy (5 to 8), 3 s rest.
    share.begin()  # an image pass
    at(6.0)
    share.begin()  # an embedding pass
    at(6.5)
    share.end()  # the embedding pass
    at(8.0)
    share.end()  # the image pass
    assert share.wait_seconds() == 3.0
    assert share.stretch() == 2.0  # a queue's passes take twice their time while the engine has work


def test_a_pass_waits_for_the_rest_until_the_passes_under_way_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rest owed begins when neither encoder has a pass under way, so a pass that waits for it waits
    for the other encoder's pass first. Times here are lower bounds: a slower machine only waits longer."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    share = Share("1-2.000", 0.5)
    share.path.parent.mkdir(parents=True, exist_ok=True)

    async def main() -> float:
        share.begin()  # an image pass
        share.begin()  # an embedding pass
        await asyncio.sleep(0.05)
        share.path.touch()  # the engine has work
        share.end()  # the embedding pass
        waiting = asyncio.create_task(share.wait("embedding"))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the rest is owed, and the image pass runs on
        share.path.touch()
        ended = time.monotonic()
        share.end()  # the image pass, busy 0.1 s at least: a rest of as long
        await asyncio.wait_for(waiting, LONG)
        return time.monotonic() - ended

    assert asyncio.run(main()) >= 0.099


def test_a_caller_that_forms_its_own_passes_waits_its_turn_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BentoML's batchable /encode calls `forward` with passes of its own: they wait for the worker's
    rest as the queue's do (they had run through it, and cut it short)."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    share = Share("1-2.000", 0.5)
    share.path.parent.mkdir(parents=True, exist_ok=True)
    started: list[float] = []

    def run(items: list[int]) -> list[int]:
        started.append(time.monotonic())
        return items

    async def main() -> float:
        shared = GreedyBatcher(
            run, max_batch_size=4, max_queue_seconds=LONG, max_queue=10_000, turns=EncoderTurns(share, "x")
        )
        share.begin()  # another encoder's pass of 0.1 s at least, while the engine has work
        await asyncio.sleep(0.1)
        share.path.touch()
        ended = time.monotonic()
        share.end()
        assert await shared.forward([1, 2]) == [1, 2]
        return started[0] - ended

    assert asyncio.run(main()) >= 0.099  # its rest of as long


def test_a_caller_that_forms_its_own_passes_counts_in_the_expected_wait() -> None:
    """BentoML's /encode passes teach the rate and count as work under way: its load had been missing
    from every other protocol's expected wait, which admitted requests that then waited behind it."""
    started, release = threading.Event(), threading.Event()

    def run(items: list[str]) -> list[str]:
        started.set()
        assert release.wait(LONG)
        return [item.upper() for item in items]

    async def main() -> tuple[float, float, list[str], float]:
        shared = GreedyBatcher(run, max_batch_size=8, max_queue_seconds=LONG, max_queue=10_000, tokens=len)
        release.set()
        assert await shared.forward(["a"]) == ["A"]
        learned = shared.rate.seconds_for(1)  # none before: an idle function admits
        started.clear()
        release.clear()
        own = asyncio.create_task(shared.forward(["aaaa", "bb"]))  # 2 texts x 4 tokens
        assert await asyncio.to_thread(started.wait, LONG)
        during = shared.expected_wait
        release.set()
        return learned, during, await own, shared.expected_wait

    learned, during, answer, after = asyncio.run(main())
    assert learned > 0 and answer == ["AAAA", "BB"]
    assert during == pytest.approx(8 * learned) and after == 0


def test_a_beat_that_cannot_be_read_is_no_beat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read where a pass ends: an error there (a file where the server's folder should be) had left the
    rest's bookkeeping half done, and every later pass waiting on it."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    (tmp_path / "folder").write_text("")
    share = Share("1-2.000", 0.5)
    share.path = tmp_path / "folder" / "beat"
    share.begin()
    share.end()
    assert not share.engine_busy() and share.wait_seconds() == 0


def test_a_pass_whose_caller_gives_up_ends_when_its_thread_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread computes on after its caller is cancelled (a client gone); the CPU it takes meanwhile
    is charged, so the rest counts from the thread's end, not from the cancel."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    share = Share("1-2.000", 0.5)
    share.path.parent.mkdir(parents=True, exist_ok=True)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    ended: list[float] = []

    def run(items: list[int]) -> list[int]:
        started.set()
        assert release.wait(LONG)
        ended.append(time.monotonic())
        finished.set()
        return items

    async def main() -> float:
        shared = GreedyBatcher(
            run, max_batch_size=4, max_queue_seconds=LONG, max_queue=10_000, turns=EncoderTurns(share, "x")
        )
        caller = asyncio.create_task(shared.forward([1]))
        assert await asyncio.to_thread(started.wait, LONG)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0.2)  # the thread computes on
        share.path.touch()  # the engine has work
        release.set()
        assert await asyncio.to_thread(finished.wait, LONG)
        for _ in range(int(60 / 0.01)):  # the pass's end reaches the event loop
            if rest := share.wait_seconds():
                return time.monotonic() + rest - ended[0]  # when the rest ends, from the thread's end
            await asyncio.sleep(0.01)
        return 0.0  # no rest: the pass had ended at the cancel, its thread's time uncharged

    assert asyncio.run(main()) >= 0.199  # after the thread's end, a rest of its 0.2 s busy at least
