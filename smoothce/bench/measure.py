"""A ``Step``'s time (``torch.utils.benchmark`` on CPU, ``triton.testing.do_bench`` on GPUs) and peak memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch.utils import benchmark

ACCELERATOR_METHOD = "allocator statistics: max_memory_allocated during one run minus memory_allocated before it"
CPU_METHOD = (
    "resident set in the benchmark process: VmHWM during one run minus VmRSS before it (peak reset through "
    "/proc/self/clear_refs), with malloc returning every block over 64 KiB to the system on free and its free "
    "pages given back before the run (malloc_trim), so memory freed earlier cannot hide what the run needs"
)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)


def describe_error(error: BaseException) -> str:
    """ "Type: first line of the message", at most 300 characters, for tables and JSON."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:300]


class Timer:
    """Median seconds per run of a ``Step`` on ``device``, one round at a time."""

    def __init__(self, device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0):
        self.device, self.warmup_ms, self.rep_ms = torch.device(device), warmup_ms, rep_ms

    def measure(self, step) -> float:
        step.prepare()
        if self.device.type == "cpu":
            timer = benchmark.Timer("step.run()", globals={"step": step}, num_threads=torch.get_num_threads())
            seconds = timer.blocked_autorange(min_run_time=self.rep_ms / 1e3).median
        else:
            from triton.testing import do_bench

            leaves = [step.logits] if getattr(getattr(step, "logits", None), "requires_grad", False) else None
            with getattr(torch, self.device.type).device(self.device):
                ms = do_bench(step.run, self.warmup_ms, self.rep_ms, grad_to_none=leaves, return_mode="median")
            seconds = ms / 1e3
        step.release()
        return seconds


class Limit:
    """The least work, timed like a ``Step``: ``copy`` the logits (fwd+bwd's floor) or ``read`` them (fwd's)."""

    def __init__(self, logits: torch.Tensor, kind: str):
        if kind not in ("copy", "read"):
            raise ValueError(f"limit kind must be 'copy' or 'read', got {kind!r}")
        self.kind, self.logits = kind, logits
        self.out = torch.zeros_like(logits) if kind == "copy" else None  # written once: pages resident

    def run(self):
        return self.out.copy_(self.logits) if self.kind == "copy" else torch.amax(self.logits)

    prepare = release = lambda self: None  # nothing to reset


def summarize(times: list[float]) -> dict:
    """Median, minimum and quartiles of ``times`` (seconds), and how many there are."""
    ordered = sorted(times)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"median_s": statistics.median(ordered), "min_s": ordered[0], "q1_s": q1, "q3_s": q3, "reps": len(ordered)}


def time_rounds(steps: Mapping[str, object], measure: Callable[[object], float], rounds: int):
    """``rounds`` rounds of ``measure(step)`` for every step, the start rotating each round so drifts fall on all
    alike: (seconds per round per name, error per name of a step that raised and was dropped, the order measured)."""
    alive, errors, order = list(steps), {}, []
    times: dict[str, list[float]] = {name: [] for name in alive}
    for r in range(rounds):
        shift = r % max(1, len(alive))
        for name in alive[shift:] + alive[:shift]:
            try:
                times[name].append(measure(steps[name]))
                order.append(name)
            except Exception as error:  # one failing implementation must not end the sweep
                errors[name] = describe_error(error)
        alive = [name for name in alive if name not in errors]
    return {name: times[name] for name in alive}, errors, order


def rss_growth(run) -> int:
    """Bytes the resident set peaks above its size in ``run()`` (Linux; glibc meanwhile frees blocks over 64 KiB)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if glibc := hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 16)
        libc.malloc_trim(0)
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # the high-water mark VmHWM := the current resident set
        kib = lambda field: int(re.search(rf"^{field}:\s*(\d+)", Path("/proc/self/status").read_text(), re.M)[1])
        base = kib("VmRSS")
        run()
        return (kib("VmHWM") - base) * 1024
    finally:
        if glibc:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def peak_extra(step, device: torch.device) -> int:
    """Bytes one ``step.run()`` needs on ``device`` beyond what was held before it (the step is released after)."""
    step.prepare()
    if device.type == "cpu":
        extra = rss_growth(step.run)
    else:
        module = getattr(torch, device.type)
        gc.collect()
        module.synchronize(device)
        module.reset_peak_memory_stats(device)
        before = module.memory_allocated(device)
        step.run()
        module.synchronize(device)
        extra = module.max_memory_allocated(device) - before
    step.release()
    return extra
