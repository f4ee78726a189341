"""``python -m vit_kernels inspect [--arch sm_80|sm_90] [--json]``: compile every kernel
configuration the library can launch, ahead of time and without a GPU, and report registers,
spills, shared memory and the tensor-core instructions in the SASS."""
from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys
from typing import Dict, List

from .arguments import positive_int

# The Triton modules whose aot_specs() list their launchable configurations.
TRITON_MODULES = ("attention", "attention_stats", "qkv_attention", "layernorm", "gemm", "mlp", "patch_embed")
ARCHS = {"sm_80": 80, "sm_90": 90}


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="compile every kernel for sm_80/sm_90 (no GPU) and report "
                                       "registers, spills, shared memory, tensor-core instructions")
    p.add_argument("--arch", choices=sorted(ARCHS), action="append",
                   help="architecture(s) to compile for (default: both)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("--backend", choices=["triton", "cuda", "all"], default="all")
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="compile in this many processes")


def triton_specs():
    """Every AotSpec of every Triton module (a module without aot_specs() is an error)."""
    specs = []
    for name in TRITON_MODULES:
        try:
            mod = importlib.import_module(f"vit_kernels.triton.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"vit_kernels.triton.{name}":
                continue  # this kernel family is not part of this version
            raise
        if not hasattr(mod, "aot_specs"):
            raise RuntimeError(f"vit_kernels.triton.{name} has no aot_specs(): inspect cannot see its kernels")
        specs.extend(mod.aot_specs())
    return specs


_SPECS: list = []  # the specs being compiled, inherited by forked workers


def _compile_one(job) -> Dict:
    from ..triton.aot import compile_spec
    i, arch = job
    return compile_spec(_SPECS[i], arch)


def collect(archs: List[int], backend: str = "all", kernel_filter=None, jobs: int = 1) -> List[Dict]:
    from ..backends import interpreter_enabled
    rows: List[Dict] = []
    names: List[str] = []  # every kernel name seen, for the message when --kernel matches none
    if backend in ("triton", "all"):
        specs = triton_specs()
        names += [s.kernel for s in specs]
        _SPECS[:] = [s for s in specs if not kernel_filter or kernel_filter in s.kernel]
        if backend == "triton" and not _SPECS:
            no_match(kernel_filter, names)
        if interpreter_enabled():
            raise SystemExit("inspect: compiles Triton kernels ahead of time, which Triton's interpreter "
                             "prevents: unset TRITON_INTERPRET and run again")
        work = [(i, arch) for i, s in enumerate(_SPECS) for arch in archs if arch in s.archs]
        if jobs > 1 and len(work) > 1:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                rows.extend(pool.map(_compile_one, work, chunksize=1))
        else:
            rows.extend(map(_compile_one, work))
    if backend in ("cuda", "all"):
        from .. import cuda
        usage = getattr(cuda, "resource_usage", None)
        if usage is None:
            print("inspect: the CUDA backend reports no kernels (vit_kernels.cuda.resource_usage is missing)",
                  file=sys.stderr)
        else:
            for arch in archs:
                found = usage(arch)
                names += [r["kernel"] for r in found]
                rows.extend(r for r in found if not kernel_filter or kernel_filter in r["kernel"])
            if kernel_filter and not rows:
                no_match(kernel_filter, names)
    return rows


def no_match(kernel_filter: str, names: List[str]) -> None:
    """--kernel matched nothing: say so with the names it could have matched."""
    names = sorted(set(names))
    raise SystemExit(f"kernel: expected part of a kernel name ({', '.join(names) or 'none found'}), "
                     f"got {kernel_filter!r}, which matches none")


def problems(row: Dict) -> List[str]:
    """What is wrong with one row: spills, too much shared memory, a tl.dot without tensor cores."""
    out = []
    if row["spill_bytes"]:
        out.append(f"spills {row['spill_bytes']} bytes")
    limit = row.get("shared_limit_bytes") or {"sm_80": 163 * 1024, "sm_90": 227 * 1024}[row["arch"]]
    if row["shared_bytes"] > limit:
        out.append(f"shared memory {row['shared_bytes']} > {limit} bytes")
    if row.get("has_dot", True) and not row["tensor_core_instructions"]:
        out.append("no tensor-core instruction in the SASS")
    return out


def run(args) -> int:
    archs = [ARCHS[a] for a in (args.arch or sorted(ARCHS))]
    rows = collect(archs, args.backend, args.kernel, args.jobs)
    keys = ("kernel", "arch", "config", "regs", "spill_bytes", "shared_bytes", "tensor_core_instructions")
    bad = [(r, problems(r)) for r in rows if problems(r)]
    if args.json:
        print(json.dumps([{**{k: r[k] for k in keys}, "backend": r.get("backend", ""),
                           "has_dot": r.get("has_dot", True)} for r in rows], indent=1))
    else:
        print(f"{'kernel':28} {'arch':6} {'regs':>4} {'spill':>5} {'shared':>8}  {'tensor cores':14} config")
        for r in rows:
            tc = ",".join(r["tensor_core_instructions"]) or "-"
            print(f"{r['kernel']:28} {r['arch']:6} {r['regs']:>4} {r['spill_bytes']:>5} {r['shared_bytes']:>8}  "
                  f"{tc:14} {r['config']}")
        print(f"{len(rows)} kernel configurations, {len(bad)} with problems")
    for r, p in bad:
        print(f"PROBLEM {r['kernel']} {r['arch']} {r['config']}: {'; '.join(p)}", file=sys.stderr)
    return 1 if bad else 0
