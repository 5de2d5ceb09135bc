"""Shared helpers: valid synthetic records and small stores."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest


def write_manifest(path: Any, body: dict[str, Any]) -> None:
    """Write ``body`` as the manifest of the store at ``path``, in its envelope with a valid
    CRC-32 (FORMAT.md section 2): for tests that edit a manifest."""
    import json
    import zlib
    from pathlib import Path

    text = json.dumps(body, separators=(",", ":")).encode()
    envelope = b'{"checksum":"crc32:%08x","manifest":%s}\n' % (zlib.crc32(text), text)
    (Path(path) / "manifest.json").write_bytes(envelope)


def make_undeletable(path: Any) -> None:
    """Put a directory where the file ``path`` is, so that deleting the name fails (unlink
    refuses a directory, even to root); a process that has the file open or mapped keeps
    reading it."""
    path.unlink()
    path.mkdir()


def progress_into_core(monkeypatch: pytest.MonkeyPatch, name: str, progress: Any) -> None:
    """Make ``logitcache._core.<name>`` run with ``progress`` as its progress callback,
    whatever the Python layer passes: a hook into the middle of a long operation."""
    import logitcache as lc

    real = getattr(lc._core, name)
    monkeypatch.setattr(
        lc._core, name, lambda *args, **kwargs: real(*args, **{**kwargs, "progress": progress})
    )


def make_topk(
    rng: np.random.Generator, length: int, k: int, vocab: int, *, scale: float = 3.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids [L], topk_ids [L, K], topk_logprobs [L, K] from a real softmax over a
    random logit vector per position (so log-probabilities are exact and sorted)."""
    input_ids = rng.integers(0, vocab, size=length, dtype=np.int64)
    logits = rng.normal(size=(length, vocab)) * scale
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    lp = np.take_along_axis(logp, order, axis=1).astype(np.float32)
    # float32 rounding may break the order by one ulp; the store needs it non-increasing.
    lp = np.minimum.accumulate(lp, axis=1)
    return input_ids, order.astype(np.int64), lp


def make_sampled(
    rng: np.random.Generator, length: int, n: int, vocab: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """input_ids [L], ids / counts / logprobs [L, M] (padded with -1 / 0 / 0) from n draws
    per position of a random softmax."""
    input_ids = rng.integers(0, vocab, size=length, dtype=np.int64)
    rows = []
    for _ in range(length):
        logits = rng.normal(size=vocab) * 2.0
        logp = logits - np.logaddexp.reduce(logits)
        draws = rng.choice(vocab, size=n, p=np.exp(logp))
        ids, counts = np.unique(draws, return_counts=True)
        rows.append((ids, counts, logp[ids].astype(np.float32)))
    m = max(len(r[0]) for r in rows) if rows else 1
    ids = np.full((length, m), -1, dtype=np.int64)
    counts = np.zeros((length, m), dtype=np.int64)
    lps = np.zeros((length, m), dtype=np.float32)
    for i, (a, c, lp) in enumerate(rows):
        ids[i, : len(a)] = a
        counts[i, : len(a)] = c
        lps[i, : len(a)] = lp
    return input_ids, ids, counts, lps


def write_store(
    path: Any,
    sample_ids: Iterable[int],
    length: Callable[[int], int],
    *,
    kind: str = "topk",
    k: int = 4,
    vocab: int = 300,
    seed: int = 0,
    **writer_options: Any,
) -> None:
    """A store of records from :func:`make_topk` / :func:`make_sampled` (one generator seeded
    with ``seed``, records in the order of ``sample_ids``, ``length(sample_id)`` positions
    each). ``writer_options`` go to :class:`StoreWriter`; sampled stores default to codec
    ``abs:0.01`` and keep log-probabilities unless the codec is ``none``."""
    import logitcache as lc

    rng = np.random.default_rng(seed)
    if kind == "sampled":
        writer_options.setdefault("codec", "abs:0.01")
    with lc.StoreWriter(path, vocab_size=vocab, k=k, kind=kind, **writer_options) as w:
        for sid in sample_ids:
            if kind == "topk":
                w.add(sid, *make_topk(rng, length(sid), k, vocab))
            else:
                inp, ids, counts, lps = make_sampled(rng, length(sid), k, vocab)
                keep = w.codec["logprobs"] != "none"
                w.add_sampled(sid, inp, ids, counts, lps if keep else None)


def store_contents(path: Any) -> dict[int, tuple[tuple[str, tuple[int, ...], bytes], ...]]:
    """Every record of the store at ``path`` as (dtype, shape, bytes) per array (input ids,
    target ids, log-probabilities, and counts for sampled stores): equal exactly when the
    stores read back the same, bit for bit."""
    import logitcache as lc

    store = lc.open_store(path)
    out = {}
    for sid in store.sample_ids():
        r = store[int(sid)]
        arrays = [r.input_ids, r.topk_ids, r.topk_logprobs]
        if store.kind == "sampled":
            arrays.append(r.counts)
        out[int(sid)] = tuple((a.dtype.str, a.shape, a.tobytes()) for a in map(np.asarray, arrays))
    return out


def store_files(path: Any) -> dict[str, bytes]:
    """Every file of the store directory at ``path`` (but the lock) and its bytes: equal before
    and after exactly when nothing in the store changed."""
    from pathlib import Path

    root = Path(path)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def position_kl(p_row: np.ndarray, q_row: np.ndarray) -> float:
    """KL between two top-K rows of log-probabilities, each with its rest bucket (1 - sum),
    in float64, as the ``kl`` codec bounds it (the generalized KL, which stays >= 0 when
    rounding makes a row's mass exceed 1)."""
    p, q = np.exp(p_row.astype(np.float64)), np.exp(q_row.astype(np.float64))
    pr, qr = max(0.0, 1 - p.sum()), max(0.0, 1 - q.sum())
    live = p > 0
    kl = float((p[live] * (np.log(p[live]) - np.log(q[live]))).sum())
    if pr > 0:
        kl += pr * np.log(pr / qr)
    return kl - (p.sum() + pr) + (q.sum() + qr)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
