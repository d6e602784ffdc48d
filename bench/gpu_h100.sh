#!/usr/bin/env bash
# The benchmark on one H100: a random-weight model with Qwen2.5-1.5B-Instruct's exact
# shape (bench/qwen2_5_1_5b_config.json, no download) in bf16, 150-token outputs,
# concurrency 1, 8, 32 and 64, and cold start (process start to /health ready, in
# results.json as cold_start_s). Goal: >= 20 requests/s at concurrency 32.
#
#   bench/gpu_h100.sh                  # on the GPU machine
#   bench/gpu_h100.sh --shape small    # CPU check of the script itself (small model)
#   extra arguments go to bench.run_benchmark, e.g. --systems ours,inprocess
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/out/gpu}
SHAPE=qwen2.5-1.5b DEVICE=cuda DTYPE=bfloat16 THREADS=0 LEVELS=1,8,32,64
if [[ "${1:-}" == "--shape" ]]; then
  SHAPE=$2; shift 2
fi
if [[ "$SHAPE" == "small" ]]; then
  DEVICE=cpu DTYPE=float32 THREADS=1 LEVELS=${LEVELS_SMALL:-1,8,32}
fi

"$PY" - <<PYEOF
import torch
if "$DEVICE" == "cuda" and not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch: install the CUDA build of torch "
                     "(make install TORCH_INDEX='--index-url https://download.pytorch.org/whl/cu128'), "
                     "or test the script with --shape small")
print("device:", torch.cuda.get_device_name(0) if "$DEVICE" == "cuda" else "cpu")
PYEOF

MODEL="$OUT/model-$SHAPE"
if [[ ! -f "$MODEL/config.json" ]]; then
  start=$(date +%s)
  "$PY" -m bench.random_model --out "$MODEL" --shape "$SHAPE" --dtype "$DTYPE" --device "$DEVICE"
  echo "built $MODEL in $(( $(date +%s) - start ))s"
fi

exec "$PY" -m bench.run_benchmark --model "$MODEL" --out "$OUT" --tokens 150 \
  --concurrency "$LEVELS" --device "$DEVICE" --dtype "$DTYPE" --threads "$THREADS" \
  --max-batch-size 64 --rounds 2 --level-budget "${LEVEL_BUDGET:-45}" --request-timeout 120 "$@"
