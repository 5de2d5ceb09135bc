"""The README's recipe from a stored batch to the loss ("From a stored batch to the loss"):
on records of mixed lengths, a padded batch converted that way gives the loss of its records
taken one at a time, for top-K and sampled stores, at a capture temperature other than 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_store

import logitcache as lc

V = 300


def loss_batch(b: lc.Batch, kind: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The README's conversion, verbatim but for the sampled keys' branch."""
    input_ids = torch.from_numpy(b.input_ids).long()
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    positions = torch.arange(input_ids.shape[1])
    labels[positions >= torch.from_numpy(b.lengths)[:, None] - 1] = -100
    if kind == "topk":
        assert b.topk_logprobs is not None
        batch = {
            "labels": labels,
            "topk_ids": torch.from_numpy(b.topk_ids),
            "topk_logprobs": torch.from_numpy(b.topk_logprobs),
        }
    else:
        assert b.counts is not None
        batch = {
            "labels": labels,
            "sampled_ids": torch.from_numpy(b.topk_ids),
            "sampled_counts": torch.from_numpy(b.counts),
        }
    return input_ids, batch


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_a_padded_batch_gives_the_loss_of_its_records(tmp_path: Path, kind: str) -> None:
    lengths = {10: 7, 11: 1, 12: 12, 13: 4, 14: 9}
    write_store(
        tmp_path / "s",
        list(lengths),
        lengths.__getitem__,
        kind=kind,
        k=6,
        vocab=V,
        temperature=2.0,
        codec="lossless" if kind == "topk" else "none",
    )
    store = lc.open_store(tmp_path / "s")
    # The README's loss, with reduction="sum" to compare the batch with its records.
    T = store.temperature
    loss_fn = lc.KDLoss(temperature=T, teacher_temperature=T, reduction="sum")
    sids = list(lengths)
    b = store.read_batch(sids)
    gen = torch.Generator().manual_seed(0)
    student_logits = torch.randn((len(sids), int(b.lengths.max()), V), generator=gen)
    input_ids, batch = loss_batch(b, kind)
    padded = loss_fn(student_logits, batch)

    one_by_one = torch.zeros((), dtype=torch.float32)
    kept = 0
    for i, sid in enumerate(sids):
        r = store.read_batch([sid])
        _, single = loss_batch(r, kind)
        one_by_one = one_by_one + loss_fn(student_logits[i : i + 1, : lengths[sid]], single)
        kept += max(lengths[sid] - 1, 0)
    assert kept == int((batch["labels"] != -100).sum())
    assert torch.isfinite(padded) and float(padded) > 0
    torch.testing.assert_close(padded, one_by_one, rtol=1e-5, atol=1e-5)

    # The recipe the quickstart example had: only the padding masked, so the last real
    # position of a shorter record took the padding id 0 as its label.
    naive = batch["labels"].clone()
    naive[:, :-1] = input_ids[:, 1:]
    naive[~torch.from_numpy(b.mask)] = -100
    wrong = loss_fn(student_logits, {**batch, "labels": naive})
    assert not torch.allclose(wrong, one_by_one, rtol=1e-3)
    assert b.lengths.tolist() == [lengths[s] for s in sids]
