"""Measuring primitives shared by ``khot bench`` and the scripts in ``benchmarks/``.

Times are medians: of :class:`torch.utils.benchmark.Timer` (``median_ms``), or of runs taken in
turn with other functions (``interleaved_ms``); both synchronise CUDA. Memory is the peak one
call needs beyond what was allocated before it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
from torch.utils.benchmark import Timer

__all__ = ["median_ms", "interleaved_ms", "peak_mib", "baseline_mask", "baseline_keep"]


def baseline_mask(x, k, dim):
    """The plain-PyTorch k-hot mask: ``zeros_like`` + ``scatter_`` of ``topk`` indices."""
    return torch.zeros_like(x, dtype=torch.bool).scatter_(dim, x.topk(k, dim).indices, True)


def baseline_keep(x, k, dim):
    """The plain-PyTorch "zero all but the top k": the mask above as floats, times ``x``."""
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


def interleaved_ms(
    fns: Sequence[Callable[[], object]], repeats: int = 7, warmup: int = 3, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """Median time in ms of each of ``fns``, timed in turn ``repeats`` times after ``warmup`` runs each.

    Taking turns means a slow phase of a shared, noisy machine hits every function alike, so the
    ratios between the medians are steadier than those of separate timing loops. ``clock``:
    ``time.thread_time`` counts only this thread's CPU time (with ``torch.set_num_threads(1)``,
    the work itself), which an overloaded machine inflates far less than wall time.

    >>> x = torch.randn(256, 1024)
    >>> sort_ms, topk_ms = interleaved_ms([lambda: x.sort(-1), lambda: x.topk(8)], repeats=3)
    >>> sort_ms > 0 and topk_ms > 0
    True
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            fn()
            if cuda:
                torch.cuda.synchronize()
            spent.append(clock() - start)
    return [statistics.median(spent) * 1e3 for spent in times]


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
