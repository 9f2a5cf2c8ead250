"""The default implementations of ``Backend``'s methods in plain torch ops, for every device.

``Backend`` calls these where a backend does not fuse the work itself, so a third party's
backend that implements only ``forward`` gets the op's forward, backward and the
vocabulary-parallel halves from them. The math is the contract's, stated in ``base``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from smoothce.checks import check_targets
from smoothce.numerics import kept_factors, loss_denominator, loss_dtype, reduce_rows

# Elements of one block of rows in the shard functions: 256K on CPU (1 MiB of fp32 scratch per
# temporary, in L2; 1M ran no faster and held 11 MiB of temporaries at V_i = 16000, as much as a
# fused vocabulary-parallel chunk), 16M elsewhere (64 MiB).
SHARD_BLOCK_ELEMENTS = {"cpu": 1 << 18}
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


def forward_recipe(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    grad: torch.Tensor | None,
    grad_scale: torch.Tensor,
    recipe,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Backend.forward_recipe`` (whose docstring states the math) in torch ops, a block of rows at a time.

    Everything relative to the capped row's max m (m~ = m where finite, else 0), with
    S = sum_j exp(z'_j - m~) and L = log S, so lse = m~ + L and lse - z'_j = (m~ - z'_j) + L, two
    terms >= 0 (nothing cancels, whatever offset the row shares):

        loss = (1 - lam) w_k ((m~ - z'_k) + L) + (lam / V) (sum_j w_j (m~ - z'_j) + W L) + s w_k lse^2
        grad_k / grad_scale = (lam / V) (W p_k - w_k) + 2 s w_k lse p_k - (1 - lam) w_k q / S   (uncapped)

    q = sum_{j != k} exp(z'_j - m~) summed on its own, so 1 - p_k = q / S keeps a confident row's
    digits. A term whose weight is exactly 0 is left out (no 0 x inf). Each gradient element is
    rounded to ``grad``'s dtype once.
    """
    n_rows, num_classes = logits.shape
    acc = loss_dtype(logits.dtype)
    lam = float(label_smoothing)
    smooth = lam / num_classes
    cap, z_loss, weight = recipe.softcap, float(recipe.z_loss), recipe.weight
    check_targets(target, num_classes, ignore_index)
    logits = logits.detach()
    valid = target != ignore_index
    k = torch.where(valid, target.long(), 0).clamp_(0, num_classes - 1).unsqueeze(1)  # never out of bounds
    w_k = weight.gather(0, k.squeeze(1)) if weight is not None else None
    total_weight = weight.sum() if weight is not None else float(num_classes)
    scale = grad_scale.to(acc)
    rows = torch.empty(n_rows, dtype=acc, device=logits.device)
    for lo, hi in row_blocks(n_rows, num_classes, logits.device):
        x, t = _capped_block(logits, lo, hi, acc, cap)  # z', and z' / c with a cap
        m = x.amax(1, keepdim=True)
        shift = torch.where(torch.isfinite(m), m, 0.0)
        x = x.sub_(shift)  # z' - m~ <= 0
        e = x.exp()
        k_block = k[lo:hi]
        e_k = e.gather(1, k_block)
        rest = e.scatter(1, k_block, 0.0).sum(1, keepdim=True)  # q
        total = rest + e_k  # S
        log_total = total.log()
        row_lse = shift + log_total
        if lse is not None:
            lse[lo:hi] = row_lse.squeeze(1)
        wk = 1.0 if w_k is None else w_k[lo:hi].unsqueeze(1)
        loss = torch.zeros_like(log_total)
        if lam != 1.0:
            loss += (1.0 - lam) * wk * (log_total - x.gather(1, k_block))
        if lam != 0.0:
            spread = -(x @ weight.unsqueeze(1)) if weight is not None else -x.sum(1, keepdim=True)
            loss += smooth * (spread + total_weight * log_total)
        if z_loss != 0.0:
            loss += z_loss * wk * row_lse.square()
        rows[lo:hi] = torch.where(valid[lo:hi], loss.squeeze(1), 0.0)
        if grad is None:
            continue
        p = e.div_(total)
        coeff = (1.0 - lam) * wk + smooth * total_weight
        if z_loss != 0.0:
            coeff = coeff + 2.0 * z_loss * wk * row_lse
        p_k = e_k / total
        g = p.mul_(coeff)
        if lam != 0.0:
            g.sub_(smooth * weight if weight is not None else smooth)
        g_k = smooth * (total_weight * p_k - wk) - (1.0 - lam) * wk * (rest / total)
        if z_loss != 0.0:
            g_k = g_k + 2.0 * z_loss * wk * row_lse * p_k
        g.scatter_(1, k_block, g_k)
        if cap is not None:
            g.mul_(t.square_().neg_().add_(1.0))  # the cap's chain rule, 1 - (z' / c)^2
        g.mul_(scale).masked_fill_(~valid[lo:hi].unsqueeze(1), 0.0)
        grad[lo:hi] = g  # rounded to the gradient's dtype once
    return rows


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
    out = grad if inplace else torch.empty_like(grad)
    if grad.device.type == "cpu" and grad.dtype != scale.dtype and grad.dim() > 0 and grad.is_contiguous():
        # On CPU a mixed-dtype multiply makes float32 copies of the whole gradient and of the product
        # (4x a half gradient's bytes, 4x the time): block by block through a float32 block instead.
        rows, scale = grad.view(-1, grad.shape[-1]), scale.reshape(-1, 1)
        product = out.view(rows.shape)
        for lo, hi in row_blocks(*rows.shape, grad.device):
            block = rows[lo:hi].to(scale.dtype).mul_(scale[lo:hi] if per_row else scale)
            product[lo:hi] = block
        return out
    return torch.mul(grad, scale, out=out)


def shard_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    start: int | torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    recipe=None,
) -> torch.Tensor:
    """``Backend.shard_stats``: the (4, N) rows m, R, t, z_k, block of rows by block of rows."""
    n_rows, local_classes = logits.shape
    acc = loss_dtype(logits.dtype)
    stats = torch.zeros(4, n_rows, dtype=acc, device=logits.device)
    if n_rows == 0:
        return stats
    logits = logits.detach()
    k, owned = local_target(target, start, local_classes, ignore_index)
    weight, cap = (None, None) if recipe is None else (recipe.weight, recipe.softcap)
    for lo, hi in row_blocks(n_rows, local_classes, logits.device):
        # The capped slice z' (z without a cap) and its own z'_k, from the same block: ``shard_grad``
        # compares it with the max. t = sum_j w_j (z'_j - m~) over the slice's weights w (ones without).
        x, _ = _capped_block(logits, lo, hi, acc, cap)
        stats[3, lo:hi] = torch.where(owned[lo:hi], x.gather(1, k[lo:hi].unsqueeze(1)).squeeze(1), 0.0)
        m, first = x.max(dim=1, keepdim=True)  # a (the first) column holding the max
        shift = torch.where(torch.isfinite(m), m, 0.0)
        x = x.sub_(shift)
        if label_smoothing > 0.0:
            stats[2, lo:hi] = (x @ weight) if weight is not None else x.sum(dim=1)
        e = x.exp_()
        e.scatter_(1, first, 0.0)
        stats[0, lo:hi] = m.squeeze(1)
        stats[1, lo:hi] = e.sum(dim=1)
    return stats


def _capped_block(logits: torch.Tensor, lo: int, hi: int, acc: torch.dtype, cap):
    """(z', z' / c) of rows [lo, hi) in ``acc``: z' = c tanh(z / c), or (z, None) without a cap."""
    x = logits[lo:hi].to(acc, copy=True)
    if cap is None:
        return x, None
    t = x.div_(cap).tanh_()
    return t * cap, t


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
    recipe=None,
    lse: torch.Tensor | None = None,
    target_weight: torch.Tensor | None = None,
    total_weight: torch.Tensor | None = None,
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
    if recipe is not None and not recipe.plain:
        row = (k, owned, valid, shift, inv_sum, row_scale, row_max, excess)
        _shard_grad_recipe(logits, num_classes, lam, smooth, grad, recipe, lse, target_weight, total_weight, *row)
        return
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


def _shard_grad_recipe(logits, num_classes, lam, smooth, grad, recipe, lse, target_weight, total_weight, *row):
    # Backend.shard_grad with the recipe: A p_j - (lam / V) w_j off the target, and at it
    # B p_k - (lam / V) w_k - (1 - lam) w_k (1 - p_k), B = A - (1 - lam) w_k formed without that
    # cancellation, 1 - p_k = e / S where z'_k = M and e < 1; times the cap's 1 - (z'_j / c)^2.
    k, owned, valid, shift, inv_sum, row_scale, row_max, excess = row
    n_rows, local_classes = logits.shape
    acc = inv_sum.dtype
    weight, z_loss = recipe.weight, float(recipe.z_loss)
    w_k = target_weight if target_weight is not None else torch.ones_like(inv_sum)
    total = total_weight if total_weight is not None else num_classes
    b = smooth * (total.to(acc) if isinstance(total, torch.Tensor) else total) * torch.ones_like(inv_sum)
    if z_loss != 0.0:
        b = b + 2.0 * z_loss * w_k * lse
    a = (1.0 - lam) * w_k + b
    for lo, hi in row_blocks(n_rows, local_classes, logits.device):
        x, t = _capped_block(logits, lo, hi, acc, recipe.softcap)
        rows_k = k[lo:hi].unsqueeze(1)
        z_k = x.gather(1, rows_k).squeeze(1)
        p = x.sub_(shift[lo:hi].unsqueeze(1)).exp_().mul_(inv_sum[lo:hi].unsqueeze(1))
        p_k = p.gather(1, rows_k).squeeze(1)
        confident = (z_k == row_max[lo:hi]) & (excess[lo:hi] < 1.0)
        rest = torch.where(confident, excess[lo:hi] * inv_sum[lo:hi], 1.0 - p_k)  # 1 - p_k
        w_k_block = w_k[lo:hi]
        g_k = b[lo:hi] * p_k - (1.0 - lam) * w_k_block * rest
        g = p.mul_(a[lo:hi].unsqueeze(1))
        if lam != 0.0:
            g.sub_(smooth * weight if weight is not None else smooth)
            g_k = g_k - smooth * w_k_block
        g.scatter_(1, rows_k, torch.where(owned[lo:hi], g_k, g.gather(1, rows_k).squeeze(1)).unsqueeze(1))
        if t is not None:
            g.mul_(t.square_().neg_().add_(1.0))
        g.mul_(row_scale[lo:hi].unsqueeze(1))
        grad[lo:hi] = torch.where(valid[lo:hi].unsqueeze(1), g, 0.0)


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
