"""torch.library registration of smoothce's cross-entropy: schemas, device kernels, fakes.

Three ops, one schema each:

* ``smoothce::cross_entropy`` (public): checks its arguments, flattens to 2-D and
  calls ``cross_entropy_fwd``. It is CompositeImplicitAutograd, so autograd and
  torch.compile see through it to the op below.
* ``smoothce::cross_entropy_fwd`` (internal): returns ``(loss, grad, factor)``; the
  gradient is computed in the forward pass and kept for backward (the spec's
  design). ``setup_context`` only sees inputs and outputs, which is why the
  gradient and backward's factor are outputs of their own.
* backward is one elementwise pass: ``grad * dO * factor`` (per row for "none"),
  by the backend's ``scale_grad`` (the autograd: ``smoothce/_autograd.py``).
"""

from __future__ import annotations

import torch

from smoothce import registry
from smoothce._autograd import register_kept_gradient_autograd
from smoothce.checks import FLOAT_DTYPES, INDEX_DTYPES, REDUCTIONS, check_arguments  # noqa: F401 (re-exported)
from smoothce.numerics import loss_dtype

_lib = torch.library.Library("smoothce", "DEF")

# The public op. Keyword-only options, exactly as callers outside this repo use them.
_lib.define(
    "cross_entropy(Tensor logits, Tensor target, *, float label_smoothing=0.0, "
    "int ignore_index=-100, str reduction=\"mean\") -> Tensor"
)


def _cross_entropy(logits, target, *, label_smoothing=0.0, ignore_index=-100, reduction="mean"):
    # Composite: autograd and torch.compile trace through this into cross_entropy_fwd.
    target = check_arguments(logits, target, label_smoothing, ignore_index, reduction)  # every rule, once
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    # The autograd.Function is applied here, above the dispatcher, so that torch.func's
    # transforms see it (they cannot reach one applied inside the op's Autograd kernel).
    forward = _KeptCrossEntropy.apply if compute_grad else torch.ops.smoothce.cross_entropy_fwd
    options = (float(label_smoothing), ignore_index, reduction, compute_grad)
    if logits.dim() == 2:  # as it is: a reshape would still cost a view and its backward node
        return forward(logits, target, *options)[0]
    loss = forward(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), *options)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss


_lib.impl("cross_entropy", _cross_entropy, "CompositeImplicitAutograd")


# The internal op: loss, the kept gradient and backward's factor. Kernels are registered per
# device type from the registry (see the end of this file); fake and autograd follow.
_lib.define(
    "cross_entropy_fwd(Tensor logits, Tensor target, float label_smoothing, int ignore_index, "
    "str reduction, bool compute_grad) -> (Tensor, Tensor, Tensor)"
)


def cross_entropy_fwd(logits, target, label_smoothing, ignore_index, reduction, compute_grad):
    """Loss of 2-D ``logits`` (N, V) against ``target`` (N,), its kept gradient, and backward's factor.

    loss: (N,) for "none", 0-d for "sum"/"mean"; float32 (float64 for float64 logits); "mean"
    over zero non-ignored rows is 0 with an all-zero gradient (not NaN).
    grad: (N, V) in the logits' dtype, or an empty tensor when ``compute_grad`` is False (then
    no gradient work is done at all). It holds the gradient times the backend contract's
    ``kept_gradient_scale``: with the "mean" 1/count folded in, except float16 (2**15, unscaled).
    factor: 0-d, what backward multiplies dO by before scaling the kept gradient.
    """
    if logits.shape[0] == 0:
        acc = loss_dtype(logits.dtype)
        loss = logits.new_zeros((0,) if reduction == "none" else (), dtype=acc)
        grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
        return loss, grad, logits.new_ones((), dtype=acc)
    backend = registry.select(logits.device)
    loss, grad, factor = backend.loss_and_grad(
        logits, target.contiguous(), label_smoothing, ignore_index, reduction, compute_grad
    )
    return loss, (logits.new_empty(0) if grad is None else grad), factor


@torch.library.register_fake("smoothce::cross_entropy_fwd")
def _fake_fwd(logits, target, label_smoothing, ignore_index, reduction, compute_grad):
    # Shapes and dtypes only, for torch.compile and meta tensors.
    torch._check(logits.dim() == 2, lambda: f"cross_entropy_fwd expects 2-D logits, got {logits.dim()}-D")
    torch._check(target.dim() == 1, lambda: f"cross_entropy_fwd expects 1-D target, got {target.dim()}-D")
    torch._check(target.shape[0] == logits.shape[0], lambda: "target and logits disagree on the rows")
    dtype = loss_dtype(logits.dtype)
    loss = logits.new_empty(logits.shape[:1] if reduction == "none" else (), dtype=dtype)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad, logits.new_empty((), dtype=dtype)


# Autograd (and vmap) of the internal op: backward scales the kept gradient (smoothce/_autograd.py).
_KeptCrossEntropy = register_kept_gradient_autograd(
    "smoothce::cross_entropy_fwd", "smoothce.cross_entropy", reduction_arg=4, compute_grad_arg=5
)


def _register_device_kernel(device_type: str) -> None:
    # One kernel per device type that has a backend; it asks the registry which backend
    # runs, so SMOOTHCE_BACKEND and third-party backends need no re-registration.
    torch.library.register_kernel("smoothce::cross_entropy_fwd", device_type, cross_entropy_fwd, lib=_lib)


registry.on_new_device_type(_register_device_kernel)
# Every other device type: the same function, whose registry.select raises the registry's clear
# error (no backend for that device type) instead of the dispatcher's.
_lib.impl("cross_entropy_fwd", cross_entropy_fwd, "CompositeExplicitAutograd")
