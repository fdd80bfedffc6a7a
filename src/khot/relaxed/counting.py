"""Counting (linearized) top-k: soft ranks from pairwise comparisons.

Item ``i`` is the ``j``-th best when ``j - 1`` items beat it, so
``rank_i = 1 + sum_{j != i} h(s_j - s_i)`` with a step ``h``.  Replacing ``h`` by
``sigmoid(./temperature)`` gives smooth soft ranks; like integer ranks they sum to
``n (n + 1) / 2``.  Then, with the rank-space sharpness ``RANK_TEMPERATURE = 0.05``:

* membership (``counting_topk``): ``sigmoid((k + 1/2 - rank_i) / 0.05)``, the soft
  indicator of ``rank_i <= k``;
* slot ``j`` (``counting_select``): weights proportional to the logistic bump
  ``sigmoid((j + 1/2 - rank) / 0.05) - sigmoid((j - 1/2 - rank) / 0.05)``, the soft
  indicator of ``rank`` rounding to ``j``, normalised over the items.

When the scores are separated by more than a few ``temperature`` the soft ranks
are close to integers, and the membership sums to ``k`` within
``sigmoid(-0.5 / 0.05) ~= 5e-5`` (within 1e-12 unless ``k = n``).  Near-ties pull
the tied ranks to their average
(``r, r + 1`` become ``r + 1/2, r + 1/2``); when such a pair straddles ``k`` both
members get ``1/2`` and the sum stays ``k``, but larger clusters of ties around
``k`` move the sum by up to half the cluster size (all ``n`` tied: each gets
``sigmoid((k + 1/2 - (n + 1)/2) / 0.05)``).  Use :mod:`khot.relaxed.halving` or a
sigmoid top-k when the sum must be exactly ``k``.

Cost: ``O(n^2)`` time per slice, processed in blocks of rows so memory stays
``O(n)`` per slice plus one block (also in the backward pass: each block is
recomputed there, via activation checkpointing); ``counting_select`` adds
``O(k n d)``.  ``temperature`` is a float or a one-element tensor (differentiable).

Infinite scores are compared without arithmetic on the infinity, so values and gradients
stay finite: ``+inf`` beats every finite score, ``-inf`` (a masked item) loses to every one,
and equal infinities rank in index order (a cluster of tied masked items would otherwise
move the sum, as above).  So a row with fewer than ``k`` finite (or ``+inf``) scores fills
its remaining slots with its first ``-inf`` items in index order.

Use it for small ``n`` (up to a few thousand) or when soft ranks
themselves are wanted; ``n = 10^4`` takes ~10^8 sigmoids per slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from khot._checks import check_tensor, normalize_dim
from khot.relaxed._common import _blocks, _check_mask_args, _check_select_args, _rowwise, _scalar_temperature, _select_rows

__all__ = ["DEFAULT_TEMPERATURE", "RANK_TEMPERATURE", "soft_rank", "counting_topk", "counting_select"]

#: Default sharpness in score units: pairs further apart than ~0.005 compare as hard.
DEFAULT_TEMPERATURE = 1e-3
#: Sharpness in rank units of the membership and slot bumps.
RANK_TEMPERATURE = 0.05


def _rank_block(s: Tensor, rows: Tensor, start: int, temperature) -> Tensor:
    # the j = i term is sigmoid(0) = 1/2, so this is 1 + sum over j != i
    a, b = s.unsqueeze(1), rows.unsqueeze(2)
    finite = a.isfinite() & b.isfinite()
    diff = torch.where(finite, a, 0) - torch.where(finite, b, 0)
    # a comparison with an infinity is decided without arithmetic on it (finite gradients):
    # a step, and equal infinities in index order (the j = i term still 1/2)
    j = torch.arange(s.shape[1], device=s.device)
    i = torch.arange(start, start + rows.shape[1], device=s.device).unsqueeze(-1)
    hard = torch.where(a == b, (j < i).to(s.dtype) + (j == i).to(s.dtype) / 2, (a > b).to(s.dtype))
    return torch.where(finite, torch.sigmoid(diff / temperature), hard).sum(dim=-1) + 0.5


def _soft_rank(s: Tensor, temperature) -> Tensor:
    """Soft descending ranks of ``s (N, n)``, a block of rows at a time."""
    N, n = s.shape
    # torch.func transforms have no saved-tensor hooks, so no checkpointing under them
    recompute = torch.is_grad_enabled() and s.requires_grad and not torch._C._are_functorch_transforms_active()
    return torch.cat(
        [
            checkpoint(_rank_block, s, s[:, b], b.start, temperature, use_reentrant=False)
            if recompute
            else _rank_block(s, s[:, b], b.start, temperature)
            for b in _blocks(n, N * n)
        ],
        dim=1,
    )


def soft_rank(scores: Tensor, dim: int = -1, *, temperature: float | Tensor = DEFAULT_TEMPERATURE) -> Tensor:
    """Soft descending ranks, 1 = best: ``rank_i = 1 + sum_{j != i} sigmoid((s_j - s_i) / temperature)``.

    Same shape and dtype as ``scores``; tends to the integer ranks as
    ``temperature -> 0`` (finite ties get their average rank, equal infinities rank in index order).

    >>> soft_rank(torch.tensor([0.3, 0.9, 0.1, 0.31]), temperature=0.01).round(decimals=2)
    tensor([2.7300, 1.0000, 4.0000, 2.2700])
    """
    check_tensor("scores", scores, floating=True)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension, got a 0-d tensor")
    dim = normalize_dim(dim, scores.dim())
    temperature = _scalar_temperature(temperature)
    return _rowwise(lambda s: _soft_rank(s, temperature), scores, dim)


def counting_topk(scores: Tensor, k, dim: int = -1, *, temperature: float | Tensor = DEFAULT_TEMPERATURE) -> Tensor:
    """Soft top-k membership ``sigmoid((k + 1/2 - soft_rank) / RANK_TEMPERATURE)``.

    ``k`` is an int or an integer tensor of per-slice counts (broadcast to the
    shape of ``scores`` without ``dim``).  Values lie in ``(0, 1)``; the sum is
    ``k`` up to the near-tie effect described in the module docstring.

    >>> counting_topk(torch.tensor([0.3, 0.9, 0.1, 0.31]), 2, temperature=0.01).round(decimals=2)
    tensor([0.0100, 1.0000, 0.0000, 0.9900])
    """
    dim, k, temperature = _check_mask_args(scores, k, dim, temperature, per_row=True)
    if isinstance(k, Tensor):
        k = k.reshape(-1, 1)
    return _rowwise(
        lambda s: torch.sigmoid((k + 0.5 - _soft_rank(s, temperature)) / RANK_TEMPERATURE), scores, dim
    )


def counting_select(x: Tensor, scores: Tensor, k: int, *, temperature: float | Tensor = DEFAULT_TEMPERATURE) -> Tensor:
    """Soft "j-th best" rows, ``j = 1..k``: ``x (..., n, d)``, ``scores (..., n)`` -> ``(..., k, d)``.

    Slot ``j`` is the average of the rows weighted by the normalised logistic bump
    of ``soft_rank - j`` (module docstring), computed stably in log space.

    >>> x = torch.eye(4)
    >>> counting_select(x, torch.tensor([0.2, 0.9, 0.5, 0.49]), 2, temperature=0.01).round(decimals=2)
    tensor([[0.0000, 1.0000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.9900, 0.0100]])
    """
    k, temperature = _check_select_args(x, scores, k, temperature)

    def select(x: Tensor, s: Tensor) -> Tensor:
        N, n = s.shape
        rank = _soft_rank(s, temperature).unsqueeze(1)
        slots = torch.arange(1, k + 1, device=s.device, dtype=s.dtype)
        out = []
        for b in _blocks(k, N * n):
            offset = (slots[b, None] - rank) / RANK_TEMPERATURE  # (N, slots, n)
            log_bump = F.logsigmoid(offset + 0.5 / RANK_TEMPERATURE) + F.logsigmoid(0.5 / RANK_TEMPERATURE - offset)
            out.append(log_bump.softmax(dim=-1) @ x)
        return torch.cat(out, dim=1)

    return _select_rows(select, x, scores, k)
