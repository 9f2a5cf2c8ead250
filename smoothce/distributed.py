"""Vocabulary-parallel smoothed cross-entropy: each rank holds a slice of the logits' last dim.

With the output layer split over tensor-parallel ranks, rank i of ``group`` holds
the logits of classes [start_i, start_i + V_i), where start_i = V_0 + ... + V_{i-1}
(shards in group-rank order, sizes may differ) and V = sum_i V_i. The loss is
computed without ever gathering the full (N, V) logits: each rank reduces its
slice to a few numbers per row, and only those travel.

For a row z with target k and smoothing lam, the spec's loss
r - (1 - lam) z_k - (lam / V) sum_j z_j, with r = logsumexp(z) = M + log S, written
relative to the global row max M (M~ = M where finite, else 0) is

    loss = log S + (1 - lam)(M~ - z_k) - (lam / V) sum_j (z_j - M~),   S = sum_j exp(z_j - M~)

where each term is >= 0, so nothing cancels and a large offset shared by the logits costs
no digits. Each rank first reduces its slice (``Backend.shard_stats``, the backend's kernel)
to its max m_i, R_i = sum exp(z_j - m_i) over the slice apart from one max's exact 1,
t_i = sum (z_j - m~_i) and z_k where it holds k. Then, with a_i = [m_i = M] (rank i holds a
global max):

    S = sum_i (1 + R_i) exp(m_i - M~),   so its excess over the max's own 1 is
    e = S - 1 = (sum_i a_i - 1) + sum_i (R_i if a_i else (1 + R_i) exp(m_i - M~))

(an all -inf slice adds 0), summed without ever adding a 1 to the small terms, and log S = log1p(e): rows
whose max dominates (S = 1 + tiny) keep their loss to float32 rounding. The partial loss

    c_i = (1 - lam)(M~ - z_k) [k in slice i] - (lam / V)(t_i + V_i (m~_i - M~)),   loss = log1p(e) + sum_i c_i

and the gradient of the slice (``Backend.shard_grad``, the backend's kernel) is
p_j - lam / V - (1 - lam) [j = k], p_j = exp(z_j - M~) / S. V is the GLOBAL vocabulary
size everywhere (smoothing by the local V_i is the classic bug).

The recipe options (issue 16; ``Backend.forward_recipe`` states their loss for a whole row) fit
the same scheme. Soft-capping is elementwise, so each rank caps its slice first and everything
above is of the capped z'. With class weights w (each rank holds its slice's; W_i their sum,
W = sum_i W_i), the loss relative to M~ is

    loss = ((1 - lam) w_k + (lam / V) W) log S + (1 - lam) w_k (M~ - z'_k)
           + (lam / V) sum_j w_j (M~ - z'_j) + s w_k lse^2,     lse = M~ + log S

so t_i = sum_j w_j (z'_j - m~_i) is weighted, c_i = (1 - lam) w_k (M~ - z'_k) [k in slice i] -
(lam / V)(t_i + W_i (m~_i - M~)), and the only numbers a rank lacks are w_k (held by the rank
that holds k) and W: the third all-reduce packs w_k [k in slice i] as a 4th column and W_i in one
more row, (N + 1, 4). The z-loss and the lse need nothing more (lse = M~ + log1p(e)). The
gradient of the slice uses A = (1 - lam) w_k + (lam / V) W + 2 s w_k lse (``Backend.shard_grad``).

Each call issues exactly three all-reduces (only the first when there are no rows), all O(rows)
or O(1), never O(V):

1. SUM of a (world, 14) int64 table, one row per rank (an all-gather done as an
   all-reduce): shard sizes give every rank its start and V, and the same table
   carries what must agree across ranks (rows, dtype, options, the recipe's options, a
   fingerprint of the targets, their range, which loss is called), so a bad input raises the
   same clear error on every rank instead of hanging in the next collective.
2. MAX of the local row maxima m_i: (N,).
3. SUM of [the excess terms, a_i, c_i] packed as one (N, 3) tensor ((N + 1, 4) with weights).

That is 16 bytes per row for float32/float16/bfloat16 logits (32 for float64; with class weights
20 and 40, plus 16 or 32 bytes for W), plus 112 * world bytes per call. Why not fewer: summing
exp(z) across ranks needs a shift common to all ranks, which is the MAX; the count of ranks
holding the max is what lets the excess leave out exactly one 1; and nothing whose size depends
on the rows may be sent before every rank knows that all ranks agree on the rows, which is the
table. Nothing is read on the host on accelerators (CUDA-graph capturable): there the table is checked on
the device, and a bad input stops every rank at the same device-side assert, whose message
says what disagrees; CPU tensors are read on the host for free, and raise a ValueError or
TypeError naming the values. The local work is three custom ops (``smoothce::vp_offsets``, ``smoothce::vp_stats``,
``smoothce::vp_loss_grad``) with fake functions, whose per-element work runs on the
registry's backend for the logits' device (``registry.select``: the Triton kernels on
GPUs, vectorised torch on CPU); the collectives are
``torch.distributed._functional_collectives``, so the whole function traces under
torch.compile. As in the single-process op, the gradient of the local slice is computed
in the forward pass and kept (float16 scaled by ``smoothce.numerics.kept_factors``, the
one rule); backward multiplies it by dO and the factor the forward returns.

Data parallelism and gradient accumulation: "mean" divides by the non-ignored rows
of this call only, which is wrong when micro-batches hold different numbers of real
tokens. Pass ``normalizer=`` (for example the result of ``count_tokens`` over the
data-parallel group and the accumulation window) to divide the summed loss, and its
gradient, by that number instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

if dist.is_available():  # builds without torch.distributed can still import smoothce
    import torch.distributed._functional_collectives as funcol

from smoothce import registry
from smoothce._autograd import register_kept_gradient_autograd
from smoothce._library import define
from smoothce.backends.base import Recipe
from smoothce.checks import (
    REDUCTIONS,
    bad_target_message,
    check_arguments,
    check_normalizer,
    check_weight,
    normalizer_tensor,
    recipe_values,
)
from smoothce.numerics import kept_factors, loss_denominator, loss_dtype, reduce_rows

__all__ = ["count_tokens", "vocab_parallel_cross_entropy"]

_NAME = "vocab_parallel_cross_entropy"

# Columns of the per-rank table exchanged by the first all-reduce. CALL says which loss runs
# (0: this one; 1, 2: the fused linear loss without / with a gradient for hidden, whose
# backward adds an all-reduce), DIM its hidden size, SEEN the slice sizes a rank remembers
# (smoothce.vocab_parallel_linear; -1 when it has none), RECIPE a fingerprint of the recipe
# options (0 when all are off; ``recipe_code``): each must fit the others' or the collectives
# that follow would not match.
(ERROR, VOCAB, ROWS, DTYPE, LAM, IGNORE, REDUCTION, FINGERPRINT, TMIN, TMAX, CALL, DIM, SEEN, RECIPE) = range(14)
_TABLE_COLUMNS = 14
NO_ERROR, TYPE_ERROR, VALUE_ERROR, NOT_IMPLEMENTED = 0, 1, 2, 3
_ERROR_KINDS = {TYPE_ERROR: TypeError, VALUE_ERROR: ValueError, NOT_IMPLEMENTED: NotImplementedError}
CHECK_ERRORS = tuple(_ERROR_KINDS.values())  # what the argument checks raise, told to every rank


def _error_code(error: Exception | None) -> int:
    # The table's code for an argument check's error (NO_ERROR for None), which every rank re-raises.
    return next((code for code, kind in _ERROR_KINDS.items() if isinstance(error, kind)), NO_ERROR)


_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
_LAM_SCALE = 2**52  # lam in [0, 1] as an exact-enough int64 for the agreement check
_CALL_NAMES = {0: _NAME, 1: "vocab_parallel_linear_cross_entropy", 2: "vocab_parallel_linear_cross_entropy"}
# Columns every rank must agree on, and how the error names each.
_AGREED = (
    (
        ROWS,
        "the number of rows (the leading shape must be the same on every rank; only the vocabulary dimension is split)",
    ),
    (DTYPE, "the logits dtype"),
    (LAM, "label_smoothing"),
    (IGNORE, "ignore_index"),
    (REDUCTION, "reduction"),
    (
        CALL,
        "which loss is called (vocab_parallel_cross_entropy, or the fused linear loss with or "
        "without a gradient for hidden)",
    ),
    (DIM, "the hidden size D"),
    (RECIPE, "the recipe options (whether a class weight is given, z_loss, softcap)"),
)


def _all_reduce(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    # PyTorch's functional collective: traceable by torch.compile; in eager it returns
    # an AsyncCollectiveTensor, which we wait on here.
    out = funcol.all_reduce(tensor, op, group)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out


def resolve_group(group, caller: str):
    """The process group and this process's rank and size in it; RuntimeError if none is set up."""
    if not dist.is_available():
        raise RuntimeError(f"{caller}: this PyTorch build has no torch.distributed support")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{caller}: the default process group is not initialised; call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{caller}: this process (global rank {dist.get_rank()}) is not a member of group")
    return group, rank, dist.get_world_size(group)


# ---------------------------------------------------------------------------------------------
# 1. The table: what each rank holds, and the check that it all fits together.


def _int64_row(values, device) -> torch.Tensor:
    """Python ints as an int64 vector on ``device`` without a host-to-device copy off CPU.

    On CPU ``torch.tensor`` is free; elsewhere it would be a blocking copy (and break CUDA-graph
    capture), so each value is written by a fill, whose value travels as a kernel argument.
    """
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.int64, device=device)
    row = torch.empty(len(values), dtype=torch.int64, device=device)
    for i, value in enumerate(values):
        row[i] = value
    return row


def _local_row(
    *,
    device,
    local_classes,
    n_rows,
    dtype,
    target,
    label_smoothing,
    ignore_index,
    reduction,
    error_code,
    call=0,
    dim=0,
    seen=-1,
    recipe=0,
):
    """This rank's row of the table (int64, on ``device``); see the column names above.

    The target fingerprint is sum_i (i + 1) * (t_i + 1) in wrapping int64 arithmetic: equal
    targets give equal fingerprints, and a differing target almost surely changes it.
    """
    if error_code != NO_ERROR:
        row = torch.zeros(_TABLE_COLUMNS, dtype=torch.int64, device=device)
        row[ERROR] = error_code
        return row
    t = target.reshape(-1).to(torch.int64)
    weights = torch.arange(1, n_rows + 1, dtype=torch.int64, device=device)
    fingerprint = ((t + 1) * weights).sum()
    valid = t != ignore_index
    big = torch.iinfo(torch.int64).max
    # Over non-ignored targets; an empty set gives (max, min), which passes any range check.
    # (amin/amax of an empty tensor would raise: torch.cat with one such value is the same.)
    t_min = torch.cat([torch.where(valid, t, big), t.new_full((1,), big)]).amin()
    t_max = torch.cat([torch.where(valid, t, -big), t.new_full((1,), -big)]).amax()
    fixed = _int64_row(
        [
            NO_ERROR,
            local_classes,
            n_rows,
            _DTYPE_CODES[dtype],
            int(label_smoothing * _LAM_SCALE),
            ignore_index,
            REDUCTIONS.index(reduction),
        ],
        device,
    )
    tail = _int64_row([call, dim, seen, recipe], device)
    return torch.cat([fixed, torch.stack([fingerprint, t_min, t_max]), tail])


def recipe_code(weighted: bool, z_loss: float, softcap: float | None) -> int:
    """The RECIPE column: 0 with every option off, else 1 + [weighted] + 2 x (a fingerprint of z_loss
    and softcap to about 2**-20 of each, below 2**61), in plain arithmetic that torch.compile traces.

    Ranks whose weights differ in presence would all-reduce tensors of different shapes, so that
    bit is exact; z-loss or caps that differ by less than the fingerprint's resolution would go
    unnoticed (a wrong loss, never a hang).
    """
    if not weighted and z_loss == 0.0 and softcap is None:
        return 0
    z_part = int(z_loss * 2**20) % 2**30
    cap_part = 0 if softcap is None else int(softcap * 2**20) % 2**29 + 1
    return 1 + int(weighted) + 2 * (z_part + 2**30 * cap_part)


def _exchange_table(row: torch.Tensor, position: int, world: int, group) -> torch.Tensor:
    """The (world, 14) table: every rank's row at its position, by one SUM all-reduce."""
    table = torch.zeros(world, _TABLE_COLUMNS, dtype=torch.int64, device=row.device)
    table[position] = row
    return _all_reduce(table, "sum", group)


def agreed_table(error: Exception | None, position: int, world: int, group, *, target, **facts) -> torch.Tensor:
    """The exchanged table, with this rank's row made of its argument check's ``error`` (an exception
    or None) or, where the check passed, of its call's ``facts`` (``_local_row``'s keywords); then
    this rank's own error is raised: every rank joins the exchange, so none waits for another."""
    code = _error_code(error)
    row = _local_row(n_rows=target.numel() if error is None else 0, target=target, error_code=code, **facts)
    table = _exchange_table(row, position, world, group)
    if error is not None:
        raise error
    return table


def sizes_fingerprint(sizes) -> int:
    """sum_i (i + 1) * V_i of a list of slice sizes (the SEEN column compares this)."""
    return sum((i + 1) * v for i, v in enumerate(sizes))


def check_table_on_host(table: torch.Tensor, position: int, ignore_index: int) -> tuple[int, int, list[int]]:
    """Check a CPU table; (start of this rank's slice, global V, every rank's V_i).

    Runs identically on every rank (the table is the same everywhere), so every rank raises the
    same ValueError/TypeError when the ranks' inputs do not fit together.
    """
    rows = table.tolist()
    world = len(rows)
    name = _CALL_NAMES.get(rows[0][CALL], _NAME)
    for r, row in enumerate(rows):
        if row[ERROR] != NO_ERROR:
            kind = _ERROR_KINDS.get(row[ERROR], ValueError)
            raise kind(
                f"{name}: rank {r} of {world} rejected its arguments (its own error says which); "
                "no rank computed the loss"
            )
    first = rows[0]
    for column, what in _AGREED:
        values = [row[column] for row in rows]
        if any(v != values[0] for v in values):
            if column == LAM:
                shown = [v / _LAM_SCALE for v in values]
            elif column == DTYPE:
                names = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
                shown = [names[v] for v in values]
            elif column == REDUCTION:
                shown = [REDUCTIONS[v] for v in values]
            else:
                shown = values
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            raise ValueError(f"{name}: the ranks disagree on {what}: {per_rank}")
    if any(row[FINGERPRINT] != first[FINGERPRINT] for row in rows):
        raise ValueError(
            f"{name}: the ranks passed different targets; every rank must pass the same global "
            "target ids (only the logits are split)"
        )
    sizes = [row[VOCAB] for row in rows]
    num_classes = sum(sizes)
    if first[TMIN] < 0:
        raise ValueError(bad_target_message(first[TMIN], num_classes, ignore_index))
    if first[TMAX] >= num_classes:
        raise ValueError(bad_target_message(first[TMAX], num_classes, ignore_index))
    return sum(sizes[:position]), num_classes, sizes


def check_table_on_device(table: torch.Tensor, position: int, ignore_index: int, name: str) -> torch.Tensor:
    """Check the table where it lies, without a host read; [start, global V] as an int64 tensor.

    Every rank holds the same table, so every rank stops at the same ``torch._assert_async``
    (a device-side assert on accelerators: the process's device state is lost, as with any
    out-of-range index, and the next synchronising call raises) before any row-sized collective.
    """
    sizes = table[:, VOCAB]
    num_classes = sizes.sum()
    first = table[0]
    torch._assert_async(
        (table[:, ERROR] == NO_ERROR).all(),
        f"{name}: a rank rejected its arguments (its own error says which); no rank computed the loss",
    )
    for column, what in _AGREED:
        torch._assert_async((table[:, column] == first[column]).all(), f"{name}: the ranks disagree on {what}")
    torch._assert_async(
        (table[:, FINGERPRINT] == first[FINGERPRINT]).all(),
        f"{name}: the ranks passed different targets; every rank must pass the same global target ids",
    )
    torch._assert_async(
        (first[TMIN] >= 0) & (first[TMAX] < num_classes),
        f"{name}: a target value is out of range: expected a class index in [0, V) (V the sum of the "
        f"ranks' slices) or ignore_index={ignore_index}",
    )
    seen = table[:, SEEN]
    weights = torch.arange(1, table.shape[0] + 1, dtype=torch.int64, device=table.device)
    torch._assert_async(
        ((seen < 0) | (seen == (sizes * weights).sum())).all(),
        f"{name}: another rank's vocabulary slice changed size since this rank's first call with its "
        "own slice; call smoothce.vocab_parallel_linear.forget_slice_sizes() on every rank after "
        "re-sharding",
    )
    return torch.stack([sizes[:position].sum(), num_classes])


def _offsets(table: torch.Tensor, rank: int, ignore_index: int) -> torch.Tensor:
    """Check the all-reduced (world, 14) table; return [start of this rank's slice, global V] (int64).

    ``rank``: this rank's position in the table. CPU tables are read on the host (free there) and
    raise a ValueError/TypeError naming the values; elsewhere the check stays on the device.
    """
    if table.device.type != "cpu":
        return check_table_on_device(table, rank, ignore_index, _NAME)
    start, num_classes, _ = check_table_on_host(table, rank, ignore_index)
    return torch.tensor([start, num_classes], dtype=torch.int64)


def _offsets_fake(table, rank, ignore_index):
    # Shape only: the checks need the values, which exist only at run time.
    return table.new_empty(2)


vp_offsets = define(
    "vp_offsets(Tensor table, int rank, int ignore_index) -> Tensor", kernel=_offsets, fake=_offsets_fake
)


# ---------------------------------------------------------------------------------------------
# 2. Local statistics of this rank's slice, and what each rank adds to the global sums.


def unpack_offsets(offsets):
    # (start, V): Python ints on CPU, where reading them is free; 0-d int64 tensors elsewhere (no sync).
    if offsets.device.type == "cpu":
        start, num_classes = offsets.tolist()
        return start, num_classes
    return offsets[0], offsets[1]


def _stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    offsets: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    weight: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Rows (m_i, R_i, t_i, z_k) of this rank's slice (N, V_i): (4, N), float32 (float64 for float64).

    ``Backend.shard_stats`` of the registry's backend for the logits' device, which says
    what each row means (all relative to the slice's own max m_i; of the capped logits with
    ``softcap``, t_i weighted by this slice's ``weight``).
    """
    start, _ = unpack_offsets(offsets)
    backend = registry.select(logits.device)
    lam = float(label_smoothing)
    if weight is None and softcap is None:
        return backend.shard_stats(logits, target, start, lam, ignore_index)
    return backend.shard_stats(logits, target, start, lam, ignore_index, Recipe(weight, 0.0, softcap))


def _stats_fake(logits, target, offsets, label_smoothing, ignore_index, weight=None, softcap=None):
    # A (4, N) tensor in the accumulation dtype.
    torch._check(logits.dim() == 2, lambda: f"vp_stats expects 2-D logits, got {logits.dim()}-D")
    return logits.new_empty(4, logits.shape[0], dtype=loss_dtype(logits.dtype))


vp_stats = define(
    "vp_stats(Tensor logits, Tensor target, Tensor offsets, float label_smoothing, int ignore_index, "
    "Tensor? weight=None, float? softcap=None) -> Tensor",
    kernel=_stats,
    fake=_stats_fake,
)


def contributions(stats, global_max, target, offsets, local_classes, label_smoothing, ignore_index, weight=None):
    """This rank's terms of the global sums (see the module docstring): (N, 3) [excess term, a_i, c_i].

        a_i = [m_i = M],  excess term = R_i if a_i else (1 + R_i) exp(m_i - M~),
        c_i = (1 - lam) w_k (M~ - z_k) [k in slice i] - (lam / V)(t_i + W_i (m~_i - M~))
    With ``weight`` (this slice's (V_i,) class weights; t_i is then weighted, W_i = sum of them,
    w_k = 1 and W_i = V_i without), (N + 1, 4): a 4th column w_k [k in slice i], which the all-reduce
    hands every rank from the one holding k, and a last row [0, 0, 0, W_i], which sums to W.
    Plain torch on (N,) vectors, so torch.compile traces it; lam = 1 and lam = 0 leave out
    the term they zero, which would otherwise be 0 * inf = nan for a -inf logit.
    """
    row_max, remainder, sums, z_k = stats.unbind(0)
    acc = stats.dtype
    lam = float(label_smoothing)
    start, num_classes = unpack_offsets(offsets)
    finite = torch.isfinite(global_max)
    shift = torch.where(finite, global_max, 0.0)
    holds_max = (row_max == global_max) & finite
    scale = torch.exp(row_max - shift)  # 0 for an all -inf slice, 1 where it holds the max
    excess = torch.where(holds_max, remainder, remainder * scale + scale)
    partial = torch.zeros_like(row_max)
    w_k = None
    if lam != 1.0 or weight is not None:
        k = target.to(torch.int64) - start
        owned = (target != ignore_index) & (k >= 0) & (k < local_classes)
    if weight is not None:
        w_k = torch.where(owned, weight[torch.where(owned, k, 0)], 0.0)
    if lam != 1.0:
        term = (1.0 - lam) * (shift - z_k)
        partial = torch.where(owned, term if w_k is None else w_k * term, 0.0)
    if lam != 0.0:
        own_shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
        slice_weight = local_classes if weight is None else weight.sum()
        total = sums + slice_weight * (own_shift - shift)
        vocab = num_classes.to(acc) if isinstance(num_classes, torch.Tensor) else num_classes
        partial = partial - (lam / vocab) * total
    if weight is None:
        return torch.stack([excess, holds_max.to(acc), partial], dim=1)
    rows = torch.stack([excess, holds_max.to(acc), partial, w_k], dim=1)
    last = torch.cat([rows.new_zeros(3), weight.sum().reshape(1)])
    return torch.cat([rows, last.unsqueeze(0)])


def combine(packed: torch.Tensor):
    """(e, sum_i c_i) from the all-reduced (N, 3) terms: e = (ranks holding the max - 1) + the summed terms."""
    return (packed[:, 1] - 1.0) + packed[:, 0], packed[:, 2]


def combine_weighted(packed: torch.Tensor):
    """(e, sum_i c_i, w_k (N,), W (0-d)) from the all-reduced (N + 1, 4) terms of ``contributions``."""
    excess, partial = combine(packed[:-1])
    return excess, partial, packed[:-1, 3], packed[-1, 3]


# ---------------------------------------------------------------------------------------------
# 3. Loss and the kept gradient of this rank's slice, from the global statistics.


def _loss_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    offsets: torch.Tensor,
    row_max: torch.Tensor,
    excess: torch.Tensor,
    partial: torch.Tensor,
    denominator: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    compute_grad: bool,
    weight: torch.Tensor | None = None,
    target_weight: torch.Tensor | None = None,
    total_weight: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (reduced as asked), the kept gradient of this slice and backward's factor.

    With the global M (``row_max``), e = S - 1 (``excess``), sum_i c_i (``partial``) and
    D the ``denominator`` (1 for "none"/"sum"):

        loss_row = log1p(e) + sum_i c_i   (0 on ignored rows);  "sum": sum of rows;
        "mean": sum of rows / D (0 when D <= 0)
        kept = grad_scale x ``Backend.shard_grad``, and backward's factor, with
        grad_scale x factor = 1 / D: ``smoothce.numerics.kept_factors`` (the one rule; float16
        keeps a power-of-two multiple so small entries meet dO before their last rounding)

    With the recipe (``Backend.forward_recipe``'s loss, everything of the capped logits z'; w_k the
    ``target_weight``, W the ``total_weight``, 1 and V without ``weight``; s = ``z_loss``,
    lse = M~ + log1p(e)):

        loss_row = ((1 - lam) w_k + (lam / V) W) log1p(e) + sum_i c_i + s w_k lse^2

    since lse - z'_j = (M~ - z'_j) + log S, and the c_i hold (1 - lam) w_k (M~ - z'_k) and
    (lam / V) sum_j w_j (M~ - z'_j).

    Returns (loss, kept, factor); kept has the logits' dtype, or is empty without ``compute_grad``.
    """
    acc = loss_dtype(logits.dtype)
    valid = target != ignore_index
    lam = float(label_smoothing)
    plain = weight is None and z_loss == 0.0 and softcap is None
    if plain:
        rows = torch.where(valid, torch.log1p(excess) + partial, 0.0)
    else:
        log_sum = torch.log1p(excess)
        if weight is None:
            coeff = 1.0
        else:
            _, num_classes = unpack_offsets(offsets)
            vocab = num_classes.to(acc) if isinstance(num_classes, torch.Tensor) else num_classes
            coeff = (1.0 - lam) * target_weight
            if lam != 0.0:
                coeff = coeff + (lam / vocab) * total_weight
        row = coeff * log_sum + partial
        if z_loss != 0.0:
            row = row + z_loss * (1.0 if target_weight is None else target_weight) * lse.square()
        rows = torch.where(valid, row, 0.0)
    denominator = denominator.to(acc)
    loss = reduce_rows(rows, denominator, reduction)
    grad_scale, factor = kept_factors(denominator, logits.dtype)
    if not compute_grad:
        return loss, logits.new_empty(0), factor
    grad = torch.empty_like(logits)
    start, num_classes = unpack_offsets(offsets)
    backend = registry.select(logits.device)
    args = (logits, target, start, num_classes, row_max, excess, lam, ignore_index, grad_scale, grad)
    if plain:
        backend.shard_grad(*args)
    else:
        backend.shard_grad(*args, Recipe(weight, z_loss, softcap), lse, target_weight, total_weight)
    return loss, grad, factor


def _loss_grad_fake(
    logits,
    target,
    offsets,
    row_max,
    excess,
    partial,
    denominator,
    label_smoothing,
    ignore_index,
    reduction,
    compute_grad,
    weight=None,
    target_weight=None,
    total_weight=None,
    lse=None,
    z_loss=0.0,
    softcap=None,
):
    # Shapes and dtypes only: loss (N,) or 0-d and the 0-d factor in the accumulation dtype; grad like logits.
    acc = loss_dtype(logits.dtype)
    loss = logits.new_empty(logits.shape[0] if reduction == "none" else (), dtype=acc)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad, logits.new_empty((), dtype=acc)


vp_loss_grad = define(
    "vp_loss_grad(Tensor logits, Tensor target, Tensor offsets, Tensor row_max, Tensor excess, Tensor partial, "
    "Tensor denominator, float label_smoothing, int ignore_index, str reduction, bool compute_grad, "
    "Tensor? weight=None, Tensor? target_weight=None, Tensor? total_weight=None, Tensor? lse=None, "
    "float z_loss=0.0, float? softcap=None) -> (Tensor, Tensor, Tensor)",
    kernel=_loss_grad,
    fake=_loss_grad_fake,
)
# The one kept-gradient autograd, shared with smoothce.cross_entropy (in place in eager).
register_kept_gradient_autograd(vp_loss_grad, _NAME, reduction_arg=9, compute_grad_arg=10)


# ---------------------------------------------------------------------------------------------
# The public functions.


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    group=None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    z_loss: float = 0,
    softcap: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed cross-entropy of logits split over the vocabulary across ``group``'s ranks.

    Args:
        logits_shard: (..., V_i), this rank's contiguous slice of the classes; rank i of
            ``group`` holds classes [V_0 + ... + V_{i-1}, ... + V_i). Slices may differ in size
            (each at least 1); the leading shape must be the same on every rank.
        target: (...), the GLOBAL class ids in [0, V) or ``ignore_index``, the same on every rank.
        weight: None, or THIS RANK'S SLICE (V_i,) of the class weights, like its slice of the
            logits (``smoothce.cross_entropy``'s ``weight``: "mean" divides by the sum of w_k).
        group: the tensor-parallel process group (default: the world).
        label_smoothing, ignore_index, reduction: as ``smoothce.cross_entropy``, with the
            global V in lam / V; "mean" over zero non-ignored rows is 0 with zero gradient.
        normalizer: only with reduction="mean": divide the summed loss (and its gradient)
            by this number or one-element tensor instead of by this call's non-ignored rows,
            e.g. ``count_tokens(...)`` over a data-parallel group or an accumulation window.
            0 gives a loss of 0 and a zero gradient. Read on the device, never on the host.
        z_loss, softcap, return_lse: as ``smoothce.cross_entropy`` (the same on every rank).

    Returns:
        The loss, equal on every rank to ``smoothce.cross_entropy`` of the concatenated logits
        (and weights) (float32; float64 for float64 logits); with ``return_lse``, ``(loss, lse)``,
        lse (...) the global log-sum-exp of each row's (capped) logits, ignored rows too, no
        gradient through it. The loss's gradient w.r.t. ``logits_shard`` is this rank's slice of
        the single-process gradient, computed in this forward pass and kept.

    Issues three all-reduces over ``group`` (16 bytes per row for 16/32-bit logits, plus
    112 bytes per rank; ``weight`` adds 4 bytes per row, the target's weight, and one row for the
    sum of the weights), never O(V), and no host sync on accelerators (CUDA-graph capturable).
    Inputs that do not fit together across ranks (row counts, dtypes, options, targets, a
    target outside [0, V)) raise the same ValueError or TypeError on every rank for CPU
    tensors, and stop every rank at the same device-side assert on accelerators; an
    uninitialised process group raises RuntimeError. Only a ``logits_shard`` that is not a
    tensor at all is raised before the exchange, on that rank alone (the others then stop at
    the process group's timeout).
    """
    group, rank, world = resolve_group(group, _NAME)
    return vocab_parallel_loss(
        logits_shard,
        target,
        weight,
        group=group,
        position=rank,
        world=world,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
        z_loss=z_loss,
        softcap=softcap,
        return_lse=return_lse,
    )


def _check_weight_slice(weight, logits_shard) -> None:
    # ``checks.check_weight``, with the shape rule said for a slice.
    if isinstance(weight, torch.Tensor) and (weight.dim() != 1 or weight.shape[0] != logits_shard.shape[-1]):
        raise ValueError(
            f"weight must be this rank's slice of the class weights, shape ({logits_shard.shape[-1]},) like "
            f"the last dimension of its logits_shard {tuple(logits_shard.shape)}, got shape {tuple(weight.shape)}"
        )
    check_weight(weight, logits_shard)


def vocab_parallel_loss(
    logits_shard,
    target,
    weight=None,
    *,
    group,
    position,
    world,
    label_smoothing,
    ignore_index,
    reduction,
    normalizer,
    z_loss=0,
    softcap=None,
    return_lse=False,
):
    """``vocab_parallel_cross_entropy`` with this rank's slice at ``position`` of ``world`` (a mesh coordinate)."""
    if not isinstance(logits_shard, torch.Tensor):
        raise TypeError(f"logits_shard must be a tensor, got {type(logits_shard).__name__}")
    # Argument errors are reported through the table exchange, so that the other ranks
    # raise too instead of waiting forever in a collective this rank never joins.
    error, recipe = None, 0
    try:
        check_arguments(logits_shard, target, label_smoothing, ignore_index, reduction)
        check_normalizer(normalizer, reduction)  # check_arguments also rejects an empty slice
        z_loss, softcap = recipe_values(z_loss, softcap, return_lse)
        _check_weight_slice(weight, logits_shard)
        recipe = recipe_code(weight is not None, z_loss, softcap)
    except CHECK_ERRORS as exc:
        error = exc
    table = agreed_table(
        error,
        position,
        world,
        group,
        target=target,
        device=logits_shard.device,
        local_classes=logits_shard.shape[-1] if logits_shard.dim() else 0,
        dtype=logits_shard.dtype,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        recipe=recipe,
    )
    offsets = vp_offsets(table, position, ignore_index)

    local_classes = logits_shard.shape[-1]
    z = logits_shard.reshape(-1, local_classes)
    t = target.reshape(-1)
    acc = loss_dtype(z.dtype)
    lam = float(label_smoothing)
    if weight is not None:
        weight = weight.to(acc).contiguous()
    stats = vp_stats(z.detach(), t, offsets, lam, ignore_index, weight, softcap)
    global_max = stats[0]
    if z.shape[0] > 0:
        global_max = _all_reduce(global_max, "max", group)
    packed = contributions(stats, global_max, t, offsets, local_classes, lam, ignore_index, weight)
    if z.shape[0] > 0:
        packed = _all_reduce(packed, "sum", group)
    target_weight = total_weight = lse = None
    if weight is None:
        excess, partial = combine(packed)
    else:
        excess, partial, target_weight, total_weight = combine_weighted(packed)
    if z_loss != 0.0 or return_lse:
        lse = torch.where(torch.isfinite(global_max), global_max, 0.0) + torch.log1p(excess)
    normalizer = normalizer_tensor(normalizer, z)
    if weight is not None and reduction == "mean" and normalizer is None:
        normalizer = target_weight.sum()  # PyTorch's weighted mean: the sum of w_k over counted rows
    denominator = loss_denominator(reduction, normalizer, t, ignore_index, acc)
    compute_grad = torch.is_grad_enabled() and logits_shard.requires_grad
    loss, _, _ = vp_loss_grad(
        z,
        t,
        offsets,
        global_max,
        excess,
        partial,
        denominator,
        lam,
        ignore_index,
        reduction,
        compute_grad,
        *(() if recipe == 0 else (weight, target_weight, total_weight, lse, z_loss, softcap)),
    )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if return_lse:
        return loss, lse.reshape(target.shape)
    return loss


def count_tokens(target: torch.Tensor, *, ignore_index: int = -100, group=None) -> torch.Tensor:
    """The number of non-ignored targets in ``target`` summed over ``group``'s ranks: 0-d int64.

    For ``vocab_parallel_cross_entropy(..., normalizer=...)`` (or any per-token loss):
    pass the targets of the whole gradient-accumulation window (all micro-batches) and
    the data-parallel group, so every micro-batch on every rank is divided by the same
    token count. One all-reduce of 8 bytes. ``group=None`` is the world.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32 class indices, got {target.dtype}")
    group, _, _ = resolve_group(group, "count_tokens")
    count = (target != ignore_index).sum().to(torch.int64)
    return _all_reduce(count, "sum", group)
