"""nn.TokenPruning against references written from the papers (EViT, Haurum et al. 2023)."""

from __future__ import annotations

import math

import pytest
import torch

import khot
from khot.nn import TokenPruning


def evit_reference(x, cls_attn, keep):
    """EViT (Liang et al. 2022), one example at a time: keep [CLS] and the ``keep`` tokens
    [CLS] attends to most (best first), then append the attention-weighted sum of the others."""
    out = []
    for xb, ab in zip(x.double(), cls_attn.double()):
        order = sorted(range(len(ab)), key=lambda i: (-float(ab[i]), i))
        kept, pruned = order[:keep], order[keep:]
        fused = torch.zeros(x.shape[-1], dtype=torch.float64)
        for i in pruned:
            fused += ab[i] * xb[1 + i]
        out.append(torch.stack([xb[0]] + [xb[1 + i] for i in kept] + [fused]))
    return torch.stack(out)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 2e-8), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_token_is_evits_attention_weighted_sum(dtype, atol):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 8, generator=gen).to(dtype)
    attn = torch.softmax(torch.randn(3, 4, 17, 17, generator=gen, dtype=torch.float64), -1).to(dtype)
    tokens, indices = TokenPruning(5, fuse_pruned=True)(x, attn)
    cls_attn = attn[:, :, 0, 1:].double().mean(1)
    expected = evit_reference(x, cls_attn, 5)
    assert tokens.dtype == dtype and tokens.shape == (3, 7, 8) and indices.shape == (3, 6)
    torch.testing.assert_close(tokens.double(), expected, atol=atol, rtol=0)
    # the old behaviour, a weighted mean, differs from EViT by the pruned mass (about 0.7 here)
    pruned_mass = cls_attn.sum(1) - cls_attn.gather(1, indices[:, 1:] - 1).sum(1)
    assert (pruned_mass < 0.9).all()


def test_fused_token_without_cls_and_when_nothing_is_pruned():
    gen = torch.Generator().manual_seed(1)
    x, s = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64), torch.rand(2, 9, generator=gen, dtype=torch.float64)
    tokens, indices = TokenPruning(4, keep_cls=False, fuse_pruned=True)(x, scores=s)
    for b in range(2):
        pruned = [i for i in range(9) if i not in indices[b].tolist()]
        assert torch.equal(tokens[b, :4], x[b, indices[b]])
        torch.testing.assert_close(tokens[b, 4], sum(s[b, i] * x[b, i] for i in pruned), atol=2e-8, rtol=0)
    tokens, _ = TokenPruning(8, fuse_pruned=True)(x, scores=s[:, 1:])
    assert tokens.shape == (2, 10, 4) and not tokens[:, -1].any()


def test_fusing_differentiates_in_tokens_and_scores():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: TokenPruning(2, fuse_pruned=True)(x, scores=s)[0], (x, s))


@pytest.mark.parametrize("scores", [torch.tensor([[0.5, -0.1, 0.2]]), torch.tensor([[0.5, math.nan, 0.2]]), torch.tensor([[math.inf, 0.1, 0.2]])])
def test_fusing_rejects_signed_or_non_finite_scores_eager_and_compiled(scores):
    layer = TokenPruning(1, fuse_pruned=True)
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match=r"scores must be finite and >= 0 to fuse the pruned tokens"):
        layer(x, scores=scores)
    with pytest.raises(ValueError, match=r"scores must be finite and >= 0 to fuse the pruned tokens"):
        torch.compile(layer, fullgraph=True, backend="eager")(x, scores=scores)
    assert TokenPruning(1)(x, scores=scores)[0].shape == (1, 2, 2)  # signed scores rank fine without fusing


def test_keep_counts_rate_rounds_up_as_evit_and_an_int_gives_the_floor():
    x, s = torch.randn(1, 197, 4), torch.rand(1, 196)
    assert TokenPruning(0.7)(x, scores=s)[1].shape[1] == 1 + 138  # EViT: ceil(0.7 * 196) = ceil(137.2)
    assert TokenPruning(int(0.7 * 196))(x, scores=s)[1].shape[1] == 1 + 137  # Haurum et al.: floor
    assert TokenPruning(1.0)(x, scores=s)[1].shape[1] == 197
    assert TokenPruning(0)(x, scores=s)[1].tolist() == [[0]]


@pytest.mark.parametrize("name", ["keep_cls", "fuse_pruned"])
@pytest.mark.parametrize("value", [1, "no", None, torch.tensor(True)])
def test_switches_must_be_bools_when_built(name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        TokenPruning(3, **{name: value})


def test_attn_on_another_device_is_rejected():
    with pytest.raises(ValueError, match=r"attn is on meta but x is on cpu"):
        TokenPruning(2)(torch.randn(1, 5, 3), torch.rand(1, 2, 5, 5, device="meta"))


@pytest.mark.parametrize("fuse", [False, True])
def test_meta_tensors_give_shapes_and_dtypes(fuse):
    x = torch.empty(2, 197, 64, device="meta", dtype=torch.bfloat16)
    attn = torch.empty(2, 6, 197, 197, device="meta", dtype=torch.bfloat16)
    tokens, indices = TokenPruning(0.7, fuse_pruned=fuse)(x, attn)
    assert tokens.device.type == "meta" and tokens.dtype == torch.bfloat16 and tokens.shape == (2, 139 + fuse, 64)
    assert indices.device.type == "meta" and indices.dtype == torch.int64 and indices.shape == (2, 139)


def test_compiles_without_graph_breaks_and_matches_eager():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 33, 8, generator=gen, requires_grad=True)
    attn = torch.softmax(torch.randn(2, 4, 33, 33, generator=gen), -1)
    layer = TokenPruning(0.5, fuse_pruned=True)
    assert torch._dynamo.explain(layer)(x, attn).graph_break_count == 0
    eager = layer(x, attn)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")(x, attn)
    torch.testing.assert_close(compiled, eager)
    grad = torch.autograd.grad(compiled[0].sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(eager[0].sum(), x)[0])


def test_no_tokens():
    # an IndexError from attn[:, :, 0] before
    with pytest.raises(ValueError, match="x has no tokens"):
        TokenPruning(0.5)(torch.randn(2, 0, 8), torch.ones(2, 1, 0, 0))
    tokens, indices = TokenPruning(0.5, keep_cls=False)(torch.randn(2, 0, 8), scores=torch.ones(2, 0))
    assert tokens.shape == (2, 0, 8) and indices.shape == (2, 0)
