"""Triton kernels of the exact ops: the top-k mask of every row by a radix threshold search.

Every element gets an unsigned integer key of the input's width (8, 16, 32 or 64 bits) that
orders like the values under khot's rules (NaN above ``+inf``, ``-0.0`` tied with ``+0.0``,
``|x|`` for ``magnitude``; complemented for ``largest=False``), so the top k are the k largest
keys. The k-th largest key ``T`` is found one 8-bit digit at a time, most significant first: a
256-bin histogram of the digit among the elements that match the digits found so far says
which digit holds the k-th, and how many of the k lie above it. Then one pass writes the mask:
every key above ``T``, and the ``need = k - #(key > T)`` lowest-index keys equal to ``T``
(a running count of the ties), so ties go to the lower index exactly as on the CPU.

Rows of up to ``ON_CHIP`` elements take one program each: the row is read once and stays in
registers for all the digits. Longer rows are cut into chunks of ``CHUNK`` elements, one
program each: one histogram pass per digit (atomically added into a ``(rows, digits, 256)``
int32 table; every program re-derives the digits found so far from that table), one pass that
counts each chunk's ties with ``T``, and one that writes the output (each chunk starts its tie
count where the chunks before it ended). Keys live in registers only; no tensor of the input's
size other than the output is allocated.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..exact import _portable

__all__ = ["topk_mask", "keep_topk", "select_topk"]

# Rows up to this long take one program each (tests shrink both to force the split).
ON_CHIP = 8192
CHUNK = 4096

# dtype -> (key width in bits, kind): 0 floating point, 1 signed integer, 2 unsigned integer, 3 bfloat16
_KEYS = {
    torch.float16: (16, 0),
    torch.bfloat16: (16, 3),
    torch.float32: (32, 0),
    torch.float64: (64, 0),
    torch.int8: (8, 1),
    torch.int16: (16, 1),
    torch.int32: (32, 1),
    torch.int64: (64, 1),
    torch.uint8: (8, 2),
}


@triton.jit
def _keys(x, BITS: tl.constexpr, KIND: tl.constexpr, LARGEST: tl.constexpr, MAGNITUDE: tl.constexpr):
    """Unsigned keys (uint32, or uint64 for 64-bit inputs) below ``2**BITS``: larger ranks first."""
    if BITS == 64:
        wide = tl.int64
        unsigned = tl.uint64
    else:
        wide = tl.int32
        unsigned = tl.uint32
    top = (1 << (BITS - 1)) - 1  # the largest signed key
    if KIND == 0 or KIND == 3:
        if MAGNITUDE:
            x = tl.abs(x.to(tl.float32)) if KIND == 3 else tl.abs(x)
        # tests of bfloat16 go through float32 (exact): the interpreter compares its raw bits
        xf = x.to(tl.float32) if KIND == 3 else x
        if KIND == 3:  # the top half of its float32
            bits = xf.to(tl.int32, bitcast=True) >> 16
        elif BITS == 16:
            bits = x.to(tl.int16, bitcast=True).to(wide)
        elif BITS == 32:
            bits = x.to(tl.int32, bitcast=True)
        else:
            bits = x.to(tl.int64, bitcast=True)
        bits = tl.where(xf == 0, 0, bits)  # -0.0 ties with +0.0
        signed = bits ^ ((bits >> (BITS - 1)) & top)  # negative values: flip the magnitude bits
        signed = tl.where(xf != xf, top, signed)  # every NaN ranks above +inf
        key = (signed ^ (top + 1)).to(unsigned, bitcast=True)  # shift the signed range up by 2**(BITS-1)
    elif KIND == 1:
        v = x.to(wide)
        if MAGNITUDE:  # |x| as unsigned: exact even for the minimum (-v wraps to it, read as 2**(BITS-1))
            key = tl.where(v < 0, -v, v).to(unsigned, bitcast=True)
        else:
            key = (v ^ (top + 1)).to(unsigned, bitcast=True)
    else:
        key = x.to(unsigned)
    if BITS < 32:
        key = key & ((1 << BITS) - 1)
    if not LARGEST:
        if BITS == 64:
            key = ~key
        else:
            key = key ^ ((1 << BITS) - 1)
    return key


@triton.jit
def _pick(hist, need):
    """From the 256-bin histogram of one digit, the digit of the ``need``-th largest key and how
    many of the ``need`` remain at that digit (the others lie in higher digits)."""
    bins = tl.arange(0, 256)
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys whose digit is >= each bin
    digit = tl.sum((at_least >= need).to(tl.int32), 0) - 1
    return digit, need - tl.sum(tl.where(bins > digit, hist, 0), 0)


@triton.jit
def _digit(key, SHIFT: tl.constexpr):
    """The 8-bit digit of ``key`` at bit ``SHIFT``, as int32."""
    return ((key >> SHIFT) & 255).to(tl.int32)


@triton.jit
def _matches(key, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """Whether ``key`` has the digits of ``prefix`` above bit ``SHIFT + 8``."""
    if SHIFT + 8 >= BITS:
        same = key == key
    else:
        same = (key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8))
    return same


@triton.jit
def _write(x, key, cols, valid, threshold, need, ties_before, taken_before, out_ptr, col_stride, K, OUT: tl.constexpr):
    """Store one block of the output: keys above ``threshold``, and keys tied with it while
    fewer than ``need`` are taken (``ties_before`` were met in earlier chunks). ``OUT``: 0 the
    bool mask, 1 ``x`` zeroed outside it, 2 the indices of the taken keys in increasing order
    (``taken_before`` were taken in earlier chunks; ``out_ptr`` is the row's first slot)."""
    tie = (key == threshold) & valid
    take = (key > threshold) & valid | (tie & (ties_before + tl.cumsum(tie.to(tl.int32), 0) <= need))
    if OUT == 0:
        tl.store(out_ptr + cols.to(tl.int64) * col_stride, take.to(tl.int8), mask=valid)
    elif OUT == 1:
        tl.store(out_ptr + cols.to(tl.int64) * col_stride, tl.where(take, x, tl.zeros_like(x)), mask=valid)
    else:
        slot = taken_before + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(out_ptr + slot, cols.to(tl.int64), mask=take & (slot < K))


@triton.jit
def _row_start(x_ptr, ks_ptr, out_ptr, k, n, inner, sx_outer, sx_col, sx_inner, HAS_KS: tl.constexpr, OUT: tl.constexpr):
    """This program's row: where its input and output start, its output column stride, its k."""
    row = tl.program_id(0).to(tl.int64)
    outer, i = row // inner, row % inner
    x_row = x_ptr + outer * sx_outer + i * sx_inner
    if OUT == 2:
        out_row, col_stride = out_ptr + row * k, 1
    else:
        out_row, col_stride = out_ptr + outer * n * inner + i, inner
    if HAS_KS:
        need = tl.load(ks_ptr + row).to(tl.int32)
    else:
        need = k
    return row, x_row, out_row, col_stride, need


@triton.jit
def _row_kernel(
    x_ptr, ks_ptr, out_ptr, k, n, inner, sx_outer, sx_col, sx_inner,
    BLOCK: tl.constexpr, BITS: tl.constexpr, KIND: tl.constexpr, LARGEST: tl.constexpr,
    MAGNITUDE: tl.constexpr, HAS_KS: tl.constexpr, OUT: tl.constexpr,
):  # fmt: skip
    """One row per program, held in registers for every digit."""
    row, x_row, out_row, col_stride, need = _row_start(x_ptr, ks_ptr, out_ptr, k, n, inner, sx_outer, sx_col, sx_inner, HAS_KS, OUT)
    cols = tl.arange(0, BLOCK)
    valid = cols < n
    x = tl.load(x_row + cols.to(tl.int64) * sx_col, mask=valid)
    key = _keys(x, BITS, KIND, LARGEST, MAGNITUDE)
    prefix = tl.zeros((), dtype=key.dtype)
    for p in tl.static_range(BITS // 8):
        here = valid & _matches(key, prefix, BITS - 8 * (p + 1), BITS)
        digit, need = _pick(tl.histogram(_digit(key, BITS - 8 * (p + 1)), 256, mask=here), need)
        prefix = prefix | (digit.to(prefix.dtype) << (BITS - 8 * (p + 1)))
    _write(x, key, cols, valid, prefix, need, 0, 0, out_row, col_stride, k, OUT)


@triton.jit
def _threshold(hist_ptr, row, need, DIGITS: tl.constexpr, BITS: tl.constexpr):
    """The key prefix found by the first ``DIGITS`` histograms of ``row``, and the ``need`` left."""
    if BITS == 64:
        prefix = tl.zeros((), dtype=tl.uint64)
    else:
        prefix = tl.zeros((), dtype=tl.uint32)
    for p in tl.static_range(DIGITS):
        digit, need = _pick(tl.load(hist_ptr + (row * (BITS // 8) + p) * 256 + tl.arange(0, 256)), need)
        prefix = prefix | (digit.to(prefix.dtype) << (BITS - 8 * (p + 1)))
    return prefix, need


@triton.jit
def _chunk_pass(
    x_ptr, ks_ptr, out_ptr, hist_ptr, counts_ptr, k, n, inner, sx_outer, sx_col, sx_inner, chunks,
    PASS: tl.constexpr, FOUND: tl.constexpr, CHUNKS: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, KIND: tl.constexpr,
    LARGEST: tl.constexpr, MAGNITUDE: tl.constexpr, HAS_KS: tl.constexpr, OUT: tl.constexpr,
):  # fmt: skip
    """One pass over one chunk of a long row (grid: rows x chunks). Passes ``0 .. BITS/8 - 1``
    add the chunk's histogram of that digit to the row's; pass ``BITS/8`` counts the chunk's
    ties with the threshold (and the keys above it); the last pass writes the output."""
    row, x_row, out_row, col_stride, need = _row_start(x_ptr, ks_ptr, out_ptr, k, n, inner, sx_outer, sx_col, sx_inner, HAS_KS, OUT)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n
    x = tl.load(x_row + cols.to(tl.int64) * sx_col, mask=valid)
    key = _keys(x, BITS, KIND, LARGEST, MAGNITUDE)
    prefix, need = _threshold(hist_ptr, row, need, FOUND, BITS)
    if PASS < BITS // 8:
        here = valid & _matches(key, prefix, BITS - 8 * (PASS + 1), BITS)
        hist = tl.histogram(_digit(key, BITS - 8 * (PASS + 1)), 256, mask=here)
        tl.atomic_add(hist_ptr + (row * (BITS // 8) + PASS) * 256 + tl.arange(0, 256), hist, sem="relaxed")
    elif PASS == BITS // 8:
        counts = counts_ptr + (row * chunks + chunk) * 2
        tl.store(counts, tl.sum(((key == prefix) & valid).to(tl.int32), 0))
        tl.store(counts + 1, tl.sum(((key > prefix) & valid).to(tl.int32), 0))
    else:
        earlier = tl.arange(0, CHUNKS)
        counts = counts_ptr + (row * chunks + earlier) * 2
        ties = tl.sum(tl.load(counts, mask=earlier < chunk, other=0), 0)
        above = tl.sum(tl.load(counts + 1, mask=earlier < chunk, other=0), 0)
        _write(x, key, cols, valid, prefix, need, ties, above + tl.minimum(ties, need), out_row, col_stride, k, OUT)


def _launch(x: torch.Tensor, k: int, ks: torch.Tensor | None, dim: int, largest: bool, magnitude: bool, out_kind: int):
    """Run the kernels along ``dim`` of ``x``; ``out_kind`` as ``_write``'s ``OUT``. The output is
    contiguous, as the portable path's."""
    n = x.shape[dim]
    outer, inner = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1 :])
    rows = outer * inner
    bits, kind = _KEYS[x.dtype]
    if out_kind == 2:
        out = torch.empty((*x.shape[:dim], k), dtype=torch.int64, device=x.device)
    else:
        out = torch.empty(x.shape, dtype=x.dtype if out_kind == 1 else torch.bool, device=x.device)
    if out.numel() == 0:
        return out
    x3 = x.reshape(outer, n, inner)  # a view unless x's strides cannot be merged so
    has_ks = ks is not None
    ks = ks.reshape(rows) if has_ks else torch.zeros(1, dtype=torch.int64, device=x.device)
    store = out.view(torch.int8) if out.dtype == torch.bool else out
    args = (x3, ks, store)
    scalars = (k, n, inner, *x3.stride())
    flags = dict(BITS=bits, KIND=kind, LARGEST=largest, MAGNITUDE=magnitude, HAS_KS=has_ks, OUT=out_kind)
    if n <= ON_CHIP:
        block = triton.next_power_of_2(n)
        _row_kernel[(rows,)](*args, *scalars, BLOCK=block, num_warps=_warps(block), **flags)
    else:
        _chunked(args, scalars, flags, rows, n, bits, x.device)
    return out


def _chunked(args, scalars, flags, rows: int, n: int, bits: int, device) -> None:
    """Launch the passes of :func:`_chunk_pass` over rows longer than ``ON_CHIP``."""
    chunks = triton.cdiv(n, CHUNK)
    hist = torch.zeros((rows, bits // 8, 256), dtype=torch.int32, device=device)
    counts = torch.empty((rows, chunks, 2), dtype=torch.int32, device=device)
    for p in range(bits // 8 + 2):
        _chunk_pass[(rows, chunks)](
            *args, hist, counts, *scalars, chunks,
            PASS=p, FOUND=min(p, bits // 8), CHUNKS=triton.next_power_of_2(chunks), BLOCK=CHUNK, num_warps=_warps(CHUNK), **flags,
        )  # fmt: skip


def _warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8


def _supported(x: torch.Tensor) -> bool:
    return x.dtype in _KEYS


def topk_mask(x: Tensor, k: int, ks: Optional[Tensor], dim: int, largest: bool, magnitude: bool) -> Tensor:
    """The op ``khot::topk_mask`` (see :mod:`khot.exact`) by the kernels above."""
    if not _supported(x):
        return _portable.topk_mask(x, k, ks, dim, largest, magnitude)
    return _launch(x, k, ks, dim, largest, magnitude, 0)


def keep_topk(x: Tensor, k: int, ks: Optional[Tensor], dim: int, largest: bool, magnitude: bool) -> Tensor:
    """The op ``khot::keep_topk`` (see :mod:`khot.exact`) by the kernels above."""
    if not _supported(x):
        return _portable.keep_topk(x, k, ks, dim, largest, magnitude)
    return _launch(x, k, ks, dim, largest, magnitude, 1)


def select_topk(scores: Tensor, k: int, sorted: bool) -> Tensor:
    """The op ``khot::select_topk`` (see :mod:`khot.exact`): the kernels write the indices of
    every row's top k in increasing order; ``sorted`` reorders those k by score."""
    if not _supported(scores):
        return _portable.select_topk(scores, k, sorted)
    indices = _launch(scores, k, None, scores.dim() - 1, True, False, 2)
    return _portable.best_first(scores, indices) if sorted else indices
