"""Attention statistics (rows, mean attention distance, full weights from the LSE) against the float64
full-matrix oracle, on the triton backend (interpreter on CPU), the CUDA C++ backend and the torch path.

Every tensor lives on conftest.DEVICE: on a CPU-only machine the Triton interpreter and the CUDA host
emulator run the kernels, on a GPU machine the GPU builds do (CPU tensors there would ask for the
emulator, which a GPU image need not build). CUDA tests skip, naming why, when that backend cannot run."""

import itertools

import pytest
import torch

from vit_kernels import last_decision, ops, reference
from vit_kernels.ops import StatsRequest
from vit_kernels.ops import attention_stats as stats_mod
from vit_kernels.testing import assert_close
from vit_kernels.dtypes import SHORT_NAMES

from conftest import DEVICE  # noqa: E402
from poison import poison_empty  # noqa: E402
from layouts import HEADS, REFUSED, SPECS, Launches, cases  # noqa: E402
from attention_cases import score_range_factor  # noqa: E402

triton_stats = pytest.importorskip("vit_kernels.triton.attention_stats")
attention = pytest.importorskip("vit_kernels.triton.attention")

DTYPES = SHORT_NAMES  # vit_kernels.dtypes: fp32, fp16, bf16
# (batch, heads, prefix, grid, head_dim, dtype): 1, 50 and 197 tokens with a class token, a
# non-square grid with registers; head dims 64/72/80.
DEFAULT_CASES = [
    (1, 2, 1, None, 64, "fp32"),  # 1 token: the class token only (no patches, no distance)
    (2, 2, 1, (7, 7), 80, "fp16"),  # 50 tokens
    (1, 2, 1, (14, 14), 72, "bf16"),  # 197 tokens
    (2, 1, 5, (4, 6), 64, "fp32"),  # class token + 4 registers, 4x6 patches
]
SLOW_CASES = [
    (b, 2, 1, g, d, dt)
    for b, g, d, dt in itertools.product((1, 3), (None, (7, 7), (14, 14), (3, 5)), (64, 72, 80), DTYPES)
]


def need_cuda_backend():
    """Skip, naming the reason, when the CUDA C++ backend cannot run on DEVICE (the host emulator on
    a CPU-only machine, the GPU build on a GPU machine)."""
    from vit_kernels import cuda

    why = cuda.unavailable_reason(DEVICE)
    if why:
        pytest.skip(f"CUDA C++ backend unavailable on {DEVICE.type}: {why}")


def make_qk(B, H, N, D, dtype):
    q = torch.randn(B, H, N, D, dtype=torch.float64, device=DEVICE)
    k = torch.randn(B, H, N, D, dtype=torch.float64, device=DEVICE)
    v = torch.randn(B, H, N, D, dtype=torch.float64, device=DEVICE)
    return [t.to(dtype) for t in (q, k, v)]


def tokens(prefix, grid):
    return prefix + (grid[0] * grid[1] if grid else 0)


def check_launchers(B, H, prefix, grid, D, dtype):
    """The Triton launchers, outputs NaN-filled before the launch, against the float64 oracle; the
    baseline is the eager oracle at the inputs' dtype."""
    N = tokens(prefix, grid)
    q, k, v = make_qk(B, H, N, D, DTYPES[dtype])
    scale = D**-0.5
    _, lse = attention.flash_attention_forward(q, k, v, scale, return_lse=True)
    p64 = reference.attention_probs(q.double(), k.double(), scale=scale)
    base = reference.attention_probs(q, k, scale=scale)
    rows = [0] if N == 1 else [0, N - 1, N // 2]
    out = torch.full((B, H, len(rows), N), float("nan"), dtype=q.dtype, device=q.device)
    got = triton_stats.attention_probs_forward(q, k, lse, scale, rows, out=out)
    assert got is out
    assert_close(got, p64[:, :, rows], base[:, :, rows], name="rows")
    full = torch.full((B, H, N, N), float("nan"), dtype=q.dtype, device=q.device)
    assert_close(triton_stats.attention_probs_forward(q, k, lse, scale, out=full), p64, base, name="weights")
    if grid:
        per_patch = torch.full((B, H, grid[0] * grid[1]), float("nan"), dtype=torch.float32, device=q.device)
        dist = triton_stats.mean_attention_distance_forward(
            q, k, lse, scale, grid=grid, patch_size=16.0, prefix_tokens=prefix, per_patch=per_patch
        )
        oracle = reference.mean_attention_distance(
            q.double(), k.double(), grid=grid, patch_size=16.0, prefix_tokens=prefix, scale=scale
        )
        baseline = (
            reference.mean_attention_distance(
                q.float(), k.float(), grid=grid, patch_size=16.0, prefix_tokens=prefix, scale=scale
            )
            if q.dtype == torch.float32
            else _distance_at(q, k, grid, 16.0, prefix, scale)
        )
        assert not torch.isnan(per_patch).any()
        assert dist.shape == (B, H) and dist.dtype == torch.float32
        assert_close(dist, oracle, baseline, name="distance")


def _distance_at(q, k, grid, patch, prefix, scale):
    """Plain PyTorch at the inputs' (half) dtype: softmax and the weighted sum in that dtype."""
    p = reference.attention_probs(q, k, scale=scale)[..., prefix:, prefix:]
    d = reference.patch_distances(grid, patch, torch.float64, q.device).to(q.dtype)
    return (p * d).sum(-1).mean(-1)


@pytest.mark.parametrize("B,H,prefix,grid,D,dtype", DEFAULT_CASES)
def test_stats_launchers(B, H, prefix, grid, D, dtype):
    check_launchers(B, H, prefix, grid, D, dtype)


@pytest.mark.parametrize("B,H,prefix,grid,D,dtype", DEFAULT_CASES)
def test_cuda_stats_kernels(B, H, prefix, grid, D, dtype, monkeypatch):
    """csrc/attention/stats.cu (host emulator on CPU tensors), outputs NaN-poisoned, against the
    float64 oracle; the LSE comes from the CUDA flash kernel."""
    need_cuda_backend()
    from vit_kernels.cuda import attention_stats as cuda_stats

    poison_empty(monkeypatch)
    N = tokens(prefix, grid)
    q, k, v = make_qk(B, H, N, D, DTYPES[dtype])
    scale = D**-0.5
    req = StatsRequest(rows=(0, N - 1), grid=grid, patch_size=16.0, prefix_tokens=prefix, weights=True)
    out, st = cuda_stats.flash_attention_with_stats(q, k, v, scale, req, stats_mod.check_request(req, N, N))
    p64 = reference.attention_probs(q.double(), k.double(), scale=scale)
    base = reference.attention_probs(q, k, scale=scale)
    assert_close(st.rows, p64[:, :, [0, N - 1]], base[:, :, [0, N - 1]], name="rows")
    assert_close(st.weights, p64, base, name="weights")
    if grid:
        oracle = reference.mean_attention_distance(
            q.double(), k.double(), grid=grid, patch_size=16.0, prefix_tokens=prefix, scale=scale
        )
        baseline = (
            reference.mean_attention_distance(q, k, grid=grid, patch_size=16.0, prefix_tokens=prefix, scale=scale)
            if q.dtype == torch.float32
            else _distance_at(q, k, grid, 16.0, prefix, scale)
        )
        assert_close(st.distance, oracle, baseline, name="distance")


@pytest.mark.slow
@pytest.mark.parametrize("B,H,prefix,grid,D,dtype", SLOW_CASES)
def test_stats_launchers_full(B, H, prefix, grid, D, dtype):
    check_launchers(B, H, prefix, grid, D, dtype)


def test_distance_of_known_attention():
    """Keys equal to unit queries, sharply scaled: each patch attends to itself (distance 0).
    Equal keys: uniform attention over all 10 tokens, so the mean distance is 0.9 x the mean
    pairwise distance of a 3x3 grid (the class token takes 1/10 and is left out)."""
    grid, N = (3, 3), 10
    q = torch.randn(1, 1, N, 64, dtype=torch.float32, device=DEVICE)
    q = q / q.norm(dim=-1, keepdim=True)
    _, lse = attention.flash_attention_forward(q, q, q, 200.0, return_lse=True)
    d = triton_stats.mean_attention_distance_forward(q, q, lse, 200.0, grid=grid, patch_size=8.0, prefix_tokens=1)
    assert d.item() < 1e-3, d
    k = torch.ones(1, 1, N, 64, device=DEVICE)
    _, lse = attention.flash_attention_forward(q, k, k, 1.0, return_lse=True)
    d = triton_stats.mean_attention_distance_forward(q, k, lse, 1.0, grid=grid, patch_size=8.0, prefix_tokens=1)
    expected = 0.1 * reference.patch_distances(grid, 8.0).sum().item() / 9
    assert abs(d.item() - expected) < 1e-4 * expected, (d.item(), expected)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_ops_stats(backend):
    """flash_attention and qkv_attention return (out, stats) with a request, the same output as
    without one; the decision says which path ran."""
    if backend == "cuda":
        need_cuda_backend()
    B, H, D, grid = 2, 2, 64, (4, 4)
    N = 1 + 16
    q, k, v = make_qk(B, H, N, D, torch.float32)
    req = StatsRequest(rows=(0, 3), grid=grid, patch_size=16, weights=True)
    out, st = ops.flash_attention(q, k, v, backend=backend, stats=req)
    assert_close(out, reference.flash_attention(q.double(), k.double(), v.double()), reference.flash_attention(q, k, v))
    p64 = reference.attention_probs(q.double(), k.double())
    base = reference.attention_probs(q, k)
    assert_close(st.rows, p64[:, :, [0, 3]], base[:, :, [0, 3]], name="rows")
    assert_close(st.weights, p64, base, name="weights")
    assert_close(
        st.distance,
        reference.mean_attention_distance(q.double(), k.double(), grid=grid, patch_size=16),
        reference.mean_attention_distance(q, k, grid=grid, patch_size=16),
        name="distance",
    )
    assert last_decision("flash_attention").backend == backend
    assert last_decision("flash_attention").path == ("torch+stats" if backend == "torch" else "stats")

    dim = H * D
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(B, N, dim, **f64)
    w = torch.randn(3 * dim, dim, **f64) * dim**-0.5
    b, nw, nb = torch.randn(3 * dim, **f64), 1 + 0.1 * torch.randn(dim, **f64), 0.1 * torch.randn(dim, **f64)
    args32 = [t.float() for t in (x, w, b, nw, nb)]
    out, st = ops.qkv_attention(
        args32[0],
        args32[1],
        args32[2],
        num_heads=H,
        norm_weight=args32[3],
        norm_bias=args32[4],
        backend=backend,
        stats=StatsRequest(grid=grid, patch_size=16),
    )
    ref_kw = dict(num_heads=H, norm_weight=nw, norm_bias=nb)
    assert_close(
        out,
        reference.qkv_attention(x, w, b, **ref_kw),
        reference.qkv_attention(*args32[:3], num_heads=H, norm_weight=args32[3], norm_bias=args32[4]),
    )
    h = reference.layer_norm(x, nw, nb, 1e-6)
    qq, kk, _ = reference.linear(h, w, b).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    assert_close(st.rows, reference.attention_probs(qq, kk)[:, :, [0]], name="rows", floor=1e-4)
    assert_close(
        st.distance, reference.mean_attention_distance(qq, kk, grid=grid, patch_size=16), name="distance", floor=1e-4
    )
    assert st.weights is None
    assert last_decision("qkv_attention").path == ("torch+stats" if backend == "torch" else "split+stats")


STATS_OPS = ("flash_attention", "qkv_attention")
STATS_LAYOUTS = ("gaps", "expanded", "transposed", "misaligned")  # tests/layouts.py's, where the op's dims allow
# refused with statistics beside layouts.REFUSED: the CUDA statistics kernels read q and k with a unit
# stride along head_dim (the CUDA flash kernel alone reads any strides)
STATS_REFUSED = {("flash_attention", "cuda"): {"q": {"gaps", "transposed"}, "k": {"gaps", "transposed"}}}


def _attention_qk(op, t):
    """(q, k) whose softmax the statistics of a tests/layouts.py call of ``op`` describe; t: its
    tensors (qkv_attention: LayerNorm, projection, head split; the scale is the default)."""
    if op == "flash_attention":
        return t["q"], t["k"]
    h = reference.layer_norm(t["x"], t["norm_weight"], t["norm_bias"], 1e-6)
    B, N, _ = h.shape
    qkv = reference.linear(h, t["qkv_weight"], t["qkv_bias"]).reshape(B, N, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("op, arg, layout", [c for c in cases(STATS_LAYOUTS) if c[0] in STATS_OPS])
def test_stats_take_every_layout_as_the_plain_call(op, arg, layout, backend, monkeypatch):
    """With stats= and inside recording(), every argument layout is served as the call without
    statistics serves it (tests/test_layouts.py): a 1-D parameter of other strides is copied and listed
    in the decision's ``copied``; a layout the backend's kernels cannot read is refused, naming the
    argument and the backend, before any launch; otherwise the output and the statistics match the
    float64 oracle. Outputs start as NaN."""
    if backend == "cuda":
        need_cuda_backend()
    poison_empty(monkeypatch)
    launches = Launches().install(monkeypatch)
    spec = SPECS[op]
    t = spec.make(torch.float32, DEVICE, arg, layout)
    q, _ = _attention_qk(op, t)
    rows = [0, q.shape[2] - 1]
    req = StatsRequest(rows=tuple(rows), weights=True)
    if any(layout in table.get((op, backend), {}).get(arg, ()) for table in (REFUSED, STATS_REFUSED)):
        with pytest.raises(ValueError, match=rf"(?i)(^|\W){arg}: .*{backend}"):
            spec.run(t, backend, stats=req)
        with pytest.raises(ValueError, match=rf"(?i)(^|\W){arg}: .*{backend}"), stats_mod.recording(req):
            spec.run(t, backend)
        assert launches.calls == [], f"{op} launched {launches.calls} before refusing {arg}={layout}"
        return
    out, st = spec.run(t, backend, stats=req)
    d = last_decision(op)
    assert d.backend == backend, str(d)
    copies = [arg] if backend != "torch" and arg in spec.params and not t[arg].is_contiguous() else []
    assert [n.split(":")[0] for n in d.copied] == copies, str(d)
    t64 = {name: v.double() for name, v in t.items()}
    q64, k64 = _attention_qk(op, t64)
    # the CUDA kernel in float32 multiplies fp16 hi/lo pairs (attention_cases.score_range_factor: 5x): its
    # error grows with the scores, and an expanded qkv_weight (every projection row the same) puts them 10-160
    # apart in a row; a 5x bound only past a span of 50 still failed about 1 run in 125 (CI, 2026-11-26)
    factor = score_range_factor(backend, torch.float32)
    assert_close(out, spec.ref(t64), spec.ref(t), name=f"{op} {backend} {arg}={layout}", factor=factor)
    p64, base = reference.attention_probs(q64, k64), reference.attention_probs(*_attention_qk(op, t))
    assert_close(st.rows, p64[:, :, rows], base[:, :, rows], name="rows", factor=factor)
    assert_close(st.weights, p64, base, name="weights", factor=factor)
    with stats_mod.recording(req) as records:
        again = spec.run(t, backend)
    assert torch.equal(again, out) and len(records) == 1 and torch.equal(records[0].rows, st.rows)
    assert last_decision(op).copied == d.copied


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("rows, weights", [((0, 4), False), (None, True), ((2,), True)])
def test_no_keys_with_stats(rows, weights, dtype, backend, monkeypatch):
    """flash_attention with kv_tokens 0 and statistics: zeros, as the oracle gives, and the torch
    path's (empty) statistics, on every backend, with nothing launched; inside recording() too."""
    if backend == "cuda":
        need_cuda_backend()
    poison_empty(monkeypatch)
    launches = Launches().install(monkeypatch)
    q = torch.randn(2, 3, 5, 64, device=DEVICE).to(DTYPES[dtype])
    k, v = (torch.randn(2, 3, 0, 64, device=DEVICE).to(DTYPES[dtype]) for _ in range(2))
    req = StatsRequest(rows=rows, weights=weights)
    out, st = ops.flash_attention(q, k, v, backend=backend, stats=req)
    d = last_decision("flash_attention")
    assert d.backend == backend and d.path == ("torch+stats" if backend == "torch" else "no_keys"), str(d)
    assert launches.calls == []
    assert_close(out, reference.flash_attention(q.double(), k.double(), v.double()), reference.flash_attention(q, k, v))
    want_out, want = ops.flash_attention(q, k, v, backend="torch", stats=req)
    assert out.dtype == want_out.dtype and torch.equal(out, want_out)
    for name in ("rows", "distance", "weights"):
        got, expected = getattr(st, name), getattr(want, name)
        assert (got is None) == (expected is None), name
        if got is not None:
            assert got.shape == expected.shape and got.dtype == expected.dtype and got.numel() == 0, name
    assert (st.rows is None) == (rows is None) and (st.weights is None) == (not weights)
    with stats_mod.recording(req) as records:
        again = ops.flash_attention(q, k, v, backend=backend)
    assert torch.equal(again, out) and len(records) == 1
    assert (records[0].rows is None) == (rows is None) and (records[0].weights is None) == (not weights)


def test_no_request_is_the_fast_path():
    """Without a request nothing changes: one tensor back, the usual path."""
    q, k, v = make_qk(1, 2, 50, 64, torch.float32)
    out = ops.flash_attention(q, k, v, backend="triton")
    assert isinstance(out, torch.Tensor)
    assert last_decision("flash_attention").path == ""


def test_recording_collects_every_call():
    q, k, v = make_qk(1, 2, 5, 64, torch.float32)
    with stats_mod.recording(StatsRequest(rows=(0,))) as records:
        out1 = ops.flash_attention(q, k, v, backend="triton")
        out2 = ops.flash_attention(q, k, v, backend="torch")
    assert isinstance(out1, torch.Tensor) and isinstance(out2, torch.Tensor)
    assert len(records) == 2 and records[0].rows.shape == (1, 2, 1, 5)
    assert stats_mod.active_request() is None
    assert isinstance(ops.flash_attention(q, k, v, backend="torch"), torch.Tensor)


def test_launchers_check_their_operands():
    q, k, v = make_qk(1, 2, 17, 64, torch.float32)
    _, lse = attention.flash_attention_forward(q, k, v, 0.125, return_lse=True)
    with pytest.raises(ValueError, match="k: expected a 16-byte aligned data pointer"):
        triton_stats.attention_probs_forward(
            q, torch.randn(1, 2, 17 * 64 + 1, device=DEVICE)[..., 1:].view(1, 2, 17, 64), lse, 0.1
        )
    with pytest.raises(ValueError, match=r"lse: expected a contiguous float32 \(1, 2, 17\) tensor"):
        triton_stats.mean_attention_distance_forward(
            q, k, lse.double(), 0.1, grid=(4, 4), patch_size=1, prefix_tokens=1
        )
    with pytest.raises(ValueError, match=r"k: expected shape \(1, 2, kv_tokens, 64\)"):
        triton_stats.attention_probs_forward(q, k[:, :1], lse, 0.1)


def test_bad_requests_name_the_argument():
    q, k, v = make_qk(1, 2, 17, 64, torch.float32)
    with pytest.raises(ValueError, match=r"stats\.rows: expected query row indices in \[0, 17\), got \[17\]"):
        ops.flash_attention(q, k, v, backend="triton", stats=StatsRequest(rows=(17,)))
    with pytest.raises(ValueError, match=r"stats\.grid: expected 10 tokens \(1 prefix \+ 3x3 patches\)"):
        ops.flash_attention(q, k, v, backend="triton", stats=StatsRequest(grid=(3, 3)))
    with pytest.raises(TypeError, match=r"stats\.rows: expected a sequence of query row indices or None, got 0"):
        ops.flash_attention(q, k, v, backend="triton", stats=StatsRequest(rows=0))
    with pytest.raises(ValueError, match=r"stats\.patch_size: expected a positive number of pixels, got -1"):
        ops.flash_attention(q, k, v, backend="triton", stats=StatsRequest(grid=(4, 4), patch_size=-1))
    with pytest.raises(TypeError, match="stats: expected a vit_kernels.ops.StatsRequest"):
        ops.flash_attention(q, k, v, stats={"rows": 0})
    x = torch.randn(1, 17, 128, device=DEVICE)
    w = torch.randn(384, 128, device=DEVICE)
    with pytest.raises(ValueError, match="path: 'single_kernel' keeps no softmax statistics"):
        ops.qkv_attention(x, w, num_heads=2, backend="triton", path="single_kernel", stats=StatsRequest())


def test_fused_attention_module_stats():
    """FusedAttention(x, stats=...) on triton against the same module on the float64 oracle."""
    from vit_kernels.nn import FusedAttention

    torch.manual_seed(0)
    m = FusedAttention(128, 2, backend="triton").to(DEVICE).eval()
    x = torch.randn(2, 1 + 9, 128, device=DEVICE)
    req = StatsRequest(rows=(0, 4), grid=(3, 3), patch_size=8, weights=True)
    with torch.no_grad():
        y, st = m(x, stats=req)
        y_plain = m(x)
        m64 = FusedAttention(128, 2, backend="reference").to(DEVICE).double().eval()
        m64.load_state_dict(m.state_dict())
        y64, st64 = m64(x.double(), stats=req)
        m.backend = "torch"
        y32, st32 = m(x, stats=req)
    assert_close(y, y64, y32)
    assert_close(y_plain, y64, y32)
    for name in ("rows", "distance", "weights"):
        assert_close(getattr(st, name), getattr(st64, name), getattr(st32, name), name=name)
