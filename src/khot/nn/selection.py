"""Learned feature selection: keep ``k`` of the ``n_features`` inputs, chosen by trainable logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_positive, check_tensor
from ..exact import topk_mask
from ..relaxed import registry
from ..sampling import sample_khot, straight_through
from ._args import check_size

__all__ = ["FeatureSelector"]

#: The modes that use sigmoid top-k's gradient on a hard mask (every other name is a relaxation).
HARD_MODES = ("straight_through", "sample")


class FeatureSelector(nn.Module):
    """Multiply the last dimension of the input by a k-hot mask over features, learned.

    The module holds ``logits`` of shape ``(n_features,)`` (zeros at start: every feature
    equally likely). In eval mode the mask is the exact k-hot mask of the logits
    (:func:`khot.topk_mask`: ties go to the lower index) and :meth:`selected` lists its
    features. In training mode the mask is differentiable with respect to the logits:

    * ``"sigmoid"`` (default): the relaxed mask ``sigmoid_topk(logits, k,
      temperature=temperature)``, in [0, 1] and summing to ``k``; any other method of
      :func:`khot.methods` (e.g. ``"sparse"``, ``"gumbel"``) gives its relaxed mask
      ``soft_topk(logits, k, method=method, temperature=temperature)`` (stochastic ones draw
      from the global RNG);
    * ``"straight_through"``: the exact k-hot mask, with the gradient of the sigmoid relaxation;
    * ``"sample"``: a random k-hot mask drawn from that relaxation
      (:func:`khot.sample_khot`, systematic design, straight-through gradient, global RNG).

    ``temperature=None`` takes the method's default (sigmoid's for the two hard modes).

    Example:
        >>> import torch, khot
        >>> selector = khot.nn.FeatureSelector(6, 2, temperature=0.5)
        >>> selector
        FeatureSelector(n_features=6, k=2, method='sigmoid', temperature=0.5)
        >>> with torch.no_grad():
        ...     _ = selector.logits.copy_(torch.tensor([0.0, 3.0, -1.0, 2.0, 0.5, 0.0]))
        >>> selector.selected()
        tensor([1, 3])
        >>> selector.eval()(torch.ones(1, 6))
        tensor([[0., 1., 0., 1., 0., 0.]])
    """

    def __init__(self, n_features: int, k: int, *, method: str = "sigmoid", temperature: float | None = None):
        super().__init__()
        self.n_features = check_size("n_features", n_features)
        self.k = check_size("k", k, 1, n_features, "n_features")
        relaxations = tuple(m.name for m in registry.methods() if m.mask is not None)
        self.method = check_choice("method", method, relaxations + HARD_MODES)
        self._relaxation = registry.get("sigmoid" if method in HARD_MODES else method)
        self.temperature = check_positive(
            "temperature", self._relaxation.default_temperature if temperature is None else temperature
        )
        self.logits = nn.Parameter(torch.zeros(n_features))

    def mask(self) -> Tensor:
        """The mask that :meth:`forward` applies in the current mode, shape ``(n_features,)``."""
        if not self.training:
            return topk_mask(self.logits.detach(), self.k).to(self.logits.dtype)
        if self.method == "sample":
            return sample_khot(self.logits, self.k, temperature=self.temperature)
        soft = self._relaxation.mask(self.logits, self.k, temperature=self.temperature)
        if self.method not in HARD_MODES:
            return soft
        return straight_through(topk_mask(self.logits.detach(), self.k).to(soft.dtype), soft)

    def selected(self) -> Tensor:
        """The indices of the ``k`` selected features (the eval-mode mask), increasing, int64."""
        return topk_mask(self.logits.detach(), self.k).nonzero().squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, floating=True)
        if x.dim() == 0 or x.shape[-1] != self.n_features:
            raise ValueError(f"x must have shape (..., n_features) = (..., {self.n_features}), got {tuple(x.shape)}")
        return x * self.mask().to(x.dtype)

    def extra_repr(self) -> str:
        return f"n_features={self.n_features}, k={self.k}, method={self.method!r}, temperature={self.temperature}"
