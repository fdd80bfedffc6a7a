"""The outputs of ``khot bench``: the CSV of every measurement and the Markdown report.

The CSV is written row by row and flushed, so an interrupted run leaves every finished
measurement readable. The report's tables and its "which method when" summary are
computed from the rows (nothing in it is written by hand).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

__all__ = ["COLUMNS", "LABELS", "CsvLog", "read_csv", "write_report"]

COLUMNS = (
    "suite", "method", "source", "version", "reference", "baseline", "status", "task", "batch", "n", "k", "level", "d",
    "dtype", "device", "temperature", "fwd_ms", "fwd_bwd_ms", "peak_mib", "nccs", "mask_l1", "sum_err", "grad_cos",
    "jac_cos", "jac_cos_se", "search_evals", "incl_err", "incl_se", "incl_z", "incl_p", "draws", "metric", "metric_std", "seeds", "steps", "train_s", "torch", "khot",
)  # fmt: skip
_TEXT = {"suite", "method", "source", "version", "baseline", "status", "task", "dtype", "device", "torch", "khot"}
LABELS = {
    "nccs": "nCCS (↑)", "mask_l1": "L1 to exact / 2k", "sum_err": "|Σ - k| (↓)", "temperature": "temperature",
    "grad_cos": "gradient cos vs finite differences (↑)",
    "jac_cos": "gradient cos vs the smoothed exact mask's (↑)",
    "jac_cos_se": "Monte-Carlo standard error of that cos", "search_evals": "forward calls of the temperature search",
    "incl_err": "max |P(i) - π_i| (↓)", "incl_se": "standard error of P(i)", "incl_z": "max |z| of P(i) - π_i",
    "incl_p": "χ² p-value of P(i) = π_i (exact designs: p ~ U(0, 1))",
    "fwd_ms": "forward ms", "fwd_bwd_ms": "fwd+bwd ms", "metric": "task metric", "train_s": "training s",
}  # fmt: skip


class CsvLog:
    """A CSV of measurements in :data:`COLUMNS` order, flushed after every row."""

    def __init__(self, path: Path):
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, COLUMNS)
        self._writer.writeheader()
        self._file.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({key: _cell(value) for key, value in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV written by :class:`CsvLog`: numbers as floats/ints, empty cells left out."""
    with open(path, newline="") as file:
        return [
            {key: value if key in _TEXT else _number(value) for key, value in row.items() if value != ""}
            for row in csv.DictReader(file)
        ]


def _number(text: str):
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def ok_rows(rows):
    """The rows measured without a failure or skip."""
    return [r for r in rows if r.get("status") == "ok"]


def _applicable(rows):
    """The rows of cells a method applies to (not another task's baseline)."""
    return [r for r in rows if r.get("status") != "n/a"]


def _group(row: dict, by: str):
    return row["n"] // row["k"] if by == "n/k" else row.get(by)


def nanmedian(values):
    """Median of the values that are not missing or NaN (NaN if none)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _cells(rows):
    """Rows grouped by input: ``{(batch, n, k, dtype, device, level, task): [rows]}`` in order of appearance."""
    out = defaultdict(list)
    for r in rows:
        out[r["batch"], r["n"], r["k"], r["dtype"], r["device"], r.get("level"), r.get("task")].append(r)
    return out


def compared(rows, column) -> tuple[list[str], list[str], list]:
    """The methods compared on ``column`` and the cells they are compared on: every method that
    has it in every cell where any method has it; ``(compared, left_out, cells)``."""
    cells = [c for c in _cells(rows).values() if any(column in r for r in c)]
    methods = list(dict.fromkeys(r["method"] for c in cells for r in c if column in r))
    keep = [m for m in methods if all(any(r["method"] == m and column in r for r in c) for c in cells)]
    return keep, [m for m in methods if m not in keep], cells


def _where(rows, method) -> str:
    ns = sorted({r["n"] for r in rows if r["method"] == method and r.get("status") == "ok"})
    return f"n ≤ {ns[-1]}" if ns else "no cell"


def _pareto(rows, metric, higher, time):
    """Methods no other method beats on both quality and time in this cell."""
    def better(a, b):
        qa, qb = (a[metric], b[metric]) if higher else (-a[metric], -b[metric])
        return qa >= qb and a[time] <= b[time] and (qa > qb or a[time] < b[time])

    rows = [r for r in rows if metric in r and time in r]
    return [r["method"] for r in rows if not any(better(o, r) for o in rows)]


def summary(rows: list[dict], suite) -> list[str]:
    """The "which method when" lines of one suite, computed from its rows.

    Medians and counts compare only the methods that ran in every cell of the comparison, on
    those cells, and say which were left out (a method skipped at large n must not "win" on
    the small cells it ran).
    """
    metric, higher = suite.quality
    time = suite.time
    ranked = [r for r in ok_rows(rows) if not r.get("reference")]
    if not ranked:
        return ["No method ran within the budgets."]
    refs = [r for r in ok_rows(rows) if r.get("reference")]
    quality = LABELS[metric] if higher is not None else "consistent with π (p ≥ 0.001)"
    lines = [
        f"| {suite.by} | best {quality} | fastest ({LABELS[time]}) | not beaten on both |",
        "|---|---|---|---|",
    ]
    groups = defaultdict(list)
    for r in ranked:
        groups[_group(r, suite.by)].append(r)
    notes = {}
    for key in sorted(groups, key=lambda v: (v is None, v)):
        g = groups[key]
        mq, left_q, _ = compared(g, metric)
        mt, left_t, cells_t = compared(g, time)
        q = {m: v for m, v in _per_method([r for r in g if r["method"] in mq], metric).items()}
        t = _per_method([r for r in g if r["method"] in mt], time)
        if higher is None:
            best = ", ".join(f"`{m}`" for m in mq if min(r[metric] for r in g if r["method"] == m and metric in r) >= 1e-3)
        else:
            top_q = (max if higher else min)(q, key=q.get) if q else None
            best = f"`{top_q}` ({_fmt(q[top_q])})" if top_q else "–"
        top_t = min(t, key=t.get) if t else None
        fastest = f"`{top_t}` ({_fmt(t[top_t])})" if top_t else "–"
        cell_keys = {tuple(c[0][f] for f in ("batch", "n", "k")) for c in cells_t}
        ref_t = _per_method([r for r in refs if (r["batch"], r["n"], r["k"]) in cell_keys and r.get("level") == g[0].get("level")], time)
        faster = [f"`{m}` {_fmt(v)}" for m, v in ref_t.items() if top_t and v < t[top_t]]
        if faster:
            fastest += "; faster reference: " + ", ".join(faster)
        pareto = sorted({m for cell in _cells(g).values() for m in _pareto(cell, metric, higher, time)}) if higher is not None else []
        lines.append(f"| {key} | {best} | {fastest} | {', '.join(f'`{m}`' for m in pareto) or '–'} |")
        for m in left_q + left_t:
            notes.setdefault(m, _where(ok_rows(rows), m))
    lines.append("")
    lines.append(
        "Medians over the cells of each row, comparing only the methods that ran in all of them"
        + ("; left out of the rows where they missed cells: " + ", ".join(f"`{m}` (ran {w})" for m, w in notes.items()) + "." if notes else ".")
    )
    lines.append("")
    if higher is not None:
        mq, left, cells = compared(ranked, metric)
        wins = defaultdict(int)
        for c in cells:
            scored = [r for r in c if r["method"] in mq and metric in r]
            wins[(max if higher else min)(scored, key=lambda r: r[metric])["method"]] += 1
        ordered = sorted(wins, key=lambda m: -wins[m])
        lines.append(
            f"- **Best {LABELS[metric]}**: " + ", ".join(f"`{m}` in {wins[m]}" for m in ordered)
            + f" of the {len(cells)} cells where all of {', '.join(f'`{m}`' for m in mq)} ran"
        )
    for column in suite.metrics[1:]:
        mc, left, cells = compared(ranked, column)
        medians = _per_method([r for r in ranked if r["method"] in mc], column)
        if medians and column not in ("mask_l1", "temperature"):
            lines.append(
                f"- median {LABELS[column]} over {len(cells)} cells: " + ", ".join(f"`{m}` {_fmt(v)}" for m, v in medians.items())
                + (f" (not in every cell: {', '.join(f'`{m}`' for m in left)})" if left else "")
            )
    lines += _noise(ranked) + _limits(rows) + _speedups(rows, time)
    return lines


def _noise(rows) -> list[str]:
    """How precise the Monte-Carlo columns are, and how long the temperature searches were."""
    lines = []
    se = [r["jac_cos_se"] for r in rows if "jac_cos_se" in r]
    if se:
        lines.append(
            f"- {LABELS['jac_cos_se']} (the smoothed exact mask is a Monte-Carlo average): median {_fmt(nanmedian(se))}, "
            f"at most {_fmt(max(se))} over {len(se)} measurements; closer gradient cosines than about twice that are a tie"
        )
    evals = [r["search_evals"] for r in rows if "search_evals" in r]
    if evals:
        lines.append(
            f"- matched temperatures: {_fmt(nanmedian(evals))} forward calls per search (median; at most {max(evals)}), "
            "each within 3 % of its level or as close as the method gets (`mask_l1` in the CSV)"
        )
    draws = [(r["incl_se"], r["draws"]) for r in rows if "incl_se" in r]
    if draws:
        worst = max(draws)
        lines.append(
            f"- {LABELS['incl_se']}: at most {_fmt(worst[0])} ({worst[1]} draws of one slice; "
            f"{min(d for _, d in draws)}–{max(d for _, d in draws)} draws per cell): an exact design's max |P(i) - π_i| "
            "is a few of these, Gumbel top-k's is far more"
        )
    return lines


def _per_method(rows, column):
    """Median of ``column`` per method (methods without it left out)."""
    values = defaultdict(list)
    for r in rows:
        if column in r:
            values[r["method"]].append(r[column])
    return {m: nanmedian(v) for m, v in values.items() if not math.isnan(nanmedian(v))}


def _limits(rows) -> list[str]:
    """One line per method that did not run some cell: the largest n it ran and why it stopped."""
    lines, rows = [], _applicable(rows)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        failed = [r for r in mine if r["status"] != "ok"]
        if failed:
            done = [r["n"] for r in ok_rows(mine)]
            reached = f"ran up to n = {max(done)}" if done else "ran no cell"
            first = failed[0]
            lines.append(f"- `{method}` {reached}; first failure at n = {first['n']}, k = {first['k']}: {first['status']}")
    return lines


def _speedups(rows, time) -> list[str]:
    """Median time of each method relative to its suite's reference, cell by cell."""
    ratios = defaultdict(list)
    for cell in _cells(ok_rows(rows)).values():
        times = {r["method"]: r.get(time) for r in cell}
        for r in cell:
            base = times.get(r.get("baseline"))
            if base and r.get(time):
                ratios[r["method"], r["baseline"]].append(r[time] / base)
    return [
        f"- `{m}` takes {_fmt(nanmedian(v))}× the time of `{b}` (median over {len(v)} cells; < 1 is faster)"
        for (m, b), v in ratios.items()
    ]


def table(rows: list[dict], suite) -> list[str]:
    """A Markdown table: one line per input, one column per method, "quality · time" in each."""
    metric = suite.quality[0]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    level = any(r.get("level") is not None for r in rows)
    lines = [
        "| batch | n | k | " + ("level | " if level else "") + "dtype | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---:|---:|---:|" + ("---:|" if level else "") + "---|" + "---|" * len(methods),
    ]
    for (batch, n, k, dtype, _, lv, _), cell in _cells(rows).items():
        by_method = {r["method"]: r for r in cell}
        entries = []
        for m in methods:
            r = by_method.get(m)
            if r is None:
                entries.append("")
            elif r["status"] != "ok":
                entries.append(r["status"].split(":")[0])
            else:
                q = _fmt(r[metric]) + " · " if metric in r else ""
                entries.append(q + _fmt(r.get(suite.time, r.get("fwd_ms"))) + " ms")
        lines.append(f"| {batch} | {n} | {k} | " + (f"{lv} | " if level else "") + f"{dtype} | " + " | ".join(entries) + " |")
    legend = f"Each cell: {LABELS[metric]} · {LABELS[suite.time]}"
    extra = [LABELS[c] for c in suite.metrics if c != metric]
    return lines + ["", legend + (f" (the CSV also has {', '.join(extra)} and peak memory)." if extra else " (peak memory in the CSV).")]


def task_table(rows: list[dict]) -> list[str]:
    """The tasks suite as one table: a line per method, a column per task and k, "mean ± sd" of
    the test metric over the seeds, marked ✓ where the mean beats every baseline of the task."""
    from .tasks import TASKS

    ok = [r for r in ok_rows(rows) if "metric" in r]
    if not ok:
        return ["No task ran within the budgets."]
    columns = sorted(dict.fromkeys((r["task"], r["k"]) for r in ok), key=lambda c: (list(TASKS).index(c[0]), c[1]))
    methods = list(dict.fromkeys(r["method"] for r in ok if not r.get("reference")))
    baselines = list(dict.fromkeys(r["method"] for r in ok if r.get("reference")))
    at = {(r["method"], r["task"], r["k"]): r for r in ok}
    head = [f"{task}, k = {k}: {TASKS[task][3]} ({'↑' if TASKS[task][4] else '↓'})" for task, k in columns]
    lines = ["| method | " + " | ".join(head) + " | training s per run (median) |", "|---|" + "---|" * (len(columns) + 1)]
    wins = {}
    for m in methods + baselines:
        entries = []
        for task, k in columns:
            r = at.get((m, task, k))
            if r is None:
                entries.append("")
                continue
            entry = f"{r['metric']:.3f} ± {r.get('metric_std', 0):.3f}"
            base = [at[b, task, k]["metric"] for b in TASKS[task][1] if (b, task, k) in at]
            if not r.get("reference") and base:
                better = r["metric"] > max(base) if TASKS[task][4] else r["metric"] < min(base)
                entry += " ✓" if better else " ✗"
                wins.setdefault(m, []).append(better)
            entries.append(entry)
        times = [r["train_s"] for r in ok if r["method"] == m and "train_s" in r]
        label = f"baseline: {m}" if m in baselines else f"`{m}`"
        lines.append(f"| {label} | " + " | ".join(entries) + f" | {_fmt(nanmedian(times))} |")
    seeds = ok[0].get("seeds", "")
    steps = {}
    for r in ok:
        if not r.get("reference") and "steps" in r:
            steps.setdefault(r["task"], r["steps"])
    lines += [
        "",
        f"Mean ± standard deviation over {seeds} seeds (same seeds, steps and model for every method"
        + (f"; training steps: {', '.join(f'{t} {n}' for t, n in steps.items())}" if steps else "")
        + "); ✓: the mean beats every baseline of that task, ✗: it does not. Relaxations at their default temperature.",
        "",
    ]
    for task, k in columns:
        scored = [(at[m, task, k]["metric"], m) for m in methods if (m, task, k) in at]
        if scored:
            best = (max if TASKS[task][4] else min)(scored)
            lines.append(f"- {task}, k = {k}: best `{best[1]}` ({best[0]:.3f})")
    beats = [m for m in methods if m in wins and all(wins[m])]
    lines.append(f"- beat every baseline in every task: {', '.join(f'`{m}`' for m in beats) or 'none'}")
    return lines


def write_report(rows: list[dict], suites: dict, out: Path, header: list[str], plots: list[str]) -> Path:
    """Write ``out/report.md`` from the rows: header lines, summaries, tables and plots."""
    text = ["# khot bench report", "", *header, "", "## Which method when", ""]
    for name, suite in suites.items():
        mine = [r for r in rows if r["suite"] == name]
        if mine:
            text += [f"### {suite.title}", "", *(task_table(mine) if name == "tasks" else summary(mine, suite)), ""]
    for name, suite in suites.items():
        mine = [r for r in rows if r["suite"] == name]
        if mine and name != "tasks":
            text += [f"## `{name}`: {suite.title}", "", *table(mine, suite), ""]
            text += [f"![{p}]({p})" for p in plots if p.endswith(f"_{name}.png")] + [""]
        elif mine:
            text += [f"![{p}]({p})" for p in plots if p == "tasks.png"] + [""]
    path, partial = out / "report.md", out / ".report.md.partial"
    partial.write_text("\n".join(text))
    os.replace(partial, path)  # a reader (or a second Ctrl-C) never sees half a report
    return path
