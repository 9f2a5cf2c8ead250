"""The Triton kernel of smoothce's cross-entropy and its launcher, shared by the CUDA and XPU backends.

One program per row of logits z (N, V). It reads the row in fixed blocks of
``BLOCK_V`` columns, so any V (1 up to 262144 and beyond) runs in the same
registers, and computes in float32 (float64 for float64 logits) whatever the
input dtype. For a row with target k and smoothing lam:

    sweep 1 (online logsumexp, relative to the running max m):
        m' = max(m, max_j z_j),  d' = d exp(m - m') + sum_j exp(z_j - m'),  s' = s + sum_j z_j
    after it:  r = m + log d,   loss = r - (1 - lam) z_k - (lam / V) s
                                     = log d + (m - z_k) + lam (z_k - s / V)
    sweep 2 (only when a gradient is wanted; a constexpr switch removes it otherwise):
        grad_j = grad_scale * (p_j - lam / V)                     for j != k
        grad_k = grad_scale * ((p_k - 1) + lam (1 - 1/V)),        p_j = exp(z_j - m) / d

``grad_scale`` (1/count for "mean", 1 otherwise) is a 0-d tensor on the device,
read by the kernel, so the host never waits for the count. Each gradient element
is rounded to the output dtype once; p_k - 1 is taken in float32 first (exact for
p_k >= 1/2, by Sterbenz), because p - 1 near p = 1 is where half precision would lose
the most, and a single class (V = 1) gets exactly 0. Ignored rows
(target == ignore_index) read no logits, get loss 0 and a zero gradient row.
Row offsets and column offsets are 64-bit: N * V > 2**31 elements, and transposed
logits whose column stride is N, both work.

Out-of-range targets (neither ignore_index nor in [0, V)) never cause an
out-of-bounds access: the kernel clamps the index and treats the row as ignored.
They are still an error, raised before the launch without a host sync on the hot
path: for CPU tensors (Triton's interpreter) ``check_targets_on_host`` raises a
ValueError naming the value, which costs nothing there; on a GPU a reduced bool is
checked with ``torch._assert_async`` (a device-side assert: the failing launch
reports the message and the device context is unusable afterwards, like an
out-of-range index in ``torch.nn.functional.cross_entropy``). Naming the value on
a GPU would need a sync, so the message names the valid range instead.

This module imports Triton at import time; the backends import it only when a
kernel is first launched. Triton reads ``TRITON_INTERPRET`` when the kernel is
decorated, that is when this module is imported: set it before the first launch.
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from smoothce.backends.base import check_targets_on_host, loss_dtype


@triton.jit
def cross_entropy_fwd_kernel(
    # pointers
    logits_ptr,  # (N, V) float16/bfloat16/float32/float64
    target_ptr,  # (N,) int32/int64, contiguous
    loss_ptr,  # (N,) float32 (float64 for float64 logits), written
    grad_ptr,  # (N, V) in the logits' dtype, written when COMPUTE_GRAD
    grad_scale_ptr,  # 0-d: the gradient's factor (1/count for "mean")
    # strides, in elements
    stride_logits_row,
    stride_logits_col,
    stride_grad_row,
    stride_grad_col,
    # sizes and scalars
    num_classes,  # V
    ignore_index,
    lam_hi,  # lam = lam_hi + lam_lo, both exact in float32, so float64 rows see lam to ~48 bits
    lam_lo,
    # compile-time switches
    BLOCK_V: tl.constexpr,
    SMOOTHING: tl.constexpr,  # lam > 0; without it s and every lam term are left out
    COMPUTE_GRAD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 logits
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row).to(tl.int64)
    # An out-of-range target is reported by the launcher; here it only must not index out of bounds.
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    k = tl.where(valid, target, 0)
    lam = tl.cast(lam_hi, ACC_DTYPE) + tl.cast(lam_lo, ACC_DTYPE)
    logits_row = logits_ptr + row * stride_logits_row
    offsets = tl.arange(0, BLOCK_V)
    n_read = tl.where(valid, num_classes, 0)  # columns to read: none on ignored rows

    # Sweep 1: m = running max, d = sum exp(z - m), s = sum z. Masked tails read -inf
    # (neutral for the max, exp(-inf) = 0 for d) and count 0 in s. Ignored rows read nothing.
    m = tl.full((), float("-inf"), ACC_DTYPE)
    d = tl.zeros((), ACC_DTYPE)
    s = tl.zeros((), ACC_DTYPE)
    for start in range(0, num_classes, BLOCK_V):
        cols = start + offsets
        mask = cols < n_read
        z = tl.load(logits_row + cols.to(tl.int64) * stride_logits_col, mask=mask, other=float("-inf"))
        z = z.to(ACC_DTYPE)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every value so far is -inf, shift by 0 so no exp sees -inf - (-inf).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        if SMOOTHING:
            s += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m = m_new

    # loss = r - (1 - lam) z_k - (lam / V) s with r = m + log d, taken as
    #   loss = log d + (m - z_k) + lam (z_k - s / V)
    # so that m - z_k cancels exactly and large offsets of the logits cost no precision.
    # Ignored rows (m = -inf, d = 0 there) get 0.
    m = tl.where(valid, m, 0.0)
    d = tl.where(valid, d, 1.0)
    z_k = tl.load(logits_row + k * stride_logits_col, mask=valid, other=0.0).to(ACC_DTYPE)
    loss = tl.log(d) + (m - z_k)
    if SMOOTHING:
        # Only with lam > 0: a -inf logit (a masked class) would give 0 * -inf = nan at lam = 0.
        loss += lam * (z_k - s / num_classes)
    loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))

    if COMPUTE_GRAD:
        # Sweep 2: grad_j = scale * (p_j - [j = k] + lam ([j = k] - 1/V)), p_j = exp(z_j - m) / d,
        # rounded to the gradient's dtype once. Ignored rows write zeros.
        row_scale = tl.where(valid, tl.load(grad_scale_ptr).to(ACC_DTYPE), 0.0)
        inv_d = 1.0 / d
        smooth = lam / num_classes  # lam / V, off the target column
        smooth_k = lam - smooth  # lam (1 - 1/V), back on the target column
        grad_row = grad_ptr + row * stride_grad_row
        for start in range(0, num_classes, BLOCK_V):
            cols = start + offsets
            cols64 = cols.to(tl.int64)
            z = tl.load(logits_row + cols64 * stride_logits_col, mask=cols < n_read, other=float("-inf"))
            p = tl.exp(z.to(ACC_DTYPE) - m) * inv_d
            is_k = cols == k
            g = p - tl.where(is_k, 1.0, 0.0)  # p_k - 1 is exact for p_k >= 1/2
            if SMOOTHING:
                g += tl.where(is_k, smooth_k, -smooth)
            g = tl.where(valid, g * row_scale, 0.0)
            tl.store(
                grad_row + cols64 * stride_grad_col, g.to(grad_ptr.dtype.element_ty), mask=cols < num_classes
            )


def _split_float(value: float) -> tuple[float, float]:
    """(hi, lo), both exactly representable in float32, with hi + lo == value to ~48 bits."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, struct.unpack("f", struct.pack("f", value - hi))[0]


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


# True when the kernel was decorated under TRITON_INTERPRET=1: it then runs on CPU tensors.
INTERPRETED = type(cross_entropy_fwd_kernel).__name__ == "InterpretedFunction"


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    grad: torch.Tensor | None,
    grad_scale: torch.Tensor,
    *,
    block_v: int,
    num_warps: int,
    num_stages: int,
    options: dict | None = None,
) -> torch.Tensor:
    """Launch the kernel on ``logits`` (N, V); returns the (N,) per-row loss, writes ``grad`` if given.

    The arguments are those of ``Backend.forward``; ``block_v`` (a power of two),
    ``num_warps`` and ``num_stages`` are the backend's launch configuration, and
    ``options`` holds extra compile options of its Triton (Intel's ``grf_mode``).
    Nothing here reads a device value on the host, so torch.compile graphs that call
    the op (opaque to Dynamo) stay free of syncs.
    """
    n_rows, num_classes = logits.shape
    device = logits.device
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if device.type == "cpu":
        if not INTERPRETED:
            raise RuntimeError(
                "smoothce's Triton kernel was built for a GPU in this process, so it cannot run on CPU "
                "tensors: set TRITON_INTERPRET=1 before the first Triton launch"
            )
        check_targets_on_host(target, num_classes, ignore_index)
    else:
        check_targets_async(target, num_classes, ignore_index)
    loss = torch.empty(n_rows, dtype=loss_dtype(logits.dtype), device=device)
    compute_grad = grad is not None
    # Without a gradient the kernel never touches grad_ptr (constexpr branch); logits only fill the slot.
    grad_arg = grad if compute_grad else logits
    lam_hi, lam_lo = _split_float(label_smoothing)
    acc_dtype = tl.float64 if logits.dtype == torch.float64 else tl.float32
    # Launch on the logits' device, not the current one; reached through torch.<device type>.
    guard = getattr(torch, device.type).device(device) if device.type != "cpu" else contextlib.nullcontext()
    with guard:
        cross_entropy_fwd_kernel[(n_rows,)](
            logits,
            target,
            loss,
            grad_arg,
            grad_scale,
            logits.stride(0),
            logits.stride(1),
            grad_arg.stride(0),
            grad_arg.stride(1),
            num_classes,
            ignore_index,
            lam_hi,
            lam_lo,
            BLOCK_V=block_v,
            SMOOTHING=label_smoothing > 0.0,
            COMPUTE_GRAD=compute_grad,
            ACC_DTYPE=acc_dtype,
            num_warps=num_warps,
            num_stages=num_stages,
            **(options or {}),
        )
    return loss
