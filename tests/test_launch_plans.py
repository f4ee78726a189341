"""Launch plans of the fused modules (vit_kernels.library.plans): the first call of a signature runs
every check and the backend decision, later calls replay the launch with the cached Decision.
A replay must give the same result as a full call, record the same Decision, and never serve a
call whose signature differs (bad input still gets its clear error before any launch)."""

import copy
import pickle

import pytest
import torch

from vit_kernels import backends, library, nn as vnn, replay, testing, reference

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


# ------------------------------------------------------------------ replayed launches (vit_kernels.replay)
def _views(shape, dtype, layout):
    """A fresh random tensor of ``shape``: "contiguous"; "strided" (a slice of a wider last dim: the
    row stride exceeds the width); "offset" (a slice that starts one row into its buffer, 16-byte
    aligned); "misaligned" (contiguous, starting one element into its buffer)."""
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype)
    if layout == "strided":
        return torch.randn(*shape[:-1], shape[-1] + 8, dtype=dtype)[..., : shape[-1]]
    if layout == "offset":
        return torch.randn(shape[0] + 1, *shape[1:], dtype=dtype)[1:]
    assert layout == "misaligned"
    return torch.randn(torch.Size(shape).numel() + 1, dtype=dtype)[1:].view(shape)


def _schema_args(op, layout, dtype, residual_is_x=False):
    """The schema arguments of one backend="triton" call of ``op`` at small shapes, fresh random
    tensors (the first ``library.N_TENSORS[op]`` are the tensors); ``layout`` applies to x (images
    for patch_embed, q for flash_attention)."""
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    B, N = 2, 5
    if op == "linear":
        x = _views((B, N, DIM), dtype, layout)
        return (x, r(DIM, DIM), r(DIM), x if residual_is_x else r(B, N, DIM), r(DIM), "triton", None)
    if op == "layernorm_gelu_mlp":
        x = _views((B, N, DIM), dtype, layout)
        res = x if residual_is_x else r(B, N, DIM)
        return (
            x,
            r(DIM),
            r(DIM),
            r(HIDDEN, DIM),
            r(HIDDEN),
            r(DIM, HIDDEN),
            r(DIM),
            res,
            None,
            1e-6,
            "none",
            "triton",
            None,
        )
    if op == "qkv_attention":
        path = "single_kernel" if layout == "contiguous" and dtype == torch.float16 else "split"
        x = _views((B, N, DIM), dtype, layout)
        return (x, r(3 * DIM, DIM), r(3 * DIM), r(DIM), r(DIM), HEADS, None, 1e-6, path, "triton", None)
    if op == "patch_embed":
        images = _views((B, 3, 8, 8), dtype, layout)
        if layout == "strided":
            images = images.contiguous(memory_format=torch.channels_last)
        return (images, r(DIM, 3, 4, 4), r(DIM), r(1, 5, DIM), r(1, 1, DIM), 4, None, None, "triton", None)
    assert op == "flash_attention"
    qkv = r(3, B, HEADS, N, DIM // HEADS)
    q = _views((B, HEADS, N, DIM // HEADS), dtype, layout) if layout != "contiguous" else qkv[0]
    return (q, qkv[1], qkv[2], None, "triton", None)


def _normalized(launches, inputs):
    """Captured launches (aot.record_launches) as comparable rows: tensors inside an input's storage
    by address and dtype (the same input tensors go to both calls), other tensors by the order in
    which their storage first appears, their offset in it, its size and their dtype (two calls
    allocate at different addresses); numbers with their type."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    order: dict = {}
    rows = []
    for launch in launches:
        args = []
        for a in launch.args:
            if isinstance(a, torch.Tensor):
                s = a.untyped_storage()
                if s.data_ptr() in input_storages:
                    args.append(("input", a.data_ptr(), a.dtype))
                else:
                    k = order.setdefault(s.data_ptr(), len(order))
                    args.append(("new", k, a.data_ptr() - s.data_ptr(), s.nbytes(), a.dtype))
            else:
                args.append((type(a), a))
        # by parameter name: a replay passes the kernel's constexprs positionally (vit_kernels.replay)
        names = launch.fn.arg_names
        bound = dict(zip(names, args))
        bound.update((k, (type(v), v)) for k, v in launch.kwargs.items() if k in names)
        options = {k: v for k, v in launch.kwargs.items() if k not in names}
        assert len(args) <= len(names) and len(bound) == len(args) + len(launch.kwargs) - len(options)
        rows.append((launch.fn, launch.grid, bound, options))
    return rows


REPLAY_CASES = [
    ("linear", "contiguous", torch.float32),
    ("linear", "strided", torch.float32),
    ("linear", "offset", torch.float16),
    ("layernorm_gelu_mlp", "contiguous", torch.float32),
    ("layernorm_gelu_mlp", "strided", torch.float16),
    ("qkv_attention", "contiguous", torch.float32),
    ("qkv_attention", "contiguous", torch.float16),  # the single kernel
    ("qkv_attention", "offset", torch.float32),
    ("patch_embed", "contiguous", torch.float32),
    ("patch_embed", "strided", torch.float16),  # channels_last images
    ("flash_attention", "contiguous", torch.float32),  # q, k, v views into one qkv buffer
    ("linear", "misaligned", torch.float32),
]


@pytest.mark.parametrize("op,layout,dtype", REPLAY_CASES)
def test_replayed_launch_is_the_launch_the_launcher_makes(op, layout, dtype):
    """A plan's replay (new tensors of the recorded signature) launches exactly what a fresh call of
    the op's launcher launches with those tensors: the same kernels, grids, keyword arguments and
    argument lists (inputs at the same addresses, allocations of the same sizes in the same places)."""
    from vit_kernels.triton.aot import record_launches

    n = library.N_TENSORS[op]
    store = library.PlanStore()
    with torch.no_grad():
        # the plan is made inside the recording: a replay launches with the kernels' run bound then
        with record_launches() as launches, library.plans(store):
            library.run(op, _schema_args(op, layout, dtype))  # makes the plan
            (plan,) = store.values()
            assert plan.replay is not None, plan.replay_refused
            assert plan.decision.backend == "triton"
            first = len(launches)
            args = _schema_args(op, layout, dtype)  # new tensors, same signature
            library.run(op, args)
        replayed = launches[first:]
        assert len(store) == 1  # served by the plan
        with record_launches() as fresh:
            library.IMPLS[op](*args)  # the full dispatch and the launcher
    assert replayed and _normalized(replayed, args[:n]) == _normalized(fresh, args[:n])


def test_fuse_report_says_how_each_part_launches():
    """fuse_report notes per fused part how many of its call signatures replay their launches, and
    why the others do not (backend torch: only Triton launches are recorded)."""
    import vit_kernels as vk
    from vit_kernels.models.vit import VisionTransformer

    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=DIM, depth=1, num_heads=HEADS, num_classes=3).eval()
    vk.fuse(model, backend="triton")
    fused = [e for e in vk.fuse_report(model).entries if e.fused]
    assert fused and not any("launch plans" in n for e in fused for n in e.notes)  # nothing has run yet
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    fused = [e for e in vk.fuse_report(model).entries if e.fused]
    notes = {e.path: [n for n in e.notes if n.startswith("launch plans")] for e in fused}
    assert all(len(n) == 1 and " of " in n[0] and "replay" in n[0] for n in notes.values()), notes
    assert any(n[0].startswith("launch plans: 2 of 2 ") for n in notes.values()), notes  # qkv_attention + linear
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=DIM, depth=1, num_heads=HEADS, num_classes=3).eval()
    vk.fuse(model, backend="torch")
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    notes = [n for e in vk.fuse_report(model).entries if e.fused for n in e.notes if n.startswith("launch plans")]
    assert notes and all(
        n.startswith("launch plans: 0 of ") and "only Triton launches are recorded" in n for n in notes
    )


def test_a_launch_of_something_else_than_a_triton_kernel_is_not_replayed():
    """Replays bind Triton's ``run``: a recorded launch of anything else is refused with the reason."""
    from vit_kernels import replay

    class NotTriton:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    out = torch.empty(3)
    rec = replay.Recording()
    rec.launches.append((NotTriton(), (1,), (out, 3), {}))
    rec.allocs.append(out)
    assert replay.Replay.build(rec, (torch.empty(3),), out) == "a launch of NotTriton, not a Triton kernel"


def test_plan_made_while_launches_are_recorded_launches_after():
    """A plan made inside ``record_launches`` (its replay binds the swapped ``run``) records there, and
    once the block is left its replay launches the kernels: the result meets the oracle (it would
    keep the poison's NaNs if the replay only recorded)."""
    from vit_kernels.triton.aot import record_launches

    store = library.PlanStore()
    with torch.no_grad(), library.plans(store):
        with record_launches() as launches:
            library.run("linear", _schema_args("linear", "contiguous", torch.float32))
        assert launches and len(store) == 1
        args = _schema_args("linear", "contiguous", torch.float32)
        out = library.run("linear", args)
    assert len(launches) == 1 and len(store) == 1  # the second call replayed (and recorded nothing)
    _linear_oracle_check(args, out, "replay after record_launches")


def _linear_oracle_check(args, out, name):
    x, w, b, res, ls = args[:5]
    f64 = [None if t is None else t.double() for t in (x, w, b, res, ls)]
    oracle = reference.linear(*f64[:3], residual=f64[3], layer_scale=f64[4])
    baseline = reference.linear(x, w, b, residual=res, layer_scale=ls)
    testing.assert_close(out, oracle, baseline, name=name)


def test_changed_signature_plans_anew_instead_of_replaying():
    """A new stride, shape, dtype or 16-byte alignment class of an input is a new signature: a new
    plan (the full dispatch: checks, decision, launcher), never the old plan's launch."""
    store = library.PlanStore()
    calls = [
        ("contiguous", torch.float32, (2, 5)),
        ("contiguous", torch.float32, (2, 5)),  # the same signature: replayed
        ("strided", torch.float32, (2, 5)),  # new strides
        ("contiguous", torch.float32, (3, 5)),  # new shape
        ("contiguous", torch.float16, (2, 5)),  # new dtype
        ("misaligned", torch.float32, (2, 5)),  # new alignment class
    ]
    with torch.no_grad(), library.plans(store):
        for i, (layout, dtype, (B, N)) in enumerate(calls):
            args = list(_schema_args("linear", layout, dtype))
            args[3] = torch.randn(B, N, DIM, dtype=dtype)
            args[0] = _views((B, N, DIM), dtype, layout)
            out = library.run("linear", tuple(args))
            assert len(store) == max(i, 1), (i, layout, dtype, B)
            _linear_oracle_check(args, out, f"linear call {i} ({layout}, {dtype}, batch {B})")
    assert all(p.replay is not None for p in store.values())


class _Sub(torch.Tensor):
    """A tensor subclass (its calls take the custom op, never a plan)."""


class _Refusing(torch.Tensor):
    """A tensor subclass whose __torch_function__ refuses everything (is_nested, data_ptr, ...)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"_Refusing: {func}")


def _variants(base):
    """(name, schema arguments of a linear call, whether they have ``base``'s plan key) per way a later
    call can differ from ``base`` (x, weight, bias, residual, layer_scale, backend, tune)."""
    x, w, b, res, ls, backend, tune = base
    r = lambda t: torch.randn_like(t)  # noqa: E731  (fresh values, the same signature)
    same = (r(x), r(w), r(b), r(res), r(ls), backend, tune)
    wide = torch.randn(*x.shape[:-1], x.shape[-1] + 8)[..., : x.shape[-1]]
    misaligned = torch.randn(x.numel() + 1)[1:].view(x.shape)
    offset = torch.randn(x.shape[0] + 1, *x.shape[1:])[1:]  # 16-byte aligned: the same key
    return [
        ("fresh tensors", same, True),
        ("an offset but aligned x", (offset,) + same[1:], True),
        ("another stride", (wide,) + same[1:], False),
        ("another shape", (r(x)[:1],) + same[1:4][:2] + (r(res)[:1], same[4], backend, tune), False),
        ("another dtype", (x.double(),) + same[1:], False),
        ("a misaligned x", (misaligned,) + same[1:], False),
        ("no bias", same[:2] + (None,) + same[3:], False),
        ("no layer scale", same[:4] + (None,) + same[5:], False),
        ("a Parameter", (torch.nn.Parameter(r(x), requires_grad=False),) + same[1:], False),
        ("a weight that requires grad", (same[0], r(w).requires_grad_()) + same[2:], False),
        ("a tensor subclass", (r(x).as_subclass(_Sub),) + same[1:], False),
        ("a subclass that refuses every function", same[:2] + (r(b).as_subclass(_Refusing),) + same[3:], False),
        ("a meta x", (torch.empty_like(x, device="meta"),) + same[1:], False),
        ("residual is x", same[:3] + (same[0],) + same[4:], False),
        ("another backend", same[:5] + ("torch", tune), False),
        ("another tuning mode", same[:5] + (backend, "off"), False),
    ]


def test_quick_test_of_a_plan_is_true_only_for_its_key():
    """The quick test a store tries before computing a call's plan key (replay.matcher, PyTorch's C++
    tensor guard): True for fresh tensors of the same signature, False for every way the key differs,
    and True only where the key is equal; in both directions of the tensor-sharing pattern."""
    assert replay._probe_guard()  # this PyTorch's guard works: the quick path is what the tests run
    base = _schema_args("linear", "contiguous", torch.float32)
    match = replay.matcher(base, 5)
    key = library._signature("linear", base, 5)
    for name, args, quick in _variants(base):
        assert match(*args) is quick, name
        if quick:  # (it is stricter than the key: a Parameter, requires_grad or residual is x have base's key)
            assert library._signature("linear", args, 5) == key, name
    match = replay.matcher(base[:4] + (None,) + base[5:], 5)  # no layer scale, then one
    assert match(*base[:4], None, *base[5:]) and not match(*base)
    shared = _schema_args("linear", "contiguous", torch.float32, residual_is_x=True)
    match = replay.matcher(shared, 5)
    apart = _schema_args("linear", "contiguous", torch.float32)
    assert match(*_schema_args("linear", "contiguous", torch.float32, residual_is_x=True)) and not match(*apart)
    qkv = _schema_args("qkv_attention", "contiguous", torch.float32)
    match = replay.matcher(qkv, 5)
    assert match(*qkv) and not match(*qkv[:5], float(HEADS), *qkv[6:])  # 2.0 heads: another type, another key
    assert not match(*qkv[:7], 1e-5, *qkv[8:])
    embed = _schema_args("patch_embed", "contiguous", torch.float32)[:6] + ([0.5, 0.4, 0.3], None, "triton", None)
    match = replay.matcher(embed, 5)
    assert match(*embed) and not match(*embed[:6], [0.5, 0.4, 0.2], *embed[7:])
    assert replay.matcher(embed[:6] + (object(),) + embed[7:], 5) is None  # not a plain value: no quick test


def test_every_variant_is_served_right_and_the_same_signature_by_its_quick_test(monkeypatch):
    """A store that served ``base`` gets each variant (_variants) in turn: the same signature is
    served by its plan's quick test, every other call takes its own route (a new plan, or the custom op
    for the subclass and meta tensors), and every result is right."""
    quick = []
    real = library._recent_plan
    monkeypatch.setattr(library, "_recent_plan", lambda *a: quick.append(real(*a)) or quick[-1])
    store = library.PlanStore()
    base = _schema_args("linear", "contiguous", torch.float32)
    with torch.no_grad(), library.plans(store):
        library.run("linear", base)
        for name, args, same_key in _variants(base):
            if name in ("a meta x", "another dtype", "a subclass that refuses every function"):
                continue  # (refused by the checks: mixed devices / dtypes; by the subclass itself)
            quick.clear()
            out = library.run("linear", args)
            plain = [a.as_subclass(torch.Tensor) if isinstance(a, torch.Tensor) else a for a in args]
            _linear_oracle_check([a.detach() if isinstance(a, torch.Tensor) else a for a in plain], out, name)
            assert (quick[0] is not None if quick else False) is same_key, name
        with pytest.raises(TypeError, match="dtype"):
            library.run("linear", _variants(base)[4][1])  # float64 x, float32 weight: the checks' error
    assert all(len(p.matchers) <= library.MAX_MATCHERS for p in store.values())


def test_plans_without_a_quick_test_are_found_by_their_key(monkeypatch):
    """Where PyTorch's tensor guard is missing (or behaves otherwise), no quick test is made: plans are
    found by their key, and served right."""
    monkeypatch.setattr(replay, "_GUARD_WORKS", [False])
    served = []
    real_call = replay.Replay.__call__
    monkeypatch.setattr(replay.Replay, "__call__", lambda self, t: served.append(1) or real_call(self, t))
    store = library.PlanStore()
    with torch.no_grad(), library.plans(store):
        for i in range(3):
            args = _schema_args("linear", "contiguous", torch.float32)
            _linear_oracle_check(args, library.run("linear", args), f"linear call {i}")
    assert served == [1, 1] and not store.recent and [len(p.matchers) for p in store.values()] == [1]


def test_quick_tests_follow_the_thread_dispatch_state():
    """PyTorch's guard reads the thread's dispatch state: a plan made under no_grad gets a second quick
    test under inference_mode (found by its key once), then each is served by its own; a plan keeps at
    most MAX_MATCHERS."""
    store = library.PlanStore()
    args = _schema_args("linear", "contiguous", torch.float32)
    with library.plans(store):
        for _ in range(3):
            with torch.no_grad():
                library.run("linear", args)
            with torch.inference_mode():
                library.run("linear", args)
    (plan,) = store.values()
    assert len(plan.matchers) == 2 and len(store.recent["linear"]) == 2
    for i in range(library.MAX_MATCHERS + 2):  # x and residual one object, then apart: new tests, bounded
        shared = _schema_args("linear", "contiguous", torch.float32, residual_is_x=i % 2 == 0)
        with torch.no_grad(), library.plans(store):
            _linear_oracle_check(shared, library.run("linear", shared), f"call {i}")
    assert all(len(p.matchers) <= library.MAX_MATCHERS for p in store.values())


def _schema_names(op):
    """The op's tensor argument names, in schema order."""
    params = library.SCHEMAS[op].split(") ->")[0].strip("(").split(", ")
    return [p.split()[-1] for p in params[: library.N_TENSORS[op]]]


@pytest.mark.parametrize("op", ["linear", "layernorm_gelu_mlp", "qkv_attention", "patch_embed", "flash_attention"])
def test_tensors_whose_memory_does_not_hold_their_values_are_refused_planned_or_not(op):
    """A negative view (memory holds -t), an efficient zero tensor (no memory) or an old-style nested
    tensor in any tensor argument: a clear TypeError naming it, on a first call and after a plan of the
    same shapes (neither its quick test nor its key may serve it; a nested tensor made PyTorch's guard
    abort the process). Before: a negative x gave linear's result of x, silently."""
    import warnings

    base = _schema_args(op, "contiguous", torch.float32)
    kinds = {
        "a negative view": torch._neg_view,
        "an efficient zero tensor": lambda t: torch._efficientzerotensor(t.shape, dtype=t.dtype),
        "a nested tensor": lambda t: torch.nested.nested_tensor(list(t.unsqueeze(0) if t.dim() < 2 else t)),
    }
    names = _schema_names(op)
    for planned in (False, True):
        store = library.PlanStore()
        with torch.no_grad(), library.plans(store), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (nested tensors' prototype warning)
            if planned:
                library.run(op, base)
                assert len(store) == 1
            for i, t in enumerate(base[: library.N_TENSORS[op]]):
                if t is None:
                    continue
                for kind, make in kinds.items():
                    args = base[:i] + (make(t),) + base[i + 1 :]
                    with pytest.raises(TypeError, match=rf"^{names[i]}: expected .*"):
                        library.run(op, args)


def test_inputs_that_shared_an_address_are_not_replayed_apart(monkeypatch):
    """Recorded with residual=x (one tensor for two arguments), the replay names both by x; a later
    call with a separate residual of the same signature takes the launcher, and is right."""
    from vit_kernels import replay

    served = []
    real_call = replay.Replay.__call__
    monkeypatch.setattr(replay.Replay, "__call__", lambda self, t: served.append(1) or real_call(self, t))
    store = library.PlanStore()
    with torch.no_grad(), library.plans(store):
        library.run("linear", _schema_args("linear", "contiguous", torch.float32, residual_is_x=True))
        (plan,) = store.values()
        assert plan.replay is not None and plan.replay.aliases == ((0, 3),)
        for residual_is_x in (False, True):
            args = _schema_args("linear", "contiguous", torch.float32, residual_is_x=residual_is_x)
            out = library.run("linear", args)
            _linear_oracle_check(args, out, f"linear residual_is_x={residual_is_x}")
    assert len(store) == 1 and served == [1]  # the launcher for the separate residual, the replay after


def test_a_launch_that_cannot_be_named_keeps_the_launcher():
    """uint8 images: the launcher computes the per-column pixel normalization with torch, a tensor
    that is neither an input nor an allocation. The plan says so and runs the launcher, whose result
    equals an unplanned call's."""
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    r = lambda *s: torch.randn(*s)  # noqa: E731
    args = (images, r(DIM, 3, 4, 4), r(DIM), r(1, 5, DIM), r(1, 1, DIM), 4, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    args = args + ("triton", None)
    store = library.PlanStore()
    with torch.no_grad():
        with library.plans(store):
            library.run("patch_embed", args)
            (plan,) = store.values()
            assert plan.replay is None and "neither an input, an allocation nor a placeholder" in plan.replay_refused
            out = library.run("patch_embed", args)
        assert torch.equal(out, library.run("patch_embed", args))


def test_forward_launchers_start_kernels_only_through_replay_launch():
    """A replay makes the launches it recorded: a forward launcher that started a kernel another way
    than ``vit_kernels.replay.launch`` (``kernel[grid](...)``) would be silently left out of it."""
    import inspect
    import re

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from vit_kernels.triton import attention, attention_tma, gemm, gemm_tma, layernorm, mlp, patch_embed, qkv_attention

    for mod in (attention, attention_tma, gemm, gemm_tma, layernorm, mlp, patch_embed, qkv_attention):
        source = inspect.getsource(mod)
        kernels = [n for n, v in vars(mod).items() if isinstance(v, (JITFunction, InterpretedFunction))]
        assert "launch(" in source or mod in (mlp, patch_embed)
        for name in kernels:
            assert not re.search(rf"\b{name}\[", source), f"{mod.__name__}: {name}[...] launched directly"


def test_public_function_calls_keep_plans_in_the_process_store(monkeypatch):
    """A plain eager call of a public op outside any fused module: the first call of a signature
    runs the full dispatch and keeps its plan in library.FUNCTION_PLANS; later calls replay it (fresh
    tensors, right results, the Decision recorded each time); a fused module's calls keep theirs in
    the module, and a call that needs gradients is not planned. The plan holds none of the calls'
    tensors: they are freed when the caller drops them."""
    import gc
    import weakref

    from vit_kernels import ops, replay

    served = []
    real_call = replay.Replay.__call__
    monkeypatch.setattr(replay.Replay, "__call__", lambda self, t: served.append(1) or real_call(self, t))
    refs = []
    with torch.no_grad():
        for i in range(3):
            x, w, b, res, ls = _schema_args("linear", "contiguous", torch.float32)[:5]
            with backends.record_decisions() as calls:
                out = ops.linear(x, w, b, residual=res, layer_scale=ls, backend="triton")
            assert [d.backend for d in calls] == ["triton"] and len(library.FUNCTION_PLANS) == 1
            _linear_oracle_check((x, w, b, res, ls), out, f"public linear, call {i}")
            refs += [weakref.ref(t) for t in (x, w, b, res, ls, out)]
            del x, w, b, res, ls, out
        assert served == [1, 1]
        gc.collect()
        assert not [r for r in refs if r() is not None]  # no plan keeps a call's tensor alive

        attn, _ = _block("triton")
        attn(torch.randn(2, 5, DIM))
        assert len(attn._vk_plans) == 2 and len(library.FUNCTION_PLANS) == 1  # the module's own
    args = _schema_args("linear", "contiguous", torch.float32)
    ops.linear(args[0], args[1].requires_grad_(), args[2], residual=args[3], layer_scale=args[4], backend="triton")
    assert len(library.FUNCTION_PLANS) == 1  # the grad call took the full dispatch, planned nothing


def test_process_store_is_bounded(monkeypatch):
    """More signatures than MAX_FUNCTION_PLANS: the store is emptied and refilled, never grows past
    the bound, and every call is right."""
    from vit_kernels import ops

    monkeypatch.setattr(library, "MAX_FUNCTION_PLANS", 3)
    with torch.no_grad():
        for B in range(1, 8):
            x, w, b, res, ls = _schema_args("linear", "contiguous", torch.float32)[:5]
            x, res = torch.randn(B, 5, DIM), torch.randn(B, 5, DIM)
            out = ops.linear(x, w, b, residual=res, layer_scale=ls, backend="triton")
            _linear_oracle_check((x, w, b, res, ls), out, f"linear batch {B}")
            assert 1 <= len(library.FUNCTION_PLANS) <= 3
