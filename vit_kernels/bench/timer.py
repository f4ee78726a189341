"""Timing: CUDA events on a GPU, ``time.perf_counter`` on the CPU; statistics; CUDA graphs.

On a GPU, kernels run asynchronously: a host clock around ``fn()`` measures the launch, not the
work. :class:`EventTimer` records a CUDA event before and after each repeat on the current
stream, synchronizes ONCE after all repeats (so the host never stalls the queue between them)
and reads ``start.elapsed_time(end)``. The device is synchronized before the first repeat so
that earlier work (warm-up, allocation) does not leak into it. On the CPU, work is synchronous
and :class:`WallTimer` reads ``time.perf_counter``.

A repeat may run ``inner`` calls back to back (chosen so that one repeat lasts at least
``min_repeat_ms``): very short calls are then not dominated by the event resolution (~0.5 us)
or the host's launch latency, and ms per call is the repeat's time / inner.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, List, Optional, Sequence

import torch


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
    return Stats(statistics.median(v), percentile(v, 20), percentile(v, 80), v[0], v[-1],
                 statistics.fmean(v), statistics.pstdev(v), len(v))


class WallTimer:
    """Host clock timer for synchronous (CPU) work. ``clock`` returns seconds."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._spans: List[List[float]] = []

    def fresh(self) -> "WallTimer":
        return WallTimer(self.clock)

    def synchronize(self) -> None:
        pass

    def start(self) -> None:
        self._spans.append([self.clock()])

    def stop(self) -> None:
        self._spans[-1].append(self.clock())

    def elapsed_ms(self) -> List[float]:
        return [(b - a) * 1e3 for a, b in self._spans]


class EventTimer:
    """CUDA event timer: events recorded on the current stream around each repeat, one
    synchronize before reading them. ``event_factory`` and ``synchronize`` default to
    torch.cuda's (they are parameters so the logic can be tested without a GPU)."""

    def __init__(self, event_factory: Optional[Callable] = None, synchronize: Optional[Callable] = None):
        self.event_factory = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._sync = synchronize or torch.cuda.synchronize
        self._pairs: List[list] = []

    def fresh(self) -> "EventTimer":
        return EventTimer(self.event_factory, self._sync)

    def synchronize(self) -> None:
        self._sync()

    def start(self) -> None:
        e = self.event_factory()
        e.record()
        self._pairs.append([e])

    def stop(self) -> None:
        e = self.event_factory()
        e.record()
        self._pairs[-1].append(e)

    def elapsed_ms(self) -> List[float]:
        self._sync()  # every event has completed before any is read
        return [a.elapsed_time(b) for a, b in self._pairs]


def timer_for(device: torch.device):
    return EventTimer() if device.type == "cuda" else WallTimer()


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Per-call times (ms) of each repeat, and how many calls each repeat ran."""

    times_ms: List[float]
    inner: int

    @property
    def stats(self) -> Stats:
        return summarize(self.times_ms)


def measure(fn: Callable[[], object], *, device: torch.device, warmup: int = 10, repeats: int = 30,
            min_repeat_ms: float = 0.0, max_inner: int = 1000, before_repeat: Optional[Callable] = None,
            timer=None) -> Measurement:
    """Time ``fn()``: ``warmup`` calls, then ``repeats`` timed repeats of ``inner`` calls each.

    inner = ceil(min_repeat_ms / one call's time) (1 when min_repeat_ms is 0), at most max_inner.
    before_repeat: called before each repeat, outside the timed span (e.g. an L2 flush).
    """
    if warmup < 0:
        raise ValueError(f"warmup: expected >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    timer = timer if timer is not None else timer_for(device)
    for _ in range(warmup):
        fn()
    inner = 1
    if min_repeat_ms > 0:
        probe = timer.fresh()
        probe.synchronize()
        probe.start()
        fn()
        probe.stop()
        one = max(probe.elapsed_ms()[0], 1e-6)
        inner = max(1, min(max_inner, math.ceil(min_repeat_ms / one)))
    timer.synchronize()
    for _ in range(repeats):
        if before_repeat is not None:
            before_repeat()
        timer.start()
        for _ in range(inner):
            fn()
        timer.stop()
    times = [t / inner for t in timer.elapsed_ms()]
    return Measurement(times, inner)


class L2Flush:
    """Overwrites a buffer larger than the GPU's L2 before each repeat, so a repeat does not read
    its inputs from the cache the previous repeat warmed (as triton.testing.do_bench does)."""

    def __init__(self, device: torch.device, nbytes: int = 256 * 1024 * 1024):
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def cuda_graph(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """Capture ``fn`` (static inputs, no host sync inside) into a CUDA graph; returns its replay.

    Warm-up runs on a side stream first, as torch.cuda.graphs requires (autotuning, lazy
    allocation and cuBLAS workspace creation must happen outside the capture).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device; none is available")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
