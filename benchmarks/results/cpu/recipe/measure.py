"""Interleaved timing of the recipe options on CPU (issue 16): smoothce plain, smoothce with the options,
and eager PyTorch composing the same loss; medians, and the peak memory beyond the logits.

    python benchmarks/results/cpu/recipe/measure.py --rounds 9 --impls plain,all,softcap,weight,z_loss,lse,eager
    python benchmarks/results/cpu/recipe/measure.py --threads 1 --impls plain,all --shapes 2048x32000 --dtypes fp32
    python benchmarks/results/cpu/recipe/measure.py --memory --impls plain,all,softcap,lse,eager
    python benchmarks/results/cpu/recipe/measure.py --impls plain,all --baseline /tmp/cpu_recipe_before.py

Each line gives the medians of the wall time and of the process's CPU time (all threads), which a loaded
machine disturbs less, and each implementation's ratio to ``plain`` measured in the same rounds (in
brackets the median of the per-round ratios, which a load that changes between rounds disturbs less).
``--baseline`` takes a saved copy of ``backends/cpu_recipe.py``: each smoothce implementation with an
option gets a twin ``<name>@base`` on that copy's rows, in the same rounds.

Implementations (forward + backward: ``leaf.grad = None; f(leaf, target).backward()``, "mean", lam 0.1):
  plain     smoothce.cross_entropy(z, t, label_smoothing=0.1)
  all       the same with softcap=30, z_loss=1e-4 and class weights (uniform in [0.5, 1.5])
  softcap, z_loss, weight, lse   one option alone (lse: return_lse=True, the loss alone backward)
  all-torch, softcap-torch   "all", "softcap" on the vectorized-torch blocks (SMOOTHCE_CPU_KERNEL=0: no compiler)
  generic   "all" through torch_defaults.forward_recipe (the backend's default before the tuned path)
  eager     F.cross_entropy(30 tanh(z / 30), t, w, label_smoothing=0.1) + 1e-4 (w_k lse^2) summed / sum w_k
"""

import argparse
import gc
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import smoothce
from smoothce import registry
from smoothce.backends import cpu
from smoothce.backends.base import Backend

LAM, CAP, Z_LOSS = 0.1, 30.0, 1e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def smoothce_fn(**options):
    def run(z, t, w):
        kwargs = dict(options)
        weight = w if kwargs.pop("weight", False) else None
        out = smoothce.cross_entropy(z, t, weight, label_smoothing=LAM, **kwargs)
        return out[0] if kwargs.get("return_lse") else out

    return run


def eager(z, t, w):
    capped = CAP * torch.tanh(z / CAP)
    ce = F.cross_entropy(capped, t, w.to(z.dtype), label_smoothing=LAM)
    lse = torch.logsumexp(capped.float(), 1)
    w_k = w[t]
    return ce + Z_LOSS * (w_k * lse.square()).sum() / w_k.sum()


def without_kernel(fn):
    """``fn`` on the vectorized-torch blocks (``SMOOTHCE_CPU_KERNEL=0``: the path where no compiler is)."""

    def run(z, t, w):
        kept = os.environ.get("SMOOTHCE_CPU_KERNEL")
        os.environ["SMOOTHCE_CPU_KERNEL"] = "0"
        try:
            return fn(z, t, w)
        finally:
            if kept is None:
                del os.environ["SMOOTHCE_CPU_KERNEL"]
            else:
                os.environ["SMOOTHCE_CPU_KERNEL"] = kept

    return run


def generic(z, t, w):
    backend = registry.select(z.device)
    cls = type(backend)
    backend.__class__ = type(
        "Generic", (cls,), {"forward_recipe": Backend.forward_recipe, "loss_and_grad": Backend.loss_and_grad}
    )
    try:
        return FN["all"](z, t, w)
    finally:
        backend.__class__ = cls


FN = {
    "plain": smoothce_fn(),
    "all": smoothce_fn(weight=True, z_loss=Z_LOSS, softcap=CAP),
    "softcap": smoothce_fn(softcap=CAP),
    "z_loss": smoothce_fn(z_loss=Z_LOSS),
    "weight": smoothce_fn(weight=True),
    "lse": smoothce_fn(return_lse=True),
    "generic": generic,
    "eager": eager,
}
FN["all-torch"] = without_kernel(FN["all"])
FN["softcap-torch"] = without_kernel(FN["softcap"])
# The implementations that take the recipe path (what --baseline times again on a saved copy).
OPTION_IMPLS = ("all", "softcap", "z_loss", "weight", "lse")


def on_recipe_rows(fn, rows):
    """``fn`` with the CPU backend's recipe rows replaced by ``rows`` (a saved ``cpu_recipe.recipe_rows``)."""

    def run(z, t, w):
        kept, cpu.recipe_rows = cpu.recipe_rows, rows
        try:
            return fn(z, t, w)
        finally:
            cpu.recipe_rows = kept

    return run


def fwd_bwd(fn, leaf, t, w):
    """(wall seconds, CPU seconds of the process, all threads) of one forward + backward."""
    leaf.grad = None
    start, cpu = time.perf_counter(), time.process_time()
    fn(leaf, t, w).backward()
    return time.perf_counter() - start, time.process_time() - cpu


def peak_memory(impl, shape, dtype, threads):
    """Peak resident memory of one forward + backward beyond the logits: (in units of the logits' size, MiB).
    A fresh process each (ru_maxrss only grows), which first runs the same call on 64 x 1000 logits: the
    code a call runs is loaded on its first use, and its file pages would count as that call's memory."""
    code = f"""
import resource, torch, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import measure
torch.set_num_threads({threads})
fn, dtype = measure.FN[{impl!r}], measure.DTYPES[{dtype!r}]
generator = torch.Generator().manual_seed(0)
warm = torch.randn(64, 1000, dtype=dtype).requires_grad_(True)
measure.fwd_bwd(fn, warm, torch.randint(0, 1000, (64,)), torch.rand(1000) + 0.5)
n, v = {shape}
leaf = torch.empty(n, v, dtype=dtype).normal_(0.0, 2.0, generator=generator).requires_grad_(True)
t = torch.randint(0, v, (n,), generator=generator)
w = torch.rand(v, generator=generator) + 0.5
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
measure.fwd_bwd(fn, leaf, t, w)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / (leaf.numel() * leaf.element_size()), (after - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return tuple(map(float, out.split()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="2048x32000,512x128256")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--impls", default="plain,all,eager")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="peak memory beyond the logits instead of times")
    parser.add_argument("--baseline", help="a saved copy of backends/cpu_recipe.py to time beside the working tree's")
    args = parser.parse_args()
    if args.memory:
        for shape in args.shapes.split(","):
            n, v = map(int, shape.split("x"))
            for name in args.dtypes.split(","):
                peaks = {i: peak_memory(i, (n, v), name, args.threads) for i in args.impls.split(",")}
                print(
                    f"{name} {n}x{v} peak beyond the logits: "
                    + "  ".join(f"{i} {x:.3f}x ({mib:.1f} MiB)" for i, (x, mib) in peaks.items())
                )
        return
    torch.set_num_threads(args.threads)
    impls = args.impls.split(",")
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_cpu_recipe", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        for i in [i for i in impls if i in OPTION_IMPLS]:
            FN[f"{i}@base"] = on_recipe_rows(FN[i], baseline.recipe_rows)
            impls.append(f"{i}@base")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for shape in args.shapes.split(","):
        n, v = map(int, shape.split("x"))
        for name in args.dtypes.split(","):
            generator = torch.Generator().manual_seed(0)
            z = (torch.randn(n, v, generator=generator) * 2).to(DTYPES[name])
            t = torch.randint(0, v, (n,), generator=generator)
            w = torch.rand(v, generator=generator) + 0.5
            leaf = z.clone().requires_grad_(True)
            times = {i: [] for i in impls}
            for i in impls:
                for _ in range(2):
                    fwd_bwd(FN[i], leaf, t, w)
            leaf.grad = None
            load = os.getloadavg()[0]
            for r in range(args.rounds):
                for i in impls if r % 2 == 0 else impls[::-1]:
                    gc.collect()
                    times[i].append(fwd_bwd(FN[i], leaf, t, w))
                leaf.grad = None
            load = (load + os.getloadavg()[0]) / 2
            for kind, column in (("wall", 0), ("cpu", 1)):
                med = {i: statistics.median(x[column] for x in times[i]) * 1e3 for i in impls}
                line = f"{name} {n}x{v} {kind} (load {load:.1f}): " + "  ".join(f"{i} {med[i]:.1f} ms" for i in impls)
                if "plain" in med:
                    rounds = {i: zip(times[i], times["plain"], strict=True) for i in impls}
                    paired = {i: statistics.median(x[column] / p[column] for x, p in rounds[i]) for i in impls}
                    line += "  | of plain: " + "  ".join(
                        f"{i} {med[i] / med['plain']:.2f} ({paired[i]:.2f})" for i in impls if i != "plain"
                    )
                if "all" in med and "eager" in med:
                    line += f"  | eager / all: {med['eager'] / med['all']:.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
