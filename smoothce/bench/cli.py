"""The command line of ``python -m smoothce.bench``: presets, options, and where results go.

    python -m smoothce.bench                 # default sweep on the device present
    python -m smoothce.bench --quick         # about a minute; nox -s bench -- --quick
    python -m smoothce.bench --full          # more token counts and repetitions
    python -m smoothce.bench --shapes 2048x32000,512x128256 --dtypes fp32,bf16 --modes fwd+bwd,fwd

The sweeps cross the vocabulary sizes of real models with token counts sized for the
device (small on CPU). Results go to benchmarks/results/<device>/ for the default sweep
and to benchmarks/results/<device>/<quick|full|custom>/ otherwise, unless --out says.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from smoothce.bench import cases, machine, plots, report, runner
from smoothce.bench.impls import IMPLEMENTATIONS, MODES, get

# Per preset: token counts on CPU and on accelerators, vocabulary sizes, and the
# repetitions (CPU, accelerator). The default CPU sweep takes about 12 minutes on 2 cores.
PRESETS = {
    "quick": {
        "cpu_tokens": (128,),
        "accel_tokens": (1024,),
        "vocab": (32000, 128256),
        "reps": (3, 10),
        "min_reps": (2, 5),
        "warmup": (1, 2),
        "budget_s": 3.0,
        "copy_mib": (64, 256),
    },
    "default": {
        "cpu_tokens": (256, 1024),
        "accel_tokens": (4096, 16384),
        "vocab": cases.VOCAB_SIZES,
        "reps": (5, 20),
        "min_reps": (3, 10),
        "warmup": (1, 3),
        "budget_s": 10.0,
        "copy_mib": (256, 1024),
    },
    "full": {
        "cpu_tokens": (256, 1024, 4096),
        "accel_tokens": (1024, 4096, 16384, 32768),
        "vocab": cases.VOCAB_SIZES,
        "reps": (7, 50),
        "min_reps": (5, 20),
        "warmup": (2, 5),
        "budget_s": 30.0,
        "copy_mib": (256, 1024),
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoothce.bench",
        description="Time and peak memory of smoothce's cross-entropy against PyTorch (eager and "
        "torch.compile) and, on GPUs where installed, other libraries' kernels.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="preset", help="a ~1 minute run")
    size.add_argument("--full", action="store_const", const="full", dest="preset", help="the long sweep")
    parser.add_argument("--shapes", help="exact shapes NxV, comma separated, e.g. 2048x32000,512x128256")
    parser.add_argument("--tokens", help="token counts N of the sweep, comma separated")
    parser.add_argument("--vocab", help="vocabulary sizes V of the sweep, comma separated")
    parser.add_argument("--dtypes", default="fp32,bf16", help="of fp32, bf16, fp16 (default: fp32,bf16)")
    parser.add_argument("--modes", default=",".join(MODES), help="of fwd+bwd, fwd (default: both)")
    parser.add_argument(
        "--impls",
        help=f"implementations, comma separated (default: all available of {', '.join(IMPLEMENTATIONS)})",
    )
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="lambda (default 0.1)")
    parser.add_argument("--device", help="torch device (default: cuda, else xpu, else cpu)")
    parser.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's choice)")
    parser.add_argument("--reps", type=int, help="most timed repetitions per case")
    parser.add_argument("--min-reps", type=int, help="fewest timed repetitions per case")
    parser.add_argument("--warmup", type=int, help="warm-up runs per implementation and case")
    parser.add_argument("--budget", type=float, help="seconds of timed repetitions per case before stopping early")
    parser.add_argument("--copy-mib", type=int, help="MiB copied to measure the copy bandwidth")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device>/...)")
    return parser


def settings_from_args(args: argparse.Namespace) -> tuple[runner.Settings, Path]:
    """Validated settings and the output folder; ValueError naming the bad option."""
    preset_name = args.preset or "default"
    preset = PRESETS[preset_name]
    try:
        device = torch.device(args.device) if args.device else machine.default_device()
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r} is not a torch device: {error}") from None
    on_cpu = device.type == "cpu"
    module = getattr(torch, device.type, None)
    if not on_cpu and not (module is not None and hasattr(module, "is_available") and module.is_available()):
        raise ValueError(f"--device {args.device!r}: no {device.type} device is available here")
    if not on_cpu and device.index is not None and device.index >= module.device_count():
        raise ValueError(f"--device {args.device!r}: there are only {module.device_count()} {device.type} devices")
    pick = 0 if on_cpu else 1
    if args.shapes and (args.tokens or args.vocab):
        raise ValueError("give either --shapes or --tokens/--vocab, not both")
    if args.shapes:
        shapes = cases.parse_shapes(args.shapes)
    else:
        tokens = (
            cases.parse_ints(args.tokens, "--tokens")
            if args.tokens
            else preset["cpu_tokens" if on_cpu else "accel_tokens"]
        )
        vocab = cases.parse_ints(args.vocab, "--vocab") if args.vocab else preset["vocab"]
        shapes = [(n, v) for n in tokens for v in vocab]
    custom = bool(args.shapes or args.tokens or args.vocab)
    if not 0.0 <= args.label_smoothing <= 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1], got {args.label_smoothing}")
    skipped = {}
    if args.impls:
        impls = [get(name).name for name in cases.parse_choices(args.impls, IMPLEMENTATIONS, "implementation")]
        for name in impls:
            reason = IMPLEMENTATIONS[name].unavailable_reason(device.type, args.label_smoothing)
            if reason is not None:
                raise ValueError(f"implementation {name!r} cannot run here: {reason}")
    else:
        impls = []
        for name, impl in IMPLEMENTATIONS.items():
            reason = impl.unavailable_reason(device.type, args.label_smoothing)
            if reason is None:
                impls.append(name)
            elif impl.module is not None and device.type in (impl.device_types or (device.type,)):
                skipped[name] = reason  # worth a line only where it could have run
    reps = args.reps if args.reps is not None else preset["reps"][pick]
    min_reps = args.min_reps if args.min_reps is not None else min(preset["min_reps"][pick], reps)
    warmup = args.warmup if args.warmup is not None else preset["warmup"][pick]
    for option, value, least in (("--reps", reps, 1), ("--min-reps", min_reps, 1), ("--warmup", warmup, 1)):
        if value < least:
            raise ValueError(f"{option} must be at least {least}, got {value}")
    if min_reps > reps:
        raise ValueError(f"--min-reps ({min_reps}) must not exceed --reps ({reps})")
    if args.copy_mib is not None and args.copy_mib < 1:
        raise ValueError(f"--copy-mib must be at least 1, got {args.copy_mib}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    settings = runner.Settings(
        device=device,
        shapes=shapes,
        dtypes=cases.parse_dtypes(args.dtypes),
        modes=cases.parse_modes(args.modes),
        impls=impls,
        label_smoothing=args.label_smoothing,
        warmup=warmup,
        reps=reps,
        min_reps=min_reps,
        budget_s=args.budget if args.budget is not None else preset["budget_s"],
        memory=not args.no_memory,
        seed=args.seed,
        threads=args.threads or torch.get_num_threads(),
        copy_bytes=(args.copy_mib if args.copy_mib is not None else preset["copy_mib"][pick]) << 20,
        preset="custom" if custom else preset_name,
        skipped_impls=skipped,
    )
    if args.out is not None:
        out = args.out
    else:
        out = Path("benchmarks", "results", machine.device_kind(device))
        if settings.preset != "default":
            out = out / settings.preset
    return settings, out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings, out = settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    record = runner.run(settings, show_progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(record, out / "results.json")
    written = [out / "results.json"]
    pngs: list[str] = []
    if not args.no_plots:
        pngs, why_not = plots.write_plots(record, out)
        if why_not:
            print(why_not, file=sys.stderr)
        written += [out / name for name in pngs]
    written = report.write_markdown(record, out, pngs) + written
    print("\n".join(report.summary_lines(record)))
    print("\nwrote " + ", ".join(str(path) for path in written))
    return 0
