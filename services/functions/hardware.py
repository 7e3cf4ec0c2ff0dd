"""Per-machine choices made at start-up: which dtype a device computes fastest, how many threads and workers
share its cores, how big batches and caches are. Nothing here is tuned on one machine's numbers: a choice
is the user's setting, a measurement of the real model on this device, or a rule that says why.

The machine's description is also what every benchmark writes beside its figures (`describe()`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import bentoml

from services.config import usable_cores

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("bentoml.fnserve.hardware")

# bf16 must beat fp32 by this much to be served: it costs precision (and bf16 greedy text can depend on
# the batch), so a tie goes to fp32.
BF16_MARGIN = 1.1
# A larger batch must be this much faster per input to be taken: a bigger forward pass delays every request
# that arrives while it runs, for a gain within the timing's noise.
BATCH_MARGIN = 1.05
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
Source = Literal["setting", "measured", "rule"]
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# oneDNN's names for the instruction sets below its first with bf16 arithmetic (AVX512_CORE_BF16): capped
# at one of these (ONEDNN_MAX_CPU_ISA), oneDNN, which runs torch's bf16 matmuls, emulates bf16 on any CPU.
ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")

CHOICES = bentoml.metrics.Gauge(
    name="fnserve_choice_info",
    documentation="Choices made at start-up per function (value 1): the value, and whether a setting, a "
    "measurement or a rule made it",
    labelnames=["function", "choice", "value", "source"],
    multiprocess_mode="livemax",  # every worker of a function makes the same choices
)


@dataclass(frozen=True)
class Machine:
    cpu: str
    family: str  # /proc/cpuinfo's "cpu family/model": where the name is generic (a VM's "AMD EPYC")
    cores: int
    flags: tuple[str, ...]  # of FLAGS_THAT_MATTER, those this CPU has
    torch_cpu_capability: str | None  # what torch's own kernels were built to use here
    gpu: str | None
    onednn_max_isa: str | None = None  # ONEDNN_MAX_CPU_ISA, where set

    @property
    def bf16_instructions(self) -> bool:
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def bf16_capped(self) -> bool:
        """The CPU has bf16 instructions, but ONEDNN_MAX_CPU_ISA keeps oneDNN off them."""
        return self.bf16_instructions and (self.onednn_max_isa or "").upper() in ONEDNN_BELOW_BF16

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware, that oneDNN may use; without it torch emulates bf16, slower than
        fp32 (MiniLM 0.2x on the Zen 3, 0.3x on the Zen 5 under the cap: README, "Per-machine choices")."""
        return self.bf16_instructions and not self.bf16_capped

    @property
    def emulating_bf16(self) -> str:
        """Which CPU emulates bf16, and why (where `native_bf16` is false): for reasons and warnings."""
        cpu = f"{self.cpu} ({self.family})"
        if self.bf16_capped:
            return f"{cpu}: ONEDNN_MAX_CPU_ISA={self.onednn_max_isa} keeps oneDNN off the bf16 instructions"
        return f"{cpu} has no AVX-512 bf16 or AMX"


@lru_cache(maxsize=1)
def machine() -> Machine:
    """Read from /proc/cpuinfo; torch is asked only where it is already imported (the manager process
    stays without it)."""
    import sys

    fields: dict[str, str] = {}
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    cpu = fields.get("model name") or platform.machine()
    family = f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}"
    flags = set(fields.get("flags", "").split())
    torch = sys.modules.get("torch")
    capability = gpu = None
    if torch is not None:
        capability = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    present = tuple(flag for flag in FLAGS_THAT_MATTER if flag in flags)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return Machine(cpu, family, usable_cores(), present, capability, gpu, cap)


def describe() -> dict[str, object]:
    """The machine, for a benchmark's JSON."""
    import torch  # noqa: F401 - so that the capability and the GPU are filled in

    machine.cache_clear()
    described = asdict(machine())
    described["native_bf16"] = machine().native_bf16
    described["torch"] = torch.__version__
    # The libraries' instruction-set caps, where set: under them a CPU computes as a lesser one does.
    described["isa_caps"] = {name: os.environ[name] for name in ISA_CAPS if name in os.environ}
    return described


def label(described: dict[str, object]) -> str:
    """One line naming a machine, for plots and printouts."""
    flags = "/".join(described["flags"]) or "no AVX2"  # type: ignore[arg-type]
    gpu = described.get("gpu") or "no GPU"
    caps = " ".join(f"{k}={v}" for k, v in described.get("isa_caps", {}).items())  # type: ignore[union-attr]
    where = f"{described['cpu']} ({described['family']}), {described['cores']} cores ({flags}), {gpu}"
    return f"{where}, under {caps}" if caps else where


@dataclass(frozen=True)
class Choice:
    name: str
    value: str
    source: Source
    reason: str


class Choices:
    """One function's choices: logged with their reasons, exported as an info metric, and shown in
    `/models/status`."""

    def __init__(self, function: str) -> None:
        self.function = function
        self.made: dict[str, Choice] = {}

    def add(self, name: str, value: object, source: Source, reason: str) -> str:
        choice = Choice(name, str(value), source, reason)
        self.made[name] = choice
        CHOICES.labels(function=self.function, choice=name, value=choice.value, source=source).set(1)
        logger.info("%s %s = %s (%s: %s)", self.function, name, choice.value, source, reason)
        return choice.value

    def setting_or(self, name: str, variable: str, setting: int, auto: int, reason: str) -> int:
        """`setting` where the user gave one (non-zero, in `variable`), else `auto` for `reason`."""
        if setting:
            return int(self.add(name, setting, "setting", f"{variable} is set"))
        return int(self.add(name, auto, "rule", reason))

    def dtype(
        self,
        setting: str,
        variable: str,
        model: torch.nn.Module,
        forward: Callable[[torch.nn.Module], object],
        key: str,
    ) -> torch.dtype:
        """The dtype to serve `model` in (loaded as stored, fp32), decided once for all of this server's
        workers of the function (`key`: the model's tag), then logged and exported."""
        import torch

        def decide() -> dict[str, str]:
            value, source, reason = fastest_dtype(setting, model.device.type, model, forward)
            return {"value": value, "source": source, "reason": f"{variable}={setting}: {reason}"}

        decided = once_per_server(server_instance(), f"{key}-dtype-{setting}", decide, remember=True)
        self.add("dtype", decided["value"], decided["source"], decided["reason"])  # type: ignore[arg-type]
        return getattr(torch, decided["value"])

    def batch_size(
        self,
        setting: int,
        variable: str,
        device: str,
        gpu_size: int,
        sizes: tuple[int, ...],
        forward: Callable[[int], object],
        key: str,
    ) -> int:
        """Inputs per forward pass: the setting; on a GPU `gpu_size`; on a CPU each of `sizes` is timed on
        `forward(size)`, a pass of the real model over `size` representative inputs (a warm-up, then best
        of two), once for all of this server's workers (`key`: the model's tag and dtype) and remembered
        per machine. Which batch is fastest per input differs by CPU: 4 images beat 16 on a Zen 5 (the
        activations leave the cache), while 128 short texts in bf16 beat 32 by 1.7x on a Xeon with AMX."""
        if setting or device == "cuda":
            return self.setting_or(
                "max_batch_size", variable, setting, gpu_size, "a GPU keeps gaining with the batch"
            )

        def decide() -> dict[str, str]:
            rates = {}
            for size in sizes:
                forward(size)  # warm-up: first calls pick kernels and allocate
                times = []
                for _ in range(2):
                    start = time.perf_counter()
                    forward(size)
                    times.append(time.perf_counter() - start)
                rates[size] = size / min(times)
            shown = ", ".join(f"{size}: {rate:.0f}" for size, rate in rates.items())
            reason = f"inputs/s by batch size here: {shown}; the smallest within {BATCH_MARGIN}x of the best"
            return {"value": str(smallest_fast_batch(rates)), "source": "measured", "reason": reason}

        decided = once_per_server(server_instance(), f"{key}-batch-size", decide, remember=True)
        return int(self.add("max_batch_size", decided["value"], "measured", decided["reason"]))

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {
            name: {"value": c.value, "source": c.source, "reason": c.reason} for name, c in self.made.items()
        }


def smallest_fast_batch(rates: dict[int, float]) -> int:
    """The smallest batch size whose rate (inputs a second) is within BATCH_MARGIN of the fastest."""
    fastest = max(rates.values())
    return min(size for size, rate in rates.items() if rate * BATCH_MARGIN >= fastest)


GIL_SWITCH_MICROSECONDS = 500


def share_the_gil(choices: Choices, setting: int) -> None:
    """A forward pass runs in a thread beside the worker's event loop and takes the GIL back after each
    of its hundreds of torch ops. At Python's 5 ms switch interval a loop busy answering or refusing
    requests kept each hand-back waiting: one entry worker at 256 connections served 20 embeddings/s
    (the rest refused as the rate it measured fell) where at 0.5 ms it served 341 (2-core EPYC Zen 5,
    family 26 model 2, 2026-12-04; README "Per-machine choices"). The interval is per process, so every
    function of it sets the same."""
    microseconds = choices.setting_or(
        "gil_switch_microseconds", "FNSERVE_GIL_SWITCH_MICROSECONDS", setting, GIL_SWITCH_MICROSECONDS,
        "the event loop hands the GIL back to the model's thread within this; Python's own 5,000 "
        "starved forward passes under load",
    )  # fmt: skip
    sys.setswitchinterval(microseconds / 1e6)


def server_folder() -> Path:
    """Where the workers of a server run share state (files named by `server_instance()`). In BentoML's
    home: the server's own state lives there, and a test server's home is removed after it. One folder
    per set of process ids (`pid_space()`): a server that clears the files of ended runs judges only
    the runs whose processes it can see."""
    folder = home_folder("fnserve-choices") / pid_space()
    folder.mkdir(exist_ok=True)
    return folder


def pid_space() -> str:
    """The host's name and its PID namespace: machines sharing a home have their own PIDs, and so do
    containers that share a host's name (host networking) but not its processes."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:  # no procfs: the host's name alone
        return socket.gethostname()
    return f"{socket.gethostname()}-{namespace}"


def home_folder(name: str) -> Path:
    folder = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml")) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def once_per_server(
    server: str, key: str, decide: Callable[[], dict[str, Any]], remember: bool = False
) -> dict[str, Any]:
    """Runs `decide` in the first worker of this server run (`server`) that asks for `key`, and gives the
    others its answer, so that every worker of a function serves the same dtype and only one pays for
    the measurement. Decisions of one server take turns: two functions timing their models at once on
    the same cores would each measure the other. With `remember`, see `remembered`."""
    folder = server_folder()
    path = folder / f"{server}-{key}.json"
    with open(folder / f"{server}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():
            return json.loads(path.read_text())
        forget_ended_servers(folder)
        decided = remembered(key, decide) if remember else decide()
        path.write_text(json.dumps(decided))
        return decided


def forget_ended_servers(folder: Path) -> None:
    """Removes the files of server runs that have ended (named `<pid>-<start time>-...` by
    `server_instance()`); otherwise each start of a server leaves a few behind, for good."""
    import psutil

    for path in folder.iterdir():
        pid, _, rest = path.name.partition("-")
        started = rest.removesuffix(".lock").split("-")[0]
        if not pid.isdigit():
            continue
        try:
            alive = f"{psutil.Process(int(pid)).create_time():.3f}" == started
        except psutil.NoSuchProcess:
            alive = False
        except psutil.Error:  # not ours to judge
            alive = True
        if not alive:
            path.unlink(missing_ok=True)


def remembered(key: str, decide: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A measurement this machine made before for `key` (a model's tag and what else it depends on),
    under the same torch, threads and instruction-set caps, instead of measuring again: start-up
    measurements were most of a restart's time (about 12 s of 28 on a 2-core Zen 3), and they measure
    the machine, which a restart does not change. Kept in BentoML's home beside the model store, as
    TensorRT keeps its timing cache; `FNSERVE_REMEASURE=true` measures again and keeps the new one."""
    import hashlib

    import torch

    from services.config import get_settings

    conditions = {"machine": describe(), "threads": torch.get_num_threads(), "key": key}
    digest = hashlib.sha256(json.dumps(conditions, sort_keys=True).encode()).hexdigest()[:16]
    # Shared by every server run with this BentoML home (`server_folder` is per run).
    path = home_folder("fnserve-measurements") / f"{key.replace(':', '-')}-{digest}.json"
    if path.exists() and not get_settings().remeasure:
        earlier = json.loads(path.read_text())
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(earlier.pop("measured_at")))
        return {**earlier, "reason": f"{earlier['reason']} [measured {when} UTC on this machine, reused]"}
    decided = decide()
    if decided.get("source", "measured") != "measured":
        return decided  # a setting or a rule: nothing timed, nothing to keep
    staged = path.with_suffix(f".{os.getpid()}.tmp")
    staged.write_text(json.dumps({**decided, "measured_at": time.time()}))
    staged.replace(path)  # whole or not at all, for a replica reading it at the same time
    return decided


def server_instance() -> str:
    """Names this run of `bentoml serve` (its arbiter, the workers' parent)."""
    import psutil

    parent = psutil.Process(os.getppid())
    return f"{parent.pid}-{parent.create_time():.3f}"


def server_running(instance: str) -> bool:
    """Whether the server run `server_instance` named is still running, as seen from this PID namespace:
    its arbiter's PID still names a live process started at that moment. Within a second: psutil adds
    the start to the boot time, which the kernel derives from the wall clock, so a clock correction
    moves it (a PID is not reused within a second). Any other name: False."""
    import psutil

    pid, _, started = instance.partition("-")
    try:
        process = psutil.Process(int(pid))
        return abs(process.create_time() - float(started)) < 1 and process.status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.Error):
        return False


def fastest_dtype(
    setting: str, device: str, model: torch.nn.Module, forward: Callable[[torch.nn.Module], object]
) -> tuple[str, Source, str]:
    """The dtype to serve `model` (loaded in its stored fp32) in, why, and what decided it. On a CPU
    with native bf16 both are timed on `forward`, a representative pass of the real model, alternating,
    best of three each: one to two seconds for the models served here, once per server."""
    import torch

    if setting == "bfloat16" and device == "cpu" and not machine().native_bf16:
        # Seen on a Zen 3: emulated bf16 ran 5x slower, and one chat in a mixed batch answered nonsense.
        logger.warning("bf16 is set, but %s: torch emulates bf16, slower than fp32", machine().emulating_bf16)
        return setting, "setting", "set, on a CPU that emulates bf16 (slower than fp32)"
    if setting != "auto":
        return setting, "setting", "set"
    if device == "cuda":
        # Not emulation (torch 2.13's default counts it): a T4 or V100 makes bf16 tensors but not its math.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", "rule", f"{torch.cuda.get_device_name()} computes bf16 natively"
        return "float16", "rule", f"{torch.cuda.get_device_name()} has no bf16: fp16 halves memory and time"
    here = machine()
    if not here.native_bf16:
        return "float32", "rule", f"{here.emulating_bf16}: torch would emulate bf16, slower than fp32"
    import copy

    candidates = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    best = {name: float("inf") for name in candidates}
    with torch.inference_mode():
        for candidate in candidates.values():
            forward(candidate)  # warm-up: first calls pick kernels and allocate
        for _ in range(3):
            for name, candidate in candidates.items():
                start = time.perf_counter()
                forward(candidate)
                best[name] = min(best[name], time.perf_counter() - start)
    del candidates["bfloat16"]
    speedup = best["float32"] / best["bfloat16"]
    timings = f"fp32 {best['float32'] * 1e3:.1f} ms, bf16 {best['bfloat16'] * 1e3:.1f} ms a pass"
    if speedup >= BF16_MARGIN:
        return "bfloat16", "measured", f"bf16 {speedup:.2f}x fp32 here ({timings})"
    return "float32", "measured", f"bf16 only {speedup:.2f}x fp32 here, under {BF16_MARGIN}x ({timings})"


def model_status(state: str, device: str, choices: Choices) -> dict[str, object]:
    """One model's entry in `/models/status`."""
    return {"state": state, "device": device, "choices": choices.as_dict()}
