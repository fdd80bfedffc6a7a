"""The op ``khot::router_topk``: an MoE router's scores, top k, renormalised weights and expert counts.

Its portable path is the eager sequence (softmax or sigmoid, :func:`khot.select_topk`, the
renormalisation, a scatter-add of the counts); on CUDA tensors a fused Triton kernel
(:mod:`khot._triton.router`) does all of it in one pass over the logits. The gradient flows to
the logits through the weights (recomputed from the saved logits and indices).

Example:
    >>> import torch
    >>> weights, indices, counts = router_topk(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 3.0]]), 2, True, True)
    >>> indices, counts
    (tensor([[1, 2],
            [0, 2]]), tensor([1, 1, 2]))
    >>> weights.sum(-1)
    tensor([1., 1.])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import custom_op
from ..exact import select_topk

__all__ = ["router_topk"]


def _scores(logits: Tensor, softmax: bool) -> Tensor:
    return logits.softmax(-1) if softmax else logits.sigmoid()


def _portable(logits: Tensor, k: int, softmax: bool, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    scores = _scores(logits, softmax)
    weights, indices = select_topk(scores.unsqueeze(-1), scores, k)
    weights = weights.squeeze(-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    counts = torch.zeros(logits.shape[-1], dtype=torch.int64, device=logits.device)
    counts = counts.scatter_add(0, indices.flatten(), torch.ones_like(indices.flatten()))
    return weights, indices, counts


def _fake(logits: Tensor, k: int, softmax: bool, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    tokens, experts = logits.shape
    weights = logits.new_empty((tokens, k))
    return weights, logits.new_empty((tokens, k), dtype=torch.int64), logits.new_empty(experts, dtype=torch.int64)


router_topk = custom_op("router_topk", _portable, fake=_fake)


def _setup(ctx, inputs, output):
    logits, k, softmax, renormalize = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.softmax, ctx.renormalize = softmax, renormalize


def _backward(ctx, grad_weights, _indices, _counts):
    logits, indices = ctx.saved_tensors
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        weights = _scores(z, ctx.softmax).gather(-1, indices)
        if ctx.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        (grad,) = torch.autograd.grad(weights, z, grad_weights)
    return grad, None, None, None


router_topk.register_autograd(_backward, setup_context=_setup)
