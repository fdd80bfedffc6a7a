"""Perturbed top-k: the expected exact top-k mask of ``x + σ Z`` with Monte-Carlo gradients.

Berthet, Blondel, Teboul, Cuturi, Vert & Bach, "Learning with Differentiable Perturbed
Optimizers" (NeurIPS 2020): ``p(x) = E[topk_mask(x + σ Z)]`` with ``Z`` standard normal, estimated
with ``n_samples`` draws (each exactly k-hot, so the estimate lies in ``[0, 1]``, sums to ``k``
exactly and is 0 for items never drawn). For Gaussian noise the Jacobian is
``J = E[topk_mask(x + σ Z) Zᵀ] / σ`` (their Proposition 3.1: differentiate the Gaussian density,
not the mask), estimated from the same draws; the backward pass applies its transpose to the
incoming gradient ``g``: ``grad_x = E[<g, topk_mask(x + σ Z)> Z] / σ``. (A public implementation
applied ``J`` instead of ``Jᵀ``; ``J`` is symmetric only in expectation, so that is wrong for any
finite number of draws.) The estimator is unbiased with a standard error that falls as
``1 / sqrt(n_samples)``; the forward and backward use the same draws.

Cost: ``n_samples`` exact top-k masks, ``O(n_samples n)`` time, and the draws (``n_samples``
floats and booleans per element) are kept for the backward pass. Randomness comes from
``generator`` (the global RNG when ``None``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from khot._backend import apply
from khot.exact import topk_mask

from ._threshold import Rows, work_dtype

__all__ = ["DEFAULT_TEMPERATURE", "DEFAULT_SAMPLES", "perturbed_topk"]

#: Default noise scale ``σ`` (score units).
DEFAULT_TEMPERATURE = 1.0
#: Default number of Monte-Carlo draws.
DEFAULT_SAMPLES = 100


class _PerturbedTopK(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, noise: Tensor, sigma: Tensor, k) -> tuple[Tensor, Tensor]:
        draws = topk_mask(x.to(noise.dtype) + sigma * noise, k)  # (n_samples, ..., n)
        return draws.to(noise.dtype).mean(0).to(x.dtype), draws

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, noise, sigma, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(noise, sigma, output[1])

    @staticmethod
    def backward(ctx, grad, _):
        noise, sigma, draws = ctx.saved_tensors
        weight = (grad.to(noise.dtype) * draws).sum(-1, keepdim=True)  # <g, mask of draw s>
        return (weight * noise).mean(0) / sigma, None, None, None


def perturbed_topk(
    x: Tensor,
    k: int | Tensor,
    dim: int = -1,
    *,
    temperature: float | Tensor = DEFAULT_TEMPERATURE,
    n_samples: int = DEFAULT_SAMPLES,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Monte-Carlo estimate of ``E[topk_mask(x + σ Z)]`` along ``dim`` (``σ = temperature``).

    Args:
        x: floating-point scores (half and bfloat16 computed in float32).
        k: an int or an integer tensor of per-slice counts, ``0 <= k <= n``.
        dim: the dimension to select along.
        temperature: the noise scale ``σ > 0``, a number or a per-slice tensor (not differentiated).
        n_samples: the number of draws (an int >= 1).
        generator: the ``torch.Generator`` of the draws (the global RNG when ``None``).

    Returns the estimate, shaped like ``x``: multiples of ``1 / n_samples`` in ``[0, 1]`` summing
    to ``k`` exactly. ``+inf`` and ``-inf`` scores stay first and last (masked items); NaN slices
    are NaN.

    Example:
        >>> import torch, khot
        >>> x = torch.tensor([0.2, 1.9, -1.0, 3.0, 1.5])
        >>> g = torch.Generator().manual_seed(0)
        >>> p = khot.soft_topk(x, 2, method="perturbed", n_samples=1000, generator=g)
        >>> p
        tensor([0.0620, 0.5990, 0.0080, 0.9270, 0.4040])
        >>> p.sum().item()
        2.0
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise TypeError(f"n_samples must be an int, got {n_samples!r}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        raise TypeError("temperature: perturbed top-k is not differentiable in σ; pass a tensor without requires_grad")
    rows = Rows(x, k, dim, temperature, real_k=False)
    _, sigma = rows.tensors()
    dtype = work_dtype(rows.x)
    noise = torch.randn((n_samples, *rows.x.shape), generator=generator, dtype=dtype, device=rows.x.device)
    p, _ = apply(_PerturbedTopK, rows.x, noise, sigma, rows.k)
    p = torch.where(torch.isnan(rows.x).any(-1, keepdim=True), torch.nan, p)
    return rows.restore(p)
