"""Each fused op at one ViT block's shapes, per backend (torch, triton, cuda)."""

import pytest
import torch

from bench_cases import DEVICE, SIZES, run_benchmark
from vit_kernels import last_decision, ops
from vit_kernels.bench import throughput as tp
from vit_kernels.models.registry import SIZES as VIT_SIZES


def make_op(op):
    """(callable taking a backend, the op's name for last_decision) on fresh random inputs."""
    size = SIZES.model.split("_")[1]
    dim, _, heads, hidden = VIT_SIZES[size]
    img = SIZES.img or 224
    B, N, g = SIZES.batch, (img // 16) ** 2 + 1, dict(device=DEVICE, dtype=SIZES.dtype)
    r = lambda *s: torch.randn(*s, **g) * 0.02  # noqa: E731
    x = torch.randn(B, N, dim, **g)
    if op == "patch_embed":
        images, w, b, pos, cls = torch.randn(B, 3, img, img, **g), r(dim, 3, 16, 16), r(dim), r(1, N, dim), r(1, 1, dim)
        return lambda be: ops.patch_embed(images, w, b, patch_size=16, pos_embed=pos, cls_token=cls, backend=be)
    if op == "qkv_attention":
        w, b, nw, nb = r(3 * dim, dim), r(3 * dim), 1 + r(dim), r(dim)
        return lambda be: ops.qkv_attention(x, w, b, num_heads=heads, norm_weight=nw, norm_bias=nb, backend=be)
    if op == "linear":
        w, b, o = r(dim, dim), r(dim), torch.randn(B, N, dim, **g)
        return lambda be: ops.linear(o, w, b, residual=x, backend=be)
    nw, nb, w1, b1, w2, b2 = 1 + r(dim), r(dim), r(hidden, dim), r(hidden), r(dim, hidden), r(dim)
    return lambda be: ops.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, residual=x, backend=be)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("op", ["patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"])
def test_op(benchmark, op, backend):
    if backend != "torch":
        why = tp.static_reason(backend, DEVICE)
        if why:
            pytest.skip(f"not measured: {why}")
    run = make_op(op)
    with torch.inference_mode():
        try:
            run(backend)
        except (RuntimeError, ValueError) as e:  # the backend cannot serve this op here: say why
            pytest.skip(f"not measured: {e}")
        d = last_decision(op)
        if d is not None and d.backend != backend:
            pytest.skip(f"not measured as {backend}: {d}")

        def fn():
            return run(backend)

        run_benchmark(
            benchmark,
            fn,
            op=op,
            backend=backend,
            batch=SIZES.batch,
            dtype=str(SIZES.dtype),
            path=getattr(d, "path", ""),
        )
