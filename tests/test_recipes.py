"""Training recipes around the op: loss scaling in fp16, autocast, gradient accumulation,
GradScaler, repeated backward passes, edits of ``.grad`` between them, and torch.func.

Every test runs on ``conftest.DEVICE`` (cpu here; the cuda and xpu sessions set it) and
compares against the float64 reference or against the same recipe with ``F.cross_entropy``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, GRAD_TOL, assert_grad_close, make_logits, make_target

import smoothce
from smoothce.reference import cross_entropy_reference

ON_GPU = DEVICE.type != "cpu"
# Autocast's low-precision dtypes: fp16 and bf16 on GPUs; bf16 is CPU autocast's usual
# dtype, and fp16 runs there too.
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def fp16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of fp16 numbers at |values| (float64): 2^(e - 10), subnormals 2^-24."""
    magnitude = values.abs().clamp_min(2.0**-14)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - 10)


# --- fp16 with a loss scale ---------------------------------------------------------------


def test_fp16_scaled_mean_loss_keeps_every_gradient():
    # The mixed-precision recipe: an fp16 logits gradient of (mean loss) x 65536. With the
    # mean's 1/N folded in before rounding to fp16, (p - ybar) / N sits below fp16's
    # smallest subnormal (2^-24) for most entries and flushes to zero before backward can
    # scale it back up. The contract: float64 x scale, within a few fp16 ulps, no flushing.
    # 4096 rows as in real batches; the vocabulary is cut on CPU to keep the test fast, and
    # lam / V / N = 1.2e-8 < 2^-25 still puts the smoothing term in the flushed regime.
    rows, num_classes = (4096, 32000) if ON_GPU else (4096, 2048)
    scale = 65536.0
    logits = make_logits((rows, num_classes), torch.float16, scale=3.0)
    target = make_target((rows,), num_classes, ignore_fraction=0.0)
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1)
    # The test is only meaningful where folding 1/N in before rounding would flush.
    flushed_if_folded = (ref_grad.to(torch.float16) == 0).double().mean().item()
    assert flushed_if_folded > 0.5, f"only {flushed_if_folded:.0%} would flush: not the underflow regime"

    leaf = logits.to(DEVICE).requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, target.to(DEVICE), label_smoothing=0.1)
    (loss * scale).backward()
    grad = leaf.grad.cpu()
    expected = ref_grad * scale
    nonzero = expected.to(torch.float16) != 0
    lost = int((nonzero & (grad == 0)).sum())
    assert lost == 0, f"{lost} of {int(nonzero.sum())} gradient entries flushed to zero"
    ulps = ((grad.double() - expected).abs() / fp16_ulp(expected)).max().item()
    assert ulps <= 2.0, f"max error {ulps:.2f} fp16 ulps of float64 x {scale:g}"


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_autocast_matches_pytorch(dtype):
    # A linear output layer under autocast: the logits come out in `dtype`; smoothce computes
    # in fp32 from them, as F.cross_entropy does (autocast runs it in fp32). Loss, and the
    # gradients reaching the fp32 weights and activations, agree within rounding.
    if not torch.amp.is_autocast_available(DEVICE.type):
        pytest.skip(f"no autocast on {DEVICE.type}")
    generator = torch.Generator().manual_seed(0)
    rows, hidden, num_classes = 64, 32, 1003
    features = torch.randn(rows, hidden, generator=generator).to(DEVICE)
    weight = (torch.randn(hidden, num_classes, generator=generator) / math.sqrt(hidden) * 3).to(DEVICE)
    target = make_target((rows,), num_classes).to(DEVICE)

    def run(loss_fn):
        h = features.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        with torch.autocast(DEVICE.type, dtype=dtype):
            logits = h @ w
            assert logits.dtype == dtype
            loss = loss_fn(logits, target, label_smoothing=0.1)
        (loss * 1024.0).backward()
        return loss.detach(), h.grad, w.grad

    loss, h_grad, w_grad = run(smoothce.cross_entropy)
    expected_loss, expected_h, expected_w = run(F.cross_entropy)
    assert loss.dtype == expected_loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    # Both gradients of the logits are fp32 values rounded to `dtype` once, so they differ
    # at most where fp32 noise straddles a rounding boundary: one ulp, in a few entries.
    rtol = GRAD_TOL[dtype][0] * 2
    for ours, theirs in ((h_grad, expected_h), (w_grad, expected_w)):
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * theirs.abs().max().item())


# --- accumulation and scaling ----------------------------------------------------------


def test_gradient_accumulation_over_micro_batches():
    # Four micro-batches with different numbers of real tokens; each loss is a sum divided
    # by the real tokens of the whole window, so the accumulated gradient is that of the
    # full batch's mean. The weight's .grad accumulates across the four backward passes.
    generator = torch.Generator().manual_seed(1)
    micro, rows, hidden, num_classes = 4, 24, 16, 301
    features = torch.randn(micro * rows, hidden, generator=generator).to(DEVICE)
    target = make_target((micro * rows,), num_classes, ignore_fraction=0.3).to(DEVICE)
    weight = (torch.randn(hidden, num_classes, generator=generator) * 0.5).to(DEVICE)
    n_real = int((target != -100).sum())

    def accumulate(loss_fn):
        w = weight.clone().requires_grad_(True)
        for h, t in zip(features.chunk(micro), target.chunk(micro), strict=True):
            loss = loss_fn(h @ w, t, label_smoothing=0.1, reduction="sum") / n_real
            loss.backward()
        return w.grad

    full = weight.clone().requires_grad_(True)
    smoothce.cross_entropy(features @ full, target, label_smoothing=0.1).backward()
    accumulated = accumulate(smoothce.cross_entropy)
    torch.testing.assert_close(accumulated, full.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(accumulated, accumulate(F.cross_entropy), rtol=1e-5, atol=1e-6)


def test_logits_grad_accumulates_over_calls():
    # One leaf feeding several calls (with different upstream scales): .grad is the sum.
    logits = make_logits((9, 40), torch.float32)
    targets = [make_target((9,), 40, seed=seed) for seed in range(3)]
    leaf = logits.to(DEVICE).requires_grad_(True)
    expected = torch.zeros(logits.shape, dtype=torch.float64)
    for weight, target in zip((1.0, 0.5, 3.0), targets, strict=True):
        loss = smoothce.cross_entropy(leaf, target.to(DEVICE), label_smoothing=0.1)
        (loss * weight).backward()
        expected += weight * cross_entropy_reference(logits, target, label_smoothing=0.1)[1]
    torch.testing.assert_close(leaf.grad.cpu().double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_grad_scaler_step_matches_pytorch(dtype):
    # torch.amp.GradScaler around an autocast forward: scale, backward, unscale_, step.
    if not torch.amp.is_autocast_available(DEVICE.type):
        pytest.skip(f"no autocast on {DEVICE.type}")
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(256, 32, generator=generator).to(DEVICE)
    target = make_target((256,), 517).to(DEVICE)
    initial = (torch.randn(517, 32, generator=generator) * 0.3).to(DEVICE)

    def train_step(loss_fn):
        layer = torch.nn.Linear(32, 517, bias=False).to(DEVICE)
        with torch.no_grad():
            layer.weight.copy_(initial)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=65536.0)
        with torch.autocast(DEVICE.type, dtype=dtype):
            loss = loss_fn(layer(features), target, label_smoothing=0.1)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad = layer.weight.grad.clone()
        scaler.step(optimizer)
        scaler.update()
        return grad, layer.weight.detach(), scaler.get_scale()

    grad, weight, scale = train_step(smoothce.cross_entropy)
    expected_grad, expected_weight, expected_scale = train_step(F.cross_entropy)
    assert torch.isfinite(grad).all()
    assert scale == expected_scale  # no overflow skipped the step
    rtol = GRAD_TOL[dtype][0] * 2
    torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=rtol * expected_grad.abs().max().item())
    torch.testing.assert_close(weight, expected_weight, rtol=rtol, atol=rtol * expected_grad.abs().max().item())


# --- the kept gradient: repeated backward, and edits of .grad in between ------------------

UPSTREAM = {
    "unit": lambda loss: loss.sum() if loss.dim() else loss,  # dO = 1, as from loss.backward()
    "scaled": lambda loss: loss.sum() * 3.0 if loss.dim() else loss * 3.0,  # dO = 3
}


@pytest.mark.parametrize("upstream", list(UPSTREAM))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_retain_graph_three_backward_passes(reduction, upstream):
    # Inside inplace_backward(False) the kept gradient stays intact: three backward passes
    # through one graph accumulate three times the gradient into .grad.
    logits = make_logits((6, 33), torch.float32)
    target = make_target((6,), 33)
    factor = 1.0 if upstream == "unit" else 3.0
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction=reduction)
    leaf = logits.to(DEVICE).requires_grad_(True)
    with smoothce.inplace_backward(False):
        loss = UPSTREAM[upstream](
            smoothce.cross_entropy(leaf, target.to(DEVICE), label_smoothing=0.1, reduction=reduction)
        )
    for passes in (1, 2, 3):
        loss.backward(retain_graph=True)
        torch.testing.assert_close(
            leaf.grad.cpu().double(),
            passes * factor * ref_grad,
            rtol=1e-5,
            atol=1e-7,
            msg=lambda message, passes=passes: f"after backward pass {passes}: {message}",
        )


def _clip(leaf):
    torch.nn.utils.clip_grad_norm_([leaf], max_norm=1e-3)


def _zero(leaf):
    leaf.grad.zero_()


def _halve(leaf):
    leaf.grad.mul_(0.5)


GRAD_EDITS = {
    "zero_": (_zero, lambda g: 0.0 * g),  # optimizer.zero_grad(set_to_none=False)
    "clip_grad_norm_": (_clip, lambda g: g * (1e-3 / (g.norm() + 1e-6))),  # clips in place
    "mul_": (_halve, lambda g: 0.5 * g),  # any in-place edit of .grad
}


@pytest.mark.parametrize("edit", list(GRAD_EDITS))
@pytest.mark.parametrize("upstream", list(UPSTREAM))
@pytest.mark.parametrize("inplace", [False, True], ids=["inplace-off", "inplace-on"])
def test_editing_grad_leaves_the_kept_gradient_intact(edit, upstream, inplace):
    # .grad after a backward must never be the kept gradient itself: editing .grad in place
    # (zero_grad without set_to_none, clipping, ...) would change what the next backward
    # through the same graph returns. With inplace_backward on, a second pass may instead
    # be refused with the clear error, but never give a wrong gradient.
    apply_edit, edited = GRAD_EDITS[edit]
    logits = make_logits((5, 21), torch.float32)
    target = make_target((5,), 21, ignore_fraction=0.0)
    factor = 1.0 if upstream == "unit" else 3.0
    ref_grad = factor * cross_entropy_reference(logits, target, label_smoothing=0.1)[1]
    leaf = logits.to(DEVICE).requires_grad_(True)
    with smoothce.inplace_backward(inplace):
        loss = UPSTREAM[upstream](smoothce.cross_entropy(leaf, target.to(DEVICE), label_smoothing=0.1))
    loss.backward(retain_graph=True)
    apply_edit(leaf)
    refused = None
    try:
        loss.backward()
    except RuntimeError as error:
        if not inplace:
            raise
        refused = str(error)
    if refused is not None:
        assert "inplace_backward" in refused
        return
    torch.testing.assert_close(leaf.grad.cpu().double(), edited(ref_grad) + ref_grad, rtol=1e-5, atol=1e-7)


def test_grad_set_to_none_between_steps():
    # optimizer.zero_grad() (set_to_none=True) between two steps of fresh forwards.
    logits = make_logits((7, 30), torch.float32)
    leaf = logits.to(DEVICE).requires_grad_(True)
    for seed in range(3):
        target = make_target((7,), 30, seed=seed)
        leaf.grad = None
        (smoothce.cross_entropy(leaf, target.to(DEVICE), label_smoothing=0.1) * 2.0).backward()
        _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1)
        torch.testing.assert_close(leaf.grad.cpu().double(), 2.0 * ref_grad, rtol=1e-5, atol=1e-7)


# --- torch.func --------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_func_grad(reduction):
    logits = make_logits((8, 45), torch.float32)
    target = make_target((8,), 45)
    options = dict(label_smoothing=0.1, reduction=reduction)
    grad, value = torch.func.grad_and_value(lambda z: smoothce.cross_entropy(z, target.to(DEVICE), **options))(
        logits.to(DEVICE)
    )
    ref_loss, ref_grad = cross_entropy_reference(logits, target, **options)
    torch.testing.assert_close(value.cpu().double(), ref_loss, rtol=2e-6, atol=1e-6)
    assert_grad_close(grad.cpu(), ref_grad, torch.float32)
    expected = torch.func.grad(lambda z: F.cross_entropy(z, target, **options))(logits)
    torch.testing.assert_close(grad.cpu(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_func_vmap(reduction):
    # A batch of independent problems: vmap over a leading dimension of logits and target.
    logits = make_logits((3, 6, 29), torch.float32)
    target = make_target((3, 6), 29)
    options = dict(label_smoothing=0.1, reduction=reduction)
    losses = torch.func.vmap(lambda z, t: smoothce.cross_entropy(z, t, **options))(logits.to(DEVICE), target.to(DEVICE))
    expected = torch.stack([cross_entropy_reference(z, t, **options)[0] for z, t in zip(logits, target, strict=True)])
    assert losses.shape == expected.shape
    torch.testing.assert_close(losses.cpu().double(), expected, rtol=2e-6, atol=1e-6)


def test_func_per_sample_gradients():
    # vmap(grad(...)): a gradient per sample, the usual torch.func recipe (e.g. for DP-SGD).
    logits = make_logits((5, 4, 23), torch.float32)
    target = make_target((5, 4), 23)
    per_sample = torch.func.vmap(torch.func.grad(lambda z, t: smoothce.cross_entropy(z, t, label_smoothing=0.1)))(
        logits.to(DEVICE), target.to(DEVICE)
    )
    expected = torch.stack(
        [cross_entropy_reference(z, t, label_smoothing=0.1)[1] for z, t in zip(logits, target, strict=True)]
    )
    assert_grad_close(per_sample.cpu(), expected, torch.float32)
