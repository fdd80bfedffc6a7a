import math

import pytest
import torch

from khot.metrics import nccs


def nccs_reference(selected: list[list[float]], target: list[list[float]]) -> float:
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    return sum(max(cos(t, s) for s in selected) for t in target) / len(target)


def test_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    selected = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    target = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    ref = [[nccs_reference(selected[i, j].tolist(), target[i, j].tolist()) for j in range(3)] for i in range(2)]
    out = nccs(selected, target)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float64))


def test_identical_sets_in_any_order_score_one():
    target = torch.randn(4, 7, 6)
    perm = torch.stack([torch.randperm(7) for _ in range(4)])
    shuffled = target.gather(1, perm[..., None].expand(-1, -1, 6))
    torch.testing.assert_close(nccs(shuffled, target), torch.ones(4))
    assert nccs(-target, target).max() < 1  # not trivially one


def test_low_precision_and_empty_batch():
    a, b = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    torch.testing.assert_close(nccs(a.half(), b.half()), nccs(a.half().float(), b.half().float()))
    assert nccs(torch.rand(0, 4, 8), torch.rand(0, 4, 8)).shape == (0,)


@pytest.mark.parametrize(
    "selected,target,error,match",
    [
        (torch.rand(3, 4), torch.rand(2, 4), ValueError, "same shape"),
        (torch.rand(4), torch.rand(4), ValueError, "target must have shape"),
        (torch.rand(0, 4), torch.rand(0, 4), ValueError, "k >= 1"),
        (torch.rand(3, 4), torch.ones(3, 4, dtype=torch.long), TypeError, "target"),
        ([[1.0]], torch.rand(1, 1), TypeError, "selected"),
    ],
)
def test_bad_input(selected, target, error, match):
    with pytest.raises(error, match=match):
        nccs(selected, target)


def test_tensors_on_two_devices_are_rejected():
    with pytest.raises(ValueError, match=r"selected is on meta but target is on cpu"):
        nccs(torch.rand(3, 4, device="meta"), torch.rand(3, 4))


def test_meta_tensors_and_compile_without_graph_breaks():
    out = nccs(torch.empty(2, 5, 3, 4, device="meta", dtype=torch.bfloat16), torch.empty(2, 5, 3, 4, device="meta", dtype=torch.bfloat16))
    assert out.shape == (2, 5) and out.device.type == "meta" and out.dtype == torch.float32
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch._dynamo.explain(nccs)(a, b).graph_break_count == 0
    torch.testing.assert_close(torch.compile(nccs, fullgraph=True, backend="eager")(a, b), nccs(a, b))


def test_nccs_is_scale_invariant():
    # F.normalize alone: 1e30-sized rows overflowed the norm (nCCS 0), 1e-30-sized ones fell under its eps
    a = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    for scale in (1e30, 1e-30, 1.0):
        torch.testing.assert_close(nccs(a * scale, a * scale), torch.ones(3))
        torch.testing.assert_close(nccs(a.flip(-2) * scale, a), torch.ones(3))
