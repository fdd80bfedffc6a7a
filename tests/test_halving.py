import math

import pytest
import torch

from khot.metrics import nccs
from khot.relaxed.halving import _pair_weights, _sort_descending, _tournament, halving_select, halving_topk


def reference(E: list[list[float]], v: list[float], k: int, tau: float, published: bool = False) -> list[list[float]]:
    """Algorithm 2 of the paper for one example, one pair at a time.

    The boosted softmax with base b = exp(1/tau) is b**v_i / (b**v_i + b**v_j); the public
    code's (``published``) is softmax([b**v_i, b**v_j]).
    Extension beyond n/k a power of two (the documented rule): a round on m
    candidates makes p = m - max(k, ceil(m/2)) merges; the best m - 2p pass
    through and the rest pair best-with-worst.  When n/k is a power of two, p = m/2.
    With k == n (no rounds) the rows come sorted by score, best first.
    """
    if len(v) == k:
        return [E[i] for i in sorted(range(k), key=lambda i: -v[i])]
    while len(v) > k:
        m = len(v)
        p = m - max(k, (m + 1) // 2)
        q = m - 2 * p
        order = sorted(range(m), key=lambda i: -v[i])
        E, v = [E[i] for i in order], [v[i] for i in order]
        newE, newv = E[:q], v[:q]
        for i in range(p):
            a, b = q + i, m - 1 - i
            if published:
                wa = 1.0 / (1.0 + math.exp(math.exp(v[b] / tau) - math.exp(v[a] / tau)))
            else:
                wa = 1.0 / (1.0 + math.exp((v[b] - v[a]) / tau))
            wb = 1.0 - wa
            newE.append([wa * ea + wb * eb for ea, eb in zip(E[a], E[b])])
            newv.append(wa * v[a] + wb * v[b])
        E, v = newE, newv
    return E


def check_against_reference(n, k, tau, batch=2, d=3, published=False):
    g = torch.Generator().manual_seed(n * 1000 + k)
    s = torch.rand(batch, n, generator=g, dtype=torch.float64)
    x = torch.rand(batch, n, d, generator=g, dtype=torch.float64) * 2 - 1
    expected = [reference(x[b].tolist(), s[b].tolist(), k, tau, published) for b in range(batch)]
    options = dict(temperature=tau, published_weights=published)
    torch.testing.assert_close(halving_select(x, s, k, **options), torch.tensor(expected, dtype=x.dtype))
    # the mask is the column sums of the selection of identity rows
    eye = torch.eye(n, dtype=torch.float64).expand(batch, n, n)
    mask = [reference(eye[b].tolist(), s[b].tolist(), k, tau, published) for b in range(batch)]
    torch.testing.assert_close(halving_topk(s, k, **options), torch.tensor(mask, dtype=x.dtype).sum(1))


@pytest.mark.parametrize("n,k", [(16, 2), (16, 8), (32, 4), (64, 2), (64, 32), (128, 16), (256, 2)])
def test_matches_paper_algorithm_when_n_over_k_is_a_power_of_two(n, k):
    check_against_reference(n, k, tau=1 / math.log(20))


@pytest.mark.parametrize("n,k", [(17, 3), (17, 8), (17, 16), (24, 5), (9, 1), (12, 12), (100, 7)])
def test_matches_reference_rule_on_awkward_sizes(n, k):
    check_against_reference(n, k, tau=0.2)


@pytest.mark.parametrize("n,k", [(16, 2), (64, 8), (17, 3)])
def test_published_weights_match_the_public_codes_softmax_of_powers(n, k):
    check_against_reference(n, k, tau=1 / math.log(20), published=True)


def test_published_weights_depend_on_the_score_level():
    # the guide's example at base 20: 0.9/0.8 splits 0.98/0.02, 0.2/0.1 only 0.62/0.38
    tau = 1 / math.log(20)
    for pair, split in (([0.9, 0.8], 0.98), ([0.2, 0.1], 0.62)):
        mask = halving_topk(torch.tensor(pair), 1, temperature=tau, published_weights=True)
        assert abs(mask[0].item() - split) < 0.005
    shifted = halving_topk(torch.tensor([0.2, 0.1]), 1, temperature=tau) - halving_topk(torch.tensor([0.9, 0.8]), 1, temperature=tau)
    assert shifted.abs().max() < 1e-6  # by score difference (the default), the level does not matter
    with pytest.raises(TypeError, match="published_weights"):
        halving_topk(torch.tensor(pair), 1, published_weights="yes")


def exact_topk(x, s, k):
    idx = torch.sort(s, dim=-1, descending=True).indices[..., :k]
    mask = torch.zeros_like(s).scatter(-1, idx, 1.0)
    return x.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1])), mask


@pytest.mark.parametrize("n,k", [(17, 3), (1000, 10), (40, 40), (50, 1), (96, 5), (33, 32)])
def test_any_size_gives_k_rows_and_sharp_limit_is_exact(n, k):
    g = torch.Generator().manual_seed(n + k)
    s = torch.randperm(n, generator=g).float().div(n).expand(4, n) + torch.arange(4.0)[:, None]
    s = s.gather(1, torch.stack([torch.randperm(n, generator=g) for _ in range(4)]))
    x = torch.rand(4, n, 8, generator=g) * 2 - 1
    out, mask = halving_select(x, s, k), halving_topk(s, k)
    assert out.shape == (4, k, 8) and torch.isfinite(out).all()
    assert ((mask >= 0) & (mask <= 1)).all()
    torch.testing.assert_close(mask.sum(-1), torch.full((4,), float(k)))
    top, exact = exact_topk(x, s, k)
    sharp = halving_select(x, s, k, temperature=1e-5)  # score gaps are >= 1/n
    # exact rows, in descending score order (k == n too)
    torch.testing.assert_close(sharp, top, atol=1e-4, rtol=0)
    torch.testing.assert_close(halving_topk(s, k, temperature=1e-5), exact, atol=1e-4, rtol=0)
    assert nccs(sharp, top).min() > 0.9999
    if k < n:  # not trivially exact
        assert nccs(halving_select(x, s, k, temperature=1.0), top).mean() < 0.999


def test_shift_invariant_dim_and_dtypes():
    s = torch.rand(3, 20, 4, dtype=torch.float64)
    m = halving_topk(s, 5, dim=1)
    torch.testing.assert_close(halving_topk(s + 100.0, 5, dim=-2), m)
    torch.testing.assert_close(m, halving_topk(s.movedim(1, -1), 5).movedim(-1, 1))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        low = halving_topk(s.to(dtype), 5, dim=1)  # computed in float32
        assert low.dtype == dtype
        expected = halving_topk(s.to(dtype).double(), 5, dim=1).to(dtype)
        torch.testing.assert_close(low, expected, atol=1e-3, rtol=0)
    x = torch.rand(3, 20, 6)
    out = halving_select(x.to(torch.bfloat16), s[..., 0].to(torch.bfloat16), 5)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, 6)


def test_empty_batch():
    assert halving_topk(torch.rand(0, 7), 3).shape == (0, 7)
    assert halving_select(torch.rand(2, 0, 7, 4), torch.rand(2, 0, 7), 3).shape == (2, 0, 3, 4)


def test_gradients():
    g = torch.Generator().manual_seed(0)
    s = (torch.randperm(11, generator=g).double() / 11).requires_grad_()
    x = torch.randn(2, 11, 3, dtype=torch.float64, generator=g).requires_grad_()
    s2 = torch.stack([s.detach(), s.detach().flip(0)]).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, s: halving_select(x, s, 3, temperature=0.3), (x, s2))
    assert torch.autograd.gradcheck(lambda s: halving_topk(s, 4, temperature=0.3), (s,))


@pytest.mark.parametrize("n, k", [(64, 8), (50, 7), (33, 32)])
def test_gradients_match_a_dense_weighted_sum(n, k):
    """The pooling's own backward (one gather back to the input rows) against autograd through a
    dense (k, n) weight matrix times the rows, with padding (n / k not a power of two) and without."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 5, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.rand(3, n, dtype=torch.float64, generator=g, requires_grad=True)
    probe = torch.randn(3, k, 5, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad((halving_select(x, s, k, temperature=0.2) * probe).sum(), (x, s))
    members, weights = _tournament(s, k, 0.2)
    dense = torch.zeros(3, k, n + 1, dtype=torch.float64).scatter(2, torch.where(members >= 0, members, n), weights)
    expected = torch.autograd.grad((dense[..., :n] @ x * probe).sum(), (x, s))
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda x, s: halving_select(x, s, k, temperature=0.2), (x, s))


def test_paper_trend_at_base_20():
    torch.manual_seed(0)
    tau = 1 / math.log(20)

    def score(n, k, temperature):
        s, x = torch.rand(16, n), torch.rand(16, n, 32) * 2 - 1
        return nccs(halving_select(x, s, k, temperature=temperature), exact_topk(x, s, k)[0]).mean().item()

    # shift-invariant base-20 weights are softer than the public code's softmax(20**s),
    # which gave the published 0.986 / 0.95; we measure ~0.93 / ~0.53
    two, thirtytwo = score(256, 128, tau), score(1024, 32, tau)
    assert 0.90 < two < 0.97 and 0.40 < thirtytwo < 0.70
    assert score(256, 128, 0.05) > 0.98 and score(1024, 32, 0.05) > 0.85


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: halving_topk(torch.rand(5), 0), ValueError, "k=0"),
        (lambda: halving_topk(torch.rand(5), 6), ValueError, "k=6"),
        (lambda: halving_topk(torch.rand(5), 2, temperature=0.0), ValueError, "temperature"),
        (lambda: halving_topk(torch.rand(5), 2, temperature=-1), ValueError, "temperature"),
        (lambda: halving_topk(torch.rand(5), 2, dim=1), ValueError, "dim=1"),
        (lambda: halving_topk(torch.arange(5), 2), TypeError, "scores"),
        (lambda: halving_topk(torch.rand(5), 2.0), TypeError, "k"),
        (lambda: halving_select(torch.rand(5, 3), torch.rand(4), 2), ValueError, r"scores must have shape"),
        (lambda: halving_select(torch.rand(5), torch.rand(5), 2), ValueError, "x must have shape"),
        (lambda: halving_select(torch.rand(5, 3), torch.rand(5), torch.tensor(2)), TypeError, "k must be"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_radix_sort_of_the_first_round_matches_the_stable_row_sort():
    # large enough for the flat int64 key sort; ties, signed zeros, infinities, NaNs of both signs
    s = torch.rand(4, 10000, generator=torch.Generator().manual_seed(0))
    s[0, :50] = 0.5
    s[1, 5:10], s[1, 20:30] = -0.0, 0.0
    s[2, :5], s[2, 7] = -math.inf, math.inf
    s[3, 3], s[3, 9] = math.nan, -math.nan
    values, order = _sort_descending(s)
    expected_values, expected_order = s.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(order, expected_order)
    assert torch.equal(values.isnan(), expected_values.isnan())
    assert torch.equal(values.nan_to_num(), expected_values.nan_to_num())


def test_published_weights_stay_finite_at_large_scores():
    # base**score overflowed float32 beyond score ~4.4 at temperature 0.05: NaN gradients before
    g = torch.Generator().manual_seed(3)
    s = (4 + 2 * torch.rand(2, 16, generator=g, dtype=torch.float64))
    x = torch.randn(2, 16, 3, generator=g, dtype=torch.float64)
    options = dict(temperature=0.05, published_weights=True)
    expected = torch.tensor([reference(x[b].tolist(), s[b].tolist(), 4, 0.05, True) for b in range(2)], dtype=x.dtype)
    torch.testing.assert_close(halving_select(x, s, 4, **options), expected)
    s32 = s.float().requires_grad_()
    out = halving_select(x.float(), s32, 4, **options)
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=0)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert torch.isfinite(s32.grad).all()
    # where the weights are not saturated, the derivative is right (log-space and direct branches)
    for low in (0.0, 1.9):
        s = (low + 0.3 * torch.rand(2, 12, generator=g, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(lambda s: halving_topk(s, 3, **options), (s,))


def test_second_derivatives():
    # the pooling's backward once returned wrong second derivatives silently (once_differentiable)
    g = torch.Generator().manual_seed(5)
    for n, k in ((12, 3), (8, 2)):  # with padding (n / k not a power of two) and without
        x = torch.randn(2, n, 3, generator=g, dtype=torch.float64, requires_grad=True)
        s = torch.rand(2, n, generator=g, dtype=torch.float64, requires_grad=True)
        tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda x, s, tau: halving_select(x, s, k, temperature=tau), (x, s, tau))


def test_k_equal_n_comes_best_first():
    s = torch.tensor([[0.2, 0.9, -math.inf, 0.5]])
    x = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 2)
    for tau in (1e-4, 0.5):
        torch.testing.assert_close(halving_select(x, s, 4, temperature=tau)[0, :, 0], torch.tensor([1.0, 3, 0, 2]))
    torch.testing.assert_close(halving_topk(s, 4), torch.ones(1, 4))


def test_default_beats_the_public_codes_default_on_the_papers_grid():
    # the public code's default: base 20 with its softmax(20**s) weights (benchmarks/halving_default.py sweeps more)
    from khot.bench.suites import BASE_20, problem
    from khot.relaxed.halving import DEFAULT_TEMPERATURE

    for k, n in ((32, 1024), (128, 16384), (8, 8192)):
        x, s, top = problem(n, k, batch=4)
        ours = nccs(halving_select(x, s, k), top).mean()
        public = nccs(halving_select(x, s, k, temperature=BASE_20, published_weights=True), top).mean()
        assert ours > public, (k, n, DEFAULT_TEMPERATURE, ours.item(), public.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_finite_scores_shortcut_gives_the_general_pair_weights(dtype):
    # eager CPU calls on finite scores take _pair_weights' short form; other calls (compiled, other
    # devices, rows with ±inf) the general one: the same weights and merged scores
    g = torch.Generator().manual_seed(0)
    s = torch.randn(64, 2, generator=g, dtype=dtype).sort(-1, descending=True).values * torch.tensor([1.0, 1.0, 1e-3, 30.0]).repeat_interleave(16).unsqueeze(-1).to(dtype)
    for temperature in (0.005, 0.3, torch.tensor(0.7, dtype=dtype)):
        short = _pair_weights(s[:, 0], s[:, 1], temperature, published=False, all_finite=True)
        general = _pair_weights(s[:, 0], s[:, 1], temperature, published=False, all_finite=False)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(short[0], general[0], atol=0, rtol=4 * eps)  # the weights
        torch.testing.assert_close(short[1], general[1], atol=4 * eps * float(s.abs().max()), rtol=4 * eps)  # a mix of the pair


def test_mask_scores_far_below_keep_the_better_members_score():
    # a pair of a score and a mask value (-1e9): the merged score is the score itself, exactly, on every
    # path (a merge written lo + w (hi - lo) rounded it away in float32 and the top scores got weight 0)
    s = torch.tensor([[0.31, 0.30, 0.29, 0.28, 0.27, 0.26, -1e9, -1e9]])
    x = torch.eye(8).unsqueeze(0)
    want = torch.tensor(reference(x[0].tolist(), s[0].tolist(), 2, 0.005))
    torch.testing.assert_close(halving_select(x, s, 2), want.unsqueeze(0), atol=1e-5, rtol=0)
    # differences that overflow take the general path: no inf - inf
    big = torch.tensor([[3e38, -3e38, 3e38, -3e38]])
    torch.testing.assert_close(halving_topk(big, 1), torch.tensor([[0.5, 0.0, 0.5, 0.0]]))


@pytest.mark.parametrize("mask", [-1e9, torch.finfo(torch.float32).min])
def test_published_weights_beside_a_mask_value(mask):
    # log(b**hi - b**lo) was lo / τ + (hi - lo) / τ: cancellation beside -1e9 ([0.197, 0.072, 0.731]
    # for k = 1), -inf + inf = NaN beside float32's min
    p = halving_topk(torch.tensor([0.3, mask, 0.9]), 1, temperature=0.1, published_weights=True)
    torch.testing.assert_close(p, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
