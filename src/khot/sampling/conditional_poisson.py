"""Conditional Poisson sampling: the exactly-k maximum-entropy design, by log-space dynamic programmes.

Given weights ``w = exp(theta)``, conditional Poisson draws a size-``k`` subset ``S`` with
``P(S) ∝ prod_{i in S} w_i``. Its normaliser is the elementary symmetric polynomial
``e_k(w)``; the tables ``F[r, i] = log e_r(w_1, ..., w_i)`` obey
``F[r, i] = logaddexp(F[r, i - 1], theta_i + F[r - 1, i - 1])``, i.e. for each ``r`` one
``logcumsumexp`` over the items of ``theta + F[r - 1]`` shifted by one: ``k`` vectorised passes.
From prefix tables ``F`` and suffix tables ``B`` (the same on the reversed items) the inclusion
probabilities are ``P(i in S) = w_i sum_r e_r(before i) e_{k-1-r}(after i) / e_k(w)`` and the
exclusion ones ``sum_r e_r(before i) e_{k-r}(after i) / e_k(w)``, both in log space (no
overflow for any ``theta``, no cancellation in ``1 - P``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["prefix_tables", "log_inclusion", "working_logits", "sample", "conditional_poisson_marginals"]

_TOL = 1e-12  # stop when max |P(i in S) - pi_i| is this small (the DP's float64 rounding is ~1e-14)
_FLOOR = 1e-9  # ... or when it stops shrinking below this; above it, an error
_MAX_ITER = 200
# log 0 in the tables: a finite stand-in for -inf keeps every gradient finite (exp(_NEG - x) = 0
# with a zero derivative, where -inf - -inf would be NaN); sums of a few of them stay finite
_NEG = -1e200


def prefix_tables(theta: Tensor, kmax: int) -> Tensor:
    """``F`` (rows, kmax + 1, n + 1): ``F[:, r, i] = log e_r(exp(theta[:, :i]))``."""
    rows, n = theta.shape
    F = theta.new_empty(rows, kmax + 1, n + 1)
    F[:, 0] = 0.0
    F[:, 1:, 0] = _NEG
    for r in range(1, kmax + 1):
        F[:, r, 1:] = torch.logcumsumexp(theta + F[:, r - 1, :-1], dim=1)
    return F


def log_inclusion(theta: Tensor, size: Tensor, kmax: int) -> tuple[Tensor, Tensor]:
    """``(log P(i in S), log P(i not in S))`` of conditional Poisson with weights ``exp(theta)``
    (rows, n; ``_NEG`` for items never drawn) and per-row sizes ``size <= kmax`` (rows,) int64."""
    rows, n = theta.shape
    F = prefix_tables(theta, kmax)
    B = prefix_tables(theta.flip(1), kmax).flip(2)  # B[:, r, i] = log e_r(exp(theta[:, i:]))
    log_z = F[:, :, -1].gather(1, size.unsqueeze(1))
    r = torch.arange(kmax + 1, device=theta.device)

    def combine(need: Tensor) -> Tensor:  # log sum_r e_r(before i) e_{need - r}(after i)
        idx = need.unsqueeze(1) - r  # (rows, kmax + 1)
        after = B[:, :, 1:].gather(1, idx.clamp(0, kmax).unsqueeze(2).expand(rows, kmax + 1, n))
        after = after.masked_fill((idx < 0).unsqueeze(2), _NEG)
        return torch.logsumexp(F[:, :, :-1] + after, dim=1)

    return theta + combine(size - 1) - log_z, combine(size) - log_z


def working_logits(pi: Tensor, free: Tensor, size: Tensor) -> Tensor:
    """Logits ``theta`` whose conditional Poisson design of size ``size`` has inclusion
    probabilities ``pi`` on the ``free`` items (``0 < pi < 1``, summing to ``size``); ``_NEG``
    (log 0) elsewhere.

    Iterates ``theta <- theta + a (logit(pi) - logit(P(. in S; theta)))`` from ``theta =
    logit(pi)``: with ``a = 1``, the Newton-type fixed point of Chen, Dempster and Liu (1994) in
    log-odds, which converges linearly (about ten steps to 1e-14 for n = 200, k = 20). A step that
    does not lower a row's error ``max_i |P(i in S) - pi_i|`` is refused and that row's ``a``
    halved for good (the full step oscillates for k = 1 on two items, or k = n - 1). A row is done at error <= 1e-12, or at <= 1e-9 once a step is refused or
    fails to halve the error (rounding); anything else raises ``RuntimeError`` (never a
    silent cap).
    """
    target = torch.where(free, pi.logit(), 0.0)
    theta = torch.where(free, target, _NEG)
    kmax = int(size.max())

    def evaluate(theta: Tensor) -> tuple[Tensor, Tensor]:
        log_in, log_out = log_inclusion(theta, size, kmax)
        err = torch.where(free, log_in.exp() - pi, 0.0).abs().amax(1, keepdim=True)
        return err, torch.where(free, target - (log_in - log_out), 0.0)

    err, step = evaluate(theta)
    alpha = torch.ones_like(err)
    slow = torch.zeros_like(err, dtype=torch.bool)
    for _ in range(_MAX_ITER):
        done = (err <= _TOL) | ((err <= _FLOOR) & ((alpha < 1) | slow))
        if bool(done.all()):
            return theta
        trial = torch.where(free, theta + alpha * step, _NEG)
        trial_err, trial_step = evaluate(trial)
        better = (trial_err < err) & ~done
        slow = trial_err > err / 2
        theta = torch.where(better, trial, theta)
        err, step = torch.where(better, trial_err, err), torch.where(better, trial_step, step)
        alpha = torch.where(better, alpha, alpha / 2)
    raise RuntimeError(
        f"conditional Poisson: the working probabilities did not converge (max |P(i in S) - pi_i| = "
        f"{float(err.max()):.3g} after {_MAX_ITER} steps; do the probabilities sum to an integer?)"
    )


def sample(theta: Tensor, size: Tensor, u: Tensor) -> Tensor:
    """A conditional Poisson sample (rows, n) bool with weights ``exp(theta)`` and sizes ``size``.

    Draws the items from the last to the first: with ``r`` items left to draw among the first
    ``m``, the last of them is item ``j < m`` with probability ``w_j e_{r-1}(w_1..w_{j-1}) /
    e_r(w_1..w_m)``, whose cumulative sums over ``j`` are the table row ``F[r]``: one
    ``searchsorted`` per draw, with ``u`` (rows, >= max size) uniforms in [0, 1).
    """
    rows, n = theta.shape
    kmax = int(size.max()) if rows else 0
    F = prefix_tables(theta, kmax)
    taken = torch.zeros(rows, n + 1, dtype=torch.bool, device=theta.device)  # last column: a dummy
    index = torch.arange(rows, device=theta.device)
    left, upper = size.clone(), torch.full_like(size, n)
    for j in range(kmax):
        row = F[index, left]  # (rows, n + 1)
        point = torch.log1p(-u[:, j : j + 1]) + row.gather(1, upper.unsqueeze(1))  # log of a point in (0, e_r]
        pick = torch.searchsorted(row, point).squeeze(1) - 1  # the first prefix reaching the point ends at it
        active = left > 0
        taken[index, torch.where(active, pick, n)] = True
        upper = torch.where(active, pick, upper)
        left = left - active.long()
    return taken[:, :n]


def conditional_poisson_marginals(logits: Tensor, k, dim: int = -1) -> Tensor:
    """Inclusion probabilities of the size-``k`` conditional Poisson design with weights ``exp(logits)``.

    ``P(i in S)`` where ``P(S) ∝ prod_{i in S} exp(logits_i)`` over the subsets of exactly ``k``
    items along ``dim``: the exact marginals that SIMPLE (Ahmed et al. 2023) trains with, by a
    log-space dynamic programme in float64 (O(n k) time and memory per slice, differentiable by
    autograd). Each slice sums to ``k``; items with logit ``-inf`` get 0.

    Args:
        logits: floating point, finite or ``-inf`` (at least ``k`` finite per slice).
        k: an int or an integer tensor of per-slice sizes, ``0 <= k <= n``.
        dim: the dimension holding the items.

    Returns:
        A tensor like ``logits``.

    >>> import torch
    >>> p = conditional_poisson_marginals(torch.tensor([0.0, 0.0, 1.0]), 2)
    >>> p  # e_2 = 1 + 2e: P(item 3) = 2e / (1 + 2e), the others (1 + e) / (1 + 2e)
    tensor([0.5777, 0.5777, 0.8446])
    >>> float(p.sum())
    2.0
    """
    from .._checks import check_count, check_range, check_tensor, normalize_dim

    check_tensor("logits", logits, floating=True)
    d = normalize_dim(dim, logits.dim())
    moved = logits.movedim(d, -1) if logits.dim() else logits.reshape(1)
    n = moved.shape[-1]
    size = check_count(k, n, moved.shape[:-1], logits.device)
    check_range(moved.detach(), "logits", -math.inf, math.inf, what="be finite or -inf")
    theta = moved.reshape(-1, n).double()
    finite = theta > -math.inf
    sizes = size.reshape(-1) if isinstance(size, Tensor) else torch.full((theta.shape[0],), size, device=theta.device)
    check_range(finite.sum(1) - sizes, "logits", 0, math.inf, what="have at least k finite entries per slice (finite count minus k)")
    kmax = size if isinstance(size, int) else int(size.max())  # a tensor k: one synchronisation
    log_in, _ = log_inclusion(torch.where(finite, theta, _NEG), sizes, kmax)
    out = log_in.exp().to(logits.dtype).reshape(moved.shape)
    return out.movedim(-1, d) if logits.dim() else out.reshape(())
