"""Analytical gradients of the torch path agree with torch.autograd.gradcheck (float64
central differences), for every divergence, tail mode and target kind."""

from __future__ import annotations

import math

import pytest
import torch
from reference_losses import DIVERGENCES

from logitcache import losses

SEEDS = [0, 1]


def _student(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    z = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    return z.requires_grad_()


def _topk(
    gen: torch.Generator, lead: tuple[int, ...], v_t: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = torch.randn((*lead, v_t), generator=gen, dtype=torch.float64) * 2
    top = torch.log_softmax(teacher, dim=-1).topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_gradcheck(divergence: str, tail: str, reduction: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    v_t, v_s, k = 6, 8, 3  # padded student vocabulary: two extra entries
    z = _student(gen, (2, 3, v_s))
    ids, logprobs = _topk(gen, (2, 3), v_t, k)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    temperature = 1.0 if tail == "bucket" else 1.7
    with torch.no_grad():  # a masked vocabulary entry outside the teacher's ids
        z[0, 0, v_s - 1] = -math.inf

    def loss(z: torch.Tensor) -> torch.Tensor:
        return losses.sparse_kd_loss(
            z,
            ids,
            logprobs,
            divergence=divergence,
            tail=tail,
            temperature=temperature,
            teacher_temperature=1.0 if tail == "bucket" else 0.8,
            beta=0.3,
            alpha=0.2,
            mask=mask,
            reduction=reduction,
            backend="torch",
        )

    assert torch.autograd.gradcheck(loss, (z,))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_logprobs", [True, False])
def test_sampled_gradcheck(with_logprobs: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = _student(gen, (4, 7))
    ids = torch.tensor([[0, 3, -1], [5, 2, 6], [1, -1, -1], [4, 6, 2]])
    counts = torch.tensor([[2, 1, 0], [1, 1, 3], [5, 0, 0], [1, 2, 4]])
    logprobs = torch.log_softmax(torch.randn(4, 7, generator=gen, dtype=torch.float64), -1)
    logprobs = logprobs.gather(1, ids.clamp_min(0)) if with_logprobs else None
    labels = torch.tensor([1, 1, -100, 2])

    def loss(z: torch.Tensor) -> torch.Tensor:
        return losses.sampled_kd_loss(
            z,
            ids,
            counts,
            logprobs,
            temperature=1.5,
            teacher_temperature=1.5,
            labels=labels,
            reduction="none",
            backend="torch",
        )

    assert torch.autograd.gradcheck(loss, (z,))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dense_gradcheck(divergence: str, reduction: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = _student(gen, (3, 7))
    teacher = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 2
    teacher[1, 2] = -math.inf
    with torch.no_grad():
        z[1, 2] = -math.inf  # masked on both sides

    def loss(z: torch.Tensor) -> torch.Tensor:
        return losses.kd_loss(
            z,
            teacher,
            divergence=divergence,
            temperature=0.8,
            beta=0.3,
            alpha=0.2,
            reduction=reduction,
            backend="torch",
        )

    # gradcheck runs backward several times on one graph: this also covers the recompute
    # path the dense backward takes after its first call.
    assert torch.autograd.gradcheck(loss, (z,))


@pytest.mark.parametrize("kind", ["topk", "sampled", "dense"])
def test_kd_loss_module_gradcheck(kind: str) -> None:
    gen = torch.Generator().manual_seed(5)
    z = _student(gen, (2, 3, 6))
    labels = torch.tensor([[1, -100, 4], [0, 2, 5]])
    if kind == "topk":
        ids, logprobs = _topk(gen, (2, 3), 6, 2)
        batch = {"topk_ids": ids, "topk_logprobs": logprobs}
    elif kind == "sampled":
        batch = {
            "sampled_ids": torch.tensor([[[0, 1], [2, -1], [3, 4]], [[5, -1], [1, 2], [0, 3]]]),
            "sampled_counts": torch.tensor([[[1, 2], [3, 0], [1, 1]], [[2, 0], [1, 4], [2, 2]]]),
        }
    else:
        batch = {"teacher_logits": torch.randn(2, 3, 6, generator=gen, dtype=torch.float64)}
    loss_fn = losses.KDLoss(
        temperature=2.0, teacher_temperature=2.0, kd_weight=0.3, backend="torch"
    )

    assert torch.autograd.gradcheck(lambda z: loss_fn(z, {**batch, "labels": labels}), (z,))
