"""Benchmark of khot.nn.TopKRouter against a plain softmax-topk-renormalise router.

Forward + backward at (tokens, experts, k) = (4096, 64, 2), d_model = 256, float32: the plain
router is ``softmax``, ``torch.topk``, renormalise, with the same statistics as TopKRouter
(expert load, Switch load-balancing loss, router z-loss) in plain PyTorch; the loss
``(weights * g).sum() + aux_loss + router_z_loss`` is backpropagated to the gate. Goal (issue
11): TopKRouter <= 1.3x the plain router [1.0x]. Also the same without statistics ("bare"), and
TopKRouter's other modes for reference. Interleaved medians (khot.bench.measure.interleaved_ms).

Run: python benchmarks/router.py [--tokens 4096 --experts 64 --k 2 --repeats 41 --threads 1]
"""

from __future__ import annotations

import argparse

import torch

from khot.bench.measure import interleaved_ms
from khot.nn import TopKRouter


def plain_router(gate: torch.nn.Linear, x: torch.Tensor, k: int, stats: bool = True):
    """Mixtral-style routing in plain PyTorch: softmax, top-k, renormalise (+ the statistics)."""
    logits = gate(x)
    probs = logits.softmax(-1)
    weights, indices = probs.topk(k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    if not stats:
        return weights, 0.0
    tokens, experts = probs.shape
    load = torch.zeros(experts, device=x.device).index_add_(0, indices.flatten(), torch.ones(indices.numel(), device=x.device))
    load = load / (tokens * k)
    aux = experts * (load * probs.mean(0)).sum()
    z_loss = logits.logsumexp(-1).square().mean()
    return weights, aux + z_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, generator=gen)
    g = torch.randn(args.tokens, args.k, generator=gen)
    router = TopKRouter(args.d_model, args.experts, args.k)
    sampled = TopKRouter(args.d_model, args.experts, args.k, differentiable="sample")
    straight = TopKRouter(args.d_model, args.experts, args.k, differentiable="straight_through")
    sampled.gate = straight.gate = router.gate

    def khot_step(module):
        out = module(x)
        ((out.weights * g).sum() + out.aux_loss + out.router_z_loss).backward()

    def plain_step(stats: bool):
        weights, loss = plain_router(router.gate, x, args.k, stats)
        ((weights * g).sum() + loss).backward()

    # same experts and weights as the plain router
    with torch.no_grad():
        out, (w, _) = router(x), plain_router(router.gate, x, args.k)
        assert torch.allclose(out.weights, w, atol=1e-6)

    rows = {
        "plain router (softmax, topk, renormalise, stats)": lambda: plain_step(True),
        "TopKRouter": lambda: khot_step(router),
        "plain router, bare (no stats)": lambda: plain_step(False),
        "TopKRouter straight_through": lambda: khot_step(straight),
        "TopKRouter sample": lambda: khot_step(sampled),
    }
    times = interleaved_ms(list(rows.values()), repeats=args.repeats)
    base = times[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd, "
          f"(tokens, experts, k) = ({args.tokens}, {args.experts}, {args.k}), d_model = {args.d_model}")
    print(f"{'router':<52}{'median ms':>11}{'vs plain':>10}")
    for name, ms in zip(rows, times):
        print(f"{name:<52}{ms:>11.3f}{ms / base:>9.2f}x")


if __name__ == "__main__":
    main()
