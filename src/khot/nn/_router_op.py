"""The op ``khot::router_topk``: an MoE router's scores, top k, renormalised weights and expert counts.

Its portable path is the eager sequence (:func:`khot.select_topk` of the logits, the chosen
scores renormalised in log space, a scatter-add of the counts); on CUDA tensors a fused Triton kernel
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
import torch.nn.functional as F
from torch import Tensor

from .._backend import custom_op
from ..exact import select_topk

__all__ = ["router_topk"]


def _weights_of(logits: Tensor, indices: Tensor, softmax: bool, renormalize: bool) -> Tensor:
    """The scores (softmax or sigmoid of ``logits``) of the experts ``indices``; ``renormalize``: divided
    by their sum, computed as a softmax of the chosen logits (of their log-sigmoids), which stays
    finite where every sigmoid score underflows (float16 logits below -17: 0 / 0 otherwise)."""
    if renormalize:
        chosen = logits.gather(-1, indices)
        return (chosen if softmax else F.logsigmoid(chosen)).softmax(-1)
    return (logits.softmax(-1) if softmax else logits.sigmoid()).gather(-1, indices)


def _portable(logits: Tensor, k: int, softmax: bool, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    # the experts ranked by their logits: the scores' order, without the ties their rounding makes
    # (two bfloat16 sigmoid scores of logits 7 and 8 are both 1.0)
    indices = select_topk(logits.unsqueeze(-1), logits, k)[1]
    weights = _weights_of(logits, indices, softmax, renormalize)
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
        (grad,) = torch.autograd.grad(_weights_of(z, indices, ctx.softmax, ctx.renormalize), z, grad_weights)
    return grad, None, None, None


router_topk.register_autograd(_backward, setup_context=_setup)
