"""``python -m vit_kernels profile-attention``: attention across sequence lengths, then where the
time of one ViT block goes.

Sweeps tokens (--tokens, or --img-size with --patch-size) x head dims x dtypes x passes (--mode
fwd, bwd, fwd_bwd: the forward, the backward, both) over the providers, and writes
attention.csv/json/png (TFLOP/s against tokens; backward FLOPs counted as FlashAttention counts
them, 2.5x the forward's) under --out. Then
profiles one block stage by stage (torch.profiler + record_function + NVTX ranges) and writes
block_breakdown.csv/json and block_trace.json (open it in https://ui.perfetto.dev). Defaults
depend on the device: on a CUDA GPU tokens 50..4097 with batch * tokens ~ 65536 in bf16; on a
CPU tokens 50,197,257,577 at batch 1 in fp32, where the vit_kernels providers are reported as
not measured (their kernels need a CUDA GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..bench import attention as batt
from ..bench import peaks as bpeaks
from ..bench.timer import timer_name
from ..dtypes import SHORT_NAMES
from ..models import registry
from .arguments import out_folder, non_negative_float, positive_int
from .bench import resolve_device

DTYPES = SHORT_NAMES  # vit_kernels.dtypes
GPU_DEFAULTS = dict(tokens="50,197,257,577,1025,2305,4097", dtype="bf16", warmup=10, repeats=30, breakdown_batch=256)
CPU_DEFAULTS = dict(tokens="50,197,257,577", dtype="fp32", warmup=2, repeats=5, breakdown_batch=2)
DEFAULT_PROVIDERS = ",".join(batt.PROVIDERS)


def _ints(name: str, text: str):
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"{name}: expected a comma list of integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise SystemExit(f"{name}: expected positive integers, got {text!r}")
    return vals


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile-attention",
        help="attention TFLOP/s across sequence lengths, and a per-stage profile of one ViT block",
        description=__doc__,
        epilog="providers:\n"
        + "\n".join(f"  {k:<16}{v}" for k, v in batt.PROVIDERS.items())
        + "\n\nGPU peaks (--gpu KEY; dense TFLOP/s, GB/s):\n"
        + bpeaks.table_text(),
    )
    p.add_argument("--tokens", default=None, help="comma list (default 50,...,4097 on a GPU; 50,197,257,577 on a CPU)")
    p.add_argument("--img-size", default=None, help="comma list of image sizes; tokens = (img/patch)^2 + 1")
    p.add_argument(
        "--model",
        default=None,
        help="take heads, head dim, tokens and the block's width from this model: " + registry.HELP,
    )
    p.add_argument("--patch-size", type=positive_int, default=None, help="for --img-size (default 16, or --model's)")
    p.add_argument("--head-dim", default=None, help="comma list (default 64, or --model's)")
    p.add_argument("--heads", type=positive_int, default=None, help="default 12, or --model's")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="fixed batch (default: batch * tokens ~ --total-tokens on a GPU, 1 on a CPU)",
    )
    p.add_argument(
        "--total-tokens",
        type=positive_int,
        default=65536,
        help="on a GPU without --batch-size, the batch of each case is about this over its tokens",
    )
    p.add_argument("--dtype", default=None, help="comma list of fp32,fp16,bf16 (default bf16 GPU / fp32 CPU)")
    p.add_argument("--providers", default=DEFAULT_PROVIDERS, help="comma list (default: all)")
    p.add_argument(
        "--mode",
        default="fwd",
        help="comma list of passes to time: fwd (forward), bwd (backward: dq, dk, dv from one forward's saved "
        "tensors), fwd_bwd (both); FLOPs as FlashAttention counts them: bwd 2.5x, fwd_bwd 3.5x the forward's "
        "(default fwd)",
    )
    p.add_argument(
        "--warmup", type=positive_int, default=None, help="calls before timing (default 10 on a GPU, 2 on a CPU)"
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="the fewest timed samples per case (default 30 on a GPU, 5 on a CPU)",
    )
    p.add_argument(
        "--max-time",
        type=non_negative_float,
        default=None,
        help="seconds of timing per case at most (default 3 on a GPU, 1 on a CPU; 0: the fewest samples only)",
    )
    p.add_argument("--gpu", default=None, help="GPU for %% of peak and bounds (default: this device)")
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="where to run (auto: cuda when available, else cpu)",
    )
    p.add_argument(
        "--out",
        type=out_folder,
        default="bench_out",
        help="folder for attention.csv/json/png and block_breakdown.csv/json, block_trace.json",
    )
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-stage block profile")
    p.add_argument("--breakdown-tokens", type=positive_int, default=None, help="default 197, or --model's")
    p.add_argument("--breakdown-batch", type=positive_int, default=None, help="default 256 on a GPU, 2 on a CPU")
    p.add_argument("--breakdown-dim", type=positive_int, default=None, help="default 768, or --model's")
    p.add_argument(
        "--breakdown-backend",
        choices=["auto", "triton", "cuda", "torch"],
        default=None,
        help="backend of the fused block (default: triton on a GPU, torch on a CPU)",
    )
    p.add_argument("--no-plot", action="store_true", help="write no attention PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def model_shape(args, notes: list) -> None:
    """Fill heads, head dim, patch size, the block's width and tokens from --model (the registry's
    names, built on the meta device: shapes only), or the defaults; flags given win."""
    shape_d = dict(heads=12, head_dim="64", patch_size=16, breakdown_dim=768, breakdown_tokens=197)
    if args.model:
        from ..bench import models as bmodels

        try:
            with torch.device("meta"):
                model = bmodels.build(args.model)
        except registry.ModelNameError as e:
            raise SystemExit(str(e)) from None
        shape = bmodels.shape_of(model, 1, torch.float32)
        if shape is None:
            raise SystemExit(f"model: expected a ViT whose shape the cost model reads, got {args.model!r}")
        shape_d = dict(
            heads=shape.heads,
            head_dim=str(shape.dim // shape.heads),
            patch_size=shape.patch,
            breakdown_dim=shape.dim,
            breakdown_tokens=shape.tokens,
        )
        if not args.tokens and not args.img_size:
            args.tokens = str(shape.tokens)
        notes.append(
            f"shapes of {args.model}: {shape.heads} heads of {shape.dim // shape.heads}, {shape.tokens} tokens, "
            f"width {shape.dim}"
        )
    for k, v in shape_d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def make_config(args):
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    d = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    notes = []
    model_shape(args, notes)
    if args.img_size:
        if args.tokens:
            raise SystemExit("tokens: give --tokens or --img-size, not both")
        try:
            tokens = batt.tokens_from_images(_ints("img_size", args.img_size), args.patch_size)
        except ValueError as e:
            raise SystemExit(str(e))
    else:
        tokens = _ints("tokens", args.tokens or d["tokens"])
    head_dims = _ints("head_dim", args.head_dim)
    dtypes = []
    for t in (args.dtype or d["dtype"]).split(","):
        if t.strip() not in DTYPES:
            raise SystemExit(f"dtype: expected a comma list of {sorted(DTYPES)}, got {args.dtype!r}")
        dtypes.append(DTYPES[t.strip()])
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or any(m not in batt.MODES for m in modes):
        raise SystemExit(f"mode: expected a comma list of {list(batt.MODES)}, got {args.mode!r}")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    for p in providers:
        if p not in batt.PROVIDERS:
            raise SystemExit(f"providers: expected names from {list(batt.PROVIDERS)}, got {p!r}")
    if args.heads < 1:
        raise SystemExit(f"heads: expected >= 1, got {args.heads}")
    cases = []
    for mode in modes:
        for dt in dtypes:
            for hd in head_dims:
                for n in tokens:
                    b = args.batch_size or (batt.batch_for(n, args.total_tokens) if gpu else 1)
                    cases.append(batt.AttnCase(b, args.heads, n, hd, dt, mode))
    peak = bpeaks.choose(args.gpu, device, notes, "% of peak")
    get = lambda k: getattr(args, k) if getattr(args, k) is not None else d[k]  # noqa: E731
    cfg = batt.AttnConfig(
        providers, cases, device, warmup=get("warmup"), repeats=get("repeats"), peak=peak, max_time_s=args.max_time
    )
    if cfg.warmup < 1 or cfg.repeats < 1:
        raise SystemExit(f"warmup/repeats: expected >= 1, got {cfg.warmup}/{cfg.repeats}")
    return cfg, notes


def tflops_range(row: dict):
    """(low, high) TFLOP/s of a timed row: at its p80 and its p20 step time; None when not timed."""
    tf, ms, p20, p80 = (row.get(k) for k in ("tflops", "ms", "ms_p20", "ms_p80"))
    if not (tf and ms and p20 and p80):
        return None
    return tf * ms / p80, tf * ms / p20


def run(args) -> int:
    from ..bench import report
    from ..bench.profile import TABLE_COLUMNS as BD_COLUMNS, breakdown

    cfg, notes = make_config(args)
    gpu = cfg.device.type == "cuda"
    meta = report.environment(cfg.device)
    print(
        f"vit_kernels profile-attention on {meta['device_name']} ({cfg.device}), torch {meta['torch']}, "
        f"commit {str(meta.get('commit'))[:10]}{' (modified)' if meta.get('dirty') else ''}"
    )
    print(
        f"heads {args.heads}, {len(cfg.cases)} shapes x {len(cfg.providers)} providers; warm-up {cfg.warmup}, "
        f"repeats >= {cfg.repeats}, timer {timer_name(cfg.device)}" + (" (L2 flushed before each call)" if gpu else "")
    )
    for n in notes:
        print("note: " + n)
    if not gpu:
        print(
            "note: no CUDA GPU here: the torch providers are timed on the CPU, a smoke test (it checks the harness "
            "runs, not how fast attention is on a GPU); the Triton and CUDA kernels need a CUDA GPU and their rows "
            "are marked not measured"
        )
    with report.progress(len(cfg.cases) * len(cfg.providers), "attention", enabled=not args.no_progress) as prog:
        rows = batt.run(cfg, prog)
    for r in rows:
        r["device"] = meta["device_name"]
    print()
    report.print_table(rows, batt.TABLE_COLUMNS, styles=report.STATUS_STYLES)
    seen = set()
    for r in rows:
        key = (r["provider"], r.get("note"))
        if r.get("note") and key not in seen:
            seen.add(key)
            print(f"  {r['provider']}: {r['note']}")
    out = Path(args.out)
    extra = {
        "config": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        "providers": batt.PROVIDERS,
        "gpu_for_bounds": cfg.peak.name if cfg.peak else None,
        "flops": "forward: 4*B*H*N^2*d (+ 2*B*N*D*3D for the qkv providers); backward 2.5x the attention's and "
        "2x the projection's, forward+backward 3.5x and 3x (FlashAttention's count)",
        "modes": {m: batt.MODES[m] for m in report.unique(c.mode for c in cfg.cases)},
    }
    paths = report.write_all(out, "attention", rows, meta, extra)
    plot_ok = not args.no_plot and report.matplotlib_missing() is None
    if not args.no_plot and not plot_ok:
        print("note: " + report.matplotlib_missing())
    if plot_ok:
        groups = [
            (mode, dt, hd)
            for mode in report.unique(r["mode"] for r in rows)
            for dt in report.unique(r["dtype"] for r in rows)
            for hd in report.unique(r["head_dim"] for r in rows)
        ]
        for mode, dt, hd in groups:
            sel = [r for r in rows if r["mode"] == mode and r["dtype"] == dt and r["head_dim"] == hd]
            xs = report.unique(r["tokens"] for r in sel)
            at = {(r["provider"], r["tokens"]): r for r in sel}
            providers = report.unique(r["provider"] for r in sel)
            series = {p: [at.get((p, n), {}).get("tflops") for n in xs] for p in providers}
            ranges = {p: [tflops_range(at.get((p, n), {})) for n in xs] for p in providers}
            peak_tf = cfg.peak.tflops(getattr(torch, dt)) if (cfg.peak is not None and gpu) else None
            suffix = "" if len(rows) == len(sel) else f"_{mode}_{dt}_d{hd}"
            paths.append(
                report.plot_lines(
                    out / f"attention{suffix}.png",
                    xs,
                    series,
                    "tokens",
                    f"TFLOP/s ({batt.MODES[mode].split(':')[0]})",
                    f"attention on {meta['device_name']}: {dt}, head_dim {hd}, {args.heads} heads; median, "
                    f"bars p20-p80",
                    hline=peak_tf,
                    hline_label=f"{cfg.peak.name} peak" if peak_tf else "",
                    ranges=ranges,
                )
            )
    status = 0
    if not args.no_breakdown:
        backend = args.breakdown_backend or ("triton" if gpu else "torch")
        bb = args.breakdown_batch or (GPU_DEFAULTS if gpu else CPU_DEFAULTS)["breakdown_batch"]
        dt = DTYPES[(args.dtype or (GPU_DEFAULTS if gpu else CPU_DEFAULTS)["dtype"]).split(",")[0].strip()]
        if not gpu and backend in ("triton", "cuda"):
            print(
                f"note: the fused block with backend {backend} needs a CUDA GPU to be timed; profiling the eager "
                f"block only"
            )
            backend = None
        print(
            f"\none block: dim {args.breakdown_dim}, {args.heads} heads, {args.breakdown_tokens} tokens, batch {bb}, "
            f"{str(dt).replace('torch.', '')}; {'device' if gpu else 'CPU'} time per stage from torch.profiler"
        )
        try:
            bd = breakdown(
                dim=args.breakdown_dim,
                heads=args.heads,
                tokens=args.breakdown_tokens,
                batch=bb,
                dtype=dt,
                device=cfg.device,
                fused_backend=backend,
                peak=cfg.peak,
                trace_path=out / "block_trace.json",
                iters=5 if gpu else 3,
                warmup=3 if gpu else 1,
            )
        except Exception as e:
            print(f"block breakdown failed: {type(e).__name__}: {e}", file=sys.stderr)
            status = 1
        else:
            report.print_table(bd, BD_COLUMNS)
            from ..backends import last_decision

            if backend not in (None, "torch"):
                for op in ("qkv_attention", "linear", "layernorm_gelu_mlp"):
                    d = last_decision(op)
                    if d is not None and d.backend != backend:
                        print(f"  FALLBACK: {d}")
            paths += report.write_all(out, "block_breakdown", bd, meta)
            paths.append(out / "block_trace.json")
    print("wrote " + ", ".join(str(p) for p in paths))
    if any(r["status"] == "error" for r in rows):
        print("some rows failed with an error (see the notes above)", file=sys.stderr)
        status = 1
    return status
