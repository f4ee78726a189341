"""Model throughput: providers side by side on the same model, inputs and settings.

Providers (``PROVIDERS``):
- ``eager``: attention as separate matmul, softmax, matmul ops (see bench.models);
- ``sdpa``: eager PyTorch with F.scaled_dot_product_attention (each library's default);
- ``compile``: torch.compile of the sdpa model (``compile_mode``);
- ``triton`` / ``cuda``: the vit_kernels fused ops with backend="triton" / "cuda" (the reference
  ViT directly; other families through ``vit_kernels.fuse``);
- ``tuned``: the fused ops with backend="auto" after ``vit_kernels.tune(model, images)``: each op
  signature timed on the GPU (torch, SDPA backends, Triton paths and configs, cuda) and the
  fastest kept; when the fused model is not faster than the unfused one its parts take the
  torch path (the row's note says so). The tuning table is in the row ("tuning").

A provider that cannot be timed here gets a row that says "not measured" and why; it is never
estimated. The Triton and CUDA kernels are timed only on a CUDA GPU: on the CPU they would run
in Triton's interpreter or the host emulator, which are for verification, not timing. After
the first call of a fused provider, ``vit_kernels.last_decision`` is read: a row that asked for
triton but ran torch for some op says so (status "fallback").

Peak memory (``peak_mem_mib``, GPU only) means the same for every provider: the most memory
allocated during the timed steps, counted from when the provider is ready (:func:`start_peak_memory`:
model built, compiled or tuned, first step run). It includes what stays allocated (weights,
inputs, optimizer state, caches, a CUDA graph's pool) and the timer's L2-flush buffer
(``triton.testing.do_bench``: 256 MB, every row alike); it excludes building, torch.compile's
autotuning and ``vk.tune`` (each signature's check against the float64 oracle, at most about 256 MiB:
:func:`vit_kernels.tuning.check_plan`), which happen once.

Modes: ``inference`` (a forward under inference_mode) and ``train`` (forward, cross-entropy,
backward, optimizer step: :func:`vit_kernels.training.train_step`). Under ``torchrun`` every
process times the same cases on its own batch, the train step under DistributedDataParallel, and
the rows are merged over the processes (:mod:`vit_kernels.bench.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import distributed as bdist
from . import models as bmodels
from .cost import model_cost, training_flops
from ..arch import Peak
from ..dtypes import SHORT_NAMES
from .timer import NOISY, Stats, measure, rank
from ..training import train_step

PROVIDERS = {
    "eager": "attention as separate matmul/softmax/matmul ops",
    "sdpa": "eager PyTorch + F.scaled_dot_product_attention",
    "compile": "torch.compile of the sdpa model",
    "triton": "vit_kernels fused ops, backend='triton'",
    "cuda": "vit_kernels fused ops, backend='cuda' (csrc)",
    "tuned": "vit_kernels fused ops, backend='auto' chosen by measurement (vit_kernels.tune)",
}
FUSED = ("triton", "cuda", "tuned")
FUSED_BACKEND = {"triton": "triton", "cuda": "cuda", "tuned": "auto"}
MODES = ("inference", "train")
OPTIMIZERS = ("sgd", "adamw")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DTYPES = SHORT_NAMES  # vit_kernels.dtypes


@dataclasses.dataclass
class BenchConfig:
    models: Sequence[str]
    providers: Sequence[str]
    device: torch.device
    batch_size: int
    dtype: torch.dtype = torch.float32
    precision: str = "pure"  # "pure": weights and inputs in dtype; "autocast": fp32 weights + autocast
    modes: Sequence[str] = ("inference",)
    img_size: Optional[int] = None
    depth: Optional[int] = None
    warmup: int = 10
    repeats: int = 30  # the fewest timed samples
    target_spread: float = 0.02  # time until the p20-p80 half-width is within this fraction of the median
    max_time_s: Optional[float] = None  # ... or this many seconds have passed (None: 3 s GPU, 1 s CPU)
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    channels_last: bool = False
    opt: str = "sgd"  # the train step's optimizer: "sgd" (timm's default, nesterov) or "adamw"
    cuda_graphs: bool = False
    peak: Optional[Peak] = None  # the GPU whose roofline bounds are reported
    input_dtype: str = "float"  # "uint8": decoded NHWC uint8 images (see pixel_input)


def check_config(cfg: BenchConfig) -> None:
    """Validate before anything is built; errors name the argument."""
    for p in cfg.providers:
        if p not in PROVIDERS:
            raise ValueError(f"providers: expected names from {tuple(PROVIDERS)}, got {p!r}")
    for m in cfg.modes:
        if m not in MODES:
            raise ValueError(f"mode: expected names from {MODES}, got {m!r}")
    if cfg.input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype: expected one of {INPUT_DTYPES}, got {cfg.input_dtype!r}")
    if cfg.precision not in ("pure", "autocast"):
        raise ValueError(f"precision: expected 'pure' or 'autocast', got {cfg.precision!r}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode: expected one of {COMPILE_MODES}, got {cfg.compile_mode!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {cfg.batch_size}")
    if cfg.repeats < 1 or cfg.warmup < 1:
        raise ValueError(f"repeats/warmup: expected >= 1, got repeats={cfg.repeats}, warmup={cfg.warmup}")
    if cfg.opt not in OPTIMIZERS:
        raise ValueError(f"opt: expected one of {OPTIMIZERS}, got {cfg.opt!r}")
    if not cfg.target_spread > 0:
        raise ValueError(f"target_spread: expected a fraction > 0, got {cfg.target_spread}")
    for m in cfg.models:
        bmodels.parse(m)


def static_reason(
    provider: str,
    device: torch.device,
    *,
    graphs: bool = False,
    mode: str = "inference",
    interpreter: Optional[bool] = None,
) -> Optional[str]:
    """Why ``provider`` cannot be timed on ``device`` (None when it can be tried). Pure: decided
    from the device and the settings, before any model is built."""
    from ..backends import cuda_unavailable, interpreter_enabled, triton_importable

    interpreter = interpreter_enabled() if interpreter is None else interpreter
    if graphs:
        if device.type != "cuda":
            return "CUDA graphs need a CUDA GPU"
        if mode != "inference":
            return "CUDA graphs are captured for the inference step only"
    if provider == "triton":
        if device.type != "cuda":
            return (
                "the Triton kernels need a CUDA GPU; on the CPU they run only in Triton's "
                "interpreter, which is for verification, not timing"
            )
        if interpreter:
            return "TRITON_INTERPRET=1 is set: Triton would run in its interpreter, which is not a timing"
        return triton_importable()
    if provider == "cuda":
        if mode == "train":
            return (
                "the CUDA C++ kernels are forward-only: a training step with backend='cuda' raises (use the "
                "triton provider, whose forward and backward are Triton kernels)"
            )
        if device.type != "cuda":
            return (
                "the CUDA C++ kernels need a CUDA GPU; on the CPU they run only in the host "
                "emulation build, which is for verification, not timing"
            )
        return cuda_unavailable(device)
    if provider == "tuned":
        if device.type != "cuda":
            return "tuning times the candidates on a CUDA GPU; on the CPU auto is the torch path (the sdpa row)"
        if interpreter:
            return (
                "TRITON_INTERPRET=1 is set: the Triton candidates would run in the interpreter, which is not a timing"
            )
    return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fallbacks(before: Dict, requested: str) -> List[str]:
    """Ops whose decision changed since ``before`` and did not run ``requested``; and paths."""
    from ..backends import last_decision

    notes = []
    for op, d in last_decision().items():
        if before.get(op) is d:
            continue
        if d.backend != requested:
            why = "; ".join(f"{r}" for r in d.reasons.values()) or "no reason recorded"
            notes.append(f"FALLBACK {op} ran {d.backend}: {why}")
        elif d.path:
            notes.append(f"{op} path={d.path}")
    return notes


def prepare(spec: str, provider: str, mode: str, cfg: BenchConfig, graphs: bool = False):
    """Build one (model, provider, mode) and run its step once (compilation, autotuning, lazy
    init; the backend decisions are read here), then start the peak-memory window
    (:func:`start_peak_memory`). Returns (row, step, shape): step is None when the provider cannot
    be timed here, and the row says why."""
    name = provider + ("+graphs" if graphs else "")
    row: Dict = {
        "model": spec,
        "provider": name,
        "mode": mode,
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "precision": cfg.precision,
        "batch": cfg.batch_size,
        "status": "ok",
        "note": "",
    }
    why = static_reason(provider, cfg.device, graphs=graphs, mode=mode)
    if why is not None:
        row.update(status="not measured", note=why)
        return row, None, None
    device = cfg.device
    _free(device)
    family, _ = bmodels.parse(spec)
    torch.manual_seed(0)
    model = bmodels.build(
        spec,
        img_size=cfg.img_size,
        depth=cfg.depth,
        attention="eager" if provider == "eager" else "sdpa",
        backend="torch" if family == "vit_kernels" else None,
    )
    chans, img = bmodels.input_size(model)
    img = cfg.img_size or img
    row.update(
        img_size=img,
        depth=bmodels.depth_of(model),
        param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    )
    model = model.to(device)
    if cfg.precision == "pure":
        model = model.to(cfg.dtype)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fuse_note = ""
    if provider in FUSED:
        backend = FUSED_BACKEND[provider]
        if family == "vit_kernels":
            from ..nn import set_backend

            set_backend(model, backend)
        else:
            from ..swap import fuse, fuse_report

            try:
                fuse(model, backend=backend)
            except NotImplementedError as e:
                row.update(status="not measured", note=f"vit_kernels.fuse cannot fuse this model: {e}")
                return row, None, None
            rep = fuse_report(model, backend=backend)
            if not rep.fused:
                row.update(status="not measured", note=f"vit_kernels.fuse found nothing to fuse: {rep}")
                return row, None, None
            if rep.left:
                fuse_note = (
                    f"fuse: {len(rep.fused)} parts fused, {len(rep.left)} left ("
                    + "; ".join(sorted({e.reason for e in rep.left}))
                    + ")"
                )
    shape = bmodels.shape_of(model, cfg.batch_size, cfg.dtype)
    in_dtype = cfg.dtype if cfg.precision == "pure" else torch.float32
    images = torch.randn(cfg.batch_size, chans, img, img, device=device, dtype=in_dtype)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    prep, input_note = (lambda x: x), ""  # noqa: E731
    if cfg.input_dtype == "uint8":
        images = torch.randint(0, 256, (cfg.batch_size, img, img, chans), dtype=torch.uint8, device=device).permute(
            0, 3, 1, 2
        )
        prep, input_note = pixel_input(model, in_dtype)

    def amp():
        if cfg.precision == "autocast":
            return torch.autocast(device.type, dtype=cfg.dtype)
        return contextlib.nullcontext()

    attn_ctx = lambda: bmodels.attention_context("eager" if provider == "eager" else "sdpa")  # noqa: E731

    if mode == "train":  # the number of classes, from the model before it is compiled
        n_cls = bmodels.logits(_probe_out(model, prep(images[:1]), attn_ctx, amp)).shape[-1]
        labels = torch.randint(0, n_cls, (cfg.batch_size,), device=device)
        if cfg.opt == "sgd":  # timm benchmark.py's default: create_optimizer_v2(opt="sgd", lr=1e-4)
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()
        if bdist.size() > 1:  # torchrun: a data-parallel step, gradients all-reduced over the processes
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if provider == "compile":
        model = torch.compile(
            model, backend=cfg.compile_backend, mode=None if cfg.compile_mode == "default" else cfg.compile_mode
        )

    if mode == "inference":

        def step():
            with torch.inference_mode(), attn_ctx(), amp():
                return model(prep(images))
    else:
        amp_dtype = cfg.dtype if cfg.precision == "autocast" else None

        def step():  # forward, loss, backward, optimizer step: the loop of vit_kernels.training
            train_step(model, opt, prep(images), labels, amp_dtype=amp_dtype, logits=bmodels.logits, context=attn_ctx)

    tune_note = ""
    if provider == "tuned":
        from ..tuning import table_rows, tune

        with attn_ctx(), amp():
            result = tune(model, (prep(images),))  # times every op signature, then fused vs unfused
        row["tuning"] = str(result)
        row["tuning_entries"] = [e.summary() for e in result.entries]  # bench.json: full signatures
        row["tuning_rows"] = table_rows(result.entries)  # the printed table: short ones
        tune_note = result.message
    from ..backends import last_decision

    before = last_decision()
    t0 = time.perf_counter()
    step()  # first call: compilation, autotuning, lazy init
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_s = time.perf_counter() - t0
    if provider == "compile":
        row["compile_s"] = round(first_s, 2)
    notes = _fallbacks(before, provider) if provider in ("triton", "cuda") else []
    if tune_note:
        notes.append(tune_note)
    if fuse_note:
        notes.append(fuse_note)
    if input_note:
        notes.append(input_note)
    if any(n.startswith("FALLBACK") for n in notes):
        row["status"] = "fallback"
    row["note"] = "; ".join(notes)
    _free(device)  # what building, compiling, tuning and the first call left behind
    start_peak_memory(device)
    return row, step, shape


def start_peak_memory(device: torch.device) -> None:
    """Start the window of the peak-memory column: called once a provider is ready (model built,
    compiled or tuned, first step run), so the column is the steady-state step's for every provider:
    what stays allocated (weights, inputs, optimizer state, caches, a CUDA graph's pool) plus the
    step's own peak. The tuned provider's tuning (each signature's float64 oracle, candidates'
    outputs) and torch.compile's autotuning happen before it and are not counted."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> Optional[float]:
    """The peak allocated memory since :func:`start_peak_memory` in MiB (None off a CUDA device)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


INPUT_DTYPES = ("float", "uint8")


def pixel_input(model: torch.nn.Module, dtype: torch.dtype):
    """(prep, note) for uint8 (B, C, H, W) images (NHWC data): a model whose patch embedding reads
    uint8 (vit_kernels' own models, fused timm / torchvision) takes them as they are and normalizes
    in the kernel; any other model gets them normalized in plain PyTorch first, inside the timed
    step (x / 255 - mean) / std, as an eager pipeline does, with the model's data config."""
    from ..nn import FusedPatchEmbed
    from ..ops.patch_embed import normalize_pixels
    from ..swap.patch import FusedPatchConv
    from ..swap.timm import FusedTimmPatchEmbed

    for m in model.modules():
        if isinstance(m, (FusedPatchEmbed, FusedPatchConv, FusedTimmPatchEmbed)) and m.image_mean is not None:
            return (lambda x: x), f"input: uint8 NHWC, normalized in the patch embedding (mean={m.image_mean})"
    from ..swap import timm as swap_timm, torchvision as swap_tv

    dc = swap_timm.data_config(model) or (
        swap_tv.data_config() if type(model).__module__.startswith("torchvision") else None
    )
    mean, std = dc[:2] if dc else ((0.5,) * 3, (0.5,) * 3)  # HF ViTImageProcessor's and vit-pytorch's usual
    p = next(model.parameters())
    mean_t = torch.tensor(mean, dtype=torch.float32, device=p.device)
    std_t = torch.tensor(std, dtype=torch.float32, device=p.device)
    return (
        lambda x: normalize_pixels(x, mean_t, std_t, dtype)
    ), f"input: uint8 NHWC, normalized in PyTorch before the model (mean={tuple(mean)})"


def run_case(spec: str, provider: str, mode: str, cfg: BenchConfig, graphs: bool = False, sampler=None) -> Dict:
    """Build, warm up and time one (model, provider, mode). Returns a result row. sampler: see
    timer.measure (a fake one in tests)."""
    row, fn, shape = prepare(spec, provider, mode, cfg, graphs)
    if fn is None:
        return row
    device = cfg.device
    target = cfg.target_spread
    if bdist.size() > 1 and sampler is None:  # torchrun: the same number of steps on every rank
        sampler, target = bdist.fixed_sampler(cfg.repeats, device), float("inf")
    m = measure(
        fn,
        device=device,
        warmup=max(0, cfg.warmup - 1),
        repeats=cfg.repeats,
        graph=graphs,
        target_spread=target,
        max_time_s=cfg.max_time_s,
        sampler=sampler,
    )
    st = m.stats
    row.update(
        ms=st.median,
        ms_p20=st.p20,
        ms_p80=st.p80,
        ms_min=st.min,
        ms_max=st.max,
        spread_pct=100 * st.spread,
        repeats=st.n,
        timer=m.timer,
        img_per_s=cfg.batch_size * 1e3 / st.median,
        img_per_s_p20=cfg.batch_size * 1e3 / st.p80,
        img_per_s_p80=cfg.batch_size * 1e3 / st.p20,
    )
    if not m.precise:
        row["note"] = "; ".join(
            n
            for n in (
                row["note"],
                f"target spread {100 * cfg.target_spread:.0f}% not reached "
                f"in the time allowed ({100 * st.spread:.0f}%)",
            )
            if n
        )
    peak = peak_memory_mib(device)  # over the timed steps only (see start_peak_memory)
    if peak is not None:
        row["peak_mem_mib"] = peak
    if shape is not None:
        mc = model_cost(shape)
        flops = mc.flops if mode == "inference" else training_flops(mc.flops)
        row["gflop_per_img"] = flops / cfg.batch_size / 1e9
        row["gmacs_per_img"] = flops / cfg.batch_size / 2e9
        row["tflops"] = flops / (st.median * 1e-3) / 1e12
        if cfg.peak is not None:
            if mode == "inference":
                b = mc.bound_seconds(cfg.peak, cfg.dtype, "min")
            else:
                tf = cfg.peak.tflops(cfg.dtype)
                b = flops / (tf * 1e12) if tf else None
            if b is not None:
                row["bound_ms"] = b * 1e3
                if device.type == "cuda":
                    row["x_bound"] = st.median / row["bound_ms"]
            add_modeled_columns(row, shape, provider, mode, cfg.dtype, cfg.peak, device.type == "cuda")
    del fn
    _free(device)
    return row


def add_modeled_columns(
    row: Dict, shape, provider: str, mode: str, dtype: torch.dtype, peak, measured_on_gpu: bool
) -> None:
    """modeled_ms: the kernel model's time of one inference forward as ``provider`` runs it
    (bench.cost_kernels.model_seconds, on ``peak``'s GPU); x_modeled: measured / modeled on a GPU. Pure."""
    from .cost_kernels import Machine, model_seconds

    machine = Machine.of(peak) if peak is not None else None
    if machine is None or mode != "inference" or "ms" not in row:
        return
    t = model_seconds(shape, dtype, machine, provider)
    if t is None:
        return
    row["modeled_ms"] = t * 1e3
    if measured_on_gpu:
        row["x_modeled"] = row["ms"] / row["modeled_ms"]


def _probe_out(model, images, attn_ctx, amp):
    with torch.no_grad(), attn_ctx(), amp():
        return model(images)


def cases(cfg: BenchConfig) -> List[tuple]:
    """(model, provider, mode, graphs) in the order they run."""
    out = []
    for spec in cfg.models:
        for mode in cfg.modes:
            for p in cfg.providers:
                out.append((spec, p, mode, False))
                if cfg.cuda_graphs and p != "compile":
                    out.append((spec, p, mode, True))
    return out


def add_speedups(rows: List[Dict]) -> None:
    """speedup = eager's median ms / the row's, within each (model, mode); p20/p80 of the ratio
    from the two rows' p20-p80 intervals (the worst and best pairing)."""
    base = {(r["model"], r["mode"]): r for r in rows if r["provider"] == "eager" and "ms" in r}
    for r in rows:
        b = base.get((r["model"], r["mode"]))
        if b is not None and "ms" in r:
            r["speedup"] = b["ms"] / r["ms"]
            if r is not b:  # eager against itself is 1, exactly
                r["speedup_p20"] = b["ms_p20"] / r["ms_p80"]
                r["speedup_p80"] = b["ms_p80"] / r["ms_p20"]


def add_ranks(rows: List[Dict]) -> List[str]:
    """rank 1.. by median ms within each (model, mode) when the providers can be told apart
    (timer.rank); otherwise no rank, and a warning line per (model, mode) is returned."""
    warnings = []
    for key in dict.fromkeys((r["model"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["model"], r["mode"]) == key and "ms" in r]
        if len(group) < 2:
            continue
        ranks, bad = rank(
            [
                (
                    r["provider"],
                    Stats(r["ms"], r["ms_p20"], r["ms_p80"], r["ms_min"], r["ms_max"], r["ms"], 0.0, r["repeats"]),
                )
                for r in group
            ]
        )
        for r in group:
            if r["provider"] in ranks:
                r["rank"] = ranks[r["provider"]]
        if bad:
            pairs = ", ".join(
                f"{a} (±{next(r['spread_pct'] for r in group if r['provider'] == a):.0f}%)" if a == b else f"{a} ~ {b}"
                for a, b in bad
            )
            warnings.append(
                f"WARNING {label(group[0])} {key[1]}: the spread is too wide to rank the providers "
                f"({pairs}: p20-p80 intervals overlap or wider than ±{100 * NOISY:.0f}%); no ranks "
                f"are claimed"
            )
    return warnings


def label(row: Dict) -> str:
    """'vit_tiny_patch16_224 depth 2, 32 px, batch 2': the model as it was run."""
    parts = [row["model"]]
    if row.get("depth") is not None:
        parts.append(f"depth {row['depth']}")
    text = " ".join(parts)
    if row.get("img_size") is not None:
        text += f", {row['img_size']} px"
    return text + f", batch {row['batch']}"


def run(cfg: BenchConfig, progress=None, sampler=None) -> List[Dict]:
    check_config(cfg)
    rows = []
    todo = cases(cfg)
    for spec, p, mode, graphs in todo:
        what = f"{spec} {mode} {p}{'+graphs' if graphs else ''}"
        if progress is not None:
            progress.describe(what)
        try:
            row = run_case(spec, p, mode, cfg, graphs, sampler)
        except torch.cuda.OutOfMemoryError as e:
            row = _error_row(spec, p, mode, cfg, graphs, "out of memory: " + str(e).splitlines()[0])
            _free(cfg.device)
        except Exception as e:  # reported in the row and by the exit status, never hidden
            row = _error_row(
                spec, p, mode, cfg, graphs, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            _free(cfg.device)
        if bdist.size() > 1:
            row = bdist.reduce_row(row)
        rows.append(row)
        if progress is not None:
            progress.advance(what)
    add_speedups(rows)
    for r in rows:  # rows that were not built take depth and image size from a sibling that was
        sib = next((o for o in rows if o["model"] == r["model"] and o.get("depth") is not None), None)
        if r.get("depth") is None:
            r["depth"] = sib["depth"] if sib else cfg.depth
        if r.get("img_size") is None:
            r["img_size"] = sib["img_size"] if sib else cfg.img_size
        r["label"] = label(r)
    return rows


def _error_row(spec, p, mode, cfg, graphs, msg):
    return {
        "model": spec,
        "provider": p + ("+graphs" if graphs else ""),
        "mode": mode,
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "precision": cfg.precision,
        "batch": cfg.batch_size,
        "status": "error",
        "note": msg,
    }


TABLE_COLUMNS = [
    ("label", "model"),
    ("mode", "mode"),
    ("provider", "provider"),
    ("status", "status"),
    ("ms", "ms/step"),
    ("ms_p20", "p20"),
    ("ms_p80", "p80"),
    ("rank", "rank"),
    ("img_per_s", "img/s"),
    ("peak_mem_mib", "peak MiB"),
    ("speedup", "x eager"),
    ("tflops", "TFLOP/s"),
    ("bound_ms", "bound ms"),
    ("x_bound", "x bound"),
    ("modeled_ms", "modeled ms"),
    ("x_modeled", "x modeled"),
]


# timm's benchmark.py result fields, in its order (inference, then train, then param_count), and
# their units: samples/s rounded to 2 places, ms per step to 3, GMACs per sample to 2, parameters
# in millions to 2. timm's infer_macts (activations, from fvcore) has no counterpart here.
TIMM_FIELDS = [
    "model",
    "infer_samples_per_sec",
    "infer_step_time",
    "infer_batch_size",
    "infer_img_size",
    "infer_gmacs",
    "train_samples_per_sec",
    "train_step_time",
    "train_batch_size",
    "train_img_size",
    "param_count",
]
TIMM_PREFIX = {"inference": "infer", "train": "train"}


def timm_rows(rows: List[Dict]) -> List[Dict]:
    """One row per (model, provider) with timm's field names (TIMM_FIELDS first, for the modes that
    ran), then this bench's own: provider, depth, p20/p80 of the step time, GFLOPs beside GMACs,
    dtype, precision, status, note."""
    out: Dict[tuple, Dict] = {}
    for r in rows:
        key = (r["model"], r["provider"])
        t = out.setdefault(key, {"model": r["model"]})
        pre = TIMM_PREFIX[r["mode"]]
        if "ms" in r:
            t[f"{pre}_samples_per_sec"] = round(r["img_per_s"], 2)
            t[f"{pre}_step_time"] = round(r["ms"], 3)
        else:
            t[f"{pre}_samples_per_sec"] = t[f"{pre}_step_time"] = None
        t[f"{pre}_batch_size"] = r["batch"]
        t[f"{pre}_img_size"] = r.get("img_size")
        if pre == "infer":
            gm = r.get("gmacs_per_img")
            t["infer_gmacs"] = round(gm, 2) if gm is not None else None
        extra = t.setdefault("_extra", {})
        extra.update(provider=r["provider"], depth=r.get("depth"))
        if "ms" in r:
            extra[f"{pre}_step_time_p20"] = round(r["ms_p20"], 3)
            extra[f"{pre}_step_time_p80"] = round(r["ms_p80"], 3)
        if pre == "infer" and r.get("gflop_per_img") is not None:
            extra["infer_gflops"] = round(r["gflop_per_img"], 2)
        extra.update(dtype=r["dtype"], precision=r["precision"])
        extra[f"{pre}_status"] = r["status"]
        if r.get("note"):
            extra[f"{pre}_note"] = r["note"]
    params = {r["model"]: r["param_count"] for r in rows if r.get("param_count") is not None}
    result = []
    for t in out.values():
        extra = t.pop("_extra")
        t["param_count"] = params.get(t["model"])
        row = {k: t[k] for k in TIMM_FIELDS if k in t}
        row.update(extra)
        result.append(row)
    return result


def timm_columns(rows: List[Dict]) -> List[str]:
    """timm's fields first (those any row has, in timm's order), then the rest in first-seen order."""
    cols = [f for f in TIMM_FIELDS if any(f in r for r in rows)]
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols
