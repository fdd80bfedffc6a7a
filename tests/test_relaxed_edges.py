"""Edge cases shared by the relaxations: masked (-inf) items, temperature tensors, empty rows."""

import pytest
import torch

import khot

INF = float("inf")
MASKED = torch.tensor([[0.3, -INF, 0.9, 0.1, -INF, 0.5]])


@pytest.mark.parametrize("method", ["halving", "iterative", "counting", "sigmoid"])
def test_masked_items_never_make_nan_and_are_not_selected(method):
    mask = khot.soft_topk(MASKED, 2, method=method)
    assert torch.isfinite(mask).all()
    assert mask[0, [1, 4]].max() < 1e-6
    assert torch.allclose(mask.sum(), torch.tensor(2.0), atol=0.05)


@pytest.mark.parametrize("method", ["halving", "iterative", "counting"])
def test_masked_rows_never_make_nan_in_selection(method):
    x = torch.eye(6).unsqueeze(0)
    rows = khot.soft_select(x, MASKED, 2, method=method)
    assert torch.isfinite(rows).all()
    assert rows[0, :, [1, 4]].abs().max() < 1e-6  # the masked rows get no weight


@pytest.mark.parametrize("method", ["halving", "iterative", "counting"])
def test_one_temperature_per_call(method):
    with pytest.raises(TypeError, match="temperature must be a float or a one-element tensor for this method"):
        khot.soft_topk(torch.randn(2, 5), 2, method=method, temperature=torch.tensor([0.1, 2.0]))
    one = khot.soft_topk(torch.randn(2, 5), 2, method=method, temperature=torch.tensor(0.5))
    assert one.shape == (2, 5)


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
