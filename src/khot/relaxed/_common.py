"""Argument handling and row plumbing shared by the relaxations of :mod:`khot.relaxed`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from khot._checks import check_count, check_positive, check_rows, check_tensor, normalize_dim

_BLOCK_ELEMENTS = 1 << 22  # elements of one (batch, block, n) intermediate


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (fp32 accumulation), float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_k(k, n: int, batch_shape: torch.Size, device: torch.device, what: str, *, per_row: bool = False):
    """A count ``1 <= k <= n``; a per-row tensor only where ``per_row``. ``what`` names the
    dimension of size ``n`` in the error when it is empty."""
    if isinstance(k, Tensor) and not per_row:
        raise TypeError(f"k must be a Python int for this method, got a tensor of shape {tuple(k.shape)}")
    if n == 0:
        raise ValueError(f"{what} has size 0: there are no items to select k of")
    return check_count(k, n, batch_shape, device, low=1)


def _check_mask_args(scores, k, dim, temperature, *, per_row: bool = False):
    """Validate the arguments of a mask function; return ``(dim, k, temperature)``."""
    check_tensor("scores", scores, floating=True)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension, got a 0-d tensor")
    dim = normalize_dim(dim, scores.dim())
    batch_shape = scores.shape[:dim] + scores.shape[dim + 1 :]
    what = f"dimension dim={dim} of scores (shape {tuple(scores.shape)})"
    k = _check_k(k, scores.shape[dim], batch_shape, scores.device, what, per_row=per_row)
    return dim, k, _scalar_temperature(temperature)


def _check_select_args(x, scores, k, temperature):
    """Validate ``x (..., n, d)``, ``scores (..., n)``, ``k`` and ``temperature``."""
    check_tensor("x", x, floating=True)
    check_rows(x, scores)
    k = _check_k(k, x.shape[-2], x.shape[:-2], x.device, f"the row dimension of x (shape {tuple(x.shape)}, n = x.shape[-2])")
    return k, _scalar_temperature(temperature)


def _scalar_temperature(temperature):
    """These methods take one temperature for all slices: a positive float, or a one-element
    floating tensor, returned 0-d (never read on the host: it stays differentiable and traceable)."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise TypeError(
                "temperature must be a float or a one-element tensor for this method (one for all slices), "
                f"got a tensor of shape {tuple(temperature.shape)}"
            )
        temperature = temperature.reshape(())
    return check_positive("temperature", temperature)


def _rowwise(fn: Callable[[Tensor], Tensor], scores: Tensor, dim: int) -> Tensor:
    """Apply ``fn`` to ``scores`` as (rows, n) in the compute dtype; restore layout and dtype. A NaN
    score makes its slice NaN (a sort would rank it first and select it)."""
    s = scores.movedim(dim, -1)
    rows = s.reshape(-1, s.shape[-1]).to(_compute_dtype(scores))
    out = fn(rows).masked_fill(rows.isnan().any(-1, keepdim=True), math.nan)
    return out.reshape(s.shape).movedim(-1, dim).to(scores.dtype)


def _select_rows(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, scores: Tensor, k: int) -> Tensor:
    """Apply ``fn(x (N, n, d), scores (N, n)) -> (N, k, d)`` to flattened batches."""
    dtype = _compute_dtype(x, scores)
    n, d = x.shape[-2:]
    if d == 0:  # rows of width 0: nothing to combine
        return x.new_zeros(*x.shape[:-2], k, 0)
    s = scores.reshape(-1, n).to(dtype)
    out = fn(x.reshape(-1, n, d).to(dtype), s).masked_fill(s.isnan().any(-1)[:, None, None], math.nan)  # as _rowwise
    return out.reshape(*x.shape[:-2], k, d).to(x.dtype)


def _blocks(total: int, row_elements: int) -> Iterator[slice]:
    """Split ``range(total)`` into blocks of about ``_BLOCK_ELEMENTS / row_elements`` items."""
    size = max(1, _BLOCK_ELEMENTS // max(1, row_elements))
    return (slice(i, min(i + size, total)) for i in range(0, max(total, 1), size))
