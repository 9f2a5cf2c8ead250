"""smoothce's cross-entropy as registered ops: the public op, and the forward that keeps the gradient.

``smoothce::cross_entropy`` (public, composite) checks its arguments, flattens to 2-D and calls
``smoothce::cross_entropy_fwd``, which returns ``(loss, kept gradient, factor)`` from the registry's
backend; backward is the kept gradient's autograd (``smoothce/_autograd.py``).
"""

from __future__ import annotations

import torch

from smoothce import registry
from smoothce._autograd import register_kept_gradient_autograd
from smoothce._library import define
from smoothce.checks import check_arguments, check_normalizer, normalizer_tensor
from smoothce.numerics import kept_factors, loss_dtype, reduce_rows


def cross_entropy_impl(logits, target, label_smoothing=0.0, ignore_index=-100, reduction="mean", normalizer=None):
    """The public op's body; ``smoothce.cross_entropy`` calls it directly under torch.func transforms."""
    target = check_arguments(logits, target, label_smoothing, ignore_index, reduction)  # every rule, once
    check_normalizer(normalizer, reduction)
    normalizer = normalizer_tensor(normalizer, logits)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    # Under torch.func the autograd.Function is applied here, above the dispatcher, where the
    # transforms see it; elsewhere the op's registered autograd records the same pair.
    forward = _KeptCrossEntropy.apply if torch._C._are_functorch_transforms_active() else cross_entropy_fwd
    options = (float(label_smoothing), ignore_index, reduction, compute_grad, normalizer)
    if logits.dim() == 2:  # as it is: a reshape would still cost a view and its backward node
        return forward(logits, target, *options)[0]
    loss = forward(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), *options)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss


def _cross_entropy(logits, target, *, label_smoothing=0.0, ignore_index=-100, reduction="mean", normalizer=None):
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "smoothce::cross_entropy: torch.func transforms (grad, vmap, ...) cannot reach this op's autograd "
            "from inside the dispatcher; call smoothce.cross_entropy(...) instead, which supports them"
        )
    return cross_entropy_impl(logits, target, label_smoothing, ignore_index, reduction, normalizer)


# The public op, keyword-only options as callers outside this repo use them. Its schema converts
# them first (numpy scalars, 0-d tensors, and a bool too); the Python entry points check them before.
cross_entropy = define(
    "cross_entropy(Tensor logits, Tensor target, *, float label_smoothing=0.0, int ignore_index=-100, "
    'str reduction="mean", Tensor? normalizer=None) -> Tensor',
    composite=_cross_entropy,
)


def _forward(logits, target, label_smoothing, ignore_index, reduction, compute_grad, normalizer=None):
    """Loss of 2-D ``logits`` (N, V) against ``target`` (N,), its kept gradient, and backward's factor.

    loss: (N,) for "none", 0-d for "sum"/"mean", in ``loss_dtype``; "mean" divides by ``normalizer``
    (0-d, on the logits' device) where given, else by the non-ignored rows (none: 0, not NaN).
    grad: (N, V) in the logits' dtype, grad_scale x d loss / d logits (``smoothce.numerics``), or
    an empty tensor when ``compute_grad`` is False (then no gradient work is done at all).
    factor: 0-d, what backward multiplies dO by.
    """
    if logits.shape[0] == 0:
        acc = loss_dtype(logits.dtype)
        loss = logits.new_zeros((0,) if reduction == "none" else (), dtype=acc)
        grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
        return loss, grad, logits.new_ones((), dtype=acc)
    backend = registry.select(logits.device)
    extra = {} if normalizer is None else {"normalizer": normalizer}  # backends written before it still work
    loss, grad, factor = backend.loss_and_grad(
        logits, target.contiguous(), label_smoothing, ignore_index, reduction, compute_grad, **extra
    )
    return loss, (logits.new_empty(0) if grad is None else grad), factor


def _forward_fake(logits, target, label_smoothing, ignore_index, reduction, compute_grad, normalizer=None):
    torch._check(logits.dim() == 2, lambda: f"cross_entropy_fwd expects 2-D logits, got {logits.dim()}-D")
    torch._check(target.dim() == 1, lambda: f"cross_entropy_fwd expects 1-D target, got {target.dim()}-D")
    torch._check(target.shape[0] == logits.shape[0], lambda: "target and logits disagree on the rows")
    dtype = loss_dtype(logits.dtype)
    loss = logits.new_empty(logits.shape[:1] if reduction == "none" else (), dtype=dtype)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad, logits.new_empty((), dtype=dtype)


cross_entropy_fwd = define(
    "cross_entropy_fwd(Tensor logits, Tensor target, float label_smoothing, int ignore_index, str reduction, "
    "bool compute_grad, Tensor? normalizer=None) -> (Tensor, Tensor, Tensor)",
    kernel=_forward,
    fake=_forward_fake,
)


def _vmap(info, in_dims, logits, target, label_smoothing, ignore_index, reduction, compute_grad, normalizer=None):
    """vmap of ``cross_entropy_fwd``: the stacked rows as one "none" call, then each sample's reduction.

    "mean" divides each sample's sum, and its factor, by its own count (or the normalizer), so the
    kept gradient stays as the "none" call made it.
    """
    if any(dim is not None for dim in in_dims[2:]):
        raise ValueError("smoothce: vmap over the options (label_smoothing, normalizer, ...) is not supported")
    batch = info.batch_size
    logits = logits.movedim(in_dims[0], 0) if in_dims[0] is not None else logits.expand(batch, *logits.shape)
    target = target.movedim(in_dims[1], 0) if in_dims[1] is not None else target.expand(batch, *target.shape)
    n_rows, num_classes = logits.shape[1], logits.shape[2]
    loss, grad, factor = cross_entropy_fwd(
        logits.reshape(-1, num_classes), target.reshape(-1), label_smoothing, ignore_index, "none", compute_grad
    )
    loss = loss.reshape(batch, n_rows)
    grad = grad.reshape(batch, n_rows, num_classes) if compute_grad else grad
    factor = factor.expand(batch).clone()
    count = None
    if reduction == "mean":  # per sample: its own count of non-ignored targets, or the normalizer
        count = (target != ignore_index).sum(1).clamp_min(1).to(loss.dtype) if normalizer is None else normalizer
        factor = factor * kept_factors(count, loss.dtype)[0]  # 1 / count (0 for an empty normalizer)
    loss = reduce_rows(loss, count, reduction)
    return (loss, grad, factor), (0, 0 if compute_grad else None, 0)


_KeptCrossEntropy = register_kept_gradient_autograd(
    cross_entropy_fwd, "smoothce.cross_entropy", reduction_arg=4, compute_grad_arg=5, vmap=_vmap
)
