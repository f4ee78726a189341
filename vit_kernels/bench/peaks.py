"""Peak throughput of known GPUs: dense tensor-core TFLOP/s per dtype and HBM bandwidth.

Figures are the vendor datasheet numbers WITHOUT structured sparsity (the "with sparsity"
figures are halved), boost clocks, fp32 accumulation for fp16/bf16 (what PyTorch's matmuls use).
A device is found by its ``torch.cuda.get_device_name()`` (``lookup``) or by a key the user
types (``by_key``: ``--gpu h100``). Percent-of-peak and roofline bounds are only as good as this
table; a device that is not in it gets no percentage rather than a guessed one.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional

import torch


@dataclasses.dataclass(frozen=True)
class Peak:
    """Peaks of one GPU. TFLOP/s are dense; None where the GPU has no such tensor-core path."""

    key: str
    name: str
    pattern: str  # regex matched (case-insensitive) against torch.cuda.get_device_name()
    bf16_tflops: Optional[float]
    fp16_tflops: Optional[float]
    tf32_tflops: Optional[float]
    fp32_tflops: float  # CUDA cores, no tensor cores (PyTorch's fp32 matmul default)
    bandwidth_gbs: float  # HBM/GDDR, GB/s (1e9 bytes/s)

    def tflops(self, dtype: torch.dtype, tf32: Optional[bool] = None) -> Optional[float]:
        """The peak TFLOP/s for matmuls in ``dtype``; fp32 uses tensor cores (TF32) only when
        ``tf32`` is true (default: ``torch.backends.cuda.matmul.allow_tf32``)."""
        if dtype == torch.bfloat16:
            return self.bf16_tflops
        if dtype == torch.float16:
            return self.fp16_tflops
        if dtype == torch.float32:
            if tf32 is None:
                tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
            return self.tf32_tflops if tf32 else self.fp32_tflops
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")


def _p(key, name, pattern, bf16, fp16, tf32, fp32, bw):
    return Peak(key, name, pattern, bf16, fp16, tf32, fp32, bw)


# Most specific first: the first pattern that matches the device name wins.
PEAKS = (
    _p("b200", "B200", r"\bB200\b", 2250, 2250, 1100, 75, 8000),
    _p("h200-nvl", "H200 NVL", r"\bH200\b.*\bNVL\b", 835, 835, 417, 60, 4800),
    _p("h200", "H200 SXM", r"\bH200\b", 989, 989, 494, 67, 4800),
    _p("h100-pcie", "H100 PCIe", r"\bH100\b.*\bPCIe\b", 756, 756, 378, 51, 2000),
    _p("h100-nvl", "H100 NVL", r"\bH100\b.*\bNVL\b", 835, 835, 417, 60, 3900),
    _p("h100", "H100 SXM", r"\bH100\b", 989, 989, 494, 67, 3350),
    _p("a100-pcie-40gb", "A100 PCIe 40GB", r"\bA100\b.*PCIE.*40GB", 312, 312, 156, 19.5, 1555),
    _p("a100-pcie", "A100 PCIe 80GB", r"\bA100\b.*PCIE", 312, 312, 156, 19.5, 1935),
    _p("a100-40gb", "A100 SXM4 40GB", r"\bA100\b.*40GB", 312, 312, 156, 19.5, 1555),
    _p("a100", "A100 SXM4 80GB", r"\bA100\b", 312, 312, 156, 19.5, 2039),
    _p("l40s", "L40S", r"\bL40S\b", 362, 362, 183, 91.6, 864),
    _p("l4", "L4", r"\bL4\b", 121, 121, 60, 30.3, 300),
    _p("a10", "A10", r"\bA10\b", 125, 125, 62.5, 31.2, 600),
    _p("rtx4090", "GeForce RTX 4090", r"\b4090\b", 165, 165, 82.6, 82.6, 1008),
    _p("rtx3090", "GeForce RTX 3090", r"\b3090\b", 71, 71, 35.6, 35.6, 936),
    _p("v100", "V100 SXM2", r"\bV100\b", None, 125, None, 15.7, 900),
    _p("t4", "T4", r"\bT4\b", None, 65, None, 8.1, 320),
)

ALIASES: Dict[str, str] = {"h100-sxm": "h100", "h200-sxm": "h200", "a100-sxm": "a100",
                           "a100-80gb": "a100", "4090": "rtx4090", "3090": "rtx3090"}


def lookup(device_name: str) -> Optional[Peak]:
    """The table entry for a device name such as 'NVIDIA H100 80GB HBM3', or None."""
    for p in PEAKS:
        if re.search(p.pattern, device_name, flags=re.IGNORECASE):
            return p
    return None


def by_key(key: str) -> Peak:
    """The entry for a user-typed key (``h100``, ``a100-40gb``, ``l4``, ...) or a device name;
    raises ValueError listing the known keys."""
    k = key.strip().lower()
    k = ALIASES.get(k, k)
    for p in PEAKS:
        if p.key == k:
            return p
    p = lookup(key)
    if p is not None:
        return p
    raise ValueError(f"gpu: expected one of {[p.key for p in PEAKS]} (or a device name they match), "
                     f"got {key!r}")


def for_device(device: torch.device) -> Optional[Peak]:
    """The entry for a CUDA device, None for the CPU or a GPU not in the table."""
    if device.type != "cuda":
        return None
    return lookup(torch.cuda.get_device_name(device))


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
            notes.append(f"{torch.cuda.get_device_name(device)} is not in the peaks table: no {what} "
                         f"(pass --gpu KEY to use a known GPU's peaks)")
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
        rows.append(f"{p.key:<16}{p.name:<18}{f(p.bf16_tflops):>7}{f(p.fp16_tflops):>7}"
                    f"{f(p.tf32_tflops):>7}{f(p.fp32_tflops):>7}{p.bandwidth_gbs:>7g}")
    return "\n".join(rows)
