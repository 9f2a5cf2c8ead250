"""``python -m smoothce``: the environment (versions, the backend each device selects), the checks of
``smoothce.selfcheck`` on the best device present, and a short benchmark there (forward+backward against
PyTorch eager and torch.compile, and the fused linear loss against PyTorch's). Exits non-zero when a check
fails; ``--no-bench`` skips the benchmark.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import smoothce
from smoothce import registry, selfcheck
from smoothce.bench.machine import cpu_model

# The benchmark's sizes: (N, V) for the loss, (N, D, V) for the fused linear loss; small where a run is slow.
BENCH_SHAPES = {"interpreted": (32, 4096), "cpu": (512, 32000), "accelerator": (8192, 128256)}
LINEAR_SHAPES = {"interpreted": (64, 64, 4096), "cpu": (512, 128, 32000), "accelerator": (8192, 4096, 128256)}


def environment() -> list[str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}, "
        f"smoothce {smoothce.__version__}",
    ]
    for kind in ("cpu", "cuda", "xpu"):
        module = getattr(torch, kind, None)
        present = kind == "cpu" or (module is not None and module.is_available())
        if not present:
            continue
        name = cpu_model() if kind == "cpu" else module.get_device_name(0)
        try:
            chosen = registry.select(kind).name
        except (ValueError, RuntimeError) as error:
            chosen = f"none ({error})"
        lines.append(f"{kind:5s} {name}: backend {chosen}")
    return lines


def benchmark(device: torch.device) -> None:
    """smoothce against PyTorch eager and torch.compile, one shape per dtype (interpreted: eager only, tiny)."""
    from smoothce.bench import cases, report, runner

    slow, cpu = selfcheck.interpreted(device), device.type == "cpu"
    shape = BENCH_SHAPES["interpreted" if slow else "cpu" if cpu else "accelerator"]
    settings = runner.Settings(
        device=device,
        cases=cases.grid([shape], ["fp32", "bf16"], ["fwd+bwd"]),
        impls=["smoothce", "torch-eager"] + ([] if slow else ["torch-compile"]),
        rounds=2 if slow else 3,
        rep_ms=0.0 if cpu else 100.0,
        preset="python -m smoothce",
    )
    print(
        f"\nbenchmark on {device}, forward+backward, label_smoothing=0.1 (medians of interleaved runs"
        + (", through the interpreter)" if slow else "):")
    )
    record = runner.run(settings)  # progress lines go to stderr
    print("\n".join(report.summary_lines(record)))
    print("\npeak memory beyond the logits, MiB (in brackets: multiple of the logits' size):")
    names = settings.impls
    print(f"  {'case':28s}" + "".join(f"{name:>22s}" for name in names))
    for case in record["cases"]:
        cells = []
        for name in names:
            peak = case["results"].get(name, {}).get("peak_extra_bytes")
            cells.append("n/a" if peak is None else f"{peak / 2**20:.0f} ({peak / case['logits_bytes']:.2f}x)")
        label = f"{case['mode']} {case['dtype']} {case['n']}x{case['v']}"
        print(f"  {label:28s}" + "".join(f"{cell:>22s}" for cell in cells))
    print("full sweep: python -m smoothce.bench (tables and plots in benchmarks/results/)")


def linear_benchmark(device: torch.device) -> None:
    """smoothce.linear_cross_entropy against F.linear + F.cross_entropy and F.linear_cross_entropy."""
    from smoothce.bench import linear

    slow, cpu = selfcheck.interpreted(device), device.type == "cpu"
    shape = LINEAR_SHAPES["interpreted" if slow else "cpu" if cpu else "accelerator"]
    dtype = "fp32" if cpu else "bf16"
    impls = linear.available_impls(device, compile_=False)
    case = linear.run_case(device, shape, dtype, reps=2 if cpu else 10, impls=impls, accuracy=False)
    print(f"\nlinear + cross-entropy, {'x'.join(map(str, shape))} {dtype}, forward+backward:")
    floor = case["results"]["matmuls"]["ms"]
    for name, r in case["results"].items():
        peak = r.get("peak_extra_bytes")
        mem = "n/a" if peak is None else f"{peak / case['logits_bytes']:.2f}x logits"
        print(f"  {name:16s} {r['ms']:9.1f} ms  {r['ms'] / floor:5.2f}x the matmuls  extra memory {mem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smoothce", description=__doc__.splitlines()[0])
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    parser.add_argument("--device", help="device to check and benchmark (default: the best present)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else registry.default_device()
    print("smoothce: label-smoothed cross-entropy, loss and gradient in one pass")
    for line in environment():
        print("  " + line)
    ok = selfcheck.check(device)
    ok = selfcheck.check_options(device) and ok
    ok = selfcheck.check_linear(device) and ok
    if not args.no_bench:
        benchmark(device)
        linear_benchmark(device)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
