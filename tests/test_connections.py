"""How the HTTP port spreads connections over the entry workers (services/listener.py), on the session
server: one entry worker per core."""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest

from tests.server import LONG, server_processes

PER_WORKER = 32


def entry_workers(url: str) -> list[psutil.Process]:
    return [p for p in server_processes(url) if "--service-name" in p.cmdline() and "fnserve" in p.cmdline()]


def listening_sockets(worker: psutil.Process, port: int) -> set[str]:
    """The sockets (as `socket:[inode]`) on which `worker` listens at `port`."""
    return {
        os.readlink(f"/proc/{worker.pid}/fd/{c.fd}")
        for c in worker.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def accepted(worker: psutil.Process, port: int, clients: set[int]) -> int:
    """How many of the connections from the local ports `clients` `worker` has accepted."""
    return sum(
        1
        for c in worker.net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED
        and c.laddr.port == port
        and c.raddr
        and c.raddr.port in clients
    )


def test_a_burst_of_connections_reaches_every_worker_and_each_is_served(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    workers = entry_workers(server)
    if len(workers) < 2:
        pytest.skip("one entry worker: this machine has one core")
    burst = PER_WORKER * len(workers)
    listeners = [listening_sockets(w, port) for w in workers]
    assert all(len(mine) == 1 for mine in listeners), listeners
    assert len(set.union(*listeners)) == len(workers), "each worker listens on a socket of its own"

    connections = [socket.create_connection(("127.0.0.1", port), timeout=LONG) for _ in range(burst)]
    clients = {c.getsockname()[1] for c in connections}
    try:
        deadline = time.monotonic() + LONG
        while (
            sum(counts := [accepted(w, port, clients) for w in workers]) < burst
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert sum(counts) == burst
        # The kernel hashes each connection to one worker's socket: a worker with none of 32 per worker
        # would come about once in 2**63 bursts with two workers.
        assert min(counts) > 0, counts
        for c in connections:
            c.sendall(b"GET /livez HTTP/1.1\r\nHost: fnserve\r\n\r\n")
        for c in connections:
            assert c.recv(64).startswith(b"HTTP/1.1 200 "), "every accepted connection is served"
    finally:
        for c in connections:
            c.close()
