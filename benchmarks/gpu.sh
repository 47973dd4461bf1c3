#!/usr/bin/env bash
# The GPU run (one call on a lent CUDA machine): versions, the tests that take a `device` (run on CUDA there, skipped
# elsewhere), and the benchmark rows against PEFT in bf16 at the "gpu" sizes, QLoRA against PEFT + bitsandbytes.
#   OUT=some/dir bash benchmarks/gpu.sh        (default OUT: gpu-out)
# Packages the machine lacks (bitsandbytes, datasets and its dill/multiprocess) are installed from .gpu-wheels/*.whl
# into /tmp/site when that folder is there (wheels carried with the working tree, never committed). Everything it
# prints is also under $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu-wheels/*.whl 2>&1 | tail -2
  export PYTHONPATH=$PWD:/tmp/site
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "unavailable:", type(e).__name__, e)
PY
} 2>&1 | tee "$OUT/versions.txt"
timeout "${TEST_SECONDS:-150}" $PY -m pytest -q -k cuda -rfEs -p no:cacheprovider --continue-on-collection-errors \
  tests 2>&1 | tee "$OUT/tests.txt" | tail -25
timeout "${BENCH_SECONDS:-240}" $PY -m benchmarks.run --device cuda --size gpu \
  --only ${ROWS:-cls-bf16 gpt2-bf16 llama-bf16 qlora-llama-bf16 mem-gpt2-bf16 mem-llama-bf16} \
  --md "$OUT/BENCHMARKS-gpu.md" --results "$OUT/results" 2>&1 | tee "$OUT/bench.txt" | grep -v "^+" | tail -20
