"""The sweep: for every shape, dtype and mode, time all implementations in one interleaved
loop and measure their peak memory, with a progress bar; returns one record (see report).

Per (shape, dtype) the logits are made once and shared by the modes and implementations.
Every implementation's loss from its first warm-up run is compared with a float64
reference, so a table never compares implementations that compute different things.
Shapes whose inputs and worst-case temporaries would not fit in the memory free at
that moment (5x the logits plus one float32 copy) are skipped and marked so.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import asdict, dataclass, field

import torch

from smoothce.bench import machine, memory, report
from smoothce.bench.cases import BYTES_MODEL, Case, make_inputs, reference_loss
from smoothce.bench.impls import IMPLEMENTATIONS, Step
from smoothce.bench.timing import Timer, copy_bandwidth, summarize, time_interleaved

SCHEMA = 1
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


@dataclass
class Settings:
    """Everything that decides what is measured and how."""

    device: torch.device
    shapes: list[tuple[int, int]]
    dtypes: list[str]
    modes: list[str]
    impls: list[str]
    label_smoothing: float = 0.1
    warmup: int = 1
    warmup_s: float = 0.2  # keep warming up small cases until this much time has passed
    reps: int = 5
    min_reps: int = 3
    budget_s: float = 10.0  # per case, for the timed repetitions
    memory: bool = True
    seed: int = 0
    threads: int = field(default_factory=torch.get_num_threads)
    copy_bytes: int = 256 << 20
    preset: str = "custom"
    skipped_impls: dict[str, str] = field(default_factory=dict)  # name -> why it is not run


class Progress:
    """A tqdm bar on stderr, or one printed line per step where tqdm is not installed."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text, refresh=True)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _estimated_need(n: int, v: int, dtype_bytes: int) -> int:
    return 5 * n * v * dtype_bytes + 4 * n * v


def _time_case(settings: Settings, case: Case, logits, target, reference: float, timer: Timer) -> dict:
    """Time every implementation on ``case``; on accelerators also measure its memory."""
    torch.compiler.reset()  # a fresh compile per case, and no recompile limit across the sweep
    steps, errors = {}, {}
    for name in settings.impls:
        try:
            steps[name] = Step(IMPLEMENTATIONS[name], logits, target, case.mode, settings.label_smoothing)
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"[:300]
    losses: dict[str, float] = {}
    times, timing_errors, order = time_interleaved(
        steps,
        timer,
        warmup=settings.warmup,
        warmup_s=settings.warmup_s,
        reps=settings.reps,
        min_reps=settings.min_reps,
        budget_s=settings.budget_s,
        on_loss=lambda name, loss: losses.__setitem__(name, float(loss)),
    )
    errors.update(timing_errors)
    results = {}
    for name in settings.impls:
        entry: dict = {}
        if name in times:
            entry.update(summarize(times[name]))
            entry["times_s"] = times[name]
            entry["gbps"] = case.bytes_moved / entry["median_s"] / 1e9
            error = abs(losses[name] - reference) / max(abs(reference), 1e-12)
            entry["loss"] = losses[name]
            entry["loss_rel_error"] = error
            entry["loss_ok"] = error <= LOSS_RTOL[case.dtype]
            if settings.memory and settings.device.type != "cpu":
                try:
                    entry["peak_extra_bytes"] = memory.accelerator_peak_extra(steps[name], settings.device)
                except Exception as error:
                    entry["memory_error"] = f"{type(error).__name__}: {error}"[:300]
        if name in errors:
            entry["error"] = errors[name]
        results[name] = entry
    for step in steps.values():
        step.close()
    return {"results": results, "run_order": order, "reference_loss": reference}


def _probe_cpu_memory(settings: Settings, group: list[Case], records: list[dict], progress) -> None:
    """Peak memory of each implementation that timed fine: one fresh process per implementation
    for all modes of this shape and dtype (one per mode where the peak RSS cannot be reset)."""
    one_process = memory.reset_peak_rss()
    case = group[0]
    for name in settings.impls:
        progress.describe(f"memory {name} {case.n}x{case.v} {case.dtype}")
        modes = [r["mode"] for r in records if "median_s" in r["results"][name]]
        batches = [modes] if one_process else [[mode] for mode in modes]
        for batch in filter(None, batches):
            answers = memory.probe_in_fresh_process(
                name,
                case.n,
                case.v,
                case.dtype,
                batch,
                settings.label_smoothing,
                settings.threads,
                settings.seed,
            )
            for record in records:
                answer = answers.get(record["mode"])
                if answer is None:
                    continue
                entry = record["results"][name]
                if "error" in answer:
                    entry["memory_error"] = answer["error"]
                else:
                    entry["peak_extra_bytes"] = answer["peak_extra_bytes"]
                    entry["memory_method"] = answer["method"]
        progress.advance()


def _case_record(case: Case) -> dict:
    record = asdict(case)
    record.update(logits_bytes=case.logits_bytes, bytes_moved=case.bytes_moved)
    return record


def run(settings: Settings, show_progress: bool = True) -> dict:
    """Measure everything ``settings`` asks for; the record that report writes out.

    Runs with ``settings.threads`` torch threads and restores the caller's count after.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _run(settings, show_progress)
    finally:
        torch.set_num_threads(threads_before)


def _run(settings: Settings, show_progress: bool) -> dict:
    device = settings.device
    environment = machine.describe(device)
    on_cpu = device.type == "cpu"
    # Progress steps per (shape, dtype): one per mode timed, one per CPU memory process.
    group_units = len(settings.modes) + (len(settings.impls) if settings.memory and on_cpu else 0)
    total = len(settings.shapes) * len(settings.dtypes) * group_units
    progress = Progress(total + 1, enabled=show_progress)
    progress.describe("copy bandwidth")
    copy_bps = copy_bandwidth(device, settings.copy_bytes)
    progress.advance()
    timer = Timer(device)
    cases: list[dict] = []
    try:
        for n, v in settings.shapes:
            for dtype in settings.dtypes:
                group = [Case(n, v, dtype, mode) for mode in settings.modes]
                need = _estimated_need(n, v, group[0].torch_dtype.itemsize)
                free = machine.available_memory_bytes(device)
                if free is not None and need > free:
                    reason = f"skipped: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
                    for case in group:
                        cases.append({**_case_record(case), "skipped": reason, "results": {}})
                    for _ in range(group_units):
                        progress.advance()
                    continue
                logits, target = make_inputs(n, v, dtype, device, settings.seed)
                reference = reference_loss(logits, target, settings.label_smoothing)
                records = []
                for case in group:
                    progress.describe(f"time {case.label}")
                    record = {
                        **_case_record(case),
                        **_time_case(settings, case, logits, target, reference, timer),
                    }
                    records.append(record)
                    progress.advance()
                del logits, target
                gc.collect()
                if not on_cpu:
                    getattr(torch, device.type).empty_cache()
                if on_cpu and settings.memory:
                    _probe_cpu_memory(settings, group, records, progress)
                for record in records:
                    record["ratios"] = report.ratios(record)
                cases.extend(records)
    finally:
        timer.close()
        progress.close()
    environment["load_average_at_end"] = machine.load_average()
    if on_cpu:
        memory_method = memory.CPU_METHOD
        methods = {e.get("memory_method") for c in cases for e in c["results"].values()} - {None}
        if methods == {memory.CPU_FALLBACK_METHOD}:
            memory_method = memory.CPU_FALLBACK_METHOD
    else:
        memory_method = memory.ACCELERATOR_METHOD
    return {
        "schema": SCHEMA,
        "environment": environment,
        "settings": {
            "preset": settings.preset,
            "label_smoothing": settings.label_smoothing,
            "reduction": "mean",
            "ignore_index": -100,
            "ignored_rows": 0,
            "target_dtype": "int64",
            "warmup": settings.warmup,
            "warmup_s": settings.warmup_s,
            "reps": settings.reps,
            "min_reps": settings.min_reps,
            "budget_s": settings.budget_s,
            "seed": settings.seed,
            "threads": settings.threads,
            "memory_measured": settings.memory,
            "memory_method": memory_method if settings.memory else None,
            "bytes_model": BYTES_MODEL,
        },
        "copy_bandwidth_gbps": copy_bps / 1e9,
        "copy_bytes": settings.copy_bytes,
        "implementations": {name: IMPLEMENTATIONS[name].description for name in settings.impls},
        "not_run": dict(settings.skipped_impls),
        "cases": cases,
    }
