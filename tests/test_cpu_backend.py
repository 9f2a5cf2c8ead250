"""The CPU backend's own paths: float64 at float64 rounding, its blocks, borrowed scratch and gradient buffers."""

from __future__ import annotations

import mmap

import pytest
import torch
from conftest import DTYPES, GRAD_TOL, LOSS_TOL, assert_grad_close, make_logits, make_target

import smoothce
from smoothce.backends.cpu import HUGE_PAGE_BYTES, CpuBackend, new_gradient
from smoothce.numerics import loss_dtype
from smoothce.reference import cross_entropy_reference


def exact_float64(logits, target, label_smoothing, ignore_index=-100):
    """(loss, grad) per row in float64, every term relative to the row max a (no cancellation left):
    with e_j = exp(z_j - z_a), Q = sum_{j != a} e_j, S = 1 + Q: p_j = e_j / S, 1 - p_a = Q / S, and
    loss = (z_a - z_k) + log1p(Q) + lam (z_k - mean z)."""
    z = logits.double()
    n_rows, num_classes = z.shape
    lam = label_smoothing
    valid = target != ignore_index
    k = torch.where(valid, target, 0)
    rows = torch.arange(n_rows)
    a = z.argmax(1)
    e = (z - z[rows, a].unsqueeze(1)).exp()
    e[rows, a] = 0.0
    q = e.sum(1)
    p = e / (1 + q).unsqueeze(1)
    p[rows, a] = 1 / (1 + q)
    grad = p - lam / num_classes
    at_max = k == a
    grad[rows, k] = torch.where(
        at_max, lam * (1 - 1 / num_classes) - q / (1 + q), p[rows, k] - (1 - lam + lam / num_classes)
    )
    z_k = z[rows, k]
    loss = (z[rows, a] - z_k) + torch.log1p(q) + lam * (z_k - z.mean(1))
    grad[~valid] = 0.0
    return torch.where(valid, loss, 0.0), grad


# Rows x classes: the small path (whole tensor in float64 ops, up to 8192 logits), and the blocked path.
@pytest.mark.parametrize("shape", [(6, 50), (16, 500), (8, 2000), (3, 32769)], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dominant", ["target", "other"])
def test_float64_dominant_logits_at_float64_rounding(shape, label_smoothing, dominant):
    # A logit 15..60 above the rest: p_max - 1 lies far below float64's ulp of 1. Every gradient entry
    # must be right to 1e-13 of the row's largest (float64 rounding is 1e-16; exp(l) - 1 and ATen's
    # running softmax sum gave 1e-4 .. 1 and 4e-14 of it).
    n_rows, num_classes = shape
    logits = make_logits(shape, torch.float64)
    target = make_target((n_rows,), num_classes, ignore_fraction=0.0)
    target[1] = -100
    column = target.clamp_min(0) if dominant == "target" else (target.clamp_min(0) + 1) % num_classes
    rows = torch.arange(n_rows)
    logits[rows, column] = logits.amax(1) + torch.tensor([15.0, 30.0, 60.0]).repeat(n_rows)[:n_rows]
    loss, grad = smoothce_rows(logits, target, label_smoothing)
    ref_loss, ref_grad = exact_float64(logits, target, label_smoothing)
    largest = ref_grad.abs().amax(1, keepdim=True).clamp_min(1e-300)
    error = ((grad - ref_grad).abs() / largest).max().item()
    assert error <= 1e-13, f"gradient error {error:.2e} of the row's largest entry"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-13, atol=1e-300)


def smoothce_rows(logits, target, label_smoothing):
    leaf = logits.clone().requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, target, label_smoothing=label_smoothing, reduction="none")
    loss.sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("layout", ["fresh", "strided", "no-grad"])
@pytest.mark.parametrize("confident", [False, True], ids=["", "confident-rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blocks(dtype, confident, layout):
    # 37 x 700 logits with blocks of 1400: fp32/fp64 gradients in place, all rows at once; half
    # gradients, strided ones and no gradient through the scratch in blocks of 2 rows, the last one short.
    backend = CpuBackend(block_elements=1400)
    logits = make_logits((37, 700), dtype)
    target = make_target((37,), 700)
    target[0], target[-1] = -100, 699
    if confident:
        rows = (target != -100).nonzero().squeeze(1)[::5]
        logits[rows, target[rows]] += 12.0
    scale = torch.tensor(1 / 7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    ref_loss, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction="none")
    if layout == "no-grad":
        grad = None
    elif layout == "fresh":
        grad = torch.full_like(logits, float("nan"))
    else:
        grad = torch.full((700, 37), float("nan"), dtype=dtype).t()
    loss = backend.forward(logits, target, 0.1, -100, grad, scale)
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    if grad is not None:
        assert_grad_close(grad, ref_grad * float(scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gradient_over_its_own_logits(dtype):
    # The fused linear loss writes the gradient over the logits: all rows at once in place (fp32,
    # fp64) or block by block through the scratch (bf16); nothing may re-read a logit once overwritten.
    backend = CpuBackend(block_elements=1400)
    logits = make_logits((37, 700), dtype)
    target = make_target((37,), 700)
    ref_loss, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction="none")
    work = logits.clone()
    loss = backend.forward(work, target, 0.1, -100, work, torch.tensor(1.0, dtype=loss_dtype(dtype)))
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    assert_grad_close(work, ref_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_without_gradient_matches_with(dtype):
    # Without a gradient the loss comes from the log-softmax, with one from the softmax: both to a
    # few ulps of float32, on ordinary, confident and far-below-the-max targets.
    backend = CpuBackend()
    logits = make_logits((64, 3000), dtype)
    target = make_target((64,), 3000, ignore_fraction=0.0)
    logits[:8, 0] = 40.0  # confident rows (target 0) and targets 40+ below the max
    target[:4] = 0
    scale = torch.tensor(1.0)
    with_grad = backend.forward(logits, target, 0.1, -100, torch.empty_like(logits), scale)
    without = backend.forward(logits, target, 0.1, -100, None, scale)
    torch.testing.assert_close(without, with_grad, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_new_gradient(dtype):
    # Large contiguous logits: a writable buffer of their shape and dtype, mapped for huge pages on
    # Linux (a buffer torch did not allocate: not resizable); small or strided ones: empty_like.
    rows = HUGE_PAGE_BYTES // (1000 * (2 if dtype == torch.bfloat16 else 4)) + 1
    for logits in (torch.zeros(rows, 1000, dtype=dtype), torch.zeros(4, 10, dtype=dtype).t()):
        grad = new_gradient(logits)
        assert grad.shape == logits.shape
        assert grad.dtype == logits.dtype
        assert grad.stride() == logits.stride()
        mapped = logits.is_contiguous() and hasattr(mmap, "MADV_HUGEPAGE")
        assert grad.untyped_storage().resizable() != mapped
        grad.fill_(1.5)
        assert bool((grad == 1.5).all())
        assert grad.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()


def test_large_gradient_through_the_op():
    # The op's gradient from new_gradient (over HUGE_PAGE_BYTES) as the leaf's .grad, and a second
    # backward accumulating into it.
    logits = make_logits((257, HUGE_PAGE_BYTES // 4 // 256), torch.float32)
    target = make_target((257,), logits.shape[1])
    leaf = logits.clone().requires_grad_(True)
    smoothce.cross_entropy(leaf, target, label_smoothing=0.1).backward()
    first = leaf.grad.clone()
    _, ref_grad = cross_entropy_reference(logits[:8], target[:8], label_smoothing=0.1, reduction="sum")
    count = int((target != -100).sum())
    rtol, atol = GRAD_TOL[torch.float32]
    torch.testing.assert_close(first[:8].double() * count, ref_grad, rtol=rtol, atol=atol)
    smoothce.cross_entropy(leaf, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(leaf.grad, 2 * first)
