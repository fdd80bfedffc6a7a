"""πps sampling: draw a k-hot vector with prescribed inclusion probabilities.

Given ``pi`` in [0, 1]^n with ``sum(pi) = k`` (for example the output of sigmoid top-k),
a πps design ("inclusion probability proportional to size") draws a subset S of the n
items, without replacement, such that ``P(i in S) = pi_i``. For an integer ``k`` every
sample holds exactly ``k`` items. :func:`pips_sample` offers four designs:

``"systematic"`` (the default; exact)
    Put the items in a uniformly random order, lay them end to end as intervals of
    length ``pi_i`` covering [0, k), draw one uniform ``u`` in [0, 1) and take the items
    whose interval holds one of the points ``u, u + 1, ..., u + k - 1``. The inclusion
    probabilities are exact for any order; the random order only matters for the joint
    ones: with it, ``P(i and j in S) > 0`` for every pair with ``pi_i, pi_j > 0``
    (with a fixed order, neighbours whose intervals share a unit are never drawn
    together). Cost: one sort of random keys, then a few fully parallel O(n) passes, no
    host synchronisation; about as fast as one ``torch.sort`` of ``pi``
    (``benchmarks/sampling.py``). **Prefer it** whenever only the inclusion probabilities
    matter (straight-through training, Monte-Carlo estimates of sums): its cost does not
    grow with k (for a few draws per row Brewer's method is faster: see below).
``"brewer"`` (exact)
    Brewer's method: ``k`` draws one at a time without replacement; at draw ``j`` an
    item not yet drawn is picked with probability proportional to
    ``pi_i (k - a - pi_i) / (k - a - pi_i (k - j + 1))``, where ``a`` is the sum of
    ``pi`` over the items drawn so far. Every draw is one pass of O(n) vector work over
    the batch (the weights on integer lengths held exactly in float64, a cumulative sum
    and a ``searchsorted`` of a pre-drawn uniform): O(n k) in all, sequential in ``k``.
    Against a straightforward vectorised Brewer (one ``torch.multinomial`` per draw,
    ``benchmarks/sampling.py --brewer``, which prints the ratio) at (64, 10**4) float32, one
    thread: about 0.9x its time at k = 1, 0.5x at k = 2, 0.2x at k = 10 and 0.1x at
    k = 100. **When to prefer another design:** Brewer's cost grows linearly with ``k``,
    systematic's does not (one sort of random keys): at (64, 10**4) Brewer takes about a
    quarter of systematic's time at k = 1, half at k = 10, and 3x it at k = 100, so prefer
    ``"systematic"`` from a few tens of draws per row on, or whenever the joint inclusion
    probabilities do not matter and ``k`` is large; prefer ``"conditional_poisson"`` when the
    joint inclusion probabilities should be those of the maximum-entropy design (the closest
    to independent draws) and ``n k`` is moderate (it costs several Brewers). Brewer is the
    fastest exact design for small ``k``, a classical draw-by-draw design with all joint
    inclusion probabilities positive.
``"pareto"`` (approximate)
    Rosén's Pareto sampling: keep the ``k`` items with the smallest
    ``(u_i / (1 - u_i)) / (pi_i / (1 - pi_i))``, ``u_i`` i.i.d. uniform. One pass and a
    sort, but its inclusion probabilities only approximate ``pi``. The error
    ``max_i |P(i in S) - pi_i|``, measured with ``10**6`` draws for ``pi`` spread over
    [0.05, 0.95], is about 0.05 for n = 4, k = 2; 0.004 to 0.007 for n = 10, k = 3;
    0.001 to 0.002 for n = 30, k = 5; and below the sampling noise (0.002) for
    n = 100, k = 10. It grows as ``d = sum(pi (1 - pi))`` shrinks (a lone item with
    ``pi = 0.25`` plus the phantom is drawn with probability 0.18) and is zero when
    all ``pi`` are equal.

``"conditional_poisson"`` (exact)
    The maximum-entropy design of fixed size: ``P(S) ∝ prod_{i in S} w_i`` over the
    subsets of size k, with working weights ``w`` solved in float64 so that the inclusion
    probabilities are ``pi`` (to 1e-12, at worst 1e-9 on long rows with large ``k``, where
    float64 rounding of the sums sets the limit; never a silent stop: an error otherwise);
    exact sampling from the dynamic programme's tables, drawing the items from the last to
    the first (:mod:`khot.sampling.conditional_poisson`). Of all fixed-size designs with these
    ``pi`` it has the largest entropy: the best second-order properties (joint inclusion
    probabilities close to those of independent draws, all positive). Cost O(n k) time per
    solver step (about five steps; rows drawing more than half their items are solved as
    their complement, so ``k`` here is ``min(k, n - k)``), in row blocks of bounded memory:
    at (64, 10**4), one thread, about 0.9 s at k = 10 and 7 s at k = 100, about 25x
    Brewer's; prefer it when the joint distribution matters and ``n k`` is moderate.
    :func:`conditional_poisson_marginals` gives the design's inclusion probabilities for
    given logits (the marginals SIMPLE trains with), differentiably.

Gumbel top-k (perturb ``log pi`` with Gumbel noise, keep the top k) is **not** a πps
design: it samples k items sequentially proportionally to ``pi`` without replacement,
and its inclusion probabilities differ from ``pi`` (for ``pi = (0.9, 0.6, 0.3, 0.2)``,
k = 2, it draws the first item with probability 0.77, not 0.9).

Sample sizes. :func:`sample_khot` takes the size from ``k`` itself, in float64: exactly
``k`` items for an integer ``k``, whatever the last digits of ``sum(pi)``; for a real
``k``, ``ceil(k)`` items with probability ``frac(k)`` (to 2**-b, see below), else
``floor(k)``. :func:`pips_sample` takes it from ``s = sum(pi)`` (summed in float64). A
slice whose sum ``s`` is within ``1e-6 + s * eps`` of an integer
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
(``b = 45`` for n = 10**5; Brewer's and conditional Poisson's ``52 - bit_length(n + 1)``,
38 for n = 10**4), so they are exact up to that rounding.

Randomness and graphs. Every design is a custom op (:mod:`khot.sampling.designs`) whose
randomness, ``(rows, n + 1)`` float64 uniforms, is drawn before it: from ``generator``, or
from the global RNG inside an opaque op, so under ``torch.compile(fullgraph=True)`` the
samplers make no graph break and draw exactly what eager calls draw after the same
``torch.manual_seed``. A ``torch.Generator`` cannot enter a compiled graph (a PyTorch
limitation): pass ``generator=None`` there (a ``TypeError`` says so). ``torch.vmap``
joins the vmapped dimension to the rows (``randomness="different"`` or ``"same"``;
``"error"`` raises, naming the random op). On ``device="meta"`` the output is made without
data. Systematic and Pareto sampling run with no host synchronisation; Brewer's and
conditional Poisson's loops read their number of draws (one synchronisation off the CPU).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_choice, check_range, check_tensor, checked, checked_no_nan, normalize_dim
from ..exact import topk_mask
from ..relaxed.sigmoid import sigmoid_topk
from .conditional_poisson import conditional_poisson_marginals
from .designs import OPS, uniforms

__all__ = [
    "DESIGNS",
    "GRADIENTS",
    "METHODS",
    "pips_sample",
    "sample_khot",
    "straight_through",
    "conditional_poisson_marginals",
]

DESIGNS = tuple(OPS)
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
        design: ``"systematic"`` (exact, fast), ``"brewer"`` (exact, O(n k)),
            ``"conditional_poisson"`` (exact, maximum entropy, O(n k) per solver step) or
            ``"pareto"`` (approximate); see the module docstring for when to prefer which.
        generator: the only source of randomness (on ``pi``'s device); the same
            generator state gives the same sample. ``None`` uses the global RNG (and
            is required under ``torch.compile``).

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
    d = normalize_dim(dim, pi.ndim)
    return _draw(check_range(pi.detach(), "pi", 0, 1), d, design, generator)


def _check_generator(generator, t: Tensor, name: str) -> None:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device != t.device:
            raise ValueError(f"generator is on {generator.device} but {name} is on {t.device}")


def _draw(pi: Tensor, dim: int, design: str, generator: torch.Generator | None, total: Tensor | None = None) -> Tensor:
    """:func:`pips_sample` after the checks of ``pi`` and ``dim``. ``total``: the sample size per
    slice (float64, the batch shape: ``pi``'s shape without ``dim``); ``None`` takes it from
    the sums of ``pi``, computed in float64, with the near-integer rule of the module docstring."""
    check_choice("design", design, DESIGNS)
    _check_generator(generator, pi, "pi")
    if pi.numel() == 0:
        return torch.zeros_like(pi)
    moved = pi.movedim(dim, -1) if pi.ndim else pi.reshape(1)
    rows = moved.reshape(-1, moved.shape[-1])
    work = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    if total is None:
        s = work.sum(1, dtype=torch.float64)
        near = (s - s.round()).abs() <= 1e-6 + s * torch.finfo(pi.dtype).eps
        total = torch.where(near, s.round(), s)
    u = uniforms(work, *work.shape[:1], work.shape[1] + 1, generator)
    out = OPS[design](work, total.reshape(-1), u).to(pi.dtype).reshape(moved.shape)
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
        x: floating-point scores; ``±inf`` entries are items never / always drawn, NaN
            is an error (``ValueError`` about ``x``, both methods), and so is a ``k`` below the
            number of ``+inf`` entries or above the number of entries above ``-inf`` (``ValueError``
            about ``k``).
        k: the sample size, ``0 <= k <= n``: a number or a per-slice tensor, as for
            :func:`khot.sigmoid_topk`. An integer ``k`` gives exactly ``k`` ones per slice;
            a real ``k`` gives ``ceil(k)`` ones with probability ``frac(k)`` (computed in
            float64 from ``k``, not from ``sum(π)``), else ``floor(k)`` (``"pips"`` only:
            ``"gumbel"`` needs an int or an integer tensor).
        dim: the dimension holding the items.
        temperature: ``τ > 0`` of the sigmoid top-k (and of the Gumbel scores).
        design: the πps design of :func:`pips_sample` (``"pips"`` only).
        gradient: ``"straight_through"`` or ``"reinmax"``.
        method: ``"pips"`` or ``"gumbel"``.
        generator: the only source of randomness; ``None`` uses the global RNG (and is
            required under ``torch.compile``: see the module docstring).

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
    _check_generator(generator, x, "x")
    # π is NaN exactly on the slices of x holding NaN: say so about x (±inf entries are fine)
    pi = checked_no_nan(pi, x, "x")
    batch = pi.movedim(d, -1).shape[:-1]
    # +inf items are always drawn and -inf items never: k must allow both (else "exactly k" breaks)
    scores = x.detach().movedim(d, -1) if x.dim() else x.detach().reshape(1)
    size = torch.broadcast_to(torch.as_tensor(k, dtype=torch.float64, device=x.device).detach(), batch)
    pi = checked(pi, size - (scores == math.inf).sum(-1), "k", 0, math.inf, what="be at least the number of +inf scores of x (always drawn); k minus that count")
    pi = checked(pi, (scores > -math.inf).sum(-1) - size, "k", 0, math.inf, what="be at most the number of scores of x above -inf (the items that can be drawn); that count minus k")
    if method == "gumbel":
        if isinstance(temperature, Tensor):  # per slice: put it back in place along dim
            temperature = torch.broadcast_to(temperature.detach(), batch).unsqueeze(d)
        u = uniforms(x, batch.numel(), x.shape[d] if x.dim() else 1, generator)
        noise = -torch.log1p(-u).neg_().log_()  # Gumbel(0, 1): -log of an Exp(1) draw
        noise = noise.to(x.dtype).reshape(*batch, -1).movedim(-1, d).reshape(x.shape)
        return straight_through(topk_mask(x.detach() / temperature + noise, k, d).to(x.dtype), pi)
    # the sample size comes from k itself, in float64: never from the solver's last digits
    if isinstance(k, Tensor):
        total = torch.broadcast_to(k.detach().to(torch.float64), batch)
    else:
        total = torch.full(batch, float(k), dtype=torch.float64, device=x.device)
    hard = _draw(pi.detach(), d, design, generator, total)
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

