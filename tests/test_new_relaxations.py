"""sparse, lapsum, soft, perturbed and gumbel top-k against independent references (float64 bisection,
a plain Sinkhorn, Monte-Carlo finite differences, torch.topk), and the rules every op follows."""

from __future__ import annotations

import math

import pytest
import torch

import khot
from khot.relaxed.gumbel import gumbel_topk
from khot.relaxed.lapsum import lapsum_topk
from khot.relaxed.perturbed import perturbed_topk
from khot.relaxed.soft import soft_ot_topk
from khot.relaxed.sparse import sparse_topk

INF = math.inf
NEW = ["sparse", "lapsum", "soft", "perturbed", "gumbel", "simple"]


def _bisect(total, lo: float, hi: float, k: float, steps: int = 200) -> float:
    """The t in [lo, hi] with total(t) = k for a non-increasing total, by plain float64 bisection."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > k else (lo, mid)
    return (lo + hi) / 2


def _capped_simplex(z: torch.Tensor, k: float) -> torch.Tensor:
    t = _bisect(lambda t: (z - t).clamp(0, 1).sum().item(), z.min().item() - 1, z.max().item(), k)
    return (z - t).clamp(0, 1)


def _laplace_cdf(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u <= 0, 0.5 * torch.exp(u.clamp(max=0)), 1 - 0.5 * torch.exp(-u.clamp(min=0)))


def _lapsum_reference(z: torch.Tensor, k: float) -> torch.Tensor:
    t = _bisect(lambda t: _laplace_cdf(z - t).sum().item(), z.min().item() - 60, z.max().item() + 60, k)
    return _laplace_cdf(z - t)


# ----------------------------------------------------------------------------- sparse


@pytest.mark.parametrize("k", [0.5, 3, 7.25, 17.9])
@pytest.mark.parametrize("tau", [0.05, 1.0, 30.0])
def test_sparse_equals_the_bisection_projection(k, tau):
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[1, 3:6] = x[1, 2]  # ties
    p = sparse_topk(x, k, temperature=tau)
    ref = torch.stack([_capped_simplex(row / tau, k) for row in x])
    torch.testing.assert_close(p, ref, atol=1e-9, rtol=0)
    assert (p.sum(-1) - k).abs().max() < 1e-9
    assert torch.equal(p == 0, ref <= 1e-12) and ((p == 0).any() or tau > 1)  # exact zeros where the projection has them


def test_sparse_jacobian_is_the_closed_form_on_the_support():
    x = torch.randn(12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tau = 0.7
    jac = torch.autograd.functional.jacobian(lambda x: sparse_topk(x, 4.3, temperature=tau), x)
    free = ((_capped_simplex(x / tau, 4.3) > 0) & (_capped_simplex(x / tau, 4.3) < 1)).double()
    assert 1 < free.sum() < 12
    expected = (torch.diag(free) - torch.outer(free, free) / free.sum()) / tau
    torch.testing.assert_close(jac, expected)
    xs = torch.randn(3, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    k = torch.tensor([1.5, 4.0, 7.2], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, k, t: sparse_topk(x, k, temperature=t), (xs, k, t))


def test_sparse_float32_matches_float64():
    x = torch.randn(4, 10**5, generator=torch.Generator().manual_seed(3)) * 100
    for k in (10, 5e4 + 0.5):
        p32, p64 = sparse_topk(x, k, temperature=0.5), sparse_topk(x.double(), k, temperature=0.5)
        assert (p32.double() - p64).abs().max() < 2e-4  # float32 resolution of x / τ ~ 200
        assert (p64.sum(-1) - k).abs().max() < 1e-7 * max(1, k)


# ----------------------------------------------------------------------------- lapsum


@pytest.mark.parametrize("k", [0.5, 3, 10.0, 19.5])
@pytest.mark.parametrize("tau", [0.01, 1.0, 50.0])
def test_lapsum_equals_the_bisection_root(k, tau):
    x = torch.randn(4, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    p = lapsum_topk(x, k, temperature=tau)
    ref = torch.stack([_lapsum_reference(row / tau, k) for row in x])
    torch.testing.assert_close(p, ref, atol=1e-10, rtol=0)
    assert (p.sum(-1) - k).abs().max() < 1e-10


def test_lapsum_gradcheck_in_x_k_and_temperature():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    k = torch.tensor([0.7, 3.0, 6.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, k, t: lapsum_topk(x, k, temperature=t), (x, k, t))
    assert torch.autograd.gradcheck(lambda x, k: lapsum_topk(x, k, temperature=0.7), (x, k))  # τ a number: its rate folded in
    # the backward reads F' kept from the forward; differentiated again, it computes F' from p
    assert torch.autograd.gradgradcheck(lambda x, k, t: lapsum_topk(x, k, temperature=t), (x, k, t))


@pytest.mark.parametrize("name", ["sparse", "lapsum"])
def test_gradient_in_k_at_extreme_temperatures(name):
    # τ = 3e38: every p is k / n and grad_k is the row mean of g; a rate of 1e-39 folded into the
    # first product of the backward would underflow it to subnormals (0 and 8e-7 instead of ±5.45e-7)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(9))
    k = torch.tensor([1.5, 2.0], dtype=torch.float64, requires_grad=True)
    g = torch.linspace(-1e-6, 1e-6, 12).reshape(2, 6)
    khot.soft_topk(x, k, method=name, temperature=3e38).backward(g)
    torch.testing.assert_close(k.grad, g.double().mean(-1), rtol=1e-5, atol=0)


def test_lapsum_float32_matches_float64():
    x = torch.randn(4, 10**5, generator=torch.Generator().manual_seed(5))
    for k in (3, 5e4 + 0.5):
        p32, p64 = lapsum_topk(x, k, temperature=0.01), lapsum_topk(x.double(), k, temperature=0.01)
        assert (p32.double() - p64).abs().max() < 1e-4


# ----------------------------------------------------------------------------- soft


def _sinkhorn_reference(x: torch.Tensor, k: float, eps: float, iters: int = 5000) -> torch.Tensor:
    """Plain Sinkhorn scaling (probability domain) with the full cost (x - y)², anchors {0, 1}."""
    n = x.shape[0]
    cost = (x[:, None] - torch.tensor([0.0, 1.0], dtype=x.dtype)) ** 2
    kernel = torch.exp(-(cost - cost.min()) / eps)
    mu, nu = torch.full((n,), 1 / n, dtype=x.dtype), torch.tensor([(n - k) / n, k / n], dtype=x.dtype)
    v = torch.ones(2, dtype=x.dtype)
    for _ in range(iters):
        u = mu / (kernel @ v)
        v = nu / (kernel.T @ u)
    u = mu / (kernel @ v)
    return n * u * kernel[:, 1] * v[1]


@pytest.mark.parametrize("k", [2, 7.5])
def test_soft_converges_to_the_entropic_transport_plan(k):
    x = torch.rand(3, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2
    p = soft_ot_topk(x, k, temperature=0.5)
    ref = torch.stack([_sinkhorn_reference(row, k, 0.5) for row in x])
    torch.testing.assert_close(p, ref, atol=1e-8, rtol=0)


def test_soft_rows_are_independent():
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(7))
    y = x.clone()
    y[0] *= 50  # one row's scale: the public code's batch-wide max would change every row
    a, b = soft_ot_topk(x, 5, n_iter=300, tol=None), soft_ot_topk(y, 5, n_iter=300, tol=None)
    assert torch.equal(a[1:], b[1:]) and not torch.equal(a[0], b[0])


def test_soft_reports_unconverged_sinkhorn():
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match=r"SOFT marginal error .* must be <= tol = 0.001 after n_iter = 10 Sinkhorn"):
        soft_ot_topk(x, 10, temperature=0.05, n_iter=10)
    p = soft_ot_topk(x, 10, temperature=0.05, n_iter=10, tol=None)  # explicitly unchecked
    assert (p.sum(-1) - 10).abs().max() > 1e-3
    with pytest.raises(TypeError, match="n_iter must be an int >= 1"):
        soft_ot_topk(x, 3, n_iter=2.5)


def test_soft_gradcheck():
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    k = torch.tensor([2.0, 3.5], dtype=torch.float64, requires_grad=True)
    # the implicit gradient is exact at the fixed point: converge tightly
    assert torch.autograd.gradcheck(lambda x, k: soft_ot_topk(x, k, n_iter=400, tol=1e-12), (x, k))


# ----------------------------------------------------------------------------- perturbed


def test_perturbed_backward_applies_the_transposed_jacobian_estimate():
    x = torch.tensor([[0.3, 1.2, -0.4, 0.9, 0.1, 1.0]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0, -1.0]], dtype=torch.float64)  # not symmetric in anything
    sigma, samples = 0.5, 64
    p = perturbed_topk(x, 2, temperature=sigma, n_samples=samples, generator=torch.Generator().manual_seed(9))
    (p * g).sum().backward()
    # the same draws, redone by hand: J_ij = mean(y_i Z_j) / σ, grad = Jᵀ g
    z = torch.randn((samples, 1, 6), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = torch.zeros_like(z).scatter_(-1, (x.detach() + sigma * z).topk(2, dim=-1).indices, 1.0)
    jac = torch.einsum("sbi,sbj->bij", y, z) / samples / sigma
    torch.testing.assert_close(p.detach(), y.mean(0))
    torch.testing.assert_close(x.grad, torch.einsum("bij,bi->bj", jac, g))
    assert (torch.einsum("bij,bj->bi", jac, g) - x.grad).abs().max() > 0.1  # J g (transposed) differs


def test_perturbed_gradient_matches_monte_carlo_finite_differences():
    x = torch.tensor([0.3, 1.2, -0.4, 0.9, 0.1], dtype=torch.float64)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    sigma, k, draws, h = 0.8, 2, 200_000, 0.1
    leaf = x.clone().requires_grad_()
    p = perturbed_topk(leaf, k, temperature=sigma, n_samples=draws, generator=torch.Generator().manual_seed(10))
    (p * g).sum().backward()
    # independent: central differences of E<g, topk(x + σZ)> with common random numbers, via torch.topk
    z = torch.randn(draws, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def value(v):
        return g[(v + sigma * z).topk(k, dim=-1).indices].sum(-1)

    diffs = torch.stack([(value(x + h * e) - value(x - h * e)) / (2 * h) for e in torch.eye(5, dtype=torch.float64)], -1)
    # standard error of both estimates (the estimator's per-draw spread measured on the same z)
    y = torch.zeros_like(z).scatter_(-1, (x + sigma * z).topk(k, dim=-1).indices, 1.0)
    per_draw = (y @ g)[:, None] * z / sigma
    se = (diffs.var(0) / draws + per_draw.var(0) / draws).sqrt()
    assert ((leaf.grad - diffs.mean(0)).abs() < 4 * se + 0.02).all()  # 0.02: the O(h²) bias of the differences


def test_perturbed_sums_to_k_and_takes_per_row_k():
    x = torch.randn(3, 10)
    p = perturbed_topk(x, torch.tensor([1, 4, 9]), n_samples=50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.sum(-1), torch.tensor([1.0, 4.0, 9.0]))
    with pytest.raises(TypeError, match="not differentiable in σ"):
        perturbed_topk(x, 2, temperature=torch.tensor(1.0, requires_grad=True))


# ----------------------------------------------------------------------------- gumbel


def test_gumbel_is_seeded_sums_to_k_and_tends_to_the_top_k_mask():
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(12))
    a = gumbel_topk(x, 3, generator=torch.Generator().manual_seed(1))
    b = gumbel_topk(x, 3, generator=torch.Generator().manual_seed(1))
    c = gumbel_topk(x, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.sum(-1), torch.full((4,), 3.0))
    wide = torch.randperm(12, generator=torch.Generator().manual_seed(3)).double().expand(4, 12) * 100  # gaps >> noise
    sharp = gumbel_topk(wide, 3, temperature=1e-3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sharp, khot.topk_mask(wide, 3).double(), atol=1e-12, rtol=0)


def test_gumbel_gradients():
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)

    def f(x, t):
        return gumbel_topk(x, 2, temperature=t, generator=torch.Generator().manual_seed(5))

    assert torch.autograd.gradcheck(f, (x, t))


# ----------------------------------------------------------------------------- every new method


def _call(name, x, k, **kwargs):
    if name in ("perturbed", "gumbel"):
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return khot.soft_topk(x, k, method=name, **kwargs)


@pytest.mark.parametrize("name", NEW)
def test_any_dim_and_batched(name):
    x = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(13))
    p = _call(name, x, 2, dim=1)
    q = _call(name, x.transpose(1, 2).contiguous(), 2).transpose(1, 2)
    assert p.shape == x.shape
    if name not in ("perturbed", "gumbel"):  # the random draws follow the layout
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(p.sum(1), torch.full((5, 3), 2.0), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(name, dtype):
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(14)).to(dtype)
    p = _call(name, x, 5)
    assert p.dtype == dtype and torch.isfinite(p).all()
    ref = _call(name, x.float(), 5)
    torch.testing.assert_close(p.float(), ref, atol=1e-2 if dtype == torch.bfloat16 else 2e-3, rtol=0)


@pytest.mark.parametrize("name", NEW)
def test_infinite_scores_give_finite_values_and_gradients(name):
    x = torch.tensor([[0.1, -INF, 0.3, 0.2, 0.5, 0.0], [-INF, -INF, 1.0, -INF, -INF, -INF], [INF, 0.2, -INF, 0.1, 0.4, 0.3]])
    x.requires_grad_()
    p = _call(name, x, 2)
    (p * torch.arange(6.0)).sum().backward()
    assert torch.isfinite(p).all() and torch.isfinite(x.grad).all()
    assert p[0, 1] < 1e-6 and p[2, 0] > 1 - 1e-3  # masked items out, +inf in
    torch.testing.assert_close(p.sum(-1), torch.full((3,), 2.0), atol=2e-3, rtol=0)  # fewer than k finite: still k
    assert p[1, 2] > 1 - 1e-3 and p[1].max() <= 1 + 1e-6  # the one finite score, then the masked ones share


@pytest.mark.parametrize("name", NEW)
def test_meta_tensors(name):
    x = torch.randn(3, 10, device="meta", requires_grad=True)
    k = torch.tensor([1, 2, 3], device="meta")
    # gumbel takes an int k; simple runs its programme to n passes for a tensor k off the eager CPU
    p = khot.soft_topk(x, k if name != "gumbel" else 2, method=name)
    assert p.shape == x.shape and p.device.type == "meta" and p.dtype == x.dtype
    p.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("name", NEW)
def test_compiles_without_graph_breaks(name):
    x = torch.randn(3, 10, requires_grad=True)
    options = {"n_iter": 5, "tol": None} if name == "soft" else {}
    explained = torch._dynamo.explain(lambda x: khot.soft_topk(x, 2, method=name, **options).sum())(x)
    assert explained.graph_break_count == 0


def test_compiled_calls_raise_the_eager_errors():
    torch._dynamo.reset()
    f = torch.compile(lambda x, k: sparse_topk(x, k), fullgraph=True, backend="eager")
    x = torch.randn(2, 6)
    torch.testing.assert_close(f(x, torch.tensor([1.0, 2.5])), sparse_topk(x, torch.tensor([1.0, 2.5])))
    with pytest.raises(ValueError, match=r"k must lie in \[0, 6\]"):
        f(x, torch.tensor([1.0, 9.0]))
    with pytest.raises(ValueError, match=r"k must lie in \[0, 6\]"):
        sparse_topk(x, torch.tensor([1.0, 9.0]))


@pytest.mark.parametrize("name", ["sparse", "lapsum", "soft"])
def test_bad_arguments(name):
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="k=6 is out of range"):
        _call(name, x, 6)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        _call(name, x, 2, temperature=-1.0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        _call(name, torch.arange(5), 2)


@pytest.mark.parametrize("name", ["sparse", "lapsum"])
def test_cpu_path_equals_the_portable_sort(name):
    """Long rows on the CPU solve from a topk of the largest scores: the same mask as the full sort,
    including the slices that fall back (+inf, NaN, k near n, wide windows)."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(5, 40_000, generator=g)
    x[1, :7] = INF
    x[2, 100:300] = x[2, 99]  # ties
    x[3, :50] = -INF
    x[4, 10] = math.nan
    for k, tau in ((1, 1.0), (37, 0.01), (2_500.5, 1.0), (39_999, 50.0)):
        fast = _call(name, x, k, temperature=tau)
        with khot.use_backend("portable"):
            slow = _call(name, x, k, temperature=tau)
        torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0, equal_nan=True)


def _rows_reference(name: str, z: torch.Tensor, k: float) -> torch.Tensor:
    """``_capped_simplex`` / ``_lapsum_reference`` for all rows at once: 110 float64 bisection steps
    (from a bracket under 2^18 wide: below float64 resolution)."""
    f = (lambda u: u.clamp(0, 1)) if name == "sparse" else _laplace_cdf
    lo, hi = z.amin(-1, keepdim=True) - 60, z.amax(-1, keepdim=True) + 60
    for _ in range(110):
        mid = (lo + hi) / 2
        above = f(z - mid).sum(-1, keepdim=True) > k
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return f(z - (lo + hi) / 2)


def _long_rows(dtype):
    """Rows long enough for the CPU path's sort-free search (n >= 8 * 4096), with the cases that can
    mislead it: ties at the kinks (integers: z and z - 1 coincide for τ = 1), a pattern with the
    sub-sample's period (the sample sees only the large scores), a sorted row, a huge outlier."""
    g = torch.Generator().manual_seed(17)
    n = 40_000
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    x[1] = torch.randint(-3, 4, (n,), generator=g).double()  # ties everywhere, kinks on kinks
    x[2, :: n // 4096] += 6.0  # every sampled score is large, the others are not
    x[3] = x[3].sort().values
    x[4, 123] = 1e4
    return x.to(dtype)


@pytest.mark.parametrize("name", ["sparse", "lapsum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_search_without_sort_equals_the_bisection_reference(name, dtype, monkeypatch):
    """The CPU path (top scores above a bound for small k, safeguarded Newton-type steps over whole
    rows for large k) against the float64 bisection, on rows meant to trip it; every row solved by
    the iteration, none left to the sort."""
    from khot.relaxed import _threshold

    steps = []
    refine = _threshold.refine
    monkeypatch.setattr(_threshold, "refine", lambda *a, **kw: steps.append(r := refine(*a, **kw)) or r)
    x = _long_rows(dtype)
    for k in (3, 250.5, 20_000.5, 39_000):
        for tau in (0.05, 1.0, 20.0):
            p = _call(name, x, k, temperature=tau)
            z = x.double() / tau
            ref = _rows_reference(name, z, k)
            scale = 1e-9 if dtype == torch.float64 else 8 * 2.0**-23 * max(1.0, z.abs().max().item())
            torch.testing.assert_close(p.double(), ref, atol=scale, rtol=0, msg=f"k={k}, tau={tau}")
            assert (p.double().sum(-1) - k).abs().max() < max(1e-6, 1e-6 * k)
            if name == "sparse" and dtype == torch.float64:
                assert torch.equal(p == 0, ref <= 1e-12)  # exact zeros
    assert steps and all(bool(done.all()) for _, done in steps)


def test_lapsum_cpu_search_where_every_exponential_underflows():
    # scores thousands of τ apart, and -1e9 masks: from a point far from every score e^{-|u|} is 0 on
    # both sides, the closed-form step is ±inf, and it was taken as converged (a mask of all zeros)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40_000, generator=g) * torch.tensor([[1000.0], [100.0], [1.0]])
    x[2, ::7] = -1e9
    for k in (1, 37.5):
        with khot.use_backend("portable"):
            want = khot.soft_topk(x, k, method="lapsum")
        got = khot.soft_topk(x, k, method="lapsum")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.double().sum(-1), torch.full((3,), float(k), dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["sparse", "lapsum", "soft", "simple"])
def test_vmap_equals_the_batched_call(name):
    x = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(16))
    with pytest.warns(UserWarning) if name in ("sparse", "lapsum") else _nothing():  # torch's per-sample fallback
        mapped = torch.vmap(lambda r: khot.soft_topk(r, 2, method=name))(x)
    torch.testing.assert_close(mapped, khot.soft_topk(x, 2, method=name))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", ["simple", "gumbel"])
def test_temperature_gradient_with_masked_scores_and_items_taken_whole(name):
    # -inf scores (and, for gumbel, an item a round takes whole) made the gradient in τ NaN: inf / τ
    # and -inf / τ sat in the graph with a zero gradient, and 0 * inf = NaN
    x = torch.tensor([[0.3, -math.inf, 2.0, 0.7], [0.0, 1.0, 30.0, 2.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)

    def loss(tau):
        kwargs = {"generator": torch.Generator().manual_seed(0)} if name == "gumbel" else {}
        return (khot.soft_topk(x, 2, method=name, temperature=tau, **kwargs) * w).sum(-1)

    tau = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(tau).sum(), tau)
    assert torch.isfinite(grad).all()
    assert torch.autograd.gradcheck(loss, (tau,))


@pytest.mark.parametrize("mask", [-1e16, torch.finfo(torch.float32).min])
def test_simple_with_huge_finite_masks_and_offsets(mask):
    # mask values of -1e16 gave probabilities above 1 (the programme's float64 sums lost the other
    # logits' digits); k above the unmasked count forces the two masked items in, alike
    x = torch.tensor([0.3, mask, 2.0, 0.7, 1.1, mask])
    p = khot.soft_topk(x, 5, method="simple")
    torch.testing.assert_close(p, torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0, 0.5]), atol=1e-6, rtol=0)
    # the design is shift-invariant: a 1e10 offset changes nothing
    y = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(khot.soft_topk(y + 1e10, 4, method="simple"), khot.soft_topk(y, 4, method="simple"), atol=1e-5, rtol=0)


def test_soft_half_precision_output_passes_its_convergence_check():
    # the marginal check read the mask after rounding to bfloat16 (up to eps/2 relative): a converged
    # Sinkhorn raised "not converged" on 4 of 20 random rows of 8
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    p = khot.soft_topk(x, 1, method="soft")
    assert p.dtype == torch.bfloat16
    torch.testing.assert_close(p.float().sum(-1), torch.ones(20), atol=torch.finfo(torch.bfloat16).eps * 8, rtol=0)


@pytest.mark.parametrize("mask", [-1e9, torch.finfo(torch.float32).min])
def test_sparse_with_huge_finite_masks(mask):
    # the sorted search's float64 prefix sums cancelled next to a -1e9 mask value: masks of all ones
    if mask == -1e9:  # k above the unmasked count: the threshold sits at the masks (float32's min: beyond float64's resolution there)
        x = torch.tensor([0.3, mask, 2.0, 0.7, 1.1, mask])
        torch.testing.assert_close(khot.soft_topk(x, 5, method="sparse"), torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0, 0.5]))
    g = torch.Generator().manual_seed(0)
    for n, tau in ((64, 1.0), (16384, 0.01)):
        y = torch.randn(3, n, generator=g)
        masked = y.masked_fill(y > 0, mask)  # every positive score masked: the threshold sits among the rest
        p = khot.soft_topk(masked, 1.5, method="sparse", temperature=tau)
        want = khot.soft_topk(y.masked_fill(y > 0, -math.inf), 1.5, method="sparse", temperature=tau)
        torch.testing.assert_close(p, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(p.double().sum(-1), torch.full((3,), 1.5, dtype=torch.float64), atol=1e-4, rtol=0)


def test_gumbel_noise_follows_the_logical_order_and_simple_names_x():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    def draw(t):
        return khot.soft_topk(t, 2, method="gumbel", dim=0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draw(x.t()), draw(x.t().contiguous()))  # a transposed input got other noise
    with pytest.raises(ValueError, match="x must not hold NaN"):  # the error named the internal "logits"
        khot.soft_topk(torch.tensor([0.1, math.nan, 0.3]), 1, method="simple")


def test_simple_at_small_temperatures_keeps_far_apart_scores_apart():
    # centring on the largest score and clamping 10^4 τ below it made ordinary scores tie once k
    # forced the selection past the top one ([1, 0.5, 0.5] here): the centre is the k-th largest
    p = khot.soft_topk(torch.tensor([10.0, 0.0, -0.5], dtype=torch.float64), 2, method="simple", temperature=1e-3)
    torch.testing.assert_close(p, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    p = khot.soft_topk(torch.tensor([3.0, 0.0, -0.5, -0.6]), 2, method="simple", temperature=2e-4)
    torch.testing.assert_close(p, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_gumbel_where_x_over_tau_overflows():
    # a finite x whose x / τ overflows was neither finite nor clamped: NaN from the softmax
    p = khot.soft_topk(torch.tensor([5.0, 0.0, 1.0]), 1, method="gumbel", temperature=1e-38, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p, torch.tensor([1.0, 0.0, 0.0]))
