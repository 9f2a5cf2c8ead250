"""The Triton kernels of smoothce's cross-entropy and their launchers, shared by the CUDA and XPU backends.

A forward+backward is three launches, none waiting on the host: ``prologue_kernel`` (target checks,
the count and the gradient's factors), ``split_kernel`` or ``loop_kernel`` (loss and kept gradient),
and ``scale_grad_kernel`` (backward's dO). The math each needs is written at the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoothce.backends.triton_common import (
    INTERPRETED,
    NEG_INF,
    block_weights,
    cap_values,
    check_device,
    col_offsets,
    device_guard,
    exp,
    grad_sweep,
    kernel_switches,
    round_to,
    row_stats,
    softcap,
    split_float,
    sum_ref,
    to_acc,
    wide,
    zero_row,
)
from smoothce.checks import check_targets, check_targets_on_host
from smoothce.numerics import kept_gradient_scale, loss_dtype

# ------------------------------------------------------------------------------------------------
# The row's math, shared by the loss kernels. For a row z of V logits with target k and smoothing
# lam, everything relative to the row max M:
#
#     R      = sum_j exp(z_j - M) - 1       the remainder beside the max's exact 1, summed without it
#     s_rel  = sum_j (z_j - M) <= 0
#     loss   = log1p(R) + (1 - lam) (M - z_k) + (lam / V) (-s_rel)      (three terms >= 0)
#     grad_j = scale (p_j - lam / V),  grad_k = scale ((p_k - c_hi) - c_lo),  p_j = exp(z_j - M) / (1 + R)
#
# which is the README's loss logsumexp(z) - (1 - lam) z_k - (lam / V) sum_j z_j and gradient
# softmax(z) - lam / V - (1 - lam) onehot(k), with c = 1 - lam + lam / V split into two float32
# halves c_hi + c_lo: p_k - c_hi is exact wherever the two are close (Sterbenz), so the target
# column is rounded once for every lam. R summed without one maximum keeps a confident row's tiny
# remainder, and log1p(R) its digits, where log(sum exp) would round the remainder away.
#
# The recipe's options (Backend.forward_recipe's math), each a constexpr switch that compiles away
# when off. SOFTCAP: each z_j becomes z'_j = c tanh(z_j / c) as it is loaded, before the max
# (triton_common.softcap), so M, R, s_rel and z_k above are the capped row's, and the gradient is
# multiplied by the chain rule chain_j = 1 - (z'_j / c)^2. WEIGHTED: class weights w (else all 1),
# W = sum_j w_j (summed by the prologue), and s_rel = sum_j w_j (z'_j - M). ZLOSS: the z-loss s.
# With L = log1p(R), lse = M + L (-inf for a row without a value above -inf), oml = 1 - lam and
# lov = lam / V:
#
#     loss   = (oml w_k + lov W) L + oml w_k (M - z'_k) + lov (-s_rel) + s w_k lse^2
#     grad_j = scale (A p_j - lov w_j) chain_j,     A = oml w_k + lov W + 2 s w_k lse
#     grad_k = scale (lov (W p_k - w_k) - oml w_k q + 2 s w_k lse p_k) chain_k
#
# which is (1 - lam) w_k (lse - z'_k) + (lam / V) sum_j w_j (lse - z'_j) + s w_k lse^2 and its
# gradient. q = 1 - p_k is R / (1 + R) where z'_k holds the max, the confident row's digits again
# (and 1 - p_k, p_k <= 1/2, elsewhere). Without WEIGHTED and ZLOSS, A = 1 and the plain forms above
# apply (times chain_j with SOFTCAP). LSE writes lse of every row, ignored rows too (which are then
# read, their loss and gradient still 0).


@triton.jit
def _log1p(x):
    # log(1 + x) to a few ulps for x >= 0: log(u) * x / (u - 1) with u = 1 + x (Goldberg).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _row_target(target_ptr, row, ignore_index, num_classes):
    # (valid, k): whether the row counts (its target is not ignore_index, nor out of range, which the
    # prologue reports), and the target's column (0 where not valid: never out of bounds).
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    return valid, tl.where(valid, target, 0)


@triton.jit
def _block_stats(z, mask, SMOOTHING: tl.constexpr, FAST_EXP: tl.constexpr, w=None, WEIGHTED: tl.constexpr = False):
    """(m, rem, s) of a block: m = max z, rem = sum of exp(z - m) over all but one maximum,
    s = sum of (z - m) (of w (z - m) with the class weights w where WEIGHTED); masked lanes hold
    -inf. A block with no finite value has m = -inf."""
    m = tl.max(z, axis=0)
    shift = tl.where(m == NEG_INF, 0.0, m)
    e = exp(z - shift, FAST_EXP)
    is_max = (z == m) & mask
    ties = tl.sum(is_max.to(z.dtype), axis=0)
    rem = tl.sum(tl.where(is_max, 0.0, e), axis=0) + tl.maximum(ties - 1.0, 0.0)
    s = tl.zeros_like(m)
    if SMOOTHING:
        d = tl.where(mask, z - shift, 0.0)
        if WEIGHTED:
            d = d * w
        s = tl.sum(d, axis=0)
    return m, rem, s


@triton.jit
def _target_weights(weight_ptr, scalars_ptr, k, valid, num_classes, ACC_DTYPE: tl.constexpr, WEIGHTED: tl.constexpr):
    # (w_k, W): the target's class weight and the sum of all V (the prologue's third scalar); 1 and V
    # without WEIGHTED.
    if WEIGHTED:
        return tl.load(weight_ptr + k, mask=valid, other=0.0).to(ACC_DTYPE), tl.load(scalars_ptr + 2).to(ACC_DTYPE)
    else:
        return 1.0, tl.cast(num_classes, ACC_DTYPE)


@triton.jit
def _z_loss(lse, valid, w_k, zl_hi, zl_lo, ACC_DTYPE: tl.constexpr, ZLOSS: tl.constexpr):
    # (zl, the loss's term): the z-loss's 2 s w_k lse of the gradient and s w_k lse^2 of the loss (0 and
    # 0 without ZLOSS). An ignored row's lse (-inf where nothing was read) counts as 0: no inf x 0.
    if ZLOSS:
        lse_k = tl.where(valid, lse, 0.0)
        zl = 2.0 * wide(zl_hi, zl_lo, ACC_DTYPE) * w_k * lse_k
        return zl, 0.5 * zl * lse_k
    else:
        return 0.0, 0.0


@triton.jit
def _row_loss(
    R, M, z_k, s_rel, oml, lov, w_k, W, z_term, SMOOTHING: tl.constexpr, WEIGHTED: tl.constexpr, ZLOSS: tl.constexpr
):
    """loss = log1p(R) + (1 - lam) (M - z_k) + (lam / V) (-s_rel); oml = 1 - lam, lov = lam / V.
    WEIGHTED: (oml w_k + lov W) log1p(R) + oml w_k (M - z_k) + lov (-s_rel), s_rel = sum_j w_j (z_j - M).
    ZLOSS: plus ``z_term`` (``_z_loss``'s s w_k lse^2)."""
    if WEIGHTED:
        loss = (oml * w_k + lov * W) * _log1p(R)
        oml_k = oml * w_k
    else:
        loss = _log1p(R)
        oml_k = oml
    # (1 - lam) (M - z_k) is left out at lam = 1, where z_k = -inf would make it 0 * inf.
    loss += tl.where(oml == 0.0, 0.0, oml_k * tl.where(oml == 0.0, 0.0, M - z_k))
    if SMOOTHING:
        loss += lov * (-s_rel)
    if ZLOSS:
        loss += z_term
    return loss


@triton.jit
def _write_row(rows_ptr, lse_ptr, row, valid, loss, lse, LSE: tl.constexpr):
    # The row's loss (0 on an ignored row) and, with LSE, its lse (ignored rows too).
    tl.store(rows_ptr + row, tl.where(valid, loss, 0.0).to(rows_ptr.dtype.element_ty))
    if LSE:
        tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))


@triton.jit
def _row_lse(M, R):
    # lse = M + log1p(R), -inf for a row without a value above -inf (where R counts its ties).
    return tl.where(M == NEG_INF, NEG_INF, M + _log1p(R))


@triton.jit
def _grad_values_recipe(z, w, is_k, shift, R, inv_d, scale, A, oml, lov, w_k, W, zl, FAST_EXP: tl.constexpr):
    # scale (A p - lov w) off the target; on it scale (lov (W p_k - w_k) - oml w_k q + zl p_k) with
    # zl = 2 s w_k lse and q = 1 - p_k, R / (1 + R) where z_k holds the max (a confident row's digits).
    p = exp(z - shift, FAST_EXP) * inv_d
    q = tl.where(z == shift, R * inv_d, 1.0 - p)
    g_k = lov * (W * p - w_k) - oml * w_k * q + zl * p
    return tl.where(is_k, g_k, A * p - lov * w) * scale


@triton.jit
def _grad_values(z, is_k, shift, R, inv_d, scale, lov_hi, lov_lo, tgt_hi, tgt_lo, lam_k, FAST_EXP: tl.constexpr):
    # scale ((p - c_hi) - c_lo): c = lam / V off the target, 1 - lam + lam / V on it. A target
    # holding the max has p_k = 1 / (1 + R) and p_k - c = -R / (1 + R) + lam (1 - 1/V) (lam_k),
    # which keeps a confident row's tiny 1 - p_k where p_k - 1 would round it away.
    p = exp(z - shift, FAST_EXP) * inv_d
    g = (p - tl.where(is_k, tgt_hi, lov_hi)) - tl.where(is_k, tgt_lo, lov_lo)
    g = tl.where(is_k & (z == shift), lam_k - R * inv_d, g)
    return g * scale


@triton.jit
def _reduce_rows(rows_ptr, loss_ptr, scalars_ptr, sync_ptr, n_rows, n_programs, ACC_DTYPE: tl.constexpr):
    # The last of the launch's programs to get here sums the per-row losses in a fixed order and
    # scales the sum by the loss factor (a factor of 0, "mean" over no positive normalizer, gives 0).
    tl.debug_barrier()
    done = tl.atomic_add(sync_ptr + n_rows, 1, sem="acq_rel")
    if done == n_programs - 1:
        offsets = tl.arange(0, 1024)
        acc = tl.zeros((1024,), ACC_DTYPE)
        for start in range(0, n_rows, 1024):
            cols = start + offsets
            acc += tl.load(rows_ptr + cols, mask=cols < n_rows, other=0.0, cache_modifier=".cg")
        factor = tl.load(scalars_ptr + 1).to(ACC_DTYPE)
        total = tl.where(factor == 0.0, 0.0, tl.sum(acc, axis=0) * factor)
        tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------
# 1. The prologue.


@triton.jit(debug=True)
def prologue_kernel(
    target_ptr,  # (N,) int32/int64
    sync_ptr,  # (n_sync,) int32: row counters and the done counter, zeroed here
    scalars_ptr,  # (2,) accumulation dtype, written: the forward and the loss factor (3: and W, WEIGHTED)
    factor_ptr,  # 0-d, accumulation dtype, written: backward's factor (its own tensor: the op returns it)
    normalizer_ptr,  # 0-d, accumulation dtype: "mean"'s denominator when NORMALIZED
    weight_ptr,  # (V,) class weights, accumulation dtype, when WEIGHTED
    n_rows,
    n_sync,
    num_classes,
    ignore_index,
    kept_scale,  # 2**15 for float16 gradients, else 1
    MEAN: tl.constexpr,
    NORMALIZED: tl.constexpr,  # "mean" divides by the normalizer, not by the count
    FOLD: tl.constexpr,  # fold 1/denominator into the forward's gradient (all but float16)
    BLOCK: tl.constexpr,
    WEIGHTED: tl.constexpr = False,  # also write W = sum of the class weights (a third scalar)
):
    """One program: checks the targets on the device, counts the non-ignored ones, zeroes the row
    counters, and writes the three factors of ``smoothce.numerics.kept_factors``' rule for the
    denominator d (the count or the normalizer for "mean", else 1): the kept gradient's, the one
    backward applies, and the summed loss's (1/d). A d <= 0 gives 0, 1 (float16: 2**-15) and 0.
    WEIGHTED: also W = sum of the class weights (the weighted mean's d is the normalizer)."""
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
        if NORMALIZED:
            denominator = tl.load(normalizer_ptr).to(acc_dtype)
        else:
            denominator = tl.maximum(tl.sum(count, axis=0), 1).to(acc_dtype)  # no target: loss 0, not NaN
    positive = denominator > 0.0  # (False for NaN)
    safe = tl.where(positive, denominator, 1.0)
    if FOLD:
        forward_factor = 1.0 / safe
        backward_factor = tl.full((), 1.0, acc_dtype)
    else:
        # power = kept_scale x 2**e, 2**e <= d < 2**(e + 1) (the float32 exponent of d): backward's
        # factor 1/power is a power of two (see kept_gradient_scale).
        bits = safe.to(tl.float32).to(tl.int32, bitcast=True) & 0x7F800000
        power = bits.to(tl.float32, bitcast=True).to(acc_dtype) * kept_scale
        forward_factor = power / safe
        backward_factor = 1.0 / power
    tl.store(scalars_ptr, tl.where(positive, forward_factor, 0.0))
    tl.store(factor_ptr, backward_factor)
    tl.store(scalars_ptr + 1, tl.where(positive, 1.0 / safe, 0.0))
    if WEIGHTED:
        total = tl.zeros((BLOCK,), acc_dtype)
        for start in range(0, num_classes, BLOCK):
            cols = start + offsets
            total += tl.load(weight_ptr + cols, mask=cols < num_classes, other=0.0).to(acc_dtype)
        tl.store(scalars_ptr + 2, tl.sum(total, axis=0))


# ------------------------------------------------------------------------------------------------
# 2a. Rows split into chunks: one read, one write.


@triton.jit
def split_kernel(
    # pointers
    logits_ptr,  # (N, V) float16/bfloat16/float32/float64, any strides
    target_ptr,  # (N,) int32/int64
    rows_ptr,  # (N,) per-row loss, written (the result for "none")
    grad_ptr,  # (N, V) gradient in the logits' dtype, written when COMPUTE_GRAD
    scalars_ptr,  # [forward factor, loss factor, W (when WEIGHTED)]
    stats_ptr,  # (N, num_chunks, 3) workspace: (m, rem, s) per chunk (4: and the chunk's weights, when
    # WEIGHTED and SMOOTHING)
    sync_ptr,  # (N + 1,) int32 zeros: arrivals per row, then the done counter
    loss_ptr,  # 0-d reduced loss, written when REDUCE
    weight_ptr,  # (V,) class weights in the accumulation dtype, when WEIGHTED
    lse_ptr,  # (N,) log-sum-exp per row, written when LSE
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
    lov_hi,  # lam / V = lov_hi + lov_lo
    lov_lo,
    tgt_hi,  # 1 - lam + lam / V = tgt_hi + tgt_lo, for the target column
    tgt_lo,
    lamk_hi,  # lam (1 - 1/V) = lamk_hi + lamk_lo, for a target column holding the max
    lamk_lo,
    cap_hi,  # c = cap_hi + cap_lo and 1 / c = icap_hi + icap_lo, when SOFTCAP
    cap_lo,
    icap_hi,
    icap_lo,
    zl_hi,  # s = zl_hi + zl_lo, when ZLOSS
    zl_lo,
    # compile-time switches
    CHUNK: tl.constexpr,
    MAX_CHUNKS: tl.constexpr,  # a power of two >= num_chunks; 1: the whole row in one program
    PHASE: tl.constexpr,  # 0: one launch; 1 then 2: two launches (the interpreter)
    SMOOTHING: tl.constexpr,  # lam > 0
    COMPUTE_GRAD: tl.constexpr,
    REDUCE: tl.constexpr,  # "sum"/"mean": also write the reduced loss
    ACC_DTYPE: tl.constexpr,
    FAST_EXP: tl.constexpr,  # exp's hardware form (float32 on NVIDIA GPUs)
    SOFTCAP: tl.constexpr = False,  # the recipe's options (the math above)
    WEIGHTED: tl.constexpr = False,
    ZLOSS: tl.constexpr = False,
    LSE: tl.constexpr = False,
):
    """Each chunk of CHUNK columns of a row is one program, which loads it into registers once.

    The programs of a row exchange their (max, remainder, relative sum) through ``stats_ptr`` and
    an arrival counter per row, then each writes its gradient from registers: the logits are read
    once and the gradient written once. Without a gradient nobody waits: the last program of a row
    to arrive computes its loss. The waiting programs of a row are adjacent in the grid and GPUs
    start programs in grid order, so a row's chunks all run while any of them waits as long as the
    GPU holds as many programs as a row has chunks (``TritonBackend.launch_config`` ensures it).
    Triton's interpreter runs programs one after another, so there the kernel runs in two launches
    (PHASE 1 publishes the statistics, PHASE 2 reads them and writes the gradient).
    """
    pid = tl.program_id(0).to(tl.int64)
    row = pid // num_chunks
    chunk = pid - row * num_chunks
    valid, k = _row_target(target_ptr, row, ignore_index, num_classes)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    # Ignored rows read nothing, unless their lse is asked for (LSE).
    mask = cols < (num_classes if LSE else tl.where(valid, num_classes, 0))
    logits_row = logits_ptr + row * stride_lr
    z = to_acc(tl.load(logits_row + cols * stride_lc, mask=mask, other=NEG_INF), ACC_DTYPE, FAST_EXP)
    cap, inv_cap = cap_values(cap_hi, cap_lo, icap_hi, icap_lo, ACC_DTYPE, SOFTCAP)
    if SOFTCAP:
        z, chain = softcap(z, cap, inv_cap, FAST_EXP)
        z = tl.where(mask, z, NEG_INF)
    n_stats: tl.constexpr = 4 if WEIGHTED and SMOOTHING else 3  # per chunk: m, rem, s (and its weights' sum)
    w = block_weights(weight_ptr, cols, mask, True, ACC_DTYPE, WEIGHTED)
    M, R, s_rel = _block_stats(z, mask, SMOOTHING, FAST_EXP, w, WEIGHTED)
    # The program holding column k writes the row's loss, with z_k from its registers (the
    # gradient may overwrite the logits in place, so nobody reads another chunk's columns).
    z_k = tl.sum(tl.where(cols == k, z, 0.0), axis=0)
    writer = chunk == k // CHUNK
    if MAX_CHUNKS > 1:
        slot = stats_ptr + (row * num_chunks + chunk) * n_stats
        if PHASE != 2:  # publish this chunk's statistics, then arrive
            tl.store(slot, M)
            tl.store(slot + 1, R)
            tl.store(slot + 2, s_rel)
            if n_stats == 4:
                tl.store(slot + 3, tl.sum(w, axis=0))  # the weights of the columns read
            tl.debug_barrier()
            arrived = tl.atomic_add(sync_ptr + row, 1, sem="acq_rel") + 1
        else:
            arrived = tl.atomic_add(sync_ptr + row, 0, sem="acquire")
        if COMPUTE_GRAD:
            # Wait for the row's other chunks (adjacent programs, running: see the docstring).
            # PHASE 1 only publishes; PHASE 2 finds every chunk arrived.
            while (arrived < num_chunks) & (PHASE != 1):
                arrived = tl.atomic_add(sync_ptr + row, 0, sem="acquire")
        else:
            # Without a gradient nobody waits: the last to arrive computes the loss.
            writer = arrived == num_chunks
            z_k = tl.load(logits_row + k * stride_lc, mask=valid, other=0.0).to(ACC_DTYPE)
            if SOFTCAP:  # (the sweeps' exp: the target's capped value is bitwise theirs, so z'_k == M holds)
                z_k, _ = softcap(z_k, cap, inv_cap, FAST_EXP)
        tl.debug_barrier()
        # Combine: M = max m_c; R = rem of the first chunk holding M + sum of the others' (1 + rem_c) exp(m_c - M);
        # s_rel = sum_c s_c + n_c (m_c - M), n_c the chunk's columns (its weights' sum where WEIGHTED).
        idx = tl.arange(0, MAX_CHUNKS)
        live = idx < num_chunks
        if not COMPUTE_GRAD:
            live = idx < tl.where(writer, num_chunks, 0)  # the others must not read slots not yet written
        if PHASE == 1:
            live = idx < 0  # publishing only: the other chunks' slots may not be written yet
        base = stats_ptr + (row * num_chunks + idx) * n_stats
        ms = tl.load(base, mask=live, other=NEG_INF, cache_modifier=".cg")
        rems = tl.load(base + 1, mask=live, other=0.0, cache_modifier=".cg")
        M = tl.max(ms, axis=0)
        shift = tl.where(M == NEG_INF, 0.0, M)
        first = tl.min(tl.where(ms == M, idx, MAX_CHUNKS), axis=0)
        R = tl.sum(tl.where(idx == first, rems, (1.0 + rems) * tl.exp(ms - shift)), axis=0)
        if SMOOTHING:
            ss = tl.load(base + 2, mask=live, other=0.0, cache_modifier=".cg")
            if n_stats == 4:
                counts = tl.load(base + 3, mask=live, other=0.0, cache_modifier=".cg")
            else:
                counts = tl.minimum(tl.maximum(num_classes - idx.to(tl.int64) * CHUNK, 0), CHUNK).to(ACC_DTYPE)
            shifts = tl.where(ms == NEG_INF, 0.0, ms)
            s_rel = tl.sum(tl.where(live, ss + counts * (shifts - shift), 0.0), axis=0)

    if PHASE != 1:
        shift = tl.where(M == NEG_INF, 0.0, M)
        oml = wide(oml_hi, oml_lo, ACC_DTYPE)
        lov = wide(lov_hi, lov_lo, ACC_DTYPE)
        w_k, W = _target_weights(weight_ptr, scalars_ptr, k, valid, num_classes, ACC_DTYPE, WEIGHTED)
        lse = _row_lse(M, R)
        zl, z_term = _z_loss(lse, valid, w_k, zl_hi, zl_lo, ACC_DTYPE, ZLOSS)
        if writer:
            # Ignored rows (M = z_k = -inf where nothing was read): 0 for both keeps their loss from NaN.
            M_v, z_v = tl.where(valid, M, 0.0), tl.where(valid, z_k, 0.0)
            loss = _row_loss(R, M_v, z_v, s_rel, oml, lov, w_k, W, z_term, SMOOTHING, WEIGHTED, ZLOSS)
            _write_row(rows_ptr, lse_ptr, row, valid, loss, lse, LSE)
        if COMPUTE_GRAD:
            scale = tl.where(valid, tl.load(scalars_ptr).to(ACC_DTYPE), 0.0)
            if WEIGHTED or ZLOSS:
                A = oml * w_k + lov * W + zl
                w_j = 1.0
                if WEIGHTED:
                    w_j = w
                g = _grad_values_recipe(
                    z, w_j, cols == k, shift, R, 1.0 / (1.0 + R), scale, A, oml, lov, w_k, W, zl, FAST_EXP
                )
            else:
                g = _grad_values(
                    z,
                    cols == k,
                    shift,
                    R,
                    1.0 / (1.0 + R),
                    scale,
                    lov_hi,
                    lov_lo,
                    tgt_hi,
                    tgt_lo,
                    wide(lamk_hi, lamk_lo, ACC_DTYPE),
                    FAST_EXP,
                )
            if SOFTCAP:
                g = g * chain
            g = tl.where(valid, g, 0.0)  # ignored rows: exact zeros
            tl.store(
                grad_ptr + row * stride_gr + cols * stride_gc,
                round_to(g, grad_ptr.dtype.element_ty),
                mask=cols < num_classes,
            )
        if REDUCE:
            _reduce_rows(rows_ptr, loss_ptr, scalars_ptr, sync_ptr, n_rows, n_rows * num_chunks, ACC_DTYPE)


# ------------------------------------------------------------------------------------------------
# 2b. A row per program, two sweeps over blocks.


@triton.jit
def loop_kernel(
    logits_ptr,
    target_ptr,
    rows_ptr,
    grad_ptr,
    scalars_ptr,
    sync_ptr,  # (N + 1,) int32 zeros; only the done counter (index N) is used
    loss_ptr,
    weight_ptr,
    lse_ptr,
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
    tgt_hi,
    tgt_lo,
    lamk_hi,
    lamk_lo,
    cap_hi,
    cap_lo,
    icap_hi,
    icap_lo,
    zl_hi,
    zl_lo,
    BLOCK: tl.constexpr,
    SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    REDUCE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    KEEP: tl.constexpr,  # eviction policy of sweep 1 ("evict_last" where sweep 2 re-reads, else "evict_first" or "")
    DROP: tl.constexpr,  # eviction policy of sweep 2 ("evict_first" where supported, else "")
    FAST_EXP: tl.constexpr,  # exp's hardware form (float32 on NVIDIA GPUs)
    WIDE_COLS: tl.constexpr,  # column offsets (V - 1) x stride past int32: compute them in int64
    SOFTCAP: tl.constexpr = False,  # the recipe's options (the math above; arguments as split_kernel's)
    WEIGHTED: tl.constexpr = False,
    ZLOSS: tl.constexpr = False,
    LSE: tl.constexpr = False,
):
    """A row per program, for devices without the split kernel and rows too long for it: two sweeps.

    Sweep 1 (``row_stats``) keeps the statistics per lane and combines them once; sweep 2
    (``grad_sweep``) writes grad_j = scale p_j - scale lam / V, one exp and one fused multiply-add
    per value, backwards so that it starts on what sweep 1 left in the cache; the target column is
    written again after it in ``_grad_values``' form. On NVIDIA GPUs the float32 exps are PTX's
    ex2.approx.ftz: an exp below 2**-126 becomes 0, which moves a gradient value by less than
    2**-126 times the gradient's scale. With the options both sweeps cap each value as they load it,
    and sweep 2 writes scale (A p_j - lov w_j) chain_j.
    """
    row = tl.program_id(0).to(tl.int64)
    valid, k = _row_target(target_ptr, row, ignore_index, num_classes)
    n_read = num_classes if LSE else tl.where(valid, num_classes, 0)  # ignored rows: nothing, but for their lse
    logits_row = logits_ptr + row * stride_lr
    offsets = col_offsets(BLOCK, WIDE_COLS)
    z_k = tl.load(logits_row + k * stride_lc, mask=valid, other=0.0).to(ACC_DTYPE)
    cap, inv_cap = cap_values(cap_hi, cap_lo, icap_hi, icap_lo, ACC_DTYPE, SOFTCAP)
    if SOFTCAP:
        z_k, chain_k = softcap(z_k, cap, inv_cap, FAST_EXP)  # (the sweeps' exp: z'_k == M where it holds the max)
    ref = sum_ref(z_k)  # s is summed relative to the target's logit

    # Sweep 1 (row_stats); s_rel = sum (z - M) = S + n (ref - M) (W in place of n where WEIGHTED).
    M, R, S = row_stats(
        logits_row,
        stride_lc,
        n_read,
        ref,
        offsets,
        BLOCK,
        SMOOTHING,
        ACC_DTYPE,
        FAST_EXP,
        KEEP,
        weight_ptr,
        cap,
        inv_cap,
        SOFTCAP,
        WEIGHTED and SMOOTHING,  # (the weights enter sweep 1 only through s)
    )
    shift = tl.where(M == NEG_INF, 0.0, M)
    oml = wide(oml_hi, oml_lo, ACC_DTYPE)
    lov = wide(lov_hi, lov_lo, ACC_DTYPE)
    w_k, W = _target_weights(weight_ptr, scalars_ptr, k, valid, num_classes, ACC_DTYPE, WEIGHTED)
    n = tl.cast(n_read, ACC_DTYPE)
    if WEIGHTED:
        n = W
    s_rel = S + n * (ref - shift)
    lse = _row_lse(M, R)
    zl, z_term = _z_loss(lse, valid, w_k, zl_hi, zl_lo, ACC_DTYPE, ZLOSS)
    loss = _row_loss(R, tl.where(valid, M, 0.0), z_k, s_rel, oml, lov, w_k, W, z_term, SMOOTHING, WEIGHTED, ZLOSS)
    _write_row(rows_ptr, lse_ptr, row, valid, loss, lse, LSE)

    if COMPUTE_GRAD:
        grad_row = grad_ptr + row * stride_gr
        if valid:
            # Sweep 2 (grad_sweep): grad_j = scale p_j - scale lam / V; the target column is written
            # again after it (_grad_values' form, exact for every lam).
            inv_d = 1.0 / (1.0 + R)
            scale = tl.load(scalars_ptr).to(ACC_DTYPE)
            a = inv_d * scale
            if WEIGHTED or ZLOSS:
                A = oml * w_k + lov * W + zl
                a = A * a
            b = lov * scale
            grad_sweep(
                logits_row,
                stride_lc,
                grad_row,
                stride_gc,
                num_classes,
                shift,
                a,
                b,
                offsets,
                BLOCK,
                ACC_DTYPE,
                FAST_EXP,
                DROP,
                weight_ptr,
                cap,
                inv_cap,
                SOFTCAP,
                WEIGHTED,
            )
            if WEIGHTED or ZLOSS:
                g_k = _grad_values_recipe(
                    z_k,
                    w_k,
                    True,
                    shift,
                    R,
                    inv_d,
                    scale,
                    A,
                    oml,
                    lov,
                    w_k,
                    W,
                    zl,
                    False,
                )
            else:
                g_k = _grad_values(
                    z_k,
                    True,
                    shift,
                    R,
                    inv_d,
                    scale,
                    lov_hi,
                    lov_lo,
                    tgt_hi,
                    tgt_lo,
                    wide(lamk_hi, lamk_lo, ACC_DTYPE),
                    False,
                )
            if SOFTCAP:
                g_k = g_k * chain_k
            tl.debug_barrier()  # after every thread's store of the block holding k
            tl.store(grad_row + k * stride_gc, round_to(g_k, grad_ptr.dtype.element_ty))
        else:
            zero_row(grad_row, stride_gc, num_classes, offsets, BLOCK)
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
    """Backward: dZ = dO x factor x kept, in the accumulation dtype and rounded once.

    A fixed grid walks the tiles (row, block of columns); in place, a tile whose product is exactly
    1 is left as it is, so ``loss.backward()`` of a "mean" or "sum" loss costs one read of dO per
    program. Per-row dO for "none".
    """
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
                round_to(g.to(ACC_DTYPE) * scale, out_ptr.dtype.element_ty),
                mask=mask,
            )


# ------------------------------------------------------------------------------------------------
# Launchers. Row offsets are 64-bit, column offsets too wherever (V - 1) x a column stride passes
# int32. An out-of-range target never indexes out of bounds: the kernels treat its row as ignored
# after the prologue's device-side assert has reported it; on CPU tensors (the interpreter) the
# launcher raises a ValueError naming the value first.


def _constants(label_smoothing: float, num_classes: int) -> dict:
    # The per-call constants of the loss and the gradient, each from float64 as two float32 halves.
    lam = float(label_smoothing)
    constants = {}
    for name, value in (
        ("oml", 1.0 - lam),
        ("lov", lam / num_classes),
        ("tgt", 1.0 - lam + lam / num_classes),
        ("lamk", lam - lam / num_classes),
    ):
        constants[f"{name}_hi"], constants[f"{name}_lo"] = split_float(value)
    return constants


def _recipe_arguments(recipe, lse) -> tuple[dict, dict]:
    """(arguments, switches) of the loss kernels for a ``Recipe`` (or None) and an lse buffer (or None).

    An option that is off passes None (a constexpr: the kernel's signature and code are the plain
    ones) and its switch False.
    """
    weight = None if recipe is None else recipe.weight
    cap = None if recipe is None else recipe.softcap
    z_loss = 0.0 if recipe is None else float(recipe.z_loss)
    arguments = {"weight_ptr": weight, "lse_ptr": lse}
    for name, value in (("cap", cap), ("icap", None if cap is None else 1.0 / cap), ("zl", z_loss or None)):
        arguments[f"{name}_hi"], arguments[f"{name}_lo"] = (None, None) if value is None else split_float(value)
    switches = {
        "SOFTCAP": cap is not None,
        "WEIGHTED": weight is not None,
        "ZLOSS": z_loss != 0.0,
        "LSE": lse is not None,
    }
    return arguments, switches


def _launch_rows(
    logits,
    target,
    rows,
    grad,
    scalars,
    sync,
    loss,
    label_smoothing,
    ignore_index,
    reduce,
    config,
    recipe=None,
    lse=None,
):
    """The loss kernel for ``config`` ({"kernel": "split"|"loop", "block", "num_warps", ...}), with the
    options of ``recipe`` (W, where weighted, in ``scalars[2]``) and the lse written into ``lse``."""
    n_rows, num_classes = logits.shape
    compute_grad = grad is not None
    grad_arg = grad if compute_grad else logits  # never touched without COMPUTE_GRAD
    strides = (logits.stride(0), logits.stride(1), grad_arg.stride(0), grad_arg.stride(1))
    switches = kernel_switches(logits, config, strides[1], strides[3])
    wide_cols = switches.pop("WIDE_COLS")  # the loop kernel's (the split kernel's offsets are int64)
    options, option_switches = _recipe_arguments(recipe, lse)
    common = dict(
        SMOOTHING=label_smoothing > 0.0,
        COMPUTE_GRAD=compute_grad,
        REDUCE=reduce,
        num_warps=config["num_warps"],
        num_stages=config.get("num_stages", 1),
        **switches,
        **option_switches,
        **config.get("options", {}),
    )
    constants = _constants(label_smoothing, num_classes)
    block = config["block"]
    with device_guard(logits.device):
        if config["kernel"] == "loop":
            loop_kernel[(n_rows,)](
                logits,
                target,
                rows,
                grad_arg,
                scalars,
                sync,
                loss,
                options["weight_ptr"],
                options["lse_ptr"],
                *strides,
                n_rows,
                num_classes,
                ignore_index,
                **constants,
                **{name: value for name, value in options.items() if not name.endswith("_ptr")},
                # Without a gradient nothing is read twice: sweep 1 takes sweep 2's hint.
                BLOCK=block,
                KEEP=config.get("keep", "") if compute_grad else config.get("drop", ""),
                DROP=config.get("drop", ""),
                WIDE_COLS=wide_cols,
                **common,
            )
            return
        num_chunks = triton.cdiv(num_classes, block)
        max_chunks = triton.next_power_of_2(num_chunks)
        n_stats = 4 if option_switches["WEIGHTED"] and label_smoothing > 0.0 else 3  # + the chunk's weights
        stats = torch.empty(
            (n_rows, num_chunks, n_stats) if num_chunks > 1 else (1,), dtype=rows.dtype, device=logits.device
        )
        phases = (1, 2) if INTERPRETED and compute_grad and num_chunks > 1 else (0,)
        for phase in phases:
            split_kernel[(n_rows * num_chunks,)](
                logits,
                target,
                rows,
                grad_arg,
                scalars,
                stats,
                sync,
                loss,
                options["weight_ptr"],
                options["lse_ptr"],
                *strides,
                n_rows,
                num_classes,
                num_chunks,
                ignore_index,
                **constants,
                **{name: value for name, value in options.items() if not name.endswith("_ptr")},
                CHUNK=block,
                MAX_CHUNKS=max_chunks,
                PHASE=phase,
                **common,
            )


def _recipe_weight(recipe, logits):
    # The class weights as the kernels read them: contiguous, in the accumulation dtype (what
    # ``Recipe`` promises; a caller's other dtype is converted here, never read as the wrong type).
    if recipe is None or recipe.weight is None:
        return recipe
    weight = recipe.weight.detach().to(device=logits.device, dtype=loss_dtype(logits.dtype)).contiguous()
    return recipe._replace(weight=weight)


def loss_and_grad(
    logits,
    target,
    label_smoothing,
    ignore_index,
    reduction,
    compute_grad,
    config,
    normalizer=None,
    recipe=None,
    lse=None,
):
    """``Backend.loss_and_grad``: (loss, grad, backward factor) of 2-D ``logits`` (N >= 1, V), in two
    launches and no host sync.

    loss: (N,) for "none", else 0-d; float32 (float64 for float64 logits). grad: (N, V) like the
    logits, holding grad_scale x the gradient of the loss (``smoothce.numerics.kept_factors``), or
    None. factor: 0-d, what backward multiplies dO by. ``normalizer`` (a 0-d tensor on the logits'
    device, read by the prologue) replaces the count as "mean"'s denominator (the weighted mean's
    comes this way). ``recipe`` (``Recipe`` or None) and ``lse`` ((N,) buffer or None): as in
    ``Backend.forward_recipe``.
    """
    n_rows, num_classes = logits.shape
    device = logits.device
    check_device(device)
    if device.type == "cpu":
        check_targets_on_host(target, num_classes, ignore_index)  # names the value; free on CPU
    acc = loss_dtype(logits.dtype)
    recipe = _recipe_weight(recipe, logits)
    weight = None if recipe is None else recipe.weight
    kept_scale, fold = kept_gradient_scale(logits.dtype)
    scalars = torch.empty(2 if weight is None else 3, dtype=acc, device=device)
    factor = torch.empty((), dtype=acc, device=device)
    sync = torch.empty(n_rows + 1, dtype=torch.int32, device=device)
    mean = reduction == "mean"
    normalized = mean and normalizer is not None
    with device_guard(device):
        prologue_kernel[(1,)](
            target,
            sync,
            scalars,
            factor,
            normalizer if normalized else scalars,
            weight,
            n_rows,
            n_rows + 1,
            num_classes,
            ignore_index,
            float(kept_scale),
            MEAN=mean,
            NORMALIZED=normalized,
            FOLD=fold,
            BLOCK=1024,
            num_warps=4,
            WEIGHTED=weight is not None,
        )
    rows = torch.empty(n_rows, dtype=acc, device=device)
    loss = rows if reduction == "none" else torch.empty((), dtype=acc, device=device)
    grad = torch.empty_like(logits) if compute_grad else None
    _launch_rows(
        logits,
        target,
        rows,
        grad,
        scalars,
        sync,
        loss,
        label_smoothing,
        ignore_index,
        reduction != "none",
        config,
        recipe,
        lse,
    )
    return loss, grad, factor


def forward(logits, target, label_smoothing, ignore_index, grad, grad_scale, config, recipe=None, lse=None):
    """``Backend.forward``: per-row losses, and ``grad`` (may alias ``logits``) times ``grad_scale``;
    with ``recipe`` and ``lse``, ``Backend.forward_recipe``."""
    n_rows, num_classes = logits.shape
    device = logits.device
    check_device(device)
    check_targets(target, num_classes, ignore_index)
    rows = torch.empty(n_rows, dtype=loss_dtype(logits.dtype), device=device)
    sync = torch.zeros(n_rows + 1, dtype=torch.int32, device=device)
    recipe = _recipe_weight(recipe, logits)
    if recipe is not None and recipe.weight is not None:
        scalars = torch.zeros(3, dtype=rows.dtype, device=device)
        scalars[0] = grad_scale
        scalars[2] = recipe.weight.sum()  # W
    else:
        scalars = grad_scale.reshape(1).to(rows.dtype)
    _launch_rows(
        logits, target, rows, grad, scalars, sync, rows, label_smoothing, ignore_index, False, config, recipe, lse
    )
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
            flat_grad,
            flat_out,
            grad_out,
            factor,
            n_rows,
            n_cols,
            *strides,
            PER_ROW=per_row,
            INPLACE=inplace,
            BLOCK=block,
            ACC_DTYPE=acc_dtype,
            num_warps=num_warps,
        )
    return out
