"""Writing a benchmark record out: results.json (raw numbers), results.md (tables), summary.md.

Ratios always compare smoothce with each baseline measured in the same run:

    speed-up        = baseline median time / smoothce median time
    memory saving   = baseline peak memory beyond the logits / smoothce's

Above 1 means smoothce is faster, or needs less memory. Peaks under 1 MiB are below
what the measurement resolves and count as 1 MiB: a saving is then a bound ("≥" when
smoothce's peak is that small, "≤" when the baseline's is), and none is given when both are.
"""

from __future__ import annotations

import json
from pathlib import Path

from smoothce.bench.impls import BASELINE_FOR_RATIOS

MIB = 1 << 20
MEMORY_FLOOR = MIB


def plot_name(mode: str, dtype: str) -> str:
    """The PNG of one (mode, dtype): "fwd_bwd-bf16.png", "fwd-fp32.png"."""
    return f"{mode.replace('+', '_')}-{dtype}.png"


def ratios(case: dict) -> dict:
    """Speed-up and memory saving of smoothce against every other implementation of ``case``."""
    results = case["results"]
    ours = results.get(BASELINE_FOR_RATIOS, {})
    out = {}
    for name, entry in results.items():
        if name == BASELINE_FOR_RATIOS:
            continue
        ratio: dict = {"speedup": None, "memory_saving": None, "memory_saving_bound": None}
        if "median_s" in ours and "median_s" in entry:
            ratio["speedup"] = entry["median_s"] / ours["median_s"]
        if "peak_extra_bytes" in ours and "peak_extra_bytes" in entry:
            theirs, mine = entry["peak_extra_bytes"], ours["peak_extra_bytes"]
            if mine >= MEMORY_FLOOR and theirs >= MEMORY_FLOOR:
                ratio["memory_saving"] = theirs / mine
            elif theirs >= MEMORY_FLOOR:  # ours is below resolution: the saving is at least this
                ratio["memory_saving"], ratio["memory_saving_bound"] = theirs / MEMORY_FLOOR, "lower"
            elif mine >= MEMORY_FLOOR:  # theirs is below resolution: the saving is at most this
                ratio["memory_saving"], ratio["memory_saving_bound"] = MEMORY_FLOOR / mine, "upper"
        out[name] = ratio
    return out


def write_json(record: dict, path: Path) -> None:
    path.write_text(json.dumps(record, indent=1) + "\n")


# -- formatting ---------------------------------------------------------------------------


def _time(seconds: float) -> str:
    """Three significant digits in s, ms or µs, whichever keeps the number in [1, 1000)."""
    for unit, scale in (("s", 1.0), ("ms", 1e3)):
        digits = f"{seconds * scale:#.3g}".rstrip(".")
        if float(digits) >= 1.0:
            return f"{digits} {unit}"
    return f"{seconds * 1e6:#.3g}".rstrip(".") + " µs"


def _time_cell(entry: dict) -> str:
    if "median_s" not in entry:
        return "error" if "error" in entry else "—"
    spread = (entry["q3_s"] - entry["q1_s"]) / 2 / entry["median_s"]
    flag = "" if entry.get("loss_ok", True) else " ⚠"
    return f"{_time(entry['median_s'])} ±{spread:.0%}{flag}"


def _ratio(value: float | None, bound: str | None = None) -> str:
    if value is None:
        return "—"
    digits = f"{value:#.3g}".rstrip(".")  # three significant digits, trailing zeros kept: 3.00, 0.640
    return {"lower": "≥ ", "upper": "≤ ", None: ""}[bound] + digits + "×"


def _saving(ratio: dict) -> str:
    return _ratio(ratio.get("memory_saving"), ratio.get("memory_saving_bound"))


def _mib(nbytes: float) -> str:
    mib = nbytes / MIB
    return f"{mib:.0f} MiB" if mib >= 100 else f"{mib:.3g} MiB"


def _memory_cell(entry: dict, logits_bytes: int) -> str:
    if "peak_extra_bytes" not in entry:
        return "error" if "memory_error" in entry or "error" in entry else "—"
    extra = entry["peak_extra_bytes"]
    return f"{_mib(extra)} ({extra / logits_bytes:.2f}×)"


def _shape(case: dict) -> str:
    return f"{case['n']} × {case['v']}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _impl_names(record: dict) -> tuple[list[str], list[str]]:
    names = list(record["implementations"])
    baselines = [n for n in names if n != BASELINE_FOR_RATIOS] if BASELINE_FOR_RATIOS in names else []
    return names, baselines


def _groups(record: dict) -> list[tuple[str, str, list[dict]]]:
    order: list[tuple[str, str]] = []
    for case in record["cases"]:
        key = (case["mode"], case["dtype"])
        if key not in order:
            order.append(key)
    return [(m, d, [c for c in record["cases"] if (c["mode"], c["dtype"]) == (m, d)]) for m, d in order]


# -- the documents ------------------------------------------------------------------------


def _header(record: dict) -> list[str]:
    env, settings = record["environment"], record["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    memory_gib = f", {env['device_memory_bytes'] / 2**30:.0f} GiB" if env.get("device_memory_bytes") else ""
    machine = f"{env['device_name']}{memory_gib}"
    if env["device_type"] != "cpu":
        machine += f"; host CPU {env['cpu']}"
    machine += f"; {env['logical_cores']} logical cores, {settings['threads']} torch threads; {env['platform']}"
    backend = env["smoothce_backend"] + (" (set by SMOOTHCE_BACKEND)" if env.get("smoothce_backend_env") else "")
    lines = [
        f"Measured {env['date']} on **{machine}**.",
        "",
        f"Versions: {versions}" + (f"; smoothce commit {env['commit']}" if env.get("commit") else "") + ".",
        f"smoothce backend: `{backend}`.",
    ]
    if env.get("load_average_at_start") is not None:
        lines.append(
            f"Load average (1 minute): {env['load_average_at_start']:.2f} at the start, "
            f"{env.get('load_average_at_end') or 0:.2f} at the end; above the core count, other work "
            "competed for the machine and the times are noisy."
        )
    lines += [
        "",
        f'Loss: label_smoothing={settings["label_smoothing"]}, reduction="mean", int64 targets, no '
        f"ignored rows, logits ~ N(0, 1) (seed {settings['seed']}). Each implementation is warmed up "
        f"(at least {settings['warmup']} run(s) and {settings['warmup_s']:g} s; compilation happens there), "
        f"then the implementations run interleaved, up to {settings['reps']} repetitions (at least "
        f"{settings['min_reps']}, fewer once {settings['budget_s']:g} s are spent on a case). "
        "Times are medians, ± half the interquartile range.",
        "",
        "Speed-up = baseline time / smoothce time; memory saving = baseline peak memory beyond the "
        "logits / smoothce's. Above 1: smoothce is faster / needs less. All from this one run.",
        "",
        "Implementations:",
        "",
    ]
    lines += [f"- **{name}**: {text}" for name, text in record["implementations"].items()]
    lines += [f"- not run: **{name}**, {why}" for name, why in record.get("not_run", {}).items()]
    return lines


def summary_lines(record: dict) -> list[str]:
    """One table with every case's speed-ups and memory savings (for the README)."""
    names, baselines = _impl_names(record)
    if BASELINE_FOR_RATIOS not in names:
        return ["(smoothce was not among the implementations, so there are no ratios.)"]
    if not baselines:
        return ["(no baseline was among the implementations, so there are no ratios.)"]
    header = ["case", "smoothce time"]
    header += [f"speed-up vs {b}" for b in baselines]
    header += [f"memory saving vs {b}" for b in baselines]
    rows = []
    for case in record["cases"]:
        label = f"{case['mode']} {case['dtype']} {_shape(case)}"
        if case.get("skipped"):
            rows.append([label, case["skipped"]] + ["—"] * (2 * len(baselines)))
            continue
        row = [label, _time_cell(case["results"].get(BASELINE_FOR_RATIOS, {}))]
        ratio = case.get("ratios", {})
        row += [_ratio(ratio.get(b, {}).get("speedup")) for b in baselines]
        row += [_saving(ratio.get(b, {})) for b in baselines]
        rows.append(row)
    return _table(header, rows)


def markdown(record: dict, plots: list[str]) -> str:
    env, settings = record["environment"], record["settings"]
    names, baselines = _impl_names(record)
    copy_gbps = record["copy_bandwidth_gbps"]
    lines = [f"# smoothce benchmark: {env['device_name']} ({env['device_type']})", ""]
    lines += _header(record)
    lines += ["", "## Summary", "", *summary_lines(record)]
    for mode, dtype, cases in _groups(record):
        lines += ["", f"## {mode}, {dtype}", ""]
        time_rows, bw_rows, mem_rows = [], [], []
        for case in cases:
            shape = _shape(case)
            if case.get("skipped"):
                time_rows.append([shape] + [case["skipped"]] + ["—"] * (len(names) + len(baselines) - 1))
                continue
            results, ratio = case["results"], case.get("ratios", {})
            time_rows.append(
                [shape]
                + [_time_cell(results.get(n, {})) for n in names]
                + [_ratio(ratio.get(b, {}).get("speedup")) for b in baselines]
            )
            bw_rows.append(
                [shape]
                + [
                    f"{results[n]['gbps']:.1f} ({results[n]['gbps'] / copy_gbps:.0%})"
                    if "gbps" in results.get(n, {})
                    else "—"
                    for n in names
                ]
            )
            mem_rows.append(
                [shape, _mib(case["logits_bytes"])]
                + [_memory_cell(results.get(n, {}), case["logits_bytes"]) for n in names]
                + [_saving(ratio.get(b, {})) for b in baselines]
            )
        lines += ["Time per call (median ± half the interquartile range) and smoothce's speed-up:", ""]
        lines += _table(["N × V"] + names + [f"speed-up vs {b}" for b in baselines], time_rows)
        if bw_rows:
            lines += [
                "",
                f"Effective bandwidth, GB/s (share of the {copy_gbps:.1f} GB/s copy bandwidth), "
                f"bytes = {settings['bytes_model'][mode]}:",
                "",
            ]
            lines += _table(["N × V", *names], bw_rows)
        if settings["memory_measured"] and mem_rows:
            lines += [
                "",
                "Peak memory beyond the logits (in brackets: as a multiple of the logits' size):",
                "",
            ]
            lines += _table(["N × V", "logits"] + names + [f"memory saving vs {b}" for b in baselines], mem_rows)
        plot = plot_name(mode, dtype)
        if plot in plots:
            lines += ["", f"![time and memory against V, {mode} {dtype}]({plot})"]
    lines += ["", "## Notes", "", *_notes(record)]
    return "\n".join(lines) + "\n"


def _notes(record: dict) -> list[str]:
    settings = record["settings"]
    notes = [
        f"- Copy bandwidth: `dst.copy_(src)` of a {record['copy_bytes'] >> 20} MiB buffer on the same device "
        f"in the same run, 2 bytes moved per byte copied (read + write), median of 10: "
        f"{record['copy_bandwidth_gbps']:.1f} GB/s.",
        "- Effective bandwidth counts the least traffic any implementation needs: "
        + "; ".join(f"{mode}: {text}" for mode, text in settings["bytes_model"].items())
        + "; b = bytes per logit. fwd+bwd runs `loss.backward()` on logits that require grad, with "
        "the previous gradient freed before each run, so each timed run allocates its gradient; "
        "fwd runs under `torch.no_grad()`.",
    ]
    if settings["memory_measured"]:
        notes.append(
            f"- Peak memory beyond the logits: {settings['memory_method']}. For fwd+bwd it includes "
            "the gradient (N·V·b, 1.00× the logits), which every implementation returns."
        )
    notes.append(
        "- Every implementation's loss is checked against a float64 reference; ⚠ marks a loss off by more "
        "than the dtype's tolerance (fp32 1e-4, bf16 2e-2, fp16 5e-3, relative)."
    )
    problems = []
    for case in record["cases"]:
        for name, entry in case["results"].items():
            for key in ("error", "memory_error"):
                if key in entry:
                    problems.append(f"  - {case['mode']} {case['dtype']} {_shape(case)}, {name}: {entry[key]}")
            if entry.get("loss_ok") is False:
                problems.append(
                    f"  - {case['mode']} {case['dtype']} {_shape(case)}, {name}: loss {entry['loss']:.6g} vs "
                    f"reference {case['reference_loss']:.6g} (relative error {entry['loss_rel_error']:.1e})"
                )
    if problems:
        notes += ["- Problems:", *problems]
    return notes


def write_markdown(record: dict, directory: Path, plots: list[str]) -> list[Path]:
    """results.md (everything) and summary.md (the README's table); returns their paths."""
    results = directory / "results.md"
    results.write_text(markdown(record, plots))
    env = record["environment"]
    summary = directory / "summary.md"
    summary.write_text(
        "\n".join(
            [
                f"{env['device_name']} ({env['device_type']}), {env['date']}; details in results.md.",
                "",
                *summary_lines(record),
            ]
        )
        + "\n"
    )
    return [results, summary]
