"""Every tensor argument of every public op, in every layout of tests/layouts.py, on every backend
(torch; triton in the interpreter; cuda in the host emulator): the float64 oracle's answer, or an
error that names the argument, raised before any kernel launches. Also wrong scalar arguments,
zero-size batches and token counts, and the fused modules' inputs.

Outputs start as NaN (torch.empty is poisoned: tests/poison.py), so an element
a kernel does not write fails the comparison.
"""

import math

import numpy
import pytest
import torch

import vit_kernels as vk
from vit_kernels import nn as vnn
from vit_kernels import reference
from vit_kernels.testing import assert_close

from conftest import DEVICE  # noqa: E402
from poison import poison_empty  # noqa: E402
from layouts import (
    B,
    C,
    DIM,
    HEADS,
    HIDDEN,
    IMG,
    LAYOUTS,
    N,
    NKV,
    REFUSED,
    SPECS,
    Launches,  # noqa: E402
    cases,
    make,
)

BACKENDS = ("torch", "triton", "cuda")
LOW_PRECISION_LAYOUTS = ("contiguous", "gaps", "expanded", "misaligned")  # fp16 in the default run
NAN = float("nan")


@pytest.fixture
def launches(monkeypatch):
    """Count Triton / CUDA launches and start every new output (torch.empty, empty_like) as NaN."""
    poison_empty(monkeypatch)
    return Launches().install(monkeypatch)


def _params(dtype_layouts, marks=()):
    out = []
    for dtype, layouts in dtype_layouts:
        for op, arg, layout in cases(layouts):
            for backend in BACKENDS:
                out.append(
                    pytest.param(
                        op,
                        arg,
                        layout,
                        backend,
                        dtype,
                        marks=marks,
                        id=f"{op}-{arg or 'all'}-{layout}-{backend}-{str(dtype)[6:]}",
                    )
                )
    return out


def check_layout(op, arg, layout, backend, dtype, launches):
    spec = SPECS[op]
    t = spec.make(dtype, DEVICE, arg, layout)
    refused = layout in REFUSED.get((op, backend), {}).get(arg, ())
    if refused:
        with pytest.raises(ValueError, match=rf"(?i)(^|\W){arg}: .*{backend}"):
            spec.run(t, backend)
        assert launches.calls == [], f"{op} launched {launches.calls} before refusing {arg}={layout}"
        return
    out = spec.run(t, backend)
    d = vk.last_decision(op)
    assert d.backend == backend, d
    if backend != "torch":
        assert launches.calls, f"{op} on {backend} launched no kernel"
        copied = arg in spec.params or (op, arg, backend) == ("patch_embed", "weight", "cuda")
        if copied and not t[arg].is_contiguous():
            assert any(note.startswith(f"{arg}: ") for note in d.copied), f"no copy of {arg} noted in {d}"
    oracle = spec.ref({k: v.double() for k, v in t.items()})
    baseline = spec.ref(t)  # the oracle run at the low precision
    assert_close(out, oracle, baseline, name=f"{op} {backend} {arg}={layout} {dtype}")


@pytest.mark.parametrize(
    "op, arg, layout, backend, dtype", _params([(torch.float32, LAYOUTS), (torch.float16, LOW_PRECISION_LAYOUTS)])
)
def test_layout(op, arg, layout, backend, dtype, launches):
    check_layout(op, arg, layout, backend, dtype, launches)


@pytest.mark.slow
@pytest.mark.parametrize(
    "op, arg, layout, backend, dtype",
    _params([(torch.float16, tuple(x for x in LAYOUTS if x not in LOW_PRECISION_LAYOUTS)), (torch.bfloat16, LAYOUTS)]),
)
def test_layout_sweep(op, arg, layout, backend, dtype, launches):
    check_layout(op, arg, layout, backend, dtype, launches)


TRITON_GRADIENT_CASES = [
    pytest.param(op, arg, layout, id=f"{op}-{arg}-{layout}")
    for op, arg, layout in cases()
    if arg is not None and layout not in REFUSED.get((op, "triton"), {}).get(arg, ())
]


@pytest.mark.parametrize("op, arg, layout", TRITON_GRADIENT_CASES)
def test_layout_gradients(op, arg, layout, launches):
    """Under autograd, backend triton (its forward and backward kernels): one argument in ``layout``,
    every argument requiring grad; every gradient (the strided, expanded or offset argument's own, of
    its shape, included) against the float64 oracle's under the 3x gradient rule, float32."""
    spec = SPECS[op]
    t = {k: v.requires_grad_() for k, v in spec.make(torch.float32, DEVICE, arg, layout).items()}
    out = spec.run(t, "triton")
    d = vk.last_decision(op)
    assert (d.backend, d.backward) == ("triton", "triton"), d
    assert launches.calls, f"{op} launched no kernel"
    grad = torch.randn(out.shape, dtype=torch.float64, device=DEVICE)
    out.backward(grad.float())
    want = {}
    for dtype in (torch.float64, torch.float32):  # the oracle, and plain PyTorch's error (the baseline)
        ts = {k: v.detach().to(dtype).requires_grad_() for k, v in t.items()}
        spec.ref(ts).backward(grad.to(dtype))
        want[dtype] = ts
    for k, v in t.items():
        assert v.grad is not None and v.grad.shape == v.shape, f"d{k}"
        assert_close(
            v.grad,
            want[torch.float64][k].grad,
            want[torch.float32][k].grad,
            factor=3.0,
            name=f"{op} d{k} ({arg}={layout})",
        )


def test_layout_cases_cover_every_argument():
    """The generator reaches every tensor argument of every op with every layout its dims allow."""
    seen = {(op, arg) for op, arg, _ in cases()}
    for op, spec in SPECS.items():
        for name in spec.tensors:
            assert (op, name) in seen
    assert set(SPECS) == {
        n for n in vk.ops.__all__ if not isinstance(getattr(vk.ops, n), type)
    }  # ops, not their option types


@pytest.mark.parametrize("layout", ["transposed", "gaps", "misaligned"])
def test_qkv_single_kernel_unreadable_x(layout, launches):
    """Triton qkv_attention: an x its single kernel cannot read is refused for path='single_kernel'
    (before any launch) and takes the split path with path=None, which reads any strides."""
    spec = SPECS["qkv_attention"]
    t = spec.make(torch.float32, DEVICE, "x", layout)
    with pytest.raises(ValueError, match=r"^path: 'single_kernel' cannot run this call: x: "):
        spec.run(t, "triton", path="single_kernel")
    assert launches.calls == []
    out = spec.run(t, "triton")
    assert vk.last_decision("qkv_attention").path == "split"
    assert launches.calls and "_qkv_attn_kernel" not in launches.calls
    assert_close(out, spec.ref({k: v.double() for k, v in t.items()}), spec.ref(t))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_copied_parameters_recorded_once_per_call(backend):
    """record_decisions holds one entry per call, carrying both the copies and the path."""
    spec = SPECS["qkv_attention"]
    t = spec.make(torch.float32, DEVICE, "qkv_bias", "gaps")
    with vk.record_decisions() as calls:
        out = spec.run(t, backend)
        spec.run(spec.make(torch.float32, DEVICE), backend)
    assert [d.op for d in calls] == ["qkv_attention"] * 2
    assert [n.split(":")[0] for n in calls[0].copied] == ["qkv_bias"] and calls[0].path == "split"
    assert calls[1].copied == () and calls[1].path == "split"
    assert_close(out, spec.ref({k: v.double() for k, v in t.items()}), spec.ref(t))


@pytest.mark.parametrize("layout", ["gaps", "expanded", "misaligned"])
@pytest.mark.parametrize("arg", list(SPECS["qkv_attention"].tensors))
def test_qkv_split_path_layouts(arg, layout, launches):
    """Triton qkv_attention, path='split' (QKV GEMM + flash kernel): every argument in odd layouts."""
    spec = SPECS["qkv_attention"]
    t = spec.make(torch.float32, DEVICE, arg, layout)
    out = spec.run(t, "triton", path="split")
    assert vk.last_decision("qkv_attention").path == "split"
    assert "_qkv_attn_kernel" not in launches.calls
    assert_close(out, spec.ref({k: v.double() for k, v in t.items()}), spec.ref(t))


def test_triton_launchers_refuse_strided_parameters(launches):
    """Called directly (bypassing vit_kernels.ops), the Triton launchers refuse a 1-D parameter they
    would read with the wrong stride, before any launch, instead of returning wrong numbers."""
    from vit_kernels.triton import gemm, mlp, qkv_attention

    t = SPECS["layernorm_gelu_mlp"].make(torch.float32, DEVICE)
    odd = make((DIM,), "expanded", torch.float32, DEVICE)
    with pytest.raises(ValueError, match=r"^layer_scale: the kernel reads it with unit stride"):
        mlp.layernorm_gelu_mlp_forward(
            t["x"],
            t["norm_weight"],
            t["norm_bias"],
            t["fc1_weight"],
            t["fc1_bias"],
            t["fc2_weight"],
            t["fc2_bias"],
            residual=t["residual"],
            layer_scale=odd,
        )
    with pytest.raises(ValueError, match=r"^bias: the kernel reads it with unit stride"):
        gemm.linear_forward(t["x"], t["fc2_weight"].t().contiguous(), make((DIM,), "gaps", torch.float32, DEVICE))
    q = SPECS["qkv_attention"].make(torch.float32, DEVICE, "norm_weight", "gaps")
    with pytest.raises(ValueError, match=r"^norm_weight: the kernel reads it with unit stride"):
        qkv_attention.qkv_attention_forward(
            q["x"],
            q["qkv_weight"],
            q["qkv_bias"],
            num_heads=HEADS,
            scale=0.25,
            norm_weight=q["norm_weight"],
            norm_bias=q["norm_bias"],
        )
    assert launches.calls == []


# ---------------------------------------------------------------------------------- scalars
BAD_SCALARS = {
    "scale": [
        ("0.5", TypeError),
        (NAN, ValueError),
        (math.inf, ValueError),
        (-0.5, ValueError),
        (0.0, ValueError),
        (True, TypeError),
        (torch.tensor(0.5), TypeError),
    ],
    "eps": [("1e-6", TypeError), (NAN, ValueError), (-1e-6, ValueError), (math.inf, ValueError), (True, TypeError)],
    "num_heads": [(2.0, TypeError), ("2", TypeError), (True, TypeError), (0, ValueError), (-2, ValueError)],
    "patch_size": [(8.0, TypeError), (True, TypeError), (0, ValueError), (-8, ValueError)],
    "approximate": [("fast", ValueError), (None, ValueError)],
    "path": [("fast", ValueError), (1, ValueError)],
    "backend": [("gpu", ValueError), (None, TypeError)],
}
SCALAR_OPS = {
    "scale": ("flash_attention", "qkv_attention"),
    "eps": ("qkv_attention", "layernorm_gelu_mlp"),
    "num_heads": ("qkv_attention",),
    "patch_size": ("patch_embed",),
    "approximate": ("layernorm_gelu_mlp",),
    "path": ("qkv_attention",),
    "backend": tuple(SPECS),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, op", [(n, op) for n, ops in SCALAR_OPS.items() for op in ops])
def test_bad_scalar_refused_before_launch(name, op, backend, launches):
    spec = SPECS[op]
    t = spec.make(torch.float32, DEVICE)
    for value, error in BAD_SCALARS[name]:
        with pytest.raises(error, match=rf"^{name}: expected"):
            if name == "backend":
                spec.run(t, value)
            else:
                spec.run(t, backend, **{name: value})
    assert launches.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_scalars_of_other_types(backend, launches):
    """An int scale, an int eps and a numpy integer num_heads are accepted and mean what they say."""
    spec = SPECS["qkv_attention"]
    t = spec.make(torch.float32, DEVICE)
    out = spec.run(t, backend, scale=1, eps=0, num_heads=numpy.int64(HEADS))

    def ref(u):
        return reference.qkv_attention(
            u["x"],
            u["qkv_weight"],
            u["qkv_bias"],
            num_heads=HEADS,
            scale=1.0,
            norm_weight=u["norm_weight"],
            norm_bias=u["norm_bias"],
            eps=0.0,
        )

    assert_close(out, ref({k: v.double() for k, v in t.items()}), ref(t))


# ------------------------------------------------------------------------------- zero sizes
ZERO = {
    "flash_attention": {
        "batch": {
            "q": (0, HEADS, N, DIM // HEADS),
            "k": (0, HEADS, NKV, DIM // HEADS),
            "v": (0, HEADS, NKV, DIM // HEADS),
        },
        "heads": {"q": (B, 0, N, DIM // HEADS), "k": (B, 0, NKV, DIM // HEADS), "v": (B, 0, NKV, DIM // HEADS)},
        "tokens": {"q": (B, HEADS, 0, DIM // HEADS)},
        "kv_tokens": {"k": (B, HEADS, 0, DIM // HEADS), "v": (B, HEADS, 0, DIM // HEADS)},
    },
    "qkv_attention": {"batch": {"x": (0, N, DIM)}, "tokens": {"x": (B, 0, DIM)}},
    "layernorm_gelu_mlp": {
        "batch": {"x": (0, N, DIM), "residual": (0, N, DIM)},
        "tokens": {"x": (B, 0, DIM), "residual": (B, 0, DIM)},
    },
    "linear": {
        "batch": {"x": (0, N, DIM), "residual": (0, N, DIM)},
        "tokens": {"x": (B, 0, DIM), "residual": (B, 0, DIM)},
    },
    "patch_embed": {"batch": {"images": (0, C, IMG, IMG)}},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, which", [(op, w) for op, z in ZERO.items() for w in z])
def test_zero_size(op, which, backend, launches):
    """batch 0, tokens 0, kv_tokens 0: the oracle's result (empty, or zeros for no keys) on every
    backend, with nothing launched."""
    spec = SPECS[op]
    t = spec.make(torch.float32, DEVICE, shapes=ZERO[op][which])
    out = spec.run(t, backend)
    oracle = spec.ref({k: v.double() for k, v in t.items()})
    assert out.shape == oracle.shape and out.dtype == torch.float32
    assert_close(out, oracle, spec.ref(t))
    assert vk.last_decision(op).backend == backend
    assert launches.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "op, arg, shape",
    [
        ("flash_attention", "q", (B, HEADS, N, 0)),
        ("qkv_attention", "x", (B, N, 0)),
        ("layernorm_gelu_mlp", "x", (B, N, 0)),
        ("linear", "x", (B, N, 0)),
        ("patch_embed", "images", (B, 0, IMG, IMG)),
    ],
)
def test_zero_feature_dim_refused(op, arg, shape, backend, launches):
    spec = SPECS[op]
    t = spec.make(torch.float32, DEVICE)
    t[arg] = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"^{arg}: expected a non-zero"):
        spec.run(t, backend)
    assert launches.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["linear", "layernorm_gelu_mlp"])
def test_leading_dims_that_do_not_merge(op, backend, launches):
    """x and residual of 4 dims whose two leading dims do not merge into one without a copy: the
    GEMM kernels (rows as (-1, T, C) in Triton, (rows, C) in CUDA) refuse them before any launch;
    torch answers as the oracle."""
    spec = SPECS[op]
    t = spec.make(torch.float32, DEVICE)
    for name in ("x", "residual"):
        t[name] = torch.randn(3, B, N, DIM).transpose(0, 1)  # (B, 3, N, DIM), strides (N*DIM, B*N*DIM, ...)
    if backend == "torch":
        assert_close(spec.run(t, backend), spec.ref({k: v.double() for k, v in t.items()}), spec.ref(t))
        return
    with pytest.raises(ValueError, match=r"x: .* without a copy"):
        spec.run(t, backend)
    assert launches.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_tensor_refused(backend, launches):
    spec = SPECS["linear"]
    t = spec.make(torch.float32, DEVICE)
    t["weight"] = t["weight"].to_sparse()
    with pytest.raises(TypeError, match=r"^weight: expected a dense \(strided\) tensor"):
        spec.run(t, backend)
    assert launches.calls == []


# ------------------------------------------------------------------------------ fused modules
MODULE_LAYOUTS = ("contiguous", "transposed", "permuted", "gaps", "expanded", "misaligned")
MODULE_REFUSED = {"cuda": {"transposed", "permuted", "gaps", "expanded"}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", MODULE_LAYOUTS)
@pytest.mark.parametrize("module", ["FusedAttention", "FusedMlp"])
def test_module_input_layouts(module, layout, backend, launches):
    m = (
        vnn.FusedAttention(DIM, HEADS, init_values=0.5)
        if module == "FusedAttention"
        else vnn.FusedMlp(DIM, HIDDEN, init_values=0.5)
    ).eval()
    x = make((B, N, DIM), layout, torch.float32, DEVICE)
    with torch.no_grad():
        if layout in MODULE_REFUSED.get(backend, ()):
            m.backend = backend
            with pytest.raises(ValueError, match=r"(?i)(x|residual): .*cuda"):
                m(x)
            assert launches.calls == []
            return
        m.backend = "reference"
        baseline = m(x)
        oracle = m.double()(x.double())
        m.float().backend = backend
        out = m(x)
    assert_close(out, oracle, baseline, name=f"{module} {backend} x={layout}")
