"""Chunk size against store size and read speed, sequential and shuffled.

A chunk is the unit of compression and of random access: reading one record decodes its
whole chunk. A writer closes a chunk once it holds ``chunk_positions`` positions or before a
record that would take it past that, so a record at least that long is a chunk of its own
and reading any record decodes at most ``max(chunk_positions, its length)`` positions. This
script writes the same corpus with several ``chunk_positions`` and reports bytes per token,
encode positions/s and ``Store.read_packed`` positions/s for batches of 16 sequences read in
order and in a fixed shuffled order (what a training loader does), each batch dropped before
the next, with the chunk cache off (in a corpus much larger than the cache a shuffled read
almost never finds its chunk decoded). One thread.

    python benches/chunk_size.py [--positions 200000] [--vocab 32768 128256] [--ngram]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import TeacherCorpus, generate

import logitcache as lc

CHUNK_POSITIONS = (1, 512, 1024, 2048, 4096)
BATCH = 16


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _write(c: TeacherCorpus, path: Path, chunk_positions: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with lc.StoreWriter(path, vocab_size=c.vocab_size, k=c.k, chunk_positions=chunk_positions) as w:
        for sid, (a, b) in enumerate(itertools.pairwise(c.offsets)):
            w.add(sid, c.input_ids[a:b], c.topk_ids[a:b], c.topk_logprobs[a:b])


def _read(store: lc.Store, sids: np.ndarray) -> None:
    for i in range(0, len(sids), BATCH):
        store.read_packed(sids[i : i + BATCH])


def measure(c: TeacherCorpus, work: Path, repeats: int) -> list[str]:
    """One markdown table row per chunk size."""
    n = c.n_positions
    shuffle = np.random.default_rng(1).permutation(len(c.offsets) - 1)
    rows = []
    for cp in CHUNK_POSITIONS:
        path = work / f"chunk{cp}"
        t_enc = _best(functools.partial(_write, c, path, cp), 1)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        store = lc.open_store(path, cache_chunks=0)
        sids = store.sample_ids()
        t_seq = _best(functools.partial(_read, store, sids), repeats)
        t_shuf = _best(functools.partial(_read, store, sids[shuffle]), repeats)
        rows.append(
            f"| {cp} | {size / n:.1f} | {n / t_enc:,.0f} | {n / t_seq:,.0f} | {n / t_shuf:,.0f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=200_000)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256])
    ap.add_argument("--ngram", action="store_true", help="add the n-gram teacher on real text")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    lc.set_num_threads(1)
    sources: dict[str, TeacherCorpus] = {}
    for v in args.vocab:
        sources[f"synthetic V={v}"] = generate(n_positions=args.positions, vocab_size=v, seed=0)
    if args.ngram:
        import ngram_teacher

        sources["ngram V=32768"] = ngram_teacher.build_corpus(n_positions=args.positions)
    with tempfile.TemporaryDirectory(prefix="logitcache-chunks-") as tmp:
        for name, corpus in sources.items():
            lengths = np.diff(corpus.offsets)
            print(
                f"\n{name}, K = {corpus.k}: {corpus.n_positions:,} positions in {len(lengths)} "
                f"sequences (median length {int(np.median(lengths))}), abs:0.01\n"
            )
            print("| chunk_positions | bytes/token | encode pos/s | sequential pos/s ", end="")
            print("| shuffled pos/s |")
            print("|---|---|---|---|---|")
            for row in measure(corpus, Path(tmp), args.repeats):
                print(row)


if __name__ == "__main__":
    main()
