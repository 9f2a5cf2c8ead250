"""Values and gradients of smoothce.cross_entropy against the float64 reference and PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPES,
    INTERPRETED_TRITON,
    assert_grad_close,
    assert_matches_reference,
    make_logits,
    make_target,
    run_smoothce,
)

import smoothce
from smoothce.reference import cross_entropy_reference

REDUCTIONS = ["mean", "sum", "none"]
SMOOTHING = [0.0, 0.1, 1.0]
VOCAB = [
    1,  # a single class: loss 0, gradient 0
    7,  # odd and tiny
    1000,  # even, not a power of two
    32769,  # above 32k (a block boundary for most kernels) and odd
]


@pytest.mark.parametrize("num_classes", VOCAB)
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, reduction, label_smoothing, num_classes):
    rows = 3 if num_classes > 30000 else 13
    logits = make_logits((rows, num_classes), dtype)
    target = make_target((rows,), num_classes)
    target[0] = 0  # at least one real row, first class
    target[-1] = num_classes - 1  # last class
    options = dict(label_smoothing=label_smoothing, reduction=reduction)
    loss, grad = run_smoothce(logits, target, **options)
    assert_matches_reference(logits, target, loss, grad, **options)


@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_pytorch(reduction, label_smoothing):
    logits = make_logits((33, 517), torch.float32)
    target = make_target((33,), 517)
    options = dict(label_smoothing=label_smoothing, reduction=reduction)
    loss, grad = run_smoothce(logits, target, **options)
    leaf = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(leaf, target, **options)
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(loss, expected.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(
    INTERPRETED_TRITON, reason="Triton's interpreter truncates float32 -> half (GPUs round to nearest)"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_error_no_worse_than_pytorch(dtype):
    # Measured next to PyTorch's own half-precision path, both against float64.
    logits = make_logits((64, 4099), dtype, scale=4.0)
    target = make_target((64,), 4099, ignore_fraction=0.0)
    _, grad = run_smoothce(logits, target, label_smoothing=0.1, reduction="sum")
    leaf = logits.clone().requires_grad_(True)
    F.cross_entropy(leaf, target, label_smoothing=0.1, reduction="sum").backward()
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction="sum")
    ours = (grad.double() - ref_grad).abs().max().item()
    theirs = (leaf.grad.double() - ref_grad).abs().max().item()
    assert ours <= theirs, f"smoothce max |error| {ours:.3g} vs PyTorch {theirs:.3g}"
    # Rounded once: at most half an ulp of the largest gradient (the target column, p - 1).
    assert ours <= 2.0 ** -8 * ref_grad.abs().max().item()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradient_scales_the_kept_gradient(reduction):
    logits = make_logits((9, 50), torch.float32)
    target = make_target((9,), 50)
    leaf = logits.clone().requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, target, label_smoothing=0.1, reduction=reduction)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    loss.backward(upstream)
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction=reduction)
    scale = upstream.double().unsqueeze(-1) if reduction == "none" else upstream.double()
    torch.testing.assert_close(leaf.grad.double(), ref_grad * scale, rtol=1e-5, atol=1e-8)


def test_leading_dimensions():
    logits = make_logits((2, 3, 5, 41), torch.float32)
    target = make_target((2, 3, 5), 41)
    for reduction in REDUCTIONS:
        loss, grad = run_smoothce(logits, target, label_smoothing=0.1, reduction=reduction)
        expected_shape = (2, 3, 5) if reduction == "none" else ()
        assert loss.shape == expected_shape
        assert_matches_reference(logits, target, loss, grad, label_smoothing=0.1, reduction=reduction)


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t.t(),  # transposed: the class dimension has stride > 1
        lambda t: t[:, 3:-4],  # a column slice: rows are strided, the class stride is 1
        lambda t: t[::2],  # every other row
        lambda t: t.t()[::3],  # transposed and strided rows
    ],
    ids=["transposed", "column-slice", "row-step", "transposed-row-step"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_logits(view, dtype):
    base = make_logits((60, 90), dtype)
    logits = view(base)
    assert not logits.is_contiguous()
    target = make_target(logits.shape[:-1], logits.shape[-1])
    leaf = base.clone().requires_grad_(True)
    loss = smoothce.cross_entropy(view(leaf), target, label_smoothing=0.1, reduction="sum")
    loss.backward()
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction="sum")
    full_ref = torch.zeros(base.shape, dtype=torch.float64)
    view(full_ref).copy_(ref_grad)
    assert_matches_reference(logits, target, loss.detach(), None, label_smoothing=0.1, reduction="sum")
    assert_grad_close(leaf.grad, full_ref, dtype)


def test_int32_targets_and_custom_ignore_index():
    logits = make_logits((20, 33), torch.float32)
    target = make_target((20,), 33, ignore_index=5, dtype=torch.int32)  # 5 is also a real class id
    options = dict(label_smoothing=0.1, ignore_index=5, reduction="mean")
    loss, grad = run_smoothce(logits, target, **options)
    assert_matches_reference(logits, target, loss, grad, **options)
    assert torch.all(grad[target == 5] == 0)
    expected = F.cross_entropy(logits, target.long(), **options)
    torch.testing.assert_close(loss, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(reduction):
    # Deliberately not PyTorch's NaN for "mean": 0.0 and a zero gradient.
    logits = make_logits((6, 19), torch.float32)
    target = torch.full((6,), -100)
    loss, grad = run_smoothce(logits, target, label_smoothing=0.1, reduction=reduction)
    assert torch.all(loss == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    logits = torch.empty((0, 11))
    target = torch.empty((0,), dtype=torch.int64)
    loss, grad = run_smoothce(logits, target, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    assert grad.shape == (0, 11)


def test_single_class_gives_zero():
    logits = make_logits((5, 1), torch.float32)
    target = torch.zeros(5, dtype=torch.int64)
    loss, grad = run_smoothce(logits, target, label_smoothing=0.3, reduction="none")
    assert torch.all(loss == 0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_extreme_logits(dtype, label_smoothing):
    big = 1e4 if dtype != torch.float16 else 6e4
    rows = [
        torch.full((97,), big),  # all equal and huge: uniform softmax
        torch.full((97,), -big),
        torch.zeros(97),  # all equal
        torch.linspace(-big, big, 97),  # the target sits far below the max (p_k underflows)
        torch.cat([torch.tensor([big]), torch.full((96,), -big)]),  # one-hot-like
    ]
    logits = torch.stack(rows).to(dtype)
    target = torch.tensor([3, 50, 96, 0, 0])
    options = dict(label_smoothing=label_smoothing, reduction="none")
    loss, grad = run_smoothce(logits, target, **options)
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad.double()).all()
    ref_loss, ref_grad = cross_entropy_reference(logits, target, **options)
    # The loss is a difference of logits of size `big`: fp32 keeps ~1e-7 relative to them.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=big * 2e-7)
    assert_grad_close(grad, ref_grad, dtype)


def test_translation_invariance():
    # Logits on a 1/256 grid, so adding 1024 is exact in fp32 and only the level changes.
    logits = (make_logits((8, 300), torch.float32) * 256).round() / 256
    target = make_target((8,), 300, ignore_fraction=0.0)
    for label_smoothing in (0.0, 0.1):
        a, grad_a = run_smoothce(logits, target, label_smoothing=label_smoothing, reduction="none")
        b, grad_b = run_smoothce(logits + 1024.0, target, label_smoothing=label_smoothing, reduction="none")
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5)  # lam * mean(z) sums values near 1024
        torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=1e-7)


def test_no_gradient_buffer_without_grad(monkeypatch):
    # Under no_grad, or with logits that do not require grad, the backend gets grad=None.
    backend = smoothce.registry.select("cpu")
    seen = []
    original = type(backend).forward

    def spy(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        seen.append(grad)
        return original(self, logits, target, label_smoothing, ignore_index, grad, grad_scale)

    monkeypatch.setattr(type(backend), "forward", spy)
    logits = make_logits((4, 10), torch.float32)
    target = make_target((4,), 10, ignore_fraction=0.0)
    smoothce.cross_entropy(logits, target)
    with torch.no_grad():
        smoothce.cross_entropy(logits.clone().requires_grad_(True), target)
    smoothce.cross_entropy(logits.clone().requires_grad_(True), target)
    assert seen[0] is None
    assert seen[1] is None
    assert isinstance(seen[2], torch.Tensor)
    assert seen[2].shape == (4, 10)
    _, kept = torch.ops.smoothce.cross_entropy_fwd(logits, target, 0.0, -100, "mean", False)
    assert kept.numel() == 0


def test_module_matches_function():
    logits = make_logits((5, 12), torch.float32)
    target = make_target((5,), 12)
    module = smoothce.CrossEntropyLoss(label_smoothing=0.2, ignore_index=-100, reduction="sum")
    assert "label_smoothing=0.2" in repr(module)
    expected = smoothce.cross_entropy(logits, target, label_smoothing=0.2, reduction="sum")
    torch.testing.assert_close(module(logits, target), expected, rtol=0, atol=0)
    assert torch.ops.smoothce.cross_entropy(logits, target, label_smoothing=0.2, reduction="sum") == expected


def test_second_backward_after_inplace_scaling_is_a_clear_error():
    logits = make_logits((4, 10), torch.float32).requires_grad_(True)
    loss = smoothce.cross_entropy(logits, make_target((4,), 10, ignore_fraction=0.0)) * 3.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


def test_repeated_backward_with_unit_upstream_or_inplace_off():
    logits = make_logits((4, 10), torch.float32)
    target = make_target((4,), 10, ignore_fraction=0.0)
    _, ref_grad = cross_entropy_reference(logits, target)
    leaf = logits.clone().requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, target)
    first = torch.autograd.grad(loss, leaf, retain_graph=True)[0].clone()  # dO = 1: kept intact
    second = torch.autograd.grad(loss, leaf)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with smoothce.inplace_backward(False):
        loss = smoothce.cross_entropy(leaf, target) * 3.0
    for _ in range(2):
        grad = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
        torch.testing.assert_close(grad.double(), 3 * ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_float64_gradcheck(reduction, label_smoothing):
    # gradcheck runs backward repeatedly through one graph: keep the gradient intact.
    logits = make_logits((4, 9), torch.float64).requires_grad_(True)
    target = make_target((4,), 9)
    target[0] = 2

    def fn(z):
        with smoothce.inplace_backward(False):
            return smoothce.cross_entropy(z, target, label_smoothing=label_smoothing, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_elements", [1, 64, 1000])
def test_cpu_backend_block_boundaries(dtype, block_elements):
    # Tiny blocks: every block boundary, a last block shorter than the rest, ignored rows
    # inside and at the edges of blocks; the fp32/fp64 in-place path and the scratch path.
    from smoothce.backends.cpu import CpuBackend

    backend = CpuBackend(block_elements=block_elements)
    logits = make_logits((23, 37), dtype)
    target = make_target((23,), 37)
    target[0] = -100
    target[-1] = 36
    grad = torch.empty_like(logits)
    scale = torch.tensor(1 / 7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    loss = backend.forward(logits, target, 0.1, -100, grad, scale)
    ref_loss, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-5)
    assert_grad_close(grad, ref_grad * float(scale), dtype)
    no_grad_loss = backend.forward(logits, target, 0.1, -100, None, scale)
    torch.testing.assert_close(no_grad_loss, loss, rtol=0, atol=0)
