"""Sigmoid top-k: a relaxed k-hot vector, ``sigmoid((x - t) / τ)`` with ``t`` such that it sums to k.

``p = sigmoid((x - t) / τ)``, with one threshold ``t`` per slice solving ``Σ p = k`` (the
paper writes ``c = -t / τ``), lies in ``[0, 1]`` and sums to ``k``: it is the
entropy-regularised relaxation of the top-k mask (Wijk, Vinuesa & Azizpour, "Differentiable
top-k: from one-hot to k-hot"). It is differentiable with respect to ``x``, ``k`` and a tensor
temperature, and tends to the exact k-hot mask as ``τ → 0``.

Accuracy: the output is the float64 solution rounded to the output dtype (float32: within
about 1e-6 of it; float64: ``|Σ p - k| <= 1e-9 max(1, k)`` wherever float64 can resolve the
threshold), for every input with finite and ±inf entries, any ``τ > 0`` and ``0 <= k <= n``.
Three things make that hold:

* the threshold ``t`` is a float64 per slice, and float32 inputs are evaluated as
  ``((x - t_hi) - t_lo) / τ`` with ``t = t_hi + t_lo`` split into a float32 head and tail:
  ``x - t_hi`` is exact for the entries near the threshold, which are the ones that matter;
* the sums ``Σ p`` and ``Σ p²`` accumulate in float64, or (CPU path) in float32 where the
  rounding bound of a pairwise sum of ``m`` terms, ``2**-24 ceil(log2 m) Σ p``, is below the
  tolerance (rows of ``2**14`` and more are summed in chunks of ``m = 256`` added in float64, so
  long rows need no float64 sums); ``k > n / 2`` is solved as ``n - k`` for ``-x`` (then
  ``1 - p``), so the sums stay small;
* the solver cannot stop early or at a cap. ``f(t) = Σ p`` is decreasing in ``t``. Each step
  is Halley's method on ``log f(c) = log k`` (``c = -t / τ``; ``f'' = Σ p - 3 Σ p² + 2 Σ p³``),
  where the sums behave like exponentials, so the step is nearly exact far from the root too
  (the method of the authors' code, in log space). Every evaluation shrinks a bracket
  ``[lo, hi]`` on ``t``; a step is taken only inside the bracket and when it is at most half the
  previous one (else, on "staircases" of scores many ``τ`` apart, it would creep one stair at a
  time), at most ``_HALLEY`` times; otherwise the bracket is bisected on the bit pattern of its
  float64 ends, which reaches adjacent doubles from any bracket in at most 64 steps. A slice is
  done when ``|Σ p - k|`` is below its tolerance (float32: ``max(4e-6 Σ p (1 - p), 1e-6)``;
  float64: ``max(1e-10 Σ p (1 - p), 2.5e-11)``, and at most ``5e-10 max(1, k)``). Either bound
  holds ``p`` within about ``1e-6`` (float32) of the root: ``4e-6 Σ p (1 - p)`` moves ``c`` by
  ``4e-6`` at most, and on the way to the root every ``p`` moves the same way, so none moves by
  more than ``|Σ p - k|``. The absolute floor matters at sharp temperatures, where
  ``Σ p (1 - p)`` is tiny and the relative bound asks for more than the rounding of ``p`` near
  1 lets any sum show. A slice whose bracket holds two adjacent doubles takes the one whose sum
  is closer to ``k``, the best float64 allows (e.g. ``|x / τ| ~ 1e30`` leaves no threshold
  between two scores). So at most ``2 + _HALLEY + 64`` evaluations (on the CPU path, which
  also bisects arithmetically, at most 64 more, after its fast lane's ``_FAST``).

Start: a strided sub-sample of about 4096 entries gives the probit approximation (the mean of
``sigmoid(z + c)`` over normal ``z`` with mean ``μ`` and deviation ``s`` is about
``sigmoid((μ + c) / sqrt(1 + π s² / 8))``), then, for longer slices, the sub-sample's own
root solved to the ~1e-3 it can represent.

Backends (:mod:`khot._backend`): the op ``khot::sigmoid_topk_forward`` solves the slices. Its
portable path (every device without a kernel, meta tensors, ``khot.use_backend("portable")``)
has no host synchronisation: always the full ``2 + _HALLEY + 64`` evaluations, done slices
frozen, float64 sums. The CPU path is built for the short rows of training loops, where the
cost is per tensor op rather than per element:

* one value of ``k`` and ``τ`` for every slice is kept as a Python number, and inputs of up to
  ``_DOUBLE`` elements are solved in float64 (no split threshold, no checks on float32 sums);
* a fast lane takes plain Halley steps from the start; once every slice's Newton step ``δ`` in
  ``c`` is below ``sqrt(tol) / 2`` (typically at the second evaluation) it takes that step and
  evaluates once more without sums: Newton's step from there misses the root by at most
  ``δ² / 2`` in ``c``, below the tolerance; on rows of at least ``_LONG`` it stops at the second
  evaluation itself when every slice is within the tolerance there (typical: one Halley step
  from the sub-sample's threshold), a third of the forward's passes fewer;
* slices the fast lane leaves (staircases, sharp temperatures, NaN) go to the bracketed solver
  above, in float64, inside a bracket from order statistics (``_order_bracket``: the ``⌈k⌉``-th
  and ``(⌈k⌉+1)``-th largest scores, a few ``τ`` wide at sharp temperatures) and from its middle;
  it ends the same way,
  bisects arithmetically every other time (bit-pattern bisection of a bracket that holds 0
  first dives to tiny magnitudes) and drops the slices that are done once they are half of
  those it iterates.

Backward is closed-form (implicit function theorem, no solver): with ``w = p (1 - p)``,
``S = Σ w`` and ``m = Σ w g / S`` for an incoming gradient ``g``::

    grad_x = w (g - m) / τ,   grad_k = m,   grad_τ = -Σ w g (x - x̄) / τ²,  x̄ = Σ w x / S.

Slices with ``S = 0`` (fully saturated) get zero gradients. The common backward (no gradient in
``τ``, not differentiated again) is the op ``khot::sigmoid_topk_backward``; it allocates one
full-size tensor and rewrites it in place (``w / τ``, then ``w g / τ``, then ``(g - m) / τ``, then
the gradient).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from khot._backend import apply, call, custom_op, forced_backend
from khot._checks import _readable_cpu, check_positive, check_real_count, check_tensor, normalize_dim

from ._threshold import CHUNK, one_value, row_sum

__all__ = ["sigmoid_topk"]

_HALLEY = 12  # Halley steps per solve at most; typical inputs take 1-2
_BITS = 64  # bisections of a float64 bracket that reach adjacent doubles from any bracket
_EVALUATIONS = 2 + _HALLEY + _BITS  # enough for every slice: the portable path's fixed work
_SAMPLE = 4096  # target size of the strided sub-sample that gives the starting point
_FAST = 3  # plain Halley evaluations of the CPU path before a slice goes to the bracketed solver
_DOUBLE = 1 << 14  # up to this many elements the CPU path solves in float64
_LONG = 1 << 14  # from this row length the CPU path's float32 sums are over chunks (see _sums), and its fast lane checks the tolerance
_MAX = torch.finfo(torch.float64).max
# float64 work for a lower-precision output clamps |x - t| / τ here, where sigmoid is 1 or below 1e-100
# (0 in float32): sigmoid, its squares and cubes then never reach subnormal numbers, which cost a CPU
# 5-10x more per element (sharp temperatures put most entries that far from the threshold)
_BOUND = 230.0
_R32 = 2.0**126  # 1 / τ is clamped here in float32 work (differences below 2**-126 are subnormal)
_LOW_BITS = 0x7FFFFFFFFFFFFFFF
_F32 = 2.0**127  # float32 work clamps the threshold and its tail here (finite; inf - inf is NaN)


def _key(t: Tensor) -> Tensor:
    """Order-preserving int64 key of a float64 tensor (an involution: ``_key`` undoes itself)."""
    bits = t.view(torch.int64)
    return bits ^ ((bits >> 63) & _LOW_BITS)


def _bisect(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Midpoint of ``[lo, hi]`` on the float64 bit pattern, and whether the two are adjacent."""
    a, b = _key(lo), _key(hi)
    mid = (a >> 1) + (b >> 1) + (a & b & 1)  # floor of the mean, without overflow
    return _key(mid).view(torch.float64), (mid == a) | (mid == b)


def _logit(v: float | Tensor) -> float | Tensor:
    """``log(v / (1 - v))``, ``∓inf`` at 0 and 1 for numbers as for tensors (``k`` below 1e-16 rounds
    ``k - ⌈k⌉ + 1`` to 0 in ``_order_bracket``)."""
    if not isinstance(v, float):
        return torch.logit(v)
    return -math.inf if v <= 0 else math.inf if v >= 1 else math.log(v) - math.log1p(-v)


def _per_row(v: float | Tensor) -> float | Tensor:
    """``v`` (a number, or per slice) for the CPU path's rows: a number when it is one value broadcast
    to every slice (then per-slice arithmetic on it costs nothing), else its values as one row."""
    if not isinstance(v, Tensor):
        return v
    one = one_value(v)
    return v.reshape(-1) if one is None else one


def _evaluate(x: Tensor, t: Tensor, r: float | Tensor, out: Tensor | None, tail: bool, bound: float | None = None) -> Tensor:
    """``sigmoid((x - t) * r)`` into ``out``; ``t`` float64 per slice, ``r`` (``1 / τ``) a number or float64 per slice.

    In float32 the threshold is split, ``t = t_hi + t_lo``, so that ``x - t_hi`` is exact near
    the threshold; ``tail=False`` drops ``t_lo`` (the CPU path does so only where it is
    negligible). ``bound``: ``(x - t) * r`` is clamped to ``±bound`` first (see ``_Rule``).
    """
    if x.dtype == torch.float64:
        t_hi, r_x = t, r
    else:
        t_hi = t.clamp(-_F32, _F32).to(x.dtype)
        r_x = min(r, _R32) if isinstance(r, float) else r.clamp(-_R32, _R32).to(x.dtype)
    out = torch.sub(x, t_hi.unsqueeze(-1), out=out)
    if isinstance(r_x, Tensor):
        out.mul_(r_x.unsqueeze(-1))
    elif r_x != 1.0:
        out.mul_(r_x)
    if tail and x.dtype != torch.float64:
        out.sub_(((t - t_hi.double()) * r).clamp(-_F32, _F32).to(x.dtype).unsqueeze(-1))
    return (out if bound is None else out.clamp_(-bound, bound)).sigmoid_()


def _sums(p: Tensor, accurate: bool) -> tuple[Tensor, Tensor]:
    """``(Σ p, Σ p (1 - p))`` per slice in float64, accumulated in float64 where ``accurate``, else
    (CPU path, rows) in float32: over chunks added in float64 on rows of at least ``_LONG`` (``row_sum``:
    as cheap as one float32 sum, with the rounding bound of ``CHUNK`` terms, not ``n``), in one sum
    on shorter rows (fewer ops)."""
    if accurate and p.dtype != torch.float64:
        f = p.sum(-1, dtype=torch.float64)
        return f, (f - torch.linalg.vector_norm(p, dim=-1, dtype=torch.float64).square()).clamp_(min=0)
    if p.dtype == torch.float64 or p.shape[-1] >= _LONG:
        f = row_sum(p)
        return f, (f - row_sum(p, squares=True)).clamp_(min=0)
    f = p.sum(-1).double()
    return f, (f - torch.linalg.vector_norm(p, dim=-1).double().square()).clamp_(min=0)


class _Rule:
    """When a slice is solved, and how its sums are taken.

    "done": ``|Σ p - k| <= min(max(tol_w Σ p (1 - p), floor), tol_k max(1, k))`` (NaN slices too).
    "near": the Newton step ``δ = (k - Σ p) / Σ p (1 - p)`` in ``c`` is at most ``close`` (then
    the slice is done at ``c + δ``, :func:`_finish`) and one float64 can take (``δ >= 2**-32 |c|``, so that
    the result is ``p`` at a float64 threshold; checked where ``|c| = |t r|`` may be large). On
    the CPU path float32 sums accumulate in float32 and are redone in float64 for a batch where
    their rounding could decide a slice that looks solved.
    """

    def __init__(self, x: Tensor, k: float | Tensor, tol_w: float, tol_k: float, adaptive: bool):
        self.k, self.tol_w, self.adaptive = k, tol_w, adaptive
        self.tol_k = math.inf if tol_k == math.inf else tol_k * (max(1.0, k) if isinstance(k, float) else k.clamp(min=1))
        # |Σ p - k| below this is enough whatever Σ p (1 - p): on the way to the root every p moves the
        # same way, so none moves by more than |Σ p - k| (where Σ p (1 - p) is tiny, on "staircases",
        # the relative rule asks for more than the rounding of p near 1 lets a sum show)
        self.floor = tol_w / 4
        # float32 sums (CPU path) of chunks are accurate to 2**-24 ceil(log2 chunk) Σ p (pairwise); else float64
        self.rounding = 2.0**-24 * math.ceil(math.log2((CHUNK if x.shape[-1] >= _LONG else x.shape[-1]) + 1)) if adaptive and x.dtype != torch.float64 else 0.0
        self.bound = self._bound(x.dtype)
        # a Newton step δ in c from the root's neighbourhood misses it by at most δ² / 2 (|f''| <= f'),
        # below the tolerance
        self.close = math.sqrt(tol_w) / 2

    def take(self, rows: Tensor) -> _Rule:
        """The rule of the slices ``rows``, solved in float64."""
        rule = object.__new__(_Rule)
        rule.__dict__.update(self.__dict__, k=_take(self.k, rows), tol_k=_take(self.tol_k, rows), rounding=0.0, bound=self._bound(torch.float64))
        return rule

    def _bound(self, work: torch.dtype) -> float | None:
        """``_BOUND`` for float64 work towards a lower-precision output (its tolerance), else no clamp."""
        return _BOUND if work == torch.float64 and self.tol_w > 1e-8 else None

    def judge(self, p: Tensor, c: Tensor | None, near: bool = True, done: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(Σ p, Σ p (1 - p), k - Σ p, done, near)`` per slice of ``p`` (``done``/``near`` ``None`` unless asked)."""
        f, w = _sums(p, accurate=not self.adaptive)
        gap = self.k - f
        status = self._status(gap, w, c, near, done)
        if self.rounding and (near or done):
            solved = status[1] if status[0] is None else status[0] if status[1] is None else status[0] | status[1]
            if bool((solved & (self.rounding * 2 * f > self.tol_w * w)).any()):
                f, w = _sums(p, accurate=True)
                gap = self.k - f
                status = self._status(gap, w, c, near, done)
        return f, w, gap, *status

    def _status(self, gap: Tensor, w: Tensor, c: Tensor | None, near: bool, done: bool) -> tuple[Tensor | None, Tensor | None]:
        gap = gap.abs()
        is_done = is_near = None
        if done:
            is_done = ~(gap > (self.tol_w * w).clamp_(min=self.floor))  # NaN slices are done
            is_done = is_done if self.tol_k is math.inf else is_done & ~(gap > self.tol_k)
        if near:
            is_near = gap < self.close * w  # so w > 0
            is_near = is_near if c is None else is_near & (gap >= 2.0**-32 * c.abs() * w)
        return is_done, is_near


def _finish(x: Tensor, p: Tensor, t: Tensor, gap: Tensor, w: Tensor, near: Tensor | None, r: float | Tensor, scale: float, bound: float | None) -> tuple[Tensor, Tensor]:
    """``(p, t)`` evaluated once more at ``t - δ / r`` for the slices ``near`` (``None``: all), with ``δ = gap / w``
    their Newton step in ``c``: within ``δ² / 2`` of the root, below the tolerance, so no sums are taken."""
    delta = gap / w
    delta = delta if near is None else delta.masked_fill_(~near, 0)
    t = torch.sub(t, delta, alpha=1 / r) if isinstance(r, float) else t - delta / r
    return _evaluate(x, t, r, p, tail=scale > 12, bound=bound), t


def _halley(p: Tensor, f: Tensor, w: Tensor, k: float | Tensor, r: float | Tensor, accurate: bool) -> Tensor:
    """The step in ``t`` of Halley's method on ``log f(c) = log k`` (``c = -t r``; ``f'' = Σ p - 3 Σ p² + 2 Σ p³``).

    The sums behave like exponentials, so it is nearly exact far from the root too. With
    ``φ = log(f / k)`` and ``u = Σ p³ + 1.5 w - f``, Newton's step is ``φ f / w`` and Halley's
    correction ``1 / (1 - b / 2)`` with ``b = φ (2 u f / w² - 1)``, limited to ``[-1, 1]``.
    ``p`` is overwritten (``p³``); not finite where ``w = 0``.
    """
    cubes = p.pow_(3).sum(-1, dtype=torch.float64 if accurate else None)
    phi = (f / k).log_()
    fw = f / w
    u = torch.add(cubes, w, alpha=1.5).sub_(f).mul_(fw).div_(w)  # u f / w²
    bend = torch.addcmul(phi.neg(), phi, u, value=2).clamp_(-1, 1)  # φ (2 u f / w² - 1)
    step = phi.mul_(fw).div_(bend.mul_(-0.5).add_(1))
    return step if isinstance(r, float) and r == 1.0 else step.div_(r)


def _outward(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """A bracket ``[lo, hi]`` from bounds (not evaluated points) moved four units in the last place
    outward and clamped to finite values: the root can sit on a bound itself (equal scores, ``τ``
    below the scores' resolution), and the solver must end on points it evaluated."""
    def margin(v: Tensor) -> Tensor:
        return (v.abs().clamp(max=_MAX) + 1e-300) * 2.0**-50  # finite: ±inf ends stay ±inf, then ±_MAX

    return (lo - margin(lo)).clamp(-_MAX, _MAX), (hi + margin(hi)).clamp(-_MAX, _MAX)


def _bounds(x: Tensor, k: float | Tensor, r: float | Tensor) -> tuple[Tensor, Tensor]:
    """``min(x) - L τ <= t <= max(x) - L τ`` with ``L = logit(k / n)``: ``f`` is ``>= k`` and ``<= k`` there."""
    shift = _logit(k / x.shape[-1]) / r
    low, high = (v.double() for v in torch.aminmax(x, dim=-1))
    return _outward(low - shift, high - shift)


def _scale(t: Tensor, r: float | Tensor) -> float:
    """``max |t r|``: where it is above 12 the float32 tail of ``t`` matters, above ``2**14`` float64's resolution of ``c``."""
    return float(t.abs().max()) * r if isinstance(r, float) else float((t * r).abs().max())


def _order_bracket(x: Tensor, k: float | Tensor, r: float | Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` per row with ``Σ p >= k`` at ``lo`` and ``<= k`` at ``hi`` (``0 < k <= n / 2``), from the
    ``c``-th and ``(c + 1)``-th largest scores, ``c = ⌈k⌉``: at ``lo`` each of the top ``c + 1`` scores has
    ``p >= k / (c + 1)``; at ``hi`` the top ``c - 1`` have ``p <= 1`` and the other ``n - c + 1`` have
    ``p <= (k - c + 1) / (n - c + 1)``. Within a few ``τ`` of the gap between those two scores: at sharp
    temperatures far tighter than anything the evaluations give. ``∓_MAX`` where a score is NaN."""
    n = x.shape[-1]
    c = k.ceil() if isinstance(k, Tensor) else math.ceil(k)
    top = x.topk(min(n, (c if isinstance(c, int) else int(c.max())) + 1), -1).values
    index = torch.as_tensor(c, device=x.device).long().expand(x.shape[:-1]).unsqueeze(-1)
    a, b = (top.gather(-1, (index + i).clamp(max=top.shape[-1] - 1)).squeeze(-1) for i in (-1, 0))
    lo, hi = _outward(b - _logit(k / (c + 1)) / r, a - _logit((k - c + 1) / (n - c + 1)) / r)
    lo = torch.where(lo.isnan() | (index.squeeze(-1) >= n), -_MAX, lo)  # c = n: no (c + 1)-th score
    return lo, torch.where(hi.isnan(), _MAX, hi)


def _iterate(x: Tensor, k: float | Tensor, r: float | Tensor, t: Tensor, rule: _Rule, adaptive: bool, out: Tensor | None = None, bracket: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Solve ``Σ sigmoid((x - t) r) = k`` per slice from ``t`` inside a bracket; return ``(p, t)``.

    ``k`` (``0 < k < n``) and ``r > 0`` are numbers or float64 per slice, ``t`` float64 per slice.
    A slice is done by ``rule``, or when its bracket holds adjacent doubles; a NaN slice is NaN.
    ``adaptive`` (CPU) stops when every slice is done and computes only what a step needs;
    otherwise every evaluation runs, done slices frozen, float64 sums (no synchronisation).
    ``out``: where ``p`` is written. ``bracket``: a known ``(lo, hi)`` (the start is moved into it).
    """
    lo, hi = torch.full_like(t, -_MAX), torch.full_like(t, _MAX)
    if not adaptive:
        lo, hi = _bounds(x, k, r)
    if bracket is not None:  # from its middle (fewest evaluations measured), or t moved into it
        lo, hi = bracket
        t = torch.where((lo > -_MAX) & (hi < _MAX), lo / 2 + hi / 2, torch.minimum(torch.maximum(t, lo), hi))
    bounded = not adaptive
    previous = torch.full_like(t, math.inf)  # the last Halley step: the next must be at most half
    steps = torch.zeros_like(t)  # Halley steps taken
    f_lo, f_hi = torch.full_like(t, math.inf), torch.full_like(t, math.inf)  # f at lo and hi
    final = torch.zeros_like(t, dtype=torch.bool)  # slices moved to the better end of adjacent doubles
    splits = torch.zeros_like(t)  # bisections taken: the CPU path alternates bit-pattern and arithmetic midpoints
    budget = _EVALUATIONS + _BITS if adaptive else _EVALUATIONS
    p = out
    rows = whole = None  # CPU: the slices still iterated, and (p, t) of all, where done slices are kept
    for evaluation in range(1, budget + 1):
        # dropping t_lo moves p by |t_lo| r / 4 <= 2**-26 |t r| at most: the CPU path does where that is < 2e-7
        scale = _scale(t, r) if adaptive else math.inf
        p = _evaluate(x, t, r, p, tail=scale > 12, bound=rule.bound)
        f, w, gap, done, near = rule.judge(p, t * r if scale > 2**14 else None, near=adaptive)
        done = done | final
        if adaptive and bool((done | near).all()):
            moving = near & ~done
            p, t = _finish(x, p, t, gap, w, moving, r, scale, rule.bound) if bool(moving.any()) else (p, t)
            break
        if adaptive and 2 * int(done.sum()) >= len(done):  # drop the done slices: the rest take the steps
            if rows is None:
                rows, whole = torch.arange(len(t), device=t.device), (p, t.clone())
            whole[0][rows[done]] = p[done].masked_fill_(gap[done].isnan().unsqueeze(-1), math.nan)
            whole[1][rows[done]] = t[done]
            keep = ~done
            x, p, rows, f, w, gap, near = x[keep], p[keep], rows[keep], f[keep], w[keep], gap[keep], near[keep]
            t, lo, hi, f_lo, f_hi, previous, steps, final, splits = (v[keep] for v in (t, lo, hi, f_lo, f_hi, previous, steps, final, splits))
            k, r, rule, done = _take(k, keep), _take(r, keep), rule.take(keep), done[keep]
        hi, f_hi = torch.where(gap > 0, t, hi), torch.where(gap > 0, f, f_hi)  # f decreases in t
        lo, f_lo = torch.where(gap < 0, t, lo), torch.where(gap < 0, f, f_lo)
        if evaluation == budget:  # every slice is done by now (see the module docstring)
            if adaptive:
                raise RuntimeError("khot: sigmoid_topk's solver did not converge; please report this input")
            break
        step = _halley(p, f, w, k, r, accurate=not adaptive)
        new = t + step
        good = (new > lo) & (new < hi) & (step.abs() <= previous / 2) & (steps < _HALLEY)
        if not bounded and not bool((good | done).all()):
            lo0, hi0 = _bounds(x, k, r)
            lo, hi, bounded = torch.maximum(lo, lo0), torch.minimum(hi, hi0), True
            good = good & (new > lo) & (new < hi)
        if adaptive and bool((good | done).all()):
            t = torch.where(done, t, new)
        else:  # bisect where Halley is refused; where lo and hi are adjacent, take the better one
            mid, adjacent = _bisect(lo, hi)
            if adaptive:  # the arithmetic midpoint every other time: far fewer steps on brackets that hold 0
                mid = torch.where((splits % 2 == 0) & ~adjacent, lo / 2 + hi / 2, mid)
                splits = splits + ~good
            adjacent = adjacent & ~done & ~good
            better = torch.where((f_lo - rule.k).abs() <= (f_hi - rule.k).abs(), lo, hi)
            t = torch.where(done, t, torch.where(good, new, torch.where(adjacent, better, mid)))
            final = final | adjacent
        previous = torch.where(good, step.abs(), math.inf)
        steps = steps + good
    p = p.masked_fill_(gap.isnan().unsqueeze(-1), math.nan)  # a NaN anywhere makes the slice NaN
    if rows is None:
        return p, t
    whole[0][rows], whole[1][rows] = p, t
    return whole


def _refine(x: Tensor, k: float | Tensor, r: float | Tensor, t: Tensor, rule: _Rule, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CPU: ``_iterate``'s result, first by up to ``_FAST`` plain Halley steps from ``t``.

    Most slices are within one Newton step in ``p`` of the root after one or two Halley steps
    from the start; the bracket, its bookkeeping and the refused-step rules cost more than those
    steps on short slices. Slices that are not there after ``_FAST`` evaluations (staircases of
    scores, extreme ranges, sharp temperatures, NaN) are solved by ``_iterate`` inside their
    order-statistic bracket (``_order_bracket``), so the same rule and the same guarantees hold
    for every slice.
    """
    scaled = x.dtype != torch.float64 or rule.tol_w < 1e-6  # the float32 tail, or float64's resolution of c
    p = out
    for evaluation in range(_FAST):
        scale = _scale(t, r) if scaled else 0.0
        p = _evaluate(x, t, r, p, tail=scale > 12, bound=rule.bound)
        # a slice ends one Newton step from the root ("near") or, on long rows, within the tolerance
        # (one Halley step from the start typically gets there; on short rows the check costs as much
        # as the final evaluation it could save); the start itself is never taken
        f, w, gap, done, near = rule.judge(p, t * r if scale > 2**14 else None, near=evaluation > 0, done=evaluation > 0 and x.shape[-1] >= _LONG)
        if evaluation:
            if done is not None and bool((done & ~gap.isnan()).all()):  # no final evaluation
                return p, t
            all_near = bool(near.all())
            if all_near or evaluation == _FAST - 1:
                break
        step = _halley(p, f, w, k, r, accurate=False).nan_to_num_(0.0, 0.0, 0.0)  # not finite where w = 0: left to _iterate
        t = t + (step if near is None else step.masked_fill_(near, 0))
    if all_near or bool(near.any()):
        p, t = _finish(x, p, t, gap, w, None if all_near else near, r, scale, rule.bound)
    if not all_near:
        rows = (~near).nonzero().squeeze(-1)
        # in float64: no split threshold, no subnormal numbers (see _Rule), no float32 sums to check
        x_rows, k_rows, r_rows = x[rows].double(), _take(k, rows), _take(r, rows)
        bracket = _order_bracket(x_rows, k_rows, r_rows)
        p_rows, t[rows] = _iterate(x_rows, k_rows, r_rows, t[rows], rule.take(rows), adaptive=True, bracket=bracket)
        p[rows] = p_rows.to(p.dtype)
    return p, t


def _take(v: float | Tensor, rows: Tensor) -> float | Tensor:
    return v if isinstance(v, float) else v[rows]


def _start(x: Tensor, k: float | Tensor, r: float | Tensor, adaptive: bool, scratch: Tensor) -> Tensor:
    """A starting threshold per slice (float64) from a strided sub-sample (see the module docstring);
    ``scratch``: a tensor like ``x`` it may overwrite."""
    n = x.shape[-1]
    stride = max(1, n // _SAMPLE)
    sample = x[..., ::stride]
    mean = sample.mean(-1, keepdim=True)
    centred = torch.sub(sample, mean, out=scratch) if stride == 1 else sample - mean  # a fresh tensor costs page faults
    dev = centred.abs_().mean(-1).to(torch.float64)  # the mean absolute deviation: tails do not blow it up
    # the probit approximation: the mean of sigmoid((z - t) / τ) over normal z (mean μ, deviation s,
    # about dev sqrt(π / 2)) is about sigmoid((μ - t) / sqrt(τ² + π s² / 8))
    spread = dev.square_().mul_(math.pi**2 / 16).add_(1 / r**2 if isinstance(r, float) else r.square().reciprocal()).sqrt_()
    t = mean.squeeze(-1).to(torch.float64).sub_(spread.mul_(_logit(k / n))).nan_to_num_(0.0, 0.0, 0.0)  # ±inf in the sample
    if stride > 1:  # solved only as finely as the sub-sample represents the whole
        m = sample.shape[-1]
        sample, km = sample.contiguous(), k * (m / n)
        rule = _Rule(sample, km, math.inf, 1e-3, adaptive)
        t = (_refine(sample, km, r, t, rule) if adaptive else _iterate(sample, km, r, t, rule, False))[1].nan_to_num(0.0, 0.0, 0.0)
    return t


def _solve(x: Tensor, k: float | Tensor, inv_tau: float | Tensor, adaptive: bool) -> Tensor:
    """``sigmoid((x - t) / τ)`` summing to ``k`` along the last dim, in ``x``'s dtype.

    ``x`` is ``(..., n)``; ``k`` (may be 0 or n: exact limits) and ``inv_tau`` (``1 / τ``) are
    numbers or float64 per slice. ``k > n / 2`` is solved as ``n - k`` for ``-x`` (then ``1 - p``),
    so the sums stay small and accurate. The CPU path (``adaptive``) solves inputs of up to
    ``_DOUBLE`` elements in float64: there the cost is per op, not per element, and float64
    needs neither the split threshold nor float32 sums' checks.
    """
    n = x.shape[-1]
    if x.numel() == 0:
        return torch.empty_like(x)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if adaptive:  # rows (it picks rows); one value for every slice: per-slice arithmetic on numbers
        k, inv_tau = _per_row(k), _per_row(inv_tau)
        work = (work.double() if x.numel() <= _DOUBLE else work).reshape(-1, n)
    if isinstance(k, float):
        edge, flip = k <= 0 or k >= n, k > n / 2
        target = n / 2 if edge else min(k, n - k)
        work = -work if flip else work
    else:
        edge, flip = (k <= 0) | (k >= n), k > n / 2
        target = torch.where(edge, n / 2, torch.minimum(k, n - k))
        if not adaptive or bool(flip.any()):
            work = torch.where(flip.unsqueeze(-1), -work, work)
    tol_w, tol_k = (1e-10, 5e-10) if x.dtype == torch.float64 else (4e-6, math.inf)
    p = torch.empty_like(work)
    t = _start(work, target, inv_tau, adaptive, scratch=p)
    rule = _Rule(work, target, tol_w, tol_k, adaptive)
    p = (_refine if adaptive else functools.partial(_iterate, adaptive=False))(work, target, inv_tau, t, rule, out=p)[0]
    if isinstance(flip, bool):
        p = p.neg_().add_(1) if flip else p
    elif not adaptive or bool(flip.any()):
        p = torch.where(flip.unsqueeze(-1), 1 - p, p)
    if isinstance(edge, bool):
        p = p.fill_(k / n) if edge else p
    elif not adaptive or bool(edge.any()):
        p = torch.where(edge.unsqueeze(-1), (k / n).unsqueeze(-1).to(p.dtype), p)
    return p.to(x.dtype).reshape(x.shape)


def _forward_portable(x: Tensor, k: Tensor, inv_tau: Tensor) -> Tensor:
    return _solve(x, k, inv_tau, adaptive=False)


def _forward_cpu(x: Tensor, k: Tensor, inv_tau: Tensor) -> Tensor:
    return _solve(x, k, inv_tau, adaptive=True)


_forward_op = custom_op("sigmoid_topk_forward", _forward_portable, cpu=_forward_cpu, fake=lambda x, k, inv_tau: torch.empty_like(x))


def _forward_vmap(info, in_dims, x: Tensor, k: Tensor, inv_tau: Tensor):
    def front(t: Tensor, d: int | None) -> Tensor:
        return t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)

    x, k, inv_tau = (front(t, d) for t, d in zip((x, k, inv_tau), in_dims))
    return _forward_op(x, k, inv_tau), 0


torch.library.register_vmap(_forward_op, _forward_vmap)


def _on_numbers(t: Tensor) -> bool:
    """Whether a call on ``t`` runs the CPU path directly (a plain eager CPU call, no other backend
    forced), which takes ``k`` and ``1 / τ`` as numbers: no per-slice tensors to build. The ops
    themselves (compile, ``torch.func``, the Triton kernels) take tensors."""
    return _readable_cpu(t) and forced_backend() in (None, "cpu")


class _SigmoidTopK(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, k: float | Tensor, temperature: float | Tensor) -> Tensor:
        if not isinstance(k, Tensor) and not isinstance(temperature, Tensor) and _on_numbers(x):
            return _forward_cpu(x, k, 1 / temperature)
        batch = x.shape[:-1]
        kd = torch.as_tensor(k, dtype=torch.float64, device=x.device).expand(batch)
        r = torch.as_tensor(temperature, dtype=torch.float64, device=x.device).reciprocal().expand(batch)
        return call(_forward_op, x, kd, r)

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
        tau_grad = ctx.tau_is_tensor and ctx.needs_input_grad[2]
        inv = tau.reciprocal() if ctx.tau_is_tensor else 1 / ctx.temperature
        if tau_grad or torch.is_grad_enabled():  # differentiated again (create_graph), or a gradient in τ
            grad_x, m, grad_tau = _backward(p, grad, inv, x if tau_grad else None, inplace=not torch.is_grad_enabled())
        else:
            inv = inv if isinstance(inv, Tensor) or _on_numbers(grad) else torch.tensor(inv, dtype=torch.float64, device=p.device)
            (grad_x, m), grad_tau = call(_backward_op, p, grad, inv), None
        grad_k = m.to(ctx.k_dtype) if ctx.k_is_tensor and ctx.needs_input_grad[1] else None
        return grad_x, grad_k, None if grad_tau is None else grad_tau.to(tau.dtype)


def _backward(p: Tensor, grad: Tensor, inv_tau: float | Tensor, x: Tensor | None, inplace: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(grad_x, grad_k, grad_τ)`` for the output ``p``, the incoming ``grad`` and ``1 / τ``
    (a number, or a tensor of one or per-slice values); ``grad_τ`` only when ``x`` is given.
    ``inplace`` rewrites one full-size buffer: ``w / τ``, then ``w g / τ``, then ``(g - m) / τ``,
    then the gradient ``w (g - m) / τ``."""
    dtype = p.dtype if p.dtype == torch.float64 else torch.float32
    p, g = (v if v.dtype == dtype else v.to(dtype) for v in (p, grad))
    if isinstance(inv_tau, Tensor):
        inv = inv_tau.to(dtype)
        inv = inv.unsqueeze(-1) if inv.dim() else inv
    else:
        inv = inv_tau
    a = torch.ops.aten.sigmoid_backward(p.new_full((), inv) if isinstance(inv, float) else inv, p)  # w / τ (a 0-d τ broadcasts fastest)
    out = a if inplace else None
    s = a.sum(-1)
    safe = torch.where(s > 0, s, 1)
    grad_tau = None
    if x is not None:  # -Σ w (g - m) (x - x̄) / τ², centred first
        xc = torch.where(a > 0, x, 0).to(dtype)  # w = 0 where x = ±inf
        xc = xc - (torch.linalg.vecdot(a, xc) / safe).unsqueeze(-1)  # out of place: vecdot keeps xc for a double backward
        residual = torch.linalg.vecdot(a, xc)  # Σ w (x - x̄) / τ, zero up to rounding
    a = torch.mul(a, g, out=out)
    m = a.sum(-1) / safe
    if x is not None:
        grad_tau = (m * residual - torch.linalg.vecdot(a, xc)) * inv.squeeze(-1)
    if isinstance(inv, float):  # (g - m) / τ in one pass
        a = torch.add((m * -inv).unsqueeze(-1), g, alpha=inv, out=out)
    else:
        a = torch.sub(g, m.unsqueeze(-1), out=out)
        a = a.mul_(inv) if inplace else a * inv
    if inplace:
        grad_x = torch.ops.aten.sigmoid_backward.grad_input(a, p, grad_input=a)
    else:
        grad_x = torch.ops.aten.sigmoid_backward(a, p)
    return grad_x if grad_x.dtype == grad.dtype else grad_x.to(grad.dtype), m, grad_tau


def _backward_portable(p: Tensor, grad: Tensor, inv_tau: Tensor) -> tuple[Tensor, Tensor]:
    if p.numel() == 0:
        return torch.zeros_like(grad), p.new_zeros(p.shape[:-1], dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
    return _backward(p, grad, inv_tau, None, inplace=True)[:2]


def _backward_fake(p: Tensor, grad: Tensor, inv_tau: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(grad), p.new_empty(p.shape[:-1], dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)


# (grad_x, m) of the common backward (no gradient in τ, not differentiated again): an op, so that
# the Triton kernel can take it on CUDA
_backward_op = custom_op("sigmoid_topk_backward", _backward_portable, fake=_backward_fake)


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

    Example (the worked example of Wijk et al., ``c ≈ 2.830074``, ``t = -c``):

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
    xm = x.unsqueeze(0) if x.dim() == 0 else x if d == x.dim() - 1 else x.movedim(d, -1)
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
    p = apply(_SigmoidTopK, xm, k, temperature)
    return p.squeeze(0) if x.dim() == 0 else p if d == x.dim() - 1 else p.movedim(-1, d)
