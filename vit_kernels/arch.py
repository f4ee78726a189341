"""Facts about NVIDIA GPU architectures and GPUs: the one home of every number the kernels, the
static reports (inspect, aot), the cost model and the benchmarks use. Nothing here imports the rest
of vit_kernels (it is the lowest layer beside :mod:`vit_kernels.dtypes`).

- per compute capability (80 = sm_80, 90 = sm_90, ...): shared memory per block and per SM, the
  occupancy calculator's limits (:data:`SHARED_PER_BLOCK`, :data:`SHARED_PER_SM`, ...);
- per GPU: SM count, dense tensor-core peaks and memory bandwidth (:data:`PEAKS`, :class:`Peak`),
  found by device name (:func:`lookup`) or by a key the user types (:func:`by_key`).

Sources: the CUDA C++ Programming Guide's "Technical Specifications per Compute Capability" table
(shared memory, registers, warps, blocks) and the vendors' datasheets (SMs, peaks, bandwidth).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional

import torch

# ---------------------------------------------------------------------------------------------
# Per compute capability

# Largest shared memory one thread block can use (the opt-in maximum), bytes.
SHARED_PER_BLOCK: Dict[int, int] = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Shared memory per SM, bytes (what resident blocks share).
SHARED_PER_SM: Dict[int, int] = {80: 164 * 1024, 86: 100 * 1024, 87: 164 * 1024, 89: 100 * 1024, 90: 228 * 1024}
SHARED_RESERVED = 1024  # bytes the driver reserves per block (sm_80 and later)
# Occupancy limits of sm_80 and sm_90 (the architectures the kernels are built and inspected for).
REGS_PER_SM, REG_ALLOC_UNIT, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 256, 64, 32


def shared_per_block(arch: int) -> int:
    """Largest shared memory per block of sm_<arch>: the table above, else 99 KB for an sm_8x/9x not
    listed and 48 KB before sm_80."""
    return SHARED_PER_BLOCK.get(arch, 99 * 1024 if arch >= 80 else 48 * 1024)


def shared_limits_by_name() -> Dict[str, int]:
    """SHARED_PER_BLOCK keyed by "sm_80"-style names (the inspect and resource reports' arch field)."""
    return {f"sm_{arch}": limit for arch, limit in SHARED_PER_BLOCK.items()}


# ---------------------------------------------------------------------------------------------
# Per GPU: SM counts and peaks


@dataclasses.dataclass(frozen=True)
class Peak:
    """One GPU's datasheet figures. TFLOP/s are dense (WITHOUT structured sparsity), boost clocks,
    fp32 accumulation for fp16/bf16 (what PyTorch's matmuls use); None where the GPU has no such
    tensor-core path."""

    key: str
    name: str
    pattern: str  # regex matched (case-insensitive) against torch.cuda.get_device_name()
    bf16_tflops: Optional[float]
    fp16_tflops: Optional[float]
    tf32_tflops: Optional[float]
    fp32_tflops: float  # CUDA cores, no tensor cores (PyTorch's fp32 matmul default)
    bandwidth_gbs: float  # HBM/GDDR, GB/s (1e9 bytes/s)
    sms: Optional[int] = None  # streaming multiprocessors

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


def _p(key, name, pattern, bf16, fp16, tf32, fp32, bw, sms):
    return Peak(key, name, pattern, bf16, fp16, tf32, fp32, bw, sms)


# Most specific first: the first pattern that matches the device name wins.
PEAKS = (
    _p("b200", "B200", r"\bB200\b", 2250, 2250, 1100, 75, 8000, 148),
    _p("h200-nvl", "H200 NVL", r"\bH200\b.*\bNVL\b", 835, 835, 417, 60, 4800, 132),
    _p("h200", "H200 SXM", r"\bH200\b", 989, 989, 494, 67, 4800, 132),
    _p("h100-pcie", "H100 PCIe", r"\bH100\b.*\bPCIe\b", 756, 756, 378, 51, 2000, 114),
    _p("h100-nvl", "H100 NVL", r"\bH100\b.*\bNVL\b", 835, 835, 417, 60, 3900, 132),
    _p("h100", "H100 SXM", r"\bH100\b", 989, 989, 494, 67, 3350, 132),
    _p("a100-pcie-40gb", "A100 PCIe 40GB", r"\bA100\b.*PCIE.*40GB", 312, 312, 156, 19.5, 1555, 108),
    _p("a100-pcie", "A100 PCIe 80GB", r"\bA100\b.*PCIE", 312, 312, 156, 19.5, 1935, 108),
    _p("a100-40gb", "A100 SXM4 40GB", r"\bA100\b.*40GB", 312, 312, 156, 19.5, 1555, 108),
    _p("a100", "A100 SXM4 80GB", r"\bA100\b", 312, 312, 156, 19.5, 2039, 108),
    _p("l40s", "L40S", r"\bL40S\b", 362, 362, 183, 91.6, 864, 142),
    _p("l4", "L4", r"\bL4\b", 121, 121, 60, 30.3, 300, 58),
    _p("a10", "A10", r"\bA10\b", 125, 125, 62.5, 31.2, 600, 72),
    _p("rtx4090", "GeForce RTX 4090", r"\b4090\b", 165, 165, 82.6, 82.6, 1008, 128),
    _p("rtx3090", "GeForce RTX 3090", r"\b3090\b", 71, 71, 35.6, 35.6, 936, 82),
    _p("v100", "V100 SXM2", r"\bV100\b", None, 125, None, 15.7, 900, 80),
    _p("t4", "T4", r"\bT4\b", None, 65, None, 8.1, 320, 40),
)

ALIASES: Dict[str, str] = {
    "h100-sxm": "h100",
    "h200-sxm": "h200",
    "a100-sxm": "a100",
    "a100-80gb": "a100",
    "4090": "rtx4090",
    "3090": "rtx3090",
}


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
    raise ValueError(f"gpu: expected one of {[p.key for p in PEAKS]} (or a device name they match), got {key!r}")


def for_device(device: torch.device) -> Optional[Peak]:
    """The entry for a CUDA device, None for the CPU or a GPU not in the table."""
    if device.type != "cuda":
        return None
    return lookup(torch.cuda.get_device_name(device))
