"""Subprocess entry point: peak resident memory beyond the logits of one CPU run (see ``memory``).

Usage (the benchmark starts it; the environment should carry ``memory.MALLOC_ENV``)::

    python -m smoothce.bench._memprobe '{"impl": "smoothce", "n": 2048, "v": 32000,
        "dtype": "bf16", "mode": "fwd+bwd", "label_smoothing": 0.1, "threads": 2, "seed": 0}'

Prints one line ``SMOOTHCE_MEMPROBE {json}`` with "peak_extra_bytes" and "method", or "error".
"""

from __future__ import annotations

import json
import sys

import torch

from smoothce.bench import memory
from smoothce.bench.cases import make_inputs
from smoothce.bench.impls import Step, get


def probe(request: dict) -> dict:
    torch.set_num_threads(int(request["threads"]))
    impl = get(request["impl"])
    n, v, dtype, mode = int(request["n"]), int(request["v"]), request["dtype"], request["mode"]
    label_smoothing = float(request["label_smoothing"])
    device = torch.device("cpu")
    logits, target = make_inputs(n, v, dtype, device, int(request["seed"]))
    step = Step(impl, logits, target, mode, label_smoothing)

    def measured_run():
        step.prepare()
        step.run()

    if memory.reset_peak_rss():
        measured_run()  # warm-up at the full shape: imports, compilation, thread pools
        step.release()
        extra = memory.rss_growth(measured_run)
        method = memory.CPU_METHOD
    else:
        rows = min(n, 8)
        small = Step(impl, logits[:rows].clone(), target[:rows].clone(), mode, label_smoothing)
        small.prepare()
        small.run()
        small.close()
        memory.release_free_memory()
        before = memory.maxrss_bytes()
        measured_run()
        extra = memory.maxrss_bytes() - before
        method = memory.CPU_FALLBACK_METHOD
    step.close()
    return {"peak_extra_bytes": extra, "method": method, "logits_bytes": logits.numel() * logits.itemsize}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        result = probe(json.loads(argv[0]))
    except Exception as error:  # reported to the parent, which records it for this case
        result = {"error": f"{type(error).__name__}: {error}"[:300]}
    print(memory.PROBE_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
