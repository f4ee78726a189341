"""Triton's interpreter (TRITON_INTERPRET=1, CPU tensors): what vit_kernels checks and guards.

- bf16: Triton 3.x's interpreter keeps bf16 as numpy uint16: its ``tl.dot`` multiplies those
  integers (garbage results) and its fp32 -> bf16 cast truncates instead of rounding to nearest
  even. A tiny probe kernel shows whether the running Triton has these flaws, so a bf16 call on the
  interpreter is refused with the reason rather than answered wrongly. (The test suite patches both
  flaws, test-only, in tests/conftest.py; a Triton that fixes them passes the probe.)
- threads: the interpreter keeps the running program's grid index and its patched ``tl``
  functions in module globals, so two threads launching at once corrupt each other's launch
  (seen with Triton 3.8: "x >= grid_dim[0]", "Did you forget to add @triton.jit ?").
  :func:`serialize_launches` makes interpreter launches in this process take one lock
  (vit_kernels.triton does it on import when the interpreter is on); GPU launches are untouched.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _bf16_probe_kernel(a_ptr, b_ptr, x_ptr, dot_ptr, cast_ptr, N: tl.constexpr):
    # a, b: (N, N) bf16 row-major; x: (N,) fp32 -> dot = a @ b (fp32), cast = x.to(bf16)
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])
    b = tl.load(b_ptr + i[:, None] * N + i[None, :])
    tl.store(dot_ptr + i[:, None] * N + i[None, :], tl.dot(a, b))
    tl.store(cast_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))


LAUNCH_LOCK = threading.RLock()  # held by every interpreter launch (see serialize_launches)
_PROBE_LOCK = threading.Lock()


def serialize_launches() -> None:
    """When Triton's interpreter is on, make every launch in this process take :data:`LAUNCH_LOCK`
    (the interpreter is not thread-safe, see above). Idempotent; nothing changes without the
    interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    from triton.runtime import interpreter

    with LAUNCH_LOCK:
        run = interpreter.InterpretedFunction.run
        if getattr(run, "_vit_kernels_serialized", False):
            return

        def locked_run(self, *args, **kwargs):
            with LAUNCH_LOCK:
                return run(self, *args, **kwargs)

        locked_run._vit_kernels_serialized = True
        interpreter.InterpretedFunction.run = locked_run


def bf16_flaw() -> Optional[str]:
    """None when the interpreter computes a bf16 dot and an fp32 -> bf16 cast like a GPU, else
    what it gets wrong. Runs one 16x16 probe launch on CPU tensors (the interpreter must be on),
    once per process: threads asking at the same time wait for the first probe."""
    with _PROBE_LOCK:
        return _bf16_probe()


@functools.lru_cache(maxsize=None)
def _bf16_probe() -> Optional[str]:
    with torch.autocast("cpu", enabled=False):  # (the first bf16 call may come under autocast: fp32 reference)
        return _bf16_probe_unscoped()


def _bf16_probe_unscoped() -> Optional[str]:
    serialize_launches()
    n = 16
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(torch.bfloat16)
    b = torch.randn(n, n, generator=g).to(torch.bfloat16)
    x = torch.randn(n, generator=g) * (1 + 2**-9)  # values that need rounding, not truncation
    dot = torch.full((n, n), float("nan"))
    cast = torch.full((n,), float("nan"), dtype=torch.bfloat16)
    _bf16_probe_kernel[(1,)](a, b, x, dot, cast, N=n)
    want = a.float() @ b.float()
    problems = []
    if not torch.allclose(dot, want, rtol=1e-3, atol=1e-3):
        problems.append("its bf16 tl.dot returns wrong values")
    if not torch.equal(cast, x.to(torch.bfloat16)):
        problems.append("its fp32 -> bf16 cast does not round to nearest even")
    if not problems:
        return None
    return (
        f"Triton {triton.__version__}'s interpreter mishandles bf16 ({'; '.join(problems)}): "
        f"use float16 or float32 on the CPU, or a CUDA device for bf16"
    )
