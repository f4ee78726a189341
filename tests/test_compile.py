"""Fused models under PyTorch's compilers and tracers: torch.compile(fullgraph=True) with zero graph
breaks (torch._dynamo.explain), torch.fx.symbolic_trace and torchvision's create_feature_extractor,
torch.export, TorchScript (refused in one sentence; torch.jit.trace works), and the feature APIs of
timm and Hugging Face on fused models. Small configs (dim 64, depth 2, 32x32 images, 17 tokens).

Each compiled / traced result is checked against the unfused model in float64 under the tolerance
rule (baseline: the unfused model at float32), and the graph is checked to hold the vit_kernels ops
(a fused model whose parts silently ran the original modules would pass the number check alone)."""

import copy
import warnings

import pytest
import torch

import vit_kernels as vk
from vit_kernels.swap import SwapWrapper
from vit_kernels import backends
from vit_kernels.models.vit import VisionTransformer
from vit_kernels.testing import assert_close

from conftest import DEVICE

TRITON = pytest.mark.skipif(
    backends.triton_unavailable(DEVICE) is not None, reason=str(backends.triton_unavailable(DEVICE))
)
BACKENDS = ["torch", pytest.param("triton", marks=TRITON)]
FAMILIES = ["reference", "timm", "torchvision", "hf", "vit_pytorch"]
# fused ops per model: 1 patch_embed + 2 blocks x (qkv_attention, linear, layernorm_gelu_mlp)
OPS_IN_GRAPH = {"reference": 7, "timm": 7, "torchvision": 7, "hf": 7, "vit_pytorch": 6}


def build(family: str) -> torch.nn.Module:
    """The unfused model (the reference ViT with backend="reference": the oracle's code), eval mode."""
    torch.manual_seed(0)
    if family == "reference":
        return VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10, backend="reference"
        ).eval()
    if family == "timm":
        timm = pytest.importorskip("timm")
        return timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10
        ).eval()
    if family == "torchvision":
        torchvision = pytest.importorskip("torchvision")
        m = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
        ).eval()
        torch.nn.init.normal_(m.heads.head.weight, std=0.1)  # torchvision starts it at zero: logits and grads 0
        return m
    if family == "hf":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
            num_labels=10,
        )
        return transformers.ViTForImageClassification(cfg).eval()
    vit_pytorch = pytest.importorskip("vit_pytorch")
    return vit_pytorch.ViT(
        image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128
    ).eval()


def fused(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """A fused copy of ``model``."""
    m = copy.deepcopy(model)
    if isinstance(m, VisionTransformer):
        return m.set_backend(backend)
    vk.fuse(m, backend=backend)
    assert vk.fuse_report(m).fused, vk.fuse_report(m)
    return m


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def check_against_unfused(got, model, images, name):
    """``got``: the output of a fused (compiled, traced) ``model`` copy on ``images``."""
    with torch.no_grad():
        want = logits(copy.deepcopy(model).double()(images.double()))
        base = logits(model(images))
    assert_close(logits(got), want, base, name=name)


def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def vk_targets(gm: torch.fx.GraphModule):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "vit_kernels" in str(n.target)]


class Recorder:
    """A torch.compile backend that keeps each graph dynamo hands it and runs it as it is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph_without_breaks(family, backend):
    """No grad: one graph, zero breaks; the graph calls the vit_kernels custom ops (one node per
    fused call) and the compiled model matches the unfused float64 model."""
    model = build(family).to(DEVICE)
    m, x = fused(model, backend), images()
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        rec = Recorder()
        with backends.record_decisions() as calls:
            out = torch.compile(m, fullgraph=True, backend=rec)(x)
    assert len(rec.graphs) == 1
    assert len(vk_targets(rec.graphs[0])) == OPS_IN_GRAPH[family], rec.graphs[0].code
    assert len(calls) == OPS_IN_GRAPH[family] and {d.backend for d in calls} == {backend}, calls
    check_against_unfused(out, model, x, f"compiled {family} ({backend})")


class _Doubled(torch.nn.Linear):
    def forward(self, t):
        return super().forward(t) * 2


@pytest.mark.parametrize("family", ["timm", "torchvision", "hf", "vit_pytorch"])
def test_compile_fullgraph_after_a_module_is_replaced(family):
    """A fused model compiled with fullgraph=True, then a module under a fused part replaced: the
    recompiled graph holds the original modules of that part (no lock, log line or counter traced),
    matching the unfused model with the same change; fuse_report names the reason. (A forward hook
    registered after torch.compile is not seen by the compiled graph of any model, fused or not:
    dynamo does not guard on module hooks, torch._dynamo.config.skip_nnmodule_hook_guards.)"""
    model = build(family)
    if family == "torchvision":  # torchvision starts its head at zero: every logit 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    m, x = fused(model, "torch"), images()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    wrappers = [w for w in m.modules() if isinstance(w, SwapWrapper) and w.fused_ops.get("mlp")]
    name = [n for n, lin in wrappers[-1].named_modules() if type(lin) is torch.nn.Linear][-1]
    path = f"{wrappers[-1].vk_path}.{name}"
    with torch.no_grad():
        compiled(x)
        for target in (m, model):
            old = target.get_submodule(path)
            new = _Doubled(old.in_features, old.out_features)
            new.load_state_dict(old.state_dict())
            parent, _, child = path.rpartition(".")
            setattr(target.get_submodule(parent), child, new)
        got = compiled(x)
    check_against_unfused(got, model, x, f"compiled {family} after {path} was replaced")
    assert "was replaced (Linear -> _Doubled) after fuse" in str(vk.fuse_report(m))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_with_autograd_without_breaks(family, backend, monkeypatch):
    """Parameters requiring grad (training): backend torch traces the ops' torch path op by op;
    backend triton the custom ops, whose traced backward is the custom op ``<op>_backward`` (the
    Triton backward kernels; the torch path's recompute raises here). The torch.func check of eager
    calls is not asked while dynamo traces (it took every traced op for one under a transform, a graph
    break and then a TypeError). One graph, zero breaks; the compiled forward and backward against the
    unfused model in float64."""
    from vit_kernels import library

    backward_ran = []  # ops whose Triton backward kernels ran
    if backend == "triton":
        monkeypatch.setattr(library, "_recompute_vjp", None)  # calling it fails the test
        for op, fn in list(library.BACKWARDS.items()):
            monkeypatch.setitem(
                library.BACKWARDS, op, lambda ctx, g, fn=fn, op=op: backward_ran.append(op) or fn(ctx, g)
            )
    model = build(family).to(DEVICE)
    m, x = fused(model, backend), images()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with backends.record_decisions() as calls:
        out = compiled(x)
        n = len(calls)
        logits(out).square().sum().backward()
    if backend == "triton":  # the custom ops ran their Triton forward kernels (recorded)
        assert n == OPS_IN_GRAPH[family] and {d.backend for d in calls} == {"triton"}, calls
        # the backward names its backend on each call's own entry, as in eager (no entry added)
        assert len(calls) == n and {d.backward for d in calls} == {"triton"}, calls
    else:  # the torch path, traced op by op: no op ran
        assert not calls, calls
    check_against_unfused(logits(out).detach(), model, x, f"compiled {family} ({backend}) under autograd")
    assert set(backward_ran) == ({d.op for d in calls} if backend == "triton" else set())
    if backend == "triton":  # each op's last decision names the backward's backend, as in eager
        assert {vk.last_decision(op).backward for op in backward_ran} == {"triton"}
    logits(model(x)).square().sum().backward()
    m64 = copy.deepcopy(model).double()
    logits(m64(x.double())).square().sum().backward()
    for (name, p), q, q64 in zip(m.named_parameters(), model.parameters(), m64.parameters()):
        assert_close(p.grad, q64.grad, q.grad, factor=3.0, name=f"{family} ({backend}) grad {name}")


def _grads(model: torch.nn.Module) -> dict:
    return {name: p.grad for name, p in model.named_parameters()}


def _trainable(model: torch.nn.Module, which: str) -> torch.nn.Module:
    """``model`` with only some parameters requiring grad: "layernorm" (the norms' weights and biases,
    inside the fused ops), "input" (none: a saliency map)."""
    for name, p in model.named_parameters():
        p.requires_grad_(which == "layernorm" and "norm" in name)
    return model


@TRITON
@pytest.mark.parametrize("which, dynamic", [("layernorm", False), ("input", True)])
def test_compile_triton_gradients_of_some_inputs(which, dynamic):
    """Backend triton under torch.compile with gradients of only some inputs (the LayerNorm parameters
    alone; the input image alone, a saliency map), at two batch sizes (dynamic=True: the backward
    op's fake implementation on symbolic shapes; else the second batch size recompiles): the compiled
    gradients equal eager's Triton gradients and meet the float64 unfused model's under the 3x rule;
    a frozen parameter gets no gradient."""
    model = _trainable(build("reference").to(DEVICE), which)
    eager, m = _trainable(fused(model, "triton"), which), _trainable(fused(model, "triton"), which)
    m64 = copy.deepcopy(model).double()
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for batch in (2, 3):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
        xs = [x.clone().requires_grad_(which == "input") for _ in range(3)] + [
            x.double().requires_grad_(which == "input")
        ]
        for mod in (eager, m, model, m64):
            mod.zero_grad(set_to_none=True)
        for f, xi in zip((eager, compiled, model, m64), xs):
            f(xi).square().sum().backward()
        got, want, base, oracle = _grads(eager), _grads(m), _grads(model), _grads(m64)
        for name, p in m.named_parameters():
            if not p.requires_grad:
                assert got[name] is None and want[name] is None, name
                continue
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=f"batch {batch}: {name}")
            assert_close(got[name], oracle[name], base[name], factor=3.0, name=f"{which}, batch {batch}: {name}")
        if which == "input":
            torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-5)
            assert_close(xs[1].grad, xs[3].grad, xs[2].grad, factor=3.0, name=f"saliency, batch {batch}")
    assert sum(p.grad is not None for p in m.parameters()) == {"layernorm": 10, "input": 0}[which]


@TRITON
def test_compile_mixed_backends_with_autograd():
    """One model, its second block with backend torch (traced op by op), the rest triton (custom ops and
    their backward ops), compiled together under autograd: the gradients meet the float64 unfused
    model's under the 3x rule, and the Triton forward kernels ran for the triton parts only."""
    model = build("reference").to(DEVICE)
    m, x = fused(model, "triton"), images()
    for mod in m.blocks[1].modules():
        if hasattr(mod, "backend"):
            mod.backend = "torch"
    torch._dynamo.reset()
    with backends.record_decisions() as calls:
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert [d.op for d in calls] == ["patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"], calls
    assert {d.backend for d in calls} == {"triton"}, calls
    out.square().sum().backward()
    model(x).square().sum().backward()
    m64 = copy.deepcopy(model).double()
    m64(x.double()).square().sum().backward()
    for (name, p), q, q64 in zip(m.named_parameters(), model.parameters(), m64.parameters()):
        assert_close(p.grad, q64.grad, q.grad, factor=3.0, name=f"mixed backends grad {name}")


@TRITON
def test_compile_triton_with_autocast():
    """torch.autocast (bfloat16) around a compiled fused model with backend triton under autograd: the
    output's dtype and values, and the gradients (dtype and values), are eager's."""
    model = build("reference").to(DEVICE)
    eager, m, x = fused(model, "triton"), fused(model, "triton"), images()
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got, want = compiled(x), eager(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    got.float().square().sum().backward()
    want.float().square().sum().backward()
    for (name, p), q in zip(m.named_parameters(), eager.parameters()):
        assert p.grad.dtype == q.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


@TRITON
def test_compile_triton_double_backward_raises():
    """create_graph=True through a compiled backward with the Triton backward op: the second
    differentiation raises (AOT autograd's own error: the compiled backward has no backward), never a
    silent None or zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(8, 16, generator=g).to(DEVICE).requires_grad_()
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: vk.ops.linear(x, w, backend="triton"), backend="aot_eager", fullgraph=True)
    (gx,) = torch.autograd.grad(f(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.square().sum(), w, allow_unused=True)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compile_with_autograd_refuses_a_forward_only_backend(fullgraph):
    """backend="cuda" (forward-only kernels) under torch.compile with an input requiring grad raises the
    eager call's error (before: the torch path ran instead, silently); fullgraph=True: dynamo's error
    quotes it."""
    if backends.cuda_unavailable(DEVICE) is not None:
        pytest.skip(backends.cuda_unavailable(DEVICE))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(8, 16, generator=g).to(DEVICE)
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: vk.ops.linear(x, w, backend="cuda"), backend="eager", fullgraph=fullgraph)
    with pytest.raises(Exception, match="linear: backend='cuda' cannot serve this call: gradients are required"):
        f(x, w)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_inductor_reference(backend):
    """The default compiler (inductor; about a minute of C++ compilation on 2 CPU cores)."""
    model = build("reference").to(DEVICE)
    m, x = fused(model, backend), images()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m, fullgraph=True)(x)
    check_against_unfused(out, model, x, f"inductor reference ({backend})")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_reduce_overhead_cuda_graphs(backend):
    """mode="reduce-overhead" (CUDA graphs): the custom ops are captured and replayed; replays on new
    inputs (copied into the static input buffer) match the unfused model. tune="off": nothing is
    timed inside a capture (backend="triton" runs the kernels untimed anyway)."""
    model = build("reference").cuda().half()
    m = fused(model, backend)
    with torch.no_grad(), vk.tuning.mode("off"):
        compiled = torch.compile(m, mode="reduce-overhead", fullgraph=True)
        for step in range(4):  # warm-up, record, replays
            x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.half)
            out = compiled(x).clone()
            check_against_unfused(out, model, x, f"reduce-overhead step {step} ({backend})")


def _inductor_training(device):
    """The fused reference ViT with backend triton trained through torch.compile's default compiler
    (inductor) on ``device``: the forward and backward custom ops run inside the compiled graphs (the Triton
    backward kernels, not the torch path's recompute); gradients against the unfused model in float64 (3x
    rule)."""
    from vit_kernels import library

    ran = []
    real = dict(library.BACKWARDS)
    model = build("reference").to(device)
    m, x = fused(model, "triton"), images().to(device)
    torch._dynamo.reset()
    try:
        for op, fn in real.items():
            library.BACKWARDS[op] = lambda ctx, g, fn=fn, op=op: ran.append(op) or fn(ctx, g)
        logits(torch.compile(m, fullgraph=True)(x)).square().sum().backward()
    finally:
        library.BACKWARDS.update(real)
    assert set(ran) == {"patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"}, ran
    logits(model(x)).square().sum().backward()
    m64 = copy.deepcopy(model).double()
    logits(m64(x.double())).square().sum().backward()
    for (name, p), q, q64 in zip(m.named_parameters(), model.parameters(), m64.parameters()):
        assert_close(p.grad, q64.grad, q.grad, factor=3.0, name=f"inductor training grad {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's CUDA code needs a CUDA device")
def test_compile_inductor_training_with_triton_kernels():
    """Inductor training with the Triton kernels on a GPU (:func:`_inductor_training`)."""
    _inductor_training("cuda")


@pytest.mark.slow
@TRITON
def test_compile_inductor_training_with_triton_kernels_here():
    """The same on the test device (CPU: inductor's C++ around the custom ops, the kernels in Triton's
    interpreter; 20 to 40 s on 2 CPU cores)."""
    _inductor_training(DEVICE)


# ----------------------------------------------------------------------------- torch.fx
FX_FAMILIES = ["reference", "timm", "torchvision"]
# timm's forward(x, attn_mask=None, is_causal=False): symbolic_trace makes every argument a graph
# input, and a block given a (symbolic) mask runs its own forward, as in eager. Fixing them to their
# defaults traces the fused path.
CONCRETE = {"timm": {"attn_mask": None, "is_causal": False}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FX_FAMILIES)
def test_fx_symbolic_trace(family, backend):
    """torch.fx.symbolic_trace: each fused call is one vit_kernels node; the GraphModule matches."""
    model = build(family).to(DEVICE)
    m, x = fused(model, backend), images()
    gm = torch.fx.symbolic_trace(m, concrete_args=CONCRETE.get(family))
    assert len(vk_targets(gm)) == OPS_IN_GRAPH[family], gm.code
    with torch.no_grad(), backends.record_decisions() as calls:
        out = gm(x)
    assert {d.backend for d in calls} == {backend}, calls
    check_against_unfused(out, model, x, f"fx {family} ({backend})")


@pytest.mark.parametrize("family", FX_FAMILIES)
def test_create_feature_extractor(family):
    """torchvision's create_feature_extractor on a fused model: the block outputs match the unfused
    model's (taken with the same extractor), and the final output too."""
    fe_lib = pytest.importorskip("torchvision.models.feature_extraction")
    model = build(family).to(DEVICE)
    m, x = fused(model, "torch"), images()
    block = {"reference": "blocks.1", "timm": "blocks.1", "torchvision": "encoder.layers.encoder_layer_1"}[family]
    head = {"reference": "head", "timm": "head", "torchvision": "heads"}[family]
    nodes = {block: "block", head: "head"}
    got_fe = fe_lib.create_feature_extractor(m, nodes, concrete_args=CONCRETE.get(family))
    assert len(vk_targets(got_fe)) == OPS_IN_GRAPH[family]
    with torch.no_grad():
        got = got_fe(x)
        want = fe_lib.create_feature_extractor(copy.deepcopy(model).double(), nodes)(x.double())
        base = fe_lib.create_feature_extractor(model, nodes)(x)
    for k in ("block", "head"):
        assert_close(got[k], want[k], base[k], name=f"{family} feature {k}")


@pytest.mark.parametrize("family", ["timm", "torchvision"])
def test_create_feature_extractor_train_graph_keeps_dropout(family):
    """create_feature_extractor traces a train-mode graph beside the eval one. With dropout p > 0 the fused
    blocks run the original modules there, as in eager (never the fused ops without dropout): with one seed
    the train graph's features are bitwise the unfused model's; the eval graph holds the fused ops (the patch
    embedding, which has no dropout, is fused in both)."""
    fe_lib = pytest.importorskip("torchvision.models.feature_extraction")
    model = build(family).to(DEVICE)
    for d in model.modules():
        if isinstance(d, torch.nn.Dropout):
            d.p = 0.3
    if family == "torchvision":
        for layer in model.encoder.layers:
            layer.self_attention.dropout = 0.3
    m, x = fused(model, "torch"), images()
    block = {"timm": "blocks.1", "torchvision": "encoder.layers.encoder_layer_1"}[family]
    got_fe = fe_lib.create_feature_extractor(m, [block], concrete_args=CONCRETE.get(family)).train()
    want_fe = fe_lib.create_feature_extractor(model, [block]).train()
    with torch.no_grad():
        torch.manual_seed(1)
        got = got_fe(x)[block]
        torch.manual_seed(1)
        want = want_fe(x)[block]
        assert torch.equal(got, want), (got - want).abs().max()
    assert vk_targets(got_fe) == ["vit_kernels.patch_embed"]  # no dropout in it: fused in both graphs
    assert len(vk_targets(got_fe.eval())) == OPS_IN_GRAPH[family]


def test_fx_refuses_dynamic_img_size_in_one_sentence():
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"^dynamic_img_size: True cannot be traced by torch.fx"):
        torch.fx.symbolic_trace(m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fx_graph_backward_runs_the_registered_backward(backend, monkeypatch):
    """An FX graph records the custom ops whatever the grad mode, so training through it runs each
    op's registered backward: gradients match the unfused model's under the 3x rule. Backend triton:
    the Triton backward kernels (the torch path's recompute raises here)."""
    from vit_kernels import library

    if backend == "triton":
        monkeypatch.setattr(library, "_recompute_vjp", None)  # calling it fails the test
    model = build("reference").to(DEVICE)
    m, x = fused(model, backend), images()
    gm = torch.fx.symbolic_trace(m)
    gm(x).square().sum().backward()
    ref = copy.deepcopy(model).double()
    ref(x.double()).square().sum().backward()
    model(x).square().sum().backward()
    got = dict(gm.named_parameters())
    assert len(got) == len(list(model.parameters()))
    for (name, r), q in zip(ref.named_parameters(), model.parameters()):
        assert_close(got[name].grad, r.grad, q.grad, factor=3.0, name=f"fx grad {name}")


# ----------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("grad", [False, True])
def test_export_reference(grad):
    """torch.export of the fused reference ViT. Without grad the program holds the vit_kernels ops;
    with grad (parameters requiring it) the torch path's aten ops, as eager autograd runs."""
    model = build("reference").to(DEVICE)
    m, x = fused(model, "torch"), images()
    with torch.set_grad_enabled(grad):
        ep = torch.export.export(m, (x,))
    ops = vk_targets(ep.graph_module)
    assert (len(ops) == OPS_IN_GRAPH["reference"]) if not grad else ops == [], ops
    with torch.no_grad():
        out = ep.module()(x)
    check_against_unfused(out, model, x, f"exported reference (grad={grad})")


@TRITON
def test_export_triton_training():
    """torch.export of the fused reference ViT with backend triton and parameters requiring grad: the
    program holds the vit_kernels ops (their registered backward the Triton kernels), and run under
    autograd its output and gradients equal eager's."""
    model = build("reference").to(DEVICE)
    m, eager, x = fused(model, "triton"), fused(model, "triton"), images()
    ep = torch.export.export(m, (x,))
    assert len(vk_targets(ep.graph_module)) == OPS_IN_GRAPH["reference"], ep.graph_module.code
    exported = ep.module()
    got, want = exported(x), eager(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    grads = {name: p.grad for name, p in exported.named_parameters()}
    assert len(grads) == len(list(eager.parameters()))
    for name, q in eager.named_parameters():
        torch.testing.assert_close(grads[name], q.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_export_and_compile_with_a_dynamic_batch():
    """torch.export with a symbolic batch dim runs other batch sizes; torch.compile's automatic
    dynamic shapes (a second batch size recompiles once, with a symbolic batch) stay one graph each."""
    model = build("reference").to(DEVICE)
    m = fused(model, "torch")
    with torch.no_grad():
        ep = torch.export.export(m, (images(),), dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
        torch._dynamo.reset()
        rec = Recorder()
        compiled = torch.compile(m, fullgraph=True, backend=rec)
        for batch in (1, 2, 3):
            x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
            check_against_unfused(ep.module()(x), model, x, f"exported, batch {batch}")
            check_against_unfused(compiled(x), model, x, f"compiled, batch {batch}")
    assert len(rec.graphs) == 2 and all(len(vk_targets(g)) == OPS_IN_GRAPH["reference"] for g in rec.graphs)


@pytest.mark.parametrize("grad", [False, True])
def test_compile_dynamic_true_checks_symbolic_floats(grad):
    """torch.compile(dynamic=True) traces the modules' eps as a symbolic float: the argument checks
    become checks of the compiled graph (no specialize_float needed), so results hold at two batch
    sizes and a negative eps set after compiling still raises, naming the argument."""
    model = build("reference").to(DEVICE)
    m = fused(model, "torch")
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    with torch.set_grad_enabled(grad):
        for batch in (2, 3):
            x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
            check_against_unfused(compiled(x).detach(), model, x, f"dynamic=True, batch {batch}")
        norms = [mod for mod in m.modules() if isinstance(getattr(mod, "eps", None), float)]
        assert norms, "the fused model has no module with a float eps"
        for mod in norms:
            mod.eps = -1e-6
        with pytest.raises(Exception, match="eps: expected a finite real number >= 0"):
            compiled(torch.randn(2, 3, 32, 32).to(DEVICE))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("family", ["reference", "timm"])
def test_torchscript_script_refused_in_one_sentence_trace_works(family):
    model = build(family).to(DEVICE)
    m, x = fused(model, "torch"), images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.* is deprecated in favour of torch.compile / export
        with pytest.raises(RuntimeError) as e:
            torch.jit.script(m)
        with torch.no_grad():
            traced = torch.jit.trace(m, x)
    msg = str(e.value)
    assert msg == f"{msg.split(':')[0]}: {vk.library.TORCHSCRIPT_REFUSED}" and msg.count(". ") == 0, msg
    assert "vit_kernels::qkv_attention" in str(traced.inlined_graph)
    with torch.no_grad():
        check_against_unfused(traced(x), model, x, f"jit.trace {family}")


# ----------------------------------------------------------------------------- feature APIs
def test_timm_feature_apis_on_a_fused_model():
    """forward_features, forward_intermediates, features_only and gradient checkpointing keep their
    results on a fused timm model (against the unfused model in float64, the rule's tolerance)."""
    timm = pytest.importorskip("timm")
    model = build("timm").to(DEVICE)
    m, ref, x = fused(model, "torch"), copy.deepcopy(model).double(), images()
    with torch.no_grad(), backends.record_decisions() as calls:
        assert_close(
            m.forward_features(x), ref.forward_features(x.double()), model.forward_features(x), name="forward_features"
        )
        got = m.forward_intermediates(x)
        want, base = ref.forward_intermediates(x.double()), model.forward_intermediates(x)
    assert len(calls) == 2 * OPS_IN_GRAPH["timm"]
    assert_close(got[0], want[0], base[0], name="forward_intermediates final")
    for i, (g, w, b) in enumerate(zip(got[1], want[1], base[1])):
        assert_close(g, w, b, name=f"forward_intermediates {i}")

    feats = (
        timm.create_model(
            "vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=2,
            features_only=True,
            out_indices=(0, 1),
        )
        .eval()
        .to(DEVICE)
    )
    f_ref = copy.deepcopy(feats).double()
    f = copy.deepcopy(feats)
    vk.fuse(f, backend="torch")
    assert len(vk.fuse_report(f).fused) == 5
    with torch.no_grad():
        for i, (g, w, b) in enumerate(zip(f(x), f_ref(x.double()), feats(x))):
            assert_close(g, w, b, name=f"features_only {i}")

    for mod in (m, ref, model):
        mod.train().set_grad_checkpointing(True)
    with backends.record_decisions() as calls:
        m(x).square().sum().backward()
    assert len(calls) >= OPS_IN_GRAPH["timm"]  # checkpointed blocks run again in backward
    ref(x.double()).square().sum().backward()
    model(x).square().sum().backward()
    for (name, p), r, q in zip(m.named_parameters(), ref.parameters(), model.parameters()):
        assert_close(p.grad, r.grad, q.grad, factor=3.0, name=f"checkpointed grad {name}")


@TRITON
def test_timm_grad_checkpointing_compiled_with_triton():
    """timm's set_grad_checkpointing on a fused model with backend triton under torch.compile (the
    checkpointed blocks' ops traced and recomputed in the backward graph): the gradients meet the
    float64 unfused model's under the 3x rule."""
    pytest.importorskip("timm")
    model = build("timm").to(DEVICE)
    m, ref, x = fused(model, "triton"), copy.deepcopy(model).double(), images()
    for mod in (m, ref, model):
        mod.train().set_grad_checkpointing(True)
    torch._dynamo.reset()
    torch.compile(m, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    ref(x.double()).square().sum().backward()
    model(x).square().sum().backward()
    for (name, p), r, q in zip(m.named_parameters(), ref.parameters(), model.parameters()):
        assert_close(p.grad, r.grad, q.grad, factor=3.0, name=f"compiled checkpointed grad {name}")


def test_hf_output_hidden_states_on_a_fused_model():
    model = build("hf").to(DEVICE)
    m, ref, x = fused(model, "torch"), copy.deepcopy(model).double(), images()
    with torch.no_grad(), backends.record_decisions() as calls:
        got = m(x, output_hidden_states=True).hidden_states
        want = ref(x.double(), output_hidden_states=True).hidden_states
        base = model(x, output_hidden_states=True).hidden_states
    assert len(calls) == OPS_IN_GRAPH["hf"] and len(got) == 3
    for i, (g, w, b) in enumerate(zip(got, want, base)):
        assert_close(g, w, b, name=f"hidden_states[{i}]")


@TRITON
def test_hf_output_attentions_under_compile():
    """Asked for attention weights under torch.compile, the fused layers run their original modules
    (the weights kernel is not a custom op a graph can hold), so the compiled call still returns them."""
    model = build("hf").to(DEVICE)
    model.set_attn_implementation("eager")
    m, ref, x = fused(model, "triton"), copy.deepcopy(model).double(), images()
    compiled = torch.compile(m, backend=Recorder())
    with torch.no_grad():
        got = compiled(x, output_attentions=True)
        want = ref(x.double(), output_attentions=True)
        base = model(x, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 2
    for i, (g, w, b) in enumerate(zip(got.attentions, want.attentions, base.attentions)):
        assert_close(g, w, b, name=f"attentions[{i}]")
    assert_close(got.logits, want.logits, base.logits, name="logits")
