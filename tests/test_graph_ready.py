"""Every public op and module, the same way: meta tensors, torch.compile(fullgraph=True) with no
graph break and the eager result, and the portable (sync-free) backend forced on the CPU.

One table of calls drives all three, so a new public op is checked by adding one line.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import khot

G = 7  # seed of every generator here


def _router(score="softmax", differentiable=False):
    torch.manual_seed(G)
    return khot.nn.TopKRouter(8, 6, 2, score=score, differentiable=differentiable).train()


ROUTER, ROUTER_ST = _router(), _router("sigmoid", "straight_through")

# name -> (function of the inputs, inputs); each output a tensor or a tuple of tensors. A
# "gen" input is a seeded generator (None on meta tensors, which have none).
CALLS = {
    "topk_mask": (lambda x: khot.topk_mask(x, 3), ("x",)),
    "topk_mask(magnitude, dim=0)": (lambda x: khot.topk_mask(x, 2, 0, magnitude=True), ("x",)),
    "keep_topk": (lambda x: khot.keep_topk(x, 3), ("x",)),
    "select_topk": (lambda rows, s: khot.select_topk(rows, s, 3), ("rows", "s")),
    "sigmoid_topk": (lambda x: khot.sigmoid_topk(x, 2.5, temperature=0.5), ("x",)),
    "sample_khot": (lambda x, g: khot.sample_khot(x, 3, generator=g), ("x", "gen")),
    "pips_sample": (lambda pi, g: khot.pips_sample(pi, generator=g), ("pi", "gen")),
    "soft_select(halving)": (lambda rows, s: khot.soft_select(rows, s, 3), ("rows", "s")),
    "soft_select(iterative)": (lambda rows, s: khot.soft_select(rows, s, 3, method="iterative"), ("rows", "s")),
    "soft_select(counting)": (lambda rows, s: khot.soft_select(rows, s, 3, method="counting"), ("rows", "s")),
    "nn.TopK": (khot.nn.TopK(3), ("x",)),
    "nn.TopKActivation": (khot.nn.TopKActivation(3), ("x",)),
    "nn.SoftTopK": (khot.nn.SoftTopK(3), ("x",)),
    "nn.SoftSelect": (khot.nn.SoftSelect(3), ("rows", "s")),
    "nn.TokenPruning": (khot.nn.TokenPruning(4), ("tokens", "attn")),
    "nn.TopKRouter": (lambda t: tuple(ROUTER(t)), ("tokens8",)),
    "nn.TopKRouter(sigmoid, straight_through)": (lambda t: tuple(ROUTER_ST(t)), ("tokens8",)),
    "metrics.nccs": (lambda rows: khot.metrics.nccs(rows[..., :3, :], rows[..., 3:6, :]), ("rows",)),
}
for method in khot.methods():
    if method.mask is not None and not method.stochastic:
        CALLS[f"soft_topk({method.name})"] = (lambda x, m=method.name: khot.soft_topk(x, 3, method=m), ("x",))


SLOW_TO_GENERATE = {"soft_topk(soft)"}


def inputs(device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    made = {
        "x": torch.randn(4, 10, generator=g),
        "rows": torch.randn(2, 10, 5, generator=g),
        "s": torch.rand(2, 10, generator=g),
        "pi": torch.full((3, 8), 3 / 8),
        "tokens": torch.randn(2, 9, 6, generator=g),
        "attn": torch.rand(2, 3, 9, 9, generator=g).softmax(-1),
        "tokens8": torch.randn(12, 8, generator=g),
    }
    made = {name: t.to(device) for name, t in made.items()}
    made["gen"] = torch.Generator().manual_seed(G) if device == "cpu" else None
    return made


def _flat(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_meta_tensors(name):
    fn, names = CALLS[name]
    real, meta = inputs(), inputs("meta")
    for got, want in zip(_flat(fn(*(meta[n] for n in names))), _flat(fn(*(real[n] for n in names)))):
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype, name


@pytest.mark.parametrize("name", sorted(CALLS))
def test_compiles_whole_and_matches_eager(name):
    fn, names = CALLS[name]
    def args():  # samplers under compile take the global RNG (a generator cannot be traced), seeded alike
        torch.manual_seed(G)
        made = inputs()
        return [None if n == "gen" else made[n] for n in names]

    torch._dynamo.reset()
    assert torch._dynamo.explain(fn)(*args()).graph_break_count == 0, name
    # inductor, except where a long unrolled loop makes its code generation minutes long (Sinkhorn)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if name in SLOW_TO_GENERATE else "inductor")
    got_all = _flat(compiled(*args()))
    for got, want in zip(got_all, _flat(fn(*args()))):
        if got.dtype == torch.bool or not got.is_floating_point():
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_portable_backend_matches_the_cpu_path(name):
    fn, names = CALLS[name]
    with khot.use_backend("portable"):
        portable = _flat(fn(*[inputs()[n] for n in names]))
    for got, want in zip(portable, _flat(fn(*[inputs()[n] for n in names]))):
        if got.dtype == torch.bool or not got.is_floating_point():
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="name='gpu' is not a khot backend"):
        with khot.use_backend("gpu"):
            pass


@pytest.mark.parametrize("method", ["sigmoid", "sparse", "lapsum", "soft", "perturbed"])
def test_eager_twin_and_the_new_style_function_agree(method):
    # a plain eager call runs the old-style twin of each autograd.Function (khot._backend.apply);
    # torch.func.grad runs the new-style Function itself: same values, same gradients
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kwargs = {"generator": torch.Generator().manual_seed(5)} if method == "perturbed" else {}

    def loss(t):
        if method == "perturbed":
            kwargs["generator"].manual_seed(5)
        return (khot.soft_topk(t, 4, method=method, **kwargs) * w).sum()

    (eager,) = torch.autograd.grad(loss(x), x)
    functional = torch.func.grad(loss)(x.detach())
    torch.testing.assert_close(functional, eager, atol=1e-10, rtol=0)
    assert eager.abs().sum() > 0


BAD_CALLS = {  # invalid arguments: the error eager, the same compiled
    "k above n": lambda x: khot.sigmoid_topk(x, 11),
    "k not a count": lambda x: khot.topk_mask(x, 2.5),
    "temperature 0": lambda x: khot.soft_topk(x, 2, method="sparse", temperature=0.0),
    "dim out of range": lambda x: khot.keep_topk(x, 2, dim=5),
    "per-slice k above n": lambda x: khot.sigmoid_topk(x, torch.full((4,), 11.0)),
    "per-slice temperature 0": lambda x: khot.sigmoid_topk(x, 2, temperature=torch.zeros(4)),
    # checks whose checked tensor nothing uses afterwards (a compiled graph dropped them)
    "NaN logits": lambda x: khot.sampling.conditional_poisson_marginals(x.masked_fill(x > 1, math.nan), 2),
    "too few finite logits": lambda x: khot.sampling.conditional_poisson_marginals(x.masked_fill(x < 5, -math.inf), 2),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_invalid_arguments_raise_the_same_error_compiled(name):
    fn, x = BAD_CALLS[name], inputs()["x"]
    with pytest.raises((ValueError, TypeError)) as eager:
        fn(x)
    torch._dynamo.reset()
    with pytest.raises(type(eager.value), match=re.escape(str(eager.value))):
        torch.compile(fn, backend="aot_eager")(x)
    # fullgraph: an error in a Python argument is raised while tracing, where Dynamo reports any
    # exception as its own Unsupported carrying the message; errors in tensor values are raised
    # at run time, the same type as eager
    torch._dynamo.reset()
    with pytest.raises(Exception) as full:
        torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    assert str(eager.value) in str(full.value), name
