"""The public function: ``smoothce.cross_entropy``, a thin wrapper over the registered ops."""

from __future__ import annotations

import torch

from smoothce import dtensor
from smoothce._ops import cross_entropy_impl
from smoothce.checks import (
    check_normalizer,
    check_tensors_given,
    check_weight_given,
    normalizer_tensor,
    option_values,
    recipe_values,
)
from smoothce.dtensor import is_dtensor


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    z_loss: float = 0,  # an int: torch.compile would make a float default a symbolic input, then retrace
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed cross-entropy of ``logits`` (..., V) against class indices ``target`` (...).

    For a row z with target k and smoothing lam: loss = logsumexp(z) - (1 - lam) z_k
    - (lam / V) sum_j z_j. Rows with ``target == ignore_index`` contribute nothing.
    ``reduction``: "none" gives shape (...), "sum" and "mean" a scalar; "mean" divides by
    the number of non-ignored targets and is 0.0 (gradient zero) when there are none.

    The recipe options, as in ``F.cross_entropy`` and the LM recipes that add to it:

    * ``weight`` (V,): class weights with PyTorch's meaning, (1 - lam) w_k (-log p_k) +
      (lam / V) sum_c w_c (-log p_c) per row, and "mean" divides by the sum of w_k over the counted
      rows (0 there: loss 0 and a zero gradient, where PyTorch gives NaN).
    * ``z_loss`` s: adds s lse^2 per counted row (times w_k with ``weight``), lse = logsumexp(z).
    * ``softcap`` c: the loss of the capped logits c tanh(z / c) (Gemma 2), applied first.
    * ``return_lse``: return ``(loss, lse)``, lse (...) the capped logits' log-sum-exp per row in the
      loss dtype, ignored rows too, with no gradient through it.

    A DTensor ``logits`` sharded on the class dimension takes the vocabulary-parallel loss on its
    mesh (``smoothce.dtensor``). ``normalizer`` (only with "mean"): a number or a one-element
    tensor on any device, read without a host sync; the summed loss is divided by it instead of the
    count (the tokens of a whole accumulation window, say), so that ``loss.backward()`` stays free.
    The result is float32 (float64 for float64 logits); the gradient, computed in this forward pass
    and kept, has the logits' dtype.
    """
    # What the op's schema would coerce unseen (bool, numpy scalars, ints beyond int64) or reject
    # with a RuntimeError; the op checks everything else, once (smoothce/checks.py).
    check_tensors_given(logits, target)
    check_weight_given(weight)
    label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
    z_loss, softcap = recipe_values(z_loss, softcap, return_lse)
    options = dict(label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)
    recipe = dict(z_loss=z_loss, softcap=softcap)
    if is_dtensor(logits):  # the classes sharded over a device mesh: the vocabulary-parallel loss
        return dtensor.cross_entropy(
            logits, target, weight, **options, normalizer=normalizer, **recipe, return_lse=return_lse
        )
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vmap, ...): the op's body in Python, so that its autograd.Function is
        # applied where the transforms see it; inside the dispatcher they cannot.
        return cross_entropy_impl(
            logits, target, weight, **options, normalizer=normalizer, **recipe, return_lse=return_lse
        )
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        check_normalizer(normalizer, reduction)  # a number's value: the schema takes a tensor
        normalizer = normalizer_tensor(normalizer, logits)
    op = torch.ops.smoothce.cross_entropy_lse if return_lse else torch.ops.smoothce.cross_entropy
    return op(logits, target, weight, **options, normalizer=normalizer, **recipe)
