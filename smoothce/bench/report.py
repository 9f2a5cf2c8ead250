"""A sweep's record as results.json, results.md, summary.md and PNGs. Ratios against each baseline of the same run:
its time / smoothce's, its peak memory / smoothce's (≥, ≤: a peak under 1 MiB counted as 1 MiB); above 1: better."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from smoothce.bench import machine
from smoothce.bench.impls import BASELINE_FOR_RATIOS as OURS

MIB = 1 << 20  # also the resolution of the memory measurement: smaller peaks count as 1 MiB
HOST_BOUND_S = 10e-6  # a limit this short on an accelerator: the device waits for the host's launches


def options_text(case: dict) -> str:
    """The loss's options besides λ, as "softcap=30, z_loss=0.0001, class weights" ("" for none)."""
    on = [f"softcap={case['softcap']:g}"] if case.get("softcap") is not None else []
    on += [f"z_loss={case['z_loss']:g}"] if case.get("z_loss") else []
    return ", ".join(on + ["class weights"] * bool(case.get("class_weights")))


def label(case: dict) -> str:
    lam, options = case["label_smoothing"], options_text(case)
    return f"{case['mode']} {case['dtype']} {case['n']} × {case['v']} λ={lam:g} {options}".rstrip()


def plot_name(mode: str, dtype: str, label_smoothing: float = 0.1) -> str:
    """The PNG of one (mode, dtype, λ): "fwd_bwd-bf16.png", "fwd-fp32-ls0.png"."""
    return f"{mode.replace('+', '_')}-{dtype}{'' if label_smoothing == 0.1 else f'-ls{label_smoothing:g}'}.png"


def groups(record: dict) -> dict[tuple[str, str, float], list[dict]]:
    """The record's cases by (mode, dtype, λ), in order of appearance: one table and one plot each."""
    key = lambda case: (case["mode"], case["dtype"], case["label_smoothing"])
    return {k: [c for c in record["cases"] if key(c) == k] for k in dict.fromkeys(map(key, record["cases"]))}


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


def _time(seconds: float | None) -> str:
    """Three significant digits in s, ms or µs, whichever keeps the number in [1, 1000); "—" for none."""
    if not seconds:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e3)):
        if float(digits := f"{seconds * scale:#.3g}".rstrip(".")) >= 1.0:
            return f"{digits} {unit}"
    return f"{seconds * 1e6:#.3g}".rstrip(".") + " µs"


def cell(entry: dict, key: str = "median_s", logits_bytes: int = 0) -> str:
    """One implementation's ``entry`` as its time (± half the IQR, ⚠: loss off), "of_limit" or "peak_extra_bytes"."""
    if "not_supported" in entry:
        return "not supported"
    if key not in entry or entry[key] is None:
        return "error" if "error" in entry or (key == "peak_extra_bytes" and "memory_error" in entry) else "—"
    if key == "of_limit":
        return f"{entry['of_limit']:.2f}" + (f" ({entry['gbps']:.1f} GB/s)" if logits_bytes else "")
    if key == "peak_extra_bytes":
        mib = entry[key] / MIB
        return (f"{mib:.0f}" if mib >= 100 else f"{mib:.3g}") + f" MiB ({entry[key] / logits_bytes:.2f}×)"
    spread = (entry["q3_s"] - entry["q1_s"]) / 2 / entry["median_s"]
    return f"{_time(entry['median_s'])} ±{spread:.0%}" + ("" if entry.get("loss_ok", True) else " ⚠")


def _ratios(case: dict, baselines: list[str], key: str) -> list[str]:
    """The ``key`` ratio against each baseline: three significant digits, trailing zeros kept (3.00×, 0.640×)."""
    bound, of = {"lower": "≥ ", "upper": "≤ ", None: ""}, [case.get("ratios", {}).get(b, {}) for b in baselines]
    return ["—" if r.get(key) is None else f"{bound[r.get(key + '_bound')]}{r[key]:#.3g}".rstrip(".") + "×" for r in of]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _host_bound(record: dict, case: dict) -> bool:
    limit = case.get("limit", {}).get("median_s")
    return record["environment"]["device_type"] != "cpu" and limit is not None and limit < HOST_BOUND_S


def summary_lines(record: dict) -> list[str]:
    """One table with every case's time, share of the limit, speed-ups and memory savings (for the README)."""
    if not (baselines := _baselines(record)):
        return ["(smoothce and at least one baseline are needed for ratios.)"]
    rows = []
    for case in record["cases"]:  # a skipped case has no results: "—" but for its first cell
        ours, host = case["results"].get(OURS, {}), " (host-bound)" if _host_bound(record, case) else ""
        speed, saving = (_ratios(case, baselines, key) for key in ("speedup", "memory_saving"))
        rows.append([label(case) + host, case.get("skipped") or cell(ours), cell(ours, "of_limit"), *speed, *saving])
    header = ["case", "smoothce time", "of limit", *(f"speed-up vs {b}" for b in baselines)]
    return _table(header + [f"memory saving vs {b}" for b in baselines], rows)


def _baselines(record: dict) -> list[str]:
    """The implementations smoothce is compared with (none without smoothce)."""
    return [n for n in record["implementations"] if n != OURS] if OURS in record["implementations"] else []


def markdown(record: dict, plots: list[str]) -> str:
    env, settings, names = record["environment"], record["settings"], record["implementations"]
    baselines = _baselines(record)
    timer = (
        f"`torch.utils.benchmark.Timer.blocked_autorange` (one untimed warm-up run, then runs for "
        f"{settings['rep_ms']:g} ms, at least one; their mean)"
        if env["device_type"] == "cpu"
        else f"`triton.testing.do_bench` (runs between device events, L2 flushed before each; "
        f"{settings['warmup_ms']:g} ms warm-up, {settings['rep_ms']:g} ms of runs, median)"
    )
    ignored = f"every {settings['ignore_every']}th target ignored" if settings["ignore_every"] else "no ignored rows"
    options = " / ".join(sorted({options_text(case) for case in record["cases"]} - {""}))
    options = f"; {options} ({settings.get('class_weights')})" if options else ""
    lines = [f"# smoothce benchmark: {env['device_name']} ({env['device_type']})", "", machine.text(env), ""]
    lines.append(
        f'Loss: reduction="mean", int64 targets, {ignored}, logits ~ N(0, 1) (seed {settings["seed"]}); λ per table'
        f"{options}. Each implementation runs once untimed (compilation happens there, and its loss is checked), "
        f"then {settings['rounds']} rounds each time every implementation once, in a rotating order; one round's "
        f"number: {timer}. Times are medians over rounds, ± half their interquartile range."
    )
    lines += ["", "Implementations:", "", *(f"- **{name}**: {text}" for name, text in names.items())]
    lines += [f"- not run: **{name}**, {why}" for name, why in record.get("not_run", {}).items()]
    lines += ["", "## Summary", "", *summary_lines(record)]

    def row(case: dict, key: str, *first: str, ratio: str | None = None) -> list[str]:
        """N × V, ``first``, every implementation's ``cell`` of ``key``, then the ``ratio`` against each baseline."""
        cells = [cell(case["results"].get(name, {}), key, case["logits_bytes"]) for name in names]
        return [f"{case['n']} × {case['v']}", *first, *cells, *(_ratios(case, baselines, ratio) if ratio else [])]

    for (mode, dtype, lam), group in groups(record).items():
        kind, done = ("copy" if mode == "fwd+bwd" else "read"), [c for c in group if not c.get("skipped")]
        time_rows = [[f"{c['n']} × {c['v']}", c["skipped"]] for c in group if c.get("skipped")]
        time_rows += [row(c, "median_s", _time(c["limit"]["median_s"]), ratio="speedup") for c in done]
        lines += ["", f"## {mode}, {dtype}, λ = {lam:g}", "", "Time per call and smoothce's speed-up:", ""]
        lines += _table(["N × V", f"{kind} limit", *names] + [f"speed-up vs {b}" for b in baselines], time_rows)
        bytes_model = settings["bytes_model"][mode]
        lines += ["", f"Share of the {kind} limit (limit time / time) and effective bandwidth, bytes = {bytes_model}:"]
        lines += ["", *_table(["N × V", *names], [row(c, "of_limit") for c in done])] if done else []
        if settings["memory"] and done:
            memory_rows = [
                row(c, "peak_extra_bytes", f"{c['logits_bytes'] / MIB:.3g} MiB", ratio="memory_saving") for c in done
            ]
            lines += ["", "Peak memory beyond the logits (in brackets: as a multiple of the logits' size):", ""]
            lines += _table(["N × V", "logits", *names] + [f"memory saving vs {b}" for b in baselines], memory_rows)
        if plot_name(mode, dtype, lam) in plots:
            lines += ["", f"![time and memory against V, {mode} {dtype} λ={lam:g}]({plot_name(mode, dtype, lam)})"]
    lines += ["", "## Notes", ""]
    lines += [
        "- Limits, timed in the same rounds: copy = `out.copy_(logits)` (the least any forward+backward moves), "
        "read = `torch.amax(logits)` (the least any forward moves). Effective bandwidth counts that least traffic; "
        "b = bytes per logit. fwd+bwd runs `loss.backward()` on logits that require grad, the previous gradient "
        "dropped first (`grad = None`, as a training step's `zero_grad` does; on GPUs outside the timed events); fwd "
        "runs under `torch.no_grad()`.",
        "- Every implementation's loss is checked against a float64 reference; ⚠ marks a loss off by more than the "
        "dtype's tolerance (fp32 1e-4, bf16 2e-2, fp16 5e-3, relative). not supported: the implementation lacks an "
        "option of the case.",
    ]
    lines += [
        f"- Peak memory beyond the logits: {settings['memory_method']}. For fwd+bwd it includes the gradient "
        "(N·V·b, 1.00× the logits), which every implementation returns."
    ] * settings["memory"]
    if host := [label(c) for c in record["cases"] if _host_bound(record, c)]:
        lines.append(
            f"- Host-bound rows ({'; '.join(host)}): the limit takes under {HOST_BOUND_S * 1e6:.0f} µs, so these "
            "times are each implementation's launch overhead per call."
        )
    problems = []
    for case in record["cases"]:
        for name, entry in case["results"].items():
            where = f"  - {label(case)}, {name}: "
            problems += [where + entry[key] for key in ("error", "memory_error") if key in entry]
            if entry.get("loss_ok") is False:
                problems.append(f"{where}loss {entry['loss']:.6g} vs reference {case['reference_loss']:.6g}")
    return "\n".join(lines + (["- Problems:", *problems] if problems else [])) + "\n"


def write(record: dict, directory: Path, plots: list[str]) -> list[Path]:
    """results.md (everything), summary.md (the README's table) and results.json (raw numbers); their paths."""
    results, summary, raw = directory / "results.md", directory / "summary.md", directory / "results.json"
    results.write_text(markdown(record, plots))
    env = record["environment"]
    head = f"{env['device_name']} ({env['device_type']}), {env['date']}; details in results.md.\n\n"
    summary.write_text(head + "\n".join(summary_lines(record)) + "\n")
    raw.write_text(json.dumps(record, indent=1) + "\n")
    return [results, summary, raw]


def write_plots(record: dict, directory: Path) -> list[str]:
    """A PNG per (mode, dtype, λ), time and memory against V per implementation and N; the names written."""
    try:
        from matplotlib.figure import Figure  # files only: no pyplot, no window
    except ImportError:
        print("matplotlib is not installed (pip install 'smoothce[bench]'), so no plots were drawn", file=sys.stderr)
        return []
    metrics = [("median_s", 1e3, "time per call (ms)")]
    metrics += [("peak_extra_bytes", 1 / MIB, "peak memory beyond the logits (MiB)")] * record["settings"]["memory"]
    for (mode, dtype, lam), group in groups(record).items():
        fig = Figure(figsize=(6.4 * len(metrics), 4.8))
        for ax, (key, scale, ylabel) in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
            for name, n in itertools.product(record["implementations"], sorted({c["n"] for c in group})):
                at = [(c["v"], c["results"].get(name, {}).get(key)) for c in group if c["n"] == n]
                if points := sorted((v, value * scale) for v, value in at if value is not None):
                    ax.plot(*zip(*points, strict=True), marker="o", label=f"{name}, N = {n}")
            ax.set(xlabel="vocabulary size V", ylabel=ylabel, ylim=(0, None), xscale="log")
            ax.set_xticks(vocab := sorted({c["v"] for c in group}), [str(v) for v in vocab], rotation=30, fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{mode}, {dtype}, λ = {lam:g}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{record['environment']['device_name']}, {record['environment']['date']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(directory / plot_name(mode, dtype, lam), dpi=110)
    return [plot_name(*key) for key in groups(record)]
