"""`remove_samples` / `logitcache remove`: samples taken out of a store in place; what is left
reads back as before (bit for bit where its chunk was untouched or the codec is lossless,
within the codec's bound otherwise), in the same order, and a removal that is refused, fails
or is killed leaves the store as it was."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    make_topk,
    make_undeletable,
    position_kl,
    progress_into_core,
    store_contents,
    store_files,
    write_store,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitcache as lc
from logitcache.cli import main

# Exception notes (add_note) are new in Python 3.11.
NOTES = sys.version_info >= (3, 11)


def _write(
    path: Path,
    sample_ids: list[int],
    *,
    kind: str = "topk",
    length: Callable[[int], int] = lambda sid: sid % 11,  # some records of no position
    **kwargs: object,
) -> None:
    write_store(
        path,
        sample_ids,
        length,
        kind=kind,
        k=4 if kind == "topk" else 5,
        vocab=200,
        chunk_positions=12,
        shard_size=900,
        **kwargs,
    )


def _same_record(
    codec: dict[str, object], a: tuple[tuple[str, tuple[int, ...], bytes], ...], b: tuple
) -> None:
    """``b`` (after) is ``a`` (before) as the codec allows: ids, input ids and counts exact,
    log-probabilities bit for bit (lossless), within the step's half (abs) or the KL bound
    per position (kl)."""
    assert a[:2] == b[:2] and a[3:] == b[3:]
    if codec["logprobs"] in ("lossless", "none") or a[2] == b[2]:
        assert a[2] == b[2]
        return
    (dt, shape, x), (_, _, y) = a[2], b[2]
    before = np.frombuffer(x, dtype=dt).reshape(shape)
    after = np.frombuffer(y, dtype=dt).reshape(shape)
    assert np.array_equal(np.isinf(before), np.isinf(after))
    if codec["logprobs"] == "abs":
        live = np.isfinite(before)
        assert np.abs(before[live] - after[live]).max() <= float(codec["max_abs_error"])  # type: ignore[arg-type]
    else:
        for p_row, q_row in zip(before, after, strict=True):
            assert position_kl(p_row, q_row) <= float(codec["kl_bound"]) * (1 + 1e-6) + 1e-12  # type: ignore[arg-type]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind_codec=st.sampled_from(
        [
            ("topk", "lossless"),
            ("topk", "abs:0.01"),
            ("topk", "kl:1e-3"),
            ("sampled", "abs:0.01"),
            ("sampled", "lossless"),
            ("sampled", "none"),
        ]
    ),
    ids=st.lists(st.integers(0, 10**12), min_size=1, max_size=40, unique=True),
    data=st.data(),
)
def test_what_is_left_reads_back_as_before(
    tmp_path_factory: pytest.TempPathFactory,
    kind_codec: tuple[str, str],
    ids: list[int],
    data: st.DataObject,
) -> None:
    kind, codec = kind_codec
    path = tmp_path_factory.mktemp("remove") / "s"
    _write(path, ids, kind=kind, codec=codec, seed=len(ids))
    before = store_contents(path)
    meta = lc.open_store(path).meta
    gone = data.draw(st.lists(st.sampled_from(ids), unique=True, max_size=len(ids)))
    report = lc.remove_samples(path, gone)
    assert report["samples_removed"] == len(gone) and report["committed"] == bool(gone)
    store = lc.open_store(path)
    assert list(store.sample_ids()) == [s for s in ids if s not in gone], "order kept"
    assert report["num_samples"] == len(store) and report["num_positions"] == store.num_positions
    after = store_contents(path)
    for sid, rec in after.items():
        _same_record(meta["codec"], before[sid], rec)
    check = lc.verify_store(path)
    assert check["ok"] and not check["orphans"], check
    assert report["bytes_after"] == sum(s["bytes"] for s in store.meta["shards"])


def test_untouched_chunks_keep_their_bytes(tmp_path: Path) -> None:
    """A kl store (encoding its decoded values again moves 39 of these 60 records): records
    of chunks that held no removed sample are bit for bit what they were; only those that
    shared a chunk with a removed one may move (within the bound: the test above)."""
    ids = list(range(60))
    _write(tmp_path / "s", ids, codec="kl:1e-3", length=lambda sid: 1 + sid % 11)
    before = store_contents(tmp_path / "s")
    report = lc.remove_samples(tmp_path / "s", [5, 6, 40])
    rewritten = [s for s in report["shards"] if s["new_file"]]
    assert rewritten and all(s["chunks_copied"] >= 1 for s in rewritten), report
    after = store_contents(tmp_path / "s")
    changed = {sid for sid in after if after[sid] != before[sid]}
    assert changed, "the shared chunks were encoded again"
    # Records of 1-11 positions in chunks closed at 12: a removed record shares its chunk with
    # at most a few neighbours, which are the only records that may change.
    assert changed <= {3, 4, 7, 8, 38, 39, 41, 42}, changed


def test_refusals_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _write(path, list(range(20)))
    files = store_files(path)
    with pytest.raises(lc.MissingSampleError, match="sample id 77 is not in the store"):
        lc.remove_samples(path, [3, 99, 77])
    with pytest.raises(KeyError):  # MissingSampleError is a KeyError, as for store[sid]
        lc.remove_samples(path, [1000])
    assert store_files(path) == files
    report = lc.remove_samples(path, {99, 77}, missing_ok=True)
    assert list(report["missing_ids"]) == [77, 99] and not report["committed"]
    assert store_files(path) == files
    plan = lc.remove_samples(path, range(5), dry_run=True)
    assert plan["samples_removed"] == 5 and not plan["committed"]
    assert store_files(path) == files
    for bad in ([-1], [[1, 2]], ["a"], [1.5]):
        with pytest.raises((ValueError, TypeError)):
            lc.remove_samples(path, bad)  # type: ignore[arg-type]
    with lc.StoreWriter(path, vocab_size=200, k=4, mode="a"):
        with pytest.raises(lc.StoreLockedError):
            lc.remove_samples(path, [3])
    assert store_files(path) == files
    # A damaged chunk in a shard to rewrite is not carried into a new shard.
    shard = path / lc.open_store(path).meta["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[80] ^= 0x10
    shard.write_bytes(bytes(raw))
    files = store_files(path)
    with pytest.raises(lc.CorruptStoreError, match="checksum"):
        lc.remove_samples(path, [0])
    assert store_files(path) == files


def test_ids_in_any_form_and_everything(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _write(path, list(range(30)))
    lc.remove_samples(path, np.array([1, 2], dtype=np.int32))
    lc.remove_samples(path, (i for i in (3, 4)))
    lc.remove_samples(path, frozenset({5}))
    lc.remove_samples(path, {6: "a", 7: "b"}.keys())
    with pytest.raises(ValueError, match="got the single id 8"):
        lc.remove_samples(path, 8)  # type: ignore[arg-type]
    assert sorted(store_contents(path)) == [0, *range(8, 30)]
    report = lc.remove_samples(path, lc.open_store(path).sample_ids())
    assert report["num_samples"] == 0 and report["bytes_after"] == 0
    assert len(lc.open_store(path)) == 0 and lc.verify_store(path)["ok"]
    assert not list((path / "shards").iterdir()), "the old shard files are deleted"


def test_a_merged_store_keeps_shards_it_shares(tmp_path: Path) -> None:
    """Removing from a store whose shards are hard links into another store (merge) deletes
    this store's names only: the other store keeps reading its samples."""
    _write(tmp_path / "a", list(range(10)))
    lc.merge_stores(tmp_path / "m", [tmp_path / "a"])
    want = store_contents(tmp_path / "a")
    lc.remove_samples(tmp_path / "m", [1, 2, 3])
    assert store_contents(tmp_path / "a") == want
    assert lc.verify_store(tmp_path / "a")["ok"]
    assert sorted(store_contents(tmp_path / "m")) == [0, *range(4, 10)]


def test_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "s", list(range(40)))
    lc.remove_samples(tmp_path / "s", [0, 39], progress=True)
    err = capsys.readouterr().err
    assert "remove" in err and "100%" in err, err


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s"
    _write(path, list(range(30)))
    files = store_files(path)
    assert main(["remove", str(path), "3", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN, nothing changed: 2 sample(s)" in out and "would be removed" in out, out
    assert "would hold 28 samples, at most " in out, out  # a plan knows no rewritten size
    assert "shards to rewrite counted at their present size" in out, out
    assert store_files(path) == files
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# contaminated\n5\n\n6  # dup of 5\n")
    assert main(["remove", str(path), "3", "--ids", str(ids_file), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "REMOVED: 3 sample(s)" in out and "now holds 27 samples" in out, out
    assert main(["remove", str(path), "3", "1000", "1001"]) == 2
    err = capsys.readouterr().err
    assert f"remove: sample id 3 is not in the store {path} (nor are 2 more)\n" in err, err
    assert "--missing-ok" in err
    assert main(["remove", str(path), "3", "7", "--missing-ok", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["missing_ids"] == [3] and report["samples_removed"] == 1
    assert main(["remove", str(path)]) == 2
    assert "no sample id to remove" in capsys.readouterr().err
    assert sorted(store_contents(path)) == [0, 1, 2, 4, *range(8, 30)]


def test_old_shard_files_that_cannot_be_deleted_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removal that commits and then cannot delete an old shard file (here a directory
    stands at its name, which unlink refuses even to root) reports the file and the error:
    its bytes still hold the removed samples. The CLI lists it, points to clean and exits
    1; clean deletes the file once it can."""
    path = tmp_path / "s"
    _write(path, list(range(30)))
    blocked: list[str] = []

    def block_deletion(done: int, total: int) -> None:
        # Called as the removal rewrites the old shard, which it has open (mapped) by then.
        victim = path / blocked[-1]
        if victim.is_file():
            make_undeletable(victim)

    progress_into_core(monkeypatch, "remove_samples", block_deletion)
    blocked.append(lc.remove_samples(path, [3], dry_run=True)["shards"][0]["file"])
    with pytest.warns(RuntimeWarning, match=r"could not delete 1 old shard file\(s\), which") as w:
        report = lc.remove_samples(path, [3])
    assert w[0].filename == __file__  # the call, not the library
    assert report["committed"] and report["samples_removed"] == 1
    [left] = report["left_behind"]
    assert left["file"] == blocked[-1] and "Is a directory" in left["error"], left
    assert 3 not in store_contents(path) and lc.verify_store(path)["ok"]

    blocked.append(lc.remove_samples(path, [4], dry_run=True)["shards"][0]["file"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command says it itself, not as a warning too
        assert main(["remove", str(path), "4"]) == 1
    captured = capsys.readouterr()
    assert "REMOVED: 1 sample(s)" in captured.out
    assert f"could not delete old shard file {blocked[-1]}: " in captured.err, captured.err
    assert f"still holds removed samples: once the cause is fixed, logitcache clean {path}" in (
        captured.err
    )
    assert main(["remove", str(path), "5", "--json"]) == 0  # nothing blocked this time
    assert json.loads(capsys.readouterr().out)["left_behind"] == []

    for name in blocked:
        (path / name).rmdir()
    before = store_contents(path)
    assert sorted(before) == [0, 1, 2, *range(6, 30)]
    lc.clean_store(path)
    assert lc.verify_store(path)["orphans"] == [] and store_contents(path) == before


# The core's removal with a progress callback that kills the process at its first call (calls
# come at most every 100 ms): after the first chunk of the first new shard.
KILLED_REMOVE = r"""
import os, signal, sys
import numpy as np
from logitcache import _core

def die(done, total):
    os.kill(os.getpid(), signal.SIGKILL)

ids = np.array([int(x) for x in sys.argv[2:]], dtype=np.uint64)
_core.remove_samples(sys.argv[1], ids, progress=die)
"""


def test_a_killed_removal_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _write(path, list(range(80)), codec="lossless")
    before = store_contents(path)
    gone = [str(s) for s in range(0, 80, 7)]
    proc = subprocess.run([sys.executable, "-c", KILLED_REMOVE, str(path), *gone], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert store_contents(path) == before
    report = lc.verify_store(path)
    assert report["ok"] and report["orphans"], report
    lc.remove_samples(path, [int(s) for s in gone])
    assert store_contents(path) == {s: r for s, r in before.items() if str(s) not in gone}


@pytest.mark.parametrize("mmap", [True, False])
def test_an_open_store_keeps_its_view(tmp_path: Path, mmap: bool) -> None:
    """A reader that had the store open before the removal keeps reading what it saw (its maps
    or open files of the deleted shard files); one opened after sees the removal."""
    path = tmp_path / "s"
    _write(path, list(range(30)))
    before = store_contents(path)
    old = lc.open_store(path, mmap=mmap)
    lc.remove_samples(path, [4, 17])
    assert 4 in old and 4 not in lc.open_store(path)
    for sid in (4, 17, 5):
        r = old[sid]
        assert r.input_ids.tobytes() == before[sid][0][2]
    assert len(old.read_packed([4, 17, 5]).offsets) == 4


# Ctrl-C in the middle of a removal, a merge and a verification: a progress callback that
# sends SIGINT to its own process at its first call, from the core's thread; Python's
# handler runs on the main thread, which looks for it every 50 ms while the core works (the
# callback waits for that: these stores take less time than that to go through).
INTERRUPTED = r"""
import os, signal, sys, time
import numpy as np
from logitcache import _core

def ctrl_c(done, total):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.3)

what, path, other = sys.argv[1:]
try:
    if what == "remove":
        ids = np.arange(0, 80, 3, dtype=np.uint64)
        _core.remove_samples(path, ids, progress=ctrl_c)
    elif what == "merge":
        _core.merge(other, [path], copy=True, progress=ctrl_c)
    else:
        _core.verify(path, progress=ctrl_c)
except KeyboardInterrupt:
    print("interrupted")
"""


@pytest.mark.parametrize("what", ["remove", "merge", "verify"])
def test_ctrl_c_stops_the_work_with_nothing_changed(tmp_path: Path, what: str) -> None:
    path = tmp_path / "s"
    _write(path, list(range(80)), codec="lossless")
    files = store_files(path)
    argv = [sys.executable, "-c", INTERRUPTED, what, str(path), str(tmp_path / "m")]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "interrupted", (proc.stdout, proc.stderr)
    assert store_files(path) == files
    assert not (tmp_path / "m").exists()
    assert lc.verify_store(path)["ok"]


def test_a_failing_progress_callback_stops_the_removal(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _write(path, list(range(40)))
    files = store_files(path)

    def fail(done: int, total: int) -> None:
        raise RuntimeError("from the callback")

    with pytest.raises(RuntimeError, match="from the callback"):
        lc._core.remove_samples(path, np.arange(0, 40, 5, dtype=np.uint64), progress=fail)
    assert store_files(path) == files


def _failing_at_the_nth_end(n: int) -> Callable[[int, int], None]:
    """A progress callback that raises at its n-th call that reports all done."""
    ends = 0

    def progress(done: int, total: int) -> None:
        nonlocal ends
        ends += done >= total
        if ends == n and done >= total:
            raise RuntimeError("from the callback")

    return progress


def _long_op(op: str, path: Path, target: Path, progress: Callable[[int, int], None]) -> object:
    if op == "remove":
        ids = np.arange(0, 40, 5, dtype=np.uint64)
        return lc._core.remove_samples(str(path), ids, progress=progress)
    if op == "merge":
        return lc._core.merge(str(target), [str(path)], progress=progress)
    if op == "repair":
        return lc._core.repair(str(path), progress=progress)
    return lc._core.rebuild_manifest(str(path), progress=progress)


@pytest.mark.parametrize("op", ["remove", "merge", "repair", "rebuild"])
def test_an_exception_too_late_to_stop_the_work_says_it_is_done(tmp_path: Path, op: str) -> None:
    """A callback's exception that comes after the work's last check cannot stop it: it is
    still raised, and carries a note (Python 3.11+) that the change stands exactly when it
    does, so that the caller does not take the store for unchanged. The callback fails at
    its n-th call that reports all done, for every n until the work runs without one: only a
    removal calls it after its commit (merge, repair and rebuild check for a stop after
    their last call, so there the note must never come; a Ctrl-C during their commit takes
    the way of the test below)."""
    named = {"remove": "removal"}.get(op, op)
    seen_done = False
    for n in range(1, 10):
        path = tmp_path / str(n) / "s"
        _write(path, list(range(40)))
        if op == "repair":
            shard = sorted((path / "shards").iterdir())[0]
            data = bytearray(shard.read_bytes())
            data[100] ^= 0xFF  # in its first chunk
            shard.write_bytes(bytes(data))
        elif op == "rebuild":
            (path / "manifest.json").unlink()
        target = tmp_path / str(n) / "m" if op == "merge" else path
        before = store_files(target) if target.exists() else None
        try:
            _long_op(op, path, target, _failing_at_the_nth_end(n))
        except RuntimeError as e:
            changed = (store_files(target) if target.exists() else None) != before
            notes = getattr(e, "__notes__", [])
            too_late = any(f"too late to stop the {named}" in x for x in notes)
            assert too_late == (changed and NOTES), (n, changed, notes)
            if too_late:
                assert f"what it changed in {target} stands" in notes[0]
                seen_done = True
        else:
            assert n > 1
            break
    assert seen_done or op != "remove"


# A Ctrl-C that comes after the removal's commit, from its progress call after it: the
# main thread takes it as the core returns, and the KeyboardInterrupt says the work is done.
LATE_CTRL_C = r"""
import os, signal, sys
import numpy as np
from logitcache import _core

ends = 0

def ctrl_c_after_the_commit(done, total):
    global ends
    ends += done >= total
    if ends == 2:
        os.kill(os.getpid(), signal.SIGINT)

try:
    ids = np.arange(0, 80, 3, dtype=np.uint64)
    _core.remove_samples(sys.argv[1], ids, progress=ctrl_c_after_the_commit)
    print("no interrupt")
except KeyboardInterrupt as e:
    print("interrupted:", *getattr(e, "__notes__", []))
"""


def test_a_ctrl_c_after_the_commit_says_the_work_is_done(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _write(path, list(range(80)))
    argv = [sys.executable, "-c", LATE_CTRL_C, str(path)]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("interrupted:"), (proc.stdout, proc.stderr)
    note = f"too late to stop the removal, which ran to its end: what it changed in {path} stands"
    assert (note in proc.stdout) == NOTES, proc.stdout
    assert 3 not in lc.open_store(path) and 4 in lc.open_store(path)


def test_cli_reports_an_interruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "s", [1, 2])

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lc, "remove_samples", interrupted)
    assert main(["remove", str(tmp_path / "s"), "1"]) == 130
    assert "interrupted; nothing was changed" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["remove", "copy", "merge", "repair"])
def test_cli_reports_an_interruption_that_came_after_the_commit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    """A Ctrl-C that comes as the work commits is raised once the commit is done (Python
    runs its handler after the call returns): the command says the work is done, not that
    nothing changed."""
    _write(tmp_path / "s", [1, 2, 3])
    _write(tmp_path / "t", [7], seed=1)
    s, t, new = str(tmp_path / "s"), str(tmp_path / "t"), str(tmp_path / "new")
    real = {
        "remove": ("remove_samples", ["remove", s, "1"], s),
        "copy": ("copy_store", ["copy", s, new], new),
        "merge": ("merge_stores", ["merge", new, s, t], new),
        "repair": ("repair_store", ["repair", s], s),
    }
    name, argv, target = real[command]
    done = getattr(lc, name)

    def commit_then_interrupt(*args: Any, **kwargs: Any) -> object:
        done(*args, **kwargs)
        if command == "repair":
            # A sound store is not committed again; a commit of one is the same to the CLI.
            with lc.StoreWriter(s, vocab_size=200, k=4, mode="a") as w:
                w.add(50, *make_topk(np.random.default_rng(0), 2, 4, 200))
        raise KeyboardInterrupt

    monkeypatch.setattr(lc, name, commit_then_interrupt)
    assert main([*argv, "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted too late to stop it: {target} was committed" in err, err
    assert "nothing was changed" not in err, err
    # Not committed: nothing changed, as before.
    monkeypatch.setattr(lc, name, lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    dry = ["--dry-run"] if command in ("remove", "repair", "merge") else []
    argv = argv if command != "copy" else ["copy", s, str(tmp_path / "other")]
    assert main([*argv, *dry, "--no-progress"]) == 130
    assert "interrupted; nothing was changed" in capsys.readouterr().err


def test_cli_clean_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "s", [1])

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lc, "clean_store", interrupted)
    assert main(["clean", str(tmp_path / "s")]) == 130
    assert "files may have been deleted" in capsys.readouterr().err
    assert main(["clean", "--dry-run", str(tmp_path / "s")]) == 130
    assert "interrupted; nothing was changed" in capsys.readouterr().err
