"""smoothce's cross-entropy as registered ops: the public ops, and the forward that keeps the gradient.

``smoothce::cross_entropy`` and ``smoothce::cross_entropy_lse`` (public, composite; the second also
returns the log-sum-exp per row) check their arguments, flatten to 2-D and call
``smoothce::cross_entropy_fwd`` (or ``cross_entropy_recipe_fwd`` with an option on), which returns
``(loss, kept gradient, factor[, lse])`` from the registry's backend; backward is the kept
gradient's autograd (``smoothce/_autograd.py``).
"""

from __future__ import annotations

import torch

from smoothce import registry
from smoothce._autograd import register_kept_gradient_autograd
from smoothce._library import define
from smoothce.backends.base import Recipe, wants_recipe
from smoothce.checks import check_arguments, check_normalizer, check_weight, normalizer_tensor, recipe_values
from smoothce.numerics import kept_factors, loss_dtype, reduce_rows, weighted_count


def cross_entropy_impl(
    logits,
    target,
    weight=None,
    label_smoothing=0.0,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    """The public ops' body: the loss, or ``(loss, lse)`` with ``return_lse``; ``smoothce.cross_entropy``
    calls it directly under torch.func transforms."""
    target = check_arguments(logits, target, label_smoothing, ignore_index, reduction)  # every rule, once
    check_normalizer(normalizer, reduction)
    check_weight(weight, logits)
    z_loss, softcap = recipe_values(z_loss, softcap, return_lse)
    normalizer = normalizer_tensor(normalizer, logits)
    if weight is not None:
        weight = weight.to(loss_dtype(logits.dtype)).contiguous()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    # Every option off: the plain forward, whose short schema keeps a small call's overhead as it was.
    plain = not wants_recipe(Recipe(weight, z_loss, softcap), return_lse)
    # Under torch.func the autograd.Function is applied here, above the dispatcher, where the
    # transforms see it; elsewhere the op's registered autograd records the same pair.
    if torch._C._are_functorch_transforms_active():
        forward = (_KeptCrossEntropy if plain else _KeptRecipeCrossEntropy).apply
    else:
        forward = cross_entropy_fwd if plain else cross_entropy_recipe_fwd
    args = (float(label_smoothing), ignore_index, reduction, compute_grad, normalizer)
    if not plain:
        args += (weight, z_loss, softcap, return_lse)
    if logits.dim() == 2:  # as it is: a reshape would still cost a view and its backward node
        out = forward(logits, target, *args)
        loss = out[0]
    else:
        out = forward(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), *args)
        loss = out[0].reshape(target.shape) if reduction == "none" else out[0]
    return (loss, out[3].reshape(target.shape)) if return_lse else loss


def _cross_entropy(logits, target, weight=None, **options):
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "smoothce::cross_entropy: torch.func transforms (grad, vmap, ...) cannot reach this op's autograd "
            "from inside the dispatcher; call smoothce.cross_entropy(...) instead, which supports them"
        )
    return cross_entropy_impl(logits, target, weight, **options)


def _cross_entropy_lse(logits, target, weight=None, **options):
    return _cross_entropy(logits, target, weight, **options, return_lse=True)


# The public ops, keyword-only options as callers outside this repo use them. Their schema converts
# them first (numpy scalars, 0-d tensors, and a bool too); the Python entry points check them before.
_PUBLIC_ARGUMENTS = (
    "(Tensor logits, Tensor target, Tensor? weight=None, *, float label_smoothing=0.0, int ignore_index=-100, "
    'str reduction="mean", Tensor? normalizer=None, float z_loss=0.0, float? softcap=None)'
)
cross_entropy = define(f"cross_entropy{_PUBLIC_ARGUMENTS} -> Tensor", composite=_cross_entropy)
# The same with the capped logits' log-sum-exp per row, (...) float32 (float64), no gradient.
cross_entropy_lse = define(f"cross_entropy_lse{_PUBLIC_ARGUMENTS} -> (Tensor, Tensor)", composite=_cross_entropy_lse)


def _forward(logits, target, label_smoothing, ignore_index, reduction, compute_grad, normalizer=None):
    """``cross_entropy_fwd``: ``_recipe_forward`` with every option off, without its lse."""
    extra = {} if normalizer is None else {"normalizer": normalizer}  # backends written before it still work
    return _loss_and_grad(logits, target, label_smoothing, ignore_index, reduction, compute_grad, extra)


def _recipe_forward(
    logits,
    target,
    label_smoothing,
    ignore_index,
    reduction,
    compute_grad,
    normalizer=None,
    weight=None,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    """Loss of 2-D ``logits`` (N, V) against ``target`` (N,), its kept gradient, backward's factor and lse.

    loss: (N,) for "none", 0-d for "sum"/"mean", in ``loss_dtype``; "mean" divides by ``normalizer``
    (0-d, on the logits' device) where given, else by the non-ignored rows' weights (their count
    without ``weight``; none: 0, not NaN).
    grad: (N, V) in the logits' dtype, grad_scale x d loss / d logits (``smoothce.numerics``), or
    an empty tensor when ``compute_grad`` is False (then no gradient work is done at all).
    factor: 0-d, what backward multiplies dO by.
    lse: (N,) in ``loss_dtype``, the capped logits' log-sum-exp per row, where ``return_lse``; else empty.
    ``weight`` (V,) in ``loss_dtype``, ``z_loss`` and ``softcap``: ``smoothce.backends.base.Recipe``.
    """
    lse = torch.empty(logits.shape[0] if return_lse else 0, dtype=loss_dtype(logits.dtype), device=logits.device)
    if weight is not None and reduction == "mean" and normalizer is None:
        normalizer = weighted_count(weight, target, ignore_index)  # PyTorch's weighted mean
    # Only what is on is passed: backends written before an option still serve the rest.
    extra = {} if normalizer is None else {"normalizer": normalizer}
    recipe = Recipe(weight, z_loss, softcap)
    if wants_recipe(recipe, return_lse):
        extra.update(recipe=recipe, lse=lse if return_lse else None)
    return (*_loss_and_grad(logits, target, label_smoothing, ignore_index, reduction, compute_grad, extra), lse)


def _loss_and_grad(logits, target, label_smoothing, ignore_index, reduction, compute_grad, extra):
    """(loss, kept gradient or an empty tensor, factor) from the backend; no rows need no backend."""
    if logits.shape[0] == 0:
        acc = loss_dtype(logits.dtype)
        loss = logits.new_zeros((0,) if reduction == "none" else (), dtype=acc)
        grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
        return loss, grad, logits.new_ones((), dtype=acc)
    backend = registry.select(logits.device)
    loss, grad, factor = backend.loss_and_grad(
        logits, target.contiguous(), label_smoothing, ignore_index, reduction, compute_grad, **extra
    )
    return loss, (logits.new_empty(0) if grad is None else grad), factor


def _forward_fake(logits, target, label_smoothing, ignore_index, reduction, compute_grad, normalizer=None):
    return _recipe_forward_fake(logits, target, label_smoothing, ignore_index, reduction, compute_grad)[:3]


def _recipe_forward_fake(
    logits,
    target,
    label_smoothing,
    ignore_index,
    reduction,
    compute_grad,
    normalizer=None,
    weight=None,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    torch._check(logits.dim() == 2, lambda: f"cross_entropy_fwd expects 2-D logits, got {logits.dim()}-D")
    torch._check(target.dim() == 1, lambda: f"cross_entropy_fwd expects 1-D target, got {target.dim()}-D")
    torch._check(target.shape[0] == logits.shape[0], lambda: "target and logits disagree on the rows")
    dtype = loss_dtype(logits.dtype)
    loss = logits.new_empty(logits.shape[:1] if reduction == "none" else (), dtype=dtype)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    lse = logits.new_empty(logits.shape[0] if return_lse else 0, dtype=dtype)
    return loss, grad, logits.new_empty((), dtype=dtype), lse


_FWD_ARGUMENTS = (
    "Tensor logits, Tensor target, float label_smoothing, int ignore_index, str reduction, bool compute_grad, "
    "Tensor? normalizer=None"
)
cross_entropy_fwd = define(
    f"cross_entropy_fwd({_FWD_ARGUMENTS}) -> (Tensor, Tensor, Tensor)", kernel=_forward, fake=_forward_fake
)
# The same with the recipe options and the lse as a fourth output (empty without ``return_lse``).
cross_entropy_recipe_fwd = define(
    f"cross_entropy_recipe_fwd({_FWD_ARGUMENTS}, Tensor? weight=None, float z_loss=0.0, float? softcap=None, "
    "bool return_lse=False) -> (Tensor, Tensor, Tensor, Tensor)",
    kernel=_recipe_forward,
    fake=_recipe_forward_fake,
)


def _vmap(info, in_dims, logits, target, label_smoothing, ignore_index, reduction, compute_grad, *recipe_args):
    """vmap of both forwards: the stacked rows as one "none" call, then each sample's reduction.

    "mean" divides each sample's sum, and its factor, by its own count (its weighted count, or the
    normalizer), so the kept gradient stays as the "none" call made it.
    """
    recipe = len(recipe_args) > 1  # cross_entropy_recipe_fwd's arguments (defaults are passed too)
    normalizer, weight, z_loss, softcap, return_lse = recipe_args + (None, None, 0.0, None, False)[len(recipe_args) :]
    if any(dim is not None for dim in in_dims[2:]):
        raise ValueError("smoothce: vmap over the options (label_smoothing, normalizer, weight, ...) is not supported")
    batch = info.batch_size
    logits = logits.movedim(in_dims[0], 0) if in_dims[0] is not None else logits.expand(batch, *logits.shape)
    target = target.movedim(in_dims[1], 0) if in_dims[1] is not None else target.expand(batch, *target.shape)
    n_rows, num_classes = logits.shape[1], logits.shape[2]
    loss, grad, factor, lse = cross_entropy_recipe_fwd(
        logits.reshape(-1, num_classes),
        target.reshape(-1),
        label_smoothing,
        ignore_index,
        "none",
        compute_grad,
        None,
        weight,
        z_loss,
        softcap,
        return_lse,
    )
    loss = loss.reshape(batch, n_rows)
    grad = grad.reshape(batch, n_rows, num_classes) if compute_grad else grad
    lse = lse.reshape(batch, n_rows) if return_lse else lse
    factor = factor.expand(batch).clone()
    count = None
    if reduction == "mean":  # per sample: its own (weighted) count of non-ignored targets, or the normalizer
        if normalizer is not None:
            count = normalizer
        elif weight is not None:
            count = weighted_count(weight, target, ignore_index)
        else:
            count = (target != ignore_index).sum(1).clamp_min(1).to(loss.dtype)
        factor = factor * kept_factors(count, loss.dtype)[0]  # 1 / count (0 for an empty count)
    loss = reduce_rows(loss, count, reduction)
    dims = (0, 0 if compute_grad else None, 0, 0 if return_lse else None)
    return ((loss, grad, factor, lse), dims) if recipe else ((loss, grad, factor), dims[:3])


_KeptCrossEntropy = register_kept_gradient_autograd(
    cross_entropy_fwd, "smoothce.cross_entropy", reduction_arg=4, compute_grad_arg=5, vmap=_vmap
)
_KeptRecipeCrossEntropy = register_kept_gradient_autograd(
    cross_entropy_recipe_fwd, "smoothce.cross_entropy", reduction_arg=4, compute_grad_arg=5, vmap=_vmap
)
