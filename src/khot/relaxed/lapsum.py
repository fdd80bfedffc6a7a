"""LapSum top-k: ``p_i = F((x_i - t) / τ)`` with ``F`` the Laplace CDF and ``Σ p = k``, solved exactly.

Struski, Bednarczyk, Podolak & Tabor, "LapSum - One Method to Differentiate Them All: Ranking,
Sorting and Top-k Selection" (ICML 2025). ``F(u) = e^u / 2`` for ``u <= 0`` and ``1 - e^{-u} / 2``
above: the same shape as the logistic function of :func:`khot.sigmoid_topk` but with
exponential tails, which is what makes the threshold solvable in closed form.

Forward, exact and without iterations: with ``z = x / τ`` sorted ascending and ``t`` between
``z_(q)`` and ``z_(q+1)`` (``q`` items below ``t``), the sum is
``Σ F = A e^{-t} / 2 + (n - q) - B e^{t} / 2`` with ``A = Σ_{i <= q} e^{z_(i)}`` and
``B = Σ_{i > q} e^{-z_(i)}``, a quadratic in ``e^t``: ``t = log((c + sqrt(c² + AB)) / B)``,
``c = n - q - k``, evaluated in log space (``log A``, ``log B`` from two ``logcumsumexp`` scans in
float64) in whichever of two equivalent forms avoids cancellation. ``q`` comes from a bisection
over the sorted row (``log2 n`` steps of a few gathers; the sum at a breakpoint needs only the
scans). Cost: one sort and two scans, ``O(n log n)``. That is the portable path (fixed work, no host
synchronisation). On CPU tensors, long rows skip the sort (:func:`khot.relaxed._threshold.long_rows`):
the same closed form is applied to the partition of the row at the current estimate of ``t`` (a few
arithmetic passes), which converges cubically since ``F`` is C¹; a row is done once the error bound
``m (cosh d - 1)`` of the last step (``m`` bounds the number of scores within ``|d|`` of ``t``) is below
the working precision (typically 2 passes).

Backward (implicit function theorem, no solver): ``w = F'(z - t) = e^{-|z - t|} / 2`` (kept from the
forward: one tensor of the input's size until the backward, which then needs neither a pass nor
a temporary to compute it; ``min(p, 1 - p)`` when the backward is itself differentiated) and
``grad_x = w (g - Σ w g / Σ w) / τ``, ``grad_k = Σ w g / Σ w`` (and ``grad_τ``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from khot._backend import apply
from khot._checks import _readable_cpu

from ._threshold import (
    LONG,
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

__all__ = ["DEFAULT_TEMPERATURE", "lapsum_topk"]

#: Default ``τ`` (score units): as smooth as sigmoid top-k at ``τ = 1``.
DEFAULT_TEMPERATURE = 1.0
# ±inf scores are placed this far (in units of τ) beyond the finite ones: F is then 0 or 1 in float64
_MARGIN = 1000.0


def _gather(t: Tensor, j: Tensor) -> Tensor:
    """``t[..., j]``, ``-inf`` where ``j`` is outside ``[0, n)`` (an empty sum)."""
    n = t.shape[-1]
    return torch.where((j >= 0) & (j < n), t.gather(-1, j.clamp(0, n - 1)), -torch.inf)


def _core(z: Tensor, k: Tensor, log_below: Tensor | float = -torch.inf) -> Tensor:
    """``(t, lo, hi)`` in float64, ``(..., 3)``, for the scores ``z`` plus, optionally, scores that all
    lie below the threshold and whose ``log Σ e^z`` is ``log_below`` (``(..., 1)``)."""
    n = z.shape[-1]
    s = z.sort(-1).values.contiguous()  # searchsorted needs a contiguous row
    lo, hi = finite_range_sorted(s, _MARGIN)
    s = s.clamp(lo, hi).to(torch.float64)
    log_a = torch.logaddexp(torch.logcumsumexp(s, -1), torch.as_tensor(log_below, dtype=s.dtype))  # log Σ_{i <= j} e^{s_i}
    log_b = torch.logcumsumexp(-s.flip(-1), -1).flip(-1)  # log Σ_{i >= j} e^{-s_i}

    def value(j: Tensor) -> Tensor:  # Σ F(s_i - s_j)
        sj = s.gather(-1, j)
        return 0.5 * torch.exp(_gather(log_a, j) - sj) + (n - 1 - j) - 0.5 * torch.exp(sj + _gather(log_b, j + 1))

    k = k.unsqueeze(-1)
    q = largest_index(value, k, n, (*z.shape[:-1], 1)) + 1  # items below t
    la = torch.where(q > 0, _gather(log_a, q - 1), torch.as_tensor(log_below, dtype=s.dtype))
    lb = _gather(log_b, q)
    c = (n - q) - k
    # h = log(|c| + sqrt(c² + AB)) without overflow; then e^t = e^h / B (c >= 0) or A / e^h (c < 0)
    lc, half = torch.log(c.abs()), (la + lb) / 2
    top = torch.maximum(lc, half)
    top = torch.where(torch.isfinite(top), top, 0)  # only k = 0 or k = n, replaced below
    h = top + torch.log(torch.exp(lc - top) + torch.sqrt(torch.exp(2 * (lc - top)) + torch.exp(2 * (half - top))))
    t = torch.where(c >= 0, h - lb, la - h)
    everything = (k >= n) & (torch.as_tensor(log_below, dtype=s.dtype) == -torch.inf)  # k = n: all ones
    t = torch.where(k <= 0, torch.inf, torch.where(everything, -torch.inf, t)) + s[..., -1:] * 0  # NaN slices stay NaN
    return torch.cat([t, lo.to(torch.float64), hi.to(torch.float64)], -1)


def _threshold_portable(z: Tensor, k: Tensor) -> Tensor:
    return _core(z, k)


def _windowed(rows: Tensor, k: Tensor, lo: Tensor):
    """From the scores above ``lo`` (:func:`top_above`); the others, below ``t`` when ``t >= lo``, enter
    through one sum, ``Σ e^{z - lo}`` (:func:`_measure`'s ``below``)."""
    top = top_above(rows, lo)  # every score above lo
    if top is None:
        return None
    # Σ_{z <= lo} e^{z - lo}: every entry above lo adds exactly e^0 = 1 in the clamped sum
    low = row_sum(torch.sub(rows, lo.to(rows.dtype)).clamp_(max=0).exp_())
    low = (low - (top > lo).sum(-1)).clamp(min=0)
    return solve_window(top, k, lo, lambda k, top, which: _measure(k, top, (lo[which], low[which]), rows.shape[-1]))


def _measure(k: Tensor, rows: Tensor, below: tuple[Tensor, Tensor] | None = None, n: int | None = None):
    """:func:`refine`'s evaluation of ``S(t) = Σ F(z - t)`` for the targets ``k``. With ``u = z - t``,
    ``P = Σ_{u<0} e^u``, ``Q = Σ_{u>0} e^{-u}`` and ``a = #{u > 0}`` (ties at 0 count half on each
    side), ``S(t + d) = P e^{-d} / 2 + a - Q e^{d} / 2`` for every ``d`` that moves no score across
    the threshold: the step solves that quadratic in ``e^d`` (the module docstring's closed form).
    Scores that do cross are off by at most ``cosh(d) - 1`` each, and there are at most
    ``m = min(n, e^{|d|} (P + Q))`` of them (each has ``|u| <= |d|``, so ``e^{-|u|} >= e^{-|d|}``), so the
    step is exact to within ``m (cosh d - 1)`` in ``S`` (F is C¹ at 0): the row is done once that bound, divided by the least
    slope ``S'`` on the way, is below the working precision. Five arithmetic passes and three sums
    into two scratch rows allocated once. ``below = (lo, low)`` adds scores left out of ``rows`` that
    all lie below ``lo`` (``(rows, 1)``) with ``Σ e^{z - lo} = low``; ``n`` counts every score of the
    row (for the bound)."""
    total = rows.shape[-1] if n is None else n
    shifted_, signs = torch.empty_like(rows), torch.empty_like(rows)
    tol = 2.0**-27 if rows.dtype != torch.float64 else 2.0**-50  # float32: 1/16 of the scores' rounding near t

    def measure(rows: Tensor, at: Tensor, state: dict | None):
        u = torch.sub(rows, at.to(rows.dtype), out=shifted_)
        sign = torch.sign(u, out=signs)
        e = torch.addcmul(u.new_zeros(()), u, sign, value=-1, out=u).exp_()  # e^{-|u|}
        sum_e, sum_sign = row_sum(e), row_sum(sign)
        sum_se = row_sum(sign.mul_(e))
        p, q, a = (sum_e - sum_se) / 2, (sum_e + sum_se) / 2, (rows.shape[-1] + sum_sign) / 2
        if below is not None:
            p = p + below[1] * torch.exp(below[0] - at).squeeze(-1)
        c = a - k
        r = torch.sqrt(c * c + p * q)
        # d = log(e^d), the positive root of q y² - 2 c y - p = 0, in a form without cancellation
        d = torch.where(c >= 0, torch.log(c + r) - torch.log(q), torch.log(p) - torch.log(r - c))
        at = at.squeeze(-1)
        step = d.abs()
        # the scores that cross, |u| <= |d|, each have e^{-|u|} >= e^{-|d|}: at most e^{|d|} (P + Q) of them
        crossing = torch.clamp(torch.exp(step) * (p + q), max=total)
        bound = crossing * (torch.cosh(step) - 1) * torch.exp(step + 1) / ((p + q) / 2)  # t within 1: S' >= e^{-d-1} (P + Q) / 2
        proposal = at + d
        done = (bound <= tol * proposal.abs().clamp(min=1)) & proposal.isfinite()  # e^{-|u|} can underflow to 0 on both sides: d = ±inf
        return proposal, p / 2 + a - q / 2 > k, done, state or {}

    return measure


def _threshold_cpu(z: Tensor, k: Tensor) -> Tensor:
    """The same threshold without sorting long rows (:func:`long_rows`): from the few scores above a
    bound when ``k`` is small, else by closed-form steps over the whole row (:func:`_measure`)."""
    return long_rows(z, k, _core, _windowed, _measure)


_threshold = threshold_op("lapsum_threshold", _threshold_portable, _threshold_cpu)


def _clamped(z: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``z`` clamped to ``[lo, hi]`` in place; two passes skipped on long CPU rows when no slice has
    a bound (finite scores, which the CPU path solves without sorting: ``lo = -inf``, ``hi = +inf``)."""
    if z.shape[-1] >= LONG and _readable_cpu(z) and not bool(torch.isfinite(torch.cat([lo, hi], -1)).any()):
        return z
    return z.clamp_min_(lo.to(z.dtype)).clamp_max_(hi.to(z.dtype))


def _solve(x: Tensor, k: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """``(p, e)`` with ``e = e^{-|z - t|} = 2 F'``, kept for the backward (``keeps=2``)."""
    found = scores_and_threshold(_threshold, x, k, tau)
    if found is None:
        return torch.zeros_like(x), torch.zeros_like(x)
    z, t, lo, hi = found
    u = shifted(_clamped(z, lo, hi), t, inplace=True)
    above = torch.sign(u).clamp_min_(0)  # 1 where u > 0, else 0 (NaN stays NaN): becomes p
    e = u.abs_().neg_().exp_()  # in place: u is ours (no out=: vmap has no rule for it)
    # above + e (1/2 - above): e / 2 below (full relative precision in the tail), 1 - e / 2 above;
    # one in-place pass instead of torch.where, which costs about as much as the rest of the forward
    # on the CPU
    p = above.lerp_(torch.tensor(0.5, dtype=above.dtype, device=above.device), e)
    return p.to(x.dtype), e.to(x.dtype)


def _weights(p: Tensor) -> Tensor:
    # F'(u) = min(p, 1 - p), with one new tensor
    q = torch.rsub(p, 1)
    return torch.minimum(p, q) if q.requires_grad else torch.minimum(p, q, out=q)  # out= is not differentiable


_LapSumTopK = threshold_function("_LapSumTopK", _solve, _weights, keeps=2.0)


def lapsum_topk(x: Tensor, k: float | Tensor, dim: int = -1, *, temperature: float | Tensor = DEFAULT_TEMPERATURE) -> Tensor:
    """Relaxed k-hot mask ``F((x - t) / τ)`` (``F`` the Laplace CDF) summing to ``k`` along ``dim``.

    Args:
        x: floating-point scores, any shape and device (half and bfloat16 computed in float32).
        k: ``0 <= k <= n``, a real number or a tensor of per-slice values; differentiable.
        dim: the dimension to select along.
        temperature: ``τ > 0``, a number or a per-slice tensor (differentiable).

    Returns ``p`` with the shape, dtype and device of ``x``: values in ``[0, 1]`` (0 and 1 only for
    ``±inf`` scores, ``k = 0``, ``k = n`` or underflow), ``Σ p = k`` up to rounding. ``+inf``
    scores get 1 and ``-inf`` scores 0 while the others can make up ``k``; a NaN makes its
    slice NaN.

    Example:
        >>> import torch, khot
        >>> x = torch.tensor([0.2, 1.9, -1.0, 3.0, 1.5])
        >>> p = khot.soft_topk(x, 2, method="lapsum")
        >>> p
        tensor([0.1107, 0.5873, 0.0333, 0.8626, 0.4061])
        >>> round(p.sum().item(), 5)
        2.0
    """
    rows = Rows(x, k, dim, temperature)
    k, tau = rows.tensors()
    return rows.restore(apply(_LapSumTopK, rows.x, k, tau)[0])
