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
scans). Cost: one sort and two scans, ``O(n log n)``.

Backward (implicit function theorem, no solver): ``w = F'(z - t) = min(p, 1 - p)`` and
``grad_x = w (g - Σ w g / Σ w) / τ``, ``grad_k = Σ w g / Σ w`` (and ``grad_τ``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._threshold import Rows, finite_range_sorted, keep_exact, largest_index, lower_bound, shifted, threshold_function, threshold_op, work_dtype

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
    t = torch.where(k <= 0, torch.inf, torch.where(k >= n, -torch.inf, t)) + s[..., -1:] * 0  # NaN slices stay NaN
    return torch.cat([t, lo.to(torch.float64), hi.to(torch.float64)], -1)


def _threshold_portable(z: Tensor, k: Tensor) -> Tensor:
    return _core(z, k)


def _threshold_cpu(z: Tensor, k: Tensor) -> Tensor:
    """The same threshold from the largest scores only (long rows on the CPU): a strided sub-sample
    gives a likely lower bound ``t_lo`` of ``t``; one ``topk`` takes the scores above it, the rest
    enter through one sum, ``Σ e^{z - t_lo}`` over the row (``z <= t_lo``). Exact when the
    ``topk`` reached below ``t_lo`` and ``t >= t_lo`` (checked); otherwise a full sort."""
    rows, n = z.reshape(-1, z.shape[-1]), z.shape[-1]
    kr = k.reshape(-1)
    bounds = lower_bound(rows, kr, lambda s, ks: _core(s, ks)[..., 0])
    if bounds is None:
        return _core(z, k)
    lo, count = bounds
    top = rows.topk(count, -1).values  # descending
    window = top > lo
    # Σ_{z <= lo} e^{z - lo}: every entry above lo adds exactly e^0 = 1 in the clamped sum
    shift = lo.to(rows.dtype)  # exactly the shift used, in the scores' dtype
    low = torch.sub(rows, shift).clamp_(max=0).exp_().sum(-1, keepdim=True, dtype=torch.float64)
    low = (low - window.sum(-1, keepdim=True)).clamp(min=0)
    out = _core(torch.where(window, top, -torch.inf), kr, torch.log(low) + shift.to(torch.float64))
    return keep_exact(out, rows, kr, top, lo, _core).reshape(*z.shape[:-1], 3)  # left-out scores: p from F


_threshold = threshold_op("lapsum_threshold", _threshold_portable, _threshold_cpu)


def _solve(x: Tensor, k: Tensor, tau: Tensor) -> Tensor:
    dtype = work_dtype(x)
    z = x.to(dtype) / tau
    if z.shape[-1] == 0:
        return torch.zeros_like(x)
    t, lo, hi = _threshold(z, k).split(1, -1)
    u = shifted(z.clamp_(lo.to(dtype), hi.to(dtype)), t, inplace=True)
    e = torch.abs(u).neg_().exp_().mul_(0.5)
    return torch.where(u <= 0, e, 1 - e).to(x.dtype)


_LapSumTopK = threshold_function("_LapSumTopK", _solve, lambda p: torch.minimum(p, 1 - p))


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
    return rows.restore(_LapSumTopK.apply(rows.x, k, tau))
