"""The public surface: exports, backend selection, reductions, KDLoss and token_metrics."""

from __future__ import annotations

import math
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from losses_support import BACKENDS, draw_samples
from reference_losses import DIVERGENCES

import logitcache
from logitcache import losses


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(kind: str, lead: tuple[int, ...], vocab: int, seed: int = 0) -> dict:
    gen = _gen(seed)
    teacher = torch.randn((*lead, vocab), generator=gen) * 2
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels.view(-1)[1] = -100
    batch: dict = {"labels": labels, "input_ids": torch.zeros(lead, dtype=torch.long)}
    logprobs = torch.log_softmax(teacher, -1)
    if kind == "topk":
        top = logprobs.topk(4, -1)
        batch |= {"topk_ids": top.indices, "topk_logprobs": top.values}
    elif kind == "sampled":
        ids, counts = draw_samples(gen, logprobs.reshape(-1, vocab).exp(), 16, min(vocab, 16))
        ids, counts = ids.reshape((*lead, -1)), counts.reshape((*lead, -1))
        batch |= {
            "sampled_ids": ids,
            "sampled_counts": counts,
            "sampled_logprobs": torch.where(counts > 0, logprobs.gather(-1, ids.clamp_min(0)), 0),
        }
    else:
        batch["teacher_logits"] = teacher
    return batch


def _divergence(kind: str, z: torch.Tensor, batch: dict, **options: object) -> torch.Tensor:
    if kind == "topk":
        return losses.sparse_kd_loss(z, batch["topk_ids"], batch["topk_logprobs"], **options)
    if kind == "sampled":
        options.pop("divergence", None)
        return losses.sampled_kd_loss(
            z, batch["sampled_ids"], batch["sampled_counts"], batch["sampled_logprobs"], **options
        )
    return losses.kd_loss(z, batch["teacher_logits"], **options)


# ---- exports and backends ---------------------------------------------------------------


def test_public_names_are_exported_from_the_package() -> None:
    for name in ("sparse_kd_loss", "sampled_kd_loss", "kd_loss", "KDLoss", "token_metrics"):
        assert name in logitcache.__all__
        assert getattr(logitcache, name) is getattr(losses, name)
    assert "StoreError" in logitcache.__all__  # the existing exports stay
    for name in losses.__all__:
        assert hasattr(losses, name), name


def test_every_public_function_has_a_docstring() -> None:
    for name in losses.__all__:
        obj = getattr(losses, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 80, name
    assert losses.KDLoss.forward.__doc__


def test_torch_backend_is_always_torch() -> None:
    assert losses._resolve_backend("torch", torch.zeros(2, 3)) == "torch"


def test_auto_uses_rust_for_cpu_float32_and_bfloat16_when_available() -> None:
    expected = "rust" if "rust" in BACKENDS else "torch"
    for dtype in (torch.float32, torch.bfloat16):
        assert losses._resolve_backend("auto", torch.zeros(2, 3, dtype=dtype)) == expected
    for dtype in (torch.float64, torch.float16):
        assert losses._resolve_backend("auto", torch.zeros(2, 3, dtype=dtype)) == "torch"
    assert losses._resolve_backend("auto", torch.zeros(2, 3, device="meta")) == "torch"


def test_auto_falls_back_to_torch_when_the_kernels_do_not_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    losses._rust_kernels.cache_clear()
    try:
        # None in sys.modules makes `from logitcache import _loss_kernels` raise ImportError
        # (once the package no longer holds the submodule as an attribute).
        monkeypatch.setitem(sys.modules, "logitcache._loss_kernels", None)
        monkeypatch.delattr(logitcache, "_loss_kernels", raising=False)
        module, reason = losses._rust_kernels()
        assert module is None and "_loss_kernels" in reason
        assert losses._resolve_backend("auto", torch.zeros(2, 3)) == "torch"
        with pytest.raises(ValueError, match="backend='rust'"):
            losses._resolve_backend("rust", torch.zeros(2, 3))
        z = torch.randn(2, 5)
        torch.testing.assert_close(
            losses.kd_loss(z, z.flip(-1)), losses.kd_loss(z, z.flip(-1), backend="torch")
        )
    finally:
        monkeypatch.undo()
        losses._rust_kernels.cache_clear()


def test_rust_backend_receives_the_contract_arguments() -> None:
    """With kernels present, sparse_kd_loss hands them flattened 2-D CPU inputs, int64 ids,
    float32 log-probabilities and the valid-row mask, then reduces their per-row values."""
    seen: dict = {}

    def fake_sparse(z, ids, logprobs, valid, **options):  # type: ignore[no-untyped-def]
        seen.update(z=z, ids=ids, logprobs=logprobs, valid=valid, options=options)
        return torch.arange(z.shape[0], dtype=torch.float32)

    kernels = mock.Mock(rust_sparse_kd=fake_sparse)
    z = torch.randn(2, 3, 7)
    ids = torch.randint(0, 7, (2, 3, 1), dtype=torch.int32)
    logprobs = torch.full((2, 3, 1), -0.5, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    with mock.patch.object(losses, "_rust_kernels", return_value=(kernels, "")):
        loss = losses.sparse_kd_loss(z, ids, logprobs, mask=mask, divergence="jsd", beta=0.4)
    assert seen["z"].shape == (6, 7) and seen["ids"].dtype == torch.int64
    assert seen["logprobs"].dtype == torch.float32 and seen["logprobs"].shape == (6, 1)
    assert seen["valid"].tolist() == [True, False, True, True, True, True]
    assert seen["options"] == {
        "divergence": "jsd",
        "tail": "bucket",
        "temperature": 1.0,
        "teacher_temperature": 1.0,
        "beta": 0.4,
        "alpha": 0.1,
    }
    assert float(loss) == pytest.approx((0 + 2 + 3 + 4 + 5) / 5)


# ---- reductions ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["topk", "sampled", "dense"])
def test_reductions_relate_to_per_position_values(kind: str, backend: str) -> None:
    batch = _batch(kind, (3, 4), 11)
    z = torch.randn(3, 4, 11, generator=_gen(1))
    labels = batch["labels"]
    per_position = _divergence(kind, z, batch, labels=labels, reduction="none", backend=backend)
    assert per_position.shape == (3, 4)
    assert float(per_position[labels == -100].abs().sum()) == 0.0
    kept = int((labels != -100).sum())
    total = per_position.sum()

    def reduced(**options: object) -> torch.Tensor:
        return _divergence(kind, z, batch, labels=labels, backend=backend, **options)

    torch.testing.assert_close(reduced(reduction="sum"), total)
    torch.testing.assert_close(reduced(reduction="mean"), total / kept)
    torch.testing.assert_close(reduced(normalizer=7.0), total / 7.0)
    torch.testing.assert_close(reduced(normalizer=torch.tensor(7)), total / 7.0)
    torch.testing.assert_close(reduced(reduction="sum", normalizer=2.0), total / 2.0)


def test_ignore_index_is_configurable() -> None:
    z = torch.randn(4, 6, generator=_gen(2))
    teacher = torch.randn(4, 6, generator=_gen(3))
    labels = torch.tensor([0, 7, 1, 7])
    per_position = losses.kd_loss(z, teacher, labels=labels, ignore_index=7, reduction="none")
    assert per_position[1] == 0 and per_position[3] == 0 and per_position[0] > 0


def test_labels_and_mask_combine() -> None:
    z = torch.randn(4, 6, generator=_gen(2))
    teacher = torch.randn(4, 6, generator=_gen(3))
    labels = torch.tensor([0, -100, 1, 2])
    mask = torch.tensor([1, 1, 0, 1])  # integer masks are accepted
    per_position = losses.kd_loss(z, teacher, labels=labels, mask=mask, reduction="none")
    assert (per_position == 0).tolist() == [False, True, True, False]


# ---- KDLoss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["topk", "sampled", "dense"])
def test_kd_loss_module_mixes_scaled_divergence_and_cross_entropy(kind: str, backend: str) -> None:
    batch = _batch(kind, (2, 5), 13)
    z = (torch.randn(2, 5, 13, generator=_gen(4)) * 2).requires_grad_()
    temperature, weight = 2.0, 0.3
    loss_fn = losses.KDLoss(
        temperature=temperature,
        teacher_temperature=temperature if kind == "sampled" else 1.0,
        tail="renormalize",
        kd_weight=weight,
        backend=backend,
    )
    if kind == "sampled":  # the draws were taken at T = 1; pretend they were at T = 2
        batch["sampled_logprobs"] = None
    loss = loss_fn(z, batch)
    options: dict = {"labels": batch["labels"], "temperature": temperature, "backend": backend}
    if kind == "topk":
        options["tail"] = "renormalize"
    if kind != "dense":
        options["teacher_temperature"] = temperature if kind == "sampled" else 1.0
    divergence = _divergence(kind, z, batch, **options)
    cross_entropy = F.cross_entropy(z.reshape(-1, 13), batch["labels"].reshape(-1))
    expected = weight * temperature**2 * divergence + (1 - weight) * cross_entropy
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, z)
    (expected_grad,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(grad, expected_grad)


def test_kd_weight_zero_is_plain_cross_entropy_without_teacher() -> None:
    z = torch.randn(6, 9, generator=_gen(5))
    labels = torch.tensor([1, 2, -100, 4, 8, 0])
    loss = losses.KDLoss(kd_weight=0.0)(z, {"labels": labels})
    torch.testing.assert_close(loss, F.cross_entropy(z, labels))
    per_position = losses.KDLoss(kd_weight=0.0, reduction="none")(z, {"labels": labels})
    torch.testing.assert_close(per_position, F.cross_entropy(z, labels, reduction="none"))


def test_kd_weight_one_needs_no_labels_and_matches_the_function() -> None:
    batch = _batch("topk", (2, 3), 10)
    del batch["labels"]
    z = torch.randn(2, 3, 10, generator=_gen(6))
    loss = losses.KDLoss(kd_weight=1.0, divergence="reverse_kl")(z, batch)
    expected = losses.sparse_kd_loss(
        z, batch["topk_ids"], batch["topk_logprobs"], divergence="reverse_kl"
    )
    torch.testing.assert_close(loss, expected)


def test_kd_loss_module_overrides_and_mask() -> None:
    batch = _batch("dense", (2, 4), 8)
    z = torch.randn(2, 4, 8, generator=_gen(7))
    loss_fn = losses.KDLoss(divergence="forward_kl", kd_weight=0.5)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    overridden = loss_fn(
        z,
        {**batch, "mask": mask},
        divergence="jsd",
        beta=0.2,
        temperature=1.5,
        kd_weight=0.8,
        reduction="sum",
        normalizer=3.0,
    )
    labels = batch["labels"]
    divergence = losses.kd_loss(
        z,
        batch["teacher_logits"],
        divergence="jsd",
        beta=0.2,
        temperature=1.5,
        labels=labels,
        mask=mask,
        reduction="sum",
    )
    keep = (labels != -100) & mask
    cross_entropy = F.cross_entropy(z[keep], labels[keep], reduction="sum")
    expected = (0.8 * 1.5**2 * divergence + 0.2 * cross_entropy) / 3.0
    torch.testing.assert_close(overridden, expected)
    # the configuration itself is unchanged
    assert loss_fn.divergence == "forward_kl" and loss_fn.kd_weight == 0.5
    assert "kd_weight=0.5" in repr(loss_fn)


def test_kd_loss_module_runs_on_bfloat16_logits() -> None:
    batch = _batch("topk", (2, 3), 12)
    z = torch.randn(2, 3, 12, generator=_gen(8)).bfloat16().requires_grad_()
    loss = losses.KDLoss()(z, batch)
    loss.backward()
    assert loss.dtype == torch.float32 and z.grad is not None and z.grad.dtype == torch.bfloat16
    reference = losses.KDLoss()(z.detach().float(), batch)
    torch.testing.assert_close(loss.detach(), reference, atol=1e-5, rtol=1e-5)


# ---- token_metrics --------------------------------------------------------------------------


def test_token_metrics_on_dense_targets() -> None:
    gen = _gen(9)
    z = torch.randn(3, 5, 10, generator=gen)
    teacher = torch.randn(3, 5, 10, generator=gen)
    teacher[0, 0] = z[0, 0]  # one position where the argmaxes agree for sure
    metrics = losses.token_metrics(z, teacher_logits=teacher, reduction="none")
    assert set(metrics) == {
        "forward_kl",
        "reverse_kl",
        "tvd",
        "acceptance_rate",
        "top1_agreement",
    }
    for name in ("forward_kl", "reverse_kl", "tvd"):
        torch.testing.assert_close(
            metrics[name], losses.kd_loss(z, teacher, divergence=name, reduction="none")
        )
    torch.testing.assert_close(metrics["acceptance_rate"], 1 - metrics["tvd"])
    agree = (z.argmax(-1) == teacher.argmax(-1)).float()
    assert torch.equal(metrics["top1_agreement"], agree)
    assert metrics["top1_agreement"][0, 0] == 1.0
    means = losses.token_metrics(z, {"teacher_logits": teacher})
    for name, value in means.items():
        torch.testing.assert_close(value, metrics[name].mean())


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_token_metrics_on_topk_targets_follow_the_tail(tail: str) -> None:
    batch = _batch("topk", (4, 3), 9, seed=10)
    z = torch.randn(4, 3, 9, generator=_gen(11), requires_grad=True)
    metrics = losses.token_metrics(z, batch, tail=tail, reduction="none")
    labels = batch["labels"]
    for name in ("forward_kl", "reverse_kl", "tvd"):
        expected = losses.sparse_kd_loss(
            z.detach(),
            batch["topk_ids"],
            batch["topk_logprobs"],
            divergence=name,
            tail=tail,
            labels=labels,
            reduction="none",
        )
        torch.testing.assert_close(metrics[name], expected)
        assert not metrics[name].requires_grad
    teacher_top1 = batch["topk_ids"][..., 0]  # ids are in rank order here
    agree = ((z.argmax(-1) == teacher_top1) & (labels != -100)).float()
    assert torch.equal(metrics["top1_agreement"], agree)


def test_token_metrics_bucket_tvd_bounds_dense_tvd() -> None:
    """Coarsening cannot increase TVD: acceptance from a bucket row is an upper bound."""
    gen = _gen(12)
    teacher = torch.randn(50, 20, generator=gen, dtype=torch.float64) * 2
    z = torch.randn(50, 20, generator=gen, dtype=torch.float64) * 2
    top = torch.log_softmax(teacher, -1).topk(5, -1)
    sparse = losses.token_metrics(
        z, topk_ids=top.indices, topk_logprobs=top.values, reduction="none"
    )
    dense = losses.token_metrics(z, teacher_logits=teacher, reduction="none")
    assert bool((sparse["tvd"] <= dense["tvd"] + 1e-12).all())
    assert bool((sparse["acceptance_rate"] >= dense["acceptance_rate"] - 1e-12).all())


def test_token_metrics_on_sampled_targets_report_forward_kl_only() -> None:
    batch = _batch("sampled", (3, 4), 10, seed=13)
    z = torch.randn(3, 4, 10, generator=_gen(14))
    metrics = losses.token_metrics(z, batch, reduction="sum")
    assert set(metrics) == {"forward_kl"}
    expected = losses.sampled_kd_loss(
        z,
        batch["sampled_ids"],
        batch["sampled_counts"],
        batch["sampled_logprobs"],
        labels=batch["labels"],
        reduction="sum",
    )
    torch.testing.assert_close(metrics["forward_kl"], expected)


def test_token_metrics_all_masked_are_zero_not_nan() -> None:
    z = torch.randn(2, 6)
    metrics = losses.token_metrics(
        z, teacher_logits=torch.full((2, 6), math.nan), mask=torch.zeros(2, dtype=torch.bool)
    )
    for value in metrics.values():
        assert float(value) == 0.0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_rows_wider_than_the_chunk_budget(divergence: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 300k vocabulary with a 128k-element chunk budget: one row per chunk, float32 sums
    over wide rows still match float64."""
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS_CPU", 1 << 17)
    gen = _gen(15)
    vocab = 300_000
    z = torch.randn(2, vocab, generator=gen).requires_grad_()
    teacher = torch.randn(2, vocab, generator=gen)
    top = torch.log_softmax(teacher, -1).topk(8, -1)
    loss = losses.sparse_kd_loss(
        z, top.indices, top.values, divergence=divergence, backend="torch"
    ) + losses.kd_loss(z, teacher, divergence=divergence, backend="torch")
    loss.backward()
    assert z.grad is not None and bool(z.grad.isfinite().all())
    z64 = z.detach().double().requires_grad_()
    expected = losses.sparse_kd_loss(
        z64, top.indices, top.values.double(), divergence=divergence
    ) + losses.kd_loss(z64, teacher.double(), divergence=divergence)
    expected.backward()
    torch.testing.assert_close(loss.detach().double(), expected.detach(), atol=1e-5, rtol=1e-4)
    assert z64.grad is not None
    if divergence != "tvd":  # among 300k entries some sit at TVD's kink, |p - q| ~ 1e-9
        torch.testing.assert_close(z.grad.double(), z64.grad, atol=1e-8, rtol=1e-4)


# ---- autograd patterns and edges a reviewer found ----------------------------------------


def _topk_inputs(n: int = 3, vocab: int = 20, k: int = 4) -> tuple[torch.Tensor, ...]:
    gen = _gen(7)
    z = torch.randn((n, vocab), generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn((n, vocab), generator=gen), -1).gather(1, ids)
    return z, ids, lp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["topk", "sampled", "dense"])
def test_a_second_backward_through_a_retained_graph(kind: str, backend: str) -> None:
    """Both backends allow backward twice through a retained graph (the Rust path raised:
    its precomputed gradient had been handed over), with the same gradient each time."""
    z0, ids, lp = _topk_inputs()
    z = z0.clone().requires_grad_(True)
    if kind == "topk":
        loss = losses.sparse_kd_loss(z, ids, lp, backend=backend)
    elif kind == "sampled":
        loss = losses.sampled_kd_loss(z, ids, torch.ones_like(ids), backend=backend)
    else:
        loss = losses.kd_loss(z, torch.randn((3, 20), generator=_gen(1)), backend=backend)
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    loss.backward(retain_graph=True)
    assert z.grad is not None
    torch.testing.assert_close(z.grad, first)
    (loss * 3).backward(retain_graph=True)
    torch.testing.assert_close(z.grad, 4 * first)
    # Targets changed in place since: the gradient of the forward's values, or refused;
    # never the gradient of other values.
    teacher = torch.randn((3, 20), generator=_gen(1))
    counts = torch.ones_like(ids)
    z.grad = None
    if kind == "topk":
        loss = losses.sparse_kd_loss(z, ids, lp, backend=backend)
    elif kind == "sampled":
        loss = losses.sampled_kd_loss(z, ids, counts, backend=backend)
    else:
        loss = losses.kd_loss(z, teacher, backend=backend)
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    with torch.no_grad():
        {"topk": lp, "sampled": counts, "dense": teacher}[kind].mul_(3)
    try:
        (again,) = torch.autograd.grad(loss, z, retain_graph=True)
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
    else:
        torch.testing.assert_close(again, first)
    # Logits changed in place since: refused, not a gradient of other values.
    with torch.no_grad():
        z.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bucket", "renormalize", "sampled", "dense"])
def test_create_graph_gives_the_gradient(kind: str, backend: str) -> None:
    """create_graph=True (a gradient penalty, say) gets the gradient, not differentiable
    again; the torch path's bucket and sampled targets raised an out= error."""
    z0, ids, lp = _topk_inputs()
    z = z0.clone().requires_grad_(True)
    if kind == "sampled":
        loss = losses.sampled_kd_loss(z, ids, torch.ones_like(ids), backend=backend)
    elif kind == "dense":
        loss = losses.kd_loss(z, torch.randn((3, 20), generator=_gen(1)), backend=backend)
    else:
        loss = losses.sparse_kd_loss(z, ids, lp, tail=kind, backend=backend)
    (grad,) = torch.autograd.grad(loss, z, create_graph=True, retain_graph=True)
    (plain,) = torch.autograd.grad(loss, z, retain_graph=True)
    torch.testing.assert_close(grad, plain)
    assert not grad.requires_grad
    # Through a learnable factor the gradient requires grad; differentiating it raises.
    scale = torch.tensor(2.0, requires_grad=True)
    (scaled,) = torch.autograd.grad(loss * scale, z, create_graph=True)
    torch.testing.assert_close(scaled, 2 * plain)
    assert scaled.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        scaled.sum().backward()


def test_no_gradient_is_computed_when_none_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.no_grad() or inference_mode, and for logits that do not require grad, the
    Rust kernels write no [N, V] gradient (they did under no_grad: the Function saw only
    needs_input_grad)."""
    from logitcache import _loss_kernels

    asked: list[bool] = []
    real = _loss_kernels._outputs

    def spy(logits: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        asked.append(with_grad)
        return real(logits, with_grad)

    monkeypatch.setattr(_loss_kernels, "_outputs", spy)
    z0, ids, lp = _topk_inputs()
    z = z0.clone().requires_grad_(True)
    with torch.no_grad():
        a = losses.sparse_kd_loss(z, ids, lp, backend="rust")
    with torch.inference_mode():
        b = losses.kd_loss(z, torch.zeros(3, 20), backend="rust")
    c = losses.sampled_kd_loss(z0, ids, torch.ones_like(ids), backend="rust")
    assert asked == [False, False, False]
    assert not (a.requires_grad or b.requires_grad or c.requires_grad)
    d = losses.sparse_kd_loss(z, ids, lp, backend="rust")
    assert asked[-1] is True and d.requires_grad
    torch.testing.assert_close(a, d.detach())


@pytest.mark.parametrize("divergence", ["forward_kl", "jeffreys", "reverse_kl", "jsd"])
def test_an_empty_rest_bucket_adds_nothing_to_the_gradient(divergence: str) -> None:
    """Every student logit outside S is -inf: q_rest = 0 whatever z, so the rest outcome is
    in the value (+inf where p_rest > 0) but not in the gradient; the Rust kernel included
    it (a gradient that did not sum to 0), the torch path and docs/losses.md did not."""
    z0 = torch.tensor([[0.0, 0.3, -math.inf, -math.inf], [1.0, -0.5, -math.inf, 2.0]])
    ids = torch.tensor([[0, 1], [0, 1]])
    lp = torch.tensor([[0.5, 0.3], [0.6, 0.1]]).log()
    grads = {}
    for backend in BACKENDS:
        z = z0.clone().requires_grad_(True)
        values = losses.sparse_kd_loss(
            z, ids, lp, divergence=divergence, reduction="none", backend=backend
        )
        values[0].backward()
        assert z.grad is not None
        grads[backend] = z.grad
        torch.testing.assert_close(z.grad[0].sum(), torch.tensor(0.0), atol=1e-6, rtol=0)
        assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(grads[BACKENDS[0]], grads[BACKENDS[-1]])
    if divergence == "forward_kl":
        q = torch.softmax(z0[0, :2], 0)
        want = -torch.tensor([0.5, 0.3]) + q * 0.8  # -p + q sum(p_S), the rest left out
        torch.testing.assert_close(grads[BACKENDS[0]][0, :2], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_count_zero_entries_are_ignored_whatever_their_id(backend: str) -> None:
    z, ids, _ = _topk_inputs()
    counts = torch.tensor([[2, 1, 1, 0]] * 3)
    odd = ids.clone()
    odd[:, 3] = -5
    a = losses.sampled_kd_loss(z, odd, counts, backend=backend)
    b = losses.sampled_kd_loss(z, ids, counts, backend=backend)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="ids below -1"):
        losses.sampled_kd_loss(z, odd, torch.ones_like(counts), backend=backend)


def test_the_losses_module_is_an_attribute_of_the_package() -> None:
    """``lc.losses`` (docs/losses.md names its constants that way) works in a fresh process
    before anything imported the submodule, as ``lc.KDLoss`` does."""
    code = (
        "import logitcache as lc; print(sorted(lc.losses.BATCH_KEYS)[0], "
        "lc.KDLoss is lc.losses.KDLoss)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    from logitcache.losses import BATCH_KEYS

    assert out.stdout.split() == [sorted(BATCH_KEYS)[0], "True"]
