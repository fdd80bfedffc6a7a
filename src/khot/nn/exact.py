"""Modules over the exact ops of :mod:`khot.exact`."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_flag
from ..exact import keep_topk
from ._args import check_size

__all__ = ["TopK"]


class TopK(nn.Module):
    """Zero all but the top ``k`` entries along ``dim``: a module around :func:`khot.keep_topk`.

    Example:
        >>> import torch, khot
        >>> layer = khot.nn.TopK(2)
        >>> layer
        TopK(k=2, dim=-1)
        >>> layer(torch.tensor([[0.5, -3.0, 2.0, 1.0]]))
        tensor([[0., 0., 2., 1.]])
    """

    def __init__(self, k: int, dim: int = -1, *, largest: bool = True, magnitude: bool = False):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {dim!r}")
        self.k, self.dim = check_size("k", k, 0), dim
        self.largest, self.magnitude = check_flag("largest", largest), check_flag("magnitude", magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return keep_topk(x, self.k, self.dim, largest=self.largest, magnitude=self.magnitude)

    def extra_repr(self) -> str:
        extra = "" if self.largest else ", largest=False"
        extra += ", magnitude=True" if self.magnitude else ""
        return f"k={self.k}, dim={self.dim}{extra}"
