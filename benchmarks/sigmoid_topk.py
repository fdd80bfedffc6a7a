"""Benchmark sigmoid_topk (forward + backward) against softmax on the CPU.

Run as ``python benchmarks/sigmoid_topk.py``. Prints the ratio to softmax on a (4, 10^6)
float32 input and the scaling of time per element from n = 10^3 to 10^7 (batch 4). Each row times softmax and sigmoid_topk in turn
(``khot.bench.measure.interleaved_ms``) and reports medians.
"""

from __future__ import annotations

import argparse

import torch

from khot.bench.measure import interleaved_ms
from khot import sigmoid_topk


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU\n")

    x = torch.randn(4, 10**6, requires_grad=True)
    g = torch.randn_like(x)
    print(f"{'(4, 10^6)':<26}{'softmax ms':>11}{'ms':>9}{'vs softmax':>12}")
    for k in (10, 10**5, 5 * 10**5, 10**6 - 10):
        soft, t = interleaved_ms(
            [lambda: torch.softmax(x, -1).backward(g), lambda: sigmoid_topk(x, k).backward(g)], args.repeats
        )
        print(f"{f'fwd+bwd k={k}':<26}{soft:11.2f}{t:9.2f}{t / soft:12.2f}")
    xd = x.detach()
    soft, fwd = interleaved_ms([lambda: torch.softmax(xd, -1), lambda: sigmoid_topk(xd, 10**5)], args.repeats)
    print(f"{'forward only, k=10^5':<26}{soft:11.2f}{fwd:9.2f}{fwd / soft:12.2f}")

    print(f"\n{'n (batch 4, k = n/10)':<24}{'fwd+bwd ms':>12}{'ns/element':>12}{'softmax ns/el':>15}")
    for e in range(3, 8):
        n = 10**e
        x = torch.randn(4, n, requires_grad=True)
        g = torch.randn_like(x)
        s, t = interleaved_ms(
            [lambda: torch.softmax(x, -1).backward(g), lambda: sigmoid_topk(x, n / 10).backward(g)],
            args.repeats if e < 7 else 5,
        )
        per = 1e6 / (4 * n)
        print(f"{f'10^{e}':<24}{t:12.3f}{t * per:12.3f}{s * per:15.3f}")


if __name__ == "__main__":
    main()
