"""Every divergence, tail mode and reduction agrees with the float64 reference
(tests/reference_losses.py), in value and gradient, on every backend and student dtype.

Tolerances are set and justified in losses_support.tolerances.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from losses_support import (
    BACKEND_DTYPES,
    REDUCTION_CHOICES,
    Case,
    dense_cases,
    reference,
    run_api,
    sampled_cases,
    tolerances,
    topk_cases,
    tvd_near_tie,
)
from reference_losses import DIVERGENCES

from logitcache import losses

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _normalizer(reduction: str) -> float | None:
    return 2.5 if reduction == "normalizer" else None


def _compare(
    ours: tuple[torch.Tensor, torch.Tensor],
    ref: tuple[torch.Tensor, torch.Tensor],
    dtype: torch.dtype,
    *,
    check_grad: bool = True,
) -> None:
    tol = tolerances(dtype)
    value, grad = ours
    ref_value, ref_grad = ref
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(
        value.double(), ref_value, atol=tol["value_atol"], rtol=tol["value_rtol"]
    )
    assert grad.dtype == dtype
    assert not grad.isnan().any()
    if check_grad:
        torch.testing.assert_close(
            grad.double(), ref_grad, atol=tol["grad_atol"], rtol=tol["grad_rtol"]
        )


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@SETTINGS
@given(data=st.data(), reduction=st.sampled_from(REDUCTION_CHOICES))
def test_sparse_matches_reference(
    backend: str,
    dtype: torch.dtype,
    tail: str,
    divergence: str,
    data: st.DataObject,
    reduction: str,
) -> None:
    case: Case = data.draw(topk_cases(tail=tail))
    z = case.z.to(dtype)
    options = {
        "divergence": divergence,
        "tail": tail,
        "temperature": case.temperature,
        "teacher_temperature": case.teacher_temperature,
        "beta": 0.3,
        "alpha": 0.2,
    }
    ref = reference(
        case, "topk", z, reduction=reduction, normalizer=_normalizer(reduction), **options
    )
    ours = run_api(
        losses.sparse_kd_loss,
        case,
        z,
        (case.teacher["ids"], case.teacher["logprobs"]),
        reduction=reduction,
        normalizer=_normalizer(reduction),
        backend=backend,
        **options,
    )
    check_grad = divergence != "tvd" or not tvd_near_tie(case, "topk", tail)
    _compare(ours, ref, dtype, check_grad=check_grad)


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@SETTINGS
@given(case=sampled_cases(), reduction=st.sampled_from(REDUCTION_CHOICES))
def test_sampled_matches_reference(
    backend: str, dtype: torch.dtype, case: Case, reduction: str
) -> None:
    z = case.z.to(dtype)
    ref = reference(
        case,
        "sampled",
        z,
        reduction=reduction,
        normalizer=_normalizer(reduction),
        temperature=case.temperature,
    )
    ours = run_api(
        losses.sampled_kd_loss,
        case,
        z,
        (case.teacher["ids"], case.teacher["counts"], case.teacher.get("logprobs")),
        reduction=reduction,
        normalizer=_normalizer(reduction),
        temperature=case.temperature,
        teacher_temperature=case.teacher_temperature,
        backend=backend,
    )
    _compare(ours, ref, dtype)


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@SETTINGS
@given(case=dense_cases(), reduction=st.sampled_from(REDUCTION_CHOICES))
def test_dense_matches_reference(
    backend: str, dtype: torch.dtype, divergence: str, case: Case, reduction: str
) -> None:
    z = case.z.to(dtype)
    options = {"divergence": divergence, "temperature": case.temperature, "beta": 0.3, "alpha": 0.2}
    ref = reference(
        case, "dense", z, reduction=reduction, normalizer=_normalizer(reduction), **options
    )
    teacher = case.teacher["logits"]
    teacher = teacher if dtype == torch.float64 else teacher.float()
    ours = run_api(
        losses.kd_loss,
        case,
        z,
        (teacher,),
        reduction=reduction,
        normalizer=_normalizer(reduction),
        backend=backend,
        **options,
    )
    check_grad = divergence != "tvd" or not tvd_near_tie(case, "dense", "bucket")
    _compare(ours, ref, dtype, check_grad=check_grad)


@pytest.mark.parametrize("kind", ["bucket", "renormalize", "sampled", "dense"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_many_small_chunks_match_one_chunk(kind: str, data: st.DataObject) -> None:
    """Chunk boundaries change nothing: a one-element chunk budget (one row per chunk) gives
    the values and gradients of the default budget (one chunk). float64, because vectorized
    kernels may order a row's sum differently for different chunk shapes (ulp-level)."""
    if kind == "sampled":
        case = data.draw(sampled_cases())
        args: tuple = (case.teacher["ids"], case.teacher["counts"], case.teacher.get("logprobs"))
        fn, options = (
            losses.sampled_kd_loss,
            {
                "temperature": case.temperature,
                "teacher_temperature": case.teacher_temperature,
            },
        )
    elif kind == "dense":
        case = data.draw(dense_cases())
        args = (case.teacher["logits"],)
        fn, options = losses.kd_loss, {"temperature": case.temperature, "divergence": "jsd"}
    else:
        case = data.draw(topk_cases(tail=kind))
        args = (case.teacher["ids"], case.teacher["logprobs"])
        fn, options = (
            losses.sparse_kd_loss,
            {
                "tail": kind,
                "divergence": "jeffreys",
                "temperature": case.temperature,
                "teacher_temperature": case.teacher_temperature,
            },
        )
    assume(case.z.dim() > 1 and case.z.shape[0] > 1)
    z = case.z
    whole = run_api(
        fn, case, z, args, reduction="none", normalizer=None, backend="torch", **options
    )
    with mock.patch.object(losses, "_CHUNK_ELEMENTS_CPU", 1):
        chunked = run_api(
            fn, case, z, args, reduction="none", normalizer=None, backend="torch", **options
        )
    torch.testing.assert_close(chunked, whole, atol=1e-13, rtol=1e-12)
