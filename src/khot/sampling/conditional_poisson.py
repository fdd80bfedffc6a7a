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

_TOL = 1e-12  # stop when max |P(i in S) - pi_i| is this small (the tables' float64 rounding: ~1e-14 for short rows) ...
_FLOOR = 1e-9  # ... or, below this, when a step stops halving it (rounding: ~1e-10 at n = 3000, k = 1500); never above it
_MAX_ITER = 500
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


_BIG = 1e280  # the fast tables scale each row r so that its last entry is this ...
_SMALL = 1e-250  # ... and send a row to the log-space tables if an entry that should be positive is below this
_LOG_BIG = math.log(_BIG)
_CHUNK = 1 << 20  # the solver and the sampler work on blocks of rows of about this many table entries (8 MiB)


def _fast_tables(theta: Tensor, kmax: int) -> tuple[Tensor, Tensor]:
    """``(F, ok)``: the tables of :func:`prefix_tables` by scaled cumulative sums in linear space
    (a ``cumsum`` and a few products per ``r`` instead of a ``logcumsumexp``), and ``ok`` (rows,)
    bool: the rows where they are accurate.

    The weights are ``w = exp(theta - max theta)`` (<= 1) and row ``r`` of the table is rescaled
    so that its last entry is ``_BIG`` (by a factor of at most ``e^700``), the factor's logarithm
    kept apart. Every entry is then a sum of
    positive terms, so it carries a relative error of a few ``(n + kmax) eps``, unless a term
    underflowed. A row is ``ok`` when no weight of a drawable item underflows (``theta`` within
    700 of the row's maximum) and every entry that is positive in exact arithmetic (at least
    ``r`` drawable items among the first ``i``) is at least ``_SMALL`` before the rescaling: the
    terms lost to underflow (each below 1e-307) are then negligible in every entry. Only rows that
    are not ``ok`` need the log-space tables.
    """
    rows, n = theta.shape
    drawable = theta > _NEG / 2
    top = torch.where(drawable, theta, -math.inf).amax(1, keepdim=True)
    top = torch.where(top > -math.inf, top, 0.0)
    rel = theta - top
    ok = ~(drawable & (rel < -700)).any(1)
    w = rel.exp_()  # exp(_NEG - top) = 0
    count = drawable.cumsum(1)  # drawable items among the first i + 1
    G = theta.new_empty(rows, kmax + 1, n + 1)
    G[:, 0] = 1.0
    G[:, 1:, 0] = 0.0
    tiny = torch.finfo(theta.dtype).tiny
    applied = theta.new_zeros(rows, kmax + 1)  # log of the factor row r was scaled by
    for r in range(1, kmax + 1):
        c = G[:, r, 1:]
        torch.mul(w, G[:, r - 1, :-1], out=c)
        torch.cumsum(c, 1, out=c)
        # scale by _BIG / last, by at most e^700 (no overflow of the factor; an entry scaled
        # less stays below _BIG), so every later sum stays far from overflow
        a = applied[:, r : r + 1]
        a.copy_(c[:, -1:].clamp_min(tiny).log_()).neg_().add_(_LOG_BIG).clamp_max_(700.0)
        c.mul_(a.exp())
    # the check, for all r at once: the first entry that is positive in exact arithmetic, before
    # its scaling, is at least _SMALL (entries only grow along a row)
    rs = torch.arange(1, kmax + 1, device=theta.device)
    first = torch.searchsorted(count, rs.expand(rows, kmax).contiguous())  # first item with count >= r
    at = G[:, 1:, 1:].gather(2, first.clamp_max(n - 1).unsqueeze(2)).squeeze(2)
    ok &= ~((first < n) & (at < _SMALL * applied[:, 1:].exp())).any(1)
    log_scale = -applied.cumsum(1)
    F = G.log_()
    F += (log_scale + torch.arange(kmax + 1, device=theta.device, dtype=theta.dtype) * top).unsqueeze(2)
    return F, ok  # log 0 = -inf where fewer than r items are drawable


def _tables(theta: Tensor, kmax: int) -> Tensor:
    """:func:`prefix_tables`, fast: the linear-space tables, with the log-space ones for the rows
    where those are not provably accurate (a data-dependent choice: eager CPU or inside an op)."""
    F, ok = _fast_tables(theta, kmax)
    bad = (~ok).nonzero().squeeze(1)
    if bad.numel():
        F[bad] = prefix_tables(theta[bad], kmax)
    return F


def _inclusion(theta: Tensor, size: Tensor, kmax: int) -> tuple[Tensor, Tensor]:
    """``(P(i in S), P(i not in S))`` by the fast tables: the quantities of :func:`log_inclusion`,
    as ``sum_r exp(F[r, i] + B[size - 1 - r, i + 1] + theta_i - log e_size)`` and ``sum_r
    exp(F[r, i] + B[size - r, i + 1] - log e_size)``, every term at most 1 (no ``logsumexp``): a
    few passes over a (rows, kmax + 1, n) block. Both are computed (``1 - P`` would lose all
    accuracy for items within rounding of 1)."""
    rows, n = theta.shape
    F = _tables(theta, kmax)
    R = _tables(theta.flip(1), kmax)  # R[:, j, m] = log e_j(exp(theta[:, n - m:])), the last m items
    log_z = F[:, :, -1].gather(1, size.unsqueeze(1)).unsqueeze(2)
    # after[:, r, i] = R[:, size - r, n - 1 - i] = log e_{size-r} of the items after i; the
    # inclusion terms use after[:, r + 1] (size - 1 - r)
    if bool((size == kmax).all()):
        after = R[:, :, :n].flip((1, 2))
    else:
        j = size.unsqueeze(1) - torch.arange(kmax + 1, device=theta.device)  # (rows, kmax + 1)
        after = R[:, :, :n].flip(2).gather(1, j.clamp_min(0).unsqueeze(2).expand(rows, kmax + 1, n))
        after.masked_fill_((j < 0).unsqueeze(2), -math.inf)
    after -= log_z
    inside = after[:, 1:] + F[:, :kmax, :n]
    inside += theta.unsqueeze(1)
    after += F[:, :, :n]
    return inside.exp_().sum(1), after.exp_().sum(1)


def _solve(pi: Tensor, free: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """The iteration of :func:`working_logits` on one block of rows: ``(theta, err)``, with
    ``err`` (rows,) the final ``max_i |P(i in S) - pi_i|``."""
    target = torch.where(free, pi.logit(), 0.0)
    kmax = int(size.max())
    tiny = torch.finfo(pi.dtype).tiny
    # the error float64 rounding allows: grows with the row's length (sums over the items) and k
    floor = (256 * torch.finfo(pi.dtype).eps * (free.sum(1) + size)).clamp(1e-11, _FLOOR)

    def evaluate(theta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        p, q = _inclusion(theta, size, kmax)
        err = torch.where(free, p - pi, 0.0).abs().amax(1)
        logit = p.clamp_min(tiny).log() - q.clamp_min(tiny).log()
        step = torch.where(free, target - logit, 0.0)
        weight = torch.where(free, p * (1 - p), 0.0)
        gap = (torch.where(free, p - pi, 0.0) * -step).sum(1)  # >= 0, 0 only at the solution
        return err, step, gap, weight

    theta = torch.where(free, target, _NEG)
    err, step, gap, weight = evaluate(theta)
    alpha = torch.ones_like(err)
    last_theta, last_step = theta, step
    anderson = torch.zeros_like(err, dtype=torch.bool)  # a previous accepted point to extrapolate from
    stuck = torch.zeros_like(err, dtype=torch.bool)
    slow = torch.zeros_like(err, dtype=torch.bool)  # the last trial did not halve the error
    for _ in range(_MAX_ITER):
        done = (err <= _TOL) | ((stuck | slow) & (err <= floor))
        if bool((done | stuck).all()):
            break
        # Anderson acceleration with memory 1 (a secant step on the last change, in the metric
        # P (1 - P)), which removes the period-two oscillation of the plain step where two items
        # compete for one place; otherwise the plain step of length alpha
        d_step, d_theta = step - last_step, theta - last_theta
        num = (weight * d_step * step).sum(1)
        den = (weight * d_step * d_step).sum(1)
        gamma = torch.where(anderson & (den > 0), num / torch.where(den > 0, den, 1.0), 0.0).unsqueeze(1)
        move = torch.where(anderson.unsqueeze(1), step - gamma * (d_theta + d_step), alpha.unsqueeze(1) * step)
        trial = torch.where(free, theta + move, _NEG)
        t_err, t_step, t_gap, t_weight = evaluate(trial)
        take = (t_gap < gap) & ~done & ~stuck
        slow = t_err > err / 2
        keep = take.unsqueeze(1)
        last_theta, last_step = torch.where(keep, theta, last_theta), torch.where(keep, step, last_step)
        theta, step = torch.where(keep, trial, theta), torch.where(keep, t_step, step)
        err, gap, weight = torch.where(take, t_err, err), torch.where(take, t_gap, gap), torch.where(keep, t_weight, weight)
        # a refused extrapolation restarts from the plain step, a refused plain step halves it
        alpha = torch.where(take, 1.0, torch.where(anderson, alpha, alpha / 2))
        anderson = take
        stuck = stuck | (alpha < 2.0**-30)
    return theta, err


def working_logits(pi: Tensor, free: Tensor, size: Tensor) -> Tensor:
    """Logits ``theta`` whose conditional Poisson design of size ``size`` has inclusion
    probabilities ``pi`` on the ``free`` items (``0 < pi < 1``, summing to ``size``); ``_NEG``
    (log 0) elsewhere.

    Rows with ``size = 1`` are solved in closed form (``P(i in S) = w_i / sum w``: ``theta = log
    pi``). The others minimise the convex function ``log e_size(exp(theta)) - sum_i pi_i theta_i``
    (its gradient is ``P(. in S; theta) - pi``, its minimiser the solution, unique up to a common
    shift) by ``theta <- theta + a (logit(pi) - logit(P(. in S; theta)))`` from ``theta =
    logit(pi)``: with ``a = 1`` the fixed point of Chen, Dempster and Liu (1994) in log-odds
    (exact for Poisson sampling, about five steps for n = 10**4, k = 10), and since each
    coordinate of the step has the sign of ``pi_i - P_i`` it is a descent direction of that
    function. A trial that lowers neither the function nor the error ``max_i |P(i in S) - pi_i|``
    is refused and ``a`` halved (doubled again, up to 1, after a success), so every row
    converges. A row is done at error <= 1e-12, or once a step stops halving the error at <=
    ``256 eps (n + k)`` clamped to [1e-11, 1e-9] (the float64 rounding of the sums over the items:
    about 1e-10 at n = 3000, k = 1500); a row that does neither raises ``RuntimeError``
    (never a silent cap). Each step evaluates ``P`` exactly by the dynamic programme (the fast
    linear-space tables, the log-space ones where those are not provably accurate), on blocks of
    rows of bounded memory.
    """
    rows, n = pi.shape
    theta = torch.full_like(pi, _NEG)
    one = (size == 1) & free.any(1)
    theta[one] = torch.where(free[one], pi[one], 0.0).log().clamp_min(_NEG)
    hard = ((size > 1) & free.any(1)).nonzero().squeeze(1)
    if not hard.numel():
        return theta
    block = max(1, _CHUNK // ((int(size[hard].max()) + 1) * (n + 1)))
    for part in hard.split(block):
        solved, err = _solve(pi[part], free[part], size[part])
        if not bool((err <= _FLOOR).all()):
            raise RuntimeError(
                f"conditional Poisson: the working probabilities did not converge (max |P(i in S) - pi_i| = "
                f"{float(err.max()):.3g} after {_MAX_ITER} steps; do the probabilities sum to an integer?)"
            )
        theta[part] = solved
    return theta


def sample(theta: Tensor, size: Tensor, u: Tensor) -> Tensor:
    """A conditional Poisson sample (rows, n) bool with weights ``exp(theta)`` and sizes ``size``.

    Draws the items from the last to the first: with ``r`` items left to draw among the first
    ``m``, the last of them is item ``j < m`` with probability ``w_j e_{r-1}(w_1..w_{j-1}) /
    e_r(w_1..w_m)``, whose cumulative sums over ``j`` are the table row ``F[r]``: one
    ``searchsorted`` per draw, with ``u`` (rows, >= max size) uniforms in [0, 1). Works on blocks
    of rows of bounded table memory.
    """
    rows, n = theta.shape
    taken = torch.zeros(rows, n, dtype=torch.bool, device=theta.device)
    if not rows:
        return taken
    block = max(1, _CHUNK // ((int(size.max()) + 1) * (n + 1)))
    for part in torch.arange(rows, device=theta.device).split(block):
        taken[part] = _sample_block(theta[part], size[part], u[part])
    return taken


def _sample_block(theta: Tensor, size: Tensor, u: Tensor) -> Tensor:
    rows, n = theta.shape
    kmax = int(size.max())
    F = _tables(theta, kmax)
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


def _bound(size: Tensor, n: int) -> int:
    """The number of table rows for per-slice sizes ``size``: their maximum where it can be read
    for free (an eager CPU tensor: the CPU path's data-dependent shortcut), else ``n``, the bound
    the shapes give (under ``torch.compile``, ``vmap``, on meta tensors, and on accelerators,
    where reading the maximum would stall the stream and forbid graph capture): no host
    synchronisation, at the cost of an ``O(n^2)`` programme."""
    from .._checks import _readable_cpu

    if _readable_cpu(size):
        return int(size.max()) if size.numel() else 0
    return n


def conditional_poisson_marginals(logits: Tensor, k, dim: int = -1) -> Tensor:
    """Inclusion probabilities of the size-``k`` conditional Poisson design with weights ``exp(logits)``.

    ``P(i in S)`` where ``P(S) ∝ prod_{i in S} exp(logits_i)`` over the subsets of exactly ``k``
    items along ``dim``: the exact marginals that SIMPLE (Ahmed et al. 2023) trains with, by a
    log-space dynamic programme in float64 (O(n k) time and memory per slice, differentiable by
    autograd). Each slice sums to ``k``; items with logit ``-inf`` get 0.

    Args:
        logits: floating point, finite or ``-inf`` (at least ``k`` finite per slice).
        k: an int or an integer tensor of per-slice sizes, ``0 <= k <= n``. A tensor ``k`` is
            never read on the host off the CPU (no synchronisation, compiles whole): there,
            and under ``torch.compile``/``vmap``/meta, the programme runs to ``n`` rather
            than to ``max(k)``, ``O(n^2)`` time and memory per slice; pass an int ``k`` for
            long rows.
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
    from .._checks import check_count, checked, check_tensor, normalize_dim

    check_tensor("logits", logits, floating=True)
    d = normalize_dim(dim, logits.dim())
    moved = logits.movedim(d, -1) if logits.dim() else logits.reshape(1)
    n = moved.shape[-1]
    size = check_count(k, n, moved.shape[:-1], logits.device)
    moved = checked(moved, moved, "logits", -math.inf, math.inf, what="be finite or -inf")
    theta = moved.reshape(math.prod(moved.shape[:-1]), n).double()  # -1 cannot be inferred when n = 0
    finite = theta > -math.inf
    sizes = size.reshape(-1) if isinstance(size, Tensor) else torch.full((theta.shape[0],), size, device=theta.device)
    theta = checked(theta, finite.sum(1) - sizes, "logits", 0, math.inf, what="have at least k finite entries per slice (finite count minus k)")
    kmax = size if isinstance(size, int) else _bound(size, n)
    log_in, _ = log_inclusion(torch.where(finite, theta, _NEG), sizes, kmax)
    out = log_in.exp().to(logits.dtype).reshape(moved.shape)
    return out.movedim(-1, d) if logits.dim() else out.reshape(())
