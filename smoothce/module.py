"""The nn.Module forms: ``smoothce.CrossEntropyLoss`` and ``smoothce.LinearCrossEntropyLoss``."""

from __future__ import annotations

import torch

from smoothce.checks import check_option_values, check_weight_given, option_values, recipe_values
from smoothce.functional import cross_entropy
from smoothce.linear import linear_cross_entropy


class _LossOptions(torch.nn.Module):
    """The options both losses take, checked when the module is built by the rules every entry
    point shares (smoothce/checks.py), and kept as a plain float, int and str; the class weights,
    under ``weight_name``, as a buffer (it follows ``.to()`` and the state dict, as in PyTorch)."""

    def __init__(
        self,
        weight_name: str,
        weight: torch.Tensor | None,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__()
        label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
        check_option_values(label_smoothing, reduction)
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.z_loss, self.softcap = recipe_values(z_loss, softcap)
        check_weight_given(weight, weight_name)
        self.register_buffer(weight_name, weight)

    def options(self) -> dict:
        return {
            "label_smoothing": self.label_smoothing,
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
            "z_loss": self.z_loss,
            "softcap": self.softcap,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options().items())


class CrossEntropyLoss(_LossOptions):
    """Label-smoothed cross-entropy, like ``torch.nn.CrossEntropyLoss`` with class-index targets.

    ``weight`` (V,): class weights, kept as a buffer; ``z_loss`` and ``softcap``:
    ``smoothce.cross_entropy``'s. Inputs: logits (..., V) with the class dimension last, target (...)
    of int64/int32, and optionally ``normalizer`` ("mean" only: what the summed loss is divided by).
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__("weight", weight, label_smoothing, ignore_index, reduction, z_loss, softcap)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, normalizer: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        return cross_entropy(logits, target, self.weight, normalizer=normalizer, **self.options())


class LinearCrossEntropyLoss(_LossOptions):
    """The LM head's loss without its logits: ``smoothce.linear_cross_entropy`` as an nn.Module.

    Called as ``loss_fn(hidden, weight, target, bias=None)``: hidden (..., D), weight (V, D)
    in nn.Linear's layout (pass ``lm_head.weight`` as it is), bias (V,) or None, target (...).
    Same result as ``CrossEntropyLoss(class_weight, ...)(F.linear(hidden, weight, bias), target)``.
    ``class_weight`` (V,), the class weights (``CrossEntropyLoss``'s ``weight``: here ``weight`` is
    the LM head's), is kept as a buffer; ``z_loss`` and ``softcap``: ``smoothce.linear_cross_entropy``'s.
    """

    def __init__(
        self,
        class_weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
    ):
        super().__init__("class_weight", class_weight, label_smoothing, ignore_index, reduction, z_loss, softcap)

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, target, bias=bias, class_weight=self.class_weight, **self.options())
