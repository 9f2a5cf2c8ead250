"""The "cpu" backend: vectorized torch code, fused per block of rows so the block stays in cache.

Each block of rows (a few MiB of logits) is read from memory once; the work on it
runs in fp32 (fp64 for fp64 logits) while it is in cache: one fused softmax (one exp
per element), a sum for the smoothing term, and one pass that writes the gradient,
rounding each element to the logits' dtype once. For contiguous fp32/fp64 gradients
the softmax is written straight into the gradient buffer and finished there in place;
otherwise one block-sized scratch buffer (reused for every block, never a full-size
copy) holds it. Per-row work (targets, the loss, the target column) is done once for
all rows, outside the block loop. Torch's intra-op threads split each block's rows
over the cores, so a block has at least one row per thread.
"""

from __future__ import annotations

import torch

from smoothce.backends.base import Backend, check_targets_on_host, loss_dtype

# Elements per block: 1M fp32 is 4 MiB of scratch, which stays in the L2/L3 caches and
# keeps the per-block Python overhead (half a dozen op calls) small against the work.
BLOCK_ELEMENTS = 1 << 20
# Below this p_k the row's loss is recomputed from logsumexp instead of -log p_k.
_TINY = 1e-30


def _softmax_(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    # ATen's fused last-dim softmax (max, exp and sum, scale), written into `out`, which may
    # be `logits` itself. (Only contiguous `out`: torch 2.13 writes wrong values into a strided one.)
    return torch.ops.aten._softmax.out(logits, 1, False, out=out)


class CpuBackend(Backend):
    """Vectorized torch on CPU tensors; any float dtype, any strides."""

    name = "cpu"
    device_type = "cpu"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS):
        self.block_elements = block_elements

    @torch.no_grad()
    def forward(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        """Per-row loss, and the gradient written into ``grad`` when it is given.

        With p = softmax(z) computed relative to the row max, and mean(z) = s/V:
            loss   = r - (1 - lam) z_k - (lam / V) s = -log p_k + lam (z_k - mean(z))
            grad_j = scale * (p_j - lam / V),  grad_k = scale * ((p_k - 1) + lam (1 - 1/V))
        -log p_k avoids cancelling r against z_k for large logits; where p_k underflows
        (z_k far below the max) the row falls back to (m - z_k) + log sum exp(z - m).
        """
        n_rows, num_classes = logits.shape
        check_targets_on_host(target, num_classes, ignore_index)
        lam = label_smoothing
        acc = loss_dtype(logits.dtype)
        logits = logits.detach()
        scale = float(grad_scale)
        valid = target != ignore_index
        k = torch.where(valid, target, 0).to(torch.int64).unsqueeze(1)
        z_k = logits.gather(1, k).squeeze(1).to(acc)
        p_k = torch.empty((n_rows, 1), dtype=acc)
        row_sum = torch.empty(n_rows, dtype=acc) if lam != 0.0 else None

        rows_per_block = min(n_rows, max(torch.get_num_threads(), self.block_elements // num_classes, 1))
        in_place = grad is not None and grad.dtype == acc and grad.is_contiguous()
        needs_scratch = not in_place
        scratch = torch.empty((rows_per_block, num_classes), dtype=acc) if needs_scratch else None
        offset = torch.tensor(-scale * lam / num_classes, dtype=acc)
        affine = scale != 1.0 or lam != 0.0
        for start in range(0, n_rows, rows_per_block):
            stop = min(start + rows_per_block, n_rows)
            x = logits[start:stop]
            if in_place:
                p = grad[start:stop]
            else:
                p = scratch[: stop - start]
                if x.dtype != acc:
                    x = p.copy_(x)  # half inputs: upcast once, then work in place
            if lam != 0.0:
                torch.sum(x, 1, dtype=acc, out=row_sum[start:stop])
            p = _softmax_(p, x)
            torch.gather(p, 1, k[start:stop], out=p_k[start:stop])
            if grad is None:
                continue
            if affine:  # p <- scale * p - scale * lam / V, in fp32/fp64
                torch.add(offset, p, alpha=scale, out=p)
            if not in_place:
                grad[start:stop].copy_(p)  # rounded to the gradient's dtype once

        p_k = p_k.squeeze(1)
        loss = -p_k.log()
        if lam != 0.0:
            loss += lam * (z_k - row_sum / num_classes)
        tiny = valid & (p_k < _TINY)
        if bool(tiny.any()):
            rows = logits[tiny].to(acc)
            m = rows.amax(1, keepdim=True)
            loss[tiny] = (m.squeeze(1) - z_k[tiny]) + (rows - m).exp().sum(1).log()
            if lam != 0.0:
                loss[tiny] += lam * (z_k[tiny] - row_sum[tiny] / num_classes)
        loss = torch.where(valid, loss, 0.0)
        if grad is not None:
            # The target column from fp32 p_k (one rounding), then zero rows for ignored targets.
            target_col = scale * ((p_k - 1.0) + lam * (1.0 - 1.0 / num_classes))
            rows = torch.arange(n_rows)
            grad.index_put_((rows, k.squeeze(1)), target_col.to(grad.dtype))
            ignored = (~valid).nonzero().squeeze(1)
            if ignored.numel():
                grad.index_fill_(0, ignored, 0.0)
        return loss
