"""The "cuda-triton" backend: smoothce's Triton kernel on CUDA (and ROCm) GPUs.

Only what is NVIDIA-specific lives here: the launch configuration and the device
check. The kernel and its launcher are shared with the XPU backend
(``triton_kernels``, ``triton_backend``). Under ``SMOOTHCE_BACKEND=cuda-triton
TRITON_INTERPRET=1`` the same kernel runs on CPU tensors in Triton's interpreter,
which is how the tests check it without a GPU. ROCm builds of torch expose their
GPUs as "cuda" devices, so this backend serves them too.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from smoothce.backends.triton_backend import TritonBackend


class CudaTritonBackend(TritonBackend):
    """The Triton kernel on CUDA/ROCm tensors (and CPU tensors under TRITON_INTERPRET=1)."""

    name = "cuda-triton"
    device_type = "cuda"
    # Columns per loop step by element size: 16 KiB of 16-bit logits or fp32, 16 values
    # per thread at 512 values per warp, which stays in registers without spills.
    MAX_BLOCK_V: ClassVar[dict[int, int]] = {2: 8192, 4: 4096, 8: 2048}
    VALUES_PER_WARP = 512
    MAX_NUM_WARPS = 16

    def device_unavailable_reason(self) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        return None
