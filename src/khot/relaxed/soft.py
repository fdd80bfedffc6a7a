"""SOFT top-k: entropic optimal transport of the scores to the anchors {0, 1}, solved by Sinkhorn.

Xie, Dai, Chen, Dai, Zhao, Zha, Wei & Pfister, "Differentiable Top-k with Optimal Transport"
(NeurIPS 2020). The ``n`` scores, each of mass ``1/n``, are transported to two anchors, ``0``
with mass ``(n - k)/n`` and ``1`` with mass ``k/n``, at cost ``(x_i - y_j)²`` with entropic
regularisation ``ε`` (``temperature``); the mask is ``n`` times the mass that score ``i`` sends
to anchor 1. The row constant ``x_i²`` of the cost changes the potentials, not the plan, and is
dropped (so large scores lose no precision): anchor 0 costs 0 and anchor 1 costs ``1 - 2 x_i``.

Solved as the paper does, by log-domain Sinkhorn iterations, a fixed number ``n_iter`` of them
(default 100), each a few passes over the scores, so the cost is ``O(n_iter n)``. Each slice is
its own problem: unlike the public code, which divides the scores by their maximum over the
whole batch, no slice's output depends on another's. The output follows a row update, so each
value lies in ``[0, 1]``; the column marginal, ``Σ p = k``, holds only as far as Sinkhorn has
converged. **Convergence check**: after the iterations, ``|Σ p - k| / max(1, k)`` must be at
most ``tol`` (default ``1e-3``), else a ``ValueError`` says so (raise ``n_iter`` or ``ε``; the
iterations converge slowly when ``ε`` is small against the gaps between scores: on standard
normal scores, 30 iterations reach 1e-9 at ``ε = 1``, 300 are needed at ``ε = 0.1``).
``tol=None`` skips the check (then nothing guarantees the sum).

With two anchors the plan has a closed form, ``p_i = sigmoid((2 x_i + d) / ε)`` for one scalar
``d`` per slice: converged SOFT top-k is :func:`khot.sigmoid_topk` at ``τ = ε / 2``, which
finds ``d`` directly and exactly; use this method to reproduce SOFT, and sigmoid top-k otherwise.
The backward pass is the implicit-function gradient at that fixed point (closed form, no
unrolled iterations, so memory stays ``O(n)``): ``w = p (1 - p)``,
``grad_x = 2 w (g - Σ w g / Σ w) / ε``, ``grad_k = Σ w g / Σ w``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from khot._backend import apply
from khot._checks import check_range

from ._threshold import Rows, threshold_function, work_dtype

__all__ = ["DEFAULT_TEMPERATURE", "DEFAULT_ITERATIONS", "soft_ot_topk"]

#: Default ``ε`` (squared score units): converges in about 30 iterations on scores of order one.
DEFAULT_TEMPERATURE = 1.0
#: Default number of Sinkhorn iterations.
DEFAULT_ITERATIONS = 100


def _solve(x: Tensor, k: Tensor, eps: Tensor, n_iter: int) -> Tensor:
    dtype = work_dtype(x)
    n = x.shape[-1]
    if n == 0:
        return torch.zeros_like(x)
    z = 2 * x.to(dtype) / eps
    # ±inf scores send all their mass to anchor 1 or 0: the others share what is left of k
    finite, high, low = torch.isfinite(z), z == torch.inf, z == -torch.inf
    cost = torch.where(finite, 1 / eps - z, 0)  # anchor 1's cost over ε; anchor 0's is 0
    k = k.unsqueeze(-1).to(dtype)
    n_high, n_low, n_left = high.sum(-1, keepdim=True), low.sum(-1, keepdim=True), finite.sum(-1, keepdim=True)
    k_left = torch.minimum((k - n_high).clamp(min=0), n_left.to(dtype))
    # more than k at +inf: they share k; fewer than k above -inf: those at -inf share the rest
    p_high = torch.where(n_high > k, k / n_high.clamp(min=1), 1.0)
    p_low = (k - n_high - n_left).clamp(min=0) / n_low.clamp(min=1)
    log_mu = -math.log(n)
    log_nu0, log_nu1 = torch.log((n_left - k_left) / n), torch.log(k_left / n)
    b0 = b1 = torch.zeros_like(k)  # the anchors' potentials over ε
    for _ in range(n_iter):
        a = torch.where(finite, log_mu - torch.logaddexp(b0, b1 - cost), -torch.inf)  # rows sum to 1/n
        b0 = log_nu0 - torch.logsumexp(a, -1, keepdim=True)
        b1 = log_nu1 - torch.logsumexp(a - cost, -1, keepdim=True)
    # a last row update: n Γ_i1 = e^{b1 - cost_i} / (e^{b0} + e^{b1 - cost_i})
    d = torch.where(k_left <= 0, -torch.inf, torch.where(k_left >= n_left, torch.inf, b1 - b0))
    p = torch.where(high, p_high, torch.where(low, p_low, torch.sigmoid(d - cost)))
    return torch.where(torch.isnan(z).any(-1, keepdim=True), torch.nan, p).to(x.dtype)


_SoftTopK = threshold_function("_SoftTopK", _solve, lambda p: p * (1 - p), slope=2.0)


def soft_ot_topk(
    x: Tensor,
    k: float | Tensor,
    dim: int = -1,
    *,
    temperature: float | Tensor = DEFAULT_TEMPERATURE,
    n_iter: int = DEFAULT_ITERATIONS,
    tol: float | None = 1e-3,
) -> Tensor:
    """SOFT top-k mask of ``x`` along ``dim``: entropic OT to the anchors {0, 1} by ``n_iter`` Sinkhorn steps.

    Args:
        x: floating-point scores (half and bfloat16 computed in float32).
        k: ``0 <= k <= n``, a real number or a tensor of per-slice values; differentiable.
        dim: the dimension to select along.
        temperature: the entropic regularisation ``ε > 0``, a number or a per-slice tensor.
        n_iter: the number of Sinkhorn iterations (an int >= 1).
        tol: the largest ``|Σ p - k| / max(1, k)`` accepted after them: a ``ValueError``
            otherwise (the module docstring); ``None`` skips the check.

    Returns ``p`` with the shape, dtype and device of ``x``, values in ``[0, 1]``, ``Σ p ≈ k``.
    ``+inf`` scores get 1 and ``-inf`` scores 0, and the finite ones share what is left of ``k``
    (more than ``k`` entries at ``+inf`` share ``k``; with fewer than ``k`` above ``-inf``, those at
    ``-inf`` share the rest); a NaN makes its slice NaN.

    Example:
        >>> import torch, khot
        >>> x = torch.tensor([0.2, 1.9, -1.0, 3.0, 1.5])
        >>> p = khot.soft_topk(x, 2, method="soft", temperature=0.5)
        >>> p.round(decimals=3)
        tensor([0.0020, 0.6910, 0.0000, 0.9950, 0.3110])
        >>> torch.allclose(p, khot.sigmoid_topk(x, 2, temperature=0.25), atol=1e-5)  # the converged limit
        True
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise (ValueError if isinstance(n_iter, int) and not isinstance(n_iter, bool) else TypeError)(
            f"n_iter must be an int >= 1, got {n_iter!r}"
        )
    if tol is not None:
        tol = float(tol) if not isinstance(tol, bool) and isinstance(tol, (int, float)) and tol >= 0 else None
        if tol is None:
            raise ValueError("tol must be a number >= 0 or None")
    rows = Rows(x, k, dim, temperature)
    kt, eps = rows.tensors()
    p = apply(_SoftTopK, rows.x, kt, eps, n_iter)
    if tol is not None:
        with torch.no_grad():
            err = (p.sum(-1, dtype=work_dtype(p)) - kt).abs() / kt.clamp(min=1)
            err = torch.where(torch.isnan(err), 0, err)  # NaN slices are NaN, not unconverged
            # p rounded to a half dtype sums to within eps/2 of k of the unrounded one: not Sinkhorn's error
            err = (err - torch.finfo(p.dtype).eps / 2).clamp(min=0) if p.dtype in (torch.float16, torch.bfloat16) else err
            what = f"be <= tol = {tol} after n_iter = {n_iter} Sinkhorn iterations (raise n_iter or the temperature)"
            checked = check_range(err, "the SOFT marginal error |sum(p) - k| / max(1, k)", 0, tol, what=what)
        p = p + (0 * checked).unsqueeze(-1).to(p.dtype)  # keeps the check in compiled graphs
    return rows.restore(p)
