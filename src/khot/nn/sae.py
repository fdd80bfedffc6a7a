"""Sparse-autoencoder activations: TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_count, check_flag, check_positive, check_tensor
from ..exact import select_topk, topk_mask
from ._args import check_size

__all__ = ["TopKActivation", "BatchTopK"]


def _rows(x: Tensor) -> Tensor:
    check_tensor("x", x, floating=True)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., n), got a 0-d tensor")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # -1 cannot be inferred when n = 0


class TopKActivation(nn.Module):
    """Keep the ``k`` largest pre-activations of every row, then ReLU: ``relu(topk(x))``.

    The TopK activation of sparse autoencoders (Gao et al. 2024, "Scaling and evaluating
    sparse autoencoders"), along the last dimension, by khot's exact rule (ties go to the
    lower index, see :mod:`khot.exact`). With ``dense=True`` it returns a tensor shaped
    like ``x``, zero outside the kept entries. With ``dense=False`` it returns
    ``(values, indices)``, both ``(..., k)``, indices int64 in increasing order, without
    ever building a tensor of the size of ``x``: feed them to a decoder that gathers
    (``W_dec[indices]``, or ``F.embedding_bag(indices, W_dec, per_sample_weights=values)``).
    Unless a row ties at its k-th value, the selection only reads chunk maxima and
    ``k * m`` candidates of each row (``benchmarks/sampling.py``: a small fraction of the
    dense pattern's peak memory). Same in train and eval mode.

    Example:
        >>> import torch, khot
        >>> act = khot.nn.TopKActivation(2)
        >>> act
        TopKActivation(k=2)
        >>> x = torch.tensor([[0.5, -1.0, 3.0, 2.0], [-2.0, -1.0, 0.5, -3.0]])
        >>> act(x)
        tensor([[0.0000, 0.0000, 3.0000, 2.0000],
                [0.0000, 0.0000, 0.5000, 0.0000]])
        >>> khot.nn.TopKActivation(2, dense=False)(x)
        (tensor([[3.0000, 2.0000],
                [0.0000, 0.5000]]), tensor([[2, 3],
                [1, 2]]))
    """

    def __init__(self, k: int, *, relu: bool = True, dense: bool = True):
        super().__init__()
        self.k, self.relu, self.dense = check_size("k", k), check_flag("relu", relu), check_flag("dense", dense)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        rows = _rows(x)
        k = check_count(self.k, rows.shape[1], rows.shape[:1], rows.device)
        indices = select_topk(rows.unsqueeze(-1), rows.detach(), k, sorted=False)[1]
        values = rows.gather(1, indices)
        values = values.relu() if self.relu else values
        if self.dense:
            return torch.zeros_like(rows).scatter_(1, indices, values).view(x.shape)
        shape = x.shape[:-1] + (k,)
        return values.view(shape), indices.view(shape)

    def extra_repr(self) -> str:
        return f"k={self.k}" + ("" if self.relu else ", relu=False") + ("" if self.dense else ", dense=False")


class BatchTopK(nn.Module):
    """BatchTopK (Bussmann, Leask & Nanda 2024): keep the ``k * B`` largest of a whole batch.

    ``x`` is ``(..., n)`` with ``B`` rows (the product of the leading dimensions). In
    training mode the ``k * B`` largest entries of the flattened batch are kept (by
    :func:`khot.topk_mask`), so rows get a variable number of active latents that
    averages ``k``; then ReLU if ``relu``. Each training call also updates a running
    ``threshold``, the smallest kept activation (the smallest kept positive one when
    ``relu``), as an exponential moving average: ``threshold ← (1 - momentum) *
    threshold + momentum * batch_minimum`` (the first batch sets it; ``momentum=1e-3`` is
    ``1 - β`` of the reference implementation in ``saprmarks/dictionary_learning``). In
    eval mode the output is ``x * (x > threshold)``: a per-element rule, independent of the
    other rows, that keeps about ``k`` latents per row on data like the training data.
    Until a training step has run (or a state dict with a threshold is loaded), eval mode uses
    the batch rule too. Which rule runs is a Python flag set by those two events, not a test of
    the threshold's value, so a call never waits for the device (no host synchronisation) and
    compiles without a graph break; a threshold still NaN after training (no batch had a kept
    positive activation) keeps nothing.

    Example:
        >>> import torch, khot
        >>> act = khot.nn.BatchTopK(2)
        >>> act
        BatchTopK(k=2, momentum=0.001)
        >>> x = torch.tensor([[5.0, 4.0, 3.0, 0.1], [0.2, 0.3, -1.0, 0.0]])
        >>> act(x)  # 4 largest of the batch: the first row takes all of them
        tensor([[5.0000, 4.0000, 3.0000, 0.0000],
                [0.0000, 0.3000, 0.0000, 0.0000]])
        >>> act.threshold
        tensor(0.3000)
        >>> act.eval()(x)
        tensor([[5., 4., 3., 0.],
                [0., 0., 0., 0.]])
    """

    threshold: Tensor

    def __init__(self, k: int, *, relu: bool = True, momentum: float = 1e-3):
        super().__init__()
        self.k, self.relu = check_size("k", k), check_flag("relu", relu)
        self.momentum = check_positive("momentum", momentum)
        if self.momentum > 1:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum!r}")
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self._fitted = False  # whether the threshold is a training estimate, see the class docstring

    def forward(self, x: Tensor) -> Tensor:
        rows = _rows(x)
        k = check_count(self.k, rows.shape[1], rows.shape[:1], rows.device)
        if not self.training and self._fitted:
            return torch.where(x > self.threshold, x, 0)
        flat = rows.reshape(-1)
        kept = topk_mask(flat, k * rows.shape[0])
        out = torch.where(kept, flat, 0)
        if self.training:
            with torch.no_grad():
                candidates = flat.masked_fill(~(kept & (flat > 0)) if self.relu else ~kept, torch.inf)
                minimum = torch.cat([candidates, candidates.new_full((1,), torch.inf)]).amin()  # inf for no tokens: unchanged
                minimum = minimum.to(self.threshold.dtype)
                new = torch.where(self.threshold.isnan(), minimum, self.threshold.lerp(minimum, self.momentum))
                self.threshold.copy_(torch.where(minimum.isfinite(), new, self.threshold))
            self._fitted = True
        return (out.relu() if self.relu else out).view(x.shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "threshold")
        if loaded is not None:  # a load is no hot path: reading the value here is fine (not on meta)
            self._fitted = loaded.device.type == "meta" or not bool(loaded.isnan())

    def extra_repr(self) -> str:
        return f"k={self.k}" + ("" if self.relu else ", relu=False") + f", momentum={self.momentum}"
