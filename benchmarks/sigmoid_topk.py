"""Benchmark sigmoid_topk (forward + backward) against softmax on the CPU.

Run as ``python benchmarks/sigmoid_topk.py``. Prints the ratio to softmax on a (4, 10^6)
float32 input, the scaling of time per element from n = 10^3 to 10^7 (batch 4), and the
number of full-size solver evaluations. Medians of ``torch.utils.benchmark.Timer``.
"""

from __future__ import annotations

import torch

from khot.bench.measure import median_ms
from khot.relaxed.sigmoid import _solve, sigmoid_topk


def evaluations(x: torch.Tensor, k: float) -> int:
    """Full-size sigmoid evaluations the solver takes (k > n/2 is solved as n - k for -x)."""
    kd = torch.full(x.shape[:-1], min(k, x.shape[-1] - k), dtype=torch.float64)
    r = torch.full((*x.shape[:-1], 1), 1.0 if 2 * k <= x.shape[-1] else -1.0)
    return _solve(x, kd, r)[1]


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU\n")

    x = torch.randn(4, 10**6, requires_grad=True)
    g = torch.randn_like(x)
    soft = median_ms(lambda: torch.softmax(x, -1).backward(g), 1.0)
    print(f"{'(4, 10^6), fwd+bwd':<26}{'ms':>9}{'vs softmax':>12}{'evals':>7}")
    print(f"{'softmax':<26}{soft:9.2f}{1.0:12.2f}{'':>7}")
    for k in (10, 10**5, 5 * 10**5, 10**6 - 10):
        t = median_ms(lambda: sigmoid_topk(x, k).backward(g), 1.0)
        print(f"{f'sigmoid_topk k={k}':<26}{t:9.2f}{t / soft:12.2f}{evaluations(x.detach(), k):7d}")
    fwd = median_ms(lambda: sigmoid_topk(x.detach(), 10**5), 1.0)
    print(f"{'  forward only, k=10^5':<26}{fwd:9.2f}{fwd / soft:12.2f}")

    print(f"\n{'n (batch 4, k = n/10)':<24}{'fwd+bwd ms':>12}{'ns/element':>12}{'softmax ns/el':>15}{'evals':>7}")
    for e in range(3, 8):
        n = 10**e
        x = torch.randn(4, n, requires_grad=True)
        g = torch.randn_like(x)
        t = median_ms(lambda: sigmoid_topk(x, n / 10).backward(g), 1.0)
        s = median_ms(lambda: torch.softmax(x, -1).backward(g), 1.0)
        per = 1e6 / (4 * n)
        print(f"{f'10^{e}':<24}{t:12.3f}{t * per:12.3f}{s * per:15.3f}{evaluations(x.detach(), n / 10):7d}")


if __name__ == "__main__":
    main()
