"""The "cpu" backend: vectorized torch code, fused per block of rows so the block stays in cache.

For each block of rows (a few hundred KiB of logits) it reads the logits once from
memory, computes everything in fp32 (fp64 for fp64 logits) in a block-sized scratch
buffer, does one exp per element and writes the gradient once. Blocks are shared
among threads; torch ops release the GIL, so every core is busy.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from smoothce.backends.base import Backend, check_targets_on_host, loss_dtype

# Elements of one block of rows: 64K fp32 scratch = 256 KiB, well inside a core's L2.
BLOCK_ELEMENTS = 1 << 16


def _forward_block(logits, target, lam, ignore_index, grad, grad_scale, loss_out, acc_dtype):
    """One block of rows; the math of the spec, relative to the row max.

        m = max_j z_j,  e_j = exp(z_j - m),  S = sum_j e_j,  r = m + log S
        loss = r - (1 - lam) z_k - (lam / V) sum_j z_j
        grad_j = scale * (e_j / S - lam / V - (1 - lam) [j = k])
    """
    n, num_classes = logits.shape
    x = logits.to(acc_dtype)  # a block-sized copy for half inputs, a view for fp32/fp64
    valid = target != ignore_index
    k = torch.where(valid, target, 0).to(torch.int64).unsqueeze(1)
    row_max = x.amax(dim=1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    e = torch.empty((n, num_classes), dtype=acc_dtype)
    torch.sub(x, row_max, out=e)
    e.exp_()
    sum_exp = e.sum(dim=1, keepdim=True)
    z_k = x.gather(1, k)
    lse = row_max + sum_exp.log()
    loss = lse - (1.0 - lam) * z_k
    if lam != 0.0:
        loss = loss - (lam / num_classes) * x.sum(dim=1, keepdim=True)
    loss = torch.where(valid.unsqueeze(1), loss, 0.0)
    loss_out.copy_(loss.squeeze(1))
    if grad is None:
        return
    # grad = e * (scale / S) - scale * lam / V, minus scale * (1 - lam) at the target.
    row_scale = torch.where(valid.unsqueeze(1), grad_scale / sum_exp, 0.0)
    e.mul_(row_scale)
    if lam != 0.0:
        e.sub_(torch.where(valid.unsqueeze(1), grad_scale * (lam / num_classes), 0.0))
    e.scatter_add_(1, k, torch.where(valid.unsqueeze(1), -grad_scale * (1.0 - lam), 0.0).to(acc_dtype))
    grad.copy_(e)


class CpuBackend(Backend):
    """Vectorized torch on CPU tensors; any float dtype, any strides."""

    name = "cpu"
    device_type = "cpu"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS, threads: int | None = None):
        self.block_elements = block_elements
        self.threads = threads
        self._pool = None

    def _executor(self):
        if self._pool is None:
            workers = self.threads or torch.get_num_threads() or os.cpu_count() or 1
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="smoothce-cpu")
        return self._pool

    def forward(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        n_rows, num_classes = logits.shape
        check_targets_on_host(target, num_classes, ignore_index)
        acc_dtype = loss_dtype(logits.dtype)
        loss = torch.empty(n_rows, dtype=acc_dtype)
        scale = float(grad_scale)
        rows_per_block = max(1, self.block_elements // max(num_classes, 1))
        starts = range(0, n_rows, rows_per_block)

        def run(start):
            stop = min(start + rows_per_block, n_rows)
            _forward_block(
                logits[start:stop],
                target[start:stop],
                label_smoothing,
                ignore_index,
                None if grad is None else grad[start:stop],
                scale,
                loss[start:stop],
                acc_dtype,
            )

        if len(starts) == 1:
            run(0)
        else:
            list(self._executor().map(run, starts))
        return loss
