"""The "cpu" backend: vectorized torch code, fused per block of rows so the block stays in cache.

Each block of rows (a few MiB of logits) is read from memory once; the work on it
runs in fp32 (fp64 for fp64 logits) while it is in cache: one fused softmax (one exp
per element), a sum for the smoothing term, and one pass that writes the gradient,
rounding each element to the logits' dtype once. For contiguous fp32/fp64 gradients
the softmax is written straight into the gradient buffer and finished there in place;
otherwise one block-sized scratch buffer (reused for every block, never a full-size
copy) holds it. Torch's intra-op threads split each block's rows over the cores, so a
block has at least one row per thread.
"""

from __future__ import annotations

import torch

from smoothce.backends.base import Backend, check_targets_on_host, loss_dtype

# Elements per block: 512K fp32 is 2 MiB of scratch, which stays in the L2/L3 caches and
# keeps the per-block Python overhead (a dozen op calls) small against the work.
BLOCK_ELEMENTS = 1 << 19
# Below this p_k the row's loss is recomputed from logsumexp instead of -log p_k.
_TINY = 1e-30


def _softmax_(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # ATen's fused last-dim softmax (max, exp and sum, scale), written into `out`, which may
    # be `logits` itself. (Only contiguous `out`: torch 2.13 writes wrong values into a strided one.)
    return torch.ops.aten._softmax.out(logits, 1, False, out=out)


def _forward_block(logits, target, lam, ignore_index, grad, scale, scratch):
    """Per-row loss of one block, writing the gradient into ``grad`` when it is given.

    With p = softmax(z) computed relative to the row max, and mean(z) = s/V:
        loss   = r - (1 - lam) z_k - (lam / V) s = -log p_k + lam (z_k - mean(z))
        grad_j = scale * (p_j - lam / V),  grad_k = scale * ((p_k - 1) + lam (1 - 1/V))
    -log p_k avoids cancelling r against z_k for large logits; where p_k underflows
    (z_k far below the max) the row falls back to (m - z_k) + log sum exp(z - m).
    """
    num_classes = logits.shape[1]
    acc_dtype = scratch.dtype
    valid = target != ignore_index
    k = torch.where(valid, target, 0).to(torch.int64).unsqueeze(1)
    z_k = logits.gather(1, k).squeeze(1).to(acc_dtype)
    mean_z = logits.sum(1, dtype=acc_dtype) / num_classes if lam != 0.0 else None
    if grad is not None and grad.dtype == acc_dtype and grad.is_contiguous():
        p = _softmax_(grad, logits)  # fp32/fp64: finished in place in the gradient buffer
    elif logits.dtype == acc_dtype:
        p = _softmax_(scratch, logits)
    else:
        p = _softmax_(scratch, scratch.copy_(logits))  # half inputs: upcast once, in place
    p_k = p.gather(1, k).squeeze(1)
    loss = -p_k.log()
    if lam != 0.0:
        loss += lam * (z_k - mean_z)
    tiny = valid & (p_k < _TINY)
    if bool(tiny.any()):
        rows = logits[tiny].to(acc_dtype)
        m = rows.amax(1, keepdim=True)
        fallback = (m.squeeze(1) - z_k[tiny]) + (rows - m).exp().sum(1).log()
        if lam != 0.0:
            fallback += lam * (z_k[tiny] - mean_z[tiny])
        loss[tiny] = fallback
    loss = torch.where(valid, loss, 0.0)
    if grad is None:
        return loss
    # In fp32/fp64, in place: p <- scale * p - scale * lam / V; the target column and the
    # ignored rows are then set, and the block is rounded to the gradient's dtype once.
    if scale != 1.0 or lam != 0.0:
        torch.add(torch.tensor(-scale * lam / num_classes, dtype=acc_dtype), p, alpha=scale, out=p)
    p.scatter_(1, k, (scale * ((p_k - 1.0) + lam * (1.0 - 1.0 / num_classes))).unsqueeze(1))
    ignored = (~valid).nonzero().squeeze(1)
    if ignored.numel():
        p.index_fill_(0, ignored, 0.0)
    if p.data_ptr() != grad.data_ptr():
        grad.copy_(p)
    return loss


class CpuBackend(Backend):
    """Vectorized torch on CPU tensors; any float dtype, any strides."""

    name = "cpu"
    device_type = "cpu"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS):
        self.block_elements = block_elements

    def forward(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        n_rows, num_classes = logits.shape
        check_targets_on_host(target, num_classes, ignore_index)
        acc_dtype = loss_dtype(logits.dtype)
        logits = logits.detach()
        scale = float(grad_scale)
        rows_per_block = min(n_rows, max(torch.get_num_threads(), self.block_elements // num_classes, 1))
        scratch = torch.empty((rows_per_block, num_classes), dtype=acc_dtype)
        loss = torch.empty(n_rows, dtype=acc_dtype)
        with torch.no_grad():
            for start in range(0, n_rows, rows_per_block):
                stop = min(start + rows_per_block, n_rows)
                loss[start:stop] = _forward_block(
                    logits[start:stop],
                    target[start:stop],
                    label_smoothing,
                    ignore_index,
                    None if grad is None else grad[start:stop],
                    scale,
                    scratch[: stop - start],
                )
        return loss
