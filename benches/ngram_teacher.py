"""A real-text teacher for codec benchmarks: byte-level BPE + Kneser-Ney trigram + cache.

Text: the CPython standard library's own ``.py`` sources (always present, no download).
Files are split deterministically by a CRC32 of their relative path: 1 in
``HELDOUT_EVERY`` goes to the held-out set, the rest trains the tokenizer and the model.

Tokenizer: a byte-level BPE (``tokenizers``) with vocabulary ``vocab_size`` (32768) trained
on the training files, so ids 0..255 are bytes and later ids are merges in merge order (the
real id/frequency correlation of BPE vocabularies).

Model: an interpolated Kneser-Ney trigram (absolute discount ``D = 0.75`` at every order,
continuation counts for the lower orders, a unigram continuation law with add-1/2
smoothing so every token has positive probability), mixed with a document cache
(``P = (1 - lam) * P_KN + lam * P_cache``, ``P_cache`` = the frequencies of the previous
``cache_window`` tokens of the same file), as in classic cache language models: it makes
identifiers recur in the teacher rows the way induction heads make them recur in a
transformer's.  Every row is a normalized distribution over the whole vocabulary, computed
densely in float64, so the top-K log-probabilities and the tail mass are exact.

Output: :class:`synthetic.TeacherCorpus` of held-out sequences (``seq_len`` tokens each),
row ``t`` predicting ``input_ids[t + 1]``.  Tokenizer, counts and emitted corpora are cached
under ``$LOGITCACHE_BENCH_CACHE`` (default: ``<tempdir>/logitcache-bench``).

Run ``python benches/ngram_teacher.py`` to build the cache and print statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import TeacherCorpus

HELDOUT_EVERY = 20
DISCOUNT = 0.75
CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where the tokenizer, counts and corpora are cached."""
    root = os.environ.get("LOGITCACHE_BENCH_CACHE") or os.path.join(
        tempfile.gettempdir(), "logitcache-bench"
    )
    path = Path(root) / f"ngram-v{CACHE_VERSION}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the standard library's ``.py`` sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    train, held = [], []
    for p in files:
        rel = str(p.relative_to(root)).encode()
        (held if zlib.crc32(rel) % HELDOUT_EVERY == 0 else train).append(p)
    return train, held


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def load_tokenizer(vocab_size: int = 32768):
    """Train (or load from cache) the byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache_dir() / f"bpe{vocab_size}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    train, _ = stdlib_files()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator((_read(p) for p in train), trainer=trainer)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok


def _tokenize(tok, files: list[Path]) -> list[np.ndarray]:
    enc = tok.encode_batch([_read(p) for p in files])
    return [np.asarray(e.ids, dtype=np.int64) for e in enc]


class KneserNeyTrigram:
    """Interpolated Kneser-Ney trigram with dense float64 rows."""

    def __init__(self, docs: list[np.ndarray], vocab_size: int):
        v = self.v = vocab_size
        tri = np.concatenate([d[:-2] * v * v + d[1:-1] * v + d[2:] for d in docs if d.size > 2])
        tkeys, tcount = np.unique(tri, return_counts=True)
        # trigram level: context (u, v) -> continuations w with counts
        ctx = tkeys // v
        self.t_ctx, t_start = np.unique(ctx, return_index=True)
        self.t_ptr = np.append(t_start, tkeys.size)
        self.t_w = tkeys % v
        self.t_cnt = tcount.astype(np.float64)
        ctx_total = np.add.reduceat(self.t_cnt, t_start)
        ctx_types = np.diff(self.t_ptr).astype(np.float64)
        self.t_total = ctx_total
        self.t_gamma = DISCOUNT * ctx_types / ctx_total
        # bigram level with continuation counts N1+(. v w) = number of distinct u
        vw = tkeys % (v * v)
        bkeys, bcont = np.unique(vw, return_counts=True)
        bctx = bkeys // v
        self.b_ctx, b_start = np.unique(bctx, return_index=True)
        self.b_ptr = np.append(b_start, bkeys.size)
        self.b_w = bkeys % v
        self.b_cnt = bcont.astype(np.float64)
        b_total = np.add.reduceat(self.b_cnt, b_start)
        self.b_total = b_total
        self.b_gamma = DISCOUNT * np.diff(self.b_ptr) / b_total
        # unigram continuation counts N1+(. w) = number of distinct v before w
        uni = np.bincount(bkeys % v, minlength=v).astype(np.float64)
        self.p1 = (uni + 0.5) / (uni.sum() + 0.5 * v)

    def rows(self, u: np.ndarray, w_prev: np.ndarray) -> np.ndarray:
        """Dense rows ``P(. | u, w_prev)`` (``u = -1``: no trigram context)."""
        v = self.v
        bi = np.searchsorted(self.b_ctx, w_prev)
        bi = np.minimum(bi, self.b_ctx.size - 1)
        has_b = self.b_ctx[bi] == w_prev
        key = np.where(u >= 0, u * v + w_prev, -1)
        ti = np.minimum(np.searchsorted(self.t_ctx, key), self.t_ctx.size - 1)
        has_t = (self.t_ctx[ti] == key) & (u >= 0)
        gamma_b = np.where(has_b, self.b_gamma[bi], 1.0)
        gamma_t = np.where(has_t, self.t_gamma[ti], 1.0)
        out = (gamma_t * gamma_b)[:, None] * self.p1[None, :]
        flat = out.reshape(-1)
        # bigram discounted continuation mass, scaled by the trigram back-off weight
        r, j = _segments(np.flatnonzero(has_b), self.b_ptr[bi[has_b]], self.b_ptr[bi[has_b] + 1])
        val = np.maximum(self.b_cnt[j] - DISCOUNT, 0.0) / self.b_total[bi[r]] * gamma_t[r]
        flat[r * v + self.b_w[j]] += val  # (row, w) pairs are unique per level
        r, j = _segments(np.flatnonzero(has_t), self.t_ptr[ti[has_t]], self.t_ptr[ti[has_t] + 1])
        val = np.maximum(self.t_cnt[j] - DISCOUNT, 0.0) / self.t_total[ti[r]]
        flat[r * v + self.t_w[j]] += val
        return out


def _segments(rows: np.ndarray, start: np.ndarray, stop: np.ndarray):
    """Flatten ``[start_i, stop_i)`` ranges: (row index per element, element index)."""
    lens = stop - start
    r = np.repeat(rows, lens)
    first = np.repeat(np.cumsum(lens) - lens, lens)
    j = np.repeat(start, lens) + (np.arange(lens.sum()) - first)
    return r, j


def _cache_mix(out: np.ndarray, doc: np.ndarray, t: np.ndarray, window: int, lam: float):
    """Mix in the document cache for rows at positions ``t`` of ``doc`` (in place)."""
    n, v = out.shape
    lo = np.maximum(t - window + 1, 0)
    have = t + 1 - lo
    out *= np.where(have > 0, 1.0 - lam, 1.0)[:, None]
    r, j = _segments(np.arange(n), lo, t + 1)
    np.add.at(out.reshape(-1), r * v + doc[j], lam / have[r])


def build_corpus(
    n_positions: int = 131072,
    k: int = 64,
    vocab_size: int = 32768,
    seq_len: int = 2048,
    cache_window: int = 512,
    cache_lambda: float = 0.08,
    batch: int = 256,
    verbose: bool = False,
) -> TeacherCorpus:
    """Held-out teacher rows (cached on disk after the first call)."""
    tag = json.dumps([n_positions, k, vocab_size, seq_len, cache_window, cache_lambda, DISCOUNT])
    name = hashlib.sha1(tag.encode()).hexdigest()[:12]
    path = cache_dir() / f"corpus-{name}.npz"
    if path.exists():
        z = np.load(path)
        return TeacherCorpus(
            offsets=z["offsets"],
            input_ids=z["input_ids"],
            topk_ids=z["topk_ids"],
            topk_logprobs=z["topk_logprobs"],
            vocab_size=vocab_size,
            source="ngram(stdlib,KN3+cache)",
            next_ids=z["next_ids"],
        )
    t0 = time.time()
    tok = load_tokenizer(vocab_size)
    train, held = stdlib_files()
    train_docs = _tokenize(tok, train)
    held_docs = [d for d in _tokenize(tok, held) if d.size > 16]
    if verbose:
        ntr = sum(d.size for d in train_docs)
        print(f"tokenizer+tokenize {time.time() - t0:.1f}s; train tokens {ntr}", flush=True)
    model = KneserNeyTrigram(train_docs, vocab_size)
    if verbose:
        print(f"counts {time.time() - t0:.1f}s", flush=True)
    offsets = [0]
    inputs, nexts, ids_out, lp_out = [], [], [], []
    total = 0
    for doc in held_docs:
        if total >= n_positions:
            break
        for a in range(0, doc.size - 1, seq_len):
            b = min(a + seq_len, doc.size - 1, a + n_positions - total)
            if b <= a:
                break
            t = np.arange(a, b)
            for c in range(0, t.size, batch):
                tb = t[c : c + batch]
                u = np.where(tb >= 1, doc[np.maximum(tb - 1, 0)], -1)
                rows = model.rows(u, doc[tb])
                _cache_mix(rows, doc, tb, cache_window, cache_lambda)
                part = np.argpartition(-rows, k - 1, axis=1)[:, :k]
                pv = np.take_along_axis(rows, part, axis=1)
                o = np.argsort(-pv, axis=1, kind="stable")
                ids_out.append(np.take_along_axis(part, o, axis=1).astype(np.int32))
                lp_out.append(np.log(np.take_along_axis(pv, o, axis=1)).astype(np.float32))
            inputs.append(doc[a:b])
            nexts.append(doc[a + 1 : b + 1])
            total += b - a
            offsets.append(total)
    corpus = TeacherCorpus(
        offsets=np.asarray(offsets, dtype=np.int64),
        input_ids=np.concatenate(inputs).astype(np.int32),
        topk_ids=np.concatenate(ids_out),
        topk_logprobs=np.concatenate(lp_out),
        vocab_size=vocab_size,
        source="ngram(stdlib,KN3+cache)",
        next_ids=np.concatenate(nexts).astype(np.int32),
    )
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        offsets=corpus.offsets,
        input_ids=corpus.input_ids,
        topk_ids=corpus.topk_ids,
        topk_logprobs=corpus.topk_logprobs,
        next_ids=corpus.next_ids,
    )
    tmp.replace(path)
    if verbose:
        print(f"corpus {corpus.n_positions} positions in {time.time() - t0:.1f}s", flush=True)
    return corpus


if __name__ == "__main__":
    c = build_corpus(verbose=True)
    p = np.exp(c.topk_logprobs.astype(np.float64))
    print("p1 quantiles", np.quantile(p[:, 0], [0.1, 0.25, 0.5, 0.75, 0.9]).round(3))
    print("tail mass mean", (1 - p.sum(1)).mean())
    print("top-1 accuracy", (c.topk_ids[:, 0] == c.next_ids).mean())
