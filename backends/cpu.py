"""The "cpu" backend: vectorized torch code, fused per block of rows so the block stays in cache.

Each block of rows (a few MiB of logits) is read from memory once; the work on it
runs in fp32 (fp64 for fp64 logits) while it is in cache: one fused softmax (one exp
per element), a sum for the smoothing term, a sum of the probabilities, and one pass
that writes the gradient, rounding each element to the logits' dtype once. For contiguous
fp32/fp64 gradients the softmax is written straight into the gradient buffer and finished
there in place; otherwise one block-sized scratch buffer (reused for every block, never a
full-size copy) holds it. Per-row work (targets, the loss, the target column) is done once
for all rows, outside the block loop. Torch's intra-op threads split each block's rows
over the cores, so a block has at least one row per thread.

Precision: every per-row quantity carries only relative rounding errors, so no cancellation
is left in the loss or the gradient:

* ATen's softmax divides exp(z_j - m) by a denominator it sums in a few running fp32 lanes,
  off by up to ~1e-5 relative for large V (all of a confident row's remainder can be lost).
  A cascade sum of the other probabilities, q = sum_{j != k} p_j, taken with the target
  column zeroed, fixes both: the row renormalises by p_k + q, and the ratio
  rho = q / p_k = sum_{j != k} exp(z_j - m) / exp(z_k - m) no longer depends on that sum.
* -log p_k = log1p(rho): exact to fp32 rounding for confident rows too, where 1 - p_k is far
  below fp32's ulp of 1 (PyTorch's fp32 kernel loses it). Where p_k < 1e-30 (z_k far below
  the max) the row's (m - z_k) + log sum_j exp(z_j - m) is taken from the logits instead.
* the target column p_k - c, c = 1 - lam + lam / V, in fp64 from the fp32 p_k and q: as
  1 / (1 + q / p_k) - c, or for p_k >= 1/2 as (1 - c) - 1 / (1 + p_k / q) with 1 - c =
  lam (1 - 1/V). Each side carries only relative errors and the one subtraction is exact
  where they cancel, for every lam (p_k - 1/V at lam = 1, -(1 - p_k) at lam = 0).
* the smoothing term lam (z_k - s / V), s = sum_j z_j: fp32's error in s, a few eps x
  sum_j |z_j|, only shows where the row shares a large offset; rows where lam |s / V| exceeds
  four times the loss sum s again in fp64, where the offset cancels exactly (inputs of up to
  64K logits sum in fp64 from the start).
"""

from __future__ import annotations

import math

import torch

from smoothce.backends.base import Backend, check_targets_on_host, loss_dtype

# Elements per block: 1M fp32 is 4 MiB of scratch, which stays in the L2/L3 caches and
# keeps the per-block Python overhead (half a dozen op calls) small against the work.
BLOCK_ELEMENTS = 1 << 20
# Below this p_k the row's loss is recomputed from logsumexp instead of log1p(q / p_k).
_TINY = 1e-30
# Rows where lam |s / V| exceeds this multiple of the loss sum s again in fp64. Elsewhere fp32's
# error in s, a few eps x sum_j |z_j| <= a few eps x (|s| + 2 V loss / lam), is a few ulps of the loss.
_OFFSET_RATIO = 4.0
# Up to this many logits the sums s are taken in fp64 outright: per-call overhead dominates there.
_EXACT_SUM_ELEMENTS = 1 << 16


def _softmax_(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # ATen's fused last-dim softmax (max, exp and sum, scale), written into `out`, which may
    # be `logits` itself. (Only contiguous `out`: torch 2.13 writes wrong values into a strided one.)
    return torch.ops.aten._softmax.out(logits, 1, False, out=out)


class CpuBackend(Backend):
    """Vectorized torch on CPU tensors; any float dtype, any strides."""

    name = "cpu"
    device_type = "cpu"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS):
        self.block_elements = block_elements

    def forward(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        """Per-row loss, and the gradient written into ``grad`` when it is given.

        With p = softmax(z) relative to the row max, q = sum_{j != k} p_j, rho = q / p_k,
        s = sum_j z_j and c = 1 - lam + lam / V (the target's smoothed label):
            loss   = log1p(rho) + lam (z_k - s / V)      (= r - (1 - lam) z_k - (lam / V) s)
            grad_j = scale * (p_j / (p_k + q) - lam / V),   grad_k = scale * (p_k - c)
        A target on a -inf column has p_k = 0 and loss +inf, for every lam.
        """
        n_rows, num_classes = logits.shape
        lam = label_smoothing
        acc = loss_dtype(logits.dtype)
        logits = logits.detach()
        target = target.long()  # compare in int64: an int32 target never equals a wider ignore_index
        valid = target != ignore_index
        k = target * valid  # ignored rows read class 0, harmlessly
        low, high = torch.aminmax(k)
        if int(low) < 0 or int(high) >= num_classes:
            check_targets_on_host(target, num_classes, ignore_index)  # raises, naming the value
        k = k.unsqueeze(1)
        z_k = logits.gather(1, k).to(acc).squeeze(1)
        # Per row: p_k and q = sum_{j != k} p_j; s = sum_j z_j, in fp64 where that costs nothing.
        stats = torch.empty((2, n_rows, 1), dtype=acc)
        p_k, rest = stats[0], stats[1]
        exact_sums = acc == torch.float64 or n_rows * num_classes <= _EXACT_SUM_ELEMENTS
        row_sum = torch.empty((n_rows, 1), dtype=torch.float64 if exact_sums else acc) if lam != 0.0 else None

        rows_per_block = min(n_rows, max(torch.get_num_threads(), self.block_elements // num_classes, 1))
        in_place = grad is not None and grad.dtype == acc and grad.is_contiguous()
        scratch = None if in_place else torch.empty((rows_per_block, num_classes), dtype=acc)
        scale = float(grad_scale)
        offset = torch.tensor(-scale * lam / num_classes, dtype=acc)
        for start in range(0, n_rows, rows_per_block):
            stop = min(start + rows_per_block, n_rows)
            if stop - start == n_rows:  # one block: the whole tensors, no views (small inputs)
                x, k_block, p_k_block, rest_block, sum_block, grad_block = logits, k, p_k, rest, row_sum, grad
            else:
                x, k_block, p_k_block, rest_block = logits[start:stop], k[start:stop], p_k[start:stop], rest[start:stop]
                sum_block = None if row_sum is None else row_sum[start:stop]
                grad_block = None if grad is None else grad[start:stop]
            if in_place:
                p = grad_block
            else:
                p = scratch if stop - start == rows_per_block else scratch[: stop - start]
                if x.dtype != acc:
                    x = p.copy_(x)  # half inputs: upcast once, then work in place
            if lam != 0.0:
                torch.sum(x, 1, keepdim=True, dtype=sum_block.dtype, out=sum_block)
            p = _softmax_(p, x)
            torch.gather(p, 1, k_block, out=p_k_block)
            p.scatter_(1, k_block, 0.0)  # the target column is written after the loop
            total = torch.sum(p, 1, keepdim=True, out=rest_block).add(p_k_block)
            if grad is None:
                continue
            # p <- scale * p / (p_k + q) - scale * lam / V: renormalised, in fp32/fp64
            torch.addcmul(offset, p, scale / total, out=p)
            if not in_place:
                grad_block.copy_(p)  # rounded to the gradient's dtype once

        p_k, rest = p_k.squeeze(1), rest.squeeze(1)
        loss = torch.log1p(rest / p_k)
        any_tiny = float(p_k.min()) < _TINY
        if any_tiny:  # z_k far below the max: -log p_k from logsumexp of the logits instead
            tiny = p_k < _TINY
            rows = logits[tiny].to(acc)
            m = rows.amax(1, keepdim=True)
            loss[tiny] = (m.squeeze(1) - z_k[tiny]) + (rows - m).exp().sum(1).log()
        if lam != 0.0:
            mean_term = row_sum.squeeze(1) / num_classes
            smoothing = (z_k - mean_term).mul_(lam).to(acc)
            if not exact_sums:
                refine = (mean_term.abs() * lam > _OFFSET_RATIO * (loss + smoothing)) & valid
                if bool(refine.any()):  # a large common offset: the mean again, summed in fp64
                    exact_mean = logits[refine].to(torch.float64).mean(1)
                    smoothing[refine] = (lam * (z_k[refine].double() - exact_mean)).to(acc)
            loss = loss + smoothing
        if any_tiny:
            loss = torch.where(z_k == -math.inf, math.inf, loss)  # p_k = 0 whatever lam: not inf - inf
        loss = torch.where(valid, loss, 0.0)
        if grad is not None:
            # p_k - c = (1 - c) - (1 - p_k), 1 - c = lam (1 - 1/V), 1 - p_k = 1 / (1 + p_k / q): two
            # terms with relative errors only, subtracted in fp64 and rounded once. fp64 logits
            # need more: for p_k < 1/2 (q > p_k) p_k = 1 / (1 + q / p_k) minus c instead.
            p_k64 = p_k.double()
            target_col = torch.div(-scale, (p_k64 / rest).add_(1.0)).add_(scale * lam * (1.0 - 1.0 / num_classes))
            if acc == torch.float64:
                from_p_k = torch.div(scale, (rest / p_k64).add_(1.0)).sub_(scale * (1.0 - lam + lam / num_classes))
                target_col = torch.where(p_k64 >= rest, target_col, from_p_k)
            grad.scatter_(1, k, target_col.to(grad.dtype).unsqueeze(1))
            if not bool(valid.all()):
                grad[~valid] = 0.0
        return loss
