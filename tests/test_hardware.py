"""Choices made per machine at start-up: the dtype a CPU computes fastest, shown with its reason in
`/models/status` and as a Prometheus info metric; an explicit setting always wins."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import platform
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from services import config
from services.config import CUDA_NODES, cuda_usable, get_settings, pick_device, torch_library
from services.functions import hardware
from services.functions.hardware import describe, machine
from tests.server import LONG, ONE_WORKER, ROOT, counter, serve

EMBEDDER = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"
# The libraries' own switches that cap the instruction set they use: under them this CPU computes bf16
# as an AVX2-only CPU does, by emulation (field notes).
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def choices(url: str) -> dict[str, dict[str, dict[str, str]]]:
    status = httpx.get(f"{url}/models/status", timeout=LONG).json()
    return {name: model["choices"] for name, model in status.items()}


@pytest.fixture(scope="module")
def avx2_server() -> Iterator[str]:
    if platform.machine() != "x86_64":
        pytest.skip("the AVX2 caps apply to x86-64 CPUs")
    # The choices timed at start-up that these tests are not about are set: under the caps, the machine's
    # description differs, so the other servers' timings (reused per machine) would not be found, and
    # timing the batch sizes and the engine's step cost made this start 25 s instead of 8 s.
    env = {
        **AVX2_ONLY,
        **ONE_WORKER,
        "FNSERVE_DEVICE": "cpu",
        "FNSERVE_GENERATION_THREADS": "1",
        "FNSERVE_GIL_SWITCH_MICROSECONDS": "1000",
        "FNSERVE_EMBEDDING_MAX_BATCH_SIZE": "32",
        "FNSERVE_IMAGE_MAX_BATCH_SIZE": "8",
        "FNSERVE_SPECULATION": "off",
    }
    with serve(env=env) as url:
        yield url


def test_a_cpu_without_fast_bf16_serves_both_models_in_fp32_and_says_why(avx2_server: str) -> None:
    made = choices(avx2_server)
    for model in (EMBEDDER, CHAT):
        dtype = made[model]["dtype"]
        assert dtype["value"] == "float32", dtype
        # By rule, nothing timed, as on an AVX2-only CPU: the cap keeps oneDNN off any bf16 instructions.
        assert dtype["source"] == "rule", dtype
        assert "=auto" in dtype["reason"] and "fp32" in dtype["reason"]
        if machine().bf16_instructions:
            assert "ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off the bf16 instructions" in dtype["reason"]
    for function, model in (("embedding", EMBEDDER), ("generation", CHAT)):
        source = made[model]["dtype"]["source"]
        labels = {"function": function, "choice": "dtype", "value": "float32", "source": source}
        assert counter(avx2_server, "fnserve_choice_info", **labels) == 1
    # Settings win over rules, and say so.
    assert made[CHAT]["threads"] == {
        "value": "1",
        "source": "setting",
        "reason": "FNSERVE_GENERATION_THREADS is set",
    }
    assert made[EMBEDDER]["workers"]["source"] == "setting"
    for model in (EMBEDDER, CHAT):
        assert made[model]["gil_switch_microseconds"] == {
            "value": "1000",
            "source": "setting",
            "reason": "FNSERVE_GIL_SWITCH_MICROSECONDS is set",
        }
    answer = httpx.post(
        f"{avx2_server}/v1/chat/completions",
        json={
            "model": CHAT,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12,
            "temperature": 0,
        },
        timeout=LONG,
    )
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]


def test_an_explicit_dtype_wins_and_auto_picks_a_served_dtype(server: str) -> None:
    made = choices(server)
    assert made[CHAT]["dtype"]["value"] == "float32"  # the session server sets it: exact text in tests
    assert made[CHAT]["dtype"]["source"] == "setting"
    assert made[CHAT]["dtype"]["reason"].startswith("FNSERVE_GENERATION_DTYPE=float32")
    auto = made[EMBEDDER]["dtype"]
    assert auto["value"] in ("float32", "bfloat16", "float16") and auto["source"] in ("measured", "rule")
    for name in ("workers", "threads", "max_batch_size", "max_batch_tokens"):
        assert int(made[EMBEDDER][name]["value"]) >= 1 and made[EMBEDDER][name]["reason"]
    status = httpx.get(f"{server}/models/status", timeout=LONG).json()
    for model, sizes in ((EMBEDDER, ("8", "32", "128")), ("efficientnet-lite0", ("1", "4", "8", "16"))):
        batch = made[model]["max_batch_size"]
        if status[model]["device"] == "cpu":  # timed on the real model; a GPU's is a rule
            assert batch["source"] == "measured" and batch["value"] in sizes, batch
            assert batch["reason"].startswith("inputs/s by batch size here: ")
    if status[EMBEDDER]["device"] == "cpu":  # the same pass in tokens, whatever its texts' length
        texts, tokens = int(made[EMBEDDER]["max_batch_size"]["value"]), made[EMBEDDER]["max_batch_tokens"]
        short = int(tokens["value"]) // texts
        assert tokens["reason"] == f"max_batch_size in tokens: {texts} short texts of {short}" and short > 8
    assert int(made[CHAT]["cache_blocks"]["value"]) >= 4
    # Python's own 5 ms let a busy event loop starve the model's thread (services/functions/hardware.py).
    for model in (EMBEDDER, CHAT, "efficientnet-lite0"):
        assert made[model]["gil_switch_microseconds"]["value"] == "500"
        assert made[model]["gil_switch_microseconds"]["source"] == "rule"


def test_without_bf16_instructions_the_rule_picks_fp32_without_timing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The AVX2-only case (an EPYC Zen 3) decided by the CPU's flags alone: nothing is timed there."""
    zen3 = hardware.Machine("AMD EPYC", "25/1", 2, ("avx2",), "AVX2", None)
    monkeypatch.setattr(hardware, "machine", lambda: zen3)
    timed: list[object] = []
    model = torch.nn.Linear(4, 4)
    assert hardware.fastest_dtype("auto", "cpu", model, timed.append) == (
        "float32",
        "rule",
        "AMD EPYC (25/1) has no AVX-512 bf16 or AMX: torch would emulate bf16, slower than fp32",
    )
    assert timed == [] and model.weight.dtype == torch.float32
    assert hardware.fastest_dtype("bfloat16", "cpu", model, timed.append)[:2] == ("bfloat16", "setting")


def test_a_gpu_that_only_emulates_bf16_is_served_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """A T4 or V100 (before compute capability 8.0) makes bf16 tensors but emulates its math: fp16 there.
    torch.cuda.is_bf16_supported counts emulation unless asked not to (torch 2.13); this stands in for it
    with the same signature, and fails if the call stops asking."""
    real = inspect.signature(torch.cuda.is_bf16_supported)
    assert "including_emulation" in real.parameters

    def pre_ampere(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", pre_ampere)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    model = torch.nn.Linear(4, 4)
    assert hardware.fastest_dtype("auto", "cuda", model, lambda _: None) == (
        "float16",
        "rule",
        "Tesla T4 has no bf16: fp16 halves memory and time",
    )


def test_the_machine_is_described_for_benchmarks() -> None:
    described = describe()
    assert described["cores"] >= 1 and described["cpu"] and described["torch"]
    assert set(described["flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    has = bool({"avx512_bf16", "amx_bf16"} & set(described["flags"]))
    assert described["onednn_max_isa"] == os.environ.get("ONEDNN_MAX_CPU_ISA")
    capped = (described["onednn_max_isa"] or "").upper() in hardware.ONEDNN_BELOW_BF16
    assert described["native_bf16"] == (has and not capped)


def test_a_cpu_with_bf16_instructions_is_emulating_under_a_onednn_cap_below_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 keeps the bf16 matmuls off the instructions (the caps
    tests/test_hardware.py serves under); at or above it, or unset, the CPU computes bf16 natively."""
    zen4 = hardware.Machine("AMD EPYC", "25/17", 2, ("avx2", "avx512f", "avx512_bf16"), "AVX512", None)
    assert zen4.native_bf16 and not zen4.bf16_capped
    for cap, native in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("ALL", True)):
        capped = dataclasses.replace(zen4, onednn_max_isa=cap)
        assert capped.native_bf16 is native and capped.bf16_capped is not native, cap
    zen3 = hardware.Machine("AMD EPYC", "25/1", 2, ("avx2",), "AVX2", None, "AVX2")
    assert not zen3.native_bf16 and not zen3.bf16_capped  # nothing to cap: the reason names the CPU
    monkeypatch.setattr(hardware, "machine", lambda: dataclasses.replace(zen4, onednn_max_isa="AVX2"))
    timed: list[object] = []
    assert hardware.fastest_dtype("auto", "cpu", torch.nn.Linear(4, 4), timed.append) == (
        "float32",
        "rule",
        "AMD EPYC (25/17): ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN off the bf16 instructions: torch would "
        "emulate bf16, slower than fp32",
    )
    assert timed == []


DECIDE = """
import sys, time
from pathlib import Path
from services.functions.hardware import once_per_server

def decide():
    with open(sys.argv[2], "a") as log:
        log.write("decided\\n")
    time.sleep(0.5)  # the other process asks meanwhile
    return {"value": sys.argv[3]}

print(once_per_server(sys.argv[1], "model", decide)["value"])
"""


def test_workers_of_one_server_share_one_decision(tmp_path: Path) -> None:
    key = f"test-{uuid.uuid4()}"
    log = tmp_path / "decisions"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", DECIDE, key, str(log), answer],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "BENTOML_HOME": str(tmp_path)},
        )
        for answer in ("first", "second")
    ]
    answers = {worker.communicate(timeout=LONG)[0].strip() for worker in workers}
    assert len(answers) == 1 and answers <= {"first", "second"}
    assert log.read_text() == "decided\n"


def test_a_new_server_run_removes_the_files_of_runs_that_have_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    folder = hardware.server_folder()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    this = psutil.Process()
    running = f"{this.pid}-{this.create_time():.3f}"
    gone = [f"{int(ended.stdout)}-1733300000.250", f"{this.pid}-1733300000.250"]  # the second: a reused pid
    for server in (running, *gone):
        (folder / f"{server}.lock").touch()
        (folder / f"{server}-embedding-dtype.json").write_text("{}")
    assert hardware.once_per_server(running, "chat-dtype", lambda: {"value": "x"}) == {"value": "x"}
    assert sorted(path.name for path in folder.iterdir()) == [
        f"{running}-chat-dtype.json",
        f"{running}-embedding-dtype.json",
        f"{running}.lock",
    ]


def test_a_server_in_another_pid_namespace_keeps_its_files_apart(tmp_path: Path) -> None:
    """Containers sharing a host's name and a BentoML home but not their processes: each would take
    the other's live runs for ended ones (it cannot see their PIDs) and remove their files."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here to start a process in a PID namespace of its own")
    show = "from services.functions.hardware import server_folder; print(server_folder())"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path)}
    folders = []
    for command in ([], ["unshare", "--pid", "--fork", "--mount-proc"]):
        line = [*command, sys.executable, "-c", show]
        shown = subprocess.run(line, capture_output=True, text=True, env=env, cwd=ROOT, timeout=LONG)
        if command and shown.returncode != 0:
            pytest.skip(f"unshare is not allowed here: {shown.stderr.strip()}")
        assert shown.returncode == 0, shown.stderr
        folders.append(Path(shown.stdout.strip()))
    assert folders[0] != folders[1] and folders[0].parent == folders[1].parent
    assert all(folder.name.startswith(platform.node()) for folder in folders)


def test_a_measurement_is_reused_by_the_next_server_run_on_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a start-up measured is kept per machine and key; a later run reads it unless told to
    measure again, and any other key (another model, dtype or setting) is measured on its own."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    measured: list[str] = []

    def decide(value: str) -> dict[str, str]:
        measured.append(value)
        return {"value": value, "reason": f"timed {value}"}

    assert hardware.remembered("model:1-batch", lambda: decide("4")) == {"value": "4", "reason": "timed 4"}
    reused = hardware.remembered("model:1-batch", lambda: decide("8"))
    assert reused["value"] == "4" and reused["reason"].startswith("timed 4 [measured ")
    assert "reused" in reused["reason"] and measured == ["4"]
    assert hardware.remembered("model:2-batch", lambda: decide("16"))["value"] == "16"
    monkeypatch.setenv("FNSERVE_REMEASURE", "true")
    get_settings.cache_clear()  # a server reads its settings once, at start-up
    assert hardware.remembered("model:1-batch", lambda: decide("8"))["value"] == "8"
    monkeypatch.delenv("FNSERVE_REMEASURE")
    get_settings.cache_clear()
    assert hardware.remembered("model:1-batch", lambda: decide("2"))["value"] == "8"
    assert measured == ["4", "16", "8"]
    ruled = {"value": "float32", "source": "rule", "reason": "no bf16 here"}
    assert hardware.remembered("model:1-dtype-auto", lambda: ruled) == ruled
    assert list(tmp_path.glob("fnserve-measurements/model-1-dtype-*")) == []  # nothing timed, nothing kept


def test_the_smallest_batch_within_the_margin_of_the_fastest_is_taken() -> None:
    """Rates (inputs/s) as measured: a larger batch must gain over 5% per input to be worth its latency."""
    assert hardware.smallest_fast_batch({1: 49, 4: 67, 8: 66, 16: 62}) == 4  # an image model on a Xeon
    assert hardware.smallest_fast_batch({8: 313, 32: 358, 128: 365}) == 32  # 365 is under 1.05 x 358
    assert hardware.smallest_fast_batch({8: 100, 32: 150, 128: 260}) == 128  # where big batches pay (AMX)
    assert hardware.smallest_fast_batch({8: 100, 32: 100}) == 8


def test_a_batch_size_is_timed_on_a_cpu_once_and_set_or_ruled_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward pass is the real model's in a server (tests/test_embeddings.py reads the served one);
    here it only counts the sizes it is given, which is what decides what gets timed."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    timed: list[int] = []
    sizes = (8, 32, 128)

    def decide(device: str, setting: int = 0, key: str = "model:1-float32") -> int:
        choices = hardware.Choices("embedding")
        size = choices.batch_size(setting, "FNSERVE_X_BATCH", device, 64, sizes, timed.append, key)
        assert choices.made["max_batch_size"].value == str(size)
        return size

    assert decide("cpu", setting=16) == 16 and timed == []
    assert decide("cuda") == 64 and timed == []
    assert decide("cpu") in sizes
    assert timed == [8, 8, 8, 32, 32, 32, 128, 128, 128]  # a warm-up, then best of two, each size
    chosen = hardware.Choices("embedding")
    chosen.batch_size(0, "FNSERVE_X_BATCH", "cpu", 64, sizes, timed.append, "model:1-float32")
    assert len(timed) == 9  # this server's other workers, and later runs on this machine, reuse it
    assert chosen.made["max_batch_size"].source == "measured"
    assert chosen.made["max_batch_size"].reason.startswith("inputs/s by batch size here: 8: ")


def test_usable_cores_follow_the_cgroup_quota_and_the_affinity(tmp_path: Path) -> None:
    from services.config import usable_cores

    allowed = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 cores' time: two cores, each partly
    assert usable_cores(quota) == min(allowed, 2)
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == allowed
    assert usable_cores(tmp_path / "absent") == allowed


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs util-linux's taskset")
def test_a_process_pinned_to_one_core_sizes_its_workers_and_threads_for_one() -> None:
    code = "from services.config import get_settings as s; print(s().workers, s().threads_per_worker)"
    unset = ("FNSERVE_EMBEDDING_WORKERS", "FNSERVE_TORCH_THREADS")
    env = {name: value for name, value in os.environ.items() if name not in unset}
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "FNSERVE_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        check=True,
        timeout=LONG,
    )
    assert pinned.stdout.split() == ["1", "1"], pinned.stderr


def test_cuda_is_counted_only_where_torch_will_find_it(tmp_path: Path) -> None:
    """The GPU sizes (batch, KV blocks, workers) follow what the workers' torch will use: not a GPU
    that CUDA_VISIBLE_DEVICES hides, nor one beside torch's CPU wheel."""
    node, cuda_lib, cpu_lib = tmp_path / "nvidiactl", tmp_path / "cuda", tmp_path / "cpu"
    node.touch()
    for lib, names in ((cuda_lib, ("libtorch_cpu.so", "libtorch_cuda.so")), (cpu_lib, ("libtorch_cpu.so",))):
        lib.mkdir()
        for name in names:
            (lib / name).touch()
    gpu_host = {"nodes": (node,), "torch_lib": cuda_lib}
    assert cuda_usable(environ={}, **gpu_host)
    for shown in ("0", "1,0", "GPU-8f6e2b1c", "MIG-4a1b"):
        assert cuda_usable(environ={"CUDA_VISIBLE_DEVICES": shown}, **gpu_host), shown
    for hidden in ("", "-1", " ", "none"):
        assert not cuda_usable(environ={"CUDA_VISIBLE_DEVICES": hidden}, **gpu_host), hidden
    assert not cuda_usable(nodes=(node,), environ={}, torch_lib=cpu_lib)
    assert not cuda_usable(nodes=(tmp_path / "absent",), environ={}, torch_lib=cuda_lib)
    # Only device files count: a container given no GPU on a GPU node still sees the driver's /proc.
    assert all(node.parts[1] == "dev" for node in CUDA_NODES)
    # On this machine, with the torch installed here, it agrees with torch itself; and the wheel's
    # layout still tells its build (fails if torch moves or renames its CUDA library).
    assert cuda_usable() == torch.cuda.is_available()
    assert any(torch_library().glob("libtorch_cuda*.so")) == (torch.version.cuda is not None)


@pytest.mark.parametrize("sized_for_gpu", [False, True])
def test_a_worker_warns_when_torch_runs_it_on_another_device_than_it_was_sized_for(
    sized_for_gpu: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The manager sizes without importing torch; torch can still answer otherwise (a GPU without
    NVIDIA's device files, as on WSL2; a driver too old for torch's CUDA). The worker follows torch and
    names the setting that makes both agree; where they agree, it says nothing. (No GPU here: torch's
    answer is stood in for.)"""
    monkeypatch.setattr(config, "cuda_usable", lambda: sized_for_gpu)
    config.warn_sized_for_other_device.cache_clear()
    for torch_finds_gpu in (not sized_for_gpu, sized_for_gpu):
        monkeypatch.setattr(torch.cuda, "is_available", lambda found=torch_finds_gpu: found)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bentoml.fnserve.config"):
            device = pick_device(config.Settings(device="auto"))
            pick_device(config.Settings(device="auto"))  # a worker's other function: said once
        assert device == ("cuda" if torch_finds_gpu else "cpu")
        warned = [record.getMessage() for record in caplog.records]
        if torch_finds_gpu == sized_for_gpu:
            assert warned == []
        else:
            assert len(warned) == 1 and f"set FNSERVE_DEVICE={device} so that both agree" in warned[0]
    assert pick_device(config.Settings(device="cpu")) == "cpu"  # a setting is taken as it is
