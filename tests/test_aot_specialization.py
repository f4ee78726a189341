"""What `inspect` compiles is what a launch compiles: for every Triton kernel family, the launches
the public ops and a fused ViT make (recorded, not run) specialize, by Triton's own rules, to a
configuration that aot_specs() lists, with the same constants, divisibility attributes and options.
No compilation here (see tests/test_inspect.py for the compiled facts)."""

import dataclasses

import pytest
import torch

import vit_kernels as vk
from vit_kernels.commands.inspect import TRITON_MODULES, triton_specs
from vit_kernels.triton.aot import REPRESENTATIVE, launch_key, record_launches, spec_key, specialize

# Launches are recorded on CPU tensors, which needs Triton's interpreter (the CPU run, CI's).
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="records launches on CPU tensors through "
    "Triton's interpreter, which is off on a GPU machine; CI runs it on CPU",
)

B, N, DIM, H = (REPRESENTATIVE[k] for k in ("batch", "tokens", "dim", "heads"))
HD = DIM // H


@pytest.fixture(scope="module")
def report():
    """spec_key -> AotSpec of every configuration inspect compiles."""
    return {spec_key(s): s for s in triton_specs()}


def empty(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype)


def _name(launch):
    return launch.fn.__name__


def assert_in_report(report, launches, expect_kernels):
    assert {_name(la) for la in launches} >= set(expect_kernels), [_name(la) for la in launches]
    for la in launches:
        key = launch_key(la)
        if key not in report:
            # the nearest listed spec of the same kernel, to show what differs
            same = [s for k, s in report.items() if k[0] == key[0] and k[1] == key[1] and k[2] == key[2]]
            raise AssertionError(
                f"{_name(la)}: the launch's specialization {dict(key[3])} with options "
                f"{key[4:]} is not in the report; nearest listed: "
                f"{[(s.config, s.specialization()) for s in same][:2]}"
            )


def op_calls(dtype):
    """Each family's public op at the representative shape, as a ViT calls it."""
    x = empty(B, N, DIM, dtype=dtype)
    ln = empty(DIM, dtype=dtype)
    qkv_w, qkv_b = empty(3 * DIM, DIM, dtype=dtype), empty(3 * DIM, dtype=dtype)
    w, b = empty(DIM, DIM, dtype=dtype), empty(DIM, dtype=dtype)
    fc1_w, fc1_b = empty(4 * DIM, DIM, dtype=dtype), empty(4 * DIM, dtype=dtype)
    fc2_w = empty(DIM, 4 * DIM, dtype=dtype)
    images = empty(B, 3, 224, 224, dtype=dtype)
    conv_w = empty(DIM, 3, 16, 16, dtype=dtype)
    pos, cls = empty(1, N, DIM, dtype=dtype), empty(1, 1, DIM, dtype=dtype)
    q = empty(B, H, N, HD, dtype=dtype)
    return {
        # the single kernel where it fits (fp16/bf16 at 197 tokens; untimed calls take split)
        "qkv_attention single_kernel": (
            lambda: vk.qkv_attention(
                x,
                qkv_w,
                qkv_b,
                num_heads=H,
                norm_weight=ln,
                norm_bias=ln,
                backend="triton",
                path="single_kernel" if dtype != torch.float32 else "split",
            ),
            ["_qkv_attn_kernel"] if dtype != torch.float32 else ["_attn_fwd_kernel"],
        ),
        "qkv_attention split": (
            lambda: vk.qkv_attention(
                x, qkv_w, qkv_b, num_heads=H, norm_weight=ln, norm_bias=ln, backend="triton", path="split"
            ),
            ["_row_stats_kernel", "_gemm_kernel", "_attn_fwd_kernel"],
        ),
        "flash_attention": (lambda: vk.flash_attention(q, q, q, backend="triton"), ["_attn_fwd_kernel"]),
        "linear": (lambda: vk.linear(x, w, b, residual=x, layer_scale=b, backend="triton"), ["_gemm_kernel"]),
        "mlp": (
            lambda: vk.layernorm_gelu_mlp(x, ln, ln, fc1_w, fc1_b, fc2_w, b, residual=x, backend="triton"),
            ["_row_stats_kernel", "_gemm_kernel"],
        ),
        "patch_embed nchw": (
            lambda: vk.patch_embed(images, conv_w, b, patch_size=16, pos_embed=pos, cls_token=cls, backend="triton"),
            ["_gemm_kernel"],
        ),
        "patch_embed channels_last": (
            lambda: vk.patch_embed(
                images.contiguous(memory_format=torch.channels_last),
                conv_w,
                b,
                patch_size=16,
                pos_embed=pos,
                cls_token=cls,
                backend="triton",
            ),
            ["_gemm_kernel"],
        ),
        "patch_embed uint8 nhwc": (
            lambda: vk.patch_embed(
                torch.empty(B, 224, 224, 3, dtype=torch.uint8).permute(0, 3, 1, 2),
                conv_w,
                b,
                patch_size=16,
                pos_embed=pos,
                cls_token=cls,
                image_mean=(0.5,) * 3,
                image_std=(0.5,) * 3,
                backend="triton",
            ),
            ["_gemm_kernel"],
        ),
    }


CASES = list(op_calls(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_every_op_launch_is_in_the_report(report, case, dtype):
    call, kernels = op_calls(dtype)[case]
    with record_launches() as launches:
        call()
    assert_in_report(report, launches, kernels)


def test_a_fused_vit_launches_only_reported_specializations(report):
    """ViT-B/16 fused on the Triton backend, at the representative batch: every launch of its
    forward (patch embedding, 12 x attention on the untimed split path + MLP) is a configuration inspect compiles."""
    torch.manual_seed(0)
    model = vk.models.create_model("vit_base_patch16_224", backend="triton").half().eval()
    with torch.no_grad(), record_launches() as launches:
        model(empty(B, 3, 224, 224))
    assert len(launches) >= 1 + 12 * 2
    assert_in_report(report, launches, ["_gemm_kernel", "_row_stats_kernel", "_attn_fwd_kernel"])


def test_specialization_is_triton_s_and_the_same_for_sm80_and_sm90(report):
    """The facts come from Triton's binder: 16-divisible sizes and strides are marked, 197 tokens
    is not, a unit stride is a constant; and the CUDA backend specializes alike for 80 and 90."""
    x = empty(B, N, DIM)
    with record_launches() as launches:
        vk.qkv_attention(
            x,
            empty(3 * DIM, DIM),
            empty(3 * DIM),
            num_heads=H,
            norm_weight=empty(DIM),
            norm_bias=empty(DIM),
            backend="triton",
            path="single_kernel",
        )
        vk.linear(x, empty(DIM, DIM), backend="triton")
    sig, const, attrs, _ = specialize(launches[0], 90)
    assert attrs["stride_xn"] == [["tt.divisibility", 16]] and attrs["x_ptr"] == [["tt.divisibility", 16]]
    assert attrs["N"] == [] and sig["N"] == "i32"
    sig, const, attrs, _ = specialize(launches[1], 90)
    assert sig["stride_ak"] == "constexpr" and const["stride_ak"] == 1
    for la in launches:
        assert specialize(la, 80)[:3] == specialize(la, 90)[:3]


def test_the_old_unspecialized_spec_would_be_caught(report):
    """The check can fail: the one-kernel attention at 197 tokens compiled without the launch's
    divisibility attributes (what inspect did before) is not what runs."""
    from vit_kernels.triton import qkv_attention

    spec = qkv_attention.aot_spec(torch.float16, 64, 197)
    assert spec_key(spec) in report
    assert "stride_xn" in spec.divisible_by_16 and "N" not in spec.divisible_by_16
    assert spec_key(dataclasses.replace(spec, attrs={}, divisible_by_16=())) not in report


def test_every_module_in_the_one_list_has_specs(report):
    kernels = {s.kernel for s in report.values()}
    assert {
        "gemm_linear",
        "gemm_qkv",
        "gemm_fc1",
        "gemm_patch_embed_nchw",
        "flash_attention_fwd",
        "qkv_attention_single",
        "row_stats",
        "layernorm_prologue",
    } <= kernels
    assert {
        "attention",
        "attention_tma",
        "qkv_attention",
        "layernorm",
        "gemm",
        "gemm_tma",
        "mlp",
        "patch_embed",
    } <= set(TRITON_MODULES)
    assert {"attention_bwd", "layernorm_bwd", "gemm_bwd"} <= set(TRITON_MODULES)
    assert {
        "flash_attention_bwd_dq",
        "flash_attention_bwd_dkdv",
        "layernorm_apply",
        "layernorm_bwd_dx",
        "layernorm_bwd_dwdb",
        "column_sums",
        "gemm_bwd_input",
        "gemm_bwd_weight",
        "gemm_bwd_recompute",
    } <= kernels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemm_tma_launches_of_a_vit_block_are_in_the_report(report, dtype):
    """The sm_90 GEMM's launchers as a ViT block calls them (qkv bias, LayerNorm with beta, residual and
    layer scale), with each class's default config and its last candidate: every launch is listed."""
    from vit_kernels.triton import gemm_tma as G

    x, x4 = empty(B, N, DIM, dtype=dtype), empty(B, N, 4 * DIM, dtype=dtype)
    ln, b, b3, b4 = (empty(n, dtype=dtype) for n in (DIM, DIM, 3 * DIM, 4 * DIM))
    w3, w, w4, w4t = (empty(*s, dtype=dtype) for s in ((3 * DIM, DIM), (DIM, DIM), (4 * DIM, DIM), (DIM, 4 * DIM)))
    for pick in (0, -1):
        with record_launches() as launches:
            G.qkv_projection_forward(
                x,
                w3,
                b3,
                num_heads=H,
                scale=HD**-0.5,
                norm_weight=ln,
                norm_bias=ln,
                config=G.configs_for(3 * DIM, DIM)[pick],
            )
            G.linear_forward(x, w, b, residual=x, layer_scale=b, config=G.configs_for(DIM, DIM)[pick])
            G.dense_forward(
                x, w4, b4, norm_weight=ln, norm_bias=ln, act=G.ACT_GELU_TANH, config=G.configs_for(4 * DIM, DIM)[pick]
            )
            G.linear_forward(x4, w4t, b, residual=x, config=G.configs_for(DIM, 4 * DIM)[pick])
        gemms = [la for la in launches if _name(la) == "_gemm_tma_kernel"]
        assert len(gemms) == 4
        assert_in_report(report, gemms, ["_gemm_tma_kernel"])
        # QKV's and fc1's LayerNorm prologue (the fold and the row statistics)
        folds = [la for la in launches if _name(la) == "_ln_prologue_kernel"]
        assert len(folds) == 2
        assert_in_report(report, folds, ["_ln_prologue_kernel"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tma_attention_launches_are_in_the_report(report, dtype):
    """sm_90's TMA attention as the tuner launches it, with each of its configs (the structure configs'
    WARP_SPEC kernel included): flash_attention (without and, under autograd, with the LSE) and
    qkv_attention's split path; every launch is listed."""
    from vit_kernels import autograd
    from vit_kernels.triton import attention, attention_tma
    from vit_kernels.triton import qkv_attention as triton_qkv

    q = empty(B, H, N, HD, dtype=dtype)
    x, ln = empty(B, N, DIM, dtype=dtype), empty(DIM, dtype=dtype)
    qkv_w, qkv_b = empty(3 * DIM, DIM, dtype=dtype), empty(3 * DIM, dtype=dtype)
    for cfg in attention_tma.CONFIGS:
        with record_launches() as launches:
            attention.flash_attention_forward(q, q, q, HD**-0.5, attention_tma_config=cfg)
            autograd.flash_attention_forward(q, q, q, HD**-0.5, (("attention_tma_config", cfg),))
            triton_qkv.qkv_attention_forward(
                x,
                qkv_w,
                qkv_b,
                num_heads=H,
                scale=HD**-0.5,
                norm_weight=ln,
                norm_bias=ln,
                path="split",
                attention_tma_config=cfg,
            )
        # a WARP_SPEC config launches the warp-specialized kernel (attention_tma._attn_fwd_tma_ws_kernel)
        name = "_attn_fwd_tma_ws_kernel" if cfg[7:8] == (1,) else "_attn_fwd_tma_kernel"
        tma = [la for la in launches if _name(la) == name]
        assert len(tma) == 3
        assert_in_report(report, tma, [name])


def test_a_batch_that_is_not_a_multiple_of_16_changes_only_the_row_count_fact(report):
    """What the report does not compile, stated exactly: at batch 1 the GEMM's M = 197 is not a
    multiple of 16, and that divisibility fact is the only difference from the listed launch."""
    x1, w = empty(1, N, DIM), empty(DIM, DIM)
    with record_launches() as launches:
        vk.linear(x1, w, backend="triton")
    key = launch_key(launches[0])
    assert key not in report
    _, _, attrs, _ = specialize(launches[0])
    listed = next(s for k, s in report.items() if k[:3] == key[:3] and k[4:] == key[4:])
    assert {n for n, a in listed.attrs.items() if a != attrs.get(n)} == {"M"}


def test_every_listed_spec_was_recorded_from_a_launch(report):
    """A hand-written signature is how the report drifted from what runs: every module's
    aot_specs() must build its specs with aot.recorded_spec (or launch_spec) from its launcher."""
    hand_written = sorted({s.kernel for s in report.values() if s.attrs is None})
    assert not hand_written, (
        f"specs not recorded from a launch (use vit_kernels.triton.aot.recorded_spec): {hand_written}"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("op", ["flash_attention", "qkv_attention"])
def test_attention_stats_launches_are_in_the_report(report, op, dtype):
    """The ops with a StatsRequest at the representative ViT (class-token row, mean attention
    distance on the 14x14 grid, full weights): the flash launch keeping the LSE and each statistics
    launch are configurations inspect compiles."""
    side = int((N - 1) ** 0.5)
    request = vk.ops.StatsRequest(
        rows=(0,), grid=(side, side), patch_size=16, prefix_tokens=N - side * side, weights=True
    )
    x, ln = empty(B, N, DIM, dtype=dtype), empty(DIM, dtype=dtype)
    q = empty(B, H, N, HD, dtype=dtype)
    with record_launches() as launches:
        if op == "flash_attention":
            vk.flash_attention(q, q, q, backend="triton", stats=request)
        else:
            vk.qkv_attention(
                x,
                empty(3 * DIM, DIM, dtype=dtype),
                empty(3 * DIM, dtype=dtype),
                num_heads=H,
                norm_weight=ln,
                norm_bias=ln,
                backend="triton",
                stats=request,
            )
    names = [_name(la) for la in launches]
    assert names.count("_attn_probs_kernel") == 2 and names.count("_attn_distance_kernel") == 1, names
    assert_in_report(report, launches, ["_attn_fwd_kernel", "_attn_probs_kernel", "_attn_distance_kernel"])


# ---------------------------------------------------------------------------------------------
# The backward: every launch of a training step (Triton forward and backward kernels) is listed.

BACKWARD_KERNELS = ["_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_gemm_kernel", "_column_sums_kernel"]


def backward_calls(dtype):
    """Each op on backend="triton" with inputs that require grad, at the representative shape: its
    forward (the autograd Function's, which keeps what the backward reads) and backward launches,
    with the backward kernels each must reach."""

    def leaf(*shape):
        return empty(*shape, dtype=dtype).requires_grad_()

    x, ln, b = leaf(B, N, DIM), leaf(DIM), leaf(DIM)
    q, k, v = (leaf(B, H, N, HD) for _ in range(3))
    return {
        "flash_attention": (lambda: vk.flash_attention(q, k, v, backend="triton"), BACKWARD_KERNELS[:2]),
        "qkv_attention": (
            lambda: vk.qkv_attention(
                x, leaf(3 * DIM, DIM), leaf(3 * DIM), num_heads=H, norm_weight=ln, norm_bias=ln, backend="triton"
            ),
            [*BACKWARD_KERNELS, "_ln_apply_kernel", "_ln_bwd_dx_kernel", "_ln_bwd_dwdb_kernel"],
        ),
        "linear": (
            lambda: vk.linear(x, leaf(DIM, DIM), b, residual=x, layer_scale=leaf(DIM), backend="triton"),
            ["_gemm_kernel", "_column_sums_kernel"],
        ),
        "mlp": (
            lambda: vk.layernorm_gelu_mlp(
                x, ln, ln, leaf(4 * DIM, DIM), leaf(4 * DIM), leaf(DIM, 4 * DIM), b, residual=x, backend="triton"
            ),
            ["_gemm_kernel", "_column_sums_kernel", "_ln_apply_kernel", "_ln_bwd_dx_kernel", "_ln_bwd_dwdb_kernel"],
        ),
        "patch_embed": (
            lambda: vk.patch_embed(
                leaf(B, 3, 224, 224),
                leaf(DIM, 3, 16, 16),
                b,
                patch_size=16,
                pos_embed=leaf(1, N, DIM),
                cls_token=leaf(1, 1, DIM),
                backend="triton",
            ),
            ["_gemm_kernel", "_column_sums_kernel"],
        ),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("op", list(backward_calls(torch.float16)))
def test_every_backward_launch_is_in_the_report(report, op, dtype):
    call, kernels = backward_calls(dtype)[op]
    with record_launches() as launches:
        out = call()
        n_forward = len(launches)
        out.backward(empty(*out.shape, dtype=dtype))
    assert len(launches) > n_forward, "the backward launched no kernel"
    assert_in_report(report, launches, kernels)


def test_a_fused_vit_training_step_launches_only_reported_specializations(report):
    """ViT-B/16 fused on the Triton backend in bf16 at the representative batch, forward and backward:
    every launch (patch embedding, 12 blocks, their backward kernels) is a configuration inspect compiles."""
    torch.manual_seed(0)
    model = vk.models.create_model("vit_base_patch16_224", backend="triton").to(torch.bfloat16)
    with record_launches() as launches:
        out = model(empty(B, 3, 224, 224, dtype=torch.bfloat16))
        out.backward(empty(*out.shape, dtype=torch.bfloat16))
    names = [_name(la) for la in launches]
    assert names.count("_attn_bwd_dkdv_kernel") == 12, names
    assert_in_report(report, launches, [*BACKWARD_KERNELS, "_ln_bwd_dx_kernel"])
