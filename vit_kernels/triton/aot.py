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
    archs: the compute capabilities this configuration is launched on; divisible_by_16: argument
    names (pointers, ints) compiled as multiples of 16, as Triton's launcher specializes them for
    aligned tensors and 16-multiple strides (without it loads cannot vectorize nor pipeline).
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
    divisible_by_16: Tuple[str, ...] = ()


TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def ptr_type(dtype) -> str:
    """torch dtype -> Triton pointer type string, e.g. torch.float16 -> "*fp16"."""
    return "*" + TRITON_TYPES[str(dtype).replace("torch.", "")]


# ---------------------------------------------------------------------------------------------
# Compiling a spec ahead of time and reading the GPU facts out of the cubin (no GPU needed).

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max shared memory per block (opt-in), bytes


def _tool(name: str) -> str:
    import os

    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cubin_facts(cubin: bytes, kernel_name: str) -> Dict[str, Any]:
    """Registers, spill (stack + local) bytes and static shared memory from ``cuobjdump -res-usage``,
    and the tensor-core instruction mnemonics found in the SASS (HMMA, HGMMA, ...)."""
    import re
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line for {kernel_name}:\n{res}")
    regs, stack, shared, local = map(int, m.groups())
    tc = sorted(set(re.findall(r"\b(HGMMA|HMMA|IMMA|UTCHMMA|UTCMMA)\b", sass)))
    return {"regs": regs, "spill_bytes": stack + local, "static_shared_bytes": shared,
            "tensor_core_instructions": tc}


def compile_spec(spec: AotSpec, arch: int) -> Dict[str, Any]:
    """Compile ``spec`` for sm_<arch> and report what the inspect command prints.

    Must run with Triton's interpreter off (TRITON_INTERPRET unset): the interpreter replaces
    @triton.jit functions by Python ones that cannot be compiled.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(spec.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible_by_16}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    facts = cubin_facts(compiled.asm["cubin"], spec.kernel)
    shared = int(compiled.metadata.shared) + facts.pop("static_shared_bytes")
    return {"kernel": spec.kernel, "backend": "triton", "arch": f"sm_{arch}", "config": spec.config,
            "num_warps": spec.num_warps, "num_stages": spec.num_stages, "regs": facts["regs"],
            "spill_bytes": facts["spill_bytes"], "shared_bytes": shared,
            "shared_limit_bytes": SHARED_LIMIT[arch], "has_dot": spec.has_dot,
            "tensor_core_instructions": facts["tensor_core_instructions"]}
