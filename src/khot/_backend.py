"""Which implementation of an op runs: the backend seam.

Every op of khot that does real work is one ``torch.library`` custom op with up to three
implementations:

* ``"portable"``: pure PyTorch with no host synchronisation (no ``.item()``, no
  ``bool(tensor)``, no data-dependent Python branch): fixed work per call. It is the op's
  default on every device, so it also runs on ``device="meta"`` and inside CUDA graphs.
* ``"cpu"``: tuned for CPU tensors; it may take data-dependent shortcuts where they win.
* ``"triton"``: GPU kernels in :mod:`khot._triton` (imported lazily, only when a CUDA tensor or
  a forced backend asks for them; ``TRITON_INTERPRET=1`` runs them on CPU tensors, which is how
  the tests check them).

:func:`custom_op` defines the op and registers them through ``torch.library`` (the portable
one as the op's default and fake, the CPU one as its CPU kernel, the Triton one as its CUDA kernel), so the choice is
made by the dispatcher per device type, not by ``if`` chains in the ops. :func:`use_backend`
forces one backend for the calls inside it (tests, comparisons).

How a backend plugs in: a CPU path is a function with the op's signature passed to
:func:`custom_op` as ``cpu=``; a GPU kernel is a function of the same name and signature in a
module of :mod:`khot._triton`, listed there (that package imports Triton only when a kernel
is first needed, so ``import khot`` never does).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from ._checks import _readable

__all__ = ["BACKENDS", "use_backend", "forced_backend", "custom_op", "call", "apply"]

BACKENDS = ("portable", "cpu", "triton")

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("khot_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every khot op inside the ``with`` block on backend ``name``.

    ``"portable"`` (sync-free pure PyTorch, any device), ``"cpu"`` (the CPU-tuned path, CPU
    tensors only) or ``"triton"`` (the GPU kernels; on CPU tensors only under
    ``TRITON_INTERPRET=1``). Ops without an implementation for the forced backend raise.

    Example:
        >>> import torch, khot
        >>> x = torch.tensor([[0.3, 0.9, 0.1, 0.9]])
        >>> with khot.use_backend("portable"):
        ...     khot.topk_mask(x, 2)
        tensor([[False,  True, False,  True]])
    """
    if name not in BACKENDS:
        raise ValueError(f"name={name!r} is not a khot backend; choose one of {', '.join(map(repr, BACKENDS))}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_backend() -> str | None:
    """The backend forced by the innermost :func:`use_backend`, or ``None``."""
    return _FORCED.get()


def custom_op(name: str, portable: Callable, *, cpu: Callable | None = None, fake: Callable | None = None):
    """Define the custom op ``khot::name`` with its backends; return it (a ``CustomOpDef``).

    ``portable`` (type-annotated, as ``torch.library.custom_op`` requires) is the op's default
    on every device; ``cpu`` takes the same arguments and runs on CPU tensors; the Triton kernel,
    if :mod:`khot._triton` has one named ``name``, runs on CUDA tensors (it is looked up on first
    use; without triton, CUDA tensors take the portable path). ``fake`` computes the output's
    shape, dtype and device (``register_fake``); by default the portable path itself, which must
    then run on meta tensors.
    """
    op = torch.library.custom_op(f"khot::{name}", portable, mutates_args=())
    op.register_fake(fake or portable)

    def pick(device: str) -> Callable:
        forced = _FORCED.get()
        choice = forced or {"cpu": "cpu", "cuda": "triton"}.get(device, "portable")
        if choice == "cpu" and device != "cpu":
            raise RuntimeError(f"khot::{name}: the 'cpu' backend takes CPU tensors, got {device} tensors")
        if choice == "cpu":
            return cpu or portable
        if choice == "triton":
            from . import _triton  # imports no triton itself

            fn = _triton.kernel(name)
            if fn is not None:
                return fn
            if forced == "triton":
                raise RuntimeError(f"khot::{name} has no Triton kernel here ({_triton.why_not(name)})")
        return portable

    op.register_kernel("cpu")(lambda *args, **kwargs: pick("cpu")(*args, **kwargs))
    op.register_kernel("cuda")(lambda *args, **kwargs: pick("cuda")(*args, **kwargs))
    op._khot_pick = pick
    return op


def _plain(args) -> bool:
    """Whether a call on ``args`` is plain eager: every tensor among them can be read here."""
    return all(_readable(a) for a in args if isinstance(a, torch.Tensor))


def call(op, *args):
    """Run ``op(*args)``, skipping the dispatcher's overhead (tens of µs) on plain eager calls.

    Under ``torch.compile``, ``torch.func`` transforms and on fake or meta tensors the op itself
    runs (so the compiler sees one opaque call); otherwise the backend it would pick runs directly. Only for
    ops whose autograd lives outside them (an ``autograd.Function`` around the call).
    """
    if not _plain(args):
        return op(*args)
    device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
    return op._khot_pick(device if device in ("cpu", "cuda") else "other")(*args)


_EAGER: dict[type, type] = {}


def apply(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)`` for a new-style ``autograd.Function`` (``forward`` without ``ctx``
    and ``setup_context``), through an old-style twin on plain eager calls.

    New-style functions are what ``torch.func`` and ``torch.compile`` need, but their ``apply``
    binds the arguments by signature and sets up the functorch machinery: about 30-50 µs per
    call, as much as a softmax on a short row. The twin runs the same ``forward``,
    ``setup_context`` and ``backward``.
    """
    if not _plain(args):
        return function.apply(*args)
    twin = _EAGER.get(function)
    if twin is None:

        def forward(ctx, *inputs):
            output = function.forward(*inputs)
            function.setup_context(ctx, inputs, output)
            return output

        twin = type(f"{function.__name__}Eager", (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(function.backward)})
        _EAGER[function] = twin
    return twin.apply(*args)
