#!/usr/bin/env bash
# `make container`: build the Bento and its image with `bentoml containerize` (tag fnserve:latest).
# With a Docker engine already reachable this is the normal path: BentoML's Dockerfile from a registry's
# python:3.11-slim. On a machine with no engine and no registry (this project's machines), it starts a
# local engine with a locally made base image (local-engine.sh) and, since the index's torch 2.13.0 is a
# CUDA build of several GB, takes torch's CPU wheel from this disk into the Bento.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
IMAGE=${IMAGE:-fnserve:latest}
bentofile=bentofile.yaml
if ! docker info >/dev/null 2>&1; then
  DOCKER_HOST=$(deploy/container/local-engine.sh | tail -1)
  export DOCKER_HOST PATH=/usr/bin:/usr/sbin:$PATH
  wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then
    bentofile=bentofile.local.yaml
    mkdir -p wheels  # BentoML takes wheels from inside the build context only, and not hidden ones
    ln -f "$wheel" wheels/ 2>/dev/null || cp "$wheel" wheels/
    wheel=wheels/$(basename "$wheel")
    "$BIN/python" - "$wheel" <<'PY'
import sys, yaml
config = yaml.safe_load(open("bentofile.yaml"))
config["python"]["packages"] = [p for p in config["python"]["packages"] if not p.startswith("torch==")]
config["python"]["wheels"] = [sys.argv[1]]
open("bentofile.local.yaml", "w").write(yaml.safe_dump(config, sort_keys=False))
PY
  fi
fi
"$BIN/bentoml" build -f "$bentofile" >&2
rm -f bentofile.local.yaml
"$BIN/bentoml" containerize fnserve:latest -t "$IMAGE" --opt network=host
echo "built $IMAGE${DOCKER_HOST:+ (DOCKER_HOST=$DOCKER_HOST)}"
