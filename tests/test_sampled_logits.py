"""Sampled stores filled from full logits: StoreWriter.add_logits on kind="sampled"."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitcache as lc

_MASK = 0xFFFFFFFF


def _chacha8_u64s(key: bytes, stream: int, count: int) -> list[int]:
    """``count`` 64-bit outputs of ChaCha with 8 rounds (RFC 8439's block function with 4
    double rounds, a 64-bit block counter from 0 in words 12-13 and the 64-bit stream in
    words 14-15), each from two consecutive 32-bit words, low first: an implementation from
    the definition, to check the README's recipe against what the writer draws."""

    def quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
        for x, y, z, r in ((a, b, d, 16), (c, d, b, 12), (a, b, d, 8), (c, d, b, 7)):
            s[x] = (s[x] + s[y]) & _MASK
            v = s[z] ^ s[x]
            s[z] = ((v << r) | (v >> (32 - r))) & _MASK

    words: list[int] = []
    counter = 0
    while len(words) < 2 * count:
        state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key)]
        state += [counter & _MASK, counter >> 32, stream & _MASK, stream >> 32]
        s = state[:]
        for _ in range(4):
            for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)):
                quarter(s, a, b, c, d)
            for a, b, c, d in ((0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
                quarter(s, a, b, c, d)
        words += [(x + y) & _MASK for x, y in zip(s, state, strict=True)]
        counter += 1
    return [words[2 * i] | (words[2 * i + 1] << 32) for i in range(count)]


def _readme_draws(
    seed: int, sample_id: int, position: int, row: np.ndarray, temperature: float, n: int
) -> list[tuple[int, int]]:
    """``(id, count)`` of one row by the README's "Sampled stores from logits", by
    decreasing count (ties: lower id first)."""
    r = 1.0 / temperature
    top = max(float(x) for x in row) * r
    running, total = [], 0.0
    for x in row:
        total += math.exp(float(x) * r - top)
        running.append(total)
    below = np.nextafter(total, 0.0)
    key = struct.pack("<QQ", seed, sample_id) + bytes(16)
    counts: dict[int, int] = {}
    for u in _chacha8_u64s(key, position, n):
        t = min((u >> 11) * 2.0**-53 * total, below)
        drawn = next(i for i, c in enumerate(running) if c > t)
        counts[drawn] = counts.get(drawn, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _log_softmax64(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The float64 reference: log_softmax(logits / T) per row (-inf where masked)."""
    z = logits.astype(np.float64) / temperature
    return z - np.logaddexp.reduce(z, axis=1, keepdims=True)


def _rows(rec: lc.Record) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per position: the ids drawn, their counts and log-probabilities (padding dropped)."""
    out = []
    for ids, counts, lps in zip(rec.topk_ids, rec.counts, rec.topk_logprobs, strict=True):
        used = counts > 0
        out.append((ids[used].astype(np.int64), counts[used], lps[used]))
    return out


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    length=st.integers(1, 6),
    vocab=st.integers(2, 300),
    n=st.integers(1, 200),
    temperature=st.sampled_from([0.25, 0.7, 1.0, 2.5]),
    dtype=st.sampled_from(["float32", "float16"]),
    masked=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_rows_agree_with_the_float64_reference(
    tmp_path_factory: pytest.TempPathFactory,
    length: int,
    vocab: int,
    n: int,
    temperature: float,
    dtype: str,
    masked: float,
    seed: int,
    data: st.DataObject,
) -> None:
    """Every row: distinct ids of finite logits, by decreasing count (ties: lower id first),
    counts adding up to n, log-probabilities within float32 rounding of the float64
    log_softmax and bit for bit what a top-K store keeps for those ids; the same seed writes
    the same record again."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    logits = (rng.normal(size=(length, vocab)) * 3).astype(dtype)
    logits[rng.random((length, vocab)) < masked] = -np.inf
    logits[np.arange(length), rng.integers(0, vocab, length)] = rng.normal(size=length)
    tmp = tmp_path_factory.mktemp("s")
    options = {"vocab_size": vocab, "codec": "lossless", "temperature": temperature}
    inputs = np.arange(length) % vocab
    for name in ("sampled", "again"):
        with lc.StoreWriter(tmp / name, k=n, kind="sampled", **options) as w:
            w.add_logits(5, inputs, logits, seed=seed)
    with lc.StoreWriter(tmp / "topk", k=vocab, **options) as w:
        w.add_logits(5, inputs, logits)
    store, topk = lc.open_store(tmp / "sampled"), lc.open_store(tmp / "topk")[5]
    ref = _log_softmax64(logits.astype(np.float32), temperature)
    for pos, (ids, counts, lps) in enumerate(_rows(store[5])):
        assert counts.sum() == n
        assert len(np.unique(ids)) == len(ids)
        assert np.isfinite(logits[pos, ids]).all()
        order = np.lexsort((ids, -counts.astype(np.int64)))
        assert (order == np.arange(len(ids))).all(), (ids, counts)
        np.testing.assert_allclose(lps, ref[pos, ids], rtol=1e-6, atol=1e-6)
        at = np.argsort(topk.topk_ids[pos])
        kept = topk.topk_logprobs[pos][at][ids]
        assert kept.view(np.uint32).tolist() == lps.view(np.uint32).tolist()
    again = lc.open_store(tmp / "again")[5]
    for a, b in zip(_rows(store[5]), _rows(again), strict=True):
        assert all((x == y).all() for x, y in zip(a, b, strict=True))


def test_draws_follow_the_tempered_softmax(tmp_path: Path) -> None:
    """Counts over 4000 positions of 50 draws against the float64 softmax: the chi-square
    statistic is below its 0.1% quantile (7 degrees of freedom: 24.32) at the store's
    temperature and far above it at another; a masked id is never drawn. Fixed seeds, so
    the outcome never changes between runs."""
    logit = np.array([2.0, 1.0, 0.5, -1.0, -np.inf, 0.0, 1.5, -0.5, 0.25], dtype=np.float32)
    length = 4000
    logits = np.tile(logit, (length, 1))
    for temperature, other in ((1.0, 2.0), (2.0, 1.0)):
        path = tmp_path / f"t{temperature}"
        with lc.StoreWriter(path, vocab_size=9, k=50, kind="sampled", temperature=temperature) as w:
            w.add_logits(1, np.zeros(length, dtype=np.int64), logits, seed=123)
        rec = lc.open_store(path)[1]
        seen = np.bincount(
            rec.topk_ids[rec.counts > 0].astype(np.int64),
            weights=rec.counts[rec.counts > 0],
            minlength=9,
        )
        assert seen[4] == 0

        def chi_square(t: float, seen: np.ndarray = seen) -> float:
            p = np.exp(_log_softmax64(logit[None, :], t)[0])
            live = p > 0
            expected = seen.sum() * p[live]
            return float(((seen[live] - expected) ** 2 / expected).sum())

        assert chi_square(temperature) < 24.32, chi_square(temperature)
        assert chi_square(other) > 200, chi_square(other)


def test_seed_sample_id_and_position_alone_choose_the_draws(tmp_path: Path) -> None:
    """A capture run again (here into another store, another record order) writes the same
    rows; another seed or another sample id draws others; without log-probabilities the
    store keeps ids and counts only."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(30, 400)).astype(np.float32) * 2

    def capture(path: Path, order: list[int], seed: int | None, codec: str) -> lc.Store:
        with lc.StoreWriter(path, vocab_size=400, k=32, kind="sampled", codec=codec) as w:
            for sid in order:
                w.add_logits(sid, np.arange(30), logits, seed=seed)
        return lc.open_store(path)

    a = capture(tmp_path / "a", [1, 2], None, "lossless")
    b = capture(tmp_path / "b", [2, 1], 0, "none")
    c = capture(tmp_path / "c", [1], 1, "lossless")
    assert b.meta["codec"]["logprobs"] == "none" and b[1].topk_logprobs is None
    assert (a[1].topk_ids == b[1].topk_ids).all() and (a[1].counts == b[1].counts).all()
    assert (a[2].topk_ids == b[2].topk_ids).all()
    assert not np.array_equal(a[1].topk_ids, a[2].topk_ids)  # another sample id
    assert not np.array_equal(a[1].topk_ids, c[1].topk_ids)  # another seed
    # Rows of one record differ too (one stream per position), though their logits agree.
    same = np.tile(logits[0], (30, 1))
    with lc.StoreWriter(tmp_path / "d", vocab_size=400, k=32, kind="sampled") as w:
        w.add_logits(1, np.arange(30), same)
    rec = lc.open_store(tmp_path / "d")[1]
    assert len({r.tobytes() for r in rec.topk_ids}) > 1


def test_the_readme_recipe_gives_the_draws_written(tmp_path: Path) -> None:
    """An implementation of the README's description alone (ChaCha8 from its definition)
    draws what the writer stored: the recipe is complete, and a change of generator would
    show here. Masked logits, a temperature whose reciprocal is not exact, large seed and
    sample id."""
    rng = np.random.default_rng(5)
    length, vocab, n, temperature = 6, 37, 40, 0.7
    logits = (rng.normal(size=(length, vocab)) * 2).astype(np.float32)
    logits[2, :30] = -np.inf
    seed, sample_id = 0xDEADBEEF12345678, 2**64 - 3
    with lc.StoreWriter(
        tmp_path / "s", vocab_size=vocab, k=n, kind="sampled", temperature=temperature
    ) as w:
        w.add_logits(sample_id, np.zeros(length, dtype=np.int64), logits, seed=seed)
    rec = lc.open_store(tmp_path / "s")[sample_id]
    for pos in range(length):
        written = [
            (int(i), int(c)) for i, c in zip(rec.topk_ids[pos], rec.counts[pos], strict=True) if c
        ]
        assert written == _readme_draws(seed, sample_id, pos, logits[pos], temperature, n), pos


def test_bad_input(tmp_path: Path) -> None:
    ok = np.zeros((2, 10), dtype=np.float32)
    with lc.StoreWriter(tmp_path / "topk", vocab_size=10, k=4) as w:
        with pytest.raises(ValueError, match="seed is for sampled stores"):
            w.add_logits(1, [0, 1], ok, seed=1)
    with lc.StoreWriter(tmp_path / "s", vocab_size=10, k=4, kind="sampled") as w:
        for seed, message in ((-1, "at least 0"), (2**64, "at most"), (1.5, "an integer")):
            with pytest.raises(ValueError, match=f"seed must be {message}"):
                w.add_logits(1, [0, 1], ok, seed=seed)  # type: ignore[arg-type]
        for row, message in (
            ([np.nan] + [0.0] * 9, "NaN at vocabulary id 0"),
            ([0.0] * 9 + [np.inf], r"\+inf at vocabulary id 9"),
            ([-np.inf] * 10, "every logit is -inf"),
        ):
            bad = ok.copy()
            bad[1] = row
            with pytest.raises(lc.InvalidRecordError, match=f"position 1: {message}") as e:
                w.add_logits(7, [0, 1], bad)
            assert e.value.sample_id == 7
        with pytest.raises(ValueError, match=r"expected \[2, 10\]"):
            w.add_logits(1, [0, 1], np.zeros((2, 11), dtype=np.float32))
        w.add_logits(1, [0, 1], ok)
        assert w.num_samples == 1
    for kind in ("sampled", "topk"):
        with lc.StoreWriter(
            tmp_path / f"cold-{kind}", vocab_size=2, k=2, kind=kind, temperature=1e-300
        ) as w:
            with pytest.raises(lc.InvalidRecordError, match="divided by the temperature 1e-300"):
                w.add_logits(1, [0], np.array([[0.0, 3e38]], dtype=np.float32))
            w.add_logits(1, [0], np.array([[0.0, 1.0]], dtype=np.float32))  # one certain id
    with lc.StoreWriter(tmp_path / "many", vocab_size=10, k=2**24 + 1, kind="sampled") as w:
        with pytest.raises(ValueError, match="k = 16777217 draws per position; add_logits takes 1"):
            w.add_logits(1, [0], ok[:1])
