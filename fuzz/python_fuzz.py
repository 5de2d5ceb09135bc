"""Python-level fuzz target (atheris) through the public API.

    .venv/bin/python -m pip install atheris        (a cp311 manylinux wheel; not a test dep)
    .venv/bin/python fuzz/python_fuzz.py -max_total_time=180 -print_final_stats=1

Seed stores (fuzz/make_corpus.py: top-K with each codec, sampled with and without
log-probabilities) are written once. Each fuzz input picks a store and a file (a shard or
manifest.json), and is read as edits of that file's bytes: byte overwrites, little-endian
integers written at an offset, a truncation. Half of the inputs then recompute the file's
checksums (as a writer would), so that edits reach the decoder behind them. The edited store
is opened with `open_store` (mmap on or off), every sample is read by id, then all of them
with `read_batch`, and `verify_store` runs.

Contract checked: the only exceptions that may escape are `logitcache.StoreError`
subclasses (`MissingSampleError` is also a `KeyError`), and `FileNotFoundError` when an edit
of the manifest names a shard file that does not exist. Anything else, a crash, or a record
whose arrays disagree with the store's shape is a finding.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import struct
import sys
import tempfile
import zlib

import atheris

with atheris.instrument_imports():
    import numpy as np

    import logitcache as lc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import make_corpus

_STATE: dict[str, object] = {}


def _crc(b: bytes | bytearray) -> int:
    return zlib.crc32(bytes(b)) & 0xFFFFFFFF


def repair_shard(b: bytearray) -> None:
    """Recompute header, chunk, footer and trailer checksums (best effort, like the Rust
    harness `fuzz_targets::repair_shard`)."""
    n = len(b)
    if n >= 64:
        struct.pack_into("<I", b, 60, _crc(b[:60]))
    if n < 96:
        return
    t = n - 32
    fo, fl = struct.unpack_from("<QQ", b, t)
    if fo <= t and fl <= t - fo:
        fs, fe = fo, fo + fl
        chunks = struct.unpack_from("<Q", b, fs)[0] if fl >= 8 else 0
        for i in range(min(chunks, 1 << 16)):
            e = fs + 24 + 32 * i
            if e + 32 > fe:
                break
            off, length = struct.unpack_from("<QI", b, e)
            if off + length <= n:
                struct.pack_into("<I", b, e + 12, _crc(b[off : off + length]))
        struct.pack_into("<I", b, t + 16, _crc(b[fs:fe]))
    struct.pack_into("<I", b, t + 20, _crc(b[t : t + 20]))


def repair_manifest(b: bytearray) -> None:
    if len(b) >= 42:
        b[19:27] = f"{_crc(b[40:-2]):08x}".encode()


def _setup() -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="lc-pyfuzz-"))
    seeds = make_corpus.write_stores(root / "seed")
    stores = []
    for seed in seeds:
        shards = sorted(f"shards/{p.name}" for p in (seed / "shards").glob("*.lcs"))
        files = ["manifest.json", *shards]
        work = root / "work" / seed.name
        shutil.copytree(seed, work)
        stores.append((seed, work, files))
    _STATE["stores"] = stores
    _STATE["root"] = root


def _write(path: pathlib.Path, data: bytes) -> None:
    # Replace, never rewrite in place: a store opened earlier may still map the old file.
    tmp = path.with_name(path.name + ".fuzz-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _edit(fdp: atheris.FuzzedDataProvider, data: bytearray) -> None:
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        if not data:
            return
        at = fdp.ConsumeIntInRange(0, len(data) - 1)
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:
            data[at] = fdp.ConsumeInt(1) & 0xFF
        elif kind == 1:
            width = (1, 2, 4, 8)[fdp.ConsumeIntInRange(0, 3)]
            value = fdp.ConsumeInt(8) & ((1 << (8 * width)) - 1)
            chunk = value.to_bytes(width, "little")[: len(data) - at]
            data[at : at + len(chunk)] = chunk
        elif kind == 2:
            data[at] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        else:
            del data[at:]


def _check_record(store: lc.Store, sid: int, rec: lc.Record) -> None:
    n = len(rec)
    if store.kind == "topk":
        assert rec.ids.shape == (n, store.k), (sid, rec.ids.shape)
        assert rec.logprobs is not None and rec.logprobs.shape == (n, store.k)
    else:
        assert rec.ids.shape[0] == n and rec.counts is not None
    assert ((rec.ids < store.vocab_size) & (rec.ids >= -1)).all()
    assert ((rec.input_ids >= 0) & (rec.input_ids < store.vocab_size)).all()


def _read_all(path: pathlib.Path, mmap: bool) -> None:
    s = lc.open_store(path, mmap=mmap)
    ids = [int(x) for x in s.sample_ids()]
    lengths = s.sample_lengths()
    for sid, length in zip(ids, lengths, strict=True):
        try:
            rec = s[sid]
        except lc.CorruptStoreError:
            continue
        assert len(rec) == int(length)
        _check_record(s, sid, rec)
    if ids:
        try:
            b = s.read_batch(ids)
        except lc.CorruptStoreError:
            pass
        else:
            assert b.input_ids.shape[0] == len(ids)
            assert np.array_equal(b.lengths, np.asarray(lengths, dtype=np.int64))


def TestOneInput(data: bytes) -> None:  # atheris' name
    fdp = atheris.FuzzedDataProvider(data)
    stores = _STATE["stores"]
    seed, work, files = stores[fdp.ConsumeIntInRange(0, len(stores) - 1)]
    name = files[fdp.ConsumeIntInRange(0, len(files) - 1)]
    repair = fdp.ConsumeBool()
    mmap = fdp.ConsumeBool()
    original = (seed / name).read_bytes()
    edited = bytearray(original)
    _edit(fdp, edited)
    if repair:
        (repair_manifest if name == "manifest.json" else repair_shard)(edited)
    _write(work / name, bytes(edited))
    try:
        _read_all(work, mmap)
        report = lc.verify_store(work)
        assert isinstance(report["ok"], bool)
    except lc.StoreError:
        pass
    except FileNotFoundError as e:
        if name != "manifest.json":
            raise
        assert e.filename is not None and "shards" in e.filename, e
    finally:
        _write(work / name, original)


def main() -> None:
    _setup()
    try:
        atheris.Setup(sys.argv, TestOneInput)
        atheris.Fuzz()
    finally:
        shutil.rmtree(_STATE["root"], ignore_errors=True)


if __name__ == "__main__":
    main()
