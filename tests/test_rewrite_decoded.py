"""A store's own output can be written again: every decoded record of a lossy store is a
valid record for a new store (its rows may hold a little more than probability 1: the codec
rounds each value to within its bound, and rows of tied values round together)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import logitcache as lc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
from synthetic import generate


@pytest.mark.parametrize("codec", ["abs:0.01", "abs:0.001", "kl:1e-3", "lossless"])
def test_decoded_records_can_be_written_again(tmp_path: Path, codec: str) -> None:
    corpus = generate(n_positions=20000, seed=3)
    with lc.StoreWriter(tmp_path / "a", vocab_size=32768, k=64, codec=codec) as w:
        for i, (inp, ids, lps) in enumerate(corpus.sequences()):
            w.add(i, inp, ids, lps)
    first = lc.open_store(tmp_path / "a")
    packed = first.read_packed(first.sample_ids())
    mass = np.exp(packed.topk_logprobs.astype(np.float64)).sum(axis=1)
    if codec == "abs:0.01":
        # The case this is about: decoded rows above the old limit of 1 + 1e-3.
        assert (mass > 1.001).any()
    with lc.StoreWriter(tmp_path / "b", vocab_size=32768, k=64, codec=codec) as w:
        for sid in first.sample_ids():
            r = first[int(sid)]
            w.add(int(sid), r.input_ids, r.topk_ids, r.topk_logprobs)
    second = lc.open_store(tmp_path / "b")
    assert lc.verify_store(tmp_path / "b")["ok"]
    again = second.read_packed(first.sample_ids())
    assert np.array_equal(again.topk_ids, packed.topk_ids)
    if codec == "lossless":
        assert np.array_equal(again.topk_logprobs, packed.topk_logprobs)
    elif codec.startswith("abs"):
        # Within the bound of what was written (here: the first store's decoded values).
        bound = first.meta["codec"]["max_abs_error"]
        a, b = again.topk_logprobs, packed.topk_logprobs
        finite = np.isfinite(b)
        assert np.array_equal(np.isfinite(a), finite)
        assert np.abs(a[finite] - b[finite]).max() <= bound
