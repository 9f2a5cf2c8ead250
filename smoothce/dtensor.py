"""DTensor entry points: smoothce's losses on ``torch.distributed.tensor`` inputs (tensor parallelism).

Logits placed ``Shard(-1)`` on a 1-D mesh (``ColwiseParallel(use_local_output=False)``'s output)
take the vocabulary-parallel loss on the mesh's process group, with the global V for smoothing;
an output-layer weight placed ``Shard(0)`` (a ColwiseParallel ``lm_head.weight``) takes the fused
vocabulary-parallel LM-head loss. Replicated inputs take the single-process ops. The result is
a DTensor placed ``Replicate()`` on the same mesh (as with PyTorch's ``loss_parallel``); gradients
come back as DTensors with the inputs' placements.
"""

from __future__ import annotations

import torch

__all__ = ["cross_entropy", "is_dtensor", "linear_cross_entropy"]


def is_dtensor(value) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (False where torch has no DTensor)."""
    if not isinstance(value, torch.Tensor) or type(value) is torch.Tensor:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # builds without torch.distributed
        return False
    return isinstance(value, DTensor)


def _layout(value, what: str, caller: str):
    """("shard", dim) / ("replicate", None) of a DTensor on a 1-D mesh; ValueError for anything else."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = value.device_mesh
    placements = tuple(value.placements)
    if mesh.ndim != 1:
        raise ValueError(
            f"{caller}: {what} is a DTensor on a {mesh.ndim}-D device mesh {tuple(mesh.shape)} with placements "
            f"{placements}; only a 1-D mesh (the tensor-parallel dimension) is supported: pass a 1-D sub-mesh "
            "(mesh['tp'])"
        )
    placement = placements[0]
    if type(placement) is Shard:
        return "shard", placement.dim % value.ndim
    if isinstance(placement, Replicate):
        return "replicate", None
    return "other", placement


def _replicated(tensor: torch.Tensor, mesh):
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(tensor, mesh, [Replicate()], run_check=False)


def _replicated_local(value, what: str, mesh, caller: str, whose: str = "the logits'"):
    # The same tensor on every rank: a plain tensor as it is, or a replicated DTensor's local copy.
    if not is_dtensor(value):
        return value
    kind, _ = _layout(value, what, caller)
    if kind != "replicate" or value.device_mesh != mesh:
        raise ValueError(
            f"{caller}: {what} must be a plain tensor or a DTensor placed Replicate() on {whose} mesh, "
            f"got placements {tuple(value.placements)} on mesh {value.device_mesh}"
        )
    return value.to_local()


def _slice_sizes(num_classes: int, world: int) -> list[int]:
    # DTensor's Shard split (torch.chunk's): ceil(V / world) classes per rank, the last ranks fewer.
    per = -(-num_classes // world)
    return [max(0, min(per, num_classes - i * per)) for i in range(world)]


def _weight_slice(weight, mesh, position: int, sizes: list[int], caller: str):
    """This rank's slice of the class ``weight`` (V,) for logits split into chunks of ``sizes``.

    A DTensor placed ``Shard(0)`` on the logits' mesh gives its local chunk (DTensor's split, the
    logits'); a replicated DTensor or a plain tensor is the full weight, of which the rank takes
    its chunk (a plain tensor of another length is left to the loss's shape check, which names it).
    """
    if weight is None:
        return None
    if is_dtensor(weight):
        kind, dim = _layout(weight, "weight", caller)
        if weight.device_mesh != mesh or (kind, dim) not in (("shard", 0), ("replicate", None)):
            raise ValueError(
                f"{caller}: weight must be a plain tensor, or a DTensor on the logits' mesh placed Shard(0) "
                f"(like the logits' class dimension) or Replicate(), got placements {tuple(weight.placements)}"
            )
        if kind == "shard":
            return weight.to_local()
        weight = weight.to_local()
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != sum(sizes):
        return weight
    start = sum(sizes[:position])
    return weight[start : start + sizes[position]]


def cross_entropy(
    logits,
    target,
    weight=None,
    *,
    label_smoothing=0.0,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    z_loss=0,
    softcap=None,
    return_lse=False,
):
    """``smoothce.cross_entropy`` of a DTensor ``logits`` (..., V): the result is a replicated DTensor.

    ``Shard(logits.ndim - 1)`` on a 1-D mesh: ``smoothce.vocab_parallel_cross_entropy`` of the local
    slices over the mesh's group (rank at mesh coordinate i holds DTensor's i-th chunk of the
    classes); ``logits.grad`` is a DTensor with the same placement. ``Replicate()``: the
    single-process ``smoothce.cross_entropy`` on the local copy. ``target``: a plain tensor or a
    replicated DTensor, the same global class ids on every rank. ``weight`` (V,): a plain tensor, or
    a DTensor placed ``Shard(0)`` (split like the logits' classes) or ``Replicate()``; each rank uses
    its own chunk. Other placements and meshes raise a ValueError naming them. Options as in
    ``smoothce.cross_entropy``; with ``return_lse``, ``(loss, lse)``, both replicated DTensors.
    """
    from smoothce.distributed import vocab_parallel_loss

    caller = "smoothce.cross_entropy"
    kind, detail = _layout(logits, "logits", caller)
    mesh = logits.device_mesh
    target = _replicated_local(target, "target", mesh, caller)
    options = {"label_smoothing": label_smoothing, "ignore_index": ignore_index, "reduction": reduction}
    recipe = {"z_loss": z_loss, "softcap": softcap, "return_lse": return_lse}
    if kind == "shard" and detail == logits.ndim - 1:
        position = mesh.get_local_rank()
        sizes = _slice_sizes(logits.shape[-1], mesh.size())
        loss = vocab_parallel_loss(
            logits.to_local(),
            target,
            _weight_slice(weight, mesh, position, sizes, caller),
            group=mesh.get_group(),
            position=position,
            world=mesh.size(),
            normalizer=normalizer,
            **options,
            **recipe,
        )
    elif kind == "replicate":
        from smoothce.functional import cross_entropy as single

        weight = _replicated_local(weight, "weight (with replicated logits)", mesh, caller)
        if normalizer is not None:
            options["normalizer"] = normalizer
        loss = single(logits.to_local(), target, weight, **options, **recipe)
    else:
        raise ValueError(
            f"{caller}: logits is a DTensor placed {tuple(logits.placements)}; supported are Shard({logits.ndim - 1}) "
            "(the class dimension, as ColwiseParallel(use_local_output=False) makes) and Replicate(); "
            "redistribute it to one of them first"
        )
    if return_lse:
        return _replicated(loss[0], mesh), _replicated(loss[1], mesh)
    return _replicated(loss, mesh)


def linear_cross_entropy(
    hidden, weight, target, *, bias=None, label_smoothing=0.0, ignore_index=-100, reduction="mean", normalizer=None
):
    """``smoothce.linear_cross_entropy`` with a DTensor ``weight`` (V, D): the result is a replicated DTensor.

    ``Shard(0)`` on a 1-D mesh (a ColwiseParallel ``lm_head.weight``; ``bias`` then a ``Shard(0)``
    DTensor or None): ``smoothce.vocab_parallel_linear_cross_entropy`` of the local rows over the
    mesh's group, so no rank holds more than one chunk of its logits; ``weight.grad`` (and
    ``bias.grad``) are DTensors with the same placement, and ``hidden``'s gradient is the full one
    on every rank. ``Replicate()``: the single-process fused loss. ``hidden``: a plain tensor or a
    replicated DTensor, the same on every rank; ``target`` as in ``cross_entropy``.
    """
    from smoothce.vocab_parallel_linear import vocab_parallel_linear_loss

    caller = "smoothce.linear_cross_entropy"
    if not is_dtensor(weight):
        raise ValueError(f"{caller}: weight must be a DTensor here, got {type(weight).__name__}")
    kind, detail = _layout(weight, "weight", caller)
    mesh = weight.device_mesh
    target = _replicated_local(target, "target", mesh, caller, whose="weight's")
    hidden = _replicated_local(hidden, "hidden", mesh, caller, whose="weight's")
    if bias is not None and is_dtensor(bias):
        bias_kind, bias_dim = _layout(bias, "bias", caller)
        if (bias_kind, bias_dim) != (kind, detail) or bias.device_mesh != mesh:
            raise ValueError(
                f"{caller}: bias must be placed like weight ({tuple(weight.placements)}), got {tuple(bias.placements)}"
            )
        bias = bias.to_local()
    elif bias is not None:
        raise ValueError(f"{caller}: bias must be a DTensor placed like weight, got a plain tensor")
    options = {"label_smoothing": label_smoothing, "ignore_index": ignore_index, "reduction": reduction}
    if kind == "shard" and detail == 0:
        loss = vocab_parallel_linear_loss(
            hidden,
            weight.to_local(),
            target,
            group=mesh.get_group(),
            position=mesh.get_local_rank(),
            world=mesh.size(),
            bias=bias,
            normalizer=normalizer,
            slice_sizes=_slice_sizes(weight.shape[0], mesh.size()),
            **options,
        )
    elif kind == "replicate":
        from smoothce.linear import linear_cross_entropy as single

        if normalizer is not None:
            options["normalizer"] = normalizer
        loss = single(hidden, weight.to_local(), target, bias=bias, **options)
    else:
        raise ValueError(
            f"{caller}: weight is a DTensor placed {tuple(weight.placements)}; supported are Shard(0) (the "
            "output rows, as ColwiseParallel places lm_head.weight) and Replicate(); redistribute it first"
        )
    return _replicated(loss, mesh)
