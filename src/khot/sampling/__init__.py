"""πps sampling: draw a k-hot vector with prescribed inclusion probabilities.

Given ``pi`` in [0, 1]^n with ``sum(pi) = k`` (for example the output of sigmoid top-k),
a πps design ("inclusion probability proportional to size") draws a subset S of the n
items, without replacement, such that ``P(i in S) = pi_i``. For an integer ``k`` every
sample holds exactly ``k`` items. :func:`pips_sample` offers three designs:

``"systematic"`` (the default; exact)
    Put the items in a uniformly random order, lay them end to end as intervals of
    length ``pi_i`` covering [0, k), draw one uniform ``u`` in [0, 1) and take the items
    whose interval holds one of the points ``u, u + 1, ..., u + k - 1``. The inclusion
    probabilities are exact for any order; the random order only matters for the joint
    ones: with it, ``P(i and j in S) > 0`` for every pair with ``pi_i, pi_j > 0``
    (with a fixed order, neighbours whose intervals share a unit are never drawn
    together). Cost: one sort of random int32 keys, then a few fully parallel O(n)
    passes; about as fast as one ``torch.sort`` of ``pi`` (``benchmarks/sampling.py``).
``"brewer"`` (exact)
    Brewer's method: ``k`` draws one at a time without replacement; at draw ``j`` an
    item not yet drawn is picked with probability proportional to
    ``pi_i (k - a - pi_i) / (k - a - pi_i (k - j + 1))``, where ``a`` is the sum of
    ``pi`` over the items drawn so far. Cost O(n k): vectorised over the batch,
    sequential in ``k``: on 2 CPU cores, a (64, 10**4) batch takes about 0.1 s for
    k = 1, 4 s for k = 100 and 25 s for k = 1000 (``benchmarks/sampling.py``).
``"pareto"`` (approximate)
    Rosén's Pareto sampling: keep the ``k`` items with the smallest
    ``(u_i / (1 - u_i)) / (pi_i / (1 - pi_i))``, ``u_i`` i.i.d. uniform. One pass and a
    top-k, but its inclusion probabilities only approximate ``pi``. The error
    ``max_i |P(i in S) - pi_i|``, measured with ``10**6`` draws for ``pi`` spread over
    [0.05, 0.95], is about 0.05 for n = 4, k = 2; 0.004 to 0.007 for n = 10, k = 3;
    0.001 to 0.002 for n = 30, k = 5; and below the sampling noise (0.002) for
    n = 100, k = 10. It grows as ``d = sum(pi (1 - pi))`` shrinks (a lone item with
    ``pi = 0.25`` plus the phantom is drawn with probability 0.18) and is zero when
    all ``pi`` are equal.

Conditional Poisson sampling (maximum entropy) is not provided: it is exact only after
solving for its working probabilities, and its samplers (rejection, or an O(n k) table
of conditional sizes) are no faster than Brewer's method here.

Gumbel top-k (perturb ``log pi`` with Gumbel noise, keep the top k) is **not** a πps
design: it samples k items sequentially proportionally to ``pi`` without replacement,
and its inclusion probabilities differ from ``pi`` (for ``pi = (0.9, 0.6, 0.3, 0.2)``,
k = 2, it draws the first item with probability 0.77, not 0.9).

Non-integer sums. A slice whose sum ``s`` is within ``1e-6 + s * eps`` of an integer
(``eps`` the machine epsilon of ``pi.dtype``, i.e. within the rounding error of storing
``pi`` in that dtype) has size ``round(s)``: the small excess or shortfall is taken from
or given to the fractional items, never to items with ``pi`` exactly 0 or 1. Otherwise a
phantom item with probability ``ceil(s) - s`` joins the slice and is dropped from the
result, so the sample has ``floor(s)`` or ``ceil(s)`` items, ``ceil(s)`` with
probability ``s - floor(s)``, and every real item keeps its inclusion probability.

Training through a sample: :func:`sample_khot`. It draws a k-hot ``D`` from
``pi = sigmoid_topk(x, k)`` and returns ``D`` with one of two gradient estimators, for an
upstream gradient ``g`` and ``J(q) = (diag(w) - w w^T / S) / tau``, ``w = q (1 - q)``,
``S = sum(w)``, the Jacobian of sigmoid top-k at a point ``q`` of the k-capped simplex:

``"straight_through"``
    ``J(pi)^T g``: the gradient of ``pi``. For a linear loss it is exactly the gradient of
    ``E[f(D)] = f(pi)`` (every exact design has ``E[D] = pi``); in general a first-order
    approximation of it (Wijk et al.).
``"reinmax"``
    ``2 J(pi1)^T g - J(pi)^T g / 2`` with ``pi1 = (pi + D) / 2``: ReinMax (Liu et al. 2023,
    a second-order, Heun-type estimator for one-hot samples) with softmax replaced by
    sigmoid top-k. The adaptation is natural because the midpoint ``pi1`` of two points of
    the k-capped simplex is on it, so it is the sigmoid top-k of ``logit(pi1)``, and
    ``J(q)`` has the form of the softmax Jacobian ``diag(p) - p p^T`` (``w = p``, ``S = 1``).
    Its diagonal part has the expectation of straight-through's: with ``E[D] = pi``,
    ``E[w(pi1)_i] = 3/4 w(pi)_i`` exactly. Unlike one-hot ReinMax, the rank-one part
    ``w w^T / S`` is not a polynomial in ``D``, so for a linear loss the estimator is close
    to, not exactly, unbiased. ``J(pi1)`` is applied in closed form (no second solve).

``method="gumbel"`` (Gumbel top-k of ``x / tau``) keeps the straight-through gradient of
``pi`` but samples from a different distribution (see above): it is offered for
comparison, not as a πps design.

Guarantees (all designs): exactly the stated number of ones per slice; items with
``pi = 0`` are never drawn, items with ``pi = 1`` always. The exact designs work with
``pi`` rounded down to multiples of ``2**-b``, where ``b = min(52, 62 - bit_length(n + 1))``
(``b = 45`` for n = 10**5), so they are exact up to that rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_choice, check_tensor, normalize_dim
from .exact import topk_mask
from .relaxed.sigmoid import sigmoid_topk

__all__ = ["DESIGNS", "GRADIENTS", "METHODS", "pips_sample", "sample_khot", "straight_through"]

DESIGNS = ("systematic", "brewer", "pareto")
GRADIENTS = ("straight_through", "reinmax")
METHODS = ("pips", "gumbel")


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward the value of ``hard``, backward the gradient of ``soft``.

    Computed as ``hard + (soft - soft.detach())``, so the forward value is ``hard``
    exactly (``soft - soft.detach()`` is exactly zero) and the gradient flows to ``soft``
    as if the output were ``soft``. Use it to train through a sample of
    :func:`pips_sample` with ``soft = pi``.

    >>> soft = torch.tensor([0.2, 0.8], requires_grad=True)
    >>> y = straight_through(torch.tensor([0.0, 1.0]), soft)
    >>> y
    tensor([0., 1.], grad_fn=<AddBackward0>)
    >>> (y * torch.tensor([3.0, 5.0])).sum().backward(); soft.grad
    tensor([3., 5.])
    """
    return hard + (soft - soft.detach())


def pips_sample(
    pi: Tensor, dim: int = -1, *, design: str = "systematic", generator: torch.Generator | None = None
) -> Tensor:
    """Draw a k-hot sample whose inclusion probabilities are ``pi``, along ``dim``.

    Args:
        pi: inclusion probabilities in [0, 1] (floating point; values outside [0, 1]
            or NaN are an error, with no tolerance: clamp them yourself if your ``pi``
            can overshoot). Each slice along ``dim`` sums to its sample size ``k``;
            see the module docstring for non-integer sums. Since ``pi <= 1``, every
            size is feasible.
        dim: the dimension holding the items; the other dimensions are a batch of
            independent slices.
        design: ``"systematic"`` (exact, fast), ``"brewer"`` (exact, O(n k)) or
            ``"pareto"`` (approximate); see the module docstring.
        generator: the only source of randomness (on ``pi``'s device); the same
            generator state gives the same sample. ``None`` uses the global RNG.

    Returns:
        A 0/1 tensor with the shape, dtype and device of ``pi``.

    >>> g = torch.Generator().manual_seed(0)
    >>> pi = torch.tensor([0.9, 0.6, 0.3, 0.2])
    >>> x = pips_sample(pi, generator=g)
    >>> x.sum()
    tensor(2.)
    >>> freq = pips_sample(pi.expand(100_000, 4), generator=g).mean(0)
    >>> torch.allclose(freq, pi, atol=0.01)
    True
    >>> pips_sample(torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), generator=g)
    tensor([[1., 0., 1.],
            [0., 0., 1.]])
    """
    check_tensor("pi", pi, floating=True)
    return _draw(pi, normalize_dim(dim, pi.ndim), design, generator, torch.finfo(pi.dtype).eps)


def _check_generator(generator, t: Tensor, name: str) -> None:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device != t.device:
            raise ValueError(f"generator is on {generator.device} but {name} is on {t.device}")


def _draw(pi: Tensor, dim: int, design: str, generator: torch.Generator | None, eps: float) -> Tensor:
    """:func:`pips_sample` after the checks of ``pi`` and ``dim``; slice sums within
    ``1e-6 + s * eps`` of an integer count as that integer."""
    check_choice("design", design, DESIGNS)
    _check_generator(generator, pi, "pi")
    if pi.numel() == 0:
        return torch.zeros_like(pi)
    lo, hi = (v.item() for v in torch.aminmax(pi))
    if not 0 <= lo <= hi <= 1:  # also catches NaN
        raise ValueError(f"pi must lie in [0, 1], got values from {lo} to {hi}")

    moved = pi.movedim(dim, -1) if pi.ndim else pi.reshape(1)
    rows = moved.reshape(-1, moved.shape[-1])
    work = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    sampler = {"systematic": _systematic, "brewer": _brewer, "pareto": _pareto}[design]
    out = sampler(work, eps, generator).to(pi.dtype).reshape(moved.shape)
    return out.movedim(-1, dim) if pi.ndim else out.reshape(())


def sample_khot(
    x: Tensor,
    k: float | Tensor,
    dim: int = -1,
    *,
    temperature: float | Tensor = 1.0,
    design: str = "systematic",
    gradient: str = "straight_through",
    method: str = "pips",
    generator: torch.Generator | None = None,
) -> Tensor:
    """A random k-hot vector along ``dim`` whose gradient flows through ``π = sigmoid_topk(x, k)``.

    ``method="pips"`` (default) draws a πps sample of ``π = sigmoid_topk(x, k, dim,
    temperature=temperature)`` with :func:`pips_sample`, so ``P(i drawn) = π_i``;
    ``method="gumbel"`` takes the exact top-k (:func:`khot.topk_mask`) of ``x / temperature``
    plus i.i.d. Gumbel noise: it samples ``k`` items one at a time proportionally to
    ``softmax(x / temperature)`` without replacement, which does **not** give the inclusion
    probabilities ``π`` (it favours likely items: see the module docstring).

    The forward value is the hard sample. Backward (see the module docstring):
    ``gradient="straight_through"`` is the gradient of ``π``; ``gradient="reinmax"`` is the
    k-hot ReinMax estimator (``method="pips"`` only).

    Args:
        x: floating-point scores.
        k: the sample size, ``0 <= k <= n``: a number or a per-slice tensor, as for
            :func:`khot.sigmoid_topk`. An integer ``k`` gives exactly ``k`` ones per slice;
            a real ``k`` gives ``floor(k)`` or ``ceil(k)`` (``"pips"`` only: ``"gumbel"``
            needs an int or an integer tensor).
        dim: the dimension holding the items.
        temperature: ``τ > 0`` of the sigmoid top-k (and of the Gumbel scores).
        design: the πps design of :func:`pips_sample` (``"pips"`` only).
        gradient: ``"straight_through"`` or ``"reinmax"``.
        method: ``"pips"`` or ``"gumbel"``.
        generator: the only source of randomness; ``None`` uses the global RNG.

    Returns:
        A 0/1 tensor with the shape, dtype and device of ``x``, differentiable with
        respect to ``x``, a tensor ``k`` and a tensor ``temperature``.

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.tensor([2.0, -1.0, 0.5, 0.0, 1.0], requires_grad=True)
    >>> s = sample_khot(x, 2, generator=g)
    >>> s.sum().item(), s.detach().tolist()
    (2.0, [1.0, 0.0, 0.0, 0.0, 1.0])
    >>> (s * torch.arange(5.0)).sum().backward()
    >>> torch.allclose(x.grad.sum(), torch.tensor(0.0), atol=1e-6)  # π sums to k: gradients sum to 0
    True
    """
    check_choice("method", method, METHODS)
    check_choice("gradient", gradient, GRADIENTS)
    check_choice("design", design, DESIGNS)
    if method == "gumbel" and gradient == "reinmax":
        raise ValueError("gradient='reinmax' needs method='pips': its derivation assumes E[sample] = pi")
    pi = sigmoid_topk(x, k, dim, temperature=temperature)
    d = normalize_dim(dim, x.dim())
    if method == "gumbel":
        if isinstance(temperature, Tensor):  # per slice: put it back in place along dim
            temperature = torch.broadcast_to(temperature.detach(), pi.movedim(d, -1).shape[:-1]).unsqueeze(d)
        _check_generator(generator, x, "x")
        noise = torch.empty_like(x).exponential_(generator=generator).log_().neg_()  # Gumbel(0, 1)
        return straight_through(topk_mask(x.detach() / temperature + noise, k, d).to(x.dtype), pi)
    # sigmoid_topk meets Σπ = k within 1e-5 * max(1, k) (1e-12 in float64): count that as k
    eps = max(torch.finfo(pi.dtype).eps, 2e-12 if pi.dtype == torch.float64 else 2e-5)
    hard = _draw(pi.detach(), d, design, generator, eps)
    if gradient == "straight_through":
        return straight_through(hard, pi)
    return straight_through(hard, 2 * _tangent((pi.detach() + hard) / 2, x, k, d, temperature) - pi / 2)


def _tangent(q: Tensor, x: Tensor, k: float | Tensor, dim: int, temperature: float | Tensor) -> Tensor:
    """A function of ``(x, k, temperature)`` whose derivatives are those of sigmoid top-k at the
    point ``q`` (``q`` on the k-capped simplex, detached).

    Sigmoid top-k is ``σ(z + c)`` with ``z = x / τ`` and ``c`` fixed by ``Σ σ(z + c) = k``; at a
    point with ``w = q (1 - q)`` and ``S = Σ w`` its derivative is ``w (dz + dc)`` with
    ``dc = (dk - Σ w dz) / S``. That is the derivative of the linear map returned here,
    ``w (z + (k - Σ w z) / S)``; its value is meaningless (callers only differentiate it).
    """
    k, tau = (v.unsqueeze(-1) if isinstance(v, Tensor) else v for v in (k, temperature))  # per slice
    q = q.movedim(dim, -1)
    w = q * (1 - q)
    s = w.sum(-1, keepdim=True)
    z = torch.where(w > 0, x.movedim(dim, -1), 0) / tau  # w = 0 where x = ±inf: mask before dividing
    c = (k - (w * z).sum(-1, keepdim=True)) / torch.where(s > 0, s, 1)
    return (w * (z + c)).movedim(-1, dim)


def _size(s: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Sample size per slice (float64, integral) and whether the sum ``s`` counts as integer."""
    k = s.round()
    near = (s - k).abs() <= 1e-6 + s * eps
    return torch.where(near, k, s.ceil()), near


def _layout(work: Tensor, eps: float, keys: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Integer interval ends of the items of each row, in the order of ``keys``.

    Items with ``pi = 1`` go first and ``pi = 0`` last (their keys are overwritten), the
    others in the order of ``keys``. ``pi`` is rounded down to multiples of ``1 / M``,
    ``M = 2**b``. Returns ``(ends, perm, c, b)``: ``ends`` (rows, n + 1) int64 with
    ``ends[:, 0]`` the phantom's length and ``ends[:, i + 1]`` the end of the item at
    ``perm[:, i]``; every length lies in [0, M], is M for ``pi = 1`` and 0 for
    ``pi = 0``, and ``ends[:, -1] = c * M`` exactly, ``c`` (rows, 1) the sample size
    (phantom included).
    """
    rows, n = work.shape
    b = min(52, 62 - (n + 1).bit_length())
    M = 1 << b
    bounds = torch.iinfo(keys.dtype)
    keys.masked_fill_(work == 1, bounds.min).masked_fill_(work == 0, bounds.max)
    perm = keys.sort(dim=1).indices
    q = work.gather(1, perm).mul_(M)
    ends = torch.empty(rows, n + 1, dtype=torch.int64, device=work.device)
    ends[:, 0] = 0
    ends[:, 1:] = q  # truncates: pi rounded down to a multiple of 1 / M
    ends.cumsum_(1)
    total = ends[:, -1:].clone()
    c, near = _size(total.double() / M, eps)
    c = c.long()
    target = torch.where(near, c * M, total)  # what the real items must cover
    # Shortfall: fill the slack of the first fractional items (cap at M per item, the
    # items with pi = 0 come last and get nothing). Excess: truncate the last ones
    # (items with pi = 1 come first and keep their length M).
    ends.add_((target - total).clamp_min_(0))
    torch.minimum(ends, torch.arange(n + 1, device=work.device).mul_(M), out=ends)
    torch.minimum(ends, target, out=ends)
    ends.add_(c * M - target)  # the phantom occupies [0, c * M - target)
    return ends, perm, c, b


def _unsort(x: Tensor, perm: Tensor) -> Tensor:
    return torch.zeros_like(x).scatter_(1, perm, x)


def _systematic(work: Tensor, eps: float, generator) -> Tensor:
    # int32 keys sort faster than floats; the extreme values are left for pi = 0 and 1
    keys = torch.randint(-(2**31) + 1, 2**31 - 1, work.shape, generator=generator, device=work.device, dtype=torch.int32)
    ends, perm, _, b = _layout(work, eps, keys)
    M = 1 << b
    u = torch.randint(M, (ends.shape[0], 1), generator=generator, device=work.device)
    hits = ends.add_(M - 1 - u).bitwise_right_shift_(b)  # number of points u + j M below each end
    return _unsort(hits[:, 1:] > hits[:, :-1], perm)


def _brewer(work: Tensor, eps: float, generator) -> Tensor:
    ends, perm, c, b = _layout(work, eps, torch.zeros_like(work, dtype=torch.int32))
    M = 1 << b
    size = torch.diff(ends, dim=1, prepend=torch.zeros_like(ends[:, :1]))  # phantom at 0
    taken = size == M
    free = (size > 0) & ~taken
    draws = c - taken.sum(1, keepdim=True)
    left = (size * free).sum(1, keepdim=True)  # = draws * M
    weight0 = size.double()
    for j in range(int(draws.max())):
        active = draws > j
        m = (draws - j).clamp_min_(1)
        w = weight0 * (left - size) / (left - size * m)
        w = torch.where(free & ~taken & active, w, 0.0)
        w[:, :1] += ~active  # finished rows draw a dummy (their weights may be 0/0)
        pick = torch.multinomial(w, 1, generator=generator)
        taken.scatter_(1, pick, active | taken.gather(1, pick))
        left -= size.gather(1, pick) * active
    return _unsort(taken[:, 1:], perm)


def _pareto(work: Tensor, eps: float, generator) -> Tensor:
    n = work.shape[1]
    s = work.sum(1, keepdim=True, dtype=torch.float64)
    c, near = _size(s, eps)
    p = torch.cat([work, torch.where(near, 0.0, c - s).to(work.dtype)], dim=1)  # phantom last
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    keys = (u * (1 - p)).div_((1 - u).mul_(p))
    keys.masked_fill_(p == 1, -1.0).masked_fill_(p == 0, float("inf"))
    k = int(c.max())
    idx = keys.topk(k, dim=1, largest=False).indices
    keep = torch.arange(k, device=p.device) < c
    return torch.zeros_like(keys, dtype=torch.bool).scatter_(1, idx, keep)[:, :n]
