"""Layouts of tensor arguments, and the op specs the layout tests apply them to (not a test file).

:func:`make` builds a tensor of a given shape in one of LAYOUTS (same values whatever the layout:
only strides, storage offset and alignment change). :data:`SPECS` lists, per public op, its
tensor arguments (shape, magnitude), how to call it with a backend, and its float64 oracle.
:class:`Launches` counts the kernel launches of the Triton and CUDA backends (test hook only).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

import vit_kernels as vk
from vit_kernels import reference

# contiguous: a fresh tensor; transposed: last two dims swapped in memory (column-major weight,
# head_dim not unit-stride); permuted: dims 0 and 1 swapped in memory (unit last stride kept, e.g.
# (B, N, H, D) viewed as (B, H, N, D)); channels_last: 4-D in torch.channels_last (dim 1 innermost);
# gaps: every other element of the last dim (bias[::2]); row_gaps: every other row (x[:, ::2] of a
# longer buffer); expanded: stride 0 along the first dim of size > 1 (gamma.expand(dim));
# expanded_last: stride 0 along the last dim (ndim >= 2); offset: a view at element 8 of a buffer
# (storage offset, still 16-byte aligned); misaligned: a view at element 1 (not 16-byte aligned,
# e.g. 2 bytes for fp16).
LAYOUTS = (
    "contiguous",
    "transposed",
    "permuted",
    "channels_last",
    "gaps",
    "row_gaps",
    "expanded",
    "expanded_last",
    "offset",
    "misaligned",
)


def make(shape: Tuple[int, ...], layout: str, dtype: torch.dtype, device, scale: float = 1.0) -> Optional[torch.Tensor]:
    """A random (normal * scale) tensor of ``shape`` in ``layout``; None where the layout does not
    apply to that many dims (transposed, row_gaps and expanded_last need 2, permuted 3, expanded a
    dim of size > 1)."""

    def rnd(*s):
        return (torch.randn(*s, device=device) * scale).to(dtype)

    shape = tuple(shape)
    if layout == "contiguous":
        return rnd(*shape)
    if layout == "transposed":
        return rnd(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2) if len(shape) >= 2 else None
    if layout == "permuted":
        return rnd(shape[1], shape[0], *shape[2:]).transpose(0, 1) if len(shape) >= 3 else None
    if layout == "channels_last":
        return rnd(*shape).contiguous(memory_format=torch.channels_last) if len(shape) == 4 else None
    if layout == "gaps":
        return rnd(*shape[:-1], 2 * shape[-1])[..., ::2]
    if layout == "row_gaps":
        return rnd(*shape[:-2], 2 * shape[-2], shape[-1])[..., ::2, :] if len(shape) >= 2 else None
    if layout == "expanded":
        dims = [i for i, n in enumerate(shape) if n > 1]
        if not dims:
            return None
        small = list(shape)
        small[dims[0]] = 1
        return rnd(*small).expand(*shape)
    if layout == "expanded_last":
        return rnd(*shape[:-1], 1).expand(*shape) if len(shape) >= 2 and shape[-1] > 1 else None
    if layout in ("offset", "misaligned"):
        start = 8 if layout == "offset" else 1
        return rnd(math.prod(shape) + start)[start:].view(shape)
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


class Spec:
    """One public op: its tensor arguments ``name -> (shape, scale)`` (1-D parameters are the
    ``params``), ``run(tensors, backend, **keywords)`` and the oracle ``ref(tensors)``."""

    def __init__(
        self,
        op: str,
        tensors: Dict[str, Tuple[Tuple[int, ...], float]],
        run: Callable,
        ref: Callable,
        params: Tuple[str, ...] = (),
    ):
        self.op, self.tensors, self.run, self.ref, self.params = op, tensors, run, ref, params

    def make(
        self,
        dtype,
        device,
        arg: Optional[str] = None,
        layout: str = "contiguous",
        shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
    ):
        """Every argument contiguous except ``arg`` in ``layout`` (None when it does not apply);
        ``shapes`` overrides the shapes of some arguments (zero-size cases)."""
        out = {}
        for name, (shape, scale) in self.tensors.items():
            shape = (shapes or {}).get(name, shape)
            t = make(shape, layout if name == arg else "contiguous", dtype, device, scale)
            if t is None:
                return None
            out[name] = t
        return out


B, N, NKV, DIM, HEADS, HIDDEN = 2, 7, 5, 32, 2, 64
HD = DIM // HEADS
C, IMG, P = 3, 16, 8
T_PATCH = 1 + (IMG // P) ** 2

SPECS = {
    "flash_attention": Spec(
        "flash_attention",
        {"q": ((B, HEADS, N, HD), 1.0), "k": ((B, HEADS, NKV, HD), 1.0), "v": ((B, HEADS, NKV, HD), 1.0)},
        lambda t, be, **kw: vk.flash_attention(t["q"], t["k"], t["v"], backend=be, **kw),
        lambda t: reference.flash_attention(t["q"], t["k"], t["v"]),
    ),
    "qkv_attention": Spec(
        "qkv_attention",
        {
            "x": ((B, N, DIM), 1.0),
            "qkv_weight": ((3 * DIM, DIM), DIM**-0.5),
            "qkv_bias": ((3 * DIM,), 0.5),
            "norm_weight": ((DIM,), 1.0),
            "norm_bias": ((DIM,), 0.5),
        },
        lambda t, be, **kw: vk.qkv_attention(
            t["x"],
            t["qkv_weight"],
            t["qkv_bias"],
            norm_weight=t["norm_weight"],
            norm_bias=t["norm_bias"],
            backend=be,
            **{"num_heads": HEADS, **kw},
        ),
        lambda t: reference.qkv_attention(
            t["x"],
            t["qkv_weight"],
            t["qkv_bias"],
            num_heads=HEADS,
            norm_weight=t["norm_weight"],
            norm_bias=t["norm_bias"],
        ),
        params=("qkv_bias", "norm_weight", "norm_bias"),
    ),
    "layernorm_gelu_mlp": Spec(
        "layernorm_gelu_mlp",
        {
            "x": ((B, N, DIM), 1.0),
            "norm_weight": ((DIM,), 1.0),
            "norm_bias": ((DIM,), 0.5),
            "fc1_weight": ((HIDDEN, DIM), DIM**-0.5),
            "fc1_bias": ((HIDDEN,), 0.5),
            "fc2_weight": ((DIM, HIDDEN), HIDDEN**-0.5),
            "fc2_bias": ((DIM,), 0.5),
            "residual": ((B, N, DIM), 1.0),
            "layer_scale": ((DIM,), 1.0),
        },
        lambda t, be, **kw: vk.layernorm_gelu_mlp(
            t["x"],
            t["norm_weight"],
            t["norm_bias"],
            t["fc1_weight"],
            t["fc1_bias"],
            t["fc2_weight"],
            t["fc2_bias"],
            residual=t["residual"],
            layer_scale=t["layer_scale"],
            backend=be,
            **kw,
        ),
        lambda t: reference.layernorm_gelu_mlp(
            t["x"],
            t["norm_weight"],
            t["norm_bias"],
            t["fc1_weight"],
            t["fc1_bias"],
            t["fc2_weight"],
            t["fc2_bias"],
            residual=t["residual"],
            layer_scale=t["layer_scale"],
        ),
        params=("norm_weight", "norm_bias", "fc1_bias", "fc2_bias", "layer_scale"),
    ),
    "patch_embed": Spec(
        "patch_embed",
        {
            "images": ((B, C, IMG, IMG), 1.0),
            "weight": ((DIM, C, P, P), (C * P * P) ** -0.5),
            "bias": ((DIM,), 0.5),
            "pos_embed": ((1, T_PATCH, DIM), 0.5),
            "cls_token": ((1, 1, DIM), 1.0),
        },
        lambda t, be, **kw: vk.patch_embed(
            t["images"],
            t["weight"],
            t["bias"],
            pos_embed=t["pos_embed"],
            cls_token=t["cls_token"],
            backend=be,
            **{"patch_size": P, **kw},
        ),
        lambda t: reference.patch_embed(
            t["images"], t["weight"], t["bias"], patch_size=P, pos_embed=t["pos_embed"], cls_token=t["cls_token"]
        ),
        params=("bias", "pos_embed", "cls_token"),
    ),
    "linear": Spec(
        "linear",
        {
            "x": ((B, N, DIM), 1.0),
            "weight": ((DIM, DIM), DIM**-0.5),
            "bias": ((DIM,), 0.5),
            "residual": ((B, N, DIM), 1.0),
            "layer_scale": ((DIM,), 1.0),
        },
        lambda t, be, **kw: vk.linear(
            t["x"], t["weight"], t["bias"], residual=t["residual"], layer_scale=t["layer_scale"], backend=be, **kw
        ),
        lambda t: reference.linear(
            t["x"], t["weight"], t["bias"], residual=t["residual"], layer_scale=t["layer_scale"]
        ),
        params=("bias", "layer_scale"),
    ),
}

_CUDA_ROWS = {"transposed", "gaps", "expanded", "expanded_last", "permuted"}  # rows that do not merge / unit stride
_CUDA_WEIGHT = {"transposed", "gaps", "expanded_last"}
# (op, backend) -> {argument: layouts its kernels do not read, which must be refused}. Every other
# (argument, layout) must give the oracle's answer.
REFUSED = {
    ("flash_attention", "triton"): {
        a: {"transposed", "channels_last", "gaps", "expanded_last", "misaligned"} for a in ("q", "k", "v")
    },
    ("qkv_attention", "cuda"): {"x": _CUDA_ROWS, "qkv_weight": _CUDA_WEIGHT},
    ("layernorm_gelu_mlp", "cuda"): {
        "x": _CUDA_ROWS,
        "residual": _CUDA_ROWS,
        "fc1_weight": _CUDA_WEIGHT,
        "fc2_weight": _CUDA_WEIGHT,
    },
    ("linear", "cuda"): {"x": _CUDA_ROWS, "residual": _CUDA_ROWS, "weight": _CUDA_WEIGHT},
}  # patch_embed's weight on cuda: copied to contiguous (a channels_last model), see test_layouts


def cases(layouts=LAYOUTS):
    """(op, argument, layout) for every op, every tensor argument and every layout that applies to
    its dims; (op, None, "contiguous") once per op."""
    out = []
    for op, spec in SPECS.items():
        if "contiguous" in layouts:
            out.append((op, None, "contiguous"))
        for name, (shape, _) in spec.tensors.items():
            for layout in layouts:
                if layout == "contiguous":
                    continue
                if make(shape, layout, torch.float32, "meta") is not None:
                    out.append((op, name, layout))
    return out


# ------------------------------------------------------------------------------ launch counting
TRITON_KERNELS = (
    ("vit_kernels.triton.gemm", "_gemm_kernel"),
    ("vit_kernels.triton.layernorm", "_row_stats_kernel"),
    ("vit_kernels.triton.attention", "_attn_fwd_kernel"),
    ("vit_kernels.triton.qkv_attention", "_qkv_attn_kernel"),
    ("vit_kernels.triton.gemm_tma", "_gemm_tma_kernel"),
    ("vit_kernels.triton.layernorm", "_ln_prologue_kernel"),
    ("vit_kernels.triton.attention_tma", "_attn_fwd_tma_kernel"),
    ("vit_kernels.triton.attention_tma", "_attn_fwd_tma_ws_kernel"),
)
CUDA_ENTRY_POINTS = ("gemm_rows", "gemm_qkv", "gemm_patch", "row_stats", "flash_attention_forward")


class _CountedKernel:
    def __init__(self, kernel, counter, name):
        self._kernel, self._counter, self._name = kernel, counter, name

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def counted(*args, **kwargs):
            self._counter.append(self._name)
            return launch(*args, **kwargs)

        return counted

    def __getattr__(self, attr):
        return getattr(self._kernel, attr)


class _CountedModule:
    def __init__(self, module, counter):
        self._module, self._counter = module, counter

    def __getattr__(self, attr):
        fn = getattr(self._module, attr)
        if attr not in CUDA_ENTRY_POINTS:
            return fn

        def counted(*args, **kwargs):
            self._counter.append(attr)
            return fn(*args, **kwargs)

        return counted


class Launches:
    """Counts launches: every Triton kernel of TRITON_KERNELS and every CUDA extension entry point
    of CUDA_ENTRY_POINTS (through vit_kernels.cuda.ops.module_for). ``install(monkeypatch)``."""

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch) -> "Launches":
        import importlib

        for mod_name, attr in TRITON_KERNELS:
            mod = importlib.import_module(mod_name)
            monkeypatch.setattr(mod, attr, _CountedKernel(getattr(mod, attr), self.calls, attr))
        from vit_kernels.cuda import ops as cuda_ops

        original = cuda_ops.module_for
        monkeypatch.setattr(cuda_ops, "module_for", lambda device: _CountedModule(original(device), self.calls))
        return self
