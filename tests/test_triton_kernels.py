"""Tests of the Triton kernel (backends/triton_kernels.py) through both Triton backends.

Without a GPU they run on CPU tensors in Triton's interpreter, for BOTH backends
(``SMOOTHCE_BACKEND`` picks which one serves CPU tensors):

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py

With a CUDA or XPU device (and TRITON_INTERPRET unset) the same tests run on the
GPU through the device's own backend, plus the GPU-only ones (64-bit offsets at
16384 x 262144, torch.compile with Inductor, the device-side target assert).

Everything goes through ``smoothce.cross_entropy`` and ``loss.backward()`` and is
compared with the float64 reference ``smoothce.reference`` evaluated on the same
(already rounded) logits, so the tolerances only cover the kernel's float32
arithmetic and the one rounding of each gradient element to the logits' dtype.
The backends' block size is capped at 16 columns here, so small rows still run
the multi-block loops and their masked tails. The value grid itself lives in
tests/test_op.py, which runs through whichever backend SMOOTHCE_BACKEND names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: pip install 'smoothce[triton]'", allow_module_level=True)

import smoothce
from smoothce import registry
from smoothce.backends.base import Recipe
from smoothce.backends.triton_backend import interpreter_enabled
from smoothce.numerics import loss_dtype
from smoothce.reference import cross_entropy_reference

INTERPRET = interpreter_enabled()

if INTERPRET:
    DEVICE = "cpu"
elif registry.default_device().type != "cpu":
    DEVICE = registry.default_device().type
else:
    pytest.skip(
        "the Triton kernels need TRITON_INTERPRET=1 (CPU tensors in Triton's interpreter) or a CUDA/XPU device",
        allow_module_level=True,
    )

ON_GPU = DEVICE != "cpu"
BACKEND_OF_DEVICE = {"cuda": "cuda-triton", "xpu": "xpu-triton"}
BACKENDS = list(BACKEND_OF_DEVICE.values()) if DEVICE == "cpu" else [BACKEND_OF_DEVICE[DEVICE]]
TEST_BLOCK_V = 16
# The value grid (dtypes x V x smoothing x reduction, 16-column blocks for small rows) is
# tests/test_op.py's, which nox runs under each Triton backend (triton_interpret, cuda, xpu).
REDUCTIONS = ["none", "mean", "sum"]


def tolerances(dtype: torch.dtype) -> tuple[dict, dict]:
    """(loss, gradient) tolerances for assert_close against the float64 reference.

    Losses are computed in float32 (float64 for float64) from exact inputs, whatever
    the logits' dtype. Gradients of 16-bit logits are rounded once to that dtype and,
    for "none", multiplied by dO in it: two roundings, so 2 eps relative. Float64 stays
    float64 throughout, 1/count included.
    """
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12}, {"rtol": 1e-12, "atol": 1e-14}
    loss_tol = {"rtol": 1e-5, "atol": 1e-5}
    if dtype == torch.float32:
        return loss_tol, {"rtol": 1e-5, "atol": 1e-6}
    return loss_tol, {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-6}


# Each backend with its own launch table's kernel (CUDA: rows split over programs; XPU: the
# loop kernel for rows longer than one program), and CUDA's loop kernel forced as well.
BACKEND_KERNELS = [(name, None) for name in BACKENDS] + [(name, "loop") for name in BACKENDS if name == "cuda-triton"]


@pytest.fixture(params=BACKEND_KERNELS, ids=lambda p: f"{p[0]}-{p[1] or 'table'}")
def backend(request, monkeypatch):
    """The backend under test, chosen through SMOOTHCE_BACKEND, with blocks of 16 columns."""
    name, kernel = request.param
    monkeypatch.setenv("SMOOTHCE_BACKEND", name)
    chosen = registry.get(name)
    monkeypatch.setattr(chosen, "max_block_v", TEST_BLOCK_V)
    monkeypatch.setattr(chosen, "kernel", kernel)
    return chosen


def make_inputs(n_rows, num_classes, dtype, *, seed=0, ignored=(1, 5), target_dtype=torch.int64):
    """Logits (n_rows, V) with spread-out values and targets with some ignored rows.

    Row 0 targets class 0 and the last row class V - 1 (first and last column); row 2
    has its target logit raised by 12, so p_k is close to 1 and p_k - 1 cancels.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(n_rows, num_classes, generator=generator, dtype=torch.float64)
    target = torch.randint(0, num_classes, (n_rows,), generator=generator)
    target[0] = 0
    target[-1] = num_classes - 1
    logits[2, target[2]] += 12
    for row in ignored:
        target[row] = -100
    return logits.to(DEVICE, dtype), target.to(DEVICE, target_dtype)


def check_against_reference(logits, target, label_smoothing, reduction, ignore_index=-100):
    """Forward and backward through smoothce.cross_entropy, compared with the float64 reference."""
    logits = logits if logits.requires_grad else logits.detach().requires_grad_()
    loss = smoothce.cross_entropy(
        logits, target, label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction
    )
    ref_loss, ref_grad = cross_entropy_reference(
        logits.detach().cpu(),
        target.cpu(),
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    if reduction == "none":
        d_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device)
        loss.backward(d_out)
        ref_grad = ref_grad * d_out.cpu().double().unsqueeze(-1)
    else:
        loss.backward()
    loss_tol, grad_tol = tolerances(logits.dtype)
    assert loss.dtype == loss_dtype(logits.dtype)
    assert logits.grad.dtype == logits.dtype
    torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, **loss_tol)
    torch.testing.assert_close(logits.grad.cpu().double(), ref_grad, **grad_tol)


def test_registry_routes_cpu_tensors_to_the_forced_backend(backend):
    if DEVICE == "cpu":
        assert registry.select("cpu") is backend
    assert registry.select(DEVICE) is backend


def _transposed(n_rows, num_classes, dtype):
    # Column stride N, row stride 1: the kernel's 64-bit column offsets.
    logits, target = make_inputs(n_rows, num_classes, dtype)
    return logits.t().contiguous().t(), target


def _column_slice(n_rows, num_classes, dtype):
    # Rows padded to V + 5 values, logits start at column 3: row stride != V.
    logits, target = make_inputs(n_rows, num_classes + 5, dtype)
    target = torch.where(target == -100, target, target % num_classes)
    return logits[:, 3 : 3 + num_classes], target


def _every_other_row(n_rows, num_classes, dtype):
    # Row stride 2 V.
    logits, target = make_inputs(2 * n_rows, num_classes, dtype)
    return logits[::2], target[::2].contiguous()


@pytest.mark.parametrize("layout", [_transposed, _column_slice, _every_other_row], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_logits(backend, dtype, layout):
    logits, target = layout(7, 40, dtype)
    assert not logits.is_contiguous()
    check_against_reference(logits.detach().requires_grad_(), target, 0.1, "sum")


def test_wide_column_offsets(backend, monkeypatch):
    # Transposed logits whose column offsets pass int32 take int64 offsets: forced here on a small
    # input (the threshold lowered), which must give the same values.
    from smoothce.backends import triton_common

    monkeypatch.setattr(triton_common, "WIDE_OFFSETS", 8)
    logits, target = _transposed(7, 40, torch.float32)
    check_against_reference(logits.detach().requires_grad_(), target, 0.1, "sum")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_int32_targets(backend, reduction):
    logits, target = make_inputs(7, 40, torch.float32, target_dtype=torch.int32)
    check_against_reference(logits, target, 0.1, reduction)


def test_ignore_index_that_is_a_class_id(backend):
    # ignore_index=3 is also a valid class: rows targeting 3 are ignored, the others are not.
    logits, target = make_inputs(7, 40, torch.float32, ignored=())
    target[1] = target[4] = 3
    check_against_reference(logits, target, 0.1, "mean", ignore_index=3)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(backend, reduction):
    # "mean" over no rows is 0 with a zero gradient (not NaN); the kernel still writes the zero rows.
    logits, target = make_inputs(5, 40, torch.float32, ignored=range(5))
    logits.requires_grad_()
    loss = smoothce.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction)
    loss.sum().backward()
    assert torch.equal(loss.detach().cpu(), torch.zeros_like(loss).cpu())
    assert torch.equal(logits.grad.cpu(), torch.zeros(5, 40))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_minus_inf_logits(backend, label_smoothing):
    """Masked classes (logits -inf), including a whole first block, in fp32.

    With lam = 0 the loss stays finite (0 * -inf never happens); with lam > 0 the loss
    is +inf, as the formula says (-lam/V * sum z), and the gradient stays finite.
    The reference sees -1e300 instead of -inf so its own lam = 0 case stays finite.
    """
    logits, target = make_inputs(7, 40, torch.float32)
    masked = torch.zeros(7, 40, dtype=torch.bool, device=DEVICE)
    masked[:, :TEST_BLOCK_V] = True  # the whole first block of every row: the running max starts at -inf
    masked[4, 30:] = True
    masked[torch.arange(7, device=DEVICE), target.clamp_min(0)] = False  # targets stay finite
    logits = logits.masked_fill(masked, float("-inf")).requires_grad_()
    loss = smoothce.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="none")
    loss.backward(torch.ones_like(loss))
    finite_logits = logits.detach().cpu().double().masked_fill(masked.cpu(), -1e300)
    ref_loss, ref_grad = cross_entropy_reference(
        finite_logits, target.cpu(), label_smoothing=label_smoothing, reduction="none"
    )
    if label_smoothing == 0.0:
        torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, rtol=1e-5, atol=1e-5)
    else:
        loss, valid = loss.detach().cpu(), target.cpu() != -100
        assert torch.isposinf(loss[valid]).all()
        assert torch.equal(loss[~valid], torch.zeros(int((~valid).sum())))
    torch.testing.assert_close(logits.grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_large_offset_logits(backend, label_smoothing):
    # Logits around 1000 in fp32 (ulp 6e-5): the loss is taken relative to the row max,
    # so it keeps the accuracy of logits around 0 (only the lam * mean term sees the offset).
    logits, target = make_inputs(7, 40, torch.float32)
    check_against_reference(logits + 1000, target, label_smoothing, "none")


@pytest.mark.parametrize("bad", [40, -1, 2**40], ids=["V", "minus_one", "huge"])
def test_out_of_range_target_raises_before_writing(backend, bad):
    if ON_GPU:
        pytest.skip("a GPU reports it with a device-side assert: see test_out_of_range_target_gpu_assert")
    logits, target = make_inputs(7, 40, torch.float32)
    target[3] = bad
    with pytest.raises(ValueError, match=rf"target value {bad} is out of range.*\[0, 40\)"):
        smoothce.cross_entropy(logits, target)
    grad = torch.full_like(logits, 7.0)
    with pytest.raises(ValueError, match="out of range"):
        backend.forward(logits, target, 0.1, -100, grad, torch.ones((), dtype=torch.float32))
    assert torch.equal(grad, torch.full_like(logits, 7.0)), "the gradient buffer was written before the error"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU; on CPU tensors the error is a ValueError (tested above)")
def test_out_of_range_target_gpu_assert():
    # A device-side assert leaves the device unusable, so it runs in a child process.
    script = textwrap.dedent(
        f"""
        import torch, smoothce
        logits = torch.randn(4, 40, device="{DEVICE}")
        target = torch.tensor([1, 2, 40, 3], device="{DEVICE}")
        smoothce.cross_entropy(logits, target)
        torch.{DEVICE}.synchronize()
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SMOOTHCE_BACKEND", "TRITON_INTERPRET")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "out of range" in done.stderr or "device-side assert" in done.stderr, done.stderr[-2000:]


class LaunchRecorder:
    """Wraps the launchers' kernels to record (kernel name, its keyword constexprs) per launch."""

    NAMES = ("prologue_kernel", "split_kernel", "loop_kernel", "scale_grad_kernel")

    def __init__(self, monkeypatch):
        from smoothce.backends import triton_kernels

        self.launches = []
        for name in self.NAMES:
            monkeypatch.setattr(triton_kernels, name, self._wrap(name, getattr(triton_kernels, name)))

    def _wrap(self, name, kernel):
        recorder = self

        class Recording:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((name, kwargs))
                    return kernel[grid](*args, **kwargs)

                return launch

        return Recording()

    def names(self):
        return [name for name, _ in self.launches]


def test_no_gradient_work_without_grad(backend, monkeypatch):
    """grad=None compiles the gradient out: checked on the launch and on memory.

    The launcher passes the logits themselves in the unused gradient slot, so a
    gradient pass that ran anyway would overwrite them.
    """
    recorder = LaunchRecorder(monkeypatch)
    logits, target = make_inputs(7, 40, torch.float32)
    before = logits.clone()
    loss = backend.forward(logits, target, 0.1, -100, None, torch.ones((), dtype=torch.float32, device=DEVICE))
    assert [kwargs["COMPUTE_GRAD"] for _, kwargs in recorder.launches] == [False]
    assert torch.equal(logits, before)
    ref_loss, _ = cross_entropy_reference(logits.cpu(), target.cpu(), label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-5)
    # Through the public op: no gradient is computed unless the logits require one.
    recorder.launches.clear()
    smoothce.cross_entropy(logits, target)
    smoothce.cross_entropy(logits.requires_grad_(), target)
    rows = [kwargs["COMPUTE_GRAD"] for name, kwargs in recorder.launches if name != "prologue_kernel"]
    assert rows in ([False, True], [False, True, True])  # the interpreter splits a gradient launch in two


@pytest.mark.parametrize("normalizer", [1.0, 3.0, 0.5, 7.25, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_normalizer(backend, monkeypatch, dtype, normalizer):
    """ "mean" over a normalizer: the sum of the rows divided by it, read on the device by the prologue
    (no fallback to torch), with the kept gradient's factors of numerics.kept_factors; <= 0: zeros."""
    recorder = LaunchRecorder(monkeypatch)
    logits, target = make_inputs(7, 40, dtype)
    acc = loss_dtype(dtype)
    norm = torch.tensor(normalizer, dtype=acc, device=DEVICE)
    loss, grad, factor = backend.loss_and_grad(logits, target, 0.1, -100, "mean", True, norm)
    assert [kwargs.get("NORMALIZED") for name, kwargs in recorder.launches if name == "prologue_kernel"] == [True]
    cpu_loss, cpu_grad, cpu_factor = registry.get("cpu").loss_and_grad(
        logits.cpu(), target.cpu(), 0.1, -100, "mean", True, norm.cpu()
    )
    assert factor.dtype == acc
    assert factor.shape == ()
    if normalizer > 0:  # (a zero gradient's factor does not matter)
        assert float(factor) == float(cpu_factor)  # the same power of two (float16) or 1
    loss_tol, grad_tol = tolerances(dtype)
    torch.testing.assert_close(loss.cpu(), cpu_loss, **loss_tol)
    torch.testing.assert_close(grad.cpu().double(), cpu_grad.double(), **grad_tol)
    ref_loss, ref_grad = cross_entropy_reference(logits.cpu(), target.cpu(), label_smoothing=0.1, reduction="sum")
    if normalizer > 0:
        torch.testing.assert_close(loss.cpu().double(), ref_loss / normalizer, **loss_tol)
        torch.testing.assert_close(grad.cpu().double() * float(factor), ref_grad / normalizer, **grad_tol)
    else:
        assert float(loss) == 0.0
        assert not grad.any()


@pytest.mark.parametrize("compute_grad", [False, True], ids=["no_grad", "grad"])
def test_loop_kernel_load_hints(backend, monkeypatch, compute_grad):
    # Sweep 1 keeps the row in cache only where sweep 2 reads it again: the no-grad forward reads
    # each value once, so it loads with sweep 2's hint (evict_first on CUDA), not evict_last.
    monkeypatch.setattr(backend, "kernel", "loop")
    recorder = LaunchRecorder(monkeypatch)
    logits, target = make_inputs(7, 40, torch.float32)
    grad = torch.empty_like(logits) if compute_grad else None
    backend.forward(logits, target, 0.1, -100, grad, torch.ones((), dtype=torch.float32, device=DEVICE))
    ((name, kwargs),) = recorder.launches
    keep, drop = backend.EVICTION
    assert name == "loop_kernel"
    assert (kwargs["KEEP"], kwargs["DROP"]) == ((keep if compute_grad else drop), drop)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_launches_per_forward_and_backward(backend, monkeypatch, reduction):
    # At most three launches for a forward+backward: the prologue, the loss kernel, the scaling.
    recorder = LaunchRecorder(monkeypatch)
    logits, target = make_inputs(7, 40, torch.bfloat16)
    logits.requires_grad_()
    loss = smoothce.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    names = recorder.names()
    kernel = "loop_kernel" if backend.launch_config(40, logits.dtype)["kernel"] == "loop" else "split_kernel"
    split_twice = INTERPRET and kernel == "split_kernel"  # PHASE 1 and 2: the interpreter runs programs in turn
    assert names == ["prologue_kernel", kernel, *([kernel] if split_twice else []), "scale_grad_kernel"]
    if kernel == "split_kernel":
        assert [kwargs["PHASE"] for name, kwargs in recorder.launches if name == kernel] == (
            [1, 2] if split_twice else [0]
        )


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_dO", "per_row_dO"])
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_scale_grad_kernel(backend, dtype, inplace, per_row):
    """dO x factor x kept, in float32 and rounded once; in place a product of exactly 1 writes nothing."""
    generator = torch.Generator().manual_seed(3)
    kept = torch.randn(9, 37, generator=generator).to(DEVICE, dtype)
    kept_before = kept.clone()
    factor = torch.tensor(2.0**-20, device=DEVICE)  # float16's 2**-15 / count for count = 32
    grad_out = torch.linspace(0.5, 2.0, 9, device=DEVICE) if per_row else torch.tensor(3.0, device=DEVICE)
    out = backend.scale_grad(kept, grad_out, factor, per_row, inplace)
    scale = (grad_out * factor).unsqueeze(-1) if per_row else grad_out * factor
    expected = (kept_before.double() * scale.double()).to(dtype)
    assert torch.equal(out.cpu(), expected.cpu())  # one rounding (to nearest, ties to even) of the exact product
    assert (out.data_ptr() == kept.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(kept, kept_before)
    # A factor of exactly 1: in place nothing is written (a poisoned buffer stays poisoned).
    if not per_row:
        poisoned = torch.full_like(kept, float("nan"))
        one = torch.ones((), device=DEVICE)
        assert backend.scale_grad(poisoned, one, one, False, True).isnan().all()
        copied = backend.scale_grad(kept_before, one, one, False, False)
        assert torch.equal(copied, kept_before)


def test_scale_grad_kernel_transposed_layout(backend):
    # The kept gradient is empty_like(logits): for transposed logits it is transposed too.
    kept = torch.randn(37, 9, device=DEVICE).t()
    out = backend.scale_grad(kept, torch.tensor(2.0, device=DEVICE), torch.tensor(0.25, device=DEVICE), False, False)
    assert out.stride() == kept.stride()
    torch.testing.assert_close(out, kept * 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_in_place_of_the_logits(backend, dtype):
    # Backend.forward may write the gradient over the logits (the fused linear loss does).
    logits, target = make_inputs(7, 40, dtype)
    reference = logits.clone()
    scale = torch.tensor(0.5, device=DEVICE)
    rows = backend.forward(logits, target, 0.1, -100, logits, scale)
    ref_loss, ref_grad = cross_entropy_reference(reference.cpu(), target.cpu(), label_smoothing=0.1, reduction="none")
    _, grad_tol = tolerances(dtype)
    torch.testing.assert_close(rows.cpu().double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.cpu().double(), ref_grad * 0.5, **grad_tol)


def test_float16_kept_gradient_survives_a_loss_scale(backend):
    """A float16 gradient of a loss scaled by 65536 (GradScaler) keeps its small entries.

    With 1/count folded in before rounding, entries below float16's smallest subnormal
    (2**-24) times count would flush to zero; kept as 2**15 (p - ybar) they reach
    backward's float32 product with dO / (2**15 count) intact.
    """
    logits, target = make_inputs(64, 40, torch.float16, ignored=())
    logits = logits * 3  # spread: many p_j far below 2**-24 * 64
    logits.requires_grad_()
    loss = smoothce.cross_entropy(logits, target, label_smoothing=0.1)
    (loss * 65536).backward()
    _, ref_grad = cross_entropy_reference(logits.detach().cpu(), target.cpu(), label_smoothing=0.1)
    expected = (ref_grad * 65536).to(torch.float16)
    got = logits.grad.cpu()
    assert not ((got == 0) & (expected != 0)).any()
    # Within two float16 ulps of the float64 value times the scale (one rounding each way).
    ulp = torch.finfo(torch.float16).eps * expected.double().abs().clamp_min(2.0**-14)
    assert ((got.double() - ref_grad * 65536).abs() <= 2 * ulp).all()


def test_confident_row_keeps_its_remainder(backend, monkeypatch):
    # 70000 zeros but one 19.45: sum exp(z - m) = 1 + 2.5e-4 (tiny remainder); the exact loss
    # is log1p(69999 exp(-19.45)) = 2.5004e-4, which log(sum) in float32 gets 6% wrong.
    monkeypatch.setattr(backend, "max_block_v", None)  # real blocks: 16-column ones crawl in the interpreter
    logits = torch.zeros(2, 70000, dtype=torch.float32, device=DEVICE)
    logits[:, 0] = 19.45
    target = torch.tensor([0, 0], device=DEVICE)
    loss = smoothce.cross_entropy(logits, target, reduction="none")
    exact = torch.log1p(69999 * torch.exp(torch.tensor(-19.45, dtype=torch.float64)))
    torch.testing.assert_close(loss.cpu().double(), exact.expand(2), rtol=2e-6, atol=0)


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
def test_shared_large_offset_loses_no_digits(backend, label_smoothing, monkeypatch):
    # Every logit 30000: the loss is log V exactly, whatever lam (sums relative to the row max).
    monkeypatch.setattr(backend, "max_block_v", None)  # real blocks: 16-column ones crawl in the interpreter
    logits = torch.full((2, 70000), 30000.0, device=DEVICE)
    target = torch.tensor([3, 69999], device=DEVICE)
    loss = smoothce.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="none")
    torch.testing.assert_close(loss.cpu().double(), torch.full((2,), 70000.0).log().double(), rtol=2e-7, atol=0)


def test_target_column_at_lam_one_is_p_minus_one_over_v(backend):
    # lam = 1: the target column is p_k - 1/V like any other, to float32 rounding of that value.
    logits, target = make_inputs(5, 40, torch.float32, ignored=())
    logits.requires_grad_()
    smoothce.cross_entropy(logits, target, label_smoothing=1.0, reduction="sum").backward()
    _, ref_grad = cross_entropy_reference(logits.detach().cpu(), target.cpu(), label_smoothing=1.0, reduction="sum")
    rows = torch.arange(5)
    got = logits.grad.cpu()[rows, target.cpu()].double()
    torch.testing.assert_close(got, ref_grad[rows, target.cpu()], rtol=4 * 2.0**-24, atol=0)


def test_target_on_minus_inf_column_gives_inf(backend):
    logits = torch.zeros(1, 40, device=DEVICE)
    logits[0, 7] = float("-inf")
    loss = smoothce.cross_entropy(logits, torch.tensor([7], device=DEVICE), label_smoothing=0.3)
    assert loss.item() == float("inf")


@pytest.mark.parametrize("num_classes", [13, 48, 57])  # blocks of 16: one partial block, whole blocks, a tail
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_maxima_ties_and_minus_inf_across_lanes_and_blocks(backend, num_classes, label_smoothing):
    # Row 0: the max twice, in different lanes (and blocks); row 1: the max in the last column (the
    # tail); row 2: every logit equal; row 3: one finite logit among -inf (at lam > 0 the loss is
    # +inf, and nothing is NaN); row 4: a target holding a max that is tied elsewhere.
    logits, target = make_inputs(5, num_classes, torch.float32, ignored=())
    logits = logits.detach().clone()
    peak = float(logits.max()) + 3.0
    logits[0, 1] = logits[0, num_classes - 2] = peak
    logits[1, num_classes - 1] = peak
    logits[2] = 1.5
    logits[3] = float("-inf")
    logits[3, num_classes // 2] = 2.0
    target[3] = num_classes // 2
    logits[4, 0] = logits[4, num_classes - 1] = peak
    target[4] = 0
    check_against_reference(logits, target, label_smoothing, "none")


@pytest.mark.parametrize("target_masked", [False, True])
def test_classes_masked_with_the_lowest_value(backend, target_masked):
    # A class masked with torch.finfo(float32).min, as models mask classes out: the loss stays
    # finite (a target on it too: about 0.9 x 3.4e38 at lam = 0.1), never NaN. (Several such
    # classes overflow float32's sum at lam > 0: +inf, as in PyTorch.)
    logits, target = make_inputs(4, 40, torch.float32, ignored=())
    logits = logits.detach().clone()
    logits[:, 0] = torch.finfo(torch.float32).min
    target = torch.where(target == 0, 20, target)
    if target_masked:
        target[1] = 0
    loss = smoothce.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    ref, _ = cross_entropy_reference(logits.cpu(), target.cpu(), label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_classes", [40, 20])  # 20: the NaN alone in its lane (blocks of 16)
def test_nan_logit_makes_its_row_nan(backend, num_classes):
    # As F.cross_entropy: a NaN logit makes its row's loss and gradient NaN, and only that row's.
    logits, target = make_inputs(3, num_classes, torch.float32, ignored=())
    logits = logits.detach().clone()
    logits[1, 5] = float("nan")
    logits.requires_grad_()
    loss = smoothce.cross_entropy(logits, target, reduction="none")
    loss.sum().backward()
    grad = logits.grad.cpu()
    assert loss[1].isnan()
    assert loss[[0, 2]].isfinite().all()
    assert grad[1].isnan().all()
    assert grad[[0, 2]].isfinite().all()


# --- The recipe's options (issue 16): class weights, z-loss, soft-capping, the lse out ---------------
# Each option is a constexpr switch of both loss kernels; these tests run both (split, loop) on rows
# of 37 values (odd: three 16-column blocks, the last one a masked tail) against the float64 reference.

Z_LOSS = 1e-2  # s lse^2 ~ 1 for these logits (lse ~ 10): as large as the cross-entropy itself
SOFTCAP = 5.0  # logits ~ 4 randn: both tanh's series (|z| < 1.25) and its saturated range
RECIPES = {
    "softcap": dict(softcap=SOFTCAP),
    "weight": dict(weight=True),
    "z_loss": dict(z_loss=Z_LOSS),
    "lse": dict(return_lse=True),
    "all": dict(weight=True, z_loss=Z_LOSS, softcap=SOFTCAP, return_lse=True),
}


@pytest.fixture(params=["split", "loop"])
def kernel_backend(request, monkeypatch):
    """cuda-triton with each loss kernel forced, blocks of 16 columns (the xpu-triton backend runs the
    same kernels: test_recipe_on_every_backend)."""
    monkeypatch.setenv("SMOOTHCE_BACKEND", BACKENDS[0])
    chosen = registry.get(BACKENDS[0])
    monkeypatch.setattr(chosen, "max_block_v", TEST_BLOCK_V)
    monkeypatch.setattr(chosen, "kernel", request.param)
    return chosen


def class_weights(num_classes, dtype=torch.float32, seed=7):
    # Weights in [0.5, 1.5], exact in float32 (the reference sees the very same values).
    generator = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(num_classes, generator=generator)).to(dtype).to(DEVICE)


def check_recipe(
    monkeypatch,
    logits,
    target,
    label_smoothing,
    reduction,
    *,
    weight=None,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    """smoothce.cross_entropy with the options, forward and backward, against the float64 reference;
    the loss kernel must have run with each option's switch on (no fallback to torch)."""
    if weight is True:
        weight = class_weights(logits.shape[-1])
    recorder = LaunchRecorder(monkeypatch)
    logits = logits.detach().requires_grad_()
    options = dict(label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss, softcap=softcap)
    out = smoothce.cross_entropy(logits, target, weight, **options, return_lse=return_lse)
    loss, lse = out if return_lse else (out, None)
    ref_loss, ref_grad, ref_lse = cross_entropy_reference(
        logits.detach().cpu(), target.cpu(), None if weight is None else weight.cpu(), **options, return_lse=True
    )
    if reduction == "none":
        d_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
        loss.backward(d_out)
        ref_grad = ref_grad * d_out.cpu().double().unsqueeze(-1)
    else:
        loss.backward()
    loss_tol, grad_tol = tolerances(logits.dtype)
    assert loss.dtype == loss_dtype(logits.dtype)
    torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, **loss_tol)
    torch.testing.assert_close(logits.grad.cpu().double(), ref_grad, **grad_tol)
    if return_lse:
        assert lse.dtype == loss_dtype(logits.dtype)
        assert not lse.requires_grad
        torch.testing.assert_close(lse.cpu().double(), ref_lse, **loss_tol)  # ignored rows' too
    switches = dict(SOFTCAP=softcap is not None, WEIGHTED=weight is not None, ZLOSS=z_loss != 0.0, LSE=return_lse)
    kernels = [kwargs for name, kwargs in recorder.launches if name in ("split_kernel", "loop_kernel")]
    assert kernels, "the loss kernel did not run"
    assert all({key: kwargs[key] for key in switches} == switches for kwargs in kernels)
    return loss, lse


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_recipe_options(kernel_backend, monkeypatch, dtype, recipe):
    # Each option alone and all at once, per dtype, with ignored rows, a confident row (row 2), the
    # first and last class as targets, and a per-row dO ("none").
    logits, target = make_inputs(7, 37, dtype)
    check_recipe(monkeypatch, logits, target, 0.1, "none", **RECIPES[recipe])


@pytest.mark.parametrize("recipe", ["softcap", "weight", "z_loss", "all"])
@pytest.mark.parametrize(("label_smoothing", "reduction"), [(0.0, "mean"), (1.0, "sum"), (0.1, "mean")])
def test_recipe_smoothing_and_reductions(kernel_backend, monkeypatch, label_smoothing, reduction, recipe):
    # lam = 0 and 1 drop a term (never 0 x inf); "mean" with weights divides by sum w_k (the weighted
    # count reaches the kernels as the normalizer).
    logits, target = make_inputs(7, 37, torch.float32)
    check_recipe(monkeypatch, logits, target, label_smoothing, reduction, **RECIPES[recipe])


def test_recipe_on_every_backend(backend, monkeypatch):
    # Both Triton backends (xpu-triton with its own launch table) and a 2-D input with leading dims.
    logits, target = make_inputs(8, 37, torch.bfloat16)
    check_recipe(monkeypatch, logits.reshape(2, 4, 37), target.reshape(2, 4), 0.1, "mean", **RECIPES["all"])


def test_recipe_matches_pytorch_composed(kernel_backend):
    # The contract's other statement of the math: PyTorch composed in float64 on the capped logits.
    logits, target = make_inputs(7, 37, torch.float32)
    weight = class_weights(37)
    loss, lse = smoothce.cross_entropy(
        logits, target, weight, label_smoothing=0.1, reduction="sum", z_loss=Z_LOSS, softcap=SOFTCAP, return_lse=True
    )
    capped = SOFTCAP * torch.tanh(logits.cpu().double() / SOFTCAP)
    w, valid = weight.cpu().double(), target.cpu() != -100
    rows = torch.nn.functional.cross_entropy(capped, target.cpu(), w, label_smoothing=0.1, reduction="none")
    composed_lse = torch.logsumexp(capped, dim=1)
    rows = rows + Z_LOSS * w[target.cpu().clamp_min(0)] * composed_lse**2
    torch.testing.assert_close(loss.cpu().double(), torch.where(valid, rows, 0.0).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), composed_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_recipe_without_gradient(kernel_backend, dtype):
    # No gradient: the split kernel's last chunk to arrive writes the loss, reading (and capping) z_k.
    logits, target = make_inputs(7, 37, dtype)
    weight = class_weights(37)
    options = dict(label_smoothing=0.1, reduction="none", z_loss=Z_LOSS, softcap=SOFTCAP, return_lse=True)
    loss, lse = smoothce.cross_entropy(logits, target, weight, **options)
    ref_loss, _, ref_lse = cross_entropy_reference(logits.cpu(), target.cpu(), weight.cpu(), **options)
    loss_tol, _ = tolerances(dtype)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, **loss_tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, **loss_tol)


@pytest.mark.parametrize("recipe", ["weight", "z_loss", "all"])
@pytest.mark.parametrize("num_classes", [1, 13])  # V = 1: p = 1 (only the z-loss is left); 13: one masked block
def test_recipe_short_rows(kernel_backend, monkeypatch, num_classes, recipe):
    logits, target = make_inputs(7, num_classes, torch.float32)
    check_recipe(monkeypatch, logits, target, 0.1, "none", **RECIPES[recipe])


@pytest.mark.parametrize("recipe", ["weight", "z_loss", "softcap"])
def test_recipe_confident_row_keeps_its_remainder(kernel_backend, recipe):
    # A target 12 above 36 zeros: 1 - p_k = 36 exp(-12) / (1 + ...) = 2.2e-4, which 1 - p_k in float32
    # gets only to 3e-4 relative; the target's gradient keeps it (R / (1 + R)) with every option.
    logits = torch.zeros(2, 37, device=DEVICE)
    logits[0, 5] = logits[1, 36] = 12.0
    target = torch.tensor([5, 36], device=DEVICE)
    options = {"weight": dict(weight=class_weights(37)), "z_loss": dict(z_loss=1e-6), "softcap": dict(softcap=100.0)}
    logits.requires_grad_()
    smoothce.cross_entropy(logits, target, reduction="sum", **options[recipe]).backward()
    weight = options[recipe].pop("weight", None)
    _, ref_grad = cross_entropy_reference(
        logits.detach().cpu(),
        target.cpu(),
        None if weight is None else weight.cpu(),
        reduction="sum",
        **options[recipe],
    )
    torch.testing.assert_close(logits.grad.cpu().double(), ref_grad, rtol=2e-5, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_recipe_all_rows_ignored(kernel_backend, reduction):
    # Loss 0 and a zero gradient ("mean" over a weighted count of 0: 0, not NaN), and every row's lse.
    logits, target = make_inputs(5, 37, torch.float32, ignored=range(5))
    logits.requires_grad_()
    loss, lse = smoothce.cross_entropy(
        logits, target, class_weights(37), reduction=reduction, z_loss=Z_LOSS, softcap=SOFTCAP, return_lse=True
    )
    loss.sum().backward()
    assert torch.equal(loss.detach().cpu(), torch.zeros_like(loss).cpu())
    assert torch.equal(logits.grad.cpu(), torch.zeros(5, 37))
    *_, ref_lse = cross_entropy_reference(logits.detach().cpu(), target.cpu(), softcap=SOFTCAP, return_lse=True)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recipe_zero_weights(kernel_backend, monkeypatch, reduction):
    # Zero weights on every third class, targets among them: those rows count for nothing in the mean.
    logits, target = make_inputs(7, 37, torch.float32)
    weight = class_weights(37)
    weight[::3] = 0.0
    target[3] = 6
    check_recipe(monkeypatch, logits, target, 0.1, reduction, weight=weight, z_loss=Z_LOSS)
    # Every target on a zero weight: "mean" is 0 with a zero gradient.
    check_recipe(monkeypatch, logits, torch.where(target == -100, -100, 3), 0.1, "mean", weight=weight)


@pytest.mark.parametrize("recipe", ["softcap", "weight", "z_loss"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_recipe_minus_inf_logits(kernel_backend, label_smoothing, recipe):
    # -inf logits (a whole first block and a tail): the cap turns them into -c, a finite loss; without
    # it the loss is finite at lam = 0 and +inf at lam > 0, and the gradient finite (0 there).
    logits, target = make_inputs(7, 37, torch.float32)
    masked = torch.zeros(7, 37, dtype=torch.bool, device=DEVICE)
    masked[:, :TEST_BLOCK_V] = True
    masked[4, 30:] = True
    masked[torch.arange(7, device=DEVICE), target.clamp_min(0)] = False
    logits = logits.masked_fill(masked, float("-inf")).requires_grad_()
    options = {**RECIPES[recipe], "weight": class_weights(37) if recipe == "weight" else None}
    loss, lse = smoothce.cross_entropy(
        logits, target, label_smoothing=label_smoothing, reduction="none", return_lse=True, **options
    )
    loss.backward(torch.ones_like(loss))
    stand_in = -1e300 if recipe != "softcap" else float("-inf")  # the reference's finite -inf at lam = 0
    ref_loss, ref_grad, ref_lse = cross_entropy_reference(
        logits.detach().cpu().double().masked_fill(masked.cpu(), stand_in),
        target.cpu(),
        None if options["weight"] is None else options["weight"].cpu(),
        label_smoothing=label_smoothing,
        reduction="none",
        z_loss=options.get("z_loss", 0.0),
        softcap=options.get("softcap"),
        return_lse=True,
    )
    valid = target.cpu() != -100
    if label_smoothing > 0 and recipe != "softcap":
        assert torch.isposinf(loss.detach().cpu()[valid]).all()
        assert torch.equal(loss.detach().cpu()[~valid], torch.zeros(int((~valid).sum())))
    else:
        torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_recipe_large_offset_logits(kernel_backend, monkeypatch, label_smoothing):
    # Logits around 1000 in fp32 with weights and the z-loss (lse ~ 1000, s lse^2 ~ 1e4): the sums stay
    # relative to the row max. (Soft-capping bounds the logits by c: no offset reaches it.)
    logits, target = make_inputs(7, 37, torch.float32)
    options = dict(weight=True, z_loss=Z_LOSS, return_lse=True)
    check_recipe(monkeypatch, logits + 1000, target, label_smoothing, "none", **options)


@pytest.mark.parametrize("layout", [_transposed, _column_slice, _every_other_row], ids=lambda f: f.__name__[1:])
def test_recipe_non_contiguous_logits(kernel_backend, monkeypatch, layout):
    logits, target = layout(7, 37, torch.bfloat16)
    assert not logits.is_contiguous()
    check_recipe(monkeypatch, logits, target, 0.1, "sum", **RECIPES["all"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_recipe_in_place_of_the_logits(kernel_backend, dtype):
    # Backend.forward_recipe (the fused linear loss's call) may write the gradient over the logits.
    logits, target = make_inputs(7, 37, dtype)
    reference = logits.clone()
    weight = class_weights(37)
    recipe = Recipe(weight, Z_LOSS, SOFTCAP)
    lse = torch.full((7,), float("nan"), device=DEVICE)
    rows = kernel_backend.forward_recipe(
        logits, target, 0.1, -100, logits, torch.tensor(0.5, device=DEVICE), recipe, lse
    )
    ref_loss, ref_grad, ref_lse = cross_entropy_reference(
        reference.cpu(),
        target.cpu(),
        weight.cpu(),
        label_smoothing=0.1,
        reduction="none",
        z_loss=Z_LOSS,
        softcap=SOFTCAP,
        return_lse=True,
    )
    loss_tol, grad_tol = tolerances(dtype)
    torch.testing.assert_close(rows.cpu().double(), ref_loss, **loss_tol)
    torch.testing.assert_close(logits.cpu().double(), ref_grad * 0.5, **grad_tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, **loss_tol)


@pytest.mark.parametrize("cap", [0.5, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_softcap_accuracy(kernel_backend, dtype, cap):
    # c tanh(z / c) across the series' range (|z / c| < 1/4), its edge, and the exp form up to
    # saturation: lse of a one-column row is z' itself, to a few ulps of float64's value.
    values = torch.tensor(
        [0.0, 1e-6, -3e-3, 0.1, -0.2499, 0.25, 0.2501, -0.7, 1.5, -4.0, 9.0, 40.0], dtype=torch.float64
    )
    logits = (values * cap).to(dtype).unsqueeze(1).to(DEVICE)
    target = torch.zeros(len(values), dtype=torch.int64, device=DEVICE)
    _, lse = smoothce.cross_entropy(logits, target, reduction="none", softcap=cap, return_lse=True)
    exact = cap * torch.tanh(logits.cpu().double() / cap).squeeze(1)
    ulps = (lse.cpu().double() - exact).abs() / (
        torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    )
    assert (ulps <= 4).all(), ulps


def test_unavailable_reasons(backend, monkeypatch):
    module = sys.modules["smoothce.backends.triton_backend"]
    assert "serves" in backend.unavailable_reason("mps")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in backend.unavailable_reason("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        registry.select("cpu")
    monkeypatch.setattr(module, "triton_import_error", lambda: "Triton is not importable")
    assert backend.unavailable_reason("cpu") == "Triton is not importable"
    assert backend.unavailable_reason(backend.device_type) == "Triton is not importable"


def test_import_without_triton():
    # `import smoothce` never imports Triton; without Triton the CPU backend still works
    # and asking for a Triton backend says what is missing.
    script = textwrap.dedent(
        """
        import sys
        import smoothce
        assert "triton" not in sys.modules, "import smoothce imported triton"
        sys.modules["triton"] = None  # as if it were not installed
        import torch
        loss = smoothce.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 4]))
        assert torch.isfinite(loss)
        for name in ("cuda-triton", "xpu-triton"):
            reason = smoothce.registry.get(name).unavailable_reason("cpu")
            assert reason is not None and "Triton is not importable" in reason, reason
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "SMOOTHCE_BACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("num_classes", [1, 1000, 128256, 262144])
def test_launch_config(backend, num_classes, dtype, monkeypatch):
    # The real configuration (no test cap): power-of-two blocks, a known kernel, sane warps.
    monkeypatch.setattr(backend, "max_block_v", None)
    config = backend.launch_config(num_classes, dtype)
    block = config["block"]
    assert block & (block - 1) == 0
    assert block >= backend.MIN_BLOCK_V
    assert config["kernel"] in ("split", "loop")
    if config["kernel"] == "split" and backend.kernel is None and not backend.ROW_SPLIT:
        assert block >= num_classes  # without the split, split_kernel only ever takes whole rows
    assert 1 <= config["num_warps"] <= backend.MAX_NUM_WARPS
    if backend.name == "xpu-triton":
        assert config["options"]["grf_mode"] in ("256", "large")
    monkeypatch.setattr(backend, "max_block_v", TEST_BLOCK_V)
    assert backend.launch_config(num_classes, dtype)["block"] == min(TEST_BLOCK_V, max(16, block))


def test_split_needs_every_chunk_resident(monkeypatch):
    # Rows with more chunks than the GPU has cores would wait on programs that cannot start.
    backend = registry.get("cuda-triton")
    monkeypatch.setattr(backend, "cores", lambda device: 4)
    monkeypatch.setattr(backend, "LAUNCH_TABLE", {2: ((2**31, "split", 8192, 8),)})
    gpu = torch.device("cuda", 0)
    assert backend.launch_config(4 * 8192, torch.bfloat16, gpu)["kernel"] == "split"
    assert backend.launch_config(4 * 8192 + 1, torch.bfloat16, gpu)["kernel"] == "loop"
    # Neither a forced split kernel nor a cap on the columns per program skips that guard.
    monkeypatch.setattr(backend, "kernel", "split")
    assert backend.launch_config(4 * 8192, torch.bfloat16, gpu)["kernel"] == "split"
    assert backend.launch_config(4 * 8192 + 1, torch.bfloat16, gpu)["kernel"] == "loop"
    monkeypatch.setattr(backend, "max_block_v", 1024)  # 8 chunks of 1024 columns for 8192
    assert backend.launch_config(4 * 1024, torch.bfloat16, gpu)["kernel"] == "split"
    assert backend.launch_config(8192, torch.bfloat16, gpu)["kernel"] == "loop"
    monkeypatch.setattr(backend, "kernel", None)
    assert backend.launch_config(8192, torch.bfloat16, gpu)["kernel"] == "loop"
    # A device that may not start programs in grid order never waits: the loop kernel takes long rows.
    monkeypatch.setattr(backend, "ROW_SPLIT", False)
    monkeypatch.setattr(backend, "kernel", "split")
    assert backend.launch_config(4 * 1024, torch.bfloat16, gpu)["kernel"] == "loop"
    assert backend.launch_config(1024, torch.bfloat16, gpu)["kernel"] == "split"  # one chunk waits on nobody


@pytest.mark.compile
def test_torch_compile_fullgraph_dynamic(backend):
    # The kernel sits behind the custom op, opaque to Dynamo; two shapes with dynamic=True
    # must reuse one graph. Inductor on a GPU; aot_eager on CPU (no C++ build needed).
    compiled = torch.compile(
        smoothce.cross_entropy, fullgraph=True, dynamic=True, backend="inductor" if ON_GPU else "aot_eager"
    )
    for n_rows, num_classes in [(7, 40), (9, 23)]:
        logits, target = make_inputs(n_rows, num_classes, torch.float32)
        logits.requires_grad_()
        loss = compiled(logits, target, label_smoothing=0.1)
        loss.backward()
        ref_loss, ref_grad = cross_entropy_reference(logits.detach().cpu(), target.cpu(), label_smoothing=0.1)
        torch.testing.assert_close(loss.detach().cpu().double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits.grad.cpu().double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="16384 x 262144 bf16 (8 GiB of logits) is far too big for the interpreter")
def test_64bit_offsets_large_problem():
    """N * V = 2**32 elements: rows past 2**31 elements only work with 64-bit row offsets."""
    gpu = getattr(torch, DEVICE)
    if gpu.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs about 17 GiB of device memory (logits and gradient, 8 GiB each)")
    n_rows, num_classes = 16384, 262144
    logits = torch.randn(n_rows, num_classes, dtype=torch.bfloat16, device=DEVICE)
    target = torch.randint(0, num_classes, (n_rows,), device=DEVICE)
    target[1] = -100
    logits.requires_grad_()
    loss = smoothce.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    loss.backward(torch.ones_like(loss))
    # The first rows, one just past 2**31 elements (row 8192), and the last row.
    rows = torch.tensor([0, 1, 8191, 8192, n_rows - 1], device=DEVICE)
    ref_loss, ref_grad = cross_entropy_reference(
        logits.detach()[rows].cpu(), target[rows].cpu(), label_smoothing=0.1, reduction="none"
    )
    torch.testing.assert_close(loss.detach()[rows].cpu().double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        logits.grad[rows].cpu().double(), ref_grad, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-8
    )


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_graph_capture_of_forward_and_backward(dtype):
    """The op never syncs with the host, so a whole forward+backward captures and replays."""
    logits, target = make_inputs(64, 1000, dtype)
    static = logits.detach().clone().requires_grad_()
    static_target = target.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles the kernels) outside the capture
        for _ in range(2):
            static.grad = None
            smoothce.cross_entropy(static, static_target, label_smoothing=0.1).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):
        static_loss = smoothce.cross_entropy(static, static_target, label_smoothing=0.1)
        static_loss.backward()
    for seed in (1, 2):
        fresh, fresh_target = make_inputs(64, 1000, dtype, seed=seed)
        with torch.no_grad():
            static.copy_(fresh)
        static_target.copy_(fresh_target)
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, ref_grad = cross_entropy_reference(fresh.cpu(), fresh_target.cpu(), label_smoothing=0.1)
        loss_tol, grad_tol = tolerances(dtype)
        torch.testing.assert_close(static_loss.detach().cpu().double(), ref_loss, **loss_tol)
        torch.testing.assert_close(static.grad.cpu().double(), ref_grad, **grad_tol)


@pytest.mark.compile
@pytest.mark.skipif(DEVICE != "cuda", reason="reduce-overhead (CUDA graphs) needs a CUDA device")
def test_torch_compile_reduce_overhead_training_step():
    # torch.compile(mode="reduce-overhead") runs the compiled step as a CUDA graph.
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, device=DEVICE)
    loss_fn = smoothce.CrossEntropyLoss(label_smoothing=0.1)

    def step(x, t):
        loss = loss_fn(head(x), t)
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step, mode="reduce-overhead")
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(16, 32, generator=generator).to(DEVICE)
        t = torch.randint(0, 500, (16,), generator=generator).to(DEVICE)
        head.zero_grad(set_to_none=True)
        loss = compiled(x, t).clone()
        grad = head.weight.grad.clone()
        head.zero_grad(set_to_none=True)
        expected = torch.nn.functional.cross_entropy(head(x), t, label_smoothing=0.1)
        expected.backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, head.weight.grad, rtol=1e-4, atol=1e-6)


# sm_90 SASS instructions per logit of the plain kernels (bfloat16, gradient, smoothing) as Triton
# 3.9.0 compiles them: the options are constexpr switches and must not add one instruction to them.
PLAIN_INSTRUCTIONS_PER_VALUE = {"3.9.0": {"split": 55.0, "loop sweep 1": 17.5, "loop sweep 2": 16.125}}


@pytest.mark.skipif(ON_GPU, reason="on a GPU every kernel is compiled by the tests above")
def test_kernels_compile_for_hopper():
    """Without a GPU, compile the real (not interpreted) kernels ahead of time for sm_90 (H100/H200),
    and count their SASS instructions per logit, plain and with each option of the recipe on.

    The interpreter accepts code that the compiler rejects (a global that is not a constexpr,
    say); this catches that here. A fresh process, since TRITON_INTERPRET is read at import.
    Per logit: the split kernel's instructions at 16 values per thread less those at 8, over 8;
    the loop kernel's two sweep loops over their 8 values per thread. The counts are printed
    (pytest -s); the plain ones must not exceed PLAIN_INSTRUCTIONS_PER_VALUE (a static count,
    no claim of GPU time).
    """
    script = textwrap.dedent(
        r"""
        import json, re, subprocess, tempfile
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from smoothce.backends import triton_kernels as tk

        POINTERS = {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "out_ptr": "*bf16", "target_ptr": "*i64",
                    "sync_ptr": "*i32"}
        # Each option's switch and its arguments, None (a constexpr) where it is off, as the launcher passes them.
        OPTIONS = {"SOFTCAP": ("cap_hi", "cap_lo", "icap_hi", "icap_lo"), "WEIGHTED": ("weight_ptr",),
                   "ZLOSS": ("zl_hi", "zl_lo"), "LSE": ("lse_ptr",)}

        def compile_for_hopper(fn, constexprs, **options):
            names = fn.arg_names
            constexprs = dict(constexprs)
            for switch, arguments in OPTIONS.items():
                if switch in names:
                    constexprs.setdefault(switch, False)
                    if not constexprs[switch]:
                        constexprs.update({name: None for name in arguments if name in names})
            signature = {
                name: "constexpr" if name in constexprs else POINTERS.get(name, "*fp32") if name.endswith("_ptr")
                else "fp32" if name == "kept_scale" or name.endswith(("_hi", "_lo")) else "i32"
                for name in names
            }
            source = ASTSource(fn=fn, signature=signature,
                               constexprs={(names.index(k),): v for k, v in constexprs.items()})
            return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

        def sass(kernel):
            # (instructions, [instructions of each loop body]) of the kernel's SASS (nvdisasm, shipped with Triton).
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(kernel.asm["cubin"])
                cubin.flush()
                text = subprocess.run([triton.knobs.nvidia.nvdisasm.path, "-c", cubin.name], capture_output=True,
                                      text=True, check=True).stdout
            labels, count, loops = {}, 0, []
            for line in text.splitlines():
                label = re.match(r"\s*(\.L_x_\d+):", line)
                if label:
                    labels[label.group(1)] = count
                elif re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
                    count += 1
                    back = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
                    if back and back.group(1) in labels:
                        loops.append(count - labels[back.group(1)])
            return count, loops

        common = dict(SMOOTHING=True, REDUCE=True, ACC_DTYPE=tl.float32)
        for grad in (True, False):
            compile_for_hopper(tk.split_kernel, dict(CHUNK=8192, MAX_CHUNKS=16, PHASE=0, COMPUTE_GRAD=grad,
                                                     FAST_EXP=grad, **common), num_warps=8)
        for fast_exp in (True, False):
            compile_for_hopper(tk.loop_kernel, dict(BLOCK=8192, COMPUTE_GRAD=True, KEEP="evict_last",
                                                    DROP="evict_first", FAST_EXP=fast_exp, WIDE_COLS=not fast_exp,
                                                    **common), num_warps=16)
        for normalized, weighted in ((True, False), (False, False), (False, True)):
            compile_for_hopper(tk.prologue_kernel, dict(MEAN=True, NORMALIZED=normalized, FOLD=False, BLOCK=1024,
                                                        WEIGHTED=weighted), num_warps=4, debug=True)
        compile_for_hopper(tk.scale_grad_kernel, dict(PER_ROW=True, INPLACE=True, BLOCK=4096, ACC_DTYPE=tl.float32),
                           num_warps=8)

        # Instructions per logit, plain and with each option (and all) on: bfloat16 logits, a gradient.
        every = dict.fromkeys(OPTIONS, True)
        variants = {"plain": {}, **{name: {name: True} for name in OPTIONS}, "all": every}
        common = dict(SMOOTHING=True, REDUCE=False, ACC_DTYPE=tl.float32, COMPUTE_GRAD=True, FAST_EXP=True)
        counts = {}
        for variant, switches in variants.items():
            split = [sass(compile_for_hopper(tk.split_kernel, dict(CHUNK=chunk, MAX_CHUNKS=16, PHASE=0, **common,
                                                                   **switches), num_warps=8))[0]
                     for chunk in (2048, 4096)]
            _, loops = sass(compile_for_hopper(tk.loop_kernel, dict(BLOCK=2048, KEEP="evict_last", DROP="evict_first",
                                                                    WIDE_COLS=False, **common, **switches),
                                               num_warps=8))
            counts[variant] = {"split": (split[1] - split[0]) / 8, "loop sweep 1": loops[0] / 8,
                               "loop sweep 2": loops[1] / 8}
        # Options compiled without a gradient too (the split kernel's last chunk reads z_k).
        compile_for_hopper(tk.split_kernel, dict(CHUNK=8192, MAX_CHUNKS=16, PHASE=0, COMPUTE_GRAD=False,
                                                 FAST_EXP=False, SMOOTHING=True, REDUCE=True, ACC_DTYPE=tl.float32,
                                                 **every), num_warps=8)
        print(json.dumps({"triton": triton.__version__, "counts": counts}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SMOOTHCE_BACKEND")}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when it is unset
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    print(f"sm_90 SASS instructions per logit (bfloat16, gradient), Triton {result['triton']}:")
    for variant, per_value in counts.items():
        print(f"  {variant:>8}: " + ", ".join(f"{name} {value:.2f}" for name, value in per_value.items()))
    bound = PLAIN_INSTRUCTIONS_PER_VALUE.get(result["triton"])
    if bound is not None:
        assert all(counts["plain"][name] <= bound[name] for name in bound), (counts["plain"], bound)
