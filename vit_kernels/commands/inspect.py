"""``python -m vit_kernels inspect [--arch sm_80|sm_90] [--json]``: compile every kernel
configuration the library can launch, ahead of time and without a GPU, exactly as a launch
specializes it (vit_kernels.triton.aot), and report per kernel and architecture the facts that
decide its speed: registers, spills, shared memory, resident blocks per SM, the tensor-core
instruction kind (wgmma / mma.sync), bulk tensor copies (TMA), asynchronous copies and pipeline
stages, the widest global load; then a performance lint (:func:`perf_flags`)."""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from ..arch import shared_limits_by_name
from .arguments import positive_int

# The Triton modules whose aot_specs() list their launchable configurations: the one list a new
# kernel module is added to.
TRITON_MODULES = (
    "attention",
    "attention_tma",
    "attention_stats",
    "qkv_attention",
    "layernorm",
    "gemm",
    "gemm_tma",
    "mlp",
    "patch_embed",
    "attention_bwd",
    "layernorm_bwd",
    "gemm_bwd",
)
ARCHS = {"sm_80": 80, "sm_90": 90}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="compile every kernel for sm_80/sm_90 (no GPU) as launched and report "
        "registers, spills, shared memory, occupancy, wgmma/TMA/pipelining",
    )
    p.add_argument(
        "--arch", choices=sorted(ARCHS), action="append", help="architecture(s) to compile for (default: both)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument(
        "--backend",
        choices=["triton", "cuda", "all"],
        default="all",
        help="kernels to compile: the Triton ones, the csrc CUDA ones (nvcc), or both",
    )
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    p.add_argument("--config", default=None, help="only configurations whose label contains this")
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="compile in this many processes, at most one per configuration selected "
        "(default: the number of CPUs, %(default)s here)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr (there is none without a terminal)"
    )


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


def _selected(name: str, config: str, kernel_filter: Optional[str], config_filter: Optional[str]) -> bool:
    return (not kernel_filter or kernel_filter in name) and (not config_filter or config_filter in config)


def collect(
    archs: List[int],
    backend: str = "all",
    kernel_filter=None,
    jobs: int = 1,
    config_filter=None,
    show_progress: bool = True,
) -> List[Dict]:
    """One row per (kernel configuration, architecture): the Triton configurations compiled in
    ``jobs`` processes, the csrc kernels through nvcc; a progress bar on stderr (a terminal only).
    A selection (filters, architectures) that leaves nothing to compile is an error naming the option
    that emptied it (:func:`check_selection`); an architecture given twice is compiled once."""
    from ..backends import interpreter_enabled
    from ..bench.report import progress

    archs = sorted(set(archs))
    rows: List[Dict] = []
    offered: List[Tuple[str, str, Tuple[int, ...]]] = []  # (kernel, config, archs) of every configuration seen
    if backend in ("triton", "all"):
        specs = triton_specs()
        offered += [(s.kernel, s.config, tuple(s.archs)) for s in specs]
        _SPECS[:] = [s for s in specs if _selected(s.kernel, s.config, kernel_filter, config_filter)]
        if backend == "triton":
            check_selection(offered, kernel_filter, config_filter, archs)
        if interpreter_enabled():
            raise SystemExit(
                "inspect: compiles Triton kernels ahead of time, which Triton's interpreter "
                "prevents: unset TRITON_INTERPRET and run again"
            )
        work = [(i, arch) for i, s in enumerate(_SPECS) for arch in archs if arch in s.archs]
        with (
            progress(len(work), "inspect: compiling Triton kernels", enabled=show_progress) as bar,
            contextlib.ExitStack() as stack,
        ):
            if jobs > 1 and len(work) > 1:
                # no more processes than configurations to compile (each one forks a copy of this process)
                pool = stack.enter_context(multiprocessing.get_context("fork").Pool(min(jobs, len(work))))
                results = pool.imap(_compile_one, work, chunksize=1)
            else:
                results = map(_compile_one, work)
            for row in results:
                rows.append(row)
                bar.advance(f"inspect: {row['kernel']} {row['arch']}")
    if backend in ("cuda", "all"):
        from .. import cuda

        usage = getattr(cuda, "resource_usage", None)
        if usage is None:
            print(
                "inspect: the CUDA backend reports no kernels (vit_kernels.cuda.resource_usage is missing)",
                file=sys.stderr,
            )
        else:
            for arch in archs:
                with progress(
                    None, f"inspect: compiling the csrc kernels with nvcc for sm_{arch}", enabled=show_progress
                ):
                    found = usage(arch)
                offered += [(r["kernel"], r["config"], (arch,)) for r in found]
                rows.extend(
                    cuda_facts(r) for r in found if _selected(r["kernel"], r["config"], kernel_filter, config_filter)
                )
            if not rows:
                check_selection(offered, kernel_filter, config_filter, archs)
    return rows


def check_selection(
    offered: List[Tuple[str, str, Tuple[int, ...]]], kernel_filter: Optional[str], config_filter: Optional[str], archs
) -> None:
    """Raise SystemExit naming the option that leaves no configuration to compile: --kernel (no kernel
    name contains it), --config (no label of the kernels it leaves contains it), --arch (the configurations
    left are compiled for other architectures). offered: (kernel, config, archs) of every configuration
    the chosen backends have. Nothing offered at all is left to the caller."""
    kernels = [o for o in offered if not kernel_filter or kernel_filter in o[0]]
    if not kernels:
        if kernel_filter:
            no_match(kernel_filter, [o[0] for o in offered])
        return
    configs = [o for o in kernels if not config_filter or config_filter in o[1]]
    if not configs:
        labels = sorted({o[1] for o in kernels})
        which = f"the kernels matching {kernel_filter!r}" if kernel_filter else "a kernel"
        raise SystemExit(
            f"config: expected part of a configuration label of {which} ({len(labels)} labels, e.g. "
            f"{'; '.join(labels[:3])}), got {config_filter!r}, which matches none"
        )
    if not any(a in o[2] for o in configs for a in archs):
        have = sorted({a for o in configs for a in o[2]})
        raise SystemExit(
            f"arch: expected an architecture the selected configurations are compiled for "
            f"({', '.join(f'sm_{a}' for a in have)}), got {', '.join(f'sm_{a}' for a in archs)}"
        )


def no_match(kernel_filter: str, names: List[str]) -> None:
    """--kernel matched nothing: say so with the names it could have matched."""
    names = sorted(set(names))
    raise SystemExit(
        f"kernel: expected part of a kernel name ({', '.join(names) or 'none found'}), "
        f"got {kernel_filter!r}, which matches none"
    )


def cuda_facts(row: Dict) -> Dict:
    """A csrc kernel's row (vit_kernels.cuda.resource_usage) with the lint's facts, where its SASS
    and template arguments give them: the tensor-core kind from HGMMA / HMMA, TMA from UTMALDG,
    cp.async from LDGSTS; warps and stages from the GEMM's TileCfg; the flash kernel's 4 warps
    (FlashFwdTraits::kWarps). Unknown facts are None."""
    from ..triton.aot import blocks_per_sm

    tc = " ".join(row.get("tensor_core_instructions", []))
    copies = row.get("sass_copy_instructions")
    out = dict(row)
    out["mma"] = "wgmma" if "HGMMA" in tc else "mma.sync" if "HMMA" in tc else "-"
    out["tma"] = None if copies is None else "UTMALDG" in copies
    out["cp_async"] = None if copies is None else "LDGSTS" in copies
    m = re.search(r"tile (\d+)x(\d+)x\d+ warp (\d+)x(\d+) stages (\d+)", row.get("config", ""))
    warps = stages = None
    if m:
        bm, bn, wm, wn, stages = map(int, m.groups())
        warps = (bm // wm) * (bn // wn)
    elif row["kernel"].endswith("flash_fwd_kernel"):
        warps = 4
    out["num_warps"], out["num_stages"] = warps, stages
    if warps:
        out.update(blocks_per_sm(int(row["arch"][3:5]), row["regs"], row["shared_bytes"], warps))
    else:
        out.update(blocks_per_sm=None, occupancy_limit=None, warps_per_sm=None)
    return out


def problems(row: Dict) -> List[str]:
    """What is wrong with one row: spills, too much shared memory, a tl.dot without tensor cores."""
    out = []
    if row["spill_bytes"]:
        out.append(f"spills {row['spill_bytes']} bytes")
    limit = row.get("shared_limit_bytes") or shared_limits_by_name()[row["arch"]]
    if row["shared_bytes"] > limit:
        out.append(f"shared memory {row['shared_bytes']} > {limit} bytes")
    if row.get("has_dot", True) and not row["tensor_core_instructions"]:
        out.append("no tensor-core instruction in the SASS")
    return out


def is_hot(row: Dict) -> bool:
    """A kernel that carries the model's FLOPs: every kernel with a matmul (the GEMMs, attention).
    The row statistics pass is memory-bound and small; the csrc selftest_* kernels check the
    emulator, not the model."""
    return bool(row.get("has_dot", True)) and "selftest" not in row["kernel"]


def perf_flags(row: Dict) -> List[str]:
    """The performance lint: on sm_90, a hot kernel (:func:`is_hot`) should issue wgmma, feed it
    with bulk tensor copies (TMA), and pipeline its loads (>= 2 stages with asynchronous copies);
    each missing fact is a flag ("no wgmma", "no TMA", "not pipelined"). A fact the report could
    not read (None) raises no flag. Not a failure of inspect: the truth about today's kernels."""
    if row["arch"] != "sm_90" or not is_hot(row):
        return []
    flags = []
    if row.get("mma") != "wgmma":
        flags.append("no wgmma")
    if row.get("tma") is False:
        flags.append("no TMA")
    stages, tma, cp_async = row.get("num_stages"), row.get("tma"), row.get("cp_async")
    if stages is not None and tma is not None and (stages < 2 or not (tma or cp_async)):
        flags.append("not pipelined")
    return flags


def _fmt(v) -> str:
    return "?" if v is None else "y" if v is True else "-" if v is False else str(v)


# the text table: (row key, header, formatter); ? = a fact the report could not read
TABLE_COLUMNS = [
    ("kernel", "kernel", str),
    ("arch", "arch", str),
    ("regs", "regs", _fmt),
    ("spill_bytes", "spill", _fmt),
    ("shared_bytes", "shared", _fmt),
    ("blocks_per_sm", "blk/SM", _fmt),
    ("mma", "mma", _fmt),
    ("tma", "tma", _fmt),
    ("num_stages", "stg", _fmt),
    ("load_bits", "ld", _fmt),
    ("lint", "lint", str),
    ("config", "config", str),
]


def run(args) -> int:
    archs = [ARCHS[a] for a in (args.arch or sorted(ARCHS))]
    rows = collect(
        archs, args.backend, args.kernel, args.jobs, getattr(args, "config", None), show_progress=not args.no_progress
    )
    for r in rows:
        r["problems"] = problems(r)
        r["perf_flags"] = perf_flags(r)
    bad = [r for r in rows if r["problems"]]
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        from ..bench.report import print_table

        shown = [{**r, "lint": ",".join(r["perf_flags"]) or "-"} for r in rows]
        print_table(shown, TABLE_COLUMNS, styles={"lint": {r["lint"]: "yellow" for r in shown if r["perf_flags"]}})
        flagged = sum(1 for r in rows if r["perf_flags"])
        print(
            f"{len(rows)} kernel configurations, {len(bad)} with problems, {flagged} flagged by the sm_90 "
            f"performance lint (hot kernels without wgmma, TMA or pipelining)"
        )
    for r in bad:
        print(f"PROBLEM {r['kernel']} {r['arch']} {r['config']}: {'; '.join(r['problems'])}", file=sys.stderr)
    return 1 if bad else 0
