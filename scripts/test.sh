#!/usr/bin/env bash
# The whole test suite, Rust and Python: `bash scripts/test.sh`.
# On a fresh machine it installs what it needs into .venv (torch is reused when
# the interpreter already has it: the venv sees the system site-packages).
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/venv.sh
"$VPY" -m pip install --quiet -e ".[test,dev]"

echo "== rust: fmt, clippy, tests"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
    cargo nextest run --workspace --exclude logitcache-python --no-fail-fast
    cargo test --workspace --exclude logitcache-python --doc --quiet
else
    cargo test --workspace --exclude logitcache-python --quiet
fi

# tests/test_reliability.py traces a commit's syscalls with strace (and fails without it).
if ! command -v strace >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
fi

echo "== python: ruff, mypy, pytest"
"$VPY" -m ruff check python tests benches fuzz examples
"$VPY" -m ruff format --check python tests benches fuzz examples
"$VPY" -m mypy
# The extension's stubs (_core.pyi) against the built module: names, signatures, classes.
"$VPY" -m mypy.stubtest logitcache._core
"$VPY" -m pytest -q
