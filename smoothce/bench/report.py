"""Writing a sweep's record: results.json (raw numbers), results.md (tables), summary.md, PNG plots.

Ratios compare smoothce with each baseline of the same run: speed-up = baseline time / smoothce's; memory
saving = baseline peak beyond the logits / smoothce's (peaks under 1 MiB count as 1 MiB, so a saving may be
a bound, "≥" or "≤"); of limit = the case's limit time / the implementation's. Above 1: smoothce is better.
"""

from __future__ import annotations

import json
from pathlib import Path

from smoothce.bench.impls import BASELINE_FOR_RATIOS as OURS

MIB = 1 << 20  # also the resolution of the memory measurement: smaller peaks count as 1 MiB
DEFAULT_LABEL_SMOOTHING = 0.1
RATIO_KEYS = ("speedup", "memory_saving")
HOST_BOUND_S = 10e-6  # a limit this short on an accelerator: the device waits for the host's launches


def plot_name(mode: str, dtype: str, label_smoothing: float = DEFAULT_LABEL_SMOOTHING) -> str:
    """The PNG of one (mode, dtype, λ): "fwd_bwd-bf16.png", "fwd-fp32-ls0.png"."""
    suffix = "" if label_smoothing == DEFAULT_LABEL_SMOOTHING else f"-ls{label_smoothing:g}"
    return f"{mode.replace('+', '_')}-{dtype}{suffix}.png"


def groups(record: dict) -> dict[tuple[str, str, float], list[dict]]:
    """The record's cases by (mode, dtype, λ), in order of appearance: one table and one plot each."""
    out: dict[tuple[str, str, float], list[dict]] = {}
    for case in record["cases"]:
        out.setdefault((case["mode"], case["dtype"], case["label_smoothing"]), []).append(case)
    return out


def ratios(case: dict) -> dict:
    """Speed-up and memory saving of smoothce against every other implementation of ``case``."""
    ours, out = case["results"].get(OURS, {}), {}
    for name, entry in case["results"].items():
        ratio: dict = {"speedup": None, "memory_saving": None, "memory_saving_bound": None}
        if "median_s" in ours and "median_s" in entry:
            ratio["speedup"] = entry["median_s"] / ours["median_s"]
        mine, theirs = ours.get("peak_extra_bytes"), entry.get("peak_extra_bytes")
        if mine is not None and theirs is not None and max(mine, theirs) >= MIB:  # none when both are below
            ratio["memory_saving"] = max(theirs, MIB) / max(mine, MIB)
            ratio["memory_saving_bound"] = "lower" if mine < MIB else "upper" if theirs < MIB else None
        if name != OURS:
            out[name] = ratio
    return out


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
    return f"{_time(entry['median_s'])} ±{spread:.0%}" + ("" if entry.get("loss_ok", True) else " ⚠")


def _ratios(case: dict, baselines: list[str], key: str) -> list[str]:
    """The ``key`` ratio against each baseline: three significant digits, trailing zeros kept (3.00×, 0.640×)."""
    cells = []
    for ratio in (case.get("ratios", {}).get(b, {}) for b in baselines):
        bound = {"lower": "≥ ", "upper": "≤ ", None: ""}[ratio.get(key + "_bound")]
        cells.append("—" if ratio.get(key) is None else bound + f"{ratio[key]:#.3g}".rstrip(".") + "×")
    return cells


def _of_limit(entry: dict) -> str:
    return f"{entry['of_limit']:.2f}" if entry.get("of_limit") else "—"


def _memory_cell(entry: dict, logits_bytes: int) -> str:
    if "peak_extra_bytes" not in entry:
        return "error" if "memory_error" in entry or "error" in entry else "—"
    peak = entry["peak_extra_bytes"]
    return (f"{peak / MIB:.0f}" if peak >= 100 * MIB else f"{peak / MIB:.3g}") + f" MiB ({peak / logits_bytes:.2f}×)"


def _label(case: dict) -> str:
    return f"{case['mode']} {case['dtype']} {case['n']} × {case['v']} λ={case['label_smoothing']:g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _names(record: dict) -> tuple[list[str], list[str]]:
    """The implementations, and the baselines smoothce is compared with (none without smoothce)."""
    names = list(record["implementations"])
    return names, [n for n in names if n != OURS] if OURS in names else []


def _host_bound(record: dict, case: dict) -> bool:
    limit = case.get("limit", {}).get("median_s")
    return record["environment"]["device_type"] != "cpu" and limit is not None and limit < HOST_BOUND_S


def summary_lines(record: dict) -> list[str]:
    """One table with every case's time, share of the limit, speed-ups and memory savings (for the README)."""
    baselines = _names(record)[1]
    if not baselines:
        return ["(smoothce and at least one baseline are needed for ratios.)"]
    rows = []
    for case in record["cases"]:
        label = _label(case) + (" (host-bound)" if _host_bound(record, case) else "")
        ours, speed, saving = (case["results"].get(OURS, {}), *(_ratios(case, baselines, k) for k in RATIO_KEYS))
        cells = [case["skipped"], *["—"] * (1 + 2 * len(baselines))] if case.get("skipped") else None
        rows.append([label, *(cells or [_time_cell(ours), _of_limit(ours), *speed, *saving])])
    header = ["case", "smoothce time", "of limit", *(f"speed-up vs {b}" for b in baselines)]
    return _table(header + [f"memory saving vs {b}" for b in baselines], rows)


def _header(record: dict) -> list[str]:
    env, settings = record["environment"], record["settings"]
    memory_gib = f", {env['device_memory_bytes'] / 2**30:.0f} GiB" if env.get("device_memory_bytes") else ""
    machine = f"{env['device_name']}{memory_gib}" + (f"; host CPU {env['cpu']}" if env["device_type"] != "cpu" else "")
    machine += f"; {env['logical_cores']} logical cores, {settings['threads']} torch threads; {env['platform']}"
    backend = env["smoothce_backend"] + (" (set by SMOOTHCE_BACKEND)" if env.get("smoothce_backend_env") else "")
    timer = (
        f"`torch.utils.benchmark.Timer.blocked_autorange` (one untimed warm-up run, then runs for "
        f"{settings['rep_ms']:g} ms, at least one; their mean)"
        if settings["warmup_ms"] is None
        else f"`triton.testing.do_bench` (runs between device events, L2 flushed before each; "
        f"{settings['warmup_ms']:g} ms warm-up, {settings['rep_ms']:g} ms of runs, median)"
    )
    ignored = f"every {settings['ignore_every']}th target ignored" if settings["ignore_every"] else "no ignored rows"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    load = env.get("load_average_at_start")
    return [
        f"Measured {env['date']} on **{machine}**.",
        "",
        f"Versions: {versions}; smoothce commit {env.get('commit')}. smoothce backend: `{backend}`."
        + (
            ""
            if load is None
            else f" Load average (1 minute): {load:.2f} at the start, "
            f"{env.get('load_average_at_end') or 0:.2f} at the end (above the core count: other work competed)."
        ),
        "",
        f'Loss: reduction="mean", int64 targets, {ignored}, logits ~ N(0, 1) (seed {settings["seed"]}); λ per '
        f"table. Each implementation runs once untimed (compilation happens there, and its loss is checked), then "
        f"{settings['rounds']} rounds each time every implementation once, in a rotating order; one round's "
        f"number: {timer}. Times are medians over rounds, ± half their interquartile range.",
        "",
        "Implementations:",
        "",
        *(f"- **{name}**: {text}" for name, text in record["implementations"].items()),
        *(f"- not run: **{name}**, {why}" for name, why in record.get("not_run", {}).items()),
    ]


def markdown(record: dict, plots: list[str]) -> str:
    env, settings = record["environment"], record["settings"]
    names, baselines = _names(record)
    lines = [f"# smoothce benchmark: {env['device_name']} ({env['device_type']})", "", *_header(record)]
    lines += ["", "## Summary", "", *summary_lines(record)]
    for (mode, dtype, lam), cases in groups(record).items():
        kind, done = ("copy" if mode == "fwd+bwd" else "read"), [c for c in cases if not c.get("skipped")]
        time_rows = [[f"{c['n']} × {c['v']}", c["skipped"]] for c in cases if c.get("skipped")]
        for case in done:
            results, limit = case["results"], case["limit"]["median_s"]
            time_rows.append([f"{case['n']} × {case['v']}", _time(limit) if limit else "—"])
            time_rows[-1] += [_time_cell(results.get(n, {})) for n in names] + _ratios(case, baselines, "speedup")
        lines += ["", f"## {mode}, {dtype}, λ = {lam:g}", "", "Time per call and smoothce's speed-up:", ""]
        lines += _table(["N × V", f"{kind} limit", *names] + [f"speed-up vs {b}" for b in baselines], time_rows)
        cell = lambda r: f"{_of_limit(r)} ({r['gbps']:.1f} GB/s)" if "gbps" in r else "—"
        limit_rows = [[f"{c['n']} × {c['v']}", *(cell(c["results"].get(n, {})) for n in names)] for c in done]
        lines += ["", f"Share of the {kind} limit (limit time / time) and effective bandwidth, bytes = "]
        lines[-1] += settings["bytes_model"][mode] + ":"
        lines += ["", *_table(["N × V", *names], limit_rows)] if done else []
        if settings["memory_measured"] and done:
            mem_rows = [[f"{c['n']} × {c['v']}", f"{c['logits_bytes'] / MIB:.3g} MiB"] for c in done]
            for row, c in zip(mem_rows, done, strict=True):
                row += [_memory_cell(c["results"].get(n, {}), c["logits_bytes"]) for n in names]
                row += _ratios(c, baselines, "memory_saving")
            lines += ["", "Peak memory beyond the logits (in brackets: as a multiple of the logits' size):", ""]
            lines += _table(["N × V", "logits", *names] + [f"memory saving vs {b}" for b in baselines], mem_rows)
        if plot_name(mode, dtype, lam) in plots:
            lines += ["", f"![time and memory against V, {mode} {dtype} λ={lam:g}]({plot_name(mode, dtype, lam)})"]
    return "\n".join([*lines, "", "## Notes", "", *_notes(record)]) + "\n"


def _notes(record: dict) -> list[str]:
    settings = record["settings"]
    notes = [
        "- Limits, timed in the same rounds: copy = `out.copy_(logits)` (the least any forward+backward moves), "
        "read = `torch.amax(logits)` (the least any forward moves). Effective bandwidth counts that least traffic; "
        "b = bytes per logit.",
        "- fwd+bwd runs `loss.backward()` on logits that require grad, the previous gradient dropped first "
        "(`grad = None`, as a training step's `zero_grad` does; on GPUs outside the timed events); fwd runs under "
        "`torch.no_grad()`.",
        "- Every implementation's loss is checked against a float64 reference; ⚠ marks a loss off by more than the "
        "dtype's tolerance (fp32 1e-4, bf16 2e-2, fp16 5e-3, relative).",
    ]
    if settings["memory_measured"]:
        notes.append(
            f"- Peak memory beyond the logits: {settings['memory_method']}. For fwd+bwd it includes the "
            "gradient (N·V·b, 1.00× the logits), which every implementation returns."
        )
    host = [_label(c) for c in record["cases"] if _host_bound(record, c)]
    if host:
        notes.append(
            f"- Host-bound rows ({'; '.join(host)}): the limit takes under {HOST_BOUND_S * 1e6:.0f} µs, so "
            "these times are each implementation's launch overhead per call."
        )
    problems = []
    for case in record["cases"]:
        for name, entry in case["results"].items():
            where = f"  - {_label(case)}, {name}: "
            problems += [where + entry[key] for key in ("error", "memory_error") if key in entry]
            if entry.get("loss_ok") is False:
                problems.append(f"{where}loss {entry['loss']:.6g} vs reference {case['reference_loss']:.6g}")
    return notes + (["- Problems:", *problems] if problems else [])


def write(record: dict, directory: Path, plots: list[str]) -> list[Path]:
    """results.md (everything), summary.md (the README's table) and results.json (raw numbers); their paths."""
    results, summary, raw = directory / "results.md", directory / "summary.md", directory / "results.json"
    results.write_text(markdown(record, plots))
    env = record["environment"]
    summary.write_text(f"{env['device_name']} ({env['device_type']}), {env['date']}; details in results.md.\n\n")
    with summary.open("a") as file:
        file.write("\n".join(summary_lines(record)) + "\n")
    raw.write_text(json.dumps(record, indent=1) + "\n")
    return [results, summary, raw]


def write_plots(record: dict, directory: Path) -> tuple[list[str], str | None]:
    """PNGs of time (top row) and peak memory beyond the logits (below) against V, one line per implementation,
    one figure per (mode, dtype, λ), one column per N. Returns the names written, or why none could be."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'smoothce[bench]'), so no plots were drawn"
    metrics = [("median_s", 1e3, "time per call (ms)")]
    if record["settings"]["memory_measured"]:
        metrics.append(("peak_extra_bytes", 1 / MIB, "peak memory beyond logits (MiB)"))
    written = []
    for (mode, dtype, lam), cases in groups(record).items():
        tokens = sorted({c["n"] for c in cases})
        fig, axes = plt.subplots(
            len(metrics), len(tokens), figsize=(4.2 * len(tokens) + 0.8, 3.4 * len(metrics)), squeeze=False
        )
        for col, n in enumerate(tokens):
            row_cases = sorted((c for c in cases if c["n"] == n), key=lambda c: c["v"])
            vocab = sorted({c["v"] for c in row_cases})
            for ax, (key, scale, ylabel) in zip(axes[:, col], metrics, strict=True):
                for name in record["implementations"]:
                    points = [
                        (c["v"], c["results"][name][key] * scale)
                        for c in row_cases
                        if key in c["results"].get(name, {})
                    ]
                    if points:
                        ax.plot(*zip(*points, strict=False), marker="o", label=name)
                ax.set(xlabel="vocabulary size V", ylabel=ylabel, ylim=(0, None), xscale="log")
                ax.set_xticks(vocab, [str(v) for v in vocab], rotation=30, fontsize=7)
                ax.minorticks_off()
                ax.grid(alpha=0.3)
            axes[0][col].set_title(f"{mode}, {dtype}, λ = {lam:g}, N = {n}")
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        fig.suptitle(f"{record['environment']['device_name']}, {record['environment']['date']}", fontsize=9)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
        fig.savefig(directory / plot_name(mode, dtype, lam), dpi=110)
        plt.close(fig)
        written.append(plot_name(mode, dtype, lam))
    return written, None
