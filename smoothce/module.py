"""``smoothce.CrossEntropyLoss``: the nn.Module form of ``smoothce.cross_entropy``."""

from __future__ import annotations

import torch

from smoothce._ops import check_arguments
from smoothce.functional import cross_entropy


class CrossEntropyLoss(torch.nn.Module):
    """Label-smoothed cross-entropy, like ``torch.nn.CrossEntropyLoss`` with class-index targets.

    Inputs: logits (..., V) with the class dimension last, target (...) of int64/int32.
    The options are checked here, when the module is built.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        probe = torch.empty(1, 1, device="meta")
        check_arguments(probe, torch.empty(1, dtype=torch.int64, device="meta"),
                        label_smoothing, ignore_index, reduction)
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            logits,
            target,
            label_smoothing=self.label_smoothing,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}"
        )
