"""``python -m vit_kernels bench [MODEL ...]``: model throughput, providers side by side.

timm's benchmark.py flags work here with their meaning (-m/--model, -b/--batch-size, --img-size,
--amp, --amp-dtype, --precision, --channels-last, --torchcompile, --torchcompile-mode, --bench,
--num-warm-iter, --num-bench-iter, --results-file, --results-format), and the results carry timm's
field names (model, infer_samples_per_sec, infer_step_time, infer_batch_size, infer_img_size,
infer_gmacs, train_*, param_count in millions), so a results file can be diffed against timm's
column by column. One row per (model, provider); this bench adds provider, depth, p20/p80 of the
step time and GFLOPs beside GMACs (GMACs per image counted as timm does: one multiply-add of the
matmuls, convolutions and attention products; FLOPs = 2 x MACs).

Writes a table to the terminal and, under --out, results.csv (timm's fields), bench.csv (every
timing column), bench.json (both, with device, versions, commit) and bench.png. Timing is
torch.utils.benchmark's blocked_autorange on the CPU and triton.testing.do_bench (or
do_bench_cudagraph) on a GPU, repeated until the p20-p80 spread is within --target-spread of the
median or --max-time has passed; the median and p20/p80 are reported, and providers are ranked
only when their p20-p80 intervals do not overlap.

Defaults depend on the device: on a CUDA GPU ViT-B/16 at batch 256 in bf16, inference and
training, all providers; on a CPU ViT-Ti/16 at batch 4 in float32, inference, and the fused
providers are reported as not measured (their kernels need a CUDA GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..bench import peaks as bpeaks
from ..bench import throughput as tp
from ..models import registry
from ..tuning import TABLE_COLUMNS, starts_group
from .arguments import out_folder, non_negative_float, positive_int

GPU_DEFAULTS = dict(
    models=["vit_base_patch16_224"],
    batch_size=256,
    dtype="bf16",
    mode="inference,train",
    providers="eager,sdpa,compile,triton,cuda,tuned",
    warmup=10,
    repeats=30,
)
CPU_DEFAULTS = dict(
    models=["vit_tiny_patch16_224"],
    batch_size=4,
    dtype="fp32",
    mode="inference",
    providers="eager,sdpa,triton,cuda,tuned",
    warmup=2,
    repeats=5,
)
# timm's --precision values -> (dtype, how): pure = weights and inputs in dtype; autocast = fp32
# weights under torch.autocast(dtype). "pure" and "autocast" are this bench's older values (with --dtype).
TIMM_PRECISION = {
    "float32": ("fp32", "pure"),
    "float16": ("fp16", "pure"),
    "bfloat16": ("bf16", "pure"),
    "amp": ("fp16", "autocast"),
    "amp_bfloat16": ("bf16", "autocast"),
}
AMP_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}
BENCH_MODES = {"inference": "inference", "train": "train", "both": "inference,train"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="model throughput: eager, SDPA, torch.compile and the fused kernels side by side "
        "(timm benchmark.py's flags and fields)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="providers:\n"
        + "\n".join(f"  {k:<9}{v}" for k, v in tp.PROVIDERS.items())
        + "\n\nGPU peaks (--gpu KEY; dense TFLOP/s, GB/s):\n"
        + bpeaks.table_text(),
    )
    p.add_argument(
        "models",
        nargs="*",
        help="models to run: " + registry.HELP + " (default: vit_base_patch16_224 "
        "on a GPU, vit_tiny_patch16_224 on a CPU)",
    )
    p.add_argument(
        "-m",
        "--model",
        dest="model_opt",
        action="append",
        default=[],
        metavar="NAME",
        help="a model, as timm's --model (may repeat; same names as the positional MODELs)",
    )
    p.add_argument(
        "--providers",
        default=None,
        help="comma list from: " + ",".join(tp.PROVIDERS) + " (default: all but compile on a CPU)",
    )
    p.add_argument("-b", "--batch-size", type=positive_int, default=None, help="default 256 on a GPU, 4 on a CPU")
    p.add_argument("--img-size", type=positive_int, default=None, help="image size (default: the model's)")
    p.add_argument(
        "--depth",
        type=positive_int,
        default=None,
        help="override the number of blocks (quick runs; shown in every label and row)",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=sorted(TIMM_PRECISION) + ["pure", "autocast"],
        help="timm's meaning: float32, float16, bfloat16 (weights and inputs in that type), amp "
        "(float16 autocast), amp_bfloat16 (bfloat16 autocast). Older values: pure (weights and inputs "
        "in --dtype), autocast (fp32 weights under autocast to --dtype). Default: bfloat16 on a GPU, "
        "float32 on a CPU",
    )
    p.add_argument(
        "--amp", action="store_true", help="as timm: mixed precision (autocast to --amp-dtype); overrides --precision"
    )
    p.add_argument(
        "--amp-dtype", choices=sorted(AMP_DTYPES), default="float16", help="autocast dtype for --amp (default float16)"
    )
    p.add_argument(
        "--dtype",
        choices=sorted(tp.DTYPES),
        default=None,
        help="older spelling: fp32/fp16/bf16 with --precision pure|autocast",
    )
    p.add_argument(
        "--bench",
        dest="bench_mode",
        choices=sorted(BENCH_MODES),
        default=None,
        help="as timm: inference, train or both (default: both on a GPU, inference on a CPU)",
    )
    p.add_argument("--mode", default=None, help="older spelling of --bench: comma list of inference,train")
    p.add_argument(
        "--opt",
        choices=tp.OPTIMIZERS,
        default="sgd",
        help="as timm: the train step's optimizer "
        "(default sgd: SGD with Nesterov momentum 0.9, lr 1e-4, as timm's benchmark; adamw: AdamW lr 1e-5)",
    )
    p.add_argument(
        "--input-dtype",
        choices=tp.INPUT_DTYPES,
        default="float",
        help="float (default) or uint8: decoded NHWC uint8 images; fused models normalize them in the "
        "patch-embedding kernel, the others in PyTorch inside the timed step",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="as timm: channels_last memory layout for the model and the images"
    )
    p.add_argument(
        "--torchcompile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="as timm: time the model under torch.compile with BACKEND (default inductor): adds the compile provider",
    )
    p.add_argument(
        "--torchcompile-mode",
        "--compile-mode",
        dest="compile_mode",
        choices=tp.COMPILE_MODES,
        default="default",
        help="torch.compile mode (default: default)",
    )
    p.add_argument(
        "--num-warm-iter",
        "--warmup",
        dest="warmup",
        type=positive_int,
        default=None,
        help="calls before timing (default 10 GPU / 2 CPU)",
    )
    p.add_argument(
        "--num-bench-iter",
        "--repeats",
        dest="repeats",
        type=positive_int,
        default=None,
        help="the fewest timed samples (default 30 GPU / 5 CPU); more are taken until --target-spread",
    )
    p.add_argument(
        "--target-spread",
        type=float,
        default=0.02,
        help="time until the p20-p80 half-width is within this fraction of the median (default 0.02)",
    )
    p.add_argument(
        "--max-time",
        type=non_negative_float,
        default=None,
        help="seconds of timing per row at most, target met or not (default 3 GPU / 1 CPU; 0: the fewest samples only)",
    )
    p.add_argument("--results-file", default=None, help="as timm: also write the results (timm's fields) to this file")
    p.add_argument(
        "--results-format", choices=["csv", "json"], default="csv", help="format of --results-file (default csv)"
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also time each inference step replayed from a CUDA graph (triton.testing.do_bench_cudagraph)",
    )
    p.add_argument(
        "--gpu", default=None, help="GPU for roofline bounds (a key of the peaks table; default: this device)"
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda when available")
    p.add_argument(
        "--out",
        type=out_folder,
        default="bench_out",
        help="folder for results.csv, bench.csv/json/png (default bench_out)",
    )
    p.add_argument("--cost", action="store_true", help="print the cost model of one block of each model")
    p.add_argument("--cost-only", action="store_true", help="print the cost model and exit (nothing is timed)")
    p.add_argument("--no-plot", action="store_true", help="write no bench.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def precision_of(args, default_dtype: str) -> tuple:
    """(dtype key, "pure" | "autocast") from timm's --amp/--precision or the older --dtype."""
    if args.amp:
        if args.precision in TIMM_PRECISION and TIMM_PRECISION[args.precision][1] == "pure":
            raise SystemExit(f"precision: --amp overrides --precision; got --amp with --precision {args.precision}")
        return AMP_DTYPES[args.amp_dtype], "autocast"
    if args.precision in TIMM_PRECISION:
        dtype, how = TIMM_PRECISION[args.precision]
        if args.dtype is not None and args.dtype != dtype:
            raise SystemExit(f"dtype: --precision {args.precision} means {dtype}; got --dtype {args.dtype} as well")
        return dtype, how
    return args.dtype or default_dtype, args.precision or "pure"


def make_config(args) -> tuple:
    """BenchConfig from the arguments and the device's defaults; returns (config, notes)."""
    device = resolve_device(args.device)
    d = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    notes = []
    if args.bench_mode and args.mode:
        raise SystemExit(f"bench: give --bench or --mode, not both; got --bench {args.bench_mode} --mode {args.mode}")
    mode = BENCH_MODES[args.bench_mode] if args.bench_mode else args.mode
    used = {
        "models": list(args.models) + list(args.model_opt),
        "batch_size": args.batch_size,
        "dtype": args.dtype or args.precision or (args.amp or None),
        "mode": mode,
        "providers": args.providers,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    defaulted = [k for k, v in used.items() if v in (None, [])]
    if defaulted:
        notes.append(
            f"defaults for {'a CUDA GPU' if device.type == 'cuda' else 'the CPU'}: "
            + ", ".join(f"{k}={d[k]}" for k in defaulted)
        )
    get = lambda k: used[k] if used[k] not in (None, []) else d[k]  # noqa: E731
    dtype, how = precision_of(args, d["dtype"])
    providers = [p.strip() for p in get("providers").split(",") if p.strip()]
    if args.torchcompile and "compile" not in providers:
        providers.append("compile")
    peak = bpeaks.choose(args.gpu, device, notes, "time/bound ratio")
    if not args.target_spread > 0:
        raise SystemExit(f"target_spread: expected a fraction > 0, got {args.target_spread}")
    cfg = tp.BenchConfig(
        models=list(get("models")),
        providers=providers,
        device=device,
        batch_size=get("batch_size"),
        dtype=tp.DTYPES[dtype],
        precision=how,
        modes=[m.strip() for m in get("mode").split(",") if m.strip()],
        img_size=args.img_size,
        depth=args.depth,
        warmup=get("warmup"),
        repeats=get("repeats"),
        target_spread=args.target_spread,
        max_time_s=args.max_time,
        compile_mode=args.compile_mode,
        compile_backend=args.torchcompile or "inductor",
        channels_last=args.channels_last,
        opt=args.opt,
        cuda_graphs=args.cuda_graphs,
        peak=peak,
        input_dtype=args.input_dtype,
    )
    if args.cuda_graphs and device.type != "cuda":
        notes.append("--cuda-graphs: CUDA graphs need a CUDA GPU; those rows are not measured")
    try:
        tp.check_config(cfg)
    except ValueError as e:
        raise SystemExit(str(e))
    return cfg, notes


def cost_text(cfg: tp.BenchConfig) -> tuple:
    """The cost model of each model at the configured shapes: text and a JSON-able dict."""
    from ..bench import cost, cost_text
    from ..bench import models as bmodels

    lines, out = [], {}
    for spec in cfg.models:
        try:  # on the meta device: shapes only, no memory, no initialisation
            with torch.device("meta"):
                model = bmodels.build(spec, img_size=cfg.img_size, depth=cfg.depth)
        except Exception:
            model = bmodels.build(spec, img_size=cfg.img_size, depth=cfg.depth)
        shape = bmodels.shape_of(model, cfg.batch_size, cfg.dtype)
        depth = bmodels.depth_of(model)
        del model
        if shape is None:
            lines.append(f"{spec}: not a ViT the cost model recognises")
            continue
        mc = cost.model_cost(shape)
        lines.append(
            f"{spec} depth {depth} at batch {cfg.batch_size}, {shape.img[0]} px ({shape.tokens} tokens), "
            f"{str(cfg.dtype).replace('torch.', '')}: {mc.flops / 2e9 / cfg.batch_size:.2f} GMACs per image; "
            f"model bytes: eager {mc.bytes('eager') / 1e9:.2f} GB, fused plan {mc.bytes('fused') / 1e9:.2f} GB, "
            f"fused ops at minimum {mc.bytes('min') / 1e9:.2f} GB"
        )
        entry = {
            "depth": depth,
            "gflop": mc.flops / 1e9,
            "gmacs_per_image": mc.flops / 2e9 / cfg.batch_size,
            "bytes": {w: mc.bytes(w) for w in ("eager", "fused", "min")},
            "shape": shape.__dict__.copy(),
        }
        if cfg.peak is not None:
            b = {w: mc.bound_seconds(cfg.peak, cfg.dtype, w) for w in ("eager", "fused", "min")}
            if all(v is not None for v in b.values()):
                lines.append(
                    f"  roofline bound on {cfg.peak.name}: eager {b['eager'] * 1e3:.3f} ms, fused plan "
                    f"{b['fused'] * 1e3:.3f} ms, fused ops at minimum {b['min'] * 1e3:.3f} ms per step"
                )
                entry["bound_ms"] = {k: v * 1e3 for k, v in b.items()}
                entry["gpu"] = cfg.peak.name
        lines.append(cost_text.block_report(mc.block, cfg.peak, cfg.dtype))
        out[spec] = entry
    return "\n".join(lines), out


def run(args) -> int:
    """The command; under ``torchrun --nproc-per-node N`` every process runs it (see
    vit_kernels.bench.distributed) and rank 0 prints and writes the results."""
    import contextlib
    import dataclasses
    import os
    from ..bench import distributed as bdist

    cfg, notes = make_config(args)
    world, device = bdist.setup(cfg.device)
    cfg = dataclasses.replace(cfg, device=device)
    if world.size > 1:
        notes.append(
            f"torchrun: {world.size} processes (one per {'GPU' if device.type == 'cuda' else 'CPU process'}), "
            f"batch {cfg.batch_size} each; img/s summed over them, ms/step the slowest rank's"
        )
    try:
        if world.main:
            return _run(args, cfg, notes, write=True)
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            return _run(args, cfg, notes, write=False)
    finally:
        bdist.teardown(world)


def _run(args, cfg, notes, write: bool) -> int:
    from ..bench import report
    from ..bench.timer import timer_name

    meta = report.environment(cfg.device)
    dtype = str(cfg.dtype).replace("torch.", "")
    print(
        f"vit_kernels bench on {meta['device_name']} ({cfg.device}), torch {meta['torch']}, "
        f"commit {str(meta.get('commit'))[:10]}{' (modified)' if meta.get('dirty') else ''}"
    )
    depth = cfg.depth or "the model's"
    img = cfg.img_size or "the model's"
    print(
        f"batch {cfg.batch_size}, {dtype} ({cfg.precision}), modes {','.join(cfg.modes)}, "
        f"depth {depth}, image size {img}; warm-up {cfg.warmup}, "
        f">= {cfg.repeats} samples until p20-p80 within ±{100 * cfg.target_spread:g}% of the median; "
        f"timer {timer_name(cfg.device)}"
    )
    for n in notes:
        print("note: " + n)
    if cfg.device.type != "cuda" and not args.cost_only:
        print(
            "note: CPU timings are a smoke test (they check the harness runs, not how fast the kernels are); the "
            "Triton and CUDA kernels need a CUDA GPU and their rows are marked not measured"
        )
    cost_report, cost_json = cost_text(cfg)
    if args.cost or args.cost_only:
        print(cost_report)
        if args.cost_only:
            return 0
    with report.progress(len(tp.cases(cfg)), "bench", enabled=write and not args.no_progress) as prog:
        rows = tp.run(cfg, prog)
    warnings = tp.add_ranks(rows)
    for r in rows:
        r["device"] = meta["device_name"]
    print()
    report.print_table(rows, tp.TABLE_COLUMNS, styles=report.STATUS_STYLES)
    for r in rows:
        if r.get("note"):
            print(f"  {r['provider']} ({r['label']}, {r['mode']}): {r['note']}")
    for w in warnings:
        print(w)
    tuning = {}
    for r in rows:  # the tuned rows' tables: printed, kept in bench.json, not in the CSV columns
        entries = r.pop("tuning_entries", None)
        summary = r.pop("tuning", None)
        table = r.pop("tuning_rows", None)
        if entries is not None:
            tuning[f"{r['label']} {r['mode']}"] = {"summary": summary, "entries": entries}
            print()
            report.print_table(
                table or [], TABLE_COLUMNS, title=f"tuning table ({r['label']}, {r['mode']}):", group=starts_group
            )
            print(summary)
    errors = [r for r in rows if r["status"] == "error"]
    if not write:  # torchrun: a rank other than 0 (its rows went into rank 0's through all_gather)
        return 1 if errors else 0
    out = Path(args.out)
    timm = tp.timm_rows(rows)
    extra = {
        "config": {
            k: (str(v) if not isinstance(v, (int, float, str, bool, list, type(None))) else v)
            for k, v in vars(args).items()
            if k != "func"
        },
        "providers": tp.PROVIDERS,
        "cost": cost_json,
        "warnings": warnings,
        "gpu_for_bounds": cfg.peak.name if cfg.peak else None,
        "tuning": tuning,
        "timm_results": timm,
    }
    paths = [report.write_csv(out / "results.csv", timm, tp.timm_columns(timm))]
    paths += report.write_all(out, "bench", rows, meta, extra)
    if args.results_file:
        target = Path(args.results_file)
        if args.results_format == "json":
            paths.append(report.write_json(target, timm))
        else:
            paths.append(report.write_csv(target, timm, tp.timm_columns(timm)))
    if not args.no_plot:
        why = report.matplotlib_missing()
        if why:
            print("note: " + why)
        else:
            title = f"{meta['device_name']}, {dtype} ({cfg.precision}); median, bars p20-p80" + (
                "; CPU: a smoke test, not a kernel timing" if cfg.device.type != "cuda" else ""
            )
            paths.append(report.plot_bench(out / "bench.png", rows, title))
    print("wrote " + ", ".join(str(p) for p in paths))
    if errors:
        print(f"{len(errors)} row(s) failed with an error (see the notes above)", file=sys.stderr)
        return 1
    return 0
