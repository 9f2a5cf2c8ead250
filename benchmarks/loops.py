"""The loops people train with, timed: smoothce eager and compiled, at dO = 1 and at dO != 1.

    python benchmarks/loops.py --out DIR [--device cuda] [--shapes 8192x128256] [--dtypes bf16,fp32]

(defaults: 2048 x 32000 in bf16 and fp32 on CPU; 8192 x 128256 in bf16 on an accelerator)

Issue 15's items 1 and 2 on the device at hand. For each shape and dtype ("mean", lam = 0.1, every
16th target ignored), forward + backward of:

  copy             the copy limit: one device-to-device copy of the logits (read once, write once)
  eager            smoothce.cross_entropy, loss.backward(): dO = 1, backward writes nothing
  eager-window     the same with normalizer= twice the counted rows (a window of two such batches): dO = 1
  eager-scaled     (loss * 1024).backward(), a loss scale: backward is one in-place multiply
  compile          torch.compile(fullgraph=True) of the loss, then backward
  compile-scaled   torch.compile of loss * 1024, then backward
  compile-graphs   the loss compiled with mode="reduce-overhead" (CUDA graphs; CUDA only)
  torch-compile    torch.compile of F.cross_entropy, the peer

Times: ``smoothce.bench.measure.Timer`` (do_bench medians on GPUs, torch.utils.benchmark on CPU), in
interleaved rounds; memory: the peak beyond what was held before a run (``measure.peak_extra``), as a
multiple of the logits. Each loop's gradient is checked against the eager one (scaled back) before
timing. Writes DIR/loops.json and DIR/loops.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import torch
import torch.nn.functional as F

import smoothce
from smoothce.bench import machine
from smoothce.bench.measure import Limit, Timer, describe_error, peak_extra, time_rounds

LAM, SCALE = 0.1, 1024.0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# One case on an accelerator by default (about five compilations each), to fit a GPU session's check.
DEFAULTS = {"cpu": ([(2048, 32000)], ["bf16", "fp32"]), "accelerator": ([(8192, 128256)], ["bf16"])}


def _loss(z, t, normalizer=None):
    return smoothce.cross_entropy(z, t, label_smoothing=LAM, normalizer=normalizer)


def _scaled(z, t):
    return _loss(z, t) * SCALE


def _torch_loss(z, t):
    return F.cross_entropy(z, t, label_smoothing=LAM)


class LoopStep:
    """One loop on one case, in ``smoothce.bench.measure``'s step interface: ``run()`` is a forward + backward."""

    def __init__(self, loss_fn, logits, target, scale=1.0, graphs=False):
        self.loss_fn, self.target, self.scale, self.graphs = loss_fn, target, scale, graphs
        self.logits = logits.detach().requires_grad_(True)

    def prepare(self):
        self.logits.grad = None

    release = prepare

    def run(self):
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs may be overwritten
        self.logits.grad = None
        self.loss_fn(self.logits, self.target).backward()

    def gradient(self):
        self.run()
        grad = self.logits.grad.double() / self.scale
        self.prepare()
        return grad


def loops(device, counted):
    """{name: (loss function, its gradient over eager's)}: every loop this device runs."""
    window = torch.tensor(2.0 * counted, device=device)  # a window of twice these rows: dO = 1 still
    found = {
        "eager": (_loss, 1.0),
        "eager-window": (lambda z, t: _loss(z, t, window), 0.5),
        "eager-scaled": (_scaled, SCALE),
        "compile": (torch.compile(_loss, fullgraph=True, dynamic=False), 1.0),
        "compile-scaled": (torch.compile(_scaled, fullgraph=True, dynamic=False), SCALE),
        "torch-compile": (torch.compile(_torch_loss, fullgraph=True, dynamic=False), 1.0),
    }
    if device.type == "cuda":
        found["compile-graphs"] = (torch.compile(_loss, mode="reduce-overhead", fullgraph=True, dynamic=False), 1.0)
    return found


def run_case(device, shape, dtype_name, rounds):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=generator) * 2).to(device=device, dtype=DTYPES[dtype_name])
    target = torch.randint(0, shape[1], (shape[0],), generator=generator).to(device)
    target[::16] = -100
    counted = int((target != -100).sum())
    steps = {
        name: LoopStep(fn, logits, target, scale, name == "compile-graphs")
        for name, (fn, scale) in loops(device, counted).items()
    }
    errors, results = {}, {}
    expected = steps["eager"].gradient()
    largest = expected.abs().max().item()
    for name, step in list(steps.items()):
        try:
            results[name] = {"grad_error": (step.gradient() - expected).abs().max().item() / largest}
        except Exception as error:  # one failing loop must not end the sweep
            errors[name] = describe_error(error)
            del steps[name]
    copy = Limit(logits, "copy")
    timer = Timer(device)
    times, failed, _ = time_rounds({"copy": copy, **steps}, timer.measure, rounds)
    errors.update(failed)
    copy_s = statistics.median(times.pop("copy"))
    logits_bytes = logits.numel() * logits.element_size()
    for name, seconds in times.items():
        median = statistics.median(seconds)
        extra = peak_extra(steps[name], device)
        results[name].update(ms=median * 1e3, of_copy_limit=copy_s / median, extra_bytes=extra)
        results[name]["extra_x_logits"] = extra / logits_bytes
    return {"shape": list(shape), "dtype": dtype_name, "copy_ms": copy_s * 1e3, "results": results, "errors": errors}


def markdown(record):
    lines = ["# Training loops: smoothce eager and compiled, forward + backward", "", machine.text(record["env"]), ""]
    lines += ["| N x V | dtype | loop | ms | of copy limit | extra memory (x logits) | grad error vs eager |"]
    lines += ["|---|---|---|---:|---:|---:|---:|"]
    for case in record["cases"]:
        label = f"{case['shape'][0]}x{case['shape'][1]} | {case['dtype']}"
        lines.append(f"| {label} | copy | {case['copy_ms']:.3f} | 1.00 | | |")
        for name, r in case["results"].items():
            if "ms" in r:
                lines.append(
                    f"| {label} | {name} | {r['ms']:.3f} | {r['of_copy_limit']:.2f} | {r['extra_x_logits']:.2f} "
                    f"| {r['grad_error']:.1e} |"
                )
        lines += [f"| {label} | {name} | failed: {why} | | | |" for name, why in case["errors"].items()]
    return "\n".join(lines)


def shape(text):
    rows, classes = (int(n) for n in text.lower().split("x"))
    return rows, classes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", type=lambda s: [shape(x) for x in s.split(",")])
    parser.add_argument("--dtypes", type=lambda s: s.split(","))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes, dtypes = DEFAULTS["cpu" if device.type == "cpu" else "accelerator"]
    shapes, dtypes = args.shapes or shapes, args.dtypes or dtypes
    record = {"env": machine.describe(device), "scale": SCALE, "label_smoothing": LAM, "cases": []}
    for case_shape in shapes:
        for dtype_name in dtypes:
            record["cases"].append(run_case(device, case_shape, dtype_name, args.rounds))
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(record)
    (args.out / "loops.md").write_text(text + "\n")
    (args.out / "loops.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(text)
    return record


if __name__ == "__main__":
    main()
