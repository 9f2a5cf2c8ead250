"""Values and gradients of smoothce.cross_entropy against the float64 reference and PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICE,
    DTYPES,
    INTERPRETED_TRITON,
    LOSS_TOL,
    TRITON_TEST_BLOCK_V,
    assert_grad_close,
    assert_matches_reference,
    cap_triton_blocks,
    make_logits,
    make_target,
    run_smoothce,
)

import smoothce
from smoothce.reference import cross_entropy_reference

REDUCTIONS = ["mean", "sum", "none"]
SMOOTHING = [0.0, 0.1, 1.0]  # 0: plain cross-entropy (a Triton constexpr branch), 0.1: typical, 1: uniform target
# Rows of up to 40 values run the Triton backends with blocks of 16 columns (cap_triton_blocks);
# longer rows run every backend's own launch configuration.
VOCAB = [
    1,  # a single class: loss 0, gradient 0
    7,  # odd and tiny; under the Triton cap one block with a masked tail
    16,  # under the Triton cap exactly one full block
    40,  # under the Triton cap three blocks, the last one masked (16 + 16 + 8)
    1000,  # even, not a power of two: one program with a masked tail
    32769,  # above 32k (a block boundary for most kernels) and odd: the loop kernel on GPUs
]


@pytest.mark.parametrize("num_classes", VOCAB)
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, reduction, label_smoothing, num_classes, monkeypatch):
    # On DEVICE through the backend that serves it: the CPU backend, a Triton backend on a GPU,
    # or one in Triton's interpreter (SMOOTHCE_BACKEND=cuda-triton / xpu-triton, TRITON_INTERPRET=1).
    if num_classes <= 40:
        cap_triton_blocks(monkeypatch, TRITON_TEST_BLOCK_V)
    rows = 4 if num_classes > 30000 else 7
    logits = make_logits((rows, num_classes), dtype)
    target = make_target((rows,), num_classes)
    target[0] = 0  # first class
    target[1] = -100  # an ignored row
    target[2] = num_classes // 2
    logits[2, target[2]] += 12.0  # a confident row: p_k near 1, so p_k - 1 cancels
    target[-1] = num_classes - 1  # last class
    # "none": a per-row dO of powers of two, exact in every dtype, so a wrong row would show.
    upstream = torch.exp2(torch.arange(rows) % 3 - 1.0) if reduction == "none" else None
    options = dict(label_smoothing=label_smoothing, reduction=reduction)
    loss, grad = run_smoothce(logits, target, upstream=upstream, **options)
    assert_matches_reference(logits, target, loss, grad, upstream=upstream, **options)


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
    assert ours <= 2.0**-8 * ref_grad.abs().max().item()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_upstream_gradient_scales_the_kept_gradient(reduction):
    # Any dO, not just powers of two: one more rounding, inside float32's tolerance.
    logits = make_logits((9, 50), torch.float32)
    target = make_target((9,), 50)
    shape = (9,) if reduction == "none" else ()
    upstream = torch.rand(shape, generator=torch.Generator().manual_seed(3)) + 0.5
    options = dict(label_smoothing=0.1, reduction=reduction)
    loss, grad = run_smoothce(logits, target, upstream=upstream, **options)
    assert_matches_reference(logits, target, loss, grad, upstream=upstream, **options)


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
    leaf = base.to(DEVICE, copy=True).requires_grad_(True)
    loss = smoothce.cross_entropy(view(leaf), target.to(DEVICE), label_smoothing=0.1, reduction="sum")
    loss.backward()
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction="sum")
    full_ref = torch.zeros(base.shape, dtype=torch.float64)
    view(full_ref).copy_(ref_grad)
    assert_matches_reference(logits, target, loss.detach().cpu(), None, label_smoothing=0.1, reduction="sum")
    assert_grad_close(leaf.grad.cpu(), full_ref, dtype)


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


def test_no_gradient_work_without_grad(monkeypatch):
    # Under no_grad, or with logits that do not require grad, the backend is asked for no gradient.
    backend = smoothce.registry.select(DEVICE)
    seen = []
    original = type(backend).loss_and_grad

    def spy(self, logits, target, label_smoothing, ignore_index, reduction, compute_grad):
        result = original(self, logits, target, label_smoothing, ignore_index, reduction, compute_grad)
        seen.append((compute_grad, result[1]))
        return result

    monkeypatch.setattr(type(backend), "loss_and_grad", spy)
    logits = make_logits((4, 10), torch.float32).to(DEVICE)
    target = make_target((4,), 10, ignore_fraction=0.0).to(DEVICE)
    smoothce.cross_entropy(logits, target)
    with torch.no_grad():
        smoothce.cross_entropy(logits.clone().requires_grad_(True), target)
    smoothce.cross_entropy(logits.clone().requires_grad_(True), target)
    assert [compute for compute, _ in seen] == [False, False, True]
    assert seen[0][1] is None
    assert seen[1][1] is None
    assert seen[2][1].shape == (4, 10)
    kept = torch.ops.smoothce.cross_entropy_fwd(logits, target, 0.0, -100, "mean", False)[1]
    assert kept.numel() == 0


def test_module_matches_function():
    logits = make_logits((5, 12), torch.float32).to(DEVICE)
    target = make_target((5,), 12).to(DEVICE)
    module = smoothce.CrossEntropyLoss(label_smoothing=0.2, ignore_index=-100, reduction="sum")
    assert "label_smoothing=0.2" in repr(module)
    expected = smoothce.cross_entropy(logits, target, label_smoothing=0.2, reduction="sum")
    torch.testing.assert_close(module(logits, target), expected, rtol=0, atol=0)
    assert torch.ops.smoothce.cross_entropy(logits, target, label_smoothing=0.2, reduction="sum") == expected


def test_second_backward_after_inplace_scaling_is_a_clear_error():
    logits = make_logits((4, 10), torch.float32).to(DEVICE).requires_grad_(True)
    loss = smoothce.cross_entropy(logits, make_target((4,), 10, ignore_fraction=0.0).to(DEVICE)) * 3.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


def test_repeated_backward_with_inplace_off():
    # Inside inplace_backward(False) every backward returns a new tensor and the kept gradient
    # stays intact, for dO = 1 and otherwise (tests/test_recipes.py edits .grad in between).
    logits = make_logits((4, 10), torch.float32)
    target = make_target((4,), 10, ignore_fraction=0.0)
    _, ref_grad = cross_entropy_reference(logits, target)
    leaf = logits.to(DEVICE, copy=True).requires_grad_(True)
    for factor in (1.0, 3.0):
        with smoothce.inplace_backward(False):
            loss = smoothce.cross_entropy(leaf, target.to(DEVICE)) * factor
        grads = [torch.autograd.grad(loss, leaf, retain_graph=True)[0] for _ in range(3)]
        for grad in grads:
            torch.testing.assert_close(grad.double().cpu(), factor * ref_grad, rtol=1e-5, atol=1e-7)
        assert grads[0].data_ptr() != grads[1].data_ptr()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_float64_gradcheck(reduction, label_smoothing):
    # gradcheck runs backward repeatedly through one graph: keep the gradient intact.
    logits = make_logits((4, 9), torch.float64).to(DEVICE).requires_grad_(True)
    target = make_target((4,), 9)
    target[0] = 2
    target = target.to(DEVICE)

    def fn(z):
        with smoothce.inplace_backward(False):
            return smoothce.cross_entropy(z, target, label_smoothing=label_smoothing, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.skipif(
    DEVICE.type != "cpu" or INTERPRETED_TRITON, reason="the CPU backend's own blocks: run in the CPU backend's session"
)
@pytest.mark.parametrize("confident", [False, True], ids=["", "confident-rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_elements", [1, 64, 1000])
def test_cpu_backend_block_boundaries(dtype, block_elements, confident):
    # Tiny blocks: every block boundary, a last block shorter than the rest, ignored rows
    # inside and at the edges of blocks; the fp32/fp64 in-place path and the scratch path
    # (37 x 700 logits: above the small-input path, which takes no blocks).
    # With confident rows (p_k near 1) in some blocks only: those blocks sum q, others don't.
    from smoothce.backends.cpu import CpuBackend

    backend = CpuBackend(block_elements=block_elements)
    logits = make_logits((37, 700), dtype)
    target = make_target((37,), 700)
    target[0] = -100
    target[-1] = 699
    if confident:
        rows = (target != -100).nonzero().squeeze(1)[::4]
        logits[rows, target[rows]] += 12.0
    grad = torch.empty_like(logits)
    scale = torch.tensor(1 / 7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    loss = backend.forward(logits, target, 0.1, -100, grad, scale)
    ref_loss, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-5)
    assert_grad_close(grad, ref_grad * float(scale), dtype)
    no_grad_loss = backend.forward(logits, target, 0.1, -100, None, scale)  # from the log-softmax instead
    torch.testing.assert_close(no_grad_loss, loss, rtol=2e-6, atol=1e-6)


# --- precision: offsets, full smoothing, confident rows, -inf ------------------------------


# Rows x classes: above and below the CPU backend's 64K logits, where its sums go fp64 outright.
@pytest.mark.parametrize("shape", [(8, 32000), (4, 1000)], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
def test_large_common_offset_with_smoothing(label_smoothing, shape):
    # Logits sharing a large offset: the smoothing term (lam / V) sum_j z_j must be formed
    # relative to the row (the offset cancels exactly), not summed over raw logits whose sum
    # fp32 cannot hold to the loss's precision.
    logits = (-3e4 + make_logits(shape, torch.float64, scale=1.0)).float()
    target = make_target(shape[:1], shape[1], ignore_fraction=0.0)
    options = dict(label_smoothing=label_smoothing, reduction="none")
    loss, grad = run_smoothce(logits, target, **options)
    ref_loss, ref_grad = cross_entropy_reference(logits, target, **options)
    relative = ((loss.double() - ref_loss).abs() / ref_loss).max().item()
    assert relative <= 1e-6, f"relative loss error {relative:.2e} (PyTorch's fp32 kernel: about 2e-7)"
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
def test_equal_logits_with_large_offset(label_smoothing):
    # 70000 logits all 30000: a uniform softmax, loss = log V for every lam (the raw fp32 sum
    # of the logits gave 11.15820 against log V = 11.15625 at lam = 1).
    num_classes = 70000
    equal = torch.full((1, num_classes), 30000.0)
    loss, grad = run_smoothce(equal, torch.tensor([0]), label_smoothing=label_smoothing, reduction="none")
    assert abs(loss.item() - math.log(num_classes)) <= 2e-6, f"{loss.item():.7f} vs log V {math.log(num_classes):.7f}"
    _, ref_grad = cross_entropy_reference(equal, torch.tensor([0]), label_smoothing=label_smoothing, reduction="none")
    # p_j = 1/V in fp32 minus lam / V: a few ulps of 1/V (at lam = 1 the exact gradient is 0).
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=4 * 2.0**-24 / num_classes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_target_column_with_full_smoothing(dtype):
    # lam = 1: the target column is p_k - 1/V, about 1e-5 here. Forming it as
    # (p_k - 1) + lam (1 - 1/V) leaves an absolute error of half an ulp of 1 (6e-8 in fp32),
    # whatever its size; the result must carry only p_k's own relative rounding error.
    num_classes = 65536
    logits = make_logits((4, num_classes), dtype, scale=1.0)
    target = torch.tensor([5, 100, 40000, num_classes - 1])
    logits[torch.arange(4), target] = torch.tensor([3.0, -2.0, 0.0, 1.0], dtype=dtype)  # g_k well away from 0
    loss, grad = run_smoothce(logits, target, label_smoothing=1.0, reduction="sum")
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=1.0, reduction="sum")
    rows = torch.arange(4)
    ours, expected = grad[rows, target].double(), ref_grad[rows, target]
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, expected, rtol=rtol, atol=0.0)
    assert_matches_reference(logits, target, loss, grad, label_smoothing=1.0, reduction="sum")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_confident_rows_keep_the_remainder(label_smoothing):
    # One logit dominates: sum_j exp(z_j - m) is 1 plus a remainder far below fp32's ulp of 1.
    # -log p_k = log1p(remainder) must keep it (PyTorch's fp32 kernel is 6% off on the first
    # row), and so must the target column p_k - 1 = -remainder / (1 + remainder). The float64
    # reference itself cancels r - z_k here, so the exact values are formed with log1p.
    rows = [
        torch.cat([torch.tensor([19.45]), torch.zeros(69999)]),  # loss 2.5004e-4
        torch.cat([torch.tensor([30.0, 0.0, 0.0]), torch.full((69997,), -30.0)]),  # 1.9e-13
        torch.cat([torch.tensor([25.0, 25.0]), torch.zeros(69998)]),  # a tie for the max: log 2 + ...
        torch.cat([torch.zeros(69999), torch.tensor([19.45])]),  # the max in the last column
    ]
    logits = torch.stack(rows)
    target = torch.tensor([0, 0, 1, 69999])
    loss, grad = run_smoothce(logits, target, label_smoothing=label_smoothing, reduction="none")
    z = logits.double()
    index = torch.arange(4)
    z_k = z[index, target]
    others = (z - z_k.unsqueeze(1)).exp()
    others[index, target] = 0.0
    remainder = others.sum(1)  # sum_{j != k} exp(z_j - z_k)
    expected = torch.log1p(remainder) + label_smoothing * (z_k - z.mean(1))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0.0)
    expected_target_col = -remainder / (1 + remainder) + label_smoothing * (1 - 1 / z.shape[1])
    torch.testing.assert_close(grad[index, target].double(), expected_target_col, rtol=1e-5, atol=0.0)
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=label_smoothing, reduction="none")
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_logits(dtype, label_smoothing):
    # A target on a -inf column has probability 0: the loss is +inf for every lam (PyTorch:
    # NaN at lam = 1). A -inf elsewhere makes the loss +inf only when smoothing puts mass on it.
    logits = make_logits((3, 10), dtype)
    logits[0, 3] = -math.inf
    logits[1, 7] = -math.inf
    logits[2, [1, 2]] = -math.inf
    target = torch.tensor([3, 0, 2])
    loss, grad = run_smoothce(logits, target, label_smoothing=label_smoothing, reduction="none")
    assert loss[0].item() == math.inf
    assert loss[2].item() == math.inf
    if label_smoothing == 0.0:
        assert math.isfinite(loss[1].item())
    else:
        assert loss[1].item() == math.inf
    ref_loss, ref_grad = cross_entropy_reference(logits, target, label_smoothing=label_smoothing, reduction="none")
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    assert torch.isfinite(grad.double()).all()
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("ignore_index", [2**32 + 1, -(2**32) + 1, 2**31, -(2**31) - 1, 2**63 - 1])
def test_int32_target_with_ignore_index_beyond_int32(ignore_index):
    # No int32 target equals an ignore_index outside int32's range: nothing is ignored.
    # (2**32 + 1 wraps to 1 and -2**32 + 1 to 1 in an int32 comparison.)
    logits = make_logits((6, 9), torch.float32)
    target = torch.tensor([1, 2, 1, 0, 8, 1], dtype=torch.int32)
    options = dict(label_smoothing=0.1, ignore_index=ignore_index, reduction="none")
    loss, grad = run_smoothce(logits, target, **options)
    assert (loss > 0).all()
    assert_matches_reference(logits, target.long(), loss, grad, **options)
    expected, _ = run_smoothce(logits, target.long(), **options)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
