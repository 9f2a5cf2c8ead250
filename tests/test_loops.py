"""The loops people train with: normalizer= for gradient accumulation, and torch.compile's backward in place."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, LINUX_RSS, assert_grad_close, make_logits, make_target
from torch._dynamo.testing import CompileCounterWithBackend

import smoothce
from smoothce import registry
from smoothce._ops import cross_entropy_fwd
from smoothce.bench.measure import rss_growth
from smoothce.reference import cross_entropy_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def reference_over(logits, target, normalizer, label_smoothing=0.1):
    """Loss and gradient of sum(rows) / normalizer in float64 (0 and a zero gradient where normalizer is 0)."""
    loss, grad = cross_entropy_reference(logits, target, label_smoothing=label_smoothing, reduction="sum")
    if normalizer == 0:
        return torch.zeros((), dtype=torch.float64), torch.zeros_like(grad)
    return loss / normalizer, grad / normalizer


def as_given(normalizer, kind):
    if kind == "float":
        return float(normalizer)
    if kind == "cpu tensor":
        return torch.tensor([normalizer], dtype=torch.float64)  # one element, another device and dtype
    return torch.tensor(normalizer, dtype=torch.float32, device=DEVICE)


# 0.5 and 7.25: not integers and not powers of two (float16's kept factor must stay exact); 0: no tokens.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalizer", [3.0, 0.5, 7.25, 0.0])
@pytest.mark.parametrize("kind", ["float", "cpu tensor", "device tensor"])
def test_normalizer_divides_the_sum_and_keeps_backward_free(dtype, normalizer, kind):
    logits = make_logits((9, 37), dtype)
    target = make_target((9,), 37)
    leaf = logits.to(DEVICE).requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, target.to(DEVICE), label_smoothing=0.1, normalizer=as_given(normalizer, kind))
    loss.backward()
    ref_loss, ref_grad = reference_over(logits, target, normalizer)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=2e-5, atol=1e-6)
    assert_grad_close(leaf.grad.cpu(), ref_grad, dtype)  # dO = 1: the kept gradient, rounded once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalizer_through_the_module_the_op_and_the_fused_loss(dtype):
    logits = make_logits((6, 20), dtype)
    target = make_target((6,), 20)
    ref_loss, _ = reference_over(logits, target, 4.0)
    module = smoothce.CrossEntropyLoss(label_smoothing=0.1)
    by_module = module(logits.to(DEVICE), target.to(DEVICE), normalizer=4.0)
    by_op = torch.ops.smoothce.cross_entropy(
        logits.to(DEVICE), target.to(DEVICE), label_smoothing=0.1, normalizer=torch.tensor(4.0, device=DEVICE)
    )
    for loss in (by_module, by_op):
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=2e-5, atol=1e-6)

    hidden = make_logits((6, 8), dtype, seed=3).to(DEVICE).requires_grad_(True)
    weight = make_logits((20, 8), dtype, scale=0.5, seed=4).to(DEVICE).requires_grad_(True)
    fused = smoothce.linear_cross_entropy(hidden, weight, target.to(DEVICE), label_smoothing=0.1, normalizer=4.0)
    fused.backward()
    h64, w64 = hidden.detach().double().cpu().requires_grad_(True), weight.detach().double().cpu().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h64 @ w64.T, target, label_smoothing=0.1, reduction="sum") / 4.0
    ref.backward()
    torch.testing.assert_close(
        fused.double().cpu(), ref.detach(), rtol=2e-3 if dtype != torch.float32 else 2e-5, atol=1e-5
    )
    # bf16 logits are rounded from the matmul before the loss sees them: a few bf16 ulps of the largest entry.
    error = (hidden.grad.double().cpu() - h64.grad).abs().max() / h64.grad.abs().max()
    assert error < (1e-5 if dtype == torch.float32 else 2.0**-6), error


def test_accumulation_window_equals_the_whole_batch():
    # Two micro-batches with different numbers of real tokens: normalizer = the window's tokens
    # gives the whole batch's "mean" gradient, which dividing each micro-batch's mean by 2 does not.
    logits = make_logits((16, 30), torch.float32)
    target = make_target((16,), 30, ignore_fraction=0.4)
    whole = logits.to(DEVICE).requires_grad_(True)
    smoothce.cross_entropy(whole, target.to(DEVICE), label_smoothing=0.1).backward()
    tokens = (target != -100).sum().to(DEVICE)  # the window's real tokens (count_tokens adds the DP ranks)
    leaf = logits.to(DEVICE).requires_grad_(True)
    for rows in (slice(0, 5), slice(5, 16)):
        smoothce.cross_entropy(leaf[rows], target[rows].to(DEVICE), label_smoothing=0.1, normalizer=tokens).backward()
    torch.testing.assert_close(leaf.grad, whole.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("normalizer", "options", "error", "match"),
    [
        (2.0, {"reduction": "sum"}, ValueError, "only used with reduction='mean'"),
        (torch.ones(2), {}, ValueError, r"one-element tensor, got shape \(2,\)"),
        (torch.tensor(True), {}, TypeError, "real number, got a torch.bool"),
        (True, {}, TypeError, "got bool"),
        ("4", {}, TypeError, "got str"),
        (-1.0, {}, ValueError, "finite number >= 0, got -1.0"),
        (float("nan"), {}, ValueError, "got nan"),
        (float("inf"), {}, ValueError, "got inf"),
    ],
)
def test_bad_normalizer_is_a_clear_error(normalizer, options, error, match):
    logits, target = make_logits((3, 5), torch.float32), make_target((3,), 5)
    with pytest.raises(error, match=match):
        smoothce.cross_entropy(logits, target, normalizer=normalizer, **options)
    with pytest.raises(error, match=match):
        smoothce.CrossEntropyLoss(**options)(logits, target, normalizer=normalizer)
    hidden, weight = make_logits((3, 4), torch.float32), make_logits((5, 4), torch.float32)
    with pytest.raises(error, match=match):
        smoothce.linear_cross_entropy(hidden, weight, target, normalizer=normalizer, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("upstream", [1 / 3, 1 / 7, 0.1])
def test_fused_loss_applies_upstream_in_fp32(dtype, upstream):
    # Backward multiplies the kept gradients by dO in fp32 and rounds once: each entry within half an
    # ulp of upstream x the dO = 1 gradient (dO rounded to half first would miss by up to a whole ulp).
    target = make_target((12,), 40)
    hidden = make_logits((12, 16), dtype, seed=5).to(DEVICE)
    weight = make_logits((40, 16), dtype, scale=0.3, seed=6).to(DEVICE)
    grads = []
    for scale in (1.0, upstream):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        (smoothce.linear_cross_entropy(h, w, target.to(DEVICE), label_smoothing=0.1) * scale).backward()
        grads.append((h.grad.double().cpu(), w.grad.double().cpu()))
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)  # relative spacing at the bottom of a binade
    for unit, scaled in zip(grads[0], grads[1], strict=True):
        exact = unit * upstream
        big = exact.abs() > 1e-4  # away from float16's subnormals
        assert ((scaled - exact).abs()[big] / exact.abs()[big]).max() <= ulp / 2 * (1 + 1e-6)


@pytest.mark.skipif(DEVICE.type != "cpu" or not LINUX_RSS, reason="resident-set growth of a CPU backward (Linux)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_gradient_scaled_on_cpu_in_place_without_copies(dtype, reduction):
    # dO != 1 (a loss scale, (loss / k).backward()) on a half gradient: the kept gradient times dO x factor,
    # the product in fp32 rounded once, where the kept gradient lies. ATen's mixed-dtype multiply on CPU
    # gives those values but first makes fp32 copies of the whole gradient and of the product (4x its
    # bytes, about 4x the time).
    logits, target = make_logits((4096, 8192), dtype, seed=3), make_target((4096,), 8192)  # 64 MiB
    upstream = torch.full((4096,), 0.3) if reduction == "none" else torch.tensor(0.3)
    _, kept, factor = cross_entropy_fwd(logits, target, 0.1, -100, reduction, True)
    scale = upstream * factor
    expected = torch.mul(kept, scale.unsqueeze(-1) if reduction == "none" else scale.reshape(1)).to(dtype)
    leaf = logits.clone().requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, target, label_smoothing=0.1, reduction=reduction)
    growth = rss_growth(lambda: loss.backward(upstream))
    assert torch.equal(leaf.grad, expected)
    assert growth <= 0.25 * leaf.grad.nbytes, growth


class ScaleSpy:
    """Records each backward scaling the registry's backend is asked for: (inplace, returned its input)."""

    def __init__(self, monkeypatch):
        self.calls = []
        backend = registry.select(DEVICE)
        original = backend.scale_grad

        def spy(grad, grad_out, factor, per_row, inplace):
            out = original(grad, grad_out, factor, per_row, inplace)
            self.calls.append((inplace, out is grad))
            self.storage = out.untyped_storage().data_ptr()
            return out

        monkeypatch.setattr(backend, "scale_grad", spy)


@pytest.mark.compile
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("upstream", [1.0, 3.0])
def test_compiled_backward_scales_the_kept_gradient_in_place(monkeypatch, reduction, upstream):
    # torch.compile's backward calls the same in-place scaling as eager (an op the compiler keeps
    # opaque, so dO x factor == 1 still writes nothing) and hands that buffer on as the gradient.
    spy = ScaleSpy(monkeypatch)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def step(logits, target):
        return smoothce.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction).sum() * upstream

    logits = make_logits((7, 29), torch.bfloat16)
    target = make_target((7,), 29)
    leaf = logits.to(DEVICE).requires_grad_(True)
    step(leaf, target.to(DEVICE)).backward()
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction=reduction)
    if upstream == 1.0:  # rounded once
        assert_grad_close(leaf.grad.cpu(), ref_grad, torch.bfloat16)
    else:  # kept, then scaled: rounded twice (a normalizer keeps dO = 1)
        torch.testing.assert_close(leaf.grad.double().cpu(), upstream * ref_grad, rtol=2.0**-7, atol=1e-5)
    assert spy.calls == [(True, True)]
    assert counter.frame_count == 1


@pytest.mark.compile
def test_compiled_backward_under_inductor_hands_on_the_kept_buffer(monkeypatch):
    # Inductor keeps the scaling op as it is: the gradient is right, and the logits' gradient IS the
    # kept buffer scaled in place, so forward+backward holds no more than one gradient-sized buffer.
    spy = ScaleSpy(monkeypatch)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(logits, target):
        return smoothce.cross_entropy(logits, target, label_smoothing=0.1) / 3.0

    logits = make_logits((6, 33), torch.float32)
    target = make_target((6,), 33)
    leaf = logits.to(DEVICE).requires_grad_(True)
    step(leaf, target.to(DEVICE)).backward()
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1)
    assert_grad_close(leaf.grad.cpu(), ref_grad / 3.0, torch.float32)
    assert spy.calls == [(True, True)]
    assert leaf.grad.untyped_storage().data_ptr() == spy.storage


@pytest.mark.compile
@pytest.mark.parametrize("upstream", [1.0, 2.0])
def test_compiled_second_backward_is_an_error(upstream):
    # retain_graph=True twice through one in-place call: smoothce's own error where nothing was
    # written (dO = 1), autograd's saved-tensor version check where the kept buffer was scaled.
    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(logits, target):
        return smoothce.cross_entropy(logits, target) * upstream

    leaf = make_logits((4, 9), torch.float32).to(DEVICE).requires_grad_(True)
    loss = step(leaf, make_target((4,), 9).to(DEVICE))
    loss.backward(retain_graph=True)
    match = "second backward" if upstream == 1.0 else "modified by an inplace operation"
    with pytest.raises(RuntimeError, match=match):
        loss.backward()


@pytest.mark.compile
@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs: the cuda nox session (SMOOTHCE_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("upstream", [1.0, 0.5])
def test_compiled_reduce_overhead_replays_the_in_place_backward(upstream):
    # mode="reduce-overhead" captures forward and backward in CUDA graphs: every replay must scale
    # (or, at dO x factor == 1, leave) a fresh kept gradient and hand it on, step after step.
    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def step(logits, target):
        return smoothce.cross_entropy(logits, target, label_smoothing=0.1) * upstream

    for seed in range(4):  # capture, then replays on new values
        logits = make_logits((64, 1000), torch.bfloat16, seed=seed)
        target = make_target((64,), 1000, seed=seed)
        leaf = logits.to(DEVICE).requires_grad_(True)
        step(leaf, target.to(DEVICE)).backward()
        _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1)
        torch.testing.assert_close(leaf.grad.double().cpu(), upstream * ref_grad, rtol=2.0**-7, atol=1e-6)
