"""The fused Rust loss kernels (logitcache._loss_kernels) against the float64 reference.

Tolerances. The kernels read float32 (or bfloat16) logits; the reference sees the same values
exactly in float64, so the only differences are the kernels' own roundings: ``z / T`` in
float32 (relative 6e-8, i.e. ~1e-6 absolute on a scaled logit of 16), exp within ~1 ulp and
ln within ~2 ulp (measured in the Rust tests), and float32 partial sums of at most 32 terms a
lane added into float64 totals. A per-row value is therefore within ~1e-5 absolute of the
reference (plus 2e-5 relative for large values), and a gradient entry (a difference of
probabilities over T, each at most 1/T <= 2 here) within ~1e-5 absolute plus 1e-4 relative.
bfloat16 gradients are rounded to 8 significant bits on output (relative error up to 2^-9),
hence a 4e-3 relative tolerance there; bfloat16 logits are compared with a reference fed the
same bfloat16 values, so inputs add no error.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_losses import DIVERGENCES, Dense, Sampled, TopK, reference_loss_row

import logitcache as lc
from logitcache._loss_kernels import (
    rust_dense_kd,
    rust_kernels_available,
    rust_sampled_kd,
    rust_sparse_kd,
)

DTYPES = (torch.float32, torch.bfloat16)
TAILS = ("bucket", "renormalize")
VALUE_ATOL, VALUE_RTOL = 1e-5, 2e-5
GRAD_ATOL = 1e-5
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 4e-3}
SETTINGS = settings(max_examples=12, deadline=None)


def test_kernels_are_available() -> None:
    assert rust_kernels_available()


def _reference(z_row: torch.Tensor, target, **kw) -> tuple[float, torch.Tensor]:
    """Reference value and its autograd gradient for one row."""
    z = z_row.to(torch.float64).detach().requires_grad_(True)
    value = reference_loss_row(z, target, **kw)
    if value.requires_grad and math.isfinite(value.item()):
        (grad,) = torch.autograd.grad(value, z)
    else:
        grad = torch.full_like(z, float("nan"))
    return value.item(), grad


def _check(
    what: str,
    values: torch.Tensor,
    grad: torch.Tensor,
    z: torch.Tensor,
    valid: torch.Tensor,
    target_of,
    **kw,
) -> None:
    assert values.dtype == torch.float32
    assert grad.dtype == z.dtype and grad.shape == z.shape
    assert torch.isfinite(grad).all(), f"{what}: non-finite gradient"
    for r in range(z.shape[0]):
        g = grad[r].double()
        if not valid[r]:
            assert values[r].item() == 0.0, f"{what}: invalid row {r}"
            assert (g == 0).all(), f"{what}: invalid row {r} gradient"
            continue
        want, want_g = _reference(z[r], target_of(r), **kw)
        got = values[r].item()
        if math.isinf(want):
            assert got == want, f"{what} row {r}: {got} vs {want}"
            continue
        assert abs(got - want) <= VALUE_ATOL + VALUE_RTOL * abs(want), (
            f"{what} row {r}: value {got} vs reference {want}"
        )
        masked = torch.isneginf(z[r])
        assert (g[masked] == 0).all(), f"{what} row {r}: masked logits must get 0"
        keep = ~masked & torch.isfinite(want_g)
        err = (g[keep] - want_g[keep]).abs()
        tol = GRAD_ATOL + GRAD_RTOL[z.dtype] * want_g[keep].abs()
        assert (err <= tol).all(), (
            f"{what} row {r}: gradient error {err.max().item():.3g} "
            f"(at {int(torch.argmax(err - tol))})"
        )


def _forward_backward(fn, z: torch.Tensor, *args, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = z.clone().requires_grad_(True)
    values = fn(leaf, *args, **kw)
    values.sum().backward()
    return values.detach(), leaf.grad


def _topk_case(seed: int, n: int, v_s: int, v_t: int, k: int, ties: bool, mask: bool):
    """Student logits [n, v_s]; teacher top-k ids (< v_t) by rank with their log-probs."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v_t, generator=g, dtype=torch.float64) * 3
    if ties:
        t = t.round()
    logp, ids = torch.log_softmax(t, -1).topk(k, -1)
    z = torch.randn(n, v_s, generator=g) * 4
    if mask:
        # Masked vocabulary outside the teacher's ids, keeping one complement entry finite.
        masked = torch.rand(n, v_s, generator=g) < 0.2
        masked.scatter_(1, ids, False)
        for r in range(n):
            rest = [i for i in range(v_s) if i not in set(ids[r].tolist())]
            if rest:
                masked[r, rest[0]] = False
        z = z.masked_fill(masked, float("-inf"))
    valid = torch.rand(n, generator=g) > 0.2
    ids = ids.clone()
    logp = logp.float()
    # Padding in invalid rows: out-of-range ids and NaN, which the kernel must not read.
    ids[~valid] = -7
    logp[~valid] = float("nan")
    return z, ids, logp, valid


shapes = st.tuples(
    st.integers(0, 2**31),  # seed
    st.integers(1, 4),  # rows
    st.integers(1, 48),  # teacher vocab
    st.integers(0, 8),  # student padding beyond the teacher vocab
    st.floats(0.0, 1.0),  # K as a fraction of the teacher vocab
    st.booleans(),  # ties
    st.booleans(),  # masked student logits
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@SETTINGS
@given(
    shape=shapes,
    temps=st.tuples(st.floats(0.5, 2.5), st.floats(0.5, 2.5), st.booleans()),
    params=st.tuples(st.floats(0.05, 0.95), st.floats(0.05, 0.95)),
)
def test_sparse_matches_reference(divergence, tail, dtype, shape, temps, params) -> None:
    seed, n, v_t, pad, k_frac, ties, mask = shape
    v_s = v_t + pad
    k = max(1, round(k_frac * v_t))
    z, ids, logp, valid = _topk_case(seed, n, v_s, v_t, k, ties, mask)
    z = z.to(dtype)
    t, tc, unit = temps
    if unit:
        t = tc = 1.0
    if tail == "bucket":
        tc = t
    beta, alpha = params
    kw = dict(
        divergence=divergence,
        tail=tail,
        temperature=t,
        teacher_temperature=tc,
        beta=beta,
        alpha=alpha,
    )
    values, grad = _forward_backward(rust_sparse_kd, z, ids, logp, valid, **kw)
    _check(
        f"{divergence}/{tail}/{dtype}",
        values,
        grad,
        z,
        valid,
        lambda r: TopK(ids[r], logp[r].double()),
        **kw,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("teacher_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@SETTINGS
@given(
    shape=shapes,
    t=st.floats(0.5, 2.5),
    params=st.tuples(st.floats(0.05, 0.95), st.floats(0.05, 0.95)),
)
def test_dense_matches_reference(divergence, dtype, teacher_dtype, shape, t, params) -> None:
    seed, n, v_t, pad, _, ties, mask = shape
    v_s = v_t + pad
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, v_t, generator=g) * 3
    if ties:
        teacher = teacher.round()
    z = torch.randn(n, v_s, generator=g) * 4
    if mask:
        # The same vocabulary mask for both; entry 0 stays so that no row is fully masked.
        masked = torch.rand(n, v_t, generator=g) < 0.2
        masked[:, 0] = False
        teacher = teacher.masked_fill(masked, float("-inf"))
        z[:, :v_t] = z[:, :v_t].masked_fill(masked, float("-inf"))
    valid = torch.rand(n, generator=g) > 0.2
    z, teacher = z.to(dtype), teacher.to(teacher_dtype)
    beta, alpha = params
    kw = dict(divergence=divergence, temperature=t, beta=beta, alpha=alpha)
    values, grad = _forward_backward(rust_dense_kd, z, teacher, valid, **kw)
    _check(
        f"dense {divergence}/{dtype}/{teacher_dtype}",
        values,
        grad,
        z,
        valid,
        lambda r: Dense(teacher[r].double()),
        **kw,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_logprobs", [True, False])
@SETTINGS
@given(shape=shapes, m=st.integers(1, 8), t=st.floats(0.5, 2.5))
def test_sampled_matches_reference(with_logprobs, dtype, shape, m, t) -> None:
    seed, n, v_t, pad, _, _, mask = shape
    v_s = v_t + pad
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v_s, generator=g) * 4
    ids = torch.full((n, m), -1, dtype=torch.int64)
    counts = torch.zeros(n, m, dtype=torch.int64)
    for r in range(n):
        drawn = torch.randperm(v_s, generator=g)[: min(m, v_s)]
        keep = torch.rand(len(drawn), generator=g) < 0.8
        keep[0] = True
        slots = torch.randperm(m, generator=g)[: len(drawn)]
        ids[r, slots[keep]] = drawn[keep]
        counts[r, slots[keep]] = torch.randint(1, 6, (int(keep.sum()),), generator=g)
        if mask:
            masked = torch.rand(v_s, generator=g) < 0.2
            masked[drawn[keep]] = False
            z[r] = z[r].masked_fill(masked, float("-inf"))
    logprobs = -torch.rand(n, m, generator=g) * 8 - 0.01 if with_logprobs else None
    valid = torch.rand(n, generator=g) > 0.2
    z = z.to(dtype)
    kw = dict(temperature=t, teacher_temperature=t)
    values, grad = _forward_backward(rust_sampled_kd, z, ids, counts, logprobs, valid, **kw)

    def target_of(r: int) -> Sampled:
        lp = None if logprobs is None else logprobs[r].double()
        return Sampled(ids[r], counts[r], lp)

    _check(
        f"sampled logprobs={with_logprobs}/{dtype}",
        values,
        grad,
        z,
        valid,
        target_of,
        divergence="forward_kl",
        temperature=t,
    )


def _sparse_kw(**over):
    kw = dict(
        divergence="forward_kl",
        tail="bucket",
        temperature=1.0,
        teacher_temperature=1.0,
        beta=0.5,
        alpha=0.1,
    )
    kw.update(over)
    return kw


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_k_equals_one_and_k_equals_v(divergence, tail) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 9, generator=g)
    logp_full = torch.log_softmax(torch.randn(3, 9, generator=g, dtype=torch.float64), -1)
    valid = torch.ones(3, dtype=torch.bool)
    for k in (1, 9):
        logp, ids = logp_full.topk(k, -1)
        if k == 9:
            # Renormalized so that the K == V bucket has no rest mass (p_rest = 0 exactly
            # would otherwise hinge on float32 rounding of the stored log-probabilities).
            logp = torch.log_softmax(logp.float(), -1).double()
        kw = _sparse_kw(divergence=divergence, tail=tail)
        values, grad = _forward_backward(rust_sparse_kd, z, ids, logp.float(), valid, **kw)
        _check(
            f"K={k}",
            values,
            grad,
            z,
            valid,
            lambda r, ids=ids, logp=logp: TopK(ids[r], logp[r].float().double()),
            **kw,
        )


def test_bucket_needs_equal_temperatures_and_renormalize_does_not() -> None:
    z = torch.randn(2, 10)
    logp, ids = torch.log_softmax(torch.randn(2, 10), -1).topk(3, -1)
    valid = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="`temperature`"):
        rust_sparse_kd(z, ids, logp, valid, **_sparse_kw(temperature=2.0))
    values = rust_sparse_kd(z, ids, logp, valid, **_sparse_kw(tail="renormalize", temperature=2.0))
    want = [
        reference_loss_row(
            z[r].double(),
            TopK(ids[r], logp[r].double()),
            tail="renormalize",
            temperature=2.0,
        ).item()
        for r in range(2)
    ]
    assert torch.allclose(values.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_output_scales_rows_and_masked_rows_get_nothing(dtype) -> None:
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(4, 30, generator=g) * 3).to(dtype)
    logp, ids = torch.log_softmax(torch.randn(4, 30, generator=g), -1).topk(5, -1)
    valid = torch.tensor([True, False, True, True])
    weights = torch.tensor([0.5, 3.0, -2.0, 0.0])
    leaf = z.clone().requires_grad_(True)
    (rust_sparse_kd(leaf, ids, logp, valid, **_sparse_kw()) * weights).sum().backward()
    assert leaf.grad.dtype == dtype
    for r in range(4):
        if not valid[r]:
            assert (leaf.grad[r] == 0).all()
            continue
        _, want = _reference(z[r], TopK(ids[r], logp[r].double()))
        torch.testing.assert_close(
            leaf.grad[r].double(),
            weights[r] * want,
            atol=GRAD_ATOL,
            rtol=GRAD_RTOL[dtype],
        )


def test_autograd_integration() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 40, generator=g)
    logp, ids = torch.log_softmax(torch.randn(5, 40, generator=g), -1).topk(4, -1)
    valid = torch.ones(5, dtype=torch.bool)
    kw = _sparse_kw()
    # A non-contiguous view, inside a graph (logits = 2 * parameter).
    param = base.t().contiguous().requires_grad_(True)
    values = rust_sparse_kd((2 * param).t(), ids, logp, valid, **kw)
    values.mean().backward()
    expected = torch.stack(
        [_reference(2 * base[r], TopK(ids[r], logp[r].double()))[1] for r in range(5)]
    )
    assert torch.allclose(param.grad.t().double(), 2 * expected / 5, atol=1e-5, rtol=1e-4)
    # The gradient is handed over on the first backward; a second one runs the kernel again.
    leaf = base.clone().requires_grad_(True)
    values = rust_sparse_kd(leaf, ids, logp, valid, **kw)
    values.sum().backward(retain_graph=True)
    assert leaf.grad is not None
    first = leaf.grad.clone()
    values.sum().backward()
    assert torch.equal(leaf.grad, 2 * first)
    # Without a gradient to compute (no_grad, or logits not requiring it) the values match.
    with torch.no_grad():
        no_grad_values = rust_sparse_kd(leaf, ids, logp, valid, **kw)
    plain = rust_sparse_kd(base, ids, logp, valid, **kw)
    assert not plain.requires_grad and not no_grad_values.requires_grad
    assert torch.equal(plain, no_grad_values) and torch.equal(plain, values.detach())


def test_results_do_not_depend_on_thread_count() -> None:
    g = torch.Generator().manual_seed(4)
    n, v, k = 64, 3000, 16
    z = torch.randn(n, v, generator=g) * 3
    logp, ids = torch.log_softmax(torch.randn(n, v, generator=g), -1).topk(k, -1)
    valid = torch.rand(n, generator=g) > 0.1
    teacher = torch.randn(n, v - 5, generator=g)
    counts = torch.randint(0, 4, (n, k), generator=g)
    counts[:, 0] = 1
    before = lc.get_num_threads()
    runs = []
    try:
        for threads in (1, 4):
            lc.set_num_threads(threads)
            out = []
            for dtype in DTYPES:
                zz = z.to(dtype)
                out.append(
                    _forward_backward(
                        rust_sparse_kd, zz, ids, logp, valid, **_sparse_kw(divergence="jsd")
                    )
                )
                out.append(
                    _forward_backward(
                        rust_dense_kd,
                        zz,
                        teacher,
                        valid,
                        divergence="tvd",
                        temperature=1.5,
                        beta=0.5,
                        alpha=0.1,
                    )
                )
                out.append(
                    _forward_backward(
                        rust_sampled_kd,
                        zz,
                        ids,
                        counts,
                        None,
                        valid,
                        temperature=1.0,
                        teacher_temperature=1.0,
                    )
                )
            runs.append(out)
    finally:
        lc.set_num_threads(before)
    for (v1, g1), (v4, g4) in zip(runs[0], runs[1], strict=True):
        assert torch.equal(v1, v4) and torch.equal(g1, g4)


# ---- bad inputs: each raises ValueError naming the argument ----

Z = torch.randn(2, 6)
IDS = torch.tensor([[0, 3], [5, 1]])
LOGP = torch.tensor([[-0.5, -2.0], [-1.0, -1.5]])
VALID = torch.tensor([True, True])


def _nan_at(t: torch.Tensor, index: tuple[int, int], value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


SPARSE_BAD = [
    ("student_logits", dict(student_logits=[[0.0]])),
    ("student_logits", dict(student_logits=torch.randn(6))),
    ("student_logits", dict(student_logits=Z.double())),
    ("student_logits", dict(student_logits=Z.to("meta"))),
    ("student_logits", dict(student_logits=_nan_at(Z, (1, 2)))),
    ("student_logits", dict(student_logits=_nan_at(Z, (0, 4), float("inf")))),
    ("student_logits", dict(student_logits=_nan_at(Z, (1, 1), float("nan")))),
    ("student_logits", dict(student_logits=torch.full((2, 6), float("-inf")))),
    ("ids", dict(ids=IDS.float())),
    ("ids", dict(ids=IDS[:1])),
    ("ids", dict(ids=torch.tensor([[0, 6], [5, 1]]))),
    ("ids", dict(ids=torch.tensor([[0, -1], [5, 1]]))),
    ("ids", dict(ids=torch.tensor([[0, 3], [1, 1]]))),
    ("logprobs", dict(logprobs=LOGP[:, :1])),
    ("logprobs", dict(logprobs=LOGP.long())),
    ("logprobs", dict(logprobs=_nan_at(LOGP, (1, 0)))),
    ("logprobs", dict(logprobs=_nan_at(LOGP, (0, 1), float("inf")))),
    ("valid", dict(valid=torch.tensor([1, 1]))),
    ("valid", dict(valid=torch.tensor([True]))),
    ("divergence", dict(divergence="kl")),
    ("divergence", dict(divergence=None)),
    ("tail", dict(tail="drop")),
    ("temperature", dict(temperature=0.0)),
    ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature=2.0)),  # bucket with T != T_c
    ("teacher_temperature", dict(teacher_temperature=-1.0, tail="renormalize")),
    ("beta", dict(divergence="jsd", beta=0.0)),
    ("beta", dict(divergence="jsd", beta=1.0)),
    ("alpha", dict(divergence="skew_forward_kl", alpha=0.0)),
    ("alpha", dict(divergence="skew_reverse_kl", alpha=1.5)),
    ("alpha", dict(divergence="skew_reverse_kl", alpha="x")),
]


@pytest.mark.parametrize(("arg", "override"), SPARSE_BAD)
def test_sparse_bad_input_names_the_argument(arg, override) -> None:
    call = dict(student_logits=Z, ids=IDS, logprobs=LOGP, valid=VALID, **_sparse_kw())
    call.update(override)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        rust_sparse_kd(**call)


SAMPLED_IDS = torch.tensor([[0, -1, 4], [2, 3, -1]])
COUNTS = torch.tensor([[2, 0, 1], [1, 1, 0]])
SAMPLED_BAD = [
    ("student_logits", dict(student_logits=_nan_at(Z, (0, 5)))),
    ("ids", dict(ids=torch.tensor([[0, -1, 6], [2, 3, -1]]))),
    ("ids", dict(ids=torch.tensor([[0, -1, 0], [2, 3, -1]]))),
    ("ids", dict(ids=torch.tensor([[0, 7, 4], [2, 3, -1]]), counts=COUNTS + 1)),
    ("counts", dict(counts=COUNTS[:, :2])),
    ("counts", dict(counts=torch.tensor([[2, 0, -1], [1, 1, 0]]))),
    ("counts", dict(counts=torch.tensor([[0, 0, 0], [1, 1, 0]]))),
    ("counts", dict(counts=COUNTS.float())),
    ("logprobs", dict(logprobs=torch.zeros(2, 2))),
    ("logprobs", dict(logprobs=_nan_at(torch.full((2, 3), -1.0), (0, 0)))),
    ("logprobs", dict(logprobs=_nan_at(torch.full((2, 3), -1.0), (1, 1), float("-inf")))),
    ("temperature", dict(temperature=2.0)),
    ("teacher_temperature", dict(teacher_temperature=0.0)),
    ("valid", dict(valid=VALID[:1])),
]


@pytest.mark.parametrize(("arg", "override"), SAMPLED_BAD)
def test_sampled_bad_input_names_the_argument(arg, override) -> None:
    call = dict(
        student_logits=Z,
        ids=SAMPLED_IDS,
        counts=COUNTS,
        logprobs=None,
        valid=VALID,
        temperature=1.0,
        teacher_temperature=1.0,
    )
    call.update(override)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        rust_sampled_kd(**call)


def test_sampled_padding_is_not_read() -> None:
    # A padding entry (count 0) may hold any id and any log-probability.
    values = rust_sampled_kd(
        Z,
        torch.tensor([[0, 99, 4], [2, 3, -5]]),
        COUNTS,
        torch.tensor([[-1.0, float("nan"), -2.0], [-0.5, -0.7, float("inf")]]),
        VALID,
        temperature=1.0,
        teacher_temperature=1.0,
    )
    assert torch.isfinite(values).all()


TEACHER = torch.randn(2, 4)
DENSE_BAD = [
    ("student_logits", dict(student_logits=Z.half())),
    ("teacher_logits", dict(teacher_logits=torch.randn(2, 7))),
    ("teacher_logits", dict(teacher_logits=torch.randn(3, 4))),
    ("teacher_logits", dict(teacher_logits=TEACHER.double())),
    ("teacher_logits", dict(teacher_logits=_nan_at(TEACHER, (1, 3)))),
    ("teacher_logits", dict(teacher_logits=torch.full((2, 4), float("-inf")))),
    ("divergence", dict(divergence="js")),
    ("temperature", dict(temperature=-2.0)),
    ("beta", dict(divergence="jsd", beta=-0.1)),
]


@pytest.mark.parametrize(("arg", "override"), DENSE_BAD)
def test_dense_bad_input_names_the_argument(arg, override) -> None:
    call = dict(
        student_logits=Z,
        teacher_logits=TEACHER,
        valid=VALID,
        divergence="reverse_kl",
        temperature=1.0,
        beta=0.5,
        alpha=0.1,
    )
    call.update(override)
    with pytest.raises(ValueError, match=f"`{arg}`"):
        rust_dense_kd(**call)
