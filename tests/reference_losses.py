"""Float64 reference of every distillation loss in ../shared/DESIGN.md ("Losses").

Written plainly, one row at a time over dense vectors, so that it can be read against the
design and trusted; every fast path (torch and Rust, sparse and dense) is tested against it.
It is differentiable with torch autograd wherever the loss is (finite inputs), which gives the
reference gradient too.

A row is described by the student logits ``z`` ([V_s] float64) and one teacher target:
  * ``TopK(ids, logprobs)``: K ids by teacher rank and their log-probabilities at the capture
    temperature ``teacher_temperature``; ``tail`` chooses "bucket" or "renormalize".
  * ``Dense(logits)``: the teacher's full logits over V_t <= V_s.
  * ``Sampled(ids, counts, logprobs)``: distinct ids of n draws and their counts (padding
    id -1 / count 0 allowed); log-probabilities optional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOOR = 1e-10
DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "jeffreys",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
)


@dataclass
class TopK:
    ids: torch.Tensor  # [K] int64
    logprobs: torch.Tensor  # [K] float64


@dataclass
class Dense:
    logits: torch.Tensor  # [V_t] float64


@dataclass
class Sampled:
    ids: torch.Tensor  # [M] int64, -1 for padding
    counts: torch.Tensor  # [M] int64, 0 for padding
    logprobs: torch.Tensor | None = None  # [M] float64


def _xlogy_floor(p: torch.Tensor, p_for_log: torch.Tensor) -> torch.Tensor:
    """p * log(max(p_for_log, FLOOR)) with 0 log 0 = 0 (the teacher side of a KL)."""
    safe = torch.where(p > 0, p_for_log.clamp_min(FLOOR), torch.ones_like(p))
    return torch.where(p > 0, p * torch.log(safe), torch.zeros_like(p))


def _plogq(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum p * log q with 0 * log 0 = 0 (q may be 0 where p is 0)."""
    safe = torch.where(p > 0, log_q, torch.zeros_like(log_q))
    return (p * safe).sum()


def divergence_between(
    p: torch.Tensor,
    log_q: torch.Tensor,
    divergence: str,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """D(P, Q) for teacher probabilities ``p`` and student log-probabilities ``log_q``
    over the same outcomes, exactly as DESIGN.md defines each divergence."""
    q = torch.exp(log_q)
    if divergence == "forward_kl":
        return _xlogy_floor(p, p).sum() - _plogq(p, log_q)
    if divergence == "reverse_kl":
        return _plogq(q, log_q) - _plogq(q, torch.log(p.clamp_min(FLOOR)))
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        log_m = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
        kl_pm = _xlogy_floor(p, p).sum() - _plogq(p, log_m)
        kl_qm = _plogq(q, log_q) - _plogq(q, log_m)
        return beta * kl_pm + (1 - beta) * kl_qm
    if divergence == "jeffreys":
        fwd = divergence_between(p, log_q, "forward_kl")
        rev = divergence_between(p, log_q, "reverse_kl")
        return 0.5 * fwd + 0.5 * rev
    if divergence == "skew_forward_kl":
        mix = alpha * p + (1 - alpha) * q
        log_mix = torch.log(torch.where(mix > 0, mix, torch.ones_like(mix)))
        return _xlogy_floor(p, p).sum() - _plogq(p, log_mix)
    if divergence == "skew_reverse_kl":
        mix = (1 - alpha) * p + alpha * q
        log_mix = torch.log(torch.where(mix > 0, mix, torch.ones_like(mix)))
        return _plogq(q, log_q) - _plogq(q, log_mix)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum()
    raise ValueError(f"unknown divergence {divergence!r}")


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    return x - torch.logsumexp(x, dim=-1)


def target_distributions(
    z: torch.Tensor,
    target: TopK | Dense | Sampled,
    *,
    tail: str = "bucket",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, log Q) over the outcomes the design assigns to this target and tail mode."""
    z = z.to(torch.float64)
    v_s = z.shape[-1]
    log_q_full = _log_softmax(z / temperature)
    if isinstance(target, Dense):
        t = target.logits.to(torch.float64)
        p = torch.zeros(v_s, dtype=torch.float64)
        p[: t.shape[-1]] = torch.softmax(t / temperature, dim=-1)
        return p, log_q_full
    if isinstance(target, Sampled):
        raise ValueError("sampled targets have no (P, Q) pair; use sampled_reference")
    ids = target.ids.to(torch.int64)
    logp = target.logprobs.to(torch.float64)
    if tail == "renormalize":
        p = torch.softmax(logp * teacher_temperature / temperature, dim=-1)
        log_q = _log_softmax(z[ids] / temperature)
        return p, log_q
    if tail != "bucket":
        raise ValueError(f"unknown tail {tail!r}")
    if temperature != teacher_temperature:
        raise ValueError("bucket tail needs temperature == teacher_temperature")
    p_s = torch.exp(logp)
    p_rest = (1.0 - p_s.sum()).clamp_min(0.0)
    in_s = torch.zeros(v_s, dtype=torch.bool)
    in_s[ids] = True
    if bool(in_s.all()):
        # S is the whole student vocabulary: 1 - sum p_S is float rounding, not mass.
        p_rest = torch.zeros_like(p_rest)
    log_q_s = log_q_full[ids]
    if bool(in_s.all()):
        log_q_rest = torch.tensor(float("-inf"), dtype=torch.float64)
    else:
        log_q_rest = torch.logsumexp(log_q_full[~in_s], dim=-1)
    p = torch.cat([p_s, p_rest.reshape(1)])
    log_q = torch.cat([log_q_s, log_q_rest.reshape(1)])
    return p, log_q


def sampled_reference(
    z: torch.Tensor, target: Sampled, *, temperature: float = 1.0
) -> torch.Tensor:
    """sum_j w_j (log p_j - log q_j), w_j = count_j / n; without teacher log-probabilities
    the empirical log w_j stands in for log p_j (KL from the empirical distribution; the
    gradient is the same)."""
    z = z.to(torch.float64)
    log_q_full = _log_softmax(z / temperature)
    keep = target.counts > 0
    ids = target.ids[keep].to(torch.int64)
    w = target.counts[keep].to(torch.float64)
    w = w / w.sum()
    if target.logprobs is None:
        log_p = torch.log(w)
    else:
        log_p = target.logprobs[keep].to(torch.float64)
    return (w * (log_p - log_q_full[ids])).sum()


def reference_loss_row(
    z: torch.Tensor,
    target: TopK | Dense | Sampled,
    *,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """The per-position divergence (no T^2 factor, no reduction) in float64."""
    if isinstance(target, Sampled):
        if divergence != "forward_kl":
            raise ValueError("sampled targets support forward_kl only")
        return sampled_reference(z, target, temperature=temperature)
    p, log_q = target_distributions(
        z, target, tail=tail, temperature=temperature, teacher_temperature=teacher_temperature
    )
    return divergence_between(p, log_q, divergence, beta=beta, alpha=alpha)
