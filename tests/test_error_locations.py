"""Every core error that the public API can raise arrives as a typed exception that says
where: its message names the file, shard, chunk and sample where known, and a StoreError
carries them as attributes (`file`, `shard`, `chunk`, `offset`, `sample_id`; None where not
known). One test per core `Error` variant (rust/core/src/error.rs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_topk, write_manifest

import logitcache as lc

V, K = 200, 4
ATTRS = ("file", "shard", "chunk", "offset", "sample_id")


@pytest.fixture
def store(tmp_path: Path, rng: np.random.Generator) -> Path:
    """Samples 10 (chunk 0) and 11, 12 (chunk 1) in one shard."""
    path = tmp_path / "s"
    with lc.StoreWriter(path, vocab_size=V, k=K, chunk_positions=4, tokenizer="tok") as w:
        w.add(10, *make_topk(rng, 5, K, V))
        w.add(11, *make_topk(rng, 2, K, V))
        w.add(12, *make_topk(rng, 2, K, V))
    return path


def _where(e: BaseException) -> dict[str, object]:
    return {a: getattr(e, a) for a in ATTRS}


def _rewrite_manifest(path: Path, change: dict[str, object]) -> None:
    body = json.loads((path / "manifest.json").read_text())["manifest"]
    body.update(change)
    write_manifest(path, body)


def _shard(path: Path) -> Path:
    return next((path / "shards").iterdir())


def test_corrupt_chunk_names_file_shard_chunk_offset_and_sample(store: Path) -> None:
    shard = _shard(store)
    data = bytearray(shard.read_bytes())
    footer_at = int.from_bytes(data[-32:-24], "little")
    chunk1_at = int.from_bytes(data[footer_at + 24 + 32 : footer_at + 32 + 32], "little")
    data[chunk1_at + 3] ^= 0x40
    shard.write_bytes(bytes(data))
    s = lc.open_store(store)
    assert s[10].input_ids.shape == (5,)  # chunk 0 is intact
    for read in (lambda: s[12], lambda: s.read_batch([10, 12])):
        with pytest.raises(lc.CorruptStoreError) as info:
            read()
        e = info.value
        assert _where(e) == {
            "file": str(shard),
            "shard": 0,
            "chunk": 1,
            "offset": chunk1_at,
            "sample_id": 12,
        }
        msg = str(e)
        for part in (str(shard), "shard 0", "chunk 1", f"byte offset {chunk1_at}", "sample 12"):
            assert part in msg, (part, msg)


def test_corrupt_footer_names_file_and_shard(store: Path) -> None:
    shard = _shard(store)
    data = bytearray(shard.read_bytes())
    data[-40] ^= 1  # inside the footer's record table
    shard.write_bytes(bytes(data))
    with pytest.raises(lc.CorruptStoreError, match="footer checksum") as info:
        lc.open_store(store)
    e = info.value
    assert e.file == str(shard) and e.shard == 0 and e.chunk is None and e.sample_id is None
    assert isinstance(e.offset, int)


def test_corrupt_manifest_names_the_manifest(store: Path) -> None:
    mpath = store / "manifest.json"
    raw = bytearray(mpath.read_bytes())
    raw[-5] ^= 1
    mpath.write_bytes(bytes(raw))
    with pytest.raises(lc.CorruptStoreError) as info:
        lc.open_store(store)
    assert info.value.file == str(mpath) and info.value.shard is None
    assert str(mpath) in str(info.value)


def test_missing_sample(store: Path) -> None:
    s = lc.open_store(store)
    for read in (lambda: s[99], lambda: s.read_batch([10, 99])):
        with pytest.raises(lc.MissingSampleError) as info:
            read()
        assert isinstance(info.value, KeyError)
        assert _where(info.value) == {
            "file": str(store),
            "shard": None,
            "chunk": None,
            "offset": None,
            "sample_id": 99,
        }
        assert "99" in str(info.value) and str(store) in str(info.value)


def test_invalid_record_and_duplicate_sample(store: Path, rng: np.random.Generator) -> None:
    with lc.StoreWriter(store, vocab_size=V, k=K, mode="a") as w:
        inp, ids, lp = make_topk(rng, 3, K, V)
        ids[1, 0] = V + 5
        with pytest.raises(lc.InvalidRecordError) as info:
            w.add(77, inp, ids, lp)
        assert info.value.sample_id == 77 and info.value.file is None
        assert "sample 77" in str(info.value)
        with pytest.raises(lc.DuplicateSampleError) as dup:
            w.add(11, *make_topk(rng, 2, K, V))
        assert dup.value.sample_id == 11 and "11" in str(dup.value)


def test_format_version_names_the_manifest(store: Path) -> None:
    _rewrite_manifest(store, {"format_version": 7})
    with pytest.raises(lc.FormatVersionError) as info:
        lc.open_store(store)
    mpath = str(store / "manifest.json")
    assert info.value.file == mpath and mpath in str(info.value)


def test_mismatch_names_the_store_and_field(store: Path) -> None:
    with pytest.raises(lc.StoreMismatchError, match="vocab_size expected 300") as info:
        lc.open_store(store, expect_vocab_size=300)
    assert info.value.file == str(store) and str(store) in str(info.value)
    with pytest.raises(lc.StoreMismatchError, match=r"tokenizer\.name") as tok:
        lc.open_store(store, expect_tokenizer="other")
    assert tok.value.file == str(store)


def test_exists_and_locked_name_the_store(store: Path) -> None:
    with pytest.raises(lc.StoreExistsError) as info:
        lc.StoreWriter(store, vocab_size=V, k=K)
    assert isinstance(info.value, FileExistsError) and info.value.file == str(store)
    with lc.StoreWriter(store, vocab_size=V, k=K, mode="a"):
        with pytest.raises(lc.StoreLockedError) as locked:
            lc.StoreWriter(store, vocab_size=V, k=K, mode="a")
    assert locked.value.file == str(store) and str(store) in str(locked.value)


def test_state_error_has_no_location(store: Path, rng: np.random.Generator) -> None:
    w = lc.StoreWriter(store, vocab_size=V, k=K, mode="a")
    w.abort()
    with pytest.raises(lc.StoreError) as info:
        w.add(50, *make_topk(rng, 2, K, V))
    assert type(info.value) is lc.StoreError
    assert _where(info.value) == dict.fromkeys(ATTRS)


def test_io_errors_are_os_errors_with_filename(store: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        lc.open_store(tmp_path / "nothing")
    # No such directory: that is what is named, not the manifest inside it.
    assert info.value.filename == str(tmp_path / "nothing")
    assert info.value.errno == 2
    # What Python prints for it: "[Errno 2] open store: <the OS's text>: '<directory>'".
    text = str(info.value)
    assert text.startswith("[Errno 2] open store: ") and "None" not in text, text
    assert text.endswith(repr(info.value.filename)), text
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        lc.open_store(tmp_path / "empty")  # a directory, but no store
    assert info.value.filename == str(tmp_path / "empty" / "manifest.json")
    assert str(info.value).startswith("[Errno 2] read manifest: ")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError) as not_dir:
        lc.open_store(tmp_path / "file")
    assert not_dir.value.filename == str(tmp_path / "file")
    # A store a writer is creating: it has not committed, and says so.
    w = lc.StoreWriter(tmp_path / "new", vocab_size=V, k=K)
    for read in (lc.open_store, lc._core.read_manifest, lc.verify_store):
        with pytest.raises(lc.StoreLockedError, match="has not committed a manifest yet"):
            read(str(tmp_path / "new"))
    w.abort()
    os.remove(_shard(store))
    with pytest.raises(FileNotFoundError) as gone:
        lc.open_store(store)
    assert gone.value.filename is not None and "shards" in gone.value.filename


def test_invalid_argument_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="codec") as info:
        lc.StoreWriter(tmp_path / "x", vocab_size=V, k=K, codec="zip")
    assert not isinstance(info.value, lc.StoreError)
