import math

import pytest
import torch

import khot.relaxed._common as _common
from khot.relaxed.counting import counting_select, counting_topk, soft_rank
from khot.relaxed.iterative import iterative_select, iterative_topk


def goyal_reference(E: list[list[float]], v: list[float], k: int, tau: float) -> list[list[float]]:
    """Algorithm 1 (Goyal et al.) as published, for one example, step by step, item by item."""
    remaining = set(range(len(v)))
    out = []
    for _ in range(k):
        a = max(remaining, key=lambda i: v[i])
        e = {i: math.exp(-((v[i] - v[a]) ** 2) / tau) for i in remaining}
        z = sum(e.values())
        out.append([sum(e[i] / z * E[i][c] for i in remaining) for c in range(len(E[0]))])
        remaining.remove(a)
    return out


def capacity_reference(E: list[list[float]], v: list[float], k: int, tau: float) -> list[list[float]]:
    """khot's rule (module docstring) for one example, item by item: step t centres on the t-th
    largest score p, weighs item i by c_i exp(-max(0, p - v_i)**2 / tau), normalised, and takes
    that weight out of the capacities c (all 1 at the start)."""
    capacity = [1.0] * len(v)
    out = []
    for p in sorted(v, reverse=True)[:k]:
        held = [c * math.exp(-(max(0.0, p - vi) ** 2) / tau) for c, vi in zip(capacity, v)]
        w = [h / sum(held) for h in held]
        capacity = [c - wi for c, wi in zip(capacity, w)]
        out.append([sum(w[i] * E[i][c] for i in range(len(v))) for c in range(len(E[0]))])
    return out


def separated(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(batch)]).double() / n


def both_by_loop(reference, x, s, k, tau):
    rows = torch.tensor([reference(x[b].tolist(), s[b].tolist(), k, tau) for b in range(len(s))], dtype=x.dtype)
    eye = torch.eye(s.shape[-1], dtype=x.dtype).tolist()
    mask = torch.tensor([reference(eye, s[b].tolist(), k, tau) for b in range(len(s))], dtype=x.dtype).sum(1)
    return rows, mask


@pytest.mark.parametrize("n,k,tau", [(7, 3, 0.05), (20, 20, 0.01), (33, 1, 0.1), (25, 9, 0.002)])
@pytest.mark.parametrize("block_elements", [1, 1 << 22])
def test_iterative_matches_loop_reference(n, k, tau, block_elements, monkeypatch):
    monkeypatch.setattr(_common, "_BLOCK_ELEMENTS", block_elements)  # one step per block, or all
    g = torch.Generator().manual_seed(n)
    s = torch.rand(3, n, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 4, generator=g, dtype=torch.float64)
    rows, mask = both_by_loop(capacity_reference, x, s, k, tau)
    torch.testing.assert_close(iterative_select(x, s, k, temperature=tau), rows)
    torch.testing.assert_close(iterative_topk(s, k, temperature=tau), mask)
    torch.testing.assert_close(mask.sum(-1), torch.full((3,), float(k), dtype=mask.dtype))


@pytest.mark.parametrize("n,k", [(7, 3), (30, 30), (25, 9)])
def test_iterative_is_the_published_algorithm_on_separated_scores(n, k):
    s = separated(3, n, n)  # gaps >= 1/n >> sqrt(tau)
    x = torch.randn(3, n, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    tau = (0.1 / n) ** 2
    rows, mask = both_by_loop(goyal_reference, x, s, k, tau)
    torch.testing.assert_close(iterative_select(x, s, k, temperature=tau), rows, atol=1e-12, rtol=0)
    torch.testing.assert_close(iterative_topk(s, k, temperature=tau), mask, atol=1e-12, rtol=0)


def test_iterative_mask_in_unit_interval_and_monotone_on_near_ties():
    # the published algorithm gives 0.33 / 0.83 / 1.83 / 0 here (the best item lowest)
    s = torch.tensor([0.5, 0.5001, 0.4999, -3.0], dtype=torch.float64)
    _, goyal = both_by_loop(goyal_reference, torch.eye(4, dtype=s.dtype)[None], s[None], 3, 1e-5)
    assert goyal.max() > 1.8
    torch.testing.assert_close(iterative_topk(s, 3), torch.tensor([1.0, 1, 1, 0], dtype=s.dtype), atol=1e-3, rtol=0)
    g = torch.Generator().manual_seed(0)
    for trial in range(60):  # clustered, spread and staircase scores, broad and sharp temperatures
        n = int(torch.randint(2, 30, (1,), generator=g))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        s = torch.rand(8, n, generator=g, dtype=torch.float64)
        if trial % 3 == 1:
            s = (s * 4).round() / 4 + 1e-3 * torch.rand(8, n, generator=g, dtype=torch.float64)
        if trial % 3 == 2:
            s = 0.1 * torch.randn(8, n, generator=g, dtype=torch.float64)
        tau = 10 ** float(torch.empty(1).uniform_(-5, 0, generator=g))
        m = iterative_topk(s, k, temperature=tau)
        assert m.min() >= -1e-12 and m.max() <= 1 + 1e-12
        torch.testing.assert_close(m.sum(-1), torch.full((8,), float(k), dtype=s.dtype))
        by_score = m.gather(-1, s.argsort(-1, descending=True))
        assert (by_score[:, 1:] - by_score[:, :-1]).max() <= 1e-12  # non-increasing down the ranking


def exact(x, s, k):
    idx = torch.sort(s, dim=-1, descending=True).indices[..., :k]
    rows = x.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
    return rows, torch.zeros_like(s).scatter(-1, idx, 1.0)


@pytest.mark.parametrize("select,topk", [(iterative_select, iterative_topk), (counting_select, counting_topk)])
def test_sharp_limit_is_exact_top_k_in_order(select, topk):
    s = separated(4, 30, 1)
    x = torch.randn(4, 30, 5, dtype=torch.float64)
    rows, mask = exact(x, s, 7)
    torch.testing.assert_close(select(x, s, 7, temperature=1e-7), rows, atol=1e-3, rtol=0)
    torch.testing.assert_close(topk(s, 7, temperature=1e-7), mask, atol=1e-4, rtol=0)
    torch.testing.assert_close(topk(s.T, 7, dim=0, temperature=1e-7), mask.T, atol=1e-4, rtol=0)
    soft = topk(s, 7, temperature=0.5)
    assert (soft - mask).abs().max() > 0.1  # a real relaxation


def test_soft_rank_matches_double_loop():
    s = torch.randn(2, 9, dtype=torch.float64)
    tau = 0.3
    ref = [
        [1 + sum(1 / (1 + math.exp(-(row[j] - row[i]) / tau)) for j in range(9) if j != i) for i in range(9)]
        for row in s.tolist()
    ]
    torch.testing.assert_close(soft_rank(s, temperature=tau), torch.tensor(ref, dtype=s.dtype))
    torch.testing.assert_close(soft_rank(s.T, dim=0, temperature=tau), torch.tensor(ref, dtype=s.dtype).T)
    torch.testing.assert_close(soft_rank(s, temperature=tau).sum(-1), torch.full((2,), 45.0, dtype=s.dtype))


def test_chunked_equals_unchunked(monkeypatch):
    s = torch.randn(3, 40, dtype=torch.float64)
    x = torch.randn(3, 40, 2, dtype=torch.float64)

    def run():
        si, xi = s.clone().requires_grad_(), x.clone().requires_grad_()
        out = (soft_rank(si, temperature=0.2).sin().sum() + counting_select(xi, si, 6, temperature=0.2).cos().sum())
        out.backward()
        return out.detach(), si.grad, xi.grad

    whole = run()
    monkeypatch.setattr(_common, "_BLOCK_ELEMENTS", 300)  # blocks of 2 rows / slots
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b)


def test_counting_topk_sum_and_per_row_k():
    s = separated(2, 50, 2).float()
    k = torch.tensor([3, 40])
    m = counting_topk(s, k)
    torch.testing.assert_close(m.sum(-1), k.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(m[1], counting_topk(s[1], 40))


def test_counting_large_n_bounded_memory():
    n = 10_000
    s = (torch.randperm(n) / n).unsqueeze(0).requires_grad_()  # gaps 1e-4
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m = counting_topk(s, 100, temperature=2e-5)
    (m * torch.linspace(0, 1, n)).sum().backward()
    assert sum(saved.values()) < 100 * n  # distinct storages: no n x n intermediate kept
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert abs(m.sum().item() - 100) < 0.01


def test_gradcheck():
    s = separated(2, 8, 3).requires_grad_()
    x = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
    for select in (iterative_select, counting_select):
        assert torch.autograd.gradcheck(lambda x, s: select(x, s, 3, temperature=0.05), (x, s))
    assert torch.autograd.gradcheck(lambda s: iterative_topk(s, 3, temperature=0.05), (s,))
    assert torch.autograd.gradcheck(lambda s: counting_topk(s, 3, temperature=0.2), (s,))
    assert torch.autograd.gradcheck(lambda s: soft_rank(s, temperature=0.2), (s,))


@pytest.mark.parametrize("fn", [iterative_topk, counting_topk, soft_rank])
def test_dtypes_and_empty(fn):
    s = torch.rand(4, 12)
    args = () if fn is soft_rank else (5,)
    for dtype in (torch.float16, torch.bfloat16):
        out = fn(s.to(dtype), *args, temperature=0.1)
        assert out.dtype == dtype
        torch.testing.assert_close(out, fn(s.to(dtype).double(), *args, temperature=0.1).to(dtype))
    assert fn(torch.rand(0, 12), *args).shape == (0, 12)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: iterative_topk(torch.rand(5), 6), ValueError, "k=6"),
        (lambda: counting_topk(torch.rand(5), 0), ValueError, "k=0"),
        (lambda: counting_topk(torch.rand(2, 5), torch.tensor([1, 9])), ValueError, "k must lie"),
        (lambda: soft_rank(torch.rand(5), temperature=0), ValueError, "temperature"),
        (lambda: iterative_select(torch.rand(5, 3), torch.rand(5), torch.tensor(2)), TypeError, "k must be"),
        (lambda: counting_select(torch.rand(2, 5, 3), torch.rand(5), 2), ValueError, "scores must have shape"),
        (lambda: soft_rank(torch.rand(5), dim=-2), ValueError, "dim=-2"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
