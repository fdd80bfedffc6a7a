"""The registry of khot's relaxations: the one place that says which methods exist and what each supports.

:func:`khot.soft_topk`, :func:`khot.soft_select`, the modules of :mod:`khot.nn`, ``khot bench``
and the README's method table all read :func:`methods`. Adding a method is one file in
:mod:`khot.relaxed`, one :class:`Method` entry in ``_METHODS`` below and its tests.

Example:
    >>> import khot
    >>> [m.name for m in khot.methods() if m.real_k and m.grad_k]
    ['sigmoid', 'sparse', 'lapsum', 'soft']
    >>> khot.relaxed.registry.get("sparse").exact_zeros
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import counting, gumbel, halving, iterative, lapsum, perturbed, sigmoid, simple, soft, sparse

__all__ = ["Method", "methods", "get", "check_options", "markdown_table"]


@dataclass(frozen=True)
class Method:
    """What one relaxation is and what it supports (one row of :func:`methods`)."""

    name: str  # "sigmoid", "halving", ...
    mask: Callable | None  # fn(scores, k, dim=-1, *, temperature, **options) -> relaxed k-hot mask
    select: Callable | None  # fn(x, scores, k, *, temperature, **options) -> (..., k, d), or None
    default_temperature: float
    real_k: bool  # accepts a real-valued k
    per_row_k: bool  # accepts a tensor of per-slice k
    grad_k: bool  # differentiable in k
    grad_temperature: bool  # differentiable in a tensor temperature
    output_range: str  # e.g. "[0, 1]"
    sums_to_k: str  # "exactly", "approximately", "in expectation"
    exact_zeros: bool  # sparse output
    stochastic: bool  # needs a generator
    cost: str  # "O(n)", "O(n log n)", "O(k n)", "O(n^2)"
    reference: str  # paper citation (authors, title, venue year)
    summary: str  # one line: when to use it


def _default_temperature(fn: Callable) -> float:
    """The default of ``fn``'s ``temperature`` argument: the method's module keeps the number."""
    return float(inspect.signature(fn).parameters["temperature"].default)


_METHODS = (
    Method(
        "sigmoid", sigmoid.sigmoid_topk, None, _default_temperature(sigmoid.sigmoid_topk),
        real_k=True, per_row_k=True, grad_k=True, grad_temperature=True,
        output_range="[0, 1]", sums_to_k="exactly", exact_zeros=False, stochastic=False, cost="O(n)",
        reference="Wijk, Vinuesa & Azizpour, 'Differentiable Top-k: From One-Hot to k-Hot'",
        summary="the default: a smooth mask with gradients in x, k and τ at softmax-like cost",
    ),
    Method(
        "halving", halving.halving_topk, halving.halving_select, _default_temperature(halving.halving_topk),
        real_k=False, per_row_k=False, grad_k=False, grad_temperature=False,
        output_range="[0, 1]", sums_to_k="exactly", exact_zeros=False, stochastic=False, cost="O(n log n)",
        reference="Pietruszka, Borchmann & Graliński, 'Successive Halving Top-k Operator', AAAI 2021",
        summary="selecting k rows (soft_select) with near-exact output at large n",
    ),
    Method(
        "iterative", iterative.iterative_topk, iterative.iterative_select, _default_temperature(iterative.iterative_topk),
        real_k=False, per_row_k=False, grad_k=False, grad_temperature=False,
        output_range="[0, k]", sums_to_k="exactly", exact_zeros=False, stochastic=False, cost="O(k n)",
        reference="Goyal, Neubig, Dyer & Berg-Kirkpatrick, 'A Continuous Relaxation of Beam Search "
        "for End-to-End Training of Neural Sequence Models', AAAI 2018",
        summary="the classic baseline of soft row selection, for small k",
    ),
    Method(
        "counting", counting.counting_topk, counting.counting_select, _default_temperature(counting.counting_topk),
        real_k=False, per_row_k=True, grad_k=False, grad_temperature=False,
        output_range="[0, 1]", sums_to_k="approximately", exact_zeros=False, stochastic=False, cost="O(n^2)",
        reference="soft ranks by pairwise counting, the linearized top-k of Haurum et al., 'Which Tokens to "
        "Use? Investigating Token Reduction in Vision Transformers', ICCV Workshops 2023",
        summary="soft ranks and 'j-th best' slots for small n (up to a few thousand)",
    ),
    Method(
        "sparse", sparse.sparse_topk, None, sparse.DEFAULT_TEMPERATURE,
        real_k=True, per_row_k=True, grad_k=True, grad_temperature=True,
        output_range="[0, 1]", sums_to_k="exactly", exact_zeros=True, stochastic=False, cost="O(n log n)",
        reference="Sander, Puigcerver, Djolonga, Peyré & Blondel, 'Fast, Differentiable and Sparse Top-k: "
        "a Convex Analysis Perspective', ICML 2023",
        summary="a sparse mask (exact zeros and ones) with exact gradients on its support",
    ),
    Method(
        "lapsum", lapsum.lapsum_topk, None, lapsum.DEFAULT_TEMPERATURE,
        real_k=True, per_row_k=True, grad_k=True, grad_temperature=True,
        output_range="[0, 1]", sums_to_k="exactly", exact_zeros=False, stochastic=False, cost="O(n log n)",
        reference="Struski, Bednarczyk, Podolak & Tabor, 'LapSum - One Method to Differentiate Them All: "
        "Ranking, Sorting and Top-k Selection', ICML 2025",
        summary="a smooth mask whose threshold is exact in closed form (no iterations), heavy-tailed weights",
    ),
    Method(
        "soft", soft.soft_ot_topk, None, soft.DEFAULT_TEMPERATURE,
        real_k=True, per_row_k=True, grad_k=True, grad_temperature=True,
        output_range="[0, 1]", sums_to_k="approximately", exact_zeros=False, stochastic=False, cost="O(T n)",
        reference="Xie, Dai, Chen, Dai, Zhao, Zha, Wei & Pfister, 'Differentiable Top-k with Optimal "
        "Transport', NeurIPS 2020",
        summary="reproducing SOFT top-k (entropic OT by Sinkhorn) as a baseline; sigmoid is its exact limit",
    ),
    Method(
        "simple", simple.simple_topk, None, simple.DEFAULT_TEMPERATURE,
        real_k=False, per_row_k=True, grad_k=False, grad_temperature=True,
        output_range="[0, 1]", sums_to_k="exactly", exact_zeros=False, stochastic=False, cost="O(k n)",
        reference="Ahmed, Zeng, Niepert & Van den Broeck, 'SIMPLE: A Gradient Estimator for k-Subset "
        "Sampling', ICLR 2023",
        summary="the exact marginals of the maximum-entropy k-subset distribution (train with its samples)",
    ),
    Method(
        "perturbed", perturbed.perturbed_topk, None, perturbed.DEFAULT_TEMPERATURE,
        real_k=False, per_row_k=True, grad_k=False, grad_temperature=False,
        output_range="[0, 1]", sums_to_k="exactly", exact_zeros=True, stochastic=True, cost="O(S n)",
        reference="Berthet, Blondel, Teboul, Cuturi, Vert & Bach, 'Learning with Differentiable Perturbed "
        "Optimizers', NeurIPS 2020",
        summary="a Monte-Carlo smoothing of the exact mask, when an unbiased stochastic gradient is wanted",
    ),
    Method(
        "gumbel", gumbel.gumbel_topk, None, gumbel.DEFAULT_TEMPERATURE,
        real_k=False, per_row_k=False, grad_k=False, grad_temperature=True,
        output_range="[0, k]", sums_to_k="exactly", exact_zeros=False, stochastic=True, cost="O(k n)",
        reference="Xie & Ermon, 'Reparameterizable Subset Sampling via Continuous Relaxations', IJCAI 2019",
        summary="a relaxed random k-subset (L2X-style explanation, stochastic kNN)",
    ),
)


def methods() -> list[Method]:
    """Every relaxation khot has, as :class:`Method` records (a new list each call)."""
    return list(_METHODS)


def get(name: str) -> Method:
    """The :class:`Method` called ``name``; a ``ValueError`` listing the names otherwise."""
    for method in _METHODS:
        if method.name == name:
            return method
    raise ValueError(f"method={name!r} is not valid; choose one of {', '.join(repr(m.name) for m in _METHODS)}")


def check_options(method: Method, fn: Callable, options: Mapping[str, object]) -> None:
    """Check that ``fn`` (``method.mask`` or ``method.select``) takes every keyword in ``options``.

    Modules call this when built, so that a misspelt option fails there, not at the first forward.
    """
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "temperature"]
    for key in options:
        if key not in known:
            valid = f"its options are {', '.join(map(repr, known))}" if known else "it takes no options"
            raise TypeError(f"method={method.name!r} takes no option {key!r}; {valid}")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def markdown_table() -> str:
    """The README's table of methods, generated from the registry (a test keeps the README equal to it)."""
    head = (
        "| method | rows (`soft_select`) | real k | per-row k | ∂k | ∂τ | values | sums to k | exact zeros "
        "| stochastic | cost | default τ | use it for |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for m in _METHODS:
        cells = [
            f"`{m.name}`", _yes(m.select is not None), _yes(m.real_k), _yes(m.per_row_k), _yes(m.grad_k),
            _yes(m.grad_temperature), m.output_range, m.sums_to_k, _yes(m.exact_zeros), _yes(m.stochastic),
            m.cost, f"{m.default_temperature:g}", m.summary,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- `{m.name}`: {m.reference}" for m in _METHODS]
    return "\n".join(lines) + "\n"
