"""The Triton kernels of :mod:`khot._triton`, run by Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be set before the kernels are defined, so it is set here, before
anything imports them (other test files never import triton). Every kernel is compared with
an independent reference (a stable sort, float64 sums) and with khot's CPU path. Sizes are
tiny: the interpreter runs a kernel as numpy code, one program at a time.
"""

import importlib
import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton; requirements-dev.txt has it)")

import khot  # noqa: E402

if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is set to something else than 1 and there is no GPU", allow_module_level=True)
DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"


def _kernels(name):
    """``khot._triton.<name>``, defined under the interpreter even if imported before this file."""
    module = importlib.import_module(f"khot._triton.{name}")
    compiled = [f for f in vars(module).values() if isinstance(f, triton.runtime.JITFunction)]
    if DEVICE == "cpu" and compiled:  # defined before TRITON_INTERPRET was set: define them again
        module = importlib.reload(module)
    return module


@pytest.fixture
def exact_kernels(monkeypatch):
    return _kernels("exact")


@pytest.fixture
def chunked(exact_kernels, monkeypatch):
    """Shrink the on-chip row length and the chunk, so that short rows take the multi-program path."""
    monkeypatch.setattr(exact_kernels, "ON_CHIP", 16)
    monkeypatch.setattr(exact_kernels, "CHUNK", 8)


def _reference(x, k, dim, largest, magnitude):
    """The k-hot mask by a stable sort (ties: lower index first; NaN above +inf; -0.0 == 0.0)."""
    key = x.movedim(dim, -1)
    if magnitude:
        key = key.double().abs() if not key.is_floating_point() else key.abs()
    key = key.double()  # exact for every dtype here but int64 (not sorted by this reference)
    order = torch.sort(key, dim=-1, descending=largest, stable=True).indices
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(key.shape[-1]).expand_as(order))
    kk = torch.as_tensor(k).unsqueeze(-1) if torch.is_tensor(k) else k
    return (ranks < kk).movedim(-1, dim)


def _specials(shape, dtype, generator):
    values = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 1.0, -1.0, 2.5, -3.0])
    return values[torch.randint(0, len(values), shape, generator=generator)].to(dtype)


def _same(a, b):
    """Equal bit for bit (NaNs of the same bits, -0.0 apart from 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _both(fn, *args, **kwargs):
    with khot.use_backend("triton"):
        got = fn(*args, **kwargs)
    with khot.use_backend("cpu"):
        want = fn(*args, **kwargs)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_masks_specials(exact_kernels, dtype):
    """NaN of both signs, ±inf, ±0 and ties; per-row k from 0 to n; both directions, magnitude."""
    g = torch.Generator().manual_seed(0)
    x = _specials((4, 13), dtype, g)
    k = torch.tensor([0, 3, 7, 13])
    for largest, magnitude in itertools.product([True, False], repeat=2):
        got, want = _both(khot.topk_mask, x, k, largest=largest, magnitude=magnitude)
        assert torch.equal(got, _reference(x, k, -1, largest, magnitude)), (largest, magnitude)
        assert torch.equal(got, want)
    got, want = _both(khot.keep_topk, x, k, largest=False, magnitude=True)
    assert _same(got, want)
    assert _same(got, torch.where(_reference(x, k, -1, False, True), x, torch.zeros((), dtype=dtype)))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8])
def test_masks_integers(exact_kernels, dtype):
    """Integer keys, the extremes included (|min| ranks above max with magnitude)."""
    info = torch.iinfo(dtype)
    values = torch.tensor([info.min, info.min + 1, info.max, 0, 1, 2, 7])
    x = values[torch.randint(0, len(values), (3, 11), generator=torch.Generator().manual_seed(1))].to(dtype)
    k = torch.tensor([1, 5, 11])
    for largest, magnitude in [(True, False), (False, False), (True, True)]:
        got, want = _both(khot.topk_mask, x, k, largest=largest, magnitude=magnitude)
        assert torch.equal(got, want), (largest, magnitude)
        if dtype != torch.int64:  # the float64 reference is exact below 2**53
            assert torch.equal(got, _reference(x, k, -1, largest, magnitude))


def test_masks_layouts(exact_kernels):
    """Any dim, a non-contiguous input, a scalar k, k = 0 and k = n."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-3, 4, (5, 2, 3), generator=g).float().transpose(0, 2)  # (3, 2, 5), non-contiguous
    for dim, k in [(1, 2), (0, 0), (2, 5), (-1, 3)]:
        got, want = _both(khot.topk_mask, x, k, dim)
        assert torch.equal(got, want) and torch.equal(got, _reference(x, k, dim % 3, True, False)), (dim, k)
    got, want = _both(khot.keep_topk, x, 2, 1, largest=False)
    assert _same(got, want) and got.stride() == want.stride()  # the layout compiled code expects


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masks_long_rows(exact_kernels, chunked, dtype):
    """Rows split across programs: histograms added atomically, ties counted across chunks."""
    x = _specials((2, 37), dtype, torch.Generator().manual_seed(3))
    k = torch.tensor([17, 30])
    got, want = _both(khot.topk_mask, x, k)
    assert torch.equal(got, want) and torch.equal(got, _reference(x, k, -1, True, False))
    got, want = _both(khot.keep_topk, x.t(), 9, 0, largest=False)  # dim 0 of a transposed view
    assert _same(got, want)


def test_select_topk(exact_kernels, chunked):
    """Indices written by the kernels straight from the selection, one program and several."""
    x = torch.randn(2, 37, 3)
    scores = torch.randint(0, 5, (2, 37)).float()
    scores[0, 3] = float("nan")
    for n, k in [(12, 5), (37, 20)]:  # one program per row, then chunks
        for sorted in (True, False):
            (values, got), (_, want) = _both(khot.select_topk, x[:, :n], scores[:, :n], k, sorted=sorted)
            assert torch.equal(got, want), (n, k, sorted)
            assert torch.equal(values, x[:, :n].gather(1, got.unsqueeze(-1).expand(-1, -1, 3)))


def _sigmoid_reference(x, k, tau):
    """The float64 solution by plain bisection of the threshold (200 halvings: to the last bit)."""
    x = x.double()
    lo = torch.full(x.shape[:-1], -1e4, dtype=torch.float64)
    hi = torch.full(x.shape[:-1], 1e4, dtype=torch.float64)
    for _ in range(200):
        mid = (lo + hi) / 2
        above = torch.sigmoid((x - mid.unsqueeze(-1)) / tau).sum(-1) > k
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return torch.sigmoid((x - lo.unsqueeze(-1)) / tau)


@pytest.fixture
def sigmoid_kernels():
    return _kernels("sigmoid")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets inf - inf on purpose
@pytest.mark.parametrize(
    "block, spread_below_rows, rounds",
    [(4096, 1024, 3), (16, 1024, 1), (16, 1, 3)],  # held in registers; spread over programs (then finished by one); read block by block
)
def test_sigmoid_forward(sigmoid_kernels, monkeypatch, block, spread_below_rows, rounds):
    """Within 2e-6 of the float64 solution (float32; float64: 1e-9, as |Σ p - k| <= 5e-10 max(1, k)); the same as the CPU path."""
    monkeypatch.setattr(sigmoid_kernels, "BLOCK", block)
    monkeypatch.setattr(sigmoid_kernels, "SPREAD_BELOW_ROWS", spread_below_rows)
    monkeypatch.setattr(sigmoid_kernels, "SPREAD_ROUNDS", rounds)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 40, generator=g)
    x[1, 5], x[1, 7] = float("inf"), -float("inf")
    k = torch.tensor([0.5, 6.0, 39.0])
    x[2, 3] = float("nan")  # a NaN makes its row NaN, as on the CPU
    got, want = _both(khot.sigmoid_topk, x, k)
    assert got[2].isnan().all() and not got[:2].isnan().any() and (got[:2] - want[:2]).abs().max() <= 2e-6
    assert want[2].isnan().all()
    x = x.nan_to_num(0.0, float("inf"), -float("inf"))
    cases = [(torch.float32, 2e-6), (torch.float64, 1e-9)]
    for dtype, tol in cases if block > 16 else cases[:1]:  # the interpreter is slow
        for tau in (1.0, 0.05) if block > 16 else (0.05,):
            got, want = _both(khot.sigmoid_topk, x.to(dtype), k.to(dtype), temperature=tau)
            assert (got.double() - _sigmoid_reference(x, k.double(), tau)).abs().max() <= tol, (dtype, tau)
            assert (got.double() - want.double()).abs().max() <= tol
    if block == 16:
        return
    # roots on a bound of the bracket: no float64 threshold reaches k = 11.9 (the best is Σ p = 12),
    # and the bound max(x) - logit(k / n) rounds onto 3e38, where Σ p = 11.5; the row must not end at 11
    limit = torch.tensor([[3e38, -3e38, 1e38, -1e38, 0.0, 2.9e38, -2.9e38, 5.0, -5.0, 1.0, 2e38, -2e38]])
    got, want = _both(khot.sigmoid_topk, limit, 11.9)
    assert abs(float(got.double().sum()) - 11.9) <= 0.4 + 1e-6 and torch.equal(got, want)
    got, want = _both(khot.sigmoid_topk, x[:2].bfloat16(), torch.tensor([0.0, 40.0]))  # k = 0 and k = n
    assert torch.equal(got, want) and torch.equal(got[0], torch.zeros(40, dtype=torch.bfloat16))
    got, want = _both(khot.sigmoid_topk, x.t().contiguous().t().half(), 3.0)  # a non-contiguous half input
    assert (got.float() - want.float()).abs().max() <= 1e-3 and got.stride() == want.stride()


@pytest.mark.parametrize("block", [4096, 16])  # one program per row; rows split across programs
def test_sigmoid_backward(sigmoid_kernels, monkeypatch, block):
    """grad_x = w (g - m) / τ and m = Σ w g / Σ w (w = p (1 - p); 0 on saturated rows), in float64."""
    monkeypatch.setattr(sigmoid_kernels, "BACKWARD_BLOCK", block)
    g = torch.Generator().manual_seed(6)
    r = torch.tensor([1.0, 20.0, 3.0], dtype=torch.float64)
    for dtype, tol in [(torch.float32, 2e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-1)]:
        p = torch.rand(3, 40, generator=g).to(dtype)
        p[2] = 1.0  # saturated: no gradient
        grad = torch.randn(3, 40, generator=g).to(dtype)
        grad_x, m = sigmoid_kernels.sigmoid_topk_backward(p, grad, r)
        w, gd = p.double() * (1 - p.double()), grad.double()
        m_want = (w * gd).sum(-1) / w.sum(-1).clamp(min=1e-300)
        assert grad_x.dtype == dtype and (m.double() - m_want).abs().max() <= 1e-6
        assert (grad_x.double() - w * (gd - m_want.unsqueeze(-1)) * r.unsqueeze(-1)).abs().max() <= tol, dtype
        assert not grad_x[2].any()


def test_sigmoid_gradient_through_the_kernels(sigmoid_kernels):
    """sigmoid_topk's forward and backward as the Function calls them (k and τ as numbers and as
    tensors): the kernels' gradients equal the CPU path's."""
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    g = torch.randn(3, 40, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def gradient(k, tau):
        xg = x.clone().requires_grad_()
        khot.sigmoid_topk(xg, k, temperature=tau).backward(g)
        return xg.grad

    for k, tau in [(5.5, 0.5), (torch.tensor([1.0, 5.5, 30.0], dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))]:
        got, want = _both(gradient, k, tau)
        assert (got - want).abs().max() <= 1e-8


@pytest.fixture
def router_kernels():
    return _kernels("router")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router(router_kernels, dtype):
    """Weights, indices and counts as the eager sequence (softmax or sigmoid, top k with ties to
    the lower expert, renormalise, count); indices also as torch.topk of the float64 scores."""
    from khot.nn._router_op import router_topk

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 24, generator=g).to(dtype)
    logits[0, :4] = 5.0  # tied best experts
    logits[2] = logits[2] - 200  # every sigmoid score underflows: renormalised in log space, no 0 / 0
    logits[3, :2] = torch.tensor([8.0, 7.0])  # both sigmoid scores round to 1.0 in bfloat16: ranked by the logits
    for softmax, renormalize in [(True, True), (False, False), (False, True)]:
        (w, i, c), (w0, i0, c0) = _both(router_topk, logits, 3, softmax, renormalize)
        assert torch.isfinite(w).all() and torch.isfinite(w0).all(), (softmax, renormalize)
        assert torch.equal(i, i0) and torch.equal(c, c0), (softmax, renormalize)
        assert torch.equal(i[3, :2], torch.tensor([0, 1]))
        assert torch.equal(c, torch.bincount(i.flatten(), minlength=24))
        torch.testing.assert_close(w, w0, rtol=1e-6 if dtype == torch.float32 else 2e-2, atol=0)  # bf16: a few ulps (eager rounds twice)
    scores = logits[1:].double().softmax(-1)
    if dtype == torch.float32:
        assert torch.equal(i[1:], torch.topk(scores.float(), 3).indices)
    assert torch.equal(i[0], torch.tensor([0, 1, 2]))


def test_router_gradient():
    from khot.nn._router_op import router_topk

    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: router_topk(z, 2, True, True)[0], (logits,))


def test_kernels_compile_for_a_gpu(tmp_path):
    """The GPU compiler is stricter than the interpreter: build some variants for sm_90 (no GPU
    needed; ``python -m khot._triton.check`` builds them all)."""
    names = ["exact row bf16 out=1", "exact chunk fp32 pass 5", "sigmoid fp32 one block=False", "router bf16"]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-m", "khot._triton.check", *names], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "4 kernel variants compile for GPUTarget(backend='cuda', arch=90, warp_size=32)"


def test_gpu_benchmark_without_a_gpu(capsys, monkeypatch):
    """benchmarks/gpu.py says why it cannot run, and its table rows are right."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", Path(__file__).parents[1] / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, gpu)
    spec.loader.exec_module(gpu)
    assert gpu.row(gpu.Cell("c", None, None, 10**9), 0.5, 2.0, 4000.0) == "| c | 0.500 | 2.000 | 4.00x | 2000 GB/s (50 % of copy) |"
    if not torch.cuda.is_available():
        assert gpu.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_opcheck_with_the_kernels(exact_kernels, sigmoid_kernels):
    """The kernels agree with the ops' fakes (shapes, dtypes, layouts)."""
    x = torch.randn(3, 12)
    cases = [
        (torch.ops.khot.topk_mask.default, (x.t(), 12, torch.tensor([1, 0, 12]), 0, True, False)),
        (torch.ops.khot.sigmoid_topk_forward.default, (x.t(), torch.full((12,), 2.0, dtype=torch.float64), torch.ones(12, dtype=torch.float64))),
    ]
    with khot.use_backend("triton"):
        for op, args in cases:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
