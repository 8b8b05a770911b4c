#!/usr/bin/env bash
# rayft's GPU checks on a CUDA host without registry access, in one go: the quick tests of
# tests/test_gpu.py, rayft's step in one process by attention, head and compilation, with a
# profile (train_step.py), benchmarks/train_throughput.py against LLaMA-Factory (neat packing),
# then the tests through Ray Train. On an H200 (2026-12-04) a throughput round took 2-4 minutes
# and seven of the eight tests then ~140 s. STAGES picks stages (default all: tests step bench
# ray). A device call runs at most 10 minutes and a session has 15 with the machine's start: the
# time limits of "tests step bench" with STEPS=60 add up to ~9 minutes with the unpacking, and
# "ray" (the ZeRO-2 and ZeRO-3 runs) to ~4, for a second call if time is left.
#
#   .venv/bin/python benchmarks/gpu_bundle.py     # here: packs .device/ (see its docstring)
#   bash benchmarks/gpu_check.sh [ROUNDS] [STEPS]  # there, in the repository root, with .device/ beside it
#   STAGES="tests step bench" bash benchmarks/gpu_check.sh 1 60; STAGES=ray bash benchmarks/gpu_check.sh
#
# The host's python3 must hold a CUDA torch (and the image's other packages, gpu_bundle.py says
# which). Logs go to $OUT (default /tmp/gpu-check). The model is SmolLM2-135M-Instruct's shape
# and tokenizer with random weights (its weights do not travel): speeds are the real model's,
# losses are not. Each stage has a time limit, so a stuck stage still leaves the others' logs.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-check}
ROUNDS=${1:-1}
STEPS=${2:-100}
mkdir -p "$OUT"
start=$(date +%s)
STAGES=${STAGES:-tests step bench ray}
want() { [[ " $STAGES " == *" $1 "* ]]; }
stage() { echo "=== $1 ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.log"; }

stage "unpack"
mkdir -p /tmp/rayft-site /tmp/lf-site
xz -dc -T0 .device/rayft-site.tar.xz | tar -C /tmp/rayft-site -xf - || exit 1
xz -dc -T0 .device/lf-site.tar.xz | tar -C /tmp/lf-site -xf - || exit 1
export PYTHONPATH="$PWD/src:/tmp/rayft-site" RAYFT_HOME=/tmp/rayft-home PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export RAYFT_BENCH_LF_PYTHON=python3 RAYFT_BENCH_LF_PATH=/tmp/lf-site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

stage "versions and the model"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 | tee -a "$OUT/summary.log"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/summary.log" || exit 1
import subprocess
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import bitsandbytes, deepspeed, mlflow, peft, ray, transformers

print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "| ray", ray.__version__, "deepspeed", deepspeed.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "mlflow", mlflow.__version__, "bitsandbytes", bitsandbytes.__version__)
target = Path("/tmp/rayft-home/models/smollm2-135m-instruct")
if not (target / "model.safetensors").is_file():
    staging = target.with_name("smollm2.tmp")
    staging.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(staging), "-xJf", ".device/smollm2.tar.xz"], check=True)
    torch.manual_seed(0)  # SmolLM2's shape, random weights
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(staging), dtype=torch.float32).save_pretrained(staging)
    staging.rename(target)
print("model", target, sorted(p.name for p in target.iterdir()))
EOF
PYTHONPATH=/tmp/lf-site python3 -c "import importlib.metadata as m, llamafactory, transformers, peft; print('llamafactory', llamafactory.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'flash-attn (the stand-in over torch)', m.version('flash-attn'))" 2>&1 | tail -3 | tee -a "$OUT/summary.log"

if want tests; then
stage "tests/test_gpu.py, the quick ones (the varlen attention's correctness first)"
# in their own run, so that their failures are reported even if a later stage hits its time limit
timeout 100 python3 -m pytest tests/test_gpu.py -v -p no:cacheprovider -o addopts="" --timeout 60 -k "not ray_train" \
    > "$OUT/tests.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/summary.log"
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$OUT/tests.log" | tail -20 | tee -a "$OUT/summary.log"
fi

if want step; then
stage "train_step: rayft's step in one process, by attention, head and compilation (no Ray, no DeepSpeed)"
# packed: the flash kernel's varlen attention; buckets: the per-length buckets (sdpa per bucket)
step() { timeout "$1" python3 benchmarks/train_step.py --device cuda --cutoff 2048 --batch 8 --rounds 1 "${@:2}" \
    >> "$OUT/step.log" 2>&1; echo "train_step ${*:2} exit $?" | tee -a "$OUT/summary.log"; }
step 50 --steps 10 --attention packed buckets sdpa
step 80 --steps 10 --attention packed --compile
step 40 --steps 10 --attention packed --head logits --host-reads
step 40 --steps 2 --attention packed buckets --profile
grep -E "^round|^precision|^profiled|Error" "$OUT/step.log" | tee -a "$OUT/summary.log"
fi

if want bench; then
stage "train_throughput: rayft and LLaMA-Factory on the GPU"
timeout $((40 + (100 + STEPS) * ROUNDS)) python3 benchmarks/train_throughput.py --device cuda --baselines lf --rounds "$ROUNDS" --steps "$STEPS" \
    --cutoff 2048 --batch 8 --rows 6000 > "$OUT/bench.log" 2>&1
echo "benchmark exit $?" | tee -a "$OUT/summary.log"
grep -E "^round|median|mfu|peak|attention|Error|error" "$OUT/bench.log" | tail -30 | tee -a "$OUT/summary.log"
fi

if want ray; then
stage "tests/test_gpu.py, through Ray Train"
timeout 200 python3 -m pytest tests/test_gpu.py -v -p no:cacheprovider -o addopts="" --timeout 150 -k ray_train \
    >> "$OUT/tests.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/summary.log"
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/tests.log" | tail -15 | tee -a "$OUT/summary.log"
# the Ray Train runs' worker logs (pytest keeps its temporary folders): their tracebacks in full
find /tmp/pytest-of-* -name "worker-0.log" 2>/dev/null | head -4 | while read -r log; do
    echo "== $log"; tail -c 6000 "$log"; done > "$OUT/worker_logs.txt"
fi
stage "done"
