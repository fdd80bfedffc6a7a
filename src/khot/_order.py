"""Order-preserving integer keys: rank floats and integers by integer comparisons alone.

Used wherever a ranking must be exact and tie-aware without floating comparisons: the exact
top-k ops (both paths) and the sort of successive halving. Every function here is sync-free
(no ``.item()``, no ``bool(tensor)``), so it runs under ``torch.compile`` and on meta tensors.
"""

from __future__ import annotations

import torch

__all__ = ["_ordered", "_magnitude", "_rankable", "ranking_key", "WIDE_UNSIGNED"]

#: Unsigned integers that ATen's CPU max, topk, comparisons, gather and scatter do not take.
WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)

_ORDER_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _ordered(values: torch.Tensor, nan: bool = True) -> torch.Tensor:
    """Floats as integers of the same width, in the same order (an involution on the bits).

    ``-0.0`` and ``0.0`` map to the same integer (they tie). NaNs of either sign all map to the
    largest integer, so they rank above ``+inf`` and tie with each other (``nan=False``: the
    caller knows there are none, and saves that pass).

    >>> _ordered(torch.tensor([-1.0, -0.0, 0.0, 1.0, float("inf"), -float("nan")])).tolist()
    [-1065353217, 0, 0, 1065353216, 2139095040, 2147483647]
    """
    bits = (values + 0.0).view(_ORDER_INT[values.dtype])  # + 0.0 turns -0.0 into +0.0, so zeros tie
    sign = bits.element_size() * 8 - 1
    flip = bits >> sign  # all ones for negative values: flip their magnitude bits, in place
    flip &= (1 << sign) - 1
    bits ^= flip
    if nan:
        bits.masked_fill_(values.isnan(), torch.iinfo(bits.dtype).max)
    return bits


def _rankable(x: torch.Tensor) -> torch.Tensor:
    """``x``, or for the unsigned integers ATen's max and topk do not take (uint16, uint32, uint64) an
    int64 tensor in the same order (uint64: its bits with the top bit flipped).

    >>> _rankable(torch.tensor([2**63, 1, 2**64 - 1], dtype=torch.uint64)).argsort().tolist()
    [1, 0, 2]
    """
    if x.dtype == torch.uint64:
        return x.view(torch.int64) ^ torch.iinfo(torch.int64).min
    return x.long() if x.dtype in WIDE_UNSIGNED else x


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """A tensor that ranks like ``|x|`` (NaN stays NaN).

    Floats: ``|x|``. Narrow signed integers: ``|x|`` widened to int64 first. int64: ``|x| - 2**63``,
    computed without overflow (``|-2**63| = 2**63`` does not fit in int64), so ``-2**63`` ranks
    above every other value. Unsigned integers: ``x`` itself (as :func:`_rankable` ranks it).

    >>> _magnitude(torch.tensor([-2**63, 2**63 - 1, -5, 5, 0])).tolist()
    [0, -1, -9223372036854775803, -9223372036854775803, -9223372036854775808]
    """
    if x.is_floating_point():
        return x.abs()
    if not x.dtype.is_signed:
        return _rankable(x)
    if x.dtype != torch.int64:
        return x.long().abs()
    low = torch.iinfo(torch.int64).min
    # x >= 0: x + low; x < 0: low - x (= -x - 2**63); each branch on a clamp that cannot overflow
    return torch.where(x < 0, low - x.clamp(max=0), x.clamp(min=0) + low)


def ranking_key(x: torch.Tensor, largest: bool = True, magnitude: bool = False) -> torch.Tensor:
    """An integer tensor whose larger entries rank first, equal exactly where ``x``'s entries tie.

    The khot ranking rules: ``-0.0`` ties with ``0.0``, NaN ranks above ``+inf`` (so with
    ``largest=False`` it ranks last), ``magnitude=True`` ranks by ``|x|``. Integers keep their
    dtype, floats become integers of their width.

    >>> ranking_key(torch.tensor([2.0, float("nan"), -3.0]), largest=False).argsort(descending=True).tolist()
    [2, 0, 1]
    """
    key = _magnitude(x) if magnitude else _rankable(x)
    if key.is_floating_point():
        key = _ordered(key)
    return key if largest else torch.bitwise_not(key)
