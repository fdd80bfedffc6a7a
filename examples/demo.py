"""khot's exact top-k next to the plain-PyTorch pattern: same answers, less time and memory.

Run with ``make demo`` (or ``python examples/demo.py`` inside the set-up environment).
"""

import pathlib
import sys

import torch

import khot

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import exact_topk  # noqa: E402  (the benchmark script beside this one)

x = torch.tensor([[1.0, 5.0, 2.0, 8.0, 3.0, 9.0], [-1.0, 5.0, -2.0, 8.0, -3.0, -10.0]])
print("x =", x.tolist())
print("plain PyTorch, topk + zeros_like + scatter + multiply, k=3:")
print("  ", exact_topk.baseline_keep(x, 3, -1).tolist())
print("khot.keep_topk(x, 3):")
print("  ", khot.keep_topk(x, 3).tolist())
print("khot.keep_topk(x, 3, magnitude=True):")
print("  ", khot.keep_topk(x, 3, magnitude=True).tolist())
print("khot.topk_mask(x, torch.tensor([1, 2])) (a k per row):")
print("  ", khot.topk_mask(x, torch.tensor([1, 2])).int().tolist())
print("ties go to the lower index on every device: khot.topk_mask(ones(6), 2) =", khot.topk_mask(torch.ones(6), 2).int().tolist())
print()
exact_topk.main(["--quick", "--repeats", "3"])
print("\nThe full grid of the issue: python benchmarks/exact_topk.py (a few minutes).")
