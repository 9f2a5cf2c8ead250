"""The kept gradient's autograd: backward is one elementwise pass over the gradient the forward kept.

``register_kept_gradient_autograd`` gives an op that returns ``(loss, grad[, factor])`` its
autograd (an autograd.Function with ``setup_context`` and ``vmap``, so torch.func works) and
vmap; smoothce's cross-entropy and the vocabulary-parallel loss use it.
``inplace_backward`` switches whether backward may scale the kept gradient in place.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from smoothce import registry
from smoothce.numerics import loss_dtype

# Implementations (Autograd kernels) for ops of the smoothce namespace defined elsewhere.
_lib = torch.library.Library("smoothce", "FRAGMENT")

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
