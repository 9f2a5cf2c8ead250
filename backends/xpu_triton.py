"""The "xpu-triton" backend: smoothce's Triton kernel on Intel GPUs (torch "xpu" devices).

Only what is Intel-specific lives here: the launch configuration (smaller blocks
than on NVIDIA, up to 32 warps, the large register file through ``grf_mode``),
the float64 check, and the optional intel-extension-for-pytorch for old torch
builds without ``torch.xpu`` (never imported otherwise). The kernel and launcher
are shared with the CUDA backend in ``triton_kernels``, imported at the first
launch. Under ``SMOOTHCE_BACKEND=xpu-triton TRITON_INTERPRET=1`` the same
kernel runs on CPU tensors in Triton's interpreter.

``grf_mode`` asks Intel's Triton for 256 registers per thread (half the threads
per core, no spills for wide rows). Intel's Triton 3.6 renamed the values from
"small"/"large" to the register counts "128"/"256" (intel-xpu-backend-for-triton
pull request 5430), so the value depends on the installed version.
"""

from __future__ import annotations

import functools
import importlib.util
import re

import torch

from smoothce.backends.base import Backend
from smoothce.backends.cuda_triton import interpreter_reason, triton_import_error

# Columns per loop step by element size: half of NVIDIA's (Intel cores have smaller
# register files per work-group), with up to 32 warps (sub-groups) per row.
MAX_BLOCK_V = {2: 4096, 4: 2048, 8: 1024}
MIN_BLOCK_V = 16
VALUES_PER_WARP = 128  # num_warps = BLOCK_V / 128, 1 to 32
MAX_NUM_WARPS = 32  # the most sub-groups a work-group may have with grf_mode 256
NUM_STAGES = 2


def torch_xpu():
    """``torch.xpu``; on old torch builds without it, from intel-extension-for-pytorch if installed."""
    xpu = getattr(torch, "xpu", None)
    if xpu is None and importlib.util.find_spec("intel_extension_for_pytorch") is not None:
        import intel_extension_for_pytorch  # noqa: F401  (adds torch.xpu to torch < 2.4)

        xpu = getattr(torch, "xpu", None)
    return xpu


@functools.cache
def grf_mode() -> str:
    """The large-register-file ``grf_mode`` for the installed Triton: "256" from 3.6, else "large"."""
    import triton

    found = re.match(r"(\d+)\.(\d+)", triton.__version__)
    version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    return "256" if version >= (3, 6) else "large"


@functools.cache
def _has_fp64(index: int) -> bool:
    return bool(getattr(torch_xpu().get_device_properties(index), "has_fp64", True))


class XpuTritonBackend(Backend):
    """The Triton kernel on Intel XPU tensors (and CPU tensors under TRITON_INTERPRET=1).

    ``max_block_v`` caps the columns per loop step (a power of two); tests set it
    low so that small rows still span several blocks.
    """

    name = "xpu-triton"
    device_type = "xpu"

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
        xpu = torch_xpu()
        if xpu is None or not xpu.is_available():
            return "no Intel XPU device is available (torch.xpu.is_available() is False)"
        return None

    def launch_config(self, num_classes: int, dtype: torch.dtype) -> dict:
        """BLOCK_V, num_warps, num_stages and Intel's grf_mode for rows of ``num_classes`` values."""
        from smoothce.backends.triton_kernels import next_power_of_2

        cap = self.max_block_v or MAX_BLOCK_V[dtype.itemsize]
        block_v = min(cap, max(MIN_BLOCK_V, next_power_of_2(num_classes)))
        num_warps = min(MAX_NUM_WARPS, max(1, block_v // VALUES_PER_WARP))
        return {
            "block_v": block_v,
            "num_warps": num_warps,
            "num_stages": NUM_STAGES,
            "options": {"grf_mode": grf_mode()},
        }

    def forward(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        from smoothce.backends import triton_kernels

        device = logits.device
        if logits.dtype == torch.float64 and device.type == "xpu" and not _has_fp64(device.index or 0):
            raise TypeError(
                f"float64 logits need an XPU with float64 support; {device} has none: use float32"
            )
        config = self.launch_config(logits.shape[1], logits.dtype)
        return triton_kernels.cross_entropy_fwd(
            logits, target, label_smoothing, ignore_index, grad, grad_scale, **config
        )
