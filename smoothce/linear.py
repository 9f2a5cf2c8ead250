"""Fused output projection + label-smoothed cross-entropy: the LM head's loss without its (N, V) logits.

``linear_cross_entropy(hidden, weight, target, ...)`` means ``cross_entropy(F.linear(hidden, weight,
bias), target, ...)``, but the logits and their gradient only exist one chunk of rows at a time: the
forward computes each chunk's logits with one matmul, its loss and gradient in place through the
registry's backend, and from them d hidden and the chunk's share of d weight and d bias; backward
only scales those kept gradients ("none" recomputes them, chunk by chunk).
"""

from __future__ import annotations

import contextlib
import threading

import torch

from smoothce import dtensor, registry
from smoothce._autograd import register_kept_gradient_autograd
from smoothce._library import define
from smoothce.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    INT32_MAX,
    INT32_MIN,
    check_normalizer,
    check_option_values,
    normalizer_tensor,
    option_values,
)
from smoothce.dtensor import is_dtensor
from smoothce.numerics import kept_factors, loss_denominator, loss_dtype, reduce_rows

HALF_DTYPES = (torch.float16, torch.bfloat16)

# Bytes for one chunk's logits (plus its fp32 row temporaries), by device type. CPU: 224
# rows at V = 32000 fp32, enough for the matmuls, and 6% of the logits at N = 4096.
# Accelerators: the d weight matmul has K = the chunk's rows and reads and writes the (V, D)
# accumulator once per chunk, so small chunks are bandwidth-bound: on an H200 at V = 128256,
# D = 4096 bf16 (960 rows at 256 MiB), 128 MiB chunks took 1.30x the time of 256 MiB ones,
# 512 MiB ones 0.97x.
DEFAULT_CHUNK_BYTES = {"cpu": 32 << 20}
DEFAULT_ACCELERATOR_CHUNK_BYTES = 256 << 20


# ---------------------------------------------------------------------------------------
# Settings: chunk budget and d weight accumulation
# ---------------------------------------------------------------------------------------

_settings = threading.local()


@contextlib.contextmanager
def settings(*, chunk_bytes: int | None = None, fp32_weight_grad: bool | None = None):
    """Override how ``linear_cross_entropy`` chunks its work, for calls made inside the block.

    chunk_bytes: memory for one chunk of logits (and its fp32 row temporaries); default
        ``DEFAULT_CHUNK_BYTES`` for CPU tensors, ``DEFAULT_ACCELERATOR_CHUNK_BYTES`` otherwise.
        Rows per chunk = chunk_bytes // (V * itemsize + 4 * D), at least 1.
    fp32_weight_grad: accumulate d weight and d bias over the chunks in fp32 and round once
        (the default, True), or, for float16/bfloat16 weights, accumulate d weight in the
        weight's dtype (each chunk's sum rounded into it): no (V, D) fp32 buffer, which at
        V = 128256, D = 4096 is 2.1 GB, at the cost of one rounding per chunk.
    None leaves a setting as it is. Under torch.compile the values at trace time are used.
    """
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int)):
        raise TypeError(f"chunk_bytes must be an int, got {type(chunk_bytes).__name__}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    previous = (getattr(_settings, "chunk_bytes", None), getattr(_settings, "fp32_weight_grad", True))
    if chunk_bytes is not None:
        _settings.chunk_bytes = chunk_bytes
    if fp32_weight_grad is not None:
        _settings.fp32_weight_grad = bool(fp32_weight_grad)
    try:
        yield
    finally:
        _settings.chunk_bytes, _settings.fp32_weight_grad = previous


def chunk_bytes_for(device: torch.device) -> int:
    """The chunk budget in effect for tensors on ``device``."""
    chosen = getattr(_settings, "chunk_bytes", None)
    if chosen is not None:
        return chosen
    return DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_ACCELERATOR_CHUNK_BYTES)


def chunk_rows(n_rows: int, num_classes: int, dim: int, dtype: torch.dtype, chunk_bytes: int) -> int:
    """Rows per chunk: as many as ``chunk_bytes`` holds, a multiple of 32 from 128 on, at most N."""
    per_row = num_classes * dtype.itemsize + 4 * dim
    rows = max(1, chunk_bytes // per_row)
    if rows >= 128:
        rows -= rows % 32  # matmul-friendly row counts
    return max(1, min(rows, n_rows))


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------


def check_linear_arguments(hidden, weight, target, bias, label_smoothing, ignore_index, reduction) -> torch.Tensor:
    """Raise TypeError/ValueError naming the bad argument; return ``target`` ready to compare.

    Metadata only, so it works on fake tensors; the options come through ``option_values`` first.
    The returned target is ``target`` itself, or an int64 copy where an int32 target meets an
    ``ignore_index`` outside the int32 range (as ``smoothce.checks.check_arguments`` does).
    """
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias must have the dtype of hidden and weight ({hidden.dtype}), got {bias.dtype}")
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must be int64 or int32 class indices, got {target.dtype}")
    if hidden.dim() == 0:
        raise ValueError("hidden must have at least one dimension (..., D), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, D) like nn.Linear's, got shape {tuple(weight.shape)}")
    num_classes, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden's last dimension is {hidden.shape[-1]} but weight of shape {tuple(weight.shape)} expects D = {dim}"
        )
    if num_classes == 0:
        raise ValueError(f"weight must have at least one class (V >= 1), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (num_classes,):
        raise ValueError(f"bias must have shape ({num_classes},) to match weight's V, got {tuple(bias.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match hidden shape {tuple(hidden.shape)}: "
            f"expected target of shape {tuple(hidden.shape[:-1])} (hidden without its last dimension)"
        )
    for name, value in (("weight", weight), ("target", target), ("bias", bias)):
        if value is not None and value.device != hidden.device:
            raise ValueError(f"hidden is on {hidden.device} but {name} is on {value.device}")
    check_option_values(label_smoothing, reduction)
    if target.dtype == torch.int32 and not INT32_MIN <= ignore_index <= INT32_MAX:
        return target.long()  # no int32 target equals it, and an int32 comparison would wrap it onto a class
    return target


# ---------------------------------------------------------------------------------------
# The public op
# ---------------------------------------------------------------------------------------


def _linear_cross_entropy(
    hidden, weight, target, *, bias=None, label_smoothing=0.0, ignore_index=-100, reduction="mean", normalizer=None
):
    # Composite: autograd and torch.compile trace through this into linear_cross_entropy_fwd.
    label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
    target = check_linear_arguments(hidden, weight, target, bias, label_smoothing, ignore_index, reduction)
    check_normalizer(normalizer, reduction)
    normalizer = normalizer_tensor(normalizer, hidden)
    grad_on = torch.is_grad_enabled()
    loss = linear_cross_entropy_fwd(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        target.reshape(-1),
        float(label_smoothing),
        ignore_index,
        reduction,
        chunk_bytes_for(hidden.device),
        getattr(_settings, "fp32_weight_grad", True),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        normalizer,
    )[0]
    if reduction == "none":
        return loss.reshape(target.shape)
    return loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Label-smoothed cross-entropy of ``F.linear(hidden, weight, bias)`` without materialising the logits.

    hidden (..., D), weight (V, D) as in nn.Linear (an ``lm_head.weight`` as it is),
    bias (V,) or None, target (...) of int64/int32 class indices; hidden, weight and bias
    share one dtype (float32, bfloat16, float16, float64). Same result as
    ``smoothce.cross_entropy(F.linear(hidden, weight, bias), target, ...)``: float32
    (float64 for float64), shape (...) for "none", a scalar otherwise; "mean" over no
    counted target is 0 with zero gradients; ``normalizer`` as in ``smoothce.cross_entropy``.
    Gradients for hidden, weight and bias (whichever require grad) come in their dtypes.
    Chunking: see ``smoothce.linear.settings``.
    """
    # What the op's schema would coerce unseen (bool, numpy scalars) or reject with a RuntimeError
    # (a non-tensor); the op checks everything else, once.
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor or None, got {type(bias).__name__}")
    label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
    if is_dtensor(weight) or is_dtensor(hidden):  # a ColwiseParallel lm_head: the vocabulary-parallel loss
        return dtensor.linear_cross_entropy(
            hidden,
            weight,
            target,
            bias=bias,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
            normalizer=normalizer,
        )
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        check_normalizer(normalizer, reduction)  # a number's value: the schema takes a tensor
        normalizer = normalizer_tensor(normalizer, hidden)
    return torch.ops.smoothce.linear_cross_entropy(
        hidden,
        weight,
        target,
        bias=bias,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
    )


# ---------------------------------------------------------------------------------------
# The chunked computation (device kernels of the internal ops)
# ---------------------------------------------------------------------------------------

_FP32_OUT: dict[tuple[str, str], bool] = {}  # (device type, "mm"/"addmm") -> out_dtype=float32 works


def _fp32_out_supported(device: torch.device, op: str) -> bool:
    """Whether ``torch.mm``/``torch.addmm`` take half inputs to an fp32 result in one matmul here.

    ``out_dtype=torch.float32`` (CUDA in recent torch); probed once per device type on 2x2 inputs.
    For "addmm" the fp32 accumulator is also the ``self`` argument, as ``_accumulate_`` uses it.
    """
    key = (device.type, op)
    if key not in _FP32_OUT:
        try:
            acc = torch.ones(2, 2, device=device)
            half = torch.ones(2, 2, dtype=torch.float16, device=device)
            if op == "mm":
                acc = torch.mm(half, half, out_dtype=torch.float32)
            else:
                torch.addmm(acc, half, half, out_dtype=torch.float32, out=acc)
            _FP32_OUT[key] = acc.dtype == torch.float32 and bool((acc == (2 if op == "mm" else 3)).all())
        except (RuntimeError, NotImplementedError, TypeError):
            _FP32_OUT[key] = False
    return _FP32_OUT[key]


def _accumulate_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fused: bool) -> None:
    """acc += a @ b, with acc possibly fp32 and a, b half: in one matmul where the device can."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif fused:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # chunk-sized upcasts (CPU, XPU)


@torch.no_grad()
def _run_chunks(
    hidden,
    weight,
    bias,
    target,
    label_smoothing,
    ignore_index,
    *,
    scale,
    post_scale,
    row_scale,
    chunk_bytes,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
    keep_rows,
):
    """The chunk loop shared by the forward ("mean"/"sum"/"none") and the "none" backward.

    scale: 0-d tensor multiplying each chunk's gradient inside the backend.
    post_scale: 0-d tensor or None, applied to d hidden, d weight, d bias after the matmuls
        (float16 "mean", where it would underflow inside the chunk's gradient).
    row_scale: (N,) per-row factor applied to each chunk's gradient rows, or None.
    keep_rows: return the (N,) per-row losses rather than their sum.
    Returns (loss rows or sum, d_hidden, d_weight, d_bias); None for gradients not asked for.
    """
    n_rows, dim = hidden.shape
    num_classes = weight.shape[0]
    dtype = hidden.dtype
    acc_dtype = loss_dtype(dtype)
    device = hidden.device
    backend = registry.select(device)
    compute_grad = grad_hidden or grad_weight or grad_bias
    half = dtype in HALF_DTYPES
    fp32_acc = half and fp32_weight_grad
    fused = fp32_acc and grad_weight and _fp32_out_supported(device, "addmm")
    # float16 "mean": d hidden to fp32, scaled, rounded once, where the device can (else two roundings).
    hidden_fp32 = post_scale is not None and grad_hidden and _fp32_out_supported(device, "mm")
    budget = chunk_bytes
    if fp32_acc and not fused and grad_weight:
        budget = max(1, chunk_bytes * dtype.itemsize // (dtype.itemsize + 4))  # room for the fp32 upcast
    rows_per_chunk = chunk_rows(n_rows, num_classes, dim, dtype, budget)

    d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else None
    d_weight = None
    if grad_weight:
        d_weight = torch.zeros(weight.shape, dtype=torch.float32 if fp32_acc else dtype, device=device)
    d_bias = torch.zeros(num_classes, dtype=acc_dtype, device=device) if grad_bias else None  # V floats: always fp32
    losses = torch.empty(n_rows, dtype=acc_dtype, device=device) if keep_rows else None
    total = torch.zeros((), dtype=acc_dtype, device=device)
    if n_rows == 0:
        return (
            (losses if keep_rows else total),
            d_hidden,
            _finish(d_weight, dtype, post_scale),
            _finish(d_bias, dtype, post_scale),
        )

    target = target.contiguous()
    weight_t = weight.t()
    buffer = torch.empty((rows_per_chunk, num_classes), dtype=dtype, device=device)
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_rows)
        h = hidden[start:stop]
        z = buffer[: stop - start]
        if bias is None:
            torch.mm(h, weight_t, out=z)
        else:
            torch.addmm(bias, h, weight_t, out=z)
        # The backend writes the chunk's gradient over its logits (in place).
        rows = backend.forward(z, target[start:stop], label_smoothing, ignore_index, z if compute_grad else None, scale)
        if keep_rows:
            losses[start:stop] = rows
        else:
            total += rows.sum()
        if not compute_grad:
            continue
        if row_scale is not None:
            z.mul_(row_scale[start:stop, None])
        if grad_hidden:
            if hidden_fp32:
                d_hidden[start:stop] = torch.mm(z, weight, out_dtype=torch.float32).mul_(post_scale)
            else:
                torch.mm(z, weight, out=d_hidden[start:stop])
                if post_scale is not None:
                    d_hidden[start:stop].mul_(post_scale)
        if grad_weight:
            _accumulate_(d_weight, z.t(), h, fused)
        if grad_bias:
            d_bias += torch.sum(z, 0, dtype=d_bias.dtype)
    return (
        (losses if keep_rows else total),
        d_hidden,
        _finish(d_weight, dtype, post_scale),
        _finish(d_bias, dtype, post_scale),
    )


def _finish(accumulated, dtype, post_scale):
    # The one rounding of an accumulated gradient to the parameters' dtype (after post_scale).
    if accumulated is None:
        return None
    if post_scale is not None:
        accumulated = accumulated * post_scale
    return accumulated if accumulated.dtype == dtype else accumulated.to(dtype)


def _scales(target, ignore_index, reduction, dtype, device, normalizer):
    """(scale in the backend, post_scale after the matmuls, denominator of "mean" or None).

    float16 takes the 1/denominator of "mean" after the matmuls, in fp32 (in the chunk's gradient it
    would push small values below float16's normal range); the other dtypes inside the backend.
    """
    acc_dtype = loss_dtype(dtype)
    one = torch.ones((), dtype=acc_dtype, device=device)
    if reduction != "mean":
        return one, None, None
    denominator = loss_denominator(reduction, normalizer, target, ignore_index, acc_dtype)
    inverse = kept_factors(denominator, acc_dtype)[0]  # 1 / denominator, folded (0 for an empty normalizer)
    if dtype == torch.float16:
        return one, inverse, denominator
    return inverse, None, denominator


def _forward(
    hidden,
    weight,
    bias,
    target,
    label_smoothing,
    ignore_index,
    reduction,
    chunk_bytes,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
    normalizer=None,
):
    """Loss of 2-D ``hidden`` (N, D) through ``weight`` (V, D) against ``target`` (N,), and its kept gradients.

    loss: (N,) for "none", 0-d for "sum"/"mean"; float32 (float64 for float64).
    d_hidden (N, D), d_weight (V, D), d_bias (V,): for "mean"/"sum" and where asked for, in the
    inputs' dtype with the 1/denominator of "mean" folded in; an empty tensor otherwise ("none"
    computes them in backward).
    """
    keep = reduction != "none"
    scale, post_scale, denominator = _scales(target, ignore_index, reduction, hidden.dtype, hidden.device, normalizer)
    loss, d_hidden, d_weight, d_bias = _run_chunks(
        hidden,
        weight,
        bias,
        target,
        label_smoothing,
        ignore_index,
        scale=scale,
        post_scale=post_scale,
        row_scale=None,
        chunk_bytes=chunk_bytes,
        fp32_weight_grad=fp32_weight_grad,
        grad_hidden=keep and grad_hidden,
        grad_weight=keep and grad_weight,
        grad_bias=keep and grad_bias and bias is not None,
        keep_rows=not keep,
    )
    if denominator is not None:  # "mean": the sum over the chunks divided (a 0-d total sums to itself)
        loss = reduce_rows(loss, denominator, reduction)
    return loss, *(hidden.new_empty(0) if g is None else g for g in (d_hidden, d_weight, d_bias))


def _forward_fake(
    hidden,
    weight,
    bias,
    target,
    label_smoothing,
    ignore_index,
    reduction,
    chunk_bytes,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
    normalizer=None,
):
    torch._check(hidden.dim() == 2, lambda: f"linear_cross_entropy_fwd expects 2-D hidden, got {hidden.dim()}-D")
    torch._check(target.dim() == 1, lambda: f"linear_cross_entropy_fwd expects 1-D target, got {target.dim()}-D")
    torch._check(target.shape[0] == hidden.shape[0], lambda: "target and hidden disagree on the rows")
    keep = reduction != "none"
    loss = hidden.new_empty(() if keep else hidden.shape[:1], dtype=loss_dtype(hidden.dtype))
    return loss, *fake_grads(hidden, weight, bias, keep and grad_hidden, keep and grad_weight, keep and grad_bias)


def fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
    # d hidden, d weight, d bias as the kernels make them: dense, or empty where not asked for.
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight else hidden.new_empty(0),
        torch.empty_like(bias) if grad_bias and bias is not None else hidden.new_empty(0),
    )


linear_cross_entropy_fwd = define(
    "linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, float label_smoothing, "
    "int ignore_index, str reduction, int chunk_bytes, bool fp32_weight_grad, bool grad_hidden, "
    "bool grad_weight, bool grad_bias, Tensor? normalizer=None) -> (Tensor, Tensor, Tensor, Tensor)",
    kernel=_forward,
    fake=_forward_fake,
)


def _backward_none(
    grad_loss,
    hidden,
    weight,
    bias,
    target,
    label_smoothing,
    ignore_index,
    chunk_bytes,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    """Backward of "none": recompute each chunk's gradient, scale its rows by dO (N,), then the matmuls.

    Returns (d_hidden, d_weight, d_bias), an empty tensor for each not asked for.
    """
    one = torch.ones((), dtype=loss_dtype(hidden.dtype), device=hidden.device)
    _, d_hidden, d_weight, d_bias = _run_chunks(
        hidden,
        weight,
        bias,
        target,
        label_smoothing,
        ignore_index,
        scale=one,
        post_scale=None,
        row_scale=grad_loss.to(loss_dtype(hidden.dtype)),
        chunk_bytes=chunk_bytes,
        fp32_weight_grad=fp32_weight_grad,
        grad_hidden=grad_hidden,
        grad_weight=grad_weight,
        grad_bias=grad_bias and bias is not None,
        keep_rows=False,
    )
    return tuple(hidden.new_empty(0) if g is None else g for g in (d_hidden, d_weight, d_bias))


def _backward_none_fake(
    grad_loss,
    hidden,
    weight,
    bias,
    target,
    label_smoothing,
    ignore_index,
    chunk_bytes,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    torch._check(grad_loss.shape[0] == hidden.shape[0], lambda: "grad_loss and hidden disagree on the rows")
    return fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


linear_cross_entropy_bwd = define(
    "linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
    "float label_smoothing, int ignore_index, int chunk_bytes, bool fp32_weight_grad, bool grad_hidden, "
    "bool grad_weight, bool grad_bias) -> (Tensor, Tensor, Tensor)",
    kernel=_backward_none,
    fake=_backward_none_fake,
)


def _recompute(inputs, grad_loss, wanted):
    # "none": the per-row dO reaches the chunks' gradients before the matmuls, so they are made again.
    hidden, weight, bias, target, label_smoothing, ignore_index, _, chunk_bytes, fp32, *_ = inputs
    grads = linear_cross_entropy_bwd(
        grad_loss.reshape(-1),
        hidden,
        weight,
        bias,
        target,
        label_smoothing,
        ignore_index,
        chunk_bytes,
        fp32,
        wanted[0],
        wanted[1],
        wanted[2] and bias is not None,
    )
    return tuple(g if w else None for g, w in zip(grads, wanted, strict=True))


register_kept_gradient_autograd(
    linear_cross_entropy_fwd,
    "smoothce.linear_cross_entropy",
    reduction_arg=6,
    compute_grad_arg=(9, 10, 11),
    grad_inputs=(0, 1, 2),
    recompute=_recompute,
)

linear_cross_entropy_op = define(
    "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor target, *, Tensor? bias=None, "
    'float label_smoothing=0.0, int ignore_index=-100, str reduction="mean", Tensor? normalizer=None) -> Tensor',
    composite=_linear_cross_entropy,
)
