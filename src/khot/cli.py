"""The ``khot`` command line (also ``python -m khot``). One command for now: ``khot bench``."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from . import __version__

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

BENCH_HELP = """\
Benchmark every top-k method of khot, and the peers that are installed, side by side.

Suites: selection (the successive-halving paper's grid, nCCS; Pietruszka et al. 2021), masks
(relaxed k-hot masks up to n = 10^6, every method at the same three sharpness levels: time,
|Σ - k|, gradient checks), exact (against torch.topk + scatter), sampling (πps designs:
chi-square test of the inclusion probabilities, time) and tasks (the same small models trained
through each relaxation and sampler, 3 seeds: pixel selection and kNN on scikit-learn's digits,
a TopK sparse autoencoder). The defaults take about three minutes of one CPU core (--threads 1);
--full runs the published grids with more draws, finite differences on every item and longer
training (hours). Writes results.csv (one row per measurement, flushed as it goes),
report.md and PNG plots to --out. A cell that cannot run within the budgets gets a row that
says why. Ctrl-C stops and still writes the report.

examples:
  khot bench                                   # defaults, CPU
  khot bench --suites masks --methods sigmoid,entmax-budget --n 1000,100000 --k 100 --levels 0.1
  khot bench --device cuda --full --out gpu-report
"""


def _ints(text: str) -> list[int]:
    """Comma-separated positive integers; ``1e6`` and ``2**14`` are accepted."""
    try:
        values = [_int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 16,1024 or 1e6), got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    if any(v >= 2**63 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers below 2**63 (a tensor size), got {text!r}")
    return values


def _int(part: str) -> int:
    part = part.strip()
    if "**" in part:
        base, exponent = (int(v) for v in part.split("**"))
        if exponent > 256:  # far past any size or seed, and not worth computing
            raise ValueError(part)
        return base**exponent
    value = float(part)
    if not value.is_integer():
        raise ValueError(part)
    return int(value)


def _count(text: str) -> int:
    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _threads(text: str) -> int:
    count, most = _count(text), 4 * (os.cpu_count() or 1)
    if count > most:  # torch.set_num_threads takes any count: OpenMP fails to start the threads, or crashes
        raise argparse.ArgumentTypeError(f"expected at most {most} threads (4 per CPU here), got {count}")
    return count


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _seed(text: str) -> int:
    """A seed ``torch.Generator.manual_seed`` takes: 0 <= seed < 2**64."""
    try:
        value = _int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64 - 1, got {text!r}")
    return value


def _levels(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers between 0 and 1 (e.g. 0.3,0.1), got {text!r}")
    return values


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark all methods and peers", description=BENCH_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--suites", type=_names, help="comma-separated: selection, masks, exact, sampling, tasks (default: all)")
    p.add_argument("--methods", type=_names, help="comma-separated method names (default: all; references always run)")
    p.add_argument("--n", type=_ints, help="sizes n to run instead of each suite's defaults")
    p.add_argument("--k", type=_ints, help="values of k instead of the defaults (cells need k < n)")
    p.add_argument("--levels", type=_levels, help="sharpness levels of the masks suite: L1 distance to the exact mask / 2k (default 0.3,0.1,0.03)")
    p.add_argument("--batch", type=_ints, help="batch sizes instead of the defaults")
    p.add_argument("--dtype", type=_names, default=["float32"], help=f"comma-separated, from {', '.join(DTYPES)} (default float32)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--full", action="store_true", help="the published grids, with larger budgets (long)")
    p.add_argument("--out", type=Path, default=Path("khot-report"), help="output folder (default khot-report/)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of every input and sample (default 0)")
    p.add_argument("--budget", type=_positive, help="seconds one call may take (default 2, 30 with --full)")
    p.add_argument("--memory", type=_positive, help="GiB a method's estimate may need (default 2, 16 with --full)")
    p.add_argument("--threads", type=_threads, help="CPU threads for torch (default: torch's; 1 avoids OpenMP stalls on busy machines)")
    p.add_argument("--no-progress", action="store_true", help="plain lines instead of a progress bar")
    return p


def _plan(args, error):
    """The tasks the arguments ask for, or ``error(message)``."""
    from .bench.runner import Task
    from .bench.suites import SUITES, Cell, Settings

    unknown = [s for s in args.suites or () if s not in SUITES]
    if unknown:
        error(f"unknown suite(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SUITES)}")
    suites = {name: SUITES[name] for name in args.suites or SUITES}
    bad = [d for d in args.dtype if d not in DTYPES]
    if bad:
        error(f"unknown dtype(s) {', '.join(map(repr, bad))}; choose from {', '.join(DTYPES)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        error(f"--device {args.device}: CUDA is not available (torch {torch.__version__}, no GPU or a CPU build)")
    if device.type == "meta":
        error("--device meta: meta tensors hold no data, so nothing can be timed or scored; choose cpu or cuda")
    try:
        torch.ones(1, device=device).sum().item()
    except (RuntimeError, AssertionError) as e:
        error(f"--device {args.device}: cannot compute on it ({(str(e).strip().splitlines() or [''])[0]})")
    methods = {name: suite.methods() for name, suite in suites.items()}
    valid = dict.fromkeys(m for ms in methods.values() for m in ms)
    unknown = [m for m in args.methods or () if m not in valid]
    if unknown:
        error(f"unknown method(s) {', '.join(map(repr, unknown))} in suites {', '.join(suites)}; choose from {', '.join(valid)}")
    budget = args.budget or (30.0 if args.full else 2.0)
    memory = (args.memory or (16 if args.full else 2)) * 2**30
    tasks, too_big = [], []
    for name, suite in suites.items():
        wanted = {m: impl for m, impl in methods[name].items() if impl.reference or not args.methods or m in args.methods}
        if all(impl.reference for impl in wanted.values()):
            continue
        cells = dict.fromkeys(
            Cell(b, n, k, level, c.task)
            for c in (suite.full if args.full else suite.cells)
            for level in (args.levels or [c.level] if c.level is not None else [None])
            for b in args.batch or [c.batch]
            for n in args.n or [c.n]
            for k in args.k or [c.k]
            if k < n
        )
        itemsize = max(DTYPES[d].itemsize for d in args.dtype)
        too_big += [c for c in cells if c.batch * c.n * itemsize > memory]
        cells = [c for c in cells if c.batch * c.n * itemsize <= memory]
        for dtype in args.dtype:
            s = Settings(device, DTYPES[dtype], args.seed, 0.5 if args.full else 0.05, budget, memory, args.full)
            tasks += [Task(name, suite, c, s, m, impl) for c in sorted(cells, key=lambda c: (c.n, c.k, c.batch)) for m, impl in wanted.items()]
    if not tasks and too_big:
        c = max(too_big, key=lambda c: c.batch * c.n)
        error(
            f"nothing to run: the input alone (batch {c.batch} × n {c.n} × {itemsize} bytes = "
            f"{c.batch * c.n * itemsize / 2**30:.3g} GiB) exceeds the {memory / 2**30:g} GiB memory budget (--memory)"
        )
    if not tasks:
        error(f"nothing to run: no cell has k < n (--n {args.n}, --k {args.k}) or no method in the chosen suites")
    return suites, tasks


def _output_folder(out: Path, error) -> None:
    """Create ``out`` and check that files can be written in it, or ``error(message)`` in one line."""
    if out.exists() and not out.is_dir():
        error(f"--out {str(out)!r}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".khot-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        where = f" ({e.filename})" if e.filename and Path(e.filename) != out else ""
        error(f"--out {str(out)!r}: cannot write a report there: {reason}{where}")


def _values(name: str, values) -> str:
    values = sorted(set(values))
    if len(values) <= 6:
        return f"{name} ∈ {{{', '.join(str(v) for v in values)}}}"
    return f"{name} = {values[0]} … {values[-1]} ({len(values)} values)"


def _scope(suites: dict, tasks: list, full: bool) -> list[str]:
    """What the run covered, suite by suite, and what ``--full`` adds to a default run."""
    from .bench.suites import DRAWS, FULL_DRAWS
    from .bench.tasks import SAE_BATCH, STEPS

    lines = []
    for name, suite in suites.items():
        cells = list(dict.fromkeys(t.cell for t in tasks if t.suite == name))
        if not cells:
            continue
        text = f"`{name}`: {len(cells)} cells, {_values('n', (c.n for c in cells))}, {_values('k', (c.k for c in cells))}"
        if name == "tasks":
            seeds = tasks[0].settings.seed
            steps = ", ".join(f"{task} {STEPS[task][full]}" for task in STEPS)
            text += f", seeds {', '.join(str(seeds + i) for i in range(cells[0].batch))}, training steps: {steps}, sae batch {SAE_BATCH[full]}"
        if name == "sampling":
            text += f", at most {FULL_DRAWS if full else DRAWS} draws of one slice per design"
        if not full:
            more = [c for c in suite.full if (c.n, c.k, c.level, c.task) not in {(d.n, d.k, d.level, d.task) for d in suite.cells}]
            extra = []
            if more:
                extra.append(f"{len(more)} more cells, {_values('n', (c.n for c in more))}")
            if name == "tasks":
                extra.append("training steps " + ", ".join(f"{task} {STEPS[task][True]}" for task in STEPS) + f", sae batch {SAE_BATCH[True]}")
            if name == "sampling":
                extra.append(f"{FULL_DRAWS} draws")
            if extra:
                text += f" (`--full`: {'; '.join(extra)})"
        lines.append(text)
    scope = "- cells run: " + "; ".join(lines)
    if not full:
        scope += ". `--full` also times each call for 0.5 s instead of 0.05 s, with budgets of 30 s and 16 GiB per call"
    return [scope]


def bench(args, error, command: str) -> int:
    """``khot bench``: run the plan, then write the CSV, plots and report.md into ``args.out``."""
    from .bench import peers, plots, report, runner

    suites, tasks = _plan(args, error)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _output_folder(args.out, error)
    print(f"khot bench: {len(tasks)} measurements -> {args.out}/", file=sys.stderr)
    for line in peers.missing():
        print(f"peer {line}", file=sys.stderr)
    start = time.perf_counter()
    rows, interrupted = runner.run(tasks, args.out / "results.csv", not args.no_progress)
    wall = time.perf_counter() - start
    ran = {name: suite for name, suite in suites.items() if any(r["suite"] == name for r in rows)}
    installed = [f"{p} {peers.version(p)}" for p in peers.PEERS if peers.load(p)]
    header = [
        f"`khot {command}`",
        "",
        f"- {datetime.datetime.now():%Y-%m-%d %H:%M}, device `{tasks[0].settings.device}` "
        f"({platform.machine()}, {torch.get_num_threads()} threads), khot {__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- budgets per cell: {tasks[0].settings.budget_s:g} s per call, {tasks[0].settings.memory_bytes / 2**30:g} GiB "
        f"(estimated, for O(n²) peers); wall time {wall:.0f} s for {len(rows)} measurements"
        + (" — **interrupted (Ctrl-C): partial results**" if interrupted else ""),
        f"- peers: {', '.join(installed) or 'none installed'}" + "".join(f"; {m}" for m in peers.missing()),
        "- references (`torch-topk*`, `softmax`, `torch-sort`) are timed for comparison, not ranked",
        *_scope(ran, tasks, args.full),
    ]
    path = None
    try:  # the tables first (written atomically), then the plots, then the report again with them
        path = report.write_report(rows, ran, args.out, header, [])
        names, note = plots.plot(rows, ran, args.out)
        path = report.write_report(rows, ran, args.out, header + ([f"- {note}"] if note else []), names)
    except KeyboardInterrupt:
        done = f"{path} has them without plots" if path else "no report.md was written"
        print(f"interrupted while writing the report: {args.out / 'results.csv'} has every measured row; {done}", file=sys.stderr)
        return 130
    if note:
        print(note, file=sys.stderr)
    print(f"{'interrupted; partial ' if interrupted else ''}report: {path} ({wall:.0f} s)", file=sys.stderr)
    if interrupted:
        return 130
    if not report.ok_rows(rows):
        print("no measurement produced a number: every cell failed or was skipped (see report.md)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``khot`` console script."""
    parser = argparse.ArgumentParser(prog="khot", description="khot: top-k for PyTorch, exact, differentiable and sampled.")
    parser.add_argument("--version", action="version", version=f"khot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_parser = _bench_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    return bench(args, bench_parser.error, shlex.join(argv))
