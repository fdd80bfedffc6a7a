from __future__ import annotations

import pytest
import torch

import khot
from khot.nn import BatchTopK, FeatureSelector, TopKActivation, TopKRouter


def train(params, loss_fn, steps=60, lr=0.05):
    opt = torch.optim.Adam(params, lr=lr)
    first = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return first, loss_fn().item()


# ---------------------------------------------------------------- TopKRouter


def test_router_aux_loss_by_hand():
    router = TopKRouter(2, 3, 1, renormalize=False)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])  # tokens go to experts 0, 1, 0
    out = router(x)
    e2 = torch.e**2
    probs = torch.tensor([[e2, 1, 1], [1, e2, 1], [torch.e, 1, 1]]) / torch.tensor([[e2 + 2], [e2 + 2], [torch.e + 2]])
    assert out.indices.tolist() == [[0], [1], [0]] and out.indices.dtype == torch.int64
    torch.testing.assert_close(out.weights, probs.gather(1, out.indices))
    torch.testing.assert_close(out.expert_load, torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(out.aux_loss, 3 * (2 / 3 * probs[:, 0].mean() + 1 / 3 * probs[:, 1].mean()))
    lse = torch.log(torch.tensor([e2 + 2, e2 + 2, torch.e + 2]))
    torch.testing.assert_close(out.router_z_loss, lse.square().mean())


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("differentiable", [False, "straight_through", "sample"])
def test_router_shapes_and_weights(score, differentiable):
    torch.manual_seed(0)
    router = TopKRouter(8, 6, 2, score=score, differentiable=differentiable)
    x = torch.randn(3, 5, 8)
    for mode in (router.train(), router.eval()):
        out = mode(x)
        assert out.indices.shape == (15, 2) and out.weights.shape == (15, 2) and out.logits.shape == (15, 6)
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(15))
        assert (out.indices[:, 0] != out.indices[:, 1]).all()  # two distinct experts per token
        torch.testing.assert_close(out.expert_load.sum(), torch.tensor(1.0))
    scores = out.logits.softmax(-1) if score == "softmax" else out.logits.sigmoid()
    ref = scores.sort(dim=-1, descending=True, stable=True).indices[:, :2]  # eval: exact top-k, best first
    assert torch.equal(out.indices, ref)
    raw = TopKRouter(8, 6, 2, score=score, renormalize=False).eval()
    raw.gate = router.gate
    torch.testing.assert_close(raw(x).weights, scores.gather(1, ref))


def test_router_gradients_reach_the_gate_in_every_mode():
    torch.manual_seed(1)
    x = torch.randn(32, 8)
    grads = {}
    for mode in (False, "straight_through", "sample"):
        router = TopKRouter(8, 4, 2, differentiable=mode, renormalize=False)
        with torch.no_grad():
            router.gate.weight.copy_(torch.linspace(-1, 1, 32).view(4, 8))
        router(x).weights.sum().backward()
        grads[mode] = router.gate.weight.grad
        assert torch.isfinite(grads[mode]).all() and grads[mode].abs().sum() > 0
    assert not torch.allclose(grads[False], grads["straight_through"])


def test_router_learns_to_balance():
    torch.manual_seed(2)
    router = TopKRouter(8, 4, 2, differentiable="straight_through")
    with torch.no_grad():
        router.gate.weight.add_(torch.tensor([3.0, 0, 0, 0]).view(4, 1))  # everyone likes expert 0
    x = torch.randn(256, 8).abs()
    first, last = train(router.parameters(), lambda: router(x).aux_loss)
    assert last < first - 0.1


def test_router_bad_args():
    with pytest.raises(ValueError, match="k=5 is out of range: expected 1 <= k <= n_experts = 4"):
        TopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="k=0 is out of range"):
        TopKRouter(8, 4, 0)
    with pytest.raises(TypeError, match="k must be an int, got 2.0"):
        TopKRouter(8, 4, 2.0)
    with pytest.raises(ValueError, match="d_model=0 is out of range"):
        TopKRouter(0, 4, 2)
    with pytest.raises(ValueError, match="score='relu' is not valid; choose one of 'softmax', 'sigmoid'"):
        TopKRouter(8, 4, 2, score="relu")
    with pytest.raises(ValueError, match="differentiable='gumbel' is not valid"):
        TopKRouter(8, 4, 2, differentiable="gumbel")
    with pytest.raises(ValueError, match=r"x must have shape \(..., d_model\) = \(..., 8\), got \(3, 7\)"):
        TopKRouter(8, 4, 2)(torch.randn(3, 7))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_router_on_no_tokens_gives_zero_losses(score):
    router = TopKRouter(8, 4, 2, score=score)
    out = router(torch.randn(0, 8))
    assert out.indices.shape == (0, 2) and out.weights.shape == (0, 2)
    assert torch.equal(out.expert_load, torch.zeros(4))
    assert out.aux_loss.item() == 0.0 and out.router_z_loss.item() == 0.0
    (out.aux_loss + out.router_z_loss).backward()  # an empty micro-batch leaves finite (zero) gradients
    assert torch.equal(router.gate.weight.grad, torch.zeros_like(router.gate.weight))


def test_router_repr():
    assert repr(TopKRouter(4, 3, 1, score="sigmoid", differentiable="sample", temperature=0.5)).startswith(
        "TopKRouter(\n  d_model=4, n_experts=3, k=1, score='sigmoid', renormalize=True, differentiable='sample', temperature=0.5"
    )


# ---------------------------------------------------------------- TopKActivation, BatchTopK


def reference_topk_activation(x, k, relu=True):
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)  # ties: lower index first
    values, indices = values[..., :k], indices[..., :k]
    return torch.zeros_like(x).scatter(-1, indices, values.relu() if relu else values)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(64, 300), (2, 3, 1000), (9,)])
def test_topk_activation_matches_reference(shape, relu):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[..., 7] = x[..., 3] = x.max() + 1  # a tie inside the top k ...
    x.view(-1, shape[-1])[0, 1:3] = torch.tensor([-50.0, -50.0])  # ... and in a row with many ties at the k-th place:
    x.view(-1, shape[-1])[-1] = torch.tensor([1.0, 0.0]).repeat(shape[-1] // 2 + 1)[: shape[-1]]
    k = 3
    want = reference_topk_activation(x, k, relu)
    dense = TopKActivation(k, relu=relu)(x)
    assert dense.shape == x.shape and dense.dtype == x.dtype and torch.equal(dense, want)
    values, indices = TopKActivation(k, relu=relu, dense=False)(x)
    assert values.shape == indices.shape == shape[:-1] + (k,) and indices.dtype == torch.int64
    assert (indices.diff(dim=-1) > 0).all()  # increasing
    assert torch.equal(torch.zeros_like(x).scatter(-1, indices, values), want)


def test_topk_activation_gradient_and_repr():
    x = torch.randn(4, 10, requires_grad=True)
    TopKActivation(3, relu=False)(x).sum().backward()
    assert torch.equal(x.grad, khot.topk_mask(x.detach(), 3).float())
    assert repr(TopKActivation(3)) == "TopKActivation(k=3)"
    assert repr(TopKActivation(3, relu=False, dense=False)) == "TopKActivation(k=3, relu=False, dense=False)"


def test_batch_topk_keeps_k_times_batch_and_thresholds_in_eval():
    gen = torch.Generator().manual_seed(0)
    layer = BatchTopK(4, relu=False, momentum=0.5)
    xs = [torch.randn(8, 50, generator=gen) for _ in range(3)]
    minima = []
    for x in xs:
        out = layer(x)
        assert (out != 0).sum() == 32
        assert torch.equal(out, torch.where(x >= x.flatten().sort(descending=True).values[31], x, 0))
        minima.append(x.flatten().sort(descending=True).values[31])
    want = (minima[0] * 0.5 + minima[1] * 0.5) * 0.5 + minima[2] * 0.5
    torch.testing.assert_close(layer.threshold, want)
    x = torch.randn(2, 50, generator=gen)
    assert torch.equal(layer.eval()(x), torch.where(x > want, x, 0))
    assert repr(layer) == "BatchTopK(k=4, relu=False, momentum=0.5)"


def test_batch_topk_relu_threshold_is_min_positive():
    layer = BatchTopK(3)
    x = torch.tensor([[5.0, 4.0, 3.0, -1.0], [2.0, -2.0, -3.0, -4.0]])  # 6 kept: 5, 4, 3, 2, -1, -2
    assert torch.equal(layer(x), torch.tensor([[5.0, 4.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))
    assert layer.threshold.item() == 2.0
    untrained = BatchTopK(3).eval()  # no threshold yet: the batch rule
    assert torch.equal(untrained(x), layer.train()(x))


def test_sae_end_to_end():
    torch.manual_seed(3)
    data = torch.randn(128, 4) @ torch.randn(4, 32)
    for act in (TopKActivation(4), TopKActivation(4, dense=False), BatchTopK(4)):
        enc, dec = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

        def loss(act=act, enc=enc, dec=dec):
            z = act(enc(data))
            if isinstance(z, tuple):  # gather the decoder's columns
                values, indices = z
                recon = torch.nn.functional.embedding_bag(indices, dec.weight.T, per_sample_weights=values, mode="sum")
                return (recon + dec.bias - data).square().mean()
            return (dec(z) - data).square().mean()

        first, last = train([*enc.parameters(), *dec.parameters()], loss, steps=50, lr=0.01)
        assert last < 0.5 * first, (act, first, last)
        act.eval()
        assert torch.isfinite(loss()).all()


def test_sae_bad_args():
    with pytest.raises(ValueError, match="k=0 is out of range: expected 1 <= k"):
        TopKActivation(0)
    with pytest.raises(ValueError, match=r"k=7 is out of range: expected 0 <= k <= 5"):
        TopKActivation(7)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"k=7 is out of range: expected 0 <= k <= 5"):
        BatchTopK(7)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"momentum must lie in \(0, 1\], got 2"):
        BatchTopK(2, momentum=2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        TopKActivation(2)(torch.arange(5))


# ---------------------------------------------------------------- FeatureSelector


@pytest.mark.parametrize("method", ["sigmoid", "straight_through", "sample"])
def test_feature_selector_modes_and_end_to_end(method):
    torch.manual_seed(4)
    x = torch.randn(512, 10)
    y = x[:, 2] * 2 - x[:, 7] * 3  # two informative features
    selector = FeatureSelector(10, 2, method=method, temperature=0.5)
    head = torch.nn.Linear(10, 1)
    mask = selector.mask()
    assert mask.shape == (10,) and torch.isfinite(mask).all()
    torch.testing.assert_close(mask.sum(), torch.tensor(2.0))
    first, last = train([*selector.parameters(), *head.parameters()], lambda: (head(selector(x)).squeeze(-1) - y).square().mean(), steps=150)
    assert last < 0.5 * first
    if method != "straight_through":  # its hard forward can settle on one informative feature only
        assert selector.selected().tolist() == [2, 7]
    selector.eval()
    assert torch.equal(selector.mask(), khot.topk_mask(selector.logits.detach(), 2).float())
    assert torch.equal(selector(x), x * selector.mask())
    assert repr(selector) == f"FeatureSelector(n_features=10, k=2, method={method!r}, temperature=0.5)"


def test_feature_selector_bad_args():
    with pytest.raises(ValueError, match="k=11 is out of range: expected 1 <= k <= n_features = 10"):
        FeatureSelector(10, 11)
    with pytest.raises(ValueError, match="method='sorting' is not valid; choose one of 'sigmoid', .*'straight_through', 'sample'"):
        FeatureSelector(10, 2, method="sorting")
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got -1"):
        FeatureSelector(10, 2, temperature=-1)
    with pytest.raises(ValueError, match=r"x must have shape \(..., n_features\) = \(..., 10\), got \(4, 3\)"):
        FeatureSelector(10, 2)(torch.randn(4, 3))


def test_empty_inputs():
    # raw reshape / amin errors before: -1 cannot be inferred in reshape(-1, 0), amin of nothing
    assert khot.nn.BatchTopK(2).train()(torch.empty(0, 8)).shape == (0, 8)
    assert khot.sampling.conditional_poisson_marginals(torch.randn(3, 0), 0).shape == (3, 0)
    for layer in (khot.nn.BatchTopK(2), khot.nn.TopKActivation(1)):
        with pytest.raises(ValueError, match="k=.* is out of range"):
            layer(torch.empty(3, 0))


@pytest.mark.parametrize("method", ["sparse", "lapsum", "soft"])
def test_soft_topk_on_another_dim_compiles_with_gradients(method):
    # the threshold relaxations' backward wrote into a buffer laid out like the incoming gradient
    # (strided for dim != -1), and torch.compile takes no strided out= tensor
    layer = khot.nn.SoftTopK(2, 1, method=method)
    x = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (eager,) = torch.autograd.grad((layer(x) * torch.arange(5.0)).sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    (got,) = torch.autograd.grad((compiled(x) * torch.arange(5.0)).sum(), x)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
