"""Sigmoid top-k: a relaxed k-hot vector, ``sigmoid(x / τ + c)`` with ``c`` such that it sums to k.

``p = sigmoid(x / τ + c)``, with one scalar ``c`` per slice solving ``Σ p = k``, lies in
``[0, 1]`` and sums to ``k``: it is the entropy-regularised relaxation of the top-k mask
(Wijk, Vinuesa & Azizpour, "Differentiable top-k: from one-hot to k-hot"). It is
differentiable with respect to ``x``, ``k`` and a tensor temperature, and tends to the exact
k-hot mask as ``τ → 0``.

Forward: ``f(c) = Σ sigmoid(x / τ + c)`` is strictly increasing, so the root is unique. It is
found by Halley's method on ``log f(c) = log k`` (or ``log(n - f(c)) = log(n - k)`` when
``k > n / 2``), where the sums behave like exponentials and Halley is nearly exact. Every step
is safeguarded by a bracket kept per slice: what the evaluations so far tell (below or above the
root), narrowed by ``logit(k/n) - max(x/τ) <= c <= logit(k/n) - min(x/τ)`` the first time a step
needs it (two more reads, skipped on typical inputs); a step that leaves the bracket is replaced
by a bisection step (taken in ``asinh`` space, so that very wide brackets shrink quickly). The
start comes from a strided sub-sample of about 4096 elements: the probit approximation
(the mean of ``sigmoid(z + c)`` over normal ``z`` with mean ``μ`` and deviation ``s`` is about
``sigmoid((μ + c) / sqrt(1 + π s² / 8))``, ``s`` taken from the mean absolute deviation, which
heavy tails do not blow up), then, for longer slices, the sub-sample's own root solved to the
~1e-3 it can represent; so a typical problem takes one Halley step plus the evaluation that
confirms convergence. An evaluation is one (multiply-)add and an in-place
``sigmoid`` into the one full-size buffer (which becomes the output), then its sum; a step adds
``Σ p²`` (a norm) and ``Σ p³`` (cubed in place: the next evaluation rewrites the buffer). So a
typical solve reads the input about eight times in all, allocates one full-size tensor, never
sorts and never copies the input to float64 (half and bfloat16 inputs are evaluated in float32;
float64 inputs in float64). The iteration count is capped (``_MAX_ITER`` per stage) and the loop stops as soon as every
slice satisfies ``|Σ p - k| <= tol * max(1, k)`` (``tol`` = 1e-5 in float32, 1e-12 in float64)
or its bracket cannot shrink further in the working precision. Typical inputs take 2
evaluations; a "staircase" (scores spread over many multiples of ``τ``, e.g. ``|x / τ|`` up to
1e5 with n = 1000) up to about 30. In float32, ``p`` cannot be resolved finer than about
``ulp(max |x / τ|)``. Under ``torch.compile`` and ``vmap`` the solver is the custom op
``khot::sigmoid_topk_solve`` (with a fake and a vmap rule), so the compiler sees one opaque
call instead of an unrolled loop; plain eager calls run it directly. At small ``n`` the cost
is the solver's ~50 small tensor ops per iteration (~1-2 ms a call on a 2-core CPU), not the data.

Backward is closed-form (implicit function theorem, no solver): with ``w = p (1 - p)``,
``S = Σ w`` and ``m = Σ w g / S`` for an incoming gradient ``g``::

    grad_x = w (g - m) / τ,   grad_k = m,   grad_τ = -Σ w g (x - x̄) / τ²,  x̄ = Σ w x / S.

Slices with ``S = 0`` (fully saturated) get zero gradients. The backward allocates one
full-size tensor and rewrites it in place (``w / τ``, then ``w g / τ``, then the gradient),
except when it is itself differentiated (``create_graph``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from khot._checks import _inspectable, check_positive, check_real_count, check_tensor, normalize_dim

__all__ = ["sigmoid_topk"]

_MAX_ITER = 40  # cap on solver evaluations per stage; typical inputs need 2-3
_SAMPLE = 4096  # target size of the strided sub-sample that gives the starting point
_BOUND = 1e30  # |c| is kept below this, so brackets stay finite when x holds ±inf


def _evaluate(x: Tensor, c: Tensor, r: float | Tensor, out: Tensor | None = None) -> Tensor:
    """``sigmoid(x * r + c)`` in ``c``'s dtype: one (multiply-)add and one in-place sigmoid."""
    c = c.unsqueeze(-1)
    out = torch.add(c, x, alpha=r, out=out) if isinstance(r, float) else torch.addcmul(c, x, r, out=out)
    return out.sigmoid_()


def _bracket(x: Tensor, k: Tensor, r: float | Tensor) -> tuple[Tensor, Tensor]:
    """Per-slice bounds ``logit(k/n) - max(x r) <= c <= logit(k/n) - min(x r)`` on the root."""
    rr = torch.as_tensor(r, dtype=k.dtype, device=k.device)
    rr = rr.squeeze(-1) if rr.dim() else rr
    xmax, xmin = x.amax(-1).to(k.dtype), x.amin(-1).to(k.dtype)
    logit = torch.logit(k / x.shape[-1])
    lo = logit - torch.where(rr > 0, rr * xmax, rr * xmin)
    hi = logit - torch.where(rr > 0, rr * xmin, rr * xmax)
    return lo.clamp(-_BOUND, _BOUND), hi.clamp(-_BOUND, _BOUND)


def _halley(
    x: Tensor, k: Tensor, r: float | Tensor, c: Tensor, dtype: torch.dtype, tol: Tensor
) -> tuple[Tensor, Tensor, int]:
    """Safeguarded Halley iteration for ``Σ sigmoid(x * r + c) = k`` along the last dim, from ``c``.

    ``k`` (``0 < k <= n / 2``), ``c`` and the tolerance ``tol`` on ``|Σ p - k|`` are per-slice
    float64 (or ``dtype`` on devices without float64); ``r`` is a nonzero slope, a number or a
    per-slice ``(..., 1)`` tensor in ``dtype``.
    Halley's step on ``log f(c) - log k`` (Newton's where Halley's correction is large) is taken
    when it stays inside the bracket known so far and is at most half the previous step;
    otherwise the bracket is bisected in ``asinh`` space. The bracket starts as what the
    evaluations so far tell (below or above the root); the bounds from ``min`` and ``max`` of
    the input (two more reads) are computed only for the first step that needs them. NaN slices
    stop at once. Returns ``(p, c, evaluations)``.
    """
    eps = 2 * torch.finfo(dtype).eps  # a bracket this narrow (relative) cannot shrink further
    log_k = k.log()
    lo, hi = torch.full_like(c, -_BOUND), torch.full_like(c, _BOUND)
    bounded = False  # whether lo and hi include the bounds from min and max
    limit = torch.full_like(c, math.inf)  # half the last step taken: Halley may not step further
    s = None  # the one full-size buffer, reused from one evaluation to the next
    for it in range(1, _MAX_ITER + 1):
        point = c.to(dtype)
        c = point.to(k.dtype)  # the point actually evaluated
        s = _evaluate(x, point, r, s)
        f = s.sum(-1).to(k.dtype)
        below = f < k
        lo = torch.where(below, c, lo)
        hi = torch.where(below, hi, c)
        # NaN slices count as done (their error compares false) and come out NaN
        done = ~((f - k).abs() > tol) | (hi - lo <= eps * torch.maximum(hi, -lo))  # max(|lo|, |hi|), lo <= hi
        if bool(done.all()):
            nan = f.isnan()
            return (s.masked_fill_(nan.unsqueeze(-1), math.nan) if bool(nan.any()) else s), c, it
        s2 = torch.linalg.vector_norm(s, dim=-1).to(k.dtype).square()
        s3 = s.pow_(3).sum(-1).to(k.dtype)  # in place: the next evaluation rewrites s
        phi = f.log() - log_k
        d1 = (f - s2) / f  # d/dc log f
        d1_sq = d1.square()
        d2 = torch.add(f, s2, alpha=-3).add_(s3, alpha=2).div_(f).sub_(d1_sq)  # d2/dc2 log f
        newton = -phi / d1
        bend = phi * d2 / d1_sq  # Halley's step is Newton's divided by 1 - bend / 2
        step = torch.where(bend.abs() <= 1, newton / (1 - bend / 2), newton)
        new = c + step
        good = (new == new.clamp(lo, hi)) & (step.abs() <= limit)
        settled = bool((good | done).all())
        if not bounded and not settled:
            lo0, hi0 = _bracket(x, k, r)
            lo, hi, bounded = torch.maximum(lo, lo0), torch.minimum(hi, hi0), True
            good = good & (new == new.clamp(lo, hi))
            settled = bool((good | done).all())
        if not settled:  # bisect where Halley's step is refused
            mid = torch.sinh((torch.asinh(lo) + torch.asinh(hi)) / 2)
            step = torch.where(good, step, mid - c)
        step = torch.where(done, 0, step)
        limit = torch.where(done, limit, step.abs() / 2)
        c = c + step
    return _evaluate(x, c.to(dtype), r, s), c, _MAX_ITER + 1


def _solve(x: Tensor, k: Tensor, r: float | Tensor, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Return ``(sigmoid(x * r + c), evaluations)`` with ``c`` solving the sum constraint.

    ``x`` is ``(..., n)`` with ``n >= 1``; ``k`` holds per-slice targets with ``0 < k <= n / 2``
    (float64, or float32 where float64 is unsupported); ``r`` is a nonzero slope (``±1 / τ``),
    a number or a per-slice ``(..., 1)`` tensor in the compute dtype ``dtype``.
    """
    n = x.shape[-1]
    stride = max(1, n // _SAMPLE)
    xs = x[..., ::stride]
    m = xs.shape[-1]
    sample = xs.to(dtype)
    mean = sample.mean(-1, keepdim=True)
    dev = ((sample - mean).abs().mean(-1) * math.sqrt(math.pi / 2)).to(k.dtype)  # the std, for normal data
    mean = mean.squeeze(-1).to(k.dtype)
    slope = r if isinstance(r, float) else r.squeeze(-1).to(k.dtype)
    spread = (1 + math.pi / 8 * (dev * slope) ** 2).sqrt()  # the probit approximation
    start = torch.logit(k / n) * spread - mean * slope
    start = start.nan_to_num(0.0).clamp(-_BOUND, _BOUND)  # ±inf in the sub-sample
    if stride > 1:  # solved only as finely as the sub-sample represents the whole (~1%)
        start = _halley(xs, k * (m / n), r, start, dtype, 1e-3 * k * (m / n))[1]
    tol = (1e-5 if dtype != torch.float64 else 1e-12) * k.clamp(min=1)
    p, _, evaluations = _halley(x, k, r, start, dtype, tol)
    return p, evaluations


def _solve_slices(x: Tensor, k: Tensor, r: Tensor) -> Tensor:
    """``sigmoid(x * r + c)`` summing to ``k`` over the last dim, in ``x``'s dtype.

    ``k`` (per slice, float64 or float32 on MPS) may be 0 or n (exact limits); ``r`` is the
    per-slice ``(..., 1)`` tensor ``1 / τ`` in the compute dtype. ``k > n / 2`` is solved as
    ``n - k`` for ``-x``, so that the sums stay accurate in float32.
    """
    n = x.shape[-1]
    if x.numel() == 0:
        return torch.empty_like(x)
    edge = (k <= 0) | (k >= n)
    flip = k > n / 2
    slope = torch.where(flip.unsqueeze(-1), -r, r)
    first = slope.reshape(-1)[0]
    uniform = bool((slope == first).all())  # then one scalar slope: a cheaper pass per evaluation
    p, _ = _solve(x, torch.where(edge, n / 2, torch.minimum(k, n - k)), float(first) if uniform else slope, r.dtype)
    if bool(flip.any()):
        p = torch.where(flip.unsqueeze(-1), 1 - p, p) if not bool(flip.all()) else torch.rsub(p, 1)
    if bool(edge.any()):
        p = torch.where(edge.unsqueeze(-1), (k / n).unsqueeze(-1).to(p.dtype), p)
    return p.to(x.dtype)


# one opaque op for torch.compile, with a vmap rule; plain eager calls skip its dispatch
_solve_op = torch.library.custom_op("khot::sigmoid_topk_solve", _solve_slices, mutates_args=())


@_solve_op.register_fake
def _(x: Tensor, k: Tensor, r: Tensor) -> Tensor:
    return torch.empty_like(x)


def _solve_vmap(info, in_dims, x: Tensor, k: Tensor, r: Tensor):
    def front(t: Tensor, d: int | None) -> Tensor:
        return t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)

    x, k, r = (front(t, d) for t, d in zip((x, k, r), in_dims))
    return _solve_op(x, k, r.expand(*x.shape[:-1], 1)), 0


torch.library.register_vmap(_solve_op, _solve_vmap)


def _scalar_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class _SigmoidTopK(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: float | Tensor, temperature: float | Tensor) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        batch = x.shape[:-1]
        kd = torch.as_tensor(k, dtype=_scalar_dtype(x.device), device=x.device).expand(batch)
        r = torch.as_tensor(temperature, dtype=dtype, device=x.device).reciprocal().expand(batch).unsqueeze(-1)
        return (_solve_slices if _inspectable(x) else _solve_op)(x, kd, r)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, k, temperature = inputs
        ctx.k_is_tensor = isinstance(k, Tensor)
        ctx.k_dtype = k.dtype if ctx.k_is_tensor else None
        ctx.tau_is_tensor = isinstance(temperature, Tensor)
        ctx.save_for_backward(output, x if ctx.tau_is_tensor else None, temperature if ctx.tau_is_tensor else None)
        ctx.temperature = None if ctx.tau_is_tensor else temperature

    @staticmethod
    def backward(ctx, grad):
        p, x, tau = ctx.saved_tensors
        if p.numel() == 0:
            zero = p.new_zeros(p.shape[:-1])
            return grad.new_zeros(p.shape), zero if ctx.k_is_tensor else None, zero if ctx.tau_is_tensor else None
        dtype = p.dtype if p.dtype == torch.float64 else torch.float32
        p, g = p.to(dtype), grad.to(dtype)
        # one full-size buffer a: w / τ, then w g / τ, then the gradient w (g - m) / τ; written in
        # place unless this backward is itself differentiated (create_graph)
        inv = tau.to(dtype).reciprocal().unsqueeze(-1) if ctx.tau_is_tensor else 1 / ctx.temperature
        a = torch.ops.aten.sigmoid_backward(torch.as_tensor(inv, dtype=dtype, device=p.device).expand_as(p), p)
        out = None if torch.is_grad_enabled() else a
        s = a.sum(-1)
        safe = torch.where(s > 0, s, 1)
        grad_tau = None
        if ctx.tau_is_tensor and ctx.needs_input_grad[2]:
            xf = torch.where(a > 0, x, 0).to(dtype)  # w = 0 where x = ±inf
            wx = torch.linalg.vecdot(a, xf)
        a = torch.mul(a, g, out=out)
        m = a.sum(-1) / safe
        if ctx.tau_is_tensor and ctx.needs_input_grad[2]:
            grad_tau = ((wx * m - torch.linalg.vecdot(a, xf)) / tau.to(dtype)).to(tau.dtype)
        shift = (-m).unsqueeze(-1) * inv
        a = torch.addcmul(shift, g, inv, out=out) if ctx.tau_is_tensor else torch.add(shift, g, alpha=inv, out=out)
        if out is None:
            grad_x = torch.ops.aten.sigmoid_backward(a, p)
        else:
            grad_x = torch.ops.aten.sigmoid_backward.grad_input(a, p, grad_input=a)
        grad_k = m.to(ctx.k_dtype) if ctx.k_is_tensor and ctx.needs_input_grad[1] else None
        return grad_x.to(grad.dtype), grad_k, grad_tau


def sigmoid_topk(x: Tensor, k: float | Tensor, dim: int = -1, *, temperature: float | Tensor = 1.0) -> Tensor:
    """Relaxed k-hot vector ``sigmoid(x / temperature + c)`` summing to ``k`` along ``dim``.

    Args:
        x: floating-point scores, any shape, any device.
        k: the (real) number of items to select, ``0 <= k <= n`` with ``n = x.shape[dim]``: a
            number, or a tensor of per-slice values with the shape of ``x`` without ``dim``
            (or broadcastable to it). ``k = 0`` and ``k = n`` give exactly 0 and 1 with zero
            gradient.
        dim: the dimension to select along (negative values count from the end).
        temperature: ``τ > 0``, a number or a tensor broadcastable to the per-slice shape.
            ``τ → 0`` tends to the exact top-k mask (for distinct scores), large ``τ`` to
            ``k / n`` everywhere.

    Returns:
        ``p`` with the shape, dtype and device of ``x``, values in ``[0, 1]`` and
        ``p.sum(dim) ≈ k`` (within ``1e-5 * max(1, k)`` when solved in float32).

    Differentiable with respect to ``x``, a tensor ``k`` and a tensor ``temperature``; works
    with ``torch.func`` (``vmap``, ``grad``) and ``torch.compile(fullgraph=True)``. A NaN in
    a slice makes that slice's output NaN. ``+inf`` scores get ``p = 1`` and ``-inf`` scores
    ``p = 0`` (e.g. masked items); a slice with more than ``k`` entries at ``+inf`` (or more
    than ``n - k`` at ``-inf``) cannot meet the constraint and sums to the number of ``+inf``
    entries (or that plus the finite ones). Cost: ``O(n)``, about eight reads of the input forward
    and six backward on typical inputs.

    Example (the worked example of the guide, ``c ≈ 2.830074``):

    >>> import torch
    >>> x = torch.tensor([-4.5951, -2.1972, -3.1781, 0.0, -1.1527])
    >>> p = sigmoid_topk(x, 3)
    >>> [round(v, 4) for v in p.tolist()]
    [0.1462, 0.6531, 0.4139, 0.9443, 0.8426]
    >>> round(p.sum().item(), 4)
    3.0
    >>> sigmoid_topk(x, 2, temperature=0.01).round().tolist()
    [0.0, 0.0, 0.0, 1.0, 1.0]
    """
    check_tensor("x", x, floating=True)
    d = normalize_dim(dim, x.dim())
    xm = x.unsqueeze(0) if x.dim() == 0 else x.movedim(d, -1)
    batch = xm.shape[:-1]
    k = check_real_count(k, xm.shape[-1], batch, x.device)
    temperature = check_positive("temperature", temperature)
    if isinstance(temperature, Tensor):
        if temperature.device != x.device:
            raise ValueError(f"temperature is on {temperature.device} but the input is on {x.device}")
        try:
            temperature = torch.broadcast_to(temperature, batch)
        except RuntimeError:
            raise ValueError(
                f"temperature has shape {tuple(temperature.shape)}, which does not broadcast to the shape "
                f"of the input with the reduced dimension removed, {tuple(batch)}"
            ) from None
    p = _SigmoidTopK.apply(xm, k, temperature)
    return p.squeeze(0) if x.dim() == 0 else p.movedim(-1, d)
