"""Short versions of benches/reliability.py (crash, power-loss ordering, corruption by region,
concurrency, memory limits): the same harness with small sizes, so CI keeps each check."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

import logitcache as lc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))

import reliability as rel


def test_bench_help() -> None:
    r = subprocess.run(
        [sys.executable, str(Path(rel.__file__)), "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "--crash-trials" in r.stdout and "--corruption-cases" in r.stdout


# --- 1. crash safety -------------------------------------------------------------------------


def test_sigkill_create_and_append(tmp_path: Path) -> None:
    res = rel.run_crash(tmp_path, 6, seed=1, count=30, progress=False)
    for kind, r in res.items():
        assert r.trials == 3, kind
        assert r.problems == [], r.problems
        assert r.bad == 0
    # Appends start from 20 committed samples: each trial checked at least those, and
    # rebuilt each killed store's manifest from its shards.
    assert res["append"].committed_checked >= 3 * 20
    assert res["append"].rebuilt == 3


STRACE_WRITER = r"""
import sys
import numpy as np
import logitcache as lc
path = sys.argv[1]
def rec(n):
    return (np.arange(n), np.tile(np.array([[3, 1]]), (n, 1)),
            np.tile(np.array([[-0.5, -2.0]], np.float32), (n, 1)))
with lc.StoreWriter(path, vocab_size=10, k=2, chunk_positions=4) as w:
    w.add(1, *rec(5))
    w.commit()
    w.add(2, *rec(3))
"""

_CALL = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<([^>]*)>)?")
_FD = re.compile(r"^(-?\d+)<([^>]*)>")
_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _strace_events(out: str) -> list[tuple[str, list[str], int, str | None]]:
    """(syscall, its string or fd-path arguments, result, path of a returned fd) per call,
    in order, with `<unfinished ...>` / `<... resumed>` halves joined."""
    pending: dict[str, str] = {}
    events = []
    for line in out.splitlines():
        m = re.match(r"^(?:\[pid\s+)?(\d+)\]?\s+(.*)$", line)
        if not m:
            continue
        pid, rest = m.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        r = re.match(r"^<\.\.\. \w+ resumed>(.*)$", rest)
        if r:
            rest = pending.pop(pid, "") + r.group(1)
        c = _CALL.match(f"{pid} {rest}")
        if not c:
            continue
        _, name, args, result, ret_path = c.groups()
        paths = [p for p in _STR.findall(args)]
        fd = _FD.match(args)
        if fd:
            paths.insert(0, fd.group(2))
        events.append((name, paths, int(result), ret_path))
    return events


def test_commit_fsyncs_before_and_after_rename(tmp_path: Path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail(
            "strace is not installed: this test traces the syscalls of a commit "
            "(apt-get install strace; scripts/test.sh installs it when run as root)"
        )
    store = tmp_path / "new" / "s"
    log = tmp_path / "trace.txt"
    r = subprocess.run(
        [
            strace,
            "-f",
            "-y",
            "-qq",
            "-s",
            "4096",
            "-o",
            str(log),
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2,openat,mkdir,mkdirat",
            sys.executable,
            "-c",
            STRACE_WRITER,
            str(store),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0 and "ptrace" in r.stderr:
        pytest.fail(f"strace cannot trace here (ptrace refused): {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert lc.verify_store(store)["ok"]
    events = _strace_events(log.read_text())
    synced = [(i, p[0]) for i, (n, p, res, _) in enumerate(events) if n in ("fsync", "fdatasync")]
    synced = [(i, p) for i, p in synced if events[i][2] == 0]
    renames = [
        (i, p[-2], p[-1])
        for i, (n, p, res, _) in enumerate(events)
        if n in ("rename", "renameat", "renameat2") and res == 0
    ]
    sdir, manifest = str(store), str(store / "manifest.json")
    assert len(renames) == 2, renames  # one per commit
    previous = -1
    for k, (i, src, dst) in enumerate(renames):
        assert dst == manifest and Path(src).name.startswith(".manifest.json.tmp-")
        # The new manifest is written, then fsynced, then renamed.
        opened = max(j for j, (n, p, res, ret) in enumerate(events[:i]) if ret == src)
        assert any(opened < j < i and p == src for j, p in synced), (
            f"rename {k}: {src} not fsynced before the rename"
        )
        # The directory holding the new name is fsynced after the rename, before the next one.
        end = renames[k + 1][0] if k + 1 < len(renames) else len(events)
        assert any(i < j < end and p == sdir for j, p in synced), (
            f"rename {k}: {sdir} not fsynced after the rename"
        )
        # Every shard created for this commit is fsynced, and so is shards/, before it.
        shards = [
            (j, ret)
            for j, (n, p, res, ret) in enumerate(events[:i])
            if n == "openat" and j > previous and ret and ret.endswith(".lcs")
        ]
        assert shards, f"commit {k} wrote no shard"
        for j, path in shards:
            assert any(j < jj < i and p == path for jj, p in synced), f"{path} not fsynced"
        last_shard = max(j for j, _ in shards)
        assert any(last_shard < j < i and p == sdir + "/shards" for j, p in synced)
        previous = i
    # The store directory and its new parent were created by the writer: their entries are
    # made durable by the first commit.
    first_end = renames[1][0]
    for d in (store.parent, store.parent.parent):
        assert any(j < first_end and p == str(d) for j, p in synced), f"{d} never fsynced"


# --- 2. corruption ---------------------------------------------------------------------------


def test_corruption_detected_in_every_region(tmp_path: Path) -> None:
    cells = rel.run_corruption(tmp_path, 20, seed=2, progress=False)
    assert {r for r, _ in cells} == set(rel.REGIONS)
    problems = [p for c in cells.values() for p in c.problems]
    assert problems == [], problems[:10]
    for (region, damage), c in cells.items():
        assert c.cases == 20
        assert c.verify_detected == c.cases, (region, damage)
        assert c.reads_detected == c.cases, (region, damage)
        assert c.wrong_values == 0 and c.unnamed_errors == 0


def test_regions_cover_the_shard_exactly(tmp_path: Path) -> None:
    """The harness's regions (read from the footer) tile every shard byte once."""
    topk, sampled = rel._build_corruption_stores(tmp_path)
    for path in (topk, sampled):
        store = lc.open_store(path)
        for i, s in enumerate(store.meta["shards"]):
            data = (path / s["file"]).read_bytes()
            spans = sorted(
                (sp.start, sp.end) for v in rel.shard_spans(s["file"], i, data).values() for sp in v
            )
            assert spans[0][0] == 0 and spans[-1][1] == len(data)
            assert all(a[1] == b[0] for a, b in pairwise(spans))


# --- 4. concurrency --------------------------------------------------------------------------


@pytest.mark.parametrize("readers", ["threads", "fork", "spawn"])
def test_readers_during_append(tmp_path: Path, readers: str) -> None:
    res = rel.ConcurrencyResult()
    rel.concurrency_run(tmp_path, readers, res, commits=5)
    assert res.problems == []
    assert res.inconsistencies == 0
    assert res.second_writer_refused == res.second_writer_tries == 1
    assert res.snapshots >= 3
    if readers != "threads":
        assert res.reader_processes == 2


# --- 5. memory limits ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Two copies of one 48+ MiB store: one shard, and 12 MiB shards."""
    root = tmp_path_factory.mktemp("mem")
    one = root / "one"
    size = rel.build_memory_store(one, 48 * 2**20)
    many = root / "many"
    store = lc.open_store(one)
    with lc.StoreWriter(
        many, vocab_size=rel.MEM_V, k=rel.MEM_K, codec="lossless", shard_size="12MiB"
    ) as w:
        for sid in store.sample_ids():
            r = store[int(sid)]
            w.add(int(sid), r.input_ids, r.topk_ids, r.topk_logprobs)
    return {"one shard": (one, size), "12 MiB shards": (many, size)}


@pytest.mark.parametrize("layout", ["one shard", "12 MiB shards"])
def test_store_larger_than_address_space_cap(
    big_stores: dict[str, tuple[Path, int]], layout: str
) -> None:
    """Address space capped at start-up + 32 MiB, a 48 MiB store: the shards are not mapped
    (the map would take what the heap needs) and every read is right."""
    path, size = big_stores[layout]
    cap_mib = 32
    assert size > 1.4 * cap_mib * 2**20
    out = rel.memory_check(path, cap_mib)
    assert out["errors"] == [], out
    n = len(lc.open_store(path))
    assert out["reads"] == 2 * n and out["wrong"] == 0
    assert out["mapped_shards"] == 0


def test_maps_only_within_the_address_space_budget(big_stores: dict[str, tuple[Path, int]]) -> None:
    """With room for 30 MiB of maps beyond the 256 MiB kept for the heap, two 12 MiB shards (and
    perhaps the small last one) are mapped, the others read with positioned reads; all reads are
    right."""
    path, _ = big_stores["12 MiB shards"]
    out = rel.memory_check(path, 256 + 2 * 30)
    assert out["errors"] == [], out
    assert out["wrong"] == 0 and out["reads"] == 2 * len(lc.open_store(path))
    assert 2 <= out["mapped_shards"] < out["shards"], out
