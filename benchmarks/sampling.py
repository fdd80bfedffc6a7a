"""Benchmark of the πps samplers (khot.sampling.pips_sample).

1. systematic vs one torch.sort of the same (64, 10**5) float32 tensor (goal: <= 1.5x);
2. Brewer's method vs k (n = 10**4, batch 64), against systematic on the same input;
3. Pareto on the (64, 10**5) input.

Run: python benchmarks/sampling.py  (medians of torch.utils.benchmark.Timer)
"""

from __future__ import annotations

import torch
from torch.utils.benchmark import Timer

from khot.sampling import pips_sample


def median_ms(fn, min_run_time: float = 2.0) -> float:
    """Median time in ms; ``min_run_time=0`` times a single run with no warm-up (slow cases)."""
    timer = Timer("fn()", globals={"fn": fn})
    if not min_run_time:
        return timer.timeit(1).median * 1e3
    fn()  # warm-up
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def probabilities(batch: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Sigmoid top-k of Gaussian logits: pi in (0, 1), each row summing to k (float64 bisection)."""
    logits = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    lo, hi = torch.full((batch, 1), -50.0, dtype=torch.float64), torch.full((batch, 1), 50.0, dtype=torch.float64)
    for _ in range(100):
        mid = (lo + hi) / 2
        big = torch.sigmoid(logits + mid).sum(-1, keepdim=True) > k
        lo, hi = torch.where(big, lo, mid), torch.where(big, mid, hi)
    return torch.sigmoid(logits + (lo + hi) / 2).float()


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

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


if __name__ == "__main__":
    main()
