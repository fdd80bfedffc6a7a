"""Benchmark of the πps samplers (khot.sampling.pips_sample).

1. systematic vs one torch.sort of the same (64, 10**5) float32 tensor (goal: <= 1.5x);
2. Brewer's method vs k (n = 10**4, batch 64), against a straightforward vectorised-over-rows
   Brewer (``brewer_reference`` below: the textbook draw-by-draw weights in float64, one
   ``torch.multinomial`` per draw; goal: khot <= 1x, printed as the ratio) and against
   systematic on the same input; conditional Poisson on the same input (one run, k <= 100);
   one thread, CPU time of this thread (``time.thread_time``), so other load on a shared
   machine inflates the times little;
3. Pareto on the (64, 10**5) input;
4. khot.nn.TopKActivation(64, dense=False) (values + indices) vs the dense
   ``topk + zeros_like + scatter`` pattern on a (4096, 32768) float32 input: time and peak
   memory beyond the input (goal: at most half the dense pattern's peak).

Run: python benchmarks/sampling.py  (medians of torch.utils.benchmark.Timer; interleaved for Brewer)
     python benchmarks/sampling.py --brewer [1,10,100]  (section 2 only, optionally these k; default 1,2,5,10,100,1000)
     python benchmarks/sampling.py --sae  (section 4 only)
"""

from __future__ import annotations

import sys
import time

import torch

from khot.bench.measure import interleaved_ms, median_ms, peak_mib
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


def brewer_reference(pi: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brewer's method as written in the sampling literature, vectorised over rows (every row
    summing to the same integer k): at draw j = 1..k an item not yet drawn is picked with
    probability proportional to pi_i (k - a - pi_i) / (k - a - pi_i (k - j + 1)), a = the sum of
    pi over the items drawn so far."""
    pi = pi.double()
    k = round(pi[0].sum().item())
    taken = torch.zeros_like(pi, dtype=torch.bool)
    drawn = torch.zeros(pi.shape[0], 1, dtype=torch.float64)
    for j in range(1, k + 1):
        left = k - drawn
        w = (pi * (left - pi) / (left - pi * (k - j + 1))).masked_fill_(taken, 0.0)
        pick = torch.multinomial(w, 1, generator=generator)
        taken.scatter_(1, pick, True)
        drawn += pi.gather(1, pick)
    return taken


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


def brewer_table(gen: torch.Generator, ks: tuple[int, ...] = (1, 2, 5, 10, 100, 1000)) -> None:
    """Side by side, interleaved, one thread, CPU time of this thread (``time.thread_time``): khot's
    Brewer vs the straightforward reference (the ratio; goal <= 1x), systematic, and conditional
    Poisson (one run each, k <= 100)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("\nBrewer vs k, (64, 10^4) float32, one thread: khot vs a straightforward vectorised Brewer "
          "(interleaved medians of thread CPU time, ms)")
    print(f"{'k':>6}{'khot brewer':>13}{'reference':>11}{'ratio':>8}{'systematic':>12}{'cond. Poisson':>15}")
    for k in ks:
        p = probabilities(64, 10**4, k, gen)
        fns = [lambda: pips_sample(p, design="brewer", generator=gen), lambda: brewer_reference(p, gen),
               lambda: pips_sample(p, design="systematic", generator=gen)]
        times = interleaved_ms(fns, repeats=7 if k < 1000 else 1, warmup=1 if k < 1000 else 0, clock=time.thread_time)
        cp = None
        if k <= 100:
            start = time.thread_time()
            pips_sample(p, design="conditional_poisson", generator=gen)
            cp = (time.thread_time() - start) * 1e3
        cp = f"{cp:>15.1f}" if cp else f"{'-':>15}"
        print(f"{k:>6}{times[0]:>13.1f}{times[1]:>11.1f}{times[0] / times[1]:>7.2f}x{times[2]:>12.1f}{cp}")
    torch.set_num_threads(threads)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if "--sae" in sys.argv:
        return sae_activation()
    if "--brewer" in sys.argv:  # optionally followed by the k to run, e.g. --brewer 1,10,100
        i = sys.argv.index("--brewer") + 1
        return brewer_table(gen, tuple(map(int, sys.argv[i].split(","))) if i < len(sys.argv) else (1, 2, 5, 10, 100, 1000))

    x = torch.rand(64, 10**5, generator=gen)
    pi = x * (100 / x.sum(-1, keepdim=True))
    sort = median_ms(lambda: torch.sort(x, dim=-1))
    rows = [("torch.sort", sort), *((d, median_ms(lambda d=d: pips_sample(pi, design=d, generator=gen)))
                                    for d in ("systematic", "pareto"))]
    print("(64, 10^5) float32, k = 100")
    print(f"{'op':<12}{'median ms':>12}{'vs sort':>10}")
    for name, ms in rows:
        print(f"{name:<12}{ms:>12.1f}{ms / sort:>9.2f}x")

    brewer_table(gen)
    print()
    sae_activation()


if __name__ == "__main__":
    main()
