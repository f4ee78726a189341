"""fuse / unfuse on vit-pytorch's ViT: the installed release and the older PreNorm release quoted in
the project's ViT notes (its classes are copied below, as published, and registered with the
adapter through EXTRA_TRANSFORMER_CLASSES / EXTRA_VIT_CLASSES)."""

import copy

import pytest
import torch
from torch import nn

import vit_kernels as vk
from swap_checks import (
    check_checkpoint_round_trip,
    check_dropout_runs_original,
    check_fuse,
    check_grad,
    check_load_state_dict,
)
from vit_kernels.swap import vit_pytorch as vp_adapter
from vit_kernels.testing import assert_close

vit_pytorch = pytest.importorskip("vit_pytorch")
from einops import rearrange, repeat  # noqa: E402
from einops.layers.torch import Rearrange  # noqa: E402

BACKENDS = ["torch", "triton"]


def make(**kw):
    cfg = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128)
    cfg.update(kw)
    return vit_pytorch.ViT(**cfg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_current_release_matches_patch_embed_left(dtype, backend):
    report = check_fuse(
        make(),
        torch.randn(3, 3, 32, 32),
        backend=backend,
        dtype=dtype,
        expect_fused=["attention", "attention", "mlp", "mlp"],
        expect_left=["pre-LayerNorm"],
    )
    assert [e.path for e in report.left] == ["to_patch_embedding"]


def test_mean_pool_and_single_head_without_out_projection():
    # heads=1, dim_head == dim: vit-pytorch drops to_out (Identity)
    model = make(heads=1, dim_head=64, pool="mean")
    assert isinstance(model.transformer.layers[0][0].to_out, nn.Identity)
    check_fuse(model, torch.randn(2, 3, 32, 32), backend="torch", expect_fused=["attention", "attention", "mlp", "mlp"])


def test_dropout_in_training_runs_the_original():
    check_dropout_runs_original(make(dropout=0.2), torch.randn(2, 3, 32, 32))


def test_gradients_and_load_state_dict():
    check_grad(make(), torch.randn(2, 3, 32, 32))
    check_load_state_dict(make(), torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_round_trip(backend):
    check_checkpoint_round_trip(make, torch.randn(3, 3, 32, 32), backend=backend)


# --- the older release (PreNorm; patch embedding = Rearrange + Linear) -------------------------


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head**-0.5
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x):
        qkv = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = map(lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads), qkv)
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        attn = self.dropout(self.attend(dots))
        out = rearrange(torch.matmul(attn, v), "b h n d -> b n (h d)")
        return self.to_out(out)


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(
                nn.ModuleList(
                    [
                        PreNorm(dim, Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                        PreNorm(dim, FeedForward(dim, mlp_dim, dropout=dropout)),
                    ]
                )
            )

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class SeedViT(nn.Module):
    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes,
        dim,
        depth,
        heads,
        mlp_dim,
        pool="cls",
        channels=3,
        dim_head=64,
        dropout=0.0,
        emb_dropout=0.0,
    ):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size * patch_size
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size), nn.Linear(patch_dim, dim)
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.to_patch_embedding(img)
        b, n, _ = x.shape
        cls_tokens = repeat(self.cls_token, "1 n d -> b n d", b=b)
        x = torch.cat((cls_tokens, x), dim=1)
        x += self.pos_embedding[:, : (n + 1)]
        x = self.dropout(x)
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))


@pytest.fixture
def seed_classes(monkeypatch):
    monkeypatch.setattr(vp_adapter, "EXTRA_TRANSFORMER_CLASSES", [Transformer])
    monkeypatch.setattr(vp_adapter, "EXTRA_VIT_CLASSES", [SeedViT])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [3, 1])
def test_prenorm_release_matches_with_patch_embed_fused(seed_classes, channels, backend):
    model = SeedViT(
        image_size=32,
        patch_size=8,
        num_classes=10,
        dim=64,
        depth=2,
        heads=2,
        dim_head=32,
        mlp_dim=128,
        channels=channels,
    )
    report = check_fuse(
        model,
        torch.randn(3, channels, 32, 32),
        backend=backend,
        expect_fused=["attention", "attention", "mlp", "mlp", "patch_embed"],
    )
    assert not report.left


@pytest.mark.parametrize("backend", BACKENDS)
def test_prenorm_release_checkpoint_round_trip(seed_classes, backend):
    """The patch embedding fused too (the Linear's weight viewed as a Conv2d weight on every call)."""
    kw = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=2, dim_head=32, mlp_dim=128)
    check_checkpoint_round_trip(lambda: SeedViT(**kw), torch.randn(3, 3, 32, 32), backend=backend)


def test_prenorm_release_grads(seed_classes):
    model = SeedViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=1, heads=2, dim_head=32, mlp_dim=128)
    check_grad(model, torch.randn(2, 3, 32, 32))


# (how the fused patch embedding's Sequential is changed, the fall-back's reason)
SEQUENTIAL_CHANGES = {
    "append": (lambda seq: seq.append(nn.LayerNorm(64)), "to_patch_embedding.2 was replaced (nothing -> LayerNorm)"),
    "insert": (lambda seq: seq.insert(1, nn.LayerNorm(192)), "to_patch_embedding.1 was replaced (Linear -> LayerNorm)"),
}


@pytest.mark.parametrize("method", sorted(SEQUENTIAL_CHANGES))
def test_prenorm_release_patch_embedding_changed_through_its_methods(seed_classes, method):
    """nn.Sequential's methods reached through the fused patch embedding (``append``, ``insert``: the
    wrapper holds no such method, the original Sequential runs it) change the module the model runs: the
    fused path, which would compute the projection alone, gives way to the original modules, saying so,
    and the logits are the unfused model's (same change) in float64 under the tolerance rule."""
    model = SeedViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=1, heads=2, dim_head=32, mlp_dim=128)
    model = model.eval()
    ref = copy.deepcopy(model)
    vk.fuse(model, backend="torch")
    change, expected = SEQUENTIAL_CHANGES[method]
    for m in (model, ref):
        assert change(m.to_patch_embedding) is m.to_patch_embedding
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model(images)
        assert_close(got, copy.deepcopy(ref).double()(images.double()), ref(images), name=f"after {method}")
    assert vk.last_decision("patch_embed").backend == "original"
    why = model.to_patch_embedding.last_fallback
    assert why.startswith(expected), why
    vk.unfuse(model)
    assert [type(m).__name__ for m in model.to_patch_embedding] == [type(m).__name__ for m in ref.to_patch_embedding]
