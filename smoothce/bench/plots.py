"""PNG plots of a benchmark record: time and peak memory against V, one line per implementation.

One figure per (mode, dtype, λ), named by ``report.plot_name``; one column per token count N,
time on the top row, peak memory beyond the logits below it. matplotlib is optional:
without it, ``write_plots`` returns no files and says why.
"""

from __future__ import annotations

from pathlib import Path

from smoothce.bench.report import MIB, groups, plot_name


def write_plots(record: dict, directory: Path) -> tuple[list[str], str | None]:
    """Write the PNGs into ``directory``; (file names written, reason when none could be)."""
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
                ax.set_ylabel(ylabel)
                ax.set_xscale("log", base=2)
                ax.set_xticks(vocab, [str(v) for v in vocab], rotation=30, fontsize=7)
                ax.minorticks_off()
                ax.set_xlabel("vocabulary size V")
                ax.set_ylim(bottom=0)
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
