"""Cost model: FLOPs and bytes of the fused ops, a ViT block and a whole ViT, and roofline bounds.

Conventions (all counts are for the forward pass at inference):
- FLOPs are matmul FLOPs, 2 per multiply-add (17.6 GMACs = 35.2 GFLOPs for ViT-B/16 at 224).
  Attention counts 4*B*H*N*N*d (q k^T and p v). Elementwise work (LayerNorm, softmax, GELU,
  adds) is not counted: it is small and never the limit on a tensor-core GPU.
- Bytes are DRAM (HBM) bytes, each tensor counted at its dtype's size. Caches are assumed to
  catch nothing across kernels and everything inside one (tiles re-read by a kernel from L2
  are not counted), which is the usual roofline convention.
- Three accountings per op: ``min_bytes``, the fewest bytes any implementation of the op must
  move (each distinct input and weight read once, each output written once); ``eager``, the
  sequence of PyTorch ops that computes it today, step by step; ``fused``, the planned fused block
  (QKV GEMM with LayerNorm, flash attention, out-projection with residual, fc1 with LayerNorm + GELU,
  fc2 with residual), step by step.
- A roofline bound of a sequence of kernels is the sum over kernels of
  max(flops / peak FLOP/s, bytes / peak bandwidth): a kernel cannot overlap with the next one.

"A" below is the size of one activation (batch * tokens * dim elements) in bytes.

This file is the op-level accounting (the plan); :mod:`vit_kernels.bench.cost_kernels` models what each
implemented kernel of each path really moves (tile re-reads included) and how long it should take;
:mod:`vit_kernels.bench.cost_text` formats both.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from ..arch import SHARED_PER_BLOCK, Peak


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True)
class Step:
    """One kernel (or one eager op): its FLOPs and the DRAM bytes it moves."""

    name: str
    flops: float
    bytes: float

    def seconds(self, tflops: float, gbs: float) -> float:
        """Roofline time: max(compute time, memory time)."""
        return max(self.flops / (tflops * 1e12), self.bytes / (gbs * 1e9))


def bound_seconds(
    steps: Sequence[Step], peak: Peak, dtype: torch.dtype, tf32: Optional[bool] = None
) -> Optional[float]:
    """The roofline lower bound of running ``steps`` one after another on ``peak``'s GPU;
    None when the GPU has no tensor-core path for ``dtype``."""
    tflops = peak.tflops(dtype, tf32)
    if tflops is None:
        return None
    return sum(s.seconds(tflops, peak.bandwidth_gbs) for s in steps)


@dataclasses.dataclass(frozen=True)
class OpCost:
    """The cost of one fused op: its FLOPs, the fewest bytes it must move, and the steps of the
    eager sequence and of the planned fused kernels."""

    name: str
    flops: float
    min_bytes: float
    eager: Tuple[Step, ...]
    fused: Tuple[Step, ...]

    @property
    def eager_bytes(self) -> float:
        return sum(s.bytes for s in self.eager)

    @property
    def fused_bytes(self) -> float:
        return sum(s.bytes for s in self.fused)

    @property
    def min_step(self) -> Step:
        return Step(self.name, self.flops, self.min_bytes)


# ---------------------------------------------------------------------------------------------
# the ops


def attention_cost(
    batch: int, heads: int, tokens: int, head_dim: int, elem: int, eager_attention: str = "math"
) -> OpCost:
    """flash_attention: q, k, v (batch, heads, tokens, head_dim) -> o of the same shape.

    eager_attention: "math" (q*scale, q@k^T, softmax, @v: the scores go through memory) or
    "sdpa" (one fused SDPA kernel).
    """
    Q = batch * heads * tokens * head_dim * elem  # one of q, k, v, o
    S = batch * heads * tokens * tokens * elem  # the scores
    flops = 4.0 * batch * heads * tokens * tokens * head_dim
    if eager_attention == "sdpa":
        eager = (Step("sdpa", flops, 4 * Q),)
    elif eager_attention == "math":
        eager = (
            Step("q*scale", 0, 2 * Q),
            Step("q@k^T", flops / 2, 2 * Q + S),
            Step("softmax", 0, 2 * S),
            Step("p@v", flops / 2, S + 2 * Q),
        )
    else:
        raise ValueError(f"eager_attention: expected 'math' or 'sdpa', got {eager_attention!r}")
    return OpCost("flash_attention", flops, 4 * Q, eager, (Step("flash_attention", flops, 4 * Q),))


def kv_fits_on_chip(tokens: int, head_dim: int, elem: int, smem: int = SHARED_PER_BLOCK[90]) -> bool:
    """The design rule for the one-kernel QKV + attention: K and V of one head fit in shared memory.
    The ideal the cost model counts; the Triton kernel's own choice (power-of-two tiles, register
    limits) is vit_kernels.triton.qkv_attention.single_kernel_fits."""
    return 2 * tokens * head_dim * elem <= smem


def qkv_attention_cost(
    batch: int,
    tokens: int,
    dim: int,
    heads: int,
    elem: int,
    *,
    inner: Optional[int] = None,
    norm: bool = True,
    qkv_bias: bool = True,
    eager_attention: str = "sdpa",
    path: Optional[str] = None,
    row_stats: str = "separate",
) -> OpCost:
    """qkv_attention: x (batch, tokens, dim) -> o (batch, tokens, inner), LayerNorm included.

    eager_attention: "sdpa" (PyTorch's fused SDPA kernels write o in (batch, tokens, heads,
    head_dim) memory order, so merging heads is a free view) or "math" (explicit ops; o comes
    out (batch, heads, tokens, head_dim) and merging heads is a copy).
    path: "single_kernel" (LN + QKV + attention in one kernel per (batch, head)) or "split"
    (QKV GEMM with a head-split epilogue, then flash attention); default: single_kernel when K
    and V of one head fit in shared memory. row_stats: "separate" (a pass over x for the LN
    statistics where the kernel cannot compute them itself) or "fused" (from the previous
    kernel's epilogue).
    """
    inner = dim if inner is None else inner
    hd = inner // heads
    T = batch * tokens
    X, O = T * dim * elem, T * inner * elem
    w_qkv = 3 * inner * dim * elem + (3 * inner * elem if qkv_bias else 0)
    w_norm = 2 * dim * elem if norm else 0
    f_proj = 2.0 * T * dim * 3 * inner
    att = attention_cost(batch, heads, tokens, hd, elem, eager_attention)
    flops = f_proj + att.flops
    eager: List[Step] = []
    if norm:
        eager.append(Step("layernorm", 0, 2 * X + w_norm))
    eager.append(Step("qkv linear", f_proj, X + w_qkv + 3 * O))
    eager.extend(att.eager)
    if eager_attention == "math":
        eager.append(Step("merge heads (copy)", 0, 2 * O))
    if path is None:
        path = "single_kernel" if kv_fits_on_chip(tokens, hd, elem) else "split"
    if path == "single_kernel":
        # each (batch, head) program reads whole rows of x, so it computes the LN statistics itself
        fused = [Step("qkv+attention kernel", flops, X + w_qkv + w_norm + O)]
    elif path == "split":
        fused = [
            Step("qkv gemm (head-split)", f_proj, X + w_qkv + w_norm + 3 * O),
            Step("flash attention", att.flops, 4 * O),
        ]
        if norm and row_stats == "separate":
            fused.insert(0, Step("row stats (LN1)", 0, X))
    else:
        raise ValueError(f"path: expected 'single_kernel' or 'split', got {path!r}")
    return OpCost("qkv_attention", flops, X + w_qkv + w_norm + O, tuple(eager), tuple(fused))


def linear_cost(
    rows: int,
    in_features: int,
    out_features: int,
    elem: int,
    *,
    bias: bool = True,
    residual: bool = True,
    layer_scale: bool = False,
    name: str = "linear",
) -> OpCost:
    """linear: x (rows, in) -> residual + layer_scale * (x W^T + b), (rows, out)."""
    X, Y = rows * in_features * elem, rows * out_features * elem
    W = out_features * in_features * elem + (out_features * elem if bias else 0)
    L = out_features * elem if layer_scale else 0
    flops = 2.0 * rows * in_features * out_features
    eager = [Step(name, flops, X + W + Y)]
    if layer_scale:
        eager.append(Step("layer scale", 0, 2 * Y + L))
    if residual:
        eager.append(Step("residual add", 0, 3 * Y))
    min_bytes = X + W + L + Y + (Y if residual else 0)
    fused = (Step("gemm + epilogue", flops, min_bytes),)
    return OpCost(name, flops, min_bytes, tuple(eager), fused)


def mlp_cost(
    rows: int,
    dim: int,
    hidden: int,
    elem: int,
    *,
    norm: bool = True,
    bias: bool = True,
    residual: str = "input",
    layer_scale: bool = False,
    row_stats: str = "separate",
) -> OpCost:
    """layernorm_gelu_mlp: x (rows, dim) -> residual + ls * fc2(gelu(fc1(LN(x)))), (rows, dim).

    residual: "input" (the residual is x itself, as in a ViT block: nothing more to read for the
    op's minimum), "other" (a distinct tensor) or "none". The planned kernels (the fused block above) are
    two GEMMs: fc1 with LayerNorm applied as x loads and a bias + GELU epilogue, fc2 with a bias +
    layer scale + residual epilogue; the hidden activation goes through memory.
    """
    X, Hh = rows * dim * elem, rows * hidden * elem
    W1 = hidden * dim * elem + (hidden * elem if bias else 0)
    W2 = dim * hidden * elem + (dim * elem if bias else 0)
    Wn = 2 * dim * elem if norm else 0
    L = dim * elem if layer_scale else 0
    f1 = f2 = 2.0 * rows * dim * hidden
    eager = []
    if norm:
        eager.append(Step("layernorm", 0, 2 * X + Wn))
    eager += [Step("fc1", f1, X + W1 + Hh), Step("gelu", 0, 2 * Hh), Step("fc2", f2, Hh + W2 + X)]
    if layer_scale:
        eager.append(Step("layer scale", 0, 2 * X + L))
    if residual != "none":
        eager.append(Step("residual add", 0, 3 * X))
    fused = []
    if norm and row_stats == "separate":
        fused.append(Step("row stats (LN2)", 0, X))
    fused += [
        Step("fc1 gemm (LN on load, GELU epilogue)", f1, X + W1 + Wn + Hh),
        Step("fc2 gemm (residual epilogue)", f2, Hh + W2 + L + X + (X if residual != "none" else 0)),
    ]
    min_bytes = X + W1 + W2 + Wn + L + X + (X if residual == "other" else 0)
    if residual not in ("input", "other", "none"):
        raise ValueError(f"residual: expected 'input', 'other' or 'none', got {residual!r}")
    return OpCost("layernorm_gelu_mlp", f1 + f2, min_bytes, tuple(eager), tuple(fused))


def patch_embed_cost(
    batch: int,
    in_chans: int,
    img: Tuple[int, int],
    patch: int,
    dim: int,
    elem: int,
    *,
    class_token: bool = True,
    pos_embed: bool = True,
) -> OpCost:
    """patch_embed: images (batch, in_chans, H, W) -> tokens (batch, [1 +] patches, dim)."""
    P = (img[0] // patch) * (img[1] // patch)
    tokens = P + (1 if class_token else 0)
    I = batch * in_chans * img[0] * img[1] * elem
    E, Tk = batch * P * dim * elem, batch * tokens * dim * elem
    W = dim * in_chans * patch * patch * elem + dim * elem
    pos = tokens * dim * elem if pos_embed else 0
    cls = dim * elem if class_token else 0
    flops = 2.0 * batch * P * in_chans * patch * patch * dim
    eager = [Step("conv", flops, I + W + E)]
    if class_token:
        eager.append(Step("cat class token", 0, E + cls + Tk))
    if pos_embed:
        eager.append(Step("+ pos_embed", 0, 2 * Tk + pos))
    min_bytes = I + W + pos + cls + Tk
    return OpCost(
        "patch_embed", flops, min_bytes, tuple(eager), (Step("patch gemm (gather loader)", flops, min_bytes),)
    )


# ---------------------------------------------------------------------------------------------
# a block and a model


@dataclasses.dataclass(frozen=True)
class ViTShape:
    """The shapes that decide a ViT's cost. tokens includes the class/register tokens."""

    batch: int
    tokens: int
    dim: int
    heads: int
    hidden: int
    depth: int
    elem: int = 2
    patch: int = 16
    in_chans: int = 3
    img: Tuple[int, int] = (224, 224)
    num_classes: int = 1000
    class_token: bool = True
    qkv_bias: bool = True
    layer_scale: bool = False

    @property
    def rows(self) -> int:
        return self.batch * self.tokens

    @property
    def A(self) -> int:
        """Bytes of one activation (batch, tokens, dim)."""
        return self.rows * self.dim * self.elem

    @classmethod
    def vit(
        cls,
        size: str = "base",
        patch: int = 16,
        img: int = 224,
        batch: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        **kw,
    ) -> "ViTShape":
        """A named reference config (vit_kernels.models.registry.SIZES)."""
        from ..models.registry import SIZES

        dim, depth, heads, hidden = SIZES[size]
        tokens = (img // patch) ** 2 + 1
        return cls(batch, tokens, dim, heads, hidden, depth, dtype_bytes(dtype), patch, img=(img, img), **kw)


@dataclasses.dataclass(frozen=True)
class BlockCost:
    """One encoder block, as its three fused ops."""

    shape: ViTShape
    ops: Tuple[OpCost, ...]

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def eager(self) -> Tuple[Step, ...]:
        return tuple(s for o in self.ops for s in o.eager)

    @property
    def fused(self) -> Tuple[Step, ...]:
        return tuple(s for o in self.ops for s in o.fused)

    @property
    def op_min(self) -> Tuple[Step, ...]:
        return tuple(o.min_step for o in self.ops)

    @property
    def weight_bytes(self) -> int:
        s = self.shape
        return (4 * s.dim * s.dim + 2 * s.dim * s.hidden) * s.elem

    @property
    def one_kernel_min_bytes(self) -> float:
        """Fewest bytes for the whole block in one kernel: read x, write y, read the weights."""
        return 2 * self.shape.A + self.weight_bytes

    def in_A(self, nbytes: float) -> float:
        return nbytes / self.shape.A


def block_cost(
    shape: ViTShape, *, eager_attention: str = "sdpa", path: Optional[str] = None, row_stats: str = "separate"
) -> BlockCost:
    s = shape
    return BlockCost(
        s,
        (
            qkv_attention_cost(
                s.batch,
                s.tokens,
                s.dim,
                s.heads,
                s.elem,
                qkv_bias=s.qkv_bias,
                eager_attention=eager_attention,
                path=path,
                row_stats=row_stats,
            ),
            linear_cost(s.rows, s.dim, s.dim, s.elem, layer_scale=s.layer_scale, name="proj"),
            mlp_cost(s.rows, s.dim, s.hidden, s.elem, layer_scale=s.layer_scale, row_stats=row_stats),
        ),
    )


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """A whole ViT forward: patch embedding, the blocks, final LayerNorm, head."""

    shape: ViTShape
    patch_embed: OpCost
    block: BlockCost
    tail: Tuple[Step, ...]  # final LayerNorm and head

    @property
    def flops(self) -> float:
        return self.patch_embed.flops + self.shape.depth * self.block.flops + sum(t.flops for t in self.tail)

    def steps(self, which: str) -> List[Step]:
        """The model's steps: which = "eager" | "fused" | "min" (each fused op at its minimum)."""
        pe = {"eager": self.patch_embed.eager, "fused": self.patch_embed.fused, "min": (self.patch_embed.min_step,)}[
            which
        ]
        blk = {"eager": self.block.eager, "fused": self.block.fused, "min": self.block.op_min}[which]
        return list(pe) + list(blk) * self.shape.depth + list(self.tail)

    def bytes(self, which: str) -> float:
        return sum(s.bytes for s in self.steps(which))

    def bound_seconds(
        self, peak: Peak, dtype: torch.dtype, which: str = "min", tf32: Optional[bool] = None
    ) -> Optional[float]:
        return bound_seconds(self.steps(which), peak, dtype, tf32)


def model_cost(shape: ViTShape, **block_kw) -> ModelCost:
    s = shape
    pe = patch_embed_cost(s.batch, s.in_chans, s.img, s.patch, s.dim, s.elem, class_token=s.class_token)
    tail = [Step("final layernorm", 0, 2 * s.A)]
    if s.num_classes:
        tail.append(
            Step(
                "head",
                2.0 * s.batch * s.dim * s.num_classes,
                s.batch * s.dim * s.elem + s.num_classes * (s.dim + 1) * s.elem + s.batch * s.num_classes * s.elem,
            )
        )
    return ModelCost(s, pe, block_cost(s, **block_kw), tuple(tail))


def training_flops(forward_flops: float) -> float:
    """Forward + backward FLOPs of a training step: the usual 3x the forward (the backward
    computes two GEMMs per forward GEMM). Bytes of training are not modelled."""
    return 3.0 * forward_flops
