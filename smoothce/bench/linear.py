"""Benchmark of ``smoothce.linear_cross_entropy``: time, peak memory and gradient accuracy.

    python -m smoothce.bench.linear [--device cpu] [--shapes 4096x1024x32000] [--dtypes fp32]
                                    [--reps 3] [--no-compile] [--no-accuracy] [--out DIR]

Forward + backward of the LM head's loss, hidden (N, D) through weight (V, D), label
smoothing 0.1, against:

* ``torch-eager``: ``F.cross_entropy(F.linear(hidden, weight), target)``, the (N, V) logits
  and their gradient materialised;
* ``torch-compile``: the same function under ``torch.compile`` (compilation not timed);
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (GPUs, where importable);
* ``matmuls``: the three matmuls alone (logits, d hidden, d weight) with no loss at all:
  the floor any fused implementation is measured against.

Times are medians over ``--reps`` interleaved rounds (each round runs every implementation
once, in turn). Peak memory is what one forward + backward needs beyond its inputs and the
gradients it returns (d hidden, d weight), as a multiple of the logits' size: on
accelerators from the allocator's statistics in this process; on CPU in a fresh process per
implementation from the resident set's high-water mark (``probe``, run by
``smoothce.bench.memory``), since the CPU allocator keeps no statistics. Accuracy: max
|error| of d hidden and d weight against a float64 reference on the same inputs, relative
to the largest |value|.

``run_linear_sweep(device, out)`` is what ``python -m smoothce.bench --op linear`` calls;
``linear_main_check(device)`` and ``linear_main_table(device)`` give the rows that
``python -m smoothce`` prints.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import smoothce
from smoothce.bench import cases, machine, memory
from smoothce.bench.cli import _arg, _device, _positive
from smoothce.bench.impls import FWD_BWD
from smoothce.bench.timing import Timer, describe_error, time_rounds

LABEL_SMOOTHING = 0.1
DTYPES = {**cases.DTYPES, "fp64": torch.float64}
# The issue's target sizes (N, D, V): CPU fp32, and a GPU at Llama-3's vocabulary in bf16.
CPU_SHAPES = ((4096, 1024, 32000),)
ACCELERATOR_SHAPES = ((8192, 4096, 128256),)


def make_inputs(n, d, v, dtype, device, seed=0):
    """hidden (N, D) ~ N(0, 1), weight (V, D) ~ N(0, 1/D) (logits of unit scale), target (N,), 1/16 ignored."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=generator) / d**0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=generator)
    target[::16] = -100
    return hidden, weight, target.to(device)


def _eager(hidden, weight, target, bias=None, label_smoothing=LABEL_SMOOTHING, reduction="mean"):
    return F.cross_entropy(F.linear(hidden, weight, bias), target, label_smoothing=label_smoothing, reduction=reduction)


def liger_available(device: torch.device) -> str | None:
    """None when Liger's fused linear cross-entropy can run on ``device``, else why not."""
    if device.type != "cuda":
        return "Liger-Kernel runs on CUDA GPUs only"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception as error:  # ImportError, or a Triton/torch mismatch inside it
        return f"liger_kernel not importable ({type(error).__name__}: {error})"[:200]
    return None


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    return lambda hidden, weight, target: module(weight, hidden, target)


# Per implementation: a builder of its loss function (hidden, weight, target) -> scalar.
BUILDERS = {
    "smoothce": lambda: functools.partial(smoothce.linear_cross_entropy, label_smoothing=LABEL_SMOOTHING),
    "torch-eager": lambda: _eager,
    "torch-compile": lambda: torch.compile(_eager, dynamic=False),
    "liger": _liger,
}


def available_impls(device: torch.device, compile_: bool = True) -> list[str]:
    names = ["smoothce", "torch-eager"]
    if compile_:
        names.append("torch-compile")
    if liger_available(device) is None:
        names.append("liger")
    return names


class Step:
    """One forward + backward of an implementation on fixed inputs; ``run`` leaves the gradients."""

    def __init__(self, name, hidden, weight, target):
        self.hidden = hidden.detach().clone().requires_grad_(True)
        self.weight = weight.detach().clone().requires_grad_(True)
        self.target = target
        self.fn = None if name == "matmuls" else BUILDERS[name]()

    def release(self):
        self.hidden.grad = None
        self.weight.grad = None

    prepare = release  # what smoothce.bench.memory calls before a measured run

    def run(self):
        self.release()
        if self.fn is None:
            self._matmuls()
        else:
            self.fn(self.hidden, self.weight, self.target).backward()

    @torch.no_grad()
    def _matmuls(self):
        # The floor: the logits, d hidden = G W and d weight = G^T h, with the logits standing in for G.
        z = self.hidden @ self.weight.t()
        self.hidden.grad = z @ self.weight
        self.weight.grad = z.t() @ self.hidden

    def grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))


def probe(impl, n, d, v, dtype, threads, chunk_bytes) -> dict:
    """In a fresh process (``smoothce.bench.memory``): inputs, one warm-up run, then the measured run.

    The items are ``cpu_peak_extra``'s, as text (chunk_bytes "0": the default budget). The
    answer, for mode fwd+bwd: the resident set's growth beyond the returned gradients.
    """
    torch.set_num_threads(int(threads))
    hidden, weight, target = make_inputs(int(n), int(d), int(v), DTYPES[dtype], torch.device("cpu"))
    with smoothce.linear.settings(chunk_bytes=int(chunk_bytes) or None):
        step = Step(impl, hidden, weight, target)
        step.run()  # warm-up: libraries, thread pools, compilation
        step.release()
        return {FWD_BWD: {"peak_extra_bytes": memory.rss_growth(step.run) - step.grad_bytes()}}


def cpu_peak_extra(impl, shape, dtype, *, threads=None, chunk_bytes=None, timeout_s=1800.0) -> dict:
    """Run ``probe`` in a fresh process: {"peak_extra_bytes": ...} or {"error": ...}."""
    argv = ["linear", impl, *shape, dtype, threads or torch.get_num_threads(), chunk_bytes or 0]
    return memory.in_fresh_process(argv, [FWD_BWD], timeout_s)[FWD_BWD]


def reference_grads(hidden, weight, target, bias=None, label_smoothing=LABEL_SMOOTHING, reduction="mean",
                    round_logits=False):
    """float64 loss and gradients of linear then cross-entropy, on the given (rounded) inputs.

    With ``round_logits`` the logits are F.linear's in the inputs' dtype (rounded to it), as
    every half-precision implementation has them; everything after them is float64.
    """
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    logits = F.linear(h, w, b)
    if round_logits:
        rounded = F.linear(hidden.detach(), weight.detach(), None if bias is None else bias.detach()).double()
        logits = logits + (rounded - logits).detach()  # the rounded values, float64 gradients
    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def relative_error(value, reference) -> float:
    """max |value - reference| / max |reference|; absolute where the reference is (round-off) zero."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    err = float((value.double() - reference.to(value.device)).abs().max()) if reference.numel() else 0.0
    return err / scale if scale > 1e-12 else err


def gradient_errors(steps: dict[str, Step], hidden, weight, target) -> dict[str, dict[str, float]]:
    """Per implementation: relative errors of d hidden and d weight against the float64 reference."""
    _, ref_h, ref_w, _ = reference_grads(hidden, weight, target)
    errors = {}
    for name, step in steps.items():
        if name != "matmuls":
            step.run()
            errors[name] = {"d_hidden": relative_error(step.hidden.grad, ref_h),
                            "d_weight": relative_error(step.weight.grad, ref_w)}  # fmt: skip
            step.release()
    return errors


def run_case(device, shape, dtype_name, *, reps, impls, accuracy, threads=None, chunk_bytes=None) -> dict:
    n, d, v = shape
    dtype = DTYPES[dtype_name]
    hidden, weight, target = make_inputs(n, d, v, dtype, device)
    flops = 3 * 2 * n * d * v
    steps = {name: Step(name, hidden, weight, target) for name in ["matmuls", *impls]}
    for step in steps.values():  # untimed: libraries, thread pools, compilation
        step.run()
        step.release()
    times, errors, _ = time_rounds(steps, Timer(device, rep_ms=0.0 if device.type == "cpu" else 100.0).measure, reps)
    if errors:
        raise RuntimeError(f"timing failed: {errors}")
    results = {}
    for name, step in steps.items():
        median = statistics.median(times[name])
        results[name] = {"ms": median * 1e3, "ms_min": min(times[name]) * 1e3, "tflops": flops / median / 1e12}
        if device.type == "cpu":
            results[name].update(cpu_peak_extra(name, shape, dtype_name, threads=threads, chunk_bytes=chunk_bytes))
            continue
        try:
            results[name]["peak_extra_bytes"] = memory.accelerator_peak_extra(step, device) - step.grad_bytes()
        except Exception as error:  # e.g. out of memory: recorded for this implementation
            results[name]["error"] = describe_error(error)
    if accuracy:
        for name, errs in gradient_errors(steps, hidden, weight, target).items():
            results[name].update(errs)
    return {"n": n, "d": d, "v": v, "dtype": dtype_name, "logits_bytes": n * v * dtype.itemsize, "results": results}


def markdown(record: dict) -> str:
    lines = [
        f"# Fused linear + cross-entropy, forward + backward, {record['device_name']}",
        "",
        f"label_smoothing={LABEL_SMOOTHING}, every 16th target ignored; medians of {record['reps']} interleaved "
        f"rounds; torch {record['torch']}. Chunk budget: {record['chunk_bytes'] / 2**20:.0f} MiB; d weight summed "
        f"{'in fp32' if record.get('fp32_weight_grad', True) else 'in its own dtype'}.",
        "",
        "| N x D x V | dtype | implementation | ms (median) | ms (best) | vs eager | vs matmuls | TFLOP/s "
        "| extra memory (x logits) | d hidden err | d weight err |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in record["cases"]:
        eager = case["results"].get("torch-eager", {}).get("ms")
        floor = case["results"]["matmuls"]["ms"]
        for name, r in case["results"].items():
            peak = r.get("peak_extra_bytes")
            ratio = None if peak is None else peak / case["logits_bytes"]
            mem = r.get("error", "n/a") if peak is None else f"{peak / 2**20:.0f} MiB ({ratio:.2f}x)"
            err_h = f"{r['d_hidden']:.2e}" if "d_hidden" in r else ""
            err_w = f"{r['d_weight']:.2e}" if "d_weight" in r else ""
            vs_eager = f"{eager / r['ms']:.2f}x" if eager else ""
            lines.append(
                f"| {case['n']}x{case['d']}x{case['v']} | {case['dtype']} | {name} | {r['ms']:.1f} | {r['ms_min']:.1f} "
                f"| {vs_eager} | {r['ms'] / floor:.2f} | {r['tflops']:.2f} | {mem} | {err_h} | {err_w} |"
            )
    lines += [
        "",
        "vs eager: eager's median time / this one's (above 1 is faster). vs matmuls: this median / the three "
        "matmuls' alone. Extra memory: peak beyond the inputs and the returned gradients during one forward + "
        "backward (GPU: allocator statistics; CPU: VmHWM growth in a fresh process per implementation). "
        "Errors: max |error| / max |value| against float64 linear + cross-entropy on the same inputs.",
    ]
    return "\n".join(lines)


def run_linear_sweep(device, out=None, *, shapes=None, dtypes=None, reps=None, compile_=True, accuracy=True,
                     impls=None, threads=None, chunk_bytes=None, fp32_weight_grad=None) -> dict:
    """The ``--op linear`` sweep on ``device``; writes ``linear.md`` and ``linear.json`` under ``out`` if given.

    ``chunk_bytes`` and ``fp32_weight_grad``: ``smoothce.linear.settings`` for smoothce's runs (None: defaults).
    """
    device = torch.device(device)
    cpu = device.type == "cpu"
    if threads and cpu:
        torch.set_num_threads(threads)
    shapes = shapes or (CPU_SHAPES if cpu else ACCELERATOR_SHAPES)
    dtypes = dtypes or (["fp32"] if cpu else ["bf16"])
    reps = reps or (3 if cpu else 10)
    impls = impls or available_impls(device, compile_)
    name = machine.device_name(device)
    record = {
        "device": str(device),
        "device_name": f"CPU {name}, {torch.get_num_threads()} threads" if cpu else name,
        "torch": torch.__version__,
        "reps": reps,
        "chunk_bytes": chunk_bytes or smoothce.linear.chunk_bytes_for(device),
        "fp32_weight_grad": fp32_weight_grad is not False,
        "liger": liger_available(device) or "available",
    }
    with smoothce.linear.settings(chunk_bytes=chunk_bytes, fp32_weight_grad=fp32_weight_grad):
        record["cases"] = [run_case(device, shape, dtype_name, reps=reps, impls=impls, accuracy=accuracy,
                                    threads=threads, chunk_bytes=chunk_bytes)
                           for shape in shapes for dtype_name in dtypes]
    text = markdown(record)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "linear.md").write_text(text + "\n")
        (out / "linear.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


CHECK_DTYPES = ("fp32", "bf16", "fp16", "fp64")
# Allowed relative error of the loss and gradients. fp32, fp64: against float64. Half precision
# rounds the logits to its dtype (as F.linear does, for PyTorch's path too), an error that
# dwarfs everything after it, so it is checked against float64 from those very logits: what
# remains is the rounding of the chunk's gradient and of the results (fp16's d hidden twice
# where the device has no fp32-output matmul).
CHECK_BOUND = {"fp32": 1e-5, "fp64": 1e-12, "bf16": 2.0**-7, "fp16": 2.0**-9}


def linear_main_check(device) -> list[dict]:
    """smoothce.linear_cross_entropy against float64 and PyTorch's path, per dtype and reduction.

    Rows: {"dtype", "reduction", "loss_err", "grad_err" (worst of hidden, weight, bias),
    "torch_grad_err" (PyTorch's F.linear + F.cross_entropy, same measure), "ok"}; errors are
    relative to the largest |value|, against float64 on the same inputs. "ok" applies
    ``CHECK_BOUND`` (for half precision against float64 from the rounded logits). Small shapes
    with odd D and V, a bias, every 7th row ignored, and chunks of 16 rows so that several
    chunks and a short last one run.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    n, d, v = 70, 33, 1001
    base_h = torch.randn(n, d, generator=generator, dtype=torch.float64)
    base_w = torch.randn(v, d, generator=generator, dtype=torch.float64) / d**0.5
    base_b = torch.randn(v, generator=generator, dtype=torch.float64) * 0.1
    target = torch.randint(0, v, (n,), generator=generator)
    target[::7] = -100
    rows = []
    for name in CHECK_DTYPES:
        dtype = DTYPES[name]
        h, w, b = base_h.to(dtype), base_w.to(dtype), base_b.to(dtype)
        for reduction in ("mean", "sum", "none"):
            ref = reference_grads(h, w, target, b, reduction=reduction)
            ours = _grads(smoothce.linear_cross_entropy, h, w, b, target, device, reduction)
            theirs = _grads(_eager, h, w, b, target, device, reduction)
            loss_err = relative_error(ours[0], ref[0])
            grad_err = max(relative_error(g, r) for g, r in zip(ours[1:], ref[1:], strict=True))
            torch_err = max(relative_error(g, r) for g, r in zip(theirs[1:], ref[1:], strict=True))
            half = dtype in (torch.bfloat16, torch.float16)
            near = reference_grads(h, w, target, b, reduction=reduction, round_logits=True) if half else ref
            ok = relative_error(ours[0], near[0]) <= (1e-5 if half else CHECK_BOUND[name]) and all(
                relative_error(g, r) <= CHECK_BOUND[name] for g, r in zip(ours[1:], near[1:], strict=True))
            rows.append({"dtype": name, "reduction": reduction, "loss_err": loss_err, "grad_err": grad_err,
                         "torch_grad_err": torch_err, "ok": ok})
    return rows


def _grads(fn, h, w, b, target, device, reduction):
    leaves = [t.to(device, copy=True).requires_grad_(True) for t in (h, w, b)]
    t = target.to(device)
    with smoothce.linear.settings(chunk_bytes=16 * (w.shape[0] * w.element_size() + 4 * w.shape[1])):
        loss = fn(leaves[0], leaves[1], t, bias=leaves[2], label_smoothing=LABEL_SMOOTHING, reduction=reduction)
    loss.backward(torch.ones_like(loss))
    return [loss.detach().cpu()] + [leaf.grad.cpu() for leaf in leaves]


def format_check_rows(rows: list[dict]) -> list[str]:
    lines = [f"  {'dtype':5s} {'reduction':9s} {'loss err':>10s} {'grad err':>10s} {'torch grad err':>14s}  result"]
    for r in rows:
        lines.append(
            f"  {r['dtype']:5s} {r['reduction']:9s} {r['loss_err']:10.2e} {r['grad_err']:10.2e} "
            f"{r['torch_grad_err']:14.2e}  {'ok' if r['ok'] else 'FAIL'}"
        )
    return lines


def linear_main_table(device, reps: int | None = None) -> list[str]:
    """A short forward + backward table for ``python -m smoothce`` (no compile, no accuracy run)."""
    device = torch.device(device)
    cpu = device.type == "cpu"
    shape = (1024, 1024, 32000) if cpu else ACCELERATOR_SHAPES[0]
    dtype = "fp32" if cpu else "bf16"
    impls = available_impls(device, compile_=False)
    case = run_case(device, shape, dtype, reps=reps or (3 if cpu else 10), impls=impls, accuracy=False)
    lines = [f"  linear + cross-entropy, {shape[0]}x{shape[1]}x{shape[2]} {dtype}, forward+backward:"]
    floor = case["results"]["matmuls"]["ms"]
    for name, r in case["results"].items():
        peak = r.get("peak_extra_bytes")
        mem = "n/a" if peak is None else f"{peak / case['logits_bytes']:.2f}x logits"
        lines.append(f"    {name:14s} {r['ms']:9.1f} ms  {r['ms'] / floor:5.2f}x the matmuls  extra memory {mem}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smoothce.bench.linear", description=__doc__.splitlines()[0])
    positive_int = _arg(int, "positive int", _positive)
    shape = _arg(lambda text: tuple(int(x) for x in text.lower().split("x")), "NxDxV shape",
                 lambda dims: len(dims) == 3 and min(dims) > 0, many=True)  # fmt: skip
    parser.add_argument("--device", help="torch device (default: cuda, else xpu, else cpu)")
    parser.add_argument("--shapes", type=shape, help="NxDxV, comma separated (default: the issue's target size)")
    parser.add_argument("--dtypes", type=_arg(str, "dtype", DTYPES.__contains__, many=True),
                        help="of fp32, bf16, fp16 (default: fp32 on CPU, bf16 elsewhere)")  # fmt: skip
    parser.add_argument("--reps", type=positive_int, help="interleaved rounds (default 3 on CPU, 10 elsewhere)")
    parser.add_argument("--threads", type=positive_int, help="torch threads on CPU")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile'd PyTorch")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the float64 reference")
    parser.add_argument("--chunk-mib", type=positive_int, help="smoothce's chunk budget (default: its own)")
    parser.add_argument("--half-weight-grad", action="store_true",
                        help="smoothce's d weight summed in the weight's dtype, chunk by chunk (default: fp32)")
    parser.add_argument("--out", help="directory for linear.md and linear.json")
    args = parser.parse_args(argv)
    record = run_linear_sweep(_device(args.device), args.out, shapes=args.shapes, dtypes=args.dtypes, reps=args.reps,
                              compile_=not args.no_compile, accuracy=not args.no_accuracy, threads=args.threads,
                              chunk_bytes=args.chunk_mib and args.chunk_mib << 20,
                              fp32_weight_grad=False if args.half_weight_grad else None)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
