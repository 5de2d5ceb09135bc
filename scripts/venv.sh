# Sourced by scripts/demo.sh and scripts/test.sh: make .venv (it sees the system
# site-packages, so a torch that is already installed is reused) and install torch only when
# it cannot be imported: from PyPI it is several GB.
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
    "$VPY" -m pip install --quiet "torch>=2.1"
fi
