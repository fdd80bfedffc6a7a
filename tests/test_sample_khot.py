from __future__ import annotations

import itertools
import math

import pytest
import torch

import khot
from khot import sample_khot

ALPHA = 1e-6  # family-wise false-alarm rate of each statistical test


def hoeffding(draws: int, comparisons: int) -> float:
    """Half-width of a (1 - ALPHA / comparisons) interval for a Bernoulli frequency (Hoeffding)."""
    return math.sqrt(math.log(2 * comparisons / ALPHA) / (2 * draws))


def ref_sigmoid_topk(x: torch.Tensor, k, tau=1.0) -> torch.Tensor:
    """Float64 sigmoid top-k along the last dim: bisection on the shift, then one Newton step
    with autograd, which makes the derivative the implicit one (the residual is zero)."""
    z = x.double() / tau
    lo = torch.full(z.shape[:-1] + (1,), -80.0, dtype=torch.float64)
    hi = -lo
    with torch.no_grad():
        for _ in range(200):
            mid = (lo + hi) / 2
            big = torch.sigmoid(z + mid).sum(-1, keepdim=True) > k
            lo, hi = torch.where(big, lo, mid), torch.where(big, mid, hi)
    p = torch.sigmoid(z + (lo + hi) / 2)
    c = (lo + hi) / 2 - (p.sum(-1, keepdim=True) - k) / (p * (1 - p)).sum(-1, keepdim=True)
    return torch.sigmoid(z + c)


def systematic_probabilities(pi: torch.Tensor, k: int) -> dict[tuple[int, ...], torch.Tensor]:
    """P(S) of systematic sampling in a uniformly random order, by enumerating every order and
    every interval of the uniform start; differentiable in ``pi``."""
    n = pi.shape[0]
    orders = list(itertools.permutations(range(n)))
    probs: dict[tuple[int, ...], torch.Tensor] = {}
    for order in orders:
        ends = torch.cat([pi.new_zeros(1), pi[list(order)].cumsum(0)])
        cuts = torch.cat([pi.new_zeros(1), ends % 1, pi.new_ones(1)]).sort().values
        for a, b in zip(cuts[:-1], cuts[1:]):
            hits = torch.floor(ends - (a + b).detach() / 2)
            s = tuple(sorted(order[i] for i in range(n) if hits[i + 1] > hits[i]))
            probs[s] = probs.get(s, 0) + (b - a) / len(orders)
    return {s: p for s, p in probs.items() if len(s) == k}  # others: rounding slivers of length ~1e-16


def estimator_by_subset(x, k, f, gradient, draws=20_000) -> dict[tuple[int, ...], torch.Tensor]:
    """The (deterministic given the sample) gradient of f(sample_khot(x)) for every subset drawn."""
    g, out = torch.Generator().manual_seed(1), {}
    for _ in range(draws):
        xx = x.detach().clone().requires_grad_()
        sample = sample_khot(xx, k, gradient=gradient, generator=g)
        s = tuple(sample.detach().nonzero().flatten().tolist())
        if s not in out:
            f(sample).backward()
            out[s] = xx.grad
        if len(out) == math.comb(x.shape[0], k):
            break
    return out


@pytest.mark.parametrize("design", khot.sampling.DESIGNS)
@pytest.mark.parametrize("dim", [0, -1])
def test_straight_through_gradient_is_the_gradient_of_pi(design, dim):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=gen).requires_grad_()
    k = torch.tensor(3.0, requires_grad=True)
    tau = torch.tensor(0.7, requires_grad=True)
    upstream = torch.randn(6, 9, generator=gen)
    sample = sample_khot(x, k, dim, temperature=tau, design=design, generator=gen)
    got = torch.autograd.grad((sample * upstream).sum(), (x, k, tau))
    pi = ref_sigmoid_topk(x.movedim(dim, -1), k, tau).movedim(-1, dim)
    want = torch.autograd.grad((pi * upstream).sum(), (x, k, tau))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), atol=2e-5, rtol=1e-4)


def test_straight_through_is_exact_for_a_linear_loss():
    # E[f(S)] = f(pi) for an exact design: straight-through gives the exact gradient of the
    # expectation, here computed by enumerating every subset's probability under systematic sampling
    x = torch.tensor([0.3, -1.2, 1.5, 0.0, -0.4], dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    probs = systematic_probabilities(ref_sigmoid_topk(x, 2, 0.8), 2)
    expectation = sum(p * a[list(s)].sum() for s, p in probs.items())
    exact = torch.autograd.grad(expectation, x)[0]
    xx = x.detach().requires_grad_()
    (sample_khot(xx, 2, temperature=0.8) @ a).backward()
    torch.testing.assert_close(xx.grad, exact, atol=1e-9, rtol=1e-7)


def test_reinmax_beats_straight_through_on_quadratic_losses():
    # exact expectations of both estimators (every subset, weighted by its exact probability)
    # against the exact gradient of E[f(S)], f quadratic; second order helps on average
    gen = torch.Generator().manual_seed(0)
    errors = {"straight_through": 0.0, "reinmax": 0.0}
    for _ in range(4):
        x = (torch.randn(5, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
        m = torch.randn(5, 5, generator=gen, dtype=torch.float64)
        a = torch.randn(5, generator=gen, dtype=torch.float64)
        f = lambda s: s @ (m + m.T) @ s / 2 + a @ s  # noqa: E731
        probs = systematic_probabilities(ref_sigmoid_topk(x, 2), 2)
        one_hot = lambda s: torch.zeros(5, dtype=torch.float64).index_fill_(0, torch.tensor(s), 1.0)  # noqa: E731
        exact = torch.autograd.grad(sum(p * f(one_hot(s)) for s, p in probs.items()), x)[0]
        for gradient in errors:
            by_subset = estimator_by_subset(x, 2, f, gradient)
            assert set(by_subset) == set(probs)
            mean = sum(p.detach() * by_subset[s] for s, p in probs.items())
            errors[gradient] += (mean - exact).norm().item()
    assert errors["reinmax"] < errors["straight_through"], errors


def test_reinmax_matches_its_definition():
    # 2 J(pi1)^T g - J(pi)^T g / 2, J the Jacobian of the reference sigmoid top-k, pi1 = (pi + D) / 2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64).requires_grad_()
    g = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    tau = 0.6
    sample = sample_khot(x, 3, temperature=tau, gradient="reinmax", generator=gen)
    got = torch.autograd.grad((sample * g).sum(), x)[0]
    st = torch.autograd.grad((sample_khot(x, 3, temperature=tau, generator=gen) * g).sum(), x)[0]
    pi = ref_sigmoid_topk(x, 3, tau).detach()
    want = []
    for row in range(4):
        jac = lambda q: torch.autograd.functional.jacobian(lambda z: ref_sigmoid_topk(z, 3), q.logit()) / tau  # noqa: E731
        j1, j0 = jac((pi[row] + sample[row].detach()) / 2), jac(pi[row])
        want.append(2 * j1.T @ g[row] - j0.T @ g[row] / 2)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-7, rtol=1e-6)
    assert torch.isfinite(got).all() and (got - st).abs().max() > 0.05


def test_reinmax_finite_when_saturated():
    x = torch.tensor([[50.0, 40.0, -50.0, float("-inf")], [0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    sample = sample_khot(x, 2, gradient="reinmax", generator=torch.Generator().manual_seed(0))
    (sample * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0] == 0).all()


@pytest.mark.parametrize("design", ["systematic", "brewer"])
@pytest.mark.parametrize("gradient", khot.sampling.GRADIENTS)
def test_inclusion_frequencies_match_pi(design, gradient):
    x = torch.tensor([1.5, -0.3, 0.2, -2.0, 0.9, 0.0, -1.1])
    draws = 40_000
    sample = sample_khot(x.expand(draws, -1), 3, temperature=0.9, design=design, gradient=gradient,
                         generator=torch.Generator().manual_seed(5))
    assert sample.dtype == x.dtype and (sample.sum(-1) == 3).all()
    pi = ref_sigmoid_topk(x, 3, 0.9)
    assert ((sample.double().mean(0) - pi).abs() <= hoeffding(draws, 7)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_exactly_k_ones(dtype):
    # sigmoid top-k meets sum = k only within its tolerance: the sample must still have k ones
    gen = torch.Generator().manual_seed(2)
    k = torch.tensor([1, 7, 40, 150])
    x = (torch.randn(4, 300, generator=gen) * 3).to(dtype)
    for design in khot.sampling.DESIGNS:
        sample = sample_khot(x.repeat(10, 1), k.repeat(10), design=design, generator=gen)
        assert sample.dtype == dtype and (sample.sum(-1) == k.repeat(10)).all()
    sizes = sample_khot(x, 2.5, generator=gen).sum(-1)
    assert ((sizes == 2) | (sizes == 3)).all()


@pytest.mark.parametrize("error", [9e-6, -9e-6])
@pytest.mark.parametrize("design", ["systematic", "pareto"])
def test_exactly_k_ones_at_the_solver_tolerance(monkeypatch, error, design):
    # sigmoid top-k promises |sum - k| <= 1e-5 k in float32: a sum off by 0.9e-5 k must still give k
    # ones (taken as a non-integer sum, it would give k -/+ 1 ones in about 1 row in 700 here)
    exact = khot.sampling.sigmoid_topk
    monkeypatch.setattr(khot.sampling, "sigmoid_topk", lambda *a, **kw: (exact(*a, **kw) * (1 + error)).clamp(max=1))
    x = torch.randn(4000, 300, generator=torch.Generator().manual_seed(0))
    assert (sample_khot(x, 150, design=design, generator=torch.Generator().manual_seed(1)).sum(-1) == 150).all()


def test_gumbel_frequencies_are_gumbel_top_k_not_pi():
    x = torch.tensor([2.2, 0.4, -0.8, -1.4])
    draws = 40_000
    sample = sample_khot(x.expand(draws, -1), 2, method="gumbel", generator=torch.Generator().manual_seed(6))
    assert (sample.sum(-1) == 2).all()
    # Gumbel top-2: two draws without replacement proportional to exp(x)
    w = x.double().exp()
    want = torch.zeros(4, dtype=torch.float64)
    for i, j in itertools.permutations(range(4), 2):
        p = w[i] / w.sum() * w[j] / (w.sum() - w[i])
        want[i] += p
        want[j] += p
    freq = sample.double().mean(0)
    bound = hoeffding(draws, 4)
    assert ((freq - want).abs() <= bound).all()
    assert (freq - ref_sigmoid_topk(x, 2)).abs().max() > 3 * bound  # not the inclusion probabilities pi


def test_gumbel_gradient_is_straight_through_and_tensor_temperature():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    tau = torch.tensor([0.5, 1.0, 2.0])
    sample = sample_khot(x, 2, temperature=tau, method="gumbel", generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(sample[:, 0].sum(), x)[0]
    want = torch.autograd.grad(khot.sigmoid_topk(x, 2, temperature=tau)[:, 0].sum(), x)[0]
    assert torch.equal(got, want)
    cold = sample_khot(x.detach(), 2, temperature=1e-4, method="gumbel", generator=torch.Generator().manual_seed(1))
    assert torch.equal(cold, khot.topk_mask(x.detach(), 2).float())  # noise is negligible at low temperature


def test_reproducible_and_global_rng_untouched():
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    for method in khot.sampling.METHODS:
        a, b, c = (sample_khot(x, 4, method=method, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2))
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_bad_input():
    x = torch.randn(5)
    with pytest.raises(ValueError, match=r"k=6 is out of range: expected 0 <= k <= 5"):
        sample_khot(x, 6)
    with pytest.raises(ValueError, match=r"k=-1 is out of range"):
        sample_khot(x, -1)
    with pytest.raises(ValueError, match=r"design='poisson' is not valid; choose one of 'systematic', 'brewer', 'pareto'"):
        sample_khot(x, 2, design="poisson")
    with pytest.raises(ValueError, match=r"gradient='rebar' is not valid; choose one of 'straight_through', 'reinmax'"):
        sample_khot(x, 2, gradient="rebar")
    with pytest.raises(ValueError, match=r"method='softmax' is not valid; choose one of 'pips', 'gumbel'"):
        sample_khot(x, 2, method="softmax")
    with pytest.raises(ValueError, match="gradient='reinmax' needs method='pips'"):
        sample_khot(x, 2, method="gumbel", gradient="reinmax")
    with pytest.raises(TypeError, match="k must be an int or an integer tensor"):
        sample_khot(x, 2.5, method="gumbel")
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got 0.0"):
        sample_khot(x, 2, temperature=0.0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        sample_khot(torch.arange(5), 2)
    with pytest.raises(ValueError, match="dim=1 is out of range"):
        sample_khot(x, 2, 1)
    for method in ("pips", "gumbel"):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
            sample_khot(x, 2, method=method, generator=0)


# ------------------------------------------------ sample sizes come from k, not from the solver


@pytest.mark.parametrize("error", [3e-5, -3e-5, 1e-3, -1e-3])
@pytest.mark.parametrize("design", khot.sampling.DESIGNS)
def test_size_is_k_whatever_the_solver_digits(monkeypatch, error, design):
    # π off by more than the old 2e-5 * k allowance: the old code drew k -/+ 1 ones in every row
    exact = khot.sampling.sigmoid_topk
    monkeypatch.setattr(khot.sampling, "sigmoid_topk", lambda *a, **kw: (exact(*a, **kw) * (1 + error)).clamp(max=1))
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    sample = sample_khot(x, 150, design=design, generator=torch.Generator().manual_seed(1))
    assert (sample.sum(-1) == 150).all()


def test_exactly_k_ones_fuzz():
    # 600 random rows of every scale and temperature (the fuzz: 58 of 600 drew k -/+ 1)
    gen = torch.Generator().manual_seed(10)
    for case in range(60):
        n = int(torch.randint(2, 400, (), generator=gen))
        k = torch.randint(0, n + 1, (10,), generator=gen)
        scale = 10.0 ** float(torch.empty(()).uniform_(-3, 3, generator=gen))
        tau = 10.0 ** float(torch.empty(()).uniform_(-4, 1, generator=gen))
        dtype = (torch.float32, torch.float64, torch.bfloat16)[case % 3]
        x = (torch.randn(10, n, generator=gen) * scale).to(dtype)
        if case % 4 == 0:  # ties
            x = x.round()
        sample = sample_khot(x, k, temperature=tau, generator=gen)
        assert (sample.sum(-1) == k).all(), (case, n, scale, tau, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_k_size_probability_is_frac_k(dtype):
    # k = 20000.3: the old code took the float32 sum as "near 20000" and drew 20000 ones every time
    draws, n = 400, 25_000
    x = torch.randn(draws, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    sizes = sample_khot(x, 20000.3, generator=torch.Generator().manual_seed(1)).sum(-1)
    assert ((sizes == 20000) | (sizes == 20001)).all()
    big = (sizes == 20001).double().mean().item()
    assert abs(big - 0.3) <= hoeffding(draws, 1), big


def test_real_k_per_slice_and_tiny_fractions():
    gen = torch.Generator().manual_seed(3)
    k = torch.tensor([2.5, 7.0, 0.25, 3.001], dtype=torch.float64)
    x = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    draws = 20_000
    sizes = sample_khot(x.repeat(draws, 1), k.repeat(draws), generator=gen).sum(-1).view(draws, 4)
    for j, kj in enumerate(k.tolist()):
        lo = math.floor(kj)
        assert ((sizes[:, j] == lo) | (sizes[:, j] == lo + 1)).all()
        freq = (sizes[:, j] == lo + 1).double().mean().item()
        assert abs(freq - (kj - lo)) <= hoeffding(draws, 4), (kj, freq)


# ------------------------------------------------ bad input names what the caller passed


@pytest.mark.parametrize("method", khot.sampling.METHODS)
def test_nan_row_is_an_error_about_x(method):
    x = torch.tensor([[0.3, float("nan"), 0.1], [0.2, 0.1, 0.0]])
    with pytest.raises(ValueError, match="x must not hold NaN"):
        sample_khot(x, 1, method=method)
    # ±inf entries are masked items, not an error
    x = torch.tensor([[0.3, float("-inf"), 0.1, float("inf")]])
    sample = sample_khot(x, 2, method=method, generator=torch.Generator().manual_seed(0))
    assert sample[0, 3] == 1 and sample[0, 1] == 0 and sample.sum() == 2


def test_pips_sample_is_top_level():
    assert khot.pips_sample is khot.sampling.pips_sample and "pips_sample" in khot.__all__


# ------------------------------------------------ graphs: compile, meta, vmap


@pytest.mark.parametrize("method", khot.sampling.METHODS)
def test_compiled_equals_eager_no_graph_breaks(method):
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))

    def fn(x):
        return sample_khot(x, 4, method=method)

    assert torch._dynamo.explain(fn)(x).graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True)
    torch.manual_seed(5)
    got = compiled(x)
    torch.manual_seed(5)
    assert torch.equal(got, fn(x)) and (got.sum(-1) == 4).all()


def test_compiled_nan_check_and_generator():
    x = torch.tensor([[0.3, float("nan"), 0.1]])
    with pytest.raises(Exception, match="x must not hold NaN"):
        torch.compile(lambda x: sample_khot(x, 1), fullgraph=True, backend="eager")(x)
    g = torch.Generator()
    with pytest.raises(Exception, match="torch.compile cannot trace a torch.Generator"):
        torch.compile(lambda x, g: sample_khot(x, 1, generator=g), fullgraph=True, backend="eager")(x.nan_to_num(), g)


@pytest.mark.parametrize("method", khot.sampling.METHODS)
@pytest.mark.parametrize("gradient", khot.sampling.GRADIENTS)
def test_meta(method, gradient):
    if method == "gumbel" and gradient == "reinmax":
        return
    x = torch.randn(3, 5, 9, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out = sample_khot(x, 2, 1, method=method, gradient=gradient)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device.type == "meta"
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_vmap():
    x = torch.randn(5, 3, 10, generator=torch.Generator().manual_seed(0))
    out = torch.vmap(lambda x: sample_khot(x, 4), randomness="different")(x)
    assert out.shape == x.shape and (out.sum(-1) == 4).all()
    with pytest.raises(RuntimeError, match="khot::sampling_uniform .* under vmap"):
        torch.vmap(lambda x: sample_khot(x, 4))(x)


@pytest.mark.parametrize("method", ["pips", "gumbel"])
@pytest.mark.parametrize(
    "x, k, match",
    [
        ([math.inf, math.inf, math.inf, 0.0], 1, "at least the number of \\+inf scores"),
        ([-math.inf, -math.inf, -math.inf], 1, "at most the number of scores of x above -inf"),
        ([0.0, math.nan, 1.0], 1, "x must not hold NaN"),
    ],
)
def test_k_that_the_infinite_scores_make_infeasible_is_an_error(method, x, k, match):
    # three +inf items and k = 1 drew three ones (pips); all -inf drew none (pips) or a -inf item
    # (gumbel). Compiled too: a check whose result nothing used was dropped from the graph (the NaN one)
    x = torch.tensor(x)
    with pytest.raises(ValueError, match=match):
        sample_khot(x, k, method=method, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=match):
        torch.compile(lambda t: sample_khot(t, k, method=method), backend="aot_eager")(x)
