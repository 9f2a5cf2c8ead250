"""smoothce.linear_cross_entropy: values and gradients against float64 linear + cross-entropy, chunking,
edge cases, errors, opcheck, torch.compile, and peak memory in a fresh process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, INTERPRETED_TRITON, LINUX_RSS, make_target
from torch._dynamo.testing import CompileCounterWithBackend

import smoothce
from smoothce.linear import chunk_rows
from smoothce.reference import cross_entropy_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
REDUCTIONS = ["mean", "sum", "none"]
# Relative error (max |error| / max |value|) allowed against the float64 reference. Half
# precision rounds the logits to its dtype, as F.linear does; that error, which PyTorch's own
# path has too, dwarfs everything after it, so half precision is held to a float64 reference
# computed from those very logits: what remains is the gradient's rounding to bf16/fp16 and
# the final rounding (fp16 d hidden is rounded twice on CPU, scaled after the matmul).
TOLERANCE = {
    torch.float64: 1e-11,
    torch.float32: 2e-5,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-9,
}


def chunk_of(rows, num_classes, dim, dtype):
    """A chunk budget that gives exactly ``rows`` rows per chunk (for rows < 128)."""
    return rows * (num_classes * dtype.itemsize + 4 * dim)


def make_problem(lead, dim, num_classes, dtype, *, bias=False, seed=0, ignore_fraction=0.25):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*lead, dim), generator=generator, dtype=torch.float64).to(dtype)
    weight = (torch.randn(num_classes, dim, generator=generator, dtype=torch.float64) * 2 / dim**0.5).to(dtype)
    b = (torch.randn(num_classes, generator=generator, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    target = make_target(tuple(lead), num_classes, ignore_fraction=ignore_fraction, seed=seed + 1)
    return hidden, weight, b, target


def reference(
    hidden, weight, bias, target, upstream, *, round_logits=False, class_weight=None, return_lse=False, **options
):
    """float64 loss and d hidden, d weight, d bias of cross-entropy(hidden W^T + b), times ``upstream``
    (and the lse per row, last, with ``return_lse``).

    With ``round_logits``, the logits are F.linear's in the inputs' dtype (rounded to it), and
    everything after them is float64.
    """
    h, w = hidden.double(), weight.double()
    if round_logits:
        logits = F.linear(hidden, weight, bias).double()
    else:
        logits = h @ w.t() + (0 if bias is None else bias.double())
    loss, d_logits, *lse = cross_entropy_reference(logits, target, class_weight, return_lse=return_lse, **options)
    if options.get("reduction") == "none":
        d_logits = d_logits * upstream.double().unsqueeze(-1)
    else:
        d_logits = d_logits * float(upstream)
    g = d_logits.reshape(-1, weight.shape[0])
    d_bias = None if bias is None else g.sum(0)
    return loss, (g @ w).reshape(hidden.shape), g.t() @ h.reshape(-1, weight.shape[1]), d_bias, *lse


def run(fn, hidden, weight, bias, target, upstream, **options):
    """Loss and gradients of fn on leaf copies on DEVICE, backward with ``upstream`` (and the lse, last,
    where fn returns ``(loss, lse)``)."""
    leaves = [
        None if t is None else t.detach().to(DEVICE, copy=True).requires_grad_(True) for t in (hidden, weight, bias)
    ]
    if options.get("class_weight") is not None:
        options = {**options, "class_weight": options["class_weight"].to(DEVICE)}
    out = fn(leaves[0], leaves[1], target.to(DEVICE), bias=leaves[2], **options)
    loss, *lse = out if isinstance(out, tuple) else (out,)
    assert not any(t.requires_grad for t in lse)  # no gradient through the lse
    loss.backward(upstream.to(DEVICE, loss.dtype))
    grads = [None if leaf is None else leaf.grad.cpu() for leaf in leaves]
    return loss.detach().cpu(), *grads, *(t.cpu() for t in lse)


def torch_path(hidden, weight, target, *, bias=None, **options):
    return F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, -2), target.flatten(), **options).reshape(
        target.shape if options.get("reduction") == "none" else ()
    )


def rel_err(value, ref):
    """max |value - ref| / max |ref|; absolute where the reference is (float64-round-off) zero."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((value.double() - ref).abs().max()) if ref.numel() else 0.0
    return err / scale if scale > 1e-12 else err


def assert_close_to_reference(hidden, weight, bias, target, upstream, ours, *, grad_factor=1.0, **options):
    """``ours`` (loss, d hidden, d weight, d bias[, lse]) against ``reference``: TOLERANCE, the gradients'
    times ``grad_factor``."""
    half = hidden.dtype in (torch.bfloat16, torch.float16)
    ref = reference(hidden, weight, bias, target, upstream, round_logits=half, **options)
    loss_tol = TOLERANCE[torch.float32] if half else TOLERANCE[hidden.dtype]
    loss = ours[0]
    assert loss.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    assert loss.shape == ref[0].shape
    if options.get("return_lse"):  # the lse of every row, ignored ones too, in the loss dtype
        (ours, lse), (ref, ref_lse) = (ours[:-1], ours[-1]), (ref[:-1], ref[-1])
        assert lse.dtype == loss.dtype
        assert lse.shape == target.shape
        assert rel_err(lse, ref_lse) <= loss_tol, ("lse", rel_err(lse, ref_lse))
    for got, want, inp in zip(ours[1:], ref[1:], (hidden, weight, bias), strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == inp.dtype
            assert got.shape == inp.shape
    assert rel_err(loss, ref[0]) <= loss_tol, ("loss", rel_err(loss, ref[0]))
    for name, got, want in zip(("hidden", "weight", "bias"), ours[1:], ref[1:], strict=True):
        if want is not None:
            assert rel_err(got, want) <= grad_factor * TOLERANCE[hidden.dtype], (name, rel_err(got, want))


def upstream_for(loss_shape, reduction, seed=3):
    if reduction != "none":
        return torch.tensor(1.5)  # dO != 1: backward must scale the kept gradients
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(loss_shape, generator=generator) + 0.5


# ---------------------------------------------------------------------------------------
# Values and gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_matches_reference(dtype, reduction, label_smoothing, bias):
    # (2, 5) leading dims = 10 rows in chunks of 3: three full chunks and a short last one.
    # D = 13, V = 37: odd sizes, no aligned tails.
    hidden, weight, b, target = make_problem((2, 5), 13, 37, dtype, bias=bias)
    options = {"label_smoothing": label_smoothing, "reduction": reduction}
    upstream = upstream_for(target.shape, reduction)
    with smoothce.linear.settings(chunk_bytes=chunk_of(3, 37, 13, dtype)):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, **options)
    assert_close_to_reference(hidden, weight, b, target, upstream, ours, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_half_precision_no_worse_than_pytorch(dtype, bias):
    # The accuracy target at a size where the comparison is stable (many rows and
    # classes, 8 chunks): each gradient's error against float64 on the same (rounded) inputs
    # is at most PyTorch's own bf16/fp16 path's, with a margin for the luck of the draw.
    hidden, weight, b, target = make_problem((256,), 64, 2000, dtype, bias=bias)
    upstream = torch.tensor(1.0)
    ref = reference(hidden, weight, b, target, upstream, label_smoothing=0.1)
    with smoothce.linear.settings(chunk_bytes=chunk_of(32, 2000, 64, dtype)):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, label_smoothing=0.1)
    theirs = run(torch_path, hidden, weight, b, target, upstream, label_smoothing=0.1)
    factor = 1.25
    for name, got, torch_got, want in zip(("loss", "hidden", "weight", "bias"), ours, theirs, ref, strict=True):
        if want is not None:
            assert rel_err(got, want) <= factor * rel_err(torch_got, want), (
                name,
                rel_err(got, want),
                rel_err(torch_got, want),
            )


@pytest.mark.parametrize(
    ("lead", "dim", "num_classes"),
    [
        ((), 5, 7),  # hidden (D,): one row, a 0-d target
        ((9,), 1, 1),  # V = 1 (the loss is 0 and so is every gradient) and D = 1
        ((3, 1, 4), 3, 129),  # three leading dims; V one past a power of two
        ((17,), 65, 2),  # D one past a power of two, binary
    ],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_shapes(lead, dim, num_classes, reduction):
    hidden, weight, b, target = make_problem(lead, dim, num_classes, torch.float32, bias=True)
    options = {"label_smoothing": 0.1, "reduction": reduction}
    upstream = upstream_for(target.shape, reduction)
    with smoothce.linear.settings(chunk_bytes=chunk_of(2, num_classes, dim, torch.float32)):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, **options)
    assert_close_to_reference(hidden, weight, b, target, upstream, ours, **options)


@pytest.mark.parametrize("rows", [1, 4, 10, 11, 1000], ids=lambda r: f"chunk{r}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunk_boundaries(rows, reduction):
    # 10 rows: chunks of one row, a short last chunk, exactly one chunk, a chunk larger than N.
    dtype = torch.bfloat16
    hidden, weight, b, target = make_problem((10,), 24, 50, dtype, bias=True)
    options = {"label_smoothing": 0.1, "reduction": reduction}
    upstream = upstream_for(target.shape, reduction)
    with smoothce.linear.settings(chunk_bytes=chunk_of(rows, 50, 24, dtype)):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, **options)
        whole = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, **options)
    assert_close_to_reference(hidden, weight, b, target, upstream, ours, **options)
    for got, again in zip(ours, whole, strict=True):
        torch.testing.assert_close(got, again, rtol=0, atol=0)  # deterministic


def test_targets_checked_once_per_call(monkeypatch):
    # Ten chunks, one target check (on an accelerator each is a handful of kernel launches); a bad
    # target in the last chunk still raises, naming it.
    if DEVICE.type != "cpu":
        pytest.skip("counted through the host check, which CPU tensors take")
    calls = []
    check = smoothce.checks.check_targets_on_host
    monkeypatch.setattr(smoothce.checks, "check_targets_on_host", lambda *a: calls.append(1) or check(*a))
    hidden, weight, b, target = make_problem((10,), 24, 50, torch.float32, bias=True)
    hidden.requires_grad_()
    with smoothce.linear.settings(chunk_bytes=chunk_of(1, 50, 24, torch.float32)):
        smoothce.linear_cross_entropy(hidden, weight, target, bias=b, label_smoothing=0.1).backward()
        assert len(calls) == 1
        target[-1] = 50
        with pytest.raises(ValueError, match="target value 50 is out of range"):
            smoothce.linear_cross_entropy(hidden, weight, target, bias=b)


def test_chunk_rows_from_budget():
    assert chunk_rows(10, 50, 24, torch.bfloat16, chunk_of(3, 50, 24, torch.bfloat16)) == 3
    assert chunk_rows(10, 50, 24, torch.bfloat16, 1) == 1  # never zero rows
    assert chunk_rows(10, 50, 24, torch.float32, 1 << 30) == 10  # never more than N
    # Independent of N beyond it, and GEMM-friendly: 32 MiB at V = 32000 fp32 holds 224 rows (of 259).
    assert chunk_rows(1 << 20, 32000, 1024, torch.float32, 32 << 20) == 224
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"), smoothce.linear.settings(chunk_bytes=0):
        pass
    with pytest.raises(TypeError, match="chunk_bytes must be an int"), smoothce.linear.settings(chunk_bytes=1.5):
        pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_default_chunk_budget_by_dtype(monkeypatch, dtype):
    # The op gets the default of the logits' dtype (half logits on CPU: twice fp32's), and
    # settings(chunk_bytes=...) overrides it for every dtype.
    budgets = []
    run_chunks = smoothce.linear._run_chunks
    monkeypatch.setattr(
        smoothce.linear, "_run_chunks", lambda *a, **k: budgets.append(k["chunk_bytes"]) or run_chunks(*a, **k)
    )
    hidden, weight, _, target = make_problem((5,), 8, 11, dtype, bias=False)
    hidden, weight, target = hidden.to(DEVICE), weight.to(DEVICE), target.to(DEVICE)
    smoothce.linear_cross_entropy(hidden, weight, target)
    with smoothce.linear.settings(chunk_bytes=12345):
        smoothce.linear_cross_entropy(hidden, weight, target)
    half = dtype in smoothce.linear.HALF_DTYPES
    default = smoothce.linear.chunk_bytes_for(hidden.device, dtype)
    if hidden.device.type == "cpu":
        assert default == (64 << 20 if half else 32 << 20)
    else:
        assert default == smoothce.linear.DEFAULT_ACCELERATOR_CHUNK_BYTES
    assert budgets == [default, 12345]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(reduction):
    hidden, weight, b, target = make_problem((6,), 8, 11, torch.float32, bias=True)
    target = torch.full_like(target, -100)
    upstream = upstream_for(target.shape, reduction)
    loss, dh, dw, db = run(
        smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, reduction=reduction, label_smoothing=0.1
    )
    assert torch.equal(loss, torch.zeros_like(loss))  # "mean" over no counted target is 0, not NaN
    for grad in (dh, dw, db):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    hidden, weight, b, target = make_problem((0,), 8, 11, torch.float32, bias=True)
    upstream = upstream_for(target.shape, reduction)
    loss, dh, dw, db = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert loss.sum() == 0
    assert dh.shape == (0, 8)
    assert torch.equal(dw, torch.zeros_like(dw))
    assert torch.equal(db, torch.zeros_like(db))


@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
def test_only_some_inputs_require_grad(which):
    hidden, weight, b, target = make_problem((7,), 6, 9, torch.float64, bias=True)
    leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": b.clone()}
    leaves[which].requires_grad_(True)
    loss = smoothce.linear_cross_entropy(leaves["hidden"], leaves["weight"], target, bias=leaves["bias"])
    loss.backward()
    ref = dict(zip(("hidden", "weight", "bias"), reference(hidden, weight, b, target, 1.0)[1:], strict=True))
    for name, leaf in leaves.items():
        if name == which:
            torch.testing.assert_close(leaf.grad, ref[name], rtol=1e-10, atol=1e-12)
        else:
            assert leaf.grad is None


def test_fp16_mean_does_not_underflow():
    # 1024 rows into V = 3000: most p_j / count are below float16's normal range (6e-5), many
    # below its smallest subnormal (6e-8), so folding 1/count into the chunk's fp16 gradient
    # would lose them (up to 7% error on normal-range entries here); applied to the fp32 sums
    # (and after the d hidden matmul), every normal-range entry stays within 2%.
    dtype = torch.float16
    hidden, weight, b, target = make_problem((1024,), 4, 3000, dtype, bias=True, ignore_fraction=0.0)
    with smoothce.linear.settings(chunk_bytes=chunk_of(256, 3000, 4, dtype)):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, torch.tensor(1.0))
    ref = reference(hidden, weight, b, target, 1.0, round_logits=True)
    for name, got, want in zip(("hidden", "weight", "bias"), ours[1:], ref[1:], strict=True):
        normal = want.abs() >= 2.0**-14
        error = ((got.double() - want).abs() / want.abs())[normal]
        assert normal.sum() > 1000
        assert float(error.max()) <= 0.02, (name, float(error.max()))


@pytest.mark.parametrize("fp32_weight_grad", [True, False])
def test_weight_grad_accumulation_modes(fp32_weight_grad):
    # Accumulating d weight in bf16 rounds once per chunk (16 chunks here): close to the
    # reference, but further than the fp32 accumulator, which rounds once.
    dtype = torch.bfloat16
    hidden, weight, b, target = make_problem((64,), 32, 40, dtype, bias=True)
    with smoothce.linear.settings(chunk_bytes=chunk_of(4, 40, 32, dtype), fp32_weight_grad=fp32_weight_grad):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, torch.tensor(1.0))
    ref = reference(hidden, weight, b, target, 1.0)
    with smoothce.linear.settings(chunk_bytes=chunk_of(64, 40, 32, dtype)):
        one_chunk = run(smoothce.linear_cross_entropy, hidden, weight, b, target, torch.tensor(1.0))
    assert ours[2].dtype == dtype
    if fp32_weight_grad:
        assert torch.equal(ours[2], one_chunk[2])  # one rounding, as if all rows were one chunk
    else:
        assert not torch.equal(ours[2], one_chunk[2])
        assert rel_err(ours[2], ref[2]) < 3e-2


@pytest.mark.parametrize("bf16_units", [True, False], ids=["bf16_precision_matmul", "fp32_matmul"])
def test_bf16_weight_grad_accumulates_exact_products(monkeypatch, bf16_units):
    # acc += a @ b for bf16 a, b and an fp32 acc: on CPUs with bf16 units one fp32 matmul at bf16
    # precision (the products of bf16 values are exact in fp32), else upcasts: either way the fp32
    # matmul of the exact values, to fp32 summation; the global matmul precision is left as it was.
    monkeypatch.setattr(smoothce.linear, "_cpu_multiplies_bf16", lambda: bf16_units)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, 96, generator=generator).bfloat16()
    b = torch.randn(96, 200, generator=generator).bfloat16()
    acc = torch.randn(300, 200, generator=generator)
    expected = acc.double() + a.double() @ b.double()
    before = torch.backends.mkldnn.matmul.fp32_precision
    smoothce.linear.accumulate_(acc, a, b)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert (acc.double() - expected).abs().max() <= 96 * 2.0**-24 * (a.double().abs() @ b.double().abs()).max()


def test_module_matches_function():
    hidden, weight, b, target = make_problem((2, 3), 8, 11, torch.float32, bias=True)
    module = smoothce.LinearCrossEntropyLoss(label_smoothing=0.2, reduction="sum")
    assert "label_smoothing=0.2" in repr(module)
    assert "reduction='sum'" in repr(module)
    expected = smoothce.linear_cross_entropy(hidden, weight, target, bias=b, label_smoothing=0.2, reduction="sum")
    torch.testing.assert_close(module(hidden, weight, target, bias=b), expected, rtol=0, atol=0)
    same_as_plain = smoothce.cross_entropy(F.linear(hidden, weight, b), target, label_smoothing=0.2, reduction="sum")
    torch.testing.assert_close(expected, same_as_plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        smoothce.LinearCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        smoothce.LinearCrossEntropyLoss(label_smoothing=1.5)


# ---------------------------------------------------------------------------------------
# Autograd: backward only scales; the kept gradients; gradcheck
# ---------------------------------------------------------------------------------------


def _spy_backend(monkeypatch):
    backend = smoothce.registry.select(DEVICE)
    calls = []
    original = type(backend).forward

    def spy(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        calls.append(grad is not None)
        return original(self, logits, target, label_smoothing, ignore_index, grad, grad_scale)

    monkeypatch.setattr(type(backend), "forward", spy)
    return calls


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_recomputes_only_for_none(monkeypatch, reduction):
    calls = _spy_backend(monkeypatch)
    hidden, weight, _, target = make_problem((10,), 8, 11, torch.float32)
    leaves = [t.to(DEVICE).requires_grad_(True) for t in (hidden, weight)]
    with smoothce.linear.settings(chunk_bytes=chunk_of(4, 11, 8, torch.float32)):
        loss = smoothce.linear_cross_entropy(*leaves, target.to(DEVICE), reduction=reduction)
    forward_calls = list(calls)
    loss.sum().backward()
    # Three chunks each way; "mean"/"sum" compute the gradient in the forward pass,
    # "none" only the loss there and the gradient in backward.
    assert forward_calls == [reduction != "none"] * 3
    assert calls[3:] == ([True] * 3 if reduction == "none" else [])


def test_no_gradient_work_without_grad(monkeypatch):
    calls = _spy_backend(monkeypatch)
    hidden, weight, _, target = make_problem((5,), 8, 11, torch.float32)
    smoothce.linear_cross_entropy(hidden.to(DEVICE), weight.to(DEVICE), target.to(DEVICE))
    with torch.no_grad():
        smoothce.linear_cross_entropy(hidden.to(DEVICE).requires_grad_(True), weight.to(DEVICE), target.to(DEVICE))
    assert calls == [False, False]
    out = torch.ops.smoothce.linear_cross_entropy_fwd(
        hidden, weight, None, target, 0.0, -100, "mean", 1 << 20, True, False, False, False
    )
    assert [t.numel() for t in out[1:]] == [0, 0, 0]


def test_second_backward_after_inplace_scaling_is_a_clear_error():
    hidden, weight, _, target = make_problem((4,), 8, 10, torch.float32)
    hidden.requires_grad_(True)
    loss = smoothce.linear_cross_entropy(hidden, weight, target) * 3.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


def test_repeated_backward_is_an_error_in_place_and_works_with_inplace_off():
    hidden, weight, _, target = make_problem((4,), 8, 10, torch.float32)
    _, ref_h, _, _ = reference(hidden, weight, None, target, 1.0)
    leaf = hidden.clone().requires_grad_(True)
    loss = smoothce.linear_cross_entropy(leaf, weight, target)
    torch.autograd.grad(loss, leaf, retain_graph=True)  # the kept gradients are handed on
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, leaf)
    with smoothce.inplace_backward(False):
        loss = smoothce.linear_cross_entropy(leaf, weight, target) * 3.0
    for _ in range(2):
        grad = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
        torch.testing.assert_close(grad.double(), 3 * ref_h, rtol=1e-5, atol=1e-7)


def test_double_backward_is_a_clear_error():
    hidden, weight, _, target = make_problem((4,), 8, 10, torch.float64)
    hidden.requires_grad_(True)
    loss = smoothce.linear_cross_entropy(hidden, weight, target) * 2.0
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_float64_gradcheck(reduction, label_smoothing):
    # gradcheck runs backward repeatedly through one graph: keep the gradients intact.
    hidden, weight, b, target = make_problem((5,), 3, 4, torch.float64, bias=True)
    target[0] = 2
    inputs = tuple(t.clone().requires_grad_(True) for t in (hidden, weight, b))

    def fn(h, w, bias):
        with smoothce.inplace_backward(False), smoothce.linear.settings(chunk_bytes=chunk_of(2, 4, 3, h.dtype)):
            return smoothce.linear_cross_entropy(
                h, w, target, bias=bias, label_smoothing=label_smoothing, reduction=reduction
            )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# The backend's gradient written over its own input (what the chunk loop relies on)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_backend_gradient_in_place(dtype, label_smoothing):
    backend = smoothce.registry.select(DEVICE)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 300, generator=generator, dtype=torch.float64) * 4).to(dtype).to(DEVICE)
    target = make_target((9,), 300).to(DEVICE)
    scale = torch.tensor(0.25, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    separate = torch.empty_like(logits)
    loss = backend.forward(logits, target, label_smoothing, -100, separate, scale)
    same = logits.clone()
    loss_in_place = backend.forward(same, target, label_smoothing, -100, same, scale)
    torch.testing.assert_close(loss_in_place, loss, rtol=0, atol=0)
    torch.testing.assert_close(same, separate, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_backend_gradient_in_place_rare_rows(dtype, label_smoothing):
    # Above the small-input path and fp64 sums (40 x 3000 logits): a target 200 below its row's
    # max (p_k underflows), a row near 1000 (a common offset), a confident row, a -inf target,
    # an ignored row. Written over its own logits, the gradient and loss match a separate
    # gradient's, and the loss matches float64.
    backend = smoothce.registry.select(DEVICE)
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(40, 3000, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 3000, (40,), generator=generator)
    z[0, target[0]] -= 200.0
    z[1] += 1000.0
    z[2, target[2]] += 30.0
    z[3, target[3]] = -math.inf
    target[4] = -100
    logits, target = z.to(dtype).to(DEVICE), target.to(DEVICE)
    scale = torch.tensor(0.5, device=DEVICE)
    separate = torch.empty_like(logits)
    loss = backend.forward(logits, target, label_smoothing, -100, separate, scale)
    same = logits.clone()
    loss_in_place = backend.forward(same, target, label_smoothing, -100, same, scale)
    ref, _ = cross_entropy_reference(logits.cpu(), target.cpu(), label_smoothing=label_smoothing, reduction="none")
    assert loss_in_place[3].item() == math.inf
    torch.testing.assert_close(loss_in_place.cpu().double(), ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(loss_in_place, loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(same, separate, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["far_below_max", "large_offset"])
def test_rare_rows_with_gradient_in_place(case):
    # far_below_max: one row's target logit is 200 below its max, p_k = e^-200 underflows fp32.
    # large_offset: every logit near 1000 (a bias), smoothing 0.5, N * V above 64K logits.
    # "sum": the gradient is computed in the forward pass, written over the chunk's logits.
    if case == "far_below_max":
        hidden, weight, bias = torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [200.0], [1.0]]), None
        target, label_smoothing = torch.tensor([0, 2]), 0.0
    else:
        hidden, weight, _, target = make_problem((300,), 4, 1000, torch.float32)
        bias, label_smoothing = torch.full((1000,), 1000.0), 0.5
    leaf = hidden.to(DEVICE).requires_grad_(True)
    loss = smoothce.linear_cross_entropy(
        leaf,
        weight.to(DEVICE),
        target.to(DEVICE),
        bias=None if bias is None else bias.to(DEVICE),
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    ref, _, _, _ = reference(
        hidden, weight, bias, target, torch.tensor(1.0), reduction="sum", label_smoothing=label_smoothing
    )
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def _good():
    hidden, weight, b, target = make_problem((2, 3), 8, 11, torch.float32, bias=True)
    return {"hidden": hidden, "weight": weight, "target": target, "bias": b}


# The Python-type errors (a str for a tensor, a bool for a float) the registered op's schema
# rejects before any check runs; the public function names them.
_SCHEMA_REJECTS = {
    "weight must be a tensor",
    "bias must be a tensor or None",
    "label_smoothing must be a float",
    "ignore_index must be an int",
}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"weight": torch.zeros(11, 7)}, ValueError, "last dimension is 8 but weight of shape \\(11, 7\\)"),
        ({"bias": torch.zeros(12)}, ValueError, "bias must have shape \\(11,\\)"),
        ({"bias": torch.zeros(1, 11)}, ValueError, "bias must have shape"),
        ({"weight": torch.zeros(11, 8, dtype=torch.float64)}, TypeError, "share one dtype"),
        ({"bias": torch.zeros(11, dtype=torch.bfloat16)}, TypeError, "bias must have the dtype"),
        (
            {"hidden": torch.zeros(2, 3, 8, dtype=torch.int64), "weight": torch.zeros(11, 8, dtype=torch.int64)},
            TypeError,
            "hidden must be float32",
        ),
        ({"target": torch.zeros(2, 3)}, TypeError, "target must be int64 or int32"),
        ({"target": torch.zeros(3, 2, dtype=torch.int64)}, ValueError, "target shape \\(3, 2\\) does not match"),
        ({"weight": torch.zeros(8)}, ValueError, "weight must be 2-D"),
        ({"weight": torch.zeros(0, 8), "bias": None}, ValueError, "at least one class"),
        ({"hidden": torch.tensor(1.0)}, ValueError, "at least one dimension"),
        ({"weight": "w"}, TypeError, "weight must be a tensor"),
        ({"bias": 1.0}, TypeError, "bias must be a tensor or None"),
        ({"weight": torch.zeros(11, 8, device="meta")}, ValueError, "weight is on meta"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in \\[0, 1\\], got 1.5"),
        ({"label_smoothing": float("nan")}, ValueError, "label_smoothing must be in"),
        ({"label_smoothing": True}, TypeError, "label_smoothing must be a float"),
        ({"ignore_index": 1.0}, TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_input(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        smoothce.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)
    if match in _SCHEMA_REJECTS:
        return
    args = {**_good(), **change}
    with pytest.raises(error, match=match):  # the registered op checks the same, with the same words
        torch.ops.smoothce.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)


@pytest.mark.parametrize(
    ("label_smoothing", "ignore_index"),
    [(np.float32(0.25), np.int64(-100)), (torch.tensor(0.25), torch.tensor(-100)), (0.25, -100)],
    ids=["numpy", "0-d tensors", "python"],
)
def test_options_as_pytorch_takes_them(label_smoothing, ignore_index):
    # numpy scalars and 0-d tensors are converted, as F.cross_entropy converts them.
    hidden, weight, b, target = make_problem((2, 3), 8, 11, torch.float32, bias=True)
    got = smoothce.linear_cross_entropy(
        hidden, weight, target, bias=b, label_smoothing=label_smoothing, ignore_index=ignore_index
    )
    want = smoothce.linear_cross_entropy(hidden, weight, target, bias=b, label_smoothing=0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    module = smoothce.LinearCrossEntropyLoss(label_smoothing=label_smoothing, ignore_index=ignore_index)
    assert type(module.label_smoothing) is float
    assert type(module.ignore_index) is int


def test_int32_target_with_ignore_index_beyond_int32():
    # 2**32 + 1 must not wrap onto class 1 of an int32 target: no row is ignored.
    hidden, weight, _, target = make_problem((6,), 8, 11, torch.float64, ignore_fraction=0.0)
    target[0] = 1
    got = smoothce.linear_cross_entropy(hidden, weight, target.int(), ignore_index=2**32 + 1)
    want = smoothce.linear_cross_entropy(hidden, weight, target)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="int64 range"):
        smoothce.linear_cross_entropy(hidden, weight, target, ignore_index=2**63)


@pytest.mark.parametrize("bad", [11, -1])
def test_target_out_of_range(bad):
    args = _good()
    args["target"][0, 1] = bad
    if DEVICE.type != "cpu":
        pytest.skip("a device-side assert on accelerators, which would poison the test process")
    with pytest.raises(ValueError, match=f"target value {bad} is out of range"):
        smoothce.linear_cross_entropy(args["hidden"], args["weight"], args["target"])


# ---------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------


# opcheck's fake-tensor test itself reads .grad of non-leaf copies of the inputs.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(reduction, requires_grad):
    hidden, weight, b, target = make_problem((6,), 5, 11, torch.float32, bias=True)
    for t in (hidden, weight, b):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(
        torch.ops.smoothce.linear_cross_entropy.default,
        (hidden, weight, target),
        {"bias": b, "label_smoothing": 0.1, "reduction": reduction},
    )
    budget = chunk_of(4, 11, 5, torch.float32)
    torch.library.opcheck(
        torch.ops.smoothce.linear_cross_entropy_fwd.default,
        (hidden, weight, b, target, 0.1, -100, reduction, budget, True, requires_grad, requires_grad, requires_grad),
    )
    torch.library.opcheck(
        torch.ops.smoothce.linear_cross_entropy_bwd.default,
        (
            torch.rand(6),
            hidden.detach(),
            weight.detach(),
            b.detach(),
            target,
            0.1,
            -100,
            budget,
            True,
            True,
            True,
            True,
        ),
    )


class _Head(torch.nn.Module):
    # A model ending in the fused loss: a projection, then the LM head's weight into the loss.
    def __init__(self, dim, num_classes, reduction):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, num_classes, bias=False)
        self.loss = smoothce.LinearCrossEntropyLoss(label_smoothing=0.1, reduction=reduction)

    def forward(self, x, target):
        loss = self.loss(torch.tanh(self.proj(x)), self.lm_head.weight, target)
        return loss.sum() * 2.0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_dynamic_no_recompile(reduction):
    # aot_eager traces forward and backward like Inductor does, without its C++ compile time.
    torch.manual_seed(0)
    model = _Head(12, 37, reduction)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for rows in (5, 8, 13):  # the batch size changes; nothing may recompile
        x = torch.randn(2, rows, 12)
        target = make_target((2, rows), 37, seed=rows)
        model.zero_grad()
        expected = model(x, target)
        expected.backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss = compiled(x, target)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for got, ref in zip((p.grad for p in model.parameters()), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        first = first or counter.frame_count
    # Dynamo may restart its first analysis once (the module's float label_smoothing is first
    # traced as a symbolic float, then specialised): that is one compilation, not a recompile.
    assert first <= 2
    assert counter.frame_count == first, f"compiled {counter.frame_count - first} more times for new batch sizes"


# ---------------------------------------------------------------------------------------
# The recipe options: class weights, z-loss, soft-capping, the lse
# ---------------------------------------------------------------------------------------


def class_weights(target, num_classes, seed=7):
    """Weights in [0.5, 1.5) with zeros on three classes, one of them the first counted target's."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.5
    counted = target[target != -100]
    weights[[0, num_classes // 2, int(counted.flatten()[0]) if counted.numel() else 1]] = 0.0
    return weights.float()


def recipe(name, target, num_classes):
    # The logits are of a few units (make_problem), so a cap of 2 bends them, and a z-loss of 0.05
    # on lse ~ 4 adds about a quarter of the loss.
    if name == "class_weight":
        return {"class_weight": class_weights(target, num_classes)}
    if name == "z_loss":
        return {"z_loss": 0.05}
    if name == "softcap":
        return {"softcap": 2.0}
    if name == "lse":
        return {"return_lse": True}
    return {"class_weight": class_weights(target, num_classes), "z_loss": 0.05, "softcap": 2.0, "return_lse": True}


RECIPES = ["class_weight", "z_loss", "softcap", "lse", "all"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_matches_reference(dtype, reduction, label_smoothing, name):
    # 10 rows (a quarter ignored) in chunks of 3, D = 13, V = 37, with a bias, as in test_matches_reference.
    hidden, weight, b, target = make_problem((2, 5), 13, 37, dtype, bias=True)
    options = {"label_smoothing": label_smoothing, "reduction": reduction, **recipe(name, target, 37)}
    upstream = upstream_for(target.shape, reduction)
    with smoothce.linear.settings(chunk_bytes=chunk_of(3, 37, 13, dtype)):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, **options)
    # Half-precision "none" rounds each chunk's gradient twice (made in backward, then times dO per row),
    # with the spread of values the weights and the cap give: up to 1.1x TOLERANCE seen on d weight.
    factor = 1.5 if reduction == "none" and dtype in (torch.bfloat16, torch.float16) else 1.0
    assert_close_to_reference(hidden, weight, b, target, upstream, ours, grad_factor=factor, **options)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_recipe_all_at_full_smoothing(reduction):
    # lam = 1: only the smoothing term (with its weights), the z-loss and the cap remain.
    hidden, weight, b, target = make_problem((9,), 6, 20, torch.float32, bias=True)
    options = {"label_smoothing": 1.0, "reduction": reduction, **recipe("all", target, 20)}
    upstream = upstream_for(target.shape, reduction)
    with smoothce.linear.settings(chunk_bytes=chunk_of(4, 20, 6, torch.float32)):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, **options)
    assert_close_to_reference(hidden, weight, b, target, upstream, ours, **options)


@pytest.mark.parametrize(
    ("lead", "dim", "num_classes"),
    [
        ((), 5, 7),  # hidden (D,): one row, a 0-d target and lse
        ((9,), 1, 1),  # V = 1: lse = the one capped logit; the loss is the z-loss alone
        ((3, 1, 4), 3, 129),  # three leading dims; V one past a power of two
    ],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_recipe_shapes(lead, dim, num_classes, reduction):
    hidden, weight, b, target = make_problem(lead, dim, num_classes, torch.float32, bias=True, ignore_fraction=0.2)
    options = {"label_smoothing": 0.1, "reduction": reduction, **recipe("all", target, num_classes)}
    if num_classes == 1:
        options["class_weight"] = torch.tensor([2.0])
    upstream = upstream_for(target.shape, reduction)
    with smoothce.linear.settings(chunk_bytes=chunk_of(2, num_classes, dim, torch.float32)):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, **options)
    assert_close_to_reference(hidden, weight, b, target, upstream, ours, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_recipe_large_offset_capped(dtype):
    # A bias of 1000 on every other class: the cap of 30 bounds those logits (tanh saturates there), the
    # rest spread over [-40, 40] where it does not; loss, lse and gradients finite and as in float64.
    hidden, weight, _, target = make_problem((40,), 8, 300, dtype)
    bias = torch.where(torch.arange(300) % 2 == 0, 1000.0, torch.linspace(-40.0, 40.0, 300)).to(dtype)
    options = {"label_smoothing": 0.1, "softcap": 30.0, "z_loss": 1e-3, "return_lse": True, "reduction": "sum"}
    ours = run(smoothce.linear_cross_entropy, hidden, weight, bias, target, torch.tensor(1.0), **options)
    assert all(bool(t.isfinite().all()) for t in ours)
    assert_close_to_reference(hidden, weight, bias, target, torch.tensor(1.0), ours, **options)


def composed_by_pytorch(hidden, weight, target, *, bias, class_weight, label_smoothing, z_loss, softcap, reduction):
    """PyTorch's own ops in the inputs' dtype: F.cross_entropy of the capped logits, plus s w_k lse^2, and
    PyTorch's weighted mean."""
    class_weight = class_weight.to(hidden.dtype)
    z = F.linear(hidden, weight, bias).flatten(0, -2)
    z = softcap * torch.tanh(z / softcap)
    k = target.flatten()
    rows = F.cross_entropy(z, k, class_weight, label_smoothing=label_smoothing, reduction="none")
    counted = k != -100
    w_k = torch.where(counted, class_weight[k.clamp_min(0)], 0.0)
    rows = rows + z_loss * w_k * torch.logsumexp(z, -1) ** 2
    if reduction == "none":
        return rows.reshape(target.shape)
    return rows.sum() / (w_k.sum() if reduction == "mean" else 1.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_recipe_against_pytorch_composed(reduction):
    # Independent of smoothce's reference: autograd through PyTorch's ops, all in float64.
    hidden, weight, b, target = make_problem((3, 4), 8, 29, torch.float64, bias=True)
    options = {"label_smoothing": 0.1, "z_loss": 0.05, "softcap": 2.0, "reduction": reduction}
    class_weight = class_weights(target, 29).double()
    upstream = upstream_for(target.shape, reduction).double()
    with smoothce.linear.settings(chunk_bytes=chunk_of(5, 29, 8, torch.float64)):
        ours = run(
            smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, class_weight=class_weight, **options
        )
    theirs = run(composed_by_pytorch, hidden, weight, b, target, upstream, class_weight=class_weight, **options)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["all_ignored", "zero_weight_targets"])
def test_recipe_nothing_counted(reduction, case):
    # No counted weight: "mean" is 0 with zero gradients (PyTorch: NaN), "sum" and "none" 0 on every
    # row whose weight is 0; the lse is there for every row all the same.
    hidden, weight, b, target = make_problem((6,), 8, 11, torch.float32, bias=True)
    class_weight = torch.rand(11) + 0.5
    if case == "all_ignored":
        target = torch.full_like(target, -100)
    else:
        class_weight[target[target != -100]] = 0.0
    options = {"reduction": reduction, "class_weight": class_weight, "z_loss": 0.1, "softcap": 3.0}
    upstream = upstream_for(target.shape, reduction)
    loss, dh, dw, db, lse = run(
        smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, return_lse=True, **options
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    for grad in (dh, dw, db):
        assert torch.equal(grad, torch.zeros_like(grad))
    ref_lse = reference(hidden, weight, b, target, upstream, return_lse=True, **options)[-1]
    assert rel_err(lse, ref_lse) <= TOLERANCE[torch.float32]


def test_recipe_normalizer_over_weighted_mean():
    # A normalizer replaces the weighted count: the weighted sum divided by it.
    hidden, weight, b, target = make_problem((12,), 8, 11, torch.float64, bias=True)
    options = {"bias": b, "class_weight": class_weights(target, 11).double(), "z_loss": 0.01, "softcap": 4.0}
    summed = smoothce.linear_cross_entropy(hidden, weight, target, reduction="sum", **options)
    got = smoothce.linear_cross_entropy(hidden, weight, target, normalizer=torch.tensor(7), **options)
    torch.testing.assert_close(got, summed / 7, rtol=1e-14, atol=0)


def _spy_both(monkeypatch):
    # Which backend method each chunk goes to: "plain" (forward) or "recipe" (forward_recipe).
    backend = smoothce.registry.select(DEVICE)
    calls = []
    forward, forward_recipe = type(backend).forward, type(backend).forward_recipe

    def spy_forward(self, *args):
        calls.append("plain")
        return forward(self, *args)

    def spy_recipe(self, *args):
        calls.append("recipe")
        return forward_recipe(self, *args)

    monkeypatch.setattr(type(backend), "forward", spy_forward)
    monkeypatch.setattr(type(backend), "forward_recipe", spy_recipe)
    return calls


@pytest.mark.parametrize("name", ["off", *RECIPES])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_recipe_reaches_forward_recipe_only_when_on(monkeypatch, name, reduction):
    # Every option at its default (z_loss=0.0, softcap=None given explicitly too): the plain path.
    # "none" recomputes the chunks in backward, with the same options.
    calls = _spy_both(monkeypatch)
    hidden, weight, _, target = make_problem((10,), 8, 11, torch.float32)
    options = {"z_loss": 0.0, "softcap": None, "class_weight": None} if name == "off" else recipe(name, target, 11)
    leaf = hidden.to(DEVICE).requires_grad_(True)
    with smoothce.linear.settings(chunk_bytes=chunk_of(4, 11, 8, torch.float32)):
        out = smoothce.linear_cross_entropy(
            leaf,
            weight.to(DEVICE),
            target.to(DEVICE),
            reduction=reduction,
            **{key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in options.items()},
        )
    loss = out[0] if isinstance(out, tuple) else out
    loss.sum().backward()
    kind = "plain" if name == "off" else "recipe"
    assert calls[:3] == [kind] * 3
    if reduction == "none":  # the lse is not made again: only the options that change the gradient count
        assert calls[3:] == ["plain" if name in ("off", "lse") else "recipe"] * 3
    else:
        assert calls[3:] == []


def test_recipe_module():
    hidden, weight, b, target = make_problem((2, 3), 8, 11, torch.float32, bias=True)
    class_weight = class_weights(target, 11)
    module = smoothce.LinearCrossEntropyLoss(class_weight, label_smoothing=0.2, z_loss=0.01, softcap=5.0)
    assert "z_loss=0.01" in repr(module)
    assert "softcap=5.0" in repr(module)
    assert torch.equal(module.state_dict()["class_weight"], class_weight)  # a buffer, as CrossEntropyLoss's weight
    expected = smoothce.linear_cross_entropy(
        hidden, weight, target, bias=b, class_weight=class_weight, label_smoothing=0.2, z_loss=0.01, softcap=5.0
    )
    torch.testing.assert_close(module(hidden, weight, target, bias=b), expected, rtol=0, atol=0)
    logits = F.linear(hidden, weight, b)
    plain = smoothce.cross_entropy(logits, target, class_weight, label_smoothing=0.2, z_loss=0.01, softcap=5.0)
    torch.testing.assert_close(expected, plain, rtol=1e-5, atol=1e-6)
    assert smoothce.LinearCrossEntropyLoss().class_weight is None
    with pytest.raises(TypeError, match="class_weight must be a tensor"):
        smoothce.LinearCrossEntropyLoss([1.0] * 11)
    with pytest.raises(ValueError, match="softcap"):
        smoothce.LinearCrossEntropyLoss(softcap=0.0)
    with pytest.raises(ValueError, match="z_loss"):
        smoothce.LinearCrossEntropyLoss(z_loss=-1.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_recipe_float64_gradcheck(reduction):
    hidden, weight, b, target = make_problem((5,), 3, 4, torch.float64, bias=True)
    target[0] = 2
    class_weight = torch.tensor([0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (hidden, weight, b))

    def fn(h, w, bias):
        with smoothce.inplace_backward(False), smoothce.linear.settings(chunk_bytes=chunk_of(2, 4, 3, h.dtype)):
            return smoothce.linear_cross_entropy(
                h,
                w,
                target,
                bias=bias,
                class_weight=class_weight,
                label_smoothing=0.3,
                z_loss=0.1,
                softcap=1.5,
                reduction=reduction,
            )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_recipe_bf16_no_worse_than_pytorch(bias):
    # The accuracy target with every option on: against float64 on the same bf16 logits,
    # each gradient no further than PyTorch composing the same loss in bf16 (its own path), with margin.
    dtype = torch.bfloat16
    hidden, weight, b, target = make_problem((256,), 64, 2000, dtype, bias=bias)
    class_weight = class_weights(target, 2000).to(dtype).float()  # as PyTorch's path will hold them
    options = {"class_weight": class_weight, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 2.0}
    upstream = torch.tensor(1.0)
    ref = reference(hidden, weight, b, target, upstream, reduction="mean", **options)
    with smoothce.linear.settings(chunk_bytes=chunk_of(32, 2000, 64, dtype)):
        ours = run(smoothce.linear_cross_entropy, hidden, weight, b, target, upstream, **options)
    theirs = run(composed_by_pytorch, hidden, weight, b, target, upstream, reduction="mean", **options)
    for name, got, torch_got, want in zip(("loss", "hidden", "weight", "bias"), ours, theirs, ref, strict=True):
        if want is not None:
            assert rel_err(got, want) <= 1.25 * rel_err(torch_got, want), (
                name,
                rel_err(got, want),
                rel_err(torch_got, want),
            )


# opcheck's fake-tensor test itself reads .grad of non-leaf copies of the inputs.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_recipe_opcheck(reduction):
    hidden, weight, b, target = make_problem((6,), 5, 11, torch.float32, bias=True)
    for t in (hidden, weight, b):
        t.requires_grad_(True)
    class_weight = class_weights(target, 11)
    options = {"bias": b, "class_weight": class_weight, "label_smoothing": 0.1, "reduction": reduction}
    options.update(z_loss=0.01, softcap=3.0)
    for op in (torch.ops.smoothce.linear_cross_entropy.default, torch.ops.smoothce.linear_cross_entropy_lse.default):
        torch.library.opcheck(op, (hidden, weight, target), options)
    budget = chunk_of(4, 11, 5, torch.float32)
    recipe_args = (class_weight, 0.01, 3.0)
    torch.library.opcheck(
        torch.ops.smoothce.linear_cross_entropy_recipe_fwd.default,
        (hidden, weight, b, target, 0.1, -100, reduction, budget, True, True, True, True, None, *recipe_args, True),
    )
    detached = (hidden.detach(), weight.detach(), b.detach())
    torch.library.opcheck(
        torch.ops.smoothce.linear_cross_entropy_bwd.default,
        (torch.rand(6), *detached, target, 0.1, -100, budget, True, True, True, True, *recipe_args),
    )


class _RecipeHead(torch.nn.Module):
    # _Head with every option on, and the lse returned beside the loss.
    def __init__(self, dim, num_classes, reduction):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, num_classes, bias=False)
        self.register_buffer("class_weight", torch.linspace(0.0, 2.0, num_classes))
        self.reduction = reduction

    def forward(self, x, target):
        loss, lse = smoothce.linear_cross_entropy(
            torch.tanh(self.proj(x)),
            self.lm_head.weight,
            target,
            class_weight=self.class_weight,
            label_smoothing=0.1,
            reduction=self.reduction,
            z_loss=1e-2,
            softcap=3.0,
            return_lse=True,
        )
        return loss.sum() * 2.0, lse


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_recipe_compile_fullgraph_dynamic_no_recompile(reduction):
    torch.manual_seed(0)
    model = _RecipeHead(12, 37, reduction)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for rows in (5, 8, 13):  # the batch size changes; nothing may recompile
        x = torch.randn(2, rows, 12)
        target = make_target((2, rows), 37, seed=rows)
        model.zero_grad()
        expected, expected_lse = model(x, target)
        expected.backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss, lse = compiled(x, target)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-6)
        for got, ref in zip((p.grad for p in model.parameters()), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"


def _recipe_good():
    return {**_good(), "class_weight": torch.ones(11)}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"class_weight": torch.ones(12)}, ValueError, r"class_weight .*must have shape \(11,\)"),
        ({"class_weight": torch.ones(1, 11)}, ValueError, r"class_weight .*must have shape \(11,\)"),
        ({"class_weight": torch.ones(11, dtype=torch.int64)}, TypeError, "class_weight .*floating-point"),
        ({"class_weight": torch.ones(11, device="meta")}, ValueError, "class_weight .*is on meta"),
        ({"class_weight": torch.ones(11, requires_grad=True)}, NotImplementedError, "class_weight .*not implemented"),
        ({"class_weight": [1.0] * 11}, TypeError, "class_weight must be a tensor or None"),
        ({"softcap": 0.0}, ValueError, "softcap must be None or a finite number > 0, got 0.0"),
        ({"softcap": -1.0}, ValueError, "softcap must be None or a finite number > 0"),
        ({"softcap": float("nan")}, ValueError, "softcap must be None or a finite number > 0"),
        ({"softcap": float("inf")}, ValueError, "softcap must be None or a finite number > 0"),
        ({"softcap": True}, TypeError, "softcap must be None or a float"),
        ({"z_loss": -0.5}, ValueError, "z_loss must be a finite number >= 0, got -0.5"),
        ({"z_loss": float("nan")}, ValueError, "z_loss must be a finite number >= 0"),
        ({"z_loss": float("inf")}, ValueError, "z_loss must be a finite number >= 0"),
        ({"z_loss": True}, TypeError, "z_loss must be a float"),
        ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
        ({"return_lse": "yes"}, TypeError, "return_lse must be a bool"),
    ],
)
def test_recipe_bad_input(change, error, match):
    args = {**_recipe_good(), **change}
    with pytest.raises(error, match=match):
        smoothce.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)
    if "return_lse" in change or isinstance(next(iter(change.values())), (bool, list)):
        return  # the schema coerces a bool and rejects a list or a return_lse before any check
    args = {**_recipe_good(), **change}
    with pytest.raises(error, match=match):  # the registered op checks the same, with the same words
        torch.ops.smoothce.linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)


# ---------------------------------------------------------------------------------------
# Memory, in a fresh process
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(DEVICE.type != "cpu" or not LINUX_RSS, reason="the resident-set probe measures CPU memory")
@pytest.mark.skipif(INTERPRETED_TRITON, reason="minutes in Triton's interpreter; the chunking is backend-independent")
def test_half_none_backward_scales_chunks_without_copies():
    # "none"'s backward multiplies each recomputed bf16 chunk by dO per row in fp32: in place, no fp32
    # copies of the chunk (ATen's mixed-dtype multiply on CPU would hold four chunks' worth more).
    from smoothce.bench.measure import rss_growth

    hidden, weight, _, target = make_problem((4096,), 64, 8000, torch.bfloat16)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    chunk = 16 << 20
    with smoothce.linear.settings(chunk_bytes=chunk):
        loss = smoothce.linear_cross_entropy(hidden, weight, target, label_smoothing=0.1, reduction="none")
        growth = rss_growth(lambda: loss.backward(torch.rand(4096)))
    assert growth <= 3 * chunk, growth  # a chunk, d weight's fp32 sum (2 MiB), the gradients; was 6x


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the resident-set probe measures CPU memory")
@pytest.mark.skipif(INTERPRETED_TRITON, reason="minutes in Triton's interpreter; the chunking is backend-independent")
def test_peak_memory_bound_on_cpu():
    # The issue's CPU target shape with a small D (cheap matmuls; D does not change the logits'
    # size): forward + backward may need at most 10% of the logits beyond inputs and gradients,
    # where materialising the logits alone needs 100%.
    from smoothce.bench.linear import cpu_peak_extra

    shape = (4096, 16, 32000)
    logits_bytes = shape[0] * shape[2] * 4
    ours = cpu_peak_extra("smoothce", shape, "fp32", threads=2)
    floor = cpu_peak_extra("matmuls", shape, "fp32", threads=2)
    assert "error" not in ours, ours
    assert "error" not in floor, floor
    assert floor["peak_extra_bytes"] >= 0.9 * logits_bytes, floor  # the probe sees an (N, V) buffer
    assert ours["peak_extra_bytes"] <= 0.10 * logits_bytes, (ours, logits_bytes)
