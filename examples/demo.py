"""khot's exact top-k next to the plain-PyTorch pattern: the same answers, one call, and what it costs.

Prints the plain ``topk`` + ``zeros_like`` + ``scatter`` + multiply result beside
:func:`khot.keep_topk` and :func:`khot.topk_mask` (magnitude ranking, a k per row, the tie
rule), checks that they agree on a random batch, and times both, interleaved on the same
input: the ratio is what this machine measured, faster or not.

    python examples/demo.py [--tiny]     (or: make demo)
"""

from __future__ import annotations

import argparse

import torch

import khot
from khot.bench.measure import baseline_keep, interleaved_ms


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small input and few repeats (a smoke test)")
    args = parser.parse_args(argv)
    x = torch.tensor([[1.0, 5.0, 2.0, 8.0, 3.0, 9.0], [-1.0, 5.0, -2.0, 8.0, -3.0, -10.0]])
    print("x =", x.tolist())
    print("plain PyTorch, topk + zeros_like + scatter + multiply, k=3:")
    print("  ", baseline_keep(x, 3, -1).tolist())
    print("khot.keep_topk(x, 3):")
    print("  ", khot.keep_topk(x, 3).tolist())
    print("khot.keep_topk(x, 3, magnitude=True) (rank by |x|):")
    print("  ", khot.keep_topk(x, 3, magnitude=True).tolist())
    print("khot.topk_mask(x, torch.tensor([1, 2])) (a k per row):")
    print("  ", khot.topk_mask(x, torch.tensor([1, 2])).int().tolist())
    print("ties go to the lower index on every device: khot.topk_mask(ones(6), 2) =", khot.topk_mask(torch.ones(6), 2).int().tolist())

    batch, n, k = (64, 1024, 8) if args.tiny else (256, 4096, 32)
    big = torch.randn(batch, n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(khot.keep_topk(big, k), baseline_keep(big, k, -1)), "khot and plain PyTorch disagree"
    plain_ms, khot_ms = interleaved_ms([lambda: baseline_keep(big, k, -1), lambda: khot.keep_topk(big, k)], repeats=5 if args.tiny else 21)
    ratio = khot_ms / plain_ms
    print(f"\nrandom ({batch}, {n}) float32, k = {k}: the same output as plain PyTorch;")
    print(f"  plain {plain_ms:.3f} ms, khot.keep_topk {khot_ms:.3f} ms: {ratio:.2f}x the time ({'faster' if ratio < 1 else 'not faster'} here;")
    print("  medians of interleaved runs on this machine, which may be busy). The full comparison: python benchmarks/exact_topk.py")
    return ratio


if __name__ == "__main__":
    main()
