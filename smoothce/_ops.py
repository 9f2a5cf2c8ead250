"""torch.library registration of smoothce's ops: schemas, device kernels, fakes, autograd.

Three ops, one schema each:

* ``smoothce::cross_entropy`` (public): checks its arguments, flattens to 2-D and
  calls ``cross_entropy_fwd``. It is CompositeImplicitAutograd, so autograd and
  torch.compile see through it to the op below.
* ``smoothce::cross_entropy_fwd`` (internal): returns ``(loss, grad, factor)``; the
  gradient is computed in the forward pass and kept for backward (the spec's
  design). ``setup_context`` only sees inputs and outputs, which is why the
  gradient and backward's factor are outputs of their own.
* backward is one elementwise pass: ``grad * dO * factor`` (per row for "none"),
  by the backend's ``scale_grad``.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from smoothce import registry
from smoothce.backends.base import loss_dtype
from smoothce.checks import FLOAT_DTYPES, INDEX_DTYPES, REDUCTIONS, check_arguments  # noqa: F401 (re-exported)

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


_inplace_backward = threading.local()


@contextlib.contextmanager
def inplace_backward(enabled: bool):
    """Whether backward may scale the kept gradient in place (the default: True).

    In place, forward+backward holds one gradient-sized buffer: backward scales the kept
    gradient where it lies (not at all when dO times the factor is exactly 1) and hands that
    buffer on as the logits' gradient, so one forward serves one backward, and a second
    backward through the same call raises a clear error. Calls made inside
    ``with smoothce.inplace_backward(False):`` keep it intact and return a new tensor from every
    backward (``retain_graph=True``, gradcheck), at the cost of one more such buffer.
    """
    previous = getattr(_inplace_backward, "enabled", True)
    _inplace_backward.enabled = bool(enabled)
    try:
        yield
    finally:
        _inplace_backward.enabled = previous


def _traced(*tensors) -> bool:
    # Fake/functional tensors (torch.compile) and torch.func transforms take the functional form.
    return torch._C._are_functorch_transforms_active() or any(type(t) is not torch.Tensor for t in tensors)


def register_kept_gradient_autograd(op: str, name: str, reduction_arg: int, compute_grad_arg: int):
    """Autograd for an op returning ``(loss, grad[, factor])``, ``grad`` kept for its first input.

    Backward is one elementwise pass, dZ = dO x factor x grad (dO per row for "none"), by the
    backend's ``scale_grad``: in place unless ``inplace_backward(False)``. ``name`` is what error
    messages call the op; the two indices locate its ``reduction`` and ``compute_grad``
    arguments. The autograd.Function defines ``setup_context`` and ``vmap``, so torch.func's
    grad and vmap work over the op, and torch.compile traces its backward. Returns the
    Function, for callers that apply it themselves (see ``_cross_entropy``).
    """
    namespace, op_name = op.split("::")
    overload = getattr(getattr(torch.ops, namespace), op_name).default
    n_inputs = len(overload._schema.arguments)
    nones = (None,) * (n_inputs - 1)  # no gradient for anything but the first input

    class KeptGradient(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            with torch._C._AutoDispatchBelowAutograd():
                return overload(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            # Keep the forward's gradient and factor: backward needs nothing else.
            grad, factor = output[1], (output[2] if len(output) > 2 else None)
            ctx.reduction = inputs[reduction_arg]
            ctx.compute_grad = inputs[compute_grad_arg]
            ctx.inplace = getattr(_inplace_backward, "enabled", True)
            ctx.consumed = False
            ctx.mark_non_differentiable(*output[1:])
            ctx.set_materialize_grads(False)  # else autograd builds an (N, V) zero tensor for `grad`'s grad
            if factor is None:
                factor = torch.ones((), dtype=loss_dtype(grad.dtype), device=grad.device)
            ctx.save_for_backward(grad, factor)

        @staticmethod
        def backward(ctx, grad_loss, *_unused):
            if ctx.consumed:  # checked before unpacking, whose version check would say less
                raise RuntimeError(
                    f"{name}: a second backward through the same call (retain_graph=True), but the first "
                    "one scaled the kept gradient in place. Run the forward inside "
                    "`with smoothce.inplace_backward(False):` to keep it intact for repeated backward passes."
                )
            grad, factor = ctx.saved_tensors
            if grad_loss is None:
                return (None, *nones)
            if not ctx.compute_grad:
                raise RuntimeError(
                    f"{name}: no gradient was kept because logits did not require grad "
                    "(or grad mode was off) in the forward pass"
                )
            per_row = ctx.reduction == "none"
            if _traced(grad, grad_loss):
                # The functional form, in float32 and rounded once; Inductor fuses it and may reuse
                # the saved buffer (a donated buffer) for the result.
                scale = grad_loss * factor
                scale = scale.unsqueeze(-1) if per_row else scale
                return ((grad.to(scale.dtype) * scale).to(grad.dtype), *nones)
            if torch.is_grad_enabled():
                raise RuntimeError(f"{name} does not support double backward (create_graph=True)")
            backend = registry.select(grad.device)
            ctx.consumed = ctx.inplace  # in place, the buffer becomes the logits' gradient
            return (backend.scale_grad(grad, grad_loss, factor, per_row, ctx.inplace), *nones)

        @staticmethod
        def vmap(info, in_dims, *args):
            return _vmap_kept_gradient(overload, info, in_dims, args, reduction_arg, compute_grad_arg)

    KeptGradient.__name__ = KeptGradient.__qualname__ = f"KeptGradient_{op_name}"
    # Function.apply binds the arguments with inspect.signature(forward) on every call; a cached
    # signature makes that a lookup (a tenth of a tiny call's time otherwise).
    KeptGradient.forward.__signature__ = inspect.signature(KeptGradient.forward)

    if torch._library.custom_ops._maybe_get_opdef(op) is not None:
        # An op made by torch.library.custom_op owns its Autograd key: register the same pair
        # through it (torch.func's transforms then stay unsupported for that op).
        torch.library.register_autograd(op, KeptGradient.backward, setup_context=KeptGradient.setup_context)
        return KeptGradient

    def autograd_kernel(*args):
        # The Autograd key: record the Function when a gradient is wanted, else go straight below.
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                f"{op}: torch.func transforms (grad, vmap, ...) cannot reach this op's autograd from "
                f"inside the dispatcher; call {name}(...) instead, which supports them"
            )
        if torch.is_grad_enabled() and args[0].requires_grad:
            return KeptGradient.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*args)

    _lib.impl(op_name, autograd_kernel, "Autograd")
    # vmap without a gradient (torch.func.vmap of a no-grad loss) batches the same way.
    torch.library.register_vmap(op, KeptGradient.vmap, lib=_lib)
    return KeptGradient


def _vmap_kept_gradient(overload, info, in_dims, args, reduction_arg, compute_grad_arg):
    """vmap of an op (logits (N, V), target (N,), ...) -> (loss, grad, factor): one call on the stacked rows.

    The batch runs as one "none" call on (B * N, V); "sum" and "mean" are reduced per sample,
    and "mean" divides each sample's factor by its own count, so the kept gradient stays as it is.
    """
    logits, target = args[0], args[1]
    logits_dim, target_dim = in_dims[0], in_dims[1]
    if any(dim is not None for dim in in_dims[2:]):
        raise ValueError("smoothce: vmap over the options (label_smoothing, ignore_index, ...) is not supported")
    batch = info.batch_size
    logits = logits.movedim(logits_dim, 0) if logits_dim is not None else logits.expand(batch, *logits.shape)
    target = target.movedim(target_dim, 0) if target_dim is not None else target.expand(batch, *target.shape)
    n_rows, num_classes = logits.shape[1], logits.shape[2]
    reduction = args[reduction_arg]
    rest = list(args[2:])
    rest[reduction_arg - 2] = "none"
    loss, grad, factor = overload(logits.reshape(-1, num_classes), target.reshape(-1), *rest)
    loss = loss.reshape(batch, n_rows)
    grad = grad.reshape(batch, n_rows, num_classes) if args[compute_grad_arg] else grad
    factor = factor.expand(batch).clone()
    if reduction == "sum":
        loss = loss.sum(1)
    elif reduction == "mean":
        ignore_index = args[3]
        count = (target != ignore_index).sum(1).clamp_min(1).to(loss.dtype)
        loss = loss.sum(1) / count
        factor = factor / count
    grad_dim = 0 if args[compute_grad_arg] else None
    return (loss, grad, factor), (0, grad_dim, 0)


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
