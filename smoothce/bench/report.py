"""Writing a benchmark record out: results.json (raw numbers), results.md (tables), summary.md, PNG plots.

Ratios always compare smoothce with each baseline measured in the same run:

    speed-up        = baseline median time / smoothce median time
    memory saving   = baseline peak memory beyond the logits / smoothce's
    of limit        = the case's limit time / the implementation's time (1.00 = as fast as the limit)

Above 1 means smoothce is faster, or needs less memory. Peaks under 1 MiB are below
what the measurement resolves and count as 1 MiB: a saving is then a bound ("≥" when
smoothce's peak is that small, "≤" when the baseline's is), and none is given when both are.
"""

from __future__ import annotations

import json
from pathlib import Path

from smoothce.bench.impls import BASELINE_FOR_RATIOS as OURS

MIB = 1 << 20  # also the resolution of the memory measurement: smaller peaks count as 1 MiB
DEFAULT_LABEL_SMOOTHING = 0.1
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


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.0f} MiB" if nbytes >= 100 * MIB else f"{nbytes / MIB:.3g} MiB"


def _memory_cell(entry: dict, logits_bytes: int) -> str:
    if "peak_extra_bytes" not in entry:
        return "error" if "memory_error" in entry or "error" in entry else "—"
    return f"{_mib(entry['peak_extra_bytes'])} ({entry['peak_extra_bytes'] / logits_bytes:.2f}×)"


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
        if case.get("skipped"):
            rows.append([label, case["skipped"]] + ["—"] * (1 + 2 * len(baselines)))
        else:
            ours = case["results"].get(OURS, {})
            rows.append([label, _time_cell(ours), _of_limit(ours), *_ratios(case, baselines, "speedup"),
                         *_ratios(case, baselines, "memory_saving")])  # fmt: skip
    header = ["case", "smoothce time", "of limit", *(f"speed-up vs {b}" for b in baselines)]
    return _table(header + [f"memory saving vs {b}" for b in baselines], rows)


def _header(record: dict) -> list[str]:
    env, settings = record["environment"], record["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    memory_gib = f", {env['device_memory_bytes'] / 2**30:.0f} GiB" if env.get("device_memory_bytes") else ""
    machine = f"{env['device_name']}{memory_gib}" + (f"; host CPU {env['cpu']}" if env["device_type"] != "cpu" else "")
    machine += f"; {env['logical_cores']} logical cores, {settings['threads']} torch threads; {env['platform']}"
    backend = env["smoothce_backend"] + (" (set by SMOOTHCE_BACKEND)" if env.get("smoothce_backend_env") else "")
    commit = f"; smoothce commit {env['commit']}" if env.get("commit") else ""
    timer = f"`time.perf_counter` around each run, runs repeated for {settings['rep_ms']:g} ms, median"
    if settings["warmup_ms"] is not None:
        timer = (f"`triton.testing.do_bench` (runs back to back between device events, L2 flushed before each; "
                 f"{settings['warmup_ms']:g} ms warm-up, {settings['rep_ms']:g} ms of runs, median)")  # fmt: skip
    ignored = f"every {settings['ignore_every']}th target ignored" if settings["ignore_every"] else "no ignored rows"
    lines = [f"Measured {env['date']} on **{machine}**.", "", f"Versions: {versions}{commit}. smoothce backend: "
             f"`{backend}`."]  # fmt: skip
    if env.get("load_average_at_start") is not None:
        lines.append(f"Load average (1 minute): {env['load_average_at_start']:.2f} at the start, "
                     f"{env.get('load_average_at_end') or 0:.2f} at the end; above the core count, other work "
                     "competed for the machine and the times are noisy.")  # fmt: skip
    lines += [
        "",
        f'Loss: reduction="mean", int64 targets, {ignored}, logits ~ N(0, 1) (seed {settings["seed"]}); '
        "λ (label smoothing) per table. Each implementation runs once untimed (compilation happens there), then "
        f"{settings['rounds']} rounds each time every implementation once, in a rotating order; one round's "
        f"number: {timer}. Times are medians over rounds, ± half their interquartile range.",
        "",
        "Speed-up = baseline time / smoothce time; memory saving = baseline peak memory beyond the "
        "logits / smoothce's; of limit = limit time / implementation time. All from this one run.",
        "",
        "Implementations:",
        "",
        *(f"- **{name}**: {text}" for name, text in record["implementations"].items()),
    ]
    return lines + [f"- not run: **{name}**, {why}" for name, why in record.get("not_run", {}).items()]


def markdown(record: dict, plots: list[str]) -> str:
    env, settings = record["environment"], record["settings"]
    names, baselines = _names(record)
    lines = [f"# smoothce benchmark: {env['device_name']} ({env['device_type']})", "", *_header(record)]
    lines += ["", "## Summary", "", *summary_lines(record)]
    for (mode, dtype, lam), cases in groups(record).items():
        kind = "copy" if mode == "fwd+bwd" else "read"
        time_rows, limit_rows, mem_rows = [], [], []
        for case in cases:
            shape, results = f"{case['n']} × {case['v']}", case["results"]
            if case.get("skipped"):
                time_rows.append([shape, case["skipped"]] + ["—"] * (len(names) + len(baselines)))
                continue
            limit = case["limit"]["median_s"]
            time_rows.append([shape, _time(limit) if limit else "—", *(_time_cell(results.get(n, {})) for n in names),
                              *_ratios(case, baselines, "speedup")])
            limit_rows.append([shape] + [
                f"{_of_limit(results[n])} ({results[n]['gbps']:.1f} GB/s)" if "gbps" in results.get(n, {}) else "—"
                for n in names
            ])
            mem_rows.append([shape, _mib(case["logits_bytes"]),
                             *(_memory_cell(results.get(n, {}), case["logits_bytes"]) for n in names),
                             *_ratios(case, baselines, "memory_saving")])  # fmt: skip
        lines += ["", f"## {mode}, {dtype}, λ = {lam:g}", "",
                  "Time per call (median ± half the interquartile range) and smoothce's speed-up:", ""]
        lines += _table(["N × V", f"{kind} limit", *names] + [f"speed-up vs {b}" for b in baselines], time_rows)
        if limit_rows:
            lines += ["", f"Share of the {kind} limit (limit time / time) and effective bandwidth, bytes = "
                      f"{settings['bytes_model'][mode]}:", "", *_table(["N × V", *names], limit_rows)]
        if settings["memory_measured"] and mem_rows:
            lines += ["", "Peak memory beyond the logits (in brackets: as a multiple of the logits' size):", ""]
            lines += _table(["N × V", "logits"] + names + [f"memory saving vs {b}" for b in baselines], mem_rows)
        if plot_name(mode, dtype, lam) in plots:
            lines += ["", f"![time and memory against V, {mode} {dtype} λ={lam:g}]({plot_name(mode, dtype, lam)})"]
    return "\n".join([*lines, "", "## Notes", "", *_notes(record)]) + "\n"  # fmt: skip


def _notes(record: dict) -> list[str]:
    settings = record["settings"]
    notes = [
        "- Limits, timed in the same rounds as the implementations: copy = `out.copy_(logits)` (reads the logits "
        "once, writes a gradient-sized buffer once: the least any forward+backward moves), read = "
        "`torch.amax(logits)` (one reduction reading every logit once: the least any forward moves).",
        "- Effective bandwidth counts the least traffic any implementation needs: "
        + "; ".join(f"{mode}: {text}" for mode, text in settings["bytes_model"].items())
        + "; b = bytes per logit. fwd+bwd runs `loss.backward()` on logits that require grad, the previous "
        "gradient dropped before each run (untimed), so each timed run allocates its gradient; fwd runs under "
        "`torch.no_grad()`.",
    ]
    host = [_label(c) for c in record["cases"] if _host_bound(record, c)]
    if host:
        notes.append(f"- Host-bound rows ({'; '.join(host)}): the limit takes under {HOST_BOUND_S * 1e6:.0f} µs, so "
                     "the device waits for the host's launches and these times are each implementation's launch "
                     "overhead per call.")  # fmt: skip
    if settings["memory_measured"]:
        notes.append(f"- Peak memory beyond the logits: {settings['memory_method']}. For fwd+bwd it includes "
                     "the gradient (N·V·b, 1.00× the logits), which every implementation returns.")  # fmt: skip
    notes.append("- Every implementation's loss is checked against a float64 reference; ⚠ marks a loss off by more "
                 "than the dtype's tolerance (fp32 1e-4, bf16 2e-2, fp16 5e-3, relative).")  # fmt: skip
    problems = []
    for case in record["cases"]:
        for name, entry in case["results"].items():
            where = f"  - {_label(case)}, {name}: "
            problems += [where + entry[key] for key in ("error", "memory_error") if key in entry]
            if entry.get("loss_ok") is False:
                problems.append(f"{where}loss {entry['loss']:.6g} vs reference {case['reference_loss']:.6g} "
                                f"(relative error {entry['loss_rel_error']:.1e})")  # fmt: skip
    return notes + (["- Problems:", *problems] if problems else [])


def write(record: dict, directory: Path, plots: list[str]) -> list[Path]:
    """results.md (everything), summary.md (the README's table) and results.json (raw numbers); their paths."""
    results, summary, raw = directory / "results.md", directory / "summary.md", directory / "results.json"
    results.write_text(markdown(record, plots))
    env = record["environment"]
    summary.write_text("\n".join([f"{env['device_name']} ({env['device_type']}), {env['date']}; details in "
                                  "results.md.", "", *summary_lines(record)]) + "\n")  # fmt: skip
    raw.write_text(json.dumps(record, indent=1) + "\n")
    return [results, summary, raw]


def write_plots(record: dict, directory: Path) -> tuple[list[str], str | None]:
    """PNGs of time (top row) and peak memory beyond the logits (below) against V, one line per implementation:
    one figure per (mode, dtype, λ), named by ``plot_name``, one column per token count N. Returns the file names
    written, and the reason when none could be (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'smoothce[bench]'), so no plots were drawn"
    names, metrics = list(record["implementations"]), [("median_s", 1e3, "time per call (ms)")]
    if record["settings"]["memory_measured"]:
        metrics.append(("peak_extra_bytes", 1 / MIB, "peak memory beyond logits (MiB)"))
    written = []
    for (mode, dtype, lam), cases in groups(record).items():
        tokens = sorted({c["n"] for c in cases})
        fig, axes = plt.subplots(len(metrics), len(tokens), figsize=(4.2 * len(tokens) + 0.8, 3.4 * len(metrics)),
                                 squeeze=False)  # fmt: skip
        for col, n in enumerate(tokens):
            row_cases = sorted((c for c in cases if c["n"] == n), key=lambda c: c["v"])
            vocab = sorted({c["v"] for c in row_cases})
            for ax, (key, scale, ylabel) in zip(axes[:, col], metrics, strict=True):
                for name in names:
                    points = [(c["v"], c["results"][name][key] * scale) for c in row_cases
                              if key in c["results"].get(name, {})]  # fmt: skip
                    if points:
                        ax.plot(*zip(*points, strict=False), marker="o", label=name)
                ax.set(xlabel="vocabulary size V", ylabel=ylabel, ylim=(0, None))
                ax.set_xscale("log", base=2)
                ax.set_xticks(vocab, [str(v) for v in vocab], rotation=30, fontsize=7)
                ax.minorticks_off()
                ax.grid(alpha=0.3)
            axes[0][col].set_title(f"{mode}, {dtype}, λ = {lam:g}, N = {n}")
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        env = record["environment"]
        fig.suptitle(f"{env['device_name']}, {env['date']}", fontsize=9)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
        name = plot_name(mode, dtype, lam)
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written, None
