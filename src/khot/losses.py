"""Losses built on the relaxed top-k masks of :func:`khot.soft_topk` (any method of :func:`khot.methods`).

* :func:`topk_loss`: top-k classification ("k-accuracy"): ``-log P(true class in the top k)``
  with ``P`` the relaxed top-k mask of the logits, as in the differentiable-sorting line of work
  (Petersen, Borgelt, Kuehne & Deussen, "Differentiable Top-k Classification Learning", ICML 2022),
  here with any relaxation of khot instead of a sorting network.
* :func:`khot_loss`: k-hot multi-label classification: the relaxed top-k mask of the logits, with
  ``k`` the number of true labels of each example, fitted to the label set by binary cross-entropy.

Both go through ``binary_cross_entropy``, whose logarithm is clamped at -100: the losses stay
finite (and their gradients too) when a method puts an exact 0 or 1 on a class (``sparse``,
sharp temperatures). As the temperature tends to 0 the mask tends to the exact top-k mask, so
:func:`topk_loss` tends to 0 on examples whose class is in the top k and to 100 on the others
(a scaled 0/1 top-k error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_choice, check_range, check_tensor, checked
from .relaxed import registry, soft_topk

__all__ = ["topk_loss", "khot_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _check_logits(logits) -> Tensor:
    check_tensor("logits", logits, floating=True)
    if logits.dim() == 0:
        raise ValueError("logits must have shape (..., n_classes), got a 0-d tensor")
    return logits


def topk_loss(
    logits: Tensor, target: Tensor, k, *, method: str = "sigmoid", temperature=None, reduction: str = "mean", **method_options
) -> Tensor:
    """Top-k classification loss: ``-log p[target]`` with ``p = soft_topk(logits, k, -1, method=...)``.

    Args:
        logits: ``(..., n_classes)`` floating-point scores.
        target: ``(...)`` integer class indices in ``[0, n_classes)``.
        k: the ``k`` of top-k accuracy (what ``method`` accepts: an int, a real number or a per-example tensor).
        method, temperature, method_options: the relaxation (:func:`khot.soft_topk`).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (one loss per example).

    Example:
        >>> import torch, khot
        >>> logits = torch.tensor([[2.0, 1.0, -1.0, 0.0], [0.0, 0.1, 3.0, 2.9]])
        >>> target = torch.tensor([1, 0])  # in the top 2 of the first row, not of the second
        >>> loss = khot.losses.topk_loss(logits, target, 2, temperature=0.1, reduction="none")
        >>> [f"{v:.3g}" for v in loss.tolist()]
        ['0.00672', '15']
        >>> khot.losses.topk_loss(logits, target, 2).item() > 0
        True
    """
    logits = _check_logits(logits)
    check_choice("reduction", reduction, _REDUCTIONS)
    check_tensor("target", target)
    if target.is_floating_point():
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    n = logits.shape[-1]
    target = check_range(target, "target", 0, n - 1, what=f"hold class indices in [0, {n - 1}]")
    p = soft_topk(logits, k, -1, method=method, temperature=temperature, **method_options)
    hit = p.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    hit = hit.float() if hit.dtype in (torch.float16, torch.bfloat16) else hit
    hit = hit.clamp(max=1)  # methods whose values can exceed 1 (iterative, gumbel): P <= 1
    return _reduce(F.binary_cross_entropy(hit, torch.ones_like(hit), reduction="none"), reduction)


def khot_loss(
    logits: Tensor, targets: Tensor, *, method: str = "sigmoid", temperature=None, reduction: str = "mean", **method_options
) -> Tensor:
    """k-hot multi-label loss: binary cross-entropy between the relaxed top-k mask of ``logits`` and
    the k-hot ``targets``, with ``k`` the number of labels of each example (summed over classes).

    Args:
        logits: ``(..., n_classes)`` floating-point scores.
        targets: ``(..., n_classes)`` labels, bool or 0/1 numbers; each example's count is its ``k``
            (so ``method`` must take per-example counts: see ``per_row_k`` in :func:`khot.methods`).
        method, temperature, method_options: the relaxation (:func:`khot.soft_topk`).
        reduction: ``"mean"`` (over examples, default), ``"sum"`` or ``"none"``.

    It is 0 exactly when the relaxed mask equals the label set, which requires the labels to be
    the top-``k`` logits and a sharp relaxation; unlike independent per-class sigmoids it ties
    the classes together (the mask sums to ``k``), so it ranks the true labels above the others.

    Example:
        >>> import torch, khot
        >>> logits = torch.tensor([[3.0, -1.0, 2.0, 0.0], [0.0, 2.0, 1.0, -2.0]])
        >>> labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]])
        >>> loss = khot.losses.khot_loss(logits, labels, temperature=0.1, reduction="none")
        >>> [f"{v:.3g}" for v in loss.tolist()]
        ['9.08e-05', '0.0134']
    """
    logits = _check_logits(logits)
    check_choice("reduction", reduction, _REDUCTIONS)
    if not isinstance(targets, torch.Tensor) or targets.is_complex():
        raise TypeError(f"targets must be a bool or real tensor of 0/1 labels, got {type(targets).__name__}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the shape of logits, {tuple(logits.shape)}, got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits are on {logits.device}")
    targets = check_range(targets.to(logits.dtype if logits.dtype == torch.float64 else torch.float32), "targets", 0, 1, what="be 0 or 1")
    targets = checked(targets, targets * (1 - targets), "targets", 0, 0, what="be 0 or 1, not a fraction (t (1 - t) is 0 only there)")
    counts = targets.sum(-1).round()
    k = counts if registry.get(method).real_k else counts.long()  # the method's record says which k it takes
    p = soft_topk(logits, k, -1, method=method, temperature=temperature, **method_options)
    p = p.to(targets.dtype).clamp(max=1)  # methods whose values can exceed 1 (iterative, gumbel)
    return _reduce(F.binary_cross_entropy(p, targets, reduction="none").sum(-1), reduction)
