"""Sparse top-k: the Euclidean projection of ``x / τ`` onto the capped simplex.

``p = argmin ||p - x / τ||²`` over ``{p ∈ [0, 1]^n, Σ p = k}`` (the ``p = 2`` case of Sander,
Puigcerver, Djolonga, Peyré & Blondel, "Fast, Differentiable and Sparse Top-k: a Convex
Analysis Perspective", ICML 2023; also "budget sparsemax"). The solution is
``p_i = clip(x_i / τ - t, 0, 1)`` with one threshold ``t`` per slice, so ``p`` has exact zeros
(and exact ones): a sparse, differentiable k-hot mask, the exact top-k mask once the k-th and
(k+1)-th scores are more than ``τ`` apart.

Forward, exact and without iterations: sort ``z = x / τ`` once; ``S(t) = Σ clip(z_i - t, 0, 1)``
is continuous, piecewise linear and non-increasing, with breakpoints at every ``z_i`` and
``z_i - 1``, and on a sorted row its value at any breakpoint follows from prefix sums (float64)
and one ``searchsorted``. A bisection over the breakpoint indices (``log2 n`` steps of a few
gathers each) finds the linear piece that holds ``S(t) = k``, where
``t = (Σ_free z - (k - #ones)) / #free`` in closed form. The sorted scores are first moved by the
``⌈k⌉``-th largest and clamped to ``[-2, 1]`` (``t`` lies within 1 below it, so no ``p`` changes), so
those sums never cancel (mask values such as -1e9). ``t`` itself is a float64: where the scores
around it exceed about ``2**52`` in ``|x / τ|`` (``τ`` below 1e-16 of the scores, or ``k`` forcing
masks at float32's minimum into the selection), it cannot be placed within the ramp's width of 1,
and ``p`` there is rounded to 0 or 1. Cost: one sort, ``O(n log n)``. That is the
portable path (fixed work, no host synchronisation). On CPU tensors, long rows skip the sort
(:func:`khot.relaxed._threshold.long_rows`): for small ``k`` the scores above a sampled bound are
found from column maxima and solved alone; otherwise safeguarded Newton steps over the whole row
(a few arithmetic passes each) find the linear piece of ``S`` that holds ``t`` and solve it in closed
form, exact once the sets of zeros, free entries and ones repeat (typically 3 passes of 4 ops).

Backward, closed form on the support: on the free set ``F = {0 < p < 1}`` the Jacobian of the
projection is ``I - 11ᵀ / |F|``, so ``grad_z = g - mean_F(g)`` on ``F`` and 0 elsewhere;
``grad_k = mean_F(g)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from khot._backend import apply

from ._threshold import (
    Rows,
    finite_range_sorted,
    largest_index,
    long_rows,
    row_sum,
    scores_and_threshold,
    shifted,
    solve_window,
    threshold_function,
    threshold_op,
    top_above,
)

__all__ = ["DEFAULT_TEMPERATURE", "sparse_topk"]

#: Default ``τ``: scores of order one, a mask with a few fractional entries.
DEFAULT_TEMPERATURE = 1.0


def _threshold_portable(z: Tensor, k: Tensor) -> Tensor:
    """``(t, lo, hi)`` in float64, ``(..., 3)``: the threshold and the bounds that replace ``±inf``."""
    n = z.shape[-1]
    s = z.sort(-1).values.contiguous()  # searchsorted needs a contiguous row
    lo, hi = finite_range_sorted(s, 1.0)  # ±inf -> 1 beyond the finite range: p = 1 or 0 when possible
    # a score counts only through clip(s - t, 0, 1), and t lies in [s_c - 1, s_c) for the c-th largest
    # score s_c (c = ceil(k)): moved by s_c and clamped to [-2, 1], every score keeps its p and t its
    # place, and the prefix sums below no longer cancel (a -1e9 mask took the other scores' digits)
    s = s.clamp(lo, hi)
    center = s.gather(-1, n - k.ceil().clamp(1, n).long().unsqueeze(-1))
    s = (s - center).clamp_(-2, 1)
    csum = s.cumsum(-1, dtype=torch.float64)

    def prefix(m: Tensor) -> Tensor:  # Σ_{i < m} s_i
        return torch.where(m > 0, csum.gather(-1, (m - 1).clamp(min=0)), 0)

    def value(j: Tensor) -> Tensor:
        # S at the breakpoints s_j (first half of the columns) and s_j - 1 (second half), counting ties
        # by position
        half = j.shape[-1] // 2
        sj = s.gather(-1, j)
        shifted_sj = torch.cat([sj[..., :half] + 1, sj[..., half:] - 1], -1)
        count = n - torch.searchsorted(s, shifted_sj.contiguous(), right=True)  # #{s > s_j + 1}, #{s > s_j - 1}
        sj = sj.to(torch.float64)
        ju, jv = j[..., :half], j[..., half:]
        a, b = count[..., :half], count[..., half:]
        s_u = a + prefix(n - a) - prefix(ju + 1) - (n - 1 - ju - a) * sj[..., :half]
        s_v = (n - 1 - jv) + prefix(jv + 1) - prefix(n - b) - (b - (n - 1 - jv)) * (sj[..., half:] - 1)
        return torch.cat([s_u, s_v], -1)

    k = k.unsqueeze(-1)
    j = largest_index(value, k, n, (*z.shape[:-1], 2))
    ju, jv = j[..., :1], j[..., 1:]
    # on the piece after the breakpoint max(s_ju, s_jv - 1): positions > jv are ones, (ju, jv] free
    free = jv - ju
    t = (prefix(jv + 1) - prefix(ju + 1) + (n - 1 - jv) - k) / free.clamp(min=1)
    at_u = torch.where(ju >= 0, s.gather(-1, ju.clamp(min=0)).to(torch.float64), -torch.inf)
    corner = torch.maximum(at_u, s.gather(-1, jv.clamp(min=0)).to(torch.float64) - 1)  # jv = -1 only on NaN
    t = torch.where(free > 0, t, corner) + s[..., -1:] * 0 + center.to(torch.float64)  # a NaN in the slice makes it NaN
    return torch.cat([t, lo.to(torch.float64), hi.to(torch.float64)], -1)


def _measure(k: Tensor, rows: Tensor):
    """:func:`refine`'s evaluation of ``S(t) = Σ clip(z - t, 0, 1)`` for the targets ``k``: the Newton
    step on the piece to the right of ``t`` (``t + (S - k) / #free``), exact once the sets of zeros,
    free entries and ones stay the same between two Newton iterates (``S`` is then linear between
    them and the previous step landed on its root). One pass into a scratch row allocated once, three
    passes in place on it and three sums: ``c = clip(z - t, 0, 1)`` summed, then ``frac(c)`` (``c``
    without the ones) summed, which counts the ones as the difference, then ``ceil(frac(c))`` (the
    free set) summed (comparisons, their masks and fresh allocations each cost several passes on the
    CPU, an in-place pass about half of one into a second row)."""
    clipped = torch.empty_like(rows)

    def measure(rows: Tensor, at: Tensor, state: dict | None):
        c = torch.sub(rows, at.to(rows.dtype), out=clipped).clamp_(0, 1)
        total = row_sum(c)
        # z - t >= 1: each one adds 1 to total and 0 to Σ frac(c); the other terms are the same
        # values summed in the same order (float32 chunks of 256), so the two sums differ by the count
        # plus rounding errors of order 1e-4 for a row of 10^6 (rounded off)
        ones = torch.round(total - row_sum(c.frac_()))
        free = row_sum(c.ceil_())  # 0 < z - t < 1
        at = at.squeeze(-1)
        flat = (free == 0) & (total == k)  # S = k on a flat piece (integer k): any t there
        proposal = torch.where(flat, at, at + (total - k) / free)  # ±inf or NaN on other flat pieces
        done = flat
        if state is not None:
            done = done | ((free == state["free"]) & (ones == state["ones"]) & state["newton"] & (free > 0))
        return proposal, total > k, done, {"free": free, "ones": ones}

    return measure


def _windowed(rows: Tensor, k: Tensor, lo: Tensor):
    top = top_above(rows, lo)  # every score above lo; the others are zeros when t >= lo
    return None if top is None else solve_window(top, k, lo, lambda k, top, which: _measure(k, top))


def _threshold_cpu(z: Tensor, k: Tensor) -> Tensor:
    """The same threshold without sorting long rows (:func:`long_rows`): from the few scores above a
    bound when ``k`` is small, else by Newton steps over the whole row (:func:`_measure`)."""
    return long_rows(z, k, _threshold_portable, _windowed, _measure)


_threshold = threshold_op("sparse_threshold", _threshold_portable, _threshold_cpu)


def _solve(x: Tensor, k: Tensor, tau: Tensor) -> Tensor:
    found = scores_and_threshold(_threshold, x, k, tau)
    if found is None:
        return torch.zeros_like(x)
    z, t, lo, hi = found
    # clip(clip(z, lo, hi) - t, 0, 1) as one clamp of z - t (in place: z is ours; two one-sided
    # clamps, which are several times cheaper on the CPU than one with two tensor bounds)
    floor, ceil = (lo - t).clamp(0, 1).to(z.dtype), (hi - t).clamp(0, 1).to(z.dtype)
    return shifted(z, t, inplace=True).clamp_min_(floor).clamp_max_(ceil).to(x.dtype)


def _weights(p: Tensor) -> Tensor:
    # 1 on the free set 0 < p < 1, else 0 (also in a NaN slice: finite gradients): frac(p) is p there
    # and 0 at p = 0 or 1; arithmetic, as comparisons and their masks cost several passes on the CPU
    return torch.frac(p).sign_().nan_to_num_(0.0)


_SparseTopK = threshold_function("_SparseTopK", _solve, _weights)


def sparse_topk(x: Tensor, k: float | Tensor, dim: int = -1, *, temperature: float | Tensor = DEFAULT_TEMPERATURE) -> Tensor:
    """Sparse relaxed k-hot mask ``clip(x / τ - t, 0, 1)`` summing to ``k`` along ``dim``.

    Args:
        x: floating-point scores, any shape and device (half and bfloat16 computed in float32).
        k: ``0 <= k <= n``, a real number or a tensor of per-slice values (broadcastable to the
            shape of ``x`` without ``dim``); differentiable.
        dim: the dimension to select along.
        temperature: ``τ > 0``, a number or a per-slice tensor (differentiable): the width, in
            score units, of the ramp between 0 and 1.

    Returns ``p`` with the shape, dtype and device of ``x``: values in ``[0, 1]`` with exact zeros
    and ones, ``Σ p = k`` up to rounding. ``+inf`` scores get 1 and ``-inf`` scores 0 (while the
    others can make up ``k``); a NaN makes its slice NaN. Gradients are finite everywhere.

    Example:
        >>> import torch, khot
        >>> from khot.relaxed.sparse import sparse_topk
        >>> x = torch.tensor([0.2, 1.9, -1.0, 3.0, 1.5])
        >>> sparse_topk(x, 2)
        tensor([0.0000, 0.7000, 0.0000, 1.0000, 0.3000])
        >>> khot.soft_topk(x, 2, method="sparse", temperature=0.1)
        tensor([0., 1., 0., 1., 0.])
    """
    rows = Rows(x, k, dim, temperature)
    k, tau = rows.tensors()
    return rows.restore(apply(_SparseTopK, rows.x, k, tau))
