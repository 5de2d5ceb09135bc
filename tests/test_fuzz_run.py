"""benches/fuzz_run.py: libFuzzer log parsing and the error when cargo-fuzz is missing."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benches" / "fuzz_run.py"
_spec = importlib.util.spec_from_file_location("fuzz_run", _PATH)
assert _spec is not None and _spec.loader is not None
fuzz_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_run)

CLEAN = """\
#2	INITED cov: 10 ft: 10 corp: 1/1b exec/s: 0 rss: 30Mb
#4096	pulse  cov: 12 ft: 14 corp: 2/3b lim: 4 exec/s: 2048 rss: 31Mb
#28025922	DONE   cov: 398 ft: 838 corp: 152/32Kb lim: 4096 exec/s: 46632 rss: 517Mb
Done 28025922 runs in 601 second(s)
stat::number_of_executed_units: 28025922
stat::average_exec_per_sec:     46632
"""

CRASHED = """\
#4742122	REDUCE cov: 3286 ft: 9728 corp: 2782/717Kb lim: 4096 exec/s: 18669 rss: 516Mb
thread '<unnamed>' panicked at rust/core/src/fuzz_targets.rs:219:21:
==22451== ERROR: libFuzzer: deadly signal
artifact_prefix='/x/a/'; Test unit written to /x/a/crash-7d77
stat::number_of_executed_units: 4743223
"""


def test_parse_log_reads_final_stats() -> None:
    assert fuzz_run.parse_log(CLEAN) == (28025922, 0)
    assert fuzz_run.parse_log(CRASHED) == (4743223, 1)
    # A log cut short: the last progress line counts.
    assert fuzz_run.parse_log(CLEAN.split("Done")[0].replace("DONE", "NEW")) == (28025922, 0)
    assert fuzz_run.parse_log("") == (0, 0)


def test_missing_cargo_fuzz_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fuzz(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 101, "", "error: no such command: `fuzz`")

    monkeypatch.setattr(fuzz_run.subprocess, "run", no_fuzz)
    with pytest.raises(fuzz_run.FuzzUnavailable, match="cargo install cargo-fuzz"):
        fuzz_run.run_fuzz(1.0)
    monkeypatch.setattr(fuzz_run.shutil, "which", lambda _: None)
    with pytest.raises(RuntimeError, match="cargo is not on PATH"):
        fuzz_run.run_fuzz(1.0)
