"""Fused output projection + label-smoothed cross-entropy: the LM head's loss without its (N, V) logits.

``linear_cross_entropy(hidden, weight, target, ...)`` means ``cross_entropy(F.linear(hidden, weight,
bias), target, ...)``, but the logits and their gradient only exist one chunk of rows at a time: the
forward computes each chunk's logits with one matmul, its loss and gradient in place through the
registry's backend, and from them d hidden and the chunk's share of d weight and d bias; backward
only scales those kept gradients ("none" recomputes them, chunk by chunk). With class weights,
z-loss, soft-capping or the log-sum-exp asked for, each chunk goes to the backend's
``forward_recipe`` instead of ``forward``; with none, the path is the plain one.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch

from smoothce import dtensor, registry
from smoothce._autograd import register_kept_gradient_autograd
from smoothce._library import define
from smoothce.backends.base import Recipe, wants_recipe
from smoothce.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    INT32_MAX,
    INT32_MIN,
    check_normalizer,
    check_option_values,
    check_targets,
    check_weight,
    normalizer_tensor,
    option_values,
    recipe_values,
    targets_checked,
)
from smoothce.dtensor import is_dtensor
from smoothce.numerics import kept_factors, loss_denominator, loss_dtype, reduce_rows, weighted_count

HALF_DTYPES = (torch.float16, torch.bfloat16)

# Bytes for one chunk's logits (plus its fp32 row temporaries), by device type. Each chunk's d weight
# matmul has K = the chunk's rows and reads and writes the (V, D) sum once, so small chunks are bound
# by that traffic. CPU: 32 MiB, 224 rows at V = 32000 fp32, enough for its matmuls and 6% of the
# logits at N = 4096. Half logits on CPU: 64 MiB, about 900 rows at V = 32000 (their matmuls are
# faster, the sum's traffic weighs more): at 4096 x 1024 -> 32000 bf16 on the AMX Xeon 761 ms
# against 800 ms at 32 MiB (96 and 128 MiB no faster), with a peak of the fp32 sum (125 MiB) and
# one chunk, under F.linear_cross_entropy's 680 MiB. Accelerators: on an H200 at V = 128256,
# D = 4096 bf16 (960 rows at 256 MiB), 128 MiB chunks took 1.30x the time of 256 MiB ones,
# 512 MiB ones 0.97x.
DEFAULT_CHUNK_BYTES = {"cpu": 32 << 20}
DEFAULT_HALF_CHUNK_BYTES = {"cpu": 64 << 20}
DEFAULT_ACCELERATOR_CHUNK_BYTES = 256 << 20
# Where d weight is summed in fp32 from half chunks without a mixed-dtype matmul (CPU, XPU), each
# chunk's gradient is upcast this many pieces at a time (of its classes), so the copy is small. On
# the AMX Xeon at 4096 x 1024 -> 32000 bf16, 16 pieces took the loss from 881 to 813 ms against 4:
# a piece's fp32 copy and its rows of the sum stay nearer the core.
UPCAST_PIECES = 16


# ---------------------------------------------------------------------------------------
# Settings: chunk budget and d weight accumulation
# ---------------------------------------------------------------------------------------

_settings = threading.local()


@contextlib.contextmanager
def settings(*, chunk_bytes: int | None = None, fp32_weight_grad: bool | None = None):
    """Override how ``linear_cross_entropy`` chunks its work, for calls made inside the block.

    chunk_bytes: memory for one chunk of logits (and its fp32 row temporaries); default
        ``DEFAULT_CHUNK_BYTES`` for CPU tensors (``DEFAULT_HALF_CHUNK_BYTES`` for float16/bfloat16
        ones), ``DEFAULT_ACCELERATOR_CHUNK_BYTES`` otherwise.
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


def chunk_bytes_for(device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """The chunk budget in effect for ``dtype`` tensors on ``device``."""
    chosen = getattr(_settings, "chunk_bytes", None)
    if chosen is not None:
        return chosen
    defaults = DEFAULT_HALF_CHUNK_BYTES if dtype in HALF_DTYPES else DEFAULT_CHUNK_BYTES
    return defaults.get(device.type, DEFAULT_ACCELERATOR_CHUNK_BYTES)


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


def check_class_weight(class_weight, weight) -> None:
    """``checks.check_weight`` for ``class_weight`` (V,) against the LM head ``weight`` (V, D), its
    messages naming ``class_weight`` (``weight`` is the LM head here). Metadata only."""
    if class_weight is None:
        return
    try:
        check_weight(class_weight, weight[:, 0])  # a (V,) view standing for a row of logits
    except (TypeError, ValueError, NotImplementedError) as error:
        raise type(error)(f"class_weight (F.cross_entropy's weight, one per class): {error}") from None


def _linear_cross_entropy(
    hidden,
    weight,
    target,
    *,
    bias=None,
    class_weight=None,
    label_smoothing=0.0,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    # Composite: autograd and torch.compile trace through this into linear_cross_entropy_fwd, or, with any
    # recipe option on, linear_cross_entropy_recipe_fwd.
    label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
    target = check_linear_arguments(hidden, weight, target, bias, label_smoothing, ignore_index, reduction)
    check_normalizer(normalizer, reduction)
    check_class_weight(class_weight, weight)
    z_loss, softcap = recipe_values(z_loss, softcap, return_lse)
    normalizer = normalizer_tensor(normalizer, hidden)
    grad_on = torch.is_grad_enabled()
    arguments = [
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        target.reshape(-1),
        float(label_smoothing),
        ignore_index,
        reduction,
        chunk_bytes_for(hidden.device, hidden.dtype),
        getattr(_settings, "fp32_weight_grad", True),
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
        normalizer,
    ]
    if class_weight is None and z_loss == 0.0 and softcap is None and not return_lse:
        loss = linear_cross_entropy_fwd(*arguments)[0]
        return loss.reshape(target.shape) if reduction == "none" else loss
    if class_weight is not None:
        class_weight = class_weight.to(loss_dtype(hidden.dtype)).contiguous()
    loss, *_, lse = linear_cross_entropy_recipe_fwd(*arguments, class_weight, z_loss, softcap, return_lse)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return (loss, lse.reshape(target.shape)) if return_lse else loss


def _linear_cross_entropy_lse(hidden, weight, target, **options):
    return _linear_cross_entropy(hidden, weight, target, **options, return_lse=True)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    z_loss: float = 0,  # an int: torch.compile would make a float default a symbolic input, then retrace
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed cross-entropy of ``F.linear(hidden, weight, bias)`` without materialising the logits.

    hidden (..., D), weight (V, D) as in nn.Linear (an ``lm_head.weight`` as it is),
    bias (V,) or None, target (...) of int64/int32 class indices; hidden, weight and bias
    share one dtype (float32, bfloat16, float16, float64). Same result as
    ``smoothce.cross_entropy(F.linear(hidden, weight, bias), target, class_weight, ...)``: float32
    (float64 for float64), shape (...) for "none", a scalar otherwise; "mean" over no
    counted target is 0 with zero gradients; ``normalizer`` as in ``smoothce.cross_entropy``.
    Gradients for hidden, weight and bias (whichever require grad) come in their dtypes.

    The recipe options are ``smoothce.cross_entropy``'s, on the logits F.linear(hidden, weight, bias):
    ``class_weight`` (V,) holds the CLASS weights, what ``F.cross_entropy`` and ``smoothce.cross_entropy``
    call ``weight`` (here ``weight`` is the LM head's, as in PyTorch's ``F.linear_cross_entropy``, which
    calls the head ``linear_weight`` and the class weights ``weight``); "mean" then divides by the sum
    of w_k over the counted rows. ``z_loss`` s adds s lse^2 per counted row (times w_k), ``softcap`` c
    takes the loss of c tanh(z / c), and ``return_lse=True`` returns ``(loss, lse)``, the capped
    logits' log-sum-exp per row (shape (...), the loss dtype, no gradient). The math:
    ``smoothce.backends.base.Backend.forward_recipe``. Chunking: see ``smoothce.linear.settings``.
    """
    # What the op's schema would coerce unseen (bool, numpy scalars) or reject with a RuntimeError
    # (a non-tensor); the op checks everything else, once.
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    for name, value in (("bias", bias), ("class_weight", class_weight)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}")
    label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
    z_loss, softcap = recipe_values(z_loss, softcap, return_lse)
    if is_dtensor(weight) or is_dtensor(hidden):  # a ColwiseParallel lm_head: the vocabulary-parallel loss
        if class_weight is not None or z_loss != 0.0 or softcap is not None or return_lse:
            raise NotImplementedError(
                "smoothce.linear_cross_entropy with a DTensor hidden or weight takes no class_weight, z_loss, "
                "softcap or return_lse yet"
            )
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
    options = dict(label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)
    if class_weight is not None or z_loss != 0.0 or softcap is not None:  # else the plain call, as it was
        options.update(class_weight=class_weight, z_loss=z_loss, softcap=softcap)
    op = torch.ops.smoothce.linear_cross_entropy_lse if return_lse else torch.ops.smoothce.linear_cross_entropy
    return op(hidden, weight, target, bias=bias, normalizer=normalizer, **options)


# ---------------------------------------------------------------------------------------
# The chunked computation (device kernels of the internal ops)
# ---------------------------------------------------------------------------------------

_FP32_OUT: dict[tuple[str, str], bool] = {}  # (device type, "mm"/"addmm") -> out_dtype=float32 works


def _fp32_out_supported(device: torch.device, op: str) -> bool:
    """Whether ``torch.mm``/``torch.addmm`` take half inputs to an fp32 result in one matmul here.

    ``out_dtype=torch.float32`` (CUDA in recent torch); probed once per device type on 2x2 inputs.
    For "addmm" the fp32 accumulator is also the ``self`` argument, as ``accumulate_`` uses it.
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


@functools.cache
def _cpu_multiplies_bf16() -> bool:
    # AMX or AVX-512 BF16: oneDNN then runs a "bf16-precision" fp32 matmul on bf16 units.
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


@contextlib.contextmanager
def _bf16_precision_fp32_matmuls():
    matmul = torch.backends.mkldnn.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def accumulate_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fused: bool = False) -> None:
    """acc += a @ b, with acc possibly fp32 and a, b half: in one matmul where the device can.

    Otherwise fp32 copies of b and of a (a's rows in ``UPCAST_PIECES`` pieces). For bf16 on a CPU
    with bf16 units, their fp32 matmul runs at bf16 precision: each product of two bf16 values is
    exact in fp32 and the sums stay fp32, so the result is the fp32 matmul's (up to summation
    order) at about twice its speed.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif fused:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        bf16_units = a.dtype == torch.bfloat16 and a.device.type == "cpu" and _cpu_multiplies_bf16()
        b = b.to(acc.dtype)
        step = max(1, -(-a.shape[0] // UPCAST_PIECES))  # (a slice with no classes: one empty matmul)
        with _bf16_precision_fp32_matmuls() if bf16_units else contextlib.nullcontext():
            for lo in range(0, a.shape[0], step):
                acc[lo : lo + step].addmm_(a[lo : lo + step].to(acc.dtype), b)


def _chunk_budget(chunk_bytes: int, dtype: torch.dtype, fp32_upcast: bool) -> int:
    """The bytes a chunk's logits may take, leaving room for ``accumulate_``'s fp32 upcast where it makes one."""
    if not fp32_upcast:
        return chunk_bytes
    return max(1, chunk_bytes * UPCAST_PIECES * dtype.itemsize // (UPCAST_PIECES * dtype.itemsize + 4))


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
    recipe=None,
    lse=None,
):
    """The chunk loop shared by the forward ("mean"/"sum"/"none") and the "none" backward.

    scale: 0-d tensor multiplying each chunk's gradient inside the backend.
    post_scale: 0-d tensor or None, applied to d hidden, d weight, d bias after the matmuls
        (float16 "mean", where it would underflow inside the chunk's gradient).
    row_scale: (N,) per-row factor applied to each chunk's gradient rows, or None.
    keep_rows: return the (N,) per-row losses rather than their sum.
    recipe: the options beyond label smoothing (``smoothce.backends.base.Recipe``), None for none.
    lse: (N,) buffer of the loss dtype receiving each row's log-sum-exp, or None.
    Each chunk goes to ``backend.forward``, or to ``backend.forward_recipe`` where a recipe or lse is given.
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
    budget = _chunk_budget(chunk_bytes, dtype, fp32_acc and not fused and grad_weight)
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
            finish_accumulated(d_weight, dtype, post_scale),
            finish_accumulated(d_bias, dtype, post_scale),
        )

    target = target.contiguous()
    check_targets(target, num_classes, ignore_index)  # once a call: the chunks' backend calls skip it
    weight_t = weight.t()
    buffer = torch.empty((rows_per_chunk, num_classes), dtype=dtype, device=device)
    with targets_checked():
        for start in range(0, n_rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, n_rows)
            h = hidden[start:stop]
            z = buffer[: stop - start]
            if bias is None:
                torch.mm(h, weight_t, out=z)
            else:
                torch.addmm(bias, h, weight_t, out=z)
            # The backend writes the chunk's gradient over its logits (in place).
            grad = z if compute_grad else None
            if recipe is None and lse is None:
                rows = backend.forward(z, target[start:stop], label_smoothing, ignore_index, grad, scale)
            else:
                chunk_lse = None if lse is None else lse[start:stop]
                rows = backend.forward_recipe(
                    z, target[start:stop], label_smoothing, ignore_index, grad, scale, recipe or Recipe(), chunk_lse
                )
            if keep_rows:
                losses[start:stop] = rows
            else:
                total += rows.sum()
            if not compute_grad:
                continue
            if row_scale is not None:
                # dO per row applied in fp32 to the kept chunk, in place (a half chunk: no fp32 copies on CPU)
                backend.scale_grad(z, row_scale[start:stop], row_scale.new_ones(()), True, True)
            if grad_hidden:
                if hidden_fp32:
                    d_hidden[start:stop] = torch.mm(z, weight, out_dtype=torch.float32).mul_(post_scale)
                else:
                    torch.mm(z, weight, out=d_hidden[start:stop])
                    if post_scale is not None:
                        d_hidden[start:stop].mul_(post_scale)
            if grad_weight:
                accumulate_(d_weight, z.t(), h, fused)
            if grad_bias:
                d_bias += torch.sum(z, 0, dtype=d_bias.dtype)
    return (
        (losses if keep_rows else total),
        d_hidden,
        finish_accumulated(d_weight, dtype, post_scale),
        finish_accumulated(d_bias, dtype, post_scale),
    )


def finish_accumulated(accumulated, dtype, post_scale):
    # The one rounding of an accumulated gradient to the parameters' dtype (after post_scale).
    if accumulated is None:
        return None
    if post_scale is not None:
        accumulated = accumulated * post_scale
    return accumulated if accumulated.dtype == dtype else accumulated.to(dtype)


def _scales(target, ignore_index, reduction, dtype, device, normalizer, class_weight=None):
    """(scale in the backend, post_scale after the matmuls, denominator of "mean" or None).

    The denominator of "mean": ``normalizer`` where given, else the sum of w_k over the counted rows
    with ``class_weight`` (PyTorch's weighted mean), else their count. float16 takes the 1/denominator
    of "mean" after the matmuls, in fp32 (in the chunk's gradient it would push small values below
    float16's normal range); the other dtypes inside the backend.
    """
    acc_dtype = loss_dtype(dtype)
    one = torch.ones((), dtype=acc_dtype, device=device)
    if reduction != "mean":
        return one, None, None
    if class_weight is not None and normalizer is None:
        normalizer = weighted_count(class_weight, target, ignore_index)
    denominator = loss_denominator(reduction, normalizer, target, ignore_index, acc_dtype)
    inverse = kept_factors(denominator, acc_dtype)[0]  # 1 / denominator, folded (0 for an empty normalizer)
    if dtype == torch.float16:
        return one, inverse, denominator
    return inverse, None, denominator


def _recipe(class_weight, z_loss, softcap, return_lse):
    # The chunks' Recipe, None where every option is off and no lse is asked for (the plain path).
    recipe = Recipe(class_weight, z_loss, softcap)
    return recipe if wants_recipe(recipe, return_lse) else None


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
    *,
    recipe=None,
    lse=None,
):
    """Loss of 2-D ``hidden`` (N, D) through ``weight`` (V, D) against ``target`` (N,), and its kept gradients.

    loss: (N,) for "none", 0-d for "sum"/"mean"; float32 (float64 for float64).
    d_hidden (N, D), d_weight (V, D), d_bias (V,): for "mean"/"sum" and where asked for, in the
    inputs' dtype with the 1/denominator of "mean" folded in; an empty tensor otherwise ("none"
    computes them in backward).
    recipe, lse: ``_run_chunks``'s (the recipe op's; the plain op has neither). With class weights,
    "mean" divides by the sum of w_k over the counted rows unless a normalizer is given.
    """
    keep = reduction != "none"
    class_weight = None if recipe is None else recipe.weight
    scale, post_scale, denominator = _scales(
        target, ignore_index, reduction, hidden.dtype, hidden.device, normalizer, class_weight
    )
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
        recipe=recipe,
        lse=lse,
    )
    if denominator is not None:  # "mean": the sum over the chunks divided (a 0-d total sums to itself)
        loss = reduce_rows(loss, denominator, reduction)
    return loss, *(hidden.new_empty(0) if g is None else g for g in (d_hidden, d_weight, d_bias))


def _forward_recipe(
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
    class_weight=None,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    """``_forward`` with the recipe's options, ``class_weight`` (V,) in the loss dtype, ``z_loss`` and
    ``softcap`` (``smoothce.backends.base.Recipe``), and two more outputs: (loss, d_hidden, d_weight,
    d_bias, factor, lse).

    factor: 0-d ones, what backward multiplies dO by (everything is folded in already); it sits where
    the kept gradient's autograd looks for a factor, before the lse.
    lse: (N,) in the loss dtype where ``return_lse``, the (capped) logits' log-sum-exp per row; else empty.
    """
    factor, lse = _recipe_outputs(hidden, return_lse)
    outputs = _forward(
        *(hidden, weight, bias, target, label_smoothing, ignore_index, reduction, chunk_bytes, fp32_weight_grad),
        *(grad_hidden, grad_weight, grad_bias, normalizer),
        recipe=_recipe(class_weight, z_loss, softcap, return_lse),
        lse=lse if return_lse else None,
    )
    return *outputs, factor, lse


def _forward_recipe_fake(
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
    class_weight=None,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    outputs = _forward_fake(
        *(hidden, weight, bias, target, label_smoothing, ignore_index, reduction, chunk_bytes, fp32_weight_grad),
        *(grad_hidden, grad_weight, grad_bias, normalizer),
    )
    return *outputs, *_recipe_outputs(hidden, return_lse)


def _recipe_outputs(hidden, return_lse):
    # The recipe op's factor (ones) and lse buffer ((N,), or empty where not asked for).
    dtype = loss_dtype(hidden.dtype)
    return hidden.new_ones((), dtype=dtype), hidden.new_empty(hidden.shape[0] if return_lse else 0, dtype=dtype)


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


_FWD_ARGUMENTS = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, float label_smoothing, int ignore_index, "
    "str reduction, int chunk_bytes, bool fp32_weight_grad, bool grad_hidden, bool grad_weight, bool grad_bias, "
    "Tensor? normalizer=None"
)
# The options beyond label smoothing, last in the recipe ops' schemas (their defaults: the plain loss).
_RECIPE_ARGUMENTS = "Tensor? class_weight=None, float z_loss=0.0, float? softcap=None"

linear_cross_entropy_fwd = define(
    f"linear_cross_entropy_fwd{_FWD_ARGUMENTS}) -> (Tensor, Tensor, Tensor, Tensor)",
    kernel=_forward,
    fake=_forward_fake,
)
# The same with the recipe's options: its own op, so that the plain one keeps its schema, whose length
# costs every call (torch's autograd for custom ops fills each argument's default in Python).
linear_cross_entropy_recipe_fwd = define(
    f"linear_cross_entropy_recipe_fwd{_FWD_ARGUMENTS}, {_RECIPE_ARGUMENTS}, bool return_lse=False) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    kernel=_forward_recipe,
    fake=_forward_recipe_fake,
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
    class_weight=None,
    z_loss=0.0,
    softcap=None,
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
        recipe=_recipe(class_weight, z_loss, softcap, False),
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
    class_weight=None,
    z_loss=0.0,
    softcap=None,
):
    torch._check(grad_loss.shape[0] == hidden.shape[0], lambda: "grad_loss and hidden disagree on the rows")
    return fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


linear_cross_entropy_bwd = define(
    "linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
    "float label_smoothing, int ignore_index, int chunk_bytes, bool fp32_weight_grad, bool grad_hidden, "
    f"bool grad_weight, bool grad_bias, {_RECIPE_ARGUMENTS}) -> (Tensor, Tensor, Tensor)",
    kernel=_backward_none,
    fake=_backward_none_fake,
)


def _recompute(inputs, grad_loss, wanted):
    # "none": the per-row dO reaches the chunks' gradients before the matmuls, so they are made again.
    hidden, weight, bias, target, label_smoothing, ignore_index, _, chunk_bytes, fp32, *_ = inputs
    recipe = inputs[13:16]  # class_weight, z_loss, softcap: the recipe op's (none for the plain op)
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
        *recipe,
    )
    return tuple(g if w else None for g, w in zip(grads, wanted, strict=True))


for _op in (linear_cross_entropy_fwd, linear_cross_entropy_recipe_fwd):
    register_kept_gradient_autograd(
        _op,
        "smoothce.linear_cross_entropy",
        reduction_arg=6,
        compute_grad_arg=(9, 10, 11),
        grad_inputs=(0, 1, 2),
        recompute=_recompute,
    )

# The public ops; the second also returns the (capped) logits' log-sum-exp per row, (...), no gradient.
_PUBLIC_ARGUMENTS = (
    "(Tensor hidden, Tensor weight, Tensor target, *, Tensor? bias=None, Tensor? class_weight=None, "
    'float label_smoothing=0.0, int ignore_index=-100, str reduction="mean", Tensor? normalizer=None, '
    "float z_loss=0.0, float? softcap=None)"
)
linear_cross_entropy_op = define(f"linear_cross_entropy{_PUBLIC_ARGUMENTS} -> Tensor", composite=_linear_cross_entropy)
linear_cross_entropy_lse_op = define(
    f"linear_cross_entropy_lse{_PUBLIC_ARGUMENTS} -> (Tensor, Tensor)", composite=_linear_cross_entropy_lse
)
