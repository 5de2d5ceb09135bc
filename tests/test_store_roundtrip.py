"""Round trips through StoreWriter / open_store for every codec and kind."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_sampled, make_topk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import logitcache as lc

CODECS = {
    "lossless": 0.0,
    # max errors: half the largest step m 2^-e (m in 1, 3, 5, 7) within twice the bound
    "abs:0.01": 5 * 2**-9,
    "abs:0.1": 3 * 2**-5,
    "abs:1e-4": 2**-14,  # the finest step, 2^-13
    "kl:1e-4": ("kl", 1e-4),
    "kl:1e-2": ("kl", 1e-2),
}


def _row_kl(want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(P || P_decoded) per row over the K entries plus the rest bucket, in float64, in the
    generalized form sum p ln(p/q) - sum p + sum q."""
    p = np.exp(want.astype(np.float64))
    q = np.exp(got.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (want.astype(np.float64) - got.astype(np.float64)), 0.0)
        p_rest = np.maximum(0.0, 1.0 - p.sum(axis=-1))
        q_rest = np.maximum(0.0, 1.0 - q.sum(axis=-1))
        rest = np.where(p_rest > 0, p_rest * np.log(p_rest / q_rest), 0.0)
    # Generalized KL: also charges decoded mass above 1 (FORMAT.md, kl codec).
    excess = (q.sum(axis=-1) + q_rest) - (p.sum(axis=-1) + p_rest)
    return terms.sum(axis=-1) + rest + excess


def _check_logprobs(got: np.ndarray, want: np.ndarray, bound: float | tuple) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    if isinstance(bound, tuple):
        kl = _row_kl(want, got)
        assert np.all(kl <= bound[1] * (1 + 1e-6)), kl.max()
        return
    inf = np.isneginf(want)
    assert np.array_equal(np.isneginf(got), inf)
    if bound == 0.0:
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    else:
        assert np.all(np.abs(got[~inf] - want[~inf]) <= bound)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    codec=st.sampled_from(sorted(CODECS)),
    k=st.integers(1, 12),
    vocab_extra=st.integers(0, 3000),
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    chunk_positions=st.sampled_from([1, 7, 64, 4096]),
    seed=st.integers(0, 2**32 - 1),
)
def test_topk_roundtrip_property(
    tmp_path_factory: pytest.TempPathFactory,
    codec: str,
    k: int,
    vocab_extra: int,
    lengths: list[int],
    chunk_positions: int,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    vocab = k + vocab_extra
    path = tmp_path_factory.mktemp("s") / "store"
    data = {}
    with lc.StoreWriter(
        path, vocab_size=vocab, k=k, codec=codec, chunk_positions=chunk_positions
    ) as w:
        for i, n in enumerate(lengths):
            sid = int(rng.integers(0, 2**64, dtype=np.uint64))
            while sid in data:
                sid = int(rng.integers(0, 2**64, dtype=np.uint64))
            inp, ids, lp = make_topk(rng, n, k, vocab, scale=float(rng.uniform(0.1, 20)))
            if n and i % 3 == 0:
                lp[:, k // 2 :] = -np.inf  # masked vocabulary: probability exactly 0
            w.add(sid, inp, ids, lp)
            data[sid] = (inp, ids, lp)
    store = lc.open_store(path)
    assert len(store) == len(data)
    assert set(store.sample_ids().tolist()) == set(data)
    for sid, (inp, ids, lp) in data.items():
        rec = store[sid]
        assert np.array_equal(rec.input_ids, inp)
        assert np.array_equal(rec.topk_ids, ids)
        _check_logprobs(rec.topk_logprobs, lp, CODECS[codec])
    order = list(data)[::-1]
    batch = store.read_batch(order)
    for b, sid in enumerate(order):
        inp, ids, lp = data[sid]
        n = len(inp)
        assert batch.lengths[b] == n
        assert np.array_equal(batch.input_ids[b, :n], inp)
        assert np.array_equal(batch.topk_ids[b, :n], ids)
        _check_logprobs(batch.topk_logprobs[b, :n], lp, CODECS[codec])
        assert np.all(batch.input_ids[b, n:] == 0)
        assert np.all(batch.topk_ids[b, n:] == 0)
        assert np.all(np.isneginf(batch.topk_logprobs[b, n:]))
    # The packed read holds the same records back to back, and duplicates are allowed.
    order = order + order[:1]
    packed = store.read_packed(order)
    assert packed.offsets.tolist() == [0, *np.cumsum([len(data[s][0]) for s in order])]
    assert packed.topk_ids.shape == (packed.offsets[-1], k)
    for b, sid in enumerate(order):
        inp, ids, lp = data[sid]
        a, e = packed.offsets[b], packed.offsets[b + 1]
        assert np.array_equal(packed.input_ids[a:e], inp)
        assert np.array_equal(packed.topk_ids[a:e], ids)
        _check_logprobs(packed.topk_logprobs[a:e], lp, CODECS[codec])
    assert lc.verify_store(path)["ok"]


@pytest.mark.parametrize("codec", ["none", "lossless", "abs:0.05"])
def test_sampled_roundtrip(tmp_path: Path, rng: np.random.Generator, codec: str) -> None:
    n, vocab = 20, 300
    path = tmp_path / "s"
    data = {}
    with lc.StoreWriter(path, vocab_size=vocab, k=n, kind="sampled", codec=codec) as w:
        for sid in range(6):
            inp, ids, counts, lp = make_sampled(rng, 3 + 2 * sid, n, vocab)
            w.add_sampled(sid, inp, ids, counts, None if codec == "none" else lp)
            data[sid] = (inp, ids, counts, lp)
    store = lc.open_store(path)
    for sid, (inp, ids, counts, lp) in data.items():
        rec = store[sid]
        assert np.array_equal(rec.input_ids, inp)
        keep = counts > 0
        # Records come back padded to their own widest row: compare entry by entry.
        m = rec.ids.shape[1]
        assert m == keep.sum(axis=1).max()
        assert np.array_equal(rec.ids[:, :m][rec.counts > 0], ids[keep])
        assert np.array_equal(rec.counts[rec.counts > 0], counts[keep])
        assert np.all(rec.ids[rec.counts == 0] == -1)
        if codec == "none":
            assert rec.topk_logprobs is None
        else:
            bound = 0.0 if codec == "lossless" else 3 * 2**-6  # abs:0.05: step 3 x 2^-5
            got = rec.topk_logprobs[rec.counts > 0]
            assert np.all(np.abs(got - lp[keep]) <= bound)
    batch = store.read_batch([5, 0])
    assert batch.counts is not None
    assert batch.topk_ids.shape[2] == max((data[s][2] > 0).sum(axis=1).max() for s in (0, 5))
    assert np.all(batch.counts.sum(axis=2)[batch.mask] == n)
    assert np.all(batch.topk_ids[~batch.mask] == -1)
    packed = store.read_packed([5, 0])
    w = batch.topk_ids.shape[2]
    assert packed.topk_ids.shape == (batch.lengths.sum(), w)
    for b in range(2):
        a, e = packed.offsets[b], packed.offsets[b + 1]
        n = batch.lengths[b]
        assert np.array_equal(packed.topk_ids[a:e], batch.topk_ids[b, :n])
        assert np.array_equal(packed.counts[a:e], batch.counts[b, :n])
        assert np.array_equal(packed.input_ids[a:e], batch.input_ids[b, :n])
        if codec == "none":
            assert packed.topk_logprobs is None
        else:
            assert np.array_equal(packed.topk_logprobs[a:e], batch.topk_logprobs[b, :n])


def test_extreme_but_valid_values(tmp_path: Path) -> None:
    vocab, k = 2**31 - 1, 4
    ids = np.array([[2**31 - 2, 0, 12345, 2**30]], dtype=np.int64)
    # The default step 5 x 2^-8 reaches (2^24 // 5) steps = 65535.21 nats.
    lp = np.array([[-1e-7, -50000.0, -65535.2, -np.inf]], dtype=np.float32)
    with lc.StoreWriter(tmp_path / "a", vocab_size=vocab, k=k) as w:
        w.add(2**64 - 1, np.array([2**31 - 2]), ids, lp)
        w.add(
            0,
            np.array([], dtype=np.int64),
            np.zeros((0, k), np.int64),
            np.zeros((0, k), np.float32),
        )
    s = lc.open_store(tmp_path / "a")
    rec = s[2**64 - 1]
    assert np.array_equal(rec.topk_ids, ids)
    _check_logprobs(rec.topk_logprobs, lp, 5 * 2**-9)
    assert len(s[0]) == 0
    # Below the largest level (2^24 // 5 steps of 5 x 2^-8) a log-probability is stored as
    # -inf (its probability is 0 in float32 and float64): documented in FORMAT.md.
    with lc.StoreWriter(tmp_path / "b", vocab_size=10, k=2) as w:
        w.add(1, np.array([1]), np.array([[1, 2]]), np.array([[-1.0, -3e5]], np.float32))
    got = lc.open_store(tmp_path / "b")[1].topk_logprobs
    assert abs(got[0, 0] + 1.0) <= 5 * 2**-9 and math.isinf(got[0, 1])


def test_single_gets_equal_batch_and_iteration(tmp_path: Path, rng: np.random.Generator) -> None:
    with lc.StoreWriter(tmp_path / "s", vocab_size=500, k=5, chunk_positions=30) as w:
        for sid in range(30):
            w.add(sid * 7, *make_topk(rng, int(rng.integers(1, 25)), 5, 500))
    s = lc.open_store(tmp_path / "s")
    recs = {r.sample_id: r for r in s}
    assert sorted(recs) == [sid * 7 for sid in range(30)]
    b = s.read_batch(np.array([14, 0, 203], dtype=np.uint64))
    for i, sid in enumerate([14, 0, 203]):
        n = len(recs[sid])
        assert np.array_equal(b.topk_ids[i, :n], recs[sid].topk_ids)
        assert np.array_equal(b.topk_logprobs[i, :n], recs[sid].topk_logprobs)
    assert s.sample_lengths().tolist() == [len(recs[sid]) for sid in s.sample_ids()]
    assert s.sample_lengths().dtype == np.int64  # as Batch.lengths; torch has no uint32 ops


def test_close_releases_the_shards(tmp_path: Path, rng: np.random.Generator) -> None:
    """close() (or leaving a with block) lets go of the shards' maps at once; arrays read
    before stay valid, and every later read raises StoreError."""
    with lc.StoreWriter(tmp_path / "s", vocab_size=500, k=5) as w:
        for sid in range(4):
            w.add(sid, *make_topk(rng, 6, 5, 500))
    shard_dir = str((tmp_path / "s" / "shards").resolve())

    def mapped() -> int:
        return sum(shard_dir in line for line in Path("/proc/self/maps").read_text().splitlines())

    with lc.open_store(tmp_path / "s", mmap=True) as store:
        rec = store[2]
        batch = store.read_batch([1, 3])
        want = rec.topk_ids.copy(), batch.topk_logprobs.copy()
        assert mapped() >= 1 and not store.closed
    assert store.closed and mapped() == 0
    assert np.array_equal(rec.topk_ids, want[0]) and np.array_equal(batch.topk_logprobs, want[1])
    for use in (
        lambda: store[2],
        lambda: store.read_batch([1]),
        lambda: len(store),
        lambda: 2 in store,
    ):
        with pytest.raises(lc.StoreError, match="is closed"):
            use()
    store.close()  # idempotent
    assert "closed" in repr(store)
    with pytest.raises(lc.StoreError, match="is closed") as e:
        pickle.dumps(store)  # a copy would be an open store
    assert e.value.file is None and e.value.sample_id is None  # as for any StoreError


def test_add_logits_matches_numpy_reference(tmp_path: Path, rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    vocab, k, temp = 700, 16, 1.7
    logits = (rng.normal(size=(9, vocab)) * 4).astype(np.float32)
    logits[2, :600] = -np.inf  # masked vocabulary
    with lc.StoreWriter(
        tmp_path / "s", vocab_size=vocab, k=k, codec="lossless", temperature=temp
    ) as w:
        w.add_logits(1, np.arange(9), logits)
        w.add_logits(2, np.arange(9), torch.from_numpy(logits).to(torch.bfloat16))
        w.add_logits(3, np.arange(9), logits.astype(np.float16))
    s = lc.open_store(tmp_path / "s")
    for sid, ref in (
        (1, logits.astype(np.float64)),
        (2, torch.from_numpy(logits).to(torch.bfloat16).double().numpy()),
        (3, logits.astype(np.float16).astype(np.float64)),
    ):
        z = ref / temp
        logp = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        rec = s[sid]
        want_lp = np.sort(logp, axis=1)[:, ::-1][:, :k]
        np.testing.assert_allclose(rec.topk_logprobs, want_lp, rtol=1e-6, atol=1e-6)
        picked = np.take_along_axis(logp, rec.topk_ids.astype(np.int64), axis=1)
        np.testing.assert_allclose(picked, want_lp, rtol=1e-6, atol=1e-6)


def test_metadata_teacher_tokenizer_and_fingerprints(tmp_path: Path) -> None:
    class Tok:
        name_or_path = "toy-tokenizer"

        def get_vocab(self) -> dict[str, int]:
            return {"a": 0, "b": 1, "c": 2}

    class Other(Tok):
        def get_vocab(self) -> dict[str, int]:
            return {"a": 0, "b": 2, "c": 1}

    with lc.StoreWriter(
        tmp_path / "s", vocab_size=3, k=2, tokenizer=Tok(), teacher="t0", metadata={"run": 7}
    ):
        pass
    s = lc.open_store(tmp_path / "s", expect_tokenizer=Tok(), expect_vocab_size=3)
    assert s.meta["tokenizer"] == {
        "name": "toy-tokenizer",
        "vocab_fingerprint": lc.vocab_fingerprint({"a": 0, "b": 1, "c": 2}),
    }
    assert s.meta["teacher"]["name"] == "t0"
    assert s.meta["metadata"] == {"run": 7}
    with pytest.raises(lc.StoreMismatchError, match="vocab_fingerprint"):
        lc.open_store(tmp_path / "s", expect_tokenizer=Other())
    with pytest.raises(lc.StoreMismatchError, match=r"tokenizer\.name"):
        lc.open_store(tmp_path / "s", expect_tokenizer="another")
    with lc.StoreWriter(tmp_path / "named", vocab_size=3, k=2, tokenizer="toy-tokenizer"):
        pass
    fp = {"vocab_fingerprint": "sha256:00"}
    with pytest.raises(lc.StoreMismatchError) as e:
        lc.open_store(tmp_path / "named", expect_tokenizer=fp)
    assert str(e.value).endswith(
        'tokenizer expected vocab_fingerprint "sha256:00", found name "toy-tokenizer" (nothing '
        "to compare: no common name or fingerprint)"
    ), str(e.value)
    with lc.StoreWriter(tmp_path / "s", vocab_size=3, k=2, mode="a", metadata={"more": 1}):
        pass
    assert lc.open_store(tmp_path / "s").meta["metadata"] == {"run": 7, "more": 1}
    assert lc.vocab_fingerprint({"x": 1, "y": 0}) == lc.vocab_fingerprint({"y": 0, "x": 1})
    assert lc.config_fingerprint({"a": 1, "transformers_version": "9"}) == lc.config_fingerprint(
        {"a": 1}
    )


def test_transformers_teacher_fingerprint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with lc.StoreWriter(tmp_path / "s", vocab_size=64, k=4, teacher=cfg):
        pass
    fp = lc.open_store(tmp_path / "s").meta["teacher"]["config_fingerprint"]
    assert fp == lc.config_fingerprint(cfg.to_dict())
    assert fp.startswith("sha256:")


def test_abs_codec_keeps_sorted_rows_and_their_mass(tmp_path: Path) -> None:
    """Rounding every entry on its own would push confident rows' decoded mass above 1 and
    empty their rest bucket; the top entry's finer grid keeps the row's mass (FORMAT.md)."""
    rng = np.random.default_rng(7)
    k, vocab, n = 32, 5000, 400
    inp, ids, lp = make_topk(rng, n, k, vocab, scale=9.0)  # peaked rows: top-K mass near 1
    with lc.StoreWriter(tmp_path / "s", vocab_size=vocab, k=k, codec="abs:0.01") as w:
        w.add(0, inp, ids, lp)
    got = lc.open_store(tmp_path / "s")[0].topk_logprobs
    assert np.all(np.diff(got, axis=1) <= 0), "decoded rows must stay sorted"
    assert np.all(np.abs(got - lp) <= 5 * 2**-9)
    true_mass = np.exp(lp.astype(np.float64)).sum(axis=1)
    got_mass = np.exp(got.astype(np.float64)).sum(axis=1)
    confident = true_mass > 0.99
    assert confident.sum() > 50
    naive = np.round(lp.astype(np.float64) * 64) / 64  # every entry rounded on its own
    naive_dev = np.abs(np.exp(naive).sum(axis=1) - true_mass)[confident]
    dev = np.abs(got_mass - true_mass)[confident]
    assert np.median(dev) * 5 < np.median(naive_dev), (np.median(dev), np.median(naive_dev))
    assert dev.max() < 5e-3
    assert (got_mass[confident] > 1.0).mean() < 0.5 * (
        np.exp(naive).sum(axis=1)[confident] > 1
    ).mean()


def test_finest_abs_codec_keeps_flat_rows(tmp_path: Path) -> None:
    # The top entry's grid must reach -ln(V) for any V < 2^31: abs:1e-6 (step 2^-19) stored
    # every row whose top log-probability was below -0.5 nats as all -inf. Now the finest
    # step is 2^-13 (top entries down to -32 nats) and finer bounds are refused.
    lp = np.array([[-1.0, -2.0, -3.0], [-21.4, -22.0, -40.0]], np.float32)
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    with lc.StoreWriter(tmp_path / "s", vocab_size=100, k=3, codec="abs:6.2e-5") as w:
        w.add(0, np.array([1, 2]), ids, lp)
    store = lc.open_store(tmp_path / "s")
    assert store.meta["codec"]["step"] == 2**-13
    assert np.all(np.abs(store[0].topk_logprobs - lp) <= 2**-14)
    with pytest.raises(ValueError, match="lossless"):
        lc.StoreWriter(tmp_path / "t", vocab_size=100, k=3, codec="abs:1e-6")


def test_every_function_takes_str_bytes_and_path_objects(tmp_path: Path) -> None:
    """Paths as str, bytes or os.PathLike, as os functions take them (open_store took bytes
    while verify_store and merge_stores refused them)."""
    rng = np.random.default_rng(0)
    for form in (str, os.fsencode, Path):
        root = tmp_path / form.__name__
        root.mkdir()

        def p(name: str, root: Path = root, form: Any = form) -> Any:
            return form(os.fspath(root / name))

        with lc.StoreWriter(p("a"), vocab_size=50, k=4) as w:
            w.add(1, *make_topk(rng, 3, 4, 50))
            w.add(2, *make_topk(rng, 3, 4, 50))
        with lc.StoreWriter(p("b"), vocab_size=50, k=4) as w:
            w.add(3, *make_topk(rng, 3, 4, 50))
        assert len(lc.open_store(p("a"))) == 2
        assert lc.verify_store(p("a"))["ok"]
        assert lc.repair_store(p("a"))["sound"]
        assert lc.merge_stores(p("m"), [p("a"), p("b")])["num_samples"] == 3
        assert lc.copy_store(p("m"), p("c"), sample_ids=[1, 3]) == 2
        assert lc.remove_samples(p("c"), [1])["samples_removed"] == 1
        assert lc.clean_store(p("c"))["deleted"] == []
        os.remove(root / "c" / "manifest.json")
        assert lc.rebuild_manifest(p("c"))["num_samples"] == 1
        assert lc.open_store(p("c")).sample_ids().tolist() == [3]
    with pytest.raises(TypeError, match="sources must be a sequence"):
        lc.merge_stores(tmp_path / "x", os.fsencode(tmp_path / "str" / "a"))  # type: ignore[arg-type]
