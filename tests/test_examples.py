"""The examples run end to end at tiny size (``--tiny``)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--tiny"])


def test_feature_selection(capsys):
    pytest.importorskip("sklearn")
    results = _run("feature_selection")
    assert {"random pixels", "highest variance", "sigmoid", "halving", "sample (πps, straight-through)"} <= set(results)
    assert all(0 <= acc <= 1 for acc in results.values())
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["moe", "sparse_autoencoder"])
def test_training_examples(name, capsys):
    loss = _run(name)
    assert math.isfinite(loss) and loss > 0
    assert "final mse" in capsys.readouterr().out


def test_tp_sampling(capsys):
    result = _run("tp_sampling")  # launches 2 gloo processes
    assert result["same_on_every_rank"] and result["in_top_k_of_full_logits"]
    assert "same tokens on every rank: True" in capsys.readouterr().out
