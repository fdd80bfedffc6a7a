"""khot.losses against independent references: the exact top-k error, hand-written cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch

import khot
from khot.losses import khot_loss, topk_loss

INT_K = [m.name for m in khot.methods() if m.mask is not None]


def test_topk_loss_tends_to_the_top_k_error():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=g, dtype=torch.float64)
    target = torch.randint(0, 10, (200,), generator=g)
    top = logits.topk(4, dim=-1)
    keep = top.values[:, 2] - top.values[:, 3] > 1e-3  # rows whose 3rd and 4th logits are apart
    logits, target = logits[keep], target[keep]
    hit = (top.indices[keep, :3] == target[:, None]).any(-1)  # independent: torch.topk
    loss = topk_loss(logits, target, 3, temperature=1e-6, reduction="none")
    assert keep.sum() > 150 and hit.any() and (~hit).any()
    assert (loss[hit] < 1e-6).all() and (loss[~hit] > 99).all()
    torch.testing.assert_close(topk_loss(logits, target, 3, temperature=1e-6) / 100, (~hit).double().mean(), atol=1e-6, rtol=0)


def test_topk_loss_is_minus_log_of_the_relaxed_mask():
    logits = torch.randn(6, 8, dtype=torch.float64)
    target = torch.tensor([0, 3, 7, 1, 1, 5])
    p = khot.sigmoid_topk(logits, 2.5, temperature=0.7)
    expected = -torch.log(p[torch.arange(6), target])
    torch.testing.assert_close(topk_loss(logits, target, 2.5, temperature=0.7, reduction="none"), expected)
    torch.testing.assert_close(topk_loss(logits, target, 2.5, temperature=0.7, reduction="sum"), expected.sum())


@pytest.mark.parametrize("method", INT_K)
def test_gradients_are_finite_for_every_method(method):
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    logits[0, 2] = -math.inf  # a masked class
    logits.requires_grad_()
    options = {"generator": torch.Generator().manual_seed(0)} if khot.relaxed.registry.get(method).stochastic else {}
    loss = topk_loss(logits, torch.tensor([2, 0, 5, 8]), 3, method=method, **options)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_gradcheck():
    logits = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, 2])
    labels = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0], [1, 1, 0, 1, 0, 0]])
    for method in ("sigmoid", "lapsum"):
        assert torch.autograd.gradcheck(lambda x: topk_loss(x, target, 2, method=method), (logits,))
        assert torch.autograd.gradcheck(lambda x: khot_loss(x, labels, method=method), (logits,))


def test_khot_loss_is_the_cross_entropy_of_the_mask_with_k_from_the_labels():
    logits = torch.randn(5, 7, dtype=torch.float64)
    labels = (torch.rand(5, 7) < 0.4).double()
    labels[0] = 0  # an example without labels: k = 0
    k = labels.sum(-1)
    p = khot.sigmoid_topk(logits, k, temperature=0.5)
    by_hand = -(labels * torch.log(p).clamp(min=-100) + (1 - labels) * torch.log1p(-p).clamp(min=-100)).sum(-1)
    torch.testing.assert_close(khot_loss(logits, labels.bool(), temperature=0.5, reduction="none"), by_hand)
    assert khot_loss(logits, labels, temperature=0.5, reduction="none")[0] == 0


def test_khot_loss_vanishes_when_the_labels_are_the_sharp_top_k():
    logits = torch.tensor([[3.0, -1.0, 2.0, 0.0], [0.0, 2.0, 1.0, -2.0]])
    good = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]])
    bad = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    assert khot_loss(logits, good, temperature=1e-3) < 1e-6
    assert khot_loss(logits, bad, temperature=1e-3) > 50


def test_bad_arguments():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 4\]"):
        topk_loss(logits, torch.tensor([0, 5]), 2)
    with pytest.raises(ValueError, match=r"target must have shape logits.shape\[:-1\] = \(2,\)"):
        topk_loss(logits, torch.tensor([0]), 2)
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        topk_loss(logits, torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="reduction='avg' is not valid"):
        topk_loss(logits, torch.tensor([0, 1]), 2, reduction="avg")
    with pytest.raises(ValueError, match="targets must be 0 or 1"):
        khot_loss(logits, torch.full((2, 5), 2.0))
    with pytest.raises(ValueError, match="targets must be 0 or 1, not a fraction"):  # soft labels were taken
        khot_loss(logits, torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="method='sorting' is not valid"):
        khot_loss(logits, torch.zeros(2, 5), method="sorting")
