"""The command line of ``python -m smoothce.bench``: presets, options, and where results go.

    python -m smoothce.bench                        # default sweep on the device present
    python -m smoothce.bench --quick                # a short sweep; nox -s bench -- --quick
    python -m smoothce.bench --preset gpu-targets --out DIR   # the GPU targets (``gpu_target_cases``)
    python -m smoothce.bench --shapes 2048x32000,512x128256 --dtypes fp32,bf16 --modes fwd+bwd,fwd
    python -m smoothce.bench --op linear [--shapes 4096x1024x32000] [--dtypes fp32,bf16] --out DIR

Results go to benchmarks/results/<device>/[<preset>/] (``--op linear``: <device>/linear/).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import torch

from smoothce.bench import cases, linear, machine, report, runner
from smoothce.bench.impls import FWD_BWD, IMPLEMENTATIONS, MODES
from smoothce.registry import default_device

TARGET_SHAPES = ((8192, 32000), (8192, 128256), (4096, 262144), (16384, 151936))
HOST_SHAPE = (16, 32000)
PRESETS = {  # token counts on CPU, on accelerators, vocabulary sizes, rounds on CPU, on accelerators
    "quick": ((128,), (1024,), (32000, 128256), 3, 3),
    "default": ((256, 1024), (4096, 16384), cases.VOCAB_SIZES, 5, 3),
    "full": ((256, 1024, 4096), (1024, 4096, 16384, 32768), cases.VOCAB_SIZES, 7, 5),
}


def gpu_target_cases() -> list[cases.Case]:
    """fwd+bwd and fwd, λ = 0.1, bf16 and fp32, at TARGET_SHAPES, the default sweep's 1024-row shapes and
    HOST_SHAPE (the host's launch overhead); plus fwd+bwd at λ = 0 on TARGET_SHAPES for quack (which has no label
    smoothing; without torch.compile, to keep within the time limit). Grouped by V so each V compiles once."""
    shapes = [*TARGET_SHAPES, *((1024, v) for v in cases.VOCAB_SIZES), HOST_SHAPE]
    out = []
    for n, v in sorted(shapes, key=lambda s: [v for _, v in shapes].index(s[1])):  # V in order of first appearance
        for dtype in ("bf16", "fp32"):
            out += [cases.Case(n, v, dtype, mode, 0.1) for mode in MODES]
            if (n, v) in TARGET_SHAPES:
                out.append(
                    cases.Case(
                        n, v, dtype, FWD_BWD, 0.0, impls=("smoothce", "torch-eager", "liger", "flash-attn", "quack")
                    )
                )
    return out


def _arg(kind, name: str, ok=lambda value: True, many: bool = False):
    """An argparse type: ``kind`` of the text (of each comma-separated item with ``many``) where ``ok``, else a
    ValueError, which argparse reports as "invalid <name> value: '<text>'"."""

    def parse(text: str):
        items = [kind(item.strip()) for item in text.split(",")] if many else [kind(text)]
        if not all(ok(item) for item in items):
            raise ValueError(text)
        return items if many else items[0]

    parse.__name__ = name
    return parse


def _positive(value) -> bool:
    return value > 0


def _device(text: str | None, parser: argparse.ArgumentParser) -> torch.device:
    try:
        device = default_device() if text is None else torch.device(text)
        torch.empty(0, device=device)  # raises where this device is not present
    except Exception as error:
        parser.error(f"--device {text!r} cannot be used here: {str(error).strip().splitlines()[0]}")
    return device


def build_parser(op: str = "cross_entropy") -> argparse.ArgumentParser:
    linear_op = op == "linear"
    parser = argparse.ArgumentParser(
        prog="python -m smoothce.bench",
        description="Time and peak memory of smoothce's "
        "cross-entropy (--op linear: its fused linear loss) against PyTorch and, on GPUs "
        "where installed, other libraries' kernels.",
    )
    parser.add_argument("--op", choices=["cross_entropy", "linear"], default="cross_entropy")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="preset",
        default="default",
        help="--preset quick (--op linear: 1024 rows, one round, no compile, no accuracy)",
    )
    dims = "NxDxV" if linear_op else "NxV"
    shape = _arg(
        lambda text: tuple(int(x) for x in text.lower().split("x")),
        f"{dims} shape",
        lambda d: len(d) == len(dims.split("x")) and min(d) > 0,
        many=True,
    )
    parser.add_argument("--shapes", type=shape, action="extend", help=f"exact shapes {dims}, comma separated")
    choices = linear.BUILDERS if linear_op else IMPLEMENTATIONS
    parser.add_argument(
        "--impls",
        type=_arg(str, "implementation", choices.__contains__, many=True),
        help=f"of {', '.join(choices)} (default: all that can run here)",
    )
    dtypes = linear.DTYPES if linear_op else cases.DTYPES
    parser.add_argument(
        "--dtypes",
        type=_arg(str, "dtype", dtypes.__contains__, many=True),
        help=f"of {', '.join(dtypes)} (default: " + ("fp32 on CPU, else bf16)" if linear_op else "fp32,bf16)"),
    )
    parser.add_argument(
        "--label-smoothing",
        type=_arg(float, "label smoothing in [0, 1]", lambda x: 0 <= x <= 1),
        default=0.1,
        help="λ (default 0.1)",
    )
    parser.add_argument("--device", help="torch device (default: cuda, else xpu, else cpu)")
    positive_int, positive_float = _arg(int, "positive int", _positive), _arg(float, "positive float", _positive)
    parser.add_argument("--threads", type=positive_int, help="torch threads on CPU (default: torch's choice)")
    parser.add_argument("--rounds", "--reps", type=positive_int, help="interleaved rounds per case")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device>/...)")
    if linear_op:
        parser.add_argument("--no-compile", action="store_true", help="skip torch.compile'd PyTorch")
        parser.add_argument("--no-accuracy", action="store_true", help="skip the float64 reference")
        parser.add_argument("--chunk-mib", type=positive_int, help="smoothce's chunk budget (default: its own)")
        parser.add_argument(
            "--half-weight-grad",
            action="store_true",
            help="smoothce's d weight summed in the weight's dtype, chunk by chunk (default: fp32)",
        )
        return parser
    size.add_argument("--preset", choices=[*PRESETS, "gpu-targets"], default="default")
    size.add_argument("--full", action="store_const", const="full", dest="preset", help="--preset full")
    parser.add_argument("--tiny", action="store_true", help="every shape divided by 256 both ways (a quick try)")
    counts = _arg(int, "positive int", _positive, many=True)
    parser.add_argument("--tokens", type=counts, help="token counts N, comma separated")
    parser.add_argument("--vocab", type=counts, help="vocabulary sizes V, comma separated")
    parser.add_argument(
        "--modes", type=_arg(str, "mode", MODES.__contains__, many=True), default=list(MODES), help="of fwd+bwd, fwd"
    )
    parser.add_argument("--ignore-every", type=int, default=0, help="ignore every k-th target (default: none)")
    parser.add_argument("--warmup-ms", type=positive_float, default=25.0, help="do_bench warm-up per round")
    parser.add_argument(
        "--rep-ms",
        type=float,
        help="ms of timed runs per round (default: 100 on GPUs, 0 = one run after a warm-up run on CPU)",
    )
    parser.add_argument("--time-limit", type=positive_float, help="start no case after this many seconds")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run_linear(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    device = _device(args.device, parser)
    for name in args.impls or []:
        if (why := linear.unavailable_reason(name, device, args.label_smoothing)) is not None:
            parser.error(f"implementation {name!r} cannot run here: {why}")
    quick = args.preset == "quick"
    shapes = args.shapes or ([(1024, *linear.CPU_SHAPES[0][1:])] if quick and device.type == "cpu" else None)
    record = linear.run_linear_sweep(
        device,
        args.out or _results_folder(device) / "linear",
        shapes=shapes,
        dtypes=args.dtypes,
        reps=args.rounds or (1 if quick else None),
        compile_=not (args.no_compile or quick),
        impls=args.impls,
        accuracy=not (args.no_accuracy or quick),
        threads=args.threads,
        chunk_bytes=args.chunk_mib and args.chunk_mib << 20,
        fp32_weight_grad=False if args.half_weight_grad else None,
        label_smoothing=args.label_smoothing,
    )
    print(linear.markdown(record))
    return 0


def _results_folder(device: torch.device) -> Path:
    """benchmarks/results/ "cpu", or the type and card name, e.g. "cuda-NVIDIA-H100-80GB-HBM3"."""
    card = re.sub(r"[^A-Za-z0-9.]+", "-", machine.device_name(device)).strip("-")
    return Path("benchmarks", "results", "cpu" if device.type == "cpu" else f"{device.type}-{card}")


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[runner.Settings, Path]:
    """The run's settings and its output folder; a bad combination of options stops with parser.error."""
    device = _device(args.device, parser)
    on_cpu, targets = device.type == "cpu", args.preset == "gpu-targets"
    custom = bool(args.shapes or args.tokens or args.vocab)
    if args.shapes and (args.tokens or args.vocab):
        parser.error("give either --shapes or --tokens/--vocab, not both")
    if targets and custom:
        parser.error("--preset gpu-targets runs fixed shapes: leave out --shapes/--tokens/--vocab")
    preset = PRESETS.get(args.preset, PRESETS["default"])
    if targets:
        case_list = gpu_target_cases()
    else:
        tokens = args.tokens or preset[0 if on_cpu else 1]
        shapes = args.shapes or [(n, v) for n in tokens for v in (args.vocab or preset[2])]
        case_list = cases.grid(shapes, args.dtypes or ["fp32", "bf16"], args.modes, args.label_smoothing)
    if args.tiny:
        case_list = [dataclasses.replace(c, n=max(2, c.n // 256), v=max(2, c.v // 256)) for c in case_list]
    least_lam = min(case.label_smoothing for case in case_list)
    why_not = {
        name: IMPLEMENTATIONS[name].unavailable_reason(device.type, least_lam) for name in args.impls or IMPLEMENTATIONS
    }
    for name in args.impls or []:
        if why_not[name] is not None:
            parser.error(f"implementation {name!r} cannot run here: {why_not[name]}")
    settings = runner.Settings(
        device=device,
        cases=case_list,
        impls=[name for name, why in why_not.items() if why is None],
        rounds=args.rounds or (3 if targets else preset[3 if on_cpu else 4]),
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms if args.rep_ms is not None else (0.0 if on_cpu else 100.0),
        ignore_every=10 if targets else args.ignore_every,
        memory=not args.no_memory,
        seed=args.seed,
        threads=args.threads or torch.get_num_threads(),
        time_limit_s=args.time_limit or (165.0 if targets else None),
        preset=("custom" if custom else args.preset) + (" (tiny)" if args.tiny else ""),
        # a line in the report for an optional library only where it could have run
        skipped_impls={
            name: why
            for name, why in why_not.items()
            if why is not None
            and IMPLEMENTATIONS[name].module
            and device.type in (IMPLEMENTATIONS[name].device_types or (device.type,))
        },
    )
    folder = "" if settings.preset == "default" else settings.preset.replace(" (tiny)", "-tiny")
    return settings, args.out or _results_folder(device) / folder


def main(argv: list[str] | None = None) -> int:
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--op", choices=["cross_entropy", "linear"], default="cross_entropy")
    parser = build_parser(chooser.parse_known_args(argv)[0].op)
    args = parser.parse_args(argv)
    if args.op == "linear":
        return run_linear(args, parser)
    settings, out = settings_from_args(args, parser)
    out.mkdir(parents=True, exist_ok=True)
    record = runner.run(settings, checkpoint=lambda partial: report.write(partial, out, []))
    pngs, why_no_plots = ([], None) if args.no_plots else report.write_plots(record, out)
    if why_no_plots:
        print(why_no_plots, file=sys.stderr)
    written = report.write(record, out, pngs) + [out / name for name in pngs]
    print("\n".join(report.summary_lines(record)))
    print("\nwrote " + ", ".join(str(path) for path in written))
    return 0
