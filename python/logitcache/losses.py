"""Distillation losses: KL-family divergences between a student and sparse or dense teacher targets.

Definitions (docs/losses.md, ../DESIGN.md "Losses"): for one position the student distribution
is ``q = softmax(z / T)`` over the student's full vocabulary; the teacher target is a top-K row
(``sparse_kd_loss``), a sampled row (``sampled_kd_loss``) or full logits (``kd_loss``).
The functions return the divergence itself (no Hinton ``T^2``); ``KDLoss`` applies ``T^2`` and
mixes in hard-label cross-entropy.

Every function runs on any device. The torch path is a custom ``torch.autograd.Function`` that
walks the rows in chunks (a bounded ``chunk x V`` temporary), keeps O(N*K) per-row state and
writes the gradient in backward; it never materializes ``log_softmax`` over the batch. On CPU
float32/bfloat16 tensors, ``backend="auto"`` uses the fused Rust kernels when they are built.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BACKENDS",
    "BATCH_KEYS",
    "DIVERGENCES",
    "MAX_TEACHER_MASS",
    "REDUCTIONS",
    "TAILS",
    "TEACHER_PROB_FLOOR",
    "KDLoss",
    "kd_loss",
    "sampled_kd_loss",
    "sparse_kd_loss",
    "token_metrics",
]

DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "jeffreys",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
)
TAILS = ("bucket", "renormalize")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "rust")

#: Teacher probabilities are floored at this value inside logarithms (DESIGN.md conventions).
TEACHER_PROB_FLOOR = 1e-10
_LOG_FLOOR = math.log(TEACHER_PROB_FLOOR)

#: Largest total probability a row of teacher log-probabilities may carry before it is rejected
#: as "not log-probabilities" (raw logits passed by mistake sum to far more: e^5 alone is 148).
#: The slack above 1 leaves room for quantized stores: a per-entry error bound b scales every
#: p_j by at most e^b (e^0.5 = 1.65 for the coarsest "abs" codec), and a KL bound k lets the
#: mass exceed 1 by at most sqrt(2 k).
MAX_TEACHER_MASS = 2.0

# Rows per chunk = these element budgets // V. On CPU the chunk (16 MiB of float32) is large
# enough that each pass over it outweighs the intra-op thread pool's synchronization: 1 and
# 4 MiB chunks measured alike on an idle 2-core machine but 2-4x slower than 16 MiB ones when
# the cores were shared with other work. On an accelerator large chunks amortize kernel
# launches while the temporary stays bounded (128 MiB of float32).
_CHUNK_ELEMENTS_CPU = 1 << 22
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 25
_DENSE_TEMPORARIES = 2

# Beyond this ratio log(p/q) the rest-bucket coefficient is represented by its logarithm only
# (exp would overflow float64 at ~709); the neglected additive terms are < 1e-250 relative.
_LOG_RATIO_CUTOFF = 600.0

_NEG_INF = float("-inf")
_INF = float("inf")


# --------------------------------------------------------------------------------------------
# Backend selection


@functools.lru_cache(maxsize=1)
def _rust_kernels() -> tuple[ModuleType | None, str]:
    """The Rust kernel module, or None and the reason it is unavailable (imported once)."""
    try:
        from logitcache import _loss_kernels  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"logitcache._loss_kernels cannot be imported ({exc})"
    try:
        available = bool(_loss_kernels.rust_kernels_available())
    except Exception as exc:  # a broken build must not break the torch path
        return None, f"logitcache._loss_kernels.rust_kernels_available() failed ({exc})"
    if not available:
        return None, "logitcache._loss_kernels reports that the Rust kernels are not built"
    return _loss_kernels, ""


def _rust_supports(student_logits: Tensor) -> bool:
    return student_logits.device.type == "cpu" and student_logits.dtype in (
        torch.float32,
        torch.bfloat16,
    )


def _resolve_backend(backend: str, student_logits: Tensor) -> str:
    """The backend that runs this call, "torch" or "rust" (docs/losses.md, "Backends")."""
    _check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return "torch"
    module, reason = _rust_kernels()
    if backend == "auto":
        return "rust" if module is not None and _rust_supports(student_logits) else "torch"
    if module is None:
        raise ValueError(f"backend='rust' was requested but {reason}; use backend='torch'")
    if not _rust_supports(student_logits):
        raise ValueError(
            "backend='rust' needs CPU float32 or bfloat16 student_logits, got "
            f"{student_logits.dtype} on {student_logits.device}; use backend='torch' or 'auto'"
        )
    return "rust"


# --------------------------------------------------------------------------------------------
# Argument validation


def _check_choice(arg: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{arg} must be one of {list(choices)}, got {value!r}")


def _check_positive_finite(arg: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{arg} must be a positive number, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{arg} must be a positive finite number, got {value!r}")
    return number


def _check_open_unit(arg: str, value: object, why: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{arg} must be a number in (0, 1), got {value!r}")
    number = float(value)
    if not 0.0 < number < 1.0:
        raise ValueError(f"{arg} must lie in the open interval (0, 1), got {value!r}: {why}")
    return number


def _check_parameters(
    divergence: str, temperature: float, beta: float, alpha: float
) -> tuple[float, float, float]:
    _check_choice("divergence", divergence, DIVERGENCES)
    temperature = _check_positive_finite("temperature", temperature)
    beta = _check_open_unit(
        "beta", beta, "at 0 the generalized JSD vanishes and at 1 it is 0 for every student"
    )
    alpha = _check_open_unit(
        "alpha",
        alpha,
        "alpha = 0 is plain forward/reverse KL (use those) and alpha = 1 makes the skew "
        "divergences identically 0",
    )
    return temperature, beta, alpha


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _flatten_student(student_logits: object) -> tuple[tuple[int, ...], Tensor]:
    if not isinstance(student_logits, Tensor):
        raise ValueError(f"student_logits must be a torch.Tensor, got {type(student_logits)}")
    if not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point, got {student_logits.dtype}")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(
            f"student_logits must have shape [..., V] with V >= 1, got {_shape(student_logits)}"
        )
    lead = _shape(student_logits)[:-1]
    return lead, student_logits.reshape(-1, student_logits.shape[-1])


def _flatten_teacher(
    arg: str,
    tensor: object,
    lead: tuple[int, ...],
    device: torch.device,
    *,
    kind: str,
    width: int | None = None,
) -> Tensor:
    """Check a teacher tensor of shape lead + (W,) and return it as [N, W] (detached)."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor, got {type(tensor)}")
    if kind == "int" and (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"{arg} must have an integer dtype, got {tensor.dtype}")
    if kind == "float" and not tensor.is_floating_point():
        raise ValueError(f"{arg} must be floating point, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(
            f"{arg} is on {tensor.device} but student_logits is on {device}; move it first"
        )
    shape = _shape(tensor)
    if len(shape) != len(lead) + 1 or shape[:-1] != lead or shape[-1] < 1:
        raise ValueError(
            f"{arg} must have shape {(*lead, 'W')} (the leading dimensions of student_logits "
            f"plus one non-empty last dimension), got {shape}"
        )
    if width is not None and shape[-1] != width:
        raise ValueError(f"{arg} must have last dimension {width}, got shape {shape}")
    return tensor.detach().reshape(-1, shape[-1])


def _valid_rows(
    lead: tuple[int, ...],
    device: torch.device,
    labels: Tensor | None,
    ignore_index: int,
    mask: Tensor | None,
) -> Tensor:
    """[N] bool: positions that contribute (label != ignore_index and mask True)."""
    n = math.prod(lead)
    valid = torch.ones(n, dtype=torch.bool, device=device)
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got {labels!r:.80}")
        if _shape(labels) != lead:
            raise ValueError(
                f"labels must have shape {lead} (student_logits without its last dimension), "
                f"got {_shape(labels)}"
            )
        if labels.device != device:
            raise ValueError(f"labels is on {labels.device} but student_logits is on {device}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        valid &= labels.reshape(-1) != ignore_index
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"mask must be a bool (or integer 0/1) tensor, got {mask!r:.80}")
        if _shape(mask) != lead:
            raise ValueError(
                f"mask must have shape {lead} (student_logits without its last dimension), "
                f"got {_shape(mask)}"
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but student_logits is on {device}")
        valid &= mask.reshape(-1).to(torch.bool)
    return valid


def _first_bad_row(bad: Tensor) -> int | None:
    """Index of the first True in a [N] bool tensor, or None (one device sync)."""
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


def _raise_if(bad: Tensor, arg: str, what: str) -> None:
    row = _first_bad_row(bad)
    if row is not None:
        raise ValueError(f"{arg}: {what} (first at flattened position {row})")


def _check_ids(arg: str, ids: Tensor, valid: Tensor, vocab: int, present: Tensor | None) -> None:
    """Ids of valid rows lie in [0, vocab) and are distinct (entries where present is False are
    padding and skipped)."""
    live = valid[:, None] if present is None else valid[:, None] & present
    out_of_range = live & ((ids < 0) | (ids >= vocab))
    _raise_if(
        out_of_range.any(1),
        arg,
        f"ids must lie in [0, {vocab}) (the student vocabulary, V_s = {vocab})",
    )
    if ids.shape[1] > 1:
        # Padding gets distinct negative ids so that it never counts as a duplicate.
        pad_ids = -1 - torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        keyed = torch.where(live, ids, pad_ids)
        ordered = keyed.sort(dim=1).values
        duplicate = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        row = _first_bad_row(duplicate.any(1))
        if row is not None:
            # A store's padded batch pads with rows of id 0 (log-probability -inf).
            padding = bool((keyed[row] == 0).all())
            hint = (
                "; a row of id 0 throughout is what a padded batch's padding looks like: leave "
                "padding out with mask= (the batch's mask) or labels=ignore_index there"
                if padding
                else ""
            )
            raise ValueError(
                f"{arg}: a row repeats a token id; ids must be distinct (first at flattened "
                f"position {row}){hint}"
            )


def _check_normalizer(normalizer: object, reduction: str) -> Tensor | float | None:
    if normalizer is None:
        return None
    if reduction == "none":
        raise ValueError("normalizer cannot be combined with reduction='none'")
    if isinstance(normalizer, Tensor):
        if normalizer.dim() != 0:
            raise ValueError(
                f"normalizer must be a number or a 0-dim tensor, got shape {_shape(normalizer)}"
            )
        value = float(normalizer.detach().double().item())
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"normalizer must be a positive finite number, got {value}")
        return normalizer.detach()
    return _check_positive_finite("normalizer", normalizer)


def _reduce(
    values: Tensor,
    valid: Tensor,
    lead: tuple[int, ...],
    reduction: str,
    normalizer: Tensor | float | None,
) -> Tensor:
    """Apply the reduction to per-row values [N] (already 0 at invalid rows)."""
    values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if reduction == "none":
        return values.reshape(lead)
    total = values.sum()
    if normalizer is not None:
        return total / normalizer
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(values.dtype)


# --------------------------------------------------------------------------------------------
# Per-outcome divergence terms (shared by the sparse float64 row math and the dense chunks)


def _divergence_terms(
    divergence: str,
    logp: Tensor,
    logq: Tensor,
    beta: float,
    alpha: float,
    *,
    want_grad: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Elementwise terms of D(P, Q) (their sum over outcomes is D), g = dD/dlog Q_o (or None)
    and Q itself, from teacher and student log-probabilities of the same outcomes.

    Follows tests/reference_losses.py: 0 log 0 = 0, teacher probability floored at 1e-10 inside
    logarithms, mixtures unfloored; works in the log domain so that no 0 * inf arises. The
    masks test ``== 0`` so that a NaN probability propagates into the value (callers detect
    non-finite input from it). Each exponential is taken once (they dominate the dense cost).
    """
    zero = torch.zeros((), dtype=logq.dtype, device=logq.device)
    q = logq.exp()
    grad: Tensor | None = None
    if divergence in ("forward_kl", "reverse_kl", "jeffreys"):
        logp_floor = logp.clamp_min(_LOG_FLOOR)
        fwd_terms = rev_terms = fwd_grad = rev_grad = zero
        if divergence != "reverse_kl":
            p = logp.exp()
            fwd_terms = torch.where(p == 0, zero, p * (logp_floor - logq))
            fwd_grad = -p
        if divergence != "forward_kl":
            log_ratio = logq - logp_floor
            rev_terms = torch.where(q == 0, zero, q * log_ratio)
            if want_grad:
                rev_grad = torch.where(q == 0, zero, q * (log_ratio + 1))
        if divergence == "forward_kl":
            return fwd_terms, fwd_grad if want_grad else None, q
        if divergence == "reverse_kl":
            return rev_terms, rev_grad if want_grad else None, q
        if want_grad:
            grad = 0.5 * fwd_grad + 0.5 * rev_grad
        return 0.5 * fwd_terms + 0.5 * rev_terms, grad, q
    if divergence == "jsd":
        p = logp.exp()
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        q_part = torch.where(q == 0, zero, q * (logq - logm))
        p_part = torch.where(p == 0, zero, p * (logp.clamp_min(_LOG_FLOOR) - logm))
        if want_grad:
            grad = (1 - beta) * q_part
        return beta * p_part + (1 - beta) * q_part, grad, q
    if divergence == "skew_forward_kl":
        p = logp.exp()
        log_mix = torch.logaddexp(logp + math.log(alpha), logq + math.log1p(-alpha))
        terms = torch.where(p == 0, zero, p * (logp.clamp_min(_LOG_FLOOR) - log_mix))
        if want_grad:
            grad = torch.where(p == 0, zero, -(1 - alpha) * p * (logq - log_mix).exp())
        return terms, grad, q
    if divergence == "skew_reverse_kl":
        log_mix = torch.logaddexp(logp + math.log1p(-alpha), logq + math.log(alpha))
        log_ratio = logq - log_mix
        terms = torch.where(q == 0, zero, q * log_ratio)
        if want_grad:
            grad = torch.where(q == 0, zero, q * (log_ratio + 1 - alpha * log_ratio.exp()))
        return terms, grad, q
    if divergence == "tvd":
        p = logp.exp()
        if want_grad:
            grad = 0.5 * torch.sign(q - p) * q
        return 0.5 * (p - q).abs(), grad, q
    raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {divergence!r}")


def _rest_coefficient(
    divergence: str,
    logp: Tensor,
    logq: Tensor,
    grad_sum: Tensor,
    beta: float,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    """log|c| and sign(c) of c = g_rest / Q_rest - sum_o g_o for the bucket outcome ([N] f64).

    The gradient of a vocabulary entry v in the rest bucket is q_v * c / T. For the KL terms
    g_rest / Q_rest = -P_rest / Q_rest can exceed float64 when Q_rest is tiny, so c is kept as
    its logarithm; the product q_v * c = exp(log q_v + log|c|) stays finite (q_v <= Q_rest).
    """
    p = logp.exp()
    q = logq.exp()
    logp_floor = logp.clamp_min(_LOG_FLOOR)
    zero = torch.zeros((), dtype=logq.dtype, device=logq.device)
    kl_weight = 0.0  # weight w of the -w * P/Q term
    if divergence == "forward_kl":
        kl_weight, bounded = 1.0, torch.zeros_like(logq)
    elif divergence == "reverse_kl":
        bounded = logq - logp_floor + 1
    elif divergence == "jeffreys":
        kl_weight, bounded = 0.5, 0.5 * (logq - logp_floor + 1)
    elif divergence == "jsd":
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        bounded = (1 - beta) * (logq - logm)
    elif divergence == "skew_forward_kl":
        log_mix = torch.logaddexp(logp + math.log(alpha), logq + math.log1p(-alpha))
        bounded = torch.where(p == 0, zero, -(1 - alpha) * (logp - log_mix).exp())
    elif divergence == "skew_reverse_kl":
        log_mix = torch.logaddexp(logp + math.log1p(-alpha), logq + math.log(alpha))
        log_ratio = logq - log_mix
        bounded = log_ratio + 1 - alpha * log_ratio.exp()
    else:  # tvd
        bounded = 0.5 * torch.sign(q - p)
    offset = bounded - grad_sum
    if kl_weight == 0.0:
        log_abs, sign = offset.abs().log(), torch.sign(offset)
    else:
        log_ratio = torch.where(p > 0, logp - logq, torch.full_like(logq, _NEG_INF))
        huge = log_ratio > _LOG_RATIO_CUTOFF
        direct = offset - kl_weight * log_ratio.clamp_max(_LOG_RATIO_CUTOFF).exp()
        log_abs = torch.where(huge, math.log(kl_weight) + log_ratio, direct.abs().log())
        sign = torch.where(huge, torch.full_like(direct, -1.0), torch.sign(direct))
    # An empty or impossible bucket (every rest logit -inf, or K == V) has no entries to move.
    empty = ~(logq > _NEG_INF)
    log_abs = torch.where(empty, torch.full_like(log_abs, _NEG_INF), log_abs)
    sign = torch.where(empty, torch.zeros_like(sign), sign)
    return log_abs, sign


# --------------------------------------------------------------------------------------------
# Chunked passes over the student's vocabulary


def _wants_grad(z: Tensor) -> bool:
    """Whether autograd will ask for d loss / d z (grad mode is off inside Function.forward,
    and ctx.needs_input_grad ignores it, so the public functions decide before apply)."""
    return torch.is_grad_enabled() and z.requires_grad


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(n_rows: int, width: int, device: torch.device, temporaries: int = 1) -> int:
    budget = _CHUNK_ELEMENTS_CPU if device.type == "cpu" else _CHUNK_ELEMENTS_ACCELERATOR
    return max(1, min(max(n_rows, 1), budget // max(1, width * temporaries)))


def _logsumexp_(x: Tensor) -> Tensor:
    """Row logsumexp of a 2-D tensor, overwriting it (no temporary of its size).
    NaN or +inf in a row give NaN or +inf; an all -inf row gives -inf."""
    row_max = x.amax(dim=1, keepdim=True)
    row_max = torch.where(row_max.isfinite(), row_max, torch.zeros_like(row_max))
    total = x.sub_(row_max).exp_().sum(dim=1)
    return total.log_().add_(row_max.squeeze(1))


def _scaled_copy(out: Tensor, source: Tensor, temperature: float) -> Tensor:
    """out = source / temperature, computed in out's dtype."""
    if source.dtype == out.dtype and temperature != 1.0:
        return torch.div(source, temperature, out=out)
    out.copy_(source)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def _student_logsumexp(z: Tensor, temperature: float, exclude_ids: Tensor | None = None) -> Tensor:
    """[N] float64 logsumexp of z / T over each row, leaving out exclude_ids[r] when given.

    One pass over z in chunks of rows; the only temporary is one chunk in the math dtype."""
    n, width = z.shape
    math_dtype = _math_dtype(z.dtype)
    out = torch.empty(n, dtype=math_dtype, device=z.device)
    if n == 0:
        return out.double()
    rows = _chunk_rows(n, width, z.device)
    buffer = torch.empty((rows, width), dtype=math_dtype, device=z.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        chunk = _scaled_copy(buffer[: stop - start], z[start:stop], temperature)
        if exclude_ids is not None:
            chunk.scatter_(1, exclude_ids[start:stop], _NEG_INF)
        out[start:stop] = _logsumexp_(chunk)
    return out.double()


def _check_student_lse(lse: Tensor, valid: Tensor, where: str) -> None:
    _raise_if(valid & lse.isnan(), "student_logits", f"NaN in a row{where}")
    _raise_if(valid & (lse == _INF), "student_logits", f"+inf in a row{where}")
    _raise_if(
        valid & (lse == _NEG_INF),
        "student_logits",
        f"a row is -inf at every entry{where}; the student distribution is undefined",
    )


@dataclass
class _SparseGradient:
    """What the sparse backward needs: per row, the gradient on every vocabulary entry is
    sign * exp(z_v / T - lse + log_abs) (an O(V) pass), and at the ids the sparse values are
    written (bucket, renormalize) or added (sampled)."""

    lse: Tensor  # [N] f64
    log_abs: Tensor | None  # [N] f64; None: no O(V) part (renormalize)
    sign: Tensor | None  # [N] f64
    ids: Tensor  # [N, K] int64
    values: Tensor  # [N, K] f64
    accumulate: bool
    bad_rows: Tensor  # invalid rows whose logits hold NaN/+inf: their gradient is zeroed


def _sparse_backward(
    z: Tensor, temperature: float, saved: _SparseGradient, grad_output: Tensor
) -> Tensor:
    go = grad_output.to(torch.float64)
    sparse_values = (saved.values * go[:, None]).to(_math_dtype(z.dtype))
    n, width = z.shape
    if saved.log_abs is None or saved.sign is None:
        grad = torch.zeros_like(z, memory_format=torch.contiguous_format)
        grad.scatter_(1, saved.ids, sparse_values.to(z.dtype))
        return grad
    grad = torch.empty_like(z, memory_format=torch.contiguous_format)
    if n == 0:
        return grad
    math_dtype = _math_dtype(z.dtype)
    active = (saved.sign != 0) & (go != 0)
    shift = torch.where(
        active, saved.lse - saved.log_abs - go.abs().log(), torch.full_like(go, _INF)
    )
    neg_shift = (-shift).to(math_dtype)[:, None]
    sign = (saved.sign * torch.sign(go)).to(math_dtype)[:, None]
    # Rows with sign 0 already come out as exp(-inf) = 0; only negative signs need a pass.
    apply_sign = bool((sign < 0).any())
    rows = _chunk_rows(n, width, z.device)
    buffer = None
    if math_dtype != z.dtype:
        buffer = torch.empty((rows, width), dtype=math_dtype, device=z.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        out = grad[start:stop] if buffer is None else buffer[: stop - start]
        # z / T - shift in one pass (the broadcast [C, 1] operand sets the math dtype).
        torch.add(neg_shift[start:stop], z[start:stop], alpha=1.0 / temperature, out=out)
        out.exp_()
        if apply_sign:
            out.mul_(sign[start:stop])
        if saved.accumulate:
            out.scatter_add_(1, saved.ids[start:stop], sparse_values[start:stop])
        else:
            out.scatter_(1, saved.ids[start:stop], sparse_values[start:stop])
        if buffer is not None:
            grad[start:stop].copy_(out)
    if saved.bad_rows.numel():
        grad.index_fill_(0, saved.bad_rows, 0.0)
    return grad


def _bad_invalid_rows(lse: Tensor, valid: Tensor) -> Tensor:
    return (~valid & (lse.isnan() | (lse == _INF))).nonzero().squeeze(1)


# --------------------------------------------------------------------------------------------
# Top-K targets


def _topk_rows(
    z: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    valid: Tensor,
    *,
    divergences: tuple[str, ...],
    tail: str,
    temperature: float,
    teacher_temperature: float,
    beta: float,
    alpha: float,
    want_grad: bool,
) -> tuple[dict[str, Tensor], _SparseGradient | None]:
    """Per-row divergences [N] f64 of top-K targets (and the backward state for the first)."""
    k = ids.shape[1]
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    ids = torch.where(valid[:, None], ids.to(torch.int64), 0)  # garbage rows read id 0 only
    logprobs = torch.where(valid[:, None], logprobs.to(torch.float64), 0.0)
    x_s = z.gather(1, ids).to(torch.float64) / temperature
    lse_s = torch.logsumexp(x_s, dim=1)
    if tail == "renormalize":
        _check_student_lse(lse_s, valid, " at the ids of topk_ids (renormalize reads only those)")
        logq = x_s - lse_s[:, None]
        logp = torch.log_softmax(logprobs * (teacher_temperature / temperature), dim=1)
        lse = lse_s
    else:
        lse_rest = _student_logsumexp(z, temperature, exclude_ids=ids)
        lse = torch.logaddexp(lse_rest, lse_s)
        _check_student_lse(lse, valid, "")
        p_rest = (1.0 - logprobs.exp().sum(dim=1)).clamp_min(0.0)
        if k == z.shape[1]:
            # S is the whole student vocabulary: what 1 - sum p_S leaves is float rounding of
            # the teacher's softmax, not mass the student could give anywhere.
            p_rest = torch.zeros_like(p_rest)
        logp = torch.cat([logprobs, p_rest.log()[:, None]], dim=1)
        logq = torch.cat([x_s - lse[:, None], (lse_rest - lse)[:, None]], dim=1)
    values: dict[str, Tensor] = {}
    saved = None
    for i, divergence in enumerate(divergences):
        need_grad = want_grad and i == 0
        terms, g, q = _divergence_terms(divergence, logp, logq, beta, alpha, want_grad=need_grad)
        values[divergence] = torch.where(valid, terms.sum(dim=1), zero)
        if not need_grad:
            continue
        assert g is not None
        if tail == "bucket":
            # An empty rest bucket (K == V_s, or every other logit -inf) has log Q_rest = -inf
            # whatever z is: it contributes to the value (+inf when P_rest > 0) but not to the
            # gradient.
            g[:, k] = torch.where(logq[:, k] > _NEG_INF, g[:, k], zero)
        grad_sum = g.sum(dim=1)
        sparse = (g[:, :k] - q[:, :k] * grad_sum[:, None]) / temperature
        sparse = torch.where(valid[:, None], sparse, zero)
        log_abs = sign = None
        if tail == "bucket":
            log_abs, sign = _rest_coefficient(
                divergence, logp[:, k], logq[:, k], grad_sum, beta, alpha
            )
            log_abs = torch.where(valid, log_abs - math.log(temperature), _NEG_INF)
            sign = torch.where(valid, sign, zero)
        saved = _SparseGradient(
            lse=lse,
            log_abs=log_abs,
            sign=sign,
            ids=ids,
            values=sparse,
            accumulate=False,
            bad_rows=_bad_invalid_rows(lse, valid),
        )
    return values, saved


def _check_topk_teacher(
    ids: Tensor,
    logprobs: Tensor,
    valid: Tensor,
    vocab: int,
    tail: str,
    temperature: float,
    teacher_temperature: float,
) -> None:
    if tail == "bucket" and temperature != teacher_temperature:
        raise ValueError(
            f"temperature={temperature} differs from teacher_temperature={teacher_temperature}: "
            "re-tempering the teacher needs its probability mass outside the stored ids, which "
            "a top-K row does not have (tail='bucket'); use tail='renormalize' or the capture "
            "temperature"
        )
    _check_ids("topk_ids", ids, valid, vocab, None)
    live = valid[:, None]
    _raise_if((live & logprobs.isnan()).any(1), "topk_logprobs", "NaN log-probability")
    _raise_if((live & (logprobs == _INF)).any(1), "topk_logprobs", "+inf log-probability")
    if tail == "bucket":
        mass = torch.where(live, logprobs.double(), _NEG_INF).logsumexp(dim=1).exp()
        _raise_if(
            valid & (mass > MAX_TEACHER_MASS),
            "topk_logprobs",
            f"probabilities of a row sum above {MAX_TEACHER_MASS}; pass log-probabilities "
            "(log_softmax of the teacher logits), not logits",
        )
    else:
        _raise_if(
            valid & ~(live & (logprobs > _NEG_INF)).any(1),
            "topk_logprobs",
            "a row is -inf at every entry; tail='renormalize' needs some teacher mass",
        )


class _TopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: Tensor,
        ids: Tensor,
        logprobs: Tensor,
        valid: Tensor,
        options: dict[str, Any],
    ) -> Tensor:
        values, saved = _topk_rows(z, ids, logprobs, valid, **options)
        ctx.saved = saved
        ctx.temperature = options["temperature"]
        ctx.save_for_backward(z)
        return values[options["divergences"][0]].to(_math_dtype(z.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        # once_differentiable: the gradient is written with out= ops, which autograd cannot
        # differentiate again; create_graph=True then gets a gradient that is a leaf.
        (z,) = ctx.saved_tensors
        grad = _sparse_backward(z, ctx.temperature, ctx.saved, grad_output)
        return grad, None, None, None, None


# --------------------------------------------------------------------------------------------
# Sampled targets


def _sampled_rows(
    z: Tensor,
    ids: Tensor,
    counts: Tensor,
    logprobs: Tensor | None,
    valid: Tensor,
    *,
    temperature: float,
    want_grad: bool,
) -> tuple[Tensor, _SparseGradient | None]:
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    present = valid[:, None] & (counts > 0)
    ids = torch.where(present, ids.to(torch.int64), 0)
    weights = torch.where(present, counts.to(torch.float64), zero)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    if logprobs is None:
        logp = torch.where(present, weights.log(), zero)
    else:
        logp = torch.where(present, logprobs.to(torch.float64), zero)
    lse = _student_logsumexp(z, temperature)
    _check_student_lse(lse, valid, "")
    logq = z.gather(1, ids).to(torch.float64) / temperature - lse[:, None]
    values = torch.where(present, weights * (logp - logq), zero).sum(dim=1)
    if not want_grad:
        return values, None
    # d/dz_v = (q_v * sum_j w_j - w_v) / T and sum_j w_j = 1 on valid rows.
    saved = _SparseGradient(
        lse=lse,
        log_abs=torch.where(valid, zero - math.log(temperature), _NEG_INF),
        sign=valid.to(torch.float64),
        ids=ids,
        values=-weights / temperature,
        accumulate=True,
        bad_rows=_bad_invalid_rows(lse, valid),
    )
    return values, saved


def _check_sampled_teacher(
    ids: Tensor,
    counts: Tensor,
    logprobs: Tensor | None,
    valid: Tensor,
    vocab: int,
    temperature: float,
    teacher_temperature: float,
) -> None:
    if temperature != teacher_temperature:
        raise ValueError(
            f"temperature={temperature} differs from teacher_temperature={teacher_temperature}: "
            "draws from the teacher at its capture temperature cannot be re-tempered"
        )
    live = valid[:, None]
    _raise_if((live & (counts < 0)).any(1), "counts", "negative count")
    present = live & (counts > 0)
    # (Entries with count 0 are ignored whatever their id, as docs/losses.md says.)
    _raise_if((present & (ids < -1)).any(1), "ids", "ids below -1 (-1 is the padding id)")
    _raise_if(
        (present & (ids == -1)).any(1),
        "ids",
        "padding id -1 with a positive count (padding must have count 0)",
    )
    _check_ids("ids", ids, valid, vocab, counts > 0)
    _raise_if(
        valid & ~present.any(1),
        "counts",
        "a valid row has no draws (its counts sum to 0); mask it or drop it",
    )
    if logprobs is not None:
        _raise_if(
            (present & ~logprobs.isfinite()).any(1),
            "logprobs",
            "a sampled id has a NaN or infinite log-probability",
        )
        mass = torch.where(present, logprobs.double(), _NEG_INF).logsumexp(dim=1).exp()
        _raise_if(
            valid & (mass > MAX_TEACHER_MASS),
            "logprobs",
            f"probabilities of a row's sampled ids sum above {MAX_TEACHER_MASS}; pass "
            "log-probabilities, not logits",
        )


class _SampledFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: Tensor,
        ids: Tensor,
        counts: Tensor,
        logprobs: Tensor | None,
        valid: Tensor,
        temperature: float,
        want_grad: bool,
    ) -> Tensor:
        values, saved = _sampled_rows(
            z,
            ids,
            counts,
            logprobs,
            valid,
            temperature=temperature,
            want_grad=want_grad,
        )
        ctx.saved = saved
        ctx.temperature = temperature
        ctx.save_for_backward(z)
        return values.to(_math_dtype(z.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (z,) = ctx.saved_tensors
        grad = _sparse_backward(z, ctx.temperature, ctx.saved, grad_output)
        return grad, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Dense targets


def _dense_chunk_logprobs(
    z_chunk: Tensor, t_chunk: Tensor, temperature: float, math_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """log Q and log P [C, V_s] of one chunk of rows (the teacher zero-padded to V_s).

    A row with NaN or +inf, or -inf everywhere, comes out NaN; callers detect it from the
    row's value instead of making an extra pass."""
    if temperature != 1.0:
        z_chunk = z_chunk.to(math_dtype) / temperature
        t_chunk = t_chunk.to(math_dtype) / temperature
    logq = torch.log_softmax(z_chunk, dim=1, dtype=math_dtype)
    logp = torch.log_softmax(t_chunk, dim=1, dtype=math_dtype)
    v_s, v_t = z_chunk.shape[1], t_chunk.shape[1]
    if v_t != v_s:
        padded = torch.full_like(logq, _NEG_INF)
        padded[:, :v_t] = logp
        logp = padded
    return logq, logp


def _explain_bad_dense_row(z_row: Tensor, t_row: Tensor, row: int) -> ValueError:
    """The error for a kept row whose divergence came out NaN (only non-finite input does)."""
    for arg, values in (("student_logits", z_row), ("teacher_logits", t_row)):
        if bool(values.isnan().any()):
            return ValueError(f"{arg}: NaN in a row (first at flattened position {row})")
        if bool((values == _INF).any()):
            return ValueError(f"{arg}: +inf in a row (first at flattened position {row})")
        if bool((values == _NEG_INF).all()):
            return ValueError(
                f"{arg}: a row is -inf at every entry; its distribution is undefined "
                f"(first at flattened position {row})"
            )
    return ValueError(f"student_logits: the divergence is NaN at flattened position {row}")


def _dense_rows(
    z: Tensor,
    teacher: Tensor,
    valid: Tensor,
    *,
    divergences: tuple[str, ...],
    temperature: float,
    beta: float,
    alpha: float,
    want_grad: bool,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-row divergences against full teacher logits ([N] in the math dtype) and, when
    want_grad, the gradient of the first one's per-row values w.r.t. z (z's dtype, zero rows
    where not valid), written chunk by chunk while P and Q are at hand."""
    n, width = z.shape
    math_dtype = _math_dtype(z.dtype)
    values = {d: torch.zeros(n, dtype=math_dtype, device=z.device) for d in divergences}
    grad = torch.empty_like(z, memory_format=torch.contiguous_format) if want_grad else None
    keep = valid.to(math_dtype)[:, None] / temperature
    rows = _chunk_rows(n, width, z.device, temporaries=_DENSE_TEMPORARIES)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        logq, logp = _dense_chunk_logprobs(
            z[start:stop], teacher[start:stop], temperature, math_dtype
        )
        for i, divergence in enumerate(divergences):
            need_grad = grad is not None and i == 0
            terms, g, q = _divergence_terms(
                divergence, logp, logq, beta, alpha, want_grad=need_grad
            )
            values[divergence][start:stop] = terms.sum(dim=1)
            if need_grad:
                assert g is not None and grad is not None
                # dD/dz_v = (g_v - q_v * sum_o g_o) / T
                grad_sum = g.sum(dim=1, keepdim=True)
                chunk = g.sub_(q.mul_(grad_sum)).mul_(keep[start:stop])
                grad[start:stop].copy_(chunk)
    broken = values[divergences[0]].isnan()
    row = _first_bad_row(valid & broken)
    if row is not None:
        raise _explain_bad_dense_row(z[row], teacher[row], row)
    if grad is not None:
        bad_rows = (~valid & broken).nonzero().squeeze(1)
        if bad_rows.numel():
            grad.index_fill_(0, bad_rows, 0.0)
    zero = torch.zeros((), dtype=math_dtype, device=z.device)
    return {d: torch.where(valid, v, zero) for d, v in values.items()}, grad


class _DenseFunction(torch.autograd.Function):
    """Dense targets: the gradient is written during forward, while P and Q are in cache
    (recomputing both softmaxes in backward would nearly double the exponentials), and the
    first backward scales it in place by grad_output, so the memory is the gradient's own.
    A further backward through a retained graph (retain_graph=True, gradcheck) recomputes it
    from the saved inputs."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: Tensor,
        teacher: Tensor,
        valid: Tensor,
        options: dict[str, Any],
    ) -> Tensor:
        values, grad = _dense_rows(z, teacher, valid, **options)
        ctx.grad = grad
        ctx.options = options
        ctx.save_for_backward(z, teacher, valid)
        return values[options["divergences"][0]]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad = ctx.grad
        ctx.grad = None  # handed to autograd below; never touched again
        if grad is None:
            z, teacher, valid = ctx.saved_tensors
            options = {**ctx.options, "want_grad": True}
            _, grad = _dense_rows(z, teacher, valid, **options)
        scale = grad_output.to(_math_dtype(grad.dtype))[:, None]
        if grad.dtype == scale.dtype:
            grad.mul_(scale)
        else:  # bfloat16/float16: scale in float32 so that grad_output is not rounded too
            n, width = grad.shape
            rows = _chunk_rows(n, width, grad.device)
            for start in range(0, n, rows):
                stop = min(n, start + rows)
                grad[start:stop] = grad[start:stop].to(scale.dtype) * scale[start:stop]
        return grad, None, None, None


# --------------------------------------------------------------------------------------------
# Public functions


def sparse_kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: Tensor | float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Divergence between the student and a top-K teacher target at every position.

    Args:
        student_logits: ``[..., V_s]`` float32/bfloat16 (float16/float64 on the torch path);
            ``q = softmax(student_logits / temperature)`` over the full student vocabulary.
        topk_ids: ``[..., K]`` integer, distinct ids in ``[0, V_s)`` (teacher rank order).
        topk_logprobs: ``[..., K]`` float, the teacher's log-probabilities of ``topk_ids``
            under its full softmax at ``teacher_temperature``.
        divergence: one of :data:`DIVERGENCES` (docs/losses.md gives each definition).
        tail: ``"bucket"`` (K ids + one rest outcome, exact divergence of the coarsened
            distributions, needs ``temperature == teacher_temperature``) or ``"renormalize"``
            (both distributions restricted to the K ids and renormalized).
        temperature: ``T > 0`` applied to the student (and, re-tempering, to the teacher).
        teacher_temperature: the capture temperature of ``topk_logprobs`` (store manifest).
        beta: JSD mixing weight in (0, 1). alpha: skew weight in (0, 1).
        labels: ``[...]`` integer; positions whose label equals ``ignore_index`` are skipped.
        mask: ``[...]`` bool (True = keep); skipped positions contribute 0 and no gradient,
            and their teacher entries are not read.
        reduction: ``"mean"`` over kept positions (0.0 when none), ``"sum"``, or ``"none"``
            (shape ``[...]``, zeros at skipped positions).
        normalizer: positive number or 0-dim tensor; the loss is the sum divided by it.
        backend: ``"auto"``, ``"torch"`` or ``"rust"`` (docs/losses.md, "Backends").

    Returns:
        The loss (float32; float64 for float64 logits), differentiable w.r.t.
        ``student_logits`` only (teacher tensors are constants). No ``T^2`` factor.

    Raises:
        ValueError: naming the offending argument (shapes, dtypes, ids outside the student
            vocabulary or repeated, NaN/+inf logits, a temperature the bucket cannot serve,
            parameters out of range, unknown option names).
    """
    temperature, beta, alpha = _check_parameters(divergence, temperature, beta, alpha)
    teacher_temperature = _check_positive_finite("teacher_temperature", teacher_temperature)
    _check_choice("tail", tail, TAILS)
    _check_choice("reduction", reduction, REDUCTIONS)
    lead, z = _flatten_student(student_logits)
    ids = _flatten_teacher("topk_ids", topk_ids, lead, z.device, kind="int")
    logprobs = _flatten_teacher(
        "topk_logprobs", topk_logprobs, lead, z.device, kind="float", width=ids.shape[1]
    )
    valid = _valid_rows(lead, z.device, labels, ignore_index, mask)
    norm = _check_normalizer(normalizer, reduction)
    _check_topk_teacher(ids, logprobs, valid, z.shape[1], tail, temperature, teacher_temperature)
    if _resolve_backend(backend, z) == "rust":
        # The kernels take dense 2-D CPU tensors in the contract's dtypes (docs/losses.md).
        module, _ = _rust_kernels()
        assert module is not None
        values = module.rust_sparse_kd(
            z.contiguous(),
            ids.to(torch.int64).contiguous(),
            logprobs.to(torch.float32).contiguous(),
            valid,
            divergence=divergence,
            tail=tail,
            temperature=temperature,
            teacher_temperature=teacher_temperature,
            beta=beta,
            alpha=alpha,
        )
    else:
        options = {
            "want_grad": _wants_grad(z),
            "divergences": (divergence,),
            "tail": tail,
            "temperature": temperature,
            "teacher_temperature": teacher_temperature,
            "beta": beta,
            "alpha": alpha,
        }
        values = _TopKFunction.apply(z, ids, logprobs, valid, options)
    return _reduce(values, valid, lead, reduction, norm)


def sampled_kd_loss(
    student_logits: Tensor,
    ids: Tensor,
    counts: Tensor,
    logprobs: Tensor | None = None,
    *,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: Tensor | float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Forward KL estimated from teacher samples: ``sum_j w_j (log p_j - log q_j)``.

    ``w_j = counts_j / sum(counts)`` over the row's distinct sampled ids; the estimate is
    unbiased for the forward KL when ``logprobs`` holds the teacher's true log-probabilities.
    Without ``logprobs`` the empirical ``log w_j`` stands in for ``log p_j``: the value is the
    KL from the empirical distribution (not an unbiased KL estimate) and the gradient
    ``(q - w) / T`` is the same, unbiased for the dense forward-KL gradient.

    Args:
        student_logits: ``[..., V_s]`` float; ``q = softmax(student_logits / temperature)``.
        ids: ``[..., M]`` integer, distinct sampled ids in ``[0, V_s)``; ragged rows are padded
            with id -1 and count 0 (entries with count 0 are ignored whatever their id).
        counts: ``[..., M]`` integer >= 0, how often each id was drawn.
        logprobs: ``[..., M]`` float or None, the teacher's log-probabilities of ``ids``.
        temperature: must equal ``teacher_temperature`` (draws cannot be re-tempered).
        teacher_temperature: the capture temperature of the samples.
        labels, ignore_index, mask, reduction, normalizer, backend: as in
            :func:`sparse_kd_loss`.

    Returns:
        The loss (float32; float64 for float64 logits), differentiable w.r.t. student_logits.

    Raises:
        ValueError: naming the argument (shapes, ids outside the vocabulary or repeated,
            negative counts, a kept row without draws, non-finite logprobs, NaN logits,
            ``temperature != teacher_temperature``, ...).
    """
    temperature = _check_positive_finite("temperature", temperature)
    teacher_temperature = _check_positive_finite("teacher_temperature", teacher_temperature)
    _check_choice("reduction", reduction, REDUCTIONS)
    lead, z = _flatten_student(student_logits)
    ids2 = _flatten_teacher("ids", ids, lead, z.device, kind="int")
    counts2 = _flatten_teacher("counts", counts, lead, z.device, kind="int", width=ids2.shape[1])
    logprobs2 = None
    if logprobs is not None:
        logprobs2 = _flatten_teacher(
            "logprobs", logprobs, lead, z.device, kind="float", width=ids2.shape[1]
        )
    valid = _valid_rows(lead, z.device, labels, ignore_index, mask)
    norm = _check_normalizer(normalizer, reduction)
    _check_sampled_teacher(
        ids2, counts2, logprobs2, valid, z.shape[1], temperature, teacher_temperature
    )
    values = _sampled_values(z, ids2, counts2, logprobs2, valid, temperature, backend)
    return _reduce(values, valid, lead, reduction, norm)


def _sampled_values(
    z: Tensor,
    ids: Tensor,
    counts: Tensor,
    logprobs: Tensor | None,
    valid: Tensor,
    temperature: float,
    backend: str,
) -> Tensor:
    if _resolve_backend(backend, z) == "rust":
        module, _ = _rust_kernels()
        assert module is not None
        return module.rust_sampled_kd(
            z.contiguous(),
            ids.to(torch.int64).contiguous(),
            counts.to(torch.int64).contiguous(),
            None if logprobs is None else logprobs.to(torch.float32).contiguous(),
            valid,
            temperature=temperature,
            teacher_temperature=temperature,
        )
    return _SampledFunction.apply(z, ids, counts, logprobs, valid, temperature, _wants_grad(z))


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: Tensor | float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact divergence against full teacher logits (online and on-policy distillation).

    ``P = softmax(teacher_logits / T)`` over ``V_t``, zero-padded to the student's ``V_s``
    (``V_t <= V_s``); ``Q = softmax(student_logits / T)``. Use it with a live teacher (e.g.
    GKD-style on-policy training with ``divergence="jsd"`` or ``"reverse_kl"``) or as the
    reference the sparse losses approximate.

    Args:
        student_logits: ``[..., V_s]`` float.
        teacher_logits: ``[..., V_t]`` float (a constant: no gradient flows to it).
        divergence, temperature, beta, alpha, labels, ignore_index, mask, reduction,
            normalizer, backend: as in :func:`sparse_kd_loss`.

    Returns:
        The loss (float32; float64 for float64 logits), differentiable w.r.t. student_logits.

    Raises:
        ValueError: naming the argument (shapes, ``V_t > V_s``, NaN/+inf logits, ...).
    """
    temperature, beta, alpha = _check_parameters(divergence, temperature, beta, alpha)
    _check_choice("reduction", reduction, REDUCTIONS)
    lead, z = _flatten_student(student_logits)
    teacher = _flatten_teacher("teacher_logits", teacher_logits, lead, z.device, kind="float")
    if teacher.shape[1] > z.shape[1]:
        raise ValueError(
            f"teacher_logits has vocabulary {teacher.shape[1]} > student vocabulary "
            f"{z.shape[1]}: the student cannot represent the teacher's extra ids"
        )
    valid = _valid_rows(lead, z.device, labels, ignore_index, mask)
    norm = _check_normalizer(normalizer, reduction)
    if _resolve_backend(backend, z) == "rust":
        module, _ = _rust_kernels()
        assert module is not None
        if teacher.dtype not in (torch.float32, torch.bfloat16):
            teacher = teacher.to(torch.float32)
        values = module.rust_dense_kd(
            z.contiguous(),
            teacher.contiguous(),
            valid,
            divergence=divergence,
            temperature=temperature,
            beta=beta,
            alpha=alpha,
        )
    else:
        options = {
            "want_grad": _wants_grad(z),
            "divergences": (divergence,),
            "temperature": temperature,
            "beta": beta,
            "alpha": alpha,
        }
        values = _DenseFunction.apply(z, teacher, valid, options)
    return _reduce(values, valid, lead, reduction, norm)


# --------------------------------------------------------------------------------------------
# Batches of training targets

#: Batch keys :class:`KDLoss` and :func:`token_metrics` read (others are ignored).
BATCH_KEYS = (
    "labels",
    "mask",
    "topk_ids",
    "topk_logprobs",
    "sampled_ids",
    "sampled_counts",
    "sampled_logprobs",
    "teacher_logits",
)
_TARGET_KEYS = {
    "topk": ("topk_ids", "topk_logprobs"),
    "sampled": ("sampled_ids", "sampled_counts"),
    "dense": ("teacher_logits",),
}


def _target_kind(batch: Mapping[str, Any]) -> str:
    """Which teacher target a batch carries: "topk", "sampled" or "dense" (exactly one)."""
    present = {
        kind
        for kind, keys in _TARGET_KEYS.items()
        if any(batch.get(key) is not None for key in keys)
        or (kind == "sampled" and batch.get("sampled_logprobs") is not None)
    }
    if len(present) != 1:
        found = sorted(k for k in BATCH_KEYS if batch.get(k) is not None)
        raise ValueError(
            "batch must carry exactly one teacher target: topk_ids + topk_logprobs, "
            f"sampled_ids + sampled_counts (+ sampled_logprobs), or teacher_logits; found "
            f"keys {found}"
        )
    (kind,) = present
    for key in _TARGET_KEYS[kind]:
        if batch.get(key) is None:
            raise ValueError(f"batch is missing {key!r}, needed with the other {kind} keys")
    return kind


def _check_kd_weight(kd_weight: object) -> float:
    if isinstance(kd_weight, bool) or not isinstance(kd_weight, (int, float)):
        raise ValueError(f"kd_weight must be a number in [0, 1], got {kd_weight!r}")
    weight = float(kd_weight)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight!r}")
    return weight


def _cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    mask: Tensor | None,
    backend: str,
) -> Tensor:
    """Per-position hard-label cross-entropy ``-log softmax(z)[label]`` ([...], zeros where
    skipped): the sampled loss with one draw of the label, so it shares the chunked kernels."""
    lead, z = _flatten_student(student_logits)
    valid = _valid_rows(lead, z.device, labels, ignore_index, mask)
    flat = labels.reshape(-1)
    _raise_if(
        valid & ((flat < 0) | (flat >= z.shape[1])),
        "labels",
        f"labels must lie in [0, {z.shape[1]}) (the student vocabulary) or equal "
        f"ignore_index={ignore_index}",
    )
    ids = torch.where(valid, flat.to(torch.int64), -1)[:, None]
    counts = valid.to(torch.int64)[:, None]
    values = _sampled_values(z, ids, counts, None, valid, 1.0, backend)
    return _reduce(values, valid, lead, "none", None)


class KDLoss(nn.Module):
    """Knowledge-distillation loss for a batch of training targets (from a store: the
    README's "From a stored batch to the loss"):
    ``loss = kd_weight * T^2 * D(teacher, student) + (1 - kd_weight) * CE(labels, student)``.

    ``D`` is :func:`sparse_kd_loss`, :func:`sampled_kd_loss` or :func:`kd_loss`, chosen by the
    teacher target the batch carries (``topk_ids``/``topk_logprobs``,
    ``sampled_ids``/``sampled_counts``/``sampled_logprobs`` or ``teacher_logits``); ``CE`` is
    hard-label cross-entropy at temperature 1 on ``labels``. ``T^2`` (Hinton et al.) keeps the
    divergence's gradient scale independent of the temperature.

    Why cross-entropy is mixed in by default (``kd_weight=0.5``): a student fitted to top-K
    targets alone never sees the shape of the teacher's tail. The issue that specified this
    loss reports, for a small Llama-style teacher (V = 8192, Python source) and a 2-layer
    student trained 500 steps (perplexity, lower is better): cross-entropy only 102.4; dense
    forward KL 88.0; top-64 forward KL alone (bucket tail) 135.6, worse than no teacher;
    top-64 KL + CE (0.5/0.5) 88.3; top-8 KL + CE 93.8; sampled targets with 50 draws 89.3
    alone and 84.1 with CE; dense KD + CE 83.6. (Those are the issue's measurements, not
    re-run here.) Sparse targets plus CE match dense KD; set ``kd_weight=1.0`` for pure
    distillation.

    The mixing weight is ``kd_weight`` because ``alpha`` is the skew parameter of the
    ``skew_*`` divergences. Positions whose label is ``ignore_index`` or whose mask is False
    contribute nothing to either term; both terms share the reduction.

    Example::

        loss_fn = KDLoss(divergence="forward_kl", temperature=1.0, kd_weight=0.5)
        for batch in loader:          # keys of BATCH_KEYS (labels shifted by the caller)
            logits = model(batch["input_ids"]).logits
            loss = loss_fn(logits, batch)
            loss.backward()
    """

    def __init__(
        self,
        *,
        divergence: str = "forward_kl",
        tail: str = "bucket",
        temperature: float = 1.0,
        teacher_temperature: float = 1.0,
        beta: float = 0.5,
        alpha: float = 0.1,
        kd_weight: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        """Configure once; every argument is validated here (ValueError naming it).

        Args:
            divergence, tail, temperature, teacher_temperature, beta, alpha, ignore_index,
                reduction, backend: as in :func:`sparse_kd_loss` (``tail`` applies to top-K
                targets; sampled targets need ``temperature == teacher_temperature``).
            kd_weight: weight of the distillation term in [0, 1]; ``1 - kd_weight`` weights
                the cross-entropy. Below 1 the batch must carry ``labels``.
        """
        super().__init__()
        _check_parameters(divergence, temperature, beta, alpha)
        _check_positive_finite("teacher_temperature", teacher_temperature)
        _check_choice("tail", tail, TAILS)
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_choice("backend", backend, BACKENDS)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        self.divergence = divergence
        self.tail = tail
        self.temperature = float(temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.kd_weight = _check_kd_weight(kd_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, tail={self.tail!r}, "
            f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, "
            f"kd_weight={self.kd_weight}, reduction={self.reduction!r}"
        )

    def forward(
        self,
        student_logits: Tensor,
        batch: Mapping[str, Any],
        *,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        normalizer: Tensor | float | None = None,
        divergence: str | None = None,
        tail: str | None = None,
        temperature: float | None = None,
        teacher_temperature: float | None = None,
        beta: float | None = None,
        alpha: float | None = None,
        kd_weight: float | None = None,
        reduction: str | None = None,
    ) -> Tensor:
        """The loss for one batch.

        Args:
            student_logits: ``[..., V_s]``, position-aligned with the batch's targets.
            batch: a mapping with the keys of :data:`BATCH_KEYS` (others such as
                ``input_ids`` are ignored). Exactly one teacher target kind must be present
                unless ``kd_weight == 0``.
            labels, mask: override ``batch["labels"]`` / ``batch["mask"]``.
            normalizer: divide the summed loss by it (gradient accumulation).
            divergence, tail, temperature, teacher_temperature, beta, alpha, kd_weight,
                reduction: override the configured value for this call.

        Returns:
            A scalar (``reduction`` "mean"/"sum") or a ``[...]`` tensor ("none").
        """
        if not isinstance(batch, Mapping):
            raise ValueError(f"batch must be a mapping of tensors, got {type(batch)}")
        weight = _check_kd_weight(self.kd_weight if kd_weight is None else kd_weight)
        temp = self.temperature if temperature is None else temperature
        reduction = self.reduction if reduction is None else reduction
        _check_choice("reduction", reduction, REDUCTIONS)
        labels = batch.get("labels") if labels is None else labels
        mask = batch.get("mask") if mask is None else mask
        if weight < 1.0 and labels is None:
            raise ValueError(
                f"labels are required when kd_weight={weight} < 1 (the cross-entropy term); "
                "pass batch['labels'] or set kd_weight=1.0"
            )
        lead, _ = _flatten_student(student_logits)
        common: dict[str, Any] = {
            "labels": labels,
            "ignore_index": self.ignore_index,
            "mask": mask,
            "reduction": "none",
            "backend": self.backend,
        }
        total: Tensor | None = None
        if weight > 0.0:
            kind = _target_kind(batch)
            options: dict[str, Any] = {"temperature": temp, **common}
            if kind != "sampled":
                options["divergence"] = self.divergence if divergence is None else divergence
                options["beta"] = self.beta if beta is None else beta
                options["alpha"] = self.alpha if alpha is None else alpha
            if kind != "dense":
                options["teacher_temperature"] = (
                    self.teacher_temperature if teacher_temperature is None else teacher_temperature
                )
            if kind == "topk":
                per_position = sparse_kd_loss(
                    student_logits,
                    batch["topk_ids"],
                    batch["topk_logprobs"],
                    tail=self.tail if tail is None else tail,
                    **options,
                )
            elif kind == "sampled":
                if divergence is not None and divergence != "forward_kl":
                    raise ValueError(
                        f"divergence={divergence!r}: sampled targets support forward_kl only"
                    )
                if divergence is None and self.divergence != "forward_kl":
                    raise ValueError(
                        f"divergence={self.divergence!r}: sampled targets support forward_kl only"
                    )
                per_position = sampled_kd_loss(
                    student_logits,
                    batch["sampled_ids"],
                    batch["sampled_counts"],
                    batch.get("sampled_logprobs"),
                    **options,
                )
            else:
                per_position = kd_loss(student_logits, batch["teacher_logits"], **options)
            total = (weight * float(temp) ** 2) * per_position
        if weight < 1.0:
            assert labels is not None
            ce = _cross_entropy(student_logits, labels, self.ignore_index, mask, self.backend)
            total = (1.0 - weight) * ce if total is None else total + (1.0 - weight) * ce
        assert total is not None
        lead_valid = _valid_rows(lead, student_logits.device, labels, self.ignore_index, mask)
        norm = _check_normalizer(normalizer, reduction)
        return _reduce(total.reshape(-1), lead_valid, lead, reduction, norm)


# --------------------------------------------------------------------------------------------
# Evaluation metrics


@torch.no_grad()
def token_metrics(
    student_logits: Tensor,
    batch: Mapping[str, Any] | None = None,
    *,
    topk_ids: Tensor | None = None,
    topk_logprobs: Tensor | None = None,
    sampled_ids: Tensor | None = None,
    sampled_counts: Tensor | None = None,
    sampled_logprobs: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    tail: str = "bucket",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> dict[str, Tensor]:
    """Teacher-student agreement per position (``reduction="none"``) or reduced, without grad.

    Targets come from ``batch`` (data-layer keys) and/or the keyword tensors (which win).

    * top-K (``topk_ids``/``topk_logprobs``, coarsened by ``tail``) and dense
      (``teacher_logits``): ``forward_kl``, ``reverse_kl``, ``tvd``, ``acceptance_rate``
      (``1 - tvd``: the expected token acceptance of speculative decoding with the student as
      drafter) and ``top1_agreement`` (1.0 where the student's argmax over its vocabulary is
      the teacher's top-1 id, the highest-logprob id of a top-K row). With ``tail="bucket"``
      the divergences are those of the coarsened distributions, lower bounds of the
      full-vocabulary ones (so ``acceptance_rate`` is an upper bound); with ``"renormalize"``
      they compare the two distributions restricted to the K ids.
    * sampled (``sampled_ids``/``sampled_counts`` + ``sampled_logprobs``, required):
      ``forward_kl`` only, the unbiased estimate of :func:`sampled_kd_loss`. Reverse KL, TVD
      and top-1 agreement have no unbiased estimate from draws, so they are not reported.

    Runs on the torch path (one chunked pass over the vocabulary for the three divergences).

    Returns:
        dict of metric name to tensor: 0-dim ("mean" over kept positions, 0.0 when none;
        "sum") or ``[...]`` ("none", zeros at skipped positions). float32 (float64 for
        float64 logits).
    """
    merged: dict[str, Any] = dict(batch) if batch is not None else {}
    for key, value in (
        ("topk_ids", topk_ids),
        ("topk_logprobs", topk_logprobs),
        ("sampled_ids", sampled_ids),
        ("sampled_counts", sampled_counts),
        ("sampled_logprobs", sampled_logprobs),
        ("teacher_logits", teacher_logits),
        ("labels", labels),
        ("mask", mask),
    ):
        if value is not None:
            merged[key] = value
    temperature = _check_positive_finite("temperature", temperature)
    teacher_temperature = _check_positive_finite("teacher_temperature", teacher_temperature)
    _check_choice("tail", tail, TAILS)
    _check_choice("reduction", reduction, REDUCTIONS)
    kind = _target_kind(merged)
    lead, z = _flatten_student(student_logits)
    z = z.detach()
    valid = _valid_rows(lead, z.device, merged.get("labels"), ignore_index, merged.get("mask"))
    out_dtype = _math_dtype(z.dtype)
    divergences = ("forward_kl", "reverse_kl", "tvd")
    if kind == "sampled":
        if merged.get("sampled_logprobs") is None:
            raise ValueError(
                "sampled_logprobs is required for sampled targets: without the teacher's "
                "log-probabilities the draws give no unbiased divergence estimate"
            )
        ids = _flatten_teacher("sampled_ids", merged["sampled_ids"], lead, z.device, kind="int")
        width = ids.shape[1]
        counts = _flatten_teacher(
            "sampled_counts", merged["sampled_counts"], lead, z.device, kind="int", width=width
        )
        logprobs = _flatten_teacher(
            "sampled_logprobs",
            merged["sampled_logprobs"],
            lead,
            z.device,
            kind="float",
            width=width,
        )
        _check_sampled_teacher(
            ids, counts, logprobs, valid, z.shape[1], temperature, teacher_temperature
        )
        values, _ = _sampled_rows(
            z, ids, counts, logprobs, valid, temperature=temperature, want_grad=False
        )
        return {"forward_kl": _reduce(values.to(out_dtype), valid, lead, reduction, None)}
    if kind == "topk":
        ids = _flatten_teacher("topk_ids", merged["topk_ids"], lead, z.device, kind="int")
        logprobs = _flatten_teacher(
            "topk_logprobs",
            merged["topk_logprobs"],
            lead,
            z.device,
            kind="float",
            width=ids.shape[1],
        )
        _check_topk_teacher(
            ids, logprobs, valid, z.shape[1], tail, temperature, teacher_temperature
        )
        rows, _ = _topk_rows(
            z,
            ids,
            logprobs,
            valid,
            divergences=divergences,
            tail=tail,
            temperature=temperature,
            teacher_temperature=teacher_temperature,
            beta=0.5,
            alpha=0.1,
            want_grad=False,
        )
        teacher_top1 = ids.gather(1, logprobs.argmax(dim=1, keepdim=True)).squeeze(1)
    else:
        teacher = _flatten_teacher(
            "teacher_logits", merged["teacher_logits"], lead, z.device, kind="float"
        )
        if teacher.shape[1] > z.shape[1]:
            raise ValueError(
                f"teacher_logits has vocabulary {teacher.shape[1]} > student vocabulary "
                f"{z.shape[1]}"
            )
        rows, _ = _dense_rows(
            z,
            teacher,
            valid,
            divergences=divergences,
            temperature=temperature,
            beta=0.5,
            alpha=0.1,
            want_grad=False,
        )
        teacher_top1 = teacher.argmax(dim=1)
    agreement = (z.argmax(dim=1) == teacher_top1.to(torch.int64)).to(out_dtype)
    per_row = {name: value.to(out_dtype) for name, value in rows.items()}
    per_row["acceptance_rate"] = 1.0 - per_row["tvd"]
    per_row["top1_agreement"] = agreement
    return {name: _reduce(value, valid, lead, reduction, None) for name, value in per_row.items()}
