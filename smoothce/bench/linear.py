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
implementation from the resident set's high-water mark (``--probe``, below), since the CPU
allocator keeps no statistics. Accuracy: max |error| of d hidden and d weight against a
float64 reference on the same inputs, relative to the largest |value|.

``run_linear_sweep(device, out)`` is what ``python -m smoothce.bench --op linear`` calls;
``linear_main_check(device)`` and ``linear_main_table(device)`` give the rows that
``python -m smoothce`` prints.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import smoothce
from smoothce.bench import memory

LABEL_SMOOTHING = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# The issue's target sizes (N, D, V): CPU fp32, and a GPU at Llama-3's vocabulary in bf16.
CPU_SHAPES = ((4096, 1024, 32000),)
ACCELERATOR_SHAPES = ((8192, 4096, 128256),)
PROBE_MARKER = "SMOOTHCE_LINEAR_MEMPROBE "
# glibc gives every freed block over 64 KiB back, so memory freed earlier cannot hide a later peak.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


# ---------------------------------------------------------------------------------------
# Inputs and implementations
# ---------------------------------------------------------------------------------------


def make_inputs(n, d, v, dtype, device, seed=0):
    """hidden (N, D) ~ N(0, 1), weight (V, D) ~ N(0, 1/D) (logits of unit scale), target (N,), 1/16 ignored."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=generator) / d**0.5).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=generator)
    target[::16] = -100
    return hidden, weight, target.to(device)


def _eager(hidden, weight, target, bias=None):
    return F.cross_entropy(F.linear(hidden, weight, bias), target, label_smoothing=LABEL_SMOOTHING)


def _smoothce(hidden, weight, target, bias=None):
    return smoothce.linear_cross_entropy(hidden, weight, target, bias=bias, label_smoothing=LABEL_SMOOTHING)


def liger_available(device: torch.device) -> str | None:
    """None when Liger's fused linear cross-entropy can run on ``device``, else why not."""
    if device.type != "cuda":
        return "Liger-Kernel runs on CUDA GPUs only"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception as error:  # ImportError, or a Triton/torch mismatch inside it
        return f"liger_kernel not importable ({type(error).__name__}: {error})"[:200]
    return None


def _build(name: str, device: torch.device):
    """A loss function (hidden, weight, target) -> scalar for implementation ``name``."""
    if name == "smoothce":
        return _smoothce
    if name == "torch-eager":
        return _eager
    if name == "torch-compile":
        return torch.compile(_eager, dynamic=False)
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        module = LigerFusedLinearCrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        return lambda hidden, weight, target: module(weight, hidden, target)
    raise ValueError(f"unknown implementation {name!r}")


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
        self.name = name
        self.hidden = hidden.detach().clone().requires_grad_(True)
        self.weight = weight.detach().clone().requires_grad_(True)
        self.target = target
        self.fn = None if name == "matmuls" else _build(name, hidden.device)

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


# ---------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------


def _sync(device):
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def time_interleaved(steps: dict[str, Step], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per forward + backward, ``reps`` of them per step, each round running every step once, in turn."""
    device = next(iter(steps.values())).hidden.device
    for step in steps.values():
        for _ in range(warmup):
            step.run()
        step.release()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            step.release()
            gc.collect()
            _sync(device)
            start = time.perf_counter()
            step.run()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    for step in steps.values():
        step.release()
    return times


def accelerator_peak_extra(step: Step) -> int:
    """Bytes beyond the inputs and the returned gradients during one run, from the allocator's statistics."""
    return memory.accelerator_peak_extra(step, step.hidden.device) - step.grad_bytes()


def cpu_peak_extra_here(step: Step) -> int:
    """Resident-set growth of one run beyond the returned gradients (in a fresh process, after a warm-up)."""
    step.release()
    return memory.rss_growth(step.run) - step.grad_bytes()


def probe(request: dict) -> dict:
    """In this (fresh) process: inputs, one warm-up run, then the measured run's extra bytes."""
    torch.set_num_threads(int(request.get("threads") or torch.get_num_threads()))
    n, d, v = (int(x) for x in request["shape"])
    hidden, weight, target = make_inputs(n, d, v, DTYPES[request["dtype"]], torch.device("cpu"))
    with smoothce.linear.settings(chunk_bytes=request.get("chunk_bytes")):
        step = Step(request["impl"], hidden, weight, target)
        step.run()  # warm-up: libraries, thread pools, compilation
        return {"peak_extra_bytes": cpu_peak_extra_here(step)}


def cpu_peak_extra(impl, shape, dtype, *, threads=None, chunk_bytes=None, timeout_s=1800.0) -> dict:
    """Run ``probe`` in a fresh process: {"peak_extra_bytes": ...} or {"error": ...}."""
    request = {"impl": impl, "shape": list(shape), "dtype": dtype, "threads": threads, "chunk_bytes": chunk_bytes}
    env = dict(os.environ, **MALLOC_ENV)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "smoothce.bench.linear", "--probe", json.dumps(request)],
            capture_output=True, text=True, env=env, timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(PROBE_MARKER):
            return json.loads(line[len(PROBE_MARKER):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"memory probe exited with status {done.returncode}: {tail}"[:300]}


# ---------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------


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
        if name == "matmuls":
            continue
        step.run()
        errors[name] = {
            "d_hidden": relative_error(step.hidden.grad, ref_h.to(step.hidden.device)),
            "d_weight": relative_error(step.weight.grad, ref_w.to(step.weight.device)),
        }
        step.release()
    return errors


# ---------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------


def run_case(device, shape, dtype_name, *, reps, impls, accuracy, threads=None) -> dict:
    n, d, v = shape
    dtype = DTYPES[dtype_name]
    hidden, weight, target = make_inputs(n, d, v, dtype, device)
    logits_bytes = n * v * dtype.itemsize
    flops = 3 * 2 * n * d * v
    steps = {name: Step(name, hidden, weight, target) for name in ["matmuls", *impls]}
    times = time_interleaved(steps, reps)
    results = {}
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = {"ms": median * 1e3, "ms_min": min(values) * 1e3, "tflops": flops / median / 1e12}
    for name, step in steps.items():
        if device.type == "cpu":
            peak = cpu_peak_extra(name, shape, dtype_name, threads=threads)
        else:
            try:
                peak = {"peak_extra_bytes": accelerator_peak_extra(step)}
            except Exception as error:  # e.g. out of memory: recorded for this implementation
                peak = {"error": f"{type(error).__name__}: {error}"[:200]}
        results[name].update(peak)
    if accuracy:
        for name, errs in gradient_errors(steps, hidden, weight, target).items():
            results[name].update(errs)
    return {"n": n, "d": d, "v": v, "dtype": dtype_name, "logits_bytes": logits_bytes, "results": results}


def markdown(record: dict) -> str:
    lines = [
        f"# Fused linear + cross-entropy, forward + backward, {record['device_name']}",
        "",
        f"label_smoothing={LABEL_SMOOTHING}, every 16th target ignored; medians of {record['reps']} interleaved "
        f"rounds; torch {record['torch']}. Chunk budget: {record['chunk_bytes'] / 2**20:.0f} MiB.",
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
                f"| {case['n']}x{case['d']}x{case['v']} | {case['dtype']} | {name} | {r['ms']:.1f} "
                f"| {r['ms_min']:.1f} | {vs_eager} "
                f"| {r['ms'] / floor:.2f} | {r['tflops']:.2f} | {mem} | {err_h} | {err_w} |"
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
                     impls=None, threads=None) -> dict:
    """The ``--op linear`` sweep on ``device``; writes ``linear.md`` and ``linear.json`` under ``out`` if given."""
    device = torch.device(device)
    cpu = device.type == "cpu"
    if threads and cpu:
        torch.set_num_threads(threads)
    shapes = shapes or (CPU_SHAPES if cpu else ACCELERATOR_SHAPES)
    dtypes = dtypes or (["fp32"] if cpu else ["bf16"])
    reps = reps or (3 if cpu else 10)
    impls = impls or available_impls(device, compile_)
    record = {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "reps": reps,
        "chunk_bytes": smoothce.linear.chunk_bytes_for(device),
        "liger": liger_available(device) or "available",
        "cases": [],
    }
    for shape in shapes:
        for dtype_name in dtypes:
            record["cases"].append(run_case(device, shape, dtype_name, reps=reps, impls=impls, accuracy=accuracy,
                                            threads=threads))
    text = markdown(record)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "linear.md").write_text(text + "\n")
        (out / "linear.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _device_name(device) -> str:
    if device.type == "cpu":
        from smoothce.bench.machine import cpu_model

        return f"CPU {cpu_model()}, {torch.get_num_threads()} threads"
    return getattr(torch, device.type).get_device_name(device)


# ---------------------------------------------------------------------------------------
# For python -m smoothce: a check and a short table
# ---------------------------------------------------------------------------------------

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
            theirs = _grads(None, h, w, b, target, device, reduction)
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
        if fn is None:
            loss = F.cross_entropy(F.linear(*leaves), t, label_smoothing=LABEL_SMOOTHING, reduction=reduction)
        else:
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
    impls = [name for name in available_impls(device, compile_=False)]
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
    parser.add_argument("--device", default=None, help="torch device (default: cuda, else xpu, else cpu)")
    parser.add_argument("--shapes", help="NxDxV, comma separated (default: the issue's target size)")
    parser.add_argument("--dtypes", help="of fp32, bf16, fp16 (default: fp32 on CPU, bf16 elsewhere)")
    parser.add_argument("--reps", type=int, help="interleaved rounds (default 3 on CPU, 10 elsewhere)")
    parser.add_argument("--threads", type=int, help="torch threads on CPU")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile'd PyTorch")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the float64 reference")
    parser.add_argument("--out", help="directory for linear.md and linear.json")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory probe, JSON request
    args = parser.parse_args(argv)
    if args.probe:
        try:
            answer = probe(json.loads(args.probe))
        except Exception as error:  # reported to the parent process, which records it
            answer = {"error": f"{type(error).__name__}: {error}"[:300]}
        print(PROBE_MARKER + json.dumps(answer), flush=True)
        return 0
    if args.device:
        device = torch.device(args.device)
    else:
        device = next((torch.device(k) for k in ("cuda", "xpu")
                       if getattr(torch, k, None) is not None and getattr(torch, k).is_available()),
                      torch.device("cpu"))
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
    dtypes = args.dtypes.split(",") if args.dtypes else None
    record = run_linear_sweep(device, args.out, shapes=shapes, dtypes=dtypes, reps=args.reps,
                              compile_=not args.no_compile, accuracy=not args.no_accuracy, threads=args.threads)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
