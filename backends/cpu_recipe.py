"""The "cpu" backend's rows with the recipe options (class weights, z-loss, soft-capping) and the lse out.

``CpuBackend.forward_recipe`` and its ``loss_and_grad`` call ``recipe_rows``; the plain loss keeps
``CpuBackend._rows``. Per row, in fp32 (fp64 for fp64 logits), with t = tanh(z / c) where there is a cap:
the row max m of z', d = z' - m, sum_j w_j d_j (all terms <= 0), e = exp(d), q = sum_{j != k} e_j, and
the gradient's finishing pass (a e_j - b_j)(1 - t_j^2), each element rounded to the gradient's dtype
once. The per-row rest (the loss, lse, the target column) is done once for all rows afterwards, in fp64.
Inputs of up to ``SMALL_ELEMENTS`` logits run on a float64 copy.

Two implementations of those per-row sums and the gradient:

* the compiled kernel (``cpu_kernel``, ``cpu_recipe_kernel.cpp``), for fp32/bf16/fp16 logits and
  gradients with unit column strides, where a C++ compiler built it: one fused loop per row, the row
  read from memory once, a row or two of fp32 scratch per worker thread (a cap's t; e for a half
  gradient). Soft-capping, z-loss and weights cost about what the plain loss does.
* the vectorized-torch blocks (``_torch_blocks``), for the rest (fp64, column strides, no compiler,
  ``SMOOTHCE_CPU_KERNEL=0``): ``CpuBackend._run_blocks``'s blocks of rows (``block_budget``), one Python
  thread per torch thread; a contiguous fp32/fp64 gradient worked in place (it may be the logits
  themselves), other gradients through an fp32 scratch block; t kept in a scratch block where there is a
  cap; c t - m in one fused op, sum_j w_j d_j as a matrix-vector product, the target column zeroed
  before q, 1 - t^2 by ``tanh_backward``. Scratch, per worker: none for an fp32/fp64 gradient without a
  cap, else one or two blocks, each at most the plain loss's one fp32 block for half logits. Cost: the
  plain loss streams a block through three passes (a sum, ATen's fused softmax, one affine pass); the
  cap adds three (z / c, tanh, the chain rule), tanh is the dearest elementwise op after exp, and every
  op is a Python call per block (about twenty; a scalar operand as a 0-d tensor, since a Python number
  is wrapped in a new tensor on every call): about 1.4-1.5x the plain loss with every option on.
"""

from __future__ import annotations

import torch

from smoothce.backends import cpu_kernel
from smoothce.numerics import loss_dtype

# Up to this many logits the rows are computed on a float64 copy: per-call overhead dominates there.
SMALL_ELEMENTS = 1 << 13
_TANH_BACKWARD = torch.ops.aten.tanh_backward.grad_input  # g (1 - t^2), written into g
# On one thread the blocks hold block_elements / BLOCK_DIVISOR logits (256K, 1 MiB of fp32): a block and a
# cap's t block stay in the core's L2 cache. With several workers they are the plain loss's, since each of a
# block's twenty Python calls may wait for the GIL the workers share, and smaller blocks were slower there
# (benchmarks/results/cpu/recipe).
BLOCK_DIVISOR = 4


def recipe_rows(backend, logits, k, valid, lam, grad, scale, recipe, lse):
    """``Backend.forward_recipe`` on checked targets: ``k`` (N, 1) int64 with ignored rows on class 0,
    ``valid`` (N,) bool or None where no row is ignored, ``scale`` a float; ``backend`` the
    ``CpuBackend`` whose ``_run_blocks`` and ``block_elements`` it uses. Returns the (N,) rows' losses
    in the loss dtype.

    For a row z with target k, weights w (ones without ``recipe.weight``), W = sum_j w_j, z-loss s
    and cap c, on z'_j = c t_j, t_j = tanh(z_j / c) (z' = z without a cap), with m the row max of z'
    (0 where it is not finite), d_j = z'_j - m <= 0, e_j = exp(d_j), q = sum_{j != k} e_j,
    S = e_k + q, L = log S, lse = m + L and p_k = e_k / S:

        loss = (1 - lam) w_k (L - d_k) + (lam / V) (W L - sum_j w_j d_j) + s w_k lse^2
        grad_j = scale (A e_j / S - (lam / V) w_j) (1 - t_j^2),  A = (1 - lam) w_k + (lam / V) W + 2 s w_k lse
        grad_k = scale ((lam / V) (W p_k - w_k) + 2 s w_k lse p_k - (1 - lam) w_k q / S) (1 - t_k^2)

    (``Backend.forward_recipe``'s math with lse - z'_j = L - d_j: every sum has terms of one sign,
    whatever offset the row shares; 1 - t^2 is 1 without a cap.) A confident row (e_k >= q, p_k >= 1/2)
    takes L - d_k = log1p(q / e_k): 1 - p_k = q / S and -log p_k keep their digits below the ulp of 1.
    A term whose weight is 0 (lam = 0 or 1, s = 0) is left out: no 0 x inf.
    """
    acc = loss_dtype(logits.dtype)
    if logits.numel() > SMALL_ELEMENTS or acc == torch.float64:
        return _blocked(backend, logits, k, valid, lam, grad, scale, recipe, lse)
    # Small inputs: the same code in float64, each result rounded once.
    weight = None if recipe.weight is None else recipe.weight.double()
    grad64 = None if grad is None else torch.empty(logits.shape, dtype=torch.float64)
    lse64 = None if lse is None else torch.empty(logits.shape[0], dtype=torch.float64)
    rows = _blocked(backend, logits.double(), k, valid, lam, grad64, scale, recipe._replace(weight=weight), lse64)
    if grad is not None:
        grad.copy_(grad64)
    if lse is not None:
        lse.copy_(lse64)
    return rows.to(acc)


def block_budget(backend):
    """The logits per round of blocks (one block a worker) that ``_run_blocks`` shares between the workers."""
    if torch.get_num_threads() == 1:
        return backend.block_elements // BLOCK_DIVISOR
    return backend.block_elements


def _blocked(backend, logits, k, valid, lam, grad, scale, recipe, lse):
    """``recipe_rows``'s work at the logits' own precision (fp32, fp64 for fp64)."""
    n_rows, num_classes = logits.shape
    acc = loss_dtype(logits.dtype)
    cap, z_loss, weight = recipe.softcap, float(recipe.z_loss), recipe.weight
    smooth = lam / num_classes
    if weight is not None:
        weight = weight.to(acc).contiguous()
        w_k = weight.gather(0, k.squeeze(1)).unsqueeze(1)  # (N, 1)
        total_weight = float(weight.sum(dtype=torch.float64))
    else:
        w_k, total_weight = None, float(num_classes)

    # Per row: z_k (before the blocks: the gradient may be written over the logits), and from the
    # blocks -m, e_k, q, S and sum_j w_j d_j.
    z_k = logits.gather(1, k).double().squeeze(1)
    stats = torch.empty((7, n_rows, 1), dtype=acc)
    # The gradient's finishing pass a e - b: the row's a = (coeff + z_coeff lse) / S, coeff = scale ((1 - lam)
    # w_k + (lam / V) W), z_coeff = scale 2 s w_k, and the column's b = scale (lam / V) w_j.
    coeff = z_coeff = None
    if grad is not None:
        coeff = torch.tensor(scale * (1.0 - lam + smooth * total_weight), dtype=acc)
        if w_k is not None:
            coeff = (w_k * (scale * (1.0 - lam))).add_(scale * smooth * total_weight)
        if z_loss != 0.0:
            z_coeff = torch.tensor(2.0 * z_loss * scale, dtype=acc) if w_k is None else w_k * (2.0 * z_loss * scale)
    column = -scale * smooth  # the column term -b_j = column w_j

    lib = cpu_kernel.library() if cpu_kernel.takes(logits, grad) else None
    if lib is not None:  # the compiled rows: one fused loop per row
        kernel_args = (k.contiguous(), grad, weight, column, coeff, z_coeff, cap, stats[:5].unbind(0))
        cpu_kernel.recipe_rows(lib, logits, *kernel_args, smooth != 0.0)
    else:
        _torch_blocks(backend, logits, k, grad, weight, cap, smooth, acc, stats, coeff, z_coeff, column)

    # Per row, in fp64: z'_k - m from z_k, t_k = tanh(z_k / c).
    m, e, q, s, spread = stats[:5].squeeze(2).double()
    m = m.neg_()
    t_k = None if cap is None else torch.tanh(z_k / cap)
    d = z_k - m if cap is None else cap * t_k - m
    log_total = s.log()
    row_lse = m + log_total
    if lse is not None:
        lse.copy_(row_lse)
    target_weight = 1.0 if w_k is None else w_k.squeeze(1).double()
    loss = torch.zeros(n_rows, dtype=torch.float64)
    if lam != 1.0:  # lse - z'_k = L - d_k, two terms >= 0; log1p(q / e_k) for a confident row
        target_term = torch.where(e >= q, torch.log1p(q / e), log_total - d)
        loss += (1.0 - lam) * target_weight * target_term
    if smooth != 0.0:
        loss += smooth * (total_weight * log_total - spread)
    if z_loss != 0.0:
        loss += z_loss * target_weight * row_lse.square()
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
    if grad is not None:
        p_k = e / s
        target_col = torch.zeros(n_rows, dtype=torch.float64)
        if smooth != 0.0:
            target_col += smooth * (total_weight * p_k - target_weight)
        if z_loss != 0.0:
            target_col += 2.0 * z_loss * target_weight * row_lse * p_k
        if lam != 1.0:
            target_col -= (1.0 - lam) * target_weight * (q / s)
        if cap is not None:
            target_col *= 1.0 - t_k.square()
        # (index_put_, not scatter_: torch 2.13's CPU scatter_ into half tensors copies them whole)
        grad.index_put_((torch.arange(n_rows), k.squeeze(1)), (target_col * scale).to(grad.dtype))
        if valid is not None:
            grad.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)  # only the ignored rows
    return loss.to(acc)


def _torch_blocks(backend, logits, k, grad, weight, cap, smooth, acc, stats, coeff, z_coeff, column_factor):
    """``_blocked``'s per-row sums (and the gradient but its target column) in vectorized torch, block by
    block (``backend._run_blocks``): where the compiled kernel does not serve (``cpu_kernel.takes``) or
    cannot be built. ``column_factor``: the gradient's column term is column_factor w_j."""
    n_rows, num_classes = logits.shape
    column = None
    if grad is not None and smooth != 0.0:  # (1, V) even without weights: addcmul with two broadcast operands
        column = torch.full((1, num_classes), column_factor, dtype=acc)  # is not vectorized
        if weight is not None:
            column.mul_(weight)
    in_place = grad is not None and grad.dtype == acc and grad.is_contiguous()
    buffers = (0 if in_place else 1) + (0 if cap is None else 1)
    # Scalar operands as 0-d tensors (a Python number in a tensor's place is wrapped anew on every call).
    inverse_cap = None if cap is None else torch.tensor(1.0 / cap, dtype=acc)
    neg_cap = None if cap is None else torch.tensor(-cap, dtype=acc)
    elements = block_budget(backend)
    # Each block's views, made once (a Python slice per tensor and block costs microseconds).
    rows = backend._block_rows(n_rows, num_classes, elements)[1]
    n_blocks = -(-n_rows // rows)

    def split(v):
        return [v] * n_blocks if v is None or v.dim() == 0 else v.split(rows)

    # Per row: -m, e_k, q, S, the smoothing sum, the finishing pass's a, and 0 (scatter_'s source).
    neg_max, e_k, rest, total, spread, row_coeff, zeros = stats.unbind(0)
    zeros.zero_()
    views = list(
        zip(
            logits.split(rows),
            k.split(rows),
            neg_max.split(rows),
            e_k.split(rows),
            rest.split(rows),
            total.split(rows),
            split(spread if weight is None else spread.squeeze(1)),
            row_coeff.split(rows),
            zeros.split(rows),
            split(grad),
            split(coeff),
            split(z_coeff),
            strict=True,
        )
    )

    def block(start, stop, scratch):
        """The rows [start, stop): e in the gradient block (in place) or a scratch block. (False: no
        confident row to report, ``_run_blocks``'s return; q is summed in every block.)"""
        x, k_block, shift, e_block, q_block, s_block, spread_block, a, zero, g, c_block, z_block = views[start // rows]
        scratch = () if scratch is None else scratch.unbind(0)
        work = g if in_place else scratch[0]
        if cap is not None:
            t = scratch[-1]
            if x.dtype == acc:
                torch.mul(x, inverse_cap, out=t)
            else:  # half logits: upcast, then scale (a half product would be rounded to half)
                t.copy_(x).mul_(inverse_cap)
            t.tanh_()
            torch.amax(t, 1, keepdim=True, out=shift).mul_(neg_cap)  # -m, the row max of z' = c t
            torch.add(shift, t, alpha=cap, out=work)  # d = c t - m, rounded once
        else:
            if x.dtype != acc:
                x = work.copy_(x)  # half logits: upcast once, then work in place
            torch.amax(x, 1, keepdim=True, out=shift).nan_to_num_(0.0, 0.0, 0.0).neg_()  # all -inf: m~ = 0
            torch.add(x, shift, out=work)
        if smooth != 0.0:
            if weight is None:
                torch.sum(work, 1, keepdim=True, out=spread_block)
            else:
                torch.mv(work, weight, out=spread_block)
        work.exp_()
        torch.gather(work, 1, k_block, out=e_block)
        work.scatter_(1, k_block, zero)  # q without the target; its gradient is written after the blocks
        torch.sum(work, 1, keepdim=True, out=q_block)
        torch.add(q_block, e_block, out=s_block)
        if g is None:
            return False
        if z_block is None:
            torch.div(c_block, s_block, out=a)
        else:  # + 2 s w_k lse, lse = m + log S
            torch.log(s_block, out=a).sub_(shift)
            torch.addcmul(c_block, z_block, a, out=a).div_(s_block)
        if column is None:
            work.mul_(a)
        else:
            torch.addcmul(column, work, a, out=work)
        if cap is not None:  # the cap's chain rule, x (1 - t^2)
            _TANH_BACKWARD(work, t, grad_input=work)
        if not in_place:
            g.copy_(work)  # rounded to the gradient's dtype once
        return False

    backend._run_blocks(block, n_rows, num_classes, acc if buffers else None, buffers, elements)
