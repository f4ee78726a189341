"""Resource usage of the csrc kernels without a GPU: nvcc compiles every ``csrc/**/*.cu`` to a cubin
for one architecture (``-cubin --resource-usage``), ptxas reports registers, spills and static shared
memory per kernel, and ``cuobjdump -sass`` counts the tensor-core instructions (HMMA: mma.sync;
HGMMA: Hopper wgmma).

``python -m vit_kernels inspect`` lists these beside the Triton kernels; tests/test_cuda_build.py
asserts zero spills. Results are cached in the JIT cache folder, keyed by the sources and flags.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional

from . import CSRC, GPU_CUDA_CFLAGS, BuildError, cache_dir, cu_sources, toolkit_root

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def _tool(root: str, name: str) -> str:
    p = Path(root) / "bin" / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if found:
        return found
    # Triton's wheel carries cuobjdump / nvdisasm (triton/backends/nvidia/bin)
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / name
        if p.exists():
            return str(p)
    raise BuildError(f"{name} not found in {root}/bin, on PATH or in triton's backends/nvidia/bin")


def _sources_key(arch: str, flags: List[str]) -> str:
    h = hashlib.sha256()
    h.update(("\n".join(["format 5", arch, *flags])).encode())
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and p.suffix in (".cu", ".cuh", ".h"):
            h.update(str(p.relative_to(CSRC)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:20]


def _demangle(names: List[str], root: str) -> Dict[str, str]:
    tool = None
    for cand in (Path(root) / "bin" / "cu++filt", shutil.which("c++filt")):
        if cand and Path(cand).exists():
            tool = str(cand)
            break
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _parse_ptxas(text: str) -> Dict[str, dict]:
    kernels: Dict[str, dict] = {}
    cur: Optional[dict] = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = kernels.setdefault(
                m.group(1), {"mangled": m.group(1), "regs": 0, "stack_bytes": 0, "spill_bytes": 0, "shared_bytes": 0}
            )
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m:
            cur["stack_bytes"] = int(m.group(1))
            cur["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _SMEM.search(line)
            cur["shared_bytes"] = int(s.group(1)) if s else 0
    return kernels


def _count_tensor_core(sass: str, pattern: str = r"\b((?:HMMA|HGMMA)[.\w]*)") -> Dict[str, List[str]]:
    """mangled kernel name -> the distinct tensor-core mnemonics in its SASS (e.g. HMMA.16816.F32),
    or of the instructions ``pattern`` matches."""
    found: Dict[str, set] = {}
    cur = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            found.setdefault(cur, set())
            continue
        m = re.search(pattern, line)
        if cur and m:
            found[cur].add(m.group(1))
    return {k: sorted(v) for k, v in found.items()}


# Copies into shared memory in the SASS: LDGSTS is cp.async, UTMALDG a TMA bulk tensor load.
_COPIES = r"\b(LDGSTS|UTMALDG|UBLKCP)\b"


def _attention_dynamic_smem(config: str) -> Optional[int]:
    """Dynamic shared memory of a flash_fwd_kernel instantiation ("fp16, 64"), read from the
    kernel's own traits through the extension (the host-emulation build: same constexprs)."""
    m = re.fullmatch(r"(fp16|bf16|fp32), (\d+)", config)
    if not m:
        return None
    import torch

    from . import module_for
    from ..dtypes import SHORT_NAMES

    dtype = SHORT_NAMES[m.group(1)]
    return int(module_for(torch.device("cpu")).flash_attention_smem_bytes(dtype, int(m.group(2))))


def _expects_tensor_cores(kernel: str, config: str) -> bool:
    """GEMMs on 16-bit inputs and every attention instantiation (fp32 runs as split fp16 pairs)
    use mma.sync; the fp32 GEMM is an FMA path and the statistics kernels have no matmul."""
    if "flash_fwd_kernel" in kernel or "selftest_mma" in kernel:
        return True
    return "gemm_kernel" in kernel and not config.startswith("fp32")


def _gemm_dynamic_smem(name: str) -> Optional[int]:
    """Dynamic shared memory of a GEMM instantiation, from its template arguments (gemm.cuh's Layout)."""
    m = re.search(r"gemm_kernel<([^,]+), vk::gemm_detail::TileCfg<(\d+), (\d+), (\d+), \d+, \d+, (\d+)>", name)
    if not m:
        return None
    size = 4 if m.group(1).strip() == "float" else 2
    bm, bn, bk, stages = (int(m.group(i)) for i in (2, 3, 4, 5))
    return (bm + bn) * (bk + 16 // size) * size * stages


def _strip_params(name: str) -> str:
    """A demangled function name without its trailing parameter list."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += name[i] == ")"
        depth -= name[i] == "("
        if depth == 0:
            return name[:i]
    return name


def _config_of(name: str) -> str:
    """The template arguments of a kernel name (what distinguishes its instantiations)."""
    i = name.find("<")
    if i < 0:
        return ""
    depth, j = 0, i
    for j in range(i, len(name)):
        depth += name[j] == "<"
        depth -= name[j] == ">"
        if depth == 0:
            break
    return name[i + 1 : j]


# the names of vk::ALoad / vk::Epi (csrc/include/vk/gemm.h), in value order
_ENUMS = {"vk::ALoad": ("dense", "layernorm", "patch", "patch_u8"), "vk::Epi": ("rows", "qkv", "patch")}


def _pretty_config(config: str) -> str:
    """Template arguments made readable: tile shapes and enum names instead of casts."""

    def enum(m):
        names = _ENUMS.get(m.group(1))
        i = int(m.group(2))
        return names[i] if names and i < len(names) else m.group(0)

    config = re.sub(r"\((vk::\w+)\)(\d+)", enum, config)
    config = re.sub(
        r"vk::gemm_detail::TileCfg<(\d+), (\d+), (\d+), (\d+), (\d+), (\d+)>",
        r"tile \1x\2x\3 warp \4x\5 stages \6",
        config,
    )
    return config.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("float", "fp32")


def _compile_one(src: Path, arch: str, flags: List[str], nvcc: str, cuobjdump: str, tmp: str) -> List[dict]:
    cubin = Path(tmp) / (src.stem + f".{arch}.cubin")
    cmd = [
        nvcc,
        "-cubin",
        f"-arch={arch}",
        "--resource-usage",
        "-std=c++20",
        f"-I{CSRC / 'include'}",
        *flags,
        str(src),
        "-o",
        str(cubin),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise BuildError(f"nvcc failed for {src.relative_to(CSRC)} ({arch}):\n{p.stderr[-4000:]}")
    kernels = _parse_ptxas(p.stdout + p.stderr)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True).stdout
    tc = _count_tensor_core(sass)
    copies = _count_tensor_core(sass, _COPIES)
    for k in kernels.values():
        k["tensor_core_instructions"] = tc.get(k["mangled"], [])
        k["sass_copy_instructions"] = copies.get(k["mangled"], [])
        k["source"] = str(src.relative_to(CSRC))
    return list(kernels.values())


def resource_usage(arch: str = "sm_80", *, refresh: bool = False) -> List[dict]:
    """Per-kernel resources of every csrc kernel compiled for ``arch`` ("sm_80", "sm_90", or 80 / "9.0").

    Returns a list of dicts: kernel (demangled name without template arguments), config (its template
    arguments), arch, source, regs, spill_bytes (spill stores + loads), stack_bytes, shared_bytes
    (static; plus the dynamic amount where it follows from the template, see dynamic_shared_bytes),
    dynamic_shared_bytes (None when set at launch by other means), tensor_core_instructions (the
    distinct HMMA / HGMMA mnemonics in the SASS), sass_copy_instructions (LDGSTS: cp.async, UTMALDG:
    TMA), has_dot (whether tensor cores are expected). Needs nvcc and cuobjdump (the toolkit found by
    :func:`vit_kernels.cuda.toolkit_root`); no GPU. Raises :class:`BuildError` when they fail.
    """
    arch = str(arch)
    if re.fullmatch(r"\d+\.\d+", arch):
        arch = "sm_" + arch.replace(".", "")
    elif re.fullmatch(r"\d+", arch):
        arch = "sm_" + arch
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch: expected e.g. 'sm_80', 'sm_90', 80 or '9.0', got {arch!r}")
    root, how = toolkit_root()
    if root is None:
        raise BuildError(f"no CUDA toolkit found: {how}")
    nvcc, cuobjdump = _tool(root, "nvcc"), _tool(root, "cuobjdump")
    flags = [f for f in GPU_CUDA_CFLAGS if f != "-lineinfo"]
    cache = cache_dir() / "resource_usage" / f"{arch}-{_sources_key(arch, flags)}.json"
    if cache.is_file() and not refresh:  # labels made again: a cache written before a name was added
        return [dict(r, config=_pretty_config(r["config"])) for r in json.loads(cache.read_text())]

    sources = cu_sources()
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workers = max(1, min(len(sources), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(_compile_one, s, arch, flags, nvcc, cuobjdump, tmp) for s in sources]
            for f in futures:
                rows.extend(f.result())
    names = _demangle([r["mangled"] for r in rows], root)
    out = []
    for r in rows:
        name = names[r["mangled"]]
        if name.startswith("void "):
            name = name[len("void ") :]
        name = name.replace("(anonymous namespace)::", "")
        head = _strip_params(name)
        base = head.split("<", 1)[0]
        config = _pretty_config(_config_of(head))
        dyn = _gemm_dynamic_smem(name)
        if dyn is None and "flash_fwd_kernel" in base:
            dyn = _attention_dynamic_smem(config)
        out.append(
            {
                "kernel": base,
                "config": config,
                "arch": arch,
                "backend": "cuda",
                "has_dot": _expects_tensor_cores(base, config),
                "source": r["source"],
                "regs": r["regs"],
                "spill_bytes": r["spill_bytes"],
                "stack_bytes": r["stack_bytes"],
                "shared_bytes": r["shared_bytes"] + (dyn or 0),
                "dynamic_shared_bytes": dyn,
                "tensor_core_instructions": r["tensor_core_instructions"],
                "sass_copy_instructions": r["sass_copy_instructions"],
            }
        )
    out.sort(key=lambda r: (r["source"], r["kernel"], r["config"]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, cache)  # atomic: a reader in another process sees the old file or the whole new one
    return out
