"""The five suites of ``khot bench``: what is measured, on which inputs, with which methods.

A suite is a list of default cells ``(batch, n, k)``, a dict of methods and one function
that measures one method on one cell and returns the CSV columns it fills (times and
quality). Budgets, skips and errors are the runner's business (:mod:`khot.bench.runner`).

=============  =====================================================================  ===============
suite          inputs and quality                                                     methods
=============  =====================================================================  ===============
``selection``  successive halving's grid: batch 16, d = 32, scores ~ U[0, 1], rows ~ U[-1, 1];   soft_select +
               nCCS of the k selected rows against the exact top-k rows               peers
``masks``      scores ~ N(0, 1), k = n / 10, n up to 10^6 (10^7 with ``--full``),     khot.methods()
               each method at the temperature where its mask is 0.3, 0.1, 0.03        + peers
               from the exact one (L1 / 2k); time, |Σ mask - k|, the cosine of
               its gradient with finite differences (16 items, all with
               ``--full``, n <= 128) and with the gradient of the exact mask
               smoothed to that level (Monte Carlo, with its standard error;
               n <= 1000)
``exact``      scores ~ N(0, 1); khot's exact ops against torch.topk + scatter        khot.topk_mask,
                                                                                      keep_topk
``sampling``   π = sigmoid top-k of N(0, 1) scores; from up to 2000 draws of one      pips_sample
               slice (20000 with ``--full``), the chi-square p-value of the inclusion designs
               frequencies against π (an exact design gives p ~ U(0, 1)),
               max |P(i drawn) - π_i|, its standard error and z-score; time of one
               draw of the batch
``tasks``      small models trained through each relaxation and the sampler, same     mask methods +
               seeds and steps (:mod:`khot.bench.tasks`); test metric, mean ± sd      baselines
=============  =====================================================================  ===============
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import khot
from khot.metrics import nccs
from khot.sampling import DESIGNS, pips_sample

from . import peers
from .measure import baseline_keep, baseline_mask, peak_mib

__all__ = ["Cell", "Method", "Settings", "Suite", "SUITES", "TooSlow", "problem"]

D = 32  # row width of the selection suite (the successive-halving paper's)
LEVELS = (0.3, 0.1, 0.03)  # the sharpness levels of the masks suite: L1 to the exact mask / 2k
GRAD_MAX_N = 128  # largest n whose gradient is checked against finite differences
FD_COLUMNS = 16  # items checked by finite differences (2 calls each), all n of them with --full
BASE_20 = 1 / math.log(20)  # halving at the paper's base 20


@dataclass(frozen=True)
class Cell:
    """One input size: ``batch`` independent slices of ``n`` items, ``k`` of them selected.

    ``level``, where a suite uses it, is the sharpness every relaxation is matched to (its
    mask's L1 distance to the exact mask / 2k); ``task`` names a task of the ``tasks`` suite.
    """

    batch: int
    n: int
    k: int
    level: float | None = None
    task: str | None = None


@dataclass(frozen=True)
class Method:
    """A method as a suite calls it.

    ``source`` is ``"khot"``, ``"torch"`` or the peer's package; ``work(cell)`` is
    proportional to its cost (to predict the time of a bigger cell from a smaller one);
    ``memory(batch, n, k)`` estimates its bytes where that can exceed the machine;
    ``baseline`` names the reference method its time is compared with; a ``reference``
    is timed but not ranked; ``tempered(x, k, temperature)`` is the method at a chosen
    sharpness (relaxed masks); a ``stochastic`` method's backward is an estimator, not the
    derivative of its (seeded) forward, so it gets no finite-difference check.
    """

    fn: Callable
    source: str = "khot"
    work: Callable[[Cell], float] = lambda c: c.batch * c.n
    memory: Callable[[int, int, int], float] | None = None
    baseline: str | None = None
    reference: bool = False
    tempered: Callable | None = None
    stochastic: bool = False


@dataclass(frozen=True)
class Settings:
    """How to measure: device, dtype, seed, timing effort, the per-cell budgets and the effort of
    the Monte-Carlo checks and training runs."""

    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    min_run_time: float = 0.05
    budget_s: float = 2.0
    memory_bytes: float = 2 * 2**30
    full: bool = False  # ``--full``: more draws of the samplers, longer training in the tasks suite


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


def time_ms(fn: Callable[[], object], s: Settings, first: float | None = None, peak: bool = False):
    """Median ms of ``fn()`` (and, with ``peak``, the peak MiB of one call).

    ``first``: the seconds of a call just made (it paid the one-time set-up costs, so it is not
    timed again); otherwise one such call is made here. A call that took ``s.min_run_time`` or
    more is timed once more (that call also gives the peak memory); a faster one in blocks of
    calls for ``s.min_run_time`` seconds (:meth:`torch.utils.benchmark.Timer.blocked_autorange`),
    and its peak memory from one more call. Raises :class:`TooSlow` when the first call and the
    timed one both exceed the budget.
    """
    if first is None:
        first = _call_s(fn, s.device)
    if first >= s.min_run_time:
        spent: list[float] = []
        mib = peak_mib(lambda: spent.append(_call_s(fn, s.device)), s.device)
        if first > s.budget_s and spent[0] > s.budget_s:
            raise TooSlow(spent[0])
        ms = spent[0] * 1e3
    else:
        ms = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=s.min_run_time).median * 1e3
        mib = peak_mib(fn, s.device) if peak else math.nan
    return (ms, mib) if peak else ms


def _generator(s: Settings) -> torch.Generator:
    return torch.Generator(s.device).manual_seed(s.seed)


def _fwd_bwd(fn: Callable, inputs: tuple[torch.Tensor, ...], s: Settings) -> tuple[dict, torch.Tensor]:
    """Forward and forward + backward ms of ``fn(*inputs)`` (gradient for the first input, when
    the output is floating point), the peak memory of the slower of the two, and the output of
    the forward call (for the quality columns: no extra call)."""
    frozen = [t.detach() for t in inputs]
    result: list[torch.Tensor] = []
    first = _call_s(lambda: result.append(fn(*frozen)), s.device)
    y = result[0]
    if not y.is_floating_point():
        ms, mib = time_ms(lambda: fn(*frozen), s, first, peak=True)
        return {"fwd_ms": ms, "peak_mib": mib}, y
    out = {"fwd_ms": time_ms(lambda: fn(*frozen), s, first)}
    g = torch.randn(y.shape, generator=_generator(s), device=s.device).to(y.dtype)
    leaves = [frozen[0].clone().requires_grad_(), *frozen[1:]]
    out["fwd_bwd_ms"], out["peak_mib"] = time_ms(lambda: fn(*leaves).backward(g), s, peak=True)
    return out, y


# ----------------------------------------------------------------------------- selection


def problem(n: int, k: int, batch: int = 16, d: int = D, seed: int = 0, device="cpu", dtype=torch.float32):
    """The successive-halving paper's problem (Pietruszka et al. 2021): rows ``(batch, n, d)`` ~ U[-1, 1], scores ~ U[0, 1] and the exact top-k rows."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(batch, n, generator=g)
    x = torch.rand(batch, n, d, generator=g) * 2 - 1
    top = x.gather(1, s.topk(k, dim=-1).indices[..., None].expand(-1, -1, d))
    return tuple(t.to(device, dtype) for t in (x, s, top))


def _selection_methods() -> dict[str, Method]:
    out = {}
    for name, r in relaxations().items():
        if r.select is not None:
            select, work = _seeded(r.select, r.stochastic, 0), _cost_work(r.cost)
            out[name] = Method(
                lambda x, s, k, f=select, t=r.default_temperature: f(x, s, k, temperature=t), work=lambda c, w=work: w(c) * D
            )
    if "halving" in out:  # halving at the paper's own default, base 20
        halving = relaxations()["halving"].select
        out["halving-base20"] = Method(lambda x, s, k: halving(x, s, k, temperature=BASE_20), work=out["halving"].work)
    for name, (package, fn, memory) in peers.select_methods().items():
        out[name] = Method(fn, package, lambda c: c.batch * c.n * c.n * D, memory)
    return out


def _measure_selection(method: Method, cell: Cell, s: Settings) -> dict:
    x, scores, top = problem(cell.n, cell.k, cell.batch, seed=s.seed, device=s.device, dtype=s.dtype)
    times, y = _fwd_bwd(lambda sc, rows: method.fn(rows, sc, cell.k), (scores, x), s)
    return {**times, "nccs": nccs(y, top).mean().item(), "d": D}


# ----------------------------------------------------------------------------- masks


def _cost_work(cost: str | None) -> Callable[[Cell], float]:
    """The ``work`` of a method from the registry's cost text (``"O(n)"``, ``"O(n log n)"``, ``"O(k n)"``, ``"O(n^2)"``)."""
    text = cost.replace(" ", "").lower()
    if "²" in text or "^2" in text or "n*n" in text:
        return lambda c: c.batch * c.n * c.n
    if "k" in text.split("log")[0]:
        return lambda c: c.batch * c.n * c.k
    if "log" in text:
        return lambda c: c.batch * c.n * math.log2(c.n)
    return lambda c: c.batch * c.n


def relaxations() -> dict:
    """Every relaxed top-k of khot, by name: the records of :func:`khot.methods` (the method
    registry), so a method added there is benchmarked without touching the bench."""
    return {r.name: r for r in khot.methods() if r.mask is not None}


def _seeded(fn: Callable, stochastic: bool, seed: int) -> Callable:
    """``fn``, called with a generator seeded by ``seed`` when it draws random numbers."""
    if not stochastic:
        return fn
    if "generator" in inspect.signature(fn).parameters:
        return lambda *a, **kw: fn(*a, generator=torch.Generator(a[0].device).manual_seed(seed), **kw)

    def call(*a, **kw):
        with torch.random.fork_rng(devices=[a[0].device] if a[0].device.type == "cuda" else []):
            torch.manual_seed(seed)
            return fn(*a, **kw)

    return call


def _masks_methods() -> dict[str, Method]:
    out = {}
    for name, r in relaxations().items():
        mask = _seeded(r.mask, r.stochastic, 0)
        out[name] = Method(
            lambda x, k, f=mask, t=r.default_temperature: f(x, k, -1, temperature=t),
            work=_cost_work(r.cost),
            baseline="softmax",
            tempered=lambda x, k, t, f=mask: f(x, k, -1, temperature=t),
            stochastic=r.stochastic,
        )
    for name, (package, fn, memory) in peers.mask_methods().items():
        work = (lambda c: c.batch * c.n * c.n * math.log2(c.n) ** 2) if memory else _cost_work("O(n log n)")
        # a peer's sharpness: its scores divided by a temperature (entmax, the sorting networks'
        # steepness and torchsort's regularisation all scale with it)
        tempered = lambda x, k, t, f=fn: f(x / t, k)  # noqa: E731
        out[name] = Method(fn, package, work, memory, baseline="softmax", tempered=tempered)
    out["torch-topk"] = Method(lambda x, k: baseline_mask(x, k, -1), "torch", reference=True)
    out["softmax"] = Method(lambda x, k: torch.softmax(x, -1), "torch", reference=True)
    return out


def _l1(mask: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """Mean over the slices of the L1 distance between a relaxed mask and the exact one, / 2k."""
    return ((mask.float() - exact.float()).abs().sum(-1) / (2 * k)).mean().item()


def matched_temperature(
    fn: Callable, x: torch.Tensor, k: int, level: float, start: float = 1.0, slope: float = 1.0, tol: float = 0.03,
    max_evals: int = 40, evals: list | None = None, budget_s: float = math.inf,
) -> tuple[float, float]:
    """The temperature at which ``fn(x, k, temperature)`` is ``level`` from the exact mask
    (L1 / 2k), and the distance reached.

    A bracketed secant search on ``log τ`` against ``log distance`` (the distance of these
    relaxations grows about like a power of τ, so the secant lands near the root in a step or
    two): from ``start``, extrapolate with ``slope`` (d log distance / d log τ, then the slope
    between the last two points) until the level is bracketed, then Illinois steps inside the
    bracket (a secant that cannot stall), bisection where a distance is 0 or not finite. Stops
    within ``tol`` of ``level`` (relative), where the distance stops changing with τ (a method
    that never gets that close to, or that far from, the exact mask), or at the closest of
    ``max_evals`` evaluations. ``evals``, when given, gets the
    number of evaluations appended. Raises :class:`TooSlow` when two evaluations (forward calls)
    take longer than ``budget_s`` each.
    """
    exact = khot.topk_mask(x, k)
    seen: dict[float, float] = {}
    slow: list[float] = []

    def err(u: float) -> float:  # log(distance / level): increasing in u = log τ
        if u not in seen:
            began = time.perf_counter()
            with torch.no_grad():
                d = _l1(fn(x, k, math.exp(u)), exact, k)
            if (spent := time.perf_counter() - began) > budget_s:
                slow.append(spent)
                if len(slow) == 2:  # not only the first call's one-time costs
                    raise TooSlow(spent)
            seen[u] = d if math.isfinite(d) else math.inf
        d = seen[u]
        return math.log(d / level) if 0 < d < math.inf else (-math.inf if d == 0 else math.inf)

    def done(u: float) -> bool:
        return abs(seen[u] - level) <= tol * level or len(seen) >= max_evals

    jump = math.log(100.0)  # the largest step outside a bracket
    u = math.log(start)
    e = err(u)
    below = above = None  # (u, err) with the distance below / above the level
    previous, flat = None, 0
    while not done(u):
        if e < 0:
            below = (u, e) if below is None or u > below[0] else below
        else:
            above = (u, e) if above is None or u < above[0] else above
        if below is None or above is None:  # extrapolate towards the level
            if previous is not None and math.isfinite(e) and math.isfinite(previous[1]) and previous[0] != u:
                s = (e - previous[1]) / (u - previous[0])
                flat = flat + 1 if abs(e - previous[1]) < 0.01 and abs(u - previous[0]) > 1 else 0
                if flat >= 2:  # the distance no longer moves with τ: the level is out of this method's reach
                    break
                slope = s if s > 0.05 else 1e-9  # nearly flat: the longest step
            step = -e / slope if math.isfinite(e) else (jump if e < 0 else -jump)
            previous, u = (u, e), u + max(-jump, min(jump, step))
        else:  # Illinois inside the bracket
            (a, ea), (b, eb) = below, above
            if math.isfinite(ea) and math.isfinite(eb):
                new = a - ea * (b - a) / (eb - ea)
                margin = 0.02 * (b - a)
                new = min(max(new, a + margin), b - margin)
            else:
                new = (a + b) / 2
            previous, u = (u, e), new
        e = err(u)
        if below is not None and above is not None and math.isfinite(e):  # Illinois: halve the stale end
            if e < 0 and previous is not None and previous[1] < 0 and math.isfinite(above[1]):
                above = (above[0], above[1] / 2)
            elif e >= 0 and previous is not None and previous[1] >= 0 and math.isfinite(below[1]):
                below = (below[0], below[1] / 2)
    if evals is not None:
        evals.append(len(seen))
    best = min(seen, key=lambda t: abs(seen[t] - level))
    return math.exp(best), seen[best]


_SMOOTHED: dict = {}
SMOOTHED_ELEMENTS = 2**21  # Monte-Carlo draws × batch × n of the smoothed reference (draws >= 64): ~0.4 s a cell


def smoothed_exact_gradient(
    x: torch.Tensor, k: int, level: float, g: torch.Tensor, seed: int, with_se: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The gradient of ``<g, E[topk_mask(x + σε)]>``, ε ~ N(0, I), with σ chosen so that the
    expected mask is ``level`` from the exact one: the exact-mask objective smoothed to the
    same closeness as the relaxations it is compared with (the perturbed-optimiser view of
    Berthet et al. 2020, "Learning with differentiable perturbed optimizers").

    Monte Carlo, conditioned on the other items' noise (so each draw gives every item a smooth
    term): item j is in the top k iff ``x_j + σε_j`` exceeds ``t_j``, the k-th largest of the
    others, and swapping j in replaces item ``r_j`` (that k-th largest), so
    ``∂/∂x_j = E[(g_j - g_{r_j}) φ((t_j - x_j) / σ)] / σ`` and ``E[mask_j] = E[Φ((x_j - t_j) / σ)]``.
    Antithetic draws (ε and -ε); ``with_se`` also returns each element's standard error (from
    the spread of the antithetic pairs' means).
    """
    key = (tuple(x.shape), k, level, seed, x.device, x.dtype, x.double().sum().item(), g.double().sum().item())
    if key not in _SMOOTHED:
        _SMOOTHED.clear()
        _SMOOTHED[key] = _smoothed_exact_gradient(x.double(), k, level, g.double(), seed)
    grad, se = _SMOOTHED[key]
    return (grad, se) if with_se else grad


def _smoothed_exact_gradient(x, k, level, g, seed):
    gen = torch.Generator(x.device).manual_seed(seed)
    pairs = max(32, SMOOTHED_ELEMENTS // (2 * x.numel()))
    eps = torch.randn(pairs, *x.shape, generator=gen, device=x.device, dtype=x.dtype)
    eps = torch.cat([eps, -eps])
    normal = torch.distributions.Normal(torch.zeros((), dtype=x.dtype, device=x.device), 1.0)

    def threshold(sigma):  # t_j and r_j of every draw
        z = x + sigma * eps
        vals, idx = z.topk(k + 1, -1)
        inside = z >= vals[..., k - 1 : k]  # ties have probability 0
        t = torch.where(inside, vals[..., k : k + 1], vals[..., k - 1 : k])
        return t, torch.where(inside, idx[..., k : k + 1], idx[..., k - 1 : k])

    expected = lambda z, k, sigma: normal.cdf((z - threshold(sigma)[0]) / sigma).mean(0)  # noqa: E731
    sigma, _ = matched_temperature(expected, x, k, level, start=0.1)
    t, r = threshold(sigma)
    swing = g - g.expand(eps.shape).gather(-1, r)
    terms = swing * normal.log_prob((t - x) / sigma).exp() / sigma
    pair_means = (terms[:pairs] + terms[pairs:]) / 2
    return pair_means.mean(0), pair_means.std(0) / math.sqrt(pairs)


def cosine_se(grad: torch.Tensor, reference: torch.Tensor, se: torch.Tensor) -> float:
    """Standard error of the mean over rows of ``cos(grad, reference)`` that comes from the
    reference's Monte-Carlo noise (``se`` per element; first order in the noise)."""
    u = F.normalize(grad, dim=-1)
    norm = reference.norm(dim=-1, keepdim=True)
    cos = (u * reference).sum(-1, keepdim=True) / norm
    slope = (u - cos * reference / norm) / norm  # d cos / d reference
    return ((slope * se).square().sum(-1).sum().sqrt() / grad.shape[0]).item()


def _fd_columns(n: int, s: Settings) -> torch.Tensor:
    """The items whose derivative is checked by finite differences: all with ``--full``, else
    FD_COLUMNS of them drawn with the run's seed."""
    if s.full or n <= FD_COLUMNS:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(s.seed))[:FD_COLUMNS].sort().values


def _finite_difference_cosine(fn: Callable, x: torch.Tensor, k: int, s: Settings) -> float:
    """Cosine between autograd's gradient of ``<g, fn(x, k)>`` and central differences, in float64,
    over the items of :func:`_fd_columns` (two calls each)."""
    x = x.detach().double()
    g = torch.randn(x.shape, generator=_generator(s), device=x.device, dtype=x.dtype)
    leaf = x.clone().requires_grad_()
    (fn(leaf, k) * g).sum().backward()
    columns = _fd_columns(x.shape[-1], s)
    eps, numeric = 1e-6, torch.empty(x.shape[0], len(columns), dtype=x.dtype, device=x.device)
    for j, i in enumerate(columns.tolist()):  # column i of every row at once: the rows are independent
        step = torch.zeros_like(x)
        step[:, i] = eps
        numeric[:, j] = ((fn(x + step, k) - fn(x - step, k)) * g).sum(-1) / (2 * eps)
    return F.cosine_similarity(leaf.grad[:, columns.to(x.device)].flatten(), numeric.flatten(), dim=0).item()


JAC_MAX_N = 1000  # largest n whose Jacobian is compared with the smoothed exact mask's
_MATCHED: dict = {}  # (method, k/n) -> [(n, level, temperature)] found so far: where the next search starts


def _first_guess(found: list, n: int, level: float) -> tuple[float, float]:
    """Where a method's next temperature search starts, and the slope d log distance / d log τ it
    assumes, from the temperatures matched so far (``found``: ``(n, level, τ)``): at the same n,
    the power law through the two nearest levels (or the nearest one, slope 1); else the nearest
    n, at the same level if it ran. Only a start: the search still reaches the level itself."""
    if not found:
        return 1.0, 1.0
    here = sorted((abs(math.log(lv / level)), lv, t) for m, lv, t in found if m == n)
    if len(here) >= 2 and here[0][1] != here[1][1]:
        (_, l0, t0), (_, l1, t1) = here[:2]
        slope = math.log(l1 / l0) / math.log(t1 / t0) if t1 != t0 else 1.0
        if slope > 0.05:
            return t0 * (level / l0) ** (1 / slope), slope
    if here:
        return here[0][2] * level / here[0][1], 1.0
    _, _, lv, t = min((abs(math.log(m / n)), lv != level, lv, t) for m, lv, t in found)
    return t * level / lv, 1.0


def _measure_masks(method: Method, cell: Cell, s: Settings) -> dict:
    x = torch.randn(cell.batch, cell.n, generator=_generator(s), device=s.device).to(s.dtype)
    out = {}
    fn = method.fn
    if cell.level is not None and not method.reference:
        found = _MATCHED.setdefault((id(method.tempered), cell.k / cell.n), [])
        start, slope = _first_guess(found, cell.n, cell.level)
        evals: list = []
        t, reached = matched_temperature(method.tempered, x, cell.k, cell.level, start, slope, evals=evals, budget_s=s.budget_s)
        out["temperature"], out["search_evals"], out["mask_l1"] = t, evals[0], reached
        if abs(reached - cell.level) > 0.1 * cell.level:  # not comparable at this level: nothing to time or score
            return {**out, "status": f"out of reach: L1 / 2k of {reached:.3g} at best, for {cell.level:g}"}
        found.append((cell.n, cell.level, t))
        fn = lambda z, k, f=method.tempered: f(z, k, t)  # noqa: E731
    times, m = _fwd_bwd(lambda z: fn(z, cell.k), (x,), s)
    out.update(times)
    if method.reference:
        return out
    m = m.float()
    out["mask_l1"] = _l1(m, khot.topk_mask(x, cell.k), cell.k)
    out["sum_err"] = (m.sum(-1) - cell.k).abs().mean().item()
    try:  # no float64 path (e.g. a peer's float32 network): no gradient columns
        calls = 2 * len(_fd_columns(cell.n, s))
        if cell.n <= GRAD_MAX_N and calls * out["fwd_ms"] / 1e3 <= s.budget_s and not method.stochastic:
            out["grad_cos"] = _finite_difference_cosine(fn, x, cell.k, s)
        if cell.level is not None and cell.n <= JAC_MAX_N:
            g = torch.randn(x.shape, generator=_generator(s), device=x.device, dtype=torch.float64)
            leaf = x.detach().double().requires_grad_()
            (fn(leaf, cell.k) * g).sum().backward()
            reference, se = smoothed_exact_gradient(x, cell.k, cell.level, g, s.seed, with_se=True)
            out["jac_cos"] = F.cosine_similarity(leaf.grad, reference, dim=-1).mean().item()
            out["jac_cos_se"] = cosine_se(leaf.grad, reference, se)
    except RuntimeError:
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
    out, kept = _fwd_bwd(lambda z: method.fn(z, cell.k), (x,), s)
    kept = kept != 0
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
    for design in ("brewer", "conditional_poisson"):  # O(n k): one draw at a time; a k × n recursion
        out[design] = Method(out[design].fn, work=lambda c: c.batch * c.n * c.k, baseline="torch-sort")
    out["gumbel-topk"] = Method(_gumbel_topk, "torch", baseline="torch-sort")
    out["torch-sort"] = Method(lambda pi, g: torch.sort(pi, -1), "torch", reference=True)
    return out


DRAWS, FULL_DRAWS = 2000, 20_000  # draws of one slice for the inclusion test


def _measure_sampling(method: Method, cell: Cell, s: Settings) -> dict:
    gen = _generator(s)
    pi = khot.sigmoid_topk(torch.randn(cell.batch, cell.n, generator=gen, device=s.device), cell.k).to(s.dtype)
    fwd_ms, mib = time_ms(lambda: method.fn(pi, gen), s, peak=True)
    out = {"fwd_ms": fwd_ms, "peak_mib": mib}
    if method.reference:
        return out
    # as many draws of one slice as fit in the budget (one draw costs about a row of the timed
    # batch), at most DRAWS (FULL_DRAWS with --full): enough to tell an exact design from Gumbel
    # top-k's (max |P(i) - π_i| ≈ 0.2, while 2000 draws have a standard error <= 0.011)
    most = FULL_DRAWS if s.full else DRAWS
    draws = min(most, 10**7 // cell.n, int(s.budget_s / (out["fwd_ms"] / 1e3 / cell.batch)))
    if draws < 100:
        return out
    row, size = pi[0].double(), max(1, 10**6 // cell.n)
    chunks = [min(size, draws - i) for i in range(0, draws, size)]
    freq = sum(method.fn(pi[:1].expand(c, -1).contiguous(), gen).double().sum(0) for c in chunks)
    err = (freq / draws - row).abs()
    z2 = (freq - draws * row).square() / (draws * row * (1 - row)).clamp_min(1e-12)
    # an exact design: each z² has mean 1; their sum is close to chi-square with n - 1 degrees of
    # freedom (the sample size is fixed), so a p-value far below 0.001 is a biased design
    df = torch.tensor(cell.n - 1.0, dtype=torch.float64)
    p = torch.special.gammaincc(df / 2, z2.sum() / 2).item()
    se = (row * (1 - row) / draws).sqrt().max().item()  # of the largest-variance frequency
    return {**out, "incl_err": err.max().item(), "incl_se": se, "incl_z": z2.max().sqrt().item(), "incl_p": p, "draws": draws}


# ----------------------------------------------------------------------------- tasks


def _tasks_methods() -> dict[str, Method]:
    from . import tasks

    out = {name: Method(fn, work=lambda c: c.batch) for name, fn in tasks.mask_methods().items()}
    for _, baselines, *_ in tasks.TASKS.values():
        out.update({b: Method(b, "torch", work=lambda c: c.batch, reference=True) for b in baselines})
    return out


def _tasks_cells(ks_index: int) -> tuple[Cell, ...]:
    from . import tasks

    sizes = {"features": 64, "knn": 128, "sae": 128}  # pixels, neighbour pool, latents
    return tuple(
        Cell(SEEDS, sizes[name], k, task=name)
        for name, (_, _, ks, *_) in tasks.TASKS.items()
        for k in (ks if ks_index == 0 else sorted({*ks, *(2 * k for k in ks)}))
    )


SEEDS = 3  # training runs (seeds) per method and task; the tasks suite's "batch"


def _measure_tasks(method: Method, cell: Cell, s: Settings) -> dict:
    from . import tasks

    run, baselines, *_ = tasks.TASKS[cell.task]
    if method.reference and method.fn not in baselines:
        return {"status": "n/a"}  # another task's baseline
    steps = tasks.STEPS[cell.task][s.full]
    options = {"steps": steps, **({"eval_steps": tasks.EVAL_STEPS} if cell.task == "features" else {})}
    if cell.task == "sae":
        options["batch"] = tasks.SAE_BATCH[s.full]
    values, start, threads = [], time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # models this small only lose time to OpenMP synchronisation (20x on a busy 2-core CPU)
    try:
        for seed in range(s.seed, s.seed + cell.batch):
            values.append(run(method.fn, cell.k, seed, **options))
    finally:
        torch.set_num_threads(threads)
    seconds = (time.perf_counter() - start) / cell.batch
    mean, std = tasks.spread(values)
    return {"metric": mean, "metric_std": std, "seeds": cell.batch, "steps": steps, "train_s": seconds}


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Suite:
    """A suite: its default and ``--full`` cells, its methods and its measuring function.

    ``quality`` is its headline quality column and whether higher is better (``None``: a
    p-value, not ranked); ``time`` the
    time column it ranks by; ``metrics`` all its quality columns; ``by`` what its summary
    groups the cells by (``"n"`` or ``"n/k"``).
    """

    title: str
    cells: tuple[Cell, ...]
    full: tuple[Cell, ...]
    methods: Callable[[], dict[str, Method]]
    measure: Callable[[Method, Cell, Settings], dict]
    quality: tuple[str, bool | None]
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
        "Relaxed k-hot masks at matched sharpness, k = n/10",
        tuple(Cell(4, 10**e, 10 ** (e - 1), level) for level in LEVELS for e in range(2, 5))
        + tuple(Cell(4, 10**e, 10 ** (e - 1), 0.1) for e in (5, 6)),
        tuple(Cell(4, 10**e, 10 ** (e - 1), level) for level in LEVELS for e in range(2, 8)),
        _masks_methods,
        _measure_masks,
        ("jac_cos", True),
        metrics=("jac_cos", "grad_cos", "sum_err", "mask_l1", "temperature"),
        by="level",
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
        (Cell(64, 1000, 10), Cell(64, 1000, 100), Cell(64, 10_000, 1000)),
        (Cell(64, 1000, 10), Cell(64, 1000, 100), Cell(64, 10_000, 1000), Cell(64, 100_000, 10_000)),
        _sampling_methods,
        _measure_sampling,
        ("incl_p", None),
        time="fwd_ms",
        metrics=("incl_p", "incl_z", "incl_err"),
    ),
    "tasks": Suite(
        "Downstream tasks: the same model trained through each relaxation and sampler",
        _tasks_cells(0),
        _tasks_cells(1),
        _tasks_methods,
        _measure_tasks,
        ("metric", None),
        time="train_s",
        metrics=("metric",),
        by="task",
    ),
}
