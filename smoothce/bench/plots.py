"""PNG plots of a benchmark record: time and peak memory against V, one line per implementation.

One figure per (mode, dtype, λ), named by ``report.plot_name``; one column per token count N,
time on the top row, peak memory beyond the logits below it. matplotlib is optional:
without it, ``write_plots`` returns no files and says why.
"""

from __future__ import annotations

from pathlib import Path

from smoothce.bench.report import MIB, plot_name


def write_plots(record: dict, directory: Path) -> tuple[list[str], str | None]:
    """Write the PNGs into ``directory``; (file names written, reason when none could be)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'smoothce[bench]'), so no plots were drawn"
    names = list(record["implementations"])
    memory = record["settings"]["memory_measured"]
    written = []
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for case in record["cases"]:
        groups.setdefault((case["mode"], case["dtype"], case["label_smoothing"]), []).append(case)
    for (mode, dtype, lam), cases in groups.items():
        tokens = sorted({c["n"] for c in cases})
        rows = 2 if memory else 1
        fig, axes = plt.subplots(rows, len(tokens), figsize=(4.2 * len(tokens) + 0.8, 3.4 * rows), squeeze=False)
        for col, n in enumerate(tokens):
            row_cases = sorted((c for c in cases if c["n"] == n), key=lambda c: c["v"])
            for name in names:
                points = [
                    (c["v"], c["results"][name]["median_s"] * 1e3)
                    for c in row_cases
                    if "median_s" in c["results"].get(name, {})
                ]
                if points:
                    axes[0][col].plot(*zip(*points, strict=False), marker="o", label=name)
                if memory:
                    points = [
                        (c["v"], c["results"][name]["peak_extra_bytes"] / MIB)
                        for c in row_cases
                        if "peak_extra_bytes" in c["results"].get(name, {})
                    ]
                    if points:
                        axes[1][col].plot(*zip(*points, strict=False), marker="o", label=name)
            axes[0][col].set_title(f"{mode}, {dtype}, λ = {lam:g}, N = {n}")
            axes[0][col].set_ylabel("time per call (ms)")
            if memory:
                axes[1][col].set_ylabel("peak memory beyond logits (MiB)")
            for row in range(rows):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                vocab = sorted({c["v"] for c in row_cases})
                ax.set_xticks(vocab, [str(v) for v in vocab], rotation=30, fontsize=7)
                ax.minorticks_off()
                ax.set_xlabel("vocabulary size V")
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3)
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
