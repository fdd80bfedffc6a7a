"""PNG plots of ``khot bench`` results (matplotlib, an optional dependency imported lazily).

Per suite: ``quality_<suite>.png`` (quality against n and against k), ``time_<suite>.png``
(time against n, log-log) and ``tradeoff_<suite>.png`` (quality against time), each drawn
only when the suite's rows vary along its axes.
"""

from __future__ import annotations

from pathlib import Path

from .report import LABELS, nanmedian, ok_rows

__all__ = ["plot"]


def _lines(ax, rows, x, y):
    """One line per method: the median of ``y`` at each value of ``x``."""
    for method in dict.fromkeys(r["method"] for r in rows):
        points = {}
        for r in rows:
            if r["method"] == method and y in r:
                points.setdefault(r[x], []).append(r[y])
        if points:
            xs = sorted(points)
            ax.plot(xs, [nanmedian(points[v]) for v in xs], marker="o", label=method)


def plot(rows: list[dict], suites: dict, out: Path) -> tuple[list[str], str | None]:
    """Draw the plots into ``out``; returns their file names, and a one-line note if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed, so no plots (pip install 'khot[bench]')."
    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        names.append(name)

    for suite_name, suite in suites.items():
        rows_ = [r for r in ok_rows(rows) if r["suite"] == suite_name]
        metric = suite.quality[0]
        ranked = [r for r in rows_ if not r.get("reference")]
        ns, ks = {r["n"] for r in rows_}, {r["k"] for r in rows_}
        varies = len({r[metric] for r in ranked if metric in r}) > 1  # no quality plot of a constant
        if len(ns) > 1 and varies:
            fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
            for ax, x in zip(axes[0], ("n", "k")):
                _lines(ax, ranked, x, metric)
                ax.set(xscale="log", xlabel=x, ylabel=LABELS[metric], title=f"{suite_name}: quality vs {x}")
            axes[0][0].legend(fontsize=7)
            save(fig, f"quality_{suite_name}.png")
        if len(ns) > 1:
            fig, ax = plt.subplots(figsize=(6, 4))
            _lines(ax, rows_, "n", suite.time)
            ax.set(xscale="log", yscale="log", xlabel="n", ylabel=LABELS[suite.time], title=f"{suite_name}: time vs n")
            ax.legend(fontsize=7)
            save(fig, f"time_{suite_name}.png")
        if len(ns | ks) > 2 and varies:
            fig, ax = plt.subplots(figsize=(6, 4))
            for method in dict.fromkeys(r["method"] for r in ranked):
                mine = [r for r in ranked if r["method"] == method and metric in r and suite.time in r]
                ax.scatter([r[suite.time] for r in mine], [r[metric] for r in mine], label=method, s=14)
            ax.set(xscale="log", xlabel=LABELS[suite.time], ylabel=LABELS[metric], title=f"{suite_name}: quality vs time")
            ax.legend(fontsize=7)
            save(fig, f"tradeoff_{suite_name}.png")
    return names, None
