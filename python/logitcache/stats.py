"""What a store's targets look like, and whether they line up with its input tokens.

A teacher capture can go wrong without an error anywhere: row ``t`` of a causal LM's
output predicts token ``t + 1``, and a capture that stores ``logits[1:]`` against
``input_ids[:-1]`` (or shifts twice) trains the student on the wrong targets; so does one
whose input ids come from another tokenizer than the teacher's. A calibrated teacher's
top-1 id equals the next input token far more often than the current one or the one after
next, so comparing the three exposes a shift; and its top-K holds the next token in most
rows, so targets that rarely do are not predictions of these inputs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from logitcache.store import Store, open_store

#: Offsets between a target row and the input token compared with it: 1 is what a row
#: should predict; 0 and 2 are what a capture shifted by one way or the other would match.
SHIFTS = (0, 1, 2)


def target_stats(
    store: Store | str | os.PathLike[str],
    *,
    max_samples: int | None = 1000,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Summarise the targets of up to ``max_samples`` samples of a store (a random subset,
    fixed by ``seed``; all of them with ``max_samples=None``).

    Returns a dict: ``samples`` and ``positions`` read; ``top1_probability`` (mean
    probability of the first target id: ``exp`` of its log-probability for top-K stores,
    its share of the draws for sampled ones); ``target_mass`` (mean probability of the K
    ids of a top-K row, so ``1 - target_mass`` is the mean tail; ``None`` for sampled
    stores);
    ``distinct_ids`` (mean ids per sampled row; ``None`` for top-K); ``agreement``, for
    each shift ``s`` in 0, 1, 2, the share of rows ``t`` (with ``t + s`` inside the record)
    whose first target id is ``input_ids[t + s]`` (``top1``) and whose ids include it
    (``in_targets``); and ``warning``, a sentence when the targets agree better with
    ``input_ids[t]`` or ``input_ids[t + 2]`` than with ``input_ids[t + 1]`` (a capture
    shifted by one: more than twice as often, and in more than 5% of rows), or when the
    next input token is among the targets in under 5% of at least 100 rows (inputs from
    another tokenizer than the teacher's, or targets that are not the teacher's), else
    ``None``. Statistics of an empty selection are ``None``.

    The first target id of a sampled row is its most drawn id (the first of equals). An id
    at log-probability -inf in a top-K row (probability 0: the filler of a row with fewer
    than K finite logits, or a value below the codec's range) is not a target.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive or None, got {max_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not isinstance(store, Store):
        store = open_store(store)
    ids = store.sample_ids()
    if max_samples is not None and len(ids) > max_samples:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=max_samples, replace=False))
    sampled = store.kind == "sampled"
    positions = 0
    top1_prob = 0.0
    mass = 0.0
    distinct = 0.0
    hits = {s: [0, 0, 0] for s in SHIFTS}  # rows compared, top-1 equal, in targets
    for start in range(0, len(ids), batch_size):
        b = store.read_packed(ids[start : start + batch_size])
        n = int(b.offsets[-1])
        if n == 0:
            continue
        positions += n
        rows = b.topk_ids.astype(np.int64)
        if sampled:
            counts = np.asarray(b.counts)
            first = rows[np.arange(n), np.argmax(counts, axis=1)]
            top1_prob += float((counts.max(axis=1) / store.k).sum())
            distinct += float((counts > 0).sum())
            present = counts > 0
            has_first = np.ones(n, dtype=bool)  # the most drawn id: a count of at least 1
        else:
            first = rows[:, 0]
            lp = np.asarray(b.topk_logprobs, dtype=np.float64)
            top1_prob += float(np.exp(lp[:, 0]).sum())
            mass += float(np.exp(lp).sum())
            # An id at -inf is no target: the filler of a row with fewer than K finite
            # logits, or a value below the codec's range.
            present = lp > -np.inf
            has_first = present[:, 0]
        end = np.repeat(b.offsets[1:], b.lengths)
        row = np.arange(n)
        tokens = b.input_ids.astype(np.int64)
        for s in SHIFTS:
            ok = row + s < end
            want = tokens[np.minimum(row + s, n - 1)][ok]
            hits[s][0] += int(ok.sum())
            hits[s][1] += int(((first[ok] == want) & has_first[ok]).sum())
            hits[s][2] += int(((rows[ok] == want[:, None]) & present[ok]).any(axis=1).sum())
    agreement = {
        s: {
            "rows": rows_s,
            "top1": top1 / rows_s if rows_s else None,
            "in_targets": within / rows_s if rows_s else None,
        }
        for s, (rows_s, top1, within) in hits.items()
    }
    return {
        "samples": len(ids),
        "positions": positions,
        "top1_probability": top1_prob / positions if positions else None,
        "target_mass": None if sampled or not positions else mass / positions,
        "distinct_ids": distinct / positions if sampled and positions else None,
        "agreement": agreement,
        "warning": _warning(agreement),
    }


#: Rows needed before unrelated targets are called out (a few rows prove nothing).
MIN_ROWS_UNRELATED = 100


def _warning(agreement: dict[int, dict[str, Any]]) -> str | None:
    """A sentence when the targets do not look like predictions of the next input token."""
    shifted = _shift_warning(agreement)
    if shifted is not None:
        return shifted
    nxt = agreement[1]
    if nxt["rows"] >= MIN_ROWS_UNRELATED and nxt["in_targets"] < 0.05:
        return (
            f"the next input token is among a row's targets in only {nxt['in_targets']:.1%} "
            "of rows (a trained teacher's top-K, or its draws, hold it in most rows): are the "
            "input ids "
            "from the teacher's tokenizer, and the targets the teacher's?"
        )
    return None


def _shift_warning(agreement: dict[int, dict[str, Any]]) -> str | None:
    """A sentence when another shift explains the targets better than the next token."""
    right = agreement[1]["top1"]
    if right is None:
        return None
    best = max(
        (s for s in SHIFTS if s != 1 and agreement[s]["top1"] is not None),
        key=lambda s: agreement[s]["top1"],
        default=None,
    )
    # Not evidence of a shift: a few percent of chance agreement (repeated tokens), nor a
    # teacher that predicts its most frequent token everywhere (an untrained one), which
    # matches every shift about as often. A shifted capture agrees many times better.
    if best is None or agreement[best]["top1"] <= max(2 * right, 0.05):
        return None
    which = "the token at the same position" if best == 0 else "the token two positions on"
    return (
        f"the targets' first ids match {which} ({agreement[best]['top1']:.1%} of rows) more "
        f"often than the next token ({right:.1%}): row t should hold the teacher's "
        f"prediction of input_ids[t + 1]; the capture looks shifted by one position"
    )
