"""Peak memory beyond the logits: how much memory one run needs on top of the inputs it is handed.

For fwd+bwd this includes the gradient itself (N·V·b, left in ``logits.grad``), which
every implementation has to produce: an implementation that needs nothing else scores
1.0x the logits' size. For a no-grad forward the ideal is close to 0.

Accelerators (CUDA, XPU), in the benchmark's own process, from the device module's
allocator statistics: after ``reset_peak_memory_stats``, extra = ``max_memory_allocated``
during the run - ``memory_allocated`` before it.

CPU (Linux), in a fresh process per implementation, shape, dtype and λ (``python -m
smoothce.bench.memory``), so no other implementation has run there, from the kernel's
resident-set high-water mark. For each mode:

1. (once) allocate and fill the logits, so their pages are resident;
2. run the implementation once (loads libraries, compiles, starts thread pools), then
   free the gradient;
3. reset the high-water mark to the current resident set (write "5" to
   ``/proc/self/clear_refs``) and read the resident set: base;
4. run once more: extra = high-water mark (VmHWM) - base.

The probe makes glibc's malloc give every block over 64 KiB back to the system when it
is freed (``MALLOC_MMAP_THRESHOLD_``), so memory freed earlier and reused in step 4
cannot hide what step 4 needs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
ACCELERATOR_METHOD = (
    "allocator statistics in the benchmark process: max_memory_allocated during one run minus "
    "memory_allocated before it"
)
CPU_METHOD = (
    "a fresh process per implementation, shape, dtype and λ: logits filled; per mode one warm-up run, "
    "peak RSS reset (/proc/self/clear_refs), then one run; extra = VmHWM - VmRSS before the run; "
    "malloc returns blocks over 64 KiB to the system on free"
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark to its current resident set (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        _status_kib("VmHWM")
    except OSError:
        return False
    return True


def rss_growth(run) -> int:
    """Bytes by which the resident set peaks above its current size while ``run()`` runs."""
    gc.collect()
    if not reset_peak_rss():
        raise OSError("the peak resident set cannot be reset here (needs Linux's /proc/self/clear_refs)")
    base = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - base) * 1024


def probe_in_fresh_process(impl, n, v, dtype, modes, label_smoothing, threads, seed, ignore_every=0, timeout_s=1800.0):
    """Run this module in a fresh process for one implementation, shape, dtype and λ.

    Returns, per mode, {"peak_extra_bytes": ...} or {"error": ...}.
    """
    argv = [impl, str(n), str(v), dtype, str(label_smoothing), str(ignore_every), str(threads), str(seed), *modes]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "smoothce.bench.memory", *argv],
            capture_output=True, text=True, env=dict(os.environ, **MALLOC_ENV), timeout=timeout_s, check=False,
        )  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {mode: {"error": f"memory probe timed out after {timeout_s:.0f} s"} for mode in modes}
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {mode: {"error": f"memory probe exited with status {done.returncode}: {tail}"[:300]} for mode in modes}


def _probe(argv: list[str]) -> dict:
    from smoothce.bench.cases import make_inputs
    from smoothce.bench.impls import MODES, Step, get

    parser = argparse.ArgumentParser(prog="python -m smoothce.bench.memory", description="CPU peak-memory probe")
    for name, kind in (("impl", str), ("n", int), ("v", int), ("dtype", str), ("label_smoothing", float),
                       ("ignore_every", int), ("threads", int), ("seed", int)):  # fmt: skip
        parser.add_argument(name, type=kind)
    parser.add_argument("modes", nargs="+", choices=MODES)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logits, target = make_inputs(args.n, args.v, args.dtype, torch.device("cpu"), args.seed, args.ignore_every)
    results = {}
    for mode in args.modes:
        try:
            step = Step(get(args.impl), logits, target, mode, args.label_smoothing)

            def measured_run(step=step):
                step.prepare()
                step.run()

            measured_run()  # warm-up at the full shape: imports, compilation, thread pools
            step.release()
            results[mode] = {"peak_extra_bytes": rss_growth(measured_run)}
            step.close()
        except Exception as error:  # recorded for this mode; the others are still measured
            results[mode] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return results


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1:])), flush=True)
