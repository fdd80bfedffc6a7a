"""Edge cases shared by the relaxations: masked (±inf) items, temperature tensors, empty rows,
meta tensors, torch.compile and vmap."""

import math

import pytest
import torch

import khot
from khot.relaxed.counting import counting_select, counting_topk, soft_rank
from khot.relaxed.halving import halving_select, halving_topk
from khot.relaxed.iterative import iterative_select, iterative_topk

INF = float("inf")
MASKED = torch.tensor([[0.3, -INF, 0.9, 0.1, -INF, 0.5]])
RELAXED = ["halving", "iterative", "counting"]


@pytest.mark.parametrize("method", ["halving", "iterative", "counting", "sigmoid"])
def test_masked_items_never_make_nan_and_are_not_selected(method):
    mask = khot.soft_topk(MASKED, 2, method=method)
    assert torch.isfinite(mask).all()
    assert mask[0, [1, 4]].max() < 1e-6
    assert torch.allclose(mask.sum(), torch.tensor(2.0), atol=0.05)


@pytest.mark.parametrize("method", RELAXED)
def test_masked_rows_never_make_nan_in_selection(method):
    x = torch.eye(6).unsqueeze(0)
    rows = khot.soft_select(x, MASKED, 2, method=method)
    assert torch.isfinite(rows).all()
    assert rows[0, :, [1, 4]].abs().max() < 1e-6  # the masked rows get no weight


# rows, k, and the expected mask in the sharp limit: +inf items are selected, -inf ones are not,
# and a row with fewer than k finite (or +inf) scores fills the rest with its -inf items: as the
# tournament pairs them (index order, a pair splits 1/2) by halving, shared equally by iterative,
# in index order by counting
EDGE_ROWS = [
    ([0.1, -INF, 0.3, 0.2, 0.5, 0.0], 2, dict(all=[0, 0, 1, 0, 1, 0])),
    ([INF, 1.0, -INF, INF, 0.0], 3, dict(all=[1, 1, 0, 1, 0])),
    ([-INF, 0.3, -INF, -INF, 0.5], 4, dict(halving=[1, 1, 0.5, 0.5, 1], iterative=[2 / 3, 1, 2 / 3, 2 / 3, 1], counting=[1, 1, 1, 0, 1])),
    ([-INF, 0.2, -INF], 2, dict(halving=[0.5, 1, 0.5], iterative=[0.5, 1, 0.5], counting=[1, 1, 0])),
    ([-INF, -INF, -INF], 2, dict(halving=[1, 0.5, 0.5], iterative=[2 / 3, 2 / 3, 2 / 3], counting=[1, 1, 0])),
    ([INF, INF, 0.0], 1, dict(halving=[0.5, 0.5, 0], iterative=[0.5, 0.5, 0], counting=[1, 0, 0])),
]


@pytest.mark.parametrize("method", RELAXED)
@pytest.mark.parametrize("row, k, expected", EDGE_ROWS)
def test_infinite_scores_give_finite_values_and_gradients(method, row, k, expected):
    s = torch.tensor([row], dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(1e-4 if method == "iterative" else 1e-3, dtype=torch.float64, requires_grad=True)
    n = len(row)
    mask = khot.soft_topk(s, k, method=method, temperature=tau)
    expected = torch.tensor([expected.get(method, expected.get("all"))], dtype=s.dtype)
    # counting's membership is a sigmoid of the rank with sharpness 0.05: 5e-5 from 0 or 1
    torch.testing.assert_close(mask, expected, atol=1e-4 if method == "counting" else 1e-9, rtol=0)
    probe = torch.arange(1.0, n + 1, dtype=s.dtype)
    eye = torch.eye(n, dtype=s.dtype)[None]
    ((mask * probe).sum() + khot.soft_select(eye * probe, s, k, method=method, temperature=tau).sum()).backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(tau.grad).all()
    rows = khot.soft_select(eye, s.detach(), k, method=method, temperature=tau.detach())
    assert torch.isfinite(rows).all()
    if method != "counting":  # the slots' weights make the mask
        torch.testing.assert_close(rows.sum(1), mask.detach(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("method", RELAXED)
def test_masked_gradient_equals_the_gradient_without_the_masked_items(method):
    # the reproduction: NaN on every item with halving and iterative before
    x = torch.tensor([[0.1, -INF, 0.3, 0.2, 0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    (khot.soft_topk(x, 2, method=method, temperature=0.2) * torch.arange(6.0)).sum().backward()
    kept = [0, 2, 3, 4, 5]
    y = x.detach()[:, kept].clone().requires_grad_()
    (khot.soft_topk(y, 2, method=method, temperature=0.2) * torch.arange(6.0)[kept]).sum().backward()
    assert x.grad[0, 1] == 0
    torch.testing.assert_close(x.grad[:, kept], y.grad)


@pytest.mark.parametrize("method", RELAXED)
def test_temperature_tensor_is_differentiated(method):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(2, 7, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    t = 0.05 if method == "iterative" else 0.3  # iterative's temperature is in squared units
    tau = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda tau: khot.soft_topk(s, 3, method=method, temperature=tau), (tau,))
    assert torch.autograd.gradcheck(lambda tau: khot.soft_select(x, s, 3, method=method, temperature=tau), (tau,))
    out = khot.soft_topk(s, 3, method=method, temperature=tau)
    assert out.requires_grad  # not detached by float()
    one = khot.soft_topk(s, 3, method=method, temperature=torch.tensor([t], dtype=torch.float64))
    torch.testing.assert_close(one, khot.soft_topk(s, 3, method=method, temperature=t))


@pytest.mark.parametrize("method", RELAXED)
def test_one_temperature_per_call(method):
    with pytest.raises(TypeError, match="temperature must be a float or a one-element tensor for this method"):
        khot.soft_topk(torch.randn(2, 5), 2, method=method, temperature=torch.tensor([0.1, 2.0]))
    with pytest.raises(TypeError, match="temperature must be a float or a floating-point tensor"):
        khot.soft_topk(torch.randn(2, 5), 2, method=method, temperature=torch.tensor(1))
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        khot.soft_topk(torch.randn(2, 5), 2, method=method, temperature=torch.tensor(-0.5))
    one = khot.soft_topk(torch.randn(2, 5), 2, method=method, temperature=torch.tensor(0.5))
    assert one.shape == (2, 5)


@pytest.mark.parametrize("method", RELAXED)
def test_empty_dimension_is_named(method):
    with pytest.raises(ValueError, match=r"dimension dim=1 of scores \(shape \(3, 0\)\) has size 0"):
        khot.soft_topk(torch.rand(3, 0), 1, method=method)
    with pytest.raises(ValueError, match=r"the row dimension of x \(shape \(2, 0, 4\), n = x.shape\[-2\]\) has size 0"):
        khot.soft_select(torch.rand(2, 0, 4), torch.rand(2, 0), 1, method=method)


def test_rows_of_width_zero():
    assert khot.soft_select(torch.randn(2, 5, 0), torch.randn(2, 5), 2).shape == (2, 2, 0)


def test_reinmax_temperature_gradient_with_infinite_scores():
    x = torch.tensor([[2.0, -INF, 0.5, 0.0, 1.0]])
    tau = torch.tensor([0.7], requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    out = khot.sample_khot(x, 2, temperature=tau, gradient="reinmax", generator=gen)
    (out * torch.arange(5.0)).sum().backward()
    assert torch.isfinite(tau.grad).all()


@pytest.mark.parametrize("method", ["sigmoid", "halving", "iterative", "counting"])
def test_modules_match_the_functions(method):
    x, scores = torch.randn(3, 12, 5), torch.rand(3, 12)
    layer = khot.nn.SoftTopK(4, 1, method=method, temperature=0.3)
    assert torch.equal(layer(x), khot.soft_topk(x, 4, 1, method=method, temperature=0.3))
    assert repr(layer) == f"SoftTopK(k=4, dim=1, method={method!r}, temperature=0.3)"
    if method != "sigmoid":
        select = khot.nn.SoftSelect(3, method=method)
        assert torch.equal(select(x, scores), khot.soft_select(x, scores, 3, method=method))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: khot.nn.SoftTopK(2, method="sorting"), ValueError, "method='sorting' is not valid"),
        (lambda: khot.nn.SoftTopK(-0.5), ValueError, "k=-0.5 is out of range"),
        (lambda: khot.nn.SoftTopK("2"), TypeError, "k must be a number or a tensor"),
        (lambda: khot.nn.SoftTopK(2.5, method="halving"), TypeError, "k must be an int"),
        (lambda: khot.nn.SoftTopK(0, method="iterative"), ValueError, "expected 1 <= k"),
        (lambda: khot.nn.SoftTopK(2, temperature=-1.0), ValueError, "temperature must be finite and > 0"),
        (lambda: khot.nn.SoftSelect(2, method="sigmoid"), ValueError, "has no soft_select"),
        (lambda: khot.nn.SoftSelect(0), ValueError, "expected 1 <= k"),
        (lambda: khot.nn.SoftSelect(2, temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (lambda: khot.nn.TopK(-1), ValueError, "k=-1 is out of range"),
        (lambda: khot.nn.TopK(2, dim=0.5), TypeError, "dim must be an int"),
        (lambda: khot.nn.TopK(2, magnitude="yes"), TypeError, "magnitude must be True or False"),
    ],
)
def test_modules_reject_bad_arguments_when_built(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ----------------------------------------------------------------------------- meta, compile, vmap

CALLS = {
    "halving_topk": lambda s, x, t: halving_topk(s, 3, temperature=t),
    "halving_select": lambda s, x, t: halving_select(x, s, 3, temperature=t),
    "halving_published": lambda s, x, t: halving_select(x, s, 3, temperature=t, published_weights=True),
    "halving_k_eq_n": lambda s, x, t: halving_select(x, s, s.shape[-1], temperature=t),
    "iterative_topk": lambda s, x, t: iterative_topk(s, 3, temperature=t),
    "iterative_select": lambda s, x, t: iterative_select(x, s, 3, temperature=t),
    "counting_topk": lambda s, x, t: counting_topk(s, 3, temperature=t),
    "counting_select": lambda s, x, t: counting_select(x, s, 3, temperature=t),
    "soft_rank": lambda s, x, t: soft_rank(s, temperature=t),
}


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 11, generator=g, dtype=dtype)
    s[0, 2], s[1, 5], s[2, 0] = -INF, INF, -INF  # masked and forced items compile too
    return s, torch.randn(4, 11, 5, generator=g, dtype=dtype)


@pytest.mark.parametrize("name", CALLS)
def test_runs_on_meta_tensors(name):
    s, x = _inputs()
    expected = CALLS[name](s, x, 0.3)
    out = CALLS[name](s.to("meta"), x.to("meta"), torch.tensor(0.3))  # a host synchronisation would raise
    assert out.device.type == "meta" and out.shape == expected.shape and out.dtype == expected.dtype


@pytest.mark.parametrize("name", CALLS)
def test_compiles_whole_and_matches_eager(name):
    torch._dynamo.reset()
    fn = CALLS[name]
    s, x = _inputs()
    tau = torch.tensor(0.3)  # a 0-d temperature tensor must not break the graph
    assert torch._dynamo.explain(fn)(s, x, tau).graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True)
    # float32 rounding of counting_select's log-space bumps (|log weight| up to 20 n) is ~3e-6
    torch.testing.assert_close(compiled(s, x, tau), fn(s, x, tau), atol=1e-5 if name == "counting_select" else 1e-6, rtol=0)


@pytest.mark.parametrize("name", CALLS)
def test_vmap_matches_the_batched_call(name):
    fn = CALLS[name]
    s, x = _inputs(torch.float64)
    s, x = s.view(2, 2, 11), x.view(2, 2, 11, 5)
    torch.testing.assert_close(torch.vmap(lambda s, x: fn(s, x, 0.3))(s, x), fn(s, x, 0.3))
    if "select" in name:  # also the gradient, vmapped
        grad = torch.func.grad(lambda x, s: fn(s, x, 0.3).square().sum(), argnums=(0, 1))
        xs, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        fn(ss, xs, 0.3).square().sum().backward()
        for got, want in zip(torch.vmap(grad)(x, s), (xs.grad, ss.grad)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", ["halving", "iterative", "counting"])
def test_a_nan_score_makes_its_slice_nan(method):
    # halving's sort ranked a NaN first and selected it ([0, 1, 0, 0] for k = 1); counting summed to 2
    x = torch.tensor([[0.1, math.nan, 0.9, 0.5], [0.1, 0.2, 0.9, 0.5]], requires_grad=True)
    p = khot.soft_topk(x, 1, method=method)
    assert p[0].isnan().all() and not p[1].isnan().any()
    rows = torch.eye(4).expand(2, 4, 4)
    selected = khot.soft_select(rows, x, 1, method=method)
    assert selected[0].isnan().all() and not selected[1].isnan().any()
    (p[1].sum() + selected[1].sum()).backward()
    assert torch.isfinite(x.grad).all()
