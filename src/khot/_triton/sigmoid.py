"""Triton kernels of sigmoid top-k: the forward's solver (every row solved on-chip) and the backward.

The op ``khot::sigmoid_topk_forward(x, k, inv_tau)`` (see :mod:`khot.relaxed.sigmoid`) returns
``p = sigmoid((x - t) r)`` with ``r = 1 / τ`` and the threshold ``t`` of each row solving
``Σ p = k``. It runs the same safeguarded solver as the CPU path, with the same stopping rule
and accuracy, but each row stops on its own (no host synchronisation):

* one pass for the start and the bracket: ``Σ x``, ``Σ x²``, ``min x``, ``max x`` (float64) and
  the NaN count (a NaN makes the row NaN, as on the CPU); the probit start
  ``t = x̄ - logit(k / n) sqrt(1 + π s² r² / 8) / r`` and the bracket
  ``[min x, max x] - logit(k / n) / r`` (four units in the last place wider). As on the CPU, ``k > n / 2`` is solved as ``n - k`` for
  ``-x`` (then ``p = 1 - p``), so the sums stay small;
* then per evaluation one pass for ``f = Σ p`` and ``w = Σ p (1 - p)``, summed in float64 (float32
  inputs are evaluated as ``((x - t_hi) - t_lo) r`` with ``t = t_hi + t_lo`` split into a
  float32 head and tail, as on the CPU); a Newton step in ``u = e^{-t r}`` taken when it stays
  inside the bracket and is at most half the previous one (at most ``NEWTON``), else a bisection
  of the bracket on the bit pattern of its float64 ends; the row is done when
  ``|f - k| <= min(max(tol_w w, tol_w / 4), tol_k max(1, k))`` (float32: ``tol_w = 4e-6``; float64: ``1e-10`` and
  ``5e-10``), or, once its bracket holds adjacent doubles, after evaluating the end whose sum
  is closer to ``k``;
* a last pass writes ``p`` once.

That is at most ``2 + NEWTON + 64`` evaluations (typically 2-3; the CPU path adds Halley
steps near the root, which only save evaluations); a row that has not stopped by
then (it cannot happen) is written as NaN rather than returned unconverged. Rows of up to
``BLOCK`` elements take one program each, loaded once and held in registers. Longer rows, when
there are fewer than ``SPREAD_BELOW_ROWS`` of them (one program per row would leave most of the
GPU idle, e.g. (64, 10^6)), have every pass spread over (rows, blocks) programs: the sums are
added atomically and a per-row step updates the solver's state in a small table; after
``SPREAD_ROUNDS`` evaluations (typical rows are done by then) one program per row finishes any
row still going, then the write. A fixed sequence of launches, so CUDA graphs can capture it.
Many long rows take one program each, read block by block on every pass.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["sigmoid_topk_forward", "sigmoid_topk_backward"]

BLOCK = 4096  # elements per block (tests shrink it to exercise rows read block by block)
BACKWARD_BLOCK = 4096  # the backward: longer rows are split across programs
SPREAD_BELOW_ROWS = 1024  # fewer rows than this, longer than BLOCK: every pass spread over programs
SPREAD_ROUNDS = 3  # solver evaluations spread over programs before one program per row finishes
NEWTON = 12  # Newton steps per row at most (as the CPU path)
_MAX = tl.constexpr(torch.finfo(torch.float64).max)
_ULPS4 = tl.constexpr(2.0**-50)  # four units in the last place of a float64, relative
_R32 = tl.constexpr(2.0**126)  # as khot.relaxed.sigmoid: 1 / τ is clamped here in float32 work
_F32 = tl.constexpr(2.0**127)  # float32 work clamps the threshold and its tail here
_LOW = tl.constexpr(0x7FFFFFFFFFFFFFFF)
_PI_8 = tl.constexpr(0.39269908169872414)  # π / 8


@triton.jit
def _p(x, t, r, F64: tl.constexpr):
    """``sigmoid((x - t) r)`` of a block: float64, or float32 with the threshold split in two."""
    if F64:
        z = (x - t) * r
        return 1.0 / (1.0 + tl.exp(-z))
    t_hi = tl.minimum(tl.maximum(t, -_F32), _F32).to(tl.float32)
    t_lo = tl.minimum(tl.maximum((t - t_hi.to(tl.float64)) * r, -_F32), _F32).to(tl.float32)
    r32 = tl.minimum(r, _R32).to(tl.float32)
    return tl.sigmoid((x - t_hi) * r32 - t_lo)


@triton.jit
def _load(x_row, start, n, stride, F64: tl.constexpr, BLOCK: tl.constexpr):
    cols = start + tl.arange(0, BLOCK)
    valid = cols < n
    x = tl.load(x_row + cols.to(tl.int64) * stride, mask=valid, other=0.0)
    return x.to(tl.float64) if F64 else x.to(tl.float32), cols, valid


@triton.jit
def _key(t):
    """Order-preserving int64 key of a float64 (an involution)."""
    bits = t.to(tl.int64, bitcast=True)
    return bits ^ ((bits >> 63) & _LOW)


@triton.jit
def _setup(k, r, nf, total, squares, low, high, nans, TOL_K: tl.constexpr):
    """From a row's ``Σ x``, ``Σ x²``, ``min x``, ``max x`` and NaN count: ``(target, sign, t, lo,
    hi, tol, nan)``. ``k > n / 2`` is solved as ``n - k`` for ``u = -x`` (``sign = -1``; then
    ``p = 1 - p_u``), so the sums stay small; ``k`` = 0 or ``n`` (written exactly) solves ``n / 2``;
    ``t``, ``lo`` and ``hi`` are in ``u``; a row with a NaN gets ``t = NaN`` (all its ``p`` NaN)."""
    flip = k > nf / 2
    target = tl.where((k <= 0) | (k >= nf), nf / 2, tl.where(flip, nf - k, k))
    sign = tl.where(flip, -1.0, 1.0)
    low, high = tl.where(flip, -high, low), tl.where(flip, -low, high)
    logit = tl.log(target / (nf - target))
    mean = sign * total / nf
    spread = tl.sqrt(1.0 + tl.maximum(squares / nf - mean * mean, 0.0) * r * r * _PI_8)
    t = mean - logit * spread / r
    t = tl.where(tl.abs(t) <= _MAX, t, 0.0)  # ±inf in the row
    lo, hi = low - logit / r, high - logit / r
    # four units in the last place outward (khot.relaxed.sigmoid._outward): the root can sit on a bound
    lo = tl.maximum(lo - (tl.minimum(tl.abs(lo), _MAX) + 1e-300) * _ULPS4, -_MAX)
    hi = tl.minimum(hi + (tl.minimum(tl.abs(hi), _MAX) + 1e-300) * _ULPS4, _MAX)
    nan = nans > 0
    t = tl.where(nan, float("nan"), t)
    return target, sign, t, lo, hi, TOL_K * tl.maximum(target, 1.0), nan


@triton.jit
def _step(f, w, t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, target, tol, r,
          TOL_W: tl.constexpr, NEWTON: tl.constexpr, EVALUATIONS: tl.constexpr):  # fmt: skip
    """One solver step from the sums ``f = Σ p`` and ``w = Σ p (1 - p)`` at ``t``: the new state
    ``(t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going)``. Done when
    ``|f - k| <= min(max(TOL_W w, TOL_W / 4), tol)``; a bracket of adjacent doubles moves ``t`` to the end whose
    sum is closer (``final``), done after that evaluation."""
    gap = target - f
    # NaN rows are done; |gap| <= TOL_W / 4 is enough whatever w (see khot.relaxed.sigmoid)
    done = final | ~((tl.abs(gap) > tl.maximum(TOL_W * w, TOL_W / 4)) | (tl.abs(gap) > tol))
    hi, f_hi = tl.where(gap > 0, t, hi), tl.where(gap > 0, f, f_hi)  # f decreases in t
    lo, f_lo = tl.where(gap < 0, t, lo), tl.where(gap < 0, f, f_lo)
    # Newton in v = exp(-t r): a step log1p(|gap| / w) in -t r, never past the root
    step = -tl.where(gap > 0, 1.0, -1.0) * tl.log(1.0 + tl.abs(gap) / w) / r
    new = t + step
    good = (new > lo) & (new < hi) & (tl.abs(step) <= previous / 2) & (newton < NEWTON)
    a = _key(lo)
    b = _key(hi)
    middle = (a >> 1) + (b >> 1) + (a & b & 1)  # floor of the mean, without overflow
    settle = ((middle == a) | (middle == b)) & ~good
    better = tl.where(tl.abs(f_lo - target) <= tl.abs(f_hi - target), lo, hi)
    evaluation += 1
    going = ~done & (evaluation < EVALUATIONS)
    move = going & good
    t = tl.where(going, tl.where(good, new, tl.where(settle, better, _key(middle).to(tl.float64, bitcast=True))), t)
    final = final | (going & settle)
    previous = tl.where(move, tl.abs(step), float("inf"))
    newton += move.to(tl.int32)
    return t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going


@triton.jit
def _block_sums(xs, valid, t, r, sign, F64: tl.constexpr):
    p = tl.where(valid, _p(xs * sign.to(xs.dtype), t, r, F64), 0.0).to(tl.float64)
    return tl.sum(p, 0), tl.sum(p * (1.0 - p), 0)


@triton.jit
def _store_p(xs, cols, valid, t, r, sign, k, nf, going, out_row, F64: tl.constexpr):
    """Write ``p`` of one block: ``k / n`` where ``k`` is 0 or ``n``, else NaN where the row holds a
    NaN (``t`` is NaN) or is still going (that cannot happen: the bisection alone ends within 64
    evaluations)."""
    p = _p(xs * sign.to(xs.dtype), t, r, F64)
    p = tl.where(sign < 0, 1.0 - p, p)
    p = tl.where((k <= 0) | (k >= nf), (k / nf).to(p.dtype), p)
    p = tl.where(going | (t != t), float("nan"), p)  # a NaN t (the row holds a NaN) survives _p's clamps here
    tl.store(out_row + cols, p.to(out_row.dtype.element_ty), mask=valid)


@triton.jit
def _block_stats(xs, valid):
    """``Σ x``, ``Σ x²``, ``min x``, ``max x`` (float64) and the NaN count of one block."""
    x = xs.to(tl.float64)
    nans = tl.sum((valid & (x != x)).to(tl.int32), 0)
    x = tl.where(x == x, x, 0.0)
    return (
        tl.sum(tl.where(valid, x, 0.0), 0),
        tl.sum(tl.where(valid, x * x, 0.0), 0),
        tl.min(tl.where(valid, x, float("inf")), 0),
        tl.max(tl.where(valid, x, -float("inf")), 0),
        nans,
    )


@triton.jit
def _forward_kernel(
    x_ptr, k_ptr, r_ptr, out_ptr, n, stride_row, stride_col,
    TOL_W: tl.constexpr, TOL_K: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, NEWTON: tl.constexpr, EVALUATIONS: tl.constexpr,
):  # fmt: skip
    """One program solves and writes a row (``ONE_BLOCK``: held in registers, else read block by block)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_row
    k = tl.load(k_ptr + row)
    r = tl.load(r_ptr + row)
    nf = tl.cast(n, tl.float64)
    # start and bracket: one pass
    total = tl.zeros((), dtype=tl.float64)
    squares = tl.zeros((), dtype=tl.float64)
    low = tl.full((), float("inf"), tl.float64)
    high = tl.full((), -float("inf"), tl.float64)
    nans = tl.zeros((), dtype=tl.int32)
    if ONE_BLOCK:
        xs, cols, valid = _load(x_row, 0, n, stride_col, F64, BLOCK)
    for start in range(0, n, BLOCK):
        if not ONE_BLOCK:
            xs, cols, valid = _load(x_row, start, n, stride_col, F64, BLOCK)
        d_total, d_squares, d_low, d_high, d_nans = _block_stats(xs, valid)
        total += d_total
        squares += d_squares
        low = tl.minimum(low, d_low)
        high = tl.maximum(high, d_high)
        nans += d_nans
    target, sign, t, lo, hi, tol, nan = _setup(k, r, nf, total, squares, low, high, nans, TOL_K)
    f_lo = tl.full((), float("inf"), tl.float64)
    f_hi = tl.full((), float("inf"), tl.float64)
    previous = tl.full((), float("inf"), tl.float64)
    newton = tl.zeros((), dtype=tl.int32)
    evaluation = tl.zeros((), dtype=tl.int32)
    final = tl.full((), False, tl.int1)
    going = ~nan
    while going:
        f = tl.zeros((), dtype=tl.float64)
        w = tl.zeros((), dtype=tl.float64)
        for start in range(0, n, BLOCK):
            if not ONE_BLOCK:
                xs, cols, valid = _load(x_row, start, n, stride_col, F64, BLOCK)
            df, dw = _block_sums(xs, valid, t, r, sign, F64)
            f += df
            w += dw
        t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going = _step(
            f, w, t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, target, tol, r, TOL_W, NEWTON, EVALUATIONS
        )
    for start in range(0, n, BLOCK):
        if not ONE_BLOCK:
            xs, cols, valid = _load(x_row, start, n, stride_col, F64, BLOCK)
        _store_p(xs, cols, valid, t, r, sign, k, nf, going, out_ptr + row * n, F64)


# Long rows, few of them: every pass spread over (rows, blocks) programs. The per-row state lives
# in a float64 table (_STATE columns): t, lo, hi, f_lo, f_hi, previous, newton, evaluation,
# final, going, and the row's target, sign and tolerance.
_STATE = tl.constexpr(16)


@triton.jit
def _stats_pass(x_ptr, acc_ptr, keys_ptr, n, stride_row, stride_col, F64: tl.constexpr, BLOCK: tl.constexpr):
    """Add a block's ``Σ x``, ``Σ x²`` and NaN count to its row's; fold in its min and max (as int64 keys)."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    xs, cols, valid = _load(x_ptr + row * stride_row, block * BLOCK, n, stride_col, F64, BLOCK)
    total, squares, low, high, nans = _block_stats(xs, valid)
    tl.atomic_add(acc_ptr + row * 3, total, sem="relaxed")
    tl.atomic_add(acc_ptr + row * 3 + 1, squares, sem="relaxed")
    tl.atomic_add(acc_ptr + row * 3 + 2, nans.to(tl.float64), sem="relaxed")
    tl.atomic_min(keys_ptr + row * 2, _key(low), sem="relaxed")
    tl.atomic_max(keys_ptr + row * 2 + 1, _key(high), sem="relaxed")


@triton.jit
def _save_state(state_ptr, row, t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going):
    state = state_ptr + row * _STATE
    tl.store(state, t)
    tl.store(state + 1, lo)
    tl.store(state + 2, hi)
    tl.store(state + 3, f_lo)
    tl.store(state + 4, f_hi)
    tl.store(state + 5, previous)
    tl.store(state + 6, newton.to(tl.float64))
    tl.store(state + 7, evaluation.to(tl.float64))
    tl.store(state + 8, final.to(tl.float64))
    tl.store(state + 9, going.to(tl.float64))


@triton.jit
def _load_state(state_ptr, row):
    state = state_ptr + row * _STATE
    t, lo, hi = tl.load(state), tl.load(state + 1), tl.load(state + 2)
    f_lo, f_hi, previous = tl.load(state + 3), tl.load(state + 4), tl.load(state + 5)
    newton, evaluation = tl.load(state + 6).to(tl.int32), tl.load(state + 7).to(tl.int32)
    return t, lo, hi, f_lo, f_hi, previous, newton, evaluation, tl.load(state + 8) != 0, tl.load(state + 9) != 0


@triton.jit
def _start_kernel(k_ptr, r_ptr, acc_ptr, keys_ptr, state_ptr, n, TOL_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    low = _key(tl.load(keys_ptr + row * 2)).to(tl.float64, bitcast=True)
    high = _key(tl.load(keys_ptr + row * 2 + 1)).to(tl.float64, bitcast=True)
    acc = acc_ptr + row * 3
    target, sign, t, lo, hi, tol, nan = _setup(
        tl.load(k_ptr + row), tl.load(r_ptr + row), tl.cast(n, tl.float64), tl.load(acc), tl.load(acc + 1), low, high, tl.load(acc + 2), TOL_K
    )
    inf = tl.full((), float("inf"), tl.float64)
    zero = tl.zeros((), dtype=tl.int32)
    _save_state(state_ptr, row, t, lo, hi, inf, inf, inf, zero, zero, tl.full((), False, tl.int1), ~nan)
    state = state_ptr + row * _STATE
    tl.store(state + 10, target)
    tl.store(state + 11, sign)
    tl.store(state + 12, tol)


@triton.jit
def _eval_pass(x_ptr, r_ptr, state_ptr, sums_ptr, n, stride_row, stride_col, F64: tl.constexpr, BLOCK: tl.constexpr):
    """Add a block's ``Σ p`` and ``Σ p (1 - p)`` at its row's ``t`` to the row's sums (rows still going)."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    state = state_ptr + row * _STATE
    if tl.load(state + 9) != 0:
        xs, cols, valid = _load(x_ptr + row * stride_row, block * BLOCK, n, stride_col, F64, BLOCK)
        f, w = _block_sums(xs, valid, tl.load(state), tl.load(r_ptr + row), tl.load(state + 11), F64)
        tl.atomic_add(sums_ptr + row * 2, f, sem="relaxed")
        tl.atomic_add(sums_ptr + row * 2 + 1, w, sem="relaxed")


@triton.jit
def _update_kernel(r_ptr, state_ptr, sums_ptr, TOL_W: tl.constexpr, NEWTON: tl.constexpr, EVALUATIONS: tl.constexpr):
    """One solver step per row still going, from the sums of :func:`_eval_pass`."""
    row = tl.program_id(0).to(tl.int64)
    t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going = _load_state(state_ptr, row)
    if going:
        state = state_ptr + row * _STATE
        t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going = _step(
            tl.load(sums_ptr + row * 2), tl.load(sums_ptr + row * 2 + 1), t, lo, hi, f_lo, f_hi, previous, newton,
            evaluation, final, tl.load(state + 10), tl.load(state + 12), tl.load(r_ptr + row), TOL_W, NEWTON, EVALUATIONS,
        )  # fmt: skip
        _save_state(state_ptr, row, t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going)


@triton.jit
def _finish_kernel(
    x_ptr, r_ptr, state_ptr, n, stride_row, stride_col,
    TOL_W: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr, NEWTON: tl.constexpr, EVALUATIONS: tl.constexpr,
):  # fmt: skip
    """The rare rows still going after the spread-out rounds: one program each solves to the end."""
    row = tl.program_id(0).to(tl.int64)
    t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going = _load_state(state_ptr, row)
    if going:
        state = state_ptr + row * _STATE
        target, sign, tol, r = tl.load(state + 10), tl.load(state + 11), tl.load(state + 12), tl.load(r_ptr + row)
        while going:
            f = tl.zeros((), dtype=tl.float64)
            w = tl.zeros((), dtype=tl.float64)
            for start in range(0, n, BLOCK):
                xs, cols, valid = _load(x_ptr + row * stride_row, start, n, stride_col, F64, BLOCK)
                df, dw = _block_sums(xs, valid, t, r, sign, F64)
                f += df
                w += dw
            t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going = _step(
                f, w, t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, target, tol, r, TOL_W, NEWTON, EVALUATIONS
            )
        _save_state(state_ptr, row, t, lo, hi, f_lo, f_hi, previous, newton, evaluation, final, going)


@triton.jit
def _write_pass(x_ptr, k_ptr, r_ptr, state_ptr, out_ptr, n, stride_row, stride_col, F64: tl.constexpr, BLOCK: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    xs, cols, valid = _load(x_ptr + row * stride_row, block * BLOCK, n, stride_col, F64, BLOCK)
    state = state_ptr + row * _STATE
    t, going, sign = tl.load(state), tl.load(state + 9) != 0, tl.load(state + 11)
    nf = tl.cast(n, tl.float64)
    _store_p(xs, cols, valid, t, tl.load(r_ptr + row), sign, tl.load(k_ptr + row), nf, going, out_ptr + row * n, F64)


def sigmoid_topk_forward(x: Tensor, k: Tensor, inv_tau: Tensor) -> Tensor:
    """The op ``khot::sigmoid_topk_forward`` (see :mod:`khot.relaxed.sigmoid`): ``x`` is
    ``(..., n)``; ``k`` and ``inv_tau`` are float64 per slice. Returns ``p`` in ``x``'s dtype and
    in the layout of ``torch.empty_like(x)`` (the op's fake)."""
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = out.numel() // n
    x2 = x.reshape(rows, n)
    k = k.to(torch.float64).reshape(rows).contiguous()
    r = inv_tau.to(torch.float64).reshape(rows).contiguous()
    f64 = x.dtype == torch.float64
    tol_w, tol_k = (1e-10, 5e-10) if f64 else (4e-6, math.inf)
    block = min(BLOCK, triton.next_power_of_2(n))
    solver = dict(TOL_W=tol_w, TOL_K=tol_k, NEWTON=NEWTON, EVALUATIONS=2 + NEWTON + 64)
    layout = dict(F64=f64, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    strides = (x2.stride(0), x2.stride(1))
    if n <= block or rows >= SPREAD_BELOW_ROWS:
        _forward_kernel[(rows,)](x2, k, r, out, n, *strides, ONE_BLOCK=n <= block, **solver, **layout)
    else:
        _spread(x2, k, r, out, n, strides, solver, layout)
    want = torch.empty_like(x, device="meta").stride()  # the fake's layout: compiled code relies on it
    if all(a == b for a, b, size in zip(out.stride(), want, out.shape) if size > 1):
        return out
    return torch.empty_like(x).copy_(out)


def _spread(x2, k, r, out, n, strides, solver, layout) -> None:
    """Solve long rows with every pass spread over (rows, blocks) programs: statistics, then
    ``SPREAD_ROUNDS`` evaluations each followed by a per-row step, then one program per row for
    rows still going (typically none), then the write. A fixed sequence of launches: no sync."""
    rows = x2.shape[0]
    grid = (rows, triton.cdiv(n, layout["BLOCK"]))
    device = x2.device
    acc = torch.zeros((rows, 3), dtype=torch.float64, device=device)
    keys = torch.tensor([[2**63 - 1, -(2**63)]], dtype=torch.int64, device=device).repeat(rows, 1)
    state = torch.empty((rows, _STATE.value), dtype=torch.float64, device=device)
    sums = torch.zeros((SPREAD_ROUNDS, rows, 2), dtype=torch.float64, device=device)
    steps = dict(TOL_W=solver["TOL_W"], NEWTON=solver["NEWTON"], EVALUATIONS=solver["EVALUATIONS"])
    _stats_pass[grid](x2, acc, keys, n, *strides, **layout)
    _start_kernel[(rows,)](k, r, acc, keys, state, n, TOL_K=solver["TOL_K"])
    for round in range(SPREAD_ROUNDS):
        _eval_pass[grid](x2, r, state, sums[round], n, *strides, **layout)
        _update_kernel[(rows,)](r, state, sums[round], **steps)
    _finish_kernel[(rows,)](x2, r, state, n, *strides, **steps, **layout)
    _write_pass[grid](x2, k, r, state, out, n, *strides, **layout)


@triton.jit
def _backward_sums(p_ptr, g_ptr, r_ptr, sums_ptr, n, BLOCK: tl.constexpr, DT: tl.constexpr):
    """Add one block's ``Σ w`` and ``Σ w g`` (``w = p (1 - p)``, float64) to its row's sums."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n
    p = tl.load(p_ptr + row * n + cols, mask=valid, other=0.0).to(DT)
    g = tl.load(g_ptr + row * n + cols, mask=valid, other=0.0).to(DT)
    w = (p * (1.0 - p)).to(tl.float64)
    tl.atomic_add(sums_ptr + row * 2, tl.sum(w, 0), sem="relaxed")
    tl.atomic_add(sums_ptr + row * 2 + 1, tl.sum(w * g.to(tl.float64), 0), sem="relaxed")


@triton.jit
def _backward_write(
    p_ptr, g_ptr, r_ptr, sums_ptr, out_ptr, m_ptr, n, BLOCK: tl.constexpr, SUMS: tl.constexpr, DT: tl.constexpr
):
    """``grad_x = w (g - m) r`` for one block, ``m = Σ w g / Σ w`` (0 where ``Σ w = 0``); the
    sums come from :func:`_backward_sums` or, when ``SUMS`` is false, from this block (the row).
    ``DT``: the compute dtype (float32, or float64 for float64 inputs)."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n
    p = tl.load(p_ptr + row * n + cols, mask=valid, other=0.0).to(DT)
    g = tl.load(g_ptr + row * n + cols, mask=valid, other=0.0).to(DT)
    w = p * (1.0 - p)
    if SUMS:
        total = tl.load(sums_ptr + row * 2)
        weighted = tl.load(sums_ptr + row * 2 + 1)
    else:
        total = tl.sum(w.to(tl.float64), 0)
        weighted = tl.sum(w.to(tl.float64) * g.to(tl.float64), 0)
    m = tl.where(total > 0, weighted / tl.where(total > 0, total, 1.0), 0.0)
    r = tl.load(r_ptr + row)
    grad = w * (g - m.to(DT)) * r.to(DT)
    tl.store(out_ptr + row * n + cols, grad.to(out_ptr.dtype.element_ty), mask=valid)
    if block == 0:
        tl.store(m_ptr + row, m.to(m_ptr.dtype.element_ty))


def sigmoid_topk_backward(p: Tensor, grad: Tensor, inv_tau: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_x, m)`` of sigmoid top-k's backward for ``p`` (the forward's output, ``(..., n)``),
    the incoming gradient and ``1 / τ`` per slice: ``grad_x = w (g - m) / τ`` with
    ``w = p (1 - p)`` and ``m = Σ w g / Σ w`` per slice (0 where ``Σ w = 0``); ``m`` is also the
    gradient of ``k``. Sums in float64; ``grad_x`` in ``grad``'s dtype, ``m`` float32 (float64
    for float64 ``p``). Rows of up to ``BACKWARD_BLOCK`` take one program (one read of ``p`` and
    ``grad``, one write); longer rows are split across programs (a sums pass, then a write pass).
    """
    n = p.shape[-1]
    grad_x = torch.empty(p.shape, dtype=grad.dtype, device=p.device)
    m = torch.empty(p.shape[:-1], dtype=torch.float64 if p.dtype == torch.float64 else torch.float32, device=p.device)
    if grad_x.numel() == 0:
        return grad_x, m.zero_()
    rows = grad_x.numel() // n
    p2, g2 = p.reshape(rows, n).contiguous(), grad.reshape(rows, n).contiguous()
    r = inv_tau.to(torch.float64).expand(p.shape[:-1]).reshape(rows).contiguous()
    block = min(BACKWARD_BLOCK, triton.next_power_of_2(n))
    grid = (rows, triton.cdiv(n, block))
    flags = dict(BLOCK=block, DT=tl.float64 if p.dtype == torch.float64 else tl.float32, num_warps=4 if block <= 1024 else 8)
    sums = torch.zeros((rows, 2), dtype=torch.float64, device=p.device) if grid[1] > 1 else r
    if grid[1] > 1:
        _backward_sums[grid](p2, g2, r, sums, n, **flags)
    _backward_write[grid](p2, g2, r, sums, grad_x, m, n, SUMS=grid[1] > 1, **flags)
    return grad_x, m
