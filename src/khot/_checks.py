"""Argument checking shared by every khot op.

Every public op validates its arguments here, so that all of them fail the same
way: a ``TypeError`` for an argument of the wrong kind, a ``ValueError`` for one
of the right kind but a bad value, each naming the argument and the value it got.
Nothing is silently clamped.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "check_range", "checked", "checked_no_nan",
    "check_tensor",
    "normalize_dim",
    "check_count",
    "check_real_count",
    "check_positive",
    "check_choice",
    "check_flag",
    "check_rows",
]


def _readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read here: a plain eager tensor with data (not while
    compiling, not a ``torch.func``-wrapped tensor as in ``vmap`` or ``grad``, not fake or meta)."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._functorch.is_functorch_wrapped_tensor(t)
        or t.device.type == "meta"
        or (type(t) not in _PLAIN and torch._subclasses.fake_tensor.is_fake(t))  # fake tensors are a subclass
    )


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _readable_cpu(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read here at no cost: a plain eager CPU tensor (what the CPU
    paths' data-dependent shortcuts need)."""
    return t.device.type == "cpu" and _readable(t)


def _check_range_now(t: torch.Tensor, name: str, low: float, high: float, open_low: bool, what: str) -> None:
    """Raise the ``ValueError`` of :func:`check_range` where ``t`` has values outside the range.

    Reads the values on the CPU; on other devices queues ``torch._assert_async`` (no host
    synchronisation; the error surfaces at the next synchronisation).
    """
    if not t.numel():
        return
    inside = (t > low) if open_low else (t >= low)
    inside = inside & ((t < high) if high == math.inf else (t <= high))  # also rejects NaN
    if t.device.type != "cpu":
        torch._assert_async(inside.all(), f"{name} must {what}")
    elif not bool(inside.all()):
        t = t.detach()
        raise ValueError(f"{name} must {what}, got values from {t.min().item()} to {t.max().item()}")


def _check_range_op_body(t: torch.Tensor, name: str, low: float, high: float, open_low: bool, what: str) -> torch.Tensor:
    _check_range_now(t, name, low, high, open_low, what)
    return t.new_zeros(())


# The same check as one opaque op, for torch.compile and vmap: its body runs on the real values at run
# time, so compiled and vmapped calls raise the same error as eager ones. It returns a zero that the
# caller adds to the checked tensor, which keeps the check in a compiled graph; it takes the tensor
# detached, so it needs no autograd of its own (``torch.func.grad`` differentiates through the sum).
_check_range_op = torch.library.custom_op("khot::check_range", _check_range_op_body, mutates_args=())
_check_range_op.register_fake(lambda t, *args: t.new_empty(()))
torch.library.register_vmap(_check_range_op, lambda info, in_dims, t, *args: (_check_range_op(t, *args), None))


def check_range(t: torch.Tensor, name: str, low: float, high: float, *, open_low: bool = False, what: str = "") -> torch.Tensor:
    """Check that every value of ``t`` lies in ``[low, high]`` (``(low, high]`` when ``open_low``;
    ``high = inf`` excludes inf); NaN never passes. ``what`` words the rule in the error
    ("{name} must {what}, got values from ... to ..."). Returns ``t`` (under ``torch.compile``,
    ``torch.func`` and on meta tensors, ``t`` plus the check op's zero, so the check stays in the graph
    as long as the result is used: :func:`checked` for a ``t`` that is not).

    The error is the same ``ValueError`` eager, compiled and vmapped on CPU tensors; on other
    devices it is raised by ``torch._assert_async`` with the same text (no synchronisation).

    >>> check_range(torch.tensor([3, 9]), "k", 0, 8)
    Traceback (most recent call last):
    ...
    ValueError: k must lie in [0, 8], got values from 3 to 9
    """
    return checked(t, t, name, low, high, open_low=open_low, what=what)


def checked(out: torch.Tensor, t: torch.Tensor, name: str, low: float, high: float, *, open_low: bool = False, what: str = "") -> torch.Tensor:
    """``out`` once :func:`check_range`'s check of ``t`` has passed: eager, ``out`` itself; traced,
    ``out`` plus the check op's zero, which keeps the check in a compiled graph where ``t`` itself is
    not used further (an unused op is dropped). ``t`` is checked detached: ``out`` keeps its gradient."""
    what = what or f"lie in {'(' if open_low else '['}{low}, {high}{')' if high == math.inf else ']'}"
    if _readable(t):
        _check_range_now(t, name, low, high, open_low, what)
        return out
    return out + _check_range_op(t.detach(), name, float(low), float(high), open_low, what).to(out.dtype)


def checked_no_nan(out: torch.Tensor, t: torch.Tensor, name: str, why: str = "") -> torch.Tensor:
    """:func:`checked` that ``t`` holds no NaN (``±inf`` entries pass); ``why`` ends the message."""
    t = t.detach()
    return checked(out, t.masked_fill(t.isinf(), 0), name, -math.inf, math.inf, what="not hold NaN" + why)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_tensor(name: str, x, *, floating: bool = False) -> torch.Tensor:
    """Check that ``x`` is a real tensor (floating point when ``floating``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be a real numeric tensor, got dtype {x.dtype}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def normalize_dim(dim, ndim: int, name: str = "dim") -> int:
    """Return ``dim`` as a non-negative index into a tensor with ``ndim`` dimensions."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_describe(dim)}")
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise ValueError(
            f"{name}={dim} is out of range for a tensor with {ndim} dimensions "
            f"(expected {-rank} <= {name} < {rank})"
        )
    return int(dim) % rank


def _as_count_tensor(k: torch.Tensor, batch_shape: torch.Size, name: str) -> torch.Tensor:
    try:
        return torch.broadcast_to(k, batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(k.shape)}, which does not broadcast to the shape of the "
            f"input with the reduced dimension removed, {tuple(batch_shape)}"
        ) from None


def check_count(k, n: int, batch_shape: torch.Size, device: torch.device, name: str = "k", low: int = 0):
    """Check an integer top-k count: an int, or an integer tensor of per-slice counts.

    Returns ``k`` as a Python int, or as an int64 tensor broadcast to ``batch_shape``.
    Every count must satisfy ``low <= k <= n``.
    """
    if isinstance(k, torch.Tensor):
        if k.dtype == torch.bool or k.is_floating_point() or k.is_complex():
            raise TypeError(f"{name} must be an int or an integer tensor, got {_describe(k)}")
        if k.device != device:
            raise ValueError(f"{name} is on {k.device} but the input is on {device}")
        k = _as_count_tensor(k, batch_shape, name).long()
        return check_range(k, name, low, n, what=f"lie in [{low}, {n}] (the size of the reduced dimension)")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an int or an integer tensor, got {_describe(k)}")
    if not low <= k <= n:
        raise ValueError(f"{name}={k} is out of range: expected {low} <= {name} <= {n} (the size of the reduced dimension)")
    return int(k)


def check_real_count(k, n: int, batch_shape: torch.Size, device: torch.device, name: str = "k"):
    """Check a real-valued count ``0 <= k <= n``: a number or a (broadcastable) tensor.

    Returns a Python float, or a floating tensor broadcast to ``batch_shape``.
    """
    if isinstance(k, torch.Tensor):
        if k.dtype == torch.bool or k.is_complex():
            raise TypeError(f"{name} must be a number or a real tensor, got {_describe(k)}")
        if k.device != device:
            raise ValueError(f"{name} is on {k.device} but the input is on {device}")
        k = _as_count_tensor(k, batch_shape, name)
        if not k.is_floating_point():
            k = k.to(torch.get_default_dtype())
        return check_range(k, name, 0, n, what=f"lie in [0, {n}] (the size of the reduced dimension)")
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"{name} must be a number or a real tensor, got {_describe(k)}")
    if not 0 <= k <= n:
        raise ValueError(f"{name}={k} is out of range: expected 0 <= {name} <= {n}")
    return float(k)


def check_positive(name: str, value):
    """Check that a scalar or tensor hyper-parameter is finite and strictly positive."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got {_describe(value)}")
        return check_range(value, name, 0, math.inf, open_low=True, what="be finite and > 0")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {_describe(value)}")
    if not (0 < value < float("inf")):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices):
    """Check that ``value`` is one of ``choices``; the error lists the valid ones."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
    return value


def check_flag(name: str, value) -> bool:
    """Check a boolean switch (a bool, not merely something truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return value


def check_rows(x: torch.Tensor, scores) -> None:
    """Check ``x`` of shape ``(..., n, d)`` against its row ``scores`` of shape ``(..., n)``."""
    check_tensor("scores", scores)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., n, d), got shape {tuple(x.shape)}")
    if scores.shape != x.shape[:-1]:
        raise ValueError(f"scores must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(scores.shape)}")
    if scores.device != x.device:
        raise ValueError(f"scores are on {scores.device} but x is on {x.device}")
