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

__all__ = ["OPS", "lengths", "uniforms"]


def _fake(pi: Tensor, total: Tensor, u: Tensor) -> Tensor:
    return torch.empty_like(pi, dtype=torch.bool)


def _pin(size: Tensor, M, deficit: Tensor) -> Tensor:
    """The correction of :func:`lengths` to ``size`` (rows, m) so that it gains ``deficit`` (rows, 1)
    units: a shortfall fills the slack of the first fractional items, an excess truncates the
    last ones."""
    fractional = (size > 0) & (size < M)
    slack = torch.where(fractional, M - size, 0)
    fill = (deficit.clamp_min(0) - (slack.cumsum(1) - slack)).clamp_min(0)
    room = torch.where(fractional, size, 0)
    later = room.flip(1).cumsum(1).flip(1) - room
    cut = ((-deficit).clamp_min(0) - later).clamp_min(0)
    return torch.minimum(fill, slack) - torch.minimum(cut, room)


def lengths(pi: Tensor, total: Tensor, bits: int) -> tuple[Tensor, Tensor, int]:
    """Integer lengths of the items, in units of ``1 / M``, ``M = 2**b``,
    ``b = min(52, bits - bit_length(n + 1))``, pinned to the sample size ``total``.

    ``pi`` is rounded down to a multiple of ``1 / M``; then the real items are made to cover
    exactly ``round(total * M)``: a shortfall fills the slack of the first fractional items
    (up to ``M`` each), an excess truncates the last ones; items with ``pi`` exactly 0 or 1
    keep 0 or ``M``. Returns ``(lengths, c, b)``: ``lengths`` (rows, n + 1) int64 with column
    0 a phantom item of length ``c * M - round(total * M)``, so each row sums to ``c * M``,
    ``c`` (rows, 1) the sample size counting the phantom, ``ceil(total)``. No sort: O(n).
    """
    rows, n = pi.shape
    b = min(52, bits - (n + 1).bit_length())
    M = 1 << b
    size = pi.double().mul(M).long()  # truncates
    whole = total.unsqueeze(1).floor()
    target = whole.long() * M + ((total.unsqueeze(1) - whole) * M).round().long()  # exact for the integer part
    c = (target + (M - 1)) >> b
    size += _pin(size, M, target - size.sum(1, keepdim=True))
    return torch.cat([c * M - target, size], dim=1), c, b


_WINDOW = 32


def lengths_float(pi: Tensor, total: Tensor) -> tuple[Tensor, Tensor, float]:
    """:func:`lengths` with ``bits = 52`` held in float64 (every length, sum of lengths and
    difference of them is an integer below ``2**53``: exact), for Brewer's method and conditional
    Poisson: ``(lengths, c, M)``, all float64. The same values as :func:`lengths`, faster: the
    correction usually touches only a few items at either end, so it is made on the first or last
    ``_WINDOW`` items when their slack or room suffices (a data-dependent choice, which those
    designs' loops make anyway), on all of them otherwise."""
    rows, n = pi.shape
    M = float(1 << (52 - (n + 1).bit_length()))
    size = pi.to(torch.float64, copy=True).mul_(M).floor_()  # a copy: pi may be a view, even expanded
    t = total.unsqueeze(1)
    whole = t.floor()
    target = whole * M + ((t - whole) * M).round()
    c = (target / M).ceil_()
    deficit = target - size.sum(1, keepdim=True)
    w = min(n, _WINDOW)
    head, tail = size[:, :w], size[:, n - w :]
    enough = (deficit <= torch.where((head > 0) & (head < M), M - head, 0).sum(1, keepdim=True)) & (
        -deficit <= torch.where((tail > 0) & (tail < M), tail, 0).sum(1, keepdim=True)
    )
    if w == n or not bool(enough.all()):
        size += _pin(size, M, deficit)
    else:
        head += _pin(head, M, deficit.clamp_min(0))
        tail += _pin(tail, M, deficit.clamp_max(0))
    return torch.cat([c * M - target, size], dim=1), c, M


def _systematic(pi: Tensor, total: Tensor, u: Tensor) -> Tensor:
    """Systematic sampling in a random order (the argsort of ``u``'s first n columns)."""
    n = pi.shape[1]
    size, _, b = lengths(pi, total, 62)
    M = 1 << b
    perm = u[:, :n].argsort(dim=1)
    ends = torch.cat([size[:, :1], size[:, 1:].gather(1, perm)], dim=1).cumsum_(1)
    start = (u[:, n:] * M).long()  # uniform on {0, ..., M - 1}
    hits = ends.add_(M - 1 - start).bitwise_right_shift_(b)  # number of points start + j M below each end
    return torch.zeros(pi.shape, dtype=torch.bool, device=pi.device).scatter_(1, perm, hits[:, 1:] > hits[:, :-1])


def _brewer(pi: Tensor, total: Tensor, u: Tensor) -> Tensor:
    """Brewer's draw-by-draw method on integer lengths held exactly in float64.

    With ``b = 52 - bit_length(n + 1)`` every length, every sum of lengths and every
    ``L - m * s`` below is an integer under ``2**53``: float64 holds them exactly, so the
    weights' signs and zeros are exact. A drawn item's length is set to 0, which makes its
    weight 0; finished rows draw a dummy column.
    """
    rows, n = pi.shape
    size, c, M = lengths_float(pi, total)
    s = torch.cat([size, torch.zeros(rows, 1, dtype=torch.float64, device=pi.device)], dim=1)  # dummy last
    ones = s == M
    taken = ones.clone()
    s.masked_fill_(ones, 0.0)
    left = s.sum(1, keepdim=True)  # the length still to cover: (draws still to make) * M
    draws = (c - ones.sum(1, keepdim=True)).long()
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
    return taken[:, 1 : n + 1].contiguous()


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
    size, c, M = lengths_float(pi, total)
    q = size / M  # phantom at 0; exact
    ones = q == 1
    draws = c.squeeze(1).long() - ones.sum(1)
    free = (q > 0) & ~ones
    # a row drawing more than half its free items samples the items it leaves out instead: the
    # complement of a conditional Poisson sample is one (weights 1 / w, size n_free - k), with
    # inclusion probabilities 1 - pi; the tables then need min(k, n_free - k) + 1 rows
    flip = (2 * draws > free.sum(1)).unsqueeze(1)
    q = torch.where(flip, 1 - q, q)
    draws = torch.where(flip.squeeze(1), free.sum(1) - draws, draws)
    theta = _cp.working_logits(torch.where(free, q, 0.5), free, draws)
    drawn = _cp.sample(theta, draws, u)
    return (torch.where(flip, free & ~drawn, drawn) | ones)[:, 1:].contiguous()


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
