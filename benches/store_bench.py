"""Store benchmark: logitcache against the plain formats a user would otherwise pick.

Writes and reads the same synthetic teacher corpus (benches/synthetic.py: Zipf token
frequencies, peaked teacher distributions) with every method in one process and reports,
side by side: bytes per token (everything on disk), encode and decode positions per second
on one core, and the maximum absolute log-probability error.

Methods:
  * logitcache with each log-probability codec (encode = StoreWriter.add, decode =
    Store.read_batch into padded numpy arrays, "packed" = Store.read_packed into arrays
    holding the records back to back, "shuffled" = read_packed of the same batches with the
    sequences in a fixed random order, as a training loader reads, with the chunk cache off),
    one thread unless --threads says otherwise. Batch reads are streamed as a training loop
    consumes them (``for batch in loader``: a batch is released once the next one is read;
    holding every batch of the corpus instead times the growth of the process's memory as
    much as the decoding); the baselines' whole-file reads below load everything at once,
    which is their use;
  * raw .npy: int32 ids + float16 log-probabilities (+ int32 input ids), np.save / np.load
    (shuffled: np.load with mmap_mode="r", each batch's sequences copied out);
  * parquet: the same columns as fixed-size lists, zstd, via pyarrow (shuffled: n/a, the
    file has no access by sequence);
  * safetensors: the same tensors in one safetensors file (shuffled: safe_open slices).

This is a benchmark, not a test: run ``python benches/store_bench.py`` and record what it
prints in benches/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import generate

import logitcache as lc


@dataclass
class Corpus:
    lengths: np.ndarray  # [N] positions per sequence
    input_ids: np.ndarray  # [P] int32
    topk_ids: np.ndarray  # [P, K] int32
    topk_logprobs: np.ndarray  # [P, K] float32

    @property
    def positions(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)])

    def sequences(self):
        offs = self.offsets
        for i in range(len(self.lengths)):
            a, b = offs[i], offs[i + 1]
            yield i, self.input_ids[a:b], self.topk_ids[a:b], self.topk_logprobs[a:b]

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids, topk_ids, topk_logprobs)`` of sequence ``i``."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.topk_ids[a:b], self.topk_logprobs[a:b]


@dataclass
class Result:
    method: str
    bytes_per_token: float
    encode_pos_s: float
    decode_pos_s: float
    max_abs_err: float
    median_kl: float
    max_kl: float
    rest_lost: float  # fraction of positions whose decoded row lost all its rest mass
    # Decode into unpadded arrays: read_packed for logitcache; the baselines' decode already
    # yields flat arrays, so theirs is the same number.
    packed_pos_s: float = 0.0
    # Batches of sequences in a shuffled order, as a training loader reads them: the same
    # packed arrays (None where the format has no random access by sequence).
    shuffled_pos_s: float | None = None

    def __post_init__(self) -> None:
        if not self.packed_pos_s:
            self.packed_pos_s = self.decode_pos_s


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        # The previous run's result is released first: holding it while the next one is
        # built timed the growth of the process's memory (first-touch page faults on ~2x
        # the output), not the method.
        out = None
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _kl_stats(decoded: np.ndarray, want: np.ndarray) -> tuple[float, float, float]:
    """(median, max) over positions of KL(P || P_decoded), P = (top-K probabilities, rest
    bucket max(0, 1 - sum)), and the fraction of positions whose KL is infinite: rounding
    pushed the decoded row's mass to 1 or above while the written row kept some rest mass."""
    kls = []
    for a in range(0, len(want), 65536):
        w = want[a : a + 65536].astype(np.float64)
        d = decoded[a : a + 65536].astype(np.float64)
        p, q = np.exp(w), np.exp(d)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * (w - d), 0.0).sum(axis=1)
            pr = np.maximum(0.0, 1 - p.sum(axis=1))
            qr = np.maximum(0.0, 1 - q.sum(axis=1))
            rest = np.where(pr > 0, pr * np.log(pr / qr), 0.0)
        kls.append(terms + rest)
    all_kl = np.concatenate(kls) if kls else np.zeros(1)
    return float(np.median(all_kl)), float(np.max(all_kl)), float(np.mean(np.isinf(all_kl)))


def _stream(batches: Iterable[object]) -> int:
    """Consume batches one at a time, as ``for batch in loader`` does (a batch is released
    once the next one has been read); returns how many there were."""
    n = 0
    for _ in batches:
        n += 1
    return n


def _shuffled_batches(n_sequences: int, batch: int) -> list[np.ndarray]:
    """Sequence indices in one fixed random order, cut into batches."""
    order = np.random.default_rng(1).permutation(n_sequences)
    return [order[i : i + batch] for i in range(0, n_sequences, batch)]


def _max_err(decoded: np.ndarray, want: np.ndarray) -> float:
    finite = np.isfinite(want)
    if not np.array_equal(np.isfinite(decoded), finite):
        return float("inf")
    return float(np.max(np.abs(decoded[finite].astype(np.float64) - want[finite]), initial=0.0))


def bench_logitcache(
    c: Corpus, vocab: int, codec: str, work: Path, repeats: int, batch: int
) -> Result:
    path = work / f"lc-{codec.replace(':', '_')}"

    def write() -> None:
        if path.exists():
            shutil.rmtree(path)
        with lc.StoreWriter(path, vocab_size=vocab, k=c.topk_ids.shape[1], codec=codec) as w:
            for sid, inp, ids, lp in c.sequences():
                w.add(sid, inp, ids, lp)

    t_enc, _ = _best_of(write, repeats)
    store = lc.open_store(path)
    sids = store.sample_ids()

    in_order = [sids[i : i + batch] for i in range(0, len(sids), batch)]
    t_dec, _ = _best_of(lambda: _stream(store.read_batch(b) for b in in_order), repeats)
    t_packed, _ = _best_of(lambda: _stream(store.read_packed(b) for b in in_order), repeats)
    shuffled = [sids[b] for b in _shuffled_batches(len(sids), batch)]
    # Without the chunk cache: in a corpus much larger than the cache a shuffled read
    # almost never finds its chunk decoded (here the cache would hold 8 of ~50 chunks).
    uncached = lc.open_store(path, cache_chunks=0)
    t_shuffled, _ = _best_of(lambda: _stream(uncached.read_packed(b) for b in shuffled), repeats)
    # What was timed, checked (untimed).
    packed = [store.read_packed(b) for b in in_order]
    assert np.array_equal(np.concatenate([p.topk_ids for p in packed]), c.topk_ids)
    first = uncached.read_packed(shuffled[0])
    n0 = int(first.lengths[0])
    assert np.array_equal(first.topk_ids[:n0], c.sequence(int(shuffled[0][0]))[1])
    batches = [store.read_batch(b) for b in in_order]
    got = np.concatenate([b.topk_logprobs[b.mask] for b in batches])
    ids = np.concatenate([b.topk_ids[b.mask] for b in batches])
    assert np.array_equal(ids, c.topk_ids), "ids must round-trip exactly"
    return Result(
        f"logitcache {codec}",
        _dir_bytes(path) / c.positions,
        c.positions / t_enc,
        c.positions / t_dec,
        _max_err(got, c.topk_logprobs),
        *_kl_stats(got, c.topk_logprobs),
        packed_pos_s=c.positions / t_packed,
        shuffled_pos_s=c.positions / t_shuffled,
    )


def bench_npy(c: Corpus, work: Path, repeats: int, batch: int) -> Result:
    d = work / "npy"

    def write() -> None:
        d.mkdir(exist_ok=True)
        np.save(d / "lengths.npy", c.lengths.astype(np.int32))
        np.save(d / "input_ids.npy", c.input_ids.astype(np.int32))
        np.save(d / "topk_ids.npy", c.topk_ids.astype(np.int32))
        np.save(d / "topk_logprobs.npy", c.topk_logprobs.astype(np.float16))

    def read() -> tuple[np.ndarray, np.ndarray]:
        np.load(d / "lengths.npy")
        np.load(d / "input_ids.npy")
        return np.load(d / "topk_ids.npy"), np.load(d / "topk_logprobs.npy")

    def read_shuffled() -> int:
        # Memory-mapped, each batch's sequences copied out back to back.
        ids_m = np.load(d / "topk_ids.npy", mmap_mode="r")
        lp_m = np.load(d / "topk_logprobs.npy", mmap_mode="r")
        offs = c.offsets
        return _stream(
            (
                np.concatenate([ids_m[offs[i] : offs[i + 1]] for i in b]),
                np.concatenate([lp_m[offs[i] : offs[i + 1]] for i in b]),
            )
            for b in _shuffled_batches(len(c.lengths), batch)
        )

    t_enc, _ = _best_of(write, repeats)
    t_dec, (ids, lp) = _best_of(read, repeats)
    t_shuffled, _ = _best_of(read_shuffled, repeats)
    assert np.array_equal(ids, c.topk_ids)
    return Result(
        "npy int32 + float16",
        _dir_bytes(d) / c.positions,
        c.positions / t_enc,
        c.positions / t_dec,
        _max_err(lp.astype(np.float32), c.topk_logprobs),
        *_kl_stats(lp.astype(np.float32), c.topk_logprobs),
        shuffled_pos_s=c.positions / t_shuffled,
    )


def bench_parquet(c: Corpus, work: Path, repeats: int, batch: int) -> Result | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None
    f = work / "corpus.parquet"
    k = c.topk_ids.shape[1]

    def write() -> None:
        ids = pa.FixedSizeListArray.from_arrays(pa.array(c.topk_ids.ravel().astype(np.int32)), k)
        lp = pa.FixedSizeListArray.from_arrays(
            pa.array(c.topk_logprobs.ravel().astype(np.float16)), k
        )
        seq = np.repeat(np.arange(len(c.lengths), dtype=np.int32), c.lengths)
        table = pa.table(
            {
                "sequence": seq,
                "input_id": c.input_ids.astype(np.int32),
                "topk_ids": ids,
                "topk_logprobs": lp,
            }
        )
        pq.write_table(table, f, compression="zstd")

    def read() -> tuple[np.ndarray, np.ndarray]:
        t = pq.read_table(f)
        ids = t.column("topk_ids").combine_chunks().flatten().to_numpy().reshape(-1, k)
        lp = t.column("topk_logprobs").combine_chunks().flatten().to_numpy().reshape(-1, k)
        return ids, lp

    t_enc, _ = _best_of(write, repeats)
    t_dec, (ids, lp) = _best_of(read, repeats)
    assert np.array_equal(ids, c.topk_ids)
    return Result(
        "parquet zstd (int32 + float16)",
        f.stat().st_size / c.positions,
        c.positions / t_enc,
        c.positions / t_dec,
        _max_err(lp.astype(np.float32), c.topk_logprobs),
        *_kl_stats(lp.astype(np.float32), c.topk_logprobs),
    )


def bench_safetensors(c: Corpus, work: Path, repeats: int, batch: int) -> Result | None:
    try:
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file
    except ImportError:
        return None
    f = work / "corpus.safetensors"

    def write() -> None:
        save_file(
            {
                "lengths": c.lengths.astype(np.int32),
                "input_ids": c.input_ids.astype(np.int32),
                "topk_ids": c.topk_ids.astype(np.int32),
                "topk_logprobs": c.topk_logprobs.astype(np.float16),
            },
            str(f),
        )

    def read() -> dict[str, np.ndarray]:
        return load_file(str(f))

    def read_shuffled() -> int:
        # Slices of the memory-mapped file, each batch's sequences back to back.
        offs = c.offsets
        with safe_open(str(f), framework="numpy") as h:
            ids_s, lp_s = h.get_slice("topk_ids"), h.get_slice("topk_logprobs")
            return _stream(
                (
                    np.concatenate([ids_s[offs[i] : offs[i + 1]] for i in b]),
                    np.concatenate([lp_s[offs[i] : offs[i + 1]] for i in b]),
                )
                for b in _shuffled_batches(len(c.lengths), batch)
            )

    t_enc, _ = _best_of(write, repeats)
    t_dec, out = _best_of(read, repeats)
    t_shuffled, _ = _best_of(read_shuffled, repeats)
    assert np.array_equal(out["topk_ids"], c.topk_ids)
    return Result(
        "safetensors int32 + float16",
        f.stat().st_size / c.positions,
        c.positions / t_enc,
        c.positions / t_dec,
        _max_err(out["topk_logprobs"].astype(np.float32), c.topk_logprobs),
        *_kl_stats(out["topk_logprobs"].astype(np.float32), c.topk_logprobs),
        shuffled_pos_s=c.positions / t_shuffled,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--positions", type=int, default=200_000)
    parser.add_argument(
        "--codecs", nargs="+", default=["abs:0.01", "kl:1e-4", "kl:1e-3", "lossless"]
    )
    parser.add_argument("--threads", type=int, default=1, help="logitcache threads")
    parser.add_argument("--batch", type=int, default=16, help="sequences per read_batch")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    lc.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}, logitcache {lc.__version__}, "
        f"logitcache threads {args.threads}"
    )
    all_results = {}
    for vocab in args.vocab:
        t = time.perf_counter()
        tc = generate(n_positions=args.positions, vocab_size=vocab, k=args.k, seed=0)
        c = Corpus(
            lengths=np.diff(tc.offsets),
            input_ids=tc.input_ids,
            topk_ids=tc.topk_ids,
            topk_logprobs=tc.topk_logprobs,
        )
        mass = float(np.exp(c.topk_logprobs.astype(np.float64)).sum(axis=1).mean())
        print(
            f"\nV = {vocab}, K = {args.k}: {c.positions:,} positions in {len(c.lengths)} "
            f"sequences (synthetic teacher, mean top-K mass {mass:.3f}; generated in "
            f"{time.perf_counter() - t:.0f} s)"
        )
        results: list[Result] = []
        with tempfile.TemporaryDirectory(prefix="logitcache-bench-") as tmp:
            work = Path(tmp)
            for codec in args.codecs:
                results.append(bench_logitcache(c, vocab, codec, work, args.repeats, args.batch))
            for fn in (bench_npy, bench_parquet, bench_safetensors):
                r = fn(c, work, args.repeats, args.batch)
                if r is not None:
                    results.append(r)
        best_baseline = min(
            r.bytes_per_token for r in results if not r.method.startswith("logitcache")
        )
        print(
            f"{'method':34} {'bytes/token':>11} {'vs best':>8} {'encode pos/s':>13} "
            f"{'decode pos/s':>13} {'packed pos/s':>13} {'shuffled pos/s':>14} "
            f"{'max abs err':>12} {'median KL':>9} "
            f"{'max KL':>9} {'KL inf':>7}"
        )
        for r in results:
            ratio = best_baseline / r.bytes_per_token
            shuffled = "n/a" if r.shuffled_pos_s is None else f"{r.shuffled_pos_s:,.0f}"
            print(
                f"{r.method:34} {r.bytes_per_token:11.1f} {ratio:7.2f}x "
                f"{r.encode_pos_s:13,.0f} {r.decode_pos_s:13,.0f} {r.packed_pos_s:13,.0f} "
                f"{shuffled:>14} "
                f"{r.max_abs_err:12.2e} "
                f"{r.median_kl:9.1e} {r.max_kl:9.1e} {100 * r.rest_lost:6.2f}%"
            )
        all_results[vocab] = [r.__dict__ for r in results]
    if args.json:
        args.json.write_text(json.dumps(all_results, indent=2))


if __name__ == "__main__":
    main()
