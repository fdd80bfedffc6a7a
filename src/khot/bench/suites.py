"""The four suites of ``khot bench``: what is measured, on which inputs, with which methods.

A suite is a list of default cells ``(batch, n, k)``, a dict of methods and one function
that measures one method on one cell and returns the CSV columns it fills (times and
quality). Budgets, skips and errors are the runner's business (:mod:`khot.bench.runner`).

=============  =====================================================================  ===============
suite          inputs and quality                                                     methods
=============  =====================================================================  ===============
``selection``  seed 002's grid: batch 16, d = 32, scores ~ U[0, 1], rows ~ U[-1, 1];   soft_select +
               nCCS of the k selected rows against the exact top-k rows               peers
``masks``      scores ~ N(0, 1), k = n / 10, n up to 10^6 (10^7 with ``--full``);     soft_topk +
               L1 distance to the exact k-hot mask / 2k, |Σ mask - k|, and for n      peers
               <= 128 the cosine between the gradient and a finite-difference one
``exact``      scores ~ N(0, 1); khot's exact ops against torch.topk + scatter        khot.topk_mask,
                                                                                      keep_topk
``sampling``   π = sigmoid top-k of N(0, 1) scores; max |P(i drawn) - π_i| from       pips_sample
               up to 20000 draws of one slice (and as a z-score: ~3-4 is sampling     designs
               noise), time of one draw of the batch
=============  =====================================================================  ===============
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import khot
from khot.metrics import nccs
from khot.relaxed import MASK_METHODS, SELECT_METHODS
from khot.sampling import DESIGNS, pips_sample

from . import peers
from .measure import baseline_keep, baseline_mask, median_ms, peak_mib

__all__ = ["Cell", "Method", "Settings", "Suite", "SUITES", "TooSlow", "problem"]

D = 32  # row width of the selection suite (seed 002)
GRAD_MAX_N = 128  # largest n whose gradient is checked against finite differences (2n calls)
BASE_20 = 1 / math.log(20)  # halving at the paper's base 20


@dataclass(frozen=True)
class Cell:
    """One input size: ``batch`` independent slices of ``n`` items, ``k`` of them selected."""

    batch: int
    n: int
    k: int


@dataclass(frozen=True)
class Method:
    """A method as a suite calls it.

    ``source`` is ``"khot"``, ``"torch"`` or the peer's package; ``work(cell)`` is
    proportional to its cost (to predict the time of a bigger cell from a smaller one);
    ``memory(batch, n, k)`` estimates its bytes where that can exceed the machine;
    ``baseline`` names the reference method its time is compared with; a ``reference``
    is timed but not ranked.
    """

    fn: Callable
    source: str = "khot"
    work: Callable[[Cell], float] = lambda c: c.batch * c.n
    memory: Callable[[int, int, int], float] | None = None
    baseline: str | None = None
    reference: bool = False


@dataclass(frozen=True)
class Settings:
    """How to measure: device, dtype, seed, timing effort and the per-cell budgets."""

    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    min_run_time: float = 0.1
    budget_s: float = 2.0
    memory_bytes: float = 2 * 2**30


class TooSlow(Exception):
    """One call took longer than the per-cell budget."""

    def __init__(self, seconds: float):
        super().__init__(f"{seconds:.1f} s per call")
        self.seconds = seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_s(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_ms(fn: Callable[[], object], s: Settings) -> float:
    """Median ms of ``fn()``; raises :class:`TooSlow` when its first call and a second one
    (the first may pay one-time set-up costs) both exceed the budget."""
    first = _call_s(fn, s.device)
    if first > s.budget_s and (first := _call_s(fn, s.device)) > s.budget_s:
        raise TooSlow(first)
    return median_ms(fn, 0 if first >= s.min_run_time else s.min_run_time)


def _generator(s: Settings) -> torch.Generator:
    return torch.Generator(s.device).manual_seed(s.seed)


def _fwd_bwd(fn: Callable, inputs: tuple[torch.Tensor, ...], s: Settings) -> dict:
    """Forward and forward + backward ms of ``fn(*inputs)`` (gradient for the first input, when
    the output is floating point), and the peak memory of the slower of the two."""
    frozen = [t.detach() for t in inputs]
    out = {"fwd_ms": time_ms(lambda: fn(*frozen), s)}
    y = fn(*frozen)
    call = lambda: fn(*frozen)  # noqa: E731
    if y.is_floating_point():
        g = torch.randn(y.shape, generator=_generator(s), device=s.device).to(y.dtype)
        leaves = [frozen[0].clone().requires_grad_(), *frozen[1:]]
        call = lambda: fn(*leaves).backward(g)  # noqa: E731
        out["fwd_bwd_ms"] = time_ms(call, s)
    return {**out, "peak_mib": peak_mib(call, s.device)}


# ----------------------------------------------------------------------------- selection


def problem(n: int, k: int, batch: int = 16, d: int = D, seed: int = 0, device="cpu", dtype=torch.float32):
    """Seed 002's problem: rows ``(batch, n, d)`` ~ U[-1, 1], scores ~ U[0, 1] and the exact top-k rows."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(batch, n, generator=g)
    x = torch.rand(batch, n, d, generator=g) * 2 - 1
    top = x.gather(1, s.topk(k, dim=-1).indices[..., None].expand(-1, -1, d))
    return tuple(t.to(device, dtype) for t in (x, s, top))


def _selection_methods() -> dict[str, Method]:
    works = {"halving": lambda c: c.batch * c.n * D, "iterative": lambda c: c.batch * c.n * c.k * D}
    works["counting"] = lambda c: c.batch * c.n * (c.n + c.k * D)
    out = {name: Method(fn, work=works[name]) for name, (fn, _) in SELECT_METHODS.items()}
    halving = SELECT_METHODS["halving"][0]
    out["halving-base20"] = Method(lambda x, s, k: halving(x, s, k, temperature=BASE_20), work=works["halving"])
    for name, (package, fn, memory) in peers.select_methods().items():
        out[name] = Method(fn, package, lambda c: c.batch * c.n * c.n * D, memory)
    return out


def _measure_selection(method: Method, cell: Cell, s: Settings) -> dict:
    x, scores, top = problem(cell.n, cell.k, cell.batch, seed=s.seed, device=s.device, dtype=s.dtype)
    times = _fwd_bwd(lambda sc, rows: method.fn(rows, sc, cell.k), (scores, x), s)
    return {**times, "nccs": nccs(method.fn(x, scores, cell.k), top).mean().item(), "d": D}


# ----------------------------------------------------------------------------- masks


def _masks_methods() -> dict[str, Method]:
    works = {
        "sigmoid": lambda c: c.batch * c.n,
        "halving": lambda c: c.batch * c.n * math.log2(c.n),
        "iterative": lambda c: c.batch * c.n * c.k,
        "counting": lambda c: c.batch * c.n * c.n,
    }
    out = {
        name: Method(lambda x, k, f=fn, t=t: f(x, k, -1, temperature=t), work=works[name], baseline="softmax")
        for name, (fn, t) in MASK_METHODS.items()
    }
    # sigmoid top-k also at halving's default sharpness: both weigh sigmoid(score difference / τ)
    sigmoid, sharp = MASK_METHODS["sigmoid"][0], MASK_METHODS["halving"][1]
    out[f"sigmoid-t{sharp}"] = Method(
        lambda x, k: sigmoid(x, k, -1, temperature=sharp), work=works["sigmoid"], baseline="softmax"
    )
    for name, (package, fn, memory) in peers.mask_methods().items():
        work = (lambda c: c.batch * c.n * c.n * math.log2(c.n) ** 2) if memory else works["sigmoid"]
        out[name] = Method(fn, package, work, memory, baseline="softmax")
    out["torch-topk"] = Method(lambda x, k: baseline_mask(x, k, -1), "torch", reference=True)
    out["softmax"] = Method(lambda x, k: torch.softmax(x, -1), "torch", reference=True)
    return out


def _finite_difference_cosine(fn: Callable, x: torch.Tensor, k: int, s: Settings) -> float:
    """Cosine between autograd's gradient of ``<g, fn(x, k)>`` and central differences, in float64."""
    x = x.detach().double()
    g = torch.randn(x.shape, generator=_generator(s), device=x.device, dtype=x.dtype)
    leaf = x.clone().requires_grad_()
    (fn(leaf, k) * g).sum().backward()
    eps, numeric = 1e-6, torch.empty_like(x)
    for i in range(x.shape[-1]):  # column i of every row at once: the rows are independent
        step = torch.zeros_like(x)
        step[:, i] = eps
        numeric[:, i] = ((fn(x + step, k) - fn(x - step, k)) * g).sum(-1) / (2 * eps)
    return F.cosine_similarity(leaf.grad.flatten(), numeric.flatten(), dim=0).item()


def _measure_masks(method: Method, cell: Cell, s: Settings) -> dict:
    x = torch.randn(cell.batch, cell.n, generator=_generator(s), device=s.device).to(s.dtype)
    out = {**_fwd_bwd(lambda z: method.fn(z, cell.k), (x,), s)}
    if method.reference:
        return out
    m = method.fn(x, cell.k).float()
    exact = khot.topk_mask(x, cell.k).float()
    out["mask_l1"] = ((m - exact).abs().sum(-1) / (2 * cell.k)).mean().item()
    out["sum_err"] = (m.sum(-1) - cell.k).abs().mean().item()
    if cell.n <= GRAD_MAX_N and 2 * cell.n * out["fwd_ms"] / 1e3 <= s.budget_s:  # 2n calls
        try:
            out["grad_cos"] = _finite_difference_cosine(method.fn, x, cell.k, s)
        except RuntimeError:  # no float64 path (e.g. a peer's float32 network)
            pass
    return out


# ----------------------------------------------------------------------------- exact


def _exact_methods() -> dict[str, Method]:
    return {
        "topk_mask": Method(khot.topk_mask, baseline="torch-topk-mask"),
        "keep_topk": Method(khot.keep_topk, baseline="torch-topk-keep"),
        "torch-topk-mask": Method(lambda x, k: baseline_mask(x, k, -1), "torch", reference=True),
        "torch-topk-keep": Method(lambda x, k: baseline_keep(x, k, -1), "torch", reference=True),
    }


def _measure_exact(method: Method, cell: Cell, s: Settings) -> dict:
    x = torch.randn(cell.batch, cell.n, generator=_generator(s), device=s.device).to(s.dtype)
    out = _fwd_bwd(lambda z: method.fn(z, cell.k), (x,), s)
    kept = method.fn(x, cell.k) != 0
    out["mask_l1"] = ((kept != khot.topk_mask(x, cell.k)).sum(-1) / (2 * cell.k)).float().mean().item()
    return out


# ----------------------------------------------------------------------------- sampling


def _gumbel_topk(pi: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gumbel top-k on ``log π``: k draws without replacement, NOT a πps design (a contrast)."""
    u = torch.rand(pi.shape, generator=generator, device=pi.device, dtype=pi.dtype).clamp_min(1e-20)
    k = round(pi[0].sum().item())
    return khot.topk_mask(pi.log() - (-u.log()).log(), k).to(pi.dtype)


def _sampling_methods() -> dict[str, Method]:
    out = {
        design: Method(lambda pi, g, d=design: pips_sample(pi, design=d, generator=g), baseline="torch-sort")
        for design in DESIGNS
    }
    out["brewer"] = Method(out["brewer"].fn, work=lambda c: c.batch * c.n * c.k, baseline="torch-sort")
    out["gumbel-topk"] = Method(_gumbel_topk, "torch", baseline="torch-sort")
    out["torch-sort"] = Method(lambda pi, g: torch.sort(pi, -1), "torch", reference=True)
    return out


def _measure_sampling(method: Method, cell: Cell, s: Settings) -> dict:
    gen = _generator(s)
    pi = khot.sigmoid_topk(torch.randn(cell.batch, cell.n, generator=gen, device=s.device), cell.k).to(s.dtype)
    out = {"fwd_ms": time_ms(lambda: method.fn(pi, gen), s), "peak_mib": peak_mib(lambda: method.fn(pi, gen), s.device)}
    if method.reference:
        return out
    # as many draws of one slice as fit in the budget (one draw costs about a row of the timed batch)
    draws = min(20_000, 10**7 // cell.n, int(s.budget_s / (out["fwd_ms"] / 1e3 / cell.batch)))
    if draws < 100:
        return out
    row, size = pi[0].double(), max(1, 10**6 // cell.n)
    chunks = [min(size, draws - i) for i in range(0, draws, size)]
    freq = sum(method.fn(pi[:1].expand(c, -1).contiguous(), gen).double().sum(0) for c in chunks)
    err = (freq / draws - row).abs()
    noise = (row * (1 - row) / draws).sqrt().clamp_min(1 / draws)
    return {**out, "incl_err": err.max().item(), "incl_z": (err / noise).max().item(), "draws": draws}


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Suite:
    """A suite: its default and ``--full`` cells, its methods and its measuring function.

    ``quality`` is its headline quality column and whether higher is better; ``time`` the
    time column it ranks by; ``metrics`` all its quality columns; ``by`` what its summary
    groups the cells by (``"n"`` or ``"n/k"``).
    """

    title: str
    cells: tuple[Cell, ...]
    full: tuple[Cell, ...]
    methods: Callable[[], dict[str, Method]]
    measure: Callable[[Method, Cell, Settings], dict]
    quality: tuple[str, bool]
    time: str = "fwd_bwd_ms"
    metrics: tuple[str, ...] = ()
    by: str = "n"


def _grid(ns, ks, batch: int) -> tuple[Cell, ...]:
    return tuple(Cell(batch, 2**i, 2**j) for i in ns for j in ks if 2**j < 2**i)


SUITES: dict[str, Suite] = {
    "selection": Suite(
        "Relaxed selection of k rows (successive-halving grid)",
        _grid((4, 7, 10, 12, 14), (1, 3, 6, 9), 16),
        _grid(range(4, 15), range(1, 12), 16),
        _selection_methods,
        _measure_selection,
        ("nccs", True),
        metrics=("nccs",),
        by="n/k",
    ),
    "masks": Suite(
        "Relaxed k-hot masks, k = n/10 (sigmoid top-k scalability)",
        tuple(Cell(4, 10**e, 10 ** (e - 1)) for e in range(2, 7)),
        tuple(Cell(4, 10**e, 10 ** (e - 1)) for e in range(2, 8)),
        _masks_methods,
        _measure_masks,
        ("mask_l1", False),
        metrics=("mask_l1", "sum_err", "grad_cos"),
    ),
    "exact": Suite(
        "Exact top-k against torch.topk + scatter",
        (Cell(256, 4096, 32), Cell(4096, 64, 8), Cell(16, 50_000, 500)),
        (Cell(4096, 32768, 64), Cell(65536, 64, 8), Cell(64, 131072, 16384), Cell(8, 10**6, 1000)),
        _exact_methods,
        _measure_exact,
        ("mask_l1", False),
        time="fwd_ms",
        metrics=("mask_l1",),
    ),
    "sampling": Suite(
        "k-hot sampling (πps designs)",
        (Cell(64, 1000, 10), Cell(64, 10_000, 100)),
        (Cell(64, 1000, 10), Cell(64, 10_000, 100), Cell(64, 10_000, 1000), Cell(64, 100_000, 100)),
        _sampling_methods,
        _measure_sampling,
        ("incl_z", False),
        time="fwd_ms",
        metrics=("incl_z", "incl_err"),
    ),
}
