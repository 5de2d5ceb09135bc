"""The independent reader (written from FORMAT.md alone) agrees bit for bit with the Rust
reader on random stores, and rejects damaged ones."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_sampled, make_topk, write_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from independent_reader import CHUNK_ENTRY, KNOWN_TAGS, Where, read_chunk_streams, read_store

import logitcache as lc

TOPK_CODECS = ["lossless", "abs:0.01", "abs:0.1", "abs:1e-4", "kl:1e-4", "kl:1e-2"]
SAMPLED_CODECS = ["none", "lossless", "abs:0.01", "abs:0.1", "abs:1e-4"]
# Log-probabilities far below every quantization grid (-2^24 s is at most -2^21 nats here).
VERY_NEGATIVE = [-3.0e5, -1.0e6, -2.5e6, -1.0e7, -1.0e20, -3.0e38]
# The kl writer turns a value near the float32 limit after a finite one into a level above
# 2^24 that no reader accepts (test_kl_writer_float32_extreme_tail): kept out of kl stores.
KL_SAFE_VERY_NEGATIVE = [-3.0e5, -1.0e6, -2.5e6, -1.0e7, -1.0e20]
DENSE_VOCAB = 3000  # up to here, records come from a real softmax over the whole vocabulary


def abs_step(codec: str) -> float | None:
    """The quantization step of an ``abs:<bound>`` codec: the largest s = m 2^-e (m in 1, 3,
    5, 7; 2^-13 <= s <= 2) with s / 2 <= bound (None for other codecs)."""
    if not codec.startswith("abs:"):
        return None
    bound = float(codec[4:])
    steps = [m * 2.0**-e for m in (1, 3, 5, 7) for e in range(1, 14)]
    return max(s for s in steps if 2**-13 <= s <= 2 and s / 2 <= bound)


def abs_max_level(step: float) -> int:
    """Largest level of the step m 2^-e: q m <= 2^24."""
    m = step / 2.0 ** np.floor(np.log2(step))  # 1, 1.5, 1.25 or 1.75
    return 2**24 // {1.0: 1, 1.5: 3, 1.25: 5, 1.75: 7}[m]


def very_negative_pool(codec: str) -> list[float]:
    """Very negative log-probabilities for a codec: for abs, also -2^24 s (the lowest finite
    value) and the next float32 below it (level 2^24 + 2: -inf in top-K stores)."""
    if codec.startswith("kl"):
        return KL_SAFE_VERY_NEGATIVE
    step = abs_step(codec)
    if step is None:
        return VERY_NEGATIVE
    lowest = np.float32(-abs_max_level(step) * step)
    return [*VERY_NEGATIVE, float(lowest), float(np.nextafter(lowest, np.float32(-np.inf)))]


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
    rng: np.random.Generator,
    length: int,
    k: int,
    vocab: int,
    special: bool,
    span: int = 5000,
    very_negative: list[float] = VERY_NEGATIVE,
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
                pool = np.array([*very_negative, -np.inf], dtype=np.float32)
                tail = np.sort(rng.choice(pool, size=k - start))[::-1]
                lp[row, start:] = np.minimum(tail, lp[row, start - 1] if start else 0.0)
            elif choice == 2:  # certain: probability 1 on the first id
                lp[row] = -np.inf
                lp[row, 0] = -0.0
    return input_ids, ids, lp.astype(np.float32)


def random_sampled(
    rng: np.random.Generator,
    length: int,
    n: int,
    vocab: int,
    special: bool,
    span: int = 5000,
    very_negative: list[float] = VERY_NEGATIVE,
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
    mask = counts > 0
    if special and length:
        pool = np.array([*very_negative, -0.0], dtype=np.float32)
        pick = mask & (rng.random(size=mask.shape) < 0.2)
        lp[pick] = rng.choice(pool, size=int(pick.sum()))
    # The probabilities of distinct ids of one distribution add up to at most 1: a row with
    # an id of probability 1 (-0.0) gives every other id a probability of 0 (a very negative
    # value), and a row adding up to more than 1 is scaled down.
    for row in range(length):
        live = np.flatnonzero(mask[row])
        certain = live[lp[row, live] == 0.0]
        if certain.size:
            others = live[live != certain[0]]
            lp[row, others] = very_negative[0]
            continue
        mass = np.exp(lp[row, live].astype(np.float64)).sum()
        if mass > 1.0:
            lp[row, live] = (lp[row, live] - np.log(mass)).astype(np.float32)
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


def assert_abs_rule(got: np.ndarray, want: np.ndarray, step: float, kind: str) -> None:
    """FORMAT.md 4.2 for the abs codec: every decoded value is within s/2 of the written one
    (+0.0 for level 0); a level above the largest (2^24 / m for the step m 2^-e) is -inf in
    top-K rows and the largest in sampled rows, and a top-K row whose top entry is beyond the
    fine grid (largest level times s/64 nats) is all -inf."""
    top_level = abs_max_level(step)
    level = -want.astype(np.float64) / step
    finite = level < top_level + 0.5  # (an exact tie at the edge is left to the writer)
    above = level > top_level + 0.5
    if kind == "topk" and want.size:
        top_fine = level[:, 0] * 64
        dead = top_fine > top_level + 0.5
        assert np.all(np.isneginf(got[dead]))
        finite &= (top_fine < top_level - 0.5)[:, None]
    assert np.all(np.abs(got[finite] - want[finite].astype(np.float64)) <= step / 2)
    if kind == "topk":
        assert np.all(np.isneginf(got[above]))
    else:
        assert np.all(got[above] == np.float32(-top_level * step))
    zeros = got == 0
    assert np.all(got[zeros].view(np.uint32) == 0), "abs decodes level 0 as +0.0"


def assert_matches_written(
    records: dict[int, dict[str, Any]], written: dict[int, tuple], kind: str, codec: str
) -> None:
    """The independent reader returns the ids that were written, lossless values bit for bit
    and abs values as FORMAT.md 4.2 says."""
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
        step = abs_step(codec)
        if step is not None:
            assert_abs_rule(rec["logprobs"].reshape(want_lp.shape), want_lp, step, kind)
        if codec.startswith("kl:"):
            assert_kl_rule(rec["logprobs"], want_lp, float(np.float32(codec[3:])))


def assert_kl_rule(got: np.ndarray, want: np.ndarray, bound: float) -> None:
    """FORMAT.md 4.2 for the kl codec: per position, the generalized KL divergence between
    the written row (plus its rest bucket) and the decoded one is at most the bound."""
    p = np.exp(want.astype(np.float64))
    q = np.exp(got.astype(np.float64))
    p_rest = np.maximum(0.0, 1.0 - p.sum(axis=1))
    q_rest = np.maximum(0.0, 1.0 - q.sum(axis=1))

    def plogpq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0)

    kl = plogpq(p, q).sum(axis=1) + plogpq(p_rest, q_rest)
    kl += q.sum(axis=1) + q_rest - p.sum(axis=1) - p_rest
    assert np.all(kl <= bound * (1 + 1e-6) + 1e-12), kl.max()


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
    pool = very_negative_pool(codec)
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
            written[sid] = random_topk(rng, length, k, vocab, special, very_negative=pool)
            w.add(sid, *written[sid])
    if appended:
        more = sids[len(lengths) : len(lengths) + len(appended)]
        with lc.StoreWriter(path, mode="a", temperature=temperature, **options) as w:
            for sid, length in zip(more, appended, strict=False):
                written[sid] = random_topk(rng, length, k, vocab, special, very_negative=pool)
                w.add(sid, *written[sid])
    records = assert_same_as_rust(path)
    assert read_store(path)["manifest"]["codec"]["step"] == abs_step(codec)
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
    pool = very_negative_pool(codec)
    path = tmp_path_factory.mktemp("sampled") / "store"
    written: dict[int, tuple] = {}
    options: dict[str, Any] = dict(
        vocab_size=vocab, k=n, kind="sampled", chunk_positions=chunk_positions,
        shard_size=shard_size,
    )  # fmt: skip

    def add(w: lc.StoreWriter, sid: int, length: int) -> None:
        written[sid] = random_sampled(rng, length, n, vocab, special, 5000, pool)
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
            record = random_topk(rng, length, width, vocab, True, 10**6, very_negative_pool(codec))
            w.add(2**64 - 1, *record)
        else:
            w.add_sampled(0, *random_sampled(rng, length, width, vocab, True, span=10**6))
    (record,) = assert_same_as_rust(path).values()
    assert len(np.unique(np.concatenate([record["input_ids"], record["ids"].ravel()]))) > 8160


@pytest.mark.parametrize("codec", ["kl:1e-4", "kl:1e-2"])
def test_kl_writer_float32_extreme_tail(tmp_path: Path, codec: str) -> None:
    """A row (-1e4, -3e38): the second value is beyond the kl codec's range (2^20 nats), so
    FORMAT.md 4.2 stores it as -inf (this once overflowed the writer's level arithmetic)."""
    path = tmp_path / "store"
    with lc.StoreWriter(path, vocab_size=45, k=2, codec=codec) as w:
        w.add(1, np.array([1]), np.array([[3, 4]]), np.array([[-1.0e4, -3.0e38]], np.float32))
    (record,) = assert_same_as_rust(path).values()
    assert record["logprobs"][0, 0] == -1.0e4 and record["logprobs"][0, 1] == -np.inf


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


def rewrite_chunks(
    path: Path, transform: Callable[[dict[int, bytes]], list[tuple[int, bytes]]]
) -> None:
    """Re-encode every chunk of a store: ``transform`` maps a chunk's raw streams by tag to the
    directory to store (every stream uncompressed, method 0); offsets, CRCs, footer, trailer
    and manifest are rewritten to match."""
    body = json.loads((path / "manifest.json").read_bytes()[40:-2])
    for entry in body["shards"]:
        file = path / entry["file"]
        data = file.read_bytes()
        footer_offset, footer_len = struct.unpack_from("<QQ", data, len(data) - 32)
        footer = data[footer_offset : footer_offset + footer_len]
        (num_chunks,) = struct.unpack_from("<Q", footer)
        chunks = np.frombuffer(footer, CHUNK_ENTRY, count=num_chunks, offset=24).copy()
        out = bytearray(data[:64])
        for chunk in chunks:
            start, stored_len = int(chunk["offset"]), int(chunk["stored_len"])
            positions, entries = int(chunk["num_positions"]), int(chunk["num_entries"])
            raw = read_chunk_streams(
                data[start : start + stored_len], positions, entries, start, Where(str(file))
            )
            streams = transform(raw)
            directory = b"".join(struct.pack("<BBII", t, 0, len(b), len(b)) for t, b in streams)
            new = bytes([1, len(streams)]) + directory + b"".join(b for _, b in streams)
            chunk["offset"] = len(out)
            chunk["stored_len"] = len(new)
            chunk["crc32"] = zlib.crc32(new)
            out += new
        new_footer = (
            footer[:24] + chunks.tobytes() + footer[24 + CHUNK_ENTRY.itemsize * num_chunks :]
        )
        trailer = struct.pack("<QQI", len(out), len(new_footer), zlib.crc32(new_footer))
        out += new_footer + trailer + struct.pack("<I", zlib.crc32(trailer)) + b"LCSHEND\0"
        file.write_bytes(bytes(out))
        entry["bytes"], entry["checksum"] = len(out), f"crc32:{zlib.crc32(out):08x}"
    write_manifest(path, body)


def stored_reversed_padded(raw: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """The same streams, in decreasing tag order, plus an empty stream for every known tag the
    chunk left out (tag 25 included: listed empty, it means what its absence means)."""
    padding = [(tag, b"") for tag in sorted(KNOWN_TAGS - set(raw))]
    return sorted(raw.items(), reverse=True) + padding


@pytest.mark.parametrize(
    ("kind", "codec"),
    [("topk", "abs:0.01"), ("topk", "kl:1e-4"), ("topk", "lossless"), ("sampled", "abs:0.1"),
     ("sampled", "lossless"), ("sampled", "none")],
)  # fmt: skip
def test_other_valid_encodings_of_the_same_store(tmp_path: Path, kind: str, codec: str) -> None:
    """FORMAT.md leaves writers free to store a stream uncompressed, to order the directory
    and to list empty streams: both readers decode such a re-encoding to the same values."""
    rng = np.random.default_rng(11)
    path = tmp_path / "store"
    pool = very_negative_pool(codec)
    vocab = 2**20
    with lc.StoreWriter(
        path, vocab_size=vocab, k=20, kind=kind, codec=codec, chunk_positions=9
    ) as w:
        for sid in range(4):
            if kind == "topk":
                w.add(sid, *random_topk(rng, 7, 20, vocab, True, very_negative=pool))
            else:
                input_ids, ids, counts, lp = random_sampled(rng, 7, 20, vocab, True, 5000, pool)
                w.add_sampled(sid, input_ids, ids, counts, None if codec == "none" else lp)
    original = assert_same_as_rust(path)
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    rewrite_chunks(copy, stored_reversed_padded)
    assert (copy / "manifest.json").read_bytes() != (path / "manifest.json").read_bytes()
    again = assert_same_as_rust(copy)
    for sid, rec in original.items():
        for key, value in rec.items():
            if value is None:
                assert again[sid][key] is None
            else:
                assert np.array_equal(again[sid][key].view(np.uint8), value.view(np.uint8)), key


@pytest.mark.parametrize(
    ("kind", "codec", "tag"),
    [("topk", "abs:0.01", 26), ("topk", "abs:0.01", 24), ("topk", "lossless", 16),
     ("topk", "lossless", 25), ("topk", "kl:1e-3", 27), ("sampled", "abs:0.1", 25),
     ("sampled", "none", 19), ("sampled", "lossless", 28)],
)  # fmt: skip
def test_a_stream_the_store_does_not_use_is_refused(
    tmp_path: Path, kind: str, codec: str, tag: int
) -> None:
    """A known tag that the store's kind and codec never write may be listed empty (above),
    but holding bytes it is damage: both readers refuse it rather than ignore it."""
    rng = np.random.default_rng(12)
    path = tmp_path / "store"
    with lc.StoreWriter(path, vocab_size=500, k=6, kind=kind, codec=codec) as w:
        for sid in range(3):
            if kind == "topk":
                w.add(sid, *random_topk(rng, 4, 6, 500, True))
            else:
                input_ids, ids, counts, lp = random_sampled(rng, 4, 6, 500, True, 20)
                w.add_sampled(sid, input_ids, ids, counts, None if codec == "none" else lp)
    assert_same_as_rust(path)
    rewrite_chunks(path, lambda raw: [*sorted(raw.items()), (tag, b"\x01\x00\x00\x00")])
    with pytest.raises(ValueError, match=f"stream tag {tag} is not used by this store"):
        read_store(path)
    assert rust_rejects(path)
    assert f"(tag {tag}) holding data" in "\n".join(lc.verify_store(path)["problems"])


def rewrite_header(shard: Path, offset: int, value: int) -> None:
    """Set one byte of a shard's header, with a valid header CRC and manifest checksum."""
    data = bytearray(shard.read_bytes())
    data[offset] = value
    data[60:64] = struct.pack("<I", zlib.crc32(bytes(data[:60])))
    shard.write_bytes(bytes(data))
    store = shard.parent.parent

    def fix(m: dict[str, Any]) -> None:
        for entry in m["shards"]:
            if store / entry["file"] == shard:
                entry["checksum"] = f"crc32:{zlib.crc32(bytes(data)):08x}"

    rewrite_manifest(store, fix)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [(19, 0x03, "flags"), (48, 1, "reserved"), (59, 0x80, "reserved")],
)
def test_undefined_header_bits_are_refused(
    tmp_path: Path, offset: int, value: int, message: str
) -> None:
    """Flag bits other than bit 0 and the reserved bytes are zero: set (under a valid CRC),
    both readers refuse the shard."""
    path = small_store(tmp_path / "store")
    shard = sorted((path / "shards").iterdir())[0]
    rewrite_header(shard, offset, value)
    with pytest.raises(ValueError, match=message):
        read_store(path)
    assert rust_rejects(path)


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
    write_manifest(path, body)


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


def test_the_header_temperature_is_informational(tmp_path: Path) -> None:
    """The capture temperature is the manifest's; the header's copy (what a manifest rebuild
    takes) is not compared with it, by either reader."""
    path = small_store(tmp_path / "store")
    rewrite_manifest(path, lambda m: m.update(temperature=2.0))
    assert_same_as_rust(path)
    assert lc.open_store(path).temperature == 2.0
