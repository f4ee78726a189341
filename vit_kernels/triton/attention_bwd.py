"""Flash attention backward (non-causal) in Triton, and its plain host launcher.

FlashAttention-2's backward, atomics-free, from the forward's row log-sum-exp LSE
(vit_kernels.triton.attention keeps it with ``return_lse=True``; the output O is not read, see delta
below); the tokens x tokens matrix is recomputed tile by tile, never stored:

    P     = exp(scale * Q K^T - LSE),   dP = dO V^T
    delta = rowsum(P * dP) / rowsum(P)                        _attn_bwd_dq_kernel, per query tile: a first
    dQ    = scale * dS K,   dS = P * (dP - delta)             pass over every key tile for delta, a second
                                                              for dQ
    dV    = P^T dO,   dK = scale * dS^T Q                     _attn_bwd_dkdv_kernel, per key tile
                                                              (walks every query tile)

Two kernels (dK/dV per key tile, dQ per query tile) instead of one with atomic dQ adds: every
output is written once by one program, so results are bitwise reproducible. Any token count
(masked tiles), head_dim a multiple of 8 from 16 to 256 (padded to the next power of two by
masking), as the forward. Exponentials in base 2 (log2(e) folded into the scale and LSE).

delta: FlashAttention-2 takes delta = rowsum(dO * O) in a separate kernel (equal to rowsum(P * dP) in
exact arithmetic). Here the dQ kernel computes it from the recomputed P and dP in a first pass over the
keys (two more dots per key tile; the dQ kernel then runs before the dK/dV kernel, which reads delta),
because dS = P * (dP - delta) must cancel where it is 0 in exact arithmetic:
- rowsum(dO * O) depends on how O was rounded: to 16 bits it broke rowsum(dS) = 0 and biased the sum of
  dK over the tokens (the K bias and the LayerNorm bias in front of a QKV projection) to ~6x plain
  PyTorch's bf16 error; in fp32, with one key 100 above the rest (P one-hot), dO . o differed from the
  tile's dO . v_last in the last bits and |k| = 100 made dQ 2.4e-5 to 4.8e-5 where PyTorch's is exactly 0
  (bound 1e-5). Even in float64, delta = dO . O missed it 3-4x once O moved by one fp32 ulp (as the
  forward's tf32x3 P V may round it), 6-9x by two.
- dividing by rowsum(P) (1 in exact arithmetic) cancels the LSE's rounding, which scales a whole row of
  P: with scores ~300 apart that error is ~3e-5 and the unnormalized rowsum(P * dP) missed dQ's bound
  13-25x in fp32.
- fp32 (and float64) inputs sum P * dP and P in float64 (DELTA_ACC): the products of fp32 values are then
  exact, so where P is one-hot delta rounds back to exactly the dP the second pass recomputes (same dot,
  same tiles) and dS is exactly 0. fp16/bf16 sum in fp32.
- the dK/dV kernel recomputes dP too, so fp32 gives both kernels the same BLOCK_M x BLOCK_N tiles:
  the same dot on the same data then gives the same bits. With the dQ kernel on 32 x 64 tiles and the
  dK/dV kernel on 32 x 32, the interpreter's dK missed its bound 1.2-2.3x (numpy sums differently per
  shape). Not checked on a GPU.

Precision: tiles accumulate in fp32; P and dS are rounded to the input dtype before their dots
(as FlashAttention does for fp16/bf16). fp32 inputs use ``input_precision="tf32x3"`` as the
forward; float64 (accepted for ``torch.autograd.gradcheck``) uses "ieee".
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import FP32_DOT_PRECISION, cdiv
from ..dtypes import FLOAT_DTYPES
from .. import checks
from .aot import REPRESENTATIVE, AotSpec, dtype_name, recorded_spec
from .attention import LOG2E, block_d, check_aligned

DTYPES = FLOAT_DTYPES  # vit_kernels.dtypes (float64: the gradcheck tests)


def dot_precision(dtype: torch.dtype) -> str:
    """The tl.dot precision of the backward kernels for inputs of ``dtype``."""
    return "ieee" if dtype == torch.float64 else FP32_DOT_PRECISION


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,  # q_ptr, do_ptr: (B, H, NQ, D); k_ptr, v_ptr, dk_ptr, dv_ptr: (B, H, NKV, D); lse_ptr, delta_ptr: (B, H, NQ)
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,  # strides of do_ptr
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    H,
    NQ,
    NKV,
    qk_scale,  # scale * log2(e)
    scale,  # the softmax scale (dK = scale * dS^T Q)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,  # fp32 accumulators, fp64 for float64 inputs
):
    n_n = tl.cdiv(NKV, BLOCK_N)  # one grid axis, a head's key tiles adjacent: its Q and dO re-read from L2
    pid_bh = tl.program_id(0) // n_n
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = (tl.program_id(0) % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < NKV
    mask_d = offs_d < HEAD_DIM
    kv_mask = mask_n[:, None] & mask_d[None, :]
    n64 = offs_n.to(tl.int64)
    k = tl.load(
        k_ptr + b * stride_kb + h * stride_kh + n64[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0
    )
    v = tl.load(
        v_ptr + b * stride_vb + h * stride_vh + n64[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0
    )
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * NQ

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < NQ
        q_mask = mask_m[:, None] & mask_d[None, :]
        m64 = offs_m.to(tl.int64)
        q = tl.load(q_base + m64[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + m64[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + row_base + offs_m, mask=mask_m, other=0.0) * LOG2E
        delta = tl.load(delta_ptr + row_base + offs_m, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)
    dk = dk * scale
    tl.store(
        dk_ptr + b * stride_dkb + h * stride_dkh + n64[:, None] * stride_dkn + offs_d[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        dv_ptr + b * stride_dvb + h * stride_dvh + n64[:, None] * stride_dvn + offs_d[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _dq_tile(
    q, do, lse, k_base, v_base, start_n, offs_n0, offs_d, mask_m, mask_d, NKV, stride_kn, stride_vn, qk_scale,
    INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One key tile of the dQ kernel, as both of its passes need it (the same loads and dots, so the
    same bits): k (BLOCK_N, BLOCK_D), P = exp(S - LSE) and dP = dO V^T (BLOCK_M, BLOCK_N), P zero
    outside the rows and keys."""
    offs_n = start_n + offs_n0
    mask_n = offs_n < NKV
    kv_mask = mask_n[:, None] & mask_d[None, :]
    n64 = offs_n.to(tl.int64)
    k = tl.load(k_base + n64[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + n64[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    return k, p, dp


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,  # q_ptr, do_ptr, dq_ptr: (B, H, NQ, D); k_ptr, v_ptr: (B, H, NKV, D); lse_ptr, delta_ptr (out): (B, H, NQ)
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_don,  # strides of do_ptr
    stride_dqb,
    stride_dqh,
    stride_dqn,
    H,
    NQ,
    NKV,
    qk_scale,  # scale * log2(e)
    dq_scale,  # the softmax scale times the caller's extra factor
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,  # fp32 accumulators, fp64 for float64 inputs
    DELTA_ACC: tl.constexpr,  # delta's row sums: fp64 for fp32 and float64 inputs, fp32 for fp16/bf16
):
    # (batch * heads, query tiles): the grid order of the dK/dV kernel's one axis would cost the float32
    # head_dim 72 config 8 bytes of spill on sm_90 (two more integer registers), so this kernel keeps it
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    m64 = offs_m.to(tl.int64)
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + m64[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0
    )
    do = tl.load(
        do_ptr + b * stride_dob + h * stride_doh + m64[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0
    )
    row_base = pid_bh.to(tl.int64) * NQ
    lse = tl.load(lse_ptr + row_base + offs_m, mask=mask_m, other=0.0) * LOG2E
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    # First pass: delta = rowsum(P * dP) / rowsum(P) from P and dP recomputed as the second pass does (same
    # dots, same tiles); the module docstring says why not rowsum(dO * O), why the division and why DELTA_ACC.
    # Rounded to delta_ptr's dtype, which the second pass uses and the dK/dV kernel reads.
    p_dp_sum = tl.zeros([BLOCK_M], dtype=DELTA_ACC)
    p_sum = tl.zeros([BLOCK_M], dtype=DELTA_ACC)
    for start_n in range(0, NKV, BLOCK_N):
        k, p, dp = _dq_tile(
            q, do, lse, k_base, v_base, start_n, offs_n0, offs_d, mask_m, mask_d, NKV, stride_kn, stride_vn, qk_scale,
            INPUT_PRECISION,
        )  # fmt: skip
        p, dp = p.to(DELTA_ACC), dp.to(DELTA_ACC)
        p_dp_sum += tl.sum(p * dp, axis=1)
        p_sum += tl.sum(p, axis=1)
    delta = p_dp_sum / tl.where(mask_m, p_sum, 1.0)
    delta = delta.to(delta_ptr.dtype.element_ty)
    tl.store(delta_ptr + row_base + offs_m, delta, mask=mask_m)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, NKV, BLOCK_N):
        k, p, dp = _dq_tile(
            q, do, lse, k_base, v_base, start_n, offs_n0, offs_d, mask_m, mask_d, NKV, stride_kn, stride_vn, qk_scale,
            INPUT_PRECISION,
        )  # fmt: skip
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    dq = dq * dq_scale
    tl.store(
        dq_ptr + b * stride_dqb + h * stride_dqh + m64[:, None] * stride_dqn + offs_d[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=q_mask,
    )


# (is half precision, BLOCK_D) -> {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)}, one entry per
# kernel: the dQ kernel's dots have BLOCK_M rows (its accumulator is BLOCK_M x BLOCK_D), the dK/dV
# kernel's have BLOCK_N rows (two BLOCK_N x BLOCK_D accumulators), so each gets its own tiles (as in
# Triton's fused-attention tutorial). Not timed on a GPU. Chosen by compiling every launch aot_specs()
# lists for sm_80 and sm_90 (inspect; 2026-11-26): fp16/bf16 compile without spills at every head dim,
# with 64-row dots (wgmma on sm_90) for both kernels up to head_dim 128. Before, one entry served both
# kernels and the dK/dV kernel spilled 8 bytes on sm_80 at head_dim 64 (and on sm_90 at 72).
# fp32 (tf32x3 splits every operand in two) compiles without spills up to head_dim 64 and at 80 and 128;
# no tile tried (BLOCK_M/BLOCK_N 16-64, 1-16 warps, 1-3 stages) removes the rest: the dQ kernel spills 24
# bytes on sm_80 at head_dim 72 and ~680 bytes at 256 on both archs, the dK/dV kernel at head_dim 256
# kilobytes on both archs. Listed in tests/test_inspect.py KNOWN_SPILLS, which only shrinks; fixing them
# needs the head dim chunked. fp32 gives both kernels the same BLOCK_M x BLOCK_N (module docstring: dP
# must come out bit for bit the same in both). The dQ kernel's first pass (delta, for fp32 too since
# 2026-11-26) raised its fp32 registers: before -> after (sm_80/sm_90) head_dim 64 166 -> 255/254,
# head_dim 72 on sm_90 175 -> 255; 8 -> 688/672 spilled bytes at head_dim 256, 8 -> 24 at 72 on sm_80,
# 8 -> 0 at 80 on sm_80. Re-chosen then: head_dim 32 dQ (16, 32, 4, 1) (255 -> 80 registers), 72-128
# dQ (16, 16, 8, 1) (4 warps spilled 8 bytes on sm_90 at 80).
_CONFIGS = {
    (True, 16): {"dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2)},
    (True, 32): {"dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2)},
    (True, 64): {"dq": (64, 64, 4, 2), "dkdv": (32, 64, 4, 2)},
    (True, 128): {"dq": (64, 32, 8, 2), "dkdv": (32, 64, 8, 2)},
    (True, 256): {"dq": (32, 16, 8, 1), "dkdv": (32, 32, 8, 1)},
    (False, 16): {"dq": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1)},
    (False, 32): {"dq": (16, 32, 4, 1), "dkdv": (16, 32, 4, 1)},
    (False, 64): {"dq": (32, 32, 8, 1), "dkdv": (32, 32, 8, 1)},
    (False, 128): {"dq": (16, 16, 8, 1), "dkdv": (16, 16, 8, 1)},
    (False, 256): {"dq": (16, 16, 8, 2), "dkdv": (16, 16, 8, 1)},
}
KERNELS = ("dq", "dkdv")


def kernel_config(dtype: torch.dtype, head_dim: int, kernel: str) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dQ (kernel="dq") or dK/dV ("dkdv") kernel."""
    return _CONFIGS[(dtype in (torch.float16, torch.bfloat16), block_d(head_dim))][kernel]


def _check(name: str, t: Tensor, shape, ref: Tensor) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise TypeError(f"{name}: expected dtype {ref.dtype} on {ref.device} (those of q), got {t.dtype} on {t.device}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a unit stride in the last dim (head_dim), got strides {t.stride()}")


def flash_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    *,
    dq_scale: float = 1.0,
    dq: Optional[Tensor] = None,
    dk: Optional[Tensor] = None,
    dv: Optional[Tensor] = None,
    configs: Optional[Dict[str, Tuple[int, int, int, int]]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV of out = softmax(scale * q k^T) v, from the forward's out and row log-sum-exp.

    grad_out, q, out: (batch, heads, q_tokens, head_dim); k, v: (batch, heads, kv_tokens, head_dim);
    out is checked but not read (delta comes from the recomputed P, see the module docstring);
    lse: (batch, heads, q_tokens) fp32, natural log (flash_attention_forward(..., return_lse=True));
    float64 q may pass a float64 lse (gradcheck). Launches the dQ kernel (which computes delta),
    then the dK/dV kernel.
    Any strides with a unit last-dim stride; float32, float16, bfloat16 or float64 (float64 for
    gradcheck; the forward kernel does not take it). dq_scale: an extra factor on dQ (the split
    qkv_attention path attends with a pre-scaled q' = scale * q, so it asks for dq * scale).
    dq, dk, dv: optional outputs of those shapes (any strides, unit last-dim stride) written in
    place, e.g. views of one (batch, tokens, 3, heads, head_dim) buffer. Returns (dq, dk, dv) in
    q's dtype. kv_tokens 0: dq zeros (the forward gave zeros).
    configs: {"dq": ..., "dkdv": ...} (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, None (or a
    kernel left out) for :func:`kernel_config`; float32 needs the same BLOCK_M and BLOCK_N for both.
    """
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor (batch, heads, tokens, head_dim), got shape {tuple(q.shape)}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q: expected float32, float16, bfloat16 or float64, got {q.dtype}")
    B, H, NQ, D = q.shape
    NKV = k.shape[2]
    why = checks.head_dim_unsupported(D, "triton")
    if why:
        raise ValueError(why)
    for name, t, shape in (
        ("k", k, (B, H, NKV, D)),
        ("v", v, (B, H, NKV, D)),
        ("out", out, q.shape),
        ("grad_out", grad_out, q.shape),
        ("q", q, q.shape),
    ):
        _check(name, t, shape, q)
    lse_dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if tuple(lse.shape) != (B, H, NQ) or lse.dtype not in lse_dtypes or not lse.is_contiguous():
        raise ValueError(
            f"lse: expected a contiguous float32 tensor of shape {(B, H, NQ)} (float64 allowed for "
            f"float64 q), got {lse.dtype} {tuple(lse.shape)} strides {lse.stride()}"
        )
    outs = []
    for name, t, shape in (("dq", dq, q.shape), ("dk", dk, k.shape), ("dv", dv, v.shape)):
        if t is None:
            t = torch.empty(shape, dtype=q.dtype, device=q.device)
        else:
            _check(name, t, shape, q)
        outs.append(t)
    dq, dk, dv = outs
    if q.dtype != torch.float64:
        for name, t in (("q", q), ("k", k), ("v", v), ("out", out), ("grad_out", grad_out)):
            check_aligned(name, t)
    if B * H == 0:
        return dq, dk, dv
    if NKV == 0:
        return dq.zero_(), dk, dv
    if NQ == 0:
        return dq, dk.zero_(), dv.zero_()
    # written by the dQ kernel, read by the dK/dV kernel; float64 for gradcheck's float64 inputs
    delta = torch.empty((B, H, NQ), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    BD = block_d(D)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    precision = dict(INPUT_PRECISION=dot_precision(q.dtype), ACC=tl.float64 if q.dtype == torch.float64 else tl.float32)

    def meta(kernel: str) -> dict:
        BLOCK_M, BLOCK_N, num_warps, num_stages = (configs or {}).get(kernel) or kernel_config(q.dtype, D, kernel)
        return dict(
            HEAD_DIM=D,
            BLOCK_D=BD,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            num_warps=num_warps,
            num_stages=num_stages,
            **precision,
        )

    qk_scale = float(scale) * LOG2E.value
    dq_meta, dkdv_meta = meta("dq"), meta("dkdv")
    tiles = {name: (m["BLOCK_M"], m["BLOCK_N"]) for name, m in (("dq", dq_meta), ("dkdv", dkdv_meta))}
    if q.dtype == torch.float32 and tiles["dq"] != tiles["dkdv"]:
        raise ValueError(
            f"configs: float32 needs the same (BLOCK_M, BLOCK_N) for 'dq' and 'dkdv' (so that both kernels "
            f"recompute dP bit for bit, see the module docstring), got {tiles}"
        )
    # dQ first: it computes delta, which the dK/dV kernel reads
    _attn_bwd_dq_kernel[(B * H, cdiv(NQ, dq_meta["BLOCK_M"]))](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dq,
        *common,
        *dq.stride()[:3],
        H,
        NQ,
        NKV,
        qk_scale,
        float(scale) * float(dq_scale),
        DELTA_ACC=tl.float32 if q.dtype in (torch.float16, torch.bfloat16) else tl.float64,
        **dq_meta,
    )
    _attn_bwd_dkdv_kernel[(B * H * cdiv(NKV, dkdv_meta["BLOCK_N"]),)](
        q,
        k,
        v,
        grad_out,
        lse,
        delta,
        dk,
        dv,
        *common,
        *dk.stride()[:3],
        *dv.stride()[:3],
        H,
        NQ,
        NKV,
        qk_scale,
        float(scale),
        **dkdv_meta,
    )
    return dq, dk, dv


# head_dim values aot_specs() records: the forward's ViT head dims plus each remaining BLOCK_D bucket.
AOT_HEAD_DIMS = (16, 32, 64, 72, 80, 128, 256)


def _label(dtype: torch.dtype, hd: int, kernel: str) -> str:
    BLOCK_M, BLOCK_N, num_warps, num_stages = kernel_config(dtype, hd, kernel)
    return (
        f"head_dim={hd},BLOCK_D={block_d(hd)},BLOCK_M={BLOCK_M},BLOCK_N={BLOCK_N},"
        f"num_warps={num_warps},num_stages={num_stages},{dtype_name(dtype)}"
    )


def aot_specs() -> List[AotSpec]:
    """The launches flash_attention_backward makes, recorded from the launcher on empty CPU tensors as
    the split qkv_attention backward calls it (q, k, v views of one (3, B, H, N, head_dim) buffer;
    dq, dk, dv views of one (B, N, 3, H, head_dim) buffer; grad_out and out merged-head views) at
    aot.REPRESENTATIVE's batch, heads and tokens: the dQ and dK/dV kernels per dtype and head_dim."""
    B, H, N = REPRESENTATIVE["batch"], REPRESENTATIVE["heads"], REPRESENTATIVE["tokens"]
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for hd in AOT_HEAD_DIMS:
            qkv = torch.empty(3, B, H, N, hd, dtype=dtype)
            merged = torch.empty(B, N, H * hd, dtype=dtype).view(B, N, H, hd).transpose(1, 2)
            dqkv = torch.empty(B, N, 3, H, hd, dtype=dtype)
            lse = torch.empty(B, H, N, dtype=torch.float32)
            call = lambda: flash_attention_backward(  # noqa: E731
                merged,
                qkv[0],
                qkv[1],
                qkv[2],
                merged,
                lse,
                1.0,
                dq_scale=hd**-0.5,
                dq=dqkv[:, :, 0].transpose(1, 2),
                dk=dqkv[:, :, 1].transpose(1, 2),
                dv=dqkv[:, :, 2].transpose(1, 2),
            )
            shape = f"B={B},H={H},N={N},head_dim={hd},split qkv layout"
            kernels = [
                ("flash_attention_bwd_dq", _attn_bwd_dq_kernel, _label(dtype, hd, "dq")),
                ("flash_attention_bwd_dkdv", _attn_bwd_dkdv_kernel, _label(dtype, hd, "dkdv")),
            ]
            for name, fn, config in kernels:
                specs.append(recorded_spec(name, fn, call, config, True, shape=shape))
    return specs
