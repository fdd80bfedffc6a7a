"""Benchmark the relaxations of the method registry (forward + backward) against softmax on the CPU.

Run as ``python benchmarks/relaxations.py`` (``--n``, ``--batch``, ``--k``, ``--repeats``,
``--methods``). For each method (registry records of ``khot.methods()``; default: sigmoid for
reference, sparse, lapsum and soft at its default iterations) prints the median forward + backward
time and its ratio to ``softmax`` forward + backward on the same float32 input, timed in turn
(``khot.bench.measure.interleaved_ms``). Issue 13's targets at (4, 10^6): ``sparse`` and
``lapsum`` <= 4x; ``soft`` as measured. Stochastic methods run with a seeded generator.

``--grid`` instead times ``sparse`` and ``lapsum`` over ``k`` in ``--ks`` (default 10, 10^3, 10^5,
5·10^5) and ``τ`` in ``--taus`` (default 1, 0.1), all interleaved with softmax in one run, and
prints the ratios as a table (the issue's target is every cell <= 4).

Both modes time on ``--threads`` threads (default 1) with ``time.thread_time``: the machines these
run on are shared, and the CPU time of one thread is far steadier there than wall time.
"""

from __future__ import annotations

import argparse
import time

import torch

from khot.bench.measure import interleaved_ms

from khot.relaxed import registry


def _grid(x, g, args) -> None:
    ks = [float(k) for k in args.ks.split(",")]
    taus = [float(t) for t in args.taus.split(",")]
    names = ["sparse", "lapsum"]
    cells = [(name, k, tau) for name in names for tau in taus for k in ks]

    def run(name, k, tau):
        fn = registry.get(name).mask
        return lambda: fn(x, k, -1, temperature=tau).backward(g)

    times = interleaved_ms(
        [lambda: torch.softmax(x, -1).backward(g)] + [run(*c) for c in cells], args.repeats, args.warmup, clock=time.thread_time
    )
    soft = times[0]
    ratio = dict(zip(cells, (t / soft for t in times[1:])))
    print(f"softmax fwd+bwd: {soft:.1f} ms (median CPU time of one thread); cells: method fwd+bwd / softmax fwd+bwd\n")
    print(f"{'method':<8}{'τ':>6}" + "".join(f"{f'k={k:g}':>11}" for k in ks))
    for name in names:
        for tau in taus:
            print(f"{name:<8}{tau:>6g}" + "".join(f"{ratio[name, k, tau]:11.2f}" for k in ks))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n", type=int, default=10**6)
    parser.add_argument("--k", type=float, default=1000.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="sigmoid,sparse,lapsum,soft", help="comma-separated registry names")
    parser.add_argument("--grid", action="store_true", help="sparse and lapsum over --ks x --taus")
    parser.add_argument("--ks", default="10,1000,100000,500000")
    parser.add_argument("--taus", default="1,0.1")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU, ({args.batch}, {args.n})"
          + ("" if args.grid else f", k = {args.k:g}") + "\n")
    x = torch.randn(args.batch, args.n, requires_grad=True)
    g = torch.randn_like(x)
    if args.grid:
        return _grid(x, g, args)
    records = [registry.get(name) for name in args.methods.split(",")]

    def run(m):
        k = args.k if m.real_k else int(args.k)
        extra = {"generator": torch.Generator().manual_seed(0)} if m.stochastic else {}
        return lambda: m.mask(x, k, -1, temperature=m.default_temperature, **extra).backward(g)

    times = interleaved_ms(
        [lambda: torch.softmax(x, -1).backward(g)] + [run(m) for m in records], args.repeats, args.warmup, clock=time.thread_time
    )
    print(f"{'method':<12}{'cost':>12}{'fwd+bwd ms':>12}{'vs softmax':>12}")
    print(f"{'softmax':<12}{'O(n)':>12}{times[0]:12.1f}{1:12.2f}")
    for m, t in zip(records, times[1:]):
        print(f"{m.name:<12}{m.cost:>12}{t:12.1f}{t / times[0]:12.2f}")


if __name__ == "__main__":
    main()
