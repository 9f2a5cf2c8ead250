"""The public function: ``smoothce.cross_entropy``, a thin wrapper over the registered op."""

from __future__ import annotations

import torch

from smoothce.checks import check_tensors_given, option_values


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Label-smoothed cross-entropy of ``logits`` (..., V) against class indices ``target`` (...).

    For a row z with target k and smoothing lam: loss = logsumexp(z) - (1 - lam) z_k
    - (lam / V) sum_j z_j. Rows with ``target == ignore_index`` contribute nothing.
    ``reduction``: "none" gives shape (...), "sum" and "mean" a scalar; "mean" divides by
    the number of non-ignored targets and is 0.0 (gradient zero) when there are none.
    The result is float32 (float64 for float64 logits); the gradient, computed in this
    forward pass and kept, has the logits' dtype.
    """
    # What the op's schema would coerce unseen (bool, numpy scalars, ints beyond int64) or reject
    # with a RuntimeError; the op checks everything else, once (smoothce/checks.py).
    check_tensors_given(logits, target)
    label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vmap, ...): the op's body in Python, so that its autograd.Function is
        # applied where the transforms see it; inside the dispatcher they cannot.
        from smoothce._ops import _cross_entropy as op
    else:
        op = torch.ops.smoothce.cross_entropy
    return op(logits, target, label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)
