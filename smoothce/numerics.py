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
    """(grad_scale, factor) for a loss divided by ``denominator`` (>= 1): a float, or a 0-d tensor.

    The kept gradient is grad_scale x d loss / d logits and backward multiplies it by dO x factor,
    so grad_scale x factor = 1 / denominator (the rule: ``kept_gradient_scale``). Tensors stay on
    their device (no host sync); floats give floats.
    """
    scale, fold = kept_gradient_scale(dtype)
    if fold:
        return 1.0 / denominator, (torch.ones_like(denominator) if isinstance(denominator, torch.Tensor) else 1.0)
    if isinstance(denominator, torch.Tensor):
        power = torch.ldexp(torch.full_like(denominator, scale), torch.frexp(denominator)[1] - 1)
    else:
        power = math.ldexp(scale, math.frexp(denominator)[1] - 1)
    return power / denominator, 1.0 / power
