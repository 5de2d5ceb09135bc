"""How far below order 0 could the token ids of a top-K store go? Ideal code lengths.

The store codes each id by its rank in a per-chunk table, entropy-coded by zstd's order-0
Huffman stage, and that is within a few percent of the ids' order-0 entropy per chunk
(benches/codec_experiments.md). This script bounds what *context modelling* could add, by
computing ideal code lengths (sum of -log2 p, no table, no coder overhead: every figure is
an optimistic floor for a real coder) under models that use what a decoder knows:

* **order 0 per chunk**: the chunk's id frequencies (what the store approximates);
* **order 0 per chunk and rank group**: separate frequencies for ranks 0, 1-3, 4-15, 16+;
* **recent inputs**: an id that is one of the last 32 input tokens of its sequence is coded
  as an index into those (a flag, then log2 of their number), the others by order 0;
* **previous row**: an id also in the previous row is coded as its position there (a flag,
  then 6 bits), the others by order 0;
* **record-adaptive mixture**: ``p = lam * c / n + (1 - lam) * p0``, where ``c`` counts the
  id's earlier occurrences in the same sequence, ``n`` the ids seen so far in it, and
  ``p0`` the chunk's order-0 frequency (best ``lam`` of a grid).

Chunks hold whole sequences, at least 4096 positions (as the writer's default).

    python benches/id_entropy_bound.py [--positions 65536] [--vocab 32768 128256] [--ngram]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import TeacherCorpus, generate

GROUP_STARTS = (0, 1, 4, 16)
RECENT = 32
LAMBDAS = (0.2, 0.4, 0.6, 0.8)


def order0_bits(ids: np.ndarray) -> float:
    """Ideal order-0 code length of ``ids`` under their own frequencies."""
    if ids.size == 0:
        return 0.0
    _, counts = np.unique(ids, return_counts=True)
    return float(-(counts * np.log2(counts / ids.size)).sum())


def flag_bits(flags: np.ndarray) -> float:
    """Ideal code length of a binary flag per entry under its own frequency."""
    p = float(flags.mean()) if flags.size else 0.0
    if p in (0.0, 1.0):
        return 0.0
    return float(flags.size * -(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def earlier_occurrences(seq: np.ndarray) -> np.ndarray:
    """For each element, how often its value occurred before it in ``seq``."""
    order = np.argsort(seq, kind="stable")
    s = seq[order]
    starts = np.r_[0, np.flatnonzero(s[1:] != s[:-1]) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, s.size]))
    out = np.empty(seq.size, np.int64)
    out[order] = np.arange(s.size) - first
    return out


def chunks_of(c: TeacherCorpus, min_positions: int) -> list[list[tuple[int, int]]]:
    """Whole sequences grouped into chunks of at least ``min_positions`` positions."""
    chunks, cur, n = [], [], 0
    for a, b in zip(c.offsets[:-1].tolist(), c.offsets[1:].tolist(), strict=True):
        cur.append((a, b))
        n += b - a
        if n >= min_positions:
            chunks.append(cur)
            cur, n = [], 0
    if cur:
        chunks.append(cur)
    return chunks


def recent_membership(c: TeacherCorpus, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """For the rows of sequence [a, b): whether each id is among the last RECENT input tokens
    (positions t - RECENT + 1 .. t), and how many distinct tokens that window holds."""
    v = c.vocab_size
    n = b - a
    inp = c.input_ids[a:b].astype(np.int64)
    t = np.arange(n)
    keys = np.concatenate([(t[d:] * v + inp[: n - d]) for d in range(min(RECENT, n))])
    keys = np.unique(keys)
    size = np.bincount(keys // v, minlength=n)
    rows = c.topk_ids[a:b].astype(np.int64)
    member = np.isin(t[:, None] * v + rows, keys)
    return member, size


def prev_row_membership(c: TeacherCorpus, a: int, b: int) -> np.ndarray:
    """Whether each id of rows [a, b) also occurs in the previous row of its sequence."""
    v = c.vocab_size
    rows = c.topk_ids[a:b].astype(np.int64)
    t = np.arange(b - a)[:, None]
    prev_keys = (t[1:] * v + rows[:-1]).reshape(-1)  # row t - 1 keyed by t
    member = np.zeros(rows.shape, bool)
    member[1:] = np.isin((t[1:] * v + rows[1:]), prev_keys)
    return member


def measure(c: TeacherCorpus, chunk_positions: int) -> dict[str, float]:
    """Bits per id of each model, summed over the chunks."""
    k = c.k
    bits = dict.fromkeys(
        ["order 0 per chunk", "order 0 per chunk and rank group", "recent inputs",
         "previous row", "record-adaptive mixture"],
        0.0,
    )  # fmt: skip
    mixture = np.zeros(len(LAMBDAS))
    entries = 0
    group = np.searchsorted(np.array(GROUP_STARTS[1:]), np.arange(k), side="right")
    for chunk in chunks_of(c, chunk_positions):
        rows = np.concatenate([c.topk_ids[a:b] for a, b in chunk]).astype(np.int64)
        flat = rows.reshape(-1)
        entries += flat.size
        bits["order 0 per chunk"] += order0_bits(flat)
        bits["order 0 per chunk and rank group"] += sum(
            order0_bits(rows[:, group == g]) for g in range(len(GROUP_STARTS))
        )

        recent, size = zip(*(recent_membership(c, a, b) for a, b in chunk), strict=True)
        recent_m, recent_n = np.concatenate(recent), np.concatenate(size)
        bits["recent inputs"] += (
            flag_bits(recent_m)
            + float((recent_m * np.log2(np.maximum(recent_n, 1))[:, None]).sum())
            + order0_bits(rows[~recent_m])
        )
        prev = np.concatenate([prev_row_membership(c, a, b) for a, b in chunk])
        bits["previous row"] += flag_bits(prev) + 6.0 * prev.sum() + order0_bits(rows[~prev])

        _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        p0 = counts[inverse] / flat.size
        earlier = np.concatenate(
            [earlier_occurrences(c.topk_ids[a:b].reshape(-1).astype(np.int64)) for a, b in chunk]
        )
        seen = np.concatenate([np.arange((b - a) * k) for a, b in chunk])
        p_record = earlier / (seen + 1)
        for i, lam in enumerate(LAMBDAS):
            mixture[i] += float(-np.log2(lam * p_record + (1 - lam) * p0).sum())
    best = int(np.argmin(mixture))
    bits["record-adaptive mixture"] = float(mixture[best])
    out = {name: b / entries for name, b in bits.items()}
    out["mixture lambda"] = LAMBDAS[best]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=65536)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256])
    ap.add_argument("--chunk", type=int, default=4096, help="chunk positions (default 4096)")
    ap.add_argument("--ngram", action="store_true", help="add the n-gram teacher (slow once)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    sources: dict[str, TeacherCorpus] = {}
    for v in args.vocab:
        sources[f"synthetic V={v}"] = generate(
            n_positions=args.positions, vocab_size=v, seed=args.seed
        )
    if args.ngram:
        import ngram_teacher

        sources["ngram V=32768"] = ngram_teacher.build_corpus(n_positions=args.positions)

    results = {}
    for name, corpus in sources.items():
        t = time.perf_counter()
        results[name] = measure(corpus, args.chunk)
        print(f"{name}: {time.perf_counter() - t:.1f}s", file=sys.stderr)

    names = list(sources)
    print(f"Ideal code length of the top-K ids, K = {next(iter(sources.values())).k}, "
          f"{args.positions} positions, chunks of >= {args.chunk} positions:\n")  # fmt: skip
    print("| model | " + " | ".join(f"{n}: bits/id, B/pos" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    base = {n: results[n]["order 0 per chunk"] for n in names}
    for model in results[names[0]]:
        if model == "mixture lambda":
            continue
        cells = []
        for n in names:
            b = results[n][model]
            cells.append(f"{b:.2f}, {b * sources[n].k / 8:.1f} ({(b / base[n] - 1) * 100:+.1f}%)")
        print(f"| {model} | " + " | ".join(cells) + " |")
    lam = ", ".join(f"{n}: {results[n]['mixture lambda']}" for n in names)
    print(f"\n(mixture weight chosen per source: {lam})")


if __name__ == "__main__":
    main()
