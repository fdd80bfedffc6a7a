"""Successive halving top-k (Pietruszka, Borchmann and Graliński, 2020).

A soft tournament: each round sorts the candidates by score, pairs the i-th best
with the i-th worst and merges every pair into one candidate with the weights
``softmax([s_i, s_j] / temperature)``; the merged score is the same weighted mix
of the pair's scores.  The paper's "boosted softmax with base b" is
``b**s_i / (b**s_i + b**s_j)``, i.e. ``temperature = 1 / ln(b)``: base 20 is
temperature ``1/ln 20 ~= 0.334``, base 200 is ``~= 0.189``.  The weights depend only
on the score difference (``sigmoid((s_i - s_j) / temperature)``), so adding a
constant to all scores changes nothing.  The public reference code instead applies a
softmax to ``b**s`` (``softmax([b**s_i, b**s_j])``), which makes the split depend on the
absolute score level (base 20: a pair 0.9/0.8 splits 0.98/0.02, a pair 0.2/0.1 only
0.62/0.38); ``published_weights=True`` computes those weights, to reproduce the paper's numbers
(in log space where ``b**s`` would overflow: finite at any score level).

Any ``1 <= k <= n``.  A round on ``m`` candidates makes ``p = m - max(k, ceil(m/2))``
merges: the ``q = m - 2p`` best candidates pass through unchanged and the other
``2p`` are paired best-with-worst.  So ``m`` shrinks to ``max(k, ceil(m/2))`` and
exactly ``k`` candidates remain after ``ceil(log2(n/k))`` rounds.  When ``n/k`` is
a power of two every round has ``q = 0`` and this is the paper's Algorithm 2,
output for output.  In the sharp limit every merge keeps the better candidate,
so each round keeps exactly the current top ``max(k, ceil(m/2))``: the result
tends to the exact top-k, in descending score order.  With ``k == n`` there are no
rounds and the rows come sorted, best first.

Infinite scores are decided without arithmetic on the infinity, so values and
gradients stay finite: ``+inf`` beats every finite score and ``-inf`` (a masked item)
loses to every one; equal scores, infinite ones included, tie and split 1/2 each.
So a row with fewer than ``k`` finite (or ``+inf``) scores fills its remaining slots
with its ``-inf`` items as the tournament plays them: in index order (the sort is
stable), two of them paired in a round splitting 1/2 each.

By linearity every output row is a weighted sum of the input rows that ended in
its slot, with weights the products of the pair weights along each path.  Only
the scores go through the rounds (``O(n)`` per round); the rows are combined once
at the end.  The relaxed mask is exactly those weights: each lies in ``[0, 1]``
and each slot's weights sum to 1, so the mask sums to ``k``.  The pairing comes
from a sort and is not differentiated; the weights are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from khot._backend import apply
from khot._checks import _readable_cpu, check_flag
from khot._order import _ordered
from khot.relaxed._common import _check_mask_args, _check_select_args, _rowwise, _select_rows

__all__ = ["DEFAULT_TEMPERATURE", "halving_topk", "halving_select"]

#: Default sharpness: base ``e**200`` in the paper's terms; a pair whose scores differ by
#: 0.015 splits 0.95/0.05.  Chosen by ``benchmarks/halving_default.py``: of the temperatures
#: whose nCCS beats the public code's default (base 20, its own weights) on every cell of the
#: paper's grid (those <= 0.01), the one whose gradients train the feature-selection example
#: best (accuracy 0.769; 0.748 at 0.01, 0.691 at 0.002).  nCCS 0.984 / 0.952 / 0.985 / 0.999 /
#: 0.665 where the public code's default scores 0.955 / 0.851 / 0.955 / 0.986 / 0.437 (0.05:
#: 0.892 / 0.631 / 0.893 / 0.990 / 0.314).  Softer temperatures train that example better
#: (0.783 at 0.05, 0.843 at base 20): pass one where gradients matter more than the selection.
DEFAULT_TEMPERATURE = 0.005


def _sort_descending(s: Tensor) -> tuple[Tensor, Tensor]:
    """Stable descending sort of the rows of ``s (N, m)``: ``(values, order)``.

    On the CPU, float32 rows (``N * m >= 2**15``) are sorted as one flat int64 tensor of keys
    ``row << 32 | descending order bits of the score``, which PyTorch sorts by a parallel radix
    sort, about twice as fast as a float row sort there. Same result as
    ``s.sort(dim=-1, descending=True, stable=True)`` (``-0.0`` ties with ``0.0``, NaNs of either
    sign come first and tie with each other).
    """
    N, m = s.shape
    if s.device.type != "cpu" or s.dtype != torch.float32 or N * m < 2**15 or N >= 2**31:
        return s.sort(dim=-1, descending=True, stable=True)
    key = _ordered(s).to(torch.int64)  # increasing with the score; every NaN on top, as in sort
    key = key.neg_().add_(2**31 - 1 + (torch.arange(N, device=s.device).unsqueeze(-1) << 32))
    order = key.view(-1).sort(stable=True).indices.view(N, m)
    order = order.sub_(torch.arange(0, N * m, m, device=s.device).unsqueeze(-1))
    return s.gather(1, order), order


def _pair_weights(s_hi: Tensor, s_lo: Tensor, temperature, published: bool, all_finite: bool) -> tuple[Tensor, Tensor]:
    """Weights of each pair's better member and the merged scores, for ``s_hi >= s_lo``.

    The weight is ``sigmoid((s_hi - s_lo) / τ)``, or with ``published`` the public code's
    ``sigmoid(b**s_hi - b**s_lo)``, ``b = e**(1/τ)``, evaluated in log space (no overflow of
    ``b**s``). A pair with an infinite member is decided without arithmetic on the infinity (so
    gradients stay finite): equal infinities tie (1/2 each, the merged score that infinity), any
    other pair goes to the better member, whose score the merged one keeps. ``all_finite``: the
    caller knows every score is finite (the same result in a third of the ops).
    """
    if all_finite and not published:
        w_hi = torch.sigmoid((s_hi - s_lo) / temperature)
        return w_hi, torch.lerp(s_lo, s_hi, w_hi)  # exactly s_hi at w = 1, however far s_lo lies (a mask value)
    finite = s_hi.isfinite() & s_lo.isfinite()
    hi, lo = torch.where(finite, s_hi, 0), torch.where(finite, s_lo, 0)
    u = (hi - lo) / temperature  # >= 0
    if published:  # b**s_hi - b**s_lo = exp(a) expm1(u) with a = s_lo / τ, directly while that fits
        a = lo / temperature
        small = (a <= 40) & (u <= 40)
        direct = torch.exp(torch.where(small, a, 0)) * torch.expm1(torch.where(small, u, 0))
        u_pos = torch.where(small | (u <= 0), 1, u)
        # log(b**hi - b**lo) = hi / τ + log(-expm1(-u)), stable for u > 40; hi / τ directly, not a + u
        # (a mask at -1e9 beside a score cancelled there, and float32's min made it -inf + inf)
        log_gap = torch.where(small | (u <= 0), 0, hi / temperature) + torch.log(-torch.expm1(-u_pos))
        far = torch.where(u > 0, torch.exp(log_gap.clamp(max=50)), 0)  # sigmoid(e**50) is 1 in float64
        u = torch.where(small, direct, far)
    tie = torch.where(s_hi == s_lo, 0.5, 1.0).to(s_hi.dtype)
    w_hi = torch.where(finite, torch.sigmoid(u), tie)
    mixed = torch.where(finite, w_hi * hi + (1 - w_hi) * lo, s_hi)  # the published code's arithmetic
    return w_hi, mixed


def _spread(s: Tensor) -> Tensor:
    """``max(s) - min(s)`` in ``s``'s dtype: not finite where a score is ±inf or NaN, or where a
    pair's difference would overflow."""
    low, high = torch.aminmax(s)
    return high - low


def _tournament(s: Tensor, k: int, temperature: float | Tensor, published: bool = False) -> tuple[Tensor, Tensor]:
    """Play the tournament on ``s (N, n)``.

    Returns ``members`` (int64) and ``weights``, both ``(N, k, g)``: row ``j`` lists the
    inputs that ended in output slot ``j`` and their weights there.  Slots with fewer than
    ``g`` inputs (only when ``n / k`` is not a power of two) are padded with index ``-1``
    and weight 0.  The rounds carry only the scores; each records its sort order and pair
    weights, and the survivors are traced back through the rounds at the end.
    """
    N, n = s.shape
    rounds = []
    m = n
    # finite scores whose differences are finite stay so through the rounds (a merged score lies between
    # its pair's): a plain CPU call reads that once, the other paths decide per pair (no sync)
    all_finite = _readable_cpu(s) and bool(s.numel()) and math.isfinite(_spread(s.detach()))
    while m > k:
        p = m - max(k, (m + 1) // 2)  # merges this round
        q = m - 2 * p  # best candidates passing through
        # the first round's scores come in any order; later rounds' are nearly sorted already
        # (a merged pair mostly keeps its better member's place), which a row sort does fast
        s, order = _sort_descending(s) if m == n else s.sort(dim=-1, descending=True, stable=True)
        s_hi, s_lo = s.narrow(1, q, p), s.narrow(1, q + p, p).flip(-1)
        w_hi, mixed = _pair_weights(s_hi, s_lo, temperature, published, all_finite)
        s = torch.cat([s[:, :q], mixed], dim=1) if q else mixed
        rounds.append((order, w_hi, q, m))
        m -= p
    # survivor j of a round is sorted candidate j of the round before (the better of its pair,
    # or passed through when j < q), merged with sorted candidate m - 1 - (j - q) when j >= q.
    # Traced back as (N, g k): column block t holds every slot's t-th member, so a round appends
    # the partners as a new block (plain 2-D gathers and concatenations)
    # k == n: no rounds, the inputs best first (the sharp limit of every other k)
    members = torch.arange(k, device=s.device).expand(N, k) if rounds else _sort_descending(s)[1]
    weights = torch.ones(N, k, dtype=s.dtype, device=s.device)
    padded = False
    for order, w_hi, q, m in reversed(rounds):
        i = (members - q).clamp(min=0) if q or padded else members
        w_own = w_hi.gather(1, i)
        partner = torch.rsub(i, m - 1)  # m - 1 - i
        if q or padded:
            merged = members >= q  # padding (-1) is never merged
            w_own = torch.where(merged, w_own, members.ge(0).to(w_own.dtype))
            partner = torch.where(merged, partner, -1)
            padded = True
        position = torch.cat([members, partner], -1)
        kept = weights * w_own
        weights = torch.cat([kept, weights - kept], -1)
        if padded:
            members = torch.where(position >= 0, order.gather(1, position.clamp(min=0)), -1)
        else:
            members = order.gather(1, position)
    g = members.shape[1] // k
    return members.view(N, g, k).transpose(1, 2).contiguous(), weights.view(N, g, k).transpose(1, 2).contiguous()


def _input_positions(members: Tensor, n: int) -> Tensor:
    """``members (N, k, g)`` flattened to ``(N, k g)``, the padding (-1) sent to a spare column ``n``."""
    return torch.where(members >= 0, members, n).flatten(1)


def _by_input(at: Tensor, values: Tensor, n: int) -> Tensor:
    """Per-member ``values`` (``(N, k, g)`` or flattened) placed at their inputs ``at`` of
    :func:`_input_positions`: ``(N, n)``, zeros where nothing lands, the spare column dropped."""
    return values.new_zeros(at.shape[0], n + 1).scatter(1, at, values.flatten(1))[:, :n]


def halving_topk(
    scores: Tensor, k: int, dim: int = -1, *, temperature: float | Tensor = DEFAULT_TEMPERATURE, published_weights: bool = False
) -> Tensor:
    """Relaxed k-hot mask by successive halving.

    Entry ``i`` is the weight of input ``i`` in the output slot it ends in, so every
    value lies in ``[0, 1]`` and every slice along ``dim`` sums to ``k``.  As
    ``temperature -> 0`` the mask tends to the exact top-k mask.

    Args:
        scores: floating tensor of any shape; selection runs along ``dim``.
        k: number of slots, ``1 <= k <= scores.shape[dim]``.
        dim: the dimension to select along (negative counts from the end).
        temperature: pair softmax temperature, ``1 / ln(base)`` of the paper: a float or a
            one-element tensor (differentiable).
        published_weights: pair weights as the public code computes them (softmax of
            ``base**score``, level-dependent; see the module docstring), not by score difference.

    >>> s = torch.tensor([0.1, 0.9, 0.5, 0.3])
    >>> halving_topk(s, 2, temperature=0.1).round(decimals=2)
    tensor([0.0000, 1.0000, 0.8800, 0.1200])
    >>> halving_topk(s, 2, temperature=0.1).sum().item()
    2.0
    """
    dim, k, temperature = _check_mask_args(scores, k, dim, temperature)
    check_flag("published_weights", published_weights)

    def mask(s: Tensor) -> Tensor:
        members, weights = _tournament(s, k, temperature, published_weights)
        return _by_input(_input_positions(members, s.shape[1]), weights, s.shape[1])

    return _rowwise(mask, scores, dim)


def halving_select(
    x: Tensor, scores: Tensor, k: int, *, temperature: float | Tensor = DEFAULT_TEMPERATURE, published_weights: bool = False
) -> Tensor:
    """Soft-select ``k`` rows of ``x`` by successive halving on ``scores``.

    Args:
        x: rows, shape ``(..., n, d)``.
        scores: one score per row, shape ``(..., n)``.
        k: rows to return, ``1 <= k <= n``.
        temperature: pair softmax temperature, ``1 / ln(base)`` of the paper (a float or a one-element tensor).
        published_weights: pair weights as the public code computes them (see :func:`halving_topk`).

    Returns:
        ``(..., k, d)``: the tournament's ``k`` survivors, each a convex combination
        of input rows, in descending score order in the sharp limit (for ``k == n``
        the input rows sorted by score, best first).  Differentiable w.r.t. ``x``,
        ``scores`` and a tensor ``temperature``, twice too.  The
        rows are combined by ``embedding_bag`` (one weighted read of each input row);
        the backward gathers the output gradient back to the input rows (no atomics).

    >>> x = torch.eye(4)
    >>> s = torch.tensor([0.1, 0.9, 0.5, 0.3])
    >>> halving_select(x, s, 2, temperature=0.1).round(decimals=2)
    tensor([[0.0000, 1.0000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.8800, 0.1200]])
    """
    k, temperature = _check_select_args(x, scores, k, temperature)
    check_flag("published_weights", published_weights)

    def select(x: Tensor, s: Tensor) -> Tensor:
        members, weights = _tournament(s, k, temperature, published_weights)
        return apply(_PoolSlots, x, weights, members)

    return _select_rows(select, x, scores, k)


class _PoolSlots(torch.autograd.Function):
    """``out[b, j] = Σ_t weights[b, j, t] x[b, members[b, j, t]]`` for ``x (N, n, d)`` and the
    tournament's ``members``/``weights (N, k, g)`` (member ``-1``: padding, weight 0).

    Forward: ``embedding_bag``, one weighted read of each input row. Backward: every input row
    lies in exactly one slot, so one row gather of the output gradient back to input order gives
    both ``grad_x[b, i] = w_i g[b, slot(i)]`` and ``grad_w_i = <x[b, i], g[b, slot(i)]>``, with no
    scatter-add (``embedding_bag``'s own backward took three times its forward).
    """

    @staticmethod
    def forward(x: Tensor, weights: Tensor, members: Tensor) -> Tensor:
        N, n, d = x.shape
        k, g = members.shape[1:]
        # padding reads its slot's first member (always a real one) with weight 0: bags of equal size
        rows = torch.where(members >= 0, members, members[..., :1]) + n * torch.arange(N, device=x.device).view(N, 1, 1)
        rows, weights = rows.view(N * k, g), weights.reshape(N * k, g)
        return F.embedding_bag(rows, x.reshape(N * n, d), mode="sum", per_sample_weights=weights).view(N, k, d)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weights, members = inputs
        ctx.save_for_backward(x, weights, members)

    @staticmethod
    def vmap(info, in_dims, x: Tensor, weights: Tensor, members: Tensor):
        # the op is batched already: fold the vmapped dimension into its batch dimension
        def fold(t: Tensor, d: int | None) -> Tensor:
            t = t.expand(info.batch_size, *t.shape) if d is None else t.movedim(d, 0)
            return t.reshape(-1, *t.shape[2:])

        out = _PoolSlots.apply(*(fold(t, d) for t, d in zip((x, weights, members), in_dims)))
        return out.view(info.batch_size, -1, *out.shape[1:]), 0

    @staticmethod
    def backward(ctx, grad: Tensor):
        # made of differentiable ops, out of place: double backward is autograd's own
        x, weights, members = ctx.saved_tensors
        N, n, d = x.shape
        k, g = members.shape[1:]
        at = _input_positions(members, n)
        slot = torch.arange(k, device=x.device).repeat_interleave(g).expand(N, -1)
        slot_of = _by_input(at, slot, n) + k * torch.arange(N, device=x.device).unsqueeze(-1)
        gathered = grad.reshape(N * k, d).index_select(0, slot_of.flatten()).view(N, n, d)  # g[b, slot(i)]
        grad_weights = None
        if ctx.needs_input_grad[1]:
            per_row = F.pad(torch.einsum("bnd,bnd->bn", x, gathered), (0, 1))  # a bmm: no temporary; padding: 0
            grad_weights = per_row.gather(1, at).view_as(weights)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gathered * _by_input(at, weights, n).unsqueeze(-1)
        return grad_x, grad_weights, None
