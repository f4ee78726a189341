"""Text for the cost models (vit_kernels.bench.cost and cost_kernels): tables and readable reports."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .cost import BlockCost, Step, bound_seconds
from .cost_kernels import KernelCost, Machine, path_seconds
from .peaks import Peak


def _fmt_bytes(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


def steps_table(steps: Sequence[Step], A: float, peak: Optional[Peak], dtype: torch.dtype) -> List[Dict]:
    """Rows (dicts) for a table of steps: FLOPs, bytes, bytes in A, roofline time on ``peak``."""
    rows = []
    tflops = peak.tflops(dtype) if peak is not None else None
    for s in steps:
        r = {"step": s.name, "gflop": s.flops / 1e9, "bytes": s.bytes, "A": s.bytes / A}
        if tflops is not None:
            r["bound_ms"] = s.seconds(tflops, peak.bandwidth_gbs) * 1e3
            r["limit"] = "compute" if s.flops / (tflops * 1e12) >= s.bytes / (peak.bandwidth_gbs * 1e9) else "memory"
        rows.append(r)
    return rows


def block_report(bc: BlockCost, peak: Optional[Peak], dtype: torch.dtype) -> str:
    """A readable account of one block: the eager steps and the planned fused kernels, in units
    of A, with totals and (for a named GPU) roofline bounds."""
    s = bc.shape
    tflops = peak.tflops(dtype) if peak is not None else None
    head = (
        f"one block: batch {s.batch} x {s.tokens} tokens, dim {s.dim}, {s.heads} heads, hidden {s.hidden}, "
        f"{s.elem}-byte elements; A = {_fmt_bytes(s.A)}; weights {_fmt_bytes(bc.weight_bytes)} "
        f"({bc.in_A(bc.weight_bytes):.2f}A); FLOPs {bc.flops / 1e12:.3f} TFLOP "
        f"(attention {4.0 * s.batch * s.tokens**2 * s.dim / bc.flops * 100:.1f}%)"
    )
    lines = [head]
    for title, steps in (
        ("eager PyTorch (SDPA)", bc.eager),
        ("fused kernels (the planned fused block)", bc.fused),
        ("fused ops at their minimum", bc.op_min),
    ):
        lines.append(f"  {title}:")
        for r in steps_table(steps, s.A, peak, dtype):
            t = f"  {r['bound_ms']:.3f} ms ({r['limit']})" if "bound_ms" in r else ""
            lines.append(f"    {r['step']:<40}{r['gflop']:>10.1f} GFLOP {r['A']:>7.2f}A{t}")
        total = sum(x.bytes for x in steps)
        b = f", bound {bound_seconds(steps, peak, dtype) * 1e3:.3f} ms on {peak.name}" if tflops else ""
        lines.append(f"    {'total':<40}{'':>16} {total / s.A:>7.2f}A = {_fmt_bytes(total)}{b}")
    lines.append(
        f"  one kernel for the whole block: {bc.in_A(bc.one_kernel_min_bytes):.2f}A "
        f"({_fmt_bytes(bc.one_kernel_min_bytes)})"
    )
    return "\n".join(lines)


def kernels_report(
    title: str,
    paths: Dict[str, List[KernelCost]],
    machine: Optional[Machine],
    dtype: torch.dtype,
    measured_ms: Optional[Dict[str, float]] = None,
) -> str:
    """The kernels of each path (cost_kernels' ``*_paths``): tensor-core GFLOP as executed, HBM bytes
    (first reads and writes), L2 re-read bytes, and with a machine the modeled time and its limit; per path
    the total, and ``measured_ms[path]`` beside it where given (timed on a GPU)."""
    measured_ms = measured_ms or {}
    lines = [
        title
        + (
            f" (modeled on {machine.peak.name}: {machine.sms} SMs, L2 {machine.l2_gbs / 1e3:.1f} TB/s "
            f"and load latencies {machine.latency_ns:.0f} / {machine.l2_latency_ns:.0f} ns assumed)"
            if machine is not None
            else ""
        )
    ]
    for path, kernels in paths.items():
        lines.append(f"  {path}:")
        for k in kernels:
            t = ""
            if machine is not None and k.seconds(machine, dtype) is not None:
                t = f"  {k.seconds(machine, dtype) * 1e3:8.4f} ms ({k.limit(machine, dtype)})"
            lines.append(
                f"    {k.name:<44}{k.flops / 1e9:>9.2f} GFLOP  HBM {_fmt_bytes(k.dram_bytes):>10}  "
                f"L2 re-reads {_fmt_bytes(k.l2_bytes):>10}{t}"
            )
        total = (
            f"    {'total':<44}{sum(k.flops for k in kernels) / 1e9:>9.2f} GFLOP  HBM "
            f"{_fmt_bytes(sum(k.dram_bytes for k in kernels)):>10}  L2 re-reads "
            f"{_fmt_bytes(sum(k.l2_bytes for k in kernels)):>10}"
        )
        modeled = path_seconds(kernels, machine, dtype) if machine is not None else None
        if modeled is not None:
            total += f"  {modeled * 1e3:8.4f} ms modeled"
        if path in measured_ms:
            total += f", {measured_ms[path]:.4f} ms measured"
        lines.append(total)
    return "\n".join(lines)
