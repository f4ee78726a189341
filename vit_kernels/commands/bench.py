"""``python -m vit_kernels bench [MODEL ...]``: model throughput, providers side by side.

Writes a table to the terminal and bench.csv, bench.json (with device, versions, commit) and
bench.png under --out. Defaults depend on the device: on a CUDA GPU ViT-B/16 at batch 256 in
bf16, inference and training, all providers; on a CPU ViT-Ti/16 at batch 4 in fp32, inference,
and the fused providers are reported as not measured (their kernels need a CUDA GPU).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..bench import peaks as bpeaks
from ..bench import throughput as tp
from .arguments import out_folder, positive_int

GPU_DEFAULTS = dict(models=["vit_base_patch16_224"], batch_size=256, dtype="bf16", mode="inference,train",
                    providers="eager,sdpa,compile,triton,cuda,tuned", warmup=10, repeats=30)
CPU_DEFAULTS = dict(models=["vit_tiny_patch16_224"], batch_size=4, dtype="fp32", mode="inference",
                    providers="eager,sdpa,triton,cuda,tuned", warmup=2, repeats=5)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="model throughput: eager, SDPA, torch.compile and the fused kernels side by side",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="providers:\n" + "\n".join(f"  {k:<9}{v}" for k, v in tp.PROVIDERS.items())
                       + "\n\nGPU peaks (--gpu KEY; dense TFLOP/s, GB/s):\n" + bpeaks.table_text())
    p.add_argument("models", nargs="*", help="reference names (vit_base_patch16_224) or timm:NAME, "
                   "torchvision:NAME, hf:NAME (default: vit_base_patch16_224 on a GPU, vit_tiny_patch16_224 on a CPU)")
    p.add_argument("--providers", default=None, help="comma list from: " + ",".join(tp.PROVIDERS))
    p.add_argument("--batch-size", type=positive_int, default=None, help="default 256 on a GPU, 4 on a CPU")
    p.add_argument("--img-size", type=positive_int, default=None, help="image size (default: the model's)")
    p.add_argument("--depth", type=positive_int, default=None, help="override the number of blocks (quick runs)")
    p.add_argument("--dtype", choices=sorted(tp.DTYPES), default=None, help="default bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--precision", choices=["pure", "autocast"], default="pure",
                   help="pure: weights and inputs in --dtype; autocast: fp32 weights under torch.autocast")
    p.add_argument("--mode", default=None, help="comma list of inference,train (default: both on a GPU, "
                   "inference on a CPU)")
    p.add_argument("--warmup", type=positive_int, default=None, help="calls before timing (default 10 GPU / 2 CPU)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed repeats (default 30 GPU / 5 CPU)")
    p.add_argument("--min-repeat-ms", type=float, default=0.0,
                   help="run calls back to back until a repeat lasts this long (default 0: one call per repeat)")
    p.add_argument("--compile-mode", choices=tp.COMPILE_MODES, default="default")
    p.add_argument("--cuda-graphs", action="store_true", help="also time each inference step replayed from a CUDA graph")
    p.add_argument("--gpu", default=None, help="GPU for roofline bounds (a key of the peaks table; default: this device)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--out", type=out_folder, default="bench_out", help="folder for bench.csv/json/png (default bench_out)")
    p.add_argument("--cost", action="store_true", help="print the cost model of one block of each model")
    p.add_argument("--cost-only", action="store_true", help="print the cost model and exit (nothing is timed)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def make_config(args) -> tuple:
    """BenchConfig from the arguments and the device's defaults; returns (config, notes)."""
    device = resolve_device(args.device)
    d = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    notes = []
    used = {k: getattr(args, k, None) for k in ("models", "batch_size", "dtype", "mode", "providers", "warmup", "repeats")}
    defaulted = [k for k, v in used.items() if v in (None, [])]
    if defaulted:
        notes.append(f"defaults for {'a CUDA GPU' if device.type == 'cuda' else 'the CPU'}: "
                     + ", ".join(f"{k}={d[k]}" for k in defaulted))
    get = lambda k: used[k] if used[k] not in (None, []) else d[k]  # noqa: E731
    peak = bpeaks.choose(args.gpu, device, notes, "time/bound ratio")
    cfg = tp.BenchConfig(
        models=list(get("models")), providers=[p.strip() for p in get("providers").split(",") if p.strip()],
        device=device, batch_size=get("batch_size"), dtype=tp.DTYPES[get("dtype")], precision=args.precision,
        modes=[m.strip() for m in get("mode").split(",") if m.strip()], img_size=args.img_size, depth=args.depth,
        warmup=get("warmup"), repeats=get("repeats"), min_repeat_ms=args.min_repeat_ms,
        compile_mode=args.compile_mode, cuda_graphs=args.cuda_graphs, peak=peak)
    if args.cuda_graphs and device.type != "cuda":
        notes.append("--cuda-graphs: CUDA graphs need a CUDA GPU; those rows are not measured")
    try:
        tp.check_config(cfg)
    except ValueError as e:
        raise SystemExit(str(e))
    return cfg, notes


def cost_text(cfg: tp.BenchConfig) -> tuple:
    """The cost model of each model at the configured shapes: text and a JSON-able dict."""
    from ..bench import cost
    from ..bench import models as bmodels
    lines, out = [], {}
    for spec in cfg.models:
        try:  # on the meta device: shapes only, no memory, no initialisation
            with torch.device("meta"):
                model = bmodels.build(spec, img_size=cfg.img_size, depth=cfg.depth)
        except Exception:
            model = bmodels.build(spec, img_size=cfg.img_size, depth=cfg.depth)
        shape = bmodels.shape_of(model, cfg.batch_size, cfg.dtype)
        del model
        if shape is None:
            lines.append(f"{spec}: not a ViT the cost model recognises")
            continue
        mc = cost.model_cost(shape)
        lines.append(f"{spec} at batch {cfg.batch_size}, {shape.img[0]} px ({shape.tokens} tokens), "
                     f"{str(cfg.dtype).replace('torch.', '')}: {mc.flops / 2e9 / cfg.batch_size:.2f} GMACs per image; "
                     f"model bytes: eager {mc.bytes('eager') / 1e9:.2f} GB, fused plan {mc.bytes('fused') / 1e9:.2f} GB, "
                     f"fused ops at minimum {mc.bytes('min') / 1e9:.2f} GB")
        entry = {"gflop": mc.flops / 1e9, "gmacs_per_image": mc.flops / 2e9 / cfg.batch_size,
                 "bytes": {w: mc.bytes(w) for w in ("eager", "fused", "min")}, "shape": shape.__dict__.copy()}
        if cfg.peak is not None:
            b = {w: mc.bound_seconds(cfg.peak, cfg.dtype, w) for w in ("eager", "fused", "min")}
            if all(v is not None for v in b.values()):
                lines.append(f"  roofline bound on {cfg.peak.name}: eager {b['eager'] * 1e3:.3f} ms, fused plan "
                             f"{b['fused'] * 1e3:.3f} ms, fused ops at minimum {b['min'] * 1e3:.3f} ms per step")
                entry["bound_ms"] = {k: v * 1e3 for k, v in b.items()}
                entry["gpu"] = cfg.peak.name
        lines.append(cost.block_report(mc.block, cfg.peak, cfg.dtype))
        out[spec] = entry
    return "\n".join(lines), out


def run(args) -> int:
    from ..bench import report
    cfg, notes = make_config(args)
    meta = report.environment(cfg.device)
    print(f"vit_kernels bench on {meta['device_name']} ({cfg.device}), torch {meta['torch']}, "
          f"commit {str(meta.get('commit'))[:10]}{' (modified)' if meta.get('dirty') else ''}")
    print(f"batch {cfg.batch_size}, {str(cfg.dtype).replace('torch.', '')} ({cfg.precision}), "
          f"modes {','.join(cfg.modes)}, warm-up {cfg.warmup}, repeats {cfg.repeats}, timer "
          f"{'CUDA events' if cfg.device.type == 'cuda' else 'perf_counter'}")
    for n in notes:
        print("note: " + n)
    if cfg.device.type != "cuda" and not args.cost_only:
        print("note: no CUDA GPU here: the torch paths are timed on the CPU; the Triton and CUDA kernels need a "
              "CUDA GPU and their rows are marked not measured")
    cost_report, cost_json = cost_text(cfg)
    if args.cost or args.cost_only:
        print(cost_report)
        if args.cost_only:
            return 0
    with report.progress(len(tp.cases(cfg)), "bench", enabled=not args.no_progress) as prog:
        rows = tp.run(cfg, prog)
    for r in rows:
        r["device"] = meta["device_name"]
    print()
    print(report.format_table(rows, tp.TABLE_COLUMNS))
    for r in rows:
        if r.get("note"):
            print(f"  {r['provider']} ({r['model']}, {r['mode']}): {r['note']}")
    tuning = {}
    for r in rows:   # the tuned rows' tables: printed, kept in bench.json, not in the CSV columns
        entries = r.pop("tuning_entries", None)
        summary = r.pop("tuning", None)
        if entries is not None:
            tuning[f"{r['model']} {r['mode']}"] = {"summary": summary, "entries": entries}
            print(f"\ntuning table ({r['model']}, {r['mode']}; * = chosen):")
            print(summary)
            print("\n".join(entries))
    out = Path(args.out)
    extra = {"config": {k: (str(v) if not isinstance(v, (int, float, str, bool, list, type(None))) else v)
                        for k, v in vars(args).items() if k != "func"},
             "providers": tp.PROVIDERS, "cost": cost_json,
             "gpu_for_bounds": cfg.peak.name if cfg.peak else None, "tuning": tuning}
    paths = report.write_all(out, "bench", rows, meta, extra)
    if not args.no_plot:
        why = report.matplotlib_missing()
        if why:
            print("note: " + why)
        else:
            groups = report.unique(f"{r['model']}\n{r['mode']}" for r in rows)
            providers = report.unique(r["provider"] for r in rows)
            series = {p: [next((r.get("img_per_s") for r in rows if r["provider"] == p
                                and f"{r['model']}\n{r['mode']}" == g), None) for g in groups] for p in providers}
            paths.append(report.plot_bars(out / "bench.png", groups, series, "images / s",
                                          f"{meta['device_name']}, batch {cfg.batch_size}, "
                                          f"{str(cfg.dtype).replace('torch.', '')} ({cfg.precision})"))
    print("wrote " + ", ".join(str(p) for p in paths))
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} row(s) failed with an error (see the notes above)", file=sys.stderr)
        return 1
    return 0
