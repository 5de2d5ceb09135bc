"""Invariants of the distillation losses: non-negativity, zero at Q = P, the bucket bound,
unbiased sampled estimates, masking, -inf logits and edge shapes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from losses_support import BACKENDS, draw_samples
from reference_losses import DIVERGENCES

from logitcache import losses

ALL_KINDS = ["bucket", "renormalize", "sampled", "dense"]


def _loss(
    kind: str,
    z: torch.Tensor,
    teacher: dict[str, torch.Tensor],
    divergence: str = "forward_kl",
    **options: object,
) -> torch.Tensor:
    if kind == "dense":
        return losses.kd_loss(z, teacher["logits"], divergence=divergence, **options)
    if kind == "sampled":
        return losses.sampled_kd_loss(
            z, teacher["ids"], teacher["counts"], teacher.get("logprobs"), **options
        )
    return losses.sparse_kd_loss(
        z, teacher["ids"], teacher["logprobs"], divergence=divergence, tail=kind, **options
    )


def _teacher(kind: str, gen: torch.Generator, lead: tuple[int, ...], v_t: int, k: int) -> dict:
    logits = torch.randn((*lead, v_t), generator=gen) * 2
    if kind == "dense":
        return {"logits": logits}
    logprobs = torch.log_softmax(logits, dim=-1)
    if kind == "sampled":
        width = min(v_t, 10)  # 10 draws
        ids, counts = draw_samples(gen, logprobs.reshape(-1, v_t).exp(), 10, width)
        ids, counts = ids.reshape((*lead, width)), counts.reshape((*lead, width))
        lp = torch.where(counts > 0, logprobs.gather(-1, ids.clamp_min(0)), 0.0)
        return {"ids": ids, "counts": counts, "logprobs": lp}
    top = logprobs.topk(k, dim=-1)
    return {"ids": top.indices, "logprobs": top.values}


def _divergences(kind: str) -> list[str]:
    return ["forward_kl"] if kind == "sampled" else list(DIVERGENCES)


# ---- non-negativity and zero at Q = P ------------------------------------------------------


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "dense"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    v=st.integers(1, 16),
    scale=st.sampled_from([0.1, 2.0, 8.0]),
    temperature=st.sampled_from([1.0, 0.5, 3.0]),
)
def test_divergences_are_nonnegative(
    tail: str, divergence: str, seed: int, v: int, scale: float, temperature: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(4, v + 2, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(4, v, generator=gen, dtype=torch.float64) * scale
    if tail == "dense":
        values = losses.kd_loss(
            z, teacher, divergence=divergence, temperature=temperature, reduction="none"
        )
    else:
        top = torch.log_softmax(teacher / temperature, -1).topk(max(1, v // 2), -1)
        values = losses.sparse_kd_loss(
            z,
            top.indices,
            top.values,
            divergence=divergence,
            tail=tail,
            temperature=temperature,
            teacher_temperature=temperature,
            reduction="none",
        )
    # Exactly >= 0 in exact arithmetic except for the reference's 1e-10 floor inside
    # logarithms, which can push reverse-type divergences below 0 by at most ~1e-10 * V.
    assert bool((values >= -1e-9).all()), values


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "dense"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    v=st.integers(1, 16),
    temperature=st.sampled_from([1.0, 0.5, 3.0]),
)
def test_divergence_is_zero_and_stationary_when_student_equals_teacher(
    tail: str, divergence: str, seed: int, v: int, temperature: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(3, v, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    if tail == "dense":
        loss = losses.kd_loss(
            z, z.detach(), divergence=divergence, temperature=temperature, reduction="sum"
        )
    else:
        # The teacher's targets are the student's own: Q = P on every outcome.
        top = torch.log_softmax(z.detach() / temperature, -1).topk(max(1, v // 2), -1)
        loss = losses.sparse_kd_loss(
            z,
            top.indices,
            top.values,
            divergence=divergence,
            tail=tail,
            temperature=temperature,
            teacher_temperature=temperature,
            reduction="sum",
        )
    loss.backward()
    # Not exactly 0: the 1e-10 floor on teacher probabilities inside logarithms adds
    # p log(1e-10 / p) <= 1e-10 / e per entry with p < 1e-10 (and the same order to the
    # gradient); 1e-9 bounds that for 3 rows of <= 16 entries.
    assert abs(float(loss.detach())) <= 1e-9
    assert z.grad is not None
    if divergence != "tvd":  # |P - Q| has a kink at the minimum; rounding picks a side
        # The minimum is a stationary point of the smooth divergences.
        torch.testing.assert_close(z.grad, torch.zeros_like(z), atol=1e-9, rtol=0)


def test_sampled_empirical_kl_is_nonnegative_and_zero_at_the_empirical_distribution() -> None:
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(50, 9, generator=gen, dtype=torch.float64), -1)
    ids, counts = draw_samples(gen, probs, 12, 9)
    z = torch.randn(50, 9, generator=gen, dtype=torch.float64)
    assert bool((losses.sampled_kd_loss(z, ids, counts, reduction="none") >= -1e-12).all())
    # Student = empirical distribution of the draws: KL(W || Q) = 0.
    empirical = torch.zeros(50, 9, dtype=torch.float64).scatter_add_(
        1, ids.clamp_min(0), counts.double()
    )
    z_emp = torch.log(empirical)  # -inf where nothing was drawn
    zero = losses.sampled_kd_loss(z_emp, ids, counts, reduction="sum")
    assert abs(float(zero)) <= 1e-12


# ---- the bucket bound --------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    v_t=st.integers(2, 24),
    pad=st.sampled_from([0, 3]),
    data=st.data(),
    temperature=st.sampled_from([1.0, 0.7, 2.0]),
)
def test_bucket_never_exceeds_dense_with_true_topk(
    divergence: str, seed: int, v_t: int, pad: int, data: st.DataObject, temperature: float
) -> None:
    """Coarsening (K ids + rest) cannot increase an f-divergence (data processing).
    The 1e-10 floor on teacher probabilities inside logarithms is not part of an
    f-divergence and would break the inequality where it is active, so: teacher logits stay
    in [-6, 6] at these temperatures and vocabularies (every teacher probability exceeds
    1e-10), and the reverse-type divergences, which floor the teacher's 0 on padded entries,
    run without padding. The complement of S is never empty (K < V_s)."""
    if divergence in ("reverse_kl", "jeffreys"):
        pad = 0
    k = data.draw(st.integers(1, v_t + pad - 1))
    k = min(k, v_t)
    gen = torch.Generator().manual_seed(seed)
    teacher = (torch.rand(5, v_t, generator=gen, dtype=torch.float64) * 12 - 6) * temperature
    z = torch.randn(5, v_t + pad, generator=gen, dtype=torch.float64) * 4
    dense = losses.kd_loss(
        z, teacher, divergence=divergence, temperature=temperature, reduction="none"
    )
    top = torch.log_softmax(teacher / temperature, -1).topk(k, -1)
    bucket = losses.sparse_kd_loss(
        z,
        top.indices,
        top.values,
        divergence=divergence,
        temperature=temperature,
        teacher_temperature=temperature,
        reduction="none",
    )
    # Equality is possible (a rest bucket of one entry): float64 rounding of sums of terms
    # up to ~40 in size then decides, hence the 1e-10 relative slack.
    assert bool((bucket <= dense * (1 + 1e-10) + 1e-12).all()), (bucket, dense)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_full_vocabulary_topk_equals_dense(divergence: str) -> None:
    """K == V_s: the rest bucket is empty; when the stored probabilities sum to 1 (here nudged
    so that rounding cannot leave a positive remainder) bucket, renormalize and dense agree."""
    gen = torch.Generator().manual_seed(11)
    teacher = torch.randn(4, 9, generator=gen, dtype=torch.float64) * 2
    z = torch.randn(4, 9, generator=gen, dtype=torch.float64) * 2
    logprobs = torch.log_softmax(teacher, -1) + 1e-15
    ids = torch.arange(9).expand(4, 9)
    dense = losses.kd_loss(z, teacher, divergence=divergence, reduction="none")
    for tail in ("bucket", "renormalize"):
        sparse = losses.sparse_kd_loss(
            z, ids, logprobs, divergence=divergence, tail=tail, reduction="none"
        )
        torch.testing.assert_close(sparse, dense, atol=1e-12, rtol=1e-9)


# ---- sampled estimates are unbiased ------------------------------------------------------


def test_sampled_forward_kl_estimate_is_unbiased() -> None:
    """Each row averages f(d) = log p_d - log q_d over n draws, so the mean over R rows is the
    mean of R*n i.i.d. f(d): expectation KL(P || Q), variance Var_P(f) / (R n), both computed
    exactly here. A 5 sigma bound fails with probability < 1e-6 (the seed is fixed anyway)."""
    gen = torch.Generator().manual_seed(2024)
    vocab, rows, draws, temperature = 12, 4000, 8, 2.0
    teacher = torch.randn(vocab, generator=gen, dtype=torch.float64) * 2
    z = torch.randn(vocab, generator=gen, dtype=torch.float64) * 2
    log_p = torch.log_softmax(teacher / temperature, -1)
    log_q = torch.log_softmax(z / temperature, -1)
    ids, counts = draw_samples(gen, log_p.exp().expand(rows, vocab), draws, draws)
    logprobs = torch.where(counts > 0, log_p[ids.clamp_min(0)], 0.0)
    estimate = losses.sampled_kd_loss(
        z.expand(rows, vocab),
        ids,
        counts,
        logprobs,
        temperature=temperature,
        teacher_temperature=temperature,
    )
    f = log_p - log_q
    kl = float((log_p.exp() * f).sum())
    sigma = math.sqrt(float((log_p.exp() * (f - kl) ** 2).sum()) / (rows * draws))
    assert abs(float(estimate) - kl) <= 5 * sigma, (float(estimate), kl, sigma)
    # and the bound is informative: sigma is small next to the KL itself
    assert 5 * sigma < 0.1 * kl


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_gradient_is_unbiased_without_logprobs(backend: str) -> None:
    """The gradient of a row is (q - w) / T with w = counts / n; over R rows the mean of w_v
    has expectation p_v and variance p_v (1 - p_v) / (R n). 5 sigma per entry, 12 entries."""
    gen = torch.Generator().manual_seed(77)
    vocab, rows, draws, temperature = 12, 4000, 8, 1.5
    p = torch.softmax(torch.randn(vocab, generator=gen, dtype=torch.float64) * 2, -1)
    z = torch.randn(vocab, generator=gen) * 2
    ids, counts = draw_samples(gen, p.expand(rows, vocab), draws, draws)
    student = z.clone().requires_grad_()
    losses.sampled_kd_loss(
        student.expand(rows, vocab),
        ids,
        counts,
        temperature=temperature,
        teacher_temperature=temperature,
        backend=backend,
    ).backward()
    q = torch.softmax(z.double() / temperature, -1)
    expected = (q - p) / temperature
    sigma = torch.sqrt(p * (1 - p) / (rows * draws)) / temperature
    assert student.grad is not None
    error = (student.grad.double() - expected).abs()
    # 1e-6: float32 arithmetic on gradients of order 1 / T
    assert bool((error <= 5 * sigma + 1e-6).all()), (error, sigma)


# ---- masking ----------------------------------------------------------------------------


def _scramble(kind: str, z: torch.Tensor, teacher: dict, skipped: torch.Tensor) -> tuple:
    """Garbage everywhere a skipped position is: NaN/+inf logits, ids out of range, NaN."""
    z = z.detach().clone()
    z[skipped] = torch.tensor([math.nan, math.inf, 1e30] * z.shape[-1])[: z.shape[-1]]
    garbage = {}
    for name, t in teacher.items():
        junk = {"ids": 10**6, "counts": -7, "logprobs": math.nan, "logits": math.nan}[name]
        garbage[name] = torch.where(skipped[..., None], torch.full_like(t, junk), t)
    return z, garbage


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_masked_positions_change_nothing(kind: str, backend: str) -> None:
    gen = torch.Generator().manual_seed(8)
    lead, v_t, v_s = (3, 4), 10, 12
    z = torch.randn((*lead, v_s), generator=gen) * 2
    teacher = _teacher(kind, gen, lead, v_t, 4)
    mask = torch.rand(lead, generator=gen) > 0.4
    mask[0, 0], mask[0, 1] = True, False
    for divergence in _divergences(kind):
        for reduction in ("mean", "sum", "none"):
            results = []
            for inputs in ((z, teacher), _scramble(kind, z, teacher, ~mask)):
                student = inputs[0].clone().requires_grad_()
                loss = _loss(
                    kind,
                    student,
                    inputs[1],
                    divergence,
                    mask=mask,
                    reduction=reduction,
                    backend=backend,
                )
                loss.sum().backward()
                assert student.grad is not None
                results.append((loss.detach(), student.grad))
            (clean, clean_grad), (scrambled, scrambled_grad) = results
            assert torch.equal(clean, scrambled)
            assert torch.equal(clean_grad, scrambled_grad)
            assert not bool(clean_grad[~mask].any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "normalizer"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_all_masked_batch_gives_zero_loss_and_zero_gradient(
    kind: str, reduction: str, backend: str
) -> None:
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(2, 3, 8, generator=gen)
    teacher = _teacher(kind, gen, (2, 3), 8, 3)
    skipped = torch.ones(2, 3, dtype=torch.bool)
    z, teacher = _scramble(kind, z, teacher, skipped)
    student = z.requires_grad_()
    loss = _loss(
        kind,
        student,
        teacher,
        labels=torch.full((2, 3), -100),
        reduction="sum" if reduction == "normalizer" else reduction,
        normalizer=4.0 if reduction == "normalizer" else None,
        backend=backend,
    )
    loss.sum().backward()
    assert not bool(loss.isnan().any())
    assert bool((loss == 0).all())
    assert student.grad is not None
    assert torch.equal(student.grad, torch.zeros_like(student))


# ---- -inf logits, dtypes, shapes ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_neg_inf_student_logits_give_finite_gradients(kind: str, backend: str) -> None:
    """-inf logits (masked vocabulary) anywhere, including at teacher ids and over the whole
    rest bucket: the value may be +inf (the student cannot represent teacher mass) but is
    never NaN, and every gradient entry is finite."""
    gen = torch.Generator().manual_seed(12)
    v_t, v_s = 6, 8
    teacher = _teacher(kind, gen, (4,), v_t, 3)
    z = torch.randn(4, v_s, generator=gen)
    z[:, v_t:] = -math.inf  # padded entries masked
    if kind in ("bucket", "renormalize"):
        ids = teacher["ids"]
        z[0] = z[0].scatter(0, ids[0, :1], -math.inf)  # one teacher id masked
        rest = torch.ones(v_s, dtype=torch.bool).scatter(0, ids[1], False)
        z[1, rest] = -math.inf  # the whole rest bucket masked
    else:
        z[0, 0] = -math.inf
        z[1, 1:] = -math.inf
    for divergence in _divergences(kind):
        student = z.clone().requires_grad_()
        values = _loss(kind, student, teacher, divergence, reduction="none", backend=backend)
        values.sum().backward()
        assert not bool(values.isnan().any()), (divergence, values)
        assert student.grad is not None
        assert bool(student.grad.isfinite().all()), (divergence, student.grad)
        assert not bool(student.grad[:, v_t:].any())  # masked entries get no gradient


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_float16_input_runs_on_the_torch_path(kind: str) -> None:
    gen = torch.Generator().manual_seed(13)
    z = (torch.randn(5, 9, generator=gen) * 2).half()
    teacher = _teacher(kind, gen, (5,), 9, 3)
    half = z.clone().requires_grad_()
    full = z.float().requires_grad_()
    for student in (half, full):
        _loss(kind, student, teacher, backend="auto").backward()
    assert half.grad is not None and full.grad is not None
    assert half.grad.dtype == torch.float16
    torch.testing.assert_close(half.grad.float(), full.grad, atol=1e-4, rtol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_non_contiguous_student_logits(kind: str, backend: str) -> None:
    gen = torch.Generator().manual_seed(14)
    wide = torch.randn(9, 5, generator=gen)
    teacher = _teacher(kind, gen, (5,), 9, 3)
    z = wide.t()  # [5, 9] with strides (1, 5)
    results = []
    for student in (z.clone().requires_grad_(), z.contiguous().requires_grad_()):
        loss = _loss(kind, student, teacher, reduction="sum", backend=backend)
        loss.backward()
        results.append((loss.detach(), student.grad))
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_backward_through_a_retained_graph_twice(kind: str) -> None:
    gen = torch.Generator().manual_seed(15)
    z = torch.randn(4, 7, generator=gen).requires_grad_()
    teacher = _teacher(kind, gen, (4,), 7, 3)
    loss = _loss(kind, z, teacher, reduction="mean", backend="torch")
    loss.backward(retain_graph=True)
    assert z.grad is not None
    once = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * once, atol=1e-7, rtol=1e-6)


def test_no_grad_evaluation_builds_no_graph() -> None:
    gen = torch.Generator().manual_seed(16)
    z = torch.randn(4, 7, generator=gen).requires_grad_()
    teacher = _teacher("dense", gen, (4,), 7, 3)
    with torch.no_grad():
        loss = _loss("dense", z, teacher)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _loss("dense", z.detach(), teacher))
