"""Subprocess entry point: peak resident memory beyond the logits of CPU runs (see ``memory``).

Usage (the benchmark starts it; the environment should carry ``memory.MALLOC_ENV``)::

    python -m smoothce.bench._memprobe '{"impl": "smoothce", "n": 2048, "v": 32000,
        "dtype": "bf16", "modes": ["fwd+bwd", "fwd"], "label_smoothing": 0.1, "threads": 2, "seed": 0}'

Prints one line ``SMOOTHCE_MEMPROBE {json}``: {"method": ..., "modes": {mode: {"peak_extra_bytes": ...}
or {"error": ...}}}, or {"error": ...} when nothing could be measured. Several modes in one
process need a resettable high-water mark; without one, ask for one mode per process.
"""

from __future__ import annotations

import json
import sys

import torch

from smoothce.bench import memory
from smoothce.bench.cases import make_inputs
from smoothce.bench.impls import Step, get


def _measure(step: Step, logits, target, resettable: bool) -> int:
    def measured_run():
        step.prepare()
        step.run()

    if resettable:
        measured_run()  # warm-up at the full shape: imports, compilation, thread pools
        step.release()
        return memory.rss_growth(measured_run)
    rows = min(logits.shape[0], 8)
    small = Step(step.impl, logits[:rows].clone(), target[:rows].clone(), step.mode, step.label_smoothing)
    small.prepare()
    small.run()
    small.close()
    memory.release_free_memory()
    before = memory.maxrss_bytes()
    measured_run()
    return memory.maxrss_bytes() - before


def probe(request: dict) -> dict:
    torch.set_num_threads(int(request["threads"]))
    impl = get(request["impl"])
    n, v, dtype, modes = int(request["n"]), int(request["v"]), request["dtype"], list(request["modes"])
    label_smoothing = float(request["label_smoothing"])
    resettable = memory.reset_peak_rss()
    if not resettable and len(modes) > 1:
        raise ValueError("this system cannot reset the peak RSS: probe one mode per process")
    logits, target = make_inputs(n, v, dtype, torch.device("cpu"), int(request["seed"]))
    results = {}
    for mode in modes:
        try:
            step = Step(impl, logits, target, mode, label_smoothing)
            results[mode] = {"peak_extra_bytes": _measure(step, logits, target, resettable)}
            step.close()
        except Exception as error:  # recorded for this mode; the others are still measured
            results[mode] = {"error": f"{type(error).__name__}: {error}"[:300]}
    method = memory.CPU_METHOD if resettable else memory.CPU_FALLBACK_METHOD
    return {"method": method, "modes": results}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        result = probe(json.loads(argv[0]))
    except Exception as error:  # reported to the parent, which records it for these cases
        result = {"error": f"{type(error).__name__}: {error}"[:300]}
    print(memory.PROBE_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
