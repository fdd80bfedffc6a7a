"""The portable path of the exact ops: pure PyTorch, no host synchronisation, any device.

Fixed work per call: an order-preserving integer key (:func:`khot._order.ranking_key`), one
``torch.topk`` of the key for the k-th ranked value of every slice, then one branch-free pass
(:func:`_threshold_mask`) that takes everything ranked strictly before it and settles the ties at
the k-th place by index. No ``.item()``, no ``bool(tensor)``, no data-dependent Python branch: it
runs on ``device="meta"`` (it is the ops' fake implementation), under ``torch.compile`` and in CUDA
graphs. The functions here are the ops' signatures (see :mod:`khot.exact`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._order import ranking_key

__all__ = ["topk_mask", "keep_topk", "select_topk"]


def _threshold_mask(key: Tensor, k: int, ks: Optional[Tensor], dim: int) -> Tensor:
    """The exact k-hot mask of an integer ranking ``key`` (larger first; ties to the lower index)."""
    n = key.shape[dim]
    width = min(k, n)
    if width == 0:  # shapes only: no slice selects anything
        return torch.zeros(key.shape, dtype=torch.bool, device=key.device)
    top = torch.topk(key, width, dim).values  # best first
    count = k if ks is None else ks.unsqueeze(dim)
    kth = top.narrow(dim, width - 1, 1) if ks is None else top.gather(dim, (count - 1).clamp(0, width - 1))
    before = key > kth
    tied = key == kth  # a slice with k = 0 takes its top value as kth: nothing before it, no room for ties
    need = count - before.sum(dim, keepdim=True, dtype=torch.int32)
    return (before | (tied & (tied.cumsum(dim, dtype=torch.int32) <= need))).contiguous()


def topk_mask(x: Tensor, k: int, ks: Optional[Tensor], dim: int, largest: bool, magnitude: bool) -> Tensor:
    """The exact k-hot mask of ``x`` along ``dim`` (the signature of op ``khot::topk_mask``).

    Every op's output is contiguous, whatever the input's layout, on every path (the fake
    implementation must predict the strides)."""
    if k >= x.shape[dim] and ks is None:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return _threshold_mask(ranking_key(x, largest, magnitude), k, ks, dim)


def keep_topk(x: Tensor, k: int, ks: Optional[Tensor], dim: int, largest: bool, magnitude: bool) -> Tensor:
    """``x`` zeroed outside its k-hot mask (the signature of op ``khot::keep_topk``)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(topk_mask(x, k, ks, dim, largest, magnitude), x, zero).contiguous()


def positions(mask: Tensor, k: int) -> Tensor:
    """Indices of the True entries of a mask with exactly ``k`` per row (last dim), in increasing order."""
    slot = mask.cumsum(-1) - 1
    slot = torch.where(mask, slot, k)  # unselected entries go to a spare slot k, dropped below
    where = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    out = torch.zeros(*mask.shape[:-1], k + 1, dtype=torch.long, device=mask.device)
    return out.scatter(-1, slot, where).narrow(-1, 0, k).contiguous()


def best_first(scores: Tensor, indices: Tensor) -> Tensor:
    """``indices`` (in increasing order) reordered by descending score, ties in index order."""
    key = ranking_key(scores.gather(-1, indices))
    return indices.gather(-1, key.sort(dim=-1, descending=True, stable=True).indices)


def select_topk(scores: Tensor, k: int, sorted: bool) -> Tensor:
    """Indices ``(..., k)`` of the top ``k`` of every row of ``scores`` (the signature of op
    ``khot::select_topk``): by descending score (``sorted``) or in increasing index order."""
    indices = positions(_threshold_mask(ranking_key(scores), k, None, scores.dim() - 1), k)
    return best_first(scores, indices) if sorted else indices
