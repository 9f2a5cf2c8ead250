"""What the two Triton backends share, without importing Triton: availability checks,
the launch-configuration heuristic, and the call into ``triton_kernels``.

``cuda_triton`` and ``xpu_triton`` subclass ``TritonBackend`` and set only what differs:
block-size caps, values per warp, the warp limit, extra compile options and the
device checks. ``triton_kernels`` (and with it Triton) is imported at the first launch.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import ClassVar

import torch

from smoothce.backends.base import Backend

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


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class TritonBackend(Backend):
    """The shared Triton kernel on one GPU device type (and CPU tensors under TRITON_INTERPRET=1).

    ``max_block_v`` caps the columns per loop step (a power of two); tests set it
    low so that small rows still span several blocks.
    """

    MAX_BLOCK_V: ClassVar[dict[int, int]] = {}  # columns per loop step, by element size in bytes
    MIN_BLOCK_V = 16  # below this a block is mostly masked lanes anyway
    VALUES_PER_WARP = 512  # num_warps = BLOCK_V / VALUES_PER_WARP, clamped to [1, MAX_NUM_WARPS]
    MAX_NUM_WARPS = 16
    NUM_STAGES = 2

    def __init__(self, max_block_v: int | None = None):
        self.max_block_v = max_block_v

    def device_unavailable_reason(self) -> str | None:
        """None when a device of ``device_type`` is present, else why not."""
        raise NotImplementedError

    def compile_options(self) -> dict:
        """Extra options for this device's Triton compiler."""
        return {}

    def check_inputs(self, logits: torch.Tensor) -> None:
        """Raise for inputs this device cannot compute (called before the launch)."""

    def unavailable_reason(self, device_type: str) -> str | None:
        if device_type not in ("cpu", self.device_type):
            return f"it serves {self.device_type!r} tensors (and CPU tensors under TRITON_INTERPRET=1)"
        reason = triton_import_error()
        if reason is not None:
            return reason
        if device_type == "cpu":
            return interpreter_reason()
        return self.device_unavailable_reason()

    def launch_config(self, num_classes: int, dtype: torch.dtype) -> dict:
        """BLOCK_V, num_warps, num_stages and compile options for rows of ``num_classes`` values."""
        cap = self.max_block_v or self.MAX_BLOCK_V[dtype.itemsize]
        block_v = min(cap, max(self.MIN_BLOCK_V, next_power_of_2(num_classes)))
        num_warps = min(self.MAX_NUM_WARPS, max(1, block_v // self.VALUES_PER_WARP))
        config = {"block_v": block_v, "num_warps": num_warps, "num_stages": self.NUM_STAGES}
        options = self.compile_options()
        if options:
            config["options"] = options
        return config

    def forward(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        from smoothce.backends import triton_kernels

        self.check_inputs(logits)
        config = self.launch_config(logits.shape[1], logits.dtype)
        return triton_kernels.cross_entropy_fwd(
            logits, target, label_smoothing, ignore_index, grad, grad_scale, **config
        )
