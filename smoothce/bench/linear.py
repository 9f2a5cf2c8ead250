"""The fused linear loss's sweep (``python -m smoothce.bench --op linear``): forward + backward of the LM
head's loss, hidden (N, D) through weight (V, D), timed against PyTorch's ways to compute it, with peak
memory and the gradients' error against float64.
"""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark.utils.common import set_torch_threads

import smoothce
from smoothce.bench import cases, machine, measure
from smoothce.bench.measure import Timer, describe_error, time_rounds
from smoothce.selfcheck import eager, reference_grads, relative_error

LABEL_SMOOTHING = 0.1
DTYPES = {**cases.DTYPES, "fp64": torch.float64}
# The issue's target sizes (N, D, V): on CPU, and on a GPU at Llama-3's vocabulary.
CPU_SHAPES = ((4096, 1024, 32000),)
ACCELERATOR_SHAPES = ((8192, 4096, 128256),)
DESCRIPTIONS = {
    "matmuls": "the three matmuls alone (logits, d hidden, d weight), no loss: the floor of any fused loss",
    "smoothce": "smoothce.linear_cross_entropy",
    "torch-eager": "F.cross_entropy(F.linear(hidden, weight), target): the (N, V) logits and gradient materialised",
    "torch-compile": "the same under torch.compile (compilation not timed)",
    "torch-linear-ce": "torch.nn.functional.linear_cross_entropy (PyTorch 2.13), default options=None",
    "torch-linear-ce-chunked": "F.linear_cross_entropy, options=LinearCrossEntropyOptions(): chunked, takes λ = 0 only",
    "liger": "Liger-Kernel's LigerFusedLinearCrossEntropyLoss (Triton)",
}


def make_inputs(n, d, v, dtype, device, seed=0):
    """hidden (N, D) ~ N(0, 1), weight (V, D) ~ N(0, 1/D) (logits of unit scale), target (N,), 1/16 ignored."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=generator) / d**0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=generator)
    target[::16] = -100
    return hidden, weight, target.to(device)


def _liger(label_smoothing):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(label_smoothing=label_smoothing)
    return lambda hidden, weight, target: module(weight, hidden, target)


def _torch_linear_ce(label_smoothing, chunked=False):
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    return functools.partial(F.linear_cross_entropy, label_smoothing=label_smoothing, options=options)


# Per implementation: a builder (label_smoothing) -> loss function (hidden, weight, target) -> scalar.
BUILDERS = {
    "smoothce": lambda lam: functools.partial(smoothce.linear_cross_entropy, label_smoothing=lam),
    "torch-eager": lambda lam: functools.partial(eager, label_smoothing=lam),
    "torch-compile": lambda lam: torch.compile(functools.partial(eager, label_smoothing=lam), dynamic=False),
    "torch-linear-ce": _torch_linear_ce,
    "torch-linear-ce-chunked": functools.partial(_torch_linear_ce, chunked=True),
    "liger": _liger,
}


def unavailable_reason(name: str, device: torch.device, label_smoothing: float) -> str | None:
    """None when implementation ``name`` can run on ``device`` at this λ, else why not."""
    if name.startswith("torch-linear-ce") and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy"
    if name == "torch-linear-ce-chunked" and label_smoothing != 0:
        return "PyTorch's chunked path takes label_smoothing=0 only"
    if name == "liger":
        if device.type != "cuda":
            return "Liger-Kernel runs on CUDA GPUs only"
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
        except Exception as error:  # ImportError, or a Triton/torch mismatch inside it
            return f"liger_kernel not importable ({type(error).__name__}: {error})"[:200]
    return None


def available_impls(device: torch.device, compile_: bool = True, label_smoothing: float = LABEL_SMOOTHING):
    names = [n for n in BUILDERS if n != "torch-compile" or compile_]
    return [n for n in names if unavailable_reason(n, torch.device(device), label_smoothing) is None]


class Step:
    """One forward + backward of an implementation on fixed inputs; ``run`` leaves the gradients."""

    def __init__(self, name, hidden, weight, target, label_smoothing=LABEL_SMOOTHING):
        self.hidden = hidden.detach().clone().requires_grad_(True)
        self.weight = weight.detach().clone().requires_grad_(True)
        self.target = target
        self.fn = None if name == "matmuls" else BUILDERS[name](label_smoothing)

    def release(self):
        self.hidden.grad = self.weight.grad = None

    prepare = release

    def run(self):
        self.release()  # as a training step's zero_grad does
        if self.fn is not None:
            self.fn(self.hidden, self.weight, self.target).backward()
            return
        with torch.no_grad():  # the logits, d hidden = G W and d weight = G^T h, with the logits standing in for G
            z = self.hidden @ self.weight.t()
            self.hidden.grad, self.weight.grad = z @ self.weight, z.t() @ self.hidden

    def grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))


def peak_extra(step: Step, device: torch.device) -> int:
    """Bytes one forward + backward needs beyond its inputs and the gradients it returns."""
    return measure.peak_extra(step, device) - step.grad_bytes()


def cpu_peak_extra(impl, shape, dtype, *, threads=None, chunk_bytes=None) -> dict:
    """``peak_extra`` of ``impl`` on the CPU at ``shape`` (N, D, V), after a warm-up run: {"peak_extra_bytes": ...}."""
    step = Step(impl, *make_inputs(*shape, DTYPES[dtype], torch.device("cpu")))
    with set_torch_threads(threads or torch.get_num_threads()), smoothce.linear.settings(chunk_bytes=chunk_bytes):
        step.run()  # warm-up: libraries, thread pools, compilation
        return {"peak_extra_bytes": peak_extra(step, torch.device("cpu"))}


def run_case(device, shape, dtype_name, *, reps, impls, accuracy, label_smoothing=LABEL_SMOOTHING) -> dict:
    n, d, v = shape
    dtype = DTYPES[dtype_name]
    hidden, weight, target = make_inputs(n, d, v, dtype, device)
    steps = {name: Step(name, hidden, weight, target, label_smoothing) for name in ["matmuls", *impls]}
    for step in steps.values():  # untimed: libraries, thread pools, compilation
        step.run()
        step.release()
    times, errors, _ = time_rounds(steps, Timer(device, rep_ms=0.0 if device.type == "cpu" else 100.0).measure, reps)
    if errors:
        raise RuntimeError(f"timing failed: {errors}")
    if accuracy:
        _, ref_h, ref_w, _ = reference_grads(hidden, weight, target, label_smoothing=label_smoothing)
    results = {}
    for name, step in steps.items():
        median = statistics.median(times[name])
        entry = results[name] = {
            "ms": median * 1e3,
            "ms_min": min(times[name]) * 1e3,
            "tflops": 6 * n * d * v / median / 1e12,
        }
        try:
            entry["peak_extra_bytes"] = peak_extra(step, device)
        except Exception as error:  # e.g. out of memory: recorded for this implementation
            entry["error"] = describe_error(error)
        if accuracy and name != "matmuls":
            step.run()
            entry["d_hidden"], entry["d_weight"] = (
                relative_error(step.hidden.grad, ref_h),
                relative_error(step.weight.grad, ref_w),
            )
    return {"n": n, "d": d, "v": v, "dtype": dtype_name, "logits_bytes": n * v * dtype.itemsize, "results": results}


def markdown(record: dict) -> str:
    lam = record.get("label_smoothing", LABEL_SMOOTHING)
    load = record.get("load_average") if isinstance(record.get("load_average"), float) else float("nan")
    versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {"torch": record["torch"]}).items())
    lines = [
        f"# Fused linear + cross-entropy, forward + backward, {record['device_name']}",
        "",
        f"label_smoothing={lam:g}, every 16th target ignored; medians of {record['reps']} interleaved rounds; "
        f"{record.get('date', '')}; {versions}, smoothce commit {record.get('commit')}. smoothce's "
        f"chunk budget: {record['chunk_bytes'] / 2**20:.0f} MiB; d weight summed "
        f"{'in fp32' if record.get('fp32_weight_grad', True) else 'in its own dtype'}. Load average (1 minute) at the "
        f"start: {load:.3g} (above the core count: other work competed, times inflated).",
        "",
        *(f"- **{name}**: {DESCRIPTIONS[name]}" for name in (record["cases"] or [{"results": {}}])[0]["results"]),
        *(f"- not run: **{name}**, {why}" for name, why in record["not_run"].items()),
        "",
        "| N x D x V | dtype | implementation | ms (median) | ms (best) | vs eager | smoothce's speed-up | vs matmuls "
        "| TFLOP/s | extra memory (x logits) | d hidden err | d weight err |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in record["cases"]:
        eager_ms, ours = (case["results"].get(name, {}).get("ms") for name in ("torch-eager", "smoothce"))
        floor = case["results"]["matmuls"]["ms"]
        for name, r in case["results"].items():
            peak, size = r.get("peak_extra_bytes"), case["logits_bytes"]
            mem = r.get("error", "n/a") if peak is None else f"{peak / 2**20:.0f} MiB ({peak / size:.2f}x)"
            errs = [f"{r[key]:.2e}" if key in r else "" for key in ("d_hidden", "d_weight")]
            vs_eager = f"{eager_ms / r['ms']:.2f}x" if eager_ms else ""
            speedup = f"{r['ms'] / ours:.2f}x" if ours else ""
            lines.append(
                f"| {case['n']}x{case['d']}x{case['v']} | {case['dtype']} | {name} | {r['ms']:.1f} | {r['ms_min']:.1f} "
                f"| {vs_eager} | {speedup} | {r['ms'] / floor:.2f} | {r['tflops']:.2f} | {mem} | {' | '.join(errs)} |"
            )
    lines += [
        "",
        "vs eager: eager's median time / this one's (above 1 is faster); smoothce's speed-up: this one's / "
        "smoothce's. vs matmuls: this median / the three "
        "matmuls' alone. Extra memory: peak beyond the inputs and the returned gradients during one forward + "
        f"backward ({measure.CPU_METHOD if record['device'] == 'cpu' else measure.ACCELERATOR_METHOD}). Errors: "
        "max |error| / max |value| against float64 linear + cross-entropy on the same inputs.",
    ]
    return "\n".join(lines)


def run_linear_sweep(
    device,
    out=None,
    *,
    shapes=None,
    dtypes=None,
    reps=None,
    compile_=True,
    accuracy=True,
    impls=None,
    threads=None,
    chunk_bytes=None,
    fp32_weight_grad=None,
    label_smoothing=LABEL_SMOOTHING,
) -> dict:
    """The sweep on ``device``, written to ``out``/linear.md and linear.json if given; ``chunk_bytes`` and
    ``fp32_weight_grad``: ``smoothce.linear.settings`` for smoothce's runs (None: its defaults)."""
    device = torch.device(device)
    cpu = device.type == "cpu"
    if threads and cpu:
        torch.set_num_threads(threads)
    environment = machine.describe(device)
    record = {
        "device": str(device),
        "device_name": f"CPU {environment['device_name']}, {torch.get_num_threads()} threads"
        if cpu
        else environment["device_name"],
        "date": environment["date"],
        "commit": environment["commit"],
        "torch": torch.__version__,
        "versions": environment["versions"],
        "load_average": environment["load_average_at_start"],
        "label_smoothing": label_smoothing,
        "reps": reps or (3 if cpu else 10),
        "chunk_bytes": chunk_bytes or smoothce.linear.chunk_bytes_for(device),
        "fp32_weight_grad": fp32_weight_grad is not False,
        "not_run": {n: why for n in BUILDERS if (why := unavailable_reason(n, device, label_smoothing))},
    }
    with smoothce.linear.settings(chunk_bytes=chunk_bytes, fp32_weight_grad=fp32_weight_grad):
        record["cases"] = [
            run_case(
                device,
                shape,
                dtype_name,
                reps=record["reps"],
                accuracy=accuracy,
                label_smoothing=label_smoothing,
                impls=impls or available_impls(device, compile_, label_smoothing),
            )
            for shape in shapes or (CPU_SHAPES if cpu else ACCELERATOR_SHAPES)
            for dtype_name in dtypes or (["fp32"] if cpu else ["bf16"])
        ]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "linear.md").write_text(markdown(record) + "\n")
        Path(out, "linear.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
