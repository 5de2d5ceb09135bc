#!/usr/bin/env bash
# The main job on a small real example: `bash scripts/demo.sh`.
# Installs logitcache (and torch/transformers/tokenizers when missing) into .venv, then trains a
# small teacher on standard-library source, stores its top-K targets, verifies and reads them.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/venv.sh
"$VPY" -m pip install --quiet -e ".[capture]"
exec "$VPY" examples/quickstart.py "$@"
