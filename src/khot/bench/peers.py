"""Peer packages a user would otherwise pick, called from their installed code (``pip install -e '.[peers]'`` from a clone).

Each peer is adapted to khot's two shapes of problem, never re-implemented:

* a relaxed k-hot **mask** ``fn(scores (b, n), k) -> (b, n)``;
* a relaxed **selection** of k rows ``fn(rows (b, n, d), scores (b, n), k) -> (b, k, d)``.

=============================  ===============================================================
peer                           adaptation
=============================  ===============================================================
``entmax.budget_bisect``       budget-sparsemax: ``max <x, p> - ||p||²/2`` on the capped simplex
                               (``0 <= p <= 1``, ``Σ p = k``), a sparse mask (no selection)
``difftopk`` (bitonic)         its top-k matrix ``X (b, n, k)`` (item i at rank j): mask
                               ``X.sum(-1)``, selection ``Xᵀ rows``; O(n² log² n) memory
``diffsort`` (bitonic)         its soft permutation ``P (b, n, n)``, last k columns (the largest),
                               used like ``difftopk``'s matrix; O(n² log² n) memory
``torchsort.soft_rank``        soft ranks r (n = largest), mask ``clamp(r - (n - k), 0, 1)``
                               (exact for hard ranks; sums to k only approximately); no selection
=============================  ===============================================================

All run at their packages' default sharpness (entmax on the raw scores, steepness 10 for the
sorting networks) except torchsort, whose default strength 1 collapses the ranks of unit-scale
scores at large n: it runs at strength 1/n. torchsort is not in the
``peers`` extra: it builds from source only (``pip install torchsort --no-build-isolation``,
with ``nvcc`` off ``PATH`` for a CPU build); it is used when installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import io
import math

import torch

__all__ = ["PEERS", "load", "mask_methods", "select_methods"]

PEERS = ("entmax", "difftopk", "diffsort", "torchsort")


def load(name: str):
    """Import a peer (quietly: difftopk prints a notice about an optional dependency); ``None`` if missing."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module(name)
    except ImportError:
        return None


def version(name: str) -> str:
    """The installed distribution's version of a peer, ``""`` if not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def network_bytes(batch: int, n: int, k: int) -> float:
    """Memory of one forward + backward through a dense bitonic network of size n (float32).

    Each of its ``L = log2(n) (log2(n) + 1) / 2`` layers holds four ``n × n`` matrices and,
    per example, two ``n × n`` mixing matrices saved for the backward pass.
    """
    depth = math.ceil(math.log2(max(n, 2)))
    layers = depth * (depth + 1) // 2
    return 4.0 * layers * n * n * (4 + 2 * batch)


@functools.lru_cache(maxsize=2)
def _network(package: str, n: int, device: str):
    return load(package).get_sorting_network("bitonic", n, device)


def _topk_matrix(x: torch.Tensor, k: int) -> torch.Tensor:
    """difftopk's ``(b, n, k)`` relaxed top-k matrix of ``x (b, n)``."""
    return load("difftopk").topk(_network("difftopk", x.shape[-1], str(x.device)), x, k)[1]


def _sort_matrix(x: torch.Tensor, k: int) -> torch.Tensor:
    """diffsort's ``(b, n, n)`` relaxed permutation of ``x (b, n)``, its last ``k`` columns."""
    return load("diffsort").sort(_network("diffsort", x.shape[-1], str(x.device)), x)[1][..., -k:]


def _entmax_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    return load("entmax").budget_bisect(x, budget=k, dim=-1)


def _rank_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    # Strength 1/n: neighbouring unit-scale scores are ~1/n apart, and the default strength 1
    # would pull every soft rank to the mean (an empty mask) at large n.
    n = x.shape[-1]
    return (load("torchsort").soft_rank(x, regularization_strength=1.0 / n) - (n - k)).clamp(0, 1)


_MATRICES = {"difftopk": _topk_matrix, "diffsort": _sort_matrix}


def mask_methods() -> dict[str, tuple[str, object, object]]:
    """Installed peers as masks: ``{label: (package, fn(x, k), memory(batch, n, k) or None)}``."""
    out = {}
    if load("entmax"):
        out["entmax-budget"] = ("entmax", _entmax_mask, None)
    if load("torchsort"):
        out["torchsort-rank"] = ("torchsort", _rank_mask, None)
    for package, matrix in _MATRICES.items():
        if load(package):
            out[package] = (package, lambda x, k, m=matrix: m(x, k).sum(-1), network_bytes)
    return out


def select_methods() -> dict[str, tuple[str, object, object]]:
    """Installed peers as row selections: ``{label: (package, fn(rows, scores, k), memory)}``."""
    return {
        package: (package, lambda rows, s, k, m=matrix: m(s, k).transpose(-1, -2) @ rows, network_bytes)
        for package, matrix in _MATRICES.items()
        if load(package)
    }


_PEERS_HINT = "pip install -e '.[peers]' from a clone of khot"


def missing() -> list[str]:
    """One line per peer that is not installed."""
    hint = {"torchsort": "pip install torchsort --no-build-isolation"}
    return [f"{name}: not installed ({hint.get(name, _PEERS_HINT)})" for name in PEERS if load(name) is None]
