"""The independent reader (written from FORMAT.md alone) agrees bit for bit with the Rust
reader on random stores, and rejects damaged ones."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_sampled, make_topk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from independent_reader import read_store

import logitcache as lc

TOPK_CODECS = ["lossless", "abs:0.01", "abs:0.1", "abs:1e-4", "kl:1e-4", "kl:1e-2"]
SAMPLED_CODECS = ["none", "lossless", "abs:0.01", "abs:0.1", "abs:1e-4"]
# Log-probabilities far below every quantization grid (-2^24 s is at most -2^21 nats here).
VERY_NEGATIVE = [-3.0e5, -1.0e6, -2.5e6, -1.0e7, -1.0e20, -3.0e38]
DENSE_VOCAB = 3000  # up to here, records come from a real softmax over the whole vocabulary

PROPERTY = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
vocab_sizes = st.one_of(
    st.integers(1, DENSE_VOCAB),
    st.sampled_from([2**16, 2**24 + 3, 2**31 - 1]),
    st.integers(DENSE_VOCAB + 1, 2**31 - 1),
)
sample_ids = st.lists(
    st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63, 2**64 - 1])),
    min_size=12,
    max_size=12,
    unique=True,
)


# --------------------------------------------------------------------------------------------
# Random records


def distinct_ids_near_top(
    rng: np.random.Generator, rows: int, width: int, vocab: int, span: int = 5000
) -> np.ndarray:
    """[rows, width] ids, distinct within each row, from the top ``span`` ids of a large
    vocabulary."""
    span = min(vocab, max(4 * width, span))
    picks = rng.integers(0, span, size=(rows, width))
    for row in range(rows):
        if len(np.unique(picks[row])) < width:
            picks[row] = rng.choice(span, size=width, replace=False)
    return vocab - 1 - picks.astype(np.int64)


def random_topk(
    rng: np.random.Generator, length: int, k: int, vocab: int, special: bool, span: int = 5000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A valid top-K record; with ``special``, some rows end in very negative values and -inf
    (a masked vocabulary), and some rows are certain (-0.0 then -inf)."""
    if vocab <= DENSE_VOCAB:
        input_ids, ids, lp = make_topk(rng, length, k, vocab)
    else:
        input_ids = vocab - 1 - rng.integers(0, min(vocab, 20000), size=length)
        ids = distinct_ids_near_top(rng, length, k, vocab, span)
        lp = make_topk(rng, length, k, k + 8)[2]
    if special:
        for row in range(length):
            choice = rng.integers(0, 4)
            if choice == 1:  # a tail of very negative values, then -inf
                start = rng.integers(0, k + 1)
                pool = np.array([*VERY_NEGATIVE, -np.inf], dtype=np.float32)
                tail = np.sort(rng.choice(pool, size=k - start))[::-1]
                lp[row, start:] = np.minimum(tail, lp[row, start - 1] if start else 0.0)
            elif choice == 2:  # certain: probability 1 on the first id
                lp[row] = -np.inf
                lp[row, 0] = -0.0
    return input_ids, ids, lp.astype(np.float32)


def random_sampled(
    rng: np.random.Generator, length: int, n: int, vocab: int, special: bool, span: int = 5000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A valid sampled record (ids / counts / logprobs padded with -1 / 0 / 0)."""
    if vocab <= DENSE_VOCAB:
        input_ids, ids, counts, lp = make_sampled(rng, length, n, vocab)
    else:
        input_ids = vocab - 1 - rng.integers(0, min(vocab, 20000), size=length)
        widths = rng.integers(1, min(n, 24) + 1, size=length)
        m = int(widths.max()) if length else 1
        ids = np.full((length, m), -1, dtype=np.int64)
        counts = np.zeros((length, m), dtype=np.int64)
        lp = np.zeros((length, m), dtype=np.float32)
        for row, w in enumerate(widths):
            ids[row, :w] = distinct_ids_near_top(rng, 1, w, vocab, span)[0]
            counts[row, :w] = 1 + rng.multinomial(n - w, np.full(w, 1.0 / w))
            lp[row, :w] = -rng.exponential(4.0, size=w)
    if special and length:
        mask = counts > 0
        pool = np.array([*VERY_NEGATIVE, -0.0], dtype=np.float32)
        pick = mask & (rng.random(size=mask.shape) < 0.2)
        lp[pick] = rng.choice(pool, size=int(pick.sum()))
    return input_ids, ids, counts, lp


# --------------------------------------------------------------------------------------------
# Comparison with the Rust reader


def assert_same_as_rust(path: Path) -> dict[int, dict[str, Any]]:
    """Every record of the independent reader equals the Rust reader's, log-probabilities bit
    for bit; returns the independent reader's records."""
    ours = read_store(path)
    store = lc.open_store(path)
    records = ours["records"]
    assert list(records) == [int(s) for s in store.sample_ids()]
    for key in ("kind", "k", "vocab_size", "num_samples", "num_positions", "codec"):
        assert ours["manifest"][key] == store.meta[key], key
    for sample_id, rec in records.items():
        rust = store[sample_id]
        assert rec["input_ids"].dtype == np.int64
        assert np.array_equal(rec["input_ids"], rust.input_ids)
        if store.kind == "topk":
            assert rec["ids"].dtype == np.int64 and rec["logprobs"].dtype == np.float32
            assert rec["ids"].shape == rust.topk_ids.shape
            assert np.array_equal(rec["ids"], rust.topk_ids)
            assert np.array_equal(
                rec["logprobs"].view(np.uint32), rust.topk_logprobs.view(np.uint32)
            )
            continue
        # Rust pads sampled rows to [L, M] with id -1, count 0, log-probability -inf.
        lens = rec["row_lens"]
        assert rust.topk_ids.shape == (len(lens), int(lens.max()) if len(lens) else 0)
        real = np.arange(rust.topk_ids.shape[1])[None, :] < lens[:, None]
        assert np.array_equal(rust.topk_ids[real], rec["ids"])
        assert np.array_equal(rust.counts[real], rec["counts"])
        assert np.all(rust.topk_ids[~real] == -1) and np.all(rust.counts[~real] == 0)
        if rec["logprobs"] is None:
            assert rust.topk_logprobs is None
        else:
            got = rust.topk_logprobs[real].view(np.uint32)
            assert np.array_equal(got, rec["logprobs"].view(np.uint32))
            assert np.all(np.isneginf(rust.topk_logprobs[~real]))
    return records


def assert_matches_written(
    records: dict[int, dict[str, Any]], written: dict[int, tuple], kind: str, codec: str
) -> None:
    """The independent reader returns the ids that were written (and lossless values)."""
    assert set(records) == set(written)
    for sample_id, arrays in written.items():
        rec = records[sample_id]
        assert np.array_equal(rec["input_ids"], arrays[0])
        if kind == "topk":
            assert np.array_equal(rec["ids"], arrays[1])
            want_lp = arrays[2]
        else:
            real = arrays[2] > 0
            assert np.array_equal(rec["row_lens"], real.sum(axis=1))
            assert np.array_equal(rec["ids"], arrays[1][real])
            assert np.array_equal(rec["counts"], arrays[2][real])
            want_lp = arrays[3][real]
        if codec == "lossless":
            assert np.array_equal(
                rec["logprobs"].reshape(want_lp.shape).view(np.uint32), want_lp.view(np.uint32)
            )


# --------------------------------------------------------------------------------------------
# Property tests


@PROPERTY
@given(
    codec=st.sampled_from(TOPK_CODECS),
    k=st.integers(1, 20),
    vocab=vocab_sizes,
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    appended=st.lists(st.integers(0, 30), max_size=4),
    sids=sample_ids,
    chunk_positions=st.sampled_from([1, 3, 7, 64, 4096]),
    shard_size=st.sampled_from([2000, 2**30]),
    temperature=st.sampled_from([1.0, 0.7, 2.5]),
    special=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_topk_agrees_with_rust(
    tmp_path_factory: pytest.TempPathFactory,
    codec: str,
    k: int,
    vocab: int,
    lengths: list[int],
    appended: list[int],
    sids: list[int],
    chunk_positions: int,
    shard_size: int,
    temperature: float,
    special: bool,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    vocab = max(vocab, k)
    path = tmp_path_factory.mktemp("topk") / "store"
    written: dict[int, tuple] = {}
    options: dict[str, Any] = dict(
        vocab_size=vocab, k=k, chunk_positions=chunk_positions, shard_size=shard_size
    )
    with lc.StoreWriter(
        path,
        codec=codec,
        temperature=temperature,
        teacher={"name": "téacher", "config_fingerprint": None},
        metadata={"run": "ünïcode", "n": [1, 2.5]},
        **options,
    ) as w:
        for sid, length in zip(sids, lengths, strict=False):
            written[sid] = random_topk(rng, length, k, vocab, special)
            w.add(sid, *written[sid])
    if appended:
        more = sids[len(lengths) : len(lengths) + len(appended)]
        with lc.StoreWriter(path, mode="a", temperature=temperature, **options) as w:
            for sid, length in zip(more, appended, strict=False):
                written[sid] = random_topk(rng, length, k, vocab, special)
                w.add(sid, *written[sid])
    records = assert_same_as_rust(path)
    assert_matches_written(records, written, "topk", codec)


@PROPERTY
@given(
    codec=st.sampled_from(SAMPLED_CODECS),
    n=st.integers(1, 40),
    vocab=vocab_sizes,
    lengths=st.lists(st.integers(0, 25), min_size=1, max_size=6),
    appended=st.lists(st.integers(0, 25), max_size=4),
    sids=sample_ids,
    chunk_positions=st.sampled_from([1, 3, 7, 64, 4096]),
    shard_size=st.sampled_from([2000, 2**30]),
    special=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_sampled_agrees_with_rust(
    tmp_path_factory: pytest.TempPathFactory,
    codec: str,
    n: int,
    vocab: int,
    lengths: list[int],
    appended: list[int],
    sids: list[int],
    chunk_positions: int,
    shard_size: int,
    special: bool,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("sampled") / "store"
    written: dict[int, tuple] = {}
    options: dict[str, Any] = dict(
        vocab_size=vocab, k=n, kind="sampled", chunk_positions=chunk_positions,
        shard_size=shard_size,
    )  # fmt: skip

    def add(w: lc.StoreWriter, sid: int, length: int) -> None:
        written[sid] = random_sampled(rng, length, n, vocab, special)
        input_ids, ids, counts, lp = written[sid]
        w.add_sampled(sid, input_ids, ids, counts, None if codec == "none" else lp)

    with lc.StoreWriter(
        path, codec=codec, tokenizer={"name": "tök", "vocab_fingerprint": None}, **options
    ) as w:
        for sid, length in zip(sids, lengths, strict=False):
            add(w, sid, length)
    if appended:
        more = sids[len(lengths) : len(lengths) + len(appended)]
        with lc.StoreWriter(path, mode="a", **options) as w:
            for sid, length in zip(more, appended, strict=False):
                add(w, sid, length)
    records = assert_same_as_rust(path)
    assert_matches_written(records, written, "sampled", codec)


@pytest.mark.parametrize(
    ("kind", "codec"), [("topk", "abs:1e-4"), ("topk", "kl:1e-4"), ("sampled", "lossless")]
)
def test_many_distinct_ids_in_one_chunk(tmp_path: Path, kind: str, codec: str) -> None:
    """Over 8160 distinct ids in a chunk: rank codes with one extension byte and with a
    varint, and -inf / very negative tails."""
    rng = np.random.default_rng(7)
    vocab, width, length = 2**31 - 1, 20, 1000
    path = tmp_path / "store"
    with lc.StoreWriter(path, vocab_size=vocab, k=width, kind=kind, codec=codec) as w:
        if kind == "topk":
            w.add(2**64 - 1, *random_topk(rng, length, width, vocab, True, span=10**6))
        else:
            w.add_sampled(0, *random_sampled(rng, length, width, vocab, True, span=10**6))
    (record,) = assert_same_as_rust(path).values()
    assert len(np.unique(np.concatenate([record["input_ids"], record["ids"].ravel()]))) > 8160


def test_empty_store_and_empty_records(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with lc.StoreWriter(path, vocab_size=10, k=3):
        pass
    assert read_store(path)["records"] == {}
    with lc.StoreWriter(path, vocab_size=10, k=3, mode="a") as w:
        for sid in range(3):
            w.add(sid, np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros((0, 3)))
    records = assert_same_as_rust(path)
    assert all(rec["ids"].shape == (0, 3) for rec in records.values())


# --------------------------------------------------------------------------------------------
# Damaged stores


def small_store(path: Path) -> Path:
    """A top-K store of several shards of several chunks each."""
    rng = np.random.default_rng(3)
    with lc.StoreWriter(
        path, vocab_size=300, k=5, codec="abs:0.01", chunk_positions=6, shard_size=700
    ) as w:
        for sid in range(6):
            w.add(sid, *random_topk(rng, 5, 5, 300, special=True))
    return path


def shard_regions(shard: Path) -> list[tuple[str, int, int]]:
    """(region, start, end) of a shard file, found from its trailer."""
    data = shard.read_bytes()
    footer_offset, footer_len = struct.unpack_from("<QQ", data, len(data) - 32)
    return [
        ("header", 0, 64),
        ("chunk", 64, footer_offset),
        ("footer", footer_offset, footer_offset + footer_len),
        ("trailer", len(data) - 32, len(data)),
    ]


def flip(path: Path, offset: int) -> bytes:
    """Flip every bit of one byte; returns the original contents."""
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[offset] ^= 0xFF
    path.write_bytes(bytes(damaged))
    return original


def rust_rejects(path: Path) -> bool:
    try:
        store = lc.open_store(path)
        for sid in store.sample_ids():
            store[int(sid)]
    except lc.StoreError:
        return True
    return False


def test_every_flipped_byte_is_rejected(tmp_path: Path) -> None:
    path = small_store(tmp_path / "store")
    shards = sorted((path / "shards").iterdir())
    assert len(shards) >= 2
    regions = shard_regions(shards[0])
    assert sum(1 for name, *_ in regions if name == "chunk") == 1
    targets = [(path / "manifest.json", "manifest", 0, (path / "manifest.json").stat().st_size)]
    targets += [(shards[0], name, start, end) for name, start, end in regions]
    for file, region, start, end in targets:
        assert end > start
        for offset in range(start, end):
            original = flip(file, offset)
            try:
                with pytest.raises(ValueError, match=region):
                    read_store(path)
                assert rust_rejects(path), (region, offset)
            finally:
                file.write_bytes(original)
    assert_same_as_rust(path)


def rewrite_manifest(path: Path, edit: Any) -> None:
    """Apply ``edit`` to the manifest body and write it back with a valid envelope CRC."""
    body = json.loads((path / "manifest.json").read_bytes()[40:-2])
    edit(body)
    text = json.dumps(body, separators=(",", ":")).encode()
    envelope = b'{"checksum":"crc32:%08x","manifest":%s}\n' % (zlib.crc32(text), text)
    (path / "manifest.json").write_bytes(envelope)


def duplicate_first_shard(m: dict[str, Any]) -> None:
    """List shard 0 twice (with consistent totals): its sample ids then appear twice."""
    m["shards"].append(dict(m["shards"][0]))
    m["num_samples"] += m["shards"][0]["num_samples"]
    m["num_positions"] += m["shards"][0]["num_positions"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=2), "newer"),
        (lambda m: m["shards"][0].update(file="shards/../../x-0000000000000000.lcs"), "name"),
        (
            lambda m: m["shards"][0].update(file="shards/00000-" + m["shards"][0]["uid"] + ".lcs"),
            "name",
        ),
        (lambda m: m["shards"][0].update(checksum="crc32:00000000"), "CRC-32"),
        (lambda m: m["shards"][1].update(bytes=m["shards"][1]["bytes"] + 1), "bytes"),
        (lambda m: m.update(num_samples=m["num_samples"] + 1), "num_samples"),
        (lambda m: m.update(vocab_size=m["vocab_size"] + 1), "vocab_size"),
        (lambda m: m.update(temperature=2.0), "temperature"),
        (lambda m: m["codec"].update(logprobs="lossless", step=None, max_abs_error=None), "codec"),
        (duplicate_first_shard, "twice"),
        (lambda m: m.pop("metadata"), "metadata"),
    ],
)
def test_manifest_rules(tmp_path: Path, edit: Any, message: str) -> None:
    path = small_store(tmp_path / "store")
    rewrite_manifest(path, edit)
    with pytest.raises(ValueError, match=message):
        read_store(path)
