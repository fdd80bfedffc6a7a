"""The examples run end to end at tiny size (``--tiny``), and each answers ``--help``."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name: str):
    return _module(name).main(["--tiny"])


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.stem)
def test_every_example_takes_help_and_tiny(path, capsys):
    source = path.read_text()
    assert '"--tiny"' in source  # the README promises --tiny for every example
    with pytest.raises(SystemExit) as exit_:
        _module(path.stem).main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--tiny" in out and out.startswith("usage:")


def test_feature_selection(capsys):
    pytest.importorskip("sklearn")
    results = _run("feature_selection")
    assert {"random pixels", "highest variance", "sigmoid", "halving", "sample (πps)"} <= set(results)
    assert all(0 <= acc <= 1 for acc in results.values())
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["moe", "sparse_autoencoder"])
def test_training_examples(name, capsys):
    loss = _run(name)
    assert math.isfinite(loss) and loss > 0
    assert "final mse" in capsys.readouterr().out


def test_demo_shows_what_it_measured(capsys):
    ratio = _run("demo")
    out = capsys.readouterr().out
    assert ratio > 0 and f"{ratio:.2f}x the time" in out
    assert "less time and memory" not in out and "the same output as plain PyTorch" in out


def test_tp_sampling(capsys):
    result = _run("tp_sampling")  # launches 2 gloo processes
    assert result["same_on_every_rank"] and result["in_top_k_of_full_logits"]
    assert "same tokens on every rank: True" in capsys.readouterr().out
