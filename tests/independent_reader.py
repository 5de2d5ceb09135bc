"""An independent decoder of logitcache stores, written from FORMAT.md alone.

This module does not import ``logitcache`` and was written without reading the Rust
implementation: it is the proof that FORMAT.md specifies the format completely, and it doubles
as executable reference documentation (section numbers below refer to FORMAT.md). It uses only
the standard library, numpy and ``zstandard``.

``read_store(path)`` checks every checksum and every structural rule that FORMAT.md states and
raises ``ValueError`` (naming the file, shard, chunk, byte offset and sample id where known) on
any violation. Where FORMAT.md leaves something open, the reading taken here is marked with
``# Reading:`` in a comment.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

__all__ = ["read_manifest", "read_store"]

FORMAT_VERSION = 1

# Section 2: the manifest envelope.
ENVELOPE_PREFIX = b'{"checksum":"crc32:'
ENVELOPE_INFIX = b'","manifest":'
ENVELOPE_SUFFIX = b"}\n"
BODY_START = len(ENVELOPE_PREFIX) + 8 + len(ENVELOPE_INFIX)  # 40

SHARD_FILE_RE = re.compile(r"shards/[0-9]{6,}-([0-9a-f]{16})\.lcs")
HEX_CRC_RE = re.compile(r"crc32:([0-9a-f]{8})")

KINDS = {"topk": 1, "sampled": 2}
LOGPROB_CODECS = {"none": 0, "lossless": 1, "abs": 2, "kl": 3}

# Section 3: shard files.
HEADER_LEN = 64
HEADER_MAGIC = b"LCSHARD\0"
TRAILER_LEN = 32
TRAILER_MAGIC = b"LCSHEND\0"
FOOTER_FIXED_LEN = 24
CHUNK_ENTRY = np.dtype(
    [
        ("offset", "<u8"),
        ("stored_len", "<u4"),
        ("crc32", "<u4"),
        ("first_record", "<u4"),
        ("num_records", "<u4"),
        ("num_positions", "<u4"),
        ("num_entries", "<u4"),
    ]
)
RECORD_ENTRY = np.dtype([("sample_id", "<u8"), ("length", "<u4")])
assert CHUNK_ENTRY.itemsize == 32 and RECORD_ENTRY.itemsize == 12

# Section 4: chunks and their streams.
CHUNK_LAYOUT = 1
STREAM_DIR_ENTRY = struct.Struct("<BBII")  # tag, method, stored_len, raw_len
TAG_INPUT_LEAD, TAG_INPUT_EXT = 1, 2
TAG_ID_GAPS, TAG_ID_COUNTS = 3, 4
TAG_TARGET_LEAD, TAG_TARGET_EXT = 8, 12  # + group
TAG_LEVEL_LEAD, TAG_LEVEL_EXT = 16, 20  # + group
TAG_LOSSLESS = 24
TAG_FINITE_COUNTS = 25
TAG_ROW_LENS, TAG_SAMPLED_COUNTS = 26, 27
TAG_ROW_MODES = 28
KNOWN_TAGS = frozenset([1, 2, 3, 4, *range(8, 24), 24, 25, 26, 27, 28])

# Entry j of a row belongs to group g(j): 0 for j = 0, 1 for 1..=3, 2 for 4..=15, 3 beyond.
GROUP_STARTS = (0, 1, 4, 16)
NUM_GROUPS = len(GROUP_STARTS)

# Rank codes (section 4.1): one lead byte, then maybe one extension byte or a varint.
RANK_ONE_BYTE = 224  # leads below this are the rank itself
RANK_ESCAPE = 255  # lead byte announcing a varint
RANK_VARINT_BASE = 224 + 31 * 256  # 8160: the rank of lead 255 with varint 0
# Level codes (section 4.2): lead byte v < 255, else 255 and the varint v - 255.
LEVEL_ESCAPE = 255
MAX_LEVEL = 2**24  # abs levels: q m <= 2^24 for the step m 2^-e
ABS_STEPS = {
    m * 2.0**-e: m for m in (1, 3, 5, 7) for e in range(1, 14) if 2**-13 <= m * 2.0**-e <= 2
}
MAX_CODED = 2**42
# Top-K rows (abs and kl): the coded numbers of entries j >= 16 go two per lead byte.
PAIRED_FROM = GROUP_STARTS[3]
PAIR_BASE = 15  # a pair (a, b) with both below this is the lead byte 15 a + b
PAIR_ESCAPE = 225  # then a and b are varints in the extension; larger lead bytes are errors
TOP_FINE = 64  # the top entry of an abs top-K row is on the grid step / 64

KL_LOSSLESS_MODE = 255
KL_BASE_EXPONENTS = range(2, 11)  # b, the low nibble of a row mode
KL_TOP_EXTRA = np.array([0, 4, 8, 12], np.int64)  # e, by the high nibble


def group_of(j: np.ndarray) -> np.ndarray:
    """Group g(j) of within-row entry indices j (section 4)."""
    return np.searchsorted(np.array(GROUP_STARTS[1:]), j, side="right")


# --------------------------------------------------------------------------------------------
# Error context


@dataclass(frozen=True)
class Where:
    """Where a check failed: the file, shard index, chunk index and sample id where known."""

    file: str
    shard: int | None = None
    chunk: int | None = None
    sample_id: int | None = None

    def error(self, message: str, offset: int | None = None) -> ValueError:
        parts = [f"file {self.file}"]
        if self.shard is not None:
            parts.append(f"shard {self.shard}")
        if self.chunk is not None:
            parts.append(f"chunk {self.chunk}")
        if offset is not None:
            parts.append(f"byte offset {offset}")
        if self.sample_id is not None:
            parts.append(f"sample id {self.sample_id}")
        return ValueError(f"{message} ({', '.join(parts)})")


def crc32(data: bytes | memoryview) -> int:
    """CRC-32 (ISO-HDLC), as zlib computes it."""
    return zlib.crc32(data) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Section 2: the manifest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"manifest: {name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Reading: FORMAT.md does not say whether duplicate JSON member names are allowed;
    # a duplicate makes "the" value ambiguous, so it is rejected.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"manifest: duplicate JSON member {key!r}")
        obj[key] = value
    return obj


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and np.isfinite(x)


def _require(cond: bool, where: Where, message: str) -> None:
    if not cond:
        raise where.error(f"manifest: {message}")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``manifest.json`` of a store: check the envelope and its CRC, then the version,
    then every member (section 2). Returns ``BODY`` as a dict."""
    file = os.path.join(os.fspath(path), "manifest.json")
    where = Where(file)
    with open(file, "rb") as f:
        data = f.read()
    if len(data) < BODY_START + len(ENVELOPE_SUFFIX):
        raise where.error(f"manifest: file too short ({len(data)} bytes)")
    hex_crc = data[len(ENVELOPE_PREFIX) : len(ENVELOPE_PREFIX) + 8]
    if (
        not data.startswith(ENVELOPE_PREFIX)
        or data[len(ENVELOPE_PREFIX) + 8 : BODY_START] != ENVELOPE_INFIX
        or not data.endswith(ENVELOPE_SUFFIX)
        or re.fullmatch(rb"[0-9a-f]{8}", hex_crc) is None
    ):
        raise where.error("manifest: the envelope is not the one FORMAT.md section 2 fixes")
    body = data[BODY_START : -len(ENVELOPE_SUFFIX)]
    if crc32(body) != int(hex_crc, 16):
        raise where.error(
            f"manifest: checksum mismatch (envelope says {hex_crc.decode()}, "
            f"body has {crc32(body):08x})",
            offset=BODY_START,
        )
    try:
        manifest = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise where.error(f"manifest: BODY is not UTF-8 JSON: {e}", offset=BODY_START) from None
    _require(isinstance(manifest, dict), where, "BODY is not a JSON object")
    # The version first: a newer version may change everything else.
    version = manifest.get("format_version")
    _require(_is_int(version), where, "format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise where.error(f"manifest: format_version {version} is newer than {FORMAT_VERSION}")
    # Reading: versions below 1 do not exist, so they are refused too.
    _require(version == FORMAT_VERSION, where, f"unknown format_version {version}")
    _check_manifest_body(manifest, where)
    return manifest


def _check_manifest_body(m: dict[str, Any], where: Where) -> None:
    """Every member of section 2's table, with its type and range."""
    required = [
        "format", "format_version", "kind", "k", "vocab_size", "temperature", "codec",
        "teacher", "tokenizer", "created_by", "updated_by", "metadata", "num_samples",
        "num_positions", "shards",
    ]  # fmt: skip
    # Reading: members beyond these are not forbidden by FORMAT.md, so they are ignored.
    for key in required:
        _require(key in m, where, f"member {key!r} is missing")
    _require(m["format"] == "logitcache-store", where, f"format is {m['format']!r}")
    _require(m["kind"] in KINDS, where, f"kind {m['kind']!r} is not 'topk' or 'sampled'")
    _require(_is_int(m["k"]) and 1 <= m["k"] < 2**32, where, f"bad k {m['k']!r}")
    _require(
        _is_int(m["vocab_size"]) and 1 <= m["vocab_size"] < 2**32,
        where,
        f"bad vocab_size {m['vocab_size']!r}",
    )
    _require(
        _is_number(m["temperature"]) and m["temperature"] > 0,
        where,
        f"bad temperature {m['temperature']!r}",
    )
    _check_codec(m["codec"], m["kind"], where)
    for key, fp_key in (("teacher", "config_fingerprint"), ("tokenizer", "vocab_fingerprint")):
        obj = m[key]
        if obj is None:
            continue
        _require(isinstance(obj, dict), where, f"{key} is not an object or null")
        for sub in ("name", fp_key):
            _require(sub in obj, where, f"{key}.{sub} is missing")
            _require(
                obj[sub] is None or isinstance(obj[sub], str), where, f"{key}.{sub} not a string"
            )
    for key in ("created_by", "updated_by"):
        _require(isinstance(m[key], str), where, f"{key} is not a string")
    _require(isinstance(m["metadata"], dict), where, "metadata is not an object")
    _require(isinstance(m["shards"], list), where, "shards is not an array")
    for key in ("num_samples", "num_positions"):
        _require(_is_int(m[key]) and m[key] >= 0, where, f"bad {key} {m[key]!r}")
    for index, shard in enumerate(m["shards"]):
        _check_shard_entry(shard, Where(where.file, shard=index))
    for key in ("num_samples", "num_positions"):
        total = sum(s[key] for s in m["shards"])
        _require(total == m[key], where, f"{key} is {m[key]} but the shards hold {total}")


def _check_codec(codec: Any, kind: str, where: Where) -> None:
    _require(isinstance(codec, dict), where, "codec is not an object")
    for key in ("logprobs", "step", "max_abs_error", "kl_bound", "ids", "zstd_level"):
        _require(key in codec, where, f"codec.{key} is missing")
    name = codec["logprobs"]
    _require(name in LOGPROB_CODECS, where, f"unknown log-probability codec {name!r}")
    _require(codec["ids"] == "rank-table-v1", where, f"unknown id codec {codec['ids']!r}")
    _require(_is_int(codec["zstd_level"]), where, "codec.zstd_level is not an integer")
    _require(name != "none" or kind == "sampled", where, "codec 'none' in a top-K store")
    _require(name != "kl" or kind == "topk", where, "codec 'kl' in a sampled store")
    # Reading: "step ... is present for abs" and "kl_bound ... is present for kl" are taken to
    # mean null otherwise; max_abs_error (= step / 2) is likewise present for abs only.
    step, max_err, kl_bound = codec["step"], codec["max_abs_error"], codec["kl_bound"]
    if name == "abs":
        _require(_is_number(step), where, "codec.step is missing for abs")
        _require(
            step in ABS_STEPS,
            where,
            f"codec.step {step!r} is not m 2^-e (m in 1, 3, 5, 7) in 2^-13 ... 2",
        )
        _require(max_err == step / 2, where, f"codec.max_abs_error {max_err!r} != step / 2")
    else:
        _require(step is None, where, f"codec.step {step!r} is set for {name!r}")
        _require(max_err is None, where, f"codec.max_abs_error {max_err!r} set for {name!r}")
    if name == "kl":
        _require(
            _is_number(kl_bound) and kl_bound > 0 and float(np.float32(kl_bound)) == kl_bound,
            where,
            f"codec.kl_bound {kl_bound!r} is not a positive float32 value",
        )
    else:
        _require(kl_bound is None, where, f"codec.kl_bound {kl_bound!r} is set for {name!r}")


def _check_shard_entry(shard: Any, where: Where) -> None:
    _require(isinstance(shard, dict), where, "shard entry is not an object")
    for key in ("file", "uid", "num_samples", "num_positions", "num_chunks", "bytes", "checksum"):
        _require(key in shard, where, f"shard member {key!r} is missing")
    name = shard["file"]
    match = SHARD_FILE_RE.fullmatch(name) if isinstance(name, str) else None
    _require(match is not None, where, f"shard file name {name!r} is not allowed")
    assert match is not None
    # Reading: the uid member is "16 hex digits" (case unstated); the file name holds "the
    # shard's uid as 16 lower-case hex digits", so the member must be that same string.
    uid = shard["uid"]
    _require(uid == match.group(1), where, f"shard uid {uid!r} does not match its file {name}")
    for key in ("num_samples", "num_positions", "num_chunks", "bytes"):
        _require(_is_int(shard[key]) and shard[key] >= 0, where, f"bad shard {key}")
    checksum = shard["checksum"]
    _require(
        isinstance(checksum, str) and HEX_CRC_RE.fullmatch(checksum) is not None,
        where,
        f"shard checksum {checksum!r} is not crc32:XXXXXXXX",
    )


# --------------------------------------------------------------------------------------------
# Section 3: shard files


@dataclass(frozen=True)
class Header:
    """The fields of a shard header (section 3.1) a decoder needs."""

    kind: str
    codec: str
    has_logprobs: bool
    k: int
    vocab_size: int
    step: float
    kl_bound: float
    temperature: float
    uid: int


def parse_header(data: bytes, manifest: dict[str, Any], uid: int, where: Where) -> Header:
    """Check the header: magic, then version, then CRC, then agreement with the manifest."""
    if len(data) < HEADER_LEN:
        raise where.error(f"header: file of {len(data)} bytes is shorter than a header", 0)
    if data[0:8] != HEADER_MAGIC:
        raise where.error("header: bad magic", 0)
    (version,) = struct.unpack_from("<I", data, 8)
    if version > FORMAT_VERSION:
        raise where.error(f"header: format_version {version} is newer than supported", 8)
    if version != FORMAT_VERSION:
        raise where.error(f"header: unknown format_version {version}", 8)
    (stored_crc,) = struct.unpack_from("<I", data, 60)
    if crc32(data[0:60]) != stored_crc:
        raise where.error("header: checksum mismatch", 60)
    (header_len, kind, codec, id_codec, flags, k, vocab, step, kl_bound, temp, shard_uid) = (
        struct.unpack_from("<IBBBBIIfffQ", data, 12)
    )
    codec_name = {v: n for n, v in LOGPROB_CODECS.items()}.get(codec)
    checks = [
        (header_len == HEADER_LEN, 12, f"header length {header_len} != 64"),
        (kind == KINDS[manifest["kind"]], 16, f"kind {kind} disagrees with the manifest"),
        (codec_name == manifest["codec"]["logprobs"], 17, f"codec {codec} disagrees"),
        (id_codec == 1, 18, f"unknown id codec {id_codec}"),
        # Flags bits 1..7 are not defined: they must be zero (section 3.1).
        (flags == int(codec_name != "none"), 19, f"flags {flags:#x} disagree with the codec"),
        (k == manifest["k"], 20, f"K/n {k} disagrees with the manifest"),
        (vocab == manifest["vocab_size"], 24, f"vocab_size {vocab} disagrees"),
        (step == (manifest["codec"]["step"] or 0.0), 28, f"step {step} disagrees"),
        # The manifest's KL bound is compared as a float32 value (the header holds f32, the
        # manifest a JSON number that may not be one). The temperature is not compared: the
        # header's is informational (section 3.1).
        (
            kl_bound == np.float32(manifest["codec"]["kl_bound"] or 0.0),
            32,
            f"KL bound {kl_bound} disagrees with the manifest",
        ),
        (shard_uid == uid, 40, f"uid {shard_uid:016x} disagrees with the manifest"),
        (data[48:60] == bytes(12), 48, "reserved bytes are not zero"),
    ]
    for ok, offset, message in checks:
        if not ok:
            raise where.error(f"header: {message}", offset)
    assert codec_name is not None
    return Header(
        kind=manifest["kind"],
        codec=codec_name,
        has_logprobs=codec_name != "none",
        k=k,
        vocab_size=vocab,
        step=step,
        kl_bound=kl_bound,
        temperature=temp,
        uid=shard_uid,
    )


def parse_trailer(data: bytes, where: Where) -> tuple[int, int, int]:
    """Check the trailer (section 3.2); returns (footer_offset, footer_len, footer_crc)."""
    size = len(data)
    if size < HEADER_LEN + TRAILER_LEN:
        raise where.error(f"trailer: file of {size} bytes is too short for header and trailer")
    base = size - TRAILER_LEN
    trailer = data[base:]
    if trailer[24:32] != TRAILER_MAGIC:
        raise where.error("trailer: bad magic", base + 24)
    footer_offset, footer_len, footer_crc, trailer_crc = struct.unpack_from("<QQII", trailer)
    if crc32(trailer[0:20]) != trailer_crc:
        raise where.error("trailer: checksum mismatch", base + 20)
    if footer_offset < HEADER_LEN or footer_offset + footer_len != base:
        raise where.error(
            f"trailer: footer at {footer_offset} of {footer_len} bytes does not end at {base}",
            base,
        )
    return footer_offset, footer_len, footer_crc


@dataclass(frozen=True)
class Footer:
    """The footer's chunk table and record table (section 3.3)."""

    chunks: np.ndarray  # CHUNK_ENTRY
    records: np.ndarray  # RECORD_ENTRY
    num_positions: int


def parse_footer(
    data: bytes, footer_offset: int, footer_crc: int, header: Header, where: Where
) -> Footer:
    """Check the footer's CRC and every rule of section 3.3 that needs no other shard."""
    footer = data[footer_offset : len(data) - TRAILER_LEN]
    if crc32(footer) != footer_crc:
        raise where.error("footer: checksum mismatch", footer_offset)
    if len(footer) < FOOTER_FIXED_LEN:
        raise where.error(f"footer: {len(footer)} bytes is too short", footer_offset)
    num_chunks, num_records, num_positions = struct.unpack_from("<QQQ", footer)
    expected_len = FOOTER_FIXED_LEN + CHUNK_ENTRY.itemsize * num_chunks
    expected_len += RECORD_ENTRY.itemsize * num_records
    if len(footer) != expected_len:
        raise where.error(
            f"footer: {len(footer)} bytes, but {num_chunks} chunks and {num_records} records "
            f"need {expected_len}",
            footer_offset,
        )
    chunks = np.frombuffer(footer, CHUNK_ENTRY, count=num_chunks, offset=FOOTER_FIXED_LEN)
    records_at = FOOTER_FIXED_LEN + CHUNK_ENTRY.itemsize * num_chunks
    records = np.frombuffer(footer, RECORD_ENTRY, count=num_records, offset=records_at)
    chunk_table_at = footer_offset + FOOTER_FIXED_LEN

    # Chunks tile [64, footer_offset) in order, and the records 0 .. num_records in order.
    offsets = chunks["offset"].astype(object)  # Python ints: no overflow in the sums below
    ends = offsets + chunks["stored_len"].astype(object)
    firsts = chunks["first_record"].astype(np.int64)
    record_ends = firsts + chunks["num_records"]
    expected_starts = [HEADER_LEN, *ends[:-1]]
    expected_firsts = [0, *record_ends[:-1]]
    for c in range(num_chunks):
        at = chunk_table_at + CHUNK_ENTRY.itemsize * c
        if offsets[c] != expected_starts[c]:
            raise where.error(
                f"footer: chunk {c} starts at {offsets[c]}, expected {expected_starts[c]}", at
            )
        if chunks["num_records"][c] < 1:
            raise where.error(f"footer: chunk {c} has no records", at + 20)
        if firsts[c] != expected_firsts[c]:
            raise where.error(
                f"footer: chunk {c} starts at record {firsts[c]}, expected {expected_firsts[c]}",
                at + 16,
            )
    last_end = ends[-1] if num_chunks else HEADER_LEN
    if last_end != footer_offset:
        raise where.error(f"footer: the chunks end at {last_end}, not at the footer", footer_offset)
    last_record = record_ends[-1] if num_chunks else 0
    if last_record != num_records:
        raise where.error(
            f"footer: the chunks cover {last_record} of {num_records} records", footer_offset
        )

    # Each chunk's positions are its records' lengths; top-K entries are positions x K.
    lengths = records["length"].astype(np.int64)
    per_chunk = np.add.reduceat(lengths, firsts) if num_chunks else np.zeros(0, np.int64)
    for c in np.flatnonzero(per_chunk != chunks["num_positions"])[:1]:
        raise where.error(
            f"footer: chunk {c} claims {chunks['num_positions'][c]} positions, its records "
            f"hold {per_chunk[c]}",
            chunk_table_at + CHUNK_ENTRY.itemsize * int(c) + 24,
        )
    # Reading: the footer's num_positions is the sum of the record lengths (FORMAT.md only
    # says the counts agree with the manifest).
    if num_positions != int(lengths.sum()):
        raise where.error(
            f"footer: num_positions {num_positions} != sum of record lengths {lengths.sum()}",
            footer_offset + 16,
        )
    if header.kind == "topk":
        bad = chunks["num_entries"].astype(np.int64) != per_chunk * header.k
        for c in np.flatnonzero(bad)[:1]:
            raise where.error(
                f"footer: chunk {c} has {chunks['num_entries'][c]} entries, not positions x K",
                chunk_table_at + CHUNK_ENTRY.itemsize * int(c) + 28,
            )
    return Footer(chunks=chunks, records=records, num_positions=num_positions)


def read_shard(
    store: str, index: int, entry: dict[str, Any], manifest: dict[str, Any]
) -> list[tuple[int, dict[str, Any]]]:
    """Check and decode one shard; returns its (sample_id, record) pairs in write order."""
    file = os.path.join(store, entry["file"])
    where = Where(file, shard=index)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise where.error(f"cannot read the shard: {e}") from None
    if len(data) != entry["bytes"]:
        raise where.error(f"the file has {len(data)} bytes, the manifest says {entry['bytes']}")
    header = parse_header(data, manifest, int(entry["uid"], 16), where)
    footer_offset, _, footer_crc = parse_trailer(data, where)
    footer = parse_footer(data, footer_offset, footer_crc, header, where)
    counts = {
        "num_chunks": len(footer.chunks),
        "num_samples": len(footer.records),
        "num_positions": footer.num_positions,
    }
    for key, value in counts.items():
        if value != entry[key]:
            raise where.error(f"the footer holds {value} for {key}, the manifest {entry[key]}")

    out: list[tuple[int, dict[str, Any]]] = []
    for c, chunk in enumerate(footer.chunks):
        first, n = int(chunk["first_record"]), int(chunk["num_records"])
        records = footer.records[first : first + n]
        chunk_where = Where(file, shard=index, chunk=c, sample_id=int(records["sample_id"][0]))
        out.extend(decode_chunk(data, chunk, records, header, chunk_where))

    # The whole-file checksum of the manifest (every byte is also covered by the checks above).
    if crc32(data) != int(entry["checksum"][len("crc32:") :], 16):
        raise where.error("the file's CRC-32 does not match the manifest's checksum")
    return out


# --------------------------------------------------------------------------------------------
# Section 4: chunks


class Cursor:
    """Sequential reader of one stream (extension streams mix single bytes and varints)."""

    def __init__(self, data: bytes, name: str, where: Where) -> None:
        self.data, self.pos, self.name, self.where = data, 0, name, where

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.where.error(f"stream {self.name}: truncated")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        """Unsigned LEB128, at most 10 bytes, value below 2^64."""
        value = 0
        for i in range(10):
            b = self.byte()
            value |= (b & 0x7F) << (7 * i)
            if b < 0x80:
                break
        else:
            raise self.where.error(f"stream {self.name}: varint longer than 10 bytes")
        if value >= 2**64:
            raise self.where.error(f"stream {self.name}: varint above 2^64 - 1")
        return value

    def expect_end(self) -> None:
        if self.pos != len(self.data):
            raise self.where.error(
                f"stream {self.name}: {len(self.data) - self.pos} trailing bytes"
            )


def decode_varints(data: bytes, name: str, where: Where) -> np.ndarray:
    """A stream made only of varints, as uint64 values (vectorized)."""
    b = np.frombuffer(data, np.uint8)
    if b.size == 0:
        return np.zeros(0, np.uint64)
    if b[-1] >= 0x80:
        raise where.error(f"stream {name}: truncated varint at its end")
    last = np.flatnonzero(b < 0x80)  # the last byte of every varint
    first = np.concatenate(([0], last[:-1] + 1))
    nbytes = last - first + 1
    if nbytes.max() > 10:
        raise where.error(f"stream {name}: varint longer than 10 bytes")
    if np.any((nbytes == 10) & (b[last] > 1)):  # the 10th byte holds bit 63 only
        raise where.error(f"stream {name}: varint above 2^64 - 1")
    shift = 7 * (np.arange(b.size) - np.repeat(first, nbytes))
    parts = (b & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.add.reduceat(parts, first)  # the parts have disjoint bits: sum = OR


def decode_u32_planes(data: bytes, n: int, name: str, where: Where) -> np.ndarray:
    """n u32 values stored as 4 planes of n bytes (low bytes first)."""
    if len(data) != 4 * n:
        raise where.error(f"stream {name}: {len(data)} bytes, expected 4 x {n}")
    planes = np.frombuffer(data, np.uint8).reshape(4, n).astype(np.uint32)
    return planes[0] | (planes[1] << 8) | (planes[2] << 16) | (planes[3] << 24)


def unxor_rows(words: np.ndarray, row_lens: np.ndarray) -> np.ndarray:
    """Undo the lossless transform: within each row, word i is XORed with word i - 1.
    A running XOR over the whole array, re-based at every row start."""
    running = np.bitwise_xor.accumulate(words) if words.size else words
    starts = np.cumsum(row_lens) - row_lens
    before_row = np.zeros(len(row_lens), np.uint32)  # running XOR just before each row
    nonempty_tail = starts > 0
    before_row[nonempty_tail] = running[starts[nonempty_tail] - 1]
    return running ^ np.repeat(before_row, row_lens)


def decode_rank_codes(lead: bytes, ext: Cursor, num_ids: int, where: Where) -> np.ndarray:
    """Ranks from lead bytes and their extension stream (section 4.1)."""
    ranks = np.frombuffer(lead, np.uint8).astype(np.int64)
    for i in np.flatnonzero(ranks >= RANK_ONE_BYTE):  # extensions are read in entry order
        b = int(ranks[i])
        if b < RANK_ESCAPE:
            ranks[i] = RANK_ONE_BYTE + (b - RANK_ONE_BYTE) * 256 + ext.byte()
        else:
            v = ext.varint()
            if v >= num_ids:  # also keeps the value in int64
                raise where.error(f"stream {ext.name}: rank {RANK_VARINT_BASE + v} too large")
            ranks[i] = RANK_VARINT_BASE + v
    ext.expect_end()
    if ranks.size and ranks.max() >= num_ids:
        raise where.error(f"rank {ranks.max()} >= {num_ids} distinct ids")
    return ranks


def decode_level_codes(lead: bytes, ext: Cursor, where: Where) -> np.ndarray:
    """Coded numbers of the abs and kl codecs: lead v < 255, else 255 + a varint."""
    values = np.frombuffer(lead, np.uint8).astype(np.int64)
    for i in np.flatnonzero(values == LEVEL_ESCAPE):
        v = LEVEL_ESCAPE + ext.varint()
        # No valid coded number exceeds 2^42 (a kl top level at 2^-22 nats); the codecs check
        # their own, tighter ranges.
        if v > MAX_CODED:
            raise where.error(f"stream {ext.name}: coded number {v} exceeds 2^42")
        values[i] = v
    ext.expect_end()
    return values


def decode_pair_codes(lead: bytes, ext: Cursor, per_row: np.ndarray, where: Where) -> np.ndarray:
    """Coded numbers of the entries j >= 16 of top-K rows, in row order (section 4.2).

    ``per_row``: how many such entries each row codes. A row's numbers come in pairs, each
    one lead byte (``15 a + b``, or 225 and then a and b as varints in the extension); a row
    with an odd count pads its last pair with b = 0."""
    pairs_per_row = (per_row + 1) // 2
    codes = np.frombuffer(lead, np.uint8).astype(np.int64)
    if len(codes) != int(pairs_per_row.sum()):
        raise where.error(
            f"stream {ext.name}: {len(codes)} pair bytes, expected {pairs_per_row.sum()}"
        )
    if np.any(codes > PAIR_ESCAPE):
        raise where.error(f"pair byte {codes.max()} is above {PAIR_ESCAPE}")
    first, second = codes // PAIR_BASE, codes % PAIR_BASE
    for i in np.flatnonzero(codes == PAIR_ESCAPE):  # extensions are read in pair order
        a, b = ext.varint(), ext.varint()
        if max(a, b) > MAX_CODED:
            raise where.error(f"stream {ext.name}: coded number {max(a, b)} exceeds 2^42")
        first[i], second[i] = a, b
    ext.expect_end()
    values = np.stack([first, second], axis=1).reshape(-1)
    row = np.repeat(np.arange(len(per_row)), 2 * pairs_per_row)
    starts = np.cumsum(2 * pairs_per_row) - 2 * pairs_per_row
    keep = np.arange(len(values)) - starts[row] < per_row[row]
    if np.any(values[~keep] != 0):
        raise where.error("an odd row's pair pad is not 0")
    return values[keep]


class Streams:
    """A chunk's streams by tag. A missing stream reads as empty; at the end every stream must
    have been used (a stream the kind and codec do not use must be empty)."""

    def __init__(self, streams: dict[int, bytes], where: Where) -> None:
        self.streams, self.used, self.where = streams, set[int](), where

    def take(self, tag: int) -> bytes:
        self.used.add(tag)
        return self.streams.get(tag, b"")

    def cursor(self, tag: int) -> Cursor:
        return Cursor(self.take(tag), f"tag {tag}", self.where)

    def varints(self, tag: int) -> np.ndarray:
        return decode_varints(self.take(tag), f"tag {tag}", self.where)

    def finish(self) -> None:
        for tag, data in sorted(self.streams.items()):
            # Reading: "Every stream must be consumed exactly": a non-empty stream that this
            # kind and codec never read is an error; an empty one is harmless.
            if tag not in self.used and data:
                raise self.where.error(f"stream tag {tag} is not used by this store but holds data")


def read_chunk_streams(
    chunk_bytes: bytes, positions: int, entries: int, offset: int, where: Where
) -> dict[int, bytes]:
    """Parse a chunk's directory and return its raw (decompressed) streams by tag."""
    if len(chunk_bytes) < 2:
        raise where.error("chunk: shorter than its directory", offset)
    layout, num_streams = chunk_bytes[0], chunk_bytes[1]
    if layout != CHUNK_LAYOUT:
        raise where.error(f"chunk: unknown layout {layout}", offset)
    data_at = 2 + STREAM_DIR_ENTRY.size * num_streams
    if data_at > len(chunk_bytes):
        raise where.error(f"chunk: directory of {num_streams} streams is truncated", offset)
    raw_limit = 10 * (2 * entries + positions) + 64
    directory = []
    for i in range(num_streams):
        at = 2 + STREAM_DIR_ENTRY.size * i
        tag, method, stored_len, raw_len = STREAM_DIR_ENTRY.unpack_from(chunk_bytes, at)
        if tag not in KNOWN_TAGS:
            raise where.error(f"chunk: unknown stream tag {tag}", offset + at)
        if any(tag == t for t, *_ in directory):
            raise where.error(f"chunk: stream tag {tag} appears twice", offset + at)
        if method not in (0, 1):
            raise where.error(f"chunk: stream tag {tag} has unknown method {method}", offset + at)
        if method == 0 and stored_len != raw_len:
            raise where.error(f"chunk: stored stream tag {tag} with raw_len != stored_len")
        # Reading: the limit applies to each stream's raw_len.
        if raw_len > raw_limit:
            raise where.error(
                f"chunk: stream tag {tag} declares {raw_len} raw bytes, above {raw_limit}",
                offset + at,
            )
        directory.append((tag, method, stored_len, raw_len))
    if data_at + sum(d[2] for d in directory) != len(chunk_bytes):
        raise where.error("chunk: its streams do not fill it exactly", offset)

    streams = {}
    at = data_at
    for tag, method, stored_len, raw_len in directory:
        stored = chunk_bytes[at : at + stored_len]
        streams[tag] = stored if method == 0 else unzstd(stored, raw_len, tag, offset + at, where)
        at += stored_len
    return streams


def unzstd(stored: bytes, raw_len: int, tag: int, offset: int, where: Where) -> bytes:
    """Exactly one zstd frame that decompresses to exactly raw_len bytes."""
    dctx = zstandard.ZstdDecompressor()
    try:
        # Bounded first: never produce more than raw_len + 1 bytes.
        head = dctx.stream_reader(stored, read_across_frames=False).read(raw_len + 1)
        if len(head) != raw_len:
            size = "more than" if len(head) > raw_len else f"{len(head)}, not"
            message = f"chunk: stream tag {tag} decompresses to {size} {raw_len} bytes"
            raise where.error(message, offset)
        # Then whole: the frame must end exactly at the end of the stored bytes.
        obj = dctx.decompressobj()
        raw = obj.decompress(stored)
    except zstandard.ZstdError as e:
        message = f"chunk: stream tag {tag} is not a valid zstd frame: {e}"
        raise where.error(message, offset) from None
    if not obj.eof or obj.unused_data or raw != head:
        raise where.error(f"chunk: stream tag {tag} is not exactly one zstd frame", offset)
    return raw


def decode_chunk(
    data: bytes, chunk: np.void, records: np.ndarray, header: Header, where: Where
) -> list[tuple[int, dict[str, Any]]]:
    """Check a chunk's CRC, decode it, and split it into records."""
    offset, stored_len = int(chunk["offset"]), int(chunk["stored_len"])
    chunk_bytes = data[offset : offset + stored_len]
    if crc32(chunk_bytes) != int(chunk["crc32"]):
        raise where.error("chunk: checksum mismatch", offset)
    positions, entries = int(chunk["num_positions"]), int(chunk["num_entries"])
    raw = read_chunk_streams(chunk_bytes, positions, entries, offset, where)
    streams = Streams(raw, where)

    # The id table (section 4.1): distinct ids in increasing order, with their counts.
    gaps = streams.varints(TAG_ID_GAPS)
    counts = streams.varints(TAG_ID_COUNTS)
    if len(gaps) != len(counts):
        raise where.error(f"id table: {len(gaps)} ids but {len(counts)} counts")
    if np.any(gaps >= header.vocab_size):  # also bounds the sums below
        raise where.error(f"id table: an id is not below vocab_size {header.vocab_size}")
    table_ids = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if table_ids.size and table_ids[-1] >= header.vocab_size:
        raise where.error(f"id table: id {table_ids[-1]} is not below {header.vocab_size}")
    if np.any(counts == 0) or np.any(counts > positions + entries):
        raise where.error("id table: a count is 0 or above P + E")
    counts = counts.astype(np.int64)
    if int(counts.sum()) != positions + entries:
        raise where.error(f"id table: counts add up to {counts.sum()}, not P + E")
    by_rank = np.lexsort((table_ids, -counts))  # decreasing count, ties by increasing id
    rank_to_id, rank_counts = table_ids[by_rank], counts[by_rank]
    num_ids = len(table_ids)

    # Input ids: one rank code per position.
    input_ranks = decode_rank_codes(
        streams.take(TAG_INPUT_LEAD), streams.cursor(TAG_INPUT_EXT), num_ids, where
    )
    if len(input_ranks) != positions:
        raise where.error(f"input ids: {len(input_ranks)} lead bytes for {positions} positions")

    # Row lengths: K for top-K, tag 26 for sampled (section 4.3).
    if header.kind == "topk":
        row_lens = np.full(positions, header.k, np.int64)
    else:
        row_lens = streams.varints(TAG_ROW_LENS)
        if len(row_lens) != positions:
            raise where.error(f"row lengths: {len(row_lens)} values for {positions} positions")
        if np.any((row_lens < 1) | (row_lens > header.k)):
            raise where.error(f"row lengths: a value is outside [1, n = {header.k}]")
        row_lens = row_lens.astype(np.int64)
    if int(row_lens.sum()) != entries:
        raise where.error(f"rows hold {row_lens.sum()} entries, the footer says {entries}")
    row_starts = np.cumsum(row_lens) - row_lens
    entry_row = np.repeat(np.arange(positions), row_lens)  # row of each entry, in row order
    entry_j = np.arange(entries) - row_starts[entry_row]  # index of each entry in its row

    # Target ids: entries of group g in tags 8 + g / 12 + g, in row order.
    target_ranks = read_grouped(
        streams, TAG_TARGET_LEAD, TAG_TARGET_EXT, entry_j, where,
        lambda lead, ext: decode_rank_codes(lead, ext, num_ids, where),
    )  # fmt: skip

    # The table's counts are the ids' occurrences in the chunk.
    seen = np.bincount(np.concatenate([input_ranks, target_ranks]), minlength=num_ids)
    if not np.array_equal(seen, rank_counts):
        raise where.error("id table: counts do not match the ids' occurrences in the chunk")
    input_ids = rank_to_id[input_ranks]
    target_ids = rank_to_id[target_ranks]

    if header.kind == "sampled":
        sampled_counts = streams.varints(TAG_SAMPLED_COUNTS)
        check_sampled_rows(target_ids, sampled_counts, entry_row, row_lens, header.k, where)
        sampled_counts = sampled_counts.astype(np.int64)
    logprobs = decode_logprobs(streams, header, row_lens, entry_j, where)
    streams.finish()

    # Split the chunk's positions into its records.
    out: list[tuple[int, dict[str, Any]]] = []
    pos = ent = 0
    for sample_id, length in zip(
        records["sample_id"].tolist(), records["length"].tolist(), strict=True
    ):
        lens = row_lens[pos : pos + length]
        n_ent = int(lens.sum())
        record: dict[str, Any] = {"input_ids": input_ids[pos : pos + length]}
        if header.kind == "topk":
            record["ids"] = target_ids[ent : ent + n_ent].reshape(length, header.k)
            assert logprobs is not None
            record["logprobs"] = logprobs[ent : ent + n_ent].reshape(length, header.k)
        else:
            record["row_lens"] = lens
            record["ids"] = target_ids[ent : ent + n_ent]
            record["counts"] = sampled_counts[ent : ent + n_ent]
            record["logprobs"] = None if logprobs is None else logprobs[ent : ent + n_ent]
        out.append((sample_id, record))
        pos, ent = pos + length, ent + n_ent
    return out


def read_grouped(
    streams: Streams,
    lead_tag: int,
    ext_tag: int,
    entry_j: np.ndarray,
    where: Where,
    decode: Callable[[bytes, Cursor], np.ndarray],
    num_groups: int = NUM_GROUPS,
) -> np.ndarray:
    """Values of entries (given by their in-row index j, in row order) whose codes are split
    by group: group g's lead bytes in tag lead_tag + g, extensions in tag ext_tag + g, for g
    below ``num_groups`` (every entry must be in one of these groups)."""
    values = np.zeros(len(entry_j), np.int64)
    groups = group_of(entry_j)
    for g in range(num_groups):
        in_group = groups == g  # boolean selection keeps row order
        lead = streams.take(lead_tag + g)
        if len(lead) != int(in_group.sum()):
            raise where.error(
                f"stream tag {lead_tag + g}: {len(lead)} lead bytes for {in_group.sum()} entries"
            )
        values[in_group] = decode(lead, streams.cursor(ext_tag + g))
    return values


def check_sampled_rows(
    ids: np.ndarray,
    counts: np.ndarray,
    entry_row: np.ndarray,
    row_lens: np.ndarray,
    n: int,
    where: Where,
) -> None:
    """Section 4.3: counts >= 1 summing to n per row; a row's ids are distinct."""
    if len(counts) != len(ids):
        raise where.error(f"sampled counts: {len(counts)} values for {len(ids)} entries")
    if np.any(counts == 0):
        raise where.error("sampled counts: a count is 0")
    if np.any(counts > n):  # before summing, so that sums stay small
        raise where.error(f"sampled counts: a count exceeds n = {n}")
    # float64 sums: exact below 2^53, and a sum that large cannot equal n < 2^32 anyway.
    row_sums = np.bincount(entry_row, weights=counts, minlength=len(row_lens))
    if np.any(row_sums != n):
        raise where.error(f"sampled counts: a row's counts do not add up to n = {n}")
    # Reading: tag 26 counts "distinct ids", so a row may not repeat an id.
    order = np.lexsort((ids, entry_row))
    same = (entry_row[order][1:] == entry_row[order][:-1]) & (ids[order][1:] == ids[order][:-1])
    if np.any(same):
        raise where.error("sampled row: an id appears twice in one row")


def levels_to_float(levels: np.ndarray, step: np.ndarray | np.float32) -> np.ndarray:
    """The float32 value 0 - level * step (exact: level * m <= 2^24 for the step m 2^-e)."""
    return np.float32(0.0) - levels.astype(np.float32) * step


def decode_logprobs(
    streams: Streams, header: Header, row_lens: np.ndarray, entry_j: np.ndarray, where: Where
) -> np.ndarray | None:
    """The chunk's log-probabilities, one float32 per entry in row order (section 4.2)."""
    entries = len(entry_j)
    if header.codec == "none":
        return None
    if header.codec == "lossless":
        words = decode_u32_planes(streams.take(TAG_LOSSLESS), entries, "tag 24", where)
        return unxor_rows(words, row_lens).view(np.float32)

    def level_codes(lead: bytes, ext: Cursor) -> np.ndarray:
        return decode_level_codes(lead, ext, where)

    step = np.float32(header.step)
    # abs: levels (on both grids) are at most 2^24 / m for the step m 2^-e.
    max_abs_level = MAX_LEVEL // ABS_STEPS.get(float(header.step), 1)
    if header.kind == "sampled":  # abs: one level per entry
        levels = read_grouped(streams, TAG_LEVEL_LEAD, TAG_LEVEL_EXT, entry_j, where, level_codes)
        if np.any(levels > max_abs_level):
            raise where.error(f"log-probabilities: a level exceeds {max_abs_level}")
        return levels_to_float(levels, step)

    # Top-K, abs or kl: rows of K entries, finite entries first.
    positions, k = len(row_lens), header.k
    finite = read_finite_counts(streams, positions, k, where)
    modes = None
    if header.codec == "kl":
        modes = np.frombuffer(streams.take(TAG_ROW_MODES), np.uint8)
        if len(modes) != positions:
            raise where.error(f"row modes: {len(modes)} bytes for {positions} rows")
        lossy = modes != KL_LOSSLESS_MODE
        base, top_index = modes & 15, modes >> 4
        bad = (base < KL_BASE_EXPONENTS.start) | (base >= KL_BASE_EXPONENTS.stop)
        if np.any(lossy & (bad | (top_index > 3))):
            raise where.error("row modes: a mode byte is not defined")
        if np.any(~lossy & (finite != k)):
            raise where.error("finite counts: a lossless row's entry is not K")
    else:
        lossy = np.ones(positions, bool)
    coded = (np.arange(k)[None, :] < finite[:, None]) & lossy[:, None]  # [P, K]
    codes = np.zeros((positions, k), np.int64)
    shallow = coded & (np.arange(k)[None, :] < PAIRED_FROM)
    codes[shallow] = read_grouped(
        streams, TAG_LEVEL_LEAD, TAG_LEVEL_EXT, entry_j.reshape(positions, k)[shallow], where,
        level_codes, num_groups=NUM_GROUPS - 1,
    )  # fmt: skip
    deep = coded & ~shallow
    codes[deep] = decode_pair_codes(
        streams.take(TAG_LEVEL_LEAD + 3), streams.cursor(TAG_LEVEL_EXT + 3), deep.sum(axis=1),
        where,
    )  # fmt: skip

    if modes is None:
        # abs: the first code is the top entry's level Q0 on the grid s/64; the second is
        # q_1 - floor(Q0 / 64) + 1, each further one q_j - q_{j-1}.
        if np.any(coded & (codes > MAX_LEVEL + 1)):  # also keeps the sums small
            raise where.error("log-probabilities: a coded number exceeds 2^24 + 1")
        top_fine = codes[:, 0].copy()
        if np.any(top_fine > max_abs_level):
            raise where.error(f"log-probabilities: a top level exceeds {max_abs_level}")
        codes[:, 0] = top_fine // TOP_FINE - 1
        levels = np.cumsum(codes, axis=1)
        levels[:, 0] = 0  # decoded from the fine level below
    else:  # kl: the top entry on the grid u = 2^-(b+e), then 2^-b doubling every 1.5 nats
        extra = np.where(lossy, KL_TOP_EXTRA[np.minimum(top_index, 3)], 0)
        shift = np.where(lossy, base.astype(np.int64) + extra, 0)
        max_level = np.left_shift(np.int64(1), 20 + shift)
        levels = np.zeros((positions, k), np.int64)
        level = np.zeros(positions, np.int64)
        for j in range(k):
            band = np.minimum(12, (2 * level) // (3 * np.left_shift(np.int64(1), shift)))
            scale = np.zeros(positions, np.int64) if j == 0 else extra + band
            # Checked before the shift, so that every value stays below 2^44.
            if np.any(coded[:, j] & (codes[:, j] > (max_level - level) >> scale)):
                raise where.error("log-probabilities: a kl level exceeds 2^(20+b+e)")
            level = level + (codes[:, j] << scale)
            levels[:, j] = level
        levels = np.where(coded, levels, 0)
    if modes is None:
        if np.any(coded & ((levels > max_abs_level) | (levels < 0))):
            raise where.error(f"log-probabilities: a level is outside [0, {max_abs_level}]")
        decoded = levels_to_float(levels, step)
    else:  # -(L u) in float64 (exact), rounded to the nearest float32
        unit = np.ldexp(1.0, -shift)[:, None]
        decoded = (-(levels.astype(np.float64) * unit)).astype(np.float32)
    values = np.where(coded, decoded, np.float32(-np.inf))
    if modes is None and k:
        top = levels_to_float(top_fine, np.float32(step / TOP_FINE))
        values[:, 0] = np.where(coded[:, 0], top, np.float32(-np.inf))

    if modes is not None:  # kl rows kept losslessly: K words each, concatenated in tag 24
        n_rows = int((~lossy).sum())
        words = decode_u32_planes(streams.take(TAG_LOSSLESS), n_rows * k, "tag 24", where)
        values[~lossy] = unxor_rows(words, np.full(n_rows, k)).view(np.float32).reshape(-1, k)
    return values.astype(np.float32).reshape(-1)


def read_finite_counts(streams: Streams, positions: int, k: int, where: Where) -> np.ndarray:
    """Tag 25: per row, the number of leading finite entries; absent means all K."""
    data = streams.take(TAG_FINITE_COUNTS)
    if not data:
        # Reading: an empty tag 25 cannot hold P >= 1 varints, so it means "absent"; with
        # P = 0 both readings agree.
        return np.full(positions, k, np.int64)
    finite = decode_varints(data, "tag 25", where)
    if len(finite) != positions:
        raise where.error(f"finite counts: {len(finite)} values for {positions} rows")
    if np.any(finite > k):
        raise where.error(f"finite counts: a value exceeds K = {k}")
    return finite.astype(np.int64)


# --------------------------------------------------------------------------------------------
# The store


def read_store(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a whole store.

    Returns ``{"manifest": BODY, "records": {sample_id: record}}``. A record holds numpy
    arrays: ``input_ids`` [L] int64, and for top-K stores ``ids`` [L, K] int64 and
    ``logprobs`` [L, K] float32; for sampled stores ``row_lens`` [L] int64, ``ids`` and
    ``counts`` (int64, flat in row order) and ``logprobs`` (float32, flat, or None for codec
    ``none``).
    """
    store = os.fspath(path)
    manifest = read_manifest(store)
    records: dict[int, dict[str, Any]] = {}
    for index, entry in enumerate(manifest["shards"]):
        for sample_id, record in read_shard(store, index, entry, manifest):
            if sample_id in records:
                file = os.path.join(store, entry["file"])
                raise Where(file, shard=index, sample_id=sample_id).error(
                    "sample id appears twice in the store"
                )
            records[sample_id] = record
    return {"manifest": manifest, "records": records}
