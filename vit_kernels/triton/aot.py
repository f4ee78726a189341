"""Ahead-of-time compilation specs: each Triton module lists every configuration the library can
launch, so ``python -m vit_kernels inspect`` can compile them for sm_80/sm_90 without a GPU."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One launchable configuration of one @triton.jit kernel.

    kernel: the name to report; fn: the @triton.jit function; signature: every argument name ->
    Triton type string ("*fp16", "*fp32", "*bf16", "i32", "i64", "fp32", or "constexpr");
    constexprs: constexpr argument name -> value; config: a short label such as
    "BLOCK_M=64,BLOCK_N=64,fp16"; has_dot: whether the kernel has a tl.dot (tensor cores expected);
    archs: the compute capabilities this configuration is launched on.
    """

    kernel: str
    fn: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: int
    config: str
    has_dot: bool
    archs: Tuple[int, ...] = (80, 90)


TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def ptr_type(dtype) -> str:
    """torch dtype -> Triton pointer type string, e.g. torch.float16 -> "*fp16"."""
    return "*" + TRITON_TYPES[str(dtype).replace("torch.", "")]
