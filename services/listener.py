"""A listening socket of its own for each entry worker on the HTTP port, with SO_REUSEPORT, so that the
kernel spreads new connections over the workers as the gRPC port's already are.

Why: BentoML 1.4.40's arbiter binds the HTTP port once and every worker accepts from that one socket. A
worker whose event loop is free when a burst of connections arrives accepts the whole burst: 64
connections of a load generator all on one of two workers, about once in nine runs, at half the
throughput (2-core EPYC Zen 5, family 26 model 2, 2026-12-04; README, Benchmark). BentoML offers no
per-worker socket for HTTP, so each worker swaps its own in before it serves: it stops the shared socket
listening, binds a new one to the same address, and puts it on the descriptor number BentoML's worker
passed to uvicorn (`--fd`). uvicorn hands that descriptor to the event loop only after the service's
`__init__` (its lifespan runs first), so the swap in `__init__` is what the worker serves. Connections
waiting on the shared socket at that moment, before any worker served, are reset; clients retry them as
they would any refused start-up connection. Connections waiting on a worker's own socket when that
worker stops are reset, not handed to the others, unless the host sets the sysctl
net.ipv4.tcp_migrate_req=1 (Linux 5.14+). tests/test_connections.py checks on a real server that every
worker listens on a socket of its own and that a burst of connections reaches each."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys

logger = logging.getLogger("bentoml.fnserve.listener")
_swapped: set[int] = set()  # descriptors this process already serves on a socket of its own


def worker_option(argv: list[str], name: str) -> int | None:
    """An integer option BentoML's worker was started with (`--fd N`, `--backlog N`), if it was."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith(f"{name}="):
            return int(arg.removeprefix(f"{name}="))
    return None


def listen_on_own_socket(fd: int, backlog: int) -> bool:
    """Replace the shared TCP listening socket at `fd`, in this process only, by one of its own on the
    same address (False, and nothing done, for any other kind of socket). Every worker does this; the
    shared socket stays stopped for all of them."""
    with socket.socket(fileno=os.dup(fd)) as shared:
        family, address = shared.family, shared.getsockname()
        if family not in (socket.AF_INET, socket.AF_INET6):
            return False
        try:
            # The descriptor is shared with the arbiter and the other workers, so this stops it for all;
            # binding the port again needs it stopped, as BentoML bound it without SO_REUSEPORT.
            shared.shutdown(socket.SHUT_RDWR)
        except OSError as error:
            if error.errno != errno.ENOTCONN:  # ENOTCONN: another worker stopped it first
                raise
    own = socket.socket(family, socket.SOCK_STREAM)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        own.bind(address)
    except OSError:
        own.close()
        logger.exception("cannot bind %s again with SO_REUSEPORT; the HTTP port is stopped", address)
        raise
    own.listen(backlog)
    own_fd = own.detach()
    os.dup2(own_fd, fd, inheritable=False)
    os.close(own_fd)
    return True


def spread_connections(workers: int, enabled: bool) -> None:
    """In an entry worker of a server with more than one: listen on a socket of this worker's own."""
    if workers < 2 or not enabled:
        return
    fd = worker_option(sys.argv, "--fd")
    if fd is None:
        logger.info("not started by BentoML's worker (no --fd): connections stay on the shared socket")
        return
    if fd in _swapped:  # a second service instance in this process: the swap is done, and serving
        return
    if not listen_on_own_socket(fd, worker_option(sys.argv, "--backlog") or socket.SOMAXCONN):
        return
    _swapped.add(fd)
    logger.info(
        "HTTP connections: this worker listens on its own socket (SO_REUSEPORT), so the kernel spreads "
        "them over the %d workers; with one shared socket a free worker took whole bursts",
        workers,
    )
