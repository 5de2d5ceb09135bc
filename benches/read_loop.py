"""Batch reads in a training loop: a batch is read, the loop works on it for a while (a
training step: here a sleep of ``--step-ms``), then the next batch is read and the previous
one released, as ``for batch in loader`` does.

store_bench.py reads its batches back to back. In a training loop the memory of a released
batch sits idle for a whole step, long enough for an allocator to hand its pages back to the
OS, so a reader that allocates each batch afresh pays page faults and zeroed pages on every
batch. This script times only the read calls, in shuffled batches of ``--batch`` sequences
(chunk cache off), with no step and with steps, for logitcache (``read_batch`` padded and
``read_packed``, and ``store[sample_id]`` once per record as a map-style Dataset reads)
and for the npy baseline of store_bench.py (memory-mapped int32 ids and
float16 log-probabilities, each batch's sequences copied out; padded: into arrays of the
longest sequence), in one process. The ratio "with steps / without" shows what the steps
cost each reader.

This is a benchmark, not a test: run ``python benches/read_loop.py`` and record what it
prints in benches/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import generate

import logitcache as lc


def _batches(n_sequences: int, batch: int, n_batches: int, seed: int) -> list[np.ndarray]:
    """Batches of distinct sequences in shuffled order, reshuffled each pass over the
    corpus until there are enough."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while len(out) < n_batches:
        order = rng.permutation(n_sequences)
        out += [order[i : i + batch] for i in range(0, n_sequences - batch + 1, batch)]
    return out[:n_batches]


def _loop(read: Callable[[np.ndarray], object], batches: list[np.ndarray], step_s: float):
    """Seconds spent in ``read`` over the batches; the previous batch is released once the
    next one is read, and ``step_s`` passes between reads."""
    spent = 0.0
    held = None
    for b in batches:
        t = time.perf_counter()
        batch = read(b)
        spent += time.perf_counter() - t
        held = batch  # the previous batch is released here, after the next one is read
        if step_s:
            time.sleep(step_s)
    del held
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--positions", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--batches", type=int, default=40, help="batches per timed loop")
    parser.add_argument("--step-ms", type=float, default=250.0, help="work between reads")
    parser.add_argument("--rounds", type=int, default=3, help="loops per reader and step")
    args = parser.parse_args()

    lc.set_num_threads(1)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}, logitcache {lc.__version__}, one thread"
    )
    tc = generate(n_positions=args.positions, vocab_size=args.vocab, k=args.k, seed=0)
    lengths = np.diff(tc.offsets)
    offs = tc.offsets
    with tempfile.TemporaryDirectory(prefix="logitcache-loop-") as tmp:
        work = Path(tmp)
        with lc.StoreWriter(work / "store", vocab_size=args.vocab, k=args.k) as w:
            for i in range(len(lengths)):
                a, b = offs[i], offs[i + 1]
                w.add(i, tc.input_ids[a:b], tc.topk_ids[a:b], tc.topk_logprobs[a:b])
        np.save(work / "input_ids.npy", tc.input_ids.astype(np.int32))
        np.save(work / "topk_ids.npy", tc.topk_ids.astype(np.int32))
        np.save(work / "topk_logprobs.npy", tc.topk_logprobs.astype(np.float16))
        del tc

        store = lc.open_store(work / "store", cache_chunks=0)
        sids = store.sample_ids()
        inp_m = np.load(work / "input_ids.npy", mmap_mode="r")
        ids_m = np.load(work / "topk_ids.npy", mmap_mode="r")
        lp_m = np.load(work / "topk_logprobs.npy", mmap_mode="r")

        def npy_packed(b: np.ndarray) -> tuple[np.ndarray, ...]:
            parts = [slice(offs[i], offs[i + 1]) for i in b]
            return tuple(np.concatenate([m[p] for p in parts]) for m in (inp_m, ids_m, lp_m))

        def npy_padded(b: np.ndarray) -> tuple[np.ndarray, ...]:
            n = int(lengths[b].max())
            inp = np.zeros((len(b), n), np.int32)
            ids = np.zeros((len(b), n, args.k), np.int32)
            lp = np.full((len(b), n, args.k), -np.inf, np.float16)
            for j, i in enumerate(b):
                a, e = offs[i], offs[i + 1]
                inp[j, : e - a] = inp_m[a:e]
                ids[j, : e - a] = ids_m[a:e]
                lp[j, : e - a] = lp_m[a:e]
            return inp, ids, lp

        readers: dict[str, Callable[[np.ndarray], object]] = {
            "logitcache read_batch (padded)": lambda b: store.read_batch(sids[b]),
            "logitcache read_packed": lambda b: store.read_packed(sids[b]),
            # A map-style Dataset: one record per __getitem__, the batch a list of them.
            "logitcache store[sid] per record": lambda b: [store[int(sids[i])] for i in b],
            "npy mmap, padded": npy_padded,
            "npy mmap, packed": npy_packed,
        }
        n_seq = len(lengths)
        print(
            f"V = {args.vocab}, K = {args.k}: {int(lengths.sum()):,} positions in {n_seq} "
            f"sequences; {args.batches} shuffled batches of {args.batch} per loop, steps of "
            f"{args.step_ms:g} ms, best of {args.rounds} loops"
        )
        print(f"{'reader':32} {'no step pos/s':>14} {'with steps pos/s':>17} {'ratio':>6}")
        for name, read in readers.items():
            rates = {}
            for step in (0.0, args.step_ms / 1000):
                best = 0.0
                for r in range(args.rounds):
                    bs = _batches(n_seq, args.batch, args.batches, seed=r)
                    positions = sum(int(lengths[b].sum()) for b in bs)
                    best = max(best, positions / _loop(read, bs, step))
                rates[step] = best
            no_step, with_steps = rates[0.0], rates[args.step_ms / 1000]
            print(f"{name:32} {no_step:14,.0f} {with_steps:17,.0f} {with_steps / no_step:6.2f}")


if __name__ == "__main__":
    main()
