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
cannot hide what step 4 needs. The fused linear loss's benchmark probes the same way:
``python -m smoothce.bench.memory linear ...`` runs ``smoothce.bench.linear.probe``.
"""

from __future__ import annotations

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
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def rss_growth(run) -> int:
    """Bytes by which the resident set peaks above its current size while ``run()`` runs (Linux)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the high-water mark VmHWM := the current resident set
    base = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - base) * 1024


def probe_in_fresh_process(impl, n, v, dtype, modes, label_smoothing, threads, seed, ignore_every=0, timeout_s=1800.0):
    """Run this module in a fresh process for one implementation, shape, dtype and λ.

    Returns, per mode, {"peak_extra_bytes": ...} or {"error": ...}.
    """
    return in_fresh_process([impl, n, v, dtype, label_smoothing, ignore_every, threads, seed, *modes], modes, timeout_s)


def in_fresh_process(argv, modes, timeout_s=1800.0) -> dict:
    """``python -m smoothce.bench.memory *argv`` in a fresh process: its answer, or an error for each of ``modes``."""
    try:
        command = [sys.executable, "-m", "smoothce.bench.memory", *map(str, argv)]
        env = dict(os.environ, **MALLOC_ENV)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s, check=False)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {mode: {"error": f"memory probe timed out after {timeout_s:.0f} s"} for mode in modes}
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {mode: {"error": f"memory probe exited with status {done.returncode}: {tail}"[:300]} for mode in modes}


def _probe(impl, n, v, dtype, label_smoothing, ignore_every, threads, seed, *modes) -> dict:
    """The fresh process's side of ``probe_in_fresh_process`` (its command line's items, in order)."""
    from smoothce.bench.cases import make_inputs
    from smoothce.bench.impls import IMPLEMENTATIONS, Step
    from smoothce.bench.timing import describe_error

    torch.set_num_threads(int(threads))
    logits, target = make_inputs(int(n), int(v), dtype, torch.device("cpu"), int(seed), int(ignore_every))
    results = {}
    for mode in modes:
        try:
            step = Step(IMPLEMENTATIONS[impl], logits, target, mode, float(label_smoothing))

            def measured_run(step=step):
                step.prepare()
                step.run()

            measured_run()  # warm-up at the full shape: imports, compilation, thread pools
            step.release()
            results[mode] = {"peak_extra_bytes": rss_growth(measured_run)}
            step.close()
        except Exception as error:  # recorded for this mode; the others are still measured
            results[mode] = {"error": describe_error(error)}
    return results


def main(argv: list[str]) -> dict:
    """The fresh process's answer: ``smoothce.bench.linear.probe(*argv[1:])`` after "linear", else ``_probe``'s."""
    if argv[0] == "linear":
        from smoothce.bench.linear import probe

        return probe(*argv[1:])
    return _probe(*argv)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
