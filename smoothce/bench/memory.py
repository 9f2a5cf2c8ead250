"""Peak memory beyond the logits: how much memory one run needs on top of the inputs it is handed.

For fwd+bwd this includes the gradient itself (N·V·b, left in ``logits.grad``), which every
implementation has to produce: one that needs nothing else scores 1.0x the logits' size; for a
no-grad forward the ideal is close to 0. How: ACCELERATOR_METHOD and CPU_METHOD (the reports
quote them). On CPU, malloc gives every block over 64 KiB back to the system when it is freed,
so memory freed earlier and reused in the measured run cannot hide what that run needs.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch

from smoothce.bench.cases import make_inputs
from smoothce.bench.impls import IMPLEMENTATIONS, Step
from smoothce.bench.timing import describe_error

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


def in_fresh_process(argv, modes, timeout_s=1800.0) -> dict:
    """``python -m smoothce.bench.memory *argv`` (``main``) in a fresh process: its answer, or an error per mode."""
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


def main(argv: list[str]) -> dict:
    """The fresh process's answer: per mode, {"peak_extra_bytes": ...} or {"error": ...}.

    ``argv``: "linear" and ``smoothce.bench.linear.probe``'s items, or the implementation, N, V, dtype, λ,
    ignore_every, threads, seed and the modes.
    """
    if argv[0] == "linear":
        from smoothce.bench.linear import probe

        return probe(*argv[1:])
    impl, n, v, dtype, label_smoothing, ignore_every, threads, seed, *modes = argv
    torch.set_num_threads(int(threads))
    logits, target = make_inputs(int(n), int(v), dtype, torch.device("cpu"), int(seed), int(ignore_every))
    results = {}
    for mode in modes:
        try:
            step = Step(IMPLEMENTATIONS[impl], logits, target, mode, float(label_smoothing))
            step.run()  # warm-up at the full shape: imports, compilation, thread pools
            step.prepare()
            results[mode] = {"peak_extra_bytes": rss_growth(step.run)}
            step.release()
        except Exception as error:  # recorded for this mode; the others are still measured
            results[mode] = {"error": describe_error(error)}
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
