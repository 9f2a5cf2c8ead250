"""``TritonBackend``: what the CUDA and XPU backends share, without importing Triton.

It checks availability, turns a backend's launch table into each launch's configuration, and calls
the launchers of ``triton_kernels`` and ``triton_shard_kernels`` (imported, with Triton, at the first
launch). ``cuda_triton`` and ``xpu_triton`` set only their tables, settings and device checks.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import ClassVar

import torch

from smoothce.backends.base import Backend

_TRUE = ("1", "true", "yes", "on", "y")  # the spellings Triton accepts for TRITON_INTERPRET, in any case


@functools.cache
def triton_import_error() -> str | None:
    """None when Triton imports, else why not (imported once, on first use)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"Triton is not importable ({error}): pip install 'smoothce[triton]'"
    return None


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter, read as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


def interpreter_reason() -> str | None:
    """None when CPU tensors can run the Triton kernel in Triton's interpreter, else why not."""
    if not interpreter_enabled():
        return "CPU tensors run the Triton kernel only in Triton's interpreter: set TRITON_INTERPRET=1"
    kernels = sys.modules.get("smoothce.backends.triton_common")
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
    """The shared Triton kernels on one GPU device type (and CPU tensors under TRITON_INTERPRET=1).

    ``max_block_v`` caps the columns per program or block (a power of two) and ``kernel``
    forces "split" or "loop"; tests use both so that small rows take every path. Neither can make
    the split kernel wait on programs that may never start: where a row's chunks cannot all run at
    once on the device, the loop kernel takes the row.
    """

    # Rows of (largest V, kernel, columns per program or loop block, num_warps), by element size in
    # bytes; the first row whose largest V >= V applies. Columns 0 means the whole row in one
    # program (next_power_of_2(V) columns) and num_warps 0 one warp per VALUES_PER_WARP columns.
    LAUNCH_TABLE: ClassVar[dict[int, tuple[tuple[int, str, int, int], ...]]] = {}
    MIN_BLOCK_V = 16  # the fewest columns per block or program: below this a block is mostly masked lanes
    VALUES_PER_WARP = 512
    MAX_NUM_WARPS = 16
    # Whether programs start in grid order and run alongside each other here, which the split
    # kernel's waiting relies on; without it rows too long for one program take the loop kernel.
    ROW_SPLIT = False
    EVICTION = ("", "")  # the loop kernel's load hints: (sweep 1, sweep 2)
    FAST_EXP = False  # the loop kernel's exp as the hardware's ex2 instruction in PTX (NVIDIA only)
    SCALE_GRAD: ClassVar[dict[str, int]] = {"block": 4096, "num_warps": 8, "programs_per_core": 8}

    def __init__(self, max_block_v: int | None = None, kernel: str | None = None):
        if kernel not in (None, "split", "loop"):
            raise ValueError(f"kernel must be 'split', 'loop' or None, got {kernel!r}")
        self.max_block_v = max_block_v
        self.kernel = kernel

    def device_unavailable_reason(self) -> str | None:
        """None when a device of ``device_type`` is present, else why not."""
        raise NotImplementedError

    def compile_options(self) -> dict:
        """Extra options for this device's Triton compiler."""
        return {}

    def check_inputs(self, logits: torch.Tensor) -> None:
        """Raise for inputs this device cannot compute (called before the launch)."""

    def cores(self, device: torch.device) -> int | None:
        """Programs that surely run at once on ``device`` (one per core), or None for no limit."""
        return None

    def unavailable_reason(self, device_type: str) -> str | None:
        if device_type not in ("cpu", self.device_type):
            return f"it serves {self.device_type!r} tensors (and CPU tensors under TRITON_INTERPRET=1)"
        reason = triton_import_error()
        if reason is not None:
            return reason
        if device_type == "cpu":
            return interpreter_reason()
        return self.device_unavailable_reason()

    def launch_config(self, num_classes: int, dtype: torch.dtype, device: torch.device | None = None) -> dict:
        """The kernel, columns per program (``block``), num_warps and compile options for rows of V values."""
        table = self.LAUNCH_TABLE[dtype.itemsize]
        _, kernel, block, num_warps = next((row for row in table if num_classes <= row[0]), table[-1])
        block = self._clamp_block(next_power_of_2(num_classes) if block == 0 else block)
        if num_warps == 0:
            num_warps = min(self.MAX_NUM_WARPS, max(1, block // self.VALUES_PER_WARP))
        kernel = self.kernel or kernel
        if kernel == "split" and not self.chunks_resident(-(-num_classes // block), device):
            kernel = "loop"
        keep, drop = self.EVICTION
        return self._device_config(kernel=kernel, block=block, num_warps=num_warps, keep=keep, drop=drop)

    def _clamp_block(self, block: int) -> int:
        """``block`` columns capped by ``max_block_v`` and raised to ``MIN_BLOCK_V``."""
        if self.max_block_v:
            block = min(block, self.max_block_v)
        return max(self.MIN_BLOCK_V, block)

    def _device_config(self, **config) -> dict:
        """A launch's ``config`` with this device's ``fast_exp`` and ``compile_options`` (under "options",
        where it has any)."""
        config["fast_exp"] = self.FAST_EXP
        options = self.compile_options()
        if options:
            config["options"] = options
        return config

    def chunks_resident(self, chunks: int, device: torch.device | None) -> bool:
        """Whether the split kernel's ``chunks`` programs of a row surely all run at once on ``device``.

        One chunk waits on nobody. More need a device that starts programs in grid order
        (``ROW_SPLIT``) and holds a row's chunks at once: at most one per core where ``cores`` knows
        the count (CPU tensors, in the interpreter, run the kernel in two launches that never wait).
        """
        if chunks <= 1:
            return True
        if not self.ROW_SPLIT:
            return False
        cores = self.cores(device) if device is not None and device.type != "cpu" else None
        return cores is None or chunks <= cores

    def forward(self, logits, target, label_smoothing, ignore_index, grad, grad_scale):
        from smoothce.backends import triton_kernels

        self.check_inputs(logits)
        config = self.launch_config(logits.shape[1], logits.dtype, logits.device)
        return triton_kernels.forward(logits, target, label_smoothing, ignore_index, grad, grad_scale, config)

    def forward_recipe(self, logits, target, label_smoothing, ignore_index, grad, grad_scale, recipe, lse=None):
        """``Backend.forward_recipe`` in the loss kernels, the options as their constexpr switches."""
        from smoothce.backends import triton_kernels

        self.check_inputs(logits)
        config = self.launch_config(logits.shape[1], logits.dtype, logits.device)
        return triton_kernels.forward(
            logits, target, label_smoothing, ignore_index, grad, grad_scale, config, recipe, lse
        )

    def loss_and_grad(
        self,
        logits,
        target,
        label_smoothing,
        ignore_index,
        reduction,
        compute_grad,
        normalizer=None,
        recipe=None,
        lse=None,
    ):
        from smoothce.backends import triton_kernels

        self.check_inputs(logits)
        config = self.launch_config(logits.shape[1], logits.dtype, logits.device)
        return triton_kernels.loss_and_grad(
            logits, target, label_smoothing, ignore_index, reduction, compute_grad, config, normalizer, recipe, lse
        )

    def scale_grad(self, grad, grad_out, factor, per_row, inplace):
        from smoothce.backends import triton_kernels

        settings = self.SCALE_GRAD
        cores = self.cores(grad.device) if grad.device.type != "cpu" else None
        return triton_kernels.scale_grad(
            grad,
            grad_out,
            factor,
            per_row,
            inplace,
            block=settings["block"],
            num_warps=settings["num_warps"],
            programs=cores * settings["programs_per_core"] if cores else None,
        )

    def shard_launch_config(self, local_classes: int, dtype: torch.dtype) -> dict:
        """The vocabulary-parallel kernels' ``block`` (BLOCK_V), ``num_warps``, ``fast_exp`` and compile
        ``options`` for slices of V_i columns: the loop kernel's block and warps (the table's last
        row), fewer for a slice shorter than one block, capped by ``max_block_v``."""
        _, _, block_v, num_warps = self.LAUNCH_TABLE[dtype.itemsize][-1]
        block = self._clamp_block(min(block_v, next_power_of_2(local_classes)))
        return self._device_config(block=block, num_warps=max(1, num_warps * block // block_v))

    def shard_stats(self, logits, target, start, label_smoothing, ignore_index, recipe=None):
        from smoothce.backends import triton_shard_kernels

        self.check_inputs(logits)
        config = self.shard_launch_config(logits.shape[1], logits.dtype)
        return triton_shard_kernels.shard_stats(logits, target, start, label_smoothing, ignore_index, config, recipe)

    def shard_grad(
        self,
        logits,
        target,
        start,
        num_classes,
        row_max,
        excess,
        label_smoothing,
        ignore_index,
        grad_scale,
        grad,
        recipe=None,
        lse=None,
        target_weight=None,
        total_weight=None,
    ):
        from smoothce.backends import triton_shard_kernels

        self.check_inputs(logits)
        config = self.shard_launch_config(logits.shape[1], logits.dtype)
        triton_shard_kernels.shard_grad(
            logits,
            target,
            start,
            num_classes,
            row_max,
            excess,
            label_smoothing,
            ignore_index,
            grad_scale,
            grad,
            config,
            recipe,
            lse,
            target_weight,
            total_weight,
        )
