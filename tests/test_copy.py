"""`copy_store` / `logitcache copy`: records written into a new store with another codec or as
a subset, each within the new codec's bound of what was read, the identity carried over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_topk, position_kl, store_contents, write_store

import logitcache as lc
from logitcache.cli import main


def _source(path: Path, kind: str = "topk", codec: str = "lossless", n: int = 12) -> None:
    write_store(
        path,
        range(0, n * 10, 10),
        lambda sid: 3 + sid // 10 % 7,
        kind=kind,
        k=6,
        seed=4,
        codec=codec,
        teacher={"name": "t", "config_fingerprint": "sha256:1"},
        tokenizer="tok",
        temperature=0.9,
        metadata={"run": 3},
        chunk_positions=16,
    )


@pytest.mark.parametrize("codec", ["abs:0.01", "abs:0.001", "kl:1e-3", "lossless"])
def test_recode(tmp_path: Path, codec: str) -> None:
    _source(tmp_path / "src")
    n = lc.copy_store(tmp_path / "src", tmp_path / "dst", codec=codec)
    src, dst = lc.open_store(tmp_path / "src"), lc.open_store(tmp_path / "dst")
    assert n == len(src) == len(dst)
    for key in ("kind", "k", "vocab_size", "temperature", "teacher", "tokenizer", "metadata"):
        assert dst.meta[key] == src.meta[key], key
    assert dst.meta["codec"]["logprobs"] == codec.split(":")[0]
    for sid in src.sample_ids():
        a, b = src[int(sid)], dst[int(sid)]
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.topk_ids, b.topk_ids)
        if codec == "lossless":
            assert np.array_equal(a.topk_logprobs, b.topk_logprobs)
        elif codec.startswith("abs"):
            err = np.abs(a.topk_logprobs - b.topk_logprobs).max()
            assert err <= dst.meta["codec"]["max_abs_error"]
        else:  # the KL bound per position, rest bucket included
            for p_row, q_row in zip(a.topk_logprobs, b.topk_logprobs, strict=True):
                assert position_kl(p_row, q_row) <= 1e-3 * (1 + 1e-6) + 1e-12
    assert lc.verify_store(tmp_path / "dst")["ok"]


def test_same_codec_by_default_and_subsets(tmp_path: Path) -> None:
    _source(tmp_path / "src", codec="abs:0.01")
    lc.copy_store(tmp_path / "src", tmp_path / "all")
    assert (
        lc.open_store(tmp_path / "all").meta["codec"]
        == lc.open_store(tmp_path / "src").meta["codec"]
    )
    want = store_contents(tmp_path / "src")
    assert lc.copy_store(tmp_path / "src", tmp_path / "some", sample_ids=[30, 10, 30]) == 2
    assert sorted(store_contents(tmp_path / "some")) == [10, 30]
    assert lc.copy_store(tmp_path / "src", tmp_path / "set", sample_ids={10, 30}) == 2
    assert sorted(store_contents(tmp_path / "set")) == [10, 30]
    n = lc.copy_store(tmp_path / "src", tmp_path / "rest", exclude_ids=np.array([0, 110]))
    assert n == 10 and sorted(store_contents(tmp_path / "rest")) == sorted(set(want) - {0, 110})
    # Input ids and target ids are carried exactly (the values: test_recode).
    got = store_contents(tmp_path / "rest")
    assert all(got[s][:2] == want[s][:2] for s in got)


def test_sampled(tmp_path: Path) -> None:
    _source(tmp_path / "src", kind="sampled", codec="abs:0.01")
    lc.copy_store(tmp_path / "src", tmp_path / "none", codec="none")
    a, b = lc.open_store(tmp_path / "src"), lc.open_store(tmp_path / "none")
    for sid in a.sample_ids():
        ra, rb = a[int(sid)], b[int(sid)]
        assert np.array_equal(ra.counts, rb.counts) and np.array_equal(ra.topk_ids, rb.topk_ids)
        assert rb.topk_logprobs is None
    with pytest.raises(ValueError, match="keeps no log-probabilities"):
        lc.copy_store(tmp_path / "none", tmp_path / "back", codec="abs:0.01")
    assert not (tmp_path / "back").exists()


def test_sampled_rows_rounded_up_by_a_coarse_codec(tmp_path: Path) -> None:
    """A coarse codec can round a sampled row's probabilities up past the 1.02 a capture may
    pass (here 0.99 becomes 1.077 under abs:0.1, each value rounded up by up to 0.094 nat):
    such a store still copies to another codec, whose bound then holds against the decoded
    values."""
    path = tmp_path / "coarse"
    ids = np.array([[3, 4, 5, 6]])
    counts = np.array([[1, 1, 1, 1]])
    lp = np.log(np.array([[0.2475, 0.2475, 0.2475, 0.2475]], np.float32))  # mass 0.99
    with lc.StoreWriter(path, vocab_size=10, k=4, kind="sampled", codec="abs:0.1") as w:
        w.add_sampled(0, np.array([1]), ids, counts, lp)
    decoded = lc.open_store(path)[0].topk_logprobs
    assert decoded is not None and np.exp(decoded.astype(np.float64)).sum() > 1.02
    lc.copy_store(path, tmp_path / "lossless", codec="lossless")
    again = lc.open_store(tmp_path / "lossless")[0].topk_logprobs
    assert again is not None and np.array_equal(again, decoded)


def test_topk_rows_rounded_up_by_a_coarse_codec(tmp_path: Path) -> None:
    """A top-K store under a coarse abs bound holds rows whose decoded mass is above what a
    writer takes: re-encoding one is refused, naming the sample, the source's codec and the
    way out (its own codec), which copies it."""
    path = tmp_path / "coarse"
    # Mass 0.979, decoded as [-1, -1, -1.5, -2]: mass 1.094.
    lp = np.log(np.array([[0.3044, 0.2935, 0.2307, 0.1506]], np.float32))
    with lc.StoreWriter(path, vocab_size=10, k=4, codec="abs:0.3") as w:
        w.add(0, np.array([1]), np.array([[3, 4, 5, 6]]), lp)
        w.add(5, np.array([1]), np.array([[3, 4, 5, 6]]), lp)
    decoded = lc.open_store(path)[5].topk_logprobs
    assert np.exp(decoded.astype(np.float64)).sum() > 1.02
    with pytest.raises(lc.InvalidRecordError) as e:
        lc.copy_store(path, tmp_path / "lossless", codec="lossless", sample_ids=[5])
    assert e.value.sample_id == 5
    assert "sample 5 as decoded from" in str(e.value) and "'abs:" in str(e.value), str(e.value)
    assert "codec=None" in str(e.value)
    assert not (tmp_path / "lossless").exists()
    lc.copy_store(path, tmp_path / "same", sample_ids=[5])
    assert np.array_equal(lc.open_store(tmp_path / "same")[5].topk_logprobs, decoded)


def test_refusals(tmp_path: Path) -> None:
    _source(tmp_path / "src")
    with pytest.raises(lc.MissingSampleError, match="sample id 5 "):
        lc.copy_store(tmp_path / "src", tmp_path / "d", sample_ids=[10, 5])
    with pytest.raises(lc.MissingSampleError, match="nor are 1 more"):
        lc.copy_store(tmp_path / "src", tmp_path / "d", exclude_ids=[7, 8])
    with pytest.raises(ValueError, match="not both"):
        lc.copy_store(tmp_path / "src", tmp_path / "d", sample_ids=[0], exclude_ids=[10])
    assert not (tmp_path / "d").exists()
    lc.copy_store(tmp_path / "src", tmp_path / "d", sample_ids=[0])
    with pytest.raises(lc.StoreExistsError):
        lc.copy_store(tmp_path / "src", tmp_path / "d", sample_ids=[10])
    with pytest.raises(lc.DuplicateSampleError):
        lc.copy_store(tmp_path / "src", tmp_path / "d", sample_ids=[0], mode="a")
    assert lc.copy_store(tmp_path / "src", tmp_path / "d", sample_ids=[10], mode="a") == 1
    assert sorted(lc.open_store(tmp_path / "d").sample_ids().tolist()) == [0, 10]
    # Appending takes the destination's codec, unless told otherwise.
    lc.copy_store(tmp_path / "src", tmp_path / "k", sample_ids=[0], codec="kl:1e-3")
    lc.copy_store(tmp_path / "src", tmp_path / "k", sample_ids=[10], mode="a")
    with pytest.raises(lc.StoreMismatchError, match="codec"):
        lc.copy_store(tmp_path / "src", tmp_path / "k", sample_ids=[20], mode="a", codec="lossless")
    assert len(lc.open_store(tmp_path / "k")) == 2


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _source(tmp_path / "src")
    (tmp_path / "ids.txt").write_text("# keep these\n10\n\n20  # and this\n")
    argv = ["copy", "--codec", "abs:0.01", "--ids", str(tmp_path / "ids.txt"), "--no-progress"]
    assert main([*argv, str(tmp_path / "src"), str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("COPIED 2 samples") and "abs (step" in out, out
    assert sorted(lc.open_store(tmp_path / "d").sample_ids().tolist()) == [10, 20]
    argv = ["copy", "--append", "--json", "--exclude-ids", str(tmp_path / "ids.txt")]
    assert main([*argv, str(tmp_path / "src"), str(tmp_path / "d")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["copied"], report["num_samples"], report["codec"]["logprobs"]) == (10, 12, "abs")
    store = lc.open_store(tmp_path / "d")
    assert report["num_positions"] == store.num_positions
    assert report["shard_bytes"] == sum(s["bytes"] for s in store.meta["shards"])
    (tmp_path / "bad.txt").write_text("10\nx\n")
    argv = ["copy", "--exclude-ids", str(tmp_path / "bad.txt"), str(tmp_path / "src")]
    assert main([*argv, str(tmp_path / "e")]) == 2
    assert "one sample id (0 to 2^64 - 1) per line" in capsys.readouterr().err
    (tmp_path / "neg.txt").write_text("-1\n")
    argv = ["copy", "--ids", str(tmp_path / "neg.txt"), str(tmp_path / "src")]
    assert main([*argv, str(tmp_path / "e")]) == 2
    assert "one sample id" in capsys.readouterr().err
    both = ["--ids", str(tmp_path / "none.txt"), "--exclude-ids", str(tmp_path / "none.txt")]
    with pytest.raises(SystemExit):
        main(["copy", *both, str(tmp_path / "src"), str(tmp_path / "d2")])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["copy", "--append", str(tmp_path / "src"), str(tmp_path / "src")]) == 2
    assert "is the source store itself" in capsys.readouterr().err
    assert main(["copy", str(tmp_path / "src"), str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "already holds a store" in err and "to write into it: logitcache copy --append" in err
    assert "delete it first" in err
    # An empty directory: --append writes a new store into it.
    (tmp_path / "empty-dir").mkdir()
    assert main(["copy", str(tmp_path / "src"), str(tmp_path / "empty-dir")]) == 2
    err = capsys.readouterr().err
    assert "logitcache copy --append" in err and "delete it first" not in err, err
    # A file there: no hint to append to it.
    (tmp_path / "file").write_bytes(b"")
    assert main(["copy", str(tmp_path / "src"), str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "--append" not in err, err
    # The empty copy's summary says so (there is no bytes per token of nothing).
    (tmp_path / "none.txt").write_text("")
    argv = ["copy", "--ids", str(tmp_path / "none.txt"), str(tmp_path / "src")]
    assert main([*argv, str(tmp_path / "empty")]) == 0
    assert "holds 0 samples, no positions" in capsys.readouterr().out


@pytest.mark.parametrize("kind_codec", [("topk", "kl:1e-3"), ("sampled", "abs:0.01")])
def test_the_same_codec_copies_what_is_stored(
    tmp_path: Path, kind_codec: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """With the source's codec, records are copied as stored: a whole copy reads back bit for
    bit (encoding the decoded kl values again would move most records: test_recode's
    kl:1e-3 path), a subset keeps the source's order, and only records that shared a chunk
    with one left behind can move."""
    kind, codec = kind_codec
    _source(tmp_path / "src", kind=kind, codec=codec, n=40)
    want = store_contents(tmp_path / "src")
    order = lc.open_store(tmp_path / "src").sample_ids().tolist()
    assert lc.copy_store(tmp_path / "src", tmp_path / "all", progress=True) == 40
    assert "copy" in capsys.readouterr().err
    assert store_contents(tmp_path / "all") == want
    drop = [order[5], order[20]]
    lc.copy_store(tmp_path / "src", tmp_path / "some", exclude_ids=drop)
    some = lc.open_store(tmp_path / "some")
    assert some.sample_ids().tolist() == [s for s in order if s not in drop]
    got = store_contents(tmp_path / "some")
    changed = [s for s in got if got[s] != want[s]]
    # Records of 3-9 positions in chunks closed at 16: a chunk holds at most 5 of them.
    assert len(changed) <= 8, changed
    assert all(got[s][:2] == want[s][:2] for s in got)
    assert lc.verify_store(tmp_path / "some")["ok"]


def test_a_source_changed_since_it_was_opened(tmp_path: Path) -> None:
    """copy_store given an open Store copies that store: one replaced or rewritten at its
    path since it was opened is refused for a copy with its codec (which reads the files at
    the path), with nothing written, where it copied the files there instead (a reviewer
    found the two codec paths copying different data); another codec decodes through the
    open Store. Samples appended since do not change what it holds."""
    _source(tmp_path / "src", n=20)
    store = lc.open_store(tmp_path / "src")
    lc.remove_samples(tmp_path / "src", [30, 40])
    with pytest.raises(lc.StoreMismatchError, match="replaced or rewritten since"):
        lc.copy_store(store, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    lc.copy_store(store, tmp_path / "d", codec="abs:0.01")
    assert len(lc.open_store(tmp_path / "d")) == 20

    _source(tmp_path / "src2", n=3)
    store = lc.open_store(tmp_path / "src2")
    with lc.StoreWriter(tmp_path / "src2", mode="w", vocab_size=300, k=6, codec="lossless") as w:
        for sid in store.sample_ids().tolist():
            r = store[sid]
            w.add(sid, r.input_ids + 1, r.topk_ids, r.topk_logprobs)
    with pytest.raises(lc.StoreMismatchError, match="replaced or rewritten"):
        lc.copy_store(store, tmp_path / "e")
    assert not (tmp_path / "e").exists()

    _source(tmp_path / "src3", n=3)
    store = lc.open_store(tmp_path / "src3")
    want = store_contents(tmp_path / "src3")
    with lc.StoreWriter(
        tmp_path / "src3", mode="a", vocab_size=300, k=6, codec="lossless", temperature=0.9
    ) as w:
        w.add(999, *make_topk(np.random.default_rng(0), 4, 6, 300))
    assert lc.copy_store(store, tmp_path / "f") == 3
    assert store_contents(tmp_path / "f") == want
