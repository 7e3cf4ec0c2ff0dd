#!/usr/bin/env bash
# One-shot check on a lent CUDA machine (no package index there): install the carried wheels, store the
# carried fp16 copy of MiniLM under the catalogue tag, serve it on CUDA, call it, and run the embedding
# benchmark at small scale. Needs .whl/ (wheels, wrk) and .devmodel/minilm/ carried beside the checkout;
# see the README's GPU section. Results land in $OUT.
set -euo pipefail
rm -rf /tmp/bentoml  # a fresh store each run: the machine may be a warm one from the last call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=$PWD/.whl/bin:/tmp/site/bin:$PATH LD_LIBRARY_PATH=$PWD/.whl/bin
export BENTOML_HOME=/tmp/bentoml BENTOML_DO_NOT_TRACK=true PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 - <<'PY'
import shutil

import bentoml

from models.catalog import CATALOG

entry = CATALOG["all-minilm-l6-v2"]
with bentoml.models.create(entry.tag, labels={"task": entry.task}, metadata={"dtype": "float16"}) as model:
    shutil.copytree(".devmodel/minilm", model.path, dirs_exist_ok=True)
print("stored", entry.tag)
PY
python3 -m bentoml serve services.service:Frontend --host 127.0.0.1 --port 3300 > "$OUT/serve.log" 2>&1 &
SERVER=$!
python3 - <<'PY' 2>&1 | tee "$OUT/check.log"
import time

import httpx
import numpy as np

url = "http://127.0.0.1:3300"
for _ in range(240):
    try:
        if httpx.get(f"{url}/readyz").status_code == 200:
            break
    except httpx.TransportError:
        pass
    time.sleep(0.5)
texts = ["A cat sits on the mat.", "A kitten is on a rug.", "Quarterly tax filings are due in April."]
body = httpx.post(f"{url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": texts}).json()
v = np.array([item["embedding"] for item in body["data"]])
print("cosine(cat, kitten) =", round(float(v[0] @ v[1]), 4), "cosine(cat, tax) =", round(float(v[0] @ v[2]), 4))
print("norms", np.linalg.norm(v, axis=1).round(4).tolist(), "usage", body["usage"])
PY
nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee -a "$OUT/check.log"
grep -h "embedding model" "$OUT/serve.log" | tee -a "$OUT/check.log" || true
kill "$SERVER"; sleep 3; pkill -P "$SERVER" || true
python3 loadtests/bench_embeddings.py --duration 4 --raw-seconds 1 2>&1 | grep -v Loading | tee "$OUT/bench.log"
cp loadtests/results/embeddings.json "$OUT/embeddings-gpu.json"
cp loadtests/results/embeddings.png "$OUT/embeddings-gpu.png"
