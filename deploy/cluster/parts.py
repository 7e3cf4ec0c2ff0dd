"""The parts of a local cluster, each a real server started on loopback on a free port: PostgreSQL, Redis
and HAProxy from Debian's packages (the Makefile installs them), and fnserve replicas (`bentoml serve`).

Each part is one process this module started and knows by PID (its start time too, so that a PID the
system gave to another process since is never signalled); `Part.stop` stops it and whatever it spawned.
"""

from __future__ import annotations

import csv
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
MARK = "FNSERVE_CLUSTER_PART"  # in each part's environment, inherited by all it starts: its log's path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ready: Callable[[], bool], part: Part | None = None, timeout: float = 300) -> None:
    """Polls `ready` until it holds; fails at once if `part` has exited, with the end of its log."""
    deadline = time.monotonic() + timeout
    while not ready():
        if part is not None and not part.running():
            raise RuntimeError(f"{part.name} exited: {part.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {timeout:.0f} s")
        time.sleep(0.5)


@dataclass
class Part:
    name: str
    pid: int
    started: float  # the process's create_time
    log: str
    stop_signal: int = signal.SIGTERM

    @classmethod
    def start(
        cls,
        name: str,
        command: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Part:
        """In a session of its own, so that a terminal's Ctrl-C or the caller's exit leaves it running
        until `stop` (make cluster returns while the cluster serves)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {}), MARK: str(log)},
                cwd=ROOT,
                user=user,
                start_new_session=True,
            )
        return cls(name, proc.pid, psutil.Process(proc.pid).create_time(), str(log), stop_signal)

    def process(self) -> psutil.Process | None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return None
        # Within a second: psutil's start times move with the wall clock (a step of the clock moves them).
        if abs(proc.create_time() - self.started) > 1 or not alive(proc):
            return None
        return proc

    def running(self) -> bool:
        return self.process() is not None

    def tree(self) -> list[psutil.Process]:
        """The part's process, its descendants, and any process that carries its mark but lost its
        parent (bentoml's workers, whose arbiter died first, live on in sessions of their own)."""
        proc = self.process()
        family = [] if proc is None else [proc, *proc.children(recursive=True)]
        known = {member.pid for member in family}
        for other in psutil.process_iter():
            with suppress(psutil.Error):
                if other.pid not in known and other.environ().get(MARK) == self.log and alive(other):
                    family.append(other)
        return family

    def stop(self, timeout: float = 30) -> None:
        """Signal the process, wait, then kill every descendant left (bentoml's workers run in their own
        sessions and outlive their arbiter otherwise)."""
        family = self.tree()
        if not family:
            return
        family[0].send_signal(self.stop_signal)
        kill_all(wait_gone(family[:1], timeout) + family[1:])

    def kill(self) -> None:
        """SIGKILL to the whole tree at once, as a machine or container dying would."""
        kill_all(self.tree())

    def log_tail(self, size: int = 3000) -> str:
        return Path(self.log).read_bytes()[-size:].decode(errors="replace")

    def to_json(self) -> dict:
        return asdict(self)


def alive(proc: psutil.Process) -> bool:
    """A zombie counts as gone: a part started by another process (a test that restarted it) stays one
    until that process reaps it, which psutil's own wait would sit out to its timeout."""
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return proc.is_running()
        with suppress(psutil.Error, ChildProcessError):
            proc.wait(timeout=0)  # reaped here if it is this process's child
    except psutil.NoSuchProcess:
        pass
    return False


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := [proc for proc in processes if alive(proc)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_all(processes: list[psutil.Process]) -> None:
    for proc in processes:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    wait_gone(processes, timeout=10)


def debian_binary(pattern: str) -> str:
    found = sorted(glob.glob(pattern))
    if not found:
        raise RuntimeError(f"{pattern} not found: `make cluster-packages` installs Debian's packages")
    return found[-1]


class Postgres:
    """PostgreSQL with its data in `data` (a temp dir): trust authentication, loopback only. As root it
    runs as Debian's `postgres` user (initdb refuses root)."""

    USER = "fn"
    DATABASE = "fnserve"

    def __init__(self, data: Path, port: int, log: Path) -> None:
        self.data, self.port, self.log = data, port, log
        self.bin = Path(debian_binary("/usr/lib/postgresql/*/bin/initdb")).parent
        self.user = "postgres" if os.geteuid() == 0 else None
        self.url = f"postgresql://{self.USER}@127.0.0.1:{port}/{self.DATABASE}"

    def init(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        if self.user:
            account = pwd.getpwnam(self.user)
            os.chown(self.data, account.pw_uid, account.pw_gid)
        command = [
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            self.USER,
            "-E",
            "UTF8",
        ]
        subprocess.run(command, check=True, capture_output=True, user=self.user, cwd="/")

    def start(self) -> Part:
        command = [
            str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.data),
            "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
        ]  # fmt: skip
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every replica to disconnect.
        part = Part.start("postgres", command, self.log, user=self.user, stop_signal=signal.SIGINT)
        wait_for("PostgreSQL", self.accepts, part)
        return part

    def accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.admin_url(), connect_timeout=2, autocommit=True) as db:
                if not db.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (self.DATABASE,)
                ).fetchone():
                    db.execute(f"CREATE DATABASE {self.DATABASE}")
            return True
        except psycopg.OperationalError:
            return False

    def new_database(self) -> str:
        """An empty database of its own (for a test), by URL."""
        import psycopg

        name = f"fnserve_{secrets.token_hex(6)}"
        with psycopg.connect(self.admin_url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def admin_url(self) -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/postgres"


@contextmanager
def temporary_postgres(log: Path) -> Iterator[Postgres]:
    """A PostgreSQL for as long as the block runs (tests, benchmarks), its data removed afterwards."""
    database = Postgres(Path(tempfile.mkdtemp(prefix="fnserve-pg-")), free_port(), log)
    database.init()
    part = database.start()
    try:
        yield database
    finally:
        part.stop()
        shutil.rmtree(database.data, ignore_errors=True)


def start_redis(port: int, folder: Path) -> Part:
    command = [
        debian_binary("/usr/bin/redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(folder),
    ]  # fmt: skip
    part = Part.start("redis", command, folder / "redis.log")

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_for("Redis", answers, part)
    return part


@dataclass
class Replica:
    name: str
    port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def shared_home(folder: Path) -> Path:
    """A BENTOML_HOME of a server's own (`folder/home`) that shares the model and Bento stores and the
    start-up measurements of this machine (services/functions/hardware.py `remembered`):
    `bentoml serve` empties its home's prometheus_multiproc_dir at start, so servers sharing one home
    would wipe each other's metrics."""
    store = Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml"))
    home = folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    for shared in ("models", "bentos", "fnserve-measurements"):
        (store / shared).mkdir(parents=True, exist_ok=True)
        if not (home / shared).exists():
            (home / shared).symlink_to(store / shared)
    return home


def start_replica(replica: Replica, folder: Path, env: dict[str, str]) -> Part:
    """Not waited for here: replicas load their models side by side."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "bentoml"), "serve",
        "services.service:Frontend", "--host", "127.0.0.1", "--port", str(replica.port),
    ]  # fmt: skip
    env = {
        **env,
        "BENTOML_HOME": str(shared_home(folder)),
        "FNSERVE_GRPC_HOST": "127.0.0.1",
        "FNSERVE_GRPC_PORT": str(replica.grpc_port),
        "FNSERVE_BATCH_DIR": str(folder / "batch"),
    }
    return Part.start(replica.name, command, folder / "server.log", env=env)


def haproxy_config(port: int, grpc_port: int, replicas: list[Replica], stats: Path, limit: int) -> str:
    """`limit`: the seconds a request may take, in which the balancer neither times it out nor, when
    stopping softly, cuts it."""
    template = (Path(__file__).parent / "haproxy.cfg").read_text()
    http = "\n".join(f"    server {r.name} 127.0.0.1:{r.port}" for r in replicas)
    grpc = "\n".join(
        f"    server {r.name} 127.0.0.1:{r.grpc_port} proto h2 check-proto h1 port {r.port}" for r in replicas
    )
    return template.format(
        port=port, grpc_port=grpc_port, http_servers=http, grpc_servers=grpc, stats=stats, limit=limit
    )


def start_haproxy(config: Path) -> Part:
    binary = debian_binary("/usr/sbin/haproxy")
    subprocess.run([binary, "-c", "-q", "-f", str(config)], check=True)
    # SIGUSR1 is HAProxy's soft stop (SIGTERM its hard one, which cuts every connection at once).
    command = [binary, "-db", "-f", str(config)]
    return Part.start("haproxy", command, config.with_suffix(".log"), stop_signal=signal.SIGUSR1)


def haproxy_stats(stats: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(proxy, server or BACKEND) -> HAProxy's counters and state for it (`status`: UP, DOWN, ...;
    `wretr`: retries), from its stats socket."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(stats))
            s.sendall(b"show stat\n")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
    except OSError:
        return {}
    rows = csv.DictReader(raw.decode().lstrip("# ").splitlines())
    return {
        (row["pxname"], row["svname"]): row for row in rows if row.get("svname") not in ("FRONTEND", None)
    }
