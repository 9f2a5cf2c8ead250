"""The "cpu" backend: vectorized torch code, fused per block of rows so the block stays in cache.

Each block of rows (a few MiB of logits) is read from memory once; the work on it
runs in fp32 (fp64 for fp64 logits) while it is in cache: one fused softmax (one exp
per element), a sum for the smoothing term, and one pass that writes the gradient,
rounding each element to the logits' dtype once. For contiguous fp32/fp64 gradients
the softmax is written straight into the gradient buffer and finished there in place;
otherwise one block-sized scratch buffer (reused for every block, never a full-size
copy) holds it. Per-row work (targets, the loss, the target column) is done once for
all rows, outside the block loop. Torch's intra-op threads split each block's rows
over the cores, so a block has at least one row per thread.

Precision: the loss and the target column are built from terms that carry relative
rounding errors only, so no cancellation is left in them:

* a confident row (p_k >= 1/2): 1 - p_k can lie far below fp32's ulp of 1, and ATen's softmax
  sums its denominator in a few running fp32 lanes, which drop such a remainder. A block
  holding such a row also sums q = sum_{j != k} p_j directly (a cascade sum with the target
  column zeroed); rho = q / p_k = sum_{j != k} exp(z_j - m) / exp(z_k - m) does not depend on
  that denominator, and -log p_k = log1p(rho), 1 - p_k = 1 / (1 + p_k / q).
* elsewhere -log p_k; where p_k < 1e-30 (z_k far below the max) the row's
  (m - z_k) + log sum_j exp(z_j - m) is taken from the logits instead.
* the target column p_k - c, c = 1 - lam + lam / V, in fp64 from fp32 p_k (or as
  lam (1 - 1/V) - (1 - p_k) for a confident row): its error is p_k's own, for every lam
  (p_k - 1/V at lam = 1, -(1 - p_k) at lam = 0).
* the smoothing term lam (z_k - s / V), s = sum_j z_j: fp32's error in s, a few eps x
  sum_j |z_j|, only shows where the row shares a large offset; rows where lam |s / V| exceeds
  four times the loss sum s again in fp64, where the offset cancels exactly (inputs of up to
  64K logits sum in fp64 from the start). A gradient written over its own logits (the fused
  linear loss) leaves nothing to re-read: each block picks those rows before its softmax, by
  the stricter |s / V| > 4 (m - s / V), m the row max.
"""

from __future__ import annotations

import math

import torch

from smoothce.backends.base import Backend
from smoothce.checks import check_targets_on_host
from smoothce.numerics import kept_factors, loss_dtype

# Elements per block: 1M fp32 is 4 MiB of scratch, which stays in the L2/L3 caches and
# keeps the per-block Python overhead (half a dozen op calls) small against the work.
BLOCK_ELEMENTS = 1 << 20
# Below this p_k the row's loss is recomputed from logsumexp instead of -log p_k.
_TINY = 1e-30
# From this p_k on, a row's loss and target column come from q = sum_{j != k} p_j.
_CONFIDENT = 0.5
# Rows where lam |s / V| exceeds this multiple of the loss sum s again in fp64. Elsewhere fp32's
# error in s, a few eps x sum_j |z_j| <= a few eps x (|s| + 2 V loss / lam), is a few ulps of the loss.
_OFFSET_RATIO = 4.0
# Up to this many logits the sums s are taken in fp64 outright: per-call overhead dominates there.
_EXACT_SUM_ELEMENTS = 1 << 16


# Up to this many logits a call is a handful of float64 ops on the whole tensor: per-call overhead
# dominates there, and float64 leaves nothing to cancel.
_SMALL_ELEMENTS = 1 << 13


def _softmax_(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # ATen's fused last-dim softmax (max, exp and sum, scale), written into `out`, which may
    # be `logits` itself. (Only contiguous `out`: torch 2.13 writes wrong values into a strided one.)
    return torch.ops.aten._softmax.out(logits, 1, False, out=out)


def _targets(target, num_classes, ignore_index):
    """(k (N, 1) int64 with ignored rows on class 0, valid (N,)); ValueError naming a bad target."""
    target = target.long()  # compare in int64: an int32 target never equals a wider ignore_index
    valid = target != ignore_index
    k = target * valid  # ignored rows read class 0, harmlessly
    _check_range(k, target, num_classes, ignore_index)
    return k.unsqueeze(1), valid


def _check_range(k, target, num_classes, ignore_index):
    low, high = torch.aminmax(k)
    if int(low) < 0 or int(high) >= num_classes:
        check_targets_on_host(target, num_classes, ignore_index)  # raises, naming the value


def _small_targets(target, num_classes, ignore_index):
    """``_targets`` for a small input, where each op call counts: ``valid`` is None when no row
    is ignored (no masking to do), and the number of counted rows comes along."""
    target = target.long()
    valid = target != ignore_index
    counted = int(valid.sum())
    if counted == target.shape[0]:
        k, valid = target, None
    else:
        k = target * valid
    _check_range(k, target, num_classes, ignore_index)
    return k.unsqueeze(1), valid, counted


def _forward_small(logits, k, valid, lam, grad, scale, acc):
    """``forward`` of a small input in float64, the spec's formulas with l = log_softmax(z) = z - r:
        loss = -(1 - lam) l_k - lam mean_j l_j,  grad = scale (exp(l) - lam / V - (1 - lam) onehot(k))
    (r - z_k and r - s / V, each >= 0, so a target on a -inf column gives +inf, not inf - inf; a
    term whose weight is 0 is left out). ``valid`` None: no ignored row.
    """
    num_classes = logits.shape[1]
    log_p = torch.log_softmax(logits.to(torch.float64), 1)
    log_p_k = log_p.gather(1, k)
    if lam == 0.0:
        loss = log_p_k.neg_()
    else:
        loss = log_p.mean(1, keepdim=True).mul_(-lam)
        if lam != 1.0:
            loss.sub_(log_p_k, alpha=1.0 - lam)
    loss = loss.squeeze(1)
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
    if grad is not None:
        g = log_p.exp_()
        if lam != 0.0:
            g.sub_(lam / num_classes)
        g.scatter_add_(1, k, torch.full(k.shape, lam - 1.0, dtype=torch.float64))
        if scale != 1.0:
            g.mul_(scale)
        if valid is not None:
            g.mul_(valid.unsqueeze(1))
        grad.copy_(g)  # rounded to the gradient's dtype once
    return loss.to(acc)


def _offset_exact_sum(x, row_max, out, exact):
    """Row sums s of the block ``x`` into the fp64 ``out``: in fp64 outright where ``exact``, else in
    fp32 and again in fp64 for the rows whose mean lies far from their spread, |s / V| > 4 (m - s / V).

    Elsewhere fp32's error, a few eps x sum_j |z_j| <= a few eps x V (|s / V| + 2 (m - s / V)), is a
    few ulps of the loss, which is at least lam (m - s / V). (The refinement after the block loop
    needs the logits, which an aliased gradient has overwritten by then.)
    """
    if exact:
        torch.sum(x, 1, keepdim=True, dtype=torch.float64, out=out)
        return
    out.copy_(torch.sum(x, 1, keepdim=True))
    mean = out / x.shape[1]
    offset = (mean.abs() > _OFFSET_RATIO * (row_max - mean)).squeeze(1)
    if bool(offset.any()):
        out[offset] = x[offset].sum(1, keepdim=True, dtype=torch.float64)


class CpuBackend(Backend):
    """Vectorized torch on CPU tensors; any float dtype, any strides."""

    name = "cpu"
    device_type = "cpu"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS):
        self.block_elements = block_elements

    def loss_and_grad(self, logits, target, label_smoothing, ignore_index, reduction, compute_grad, normalizer=None):
        """``Backend.loss_and_grad``; a small input takes one pass of float64 ops with the count, the
        gradient's factor and the reduction read on the host (free on CPU)."""
        n_rows, num_classes = logits.shape
        if n_rows * num_classes > _SMALL_ELEMENTS:
            return super().loss_and_grad(
                logits, target, label_smoothing, ignore_index, reduction, compute_grad, normalizer
            )
        acc = loss_dtype(logits.dtype)
        k, valid, counted = _small_targets(target, num_classes, ignore_index)
        if reduction != "mean":
            denominator = 1.0
        elif normalizer is not None:
            denominator = float(normalizer)
        else:
            denominator = float(max(counted, 1))  # no counted target: loss 0, not NaN
        grad_scale, factor = kept_factors(denominator, logits.dtype)
        grad = torch.empty_like(logits) if compute_grad else None
        rows = _forward_small(logits, k, valid, label_smoothing, grad, grad_scale, acc)
        loss = rows.sum() / denominator if denominator > 0 else rows.new_zeros(())
        loss = rows if reduction == "none" else loss
        return loss, grad, torch.full((), factor, dtype=acc)

    def forward(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        """Per-row loss, and the gradient written into ``grad`` when it is given.

        With p = softmax(z) relative to the row max, s = sum_j z_j, c = 1 - lam + lam / V (the
        target's smoothed label), and q = sum_{j != k} p_j for a confident row (p_k >= 1/2):
            loss   = -log p_k + lam (z_k - s / V)    (= r - (1 - lam) z_k - (lam / V) s)
                     with -log p_k = log1p(q / p_k) for a confident row
            grad_j = scale * (p_j - lam / V),   grad_k = scale * (p_k - c)
                     with p_k - c = lam (1 - 1/V) - 1 / (1 + p_k / q) for a confident row
        A target on a -inf column has p_k = 0 and loss +inf, for every lam.
        """
        n_rows, num_classes = logits.shape
        lam = label_smoothing
        acc = loss_dtype(logits.dtype)
        logits = logits.detach()
        if n_rows * num_classes <= _SMALL_ELEMENTS:
            k, valid, _ = _small_targets(target, num_classes, ignore_index)
            return _forward_small(logits, k, valid, lam, grad, float(grad_scale), acc)
        k, valid = _targets(target, num_classes, ignore_index)
        z_k = logits.gather(1, k).to(acc).squeeze(1)
        # Per row: p_k, and q = sum_{j != k} p_j in blocks with a confident row; s = sum_j z_j,
        # in fp64 where that costs nothing.
        stats = torch.empty((2, n_rows, 1), dtype=acc)
        p_k, rest = stats[0], stats[1]
        any_confident = False
        # The gradient may be written over the logits (the fused linear loss does): then nothing
        # after the loop may read them. Each block then keeps its row max m before the softmax,
        # and r = m - log(max_j p_j) for the rows whose p_k underflows (max_j p_j = 1 / sum_j exp(z_j - m),
        # never tiny); and its rows with a large common offset take s in fp64 at once (below).
        aliased = grad is not None and grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        lse = torch.empty((n_rows, 1), dtype=acc) if aliased else None
        exact_sums = acc == torch.float64 or n_rows * num_classes <= _EXACT_SUM_ELEMENTS
        sum_dtype = torch.float64 if exact_sums or aliased else acc
        row_sum = torch.empty((n_rows, 1), dtype=sum_dtype) if lam != 0.0 else None

        rows_per_block = min(n_rows, max(torch.get_num_threads(), self.block_elements // num_classes, 1))
        in_place = grad is not None and grad.dtype == acc and grad.is_contiguous()
        scratch = None if in_place else torch.empty((rows_per_block, num_classes), dtype=acc)
        scale = float(grad_scale)
        offset = torch.tensor(-scale * lam / num_classes, dtype=acc)
        affine = scale != 1.0 or lam != 0.0
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
            if aliased:
                row_max = torch.amax(x, 1, keepdim=True)
                if lam != 0.0:
                    _offset_exact_sum(x, row_max, sum_block, exact_sums)
            elif lam != 0.0:
                torch.sum(x, 1, keepdim=True, dtype=sum_block.dtype, out=sum_block)
            p = _softmax_(p, x)
            torch.gather(p, 1, k_block, out=p_k_block)
            if aliased and bool((p_k_block < _TINY).any()):
                torch.sub(row_max, torch.amax(p, 1, keepdim=True).log_(), out=lse[start:stop])
            if bool((p_k_block >= _CONFIDENT).any()):
                any_confident = True
                p.scatter_(1, k_block, 0.0)  # the target column is written after the loop
                torch.sum(p, 1, keepdim=True, out=rest_block)
            if grad is None:
                continue
            if affine:  # p <- scale * p - scale * lam / V, in fp32/fp64
                torch.add(offset, p, alpha=scale, out=p)
            if not in_place:
                grad_block.copy_(p)  # rounded to the gradient's dtype once

        p_k, rest = p_k.squeeze(1), rest.squeeze(1)
        confident = (p_k >= _CONFIDENT) if any_confident else None
        loss = -torch.log(p_k)
        if confident is not None:
            loss = torch.where(confident, torch.log1p(rest / p_k), loss)
        any_tiny = float(p_k.min()) < _TINY
        if any_tiny:  # z_k far below the max: -log p_k from logsumexp of the logits instead
            tiny = p_k < _TINY
            if aliased:
                loss[tiny] = lse.squeeze(1)[tiny] - z_k[tiny]
            else:
                rows = logits[tiny].to(acc)
                m = rows.amax(1, keepdim=True)
                loss[tiny] = (m.squeeze(1) - z_k[tiny]) + (rows - m).exp().sum(1).log()
        if lam != 0.0:
            mean_term = row_sum.squeeze(1) / num_classes
            smoothing = (z_k - mean_term).mul_(lam).to(acc)
            if not (exact_sums or aliased):  # (an aliased block refined its sums in the loop)
                refine = (mean_term.abs() * lam > _OFFSET_RATIO * (loss + smoothing)) & valid
                if bool(refine.any()):  # a large common offset: the mean again, summed in fp64
                    exact_mean = logits[refine].to(torch.float64).mean(1)
                    smoothing[refine] = (lam * (z_k[refine].double() - exact_mean)).to(acc)
            loss = loss + smoothing
        if any_tiny:
            loss = torch.where(z_k == -math.inf, math.inf, loss)  # p_k = 0 whatever lam: not inf - inf
        loss = torch.where(valid, loss, 0.0)
        if grad is not None:
            # p_k - c in fp64, rounded once: p_k's relative error only, for every lam. A confident
            # row takes (1 - c) - (1 - p_k), 1 - c = lam (1 - 1/V), 1 - p_k = 1 / (1 + p_k / q).
            p_k64 = p_k.double()
            target_col = (p_k64 - (1.0 - lam + lam / num_classes)).mul_(scale)
            if confident is not None:
                from_rest = torch.div(-scale, (p_k64 / rest).add_(1.0)).add_(scale * lam * (1.0 - 1.0 / num_classes))
                target_col = torch.where(confident, from_rest, target_col)
            # (index_put_, not scatter_: torch 2.13's CPU scatter_ into half tensors copies them whole)
            grad.index_put_((torch.arange(n_rows), k.squeeze(1)), target_col.to(grad.dtype))
            if not bool(valid.all()):
                grad[~valid] = 0.0
        return loss
