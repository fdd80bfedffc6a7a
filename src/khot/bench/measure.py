"""Measuring primitives shared by ``khot bench`` and the scripts in ``benchmarks/``.

Times are medians of :class:`torch.utils.benchmark.Timer` (which synchronises CUDA);
memory is the peak one call needs beyond what was allocated before it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.benchmark import Timer

__all__ = ["median_ms", "peak_mib", "baseline_mask", "baseline_keep"]


def baseline_mask(x, k, dim):
    """Seed 000's plain-PyTorch k-hot mask: ``zeros_like`` + ``scatter_`` of ``topk`` indices."""
    return torch.zeros_like(x, dtype=torch.bool).scatter_(dim, x.topk(k, dim).indices, True)


def baseline_keep(x, k, dim):
    """Seed 000's plain-PyTorch "zero all but the top k": the mask above as floats, times ``x``."""
    return x * torch.zeros_like(x).scatter_(dim, x.topk(k, dim).indices, 1)


def median_ms(fn: Callable[[], object], min_run_time: float = 2.0) -> float:
    """Median time of ``fn()`` in ms.

    ``min_run_time=0`` times a single run with no warm-up (for slow cases); otherwise one
    warm-up run, then blocks of runs for at least ``min_run_time`` seconds (a single
    further run when the warm-up alone took longer than that).
    """
    timer = Timer("fn()", globals={"fn": fn})
    if not min_run_time:
        return timer.timeit(1).median * 1e3
    if timer.timeit(1).median >= min_run_time:  # the warm-up
        return timer.timeit(1).median * 1e3
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory ``fn()`` needs beyond what is in use before the call, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU (Linux): growth of the peak resident
    size, which writing 5 to ``/proc/self/clear_refs`` resets; NaN where that is not available.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        return float("nan")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")
