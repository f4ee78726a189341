"""What each implemented kernel really moves, and how long it should take: a model, not a measurement.

:mod:`vit_kernels.bench.cost` counts the plan (every tensor once per op). This file counts the kernels as
they are written, tile by tile, for each path an op can take:

- Loads are counted per program: a tiled GEMM reads its A rows once per column tile (N / BLOCK_N
  times) and the weight once per row tile (M / BLOCK_M times); flash attention reads K and V once per
  query tile; the one-kernel QKV + attention reads its image's x 7 times per (image, head) program
  (LayerNorm statistics twice and the projection once, for the K/V tile and again for the query tiles).
- ``dram_bytes``: the first read of every tensor and every write (compulsory HBM traffic);
  ``l2_bytes``: every re-read, shown apart and modeled as L2 hits. Not free (L2 bandwidth is finite)
  but not HBM traffic: the model assumes each re-read hits L2, which holds when the tensor, or the band
  of it that runs concurrently, fits in L2 (every ViT weight; the row bands a grouped tile order keeps).
- ``flops``: the tensor-core work as executed, tile padding included (197 tokens in 64-row tiles
  compute 256 rows).
- Time: max(flops / peak, dram / HBM bandwidth, l2 / L2 bandwidth, latency floor); the latency floor
  is the serial chain of loop iterations one SM walks (waves x iterations per program) times one memory
  round trip (HBM's or L2's, weighted by where the kernel's bytes come from), divided by the loads a
  pipelined loop keeps ahead (stages - 1).

The GPU: :class:`Machine` (peaks.py's datasheet peaks and SM counts; L2 bandwidth and memory latency
are assumptions of this model, order-of-magnitude figures, not measured here).
The tiles are the launchers' own (gemm.block_config, gemm_tma.default_config, attention.kernel_config,
qkv_attention.kv_layout / kernel_config); the torch path's cuBLAS and SDPA kernels are modeled with
assumed tiles (:data:`TORCH_GEMM_TILES`, :data:`TORCH_ATTENTION_TILES`).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from .cost import dtype_bytes
from .peaks import Peak

L2_OVER_HBM = 3.0  # assumed: L2 bandwidth as a multiple of HBM bandwidth
LATENCY_NS = 600.0  # assumed: the round trip of a load served by HBM
L2_LATENCY_NS = 200.0  # assumed: the round trip of a load served by L2
TORCH_GEMM_TILES = (128, 256, 64, 4)  # assumed cuBLAS tiles: BLOCK_M, BLOCK_N, BLOCK_K, stages
TORCH_ATTENTION_TILES = (128, 64, 2)  # assumed SDPA flash tiles: BLOCK_M, BLOCK_N, stages


@dataclasses.dataclass(frozen=True)
class Machine:
    """A GPU as the model sees it: peaks (dense TFLOP/s, HBM GB/s), SMs, L2 GB/s, the latency of a load
    served by HBM and by L2."""

    peak: Peak
    sms: int
    l2_gbs: float
    latency_ns: float = LATENCY_NS
    l2_latency_ns: float = L2_LATENCY_NS

    @staticmethod
    def of(peak: Peak) -> Optional["Machine"]:
        """The machine of a peaks entry (vit_kernels.arch; None when its SM count is not listed)."""
        return None if peak.sms is None else Machine(peak, peak.sms, L2_OVER_HBM * peak.bandwidth_gbs)


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """One kernel launch: tensor-core FLOPs as executed, compulsory HBM bytes, L2 re-read bytes, and the
    serial loop it runs (serial_steps: iterations one SM walks one after another; stages: loads in flight)."""

    name: str
    flops: float
    dram_bytes: float
    l2_bytes: float = 0.0
    serial_steps: int = 0
    stages: int = 1

    def terms(self, m: Machine, dtype: torch.dtype) -> Optional[Dict[str, float]]:
        """Seconds per limit: compute, hbm, l2, latency (None without a tensor-core peak for dtype)."""
        tflops = m.peak.tflops(dtype)
        if tflops is None:
            return None
        moved = self.dram_bytes + self.l2_bytes
        l2_share = self.l2_bytes / moved if moved else 0.0  # a step waits on L2 as often as its bytes come from it
        step_ns = l2_share * m.l2_latency_ns + (1 - l2_share) * m.latency_ns
        return {
            "compute": self.flops / (tflops * 1e12),
            "hbm": self.dram_bytes / (m.peak.bandwidth_gbs * 1e9),
            "l2": self.l2_bytes / (m.l2_gbs * 1e9),
            "latency": self.serial_steps * step_ns * 1e-9 / max(1, self.stages - 1),
        }

    def seconds(self, m: Machine, dtype: torch.dtype) -> Optional[float]:
        t = self.terms(m, dtype)
        return None if t is None else max(t.values())

    def limit(self, m: Machine, dtype: torch.dtype) -> Optional[str]:
        t = self.terms(m, dtype)
        return None if t is None else max(t, key=t.get)


def path_seconds(kernels: List[KernelCost], m: Machine, dtype: torch.dtype) -> Optional[float]:
    """A path's modeled time: its kernels one after another."""
    ts = [k.seconds(m, dtype) for k in kernels]
    return None if any(t is None for t in ts) else sum(ts)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split(name: str, flops: float, loads: float, first: float, writes: float, serial: int, stages: int) -> KernelCost:
    """A kernel from its total loads, the part of them that is a first read, and its writes."""
    return KernelCost(name, flops, first + writes, loads - first, serial, stages)


# ---------------------------------------------------------------------------------------------
# kernels


def gemm_kernel(
    name: str,
    M: int,
    N: int,
    K: int,
    elem: int,
    tiles,
    *,
    sms: int,
    blocks_per_sm: int = 1,
    col_vec_bytes: int = 0,
    row_vec_bytes: int = 0,
    k_vec_bytes: int = 0,
    residual: bool = False,
    out_elem: Optional[int] = None,
) -> KernelCost:
    """out (M, N) = epilogue(A (M, K) @ W (N, K)^T) in tiles = (BLOCK_M, BLOCK_N, BLOCK_K, stages).

    Every program loads its BLOCK_M rows of A and BLOCK_N rows of W over all of K, so A is loaded once
    per column tile and W once per row tile. col_vec_bytes: bytes per output column of vectors the
    epilogue reads (bias, layer scale, folded column sums), loaded once per row tile; row_vec_bytes:
    bytes per row (mean and rstd in fp32: 8), once per column tile; k_vec_bytes: bytes per K element of
    vectors every program reads with A (LayerNorm gamma and beta applied as A loads), once per program;
    residual: an (M, N) read once; out_elem: the output element size (default elem)."""
    bm, bn, bk, stages = tiles
    tm, tn = _cdiv(M, bm), _cdiv(N, bn)
    a, w = M * K * elem, N * K * elem
    loads = tn * a + tm * w + tm * N * col_vec_bytes + tn * M * row_vec_bytes + tm * tn * K * k_vec_bytes
    first = a + w + N * col_vec_bytes + M * row_vec_bytes + K * k_vec_bytes
    writes = M * N * (elem if out_elem is None else out_elem)
    if residual:
        loads += M * N * elem
        first += M * N * elem
    flops = 2.0 * tm * bm * tn * bn * _cdiv(K, bk) * bk
    serial = _cdiv(tm * tn, sms * blocks_per_sm) * _cdiv(K, bk)
    return _split(name, flops, loads, first, writes, serial, stages)


def flash_attention_kernel(
    name: str,
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    elem: int,
    tiles,
    *,
    sms: int,
    chunks: Optional[int] = None,
    lse: bool = False,
    blocks_per_sm: int = 1,
    kv_tokens: Optional[int] = None,
) -> KernelCost:
    """Flash attention in tiles = (BLOCK_M, BLOCK_N, stages): one program per (batch, head, query tile)
    loads its Q tile once and all of K and V; writes O (and the fp32 row LSE). chunks: the head-dim width
    the dots compute (attention.dim_chunks summed; default head_dim)."""
    bm, bn, stages = tiles
    nkv = tokens if kv_tokens is None else kv_tokens
    d = head_dim if chunks is None else chunks
    q = batch * heads * tokens * head_dim * elem
    kv = batch * heads * nkv * head_dim * elem
    pm = _cdiv(tokens, bm)
    loads = q + pm * 2 * kv
    first = q + 2 * kv
    writes = q + (batch * heads * tokens * 4 if lse else 0)
    flops = 4.0 * batch * heads * pm * bm * _cdiv(nkv, bn) * bn * d
    serial = _cdiv(batch * heads * pm, sms * blocks_per_sm) * _cdiv(nkv, bn)
    return _split(name, flops, loads, first, writes, serial, stages)


def elementwise_kernel(name: str, reads: float, writes: float) -> KernelCost:
    """A streaming kernel (LayerNorm, GELU, an add): each byte once, no tensor-core work."""
    return KernelCost(name, 0.0, reads + writes)


def row_stats_kernel(rows: int, dim: int, elem: int) -> KernelCost:
    """vit_kernels.triton.layernorm.row_stats: reads x once, writes mean and rstd (fp32) per row."""
    return KernelCost("row stats", 0.0, rows * dim * elem + rows * 8)


def fold_kernel(N: int, K: int, elem: int, bias: bool) -> KernelCost:
    """The fold's part of vit_kernels.triton.layernorm.layernorm_prologue: reads W (N, K), gamma and beta
    (K,) [and b (N,)], writes W * gamma (N, K), the fp32 sums (5, N: column sums, unscale factors, folded
    bias, bias, dominance flags) and gamma and beta in fp32 (2, K); W read a second time, from L2 (each
    row's largest |W * gamma| and norm first)."""
    dram = 2 * N * K * elem + 2 * K * elem + (N * elem if bias else 0) + 20 * N + 8 * K
    return KernelCost("layernorm fold", 0.0, dram, l2_bytes=N * K * elem)


def prologue_kernel(rows: int, N: int, K: int, elem: int, bias: bool) -> KernelCost:
    """vit_kernels.triton.layernorm.layernorm_prologue, launched on every call of a LayerNorm-folded TMA
    GEMM: x's row statistics (:func:`row_stats_kernel`) and the fold (:func:`fold_kernel`) in one launch."""
    parts = (row_stats_kernel(rows, K, elem), fold_kernel(N, K, elem, bias))
    return KernelCost(
        "layernorm prologue (row stats + fold)",
        0.0,
        sum(k.dram_bytes for k in parts),
        l2_bytes=sum(k.l2_bytes for k in parts),
    )


def single_qkv_attention_kernel(
    batch: int,
    tokens: int,
    dim: int,
    heads: int,
    elem: int,
    dtype: torch.dtype,
    *,
    sms: int,
    norm: bool = True,
    norm_bias: bool = True,
    qkv_bias: bool = True,
) -> KernelCost:
    """vit_kernels.triton.qkv_attention's single kernel: one program per (image, head). Per program:
    for each K/V tile (1 or 2, :func:`qkv_attention.kv_layout`) the LayerNorm statistics (two passes over
    its x rows) and the K and V projections (one pass each, with that head's W_k, W_v rows); for each query
    tile the statistics (two passes), the Q projection (one pass, W_q rows again per tile), then the
    scores and P @ V on chip. So x is loaded 7 times per program with LayerNorm (3 without), heads
    times per image. Each projection pass loads gamma (and beta) over K."""
    from ..triton import attention, qkv_attention as tq

    hd = dim // heads
    n_main, n_tail = tq.kv_layout(tokens)
    kv_tiles = 2 if n_tail else 1
    bm, bk, _, stages = tq.kernel_config(tokens)
    q_tiles = _cdiv(tokens, bm)
    bd = attention.block_d(hd)
    programs = batch * heads
    x_img = tokens * dim * elem
    w_head = hd * dim * elem + (hd * elem if qkv_bias else 0)  # one head's rows of W_q (or W_k, W_v)
    nvec = dim * elem * ((2 if norm_bias else 1) if norm else 0)  # gamma (and beta) over K
    passes = (4 if norm else 2) + (3 if norm else 1)  # K/V: stats 2 + K + V; Q: stats 2 + Q
    loads = programs * (passes * x_img + 2 * kv_tiles * w_head + q_tiles * w_head + (2 * kv_tiles + q_tiles) * nvec)
    first = batch * x_img + 3 * heads * w_head + nvec
    writes = batch * tokens * dim * elem
    kv_pad = n_main + n_tail
    flops = programs * (2.0 * 2 * kv_pad * dim * bd + 2.0 * q_tiles * bm * dim * bd + 4.0 * q_tiles * bm * kv_pad * bd)
    k_steps = _cdiv(dim, bk)
    per_program = kv_tiles * (4 if norm else 2) * k_steps + q_tiles * ((3 if norm else 1) * k_steps + 1)
    serial = _cdiv(programs, sms) * per_program
    return _split("qkv+attention (single kernel)", flops, loads, first, writes, serial, stages)


# ---------------------------------------------------------------------------------------------
# paths of the ops


def _triton_gemm_tiles(dtype: torch.dtype):
    from ..triton import gemm

    bm, bn, bk, _, stages = gemm.block_config(dtype)
    return bm, bn, bk, stages


def _tma(N: int, K: int):
    """(tiles, blocks_per_sm) of gemm_tma's default config for (N, K)."""
    from ..triton import gemm_tma

    c = gemm_tma.default_config(N, K)
    return (c.block_m, c.block_n, c.block_k, c.num_stages), c.blocks_per_sm


def _tma_ok(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def linear_paths(
    rows: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    *,
    sms: int,
    bias: bool = True,
    residual: bool = True,
    layer_scale: bool = False,
) -> Dict[str, List[KernelCost]]:
    """linear's paths: "torch" (cuBLAS, then layer scale and the residual add as separate kernels),
    "triton" (gemm.py, one kernel), "tma" (gemm_tma, one kernel; float16/bfloat16)."""
    e = dtype_bytes(dtype)
    M, N, K = rows, out_features, in_features
    Y = M * N * e
    vec = (e if bias else 0) + (e if layer_scale else 0)
    torch_path = [gemm_kernel("linear (cuBLAS)", M, N, K, e, TORCH_GEMM_TILES, sms=sms, col_vec_bytes=e if bias else 0)]
    if layer_scale:
        torch_path.append(elementwise_kernel("layer scale", Y + N * e, Y))
    if residual:
        torch_path.append(elementwise_kernel("residual add", 2 * Y, Y))
    out = {
        "torch": torch_path,
        "triton": [
            gemm_kernel("gemm", M, N, K, e, _triton_gemm_tiles(dtype), sms=sms, col_vec_bytes=vec, residual=residual)
        ],
    }
    if _tma_ok(dtype):
        tiles, bps = _tma(N, K)
        out["tma"] = [
            gemm_kernel("gemm_tma", M, N, K, e, tiles, sms=sms, blocks_per_sm=bps, col_vec_bytes=vec, residual=residual)
        ]
    return out


def mlp_paths(
    rows: int,
    dim: int,
    hidden: int,
    dtype: torch.dtype,
    *,
    sms: int,
    norm: bool = True,
    bias: bool = True,
    layer_scale: bool = False,
) -> Dict[str, List[KernelCost]]:
    """layernorm_gelu_mlp's paths (the residual is x, as in a ViT block): "torch" (LayerNorm, fc1, GELU,
    fc2, [layer scale], residual add), "triton" (row stats; fc1 with LayerNorm as A loads, bias + GELU
    epilogue; fc2 with bias + [layer scale] + residual), "tma" (the prologue: row stats and the fold in one
    launch; fc1 on the folded weight, the
    row statistics and column sums applied in the epilogue; fc2 as triton's)."""
    e = dtype_bytes(dtype)
    X, Hd = rows * dim * e, rows * hidden * e
    b = e if bias else 0
    t = TORCH_GEMM_TILES
    torch_path = []
    if norm:
        torch_path.append(elementwise_kernel("layernorm", X + 2 * dim * e, X))
    torch_path += [
        gemm_kernel("fc1 (cuBLAS)", rows, hidden, dim, e, t, sms=sms, col_vec_bytes=b),
        elementwise_kernel("gelu", Hd, Hd),
        gemm_kernel("fc2 (cuBLAS)", rows, dim, hidden, e, t, sms=sms, col_vec_bytes=b),
    ]
    if layer_scale:
        torch_path.append(elementwise_kernel("layer scale", X + dim * e, X))
    torch_path.append(elementwise_kernel("residual add", 2 * X, X))
    stats = [row_stats_kernel(rows, dim, e)] if norm else []
    fc2_vec = b + (e if layer_scale else 0)
    tt = _triton_gemm_tiles(dtype)
    out = {
        "torch": torch_path,
        "triton": stats
        + [
            gemm_kernel(
                "fc1 gemm (LN on A loads, GELU)",
                rows,
                hidden,
                dim,
                e,
                tt,
                sms=sms,
                col_vec_bytes=b,
                row_vec_bytes=8 if norm else 0,
                k_vec_bytes=2 * e if norm else 0,
            ),
            gemm_kernel("fc2 gemm (residual)", rows, dim, hidden, e, tt, sms=sms, col_vec_bytes=fc2_vec, residual=True),
        ],
    }
    if _tma_ok(dtype):
        t1, bps1 = _tma(hidden, dim)
        t2, bps2 = _tma(dim, hidden)
        # folded fc1: bias b', the column sums c and the unscale factors u, in fp32 per output column
        fold_vec = (4 if (bias or norm) else 0) + (8 if norm else 0)
        prologue = [prologue_kernel(rows, hidden, dim, e, bias)] if norm else []
        out["tma"] = prologue + [
            gemm_kernel(
                "fc1 gemm_tma (LN folded, GELU)",
                rows,
                hidden,
                dim,
                e,
                t1,
                sms=sms,
                blocks_per_sm=bps1,
                col_vec_bytes=fold_vec if norm else b,
                row_vec_bytes=8 if norm else 0,
            ),
            gemm_kernel(
                "fc2 gemm_tma (residual)",
                rows,
                dim,
                hidden,
                e,
                t2,
                sms=sms,
                blocks_per_sm=bps2,
                col_vec_bytes=fc2_vec,
                residual=True,
            ),
        ]
    return out


def qkv_attention_paths(
    batch: int,
    tokens: int,
    dim: int,
    heads: int,
    dtype: torch.dtype,
    *,
    sms: int,
    norm: bool = True,
    qkv_bias: bool = True,
) -> Dict[str, List[KernelCost]]:
    """qkv_attention's paths: "torch" (LayerNorm, cuBLAS QKV, SDPA flash), "split" (row stats, gemm.py QKV
    with LayerNorm on A loads and the head-split write, flash attention), "split+tma" (the prologue, gemm_tma
    QKV on the folded weight, flash attention; float16/bfloat16), "single_kernel" (where it fits on sm_90)."""
    from ..triton import attention, qkv_attention as tq

    e = dtype_bytes(dtype)
    hd = dim // heads
    rows = batch * tokens
    X = rows * dim * e
    b = e if qkv_bias else 0
    bm, bn, _, stages = attention.kernel_config(dtype, hd)
    chunks = sum(attention.dim_chunks(hd, dtype))
    flash = flash_attention_kernel(
        "flash attention", batch, heads, tokens, hd, e, (bm, bn, stages), sms=sms, chunks=chunks
    )
    ta = TORCH_ATTENTION_TILES
    torch_path = []
    if norm:
        torch_path.append(elementwise_kernel("layernorm", X + 2 * dim * e, X))
    torch_path += [
        gemm_kernel("qkv linear (cuBLAS)", rows, 3 * dim, dim, e, TORCH_GEMM_TILES, sms=sms, col_vec_bytes=b),
        flash_attention_kernel("sdpa (flash)", batch, heads, tokens, hd, e, ta, sms=sms),
    ]
    stats = [row_stats_kernel(rows, dim, e)] if norm else []
    out = {
        "torch": torch_path,
        "split": stats
        + [
            gemm_kernel(
                "qkv gemm (LN on A loads, head split)",
                rows,
                3 * dim,
                dim,
                e,
                _triton_gemm_tiles(dtype),
                sms=sms,
                col_vec_bytes=b,
                row_vec_bytes=8 if norm else 0,
                k_vec_bytes=2 * e if norm else 0,
            ),
            flash,
        ],
    }
    if _tma_ok(dtype):
        tiles, bps = _tma(3 * dim, dim)
        prologue = [prologue_kernel(rows, 3 * dim, dim, e, qkv_bias)] if norm else []
        out["split+tma"] = prologue + [
            gemm_kernel(
                "qkv gemm_tma (LN folded, head split)",
                rows,
                3 * dim,
                dim,
                e,
                tiles,
                sms=sms,
                blocks_per_sm=bps,
                col_vec_bytes=12 if norm else b,  # folded: b', the column sums and unscale factors
                row_vec_bytes=8 if norm else 0,
            ),
            flash,
        ]
    if tq.single_kernel_fits(dtype, tokens, hd, 90):
        out["single_kernel"] = [
            single_qkv_attention_kernel(batch, tokens, dim, heads, e, dtype, sms=sms, norm=norm, qkv_bias=qkv_bias)
        ]
    return out


def flash_attention_paths(
    batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype, *, sms: int, config=None
) -> Dict[str, List[KernelCost]]:
    """flash_attention's paths: "torch" (SDPA flash, assumed tiles) and "triton" (the launcher's tiles, or
    ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages))."""
    from ..triton import attention

    e = dtype_bytes(dtype)
    bm, bn, _, stages = config or attention.kernel_config(dtype, head_dim)
    return {
        "torch": [
            flash_attention_kernel("sdpa (flash)", batch, heads, tokens, head_dim, e, TORCH_ATTENTION_TILES, sms=sms)
        ],
        "triton": [
            flash_attention_kernel(
                "flash attention",
                batch,
                heads,
                tokens,
                head_dim,
                e,
                (bm, bn, stages),
                sms=sms,
                chunks=sum(attention.dim_chunks(head_dim, dtype)),
            )
        ],
    }


# Which op paths a model-bench provider runs (bench.throughput): eager PyTorch with SDPA, or the fused
# ops on the Triton backend with their untimed paths. Other providers (eager attention, torch.compile,
# cuda, tuned) are not modeled: no figure rather than a wrong one.
PROVIDER_PATHS = {"sdpa": ("torch", "torch", "torch"), "triton": ("split", "triton", "triton")}


def block_kernels(shape, dtype: torch.dtype, sms: int, provider: str) -> Optional[List[KernelCost]]:
    """The kernels of one encoder block (cost.ViTShape) as ``provider`` runs them: qkv_attention, the out
    projection with its residual, the MLP; None for a provider not in :data:`PROVIDER_PATHS`."""
    paths = PROVIDER_PATHS.get(provider)
    if paths is None:
        return None
    s = shape
    qkv = qkv_attention_paths(s.batch, s.tokens, s.dim, s.heads, dtype, sms=sms, qkv_bias=s.qkv_bias)
    lin = linear_paths(s.rows, s.dim, s.dim, dtype, sms=sms, layer_scale=s.layer_scale)
    mlp = mlp_paths(s.rows, s.dim, s.hidden, dtype, sms=sms, layer_scale=s.layer_scale)
    return qkv[paths[0]] + lin[paths[1]] + mlp[paths[2]]


def model_seconds(shape, dtype: torch.dtype, machine: Machine, provider: str) -> Optional[float]:
    """A whole ViT forward as ``provider`` runs it: depth x the block's kernels (:func:`block_kernels`), plus
    the patch embedding and the final LayerNorm + head at their roofline (cost.model_cost's steps: they
    are not modeled kernel by kernel). None when the provider or the dtype is not modeled."""
    from .cost import model_cost

    blk = block_kernels(shape, dtype, machine.sms, provider)
    t_blk = path_seconds(blk, machine, dtype) if blk is not None else None
    tflops = machine.peak.tflops(dtype)
    if t_blk is None or tflops is None:
        return None
    mc = model_cost(shape)
    pe = mc.patch_embed.eager if provider == "sdpa" else mc.patch_embed.fused
    rest = sum(st.seconds(tflops, machine.peak.bandwidth_gbs) for st in list(pe) + list(mc.tail))
    return shape.depth * t_blk + rest
