"""Run every cargo-fuzz target of fuzz/ for a fixed time and report what libFuzzer did.

    .venv/bin/python benches/fuzz_run.py --seconds 600

Needs `cargo-fuzz` (`cargo install cargo-fuzz`) and a nightly toolchain (AddressSanitizer,
the cargo-fuzz default). Targets run one after another, one job each, on the corpus in
fuzz/corpus/<target>/ (new inputs found are added there; `cargo fuzz cmin` trims it again).
libFuzzer's own log of each run is kept in fuzz/artifacts/<target>.log, crashing inputs in
fuzz/artifacts/<target>/.

`run_fuzz(seconds)` is the API (benches/reliability.py imports it): a list of
``{"target", "execs", "crashes", "seconds", "returncode", "log"}`` dicts, one per target.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUZZ_DIR = ROOT / "fuzz"
TARGETS = ("shard_decoder", "footer_index", "manifest")
# A single allocation above this, or a process above it, is a finding: no length field may
# make the reader allocate that much for inputs of a few KB.
MEMORY_LIMIT_MB = 2048

_EXECS = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(r"Done (\d+) runs in")
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)
_CRASH = re.compile(
    r"(ERROR: AddressSanitizer|ERROR: libFuzzer|panicked at|==\d+==ERROR|"
    r"SUMMARY: libFuzzer|Test unit written to)"
)


class FuzzUnavailable(RuntimeError):
    """cargo-fuzz or the nightly toolchain is missing."""


def _check_tools() -> None:
    if shutil.which("cargo") is None:
        raise FuzzUnavailable("cargo is not on PATH: install Rust (https://rustup.rs)")
    probe = subprocess.run(
        ["cargo", "+nightly", "fuzz", "--version"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        raise FuzzUnavailable(
            "cargo-fuzz with a nightly toolchain is needed: `rustup toolchain install nightly` "
            "and `cargo install cargo-fuzz`; `cargo +nightly fuzz --version` said: "
            + (probe.stderr or probe.stdout).strip()[-500:]
        )


def parse_log(text: str) -> tuple[int, int]:
    """(execs, crashes) from a libFuzzer log: the final `stat::number_of_executed_units`
    (printed with -print_final_stats=1), else the `Done N runs` line, else the last `#N`
    progress line (a run cut short by a crash prints neither)."""
    execs = 0
    for pattern in (_EXECS, _DONE, _PROGRESS):
        found = pattern.findall(text)
        if found:
            execs = int(found[-1])
            break
    crashes = len(re.findall(r"Test unit written to .*/(?:crash|oom|leak|timeout)-", text))
    if crashes == 0 and _CRASH.search(text) and "Test unit written to" not in text:
        crashes = 1 if re.search(r"ERROR: (AddressSanitizer|libFuzzer)|panicked at", text) else 0
    return execs, crashes


def run_target(target: str, seconds: float, build: bool = True) -> dict[str, object]:
    """Run one cargo-fuzz target for `seconds` seconds (one process, AddressSanitizer)."""
    _check_tools()
    artifacts = FUZZ_DIR / "artifacts"
    (artifacts / target).mkdir(parents=True, exist_ok=True)
    corpus = FUZZ_DIR / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    if build:
        subprocess.run(
            ["cargo", "+nightly", "fuzz", "build", target],
            cwd=FUZZ_DIR,
            check=True,
            capture_output=True,
        )
    cmd = [
        "cargo",
        "+nightly",
        "fuzz",
        "run",
        target,
        "--",
        f"-max_total_time={max(1, int(seconds))}",
        f"-rss_limit_mb={MEMORY_LIMIT_MB}",
        f"-malloc_limit_mb={MEMORY_LIMIT_MB}",
        "-timeout=10",
        "-print_final_stats=1",
    ]
    proc = subprocess.run(cmd, cwd=FUZZ_DIR, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    log_path = artifacts / f"{target}.log"
    log_path.write_text(log)
    execs, crashes = parse_log(log)
    if proc.returncode != 0 and crashes == 0:
        crashes = 1 if re.search(r"ERROR|panicked|deadly signal", log) else 0
        if crashes == 0:
            msg = f"cargo fuzz run {target} failed ({proc.returncode}):\n{log[-2000:]}"
            raise RuntimeError(msg)
    return {
        "target": target,
        "execs": execs,
        "crashes": crashes,
        "seconds": seconds,
        "returncode": proc.returncode,
        "log": str(log_path),
    }


def run_fuzz(seconds_per_target: float) -> list[dict[str, object]]:
    """Run every target for `seconds_per_target` seconds, one after another; raise
    `FuzzUnavailable` (a RuntimeError) when cargo-fuzz or nightly Rust is missing."""
    _check_tools()
    return [run_target(t, seconds_per_target) for t in TARGETS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the cargo-fuzz targets of fuzz/.")
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds per target")
    ap.add_argument("--target", choices=TARGETS, action="append", help="only these targets")
    args = ap.parse_args(argv)
    try:
        _check_tools()
    except FuzzUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = [run_target(t, args.seconds) for t in (args.target or TARGETS)]
    for r in results:
        print(json.dumps(r))
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
