"""The CPU path of the exact ops: tuned for CPU tensors, with data-dependent shortcuts.

How it is fast (:func:`_complete_topk`): slices too short for ATen's fast topk route
(``k + 1 > n / 64``) with ``k <= 4`` take ``k`` rounds of max (:func:`_by_rounds`). On slices
of at least 4096, the maxima of strided chunks take one vectorised reduction; the chunks whose
maximum reaches the k-th best chunk maximum provably hold the top k *and all its ties*, so
ranking just those candidates settles the selection (by value when the (k+1)-th ranks strictly
after the k-th, else by a tie-free (value, index) key). Shorter half-precision slices rank by a
32-bit (value, index) key. The output is written once, by a scatter into a fresh tensor. Other
slices (NaN, integer or float64 data, short float32 rows) use :func:`torch.topk` for ``k + 1``
(for ``k = n / 64``, where that leaves ATen's partial sort, for ``k`` and a count of the ties),
and :func:`_repair` settles ties at the k-th place exactly.
"""

from __future__ import annotations

import math

import torch

from .._order import _magnitude, _ordered, _rankable
from ._portable import best_first, positions

__all__ = ["topk_mask", "keep_topk", "select_topk"]

_HALF = (torch.float16, torch.bfloat16)

# Work on large inputs goes in blocks of about this many elements, so that scratch
# memory stays a small fraction of the input and in cache.
_BLOCK = 1 << 22
# Shorter slices are not chunked: the extra topk calls per slice cost more than chunking saves.
_MIN_CHUNKED = 4096


def _chunk_length(n: int, k: int) -> int:
    """Chunk length that balances the chunk-maxima selection against the candidate one.

    About ``sqrt(n / 2k)``, preferring a divisor of ``n`` (no ragged tail); 1 means "do not chunk".
    """
    ideal = math.isqrt(n // (2 * max(k, 1)))
    if ideal < 4 or n < _MIN_CHUNKED:
        return 1
    return next((m for m in range(ideal, (ideal + 1) // 2, -1) if n % m == 0), ideal)


def _chunk_leaders(key: torch.Tensor, m: int, dim: int, largest: bool) -> torch.Tensor:
    """The best element of each chunk of ``m``; chunk ``j`` holds elements ``j, j + c, j + 2c, ...``.

    Strided chunks make the leaders one vectorised reduction over an outer dimension.
    """
    chunks = key.shape[dim] // m
    blocks = key.narrow(dim, 0, chunks * m).unflatten(dim, (m, chunks))
    leaders = blocks.amax(dim) if largest else blocks.amin(dim)
    return leaders.float() if leaders.dtype in _HALF else leaders  # exact; ATen's topk is slow on halves


def _chunk_members(best: torch.Tensor, m: int, n: int, dim: int) -> torch.Tensor:
    """Positions of every element of the chunks ``best`` (plus the ragged tail) along ``dim``."""
    chunks = n // m
    trailing = (1,) * (best.dim() - dim - 1)
    offsets = torch.arange(0, chunks * m, chunks, device=best.device).view((m, 1) + trailing)
    index = (best.unsqueeze(dim) + offsets).flatten(dim, dim + 1)
    if chunks * m < n:  # the tail that fills no whole chunk is always a candidate
        shape = list(index.shape)
        shape[dim] = n - chunks * m
        tail = torch.arange(chunks * m, n, device=best.device).view((-1,) + trailing)
        index = torch.cat([index, tail.expand(shape)], dim)
    return index


def _block_spans(key: torch.Tensor, dim: int, size: int | None = None) -> tuple[int, list[tuple[int, int]]]:
    """``(batch, spans)``: ``(start, length)`` of blocks of about ``size`` elements (default
    ``_BLOCK``) cut along the largest batch dimension ``batch`` of ``key`` (never ``dim``)."""
    size = _BLOCK if size is None else size
    batch = max((d for d in range(key.dim()) if d != dim), key=lambda d: key.shape[d])
    step = max(1, size * key.shape[batch] // max(key.numel(), 1))
    return batch, [(start, min(step, key.shape[batch] - start)) for start in range(0, key.shape[batch], step)]


def _in_blocks(fn, key: torch.Tensor, dim: int, size: int | None = None, *aligned: torch.Tensor):
    """``fn(block, *aligned_blocks)`` over the blocks of :func:`_block_spans` (no data moves),
    concatenated; ``None`` if any block gives ``None``. ``aligned`` tensors (of ``key``'s rank,
    e.g. one value per slice) are cut alike.

    Blocks keep every scratch tensor small and in cache.
    """
    batch, spans = _block_spans(key, dim, size)
    parts = []
    for start, length in spans:
        part = fn(key.narrow(batch, start, length), *(t.narrow(batch, start, length) for t in aligned))
        if part is None:
            return None
        parts.append(part)
    return torch.cat(parts, batch)


def _topk_candidates(key: torch.Tensor, k: int, dim: int, largest: bool):
    """``torch.topk(key, k, dim, largest, sorted=True)`` by pruning to the best chunks.

    Exact for the values; among equal values any indices may be returned (callers
    repair ties). With ``largest=False`` a NaN hides a chunk's minimum, so slices
    with NaNs fall back to a plain :func:`torch.topk`.
    """
    n = key.shape[dim]
    m = _chunk_length(n, k)
    if m == 1:
        return torch.topk(key, k, dim, largest=largest, sorted=True)
    leaders = _chunk_leaders(key, m, dim, largest)
    if not largest and leaders.is_floating_point() and bool(leaders.isnan().any()):
        return torch.topk(key, k, dim, largest=largest, sorted=True)
    index = _chunk_members(_topk_candidates(leaders, k, dim, largest)[1], m, n, dim)
    candidates = key.gather(dim, index)
    if candidates.dtype in _HALF:  # exact, and ATen's topk is slow on halves
        candidates = candidates.float()
    values, pick = torch.topk(candidates, k, dim, largest=largest, sorted=True)
    return values.to(key.dtype), index.gather(dim, pick)


def _ranking_key(order: torch.Tensor, positions: torch.Tensor, n: int, largest: bool) -> torch.Tensor:
    """A tie-free key: the order integers of :func:`_ordered`, then the position in a slice of
    ``n`` (the lower index ranks first). int32 when 16 bits of order and of position suffice (ATen's
    topk is faster on it), else int64."""
    shift = 16 if order.dtype == torch.int16 and n <= 1 << 16 else 32
    key = order.to(torch.int32 if shift == 16 else torch.int64)
    key <<= shift
    key |= (((1 << shift) - 1 - positions) if largest else positions).to(key.dtype)
    return key


_TIE_EXACT_DTYPES = (torch.float32, *_HALF)
# Below this k, sorting the k + 1 selected values costs less than settling them unsorted.
_UNSORTED_FROM = 64


def _half_topk(key: torch.Tensor, k: int, dim: int, largest: bool, sorted: bool) -> torch.Tensor:
    """Exact top-k indices (tie rule included) of half-precision slices of at most 2**16:
    16 bits of order key and 16 bits of position make one tie-free int32 ranking key
    (integer topk is also faster than a floating one)."""
    n = key.shape[dim]
    positions = torch.arange(n, dtype=torch.int32, device=key.device).view((n,) + (1,) * (key.dim() - dim - 1))

    def block_topk(block):
        ranking = _ranking_key(_ordered(block, nan=bool(block.sum().isnan())), positions, n, largest)
        return torch.topk(ranking, k, dim, largest=largest, sorted=sorted).indices

    return _in_blocks(block_topk, key, dim, _BLOCK // 4)  # an int32 key per element: smaller blocks


# ATen's CPU topk of k sorts partially while k <= n / 64, and takes a route several times slower
# past it (rows of 64, k = 2: 2.8 ms vs 0.45 ms for a max over 4096 rows).
_TOPK_FAST_RATIO = 64
# Up to this k, slices too short for that route take k rounds of max instead (each about as dear
# as a topk within it).
_ROUNDS = 4


def _by_rounds(key: torch.Tensor, k: int, dim: int, largest: bool) -> torch.Tensor | None:
    """Indices of the exact top-k, best first, by ``k`` rounds of max (min): each takes the first
    best entry (the lowest index among ties, as ATen's max and min do) and overwrites it with the
    worst value of the dtype. ``None`` when a NaN or that worst value itself is taken (a taken
    entry and a real one could then tie)."""
    if key.is_floating_point():
        worst = -math.inf if largest else math.inf
    else:
        worst = torch.iinfo(key.dtype).min if largest else torch.iinfo(key.dtype).max
    work = key.clone()
    values, index = [], []
    for _ in range(k):
        value, at = work.max(dim, keepdim=True) if largest else work.min(dim, keepdim=True)
        work.scatter_(dim, at, worst)
        values.append(value)
        index.append(at)
    values = torch.cat(values, dim)
    doubtful = values == worst
    if values.is_floating_point():
        doubtful |= values.isnan()
    return None if bool(doubtful.any()) else torch.cat(index, dim)


def _complete_topk(key: torch.Tensor, k: int, dim: int, largest: bool, sorted: bool) -> torch.Tensor | None:
    """Indices of the exact top-k (tie rule included) of long NaN-free float rows, or ``None``.
    ``sorted=False``: in any order.

    Let ``b`` be the k-th best chunk leader. At least k elements reach ``b``, so every
    element that reaches the k-th best value lies in a chunk whose leader reaches ``b``:
    the chunks whose leaders reach ``b`` hold all of the top k *and all of its ties*.
    A tie-free :func:`_ranking_key` over just those candidates then settles the order.
    """
    n = key.shape[dim]
    if 0 < k <= _ROUNDS and (k + 1) * _TOPK_FAST_RATIO > n:
        best = _by_rounds(key, k, dim, largest)
        if best is not None:
            return best
    m = _chunk_length(n, k)
    if k == 0 or key.dtype not in _TIE_EXACT_DTYPES:
        return None
    if m == 1:
        return _half_topk(key, k, dim, largest, sorted) if key.dtype in _HALF and n <= 1 << 16 else None
    return _in_blocks(lambda block: _complete_block(block, k, m, dim, largest, sorted), key, dim)


def _complete_block(key: torch.Tensor, k: int, m: int, dim: int, largest: bool, sorted: bool) -> torch.Tensor | None:
    n = key.shape[dim]
    leaders = _chunk_leaders(key, m, dim, largest)
    spare = k + max(1, k // 4)  # room for leaders that tie with the k-th; there are n // m >= 8k leaders
    top, best, kth, last = _best_with_spare(leaders, k, spare, dim, largest)
    # a leader is NaN exactly when its chunk holds a NaN; a largest-first topk takes NaNs first
    if bool((top if largest else leaders).isnan().any()):
        return None
    if bool(_before(kth, last, largest).all()):  # the chunks reaching the k-th leader are among the spare
        reaching = int(_count(top >= kth if largest else top <= kth, dim).max())
        best = best.gather(dim, torch.topk(top, reaching, dim, largest=largest, sorted=False).indices)
    else:  # leaders tied with the k-th may go on past the spare
        reaching = int(_count(leaders >= kth if largest else leaders <= kth, dim).max())
        best = torch.topk(leaders, reaching, dim, largest=largest, sorted=False).indices
    index = _chunk_members(best, m, n, dim)
    order = _ordered(key.gather(dim, index), nan=False)
    if not sorted and key.dtype not in _HALF:  # float32 rarely ties at the k-th candidate: settle without a key
        top, pick, _, settled, _ = _best_and_next(order, k, dim, largest)
        if bool(settled.all()):
            return index.gather(dim, pick.gather(dim, torch.topk(top, k, dim, largest=largest, sorted=False).indices))
    ranking = _ranking_key(order, index, n, largest)
    return index.gather(dim, torch.topk(ranking, k, dim, largest=largest, sorted=sorted).indices)


def _best_and_next(values: torch.Tensor, k: int, dim: int, largest: bool):
    """The best ``k + 1`` of every slice in any order, ``(top, index, last, settled, nan)``: ``last``
    is the (k+1)-th (kept as a dimension of size 1; NaN ranks as in topk), ``settled`` says per
    slice whether it ranks strictly after the k-th, so that the best ``k`` are all the others
    (otherwise the k-th ties with it), and ``nan`` whether ``top`` holds a NaN."""
    top, index = torch.topk(values, k + 1, dim, largest=largest, sorted=False)
    nan = top.is_floating_point() and bool(top.isnan().any())
    if nan:
        last = torch.topk(top, 1, dim, largest=not largest).values
    else:  # a reduction: much cheaper than a topk over many short rows
        last = top.amin(dim, keepdim=True) if largest else top.amax(dim, keepdim=True)
    return top, index, last, _count(_tied(top, last, nan), dim) == 1, nan


def _best_with_spare(values: torch.Tensor, k: int, spare: int, dim: int, largest: bool):
    """The best ``spare > k`` of every slice in any order, ``(top, index, kth, last)``: ``kth`` is the
    k-th best and ``last`` the spare-th (both kept as a dimension of size 1; NaN ranks as in topk).
    Where ``kth`` ranks strictly before ``last``, the k-th best and all its ties are among the spare."""
    top, index = torch.topk(values, spare, dim, largest=largest, sorted=False)
    tail = torch.topk(top, spare - k + 1, dim, largest=not largest, sorted=True).values  # spare-th ... k-th
    return top, index, tail.narrow(dim, spare - k, 1), tail.narrow(dim, 0, 1)


def _count(mask: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """The True entries of ``mask`` along ``dim``, as int32 (a plain bool sum over many short rows
    was ten times slower on the CPU: 20 ms vs 2 ms for 16384 x 256)."""
    return mask.sum(dim, keepdim=keepdim, dtype=torch.int32)


def _before(a: torch.Tensor, b: torch.Tensor, largest: bool, nan: bool = True) -> torch.Tensor:
    """Whether ``a`` ranks strictly before ``b`` (elementwise; NaN ranks above everything;
    skip those tests when ``nan=False``)."""
    if not nan:
        return a > b if largest else a < b
    if largest:
        return (a > b) | (a.isnan() & ~b.isnan())
    return (a < b) | (~a.isnan() & b.isnan())


def _tied(a: torch.Tensor, b: torch.Tensor, nan: bool = True) -> torch.Tensor:
    """Whether ``a`` and ``b`` rank equal (NaN ties with NaN; skip that test when ``nan=False``)."""
    return (a == b) | (a.isnan() & b.isnan()) if nan else a == b


def _kth(values: torch.Tensor, k, dim: int) -> torch.Tensor:
    """The ``k``-th entry (1-based, clamped into range) of sorted ``values`` along ``dim``."""
    last = values.shape[dim] - 1
    if isinstance(k, int):
        return values.narrow(dim, min(max(k - 1, 0), last), 1)
    return values.gather(dim, (k - 1).clamp(0, last).unsqueeze(dim))


class _Selection:
    """The top-k of every slice of ``key`` along ``dim``, before it is written out.

    ``index`` holds candidate indices (the exact best ``max(k)``, or the best ``max(k) + 1``
    in some order) and ``take`` says which of them are selected (``None``: all). A slice is ``dirty``
    when its k-th and (k+1)-th candidates tie (or a NaN makes it unclear): it then
    takes only the candidates ranked strictly before its ``threshold`` (all of them
    are candidates), and :func:`_repair` adds the ``missing`` lowest-index ties.
    """

    def __init__(self, key: torch.Tensor, k, dim: int, largest: bool):
        n = key.shape[dim]
        kmax = k if isinstance(k, int) else int(k.max())
        shape = [1] * key.dim()
        exact = _complete_topk(key, kmax, dim, largest, sorted=not isinstance(k, int))  # per-slice k takes a prefix
        if exact is not None:
            self.index, self.dirty = exact, None
            shape[dim] = kmax
            ranks = torch.arange(kmax, device=key.device).view(shape)
            self.take = None if isinstance(k, int) else ranks < k.unsqueeze(dim)
            return
        self.key = key  # what the slices are ranked by, for _repair
        if isinstance(k, int) and _UNSORTED_FROM <= k < n and _chunk_length(n, k + 1) == 1:
            self._unsorted(key, k, dim, largest)
            return
        width = min(kmax + 1, n)
        # ATen's CPU topk sorts partially while k <= n / 64 and takes a much slower route past it:
        # there take just the top k, and count the elements reaching the k-th instead of a (k+1)-th
        cliff = isinstance(k, int) and 0 < k * _TOPK_FAST_RATIO <= n < width * _TOPK_FAST_RATIO
        values, self.index = _topk_candidates(key, k if cliff else width, dim, largest)
        self.threshold = _kth(values, k, dim)
        if cliff:
            nan = values.is_floating_point() and bool(values.isnan().any())

            def reaching(block, t):  # in blocks: no mask of the input's size
                hit = (_before(block, t, largest) | _tied(block, t)) if nan else (block >= t if largest else block <= t)
                return _count(hit, dim, keepdim=True)

            settled = (_in_blocks(reaching, key, dim, None, self.threshold) == k).squeeze(dim)
        else:
            settled = _before(self.threshold, _kth(values, k + 1, dim), largest).squeeze(dim) | (k == 0) | (k == n)
        self.dirty = None if bool(settled.all()) else ~settled
        if isinstance(k, int) and self.dirty is None:
            self.index, self.take = self.index.narrow(dim, 0, k), None
            return
        shape[dim] = values.shape[dim]
        ranks = torch.arange(values.shape[dim], device=key.device).view(shape)
        self.take = ranks < (k if isinstance(k, int) else k.unsqueeze(dim))
        if self.dirty is not None:
            self.take = self.take & (_before(values, self.threshold, largest) | ~self.dirty.unsqueeze(dim))
            self.missing = torch.where(self.dirty, k - _count(self.take, dim), 0)

    def _unsorted(self, key: torch.Tensor, k: int, dim: int, largest: bool):
        """Short slices: an unsorted top-(k+1), about twice as cheap as a sorted one; a settled
        slice takes all of it but the (k+1)-th, a dirty one (whose k-th ties with the (k+1)-th)
        those ranked before its ``threshold``, the k-th."""
        values, self.index, self.threshold, settled, nan = _best_and_next(key, k, dim, largest)
        self.take = _before(values, self.threshold, largest, nan)
        self.dirty = None if bool(settled.all()) else ~settled
        if self.dirty is not None:
            self.missing = torch.where(self.dirty, k - _count(self.take, dim), 0)

    def scatter(self, out: torch.Tensor, dim: int, src) -> torch.Tensor:
        """Write ``src`` (a scalar or values aligned with ``index``) to the selected places of ``out``, in place."""
        if not isinstance(src, torch.Tensor):
            src = torch.full(self.index.shape, src, dtype=out.dtype, device=out.device)
        if self.take is not None:
            src = torch.where(self.take, src, torch.zeros((), dtype=src.dtype, device=src.device))
        return out.scatter_(dim, self.index, src)


def _repair(out, x, sel: _Selection, dim: int, keep_values: bool):
    """Select, in every dirty slice, its ``missing`` lowest-index elements tied with the threshold.

    Works through blocks of the largest batch dimension so that the scratch mask stays
    small; ``nonzero`` lists the ties of each slice in increasing index order (ties in
    settled slices are listed too, and dropped: their ``missing`` is 0).
    """
    key_m, t_m, out_m, x_m = (a.movedim(dim, -1) for a in (sel.key, sel.threshold, out, x))
    nan = bool(t_m.isnan().any())
    axis, spans = _block_spans(key_m, key_m.dim() - 1)
    for start, length in spans:
        missing = sel.missing.narrow(axis, start, length)
        if not bool(missing.any()):
            continue
        where = _tied(key_m.narrow(axis, start, length), t_m.narrow(axis, start, length), nan).nonzero()
        slices = where[:, :-1]
        first = torch.ones(len(where), dtype=torch.bool, device=where.device)
        first[1:] = (slices[1:] != slices[:-1]).any(-1)
        order = torch.arange(len(where), device=where.device)
        rank = order - torch.where(first, order, 0).cummax(0).values  # position among its slice's ties
        chosen = where[rank < missing[tuple(slices.T)]].T.clone()
        chosen[axis] += start
        out_m[tuple(chosen)] = x_m[tuple(chosen)] if keep_values else True
    return out


def _mask(x, k, dim: int, largest: bool, magnitude: bool, keep_values: bool):
    """The exact k-hot mask of ``x`` (``keep_values=False``) or ``x`` zeroed outside it;
    ``k`` an int or an int64 tensor of per-slice counts."""
    if x.numel() == 0 or (isinstance(k, int) and k == x.shape[dim]):
        return x.clone() if keep_values else torch.ones(x.shape, dtype=torch.bool, device=x.device)
    key = _magnitude(x) if magnitude else _rankable(x)
    return _write(_Selection(key, k, dim, largest), x, dim, keep_values)


def _write(sel: _Selection, x, dim: int, keep_values: bool) -> torch.Tensor:
    """The selection as a bool mask shaped like ``x``, or as ``x`` zeroed outside it."""
    if keep_values:
        out = sel.scatter(torch.zeros_like(x), dim, x.gather(dim, sel.index))
    else:
        out = sel.scatter(torch.zeros(x.shape, dtype=torch.bool, device=x.device), dim, True)
    return out if sel.dirty is None else _repair(out, x, sel, dim, keep_values)




def _rows(x: torch.Tensor, dim: int):
    """``x`` with at least one batch dimension (the selection cuts blocks along one), and ``dim`` in it."""
    while x.dim() < 2:
        x, dim = x.unsqueeze(0), dim + 1
    return x, dim


def topk_mask(x: torch.Tensor, k: int, ks: torch.Tensor | None, dim: int, largest: bool, magnitude: bool) -> torch.Tensor:
    """The CPU kernel of op ``khot::topk_mask`` (same signature and result as the portable path)."""
    rows, d = _rows(x, dim)
    return _mask(rows, k if ks is None else ks.reshape(rows.shape[:d] + rows.shape[d + 1 :]), d, largest, magnitude, False).view(x.shape).contiguous()


def keep_topk(x: torch.Tensor, k: int, ks: torch.Tensor | None, dim: int, largest: bool, magnitude: bool) -> torch.Tensor:
    """The CPU kernel of op ``khot::keep_topk``."""
    rows, d = _rows(x, dim)
    return _mask(rows, k if ks is None else ks.reshape(rows.shape[:d] + rows.shape[d + 1 :]), d, largest, magnitude, True).view(x.shape).contiguous()


def select_topk(scores: torch.Tensor, k: int, sorted: bool) -> torch.Tensor:
    """The CPU kernel of op ``khot::select_topk``: indices ``(..., k)`` of the top ``k`` of every row.

    Straight from the candidates when they settle every row (no tensor of the size of
    ``scores`` is built); otherwise read off the exact mask of the same selection.
    """
    rows, dim = _rows(scores, scores.dim() - 1)
    if not rows.numel():
        indices = torch.zeros(rows.shape[:-1] + (k,), dtype=torch.long, device=rows.device)
    else:
        sel = _Selection(rows, k, dim, True)
        if sel.dirty is None and sel.take is None:
            indices = sel.index.sort(-1).values
        else:
            indices = positions(_write(sel, rows, dim, keep_values=False), k)
    indices = indices.view(scores.shape[:-1] + (k,))
    return best_first(scores, indices) if sorted else indices
