from __future__ import annotations

import pytest
import torch

from khot.nn import TopKRouter


def reference_router(logits: torch.Tensor, k: int, renormalize: bool):
    """Plain softmax, torch.topk, renormalise; load counted by one-hot sums."""
    probs = logits.softmax(-1)
    weights, indices = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    load = torch.nn.functional.one_hot(indices, logits.shape[-1]).sum((0, 1)).float() / indices.numel()
    return weights, indices, load


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_matches_a_plain_router(renormalize):
    router = TopKRouter(16, 10, 3, renormalize=renormalize)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    out = router(x)
    weights, indices, load = reference_router(router.gate(x), 3, renormalize)
    assert torch.equal(out.indices, indices)
    torch.testing.assert_close(out.weights, weights)
    torch.testing.assert_close(out.expert_load, load)
    torch.testing.assert_close(out.aux_loss, 10 * (load * router.gate(x).softmax(-1).mean(0)).sum())


@pytest.mark.parametrize("name,value", [("renormalize", 1), ("renormalize", "no"), ("bias", 0), ("differentiable", 0)])
def test_switches_are_checked_when_built(name, value):
    with pytest.raises(TypeError, match=name):
        TopKRouter(8, 4, 2, **{name: value})


@pytest.mark.parametrize("differentiable", [False, "straight_through", "sample"])
def test_compiled_router_no_graph_breaks_and_equal(differentiable):
    router = TopKRouter(16, 8, 2, differentiable=differentiable)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    assert torch._dynamo.explain(router)(x).graph_break_count == 0
    compiled = torch.compile(router, fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)
    got = compiled(x)
    torch.manual_seed(7)
    want = router(x)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.weights, want.weights)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)


@pytest.mark.parametrize("differentiable", [False, "straight_through", "sample"])
def test_router_on_meta(differentiable):
    router = TopKRouter(16, 8, 2, differentiable=differentiable).to("meta")
    out = router(torch.randn(4, 5, 16, device="meta"))
    assert out.indices.shape == (20, 2) and out.weights.shape == (20, 2) and out.weights.device.type == "meta"
    assert out.expert_load.shape == (8,) and out.aux_loss.shape == ()


def test_sampled_routing_frequencies():
    # differentiable="sample": each expert is chosen with the sigmoid top-k probability of its logit
    import khot

    router = TopKRouter(4, 5, 2, differentiable="sample", renormalize=False)
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(3)).expand(20_000, 4)
    torch.manual_seed(0)
    out = router(x)
    freq = torch.zeros(5).index_add_(0, out.indices.flatten(), torch.ones(out.indices.numel())) / 20_000
    pi = khot.sigmoid_topk(router.gate(x[:1]).detach().double(), 2)[0]
    assert ((freq.double() - pi).abs() <= 5 * (pi * (1 - pi) / 20_000).sqrt() + 1e-3).all(), (freq, pi)


@pytest.mark.parametrize("differentiable", [False, "straight_through", "sample"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sigmoid_router_with_underflowing_scores(differentiable, dtype):
    # every sigmoid score of a token underflows (float16 logits below -17, float32 below -104): the
    # renormalised weights and the balance loss divided 0 by 0; they are the log-space limit instead
    torch.manual_seed(0)
    r = TopKRouter(4, 4, 2, score="sigmoid", differentiable=differentiable).to(dtype).train()
    r.gate.weight.data = torch.eye(4, dtype=dtype)
    x = torch.tensor([[-300.0, -301.0, -302.0, -303.0], [0.5, 0.1, -0.2, 0.9]], dtype=dtype)
    out = r(x)
    assert torch.isfinite(out.weights).all() and torch.isfinite(out.aux_loss)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, dtype=dtype))
    if not differentiable:  # σ(l) ≈ e^l down there: the weights are a softmax of the two best logits
        torch.testing.assert_close(out.weights[0].float(), torch.tensor([-300.0, -301.0]).softmax(-1), atol=1e-3, rtol=0)


def test_router_ranks_experts_by_logits_not_rounded_scores():
    r = TopKRouter(4, 4, 1, score="sigmoid").bfloat16().eval()
    r.gate.weight.data = torch.eye(4, dtype=torch.bfloat16)
    assert r(torch.tensor([[7.0, 8.0, 0.0, 0.0]], dtype=torch.bfloat16)).indices.tolist() == [[1]]  # both scores round to 1.0
