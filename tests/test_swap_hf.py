"""fuse / unfuse on Hugging Face transformers ViT.

The installed transformers (5.x) is tested on ViTModel and ViTForImageClassification built from a
small ViTConfig (nothing is downloaded). The 4.x module layout (encoder.layer[i] with
attention.attention.query/key/value, attention.output.dense, intermediate.dense, output.dense)
cannot be installed beside 5.x in this venv, so it is tested on a hand-built module tree whose
classes copy the structure and forward of transformers 4.57.6's ViTSelfAttention, ViTSelfOutput,
ViTAttention, ViTIntermediate, ViTOutput and ViTLayer (eager attention, no head mask), registered
with the adapter through ``vit_kernels.swap.hf.EXTRA_LAYER_CLASSES``.
"""

import copy

import pytest
import torch
from torch import nn

import vit_kernels as vk
from swap_checks import check_checkpoint_round_trip, check_fuse, check_grad, check_load_state_dict
from vit_kernels.testing import assert_close
from vit_kernels.swap import hf as hf_adapter

transformers = pytest.importorskip("transformers")
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402

BACKENDS = ["torch", "triton"]
ALL = ["attention", "attention", "mlp", "mlp", "patch_embed"]


def config(**kw):
    cfg = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    cfg.update(kw)
    return ViTConfig(**cfg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["classifier", "model"])
def test_vit_matches(cls, backend):
    model = ViTForImageClassification(config()) if cls == "classifier" else ViTModel(config())
    check_fuse(model, torch.randn(3, 3, 32, 32), backend=backend, expect_fused=ALL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_no_qkv_bias_tanh_gelu(dtype, backend):
    model = ViTForImageClassification(config(qkv_bias=False, hidden_act="gelu_pytorch_tanh"))
    check_fuse(model, torch.randn(2, 3, 32, 32), backend=backend, dtype=dtype, expect_fused=ALL)


def test_head_dim_80_and_eager_attention():
    model = ViTForImageClassification(
        config(hidden_size=160, intermediate_size=320, num_hidden_layers=1, attn_implementation="eager")
    )
    check_fuse(model, torch.randn(2, 3, 32, 32), backend="torch", expect_fused=["attention", "mlp", "patch_embed"])


def test_non_gelu_activation_is_left():
    model = ViTForImageClassification(config(hidden_act="relu"))
    check_fuse(
        model,
        torch.randn(2, 3, 32, 32),
        backend="torch",
        expect_fused=["attention", "attention", "patch_embed"],
        expect_left=["not GELU"],
    )


@pytest.mark.parametrize("write", ["in place", "through .data"])
def test_qkv_concatenation_follows_parameter_writes(write):
    """[Wq; Wk; Wv] is concatenated on every call: an in-place write to k/v, one through ``.data`` too (a
    DINO teacher's EMA update, PEFT's merge: no version bump), shows in the next call."""
    model = ViTForImageClassification(config()).eval()
    vk.fuse(model, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    layer = model.vit.layers[0]
    with torch.no_grad():
        before = model(x).logits
        for name in ("k_proj", "v_proj"):
            w = getattr(layer.attention, name).weight
            version = w._version
            (w if write == "in place" else w.data).mul_(-3.0)
            assert (w._version == version) == (write == "through .data")
        w2, _ = layer.qkv_weights()
        torch.testing.assert_close(w2[64:128], layer.attention.k_proj.weight, rtol=0, atol=0)
        got = model(x).logits
        want = vk.unfuse(copy.deepcopy(model))(x).logits
    assert (want - before).abs().max() > 1e-3  # the write changed the result
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the stored parameters are unchanged in kind: no qkv parameter appeared
    assert not any("qkv" in k for k in model.state_dict())


def test_output_hidden_states_and_attentions():
    model = ViTForImageClassification(config(attn_implementation="eager")).eval()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="torch")  # before any capture hook was installed: they come lazily
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model(x, output_hidden_states=True, output_attentions=True)
        want = ref(x, output_hidden_states=True, output_attentions=True)
        got2 = model(x, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    assert len(got.attentions) == len(want.attentions) == 2
    for g, w in zip(got.hidden_states + got.attentions, want.hidden_states + want.attentions):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert len(got2.hidden_states) == 3
    for g, w in zip(got2.hidden_states, want.hidden_states):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_output_attentions_served_fused(backend):
    """output_attentions under fuse(): the fused layer's qkv_attention returns P = exp(S - LSE) from the
    kernel's statistics (triton: the interpreter, cuda: the emulator; torch: the full softmax), equal
    to HF's eager attention weights in float64 under the tolerance rule; the report and last_decision
    say it ran fused; a call asking for none takes the fast path."""
    model = ViTModel(config(attn_implementation="eager")).eval()
    oracle, base = copy.deepcopy(model).double(), copy.deepcopy(model)
    vk.fuse(model, backend=backend)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vk.record_decisions() as decisions:
        got = model(x, output_attentions=True)
        assert vk.last_decision("qkv_attention").backend == backend
        plain = model(x)
        want = oracle(x.double(), output_attentions=True)
        eager = base(x, output_attentions=True)
    stats_path = "torch+stats" if backend == "torch" else "split+stats"
    paths = [(d.backend, d.path) for d in decisions if d.op == "qkv_attention"]
    assert paths[:2] == [(backend, stats_path)] * 2 and all(b == backend and "stats" not in p for b, p in paths[2:])
    assert len(got.attentions) == len(want.attentions) == 2 and plain.attentions is None
    for i, (a, a64, a32) in enumerate(zip(got.attentions, want.attentions, eager.attentions)):
        assert a.shape == (2, 2, 17, 17)
        assert_close(a, a64, a32, name=f"attentions[{i}]")
    for out in (got, plain):
        assert_close(out.last_hidden_state, want.last_hidden_state, eager.last_hidden_state, name="last_hidden_state")
    report = str(vk.fuse_report(model))
    assert "served fused 1 time(s)" in report and "ran the original" not in report, report


def test_output_attentions_config_and_sdpa_models():
    """config.output_attentions asks for them too; an SDPA model (whose own attention returns no weights)
    gets them from the fused layer as well."""
    for cfg in (config(output_attentions=True, attn_implementation="eager"), config(attn_implementation="sdpa")):
        model = ViTModel(cfg).eval()
        oracle = copy.deepcopy(model).double()
        oracle.set_attn_implementation("eager")
        vk.fuse(model, backend="triton")
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            got = model(x, output_attentions=True)
            want = oracle(x.double(), output_attentions=True)
        assert len(got.attentions) == 2, cfg._attn_implementation
        for i, (a, a64) in enumerate(zip(got.attentions, want.attentions)):
            assert_close(a, a64, name=f"attentions[{i}] ({cfg._attn_implementation})")


def test_output_attentions_inside_a_statistics_recording():
    """A model whose config asks for attention weights, run inside attention_stats.recording (as
    vit_kernels.analysis runs it): the fused layers serve both, the recording gets what it asked for
    (the class-token row and the mean attention distance), the output the full weights."""
    from vit_kernels import reference
    from vit_kernels.ops.attention_stats import StatsRequest, recording

    model = ViTModel(config(attn_implementation="eager", output_attentions=True)).eval()
    oracle = copy.deepcopy(model).double()
    vk.fuse(model, backend="triton")
    x = torch.randn(2, 3, 32, 32)
    request = StatsRequest(rows=(0,), grid=(4, 4), patch_size=8, prefix_tokens=1)
    with torch.no_grad(), recording(request) as records:
        got = model(x)
    with torch.no_grad():
        want = oracle(x.double())
    assert len(records) == len(got.attentions) == 2
    d = reference.patch_distances((4, 4), 8, torch.float64, x.device)
    for i, (r, a, p) in enumerate(zip(records, got.attentions, want.attentions)):
        assert r.weights is None
        assert_close(r.rows, p[:, :, :1], name=f"recorded rows[{i}]")
        assert_close(r.distance, (p[..., 1:, 1:] * d).sum(-1).mean(-1), name=f"recorded distance[{i}]")
        assert_close(a, p, name=f"attentions[{i}]")


def test_output_attentions_under_autograd_and_hooks_run_the_original(caplog):
    """Where the weights kernel cannot serve (autograd: it has no backward) or a hook on the attention
    module must fire, the call runs the original layer, visibly, with the original's weights."""
    model = ViTModel(config(attn_implementation="eager")).eval()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="triton")
    x = torch.randn(1, 3, 32, 32)
    got = model(x, output_attentions=True)
    want = ref(x, output_attentions=True)
    assert vk.last_decision("qkv_attention").backend == "original"
    assert "under autograd" in model.layers[1].last_fallback
    for a, w in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)
    seen = []
    model.layers[0].attention.register_forward_hook(lambda m, args, out: seen.append(out[1]))
    with torch.no_grad():
        got = model(x, output_attentions=True)
    assert len(seen) == 1 and seen[0] is got.attentions[0]
    assert "forward hooks are registered on layers.0.attention" in model.layers[0].last_fallback
    assert vk.last_decision("qkv_attention").backend == "triton"  # layers.1 still ran fused


def test_hidden_states_hooks_installed_before_fuse_fire_once():
    model = ViTModel(config()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x, output_hidden_states=True).hidden_states
        vk.fuse(model, backend="torch")
        got = model(x, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 3


def test_gradients_take_the_torch_path():
    check_grad(ViTForImageClassification(config()), torch.randn(2, 3, 32, 32))


def test_load_state_dict_after_fuse():
    check_load_state_dict(ViTForImageClassification(config()), torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_round_trip(backend):
    check_checkpoint_round_trip(lambda: ViTForImageClassification(config()), torch.randn(3, 3, 32, 32), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_pretrained_from_pretrained(backend, tmp_path):
    """save_pretrained of a fused model writes the unfused model's files (same names, same tensors);
    from_pretrained of them gives the unfused model's output, and fused, the float64 one under the rule."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = ViTForImageClassification(config()).eval()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend=backend)
    model.save_pretrained(tmp_path / "fused")
    ref.save_pretrained(tmp_path / "plain")
    got, want = (
        {k: v for f in (tmp_path / d).glob("*.safetensors") for k, v in load_file(f).items()}
        for d in ("fused", "plain")
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "fused").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        base = ref(x).logits
        assert torch.equal(loaded(x).logits, base)
        vk.fuse(loaded, backend=backend)
        out = loaded(x).logits
        want = copy.deepcopy(ref).double()(x.double()).logits
    assert vk.last_decision("qkv_attention").backend == backend
    assert_close(out, want, base, name=f"from_pretrained, fused ({backend})")


# --- the transformers 4.x layout (4.57.6), hand-built ------------------------------------------


class ViTSelfAttention4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_attention_heads = c.num_attention_heads
        self.attention_head_size = c.hidden_size // c.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.dropout_prob = c.attention_probs_dropout_prob
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(c.hidden_size, self.all_head_size, bias=c.qkv_bias)
        self.key = nn.Linear(c.hidden_size, self.all_head_size, bias=c.qkv_bias)
        self.value = nn.Linear(c.hidden_size, self.all_head_size, bias=c.qkv_bias)

    def forward(self, hidden_states, head_mask=None):
        b = hidden_states.shape[0]
        shape = b, -1, self.num_attention_heads, self.attention_head_size
        k = self.key(hidden_states).view(*shape).transpose(1, 2)
        v = self.value(hidden_states).view(*shape).transpose(1, 2)
        q = self.query(hidden_states).view(*shape).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(2, 3) * self.scaling, dim=-1)
        w = nn.functional.dropout(w, p=self.dropout_prob if self.training else 0.0, training=self.training)
        if head_mask is not None:
            w = w * head_mask
        ctx = (w @ v).transpose(1, 2).contiguous()
        return ctx.reshape(ctx.shape[:-2] + (self.all_head_size,)), w


class ViTSelfOutput4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(hidden_states))


class ViTAttention4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = ViTSelfAttention4(c)
        self.output = ViTSelfOutput4(c)

    def forward(self, hidden_states, head_mask=None):
        out, _ = self.attention(hidden_states, head_mask)
        return self.output(out, hidden_states)


class ViTIntermediate4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.intermediate_act_fn = transformers.activations.ACT2FN[c.hidden_act]

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class ViTOutput4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.dropout(self.dense(hidden_states)) + input_tensor


class ViTLayer4(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = ViTAttention4(c)
        self.intermediate = ViTIntermediate4(c)
        self.output = ViTOutput4(c)
        self.layernorm_before = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, hidden_states, head_mask=None):
        attention_output = self.attention(self.layernorm_before(hidden_states), head_mask)
        hidden_states = attention_output + hidden_states
        layer_output = self.intermediate(self.layernorm_after(hidden_states))
        return self.output(layer_output, hidden_states)


class Encoder4(nn.Module):
    """ViTEncoder's layer list and a final norm: (batch, tokens, dim) -> (batch, tokens, dim)."""

    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList([ViTLayer4(c) for _ in range(c.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, head_mask=None):
        for i, layer in enumerate(self.layer):
            x = layer(x, head_mask[i] if head_mask is not None else None)
        return self.layernorm(x)


@pytest.fixture
def layout4(monkeypatch):
    monkeypatch.setattr(hf_adapter, "EXTRA_LAYER_CLASSES", [ViTLayer4])


def _init(m):
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_4x_layout_matches(layout4, backend):
    enc = _init(Encoder4(config(qkv_bias=True)))
    report = check_fuse(
        enc, torch.randn(3, 17, 64), backend=backend, expect_fused=["attention", "attention", "mlp", "mlp"]
    )
    assert [e.path for e in report.fused] == [
        "layer.0.attention",
        "layer.0.intermediate",
        "layer.1.attention",
        "layer.1.intermediate",
    ]


def test_4x_layout_head_mask_runs_the_original(layout4):
    enc = _init(Encoder4(config())).eval()
    ref = copy.deepcopy(enc)
    vk.fuse(enc, backend="torch")
    x = torch.randn(2, 5, 64)
    mask = torch.rand(2, 2, 1, 1)  # per layer, per head
    with torch.no_grad():
        torch.testing.assert_close(enc(x, head_mask=mask), ref(x, head_mask=mask), rtol=0, atol=0)


def test_4x_layout_grads_and_load_state_dict(layout4):
    check_grad(_init(Encoder4(config())), torch.randn(2, 5, 64))
    check_load_state_dict(_init(Encoder4(config())), torch.randn(2, 5, 64))


def test_fused_model_saved_and_loaded_whole():
    """torch.save of a whole fused model (not its state_dict) and torch.load: the fused layer classes are
    made at fuse time and pickled by the layer's own class; the loaded model runs fused, with the same
    logits, and its parts see no change of structure."""
    import io

    from vit_kernels.swap import SwapWrapper
    from vit_kernels.swap.hf import FusedHFLayer

    model = ViTForImageClassification(config()).eval()
    vk.fuse(model, backend="torch")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x).logits
        got = loaded(x).logits
    assert vk.last_decision("qkv_attention").backend == "torch"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    layers = [m for m in loaded.modules() if isinstance(m, FusedHFLayer)]
    assert len(layers) == 2 and all(type(m) is type(o) for m, o in zip(layers, model.vit.layers))
    assert all(w.structure_reason() is None for w in loaded.modules() if isinstance(w, SwapWrapper))
