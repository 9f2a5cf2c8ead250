"""The "cuda-triton" backend: smoothce's Triton kernel on CUDA (and ROCm) GPUs.

Only what is NVIDIA-specific lives here: the launch configuration and the device
checks. The kernel and its launcher are shared with the XPU backend in
``triton_kernels``, which is imported (and with it Triton) only at the first
launch. Under ``SMOOTHCE_BACKEND=cuda-triton TRITON_INTERPRET=1`` the same kernel
runs on CPU tensors in Triton's interpreter, which is how the tests check it
without a GPU. ROCm builds of torch expose their GPUs as "cuda" devices, so this
backend serves them too.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from smoothce.backends.base import Backend

# Columns per loop step by element size: 16 KiB of 16-bit logits or fp32, 16 values
# per thread at the warps below, which stays in registers without spills.
MAX_BLOCK_V = {2: 8192, 4: 4096, 8: 2048}
MIN_BLOCK_V = 16  # below this a block is mostly masked lanes anyway
VALUES_PER_WARP = 512  # num_warps = BLOCK_V / 512 (16 values per thread), 1 to 16
MAX_NUM_WARPS = 16
NUM_STAGES = 2

_TRUE = ("1", "true", "yes", "on", "y")  # the spellings Triton accepts for TRITON_INTERPRET


@functools.cache
def triton_import_error() -> str | None:
    """None when Triton imports, else why not (imported once, on first use)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"Triton is not importable ({error}): pip install 'smoothce[triton]'"
    return None


def interpreter_reason() -> str | None:
    """None when CPU tensors can run the Triton kernel in Triton's interpreter, else why not."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in _TRUE:
        return "CPU tensors run the Triton kernel only in Triton's interpreter: set TRITON_INTERPRET=1"
    kernels = sys.modules.get("smoothce.backends.triton_kernels")
    if kernels is not None and not kernels.INTERPRETED:
        return (
            "the Triton kernel was already built for a GPU in this process: set TRITON_INTERPRET=1 "
            "before the first Triton launch"
        )
    return None


class CudaTritonBackend(Backend):
    """The Triton kernel on CUDA/ROCm tensors (and CPU tensors under TRITON_INTERPRET=1).

    ``max_block_v`` caps the columns per loop step (a power of two); tests set it
    low so that small rows still span several blocks.
    """

    name = "cuda-triton"
    device_type = "cuda"

    def __init__(self, max_block_v: int | None = None):
        self.max_block_v = max_block_v

    def unavailable_reason(self, device_type: str) -> str | None:
        if device_type not in ("cpu", self.device_type):
            return f"it serves {self.device_type!r} tensors (and CPU tensors under TRITON_INTERPRET=1)"
        reason = triton_import_error()
        if reason is not None:
            return reason
        if device_type == "cpu":
            return interpreter_reason()
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        return None

    def launch_config(self, num_classes: int, dtype: torch.dtype) -> dict:
        """BLOCK_V, num_warps and num_stages for rows of ``num_classes`` values of ``dtype``."""
        from smoothce.backends.triton_kernels import next_power_of_2

        cap = self.max_block_v or MAX_BLOCK_V[dtype.itemsize]
        block_v = min(cap, max(MIN_BLOCK_V, next_power_of_2(num_classes)))
        num_warps = min(MAX_NUM_WARPS, max(1, block_v // VALUES_PER_WARP))
        return {"block_v": block_v, "num_warps": num_warps, "num_stages": NUM_STAGES}

    def forward(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        from smoothce.backends import triton_kernels

        config = self.launch_config(logits.shape[1], logits.dtype)
        return triton_kernels.cross_entropy_fwd(
            logits, target, label_smoothing, ignore_index, grad, grad_scale, **config
        )
