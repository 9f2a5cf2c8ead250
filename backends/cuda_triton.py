"""The "cuda-triton" backend: the Triton kernels on CUDA and ROCm GPUs (ROCm's torch calls them "cuda").

Only what is NVIDIA-specific lives here: the launch table, the load hints, the core count that
bounds the split kernel, and the device check. Under ``TRITON_INTERPRET=1`` it also serves CPU
tensors in Triton's interpreter, which is how the tests check the kernels without a GPU.
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
    # The launch table (see TritonBackend.LAUNCH_TABLE). Rows that fit one program take it whole;
    # longer rows take the loop kernel, as benchmarks/tune_cuda.py chose on an H200
    # (benchmarks/results/h200/tuning.md). The loop kernel's blocks, 4 KiB of logits and 8 warps
    # (8 bfloat16 or 4 float32 values per thread, 48 registers: four programs per SM), follow from
    # its register count and await a measurement of the rewritten kernel.
    LAUNCH_TABLE: ClassVar[dict[int, tuple[tuple[int, str, int, int], ...]]] = {
        2: ((8192, "split", 0, 0), (2**31, "loop", 2048, 8)),
        4: ((4096, "split", 0, 0), (2**31, "loop", 1024, 8)),
        8: ((2048, "split", 0, 0), (2**31, "loop", 512, 8)),
    }
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
