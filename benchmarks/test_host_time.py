"""Host time of one fused-op call: the Python work of ``backend="auto"`` with a cached tuning
choice (argument checks, dispatch, the tuner's cache look-up, launch preparation: strides,
flags, output allocation), with the Triton kernel launch itself stubbed: ``JITFunction.run``
(Triton's own binding, compile-cache look-up and driver call, a cost of Triton's that a GPU adds
per launch) does nothing, and the call into it with the launch's arguments is counted. Issue 10's
budget: under 15 us per call on the CPU. Runs anywhere (CPU tensors stand in for CUDA ones; the stubbed
kernels never run): ``pytest benchmarks/test_host_time.py --benchmark-only``.

The one tuning call per op is made with a fake timer that lets the Triton candidate win and with
the tolerance check accepting the stub's unwritten output; after it, every timed call is a cache
hit, which is what a tuned model's forward does on a GPU.

``via="function"`` calls the public op (vit_kernels.ops.*; its launch plans are the process's,
``library.FUNCTION_PLANS``); ``via="module"`` calls it as a fused module does, inside
``library.plans`` (the module's own launch plans). Either way, after the first call of a signature
the cached Decision is recorded and the recorded launches are replayed (vit_kernels.replay: the
signature key, fresh output and intermediate allocations, each launch's argument list with the new
tensors substituted); only the stubbed kernel call itself is skipped. The first call (every check,
the backend decision, the tuner's look-up) is timed by ``test_host_time_first_call``.
"""

import pytest
import torch

from vit_kernels import backends, library, ops, testing, tuning
from vit_kernels.models.registry import SIZES as VIT_SIZES

BUDGET_US = 15.0
triton_mods = pytest.importorskip("vit_kernels.triton.gemm")
from triton.runtime.jit import KernelInterface  # noqa: E402


class StubKernel(KernelInterface):
    """Stands for the @triton.jit kernel ``real``: its parameter names, and Triton's
    ``kernel[grid](*args, **kw)`` (which calls ``run(*args, grid=grid, warmup=False, **kw)``) with a
    ``run`` that does nothing."""

    def __init__(self, real):
        self.arg_names = real.arg_names

    def run(self, *args, grid, warmup, **kwargs):
        return None


@pytest.fixture(params=["gemm"])
def stubbed(monkeypatch, request):
    """The kernels stubbed, and a tuner whose Triton candidate wins: with ``request.param`` "gemm" the
    Triton path with its default tiles (every GPU); "tma" sm_90's first TMA candidate (the TMA GEMM,
    for qkv_attention with the TMA attention; LayerNorm folded into QKV's and fc1's weight)."""
    from vit_kernels.triton import attention, attention_tma, gemm, gemm_tma, layernorm, qkv_attention

    for mod, name in (
        (gemm, "_gemm_kernel"),
        (gemm_tma, "_gemm_tma_kernel"),
        (attention, "_attn_fwd_kernel"),
        (attention_tma, "_attn_fwd_tma_kernel"),
        (qkv_attention, "_qkv_attn_kernel"),
        (layernorm, "_row_stats_kernel"),
        (layernorm, "_ln_prologue_kernel"),
    ):
        monkeypatch.setattr(mod, name, StubKernel(getattr(mod, name)))
    monkeypatch.setattr(backends, "triton_unavailable", lambda device, dtypes=(): None)
    monkeypatch.setattr(
        testing, "compare", lambda out, *a, **k: testing.Comparison("stub", True, 0.0, 0.0, 0.0, 0.0, (), 0.0, 0.0)
    )

    def only_triton(op, facts, available, device_type):
        if request.param == "gemm":
            return [tuning.Candidate("torch"), tuning.Candidate("triton", "split" if op == "qkv_attention" else "")]
        (tma, *_) = [
            c
            for c in tuning.candidates(op, facts, ["triton"], "cuda")
            if "tma_config" in dict(c.config) and (op != "qkv_attention" or "attention_tma_config" in dict(c.config))
        ]
        return [tuning.Candidate("torch"), tma]

    tuner = tuning.Tuner(
        timer=lambda c, fn: 0.1 if c.backend == "triton" else 1.0,
        tunable=lambda d: None,
        device_facts=lambda d: ("stub", 90),
        path=None,
        candidate_list=only_triton,
    )
    library.clear_plans()  # plans hold the kernels they launch: none made with the stubs outlives the test
    with tuning.use_tuner(tuner):
        yield
    library.clear_plans()


def block_calls(device="cpu", dtype=torch.float16, B=2, **kw):
    """One ViT-B/16 block's fused-op calls at batch B (2: the host work does not depend on the
    batch), as closures; ``kw`` (backend, tune) passed to every op."""
    dim, _, heads, hidden = VIT_SIZES["base"]
    g = dict(dtype=dtype, device=device)
    N = 197
    r = lambda *s: torch.randn(*s, **g)  # noqa: E731
    x, o = r(B, N, dim), r(B, N, dim)
    qkv_w, qkv_b, nw, nb, pw, pb = r(3 * dim, dim), r(3 * dim), r(dim), r(dim), r(dim, dim), r(dim)
    w1, b1, w2, b2 = r(hidden, dim), r(hidden), r(dim, hidden), r(dim)
    images, cw, cb, pos, cls = r(B, 3, 224, 224), r(dim, 3, 16, 16), r(dim), r(1, N, dim), r(1, 1, dim)
    return {
        "qkv_attention": lambda: ops.qkv_attention(
            x, qkv_w, qkv_b, num_heads=heads, norm_weight=nw, norm_bias=nb, **kw
        ),
        "linear": lambda: ops.linear(o, pw, pb, residual=x, **kw),
        "layernorm_gelu_mlp": lambda: ops.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, residual=x, **kw),
        "patch_embed": lambda: ops.patch_embed(images, cw, cb, patch_size=16, pos_embed=pos, cls_token=cls, **kw),
    }


@pytest.mark.parametrize("via", ["function", "module"])
@pytest.mark.parametrize(
    "op, stubbed",
    [
        ("qkv_attention", "gemm"),
        ("linear", "gemm"),
        ("layernorm_gelu_mlp", "gemm"),
        ("patch_embed", "gemm"),
        ("qkv_attention", "tma"),
        ("linear", "tma"),
        ("layernorm_gelu_mlp", "tma"),
    ],
    indirect=["stubbed"],
)
def test_host_time_per_call(benchmark, stubbed, op, via):
    raw = block_calls()[op]
    store = library.PlanStore()

    def planned():
        with library.plans(store):
            return raw()

    call = raw if via == "function" else planned
    with torch.inference_mode():
        call()  # the one tuning call
        d = backends.last_decision(op)
        assert d.backend == "triton" and d.tuned is not None, str(d)
        benchmark.extra_info["budget_us"] = BUDGET_US
        with backends.record_decisions() as calls:
            call()
        assert [c.op for c in calls] == [op] and calls[0].backend == "triton" and calls[0].tuned is d.tuned
        plans = store if via == "module" else library.FUNCTION_PLANS
        assert len(plans) == 1 and len(store if via == "function" else library.FUNCTION_PLANS) == 0
        (plan,) = plans.values()  # the recorded launches are replayed (not the launcher on every call)
        assert plan.replay is not None, plan.replay_refused
        benchmark.pedantic(call, rounds=200, warmup_rounds=20, iterations=20)
    us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info["median_us"] = us
    print(f"{op} via {via}: {us:.1f} us per call (budget {BUDGET_US} us)")


@pytest.mark.parametrize("op", ["qkv_attention", "linear", "layernorm_gelu_mlp", "patch_embed"])
def test_host_time_first_call(benchmark, stubbed, op):
    """A call of a signature without a launch plan (the first one, or after ``clear_plans``): every
    argument check, the backend decision with the tuner's look-up (a cache hit: tuned once here),
    the launcher's host work, and recording the plan. Reported, not budgeted: a model pays it once
    per signature."""
    call = block_calls()[op]
    with torch.inference_mode():
        call()  # the one tuning call
        benchmark.pedantic(call, setup=library.clear_plans, rounds=200, warmup_rounds=5)
        assert backends.last_decision(op).backend == "triton" and len(library.FUNCTION_PLANS) == 1
    us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info["median_us"] = us
    print(f"{op} first call: {us:.1f} us")


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["qkv_attention", "linear", "layernorm_gelu_mlp", "patch_embed"])
def test_host_time_real_launches_on_gpu(benchmark, op):
    """On a CUDA GPU, nothing stubbed: one ViT-B/16 block's calls at batch 1 in bfloat16 with
    backend="triton" (its launch plans replayed), timed as a batch-1 forward meets them: the host
    time per call, Triton's own launch cost (binding, the compiled kernel's look-up, the driver call)
    included, beside the GPU time of the same call. Where the GPU time is the larger, the launches
    queue up and the host figure is at most that. Reported, not budgeted: the 15 us budget is
    vit_kernels' own Python work (:func:`test_host_time_per_call`)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    call = block_calls("cuda", torch.bfloat16, B=1, backend="triton")[op]
    with torch.inference_mode():
        for _ in range(3):  # compiles, plans
            call()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            call()
        end.record()
        torch.cuda.synchronize()
        gpu_us = start.elapsed_time(end) / 200 * 1e3
        benchmark.pedantic(call, rounds=100, warmup_rounds=5, iterations=10)
        torch.cuda.synchronize()
    us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info.update(median_us=us, gpu_us_per_call=gpu_us, device=torch.cuda.get_device_name())
    print(f"{op} on {torch.cuda.get_device_name()}: host {us:.1f} us per call, GPU {gpu_us:.1f} us per call")
