"""Shared test helpers: tolerances per dtype and comparison against the float64 reference."""

from __future__ import annotations

import os

import pytest
import torch

from smoothce import registry
from smoothce.backends.triton_backend import TritonBackend, interpreter_enabled
from smoothce.reference import cross_entropy_reference

# (rtol, atol) for the gradient, which is rounded to the logits' dtype once: half an ulp
# relative. atol is a fraction of the largest |gradient|: p_j carries fp32's relative
# error of exp (~2e-6 for logits of size 20), which p_j - lam/V can cancel down to.
GRAD_TOL = {
    torch.float64: (1e-10, 1e-13),
    torch.float32: (1e-5, 4e-6),
    torch.bfloat16: (2.0**-8, 4e-6),
    torch.float16: (2.0**-10, 4e-6),
}
# The loss is float32 (float64) whatever the logits; it is computed from the very values
# the reference sees, so only fp32 accumulation error remains.
LOSS_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (2e-5, 1e-5),
    torch.float16: (2e-5, 1e-5),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# The Triton kernels on CPU tensors in Triton's interpreter (SMOOTHCE_BACKEND=cuda-triton or
# xpu-triton, TRITON_INTERPRET=1): the same roundings as on a GPU, but every launch costs milliseconds.
INTERPRETED_TRITON = interpreter_enabled() and os.environ.get("SMOOTHCE_BACKEND", "").endswith("triton")
# The device the value tests run on: cpu here; the cuda and xpu nox sessions set it.
DEVICE = torch.device(os.environ.get("SMOOTHCE_TEST_DEVICE", "cpu"))
LINUX_RSS = os.access("/proc/self/clear_refs", os.W_OK)  # the resettable peak resident set (Linux)
# Columns per block of the Triton backends in tests of small rows (see cap_triton_blocks).
TRITON_TEST_BLOCK_V = 16


def cpu_kernel_library():
    """The CPU backend's compiled recipe kernel (``backends/cpu_kernel.py``), built here if need be. Where it
    cannot be built the test is skipped, naming why; with SMOOTHCE_REQUIRE_CPU_KERNEL=1 (the nox cpu
    session) it fails instead."""
    from smoothce.backends import cpu_kernel

    lib = cpu_kernel.library()
    if lib is None:
        reason = f"the CPU recipe kernel is not available: {cpu_kernel.unavailable_reason()}"
        if os.environ.get("SMOOTHCE_REQUIRE_CPU_KERNEL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return lib


def cap_triton_blocks(monkeypatch, columns=TRITON_TEST_BLOCK_V):
    """Blocks of ``columns`` for the Triton backend that serves DEVICE (nothing for other backends).

    Rows of a few dozen values then take the multi-block loops and masked tails of real
    vocabularies. Under Triton's interpreter every block costs milliseconds, so only small rows
    use it; large rows keep the backend's own launch table.
    """
    backend = registry.select(DEVICE)
    if isinstance(backend, TritonBackend):
        monkeypatch.setattr(backend, "max_block_v", columns)


def make_logits(shape, dtype, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def make_target(shape, num_classes, ignore_index=-100, ignore_fraction=0.25, seed=1, dtype=torch.int64):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=generator)
    drop = torch.rand(shape, generator=generator) < ignore_fraction
    return torch.where(drop, ignore_index, target).to(dtype)


def run_smoothce(logits, target, upstream=None, **options):
    """Loss and logits.grad from smoothce on DEVICE, through the public function and loss.backward(upstream).

    ``upstream`` is dO (ones by default), shaped like the loss.
    """
    import smoothce

    leaf = logits.detach().to(DEVICE, copy=True).requires_grad_(True)
    loss = smoothce.cross_entropy(leaf, target.to(DEVICE), **options)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.to(DEVICE, loss.dtype))
    return loss.detach().cpu(), leaf.grad.cpu()


def assert_matches_reference(logits, target, loss, grad, upstream=None, **options):
    """loss and grad (for backward of dO = ``upstream``, ones by default) against the float64 reference."""
    ref_loss, ref_grad = cross_entropy_reference(logits, target, **options)
    if upstream is not None:
        ref_grad = ref_grad * (upstream.double().unsqueeze(-1) if upstream.dim() else upstream.double())
    rtol, atol = LOSS_TOL[logits.dtype]
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    if grad is not None:
        assert grad.dtype == logits.dtype
        assert grad.shape == logits.shape
        assert_grad_close(grad, ref_grad, logits.dtype)


def assert_grad_close(grad, ref_grad, dtype):
    rtol, atol = GRAD_TOL[dtype]
    atol *= float(ref_grad.abs().max()) if ref_grad.numel() else 0.0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


@pytest.fixture
def no_backend_override(monkeypatch):
    monkeypatch.delenv("SMOOTHCE_BACKEND", raising=False)
