#!/usr/bin/env bash
# The GPU benchmark on a GPU host that has no network access, in three steps:
#
#   1. on any Linux or macOS machine with network access, in this repository:
#        bash bench/gpu_offline.sh download    # every wheel the GPU host needs, into ./wheelhouse
#   2. copy the repository (./wheelhouse included) to the GPU host; there:
#        bash bench/gpu_offline.sh install     # a virtual environment (./.venv-gpu) from ./wheelhouse only
#   3.   bash bench/gpu_offline.sh run         # the benchmark: prints its table and whether the
#                                              # expectation (>= 20 requests/s at c=32) was met
#
# `bash bench/gpu_offline.sh plan` prints the commands of all three steps without running any;
# DRY_RUN=1 does the same for one step. Extra arguments of `run` go to bench.gpu_bench
# (`python -m bench.gpu_bench --help`), e.g. `run --concurrency 1,32`.
#
# Settings (environment variables), with their defaults:
#   PYTHON_VERSION=3.12   the GPU host's Python (X.Y): wheels are downloaded for it
#   PLATFORM=manylinux_2_28_x86_64   the GPU host's platform tag (glibc 2.28 or newer, x86_64;
#                         manylinux_2_28_aarch64 for ARM hosts)
#   TORCH_SPEC=torch==2.13.0   TORCH_INDEX=https://download.pytorch.org/whl/cu128
#                         torch and the index of its CUDA build (pick the CUDA version the
#                         host's driver supports: `nvidia-smi` shows it)
#   WHEELHOUSE=wheelhouse  VENV=.venv-gpu  PYTHON=python3 (the GPU host's interpreter)
#   OUT=bench/out/gpu     where results are written (gpu_results.json/.md/.png, logs, profile)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
WHEELHOUSE=${WHEELHOUSE:-wheelhouse}
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/out/gpu}
REQUIREMENTS=${REQUIREMENTS:-bench/requirements-gpu.txt}
# Requirements published only as source (pure Python): built into wheels on the connected
# machine, since `pip download --platform` takes wheels only. Their pins come from requirements.txt.
SOURCE_ONLY=(grapheme)

run() {  # print a command, then run it unless DRY_RUN=1
  echo "+ $*"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}

pinned() { grep -E "^$1==" requirements.txt | cut -d' ' -f1; }

download() {
  local pins=() name
  for name in "${SOURCE_ONLY[@]}"; do pins+=("$(pinned "$name")"); done
  run mkdir -p "$WHEELHOUSE"
  run "$PYTHON" -m pip wheel --no-deps --wheel-dir "$WHEELHOUSE" "${pins[@]}"
  run "$PYTHON" -m pip download --dest "$WHEELHOUSE" --find-links "$WHEELHOUSE" \
    --python-version "$PYTHON_VERSION" --platform "$PLATFORM" --only-binary=:all: \
    --extra-index-url "$TORCH_INDEX" -r "$REQUIREMENTS" "$TORCH_SPEC"
}

install() {
  run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/python" -m pip install --no-index --find-links "$WHEELHOUSE" \
    -r "$REQUIREMENTS" "$TORCH_SPEC"
  run "$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', \
torch.version.cuda, 'GPU:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
}

bench() {
  local python="$VENV/bin/python"
  [[ -x "$python" || "${DRY_RUN:-0}" == 1 ]] || python=$PYTHON
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
  if [[ "${DRY_RUN:-0}" == 1 ]]; then run "$python" -m bench.gpu_bench --out "$OUT" "$@"; return; fi
  mkdir -p "$OUT"
  set +e  # the log keeps everything printed, the exit status is the benchmark's
  run "$python" -m bench.gpu_bench --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
  return "${PIPESTATUS[0]}"
}

step=${1:-}
shift || true
case "$step" in
  download) download ;;
  install) install ;;
  run) bench "$@" ;;
  plan) DRY_RUN=1; echo "# 1. connected machine"; download; echo "# 2. GPU host"; install
        echo "# 3. GPU host"; bench "$@" ;;
  *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; [[ "$step" == -h || "$step" == --help ]] ;;
esac
