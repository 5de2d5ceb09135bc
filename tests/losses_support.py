"""Shared pieces of the loss tests: backends, hypothesis strategies for loss inputs, and the
float64 reference evaluated over a batch with the same masking and reductions as the API.

Input values come from a seeded torch generator (drawn by hypothesis together with the shape
and the edge-case switches: ties, -inf student logits, padded student vocabulary, masked
positions, temperatures), which keeps the examples fast to generate while hypothesis still
explores and shrinks the structure.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from reference_losses import Dense, Sampled, TopK, reference_loss_row, target_distributions

from logitcache import losses

# Backend-agnostic tests run on every backend that is importable here; after the Rust kernels
# are merged the same tests cover both paths.
BACKENDS = ["torch"]
if importlib.util.find_spec("logitcache._loss_kernels") is not None:
    try:
        from logitcache import _loss_kernels  # type: ignore[attr-defined]

        if _loss_kernels.rust_kernels_available():
            BACKENDS.append("rust")
    except ImportError:  # pragma: no cover - a broken build shows up in the backend tests
        pass

# (backend, dtype) pairs: the Rust kernels take float32/bfloat16 only.
BACKEND_DTYPES = [
    (backend, dtype)
    for backend in BACKENDS
    for dtype in (torch.float64, torch.float32, torch.bfloat16)
    if not (backend == "rust" and dtype == torch.float64)
]

LEADS = [(), (1,), (3,), (2, 2), (2, 3)]
REDUCTION_CHOICES = ["mean", "sum", "none", "normalizer"]


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances against the float64 reference, by student dtype.

    float64: same formulas, different operation order; errors are a few ulps of values of
    order |z/T| <= 40, so 1e-9 is loose yet catches any formula slip.
    float32 (and the math of bfloat16 inputs, which is float32 on exactly representable
    values): logsumexp over <= 16 entries of magnitude <= 40 is off by a few float32 ulps
    (~1e-5 absolute at 40), and every value and gradient entry is a sum of probability-weighted
    log terms, so 2e-5 absolute + 1e-4 relative.
    bfloat16 gradients are rounded to bfloat16 (8 significant bits, relative error <= 2^-9
    per rounding) up to twice (the dense path stores the gradient in forward and scales it by
    grad_output in backward), hence 8e-3 relative on top.
    """
    if dtype == torch.float64:
        return {"value_atol": 1e-9, "value_rtol": 1e-9, "grad_atol": 1e-9, "grad_rtol": 1e-9}
    if dtype == torch.float32:
        return {"value_atol": 2e-5, "value_rtol": 1e-4, "grad_atol": 2e-5, "grad_rtol": 1e-4}
    return {"value_atol": 2e-5, "value_rtol": 1e-4, "grad_atol": 2e-5, "grad_rtol": 8e-3}


@dataclass
class Case:
    """One batch of loss inputs; z holds exactly representable values of the test dtype."""

    lead: tuple[int, ...]
    z: torch.Tensor  # [*lead, V_s] float64
    valid: torch.Tensor  # [*lead] bool
    use_labels: bool  # express `valid` through labels (ignore_index) instead of mask
    temperature: float
    teacher_temperature: float
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_weights: torch.Tensor | None = None  # grad_output for reduction="none"

    def masking(self) -> dict[str, torch.Tensor]:
        if self.use_labels:
            labels = torch.where(self.valid, 0, -100)
            return {"labels": labels}
        return {"mask": self.valid}


def _student_logits(
    gen: torch.Generator,
    lead: tuple[int, ...],
    vocab: int,
    scale: float,
    ties: bool,
) -> torch.Tensor:
    z = torch.randn((*lead, vocab), generator=gen, dtype=torch.float64) * scale
    if ties:
        z = z.round()  # integer logits repeat often at this vocabulary size
    return z


def _valid(gen: torch.Generator, lead: tuple[int, ...], masked_fraction: float) -> torch.Tensor:
    return torch.rand(lead, generator=gen, dtype=torch.float64) >= masked_fraction


@st.composite
def topk_cases(draw: st.DrawFn, *, tail: str) -> Case:
    lead = draw(st.sampled_from(LEADS))
    v_t = draw(st.integers(1, 12))
    v_s = v_t + draw(st.sampled_from([0, 0, 1, 3]))  # padded student vocabulary
    k = draw(st.one_of(st.just(1), st.just(v_t), st.integers(1, v_t)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.3, 2.0, 6.0]))
    z = _student_logits(gen, lead, v_s, scale, ties=draw(st.booleans()))
    if tail == "bucket":
        teacher_temperature = draw(st.sampled_from([1.0, 0.7, 2.5]))
        temperature = teacher_temperature
    else:
        teacher_temperature = draw(st.sampled_from([1.0, 0.7]))
        temperature = draw(st.sampled_from([1.0, 0.5, 2.0]))
    teacher_logits = torch.randn((*lead, v_t), generator=gen, dtype=torch.float64)
    teacher_logits *= draw(st.sampled_from([0.5, 3.0]))
    if draw(st.booleans()):
        teacher_logits = teacher_logits.round()  # teacher ties
    logprobs = torch.log_softmax(teacher_logits / teacher_temperature, dim=-1)
    if draw(st.booleans()):
        ids = logprobs.topk(k, dim=-1).indices  # the true top-K, by rank
    else:
        ids = torch.rand((*lead, v_t), generator=gen).argsort(dim=-1)[..., :k]
    top_logprobs = logprobs.gather(-1, ids).to(torch.float32)  # stores keep float32
    if draw(st.booleans()):
        # Masked vocabulary: -inf student logits outside the teacher's ids, always leaving
        # one finite entry outside S when S is not the whole vocabulary.
        in_s = torch.zeros(z.shape, dtype=torch.bool).scatter(-1, ids, True)
        holes = (torch.rand(z.shape, generator=gen) < 0.4) & ~in_s
        if k < v_s:
            keep = (~in_s).to(torch.float64).argmax(dim=-1, keepdim=True)
            holes.scatter_(-1, keep, False)
        z = z.masked_fill(holes, -math.inf)
    valid = _valid(gen, lead, draw(st.sampled_from([0.0, 0.3, 1.0])))
    # Skipped positions carry garbage that must never be read.
    ids = torch.where(valid[..., None], ids, v_s + 7)
    top_logprobs = torch.where(valid[..., None], top_logprobs, math.nan)
    return Case(
        lead=lead,
        z=z,
        valid=valid,
        use_labels=draw(st.booleans()),
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        teacher={"ids": ids, "logprobs": top_logprobs},
        grad_weights=torch.randn(lead, generator=gen, dtype=torch.float64),
    )


def draw_samples(
    gen: torch.Generator, probs: torch.Tensor, n: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids of n draws per row from probs [R, V] and their counts, padded to width
    with id -1 / count 0 (the layout of a sampled store row)."""
    rows = probs.shape[0]
    draws = torch.multinomial(probs, n, replacement=True, generator=gen)
    counts_full = torch.zeros(probs.shape, dtype=torch.int64).scatter_add_(
        1, draws, torch.ones_like(draws)
    )
    ids = torch.full((rows, width), -1, dtype=torch.int64)
    counts = torch.zeros((rows, width), dtype=torch.int64)
    for r in range(rows):
        present = counts_full[r].nonzero().squeeze(1)
        order = present[torch.randperm(present.numel(), generator=gen)]
        ids[r, : order.numel()] = order
        counts[r, : order.numel()] = counts_full[r, order]
    return ids, counts


@st.composite
def sampled_cases(draw: st.DrawFn) -> Case:
    lead = draw(st.sampled_from(LEADS))
    v_t = draw(st.integers(1, 12))
    v_s = v_t + draw(st.sampled_from([0, 0, 2]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    z = _student_logits(gen, lead, v_s, draw(st.sampled_from([0.3, 2.0, 6.0])), draw(st.booleans()))
    temperature = draw(st.sampled_from([1.0, 0.7, 2.0]))
    teacher_logits = torch.randn((*lead, v_t), generator=gen, dtype=torch.float64) * 2.0
    logprobs_full = torch.log_softmax(teacher_logits / temperature, dim=-1)
    n = draw(st.sampled_from([1, 3, 20]))
    width = min(v_t, n) + draw(st.integers(0, 2))
    ids, counts = draw_samples(gen, logprobs_full.reshape(-1, v_t).exp(), n, width)
    ids, counts = ids.reshape((*lead, width)), counts.reshape((*lead, width))
    logprobs = logprobs_full.gather(-1, ids.clamp_min(0)).to(torch.float32)
    logprobs = torch.where(counts > 0, logprobs, 0.0)
    if draw(st.booleans()):
        # -inf student logits where nothing was drawn (masked vocabulary).
        drawn = torch.zeros(z.shape, dtype=torch.int64).scatter_add(-1, ids.clamp_min(0), counts)
        drawn = drawn > 0
        z = z.masked_fill((torch.rand(z.shape, generator=gen) < 0.4) & ~drawn, -math.inf)
    valid = _valid(gen, lead, draw(st.sampled_from([0.0, 0.3, 1.0])))
    ids = torch.where(valid[..., None], ids, -5)
    counts = torch.where(valid[..., None], counts, -3)
    teacher = {"ids": ids, "counts": counts}
    if draw(st.booleans()):
        teacher["logprobs"] = torch.where(valid[..., None], logprobs, math.nan)
    return Case(
        lead=lead,
        z=z,
        valid=valid,
        use_labels=draw(st.booleans()),
        temperature=temperature,
        teacher_temperature=temperature,
        teacher=teacher,
        grad_weights=torch.randn(lead, generator=gen, dtype=torch.float64),
    )


@st.composite
def dense_cases(draw: st.DrawFn) -> Case:
    lead = draw(st.sampled_from(LEADS))
    v_t = draw(st.integers(1, 12))
    v_s = v_t + draw(st.sampled_from([0, 0, 1, 3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    z = _student_logits(gen, lead, v_s, draw(st.sampled_from([0.3, 2.0, 6.0])), draw(st.booleans()))
    teacher = torch.randn((*lead, v_t), generator=gen, dtype=torch.float64)
    teacher *= draw(st.sampled_from([0.5, 3.0]))
    if draw(st.booleans()):
        teacher = teacher.round()
    teacher = teacher.float().double()  # exactly representable in float32 (what the API gets)
    if draw(st.booleans()):
        # Masked vocabulary on both sides: -inf teacher and student logits at the same ids,
        # plus the student's padded entries, keeping one finite teacher entry per row.
        holes = torch.rand(teacher.shape, generator=gen) < 0.4
        holes[..., 0] = False
        teacher = teacher.masked_fill(holes, -math.inf)
        z[..., :v_t] = z[..., :v_t].masked_fill(holes, -math.inf)
    valid = _valid(gen, lead, draw(st.sampled_from([0.0, 0.3, 1.0])))
    teacher = torch.where(valid[..., None], teacher, math.nan)
    return Case(
        lead=lead,
        z=z,
        valid=valid,
        use_labels=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0])),
        teacher_temperature=1.0,
        teacher={"logits": teacher},
        grad_weights=torch.randn(lead, generator=gen, dtype=torch.float64),
    )


def row_target(case: Case, kind: str, row: int) -> TopK | Sampled | Dense:
    flat = {name: t.reshape(-1, t.shape[-1]) for name, t in case.teacher.items()}
    if kind == "topk":
        return TopK(flat["ids"][row], flat["logprobs"][row].double())
    if kind == "sampled":
        logprobs = flat.get("logprobs")
        return Sampled(
            flat["ids"][row], flat["counts"][row], None if logprobs is None else logprobs[row]
        )
    return Dense(flat["logits"][row])


def reduce_like_api(
    per_row: torch.Tensor, case: Case, reduction: str, normalizer: float | None
) -> torch.Tensor:
    valid = case.valid.reshape(-1)
    per_row = torch.where(valid, per_row, 0.0)
    if reduction == "none":
        return per_row.reshape(case.lead)
    if normalizer is not None:
        return per_row.sum() / normalizer
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / max(int(valid.sum()), 1)


def reference(
    case: Case,
    kind: str,
    z: torch.Tensor,
    *,
    reduction: str,
    normalizer: float | None,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced float64 reference loss and its gradient w.r.t. z ([*lead, V_s])."""
    z64 = z.detach().double().reshape(-1, z.shape[-1]).clone().requires_grad_()
    valid = case.valid.reshape(-1)
    rows = []
    for r in range(z64.shape[0]):
        if valid[r]:
            rows.append(reference_loss_row(z64[r], row_target(case, kind, r), **options))
        else:
            rows.append(torch.zeros((), dtype=torch.float64))
    loss = reduce_like_api(torch.stack(rows), case, reduction, normalizer)
    weights = case.grad_weights if reduction == "none" else torch.ones(())
    grad = None
    if loss.requires_grad:  # not when every position is skipped
        (grad,) = torch.autograd.grad(loss, z64, grad_outputs=weights, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(z64)
    return loss.detach(), grad.reshape(z.shape)


def run_api(
    fn: Callable[..., torch.Tensor],
    case: Case,
    z: torch.Tensor,
    args: tuple[torch.Tensor | None, ...],
    *,
    reduction: str,
    normalizer: float | None,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient w.r.t. z of the public function, with the same grad_output."""
    z = z.detach().clone().requires_grad_()
    loss = fn(
        z,
        *args,
        reduction="sum" if reduction == "normalizer" else reduction,
        normalizer=normalizer,
        **case.masking(),
        **options,
    )
    weights = case.grad_weights.to(loss.dtype) if reduction == "none" else torch.ones(())
    loss.backward(weights.to(loss.dtype))
    assert z.grad is not None
    return loss.detach(), z.grad


def tvd_near_tie(case: Case, kind: str, tail: str) -> bool:
    """Whether some outcome has P and Q within 1e-4: there |P - Q| has a kink, and float32
    vs float64 may legitimately pick opposite subgradients."""
    z = case.z.reshape(-1, case.z.shape[-1])
    for r in range(z.shape[0]):
        if not case.valid.reshape(-1)[r]:
            continue
        p, log_q = target_distributions(
            z[r],
            row_target(case, kind, r),  # type: ignore[arg-type]
            tail=tail,
            temperature=case.temperature,
            teacher_temperature=case.teacher_temperature,
        )
        q = log_q.exp()
        if bool(((p - q).abs() < 1e-4).logical_and(q > 1e-6).any()):
            return True
    return False


__all__ = [
    "BACKENDS",
    "BACKEND_DTYPES",
    "REDUCTION_CHOICES",
    "Case",
    "dense_cases",
    "draw_samples",
    "losses",
    "reference",
    "run_api",
    "sampled_cases",
    "tolerances",
    "topk_cases",
    "tvd_near_tie",
]
