"""Attention across sequence lengths: the vit_kernels kernels, SDPA with each of its backends,
and eager matmul-softmax-matmul, on the same inputs; the forward, the backward, or both (MODES).

FLOPs are counted as FlashAttention's benchmarks count them: the forward's 4*B*H*N^2*d, the
backward 2.5 times that (five N x N x d products against the forward's two), forward + backward
3.5 times (the providers that also project Q, K and V add 2*B*N*D*3D for the projection's forward
and twice that for its backward); bytes are the fewest the pass must move; TFLOP/s and GB/s follow
from the median time. A provider that cannot run a case (SDPA backend constraints, no GPU, no
backward, out of memory) gets a row that says why, never a number.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .cost import attention_cost, dtype_bytes, qkv_attention_cost
from ..arch import Peak
from .timer import measure

PROVIDERS = {
    "vk_flash:triton": "vit_kernels.flash_attention, backend='triton'",
    "vk_flash:cuda": "vit_kernels.flash_attention, backend='cuda'",
    "vk_qkv:triton": "vit_kernels.qkv_attention (LayerNorm + QKV projection + attention), backend='triton'",
    "vk_qkv:cuda": "vit_kernels.qkv_attention, backend='cuda'",
    "qkv:torch": "LayerNorm + QKV linear + SDPA in PyTorch (what vk_qkv replaces)",
    "sdpa:flash": "F.scaled_dot_product_attention, flash backend only",
    "sdpa:efficient": "SDPA, memory-efficient backend only",
    "sdpa:cudnn": "SDPA, cuDNN backend only",
    "sdpa:math": "SDPA, math backend only",
    "eager": "(q @ k^T * scale).softmax(-1) @ v as separate ops",
}
MODES = {
    "fwd": "forward",
    "bwd": "backward: dq, dk, dv (and the projection's gradients) from the forward's saved tensors, "
    "torch.autograd.grad with retain_graph",
    "fwd_bwd": "forward + backward",
}
# FLOPs of a pass as a multiple of the forward's (FlashAttention's benchmark_flash_attention.py):
# attention's backward recomputes S = QK^T and computes dV, dP, dQ, dK: 5 products against 2.
ATTENTION_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
PROJECTION_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}  # a GEMM's backward: dX and dW
SDPA_BACKENDS = {
    "sdpa:flash": "FLASH_ATTENTION",
    "sdpa:efficient": "EFFICIENT_ATTENTION",
    "sdpa:cudnn": "CUDNN_ATTENTION",
    "sdpa:math": "MATH",
}


@dataclasses.dataclass(frozen=True)
class AttnCase:
    batch: int
    heads: int
    tokens: int
    head_dim: int
    dtype: torch.dtype
    mode: str = "fwd"  # a key of MODES

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


def tokens_from_images(img_sizes: Sequence[int], patch: int, prefix: int = 1) -> List[int]:
    """Tokens of square images: (img / patch)^2 + prefix (class token) each."""
    out = []
    for s in img_sizes:
        if s <= 0 or s % patch:
            raise ValueError(f"img_size: expected positive multiples of patch_size={patch}, got {s}")
        out.append((s // patch) ** 2 + prefix)
    return out


def batch_for(tokens: int, total_tokens: int) -> int:
    """A batch that keeps batch * tokens near ``total_tokens`` (as FlashAttention's benchmarks do)."""
    return max(1, total_tokens // tokens)


def is_qkv(provider: str) -> bool:
    return provider.startswith("vk_qkv") or provider == "qkv:torch"


def flops(provider: str, c: AttnCase) -> float:
    """FLOPs of case ``c``'s pass (c.mode), counted as FlashAttention counts them (see the module docstring)."""
    f = ATTENTION_FLOP_FACTOR[c.mode] * 4.0 * c.batch * c.heads * c.tokens**2 * c.head_dim
    if is_qkv(provider):
        f += PROJECTION_FLOP_FACTOR[c.mode] * 2.0 * c.batch * c.tokens * c.dim * 3 * c.dim
    return f


def backward_min_bytes(provider: str, c: AttnCase) -> float:
    """The fewest bytes the backward moves: attention reads q, k, v, out, dout and the fp32 row
    log-sum-exp and writes dq, dk, dv (8 tensors of (batch, heads, tokens, head_dim)); the qkv providers
    also read x and the weights (QKV projection, LayerNorm) and write their gradients."""
    e = dtype_bytes(c.dtype)
    Q = c.batch * c.heads * c.tokens * c.head_dim * e
    lse = 4 * c.batch * c.heads * c.tokens
    if is_qkv(provider):
        X = c.batch * c.tokens * c.dim * e
        W = (3 * c.dim * c.dim + 3 * c.dim + 2 * c.dim) * e
        return 2 * X + 2 * W + 5 * Q + lse  # x, weights, dout, q, k, v, out, lse read; dx, dweights written
    return 8 * Q + lse


def min_bytes(provider: str, c: AttnCase) -> float:
    e = dtype_bytes(c.dtype)
    if is_qkv(provider):
        fwd = qkv_attention_cost(c.batch, c.tokens, c.dim, c.heads, e).min_bytes
    else:
        fwd = attention_cost(c.batch, c.heads, c.tokens, c.head_dim, e).min_bytes
    return {"fwd": fwd, "bwd": backward_min_bytes(provider, c), "fwd_bwd": fwd + backward_min_bytes(provider, c)}[
        c.mode
    ]


def static_reason(
    provider: str, device: torch.device, interpreter: Optional[bool] = None, mode: str = "fwd"
) -> Optional[str]:
    """Why ``provider`` cannot be timed on ``device`` in pass ``mode``, decided before any input is made."""
    from ..backends import cuda_unavailable, interpreter_enabled, triton_importable
    from torch.nn.attention import SDPBackend

    if provider not in PROVIDERS:
        raise ValueError(f"providers: expected names from {tuple(PROVIDERS)}, got {provider!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {tuple(MODES)}, got {mode!r}")
    if mode != "fwd" and provider.endswith(":cuda"):
        return (
            "the CUDA C++ kernels are forward-only: backend='cuda' under autograd raises before any launch "
            "(the Triton provider has the backward kernels)"
        )
    interpreter = interpreter_enabled() if interpreter is None else interpreter
    if provider.endswith(":triton"):
        if device.type != "cuda":
            return (
                "the Triton kernels need a CUDA GPU; on the CPU they run only in Triton's interpreter, "
                "which is for verification, not timing"
            )
        if interpreter:
            return "TRITON_INTERPRET=1 is set: Triton would run in its interpreter, which is not a timing"
        return triton_importable()
    if provider.endswith(":cuda"):
        if device.type != "cuda":
            return (
                "the CUDA C++ kernels need a CUDA GPU; on the CPU they run only in the host emulation "
                "build, which is for verification, not timing"
            )
        return cuda_unavailable(device)
    if provider in SDPA_BACKENDS:
        if not hasattr(SDPBackend, SDPA_BACKENDS[provider]):
            return f"this torch ({torch.__version__}) has no SDPA backend {SDPA_BACKENDS[provider]}"
        if device.type != "cuda" and provider in ("sdpa:efficient", "sdpa:cudnn"):
            return f"SDPA's {provider.split(':')[1]} backend runs on CUDA devices only"
    return None


def make_fn(provider: str, c: AttnCase, device: torch.device):
    """The callable to time, on fresh random inputs: the forward (c.mode "fwd"); the backward of one
    forward made here ("bwd": torch.autograd.grad of its output with respect to every input, the
    graph retained, so each call runs the backward kernels alone); or both ("fwd_bwd")."""
    forward, inputs = make_forward(provider, c, device, requires_grad=c.mode != "fwd")
    if c.mode == "fwd":
        return forward
    out = forward()
    grad = torch.randn_like(out)
    if c.mode == "bwd":
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), inputs, grad)


def make_forward(provider: str, c: AttnCase, device: torch.device, requires_grad: bool = False):
    """(forward callable, its input tensors) on fresh random inputs (leaves requiring grad when asked)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from .. import ops

    g = dict(device=device, dtype=c.dtype, requires_grad=requires_grad)

    def rnd(*shape, scale=1.0, shift=0.0):
        with torch.no_grad():
            t = torch.randn(*shape, **g) * scale + shift
        return t.requires_grad_(requires_grad)

    if is_qkv(provider):
        x = rnd(c.batch, c.tokens, c.dim)
        w = rnd(3 * c.dim, c.dim, scale=c.dim**-0.5)
        b = rnd(3 * c.dim, scale=0.02)
        nw, nb = rnd(c.dim, scale=0.1, shift=1.0), rnd(c.dim, scale=0.1)
        backend = provider.split(":")[1]
        fn = lambda: ops.qkv_attention(x, w, b, num_heads=c.heads, norm_weight=nw, norm_bias=nb, backend=backend)  # noqa: E731
        return fn, (x, w, b, nw, nb)
    q, k, v = (rnd(c.batch, c.heads, c.tokens, c.head_dim) for _ in range(3))
    if provider.startswith("vk_flash"):
        backend = provider.split(":")[1]
        return (lambda: ops.flash_attention(q, k, v, backend=backend)), (q, k, v)
    if provider in SDPA_BACKENDS:
        be = getattr(SDPBackend, SDPA_BACKENDS[provider])

        def fn():
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v)

        return fn, (q, k, v)
    scale = c.head_dim**-0.5
    return (lambda: torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v), (q, k, v)


@dataclasses.dataclass
class AttnConfig:
    providers: Sequence[str]
    cases: Sequence[AttnCase]
    device: torch.device
    warmup: int = 10
    repeats: int = 30
    peak: Optional[Peak] = None
    max_time_s: Optional[float] = None  # per case; None: the timer's default (3 s GPU, 1 s CPU)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(provider: str, c: AttnCase, cfg: AttnConfig) -> Dict:
    device = cfg.device
    row: Dict = {
        "provider": provider,
        "batch": c.batch,
        "heads": c.heads,
        "tokens": c.tokens,
        "head_dim": c.head_dim,
        "dtype": str(c.dtype).replace("torch.", ""),
        "mode": c.mode,
        "status": "ok",
        "note": "",
    }
    why = static_reason(provider, device, mode=c.mode)
    if why is None and provider == "eager" and device.type == "cuda":
        # scores, probabilities, softmax temp (the backward keeps them and adds their gradients)
        need = (3 if c.mode == "fwd" else 5) * c.batch * c.heads * c.tokens**2 * dtype_bytes(c.dtype)
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            why = f"out of memory: eager needs ~{need / 2**30:.1f} GiB for the scores, {free / 2**30:.1f} GiB free"
    if why:
        row.update(status="not measured", note=why)
        return row
    _free(device)
    from ..backends import last_decision

    before = dict(last_decision())
    mem0 = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        mem0 = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn = make_fn(provider, c, device)  # in "bwd" mode this runs the forward
            out = fn()
        except RuntimeError as e:
            if provider in SDPA_BACKENDS and "No available kernel" in str(e):
                reasons = "; ".join(str(w.message).splitlines()[0] for w in caught)
                row.update(
                    status="not measured",
                    note=f"SDPA's {provider.split(':')[1]} backend cannot run "
                    f"this case" + (f": {reasons}" if reasons else ""),
                )
                return row
            raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["mem_mib"] = (torch.cuda.max_memory_allocated(device) - mem0) / 2**20
    del out
    if provider.startswith("vk_"):
        op = "qkv_attention" if is_qkv(provider) else "flash_attention"
        d = last_decision(op)
        want = provider.split(":")[1]
        if d is None or d is before.get(op):
            row.update(status="fallback", note=f"{op} recorded no decision")
        elif d.backend != want:
            row.update(status="fallback", note=f"FALLBACK {op} ran {d.backend}: " + "; ".join(d.reasons.values()))
        elif d.path:
            row["note"] = f"path={d.path}"
    m = measure(fn, device=device, warmup=max(0, cfg.warmup - 1), repeats=cfg.repeats, max_time_s=cfg.max_time_s)
    st = m.stats
    f, nb = flops(provider, c), min_bytes(provider, c)
    row.update(
        ms=st.median,
        ms_p20=st.p20,
        ms_p80=st.p80,
        spread_pct=100 * st.spread,
        repeats=st.n,
        gflop=f / 1e9,
        tflops=f / (st.median * 1e-3) / 1e12,
        gbs=nb / (st.median * 1e-3) / 1e9,
    )
    add_peak_columns(row, c.dtype, cfg.peak, measured_on_gpu=device.type == "cuda")
    add_modeled_columns(row, provider, c, cfg.peak, measured_on_gpu=device.type == "cuda")
    return row


def modeled_kernels(provider: str, c: AttnCase, sms: int, path: str = "") -> Optional[list]:
    """The kernels the cost model (bench.cost_kernels) says ``provider`` runs for case ``c`` (None for a
    provider it does not model: the CUDA C++ kernels, SDPA's other backends, eager). path: the
    qkv_attention path the call took ("split" when not known)."""
    from . import cost_kernels as ck

    if provider in ("vk_flash:triton", "sdpa:flash"):
        return ck.flash_attention_paths(c.batch, c.heads, c.tokens, c.head_dim, c.dtype, sms=sms)[
            "triton" if provider == "vk_flash:triton" else "torch"
        ]
    if provider in ("vk_qkv:triton", "qkv:torch"):
        paths = ck.qkv_attention_paths(c.batch, c.tokens, c.dim, c.heads, c.dtype, sms=sms)
        return paths.get("torch" if provider == "qkv:torch" else (path or "split"))
    return None


def add_modeled_columns(row: Dict, provider: str, c: AttnCase, peak: Optional[Peak], measured_on_gpu: bool) -> None:
    """modeled_ms: the cost model's time of the kernels ``provider`` runs (bench.cost_kernels) on ``peak``'s
    GPU; x_modeled: measured / modeled, when measured on a GPU. Pure."""
    from . import cost_kernels as ck

    machine = ck.Machine.of(peak) if peak is not None else None
    if machine is None or "ms" not in row or row.get("mode", "fwd") != "fwd":  # the cost model has no backward
        return
    path = row.get("note", "")[len("path=") :] if row.get("note", "").startswith("path=") else ""
    kernels = modeled_kernels(provider, c, machine.sms, path)
    t = ck.path_seconds(kernels, machine, c.dtype) if kernels else None
    if t is None:
        return
    row["modeled_ms"] = t * 1e3
    if measured_on_gpu:
        row["x_modeled"] = row["ms"] / row["modeled_ms"]


def add_peak_columns(row: Dict, dtype: torch.dtype, peak: Optional[Peak], measured_on_gpu: bool) -> None:
    """% of the GPU's peak FLOP/s and bandwidth, the roofline bound and measured / bound. Pure."""
    if peak is None or "ms" not in row:
        return
    tf = peak.tflops(dtype)
    f, nb = row["gflop"] * 1e9, row["gbs"] * 1e9 * row["ms"] * 1e-3
    if tf:
        row["bound_ms"] = max(f / (tf * 1e12), nb / (peak.bandwidth_gbs * 1e9)) * 1e3
    if measured_on_gpu:
        if tf:
            row["pct_peak_flops"] = 100 * row["tflops"] / tf
            row["x_bound"] = row["ms"] / row["bound_ms"]
        row["pct_peak_bw"] = 100 * row["gbs"] / peak.bandwidth_gbs


def run(cfg: AttnConfig, progress=None) -> List[Dict]:
    rows = []
    for c in cfg.cases:
        for p in cfg.providers:
            label = f"{p} {c.mode} N={c.tokens} B={c.batch} d={c.head_dim} {str(c.dtype).replace('torch.', '')}"
            if progress is not None:
                progress.describe(label)
            try:
                row = run_case(p, c, cfg)
            except torch.cuda.OutOfMemoryError as e:
                row = {
                    "provider": p,
                    "batch": c.batch,
                    "heads": c.heads,
                    "tokens": c.tokens,
                    "head_dim": c.head_dim,
                    "dtype": str(c.dtype).replace("torch.", ""),
                    "status": "not measured",
                    "note": "out of memory: " + str(e).splitlines()[0],
                }
                _free(cfg.device)
            except Exception as e:
                row = {
                    "provider": p,
                    "batch": c.batch,
                    "heads": c.heads,
                    "tokens": c.tokens,
                    "head_dim": c.head_dim,
                    "dtype": str(c.dtype).replace("torch.", ""),
                    "mode": c.mode,
                    "status": "error",
                    "note": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                }
                _free(cfg.device)
            rows.append(row)
            if progress is not None:
                progress.advance(label)
    return rows


TABLE_COLUMNS = [
    ("tokens", "tokens"),
    ("batch", "batch"),
    ("head_dim", "d"),
    ("dtype", "dtype"),
    ("mode", "pass"),
    ("provider", "provider"),
    ("status", "status"),
    ("ms", "ms"),
    ("spread_pct", "±%"),
    ("tflops", "TFLOP/s"),
    ("gbs", "GB/s"),
    ("pct_peak_flops", "%peak FLOP"),
    ("pct_peak_bw", "%peak BW"),
    ("mem_mib", "alloc MiB"),
    ("x_bound", "x bound"),
    ("modeled_ms", "modeled ms"),
    ("x_modeled", "x modeled"),
]
