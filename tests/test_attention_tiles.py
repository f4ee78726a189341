"""Flash attention shaped for ViT lengths (vit_kernels.triton.attention): the head dim in two chunks where
one power of two would pad (72 and 80 as 64 + 16; float16 and bfloat16), and the tuning tiles for 197 / 257
/ 577 / 1025 tokens.

In the interpreter, every tuning tile config against the float64 oracle (output and the row log-sum-exp)
over tokens 1, 50, 197, 257, 577, head dims 64, 72, 80 and fp32 / fp16 / bf16 (a covering set by
default, the full product behind the slow marker). Ahead of time (a subprocess without the interpreter),
the two-chunk kernel for sm_80 and sm_90: no spills, tensor-core instructions, and a smaller register or
shared-memory footprint than the same tiles padded to 128.
"""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vit_kernels import reference
from vit_kernels.testing import assert_close
from vit_kernels.dtypes import SHORT_NAMES

from conftest import DEVICE  # noqa: E402

attention = pytest.importorskip("vit_kernels.triton.attention")

DTYPES = SHORT_NAMES  # vit_kernels.dtypes: fp32, fp16, bf16
TOKENS = (1, 50, 197, 257, 577)
HEAD_DIMS = (64, 72, 80)
VIT_LENGTHS = (197, 257, 577, 1025)


def half_tune_configs():
    """Every tuning alternative for float16/bfloat16 (the same list for every bucket up to 128)."""
    cfgs = {
        c
        for arch in attention.TUNE_CONFIGS
        for hd in HEAD_DIMS
        for c in attention.tune_configs(torch.float16, hd, arch)
    }
    return sorted(cfgs)


def check(B, H, N, D, dtype, config):
    """One launch with ``config`` into a NaN-filled output, against the float64 oracle (tolerance rule,
    baseline: the eager reference at the inputs' dtype); the LSE against float64's logsumexp."""
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, device=DEVICE).to(dtype) for _ in range(3))
    scale = D**-0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    got, lse = attention.flash_attention_forward(q, k, v, scale, out=out, return_lse=True, attention_config=config)
    assert got is out
    oracle = reference.flash_attention(q.double(), k.double(), v.double(), scale=scale)
    assert_close(got, oracle, reference.flash_attention(q, k, v, scale=scale), name=f"out {config}")
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    assert_close(lse, torch.logsumexp(s, dim=-1), floor=1e-5, name=f"lse {config}")


def test_head_dim_chunks():
    assert attention.dim_chunks(72) == attention.dim_chunks(80) == (64, 16)
    assert attention.dim_chunks(48) == (32, 16) and attention.dim_chunks(96) == (64, 32)
    for d in (16, 32, 64, 128, 256):
        assert attention.dim_chunks(d) == (d, 0)
    for d in (24, 112, 200):  # two chunks would pad as much: one
        assert attention.dim_chunks(d) == (attention.block_d(d), 0)
    assert attention.dim_chunks(80, torch.float32) == (128, 0)  # fp32: one padded chunk (no spills)
    for d in range(16, 257, 8):
        d0, d1 = attention.dim_chunks(d)
        assert d0 + d1 >= d and d0 + d1 <= attention.block_d(d) and d1 in (0, 16, 32, 64, 128)


def test_launch_passes_the_chunks():
    """What the launcher passes (recorded as inspect records it): 80 -> BLOCK_D0 64, BLOCK_D1 16."""
    spec = attention.aot_spec(torch.float16, 80)
    assert (spec.constexprs["BLOCK_D0"], spec.constexprs["BLOCK_D1"], spec.constexprs["HEAD_DIM"]) == (64, 16, 80)
    spec = attention.aot_spec(torch.float16, 64)
    assert (spec.constexprs["BLOCK_D0"], spec.constexprs["BLOCK_D1"]) == (64, 0)
    spec = attention.aot_spec(torch.float32, 80)
    assert (spec.constexprs["BLOCK_D0"], spec.constexprs["BLOCK_D1"]) == (128, 0)


def test_tuning_tiles_pad_less_at_vit_lengths():
    """For each ViT length the tuner has a config that pads the score work less than the default tiles,
    and 64-row query tiles with 32-key tiles are among them (the measurement picks)."""
    default = attention.kernel_config(torch.float16, 64)
    cfgs = half_tune_configs()
    assert (64, 32, 4, 3) in cfgs and (64, 64, 4, 3) in cfgs
    for n in VIT_LENGTHS:
        best = min(attention.padded_work(n, c[0], c[1]) for c in cfgs)
        assert best < attention.padded_work(n, default[0], default[1]), n
    assert attention.padded_work(197, 64, 32) == pytest.approx(256 * 224 / 197**2)
    assert attention.padded_work(197, 64, 32, head_dim=80) == pytest.approx(256 * 224 / 197**2)
    assert attention.padded_work(64, 64, 64, head_dim=72) == pytest.approx(80 / 72)


# A covering set: every config, token count, head dim and dtype at least once, the split dims on each config.
DEFAULT_CASES = [
    ((64, 32, 4, 3), 197, 80, "fp16"),
    ((64, 32, 4, 3), 50, 72, "bf16"),
    ((64, 32, 4, 3), 1, 64, "fp32"),
    ((64, 64, 4, 3), 257, 72, "fp16"),
    ((64, 64, 4, 3), 197, 64, "bf16"),
    ((128, 32, 8, 3), 577, 80, "bf16"),
    ((128, 32, 8, 3), 50, 80, "fp32"),
    (None, 197, 80, "fp32"),
    (None, 257, 72, "bf16"),
]


def test_default_cases_cover_the_matrix():
    assert {c for c, _, _, _ in DEFAULT_CASES} - {None} == set(half_tune_configs())
    assert {n for _, n, _, _ in DEFAULT_CASES} == set(TOKENS)
    assert {d for _, _, d, _ in DEFAULT_CASES} == set(HEAD_DIMS)
    assert {t for _, _, _, t in DEFAULT_CASES} == set(DTYPES)


@pytest.mark.parametrize("config,N,D,dtype", DEFAULT_CASES)
def test_tiles_against_oracle(config, N, D, dtype):
    check(1, 2, N, D, DTYPES[dtype], config)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,N,D,dtype", list(itertools.product([None] + half_tune_configs(), TOKENS, HEAD_DIMS, DTYPES))
)
def test_tiles_against_oracle_full(config, N, D, dtype):
    check(2, 2, N, D, DTYPES[dtype], config)


def test_second_chunk_is_computed():
    """The columns past 64 come from the second chunk's dots: a kernel that skipped them would leave the
    NaN fill there (or zeros), and a kernel that dropped their q.k part would miss the oracle."""
    q, k, v = (torch.randn(1, 1, 50, 80, dtype=torch.float64, device=DEVICE).to(torch.float16) for _ in range(3))
    q[..., 64:] *= 8  # the scores depend strongly on the second chunk
    out = torch.full(q.shape, float("nan"), dtype=torch.float16, device=DEVICE)
    attention.flash_attention_forward(q, k, v, 0.125, out=out, attention_config=(64, 32, 4, 3))
    without = reference.flash_attention(q[..., :64].double(), k[..., :64].double(), v.double(), scale=0.125)
    oracle = reference.flash_attention(q.double(), k.double(), v.double(), scale=0.125)
    assert not out.isnan().any()
    assert (oracle - without).abs().max() > 0.1
    assert_close(out, oracle, reference.flash_attention(q, k, v, scale=0.125))


AOT = textwrap.dedent("""
    import json, sys, torch
    from vit_kernels.triton import aot, attention
    rows = []
    for hd, cfg in [(80, None), (80, (64, 32, 4, 3)), (128, None), (128, (64, 32, 4, 3))]:
        spec = attention.aot_spec(torch.float16, hd, attention_config=cfg)
        for arch in (80, 90):
            r = aot.compile_spec(spec, arch)
            rows.append(dict(hd=hd, cfg=cfg, arch=arch, regs=r["regs"], spill=r["spill_bytes"],
                             shared=r["shared_bytes"], tc=r["tensor_core_instructions"]))
    print(json.dumps(rows))
""")


def test_two_chunk_kernel_compiles_without_spills():
    """head_dim 80 as 64 + 16 for sm_80 and sm_90: no spills, tensor cores used (mma.sync on sm_80; on
    sm_90 wgmma or mma), and no more registers or shared memory than the same tiles at head_dim 128."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", AOT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    by = {(r["hd"], tuple(r["cfg"]) if r["cfg"] else None, r["arch"]): r for r in rows}
    for (hd, cfg, arch), r in by.items():
        assert r["spill"] == 0 and r["tc"], r
        if hd == 80:
            padded = by[(128, cfg, arch)]
            assert r["regs"] <= padded["regs"] and r["shared"] <= padded["shared"], (r, padded)
