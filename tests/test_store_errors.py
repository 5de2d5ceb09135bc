"""Every bad input named by the store issue gets a clear, typed error, and nothing already
committed is lost."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sampled, make_topk, make_undeletable, write_manifest

import logitcache as lc

V, K = 200, 4


@pytest.fixture
def committed(tmp_path: Path, rng: np.random.Generator) -> Path:
    """A store with samples 0 and 1 committed."""
    path = tmp_path / "s"
    with lc.StoreWriter(path, vocab_size=V, k=K, teacher="t", tokenizer="tok") as w:
        w.add(0, *make_topk(rng, 5, K, V))
        w.add(1, *make_topk(rng, 3, K, V))
    return path


def _good(rng: np.random.Generator, n: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_topk(rng, n, K, V)


def _assert_intact(path: Path) -> None:
    s = lc.open_store(path)
    assert sorted(s.sample_ids().tolist()) == [0, 1]
    assert lc.verify_store(path)["ok"]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda i, t, p: (i, t[:, :3], p), ValueError, r"topk_ids.*shape"),
        (lambda i, t, p: (i, t, p[:-1]), ValueError, r"topk_logprobs.*shape"),
        (lambda i, t, p: (i[:, None], t, p), ValueError, r"input_ids must be 1-D"),
        (lambda i, t, p: (i, t.astype(np.float32), p), ValueError, r"topk_ids must be an integer"),
        (lambda i, t, p: (i, t, p.astype(np.int64)), ValueError, r"floating-point"),
        (lambda i, t, p: (i + V, t, p), lc.InvalidRecordError, r"input id \d+ .*outside"),
        (lambda i, t, p: (i, np.where(t == t[0, 0], V, t), p), lc.InvalidRecordError, r"outside"),
        (lambda i, t, p: (i, np.where(t == t[0, 1], -1, t), p), lc.InvalidRecordError, r"-1 "),
        (
            lambda i, t, p: (i, t, np.where(np.arange(K) == 2, np.nan, p)),
            lc.InvalidRecordError,
            r"NaN",
        ),
        (
            lambda i, t, p: (i, t, np.where(np.arange(K) == 0, np.inf, p)),
            lc.InvalidRecordError,
            r"positive",
        ),
        (lambda i, t, p: (i, t, p + 5.0), lc.InvalidRecordError, r"positive.*not logits"),
        (lambda i, t, p: (i, t, p[:, ::-1].copy()), lc.InvalidRecordError, r"not sorted"),
        (
            lambda i, t, p: (i, np.concatenate([t[:, :1], t[:, :3]], axis=1), p),
            lc.InvalidRecordError,
            r"appears twice",
        ),
        (
            lambda i, t, p: (i, t, np.full_like(p, -0.01)),
            lc.InvalidRecordError,
            r"add up to",
        ),
    ],
)
def test_bad_topk_records_rejected(
    committed: Path, rng: np.random.Generator, change, error, match
) -> None:
    with lc.StoreWriter(committed, vocab_size=V, k=K, mode="a") as w:
        args = change(*_good(rng))
        with pytest.raises(error, match=match):
            w.add(5, *args)
        w.add(6, *_good(rng))  # the writer stays usable after a rejected record
    s = lc.open_store(committed)
    assert sorted(s.sample_ids().tolist()) == [0, 1, 6]


def test_row_mass_limit(committed: Path, rng: np.random.Generator) -> None:
    """Rows may hold a little more than probability 1 (rounding, and rows decoded from a
    store quantized at abs:0.01 or finer, which round up to 1%), not 2% more."""
    inp, ids, _ = _good(rng, 1)
    with lc.StoreWriter(committed, vocab_size=V, k=K, mode="a") as w:
        for sid, mass in ((7, 1.0), (8, 1.019)):
            w.add(sid, inp, ids, np.log(np.full((1, K), mass / K, dtype=np.float64)))
        with pytest.raises(lc.InvalidRecordError, match=r"add up to 1\.02"):
            w.add(9, inp, ids, np.log(np.full((1, K), 1.021 / K, dtype=np.float64)))
    assert 8 in lc.open_store(committed)


def test_bad_sampled_records_rejected(tmp_path: Path, rng: np.random.Generator) -> None:
    n = 8
    with lc.StoreWriter(tmp_path / "s", vocab_size=V, k=n, kind="sampled") as w:
        inp, ids, counts, lp = make_sampled(rng, 3, n, V)
        w.add_sampled(0, inp, ids, counts)
        bad_counts = counts.copy()
        bad_counts[0, 0] += 1
        with pytest.raises(lc.InvalidRecordError, match=r"more than n|expected n"):
            w.add_sampled(1, inp, ids, bad_counts)
        neg = counts.copy()
        neg[1, 0] = -1
        with pytest.raises(lc.InvalidRecordError, match="negative"):
            w.add_sampled(1, inp, ids, neg)
        with pytest.raises(ValueError, match="keeps no log-probabilities"):
            w.add_sampled(1, inp, ids, counts, lp)
        with pytest.raises(ValueError, match=r"counts.*shape"):
            w.add_sampled(1, inp, ids, counts[:, :1])
        with pytest.raises(ValueError, match="sampled store; use add_sampled"):
            w.add(1, *make_topk(rng, 3, n, V))
    with lc.StoreWriter(tmp_path / "t", vocab_size=V, k=n, kind="sampled", codec="abs:0.1") as w:
        with pytest.raises(ValueError, match="pass them"):
            w.add_sampled(0, inp, ids, counts)
        bad_lp = lp.copy()
        bad_lp[0, 0] = -np.inf
        with pytest.raises(lc.InvalidRecordError, match="finite"):
            w.add_sampled(0, inp, ids, counts, bad_lp)
        # Probabilities of distinct ids of one distribution add up to at most 1: a row
        # adding up to more (here every id given -0.01) is refused, as a top-K row is.
        heavy = np.where(counts > 0, np.float32(-0.01), lp)
        with pytest.raises(lc.InvalidRecordError, match=r"position 0: the probabilities of the"):
            w.add_sampled(0, inp, ids, counts, heavy)
        w.add_sampled(0, inp, ids, counts, lp)
        # Unchecked on request, for values read back from a coarse codec's store.
        w.add_sampled(1, inp, ids, counts, heavy, check_mass=False)


def test_duplicate_sample_ids(committed: Path, rng: np.random.Generator) -> None:
    with lc.StoreWriter(committed, vocab_size=V, k=K, mode="a") as w:
        # `in` says what add would refuse: committed ids and those added since.
        assert 1 in w and 7 not in w and -1 not in w and "1" not in w
        with pytest.raises(lc.DuplicateSampleError, match="duplicate sample id 1"):
            w.add(1, *_good(rng))
        w.add(7, *_good(rng))
        assert 7 in w and np.uint64(7) in w
        with pytest.raises(lc.DuplicateSampleError, match="duplicate sample id 7"):
            w.add(7, *_good(rng))
    assert len(lc.open_store(committed)) == 3
    w = lc.StoreWriter(committed, vocab_size=V, k=K, mode="a")
    w.add(8, *_good(rng))
    w.abort()
    assert 8 not in lc.open_store(committed)
    with pytest.raises(lc.StoreError, match="is closed"):
        8 in w  # noqa: B015 (it would count the id the abort discarded)


@pytest.mark.parametrize("sid", [-1, 2**64, 1.5, "3", True])
def test_bad_sample_id_values(committed: Path, rng: np.random.Generator, sid: object) -> None:
    with lc.StoreWriter(committed, vocab_size=V, k=K, mode="a") as w:
        with pytest.raises(ValueError, match="sample_id"):
            w.add(sid, *_good(rng))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vocab_size": V + 1}, "vocab_size"),
        ({"k": K + 1}, "k"),
        ({"kind": "sampled"}, "kind"),
        ({"temperature": 2.0}, "temperature"),
        ({"codec": "lossless"}, "codec"),
        ({"teacher": "other"}, "teacher.name"),
        ({"tokenizer": "other"}, "tokenizer.name"),
    ],
)
def test_append_refuses_a_mismatch_naming_the_field(
    committed: Path, kwargs: dict, field: str
) -> None:
    args = {"vocab_size": V, "k": K, "mode": "a", **kwargs}
    with pytest.raises(lc.StoreMismatchError, match=re.escape(field) + " expected"):
        lc.StoreWriter(committed, **args)
    _assert_intact(committed)


@pytest.mark.parametrize(
    ("written", "given", "expected", "found"),
    [
        ("kl:1e-3", "kl:1e-2", "kl (bound 0.01)", "kl (bound 0.001)"),
        (
            "abs:0.01",
            "abs:0.001",
            "abs (step 0.001953125, max abs error 0.0009765625)",
            "abs (step 0.01953125, max abs error 0.009765625)",
        ),
        ("abs:0.01", "lossless", "lossless", "abs (step 0.01953125"),
    ],
)
def test_a_codec_mismatch_shows_both_guarantees(
    tmp_path: Path, rng: np.random.Generator, written: str, given: str, expected: str, found: str
) -> None:
    with lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, codec=written) as w:
        w.add(0, *_good(rng))
    with pytest.raises(lc.StoreMismatchError) as e:
        lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, codec=given, mode="a")
    assert f"codec expected {expected}, found {found}" in str(e.value), str(e.value)


def test_mode_x_says_what_is_at_the_path(committed: Path, tmp_path: Path) -> None:
    """StoreExistsError says what is there and what to do, for each kind of thing there."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    (tmp_path / "started" / "shards").mkdir(parents=True)
    (tmp_path / "started" / ".lock").write_text("")
    for path, says in [
        (committed, 'already holds a store; open it with mode="a" to append or mode="w"'),
        (tmp_path / "empty", 'an empty directory); mode="a" writes a new store into it'),
        (tmp_path / "file", "already exists and is not a directory"),
        (tmp_path / "mine", "is not a logitcache store; choose another path"),
        (tmp_path / "started", "`logitcache repair --rebuild-manifest` makes a store of the"),
    ]:
        with pytest.raises(lc.StoreExistsError) as e:
            lc.StoreWriter(path, vocab_size=V, k=K)
        assert str(e.value).startswith(f"{path} ") and says in str(e.value), str(e.value)
    _assert_intact(committed)


def test_modes(committed: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    with pytest.raises(lc.StoreExistsError, match='mode="a"'):
        lc.StoreWriter(committed, vocab_size=V, k=K)
    with pytest.raises(FileExistsError):
        lc.StoreWriter(committed, vocab_size=V, k=K, mode="x")
    with pytest.raises(ValueError, match="mode"):
        lc.StoreWriter(tmp_path / "m", vocab_size=V, k=K, mode="r")  # type: ignore[arg-type]
    # "a" on a missing path creates the store.
    with lc.StoreWriter(tmp_path / "new", vocab_size=V, k=K, mode="a") as w:
        w.add(3, *_good(rng))
    assert lc.open_store(tmp_path / "new").sample_ids().tolist() == [3]
    # "w" refuses a directory that is not a store.
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a logitcache store"):
        lc.StoreWriter(other, vocab_size=V, k=K, mode="w")
    assert (other / "precious.txt").read_text() == "keep me"
    # "w" replaces, and the old store stays readable until the commit.
    with lc.StoreWriter(committed, vocab_size=V + 5, k=K, mode="w") as w:
        w.add(9, *make_topk(rng, 2, K, V + 5))
        assert len(lc.open_store(committed)) == 2
    s = lc.open_store(committed)
    assert s.sample_ids().tolist() == [9] and s.vocab_size == V + 5
    assert lc.verify_store(committed)["orphans"] == []


def test_exception_in_with_block_keeps_committed_state(
    committed: Path, rng: np.random.Generator
) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with lc.StoreWriter(committed, vocab_size=V, k=K, mode="a", chunk_positions=2) as w:
            for sid in range(10, 40):
                w.add(sid, *_good(rng))
            raise RuntimeError("boom")
    _assert_intact(committed)
    assert lc.verify_store(committed)["orphans"] == []
    # A new store that never committed leaves no directory behind.
    fresh = committed.parent / "fresh"
    with pytest.raises(RuntimeError):
        with lc.StoreWriter(fresh, vocab_size=V, k=K) as w:
            w.add(1, *_good(rng))
            raise RuntimeError
    assert not fresh.exists()


def test_commit_checkpoints_survive_a_later_abort(
    committed: Path, rng: np.random.Generator
) -> None:
    w = lc.StoreWriter(committed, vocab_size=V, k=K, mode="a")
    w.add(20, *_good(rng))
    w.commit()
    w.add(21, *_good(rng))
    w.abort()
    assert sorted(lc.open_store(committed).sample_ids().tolist()) == [0, 1, 20]
    with pytest.raises(lc.StoreError, match="closed"):
        w.add(22, *_good(rng))


def test_second_writer_is_refused(committed: Path) -> None:
    w = lc.StoreWriter(committed, vocab_size=V, k=K, mode="a")
    with pytest.raises(lc.StoreLockedError, match="locked by another writer"):
        lc.StoreWriter(committed, vocab_size=V, k=K, mode="a")
    w.close()
    lc.StoreWriter(committed, vocab_size=V, k=K, mode="a").close()


def test_future_format_version(committed: Path) -> None:
    mpath = committed / "manifest.json"
    env = json.loads(mpath.read_text())
    body = env["manifest"]
    body["format_version"] = 99
    write_manifest(committed, body)
    with pytest.raises(lc.FormatVersionError, match="format version 99 is not supported"):
        lc.open_store(committed)
    with pytest.raises(lc.FormatVersionError):
        lc.StoreWriter(committed, vocab_size=V, k=K, mode="a")


def test_corrupt_manifest_and_missing_store(committed: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        lc.open_store(tmp_path / "nope")
    mpath = committed / "manifest.json"
    raw = bytearray(mpath.read_bytes())
    i = raw.index(b'"vocab_size":') + len(b'"vocab_size":')
    raw[i] = ord("9") if raw[i] != ord("9") else ord("8")
    mpath.write_bytes(bytes(raw))
    with pytest.raises(lc.CorruptStoreError, match="manifest checksum mismatch"):
        lc.open_store(committed)
    report = lc.verify_store(committed)
    assert not report["ok"] and "checksum" in report["problems"][0]


def test_truncated_and_flipped_shard(committed: Path) -> None:
    shard = next((committed / "shards").iterdir())
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(lc.CorruptStoreError, match=r"shard 0.*truncated"):
        lc.open_store(committed)
    # A flipped byte inside a chunk: open succeeds (header/footer intact) but reading the
    # sample raises an error naming file, shard, chunk and sample; nothing wrong is returned.
    flipped = bytearray(data)
    flipped[64 + 20] ^= 0x10
    shard.write_bytes(bytes(flipped))
    s = lc.open_store(committed)
    with pytest.raises(lc.CorruptStoreError) as info:
        s[0]
    msg = str(info.value)
    assert shard.name in msg and "shard 0" in msg and "chunk 0" in msg and "sample 0" in msg
    with pytest.raises(lc.CorruptStoreError):
        s.read_batch([1, 0])
    assert not lc.verify_store(committed)["ok"]


def test_bad_writer_arguments(tmp_path: Path) -> None:
    cases = [
        ({"vocab_size": 0, "k": 1}, "vocab_size"),
        ({"vocab_size": 10, "k": 0}, "k"),
        ({"vocab_size": 10, "k": 11}, "larger than vocab_size"),
        ({"vocab_size": 10, "k": 2, "temperature": 0.0}, "temperature"),
        ({"vocab_size": 10, "k": 2, "temperature": float("nan")}, "temperature"),
        ({"vocab_size": 10, "k": 2, "codec": "zip"}, "unknown codec"),
        ({"vocab_size": 10, "k": 2, "codec": "abs:0"}, "between"),
        ({"vocab_size": 10, "k": 2, "codec": "none"}, "must keep log-probabilities"),
        ({"vocab_size": 10, "k": 2, "kind": "dense"}, "kind"),
        ({"vocab_size": 10, "k": 2, "metadata": {"x": object()}}, "JSON"),
        ({"vocab_size": 10, "k": 2, "shard_size": "lots"}, "shard_size"),
        ({"vocab_size": 10, "k": 2, "zstd_level": 40}, "zstd_level"),
        # Numbers of the wrong type are refused, not truncated or failing deep inside.
        ({"vocab_size": 10.0, "k": 2}, "vocab_size must be an integer, got 10.0"),
        ({"vocab_size": 10, "k": True}, "k must be an integer, got True"),
        ({"vocab_size": 10, "k": 2, "chunk_positions": 1.5}, "chunk_positions must be an integer"),
        ({"vocab_size": 10, "k": 2, "chunk_positions": "8"}, "chunk_positions must be an integer"),
        ({"vocab_size": 10, "k": 2, "chunk_positions": 0}, "chunk_positions must be at least 1"),
        (
            {"vocab_size": 10, "k": 2, "shard_size": 1e9},
            "shard_size must be an integer, got 1000000000.0",
        ),
        ({"vocab_size": 10, "k": 2, "shard_size": 0}, "shard_size must be at least 1"),
        ({"vocab_size": 10, "k": 2, "zstd_level": 2.5}, "zstd_level must be an integer"),
    ]
    for i, (kwargs, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            lc.StoreWriter(tmp_path / f"s{i}", **kwargs)
        assert not (tmp_path / f"s{i}").exists(), kwargs
    with lc.StoreWriter(tmp_path / "ok", vocab_size=np.int64(10), k=np.int32(2), shard_size=4096):
        pass
    for kwargs, match in [
        ({"cache_chunks": -1}, "cache_chunks must be at least 0, got -1"),
        ({"cache_chunks": 2.0}, "cache_chunks must be an integer"),
        ({"expect_vocab_size": "10"}, "expect_vocab_size must be an integer, got '10'"),
    ]:
        with pytest.raises(ValueError, match=match):
            lc.open_store(tmp_path / "ok", **kwargs)
    assert len(lc.open_store(tmp_path / "ok", expect_vocab_size=np.int64(10))) == 0


def test_add_logits_errors(tmp_path: Path) -> None:
    with lc.StoreWriter(tmp_path / "s", vocab_size=50, k=3) as w:
        with pytest.raises(ValueError, match=r"slice the logits .*vocab_size=64"):
            w.add_logits(0, np.arange(2), np.zeros((2, 64), np.float32))
        with pytest.raises(ValueError, match=r"expected \[3, 50\]"):
            w.add_logits(0, np.arange(3), np.zeros((2, 50), np.float32))
        bad = np.zeros((2, 50), np.float32)
        bad[1, 7] = np.nan
        with pytest.raises(lc.InvalidRecordError, match="position 1: NaN at vocabulary id 7"):
            w.add_logits(0, np.arange(2), bad)
        with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
            w.add_logits(0, np.arange(2), np.zeros((2, 50), np.int32))
        w.add_logits(0, np.arange(2), np.zeros((2, 50), np.float64))
    rec = lc.open_store(tmp_path / "s")[0]
    np.testing.assert_allclose(rec.topk_logprobs, np.log(1 / 50), atol=5 * 2**-9)
    assert rec.topk_ids.tolist() == [[0, 1, 2], [0, 1, 2]]  # ties: lower id first


def test_missing_sample_is_a_key_error(committed: Path) -> None:
    s = lc.open_store(committed)
    with pytest.raises(KeyError) as e:
        s[12345]
    # A sentence, not a quoted key as KeyError prints its argument.
    assert str(e.value) == f"sample id 12345 is not in the store {committed}"
    with pytest.raises(lc.MissingSampleError, match="12345"):
        s.read_batch([0, 12345])
    with pytest.raises(lc.MissingSampleError, match="12345"):
        s.read_packed([0, 12345])
    for bad in ([[0, 1]], np.array([0.5]), [-1]):
        with pytest.raises(ValueError, match=r"sample_ids?(\[0\])? must"):
            s.read_packed(bad)
    # Any iterable of ids reads in its order; a set has none, and one id is not a batch.
    ids = [int(x) for x in s.sample_ids()[:3]]
    want = s.read_packed(ids)
    for given in (iter(ids), dict.fromkeys(ids).keys(), (x for x in ids)):
        got = s.read_packed(given)  # type: ignore[arg-type]
        assert got.sample_ids.tolist() == ids
        assert np.array_equal(got.topk_ids, want.topk_ids)
    with pytest.raises(ValueError, match="is a set, which has no order"):
        s.read_batch(set(ids))
    with pytest.raises(ValueError, match="got the single id 3"):
        s.read_batch(3)  # type: ignore[arg-type]
    import torch

    got = s.read_packed(torch.tensor(ids))
    assert got.sample_ids.tolist() == ids
    empty = s.read_packed([])
    assert empty.input_ids.shape == (0,) and empty.offsets.tolist() == [0]
    assert 12345 not in s and "0" not in s and 0 in s
    # One id in any integer form that says it is one (__index__): a 0-d torch tensor too;
    # never a bool, a float or a float tensor.
    first = ids[0]
    assert s[torch.tensor(first)].sample_id == first and torch.tensor(first) in s
    assert s[np.uint64(first)].sample_id == first
    for bad, named in (
        (True, "bool"),
        (torch.tensor(True), "Tensor"),
        (torch.tensor(1.0), "Tensor"),
    ):
        with pytest.raises(ValueError, match=f"sample_id must be an integer, got {named}"):
            s[bad]  # type: ignore[index]
        assert bad not in s
    # A one-element tensor is not one id (torch's __index__ would take it): a slice of ids
    # meant as a batch must not read as one record.
    for bad in (torch.tensor([first]), torch.tensor([[first]])):
        with pytest.raises(ValueError, match=r"must be an integer, got Tensor of shape \("):
            s[bad]  # type: ignore[index]
        assert bad not in s
    with pytest.raises(ValueError, match=r"sample_ids\[1\] must be an integer, got list"):
        s.read_batch([first, [first]])  # type: ignore[list-item]


def test_damaged_shard_version_is_corruption_naming_the_shard(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """A flipped bit in a shard header's version field of a version-1 store is damage (the
    manifest's version is known), not a newer format: CorruptStoreError naming the shard."""
    with lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, chunk_positions=2, shard_size=200) as w:
        for sid in range(6):
            w.add(sid, *make_topk(rng, 3, K, V))
    shards = lc.open_store(tmp_path / "s").meta["shards"]
    assert len(shards) >= 2
    path = tmp_path / "s" / shards[1]["file"]
    data = bytearray(path.read_bytes())
    data[9] ^= 0x20  # format version 1 -> 8193
    path.write_bytes(bytes(data))
    with pytest.raises(lc.CorruptStoreError, match=r"shard 1.*format version 8193.*damaged"):
        lc.open_store(tmp_path / "s")
    assert not lc.verify_store(tmp_path / "s")["ok"]


def test_a_writer_dropped_unclosed_warns(tmp_path: Path, rng: np.random.Generator) -> None:
    """Dropped without close(): what was added since the last commit is discarded, as an
    exception would discard it, and a RuntimeWarning says so; a writer with nothing to lose
    gets the usual ResourceWarning; a closed one nothing."""
    import gc
    import warnings

    w = lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K)
    w.add(0, *_good(rng))
    w.commit()
    w.add(1, *_good(rng))
    w.add(2, *_good(rng))
    with pytest.warns(RuntimeWarning, match=r"the 2 sample\(s\) added since its last commit"):
        del w
        gc.collect()
    assert lc.open_store(tmp_path / "s").sample_ids().tolist() == [0]
    w = lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, mode="a")
    with pytest.warns(ResourceWarning, match="unclosed StoreWriter"):
        del w
        gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, mode="a") as w:
            w.add(3, *_good(rng))
        del w
        w = lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, mode="a")
        w.abort()
        del w
        gc.collect()
    assert len(lc.open_store(tmp_path / "s")) == 2


def test_replaced_shards_that_cannot_be_deleted_are_warned_of(
    committed: Path, rng: np.random.Generator
) -> None:
    """mode="w" deletes the replaced store's shard files after its commit; one it cannot
    delete (a directory stands at its name) gets a RuntimeWarning naming the file, the error
    and clean, where it used to stay without a word. The commit stands."""
    old = json.loads((committed / "manifest.json").read_text())["manifest"]["shards"]
    blocked = committed / old[0]["file"]
    make_undeletable(blocked)
    with pytest.warns(RuntimeWarning, match="could not delete 1 shard file") as caught:
        with lc.StoreWriter(committed, vocab_size=V, k=K, mode="w") as w:
            w.add(9, *_good(rng))
    message = str(caught[0].message)
    assert old[0]["file"] in message and "Is a directory" in message, message
    assert caught[0].filename == __file__  # the with statement, not the library
    assert f"logitcache clean {committed}" in message
    assert lc.open_store(committed).sample_ids().tolist() == [9]
    assert lc.verify_store(committed)["orphans"] == [old[0]["file"]]


def test_copy_store_replacing_a_store_warns_at_its_caller(
    tmp_path: Path, committed: Path, rng: np.random.Generator
) -> None:
    """copy_store(mode="w") over a store whose shard it cannot delete warns as a writer does,
    pointing at the call of copy_store (it pointed inside the library); a failed copy aborts
    and keeps the store it was to replace."""
    with lc.StoreWriter(tmp_path / "dest", vocab_size=V, k=K) as w:
        w.add(50, *_good(rng))
    old = json.loads((tmp_path / "dest" / "manifest.json").read_text())["manifest"]["shards"]
    make_undeletable(tmp_path / "dest" / old[0]["file"])
    with pytest.warns(RuntimeWarning, match="could not delete 1 shard file") as caught:
        lc.copy_store(committed, tmp_path / "dest", mode="w")
    assert caught[0].filename == __file__, caught[0].filename
    assert (
        lc.open_store(tmp_path / "dest").sample_ids().tolist()
        == lc.open_store(committed).sample_ids().tolist()
    )
    with pytest.raises(lc.MissingSampleError):
        lc.copy_store(committed, tmp_path / "dest", mode="w", sample_ids=[12345])
    with lc.StoreWriter(tmp_path / "other", vocab_size=V, k=K) as w:
        w.add(7, *_good(rng))
    # A row a coarse codec rounded up is refused mid-copy when re-encoded (test_copy.py).
    with lc.StoreWriter(tmp_path / "coarse", vocab_size=10, k=4, codec="abs:0.3") as w:
        lp = np.log(np.array([[0.3044, 0.2935, 0.2307, 0.1506]], np.float32))
        w.add(1, np.array([1]), np.array([[3, 4, 5, 6]]), lp)
    with pytest.raises(lc.InvalidRecordError, match="as decoded from"):
        lc.copy_store(tmp_path / "coarse", tmp_path / "other", mode="w", codec="lossless")
    assert lc.open_store(tmp_path / "other").sample_ids().tolist() == [7]


def test_lock_timeout_waits_for_the_other_writer(tmp_path: Path, rng: np.random.Generator) -> None:
    """With lock_timeout a writer waits for the one that holds the store (and then appends
    to what it committed); without, or when the time is up, StoreLockedError."""
    import threading
    import time

    first = lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K)
    first.add(0, *_good(rng))
    with pytest.raises(lc.StoreLockedError):
        lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, mode="a")
    start = time.monotonic()
    with pytest.raises(lc.StoreLockedError):
        lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, mode="a", lock_timeout=0.2)
    assert time.monotonic() - start >= 0.2
    closer = threading.Timer(0.3, first.close)
    closer.start()
    with lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, mode="a", lock_timeout=60) as w:
        assert first.closed, "the second writer opened while the first held the store"
        w.add(1, *_good(rng))
    closer.join()
    assert sorted(lc.open_store(tmp_path / "s").sample_ids().tolist()) == [0, 1]
    for bad in (-1, "1", True, float("nan")):
        with pytest.raises(ValueError, match="lock_timeout"):
            lc.StoreWriter(tmp_path / "s", vocab_size=V, k=K, mode="a", lock_timeout=bad)  # type: ignore[arg-type]


def test_relative_paths_survive_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    """A writer or a store opened with a relative path keeps to that store when the process
    changes its working directory: the writer committed into a same-named store under the new
    directory (replacing its manifest, without its lock), and pickling, verify() and
    copy_store of an open Store looked for it there."""
    (tmp_path / "other").mkdir()
    with lc.StoreWriter(tmp_path / "other" / "s", vocab_size=V, k=K) as w:
        w.add(100, *_good(rng))
    monkeypatch.chdir(tmp_path)
    w = lc.StoreWriter("s", vocab_size=V, k=K)
    assert w.path == str(tmp_path / "s")
    w.add(0, *_good(rng))
    monkeypatch.chdir(tmp_path / "other")
    w.add(1, *_good(rng))
    w.close()
    assert lc.open_store(tmp_path / "s").sample_ids().tolist() == [0, 1]
    assert lc.open_store(tmp_path / "other" / "s").sample_ids().tolist() == [100]
    assert lc.verify_store(tmp_path / "other" / "s")["orphans"] == []

    monkeypatch.chdir(tmp_path)
    store = lc.open_store("s")
    assert store.path == str(tmp_path / "s")
    monkeypatch.chdir(tmp_path / "other")
    assert pickle.loads(pickle.dumps(store)).sample_ids().tolist() == [0, 1]
    assert store.verify()["ok"]
    lc.copy_store(store, tmp_path / "copy")
    assert lc.open_store(tmp_path / "copy").sample_ids().tolist() == [0, 1]


def test_a_writer_shared_by_threads_takes_one_call_at_a_time(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """A call into the writer releases the GIL; another thread's call meanwhile (the resume
    check `sid in writer`, another add) waits for it, where it raised the binding's
    RuntimeError "Already borrowed"."""
    import threading

    logits = rng.standard_normal((256, 4096)).astype(np.float32)
    errors: list[BaseException] = []
    with lc.StoreWriter(tmp_path / "s", vocab_size=4096, k=8) as w:

        def add(first: int) -> None:
            try:
                for sid in range(first, first + 20):
                    w.add_logits(sid, np.arange(256), logits)
                    assert sid in w and (sid + 1000) not in w
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=add, args=(i * 100,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert len(lc.open_store(tmp_path / "s")) == 60


def test_inputs_a_reviewer_found_mishandled(tmp_path: Path, rng: np.random.Generator) -> None:
    import torch

    # Big-endian arrays: logits were refused ("must be float32 ..., got >f4"), uint64 ids
    # of 2**63 and more were read as negative.
    inp, ids, lp = _good(rng, 3)
    logits = rng.standard_normal((3, V)).astype(">f4")
    with lc.StoreWriter(tmp_path / "be", vocab_size=V, k=K) as w:
        w.add_logits(0, inp.astype(">i8"), logits)
        w.add(1, inp, ids.astype(">u8"), lp.astype(">f4"))
    with lc.StoreWriter(tmp_path / "native", vocab_size=V, k=K) as w:
        w.add_logits(0, inp, logits.astype("<f4"))
    be, native = lc.open_store(tmp_path / "be"), lc.open_store(tmp_path / "native")
    assert np.array_equal(be[0].topk_logprobs, native[0].topk_logprobs)
    assert np.array_equal(be[1].topk_ids, ids)
    with lc.StoreWriter(tmp_path / "big", vocab_size=V, k=K) as w:
        with pytest.raises(lc.InvalidRecordError, match="9223372036854775813"):
            w.add(2, inp, np.full(ids.shape, 2**63 + 5, dtype=">u8"), lp)
        # A single value where an array is expected: refused, not read as one position.
        with pytest.raises(ValueError, match="input_ids must be an array, got a single value"):
            w.add(3, np.int64(5), ids[:1], lp[:1])
        with pytest.raises(ValueError, match="logits must be 2-D"):
            w.add_logits(3, [1], np.float32(1.0))
        # Empty lists are a record of no position, as empty arrays are.
        w.add(4, [], np.zeros((0, K), np.int64), np.zeros((0, K), np.float32))
        with pytest.raises(ValueError, match=r"^topk_ids: .*inhomogeneous"):
            w.add(5, [1, 2], [[1, 2], [3]], lp[:2])
    assert lc.open_store(tmp_path / "big")[4].input_ids.shape == (0,)

    # Sample ids: a torch uint64 above 2**63 - 1 (torch's __index__ overflows), a float
    # tensor that requires grad (torch refuses numpy()).
    store = lc.open_store(tmp_path / "be")
    huge = torch.tensor(2**63, dtype=torch.uint64)
    assert huge not in store
    with pytest.raises(lc.MissingSampleError):
        store[huge]
    with pytest.raises(ValueError, match="sample_ids must be integers"):
        store.read_batch(torch.zeros(2, requires_grad=True))
    # A batch's ids are its own: the caller's array may be refilled.
    buffer = np.array([1, 0], np.uint64)
    batch, packed = store.read_batch(buffer), store.read_packed(buffer)
    buffer[:] = 7
    assert batch.sample_ids.tolist() == packed.sample_ids.tolist() == [1, 0]

    # k: counts are read back as int32.
    with pytest.raises(ValueError, match=r"k must be below 2\*\*31"):
        lc.StoreWriter(tmp_path / "k", vocab_size=100, k=2**32 - 1, kind="sampled")
    assert not (tmp_path / "k").exists()

    # Arguments of the wrong type or size: a ValueError naming the argument, where the
    # binding's OverflowError or TypeError did not.
    bad: list[tuple[dict[str, object], str]] = [
        ({"chunk_positions": 2**70}, "chunk_positions must be at most"),
        ({"shard_size": 2**70}, "shard_size must be at most"),
        ({"zstd_level": 2**40}, "zstd_level must be at most 22"),
        ({"kind": None}, "kind must be"),
        ({"codec": 0.01}, "codec must be a string"),
        ({"mode": "r"}, "mode must be"),
        ({"teacher": {"name": 5}}, r"teacher\['name'\] must be a string"),
        ({"tokenizer": {"vocab_fingerprint": b"x"}}, r"tokenizer\['vocab_fingerprint'\]"),
        ({"metadata": {"a": float("nan")}}, "metadata must be JSON-serialisable: Out of range"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            lc.StoreWriter(tmp_path / "w", **{"vocab_size": V, "k": K, **kwargs})  # type: ignore[arg-type]
        assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="cache_chunks must be at most"):
        lc.open_store(tmp_path / "be", cache_chunks=2**70)
    with pytest.raises(ValueError, match="mmap must be True, False or None"):
        lc.open_store(tmp_path / "be", mmap="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="copy_store takes no vocab_size"):
        lc.copy_store(tmp_path / "be", tmp_path / "c", vocab_size=5)
    assert not (tmp_path / "c").exists()
