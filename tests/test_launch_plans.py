"""Launch plans of the fused modules (vit_kernels.library.plans): the first call of a signature runs
every check and the backend decision, later calls replay the launch with the cached Decision.
A replay must give the same result as a full call, record the same Decision, and never serve a
call whose signature differs (bad input still gets its clear error before any launch)."""

import copy
import pickle

import pytest
import torch

from vit_kernels import backends, library, nn as vnn, testing, reference

DIM, HEADS, HIDDEN = 32, 2, 64


def _block(backend, init_values=0.1):
    torch.manual_seed(0)
    attn = vnn.FusedAttention(DIM, HEADS, init_values=init_values, backend=backend).eval()
    mlp = vnn.FusedMlp(DIM, HIDDEN, init_values=init_values, backend=backend).eval()
    return attn, mlp


def _reference_block(attn, mlp, x, dtype, heads=HEADS):
    """The attention branch then the MLP branch, by the oracle's code at ``dtype`` (float64: the
    oracle; float32: plain PyTorch at the test's dtype, the error baseline)."""

    def p(t):
        return t.to(dtype)

    a = reference.qkv_attention(
        p(x),
        p(attn.qkv.weight),
        p(attn.qkv.bias),
        num_heads=heads,
        norm_weight=p(attn.norm.weight),
        norm_bias=p(attn.norm.bias),
        eps=attn.norm.eps,
    )
    y = reference.linear(a, p(attn.proj.weight), p(attn.proj.bias), residual=p(x), layer_scale=p(attn.ls.gamma))
    params = (mlp.norm.weight, mlp.norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    return reference.layernorm_gelu_mlp(
        y, *map(p, params), eps=mlp.norm.eps, approximate="none", residual=y, layer_scale=p(mlp.ls.gamma)
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replay_matches_the_oracle_and_records_the_decision(backend):
    attn, mlp = _block(backend)
    with torch.no_grad():
        x0 = torch.randn(2, 5, DIM)
        with backends.record_decisions() as first:
            mlp(attn(x0))
        assert len(attn._vk_plans) == 2 and len(mlp._vk_plans) == 1  # qkv_attention + linear; the MLP
        assert [d.backend for d in first] == [backend] * 3
        for _ in range(2):  # replays, fresh inputs each time
            x = torch.randn(2, 5, DIM)
            out = torch.full((2, 5, DIM), float("nan"))
            with backends.record_decisions() as calls:
                out.copy_(mlp(attn(x)))
            assert calls == first  # the same Decisions (backend, path, config), recorded per call
            assert backends.last_decision("layernorm_gelu_mlp") == first[-1]
            testing.assert_close(
                out,
                _reference_block(attn, mlp, x, torch.float64),
                _reference_block(attn, mlp, x, torch.float32),
                name=f"block {backend}",
            )
        assert len(attn._vk_plans) == 2  # no new plan for the same signature


def test_new_signature_runs_the_checks_bad_input_still_raises():
    attn, _ = _block("torch")
    with torch.no_grad():
        attn(torch.randn(2, 5, DIM))
        attn(torch.randn(3, 7, DIM))  # another shape: a second plan pair
        assert len(attn._vk_plans) == 4
        with pytest.raises(ValueError, match="qkv_weight"):
            attn(torch.randn(2, 5, DIM + 8))
        with pytest.raises(TypeError, match="dtype"):
            attn(torch.randn(2, 5, DIM, dtype=torch.float64))  # parameters are float32


def test_replaced_parameter_or_backend_is_not_served_by_an_old_plan():
    attn, _ = _block("torch")
    with torch.no_grad():
        x = torch.randn(2, 5, DIM)
        attn(x)
        attn.proj.bias = torch.nn.Parameter(torch.randn(DIM + 1))  # wrong shape: the full checks must see it
        with pytest.raises(ValueError, match="bias"):
            attn(x)
        attn.proj.bias = torch.nn.Parameter(torch.randn(DIM))
        y = attn(x)
        want = x + attn.ls.gamma * torch.nn.functional.linear(
            reference.qkv_attention(
                x,
                attn.qkv.weight,
                attn.qkv.bias,
                num_heads=HEADS,
                norm_weight=attn.norm.weight,
                norm_bias=attn.norm.bias,
                eps=attn.norm.eps,
            ),
            attn.proj.weight,
            attn.proj.bias,
        )
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)  # the new bias is read (tensors are never cached)
        attn.backend = "triton"
        with backends.record_decisions() as calls:
            attn(x)
        assert [c.backend for c in calls] == ["triton", "triton"]


def test_copied_parameters_and_grad_calls_are_not_planned():
    _, mlp = _block("triton")
    mlp.ls.gamma = torch.nn.Parameter(torch.randn(2 * DIM)[::2])  # non-contiguous: copied per call
    with torch.no_grad():
        mlp(torch.randn(2, 3, DIM))
        d = backends.last_decision("layernorm_gelu_mlp")
        assert d.copied and len(mlp._vk_plans) == 0
    mlp.backend = "torch"
    mlp(torch.randn(2, 3, DIM))  # parameters require grad: autograd, never planned
    assert len(mlp._vk_plans) == 0


def test_plans_are_not_copied_or_pickled():
    attn, _ = _block("torch")
    with torch.no_grad():
        attn(torch.randn(1, 3, DIM))
    assert len(attn._vk_plans) == 2
    assert len(copy.deepcopy(attn)._vk_plans) == 0
    assert len(pickle.loads(pickle.dumps(attn))._vk_plans) == 0


def test_tuning_mode_is_part_of_the_signature():
    from vit_kernels import tuning

    attn, _ = _block("auto")
    with torch.no_grad():
        x = torch.randn(1, 3, DIM)
        attn(x)
        with tuning.mode("off"):
            attn(x)
    assert len(attn._vk_plans) == 4
    assert all(p.decision.backend == "torch" for p in attn._vk_plans.values())  # CPU tensors: auto keeps torch
    assert isinstance(attn._vk_plans, library.PlanStore)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_block_forward_is_captured_in_a_cuda_graph_and_replays():
    """A ViT-B block (FusedAttention + FusedMlp, fp16) warmed up once (its launch plans made), then
    captured: the capture replays the plans (no new plan, no host sync: a sync inside a capture
    raises) and the graph's replay on new input matches the float64 oracle."""
    backend = "triton"
    dim, heads, hidden = 768, 12, 3072
    torch.manual_seed(0)
    attn = vnn.FusedAttention(dim, heads, init_values=0.1, backend=backend).cuda().half().eval()
    mlp = vnn.FusedMlp(dim, hidden, init_values=0.1, backend=backend).cuda().half().eval()
    static_in = torch.randn(2, 197, dim, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs asks: compiles, makes the plans
                mlp(attn(static_in))
        torch.cuda.current_stream().wait_stream(s)
        plans = (dict(attn._vk_plans), dict(mlp._vk_plans))
        assert len(plans[0]) == 2 and len(plans[1]) == 1
        graph = torch.cuda.CUDAGraph()
        with backends.record_decisions() as calls, torch.cuda.graph(graph):
            static_out = mlp(attn(static_in))
        assert (dict(attn._vk_plans), dict(mlp._vk_plans)) == plans  # captured from the plans
        assert [d.backend for d in calls] == [backend] * 3
        new = torch.randn_like(static_in)
        static_in.copy_(new)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
    oracle = _reference_block(attn, mlp, new, torch.float64, heads)
    baseline = _reference_block(attn, mlp, new, torch.float16, heads)
    testing.assert_close(static_out, oracle, baseline, name=f"graph replay {backend}")
