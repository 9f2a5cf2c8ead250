"""The "xpu-triton" backend: the Triton kernels on Intel GPUs (torch "xpu" devices).

Only what is Intel-specific lives here: the launch table (smaller blocks than NVIDIA's, up to 32
warps), the large register file through ``grf_mode``, the float64 check, and the optional
intel-extension-for-pytorch for old torch builds without ``torch.xpu`` (imported only then).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from typing import ClassVar

import torch

from smoothce.backends.triton_backend import TritonBackend


def torch_xpu():
    """``torch.xpu``; on old torch builds without it, from intel-extension-for-pytorch if installed."""
    xpu = getattr(torch, "xpu", None)
    if xpu is None and importlib.util.find_spec("intel_extension_for_pytorch") is not None:
        import intel_extension_for_pytorch  # noqa: F401  (adds torch.xpu to torch < 2.4)

        xpu = getattr(torch, "xpu", None)
    return xpu


@functools.cache
def grf_mode() -> str:
    """The large-register-file ``grf_mode`` (256 registers per thread) for the installed Triton.

    Intel's Triton 3.6 renamed the values "small"/"large" to the register counts "128"/"256".
    """
    import triton

    found = re.match(r"(\d+)\.(\d+)", triton.__version__)
    version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    return "256" if version >= (3, 6) else "large"


@functools.cache
def _has_fp64(index: int) -> bool:
    return bool(getattr(torch_xpu().get_device_properties(index), "has_fp64", True))


class XpuTritonBackend(TritonBackend):
    """The Triton kernel on Intel XPU tensors (and CPU tensors under TRITON_INTERPRET=1)."""

    name = "xpu-triton"
    device_type = "xpu"
    # The launch table (see TritonBackend.LAUNCH_TABLE): half of NVIDIA's columns per program
    # (Intel cores have smaller register files per work-group), up to 32 warps (sub-groups).
    # Rows longer than one program take the loop kernel: whether work-groups start in order and
    # run alongside each other, which the split kernel's waiting needs, is not established here.
    LAUNCH_TABLE: ClassVar[dict[int, tuple[tuple[int, str, int, int], ...]]] = {
        2: ((4096, "split", 0, 0), (2**31, "loop", 4096, 32)),
        4: ((2048, "split", 0, 0), (2**31, "loop", 2048, 16)),
        8: ((1024, "split", 0, 0), (2**31, "loop", 1024, 8)),
    }
    VALUES_PER_WARP = 128
    MAX_NUM_WARPS = 32  # the most sub-groups a work-group may have with grf_mode 256

    def device_unavailable_reason(self) -> str | None:
        xpu = torch_xpu()
        if xpu is None or not xpu.is_available():
            return "no Intel XPU device is available (torch.xpu.is_available() is False)"
        return None

    def compile_options(self) -> dict:
        return {"grf_mode": grf_mode()}

    def check_inputs(self, logits: torch.Tensor) -> None:
        device = logits.device
        if logits.dtype == torch.float64 and device.type == "xpu" and not _has_fp64(device.index or 0):
            raise TypeError(f"float64 logits need an XPU with float64 support; {device} has none: use float32")
