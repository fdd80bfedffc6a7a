"""Exact top-k: k-hot masks, "zero all but the top k", and row selection by scores.

Ranking rules, shared by every op here and by every device and backend:

* **Ties**: among equal values the lower index wins. The masks for ``k`` and ``k + 1``
  are therefore nested, and the result does not depend on the device or on ``k``.
* **NaN** ranks above ``+inf``, as in :func:`torch.sort` and :func:`torch.topk`: with
  ``largest=True`` NaNs are selected first, with ``largest=False`` they are selected
  only when a slice has fewer than ``k`` other values. ``+inf`` and ``-inf`` are
  ordinary values; ``-0.0`` ties with ``0.0``.
* ``magnitude=True`` ranks by ``|x|`` (the rules above then apply to ``|x|``; for int64,
  ``|-2**63|`` ranks above every other value).

Each op is one ``torch.library`` custom op (:func:`khot._backend.custom_op`), with these
signatures (a Triton kernel of the same name and signature plugs in, see :mod:`khot._triton`):

* ``khot::topk_mask(x: Tensor, k: int, ks: Optional[Tensor], dim: int, largest: bool,
  magnitude: bool) -> Tensor``: the bool k-hot mask of ``x`` along ``dim`` (``0 <= dim <
  x.dim()``). Without ``ks`` every slice selects ``k`` (``0 <= k <= n``); with ``ks`` (int64,
  shaped like ``x`` without ``dim``) slice ``i`` selects ``ks[i]``, and ``k`` is only a bound,
  ``max(ks) <= k <= n`` (the public functions pass ``n``).
* ``khot::keep_topk(...)``, same arguments: ``x`` zeroed outside that mask (the gradient is
  registered: the incoming one, zeroed outside the mask).
* ``khot::select_topk(scores: Tensor, k: int, sorted: bool) -> Tensor``: int64 indices
  ``(..., k)`` of the top ``k`` of every row (last dim) of ``scores``, by descending score
  (ties: lower index first) when ``sorted``, else in increasing index order.

Their portable path (:mod:`khot.exact._portable`: fixed work, no host synchronisation) is the
default on every device and the fake (meta) implementation; CPU tensors take the tuned
:mod:`khot.exact._cpu` path. Plain eager calls on CPU tensors run that path directly, skipping
the op's dispatch; ``torch.compile``, ``vmap`` and :func:`khot.use_backend` go through the op.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .._backend import custom_op, forced_backend
from .._order import WIDE_UNSIGNED
from .._checks import _readable_cpu, check_count, check_flag, check_rows, check_tensor, normalize_dim
from . import _cpu, _portable

__all__ = ["topk_mask", "keep_topk", "select_topk"]


_topk_mask_op = custom_op("topk_mask", _portable.topk_mask, cpu=_cpu.topk_mask)
_keep_topk_op = custom_op("keep_topk", _portable.keep_topk, cpu=_cpu.keep_topk)
_select_topk_op = custom_op("select_topk", _portable.select_topk, cpu=_cpu.select_topk)


def _keep_setup(ctx, inputs, output):
    x, k, ks, dim, largest, magnitude = inputs
    ctx.save_for_backward(x, ks)
    ctx.args = k, dim, largest, magnitude


def _keep_backward(ctx, grad):  # recomputes the mask; public calls with a gradient take where(mask) instead
    x, ks = ctx.saved_tensors
    k, dim, largest, magnitude = ctx.args
    mask = _topk_mask_op(x, k, ks, dim, largest, magnitude)
    return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None, None, None, None, None


_keep_topk_op.register_autograd(_keep_backward, setup_context=_keep_setup)


def _front(t: Tensor | None, d: int | None, size: int) -> Tensor | None:
    """``t`` with its vmapped dimension ``d`` first (expanded to ``size`` when it has none)."""
    if t is None:
        return None
    return t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)


def _slices_vmap(op):
    def rule(info, in_dims, x, k, ks, dim, largest, magnitude):
        x, ks = _front(x, in_dims[0], info.batch_size), _front(ks, in_dims[2], info.batch_size)
        return op(x, k, ks, dim + 1, largest, magnitude), 0

    return rule


def _select_vmap(info, in_dims, scores, k, sorted):
    return _select_topk_op(_front(scores, in_dims[0], info.batch_size), k, sorted), 0


torch.library.register_vmap(_topk_mask_op, _slices_vmap(_topk_mask_op))
torch.library.register_vmap(_keep_topk_op, _slices_vmap(_keep_topk_op))
torch.library.register_vmap(_select_topk_op, _select_vmap)


def _direct(*tensors: Tensor | None) -> bool:
    """Whether a call may run the CPU path itself, skipping the op's dispatch (plain eager CPU calls)."""
    if not all(t is None or _readable_cpu(t) for t in tensors):
        return False  # compiling, under a torch.func transform or off the CPU: through the op
    return forced_backend() in (None, "cpu")  # read only outside torch.compile, which cannot trace it


def _check_gatherable(name: str, t: torch.Tensor) -> None:
    """uint16, uint32 and uint64 lack most of PyTorch's CPU kernels (comparisons, gather, scatter):
    :func:`topk_mask` ranks them, the ops that return their values do not."""
    if t.dtype in WIDE_UNSIGNED:
        raise TypeError(f"{name} has dtype {t.dtype}, which PyTorch's CPU kernels do not compare or gather; convert it to torch.int64 (topk_mask takes it)")


def _prepare(x, k, dim, largest, magnitude):
    check_tensor("x", x)
    check_flag("largest", largest)
    check_flag("magnitude", magnitude)
    dim = normalize_dim(dim, x.dim())
    if x.dim() == 0:
        x, dim = x.reshape(1), 0
    n = x.shape[dim]
    k = check_count(k, n, x.shape[:dim] + x.shape[dim + 1 :], x.device)
    return x, (k, None) if isinstance(k, int) else (n, k), dim


def topk_mask(x: torch.Tensor, k, dim: int = -1, *, largest: bool = True, magnitude: bool = False) -> torch.Tensor:
    """Boolean k-hot mask of the top ``k`` entries of every slice of ``x`` along ``dim``.

    Args:
        x: a real tensor (floating point or integer).
        k: an int, or an integer tensor of per-slice counts whose shape is that of
            ``x`` without ``dim`` (or broadcasts to it); ``0 <= k <= x.shape[dim]``.
        dim: the dimension to select along.
        largest: select the largest (``True``) or the smallest (``False``) entries.
        magnitude: rank by ``|x|`` instead of ``x``.

    Returns:
        A ``torch.bool`` tensor shaped like ``x`` with exactly ``k`` True entries in every
        slice. Ties go to the lower index; NaN ranks above ``+inf`` (see :mod:`khot.exact`).

    Example:
        >>> import torch, khot
        >>> x = torch.tensor([[1.0, 5.0, 2.0, 5.0], [-9.0, 3.0, 0.0, 1.0]])
        >>> khot.topk_mask(x, 2).int()
        tensor([[0, 1, 0, 1],
                [0, 1, 0, 1]], dtype=torch.int32)
        >>> khot.topk_mask(x, torch.tensor([1, 3]), magnitude=True).int()
        tensor([[0, 1, 0, 0],
                [1, 1, 0, 1]], dtype=torch.int32)
    """
    shape = x.shape if isinstance(x, torch.Tensor) else None
    x, (k, ks), dim = _prepare(x, k, dim, largest, magnitude)
    x = x.detach()
    fn = _cpu.topk_mask if _direct(x, ks) else _topk_mask_op
    return fn(x, k, ks, dim, largest, magnitude).view(shape)


def keep_topk(x: torch.Tensor, k, dim: int = -1, *, largest: bool = True, magnitude: bool = False) -> torch.Tensor:
    """``x`` with all but the top ``k`` entries of every slice along ``dim`` set to zero.

    Same arguments and ranking rules as :func:`topk_mask`. The result has the dtype and
    device of ``x``; the gradient flows to the kept entries only.

    Example:
        >>> import torch, khot
        >>> x = torch.tensor([-1.0, 5.0, -2.0, 8.0, -3.0, 9.0, -10.0, 7.0])
        >>> khot.keep_topk(x, 3)
        tensor([0., 0., 0., 8., 0., 9., 0., 7.])
        >>> khot.keep_topk(x, 3, magnitude=True)
        tensor([  0.,   0.,   0.,   8.,   0.,   9., -10.,   0.])
    """
    shape = x.shape if isinstance(x, torch.Tensor) else None
    x, (k, ks), dim = _prepare(x, k, dim, largest, magnitude)
    _check_gatherable("x", x)
    if _direct(x, ks):
        out = _cpu.keep_topk(x, k, ks, dim, largest, magnitude)  # autograd through its gather and scatter
    elif x.requires_grad:  # autograd through where: one selection, no second one in the backward
        out = torch.where(_topk_mask_op(x.detach(), k, ks, dim, largest, magnitude), x, torch.zeros((), dtype=x.dtype, device=x.device))
    else:
        out = _keep_topk_op(x, k, ks, dim, largest, magnitude)
    return out.view(shape)


def select_topk(x: torch.Tensor, scores: torch.Tensor, k: int, *, sorted: bool = True):
    """The ``k`` rows of ``x`` with the highest ``scores`` (token pruning, kNN, beam search).

    Args:
        x: a tensor of shape ``(..., n, d)``.
        scores: a real tensor of shape ``(..., n)`` (batch dimensions must match ``x``'s).
        k: an int, ``0 <= k <= n``.
        sorted: if ``True`` the rows come by descending score (ties: lower index first);
            if ``False`` they come in increasing index order.

    Returns:
        ``(values, indices)``: ``values`` of shape ``(..., k, d)`` with ``values[..., j, :] ==
        x[..., indices[..., j], :]``, and ``indices`` of shape ``(..., k)``, int64.
        The gradient flows to the selected rows of ``x``; ``scores`` get none.

    Example:
        >>> import torch, khot
        >>> x = torch.arange(8.0).view(4, 2)
        >>> values, indices = khot.select_topk(x, torch.tensor([0.1, 0.9, 0.5, 0.9]), 2)
        >>> indices
        tensor([1, 3])
        >>> values
        tensor([[2., 3.],
                [6., 7.]])
    """
    check_tensor("x", x)
    check_rows(x, scores)
    check_flag("sorted", sorted)
    _check_gatherable("scores", scores)
    if isinstance(k, torch.Tensor):
        raise TypeError(f"k must be an int for select_topk (every slice keeps k rows), got a tensor of shape {tuple(k.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {k!r}")
    k = check_count(k, scores.shape[-1], scores.shape[:-1], scores.device)
    scores = scores.detach()
    indices = (_cpu.select_topk if _direct(scores) else _select_topk_op)(scores, k, sorted)
    values = x.gather(-2, indices.unsqueeze(-1).expand(*indices.shape, x.shape[-1]))
    return values, indices
