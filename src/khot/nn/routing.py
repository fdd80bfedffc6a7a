"""Mixture-of-experts routing: a linear gate, exact top-k experts per token, load statistics."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_flag, check_positive, check_tensor
from ..exact import select_topk, topk_mask
from ..relaxed.sigmoid import sigmoid_topk
from ..sampling import sample_khot, straight_through
from ._args import check_size
from ._router_op import router_topk

__all__ = ["RouterOutput", "TopKRouter"]


class RouterOutput(NamedTuple):
    """What :class:`TopKRouter` returns, for ``T`` tokens and ``E`` experts."""

    indices: Tensor  #: ``(T, k)`` int64, the chosen experts, best first
    weights: Tensor  #: ``(T, k)``, the weight of each chosen expert
    logits: Tensor  #: ``(T, E)``, the gate's output
    aux_loss: Tensor  #: scalar load-balancing loss ``E * Σ_e f_e P_e`` (1 when balanced)
    expert_load: Tensor  #: ``(E,)``, ``f_e``: the fraction of the ``T * k`` assignments going to ``e``
    router_z_loss: Tensor  #: scalar ``mean_t logsumexp(logits_t)^2``


class TopKRouter(nn.Module):
    """Route every token to its top ``k`` of ``n_experts`` experts (Mixtral, DeepSeek-V3 style).

    ``logits = gate(x)`` (a linear map, no bias by default); the scores are
    ``softmax(logits)`` over the experts (``score="softmax"``, Mixtral) or
    ``sigmoid(logits)`` (``score="sigmoid"``, DeepSeek-V3); each token takes the ``k``
    experts with the highest scores, ranked by their logits (the same order, without the ties
    that rounding the scores to a half dtype makes; :func:`khot.select_topk`: ties go to the
    lower expert index) with their scores as weights, divided by their sum when
    ``renormalize`` (in log space: finite where the scores underflow). Any leading dimensions
    of ``x`` are flattened into tokens.

    Statistics, all over the tokens of the call: ``expert_load`` ``f_e`` is the fraction of
    the ``T * k`` token-to-expert assignments that go to expert ``e`` (so ``k * f_e`` is
    the fraction of tokens using ``e``); ``P_e`` is the mean probability of ``e`` (the
    softmax scores, or the sigmoid scores normalised to sum to 1 per token, as in
    DeepSeek-V3's balance loss); ``aux_loss = n_experts * Σ_e f_e P_e`` is the Switch /
    Mixtral load-balancing loss, 1 for a uniform router (Hugging Face's Mixtral loss is
    ``k`` times this); ``router_z_loss`` is ST-MoE's ``mean(logsumexp(logits)^2)``.
    Only ``P_e`` carries a gradient.

    Gradients to the gate: with ``differentiable=False`` (default) they come through the
    weights of the chosen experts only, as in Mixtral. In training mode two options also
    make the choice itself differentiable (eval mode always routes by exact top-k):

    * ``"straight_through"``: the same experts, weights multiplied by a mask whose value is
      the hard top-k mask (1) and whose gradient is that of
      ``sigmoid_topk(logits, k, temperature=temperature)``;
    * ``"sample"``: the experts are a random k-hot sample of that sigmoid top-k
      (:func:`khot.sample_khot`, systematic design, global RNG), with its straight-through
      gradient: exploration over experts.

    Example:
        >>> import torch, khot
        >>> _ = torch.manual_seed(0)
        >>> router = khot.nn.TopKRouter(16, 8, 2)
        >>> router
        TopKRouter(
          d_model=16, n_experts=8, k=2, score='softmax', renormalize=True, differentiable=False
          (gate): Linear(in_features=16, out_features=8, bias=False)
        )
        >>> out = router(torch.randn(4, 10, 16))
        >>> out.indices.shape, out.weights.shape, out.expert_load.shape
        (torch.Size([40, 2]), torch.Size([40, 2]), torch.Size([8]))
        >>> torch.allclose(out.weights.sum(-1), torch.ones(40))
        True
        >>> out.expert_load.sum().item()
        1.0
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        k: int,
        *,
        score: str = "softmax",
        renormalize: bool = True,
        differentiable: bool | str = False,
        temperature: float = 1.0,
        bias: bool = False,
    ):
        super().__init__()
        self.d_model = check_size("d_model", d_model)
        self.n_experts = check_size("n_experts", n_experts)
        self.k = check_size("k", k, 1, n_experts, "n_experts")
        self.score = check_choice("score", score, ("softmax", "sigmoid"))
        if not isinstance(differentiable, (bool, str)):
            raise TypeError(f"differentiable must be False, 'straight_through' or 'sample', got {differentiable!r}")
        self.differentiable = check_choice("differentiable", differentiable, (False, "straight_through", "sample"))
        self.renormalize = check_flag("renormalize", renormalize)
        self.temperature = check_positive("temperature", temperature)
        self.gate = nn.Linear(d_model, n_experts, bias=check_flag("bias", bias))

    def forward(self, x: Tensor) -> RouterOutput:
        check_tensor("x", x, floating=True)
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (..., d_model) = (..., {self.d_model}), got {tuple(x.shape)}")
        logits = self.gate(x.reshape(-1, self.d_model))
        scores, weights, indices = self._route(logits)
        tokens = max(len(logits), 1)  # means over no tokens are 0, not NaN: an empty batch adds no loss
        ones = torch.ones(indices.numel(), dtype=logits.dtype, device=logits.device)
        load = logits.new_zeros(self.n_experts).index_add_(0, indices.flatten(), ones) / (tokens * self.k)
        probs = scores if self.score == "softmax" else F.logsigmoid(logits).softmax(-1)  # scores / their sum, with no 0 / 0
        aux = self.n_experts * (load * probs.sum(0) / tokens).sum()
        z_loss = logits.logsumexp(-1).square().sum() / tokens
        return RouterOutput(indices, weights, logits, aux, load, z_loss)

    def _route(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(scores, weights, indices)`` of the tokens' ``logits``: the one place that scores,
        chooses and weighs the experts (where a fused router kernel would plug in)."""
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        if not (self.training and self.differentiable):  # the fused op (a Triton kernel on CUDA)
            weights, indices, _ = router_topk(logits, self.k, self.score == "softmax", self.renormalize)
            return scores, weights, indices
        key = logits.detach()  # ranks as the scores do, without the ties of their rounding
        gates = scores
        if self.renormalize and self.score == "sigmoid":  # the scores over the row's largest: renormalised alike, no 0 / 0
            log_scores = F.logsigmoid(logits)
            gates = (log_scores - log_scores.amax(-1, keepdim=True).detach()).exp()
        if self.training and self.differentiable == "straight_through":
            soft = sigmoid_topk(logits, self.k, temperature=self.temperature)
            gates = gates * straight_through(topk_mask(key, self.k).to(soft.dtype), soft)
        elif self.training and self.differentiable == "sample":
            mask = sample_khot(logits, self.k, temperature=self.temperature)
            key, gates = key.masked_fill(mask.detach() == 0, -torch.inf), gates * mask
        weights, indices = select_topk(gates.unsqueeze(-1), key, self.k)
        weights = weights.squeeze(-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return scores, weights, indices

    def extra_repr(self) -> str:
        extra = f", temperature={self.temperature}" if self.differentiable else ""
        return (
            f"d_model={self.d_model}, n_experts={self.n_experts}, k={self.k}, score={self.score!r}, "
            f"renormalize={self.renormalize}, differentiable={self.differentiable!r}{extra}"
        )
