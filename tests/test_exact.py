"""Exact top-k ops against an independent stable-sort reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import khot

NAN, INF = float("nan"), float("inf")


def reference_mask(x, k, dim=-1, largest=True, magnitude=False):
    """Rank every element with a stable sort (NaN largest, ties to the lower index)."""
    key = (x.abs() if magnitude else x).movedim(dim, -1).double()
    order = torch.sort(key, dim=-1, descending=largest, stable=True).indices
    if not largest:  # ascending stable sort puts NaN last, ties in index order: as wanted
        order = torch.sort(key, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1]).expand_as(order))
    kk = k.unsqueeze(-1) if isinstance(k, torch.Tensor) else k
    return (rank < kk).movedim(-1, dim)


def check_both(x, k, dim=-1, **kw):
    expected = reference_mask(x, k, dim, **kw)
    got = khot.topk_mask(x, k, dim, **kw)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got, expected)
    kept = khot.keep_topk(x, k, dim, **kw)
    assert kept.dtype == x.dtype and kept.shape == x.shape
    zero = torch.zeros((), dtype=x.dtype)
    assert torch.equal(torch.where(expected, x, zero).isnan(), kept.isnan())
    assert torch.equal(torch.where(expected, x, zero).nan_to_num(3.0), kept.nan_to_num(3.0))


def random_input(gen, shape, kind, dtype):
    if kind == "ties":
        x = torch.randint(-2, 3, shape, generator=gen).float()
    elif kind == "special":
        x = torch.randn(shape, generator=gen)
        x[x > 1.0] = NAN
        x[x < -1.0] = -INF
        x[(x > 0.5) & (x < 0.7)] = INF
    else:
        x = torch.randn(shape, generator=gen)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_matches_reference_on_random_shapes(dtype, kind):
    if kind == "special" and not dtype.is_floating_point:
        pytest.skip("NaN and inf need a floating dtype")
    gen = torch.Generator().manual_seed(hash((str(dtype), kind)) % 2**31)
    for _ in range(12):
        ndim = int(torch.randint(1, 4, (), generator=gen))
        shape = [int(torch.randint(1, 7, (), generator=gen)) for _ in range(ndim)]
        x = random_input(gen, shape, kind, dtype)
        if not dtype.is_floating_point:
            x = (x * 3).to(dtype)
        dim = int(torch.randint(-ndim, ndim, (), generator=gen))
        n = x.shape[dim]
        for k in sorted({0, 1, max(n - 1, 0), n, int(torch.randint(0, n + 1, (), generator=gen))}):
            for largest in (True, False):
                for magnitude in (False, True):
                    check_both(x, k, dim, largest=largest, magnitude=magnitude)


@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_slices_small_k(dim, kind, dtype):
    """Long slices take the chunked candidate path, including a ragged tail."""
    gen = torch.Generator().manual_seed(7)
    x = random_input(gen, (3, 20011), kind, dtype)
    x = x if dim == -1 else x.T.contiguous()
    for k in (1, 5, 37, torch.tensor([3, 37, 1])):  # a per-slice k takes the sorted path
        for largest in (True, False):
            check_both(x, k, dim, largest=largest)
        check_both(x, k, dim, magnitude=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_tie_repair_in_blocks_of_a_middle_dimension(monkeypatch, dtype):
    """Slices whose k-th value ties past the k-th place are repaired block by block along the
    largest batch dimension (here not the leading one)."""
    import khot.exact._cpu

    monkeypatch.setattr(khot.exact._cpu, "_BLOCK", 64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (3, 40, 7), generator=gen).to(dtype)
    for k in (1, 9, torch.randint(0, 41, (3, 7), generator=gen)):
        for largest in (True, False):
            check_both(x, k, 1, largest=largest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_k_at_a_sixty_fourth_of_the_slice(dtype, kind, monkeypatch):
    """k = n / 64, where ATen's topk of k + 1 turns slow: khot counts the ties of the k-th instead,
    in blocks of a few slices (made small here)."""
    if kind == "special" and not dtype.is_floating_point:
        pytest.skip("NaN and inf need a floating dtype")
    import khot.exact._cpu

    monkeypatch.setattr(khot.exact._cpu, "_BLOCK", 2000)
    gen = torch.Generator().manual_seed(64)
    for n in (128, 256, 1024):
        x = random_input(gen, (9, n), kind, dtype)
        for largest in (True, False):
            check_both(x, n // 64, largest=largest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_large_k_on_short_slices(dtype, kind):
    """k >= 64 on slices too short to chunk: an unsorted top-(k+1) settled by its worst value."""
    if kind == "special" and not dtype.is_floating_point:
        pytest.skip("NaN and inf need a floating dtype")
    gen = torch.Generator().manual_seed(65)
    x = random_input(gen, (5, 300), kind, dtype)
    for k in (64, 150, 299):
        for largest in (True, False):
            check_both(x, k, largest=largest)
            check_both(x.T, k, 0, largest=largest)


def test_per_slice_k_and_broadcasting():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (4, 5, 9), generator=gen).float()
    k = torch.randint(0, 10, (4, 5), generator=gen)
    check_both(x, k, -1)
    check_both(x, k[:, :1], -1)  # broadcasts to (4, 5)
    check_both(x, torch.tensor(3), -1)
    k0 = torch.randint(0, 5, (5, 9), generator=gen)
    check_both(x, k0, 0)
    assert torch.equal(khot.topk_mask(x, torch.full((4, 5), 9)), torch.ones_like(x, dtype=torch.bool))


def test_non_contiguous_and_scalar_and_empty():
    x = torch.randn(6, 40)[:, ::3].T  # non-contiguous, (14, 6)
    assert not x.is_contiguous()
    check_both(x, 4, 0)
    check_both(x, 2, 1)
    s = torch.tensor(2.5)
    assert khot.topk_mask(s, 1).item() is True and khot.topk_mask(s, 0).item() is False
    empty = torch.zeros(0, 5)
    assert khot.topk_mask(empty, 3).shape == (0, 5)
    assert khot.keep_topk(torch.zeros(4, 0), 0).shape == (4, 0)


def test_nan_ranks_above_inf():
    x = torch.tensor([1.0, NAN, INF, NAN, -INF])
    assert khot.topk_mask(x, 1).tolist() == [False, True, False, False, False]
    assert khot.topk_mask(x, 3).tolist() == [False, True, True, True, False]
    assert khot.topk_mask(x, 2, largest=False).tolist() == [True, False, False, False, True]
    assert khot.topk_mask(x, 4, largest=False).tolist() == [True, True, True, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 20011])
def test_signed_zeros_tie_and_negative_nans_rank_as_nan(dtype, n):
    """-0.0 ties with 0.0 (the lower index wins) and a NaN with its sign bit set is a NaN
    like any other, on the short-row and the long-row paths."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-1, 2, (6, n), generator=gen).float() * torch.randn(6, n, generator=gen).abs().round()
    x = torch.where(torch.rand(6, n, generator=gen) < 0.5, x, -x)  # zeros of both signs
    assert bool(torch.signbit(x[x == 0]).any()) and not bool(torch.signbit(x[x == 0]).all())
    x[1, 5] = x[3, n - 2] = NAN
    x[1, 9] = x[4, 0] = -NAN
    assert torch.signbit(x[4, 0]) and not torch.signbit(x[1, 5])
    x = x.to(dtype)
    for k in (1, 3, n // 3):
        for largest in (True, False):
            check_both(x, k, largest=largest)

def test_keep_topk_gradient_reaches_kept_entries_only():
    x = torch.randn(5, 30, dtype=torch.float64, requires_grad=True)
    out = khot.keep_topk(x, 7, magnitude=True)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    expected = reference_mask(x.detach(), 7, magnitude=True)
    assert torch.equal(x.grad, torch.where(expected, weights, 0.0))
    torch.autograd.gradcheck(lambda t: khot.keep_topk(t, 3, 0), (torch.randn(8, 4, dtype=torch.float64, requires_grad=True),))
    zero = khot.keep_topk(x, 0)
    zero.sum().backward()  # still connected to the graph when nothing is kept


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-4, 4) | st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40),
    data=st.data(),
)
def test_invariants(values, data):
    x = torch.tensor(values, dtype=torch.float32)
    n = x.numel()
    k = data.draw(st.integers(0, n))
    mask = khot.topk_mask(x, k)
    assert int(mask.sum()) == k
    if k < n:
        assert bool((khot.topk_mask(x, k + 1) >= mask).all())  # nested in k
        if 0 < k:
            assert float(x[mask].min()) >= float(x[~mask].max())
            mag = khot.topk_mask(x, k, magnitude=True)
            assert float(x[mag].abs().min()) >= float(x[~mag].abs().max())
            small = khot.topk_mask(x, k, largest=False)
            assert float(x[small].max()) <= float(x[~small].min())


def test_select_topk_matches_reference_and_orders():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 10, 4, generator=gen, requires_grad=True)
    scores = torch.randint(0, 4, (2, 3, 10), generator=gen).float()
    values, indices = khot.select_topk(x, scores, 4)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :4]
    assert torch.equal(indices, order) and indices.dtype == torch.int64
    assert torch.equal(values, torch.stack([x[i, j, order[i, j]] for i in range(2) for j in range(3)]).view(2, 3, 4, 4))
    _, unsorted = khot.select_topk(x, scores, 4, sorted=False)
    assert torch.equal(unsorted, order.sort(-1).values)
    values.sum().backward()
    assert torch.equal(x.grad.sum(-1) != 0, reference_mask(scores, 4))
    assert khot.select_topk(x, scores, 0)[0].shape == (2, 3, 0, 4)


def test_token_pruning_matches_seed_snippet():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 8, generator=gen)
    attn = torch.softmax(torch.randn(3, 4, 17, 17, generator=gen), -1)
    tokens, indices = khot.nn.TokenPruning(5)(x, attn)
    # seed 001, verbatim in spirit: cls attention averaged over heads, topk, gather, cat
    cls_attn = attn[:, :, 0, 1:].mean(dim=1)
    _, idx = torch.topk(cls_attn, 5, dim=1, largest=True, sorted=True)
    expected = torch.cat([x[:, 0:1], torch.gather(x[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, 8))], 1)
    assert torch.equal(tokens, expected)
    assert torch.equal(indices, torch.cat([torch.zeros(3, 1, dtype=torch.long), idx + 1], 1))
    rate_tokens, _ = khot.nn.TokenPruning(0.3)(x, scores=cls_attn)
    assert rate_tokens.shape == (3, 1 + math.ceil(0.3 * 16), 8)


def test_rate_rounds_up_without_float_error_and_int_magnitude_does_not_overflow():
    x = torch.randn(1, 101, 4)
    assert khot.nn.TokenPruning(0.07)(x, scores=torch.rand(1, 100))[0].shape[1] == 1 + 7
    assert khot.nn.TokenPruning(0.071)(x, scores=torch.rand(1, 100))[0].shape[1] == 1 + 8
    small = torch.tensor([[-128, 5, 3, -1]], dtype=torch.int8)
    assert khot.topk_mask(small, 1, magnitude=True).tolist() == [[True, False, False, False]]
    assert khot.keep_topk(small, 2, magnitude=True).tolist() == [[-128, 5, 0, 0]]


def test_int64_magnitude_ranks_minimum_first():
    """Issue 10: |-2**63| overflows int64; it must still rank first by magnitude, on both paths."""
    low, high = -(2**63), 2**63 - 1
    x = torch.tensor([[5, high, low, -high, 0, low]])
    for backend in ("cpu", "portable"):
        with khot.use_backend(backend):
            assert khot.topk_mask(x, 1, magnitude=True).tolist() == [[False, False, True, False, False, False]]
            assert khot.topk_mask(x, 3, magnitude=True).tolist() == [[False, True, True, False, False, True]]
            assert khot.keep_topk(x, 2, magnitude=True).tolist() == [[0, 0, low, 0, 0, low]]
            assert khot.topk_mask(x, 1, largest=False, magnitude=True).tolist() == [[False, False, False, False, True, False]]
    assert torch.equal(khot.topk_mask(x, 4, magnitude=True), torch.tensor([[False, True, True, True, False, True]]))


def test_modules_repr():
    assert repr(khot.nn.TopK(3, 1, magnitude=True)) == "TopK(k=3, dim=1, magnitude=True)"
    assert "keep=0.5" in repr(khot.nn.TokenPruning(0.5))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: khot.topk_mask(torch.ones(3, 4), -1), ValueError, r"k=-1 is out of range"),
        (lambda: khot.topk_mask(torch.ones(3, 4), 5), ValueError, r"k=5 is out of range"),
        (lambda: khot.topk_mask(torch.ones(3, 4), 2.0), TypeError, r"k must be an int.*2\.0"),
        (lambda: khot.topk_mask(torch.ones(3, 4), True), TypeError, r"k must be an int"),
        (lambda: khot.topk_mask(torch.ones(3, 4), torch.ones(3)), TypeError, r"k must be an int or an integer tensor"),
        (lambda: khot.topk_mask(torch.ones(3, 4), torch.ones(4, dtype=torch.long)), ValueError, r"k has shape \(4,\)"),
        (lambda: khot.topk_mask(torch.ones(3, 4), torch.tensor([1, 5, 0])), ValueError, r"from 0 to 5"),
        (lambda: khot.topk_mask(torch.ones(3, 4), 1, dim=2), ValueError, r"dim=2 is out of range"),
        (lambda: khot.topk_mask(torch.ones(3, 4), 1, dim=1.0), TypeError, r"dim must be an int"),
        (lambda: khot.topk_mask([1.0, 2.0], 1), TypeError, r"x must be a torch.Tensor, got list"),
        (lambda: khot.keep_topk(torch.ones(3, dtype=torch.bool), 1), TypeError, r"dtype torch.bool"),
        (lambda: khot.select_topk(torch.ones(3, 4), torch.ones(4), 1), ValueError, r"scores must have shape"),
        (lambda: khot.select_topk(torch.ones(4), torch.ones(4), 1), ValueError, r"x must have shape \(\.\.\., n, d\)"),
        (lambda: khot.select_topk(torch.ones(4, 2), torch.ones(4), 5), ValueError, r"k=5 is out of range"),
        (lambda: khot.select_topk(torch.ones(2, 4, 2), torch.ones(2, 4), -1), ValueError, r"k=-1 is out of range"),
        (lambda: khot.select_topk(torch.ones(4, 2), torch.ones(4), torch.tensor(1)), TypeError, r"k must be an int"),
        # issue 10: switches must be bools; select_topk takes no tensor k, so its message offers none
        (lambda: khot.select_topk(torch.ones(4, 2), torch.ones(4), 2.5), TypeError, r"^k must be an int, got 2.5$"),
        (lambda: khot.select_topk(torch.ones(4, 2), torch.ones(4), 2, sorted="no"), TypeError, r"sorted must be True or False, got 'no'"),
        (lambda: khot.topk_mask(torch.ones(4), 2, largest=1), TypeError, r"largest must be True or False, got 1"),
        (lambda: khot.keep_topk(torch.ones(4), 2, magnitude=1), TypeError, r"magnitude must be True or False, got 1"),
        (lambda: khot.nn.TopKActivation(2, relu=1), TypeError, r"relu must be True or False, got 1"),
        (lambda: khot.nn.TopKActivation(2, dense="yes"), TypeError, r"dense must be True or False, got 'yes'"),
        (lambda: khot.nn.BatchTopK(2, relu=0), TypeError, r"relu must be True or False, got 0"),
        (lambda: khot.nn.TokenPruning(1.5), ValueError, r"keep must lie in \(0, 1\]"),
        (lambda: khot.nn.TokenPruning(-2), ValueError, r"keep must be >= 0"),
        (lambda: khot.nn.TokenPruning(3)(torch.ones(1, 3, 2), scores=torch.ones(1, 2)), ValueError, r"keep=3 is more than"),
        (lambda: khot.nn.TokenPruning(1)(torch.ones(1, 3, 2), torch.ones(1, 3, 3)), ValueError, r"attn must have shape"),
        (lambda: khot.nn.TokenPruning(1)(torch.ones(1, 3, 2)), ValueError, r"exactly one of attn and scores"),
        (lambda: khot.nn.TokenPruning(1)(torch.ones(2, 5, 3), scores=torch.ones(2, 5)), ValueError, r"scores must have shape \(B, N - 1"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_torch_compile_fullgraph_matches_eager():
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (6, 50), generator=gen).float()
    x[0, 3] = NAN
    k = torch.randint(0, 51, (6,), generator=gen)
    for fn, args in [
        (lambda t: khot.keep_topk(t, 7, magnitude=True), (x,)),
        (lambda t, kk: khot.topk_mask(t, kk, largest=False), (x, k)),
        (lambda t: khot.select_topk(t.unsqueeze(-1), t, 5)[1], (x,)),
    ]:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(*args).nan_to_num(9), fn(*args).nan_to_num(9))


def test_wide_unsigned_integers():
    # uint64 with magnitude=True ranked by x.long().abs(), which overflows above 2**63; uint16/32/64
    # reached ATen's max and topk, which do not take them (a raw NotImplementedError)
    big = torch.tensor([2**63, 1, 5, 2**64 - 1], dtype=torch.uint64)
    for magnitude in (False, True):
        assert khot.topk_mask(big, 2, magnitude=magnitude).tolist() == [True, False, False, True]
        with khot.use_backend("portable"):
            assert khot.topk_mask(big, 2, magnitude=magnitude).tolist() == [True, False, False, True]
    for dtype in (torch.uint16, torch.uint32):
        assert khot.topk_mask(torch.tensor([3, 9, 1, 7], dtype=dtype), 2).tolist() == [False, True, False, True]
        with pytest.raises(TypeError, match="convert it to torch.int64"):
            khot.keep_topk(torch.tensor([3, 9, 1, 7], dtype=dtype), 2)
        with pytest.raises(TypeError, match="scores has dtype"):
            khot.select_topk(torch.eye(4), torch.tensor([3, 9, 1, 7], dtype=dtype), 2)
