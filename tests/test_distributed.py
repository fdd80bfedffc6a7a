"""khot.distributed on 2, 3 and 4 gloo processes, against the single-process ops on the
concatenated tensor: exact indices and masks (ties across shard boundaries, NaN, ±inf, ±0,
unequal and empty shards, k larger than a shard, k = 0), sigmoid top-k values and gradients
(float64, against autograd through khot.sigmoid_topk; gradcheck), sampling (same ids on every
rank; equal to inverse-CDF sampling of the whole row at rank 0's uniforms; z-tests of the
frequencies), DTensor placements, and bad input on one rank only (an error on every rank, fast).

Process start-up dominates (a few seconds a process), so each world size is one spawned group
that runs every check; every group runs under a timeout and is killed past it.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import khot
import khot.distributed as kd

GROUP_TIMEOUT_S = 300  # a whole spawned group (the shared CI machine can be slow to start processes)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # a collective that waits longer fails instead of hanging


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, check) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        check(rank, world)
    finally:
        dist.destroy_process_group()
    # After a DTensor has been used (distribute_tensor alone does it, torch 2.13), the gloo group's
    # threads outlive destroy_process_group, and their teardown at interpreter exit now and then
    # aborts the process ("terminate called without an active exception"). Every check has passed
    # by here, so the process leaves without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(check, world: int) -> None:
    """Run ``check(rank, world)`` on ``world`` gloo processes; fail on any error or past the timeout."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # the spawned processes import this module by name (they inherit sys.path)
        sys.path.insert(0, root)
    context = mp.start_processes(_worker, args=(world, _free_port(), check), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {world} spawned processes did not finish within {GROUP_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


# ---------------------------------------------------------------------------------------------
# helpers run inside the spawned processes


def _lengths(n: int, world: int, pattern: int) -> list[int]:
    """Unequal shard lengths summing to ``n``: pattern 0 nearly even, 1 very uneven (a 1-long
    shard), 2 with an empty shard."""
    if pattern == 0:
        return [len(c) for c in torch.arange(n).chunk(world)] + [0] * (world - len(torch.arange(n).chunk(world)))
    if pattern == 1:
        return [1] * (world - 1) + [n - world + 1]
    return [0] + [n // (world - 1)] * (world - 2) + [n - (n // (world - 1)) * (world - 2)]


def _mine(full: torch.Tensor, lengths: list[int], dim: int, rank: int) -> torch.Tensor:
    return full.split(lengths, dim)[rank]


def _same_everywhere(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, t) for g in gathered)


def _tricky(shape, dtype, seed: int) -> torch.Tensor:
    """Few distinct values (ties everywhere, across shard boundaries too), with NaN, ±inf and ±0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).to(dtype)
    if dtype.is_floating_point:
        special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0], dtype=dtype)
        where = torch.rand(shape, generator=g) < 0.25
        x = torch.where(where, special[torch.randint(0, 5, shape, generator=g)], x)
    return x


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=what)


def _check_exact(rank: int, world: int) -> None:
    cases = 0
    for dtype in (torch.float32, torch.bfloat16, torch.int32):
        for shape, dim in (((11,), 0), ((3, 17), 1), ((13, 2, 3), 0), ((2, 3, 9), -1)):
            n = shape[dim]
            for pattern in range(3):
                lengths = _lengths(n, world, pattern)
                full = _tricky(shape, dtype, seed=cases)
                x = _mine(full, lengths, dim, rank)
                for k in sorted({0, 2, min(max(lengths) + 1, n), n}):
                    for largest in (True, False):
                        what = f"{dtype} {shape} dim={dim} lengths={lengths} k={k} largest={largest}"
                        values, indices = kd.sharded_topk(x, k, dim, largest=largest)
                        ref = torch.sort(full, stable=True, dim=dim, descending=largest)
                        _assert_same(indices, ref.indices.narrow(dim, 0, k), what)
                        _assert_same(values, ref.values.narrow(dim, 0, k), what)
                        mask = kd.sharded_topk_mask(x, k, dim, largest=largest)
                        _assert_same(mask, _mine(khot.topk_mask(full, k, dim, largest=largest), lengths, dim, rank), what)
                        cases += 1
    # gradient of the values: each rank's shard gets that of the values it holds
    full = _tricky((3, 13), torch.float64, seed=3).nan_to_num(0.0, 9.0, -9.0).requires_grad_()
    lengths = _lengths(13, world, 1)
    grad = torch.randn(3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = _mine(full, lengths, 1, rank).detach().requires_grad_()
    (kd.sharded_topk(x, 5, largest=False)[0] * grad).sum().backward()
    (torch.sort(full, stable=True, dim=1).values[:, :5] * grad).sum().backward()
    _assert_same(x.grad, _mine(full.grad, lengths, 1, rank), "grad of the values")
    # long shards (khot's chunked CPU path) with ties at the k-th place across shard boundaries
    full = torch.randint(0, 50, (3, 5000 * world), generator=torch.Generator().manual_seed(0)).float()
    lengths = _lengths(full.shape[1], world, 0)
    for k in (5, 300):
        values, indices = kd.sharded_topk(_mine(full, lengths, 1, rank), k)
        ref = torch.sort(full, stable=True, dim=1, descending=True)
        _assert_same(indices, ref.indices[:, :k], f"long k={k}")
        mask = kd.sharded_topk_mask(_mine(full, lengths, 1, rank), k)
        _assert_same(mask, _mine(khot.topk_mask(full, k), lengths, 1, rank), f"long mask k={k}")
    assert cases > 200


def _reference_sigmoid(x: torch.Tensor, k, tau) -> torch.Tensor:
    """sigmoid(x / τ + c) with Σ = k along the last dim: c by 200 plain bisection steps in float64
    (from a bracket far wider than |x / τ|: the steps end at adjacent floats)."""
    a = x.double() / torch.as_tensor(tau, dtype=torch.float64).unsqueeze(-1)
    k = torch.as_tensor(k, dtype=torch.float64).expand(a.shape[:-1])
    lo, hi = torch.full_like(k, -1e9), torch.full_like(k, 1e9)
    for _ in range(200):
        mid = (lo + hi) / 2
        below = torch.sigmoid(a + mid.unsqueeze(-1)).sum(-1) < k
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    p = torch.sigmoid(a + ((lo + hi) / 2).unsqueeze(-1))
    n = a.shape[-1]
    return torch.where((k == 0).unsqueeze(-1), 0.0, torch.where((k == n).unsqueeze(-1), 1.0, p)).to(x.dtype)


def _check_sigmoid(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(1)
    n = 7 * world + 3
    for pattern in range(3):
        lengths = _lengths(n, world, pattern)
        full = torch.randn(4, n, generator=g, dtype=torch.float64) * 3
        full[1, 2] = math.inf  # p = 1
        full[1, n - 1] = -math.inf  # p = 0
        full[2] = torch.linspace(-1e4, 1e4, n, dtype=torch.float64)  # a staircase: |x / τ| up to 1e4
        full[3, :4] = 1.5  # ties
        for k, tau in ((3.0, 1.0), (0.0, 0.5), (float(n), 2.0), (n - 1.5, 0.3), (0.25, 0.05)):
            p = kd.sharded_sigmoid_topk(_mine(full, lengths, 1, rank), k, temperature=tau)
            ref = _mine(_reference_sigmoid(full, k, tau), lengths, 1, rank)
            torch.testing.assert_close(p, ref, rtol=0, atol=1e-10, msg=f"{lengths} k={k} τ={tau}")  # |x / τ| to 3e4: ulp 7e-12
            # the single-process op (loosely: the bisection above is the strict reference)
            ref = _mine(khot.sigmoid_topk(full, k, temperature=tau), lengths, 1, rank)
            torch.testing.assert_close(p, ref, rtol=0, atol=1e-8, msg=f"{lengths} k={k} τ={tau}")
        # gradients in x, a per-row k and a per-row τ, against autograd through the single-process op
        k = torch.tensor([2.0, 3.5, 0.7, n - 2.0], dtype=torch.float64, requires_grad=True)
        tau = torch.tensor([1.0, 0.4, 1.0, 2.5], dtype=torch.float64, requires_grad=True)
        grad = torch.randn(full.shape, generator=g, dtype=torch.float64)
        x = _mine(full, lengths, 1, rank).clone().requires_grad_()
        p = kd.sharded_sigmoid_topk(x, k, temperature=tau)
        (p * _mine(grad, lengths, 1, rank)).sum().backward()
        xr, kr, taur = (t.detach().clone().requires_grad_() for t in (full, k, tau))
        (khot.sigmoid_topk(xr, kr, temperature=taur) * grad).sum().backward()
        for actual, expected, name in ((x.grad, _mine(xr.grad, lengths, 1, rank), "x"), (k.grad, kr.grad, "k"), (tau.grad, taur.grad, "τ")):
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-8, msg=f"grad {name}, {lengths}")
    # a NaN makes its row NaN; float32 and dim 0
    full = torch.randn(n, 3, generator=g)
    full[1, 0] = math.nan
    lengths = _lengths(n, world, 1)
    p = kd.sharded_sigmoid_topk(_mine(full, lengths, 0, rank), 2, 0, temperature=0.5)
    assert p.dtype == torch.float32 and p[:, 0].isnan().all() and not p[:, 1:].isnan().any()
    ref = _mine(khot.sigmoid_topk(full[:, 1:], 2, 0, temperature=0.5), lengths, 0, rank)
    torch.testing.assert_close(p[:, 1:], ref, rtol=0, atol=1e-6)
    _gradcheck_sigmoid(rank, world)


class _ToShard(torch.autograd.Function):
    """The whole (replicated) tensor -> this rank's shard; backward gathers the shards' gradients."""

    @staticmethod
    def forward(ctx, full, lengths, rank):
        ctx.lengths = lengths
        return full.split(lengths, -1)[rank].clone()

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.lengths), None, None


class _FromShards(torch.autograd.Function):
    """Every rank's shard -> the whole tensor on every rank; backward takes this rank's part."""

    @staticmethod
    def forward(ctx, local, lengths, rank):
        ctx.lengths, ctx.rank = lengths, rank
        return _gather(local, lengths)

    @staticmethod
    def backward(ctx, grad):
        return grad.split(ctx.lengths, -1)[ctx.rank].clone(), None, None


def _gather(local: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    width = max(lengths)
    padded = torch.nn.functional.pad(local, (0, width - local.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return torch.cat([p[..., :m] for p, m in zip(parts, lengths)], -1)


def _gradcheck_sigmoid(rank: int, world: int) -> None:
    """gradcheck of the sharded op made a function of replicated tensors (every rank runs the
    same evaluations, so the collectives line up)."""
    n = world + 2
    lengths = _lengths(n, world, 1)
    g = torch.Generator().manual_seed(2)
    full = torch.randn(2, n, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([1.5, 2.2], dtype=torch.float64, requires_grad=True)
    tau = torch.tensor([0.8, 1.3], dtype=torch.float64, requires_grad=True)

    def f(full, k, tau):
        p = kd.sharded_sigmoid_topk(_ToShard.apply(full, lengths, rank), k, temperature=tau)
        return _FromShards.apply(p, lengths, rank)

    assert torch.autograd.gradcheck(f, (full, k, tau))


def _reference_sample(full: torch.Tensor, k, top_p, temperature, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of the whole rows at ``u``: over the top k best first (then top-p on
    the renormalised top k), or without k over the vocabulary in index order."""
    values, indices = full.double(), torch.arange(full.shape[-1]).expand(full.shape)
    if k is not None:
        values, indices = torch.sort(values, stable=True, dim=-1, descending=True)
        values, indices = values[:, :k], indices[:, :k]
    probs = torch.softmax(values / temperature, -1)
    if top_p is not None:
        keep = probs.cumsum(-1) - probs < top_p
        probs = torch.where(keep, probs, 0) / torch.where(keep, probs, 0).sum(-1, keepdim=True)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=values.shape[-1] - 1)
    return indices.gather(-1, pick).squeeze(-1)


def _reference_probs(row: torch.Tensor, k, top_p, temperature) -> torch.Tensor:
    """The sampling distribution of one row, from its softmax over the whole vocabulary."""
    probs = torch.softmax(row.double() / temperature, -1)
    if k is not None:
        probs = torch.where(khot.topk_mask(row, k), probs, 0)
    if top_p is not None:
        order = torch.sort(probs, stable=True, descending=True).indices
        sorted_p = probs[order] / probs.sum()
        drop = order[sorted_p.cumsum(0) - sorted_p >= top_p]
        probs[drop] = 0
    return probs / probs.sum()


def _check_sample(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(3)
    n = 9 * world + 2
    for pattern in range(3):
        lengths = _lengths(n, world, pattern)
        full = torch.randn(6, n, generator=g) * 2
        full[:, 3] = -math.inf  # masked tokens are never drawn
        full[0, :] = 0.5  # ties
        x = _mine(full, lengths, 1, rank)
        for k, top_p, temperature in ((None, None, 1.0), (1, None, 1.0), (5, None, 0.7), (n - 1, 0.8, 1.3), (7, 0.3, 1.0)):
            seeds = [(100 + seed_rank) for seed_rank in range(world)]  # different generators on every rank
            ids = kd.sharded_sample(x, k=k, top_p=top_p, temperature=temperature, generator=torch.Generator().manual_seed(seeds[rank]))
            assert ids.dtype == torch.int64 and ids.shape == (6,) and _same_everywhere(ids)
            assert not (ids == 3).any()
            u = torch.rand(6, generator=torch.Generator().manual_seed(seeds[0]), dtype=torch.float64)
            assert torch.equal(ids, _reference_sample(full, k, top_p, temperature, u)), (lengths, k, top_p)
    # frequencies: many rows holding the same logits, one call each
    rows = 20000
    row = torch.randn(n, generator=g)
    row[n // 2] = row[0]  # a tie across shards
    lengths = _lengths(n, world, 0)
    for k, top_p, temperature in ((None, None, 1.5), (6, 0.85, 1.0)):
        logits = _mine(row.expand(rows, n), lengths, 1, rank)
        ids = kd.sharded_sample(logits, k=k, top_p=top_p, temperature=temperature, generator=torch.Generator().manual_seed(7))
        counts = torch.bincount(ids, minlength=n).double()
        p = _reference_probs(row, k, top_p, temperature)
        z = (counts - rows * p) / (rows * p * (1 - p)).clamp(min=1e-12).sqrt()
        assert bool((z.abs() < 4.5).all()) and bool((counts[p == 0] == 0).all()), (k, top_p, z)


def _check_dtensor(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    n = 5 * world + 1  # uneven shards (torch.chunk's split)
    full = _tricky((3, n), torch.float32, seed=11)
    dt = distribute_tensor(full, mesh, [Shard(1)])
    values, indices = kd.sharded_topk(dt, 4, 1)
    ref = torch.sort(full, stable=True, dim=1, descending=True)
    assert values.placements == (Replicate(),) and indices.placements == (Replicate(),)
    _assert_same(indices.to_local(), ref.indices[:, :4], "dtensor indices")
    _assert_same(values.full_tensor(), ref.values[:, :4], "dtensor values")
    mask = kd.sharded_topk_mask(dt, 4, -1)
    assert mask.placements == (Shard(1),) and mask.shape == full.shape
    _assert_same(mask.full_tensor(), khot.topk_mask(full, 4), "dtensor mask")
    xs = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    p = kd.sharded_sigmoid_topk(distribute_tensor(xs, mesh, [Shard(1)]), 2.5, temperature=0.7)
    assert p.placements == (Shard(1),)
    torch.testing.assert_close(p.full_tensor(), khot.sigmoid_topk(xs, 2.5, temperature=0.7), rtol=0, atol=1e-9)
    ids = kd.sharded_sample(distribute_tensor(xs, mesh, [Shard(1)]), k=3)
    assert ids.placements == (Replicate(),) and ids.shape == (3,)
    with pytest.raises(ValueError, match=r"Shard\(1\)"):
        kd.sharded_topk(distribute_tensor(full, mesh, [Shard(0)]), 2, 1)
    if world == 4:  # a 2-D mesh: rows sharded on one mesh dimension, the vocabulary on the other
        mesh2 = init_device_mesh("cpu", (2, 2))
        full = _tricky((4, 9), torch.float32, seed=12)
        values, indices = kd.sharded_topk(distribute_tensor(full, mesh2, [Shard(0), Shard(1)]), 3, 1)
        assert indices.placements == (Shard(0), Replicate())
        _assert_same(indices.full_tensor(), torch.sort(full, stable=True, dim=1, descending=True).indices[:, :3], "2-D mesh")


def _raises_everywhere(error, match, call) -> None:
    dist.barrier()
    start = time.monotonic()
    with pytest.raises(error, match=match):
        call()
    assert time.monotonic() - start < 10  # no rank waits for a collective that never comes


def _check_errors(rank: int, world: int) -> None:
    last = rank == world - 1
    x = torch.randn(2 if not last else 3, 5)
    _raises_everywhere(ValueError, "disagree on the shape", lambda: kd.sharded_topk(x, 2))
    x = torch.randn(2, 5)
    _raises_everywhere(ValueError, "same k", lambda: kd.sharded_topk(x, 3 if last else 2))
    _raises_everywhere(ValueError, f"k={5 * world + 1} is out of range", lambda: kd.sharded_topk_mask(x, 5 * world + 1))
    _raises_everywhere(TypeError, f"rank {world - 1}: k must be an int", lambda: kd.sharded_topk(x, "2" if last else 2))
    _raises_everywhere(ValueError, "disagree on the dim", lambda: kd.sharded_topk(torch.randn(5, 5), 2, 0 if last else 1))
    _raises_everywhere(TypeError, "largest must be True or False", lambda: kd.sharded_topk(x, 2, largest=1 if last else True))
    _raises_everywhere(ValueError, "temperature must be finite and > 0", lambda: kd.sharded_sigmoid_topk(x, 2.0, temperature=-1.0 if last else 1.0))
    _raises_everywhere(ValueError, "same k", lambda: kd.sharded_sigmoid_topk(x, torch.tensor([1.0, 2.0 + last]), temperature=1.0))
    _raises_everywhere(ValueError, "disagree on the dtype", lambda: kd.sharded_sample(x.double() if last else x, k=2))
    _raises_everywhere(ValueError, "top_p needs k", lambda: kd.sharded_sample(x, top_p=0.9))
    _raises_everywhere(ValueError, "NaN", lambda: kd.sharded_sample(torch.full((2, 5), math.nan) if last else x, k=3))
    # NumPy numbers, fractions, tensors: agreed as the numbers they are (the metadata all-gather could
    # not serialise a NumPy float: a raw TypeError on that rank while the others waited in the collective)
    import fractions

    import numpy

    want = kd.sharded_sigmoid_topk(x, 2.0, temperature=1.0)
    torch.testing.assert_close(kd.sharded_sigmoid_topk(x, numpy.float32(2.0) if last else 2.0, temperature=numpy.float32(1.0)), want)
    torch.testing.assert_close(kd.sharded_sigmoid_topk(x, fractions.Fraction(2), temperature=1), want)
    draw = kd.sharded_sample(x, k=2, temperature=0.5, generator=torch.Generator().manual_seed(1))
    for k, tau in ((numpy.int64(2), numpy.float32(0.5)), (2, torch.tensor(0.5))):
        assert torch.equal(kd.sharded_sample(x, k=k, temperature=tau, generator=torch.Generator().manual_seed(1)), draw)
    # an empty batch (a raw "view Long as Byte" error before)
    values, indices = kd.sharded_topk(torch.randn(0, 3), 1)
    assert values.shape == indices.shape == (0, 1) and kd.sharded_topk_mask(torch.randn(0, 3), 1).shape == (0, 3)
    assert kd.sharded_sample(torch.randn(0, 3), k=1).shape == (0,)
    # the group still works after every error
    values, _ = kd.sharded_topk(torch.full((2, 5), float(rank)), 1)
    assert values.eq(world - 1).all()


def _check_all(rank: int, world: int) -> None:
    _check_errors(rank, world)
    _check_exact(rank, world)
    _check_sigmoid(rank, world)
    _check_sample(rank, world)
    _check_dtensor(rank, world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_ops_match_the_single_process_ops(world):
    _spawn(_check_all, world)


def test_single_process_group_and_no_group():
    """A world of one (here, no process spawned) is the plain op; without a group, a clear error."""
    with pytest.raises(RuntimeError, match="init_process_group"):
        kd.sharded_topk(torch.randn(3), 1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = _tricky((4, 12), torch.float32, seed=5)
        for k in (0, 3, 12):
            _assert_same(kd.sharded_topk_mask(x, k), khot.topk_mask(x, k), f"k={k}")
        with pytest.raises(ValueError, match="k=13 is out of range"):
            kd.sharded_topk(x, 13)
    finally:
        dist.destroy_process_group()
