#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh, for a GPU machine that has PyTorch, transformers and peft but no network:
# dpo_exp's other imports (hydra-core, omegaconf and its parser runtime, which PyPI has as a source archive only)
# transformers as tested here (5.25; TRL 1.16 wants a recent one) and TRL with what it needs beyond those. All are pure Python, so `pip wheel` builds them here for any Python 3.
# Run where pip reaches PyPI, from the repository root; .whl/ then travels to the GPU machine with the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip wheel -q --no-deps -w .whl hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
    transformers==5.25.0 trl==1.16.0 datasets dill
# multiprocess ships one wheel per Python version: the GPU machine's (3.12 on the lent H200s)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" -d .whl multiprocess
ls -la .whl
