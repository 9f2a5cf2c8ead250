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
    # kernel has since been rewritten (per-lane sweep, a third of the instructions per value) and
    # its blocks reasoned, not yet measured: 8 values per thread (4 in float64) keep it at 48-51
    # registers (76), so four programs of 8 warps share an SM (16 values per thread took 88
    # registers, one program of 16 warps per SM). The vocabulary-parallel stats kernel, per-lane
    # too, measured its 2048 bfloat16 columns and 8 warps faster than 8192 and 16 on an H200.
    # BEGIN LAUNCH TABLE
    LAUNCH_TABLE: ClassVar[dict[int, tuple[tuple[int, str, int, int], ...]]] = {
        2: ((8192, "split", 0, 0), (2**31, "loop", 2048, 8)),
        4: ((4096, "split", 0, 0), (2**31, "loop", 2048, 8)),
        8: ((2048, "split", 0, 0), (2**31, "loop", 1024, 8)),
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
