"""GPU benchmark of khot's Triton kernels (issue: GPU kernels in Triton), and a CUDA-graph check.

Run on a machine with a CUDA GPU and triton: ``python benchmarks/gpu.py``. It prints one
markdown table: per cell khot's time, the reference's time (interleaved medians of CUDA-synchronised
runs, :func:`khot.bench.measure.interleaved_ms`), the speed-up (reference / khot) and the bandwidth
khot achieves (bytes it must read and write / its time) as a fraction of a measured device copy
(``y.copy_(x)`` of 1 GiB, read + write). Cells:

* ``topk_mask`` and ``keep_topk`` vs ``torch.topk`` + ``zeros`` + ``scatter`` at (512, 131072,
  k = 1024), (4096, 32768, 64), (64, 128256, 50), (4096, 64, 2), float32 and bfloat16;
* ``sigmoid_topk`` forward + backward vs softmax forward + backward at (64, 10^6) and (4096, 64);
* the router op (``khot.nn._router_op.router_topk``) vs the eager sequence (softmax, top k,
  renormalise, count) at 4096 tokens x 128 experts, k = 8.

Then it captures ``khot.sigmoid_topk`` and ``khot.topk_mask`` in CUDA graphs
(``torch.cuda.graph``), replays them on new data and checks the results against eager calls.
Without CUDA it says so and exits with status 2.

Targets (H100/H200 class): masks >= 4x the topk + scatter pattern at the large cells and >= 50 %
of copy bandwidth; sigmoid top-k <= 1.5x softmax at (64, 10^6); router >= 3x eager.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch

import khot
from khot.bench.measure import baseline_keep, baseline_mask, interleaved_ms

MASK_CELLS = [(512, 131072, 1024), (4096, 32768, 64), (64, 128256, 50), (4096, 64, 2)]
SIGMOID_CELLS = [(64, 10**6, 1000.0), (4096, 64, 2.0)]
ROUTER_CELL = (4096, 128, 8)


@dataclass
class Cell:
    """One row of the table: ``khot`` and ``reference`` are zero-argument callables."""

    name: str
    khot: Callable[[], object]
    reference: Callable[[], object]
    bytes: int  # what khot must at least read and write


def row(cell: Cell, khot_ms: float, ref_ms: float, copy_gbs: float) -> str:
    """The table row of ``cell``: times, speed-up and achieved bandwidth vs the copy's.

    >>> row(Cell("x", None, None, 2 * 10**9), 1.0, 4.0, 4000.0)
    '| x | 1.000 | 4.000 | 4.00x | 2000 GB/s (50 % of copy) |'
    """
    gbs = cell.bytes / khot_ms / 1e6
    return f"| {cell.name} | {khot_ms:.3f} | {ref_ms:.3f} | {ref_ms / khot_ms:.2f}x | {gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f} % of copy) |"


def copy_bandwidth(device: str, repeats: int) -> float:
    """GB/s of ``y.copy_(x)`` on 1 GiB (bytes read + written)."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    (ms,) = interleaved_ms([lambda: y.copy_(x)], repeats)
    return 2 * x.numel() * 4 / ms / 1e6


def _eager_router(logits: torch.Tensor, k: int):
    scores = logits.softmax(-1)
    weights, indices = scores.topk(k, -1)
    weights = weights / weights.sum(-1, keepdim=True)
    return weights, indices, torch.bincount(indices.flatten(), minlength=logits.shape[-1])


def cells(device: str) -> list[Cell]:
    """Every benchmark cell on ``device`` (the inputs are made here)."""
    from khot.nn._router_op import router_topk

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.finfo(dtype).bits // 8
        for rows, n, k in MASK_CELLS:
            x = torch.randn(rows, n, device=device, dtype=dtype)
            shape = f"({rows}, {n}), k={k}, {str(dtype)[6:]}"
            out.append(Cell(f"topk_mask {shape}", lambda x=x, k=k: khot.topk_mask(x, k), lambda x=x, k=k: baseline_mask(x, k, -1), x.numel() * (size + 1)))
            out.append(Cell(f"keep_topk {shape}", lambda x=x, k=k: khot.keep_topk(x, k), lambda x=x, k=k: baseline_keep(x, k, -1), x.numel() * 2 * size))
    for rows, n, k in SIGMOID_CELLS:
        x = torch.randn(rows, n, device=device, requires_grad=True)
        g = torch.randn_like(x)
        out.append(
            Cell(
                f"sigmoid_topk fwd+bwd ({rows}, {n}), k={k:g}",
                lambda x=x, g=g, k=k: khot.sigmoid_topk(x, k).backward(g),
                lambda x=x, g=g: torch.softmax(x, -1).backward(g),
                x.numel() * 4 * 5,  # forward: read x, write p; backward: read p and g, write grad
            )
        )
    tokens, experts, k = ROUTER_CELL
    logits = torch.randn(tokens, experts, device=device)
    out.append(
        Cell(
            f"router ({tokens}, {experts}), k={k}",
            lambda: router_topk(logits, k, True, True),
            lambda: _eager_router(logits, k),
            logits.numel() * 4 + tokens * k * 12,
        )
    )
    return out


def graph_check(device: str) -> list[str]:
    """Capture ``khot.sigmoid_topk`` and ``khot.topk_mask`` in CUDA graphs; replay on new data."""
    lines = []
    for name, fn in [("sigmoid_topk", lambda x: khot.sigmoid_topk(x, 10.0)), ("topk_mask", lambda x: khot.topk_mask(x, 10))]:
        x = torch.randn(64, 4096, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(x)  # warm-up (kernel compilation) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = fn(x)
        except Exception as error:  # report, then go on with the other op
            lines.append(f"{name}: capture FAILED ({type(error).__name__}: {error})")
            continue
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        want = fn(x)
        same = torch.equal(out, want) if out.dtype == torch.bool else bool((out - want).abs().max() <= 1e-6)
        lines.append(f"{name}: captured, replayed on new data, {'equal to' if same else 'DIFFERENT from'} eager")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (and triton); none is available here.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    device = "cuda"
    copy_gbs = copy_bandwidth(device, args.repeats)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; device copy: {copy_gbs:.0f} GB/s\n")
    print("| cell | khot ms | reference ms | speed-up | khot bandwidth |")
    print("|---|---|---|---|---|")
    for cell in cells(device):
        khot_ms, ref_ms = interleaved_ms([cell.khot, cell.reference], args.repeats)
        print(row(cell, khot_ms, ref_ms, copy_gbs), flush=True)
    print()
    print("\n".join(graph_check(device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
