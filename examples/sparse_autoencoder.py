"""A TopK sparse autoencoder (:class:`khot.nn.TopKActivation`) trained on synthetic sparse data.

The data are sums of 4 of 64 random unit "features" in 32 dimensions, with random
positive weights; the autoencoder (128 latents, k = 4 active) learns to reconstruct
them. Prints the loss as it goes and the final fraction of variance unexplained. The model
and data are those of the ``sae`` task of ``khot bench --suites tasks``
(:mod:`khot.bench.tasks`), which also trains it through each relaxation.

    python examples/sparse_autoencoder.py [--k 4] [--tiny]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from khot.bench.tasks import TopKSAE, sparse_data


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="active latents per input (default 4)")
    parser.add_argument("--tiny", action="store_true", help="a few steps (a smoke test)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    d, n_features, batch = 32, 64, 1024
    steps = 5 if args.tiny else 1000
    features = F.normalize(torch.randn(n_features, d), dim=-1)
    sae = TopKSAE(d, latents=128, k=args.k)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        x = sparse_data(batch, features)
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
