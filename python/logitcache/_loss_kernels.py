"""The fused Rust CPU loss kernels as differentiable torch functions (``backend="rust"``).

Each function takes 2-D CPU tensors (callers flatten leading dimensions) and returns the
per-row divergence ``[N]`` float32, differentiable with respect to ``student_logits``. The
kernel computes the gradient in the forward pass (one fused pass per row) into a tensor
allocated here; backward scales it by ``grad_output[:, None]`` in place and hands it over,
so no second ``[N, V]`` buffer is ever made. Tensors reach Rust as zero-copy numpy views
(bfloat16 as 16-bit integer views, since numpy has no bfloat16) and the GIL is released
while the kernel runs. Rows with ``valid[r] == False`` give 0 and a zero gradient row; their
teacher entries are not read. Every bad argument raises ``ValueError`` naming it.

This is the only module that knows the binding names of the loss kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_KERNELS: tuple[Any, ...] | None
try:
    from logitcache import _core

    _KERNELS = (_core.sparse_kd, _core.sampled_kd, _core.dense_kd, _core.scale_rows)
except (ImportError, AttributeError):  # an extension built without the loss kernels
    _KERNELS = None

__all__ = ["rust_dense_kd", "rust_kernels_available", "rust_sampled_kd", "rust_sparse_kd"]

_LOGIT_DTYPES = (torch.float32, torch.bfloat16)


def rust_kernels_available() -> bool:
    """Whether the compiled extension provides the loss kernels."""
    return _KERNELS is not None


def _require_kernels() -> None:
    if _KERNELS is None:
        raise RuntimeError("the logitcache extension was built without the loss kernels")


def _check_tensor(name: str, t: Any, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"`{name}` must be on the CPU for the rust backend, got {t.device}")
    if t.dim() != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def _logits(name: str, t: Any) -> torch.Tensor:
    t = _check_tensor(name, t, 2)
    if t.dtype not in _LOGIT_DTYPES:
        raise ValueError(
            f"`{name}` must be float32 or bfloat16 for the rust backend, got {t.dtype}"
        )
    return t.detach().contiguous()


def _rows(name: str, t: torch.Tensor, n: int) -> None:
    if t.shape[0] != n:
        raise ValueError(f"`{name}` has {t.shape[0]} rows, `student_logits` has {n}")


def _ids(name: str, t: Any, n: int) -> torch.Tensor:
    t = _check_tensor(name, t, 2)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integers, got {t.dtype}")
    _rows(name, t, n)
    return t.detach().to(torch.int64).contiguous()


def _floats(name: str, t: Any, shape: tuple[int, ...]) -> torch.Tensor:
    t = _check_tensor(name, t, len(shape))
    if not t.dtype.is_floating_point:
        raise ValueError(f"`{name}` must be floating point, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {tuple(t.shape)}")
    return t.detach().to(torch.float32).contiguous()


def _valid(t: Any, n: int) -> torch.Tensor:
    t = _check_tensor("valid", t, 1)
    if t.dtype != torch.bool:
        raise ValueError(f"`valid` must be a bool tensor, got {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"`valid` has {t.shape[0]} entries, `student_logits` has {n} rows")
    return t.contiguous()


def _temperature(name: str, value: Any) -> float:
    t = _number(name, value)
    if not (t > 0 and t != float("inf")):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
    return t


def _name(arg: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"`{arg}` must be a string, got {value!r}")
    return value


def _number(arg: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{arg}` must be a number, got {value!r}") from None


def _np(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor (bfloat16 as uint16 bit patterns)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _outputs(logits: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    values = torch.empty(logits.shape[0], dtype=torch.float32)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if with_grad else None
    return values, grad


class _PrecomputedGrad(torch.autograd.Function):
    """values = kernel(student_logits, ...); the kernel wrote d values / d logits already."""

    @staticmethod
    def forward(
        ctx: Any,
        student_logits: torch.Tensor,
        z: tuple[torch.Tensor],
        run: Any,
        targets: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        # `z` (the logits as the kernel reads them, a copy where they were not contiguous
        # float32/bfloat16) comes in a tuple, which autograd does not look into, and is not
        # kept: a second backward converts the saved logits again. `targets` are the other
        # tensors `run` reads (views of the caller's where no conversion was needed): saved
        # too, so that autograd refuses a second backward after any of them changed in place.
        values, grad = run(z[0], True)
        ctx.grad = grad
        ctx.run = run
        ctx.save_for_backward(student_logits, *targets)
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None]:
        grad = ctx.grad
        if grad is None:
            # A second backward through a retained graph: the first one handed the gradient
            # over (scaled in place), so the kernel runs again, as the torch path recomputes
            # (saved_tensors raises if the logits were changed in place since).
            logits = ctx.saved_tensors[0]
            _, grad = ctx.run(_logits("student_logits", logits), True)
        ctx.grad = None
        if not bool((grad_output == 1).all()):
            # In place, in parallel, bf16 rows scaled in f32 and rounded once: torch's
            # mixed-dtype mul_ would make an [N, V] float32 temporary for bf16 gradients.
            factors = grad_output.detach().to(torch.float32).contiguous()
            _core.scale_rows(_np(grad), _np(factors))
        return grad, None, None, None


def _apply(
    student_logits: torch.Tensor, z: torch.Tensor, run: Any, *targets: torch.Tensor | None
) -> torch.Tensor:
    if not (torch.is_grad_enabled() and student_logits.requires_grad):
        # No gradient will be asked for (torch.no_grad(), inference_mode, or logits that do
        # not require it): no [N, V] gradient to compute. (Inside Function.forward grad mode
        # is off, and ctx.needs_input_grad ignores it: this is decided here.)
        values, _ = run(z, False)
        return values
    # `run` goes through apply as a plain Python object (not a tensor): autograd ignores it.
    kept = tuple(t for t in targets if t is not None)
    return _PrecomputedGrad.apply(student_logits, (z,), run, kept)


def rust_sparse_kd(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    valid: torch.Tensor,
    *,
    divergence: str,
    tail: str,
    temperature: float,
    teacher_temperature: float,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """Per-row divergence between top-K teacher targets and the student (Rust kernel).

    Args:
        student_logits: ``[N, V_s]`` float32 or bfloat16 CPU tensor.
        ids: ``[N, K]`` integer token ids in teacher rank order, distinct in valid rows.
        logprobs: ``[N, K]`` teacher log-probabilities at ``teacher_temperature``.
        valid: ``[N]`` bool; False rows give 0 and are not read.
        divergence: one of forward_kl, reverse_kl, jsd, jeffreys, skew_forward_kl,
            skew_reverse_kl, tvd.
        tail: "bucket" (K ids + the rest; needs temperature == teacher_temperature) or
            "renormalize" (both distributions renormalized over the K ids).
        temperature, teacher_temperature: > 0.
        beta: JSD weight in (0, 1) (read for jsd only).
        alpha: skew weight in (0, 1) (read for the skew divergences only).

    Returns:
        ``[N]`` float32, differentiable with respect to ``student_logits``.
    """
    _require_kernels()
    z = _logits("student_logits", student_logits)
    n = z.shape[0]
    ids_ = _ids("ids", ids, n)
    lp = _floats("logprobs", logprobs, tuple(ids_.shape))
    ok = _valid(valid, n)
    t = _temperature("temperature", temperature)
    tc = _temperature("teacher_temperature", teacher_temperature)
    div, tail_ = _name("divergence", divergence), _name("tail", tail)
    b, a = _number("beta", beta), _number("alpha", alpha)

    def run(z: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        values, grad = _outputs(z, with_grad)
        _core.sparse_kd(
            _np(z),
            _np(ids_),
            _np(lp),
            _np(ok),
            _np(values),
            None if grad is None else _np(grad),
            divergence=div,
            tail=tail_,
            temperature=t,
            teacher_temperature=tc,
            beta=b,
            alpha=a,
        )
        return values, grad

    return _apply(student_logits, z, run, ids_, lp, ok)


def rust_sampled_kd(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    logprobs: torch.Tensor | None,
    valid: torch.Tensor,
    *,
    temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """Per-row forward-KL estimate from sampled teacher ids (Rust kernel).

    ``sum_j w_j (log p_j - log q_j)`` with ``w_j = counts_j / sum(counts)``; without
    ``logprobs`` the empirical ``log w_j`` stands in for ``log p_j`` (same gradient).

    Args:
        student_logits: ``[N, V_s]`` float32 or bfloat16 CPU tensor.
        ids: ``[N, M]`` integer ids, distinct among the entries with a count; -1 pads.
        counts: ``[N, M]`` integer counts >= 0 (0 pads); a valid row's counts sum to > 0.
        logprobs: ``[N, M]`` teacher log-probabilities, or None.
        valid: ``[N]`` bool; False rows give 0 and are not read.
        temperature, teacher_temperature: equal and > 0.

    Returns:
        ``[N]`` float32, differentiable with respect to ``student_logits``.
    """
    _require_kernels()
    z = _logits("student_logits", student_logits)
    n = z.shape[0]
    ids_ = _ids("ids", ids, n)
    counts_ = _ids("counts", counts, n)
    if counts_.shape != ids_.shape:
        raise ValueError(
            f"`counts` must have the shape of `ids` {tuple(ids_.shape)}, got {tuple(counts_.shape)}"
        )
    lp = None if logprobs is None else _floats("logprobs", logprobs, tuple(ids_.shape))
    ok = _valid(valid, n)
    t = _temperature("temperature", temperature)
    tc = _temperature("teacher_temperature", teacher_temperature)

    def run(z: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        values, grad = _outputs(z, with_grad)
        _core.sampled_kd(
            _np(z),
            _np(ids_),
            _np(counts_),
            None if lp is None else _np(lp),
            _np(ok),
            _np(values),
            None if grad is None else _np(grad),
            temperature=t,
            teacher_temperature=tc,
        )
        return values, grad

    return _apply(student_logits, z, run, ids_, counts_, lp, ok)


def rust_dense_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor,
    *,
    divergence: str,
    temperature: float,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """Per-row divergence between full teacher logits and the student (Rust kernel).

    ``P = softmax(teacher_logits / T)``, zero-padded to the student's vocabulary when
    ``V_t < V_s``; every divergence is exact over the vocabulary.

    Args:
        student_logits: ``[N, V_s]`` float32 or bfloat16 CPU tensor.
        teacher_logits: ``[N, V_t]`` float32 or bfloat16, ``V_t <= V_s`` (a constant).
        valid: ``[N]`` bool; False rows give 0 and are not read.
        divergence, beta, alpha: as in :func:`rust_sparse_kd`.
        temperature: > 0, applied to both logits.

    Returns:
        ``[N]`` float32, differentiable with respect to ``student_logits``.
    """
    _require_kernels()
    z = _logits("student_logits", student_logits)
    n = z.shape[0]
    teacher = _logits("teacher_logits", teacher_logits)
    _rows("teacher_logits", teacher, n)
    if teacher.shape[1] > z.shape[1]:
        raise ValueError(
            f"`teacher_logits` is wider ({teacher.shape[1]}) than `student_logits` "
            f"({z.shape[1]}); the student may be padded, the teacher may not"
        )
    ok = _valid(valid, n)
    t = _temperature("temperature", temperature)
    div = _name("divergence", divergence)
    b, a = _number("beta", beta), _number("alpha", alpha)

    def run(z: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        values, grad = _outputs(z, with_grad)
        _core.dense_kd(
            _np(z),
            _np(teacher),
            _np(ok),
            _np(values),
            None if grad is None else _np(grad),
            divergence=div,
            temperature=t,
            beta=b,
            alpha=a,
        )
        return values, grad

    return _apply(student_logits, z, run, teacher, ok)
