"""Benchmark sigmoid_topk (forward + backward) against softmax on the CPU.

Run as ``python benchmarks/sigmoid_topk.py [--sharp] [--clock thread]``. Prints the ratio to
softmax on a (4, 10^6) float32 input and the scaling of time per element from n = 10^3 to 10^7
(batch 4). Each row times softmax and sigmoid_topk in turn (``khot.bench.measure.interleaved_ms``)
and reports medians. ``--sharp`` prints instead short rows at temperatures from 1 to 10^-4, with
the number of solver evaluations (sharp temperatures make the scores a staircase, the hard
case for the solver). ``--clock thread`` times one torch thread by its own CPU time (for a busy
shared machine).
"""

from __future__ import annotations

import argparse
import time

import torch

import khot.relaxed.sigmoid as solver
from khot.bench.measure import interleaved_ms
from khot import sigmoid_topk


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--sharp", action="store_true", help="short rows at temperatures from 1 to 1e-4")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.clock == "thread":
        torch.set_num_threads(1)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if args.sharp:
        return sharp(args.repeats, clock)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU\n")

    x = torch.randn(4, 10**6, requires_grad=True)
    g = torch.randn_like(x)
    print(f"{'(4, 10^6)':<26}{'softmax ms':>11}{'ms':>9}{'vs softmax':>12}")
    for k in (10, 10**5, 5 * 10**5, 10**6 - 10):
        soft, t = interleaved_ms(
            [lambda: torch.softmax(x, -1).backward(g), lambda: sigmoid_topk(x, k).backward(g)], args.repeats, clock=clock
        )
        print(f"{f'fwd+bwd k={k}':<26}{soft:11.2f}{t:9.2f}{t / soft:12.2f}")
    xd = x.detach()
    soft, fwd = interleaved_ms([lambda: torch.softmax(xd, -1), lambda: sigmoid_topk(xd, 10**5)], args.repeats, clock=clock)
    print(f"{'forward only, k=10^5':<26}{soft:11.2f}{fwd:9.2f}{fwd / soft:12.2f}")

    print(f"\n{'n (batch 4, k = n/10)':<24}{'fwd+bwd ms':>12}{'ns/element':>12}{'softmax ns/el':>15}")
    for e in range(3, 8):
        n = 10**e
        x = torch.randn(4, n, requires_grad=True)
        g = torch.randn_like(x)
        s, t = interleaved_ms(
            [lambda: torch.softmax(x, -1).backward(g), lambda: sigmoid_topk(x, n / 10).backward(g)],
            args.repeats if e < 7 else 5,
            clock=clock,
        )
        per = 1e6 / (4 * n)
        print(f"{f'10^{e}':<24}{t:12.3f}{t * per:12.3f}{s * per:15.3f}")


def sharp(repeats: int, clock) -> None:
    """fwd+bwd vs softmax and the solver's evaluations on short rows as the temperature falls."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU\n")
    print(f"{'shape, k':<20}{'τ':>8}{'softmax ms':>12}{'ms':>9}{'vs softmax':>12}{'evaluations':>13}")
    calls = []
    evaluate = solver._evaluate
    solver._evaluate = lambda *a, **kw: calls.append(1) or evaluate(*a, **kw)
    for shape, k in (((4096, 64), 2), ((64, 1000), 10), ((1, 1000), 10)):
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn_like(x)
        for tau in (1.0, 0.1, 0.01, 1e-4):
            calls.clear()
            sigmoid_topk(x.detach(), k, temperature=tau)
            count = len(calls)
            soft, t = interleaved_ms(
                [lambda: torch.softmax(x, -1).backward(g), lambda: sigmoid_topk(x, k, temperature=tau).backward(g)], repeats, clock=clock
            )
            print(f"{f'{shape}, {k}':<20}{tau:8.0e}{soft:12.3f}{t:9.3f}{t / soft:12.2f}{count:13d}")
    solver._evaluate = evaluate


if __name__ == "__main__":
    main()
