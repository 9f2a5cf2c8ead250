"""torch.library registration of smoothce's ops: schemas, device kernels, fakes, autograd.

Three ops, one schema each:

* ``smoothce::cross_entropy`` (public): checks its arguments, flattens to 2-D and
  calls ``cross_entropy_fwd``. It is CompositeImplicitAutograd, so autograd and
  torch.compile see through it to the op below.
* ``smoothce::cross_entropy_fwd`` (internal): returns ``(loss, grad)``; the
  gradient is computed in the forward pass and kept for backward (the spec's
  design). ``setup_context`` only sees inputs and outputs, which is why the
  gradient is an output of its own.
* backward is one elementwise pass: ``grad * dO`` (per row for "none").
"""

from __future__ import annotations

import contextlib
import threading

import torch

from smoothce import registry
from smoothce.backends.base import loss_dtype

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)

_lib = torch.library.Library("smoothce", "DEF")

# The public op. Keyword-only options, exactly as callers outside this repo use them.
_lib.define(
    "cross_entropy(Tensor logits, Tensor target, *, float label_smoothing=0.0, "
    "int ignore_index=-100, str reduction=\"mean\") -> Tensor"
)


def check_arguments(logits, target, label_smoothing, ignore_index, reduction) -> None:
    """Raise TypeError/ValueError naming the bad argument; metadata only, so it works on fake tensors."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"logits and target must be tensors, got {type(logits).__name__} and {type(target).__name__}"
        )
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}"
        )
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must be int64 or int32 class indices, got {target.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (..., V), got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have at least one class (V >= 1), got shape {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
            f"expected target of shape {tuple(logits.shape[:-1])} (logits without the class dimension, "
            "which is last)"
        )
    if logits.device != target.device:
        raise ValueError(f"logits are on {logits.device} but target is on {target.device}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:  # False for NaN too
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _cross_entropy(logits, target, *, label_smoothing=0.0, ignore_index=-100, reduction="mean"):
    # Composite: autograd and torch.compile trace through this into cross_entropy_fwd.
    check_arguments(logits, target, label_smoothing, ignore_index, reduction)
    if logits.device.type != "meta":
        registry.select(logits.device)  # a clear error now for a device with no usable backend
    num_classes = logits.shape[-1]
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = torch.ops.smoothce.cross_entropy_fwd(
        logits.reshape(-1, num_classes),
        target.reshape(-1),
        float(label_smoothing),
        ignore_index,
        reduction,
        compute_grad,
    )
    if reduction == "none":
        return loss.reshape(target.shape)
    return loss


_lib.impl("cross_entropy", _cross_entropy, "CompositeImplicitAutograd")


# The internal op: loss and the kept gradient. Kernels are registered per device type
# from the registry (see the end of this file); fake and autograd follow.
_lib.define(
    "cross_entropy_fwd(Tensor logits, Tensor target, float label_smoothing, int ignore_index, "
    "str reduction, bool compute_grad) -> (Tensor, Tensor)"
)


def cross_entropy_fwd(logits, target, label_smoothing, ignore_index, reduction, compute_grad):
    """Loss of 2-D ``logits`` (N, V) against ``target`` (N,), and its gradient when ``compute_grad``.

    loss: (N,) for "none", 0-d for "sum"/"mean"; float32 (float64 for float64 logits).
    grad: (N, V) in the logits' dtype with the "mean" 1/count folded in, or an empty
    tensor when ``compute_grad`` is False (then no gradient work is done at all).
    "mean" over zero non-ignored rows is 0 with an all-zero gradient (not NaN).
    """
    n_rows = logits.shape[0]
    backend = registry.select(logits.device)
    acc_dtype = loss_dtype(logits.dtype)
    if reduction == "mean":
        denominator = (target != ignore_index).sum().clamp_min(1).to(acc_dtype)  # 0 rows: loss 0, not NaN
        grad_scale = 1.0 / denominator
    else:
        grad_scale = torch.ones((), dtype=acc_dtype, device=logits.device)
    grad = torch.empty_like(logits) if compute_grad else None
    if n_rows == 0:
        rows = torch.zeros(0, dtype=acc_dtype, device=logits.device)
    else:
        rows = backend.forward(logits, target.contiguous(), label_smoothing, ignore_index, grad, grad_scale)
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / denominator
    if grad is None:
        grad = logits.new_empty(0)
    return loss, grad


@torch.library.register_fake("smoothce::cross_entropy_fwd")
def _fake_fwd(logits, target, label_smoothing, ignore_index, reduction, compute_grad):
    # Shapes and dtypes only, for torch.compile and meta tensors.
    torch._check(logits.dim() == 2, lambda: f"cross_entropy_fwd expects 2-D logits, got {logits.dim()}-D")
    torch._check(target.dim() == 1, lambda: f"cross_entropy_fwd expects 1-D target, got {target.dim()}-D")
    torch._check(target.shape[0] == logits.shape[0], lambda: "target and logits disagree on the rows")
    dtype = loss_dtype(logits.dtype)
    loss = logits.new_empty(logits.shape[:1] if reduction == "none" else (), dtype=dtype)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad


_inplace_backward = threading.local()


@contextlib.contextmanager
def inplace_backward(enabled: bool):
    """Whether backward may scale the kept gradient in place (the default: True).

    In place, forward+backward holds one gradient-sized buffer, but the kept gradient
    serves one backward only (on CPU an upstream gradient of exactly 1 leaves it as it
    is, so that case can repeat). Calls made
    inside ``with smoothce.inplace_backward(False):`` keep it intact, so backward can run
    again (``retain_graph=True``, gradcheck), at the cost of one more such buffer.
    """
    previous = getattr(_inplace_backward, "enabled", True)
    _inplace_backward.enabled = bool(enabled)
    try:
        yield
    finally:
        _inplace_backward.enabled = previous


def register_kept_gradient_autograd(op: str, name: str, reduction_arg: int, compute_grad_arg: int) -> None:
    """Autograd for an op returning ``(loss, grad)`` whose ``grad`` is d loss / d (its first input).

    Backward is one elementwise pass, dZ = dO * grad (dO per row for "none"). ``name`` is
    what error messages call the op; the two indices locate its ``reduction`` and
    ``compute_grad`` arguments.
    """
    namespace, op_name = op.split("::")
    arguments = getattr(getattr(torch.ops, namespace), op_name).default._schema.arguments
    nones = (None,) * (len(arguments) - 1)  # no gradient for anything but the logits

    def setup_context(ctx, inputs, output):
        # Keep only the forward's gradient: backward needs nothing else.
        _, grad = output
        ctx.reduction = inputs[reduction_arg]
        ctx.compute_grad = inputs[compute_grad_arg]
        ctx.inplace = getattr(_inplace_backward, "enabled", True)
        ctx.consumed = False
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)  # else autograd builds an (N, V) zero tensor for `grad`'s grad
        ctx.save_for_backward(grad)

    def backward(ctx, grad_loss, _unused):
        if ctx.consumed:  # checked before unpacking, whose version check would say less
            raise RuntimeError(
                f"{name}: a second backward through the same call (retain_graph=True), but the first "
                "one scaled the kept gradient in place. Run the forward inside "
                "`with smoothce.inplace_backward(False):` to keep it intact for repeated backward passes."
            )
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return (None, *nones)
        if not ctx.compute_grad:
            raise RuntimeError(
                f"{name}: no gradient was kept because logits did not require grad "
                "(or grad mode was off) in the forward pass"
            )
        scale = grad_loss.unsqueeze(-1) if ctx.reduction == "none" else grad_loss
        if not (type(grad) is torch.Tensor and type(grad_loss) is torch.Tensor):
            # Traced (torch.compile) or tensor subclasses: the functional form; Inductor fuses
            # it and may reuse the saved buffer (a donated buffer) for the result.
            return ((grad * scale).to(grad.dtype), *nones)
        if torch.is_grad_enabled():
            raise RuntimeError(f"{name} does not support double backward (create_graph=True)")
        if grad.device.type == "cpu" and scale.numel() == 1 and bool(scale == 1):
            return (grad, *nones)  # dO = 1 (loss.backward()), read for free on CPU: nothing to scale
        if ctx.inplace:
            # Scale in place and hand the buffer on: forward+backward holds one gradient-sized buffer.
            ctx.consumed = True
            return (grad.mul_(scale), *nones)
        return ((grad * scale).to(grad.dtype), *nones)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


register_kept_gradient_autograd(
    "smoothce::cross_entropy_fwd", "smoothce.cross_entropy", reduction_arg=4, compute_grad_arg=5
)


def _register_device_kernel(device_type: str) -> None:
    # One kernel per device type that has a backend; it asks the registry which backend
    # runs, so SMOOTHCE_BACKEND and third-party backends need no re-registration.
    torch.library.register_kernel("smoothce::cross_entropy_fwd", device_type, cross_entropy_fwd, lib=_lib)


registry.on_new_device_type(_register_device_kernel)
