"""The exact ops' backends and graph readiness: the portable path forced on CPU against the tuned
CPU path (bit for bit) and against a pure-Python reference; meta tensors; torch.compile with no
graph break; vmap; torch.library.opcheck; the same errors compiled as eager (issues 10 and 11)."""

from __future__ import annotations

import math

import pytest
import torch

import khot
from khot.exact import _keep_topk_op, _select_topk_op, _topk_mask_op

NAN, INF = float("nan"), float("inf")


def python_mask(x, k, dim=-1, largest=True, magnitude=False):
    """Independent reference: Python's stable ``sorted`` over every slice, on Python numbers (no
    overflow, -0.0 == 0.0), NaN first when largest, last otherwise."""
    moved = x.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1]).tolist()
    ks = [k] * len(rows) if isinstance(k, int) else k.reshape(-1).tolist()
    out = []
    for row, kk in zip(rows, ks):
        def key(i):
            v = abs(row[i]) if magnitude else row[i]
            nan = isinstance(v, float) and math.isnan(v)
            return (0, 0) if nan and largest else (2, 0) if nan else (1, -v if largest else v)

        chosen = set(sorted(range(len(row)), key=key)[:kk])
        out.append([i in chosen for i in range(len(row))])
    return torch.tensor(out, dtype=torch.bool).reshape(moved.shape).movedim(-1, dim)


def bits(t):
    """A tensor's bit pattern, so that -0.0 differs from 0.0; every NaN as one pattern (ATen's
    gather and where do not all keep a NaN's payload and sign, and the rules rank all NaNs alike)."""
    if t.dtype == torch.bool or not t.is_floating_point():
        return t
    view = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return view.masked_fill(t.isnan(), torch.iinfo(view.dtype).max)  # itself a NaN pattern: no collision


def adversarial(gen, shape, kind, dtype):
    if kind == "ties":
        x = torch.randint(-2, 3, shape, generator=gen).double()
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if not dtype.is_floating_point:
        return (x * 3).to(dtype)
    if kind == "special":  # NaN of both signs, ±inf, ±0
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        x = torch.where(u < 0.1, NAN, x)
        x = torch.where((u >= 0.1) & (u < 0.15), -NAN, x)
        x = torch.where((u >= 0.15) & (u < 0.25), INF, x)
        x = torch.where((u >= 0.25) & (u < 0.35), -INF, x)
        x = torch.where((u >= 0.35) & (u < 0.45), 0.0, x)
        x = torch.where((u >= 0.45) & (u < 0.55), -0.0, x)
    return x.to(dtype)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8]


def both_backends(fn):
    with khot.use_backend("cpu"):
        cpu = fn()
    with khot.use_backend("portable"):
        portable = fn()
    return cpu, portable, fn()  # the last: the plain eager call (the CPU path run directly)


def check_paths(x, k, dim, largest, magnitude, reference=True):
    for op in (khot.topk_mask, khot.keep_topk):
        cpu, portable, direct = both_backends(lambda: op(x, k, dim, largest=largest, magnitude=magnitude))
        assert torch.equal(bits(portable), bits(cpu)) and torch.equal(bits(direct), bits(cpu))
    mask = khot.topk_mask(x, k, dim, largest=largest, magnitude=magnitude)
    if reference:
        assert torch.equal(mask, python_mask(x, k, dim, largest, magnitude))
    zero = torch.zeros((), dtype=x.dtype)
    assert torch.equal(bits(cpu), bits(torch.where(mask, x, zero)))  # keep_topk: x on the mask, +0 elsewhere


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_portable_equals_cpu_path_and_reference(dtype, kind):
    """Issue 11 item 2: the portable path, forced on CPU, gives the CPU path's result bit for bit,
    and both give the reference's, over ties, NaN (either sign), ±inf, ±0, every dtype, per-slice
    k, k = 0 and k = n, negative dims and non-contiguous layouts."""
    if kind == "special" and not dtype.is_floating_point:
        pytest.skip("NaN, inf and -0.0 need a floating dtype")
    gen = torch.Generator().manual_seed(hash((str(dtype), kind)) % 2**31)
    for shape, dim in [((5, 9), -1), ((4, 3, 6), 1), ((7, 5), -2), ((13,), 0)]:
        x = adversarial(gen, shape, kind, dtype)
        n = x.shape[dim]
        batch = x.movedim(dim, -1).shape[:-1]
        for k in (0, 1, 3, n - 1, n, torch.randint(0, n + 1, batch, generator=gen)):
            for largest in (True, False):
                for magnitude in (False, True):
                    check_paths(x, k, dim, largest, magnitude)
    wide = adversarial(gen, (9, 20), kind, dtype)[:, ::2].T  # non-contiguous (10, 9)
    assert not wide.is_contiguous()
    check_paths(wide, 4, 0, True, False)
    check_paths(wide, torch.randint(0, 10, (10,), generator=gen), -1, False, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_portable_equals_cpu_path_on_long_rows(dtype):
    """The CPU path's chunked candidates (rows >= 4096) and its k = n / 64 tie count."""
    gen = torch.Generator().manual_seed(11)
    for kind in ("random", "ties", "special"):
        x = adversarial(gen, (3, 8192), kind, dtype)
        for k in (1, 37, 128, torch.tensor([0, 50, 8192])):
            for largest in (True, False):
                check_paths(x, k, -1, largest, False, reference=False)
                assert torch.equal(khot.topk_mask(x, k, largest=largest).sum(-1), torch.as_tensor(k).expand(3))


def test_select_topk_backends_agree_with_stable_sort():
    gen = torch.Generator().manual_seed(2)
    for kind in ("ties", "special"):
        scores = adversarial(gen, (3, 4, 11), kind, torch.float32)
        x = torch.randn(3, 4, 11, 2, generator=gen)
        for k in (0, 1, 5, 11):
            for sorted_ in (True, False):
                cpu, portable, direct = both_backends(lambda: khot.select_topk(x, scores, k, sorted=sorted_)[1])
                assert torch.equal(portable, cpu) and torch.equal(direct, cpu)
            # descending stable sort (NaN first, -0.0 ties with 0.0, ties in index order)
            expected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
            assert torch.equal(khot.select_topk(x, scores, k)[1], expected)


def test_meta_tensors():
    """Issue 10: every exact op and module works on meta tensors (right shape, dtype, device)."""
    x = torch.empty(6, 10, device="meta", dtype=torch.bfloat16)
    k = torch.empty(6, device="meta", dtype=torch.long)
    for out in (khot.topk_mask(x, 3), khot.topk_mask(x, k), khot.topk_mask(x, 2, 0, magnitude=True)):
        assert out.shape == x.shape and out.dtype == torch.bool and out.device.type == "meta"
    out = khot.keep_topk(x, 3, largest=False)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device.type == "meta"
    values, indices = khot.select_topk(torch.empty(6, 10, 4, device="meta"), x, 3)
    assert values.shape == (6, 3, 4) and indices.shape == (6, 3) and indices.dtype == torch.long
    for layer in (khot.nn.TopK(3), khot.nn.TopKActivation(3), khot.nn.BatchTopK(3).to("meta")):
        assert layer(x).shape == x.shape and layer(x).device.type == "meta"
    values, indices = khot.nn.TopKActivation(3, dense=False)(x)
    assert values.shape == indices.shape == (6, 3)
    assert khot.nn.BatchTopK(2).to("meta").eval()(x).shape == x.shape


def explain_and_compare(fn, *args):
    assert torch._dynamo.explain(fn)(*args).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, expected = compiled(*args), fn(*args)
    for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, expected))):
        assert torch.equal(bits(a), bits(b))


def test_compile_fullgraph_no_graph_break_and_bit_exact():
    """Issue 11 item 1: 0 graph breaks and compiled == eager, bit for bit, for every op and module."""
    gen = torch.Generator().manual_seed(5)
    x = adversarial(gen, (6, 50), "special", torch.float32)
    k = torch.randint(0, 51, (6,), generator=gen)
    explain_and_compare(lambda t: khot.topk_mask(t, 7, largest=False), x)
    explain_and_compare(lambda t, kk: khot.topk_mask(t, kk, -1), x, k)
    explain_and_compare(lambda t: khot.keep_topk(t, 4, 0, magnitude=True), x)
    explain_and_compare(lambda t: khot.select_topk(t.unsqueeze(-1), t, 5), x)
    explain_and_compare(lambda t: khot.select_topk(t.unsqueeze(-1), t, 5, sorted=False), x)
    for layer in (khot.nn.TopK(4), khot.nn.TopKActivation(4), khot.nn.TopKActivation(4, dense=False)):
        explain_and_compare(layer, x.nan_to_num())
    batch = khot.nn.BatchTopK(3)
    explain_and_compare(batch, x.nan_to_num())  # training: the batch rule and the threshold update
    explain_and_compare(batch.eval(), x.nan_to_num())  # eval: the threshold rule, no sync to choose it


def test_compile_gradient_of_keep_topk():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 9, dtype=torch.float64)
    compiled = torch.compile(lambda t: (khot.keep_topk(t, 3) * w).sum(), fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(x), x)
    assert torch.equal(grad, torch.where(python_mask(x.detach(), 3), w, 0.0))


def test_keep_topk_gradient_through_the_op():
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    ks = torch.tensor([0, 2, 8, 1, 5])
    with khot.use_backend("portable"):
        torch.autograd.gradcheck(lambda t: khot.keep_topk(t, 3, 0, magnitude=True), (x,))
        torch.autograd.gradcheck(lambda t: khot.keep_topk(t, ks), (x,))
    # the op's own registered gradient (public calls with a gradient take where(mask) instead)
    torch.autograd.gradcheck(lambda t: _keep_topk_op(t, 3, None, 0, True, True), (x,))
    torch.autograd.gradcheck(lambda t: _keep_topk_op(t, 8, ks, 1, False, False), (x,))


def test_vmap_matches_a_loop():
    gen = torch.Generator().manual_seed(8)
    x = adversarial(gen, (4, 3, 10), "ties", torch.float32)
    k = torch.randint(0, 11, (4, 3), generator=gen)
    vmap = torch.func.vmap
    loop = torch.stack([khot.topk_mask(t, 4, 0, largest=False) for t in x.unbind(1)], 1)
    assert torch.equal(vmap(lambda t: khot.topk_mask(t, 4, 0, largest=False), in_dims=1, out_dims=1)(x), loop)
    loop = torch.stack([khot.keep_topk(t, kk) for t, kk in zip(x, k)])
    assert torch.equal(vmap(lambda t, kk: khot.keep_topk(t, kk))(x, k), loop)
    loop = torch.stack([khot.select_topk(t.unsqueeze(-1), t, 3)[1] for t in x])
    assert torch.equal(vmap(lambda t: khot.select_topk(t.unsqueeze(-1), t, 3)[1])(x), loop)
    grads = torch.func.vmap(torch.func.grad(lambda t: khot.keep_topk(t, 2, magnitude=True).sum()))(x)
    assert torch.equal(grads, python_mask(x, 2, magnitude=True).float())


@pytest.mark.parametrize("op", [_topk_mask_op, _keep_topk_op])
def test_opcheck_slices_ops(op):
    gen = torch.Generator().manual_seed(4)
    x = adversarial(gen, (3, 7), "ties", torch.float64)
    ks = torch.tensor([0, 3, 7])
    for args in [(x, 2, None, 1, True, False), (x, 7, ks, 1, False, True), (x.T, 1, None, 0, True, False), (x.T, 3, torch.tensor([0, 1, 2, 3, 3, 2, 1]), 1, True, True)]:
        torch.library.opcheck(op, args)
    torch.library.opcheck(op, (x.clone().requires_grad_(), 2, None, 1, True, False))


def test_opcheck_select_op():
    scores = torch.randint(0, 3, (2, 3, 8)).float()
    for k, sorted_ in ((3, True), (0, False), (8, False)):
        torch.library.opcheck(_select_topk_op, (scores, k, sorted_))


@pytest.mark.parametrize("mode", ["compile", "vmap"])
def test_bad_k_raises_the_eager_error_compiled_and_vmapped(mode):
    """Issue 10: k = 99 of n = 8 (or k = -3) used to pass silently under torch.compile and vmap."""
    x = torch.randn(3, 8)
    for bad in (torch.tensor([1, 99, 2]), torch.tensor([-3, 1, 1])):
        fn = lambda t, kk: khot.topk_mask(t, kk)  # noqa: E731
        with pytest.raises(ValueError) as eager:
            fn(x, bad)
        if mode == "compile":
            run = torch.compile(fn, fullgraph=True, backend="aot_eager")
            with pytest.raises(ValueError) as other:
                run(x, bad)
        else:
            with pytest.raises(ValueError) as other:
                torch.func.vmap(lambda t, kk: khot.keep_topk(t, kk))(x, bad)
        assert str(eager.value) in str(other.value)
    if mode == "compile":  # an int k is checked while tracing: the eager error, or (fullgraph) one quoting it
        message = r"k=99 is out of range: expected 0 <= k <= 8"
        with pytest.raises(ValueError, match=message):
            torch.compile(lambda t: khot.topk_mask(t, 99), backend="aot_eager")(x)
        with pytest.raises(Exception, match=message):
            torch.compile(lambda t: khot.topk_mask(t, 99), fullgraph=True, backend="aot_eager")(x)


def test_batch_topk_eval_rule_follows_training_and_state_dict():
    x = torch.tensor([[5.0, 4.0, 3.0, 0.1], [0.2, 0.3, -1.0, 0.0]])
    fresh = khot.nn.BatchTopK(2).eval()
    assert torch.equal(fresh(x), torch.where(python_mask(x.reshape(-1), 4).view(2, 4), x, 0).relu())  # batch rule
    trained = khot.nn.BatchTopK(2)
    trained(x)
    assert float(trained.threshold) == pytest.approx(0.3)
    assert torch.equal(trained.eval()(x), torch.where(x > 0.3, x, 0.0))
    loaded = khot.nn.BatchTopK(2).eval()
    loaded.load_state_dict(trained.state_dict())
    assert torch.equal(loaded(x), torch.where(x > 0.3, x, 0.0))
    loaded.load_state_dict(khot.nn.BatchTopK(2).state_dict())  # a NaN threshold: back to the batch rule
    assert torch.equal(loaded(x), fresh(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_short_rows_small_k_rounds_of_max(dtype):
    """Issue 11 item 3: short rows with k <= 4 take rounds of max on the CPU (ATen's topk is slow
    there); the dtype's extreme values, which those rounds write over taken entries, and ties
    among them must not confuse it."""
    gen = torch.Generator().manual_seed(6)
    if dtype.is_floating_point:
        pool = torch.tensor([-INF, INF, -INF, 0.0, 1.0, 1.0, NAN], dtype=torch.float64).to(dtype)
    else:
        info = torch.iinfo(dtype)
        pool = torch.tensor([info.min, info.max, info.min, 0, 1, 1], dtype=dtype)
    x = pool[torch.randint(0, len(pool), (64, 6), generator=gen)]
    for k in (1, 2, 3, 4):
        for largest in (True, False):
            check_paths(x, k, -1, largest, False)
