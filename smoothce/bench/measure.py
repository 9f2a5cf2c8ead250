"""Measuring one ``Step`` (``prepare`` untimed, then ``run``): its time, and the memory it needs beyond its inputs.

Time: on CPU ``torch.utils.benchmark.Timer.blocked_autorange`` (an untimed warm-up run per round, then runs for
``rep_ms``); on GPUs ``triton.testing.do_bench``. Rounds of several steps are interleaved (``time_rounds``). Memory:
ACCELERATOR_METHOD and CPU_METHOD, which the reports quote; for fwd+bwd it includes the returned gradient.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
from collections.abc import Callable, Mapping

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

            leaf = getattr(step, "logits", None)
            leaves = [leaf] if leaf is not None and leaf.requires_grad else None
            with getattr(torch, self.device.type).device(self.device):
                ms = do_bench(step.run, self.warmup_ms, self.rep_ms, grad_to_none=leaves, return_mode="median")
            seconds = ms / 1e3
        step.release()
        return seconds


class Limit:
    """The least work of a case, timed like a ``Step``: ``copy`` (read the logits, write a gradient-sized buffer:
    the floor of forward+backward) or ``read`` (``torch.amax``, every logit read once: the floor of a forward)."""

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
    """``rounds`` rounds of ``measure(step)`` for every step, the start rotating by one each round, so slow
    drifts of the machine fall on all alike. Returns (seconds per round per name, error per name that failed,
    the order of the measurements); a step that raises is dropped and its error recorded.
    """
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def rss_growth(run) -> int:
    """Bytes by which the resident set peaks above its current size while ``run()`` runs (Linux). Meanwhile glibc's
    malloc gives blocks over 64 KiB back to the system on free; afterwards the thresholds its own dynamic rule
    reaches in a process that frees large buffers (32 MiB mmap, 64 MiB trim). Another malloc: measured as it is."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if glibc := hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 16)
        libc.malloc_trim(0)
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # the high-water mark VmHWM := the current resident set
        base = _status_kib("VmRSS")
        run()
        return (_status_kib("VmHWM") - base) * 1024
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
