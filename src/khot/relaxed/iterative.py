"""Iterative peaked-softmax top-k (after Goyal et al. 2018; Algorithm 1 of Pietruszka et al.).

Step ``t = 1..k`` centres a peaked softmax on the ``t``-th largest score ``p_t`` and outputs
the weighted sum of the rows.  ``temperature`` is in squared score units: items within
about ``sqrt(temperature)`` below ``p_t`` share its weight.

The published algorithm weighs the items by ``exp(-(s_i - p_t)**2 / temperature)`` and
removes the arg-max after each step.  On near-tied items that is wrong: every step spreads
its weight over the whole cluster but removes only one member, so the lowest member collects
weight from every step (``[.5, .5001, .4999, -3]``, k = 3: mask 0.33 / 0.83 / 1.83 / 0,
the best item lowest), and items above ``p_t`` are penalised like items below it.  Here each
item has a capacity ``c_i``, 1 at the start, and step ``t`` weighs

    ``w_ti = c_i a_ti / sum_j c_j a_tj``,  ``a_ti = exp(-max(0, p_t - s_i)**2 / temperature)``,

then takes that weight out of the capacities, ``c_i -= w_ti``.  The ``t`` items at or above
``p_t`` have affinity 1 and at least ``t - (t - 1) = 1`` capacity left, so the sum is at
least 1 and ``w_ti <= c_i``: every mask entry ``sum_t w_ti = 1 - c_i`` lies in ``[0, 1]``,
the mask sums to ``k``, and it is monotone in the scores (a higher item has at least the
affinity of a lower one at every step, so it always has at most its capacity left).
For scores separated by more than a few ``sqrt(temperature)`` the items above ``p_t`` have
no capacity left and this is the published algorithm; as ``temperature -> 0`` the rows tend
to the exact top-k rows, best first.

Infinite scores are compared without arithmetic on the infinity, so values and gradients
stay finite: an infinite gap has affinity 0, equal scores (infinite ones too) affinity 1.
A row with fewer than ``k`` finite (or ``+inf``) scores fills its remaining steps with its
``-inf`` items, which share them equally.

The steps run in order (each needs the capacities the previous ones left): ``O(k n)`` work
for the weights plus a batched matrix product for the rows, a block of steps at a time
(memory bounded by the block).  With autograd the ``k x n`` step weights are kept for the
backward pass.
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


def _log_affinity(s: Tensor, peak: Tensor, temperature) -> Tensor:
    """``-max(0, peak - s)**2 / temperature``: 0 at or above the peak, -inf for an infinite gap
    (no arithmetic on infinities, so gradients stay finite)."""
    finite = s.isfinite() & peak.isfinite()
    below = (torch.where(finite, peak, 0) - torch.where(finite, s, 0)).clamp(min=0)
    return torch.where(finite, -below.square() / temperature, torch.where(s >= peak, 0.0, -torch.inf))


def _step_weights(s: Tensor, k: int, temperature) -> Iterator[Tensor]:
    """Yield the step weights for ``s (N, n)`` as ``(N, steps, n)`` blocks, in step order."""
    N, n = s.shape
    peaks = s.topk(k, dim=-1).values  # peaks[:, t] is the centre of step t
    left = torch.ones_like(s)  # each item's capacity
    for block in _blocks(k, N * n):
        steps = []
        for t in range(block.start, block.stop):
            held = left * _log_affinity(s, peaks[:, t : t + 1], temperature).exp()
            w = held / held.sum(-1, keepdim=True)  # the sum is >= 1: the capacity left at or above the peak
            left = left - w
            steps.append(w)
        yield torch.stack(steps, dim=1)


def iterative_topk(scores: Tensor, k: int, dim: int = -1, *, temperature: float | Tensor = DEFAULT_TEMPERATURE) -> Tensor:
    """Relaxed k-hot mask: the sum of the ``k`` peaked-softmax step weights.

    Values lie in ``[0, 1]`` and every slice along ``dim`` sums to ``k``; near-tied items
    share; as ``temperature -> 0`` the mask tends to the exact top-k mask. ``temperature``:
    a float or a one-element tensor (differentiable).

    >>> s = torch.tensor([0.1, 0.9, 0.5, 0.48])
    >>> iterative_topk(s, 2, temperature=1e-3).round(decimals=2)
    tensor([0.0000, 1.0000, 0.6000, 0.4000])
    >>> iterative_topk(torch.tensor([0.5, 0.5001, 0.4999, -3.0]), 3).round(decimals=2)
    tensor([1., 1., 1., 0.])
    """
    dim, k, temperature = _check_mask_args(scores, k, dim, temperature)
    return _rowwise(lambda s: sum(w.sum(dim=1) for w in _step_weights(s, k, temperature)), scores, dim)


def iterative_select(x: Tensor, scores: Tensor, k: int, *, temperature: float | Tensor = DEFAULT_TEMPERATURE) -> Tensor:
    """Soft-select ``k`` rows of ``x (..., n, d)`` by iterative peaked softmax on ``scores (..., n)``.

    Returns ``(..., k, d)``; row ``t`` approximates the ``t``-th best row.
    Differentiable w.r.t. ``x``, ``scores`` and a tensor ``temperature``.

    >>> x = torch.eye(4)
    >>> iterative_select(x, torch.tensor([0.2, 0.9, 0.5, 0.45]), 2, temperature=1e-2).round(decimals=2)
    tensor([[0.0000, 1.0000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.5600, 0.4400]])
    """
    k, temperature = _check_select_args(x, scores, k, temperature)
    return _select_rows(
        lambda x, s: torch.cat([w @ x for w in _step_weights(s, k, temperature)], dim=1), x, scores, k
    )
