"""A local cluster: N fnserve replicas behind HAProxy, sharing one PostgreSQL (the batch store, files
included) and one Redis (the response caches). Its state (ports, PIDs) is kept in `folder/cluster.json`,
so that `make cluster` can return while it serves and `make cluster-down` stops exactly what it started.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

from deploy.cluster.parts import (
    Part,
    Postgres,
    Replica,
    free_port,
    haproxy_config,
    haproxy_stats,
    start_haproxy,
    start_redis,
    start_replica,
    wait_for,
)
from services.config import TIMEOUT_GRACE_SECONDS, get_settings, usable_cores

STATE = "cluster.json"
# Stages, each side by side. The balancer and the replicas first, together: HAProxy's soft stop closes
# its ports and lets the connections it has finish, while each replica answers the requests it has.
STOP_ORDER = (("haproxy", "replica"), ("redis",), ("postgres",))


def replica_defaults(replicas: int) -> dict[str, str]:
    """Replicas on one machine share its cores: one worker each, and the cores split between them,
    unless the caller's environment says otherwise (on a machine of its own, a replica takes the
    defaults, which fill it)."""
    threads = str(max(1, usable_cores() // replicas))
    defaults = {
        "FNSERVE_EMBEDDING_WORKERS": "1",
        "FNSERVE_TORCH_THREADS": threads,
        "FNSERVE_GENERATION_THREADS": threads,
    }
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


@dataclass
class Cluster:
    folder: Path
    port: int
    grpc_port: int
    database_url: str = ""
    redis_url: str = ""
    pg_data: str = ""
    pg_port: int = 0
    # How long a request may run on these replicas, as `up` started them (their environment's setting):
    # HAProxy's timeouts and the drain at `down`.
    limit_seconds: int = 0
    replicas: list[Replica] = field(default_factory=list)
    parts: dict[str, Part] = field(default_factory=dict)
    # The FNSERVE_ settings of the environment `up` ran in: a replica started again later serves with them
    # too, not with the environment of whichever process starts it again.
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def save(self) -> None:
        state = {
            "port": self.port,
            "grpc_port": self.grpc_port,
            "url": self.url,
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "pg_data": self.pg_data,
            "pg_port": self.pg_port,
            "limit_seconds": self.limit_seconds,
            "replicas": [vars(r) for r in self.replicas],
            "parts": {name: part.to_json() for name, part in self.parts.items()},
            "settings": self.settings,
        }
        # Owner-only: the settings may hold API keys, and the database URL a password.
        descriptor = os.open(self.folder / STATE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(json.dumps(state, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Cluster | None:
        path = folder / STATE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        return cls(
            folder,
            state["port"],
            state["grpc_port"],
            state["database_url"],
            state["redis_url"],
            state["pg_data"],
            state["pg_port"],
            state.get("limit_seconds") or request_limit(),
            [Replica(**r) for r in state["replicas"]],
            {name: Part(**part) for name, part in state["parts"].items()},
            state.get("settings", {}),
        )

    def _started(self, part: Part) -> Part:
        self.parts[part.name] = part
        self.save()  # at every step: `down` can stop a cluster whose start failed half-way
        return part

    def up(self, replicas: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limit_seconds = request_limit()
        self.settings = {name: value for name, value in os.environ.items() if name.startswith("FNSERVE_")}
        self.pg_data = tempfile.mkdtemp(prefix="fnserve-pg-")
        self.pg_port = free_port()
        postgres = self.postgres()
        postgres.init()
        self._started(postgres.start())
        self.database_url = postgres.url
        redis_port = free_port()
        self._started(start_redis(redis_port, self.folder))
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.replicas = [Replica(f"replica{i + 1}", free_port(), free_port()) for i in range(replicas)]
        for replica in self.replicas:
            self.start_replica(replica.name)
        for replica in self.replicas:
            wait_for(replica.name, lambda r=replica: ready(r.url), self.parts[replica.name], timeout=600)
        config = self.folder / "haproxy.cfg"
        config.write_text(
            haproxy_config(self.port, self.grpc_port, self.replicas, self.stats, self.limit_seconds)
        )
        haproxy = self._started(start_haproxy(config))
        wait_for("HAProxy's view of every replica", self.all_up, haproxy, timeout=120)

    def start_replica(self, name: str) -> None:
        """Starts (or starts again, after it died) one replica; HAProxy routes to it once it is ready."""
        replica = next(r for r in self.replicas if r.name == name)
        env = {
            **replica_defaults(len(self.replicas)),
            **self.settings,
            "FNSERVE_BATCH_DATABASE_URL": self.database_url,
            "FNSERVE_REDIS_URL": self.redis_url,
        }
        self._started(start_replica(replica, self.folder / replica.name, env))

    def postgres(self) -> Postgres:
        return Postgres(Path(self.pg_data), self.pg_port, self.folder / "postgres.log")

    @property
    def stats(self) -> Path:
        return self.folder / "haproxy.sock"

    def all_up(self) -> bool:
        rows = haproxy_stats(self.stats)
        expected = {(backend, r.name) for backend in ("replicas", "grpc_replicas") for r in self.replicas}
        return expected <= rows.keys() and all(rows[key]["status"] == "UP" for key in expected)

    def stop_database(self) -> None:
        self.parts["postgres"].stop()

    def start_database(self) -> None:
        self._started(self.postgres().start())

    def down(self) -> None:
        """Requests in flight are answered first, for as long as a request may run; the stores then
        stop within Part.stop's own bound."""
        drain = self.limit_seconds or request_limit()
        for number, stage in enumerate(STOP_ORDER):
            parts = [part for name, part in self.parts.items() if name.startswith(stage)]
            stop = partial(Part.stop, timeout=drain) if number == 0 else Part.stop
            with ThreadPoolExecutor(max(1, len(parts))) as pool:
                list(pool.map(stop, parts))
        if self.pg_data:
            shutil.rmtree(self.pg_data, ignore_errors=True)
        (self.folder / STATE).unlink(missing_ok=True)


def request_limit() -> int:
    """How long a request may run, end to end: fnserve's deadline and BentoML's grace after it."""
    return get_settings().request_timeout_seconds + 2 * TIMEOUT_GRACE_SECONDS


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
