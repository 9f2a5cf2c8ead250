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
of two p = 2**-e applied after the matmuls, so nothing underflows in the chunk). d hidden is then
all-reduced over the ranks (a column-parallel layer's backward: the gradient of hidden is
sum_i dh_i). "mean"/"sum" keep dh, dW_i, db_i from the forward, and backward only multiplies them
by dO (smoothce's one kept-gradient autograd; nothing at dO = 1 on CPU). "none" makes each chunk
again in backward, collectives included, with each row's gradient scaled by its dO.

Every chunk is a collective, so all ranks cut the rows alike: the chunk is sized from the largest
slice. CPU tables are read on the host for free; elsewhere the slice sizes are remembered per
(group, own V_i) from the first call (one host read, then none; the DTensor path knows them
beforehand), and the table's _SEEN column checks that every rank remembers the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from smoothce import linear, registry
from smoothce._autograd import register_kept_gradient_autograd
from smoothce._library import define
from smoothce.checks import check_normalizer, normalizer_tensor, option_values
from smoothce.distributed import (
    CHECK_ERRORS,
    VOCAB,
    agreed_table,
    check_table_on_device,
    check_table_on_host,
    combine,
    contributions,
    resolve_group,
    sizes_fingerprint,
    unpack_offsets,
)
from smoothce.numerics import kept_factors, loss_denominator, loss_dtype, reduce_rows

__all__ = ["forget_slice_sizes", "vocab_parallel_linear_cross_entropy"]

_NAME = "vocab_parallel_linear_cross_entropy"

# Chunk budget by device type. CPU: 320 rows of V_i = 16000 fp32 (7.8% of a rank's logits at 4096
# rows), so that with the shard functions' block temporaries an fp32 loss needs under 10% of its
# logits beyond its inputs and gradients. Each chunk reads W_i twice, reads and writes d weight,
# and waits on two collectives, so fewer, larger chunks are faster:
# benchmarks/results/cpu/vocab_parallel_linear.
DEFAULT_CHUNK_BYTES = {"cpu": 22 << 20}

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


def _rows_per_chunk(hidden, sizes, chunk_bytes):
    # From the largest slice, so every rank cuts the rows alike (each chunk is a collective). On CPU
    # counted as fp32 rows whatever the dtype: a half chunk and the piece of it that d weight's
    # fp32 sum upcasts at a time (``linear.accumulate_``) fit in one fp32 chunk's bytes.
    dtype = torch.float32 if hidden.device.type == "cpu" else hidden.dtype
    return linear.chunk_rows(hidden.shape[0], max(sizes), hidden.shape[1], dtype, chunk_bytes)


@torch.no_grad()
def _chunks(
    hidden,
    weight,
    bias,
    target,
    offsets,
    group,
    *,
    label_smoothing,
    ignore_index,
    rows_per_chunk,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
    scale,
    post_scale=None,
    row_scale=None,
):
    """The chunk loop: each chunk's logits, their statistics' two all-reduces, loss rows, gradient, matmuls.

    ``scale``: 0-d, multiplies each chunk's gradient (c); ``post_scale``: 0-d or None, the exact power
    of two applied after the matmuls; ``row_scale``: (N,) dO per row ("none"'s backward) or None.
    Returns the (N,) loss rows and (d_hidden, d_weight, d_bias), None where not asked for; d hidden
    is summed over the ranks (the column-parallel layer's all-reduce).
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
    d_weight = (
        torch.zeros(weight.shape, dtype=torch.float32 if fp32_acc else dtype, device=device) if grad_weight else None
    )
    d_bias = torch.zeros(local_classes, dtype=acc_dtype, device=device) if grad_bias else None
    losses = torch.empty(n_rows, dtype=acc_dtype, device=device)
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
        stats = backend.shard_stats(z, t, start, lam, ignore_index)
        row_max = stats[0].clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        packed = contributions(stats, row_max, t, offsets, local_classes, lam, ignore_index)
        dist.all_reduce(packed, group=group)
        excess, partial = combine(packed)
        losses[lo:hi] = torch.where(t != ignore_index, torch.log1p(excess) + partial, 0.0)
        if not compute_grad:
            continue
        backend.shard_grad(z, t, start, num_classes, row_max, excess, lam, ignore_index, scale, z)  # over its logits
        if row_scale is not None:
            # dO per row applied in fp32 to the kept chunk, in place (a half chunk: no fp32 copies on CPU)
            backend.scale_grad(z, row_scale[lo:hi], row_scale.new_ones(()), True, True)
        if grad_hidden:
            torch.mm(z, weight, out=d_hidden[lo:hi])
        if grad_weight:
            linear.accumulate_(d_weight, z.t(), h)
        if grad_bias:
            d_bias += torch.sum(z, 0, dtype=d_bias.dtype)
    buffer = z = None  # freed before d weight is rounded, which holds both of its copies at once
    if d_hidden is not None:
        if post_scale is not None:
            d_hidden.mul_(post_scale)  # an exact power of two
        dist.all_reduce(d_hidden, group=group)
    return losses, (
        d_hidden,
        linear.finish_accumulated(d_weight, dtype, post_scale),
        linear.finish_accumulated(d_bias, dtype, post_scale),
    )


def _plan(hidden, weight, table, position, ignore_index, group_name, chunk_bytes):
    """The table checked, and (offsets [start, V], rows per chunk): the same rows on every rank."""
    local_classes = weight.shape[0]
    if table.device.type == "cpu":
        start, num_classes, sizes = check_table_on_host(table, position, ignore_index)
        offsets = torch.tensor([start, num_classes], dtype=torch.int64)
    else:
        offsets = check_table_on_device(table, position, ignore_index, _NAME)
        key = (group_name, local_classes)
        sizes = _SLICE_SIZES.get(key)
        if sizes is None:  # this group's first call with this slice: one host read, remembered
            sizes = _SLICE_SIZES[key] = table[:, VOCAB].tolist()
    return offsets, _rows_per_chunk(hidden, sizes, chunk_bytes)


def _forward(
    hidden,
    weight,
    bias,
    target,
    table,
    denominator,
    label_smoothing,
    ignore_index,
    reduction,
    group_name,
    position,
    chunk_bytes,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    """(loss, d_hidden, d_weight, d_bias): the loss reduced as asked and, for "mean"/"sum", the kept gradients.

    ``table``: the exchanged (world, 14) table, checked here first. d hidden is already summed over
    the ranks; a gradient not asked for (and every gradient for "none", made in backward) is empty.
    """
    keep = reduction != "none"
    acc = loss_dtype(hidden.dtype)
    offsets, rows = _plan(hidden, weight, table, position, ignore_index, group_name, chunk_bytes)
    denominator = denominator.to(acc)
    grad_scale, factor = kept_factors(denominator, hidden.dtype)
    post_scale = None
    if hidden.dtype == torch.float16 and reduction == "mean":  # c = 2**e / D in the chunk, 2**-e after
        grad_scale, post_scale = grad_scale / 2.0**15, factor * 2.0**15
    losses, grads = _chunks(
        hidden,
        weight,
        bias,
        target,
        offsets,
        _group(group_name),
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        rows_per_chunk=rows,
        fp32_weight_grad=fp32_weight_grad,
        grad_hidden=keep and grad_hidden,
        grad_weight=keep and grad_weight,
        grad_bias=keep and grad_bias and bias is not None,
        scale=grad_scale,
        post_scale=post_scale,
    )
    # (a new empty tensor for each gradient not computed: outputs must not alias one another)
    return reduce_rows(losses, denominator, reduction), *(hidden.new_empty(0) if g is None else g for g in grads)


def _forward_fake(
    hidden,
    weight,
    bias,
    target,
    table,
    denominator,
    label_smoothing,
    ignore_index,
    reduction,
    group_name,
    position,
    chunk_bytes,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    torch._check(hidden.dim() == 2, lambda: f"{_NAME}: expects 2-D hidden, got {hidden.dim()}-D")
    keep = reduction != "none"
    loss = hidden.new_empty(() if keep else (hidden.shape[0],), dtype=loss_dtype(hidden.dtype))
    grads = linear.fake_grads(hidden, weight, bias, keep and grad_hidden, keep and grad_weight, keep and grad_bias)
    return loss, *grads


vp_linear_cross_entropy_fwd = define(
    "vp_linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor table, "
    "Tensor denominator, float label_smoothing, int ignore_index, str reduction, str group_name, int position, "
    "int chunk_bytes, bool fp32_weight_grad, bool grad_hidden, bool grad_weight, bool grad_bias) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    kernel=_forward,
    fake=_forward_fake,
)


def _backward_none(
    grad_loss,
    hidden,
    weight,
    bias,
    target,
    table,
    label_smoothing,
    ignore_index,
    group_name,
    position,
    chunk_bytes,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    """Backward of "none": the chunk loop again (the same collectives), each chunk's gradient rows scaled by
    dO (N,) before the matmuls. Returns (d_hidden summed over the ranks, d_weight, d_bias), empty where not
    asked for."""
    acc = loss_dtype(hidden.dtype)
    offsets, rows = _plan(hidden, weight, table, position, ignore_index, group_name, chunk_bytes)
    _, grads = _chunks(
        hidden,
        weight,
        bias,
        target,
        offsets,
        _group(group_name),
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        rows_per_chunk=rows,
        fp32_weight_grad=fp32_weight_grad,
        grad_hidden=grad_hidden,
        grad_weight=grad_weight,
        grad_bias=grad_bias and bias is not None,
        scale=torch.ones((), dtype=acc, device=hidden.device),
        row_scale=grad_loss.to(acc),
    )
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


def _backward_none_fake(
    grad_loss,
    hidden,
    weight,
    bias,
    target,
    table,
    label_smoothing,
    ignore_index,
    group_name,
    position,
    chunk_bytes,
    fp32_weight_grad,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    torch._check(grad_loss.shape[0] == hidden.shape[0], lambda: "grad_loss and hidden disagree on the rows")
    return linear.fake_grads(hidden, weight, bias, grad_hidden, grad_weight, grad_bias)


vp_linear_cross_entropy_bwd = define(
    "vp_linear_cross_entropy_bwd(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
    "Tensor table, float label_smoothing, int ignore_index, str group_name, int position, int chunk_bytes, "
    "bool fp32_weight_grad, bool grad_hidden, bool grad_weight, bool grad_bias) -> (Tensor, Tensor, Tensor)",
    kernel=_backward_none,
    fake=_backward_none_fake,
)


def _recompute(inputs, grad_loss, wanted):
    # "none": dO per row reaches each chunk's gradient before the matmuls, so the chunks are made again.
    (
        hidden,
        weight,
        bias,
        target,
        table,
        _denominator,
        label_smoothing,
        ignore_index,
        _reduction,
        group_name,
        position,
        chunk_bytes,
        fp32,
        *_,
    ) = inputs
    grads = vp_linear_cross_entropy_bwd(
        grad_loss.reshape(-1),
        hidden,
        weight,
        bias,
        target,
        table,
        label_smoothing,
        ignore_index,
        group_name,
        position,
        chunk_bytes,
        fp32,
        wanted[0],
        wanted[1],
        wanted[2] and bias is not None,
    )
    return tuple(g if w else None for g, w in zip(grads, wanted, strict=True))


# The one kept-gradient autograd: backward scales d hidden (already summed), d weight, d bias by dO.
register_kept_gradient_autograd(
    vp_linear_cross_entropy_fwd,
    f"smoothce.{_NAME}",
    reduction_arg=8,
    compute_grad_arg=(13, 14, 15),
    grad_inputs=(0, 1, 2),
    recompute=_recompute,
)


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
    class_weight: torch.Tensor | None = None,
    z_loss: float = 0,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor:
    """``vocab_parallel_cross_entropy(F.linear(hidden, weight, bias), target, group=group, ...)``, fused.

    Args:
        hidden: (..., D), the same on every rank of ``group`` (the column-parallel layer's input).
        weight: (V_i, D), this rank's rows of the output layer: rank i of ``group`` holds the classes
            right after rank i - 1's (sizes may differ, each at least 1). bias: (V_i,) or None.
        target: (...), GLOBAL class ids in [0, V) or ``ignore_index``, the same on every rank.
        group, label_smoothing, ignore_index, reduction, normalizer: as ``vocab_parallel_cross_entropy``.
        class_weight, z_loss, softcap, return_lse: not supported by the fused vocabulary-parallel loss
            yet; anything but their defaults raises NotImplementedError on every rank (compute the
            logits and call ``vocab_parallel_cross_entropy``, which has them).

    Returns the loss (float32; float64 for float64), the same on every rank. No rank holds more
    than one chunk of its logits (``smoothce.linear.settings(chunk_bytes=...)`` sizes it). Backward
    gives this rank's weight and bias gradients and the full gradient of ``hidden``, summed over
    the ranks by one all-reduce in the forward pass (so backward has no collective but for "none",
    and every rank must pass backward the same dO, as for any replicated loss). Bad inputs raise on
    every rank as in ``vocab_parallel_cross_entropy``.
    """
    group, rank, world = resolve_group(group, _NAME)
    return vocab_parallel_linear_loss(
        hidden,
        weight,
        target,
        group=group,
        position=rank,
        world=world,
        bias=bias,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
        recipe=(class_weight, z_loss, softcap, return_lse),
    )


def _refuse_recipe(class_weight, z_loss, softcap, return_lse) -> None:
    # Issue 16's options are not in the fused loss's chunks yet: a clear error, told to every rank.
    given = [
        name
        for name, is_default in (
            ("class_weight", class_weight is None),
            ("z_loss", type(z_loss) in (int, float) and z_loss == 0),
            ("softcap", softcap is None),
            ("return_lse", return_lse is False),
        )
        if not is_default
    ]
    if given:
        raise NotImplementedError(
            f"{_NAME}: {', '.join(given)} not supported by the fused vocabulary-parallel loss yet; compute "
            "this rank's logits (F.linear(hidden, weight, bias)) and call "
            "smoothce.vocab_parallel_cross_entropy, which takes them"
        )


def vocab_parallel_linear_loss(
    hidden,
    weight,
    target,
    *,
    group,
    position,
    world,
    bias,
    label_smoothing,
    ignore_index,
    reduction,
    normalizer,
    slice_sizes=None,
    recipe=(None, 0, None, False),
):
    """The fused loss with this rank's rows at ``position`` of ``world``; ``slice_sizes`` where known (DTensor).

    ``recipe``: (class_weight, z_loss, softcap, return_lse), refused unless all at their defaults.
    """
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    error = None
    try:
        label_smoothing, ignore_index = option_values(label_smoothing, ignore_index)
        target = linear.check_linear_arguments(hidden, weight, target, bias, label_smoothing, ignore_index, reduction)
        check_normalizer(normalizer, reduction)
        _refuse_recipe(*recipe)
        if not torch.compiler.is_compiling():  # (the op's kernel selects it again at run time)
            registry.select(hidden.device)  # a device without a backend: this rank's clear error, told to all
    except CHECK_ERRORS as exc:
        error = exc
    group_name = group.group_name
    _GROUPS[group_name] = group
    grad_on = torch.is_grad_enabled()
    grad_hidden = grad_on and hidden.requires_grad
    device = hidden.device
    seen = -1
    if error is None and device.type != "cpu":
        if slice_sizes is not None:
            _SLICE_SIZES[(group_name, weight.shape[0])] = list(slice_sizes)
        remembered = _SLICE_SIZES.get((group_name, weight.shape[0]))
        seen = -1 if remembered is None else sizes_fingerprint(remembered)
    table = agreed_table(
        error,
        position,
        world,
        group,
        target=target,
        device=device,
        local_classes=weight.shape[0] if weight.dim() else 0,
        dtype=hidden.dtype,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        call=1 + grad_hidden,
        dim=hidden.shape[-1] if hidden.dim() else 0,
        seen=seen,
    )
    acc = loss_dtype(hidden.dtype)
    flat_target = target.reshape(-1)
    denominator = loss_denominator(reduction, normalizer_tensor(normalizer, hidden), flat_target, ignore_index, acc)
    loss = vp_linear_cross_entropy_fwd(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        flat_target,
        table,
        denominator,
        float(label_smoothing),
        ignore_index,
        reduction,
        group_name,
        position,
        _chunk_bytes(device),
        _fp32_weight_grad(),
        grad_hidden,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )[0]
    return loss.reshape(target.shape) if reduction == "none" else loss
