"""Triton kernels for the two halves of the vocabulary-parallel loss, and their launchers.

``smoothce.distributed`` splits the classes over ranks: a rank holds the columns
[start, start + V_i) of the logits, V = sum of the V_i. It needs two things per rank
(``Backend.shard_stats`` and ``Backend.shard_grad`` state the contract; the torch
defaults in ``base`` compute the same):

``shard_stats_kernel``, one program per row of the slice z (V_i values), one sweep over
blocks of ``BLOCK_V`` columns, in float32 (float64 for float64 logits). Each lane l of the
block (columns l, l + BLOCK_V, ...) keeps its own running max m_l, remainder r_l and sum t_l,
so the loop has no cross-lane reduction and one exp per value: for a value z of lane l,

    z > m_l (a new max):  r_l' = (r_l + 1) exp(m_l - z) = r_l e + e,  m_l' = z
    otherwise:            r_l' = r_l + exp(z - m_l)                   (a tie adds an exact 1)
    t_l' = t_l + n_l (m~_l - m~_l') + (z - m~_l'),  n_l = the lane's values so far  (lam > 0 only)

with m~ = m where finite, else 0. After the sweep the lanes combine like ranks do in
``smoothce.distributed``: m = max_l m_l, the first lane holding m keeps r_l, every other adds
(1 + r_l) exp(m_l - m), and t = sum_l t_l + n_l (m~_l - m~). So R = sum over all values but one
max of exp(z_j - m) and t = sum_j (z_j - m~), with no sum ever taken over raw logits and no 1
ever added to R. It writes the (4, N) rows m, R, t, z_k.

``shard_grad_kernel``, one program per row, one sweep, from the global row max M and the
excess e = S - 1 of S = sum_j exp(z_j - M) over all V classes:

    grad_j = c (p_j - lam / V),  p_j = exp(z_j - M) / S                      j != k - start
    grad_k = c ((p_k - lam / V) - (1 - lam)),  or c ((lam - lam / V) - e / S) when z_k = M, e < 1

each rounded to the gradient's dtype once; ignored rows read nothing and write zeros.

``start`` and ``V`` are Python ints or 0-d int64 device tensors (then read by the kernel,
so the host never waits for them); constexpr switches pick which. Row and column offsets
are 64-bit and every tensor has its own strides. Like ``triton_kernels`` this module
imports Triton at import time and the backends import it at the first launch; Triton
reads ``TRITON_INTERPRET`` then, which is what lets the kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoothce.backends.base import loss_dtype
from smoothce.backends.triton_backend import next_power_of_2
from smoothce.backends.triton_kernels import check_device, device_guard, split_float

# The sweep kernels' blocks: 4 KiB of logits (2048 bfloat16 or 1024 float32 columns) and 8 warps.
# On an H200 (4096 x 128256) the stats kernel took 0.49 ms (bfloat16) and 0.55 ms (float32) so,
# against 0.76 and 1.1 ms with the single-process kernel's 8192 / 4096 columns and 16 warps.
BLOCK_BYTES = 4096
MAX_NUM_WARPS = 8
MIN_BLOCK_V = 16


@triton.jit
def _scalar(value, IN_MEMORY: tl.constexpr):
    # An int argument, or (IN_MEMORY) a pointer to a 0-d int64 tensor holding it.
    if IN_MEMORY:
        return tl.load(value).to(tl.int64)
    else:
        return tl.cast(value, tl.int64)


@triton.jit
def shard_stats_kernel(
    # pointers
    logits_ptr,  # (N, V_i) float16/bfloat16/float32/float64
    target_ptr,  # (N,) int32/int64 global class ids, contiguous
    stats_ptr,  # (4, N) float32 (float64 for float64 logits), contiguous: m, R, t, z_k
    start,  # global class of column 0: an int, or a pointer to it (START_IN_MEMORY)
    # strides, in elements
    stride_logits_row,
    stride_logits_col,
    # sizes and scalars
    n_rows,
    local_classes,  # V_i
    ignore_index,
    # compile-time switches
    BLOCK_V: tl.constexpr,
    START_IN_MEMORY: tl.constexpr,
    SMOOTHING: tl.constexpr,  # lam > 0: compute t (else it is written as 0)
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    offsets = tl.arange(0, BLOCK_V)

    # Per lane l (one column of each block): its max m_l, remainder r_l (its other values'
    # exp(z - m_l)) and t_l = sum (z - m~_l). No cross-lane reduction inside the loop.
    m = tl.full((BLOCK_V,), float("-inf"), ACC_DTYPE)
    r = tl.zeros((BLOCK_V,), ACC_DTYPE)
    t = tl.zeros((BLOCK_V,), ACC_DTYPE)
    for col in range(0, local_classes, BLOCK_V):
        cols = col + offsets
        mask = cols < local_classes
        # Masked tails read -inf: no new max, exp(-inf) = 0 in r, left out of t.
        z = tl.load(logits_row + cols.to(tl.int64) * stride_logits_col, mask=mask, other=float("-inf"))
        z = z.to(ACC_DTYPE)
        up = z > m  # a new lane max: the old max's 1 joins the remainder; ties add an exact 1
        hi = tl.maximum(z, m)
        hi_shift = tl.where(hi == float("-inf"), 0.0, hi)  # no exp sees -inf - (-inf)
        e = tl.exp(tl.minimum(z, m) - hi_shift)  # exp(m - z) on a new max, else exp(z - m): one exp
        r = tl.where(up, r * e + e, r + e)  # (r + 1) e as r e + e: the 1 never meets r in one rounding
        if SMOOTHING:
            # Move the lane's col / BLOCK_V values so far from its old shift to the new one.
            old_shift = tl.where(m == float("-inf"), 0.0, m)
            moved = tl.cast(col // BLOCK_V, ACC_DTYPE) * (old_shift - hi_shift)
            t = tl.where(mask, t + moved + (z - hi_shift), t)
        m = hi

    # Lanes to row, as ranks to the whole row in smoothce.distributed: the first lane holding the
    # max keeps its remainder, every other lane adds (1 + r_l) exp(m_l - m).
    row_max = tl.max(m, axis=0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    first = tl.min(tl.where(m == row_max, offsets, BLOCK_V), axis=0)  # (all -inf: lane 0, whose r is 0)
    c = tl.exp(m - shift)
    r_row = tl.sum(tl.where(offsets == first, r, r * c + c), axis=0)
    t_row = tl.zeros((), ACC_DTYPE)
    if SMOOTHING:
        seen = tl.maximum(local_classes - offsets + BLOCK_V - 1, 0) // BLOCK_V  # values in each lane
        lane_shift = tl.where(m == float("-inf"), 0.0, m)
        t_row = tl.sum(t + tl.cast(seen, ACC_DTYPE) * (lane_shift - shift), axis=0)

    target = tl.load(target_ptr + row).to(tl.int64)
    k = target - _scalar(start, START_IN_MEMORY)
    owned = (target != ignore_index) & (k >= 0) & (k < local_classes)
    z_k = tl.load(logits_row + tl.where(owned, k, 0) * stride_logits_col, mask=owned, other=0.0).to(ACC_DTYPE)
    out = stats_ptr.dtype.element_ty
    n = tl.cast(n_rows, tl.int64)  # the stride between the four rows of stats
    tl.store(stats_ptr + row, row_max.to(out))
    tl.store(stats_ptr + n + row, r_row.to(out))
    tl.store(stats_ptr + 2 * n + row, t_row.to(out))
    tl.store(stats_ptr + 3 * n + row, z_k.to(out))


@triton.jit
def shard_grad_kernel(
    # pointers
    logits_ptr,  # (N, V_i)
    target_ptr,  # (N,) int32/int64 global class ids, contiguous
    row_max_ptr,  # (N,) global row max M, accumulation dtype
    excess_ptr,  # (N,) e = S - 1, accumulation dtype
    grad_scale_ptr,  # 0-d: the gradient's factor c
    grad_ptr,  # (N, V_i) in the logits' dtype, written
    start,  # an int, or a pointer to it (START_IN_MEMORY)
    num_classes,  # the global V: an int, or a pointer to it (V_IN_MEMORY)
    # strides, in elements
    stride_logits_row,
    stride_logits_col,
    stride_grad_row,
    stride_grad_col,
    stride_row_max,
    stride_excess,
    # sizes and scalars
    local_classes,
    ignore_index,
    lam_hi,  # lam = lam_hi + lam_lo, both exact in float32 (float64 rows see lam to ~48 bits)
    lam_lo,
    # compile-time switches
    BLOCK_V: tl.constexpr,
    START_IN_MEMORY: tl.constexpr,
    V_IN_MEMORY: tl.constexpr,
    SMOOTHING: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = target != ignore_index
    k = target - _scalar(start, START_IN_MEMORY)
    owned = valid & (k >= 0) & (k < local_classes)
    k = tl.where(owned, k, -1)  # -1 matches no column
    lam = tl.cast(lam_hi, ACC_DTYPE) + tl.cast(lam_lo, ACC_DTYPE)
    smooth = lam / _scalar(num_classes, V_IN_MEMORY).to(ACC_DTYPE)
    row_max = tl.load(row_max_ptr + row * stride_row_max).to(ACC_DTYPE)
    excess = tl.load(excess_ptr + row * stride_excess).to(ACC_DTYPE)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    inv_sum = tl.where(valid, 1.0 / tl.where(valid, 1.0 + excess, 1.0), 0.0)  # ignored rows: no 1 / 0
    scale = tl.where(valid, tl.load(grad_scale_ptr).to(ACC_DTYPE), 0.0)
    logits_row = logits_ptr + row * stride_logits_row

    # The target column: p_k - 1 = -e / S where z_k is the max and p_k > 1/2 (a confident row
    # keeps its digits); else (p_k - lam / V) - (1 - lam), exact at lam = 1.
    z_k = tl.load(logits_row + tl.where(owned, k, 0) * stride_logits_col, mask=owned, other=0.0).to(ACC_DTYPE)
    p_k = tl.exp(z_k - shift) * inv_sum
    g_k = tl.where((z_k == row_max) & (excess < 1.0), (lam - smooth) - excess * inv_sum, (p_k - smooth) - (1.0 - lam))

    n_read = tl.where(valid, local_classes, 0)  # ignored rows read nothing
    grad_row = grad_ptr + row * stride_grad_row
    offsets = tl.arange(0, BLOCK_V)
    for col in range(0, local_classes, BLOCK_V):
        cols = col + offsets
        cols64 = cols.to(tl.int64)
        z = tl.load(logits_row + cols64 * stride_logits_col, mask=cols < n_read, other=float("-inf"))
        g = tl.exp(z.to(ACC_DTYPE) - shift) * inv_sum
        if SMOOTHING:
            g -= smooth
        g = tl.where(cols == k, g_k, g)
        g = tl.where(valid, g * scale, 0.0)
        tl.store(grad_row + cols64 * stride_grad_col, g.to(grad_ptr.dtype.element_ty), mask=cols < local_classes)




def launch_config(local_classes: int, dtype: torch.dtype, *, max_block_v: int | None = None,
                  options: dict | None = None) -> dict:
    """``block`` (BLOCK_V, a power of two), ``num_warps`` and compile ``options`` for slices of V_i columns.

    ``max_block_v`` caps the block (tests use 16 so small slices take several blocks).
    """
    block = min(BLOCK_BYTES // dtype.itemsize, next_power_of_2(local_classes))
    if max_block_v:
        block = min(block, max_block_v)
    block = max(MIN_BLOCK_V, block)
    num_warps = min(MAX_NUM_WARPS, max(1, block * dtype.itemsize // 512))
    config = {"block": block, "num_warps": num_warps}
    if options:
        config["options"] = options
    return config


def _scalar_arg(value, name: str, device: torch.device):
    """(kernel argument, in memory?) for an int or a 0-d int64 tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype != torch.int64 or value.device != device:
            raise ValueError(
                f"{name} must be a Python int or a 0-d int64 tensor on {device}, got a "
                f"{tuple(value.shape)} {value.dtype} tensor on {value.device}"
            )
        return value, True
    return int(value), False


def _prepare(logits: torch.Tensor, config: dict):
    """Checks shared by both launchers: (the context that launches on the logits' device, BLOCK_V)."""
    block_v = config["block"]
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    check_device(logits.device)
    return device_guard(logits.device), block_v


def shard_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    start: int | torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    config: dict,
) -> torch.Tensor:
    """Launch ``shard_stats_kernel``: the (4, N) rows m, R, t, z_k of ``Backend.shard_stats``.

    ``config`` is the launch configuration (``launch_config``): ``block`` is the kernel's
    BLOCK_V, ``num_warps`` and ``options`` (extra compile options) are used as they are.
    """
    n_rows, local_classes = logits.shape
    guard, block_v = _prepare(logits, config)
    stats = torch.zeros(4, n_rows, dtype=loss_dtype(logits.dtype), device=logits.device)
    if n_rows == 0:
        return stats
    start_arg, start_in_memory = _scalar_arg(start, "start", logits.device)
    acc_dtype = tl.float64 if logits.dtype == torch.float64 else tl.float32
    with guard:
        shard_stats_kernel[(n_rows,)](
            logits,
            target,
            stats,
            start_arg,
            logits.stride(0),
            logits.stride(1),
            n_rows,
            local_classes,
            ignore_index,
            BLOCK_V=block_v,
            START_IN_MEMORY=start_in_memory,
            SMOOTHING=label_smoothing > 0.0,
            ACC_DTYPE=acc_dtype,
            num_warps=config["num_warps"],
            **config.get("options", {}),
        )
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
    config: dict,
) -> None:
    """Launch ``shard_grad_kernel``: write ``Backend.shard_grad``'s gradient into ``grad`` (``config``: as above)."""
    n_rows, local_classes = logits.shape
    guard, block_v = _prepare(logits, config)
    if n_rows == 0:
        return
    start_arg, start_in_memory = _scalar_arg(start, "start", logits.device)
    vocab_arg, vocab_in_memory = _scalar_arg(num_classes, "num_classes", logits.device)
    lam_hi, lam_lo = split_float(float(label_smoothing))
    acc_dtype = tl.float64 if logits.dtype == torch.float64 else tl.float32
    with guard:
        shard_grad_kernel[(n_rows,)](
            logits,
            target,
            row_max,
            excess,
            grad_scale,
            grad,
            start_arg,
            vocab_arg,
            logits.stride(0),
            logits.stride(1),
            grad.stride(0),
            grad.stride(1),
            row_max.stride(0),
            excess.stride(0),
            local_classes,
            ignore_index,
            lam_hi,
            lam_lo,
            BLOCK_V=block_v,
            START_IN_MEMORY=start_in_memory,
            V_IN_MEMORY=vocab_in_memory,
            SMOOTHING=label_smoothing > 0.0,
            ACC_DTYPE=acc_dtype,
            num_warps=config["num_warps"],
            **config.get("options", {}),
        )
