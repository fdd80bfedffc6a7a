"""Token pruning for vision transformers: keep the tokens the [CLS] token attends to most."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .._checks import check_flag, check_range, check_tensor
from ..exact import select_topk

__all__ = ["TokenPruning"]


class TokenPruning(nn.Module):
    """Top-k token pruning: EViT (Liang et al. 2022), and the "Top-K" of Haurum et al. 2023.

    ``forward(x, attn)`` takes tokens ``x`` of shape ``(B, N, C)`` whose token 0 is [CLS]
    and attention weights ``attn`` of shape ``(B, H, N, N)``. Each token is scored by the
    attention the [CLS] query pays it, averaged over heads, and the best are kept in
    order of decreasing score (ties: lower index first). Scores may be given instead of
    ``attn`` with ``forward(x, scores=s)``.

    Args:
        keep: how many tokens to keep besides [CLS]: an int, or a float rate in (0, 1]
            of the ``N'`` tokens that compete, which keeps ``ceil(rate * N')`` of them.
        keep_cls: if ``True`` (default) [CLS] is always kept, placed first, and the other
            ``N' = N - 1`` tokens compete (``scores`` then has shape ``(B, N - 1)``). If
            ``False`` all ``N' = N`` tokens compete, [CLS] included (``scores``: ``(B, N)``).
        fuse_pruned: append EViT's fused token, the sum of the pruned tokens weighted by
            their scores, ``sum_i s_i x_i`` (zero when nothing is pruned). The scores must
            then be non-negative (attention weights, not logits): a ``ValueError`` otherwise.

    Returns:
        ``(tokens, indices)``: the kept tokens ``(B, M, C)`` and their positions in ``x``,
        ``(B, M)`` int64. With ``fuse_pruned`` the fused token is the last of ``tokens``
        and has no index, so ``tokens`` has one row more than ``indices``.

    A rate rounds up, as EViT's code does (``ceil(keep_rate * (N - 1))``), so a rate
    reproduces EViT's models. Haurum et al.'s code rounds down; give it the count as an int.
    Both prune DeiT-S (197 tokens) at its 4th, 7th and 10th layers; at keep rate 0.7:

        >>> import torch, khot
        >>> def attention(n):
        ...     return torch.softmax(torch.randn(2, 6, n, n), -1)
        >>> x, sizes = torch.randn(2, 197, 64), []
        >>> evit = khot.nn.TokenPruning(0.7, fuse_pruned=True)  # EViT: keep ceil(0.7 * (N - 1)), fuse the rest
        >>> for layer in range(3):
        ...     x, indices = evit(x, attention(x.shape[1]))
        ...     sizes.append(x.shape[1])
        >>> sizes  # [CLS], the kept tokens and the fused one
        [140, 100, 72]
        >>> x, sizes = torch.randn(2, 197, 64), []
        >>> for keep in (137, 95, 66):  # Haurum et al.: keep floor(0.7 * (N - 1))
        ...     x, indices = khot.nn.TokenPruning(keep)(x, attention(x.shape[1]))
        ...     sizes.append(x.shape[1])
        >>> sizes
        [138, 96, 67]
        >>> bool((indices[:, 0] == 0).all())  # [CLS] stays first
        True
    """

    def __init__(self, keep: int | float, *, keep_cls: bool = True, fuse_pruned: bool = False) -> None:
        super().__init__()
        if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
            raise TypeError(f"keep must be an int or a float rate in (0, 1], got {keep!r}")
        if isinstance(keep, numbers.Integral) and keep < 0:
            raise ValueError(f"keep must be >= 0 when it is a count, got {keep}")
        if not isinstance(keep, numbers.Integral) and not 0 < keep <= 1:
            raise ValueError(f"keep must lie in (0, 1] when it is a rate, got {keep}")
        self.keep = keep
        self.keep_cls = check_flag("keep_cls", keep_cls)
        self.fuse_pruned = check_flag("fuse_pruned", fuse_pruned)

    def forward(
        self, x: torch.Tensor, attn: torch.Tensor | None = None, *, scores: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor("x", x, floating=True)
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, N, C), got shape {tuple(x.shape)}")
        first = 1 if self.keep_cls else 0
        if (attn is None) == (scores is None):
            raise ValueError("pass exactly one of attn and scores")
        if x.shape[1] == 0 and (self.keep_cls or attn is not None):
            raise ValueError("x has no tokens: keep_cls and attention scores need token 0 (the [CLS] token)")
        if attn is not None:
            check_tensor("attn", attn, floating=True)
            b, n = x.shape[:2]
            if attn.dim() != 4 or attn.shape[0] != b or attn.shape[2:] != (n, n):
                raise ValueError(f"attn must have shape (B, H, N, N) = ({b}, H, {n}, {n}), got {tuple(attn.shape)}")
            if attn.device != x.device:
                raise ValueError(f"attn is on {attn.device} but x is on {x.device}")
            scores = attn[:, :, 0, first:].mean(1)
        candidates = x[:, first:]
        check_tensor("scores", scores, floating=True)
        if scores.shape != candidates.shape[:2]:
            who = "N - 1 (all tokens but [CLS])" if self.keep_cls else "N"
            raise ValueError(f"scores must have shape (B, {who}) = {tuple(candidates.shape[:2])}, got {tuple(scores.shape)}")
        count = candidates.shape[1]  # a rate rounds up, ignoring float error in rate * count (0.07 * 100 = 7.000000000000001)
        keep = self.keep if isinstance(self.keep, numbers.Integral) else math.ceil(round(self.keep * count, 9))
        if keep > count:
            raise ValueError(f"keep={self.keep} is more than the {count} tokens that compete")
        if self.fuse_pruned:
            scores = check_range(
                scores, "scores", 0, math.inf, what="be finite and >= 0 to fuse the pruned tokens (attention weights, not logits)"
            )
        tokens, chosen = select_topk(candidates, scores, int(keep))
        indices = chosen + first
        if self.keep_cls:
            tokens = torch.cat([x[:, :1], tokens], 1)
            indices = torch.cat([indices.new_zeros(indices.shape[0], 1), indices], 1)
        if self.fuse_pruned:
            acc = torch.promote_types(torch.promote_types(x.dtype, scores.dtype), torch.float32)
            weights = scores.to(acc).scatter(1, chosen, 0).unsqueeze(1)  # (B, 1, N'); the kept tokens weigh nothing
            fused = torch.bmm(weights, candidates.to(acc))  # EViT's sum_i s_i x_i over the pruned tokens
            tokens = torch.cat([tokens, fused.to(tokens.dtype)], 1)
        return tokens, indices

    def extra_repr(self) -> str:
        return f"keep={self.keep}, keep_cls={self.keep_cls}, fuse_pruned={self.fuse_pruned}"
