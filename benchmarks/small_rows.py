"""The training-loop table: khot's ops on the rows users call them on, each beside its reference.

Run as ``python benchmarks/small_rows.py [--device cuda] [--repeats N] [--clock thread]``. Every
row times khot and the reference in turn (``khot.bench.measure.interleaved_ms``: medians of
interleaved runs, so machine noise hits both sides alike) and prints the ratio khot / reference
(lower is better). ``--clock thread`` times CPU work on one torch thread by this thread's CPU time,
which a busy shared machine inflates far less than wall time:

* ``sigmoid_topk`` forward + backward vs ``softmax`` forward + backward on the same tensor, and
  on short CPU rows, in a run of its own, the tensor passes of its solver alone (``_Passes``: no
  per-row arithmetic, no checks, no wrapper), the floor of any eager implementation of it;
* ``topk_mask`` vs ``torch.topk`` + ``zeros`` + ``scatter`` (a mask by hand);
* ``nn.TopKRouter`` forward + backward vs a plain softmax, top-k, renormalise router with the
  same gate;
* successive halving at batch 1, (k, n) = (32, 1024) vs a per-example loop of the published
  algorithm, each round vectorised (``benchmarks/selection.py``); the outputs must agree.

On CUDA it also captures ``sigmoid_topk`` and ``topk_mask`` in a CUDA graph and replays them.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import khot
from khot.bench.measure import interleaved_ms
from khot.relaxed.halving import DEFAULT_TEMPERATURE


def _fwd_bwd(fn, x: torch.Tensor, g: torch.Tensor):
    def run():
        x.grad = None
        fn(x).backward(g)

    return run


class _Passes(torch.autograd.Function):
    """The tensor passes of sigmoid_topk's CPU fast lane on short rows and of its backward, and
    nothing else (no per-row arithmetic, no checks, no wrapper): what any eager implementation of
    this three-evaluation solver pays. Forward: the start (mean, centre, abs, mean), three
    evaluations (sub, sigmoid), two pairs of sums (sum, norm) and Halley's cubes (pow, sum), in
    float64 up to 2**14 elements; backward: its six passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        work = x.double() if x.numel() <= 2**14 else x
        p = torch.empty_like(work)
        mean = work.mean(-1, keepdim=True)
        torch.sub(work, mean, out=p).abs_().mean(-1)
        for evaluation in range(3):
            torch.sub(work, mean, out=p).sigmoid_()
            if evaluation < 2:
                p.sum(-1), torch.linalg.vector_norm(p, dim=-1)
            if evaluation == 0:
                p.pow_(3).sum(-1)
        p = p.to(x.dtype)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        a = torch.ops.aten.sigmoid_backward(p.new_ones(()), p)
        s = a.sum(-1, keepdim=True)
        a = torch.mul(a, g, out=a)
        m = a.sum(-1, keepdim=True) / s
        a = torch.sub(g, m, out=a)
        return torch.ops.aten.sigmoid_backward.grad_input(a, p, grad_input=a)


def sigmoid_rows(device: str, repeats: int):
    cells = [((4096, 64), 2), ((64, 1000), 10), ((1, 1000), 10), ((4, 10**6), 10**5)]
    for shape, k in cells:
        x = torch.randn(shape, device=device, requires_grad=True)
        g = torch.randn(shape, device=device)
        softmax = _fwd_bwd(lambda t: t.softmax(-1), x, g)
        ref, ours = interleaved_ms([softmax, _fwd_bwd(lambda t: khot.sigmoid_topk(t, k), x, g)], repeats)
        yield f"sigmoid_topk fwd+bwd {shape}, k={k}", ours, "softmax fwd+bwd", ref
        if shape[-1] < 2**14 and device == "cpu":  # a run of its own: a third function in the same run slows the others
            ref, floor = interleaved_ms([softmax, _fwd_bwd(_Passes.apply, x, g)], repeats)
            yield "  its tensor passes alone (a floor)", floor, "softmax fwd+bwd", ref


def mask_rows(device: str, repeats: int):
    x = torch.randn(4096, 64, device=device)

    def by_hand():
        return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(2, -1).indices, True)

    ref, ours = interleaved_ms([by_hand, lambda: khot.topk_mask(x, 2)], repeats)
    yield "topk_mask (4096, 64), k=2", ours, "topk + scatter", ref


def router_rows(device: str, repeats: int):
    tokens, d, experts, k = 4096, 256, 64, 2
    torch.manual_seed(0)
    router = khot.nn.TopKRouter(d, experts, k).to(device)
    x = torch.randn(tokens, d, device=device)

    def plain():
        probs = router.gate(x).softmax(-1)
        weights, indices = probs.topk(k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        weights.sum().backward()
        return indices

    def ours():
        out = router(x)
        (out.weights.sum() + out.aux_loss).backward()

    ref, t = interleaved_ms([plain, ours], repeats)
    yield f"TopKRouter fwd+bwd {tokens} tokens, {experts} experts, k={k}", t, "softmax-topk-renormalise", ref


def halving_rows(device: str, repeats: int):
    from selection import published_halving  # benchmarks/selection.py: the published algorithm, per example

    x = torch.rand(1, 1024, 32, device=device) * 2 - 1
    s = torch.rand(1, 1024, device=device)
    t = DEFAULT_TEMPERATURE
    torch.testing.assert_close(khot.soft_select(x, s, 32, method="halving"), published_halving(x, s, 32, t))
    ref, ours = interleaved_ms([lambda: published_halving(x, s, 32, t), lambda: khot.soft_select(x, s, 32, method="halving")], repeats)
    yield "halving soft_select batch 1, (k, n) = (32, 1024)", ours, "per-example published loop", ref


def cuda_graphs(device: str) -> None:
    x = torch.randn(4096, 64, device=device)
    outs = {}
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the capture
            khot.sigmoid_topk(x, 2.0), khot.topk_mask(x, 2)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        outs["sigmoid"], outs["mask"] = khot.sigmoid_topk(x, 2.0), khot.topk_mask(x, 2)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ok = torch.allclose(outs["sigmoid"], khot.sigmoid_topk(x, 2.0), atol=2e-6) and torch.equal(outs["mask"], khot.topk_mask(x, 2))
    print(f"CUDA graph capture of sigmoid_topk and topk_mask: {'replays correctly' if ok else 'WRONG RESULTS'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = parser.parse_args(argv)
    if args.clock == "thread":
        torch.set_num_threads(1)
        global interleaved_ms
        interleaved_ms = functools.partial(interleaved_ms, clock=time.thread_time)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {args.clock} clock, float32; ratio = khot / reference (medians)\n")
    print(f"{'call':<58}{'khot ms':>9}   {'reference':<28}{'ms':>8}{'ratio':>8}")
    for rows in (sigmoid_rows, mask_rows, router_rows, halving_rows):
        for name, ours, ref_name, ref in rows(args.device, args.repeats):
            print(f"{name:<58}{ours:9.3f}   {ref_name:<28}{ref:8.3f}{ours / ref:8.2f}")
    if args.device.startswith("cuda"):
        cuda_graphs(args.device)


if __name__ == "__main__":
    main()
