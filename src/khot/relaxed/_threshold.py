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
from khot._checks import check_count, check_positive, check_real_count, check_tensor, normalize_dim

__all__ = [
    "Rows", "work_dtype", "clamp_infinite", "finite_range_sorted", "largest_index", "lower_bound", "keep_exact",
    "threshold_op", "shifted", "threshold_function",
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


def clamp_infinite(z: Tensor, margin: float) -> Tensor:
    """``z`` with ``+inf`` (``-inf``) replaced by ``margin`` above (below) the slice's largest (smallest)
    finite value (0 for a slice without one), so that every later step stays finite."""
    finite = torch.isfinite(z)
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
    steps (a fixed count, no host synchronisation). ``value`` maps int64 indices of ``shape`` to values."""
    lo = torch.full(shape, -1, dtype=torch.long, device=k.device)
    hi = torch.full(shape, n, dtype=torch.long, device=k.device)
    for _ in range(max(1, math.ceil(math.log2(n + 1)))):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        open_ = hi - lo > 1
        ok = value(mid.clamp(0, n - 1)) >= k
        lo = torch.where(open_ & ok, mid, lo)
        hi = torch.where(open_ & ~ok, mid, hi)
    return lo


_SAMPLE = 4096  # sub-sample size per slice for the CPU paths' bracket
WINDOW = 1 / 16  # the CPU paths take at most this fraction of a slice with topk, else sort it all


def lower_bound(rows: Tensor, k: Tensor, solve: Callable[[Tensor, Tensor], Tensor]):
    """``(lo, count)``: a likely lower bound ``lo`` (``(rows, 1)``, float64) of each row's threshold
    for ``k``, from ``solve`` (rows, k -> t) run on a strided sub-sample at ``k`` scaled to the
    sample plus four standard deviations of the count (a binomial), and an upper estimate of how
    many entries of any row exceed it. ``None`` for short rows, ``k`` at 0 or n, or when that
    count is over ``WINDOW`` of a row (then a full sort is as cheap)."""
    n = rows.shape[-1]
    if n < 8 * _SAMPLE or not bool(((k >= 1) & (k <= n - 1)).all()):
        return None
    sample = rows[:, :: n // _SAMPLE].contiguous()
    m = sample.shape[-1]
    ks = k * (m / n)
    lo = solve(sample, (ks + 4 * (ks * (1 - ks / m)).clamp(min=0).sqrt() + 2).clamp(max=m))[:, None]
    above = (sample > lo.to(sample.dtype)).sum(-1).max().item()
    count = math.ceil((above + 4 * math.sqrt(above) + 8) * n / m)
    return None if count > n * WINDOW else (lo, count)


def keep_exact(out: Tensor, rows: Tensor, k: Tensor, top: Tensor, lo: Tensor, exact: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Thresholds ``out`` (``(rows, 3)``) solved from the ``topk`` values ``top`` of ``rows`` above
    ``lo`` (:func:`lower_bound`), kept where provably exact: the ``topk`` reached below ``lo`` and
    ``t >= lo``; slices with ``+inf`` or NaN leaders, and the others, are solved by ``exact`` on
    the whole row. The scores left out lie below ``t``, so the lower clamp bound becomes ``-inf``."""
    valid = (top[:, -1] <= lo[:, 0]) & (out[:, 0] >= lo[:, 0]) & torch.isfinite(top[:, 0])
    out[:, 1] = -torch.inf
    if not bool(valid.all()):
        out[~valid] = exact(rows[~valid], k[~valid])
    return out


def threshold_op(name: str, portable: Callable, cpu: Callable):
    """The custom op ``khot::name`` of a threshold search: scores ``z (..., n)`` and ``k`` to
    ``(t, lo, hi)`` per slice (float64, ``(..., 3)``), with its CPU path."""
    return custom_op(name, portable, cpu=cpu, fake=lambda z, k: z.new_empty((*z.shape[:-1], 3), dtype=torch.float64))


def shifted(z: Tensor, t: Tensor, inplace: bool = False) -> Tensor:
    """``z - t`` for a float64 threshold ``t (..., 1)``, in ``z``'s dtype, without a float64 copy of ``z``:
    ``t`` is split into a head and a tail in ``z``'s dtype, ``(z - t_head) - t_tail`` (written into
    ``z`` when ``inplace``)."""
    if z.dtype == t.dtype:
        return z.sub_(t) if inplace else z - t
    head = t.to(z.dtype)
    tail = torch.where(torch.isfinite(t), t - head.to(t.dtype), 0).to(z.dtype)  # t = ±inf: k = 0 or n
    return (z.sub_(head) if inplace else z - head).sub_(tail)


def threshold_function(name: str, solve: Callable, weights: Callable[[Tensor], Tensor], slope: float = 1.0):
    """An autograd Function ``(x (..., n), k (...), τ (..., 1), *options) -> p`` from ``solve`` (the same
    signature, returning ``p`` in ``x``'s dtype) and ``weights(p) = F'`` (the module docstring);
    ``options`` are non-tensor settings of the solver."""

    def backward(ctx, grad):
        p, x, tau = ctx.saved_tensors
        dtype = work_dtype(p)
        w = weights(p.to(dtype))
        s = w.sum(-1, keepdim=True)
        out = None if torch.is_grad_enabled() else w * grad  # in place from here unless differentiated again
        wg = w * grad if out is None else out
        m = wg.sum(-1, keepdim=True) / torch.where(s > 0, s, 1)
        gz = torch.addcmul(wg, w, m, value=-1, out=out)  # w (g - m)
        rate = slope / tau.to(dtype)
        grad_k = m.squeeze(-1).to(torch.float64) if ctx.needs_input_grad[1] else None
        grad_tau = None
        if ctx.needs_input_grad[2]:
            z = torch.where((w > 0) & torch.isfinite(x), x.to(dtype), 0) * rate
            grad_tau = (-(gz * z).sum(-1, keepdim=True) / tau.to(dtype)).to(tau.dtype)
        grad_x = torch.mul(gz, rate, out=out).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_k, grad_tau, *(None,) * ctx.n_options

    def setup_context(ctx, inputs, output):
        x, _, tau, *options = inputs
        ctx.n_options = len(options)
        ctx.save_for_backward(output, x, tau)

    namespace = {
        "generate_vmap_rule": True,
        "forward": staticmethod(solve),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    }
    return type(name, (torch.autograd.Function,), namespace)
