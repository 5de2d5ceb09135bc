#!/usr/bin/env bash
# The main job on a small real example: `bash scripts/demo.sh`.
# Installs logitcache (and torch/transformers/tokenizers when missing) into .venv, then trains a
# small teacher on standard-library source, stores its top-K targets, verifies and reads them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
# torch from PyPI is several GB: install it only when it cannot be imported.
if ! "$VPY" -c "import torch" 2>/dev/null; then
    "$VPY" -m pip install --quiet "torch>=2.1"
fi
"$VPY" -m pip install --quiet -e ".[capture]"
exec "$VPY" examples/quickstart.py "$@"
