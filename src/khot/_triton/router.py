"""Triton kernel of the MoE router op ``khot::router_topk`` (see :mod:`khot.nn._router_op`).

One program per token holds its row of expert logits (up to 512 experts, on-chip) and, in one
pass: the scores (softmax in float32, or sigmoid), rounded to the logits' dtype; the experts
ranked by the order-preserving integer keys of their logits (ties to the lower expert, NaN
first, as :func:`khot.select_topk` of the logits in the eager path); the top k by k arg-max
reductions, best first; the renormalised weights (a softmax of the chosen logits or of their
log-sigmoids); and the expert counts, added atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["router_topk"]

MAX_EXPERTS = 512


@triton.jit
def _router_kernel(
    logits_ptr, weights_ptr, indices_ptr, counts_ptr, experts, stride_row, stride_col,
    K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, SOFTMAX: tl.constexpr, RENORMALIZE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < experts
    z = tl.load(logits_ptr + row * stride_row + cols * stride_col, mask=valid, other=-float("inf"))
    zf = z.to(tl.float32)
    if SOFTMAX:
        e = tl.exp(zf - tl.max(zf, 0))
        e = tl.where(valid, e, 0.0)
        s = e / tl.sum(e, 0)
    else:
        s = tl.sigmoid(zf)
    s = s.to(z.dtype).to(tl.float32)  # the scores in the logits' dtype, as the eager path has them
    # rank the logits (exact in float32), as the eager path does: the scores' order without their rounding's ties
    bits = tl.where(zf == 0, 0, zf.to(tl.int32, bitcast=True))
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(zf != zf, 0x7FFFFFFF, key)
    key = tl.where(valid, key, -0x80000000)
    slots = tl.arange(0, KP)
    values = tl.zeros((KP,), dtype=tl.float32)
    chosen_logits = tl.zeros((KP,), dtype=tl.float32)
    picks = tl.zeros((KP,), dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(key, 0)
        pick = tl.min(tl.where(key == best, cols, BLOCK), 0)  # the lowest expert among the best
        chosen = cols == pick
        values = tl.where(slots == j, tl.sum(tl.where(chosen, s, 0.0), 0), values)
        chosen_logits = tl.where(slots == j, tl.sum(tl.where(chosen, zf, 0.0), 0), chosen_logits)
        picks = tl.where(slots == j, pick, picks)
        key = tl.where(chosen, -0x80000000, key)
    if RENORMALIZE:  # a softmax of the chosen logits (of their log-sigmoids): no 0 / 0 where the scores underflow
        log_scores = chosen_logits if SOFTMAX else tl.minimum(chosen_logits, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(chosen_logits)))
        log_scores = tl.where(slots < K, log_scores, -float("inf"))
        e = tl.exp(log_scores - tl.max(log_scores, 0))
        values = e / tl.sum(e, 0)
    taken = slots < K
    tl.store(weights_ptr + row * K + slots, values.to(weights_ptr.dtype.element_ty), mask=taken)
    tl.store(indices_ptr + row * K + slots, picks.to(tl.int64), mask=taken)
    tl.atomic_add(counts_ptr + picks, tl.full((KP,), 1, tl.int64), mask=taken, sem="relaxed")


def router_topk(logits: Tensor, k: int, softmax: bool, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The op ``khot::router_topk``: ``(weights, indices, counts)`` of ``(tokens, experts)`` logits."""
    tokens, experts = logits.shape
    if experts > MAX_EXPERTS or logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        from ..nn._router_op import _portable  # wider rows, float64: the eager sequence

        return _portable(logits, k, softmax, renormalize)
    weights = torch.empty((tokens, k), dtype=logits.dtype, device=logits.device)
    indices = torch.empty((tokens, k), dtype=torch.int64, device=logits.device)
    counts = torch.zeros(experts, dtype=torch.int64, device=logits.device)
    if tokens and k:
        block = triton.next_power_of_2(experts)
        _router_kernel[(tokens,)](
            logits, weights, indices, counts, experts, logits.stride(0), logits.stride(1),
            K=k, KP=triton.next_power_of_2(k), BLOCK=block, SOFTMAX=softmax, RENORMALIZE=renormalize,
            num_warps=1 if block <= 128 else 4,
        )  # fmt: skip
    return weights, indices, counts
