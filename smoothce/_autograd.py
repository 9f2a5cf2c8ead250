"""The kept gradient's autograd, one for every smoothce loss: backward scales what the forward kept.

An op registered with ``register_kept_gradient_autograd`` returns ``(loss, *kept[, factor])``: the
gradients of its differentiable inputs, computed in the forward pass. Backward multiplies each by
dO x factor (dO per row for "none") in the accumulation dtype and rounds once, in place unless
``inplace_backward(False)``; where dO x factor is exactly 1 it writes nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from smoothce import registry
from smoothce._library import define

_state = threading.local()

SECOND_BACKWARD = (
    "{name}: a second backward through the same call (retain_graph=True), but the first one scaled the "
    "kept gradient in place. Run the forward inside `with smoothce.inplace_backward(False):` to keep it "
    "intact for repeated backward passes."
)


@contextlib.contextmanager
def inplace_backward(enabled: bool):
    """Whether backward may scale the kept gradient in place (the default: True).

    In place, forward+backward holds one gradient-sized buffer: backward scales the kept
    gradient where it lies (not at all when dO times the factor is exactly 1) and hands that
    buffer on as the gradient, so one forward serves one backward, and a second backward through
    the same call raises a clear error. Calls made inside ``with smoothce.inplace_backward(False):``
    keep it intact and return a new tensor from every backward (``retain_graph=True``, gradcheck),
    at the cost of one more such buffer.
    """
    previous = inplace_allowed()
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def inplace_allowed() -> bool:
    """The setting of ``inplace_backward`` in effect (True outside any such block)."""
    return getattr(_state, "enabled", True)


def _scale_kept(grad, grad_out, factor, per_row, inplace):
    # In place, ``grad`` is consumed: scaled where it lies and returned as the gradient; a buffer
    # already handed on this way is refused (torch.compile's backward reaches this check only here).
    if inplace and getattr(grad, "_smoothce_consumed", False):
        raise RuntimeError(SECOND_BACKWARD.format(name="smoothce"))
    out = registry.select(grad.device).scale_grad(grad, grad_out, factor, per_row, inplace)
    if inplace:
        grad._smoothce_consumed = True
    return out


def _scale_kept_fake(grad, grad_out, factor, per_row, inplace):
    return torch.empty_like(grad)


# Backward as an op, for traced backward passes (torch.compile): opaque to the compiler, so that
# dO x factor == 1 is still seen on the device and nothing is written. With ``inplace`` the result
# IS ``grad`` (the saved buffer, used by nothing after this backward), scaled where it lies.
scale_kept = define(
    "scale_kept(Tensor grad, Tensor grad_out, Tensor factor, bool per_row, bool inplace) -> Tensor",
    kernel=_scale_kept,
    fake=_scale_kept_fake,
)


def _scaled_by_torch_ops(grad, grad_out, factor, per_row):
    # torch.func transforms batch and differentiate plain torch ops: dO x factor x grad, rounded once.
    scale = grad_out * factor
    return (grad.to(scale.dtype) * (scale.unsqueeze(-1) if per_row else scale)).to(grad.dtype)


def register_kept_gradient_autograd(
    op, name: str, *, reduction_arg: int, compute_grad_arg, grad_inputs=(0,), recompute=None, vmap=None
):
    """Register the kept gradient's autograd for ``op`` and return it as an autograd.Function.

    ``op`` returns ``(loss, *kept[, factor])``, ``kept[i]`` the gradient of input ``grad_inputs[i]``
    (an empty tensor where it was not computed) and ``factor`` a 0-d tensor (1 when absent).
    ``compute_grad_arg``, an index or one per kept gradient, locates the op's bool arguments that
    say which of them the forward computed; asking backward for another is an error.
    ``recompute(saved_inputs, grad_out, wanted)`` is backward for "none" where the kept gradients
    cannot take dO per row (the fused linear loss): it gets the inputs, saved instead of the kept
    gradients. ``name`` is what errors call the op. The returned Function is what ``torch.func``
    transforms apply, batched by ``vmap(info, in_dims, *args)`` where given (also registered as the
    op's own vmap rule); the op's autograd uses the same pair through ``torch.library.register_autograd``.
    """
    n_kept = len(grad_inputs)
    flags = (compute_grad_arg,) if isinstance(compute_grad_arg, int) else tuple(compute_grad_arg)
    n_inputs = len(op._schema.arguments)

    def _setup_context(ctx, inputs, output):
        kept = output[1 : 1 + n_kept]
        factor = output[1 + n_kept] if len(output) > 1 + n_kept else None
        ctx.reduction = inputs[reduction_arg]
        ctx.computed = tuple(inputs[i] for i in flags)
        ctx.inplace = inplace_allowed()
        ctx.consumed = False
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else autograd builds zero tensors for the kept outputs' grads
        ctx.recomputing = recompute is not None and ctx.reduction == "none"
        if ctx.recomputing:
            ctx.inputs = inputs
            ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))
            return
        if factor is None:
            factor = torch.ones((), dtype=output[0].dtype, device=output[0].device)
        ctx.save_for_backward(*kept, factor)

    def _backward(ctx, grad_out, *_unused):
        grads = [None] * n_inputs
        if grad_out is None:
            return tuple(grads)
        wanted = [ctx.needs_input_grad[i] for i in grad_inputs]
        for i, want, have in zip(grad_inputs, wanted, ctx.computed, strict=True):
            if want and not have:
                raise RuntimeError(
                    f"{name}: no gradient for input {i} was kept because it did not require grad "
                    "(or grad mode was off) in the forward pass"
                )
        if ctx.recomputing:
            # The saved inputs in their order, with None where an input was None or not a tensor.
            saved = iter(ctx.saved_tensors)
            inputs = [next(saved) if isinstance(t, torch.Tensor) else t for t in ctx.inputs]
            for i, g in zip(grad_inputs, recompute(inputs, grad_out, wanted), strict=True):
                grads[i] = g
            return tuple(grads)
        if ctx.consumed:  # checked before unpacking, whose version check would say less
            raise RuntimeError(SECOND_BACKWARD.format(name=name))
        *kept, factor = ctx.saved_tensors
        per_row = ctx.reduction == "none"
        transformed = torch._C._are_functorch_transforms_active()
        traced = transformed or any(type(t) is not torch.Tensor for t in (*kept, grad_out))  # torch.compile
        if not traced and torch.is_grad_enabled():
            raise RuntimeError(f"{name} does not support double backward (create_graph=True)")
        for i, want, grad in zip(grad_inputs, wanted, kept, strict=True):
            if not want:
                continue
            if transformed:
                grads[i] = _scaled_by_torch_ops(grad, grad_out, factor, per_row)
            elif traced:
                grads[i] = scale_kept(grad, grad_out, factor, per_row, ctx.inplace)
            else:  # the same kernel, called directly: eager pays no dispatch
                grads[i] = _scale_kept(grad, grad_out, factor, per_row, ctx.inplace)
        ctx.consumed = ctx.inplace and not transformed
        return tuple(grads)

    torch.library.register_autograd(op, _backward, setup_context=_setup_context)

    class KeptGradient(torch.autograd.Function):
        """``op`` with its autograd, applied above the dispatcher where torch.func's transforms see it."""

        @staticmethod
        def forward(*args):
            return op(*args)  # grad mode is off here: the op's autograd records nothing

        setup_context = staticmethod(_setup_context)
        backward = staticmethod(_backward)

    KeptGradient.__name__ = KeptGradient.__qualname__ = f"KeptGradient_{op.name().split('::')[1]}"
    # Function.apply binds the arguments with inspect.signature(forward) on every call; a cached
    # signature makes that a lookup (a tenth of a tiny call's time otherwise).
    KeptGradient.forward.__signature__ = inspect.signature(KeptGradient.forward)
    if vmap is not None:
        KeptGradient.vmap = staticmethod(vmap)
        torch.library.register_vmap(op, vmap)  # torch.func.vmap of a call that keeps no gradient
    return KeptGradient
