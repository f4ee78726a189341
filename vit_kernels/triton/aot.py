"""Ahead-of-time compilation specs: each Triton module lists every configuration the library can
launch, so ``python -m vit_kernels inspect`` can compile them for sm_80/sm_90 without a GPU.

What is compiled is what a launch compiles. Triton's JIT specializes every launch on its arguments
(an integer equal to 1 becomes a constant, integers and pointers divisible by 16 are compiled as
such, which is what lets loads vectorize); a report compiled without those facts describes other
code. So no module writes its specialization by hand: each ``aot_specs()`` calls its own host
launcher on empty CPU tensors of a representative shape (:data:`REPRESENTATIVE`) inside
:func:`record_launches`, which captures the ``kernel[grid](*args, **kwargs)`` calls instead of
running them, and :func:`launch_spec` turns a captured call into an :class:`AotSpec` with Triton's
own binder (``triton.runtime.jit.create_function_from_signature`` and ``JITFunction._pack_args``,
the two steps ``JITFunction.run`` takes before it compiles).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..arch import (
    MAX_BLOCKS_PER_SM,
    MAX_WARPS_PER_SM,
    REG_ALLOC_UNIT,
    REGS_PER_SM,
    SHARED_PER_BLOCK,
    SHARED_PER_SM,
    SHARED_RESERVED,
)

# The shape the report compiles at, stated once: ViT-B/16 at 224 px and batch 32 (197 tokens,
# dim 768, 12 heads of 64). Specialization depends only on which sizes, strides and pointers are
# multiples of 16 (or equal to 1), so this stands for every ViT whose dim and head_dim are multiples
# of 16 at any batch that is a multiple of 16; families sweep their own axes (head_dim, tokens,
# dtype, flags) around it. A batch that is not a multiple of 16 makes M = batch * tokens odd, which
# only changes the row masks' divisibility fact: another, equivalent compile at run time.
REPRESENTATIVE = dict(batch=32, tokens=197, dim=768, heads=12)


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One launchable configuration of one @triton.jit kernel, as a launch specializes it.

    kernel: the name to report; fn: the @triton.jit function; signature: every argument name ->
    Triton type string ("*fp16", "*fp32", "*bf16", "i32", "i64", "fp32", or "constexpr");
    constexprs: constexpr argument name -> value (the kernel's tl.constexpr arguments and the
    integers Triton made constant because they were 1); config: a short label such as
    "BLOCK_M=64,BLOCK_N=64,fp16"; has_dot: whether the kernel has a tl.dot (tensor cores expected);
    archs: the compute capabilities this configuration is launched on; divisible_by_16: argument
    names (pointers, ints) compiled as multiples of 16; attrs: argument name -> Triton's attribute
    list for it (e.g. [["tt.divisibility", 16]]), exactly as the JIT passes them to the compiler
    (None: derived from divisible_by_16); options: the launch's compile options (num_warps,
    num_stages, ...); shape: the launch shape it was recorded at.
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
    attrs: Optional[Dict[str, list]] = None
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    shape: str = ""

    def compile_attrs(self) -> Dict[Tuple[int, ...], list]:
        """attrs keyed as triton.compile wants them: (argument index,) -> attribute list."""
        names = list(self.fn.arg_names)
        attrs = self.attrs if self.attrs is not None else {n: [["tt.divisibility", 16]] for n in self.divisible_by_16}
        return {(names.index(n),): v for n, v in attrs.items() if v}

    def specialization(self) -> str:
        """The launch facts in one line: arguments made constant 1 and those divisible by 16."""
        ones = [n for n, v in self.constexprs.items() if v == 1 and _is_int_arg(self.fn, n)]
        return f"=1: {','.join(ones) or '-'}; %16: {','.join(self.divisible_by_16) or '-'}"


TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def ptr_type(dtype) -> str:
    """torch dtype -> Triton pointer type string, e.g. torch.float16 -> "*fp16"."""
    return "*" + TRITON_TYPES[str(dtype).replace("torch.", "")]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Recording launches and specializing them with Triton's own rules.


@dataclasses.dataclass
class Launch:
    """One captured ``kernel[grid](*args, **kwargs)`` call."""

    fn: Any  # the JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    args: tuple
    kwargs: dict
    grid: Any


@contextlib.contextmanager
def record_launches():
    """Within the block, Triton kernel launches are recorded into the yielded list instead of run
    (compiled or interpreted): host launchers can be driven with empty CPU tensors, no GPU, no
    compile. Not thread-safe: it swaps the ``run`` method of Triton's kernel classes. A launch plan
    made inside the block (vit_kernels.replay binds ``kernel.run``) records into the list while the
    block lasts and launches after it."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from ..backends import interpreter_enabled

    if interpreter_enabled():
        # The interpreter's bf16 probe reads a kernel's results and caches its verdict: run it now,
        # not while launches are only recorded.
        from .interpreter import bf16_flaw

        bf16_flaw()
    launches: List[Launch] = []
    active = [True]

    def run(self, *args, grid, warmup, **kwargs):
        if active[0]:
            launches.append(Launch(self, args, kwargs, grid))
            return None
        # a launch plan made inside the block keeps this run bound (vit_kernels.replay): after it, launch
        for cls, orig in saved:
            if isinstance(self, cls):
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
        raise TypeError(f"not a Triton kernel: {self!r}")  # pragma: no cover - only the classes above are swapped

    saved = [(cls, cls.__dict__["run"]) for cls in (JITFunction, InterpretedFunction)]
    for cls, _ in saved:
        cls.run = run
    try:
        yield launches
    finally:
        active[0] = False
        for cls, orig in saved:
            cls.run = orig


_JIT_OF: Dict[int, Any] = {}


def _jit_function(fn):
    """A JITFunction for ``fn``: itself, or, for an InterpretedFunction, one built from the same
    Python function with the same specialization options (building it compiles nothing)."""
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    if id(fn) not in _JIT_OF:
        opts = {
            k: v
            for k, v in getattr(fn, "kwargs", {}).items()
            if k in ("do_not_specialize", "do_not_specialize_on_alignment")
        }
        _JIT_OF[id(fn)] = JITFunction(fn.fn, **opts)
    return _JIT_OF[id(fn)]


def _is_int_arg(fn, name: str) -> bool:
    import inspect as _inspect

    p = _inspect.signature(getattr(fn, "fn", fn)).parameters[name]
    return "constexpr" not in str(p.annotation)


def specialize(launch: Launch, arch: int = 90):
    """(signature, constexprs, attrs, options) of ``launch`` as Triton's JIT computes them for a
    CUDA sm_<arch> target: names -> types, constexpr names -> values, names -> attribute lists,
    and the parsed compile options (a CUDAOptions)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit_function(launch.fn)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, launch.kwargs, bound_args, specialization, options)
    names = jit.arg_names
    constexprs = {names[k[0]]: v for k, v in constexprs.items()}
    attrs = {names[k[0]]: v for k, v in attrs.items()}
    return signature, constexprs, attrs, options


def launch_options(launch: Launch) -> Dict[str, Any]:
    """The launch's keyword arguments that are compile options (num_warps, num_stages, ...)."""
    names = set(_jit_function(launch.fn).arg_names)
    return {k: v for k, v in launch.kwargs.items() if k not in names}


def launch_spec(
    kernel: str, launch: Launch, config: str, has_dot: bool, archs: Tuple[int, ...] = (80, 90), shape: str = ""
) -> AotSpec:
    """The AotSpec that compiles exactly what ``launch`` compiles."""
    signature, constexprs, attrs, options = specialize(launch)
    opts = launch_options(launch)
    divisible = tuple(n for n, a in attrs.items() if ["tt.divisibility", 16] in a)
    return AotSpec(
        kernel,
        _jit_function(launch.fn),
        signature,
        constexprs,
        options.num_warps,
        options.num_stages,
        config,
        has_dot,
        tuple(archs),
        divisible,
        attrs,
        opts,
        shape,
    )


def recorded_spec(
    kernel: str,
    fn,
    call: Callable[[], Any],
    config: str,
    has_dot: bool,
    archs: Tuple[int, ...] = (80, 90),
    shape: str = "",
) -> AotSpec:
    """Run ``call()`` (a host launcher on empty CPU tensors) with launches recorded, and return the
    AotSpec of its one launch of ``fn`` (other kernels it launches, e.g. row statistics, are left
    to their own module's aot_specs)."""
    with record_launches() as launches:
        call()
    mine = [la for la in launches if getattr(la.fn, "fn", None) is getattr(fn, "fn", fn)]
    if len(mine) != 1:
        raise RuntimeError(
            f"{kernel}: expected one launch of {getattr(fn, '__name__', fn)}, recorded "
            f"{[getattr(la.fn, '__name__', '?') for la in launches]}"
        )
    return launch_spec(kernel, mine[0], config, has_dot, archs, shape)


def launch_label(launch: Launch) -> str:
    """A launch in one line: its keywords (constexprs and options) but those that are 0 or False (flags
    off), then the dtypes of its tensors in argument order, e.g. "BLOCK_R=32,HAS_LS=1,num_warps=4,float16,float32"."""
    import torch

    def text(v):
        return str(int(v)) if isinstance(v, bool) else str(v)

    parts = [f"{k}={text(v)}" for k, v in launch.kwargs.items() if not (isinstance(v, (bool, int)) and v == 0)]
    dtypes = []
    for a in launch.args:
        if isinstance(a, torch.Tensor) and dtype_name(a.dtype) not in dtypes:
            dtypes.append(dtype_name(a.dtype))
    return ",".join(parts + dtypes)


def recorded_specs(
    call: Callable[[], Any], kernels: Dict[Any, Tuple[str, bool]], shape: str = "", archs: Tuple[int, ...] = (80, 90)
) -> List[AotSpec]:
    """Run ``call()`` (host launchers on empty CPU tensors) with launches recorded, and return one
    AotSpec per launch of a function in ``kernels`` ({@triton.jit function: (name to report, has_dot)}),
    labelled by :func:`launch_label`, without repeats (same :func:`spec_key`); launches of other
    kernels are left to their own module's aot_specs."""
    with record_launches() as launches:
        call()
    by_fn = {getattr(fn, "fn", fn): v for fn, v in kernels.items()}
    specs: Dict[tuple, AotSpec] = {}
    for la in launches:
        hit = by_fn.get(getattr(la.fn, "fn", la.fn))
        if hit is not None:
            spec = launch_spec(hit[0], la, launch_label(la), hit[1], archs, shape)
            specs.setdefault(spec_key(spec), spec)
    return list(specs.values())


def unique_specs(specs: List[AotSpec]) -> List[AotSpec]:
    """``specs`` without repeats (same :func:`spec_key`), first kept."""
    out: Dict[tuple, AotSpec] = {}
    for s in specs:
        out.setdefault(spec_key(s), s)
    return list(out.values())


def spec_key(spec: AotSpec) -> tuple:
    """What decides the compiled code: the kernel, its signature, constants, attributes, options."""

    def frozen(d):
        return tuple(sorted((k, repr(v)) for k, v in d.items()))

    fn = getattr(spec.fn, "fn", spec.fn)
    return (
        f"{fn.__module__}.{fn.__qualname__}",
        frozen(spec.signature),
        frozen(spec.constexprs),
        frozen(spec.attrs or {n: [["tt.divisibility", 16]] for n in spec.divisible_by_16}),
        spec.num_warps,
        spec.num_stages,
        frozen(spec.options),
    )


def launch_key(launch: Launch) -> tuple:
    """spec_key of what ``launch`` compiles."""
    signature, constexprs, attrs, options = specialize(launch)
    fn = _jit_function(launch.fn)
    return spec_key(
        AotSpec(
            "",
            fn,
            signature,
            constexprs,
            options.num_warps,
            options.num_stages,
            "",
            False,
            attrs=attrs,
            options=launch_options(launch),
        )
    )


# ---------------------------------------------------------------------------------------------
# Compiling a spec ahead of time and reading the GPU facts out of the PTX and cubin (no GPU needed).
# (Shared memory, register and occupancy limits: vit_kernels.arch.)


def _tool(name: str) -> str:
    import os

    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cubin_facts(cubin: bytes, kernel_name: str) -> Dict[str, Any]:
    """Registers, spill (stack + local) bytes and static shared memory from ``cuobjdump -res-usage``,
    and the tensor-core instruction mnemonics found in the SASS (HMMA: mma.sync, HGMMA: wgmma, ...)
    and the copy instructions (LDGSTS: cp.async, UTMALDG: a TMA bulk tensor load)."""
    import re
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line for {kernel_name}:\n{res}")
    regs, stack, shared, local = map(int, m.groups())
    tc = sorted(set(re.findall(r"\b(HGMMA|HMMA|IMMA|UTCHMMA|UTCMMA)\b", sass)))
    copies = sorted(set(re.findall(r"\b(LDGSTS|UTMALDG|UBLKCP|UTMASTG)\b", sass)))
    return {
        "regs": regs,
        "spill_bytes": stack + local,
        "static_shared_bytes": shared,
        "tensor_core_instructions": tc,
        "sass_copy_instructions": copies,
    }


def ptx_facts(ptx: str) -> Dict[str, Any]:
    """What the PTX says about speed: the tensor-core instruction kind ("wgmma", "mma.sync" or
    "-"), bulk tensor copies (TMA, cp.async.bulk.tensor), asynchronous copies to shared memory
    (cp.async), and the widest global load (ld.global or cp.async) and store in bits (128: 16-byte
    vectors; 16 or 32: scalar loads of one element)."""
    import re

    kind = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if re.search(r"\bmma\.sync\b", ptx) else "-"

    def widest(op: str) -> int:
        best = 0
        for vec, bits in re.findall(rf"\b{op}\.global(?:\.[a-z_:0-9]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
            best = max(best, int(vec or 1) * int(bits))
        return best

    cp_async = re.findall(
        r"\bcp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9_:]+)*\s*\[[^\]]*\],\s*\[[^\]]*\],"
        r"\s*(0x[0-9a-fA-F]+|\d+)",
        ptx,
    )
    cp_bits = max((8 * int(n, 0) for n in cp_async), default=0)
    return {
        "mma": kind,
        "tma": "cp.async.bulk.tensor" in ptx,
        "cp_async": bool(cp_async),
        "load_bits": max(widest("ld"), cp_bits),
        "store_bits": widest("st"),
    }


def blocks_per_sm(arch: int, regs: int, shared_bytes: int, num_warps: int) -> Dict[str, Any]:
    """Resident blocks per SM from registers, shared memory and warps (the CUDA occupancy
    calculator's rules: registers allocated per warp in units of 256, 1 KB of shared memory reserved
    per block), the limiting resource, and the warps per SM that gives."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "regs": (REGS_PER_SM // regs_per_warp) // num_warps,
        "shared": SHARED_PER_SM[arch] // (shared_bytes + SHARED_RESERVED),
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "occupancy_limit": min(limits, key=limits.get), "warps_per_sm": blocks * num_warps}


def compile_spec(spec: AotSpec, arch: int) -> Dict[str, Any]:
    """Compile ``spec`` for sm_<arch> with the launch's specialization and report what the inspect
    command prints.

    Must run with Triton's interpreter off (TRITON_INTERPRET unset): the interpreter replaces
    @triton.jit functions by Python ones that cannot be compiled.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.compile_attrs())
    options = {**spec.options, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    facts = cubin_facts(compiled.asm["cubin"], spec.kernel)
    shared = int(compiled.metadata.shared) + facts.pop("static_shared_bytes")
    row = {
        "kernel": spec.kernel,
        "backend": "triton",
        "arch": f"sm_{arch}",
        "config": spec.config,
        # the warps a block runs: num_warps, or more where Triton warp-specialized the kernel (tl.range(...,
        # warp_specialize=True) adds its producer and consumer partitions' warps)
        "num_warps": int(compiled.metadata.num_warps),
        "num_stages": spec.num_stages,
        "regs": facts["regs"],
        "spill_bytes": facts["spill_bytes"],
        "shared_bytes": shared,
        "shared_limit_bytes": SHARED_PER_BLOCK[arch],
        "has_dot": spec.has_dot,
        "tensor_core_instructions": facts["tensor_core_instructions"],
        "sass_copy_instructions": facts["sass_copy_instructions"],
        "specialization": spec.specialization(),
        "shape": spec.shape,
    }
    row.update(ptx_facts(compiled.asm["ptx"]))
    row.update(blocks_per_sm(arch, row["regs"], shared, row["num_warps"]))
    return row
