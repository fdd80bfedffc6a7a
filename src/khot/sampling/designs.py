"""The πps designs as custom ops: ``khot::pips_<design>(pi, total, u) -> bool``.

Every op takes ``pi`` (rows, n) float32/float64 in [0, 1], ``total`` (rows,) float64, the
sample size per row (an integer, or a real number whose fraction is the probability of the
larger size), and ``u`` (rows, n + 1) float64 uniforms in [0, 1), the only randomness (drawn
by the caller, so a generator never enters an op and compiled calls draw the same numbers as
eager ones). They return the sample as a (rows, n) bool tensor. Being opaque ops, their
data-dependent loops (Brewer's and conditional Poisson's number of draws) do not break a
``torch.compile`` graph; their fake (meta) implementation only makes the output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import custom_op
from . import conditional_poisson as _cp

__all__ = ["OPS", "layout", "uniforms"]


def _fake(pi: Tensor, total: Tensor, u: Tensor) -> Tensor:
    return torch.empty_like(pi, dtype=torch.bool)


def layout(pi: Tensor, total: Tensor, keys: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Integer interval ends of the items of each row, in the order of ``keys``.

    Items with ``pi = 1`` go first and ``pi = 0`` last (their keys are overwritten), the
    others in the order of ``keys``. ``pi`` is rounded down to multiples of ``1 / M``,
    ``M = 2**b``, ``b = min(52, bits - bit_length(n + 1))``. The lengths are then pinned so
    that the real items cover exactly ``round(total * M)``: a shortfall fills the slack of the
    first fractional items (up to ``M`` each; items with ``pi = 0`` come last and get nothing),
    an excess truncates the last ones (items with ``pi = 1`` come first and keep ``M``).
    Returns ``(ends, perm, c, b)``: ``ends`` (rows, n + 1) int64 with ``ends[:, 0]`` the
    phantom's length ``c * M - round(total * M)`` and ``ends[:, i + 1]`` the end of the item at
    ``perm[:, i]``; ``ends[:, -1] = c * M``, ``c`` (rows, 1) the sample size counting the
    phantom, ``ceil(total)``.
    """
    rows, n = pi.shape
    b = min(52, bits - (n + 1).bit_length())
    M = 1 << b
    keys = keys.masked_fill(pi == 1, -1.0).masked_fill(pi == 0, 2.0)
    perm = keys.argsort(dim=1)
    ends = torch.zeros(rows, n + 1, dtype=torch.int64, device=pi.device)
    ends[:, 1:] = pi.gather(1, perm).double().mul_(M)  # truncates: pi rounded down to a multiple of 1 / M
    ends.cumsum_(1)
    whole = total.unsqueeze(1).floor()
    target = whole.long() * M + ((total.unsqueeze(1) - whole) * M).round().long()  # exact for the integer part
    c = (target + (M - 1)) >> b
    have = ends[:, -1:].clone()
    ends.add_((target - have).clamp_min_(0))
    torch.minimum(ends, torch.arange(n + 1, device=pi.device).mul_(M), out=ends)
    torch.minimum(ends, target, out=ends)
    ends.add_(c * M - target)  # the phantom occupies [0, c * M - target)
    return ends, perm, c, b


def _unsort(x: Tensor, perm: Tensor) -> Tensor:
    return torch.zeros(x.shape, dtype=x.dtype, device=x.device).scatter_(1, perm, x)


def _systematic(pi: Tensor, total: Tensor, u: Tensor) -> Tensor:
    n = pi.shape[1]
    ends, perm, _, b = layout(pi, total, u[:, :n], 62)
    M = 1 << b
    start = (u[:, n:] * M).long()  # uniform on {0, ..., M - 1}
    hits = ends.add_(M - 1 - start).bitwise_right_shift_(b)  # number of points start + j M below each end
    return _unsort(hits[:, 1:] > hits[:, :-1], perm)


def _brewer(pi: Tensor, total: Tensor, u: Tensor) -> Tensor:
    """Brewer's draw-by-draw method on integer lengths held exactly in float64.

    With ``b = 52 - bit_length(n + 1)`` every length, every sum of lengths and every
    ``L - m * s`` below is an integer under ``2**53``: float64 holds them exactly, so the
    weights' signs and zeros are exact. A drawn item's length is set to 0, which makes its
    weight 0; finished rows draw a dummy column.
    """
    rows, n = pi.shape
    ends, perm, c, b = layout(pi, total, torch.zeros_like(pi), 52)
    M = float(1 << b)
    s = torch.zeros(rows, n + 2, dtype=torch.float64, device=pi.device)
    s[:, : n + 1] = torch.diff(ends, dim=1, prepend=torch.zeros_like(ends[:, :1]))  # phantom at 0, dummy last
    taken = torch.zeros(rows, n + 2, dtype=torch.bool, device=pi.device)
    ones = s == M
    taken |= ones
    s.masked_fill_(ones, 0.0)
    left = s.sum(1, keepdim=True)  # the length still to cover: (draws still to make) * M
    draws = c - ones.sum(1, keepdim=True)
    steps = int(draws.max()) if rows else 0
    dummy = torch.full((rows, 1), n + 1, device=pi.device)
    w = torch.empty_like(s)
    den = torch.empty_like(s)
    for j in range(steps):
        m = (draws - j).double()
        # Brewer: w_i ∝ s_i (L - s_i) / (L - m s_i); at the last draw (m = 1) this is s_i
        big = torch.where(m > 1, left, 2.0**60)
        torch.sub(big, s, out=w).mul_(s)
        torch.addcmul(big, s, m.clamp_min(1), value=-1, out=den)
        cdf = w.div_(den).cumsum_(1)
        point = (1 - u[:, j : j + 1]) * cdf[:, -1:]  # in (0, total]: lands on an item of positive weight
        pick = torch.where(m > 0, torch.searchsorted(cdf, point), dummy)
        taken.scatter_(1, pick, True)
        left -= s.gather(1, pick)
        s.scatter_(1, pick, 0.0)
    return _unsort(taken[:, 1 : n + 1], perm)


def _pareto(pi: Tensor, total: Tensor, u: Tensor) -> Tensor:
    """Rosén's Pareto order sampling: keep the ``c`` items of smallest rank key (sort, no sync)."""
    n = pi.shape[1]
    whole = total.unsqueeze(1).ceil()
    p = torch.cat([pi.double(), whole - total.unsqueeze(1)], dim=1)  # phantom last
    keys = (u * (1 - p)).div_((1 - u).mul_(p))
    keys.masked_fill_(p == 1, -1.0).masked_fill_(p == 0, float("inf"))
    order = keys.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n + 1, device=pi.device).expand_as(order))
    return (rank[:, :n] < whole).contiguous()


def _conditional_poisson(pi: Tensor, total: Tensor, u: Tensor) -> Tensor:
    n = pi.shape[1]
    ends, perm, c, b = layout(pi, total, torch.zeros_like(pi), 52)
    M = float(1 << b)
    q = torch.diff(ends, dim=1, prepend=torch.zeros_like(ends[:, :1])).double() / M  # phantom at 0, exact
    ones = q == 1
    size = c - ones.sum(1, keepdim=True)
    free = (q > 0) & ~ones
    theta = _cp.working_logits(torch.where(free, q, 0.5), free, size.squeeze(1))
    taken = _cp.sample(theta, size.squeeze(1), u) | ones
    return _unsort(taken[:, 1:], perm)


def _uniform_body(like: Tensor, rows: int, cols: int) -> Tensor:
    return torch.rand(rows, cols, dtype=torch.float64, device=like.device)


# The global RNG drawn inside an opaque op: compiled calls draw what eager calls draw after the
# same torch.manual_seed (inductor would otherwise replace torch.rand by its own generator).
_uniform_op = torch.library.custom_op(
    "khot::sampling_uniform", _uniform_body, mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
_uniform_op.register_fake(lambda like, rows, cols: like.new_empty((rows, cols), dtype=torch.float64))


def _uniform_vmap(info, in_dims, like: Tensor, rows: int, cols: int):
    if info.randomness == "error":
        raise RuntimeError(
            "khot::sampling_uniform (the samplers' random draws) under vmap: pass randomness='different' "
            "(independent samples per batch element) or 'same' to torch.vmap"
        )
    if info.randomness == "same":
        return _uniform_op(like, rows, cols), None
    return _uniform_op(like, info.batch_size * rows, cols).view(info.batch_size, rows, cols), 0


torch.library.register_vmap(_uniform_op, _uniform_vmap)


def uniforms(like: Tensor, rows: int, cols: int, generator: torch.Generator | None) -> Tensor:
    """(rows, cols) float64 uniforms in [0, 1) on ``like``'s device, from ``generator`` or the global RNG."""
    if generator is None:
        return _uniform_op(like, rows, cols)
    if torch.compiler.is_compiling():
        raise TypeError(
            "generator: torch.compile cannot trace a torch.Generator; under torch.compile pass "
            "generator=None and seed the global RNG (torch.manual_seed): compiled calls then draw what eager ones do"
        )
    return torch.rand(rows, cols, dtype=torch.float64, device=like.device, generator=generator)


def _ops_vmap(op):
    """Batch rule of a design op: the vmapped dimension joins the rows (every row is independent)."""

    def rule(info, in_dims, pi: Tensor, total: Tensor, u: Tensor):
        size = info.batch_size
        pi, total, u = (
            t.movedim(d, 0) if d is not None else t.expand(size, *t.shape) for t, d in zip((pi, total, u), in_dims)
        )
        out = op(pi.reshape(-1, pi.shape[-1]), total.reshape(-1), u.reshape(-1, u.shape[-1]))
        return out.view(size, -1, out.shape[-1]), 0

    torch.library.register_vmap(op, rule)
    return op


OPS = {
    name: _ops_vmap(custom_op(f"pips_{name}", fn, fake=_fake))
    for name, fn in {
        "systematic": _systematic,
        "brewer": _brewer,
        "pareto": _pareto,
        "conditional_poisson": _conditional_poisson,
    }.items()
}
