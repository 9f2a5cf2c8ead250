"""The numeric policy every smoothce loss and backend follows: the loss's dtype and how a gradient is kept."""

from __future__ import annotations

import math

import torch

# float16 gradients are kept as 2**15 x 2**e / count x the gradient, 2**e <= count < 2**(e + 1): at
# most 32768 < 65504 in size, and entries down to 2**-24 / 2**15 keep full precision.
FLOAT16_KEPT_SCALE = 2.0**15


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss (and accumulation) dtype for logits of ``dtype``: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kept_gradient_scale(dtype: torch.dtype) -> tuple[float, bool]:
    """(scale, fold) of the kept gradient of ``dtype`` logits (what ``kept_factors`` computes from).

    fold True (bfloat16, float32, float64): the forward pass keeps 1/count x the gradient and
    backward multiplies by dO alone. fold False (float16): it keeps scale x 2**e / count x the
    gradient (2**e the largest power of two <= count; count = 1 but for "mean"), and backward
    multiplies by dO x 2**-(15 + e) in float32: a loss scale reaches the small entries before
    they are rounded to float16 for the last time, and where dO is a power of two (GradScaler's
    scale, or 1) that product is exact, so each entry is rounded once.
    """
    if dtype == torch.float16:
        return FLOAT16_KEPT_SCALE, False
    return 1.0, True


def kept_factors(denominator, dtype: torch.dtype):
    """(grad_scale, factor) for a loss divided by ``denominator``: a float, or a 0-d tensor.

    The kept gradient is grad_scale x d loss / d logits and backward multiplies it by dO x factor,
    so grad_scale x factor = 1 / denominator (the rule: ``kept_gradient_scale``); a denominator
    <= 0 (an empty normaliser) gives grad_scale 0, the gradient of a loss that is 0. Tensors stay
    on their device (no host sync); floats give floats.
    """
    scale, fold = kept_gradient_scale(dtype)
    if isinstance(denominator, torch.Tensor):
        positive = denominator > 0
        safe = torch.where(positive, denominator, 1.0)
        if fold:
            return torch.where(positive, 1.0 / safe, 0.0), torch.ones_like(safe)
        power = torch.ldexp(torch.full_like(safe, scale), torch.frexp(safe)[1] - 1)
        return torch.where(positive, power / safe, 0.0), 1.0 / power
    if not denominator > 0:
        return 0.0, 1.0
    if fold:
        return 1.0 / denominator, 1.0
    power = math.ldexp(scale, math.frexp(denominator)[1] - 1)
    return power / denominator, 1.0 / power


def loss_denominator(reduction: str, normalizer, target: torch.Tensor, ignore_index: int, dtype: torch.dtype):
    """What the summed loss is divided by, 0-d ``dtype`` on the target's device: 1 ("none", "sum"),
    the ``normalizer`` (a 0-d tensor there) for "mean" where one is given, else the non-ignored
    targets (at least 1: none counted gives loss 0, not NaN)."""
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=target.device)
    if normalizer is not None:
        return normalizer
    return (target != ignore_index).sum().clamp_min(1).to(dtype)


def weighted_count(weight: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """sum of w_k over the non-ignored targets k (the last dimension): "mean"'s denominator with class
    weights (PyTorch's), in ``weight``'s dtype on its device, without a host sync. A target out of
    range is read as class 0 here; the backends report it."""
    valid = target != ignore_index
    k = torch.where(valid, target.long(), 0).clamp_(0, weight.shape[0] - 1)
    return torch.where(valid, weight[k], 0.0).sum(-1)


def reduce_rows(rows: torch.Tensor, denominator: torch.Tensor, reduction: str) -> torch.Tensor:
    """The rows' losses (last dimension) reduced: as they are, summed, or summed / ``denominator``
    ("mean"; 0 where the denominator is <= 0, an empty normaliser)."""
    if reduction == "none":
        return rows
    total = rows.sum(-1)
    if reduction == "sum":
        return total
    positive = denominator > 0
    return torch.where(positive, total / torch.where(positive, denominator, 1.0), 0.0)
