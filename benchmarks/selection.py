"""Relaxed top-k selection: speed against the published algorithm, and quality vs time.

    python benchmarks/selection.py [--full | --quick]

1. Successive halving, batch 16, n = 16384, k = 2048, d = 32, and batch 1, n = 1024,
   k = 32: ``halving_select`` against the published algorithm (n / k a power of two) run two ways: as the
   public code runs it, a Python loop over the examples and rounds with each round
   vectorised within one example; and literally, one pair at a time.  Both use
   the same shift-invariant pair weights, so the outputs (and, for the first, the gradients of
   forward + backward, also timed) must agree.
2. The paper's grid (batch 16, d = 32, scores ~ U[0, 1], rows ~ U[-1, 1]): nCCS
   against the exact top-k rows and the median time of each method at its default
   temperature, plus halving at the paper's base 20, with khot's shift-invariant pair weights
   and with the public code's (``published_weights=True``, which reproduces the paper's
   nCCS).  Default: a subsample of the grid (k <= 512, counting for n <= 1024); ``--full``:
   all of n = 2^4..2^14, k = 2^1..2^11, k < n (counting for n <= 4096).  ``--quick``:
   section 1 only.
"""

from __future__ import annotations

import argparse

import torch

from khot.bench.measure import interleaved_ms, median_ms
from khot.bench.suites import BASE_20, problem
from khot.metrics import nccs
from khot.relaxed.counting import counting_select
from khot.relaxed.halving import DEFAULT_TEMPERATURE, halving_select
from khot.relaxed.iterative import iterative_select


def published_halving(x: torch.Tensor, s: torch.Tensor, k: int, temperature: float, per_pair: bool = False):
    """Algorithm 2 per example and per round; each round vectorised, or one pair at a time."""
    out = []
    for e, v in zip(x, s):
        while v.shape[0] > k:
            order = v.argsort(descending=True, stable=True)
            half = v.shape[0] // 2
            pairs = [(order[i : i + 1], order[-1 - i : v.shape[0] - i]) for i in range(half)] if per_pair else [
                (order[:half], order[half:].flip(0))
            ]
            merged = []
            for hi, lo in pairs:
                w_hi = torch.sigmoid((v[hi] - v[lo]) / temperature)  # softmax over the pair
                w_lo = 1 - w_hi
                merged.append((w_hi * v[hi] + w_lo * v[lo], w_hi[:, None] * e[hi] + w_lo[:, None] * e[lo]))
            v, e = torch.cat([m[0] for m in merged]), torch.cat([m[1] for m in merged])
        out.append(e)
    return torch.stack(out)


def speed(batch: int, n: int, k: int) -> None:
    x, s, _ = problem(n, k, batch)
    t = DEFAULT_TEMPERATURE
    torch.testing.assert_close(halving_select(x, s, k, temperature=t), published_halving(x, s, k, t))
    ours, rounds = interleaved_ms([lambda: halving_select(x, s, k), lambda: published_halving(x, s, k, t)], 9)
    torch.testing.assert_close(halving_select(x[:2], s[:2], k, temperature=t), published_halving(x[:2], s[:2], k, t, True))
    pairs = median_ms(lambda: published_halving(x, s, k, t, True), 0)
    x.requires_grad_()
    s.requires_grad_()
    probe = torch.randn(batch, k, x.shape[-1])

    def backward(fn):
        return torch.autograd.grad((fn() * probe).sum(), (x, s))

    ours_grads, loop_grads = backward(lambda: halving_select(x, s, k)), backward(lambda: published_halving(x, s, k, t))
    for got, want in zip(ours_grads, loop_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    ours_fb, rounds_fb = interleaved_ms(
        [lambda: backward(lambda: halving_select(x, s, k)), lambda: backward(lambda: published_halving(x, s, k, t))], 7
    )
    print(f"successive halving, batch {batch}, n={n}, k={k}, d=32, temperature={t} (outputs and gradients equal)")
    print(f"  halving_select                         {ours:10.2f} ms   fwd+bwd {ours_fb:8.2f} ms")
    print(f"  published, per example and round       {rounds:10.2f} ms   x{rounds / ours:.1f}   fwd+bwd {rounds_fb:8.2f} ms   x{rounds_fb / ours_fb:.1f}")
    print(f"  published, per example and pair        {pairs:10.2f} ms   x{pairs / ours:.1f}\n")


def quality(full: bool) -> None:
    ns = range(4, 15) if full else (4, 7, 10, 12, 14)
    ks = range(1, 12) if full else (1, 3, 6, 9)
    counting_n = 4096 if full else 1024
    methods = {
        "halving": halving_select,
        "halving base 20": lambda x, s, k: halving_select(x, s, k, temperature=BASE_20),
        "base 20, public weights": lambda x, s, k: halving_select(x, s, k, temperature=BASE_20, published_weights=True),
        "iterative": iterative_select,
        "counting": counting_select,
    }
    print(f"{'n':>6} {'k':>5} " + " ".join(f"{name:>22}" for name in methods))
    print(f"{'':>12} " + " ".join(f"{'nCCS':>10} {'ms':>11}" for _ in methods))
    for n in (2**i for i in ns):
        for k in (2**j for j in ks if 2**j < n):
            x, s, target = problem(n, k)
            cells = []
            for name, fn in methods.items():
                if name == "counting" and n > counting_n:
                    cells.append(f"{'-':>10} {'-':>11}")
                    continue
                score = nccs(fn(x, s, k), target).mean().item()
                cells.append(f"{score:10.4f} {median_ms(lambda: fn(x, s, k), 0.2):11.2f}")
            print(f"{n:>6} {k:>5} " + " ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true", help="the whole grid of the paper")
    group.add_argument("--quick", action="store_true", help="the speed comparison only")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    speed(16, 16384, 2048)
    speed(1, 1024, 32)  # one example: the published loop has no batch to lose
    if not args.quick:
        quality(args.full)


if __name__ == "__main__":
    main()
