"""Write the fuzz targets' seed corpus from real stores made with the public Python API.

    .venv/bin/python fuzz/make_corpus.py [OUT]      (OUT defaults to fuzz/corpus-raw)

Stores: top-K with each codec (lossless, abs:1e-2, kl:1e-4) and sampled with and without
log-probabilities, small (a few chunks, a few KB a shard) so that the fuzzer runs fast. Rows
include -inf tails, levels that need escape codes, and ids whose ranks need two bytes.

Every corpus file starts with the targets' flag byte (rust/core/src/fuzz_targets.rs): each
input is written once with the "repair checksums" flag (1), so that mutations reach the
decoder, and the shards and manifests once more without it (0).

  OUT/shard_decoder/  flag + a whole shard file
  OUT/footer_index/   flag + u64 LE file offset of the footer + the shard's bytes from there
  OUT/manifest/       flag + manifest.json

`cargo fuzz cmin` then keeps the inputs that add coverage (see fuzz/README.md).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import struct
import sys
import tempfile

import numpy as np

import logitcache as lc

VOCAB = 600
K = 8
N_DRAWS = 16


def _topk_rows(rng: np.random.Generator, length: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.normal(0.0, 4.0, size=(length, VOCAB))
    logits -= logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits).sum(axis=1, keepdims=True))
    lp = logits - lse
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    vals = np.take_along_axis(lp, ids, axis=1).astype(np.float32)
    # A few rows end in -inf (the finite-counts stream) or reach far into the tail
    # (escape codes of large levels).
    vals[1::7, k - 1] = -60.0
    vals[::5, k - 2 :] = -np.inf
    return ids.astype(np.int64), vals


def _sampled_rows(
    rng: np.random.Generator, length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.full((length, N_DRAWS), -1, dtype=np.int64)
    counts = np.zeros((length, N_DRAWS), dtype=np.int64)
    lps = np.full((length, N_DRAWS), -np.inf, dtype=np.float32)
    for t in range(length):
        p = rng.dirichlet(np.full(VOCAB, 0.05))
        draws = rng.choice(VOCAB, size=N_DRAWS, p=p)
        uniq, cnt = np.unique(draws, return_counts=True)
        ids[t, : len(uniq)] = uniq
        counts[t, : len(uniq)] = cnt
        lps[t, : len(uniq)] = np.log(np.maximum(p[uniq], 1e-30)).astype(np.float32)
    return ids, counts, lps


def write_stores(root: pathlib.Path) -> list[pathlib.Path]:
    """Write the seed stores under `root`; return their directories."""
    rng = np.random.default_rng(20240611)
    stores = []
    configs: list[tuple[str, str, str, bool]] = [
        ("topk-lossless", "topk", "lossless", True),
        ("topk-abs", "topk", "abs:1e-2", True),
        ("topk-kl", "topk", "kl:1e-4", True),
        ("sampled-lossless", "sampled", "lossless", True),
        ("sampled-abs", "sampled", "abs:1e-2", True),
        ("sampled-nolp", "sampled", "none", False),
    ]
    for name, kind, codec, with_lp in configs:
        path = root / name
        k = K if kind == "topk" else N_DRAWS
        with lc.StoreWriter(
            path,
            vocab_size=VOCAB,
            k=k,
            kind=kind,
            codec=codec,
            chunk_positions=24,
            teacher="fuzz-teacher",
            tokenizer="fuzz-tok",
            metadata={"seed": name},
        ) as w:
            for sid in range(6):
                length = int(rng.integers(0, 3)) if sid == 0 else int(rng.integers(4, 20))
                inp = rng.integers(0, VOCAB, size=length)
                if kind == "topk":
                    ids, lp = _topk_rows(rng, length, k)
                    w.add(sid * 7919 + 3, inp, ids, lp)
                else:
                    ids, counts, lps = _sampled_rows(rng, length)
                    w.add_sampled(sid * 7919 + 3, inp, ids, counts, lps if with_lp else None)
        stores.append(path)
    return stores


def footer_offset(shard: bytes) -> int:
    (offset,) = struct.unpack_from("<Q", shard, len(shard) - 32)
    return int(offset)


def write_corpus(out: pathlib.Path) -> dict[str, int]:
    """Write the corpus files under `out/<target>/`; return the file count per target."""
    dirs = {t: out / t for t in ("shard_decoder", "footer_index", "manifest")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for store in write_stores(pathlib.Path(tmp)):
            manifest = (store / "manifest.json").read_bytes()
            for flag in (1, 0):
                (dirs["manifest"] / f"{store.name}-{flag}").write_bytes(bytes([flag]) + manifest)
            for i, shard_path in enumerate(sorted((store / "shards").glob("*.lcs"))):
                shard = shard_path.read_bytes()
                stem = f"{store.name}-{i}"
                for flag in (1, 0):
                    (dirs["shard_decoder"] / f"{stem}-{flag}").write_bytes(bytes([flag]) + shard)
                off = footer_offset(shard)
                tail = bytes([1]) + struct.pack("<Q", off) + shard[off:]
                (dirs["footer_index"] / stem).write_bytes(tail)
    return {t: len(list(d.iterdir())) for t, d in dirs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(pathlib.Path(__file__).parent / "corpus-raw"))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    counts = write_corpus(out)
    for target, n in counts.items():
        size = sum(f.stat().st_size for f in (out / target).iterdir())
        print(f"{target}: {n} files, {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
