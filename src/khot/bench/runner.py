"""Runs a plan of measurements: budgets, skips, errors, progress and the CSV, row by row.

A cell a method cannot run becomes a row that says why, never a crash:

* ``skipped: needs ~X GiB`` when the method's memory estimate exceeds the memory budget;
* ``skipped: ~X s predicted`` when its time on the last cell it ran, scaled by its
  ``work``, exceeds the time budget (so an O(n²) method stops before it stalls the run);
* ``too slow: X s per call`` when one call exceeded the time budget;
* ``out of memory`` and ``error: ...`` for failures, ``out of reach: ...`` where a relaxation
  cannot be made as close to the exact mask as the cell asks, and ``skipped: ... at n = N``
  for bigger cells of a method that already failed.

Ctrl-C stops the run; the rows so far are in the CSV and the caller writes the report.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import khot

from . import peers
from .report import CsvLog
from .suites import Cell, Method, Settings, Suite, TooSlow

__all__ = ["Task", "run"]


@dataclass(frozen=True)
class Task:
    """One measurement: a method of a suite on one cell, with one set of settings."""

    suite: str
    spec: Suite
    cell: Cell
    settings: Settings
    method: str
    impl: Method


def _version(source: str) -> str:
    return {"khot": khot.__version__, "torch": torch.__version__}.get(source) or peers.version(source)


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr, or ``None`` to print plain lines (tqdm missing or progress off)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="cell", dynamic_ncols=True)


def _measure(task: Task, history: dict) -> dict:
    """Measure one task, or say why not; ``history`` holds each method's last success or failure."""
    cell, s, m = task.cell, task.settings, task.impl
    key = (task.suite, s.dtype, task.method, cell.level, cell.task)
    last_ok, failed = history.get(key, (None, None))
    if failed and m.work(cell) >= m.work(failed[0]):
        return {"status": f"skipped: {failed[1].split(':')[0]} at n = {failed[0].n}"}
    if m.memory and m.memory(cell.batch, cell.n, cell.k) > s.memory_bytes:
        gib = m.memory(cell.batch, cell.n, cell.k) / 2**30
        return {"status": f"skipped: needs ~{gib:.3g} GiB > {s.memory_bytes / 2**30:.3g} GiB budget"}
    if last_ok:
        predicted = last_ok[1] * m.work(cell) / m.work(last_ok[0])
        if predicted > s.budget_s:
            return {"status": f"skipped: ~{predicted:.3g} s per call predicted > {s.budget_s:g} s budget"}
    try:
        row = {"status": "ok", **task.spec.measure(m, cell, s)}
    except TooSlow as e:
        status = f"too slow: {e} > {s.budget_s:g} s budget"
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        first = (str(e).strip().splitlines() or [""])[0]
        status = "out of memory" if "memory" in first.lower() else f"error: {type(e).__name__}: {first[:120]}"
    except (ValueError, TypeError, AssertionError, NotImplementedError) as e:
        status = f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
    else:
        if row["status"] != "ok":  # the suite says why (e.g. "n/a": another task's baseline)
            if row["status"].startswith("out of reach"):  # bigger cells are not expected to do better
                history[key] = (last_ok, (cell, row["status"]))
            return row
        seconds = max(row.get("fwd_bwd_ms", 0.0), row.get("fwd_ms", 0.0)) / 1e3  # training runs have no per-call time
        history[key] = ((cell, seconds), None)
        return row
    history[key] = (last_ok, (cell, status))
    return {"status": status}


def run(tasks: list[Task], csv_path: Path, progress: bool = True) -> tuple[list[dict], bool]:
    """Run the tasks in order, appending each row to ``csv_path``; returns the rows and whether Ctrl-C stopped it."""
    log, rows, history = CsvLog(csv_path), [], {}
    bar = _progress(len(tasks), progress)
    try:
        for i, t in enumerate(tasks, 1):
            extra = "".join(f" {v}" for v in (t.cell.level, t.cell.task) if v is not None)
            label = f"{t.suite} {t.method} b={t.cell.batch} n={t.cell.n} k={t.cell.k}{extra} {str(t.settings.dtype)[6:]}"
            if bar is not None:
                bar.set_postfix_str(label, refresh=False)
            row = {
                "suite": t.suite, "method": t.method, "source": t.impl.source, "version": _version(t.impl.source),
                "reference": int(t.impl.reference), "baseline": t.impl.baseline or "",
                "task": t.cell.task, "batch": t.cell.batch, "n": t.cell.n, "k": t.cell.k, "level": t.cell.level,
                "dtype": str(t.settings.dtype)[6:],
                "device": str(t.settings.device), **_measure(t, history),
                "torch": torch.__version__, "khot": khot.__version__,
            }  # fmt: skip
            log.write(row)
            rows.append(row)
            if bar is not None:
                bar.update()
            else:
                value, unit = row.get(t.spec.time, row.get("fwd_ms")), t.spec.time.rsplit("_", 1)[-1]
                print(f"[{i}/{len(tasks)}] {label}: {f'{value:.3g} {unit}' if row['status'] == 'ok' else row['status']}", file=sys.stderr)
    except KeyboardInterrupt:
        return rows, True
    finally:
        log.close()
        if bar is not None:
            bar.close()
    return rows, False
