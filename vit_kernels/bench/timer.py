"""Timing through the libraries' timers, and the statistics the reports print.

- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (it sizes the calls per block itself so
  that the clock's resolution does not matter);
- CUDA GPU: ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed before each call) or,
  for a step replayed from a CUDA graph, ``triton.testing.do_bench_cudagraph``.

:func:`measure` is a thin layer over them: it asks the library timer for samples in rounds until
the p20-p80 spread is within ``target_spread`` of the median (the repeats are chosen for that
precision) or ``max_time_s`` has passed, with at least ``repeats`` samples. What it returns says
whether the target was reached; nothing is averaged away: the median and p20/p80 are reported.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, List, Optional, Sequence

import torch

# a p20-p80 half-width above this fraction of the median is too wide to rank providers by
NOISY = 0.10


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of per-call times in ms: median and spread (p20-p80, min, max, std)."""

    median: float
    p20: float
    p80: float
    min: float
    max: float
    mean: float
    std: float
    n: int

    @property
    def spread(self) -> float:
        """Half the p20-p80 range, as a fraction of the median."""
        return (self.p80 - self.p20) / 2 / self.median if self.median > 0 else 0.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an ascending sequence."""
    if not sorted_values:
        raise ValueError("percentile: expected at least one value, got none")
    if not 0 <= q <= 100:
        raise ValueError(f"q: expected a percentile in [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Stats:
    if not times_ms:
        raise ValueError("times_ms: expected at least one measurement, got none")
    v = sorted(float(t) for t in times_ms)
    return Stats(
        statistics.median(v),
        percentile(v, 20),
        percentile(v, 80),
        v[0],
        v[-1],
        statistics.fmean(v),
        statistics.pstdev(v),
        len(v),
    )


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Per-call times (ms), the timer that took them, and whether the target spread was met."""

    times_ms: List[float]
    timer: str
    target_spread: float
    rounds: int

    @property
    def stats(self) -> Stats:
        return summarize(self.times_ms)

    @property
    def precise(self) -> bool:
        return self.stats.spread <= self.target_spread


def cpu_sampler(fn: Callable[[], object], budget_s: float) -> List[float]:
    """Per-call ms of each block of torch.utils.benchmark's blocked_autorange."""
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=budget_s)
    return [t * 1e3 for t in m.times]


def gpu_sampler(fn: Callable[[], object], budget_s: float, graph: bool = False) -> List[float]:
    """Per-call ms from triton.testing.do_bench (or do_bench_cudagraph for a graph replay)."""
    import triton.testing

    rep = max(1, int(budget_s * 1e3))
    if graph:
        return list(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="all"))
    return list(triton.testing.do_bench(fn, warmup=1, rep=rep, return_mode="all"))


def timer_name(device: torch.device, graph: bool = False) -> str:
    if device.type == "cuda":
        return "triton.testing.do_bench_cudagraph" if graph else "triton.testing.do_bench"
    return "torch.utils.benchmark blocked_autorange"


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device,
    warmup: int = 10,
    repeats: int = 30,
    target_spread: float = 0.02,
    max_time_s: Optional[float] = None,
    round_s: Optional[float] = None,
    graph: bool = False,
    sampler: Optional[Callable[[Callable, float], List[float]]] = None,
) -> Measurement:
    """Time ``fn()`` until the p20-p80 half-width is within ``target_spread`` of the median.

    warmup: calls before timing. repeats: the fewest samples kept. round_s: the time given to the
    library timer per round (default 0.1 s GPU, 0.05 s CPU); max_time_s: the time after which the
    rounds stop whether the target is met or not (default 3 s GPU, 1 s CPU). graph: replay ``fn``
    from a CUDA graph (do_bench_cudagraph). sampler(fn, seconds) -> per-call ms replaces the library
    timer (tests use a fake one).
    """
    if warmup < 0:
        raise ValueError(f"warmup: expected >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    if not target_spread > 0:
        raise ValueError(f"target_spread: expected a fraction > 0, got {target_spread}")
    gpu = device.type == "cuda"
    if graph and not gpu and sampler is None:
        raise RuntimeError("CUDA graphs need a CUDA device; none is available")
    round_s = round_s if round_s is not None else (0.1 if gpu else 0.05)
    max_time_s = max_time_s if max_time_s is not None else (3.0 if gpu else 1.0)
    if sampler is None:
        sampler = (lambda f, s: gpu_sampler(f, s, graph)) if gpu else cpu_sampler
    for _ in range(warmup):
        fn()
    times: List[float] = []
    rounds = 0
    t0 = time.perf_counter()
    while True:
        times += sampler(fn, round_s)
        rounds += 1
        if len(times) >= repeats and summarize(times).spread <= target_spread:
            break
        if time.perf_counter() - t0 >= max_time_s and len(times) >= min(repeats, 3):
            break
        if rounds >= 1000:
            break
    return Measurement(times, timer_name(device, graph), target_spread, rounds)


def rank(entries: Sequence[tuple]) -> tuple:
    """entries: (name, Stats). Returns ({name: rank}, overlaps): ranks 1.. by median when no two
    p20-p80 intervals overlap and no spread exceeds NOISY; otherwise no ranks ({}) and the list of
    (a, b) pairs that cannot be told apart (a noisy entry is paired with itself)."""
    order = sorted(entries, key=lambda e: e[1].median)
    bad = [(n, n) for n, s in order if s.spread > NOISY]
    bad += [(a, b) for (a, sa), (b, sb) in zip(order, order[1:]) if sa.p80 >= sb.p20]
    if bad:
        return {}, bad
    return {n: i + 1 for i, (n, _) in enumerate(order)}, []
