"""The public function: ``smoothce.cross_entropy``, a thin wrapper over the registered op."""

from __future__ import annotations

import torch

from smoothce import dtensor
from smoothce._ops import cross_entropy_impl
from smoothce.checks import check_normalizer, check_tensors_given, normalizer_tensor, option_values
from smoothce.dtensor import is_dtensor


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Label-smoothed cross-entropy of ``logits`` (..., V) against class indices ``target`` (...).

    For a row z with target k and smoothing lam: loss = logsumexp(z) - (1 - lam) z_k
    - (lam / V) sum_j z_j. Rows with ``target == ignore_index`` contribute nothing.
    ``reduction``: "none" gives shape (...), "sum" and "mean" a scalar; "mean" divides by
    the number of non-ignored targets and is 0.0 (gradient zero) when there are none.
    A DTensor ``logits`` sharded on the class dimension takes the vocabulary-parallel loss on its
    mesh (``smoothce.dtensor``). ``normalizer`` (only with "mean"): a number or a one-element tensor on any device, read
    without a host sync; the summed loss is divided by it instead of the count (the tokens of a
    whole accumulation window, say), so that ``loss.backward()`` stays free. The result is float32
    (float64 for float64 logits); the gradient, computed in this forward pass and kept, has the
    logits' dtype.
    """
    # What the op's schema would coerce unseen (bool, numpy scalars, ints beyond int64) or reject
    # with a RuntimeError; the op checks everything else, once (smoothce/checks.py).
    check_tensors_given(logits, target)
    label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
    if is_dtensor(logits):  # the classes sharded over a device mesh: the vocabulary-parallel loss
        return dtensor.cross_entropy(
            logits,
            target,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
            normalizer=normalizer,
        )
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vmap, ...): the op's body in Python, so that its autograd.Function is
        # applied where the transforms see it; inside the dispatcher they cannot.
        return cross_entropy_impl(logits, target, label_smoothing, ignore_index, reduction, normalizer)
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        check_normalizer(normalizer, reduction)  # a number's value: the schema takes a tensor
        normalizer = normalizer_tensor(normalizer, logits)
    return torch.ops.smoothce.cross_entropy(
        logits,
        target,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
    )
