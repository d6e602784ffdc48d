#!/usr/bin/env bash
# The whole GPU benchmark in ONE call on the lent H100/H200 machine (no network there):
#
#   python -m bench.gpu_wheels      # here, once: the missing wheels into bench/wheels-py312 (~7 MiB)
#   run(command="bash bench/gpu_h100.sh", carry=["bench/wheels-py312"], timeout_s=540)
#
# 1. python3 (there: 3.12 with torch, transformers, tokenizers, safetensors, accelerate, peft)
#    and CUDA are checked; 2. the wheels the machine lacks (fastapi, uvicorn, pydantic, ...;
#    bench/gpu_wheels.py decides, reusing the machine's own where they fit) go into
#    /tmp/gpu-site with pip --target, no index, first on PYTHONPATH; 3. bench/gpu_bench.py
#    builds a random-weight model of Qwen2.5-1.5B-Instruct's exact shape in bf16 on the GPU,
#    measures cold start (process start to /ready 200), streams 150-token chats at
#    concurrency 1, 8, 32, 64 with the in-process generate baselines beside them, and
#    profiles one decode step at batch 32. Everything lands in $OUT (the tool brings it back):
#    gpu_results.json, gpu_results.md, gpu_results.png, gpu_bench.log, server.log,
#    decode_profile.txt, decode_trace.json.gz; the table is printed last.
#
# Environment (defaults for the GPU machine): GPU_BENCH_PYTHON=python3, GPU_BENCH_DEVICE=cuda
# (cpu: the simulated run tests/test_gpu_bench_script.py does), GPU_BENCH_INSTALL=1 (0: use
# this python's packages as they are), GPU_BENCH_WHEELS=bench/wheels-py312,
# GPU_BENCH_SITE=/tmp/gpu-site, GPU_BENCH_WORK=/tmp/gpu-bench, GPU_BENCH_DEADLINE_S=480 (no
# phase starts later; keep it under the call's timeout_s). Extra arguments go to
# bench.gpu_bench (python -m bench.gpu_bench --help), e.g. --concurrency 1,32 --no-baselines.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${GPU_BENCH_PYTHON:-python3}
DEVICE=${GPU_BENCH_DEVICE:-cuda}
INSTALL=${GPU_BENCH_INSTALL:-1}
WHEELS=${GPU_BENCH_WHEELS:-bench/wheels-py312}
SITE=${GPU_BENCH_SITE:-/tmp/gpu-site}
WORK=${GPU_BENCH_WORK:-/tmp/gpu-bench}
DEADLINE=${GPU_BENCH_DEADLINE_S:-480}
RESULTS=${OUT:-bench/out/gpu}
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

main() {
  set -euo pipefail  # main runs in a pipeline (for tee): errexit is set again here
  echo "== $(date -u +%FT%TZ) $(uname -n): python $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  if [[ "$DEVICE" == cuda ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm \
      --format=csv || true
  fi

  if [[ "$INSTALL" == 1 ]]; then
    echo "== wheels: $WHEELS -> $SITE"
    rm -rf "$SITE"
    # Decided against this python's own packages only (nothing of ours on the path yet).
    PYTHONPATH= "$PY" -m bench.gpu_wheels install --wheels "$WHEELS" --target "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" GPU_BENCH_SITE="$SITE"
  fi
  echo "== packages (version, where from)"
  "$PY" -m bench.gpu_wheels verify

  "$PY" - "$DEVICE" <<'EOF'
import sys
import torch
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch: this script is for the lent GPU machine "
                 "(GPU_BENCH_DEVICE=cpu runs the simulated check)")
    p = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.get_device_name(0)}: {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
EOF

  local left=$(( DEADLINE - ($(date +%s) - START) ))
  "$PY" -m bench.gpu_bench --out "$RESULTS" --work "$WORK" --device "$DEVICE" \
    --deadline-s "$left" "$@"
}

mkdir -p "$RESULTS" "$WORK"
set +e
main "$@" 2>&1 | tee "$RESULTS/gpu_bench.log"
status=${PIPESTATUS[0]}
echo "== done in $(( $(date +%s) - START ))s, exit $status; results in $RESULTS"
exit "$status"
