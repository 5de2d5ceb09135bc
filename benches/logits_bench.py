"""Benchmark of StoreWriter.add_logits (full teacher logits to stored targets) against the
torch code a capture would otherwise run before ``add``/``add_sampled``.

For one sequence of L positions of dense float32 logits ``[L, V]`` from the synthetic teacher
(``benches/synthetic.py``), in one process and at equal threads (``torch.set_num_threads``
and ``logitcache.set_num_threads``), it times:

* top-K stores: ``add_logits`` (log-softmax and top-K in Rust, then the record's checks and
  encoding) against ``torch.topk(torch.log_softmax(x / T), K)`` followed by ``add`` of the
  result (the same record written);
* sampled stores: ``add_logits`` (n draws per position in Rust) against
  ``torch.multinomial(softmax(x / T), n, replacement=True)``, counts by ``scatter_add`` into
  ``[L, V]``, the distinct ids by count with ``topk`` and their log-probabilities by
  ``gather``, then ``add_sampled``.

Each figure is the best of ``--repeats`` writes, in positions per second (the store's writer
open and closed outside the timing, chunks and shards written inside it), with the ratio of
the torch route's time to add_logits'.

Run: ``python benches/logits_bench.py`` (``--positions``, ``--vocab``, ``--threads``,
``--repeats``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable

import torch
from synthetic import generate_logits

import logitcache as lc


def timed_writes(
    root: str, name: str, repeats: int, options: dict[str, object], add: Callable[..., None]
) -> float:
    """Best time of ``add(writer)`` into a new store (created before the clock starts, its
    close inside the timing: the last chunk and shard are written then)."""
    times = []
    for i in range(repeats):
        path = os.path.join(root, f"{name}-{i}")
        w = lc.StoreWriter(path, **options)  # type: ignore[arg-type]
        start = time.perf_counter()
        add(w)
        w.close()
        times.append(time.perf_counter() - start)
        shutil.rmtree(path)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256])
    parser.add_argument("--k", type=int, default=64, help="top-K, and draws per position")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lc.set_num_threads(args.threads)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, torch {torch.__version__}, L = {args.positions}, "
        f"K = n = {args.k}, T = {args.temperature}, best of {args.repeats}"
    )
    print("| V | store | add_logits pos/s | torch + add pos/s | torch / add_logits time |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for vocab in args.vocab:
            for row in bench_vocab(root, vocab, args):
                print(row)


def bench_vocab(root: str, vocab: int, args: argparse.Namespace) -> list[str]:
    """The table rows of one vocabulary size."""
    k, t, n_pos = args.k, args.temperature, args.positions
    inputs, logits = generate_logits([n_pos], vocab_size=vocab, k=k, seed=1)
    x = torch.from_numpy(logits)

    def topk_torch(w: lc.StoreWriter) -> None:
        lp, ids = torch.topk(torch.log_softmax(x / t, dim=-1), k, dim=-1)
        w.add(0, inputs, ids.numpy(), lp.numpy())

    def sampled_torch(w: lc.StoreWriter) -> None:
        lp = torch.log_softmax(x / t, dim=-1)
        draws = torch.multinomial(lp.exp(), k, replacement=True)
        counts = torch.zeros(lp.shape, dtype=torch.int32)
        counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))
        width = int((counts > 0).sum(dim=1).max())
        c, ids = torch.topk(counts, width, dim=1)
        w.add_sampled(0, inputs, ids.numpy(), c.numpy(), torch.gather(lp, 1, ids).numpy())

    rows = []
    for store, options, torch_route in (
        ("top-K", {"k": k}, topk_torch),
        ("sampled", {"k": k, "kind": "sampled", "codec": "abs:0.01"}, sampled_torch),
    ):
        opts = {"vocab_size": vocab, "temperature": t, **options}
        ours = timed_writes(
            root, "ours", args.repeats, opts, lambda w: w.add_logits(0, inputs, logits)
        )
        theirs = timed_writes(root, "torch", args.repeats, opts, torch_route)
        rows.append(
            f"| {vocab} | {store} | {n_pos / ours:,.0f} | {n_pos / theirs:,.0f} | "
            f"{theirs / ours:.2f}x |"
        )
    return rows


if __name__ == "__main__":
    main()
