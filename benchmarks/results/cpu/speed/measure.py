"""Interleaved timing: smoothce vs eager vs torch.compile F.cross_entropy on CPU, medians."""

import argparse, statistics, time, sys, gc
import torch
import torch.nn.functional as F
import smoothce

p = argparse.ArgumentParser()
p.add_argument("--shapes", default="2048x32000,512x128256")
p.add_argument("--dtypes", default="fp32,bf16")
p.add_argument("--rounds", type=int, default=7)
p.add_argument("--impls", default="smoothce,eager,compile")
p.add_argument("--fwd", action="store_true", help="also no-grad forward (bf16 only)")
p.add_argument("--fwd-only", action="store_true")
args = p.parse_args()
torch.set_num_threads(2)
LAM = 0.1
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ce(z, t):
    return F.cross_entropy(z, t, label_smoothing=LAM)


compiled = torch.compile(ce)


def sm(z, t):
    return smoothce.cross_entropy(z, t, label_smoothing=LAM)


import importlib.util
from smoothce import registry
import os

# "head": an earlier backends/cpu.py (e.g. `git show 4924090:backends/cpu.py > /tmp/cpu_head.py`), same process
_spec = importlib.util.spec_from_file_location("cpu_head", os.environ.get("CPU_HEAD", "/tmp/cpu_head.py"))
cpu_head = importlib.util.module_from_spec(_spec)
if "head" in p.parse_known_args()[0].impls:
    _spec.loader.exec_module(cpu_head)
_be = registry.get("cpu")
_new_cls = type(_be)


def head(z, t):
    _be.__class__ = cpu_head.CpuBackend
    try:
        return sm(z, t)
    finally:
        _be.__class__ = _new_cls


def blocks(b):
    def run(z, t):
        old = _be.block_elements
        _be.block_elements = b
        try:
            return sm(z, t)
        finally:
            _be.block_elements = old

    return run


import smoothce.backends.cpu as _cpu_mod


def nohuge(z, t):
    old = _cpu_mod.HUGE_PAGE_BYTES
    _cpu_mod.HUGE_PAGE_BYTES = 1 << 62
    try:
        return sm(z, t)
    finally:
        _cpu_mod.HUGE_PAGE_BYTES = old


FN = {
    "nohuge": nohuge,
    "b1M": blocks(1 << 20),
    "b4M": blocks(1 << 22),
    "b16M": blocks(1 << 24),
    "ball": blocks(1 << 40),
    "smoothce": sm,
    "eager": ce,
    "compile": compiled,
    "head": head,
}


def fb(fn, leaf, t):
    leaf.grad = None
    t0 = time.perf_counter()
    loss = fn(leaf, t)
    loss.backward()
    return time.perf_counter() - t0


def fw(fn, z, t):
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(z, t)
    return time.perf_counter() - t0


impls = args.impls.split(",")
rows = []
for shape in args.shapes.split(","):
    n, v = map(int, shape.split("x"))
    for dname in args.dtypes.split(","):
        g = torch.Generator().manual_seed(0)
        z = (torch.randn(n, v, generator=g) * 2).to(DT[dname])
        t = torch.randint(0, v, (n,), generator=g)
        leaf = z.clone().requires_grad_(True)
        modes = [] if args.fwd_only else ["fwd+bwd"]
        if (args.fwd or args.fwd_only) and dname == "bf16":
            modes.append("fwd")
        for mode in modes:
            times = {i: [] for i in impls}
            for i in impls:  # warm-up (compile)
                for _ in range(2):
                    fb(FN[i], leaf, t) if mode == "fwd+bwd" else fw(FN[i], z, t)
            leaf.grad = None
            for r in range(args.rounds):
                for i in impls if r % 2 == 0 else impls[::-1]:
                    gc.collect()
                    times[i].append(fb(FN[i], leaf, t) if mode == "fwd+bwd" else fw(FN[i], z, t))
                leaf.grad = None
            med = {i: statistics.median(times[i]) * 1e3 for i in impls}
            line = f"{mode:8s} {dname} {n}x{v}: " + "  ".join(f"{i} {med[i]:.1f} ms" for i in impls)
            if "smoothce" in med:
                line += "  | " + "  ".join(f"x{i} {med[i] / med['smoothce']:.2f}" for i in impls if i != "smoothce")
            print(line, flush=True)
            rows.append((mode, dname, n, v, med))
