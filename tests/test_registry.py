"""The method registry: every declared capability holds in behaviour, and the README's table is its output."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch

import khot
from khot.relaxed import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = khot.methods()
NAMES = [m.name for m in METHODS]


def _call(m: registry.Method, x, k, **kwargs):
    if m.stochastic:
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return m.mask(x, k, -1, temperature=kwargs.pop("temperature", m.default_temperature), **kwargs)


def test_records_are_frozen_and_unique():
    assert len(set(NAMES)) == len(NAMES) and {"sigmoid", "halving", "iterative", "counting"} <= set(NAMES)
    for m in METHODS:
        assert m.mask is not None or m.select is not None
        assert m.sums_to_k in ("exactly", "approximately", "in expectation")
        assert m.default_temperature > 0 and m.reference and m.summary
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS[0].name = "x"
    assert khot.methods() is not khot.methods()  # a fresh list: callers cannot edit the registry


def test_get_names_the_valid_methods():
    assert registry.get("sigmoid").mask is khot.sigmoid_topk
    with pytest.raises(ValueError, match="method='sorting' is not valid; choose one of 'sigmoid', 'halving'"):
        registry.get("sorting")


def test_readme_table_is_generated():
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- methods table:[^\n]*-->\n(.*?)<!-- end of methods table -->", text, re.S)
    assert found, "README.md has no generated methods table"
    assert found.group(1) == registry.markdown_table()


@pytest.mark.parametrize("name", NAMES)
def test_output_range_and_sum(name):
    m = registry.get(name)
    if m.mask is None:
        pytest.skip("no mask")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64)
    k = 5
    p = _call(m, x, k)
    assert p.shape == x.shape and p.dtype == x.dtype and torch.isfinite(p).all()
    low, high = (float(v.strip().replace("k", str(k))) for v in m.output_range.strip("[]").split(","))
    assert p.min() >= low - 1e-12 and p.max() <= high + 1e-12
    error = (p.sum(-1) - k).abs().max().item()
    if m.sums_to_k == "exactly":
        assert error < 1e-6
    elif m.sums_to_k == "approximately":
        assert error < 0.05 * k
    if m.exact_zeros:
        assert (p == 0).any()


@pytest.mark.parametrize("name", NAMES)
def test_k_contract(name):
    m = registry.get(name)
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    if m.real_k:
        p = _call(m, x, 2.5)
        if m.sums_to_k == "exactly":
            torch.testing.assert_close(p.sum(-1), torch.full((3,), 2.5, dtype=torch.float64))
    else:
        with pytest.raises((TypeError, ValueError), match="k"):
            _call(m, x, 2.5)
    k = torch.tensor([1, 4, 7])
    if m.per_row_k:
        p = _call(m, x, k.double() if m.real_k else k)
        if m.sums_to_k == "exactly":
            torch.testing.assert_close(p.sum(-1), k.double())
    else:
        with pytest.raises((TypeError, ValueError), match="k"):
            _call(m, x, k)


@pytest.mark.parametrize("name", [m.name for m in METHODS if m.grad_k])
def test_declared_gradient_in_k(name):
    m = registry.get(name)
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k = torch.tensor([2.3, 4.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: _call(m, x, k), (k,))


@pytest.mark.parametrize("name", [m.name for m in METHODS if m.grad_temperature])
def test_declared_gradient_in_temperature(name):
    m = registry.get(name)
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tau = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    k = 2.5 if m.real_k else 2
    assert torch.autograd.gradcheck(lambda t: _call(m, x, k, temperature=t * m.default_temperature), (tau,))


@pytest.mark.parametrize("name", [m.name for m in METHODS if m.stochastic])
def test_stochastic_methods_follow_their_generator(name):
    m = registry.get(name)
    x = torch.randn(3, 12)
    a, b = _call(m, x, 3), _call(m, x, 3)
    c = _call(m, x, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_modules_check_options_when_built():
    with pytest.raises(TypeError, match="method='sigmoid' takes no option 'foo'; it takes no options"):
        khot.nn.SoftTopK(3, foo=1)
    with pytest.raises(TypeError, match="method='halving' takes no option 'foo'; its options are 'published_weights'"):
        khot.nn.SoftSelect(3, foo=1)
    with pytest.raises(TypeError, match="k must be an int for method='halving'"):
        khot.nn.SoftTopK(torch.tensor([2, 3]), method="halving")
    assert khot.nn.SoftTopK(torch.tensor([2, 3]))(torch.randn(2, 5)).sum(-1).round().tolist() == [2.0, 3.0]


def test_every_mask_method_is_a_feature_selector():
    for m in METHODS:
        if m.mask is not None:
            selector = khot.nn.FeatureSelector(6, 2, method=m.name)
            assert selector.temperature == m.default_temperature
            assert selector.mask().shape == (6,)
