"""The "cpu" backend: vectorized torch code, fused per block of rows so the block stays in cache.

Each block of rows (about a MiB of logits) is read from memory once; the work on it
runs in fp32 (fp64 for fp64 logits) in cache: one fused softmax (one exp per
element), a sum, and one pass that writes the gradient, rounding each element to the
logits' dtype once. For fp32/fp64 the softmax is written straight into the gradient
buffer, so no scratch is needed; for half inputs the scratch is one block of fp32,
never a full-size copy. Torch's own intra-op threads split each block's rows over
the cores, so a block always has at least one row per thread.
"""

from __future__ import annotations

import torch

from smoothce.backends.base import Backend, check_targets_on_host, loss_dtype

# Elements per block: 1M fp32 is 4 MiB, which stays in L3 and keeps the per-block
# Python overhead (a dozen op calls) small against the work.
BLOCK_ELEMENTS = 1 << 20
# Below this p_k the row's loss is recomputed from logsumexp instead of -log p_k.
_TINY = 1e-30


def _forward_block(logits, target, lam, ignore_index, grad, scale, acc_dtype):
    """Per-row loss of one block, writing the gradient into ``grad`` when it is given.

    With p = softmax(z) computed relative to the row max (fused in ATen), mean(z) = s/V:
        loss   = r - (1 - lam) z_k - (lam / V) s = -log p_k + lam (z_k - mean(z))
        grad_j = scale * (p_j - lam / V),  grad_k = scale * ((p_k - 1) + lam (1 - 1/V))
    -log p_k avoids cancelling r against z_k for large logits; where p_k underflows
    (z_k far below the max) the row falls back to (m - z_k) + log sum exp(z - m).
    """
    num_classes = logits.shape[1]
    valid = target != ignore_index
    k = torch.where(valid, target, 0).to(torch.int64).unsqueeze(1)
    if grad is not None and grad.dtype == acc_dtype and grad.is_contiguous():
        # fp32/fp64: the softmax goes straight into the gradient buffer. (Only a contiguous
        # one: ATen's _softmax.out writes wrong values into a strided `out`, torch 2.13.)
        p = grad
        torch.ops.aten._softmax.out(logits, 1, False, out=p)
    else:
        p = torch.softmax(logits, 1, dtype=acc_dtype)
    p_k = p.gather(1, k).squeeze(1)
    z_k = logits.gather(1, k).squeeze(1).to(acc_dtype)
    loss = -p_k.log()
    if lam != 0.0:
        mean_z = logits.sum(1, dtype=acc_dtype) / num_classes
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
    # grad = scale * p - scale * lam / V, written (and rounded) once; scalar operands
    # keep the pass vectorized.
    torch.add(torch.tensor(-scale * lam / num_classes, dtype=acc_dtype), p, alpha=scale, out=grad)
    target_col = scale * ((p_k - 1.0) + lam * (1.0 - 1.0 / num_classes))
    grad.scatter_(1, k, target_col.unsqueeze(1).to(grad.dtype))
    ignored = (~valid).nonzero().squeeze(1)
    if ignored.numel():
        grad.index_fill_(0, ignored, 0.0)
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
        rows_per_block = max(torch.get_num_threads(), self.block_elements // num_classes, 1)
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
                    acc_dtype,
                )
        return loss
