"""The default implementations of ``Backend``'s methods in plain torch ops, for every device.

``Backend`` calls these where a backend does not fuse the work itself, so a third party's
backend that implements only ``forward`` gets the op's forward, backward and the
vocabulary-parallel halves from them. The math is the contract's, stated in ``base``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from smoothce.numerics import kept_factors, loss_denominator, loss_dtype, reduce_rows

# Elements of one block of rows in the shard functions: 1M on CPU (4 MiB of fp32 scratch, which
# stays in cache), 16M elsewhere (64 MiB).
SHARD_BLOCK_ELEMENTS = {"cpu": 1 << 20}
SHARD_BLOCK_ELEMENTS_DEFAULT = 1 << 24


def loss_and_grad(
    forward: Callable[..., torch.Tensor],
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    compute_grad: bool,
    normalizer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``Backend.loss_and_grad`` from a backend's ``forward``: the factors, one ``forward`` call, a torch reduction."""
    denominator = loss_denominator(reduction, normalizer, target, ignore_index, loss_dtype(logits.dtype))
    grad_scale, factor = kept_factors(denominator, logits.dtype)
    grad = torch.empty_like(logits) if compute_grad else None
    rows = forward(logits, target, label_smoothing, ignore_index, grad, grad_scale)
    return reduce_rows(rows, denominator, reduction), grad, factor


def scale_grad(
    grad: torch.Tensor, grad_out: torch.Tensor, factor: torch.Tensor, per_row: bool, inplace: bool
) -> torch.Tensor:
    """``Backend.scale_grad``: dO x ``factor`` x ``grad`` in float32 (float64), rounded once."""
    if not per_row and inplace and grad.device.type == "cpu" and grad_out.item() * factor.item() == 1.0:
        return grad  # (exactly 1 in float64 is exactly 1 in float32)
    # Per row (N, 1); else shape (1,), not 0-d: a 0-d multiplier would be rounded to the
    # gradient's (half) dtype first, and 2**-15 / count can underflow float16; this way the
    # product is taken in float32 and rounded once into the result.
    scale = grad_out * factor
    scale = scale.unsqueeze(-1) if per_row else scale.reshape(1)
    if inplace:
        return grad.mul_(scale)
    return torch.mul(grad, scale, out=torch.empty_like(grad))


def shard_stats(
    logits: torch.Tensor, target: torch.Tensor, start: int | torch.Tensor, label_smoothing: float, ignore_index: int
) -> torch.Tensor:
    """``Backend.shard_stats``: the (4, N) rows m, R, t, z_k, block of rows by block of rows."""
    n_rows, local_classes = logits.shape
    acc = loss_dtype(logits.dtype)
    stats = torch.zeros(4, n_rows, dtype=acc, device=logits.device)
    if n_rows == 0:
        return stats
    logits = logits.detach()
    k, owned = local_target(target, start, local_classes, ignore_index)
    z_k = logits.gather(1, k.unsqueeze(1)).squeeze(1).to(acc)
    stats[3] = torch.where(owned, z_k, 0.0)
    for lo, hi in row_blocks(n_rows, local_classes, logits.device):
        x = logits[lo:hi].to(acc)
        m, first = x.max(dim=1, keepdim=True)  # a (the first) column holding the max
        shift = torch.where(torch.isfinite(m), m, 0.0)
        x = x - shift
        if label_smoothing > 0.0:
            stats[2, lo:hi] = x.sum(dim=1)
        e = x.exp_()
        e.scatter_(1, first, 0.0)
        stats[0, lo:hi] = m.squeeze(1)
        stats[1, lo:hi] = e.sum(dim=1)
    return stats


def shard_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    start: int | torch.Tensor,
    num_classes: int | torch.Tensor,
    row_max: torch.Tensor,
    excess: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    grad_scale: torch.Tensor,
    grad: torch.Tensor,
) -> None:
    """``Backend.shard_grad``: the slice's gradient from the row's global max and excess, written into ``grad``."""
    n_rows, local_classes = logits.shape
    if n_rows == 0:
        return
    acc = loss_dtype(logits.dtype)
    logits = logits.detach()
    lam = float(label_smoothing)
    smooth = lam / (num_classes.to(acc) if isinstance(num_classes, torch.Tensor) else num_classes)
    k, owned = local_target(target, start, local_classes, ignore_index)
    valid = target != ignore_index
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    inv_sum = torch.where(valid, 1.0 / (1.0 + excess), 0.0)  # ignored rows: 0 even where S = 0
    row_scale = torch.where(valid, grad_scale.to(acc), 0.0)
    # The target column per row: one value each, outside the block loop.
    z_k = logits.gather(1, k.unsqueeze(1)).squeeze(1).to(acc)
    p_k = torch.exp(z_k - shift) * inv_sum
    confident = (z_k == row_max) & (excess < 1.0)
    g_k = torch.where(confident, (lam - smooth) - excess * inv_sum, (p_k - smooth) - (1.0 - lam))
    g_k = (g_k * row_scale).unsqueeze(1)
    for lo, hi in row_blocks(n_rows, local_classes, logits.device):
        p = torch.exp(logits[lo:hi].to(acc) - shift[lo:hi].unsqueeze(1)).mul_(inv_sum[lo:hi].unsqueeze(1))
        if lam != 0.0:
            p.sub_(smooth)
        p.mul_(row_scale[lo:hi].unsqueeze(1))
        rows_k = k[lo:hi].unsqueeze(1)
        p.scatter_(1, rows_k, torch.where(owned[lo:hi].unsqueeze(1), g_k[lo:hi], p.gather(1, rows_k)))
        grad[lo:hi] = torch.where(valid[lo:hi].unsqueeze(1), p, 0.0)


def row_blocks(n_rows: int, num_classes: int, device: torch.device):
    """(lo, hi) ranges of rows whose (rows, num_classes) block fits the device's budget."""
    budget = SHARD_BLOCK_ELEMENTS.get(device.type, SHARD_BLOCK_ELEMENTS_DEFAULT)
    rows = max(1, budget // max(num_classes, 1))
    for lo in range(0, n_rows, rows):
        yield lo, min(lo + rows, n_rows)


def local_target(target: torch.Tensor, start, local_classes: int, ignore_index: int):
    """(k, owned): the target's column in a slice starting at ``start`` (0 where not owned), and
    whether this slice holds it (in range and not ``ignore_index``)."""
    k = target.to(torch.int64) - start
    owned = (target != ignore_index) & (k >= 0) & (k < local_classes)
    return torch.where(owned, k, 0), owned
