"""The nn.Module forms: ``smoothce.CrossEntropyLoss`` and ``smoothce.LinearCrossEntropyLoss``."""

from __future__ import annotations

import torch

from smoothce.checks import check_option_values, option_values
from smoothce.functional import cross_entropy
from smoothce.linear import linear_cross_entropy


class _LossOptions(torch.nn.Module):
    """The options both losses take, checked when the module is built by the rules every entry
    point shares (smoothce/checks.py), and kept as a plain float, int and str."""

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
        check_option_values(label_smoothing, reduction)
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction

    def options(self) -> dict:
        return {"label_smoothing": self.label_smoothing, "ignore_index": self.ignore_index, "reduction": self.reduction}

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class CrossEntropyLoss(_LossOptions):
    """Label-smoothed cross-entropy, like ``torch.nn.CrossEntropyLoss`` with class-index targets.

    Inputs: logits (..., V) with the class dimension last, target (...) of int64/int32, and
    optionally ``normalizer`` ("mean" only: what the summed loss is divided by).
    """

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, normalizer: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        return cross_entropy(logits, target, normalizer=normalizer, **self.options())


class LinearCrossEntropyLoss(_LossOptions):
    """The LM head's loss without its logits: ``smoothce.linear_cross_entropy`` as an nn.Module.

    Called as ``loss_fn(hidden, weight, target, bias=None)``: hidden (..., D), weight (V, D)
    in nn.Linear's layout (pass ``lm_head.weight`` as it is), bias (V,) or None, target (...).
    Same result as ``CrossEntropyLoss(...)(F.linear(hidden, weight, bias), target)``.
    """

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, target, bias=bias, **self.options())
