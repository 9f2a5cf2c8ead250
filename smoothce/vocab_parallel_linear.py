"""Vocabulary-parallel fused LM-head loss: a column-parallel output layer and its loss, one chunk of rows at a time.

Rank i of ``group`` holds the rows W_i (V_i, D) and b_i (V_i,) of the output layer, the classes
[start_i, start_i + V_i) as in ``smoothce.distributed``; ``hidden`` (N, D) is the same on every
rank. The loss is ``vocab_parallel_cross_entropy(F.linear(hidden, W_i, b_i), target)``, but for
each chunk of rows h (C, D):

    Z = h W_i^T + b_i                    this rank's logits of the chunk, (C, V_i): one matmul
    (m, R, t, z_k) = shard_stats(Z)      then the two row-sized all-reduces of the plain loss for
                                         these C rows (MAX of m, SUM of [excess term, a_i, c_i]):
                                         16 bytes per row, the same bytes, in chunks
    G = c shard_grad(Z)                  the chunk's gradient, written over Z in place
    dh_i[chunk] = G W_i,   dW_i += G^T h,   db_i += sum_rows G

so one chunk of logits exists at a time and each is computed once (no recompute: three matmuls,
as for the unfused layer). With D the "mean" denominator, c x p = 1 / D by
``numerics.kept_factors`` (c = 1 / D, p = 1; float16: c = 2**e / D in (1/2, 1] and the exact power
of two p = 2**-e applied after the matmuls, so nothing underflows in the chunk). "mean"/"sum" keep
dh_i, dW_i, db_i from the forward: backward multiplies them by dO (nothing at dO = 1 on CPU) and
all-reduces dh (a column-parallel layer's backward: the gradient of hidden is sum_i dh_i). "none"
keeps each row's global max and excess (8 bytes per row) and recomputes the chunks in backward,
with no communication but that all-reduce.

Every chunk is a collective, so all ranks cut the rows alike: the chunk is sized from the largest
slice. CPU tables are read on the host for free; elsewhere the slice sizes are remembered per
(group, own V_i) from the first call (one host read, then none; the DTensor path knows them
beforehand), and the table's _SEEN column checks that every rank remembers the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from smoothce import _autograd, linear, registry
from smoothce.checks import option_values
from smoothce.distributed import (
    _NO_ERROR,
    _TYPE_ERROR,
    _VALUE_ERROR,
    _VOCAB,
    _all_reduce,
    _resolve_group,
    check_normalizer,
    check_table_on_device,
    check_table_on_host,
    combine,
    contributions,
    denominator_for,
    exchange_table,
    local_row,
    reduce_rows,
    sizes_fingerprint,
    unpack_offsets,
)
from smoothce.numerics import kept_factors, loss_dtype

__all__ = ["forget_slice_sizes", "vocab_parallel_linear_cross_entropy"]

_NAME = "vocab_parallel_linear_cross_entropy"

# Chunk budget by device type. CPU: a quarter of the single-process loss's 32 MiB: 120 rows of
# V_i = 16000 fp32, 2.9% of a rank's logits at 4096 rows, so that with the backend's block-sized
# temporaries the loss needs under 10% of them beyond its inputs and gradients.
DEFAULT_CHUNK_BYTES = {"cpu": 8 << 20}

# Process groups by name: the ops' schemas carry the name, the collectives need the group.
_GROUPS: dict[str, object] = {}
# (group name, own V_i) -> every rank's V_i, remembered on accelerators (see the module docstring).
_SLICE_SIZES: dict[tuple[str, int], list[int]] = {}


def _group(name: str):
    # The group registered by the Python entry; under torch.compile that side effect may not have
    # run, and the name is resolved as PyTorch's functional collectives resolve it.
    group = _GROUPS.get(name)
    if group is None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _GROUPS[name] = _resolve_process_group(name)
    return group


def forget_slice_sizes() -> None:
    """Forget the remembered slice sizes (call on every rank after changing how the classes are split)."""
    _SLICE_SIZES.clear()


def _chunk_bytes(device: torch.device) -> int:
    # smoothce.linear.settings(chunk_bytes=...) where set, else this loss's own default.
    chosen = getattr(getattr(linear, "_settings", None), "chunk_bytes", None)
    if chosen is not None:
        return chosen
    return DEFAULT_CHUNK_BYTES.get(device.type, linear.chunk_bytes_for(device))


def _fp32_weight_grad() -> bool:
    return getattr(getattr(linear, "_settings", None), "fp32_weight_grad", True)


# ---------------------------------------------------------------------------------------------
# The chunk loop (device kernels of the two ops below).


def _rows_per_chunk(hidden, weight, sizes, chunk_bytes, fp32_acc, grad_weight):
    # From the largest slice, so every rank cuts the rows alike (each chunk is a collective).
    dtype = hidden.dtype
    budget = chunk_bytes
    if fp32_acc and grad_weight and hidden.device.type == "cpu":
        budget = max(1, chunk_bytes * dtype.itemsize // (dtype.itemsize + 4))  # room for the fp32 upcast
    return linear.chunk_rows(hidden.shape[0], max(sizes), hidden.shape[1], dtype, budget)


def _accumulate_(acc, a, b):
    # acc += a @ b with acc fp32 and a, b possibly half: upcast chunk-sized copies where they differ.
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _finish(acc, dtype, post_scale):
    # The one rounding of an accumulated gradient to the parameters' dtype (after the exact post scale).
    if acc is None:
        return None
    if post_scale is not None:
        acc = acc * post_scale
    return acc if acc.dtype == dtype else acc.to(dtype)


@torch.no_grad()
def _chunks(hidden, weight, bias, target, offsets, group, *, label_smoothing, ignore_index, rows_per_chunk,
            fp32_weight_grad, grad_hidden, grad_weight, grad_bias, scale=None, post_scale=None, stats_rows=None,
            row_scale=None):
    """One pass over the chunks: logits, then either the statistics' all-reduces or the kept ones.

    Forward (``stats_rows`` None): returns (per-row losses, row max M, excess e) and the gradients
    with the chunk's gradient scaled by ``scale``. Backward of "none" (``stats_rows`` = (M, e)):
    no communication, each chunk's gradient rows scaled by ``row_scale`` (dO).
    Gradients: (d_hidden, d_weight, d_bias), None where not asked for.
    """
    n_rows, dim = hidden.shape
    local_classes = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    acc_dtype = loss_dtype(dtype)
    backend = registry.select(device)
    start, num_classes = unpack_offsets(offsets)
    lam = float(label_smoothing)
    compute_grad = grad_hidden or grad_weight or grad_bias
    fp32_acc = dtype in linear.HALF_DTYPES and fp32_weight_grad
    d_hidden = torch.empty((n_rows, dim), dtype=dtype, device=device) if grad_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32 if fp32_acc else dtype, device=device) \
        if grad_weight else None
    d_bias = torch.zeros(local_classes, dtype=acc_dtype, device=device) if grad_bias else None
    forward = stats_rows is None
    if forward:
        losses = torch.empty(n_rows, dtype=acc_dtype, device=device)
        row_max = torch.empty(n_rows, dtype=acc_dtype, device=device)
        excess = torch.empty(n_rows, dtype=acc_dtype, device=device)
    else:
        row_max, excess = stats_rows
        scale = torch.ones((), dtype=acc_dtype, device=device)
    target = target.contiguous()
    weight_t = weight.t()
    buffer = torch.empty((min(rows_per_chunk, n_rows), local_classes), dtype=dtype, device=device)
    for lo in range(0, n_rows, rows_per_chunk):
        hi = min(lo + rows_per_chunk, n_rows)
        h, t, z = hidden[lo:hi], target[lo:hi], buffer[: hi - lo]
        if bias is None:
            torch.mm(h, weight_t, out=z)
        else:
            torch.addmm(bias, h, weight_t, out=z)
        if forward:
            stats = backend.shard_stats(z, t, start, lam, ignore_index)
            m = stats[0].clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            packed = contributions(stats, m, t, offsets, local_classes, lam, ignore_index)
            dist.all_reduce(packed, group=group)
            e, partial = combine(packed)
            losses[lo:hi] = torch.where(t != ignore_index, torch.log1p(e) + partial, 0.0)
            row_max[lo:hi], excess[lo:hi] = m, e
        else:
            m, e = row_max[lo:hi], excess[lo:hi]
        if not compute_grad:
            continue
        backend.shard_grad(z, t, start, num_classes, m, e, lam, ignore_index, scale, z)  # over its own logits
        if row_scale is not None:
            z.mul_(row_scale[lo:hi, None])
        if grad_hidden:
            torch.mm(z, weight, out=d_hidden[lo:hi])
        if grad_weight:
            _accumulate_(d_weight, z.t(), h)
        if grad_bias:
            d_bias += torch.sum(z, 0, dtype=d_bias.dtype)
    if d_hidden is not None and post_scale is not None:
        d_hidden.mul_(post_scale)  # an exact power of two
    grads = (d_hidden, _finish(d_weight, dtype, post_scale), _finish(d_bias, dtype, post_scale))
    return ((losses, row_max, excess) if forward else None), grads


def vp_linear_cross_entropy_fwd(hidden, weight, bias, target, table, denominator, label_smoothing, ignore_index,
                                reduction, group_name, position, chunk_bytes, fp32_weight_grad, grad_hidden,
                                grad_weight, grad_bias):
    """The forward: (loss, d_hidden, d_weight, d_bias, row max, excess, offsets); see the module docstring.

    ``table``: the exchanged (world, 13) table, checked here first. d_hidden is this rank's part
    (backward all-reduces it); gradients are kept for "mean"/"sum" where asked, empty otherwise.
    Row max and excess (N,) are kept for "none" (empty otherwise); offsets = [start, V].
    """
    group = _group(group_name)
    local_classes = weight.shape[0]
    if table.device.type == "cpu":
        start, num_classes, sizes = check_table_on_host(table, position, ignore_index)
        offsets = torch.tensor([start, num_classes], dtype=torch.int64)
    else:
        offsets = check_table_on_device(table, position, ignore_index, _NAME)
        key = (group_name, local_classes)
        sizes = _SLICE_SIZES.get(key)
        if sizes is None:  # this group's first call with this slice: one host read, remembered
            sizes = _SLICE_SIZES[key] = table[:, _VOCAB].tolist()
    keep = reduction != "none"
    acc = loss_dtype(hidden.dtype)
    grad_scale, factor = kept_factors(denominator.to(acc), hidden.dtype)
    post_scale = None
    if hidden.dtype == torch.float16:  # c = 2**e / D in the chunk, the exact 2**-e after the matmuls
        grad_scale, post_scale = grad_scale / 2.0**15, factor * 2.0**15
    fp32_acc = hidden.dtype in linear.HALF_DTYPES and fp32_weight_grad
    rows = _rows_per_chunk(hidden, weight, sizes, chunk_bytes, fp32_acc, keep and grad_weight)
    (losses, row_max, excess), grads = _chunks(
        hidden, weight, bias, target, offsets, group, label_smoothing=label_smoothing, ignore_index=ignore_index,
        rows_per_chunk=rows, fp32_weight_grad=fp32_weight_grad, grad_hidden=keep and grad_hidden,
        grad_weight=keep and grad_weight, grad_bias=keep and grad_bias and bias is not None,
        scale=grad_scale, post_scale=post_scale if keep else None,
    )
    loss = reduce_rows(losses, denominator.to(acc), reduction)
    # (a new empty tensor for each output not computed: outputs must not alias one another)
    kept_rows = (row_max, excess) if not keep else (hidden.new_empty(0, dtype=acc), hidden.new_empty(0, dtype=acc))
    return (loss, *(hidden.new_empty(0) if g is None else g for g in grads), *kept_rows, offsets.to(hidden.device))


def _fake_fwd(hidden, weight, bias, target, table, denominator, label_smoothing, ignore_index, reduction,
              group_name, position, chunk_bytes, fp32_weight_grad, grad_hidden, grad_weight, grad_bias):
    # Shapes and dtypes only, for torch.compile and meta tensors.
    torch._check(hidden.dim() == 2, lambda: f"{_NAME}: expects 2-D hidden, got {hidden.dim()}-D")
    keep = reduction != "none"
    acc = loss_dtype(hidden.dtype)
    n_rows = hidden.shape[0]
    return (
        hidden.new_empty(() if keep else (n_rows,), dtype=acc),
        hidden.new_empty(hidden.shape) if keep and grad_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if keep and grad_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape) if keep and grad_bias and bias is not None else hidden.new_empty(0),
        hidden.new_empty((0,) if keep else (n_rows,), dtype=acc),
        hidden.new_empty((0,) if keep else (n_rows,), dtype=acc),
        table.new_empty(2),
    )


def vp_linear_cross_entropy_bwd(grad_loss, hidden, weight, bias, target, offsets, row_max, excess,
                                label_smoothing, ignore_index, group_name, chunk_bytes, fp32_weight_grad,
                                grad_hidden, grad_weight, grad_bias):
    """Backward of "none": recompute each chunk's gradient, scale its rows by dO (N,), the matmuls,
    then the all-reduce of d hidden. Returns (d_hidden, d_weight, d_bias), empty where not asked for."""
    group = _group(group_name)
    acc = loss_dtype(hidden.dtype)
    sizes = [weight.shape[0]]  # any rows per chunk will do: no collective per chunk here
    fp32_acc = hidden.dtype in linear.HALF_DTYPES and fp32_weight_grad
    rows = _rows_per_chunk(hidden, weight, sizes, chunk_bytes, fp32_acc, grad_weight)
    _, grads = _chunks(
        hidden, weight, bias, target, offsets, group, label_smoothing=label_smoothing, ignore_index=ignore_index,
        rows_per_chunk=rows, fp32_weight_grad=fp32_weight_grad, grad_hidden=grad_hidden, grad_weight=grad_weight,
        grad_bias=grad_bias and bias is not None, stats_rows=(row_max, excess), row_scale=grad_loss.to(acc),
    )
    d_hidden = grads[0]
    if d_hidden is not None:
        dist.all_reduce(d_hidden, group=group)
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


def _fake_bwd(grad_loss, hidden, weight, bias, target, offsets, row_max, excess, label_smoothing, ignore_index,
              group_name, chunk_bytes, fp32_weight_grad, grad_hidden, grad_weight, grad_bias):
    # Shapes and dtypes only, for torch.compile's traced backward.
    return (
        hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if grad_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape) if grad_bias and bias is not None else hidden.new_empty(0),
    )


_lib = torch.library.Library("smoothce", "FRAGMENT")
_lib.define(
    "vp_linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor table, "
    "Tensor denominator, float label_smoothing, int ignore_index, str reduction, str group_name, int position, "
    "int chunk_bytes, bool fp32_weight_grad, bool grad_hidden, bool grad_weight, bool grad_bias) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "vp_linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
    "Tensor offsets, Tensor row_max, Tensor excess, float label_smoothing, int ignore_index, str group_name, "
    "int chunk_bytes, bool fp32_weight_grad, bool grad_hidden, bool grad_weight, bool grad_bias) "
    "-> (Tensor, Tensor, Tensor)"
)
# One kernel for every device type (the matmuls are torch's, the rest asks the registry) and its fake.
_lib.impl("vp_linear_cross_entropy_fwd", vp_linear_cross_entropy_fwd, "CompositeExplicitAutograd")
_lib.impl("vp_linear_cross_entropy_bwd", vp_linear_cross_entropy_bwd, "CompositeExplicitAutograd")
torch.library.register_fake("smoothce::vp_linear_cross_entropy_fwd", _fake_fwd, lib=_lib)
torch.library.register_fake("smoothce::vp_linear_cross_entropy_bwd", _fake_bwd, lib=_lib)


# ---------------------------------------------------------------------------------------------
# Autograd: backward scales the kept gradients by dO and all-reduces d hidden ("none": recomputes).

_OPTIONS = 12  # arguments after hidden, weight, bias: none of them differentiable


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, _table, _denominator, label_smoothing, ignore_index, reduction, group_name,
     _position, chunk_bytes, fp32, gh, gw, gb) = inputs
    _loss, d_hidden, d_weight, d_bias, row_max, excess, offsets = output
    ctx.reduction = reduction
    ctx.group_name = group_name
    ctx.computed = (gh, gw, gb and bias is not None)
    ctx.has_bias = bias is not None
    ctx.inplace = getattr(getattr(_autograd, "_inplace_backward", None), "enabled", True)
    ctx.consumed = False
    ctx.mark_non_differentiable(d_hidden, d_weight, d_bias, row_max, excess, offsets)
    ctx.set_materialize_grads(False)
    if reduction == "none":
        ctx.options = (label_smoothing, ignore_index, chunk_bytes, fp32)
        ctx.save_for_backward(hidden, weight, bias, target, offsets, row_max, excess)
    else:
        ctx.save_for_backward(d_hidden, d_weight, d_bias)


def _traced(*tensors) -> bool:
    return not all(type(t) is torch.Tensor for t in tensors)


def _backward(ctx, grad_loss, *_unused):
    tail = (None,) * (1 + _OPTIONS)
    wanted = tuple(ctx.needs_input_grad[:3])
    if grad_loss is None:
        return (None, None, None, *tail)
    for name, want, have in zip(("hidden", "weight", "bias"), wanted, ctx.computed, strict=True):
        if want and not have:
            raise RuntimeError(
                f"{_NAME}: no gradient for {name} was computed because it did not require grad "
                "(or grad mode was off) in the forward pass"
            )
    if ctx.reduction == "none":
        hidden, weight, bias, target, offsets, row_max, excess = ctx.saved_tensors
        label_smoothing, ignore_index, chunk_bytes, fp32 = ctx.options
        grads = torch.ops.smoothce.vp_linear_cross_entropy_bwd(
            grad_loss.reshape(-1), hidden, weight, bias, target, offsets, row_max, excess, label_smoothing,
            ignore_index, ctx.group_name, chunk_bytes, fp32, wanted[0], wanted[1], wanted[2] and ctx.has_bias,
        )
        return (*(g if w else None for g, w in zip(grads, wanted, strict=True)), *tail)
    if ctx.consumed:
        raise RuntimeError(
            f"{_NAME}: a second backward through the same call (retain_graph=True), but the first one "
            "scaled the kept gradients in place. Run the forward inside "
            "`with smoothce.inplace_backward(False):` to keep them intact for repeated backward passes."
        )
    kept = ctx.saved_tensors
    traced = _traced(*kept, grad_loss)
    if not traced and torch.is_grad_enabled():
        raise RuntimeError(f"{_NAME} does not support double backward (create_graph=True)")
    scale = grad_loss.reshape(1).to(loss_dtype(kept[0].dtype))  # (1,), not 0-d: dO in fp32, rounded once
    unit = not traced and grad_loss.device.type == "cpu" and bool(grad_loss == 1)
    out = []
    for grad, want in zip(kept, wanted, strict=True):
        if not want:
            out.append(None)
        elif traced:
            out.append((grad * scale).to(grad.dtype))
        elif unit:
            out.append(grad)
        elif ctx.inplace:
            out.append(grad.mul_(scale))
        else:
            out.append(torch.mul(grad, scale, out=torch.empty_like(grad)))
    if out[0] is not None:  # the column-parallel layer's backward: d hidden summed over the ranks
        if traced:
            out[0] = _all_reduce(out[0], "sum", ctx.group_name)
        else:
            if out[0] is kept[0] and not ctx.inplace:
                out[0] = out[0].clone()
            dist.all_reduce(out[0], group=_group(ctx.group_name))
    ctx.consumed = ctx.inplace and not traced
    return (*out, *tail)


torch.library.register_autograd("smoothce::vp_linear_cross_entropy_fwd", _backward, setup_context=_setup_context,
                                lib=_lib)


# ---------------------------------------------------------------------------------------------
# The public function.


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group=None,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``vocab_parallel_cross_entropy(F.linear(hidden, weight, bias), target, group=group, ...)``, fused.

    Args:
        hidden: (..., D), the same on every rank of ``group`` (the column-parallel layer's input).
        weight: (V_i, D), this rank's rows of the output layer: rank i of ``group`` holds the classes
            right after rank i - 1's (sizes may differ, each at least 1). bias: (V_i,) or None.
        target: (...), GLOBAL class ids in [0, V) or ``ignore_index``, the same on every rank.
        group, label_smoothing, ignore_index, reduction, normalizer: as ``vocab_parallel_cross_entropy``.

    Returns the loss (float32; float64 for float64), the same on every rank. No rank holds more
    than one chunk of its logits (``smoothce.linear.settings(chunk_bytes=...)`` sizes it). Backward
    gives this rank's weight and bias gradients and the full gradient of ``hidden``, summed over
    the ranks by one all-reduce (every rank must run backward, with the same dO, as for any
    tensor-parallel layer). Bad inputs raise on every rank as in ``vocab_parallel_cross_entropy``.
    """
    group, rank, world = _resolve_group(group, _NAME)
    return vocab_parallel_linear_loss(
        hidden, weight, target, group=group, position=rank, world=world, bias=bias,
        label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
    )


def vocab_parallel_linear_loss(hidden, weight, target, *, group, position, world, bias, label_smoothing,
                               ignore_index, reduction, normalizer, slice_sizes=None):
    """The fused loss with this rank's rows at ``position`` of ``world``; ``slice_sizes`` where known (DTensor)."""
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    error = None
    try:
        target = linear.check_linear_arguments(hidden, weight, target, bias, label_smoothing, ignore_index,
                                               reduction)
        label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
        check_normalizer(normalizer, reduction)
        if not torch.compiler.is_compiling():  # (the op's kernel selects it again at run time)
            registry.select(hidden.device)  # a device without a backend: this rank's clear error, told to all
    except TypeError as exc:
        error, code = exc, _TYPE_ERROR
    except ValueError as exc:
        error, code = exc, _VALUE_ERROR
    else:
        code = _NO_ERROR
    group_name = group.group_name
    _GROUPS[group_name] = group
    grad_on = torch.is_grad_enabled()
    grad_hidden = grad_on and hidden.requires_grad
    device = hidden.device
    seen = -1
    if code == _NO_ERROR and device.type != "cpu":
        if slice_sizes is not None:
            _SLICE_SIZES[(group_name, weight.shape[0])] = list(slice_sizes)
        remembered = _SLICE_SIZES.get((group_name, weight.shape[0]))
        seen = -1 if remembered is None else sizes_fingerprint(remembered)
    row = local_row(
        device=device, local_classes=weight.shape[0] if weight.dim() else 0,
        n_rows=target.numel() if code == _NO_ERROR else 0, dtype=hidden.dtype, target=target,
        label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction, error_code=code,
        call=1 + grad_hidden, dim=hidden.shape[-1] if hidden.dim() else 0, seen=seen,
    )
    table = exchange_table(row, position, world, group)
    if error is not None:
        raise error
    acc = loss_dtype(hidden.dtype)
    flat_target = target.reshape(-1)
    denominator = denominator_for(reduction, normalizer, flat_target, ignore_index, acc, device)
    loss = torch.ops.smoothce.vp_linear_cross_entropy_fwd(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_target, table, denominator, float(label_smoothing),
        ignore_index, reduction, group_name, position, _chunk_bytes(device), _fp32_weight_grad(),
        grad_hidden, grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad,
    )[0]
    return loss.reshape(target.shape) if reduction == "none" else loss
