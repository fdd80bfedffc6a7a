"""Differentiable top-k: relaxed k-hot masks and soft selection of k rows, one API over every method.

The methods, and what each supports, are the records of :func:`khot.methods` (the registry in
:mod:`khot.relaxed.registry`; the README's "Methods" table is generated from it).
``temperature`` is every method's sharpness (smaller is closer to exact top-k); ``None``
takes the method's own default (``Method.default_temperature``), which is tuned for scores of
order one.
"""

from __future__ import annotations

from . import registry
from .registry import methods

__all__ = ["soft_topk", "soft_select", "methods", "registry"]

# Views of the registry by name, ``(function, default temperature)``, for ``khot.bench`` until it reads
# :func:`methods` directly (derived here: the registry stays the one list of methods).
MASK_METHODS = {m.name: (m.mask, m.default_temperature) for m in methods() if m.mask is not None}
SELECT_METHODS = {m.name: (m.select, m.default_temperature) for m in methods() if m.select is not None}


def soft_topk(x, k, dim: int = -1, *, method: str = "sigmoid", temperature=None, **method_options):
    """A relaxed k-hot mask of ``x`` along ``dim``, one value per element.

    ``method`` names a record of :func:`khot.methods`, which says what it guarantees: the range
    of the values (``output_range``: ``[0, 1]`` for most; ``iterative`` and ``gumbel`` can exceed 1
    on near-ties), whether they sum to ``k`` (``sums_to_k``), which ``k`` it takes (an int; a real
    number where ``real_k``; a tensor of per-slice counts where ``per_row_k``) and its gradients.
    The default ``"sigmoid"`` (:func:`khot.sigmoid_topk`) lies in [0, 1] and sums to ``k``.
    ``temperature=None`` takes the method's default; ``method_options`` go to the method's
    function (e.g. ``generator`` for the stochastic ones).

    Example:
        >>> import torch, khot
        >>> x = torch.tensor([0.1, 2.0, -1.0, 3.0])
        >>> round(khot.soft_topk(x, 2).sum().item(), 4)
        2.0
        >>> khot.soft_topk(x, 2, method="halving").round(decimals=3)
        tensor([0., 1., 0., 1.])
    """
    m = registry.get(method)
    return m.mask(x, k, dim, temperature=m.default_temperature if temperature is None else temperature, **method_options)


def soft_select(x, scores, k: int, *, method: str = "halving", temperature=None, **method_options):
    """The ``k`` rows of ``x (..., n, d)`` with the best ``scores (..., n)``, relaxed: the soft top-k
    operator Γ of Pietruszka, Borchmann & Graliński ("Successive Halving Top-k Operator", AAAI 2021).

    Returns ``(..., k, d)``, exactly ``k`` rows, differentiable with respect to ``x`` and
    ``scores``. In the sharp limit the rows are the top-k rows, best first, except where a method
    documents otherwise. ``method``: any record of :func:`khot.methods` with a ``select``
    function (``"halving"``, the default, ``"iterative"``, ``"counting"``). The mask-only methods
    (``"sigmoid"``, ...) relax membership, not order: weight the rows by :func:`khot.soft_topk`.

    Example:
        >>> import torch, khot
        >>> x = torch.eye(4)
        >>> khot.soft_select(x, torch.tensor([0.1, 0.9, 0.3, 0.8]), 2).round(decimals=2)
        tensor([[0., 1., 0., 0.],
                [0., 0., 0., 1.]])
    """
    m = select_method(method)
    return m.select(x, scores, k, temperature=m.default_temperature if temperature is None else temperature, **method_options)


def select_method(method: str) -> registry.Method:
    """The record of a :func:`soft_select` method; a clear error for a mask-only or unknown one."""
    m = registry.get(method)
    if m.select is None:
        rows = ", ".join(repr(r.name) for r in methods() if r.select is not None)
        raise ValueError(
            f"method={method!r} relaxes top-k membership, not the order of k rows, so it has no soft_select; "
            f"use soft_topk(scores, k) to weight the rows, or one of {rows}"
        )
    return m
