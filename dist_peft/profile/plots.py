"""PNG plots of a profile (matplotlib, no display): exclusive phase times as stacked bars (one bar per rank for
one configuration, per configuration when several are compared), and the job's step time over the measured
steps."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from dist_peft.profile.report import atomic_write


def new_figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=110)


def save_figure(plt: Any, fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", bbox_inches="tight")  # the legend outside the axes included
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def plot_phases(configs: Sequence[dict[str, Any]], path: Path) -> Path:
    """Stacked horizontal bars of median phase times (ms): per rank for one configuration, else per
    configuration (its slowest rank's median)."""
    if len(configs) == 1:
        c = configs[0]
        labels = [f"rank {r}" for r in sorted(c["memory"])]
        names = list(c["phases"])
        rows = [[c["rank_phases"][r].get(n, 0.0) * 1e3 for n in names] for r in sorted(c["memory"])]
        title = f"{c['name']}: phases per rank"
    else:
        names = list(dict.fromkeys(n for c in configs for n in c["phases"]))
        labels = [c["name"] for c in configs]
        rows = [[c["phases"].get(n, {}).get("median", 0.0) * 1e3 for n in names] for c in configs]
        title = "phases per configuration (median over ranks)"
    plt, fig, ax = new_figure(8, 1.2 + 0.45 * len(labels))
    left = [0.0] * len(labels)
    cmap = plt.get_cmap("tab20")
    for j, name in enumerate(names):
        widths = [row[j] for row in rows]
        ax.barh(labels, widths, left=left, label=name, color=cmap(j % 20))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("ms per step")
    ax.set_title(title)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the bars: never over the axis
    return save_figure(plt, fig, path)


def plot_steps(configs: Sequence[dict[str, Any]], path: Path) -> Path:
    """The job's step time (slowest rank) over the measured steps, one line per configuration."""
    plt, fig, ax = new_figure(7, 3.2)
    for c in configs:
        ax.plot([t * 1e3 for t in c["step_time_s"]["per_step"]], marker="o", ms=3, label=c["name"])
    ax.set_xlabel("measured step")
    ax.set_ylabel("step time (ms)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return save_figure(plt, fig, path)
