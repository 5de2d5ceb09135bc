"""Batch and record arrays reuse the memory of reads their user has let go (the store's
buffer pool): a batch or record still referenced is never written by a later read, a reused
array is written entirely (nothing of what it served before shows through), and the reuse
does happen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sampled, make_topk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitcache as lc

N_SAMPLES = 24


def _write(path: Path, kind: str, seed: int) -> dict[int, lc.Record]:
    rng = np.random.default_rng(seed)
    # Small chunks: records alone in their chunk (decoded straight into the batch) and
    # records sharing one (copied out of a decoded chunk) both occur.
    codec = {"codec": "lossless"} if kind == "sampled" else {}
    with lc.StoreWriter(path, vocab_size=300, k=6, kind=kind, chunk_positions=24, **codec) as w:
        for sid in range(N_SAMPLES):
            length = int(rng.integers(1, 30))
            if kind == "topk":
                w.add(sid, *make_topk(rng, length, 6, 300))
            else:
                w.add_sampled(sid, *make_sampled(rng, length, 6, 300))
    s = lc.open_store(path)
    return {sid: s[sid] for sid in range(N_SAMPLES)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for kind in ("topk", "sampled"):
        path = tmp_path_factory.mktemp("buffers") / kind
        out[kind] = (path, _write(path, kind, seed=7 if kind == "topk" else 8))
    return out


def _expected(recs: dict[int, lc.Record], sids: list[int], packed: bool, sampled: bool):
    """The batch arrays built from single records, padded as the Batch docstrings say."""
    lens = [len(recs[s]) for s in sids]
    width = max((recs[s].topk_ids.shape[1] for s in sids), default=0) if sampled else 6
    slots = lens if packed else [max(lens, default=0)] * len(sids)
    total = sum(slots)
    inp = np.zeros(total, np.int32)
    ids = np.full((total, width), -1 if sampled else 0, np.int32)
    lp = np.full((total, width), -np.inf, np.float32)
    counts = np.zeros((total, width), np.int32)
    at = 0
    for s, slot in zip(sids, slots, strict=True):
        r = recs[s]
        n, m = len(r), r.topk_ids.shape[1]
        inp[at : at + n] = r.input_ids
        ids[at : at + n, :m] = r.topk_ids
        lp[at : at + n, :m] = r.topk_logprobs
        if sampled:
            counts[at : at + n, :m] = r.counts
        at += slot
    if not packed:
        shape = (len(sids), slots[0] if slots else 0)
        inp, ids, lp, counts = (
            inp.reshape(shape),
            ids.reshape(*shape, width),
            lp.reshape(*shape, width),
            counts.reshape(*shape, width),
        )
    return inp, ids, lp, counts


def _arrays(b: lc.Batch | lc.PackedBatch | lc.Record) -> list[np.ndarray]:
    return [a for a in (b.input_ids, b.topk_ids, b.topk_logprobs, b.counts) if a is not None]


def _check(b, recs, sids, packed, sampled) -> None:
    inp, ids, lp, counts = _expected(recs, sids, packed, sampled)
    assert np.array_equal(b.input_ids, inp)
    assert np.array_equal(b.topk_ids, ids)
    assert np.array_equal(b.topk_logprobs, lp)
    if sampled:
        assert np.array_equal(b.counts, counts)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["topk", "sampled"]),
    steps=st.lists(
        st.tuples(
            st.lists(st.integers(0, N_SAMPLES - 1), min_size=1, max_size=6, unique=True),
            st.sampled_from(["padded", "packed", "record"]),  # record: store[first id]
            st.booleans(),  # keep this batch (else scribble on it and drop it)
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_reads_never_show_other_batches(stores, kind: str, steps) -> None:
    path, recs = stores[kind]
    sampled = kind == "sampled"
    s = lc.open_store(path, cache_chunks=2)
    kept = []

    def check(b, sids: list[int], mode: str) -> None:
        if mode == "record":
            want = recs[sids[0]]
            assert b.sample_id == want.sample_id
            for got, exp in zip(_arrays(b), _arrays(want), strict=True):
                assert np.array_equal(got, exp)
        else:
            _check(b, recs, sids, mode == "packed", sampled)

    for sids, mode, keep in steps:
        if mode == "record":
            b = s[sids[0]]
        else:
            b = s.read_packed(sids) if mode == "packed" else s.read_batch(sids)
        check(b, sids, mode)
        if keep:
            kept.append((b, sids, mode))
        else:
            for a in _arrays(b):
                a[...] = 77  # a user may write into a batch; the next user must not see it
            del b
        # Batches and records still held are untouched by the reads after them.
        for kb, ksids, kmode in kept:
            check(kb, ksids, kmode)


def test_released_batches_lend_their_memory_to_the_next(stores) -> None:
    path, recs = stores["topk"]
    s = lc.open_store(path)
    sids = list(range(8))
    b = s.read_batch(sids)
    pointers = {a.__array_interface__["data"][0] for a in _arrays(b)}
    assert all(a.flags.writeable and a.flags.c_contiguous for a in _arrays(b))
    del b
    b = s.read_batch(sids)
    assert {a.__array_interface__["data"][0] for a in _arrays(b)} == pointers
    _check(b, recs, sids, False, False)
    # A batch that is still referenced keeps its memory: the next read takes other memory.
    c = s.read_batch(sids)
    assert not pointers & {a.__array_interface__["data"][0] for a in _arrays(c)}
    _check(b, recs, sids, False, False)
    # Single records too (decoded alone or copied out of a shared chunk): read again once
    # released, a record's arrays come from memory released before (the pool takes the
    # smallest kept array that fits, not necessarily the record's own).
    released = pointers | {a.__array_interface__["data"][0] for a in _arrays(c)}
    del b, c
    for sid in range(N_SAMPLES):
        r = s[sid]
        released |= {a.__array_interface__["data"][0] for a in _arrays(r)}
        del r
        r = s[sid]
        assert {a.__array_interface__["data"][0] for a in _arrays(r)} <= released, sid
        for got, want in zip(_arrays(r), _arrays(recs[sid]), strict=True):
            assert np.array_equal(got, want)
        del r


def test_views_and_tensors_keep_the_memory_of_their_batch(stores) -> None:
    path, _ = stores["topk"]
    s = lc.open_store(path)
    b = s.read_packed([3, 4, 5])
    view = b.topk_logprobs[2:5]
    want = view.copy()
    base = np.asarray(b.topk_ids).reshape(-1)[:4]
    want_ids = base.copy()
    tensor = torch.from_numpy(b.input_ids)
    want_inputs = tensor.clone()
    del b
    for _ in range(3):
        c = s.read_packed([3, 4, 5])
        c.topk_logprobs[...] = 0.0
        c.topk_ids[...] = 0
        c.input_ids[...] = 0
        del c
    assert np.array_equal(view, want)
    assert np.array_equal(base, want_ids)
    assert torch.equal(tensor, want_inputs)
