"""Every bad input raises ValueError naming the offending argument; none gives a number."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from losses_support import BACKENDS

from logitcache import losses

V = 8


def _z(*lead: int, vocab: int = V) -> torch.Tensor:
    return torch.randn((*lead, vocab), generator=torch.Generator().manual_seed(0))


def _topk(*lead: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn((*lead, V), generator=torch.Generator().manual_seed(1))
    top = torch.log_softmax(logits, -1).topk(k, -1)
    return top.indices, top.values


def _sampled(*lead: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([2, 5, -1]).expand((*lead, 3)).clone()
    counts = torch.tensor([3, 1, 0]).expand((*lead, 3)).clone()
    return ids, counts


# ---- shapes and dtypes ----------------------------------------------------------------------


def test_topk_ids_leading_shape_mismatch() -> None:
    ids, logprobs = _topk(2, 3)
    with pytest.raises(ValueError, match="topk_ids"):
        losses.sparse_kd_loss(_z(2, 4), ids, logprobs)


def test_topk_logprobs_shape_differs_from_ids() -> None:
    ids, logprobs = _topk(2, k=3)
    with pytest.raises(ValueError, match="topk_logprobs"):
        losses.sparse_kd_loss(_z(2), ids, logprobs[:, :2])


def test_labels_shape_mismatch() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="labels"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, labels=torch.zeros(3, dtype=torch.long))


def test_mask_shape_mismatch() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="mask"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, mask=torch.ones(2, 1, dtype=torch.bool))


def test_float_mask_is_rejected() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="mask"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, mask=torch.ones(2))


def test_float_labels_are_rejected() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="labels"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, labels=torch.zeros(2))


def test_sampled_counts_shape_differs_from_ids() -> None:
    ids, counts = _sampled(2)
    with pytest.raises(ValueError, match="counts"):
        losses.sampled_kd_loss(_z(2), ids, counts[:, :2])


def test_sampled_logprobs_shape_differs_from_ids() -> None:
    ids, counts = _sampled(2)
    with pytest.raises(ValueError, match="logprobs"):
        losses.sampled_kd_loss(_z(2), ids, counts, torch.zeros(2, 4))


def test_teacher_logits_leading_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.kd_loss(_z(2, 3), _z(3, 2))


def test_teacher_vocabulary_wider_than_student() -> None:
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.kd_loss(_z(2), _z(2, vocab=V + 1))


def test_float_topk_ids_are_rejected() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="topk_ids"):
        losses.sparse_kd_loss(_z(2), ids.float(), logprobs)


def test_integer_student_logits_are_rejected() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="student_logits"):
        losses.sparse_kd_loss(torch.zeros(2, V, dtype=torch.long), ids, logprobs)


def test_scalar_student_logits_are_rejected() -> None:
    with pytest.raises(ValueError, match="student_logits"):
        losses.kd_loss(torch.tensor(1.0), torch.tensor(1.0))


def test_teacher_on_another_device() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="topk_logprobs"):
        losses.sparse_kd_loss(_z(2), ids, logprobs.to("meta"))


# ---- ids --------------------------------------------------------------------------------


def test_topk_ids_beyond_student_vocabulary() -> None:
    ids, logprobs = _topk(2)
    ids[1, 0] = V
    with pytest.raises(ValueError, match=r"topk_ids.*\[0, 8\).*position 1"):
        losses.sparse_kd_loss(_z(2), ids, logprobs)


def test_negative_topk_ids() -> None:
    ids, logprobs = _topk(2)
    ids[0, 2] = -1
    with pytest.raises(ValueError, match="topk_ids"):
        losses.sparse_kd_loss(_z(2), ids, logprobs)


def test_repeated_topk_ids() -> None:
    ids, logprobs = _topk(2)
    ids[0, 1] = ids[0, 0]
    with pytest.raises(ValueError, match=r"topk_ids.*distinct") as e:
        losses.sparse_kd_loss(_z(2), ids, logprobs, tail="renormalize")
    assert "padding" not in str(e.value)
    # A padded batch's padding row (id 0 throughout, log-probability -inf) passed without a
    # mask: the message says what it looks like and how to leave it out.
    ids, logprobs = _topk(2)
    ids[1] = 0
    logprobs[1] = -math.inf
    with pytest.raises(
        ValueError, match=r"position 1\); a row of id 0 throughout is what a padded"
    ):
        losses.sparse_kd_loss(_z(2), ids, logprobs)
    mask = torch.tensor([True, False])
    assert torch.isfinite(losses.sparse_kd_loss(_z(2), ids, logprobs, mask=mask))


def test_sampled_ids_beyond_student_vocabulary() -> None:
    ids, counts = _sampled(2)
    ids[0, 1] = V + 3
    with pytest.raises(ValueError, match="ids"):
        losses.sampled_kd_loss(_z(2), ids, counts)


def test_sampled_ids_below_padding_id() -> None:
    ids, counts = _sampled(2)
    ids[0, 0] = -2  # an entry with a count (count 0 entries are ignored whatever their id)
    with pytest.raises(ValueError, match=r"ids.*-1"):
        losses.sampled_kd_loss(_z(2), ids, counts)


def test_sampled_padding_id_with_a_count() -> None:
    ids, counts = _sampled(2)
    counts[1, 2] = 1
    with pytest.raises(ValueError, match=r"ids.*padding"):
        losses.sampled_kd_loss(_z(2), ids, counts)


def test_repeated_sampled_ids() -> None:
    ids, counts = _sampled(2)
    ids[0, 1] = ids[0, 0]
    with pytest.raises(ValueError, match=r"ids.*distinct"):
        losses.sampled_kd_loss(_z(2), ids, counts)


def test_negative_sampled_counts() -> None:
    ids, counts = _sampled(2)
    counts[0, 0] = -1
    with pytest.raises(ValueError, match="counts"):
        losses.sampled_kd_loss(_z(2), ids, counts)


def test_kept_sampled_row_without_draws() -> None:
    ids, counts = _sampled(2)
    counts[1] = 0
    with pytest.raises(ValueError, match=r"counts.*sum to 0"):
        losses.sampled_kd_loss(_z(2), ids, counts)


# ---- non-finite values --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bucket", "renormalize", "sampled", "dense"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_student_logits(kind: str, bad: float, backend: str) -> None:
    z = _z(3)
    ids, logprobs = _topk(3)
    z[1, ids[1, 0]] = bad  # at a teacher id, so that every tail reads it
    with pytest.raises(ValueError, match="student_logits"):
        if kind == "dense":
            losses.kd_loss(z, _z(3), backend=backend)
        elif kind == "sampled":
            losses.sampled_kd_loss(z, ids, torch.ones_like(ids), backend=backend)
        else:
            losses.sparse_kd_loss(z, ids, logprobs, tail=kind, backend=backend)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_renormalize_reads_only_the_target_ids(bad: float) -> None:
    """renormalize is O(K) per row: a NaN or +inf outside S is not looked for, on either
    backend (the Rust kernel scanned the whole row and refused it, the torch path did not),
    and the value and gradient are those of the clean row."""
    ids, logprobs = _topk(3)
    clean = _z(3)
    outside = int(next(v for v in range(V) if v not in ids[1].tolist()))
    values = {}
    for backend in BACKENDS:
        for name, z in (("clean", clean.clone()), ("bad", clean.clone())):
            if name == "bad":
                z[1, outside] = bad
            z.requires_grad_(True)
            loss = losses.sparse_kd_loss(z, ids, logprobs, tail="renormalize", backend=backend)
            loss.backward()
            assert z.grad is not None
            values[backend, name] = (loss.detach(), z.grad)
        assert torch.equal(values[backend, "bad"][0], values[backend, "clean"][0]), backend
        assert torch.equal(values[backend, "bad"][1], values[backend, "clean"][1]), backend
    torch.testing.assert_close(
        values[BACKENDS[0], "bad"][0], values[BACKENDS[-1], "bad"][0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bucket", "sampled", "dense"])
def test_student_row_all_neg_inf(kind: str, backend: str) -> None:
    z = _z(3)
    z[2] = -math.inf
    ids, logprobs = _topk(3)
    with pytest.raises(ValueError, match="student_logits"):
        if kind == "dense":
            losses.kd_loss(z, _z(3), backend=backend)
        elif kind == "sampled":
            losses.sampled_kd_loss(z, ids, torch.ones_like(ids), backend=backend)
        else:
            losses.sparse_kd_loss(z, ids, logprobs, backend=backend)


def test_student_neg_inf_at_every_teacher_id_with_renormalize() -> None:
    z = _z(2)
    ids, logprobs = _topk(2)
    z[0] = z[0].scatter(0, ids[0], -math.inf)
    with pytest.raises(ValueError, match=r"student_logits.*-inf"):
        losses.sparse_kd_loss(z, ids, logprobs, tail="renormalize")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_teacher_logits(bad: float) -> None:
    teacher = _z(3)
    teacher[2, 4] = bad
    with pytest.raises(ValueError, match="teacher_logits"):
        losses.kd_loss(_z(3), teacher, divergence="reverse_kl")


def test_teacher_logits_row_all_neg_inf() -> None:
    teacher = _z(3)
    teacher[0] = -math.inf
    with pytest.raises(ValueError, match=r"teacher_logits.*-inf"):
        losses.kd_loss(_z(3), teacher)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_topk_logprobs(bad: float) -> None:
    ids, logprobs = _topk(2)
    logprobs[1, 1] = bad
    with pytest.raises(ValueError, match="topk_logprobs"):
        losses.sparse_kd_loss(_z(2), ids, logprobs)


def test_topk_logprobs_all_neg_inf_with_renormalize() -> None:
    ids, logprobs = _topk(2)
    logprobs[0] = -math.inf
    with pytest.raises(ValueError, match="topk_logprobs"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, tail="renormalize")


def test_topk_logits_passed_as_logprobs() -> None:
    ids, _ = _topk(2)
    raw_logits = torch.full(ids.shape, 3.0)
    with pytest.raises(ValueError, match=r"topk_logprobs.*not logits"):
        losses.sparse_kd_loss(_z(2), ids, raw_logits)


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_non_finite_sampled_logprobs(bad: float) -> None:
    ids, counts = _sampled(2)
    logprobs = torch.tensor([-1.0, -2.0, 0.0]).expand(2, 3).clone()
    logprobs[0, 1] = bad
    with pytest.raises(ValueError, match="logprobs"):
        losses.sampled_kd_loss(_z(2), ids, counts, logprobs)


def test_sampled_logits_passed_as_logprobs() -> None:
    ids, counts = _sampled(2)
    with pytest.raises(ValueError, match=r"logprobs.*not logits"):
        losses.sampled_kd_loss(_z(2), ids, counts, torch.full((2, 3), 2.0))


# ---- parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 1.5, math.nan])
def test_beta_outside_open_unit_interval(beta: float) -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="beta"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, divergence="jsd", beta=beta)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 2.0])
def test_alpha_outside_open_unit_interval(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        losses.kd_loss(_z(2), _z(2), divergence="skew_forward_kl", alpha=alpha)


def test_bucket_temperature_needs_missing_tail_mass() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match=r"temperature.*tail mass|temperature.*outside"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, temperature=2.0, teacher_temperature=1.0)


def test_sampled_temperature_differs_from_capture() -> None:
    ids, counts = _sampled(2)
    with pytest.raises(ValueError, match="temperature"):
        losses.sampled_kd_loss(_z(2), ids, counts, temperature=0.5)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_temperature_not_positive_finite(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        losses.kd_loss(_z(2), _z(2), temperature=temperature)


def test_teacher_temperature_not_positive() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="teacher_temperature"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, teacher_temperature=0.0)


def test_unknown_divergence() -> None:
    with pytest.raises(ValueError, match=r"divergence.*'kl'"):
        losses.kd_loss(_z(2), _z(2), divergence="kl")


def test_unknown_tail() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="tail"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, tail="dense")


def test_unknown_reduction() -> None:
    ids, counts = _sampled(2)
    with pytest.raises(ValueError, match="reduction"):
        losses.sampled_kd_loss(_z(2), ids, counts, reduction="batchmean")


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        losses.kd_loss(_z(2), _z(2), backend="cuda")


@pytest.mark.parametrize("normalizer", [0, -2.0, math.nan, math.inf, torch.tensor(0.0)])
def test_normalizer_not_positive_finite(normalizer: object) -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="normalizer"):
        losses.sparse_kd_loss(_z(2), ids, logprobs, normalizer=normalizer)  # type: ignore[arg-type]


def test_normalizer_tensor_not_zero_dim() -> None:
    with pytest.raises(ValueError, match="normalizer"):
        losses.kd_loss(_z(2), _z(2), normalizer=torch.tensor([2.0]))


def test_normalizer_with_reduction_none() -> None:
    with pytest.raises(ValueError, match="normalizer"):
        losses.kd_loss(_z(2), _z(2), reduction="none", normalizer=3.0)


def test_rust_backend_requested_but_unavailable() -> None:
    with (
        mock.patch.object(losses, "_rust_kernels", return_value=(None, "not built")),
        pytest.raises(ValueError, match=r"backend='rust'.*not built"),
    ):
        losses.kd_loss(_z(2), _z(2), backend="rust")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_rust_backend_rejects_dtypes_it_does_not_take(dtype: torch.dtype) -> None:
    kernels = mock.Mock()  # stands in for the Rust module: it must never be called
    with (
        mock.patch.object(losses, "_rust_kernels", return_value=(kernels, "")),
        pytest.raises(ValueError, match="backend"),
    ):
        losses.kd_loss(_z(2).to(dtype), _z(2), backend="rust")
    kernels.rust_dense_kd.assert_not_called()


# ---- KDLoss and token_metrics ---------------------------------------------------------------


def test_kd_loss_module_needs_labels_below_full_kd_weight() -> None:
    ids, logprobs = _topk(2)
    with pytest.raises(ValueError, match="labels"):
        losses.KDLoss(kd_weight=0.5)(_z(2), {"topk_ids": ids, "topk_logprobs": logprobs})


@pytest.mark.parametrize("kd_weight", [-0.1, 1.5, math.nan])
def test_kd_weight_outside_unit_interval(kd_weight: float) -> None:
    with pytest.raises(ValueError, match="kd_weight"):
        losses.KDLoss(kd_weight=kd_weight)


def test_kd_loss_module_validates_configuration_early() -> None:
    with pytest.raises(ValueError, match="divergence"):
        losses.KDLoss(divergence="kl")


def test_batch_without_teacher_target() -> None:
    with pytest.raises(ValueError, match=r"batch.*exactly one teacher target"):
        losses.KDLoss(kd_weight=1.0)(_z(2), {"input_ids": torch.zeros(2)})


def test_batch_with_two_teacher_targets() -> None:
    ids, logprobs = _topk(2)
    batch = {"topk_ids": ids, "topk_logprobs": logprobs, "teacher_logits": _z(2)}
    with pytest.raises(ValueError, match=r"batch.*exactly one"):
        losses.KDLoss(kd_weight=1.0)(_z(2), batch)


def test_batch_with_half_a_teacher_target() -> None:
    ids, _ = _topk(2)
    with pytest.raises(ValueError, match="topk_logprobs"):
        losses.KDLoss(kd_weight=1.0)(_z(2), {"topk_ids": ids})


def test_sampled_batch_with_a_divergence_other_than_forward_kl() -> None:
    ids, counts = _sampled(2)
    with pytest.raises(ValueError, match="divergence"):
        losses.KDLoss(divergence="jsd", kd_weight=1.0)(
            _z(2), {"sampled_ids": ids, "sampled_counts": counts}
        )


def test_cross_entropy_labels_beyond_student_vocabulary() -> None:
    ids, logprobs = _topk(2)
    batch = {"topk_ids": ids, "topk_logprobs": logprobs, "labels": torch.tensor([1, V])}
    with pytest.raises(ValueError, match="labels"):
        losses.KDLoss()(_z(2), batch)


def test_token_metrics_sampled_without_logprobs() -> None:
    ids, counts = _sampled(2)
    with pytest.raises(ValueError, match="sampled_logprobs"):
        losses.token_metrics(_z(2), sampled_ids=ids, sampled_counts=counts)
