"""Peak throughput for the benchmarks' percent-of-peak and roofline columns: which GPU's peaks to
compare against (:func:`choose`) and the table as text (:func:`table_text`).

The figures themselves (dense tensor-core TFLOP/s per dtype, HBM bandwidth, SM counts) and their
lookup by device name or key live in :mod:`vit_kernels.arch` (re-exported here for the bench code).
Percent-of-peak and roofline bounds are only as good as that table; a device that is not in it gets
no percentage rather than a guessed one.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..arch import ALIASES, PEAKS, Peak, by_key, for_device, lookup

__all__ = ["ALIASES", "PEAKS", "Peak", "by_key", "for_device", "lookup", "choose", "table_text"]


def choose(key: Optional[str], device: torch.device, notes: list, what: str) -> Optional[Peak]:
    """The peaks to compare against: ``--gpu KEY`` when given, else the device's own (None on a CPU
    or a GPU not in the table). Appends to ``notes`` what a user should know; ``what`` names what
    is lost without peaks (e.g. "roofline bounds")."""
    if key:
        try:
            peak = by_key(key)
        except ValueError as e:
            raise SystemExit(str(e))
    elif device.type == "cuda":
        peak = for_device(device)
        if peak is None:
            notes.append(
                f"{torch.cuda.get_device_name(device)} is not in the peaks table: no {what} "
                f"(pass --gpu KEY to use a known GPU's peaks)"
            )
    else:
        peak = None
    if peak is not None and device.type != "cuda":
        notes.append(f"bounds are for {peak.name}; times were measured on the CPU, so no {what} is given")
    return peak


def table_text() -> str:
    """The table as text (for --help and the docs)."""
    rows = [f"{'key':<16}{'GPU':<18}{'bf16':>7}{'fp16':>7}{'tf32':>7}{'fp32':>7}{'GB/s':>7}"]
    for p in PEAKS:
        f = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
        rows.append(
            f"{p.key:<16}{p.name:<18}{f(p.bf16_tflops):>7}{f(p.fp16_tflops):>7}"
            f"{f(p.tf32_tflops):>7}{f(p.fp32_tflops):>7}{p.bandwidth_gbs:>7g}"
        )
    return "\n".join(rows)
