"""Flash attention forward (non-causal) in Triton, and its plain host launcher.

One program computes BLOCK_M query rows of one (batch, head): it streams the keys and values in
tiles of BLOCK_N rows with an online softmax in base 2 (log2(e) is folded into the scale, so the
exponentials are ``exp2``), never materialising the tokens x tokens matrix. Any token count works
by masking (no padded copies of the tensors); head_dim is any multiple of 8 from 16 to 256, computed
in one power-of-two chunk or, where that pads less, two (:func:`dim_chunks`: 72 and 80 as 64 + 16, two
dots per product instead of one padded to 128; float16 / bfloat16), masked at the loads and stores.

fp32 inputs: both dots run with ``input_precision="tf32x3"`` (three TF32 tensor-core products,
about fp32 accuracy). Plain TF32 (Triton's default) would miss the 1e-4 relative accuracy the
tests ask for against float64; "ieee" would leave the tensor cores unused.

The row log-sum-exp (natural log, of ``scale * q . k``) can be kept for a backward pass.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import FP32_DOT_PRECISION, cdiv, next_power_of_2
from .. import checks
from ..dtypes import KERNEL_DTYPES
from ..replay import empty, launch
from .aot import REPRESENTATIVE, AotSpec, dtype_name, recorded_spec

# log2(e): its one home (CONTRIBUTING.md). A tl.constexpr, so kernels use it as a literal; host code takes
# LOG2E.value (a float: a scale multiplied by it stays a runtime kernel argument).
LOG2E = tl.constexpr(1.4426950408889634)
DTYPES = KERNEL_DTYPES  # vit_kernels.dtypes
HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)  # BLOCK_D: next power of two of head_dim


# k_off, v_off: never specialized (0 for separate q, k, v; the buffer's plane stride for the split path)
@triton.jit(do_not_specialize=["k_off", "v_off"])
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,  # q_ptr: (B, H, NQ, D); k_ptr, v_ptr: (B, H, NKV, D); o_ptr: (B, H, NQ, D); lse_ptr: (B, H, NQ) fp32
    k_off,
    v_off,  # elements added to k_ptr and v_ptr (k and v given as offsets into the q buffer), multiples of 8
    stride_qb,
    stride_qh,
    stride_qn,  # strides in elements; the last dim of q_ptr, k_ptr, v_ptr, o_ptr has stride 1
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    H,
    NQ,
    NKV,  # heads, query tokens, key/value tokens
    qk_scale,  # scale * log2(e), fp32
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D0: tl.constexpr,  # first head-dim chunk: columns 0 .. BLOCK_D0 (power of two)
    BLOCK_D1: tl.constexpr,  # second chunk: columns BLOCK_D0 .. BLOCK_D0 + BLOCK_D1; 0: none
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # dot precision for fp32 inputs ("tf32x3")
):
    # one grid axis (up to 2**31 - 1 programs), the query tiles of a head adjacent (FlashAttention-2's order): a
    # head's K and V, read by each of its query tiles, come from L2 after the first (with batch * heads on the
    # outer axis, B * H programs apart, they came from HBM again at ViT batch sizes)
    n_m = tl.cdiv(NQ, BLOCK_M)
    pid_bh = tl.program_id(0) // n_m
    pid_m = tl.program_id(0) % n_m
    # int64 offsets: batch * heads * tokens * head_dim can pass 2**31.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D0)
    mask_m = offs_m < NQ
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]

    # The launcher guarantees 16-byte aligned data pointers and strides that are multiples of 8
    # elements (as head_dim is): the hints let every row load as vectors whatever the JIT sees.
    q_base = tl.multiple_of(q_ptr + b * stride_qb + h * stride_qh, 16)
    k_base = tl.multiple_of(k_ptr + k_off + b * stride_kb + h * stride_kh, 16)
    v_base = tl.multiple_of(v_ptr + v_off + b * stride_vb + h * stride_vh, 16)
    o_base = tl.multiple_of(o_ptr + b * stride_ob + h * stride_oh, 16)
    q_rows = tl.multiple_of(offs_m.to(tl.int64) * stride_qn, 8)
    q = tl.load(q_base + q_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
    if BLOCK_D1 > 0:  # head_dim 72 / 80 as 64 + 16 (two dots), not one dot padded to 128
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        mask_d1 = offs_d1 < HEAD_DIM
        q1 = tl.load(q_base + q_rows[:, None] + offs_d1[None, :], mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)

    # Every tile is masked the same way (a separate unmasked loop for the full tiles doubled the
    # code and made ptxas spill).
    for start_n in range(0, NKV, BLOCK_N):
        rows = start_n + offs_n
        mask_n = rows < NKV
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_rows = tl.multiple_of(rows.to(tl.int64) * stride_kn, 8)
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if BLOCK_D1 > 0:
            kv_mask1 = mask_n[:, None] & mask_d1[None, :]
            k1 = tl.load(k_base + k_rows[:, None] + offs_d1[None, :], mask=kv_mask1, other=0.0)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=INPUT_PRECISION)
        s = s * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = tl.multiple_of(rows.to(tl.int64) * stride_vn, 8)
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        if BLOCK_D1 > 0:
            v1 = tl.load(v_base + v_rows[:, None] + offs_d1[None, :], mask=kv_mask1, other=0.0)
            acc1 = acc1 * alpha[:, None]
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1, input_precision=INPUT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = o_base + tl.multiple_of(offs_m.to(tl.int64) * stride_on, 8)[:, None]  # (BLOCK_M, 1) row starts
    tl.store(o_ptrs + offs_d[None, :], acc.to(o_ptr.dtype.element_ty), mask=q_mask)
    if BLOCK_D1 > 0:
        acc1 = acc1 / l_i[:, None]
        tl.store(o_ptrs + offs_d1[None, :], acc1.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d1[None, :])
    if STORE_LSE:
        # natural-log log-sum-exp of scale * q . k: (m + log2(l)) / log2(e)
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + pid_bh.to(tl.int64) * NQ + offs_m, lse, mask=mask_m)


# (is fp32, BLOCK_D) -> (BLOCK_M, BLOCK_N, num_warps, num_stages). Checked by AOT compilation for
# sm_80 and sm_90 (no spills, shared memory within the per-block limit): see aot_specs().
_CONFIGS = {
    (False, 16): (128, 64, 8, 3),
    (False, 32): (128, 64, 8, 3),
    (False, 64): (128, 64, 8, 3),
    (False, 128): (128, 64, 8, 3),
    (False, 256): (64, 64, 8, 2),
    # fp32 with tf32x3 splits every operand in two (big + small): smaller tiles, no pipelining.
    (True, 16): (32, 32, 4, 2),
    (True, 32): (32, 32, 4, 2),
    (True, 64): (32, 32, 4, 2),
    (True, 128): (16, 32, 4, 1),
    (True, 256): (16, 16, 8, 2),
}


# Alternative tiles vit_kernels.tuning times beside _CONFIGS, per architecture: (is fp32, BLOCK_D) ->
# ((BLOCK_M, BLOCK_N, num_warps, num_stages), ...). aot_specs() lists each, so `inspect` compiles them.
# Shaped for ViT lengths: 64-row query tiles (one warpgroup) and 32-key tiles pad 197 / 257 / 577 / 1025
# tokens to 256 x 224 / 320 x 288 / 640 x 608 / 1088 x 1056 score entries (1.48x / 1.40x / 1.17x / 1.09x
# the useful work) where the default 128 x 64 tiles pad to 1.69x / 1.86x / 1.23x / 1.19x
# (:func:`padded_work`); the measurement decides which wins.
_HALF_TUNE = ((64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3))
TUNE_CONFIGS: Dict[int, Dict[Tuple[bool, int], Tuple[Tuple[int, int, int, int], ...]]] = {
    arch: {(False, bd): _HALF_TUNE for bd in (16, 32, 64, 128)} for arch in (80, 90)
}


def tune_configs(dtype: torch.dtype, head_dim: int, arch: int) -> Tuple[Tuple[int, int, int, int], ...]:
    """The alternative tiles the tuner times on sm_<arch> (none for an architecture not listed)."""
    return TUNE_CONFIGS.get(arch, {}).get((dtype == torch.float32, block_d(head_dim)), ())


def block_d(head_dim: int) -> int:
    """The head-dim bucket of the tile configs: the next power of two >= head_dim (>= 16)."""
    return max(16, next_power_of_2(head_dim))


def dim_chunks(head_dim: int, dtype: torch.dtype = torch.float16) -> Tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): the head dim as the kernel computes it, in one power-of-two chunk or two
    (two dots per product) when that pads less: 72 and 80 -> (64, 16), 48 -> (32, 16), 96 -> (64, 32);
    64 -> (64, 0); 112 -> (128, 0) (64 + 64 would pad as much). Chunks are >= 16 wide (a dot's minimum).
    float32 keeps one padded chunk: its tf32x3 tiles are register-bound, and the second chunk's operands
    made ptxas spill 8 bytes on sm_90 (head_dim 48, 72, 80 at the fp32 tiles, compiled ahead of time)."""
    bd = block_d(head_dim)
    if bd == head_dim or bd == 16 or dtype == torch.float32:
        return bd, 0
    d0 = bd // 2
    d1 = max(16, next_power_of_2(head_dim - d0))
    return (d0, d1) if d0 + d1 < bd else (bd, 0)


def padded_work(
    tokens: int, block_m: int, block_n: int, head_dim: int = 0, dtype: torch.dtype = torch.float16
) -> float:
    """The MMA work a (block_m, block_n) tiling does over the useful work at ``tokens`` query and key
    tokens (1.0: no padding); with head_dim, the head-dim padding of :func:`dim_chunks` counted too."""
    rows = cdiv(tokens, block_m) * block_m
    cols = cdiv(tokens, block_n) * block_n
    d = sum(dim_chunks(head_dim, dtype)) / head_dim if head_dim else 1.0
    return rows * cols * d / (tokens * tokens)


def kernel_config(dtype: torch.dtype, head_dim: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for inputs of ``dtype`` and ``head_dim``."""
    return _CONFIGS[(dtype == torch.float32, block_d(head_dim))]


def _check_operand(name: str, t: Tensor, ref: Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {t.dtype}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise TypeError(f"{name}: expected dtype {ref.dtype} on {ref.device} (those of q), got {t.dtype} on {t.device}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a unit stride in the last dim (head_dim), got strides {t.stride()}")
    check_aligned(name, t)


def check_aligned(name: str, t: Tensor) -> None:
    """The kernels load rows as 16-byte vectors: the data pointer must be 16-byte aligned and every
    stride but the last a multiple of 8 elements (true of any contiguous tensor, or view of one,
    whose last dim is a multiple of 8). Rejected, not copied: call .contiguous() to pass."""
    bad = [s for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1 and s % 8 != 0]
    if bad or t.data_ptr() % 16 != 0:
        raise ValueError(
            f"{name}: expected a 16-byte aligned data pointer and strides that are multiples of 8 "
            f"elements (except the last), got strides {t.stride()} and data_ptr % 16 = "
            f"{t.data_ptr() % 16}; pass {name}.contiguous()"
        )


def _offsets_in(qkv: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tuple[int, int]:
    """k's and v's element offsets from q, all three views of ``qkv`` that starts at q."""
    base = qkv.untyped_storage().data_ptr()
    if qkv.dtype != q.dtype or q.data_ptr() != qkv.data_ptr():
        raise ValueError(f"qkv: expected a {q.dtype} buffer starting at q, got {qkv.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.untyped_storage().data_ptr() != base:
            raise ValueError(f"{name}: expected a view of qkv, got a tensor of another storage")
    size = q.element_size()
    return (k.data_ptr() - q.data_ptr()) // size, (v.data_ptr() - q.data_ptr()) // size


def flash_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    *,
    out: Optional[Tensor] = None,
    return_lse: bool = False,
    attention_config: Optional[Tuple[int, int, int, int]] = None,
    attention_tma_config: Optional[Tuple[int, int, int, int, int]] = None,
    qkv: Optional[Tensor] = None,
):
    """softmax(scale * q k^T) v, non-causal, with the Triton kernel.

    q: (batch, heads, q_tokens, head_dim); k, v: (batch, heads, kv_tokens, head_dim); any strides
    with a unit stride in the last dim (no copies are made). scale: the softmax scale.
    out: optional (batch, heads, q_tokens, head_dim) tensor of q's dtype written in place, any
    strides with a unit last-dim stride, e.g. a (batch, tokens, heads * head_dim) buffer viewed as
    ``buf.view(B, N, H, D).transpose(1, 2)``.
    Returns out (and, with return_lse, the row log-sum-exp (batch, heads, q_tokens) fp32, natural log).
    attention_config: (BLOCK_M, BLOCK_N, num_warps, num_stages), None for :func:`kernel_config`
    (the tuner passes one of :func:`tune_configs`). attention_tma_config: run sm_90's tensor-descriptor
    kernel (:mod:`vit_kernels.triton.attention_tma`, float16/bfloat16, head_dim <= 128) with these
    tiles, one of ``attention_tma.CONFIGS`` (the tuner passes them on sm_90); a call it cannot run
    raises ValueError with the reason before any launch.
    qkv: the buffer q, k and v are views of, q at its start (the split path's (3, batch, heads,
    tokens, head_dim) buffer): the pointer kernel then takes the buffer alone, k and v as element
    offsets into it, and the TMA kernel one descriptor over its planes (attention_tma.launch), so a
    replayed launch plan (vit_kernels.replay) makes no views per call.
    """
    if q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor (batch, heads, tokens, head_dim), got shape {tuple(q.shape)}")
    why = checks.head_dim_unsupported(q.shape[-1], "triton")
    if why:
        raise ValueError(why)
    _check_operand("q", q, q)
    _check_operand("k", k, q)
    _check_operand("v", v, q)
    B, H, NQ, D = q.shape
    NKV = k.shape[2]
    if k.shape != (B, H, NKV, D) or v.shape != (B, H, NKV, D):
        raise ValueError(f"k, v: expected shape ({B}, {H}, kv_tokens, {D}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if NKV == 0 and NQ > 0:
        raise ValueError("k: expected at least one key/value token, got kv_tokens=0")
    if out is None:
        out = empty(q.shape, q.dtype, q.device)
    else:
        _check_operand("out", out, q)
        if out.shape != q.shape:
            raise ValueError(f"out: expected shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if attention_tma_config is not None and attention_config is not None:
        raise ValueError("attention_tma_config: give it or attention_config (the pointer kernel's tiles), not both")
    lse = empty((B, H, NQ), torch.float32, q.device) if return_lse else None
    if attention_tma_config is not None:
        from . import attention_tma

        attention_tma.launch(q, k, v, out, lse, scale, attention_tma_config, qkv=qkv)
    elif out.numel() > 0:
        BLOCK_M, BLOCK_N, num_warps, num_stages = attention_config or kernel_config(q.dtype, D)
        grid = (B * H * cdiv(NQ, BLOCK_M),)  # a head's query tiles adjacent (see the kernel)
        chunks = dim_chunks(D, q.dtype)
        # k and v as offsets into qkv (the kernel gets one buffer), else as they are
        k_off, v_off = _offsets_in(qkv, q, k, v) if qkv is not None else (0, 0)
        launch(
            _attn_fwd_kernel,
            grid,
            q if qkv is None else qkv,
            k if qkv is None else qkv,
            v if qkv is None else qkv,
            out,
            lse if return_lse else out,
            k_off,
            v_off,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            H,
            NQ,
            NKV,
            float(scale) * LOG2E.value,
            HEAD_DIM=D,
            BLOCK_D0=chunks[0],
            BLOCK_D1=chunks[1],
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            STORE_LSE=return_lse,
            INPUT_PRECISION=FP32_DOT_PRECISION,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return (out, lse) if return_lse else out


def aot_spec(
    dtype: torch.dtype, head_dim: int, store_lse: bool = False, attention_config=None, archs=(80, 90)
) -> AotSpec:
    """The launch flash_attention_forward makes for ``dtype`` and ``head_dim``, recorded as the
    split qkv_attention path calls it (q, k, v: views of one (3, B, H, N, head_dim) buffer; out:
    a (B, N, H * head_dim) buffer viewed as (B, H, N, head_dim)) at aot.REPRESENTATIVE's batch,
    heads and tokens, so its specialization is the launch's; attention_config: a tuning
    alternative's tiles, launched on ``archs``."""
    B, H, N = REPRESENTATIVE["batch"], REPRESENTATIVE["heads"], REPRESENTATIVE["tokens"]
    qkv = torch.empty(3, B, H, N, head_dim, dtype=dtype)
    out = torch.empty(B, N, H * head_dim, dtype=dtype).view(B, N, H, head_dim).transpose(1, 2)
    BLOCK_M, BLOCK_N, num_warps, num_stages = attention_config or kernel_config(dtype, head_dim)
    d0, d1 = dim_chunks(head_dim, dtype)
    label = (
        f"head_dim={head_dim},BLOCK_D={d0}" + (f"+{d1}" if d1 else "") + f",BLOCK_M={BLOCK_M},BLOCK_N={BLOCK_N},"
        f"{dtype_name(dtype)},lse={int(store_lse)}"
    )
    if attention_config is not None:
        label += f",num_warps={num_warps},num_stages={num_stages},tuning"
    call = lambda: flash_attention_forward(  # noqa: E731
        qkv[0], qkv[1], qkv[2], 1.0, out=out, return_lse=store_lse, attention_config=attention_config, qkv=qkv
    )
    return recorded_spec(
        "flash_attention_fwd",
        _attn_fwd_kernel,
        call,
        label,
        True,
        tuple(archs),
        shape=f"B={B},H={H},N={N},head_dim={head_dim},merged-head out",
    )


# head_dim values aot_specs() compiles: each BLOCK_D bucket's power of two plus the non powers of
# two the tests and ViTs use. Tile configs follow the bucket (BLOCK_D); inside a bucket head_dim changes
# the masks and, for 48 / 72 / 80, the chunks (dim_chunks), so those are compiled as well.
AOT_HEAD_DIMS = (16, 24, 32, 48, 64, 72, 80, 128, 256)


# head_dim values the tuning alternatives are compiled at: each BLOCK_D bucket's power of two and each
# two-chunk split of AOT_HEAD_DIMS (48: 32 + 16; 72, 80: 64 + 16).
TUNE_HEAD_DIMS = (16, 32, 48, 64, 72, 80, 128, 256)


def aot_specs() -> List[AotSpec]:
    """The configurations flash_attention_forward launches: dtype x head_dim (AOT_HEAD_DIMS, which
    covers every BLOCK_D bucket, i.e. every block config, and every head-dim split) x LSE kept or not."""
    specs = [aot_spec(dtype, hd, store_lse) for dtype in DTYPES for hd in AOT_HEAD_DIMS for store_lse in (False, True)]
    # each tuning alternative, at TUNE_HEAD_DIMS, without LSE
    for dtype in DTYPES:
        for hd in TUNE_HEAD_DIMS:
            cfgs = sorted({c for arch in TUNE_CONFIGS for c in tune_configs(dtype, hd, arch)})
            for cfg in cfgs:
                archs = tuple(a for a in sorted(TUNE_CONFIGS) if cfg in tune_configs(dtype, hd, a))
                specs.append(aot_spec(dtype, hd, False, attention_config=cfg, archs=archs))
    return specs
