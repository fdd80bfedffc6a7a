"""PNG plots of ``khot bench`` results (matplotlib, an optional dependency imported lazily).

Per suite, one figure per question, each a row of panels (one per k, sharpness level or task)
with a line per method: ``quality_<suite>.png`` (quality against n), ``time_<suite>.png`` (time
against n, log-log; per element when the batch changes with n) and ``tradeoff_<suite>.png``
(quality against time, n written beside each point). Every method keeps one colour and marker
in every plot; references are grey and dashed; legends sit outside the panels.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from .report import LABELS, nanmedian, ok_rows

__all__ = ["plot", "style"]

_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#000080", "#b8860b", "#00a087", "#800000", "#ff1493", "#6b8e23", "#4b0082",
)  # fmt: skip
_KNOWN = (
    "sigmoid", "halving", "iterative", "counting", "entmax-budget", "torchsort-rank", "difftopk", "diffsort",
    "sample (πps)", "sparse", "lapsum", "soft", "perturbed", "gumbel", "simple", "topk_mask", "halving-base20",
    "systematic", "brewer", "pareto", "conditional_poisson", "gumbel-topk", "keep_topk",
)  # fmt: skip
_MARKERS = "osD^v<>ph*XP"


def style(method: str, reference: bool = False) -> dict:
    """The colour, marker and line style of a method, the same in every plot (new methods get a
    colour from their name); references and baselines are grey and dashed."""
    if reference:
        shade = ("#000000", "#555555", "#888888", "#aaaaaa")[zlib.crc32(method.encode()) % 4]
        return {"color": shade, "linestyle": "--", "marker": "x"}
    i = _KNOWN.index(method) if method in _KNOWN else len(_KNOWN) + zlib.crc32(method.encode()) % 97
    return {"color": _PALETTE[i % len(_PALETTE)], "marker": _MARKERS[i % len(_MARKERS)], "linestyle": "-"}


def _axis_label(column: str, per_element: bool = False) -> str:
    if per_element:
        return f"{LABELS[column].replace(' ms', '')} time per element (ns)"
    return LABELS[column]


def _value(r: dict, column: str, per_element: bool) -> float | None:
    if column not in r:
        return None
    return r[column] * 1e6 / (r["batch"] * r["n"]) if per_element else r[column]


def _lines(ax, rows, x, y, per_element=False):
    """One line per method: the median of ``y`` at each value of ``x``."""
    for method in dict.fromkeys(r["method"] for r in rows):
        points = {}
        mine = [r for r in rows if r["method"] == method]
        for r in mine:
            v = _value(r, y, per_element)
            if v is not None:
                points.setdefault(r[x], []).append(v)
        if points:
            xs = sorted(points)
            ys = [nanmedian(points[v]) for v in xs]
            ax.plot(xs, ys, label=method, markersize=5, alpha=0.85, **style(method, bool(mine[0].get("reference"))))


def _spans_decades(values) -> bool:
    values = [v for v in values if v and v > 0]
    return bool(values) and max(values) / min(values) > 30


def _finish(fig, axes, plt):
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
        ax.grid(True, which="major", alpha=0.3)
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            axis.set_minor_formatter(plt.NullFormatter())  # no "3×10⁰"-style minor labels
            if scale == "log":  # ticks at 1, 2, 5 × 10^j, written plainly
                lo, hi = sorted(axis.get_view_interval())
                narrow = lo > 0 and hi < 1e3 * lo
                axis.set_major_locator(plt.LogLocator(base=10, subs=(1, 2, 5) if narrow and axis is ax.yaxis else (1,)))
                axis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def _facets(rows, facet):
    keys = sorted({r.get(facet) for r in rows}, key=lambda v: (v is None, v), reverse=facet == "level")
    return [(key, [r for r in rows if r.get(facet) == key]) for key in keys]


def _facet_title(facet, key, suite_name):
    if facet == "level":
        return f"L1 to exact mask / 2k = {key}"
    if facet == "k":
        return f"k = {key}"
    return suite_name


def plot(rows: list[dict], suites: dict, out: Path) -> tuple[list[str], str | None]:
    """Draw the plots into ``out``; returns their file names, and a one-line note if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed, so no plots (pip install matplotlib)."
    names = []

    def save(fig, name):
        fig.savefig(out / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        names.append(name)

    def figure(panels):
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 0.4, 3.4), squeeze=False)
        return fig, list(axes[0])

    for suite_name, suite in suites.items():
        rows_ = [r for r in ok_rows(rows) if r["suite"] == suite_name]
        if suite_name == "tasks":
            if rows_:
                _tasks(plt, figure, save, rows_)
            continue
        metric = suite.quality[0]
        facet = "level" if any(r.get("level") is not None for r in rows_) else ("k" if suite.by == "n/k" else None)
        panels = _facets(rows_, facet) if facet else [(None, rows_)]
        ranked = [r for r in rows_ if not r.get("reference")]
        if len({r["n"] for r in rows_}) > 1:  # time against n
            per_element = len({r["batch"] for r in rows_}) > 1
            fig, axes = figure(panels)
            for ax, (key, mine) in zip(axes, panels):
                _lines(ax, mine, "n", suite.time, per_element)
                ax.set(xscale="log", yscale="log", xlabel="n (items per slice)", title=_facet_title(facet, key, suite_name))
            axes[0].set_ylabel(_axis_label(suite.time, per_element))
            fig.suptitle(f"{suite.title}: time" + (" per element (the batch differs between sizes)" if per_element else ""), fontsize=10, y=1.03)
            _finish(fig, axes, plt)
            save(fig, f"time_{suite_name}.png")
        scored = [r for r in ranked if metric in r]
        if suite.quality[1] is None or len({r[metric] for r in scored}) < 2:
            continue  # a p-value, or a constant (exact): no quality plot
        quality_panels = [(k, [r for r in mine if metric in r]) for k, mine in _facets(scored, facet)] if facet else [(None, scored)]
        if len({r["n"] for r in scored}) > 1:  # quality against n
            fig, axes = figure(quality_panels)
            for ax, (key, mine) in zip(axes, quality_panels):
                _lines(ax, mine, "n", metric)
                ax.set(xscale="log", xlabel="n (items per slice)", title=_facet_title(facet, key, suite_name))
                if _spans_decades([r[metric] for r in mine]):
                    ax.set_yscale("log")
            axes[0].set_ylabel(LABELS[metric])
            fig.suptitle(f"{suite.title}: quality", fontsize=10, y=1.03)
            _finish(fig, axes, plt)
            save(fig, f"quality_{suite_name}.png")
        # quality against time, one point per method and n, n written beside it
        fig, axes = figure(quality_panels)
        for ax, (key, mine) in zip(axes, quality_panels):
            for method in dict.fromkeys(r["method"] for r in mine):
                pts = sorted((r["n"], r[suite.time], r[metric]) for r in mine if r["method"] == method and suite.time in r)
                if pts:
                    ax.plot([p[1] for p in pts], [p[2] for p in pts], label=method, markersize=5, alpha=0.85, **style(method))
                    for n, t, q in pts:
                        ax.annotate(f"{n:g}", (t, q), fontsize=6, xytext=(3, 2), textcoords="offset points", color=style(method)["color"])
            ax.set(xscale="log", xlabel=LABELS[suite.time], title=_facet_title(facet, key, suite_name))
        axes[0].set_ylabel(LABELS[metric])
        fig.suptitle(f"{suite.title}: quality against time (n beside each point)", fontsize=10, y=1.03)
        _finish(fig, axes, plt)
        save(fig, f"tradeoff_{suite_name}.png")
    return names, None


def _tasks(plt, figure, save, rows):
    """One panel per task and k: each method's mean metric over the seeds, ± one standard deviation."""
    from .tasks import TASKS

    panels = sorted(dict.fromkeys((r["task"], r["k"]) for r in rows), key=lambda p: (list(TASKS).index(p[0]), p[1]))
    fig, axes = figure(panels)
    for ax, (task, k) in zip(axes, panels):
        mine = [r for r in rows if r["task"] == task and r["k"] == k]
        for i, r in enumerate(mine):
            s = style(r["method"], bool(r.get("reference")))
            ax.barh(i, r["metric"], xerr=r.get("metric_std", 0), color=s["color"], alpha=0.8 if not r.get("reference") else 0.4,
                    hatch="//" if r.get("reference") else None, error_kw={"elinewidth": 1})  # fmt: skip
        ax.set_yticks(range(len(mine)), [r["method"] for r in mine], fontsize=8)
        ax.invert_yaxis()
        _, _, _, label, higher = TASKS[task]
        values = [r["metric"] for r in mine]
        lo, hi = min(values), max(values)
        if _spans_decades(values):
            ax.set_xscale("log")
            ax.set_xlim(lo / 2, hi * 2)
        else:
            ax.set_xlim(max(0.0, lo - 0.15 * (hi - lo + 1e-9)) if higher else 0.0, hi + 0.15 * (hi - lo + 1e-9))
        ax.set(xlabel=f"{label} ({'↑' if higher else '↓'})", title=f"{task}, k = {k}")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"Downstream tasks: mean ± standard deviation over {rows[0].get('seeds', '')} seeds (hatched: baselines)", fontsize=10, y=1.03)
    fig.tight_layout()
    save(fig, "tasks.png")
