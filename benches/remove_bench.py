"""Removing samples from a store: in place (`remove_samples`) against copying all the others
into a new store (`copy_store(..., exclude_ids=...)`, which with the source's codec copies
stored chunks too).

Writes the synthetic teacher corpus (benches/synthetic.py) once per codec, then for each
fraction of sequences removed (chosen at random, the same for both methods) times both on
fresh copies of the store and reports: wall time, positions of the store per second, what
the removal rewrote (chunks copied / encoded again / dropped), and how many of the remaining
records read back different from before (only records that shared a chunk with a removed
one can).

This is a benchmark, not a test: run ``python benches/remove_bench.py`` and record what it
prints in benches/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import generate

import logitcache as lc


def _records_changed(before: Path, after: Path, ids: np.ndarray) -> int:
    a, b = lc.open_store(before), lc.open_store(after)
    changed = 0
    for start in range(0, len(ids), 64):
        batch = ids[start : start + 64]
        x, y = a.read_packed(batch), b.read_packed(batch)
        for lo, hi in zip(x.offsets[:-1], x.offsets[1:], strict=True):
            same = np.array_equal(x.topk_logprobs[lo:hi], y.topk_logprobs[lo:hi]) and (
                np.array_equal(x.topk_ids[lo:hi], y.topk_ids[lo:hi])
            )
            changed += not same
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=400_000)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--codecs", default="abs:0.01,kl:1e-3")
    ap.add_argument("--fractions", default="0.001,0.01,0.1")
    ap.add_argument("--shard-size", default="64MiB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lc.set_num_threads(1)
    corpus = generate(args.positions, vocab_size=args.vocab, k=args.k, seed=args.seed)
    n_seq = len(corpus.offsets) - 1
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"logitcache {lc.__version__}; {corpus.n_positions:,} positions in {n_seq:,} "
        f"sequences, V = {args.vocab}, K = {args.k}, shards of {args.shard_size}, one thread"
    )
    rng = np.random.default_rng(args.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for codec in args.codecs.split(","):
            src = work / f"src-{codec}"
            with lc.StoreWriter(
                src, vocab_size=args.vocab, k=args.k, codec=codec, shard_size=args.shard_size
            ) as w:
                for i, (inp, ids, lps) in enumerate(corpus.sequences()):
                    w.add(i, inp, ids, lps)
            shards = len(lc.open_store(src).meta["shards"])
            print(f"\n{codec}: {shards} shards")
            print(
                "| removed | method | seconds | store positions/s | chunks copied / "
                "encoded again / dropped | remaining records changed |"
            )
            print("|---|---|---|---|---|---|")
            for frac in (float(f) for f in args.fractions.split(",")):
                n = max(1, round(frac * n_seq))
                gone = np.sort(rng.choice(n_seq, size=n, replace=False)).astype(np.uint64)
                keep = np.setdiff1d(np.arange(n_seq, dtype=np.uint64), gone)
                label = f"{n:,} of {n_seq:,} ({frac:.1%})"

                inplace = work / "inplace"
                shutil.copytree(src, inplace)
                t0 = time.perf_counter()
                report = lc.remove_samples(inplace, gone)
                t_in = time.perf_counter() - t0
                sh = report["shards"]
                rewrite = (
                    f"{sum(s['chunks_copied'] for s in sh):,} / "
                    f"{sum(s['chunks_reencoded'] for s in sh):,} / "
                    f"{sum(s['chunks_dropped'] for s in sh):,}"
                )
                changed = _records_changed(src, inplace, keep)
                rate = corpus.n_positions / t_in
                print(
                    f"| {label} | remove_samples | {t_in:.2f} | {rate:,.0f} | {rewrite} "
                    f"| {changed:,} of {len(keep):,} |"
                )

                copied = work / "copied"
                t0 = time.perf_counter()
                lc.copy_store(src, copied, exclude_ids=gone)
                t_cp = time.perf_counter() - t0
                changed = _records_changed(src, copied, keep)
                rate = corpus.n_positions / t_cp
                print(
                    f"| {label} | copy_store(exclude_ids) | {t_cp:.2f} | {rate:,.0f} | "
                    f"(as stored, not counted) | {changed:,} of {len(keep):,} |"
                )
                shutil.rmtree(inplace)
                shutil.rmtree(copied)


if __name__ == "__main__":
    main()
