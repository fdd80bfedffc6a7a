"""Shared machinery of the threshold relaxations ``p_i = F(z_i - t)``, ``z = slope * x / τ``, ``Σ p = k``.

``sparse`` (F a clipped identity), ``lapsum`` (F the Laplace CDF) and ``soft`` (F the logistic
function, solved by Sinkhorn) differ only in how they find the threshold ``t`` and in ``F``. The
rest is here, once: argument checks, the treatment of ``±inf`` scores, the search over a sorted
row, and the backward pass, which needs no solver (implicit function theorem): with
``w = F'(z - t)`` (read from ``p``), ``S = Σ w`` and ``m = Σ w g / S`` for an incoming gradient
``g``::

    grad_z = w (g - m),   grad_x = grad_z * slope / τ,   grad_k = m,   grad_τ = -Σ grad_z z / τ.

Slices with ``S = 0`` (no item on the slope of ``F``) get zero gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from khot._backend import custom_op
from khot._checks import _readable_cpu, check_count, check_positive, check_real_count, check_tensor, normalize_dim

__all__ = [
    "Rows", "work_dtype", "clamp_infinite", "finite_range_sorted", "largest_index", "lower_bound",
    "LONG", "top_above", "refine", "row_sum", "solve_window", "long_rows", "threshold_op", "scores_and_threshold", "shifted",
    "threshold_function", "one_value",
]


class Rows:
    """``x`` moved to ``(..., n)`` with its checked ``k`` and ``temperature``; :meth:`restore` undoes the move."""

    def __init__(self, x: Tensor, k, dim: int, temperature, *, real_k: bool = True, per_row: bool = True):
        check_tensor("x", x, floating=True)
        self.d, self.scalar = normalize_dim(dim, x.dim()), x.dim() == 0
        self.x = x.unsqueeze(0) if self.scalar else x.movedim(self.d, -1)
        self.batch, n = self.x.shape[:-1], self.x.shape[-1]
        if isinstance(k, Tensor) and not per_row:
            raise TypeError(f"k must be a Python int for this method, got a tensor of shape {tuple(k.shape)}")
        self.k = (check_real_count if real_k else check_count)(k, n, self.batch, x.device)
        temperature = check_positive("temperature", temperature)
        if isinstance(temperature, Tensor):
            if temperature.device != x.device:
                raise ValueError(f"temperature is on {temperature.device} but the input is on {x.device}")
            try:
                temperature = torch.broadcast_to(temperature, self.batch)
            except RuntimeError:
                raise ValueError(
                    f"temperature has shape {tuple(temperature.shape)}, which does not broadcast to the shape "
                    f"of the input with the reduced dimension removed, {tuple(self.batch)}"
                ) from None
        self.temperature = temperature

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``k`` as a float64 tensor of the batch shape and ``τ`` as ``(..., 1)`` in the work dtype."""
        dtype = work_dtype(self.x)
        k, tau = self.k, self.temperature
        k = k.to(torch.float64) if isinstance(k, Tensor) else torch.tensor(k, dtype=torch.float64, device=self.x.device)
        tau = tau.to(dtype) if isinstance(tau, Tensor) else torch.tensor(tau, dtype=dtype, device=self.x.device)
        return k.expand(self.batch), tau.expand(self.batch).unsqueeze(-1)

    def restore(self, p: Tensor) -> Tensor:
        return p.squeeze(0) if self.scalar else p.movedim(-1, self.d)


def work_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 otherwise (half and bfloat16 are computed in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _margin(extreme: Tensor, margin: float) -> Tensor:
    # at least `margin`, and far enough above the rounding of the extreme value itself
    return torch.clamp(extreme.abs() * 2.0**-10, min=margin)


def clamp_infinite(x: Tensor, tau: Tensor, margin: float) -> Tensor:
    """``x / τ`` with ``+inf`` (``-inf``) replaced by ``margin`` above (below) the slice's largest (smallest)
    finite value (0 for a slice without one), so that every later step stays finite. Only finite
    entries are divided: an infinite one then carries no gradient in ``τ`` (``inf / τ`` would make it
    ``0 * inf = NaN``), only its bound does."""
    z = torch.where(torch.isfinite(x), torch.where(torch.isfinite(x), x, 0) / tau, x)
    finite = torch.isfinite(z)  # also where x / τ overflowed: clamped like an infinity
    hi = torch.where(finite, z, -math.inf).amax(-1, keepdim=True)
    lo = torch.where(finite, z, math.inf).amin(-1, keepdim=True)
    none = hi < lo
    hi, lo = torch.where(none, 0, hi), torch.where(none, 0, lo)
    return torch.clamp(z, lo - _margin(lo, margin), hi + _margin(hi, margin))


def finite_range_sorted(s: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """The bounds that :func:`clamp_infinite` uses, read from an ascending row ``s`` (no full pass)."""
    n = s.shape[-1]
    edge = torch.full((*s.shape[:-1], 1), math.inf, dtype=s.dtype, device=s.device)
    n_low = torch.searchsorted(s, -edge, right=True)  # entries at -inf
    n_high = n - torch.searchsorted(s, edge)  # entries at +inf (and NaN)
    none = n_low + n_high >= n
    lo = torch.where(none, 0, s.gather(-1, n_low.clamp(max=n - 1)))
    hi = torch.where(none, 0, s.gather(-1, (n - 1 - n_high).clamp(min=0)))
    return lo - _margin(lo, margin), hi + _margin(hi, margin)


def largest_index(value: Callable[[Tensor], Tensor], k: Tensor, n: int, shape: torch.Size) -> Tensor:
    """For each slice, the largest ``j`` in ``[-1, n - 1]`` with ``value(j) >= k``, where ``value`` is
    non-increasing in ``j`` and ``value(-1)`` counts as ``+inf``: a bisection of ``ceil(log2(n + 1))``
    steps (a fixed count, no host synchronisation). ``value`` maps int64 indices of ``shape`` to values,
    column by column: it must also take ``c`` blocks of columns (``(..., c * m)``, block ``i`` for
    column ``i``), which is how short slices are searched in one call instead (every index at once:
    the count of indices with ``value >= k``, fewer and larger operations than the bisection)."""
    if n * shape[-1] <= _DENSE:
        every = torch.arange(n, device=k.device).repeat(shape[-1]).expand(*shape[:-1], n * shape[-1])
        return (value(every) >= k).reshape(*shape[:-1], shape[-1], n).sum(-1) - 1
    lo = torch.full(shape, -1, dtype=torch.long, device=k.device)
    hi = torch.full(shape, n, dtype=torch.long, device=k.device)
    for _ in range(max(1, math.ceil(math.log2(n + 1)))):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        open_ = hi - lo > 1
        ok = value(mid.clamp(0, n - 1)) >= k
        lo = torch.where(open_ & ok, mid, lo)
        hi = torch.where(open_ & ~ok, mid, hi)
    return lo


_DENSE = 2**14  # largest_index evaluates every index of slices up to this size (times columns)
_SAMPLE = 4096  # sub-sample size per slice for the CPU paths' bracket
_LADDER = 16  # the whole-row iteration starts from the threshold of every 16th score (long rows)
LONG = 8 * _SAMPLE  # rows the CPU paths solve without sorting: at least this long
WINDOW = 1 / 16  # the CPU paths solve from the scores above a bound when they are at most this fraction of a row


def lower_bound(rows: Tensor, k: Tensor, solve: Callable[[Tensor, Tensor], Tensor]):
    """``(lo, count, start)`` for long rows and ``1 <= k <= n - 1``, from ``solve`` (rows, k -> t) run
    once on a strided sub-sample: a likely lower bound ``lo`` (``(rows, 1)``, float64, a value of the
    rows' dtype) of each row's threshold, the sample's threshold at ``k`` scaled to the sample plus
    four standard deviations of the count (a binomial); an upper estimate ``count`` of how many
    entries of any row exceed it; and ``start`` (``(rows,)``), the sample's threshold at ``k`` itself,
    an estimate of the row's."""
    n = rows.shape[-1]
    sample = rows[:, :: n // _SAMPLE].contiguous()
    m = sample.shape[-1]
    ks = k * (m / n)
    high = (ks + 4 * (ks * (1 - ks / m)).clamp(min=0).sqrt() + 2).clamp(max=m)
    lo, start = solve(torch.cat([sample, sample]), torch.cat([high, ks])).chunk(2)
    lo = lo.to(rows.dtype).to(torch.float64)[:, None]  # a value of the rows' dtype: one comparison in either
    above = (sample > lo.to(sample.dtype)).sum(-1).max().item()
    count = math.ceil((above + 4 * math.sqrt(above) + 8) * n / m)
    return lo, count, start


_CHUNK = 16  # top_above's chunk length


def _pack(values: Tensor, keep: Tensor, fill: float) -> Tensor:
    """The entries of ``values`` (``(rows, m)``) where ``keep``, moved to the front of each row in their
    order, the rows padded with ``fill`` to the longest (at least one column)."""
    r = values.shape[0]
    row, col = keep.nonzero(as_tuple=True)
    counts = torch.bincount(row, minlength=r)
    place = torch.arange(row.numel(), device=values.device) - (counts.cumsum(0) - counts)[row]
    out = values.new_full((r, max(1, int(counts.max()) if r else 1)), fill)
    out[row, place] = values[row, col]
    return out


def top_above(rows: Tensor, lo: Tensor) -> Tensor | None:
    """Every value of ``rows`` above ``lo`` (``(rows, 1)``) and every NaN, unordered, in short rows padded
    with ``-inf``; found without ``topk`` or a mask over whole rows: each row is read as
    16 interleaved slices, whose elementwise maximum (one cheap pass) picks the columns that hold such
    an entry, and only those columns are kept. ``None`` when they hold over a quarter of the rows (a
    pass over whole rows is then cheaper)."""
    r, n = rows.shape
    cols = n // _CHUNK
    bound = lo.to(rows.dtype)
    body = rows[:, : cols * _CHUNK].reshape(r, _CHUNK, cols)  # column j: rows[j], rows[j + cols], ...
    peak = body.amax(1)
    hit = ~(peak <= bound)  # columns with an entry above lo or a NaN
    if int(hit.sum(-1).max()) * _CHUNK > n // 4:
        return None
    index = _pack(torch.arange(cols, device=rows.device).expand(r, cols), hit, -1)
    picked = body.gather(2, index.clamp(min=0).unsqueeze(1).expand(r, _CHUNK, index.shape[-1]))
    picked = torch.cat([picked.reshape(r, -1), rows[:, cols * _CHUNK :]], -1)
    return _pack(picked, ~(picked <= bound), -torch.inf)


CHUNK = 256  # row_sum's float32 sums are over chunks this long: their rounding bound is that of CHUNK terms


def row_sum(t: Tensor, squares: bool = False) -> Tensor:
    """``t.sum(-1)`` (``(t * t).sum(-1)`` where ``squares``) of a ``(rows, n)`` tensor as float64:
    float32 sums of chunks of ``CHUNK``, added in float64. As cheap as a plain float32 sum (several
    times cheaper than one accumulating in float64 on the CPU) and about 30x more accurate for long
    rows; sums of integers (counts) are exact. Float64 tensors of any shape are summed as they are."""
    if t.dtype == torch.float64:
        return torch.linalg.vecdot(t, t) if squares else t.sum(-1)
    r, n = t.shape
    whole = n - n % CHUNK
    head, tail = t[:, :whole].reshape(r, whole // CHUNK, CHUNK), t[:, whole:]
    if squares:  # the norm of each chunk, squared in float64: no temporary of t's size
        return torch.linalg.vector_norm(head, dim=-1).to(torch.float64).square().sum(-1) + torch.linalg.vecdot(tail, tail).to(torch.float64)
    return head.sum(-1).to(torch.float64).sum(-1) + tail.sum(-1, dtype=torch.float64)


def refine(rows: Tensor, k: Tensor, start: Tensor, measure: Callable, max_steps: int = 40) -> tuple[Tensor, Tensor]:
    """The threshold of each row of finite scores by a safeguarded Newton-type iteration: ``(t, ok)``.

    ``measure(rows, at, state)`` evaluates the row sum at ``at`` (``(rows, 1)`` float64 values that are
    exact in ``rows``' dtype, so ``rows - at`` needs no float64 copy) in a few fused passes and returns
    ``(proposal, high, done, state)``: the next iterate (``(rows,)`` float64, from the piece of the sum
    that holds ``at``), whether the sum at ``at`` exceeds ``k`` (the threshold lies above), whether the
    proposal is provably the threshold (to the working precision; a proposal within the rows'
    rounding of ``at``, ``eps |at|``, also ends the row), and what the next call needs
    (``state`` is ``None`` on the first call; ``state["newton"]`` tells ``measure`` whether ``at`` was
    its own previous proposal). A bracket of the evaluated points keeps the iteration safe: a proposal
    outside it is replaced by the bracket's midpoint, or, while a side is open, by a step that doubles;
    a long step (over 1, the width of ``F``'s slope, where the model is poor) in the direction of the
    previous one is stretched while a side is open (doubling while that lasts), and replaced by the
    midpoint once the bracket is closed.
    ``ok`` is False for rows not done after ``max_steps`` evaluations (the caller solves them otherwise)."""
    r = rows.shape[0]
    f64 = dict(dtype=torch.float64, device=rows.device)
    lo, hi = torch.full((r,), -torch.inf, **f64), torch.full((r,), torch.inf, **f64)
    width = torch.ones(r, **f64)
    t, result = start, torch.full((r,), torch.nan, **f64)
    finished = torch.zeros(r, dtype=torch.bool, device=rows.device)
    state, last_high, boost = None, None, torch.ones(r, **f64)
    eps, tiny = torch.finfo(rows.dtype).eps, torch.finfo(rows.dtype).tiny
    for _ in range(max_steps):
        at = t.to(rows.dtype).to(torch.float64)
        proposal, high, done, state = measure(rows, at.unsqueeze(-1), state)
        # a finite proposal within the rows' rounding of the point just evaluated (eps |at|, one or two
        # units in the last place): scores that change piece in between are off by no more than that
        done = done | ((proposal - at).abs() <= eps * at.abs().clamp(min=tiny))
        result = torch.where(done & ~finished, proposal, result)
        finished = finished | done
        if bool(finished.all()):
            break
        lo, hi = torch.where(high, torch.maximum(lo, at), lo), torch.where(high, hi, torch.minimum(hi, at))
        long = (proposal - at).abs() > 1
        closed = torch.isfinite(lo) & torch.isfinite(hi)
        far = long & ~closed & (high == last_high) if last_high is not None else torch.zeros_like(high)
        boost = torch.where(far, 2 * boost, 1)
        proposal, last_high = at + boost * (proposal - at), high
        inside = (proposal > lo) & (proposal < hi) & ~(long & closed)  # False for NaN; bisect long steps
        grow = ~inside & ~closed
        outward = torch.where(high, at + width, at - width)
        width = torch.where(grow, 2 * width, width)
        t = torch.where(inside, proposal, torch.where(closed, (lo + hi) / 2, outward))
        state["newton"] = inside
    return result, finished


def solve_window(top: Tensor, k: Tensor, lo: Tensor, measure: Callable) -> tuple[Tensor, Tensor]:
    """``(out, ok)`` for :func:`long_rows`' ``windowed``: :func:`refine` from ``lo`` on the values
    ``top`` above ``lo`` (:func:`top_above`) with ``measure(k, top, which)`` (``which`` selects the rows
    solved: those without ``+inf`` or NaN); ``ok`` where that is provably
    the threshold of the whole row: solved, ``t >= lo`` and no ``+inf`` or NaN in ``top``. The scores
    left out lie below ``t``, so the lower clamp bound is ``-inf``."""
    r = top.shape[0]
    out = torch.empty((r, 3), dtype=torch.float64, device=top.device)
    out[:, 1], out[:, 2] = -torch.inf, torch.inf
    ok = ~(top == torch.inf).any(-1) & ~torch.isnan(top).any(-1)
    if bool(ok.all()):
        out[:, 0], done = refine(top, k, lo[:, 0], measure(k, top, slice(None)))
    else:
        out[:, 0], done = torch.nan, torch.zeros_like(ok)
        if bool(ok.any()):
            out[ok, 0], done[ok] = refine(top[ok], k[ok], lo[ok, 0], measure(k[ok], top[ok], ok))
    return out, ok & done & (out[:, 0] >= lo[:, 0])


def long_rows(z: Tensor, k: Tensor, portable: Callable, windowed: Callable, measure: Callable) -> Tensor:
    """The CPU path of a threshold op (``z (..., n)``, ``k (...)`` -> ``(t, lo, hi) (..., 3)``) for long rows,
    without sorting them; ``portable`` (the sorted search, exact for any input) for short rows, for
    ``k`` at 0 or n, and for the rows below that it does not settle.

    A strided sub-sample gives a lower bound ``t_lo`` of each threshold, an estimate of how many
    scores exceed it and a first estimate of the threshold (:func:`lower_bound`). When that count is
    at most ``WINDOW`` of the rows,
    ``windowed(rows, k, t_lo)`` solves from the scores above ``t_lo`` alone (:func:`top_above`,
    :func:`solve_window`: the thresholds and which of them are proven, or ``None``). Otherwise, and for
    the rows it does not prove, :func:`refine` iterates over whole rows from the sub-sample's
    threshold, with ``measure(k, rows)`` building its evaluation; rows with ``±inf`` or NaN scores
    keep the sorted search's rules (``portable``)."""
    rows, n = z.reshape(-1, z.shape[-1]), z.shape[-1]
    kr = k.reshape(-1)
    if n < LONG or not bool(((kr >= 1) & (kr <= n - 1)).all()):
        return portable(z, k)
    if bool((kr > n * WINDOW).all()):  # many scores near or above every threshold: no window, no bound
        lo = count = None
        start = _quantile_start(rows, kr)
    else:
        lo, count, start = lower_bound(rows, kr, lambda sample, ks: portable(sample, ks)[..., 0])
    found = windowed(rows, kr, lo) if count is not None and count <= n * WINDOW else None
    if found is not None:
        out, ok = found
    else:
        out = torch.empty((rows.shape[0], 3), dtype=torch.float64, device=z.device)
        ok = torch.zeros(rows.shape[0], dtype=torch.bool, device=z.device)
    if not bool(ok.all()):
        rest = slice(None) if not bool(ok.any()) else ~ok
        out[rest] = _newton(rows[rest], kr[rest], start[rest], portable, measure)
    return out.reshape(*z.shape[:-1], 3)


def _quantile_start(rows: Tensor, k: Tensor) -> Tensor:
    """A rough start (``(rows,)``, float64) for the whole-row iteration without a sub-sample solve: the
    ``k``-th largest score, read from a strided sub-sample (for both sums the threshold lies within
    a slope's width of it when the scores are dense around it; the iteration corrects the rest)."""
    n = rows.shape[-1]
    sample = rows[:, :: n // _SAMPLE].contiguous()
    m = sample.shape[-1]
    rank = (m - k * (m / n)).round().long().clamp(1, m)  # ascending rank of the k-th largest
    if bool((rank == rank[:1]).all()):  # one rank for every row (a Python k): a selection, not a sort
        return sample.kthvalue(int(rank[0]), -1).values.to(torch.float64)
    return sample.sort(-1).values.gather(-1, (rank - 1).unsqueeze(-1)).squeeze(-1).to(torch.float64)


def _newton(rows: Tensor, k: Tensor, start: Tensor, portable: Callable, measure: Callable) -> Tensor:
    out = torch.empty((rows.shape[0], 3), dtype=torch.float64, device=rows.device)
    out[:, 1], out[:, 2] = -torch.inf, torch.inf  # finite rows: nothing to clamp
    ok = torch.isfinite(row_sum(rows))  # a sum over a row with ±inf or NaN is not finite
    if bool(ok.all()):
        n = rows.shape[-1]
        if n >= _LADDER * 4 * _SAMPLE:  # a closer start: the threshold of every 16th score, from the sample's
            coarse = rows[:, ::_LADDER].contiguous()
            ks = k * (coarse.shape[-1] / n)
            better, done = refine(coarse, ks, start, measure(ks, coarse))
            start = torch.where(done, better, start)
        out[:, 0], ok = refine(rows, k, start, measure(k, rows))
    elif bool(ok.any()):
        out[ok, 0], ok[ok.clone()] = refine(rows[ok], k[ok], start[ok], measure(k[ok], rows[ok]))
    if not bool(ok.all()):
        out[~ok] = portable(rows[~ok], k[~ok])
    return out


def threshold_op(name: str, portable: Callable, cpu: Callable):
    """The custom op ``khot::name`` of a threshold search: scores ``z (..., n)`` and ``k`` to
    ``(t, lo, hi)`` per slice (float64, ``(..., 3)``), with its CPU path."""
    return custom_op(name, portable, cpu=cpu, fake=lambda z, k: z.new_empty((*z.shape[:-1], 3), dtype=torch.float64))


def scores_and_threshold(op, x: Tensor, k: Tensor, tau: Tensor):
    """``(z, t, lo, hi)``: the scores ``z = x / τ`` in the work dtype (a new tensor, free to overwrite) and
    the threshold op's ``(t, lo, hi)`` columns (``(..., 1)`` each, float64); ``None`` for empty slices."""
    z = x.to(work_dtype(x)) / tau
    if z.shape[-1] == 0:
        return None
    return (z, *op(z, k).split(1, -1))


def shifted(z: Tensor, t: Tensor, inplace: bool = False) -> Tensor:
    """``z - t`` for a float64 threshold ``t (..., 1)``, in ``z``'s dtype, without a float64 copy of ``z``:
    ``t`` is split into a head and a tail in ``z``'s dtype, ``(z - t_head) - t_tail`` (written into
    ``z`` when ``inplace``)."""
    if z.dtype == t.dtype:
        return z.sub_(t) if inplace else z - t
    head = t.to(z.dtype)
    tail = torch.where(torch.isfinite(t), t - head.to(t.dtype), 0).to(z.dtype)  # t = ±inf: k = 0 or n
    return (z.sub_(head) if inplace else z - head).sub_(tail)


def one_value(t: Tensor) -> float | None:
    """The value of ``t`` when it is one number broadcast to every element of a plain CPU tensor
    (as ``Rows.tensors`` makes of a number), else ``None``."""
    if t.numel() and all(st == 0 or n == 1 for st, n in zip(t.stride(), t.shape)) and _readable_cpu(t):
        return float(t.reshape(-1)[0])
    return None


def threshold_function(name: str, solve: Callable, weights: Callable[[Tensor], Tensor], slope: float = 1.0, *, keeps: float | None = None):
    """An autograd Function ``(x (..., n), k (...), τ (..., 1), *options) -> p`` from ``solve`` (the same
    signature, returning ``p`` in ``x``'s dtype) and ``weights(p) = F'`` (the module docstring);
    ``options`` are non-tensor settings of the solver. With ``keeps = c``, ``solve`` returns
    ``(p, c F')`` (the Function too, the second output not differentiable): a tensor the solver had
    at hand, which the backward reads instead of computing ``weights(p)`` (a pass and a temporary
    of the input's size fewer), except when it is itself differentiated (``create_graph``)."""

    def backward(ctx, grad, *_):
        if grad is None:  # keeps: grads are not materialised (no zeros for the second output)
            return (None,) * (3 + ctx.n_options)
        p, x, tau, *kept = ctx.saved_tensors
        dtype = work_dtype(p)
        again = torch.is_grad_enabled()  # differentiated again: w from p, out of place
        w = kept[0].to(dtype) if kept and not again else weights(p.to(dtype))
        scale = keeps if kept and not again else 1.0
        s = w.sum(-1, keepdim=True)
        # one τ for every slice (a plain CPU tensor): its rate folds into the first product, a pass fewer
        one = None if again or ctx.needs_input_grad[2] else one_value(tau)
        if one is not None and not (one > 0 and 2.0**-24 <= slope / (scale * one) <= 2.0**24):
            one = None  # τ that rounds to 0, or r far from 1: r w g could underflow (m loses bits) or overflow
        r = 1.0 if one is None else slope / (scale * one)
        wg = w * grad if one is None else torch.addcmul(w.new_zeros(()), w, grad, value=r)  # r w g
        out = None if again or not wg.is_contiguous() else wg  # in place from here unless differentiated again (compile takes no strided out=)
        m = wg.sum(-1, keepdim=True) / torch.where(s > 0, s, 1)
        gz = torch.addcmul(wg, w, m, value=-1, out=out)  # r scale w (g - m / r)
        grad_k = (m.squeeze(-1) / r).to(torch.float64) if ctx.needs_input_grad[1] else None
        if one is not None:
            return (gz.to(x.dtype) if ctx.needs_input_grad[0] else None), grad_k, None, *(None,) * ctx.n_options
        rate = slope / (scale * tau.to(dtype))
        grad_tau = None
        if ctx.needs_input_grad[2]:
            z = torch.where((w > 0) & torch.isfinite(x), x.to(dtype), 0) * rate
            grad_tau = (-(gz * z).sum(-1, keepdim=True) / tau.to(dtype)).to(tau.dtype)
        grad_x = torch.mul(gz, rate, out=out).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_k, grad_tau, *(None,) * ctx.n_options

    def setup_context(ctx, inputs, output):
        x, _, tau, *options = inputs
        ctx.n_options = len(options)
        if keeps is None:
            ctx.save_for_backward(output, x, tau)
        else:
            ctx.mark_non_differentiable(output[1])
            ctx.set_materialize_grads(False)  # no zeros for it
            ctx.save_for_backward(output[0], x, tau, output[1])

    namespace = {
        "generate_vmap_rule": True,
        "forward": staticmethod(solve),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    }
    return type(name, (torch.autograd.Function,), namespace)
