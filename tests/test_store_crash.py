"""A writer killed with SIGKILL at a random moment leaves the last committed state: the store
opens, verifies, returns every committed sample bit for bit, and a resumed writer completes
it. Also: a killed writer's lock is released, and a reader opened before fork() works in the
child."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_topk

import logitcache as lc

V, K, N_SAMPLES = 3000, 16, 60

WRITER = r"""
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from conftest import make_topk
import logitcache as lc

path, mode = sys.argv[1], sys.argv[2]
w = lc.StoreWriter(path, vocab_size={V}, k={K}, mode=mode, chunk_positions=64,
                   shard_size=20000)
for sid in range({N}):
    if sid in w:  # resumed: committed before the last kill
        continue
    w.add(sid, *make_topk(np.random.default_rng(sid), 20 + sid % 17, {K}, {V}))
    if sid % 5 == 4:
        w.commit()
        print("committed", sid, flush=True)
w.close()
print("done", flush=True)
"""


def _expected(sid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_topk(np.random.default_rng(sid), 20 + sid % 17, K, V)


def _run_writer(path: Path, mode: str, kill_after: float | None) -> list[str]:
    code = WRITER.format(tests=str(Path(__file__).parent), V=V, K=K, N=N_SAMPLES)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    if kill_after is None:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        return out.splitlines()
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return out.splitlines()


def _check_committed(path: Path, lines: list[str]) -> set[int]:
    committed = [int(line.split()[1]) for line in lines if line.startswith("committed")]
    if not (path / "manifest.json").exists():
        # Killed before the first commit: no store, and nothing was promised.
        assert committed == []
        return set()
    store = lc.open_store(path)
    present = set(store.sample_ids().tolist())
    if committed:
        assert set(range(committed[-1] + 1)) <= present
    for sid in present:
        inp, ids, lp = _expected(sid)
        rec = store[sid]
        assert np.array_equal(rec.input_ids, inp)
        assert np.array_equal(rec.topk_ids, ids)
        assert np.all(np.abs(rec.topk_logprobs - lp) <= 5 * 2**-9)
    report = lc.verify_store(path)
    assert report["ok"], report["problems"]
    return present


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(4))
def test_sigkill_then_resume(tmp_path: Path, trial: int) -> None:
    rng = np.random.default_rng(trial)
    path = tmp_path / "s"
    # First run: create, killed somewhere between start-up and the end.
    lines = _run_writer(path, "x" if trial % 2 == 0 else "a", float(rng.uniform(0.3, 2.0)))
    _check_committed(path, lines)
    # Second run: append, killed again.
    lines = _run_writer(path, "a", float(rng.uniform(0.2, 1.0)))
    _check_committed(path, lines)
    # Resume to completion.
    _run_writer(path, "a", None)
    present = _check_committed(path, [])
    assert present == set(range(N_SAMPLES))


def test_lock_released_when_holder_dies(tmp_path: Path) -> None:
    path = tmp_path / "s"
    code = (
        "import sys, time, logitcache as lc\n"
        f"w = lc.StoreWriter({str(path)!r}, vocab_size=10, k=2)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    with pytest.raises(lc.StoreLockedError, match=f"pid {proc.pid}"):
        lc.StoreWriter(path, vocab_size=10, k=2, mode="a")
    proc.kill()
    proc.wait()
    # The dead writer never committed: "a" writes a new store in its directory (whatever
    # shards it finished would stay as orphans).
    with lc.StoreWriter(path, vocab_size=10, k=2, mode="a") as w:
        w.add(1, np.array([1]), np.array([[1, 2]]), np.array([[-1.0, -2.0]], np.float32))
    assert len(lc.open_store(path)) == 1


def _child_read(store: lc.Store, sid: int, q: mp.Queue) -> None:  # type: ignore[type-arg]
    rec = store[sid]
    batch = store.read_batch([sid, sid - 1])
    q.put((rec.topk_ids.tolist(), batch.topk_ids[0, : len(rec)].tolist(), os.getpid()))


@pytest.mark.skipif(sys.platform == "win32", reason="fork is POSIX")
def test_reader_opened_before_fork_works_in_child(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K) as w:
        for sid in range(8):
            w.add(sid, *make_topk(rng, 10, K, V))
    store = lc.open_store(tmp_path / "s")
    store.read_batch([0, 1])  # start the thread pool in the parent before forking
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child_read, args=(store, sid, q)) for sid in (3, 7)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for ids, batch_ids, pid in results:
        assert pid != os.getpid()
        assert ids == batch_ids
    assert {tuple(map(tuple, r[0])) for r in results} == {
        tuple(map(tuple, store[s].topk_ids.tolist())) for s in (3, 7)
    }


@pytest.mark.parametrize("after", [True, False])
@pytest.mark.parametrize("how", ["close", "with", "commit", "copy"])
def test_a_ctrl_c_as_the_commit_returns_says_whether_it_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, after: bool
) -> None:
    """Ctrl-C while the core commits is raised by Python once the commit returns: the
    KeyboardInterrupt then says that the commit is done, so that the caller does not take
    the store for unchanged; one that comes before the commit starts says nothing, and the
    store is as it was."""
    import logitcache.store as store_module

    src = tmp_path / "src"
    with lc.StoreWriter(src, vocab_size=100, k=4) as w:
        w.add(1, *make_topk(np.random.default_rng(0), 5, 4, 100))
    method = "commit" if how == "commit" else "close"

    class Interrupting(store_module._OneCallAtATime):
        __slots__ = ()

        def __getattr__(self, name: str) -> object:
            attr = super().__getattr__(name)
            if name != method:
                return attr

            def call(*args: object, **kwargs: object) -> object:
                if after:
                    attr(*args, **kwargs)
                raise KeyboardInterrupt

            return call

    monkeypatch.setattr(store_module, "_OneCallAtATime", Interrupting)
    dest = tmp_path / "dest"
    writer = None
    with pytest.raises(KeyboardInterrupt) as info:
        if how == "copy":
            lc.copy_store(src, dest)
        else:
            writer = lc.StoreWriter(dest, vocab_size=100, k=4)
            with writer if how == "with" else contextlib.nullcontext():
                writer.add(2, *make_topk(np.random.default_rng(1), 3, 4, 100))
                if how != "with":
                    getattr(writer, method)()
    notes = getattr(info.value, "__notes__", [])
    what = "the copy into" if how == "copy" else "the commit of"
    assert notes == (
        [f"logitcache: this came too late to stop {what} {dest}, which ran to its end"]
        if after and sys.version_info >= (3, 11)  # notes are new in 3.11
        else []
    )
    if writer is not None:
        writer.abort()
    committed = (dest / "manifest.json").exists()
    assert committed == after
    if committed:
        assert len(lc.open_store(dest)) == 1
