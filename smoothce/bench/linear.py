"""``--op linear``: the fused LM-head loss's forward + backward against PyTorch's: time, memory, gradient error."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark.utils.common import set_torch_threads

import smoothce
from smoothce.bench import cases, machine, measure
from smoothce.bench.impls import unavailable
from smoothce.selfcheck import eager, reference_grads, relative_error

LABEL_SMOOTHING = 0.1
DTYPES = {**cases.DTYPES, "fp64": torch.float64}
# The issue's target sizes (N, D, V): on CPU, and on a GPU at Llama-3's vocabulary.
CPU_SHAPES, ACCELERATOR_SHAPES = ((4096, 1024, 32000),), ((8192, 4096, 128256),)
MATMULS = "the three matmuls alone (logits, d hidden, d weight), no loss: the floor of any fused loss"


def _liger(label_smoothing):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(label_smoothing=label_smoothing)
    return lambda hidden, weight, target: module(weight, hidden, target)


def _partial(function=eager, chunked=False, compiled=False):
    """(label_smoothing) -> ``function`` with it (with PyTorch's chunked options, under torch.compile)."""

    def build(lam):
        options = {"options": torch.nn.LinearCrossEntropyOptions()} if chunked else {}
        fn = functools.partial(function, label_smoothing=lam, **options)
        return torch.compile(fn, dynamic=False) if compiled else fn

    return build


LINEAR_CE = getattr(F, "linear_cross_entropy", None)  # PyTorch 2.13's own fused loss
IMPLEMENTATIONS = {  # name: (what it is, (label_smoothing) -> loss function (hidden, weight, target) -> scalar)
    "smoothce": ("smoothce.linear_cross_entropy", _partial(smoothce.linear_cross_entropy)),
    "torch-eager": ("F.cross_entropy(F.linear(hidden, weight), target): (N, V) logits and gradient made", _partial()),
    "torch-compile": ("the same under torch.compile (compilation not timed)", _partial(compiled=True)),
    "torch-linear-ce": ("torch.nn.functional.linear_cross_entropy, default options=None", _partial(LINEAR_CE)),
    "torch-linear-ce-chunked": ("the same, chunked: LinearCrossEntropyOptions(), λ = 0", _partial(LINEAR_CE, True)),
    "liger": ("Liger-Kernel's LigerFusedLinearCrossEntropyLoss (Triton)", _liger),
}


def unavailable_reason(name: str, device: torch.device, label_smoothing: float) -> str | None:
    """None when implementation ``name`` can run on ``device`` at this λ, else why not."""
    if name.startswith("torch-linear-ce") and LINEAR_CE is None:
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    if name == "torch-linear-ce-chunked" and label_smoothing != 0:
        return "PyTorch's chunked path takes label_smoothing=0 only"
    return unavailable("liger_kernel.transformers", device.type, ("cuda",)) if name == "liger" else None


def available_impls(device: torch.device, compile_: bool = True, label_smoothing: float = LABEL_SMOOTHING):
    names = [n for n in IMPLEMENTATIONS if n != "torch-compile" or compile_]
    return [n for n in names if unavailable_reason(n, torch.device(device), label_smoothing) is None]


def make_inputs(n, d, v, dtype, device, seed=0):
    """hidden (N, D) ~ N(0, 1), weight (V, D) ~ N(0, 1/D) (logits of unit scale), target (N,), 1/16 ignored."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=generator) / d**0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=generator)
    target[::16] = -100
    return hidden, weight, target.to(device)


class Step:
    """One forward + backward of an implementation on fixed inputs; ``run`` leaves the gradients."""

    def __init__(self, name, hidden, weight, target, label_smoothing=LABEL_SMOOTHING):
        self.hidden, self.weight = (t.detach().clone().requires_grad_(True) for t in (hidden, weight))
        self.target, self.fn = target, None if name == "matmuls" else IMPLEMENTATIONS[name][1](label_smoothing)

    def release(self):
        self.hidden.grad = self.weight.grad = None

    prepare = release

    def run(self):
        self.release()  # as a training step's zero_grad does
        if self.fn is not None:
            return self.fn(self.hidden, self.weight, self.target).backward()
        with torch.no_grad():  # the logits, d hidden = G W and d weight = G^T h, with the logits standing in for G
            z = self.hidden @ self.weight.t()
            self.hidden.grad, self.weight.grad = z @ self.weight, z.t() @ self.hidden

    def peak_extra(self, device: torch.device) -> int:
        """Bytes one forward + backward needs beyond its inputs and the gradients it returns."""
        return measure.peak_extra(self, device) - sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))


def cpu_peak_extra(impl, shape, dtype, *, threads=None) -> dict:
    """``Step.peak_extra`` of ``impl`` on the CPU at ``shape`` (N, D, V), after a warm-up run, as a dict."""
    step = Step(impl, *make_inputs(*shape, DTYPES[dtype], torch.device("cpu")))
    with set_torch_threads(threads or torch.get_num_threads()):
        step.run()  # warm-up: libraries, thread pools, compilation
        return {"peak_extra_bytes": step.peak_extra(torch.device("cpu"))}


def run_case(device, shape, dtype_name, *, reps, impls, accuracy, label_smoothing=LABEL_SMOOTHING) -> dict:
    (n, d, v), dtype = shape, DTYPES[dtype_name]
    hidden, weight, target = make_inputs(n, d, v, dtype, device)
    steps = {name: Step(name, hidden, weight, target, label_smoothing) for name in ["matmuls", *impls]}
    for step in steps.values():  # untimed: libraries, thread pools, compilation
        step.run()
        step.release()
    timer = measure.Timer(device, rep_ms=0.0 if device.type == "cpu" else 100.0)
    times, errors, _ = measure.time_rounds(steps, timer.measure, reps)
    if errors:
        raise RuntimeError(f"timing failed: {errors}")
    if accuracy:
        _, ref_h, ref_w, _ = reference_grads(hidden, weight, target, label_smoothing=label_smoothing)
    results = {}
    for name, step in steps.items():
        t, median = times[name], statistics.median(times[name])
        entry = results[name] = {"ms": median * 1e3, "ms_min": min(t) * 1e3, "tflops": 6 * n * d * v / median / 1e12}
        try:
            entry["peak_extra_bytes"] = step.peak_extra(device)
        except Exception as error:  # e.g. out of memory: recorded for this implementation
            entry["error"] = measure.describe_error(error)
        if accuracy and name != "matmuls":
            step.run()
            entry["d_hidden"] = relative_error(step.hidden.grad, ref_h)
            entry["d_weight"] = relative_error(step.weight.grad, ref_w)
    return {"n": n, "d": d, "v": v, "dtype": dtype_name, "logits_bytes": n * v * dtype.itemsize, "results": results}


def markdown(record: dict) -> str:
    descriptions = {"matmuls": MATMULS, **{name: text for name, (text, _) in IMPLEMENTATIONS.items()}}
    lines = [f"# Fused linear + cross-entropy, forward + backward, {record['environment']['device_name']}", ""]
    budgets = ", ".join(f"{d} {b / 2**20:.0f} MiB" for d, b in record["chunk_bytes"].items())
    lines.append(
        f"label_smoothing={record['label_smoothing']:g}, every 16th target ignored; medians of {record['reps']} "
        f"interleaved rounds. smoothce's chunk budget: {budgets}; d weight summed "
        f"{'in fp32' if record['fp32_weight_grad'] else 'in its own dtype'}. {machine.text(record['environment'])}"
    )
    names = (record["cases"] or [{"results": {}}])[0]["results"]
    lines += ["", *(f"- **{name}**: {descriptions[name]}" for name in names)]
    lines += [f"- not run: **{name}**, {why}" for name, why in record["not_run"].items()]
    lines += ["", "| N x D x V | dtype | implementation | ms (median) | ms (best) | vs eager | smoothce's speed-up "]
    lines[-1] += "| vs matmuls | TFLOP/s | extra memory (x logits) | d hidden err | d weight err |"
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in record["cases"]:
        eager_ms, ours = (case["results"].get(name, {}).get("ms") for name in ("torch-eager", "smoothce"))
        floor, size = case["results"]["matmuls"]["ms"], case["logits_bytes"]
        for name, r in case["results"].items():
            peak, ms = r.get("peak_extra_bytes"), r["ms"]
            cells = [f"{case['n']}x{case['d']}x{case['v']}", case["dtype"], name, f"{ms:.1f}", f"{r['ms_min']:.1f}"]
            cells += [f"{eager_ms / ms:.2f}x" if eager_ms else "", f"{ms / ours:.2f}x" if ours else ""]
            cells += [f"{ms / floor:.2f}", f"{r['tflops']:.2f}"]
            cells += [r.get("error", "n/a") if peak is None else f"{peak / 2**20:.0f} MiB ({peak / size:.2f}x)"]
            cells += [f"{r[key]:.2e}" if key in r else "" for key in ("d_hidden", "d_weight")]
            lines.append("| " + " | ".join(cells) + " |")
    method = measure.CPU_METHOD if record["environment"]["device_type"] == "cpu" else measure.ACCELERATOR_METHOD
    lines.append(
        "\nvs eager: eager's median time / this one's (above 1 is faster); smoothce's speed-up: this one's / "
        "smoothce's. vs matmuls: this median / the three matmuls' alone. Extra memory: peak beyond the inputs and "
        f"the returned gradients during one forward + backward ({method}). Errors: max |error| / max |value| "
        "against float64 linear + cross-entropy on the same inputs."
    )
    return "\n".join(lines)


def main(args: argparse.Namespace, device: torch.device, out: Path) -> dict:
    """The sweep ``args`` asks for, written to ``out``/linear.md and linear.json."""
    cpu, quick, lam = device.type == "cpu", args.preset == "quick", args.label_smoothing
    if args.threads and cpu:
        torch.set_num_threads(args.threads)
    chunk_bytes, fp32_weight_grad = args.chunk_mib and args.chunk_mib << 20, False if args.half_weight_grad else None
    dtypes = args.dtypes or (["fp32"] if cpu else ["bf16"])
    record = {
        "environment": machine.describe(device),
        "label_smoothing": lam,
        "reps": args.rounds or (1 if quick else 3 if cpu else 10),
        "chunk_bytes": {d: chunk_bytes or smoothce.linear.chunk_bytes_for(device, DTYPES[d]) for d in dtypes},
        "fp32_weight_grad": fp32_weight_grad is not False,
        "not_run": {n: why for n in IMPLEMENTATIONS if (why := unavailable_reason(n, device, lam))},
    }
    impls = args.impls or available_impls(device, not (args.no_compile or quick), lam)
    shapes = args.shapes or (([(1024, *CPU_SHAPES[0][1:])] if quick else CPU_SHAPES) if cpu else ACCELERATOR_SHAPES)
    accuracy = not (args.no_accuracy or quick)
    with smoothce.linear.settings(chunk_bytes=chunk_bytes, fp32_weight_grad=fp32_weight_grad):
        record["cases"] = [
            run_case(device, shape, dtype, reps=record["reps"], accuracy=accuracy, label_smoothing=lam, impls=impls)
            for shape in shapes
            for dtype in dtypes
        ]
    out.mkdir(parents=True, exist_ok=True)
    Path(out, "linear.md").write_text(markdown(record) + "\n")
    Path(out, "linear.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
