"""A Store pickles (DataLoader workers started with spawn or forkserver get the dataset
pickled): the copy reopens the same store, sees appends, and refuses a replaced store."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import make_topk

import logitcache as lc

V, K = 300, 8


def _write(path: Path, rng: np.random.Generator, sids: range, mode: str = "x") -> None:
    with lc.StoreWriter(path, vocab_size=V, k=K, mode=mode, chunk_positions=16) as w:
        for sid in sids:
            w.add(sid, *make_topk(rng, 10 + sid % 7, K, V))


def _read_in_child(store: lc.Store, sid: int) -> tuple[np.ndarray, np.ndarray, bool]:
    r = store[sid]
    return r.topk_ids, r.topk_logprobs, store.uses_mmap


def test_pickled_store_reads_the_same_records(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s"
    _write(path, rng, range(5))
    store = lc.open_store(path, mmap=False, cache_chunks=0)
    copy = pickle.loads(pickle.dumps(store))
    assert copy.path == store.path and len(copy) == len(store) == 5
    assert not copy.uses_mmap  # the options travel with it
    np.testing.assert_array_equal(copy.sample_ids(), store.sample_ids())
    for sid in range(5):
        a, b = store[sid], copy[sid]
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
    batch = copy.read_packed([4, 0, 2])
    np.testing.assert_array_equal(batch.topk_ids, store.read_packed([4, 0, 2]).topk_ids)


def test_store_sent_to_a_spawned_process(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s"
    _write(path, rng, range(3))
    store = lc.open_store(path)
    with mp.get_context("spawn").Pool(1) as pool:
        ids, lp, _ = pool.apply(_read_in_child, (store, 2))
    np.testing.assert_array_equal(ids, store[2].topk_ids)
    np.testing.assert_array_equal(lp, store[2].topk_logprobs)


def test_unpickled_store_sees_appends(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s"
    _write(path, rng, range(3))
    data = pickle.dumps(lc.open_store(path))
    _write(path, rng, range(3, 6), mode="a")
    copy = pickle.loads(data)
    assert len(copy) == 6 and 5 in copy


def test_unpickling_a_replaced_store_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "s"
    _write(path, rng, range(3))
    data = pickle.dumps(lc.open_store(path))
    _write(path, rng, range(3), mode="w")  # same sample ids, other data
    with pytest.raises(
        lc.StoreMismatchError, match="replaced or rewritten since this Store was pickled"
    ):
        pickle.loads(data)
