"""``python -m vit_kernels selftest [MODEL]``: every fused kernel call MODEL makes, at its shapes,
against the float64 oracle, on each fused backend this machine has; timed against the torch path
on a GPU; memcheck and racecheck under ``compute-sanitizer`` when it is installed and a GPU is
there. One table and a JSON file (``--json-out``); exit code 1 when any kernel fails.

MODEL: a reference ViT name (``vit_base_patch16_224``) or any name ``verify`` accepts
(``vit_kernels:NAME``, ``timm:NAME``, ``torchvision:NAME``, ``hf:NAME``, ``vit_pytorch:PRESET``).

How: the model is fused on the torch backend and run once with the fused ops recorded (the op,
its arguments' shapes, dtypes and strides, its options), which lists the distinct calls it makes.
Each distinct call is then run once per backend with fresh random activations (the model's own
parameters), and compared with the oracle (:mod:`vit_kernels.reference` in float64) under
:mod:`vit_kernels.testing`'s rule: max error <= 2x plain PyTorch's at the same dtype, plus a floor.

On a CPU the Triton kernels run in Triton's interpreter and the CUDA kernels in the host emulator,
at a reduced size (batch 1, depth 2: every block of these models has the same shapes, so the
kernels and their per-image shapes are the ones the full model uses) so ViT-Ti takes well under
two minutes; timings need a GPU and are not reported.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from ..dtypes import SHORT_NAMES
from .arguments import positive_int

OPS = ("patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp", "flash_attention")
DTYPES = SHORT_NAMES  # vit_kernels.dtypes
CPU_BATCH, CPU_DEPTH, GPU_BATCH = 1, 2, 32
SANITIZER_TOOLS = ("memcheck", "racecheck")
UNDER_SANITIZER = "VIT_KERNELS_SELFTEST_UNDER_SANITIZER"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "selftest",
        help="every kernel a model uses, at its shapes, against the float64 oracle (timed and sanitized on a GPU)",
        description=__doc__,
    )
    p.add_argument(
        "model",
        nargs="?",
        default="vit_base_patch16_224",
        help="a reference ViT name or family:name as for verify (default: vit_base_patch16_224)",
    )
    p.add_argument("--backend", action="append", choices=["triton", "cuda"], help="backend(s) to check (default: both)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="dtype of the model and the kernel calls")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help=f"default: {GPU_BATCH} on a GPU, {CPU_BATCH} on a CPU"
    )
    p.add_argument(
        "--depth", type=positive_int, default=None, help=f"blocks (default: the model's on a GPU, {CPU_DEPTH} on a CPU)"
    )
    p.add_argument("--img-size", type=positive_int, default=None, help="image size (default: the model's)")
    p.add_argument("--checkpoint", default=None, help="local weights, as for verify")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of each call's random activations")
    p.add_argument("--json-out", default="selftest.json", help="where to write the JSON results")
    p.add_argument("--no-timing", action="store_true", help="do not time (on a GPU)")
    p.add_argument("--no-sanitizer", action="store_true", help="do not re-run under compute-sanitizer")


# ---------------------------------------------------------------------------------------------
# Which calls the model makes


@contextlib.contextmanager
def record_op_calls():
    """Within the block, every call of a fused op (vit_kernels.ops.<name>, which the fused modules
    and swaps call through the module) is appended to the yielded list as (op, args, kwargs), and
    then runs as usual."""
    from .. import ops

    calls: List[tuple] = []
    saved = {name: getattr(ops, name) for name in OPS}

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            calls.append((name, args, kwargs))
            return fn(*args, **kwargs)

        return recorded

    for name, fn in saved.items():
        setattr(ops, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


def _describe(v) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), tuple(v.stride()), str(v.dtype))
    return ("value", repr(v))


def call_key(op: str, args: tuple, kwargs: dict) -> tuple:
    """What decides which kernel runs and at what shape: the op, each argument's shape, strides and
    dtype (or value), the options. The backend asked for is left out."""
    return (
        op,
        tuple(_describe(a) for a in args),
        tuple(sorted((k, _describe(v)) for k, v in kwargs.items() if k != "backend")),
    )


def shape_label(op: str, args: tuple) -> str:
    t = args[0]
    return "x".join(map(str, t.shape))


def distinct_calls(model: torch.nn.Module, images: torch.Tensor) -> List[tuple]:
    """The distinct fused-op calls one forward of ``model`` (fused on the torch backend) makes."""
    with torch.no_grad(), record_op_calls() as calls:
        model(images)
    seen, out = set(), []
    for op, args, kwargs in calls:
        key = call_key(op, args, kwargs)
        if key not in seen:
            seen.add(key)
            out.append((op, args, kwargs))
    return out


# ---------------------------------------------------------------------------------------------
# Checking one call


def _fresh(t, gen: torch.Generator):
    """Parameters stay (the model's own); activations become fresh random values, same layout."""
    if not isinstance(t, torch.Tensor) or isinstance(t, torch.nn.Parameter):
        return t
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype))


def _f64(v):
    return v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else v


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def check_call(op: str, args: tuple, kwargs: dict, backend: str, *, timing: bool, seed: int) -> Dict[str, Any]:
    """Run one recorded call on ``backend`` against the float64 oracle (and time it against the
    torch path when ``timing``). Returns one result row."""
    from .. import ops, reference
    from ..backends import last_decision
    from ..testing import compare

    gen = torch.Generator().manual_seed(seed)
    args = tuple(_fresh(a, gen) for a in args)
    kwargs = {k: _fresh(v, gen) for k, v in kwargs.items() if k != "backend"}
    t = args[0]
    row: Dict[str, Any] = {
        "op": op,
        "backend": backend,
        "shape": shape_label(op, args),
        "dtype": str(t.dtype)[6:],
        "path": "",
        "status": "",
        "max_abs_err": None,
        "bound": None,
        "torch_err": None,
        "fused_ms": None,
        "torch_ms": None,
        "speedup": None,
        "reason": "",
    }
    fused_fn = getattr(ops, op)
    try:
        with torch.no_grad():
            out = fused_fn(*args, **kwargs, backend=backend)
            d = last_decision(op)
            row["path"] = d.path or ""
            if d.backend != backend:
                raise RuntimeError(f"ran on {d.backend}, not {backend}: {d}")
            base = fused_fn(*args, **kwargs, backend="torch")
            ref = getattr(reference, op)(*map(_f64, args), **{k: _f64(v) for k, v in kwargs.items() if k != "path"})
    except Exception as e:  # a selftest reports a crashing kernel as ERROR, it does not stop
        unavailable = "is not available" in str(e) or "cannot run this call" in str(e)
        row.update(status="N/A" if unavailable else "ERROR", reason=str(e).splitlines()[0][:300])
        return row
    c = compare(out, ref, base, name=op)
    row.update(status="PASS" if c.ok else "FAIL", max_abs_err=c.max_abs_err, bound=c.bound, torch_err=c.baseline_err)
    if not c.ok:
        row["reason"] = str(c)
    if timing and t.is_cuda:
        with torch.no_grad():
            row["fused_ms"] = _time_ms(lambda: fused_fn(*args, **kwargs, backend=backend))
            row["torch_ms"] = _time_ms(lambda: fused_fn(*args, **kwargs, backend="torch"))
        row["speedup"] = row["torch_ms"] / row["fused_ms"]
    return row


# ---------------------------------------------------------------------------------------------
# compute-sanitizer


def sanitizer_path() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from ..cuda import toolkit_root

    root, _ = toolkit_root()
    if root and os.path.isfile(os.path.join(root, "bin", "compute-sanitizer")):
        return os.path.join(root, "bin", "compute-sanitizer")
    return None


def sanitizer_command(tool: str, sanitizer: str, args, json_out: str) -> List[str]:
    """This selftest (the same model, dtype, sizes, backends) again under
    ``compute-sanitizer --tool TOOL``, untimed and without a further sanitizer run, writing ``json_out``."""
    cmd = [
        sanitizer,
        "--tool",
        tool,
        "--error-exitcode",
        "1",
        sys.executable,
        "-m",
        "vit_kernels",
        "selftest",
        args.model,
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
        "--no-timing",
        "--no-sanitizer",
        "--json-out",
        json_out,
    ]
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--depth", args.depth),
        ("--img-size", args.img_size),
        ("--checkpoint", args.checkpoint),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    for b in args.backend or ():
        cmd += ["--backend", b]
    return cmd


def parse_sanitizer(tool: str, rc: int, output: str) -> Dict[str, Any]:
    """One sanitizer row from its exit code and output ("ERROR SUMMARY: N errors")."""
    m = re.search(r"ERROR SUMMARY: (\d+) error", output)
    errors = int(m.group(1)) if m else None
    ok = rc == 0 and (errors or 0) == 0
    return {
        "tool": tool,
        "status": "PASS" if ok else "FAIL",
        "errors": errors,
        "exit_code": rc,
        "output_tail": "" if ok else output[-2000:],
    }


def run_sanitizers(args, runner=subprocess.run) -> List[Dict[str, Any]]:
    """memcheck and racecheck: each re-runs this selftest under compute-sanitizer (the CUDA and the
    Triton kernels alike); a row per tool from its exit code and error summary."""
    san = sanitizer_path()
    rows = []
    for tool in SANITIZER_TOOLS:
        cmd = sanitizer_command(tool, san, args, args.json_out + f".{tool}.json")
        env = {**os.environ, UNDER_SANITIZER: tool}
        p = runner(cmd, capture_output=True, text=True, env=env)
        rows.append(parse_sanitizer(tool, p.returncode, (p.stdout or "") + (p.stderr or "")))
    return rows


# ---------------------------------------------------------------------------------------------
# The command


def build_model(name: str, args) -> torch.nn.Module:
    from .verify import build, load_checkpoint

    spec = name if ":" in name else f"vit_kernels:{name}"
    model = build(spec, args).eval()
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    return model


def selftest(args) -> Dict[str, Any]:
    """Run the selftest described by ``args`` (the parsed CLI arguments); returns the JSON result."""
    from .. import fuse
    from ..verify import default_inputs

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = DTYPES[args.dtype]
    batch = args.batch_size if args.batch_size is not None else (GPU_BATCH if gpu else CPU_BATCH)
    if not gpu and args.depth is None:
        args.depth = CPU_DEPTH
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = build_model(args.model, args)
    images = default_inputs(model, batch, args.img_size)
    model = fuse(copy.deepcopy(model), backend="torch").to(device=device, dtype=dtype)
    calls = distinct_calls(model, images.to(device=device, dtype=dtype))
    backends = args.backend or ["triton", "cuda"]
    timing = gpu and not args.no_timing
    rows = [
        check_call(op, a, kw, b, timing=timing, seed=args.seed + i)
        for i, (op, a, kw) in enumerate(calls)
        for b in backends
    ]
    sanitizer: List[Dict[str, Any]] = []
    sanitizer_note = ""
    if os.environ.get(UNDER_SANITIZER):
        sanitizer_note = f"this run is itself under compute-sanitizer --tool {os.environ[UNDER_SANITIZER]}"
    elif args.no_sanitizer:
        sanitizer_note = "not run (--no-sanitizer)"
    elif not gpu:
        sanitizer_note = "not run: compute-sanitizer needs a GPU"
    elif sanitizer_path() is None:
        sanitizer_note = "not run: compute-sanitizer is not installed (not on PATH nor in the CUDA toolkit)"
    else:
        sanitizer = run_sanitizers(args)
    fails = [r for r in rows if r["status"] in ("FAIL", "ERROR")] + [s for s in sanitizer if s["status"] != "PASS"]
    reduced = (
        ""
        if gpu
        else (
            f"CPU: batch {batch}, depth {args.depth} (every block has the same shapes, so "
            f"the kernels checked are the full model's, at batch {batch})"
        )
    )
    return {
        "model": args.model,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "dtype": args.dtype,
        "batch": batch,
        "depth": args.depth,
        "reduced": reduced,
        "timings": "measured (triton.testing.do_bench, median)"
        if timing
        else ("not measured (--no-timing)" if gpu else "not measured: timings need a GPU"),
        "how": "Triton kernels on the GPU"
        if gpu
        else "Triton kernels in Triton's interpreter, CUDA kernels in the host emulator",
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "sanitizer": sanitizer,
        "sanitizer_note": sanitizer_note,
        "ok": not fails,
    }


def _sci(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def _fixed(digits: int):
    return lambda v: "-" if v is None else f"{v:.{digits}f}"


COLUMNS = [
    ("op", "op", str),
    ("backend", "backend", str),
    ("path", "path", str),
    ("shape", "shape", str),
    ("status", "status", str),
    ("max_abs_err", "max err", _sci),
    ("bound", "bound", _sci),
    ("torch_err", "torch err", _sci),
]
TIMING_COLUMNS = [
    ("fused_ms", "fused ms", _fixed(3)),
    ("torch_ms", "torch ms", _fixed(3)),
    ("speedup", "speedup", _fixed(2)),
]
STATUS_STYLES = {"status": {"PASS": "green", "FAIL": "red", "ERROR": "red", "N/A": "yellow"}}


def print_table(result: Dict[str, Any]) -> None:
    """The result as a table (rich on a terminal, plain text otherwise), then its notes."""
    from ..bench.report import print_table as show

    timed = any(r["fused_ms"] is not None for r in result["rows"])
    columns = COLUMNS + (TIMING_COLUMNS if timed else []) + [("reason", "reason", str)]
    rows = [{**r, "reason": r["reason"][:160]} for r in result["rows"]]
    for s in result["sanitizer"]:
        rows.append(
            {
                "op": f"compute-sanitizer {s['tool']}",
                "backend": "all",
                "path": "",
                "shape": "",
                "status": s["status"],
                "reason": f"{s['errors']} errors" if s["errors"] is not None else s["output_tail"][-160:],
            }
        )
    show(
        rows,
        columns,
        title=f"selftest {result['model']} {result['dtype']} batch {result['batch']} on {result['device']}",
        styles=STATUS_STYLES,
    )
    notes = [result["how"], f"timings: {result['timings']}"]
    if result["reduced"]:
        notes.append(result["reduced"])
    if result["sanitizer_note"]:
        notes.append(f"compute-sanitizer: {result['sanitizer_note']}")
    for n in notes:
        print(f"note: {n}")
    print(f"{'OK' if result['ok'] else 'FAILED'} in {result['seconds']} s")


def run(args) -> int:
    result = selftest(args)
    with open(args.json_out, "w") as fh:
        json.dump(result, fh, indent=1)
    print_table(result)
    print(f"results: {args.json_out}")
    return 0 if result["ok"] else 1
