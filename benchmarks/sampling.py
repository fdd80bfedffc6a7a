"""Benchmark of the πps samplers (khot.sampling.pips_sample).

1. systematic vs one torch.sort of the same (64, 10**5) float32 tensor (goal: <= 1.5x);
2. Brewer's method vs k (n = 10**4, batch 64), against systematic on the same input;
3. Pareto on the (64, 10**5) input;
4. khot.nn.TopKActivation(64, dense=False) (values + indices) vs the dense
   ``topk + zeros_like + scatter`` pattern on a (4096, 32768) float32 input: time and peak
   memory beyond the input (goal: at most half the dense pattern's peak).

Run: python benchmarks/sampling.py  (medians of torch.utils.benchmark.Timer)
     python benchmarks/sampling.py --sae  (section 4 only)
"""

from __future__ import annotations

import sys

import torch

from khot.bench.measure import median_ms, peak_mib
from khot.nn import TopKActivation
from khot.sampling import pips_sample


def probabilities(batch: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Sigmoid top-k of Gaussian logits: pi in (0, 1), each row summing to k (float64 bisection)."""
    logits = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    lo, hi = torch.full((batch, 1), -50.0, dtype=torch.float64), torch.full((batch, 1), 50.0, dtype=torch.float64)
    for _ in range(100):
        mid = (lo + hi) / 2
        big = torch.sigmoid(logits + mid).sum(-1, keepdim=True) > k
        lo, hi = torch.where(big, lo, mid), torch.where(big, mid, hi)
    return torch.sigmoid(logits + (lo + hi) / 2).float()


def dense_topk_activation(x: torch.Tensor, k: int) -> torch.Tensor:
    """The usual TopK SAE activation: relu(topk) written into a dense zero tensor."""
    values, indices = x.topk(k, dim=-1)
    return torch.zeros_like(x).scatter_(-1, indices, values.relu())


def sae_activation() -> None:
    x = torch.randn(4096, 32768, generator=torch.Generator().manual_seed(0))
    k = 64
    sparse = TopKActivation(k, dense=False)
    rows = [
        ("dense topk+scatter", lambda: dense_topk_activation(x, k)),
        ("TopKActivation dense", lambda: TopKActivation(k)(x)),
        ("TopKActivation (values, indices)", lambda: sparse(x)),
    ]
    print("TopKActivation, (4096, 32768) float32, k = 64 (peak MiB beyond the 512 MiB input)")
    print(f"{'op':<34}{'median ms':>11}{'peak MiB':>10}{'vs dense':>10}")
    base = None
    for name, fn in rows:
        peak = peak_mib(fn, x.device)  # first call: also the warm-up
        ms = median_ms(fn, 3.0)
        base = base or peak
        print(f"{name:<34}{ms:>11.1f}{peak:>10.1f}{peak / base:>9.2f}x")


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if "--sae" in sys.argv:
        return sae_activation()

    x = torch.rand(64, 10**5, generator=gen)
    pi = x * (100 / x.sum(-1, keepdim=True))
    sort = median_ms(lambda: torch.sort(x, dim=-1))
    rows = [("torch.sort", sort), *((d, median_ms(lambda d=d: pips_sample(pi, design=d, generator=gen)))
                                    for d in ("systematic", "pareto"))]
    print("(64, 10^5) float32, k = 100")
    print(f"{'op':<12}{'median ms':>12}{'vs sort':>10}")
    for name, ms in rows:
        print(f"{name:<12}{ms:>12.1f}{ms / sort:>9.2f}x")

    print("\nBrewer vs k, (64, 10^4) float32")
    print(f"{'k':>6}{'brewer ms':>12}{'systematic ms':>15}{'ratio':>9}")
    for k in (1, 10, 100, 1000):
        p = probabilities(64, 10**4, k, gen)
        brewer = median_ms(lambda: pips_sample(p, design="brewer", generator=gen), 1.0 if k < 100 else 0)
        systematic = median_ms(lambda: pips_sample(p, design="systematic", generator=gen))
        print(f"{k:>6}{brewer:>12.1f}{systematic:>15.1f}{brewer / systematic:>8.1f}x")
    print()
    sae_activation()


if __name__ == "__main__":
    main()
