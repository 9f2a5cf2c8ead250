"""Time and peak memory of smoothce's cross-entropy (--op linear: its fused linear loss) against PyTorch and, on GPUs
where installed, other libraries' kernels; results in benchmarks/results/<device>/[<preset>][-tiny][-<options>]/
(--op linear: .../linear/). Say --quick, --preset gpu-targets, --shapes 2048x32000 --dtypes bf16, --softcap 30."""

from __future__ import annotations

import argparse
import dataclasses
import re
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
    """fwd+bwd and fwd, λ = 0.1, bf16 and fp32 at TARGET_SHAPES, 1024 × each V and HOST_SHAPE (launch overhead);
    fwd+bwd at λ = 0 on TARGET_SHAPES for quack, without torch.compile (time). Grouped by V: each V compiles once."""
    shapes = [*TARGET_SHAPES, *((1024, v) for v in cases.VOCAB_SIZES), HOST_SHAPE]
    unsmoothed = ("smoothce", "torch-eager", "liger", "flash-attn", "quack")
    out = []
    for n, v in sorted(shapes, key=lambda s: [v for _, v in shapes].index(s[1])):  # V in order of first appearance
        for dtype in ("bf16", "fp32"):
            out += [cases.Case(n, v, dtype, mode, 0.1) for mode in MODES]
            out += [cases.Case(n, v, dtype, FWD_BWD, 0.0, impls=unsmoothed)] if (n, v) in TARGET_SHAPES else []
    return out


def _arg(kind, name: str, ok=lambda value: 0 < value < float("inf"), many: bool = False):
    """An argparse type: ``kind`` of the text (of each comma-separated item: ``many``), a ValueError unless ``ok``."""

    def parse(text: str):
        items = [kind(item.strip()) for item in text.split(",")] if many else [kind(text)]
        if not all(ok(item) for item in items):
            raise ValueError(text)
        return items if many else items[0]

    parse.__name__ = name
    return parse


def build_parser(op: str = "cross_entropy") -> argparse.ArgumentParser:
    linear_op = op == "linear"
    parser = argparse.ArgumentParser(prog="python -m smoothce.bench", description=__doc__)
    add = parser.add_argument
    add("--op", choices=["cross_entropy", "linear"], default="cross_entropy")
    size = parser.add_mutually_exclusive_group()
    quick = "--preset quick (--op linear: 1024 rows, one round, no compile, no accuracy)"
    size.add_argument("--quick", action="store_const", const="quick", dest="preset", default="default", help=quick)
    dims = "NxDxV" if linear_op else "NxV"
    ok = lambda d: len(d) == len(dims.split("x")) and min(d) > 0
    shape = _arg(lambda text: tuple(int(x) for x in text.lower().split("x")), f"{dims} shape", ok, many=True)
    add("--shapes", type=shape, action="extend", help=f"exact shapes {dims}, comma separated")
    choices, dtypes = (linear.IMPLEMENTATIONS, linear.DTYPES) if linear_op else (IMPLEMENTATIONS, cases.DTYPES)
    impls = _arg(str, "implementation", choices.__contains__, many=True)
    add("--impls", type=impls, help=f"of {', '.join(choices)} (default: all that can run here)")
    default = "fp32 on CPU, else bf16" if linear_op else "fp32,bf16"
    add("--dtypes", type=_arg(str, "dtype", dtypes.__contains__, many=True), help=f"of {', '.join(dtypes)} ({default})")
    lam = _arg(float, "label smoothing in [0, 1]", lambda x: 0 <= x <= 1)
    add("--label-smoothing", type=lam, default=0.1, help="λ (default 0.1)")
    add("--device", help="torch device (default: cuda, else xpu, else cpu)")
    positive_int, positive_float = _arg(int, "positive int"), _arg(float, "positive float")
    add("--threads", type=positive_int, help="torch threads on CPU (default: torch's choice)")
    add("--rounds", "--reps", type=positive_int, help="interleaved rounds per case")
    add("--out", type=Path, help="results folder (default: benchmarks/results/<device>/...)")
    if linear_op:
        add("--no-compile", action="store_true", help="skip torch.compile'd PyTorch")
        add("--no-accuracy", action="store_true", help="skip the float64 reference")
        add("--chunk-mib", type=positive_int, help="smoothce's chunk budget (default: its own)")
        add("--half-weight-grad", action="store_true", help="smoothce's d weight summed in its dtype (default fp32)")
        return parser
    size.add_argument("--preset", choices=[*PRESETS, "gpu-targets"], default="default")
    size.add_argument("--full", action="store_const", const="full", dest="preset", help="--preset full")
    add("--tiny", action="store_true", help="every shape divided by 256 both ways (a quick try)")
    add("--tokens", type=_arg(int, "positive int", many=True), help="token counts N, comma separated")
    add("--vocab", type=_arg(int, "positive int", many=True), help="vocabulary sizes V, comma separated")
    add("--modes", type=_arg(str, "mode", MODES.__contains__, many=True), default=list(MODES), help="of fwd+bwd, fwd")
    add("--softcap", type=positive_float, help="c: the loss of c·tanh(z / c), as Gemma 2's (default: none)")
    scale = _arg(float, "number >= 0", lambda s: 0 <= s < float("inf"))
    add("--z-loss", type=scale, default=0.0, help="s: plus s·logsumexp(z)² per token (default 0)")
    add("--class-weights", action="store_true", help="random class weights: " + cases.CLASS_WEIGHTS)
    add("--ignore-every", type=int, default=0, help="ignore every k-th target (default: none)")
    add("--warmup-ms", type=positive_float, default=25.0, help="do_bench warm-up per round")
    add("--rep-ms", type=float, help="ms of timed runs per round (default: 100 on GPUs, 0 on CPU: one run)")
    add("--time-limit", type=positive_float, help="start no case after this many seconds")
    add("--no-memory", action="store_true", help="skip the peak-memory measurement")
    add("--no-plots", action="store_true", help="skip the PNG plots")
    add("--seed", type=int, default=0)
    return parser


def _device(text: str | None, parser: argparse.ArgumentParser) -> torch.device:
    try:
        device = default_device() if text is None else torch.device(text)
        torch.empty(0, device=device)  # raises where this device is not present
    except Exception as error:
        parser.error(f"--device {text!r} cannot be used here: {str(error).strip().splitlines()[0]}")
    return device


def _results_folder(device: torch.device) -> Path:
    """benchmarks/results/ "cpu", or the type and card name, e.g. "cuda-NVIDIA-H100-80GB-HBM3"."""
    card = re.sub(r"[^A-Za-z0-9.]+", "-", machine.device_name(device)).strip("-")
    return Path("benchmarks", "results", "cpu" if device.type == "cpu" else f"{device.type}-{card}")


def _check_impls(parser, names, why_not) -> None:
    for name in names or []:
        if (why := why_not(name)) is not None:
            parser.error(f"implementation {name!r} cannot run here: {why}")


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[runner.Settings, Path]:
    """The run's settings and its output folder; a bad combination of options stops with parser.error."""
    device = _device(args.device, parser)
    on_cpu, targets = device.type == "cpu", args.preset == "gpu-targets"
    custom = bool(args.shapes or args.tokens or args.vocab)
    if args.shapes and (args.tokens or args.vocab):
        parser.error("give either --shapes or --tokens/--vocab, not both")
    if targets and custom:
        parser.error("--preset gpu-targets runs fixed shapes: leave out --shapes/--tokens/--vocab")
    sizes = PRESETS.get(args.preset, PRESETS["default"])
    shapes = args.shapes or [(n, v) for n in args.tokens or sizes[not on_cpu] for v in args.vocab or sizes[2]]
    case_list = cases.grid(shapes, args.dtypes or ["fp32", "bf16"], args.modes, args.label_smoothing)
    case_list = gpu_target_cases() if targets else case_list
    options = {"softcap": args.softcap, "z_loss": args.z_loss, "class_weights": args.class_weights}
    tiny = lambda c: {"n": max(2, c.n // 256), "v": max(2, c.v // 256)} if args.tiny else {}
    case_list = [dataclasses.replace(c, **options, **tiny(c)) for c in case_list]
    why_not = {}  # per implementation: None where it can run one of the cases, else why not
    for name in args.impls or IMPLEMENTATIONS:
        reasons = [IMPLEMENTATIONS[name].unavailable_reason(device.type, case.option_names) for case in case_list]
        why_not[name] = None if None in reasons else reasons[0]
    _check_impls(parser, args.impls, why_not.get)
    # The results folder: the preset's ("" for the default), "-tiny", then the loss's options, if any.
    preset = ("custom" if custom else args.preset) + (" (tiny)" if args.tiny else "")
    slug = re.sub(r"[^\w.]+", "-", report.options_text(options))
    folder = "-".join(filter(None, ("" if preset == "default" else preset.replace(" (tiny)", "-tiny"), slug)))
    # a line in the report for an optional library only where it could have run
    optional = {n for n, i in IMPLEMENTATIONS.items() if i.module and device.type in (i.device_types or (device.type,))}
    settings = runner.Settings(
        device=device,
        cases=case_list,
        impls=[name for name, why in why_not.items() if why is None],
        rounds=args.rounds or (3 if targets else sizes[3 if on_cpu else 4]),
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms if args.rep_ms is not None else (0.0 if on_cpu else 100.0),
        ignore_every=10 if targets else args.ignore_every,
        memory=not args.no_memory,
        seed=args.seed,
        threads=args.threads or torch.get_num_threads(),
        time_limit_s=args.time_limit or (165.0 if targets else None),
        preset=preset + (f" ({slug})" if slug else ""),
        skipped_impls={name: why for name, why in why_not.items() if why is not None and name in optional},
    )
    return settings, args.out or _results_folder(device) / folder


def main(argv: list[str] | None = None) -> int:
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--op", choices=["cross_entropy", "linear"], default="cross_entropy")
    parser = build_parser(chooser.parse_known_args(argv)[0].op)
    args = parser.parse_args(argv)
    if args.op == "linear":
        device = _device(args.device, parser)
        _check_impls(parser, args.impls, lambda name: linear.unavailable_reason(name, device, args.label_smoothing))
        print(linear.markdown(linear.main(args, device, args.out or _results_folder(device) / "linear")))
        return 0
    settings, out = settings_from_args(args, parser)
    out.mkdir(parents=True, exist_ok=True)
    record = runner.run(settings, checkpoint=lambda partial: report.write(partial, out, []))
    pngs = [] if args.no_plots else report.write_plots(record, out)
    written = report.write(record, out, pngs) + [out / name for name in pngs]
    print("\n".join(report.summary_lines(record)))
    print("\nwrote " + ", ".join(str(path) for path in written))
    return 0
