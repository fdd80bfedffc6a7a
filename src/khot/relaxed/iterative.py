"""Iterative peaked-softmax top-k (Goyal et al. 2018; Algorithm 1 of Pietruszka et al.).

Step ``t = 1..k`` takes the largest remaining score ``m_t``, weights the remaining
items with ``softmax(-(s - m_t)**2 / temperature)``, outputs the weighted sum of
their rows and removes the arg-max.  ``temperature`` is in squared score units:
items within about ``sqrt(temperature)`` of the current maximum share its weight.

The maximum at step ``t`` is the ``t``-th largest score and the remaining items
are those outside the top ``t - 1``, so all steps follow from one ``topk`` and run
as batched matrix products, a block of steps at a time (``O(k n d)`` work, memory
bounded by the block).  Without autograd the memory is ``O(n d + k d)``; with it,
the ``k x n`` step weights are kept for the backward pass.

The relaxed mask is the sum of the ``k`` step weights: it sums to ``k``; an entry
can exceed 1 when near-tied items share weight over several steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from khot.relaxed._common import _blocks, _check_mask_args, _check_select_args, _rowwise, _select_rows

__all__ = ["DEFAULT_TEMPERATURE", "iterative_topk", "iterative_select"]

#: Default sharpness, for scores spread over about [0, 1]: an item 0.003 below the
#: maximum gets ``exp(-1)`` of its weight.  (The public benchmark's alpha = 1 is
#: ``temperature = 1``, which is nearly uniform on such scores.)
DEFAULT_TEMPERATURE = 1e-5


def _step_weights(s: Tensor, k: int, temperature: float) -> Iterator[Tensor]:
    """Yield the step weights for ``s (N, n)`` as ``(N, steps, n)`` blocks, in step order."""
    N, n = s.shape
    peaks, top = s.topk(k, dim=-1)  # peaks[:, t] is the maximum at step t
    steps = torch.arange(k, device=s.device)
    # the step from which an item is gone: t + 1 for the t-th best, never (k) for the rest
    removed_at = torch.full((N, n), k, dtype=torch.long, device=s.device).scatter_(1, top, steps.expand(N, k) + 1)
    for block in _blocks(k, N * n):
        logits = -(s.unsqueeze(1) - peaks[:, block, None]).square() / temperature
        gone = removed_at.unsqueeze(1) <= steps[block, None]
        yield logits.masked_fill(gone, -torch.inf).softmax(dim=-1)


def iterative_topk(scores: Tensor, k: int, dim: int = -1, *, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Relaxed k-hot mask: the sum of the ``k`` peaked-softmax step weights.

    Every slice along ``dim`` sums to ``k``; as ``temperature -> 0`` the mask tends
    to the exact top-k mask (entries may exceed 1 for near-ties).

    >>> s = torch.tensor([0.1, 0.9, 0.5, 0.48])
    >>> iterative_topk(s, 2, temperature=1e-3).round(decimals=2)
    tensor([0.0000, 1.0000, 0.6000, 0.4000])
    """
    dim, k, temperature = _check_mask_args(scores, k, dim, temperature)
    return _rowwise(lambda s: sum(w.sum(dim=1) for w in _step_weights(s, k, temperature)), scores, dim)


def iterative_select(x: Tensor, scores: Tensor, k: int, *, temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Soft-select ``k`` rows of ``x (..., n, d)`` by iterative peaked softmax on ``scores (..., n)``.

    Returns ``(..., k, d)``; row ``t`` approximates the ``t``-th best row.
    Differentiable w.r.t. ``x`` and ``scores``.

    >>> x = torch.eye(4)
    >>> iterative_select(x, torch.tensor([0.2, 0.9, 0.5, 0.45]), 2, temperature=1e-2).round(decimals=2)
    tensor([[0.0000, 1.0000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.5600, 0.4400]])
    """
    k, temperature = _check_select_args(x, scores, k, temperature)
    return _select_rows(
        lambda x, s: torch.cat([w @ x for w in _step_weights(s, k, temperature)], dim=1), x, scores, k
    )
