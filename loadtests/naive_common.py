"""What the naive baseline servers share: a readiness route for the benchmarks to wait on, and one
command line that serves an app built for the dtype fnserve chose, on loopback, with the same uvicorn
settings for every baseline."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


async def ready(_: Request) -> Response:
    return Response("ok")


READY = Route("/readyz", ready)


def main(build_app: Callable[[str], Starlette], port: int) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--dtype", default="float32", help="the dtype fnserve chose (its /models/status)")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.dtype), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )
