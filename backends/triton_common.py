"""What the Triton kernels share: the ``@triton.jit`` helpers of the row sweeps (soft-capping and
class weights among them, as constexpr switches), and the host-side pieces both launchers use
(kernel switches, constants split for float32, device checks).

``triton_kernels`` (the loss) and ``triton_shard_kernels`` (the vocabulary-parallel halves) build
on these. Importing this module imports Triton, which reads ``TRITON_INTERPRET`` then.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))  # a constexpr: kernels may read only those globals


@triton.jit
def exp(x, FAST: tl.constexpr):
    # exp(x) = 2**(x log2 e). FAST (float32 on NVIDIA GPUs): the hardware's ex2 with results below
    # 2**-126 flushed to 0, two instructions; else Triton's exp, which also rescales such results.
    if FAST:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp(x)


@triton.jit
def to_acc(z, ACC_DTYPE: tl.constexpr, FAST: tl.constexpr):
    # A loaded block in the accumulation dtype. FAST (NVIDIA): a bfloat16 pair, packed in a 32-bit
    # register, is its low half shifted up and its high half masked, one instruction per value.
    if FAST and z.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(
            "shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xFFFF0000;", "=r,=r,r", [z], dtype=tl.float32, is_pure=True, pack=2
        )
    else:
        return z.to(ACC_DTYPE)


@triton.jit
def wide(hi, lo, ACC_DTYPE: tl.constexpr):
    # A float passed as two float32 halves (``split_float``; Triton passes Python floats as float32):
    # all of it in float64 accumulation, its float32 rounding otherwise.
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def col_offsets(BLOCK: tl.constexpr, WIDE_COLS: tl.constexpr):
    # A block's column offsets 0 .. BLOCK - 1, in int64 where (V - 1) x a column stride passes int32.
    offsets = tl.arange(0, BLOCK)
    if WIDE_COLS:
        offsets = offsets.to(tl.int64)
    return offsets


@triton.jit
def sum_ref(z):
    # The logit a row's sums are taken relative to (sum (z_j - ref): a common offset cancels): z, or
    # 0 where z is not finite or 2**64 or more in size (a class masked with the dtype's lowest
    # value, where z_j - ref could overflow).
    return tl.where(tl.abs(z) < 1.8446744073709552e19, z, 0.0)


@triton.jit
def cap_values(cap_hi, cap_lo, icap_hi, icap_lo, ACC_DTYPE: tl.constexpr, SOFTCAP: tl.constexpr):
    # (c, 1 / c) of the soft cap in the accumulation dtype, from their float32 halves; without
    # SOFTCAP the arguments' Nones, unused.
    if SOFTCAP:
        return wide(cap_hi, cap_lo, ACC_DTYPE), wide(icap_hi, icap_lo, ACC_DTYPE)
    else:
        return cap_hi, icap_hi


@triton.jit
def block_weights(weight_ptr, cols, mask, MASKED: tl.constexpr, ACC_DTYPE: tl.constexpr, WEIGHTED: tl.constexpr):
    # The class weights of a block's columns in the accumulation dtype (0 on masked lanes where
    # MASKED); without WEIGHTED the argument's None, unused.
    if WEIGHTED:
        if MASKED:
            return tl.load(weight_ptr + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        else:
            return tl.load(weight_ptr + cols).to(ACC_DTYPE)
    else:
        return weight_ptr


@triton.jit
def softcap(z, cap, inv_cap, FAST_EXP: tl.constexpr):
    """(z', 1 - (z' / c)^2) of the soft-capped logits z' = c tanh(z / c), to a few ulps (``cap`` = c,
    ``inv_cap`` = 1 / c in the accumulation dtype).

    With x = z / c and e = exp(-2|x|) in (0, 1]: tanh|x| = (1 - e) / (1 + e) and
    1 - tanh^2 x = 4 e / (1 + e)^2 (no cancellation, where tanh is near 1). 1 - e loses digits as
    |x| -> 0, so there (|x| < 1/4) tanh x is its Taylor series x (1 - x^2/3 + 2 x^4/15 - ...) (the
    coefficients 2^2n (2^2n - 1) B_2n / (2n)!), to float32's rounding in 5 terms, float64's in 12.
    z = -inf gives -c (and a chain of 0); NaN stays NaN. Triton has no tanh in every version: it
    is built from exp here.
    """
    # float64 divides (rounded once; 1 / c in two float32 halves carries ~48 bits), float32 multiplies.
    x = z / cap if z.dtype == tl.float64 else z * inv_cap
    a = tl.abs(x)
    e = exp(-2.0 * a, FAST_EXP)
    inv = 1.0 / (1.0 + e)
    big = (1.0 - e) * inv
    u = tl.minimum(a, 0.25)  # |x| where the series is used (bounded elsewhere: never inf - inf)
    x2 = u * u
    if x.dtype == tl.float64:
        p = -3.9278323883316834e-05
        p = p * x2 + 9.6915379569294503e-05
        p = p * x2 - 2.3912911424355248e-04
        p = p * x2 + 5.9002744094558595e-04
        p = p * x2 - 1.4558343870513183e-03
        p = p * x2 + 3.5921280365724810e-03
        p = p * x2 - 8.8632355299021966e-03
        p = p * x2 + 2.1869488536155203e-02
        p = p * x2 - 5.3968253968253971e-02
        p = p * x2 + 1.3333333333333333e-01
        p = p * x2 - 3.3333333333333333e-01
    else:
        p = 2.1869488536155203e-02 * x2 - 5.3968253968253971e-02
        p = p * x2 + 1.3333333333333333e-01
        p = p * x2 - 3.3333333333333333e-01
    small = u + u * (x2 * p)
    t = tl.where(a < 0.25, small, big)
    t = tl.where(x < 0.0, -t, t)
    return cap * t, 4.0 * e * inv * inv


@triton.jit
def capped(z, cap, inv_cap, mask, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, FAST_EXP: tl.constexpr):
    # z' of a loaded block: z itself without SOFTCAP; else c tanh(z / c), with the masked lanes
    # (loaded as -inf, which the cap would turn into -c) kept at -inf.
    if SOFTCAP:
        z, _ = softcap(z, cap, inv_cap, FAST_EXP)
        if MASKED:
            z = tl.where(mask, z, NEG_INF)
    return z


@triton.jit
def lane_step(
    z,
    m,
    r,
    s,
    ref,
    mask,
    MASKED: tl.constexpr,
    SMOOTHING: tl.constexpr,
    FAST_EXP: tl.constexpr,
    w=None,
    WEIGHTED: tl.constexpr = False,
):
    """Sweep 1's work on one block, lane by lane: no reduction across the block, one exp per value.

    Each lane keeps its max m, its remainder r = sum exp(z - m) beside its max's exact 1, and
    s = sum (z - ref) (sum w (z - ref) with the class weights w when WEIGHTED). With d = z - m, a
    new max (d > 0) gives r <- (r + 1) exp(-d), any other value r <- r + exp(d) (a tie adds 1):
    both are r f + exp(-|d|). A NaN logit makes d, and so r, NaN; z = -inf adds exp(-inf) = 0.
    (Also the vocabulary-parallel stats kernel's.)
    """
    d = z - m
    e = exp(-tl.abs(d), FAST_EXP)
    r = r * tl.where(d > 0.0, e, 1.0) + e
    m = tl.maximum(m, z)
    if SMOOTHING:
        dz = z - ref
        if MASKED:
            dz = tl.where(mask, dz, 0.0)
        if WEIGHTED:
            dz = dz * w
        s += dz
    return m, r, s


@triton.jit
def row_stats(
    row_ptr,
    stride,
    n_cols,
    ref,
    offsets,
    BLOCK: tl.constexpr,
    SMOOTHING: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    FAST_EXP: tl.constexpr,
    EVICT: tl.constexpr,
    weight_ptr=None,
    cap=None,
    inv_cap=None,
    SOFTCAP: tl.constexpr = False,
    WEIGHTED: tl.constexpr = False,
):
    """(M, R, S) of a row's first ``n_cols`` values, lane by lane (``lane_step``): M the max (-inf
    if no value is above -inf), R the sum of exp(z - M) over all values but one max, S = sum (z - ref).

    With SOFTCAP every z is the capped c tanh(z / c) (``softcap``; ``cap``, ``inv_cap``: c, 1 / c);
    with WEIGHTED, S = sum w (z - ref) with the class weights at ``weight_ptr`` (contiguous).

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
        z = to_acc(tl.load(row_ptr + offsets * stride, eviction_policy=EVICT), ACC_DTYPE, FAST_EXP)
        for start in range(BLOCK, n_full, BLOCK):
            z_next = to_acc(tl.load(row_ptr + (start + offsets) * stride, eviction_policy=EVICT), ACC_DTYPE, FAST_EXP)
            w = block_weights(weight_ptr, start - BLOCK + offsets, None, False, ACC_DTYPE, WEIGHTED)
            z = capped(z, cap, inv_cap, None, False, SOFTCAP, FAST_EXP)
            m, r, s = lane_step(z, m, r, s, ref, None, False, SMOOTHING, FAST_EXP, w, WEIGHTED)
            z = z_next
        w_last = block_weights(weight_ptr, n_full - BLOCK + offsets, None, False, ACC_DTYPE, WEIGHTED)
        z = capped(z, cap, inv_cap, None, False, SOFTCAP, FAST_EXP)
        m, r, s = lane_step(z, m, r, s, ref, None, False, SMOOTHING, FAST_EXP, w_last, WEIGHTED)
    if n_full < n_cols:
        cols = n_full + offsets
        mask = cols < n_cols
        z = tl.load(row_ptr + cols * stride, mask=mask, other=NEG_INF, eviction_policy=EVICT).to(ACC_DTYPE)
        w_tail = block_weights(weight_ptr, cols, mask, True, ACC_DTYPE, WEIGHTED)
        z = capped(z, cap, inv_cap, mask, True, SOFTCAP, FAST_EXP)
        m, r, s = lane_step(z, m, r, s, ref, mask, True, SMOOTHING, FAST_EXP, w_tail, WEIGHTED)
    lanes = tl.arange(0, BLOCK)
    seen = m > low
    M = tl.max(m, axis=0)
    first = tl.min(tl.where(seen & (m == M), lanes, BLOCK), axis=0)
    c = tl.exp(m - M)
    R = tl.sum(tl.where(lanes == first, r, tl.where(seen, r * c + c, r)), axis=0)
    return tl.where(first < BLOCK, M, NEG_INF), R, tl.sum(s, axis=0)


@triton.jit
def grad_value(z, w, shift, a, b, cap, inv_cap, SOFTCAP: tl.constexpr, WEIGHTED: tl.constexpr, FAST_EXP: tl.constexpr):
    # exp(z' - shift) a - b w, times the cap's chain rule 1 - (z' / c)^2 with SOFTCAP (z' = z
    # without, w = 1 without WEIGHTED): one exp and one fused multiply-add per value without options.
    if SOFTCAP:
        z, chain = softcap(z, cap, inv_cap, FAST_EXP)
    if WEIGHTED:
        b = b * w
    g = exp(z - shift, FAST_EXP) * a - b
    if SOFTCAP:
        g = g * chain
    return g


@triton.jit
def grad_sweep(
    row_ptr,
    stride,
    grad_row,
    grad_stride,
    n_cols,
    shift,
    a,
    b,
    offsets,
    BLOCK: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    FAST_EXP: tl.constexpr,
    EVICT: tl.constexpr,
    weight_ptr=None,
    cap=None,
    inv_cap=None,
    SOFTCAP: tl.constexpr = False,
    WEIGHTED: tl.constexpr = False,
):
    """grad_j = exp(z_j - shift) a - b over a row's ``n_cols`` values, each rounded to the gradient's
    dtype once: one exp and one fused multiply-add per value. With the options (``grad_value``):
    z_j capped and the result times 1 - (z'_j / c)^2 (SOFTCAP), b times the class weight w_j
    (WEIGHTED). Backwards, the masked tail first (what a statistics sweep just before left in the
    cache), then the full blocks unmasked, each one's load issued before the previous block's work.
    (Also the vocabulary-parallel gradient kernel's.)
    """
    out = grad_row.dtype.element_ty
    n_full = n_cols // BLOCK * BLOCK
    if n_full < n_cols:
        cols = n_full + offsets
        mask = cols < n_cols
        z = tl.load(row_ptr + cols * stride, mask=mask, other=NEG_INF, eviction_policy=EVICT)
        w_tail = block_weights(weight_ptr, cols, mask, True, ACC_DTYPE, WEIGHTED)
        g = grad_value(to_acc(z, ACC_DTYPE, FAST_EXP), w_tail, shift, a, b, cap, inv_cap, SOFTCAP, WEIGHTED, FAST_EXP)
        tl.store(grad_row + cols * grad_stride, round_to(g, out), mask=mask)
    if n_full > 0:
        cols = n_full - BLOCK + offsets
        z = to_acc(tl.load(row_ptr + cols * stride, eviction_policy=EVICT), ACC_DTYPE, FAST_EXP)
        for _ in range(1, n_full // BLOCK):
            z_next = to_acc(tl.load(row_ptr + (cols - BLOCK) * stride, eviction_policy=EVICT), ACC_DTYPE, FAST_EXP)
            w = block_weights(weight_ptr, cols, None, False, ACC_DTYPE, WEIGHTED)
            g = grad_value(z, w, shift, a, b, cap, inv_cap, SOFTCAP, WEIGHTED, FAST_EXP)
            tl.store(grad_row + cols * grad_stride, round_to(g, out))
            z, cols = z_next, cols - BLOCK
        w_last = block_weights(weight_ptr, cols, None, False, ACC_DTYPE, WEIGHTED)
        g = grad_value(z, w_last, shift, a, b, cap, inv_cap, SOFTCAP, WEIGHTED, FAST_EXP)
        tl.store(grad_row + cols * grad_stride, round_to(g, out))


@triton.jit
def zero_row(grad_row, grad_stride, n_cols, offsets, BLOCK: tl.constexpr):
    # An ignored row's gradient: exact zeros (and its logits never read).
    zeros = tl.zeros((BLOCK,), grad_row.dtype.element_ty)
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        tl.store(grad_row + cols * grad_stride, zeros, mask=cols < n_cols)


# True when the kernels were decorated under TRITON_INTERPRET=1: they then run on CPU tensors.
INTERPRETED = type(exp).__name__ == "InterpretedFunction"
_ROUND_ON_BITS: tl.constexpr = tl.constexpr(INTERPRETED)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    # x rounded to DTYPE to nearest, ties to even, as GPUs convert. Compiled, that is the cast with
    # the rounding asked for explicitly. Triton's interpreter truncates float32 -> bfloat16 whatever
    # the rounding asked for, so there it is done on the bits: add 0x7FFF plus the kept half's
    # lowest bit, keep the high half (NaN kept apart, whose bits the addition could carry to inf).
    if _ROUND_ON_BITS and tl.bfloat16 == DTYPE and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE, fp_downcast_rounding="rtne")


# Column offsets from this on are computed in int64 by the loop kernel (the split kernel always does).
WIDE_OFFSETS = 2**31


def kernel_switches(logits: torch.Tensor, config: dict, *col_strides: int) -> dict:
    """ACC_DTYPE, FAST_EXP and WIDE_COLS of the kernels reading ``logits`` with these column strides.

    FAST_EXP (``exp``'s PTX) where ``config`` asks for it and it can run: float32 accumulation on
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
