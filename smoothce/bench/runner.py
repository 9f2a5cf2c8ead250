"""The cross-entropy sweep: every implementation's loss checked against float64, timed in interleaved rounds with
the case's limit, its peak memory measured; cases too big for free memory or past ``time_limit_s`` marked skipped."""

from __future__ import annotations

import gc
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.benchmark.utils.common import set_torch_threads

from smoothce.bench import cases, machine, measure, report
from smoothce.bench.cases import IGNORE_INDEX, Case
from smoothce.bench.impls import FWD_BWD, IMPLEMENTATIONS, Step
from smoothce.bench.measure import Limit, Timer, describe_error, summarize, time_rounds

SCHEMA = 3  # 3: the loss options in every case, settings as Settings names them
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}
LIMIT = "limit"  # the name the limit is timed under, next to the implementations


@dataclass
class Settings:
    """Everything that decides what is measured and how."""

    device: torch.device
    cases: list[Case]
    impls: list[str]
    rounds: int = 3
    warmup_ms: float = 25.0  # do_bench's warm-up per round (accelerators)
    rep_ms: float = 100.0  # timed runs per round, in ms of run time
    ignore_every: int = 0  # every k-th target is ignored (0: none)
    memory: bool = True
    seed: int = 0
    threads: int = field(default_factory=torch.get_num_threads)
    time_limit_s: float | None = None  # start no case after this many seconds
    preset: str = "custom"
    skipped_impls: dict[str, str] = field(default_factory=dict)  # name -> why it is not run


def _time_case(settings: Settings, case: Case, logits, target, options: dict, reference: float, timer, limits) -> dict:
    """Check, time and measure every implementation of ``case`` (an option it lacks: {"not_supported": why})."""
    steps, errors, losses, results = {}, {}, {}, {}
    for name in [n for n in settings.impls if case.impls is None or n in case.impls]:
        if why := IMPLEMENTATIONS[name].unavailable_reason(settings.device.type, case.option_names):
            results[name] = {"not_supported": why}  # e.g. quack at λ > 0
            continue
        try:
            step = Step(IMPLEMENTATIONS[name], logits, target, case.mode, case.label_smoothing, IGNORE_INDEX, **options)
            step.prepare()
            losses[name] = float(step.run())  # untimed: imports, compilation, the loss check (float() waits for it)
            step.release()
            steps[name] = step
        except Exception as error:
            errors[name] = describe_error(error)
    limit = limits[case.mode]
    times, timing_errors, order = time_rounds({**steps, LIMIT: limit}, timer.measure, settings.rounds)
    errors.update(timing_errors)
    limit_s = summarize(times.pop(LIMIT))["median_s"] if LIMIT in times else None
    for name in [n for n in settings.impls if n in steps or n in errors]:
        entry = results[name] = {}
        if name in times:
            entry.update(summarize(times[name]), times_s=times[name])
            entry["gbps"] = case.bytes_moved / entry["median_s"] / 1e9
            entry["of_limit"] = limit_s / entry["median_s"] if limit_s else None
            error = abs(losses[name] - reference) / max(abs(reference), 1e-12)
            entry.update(loss=losses[name], loss_rel_error=error, loss_ok=error <= LOSS_RTOL[case.dtype])
            if settings.memory:
                try:
                    entry["peak_extra_bytes"] = measure.peak_extra(steps[name], settings.device)
                except Exception as error:
                    entry["memory_error"] = describe_error(error)
        if name in errors:
            entry["error"] = errors[name]
    limit_record = {"kind": limit.kind, "median_s": limit_s, "error": errors.get(LIMIT)}
    return {"results": results, "run_order": [n for n in order if n != LIMIT], "limit": limit_record}


def _record(settings: Settings, environment: dict, done: list[dict]) -> dict:
    """What ``report`` writes: the environment, the settings (and the loss's fixed terms), the cases done."""
    on_cpu, skip = settings.device.type == "cpu", ("device", "cases", "impls", "skipped_impls")
    fixed = {"reduction": "mean", "ignore_index": IGNORE_INDEX, "target_dtype": "int64"}
    fixed["timer"] = "torch.utils.benchmark blocked_autorange" if on_cpu else "triton.testing.do_bench, median"
    method = (measure.CPU_METHOD if on_cpu else measure.ACCELERATOR_METHOD) if settings.memory else None
    fixed.update(memory_method=method, bytes_model=cases.BYTES_MODEL, class_weights=cases.CLASS_WEIGHTS)
    return {
        "schema": SCHEMA,
        "environment": environment,
        "settings": {**{k: v for k, v in vars(settings).items() if k not in skip}, **fixed},
        "implementations": {name: IMPLEMENTATIONS[name].description for name in settings.impls},
        "not_run": dict(settings.skipped_impls),
        "cases": done,
    }


def run(settings: Settings, checkpoint: Callable[[dict], None] = lambda record: None) -> dict:
    """The record of everything ``settings`` asks for; ``checkpoint`` gets it after every shape and dtype."""
    device, done = settings.device, []
    with set_torch_threads(settings.threads):
        environment, timer = machine.describe(device), Timer(device, settings.warmup_ms, settings.rep_ms)
        started = time.perf_counter()
        for (n, v, dtype), group in itertools.groupby(settings.cases, key=lambda c: (c.n, c.v, c.dtype)):
            group = list(group)
            base = [{**asdict(c), "logits_bytes": c.logits_bytes, "bytes_moved": c.bytes_moved} for c in group]
            # GiB: the inputs and the worst case's temporaries (5x the logits plus one float32 copy), and what is free
            need = (5 * group[0].logits_bytes + 4 * n * v) / 2**30
            free = machine.available_memory_bytes(device) / 2**30
            out_of_time = settings.time_limit_s is not None and time.perf_counter() - started > settings.time_limit_s
            if out_of_time or need > free:
                why = "time limit" if out_of_time else f"needs about {need:.1f} GiB, {free:.1f} GiB free"
                done += [{**record, "skipped": f"skipped: {why}", "results": {}} for record in base]
                print(f"[{len(done)}/{len(settings.cases)}] {n}x{v} {dtype}: skipped, {why}", file=sys.stderr)
                continue
            if not done or done[-1]["v"] != v:  # compiled code per vocabulary size: no recompile limit in the sweep
                torch.compiler.reset()
            logits, target = cases.make_inputs(n, v, dtype, device, settings.seed, settings.ignore_every)
            weight = cases.class_weights(v, dtype, device, settings.seed)
            limits = {mode: Limit(logits, "copy" if mode == FWD_BWD else "read") for mode in {c.mode for c in group}}
            references = {}  # float64 losses by (λ, options): the same for fwd and fwd+bwd
            for i, (case, record) in enumerate(zip(group, base, strict=True), 1):
                options = case.options(weight)
                key = (case.label_smoothing, case.softcap, case.z_loss, case.class_weights)
                if key not in references:
                    references[key] = cases.reference_loss(logits, target, case.label_smoothing, **options)
                record.update(reference_loss=references[key], ignored_rows=int((target == IGNORE_INDEX).sum()))
                record.update(_time_case(settings, case, logits, target, options, references[key], timer, limits))
                ran = {name: e for name, e in record["results"].items() if "not_supported" not in e}
                cells = [f"{name} {report.cell(e)} ({report.cell(e, 'of_limit')})" for name, e in ran.items()]
                progress = f"[{len(done) + i}/{len(settings.cases)} {time.perf_counter() - started:.0f} s]"
                print(f"{progress} {report.label(record)}: {', '.join(cells)}", file=sys.stderr, flush=True)
            del logits, target, weight, limits
            gc.collect()
            if device.type != "cpu":
                getattr(torch, device.type).empty_cache()
            done += [{**record, "ratios": report.ratios(record)} for record in base]
            checkpoint(_record(settings, environment, done))
    environment["load_average_at_end"] = os.getloadavg()[0]
    return _record(settings, environment, done)
