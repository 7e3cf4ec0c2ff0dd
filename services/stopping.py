"""The stop signal, as soon as it arrives.

uvicorn (0.54.0, pinned) takes SIGINT and SIGTERM itself and runs the app's shutdown (BentoML's
`on_shutdown`) only once every HTTP connection has drained, which may take a request's whole deadline.
What is not HTTP must hear of the stop before that: the gRPC server must refuse new calls at once (a
balancer then sends them elsewhere) and the batch runner stop claiming lines (another worker takes them).
uvicorn has no hook for this, so its handler is wrapped: ours runs first, then uvicorn's, unchanged.
tests/test_lifecycle.py fails if a uvicorn release changes how it takes the signal.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger("bentoml.fnserve.stopping")
Handler = Callable[[int, FrameType | None], object]
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signal(callback: Callable[[], None]) -> None:
    """Call `callback` on this event loop when a stop signal arrives, before the server's own handler.
    Called from the running loop, after the server has installed its handlers (an `on_startup` hook)."""
    if threading.current_thread() is not threading.main_thread():
        logger.warning("not on the main thread: gRPC and the batch runner stop only after the HTTP drain")
        return
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):
            logger.warning(
                "%s has no server handler to run after ours (%r): left as it is", sig.name, previous
            )
            continue
        signal.signal(sig, calling_first(callback, loop, previous))


def calling_first(
    callback: Callable[[], None], loop: asyncio.AbstractEventLoop, previous: Handler
) -> Handler:
    """A signal handler that schedules `callback` on `loop` and then runs `previous` as it would have."""

    def handle(sig: int, frame: FrameType | None) -> object:
        loop.call_soon_threadsafe(callback)
        return previous(sig, frame)

    return handle
