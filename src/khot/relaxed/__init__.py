"""Differentiable top-k: relaxed k-hot masks and soft selection of k rows, one API over every method.

=============  ==================================  ==========================  =====================
method         mask (``soft_topk``)                rows (``soft_select``)      cost per slice
=============  ==================================  ==========================  =====================
``sigmoid``    sigmoid(x/τ + c), sums to k         (not defined: a mask only)  O(n), a few passes
``halving``    tournament weights, sums to k       successive halving          O(n log(n/k))
``iterative``  peaked-softmax weights, sums to k   iterative peaked softmax    O(k n)
``counting``   sigmoid of soft ranks, ≈ k          soft "j-th best" slots      O(n²), chunked
=============  ==================================  ==========================  =====================

``temperature`` is every method's sharpness (smaller is closer to exact top-k); ``None``
takes the method's own default, which is tuned for scores of order one.
"""

from __future__ import annotations

from .._checks import check_choice
from . import counting, halving, iterative, sigmoid

__all__ = ["soft_topk", "soft_select", "MASK_METHODS", "SELECT_METHODS"]

MASK_METHODS = {
    "sigmoid": (sigmoid.sigmoid_topk, 1.0),
    "halving": (halving.halving_topk, halving.DEFAULT_TEMPERATURE),
    "iterative": (iterative.iterative_topk, iterative.DEFAULT_TEMPERATURE),
    "counting": (counting.counting_topk, counting.DEFAULT_TEMPERATURE),
}
SELECT_METHODS = {
    "halving": (halving.halving_select, halving.DEFAULT_TEMPERATURE),
    "iterative": (iterative.iterative_select, iterative.DEFAULT_TEMPERATURE),
    "counting": (counting.counting_select, counting.DEFAULT_TEMPERATURE),
}


def soft_topk(x, k, dim: int = -1, *, method: str = "sigmoid", temperature=None, **method_options):
    """A relaxed k-hot mask of ``x`` along ``dim``: values in [0, 1], one per element.

    ``method`` is one of ``"sigmoid"`` (default; sums to ``k`` exactly, real-valued or
    per-slice ``k``, see :func:`khot.sigmoid_topk`), ``"halving"``, ``"iterative"`` (both
    sum to ``k`` exactly) and ``"counting"`` (sums to ``k`` up to clusters of near-ties).
    ``temperature=None`` takes the method's default (1.0 for sigmoid).

    Example:
        >>> import torch, khot
        >>> x = torch.tensor([0.1, 2.0, -1.0, 3.0])
        >>> khot.soft_topk(x, 2).sum().item()
        2.0
        >>> khot.soft_topk(x, 2, method="halving").round(decimals=3)
        tensor([0., 1., 0., 1.])
    """
    fn, default = _mask_method(method)
    return fn(x, k, dim, temperature=default if temperature is None else temperature, **method_options)


def soft_select(x, scores, k: int, *, method: str = "halving", temperature=None, **method_options):
    """Γ of seed 002: the ``k`` rows of ``x (..., n, d)`` with the best ``scores (..., n)``, relaxed.

    Returns ``(..., k, d)``, exactly ``k`` rows (best first in the sharp limit),
    differentiable with respect to ``x`` and ``scores``. ``method``: ``"halving"``
    (default), ``"iterative"`` or ``"counting"``. Sigmoid top-k relaxes membership, not
    order, so it has no row selection: weight rows by ``soft_topk`` instead.

    Example:
        >>> import torch, khot
        >>> x = torch.eye(4)
        >>> khot.soft_select(x, torch.tensor([0.1, 0.9, 0.3, 0.8]), 2).round(decimals=2)
        tensor([[0., 1., 0., 0.],
                [0., 0., 0., 1.]])
    """
    fn, default = _select_method(method)
    return fn(x, scores, k, temperature=default if temperature is None else temperature, **method_options)


def _mask_method(method: str):
    """``(function, default temperature)`` of a :func:`soft_topk` method; a clear error otherwise."""
    return MASK_METHODS[check_choice("method", method, tuple(MASK_METHODS))]


def _select_method(method: str):
    """``(function, default temperature)`` of a :func:`soft_select` method; a clear error otherwise."""
    if method == "sigmoid":
        raise ValueError(
            "method='sigmoid' relaxes top-k membership, not the order of k rows, so it has no soft_select; "
            f"use soft_topk(scores, k) to weight the rows, or one of {', '.join(map(repr, SELECT_METHODS))}"
        )
    return SELECT_METHODS[check_choice("method", method, tuple(SELECT_METHODS))]
