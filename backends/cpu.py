"""The "cpu" backend: vectorized torch code on blocks of rows that stay in cache, work in fp32 (fp64 for fp64).

Each block (4 MiB of fp32 work in all) is read from memory once: a sum for the smoothing term, one
fused softmax (one exp per element) and one pass that finishes the gradient, rounding each element
to the logits' dtype once. A contiguous fp32/fp64 gradient is worked in place; other gradients, and
the loss alone, go through a reused fp32 scratch block; without a gradient a fused log-softmax (one
pass fewer) gives the loss. With several torch threads, as many Python threads each take every
so-many-th block and run its ops single-threaded: no parallel region per op call, whose end waits
for every thread (a scheduler slice each on a loaded machine). Per-row work (targets, the loss, the
target column) is done once for all rows, after the blocks. A large gradient is allocated in
transparent huge pages (Linux): faulting a fresh buffer in 4 KiB at a time costs more than the
whole computation on it. The recipe options (class weights, z-loss, soft-capping) and the lse out
take the same blocks in ``cpu_recipe``.

Precision: the loss and the target column are built from terms that carry relative
rounding errors only, so no cancellation is left in them:

* a confident row (p_k >= 1/2): 1 - p_k can lie far below the ulp of 1, and ATen's softmax
  sums its denominator in a few running lanes, which drop such a remainder. A block
  holding such a row also sums q = sum_{j != k} p_j directly (a cascade sum with the target
  column zeroed); rho = q / p_k = sum_{j != k} exp(z_j - m) / exp(z_k - m) does not depend on
  that denominator, and -log p_k = log1p(rho), 1 - p_k = 1 / (1 + p_k / q).
* elsewhere -log p_k; where p_k < 1e-30 (z_k far below the max) the row's
  (m - z_k) + log sum_j exp(z_j - m) is taken from the logits instead. Without a gradient,
  -log p_k is the log-softmax's own -(z_k - m - log sum_j exp(z_j - m)), never tiny-limited.
* the target column p_k - c, c = 1 - lam + lam / V, in fp64 from p_k (or as
  lam (1 - 1/V) - (1 - p_k) for a confident row): its error is p_k's own, for every lam
  (p_k - 1/V at lam = 1, -(1 - p_k) at lam = 0).
* float64: ATen's softmax sum drifts by up to ~V/8 ulps over a row (3e-14 at V = 128256),
  so each fp64 row is renormalised by its cascade sum: every p_j to a few ulps.
* the smoothing term lam (z_k - s / V), s = sum_j z_j: fp32's error in s, a few eps x
  sum_j |z_j|, only shows where the row shares a large offset; rows where lam |s / V| exceeds
  four times the loss sum s again in fp64, where the offset cancels exactly (inputs of up to
  64K logits sum in fp64 from the start). A gradient written over its own logits (the fused
  linear loss) leaves nothing to re-read: each block picks those rows before its softmax, by
  the stricter |s / V| > 4 (m - s / V), m the row max.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import mmap

import torch

from smoothce.backends.base import Backend, Recipe, wants_recipe
from smoothce.backends.cpu_recipe import recipe_rows
from smoothce.checks import check_targets_on_host
from smoothce.numerics import kept_factors, loss_dtype

# Elements per scratch block: 1M fp32 is 4 MiB, which stays in the L2/L3 caches and keeps the per-block
# Python overhead (half a dozen op calls) small against the work.
BLOCK_ELEMENTS = 1 << 20
# Gradients from this size on are allocated in transparent huge pages where the OS offers them.
HUGE_PAGE_BYTES = 1 << 25
# Below this p_k the row's loss is recomputed from logsumexp instead of -log p_k.
_TINY = 1e-30
# From this p_k on, a row's loss and target column come from q = sum_{j != k} p_j.
_CONFIDENT = 0.5
_LOG_CONFIDENT = math.log(_CONFIDENT)
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


def _log_softmax_(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # ATen's fused last-dim log-softmax (max, sum of exp, one write): one pass fewer than the softmax.
    return torch.ops.aten._log_softmax.out(logits, 1, False, out=out)


def new_gradient(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer like ``logits`` for the gradient.

    From ``HUGE_PAGE_BYTES`` on, contiguous logits get anonymous memory advised for transparent
    huge pages (``madvise(MADV_HUGEPAGE)``, Linux): the first write to a fresh buffer then faults
    once per 2 MiB instead of once per 4 KiB, which on a small VM cost several times the whole
    forward pass. The memory is returned to the OS when the tensor is freed, like any other.
    """
    nbytes = logits.numel() * logits.element_size()
    if nbytes < HUGE_PAGE_BYTES or not logits.is_contiguous() or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty_like(logits)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP not built in: ordinary pages, still a valid buffer
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=logits.dtype).view(logits.shape)


def _targets(target, num_classes, ignore_index):
    """(k (N, 1) int64 with ignored rows on class 0, valid (N,) or None when no row is ignored, the
    number of counted rows); ValueError naming a bad target."""
    target = target.long()  # compare in int64: an int32 target never equals a wider ignore_index
    valid = target != ignore_index
    counted = int(valid.sum())
    if counted == target.shape[0]:
        k, valid = target, None
    else:
        k = target * valid  # ignored rows read class 0, harmlessly
    low, high = torch.aminmax(k)
    if int(low) < 0 or int(high) >= num_classes:
        check_targets_on_host(target, num_classes, ignore_index)  # raises, naming the value
    return k.unsqueeze(1), valid, counted


def _forward_small(logits, k, valid, lam, grad, scale, acc):
    """``forward`` of a small input in float64, the spec's formulas with l = log_softmax(z) = z - r:
        loss = -(1 - lam) l_k - lam mean_j l_j,  grad = scale (exp(l) - lam / V - (1 - lam) onehot(k))
    (r - z_k and r - s / V, each >= 0, so a target on a -inf column gives +inf, not inf - inf; a
    term whose weight is 0 is left out). A confident row (p_k >= 1/2) takes -l_k = log1p(q / p_k) and
    the target column lam (1 - 1/V) - q / (p_k + q), q = sum_{j != k} p_j, as the blocked path does:
    exp(l_k) - 1 would keep nothing of a remainder below the ulp of 1. ``valid`` None: no ignored row.
    """
    num_classes = logits.shape[1]
    log_p = torch.log_softmax(logits.to(torch.float64), 1)
    log_p_k = log_p.gather(1, k)
    confident = log_p_k >= _LOG_CONFIDENT
    p = rest = None
    if bool(confident.any()):
        p = log_p.exp()
        p_k = p.gather(1, k)
        rest = p.scatter(1, k, 0.0).sum(1, keepdim=True)
        log_p_k = torch.where(confident, torch.log1p(rest / p_k).neg_(), log_p_k)
    if lam == 0.0:
        loss = log_p_k.neg()
    else:
        loss = log_p.mean(1, keepdim=True).mul_(-lam)
        if lam != 1.0:
            loss.sub_(log_p_k, alpha=1.0 - lam)
    loss = loss.squeeze(1)
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
    if grad is not None:
        g = log_p.exp_() if p is None else p
        target_col = g.gather(1, k) - (1.0 - lam + lam / num_classes)
        if rest is not None:
            from_rest = (lam * (1.0 - 1.0 / num_classes)) - rest / (p_k + rest)
            target_col = torch.where(confident, from_rest, target_col)
        if lam != 0.0:
            g.sub_(lam / num_classes)
        g.scatter_(1, k, target_col)
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

    def loss_and_grad(
        self,
        logits,
        target,
        label_smoothing,
        ignore_index,
        reduction,
        compute_grad,
        normalizer=None,
        recipe=None,
        lse=None,
    ):
        """``Backend.loss_and_grad`` with the count, the gradient's factor and the reduction read on the
        host (free on CPU), and the gradient from ``new_gradient``; the recipe options and the lse
        through ``cpu_recipe.recipe_rows`` (``forward_recipe``'s rows)."""
        num_classes = logits.shape[1]
        acc = loss_dtype(logits.dtype)
        k, valid, counted = _targets(target, num_classes, ignore_index)
        if reduction != "mean":
            denominator = 1.0
        elif normalizer is not None:
            denominator = float(normalizer)
        else:
            denominator = float(max(counted, 1))  # no counted target: loss 0, not NaN
        grad_scale, factor = kept_factors(denominator, logits.dtype)
        grad = new_gradient(logits) if compute_grad else None
        if not wants_recipe(recipe, lse is not None):
            rows = self._rows(logits.detach(), k, valid, label_smoothing, grad, grad_scale, acc)
        else:
            rows = recipe_rows(
                self, logits.detach(), k, valid, label_smoothing, grad, grad_scale, recipe or Recipe(), lse
            )
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / denominator if denominator > 0 else rows.new_zeros(())
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
        num_classes = logits.shape[1]
        k, valid, _ = _targets(target, num_classes, ignore_index)
        acc = loss_dtype(logits.dtype)
        return self._rows(logits.detach(), k, valid, label_smoothing, grad, float(grad_scale), acc)

    def forward_recipe(self, logits, target, label_smoothing, ignore_index, grad, grad_scale, recipe, lse=None):
        """``Backend.forward_recipe`` (whose docstring states the math): ``forward`` where every option is
        off and no lse is asked for, else ``cpu_recipe.recipe_rows`` (its blocks and roundings)."""
        if not wants_recipe(recipe, lse is not None):
            return self.forward(logits, target, label_smoothing, ignore_index, grad, grad_scale)
        if logits.shape[0] == 0:  # (a fused linear loss's empty chunk)
            return torch.zeros(0, dtype=loss_dtype(logits.dtype))
        k, valid, _ = _targets(target, logits.shape[1], ignore_index)
        return recipe_rows(self, logits.detach(), k, valid, label_smoothing, grad, float(grad_scale), recipe, lse)

    def _block_rows(self, n_rows, num_classes, block_elements=None):
        """(workers, rows per block) of ``_run_blocks`` for this shape and budget (``self.block_elements``
        where None): a thread per torch thread where there are four blocks each, else one."""
        threads = torch.get_num_threads()
        budget = self.block_elements if block_elements is None else block_elements
        workers = threads if n_rows * num_classes >= 4 * threads * budget else 1
        return workers, min(n_rows, max(workers, budget // (workers * num_classes), 1))

    def _run_blocks(self, block, n_rows, num_classes, acc, buffers=None, block_elements=None):
        """``block(start, stop, scratch)`` over the rows in blocks of ``block_elements``; True where any is.
        ``acc`` is the scratch's dtype, or None to work in place (no scratch). ``buffers``: None for one
        (rows, V) scratch; a count for a (count, rows, V) one. ``block_elements``: this call's own budget
        (``self.block_elements`` where None).

        With several torch threads and blocks enough, each of that many Python threads takes every
        so-many-th block with its own scratch (``block_elements`` shared between them) and runs its
        ops single-threaded: no parallel region per op, whose end waits for every thread (a loaded
        machine delays each by a scheduler slice). Otherwise one loop, a parallel region per op.
        """
        threads = torch.get_num_threads()
        workers, rows_per_block = self._block_rows(n_rows, num_classes, block_elements)
        starts = range(0, n_rows, rows_per_block)
        shape = (rows_per_block, num_classes) if buffers is None else (buffers, rows_per_block, num_classes)

        def run(worker):
            scratch = None if acc is None else torch.empty(shape, dtype=acc)
            confident = False
            for start in starts[worker::workers]:
                stop = min(start + rows_per_block, n_rows)
                confident |= block(start, stop, None if scratch is None else scratch.narrow(-2, 0, stop - start))
            return confident

        if workers == 1:
            return run(0)
        torch.set_num_threads(1)  # the workers' ops take this count when they first run
        try:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="smoothce-cpu") as pool:
                return any(list(pool.map(run, range(workers))))
        finally:
            torch.set_num_threads(threads)

    def _rows(self, logits, k, valid, lam, grad, scale, acc):
        """``forward`` on checked targets ``k`` (N, 1) and ``valid`` (None: no ignored row), ``scale`` a float."""
        n_rows, num_classes = logits.shape
        if n_rows * num_classes <= _SMALL_ELEMENTS:
            return _forward_small(logits, k, valid, lam, grad, scale, acc)
        z_k = logits.gather(1, k).to(acc).squeeze(1)
        # Per row: p_k (log p_k without a gradient), and q = sum_{j != k} p_j in blocks with a
        # confident row; s = sum_j z_j, in fp64 where that costs nothing.
        stats = torch.empty((2, n_rows, 1), dtype=acc)
        p_k, rest = stats[0], stats[1]
        # Without a gradient, fp32 work takes the log-softmax (one pass fewer); fp64 keeps the
        # renormalised softmax, whose sum the log-softmax cannot correct.
        log_space = grad is None and acc != torch.float64
        # The gradient may be written over the logits (the fused linear loss does): then nothing
        # after the loop may read them. Each block then keeps its row max m before the softmax,
        # and r = m - log(max_j p_j) for the rows whose p_k underflows (max_j p_j = 1 / sum_j exp(z_j - m),
        # never tiny); and its rows with a large common offset take s in fp64 at once (below).
        aliased = grad is not None and grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        lse = torch.empty((n_rows, 1), dtype=acc) if aliased else None
        exact_sums = acc == torch.float64 or n_rows * num_classes <= _EXACT_SUM_ELEMENTS
        sum_dtype = torch.float64 if exact_sums or aliased else acc
        row_sum = torch.empty((n_rows, 1), dtype=sum_dtype) if lam != 0.0 else None

        # fp32/fp64 gradients are worked on in place, all rows at once (three passes, three parallel
        # regions); the rest go through an fp32 scratch block by block.
        in_place = grad is not None and grad.dtype == acc and grad.is_contiguous()
        offset = torch.tensor(-scale * lam / num_classes, dtype=acc)
        affine = scale != 1.0 or lam != 0.0

        def block(start, stop, p):
            """The rows [start, stop), in ``p`` (scratch; None in place); True where one is confident."""
            confident = False
            if stop - start == n_rows:  # one block: the whole tensors, no views
                x, k_block, p_k_block, rest_block, sum_block, grad_block = logits, k, p_k, rest, row_sum, grad
            else:
                x, k_block, p_k_block = logits[start:stop], k[start:stop], p_k[start:stop]
                rest_block = rest[start:stop]
                sum_block = None if row_sum is None else row_sum[start:stop]
                grad_block = None if grad is None else grad[start:stop]
            if in_place:
                p = grad_block
            elif x.dtype != acc:
                x = p.copy_(x)  # half inputs: upcast once, then work in place
            if aliased:
                row_max = torch.amax(x, 1, keepdim=True)
                if lam != 0.0:
                    _offset_exact_sum(x, row_max, sum_block, exact_sums)
            elif lam != 0.0:  # (half logits: from the upcast block; sum(dtype=float32) would copy them all)
                torch.sum(x, 1, keepdim=True, dtype=sum_block.dtype, out=sum_block)
            if log_space:  # no gradient: log p, and p only in a block with a confident row
                p = _log_softmax_(p, x)
                torch.gather(p, 1, k_block, out=p_k_block)
                if bool((p_k_block >= _LOG_CONFIDENT).any()):
                    confident = True
                    p.exp_().scatter_(1, k_block, 0.0)
                    torch.sum(p, 1, keepdim=True, out=rest_block)
                return confident
            p = _softmax_(p, x)
            if acc == torch.float64:  # ATen's running sum drifts by up to ~V/8 ulps: renormalise
                p.div_(p.sum(1, keepdim=True))
            torch.gather(p, 1, k_block, out=p_k_block)
            if aliased and bool((p_k_block < _TINY).any()):
                torch.sub(row_max, torch.amax(p, 1, keepdim=True).log_(), out=lse[start:stop])
            if bool((p_k_block >= _CONFIDENT).any()):
                confident = True
                p.scatter_(1, k_block, 0.0)  # the target column is written after the loop
                torch.sum(p, 1, keepdim=True, out=rest_block)
            if grad is None:
                return confident
            if affine:  # p <- scale * p - scale * lam / V, in fp32/fp64
                torch.add(offset, p, alpha=scale, out=p)
            if not in_place:
                grad_block.copy_(p)  # rounded to the gradient's dtype once
            return confident

        any_confident = self._run_blocks(block, n_rows, num_classes, None if in_place else acc)

        p_k, rest = p_k.squeeze(1), rest.squeeze(1)
        any_tiny = False
        if log_space:
            log_p_k, p_k = p_k, None
            loss = -log_p_k
            if any_confident:
                confident = log_p_k >= _LOG_CONFIDENT
                loss = torch.where(confident, torch.log1p(rest / log_p_k.exp()), loss)
        else:
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
                refine = mean_term.abs() * lam > _OFFSET_RATIO * (loss + smoothing)
                if valid is not None:
                    refine &= valid
                if bool(refine.any()):  # a large common offset: the mean again, summed in fp64
                    exact_mean = logits[refine].to(torch.float64).mean(1)
                    smoothing[refine] = (lam * (z_k[refine].double() - exact_mean)).to(acc)
            loss = loss + smoothing
        if any_tiny or log_space:
            loss = torch.where(z_k == -math.inf, math.inf, loss)  # p_k = 0 whatever lam: not inf - inf
        if valid is not None:
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
            if valid is not None:
                grad.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)  # only the ignored rows
        return loss
