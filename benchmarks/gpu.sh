#!/usr/bin/env bash
# The GPU run (one call on a lent CUDA machine): versions, the tests that take a `device` (run on CUDA there, skipped
# elsewhere), and the benchmark rows against PEFT in bf16 at the "gpu" sizes, QLoRA against PEFT + bitsandbytes.
#   OUT=some/dir bash benchmarks/gpu.sh        (default OUT: gpu-out)
# Packages the machine lacks (bitsandbytes, datasets and its dill/multiprocess, liger-kernel: pure Python, the machine's
# CUDA torch brings triton) are installed from .gpu-wheels/*.whl into /tmp/site when that folder is there (wheels
# carried with the working tree, never committed; e.g. pip download --no-deps liger-kernel -d .gpu-wheels). Then
# issue 25's rows: a Llama-3.2-1B-shaped model, 8 × 2048, bf16: lorakit (--kernels auto, none, and --compile) against
# PEFT and PEFT + Liger (benchmarks/kernels.py). Everything it prints is also under $OUT.
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
import importlib, importlib.metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "liger_kernel", "triton"):
    try:
        importlib.import_module(name)
        print(name, importlib.metadata.version(name.replace("_", "-")))
    except Exception as e:  # noqa: BLE001
        print(name, "unavailable:", type(e).__name__, e)
PY
} 2>&1 | tee "$OUT/versions.txt"
timeout "${TEST_SECONDS:-150}" $PY -m pytest -q -k cuda -rfEs -p no:cacheprovider --continue-on-collection-errors \
  tests 2>&1 | tee "$OUT/tests.txt" | tail -25
timeout "${BENCH_SECONDS:-240}" $PY -m benchmarks.run --device cuda --size gpu \
  --only ${ROWS:-cls-bf16 gpt2-bf16 llama-bf16 qlora-llama-bf16 mem-gpt2-bf16 mem-llama-bf16} \
  --md "$OUT/BENCHMARKS-gpu.md" --results "$OUT/results" 2>&1 | tee "$OUT/bench.txt" | grep -v "^+" | tail -20
timeout "${KERNEL_SECONDS:-300}" $PY -m benchmarks.run --device cuda --size gpu --only ${KERNEL_ROWS:-kernels-llama1b-bf16} \
  --md "$OUT/BENCHMARKS-gpu-kernels.md" --results "$OUT/results-kernels" 2>&1 | tee "$OUT/kernels.txt" | grep -v "^+" | tail -20
