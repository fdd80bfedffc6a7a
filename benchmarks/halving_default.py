"""Successive halving's default temperature: a sweep of selection quality and gradient usefulness.

    python benchmarks/halving_default.py [--seeds 3]

For each temperature (and the public code's default, base 20 with its ``softmax(20**s)``
weights), one row:

* nCCS against the exact top-k rows on the paper's grid cells (k, n) = (32, 1024),
  (128, 16384), (512, 16384), (2048, 4096), (8, 8192) (batch 16, d = 32; the problem of
  ``benchmarks/selection.py``);
* the feature-selection example (``examples/feature_selection.py``, i.e.
  :func:`khot.bench.tasks.features`: learn which k = 8 of the 64 digits pixels to keep through
  ``halving_topk``, then score the chosen pixels with a fresh linear classifier; 150 training
  steps each here, 300 in the example): test accuracy, mean over ``--seeds`` seeds (each its
  own data split and initialisation);
* the cosine between autograd's gradient of ``<g, halving_topk(x, 6)>`` and central finite
  differences, x ~ N(0, 1) of shape (8, 64), in float64 (1.0: the gradient is the derivative of
  what the forward computes; it says nothing about how informative it is, the accuracy does).

Sharper temperatures select better (nCCS); softer ones give gradients that train better
(accuracy). The default is, among the temperatures that beat the public code's default on every
cell (last column), the one with the best accuracy.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from khot.bench.suites import BASE_20, problem
from khot.bench.tasks import features
from khot.metrics import nccs
from khot.relaxed.halving import DEFAULT_TEMPERATURE, halving_select, halving_topk

CELLS = ((32, 1024), (128, 16384), (512, 16384), (2048, 4096), (8, 8192))
TEMPERATURES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


def selection_nccs(k: int, n: int, options: dict) -> float:
    x, s, top = problem(n, k)
    return nccs(halving_select(x, s, k, **options), top).mean().item()


def feature_accuracy(options: dict, seeds: int, steps: int = 150, k: int = 8) -> float:
    runs = [features(lambda z, k: halving_topk(z, k, **options), k, seed, steps) for seed in range(seeds)]
    return sum(runs) / len(runs)


def gradient_cosine(options: dict, k: int = 6) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g, dtype=torch.float64)
    probe = torch.randn(8, 64, generator=g, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    (halving_topk(leaf, k, **options) * probe).sum().backward()
    eps, numeric = 1e-6, torch.empty_like(x)
    for i in range(x.shape[-1]):
        step = torch.zeros_like(x)
        step[:, i] = eps
        numeric[:, i] = ((halving_topk(x + step, k, **options) - halving_topk(x - step, k, **options)) * probe).sum(-1) / (2 * eps)
    return F.cosine_similarity(leaf.grad.flatten(), numeric.flatten(), dim=0).item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the feature-selection example")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; khot's default temperature: {DEFAULT_TEMPERATURE}\n")
    public = [selection_nccs(k, n, dict(temperature=BASE_20, published_weights=True)) for k, n in CELLS]
    rows = {f"{t:g}": dict(temperature=t) for t in TEMPERATURES}
    rows[f"base 20 ({BASE_20:.3f})"] = dict(temperature=BASE_20)
    rows["base 20, public weights"] = dict(temperature=BASE_20, published_weights=True)
    head = " ".join(f"{f'{k}/{n}':>10}" for k, n in CELLS)
    print(f"{'':<24} {'nCCS at k/n':^54} {'':>9} {'digits':>7} {'grad':>7} {'beats the public':>17}")
    print(f"{'temperature':<24} {head} {'mean':>9} {'acc':>7} {'cos':>7} {'code everywhere':>17}", flush=True)
    for name, options in rows.items():
        scores = [selection_nccs(k, n, options) for k, n in CELLS]
        mean = math.fsum(scores) / len(scores)
        acc = feature_accuracy(options, args.seeds)
        cos = gradient_cosine(options)
        beats = all(a >= b for a, b in zip(scores, public))
        print(f"{name:<24} " + " ".join(f"{v:10.3f}" for v in scores) + f" {mean:9.3f} {acc:7.3f} {cos:7.4f} {beats!s:>17}", flush=True)


if __name__ == "__main__":
    main()
