"""SIMPLE top-k: the exact inclusion probabilities of the k-subset distribution ``P(S) ∝ exp(Σ_{i∈S} x_i / τ)``.

Ahmed, Zeng, Niepert & Van den Broeck, "SIMPLE: A Gradient Estimator for k-Subset Sampling"
(ICLR 2023): the maximum-entropy (conditional Poisson) distribution over subsets of exactly
``k`` items with weights ``exp(x / τ)``; its marginals ``P(i ∈ S)`` lie in ``[0, 1]``, sum to
``k`` exactly and are the relaxation SIMPLE differentiates (exact samples of the same design:
``khot.pips_sample(..., design="conditional_poisson")``). Computed by
:func:`khot.sampling.conditional_poisson_marginals` (a log-space dynamic programme in float64,
``O(n k)``, differentiable by autograd). ``±inf`` scores are placed 1000 τ beyond the finite ones
first, so masked items get 0 (and take part only when fewer than ``k`` others remain); finite
scores more than 10^4 τ above or below the ``k``-th largest are taken as 10^4 τ from it (their
probability is 1 or 0 to within e^{-10^4} either way).

Second derivatives are not available: the programme's ``torch.logcumsumexp`` has a first
derivative but its double backward returns NaN (torch 2.13), so Hessian-vector products and
``create_graph`` gradients of this method are NaN. First derivatives are exact.

Per-slice tensor ``k``: the programme needs a number of passes fixed before it runs. On eager
CPU tensors it reads ``max(k)`` (free there); elsewhere (CUDA, ``torch.compile``, ``vmap``, meta
tensors) it never reads ``k`` on the host, so it makes no synchronisation and compiles whole,
and runs to ``n`` passes instead: ``O(n^2)`` per slice. An int ``k`` costs ``O(n k)`` everywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from khot._checks import checked_no_nan
from khot.sampling import conditional_poisson_marginals

from ._threshold import Rows, clamp_infinite, work_dtype

__all__ = ["DEFAULT_TEMPERATURE", "simple_topk"]

#: Default ``τ`` (score units).
DEFAULT_TEMPERATURE = 1.0
_MARGIN = 1000.0
_RANGE = 1e4  # finite scores further from the k-th largest (in units of τ) have probability 1 or 0 to e^{-10^4}


def simple_topk(x: Tensor, k: int | Tensor, dim: int = -1, *, temperature: float | Tensor = DEFAULT_TEMPERATURE) -> Tensor:
    """Inclusion probabilities of the size-``k`` conditional Poisson design with weights ``exp(x / τ)``.

    Args:
        x: floating-point scores (half and bfloat16 computed in float32, the programme in float64).
        k: an int or an integer tensor of per-slice counts, ``0 <= k <= n`` (a tensor: see the
            module docstring for its cost off the CPU).
        dim: the dimension to select along.
        temperature: ``τ > 0``, a number or a per-slice tensor (differentiable).

    Example:
        >>> import torch, khot
        >>> p = khot.soft_topk(torch.tensor([0.0, 0.0, 1.0]), 2, method="simple")
        >>> p
        tensor([0.5777, 0.5777, 0.8446])
        >>> round(p.sum().item(), 6)
        2.0
    """
    rows = Rows(x, k, dim, temperature, real_k=False)
    kt, tau = rows.tensors()
    if rows.x.shape[-1] == 0:
        return rows.restore(torch.zeros_like(rows.x))
    z = checked_no_nan(rows.x.to(work_dtype(rows.x)), rows.x, "x", " (this method has no NaN slices)")
    # the design is shift-invariant: the k-th largest finite score moves to 0, and finite scores over
    # _RANGE τ from it are taken as _RANGE τ from it (the programme's float64 sums lose a logit's
    # digits past about 1e15: a -1e16 mask gave probabilities above 1); scores that far above the
    # k-th are in, and that far below out, to e^{-10^4}
    finite = torch.isfinite(z)
    ranked = torch.where(finite, z, -math.inf).detach().sort(-1, descending=True).values
    center = ranked.gather(-1, (kt - 1).clamp(0, z.shape[-1] - 1).long().unsqueeze(-1))
    center = torch.where(center > -math.inf, center, ranked[..., :1])  # fewer finite scores than k: the largest
    center = torch.where(center > -math.inf, center, 0)
    z = torch.where(finite, (z - center).clamp(-_RANGE * tau, _RANGE * tau), z)
    logits = clamp_infinite(z, tau, _MARGIN)
    return rows.restore(conditional_poisson_marginals(logits, rows.k).to(x.dtype))
