"""Token pruning for vision transformers: keep the tokens the [CLS] token attends to most."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .._checks import check_tensor
from ..exact import select_topk

__all__ = ["TokenPruning"]


class TokenPruning(nn.Module):
    """Top-K token reduction (Haurum et al. 2023's "Top-K"; EViT with ``fuse_pruned=True``).

    ``forward(x, attn)`` takes tokens ``x`` of shape ``(B, N, C)`` whose token 0 is [CLS]
    and attention weights ``attn`` of shape ``(B, H, N, N)``. Each token is scored by the
    attention the [CLS] query pays it, averaged over heads, and the best are kept in
    order of decreasing score (ties: lower index first). Scores may be given instead of
    ``attn`` with ``forward(x, scores=s)``.

    Args:
        keep: how many tokens to keep besides [CLS]: an int, or a float rate in (0, 1]
            of the candidates (rounded up).
        keep_cls: if ``True`` (default) [CLS] is always kept, placed first, and the other
            ``N - 1`` tokens compete (``scores`` then has shape ``(B, N - 1)``). If
            ``False`` all ``N`` tokens compete, [CLS] included (``scores``: ``(B, N)``).
        fuse_pruned: append one token, the score-weighted mean of the pruned tokens
            (zero when nothing is pruned).

    Returns:
        ``(tokens, indices)``: the kept tokens ``(B, M, C)`` and their positions in ``x``,
        ``(B, M)`` int64. With ``fuse_pruned`` the fused token is the last of ``tokens``
        and has no index, so ``tokens`` has one row more than ``indices``.

    Example:
        >>> import torch, khot
        >>> x = torch.randn(2, 197, 64)
        >>> attn = torch.softmax(torch.randn(2, 8, 197, 197), dim=-1)
        >>> tokens, indices = khot.nn.TokenPruning(0.7)(x, attn)
        >>> tokens.shape, indices.shape
        (torch.Size([2, 139, 64]), torch.Size([2, 139]))
        >>> bool((indices[:, 0] == 0).all())
        True
    """

    def __init__(self, keep, *, keep_cls: bool = True, fuse_pruned: bool = False):
        super().__init__()
        if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
            raise TypeError(f"keep must be an int or a float rate in (0, 1], got {keep!r}")
        if isinstance(keep, numbers.Integral) and keep < 0:
            raise ValueError(f"keep must be >= 0 when it is a count, got {keep}")
        if not isinstance(keep, numbers.Integral) and not 0 < keep <= 1:
            raise ValueError(f"keep must lie in (0, 1] when it is a rate, got {keep}")
        self.keep, self.keep_cls, self.fuse_pruned = keep, keep_cls, fuse_pruned

    def forward(self, x: torch.Tensor, attn: torch.Tensor | None = None, *, scores: torch.Tensor | None = None):
        check_tensor("x", x, floating=True)
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, N, C), got shape {tuple(x.shape)}")
        first = 1 if self.keep_cls else 0
        if (attn is None) == (scores is None):
            raise ValueError("pass exactly one of attn and scores")
        if attn is not None:
            check_tensor("attn", attn, floating=True)
            b, n = x.shape[:2]
            if attn.dim() != 4 or attn.shape[0] != b or attn.shape[2:] != (n, n):
                raise ValueError(f"attn must have shape (B, H, N, N) = ({b}, H, {n}, {n}), got {tuple(attn.shape)}")
            scores = attn[:, :, 0, first:].mean(1)
        candidates = x[:, first:]
        check_tensor("scores", scores, floating=True)
        if scores.shape != candidates.shape[:2]:
            who = "N - 1 (all tokens but [CLS])" if self.keep_cls else "N"
            raise ValueError(f"scores must have shape (B, {who}) = {tuple(candidates.shape[:2])}, got {tuple(scores.shape)}")
        count = candidates.shape[1]  # a rate rounds up, ignoring float error in rate * count (0.07 * 100 = 7.000000000000001)
        keep = self.keep if isinstance(self.keep, numbers.Integral) else math.ceil(round(self.keep * count, 9))
        if keep > candidates.shape[1]:
            raise ValueError(f"keep={self.keep} is more than the {candidates.shape[1]} tokens that compete")
        tokens, chosen = select_topk(candidates, scores, int(keep))
        indices = chosen + first
        if self.keep_cls:
            tokens = torch.cat([x[:, :1], tokens], 1)
            indices = torch.cat([indices.new_zeros(indices.shape[0], 1), indices], 1)
        if self.fuse_pruned:
            weights = scores.scatter(1, chosen, 0).unsqueeze(-1)  # the kept tokens weigh nothing
            fused = (weights * candidates).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1e-12)
            tokens = torch.cat([tokens, fused.to(tokens.dtype)], 1)
        return tokens, indices

    def extra_repr(self) -> str:
        return f"keep={self.keep}, keep_cls={self.keep_cls}, fuse_pruned={self.fuse_pruned}"
