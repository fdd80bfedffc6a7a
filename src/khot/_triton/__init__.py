"""Triton kernels behind khot's ops, one module per op family, imported only on first use.

:func:`kernel` maps an op name (``khot::name``) to its kernel: a function with the op's
signature in the module listed in ``_MODULES``. Importing this package imports no Triton, so
``import khot`` works without it; a kernel that cannot load (no triton) is ``None`` and the op
runs its portable path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["kernel", "why_not"]

# op name -> module of this package that defines a function of that name
_MODULES: dict[str, str] = {
    "topk_mask": "exact",
    "keep_topk": "exact",
    "select_topk": "exact",
    "sigmoid_topk_forward": "sigmoid",
    "sigmoid_topk_backward": "sigmoid",
    "router_topk": "router",
}

_errors: dict[str, str] = {}


def kernel(name: str) -> Callable | None:
    """The Triton kernel of op ``name``, or ``None`` when there is none or it cannot load."""
    module = _MODULES.get(name)
    if module is None:
        _errors[name] = "no kernel is written for it"
        return None
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ImportError as error:
        _errors[name] = f"{error}; install triton (pip install triton)"
        return None


def why_not(name: str) -> str:
    """Why :func:`kernel` returned ``None`` for ``name``."""
    return _errors.get(name, "unknown")
