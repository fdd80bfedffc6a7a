"""Quality metrics for relaxed top-k selection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from khot._checks import check_tensor

__all__ = ["nccs"]


def nccs(selected: Tensor, target: Tensor) -> Tensor:
    """Normalized Chamfer cosine similarity (Pietruszka et al. 2020).

    For every target vector (a row of the exact top-k), the best cosine similarity
    among the selected vectors, averaged over the targets:
    ``nCCS = 1/k * sum_i max_j cos(target_i, selected_j)``.  It is 1 when the
    selection is the target set in any order.  Zero vectors have cosine 0 with
    everything.  Computed in at least float32.

    Args:
        selected: ``(..., k, d)``, the soft selection.
        target: ``(..., k, d)``, the exact top-k rows (same shape).

    Returns:
        A tensor of shape ``(...)``.

    >>> target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> nccs(target.flip(0), target).item()
    1.0
    >>> round(nccs(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), target).item(), 4)
    0.8536
    """
    check_tensor("selected", selected, floating=True)
    check_tensor("target", target, floating=True)
    if target.dim() < 2 or target.shape[-2] == 0:
        raise ValueError(f"target must have shape (..., k, d) with k >= 1, got {tuple(target.shape)}")
    if selected.shape != target.shape:
        raise ValueError(
            f"selected and target must have the same shape (..., k, d), "
            f"got {tuple(selected.shape)} and {tuple(target.shape)}"
        )
    if selected.device != target.device:
        raise ValueError(f"selected is on {selected.device} but target is on {target.device}")
    dtype = torch.promote_types(torch.promote_types(selected.dtype, target.dtype), torch.float32)
    a, b = _unit(selected.to(dtype)), _unit(target.to(dtype))
    return (b @ a.transpose(-1, -2)).amax(dim=-1).mean(dim=-1)


def _unit(v: Tensor) -> Tensor:
    """The rows of ``v`` scaled to norm 1 (zero rows stay 0). Scaled by their largest entry first: a
    norm of 1e30-sized entries overflows float32, and one below normalize's eps (1e-12) was not
    normalised."""
    scale = v.abs().amax(-1, keepdim=True)
    return F.normalize(v / torch.where(scale > 0, scale, 1), dim=-1)
