"""khot's exact top-k against the plain-PyTorch pattern, side by side in one run.

The baseline is the hand-written pattern (topk, zeros, scatter) generalised to rows::

    mask:  zeros_like(x, dtype=bool).scatter_(dim, x.topk(k, dim).indices, True)
    keep:  x * zeros_like(x).scatter_(dim, x.topk(k, dim).indices, 1)

Each cell times baseline and khot alternately (median of the repeats) and measures
the peak extra memory of one call (CPU: growth of the peak resident size, reset before the call;
CUDA: ``torch.cuda.max_memory_allocated``). Ratios > 1 mean khot is faster/smaller.

    python benchmarks/exact_topk.py              # the benchmark grid, float32 and bfloat16
    python benchmarks/exact_topk.py --quick      # small shapes, a few seconds
    python benchmarks/exact_topk.py --clock thread   # one thread, CPU time: for an overloaded machine
    python benchmarks/exact_topk.py --sweep      # topk_mask speedups over slice lengths and k (2**22 elements)
    python benchmarks/exact_topk.py --backend cpu       # khot through the op's dispatch (as compiled code
                                                        # calls it) instead of the direct eager CPU call;
                                                        # --backend portable: the sync-free path on CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import khot
from khot._backend import use_backend
from khot.bench.measure import baseline_keep, baseline_mask, interleaved_ms, peak_mib

GRID = [  # (shape, k, dim)
    ((4096, 64), 2, -1),  # an MoE router's (tokens, experts)
    ((4096, 32768), 64, -1),
    ((65536, 64), 8, -1),
    ((64, 131072), 16384, -1),
    ((8, 10**6), 1000, -1),
    ((32768, 512), 16, 0),
]
QUICK = [((4096, 64), 2, -1), ((256, 4096), 32, -1), ((4096, 64), 8, -1), ((16, 50000), 500, -1), ((4096, 256), 16, 0)]


def measure(ours, baseline, x, k, dim, repeats, clock=time.perf_counter):
    t_ours, t_base = interleaved_ms([lambda: ours(x, k, dim), lambda: baseline(x, k, dim)], repeats, clock=clock)
    return (
        t_ours,
        t_base,
        peak_mib(lambda: ours(x, k, dim), x.device),
        peak_mib(lambda: baseline(x, k, dim), x.device),
    )


def sweep(device, repeats):
    """``topk_mask`` speedup over the baseline for slice lengths n and counts k, 2**22 elements each."""
    ks = (1, 4, 16, 64, 256)
    for dtype in (torch.float32, torch.bfloat16):
        print(f"\ntopk_mask speedup, {str(dtype)[6:]}, 2**22 elements, rows of n")
        print(f"{'n':>7} " + " ".join(f"{'k=' + str(k):>7}" for k in ks))
        for n in (256, 1024, 4096, 16384, 65536):
            x = torch.randn(2**22 // n, n, device=device).to(dtype)
            cells = []
            for k in ks:
                if 4 * k > n:
                    cells.append(f"{'-':>7}")
                    continue
                t_ours, t_base = interleaved_ms([lambda: khot.topk_mask(x, k), lambda: baseline_mask(x, k, -1)], repeats)
                cells.append(f"{t_base / t_ours:>6.2f}x")
            print(f"{n:>7} " + " ".join(cells), flush=True)


def _on(backend, op):
    def run(*args):
        with use_backend(backend):
            return op(*args)

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--sweep", action="store_true", help="topk_mask over slice lengths and k instead of the grid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--clock", choices=["wall", "thread"], default="wall",
        help="thread: one torch thread, timed by this thread's CPU time (steadier on an overloaded machine)",
    )
    parser.add_argument("--backend", choices=["cpu", "portable", "triton"], help="run khot's ops on this backend, through the op's dispatch")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if args.clock == "thread":
        torch.set_num_threads(1)
    ops = [("topk_mask", khot.topk_mask, baseline_mask), ("keep_topk", khot.keep_topk, baseline_keep)]
    if args.backend:
        ops = [(name, _on(args.backend, op), baseline) for name, op, baseline in ops]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, backend {args.backend or 'default'}, {args.clock} clock")
    if args.sweep:
        return sweep(device, args.repeats)
    header = f"{'op':<10} {'shape':<16} {'k':>6} {'dim':>4} {'dtype':<9} {'khot ms':>9} {'base ms':>9} {'speedup':>8} {'khot MiB':>9} {'base MiB':>9}"
    print(header)
    print("-" * len(header))
    speedups = []
    for shape, k, dim in QUICK if args.quick else GRID:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device=device).to(dtype)
            for name, ours, baseline in ops:
                t_ours, t_base, m_ours, m_base = measure(ours, baseline, x, k, dim, args.repeats, clock)
                speedups.append(t_base / t_ours)
                print(
                    f"{name:<10} {str(shape):<16} {k:>6} {dim:>4} {str(dtype)[6:]:<9} {t_ours:>9.1f} "
                    f"{t_base:>9.1f} {t_base / t_ours:>7.2f}x {m_ours:>9.1f} {m_base:>9.1f}",
                    flush=True,
                )
            del x
    print(f"median speedup {statistics.median(speedups):.2f}x, min {min(speedups):.2f}x over {len(speedups)} cells")


if __name__ == "__main__":
    main()
