"""Peak memory beyond the logits: how much memory one run needs on top of the inputs it is handed.

For fwd+bwd this includes the gradient itself (N·V·b, left in ``logits.grad``), which
every implementation has to produce: an implementation that needs nothing else scores
1.0x the logits' size. For a no-grad forward the ideal is close to 0.

Accelerators (CUDA, XPU), in the benchmark's own process, from the device module's
allocator statistics (``getattr(torch, device.type)``): after ``reset_peak_memory_stats``,
extra = ``max_memory_allocated`` during the run - ``memory_allocated`` before it.

CPU, in a fresh process per implementation, shape and dtype (``python -m
smoothce.bench._memprobe``), so no other implementation has run there, from the kernel's
resident-set high-water mark. For each mode:

1. (once) allocate and fill the logits, so their pages are resident;
2. run the implementation once at the full shape (loads libraries, compiles, starts
   thread pools), then free the gradient;
3. reset the high-water mark to the current resident set (write "5" to
   ``/proc/self/clear_refs``) and read the resident set: base;
4. run once more: extra = high-water mark (VmHWM) - base.

The probe makes glibc's malloc give every block over 64 KiB back to the system when it
is freed (``MALLOC_MMAP_THRESHOLD_``), so memory freed earlier and reused in step 4
cannot hide what step 4 needs. Where the high-water mark cannot be reset (not Linux),
each mode gets a process of its own, warmed up on 8 rows, and the number is the
``ru_maxrss`` growth; torch-compile's then includes compiling the full shape.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys

import torch

PROBE_MARKER = "SMOOTHCE_MEMPROBE "
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}

ACCELERATOR_METHOD = (
    "allocator statistics in the benchmark process: max_memory_allocated during one run "
    "minus memory_allocated before it"
)
CPU_METHOD = (
    "a fresh process per implementation, shape and dtype: logits filled; per mode one warm-up run "
    "at the full shape, peak RSS reset (/proc/self/clear_refs), then one run; extra = VmHWM - "
    "VmRSS before the run; malloc returns blocks over 64 KiB to the system on free"
)
CPU_FALLBACK_METHOD = (
    "a fresh process per implementation and case: logits filled, warm-up on 8 rows, then one run; "
    "extra = ru_maxrss growth (torch-compile includes compiling the full shape)"
)


def accelerator_peak_extra(step, device: torch.device) -> int:
    """Bytes allocated on ``device`` during one ``step.run()`` beyond what was held before it."""
    module = getattr(torch, device.type)
    step.prepare()
    gc.collect()
    module.synchronize(device)
    module.reset_peak_memory_stats(device)
    before = module.memory_allocated(device)
    step.run()
    module.synchronize(device)
    peak = module.max_memory_allocated(device)
    step.release()
    return peak - before


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark to its current resident set (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def release_free_memory() -> None:
    """Collect garbage and ask glibc to give freed heap memory back (best effort)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def rss_growth(run) -> int | None:
    """Bytes by which the resident set peaks above its current size while ``run()`` runs.

    None where the high-water mark cannot be reset.
    """
    release_free_memory()
    if not reset_peak_rss():
        return None
    base = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM")
    return (peak - base) * 1024


def maxrss_bytes() -> int:
    """``ru_maxrss`` in bytes (kilobytes on Linux, bytes on macOS)."""
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def probe_in_fresh_process(
    impl: str,
    n: int,
    v: int,
    dtype: str,
    modes: list[str],
    label_smoothing: float,
    threads: int,
    seed: int,
    timeout_s: float = 1800.0,
) -> dict[str, dict]:
    """Run ``smoothce.bench._memprobe`` for one implementation, shape and dtype.

    Returns, per mode, {"peak_extra_bytes": ..., "method": ...} or {"error": ...}.
    """
    request = {
        "impl": impl,
        "n": n,
        "v": v,
        "dtype": dtype,
        "modes": list(modes),
        "label_smoothing": label_smoothing,
        "threads": threads,
        "seed": seed,
    }
    env = dict(os.environ, **MALLOC_ENV)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "smoothce.bench._memprobe", json.dumps(request)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {mode: {"error": f"memory probe timed out after {timeout_s:.0f} s"} for mode in modes}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(PROBE_MARKER):
            answer = json.loads(line[len(PROBE_MARKER) :])
            if "error" in answer:
                return {mode: {"error": answer["error"]} for mode in modes}
            return {
                mode: {**result, "method": answer["method"]} if "error" not in result else result
                for mode, result in answer["modes"].items()
            }
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    error = f"memory probe exited with status {done.returncode}: {tail}"[:300]
    return {mode: {"error": error} for mode in modes}
