"""Gumbel top-k relaxation: a relaxed random k-subset (Xie & Ermon 2019).

Xie & Ermon, "Reparameterizable Subset Sampling via Continuous Relaxations" (IJCAI 2019): the
keys ``r = x + G`` (``G`` standard Gumbel noise, so that the exact top-k of ``r`` is a draw of
weighted sampling without replacement with weights ``softmax(x)``) go through ``k`` rounds of a
relaxed arg-max, each removing the mass already taken::

    α¹ = r,   p^j = softmax(α^j / τ),   α^{j+1} = α^j + log(1 - p^j),   output = Σ_j p^j.

Each round sums to 1, so the output sums to ``k`` exactly; as ``τ → 0`` each ``p^j`` tends to
the one-hot of the j-th largest key and the output to the exact k-hot mask of ``r`` (to
``topk_mask(x, k)`` when the noise is small against the gaps). At larger ``τ`` an item that
several rounds share can exceed 1 (values lie in ``[0, k]``). Differentiable in ``x`` and a
tensor ``τ`` by plain autograd; ``O(k n)``. Randomness comes from ``generator``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._threshold import Rows, clamp_infinite, work_dtype

__all__ = ["DEFAULT_TEMPERATURE", "gumbel_topk"]

#: Default ``τ`` (score units).
DEFAULT_TEMPERATURE = 0.5
_MARGIN = 1000.0  # ±inf keys are placed this far (in units of τ) beyond the finite ones


def gumbel_topk(
    x: Tensor,
    k: int,
    dim: int = -1,
    *,
    temperature: float | Tensor = DEFAULT_TEMPERATURE,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A relaxed k-hot sample: ``k`` rounds of softmax over Gumbel-perturbed scores ``x`` along ``dim``.

    Args:
        x: floating-point scores (log-weights; half and bfloat16 computed in float32).
        k: an int, ``0 <= k <= n``.
        dim: the dimension to select along.
        temperature: ``τ > 0``, a number or a per-slice tensor (differentiable).
        generator: the ``torch.Generator`` of the Gumbel noise (the global RNG when ``None``).

    Returns a tensor shaped like ``x`` with values in ``[0, k]`` summing to ``k``. ``-inf`` scores
    (masked items) get 0, as in exact arithmetic (a round never moves mass onto ``-inf``: with ``k``
    above the number of finite scores, the last rounds share among the finite ones again, values
    above 1), ``+inf`` ones are taken first; NaN slices are NaN.

    Example:
        >>> import torch, khot
        >>> x = torch.tensor([0.2, 1.9, -1.0, 3.0, 1.5])
        >>> p = khot.soft_topk(x, 2, method="gumbel", temperature=0.1, generator=torch.Generator().manual_seed(0))
        >>> p.round(decimals=2)
        tensor([0.0000, 0.9100, 0.0000, 0.9800, 0.1100])
        >>> round(p.sum().item(), 4)
        2.0
    """
    rows = Rows(x, k, dim, temperature, real_k=False, per_row=False)
    _, tau = rows.tensors()
    z = rows.x.to(work_dtype(rows.x))
    # noise in the logical order of z (empty_like would follow its memory layout: a transposed input got other noise)
    gumbel = -torch.log(torch.empty(z.shape, dtype=z.dtype, device=z.device).exponential_(generator=generator))
    a = clamp_infinite(z + gumbel, tau, _MARGIN)
    out = torch.zeros_like(a)
    for _ in range(rows.k):
        p = torch.softmax(a, -1)
        out = out + p
        left = p < 1  # an item taken whole leaves the race (log 0), without a NaN gradient
        a = a + torch.where(left, torch.log1p(-torch.where(left, p, 0)) / tau, -torch.inf)  # -inf not divided: no NaN gradient in τ
    out = torch.where(torch.isnan(z).any(-1, keepdim=True), torch.nan, out)
    return rows.restore(out.to(x.dtype))
