"""A TopK sparse autoencoder (:class:`khot.nn.TopKActivation`) trained on synthetic sparse data.

The data are sums of 4 of 64 random unit "features" in 32 dimensions, with random
positive weights; the autoencoder (128 latents, k = 4 active) learns to reconstruct
them. Prints the loss as it goes and the final fraction of variance unexplained.

    python examples/sparse_autoencoder.py [--tiny]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import khot


class TopKSAE(nn.Module):
    """``decode(relu(topk(encode(x - b))))`` with a tied pre-bias ``b`` (Gao et al. 2024)."""

    def __init__(self, d: int, latents: int, k: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d))
        self.encode, self.decode = nn.Linear(d, latents), nn.Linear(latents, d, bias=False)
        self.act = khot.nn.TopKActivation(k)

    def forward(self, x):
        return self.decode(self.act(self.encode(x - self.bias))) + self.bias


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (a smoke test)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    d, n_features, active, batch = 32, 64, 4, 1024
    steps = 5 if args.tiny else 1000
    features = F.normalize(torch.randn(n_features, d), dim=-1)
    sae = TopKSAE(d, latents=128, k=active)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        which = torch.rand(batch, n_features).argsort(-1)[:, :active]
        x = (torch.rand(batch, active, 1) * features[which]).sum(1)
        loss = F.mse_loss(sae(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0:
            print(f"step {step:5d}  mse {loss.item():.5f}")
    fvu = loss.item() / x.var(0).mean().item()
    print(f"final mse {loss.item():.5f}; fraction of variance unexplained {fvu:.3f}")
    return loss.item()


if __name__ == "__main__":
    main()
