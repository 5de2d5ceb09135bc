"""Chunk payload codec experiments for top-K teacher stores (ids + log-probabilities).

Measures bytes per position of candidate byte-oriented transforms whose entropy coding is
left to zstd (Huffman for literals), on a synthetic corpus (``benches/synthetic.py``) and on
a real-text n-gram teacher (``benches/ngram_teacher.py``).  Every candidate's side
information (per-chunk dictionaries, tables) is counted; every transform used in the
recommendation is decoded back and checked (exact ids, documented error bound).

    python benches/codec_experiments.py            # full run (a few minutes)
    python benches/codec_experiments.py --quick    # smaller corpora, fewer levels

Results are printed as markdown tables and written to ``benches/out/codec_results.md``
and ``benches/out/codec_results.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard as zstd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic
from synthetic import TeacherCorpus

OUT = Path(__file__).resolve().parent / "out"
RANK_GROUPS = ((0, 4), (4, 16), (16, None))

# --------------------------------------------------------------------------------------
# zstd helpers


_CCTX: dict[int, zstd.ZstdCompressor] = {}


def zc(level: int) -> zstd.ZstdCompressor:
    """One single-threaded compressor per level (frames carry their content size)."""
    if level not in _CCTX:
        _CCTX[level] = zstd.ZstdCompressor(level=level, write_checksum=False)
    return _CCTX[level]


def zsize(buf: np.ndarray | bytes, level: int) -> int:
    """Compressed size of one stream as its own zstd frame (0 for an empty stream)."""
    b = buf.tobytes() if isinstance(buf, np.ndarray) else buf
    if not b:
        return 0
    return len(zc(level).compress(b))


def entropy_bytes(buf: np.ndarray) -> float:
    """Order-0 empirical entropy of a byte stream, in bytes (no table cost)."""
    if buf.size == 0:
        return 0.0
    c = np.bincount(buf.reshape(-1).view(np.uint8), minlength=256).astype(np.float64)
    p = c[c > 0] / buf.size
    return float(-(c[c > 0] * np.log2(p)).sum() / 8)


Streams = dict[str, np.ndarray]


def streams_size(streams: Streams, level: int) -> int:
    return sum(zsize(s, level) for s in streams.values())


# --------------------------------------------------------------------------------------
# tiered byte code: one byte per symbol in the main stream, continuation bytes apart


@dataclass(frozen=True)
class Tier:
    """Main byte ``< lit``: the value.  Then ``e1`` codes with 1 continuation byte,
    ``e2`` with 2, ``e3`` with 3 (high bits in the main byte, low bytes in ``ext``, most
    significant first).  The top ``reserved`` main-byte values are special symbols."""

    lit: int
    e1: int
    e2: int
    e3: int = 0
    reserved: int = 0

    def __post_init__(self):
        assert self.lit + self.e1 + self.e2 + self.e3 + self.reserved == 256

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        b1 = self.lit
        b2 = b1 + self.e1 * 256
        b3 = b2 + self.e2 * 65536
        return b1, b2, b3, b3 + self.e3 * (1 << 24)

    def encode(self, v: np.ndarray, special: np.ndarray | None = None):
        """``v`` non-negative ints; ``special`` (same shape, -1 = none) reserved codes."""
        v = np.asarray(v, dtype=np.int64).reshape(-1)
        b1, b2, b3, b4 = self.bounds
        if v.size and (v.min() < 0 or v.max() >= b4):
            raise ValueError(f"tier code out of range: [{v.min()}, {v.max()}] vs {b4}")
        main = np.empty(v.size, dtype=np.uint8)
        nb = np.zeros(v.size, dtype=np.int64)
        eb = np.zeros((v.size, 3), dtype=np.uint8)
        t0 = v < b1
        main[t0] = v[t0]
        t1 = (v >= b1) & (v < b2)
        w = v[t1] - b1
        main[t1] = self.lit + (w >> 8)
        nb[t1] = 1
        eb[t1, 0] = w & 255
        t2 = (v >= b2) & (v < b3)
        w = v[t2] - b2
        main[t2] = self.lit + self.e1 + (w >> 16)
        nb[t2] = 2
        eb[t2, 0] = (w >> 8) & 255
        eb[t2, 1] = w & 255
        t3 = v >= b3
        w = v[t3] - b3
        main[t3] = self.lit + self.e1 + self.e2 + (w >> 24)
        nb[t3] = 3
        eb[t3, 0] = (w >> 16) & 255
        eb[t3, 1] = (w >> 8) & 255
        eb[t3, 2] = w & 255
        if special is not None:
            sp = np.asarray(special).reshape(-1)
            s = sp >= 0
            main[s] = 256 - self.reserved + sp[s]
            nb[s] = 0
        ext = eb[np.arange(3)[None, :] < nb[:, None]]
        return main, ext

    def decode(self, main: np.ndarray, ext: np.ndarray):
        """Inverse of :meth:`encode`: (values, special) with special = -1 where none."""
        m = main.astype(np.int64)
        b1, b2, b3, _ = self.bounds
        l1 = self.lit + self.e1
        l2 = l1 + self.e2
        l3 = l2 + self.e3
        nb = np.where(m < self.lit, 0, np.where(m < l1, 1, np.where(m < l2, 2, 0)))
        nb = np.where((m >= l2) & (m < l3), 3, nb)
        start = np.cumsum(nb) - nb
        e = ext.astype(np.int64)
        val = np.where(m < self.lit, m, 0)
        i1 = (m >= self.lit) & (m < l1)
        val[i1] = b1 + ((m[i1] - self.lit) << 8) + e[start[i1]]
        i2 = (m >= l1) & (m < l2)
        s2 = start[i2]
        val[i2] = b2 + ((m[i2] - l1) << 16) + (e[s2] << 8) + e[s2 + 1]
        i3 = (m >= l2) & (m < l3)
        s3 = start[i3]
        val[i3] = b3 + ((m[i3] - l2) << 24) + (e[s3] << 16) + (e[s3 + 1] << 8) + e[s3 + 2]
        special = np.where(m >= l3, m - l3, -1)
        return val, special


ID_TIER = Tier(lit=192, e1=48, e2=16)  # 1 byte < 192, 2 bytes < 12480, 3 bytes < 1.06M
LP_TIER = Tier(lit=240, e1=13, e2=2, reserved=1)  # reserved code 0: -inf from here on
POS_TIER = Tier(lit=255, e1=0, e2=0, reserved=1)  # 0..254, reserved: escape


def rank_groups(k: int) -> list[tuple[int, int]]:
    out = []
    for a, b in RANK_GROUPS:
        b = k if b is None else min(b, k)
        if a < b:
            out.append((a, b))
    return out


# --------------------------------------------------------------------------------------
# corpora and chunks


@dataclass
class Chunk:
    ids: np.ndarray  # int64 [n, K]
    lp: np.ndarray  # float32 [n, K]
    inputs: np.ndarray  # int64 [n]
    rec_start: np.ndarray  # bool [n]: first position of a record (no previous row)


def chunks_of(c: TeacherCorpus, size: int, limit: int | None = None) -> list[Chunk]:
    starts = np.zeros(c.n_positions, dtype=bool)
    starts[c.offsets[:-1]] = True
    out = []
    for a in range(0, c.n_positions, size):
        b = min(a + size, c.n_positions)
        st = starts[a:b].copy()
        st[0] = True  # the chunk's first row has no previous row inside the chunk
        out.append(
            Chunk(
                c.topk_ids[a:b].astype(np.int64),
                c.topk_logprobs[a:b],
                c.input_ids[a:b].astype(np.int64),
                st,
            )
        )
        if limit and len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------------------
# id transforms.  Each returns (streams, side_bytes_already_compressed)


def u_planes(v: np.ndarray, nbytes: int, prefix: str) -> Streams:
    v = np.asarray(v, dtype=np.uint32).reshape(-1)
    return {f"{prefix}p{b}": ((v >> (8 * b)) & 255).astype(np.uint8) for b in range(nbytes)}


def id_bytes(vocab: int) -> int:
    return 2 if vocab <= 1 << 16 else 3


def ids_raw_u32(ch: Chunk, ctx) -> tuple[Streams, int]:
    return {"raw": ch.ids.astype("<u4").view(np.uint8).reshape(-1)}, 0


def ids_planes(ch: Chunk, ctx, rank_major: bool = False) -> tuple[Streams, int]:
    v = ch.ids.T if rank_major else ch.ids
    return u_planes(v, id_bytes(ctx["vocab"]), ""), 0


def tier_streams(vals: np.ndarray, tier: Tier, prefix: str, groups=None, special=None):
    """Tier-code ``vals`` [n, K]; with ``groups`` one main+ext stream pair per rank group."""
    out: Streams = {}
    if groups is None:
        m, e = tier.encode(vals, special)
        out[prefix + "main"] = m
        out[prefix + "ext"] = e
        return out
    for a, b in groups:
        sp = None if special is None else special[:, a:b]
        m, e = tier.encode(vals[:, a:b], sp)
        out[f"{prefix}main{a}"] = m
        out[f"{prefix}ext{a}"] = e
    return out


def ids_value_tier(ch: Chunk, ctx, split: bool = False) -> tuple[Streams, int]:
    g = rank_groups(ch.ids.shape[1]) if split else None
    return tier_streams(ch.ids, ID_TIER, "", g), 0


def table_cost(ids_in_order: np.ndarray, vocab: int, level: int) -> int:
    """Compressed size of an id list stored as byte planes."""
    return streams_size(u_planes(ids_in_order, id_bytes(vocab), "t"), level)


def ids_chunk_dict(
    ch: Chunk, ctx, top: int | None = None, split: bool = False, escape_rank: bool = False
):
    """(C) per-chunk frequency-ranked dictionary (all ids, or only the ``top`` most frequent:
    (D), others escape to ``top + id``, or ``top + store rank``), local index tier-coded;
    the table's cost is included."""
    ids = ch.ids
    uniq, inv, cnt = np.unique(ids, return_inverse=True, return_counts=True)
    order = np.argsort(-cnt, kind="stable")
    local = np.empty_like(order)
    local[order] = np.arange(order.size)
    code = local[inv.reshape(ids.shape)]
    table = uniq[order]
    if top is not None:
        esc = ctx["rank_of_id"][ids] if escape_rank else ids
        code = np.where(code < top, code, top + esc)
        table = table[:top]
    g = rank_groups(ids.shape[1]) if split else None
    return tier_streams(code, ID_TIER, "", g), table_cost(table, ctx["vocab"], ctx["level"])


def learn_ranking(chunks: list[Chunk], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Store-level frequency ranking learned from ``chunks``: (rank_of_id, seen ids)."""
    cnt = np.zeros(vocab, dtype=np.int64)
    for ch in chunks:
        cnt += np.bincount(ch.ids.reshape(-1), minlength=vocab)
    seen = np.flatnonzero(cnt)
    seen = seen[np.argsort(-cnt[seen], kind="stable")]
    unseen = np.flatnonzero(cnt == 0)  # by id: BPE ids correlate with frequency
    id_of_rank = np.concatenate([seen, unseen])
    rank_of_id = np.empty(vocab, dtype=np.int64)
    rank_of_id[id_of_rank] = np.arange(vocab)
    return rank_of_id, seen


def ids_store_rank(ch: Chunk, ctx, split: bool = True, ref: int = 0, tier: Tier = ID_TIER):
    """(S) rank in a store-level frequency ranking, tier-coded, rank-group streams; with
    ``ref > 0`` (G) an id present in the previous row at rank ``j`` within ``ref // 2``
    of its own rank ``r`` is coded as ``zigzag(j - r)`` and others as ``ref + rank``."""
    rank = ctx["rank_of_id"][ch.ids]
    code = rank
    if ref:
        code = rank + ref
        j = prev_row_position(ch)
        r = np.arange(ch.ids.shape[1])[None, :]
        off = j - r
        hit = (j >= 0) & (np.abs(off) < ref // 2)
        zz = np.where(off >= 0, 2 * off, -2 * off - 1)
        code = np.where(hit, zz, code)
    g = rank_groups(ch.ids.shape[1]) if split else None
    return tier_streams(code, tier, "", g), 0


def ids_rank_planes(ch: Chunk, ctx) -> tuple[Streams, int]:
    """(S, fixed width) store rank as u16/u24 byte planes: branch-free SIMD decoding."""
    return u_planes(ctx["rank_of_id"][ch.ids], id_bytes(ctx["vocab"]), ""), 0


def prev_row_position(ch: Chunk) -> np.ndarray:
    """For each entry, its rank in the previous row of the same record (-1: absent)."""
    n, k = ch.ids.shape
    prev = np.empty_like(ch.ids)
    prev[1:] = ch.ids[:-1]
    prev[0] = -1
    prev[ch.rec_start] = -1
    # match by sorting (row, id) pairs of both rows
    key_cur = np.arange(n)[:, None] * (1 << 32) + ch.ids
    key_prev = np.arange(n)[:, None] * (1 << 32) + np.where(prev >= 0, prev, (1 << 32) - 1)
    order = np.argsort(key_prev.reshape(-1), kind="stable")
    sorted_prev = key_prev.reshape(-1)[order]
    idx = np.searchsorted(sorted_prev, key_cur.reshape(-1))
    idx = np.minimum(idx, sorted_prev.size - 1)
    found = sorted_prev[idx] == key_cur.reshape(-1)
    pos = np.where(found, order[np.minimum(idx, order.size - 1)] % k, -1)
    return pos.reshape(n, k)


# --------------------------------------------------------------------------------------
# input token ids


def inputs_standalone(ch: Chunk, ctx) -> Streams:
    rank = ctx["rank_of_id"][ch.inputs]
    m, e = ID_TIER.encode(rank)
    return {"in_main": m, "in_ext": e}


def inputs_via_prev_row(ch: Chunk, ctx, codes_of: Callable | None = None) -> Streams:
    """Input ``t`` as its rank in row ``t - 1`` (same record), else escape + its id code
    (store rank, or ``codes_of(ids)``)."""
    k = ch.ids.shape[1]
    prev = np.empty_like(ch.ids)
    prev[1:] = ch.ids[:-1]
    hit_pos = np.full(ch.inputs.size, -1)
    eq = prev == ch.inputs[:, None]
    has = eq.any(axis=1) & ~ch.rec_start
    hit_pos[has] = eq[has].argmax(axis=1)
    pos = np.where(has, hit_pos, k)  # k: escape
    miss = ch.inputs[~has]
    esc = ctx["rank_of_id"][miss] if codes_of is None else codes_of(miss)
    m, e = ID_TIER.encode(esc)
    return {"in_pos": pos.astype(np.uint8), "in_esc_main": m, "in_esc_ext": e}


def decode_inputs_via_prev_row(streams: Streams, ids: np.ndarray, id_of_rank: np.ndarray):
    k = ids.shape[1]
    pos = streams["in_pos"].astype(np.int64)
    esc, _ = ID_TIER.decode(streams["in_esc_main"], streams["in_esc_ext"])
    out = np.empty(pos.size, dtype=np.int64)
    has = pos < k
    rows = np.flatnonzero(has)
    out[has] = ids[rows - 1, pos[has]]
    out[~has] = id_of_rank[esc]
    return out


# --------------------------------------------------------------------------------------
# log-probabilities


def quantize(lp: np.ndarray, step_exp: int) -> tuple[np.ndarray, np.ndarray]:
    """q = round(-lp * 2^step_exp) (half to even), and the -inf mask."""
    x = -lp.astype(np.float64)
    ninf = np.isinf(x)
    q = np.rint(np.where(ninf, 0.0, x) * (1 << step_exp)).astype(np.int64)
    # monotone non-decreasing by construction for non-increasing lp; -inf entries trail
    return q, ninf


def dequantize(q: np.ndarray, ninf: np.ndarray, step_exp: int) -> np.ndarray:
    """Exact: an integer times a power of two, in float32 (|q| < 2^24)."""
    out = -(q.astype(np.float32) * np.float32(2.0**-step_exp))
    out[ninf] = -np.inf
    return out


def lp_quant_streams(ch: Chunk, step_exp: int, split: bool = True) -> Streams:
    """(a)/(b) first value + non-negative deltas of the quantized -logprob, tier-coded.
    Every -inf entry (probability 0; they can only trail a non-increasing row) is the
    reserved code, so streams keep one symbol per entry."""
    q, ninf = quantize(ch.lp, step_exp)
    d = np.diff(q, axis=1, prepend=0)
    d = np.where(ninf, 0, d)
    special = np.where(ninf, 0, -1)
    out: Streams = {}
    out["q0main"], out["q0ext"] = LP_TIER.encode(d[:, :1], special[:, :1])
    groups = _lp_groups(ch.lp.shape[1]) if split else [(1, ch.lp.shape[1])]
    for a, b in groups:
        out[f"dmain{a}"], out[f"dext{a}"] = LP_TIER.encode(d[:, a:b], special[:, a:b])
    return out


def lp_quant_decode(streams: Streams, n: int, k: int, step_exp: int, split: bool = True):
    groups = [(0, 1, "q0")] + [(a, b, f"d{a}") for a, b in (_lp_groups(k) if split else [(1, k)])]
    d = np.zeros((n, k), dtype=np.int64)
    ninf = np.zeros((n, k), dtype=bool)
    for a, b, name in groups:
        pre = "q0" if name == "q0" else "d"
        suf = "" if name == "q0" else str(a)
        vals, sp = LP_TIER.decode(streams[f"{pre}main{suf}"], streams[f"{pre}ext{suf}"])
        d[:, a:b] = vals.reshape(n, b - a)
        ninf[:, a:b] = (sp == 0).reshape(n, b - a)
    q = np.cumsum(d, axis=1)  # -inf entries carry delta 0
    return dequantize(q, ninf, step_exp)


CONSERVE_FINE = 12


def lp_conserving_encode(lp: np.ndarray, step_exp: int):
    """(a') like (a), but the rank-0 value is on a 2^-12 grid and chosen by the encoder,
    within the same error bound 2^-(step_exp+1), to give the decoded row the true row's
    total mass (so the decoded rest bucket 1 - sum p stays >= 0 and close to the truth).
    Returns (Q0 on the fine grid, q on the coarse grid for all ranks, -inf mask)."""
    x = -lp.astype(np.float64)
    ninf = np.isinf(x)
    x = np.where(ninf, 0.0, x)
    sh = CONSERVE_FINE - step_exp
    q = np.rint(x * (1 << step_exp)).astype(np.int64)
    # -inf entries repeat the last finite value (delta 0) and are marked by the special
    q = np.maximum.accumulate(np.where(ninf, 0, q), axis=1)
    p = np.where(ninf, 0.0, np.exp(-x))
    ph = np.where(ninf[:, 1:], 0.0, np.exp(-q[:, 1:] / float(1 << step_exp)))
    target = p[:, 0] + (p[:, 1:] - ph).sum(axis=1)
    half = 2.0 ** -(step_exp + 1)
    fine = 2.0**-CONSERVE_FINE
    x0t = -np.log(np.clip(target, 1e-300, 1.0))
    x0t = np.clip(x0t, x[:, 0] - half + fine, x[:, 0] + half - fine)
    big_q0 = np.ceil(x0t * (1 << CONSERVE_FINE)).astype(np.int64)
    if lp.shape[1] > 1:
        big_q0 = np.where(ninf[:, 1], big_q0, np.minimum(big_q0, q[:, 1] << sh))
    big_q0 = np.where(ninf[:, 0], 0, np.maximum(big_q0, 0))
    return big_q0, q, ninf


PAIR_BASE = 15  # deep-rank deltas a, b < 15 share one byte a * 15 + b; 225 = escape
PAIR_ESCAPE = PAIR_BASE * PAIR_BASE


def pair_encode(d: np.ndarray, special: np.ndarray, prefix: str) -> Streams:
    """Pairs of consecutive deltas ([n, m], m even) in one byte when both are finite and
    < PAIR_BASE; otherwise the escape byte and both values (with -inf specials) tier-coded
    in separate streams.  One Huffman symbol per two entries: half the symbols for zstd to
    decode, and the pair alphabet captures the joint distribution."""
    a, b = d[:, 0::2].reshape(-1), d[:, 1::2].reshape(-1)
    sa, sb = special[:, 0::2].reshape(-1), special[:, 1::2].reshape(-1)
    ok = (a < PAIR_BASE) & (b < PAIR_BASE) & (sa < 0) & (sb < 0)
    main = np.where(ok, a * PAIR_BASE + b, PAIR_ESCAPE).astype(np.uint8)
    vals = np.stack([a[~ok], b[~ok]], axis=1).reshape(-1)
    sps = np.stack([sa[~ok], sb[~ok]], axis=1).reshape(-1)
    m, e = LP_TIER.encode(vals, sps)
    return {f"{prefix}pmain": main, f"{prefix}pesc_main": m, f"{prefix}pesc_ext": e}


def pair_decode(streams: Streams, prefix: str, n: int, m: int):
    """Inverse of :func:`pair_encode`: (values [n, m], special [n, m])."""
    main = streams[f"{prefix}pmain"].astype(np.int64)
    vals, sps = LP_TIER.decode(streams[f"{prefix}pesc_main"], streams[f"{prefix}pesc_ext"])
    ok = main < PAIR_ESCAPE
    a = np.where(ok, main // PAIR_BASE, 0)
    b = np.where(ok, main % PAIR_BASE, 0)
    sa = np.full(main.size, -1)
    sb = np.full(main.size, -1)
    a[~ok], b[~ok] = vals[0::2], vals[1::2]
    sa[~ok], sb[~ok] = sps[0::2], sps[1::2]
    v = np.stack([a, b], axis=1).reshape(n, m)
    sp = np.stack([sa, sb], axis=1).reshape(n, m)
    return v, sp


def lp_conserving_streams(ch: Chunk, step_exp: int, pairs: bool = False) -> Streams:
    """(a') streams; with ``pairs`` the deltas of ranks 16.. are coded in pairs (a'')."""
    big_q0, q, ninf = lp_conserving_encode(ch.lp, step_exp)
    base = (big_q0 >> (CONSERVE_FINE - step_exp))[:, None]
    d = np.diff(np.concatenate([base, q[:, 1:]], axis=1), axis=1)
    d = np.where(ninf[:, 1:], 0, d)
    sp = np.where(ninf, 0, -1)
    out: Streams = {}
    out["Q0main"], out["Q0ext"] = LP_TIER.encode(big_q0, sp[:, 0])
    for a, b in _lp_groups(ch.lp.shape[1]):
        if pairs and a == 16:
            dd, ss = d[:, a - 1 : b - 1], sp[:, a:b]
            if dd.shape[1] % 2:  # pad to an even count; the decoder drops it
                dd = np.concatenate([dd, np.zeros_like(dd[:, :1])], axis=1)
                ss = np.concatenate([ss, np.full_like(ss[:, :1], -1)], axis=1)
            out.update(pair_encode(dd, ss, "d16"))
            continue
        out[f"dmain{a}"], out[f"dext{a}"] = LP_TIER.encode(d[:, a - 1 : b - 1], sp[:, a:b])
    return out


def lp_conserving_decode(
    streams: Streams, n: int, k: int, step_exp: int, pairs: bool = False
) -> np.ndarray:
    big_q0, sp0 = LP_TIER.decode(streams["Q0main"], streams["Q0ext"])
    d = np.zeros((n, k - 1), dtype=np.int64)
    ninf = np.zeros((n, k), dtype=bool)
    ninf[:, 0] = sp0 == 0
    for a, b in _lp_groups(k):
        if pairs and a == 16:
            m = b - a + (b - a) % 2
            v, sp = pair_decode(streams, "d16", n, m)
            v, sp = v[:, : b - a], sp[:, : b - a]
        else:
            v, sp = LP_TIER.decode(streams[f"dmain{a}"], streams[f"dext{a}"])
        d[:, a - 1 : b - 1] = v.reshape(n, b - a)
        ninf[:, a:b] = (sp == 0).reshape(n, b - a)
    q = (big_q0 >> (CONSERVE_FINE - step_exp))[:, None] + np.cumsum(d, axis=1)
    out = np.empty((n, k), dtype=np.float32)
    out[:, 0] = -(big_q0.astype(np.float32) * np.float32(2.0**-CONSERVE_FINE))
    out[:, 1:] = -(q.astype(np.float32) * np.float32(2.0**-step_exp))
    out[ninf] = -np.inf
    return out


def lp_lossless_streams(ch: Chunk, variant: str) -> Streams:
    """(c) float32 byte planes: raw bits, XOR with the previous rank, or the delta of the
    magnitude bits of -logprob (non-negative for non-increasing rows; -inf included)."""
    bits = ch.lp.view(np.uint32).astype(np.int64)
    if variant == "raw":
        v = bits
    elif variant == "xor":
        v = bits.copy()
        v[:, 1:] = bits[:, 1:] ^ bits[:, :-1]
    elif variant == "delta":
        mag = bits & 0x7FFFFFFF  # |lp|; sign is negative (or +0 for lp == 0)
        v = np.diff(mag, axis=1, prepend=0)
        if (v[:, 1:] < 0).any():
            raise ValueError("row not non-increasing")
        # a row whose values are all <= 0 needs no sign; +0.0 vs -0.0 kept in a bitmap
    else:
        raise ValueError(variant)
    return u_planes(v.astype(np.uint32), 4, variant)


def lp_lossless_delta_tier_streams(ch: Chunk) -> Streams:
    """(c') magnitude-bit deltas, first value as 4 planes, deltas tier-coded by group."""
    bits = ch.lp.view(np.uint32).astype(np.int64) & 0x7FFFFFFF
    d = np.diff(bits, axis=1)
    out = u_planes(bits[:, 0], 4, "f0")
    t = Tier(lit=128, e1=64, e2=48, e3=16)
    out.update(tier_streams(d, t, "d", [(a - 1, b - 1) for a, b in _lp_groups(ch.lp.shape[1])]))
    return out


def _lp_groups(k):
    return [(max(a, 1), b) for a, b in rank_groups(k) if b > 1]


# --------------------------------------------------------------------------------------
# KL-bounded codec


FINEST = 24  # decoded -logprob = int64 units of 2^-FINEST, converted to float32 (rounded)
KL_EXTRAS = (0, 4, 8, 12)
KL_LADDER = (
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
)  # base step exponents, coarse to fine  # extra precision bits for the rank-0 entry


def kl_quantize(
    lp: np.ndarray, base_exp: int, extra0: int, band_units: int, max_band: int, balanced: bool
):
    """Steps grow with the previously decoded value: ``step = 2^-base_exp * 2^band``,
    ``band = min(xhat_prev // band_units, max_band)`` (integers, units of 2^-FINEST).  The
    rank-0 value uses step ``2^-(base_exp + extra0)``: when the rest mass is tiny, the KL
    is first-order in the top entry's error, so it alone may need a fine step.

    Returns the integer codes (q0, then deltas in current steps) and the decoded
    -logprob in units of 2^-FINEST.  ``balanced`` rounds each entry down or up (|err| <
    step) so as to cancel the running probability-mass error; otherwise to nearest."""
    n, k = lp.shape
    x = -lp.astype(np.float64)
    x = np.where(np.isinf(x), 1e9, x)  # -inf entries: not exercised by these corpora
    s0 = 1 << (FINEST - base_exp)
    sf = 1 << (FINEST - base_exp - extra0)
    xu = x * (1 << FINEST)
    codes = np.zeros((n, k), dtype=np.int64)
    dec = np.zeros((n, k), dtype=np.int64)
    q0 = np.rint(xu[:, 0] / sf).astype(np.int64)
    codes[:, 0] = q0
    dec[:, 0] = q0 * sf
    p = np.exp(-x)
    mass_err = np.exp(-dec[:, 0] / (1 << FINEST)) - p[:, 0]
    for r in range(1, k):
        band = np.minimum(dec[:, r - 1] // band_units, max_band)
        step = s0 << band
        t = (xu[:, r] - dec[:, r - 1]) / step
        if balanced:
            # too much decoded mass so far -> round the -logprob up (less mass)
            d = np.where(mass_err > 0, np.ceil(t), np.floor(t))
        else:
            d = np.rint(t)
        d = np.maximum(d, 0).astype(np.int64)
        codes[:, r] = d
        dec[:, r] = dec[:, r - 1] + d * step
        mass_err += np.exp(-dec[:, r] / (1 << FINEST)) - p[:, r]
    return codes, dec


def kl_decode_values(dec_units: np.ndarray) -> np.ndarray:
    """float32 -logprob: int64 -> float32 (correctly rounded) times 2^-FINEST (exact)."""
    return -(dec_units.astype(np.float32) * np.float32(2.0**-FINEST))


def kl_rows(lp: np.ndarray, dec_lp: np.ndarray) -> np.ndarray:
    """KL(P || P_decoded) per row over the K entries and the rest bucket, float64.
    Returns +inf where the decoded rest mass is negative (invalid) and the true one is not
    zero."""
    lp64 = lp.astype(np.float64)
    dq = dec_lp.astype(np.float64)
    p = np.exp(lp64)
    pd = np.exp(dq)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (lp64 - dq), 0.0).sum(axis=1)
    rest = np.maximum(1.0 - p.sum(axis=1), 0.0)
    rest_d = 1.0 - pd.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rterm = np.where(rest > 0, rest * (np.log(rest) - np.log(np.maximum(rest_d, 0))), 0.0)
    return terms + rterm


def kl_codec(
    lp: np.ndarray,
    bound: float,
    ladder: tuple[int, ...],
    band_units: int,
    max_band: int,
    balanced: bool,
):
    """Per row: the coarsest ladder base step (and the smallest rank-0 extra precision)
    whose exactly decoded row meets KL <= bound; rows failing every step fall back to raw
    float32.  Returns (level per row: base index * len(KL_EXTRAS) + extra index, or
    ``len(ladder) * len(KL_EXTRAS)`` for raw; codes; decoded lp)."""
    n, k = lp.shape
    n_ex = len(KL_EXTRAS)
    level = np.full(n, len(ladder) * n_ex, dtype=np.int64)
    codes = np.zeros((n, k), dtype=np.int64)
    dec_lp = lp.copy()
    todo = np.arange(n)
    for li, e in enumerate(ladder):
        for xi, extra in enumerate(KL_EXTRAS):
            if todo.size == 0:
                break
            c, d = kl_quantize(lp[todo], e, extra, band_units, max_band, balanced)
            dl = kl_decode_values(d)
            ok = kl_rows(lp[todo], dl) <= bound
            sel = todo[ok]
            level[sel] = li * n_ex + xi
            codes[sel] = c[ok]
            dec_lp[sel] = dl[ok]
            todo = todo[~ok]
    return level, codes, dec_lp


def kl_decode(
    level: np.ndarray,
    codes: np.ndarray,
    raw_lp: np.ndarray,
    ladder: tuple[int, ...],
    band_units: int,
    max_band: int,
) -> np.ndarray:
    """Decoder of :func:`kl_codec`: needs only the per-row level, the codes and the raw
    float32 rows (used where level says so); steps follow from decoded values."""
    n_ex = len(KL_EXTRAS)
    out = raw_lp.copy()
    q = level < len(ladder) * n_ex
    base = np.asarray(ladder, dtype=np.int64)[level[q] // n_ex]
    extra = np.asarray(KL_EXTRAS, dtype=np.int64)[level[q] % n_ex]
    s0 = np.left_shift(1, FINEST - base)
    sf = np.left_shift(1, FINEST - base - extra)
    c = codes[q]
    dec = np.zeros_like(c)
    dec[:, 0] = c[:, 0] * sf
    for r in range(1, c.shape[1]):
        band = np.minimum(dec[:, r - 1] // band_units, max_band)
        dec[:, r] = dec[:, r - 1] + c[:, r] * (s0 << band)
    out[q] = kl_decode_values(dec)
    return out


def kl_streams(
    level: np.ndarray, codes: np.ndarray, lp: np.ndarray, n_ladder: int, pairs: bool = False
) -> Streams:
    """Streams of the KL codec: level byte per row, rank-0 code as 3 byte planes, deltas
    tier-coded by rank group (with ``pairs``, ranks 16.. as delta pairs), raw rows."""
    out: Streams = {"kl_level": level.astype(np.uint8)}
    q = level < n_ladder * len(KL_EXTRAS)
    out.update(u_planes(codes[q][:, 0], 3, "kq0"))
    body = codes[q][:, 1:]
    for a, b in _lp_groups(lp.shape[1]):
        dd = body[:, a - 1 : b - 1]
        if pairs and a == 16:
            if dd.shape[1] % 2:
                dd = np.concatenate([dd, np.zeros_like(dd[:, :1])], axis=1)
            out.update(pair_encode(dd, np.full(dd.shape, -1), "k16"))
            continue
        m, e = LP_TIER.encode(dd)
        out[f"kmain{a}"], out[f"kext{a}"] = m, e
    if (~q).any():
        out.update(u_planes(lp[~q].view(np.uint32), 4, "kraw"))
    return out


# --------------------------------------------------------------------------------------
# baselines


def baseline_sizes(c: TeacherCorpus) -> dict[str, int]:
    ids = c.topk_ids.astype(np.int32)
    lp16 = c.topk_logprobs.astype(np.float16)
    inp = c.input_ids.astype(np.int32)
    out = {}
    tot = 0
    for a in (ids, lp16, inp):
        b = io.BytesIO()
        np.save(b, a)
        tot += b.tell()
    out["npy int32 ids + float16 logprobs + int32 inputs"] = tot
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        k = ids.shape[1]
        n = ids.shape[0]
        offs = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        tab = pa.table(
            {
                "input_id": pa.array(inp),
                "topk_ids": pa.ListArray.from_arrays(offs, pa.array(ids.reshape(-1))),
                "topk_logprobs": pa.ListArray.from_arrays(offs, pa.array(lp16.reshape(-1))),
            }
        )
        for lvl in (3, 9):
            b = io.BytesIO()
            pq.write_table(tab, b, compression="zstd", compression_level=lvl)
            out[f"parquet list columns, zstd-{lvl} (float16)"] = b.tell()
    except Exception as exc:  # pragma: no cover - reported, not hidden
        out[f"parquet failed: {exc!r}"] = -1
    try:
        from safetensors.numpy import save

        blob = save({"topk_ids": ids, "topk_logprobs": lp16, "input_ids": inp})
        out["safetensors int32 + float16"] = len(blob)
        out["safetensors int32 + float16, whole file zstd-3"] = zsize(blob, 3)
    except Exception as exc:  # pragma: no cover
        out[f"safetensors failed: {exc!r}"] = -1
    return out


# --------------------------------------------------------------------------------------
# driver


def measure_ids(chunks, name, fn: Callable, ctx, levels) -> dict:
    n = sum(ch.ids.shape[0] for ch in chunks)
    res = {}
    for lvl in levels:
        ctx["level"] = lvl
        tot = 0
        for ch in chunks:
            s, side = fn(ch, ctx)
            tot += streams_size(s, lvl) + side
        res[lvl] = tot / n
    return res


def fmt(x: float) -> str:
    return f"{x:.2f}"


class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.data: dict = {}

    def h(self, s: str):
        self.p(f"\n### {s}\n")

    def p(self, s: str = ""):
        print(s, flush=True)
        self.lines.append(s)

    def table(self, header: list[str], rows: list[list]):
        self.p("| " + " | ".join(header) + " |")
        self.p("|" + "---|" * len(header))
        for r in rows:
            self.p("| " + " | ".join(str(x) for x in r) + " |")


def corpus_stats(c: TeacherCorpus, rep: Report, name: str):
    p = np.exp(c.topk_logprobs.astype(np.float64))
    lp = c.topk_logprobs
    ch = chunks_of(c, 4096, 8)
    hits = np.concatenate([(prev_row_position(x)[~x.rec_start] >= 0).mean(axis=1) for x in ch])
    ids = c.topk_ids.reshape(-1)
    # Spearman correlation between id and its frequency rank among the ids seen in rows
    cnt = np.bincount(ids, minlength=c.vocab_size)
    seen = np.flatnonzero(cnt)
    fr = np.empty(seen.size)
    fr[np.argsort(-cnt[seen], kind="stable")] = np.arange(seen.size)
    rho = np.corrcoef(np.argsort(np.argsort(seen)), fr)[0, 1]
    nx = c.next_ids
    row = {
        "positions": c.n_positions,
        "mean record length": round(float(np.diff(c.offsets).mean()), 1),
        "p1 median": round(float(np.median(p[:, 0])), 3),
        "p1 q10/q90": f"{np.quantile(p[:, 0], 0.1):.2f}/{np.quantile(p[:, 0], 0.9):.2f}",
        "tail mass mean": round(float((1 - p.sum(1)).mean()), 4),
        "tail mass median": round(float(np.median(1 - p.sum(1))), 4),
        "logprob rank 2 / 64 median": f"{np.median(lp[:, 1]):.2f}/{np.median(lp[:, -1]):.2f}",
        "top-1 accuracy": round(float((c.topk_ids[:, 0] == nx).mean()), 3),
        "next token in top-K": round(float((c.topk_ids == nx[:, None]).any(1).mean()), 3),
        "ids also in previous row": round(float(hits.mean()), 3),
        "distinct ids per 4096-row chunk": int(np.mean([np.unique(x.ids).size for x in ch])),
        "Spearman(id, frequency rank)": round(float(rho), 3),
    }
    rep.data.setdefault("stats", {})[name] = row
    return row


def lp_measure(chunks: list[Chunk], fn: Callable, levels) -> dict:
    n = sum(ch.ids.shape[0] for ch in chunks)
    out = {}
    for lvl in levels:
        out[lvl] = sum(streams_size(fn(ch), lvl) for ch in chunks) / n
    return out


def quant_error_stats(chunks: list[Chunk], step_exp: int) -> dict:
    errs, kls, over = [], [], []
    for ch in chunks:
        q, ninf = quantize(ch.lp, step_exp)
        dec = dequantize(q, ninf, step_exp)
        fin = ~ninf
        errs.append(np.abs(dec[fin].astype(np.float64) - ch.lp[fin].astype(np.float64)).max())
        kl = kl_rows(ch.lp, dec)
        kls.append(kl)
        over.append(np.exp(dec.astype(np.float64)).sum(axis=1) > 1.0)
    kl = np.concatenate(kls)
    fin_kl = kl[np.isfinite(kl)]
    return {
        "max_abs_err": float(max(errs)),
        "kl_mean": float(fin_kl.mean()),
        "kl_max_finite": float(fin_kl.max()),
        "rows_decoded_sum_gt_1": float(np.concatenate(over).mean()),
    }


def conserving_stats(chunks: list[Chunk], step_exp: int) -> dict:
    errs, kls, over = [], [], []
    for ch in chunks:
        n, k = ch.lp.shape
        s = lp_conserving_streams(ch, step_exp)
        dec = lp_conserving_decode(s, n, k, step_exp)
        errs.append(np.abs(dec.astype(np.float64) - ch.lp.astype(np.float64)).max())
        assert (np.diff(dec, axis=1) <= 0).all()
        kls.append(kl_rows(ch.lp, dec))
        tot = np.exp(dec.astype(np.float64)).sum(axis=1)
        over.append(tot > np.maximum(np.exp(ch.lp.astype(np.float64)).sum(axis=1), 1.0))
    kl = np.concatenate(kls)
    fin = kl[np.isfinite(kl)]
    return {
        "max_abs_err": float(max(errs)),
        "kl_mean": float(fin.mean()),
        "kl_max_finite": float(fin.max()),
        "rows_decoded_sum_gt_1": float(np.concatenate(over).mean()),
    }


def id_entropy_bound(chunks: list[Chunk], rank_of_id: np.ndarray) -> tuple[float, float]:
    """Ideal static order-0 cost of ids per position (bytes), per chunk, no table cost:
    (i) one distribution per chunk, (ii) one per rank group."""
    tot1 = tot2 = 0.0
    n = 0
    for ch in chunks:
        for groups, acc in (([(0, ch.ids.shape[1])], 1), (rank_groups(ch.ids.shape[1]), 2)):
            bits = 0.0
            for a, b in groups:
                _, cnt = np.unique(ch.ids[:, a:b], return_counts=True)
                p = cnt / cnt.sum()
                bits += float(-(cnt * np.log2(p)).sum())
            if acc == 1:
                tot1 += bits / 8
            else:
                tot2 += bits / 8
        n += ch.ids.shape[0]
    return tot1 / n, tot2 / n


RECOMMENDED_STEP = 6
RECOMMENDED_LEVEL = 1


DICT_N = 1024  # per-chunk dictionary size of the recommended id layout


def chunk_dictionary(ids: np.ndarray) -> np.ndarray:
    """The chunk's ``DICT_N`` most frequent ids, most frequent first (ties by id)."""
    uniq, cnt = np.unique(ids, return_counts=True)
    return uniq[np.argsort(-cnt, kind="stable")][:DICT_N]


def id_codes(ids: np.ndarray, top: np.ndarray, rank_of_id: np.ndarray) -> np.ndarray:
    """Recommended id code: index in the chunk dictionary, else ``DICT_N + store rank``."""
    local = np.full(rank_of_id.size, -1, dtype=np.int64)
    local[top] = np.arange(top.size)
    lc = local[ids]
    return np.where(lc >= 0, lc, DICT_N + rank_of_id[ids])


def decode_table(top: np.ndarray, id_of_rank: np.ndarray) -> np.ndarray:
    """code -> id: ``DICT_N`` dictionary slots (unused ones -1), then the store ranking."""
    head = np.full(DICT_N, -1, dtype=np.int64)
    head[: top.size] = top
    return np.concatenate([head, id_of_rank])


def recommended_streams(ch: Chunk, ctx, split_ids: bool, step_exp: int = RECOMMENDED_STEP):
    """The recommended default payload of one chunk: ids as chunk-dictionary/store-rank
    codes (tiered), mass-conserving quantized log-probabilities, inputs via the previous
    row (escapes use the id code)."""
    top = chunk_dictionary(ch.ids)
    codes = id_codes(ch.ids, top, ctx["rank_of_id"])
    s: Streams = {}
    s.update(u_planes(top, id_bytes(ctx["vocab"]), "dict_"))
    g = rank_groups(ch.ids.shape[1]) if split_ids else None
    s.update({f"id_{a}": b for a, b in tier_streams(codes, ID_TIER, "", g).items()})
    s.update({f"lp_{a}": b for a, b in lp_conserving_streams(ch, step_exp, True).items()})
    inp = inputs_via_prev_row(
        ch, {"rank_of_id": np.zeros(1)}, codes_of=lambda x: id_codes(x, top, ctx["rank_of_id"])
    )
    s.update(inp)
    return s


def decode_recommended(streams: Streams, n: int, k: int, id_of_rank, split_ids: bool):
    nb = id_bytes(id_of_rank.size)
    top = sum(streams[f"dict_p{b}"].astype(np.int64) << (8 * b) for b in range(nb))
    table = decode_table(top, id_of_rank)
    if split_ids:
        parts = []
        for a, b in rank_groups(k):
            v, _ = ID_TIER.decode(streams[f"id_main{a}"], streams[f"id_ext{a}"])
            parts.append(v.reshape(n, b - a))
        codes = np.concatenate(parts, axis=1)
    else:
        codes, _ = ID_TIER.decode(streams["id_main"], streams["id_ext"])
        codes = codes.reshape(n, k)
    ids = table[codes]
    lp_streams = {a[3:]: b for a, b in streams.items() if a.startswith("lp_")}
    lp = lp_conserving_decode(lp_streams, n, k, RECOMMENDED_STEP, True)
    inputs = decode_inputs_via_prev_row(streams, ids, table)
    return ids, lp, inputs


def verify_recommended(chunks: list[Chunk], ctx, id_of_rank, split_ids: bool) -> str:
    """Round trip of the recommended layout, including rows with -inf tails."""
    bound = 2.0 ** -(RECOMMENDED_STEP + 1)
    test_chunks = list(chunks[:3])
    ch = chunks[0]
    lp = ch.lp.copy()
    rng = np.random.default_rng(0)
    rows = rng.choice(lp.shape[0], size=64, replace=False)
    for j, r in enumerate(rows):
        lp[r, lp.shape[1] - 1 - (j % lp.shape[1]) :] = -np.inf  # masked vocabulary
    test_chunks.append(Chunk(ch.ids, lp, ch.inputs, ch.rec_start))
    worst_excess, n_excess, n_rows = 0.0, 0, 0
    for ch in test_chunks:
        n, k = ch.ids.shape
        s = recommended_streams(ch, ctx, split_ids)
        back = {
            a: np.frombuffer(
                zstd.ZstdDecompressor().decompress(zc(3).compress(b.tobytes())), dtype=np.uint8
            )
            for a, b in s.items()
        }
        ids, dlp, inputs = decode_recommended(back, n, k, id_of_rank, split_ids)
        assert np.array_equal(ids, ch.ids), "ids differ"
        assert np.array_equal(inputs, ch.inputs), "inputs differ"
        ninf = np.isinf(ch.lp)
        assert np.array_equal(np.isinf(dlp), ninf), "-inf pattern differs"
        err = np.abs(dlp[~ninf].astype(np.float64) - ch.lp[~ninf].astype(np.float64)).max()
        assert err <= bound, f"max error {err} > {bound}"
        p_true = np.exp(ch.lp.astype(np.float64)).sum(axis=1)
        p_dec = np.exp(dlp.astype(np.float64)).sum(axis=1)
        excess = p_dec - np.maximum(p_true, 1.0)
        worst_excess = max(worst_excess, float(excess.max()))
        n_excess += int((excess > 0).sum())
        n_rows += excess.size
        assert (np.diff(np.where(ninf, -1e30, dlp), axis=1) <= 0).all(), "not non-increasing"
    return (
        f"Round trip OK on {len(test_chunks)} chunks (one with -inf tails): ids and inputs "
        f"exact, max |error| <= {bound}, rows non-increasing; decoded sum p above "
        f"max(true sum, 1) in {n_excess} of {n_rows} rows (worst excess {worst_excess:.2e})."
    )


def kernel_timing(chunks: list[Chunk], ctx, id_of_rank: np.ndarray) -> dict | None:
    """Per-position CPU cost of the non-zstd decode work of the recommended layout, with the
    C prototype ``decode_kernel.c`` (skipped without a C compiler), after checking that it
    reproduces the original ids/inputs and the numpy-decoded log-probs bit for bit.
    Parts: ids (tiered codes + lookup), ids from u16 code planes + lookup (the fixed-width
    alternative), log-probs, inputs."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or ctx["vocab"] > 1 << 16:
        return None
    src = Path(__file__).resolve().parent / "decode_kernel.c"
    tmpdir = Path(tempfile.mkdtemp(prefix="lc-kernel-"))
    lib = tmpdir / "decode_kernel.so"
    subprocess.run(
        [cc, "-O3", "-march=native", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True
    )
    dk = ctypes.CDLL(str(lib))
    parts = np.zeros(5)
    npos = 0

    def ptr(a):
        return a.ctypes.data_as(ctypes.c_void_p)

    for ch in chunks:
        n, k = ch.ids.shape
        st = recommended_streams(ch, ctx, False)
        pad = {a: np.concatenate([b, np.zeros(4, np.uint8)]) for a, b in st.items()}
        top = chunk_dictionary(ch.ids)
        table = np.ascontiguousarray(decode_table(top, id_of_rank).astype(np.int32))
        code = id_codes(ch.ids, top, ctx["rank_of_id"]).reshape(-1)
        lo = (code & 255).astype(np.uint8)
        hi = (code >> 8).astype(np.uint8)
        ids = np.empty((n, k), np.int32)
        lp = np.empty((n, k), np.float32)
        inputs = np.empty(n, np.int32)
        tmp = np.empty(n * k + 8 * n, np.uint32)
        best = np.zeros(4)
        dk.decode_parts(
            ctypes.c_int(15), ctypes.c_int(n), ctypes.c_int(k),
            ptr(pad["id_main"]), ptr(pad["id_ext"]), ptr(table), ptr(lo), ptr(hi),
            ptr(pad["lp_Q0main"]), ptr(pad["lp_Q0ext"]),
            ptr(pad["lp_dmain1"]), ptr(pad["lp_dext1"]),
            ptr(pad["lp_dmain4"]), ptr(pad["lp_dext4"]),
            ptr(pad["lp_d16pmain"]), ptr(pad["lp_d16pesc_main"]), ptr(pad["lp_d16pesc_ext"]),
            ptr(pad["in_pos"]), ptr(pad["in_esc_main"]), ptr(pad["in_esc_ext"]),
            ptr(ids), ptr(lp), ptr(inputs), ptr(tmp), ptr(best),
        )  # fmt: skip
        lp_streams = {a[3:]: b for a, b in st.items() if a.startswith("lp_")}
        ref = lp_conserving_decode(lp_streams, n, k, RECOMMENDED_STEP, True)
        assert np.array_equal(ids, ch.ids), "kernel ids differ"
        assert np.array_equal(inputs, ch.inputs), "kernel inputs differ"
        assert np.array_equal(lp.view(np.uint32), ref.view(np.uint32)), "kernel lp differ"
        parts[:4] += best
        if hasattr(dk, "decode_lp_simd") and k == 64:
            dk.decode_lp_simd.restype = ctypes.c_double
            lp[:] = 0
            t = dk.decode_lp_simd(
                ctypes.c_int(15), ctypes.c_int(n), ctypes.c_int(k),
                ptr(pad["lp_Q0main"]), ptr(pad["lp_Q0ext"]),
                ptr(pad["lp_dmain1"]), ptr(pad["lp_dext1"]),
                ptr(pad["lp_dmain4"]), ptr(pad["lp_dext4"]),
                ptr(pad["lp_d16pmain"]), ptr(pad["lp_d16pesc_main"]),
                ptr(pad["lp_d16pesc_ext"]),
                ptr(lp), ptr(tmp),
            )  # fmt: skip
            assert np.array_equal(lp.view(np.uint32), ref.view(np.uint32)), "SIMD lp differ"
            parts[4] += t
        npos += n
    shutil.rmtree(tmpdir, ignore_errors=True)
    ns = parts / npos
    return {
        "ids_tiered_ns": ns[0],
        "ids_planes_ns": ns[1],
        "logprobs_ns": ns[2],
        "inputs_ns": ns[3],
        "total_tiered_ns": ns[0] + ns[2] + ns[3],
        "logprobs_avx2_ns": ns[4] if ns[4] > 0 else float("nan"),
    }


def _cpu_time() -> float:
    # CPU time of this thread: the machine is shared, and wall time under load would
    # measure the other processes too
    return time.thread_time()


def time_decompress(frames: list[bytes], raw_bytes: int, min_time: float = 0.6) -> float:
    """CPU seconds to decompress all frames once (best of repeated passes), one thread."""
    d = zstd.ZstdDecompressor()
    best = float("inf")
    t_end = _cpu_time() + min_time
    while True:
        t = _cpu_time()
        for f in frames:
            d.decompress(f)
        best = min(best, _cpu_time() - t)
        if _cpu_time() > t_end:
            break
    return best


def time_compress(bufs: list[bytes], level: int, min_time: float = 0.6) -> float:
    """CPU seconds to compress all buffers once (best of repeated passes), one thread."""
    c = zc(level)
    best = float("inf")
    t_end = _cpu_time() + min_time
    while True:
        t = _cpu_time()
        for b in bufs:
            c.compress(b)
        best = min(best, _cpu_time() - t)
        if _cpu_time() > t_end:
            break
    return best


def overhead_estimate(n_streams: int, chunk: int, mean_record_len: float) -> dict:
    """Container bytes per position: chunk header (per stream: u32 length + u32 raw length;
    chunk: u32 rows, u32 records, u64 checksum), per record inside the chunk (u64 sample
    id + u32 length), footer index (per record: u64 sample id, u32 chunk, u32 row; per
    chunk: u64 offset, u32 length, u32 rows)."""
    per_chunk = n_streams * 8 + 16 + 16
    per_record = 12 + 16
    return {
        "per_position": per_chunk / chunk + per_record / mean_record_len,
        "per_chunk": per_chunk,
        "per_record": per_record,
    }


def run(args):
    rep = Report()
    levels = [3] if args.quick else [1, 3, 9]
    n = args.positions
    t0 = time.time()
    sources: dict[str, TeacherCorpus] = {}
    sources["synthetic V=32768"] = synthetic.generate(n, vocab_size=32768, seed=1)
    if not args.no_ngram:
        import ngram_teacher

        sources["ngram V=32768"] = ngram_teacher.build_corpus(n_positions=n)
    if not args.quick:
        sources["synthetic V=128256"] = synthetic.generate(n, vocab_size=128256, seed=2)
    rep.p(f"corpora ready in {time.time() - t0:.1f}s; load average {os.getloadavg()}")

    rep.h("Corpus statistics")
    st = {name: corpus_stats(c, rep, name) for name, c in sources.items()}
    keys = list(next(iter(st.values())).keys())
    rep.table(["statistic", *st.keys()], [[k] + [st[s][k] for s in st] for k in keys])

    results: dict = {}
    for name, c in sources.items():
        results[name] = run_source(name, c, rep, args, levels)
        rep.p(f"\n({name} done at {time.time() - t0:.1f}s)")
    rep.data["results"] = results
    OUT.mkdir(exist_ok=True)
    (OUT / "codec_results.md").write_text("\n".join(rep.lines) + "\n")
    (OUT / "codec_results.json").write_text(json.dumps(rep.data, indent=1, default=str))
    rep.p(f"\ntotal time {time.time() - t0:.1f}s; load average {os.getloadavg()}")


def run_source(name: str, c: TeacherCorpus, rep: Report, args, levels) -> dict:
    res: dict = {}
    k = c.k
    chunk = 4096
    chunks = chunks_of(c, chunk)
    npos = sum(x.ids.shape[0] for x in chunks)
    rank1, seen1 = learn_ranking(chunks[:1], c.vocab_size)
    rank4, seen4 = learn_ranking(chunks[:4], c.vocab_size)
    rank_all, seen_all = learn_ranking(chunks, c.vocab_size)
    id_of_rank4 = np.argsort(rank4)
    ctx = {"vocab": c.vocab_size, "rank_of_id": rank4}

    # ---------------- ids
    rep.h(f"{name}: token ids (K={k}, {chunk}-position chunks), bytes per position")
    cands: list[tuple[str, Callable]] = [
        ("A raw u32", ids_raw_u32),
        ("B byte planes (u16/u24), row-major", lambda ch, cx: ids_planes(ch, cx)),
        ("B byte planes, rank-major", lambda ch, cx: ids_planes(ch, cx, True)),
        ("E id value tiered", lambda ch, cx: ids_value_tier(ch, cx)),
        ("E+F id value tiered, rank-group streams", lambda ch, cx: ids_value_tier(ch, cx, True)),
        ("C per-chunk dictionary (table included)", lambda ch, cx: ids_chunk_dict(ch, cx)),
        (
            "C+F per-chunk dictionary, rank groups",
            lambda ch, cx: ids_chunk_dict(ch, cx, None, True),
        ),
        ("D partial dictionary top-192 + F", lambda ch, cx: ids_chunk_dict(ch, cx, 192, True)),
        ("D partial dictionary top-1024 + F", lambda ch, cx: ids_chunk_dict(ch, cx, 1024, True)),
        (
            "D top-1024, escape to store rank",
            lambda ch, cx: ids_chunk_dict(ch, cx, 1024, False, True),
        ),
        ("S store ranking (first 4 chunks)", lambda ch, cx: ids_store_rank(ch, cx, False)),
        ("S+F store ranking, rank groups", lambda ch, cx: ids_store_rank(ch, cx, True)),
        ("S store ranking as byte planes", ids_rank_planes),
        (
            "S, tier lit=128/e1=112/e2=16",
            lambda ch, cx: ids_store_rank(ch, cx, False, 0, Tier(128, 112, 16)),
        ),
        ("S+G prev-row refs |j-r|<8", lambda ch, cx: ids_store_rank(ch, cx, False, 16)),
        ("S+F+G prev-row refs |j-r|<32", lambda ch, cx: ids_store_rank(ch, cx, True, 64)),
    ]
    rows = []
    id_res = {}
    sub_ids = chunks[: args.explore_chunks]
    finalists = (
        "S store ranking (first 4 chunks)",
        "S store ranking as byte planes",
        "C per-chunk dictionary (table included)",
        "B byte planes (u16/u24), row-major",
        "D top-1024, escape to store rank",
    )
    for label, fn in cands:
        lv = levels if label in finalists else [3]
        r = measure_ids(sub_ids, label, fn, ctx, lv)
        id_res[label] = r
        rows.append([label] + [fmt(r[x]) if x in r else "" for x in levels])
    e1, e2 = id_entropy_bound(sub_ids, rank4)
    pad = [""] * (len(levels) - 1)
    rows.append(["(ideal order-0 entropy per chunk, no table)", *pad, fmt(e1)])
    rows.append(["(ideal order-0 entropy per chunk and rank group)", *pad, fmt(e2)])
    rep.p(f"(first {sum(x.ids.shape[0] for x in sub_ids)} positions)\n")
    rep.table(["ids codec", *[f"zstd-{lv}" for lv in levels]], rows)
    res["ids"] = id_res
    res["ids_entropy"] = (e1, e2)

    rows = []
    for label, rk, seen in (
        ("first chunk", rank1, seen1),
        ("first 4 chunks", rank4, seen4),
        ("all chunks (oracle)", rank_all, seen_all),
    ):
        cx = {"vocab": c.vocab_size, "rank_of_id": rk}
        r = measure_ids(sub_ids, label, lambda ch, cx: ids_store_rank(ch, cx, False), cx, [3])
        rows.append([label, fmt(r[3]), seen.size, table_cost(seen, c.vocab_size, 19)])
    rep.p()
    rep.table(
        ["S ranking learned from", "ids bytes/pos zstd-3", "ids in table", "table bytes"], rows
    )

    pos = np.concatenate([prev_row_position(x)[~x.rec_start] for x in chunks[:8]])
    r = np.arange(k)[None, :]
    hit = pos >= 0
    rep.p(
        f"\nG: {hit.mean():.3f} of ids occur in the previous row; with |j - r| < 8: "
        f"{(hit & (np.abs(pos - r) < 8)).mean():.3f}; by rank group: "
        + ", ".join(f"{a}-{b - 1}: {hit[:, a:b].mean():.3f}" for a, b in rank_groups(k))
    )

    # ---------------- inputs
    rep.h(f"{name}: input token ids, bytes per position (zstd-3)")
    ins = {
        "standalone (store ranking, tiered)": sum(
            streams_size(inputs_standalone(ch, ctx), 3) for ch in chunks
        )
        / npos,
        "via previous row (rank byte, escape -> store ranking)": sum(
            streams_size(inputs_via_prev_row(ch, ctx), 3) for ch in chunks
        )
        / npos,
        "raw u24 planes": sum(
            streams_size(u_planes(ch.inputs, id_bytes(c.vocab_size), "i"), 3) for ch in chunks
        )
        / npos,
    }
    rep.table(["input ids", "bytes/pos"], [[a, fmt(b)] for a, b in ins.items()])
    res["inputs"] = ins

    # ---------------- log-probabilities
    rep.h(f"{name}: log-probabilities, bytes per position")
    rows = []
    lp_res = {}
    for e in (5, 6, 7):
        for split in (False, True):
            label = f"quantized step 2^-{e}" + (", rank-group streams" if split else "")
            r = lp_measure(sub_ids, lambda ch, e=e, sp=split: lp_quant_streams(ch, e, sp), [3])
            st = quant_error_stats(chunks[:8], e)
            lp_res[label] = {"bytes": r, **st}
            rows.append(
                [label]
                + [fmt(r[lv]) if lv in r else "" for lv in levels]
                + [
                    f"{st['max_abs_err']:.5f}",
                    f"{st['kl_mean']:.2e}",
                    f"{st['kl_max_finite']:.2e}",
                    f"{st['rows_decoded_sum_gt_1']:.3f}",
                ]
            )
    for e in (6, 7):
        label = f"(a') quantized step 2^-{e}, mass-conserving rank 0, rank groups"
        r = lp_measure(sub_ids, lambda ch, e=e: lp_conserving_streams(ch, e), levels)
        st = conserving_stats(chunks[:8], e)
        lp_res[label] = {"bytes": r, **st}
        rows.append(
            [label]
            + [fmt(r[lv]) if lv in r else "" for lv in levels]
            + [
                f"{st['max_abs_err']:.5f}",
                f"{st['kl_mean']:.2e}",
                f"{st['kl_max_finite']:.2e}",
                f"{st['rows_decoded_sum_gt_1']:.3f}",
            ]
        )
    label = "(a'') as (a') 2^-6, ranks 16+ as delta pairs (recommended)"
    r = lp_measure(sub_ids, lambda ch: lp_conserving_streams(ch, 6, True), levels)
    lp_res[label] = {"bytes": r}
    rows.append([label] + [fmt(r[lv]) for lv in levels] + ["(same as a')", "", "", ""])
    for variant in ("raw", "xor", "delta"):
        label = f"lossless f32 {variant} byte planes"
        r = lp_measure(sub_ids, lambda ch, v=variant: lp_lossless_streams(ch, v), [3])
        lp_res[label] = {"bytes": r}
        rows.append(
            [label] + [fmt(r[lv]) if lv in r else "" for lv in levels] + ["0", "0", "0", "-"]
        )
    label = "lossless f32 magnitude deltas, tiered"
    r = lp_measure(sub_ids, lp_lossless_delta_tier_streams, levels)
    lp_res[label] = {"bytes": r}
    rows.append([label] + [fmt(r[lv]) if lv in r else "" for lv in levels] + ["0", "0", "0", "-"])
    rep.table(
        [
            "log-prob codec",
            *[f"zstd-{lv}" for lv in levels],
            "max abs err",
            "KL mean",
            "KL max",
            "rows sum p>1",
        ],
        rows,
    )
    res["logprobs"] = lp_res

    # ---------------- KL-bounded codec
    rep.h(f"{name}: KL-bounded codec (zstd-3), ladder base steps 2^-2..2^-10 then raw f32")
    ladder = KL_LADDER
    rows = []
    kl_res = {}
    sub = chunks[: args.kl_chunks]
    nsub = sum(x.ids.shape[0] for x in sub)
    for bound in (1e-3, 1e-4, 1e-5):
        for band_nat, balanced, pairs in (
            (1.5, False, False),
            (1.5, False, True),
            (1.5, True, False),
            (2.0, False, False),
        ):
            bu = int(band_nat * (1 << FINEST))
            tot = 0
            nlev = len(ladder) * len(KL_EXTRAS)
            lv_hist = np.zeros(nlev + 1)
            kls = []
            for ch in sub:
                level, codes, dec = kl_codec(ch.lp, bound, ladder, bu, 12, balanced)
                redo = kl_decode(level, codes, ch.lp, ladder, bu, 12)
                assert np.array_equal(redo.view(np.uint32), dec.view(np.uint32))
                tot += streams_size(kl_streams(level, codes, ch.lp, len(ladder), pairs), 3)
                lv_hist += np.bincount(level, minlength=nlev + 1)
                kls.append(kl_rows(ch.lp, dec))
            kl = np.concatenate(kls)
            assert (kl <= bound).all()
            base_hist = np.add.reduceat(lv_hist[:-1], np.arange(0, nlev, len(KL_EXTRAS)))
            mode = int(np.argmax(base_hist))
            extra_frac = 1.0 - lv_hist[:-1][:: len(KL_EXTRAS)].sum() / lv_hist.sum()
            label = f"KL<={bound:g}, band {band_nat} nat, {'balanced' if balanced else 'nearest'}"
            label += ", ranks 16+ in pairs" if pairs else ""
            frac_fine = (base_hist[mode + 1 :].sum() + lv_hist[-1]) / lv_hist.sum()
            raw_frac = lv_hist[-1] / lv_hist.sum()
            kl_res[label] = {
                "bytes": tot / nsub,
                "modal_base_exp": ladder[mode],
                "rows_finer_than_mode": frac_fine,
                "rows_extra_rank0_precision": extra_frac,
                "rows_raw_f32": raw_frac,
                "kl_mean": float(kl.mean()),
            }
            rows.append(
                [
                    label,
                    fmt(tot / nsub),
                    f"2^-{ladder[mode]}",
                    f"{frac_fine:.3f}",
                    f"{extra_frac:.3f}",
                    f"{raw_frac:.4f}",
                    f"{kl.mean():.2e}",
                ]
            )
    rep.table(
        [
            "KL codec",
            "bytes/pos",
            "modal base step",
            "rows needing a finer base step",
            "rows with finer rank-0 step",
            "rows raw f32",
            "KL mean",
        ],
        rows,
    )
    res["kl"] = kl_res

    # ---------------- recommended layout: totals, chunk sizes, speed
    split_ids = False
    rep.h(
        f"{name}: recommended default (ids: chunk top-{DICT_N} dictionary + store ranking, "
        f"log-probs (a'') 2^-{RECOMMENDED_STEP} with deep-rank pairs, inputs via the previous row)"
    )
    rep.p(verify_recommended(chunks, ctx, id_of_rank4, split_ids))
    mean_rec = float(np.diff(c.offsets).mean())
    rows = []
    tot_res = {}
    for csize in (1024, 4096, 16384):
        chs = chunks_of(c, csize)
        npc = sum(x.ids.shape[0] for x in chs)
        for lvl in [RECOMMENDED_LEVEL] if args.quick else [1, 3, 9, 19]:
            if lvl != RECOMMENDED_LEVEL and csize != 4096:
                continue
            payload = 0
            nstreams = 0
            for ch in chs:
                s = recommended_streams(ch, ctx, split_ids)
                nstreams = len(s)
                payload += streams_size(s, lvl)
            ov = overhead_estimate(nstreams, csize, mean_rec)
            table = table_cost(seen4, c.vocab_size, 19) / npc  # once per store/shard
            total = payload / npc + ov["per_position"] + table
            tot_res[(csize, lvl)] = total
            rows.append(
                [csize, lvl, fmt(payload / npc), fmt(ov["per_position"]), fmt(table), fmt(total)]
            )
    rep.table(
        [
            "chunk",
            "zstd",
            "payload B/pos",
            "container B/pos",
            f"ranking table B/pos (once per {npos} positions)",
            "total B/pos",
        ],
        rows,
    )
    res["totals"] = {f"{a}@{b}": v for (a, b), v in tot_res.items()}

    # the same with the KL-bounded log-probability codec instead (first kl_chunks chunks)
    kl_tot = {}
    sub = chunks[: args.kl_chunks]
    nsub = sum(x.ids.shape[0] for x in sub)
    bu = int(1.5 * (1 << FINEST))
    for bound in (1e-3, 1e-4):
        pay = 0
        for ch in sub:
            s = recommended_streams(ch, ctx, split_ids)
            s = {a: b for a, b in s.items() if not a.startswith("lp_")}
            level, codes, _ = kl_codec(ch.lp, bound, KL_LADDER, bu, 12, False)
            s.update(kl_streams(level, codes, ch.lp, len(KL_LADDER), True))
            pay += streams_size(s, RECOMMENDED_LEVEL)
        ov = overhead_estimate(len(s), chunk, mean_rec)
        kl_tot[bound] = pay / nsub + ov["per_position"] + table_cost(seen4, c.vocab_size, 19) / npos
        rep.p(
            f"With the KL-bounded codec (KL <= {bound:g}, band 1.5 nat, nearest, pairs) instead of "
            f"2^-6 log-probs: {kl_tot[bound]:.2f} B/pos in total (zstd-{RECOMMENDED_LEVEL}, "
            f"first {nsub} positions)."
        )
    res["totals_kl"] = kl_tot

    base = baseline_sizes(c)
    best_base = min(v for v in base.values() if v > 0 and "whole file" not in str(v))
    best_name = min((v, k) for k, v in base.items() if v > 0 and "whole file" not in k)[1]
    best_base = base[best_name]
    rec = tot_res[(4096, RECOMMENDED_LEVEL)]
    rows = [[k, fmt(v / c.n_positions), fmt(v / c.n_positions / rec)] for k, v in base.items()]
    rows.append([f"recommended (4096-position chunks, zstd-{RECOMMENDED_LEVEL})", fmt(rec), "1.00"])
    for bound, v in kl_tot.items():
        rows.append([f"same with KL <= {bound:g} log-probs", fmt(v), fmt(v / rec)])
    rep.table(["format", "B/pos", "ratio to recommended"], rows)
    rep.p(f"\nbest required baseline: {best_name}: {best_base / c.n_positions / rec:.2f}x larger")
    res["baselines"] = {k: v / c.n_positions for k, v in base.items()}

    # speed: zstd only, one thread
    rows = []
    speed = {}
    all_streams = [recommended_streams(ch, ctx, split_ids) for ch in chunks]
    raw = [b.tobytes() for s in all_streams for b in s.values() if b.size]
    raw_bytes = sum(len(b) for b in raw)
    for lvl in [RECOMMENDED_LEVEL] if args.quick else [1, 3, 9, 19]:
        frames = [zc(lvl).compress(b) for b in raw]
        td = time_decompress(frames, raw_bytes)
        tc = time_compress(raw, lvl, 0.3) if lvl < 19 else float("nan")
        speed[lvl] = {
            "decompress_MBps": raw_bytes / td / 1e6,
            "decompress_Mpos_s": npos / td / 1e6,
            "compress_Mpos_s": npos / tc / 1e6,
            "raw_bytes_per_pos": raw_bytes / npos,
        }
        rows.append(
            [
                lvl,
                fmt(raw_bytes / npos),
                fmt(raw_bytes / td / 1e6),
                fmt(npos / td / 1e6),
                fmt(npos / tc / 1e6),
            ]
        )
    rep.p(f"\n(speed measured with load average {os.getloadavg()})\n")
    rep.table(
        [
            "zstd level",
            "transformed B/pos",
            "decompress MB/s",
            "decompress Mpos/s",
            "compress Mpos/s",
        ],
        rows,
    )
    res["speed"] = speed
    # where zstd's decode time goes, per stream (zstd-1)
    rows = []
    for nm in all_streams[0]:
        bufs = [st[nm].tobytes() for st in all_streams if st[nm].size]
        if not bufs:
            continue
        frames = [zc(RECOMMENDED_LEVEL).compress(b) for b in bufs]
        td = time_decompress(frames, 0, 0.2)
        rows.append(
            [nm, fmt(sum(map(len, bufs)) / npos), fmt(sum(map(len, frames)) / npos),
             f"{td / npos * 1e9:.1f}"]
        )  # fmt: skip
    rep.p()
    rep.table(
        ["stream", "raw B/pos", f"zstd-{RECOMMENDED_LEVEL} B/pos", "decompress CPU ns/pos"], rows
    )
    kt = kernel_timing(chunks[:4], ctx, id_of_rank4)
    if kt is not None:
        zns = 1e3 / speed[RECOMMENDED_LEVEL]["decompress_Mpos_s"]
        tot = zns + kt["total_tiered_ns"]
        fast = zns + kt["ids_planes_ns"] + kt["logprobs_avx2_ns"] + kt["inputs_ns"]
        rep.p(
            f"\nNon-zstd decode work, C prototype (-O3 -march=native, scalar, verified "
            f"bit-exact), CPU ns per position: ids {kt['ids_tiered_ns']:.0f} (tiered codes) or "
            f"{kt['ids_planes_ns']:.0f} (u16 code planes), log-probs {kt['logprobs_ns']:.0f}, "
            f"inputs {kt['inputs_ns']:.0f}; with zstd-{RECOMMENDED_LEVEL} ({zns:.0f} ns): "
            f"{tot:.0f} ns = {1e3 / tot:.2f} M positions/s on one core.  With u16 code planes "
            f"for ids and AVX2 prefix sums for log-probs ({kt['logprobs_avx2_ns']:.0f} ns): "
            f"{fast:.0f} ns = {1e3 / fast:.2f} M positions/s."
        )
        res["kernel"] = kt
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=131072)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-ngram", action="store_true")
    ap.add_argument("--explore-chunks", type=int, default=8, help="chunks for the wide tables")
    ap.add_argument("--kl-chunks", type=int, default=4, help="chunks for the KL codec grid")
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
