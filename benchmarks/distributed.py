"""Sharded top-k against "all-gather the shards, then top-k", on gloo ranks of this machine.

Every rank holds ``(batch, n / ranks)`` float32 logits (a vocabulary split across
tensor-parallel ranks). Compared, side by side in one run (interleaved medians):

* ``khot sharded_topk``: a metadata all-gather, then one all-gather of each rank's top k;
* ``khot sharded_sample``: the same, sampling one token per row (top-k 50, top-p 0.9);
* ``all-gather + topk``: all-gather the shards, ``torch.topk`` of the whole rows (what engines do).

Every timed call starts with a barrier (so that no call is charged for ranks still finishing the
previous one); its cost is the "barrier only" row, included in every other row.

"bytes per rank" is what each rank hands to the collectives (counted by wrapping them); a ring
all-gather sends ``ranks - 1`` times that over the wire per rank.

    .venv/bin/python benchmarks/distributed.py                  # batch 8, n = 128256 * 4, k = 50, 2 and 4 ranks
    .venv/bin/python benchmarks/distributed.py --ranks 2 --repeats 3
"""

from __future__ import annotations

import argparse
import socket
import time

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp

import khot.distributed as kd
from khot.bench.measure import interleaved_ms



def _counted(fn, counter):
    """``fn`` (a collective) that adds the bytes of its input tensor to ``counter[0]``."""

    def wrapper(*args, **kwargs):
        tensor = args[1] if fn.__name__ in ("all_gather", "all_gather_into_tensor") else args[0]
        counter[0] += tensor.numel() * tensor.element_size()
        return fn(*args, **kwargs)

    return wrapper


def _bytes_sent(fn) -> int:
    """Bytes this rank hands to all-gathers and all-reduces during one ``fn()``."""
    counter = [0]
    saved = {name: getattr(c10d, name) for name in ("all_gather", "all_gather_into_tensor", "all_reduce")}
    try:
        for name, original in saved.items():
            setattr(c10d, name, _counted(original, counter))
            setattr(dist, name, getattr(c10d, name))
        fn()
    finally:
        for name, original in saved.items():
            setattr(c10d, name, original)
            setattr(dist, name, original)
    return counter[0]


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        local = args.n // world
        x = torch.randn(args.batch, local, generator=torch.Generator().manual_seed(rank))
        parts = [torch.empty_like(x) for _ in range(world)]

        def gather_then_topk():
            dist.all_gather(parts, x)
            return torch.topk(torch.cat(parts, -1), args.k, -1)

        def ours():
            return kd.sharded_topk(x, args.k)

        def sample():
            return kd.sharded_sample(x, k=args.k, top_p=0.9, generator=torch.Generator().manual_seed(0))

        # the same answer (indices may differ only among tied values; none here)
        assert torch.equal(ours()[1], gather_then_topk().indices)
        fns = {"khot sharded_topk": ours, "khot sharded_sample": sample, "barrier only": lambda: None, "all-gather + topk": gather_then_topk}
        sent = {name: _bytes_sent(fn) for name, fn in fns.items()}
        # every timed call starts with a barrier, so that no call is charged for the other ranks
        # still finishing the previous one (the barrier's own time is the "barrier only" row); each
        # round starts with a pause (timed, not shown): on a loaded machine the first call after
        # the CPU-heavy baseline otherwise waits for the scheduler
        timed = [lambda: time.sleep(0.05)] + [lambda fn=fn: (dist.barrier(), fn()) for fn in fns.values()]
        times = interleaved_ms(timed, repeats=args.repeats, warmup=2)[1:]
        if rank == 0:
            queue.put([(name, sent[name], ms) for name, ms in zip(fns, times)])
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n", type=int, default=128256 * 4, help="the whole vocabulary (split evenly)")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rows = []
    print(f"batch {args.batch}, n = {args.n}, k = {args.k}, float32; gloo on 127.0.0.1, {torch.get_num_threads()} threads here, 1 per rank")
    print(f"| ranks | method | bytes per rank | ms (median) | time / all-gather + topk |")
    print("|---|---|---|---|---|")
    for world in args.ranks:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_rank, args=(world, _free_port(), args, queue), nprocs=world, start_method="spawn")
        result = queue.get()
        base = result[-1][2]
        for name, sent, ms in result:
            print(f"| {world} | {name} | {sent:,} | {ms:.2f} | {ms / base:.3f} |")
        rows += [(world, *r) for r in result]
    return rows


if __name__ == "__main__":
    main()
