"""``khot bench``: argument errors, a tiny real run (CSV, report, plots), budgets and Ctrl-C."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from khot.bench import runner
from khot.bench.report import COLUMNS, read_csv, write_report
from khot.bench.suites import SUITES, Cell, Method, Settings, Suite, TooSlow
from khot.cli import main

TINY = ["--n", "16,32", "--k", "2", "--batch", "2", "--no-progress"]


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv])
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "abc"], "expected comma-separated positive integers"),
        (["--n", "0"], "expected positive integers"),
        (["--k", "1.5"], "expected comma-separated positive integers"),
        (["--suites", "nope"], "unknown suite(s) 'nope'; choose from selection, masks, exact, sampling"),
        (["--dtype", "int8"], "unknown dtype(s) 'int8'; choose from float32"),
        (["--n", "4", "--k", "8"], "nothing to run"),
        (["--budget", "-1"], "expected a positive number"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--suites", ""], "expected comma-separated names, got ''"),
        (["--methods", " , "], "expected comma-separated names"),
        (["--device", "meta"], "--device meta: meta tensors hold no data"),
        (["--n", "2**100"], "expected integers below 2**63"),
        (["--n", "2**40", "--k", "2"], "exceeds the 2 GiB memory budget"),
        (["--n", "2**99999999"], "expected comma-separated positive integers"),
        (["--seed", "2**70"], "expected an integer from 0 to 2**64 - 1, got '2**70'"),
        (["--seed", "-1"], "expected an integer from 0 to 2**64 - 1"),
        (["--levels", "0.3,1"], "expected comma-separated numbers between 0 and 1"),
    ],
)
def test_argument_errors(capsys, argv, message):
    assert message in _error(capsys, *argv)


def _bad_outputs(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    # root writes into a 0o555 folder anyway; /sys refuses new entries even to root
    locked = read_only / "out" if not os.access(read_only, os.W_OK) else Path("/sys/khot-bench-test")
    return {"existing file": (file, "is a file, not a folder"), "under a file": (file / "out", "Not a directory"),
            "read-only": (locked, "cannot write a report there")}  # fmt: skip


@pytest.mark.parametrize("case", ["existing file", "under a file", "read-only"])
def test_unwritable_out_is_one_line_and_exit_2(tmp_path, capsys, case):
    out, message = _bad_outputs(tmp_path)[case]
    err = _error(capsys, "--suites", "exact", "--out", str(out), *TINY)
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("khot bench: error: --out")


def test_no_number_at_all_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_measure", lambda task, history: {"status": "error: RuntimeError: boom"})
    assert main(["bench", "--suites", "exact", "--out", str(tmp_path / "r"), *TINY]) == 1
    assert "no measurement produced a number" in capsys.readouterr().err
    assert "error" in (tmp_path / "r" / "report.md").read_text()


def test_second_ctrl_c_while_plotting_keeps_a_readable_report(tmp_path, monkeypatch, capsys):
    from khot.bench import plots

    def interrupt(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot", interrupt)
    out = tmp_path / "r"
    assert main(["bench", "--suites", "exact", "--out", str(out), *TINY]) == 130
    report = (out / "report.md").read_text()
    assert "| batch | n | k | dtype | `topk_mask`" in report  # the tables, without plots
    assert "has them without plots" in capsys.readouterr().err
    assert not list(out.glob(".report.md*"))


def test_bad_method_lists_the_valid_ones(capsys):
    err = _error(capsys, "--suites", "masks", "--methods", "sigmoid,nope")
    assert "unknown method(s) 'nope'" in err
    assert all(name in err for name in ("sigmoid", "halving", "iterative", "counting"))


def test_too_many_threads_is_a_one_line_error(capsys):
    # passed straight to torch.set_num_threads: 100000 made OpenMP segfault
    assert "expected at most" in _error(capsys, "--threads", "100000")


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "COMMAND" in capsys.readouterr().err


def test_tiny_run_writes_csv_report_and_plots(tmp_path):
    out = tmp_path / "report"
    argv = ["bench", "--suites", "masks,exact", "--methods", "sigmoid,halving,topk_mask", "--levels", "0.1", "--out", str(out), *TINY]
    assert main(argv) == 0
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    by = {(r["suite"], r["method"], int(r["n"])): r for r in rows}
    # the chosen methods plus each suite's references, at both sizes; nothing else
    assert {m for _, m, _ in by} == {"sigmoid", "halving", "torch-topk", "softmax", "topk_mask", "torch-topk-mask", "torch-topk-keep"}
    assert all(r["status"] == "ok" and float(r["fwd_ms"]) > 0 for r in rows)
    assert all((r["batch"], r["k"], r["dtype"], r["device"]) == ("2", "2", "float32", "cpu") for r in rows)
    assert all(r["torch"] == torch.__version__ for r in rows)
    sigmoid = by["masks", "sigmoid", 16]
    assert float(sigmoid["sum_err"]) < 1e-4  # sums to k
    assert float(sigmoid["level"]) == 0.1 and abs(float(sigmoid["mask_l1"]) - 0.1) <= 0.003  # matched sharpness
    assert abs(float(by["masks", "halving", 16]["mask_l1"]) - 0.1) <= 0.003
    assert float(sigmoid["grad_cos"]) > 0.999  # closed-form backward vs finite differences
    assert 0 < float(sigmoid["jac_cos"]) <= 1
    assert float(sigmoid["fwd_bwd_ms"]) > 0
    assert float(by["exact", "topk_mask", 32]["mask_l1"]) == 0  # same mask as torch.topk + scatter
    assert by["exact", "topk_mask", 32]["fwd_bwd_ms"] == ""  # a bool mask has no backward
    report = (out / "report.md").read_text()
    again = write_report(read_csv(out / "results.csv"), {s: SUITES[s] for s in ("masks", "exact")}, tmp_path, [], [])
    assert again.read_text().split("## Which method when")[1].split("## `")[0] in report  # the CSV round-trips
    assert "## Which method when" in report and "| batch | n | k | level | dtype | `sigmoid` | `halving`" in report
    assert "takes" in report and "the time of `softmax`" in report
    assert "- cells run: `masks`: 2 cells, n ∈ {16, 32}, k ∈ {2}" in report and "`--full`: 7 more cells, n ∈ {100000, 1000000, 10000000}" in report
    assert "Monte-Carlo standard error of that cos" in report and "forward calls per search" in report
    if importlib.util.find_spec("matplotlib"):
        assert {"time_masks.png", "quality_masks.png", "time_exact.png"} <= {p.name for p in out.glob("*.png")}
        assert "![time_masks.png](time_masks.png)" in report


def test_ctrl_c_keeps_results(tmp_path, monkeypatch):
    calls = []
    measure = runner._measure

    def interrupt_second(task, history):
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(task, history)

    monkeypatch.setattr(runner, "_measure", interrupt_second)
    out = tmp_path / "r"
    assert main(["bench", "--suites", "exact", "--out", str(out), *TINY]) == 130
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
    assert "interrupted (Ctrl-C): partial results" in (out / "report.md").read_text()


def _task(measure, cell, memory=None, budget=1.0):
    suite = Suite("t", (), (), dict, measure, ("mask_l1", False))
    settings = Settings(torch.device("cpu"), torch.float32, budget_s=budget)
    return runner.Task("t", suite, cell, settings, "m", Method(lambda x, k: x, memory=memory))


def test_budgets_and_failures_become_rows():
    history = {}
    slow = lambda *a: (_ for _ in ()).throw(TooSlow(3.0))  # noqa: E731
    assert runner._measure(_task(slow, Cell(1, 10, 1)), history)["status"] == "too slow: 3.0 s per call > 1 s budget"
    assert runner._measure(_task(slow, Cell(1, 20, 1)), history)["status"] == "skipped: too slow at n = 10"
    huge = _task(lambda *a: {}, Cell(1, 10, 1), memory=lambda b, n, k: 2**40)
    assert runner._measure(huge, {})["status"].startswith("skipped: needs ~1.02e+03 GiB")
    boom = lambda *a: (_ for _ in ()).throw(RuntimeError("boom\nmore"))  # noqa: E731
    assert runner._measure(_task(boom, Cell(1, 10, 1)), {})["status"] == "error: RuntimeError: boom"
    history = {}
    fast = lambda *a: {"fwd_ms": 600.0}  # noqa: E731  0.6 s at n = 10: n = 20 predicts 1.2 s > 1 s
    assert runner._measure(_task(fast, Cell(1, 10, 1)), history)["status"] == "ok"
    assert runner._measure(_task(fast, Cell(1, 20, 1)), history)["status"].startswith("skipped: ~1.2 s per call predicted")


def test_suites_have_valid_default_cells():
    for suite in SUITES.values():
        for cell in suite.cells + suite.full:
            assert 0 < cell.k < cell.n and cell.batch > 0


def test_a_method_added_to_the_registry_is_benchmarked(monkeypatch):
    import khot
    from khot.bench import suites, tasks

    class Record:  # the fields of a khot.methods() record that the bench reads
        def __init__(self, name, mask, stochastic=False):
            self.name, self.mask, self.default_temperature, self.stochastic, self.cost = name, mask, 1.0, stochastic, "O(n)"

    def noisy(x, k, dim=-1, *, temperature, generator=None):
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        return khot.sigmoid_topk(x + 1e-3 * noise, k, dim, temperature=temperature)

    records = [Record("sigmoid", khot.sigmoid_topk), Record("noisy", noisy, stochastic=True)]
    monkeypatch.setattr(khot, "methods", lambda: records, raising=False)
    masks = SUITES["masks"].methods()
    assert {"sigmoid", "noisy"} <= set(masks) and "halving" not in masks
    assert {"sigmoid", "noisy", tasks.SAMPLER} <= set(SUITES["tasks"].methods())
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(masks["noisy"].fn(x, 4), masks["noisy"].fn(x, 4))  # a seeded generator
    row = suites._measure_masks(masks["noisy"], Cell(2, 40, 4, 0.1), Settings(torch.device("cpu"), torch.float32, min_run_time=0))
    assert abs(row["mask_l1"] - 0.1) <= 0.003 and row["temperature"] > 0


def test_matched_temperature_reaches_the_level():
    import khot
    from khot.bench.suites import matched_temperature

    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for level in (0.3, 0.03):
        t, reached = matched_temperature(lambda z, k, t: khot.sigmoid_topk(z, k, temperature=t), x, 20, level)
        exact = torch.zeros_like(x).scatter_(-1, x.argsort(-1, descending=True)[:, :20], 1.0)  # independent of topk_mask
        again = (khot.sigmoid_topk(x, 20, temperature=t) - exact).abs().sum(-1).div(40).mean().item()
        assert abs(again - level) <= 0.03 * level and again == pytest.approx(reached)


def test_smoothed_exact_gradient_matches_the_closed_form_for_two_items():
    # n = 2, k = 1: E[mask_0] = Φ(d / (σ√2)) with d = x0 - x1, at distance 1 - Φ(d / (σ√2)) from the exact mask
    from khot.bench.suites import smoothed_exact_gradient

    normal = torch.distributions.Normal(0.0, 1.0)
    x, g, level = torch.tensor([[0.3, -0.2]], dtype=torch.float64), torch.tensor([[1.5, -0.5]], dtype=torch.float64), 0.2
    scale = 0.5 / normal.icdf(torch.tensor(1 - level)).item()  # σ√2
    slope = normal.log_prob(torch.tensor(0.5 / scale)).exp().item() / scale
    expected = torch.tensor([[slope * 2.0, -slope * 2.0]], dtype=torch.float64)  # (g0 - g1) φ / (σ√2), ± for x0, x1
    got = smoothed_exact_gradient(x, 1, level, g, seed=0)
    assert torch.allclose(got, expected, rtol=0.1)


def test_summary_compares_only_methods_that_ran_in_every_cell():
    from khot.bench.report import summary

    def row(method, n, quality, ms):
        return {"suite": "t", "method": method, "status": "ok", "batch": 1, "n": n, "k": 1, "dtype": "float32",
                "device": "cpu", "mask_l1": quality, "fwd_bwd_ms": ms}  # fmt: skip

    rows = [row("small-only", 8, 0.0, 1.0), row("a", 8, 0.2, 2.0), row("a", 64, 0.3, 3.0), row("b", 8, 0.1, 5.0)]
    rows += [row("b", 64, 0.2, 6.0), {**row("small-only", 64, 0, 0), "status": "skipped: ~9 s per call predicted"}]
    suite = Suite("t", (), (), dict, None, ("mask_l1", False), metrics=("mask_l1",), by="k")
    text = "\n".join(summary(rows, suite))
    assert "| 1 | `b` (0.15) |" in text  # the median over both cells, among a and b only (small-only had 0 at n = 8)
    assert "`small-only` (ran n ≤ 8)" in text  # left out, and said so
    assert "of the 2 cells where all of `a`, `b` ran" in text


def test_task_table_says_which_method_beats_the_baselines():
    from khot.bench.report import task_table

    def row(method, task, k, metric, reference=0):
        return {"suite": "tasks", "method": method, "status": "ok", "task": task, "batch": 3, "n": 64, "k": k,
                "dtype": "float32", "device": "cpu", "metric": metric, "metric_std": 0.01, "seeds": 3, "train_s": 1.0,
                "reference": reference}  # fmt: skip

    rows = [row("random pixels", "features", 8, 0.55, 1), row("highest variance", "features", 8, 0.80, 1)]
    rows += [row("good", "features", 8, 0.85), row("bad", "features", 8, 0.70), row("exact top-k", "sae", 2, 0.4, 1)]
    rows += [row("good", "sae", 2, 0.3), row("bad", "sae", 2, 0.5)]
    text = "\n".join(task_table(rows))
    assert "| `good` | 0.850 ± 0.010 ✓ | 0.300 ± 0.010 ✓ |" in text  # higher accuracy, lower FVU: both beat the baselines
    assert "| `bad` | 0.700 ± 0.010 ✗ | 0.500 ± 0.010 ✗ |" in text
    assert "beat every baseline in every task: `good`" in text


def test_matched_temperature_needs_few_calls_and_stops_where_a_method_cannot_reach():
    import khot
    from khot.bench.suites import matched_temperature

    x = torch.randn(4, 500, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for level in (0.3, 0.1, 0.03):
        evals = []
        matched_temperature(lambda z, k, t: khot.sigmoid_topk(z, k, temperature=t), x, 50, level, evals=evals)
        assert evals[0] <= 6  # a bisection from τ = 1 took 8-10
    # a relaxation with a noise floor: never closer than 0.5 to the exact mask
    floor = lambda z, k, t: 0.5 * khot.sigmoid_topk(z, k, temperature=t) + 0.5 * k / z.shape[-1]  # noqa: E731
    evals = []
    _, reached = matched_temperature(floor, x, 50, 0.1, evals=evals)
    assert reached > 0.4 and evals[0] <= 10


def test_a_relaxation_that_cannot_reach_the_level_is_not_scored():
    import khot
    from khot.bench import suites

    method = Method(None, tempered=lambda z, k, t: 0.5 * khot.sigmoid_topk(z, k, temperature=t) + 0.5 * k / z.shape[-1])
    row = suites._measure_masks(method, Cell(2, 40, 4, 0.1), Settings(torch.device("cpu"), torch.float32, min_run_time=0))
    assert row["status"].startswith("out of reach") and "fwd_ms" not in row and "jac_cos" not in row
    history = {}
    task = runner.Task("masks", SUITES["masks"], Cell(2, 40, 4, 0.1), Settings(torch.device("cpu"), torch.float32), "m", method)
    assert runner._measure(task, history)["status"].startswith("out of reach")
    bigger = runner.Task("masks", SUITES["masks"], Cell(2, 80, 8, 0.1), task.settings, "m", method)
    assert runner._measure(bigger, history)["status"] == "skipped: out of reach at n = 40"


def test_cosine_standard_error_matches_the_spread_of_noisy_references():
    from khot.bench.suites import cosine_se

    g = torch.Generator().manual_seed(5)
    grad, truth = torch.randn(3, 50, generator=g, dtype=torch.float64), torch.randn(3, 50, generator=g, dtype=torch.float64)
    se = torch.full_like(truth, 0.05)
    cosines = torch.stack([
        torch.nn.functional.cosine_similarity(grad, truth + se * torch.randn(truth.shape, generator=g, dtype=torch.float64), dim=-1).mean()
        for _ in range(2000)
    ])  # fmt: skip
    assert cosine_se(grad, truth, se) == pytest.approx(cosines.std().item(), rel=0.15)


def test_a_slow_call_is_timed_once_after_its_first_call():
    import time

    from khot.bench.suites import time_ms

    calls = []
    slow = lambda: (calls.append(1), time.sleep(0.03))  # noqa: E731
    ms, mib = time_ms(slow, Settings(torch.device("cpu"), torch.float32, min_run_time=0.02), peak=True)
    assert len(calls) == 2 and ms >= 30  # the first call (a warm-up) and the timed one, which also gives the peak
    calls.clear()
    with pytest.raises(TooSlow):
        time_ms(slow, Settings(torch.device("cpu"), torch.float32, min_run_time=0.01, budget_s=0.01))
    assert len(calls) == 2
