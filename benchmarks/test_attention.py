"""Attention per provider across tokens (the cases of ``python -m vit_kernels profile-attention``)."""

import warnings

import pytest

from bench_cases import DEVICE, SIZES, attn_batch, run_benchmark
from vit_kernels.bench import attention as batt


@pytest.mark.parametrize("provider", list(batt.PROVIDERS))
def test_attention(benchmark, provider, tokens):
    why = batt.static_reason(provider, DEVICE)
    if why:
        pytest.skip(f"not measured: {why}")
    case = batt.AttnCase(attn_batch(tokens), SIZES.heads, tokens, SIZES.head_dim, SIZES.dtype)
    fn = batt.make_fn(provider, case, DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except RuntimeError as e:
            if "No available kernel" in str(e):
                pytest.skip("not measured: " + "; ".join(str(w.message).splitlines()[0] for w in caught))
            raise
    if provider.startswith("vk_"):
        from vit_kernels import last_decision

        d = last_decision("qkv_attention" if batt.is_qkv(provider) else "flash_attention")
        if d.backend != provider.split(":")[1]:
            pytest.skip(f"not measured as {provider}: {d}")
    run_benchmark(
        benchmark,
        fn,
        provider=provider,
        tokens=tokens,
        batch=case.batch,
        heads=case.heads,
        head_dim=case.head_dim,
        dtype=str(case.dtype),
        gflop=batt.flops(provider, case) / 1e9,
    )
