"""The "cuda-triton" backend: smoothce's Triton kernels on CUDA (and ROCm) GPUs.

Only what is NVIDIA-specific lives here: the launch table, the load hints, the core count
that bounds the split kernel, and the device check. The kernels and their launchers are
shared with the XPU backend (``triton_kernels``, ``triton_backend``). Under
``SMOOTHCE_BACKEND=cuda-triton TRITON_INTERPRET=1`` the same kernels run on CPU tensors in
Triton's interpreter, which is how the tests check them without a GPU. ROCm builds of torch
expose their GPUs as "cuda" devices, so this backend serves them too.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from smoothce.backends.triton_backend import TritonBackend


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class CudaTritonBackend(TritonBackend):
    """The Triton kernels on CUDA/ROCm tensors (and CPU tensors under TRITON_INTERPRET=1)."""

    name = "cuda-triton"
    device_type = "cuda"
    # The launch table (see TritonBackend.LAUNCH_TABLE). Rows that fit one program take it whole
    # (16 values per thread, one read); longer rows take the loop kernel. The kernel choice is
    # benchmarks/tune_cuda.py's on an NVIDIA H200 (benchmarks/results/h200/tuning.md): at every
    # target shape (V = 32000 to 262144) the loop kernel beat every split configuration tried,
    # by 1.3-1.5x (bf16 8192 x 128256: loop 8192/16 2.38 ms, best split 4096/4 3.36 ms). The loop
    # kernel has since been rewritten (per-lane sweep, a third of the instructions per value): its
    # blocks are now 4 KiB of logits and 8 warps (8 bfloat16 or 4 float32 values per thread, 48
    # registers, so four programs share an SM; 16 values per thread took 88 registers and one
    # program of 16 warps per SM). Not yet measured for it; the vocabulary-parallel stats kernel,
    # per-lane too and launched from this table's last row, took 0.49 ms (bf16) and 0.55 ms (fp32)
    # at 4096 x 128256 on an H200 with these blocks, against 0.76 and 1.1 ms with 8192 / 4096
    # columns and 16 warps.
    # BEGIN LAUNCH TABLE
    LAUNCH_TABLE: ClassVar[dict[int, tuple[tuple[int, str, int, int], ...]]] = {
        2: ((8192, "split", 0, 0), (2**31, "loop", 2048, 8)),
        4: ((4096, "split", 0, 0), (2**31, "loop", 1024, 8)),
        8: ((2048, "split", 0, 0), (2**31, "loop", 512, 8)),
    }
    # END LAUNCH TABLE
    VALUES_PER_WARP = 512
    MAX_NUM_WARPS = 16
    ROW_SPLIT = True  # CUDA starts thread blocks in grid order
    EVICTION = ("evict_last", "evict_first")
    FAST_EXP = torch.version.hip is None  # PTX's ex2.approx.ftz (not on ROCm)

    def device_unavailable_reason(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        return None

    def cores(self, device: torch.device) -> int | None:
        return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
