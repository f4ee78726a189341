"""The fused ops as torch.library custom ops (vit_kernels/library.py): opcheck over a small shape x
dtype x backend matrix, the op's output against the float64 oracle, the registered backward against
the oracle's gradients, the fake implementation's errors, and where bookkeeping runs."""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import vit_kernels as vk
from vit_kernels import backends, library, reference
from vit_kernels.testing import assert_close

from conftest import DEVICE

OPS = list(library.SCHEMAS)
# (name, x shape, dim/heads...): a ViT-shaped call and an odd one (tokens not a tile multiple)
SHAPES = {
    "vit": dict(B=2, N=17, dim=32, heads=2, hidden=64, img=16, p=4),
    "odd": dict(B=1, N=5, dim=24, heads=3, hidden=40, img=12, p=4),
}


def inputs(op, shape, dtype, backend, requires_grad=False):
    """The op's schema arguments (tensors random, never zeros), and the oracle's keyword form."""
    s = SHAPES[shape]
    g = torch.Generator().manual_seed(0)

    def r(*size, scale=1.0):
        t = (torch.randn(*size, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)
        return t.requires_grad_(requires_grad)

    B, N, dim, H = s["B"], s["N"], s["dim"], s["heads"]
    if op == "flash_attention":
        hd = dim // H
        return (r(B, H, N, hd), r(B, H, N + 3, hd), r(B, H, N + 3, hd), None, backend, None)
    if op == "qkv_attention":
        return (
            r(B, N, dim),
            r(3 * dim, dim, scale=dim**-0.5),
            r(3 * dim),
            1 + r(dim, scale=0.1),
            r(dim, scale=0.1),
            H,
            None,
            1e-6,
            None,
            backend,
            None,
        )
    if op == "layernorm_gelu_mlp":
        return (
            r(B, N, dim),
            1 + r(dim, scale=0.1),
            r(dim, scale=0.1),
            r(s["hidden"], dim, scale=dim**-0.5),
            r(s["hidden"]),
            r(dim, s["hidden"], scale=s["hidden"] ** -0.5),
            r(dim),
            r(B, N, dim),
            r(dim),
            1e-6,
            "none",
            backend,
            None,
        )
    if op == "patch_embed":
        C, p, img = 3, s["p"], s["img"]
        tokens = 1 + (img // p) ** 2
        return (
            r(B, C, img, img),
            r(dim, C, p, p, scale=(C * p * p) ** -0.5),
            r(dim),
            r(1, tokens, dim),
            r(1, 1, dim),
            p,
            None,
            None,
            backend,
            None,
        )  # image_mean, image_std: float images
    if op == "linear":
        return (r(B, N, dim), r(dim, dim, scale=dim**-0.5), r(dim), r(B, N, dim), r(dim), backend, None)
    raise AssertionError(op)


def oracle(op, args):
    """reference.<op> on the schema arguments (any dtype; pass float64 copies for the oracle)."""
    if op == "flash_attention":
        q, k, v, scale = args[:4]
        return reference.flash_attention(q, k, v, scale=scale if scale is not None else q.shape[-1] ** -0.5)
    if op == "qkv_attention":
        x, w, b, nw, nb, heads, scale, eps = args[:8]
        return reference.qkv_attention(x, w, b, num_heads=heads, scale=scale, norm_weight=nw, norm_bias=nb, eps=eps)
    if op == "layernorm_gelu_mlp":
        x, nw, nb, w1, b1, w2, b2, res, ls, eps, approx = args[:11]
        return reference.layernorm_gelu_mlp(
            x, nw, nb, w1, b1, w2, b2, eps=eps, approximate=approx, residual=res, layer_scale=ls
        )
    if op == "patch_embed":
        images, w, b, pos, cls, p = args[:6]
        return reference.patch_embed(images, w, b, patch_size=p, pos_embed=pos, cls_token=cls)
    x, w, b, res, ls = args[:5]
    return reference.linear(x, w, b, residual=res, layer_scale=ls)


def as_dtype(args, dtype):
    return tuple(
        a.detach().to(dtype).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    )


TRITON = pytest.mark.skipif(
    backends.triton_unavailable(DEVICE) is not None, reason=str(backends.triton_unavailable(DEVICE))
)
# backend torch: every shape and dtype; triton (the interpreter on a CPU, slow): float32, the ViT shape
CASES = [(shape, dtype, "torch") for shape in SHAPES for dtype in (torch.float32, torch.float16)] + [
    ("vit", torch.bfloat16, "torch"),
    pytest.param("vit", torch.float32, "triton", marks=TRITON),
]


@pytest.mark.parametrize("shape, dtype, backend", CASES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, shape, dtype, backend):
    """torch.library.opcheck: schema, autograd registration, fake tensor, AOT dispatch (dynamic
    shapes), with inputs that require grad (the registered backward runs)."""
    args = inputs(op, shape, dtype, backend, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.vit_kernels, op).default, args)


@pytest.mark.parametrize(
    "dtype, backend",
    [
        (torch.float32, "torch"),
        (torch.float16, "torch"),
        (torch.bfloat16, "torch"),
        pytest.param(torch.float32, "triton", marks=TRITON),
        pytest.param(torch.bfloat16, "triton", marks=TRITON),
    ],
)
@pytest.mark.parametrize("op", OPS)
def test_custom_op_output_and_backward_against_oracle(op, dtype, backend, monkeypatch):
    """The op itself (not the public function) under the tolerance rule; its registered backward
    against the oracle's gradients under the 3x rule. Backend triton: the backward runs the Triton
    backward kernels (the torch path's recompute raises here)."""
    if backend == "triton":

        def no_recompute(*a):
            raise AssertionError("backend='triton': the registered backward recomputed the torch path")

        monkeypatch.setattr(library, "_recompute_vjp", no_recompute)
    args = inputs(op, "vit", dtype, backend, requires_grad=True)
    out = getattr(torch.ops.vit_kernels, op)(*args)
    assert out.is_contiguous()
    ref_args, base_args = as_dtype(args, torch.float64), as_dtype(args, dtype)
    ref, base = oracle(op, ref_args), oracle(op, base_args)
    assert_close(out, ref, base, name=f"{op} out")
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    got = torch.autograd.grad(out, [args[i] for i in tensors], grad.to(dtype))
    want = torch.autograd.grad(ref, [ref_args[i] for i in tensors], grad)
    plain = torch.autograd.grad(base, [base_args[i] for i in tensors], grad.to(dtype))
    for i, g, w, p in zip(tensors, got, want, plain):
        assert_close(g, w, p, factor=3.0, name=f"{op} grad of argument {i}")


@TRITON
@pytest.mark.parametrize("op", OPS)
def test_backward_custom_op(op):
    """The Triton backward as a custom op, ``<op>_backward`` (the node a traced backward holds:
    torch.compile's AOT autograd): opcheck (schema, fake tensor, AOT dispatch), and its gradients
    equal those of the eager Triton backward (the same kernels), and those of a dense grad for a grad of
    stride 0, offset or permuted (AOT passes ``out.sum()``'s expanded one as it is); bad flags refused by
    name."""
    n = library.N_TENSORS[op]
    args = inputs(op, "vit", torch.float32, "triton", requires_grad=True)
    out = getattr(torch.ops.vit_kernels, op)(*args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    present = [i for i in range(n) if args[i] is not None]
    eager = torch.autograd.grad(out, [args[i] for i in present], grad)
    saved = [None if t is None else t.detach() for t in args[:n]]
    needs = [t is not None for t in saved]
    backward = getattr(torch.ops.vit_kernels, op + "_backward")
    got = backward(grad, saved, *args[n:], needs)
    assert len(got) == len(present)
    for i, g, e in zip(present, got, eager):
        assert g.is_contiguous() and g.shape == saved[i].shape, i
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"{op}_backward: gradient of argument {i}")
    torch.library.opcheck(backward.default, (grad, saved, *args[n:], needs))
    # grads as AOT autograd may pass them: of stride 0 (loss = out.sum(): an expanded one), offset, permuted
    row = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(5)).to(DEVICE)
    flat = torch.randn(out.numel() + 1, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    permuted = grad.permute(*reversed(range(grad.dim()))).contiguous().permute(*reversed(range(grad.dim())))
    for name, g in (("expanded", row.expand(out.shape)), ("offset", flat[1:].view(out.shape)), ("permuted", permuted)):
        assert not g.is_contiguous() or g.storage_offset() == 1, name
        for i, got_g, want_g in zip(
            present, backward(g, saved, *args[n:], needs), backward(g.contiguous(), saved, *args[n:], needs)
        ):
            torch.testing.assert_close(
                got_g, want_g, rtol=1e-6, atol=1e-6, msg=f"{op}_backward, {name} grad: argument {i}"
            )
    with pytest.raises(ValueError, match=r"^saved, needs: expected"):
        backward(grad, saved, *args[n:], needs[:-1])
    with pytest.raises(ValueError, match=r"^backend: expected 'triton'"):
        backward(grad, saved, *args[n:-2], "torch", None, needs)


@TRITON
@pytest.mark.parametrize("needs", ["all", "input", "params"])
@pytest.mark.parametrize("op", OPS)
def test_backward_custom_op_flops(op, needs):
    """FlopCounterMode over the backward of the custom op with backend triton (under the mode the
    backward runs as the custom op ``<op>_backward``, whose FLOP formula it counts): what torch counts
    for the plain path's backward. GEMM ops: the oracle's backward (its matmuls and convolution as aten
    ops), as many products as the gradients asked need (every tensor; the activation input only, a frozen
    model; the parameters only, a first layer). Attention: torch's own count of SDPA's fused backward
    (torch.utils.flop_counter.sdpa_backward_flop_count: the scores recomputed, dV, dP, dQ, dK), plus for
    qkv_attention the oracle's LayerNorm + projection backward."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count

    args = inputs(op, "vit", torch.float32, "triton")
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    wrt = {"all": tensors, "input": tensors[:1], "params": tensors[1:]}[needs]

    def leaves():
        return tuple(a.detach().requires_grad_(i in wrt) if i in tensors else a for i, a in enumerate(args))

    out = getattr(torch.ops.vit_kernels, op)(*leaves())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with FlopCounterMode(display=False) as counted:
        out.backward(grad)
    if op == "flash_attention":
        q, k, v = args[:3]
        want = sdpa_backward_flop_count(out.shape, q.shape, k.shape, v.shape)
    else:
        ref_args = leaves()
        if op == "qkv_attention":  # the projection through the oracle; attention's backward as torch counts SDPA's
            x, w, b, nw, nb, heads = ref_args[:6]
            y = torch.nn.functional.linear(reference.layer_norm(x, nw, nb, 1e-6), w, b)
            B, N, _ = x.shape
            q = (B, heads, N, w.shape[0] // 3 // heads)
            attention = sdpa_backward_flop_count(q, q, q, q)
            grad, ref_out = torch.randn(y.shape), y
        else:
            attention, ref_out = 0, oracle(op, ref_args)
        with FlopCounterMode(display=False) as torch_count:
            ref_out.backward(grad)
        want = torch_count.get_total_flops() + attention
    assert counted.get_total_flops() == want > 0, (counted.get_flop_counts(), want)


# op -> its parameter arguments that the dispatch copies to contiguous (checks.contiguous_params)
STRIDED_PARAMS = {
    "qkv_attention": (2, 3, 4),
    "layernorm_gelu_mlp": (1, 2, 4, 6, 8),
    "patch_embed": (2, 3, 4),
    "linear": (2, 4),
}


@TRITON
@pytest.mark.parametrize("op", list(STRIDED_PARAMS))
def test_registered_backward_of_strided_params(op):
    """Parameters of other strides (``layer_scale[::2]``, a slice of a packed bias): the dispatch copies
    them to contiguous for the forward kernels; the registered Triton backward, eager (the custom op
    itself, as an FX graph runs it; each parameter strided alone) and traced (torch.compile: the
    ``<op>_backward`` node; all strided), reads the same copies. Its gradients equal the public
    function's eager ones (the same kernels on the copies). Before: the layer scale was read with unit
    stride (torch.compile of ``linear`` with ``layer_scale[::2]``: input and weight gradients off by 6
    and 54, silently), a strided bias or LayerNorm weight raised."""
    n = library.N_TENSORS[op]
    args = inputs(op, "vit", torch.float32, "triton", requires_grad=True)
    present = [i for i in range(n) if args[i] is not None]
    leaves = [args[i] for i in present]
    out = public_call(op, "triton")(args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = torch.autograd.grad(out, leaves, grad)

    def with_strided(a, which):  # the same values, the last dim's stride 2 on the parameters ``which``
        return [t.repeat_interleave(2, -1)[..., ::2] if i in which and t is not None else t for i, t in enumerate(a)]

    strided = STRIDED_PARAMS[op]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: public_call(op, "triton")(with_strided(a, strided)), backend="aot_eager")
    runs = [(f"argument {j} strided, eager custom op", getattr(torch.ops.vit_kernels, op), j) for j in strided]
    for name, call, which in runs + [("all strided, compiled", compiled, ())]:
        out = call(*with_strided(args, (which,)))
        for i, g, w in zip(present, torch.autograd.grad(out, leaves, grad), want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{op} ({name}): gradient of argument {i}")


@TRITON
def test_triton_backward_of_uint8_images(monkeypatch):
    """patch_embed on uint8 images with backend triton: the registered backward's weight, bias,
    pos_embed and class-token gradients (Triton kernels, pixels normalized as the forward did)
    against the oracle's on the normalized images, under the 3x rule."""
    monkeypatch.setattr(library, "_recompute_vjp", None)  # the torch path's recompute would fail to run
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8).to(DEVICE)
    mean, std = [0.5, 0.4, 0.45], [0.2, 0.25, 0.3]
    params = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((16, 3, 4, 4), (16,), (1, 5, 16), (1, 1, 16))]
    got = [p.to(DEVICE, torch.float32).requires_grad_() for p in params]
    out = torch.ops.vit_kernels.patch_embed(images, *got, 4, mean, std, "triton", None)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    out.backward(grad.float())
    norm = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)

    def oracle_grads(dtype):
        ps = [p.detach().to(dtype).requires_grad_() for p in params]
        out = reference.patch_embed(norm.to(dtype), ps[0], ps[1], patch_size=4, pos_embed=ps[2], cls_token=ps[3])
        return torch.autograd.grad(out, ps, grad.to(dtype))

    want, base = oracle_grads(torch.float64), oracle_grads(torch.float32)
    for name, t, w, b in zip(("weight", "bias", "pos_embed", "cls_token"), got, want, base):
        assert_close(t.grad, w, b, factor=3.0, name=f"uint8 patch_embed grad of {name}")


def test_schemas_name_every_op():
    """One custom op per fused op in vit_kernels/ops, under the vit_kernels namespace."""
    assert set(OPS) == {"flash_attention", "qkv_attention", "layernorm_gelu_mlp", "patch_embed", "linear"}
    for op in OPS:
        schema = str(getattr(torch.ops.vit_kernels, op).default._schema)
        assert schema.startswith(f"vit_kernels::{op}(") and "str backend" in schema, schema


def public_call(op, backend="auto"):
    """The public function of ``op`` as a function of :func:`inputs`' schema arguments."""
    fn = getattr(vk.ops, op)
    return {
        "flash_attention": lambda a: fn(a[0], a[1], a[2], backend=backend),
        "qkv_attention": lambda a: fn(
            a[0], a[1], a[2], num_heads=a[5], norm_weight=a[3], norm_bias=a[4], backend=backend
        ),
        "layernorm_gelu_mlp": lambda a: fn(*a[:7], residual=a[7], layer_scale=a[8], backend=backend),
        "patch_embed": lambda a: fn(a[0], a[1], a[2], patch_size=a[5], pos_embed=a[3], cls_token=a[4], backend=backend),
        "linear": lambda a: fn(a[0], a[1], a[2], residual=a[3], layer_scale=a[4], backend=backend),
    }[op]


@pytest.mark.parametrize("op", OPS)
def test_double_backward(op):
    """A gradient penalty (d/dW of |d sum(y^2) / dx|^2, create_graph=True): backend auto gives it through
    PyTorch's autograd path, against the float64 oracle's (3x rule; the attention ops: SDPA's backward has
    no derivative, PyTorch raises, as for any SDPA user); backend triton, whose backward
    kernels have no backward, raises naming the op (before: a later "appears to not have been used in
    the graph", or None with allow_unused)."""

    def penalty_grad(call, args):
        (gx,) = torch.autograd.grad(call(args).square().sum(), args[0], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), args[1])[0]

    args = inputs(op, "vit", torch.float32, "auto", requires_grad=True)
    if op in ("flash_attention", "qkv_attention"):  # their PyTorch path is SDPA: no double backward there
        with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
            penalty_grad(public_call(op), args)
    else:
        got = penalty_grad(public_call(op), args)
        oracle_at = lambda dtype: penalty_grad(lambda a: oracle(op, a), as_dtype(args, dtype))  # noqa: E731
        assert_close(got, oracle_at(torch.float64), oracle_at(torch.float32), factor=3.0, name="second order")
    if backends.triton_unavailable(DEVICE) is None:
        triton_args = inputs(op, "vit", torch.float32, "triton", requires_grad=True)
        # the public function, and the custom op itself (an FX graph or an exported program run eagerly)
        for call in (public_call(op, "triton"), lambda a: getattr(torch.ops.vit_kernels, op)(*a)):
            with pytest.raises(RuntimeError, match=f"^vit_kernels.{op}: backend='triton' cannot give higher-order"):
                penalty_grad(call, triton_args)


@pytest.mark.parametrize("op", OPS)
def test_public_function_runs_the_custom_op(op, monkeypatch):
    """Without autograd the public function runs the op's implementation once; with an input requiring
    grad (eager) it runs the implementation too, which keeps PyTorch's autograd path for auto and says so,
    never the custom op's recomputing backward."""
    called = []
    real = library.IMPLS[op]
    monkeypatch.setitem(library.IMPLS, op, lambda *a: called.append(op) or real(*a))
    args = inputs(op, "vit", torch.float32, "torch")
    call = public_call(op)
    with torch.no_grad():
        out = call(args)
    assert called == [op] and backends.last_decision(op).backend == "torch"
    grad_args = inputs(op, "vit", torch.float32, "torch", requires_grad=True)
    calls = {"n": 0}
    monkeypatch.setitem(library.BACKWARDS, op, lambda *a: calls.update(n=calls["n"] + 1))
    out2 = call(grad_args)
    assert called == [op, op], "the autograd call did not run the op's implementation"
    assert out2.requires_grad and backends.last_decision(op).backend == "torch"
    out2.sum().backward()
    assert calls["n"] == 0, "the eager autograd call went through the custom op's backward"
    assert_close(out2, out.double(), out, name=op)


def test_explicit_backend_with_gradients():
    """An input requiring grad: backend='triton' runs the Triton forward and backward kernels (the
    decision says triton, the graph holds vit_kernels.autograd's function); backend='cuda' (forward-only
    kernels) raises naming why, before any launch."""
    args = inputs("linear", "vit", torch.float32, "triton", requires_grad=True)
    out = vk.linear(args[0], args[1], args[2], residual=args[3], layer_scale=args[4], backend="triton")
    assert backends.last_decision("linear").backend == "triton"
    assert "vit_kernels.autograd" in type(out.grad_fn).__module__ or "Linear" in type(out.grad_fn).__name__, out.grad_fn
    with pytest.raises(RuntimeError, match=r"^linear: backend='cuda' cannot serve this call: gradients are required"):
        vk.linear(args[0], args[1], args[2], residual=args[3], layer_scale=args[4], backend="cuda")


def test_fake_implementation_raises_the_eager_error():
    """Under FakeTensorMode (what torch.compile and torch.export trace with) a bad argument gets the
    same clear error an eager call gets."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(1, 2, 5, 16), torch.empty(1, 2, 5, 8)
        with pytest.raises(ValueError, match=r"^k: expected shape \(1, 2, \*, 16\)"):
            torch.ops.vit_kernels.flash_attention(q, k, k, None, "torch", None)
        out = torch.ops.vit_kernels.flash_attention(q, q, q, None, "torch", None)
        assert out.shape == (1, 2, 5, 16)


def test_bad_scalar_named_before_the_dispatcher():
    """Numbers and strings are checked by the public function before the dispatcher sees them (the
    dispatcher would turn num_heads=True into 1)."""
    args = inputs("qkv_attention", "vit", torch.float32, "torch")
    with pytest.raises(TypeError, match=r"^num_heads: expected a positive int, got bool True"):
        vk.qkv_attention(args[0], args[1], num_heads=True)
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        vk.qkv_attention(args[0], args[1], num_heads=2, backend="gpu")
    grad_args = inputs("qkv_attention", "vit", torch.float32, "torch", requires_grad=True)
    with pytest.raises(ValueError, match=r"^path: expected one of"):  # the autograd route checks them too
        vk.qkv_attention(grad_args[0], grad_args[1], num_heads=2, path="fast")
    with pytest.raises(ValueError, match=r"^tune: expected one of"):
        vk.qkv_attention(grad_args[0], grad_args[1], num_heads=2, tune="always")


def test_modes_and_tracers_see_the_custom_op():
    """A plain eager call runs the op's implementation directly; a dispatch mode (what torch.export
    and FlopCounterMode use) and torch.jit.trace see the op as one call; the results are the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, b, res, ls = inputs("linear", "vit", torch.float32, "torch")[:5]
    with torch.no_grad():
        plain = vk.linear(x, w, b, residual=res, layer_scale=ls)
        with Seen() as mode:
            seen = vk.linear(x, w, b, residual=res, layer_scale=ls)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in favour of torch.compile / export
            traced = torch.jit.trace(lambda x: vk.linear(x, w, b, residual=res, layer_scale=ls), (x,))
    assert mode.ops == ["vit_kernels.linear.default"]
    assert "vit_kernels::linear" in str(traced.graph)
    assert torch.equal(plain, seen) and torch.equal(plain, traced(x))


@pytest.mark.parametrize("op", OPS)
def test_under_torch_func(op):
    """torch.func.vmap and torch.func.grad through an op (its inputs requiring grad, as a model's
    parameters do; before, a data-pointer error from inside the checks): backend auto runs the op's
    PyTorch path, batched and differentiated by torch.func, against the oracle, and records why;
    backend triton under vmap runs the custom op per sample; under grad or jvp (any level of the
    transform stack) it raises, naming the op and what to use instead (before: jvp's tangent came back
    wrong, silently)."""
    args = inputs(op, "vit", torch.float32, "torch", requires_grad=True)
    call = public_call(op)
    stacked = torch.stack([args[0].detach(), args[0].detach() * 0.5])
    vmapped = torch.func.vmap(lambda a: call((a,) + args[1:]))(stacked)
    d = backends.last_decision(op)
    assert d.backend == "torch" and d.path == "unfused" and "torch.func" in d.reasons["fused"], d
    for i in range(2):  # the baseline: the oracle's code at float32
        per_sample = (stacked[i],) + args[1:]
        assert_close(vmapped[i], oracle(op, as_dtype(per_sample, torch.float64)), oracle(op, per_sample))
    x = args[0].detach()
    g = torch.func.grad(lambda a: call((a,) + args[1:]).sum())(x)
    grads = []
    for dtype in (torch.float64, torch.float32):
        xd = x.to(dtype).requires_grad_()
        grads += torch.autograd.grad(oracle(op, (xd,) + as_dtype(args[1:], dtype)).sum(), xd)
    assert_close(g, *grads, factor=3.0, name="grad")
    if backends.triton_unavailable(DEVICE) is None and op == "linear":
        a = args[:-2] + ("triton", None)
        out = torch.func.vmap(lambda x: torch.ops.vit_kernels.linear(x, *a[1:]))(stacked)
        per_sample = (stacked[1],) + args[1:]
        assert_close(out[1], oracle(op, as_dtype(per_sample, torch.float64)), oracle(op, per_sample))
        triton = lambda x: vk.linear(x, a[1], a[2], residual=a[3], layer_scale=a[4], backend="triton")  # noqa: E731
        refused = r"^vit_kernels.linear: backend='triton' cannot run under a torch.func transform that differentiates"
        for differentiate in (
            lambda: torch.func.grad(lambda x: triton(x).sum())(x),
            lambda: torch.func.jvp(triton, (x,), (torch.randn_like(x),)),  # before: the tangent dropped, silently
            lambda: torch.func.grad(lambda s: torch.func.vmap(triton)(s).sum())(stacked),  # grad below a vmap
        ):
            with pytest.raises(RuntimeError, match=refused):
                differentiate()


@pytest.mark.parametrize("op", OPS)
def test_under_forward_ad(op):
    """Forward-mode AD (a dual level, the first input dual): backend auto runs the op's PyTorch path and the
    output carries the tangent, against the float64 oracle's (the attention ops: PyTorch's SDPA raises
    NotImplementedError, as for any SDPA user); backend triton raises, naming the op (the
    custom op would return the primal alone: before, the tangent was dropped silently), and runs when no
    input carries a tangent."""
    args = inputs(op, "vit", torch.float32, "torch")
    call = public_call(op)
    tangent = torch.randn_like(args[0])

    def jvp(call, a):
        with torch.no_grad(), fwAD.dual_level():
            out = call((fwAD.make_dual(a[0], tangent.to(a[0].dtype)),) + tuple(a[1:]))
            return fwAD.unpack_dual(out).tangent

    if op in ("flash_attention", "qkv_attention"):  # their PyTorch path is SDPA, which has no forward-AD formula
        with pytest.raises(NotImplementedError, match="forward AD"):
            jvp(call, args)
        return
    got = jvp(call, args)
    d = backends.last_decision(op)
    assert d.backend == "torch" and d.path == "unfused" and "forward-mode AD" in d.reasons["fused"], d
    oracle_jvp = lambda a: jvp(lambda b: oracle(op, b), a)  # noqa: E731
    assert_close(got, oracle_jvp(as_dtype(args, torch.float64)), oracle_jvp(args), name="tangent")
    if backends.triton_unavailable(DEVICE) is None and op == "linear":
        x, w, b, res, ls = args[:5]
        triton = lambda a: vk.linear(a[0], w, b, residual=res, layer_scale=ls, backend="triton")  # noqa: E731
        with pytest.raises(RuntimeError, match=r"^vit_kernels.linear: backend='triton' cannot carry forward-mode AD"):
            jvp(triton, args)
        with torch.no_grad(), fwAD.dual_level():
            plain = triton(args)
        assert_close(plain, oracle(op, as_dtype(args, torch.float64)), oracle(op, args))


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (device_guard's view of a tensor off the current device)."""

    is_cuda = True

    def get_device(self):
        return 1


def test_device_guard_selects_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: an op whose tensors live on another one runs under
    torch.cuda.device(that device); on the current device, on a CPU, or while compiling, no guard."""
    current = {"index": 0}
    entered = []

    class FakeDevice:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)
            self.prev, current["index"] = current["index"], self.index

        def __exit__(self, *exc):
            current["index"] = self.prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    x = torch.Tensor._make_subclass(_OnCuda1, torch.randn(3))
    guard = library.device_guard(x)
    assert isinstance(guard, FakeDevice) and guard.index == 1
    with guard:
        assert library.device_guard(x) is None  # now the current device: no second guard
    assert entered == [1] and current["index"] == 0
    assert library.device_guard(torch.randn(3)) is None and library.device_guard(None) is None
    current["index"] = 1
    assert library.device_guard(x) is None


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_ops_on_a_device_other_than_the_current_one(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 and are right."""
    torch.cuda.set_device(0)
    g = dict(device="cuda:1", dtype=torch.float16)
    x, w, b = torch.randn(2, 197, 64, **g), torch.randn(3 * 64, 64, **g) * 0.125, torch.randn(3 * 64, **g)
    out = vk.qkv_attention(x, w, b, num_heads=2, backend=backend)
    torch.cuda.synchronize(1)
    oracle = reference.qkv_attention(x.double(), w.double(), b.double(), num_heads=2)
    assert_close(out, oracle, reference.qkv_attention(x, w, b, num_heads=2), name=f"qkv on cuda:1 ({backend})")
    assert torch.cuda.current_device() == 0


CUDA_BACKEND = pytest.mark.skipif(
    backends.cuda_unavailable(DEVICE) is not None, reason=str(backends.cuda_unavailable(DEVICE))
)


KERNEL_BACKENDS = ["auto", pytest.param("triton", marks=TRITON), pytest.param("cuda", marks=CUDA_BACKEND)]


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("op", OPS)
def test_under_autocast(op, backend):
    """Under torch.autocast the kernel backends ("auto", "triton", "cuda") run an op as a custom op
    registered with torch.library.register_autocast at the autocast dtype does: its floating tensors
    (float64 apart) cast to that dtype, the op run with autocast off; so they compute at that dtype and
    return it, whichever path ``auto`` takes, through the public function and the custom op itself.
    Backend "torch" runs its PyTorch path under autocast as PyTorch does (the unfused ops' dtypes: a
    float32 residual or position embedding keeps the result float32). (Before: the Triton and CUDA
    kernels computed in float32 and returned float32 where the torch path returned autocast's result,
    so ``auto`` on a GPU returned either, by timing.)"""
    args = inputs(op, "vit", torch.float32, backend)
    dt = torch.bfloat16
    with torch.autocast(DEVICE.type, dtype=dt):
        outs = {"function": public_call(op, backend)(args), "custom op": getattr(torch.ops.vit_kernels, op)(*args)}
    _assert_autocast_results(op, args, backend, dt, outs)
    with torch.autocast(DEVICE.type, dtype=dt):  # float64 is not lowered (as autocast leaves it)
        out = public_call(op, backend)(as_dtype(args, torch.float64)) if backend in ("torch", "auto") else None
    assert out is None or out.dtype == torch.float64


def _assert_autocast_results(op, args, backend, dt, outs):
    """Each of ``outs`` (name -> result of ``op`` on ``args`` under autocast at ``dt``) in the dtype and
    within the tolerance rule of what the rule says: backend torch, plain PyTorch under autocast; the
    others, the op on its tensors cast to ``dt``."""
    with torch.autocast(DEVICE.type, dtype=dt):
        eager = oracle(op, args)  # plain PyTorch under autocast
    cast = as_dtype(args, dt)  # what the kernel backends compute on
    base = eager if backend == "torch" else oracle(op, cast)
    want = oracle(op, as_dtype(args if backend == "torch" else cast, torch.float64))
    for name, out in outs.items():
        assert out.dtype == base.dtype, (name, out.dtype, base.dtype)
        assert_close(out, want, base, name=name)
    assert backend == "torch" or base.dtype == dt


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("op", ["qkv_attention", "flash_attention"])
def test_under_autocast_with_statistics(op, backend):
    """The attention ops' statistics path (``stats=``, which does not go through the custom op) follows
    the same rule (before: triton and cuda returned float32 there too)."""
    args = inputs(op, "vit", torch.float32, backend)
    request = vk.ops.StatsRequest()
    a = args
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        if op == "qkv_attention":
            kw = dict(num_heads=a[5], norm_weight=a[3], norm_bias=a[4], backend=backend, stats=request)
            out, stats = vk.ops.qkv_attention(a[0], a[1], a[2], **kw)
        else:
            out, stats = vk.ops.flash_attention(a[0], a[1], a[2], backend=backend, stats=request)
    assert stats is not None
    _assert_autocast_results(op, args, backend, torch.bfloat16, {"with statistics": out})


@pytest.mark.parametrize("via", ["function", "custom op"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("op", ["linear", "qkv_attention"])
def test_under_autocast_compiled_is_eager(op, backend, via):
    """torch.compile's graph of an op under autocast computes what eager computes, through the public
    function and through the custom op itself (before, backend torch: the op's node ran its PyTorch path
    with autocast off, as a compiled graph runs its nodes, and returned float32, 0.01-0.03 off eager)."""
    args = inputs(op, "vit", torch.float32, backend)
    f = public_call(op, backend) if via == "function" else lambda a: getattr(torch.ops.vit_kernels, op)(*a)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        eager = f(args)
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(args)
    assert compiled.dtype == eager.dtype
    assert torch.equal(compiled, eager)
