"""Modules over the differentiable relaxations of :mod:`khot.relaxed` (methods from :func:`khot.methods`)."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .._checks import check_positive
from ..relaxed import registry, select_method, soft_select, soft_topk
from ._args import check_size

__all__ = ["SoftTopK", "SoftSelect"]


def _check_temperature(temperature):
    return None if temperature is None else check_positive("temperature", temperature)


def _check_k(k, method: registry.Method):
    """``k`` as far as it can be checked before the input's size is known, by what ``method`` accepts."""
    if isinstance(k, torch.Tensor):
        if not method.per_row_k:
            raise TypeError(f"k must be an int for method={method.name!r} (no per-slice counts), got a tensor")
        return k  # checked against the input at forward
    if not method.real_k:
        return check_size("k", k, 1)
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be a number or a tensor for method={method.name!r}, got {k!r}")
    if not k >= 0:
        raise ValueError(f"k={k} is out of range: expected 0 <= k <= n (the size of the reduced dimension)")
    return k


def _options(method, temperature, options) -> str:
    extra = "".join(f", {name}={value!r}" for name, value in options.items())
    return f"method={method!r}, temperature={temperature}{extra}"


class SoftTopK(nn.Module):
    """A relaxed k-hot mask along ``dim``: a module around :func:`khot.soft_topk`.

    The arguments are checked when the module is built, against what the method's record in
    :func:`khot.methods` accepts (``k``, the ``method_options``).

    Example:
        >>> import torch, khot
        >>> layer = khot.nn.SoftTopK(2, temperature=0.5)
        >>> layer
        SoftTopK(k=2, dim=-1, method='sigmoid', temperature=0.5)
        >>> layer(torch.randn(3, 10)).sum(-1).round(decimals=4)
        tensor([2., 2., 2.])
    """

    def __init__(self, k, dim: int = -1, *, method: str = "sigmoid", temperature=None, **method_options):
        super().__init__()
        record = registry.get(method)
        registry.check_options(record, record.mask, method_options)
        self.k, self.dim, self.method, self.method_options = _check_k(k, record), dim, method, method_options
        self.temperature = _check_temperature(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return soft_topk(x, self.k, self.dim, method=self.method, temperature=self.temperature, **self.method_options)

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}, " + _options(self.method, self.temperature, self.method_options)


class SoftSelect(nn.Module):
    """Relaxed selection of the ``k`` best-scored rows: a module around :func:`khot.soft_select`.

    Example:
        >>> import torch, khot
        >>> layer = khot.nn.SoftSelect(4, method="iterative")
        >>> layer(torch.randn(2, 16, 8), torch.rand(2, 16)).shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, k: int, *, method: str = "halving", temperature=None, **method_options):
        super().__init__()
        record = select_method(method)
        registry.check_options(record, record.select, method_options)
        self.k, self.method, self.method_options = check_size("k", k, 1), method, method_options
        self.temperature = _check_temperature(temperature)

    def forward(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return soft_select(x, scores, self.k, method=self.method, temperature=self.temperature, **self.method_options)

    def extra_repr(self) -> str:
        return f"k={self.k}, " + _options(self.method, self.temperature, self.method_options)
