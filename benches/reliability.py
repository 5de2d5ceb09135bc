"""Reliability benchmark: crash safety, corruption detection, fuzzing, concurrency and memory
limits of logitcache stores, measured and printed as one table.

Sections (each can be sized or skipped from the command line):

* crash: a writer in a subprocess (creating a store with ``mode="x"``, or appending to one
  with ``mode="a"``) is killed with SIGKILL at a random moment of its run. Then the store must
  open, ``verify`` must pass, every sample committed before the kill (the writer prints a line
  after each ``commit()`` returns) must read back bit for bit (lossless codec), and a resumed
  writer (``mode="a"``) must complete the store.
* corruption: one bit flipped, or the file truncated, at a random offset of one region of a
  shard or of the manifest. ``verify`` must report it, and every read that touches the damaged
  bytes must raise a ``StoreError`` (naming shard, chunk and sample where it is a chunk); reads
  of other samples either return bit-identical values or raise. A wrong value is a failure.
  Which samples a damaged byte touches comes from the footer (FORMAT.md section 3.3).
* fuzz: ``benches/fuzz_run.py`` when it exists (``run_fuzz(seconds_per_target)``); else the
  fuzz row says "not run".
* concurrency: a writer process appends shards (``mode="a"``) while readers (threads, and
  DataLoader workers started with fork and with spawn) reopen the store and read. Every
  snapshot must be one committed manifest (never a mix), every value bit-identical, a store
  opened before fork must keep working in the children, and a second writer must be refused.
* memory: a subprocess caps its address space (``RLIMIT_AS``, like ``ulimit -v``) below the
  store's size, then reads every sample and checks it.

Run ``python benches/reliability.py --help``. The pytest suite runs short versions of each
section (tests/test_reliability.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import logitcache as lc

BENCHES = str(Path(__file__).resolve().parent)

# ---------------------------------------------------------------------------------------------
# Deterministic records: any process can regenerate sample `sid` to check it bit for bit.


def make_record(
    sid: int, vocab: int, k: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids [L], topk_ids [L, K] (distinct per row), topk_logprobs [L, K] (a real
    log-softmax over K + 1 outcomes, sorted), all a function of ``sid`` alone."""
    rng = np.random.default_rng(sid)
    n = 8 + sid % 23 if length is None else length
    inp = rng.integers(0, vocab, size=n, dtype=np.int64)
    stride = max(1, vocab // k - 1)
    base = rng.integers(0, vocab, size=n, dtype=np.int64)
    ids = (base[:, None] + np.arange(k, dtype=np.int64)[None, :] * stride) % vocab
    x = rng.normal(size=(n, k + 1)) * 2.5
    logp = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
    lp = -np.sort(-logp, axis=1)[:, :k].astype(np.float32)
    lp = np.minimum.accumulate(lp, axis=1)
    return inp, ids, lp


def make_sampled_record(sid: int, vocab: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids [L], ids [L, M] and counts [L, M] (padded with -1 / 0) of n draws per row."""
    rng = np.random.default_rng(sid)
    length = 6 + sid % 17
    inp = rng.integers(0, vocab, size=length, dtype=np.int64)
    rows = [np.unique(rng.integers(0, 40, size=n) * 37 % vocab, return_counts=True)]
    rows += [
        np.unique(rng.integers(0, 40, size=n) * 37 % vocab, return_counts=True)
        for _ in range(length - 1)
    ]
    m = max(len(r[0]) for r in rows)
    ids = np.full((length, m), -1, dtype=np.int64)
    counts = np.zeros((length, m), dtype=np.int64)
    for i, (a, c) in enumerate(rows):
        ids[i, : len(a)] = a
        counts[i, : len(a)] = c
    return inp, ids, counts


def record_equal(rec: lc.Record, inp: np.ndarray, ids: np.ndarray, lp: np.ndarray) -> bool:
    """Whether a record read back is bit for bit the written top-K record (lossless codec)."""
    return (
        rec.input_ids.shape == inp.shape
        and np.array_equal(rec.input_ids, inp)
        and rec.topk_ids.shape == ids.shape
        and np.array_equal(rec.topk_ids, ids)
        and rec.topk_logprobs is not None
        and rec.topk_logprobs.shape == lp.shape
        and np.array_equal(rec.topk_logprobs.view(np.uint32), lp.view(np.uint32))
    )


def _write_store(
    path: Path, sids: range, *, vocab: int, k: int, mode: str = "x", **kw: Any
) -> None:
    with lc.StoreWriter(path, vocab_size=vocab, k=k, codec="lossless", mode=mode, **kw) as w:
        for sid in sids:
            w.add(sid, *make_record(sid, vocab, k))


def _orphans(path: Path) -> list[str]:
    try:
        return list(lc.verify_store(path)["orphans"])
    except (lc.StoreError, OSError):
        return []


# ---------------------------------------------------------------------------------------------
# 1. Crash safety

CRASH_V, CRASH_K = 5000, 8
CRASH_WRITER = r"""
import sys
sys.path.insert(0, {benches!r})
from reliability import make_record
import logitcache as lc

path, mode, first, count, every = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
print("ready", flush=True)
with lc.StoreWriter(path, vocab_size={V}, k={K}, codec="lossless", mode=mode,
                    chunk_positions=48, shard_size=6000) as w:
    for sid in range(first, first + count):
        w.add(sid, *make_record(sid, {V}, {K}))
        if (sid - first) % every == every - 1:
            w.commit()
            # One write per line: with PYTHONUNBUFFERED, print() writes "committed", " ",
            # the number and "\n" separately, and a kill between them left a bare
            # "committed" behind.
            sys.stdout.write(f"committed {{sid}}\n")
            sys.stdout.flush()
print("done", flush=True)
"""


@dataclass
class CrashResult:
    trials: int = 0
    committed_checked: int = 0
    lost: int = 0
    wrong: int = 0
    open_failures: int = 0
    verify_failures: int = 0
    resume_failures: int = 0
    killed_before_first_commit: int = 0
    killed_with_orphans: int = 0
    killed_with_temp_manifest: int = 0
    # The killed store with its manifest deleted, rebuilt from its shard files.
    rebuilt: int = 0
    rebuild_failures: int = 0
    rebuild_gained: int = 0  # samples of finished but uncommitted shards taken back
    problems: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return (
            self.lost
            + self.wrong
            + self.open_failures
            + self.verify_failures
            + self.resume_failures
            + self.rebuild_failures
        )


def _spawn_writer(path: Path, mode: str, first: int, count: int, every: int) -> subprocess.Popen:
    code = CRASH_WRITER.format(benches=BENCHES, V=CRASH_V, K=CRASH_K)
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path), mode, str(first), str(count), str(every)],
        stdout=subprocess.PIPE,
        text=True,
    )


def calibrate_writer(root: Path, count: int, every: int) -> float:
    """Seconds a writer takes from "ready" to "done" (the window in which kills land)."""
    path = root / "calibrate"
    proc = _spawn_writer(path, "x", 0, count, every)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    out, _ = proc.communicate(timeout=600)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or not out.rstrip().endswith("done"):
        raise RuntimeError(f"calibration writer failed (exit {proc.returncode}): {out[-500:]}")
    shutil.rmtree(path)
    return elapsed


def crash_trial(
    root: Path,
    kind: str,
    rng: random.Random,
    window: float,
    res: CrashResult,
    *,
    base: int = 20,
    count: int = 60,
    every: int = 3,
    base_store: Path | None = None,
) -> None:
    """One SIGKILL trial. ``kind`` is "create" (mode x on a fresh path) or "append" (mode a on
    a store holding samples ``[0, base)``, copied from ``base_store``)."""
    path = root / f"trial-{res.trials}"
    if kind == "append":
        assert base_store is not None
        shutil.copytree(base_store, path)
        first, promised = base, set(range(base))
    else:
        first, promised = 0, set()
    res.trials += 1
    proc = _spawn_writer(path, "x" if kind == "create" else "a", first, count, every)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("crash writer did not start")
    time.sleep(rng.uniform(0.0, window))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    # Only complete lines: text after the last newline was cut by the kill and is no promise
    # (the writer prints each line in one write, so this is a second guard).
    fields = [x.split() for x in out.split("\n")[:-1]]
    committed = [int(f[1]) for f in fields if len(f) == 2 and f[0] == "committed"]
    if committed:
        promised |= set(range(first, committed[-1] + 1))
    elif kind == "create":
        res.killed_before_first_commit += 1
    if any(name.startswith(".manifest.json.tmp-") for name in _listdir(path)):
        res.killed_with_temp_manifest += 1
    if _orphans(path):
        res.killed_with_orphans += 1
    res.committed_checked += len(promised)

    # The store as the kill left it.
    present: set[int] = set()
    if (path / "manifest.json").exists():
        try:
            store = lc.open_store(path)
        except lc.StoreError as e:
            res.open_failures += 1
            res.lost += len(promised)
            res.problems.append(f"trial {res.trials} ({kind}): open failed: {e}")
            return
        present = {int(s) for s in store.sample_ids()}
        for sid in present:
            if not record_equal(store[sid], *make_record(sid, CRASH_V, CRASH_K)):
                res.wrong += 1
                res.problems.append(f"trial {res.trials} ({kind}): sample {sid} differs")
        report = lc.verify_store(path)
        if not report["ok"]:
            res.verify_failures += 1
            res.problems.append(f"trial {res.trials} ({kind}): verify: {report['problems']}")
        del store
    missing = promised - present
    if missing:
        res.lost += len(missing)
        res.problems.append(
            f"trial {res.trials} ({kind}): {len(missing)} committed samples lost, "
            f"e.g. {sorted(missing)[:5]}"
        )

    rebuild_trial(path, promised, present, res, f"trial {res.trials} ({kind})")

    # Resume to completion in this process.
    total = range(first + count)
    try:
        with lc.StoreWriter(
            path, vocab_size=CRASH_V, k=CRASH_K, codec="lossless", mode="a", chunk_positions=48
        ) as w:
            for sid in total:
                if sid not in present:
                    w.add(sid, *make_record(sid, CRASH_V, CRASH_K))
        store = lc.open_store(path)
        ok = sorted(int(s) for s in store.sample_ids()) == list(total) and all(
            record_equal(store[sid], *make_record(sid, CRASH_V, CRASH_K)) for sid in total
        )
        ok = ok and lc.verify_store(path)["ok"]
    except lc.StoreError as e:
        ok = False
        res.problems.append(f"trial {res.trials} ({kind}): resume failed: {e}")
    if not ok:
        res.resume_failures += 1
        res.problems.append(f"trial {res.trials} ({kind}): resumed store incomplete or wrong")
    shutil.rmtree(path, ignore_errors=True)


def rebuild_trial(
    path: Path, promised: set[int], present: set[int], res: CrashResult, what: str
) -> None:
    """A copy of the killed store with its manifest deleted, rebuilt from its shard files:
    every committed sample is back, as written, and besides them only samples of shards the
    writer finished before it was killed."""
    if not path.exists():
        return
    copy = path.with_name(path.name + "-rebuilt")
    shutil.copytree(path, copy)
    try:
        (copy / "manifest.json").unlink(missing_ok=True)
        try:
            lc.rebuild_manifest(copy)
        except (lc.StoreError, FileNotFoundError) as e:
            # Nothing finished to rebuild from: right only if nothing was committed.
            if promised:
                res.rebuild_failures += 1
                res.problems.append(f"{what}: rebuild failed: {e}")
            return
        res.rebuilt += 1
        store = lc.open_store(copy)
        got = {int(s) for s in store.sample_ids()}
        if not promised <= got or not present <= got:
            res.rebuild_failures += 1
            res.problems.append(f"{what}: rebuilt store lacks {sorted(promised - got)[:5]}")
        res.rebuild_gained += len(got - present)
        wrong = [
            sid for sid in got if not record_equal(store[sid], *make_record(sid, CRASH_V, CRASH_K))
        ]
        if wrong:
            res.rebuild_failures += 1
            res.problems.append(f"{what}: rebuilt samples differ, e.g. {wrong[:5]}")
        del store
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def run_crash(
    root: Path,
    trials: int,
    *,
    seed: int = 0,
    count: int = 60,
    every: int = 3,
    progress: bool = True,
) -> dict[str, CrashResult]:
    """``trials`` SIGKILL trials, alternating create and append."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    base_store = root / "base"
    _write_store(base_store, range(20), vocab=CRASH_V, k=CRASH_K, chunk_positions=48)
    window = calibrate_writer(root, count, every)
    out = {"create": CrashResult(), "append": CrashResult()}
    for i in tqdm(range(trials), desc="crash trials", disable=not progress, leave=False):
        kind = "create" if i % 2 == 0 else "append"
        crash_trial(
            root, kind, rng, window, out[kind], count=count, every=every, base_store=base_store
        )
    return out


# ---------------------------------------------------------------------------------------------
# 2. Corruption detection

REGIONS = [
    "manifest",
    "shard header",
    "chunk directory",
    "chunk streams",
    "footer counts",
    "footer chunk table",
    "footer record table",
    "trailer",
]


@dataclass
class Span:
    """Bytes ``[start, end)`` of one file and the samples whose reads touch them."""

    file: str
    shard: int | None
    chunk: int | None
    start: int
    end: int
    touched: frozenset[int]


def shard_spans(rel: str, shard: int, data: bytes) -> dict[str, list[Span]]:
    """The regions of one shard file, from its trailer and footer (FORMAT.md 3.2-3.3, 4)."""
    size = len(data)
    footer_off, footer_len = struct.unpack_from("<QQ", data, size - 32)
    num_chunks, num_records, _ = struct.unpack_from("<QQQ", data, footer_off)
    table = footer_off + 24
    records_at = table + 32 * num_chunks
    sids = [struct.unpack_from("<Q", data, records_at + 12 * r)[0] for r in range(num_records)]
    everything = frozenset(sids)
    spans: dict[str, list[Span]] = {r: [] for r in REGIONS if r != "manifest"}

    def whole(region: str, a: int, b: int) -> None:
        spans[region].append(Span(rel, shard, None, a, b, everything))

    whole("shard header", 0, 64)
    for c in range(num_chunks):
        off, stored, _crc, first, nrec, _p, _e = struct.unpack_from(
            "<QIIIIII", data, table + 32 * c
        )
        touched = frozenset(sids[first : first + nrec])
        dir_end = off + 2 + 10 * data[off + 1]
        assert dir_end <= off + stored, "chunk directory longer than its chunk"
        spans["chunk directory"].append(Span(rel, shard, c, off, dir_end, touched))
        spans["chunk streams"].append(Span(rel, shard, c, dir_end, off + stored, touched))
    whole("footer counts", footer_off, table)
    whole("footer chunk table", table, records_at)
    whole("footer record table", records_at, footer_off + footer_len)
    whole("trailer", size - 32, size)
    return spans


@dataclass
class CorruptionCell:
    cases: int = 0
    verify_detected: int = 0
    reads_detected: int = 0
    wrong_values: int = 0
    unnamed_errors: int = 0
    problems: list[str] = field(default_factory=list)


def _build_corruption_stores(root: Path) -> list[Path]:
    """A top-K store (abs codec, 2 shards) and a sampled store (2 shards)."""
    topk = root / "topk"
    with lc.StoreWriter(topk, vocab_size=3000, k=8, chunk_positions=40, shard_size=2500) as w:
        for sid in range(24):
            inp, ids, lp = make_record(sid * 7 + 3, 3000, 8)
            w.add(sid * 7 + 3, inp, ids, lp)
    sampled = root / "sampled"
    with lc.StoreWriter(
        sampled, vocab_size=3000, k=12, kind="sampled", chunk_positions=40, shard_size=1500
    ) as w:
        for sid in range(24):
            w.add_sampled(sid + 1000, *make_sampled_record(sid, 3000, 12))
    for p in (topk, sampled):
        assert len(lc.open_store(p).meta["shards"]) >= 2
    return [topk, sampled]


def _snapshot(store: lc.Store) -> dict[int, tuple[np.ndarray, ...]]:
    out = {}
    for sid in store.sample_ids():
        r = store[int(sid)]
        arrays = [r.input_ids, r.topk_ids]
        if r.topk_logprobs is not None:
            arrays.append(r.topk_logprobs.view(np.uint32))
        if r.counts is not None:
            arrays.append(r.counts)
        out[int(sid)] = tuple(a.copy() for a in arrays)
    return out


def _same(rec: lc.Record, ref: tuple[np.ndarray, ...]) -> bool:
    arrays = [rec.input_ids, rec.topk_ids]
    if rec.topk_logprobs is not None:
        arrays.append(rec.topk_logprobs.view(np.uint32))
    if rec.counts is not None:
        arrays.append(rec.counts)
    return len(arrays) == len(ref) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(arrays, ref, strict=True)
    )


def _batch_rows_same(batch: lc.Batch, ref: dict[int, tuple[np.ndarray, ...]]) -> list[int]:
    """Sample ids whose row of a padded batch differs from the reference."""
    bad = []
    for i, sid in enumerate(batch.sample_ids.tolist()):
        n = int(batch.lengths[i])
        want = ref[sid]
        width = want[1].shape[1]
        got = [batch.input_ids[i, :n], batch.topk_ids[i, :n, :width]]
        if batch.topk_logprobs is not None:
            got.append(batch.topk_logprobs[i, :n, :width].view(np.uint32))
        if batch.counts is not None:
            got.append(batch.counts[i, :n, :width])
        if len(got) != len(want) or not all(
            np.array_equal(a, b) for a, b in zip(got, want, strict=True)
        ):
            bad.append(sid)
    return bad


def _names_place(msg: str, span: Span, sid: int | None) -> bool:
    if span.shard is None:
        return "manifest" in msg
    if f"shard {span.shard}" not in msg:
        return False
    if span.chunk is not None and sid is not None:
        return f"chunk {span.chunk}" in msg and f"sample {sid}" in msg
    return True


def corruption_case(
    work: Path,
    target: Path,
    pristine: bytes,
    damaged: bytes,
    span: Span,
    ref: dict[int, tuple[np.ndarray, ...]],
    mmap: bool,
    cell: CorruptionCell,
    label: str,
) -> None:
    """Apply one damage, check verify and every read, restore the file."""
    target.write_bytes(damaged)
    try:
        cell.cases += 1
        # verify
        try:
            report = lc.verify_store(work)
            if not report["ok"]:
                cell.verify_detected += 1
            else:
                cell.problems.append(f"{label}: verify reported nothing")
        except lc.StoreError:
            cell.verify_detected += 1
        # reads
        touched = span.touched
        missed: list[int] = []
        try:
            store = lc.open_store(work, mmap=mmap)
        except lc.StoreError as e:
            if not _names_place(str(e), span, None):
                cell.unnamed_errors += 1
                cell.problems.append(f"{label}: open error does not say where: {e}")
            cell.reads_detected += 1
            return
        except Exception as e:  # an untyped error is a failure, not a detection
            cell.problems.append(f"{label}: open raised {type(e).__name__}: {e}")
            return
        for sid in ref:
            try:
                rec = store[sid]
            except lc.StoreError as e:
                if sid in touched and not _names_place(str(e), span, sid):
                    cell.unnamed_errors += 1
                    cell.problems.append(f"{label}: error does not say where: {e}")
                continue
            except Exception as e:
                cell.problems.append(f"{label}: read {sid} raised {type(e).__name__}: {e}")
                missed.append(sid)
                continue
            if not _same(rec, ref[sid]):
                cell.wrong_values += 1
                cell.problems.append(f"{label}: sample {sid} read back a WRONG VALUE")
            elif sid in touched:
                missed.append(sid)
        try:
            batch = store.read_batch(list(ref))
        except lc.StoreError:
            pass
        except Exception as e:
            cell.problems.append(f"{label}: read_batch raised {type(e).__name__}: {e}")
            missed.append(-1)
        else:
            wrong = _batch_rows_same(batch, ref)
            if wrong:
                cell.wrong_values += 1
                cell.problems.append(f"{label}: read_batch returned WRONG VALUES for {wrong}")
            if touched & set(ref):
                missed.append(-1)
        del store
        if missed:
            cell.problems.append(f"{label}: reads of damaged samples {missed} did not raise")
        else:
            cell.reads_detected += 1
    finally:
        target.write_bytes(pristine)


def run_corruption(
    root: Path, cases_per_cell: int, *, seed: int = 0, progress: bool = True
) -> dict[tuple[str, str], CorruptionCell]:
    """``cases_per_cell`` cases for each (region, damage) with damage in {bit flip,
    truncation}, alternating between a top-K and a sampled store and between mmap and
    positioned reads."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stores = []
    for base in _build_corruption_stores(root):
        work = root / (base.name + "-work")
        shutil.copytree(base, work)
        store = lc.open_store(work)
        ref = _snapshot(store)
        files: dict[str, tuple[Path, bytes, dict[str, list[Span]]]] = {}
        mbytes = (work / "manifest.json").read_bytes()
        files["manifest.json"] = (
            work / "manifest.json",
            mbytes,
            {"manifest": [Span("manifest.json", None, None, 0, len(mbytes), frozenset(ref))]},
        )
        for i, s in enumerate(store.meta["shards"]):
            data = (work / s["file"]).read_bytes()
            files[s["file"]] = (work / s["file"], data, shard_spans(s["file"], i, data))
        del store
        stores.append((work, ref, files))
    cells: dict[tuple[str, str], CorruptionCell] = {}
    jobs = [(r, d) for r in REGIONS for d in ("bit flip", "truncation")]
    total = len(jobs) * cases_per_cell
    with tqdm(total=total, desc="corruption cases", disable=not progress, leave=False) as bar:
        for region, damage in jobs:
            cell = cells.setdefault((region, damage), CorruptionCell())
            for n in range(cases_per_cell):
                work, ref, files = stores[n % len(stores)]
                spans = [
                    (path, data, sp)
                    for path, data, regions in files.values()
                    for sp in regions.get(region, [])
                    if sp.end > sp.start
                ]
                weights = [sp.end - sp.start for _, _, sp in spans]
                path, data, span = rng.choices(spans, weights=weights)[0]
                at = rng.randrange(span.start, span.end)
                if damage == "bit flip":
                    bad = bytearray(data)
                    bit = rng.randrange(8)
                    bad[at] ^= 1 << bit
                    what = f"bit {bit} of byte {at}"
                else:
                    bad = bytearray(data[:at])
                    what = f"truncated at {at} of {len(data)}"
                    # Truncation removes every byte from `at` on: the trailer and footer too.
                    span = Span(span.file, span.shard, None, at, len(data), files_all(files, span))
                label = f"{work.name} {span.file} {region} {what}"
                corruption_case(
                    work, path, data, bytes(bad), span, ref, (n // 2) % 2 == 0, cell, label
                )
                bar.update()
    return cells


def files_all(
    files: dict[str, tuple[Path, bytes, dict[str, list[Span]]]], span: Span
) -> frozenset[int]:
    """Every sample of the file that ``span`` lies in."""
    out: set[int] = set()
    for regions in (files[span.file][2],):
        for spans in regions.values():
            for sp in spans:
                out |= sp.touched
    return frozenset(out)


# ---------------------------------------------------------------------------------------------
# 3. Fuzzing (benches/fuzz_run.py, by the fuzzing work; optional here)


def run_fuzz_section(seconds_per_target: float) -> list[dict[str, Any]] | None:
    """Rows from ``fuzz_run.run_fuzz`` or None when benches/fuzz_run.py does not exist."""
    if not (Path(BENCHES) / "fuzz_run.py").exists():
        return None
    if BENCHES not in sys.path:
        sys.path.insert(0, BENCHES)
    import fuzz_run  # type: ignore[import-not-found]

    return list(fuzz_run.run_fuzz(seconds_per_target))


# ---------------------------------------------------------------------------------------------
# 4. Concurrency

CONC_V, CONC_K = 4000, 8
APPENDER = r"""
import sys, time
sys.path.insert(0, {benches!r})
from reliability import make_record
import logitcache as lc

path, first, commits, per, pause = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5])
print("ready", flush=True)
with lc.StoreWriter(path, vocab_size={V}, k={K}, codec="lossless", mode="a",
                    chunk_positions=64) as w:
    print("locked", flush=True)
    sid = first
    for c in range(commits):
        for _ in range(per):
            w.add(sid, *make_record(sid, {V}, {K}))
            sid += 1
        w.commit()
        print("committed", sid - 1, flush=True)
        time.sleep(pause)
print("done", flush=True)
"""


@dataclass(frozen=True)
class Plan:
    """What a consistent snapshot looks like: ``base + j * per`` samples, ids ``0..n``."""

    path: str
    base: int
    per: int
    total: int


def check_snapshot(plan: Plan, seed: int, held: lc.Store | None = None) -> tuple[int, list[str]]:
    """Open the store afresh, check it is one committed state, read some samples bit for bit;
    also read from ``held`` (a store opened earlier, e.g. before fork). Returns (samples read,
    problems)."""
    rng = random.Random(seed)
    problems: list[str] = []
    reads = 0
    try:
        s = lc.open_store(plan.path)
    except lc.StoreError as e:
        return 0, [f"open during append failed: {e}"]
    n = len(s)
    ids = sorted(int(x) for x in s.sample_ids())
    if not (
        plan.base <= n <= plan.total
        and (n - plan.base) % plan.per == 0
        and ids == list(range(n))
        and s.meta["num_samples"] == n
        and sum(sh["num_samples"] for sh in s.meta["shards"]) == n
    ):
        problems.append(f"snapshot of {n} samples is not a committed state")
    picks = [n - 1, *(rng.randrange(n) for _ in range(3))] if n else []
    for sid in picks:
        reads += 1
        if not record_equal(s[sid], *make_record(sid, CONC_V, CONC_K)):
            problems.append(f"sample {sid} differs")
    if n:
        b = s.read_batch(picks)
        reads += len(picks)
        for i, sid in enumerate(picks):
            inp, ids_, lp = make_record(sid, CONC_V, CONC_K)
            m = len(inp)
            if not (
                int(b.lengths[i]) == m
                and np.array_equal(b.input_ids[i, :m], inp)
                and np.array_equal(b.topk_ids[i, :m], ids_)
                and b.topk_logprobs is not None
                and np.array_equal(b.topk_logprobs[i, :m].view(np.uint32), lp.view(np.uint32))
            ):
                problems.append(f"batch row of sample {sid} differs")
    if held is not None:
        hn = len(held)
        sid = rng.randrange(hn)
        reads += 1
        if not record_equal(held[sid], *make_record(sid, CONC_V, CONC_K)):
            problems.append(f"store opened earlier: sample {sid} differs")
    return reads, problems


class SnapshotDataset:
    """A map-style dataset whose items are snapshot checks (for DataLoader workers)."""

    def __init__(self, plan: Plan, held: lc.Store | None) -> None:
        self.plan = plan
        self.held = held

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> tuple[int, int, list[str]]:
        reads, problems = check_snapshot(self.plan, i, self.held)
        return os.getpid(), reads, problems


def _identity(x: Any) -> Any:
    return x


@dataclass
class ConcurrencyResult:
    runs: int = 0
    snapshots: int = 0
    reads: int = 0
    inconsistencies: int = 0
    second_writer_refused: int = 0
    second_writer_tries: int = 0
    reader_processes: int = 0
    problems: list[str] = field(default_factory=list)


def concurrency_run(
    root: Path,
    readers: str,
    res: ConcurrencyResult,
    *,
    base: int = 12,
    commits: int = 8,
    per: int = 3,
    pause: float = 0.05,
    workers: int = 2,
) -> None:
    """One run: an appender process commits ``commits`` times while ``readers`` ("threads",
    "fork" or "spawn" DataLoader workers) check snapshots."""
    path = root / f"conc-{readers}-{res.runs}"
    res.runs += 1
    _write_store(path, range(base), vocab=CONC_V, k=CONC_K, chunk_positions=64)
    plan = Plan(str(path), base, per, base + commits * per)
    held = lc.open_store(path)  # opened before any fork and before the appends
    problems: list[str] = []
    pids: set[int] = set()
    stop = threading.Event()

    def start_appender() -> subprocess.Popen:
        code = APPENDER.format(benches=BENCHES, V=CONC_V, K=CONC_K)
        args = [str(path), str(base), str(commits), str(per), str(pause)]
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        for expect in ("ready", "locked"):
            line = proc.stdout.readline().strip()
            if line != expect:
                raise RuntimeError(f"appender said {line!r}, expected {expect!r}")
        # A second writer must be refused while the first holds the store.
        res.second_writer_tries += 1
        try:
            w = lc.StoreWriter(path, vocab_size=CONC_V, k=CONC_K, mode="a")
        except lc.StoreLockedError:
            res.second_writer_refused += 1
        else:
            w.abort()
            problems.append("a second writer was allowed while the first held the store")
        return proc

    if readers == "threads":
        counts = [0, 0]
        lock = threading.Lock()

        def loop(t: int) -> None:
            i = 0
            while not stop.is_set():
                r, p = check_snapshot(plan, t * 10**6 + i, held)
                i += 1
                with lock:
                    counts[0] += 1
                    counts[1] += r
                    problems.extend(p)

        threads = [threading.Thread(target=loop, args=(t,)) for t in range(max(2, workers))]
        for t in threads:
            t.start()
        proc = start_appender()
        proc.communicate(timeout=600)
        time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        res.snapshots += counts[0]
        res.reads += counts[1]
    else:
        from torch.utils.data import DataLoader

        ds = SnapshotDataset(plan, held if readers == "fork" else None)
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context=readers,
            collate_fn=_identity,
            prefetch_factor=2,
        )
        it = iter(loader)
        first = next(it)  # workers are up
        items = [first]
        proc = start_appender()
        while proc.poll() is None:
            items.append(next(it))
        items.extend(next(it) for _ in range(2 * workers))
        del it
        proc.communicate(timeout=600)
        for pid, r, p in items:
            pids.add(pid)
            res.snapshots += 1
            res.reads += r
            problems.extend(p)
        res.reader_processes += len(pids - {os.getpid()})
    if proc.returncode != 0:
        problems.append(f"appender exited with {proc.returncode}")
    # The final state is complete and verified.
    final = lc.open_store(path)
    if sorted(int(x) for x in final.sample_ids()) != list(range(plan.total)):
        problems.append("final store is incomplete")
    if not lc.verify_store(path)["ok"]:
        problems.append("final store fails verify")
    res.inconsistencies += len(problems)
    res.problems.extend(f"{readers} run {res.runs}: {p}" for p in problems)
    shutil.rmtree(path, ignore_errors=True)


def run_concurrency(
    root: Path, runs_per_kind: int, *, progress: bool = True
) -> dict[str, ConcurrencyResult]:
    root.mkdir(parents=True, exist_ok=True)
    kinds = ["threads", "fork", "spawn"]
    out = {k: ConcurrencyResult() for k in kinds}
    jobs = [k for _ in range(runs_per_kind) for k in kinds]
    for kind in tqdm(jobs, desc="concurrency runs", disable=not progress, leave=False):
        concurrency_run(root, kind, out[kind])
    return out


# ---------------------------------------------------------------------------------------------
# 5. Memory: reading a store larger than the address-space cap

MEM_V, MEM_K, MEM_LEN = 50000, 64, 512
MEM_READER = r"""
import json, resource, sys
sys.path.insert(0, {benches!r})
import numpy as np
from reliability import make_record, record_equal, MEM_V, MEM_K, MEM_LEN
import logitcache as lc

path, cap_mib = sys.argv[1], int(sys.argv[2])
mmap = {{"auto": None, "1": True, "0": False}}[sys.argv[3]]
lc.set_num_threads(2)
store = None
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = vm("VmSize:")
limit = base + cap_mib * 2**20
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
out = {{"vm_before": base, "rss_before": vm("VmRSS:"), "reads": 0, "wrong": 0, "errors": []}}
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    store = lc.open_store(path, mmap=mmap)
    out["mapped_shards"] = store.mapped_shards
    out["shards"] = len(store.meta["shards"])
    sids = [int(s) for s in store.sample_ids()]
    for sid in sids:
        out["reads"] += 1
        if not record_equal(store[sid], *make_record(sid, MEM_V, MEM_K, MEM_LEN)):
            out["wrong"] += 1
    for i in range(0, len(sids), 8):
        b = store.read_batch(sids[i:i + 8])
        for j, sid in enumerate(sids[i:i + 8]):
            out["reads"] += 1
            inp, ids, lp = make_record(sid, MEM_V, MEM_K, MEM_LEN)
            if not (np.array_equal(b.input_ids[j], inp) and np.array_equal(b.topk_ids[j], ids)
                    and np.array_equal(b.topk_logprobs[j].view(np.uint32), lp.view(np.uint32))):
                out["wrong"] += 1
except Exception as e:
    out["errors"].append(f"{{type(e).__name__}}: {{e}}")
out["vm_after"] = vm("VmSize:")
out["rss_peak"] = vm("VmHWM:")
print(json.dumps(out), flush=True)
"""


def build_memory_store(path: Path, min_bytes: int, shard_size: int | str = "1GiB") -> int:
    """A lossless top-K store of at least ``min_bytes`` bytes. Returns its size."""
    with lc.StoreWriter(
        path, vocab_size=MEM_V, k=MEM_K, codec="lossless", shard_size=shard_size
    ) as w:
        sid = 0
        # Lossless, random ids: about 5.5 bytes per entry; stop once the estimate is passed.
        while sid * MEM_LEN * MEM_K * 4 < min_bytes:
            w.add(sid, *make_record(sid, MEM_V, MEM_K, MEM_LEN))
            sid += 1
    size = sum(s["bytes"] for s in lc.open_store(path).meta["shards"])
    if size < min_bytes:
        raise RuntimeError(f"memory store has {size} bytes, wanted {min_bytes}")
    return size


def memory_check(path: Path, cap_mib: int, mmap: str = "auto") -> dict[str, Any]:
    """Read every sample of the store at ``path`` in a subprocess whose address space is
    capped at its size at start-up + ``cap_mib`` MiB."""
    code = MEM_READER.format(benches=BENCHES)
    # zstd's C code allocates with glibc's malloc, which gives each thread that calls it its
    # own arena and reserves 64 MiB of address space for it: under a cap that is address
    # space, not memory, and which thread decodes first varies from run to run. One arena
    # is what docs/reliability.md tells capped processes to use.
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code, str(path), str(cap_mib), mmap],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        return {"errors": [f"reader exited with {r.returncode}: {r.stderr[-2000:]}"]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# The table


def _detected(c: CorruptionCell) -> str:
    return f"verify {_pct(c.verify_detected, c.cases)}; reads {_pct(c.reads_detected, c.cases)}"


def _corruption_failures(c: CorruptionCell) -> str:
    return f"wrong values {c.wrong_values}, errors not naming the place {c.unnamed_errors}"


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100.0 * a / b:.1f}%)" if b else "0/0"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Crash, corruption, fuzz, concurrency and memory-limit trials of "
        "logitcache stores; prints one table.",
    )
    ap.add_argument(
        "--crash-trials",
        type=int,
        default=200,
        help="SIGKILL trials, half create, half append (default 200)",
    )
    ap.add_argument(
        "--corruption-cases",
        type=int,
        default=200,
        help="cases per region and damage kind (default 200: 3200 in all)",
    )
    ap.add_argument(
        "--fuzz-seconds",
        type=float,
        default=60.0,
        help="seconds per fuzz target, if benches/fuzz_run.py exists (default 60)",
    )
    ap.add_argument(
        "--concurrency-runs",
        type=int,
        default=4,
        help="runs per reader kind: threads, fork, spawn (default 4)",
    )
    ap.add_argument(
        "--memory-mib",
        type=int,
        default=96,
        help="address-space cap above start-up for the memory check; the store is 1.5x "
        "larger (default 96)",
    )
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["crash", "corruption", "fuzz", "concurrency", "memory"],
        help="skip a section (repeatable)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)"
    )
    ap.add_argument(
        "--show-problems",
        type=int,
        default=10,
        help="print at most this many problem descriptions per section",
    )
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="lc-reliability-", dir=args.workdir))
    rows: list[tuple[str, str, str, str, str, str]] = []
    problems: list[str] = []
    t_start = time.perf_counter()
    try:
        if "crash" not in args.skip:
            t0 = time.perf_counter()
            crash = run_crash(tmp / "crash", args.crash_trials, seed=args.seed)
            dt = time.perf_counter() - t0
            for kind, r in crash.items():
                rows.append(
                    (
                        "crash (SIGKILL)",
                        f"{kind} ({'mode x' if kind == 'create' else 'mode a'})",
                        f"{r.trials} trials",
                        f"{r.committed_checked} committed samples checked",
                        f"lost {r.lost}, wrong {r.wrong}, open/verify/resume failures "
                        f"{r.open_failures}/{r.verify_failures}/{r.resume_failures}; "
                        f"manifest deleted and rebuilt {r.rebuilt}, failures "
                        f"{r.rebuild_failures}",
                        f"kills before 1st commit {r.killed_before_first_commit}, left "
                        f"orphan shards {r.killed_with_orphans}, left a temp manifest "
                        f"{r.killed_with_temp_manifest}; rebuilds took back "
                        f"{r.rebuild_gained} uncommitted samples",
                    )
                )
                problems += r.problems[: args.show_problems]
            rows[-1] = (*rows[-1][:5], rows[-1][5] + f"; {dt:.0f} s")
        if "corruption" not in args.skip:
            t0 = time.perf_counter()
            cells = run_corruption(tmp / "corruption", args.corruption_cases, seed=args.seed)
            dt = time.perf_counter() - t0
            tot = CorruptionCell()
            for (region, damage), c in cells.items():
                rows.append(
                    (
                        "corruption",
                        f"{region}, {damage}",
                        f"{c.cases} cases",
                        _detected(c),
                        _corruption_failures(c),
                        "",
                    )
                )
                tot.cases += c.cases
                tot.verify_detected += c.verify_detected
                tot.reads_detected += c.reads_detected
                tot.wrong_values += c.wrong_values
                tot.unnamed_errors += c.unnamed_errors
                problems += c.problems[: args.show_problems]
            rows.append(
                (
                    "corruption",
                    "all regions",
                    f"{tot.cases} cases",
                    _detected(tot),
                    _corruption_failures(tot),
                    f"{dt:.0f} s",
                )
            )
        if "fuzz" not in args.skip:
            fuzz = run_fuzz_section(args.fuzz_seconds)
            if fuzz is None:
                rows.append(
                    ("fuzz", "all targets", "not run", "-", "-", "benches/fuzz_run.py is absent")
                )
            else:
                for f in fuzz:
                    rows.append(
                        (
                            "fuzz",
                            str(f["target"]),
                            f"{f['execs']} execs",
                            "-",
                            f"crashes {f['crashes']}",
                            f"{args.fuzz_seconds:g} s",
                        )
                    )
        if "concurrency" not in args.skip:
            t0 = time.perf_counter()
            conc = run_concurrency(tmp / "concurrency", args.concurrency_runs)
            dt = time.perf_counter() - t0
            for kind, r in conc.items():
                what = {
                    "threads": "reader threads",
                    "fork": "DataLoader workers, fork",
                    "spawn": "DataLoader workers, spawn",
                }[kind]
                note = f"{r.snapshots} snapshots, {r.reads} samples read"
                if kind != "threads":
                    note += f", {r.reader_processes} worker processes"
                if kind == "fork":
                    note += " (store opened before fork read in each)"
                rows.append(
                    (
                        "concurrency",
                        f"{what} + appending writer",
                        f"{r.runs} runs",
                        f"second writer refused {r.second_writer_refused}/{r.second_writer_tries}",
                        f"inconsistencies {r.inconsistencies}",
                        note,
                    )
                )
                problems += r.problems[: args.show_problems]
            rows[-1] = (*rows[-1][:5], rows[-1][5] + f"; {dt:.0f} s")
        if "memory" not in args.skip:
            path = tmp / "memory"
            size = build_memory_store(
                path, int(args.memory_mib * 1.5 * 2**20), shard_size=f"{args.memory_mib // 3}MiB"
            )
            for mode in ("auto", "0"):
                m = memory_check(path, args.memory_mib, mode)
                bad = m.get("wrong", 0) + len(m.get("errors", []))
                rows.append(
                    (
                        "memory (RLIMIT_AS)",
                        f"store {size / 2**20:.0f} MiB in {args.memory_mib // 3} MiB shards, "
                        f"cap start-up + {args.memory_mib} MiB, "
                        f"mmap={'default' if mode == 'auto' else 'off'}",
                        f"{m.get('reads', 0)} reads",
                        f"shards mapped {m.get('mapped_shards')}/{m.get('shards')}",
                        f"wrong or failed {bad}",
                        f"peak RSS {m.get('rss_peak', 0) / 2**20:.0f} MiB "
                        f"({(m.get('rss_peak', 0) - m.get('rss_before', 0)) / 2**20:+.0f} MiB over "
                        f"start-up), address space "
                        f"{(m.get('vm_after', 0) - m.get('vm_before', 0)) / 2**20:+.0f} MiB",
                    )
                )
                problems += [f"memory ({mode}): {e}" for e in m.get("errors", [])]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    header = ("section", "case", "tried", "detected / checked", "failures (must be 0)", "notes")
    print()
    print(
        f"logitcache {lc.__version__} reliability, {platform.platform()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"{time.perf_counter() - t_start:.0f} s"
    )
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if problems:
        print("\nProblems:")
        for p in problems:
            print("  " + p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
