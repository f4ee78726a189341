"""Where the time of one ViT block goes: each stage inside ``torch.profiler.record_function`` and
an NVTX range (visible in the exported trace, Perfetto, and Nsight Systems), timed by
torch.profiler, set beside the cost model's FLOPs, bytes and roofline bound for that stage, and (for a
GPU the kernel model knows) the modeled time of the kernels that stage runs (bench.cost_kernels).

Two variants of the same block (same weights, same input):
- eager: LayerNorm, QKV linear, SDPA, merge heads, out-proj, residual, LayerNorm, fc1, GELU,
  fc2, residual: the op sequence the cost model's "eager" accounting describes;
- fused: the vit_kernels ops qkv_attention, linear (out-proj + residual), layernorm_gelu_mlp
  with a chosen backend.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .cost import Step, ViTShape, block_cost, dtype_bytes
from ..arch import Peak

EAGER_STAGES = ("ln1", "qkv", "attention", "merge_heads", "proj", "residual1", "ln2", "fc1", "gelu", "fc2", "residual2")
FUSED_STAGES = ("qkv_attention", "proj+residual", "mlp")
PREFIX = "vk::"


@contextlib.contextmanager
def stage(name: str, nvtx: bool):
    """A named range for torch.profiler (record_function) and, on CUDA, for NVTX."""
    with torch.profiler.record_function(PREFIX + name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


# What kineto (the profiler's C++ side) writes to the process's stderr on every profile: trace
# points at start and stop, its stage log, and, on a machine without a GPU, a failed device count.
KINETO_DEBRIS = [re.compile(r"^USDT:.*\bprofiler_(start|stop)\b"), re.compile(r"^STAGE:.*\bCompleted Stage\b")]
KINETO_DEBRIS_WITHOUT_GPU = [re.compile(r"^ERROR:.*\bgpuGetDeviceCount failed\b")]


def is_profiler_debris(line: str, gpu: bool) -> bool:
    """A line of kineto's routine log (:data:`KINETO_DEBRIS`) rather than a real message."""
    patterns = KINETO_DEBRIS + ([] if gpu else KINETO_DEBRIS_WITHOUT_GPU)
    return any(p.search(line) for p in patterns)


@contextlib.contextmanager
def profiler_debris_filtered():
    """kineto writes to file descriptor 2 directly, around Python's sys.stderr: capture it inside
    the block and, after it, pass on every line that is not :func:`is_profiler_debris`."""
    gpu = torch.cuda.is_available()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                if not is_profiler_debris(line, gpu)
            ]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def eager_block(blk, x: torch.Tensor, nvtx: bool = False) -> torch.Tensor:
    """The block's forward as separate PyTorch ops, each in its own range. blk: a
    vit_kernels.models.Block; x: (batch, tokens, dim)."""
    a, m = blk.attn, blk.mlp
    B, N, C = x.shape
    with stage("eager/ln1", nvtx):
        h = F.layer_norm(x, (C,), a.norm.weight, a.norm.bias, a.norm.eps)
    with stage("eager/qkv", nvtx):
        qkv = F.linear(h, a.qkv.weight, a.qkv.bias)
    with stage("eager/attention", nvtx):
        q, k, v = qkv.reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
    with stage("eager/merge_heads", nvtx):
        o = o.transpose(1, 2).reshape(B, N, C)
    with stage("eager/proj", nvtx):
        o = F.linear(o, a.proj.weight, a.proj.bias)
        if a.ls is not None:
            o = o * a.ls.gamma
    with stage("eager/residual1", nvtx):
        x = x + o
    with stage("eager/ln2", nvtx):
        h = F.layer_norm(x, (C,), m.norm.weight, m.norm.bias, m.norm.eps)
    with stage("eager/fc1", nvtx):
        h = F.linear(h, m.fc1.weight, m.fc1.bias)
    with stage("eager/gelu", nvtx):
        h = F.gelu(h, approximate=m.approximate)
    with stage("eager/fc2", nvtx):
        h = F.linear(h, m.fc2.weight, m.fc2.bias)
        if m.ls is not None:
            h = h * m.ls.gamma
    with stage("eager/residual2", nvtx):
        return x + h


def fused_block(blk, x: torch.Tensor, backend: str, nvtx: bool = False) -> torch.Tensor:
    """The block's forward through the three vit_kernels ops, each in its own range."""
    from .. import ops

    a, m = blk.attn, blk.mlp
    ga = a.ls.gamma if a.ls is not None else None
    gm = m.ls.gamma if m.ls is not None else None
    with stage("fused/qkv_attention", nvtx):
        o = ops.qkv_attention(
            x,
            a.qkv.weight,
            a.qkv.bias,
            num_heads=a.num_heads,
            norm_weight=a.norm.weight,
            norm_bias=a.norm.bias,
            eps=a.norm.eps,
            backend=backend,
        )
    with stage("fused/proj+residual", nvtx):
        x = ops.linear(o, a.proj.weight, a.proj.bias, residual=x, layer_scale=ga, backend=backend)
    with stage("fused/mlp", nvtx):
        return ops.layernorm_gelu_mlp(
            x,
            m.norm.weight,
            m.norm.bias,
            m.fc1.weight,
            m.fc1.bias,
            m.fc2.weight,
            m.fc2.bias,
            eps=m.norm.eps,
            approximate=m.approximate,
            residual=x,
            layer_scale=gm,
            backend=backend,
        )


def stage_costs(shape: ViTShape) -> Dict[str, List[Step]]:
    """The cost model's steps for each stage label of both variants."""
    bc = block_cost(shape)
    qkv_op, proj_op, mlp_op = bc.ops
    e = list(qkv_op.eager) + list(proj_op.eager) + list(mlp_op.eager)
    # eager steps in order: layernorm, qkv linear, sdpa, proj, residual add, layernorm, fc1, gelu, fc2, residual add
    names = ["ln1", "qkv", "attention", "proj", "residual1", "ln2", "fc1", "gelu", "fc2", "residual2"]
    out = {f"eager/{n}": [s] for n, s in zip(names, e)}
    out["eager/merge_heads"] = [Step("merge heads (a view after SDPA)", 0, 0)]
    out["fused/qkv_attention"] = list(qkv_op.fused)
    out["fused/proj+residual"] = list(proj_op.fused)
    out["fused/mlp"] = list(mlp_op.fused)
    return out


def stage_kernels(shape: ViTShape, dtype: torch.dtype, sms: int, fused_backend: Optional[str]) -> Dict[str, list]:
    """The kernels the cost model (bench.cost_kernels) says each stage runs: the eager stages from the ops'
    torch paths, the fused stages from the path ``fused_backend`` takes ("torch"; "triton": qkv_attention's
    split path, gemm.py for the projection and the MLP); a backend it does not model gets no entry."""
    from . import cost_kernels as ck

    s = shape
    qkv = ck.qkv_attention_paths(s.batch, s.tokens, s.dim, s.heads, dtype, sms=sms)
    lin = ck.linear_paths(s.rows, s.dim, s.dim, dtype, sms=sms)
    mlp = ck.mlp_paths(s.rows, s.dim, s.hidden, dtype, sms=sms)
    out = dict(zip(("eager/ln1", "eager/qkv", "eager/attention"), ([k] for k in qkv["torch"])))
    out["eager/merge_heads"] = []
    out.update(zip(("eager/proj", "eager/residual1"), ([k] for k in lin["torch"])))
    out.update(
        zip(("eager/ln2", "eager/fc1", "eager/gelu", "eager/fc2", "eager/residual2"), ([k] for k in mlp["torch"]))
    )
    if fused_backend in ("torch", "triton"):
        t = fused_backend == "triton"
        out["fused/qkv_attention"] = qkv["split" if t else "torch"]
        out["fused/proj+residual"] = lin["triton" if t else "torch"]
        out["fused/mlp"] = mlp["triton" if t else "torch"]
    return out


def stage_times_ms(events, labels: Sequence[str], use_device: bool, iters: int) -> Dict[str, float]:
    """Per-iteration ms of each label from torch.profiler events (``prof.events()``).

    Only the host-side range events count (the profiler also puts a copy of each range on the
    GPU timeline; adding both would count twice). On CUDA their time is the device time of the
    kernels launched inside the range (``device_time_total``); on the CPU the range's own time.
    """
    totals = {lab: 0.0 for lab in labels}
    for ev in events:
        name = ev.name[len(PREFIX) :] if ev.name.startswith(PREFIX) else None
        if name not in totals:
            continue
        dt = getattr(ev, "device_type", None)
        if dt is not None and "CPU" not in str(dt):
            continue
        us = (getattr(ev, "device_time_total", None) if use_device else ev.cpu_time_total) or 0.0
        totals[name] += us
    return {k: v / 1e3 / iters for k, v in totals.items()}


def breakdown(
    *,
    dim: int = 768,
    heads: int = 12,
    tokens: int = 197,
    batch: int = 8,
    hidden: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
    fused_backend: Optional[str] = "torch",
    iters: int = 5,
    warmup: int = 2,
    peak: Optional[Peak] = None,
    trace_path: Optional[Path] = None,
) -> List[Dict]:
    """Profile one block (eager and, unless fused_backend is None, fused) and return one row per stage."""
    from torch.profiler import ProfilerActivity, profile
    from ..models.vit import Block

    hidden = hidden or 4 * dim
    torch.manual_seed(0)
    blk = Block(dim, heads, mlp_ratio=hidden / dim, backend="torch").to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    variants = [("eager", lambda: eager_block(blk, x, nvtx=cuda))]
    if fused_backend is not None:
        variants.append(("fused", lambda: fused_block(blk, x, fused_backend, nvtx=cuda)))
    with torch.inference_mode():
        for _ in range(warmup):
            for _, fn in variants:
                fn()
        if cuda:
            torch.cuda.synchronize(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profiler_debris_filtered():
            with profile(activities=acts) as prof:
                for _ in range(iters):
                    for _, fn in variants:
                        fn()
                if cuda:
                    torch.cuda.synchronize(device)
            if trace_path is not None:
                trace_path.parent.mkdir(parents=True, exist_ok=True)
                prof.export_chrome_trace(str(trace_path))
            events = prof.events()
    labels = [f"eager/{s}" for s in EAGER_STAGES] + ([f"fused/{s}" for s in FUSED_STAGES] if fused_backend else [])
    times = stage_times_ms(events, labels, use_device=cuda, iters=iters)
    shape = ViTShape(batch, tokens, dim, heads, hidden, 1, dtype_bytes(dtype))
    costs = stage_costs(shape)
    from .cost_kernels import Machine, path_seconds

    machine = Machine.of(peak) if peak is not None else None
    kernels = stage_kernels(shape, dtype, machine.sms, fused_backend) if machine is not None else {}
    rows = []
    totals = {v: sum(t for lab, t in times.items() if lab.startswith(v + "/")) for v, _ in variants}
    for lab in labels:
        variant, name = lab.split("/", 1)
        steps = costs[lab]
        r = {
            "variant": variant if variant == "eager" else f"fused ({fused_backend})",
            "stage": name,
            "ms": times[lab],
            "pct": 100 * times[lab] / totals[variant] if totals[variant] else None,
            "gflop": sum(s.flops for s in steps) / 1e9,
            "mb": sum(s.bytes for s in steps) / 1e6,
            "A": sum(s.bytes for s in steps) / shape.A,
        }
        if peak is not None and peak.tflops(dtype):
            tf = peak.tflops(dtype)
            r["bound_ms"] = sum(s.seconds(tf, peak.bandwidth_gbs) for s in steps) * 1e3
            if cuda and r["bound_ms"] > 0:
                r["x_bound"] = r["ms"] / r["bound_ms"]
        modeled = path_seconds(kernels[lab], machine, dtype) if lab in kernels else None
        if modeled is not None:
            r["modeled_ms"] = modeled * 1e3
            if cuda and modeled > 0:
                r["x_modeled"] = r["ms"] / r["modeled_ms"]
        rows.append(r)
    return rows


TABLE_COLUMNS = [
    ("variant", "variant"),
    ("stage", "stage"),
    ("ms", "ms"),
    ("pct", "% of block"),
    ("gflop", "GFLOP"),
    ("A", "bytes (A)"),
    ("bound_ms", "bound ms"),
    ("x_bound", "x bound"),
    ("modeled_ms", "modeled ms"),
    ("x_modeled", "x modeled"),
]
