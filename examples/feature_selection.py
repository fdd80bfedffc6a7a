"""Differentiable feature selection on scikit-learn's digits: which k of the 64 pixels to keep?

Each method learns logits over the 64 pixels jointly with a linear classifier on the
masked image: the relaxations of :func:`khot.soft_topk` (sigmoid, halving, iterative,
counting) and a πps sample with a straight-through gradient (:func:`khot.sample_khot`).
Every selection (the exact top-k of the learned logits) is then scored the same way: a
fresh linear classifier trained on the k pixels alone, its test accuracy. Baselines: k
random pixels, and the k pixels of highest variance.

    python examples/feature_selection.py [--k 8] [--tiny]

Needs scikit-learn (only for the bundled data set; nothing is downloaded).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import khot
from khot.relaxed import MASK_METHODS


def digits(seed: int = 0):
    """Standardised digits split 70/30, ``(x_train, y_train, x_test, y_test)``, and the raw training variance of each pixel."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.7 * len(x))
    mean, std = x[:split].mean(0), x[:split].std(0).clamp_min(1e-3)
    variance = x[:split].var(0)
    x = (x - mean) / std
    return (x[:split], y[:split], x[split:], y[split:]), variance


def fit(x, y, steps: int, mask_fn=None, n_logits: int = 64):
    """Train a linear classifier on ``x * mask_fn(logits)`` (full batch, Adam); returns ``(classifier, logits)``."""
    clf = torch.nn.Linear(x.shape[1], 10)
    logits = torch.nn.Parameter(0.01 * torch.randn(n_logits))
    params = [*clf.parameters(), logits] if mask_fn else [*clf.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        z = x * mask_fn(logits) if mask_fn else x
        F.cross_entropy(clf(z), y).backward()
        opt.step()
    return clf, logits.detach()


def accuracy(pixels, data, steps: int) -> float:
    """Test accuracy of a fresh linear classifier on the given pixels only."""
    x_train, y_train, x_test, y_test = data
    clf, _ = fit(x_train[:, pixels], y_train, steps)
    return (clf(x_test[:, pixels]).argmax(-1) == y_test).float().mean().item()


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="pixels to keep (default 8)")
    parser.add_argument("--tiny", action="store_true", help="a few steps (a smoke test)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    steps = 5 if args.tiny else 300
    data, variance = digits()
    k = args.k
    methods = {name: (lambda z, m=name: khot.soft_topk(z, k, method=m)) for name in MASK_METHODS}
    methods["sample (πps, straight-through)"] = lambda z: khot.sample_khot(z, k)
    selections = {
        "random pixels": torch.randperm(64, generator=torch.Generator().manual_seed(1))[:k],
        "highest variance": variance.topk(k).indices,
    }
    for name, mask_fn in methods.items():
        _, logits = fit(data[0], data[1], steps, mask_fn)
        selections[name] = khot.topk_mask(logits, k).nonzero().squeeze(-1)
    print(f"digits, keep k = {k} of 64 pixels; test accuracy of a linear classifier on them")
    results = {name: accuracy(pixels, data, steps) for name, pixels in selections.items()}
    for name, acc in results.items():
        print(f"  {name:<34}{acc:8.3f}")
    return results


if __name__ == "__main__":
    main()
