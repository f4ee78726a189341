"""Flash attention forward for sm_90 on tensor descriptors, and its plain host launcher.

Same job and same results as :mod:`vit_kernels.triton.attention` (softmax(scale * q k^T) v, non-causal,
online softmax in base 2, the row log-sum-exp kept exactly as that kernel writes it), shaped for Hopper
after the structure of Triton's tutorial 06 (fused attention):

- Q, K, V and O tiles move through tensor descriptors: on sm_90 bulk tensor copies (TMA) into shared
  memory, and both products are wgmma fed from there. The launcher makes them on the host
  (``TensorDescriptor``, passed as kernel parameters, as tutorial 06 does on Hopper: no per-program
  descriptor creation and fences on the device), four-dimensional over (batch, heads, tokens, head_dim)
  with the tensors' own strides, blocks (1, 1, rows, head-dim chunk): a tile that runs past the last
  token of its head (or past head_dim) is zero-filled on load and clipped on store. No padded copies,
  any token count (197, 257, 577, 1025, ...), any strides TMA can address (:func:`tma_unsupported`).
- 128-row query tiles; the key/value loop is software-pipelined (``num_stages`` tiles of K and V in
  flight). The keys past the last full tile of BLOCK_N (197 = 3 x 64 + 5) run either inside the one loop,
  every tile masked (``TAIL_N`` = 0: a select per score, every load prefetched, the last tile padded to
  BLOCK_N keys), or after an unmasked loop over the full tiles in tiles of TAIL_N = 16 keys (no mask
  cost in the main loop, and the padding shrinks: 197 tokens pad to 208 keys instead of 256, 257 to 272
  instead of 320). Padded keys were zero-filled by the descriptor; their scores are set to -inf. Which
  costs less at 2-17 key tiles per program is measured: both are configs.
- head_dim as :func:`attention.dim_chunks` splits it: one power-of-two chunk, or two (72 and 80 as
  64 + 16: two descriptors per operand, two dots per product) instead of one padded to 128.

Inputs: float16 and bfloat16, head_dim a multiple of 8 from 16 to 128 (:func:`tma_unsupported` says
why a call cannot run here; the launcher raises ValueError with that reason before any launch).
float32 stays on the pointer kernel (its tf32x3 products split every operand in registers), and so do
head dims above 128 (a 128-row tile of 256 fp32 accumulator columns does not fit the registers).

The launcher is one more candidate of the measured dispatch (``attention_tma_config`` of
:func:`attention.flash_attention_forward`, listed by :func:`tune_configs` for sm_90 only); it is never
the untimed default.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import checks
from .. import replay
from . import cdiv
from .aot import REPRESENTATIVE, AotSpec, dtype_name, recorded_spec
from .attention import LOG2E, dim_chunks

DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _attn_tma_step(
    acc,
    acc1,
    l_i,
    m_i,
    q,
    q1,
    k_desc,
    k1_desc,
    v_desc,
    v1_desc,
    bk,
    bv,
    h,
    start_n,
    NKV,
    qk_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    MASK: tl.constexpr,
):
    """One key/value tile (rows start_n .. start_n + BLOCK_N of head h of batch index bk in k's descriptor,
    bv in v's) of the online softmax. MASK: the tile runs past NKV (its padded keys were zero-filled by the
    descriptor: their scores become -inf)."""
    k = k_desc.load([bk, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D0)
    s = tl.dot(q, k.T)
    if BLOCK_D1 > 0:
        k1 = k1_desc.load([bk, h, start_n, BLOCK_D0]).reshape(BLOCK_N, BLOCK_D1)
        s = tl.dot(q1, k1.T, s)
    s = s * qk_scale
    if MASK:
        s = tl.where((start_n + tl.arange(0, BLOCK_N) < NKV)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = v_desc.load([bv, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    if BLOCK_D1 > 0:
        v1 = v1_desc.load([bv, h, start_n, BLOCK_D0]).reshape(BLOCK_N, BLOCK_D1)
        acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None])
    return acc, acc1, l_i, m_new


@triton.jit
def _attn_tma_scores(
    q, q1, k_desc, k1_desc, bk, h, start_n, BLOCK_N: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr
):
    """q k^T of one key tile (rows start_n .. start_n + BLOCK_N of head h, batch index bk), unscaled."""
    k = k_desc.load([bk, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D0)
    s = tl.dot(q, k.T)
    if BLOCK_D1 > 0:
        k1 = k1_desc.load([bk, h, start_n, BLOCK_D0]).reshape(BLOCK_N, BLOCK_D1)
        s = tl.dot(q1, k1.T, s)
    return s


@triton.jit
def _attn_tma_softmax(s, l_i, m_i, qk_scale):
    """The online softmax of unscaled scores s (tutorial 06's arithmetic: the row max of s times the scale,
    then p = exp2(s * scale - m) as one fused multiply-add per score). Returns p, alpha, l_i, m_new."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, l_i, m_new


@triton.jit
def _attn_tma_pv(
    acc,
    acc1,
    p,
    alpha,
    v_desc,
    v1_desc,
    bv,
    h,
    start_n,
    BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
):
    """acc * alpha + p v of one value tile."""
    v = v_desc.load([bv, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D0)  # this tile's values
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    if BLOCK_D1 > 0:
        v1 = v1_desc.load([bv, h, start_n, BLOCK_D0]).reshape(BLOCK_N, BLOCK_D1)  # columns BLOCK_D0 on
        acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None])
    return acc, acc1


# k_b0, v_b0: never specialized (0 for separate q, k, v; B and 2 * B for the split path's one buffer)
@triton.jit(do_not_specialize=["k_b0", "v_b0"])
def _attn_fwd_tma_kernel(
    q_desc,  # tensor descriptors over (B, H, NQ, D) q / out and (B, H, NKV, D) k, v; blocks (1, 1, rows, BLOCK_D0)
    k_desc,
    v_desc,
    o_desc,
    q1_desc,  # the same tensors in blocks (1, 1, rows, BLOCK_D1): the second head-dim chunk (unused without)
    k1_desc,
    v1_desc,
    o1_desc,
    kt_desc,  # k, v in blocks (1, 1, TAIL_N, BLOCK_D0) and (1, 1, TAIL_N, BLOCK_D1): the tail tiles (unused
    vt_desc,  # with TAIL_N = 0)
    kt1_desc,
    vt1_desc,
    lse_ptr,  # (B, H, NQ) fp32, contiguous  [STORE_LSE]
    k_b0,  # batch index of k's image 0 in k's descriptors (q, k, v as planes of one (3 * B, H, N, D) descriptor)
    v_b0,  # and of v's in v's
    H,
    NQ,
    NKV,  # heads, query tokens, key/value tokens
    qk_scale,  # scale * log2(e), fp32
    BLOCK_D0: tl.constexpr,  # first head-dim chunk: columns 0 .. BLOCK_D0 (power of two)
    BLOCK_D1: tl.constexpr,  # second chunk: columns BLOCK_D0 .. BLOCK_D0 + BLOCK_D1; 0: none
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr,
    TAIL_N: tl.constexpr,  # 0: one loop over every key tile, each masked; else full tiles, then the rest in TAIL_N
    ORDER: tl.constexpr,  # 0: grid (B * H, query tiles); 1: one axis, the query tiles of a head adjacent
    OVERLAP: tl.constexpr,  # 1 (TAIL_N > 0): the next tile's q k^T issued before this tile's p v (FA3's overlap)
):
    if ORDER == 0:
        pid_bh = tl.program_id(0)  # batch * heads on axis 0 (up to 2**31 - 1 programs)
        pid_m = tl.program_id(1)
    else:
        n_m = tl.cdiv(NQ, BLOCK_M)
        pid_bh = tl.program_id(0) // n_m
        pid_m = tl.program_id(0) % n_m
    b = pid_bh // H
    h = pid_bh % H  # tile coordinates; the descriptors hold the strides (64-bit addressing in the TMA unit)
    off_m = pid_m * BLOCK_M
    q = q_desc.load([b, h, off_m, 0]).reshape(BLOCK_M, BLOCK_D0)  # rows past NQ, columns past D: zeros
    acc = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:  # head_dim 72 / 80 as 64 + 16 (two dots), not one dot padded to 128
        q1 = q1_desc.load([b, h, off_m, BLOCK_D0]).reshape(BLOCK_M, BLOCK_D1)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:  # placeholders the helper ignores (BLOCK_D1 == 0)
        q1 = q
        acc1 = acc

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2
    if TAIL_N == 0:
        for start_n in range(0, NKV, BLOCK_N):  # every key tile, each masked; pipelined (num_stages)
            acc, acc1, l_i, m_i = _attn_tma_step(
                acc,
                acc1,
                l_i,
                m_i,
                q,
                q1,
                k_desc,
                k1_desc,
                v_desc,
                v1_desc,
                b + k_b0,
                b + v_b0,
                h,
                start_n,
                NKV,
                qk_scale,
                BLOCK_N,
                BLOCK_D0,
                BLOCK_D1,
                True,
            )
    else:
        n_full = (NKV // BLOCK_N) * BLOCK_N
        if OVERLAP:  # the full key tiles, the next tile's q k^T before this tile's p v
            if n_full > 0:
                s = _attn_tma_scores(q, q1, k_desc, k1_desc, b + k_b0, h, 0, BLOCK_N, BLOCK_D0, BLOCK_D1)
                for start_n in range(BLOCK_N, n_full, BLOCK_N):  # pipelined (num_stages)
                    p, alpha, l_i, m_i = _attn_tma_softmax(s, l_i, m_i, qk_scale)
                    s = _attn_tma_scores(q, q1, k_desc, k1_desc, b + k_b0, h, start_n, BLOCK_N, BLOCK_D0, BLOCK_D1)
                    acc, acc1 = _attn_tma_pv(
                        acc,
                        acc1,
                        p,
                        alpha,
                        v_desc,
                        v1_desc,
                        b + v_b0,
                        h,
                        start_n - BLOCK_N,
                        BLOCK_N,
                        BLOCK_D0,
                        BLOCK_D1,
                    )
                p, alpha, l_i, m_i = _attn_tma_softmax(s, l_i, m_i, qk_scale)
                acc, acc1 = _attn_tma_pv(
                    acc, acc1, p, alpha, v_desc, v1_desc, b + v_b0, h, n_full - BLOCK_N, BLOCK_N, BLOCK_D0, BLOCK_D1
                )
        else:
            for start_n in range(0, n_full, BLOCK_N):  # the full key tiles: no mask; pipelined (num_stages)
                acc, acc1, l_i, m_i = _attn_tma_step(
                    acc,
                    acc1,
                    l_i,
                    m_i,
                    q,
                    q1,
                    k_desc,
                    k1_desc,
                    v_desc,
                    v1_desc,
                    b + k_b0,
                    b + v_b0,
                    h,
                    start_n,
                    NKV,
                    qk_scale,
                    BLOCK_N,
                    BLOCK_D0,
                    BLOCK_D1,
                    False,
                )
        for start_n in range(n_full, NKV, TAIL_N):  # the rest in TAIL_N-key tiles, masked
            acc, acc1, l_i, m_i = _attn_tma_step(
                acc,
                acc1,
                l_i,
                m_i,
                q,
                q1,
                kt_desc,
                kt1_desc,
                vt_desc,
                vt1_desc,
                b + k_b0,
                b + v_b0,
                h,
                start_n,
                NKV,
                qk_scale,
                TAIL_N,
                BLOCK_D0,
                BLOCK_D1,
                True,
            )

    o = (acc / l_i[:, None]).to(o_desc.dtype)
    o_desc.store([b, h, off_m, 0], o.reshape(1, 1, BLOCK_M, BLOCK_D0))  # clipped at NQ and D
    if BLOCK_D1 > 0:
        o1 = (acc1 / l_i[:, None]).to(o1_desc.dtype)
        o1_desc.store([b, h, off_m, BLOCK_D0], o1.reshape(1, 1, BLOCK_M, BLOCK_D1))
    if STORE_LSE:
        # natural-log log-sum-exp of scale * q . k: (m + log2(l)) / log2(e), as attention._attn_fwd_kernel
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        offs_m = off_m + tl.arange(0, BLOCK_M)
        tl.store(lse_ptr + pid_bh.to(tl.int64) * NQ + offs_m, lse, mask=offs_m < NQ)


@triton.jit(do_not_specialize=["k_b0", "v_b0"])
def _attn_fwd_tma_ws_kernel(
    q_ptr,  # q and out (B, H, NQ, D) with the strides below: 2-D (NQ, D) descriptors made per program
    o_ptr,
    k_desc,  # k, v as for _attn_fwd_tma_kernel (host descriptors, blocks (1, 1, BLOCK_N, BLOCK_D0 / BLOCK_D1))
    v_desc,
    k1_desc,
    v1_desc,
    lse_ptr,  # (B, H, NQ) fp32, contiguous  [STORE_LSE]
    k_b0,
    v_b0,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_ob,
    stride_oh,
    stride_on,
    H,
    NQ,
    NKV,
    D,  # head_dim
    qk_scale,
    BLOCK_D0: tl.constexpr,
    BLOCK_D1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """_attn_fwd_tma_kernel's job under Triton's automatic warp specialization (``tl.range(...,
    warp_specialize=True)``; Triton 3.8 applies it on sm_90 to a num_warps=4 kernel): a producer warpgroup
    issues the TMA loads, two consumer warpgroups take 64 query rows each (FA3's layout: 3 warpgroups, 12
    warps, registers moved to the consumers with setmaxnreg). Triton's pass needs what this kernel does
    differently: the Q and O tiles on 2-D descriptors made on the device (it splits their blocks between
    the consumers; host descriptors and 4-D blocks it cannot split) and one key loop (a second loop after
    the specialized one fails to compile), so every key tile is masked as with TAIL_N = 0."""
    n_m = tl.cdiv(NQ, BLOCK_M)
    pid_bh = tl.program_id(0) // n_m  # the query tiles of one head adjacent: its K and V re-read from L2
    pid_m = tl.program_id(0) % n_m
    b = pid_bh // H
    h = pid_bh % H
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    q_desc = tl.make_tensor_descriptor(q_base, [NQ, D], [stride_qn, 1], [BLOCK_M, BLOCK_D0])
    o_desc = tl.make_tensor_descriptor(o_base, [NQ, D], [stride_on, 1], [BLOCK_M, BLOCK_D0])
    off_m = pid_m * BLOCK_M
    q = q_desc.load([off_m, 0])  # rows past NQ: zeros
    acc = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        q1_desc = tl.make_tensor_descriptor(q_base, [NQ, D], [stride_qn, 1], [BLOCK_M, BLOCK_D1])
        o1_desc = tl.make_tensor_descriptor(o_base, [NQ, D], [stride_on, 1], [BLOCK_M, BLOCK_D1])
        q1 = q1_desc.load([off_m, BLOCK_D0])
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:
        q1 = q
        acc1 = acc
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in tl.range(0, NKV, BLOCK_N, warp_specialize=True):
        s = _attn_tma_scores(q, q1, k_desc, k1_desc, b + k_b0, h, start_n, BLOCK_N, BLOCK_D0, BLOCK_D1)
        s = tl.where((start_n + tl.arange(0, BLOCK_N) < NKV)[None, :], s, float("-inf"))  # padded keys
        p, alpha, l_i, m_i = _attn_tma_softmax(s, l_i, m_i, qk_scale)
        acc, acc1 = _attn_tma_pv(
            acc, acc1, p, alpha, v_desc, v1_desc, b + v_b0, h, start_n, BLOCK_N, BLOCK_D0, BLOCK_D1
        )
    o_desc.store([off_m, 0], (acc / l_i[:, None]).to(o_desc.dtype))  # clipped at NQ and D
    if BLOCK_D1 > 0:
        o1_desc.store([off_m, BLOCK_D0], (acc1 / l_i[:, None]).to(o1_desc.dtype))
    if STORE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log, as the other kernel
        offs_m = off_m + tl.arange(0, BLOCK_M)
        tl.store(lse_ptr + pid_bh.to(tl.int64) * NQ + offs_m, lse, mask=offs_m < NQ)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, TAIL_N[, ORDER, OVERLAP, WARP_SPEC]): the configs the measured
# dispatch times on sm_90 for float16 / bfloat16 at every head_dim this kernel takes. 128 query rows (two
# warpgroups of 64 rows with 8 warps, or one warpgroup issuing two wgmma row blocks with 4); 64 or 128 keys
# per tile; the keys past the last full tile in 16-key tiles after the loop (16) or as one masked tile
# inside it (0). Shared memory (fp16, head_dim 64): Q 16 KB + num_stages x (K + V) (16 KB per stage at 64
# keys, 32 KB at 128): compiled ahead of time in aot_specs() (inspect: 65-99 KB).
# The last three fields (0 when left out: the first five configs, as they were) are issue 11's study of
# tutorial 06 and FlashAttention-3 (notes: s11/attention/STUDY.md), unmeasured, for the tuner to time:
# ORDER 1: a one-axis grid with the query tiles of a head adjacent (with (B * H, tiles) the second query
# tile of a head runs B * H programs after the first, so at ViT-B's 197 tokens and batch 256 its K and V
# come from HBM twice; adjacent, the second read hits L2). OVERLAP 1 (with TAIL_N > 0): the next tile's
# q k^T is issued before this tile's p v, so this tile's softmax overlaps the previous p v wgmma (FA3's
# intra-warpgroup overlap), and the softmax scales the row max instead of every score (tutorial 06).
# WARP_SPEC 1 (num_warps 4, TAIL_N 0): _attn_fwd_tma_ws_kernel, Triton's automatic warp specialization:
# a producer warpgroup and two consumer warpgroups (12 warps, one block per SM).
CONFIGS: Tuple[Tuple[int, ...], ...] = (
    (128, 64, 4, 3, 16),
    (128, 64, 8, 3, 16),
    (128, 128, 8, 2, 16),
    (128, 64, 8, 3, 0),
    (128, 128, 8, 2, 0),
    (128, 64, 8, 3, 16, 1, 0, 0),
    (128, 64, 8, 3, 16, 1, 1, 0),
    (128, 64, 4, 3, 0, 1, 0, 1),
    (128, 128, 4, 2, 0, 1, 0, 1),
)


def tune_configs(dtype: torch.dtype, head_dim: int, arch: int) -> Tuple[Tuple[int, ...], ...]:
    """The configs the tuner times for this kernel: :data:`CONFIGS` on sm_90 for float16 / bfloat16 at
    head_dim <= 128; none otherwise (float32 and larger head dims stay on the pointer kernel)."""
    if arch != 90 or dtype not in DTYPES or head_dim_unsupported(head_dim) is not None:
        return ()
    return CONFIGS


def head_dim_unsupported(head_dim: int) -> Optional[str]:
    """None when this kernel takes head_dim, else why not (the rule: checks.HEAD_DIM_RANGE)."""
    why = checks.head_dim_unsupported(head_dim, "triton_tma")
    return why and f"{why}; larger head dims run on the pointer kernel, vit_kernels.triton.attention"


def tma_unsupported(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> Optional[str]:
    """None when the TMA kernel can run on these (already checked by attention.flash_attention_forward:
    4-D, one dtype, unit last stride, 16-byte aligned pointers and strides), else the reason."""
    if q.dtype not in DTYPES:
        return (
            f"q: the TMA attention kernel takes float16 or bfloat16, got {q.dtype} "
            "(float32 runs on the pointer kernel, vit_kernels.triton.attention)"
        )
    why = head_dim_unsupported(q.shape[-1])
    if why is not None:
        return why
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.shape[2] > 1 and t.stride(2) < t.shape[3]:
            return (
                f"{name}: TMA reads (tokens, head_dim) rows with a token stride >= head_dim, got strides "
                f"{t.stride()} for shape {tuple(t.shape)} (pass {name}.contiguous())"
            )
        for dim, what in ((0, "batch"), (1, "heads")):
            if t.shape[dim] > 1 and t.stride(dim) == 0:
                return (
                    f"{name}: a tensor descriptor cannot address a broadcast {what} dim (stride 0), got strides "
                    f"{t.stride()} for shape {tuple(t.shape)} (pass {name}.contiguous())"
                )
    return None


def _config(config) -> Tuple[int, int, int, int, int, int, int, int]:
    """config (one of :data:`CONFIGS`) with its structure fields (ORDER, OVERLAP, WARP_SPEC; 0 when left out)."""
    cfg = tuple(int(c) for c in config)
    if cfg not in CONFIGS:
        raise ValueError(f"attention_tma_config: expected one of attention_tma.CONFIGS {CONFIGS}, got {config}")
    return (cfg + (0, 0, 0))[:8]


def launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Optional[Tensor],
    scale: float,
    config,
    qkv: Optional[Tensor] = None,
) -> None:
    """Launch :func:`_attn_fwd_tma_kernel` (:func:`_attn_fwd_tma_ws_kernel` for a WARP_SPEC config) once. q,
    k, v, out, lse as
    :func:`attention.flash_attention_forward` checked them (q: (batch, heads, q_tokens, head_dim); k, v:
    (batch, heads, kv_tokens, head_dim); out like q; lse (batch, heads, q_tokens) fp32 contiguous or None);
    config: one of :data:`CONFIGS`; qkv: None, or the contiguous (3, batch, heads, tokens, head_dim) buffer
    whose planes q, k and v are (the split path's): then one descriptor over its (3 * batch, heads, tokens,
    head_dim) serves q, k and v (k's images from batch index batch on, v's from 2 * batch), so a replayed
    launch plan (vit_kernels.replay) makes no views, and fewer descriptors, per call. Raises ValueError with
    :func:`tma_unsupported`'s reason before any launch."""
    BLOCK_M, BLOCK_N, num_warps, num_stages, tail_n, order, overlap, warp_spec = _config(config)
    why = tma_unsupported(q, k, v, out)
    if why is not None:
        raise ValueError(why)
    if (overlap or warp_spec) and not scale > 0:  # the ops' scale always is (checks.softmax_scale)
        raise ValueError(
            f"scale: attention_tma_config {config} takes the row max of the unscaled scores (OVERLAP / WARP_SPEC), "
            f"which needs a scale > 0; got {scale}"
        )
    B, H, NQ, D = q.shape
    NKV = k.shape[2]
    if out.numel() == 0:
        return
    d0, d1 = dim_chunks(D, q.dtype)
    k_b0 = v_b0 = 0
    if qkv is not None:
        _check_planes(qkv, q, k, v)
        k_b0, v_b0 = B, 2 * B

    def desc(t: Tensor, rows: int, cols: int) -> TensorDescriptor:
        if qkv is not None and t is not out:  # q, k, v: the buffer's planes as 3 * B images
            return TensorDescriptor(qkv, [3 * B, H, NQ, D], list(qkv.stride()[1:]), [1, 1, rows, cols])
        # (B, H, tokens, D) with t's strides; a size-1 dim's stride says nothing about the layout (and may be
        # anything): any multiple of 16 bytes addresses its one index the same way.
        strides = [st if n > 1 else D for st, n in zip(t.stride()[:3], t.shape[:3])] + [1]
        return TensorDescriptor(t, list(t.shape), strides, [1, 1, rows, cols])

    if warp_spec:  # q and out as pointers and strides (the kernel makes their descriptors), k and v on host ones
        from .gemm_tma import _ensure_allocator

        _ensure_allocator(q.device)
        kv = [desc(k, BLOCK_N, d0), desc(v, BLOCK_N, d0)]
        kv += [desc(k, BLOCK_N, d1), desc(v, BLOCK_N, d1)] if d1 else kv
        replay.launch(
            _attn_fwd_tma_ws_kernel,
            (B * H * cdiv(NQ, BLOCK_M),),
            q,
            out,
            *kv,
            lse if lse is not None else out,
            k_b0,
            v_b0,
            *[st if n > 1 else 0 for st, n in zip(q.stride()[:3], q.shape[:3])],
            *[st if n > 1 else 0 for st, n in zip(out.stride()[:3], out.shape[:3])],
            H,
            NQ,
            NKV,
            D,
            float(scale) * LOG2E.value,
            BLOCK_D0=d0,
            BLOCK_D1=d1,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            STORE_LSE=lse is not None,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        return
    descs = [desc(q, BLOCK_M, d0), desc(k, BLOCK_N, d0), desc(v, BLOCK_N, d0), desc(out, BLOCK_M, d0)]
    # the second head-dim chunk's and the tail tiles' (placeholders where the kernel reads none)
    descs += [desc(q, BLOCK_M, d1), desc(k, BLOCK_N, d1), desc(v, BLOCK_N, d1), desc(out, BLOCK_M, d1)] if d1 else descs
    tail = [desc(k, tail_n, d0), desc(v, tail_n, d0)] if tail_n else descs[1:3]
    descs += tail + ([desc(k, tail_n, d1), desc(v, tail_n, d1)] if tail_n and d1 else tail)
    # through replay.launch: a fused module's launch plan records this launch (a replay makes each
    # tensor descriptor again on its new base)
    replay.launch(
        _attn_fwd_tma_kernel,
        (B * H, cdiv(NQ, BLOCK_M)) if order == 0 else (B * H * cdiv(NQ, BLOCK_M),),
        *descs,
        lse if lse is not None else out,
        k_b0,
        v_b0,
        H,
        NQ,
        NKV,
        float(scale) * LOG2E.value,
        BLOCK_D0=d0,
        BLOCK_D1=d1,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        STORE_LSE=lse is not None,
        TAIL_N=tail_n,
        ORDER=order,
        OVERLAP=overlap,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _check_planes(qkv: Tensor, q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raises ValueError unless q, k, v are qkv[0], qkv[1], qkv[2] of a contiguous (3, B, H, N, D) qkv."""
    want = (3,) + tuple(q.shape)
    planes = all(
        t.dtype == qkv.dtype
        and t.shape == q.shape
        and t.stride() == qkv.stride()[1:]
        and t.data_ptr() == qkv.data_ptr() + i * qkv.stride(0) * qkv.element_size()
        for i, t in enumerate((q, k, v))
    )
    if tuple(qkv.shape) != want or not qkv.is_contiguous() or not planes:
        raise ValueError(
            f"qkv: expected the contiguous {want} {q.dtype} buffer whose planes are q, k and v, got "
            f"{qkv.dtype} {tuple(qkv.shape)} strides {qkv.stride()}"
        )


def aot_spec(dtype: torch.dtype, head_dim: int, config, store_lse: bool = False) -> AotSpec:
    """The launch attention.flash_attention_forward makes with ``attention_tma_config=config``, recorded as
    the split qkv_attention path calls it (q, k, v: views of one (3, B, H, N, head_dim) buffer; out: a
    (B, N, H * head_dim) buffer viewed as (B, H, N, head_dim)) at aot.REPRESENTATIVE's shape; sm_90 only."""
    from .attention import flash_attention_forward

    B, H, N = REPRESENTATIVE["batch"], REPRESENTATIVE["heads"], REPRESENTATIVE["tokens"]
    qkv = torch.empty(3, B, H, N, head_dim, dtype=dtype)
    out = torch.empty(B, N, H * head_dim, dtype=dtype).view(B, N, H, head_dim).transpose(1, 2)
    BLOCK_M, BLOCK_N, num_warps, num_stages, tail_n, order, overlap, warp_spec = _config(config)
    d0, d1 = dim_chunks(head_dim, dtype)
    label = (
        f"head_dim={head_dim},BLOCK_D={d0}" + (f"+{d1}" if d1 else "") + f",BLOCK_M={BLOCK_M},BLOCK_N={BLOCK_N},"
        f"num_warps={num_warps},num_stages={num_stages},TAIL_N={tail_n},"
        + (f"ORDER={order},OVERLAP={overlap},WARP_SPEC={warp_spec}," if len(config) > 5 else "")
        + f"{dtype_name(dtype)},"
        f"lse={int(store_lse)}"
    )
    call = lambda: flash_attention_forward(  # noqa: E731
        qkv[0], qkv[1], qkv[2], 1.0, out=out, return_lse=store_lse, attention_tma_config=config, qkv=qkv
    )
    return recorded_spec(
        "flash_attention_fwd_tma",
        _attn_fwd_tma_ws_kernel if warp_spec else _attn_fwd_tma_kernel,
        call,
        label,
        True,
        (90,),
        shape=f"B={B},H={H},N={N},head_dim={head_dim},merged-head out",
    )


# head_dim values aot_specs() compiles: ViT-B/L's 64 (every config, both dtypes, LSE kept or not), ViT-H's
# 80 (64 + 16 chunks) and 128 (one chunk). head_dim itself is no kernel argument (the descriptors hold it):
# a launch compiles the same code for every head_dim with the same chunks (72 as 80, 48 as 40, 120 as 128).
AOT_HEAD_DIMS = (64, 80, 128)


def aot_specs() -> List[AotSpec]:
    """The configurations the tuner can launch, for sm_90: every config x dtype at head_dim 64 (without
    and with the LSE), and every config at the other AOT_HEAD_DIMS in float16 without the LSE."""
    specs = [aot_spec(dtype, 64, cfg, store_lse) for cfg in CONFIGS for dtype in DTYPES for store_lse in (False, True)]
    specs += [aot_spec(torch.float16, hd, cfg) for cfg in CONFIGS for hd in AOT_HEAD_DIMS if hd != 64]
    return specs
