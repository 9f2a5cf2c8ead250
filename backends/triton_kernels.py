"""The Triton kernels of smoothce's cross-entropy and their launchers, shared by the CUDA and XPU backends.

For a row z of V logits with target k and smoothing lam, everything relative to the row max M:

    R     = sum_j exp(z_j - M) - 1        the remainder beside the max's exact 1, summed without it
    s_rel = sum_j (z_j - M) <= 0
    loss  = log1p(R) + (1 - lam) (M - z_k) + (lam / V) (-s_rel)        (three terms >= 0: no cancellation)
    grad_j = scale (p_j - lam / V),   grad_k = scale ((p_k - c_hi) - c_lo),   p_j = exp(z_j - M) / (1 + R)

which is the spec's loss = logsumexp(z) - (1 - lam) z_k - (lam / V) sum_j z_j and gradient
softmax(z) - lam / V - (1 - lam) onehot(k), with c = 1 - lam + lam / V split into two float32
halves c_hi + c_lo: p_k - c_hi is exact wherever the two are close (Sterbenz), so the target column
is rounded once for every lam (lam / V is split the same way). R is summed over every element
but one maximum, so a confident row (one dominant logit) keeps its tiny remainder and log1p(R)
its digits, where log(sum exp) would round the remainder away; a target holding the max takes
grad_k = scale (lam (1 - 1/V) - R / (1 + R)) for the same reason (p_k - 1 would lose R).

Three launches make a forward+backward, none of them waits on the host:

1. ``prologue_kernel`` (one program): reads the targets, asserts on the device that each is
   ignore_index or in [0, V), counts the non-ignored ones, zeroes the row counters, and writes the
   three scalars: the gradient's factor in the forward pass, the factor backward applies, and the
   factor of the summed loss (1/count for "mean").
2. ``split_kernel`` (the rows in chunks) or ``loop_kernel`` (a row per program): loss and gradient.
   ``split_kernel`` gives each chunk of CHUNK columns of a row its own program, which loads the
   chunk into registers once. The programs of a row exchange their (max, remainder, relative sum)
   through a small workspace and an arrival counter per row, then each writes its gradient from
   registers: the logits are read from memory once and the gradient written once. Without a
   gradient nobody waits: the last program of a row to arrive computes its loss. The waiting
   programs of a row are adjacent in the grid, and GPUs start programs in grid order, so a row's
   chunks are all running while any of them waits as long as the GPU can hold as many programs as
   a row has chunks (the launcher checks this). Triton's interpreter runs programs one after
   another, so there the kernel runs in two launches (PHASE 1 publishes the statistics, PHASE 2
   reads them and writes the gradient) over the same protocol. ``loop_kernel`` reads the row in
   blocks twice, for devices without the split and rows too long for it: statistics, kept per
   lane (each lane of a block its own max, remainder and sum, combined once at the end: no
   reduction across the block per block), then the gradient, one exp and one fused
   multiply-add per value (the target column written again after it); the second sweep walks
   backwards so it starts on what the first left in the cache, and full blocks load unmasked.
   On NVIDIA GPUs its float32 exps are PTX's ex2.approx.ftz (``_exp``): an exp below 2**-126
   becomes 0, which moves a gradient value by less than 2**-126 times the gradient's scale.
   For "sum" and "mean" the last program of the launch to finish sums the per-row losses in a
   fixed order (a deterministic result) and scales them.
3. ``scale_grad_kernel`` (backward): multiplies the kept gradient by dO times the backward factor,
   in place, and returns at once when that product is exactly 1 (``loss.backward()`` of a "mean"
   or "sum" loss of bfloat16/float32/float64 logits). Per-row dO for "none".

Half precision: float16 gradients are kept as 2**15 (p - ybar) x 2**e / count (2**e the largest
power of two <= count; at most 32768 < 65504) and backward applies dO x 2**-(15 + e) in float32:
a loss scale (GradScaler's 65536) reaches every entry before anything is rounded to float16 for
the last time, so small entries are not flushed to zero, and a power-of-two dO makes that last
product exact (each entry rounded once). bfloat16 shares float32's exponent range and keeps 1/count folded
into the forward pass (then ``loss.backward()`` needs no pass at all).

Row offsets are 64-bit (N * V > 2**31 elements work), and so are column offsets wherever
(V - 1) x the column stride passes int32 (large transposed logits).
Out-of-range targets never index out of bounds: the kernels clamp the index and treat the row as
ignored, after the prologue's device-side assert (compiled with ``debug=True``) has reported it;
on CPU tensors (the interpreter) the launcher raises a ValueError naming the value first.

This module imports Triton at import time; the backends import it when a kernel is first
launched. Triton reads ``TRITON_INTERPRET`` when the kernels are decorated, that is when this
module is imported: set it before the first launch.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from smoothce.checks import check_targets_on_host
from smoothce.numerics import kept_gradient_scale, loss_dtype

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))  # a constexpr: kernels may read only those globals


# ------------------------------------------------------------------------------------------------
# Pieces shared by the kernels.


@triton.jit
def _log1p(x):
    # log(1 + x) to a few ulps for x >= 0: log(u) * x / (u - 1) with u = 1 + x (Goldberg).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _exp(x, FAST: tl.constexpr):
    # exp(x) = 2**(x log2 e). FAST (float32 on NVIDIA GPUs): the hardware's ex2 with results below
    # 2**-126 flushed to 0, two instructions; else Triton's exp, which also rescales such results.
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _to_acc(z, ACC_DTYPE: tl.constexpr, FAST: tl.constexpr):
    # A loaded block in the accumulation dtype. FAST (NVIDIA): a bfloat16 pair, packed in a 32-bit
    # register, is its low half shifted up and its high half masked, one instruction per value.
    if FAST and z.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xFFFF0000;", "=r,=r,r", [z],
                                         dtype=tl.float32, is_pure=True, pack=2)
    else:
        return z.to(ACC_DTYPE)


@triton.jit
def _wide(hi, lo, ACC_DTYPE: tl.constexpr):
    # A constant passed as two float32 halves (Triton passes Python floats as float32): all of it
    # in float64 accumulation, its float32 rounding otherwise.
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def _block_stats(z, mask, SMOOTHING: tl.constexpr, FAST_EXP: tl.constexpr):
    """(m, rem, s) of a block: m = max z, rem = sum of exp(z - m) over all but one maximum,
    s = sum of (z - m); masked lanes hold -inf. A block with no finite value has m = -inf."""
    m = tl.max(z, axis=0)
    shift = tl.where(m == NEG_INF, 0.0, m)
    e = _exp(z - shift, FAST_EXP)
    is_max = (z == m) & mask
    ties = tl.sum(is_max.to(z.dtype), axis=0)
    rem = tl.sum(tl.where(is_max, 0.0, e), axis=0) + tl.maximum(ties - 1.0, 0.0)
    s = tl.zeros_like(m)
    if SMOOTHING:
        s = tl.sum(tl.where(mask, z - shift, 0.0), axis=0)
    return m, rem, s


@triton.jit
def _row_loss(R, M, z_k, s_rel, oml, lov, SMOOTHING: tl.constexpr):
    """loss = log1p(R) + (1 - lam) (M - z_k) + (lam / V) (-s_rel); oml = 1 - lam, lov = lam / V."""
    loss = _log1p(R)
    # (1 - lam) (M - z_k) is left out at lam = 1, where z_k = -inf would make it 0 * inf.
    loss += tl.where(oml == 0.0, 0.0, oml * tl.where(oml == 0.0, 0.0, M - z_k))
    if SMOOTHING:
        loss += lov * (-s_rel)
    return loss


@triton.jit
def _grad_values(z, is_k, shift, R, inv_d, scale, off_hi, off_lo, tgt_hi, tgt_lo, lam_k, FAST_EXP: tl.constexpr):
    # scale ((p - c_hi) - c_lo): c = lam / V off the target, 1 - lam + lam / V on it. A target
    # holding the max has p_k = 1 / (1 + R) and p_k - c = -R / (1 + R) + lam (1 - 1/V) (lam_k),
    # which keeps a confident row's tiny 1 - p_k where p_k - 1 would round it away.
    p = _exp(z - shift, FAST_EXP) * inv_d
    g = (p - tl.where(is_k, tgt_hi, off_hi)) - tl.where(is_k, tgt_lo, off_lo)
    g = tl.where(is_k & (z == shift), lam_k - R * inv_d, g)
    return g * scale


@triton.jit
def _reduce_rows(rows_ptr, loss_ptr, scalars_ptr, sync_ptr, n_rows, n_programs, ACC_DTYPE: tl.constexpr):
    # The last of the launch's programs to get here sums the per-row losses in a fixed order.
    tl.debug_barrier()
    done = tl.atomic_add(sync_ptr + n_rows, 1, sem="acq_rel")
    if done == n_programs - 1:
        offsets = tl.arange(0, 1024)
        acc = tl.zeros((1024,), ACC_DTYPE)
        for start in range(0, n_rows, 1024):
            cols = start + offsets
            acc += tl.load(rows_ptr + cols, mask=cols < n_rows, other=0.0, cache_modifier=".cg")
        total = tl.sum(acc, axis=0) * tl.load(scalars_ptr + 2).to(ACC_DTYPE)
        tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------
# 1. The prologue.


@triton.jit(debug=True)
def prologue_kernel(
    target_ptr,  # (N,) int32/int64
    sync_ptr,  # (n_sync,) int32: row counters and the done counter, zeroed here
    scalars_ptr,  # (3,) accumulation dtype, written
    n_rows,
    n_sync,
    num_classes,
    ignore_index,
    kept_scale,  # 2**15 for float16 gradients, else 1
    MEAN: tl.constexpr,
    FOLD: tl.constexpr,  # fold 1/count into the forward's gradient (all but float16)
    BLOCK: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK)
    count = tl.zeros((BLOCK,), tl.int64)
    for start in range(0, n_rows, BLOCK):
        rows = start + offsets
        inside = rows < n_rows
        t = tl.load(target_ptr + rows, mask=inside, other=0).to(tl.int64)
        counted = inside & (t != ignore_index)
        bad = counted & ((t < 0) | (t >= num_classes))
        tl.device_assert(bad == 0, "smoothce.cross_entropy: a target is out of range: expected [0, V) or ignore_index")
        count += counted.to(tl.int64)
    zeros = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, n_sync, BLOCK):
        tl.store(sync_ptr + start + offsets, zeros, mask=start + offsets < n_sync)
    acc_dtype = scalars_ptr.dtype.element_ty
    denominator = tl.full((), 1.0, acc_dtype)
    if MEAN:
        denominator = tl.maximum(tl.sum(count, axis=0), 1).to(acc_dtype)  # no target: loss 0, not NaN
    if FOLD:
        forward_factor = 1.0 / denominator
        backward_factor = tl.full((), 1.0, acc_dtype)
    else:
        # power = kept_scale x 2**e, 2**e <= count < 2**(e + 1) (the float32 exponent of the count,
        # exact below 2**24): backward's factor 1/power is a power of two (see kept_gradient_scale).
        bits = denominator.to(tl.float32).to(tl.int32, bitcast=True) & 0x7F800000
        power = bits.to(tl.float32, bitcast=True).to(acc_dtype) * kept_scale
        forward_factor = power / denominator
        backward_factor = 1.0 / power
    tl.store(scalars_ptr, forward_factor)
    tl.store(scalars_ptr + 1, backward_factor)
    tl.store(scalars_ptr + 2, 1.0 / denominator)


# ------------------------------------------------------------------------------------------------
# 2a. Rows split into chunks: one read, one write.


@triton.jit
def split_kernel(
    # pointers
    logits_ptr,  # (N, V) float16/bfloat16/float32/float64, any strides
    target_ptr,  # (N,) int32/int64
    rows_ptr,  # (N,) per-row loss, written (the result for "none")
    grad_ptr,  # (N, V) gradient in the logits' dtype, written when COMPUTE_GRAD
    scalars_ptr,  # [forward factor, backward factor, loss factor]
    stats_ptr,  # (N, num_chunks, 3) workspace: (m, rem, s) per chunk
    sync_ptr,  # (N + 1,) int32 zeros: arrivals per row, then the done counter
    loss_ptr,  # 0-d reduced loss, written when REDUCE
    # strides, in elements
    stride_lr,
    stride_lc,
    stride_gr,
    stride_gc,
    # sizes and constants
    n_rows,
    num_classes,
    num_chunks,
    ignore_index,
    oml_hi,  # 1 - lam = oml_hi + oml_lo
    oml_lo,
    lov_hi,  # lam / V = lov_hi + lov_lo, for the loss
    lov_lo,
    off_hi,  # lam / V = off_hi + off_lo, for the gradient
    off_lo,
    tgt_hi,  # 1 - lam + lam / V = tgt_hi + tgt_lo, for the target column
    tgt_lo,
    lamk_hi,  # lam (1 - 1/V) = lamk_hi + lamk_lo, for a target column holding the max
    lamk_lo,
    # compile-time switches
    CHUNK: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,  # a power of two >= num_chunks; 1: the whole row in one program
    PHASE: tl.constexpr,  # 0: one launch; 1 then 2: two launches (the interpreter)
    SMOOTHING: tl.constexpr,  # lam > 0
    COMPUTE_GRAD: tl.constexpr,
    REDUCE: tl.constexpr,  # "sum"/"mean": also write the reduced loss
    ACC_DTYPE: tl.constexpr,
    FAST_EXP: tl.constexpr,  # _exp's hardware form (float32 on NVIDIA GPUs)
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // num_chunks
    chunk = pid - row * num_chunks
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    k = tl.where(valid, target, 0)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = cols < tl.where(valid, num_classes, 0)  # ignored rows read nothing
    logits_row = logits_ptr + row * stride_lr
    z = _to_acc(tl.load(logits_row + cols * stride_lc, mask=mask, other=NEG_INF), ACC_DTYPE, FAST_EXP)
    M, R, s_rel = _block_stats(z, mask, SMOOTHING, FAST_EXP)
    # The program holding column k writes the row's loss, with z_k from its registers (the
    # gradient may overwrite the logits in place, so nobody reads another chunk's columns).
    z_k = tl.sum(tl.where(cols == k, z, 0.0), axis=0)
    writer = chunk == k // CHUNK
    if MAX_CHUNKS > 1:
        slot = stats_ptr + (row * num_chunks + chunk) * 3
        if PHASE != 2:  # publish this chunk's statistics, then arrive
            tl.store(slot, M)
            tl.store(slot + 1, R)
            tl.store(slot + 2, s_rel)
            tl.debug_barrier()
            arrived = tl.atomic_add(sync_ptr + row, 1, sem="acq_rel") + 1
        else:
            arrived = tl.atomic_add(sync_ptr + row, 0, sem="acquire")
        if COMPUTE_GRAD:
            # Wait for the row's other chunks (adjacent programs, running: see the module docstring).
            # PHASE 1 only publishes; PHASE 2 finds every chunk arrived.
            while (arrived < num_chunks) & (PHASE != 1):
                arrived = tl.atomic_add(sync_ptr + row, 0, sem="acquire")
        else:
            # Without a gradient nobody waits: the last to arrive computes the loss.
            writer = arrived == num_chunks
            z_k = tl.load(logits_row + k * stride_lc, mask=valid, other=0.0).to(ACC_DTYPE)
        tl.debug_barrier()
        # Combine: M = max m_c; R = rem of the first chunk holding M + sum of the others' (1 + rem_c) exp(m_c - M);
        # s_rel = sum_c s_c + n_c (m_c - M).
        idx = tl.arange(0, MAX_CHUNKS)
        live = idx < num_chunks
        if not COMPUTE_GRAD:
            live = idx < tl.where(writer, num_chunks, 0)  # the others must not read slots not yet written
        if PHASE == 1:
            live = idx < 0  # publishing only: the other chunks' slots may not be written yet
        base = stats_ptr + (row * num_chunks + idx) * 3
        ms = tl.load(base, mask=live, other=NEG_INF, cache_modifier=".cg")
        rems = tl.load(base + 1, mask=live, other=0.0, cache_modifier=".cg")
        M = tl.max(ms, axis=0)
        shift = tl.where(M == NEG_INF, 0.0, M)
        first = tl.min(tl.where(ms == M, idx, MAX_CHUNKS), axis=0)
        R = tl.sum(tl.where(idx == first, rems, (1.0 + rems) * tl.exp(ms - shift)), axis=0)
        if SMOOTHING:
            ss = tl.load(base + 2, mask=live, other=0.0, cache_modifier=".cg")
            counts = tl.minimum(tl.maximum(num_classes - idx.to(tl.int64) * CHUNK, 0), CHUNK).to(ACC_DTYPE)
            shifts = tl.where(ms == NEG_INF, 0.0, ms)
            s_rel = tl.sum(tl.where(live, ss + counts * (shifts - shift), 0.0), axis=0)

    if PHASE != 1:
        shift = tl.where(M == NEG_INF, 0.0, M)
        if writer:
            # Ignored rows read nothing (M = z_k = -inf): 0 for both keeps their loss from NaN.
            loss = _row_loss(R, tl.where(valid, M, 0.0), tl.where(valid, z_k, 0.0), s_rel,
                             _wide(oml_hi, oml_lo, ACC_DTYPE), _wide(lov_hi, lov_lo, ACC_DTYPE), SMOOTHING)
            tl.store(rows_ptr + row, tl.where(valid, loss, 0.0).to(rows_ptr.dtype.element_ty))
        if COMPUTE_GRAD:
            scale = tl.where(valid, tl.load(scalars_ptr).to(ACC_DTYPE), 0.0)
            g = _grad_values(z, cols == k, shift, R, 1.0 / (1.0 + R), scale, off_hi, off_lo, tgt_hi, tgt_lo,
                             _wide(lamk_hi, lamk_lo, ACC_DTYPE), FAST_EXP)
            g = tl.where(valid, g, 0.0)  # ignored rows: exact zeros
            tl.store(
                grad_ptr + row * stride_gr + cols * stride_gc,
                g.to(grad_ptr.dtype.element_ty),
                mask=cols < num_classes,
            )
        if REDUCE:
            _reduce_rows(rows_ptr, loss_ptr, scalars_ptr, sync_ptr, n_rows, n_rows * num_chunks, ACC_DTYPE)


# ------------------------------------------------------------------------------------------------
# 2b. A row per program, two sweeps over blocks.


@triton.jit
def _lane_step(z, m, r, s, ref, mask, MASKED: tl.constexpr, SMOOTHING: tl.constexpr, FAST_EXP: tl.constexpr):
    """Sweep 1's work on one block, lane by lane: no reduction across the block, one exp per value.

    Each lane keeps its max m, its remainder r = sum exp(z - m) beside its max's exact 1, and
    s = sum (z - ref). With d = z - m, a new max (d > 0) gives r <- (r + 1) exp(-d), any other
    value r <- r + exp(d) (a tie adds 1): both are r f + exp(-|d|). A NaN logit makes d, and so r,
    NaN; z = -inf adds exp(-inf) = 0. (Also the vocabulary-parallel stats kernel's.)
    """
    d = z - m
    e = _exp(-tl.abs(d), FAST_EXP)
    r = r * tl.where(d > 0.0, e, 1.0) + e
    m = tl.maximum(m, z)
    if SMOOTHING:
        dz = z - ref
        if MASKED:
            dz = tl.where(mask, dz, 0.0)
        s += dz
    return m, r, s


@triton.jit
def _row_stats(row_ptr, stride, n_cols, ref, offsets, BLOCK: tl.constexpr, SMOOTHING: tl.constexpr,
               ACC_DTYPE: tl.constexpr, FAST_EXP: tl.constexpr, EVICT: tl.constexpr):
    """(M, R, S) of a row's first ``n_cols`` values, lane by lane (``_lane_step``): M the max (-inf
    if no value is above -inf), R the sum of exp(z - M) over all values but one max, S = sum (z - ref).

    Full blocks load unmasked, each one's load issued before the previous block's work; then a
    masked tail. Lanes start below every finite value. Combined once at the end: M = max m, R = r
    of the first lane holding M + every other lane's (1 + r) exp(m - M); a lane that saw nothing
    holds r = 0, or NaN after a NaN logit, which reaches R. (Also the vocabulary-parallel stats kernel's.)
    """
    if ACC_DTYPE == tl.float64:  # noqa: SIM300 (a constexpr, not a constant)
        low = tl.full((BLOCK,), -1.7976931348623157e308, ACC_DTYPE)
    else:
        low = tl.full((BLOCK,), -3.4028234663852886e38, ACC_DTYPE)
    m = low
    r = tl.zeros((BLOCK,), ACC_DTYPE)
    s = tl.zeros((BLOCK,), ACC_DTYPE)
    n_full = n_cols // BLOCK * BLOCK
    if n_full > 0:
        z = _to_acc(tl.load(row_ptr + offsets * stride, eviction_policy=EVICT), ACC_DTYPE, FAST_EXP)
        for start in range(BLOCK, n_full, BLOCK):
            z_next = _to_acc(tl.load(row_ptr + (start + offsets) * stride, eviction_policy=EVICT), ACC_DTYPE, FAST_EXP)
            m, r, s = _lane_step(z, m, r, s, ref, None, False, SMOOTHING, FAST_EXP)
            z = z_next
        m, r, s = _lane_step(z, m, r, s, ref, None, False, SMOOTHING, FAST_EXP)
    if n_full < n_cols:
        cols = n_full + offsets
        mask = cols < n_cols
        z = tl.load(row_ptr + cols * stride, mask=mask, other=NEG_INF, eviction_policy=EVICT).to(ACC_DTYPE)
        m, r, s = _lane_step(z, m, r, s, ref, mask, True, SMOOTHING, FAST_EXP)
    lanes = tl.arange(0, BLOCK)
    seen = m > low
    M = tl.max(m, axis=0)
    first = tl.min(tl.where(seen & (m == M), lanes, BLOCK), axis=0)
    c = tl.exp(m - M)
    R = tl.sum(tl.where(lanes == first, r, tl.where(seen, r * c + c, r)), axis=0)
    return tl.where(first < BLOCK, M, NEG_INF), R, tl.sum(s, axis=0)


@triton.jit
def _grad_sweep(row_ptr, stride, grad_row, grad_stride, n_cols, shift, a, b, offsets, BLOCK: tl.constexpr,
                ACC_DTYPE: tl.constexpr, FAST_EXP: tl.constexpr, EVICT: tl.constexpr):
    """grad_j = exp(z_j - shift) a - b over a row's ``n_cols`` values, each rounded to the gradient's
    dtype once: one exp and one fused multiply-add per value. Backwards, the masked tail first (what
    a statistics sweep just before left in the cache), then the full blocks unmasked, each one's
    load issued before the previous block's work. (Also the vocabulary-parallel gradient kernel's.)
    """
    out = grad_row.dtype.element_ty
    n_full = n_cols // BLOCK * BLOCK
    if n_full < n_cols:
        cols = n_full + offsets
        mask = cols < n_cols
        z = tl.load(row_ptr + cols * stride, mask=mask, other=NEG_INF, eviction_policy=EVICT)
        g = _exp(_to_acc(z, ACC_DTYPE, FAST_EXP) - shift, FAST_EXP) * a - b
        tl.store(grad_row + cols * grad_stride, g.to(out), mask=mask)
    if n_full > 0:
        cols = n_full - BLOCK + offsets
        z = _to_acc(tl.load(row_ptr + cols * stride, eviction_policy=EVICT), ACC_DTYPE, FAST_EXP)
        for _ in range(1, n_full // BLOCK):
            z_next = _to_acc(tl.load(row_ptr + (cols - BLOCK) * stride, eviction_policy=EVICT), ACC_DTYPE, FAST_EXP)
            g = _exp(z - shift, FAST_EXP) * a - b
            tl.store(grad_row + cols * grad_stride, g.to(out))
            z, cols = z_next, cols - BLOCK
        g = _exp(z - shift, FAST_EXP) * a - b
        tl.store(grad_row + cols * grad_stride, g.to(out))


@triton.jit
def _zero_row(grad_row, grad_stride, n_cols, offsets, BLOCK: tl.constexpr):
    # An ignored row's gradient: exact zeros (and its logits never read).
    zeros = tl.zeros((BLOCK,), grad_row.dtype.element_ty)
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        tl.store(grad_row + cols * grad_stride, zeros, mask=cols < n_cols)


@triton.jit
def loop_kernel(
    logits_ptr,
    target_ptr,
    rows_ptr,
    grad_ptr,
    scalars_ptr,
    sync_ptr,  # (N + 1,) int32 zeros; only the done counter (index N) is used
    loss_ptr,
    stride_lr,
    stride_lc,
    stride_gr,
    stride_gc,
    n_rows,
    num_classes,
    ignore_index,
    oml_hi,
    oml_lo,
    lov_hi,
    lov_lo,
    off_hi,
    off_lo,
    tgt_hi,
    tgt_lo,
    lamk_hi,
    lamk_lo,
    BLOCK: tl.constexpr,
    SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    KEEP: tl.constexpr,  # eviction policy of sweep 1 ("evict_last" where supported, else "")
    DROP: tl.constexpr,  # eviction policy of sweep 2 ("evict_first" where supported, else "")
    FAST_EXP: tl.constexpr,  # _exp's hardware form (float32 on NVIDIA GPUs)
    WIDE_COLS: tl.constexpr,  # column offsets (V - 1) x stride past int32: compute them in int64
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    k = tl.where(valid, target, 0)
    n_read = tl.where(valid, num_classes, 0)  # ignored rows read nothing
    logits_row = logits_ptr + row * stride_lr
    offsets = tl.arange(0, BLOCK)
    if WIDE_COLS:
        offsets = offsets.to(tl.int64)
    z_k = tl.load(logits_row + k * stride_lc, mask=valid, other=0.0).to(ACC_DTYPE)
    # s is summed relative to a logit of the row: the target's, unless it is not finite or passes
    # 2**64 in size (a class masked with the dtype's lowest value), where z - ref could overflow.
    ref = tl.where(tl.abs(z_k) < 1.8446744073709552e19, z_k, 0.0)

    # Sweep 1 (_row_stats); s_rel = sum (z - M) = S + n (ref - M).
    M, R, S = _row_stats(logits_row, stride_lc, n_read, ref, offsets, BLOCK, SMOOTHING, ACC_DTYPE, FAST_EXP, KEEP)
    shift = tl.where(M == NEG_INF, 0.0, M)
    s_rel = S + n_read.to(ACC_DTYPE) * (ref - shift)

    loss = _row_loss(R, tl.where(valid, M, 0.0), z_k, s_rel, _wide(oml_hi, oml_lo, ACC_DTYPE),
                     _wide(lov_hi, lov_lo, ACC_DTYPE), SMOOTHING)
    tl.store(rows_ptr + row, tl.where(valid, loss, 0.0).to(rows_ptr.dtype.element_ty))

    if COMPUTE_GRAD:
        grad_row = grad_ptr + row * stride_gr
        if valid:
            # Sweep 2 (_grad_sweep): grad_j = scale p_j - scale lam / V; the target column is written
            # again after it (_grad_values' form, exact for every lam).
            inv_d = 1.0 / (1.0 + R)
            scale = tl.load(scalars_ptr).to(ACC_DTYPE)
            a = inv_d * scale
            b = _wide(off_hi, off_lo, ACC_DTYPE) * scale
            _grad_sweep(logits_row, stride_lc, grad_row, stride_gc, num_classes, shift, a, b, offsets, BLOCK,
                        ACC_DTYPE, FAST_EXP, DROP)
            g_k = _grad_values(z_k, True, shift, R, inv_d, scale, off_hi, off_lo, tgt_hi, tgt_lo,
                               _wide(lamk_hi, lamk_lo, ACC_DTYPE), False)
            tl.debug_barrier()  # after every thread's store of the block holding k
            tl.store(grad_row + k * stride_gc, g_k.to(grad_ptr.dtype.element_ty))
        else:
            _zero_row(grad_row, stride_gc, num_classes, offsets, BLOCK)
    if REDUCE:
        _reduce_rows(rows_ptr, loss_ptr, scalars_ptr, sync_ptr, n_rows, n_rows, ACC_DTYPE)


# ------------------------------------------------------------------------------------------------
# 3. Backward: dZ = dO * factor * kept.


@triton.jit
def scale_grad_kernel(
    grad_ptr,  # kept gradient; flat (dense) unless PER_ROW
    out_ptr,  # the result: grad_ptr itself when INPLACE
    grad_out_ptr,  # dO: 0-d, or (N,) with stride stride_d when PER_ROW
    factor_ptr,  # 0-d: the backward factor of the forward pass
    n_rows,
    n_cols,  # elements per row (PER_ROW), or all elements
    stride_gr,
    stride_gc,
    stride_or,
    stride_oc,
    stride_d,
    PER_ROW: tl.constexpr,
    INPLACE: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    # A fixed grid walks the tiles (row, block of columns); a tile whose factor is exactly 1 is
    # left as it is in place, so loss.backward() costs one read of dO per program.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    factor = tl.load(factor_ptr).to(ACC_DTYPE)
    offsets = tl.arange(0, BLOCK)
    n_col_blocks = tl.cdiv(n_cols, BLOCK)
    scale = tl.load(grad_out_ptr).to(ACC_DTYPE) * factor
    for tile in range(pid, n_rows * n_col_blocks, n_programs):
        row = (tile // n_col_blocks).to(tl.int64)
        cols = (tile % n_col_blocks).to(tl.int64) * BLOCK + offsets
        if PER_ROW:
            scale = tl.load(grad_out_ptr + row * stride_d).to(ACC_DTYPE) * factor
        work = scale != 1.0
        if not INPLACE:
            work = tl.full((), 1, tl.int1)  # a new tensor is written whatever the factor
        if work:
            mask = cols < n_cols
            g = tl.load(grad_ptr + row * stride_gr + cols * stride_gc, mask=mask)
            tl.store(
                out_ptr + row * stride_or + cols * stride_oc,
                (g.to(ACC_DTYPE) * scale).to(out_ptr.dtype.element_ty),
                mask=mask,
            )


# ------------------------------------------------------------------------------------------------
# Launchers.

# True when the kernels were decorated under TRITON_INTERPRET=1: they then run on CPU tensors.
INTERPRETED = type(split_kernel).__name__ == "InterpretedFunction"


# Column offsets from this on are computed in int64 by the loop kernel (the split kernel always does).
WIDE_OFFSETS = 2**31


def kernel_switches(logits: torch.Tensor, config: dict, *col_strides: int) -> dict:
    """ACC_DTYPE, FAST_EXP and WIDE_COLS of the kernels reading ``logits`` with these column strides.

    FAST_EXP (``_exp``'s PTX) where ``config`` asks for it and it can run: float32 accumulation on
    an NVIDIA GPU, never under the interpreter, on ROCm or on XPU. WIDE_COLS where (V - 1) x a
    column stride reaches ``WIDE_OFFSETS`` (read at each launch: tests lower it).
    """
    acc_dtype = tl.float64 if logits.dtype == torch.float64 else tl.float32
    nvidia = not INTERPRETED and logits.device.type == "cuda" and torch.version.hip is None
    return {
        "ACC_DTYPE": acc_dtype,
        "FAST_EXP": bool(config.get("fast_exp", False)) and nvidia and acc_dtype == tl.float32,
        "WIDE_COLS": (logits.shape[1] - 1) * max(abs(stride) for stride in col_strides) >= WIDE_OFFSETS,
    }


def split_float(value: float) -> tuple[float, float]:
    """(hi, lo), both exactly representable in float32, with hi + lo == value to ~48 bits."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


def _constants(label_smoothing: float, num_classes: int) -> dict:
    # The per-call constants of the loss and the gradient, from float64.
    lam = float(label_smoothing)
    off_hi, off_lo = split_float(lam / num_classes)
    tgt_hi, tgt_lo = split_float(1.0 - lam + lam / num_classes)
    oml_hi, oml_lo = split_float(1.0 - lam)
    lov_hi, lov_lo = split_float(lam / num_classes)
    lamk_hi, lamk_lo = split_float(lam - lam / num_classes)
    return {
        "oml_hi": oml_hi,
        "oml_lo": oml_lo,
        "lov_hi": lov_hi,
        "lov_lo": lov_lo,
        "off_hi": off_hi,
        "off_lo": off_lo,
        "tgt_hi": tgt_hi,
        "tgt_lo": tgt_lo,
        "lamk_hi": lamk_hi,
        "lamk_lo": lamk_lo,
    }


def device_guard(device: torch.device):
    # Launch on the tensor's device, not the current one; reached through torch.<device type>.
    if device.type == "cpu":
        return contextlib.nullcontext()
    return getattr(torch, device.type).device(device)


def check_device(device: torch.device) -> None:
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "smoothce's Triton kernels were built for a GPU in this process, so they cannot run on CPU "
            "tensors: set TRITON_INTERPRET=1 before the first Triton launch"
        )


def check_targets_async(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Queue a device-side assert that every target is ignore_index or in [0, V); no host sync."""
    ok = ~((target != ignore_index) & ((target < 0) | (target >= num_classes))).any()
    message = (
        f"smoothce.cross_entropy: a target is out of range: expected class indices in "
        f"[0, {num_classes}) or ignore_index={ignore_index}"
    )
    try:
        torch._assert_async(ok, message)
    except NotImplementedError:  # a device whose torch lacks the form with a message
        torch._assert_async(ok)


def _launch_rows(logits, target, rows, grad, scalars, sync, loss, label_smoothing, ignore_index, reduce, config):
    """The loss kernel for ``config`` ({"kernel": "split"|"loop", "block", "num_warps", ...})."""
    n_rows, num_classes = logits.shape
    compute_grad = grad is not None
    grad_arg = grad if compute_grad else logits  # never touched without COMPUTE_GRAD
    strides = (logits.stride(0), logits.stride(1), grad_arg.stride(0), grad_arg.stride(1))
    switches = kernel_switches(logits, config, strides[1], strides[3])
    wide_cols = switches.pop("WIDE_COLS")  # the loop kernel's (the split kernel's offsets are int64)
    common = dict(
        SMOOTHING=label_smoothing > 0.0,
        COMPUTE_GRAD=compute_grad,
        REDUCE=reduce,
        num_warps=config["num_warps"],
        num_stages=config.get("num_stages", 1),
        **switches,
        **config.get("options", {}),
    )
    constants = _constants(label_smoothing, num_classes)
    block = config["block"]
    with device_guard(logits.device):
        if config["kernel"] == "loop":
            loop_kernel[(n_rows,)](
                logits, target, rows, grad_arg, scalars, sync, loss, *strides,
                n_rows, num_classes, ignore_index, **constants,
                BLOCK=block, KEEP=config.get("keep", ""), DROP=config.get("drop", ""),
                WIDE_COLS=wide_cols, **common,
            )
            return
        num_chunks = triton.cdiv(num_classes, block)
        max_chunks = triton.next_power_of_2(num_chunks)
        stats = torch.empty((n_rows, num_chunks, 3) if num_chunks > 1 else (1,), dtype=rows.dtype,
                            device=logits.device)
        phases = (1, 2) if INTERPRETED and compute_grad and num_chunks > 1 else (0,)
        for phase in phases:
            split_kernel[(n_rows * num_chunks,)](
                logits, target, rows, grad_arg, scalars, stats, sync, loss, *strides,
                n_rows, num_classes, num_chunks, ignore_index, **constants,
                CHUNK=block, MAX_CHUNKS=max_chunks, PHASE=phase, **common,
            )


def loss_and_grad(logits, target, label_smoothing, ignore_index, reduction, compute_grad, config):
    """(loss, grad, backward factor) of 2-D ``logits`` (N >= 1, V), in two launches and no host sync.

    loss: (N,) for "none", else 0-d; float32 (float64 for float64 logits). grad: (N, V) like the
    logits, holding ``kept_gradient_scale(dtype)`` x the gradient of the loss (1/count folded in
    for all but float16), or None. factor: 0-d, what backward multiplies dO by.
    """
    n_rows, num_classes = logits.shape
    device = logits.device
    check_device(device)
    if device.type == "cpu":
        check_targets_on_host(target, num_classes, ignore_index)  # names the value; free on CPU
    acc = loss_dtype(logits.dtype)
    kept_scale, fold = kept_gradient_scale(logits.dtype)
    scalars = torch.empty(3, dtype=acc, device=device)
    sync = torch.empty(n_rows + 1, dtype=torch.int32, device=device)
    with device_guard(device):
        prologue_kernel[(1,)](
            target, sync, scalars, n_rows, n_rows + 1, num_classes, ignore_index, float(kept_scale),
            MEAN=reduction == "mean", FOLD=fold, BLOCK=1024, num_warps=4,
        )
    rows = torch.empty(n_rows, dtype=acc, device=device)
    loss = rows if reduction == "none" else torch.empty((), dtype=acc, device=device)
    grad = torch.empty_like(logits) if compute_grad else None
    _launch_rows(logits, target, rows, grad, scalars, sync, loss, label_smoothing, ignore_index,
                 reduction != "none", config)
    return loss, grad, scalars[1]


def forward(logits, target, label_smoothing, ignore_index, grad, grad_scale, config):
    """``Backend.forward``: per-row losses, and ``grad`` (may alias ``logits``) times ``grad_scale``."""
    n_rows, num_classes = logits.shape
    device = logits.device
    check_device(device)
    if device.type == "cpu":
        check_targets_on_host(target, num_classes, ignore_index)
    else:
        check_targets_async(target, num_classes, ignore_index)
    rows = torch.empty(n_rows, dtype=loss_dtype(logits.dtype), device=device)
    sync = torch.zeros(n_rows + 1, dtype=torch.int32, device=device)
    scalars = grad_scale.reshape(1).to(rows.dtype)
    _launch_rows(logits, target, rows, grad, scalars, sync, rows, label_smoothing, ignore_index, False, config)
    return rows


def scale_grad(grad, grad_out, factor, per_row, inplace, *, block=4096, num_warps=8, programs=None):
    """dO x factor x ``grad`` (the kept gradient), in place when ``inplace``, else a new tensor.

    ``grad_out`` is 0-d, or (N,) with ``per_row``. In place, a factor of exactly 1 leaves the
    buffer untouched and costs one read of dO per program. Out of place the result has the
    gradient's layout.
    """
    check_device(grad.device)
    out = grad if inplace else torch.empty_like(grad)
    if grad.numel() == 0:
        return out
    acc_dtype = tl.float64 if grad.dtype == torch.float64 else tl.float32
    if per_row:
        n_rows, n_cols = grad.shape
        strides = (grad.stride(0), grad.stride(1), out.stride(0), out.stride(1), grad_out.stride(0))
        flat_grad, flat_out = grad, out
    else:
        # A dense kept gradient (empty_like of the logits) is one run of memory in any layout.
        n_rows, n_cols = 1, grad.numel()
        flat_grad = grad.as_strided((n_cols,), (1,), grad.storage_offset())
        flat_out = out.as_strided((n_cols,), (1,), out.storage_offset())
        strides = (0, 1, 0, 1, 0)
    tiles = n_rows * triton.cdiv(n_cols, block)
    grid = (max(1, min(tiles, programs or tiles)),)
    with device_guard(grad.device):
        scale_grad_kernel[grid](
            flat_grad, flat_out, grad_out, factor, n_rows, n_cols, *strides,
            PER_ROW=per_row, INPLACE=inplace, BLOCK=block, ACC_DTYPE=acc_dtype, num_warps=num_warps,
        )
    return out
