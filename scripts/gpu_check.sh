#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) on a machine with one GPU and PyTorch, transformers and peft installed:
# the other dependencies travel as wheels in .whl/ (scripts/gpu_wheels.sh downloads them, on a machine with pip
# access), installed here into /tmp/site. Results go to $OUT/gpu_check.json (or outputs/). Under 8 minutes on an
# H200; the device's own timeout should leave room for the wheels' install (~30 s).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
out="${OUT:-outputs}"
mkdir -p "$out"
timeout 450 python3 scripts/gpu_check.py --json "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
