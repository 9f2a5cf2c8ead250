"""``python -m smoothce``: the environment, a check against PyTorch, and a short benchmark.

1. Versions (python, torch, triton) and which backend each present device selects.
2. The op against PyTorch's F.cross_entropy and the float64 reference, per dtype and
   reduction, on the best device present: loss and gradient error, pass or fail; then the
   hard cases for rounding (a large common offset, lam = 1, a confident row, fp16 with a
   loss scale of 65536), each with PyTorch's error alongside.
3. A short benchmark there (forward+backward, label_smoothing=0.1): ms, speed-up against
   PyTorch eager and torch.compile, peak memory beyond the logits.
Exits non-zero when a check fails. ``--no-bench`` skips step 3.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys

import torch
import torch.nn.functional as F

import smoothce
from smoothce import registry
from smoothce.bench.machine import cpu_model
from smoothce.reference import cross_entropy_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# Allowed max |error| against float64, as a multiple of the largest |value|: the loss is fp32;
# the gradient is rounded once to the logits' dtype.
GRAD_BOUND = {"fp32": 1e-5, "bf16": 2.0**-8, "fp16": 2.0**-10, "fp64": 1e-12}


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


def check(device: torch.device) -> bool:
    """smoothce against F.cross_entropy (float32 math) and the float64 reference."""
    generator = torch.Generator().manual_seed(0)
    rows, num_classes = 64, 5003  # odd vocabulary: masked tails everywhere
    base = torch.randn(rows, num_classes, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, num_classes, (rows,), generator=generator)
    target[::7] = -100
    ok = True
    print(f"\ncheck on {device} ({rows}x{num_classes}, label_smoothing=0.1, every 7th row ignored),")
    print("max |error| against float64, smoothce and PyTorch's F.cross_entropy:")
    print(f"  {'dtype':5s} {'reduction':9s} {'loss err':>10s} {'torch':>10s} {'grad err':>10s} {'torch':>10s}  result")
    for name, dtype in DTYPES.items():
        for reduction in ("mean", "sum", "none"):
            logits = base.to(dtype)
            ref_loss, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction=reduction)
            leaf = logits.to(device, copy=True).requires_grad_(True)
            loss = smoothce.cross_entropy(leaf, target.to(device), label_smoothing=0.1, reduction=reduction)
            loss.backward(torch.ones_like(loss))
            torch_leaf = logits.to(device, copy=True).requires_grad_(True)
            expected = F.cross_entropy(torch_leaf, target.to(device), label_smoothing=0.1, reduction=reduction)
            expected.backward(torch.ones_like(expected))
            loss_err = (loss.double().cpu() - ref_loss).abs().max().item()
            torch_loss_err = (expected.double().cpu() - ref_loss).abs().max().item()
            grad_err = (leaf.grad.double().cpu() - ref_grad).abs().max().item()
            torch_err = (torch_leaf.grad.double().cpu() - ref_grad).abs().max().item()
            scale = ref_grad.abs().max().item()
            loss_scale = max(ref_loss.abs().max().item(), 1.0)
            good = loss_err <= 1e-5 * loss_scale and grad_err <= GRAD_BOUND[name] * scale
            ok &= good
            print(
                f"  {name:5s} {reduction:9s} {loss_err:10.2e} {torch_loss_err:10.2e} {grad_err:10.2e} "
                f"{torch_err:10.2e}  {'ok' if good else 'FAIL'}"
            )
    return check_hard_cases(device) and ok


def _fp16_ulps(values: torch.Tensor, expected: torch.Tensor) -> float:
    """max |values - expected| in units of fp16's spacing at |expected| (subnormals: 2**-24)."""
    spacing = torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(2.0**-14))) - 10)
    return ((values.double() - expected).abs() / spacing).max().item()


def _hard_cases(device: torch.device):
    """(label, what is measured, bound, smoothce's error, PyTorch's error) per case."""
    generator = torch.Generator().manual_seed(1)

    def both(logits, target, backward_scale=None, autocast=False, **options):
        results = []
        for fn in (smoothce.cross_entropy, F.cross_entropy):
            leaf = logits.to(device, copy=True).requires_grad_(True)
            with torch.autocast(device.type, dtype=logits.dtype, enabled=autocast):
                loss = fn(leaf, target.to(device), **options)
            if backward_scale is not None:
                (loss * backward_scale).backward()
            results.append((loss.detach().double().cpu(), None if leaf.grad is None else leaf.grad.cpu()))
        return results

    # fp32 logits sharing a large offset, lam > 0: the smoothing term's sum must not carry the offset.
    logits = (-3e4 + torch.randn(16, 32000, generator=generator, dtype=torch.float64)).float()
    target = torch.randint(0, 32000, (16,), generator=generator)
    ref, _ = cross_entropy_reference(logits, target, label_smoothing=0.1, reduction="none")
    errors = [((loss - ref).abs() / ref).max().item() for loss, _ in both(logits, target, label_smoothing=0.1,
                                                                           reduction="none")]
    yield "fp32 -3e4 + randn, lam=0.1", "loss rel. err", 1e-6, *errors

    equal = torch.full((1, 70000), 30000.0)
    errors = [abs(loss.item() - math.log(70000)) / math.log(70000)
              for loss, _ in both(equal, torch.tensor([0]), label_smoothing=1.0)]
    yield "fp32 70000 logits all 3e4, lam=1", "loss rel. err", 1e-6, *errors

    # lam = 1: the target column is p_k - 1/V, about 1e-5; it must keep its relative precision.
    logits = torch.randn(8, 65536, generator=generator)
    target = torch.randint(0, 65536, (8,), generator=generator)
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=1.0, reduction="sum")
    rows = torch.arange(8)
    col = ref_grad[rows, target]
    errors = [((grad[rows, target].double() - col).abs() / col.abs()).max().item()
              for _, grad in both(logits, target, backward_scale=1.0, label_smoothing=1.0, reduction="sum")]
    yield "fp32 V=65536 randn, lam=1", "target col rel. err", 1e-5, *errors

    # A confident row: loss = log1p(69999 exp(-19.45)) = 2.5004e-4, far below fp32's ulp of 1.
    confident = torch.zeros(1, 70000)
    confident[0, 0] = 19.45
    exact = math.log1p(69999 * math.exp(-float(confident[0, 0])))
    errors = [abs(loss.item() - exact) / exact for loss, _ in both(confident, torch.tensor([0]))]
    yield "fp32 confident row (loss 2.5e-4)", "loss rel. err", 1e-6, *errors

    # fp16 logits, mean over 4096 rows, loss x 65536 (loss scaling), PyTorch under autocast: the
    # scaled gradient in fp16 ulps of float64 x 65536. Folding 1/N in first would flush most of it.
    num_classes = 32000 if device.type != "cpu" else 2048
    logits = (torch.randn(4096, num_classes, generator=generator) * 3).half()
    target = torch.randint(0, num_classes, (4096,), generator=generator)
    _, ref_grad = cross_entropy_reference(logits, target, label_smoothing=0.1)
    errors = [_fp16_ulps(grad, ref_grad * 65536)
              for _, grad in both(logits, target, backward_scale=65536.0, autocast=True, label_smoothing=0.1)]
    yield f"fp16 4096x{num_classes} mean, loss x 65536", "grad err, fp16 ulps", 2.0, *errors


def check_hard_cases(device: torch.device) -> bool:
    """The cases where rounding is easiest to get wrong: smoothce must be within its bound."""
    print(f"\nhard cases on {device}, error against float64 (PyTorch: F.cross_entropy, fp32 math):")
    print(f"  {'case':36s} {'measure':20s} {'smoothce':>10s} {'torch':>10s} {'bound':>8s}  result")
    ok = True
    for label, measure, bound, ours, theirs in _hard_cases(device):
        good = ours <= bound
        ok &= good
        print(f"  {label:36s} {measure:20s} {ours:10.2e} {theirs:10.2e} {bound:8.0e}  {'ok' if good else 'FAIL'}")
    return ok


def check_linear(device: torch.device) -> bool:
    """smoothce.linear_cross_entropy against float64 and PyTorch's F.linear + F.cross_entropy."""
    from smoothce.bench import linear

    rows = linear.linear_main_check(device)
    print(f"\nfused linear + cross-entropy on {device}, worst relative error of the loss and of the")
    print("hidden/weight/bias gradients against float64, and PyTorch's gradient error:")
    print("\n".join(linear.format_check_rows(rows)))
    return all(row["ok"] for row in rows)


def benchmark(device: torch.device) -> None:
    from smoothce.bench import cases, report, runner

    cpu = device.type == "cpu"
    shapes = [(1024, 32000), (256, 128256)] if cpu else [(8192, 32000), (8192, 128256)]
    settings = runner.Settings(
        device=device,
        cases=cases.grid(shapes, ["fp32", "bf16"], ["fwd+bwd"]),
        impls=["smoothce", "torch-eager", "torch-compile"],
        rounds=5 if cpu else 3,
        preset="python -m smoothce",
    )
    print(f"\nbenchmark on {device}, forward+backward, label_smoothing=0.1 (medians of interleaved runs):")
    record = runner.run(settings)  # progress lines go to stderr
    for line in report.summary_lines(record):
        print(line)
    print("\npeak memory beyond the logits, MiB (in brackets: multiple of the logits' size):")
    names = settings.impls
    print(f"  {'case':28s}" + "".join(f"{name:>22s}" for name in names))
    for case in record["cases"]:
        cells = []
        for name in names:
            peak = case["results"].get(name, {}).get("peak_extra_bytes")
            ratio = "" if peak is None else f" ({peak / case['logits_bytes']:.2f}x)"
            cells.append("n/a" if peak is None else f"{peak / 2**20:.0f}{ratio}")
        label = f"{case['mode']} {case['dtype']} {case['n']}x{case['v']}"
        print(f"  {label:28s}" + "".join(f"{cell:>22s}" for cell in cells))
    print("full sweep: python -m smoothce.bench (tables and plots in benchmarks/results/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smoothce", description=__doc__.splitlines()[0])
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    parser.add_argument("--device", help="device to check and benchmark (default: the best present)")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else registry.default_device()
    print("smoothce: label-smoothed cross-entropy, loss and gradient in one pass")
    for line in environment():
        print("  " + line)
    ok = check(device)
    ok = check_linear(device) and ok
    if not args.no_bench:
        benchmark(device)
        from smoothce.bench import linear

        print()
        print("\n".join(linear.linear_main_table(device)))
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
