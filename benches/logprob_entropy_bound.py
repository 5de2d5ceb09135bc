"""How far below the store could the log-probabilities of the default codec go? Ideal code
lengths of what `abs:0.01` keeps, and of what a canonical order within ties would save.

The default codec stores each top-K row as levels ``q_j = floor(-logprob_j / s + 1/2)``
(``s = 5 x 2^-8``; the top entry on a 64 times finer grid) and codes ranks 1+ as the
differences ``q_j - q_{j-1}`` through zstd's order-0 Huffman stage, ranks 16+ two per byte
(FORMAT.md 4.2). This script computes ideal code lengths (sum of -log2 p under the chunk's own
frequencies: no table, no coder overhead, so every figure is an optimistic floor) of those
differences for ranks 1+:

* **per rank group**: one frequency table per chunk for each of ranks 1-3, 4-15, 16+ (about
  what the store's streams are);
* **per rank**: one table per chunk for every rank;
* **given the previous difference**: per rank group, conditioned on the previous difference
  (capped at 15).

It also bounds what storing the ids of *tied* entries (equal decoded log-probabilities) in a
canonical order would save: their order within a tie carries no information a reader can
use, at most ``log2(r!)`` bits for a tie of ``r`` entries.

Chunks hold whole sequences, at least 4096 positions (as the writer's default).

    python benches/logprob_entropy_bound.py [--positions 65536] [--vocab 32768 128256]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import generate

STEP = 5 * 2.0**-8
GROUPS = ((1, 4), (4, 16), (16, None))
CHUNK = 4096


def order0_bits(values: np.ndarray) -> float:
    """Ideal order-0 code length of ``values`` under their own frequencies."""
    if values.size == 0:
        return 0.0
    _, counts = np.unique(values, return_counts=True)
    return float(-(counts * np.log2(counts / values.size)).sum())


def conditional_bits(values: np.ndarray, context: np.ndarray) -> float:
    """Ideal code length of ``values`` with one order-0 table per context value."""
    return sum(order0_bits(values[context == c]) for c in np.unique(context))


def chunks(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Position ranges of chunks of whole sequences, each at least CHUNK positions."""
    out, start = [], 0
    for end in offsets[1:]:
        if end - start >= CHUNK:
            out.append((start, int(end)))
            start = int(end)
    if start < offsets[-1]:
        out.append((start, int(offsets[-1])))
    return out


def tie_bits(q: np.ndarray) -> float:
    """Sum over rows of log2(r!) for every run of r equal levels: the bits a canonical
    order within ties would save at most."""
    lg = np.array([math.lgamma(r + 1) / math.log(2) for r in range(q.shape[1] + 1)])
    total = 0.0
    eq = np.diff(q, axis=1) == 0
    for row in eq:
        run = 0
        for tied in row:
            if tied:
                run += 1
            else:
                total += lg[run + 1]
                run = 0
        total += lg[run + 1]
    return total


def measure(positions: int, vocab: int) -> dict[str, float]:
    corpus = generate(n_positions=positions, vocab_size=vocab, seed=0)
    lp = corpus.topk_logprobs.astype(np.float64)
    q = np.floor(-lp / STEP + 0.5).astype(np.int64)
    d = np.diff(q, axis=1)  # rank j's difference at column j - 1
    n = q.shape[0]
    bits = {"group": 0.0, "rank": 0.0, "previous": 0.0}
    for a, b in chunks(corpus.offsets):
        dc = d[a:b]
        for lo, hi in GROUPS:
            g = dc[:, lo - 1 : (hi - 1 if hi else None)]
            bits["group"] += order0_bits(g.ravel())
            prev = np.concatenate([np.zeros((g.shape[0], 1), np.int64), g[:, :-1]], axis=1)
            if lo > 1:
                prev[:, 0] = np.minimum(dc[:, lo - 2], 15)
            bits["previous"] += conditional_bits(g.ravel(), np.minimum(prev, 15).ravel())
        bits["rank"] += sum(order0_bits(dc[:, j]) for j in range(dc.shape[1]))
    out = {key: v / 8 / n for key, v in bits.items()}
    out["ties"] = tie_bits(q) / 8 / n
    out["tied_share"] = float((d == 0).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=65536)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256])
    args = ap.parse_args()
    print(
        f"Ideal code length of the abs:0.01 differences of ranks 1+, bytes per position "
        f"(K = 64, {args.positions} positions, chunks of >= {CHUNK} positions):\n"
    )
    print("| model | " + " | ".join(f"synthetic V={v}" for v in args.vocab) + " |")
    print("|---|" + "---|" * len(args.vocab))
    results = [measure(args.positions, v) for v in args.vocab]
    rows = (
        ("order 0 per chunk and rank group", "group"),
        ("order 0 per chunk and rank", "rank"),
        ("per rank group, given the previous difference", "previous"),
        ("canonical order within ties: ids' bits saved at most", "ties"),
    )
    for label, key in rows:
        print(f"| {label} | " + " | ".join(f"{r[key]:.2f}" for r in results) + " |")
    print(
        "\nshare of differences that are 0 (a tie): "
        + ", ".join(f"{r['tied_share']:.3f}" for r in results)
    )


if __name__ == "__main__":
    main()
