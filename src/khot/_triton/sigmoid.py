"""Triton kernels of sigmoid top-k: the forward's solver (every row solved on-chip) and the backward.

The op ``khot::sigmoid_topk_forward(x, k, inv_tau)`` (see :mod:`khot.relaxed.sigmoid`) returns
``p = sigmoid((x - t) r)`` with ``r = 1 / τ`` and the threshold ``t`` of each row solving
``Σ p = k``. It runs the same safeguarded solver as the CPU path, with the same stopping rule
and accuracy, but each row stops on its own (no host synchronisation):

* one pass for the start and the bracket: ``Σ x``, ``Σ x²``, ``min x`` and ``max x`` (float64);
  the probit start ``t = x̄ - logit(k / n) sqrt(1 + π s² r² / 8) / r`` and the bracket
  ``[min x, max x] - logit(k / n) / r``;
* then per evaluation one pass for ``f = Σ p`` and ``w = Σ p (1 - p)``, summed in float64 (float32
  inputs are evaluated as ``((x - t_hi) - t_lo) r`` with ``t = t_hi + t_lo`` split into a
  float32 head and tail, as on the CPU); a Newton step in ``u = e^{-t r}`` taken when it stays
  inside the bracket and is at most half the previous one (at most ``NEWTON``), else a bisection
  of the bracket on the bit pattern of its float64 ends; the row is done when
  ``|f - k| <= tol_w w + tol_k max(1, k)`` or its bracket holds adjacent doubles;
* a last pass writes ``p`` once.

That is at most ``1 + NEWTON + 64`` evaluations (typically 2-3); a row that has not stopped by
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
def _setup(k, r, nf, total, squares, low, high, TOL_K: tl.constexpr):
    """From a row's ``Σ x``, ``Σ x²``, ``min x`` and ``max x``: the target count (``n / 2`` where
    ``k`` is 0 or ``n``, which are written exactly), the start ``t``, the bracket and the tolerance."""
    target = tl.where((k <= 0) | (k >= nf), nf / 2, k)
    logit = tl.log(target / (nf - target))
    mean = total / nf
    spread = tl.sqrt(1.0 + tl.maximum(squares / nf - mean * mean, 0.0) * r * r * _PI_8)
    t = mean - logit * spread / r
    t = tl.where(tl.abs(t) <= _MAX, t, 0.0)  # ±inf or NaN in the row
    lo = tl.maximum(low - logit / r, -_MAX)
    hi = tl.minimum(high - logit / r, _MAX)
    lo = tl.where(lo == lo, lo, -_MAX)
    hi = tl.where(hi == hi, hi, _MAX)
    return target, t, lo, hi, TOL_K * tl.maximum(target, 1.0)


@triton.jit
def _step(f, w, t, lo, hi, previous, newton, evaluation, target, tol, r,
          TOL_W: tl.constexpr, NEWTON: tl.constexpr, EVALUATIONS: tl.constexpr):  # fmt: skip
    """One solver step from the sums ``f = Σ p`` and ``w = Σ p (1 - p)`` at ``t``: the new state
    ``(t, lo, hi, previous, newton, evaluation, stopped, going)``."""
    gap = target - f
    hi = tl.where(gap > 0, t, hi)  # f decreases in t
    lo = tl.where(gap < 0, t, lo)
    done = ~(tl.abs(gap) > TOL_W * w + tol)  # NaN rows are done
    # Newton in u = exp(-t r): a step log1p(|gap| / w) in -t r, never past the root
    step = -tl.where(gap > 0, 1.0, -1.0) * tl.log(1.0 + tl.abs(gap) / w) / r
    new = t + step
    good = (new > lo) & (new < hi) & (tl.abs(step) <= previous / 2) & (newton < NEWTON)
    a = _key(lo)
    b = _key(hi)
    middle = (a >> 1) + (b >> 1) + (a & b & 1)  # floor of the mean, without overflow
    adjacent = (middle == a) | (middle == b)
    mid = _key(middle).to(tl.float64, bitcast=True)
    evaluation += 1
    stopped = done | adjacent
    going = ~stopped & (evaluation < EVALUATIONS)
    move = going & good
    t = tl.where(going, tl.where(good, new, mid), t)
    previous = tl.where(move, tl.abs(step), float("inf"))
    newton += move.to(tl.int32)
    return t, lo, hi, previous, newton, evaluation, stopped, going


@triton.jit
def _block_sums(xs, valid, t, r, F64: tl.constexpr):
    p = tl.where(valid, _p(xs, t, r, F64), 0.0).to(tl.float64)
    return tl.sum(p, 0), tl.sum(p * (1.0 - p), 0)


@triton.jit
def _store_p(xs, cols, valid, t, r, k, nf, stopped, out_row, F64: tl.constexpr):
    """Write ``p`` of one block (``k / n`` where ``k`` is 0 or ``n``; NaN if the row never stopped:
    that cannot happen, the bisection alone ends within 64 evaluations)."""
    p = _p(xs, t, r, F64)
    p = tl.where((k <= 0) | (k >= nf), (k / nf).to(p.dtype), p)
    p = tl.where(stopped, p, float("nan"))
    tl.store(out_row + cols, p.to(out_row.dtype.element_ty), mask=valid)


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
    if ONE_BLOCK:
        xs, cols, valid = _load(x_row, 0, n, stride_col, F64, BLOCK)
    for start in range(0, n, BLOCK):
        if not ONE_BLOCK:
            xs, cols, valid = _load(x_row, start, n, stride_col, F64, BLOCK)
        x = xs.to(tl.float64)
        total += tl.sum(tl.where(valid, x, 0.0), 0)
        squares += tl.sum(tl.where(valid, x * x, 0.0), 0)
        low = tl.minimum(low, tl.min(tl.where(valid, x, float("inf")), 0))
        high = tl.maximum(high, tl.max(tl.where(valid, x, -float("inf")), 0))
    target, t, lo, hi, tol = _setup(k, r, nf, total, squares, low, high, TOL_K)
    previous = tl.full((), float("inf"), tl.float64)
    newton = tl.zeros((), dtype=tl.int32)
    evaluation = tl.zeros((), dtype=tl.int32)
    going = tl.full((), True, tl.int1)
    stopped = tl.full((), False, tl.int1)
    while going:
        f = tl.zeros((), dtype=tl.float64)
        w = tl.zeros((), dtype=tl.float64)
        for start in range(0, n, BLOCK):
            if not ONE_BLOCK:
                xs, cols, valid = _load(x_row, start, n, stride_col, F64, BLOCK)
            df, dw = _block_sums(xs, valid, t, r, F64)
            f += df
            w += dw
        t, lo, hi, previous, newton, evaluation, stopped, going = _step(
            f, w, t, lo, hi, previous, newton, evaluation, target, tol, r, TOL_W, NEWTON, EVALUATIONS
        )
    for start in range(0, n, BLOCK):
        if not ONE_BLOCK:
            xs, cols, valid = _load(x_row, start, n, stride_col, F64, BLOCK)
        _store_p(xs, cols, valid, t, r, k, nf, stopped, out_ptr + row * n, F64)


# Long rows, few of them: every pass spread over (rows, blocks) programs. The per-row state lives
# in a float64 table: t, lo, hi, previous, newton, evaluation, stopped, going.
@triton.jit
def _stats_pass(x_ptr, acc_ptr, keys_ptr, n, stride_row, stride_col, F64: tl.constexpr, BLOCK: tl.constexpr):
    """Add a block's ``Σ x`` and ``Σ x²`` to its row's; fold in its min and max (as int64 keys)."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    xs, cols, valid = _load(x_ptr + row * stride_row, block * BLOCK, n, stride_col, F64, BLOCK)
    x = xs.to(tl.float64)
    tl.atomic_add(acc_ptr + row * 2, tl.sum(tl.where(valid, x, 0.0), 0), sem="relaxed")
    tl.atomic_add(acc_ptr + row * 2 + 1, tl.sum(tl.where(valid, x * x, 0.0), 0), sem="relaxed")
    tl.atomic_min(keys_ptr + row * 2, _key(tl.min(tl.where(valid, x, float("inf")), 0)), sem="relaxed")
    tl.atomic_max(keys_ptr + row * 2 + 1, _key(tl.max(tl.where(valid, x, -float("inf")), 0)), sem="relaxed")


@triton.jit
def _start_kernel(k_ptr, r_ptr, acc_ptr, keys_ptr, state_ptr, n, TOL_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    low = _key(tl.load(keys_ptr + row * 2)).to(tl.float64, bitcast=True)
    high = _key(tl.load(keys_ptr + row * 2 + 1)).to(tl.float64, bitcast=True)
    nf = tl.cast(n, tl.float64)
    k, r = tl.load(k_ptr + row), tl.load(r_ptr + row)
    _, t, lo, hi, _ = _setup(k, r, nf, tl.load(acc_ptr + row * 2), tl.load(acc_ptr + row * 2 + 1), low, high, TOL_K)
    state = state_ptr + row * 8
    tl.store(state, t)
    tl.store(state + 1, lo)
    tl.store(state + 2, hi)
    tl.store(state + 3, float("inf"))
    tl.store(state + 4, 0.0)
    tl.store(state + 5, 0.0)
    tl.store(state + 6, 0.0)
    tl.store(state + 7, 1.0)


@triton.jit
def _eval_pass(x_ptr, r_ptr, state_ptr, sums_ptr, n, stride_row, stride_col, F64: tl.constexpr, BLOCK: tl.constexpr):
    """Add a block's ``Σ p`` and ``Σ p (1 - p)`` at its row's ``t`` to the row's sums (rows still going)."""
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    if tl.load(state_ptr + row * 8 + 7) != 0:
        xs, cols, valid = _load(x_ptr + row * stride_row, block * BLOCK, n, stride_col, F64, BLOCK)
        f, w = _block_sums(xs, valid, tl.load(state_ptr + row * 8), tl.load(r_ptr + row), F64)
        tl.atomic_add(sums_ptr + row * 2, f, sem="relaxed")
        tl.atomic_add(sums_ptr + row * 2 + 1, w, sem="relaxed")


@triton.jit
def _load_state(state_ptr, row):
    state = state_ptr + row * 8
    t, lo, hi, previous = tl.load(state), tl.load(state + 1), tl.load(state + 2), tl.load(state + 3)
    newton, evaluation = tl.load(state + 4).to(tl.int32), tl.load(state + 5).to(tl.int32)
    return t, lo, hi, previous, newton, evaluation, tl.load(state + 6) != 0, tl.load(state + 7) != 0


@triton.jit
def _save_state(state_ptr, row, t, lo, hi, previous, newton, evaluation, stopped, going):
    state = state_ptr + row * 8
    tl.store(state, t)
    tl.store(state + 1, lo)
    tl.store(state + 2, hi)
    tl.store(state + 3, previous)
    tl.store(state + 4, newton.to(tl.float64))
    tl.store(state + 5, evaluation.to(tl.float64))
    tl.store(state + 6, stopped.to(tl.float64))
    tl.store(state + 7, going.to(tl.float64))


@triton.jit
def _update_kernel(k_ptr, r_ptr, state_ptr, sums_ptr, n,
                   TOL_W: tl.constexpr, TOL_K: tl.constexpr, NEWTON: tl.constexpr, EVALUATIONS: tl.constexpr):  # fmt: skip
    """One solver step per row still going, from the sums of :func:`_eval_pass`."""
    row = tl.program_id(0).to(tl.int64)
    t, lo, hi, previous, newton, evaluation, stopped, going = _load_state(state_ptr, row)
    if going:
        nf = tl.cast(n, tl.float64)
        k = tl.load(k_ptr + row)
        target = tl.where((k <= 0) | (k >= nf), nf / 2, k)
        f, w = tl.load(sums_ptr + row * 2), tl.load(sums_ptr + row * 2 + 1)
        t, lo, hi, previous, newton, evaluation, stopped, going = _step(
            f, w, t, lo, hi, previous, newton, evaluation, target, TOL_K * tl.maximum(target, 1.0), tl.load(r_ptr + row), TOL_W, NEWTON, EVALUATIONS
        )
        _save_state(state_ptr, row, t, lo, hi, previous, newton, evaluation, stopped, going)


@triton.jit
def _finish_kernel(
    x_ptr, k_ptr, r_ptr, state_ptr, n, stride_row, stride_col,
    TOL_W: tl.constexpr, TOL_K: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr, NEWTON: tl.constexpr, EVALUATIONS: tl.constexpr,
):  # fmt: skip
    """The rare rows still going after the spread-out rounds: one program each solves to the end."""
    row = tl.program_id(0).to(tl.int64)
    t, lo, hi, previous, newton, evaluation, stopped, going = _load_state(state_ptr, row)
    if going:
        nf = tl.cast(n, tl.float64)
        k, r = tl.load(k_ptr + row), tl.load(r_ptr + row)
        target = tl.where((k <= 0) | (k >= nf), nf / 2, k)
        tol = TOL_K * tl.maximum(target, 1.0)
        while going:
            f = tl.zeros((), dtype=tl.float64)
            w = tl.zeros((), dtype=tl.float64)
            for start in range(0, n, BLOCK):
                xs, cols, valid = _load(x_ptr + row * stride_row, start, n, stride_col, F64, BLOCK)
                df, dw = _block_sums(xs, valid, t, r, F64)
                f += df
                w += dw
            t, lo, hi, previous, newton, evaluation, stopped, going = _step(
                f, w, t, lo, hi, previous, newton, evaluation, target, tol, r, TOL_W, NEWTON, EVALUATIONS
            )
        _save_state(state_ptr, row, t, lo, hi, previous, newton, evaluation, stopped, going)


@triton.jit
def _write_pass(x_ptr, k_ptr, r_ptr, state_ptr, out_ptr, n, stride_row, stride_col, F64: tl.constexpr, BLOCK: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    xs, cols, valid = _load(x_ptr + row * stride_row, block * BLOCK, n, stride_col, F64, BLOCK)
    t, stopped = tl.load(state_ptr + row * 8), tl.load(state_ptr + row * 8 + 6) != 0
    nf = tl.cast(n, tl.float64)
    _store_p(xs, cols, valid, t, tl.load(r_ptr + row), tl.load(k_ptr + row), nf, stopped, out_ptr + row * n, F64)


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
    tol_w, tol_k = (0.0, 5e-10) if f64 else (4e-6, 0.0)
    block = min(BLOCK, triton.next_power_of_2(n))
    solver = dict(TOL_W=tol_w, TOL_K=tol_k, NEWTON=NEWTON, EVALUATIONS=1 + NEWTON + 64)
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
    acc = torch.zeros((rows, 2), dtype=torch.float64, device=device)
    keys = torch.tensor([[2**63 - 1, -(2**63)]], dtype=torch.int64, device=device).repeat(rows, 1)
    state = torch.empty((rows, 8), dtype=torch.float64, device=device)
    sums = torch.zeros((SPREAD_ROUNDS, rows, 2), dtype=torch.float64, device=device)
    _stats_pass[grid](x2, acc, keys, n, *strides, **layout)
    _start_kernel[(rows,)](k, r, acc, keys, state, n, TOL_K=solver["TOL_K"])
    for round in range(SPREAD_ROUNDS):
        _eval_pass[grid](x2, r, state, sums[round], n, *strides, **layout)
        _update_kernel[(rows,)](k, r, state, sums[round], n, **solver)
    _finish_kernel[(rows,)](x2, k, r, state, n, *strides, **solver, **layout)
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
