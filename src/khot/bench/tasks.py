"""Downstream tasks of ``khot bench --suites tasks``: the same small model trained through each
relaxation and sampler, same steps, same seeds, scored on held-out data.

==================  ===========================================================  ==================
task                model and metric                                             baselines
==================  ===========================================================  ==================
``features``        learn which k of the 64 pixels of scikit-learn's digits to   k random pixels,
                    keep (logits → relaxed k-hot mask → linear classifier); the  the k pixels of
                    exact top-k of the learned logits, scored by the test        highest variance
                    accuracy of a fresh linear classifier on those pixels only
``knn``             learn a 64 → 4 linear embedding of the digits so that each   random projection,
                    image's k nearest training images (a relaxed top-k of minus  PCA
                    the squared distances) share its label; test accuracy of
                    exact k-nearest-neighbour voting in the embedding
``sae``             a TopK sparse autoencoder (Gao et al. 2024) on synthetic     exact top-k
                    sums of 4 of 64 features, trained with the relaxed mask      (``TopKActivation``,
                    times ReLU as its activation, evaluated with the exact       the usual training)
                    top-k: fraction of variance unexplained (FVU)
==================  ===========================================================  ==================

Every relaxation runs at its default temperature (``khot.methods()``); the sampler is
:func:`khot.sample_khot` (systematic πps design, straight-through gradient). The data sets ship
with scikit-learn (nothing is downloaded).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import khot

__all__ = ["TASKS", "TopKSAE", "digits", "fit", "accuracy", "mask_methods", "features", "knn", "sae", "sparse_data"]

SAMPLER = "sample (πps)"


@functools.lru_cache(maxsize=8)
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


def fit(x, y, steps: int, mask_fn=None, n_logits: int = 64, lr: float = 0.05):
    """Train a linear classifier on ``x * mask_fn(logits)`` (full batch, Adam); returns ``(classifier, logits)``."""
    clf = torch.nn.Linear(x.shape[1], 10)
    logits = torch.nn.Parameter(0.01 * torch.randn(n_logits))
    params = [*clf.parameters(), logits] if mask_fn else [*clf.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
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


def mask_methods() -> dict[str, Callable]:
    """``{name: mask(z, k)}``: every relaxation of the registry at its default temperature, and the sampler."""
    from .suites import relaxations

    out = {
        name: (lambda z, k, r=r: r.mask(z, k, -1, temperature=r.default_temperature))
        for name, r in relaxations().items()
    }
    out[SAMPLER] = lambda z, k: khot.sample_khot(z, k)
    return out


# ----------------------------------------------------------------------------- the tasks
# Each returns the test metric of one training run; ``mask`` is a method of mask_methods() or
# the name of one of the task's baselines.


def features(mask, k: int, seed: int, steps: int = 300, eval_steps: int | None = None) -> float:
    """Learned k-of-64 pixel selection on digits (``steps`` of training through the mask): test
    accuracy of a fresh linear classifier trained for ``eval_steps`` (default: ``steps``) on the
    chosen pixels."""
    torch.manual_seed(seed)
    data, variance = digits(seed)
    if mask == "random pixels":
        pixels = torch.randperm(64)[:k]
    elif mask == "highest variance":
        pixels = variance.topk(k).indices
    else:
        _, logits = fit(data[0], data[1], steps, lambda z: mask(z, k))
        pixels = khot.topk_mask(logits, k).nonzero().squeeze(-1)
    return accuracy(pixels, data, eval_steps or steps)


def knn(mask, k: int, seed: int, steps: int = 100, dim: int = 4, pool: int = 128, queries: int = 64) -> float:
    """A 64 → ``dim`` embedding of digits trained so that the relaxed top-k nearest of a pool share
    the query's label; test accuracy of exact k-nearest-neighbour voting among the training images."""
    torch.manual_seed(seed)
    (x, y, x_test, y_test), _ = digits(seed)
    if mask == "PCA":
        w = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[:dim].T
    else:
        w = nn.Parameter(torch.randn(64, dim) / 8)
        if mask != "random projection":
            opt = torch.optim.Adam([w], lr=0.01)
            for _ in range(steps):
                order = torch.randperm(len(x))
                q, r = order[:queries], order[queries : queries + pool]
                scores = -torch.cdist(x[q] @ w, x[r] @ w).square()
                same = (y[q, None] == y[None, r]).float()
                loss = -(mask(scores, k) * same).sum(-1).mean() / k
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        near = (-torch.cdist(x_test @ w, x @ w)).topk(k, -1).indices
        votes = F.one_hot(y[near], 10).sum(1).float() + 1e-3 * F.one_hot(y[near[:, 0]], 10)  # ties: the nearest
        return (votes.argmax(-1) == y_test).float().mean().item()


class TopKSAE(nn.Module):
    """``decode(act(encode(x - b))) + b`` with a tied pre-bias (Gao et al. 2024, "Scaling and
    evaluating sparse autoencoders"); ``act`` defaults to the exact ``khot.nn.TopKActivation(k)``."""

    def __init__(self, d: int, latents: int, k: int, act: Callable | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d))
        self.encode, self.decode = nn.Linear(d, latents), nn.Linear(latents, d, bias=False)
        self.act = act or khot.nn.TopKActivation(k)

    def forward(self, x):
        return self.decode(self.act(self.encode(x - self.bias))) + self.bias


def sparse_data(batch: int, features: torch.Tensor, active: int = 4, generator=None) -> torch.Tensor:
    """Sums of ``active`` random rows of ``features`` with weights ~ U[0, 1]."""
    which = torch.rand(batch, len(features), generator=generator).argsort(-1)[:, :active]
    return (torch.rand(batch, active, 1, generator=generator) * features[which]).sum(1)


def sae(mask, k: int, seed: int, steps: int = 200, d: int = 32, latents: int = 128, batch: int = 128) -> float:
    """A TopK SAE trained through ``mask`` (relu(z) · mask(z, k)), or with the exact top-k; its test FVU with the exact top-k."""
    torch.manual_seed(seed)
    features = F.normalize(torch.randn(64, d), dim=-1)
    exact = khot.nn.TopKActivation(k)
    model = TopKSAE(d, latents, k, exact if mask == "exact top-k" else (lambda z: F.relu(z) * mask(z, k)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = sparse_data(batch, features)
        loss = F.mse_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.act = exact
    with torch.no_grad():
        x = sparse_data(4096, features, generator=torch.Generator().manual_seed(10_000 + seed))
        return (F.mse_loss(model(x), x) / x.var(0).mean()).item()


# training steps of each task: (default run, --full); the features task's final classifier
# trains for EVAL_STEPS either way
STEPS = {"features": (150, 300), "knn": (50, 100), "sae": (100, 200)}
EVAL_STEPS = 300
SAE_BATCH = (64, 128)  # training batch of the sae task: (default run, --full)

# name: (function, baselines, k values of the default run, metric label, higher is better)
TASKS = {
    "features": (features, ("random pixels", "highest variance"), (8,), "test accuracy", True),
    "knn": (knn, ("random projection", "PCA"), (5,), "test kNN accuracy", True),
    "sae": (sae, ("exact top-k",), (2, 8), "test FVU", False),
}


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
