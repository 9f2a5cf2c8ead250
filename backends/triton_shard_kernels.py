"""Triton kernels for the two halves of the vocabulary-parallel loss, and their launchers.

``smoothce.distributed`` splits the classes over ranks: a rank holds the columns [start, start + V_i)
of the logits. ``shard_stats_kernel`` computes a slice's row statistics and ``shard_grad_kernel``
its gradient from the all-reduced ones (the contract: ``Backend.shard_stats``/``shard_grad``).
``start`` and ``V`` are Python ints or 0-d int64 device tensors read by the kernels (no host sync).
The recipe's options (``Recipe``: class weights, z-loss, soft-capping) are constexpr switches, so the
plain kernels are the ones compiled without them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from smoothce.backends.triton_common import (
    cap_values,
    check_device,
    col_offsets,
    device_guard,
    grad_sweep,
    kernel_switches,
    round_to,
    row_stats,
    softcap,
    split_float,
    sum_ref,
    wide,
    zero_row,
)
from smoothce.numerics import loss_dtype


@triton.jit
def _scalar(value, IN_MEMORY: tl.constexpr):
    # An int argument, or (IN_MEMORY) a pointer to a 0-d int64 tensor holding it.
    if IN_MEMORY:
        return tl.load(value).to(tl.int64)
    else:
        return tl.cast(value, tl.int64)


@triton.jit
def _slice_target(target_ptr, row, start, ignore_index, local_classes, START_IN_MEMORY: tl.constexpr):
    # (valid, k, owned): whether the row's target is not ignore_index, its column in the slice, and
    # whether the slice holds it.
    target = tl.load(target_ptr + row).to(tl.int64)
    valid = target != ignore_index
    k = target - _scalar(start, START_IN_MEMORY)
    return valid, k, valid & (k >= 0) & (k < local_classes)


@triton.jit
def shard_stats_kernel(
    # pointers
    logits_ptr,  # (N, V_i) float16/bfloat16/float32/float64
    target_ptr,  # (N,) int32/int64 global class ids, contiguous
    stats_ptr,  # (4, N) float32 (float64 for float64 logits), contiguous: m, R, t, z_k
    start,  # global class of column 0: an int, or a pointer to it (START_IN_MEMORY)
    weight_ptr,  # (V_i,) the slice's class weights, accumulation dtype, contiguous (WEIGHTED; else None)
    weight_sum_ptr,  # 0-d W_i = their sum (WEIGHTED; else None)
    # strides, in elements
    stride_logits_row,
    stride_logits_col,
    # sizes and scalars
    n_rows,
    local_classes,  # V_i
    ignore_index,
    cap_hi,  # c = cap_hi + cap_lo and 1 / c = icap_hi + icap_lo (SOFTCAP; else None)
    cap_lo,
    icap_hi,
    icap_lo,
    # compile-time switches
    BLOCK_V: tl.constexpr,
    START_IN_MEMORY: tl.constexpr,
    SMOOTHING: tl.constexpr,  # lam > 0: compute t (else it is written as 0)
    ACC_DTYPE: tl.constexpr,
    FAST_EXP: tl.constexpr,  # exp's hardware form (float32 on NVIDIA GPUs)
    WIDE_COLS: tl.constexpr,  # (V_i - 1) x the column stride past int32: column offsets in int64
    SOFTCAP: tl.constexpr = False,  # the capped logits z' = c tanh(z / c) (``triton_common.softcap``)
    WEIGHTED: tl.constexpr = False,  # t = sum_j w_j (z'_j - m~)
):
    """One program per row of the slice z (V_i values), one sweep (``row_stats``), writing the
    (4, N) rows m, R, t, z_k of ``Backend.shard_stats``; ignored rows too (m, R, t do not depend on
    the target).

    The sweep keeps a max, remainder and sum per lane and combines the lanes like ranks combine in
    ``smoothce.distributed``: R = sum over all values but one max of exp(z_j - m), and the smoothing
    sum is taken relative to ref, a fixed logit of the row (z_k where the slice holds the target,
    else column 0; 0 where that one is not finite or passes 2**64 in size), so that
    t = sum_j (z_j - ref) + V_i (ref - m~) sums no raw logits and a common offset cancels.
    With SOFTCAP everything is of the capped z' (z_k, ref and the sweep's values); with WEIGHTED,
    t = sum_j w_j (z_j - ref) + W_i (ref - m~).
    """
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    offsets = col_offsets(BLOCK_V, WIDE_COLS)
    _, k, owned = _slice_target(target_ptr, row, start, ignore_index, local_classes, START_IN_MEMORY)
    # One scalar read: z_k where the slice holds the target, else column 0, a logit of the row that
    # the per-lane sums s are taken from (``sum_ref``: a common offset cancels in z - ref).
    z_ref = tl.load(logits_row + tl.where(owned, k, 0) * stride_logits_col, mask=local_classes > 0, other=0.0)
    z_ref = z_ref.to(ACC_DTYPE)
    cap, inv_cap = cap_values(cap_hi, cap_lo, icap_hi, icap_lo, ACC_DTYPE, SOFTCAP)
    if SOFTCAP:
        z_ref, _ = softcap(z_ref, cap, inv_cap, FAST_EXP)  # as the sweep caps it: shard_grad compares it with M
    z_k = tl.where(owned, z_ref, 0.0)
    ref = sum_ref(z_ref)

    row_max, r_row, s_row = row_stats(
        logits_row,
        stride_logits_col,
        local_classes,
        ref,
        offsets,
        BLOCK_V,
        SMOOTHING,
        ACC_DTYPE,
        FAST_EXP,
        "",
        weight_ptr,
        cap,
        inv_cap,
        SOFTCAP,
        WEIGHTED,
    )
    t_row = tl.zeros((), ACC_DTYPE)
    if SMOOTHING:
        # t = sum (z - m~) = sum (z - ref) + V_i (ref - m~): nothing summed over raw logits.
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        if WEIGHTED:
            t_row = s_row + tl.load(weight_sum_ptr).to(ACC_DTYPE) * (ref - shift)
        else:
            t_row = s_row + tl.cast(local_classes, ACC_DTYPE) * (ref - shift)

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
    weight_ptr,  # (V_i,) the slice's class weights, contiguous (WEIGHTED; else None)
    target_weight_ptr,  # (N,) w_k of every row, contiguous (WEIGHTED; else None)
    total_weight_ptr,  # 0-d W, the sum of all V weights (WEIGHTED and SMOOTHING; else None)
    lse_ptr,  # (N,) the rows' global lse, contiguous (ZLOSS; else None)
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
    cap_hi,  # c and 1 / c as two float32 halves each (SOFTCAP; else None)
    cap_lo,
    icap_hi,
    icap_lo,
    zl_hi,  # the z-loss s as two float32 halves (ZLOSS; else None)
    zl_lo,
    # compile-time switches
    BLOCK_V: tl.constexpr,
    START_IN_MEMORY: tl.constexpr,
    V_IN_MEMORY: tl.constexpr,
    SMOOTHING: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    FAST_EXP: tl.constexpr,  # exp's hardware form (float32 on NVIDIA GPUs)
    WIDE_COLS: tl.constexpr,  # (V_i - 1) x a column stride past int32: column offsets in int64
    SOFTCAP: tl.constexpr = False,
    WEIGHTED: tl.constexpr = False,
    ZLOSS: tl.constexpr = False,
):
    """One program per row, one sweep, from the global row max M and the excess e = S - 1 of
    S = sum_j exp(z_j - M~) over all V classes (c the gradient's factor):

        grad_j = c (p_j - lam / V),  p_j = exp(z_j - M~) / S                   j != k - start
        grad_k = c ((p_k - lam / V) - (1 - lam)),  or c ((lam - lam / V) - e / S) when z_k = M, e < 1

    the sweep (``grad_sweep``) as exp(z_j - M~) a - b with a = c / S and b = c lam / V, the target
    column once as a scalar in its own form, written again after the sweep. Ignored rows read
    nothing and write zeros.

    With the recipe's switches, ``Backend.shard_grad``'s recipe form (of the capped z' with SOFTCAP,
    w_k = 1 and W = V without WEIGHTED, s = 0 without ZLOSS): the sweep with a = c A / S and
    b = c lam / V (times w_j, and the cap's chain rule, in ``grad_sweep``), and the target column
    c (B p_k - (lam / V) w_k - (1 - lam) w_k (1 - p_k)) (1 - (z'_k / cap)^2), B = (lam / V) W + 2 s w_k lse.
    """
    row = tl.program_id(0).to(tl.int64)
    valid, k, owned = _slice_target(target_ptr, row, start, ignore_index, local_classes, START_IN_MEMORY)
    logits_row = logits_ptr + row * stride_logits_row
    grad_row = grad_ptr + row * stride_grad_row
    offsets = col_offsets(BLOCK_V, WIDE_COLS)
    out = grad_ptr.dtype.element_ty
    if valid:
        lam = wide(lam_hi, lam_lo, ACC_DTYPE)
        smooth = lam / _scalar(num_classes, V_IN_MEMORY).to(ACC_DTYPE)
        row_max = tl.load(row_max_ptr + row * stride_row_max).to(ACC_DTYPE)
        excess = tl.load(excess_ptr + row * stride_excess).to(ACC_DTYPE)
        shift = tl.where(row_max == float("-inf"), 0.0, row_max)
        inv_sum = 1.0 / (1.0 + excess)
        scale = tl.load(grad_scale_ptr).to(ACC_DTYPE)
        # z_k before the sweep, which may write over the logits (a gradient in their place).
        z_k = tl.load(logits_row + tl.where(owned, k, 0) * stride_logits_col, mask=owned, other=0.0).to(ACC_DTYPE)
        a = inv_sum * scale
        b = tl.zeros((), ACC_DTYPE)
        if SMOOTHING:
            b = smooth * scale
        cap, inv_cap = cap_values(cap_hi, cap_lo, icap_hi, icap_lo, ACC_DTYPE, SOFTCAP)
        if SOFTCAP or WEIGHTED or ZLOSS:
            # A = (1 - lam) w_k + B, B = (lam / V) W + 2 s w_k lse (w_k = 1 and W = V without weights).
            w_k = tl.full((), 1.0, ACC_DTYPE)
            b_row = lam
            if WEIGHTED:
                w_k = tl.load(target_weight_ptr + row).to(ACC_DTYPE)
                b_row = tl.zeros((), ACC_DTYPE)
                if SMOOTHING:
                    b_row = smooth * tl.load(total_weight_ptr).to(ACC_DTYPE)
            if ZLOSS:
                b_row += 2.0 * wide(zl_hi, zl_lo, ACC_DTYPE) * w_k * tl.load(lse_ptr + row).to(ACC_DTYPE)
            a = ((1.0 - lam) * w_k + b_row) * a
        grad_sweep(
            logits_row,
            stride_logits_col,
            grad_row,
            stride_grad_col,
            local_classes,
            shift,
            a,
            b,
            offsets,
            BLOCK_V,
            ACC_DTYPE,
            FAST_EXP,
            "",
            weight_ptr,
            cap,
            inv_cap,
            SOFTCAP,
            WEIGHTED and SMOOTHING,
        )
        if SOFTCAP or WEIGHTED or ZLOSS:
            if owned:
                # The recipe's target column: 1 - p_k = e / S where z'_k = M and p_k > 1/2.
                chain_k = tl.full((), 1.0, ACC_DTYPE)
                if SOFTCAP:
                    z_k, chain_k = softcap(z_k, cap, inv_cap, FAST_EXP)
                p_k = tl.exp(z_k - shift) * inv_sum
                rest = tl.where((z_k == row_max) & (excess < 1.0), excess * inv_sum, 1.0 - p_k)
                g_k = (b_row * p_k - smooth * w_k - (1.0 - lam) * w_k * rest) * chain_k
                tl.debug_barrier()  # after every thread's store of the block holding k
                tl.store(grad_row + k * stride_grad_col, round_to(g_k * scale, out))
        elif owned:
            # The target column, written again over the sweep's value: p_k - 1 = -e / S where z_k is
            # the max and p_k > 1/2 (a confident row keeps its digits); else (p_k - lam / V) - (1 - lam),
            # exact at lam = 1.
            p_k = tl.exp(z_k - shift) * inv_sum
            g_k = tl.where(
                (z_k == row_max) & (excess < 1.0), (lam - smooth) - excess * inv_sum, (p_k - smooth) - (1.0 - lam)
            )
            tl.debug_barrier()  # after every thread's store of the block holding k
            tl.store(grad_row + k * stride_grad_col, round_to(g_k * scale, out))
    else:
        zero_row(grad_row, stride_grad_col, local_classes, offsets, BLOCK_V)


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


def _row_vector(value, name: str, like: torch.Tensor, length: int) -> torch.Tensor:
    """``value`` as a contiguous (length,) vector of the loss dtype on ``like``'s device (a copy only
    where it is not one: the all-reduced target weights are a column of a wider tensor)."""
    if not isinstance(value, torch.Tensor) or value.shape != (length,) or value.device != like.device:
        raise ValueError(
            f"{name} must be a ({length},) tensor on {like.device}, got "
            + (f"shape {tuple(value.shape)} on {value.device}" if isinstance(value, torch.Tensor) else repr(value))
        )
    return value.to(loss_dtype(like.dtype)).contiguous()


def _recipe_arguments(logits: torch.Tensor, recipe) -> tuple[dict, dict]:
    """(the kernels' weight and cap arguments, their SOFTCAP/WEIGHTED switches) for a ``Recipe`` or None."""
    weight = cap = None
    if recipe is not None:
        weight, cap = recipe.weight, recipe.softcap
    arguments = {"weight_ptr": None}
    if weight is not None:
        arguments["weight_ptr"] = _row_vector(weight, "recipe.weight (the slice's weights)", logits, logits.shape[1])
    for name, value in (("cap", cap), ("icap", None if cap is None else 1.0 / cap)):
        arguments[f"{name}_hi"], arguments[f"{name}_lo"] = (None, None) if value is None else split_float(value)
    return arguments, {"SOFTCAP": cap is not None, "WEIGHTED": weight is not None}


def shard_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    start: int | torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    config: dict,
    recipe=None,
) -> torch.Tensor:
    """Launch ``shard_stats_kernel``: the (4, N) rows m, R, t, z_k of ``Backend.shard_stats``.

    ``config`` is the launch configuration (``TritonBackend.shard_launch_config``): ``block`` is the
    kernel's BLOCK_V, ``num_warps``, ``fast_exp`` and ``options`` (extra compile options) as they are.
    ``recipe``: None or a ``Recipe`` with the slice's weights (``Backend.shard_stats``).
    """
    n_rows, local_classes = logits.shape
    guard, block_v = _prepare(logits, config)
    stats = torch.zeros(4, n_rows, dtype=loss_dtype(logits.dtype), device=logits.device)
    if n_rows == 0:
        return stats
    start_arg, start_in_memory = _scalar_arg(start, "start", logits.device)
    switches = kernel_switches(logits, config, logits.stride(1))
    arguments, recipe_switches = _recipe_arguments(logits, recipe)
    weight_sum = None if arguments["weight_ptr"] is None else arguments["weight_ptr"].sum()
    if recipe_switches["SOFTCAP"] or recipe_switches["WEIGHTED"]:
        switches.update(recipe_switches)  # (the plain kernel is launched as it always was)
    with guard:
        shard_stats_kernel[(n_rows,)](
            logits,
            target,
            stats,
            start_arg,
            arguments.pop("weight_ptr"),
            weight_sum,
            logits.stride(0),
            logits.stride(1),
            n_rows,
            local_classes,
            ignore_index,
            **arguments,
            BLOCK_V=block_v,
            START_IN_MEMORY=start_in_memory,
            SMOOTHING=label_smoothing > 0.0,
            num_warps=config["num_warps"],
            **switches,
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
    recipe=None,
    lse: torch.Tensor | None = None,
    target_weight: torch.Tensor | None = None,
    total_weight: torch.Tensor | None = None,
) -> None:
    """Launch ``shard_grad_kernel``: write ``Backend.shard_grad``'s gradient into ``grad`` (``config``: as above).

    ``recipe``, ``lse``, ``target_weight``, ``total_weight``: as in ``Backend.shard_grad``.
    """
    n_rows, local_classes = logits.shape
    guard, block_v = _prepare(logits, config)
    if n_rows == 0:
        return
    start_arg, start_in_memory = _scalar_arg(start, "start", logits.device)
    vocab_arg, vocab_in_memory = _scalar_arg(num_classes, "num_classes", logits.device)
    lam_hi, lam_lo = split_float(float(label_smoothing))
    switches = kernel_switches(logits, config, logits.stride(1), grad.stride(1))
    arguments, recipe_switches = _recipe_arguments(logits, recipe)
    z_loss = 0.0 if recipe is None else float(recipe.z_loss)
    arguments["zl_hi"], arguments["zl_lo"] = split_float(z_loss) if z_loss != 0.0 else (None, None)
    arguments.update(target_weight_ptr=None, total_weight_ptr=None, lse_ptr=None)
    if recipe_switches["WEIGHTED"]:
        arguments["target_weight_ptr"] = _row_vector(target_weight, "target_weight", logits, n_rows)
        if label_smoothing > 0.0:
            if not isinstance(total_weight, torch.Tensor) or total_weight.numel() != 1:
                raise ValueError(f"total_weight must be a one-element tensor (weights, lam > 0), got {total_weight!r}")
            arguments["total_weight_ptr"] = total_weight.to(loss_dtype(logits.dtype))
    if z_loss != 0.0:
        arguments["lse_ptr"] = _row_vector(lse, "lse", logits, n_rows)
    if recipe_switches["SOFTCAP"] or recipe_switches["WEIGHTED"] or z_loss != 0.0:
        switches.update(recipe_switches, ZLOSS=z_loss != 0.0)  # (the plain kernel is launched as it always was)
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
            arguments.pop("weight_ptr"),
            arguments.pop("target_weight_ptr"),
            arguments.pop("total_weight_ptr"),
            arguments.pop("lse_ptr"),
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
            **arguments,
            BLOCK_V=block_v,
            START_IN_MEMORY=start_in_memory,
            V_IN_MEMORY=vocab_in_memory,
            SMOOTHING=label_smoothing > 0.0,
            num_warps=config["num_warps"],
            **switches,
            **config.get("options", {}),
        )
