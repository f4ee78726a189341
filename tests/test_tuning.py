"""Measured selection (vit_kernels.tuning) with an injected fake timer and device check: which
candidate wins, dropped candidates and their reasons, the cache (memory, file, versions, a
corrupt file), threads, and the tune mode. The candidates really run (Triton's interpreter on the
CPU) and are checked against the float64 oracle; only the clock is fake."""

import copy
import dataclasses
import json
import threading

import pytest
import torch

import vit_kernels as vk
from vit_kernels import library, reference, tuning
from vit_kernels.ops.qkv_attention import qkv_attention_torch
from vit_kernels.tuning import Candidate, Tuner
from vit_kernels.testing import assert_close

from conftest import DEVICE  # noqa: E402

pytest.importorskip("vit_kernels.triton.gemm")
ARCH = 90
VERSIONS = {"vit_kernels": "test", "torch": torch.__version__, "triton": "test"}


class FakeTimer:
    """ms per candidate name (default 1.0); counts the candidates it timed."""

    def __init__(self, ms=None, default=1.0):
        self.ms = dict(ms or {})
        self.default = default
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, candidate, fn):
        fn()  # the candidate runs, as it would be timed
        with self.lock:
            self.calls.append(candidate.name)
        return self.ms.get(candidate.name, self.default)


def no_cuda(op, facts, available, device_type):
    """The real candidate list without the CUDA host emulator (slow to build, not under test)."""
    return tuning.candidates(op, facts, [b for b in available if b != "cuda"], device_type)


def make_tuner(timer, path=None, versions=VERSIONS, candidate_list=no_cuda):
    """A tuner that treats this device (CPU tensors, Triton's interpreter) as a tunable sm_90 GPU."""
    return Tuner(
        timer=timer,
        tunable=lambda device: None,
        device_facts=lambda device: ("fake-gpu", ARCH),
        versions=versions,
        path=path,
        candidate_list=candidate_list,
    )


def linear_args(dtype=torch.float32):
    x = torch.randn(2, 8, 32, dtype=dtype, device=DEVICE)
    w = torch.randn(48, 32, dtype=dtype, device=DEVICE) * 32**-0.5
    b = torch.randn(48, dtype=dtype, device=DEVICE)
    r = torch.randn(2, 8, 48, dtype=dtype, device=DEVICE)
    return x, w, b, r


def check_linear(out, x, w, b, r):
    assert_close(
        out,
        reference.linear(x.double(), w.double(), b.double(), residual=r.double()),
        torch.nn.functional.linear(x, w, b) + r,
    )


def gemm_alt(dtype=torch.float32):
    from vit_kernels.triton import gemm

    return gemm.tune_configs(dtype, ARCH)[0]


def alt_name(dtype=torch.float32):
    return Candidate("triton", "", (("gemm_config", gemm_alt(dtype)),)).name


def test_torch_fastest_takes_torch():
    timer = FakeTimer({"torch": 0.5})
    x, w, b, r = linear_args()
    with tuning.use_tuner(make_tuner(timer)) as t:
        out = vk.linear(x, w, b, residual=r)
    d = vk.last_decision("linear")
    assert (d.backend, d.path, d.config) == ("torch", "", ())
    assert set(timer.calls) == {"torch", "triton", alt_name()}
    assert "measured slower" in d.reasons["triton"]
    check_linear(out, x, w, b, r)
    [entry] = t.entries()
    assert entry.winner == Candidate("torch") and entry.speedup == 1.0


def test_triton_config_fastest_takes_that_config():
    timer = FakeTimer({alt_name(): 0.25})
    x, w, b, r = linear_args()
    with tuning.use_tuner(make_tuner(timer)):
        out = vk.linear(x, w, b, residual=r)
    d = vk.last_decision("linear")
    assert (d.backend, d.config) == ("triton", (("gemm_config", gemm_alt()),))
    assert d.tuned.speedup == pytest.approx(4.0)
    assert "4.00x" in str(d)
    check_linear(out, x, w, b, r)


def test_timer_times_what_the_launch_plan_runs(monkeypatch):
    """A Triton candidate is timed as a fused model runs it from a signature's second call on: its
    recorded launches replayed (the launcher's host work is the first call's alone), with the same
    result; the torch path as it is. A run whose recording another op took over is timed through the
    launcher (a partial replay would time part of the work)."""
    from vit_kernels import replay
    from vit_kernels.triton import gemm

    launcher_calls = []
    real = gemm.linear_forward
    monkeypatch.setattr(gemm, "linear_forward", lambda *a, **k: launcher_calls.append(1) or real(*a, **k))
    results = {}

    def timer(candidate, fn):
        launcher_calls.clear()
        results[candidate.name] = (fn(), fn(), len(launcher_calls))
        return 0.1 if candidate.name == "triton" else 1.0

    x, w, b, r = linear_args()
    with tuning.use_tuner(make_tuner(timer)):
        vk.linear(x, w, b, residual=r)
    assert vk.last_decision("linear").backend == "triton"
    for name, (out1, out2, launchers) in results.items():
        assert launchers == 0, name  # the torch path calls none; the Triton candidates' replays neither
        assert out1.data_ptr() != out2.data_ptr()  # each call allocates its output, as a replay does
        for out in (out1, out2):
            check_linear(out, x, w, b, r)

    def run(d, *args):  # a launch after which another recording started and stopped
        out = gemm.linear_forward(*args)
        replay.start()
        replay.stop()
        return out

    d = vk.last_decision("linear")
    with replay.recording() as rec:
        out = run(d, x, w, b)
    launcher_calls.clear()
    check_linear(tuning.steady_call(run, d, (x, w, b), rec, out)(), x, w, b, torch.zeros_like(r))
    assert launcher_calls == [1] and not rec.whole


def test_copied_parameters_reach_every_candidate_once(monkeypatch):
    """A strided bias / layer_scale is copied once per call, before tuning: every candidate (and the
    launch of the winner) receives that one contiguous copy on the call's inputs (the random draw of
    the signature is another weight and bias, contiguous too); the fused decision lists it."""
    import importlib

    linear_op = importlib.import_module("vit_kernels.ops.linear")  # the module (vk.ops.linear is the op)
    seen, drawn = [], []
    real = linear_op._launch

    def spy(d, x, weight, bias, residual, layer_scale):
        if d.backend != "reference" and weight is w:  # the oracle gets float64 copies; the draw, new tensors
            seen.append((d.backend, bias, layer_scale))
        elif d.backend != "reference":
            drawn.append(bias.is_contiguous() and layer_scale.is_contiguous())
        return real(d, x, weight, bias, residual, layer_scale)

    monkeypatch.setattr(linear_op, "_launch", spy)
    x, w, _, r = linear_args()
    b = torch.randn(96, device=DEVICE)[::2]
    ls = torch.randn(48, 2, device=DEVICE)[:, 1]
    timer = FakeTimer({alt_name(): 0.25})
    with tuning.use_tuner(make_tuner(timer)):
        out = vk.linear(x, w, b, residual=r, layer_scale=ls)
    d = vk.last_decision("linear")
    assert (d.backend, d.config) == ("triton", (("gemm_config", gemm_alt()),))
    assert [n.split(":")[0] for n in d.copied] == ["bias", "layer_scale"]
    assert len(seen) > 2 and {be for be, _, _ in seen} >= {"torch", "triton"}
    assert all(sb is seen[0][1] and sl is seen[0][2] for _, sb, sl in seen)
    assert seen[0][1].is_contiguous() and seen[0][2].is_contiguous()
    assert len(drawn) > 2 and all(drawn)
    assert_close(
        out,
        reference.linear(x.double(), w.double(), b.double(), residual=r.double(), layer_scale=ls.double()),
        torch.nn.functional.linear(x, w, b) * ls + r,
    )


def test_zero_rows_time_nothing():
    """An empty result has nothing to time: the untimed rules decide and nothing launches."""
    timer = FakeTimer()
    x, w, b, r = linear_args()
    with tuning.use_tuner(make_tuner(timer)):
        out = vk.linear(x[:0], w, b, residual=r[:0])
        out_triton = vk.linear(x[:0], w, b, residual=r[:0], backend="triton")
    assert timer.calls == []
    assert out.shape == out_triton.shape == (0, 8, 48)
    assert vk.last_decision("linear").path == "empty"


def paths_only(op, facts, available, device_type):
    """torch and the two Triton paths with their default tiles (the interpreter is slow)."""
    return [c for c in no_cuda(op, facts, available, device_type) if not c.config]


def test_qkv_attention_single_kernel_only_by_measurement():
    """The single kernel runs under auto only when it measured fastest; otherwise split or torch."""
    x = torch.randn(1, 16, 32, device=DEVICE)
    w = torch.randn(96, 32, device=DEVICE) * 32**-0.5
    nw, nb = 1 + 0.1 * torch.randn(32, device=DEVICE), 0.1 * torch.randn(32, device=DEVICE)
    oracle = reference.qkv_attention(
        x.double(), w.double(), num_heads=2, norm_weight=nw.double(), norm_bias=nb.double()
    )
    for fastest, expected in (
        ("triton:single_kernel", ("triton", "single_kernel")),
        ("triton:split", ("triton", "split")),
        ("torch", ("torch", "torch")),
    ):
        timer = FakeTimer({fastest: 0.1})
        with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
            out = vk.qkv_attention(x, w, num_heads=2, norm_weight=nw, norm_bias=nb)
        d = vk.last_decision("qkv_attention")
        assert (d.backend, d.path) == expected
        assert {"torch", "triton:split", "triton:single_kernel"} <= set(timer.calls)
        assert_close(
            out,
            oracle,
            qkv_attention_torch(x, w, None, num_heads=2, scale=16**-0.5, norm_weight=nw, norm_bias=nb, eps=1e-6),
        )


def test_failing_candidate_is_dropped_with_its_reason():
    """A tile config that cannot compile (not powers of two) is dropped; the rest still compete."""
    bad = Candidate("triton", "", (("gemm_config", (48, 48, 48, 4, 1)),))

    def with_bad(op, facts, available, device_type):
        return no_cuda(op, facts, available, device_type) + [bad]

    timer = FakeTimer({"triton": 0.3})
    x, w, b, r = linear_args()
    with tuning.use_tuner(make_tuner(timer, candidate_list=with_bad)) as t:
        out = vk.linear(x, w, b, residual=r)
    d = vk.last_decision("linear")
    assert (d.backend, d.config) == ("triton", ())
    [entry] = t.entries()
    [res] = [r_ for r_ in entry.results if r_.candidate == bad]
    assert res.ms is None and res.dropped.startswith("failed: ")
    assert bad.name not in timer.calls
    check_linear(out, x, w, b, r)
    assert "dropped: failed" in entry.table()


def test_disagreeing_candidate_is_dropped():
    """A candidate whose result misses the oracle beyond the tolerance rule is never timed."""
    from vit_kernels.ops.linear import _launch

    x, w, b, r = linear_args()

    def run(d, *args):
        out = _launch(d, *args)
        return out + 1.0 if d.backend == "triton" and d.config else out

    timer = FakeTimer({alt_name(): 0.01})
    t = make_tuner(timer)
    cands = [Candidate("torch"), Candidate("triton"), Candidate("triton", "", (("gemm_config", gemm_alt()),))]
    entry = t.tune_signature("linear", "sig", cands, run, (x, w, b, r, None))
    [res] = [r_ for r_ in entry.results if r_.candidate == cands[2]]
    assert res.ms is None and "disagrees with the oracle" in res.dropped and "max abs err" in res.dropped
    assert entry.winner != cands[2] and alt_name() not in timer.calls


def test_cache_hit_times_nothing(tmp_path):
    path = str(tmp_path / "tuning.json")
    x, w, b, r = linear_args()
    timer = FakeTimer({alt_name(): 0.2})
    with tuning.use_tuner(make_tuner(timer, path)):
        vk.linear(x, w, b, residual=r)
        n = len(timer.calls)
        assert n == 3
        vk.linear(x, w, b, residual=r)  # in memory
        vk.linear(torch.randn_like(x), w, b, residual=r)
    assert len(timer.calls) == n
    data = json.load(open(path))
    assert data["format"] == tuning.FORMAT and data["versions"] == VERSIONS and len(data["entries"]) == 1
    timer2 = FakeTimer()  # a new process: the file
    with tuning.use_tuner(make_tuner(timer2, path)):
        out = vk.linear(x, w, b, residual=r)
    assert timer2.calls == []
    assert vk.last_decision("linear").config == (("gemm_config", gemm_alt()),)
    check_linear(out, x, w, b, r)
    timer3 = FakeTimer()  # another shape is another signature
    with tuning.use_tuner(make_tuner(timer3, path)):
        vk.linear(x[:1], w, b, residual=r[:1])
    assert len(timer3.calls) == 3


def torch_and_cuda(op, facts, available, device_type):
    return [Candidate("torch")] + [Candidate("cuda")] * ("cuda" in available)


@pytest.mark.parametrize("where", ["extension missing", "backend disabled"])
def test_cached_winner_whose_backend_cannot_run_here_is_not_launched(tmp_path, monkeypatch, where):
    """A cache file whose winner is the CUDA backend, read by a process where that backend is not available
    (the extension not built on this node, or VIT_KERNELS_DISABLE_CUDA_BACKEND): the fastest timed candidate
    that can run here is taken, with the reason, never the cached backend (an error, or a disabled backend)."""
    from vit_kernels import cuda as vk_cuda

    path = str(tmp_path / "tuning.json")
    x, w, b, r = linear_args()
    with tuning.use_tuner(make_tuner(FakeTimer({"cuda": 0.1}), path, candidate_list=torch_and_cuda)):
        vk.linear(x, w, b, residual=r)
        assert vk.last_decision("linear").backend == "cuda"
    if where == "extension missing":
        kind = "gpu" if DEVICE.type == "cuda" else "emulator"
        monkeypatch.delitem(vk_cuda._MODULES, kind, raising=False)
        monkeypatch.setitem(vk_cuda._FAILURES, kind, "no CUDA toolkit found (this test)")
    else:
        monkeypatch.setenv("VIT_KERNELS_DISABLE_CUDA_BACKEND", "1")
    timer = FakeTimer()
    with tuning.use_tuner(make_tuner(timer, path, candidate_list=torch_and_cuda)) as t:
        out = vk.linear(x, w, b, residual=r)
    d = vk.last_decision("linear")
    assert timer.calls == [] and d.backend == "torch" and "cannot run here" in d.reasons["cuda"]
    assert t.entries()[0].winner == Candidate("cuda")  # the measurement stands; this process cannot use it
    check_linear(out, x, w, b, r)


def test_version_change_invalidates(tmp_path):
    path = str(tmp_path / "tuning.json")
    x, w, b, r = linear_args()
    with tuning.use_tuner(make_tuner(FakeTimer(), path)):
        vk.linear(x, w, b, residual=r)
    timer = FakeTimer()
    with pytest.warns(RuntimeWarning, match="written by another version") as rec:
        with tuning.use_tuner(make_tuner(timer, path, versions={**VERSIONS, "torch": "9.9"})):
            vk.linear(x, w, b, residual=r)
    assert len(rec) == 1
    assert len(timer.calls) == 3
    assert json.load(open(path))["versions"]["torch"] == "9.9"


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]), json.dumps({"format": 1})])
def test_corrupt_cache_file_recovers_with_one_warning(tmp_path, content):
    path = tmp_path / "tuning.json"
    path.write_text(content)
    x, w, b, r = linear_args()
    timer = FakeTimer({"torch": 0.1})
    with pytest.warns(RuntimeWarning, match="vit_kernels tuning") as rec:
        with tuning.use_tuner(make_tuner(timer, str(path))):
            vk.linear(x, w, b, residual=r)
            vk.linear(x[:1], w, b, residual=r[:1])
    assert len(rec) == 1
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 2 and data["versions"] == VERSIONS


def _edit_winner(e):
    e["winner"] = {"backend": "triton", "path": "", "config": [["gemm_config", [9, 9, 9, 9]]]}  # not among results


BAD_ENTRIES = {
    "winner not timed": _edit_winner,
    "unknown backend": lambda e: e.update(winner={**e["winner"], "backend": "bogus"}),
    "unknown path": lambda e: e.update(winner={**e["winner"], "path": "made_up"}),
    "reference backend": lambda e: e.update(winner={**e["winner"], "backend": "reference"}),
    "unknown config keyword": lambda e: (
        [r.update(config=[["bogus_kw", [1]]]) for r in e["results"]] and e.update(winner=e["results"][0])
    ),
    "time a string": lambda e: [r.update(ms="fast") for r in e["results"]],
    "op not the signature's": lambda e: e.update(op="flash_attention"),
}


@pytest.mark.parametrize("edit", list(BAD_ENTRIES))
def test_malformed_cache_entry_is_skipped_alone_with_one_warning(tmp_path, edit):
    """An entry of the right format and versions that this version could not have written (a winner that is
    not among the timed results, a backend, path or config keyword no candidate has, a time that is not a
    number, another op) is skipped with one warning and tuned again: never launched as written (nor
    reported as what ran while another path did), never a crash in the op call; the other entries stay."""
    path = tmp_path / "tuning.json"
    x, w, b, r = linear_args()
    with tuning.use_tuner(make_tuner(FakeTimer({"torch": 0.1}), str(path))):
        vk.linear(x, w, b, residual=r)
        vk.linear(x[:1], w, b, residual=r[:1])
    data = json.loads(path.read_text())
    first, second = sorted(data["entries"])
    BAD_ENTRIES[edit](data["entries"][first])
    path.write_text(json.dumps(data))
    timer = FakeTimer({"torch": 0.1})
    with pytest.warns(RuntimeWarning, match=r"1 malformed entry") as rec:
        with tuning.use_tuner(make_tuner(timer, str(path))):
            for xi, ri in ((x, r), (x[:1], r[:1])):
                check_linear(vk.linear(xi, w, b, residual=ri), xi, w, b, ri)
                assert vk.last_decision("linear").backend == "torch"
    assert len(rec) == 1
    assert len(timer.calls) == 3  # the skipped signature tuned again; the other one read from the file


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_config_this_code_does_not_offer_is_tuned_again(tmp_path, dtype):
    """A cache entry whose winner names tiles no list of this code offers for the call (written by another
    build of the same version string whose lists differed, or edited by hand): one warning, the signature
    is tuned again; never launched as written (fp32: a gemm_config, launched silently; fp16: a TMA config
    gemm_tma refuses, an error from the auto call)."""
    from vit_kernels.triton import gemm_tma

    path = tmp_path / "tuning.json"
    x = torch.randn(2, 8, 32, device=DEVICE).to(dtype)
    w = (torch.randn(96, 32, device=DEVICE) * 32**-0.5).to(dtype)
    if dtype == torch.float32:
        fast, cands, stale = Candidate("triton", "", (("gemm_config", gemm_alt()),)), no_cuda, [16, 16, 16, 1, 1]
    else:
        cfg = dataclasses.astuple(gemm_tma.configs_for(96, 32)[0])
        fast, cands, stale = Candidate("triton", "tma", (("tma_config", cfg),)), tma_only, [128, 64, 64, 4, 3, 2, 1]
        assert gemm_tma.TmaConfig(*stale) not in gemm_tma.CONFIGS
    with tuning.use_tuner(make_tuner(FakeTimer({fast.name: 0.1}), str(path), candidate_list=cands)):
        vk.linear(x, w)
    data = json.loads(path.read_text())
    [entry] = data["entries"].values()
    for c in [entry["winner"]] + [r for r in entry["results"] if r["config"] == entry["winner"]["config"]]:
        c["config"] = [[c["config"][0][0], stale]]
    path.write_text(json.dumps(data))
    timer = FakeTimer({fast.name: 0.1})
    with pytest.warns(RuntimeWarning, match="is not one this code offers") as rec:
        with tuning.use_tuner(make_tuner(timer, str(path), candidate_list=cands)):
            out = vk.linear(x, w)
    d = vk.last_decision("linear")
    assert len(rec) == 1 and fast.name in timer.calls
    assert (d.backend, d.path, d.config) == (fast.backend, fast.path, fast.config)
    assert_close(out, reference.linear(x.double(), w.double()), torch.nn.functional.linear(x, w))
    assert list(json.loads(path.read_text())["entries"].values())[0]["winner"] == fast.to_json()


def test_unwritable_cache_keeps_the_choice_with_one_warning(tmp_path):
    """A folder where the cache file should be: one warning that it is not readable, one that it cannot be
    written; the op calls run and the choice is kept in memory (timed once)."""
    path = tmp_path / "tuning.json"
    path.mkdir()
    x, w, b, r = linear_args()
    timer = FakeTimer({"torch": 0.1})
    with pytest.warns(RuntimeWarning) as rec:
        with tuning.use_tuner(make_tuner(timer, str(path))):
            for _ in range(2):
                check_linear(vk.linear(x, w, b, residual=r), x, w, b, r)
    assert len(timer.calls) == 3
    messages = [str(w.message) for w in rec]
    assert len(messages) == 2 and "cannot write" in messages[1] and "kept in this process" in messages[1], messages


@pytest.mark.parametrize("where", ["folder is a file", "lock refused"])
def test_unusable_cache_folder_keeps_the_choice_with_one_warning(tmp_path, monkeypatch, where):
    """A regular file where the cache folder should be ($VIT_KERNELS_CACHE naming a file), or a lock file
    that cannot be made (a read-only folder): one warning, the op calls run, the choice is kept in memory
    (timed once); never an error from the op call."""
    import filelock

    monkeypatch.setenv("VIT_KERNELS_DISABLE_CUDA_BACKEND", "1")  # the CUDA build's own folder: not under test
    folder = tmp_path / "cache"
    if where == "folder is a file":
        folder.write_text("")
    else:

        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", self.lock_file)

        monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    x, w, b, r = linear_args()
    timer = FakeTimer({"torch": 0.1})
    with pytest.warns(RuntimeWarning) as rec:
        with tuning.use_tuner(make_tuner(timer, str(folder / "tuning.json"))):
            for _ in range(2):
                check_linear(vk.linear(x, w, b, residual=r), x, w, b, r)
            vk.linear(x[:1], w, b, residual=r[:1])
    assert len(timer.calls) == 6
    messages = [str(w.message) for w in rec]
    assert len(messages) == 1 and "cannot use" in messages[0] and "kept in this process" in messages[0], messages


def test_eight_threads_time_one_signature_once(tmp_path):
    x, w, b, r = linear_args()
    # torch wins: after tuning all 8 threads run the winner at once, and Triton's interpreter
    # (this machine's stand-in for a GPU) is not thread-safe; tuning itself runs in one thread.
    timer = FakeTimer({"torch": 0.1})
    t = make_tuner(timer, str(tmp_path / "tuning.json"))
    outs, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            outs[i] = vk.linear(x, w, b, residual=r)
        except BaseException as e:  # reported below
            errors.append(e)

    with tuning.use_tuner(t):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors
    assert sorted(timer.calls) == sorted(["torch", "triton", alt_name()])
    for out in outs:
        check_linear(out, x, w, b, r)


def test_mode_argument_env_and_scope(tmp_path, monkeypatch):
    path = str(tmp_path / "tuning.json")
    x, w, b, r = linear_args()
    timer = FakeTimer()
    with tuning.use_tuner(make_tuner(timer, path)):
        vk.linear(x, w, b, residual=r, tune="off")
        d = vk.last_decision("linear")
        assert d.backend == "torch" and "off" in d.reasons["tuning"]
        monkeypatch.setenv("VIT_KERNELS_TUNE", "off")
        vk.linear(x, w, b, residual=r)
        monkeypatch.setenv("VIT_KERNELS_TUNE", "cache-only")
        vk.linear(x, w, b, residual=r)
        assert "cache-only and no cached choice" in vk.last_decision("linear").reasons["tuning"]
        assert timer.calls == []
        with tuning.mode("on"):  # the scope wins over the environment
            vk.linear(x, w, b, residual=r)
        assert len(timer.calls) == 3
        vk.linear(x, w, b, residual=r)  # cache-only with a cached choice uses it
        assert vk.last_decision("linear").tuned is not None
        monkeypatch.setenv("VIT_KERNELS_TUNE", "sometimes")
        with pytest.raises(ValueError, match=r"VIT_KERNELS_TUNE: expected one of \('on', 'off', 'cache-only'\)"):
            vk.linear(x, w, b, residual=r)
        monkeypatch.delenv("VIT_KERNELS_TUNE")
        with tuning.mode("off"):
            vk.linear(x, w, b, residual=r, tune="cache-only")  # the argument wins over the scope
            assert vk.last_decision("linear").tuned is not None
    with pytest.raises(ValueError, match=r"tune: expected one of"):
        with tuning.mode("always"):
            pass


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_misspelled_env_mode_is_refused_under_autograd_too(monkeypatch, backend):
    """VIT_KERNELS_TUNE=of is refused, naming the variable, by a call that needs gradients as by one that
    does not (autograd keeps the torch path and never reads the mode: a typo in a training script)."""
    monkeypatch.setenv("VIT_KERNELS_TUNE", "of")
    x, w, b, r = linear_args()
    for xi in (x, x.clone().requires_grad_()):
        with pytest.raises(ValueError, match=r"VIT_KERNELS_TUNE: expected one of .*got 'of'"):
            vk.linear(xi, w, b, residual=r, backend=backend)


def test_no_gpu_means_nothing_timed():
    """The default device check: CPU tensors are never tuned; auto keeps the untimed rules."""
    assert tuning.cuda_tunable(torch.device("cpu")) is not None
    timer = FakeTimer()
    t = Tuner(timer=timer, path=None, versions=VERSIONS)
    x, w, b, r = linear_args()
    with tuning.use_tuner(t):
        vk.linear(x, w, b, residual=r)
    assert timer.calls == [] and vk.last_decision("linear").backend == "torch"


def test_candidate_lists():
    """Triton configs come from the launchers' lists (compiled by inspect); SDPA backends are torch
    candidates on CUDA; qkv_attention offers single_kernel only where it fits."""
    from vit_kernels.triton import attention, gemm

    f = tuning.Facts(torch.float16, 90)
    names = [c.name for c in tuning.candidates("linear", f, ["triton", "cuda"], "cuda")]
    assert names[:2] == ["torch", "triton"] and names[-1] == "cuda"
    assert len(names) == 3 + len(gemm.tune_configs(torch.float16, 90))
    fa = tuning.Facts(torch.float16, 80, head_dim=64, tokens=197)
    names = [c.name for c in tuning.candidates("qkv_attention", fa, ["triton"], "cuda")]
    assert {
        "torch:sdpa_flash",
        "torch:sdpa_efficient",
        "torch:sdpa_cudnn",
        "triton:split",
        "triton:single_kernel",
    } <= set(names)
    assert len(names) == 4 + 2 + len(gemm.tune_configs(torch.float16, 80)) + len(
        attention.tune_configs(torch.float16, 64, 80)
    )
    far = tuning.Facts(torch.float16, 80, head_dim=64, tokens=1025)
    assert "triton:single_kernel" not in [c.name for c in tuning.candidates("qkv_attention", far, ["triton"], "cuda")]
    forced = tuning.Facts(torch.float16, 90, head_dim=64, tokens=197, path="single_kernel")
    assert [c.name for c in tuning.candidates("qkv_attention", forced, ["triton"], "cuda")] == [
        "torch",
        "triton:single_kernel",
    ]


def test_tma_candidates_only_on_sm90_half_precision_at_vit_shapes():
    """gemm_tma's configs join on sm_90 for float16/bfloat16 at the ViT (N, K) classes: path "tma" for
    linear and the MLP (configs both of its GEMMs' classes list), the split path for qkv_attention."""
    from vit_kernels.triton import gemm_tma

    qkv, fc1, fc2 = (96, 32), (128, 32), (32, 128)
    for dtype in (torch.float16, torch.bfloat16):
        f = tuning.Facts(dtype, 90, gemms=(qkv,))
        tma = [c for c in tuning.candidates("linear", f, ["triton"], "cuda") if c.path == "tma"]
        assert [dict(c.config)["tma_config"] for c in tma] == [
            dataclasses.astuple(c) for c in gemm_tma.configs_for(*qkv)
        ]
        assert tma[0].name == "triton:tma tma_config=128,256,64,8,3,4,1"
        fm = tuning.Facts(dtype, 90, gemms=(fc1, fc2))
        tma = [
            dict(c.config)["tma_config"]
            for c in tuning.candidates("layernorm_gelu_mlp", fm, ["triton"], "cuda")
            if c.path == "tma"
        ]
        both = set(map(dataclasses.astuple, gemm_tma.configs_for(*fc1))) & set(
            map(dataclasses.astuple, gemm_tma.configs_for(*fc2))
        )
        assert set(tma) == both and len(tma) == 3
        fq = tuning.Facts(dtype, 90, head_dim=16, tokens=197, gemms=(qkv,))
        names = [c.name for c in tuning.candidates("qkv_attention", fq, ["triton"], "cuda")]
        assert sum(n.startswith("triton:split tma_config=") and "attention_tma" not in n for n in names) == 4
    for f in (
        tuning.Facts(torch.float16, 80, gemms=(qkv,)),
        tuning.Facts(torch.float32, 90, gemms=(qkv,)),
        tuning.Facts(torch.float16, 90, gemms=((48, 32),)),
    ):  # sm_80, fp32, not a ViT class
        assert not [c for c in tuning.candidates("linear", f, ["triton"], "cuda") if "tma" in c.name]


def tma_only(op, facts, available, device_type):
    """torch and the TMA candidates (the interpreter is slow)."""
    return [
        c
        for c in no_cuda(op, facts, available, device_type)
        if c == Candidate("torch") or any(kw == "tma_config" for kw, _ in c.config)
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_config_fastest_runs_the_tma_gemm(dtype, monkeypatch):
    """The tuner's TMA choice really launches gemm_tma (linear: path "tma"), with that config, and
    the result matches the oracle; a second call reuses the choice."""
    from vit_kernels.triton import gemm_tma

    launched = []
    real = gemm_tma.launch_gemm_tma
    monkeypatch.setattr(gemm_tma, "launch_gemm_tma", lambda *a, **k: launched.append(k["config"]) or real(*a, **k))
    x = torch.randn(2, 8, 32, device=DEVICE).to(dtype)
    w = (torch.randn(96, 32, device=DEVICE) * 32**-0.5).to(dtype)
    b = torch.randn(96, device=DEVICE).to(dtype)
    cfg = dataclasses.astuple(gemm_tma.configs_for(96, 32)[2])
    name = Candidate("triton", "tma", (("tma_config", cfg),)).name
    timer = FakeTimer({name: 0.1})
    with tuning.use_tuner(make_tuner(timer, candidate_list=tma_only)):
        out = vk.linear(x, w, b)
        assert set(timer.calls) == {"torch"} | {
            Candidate("triton", "tma", (("tma_config", dataclasses.astuple(c)),)).name
            for c in gemm_tma.configs_for(96, 32)
        }
        launched.clear()
        out2 = vk.linear(x, w, b)
        d = vk.last_decision("linear")
        assert (d.backend, d.path, d.config) == ("triton", "tma", (("tma_config", cfg),))
        # the second call replays the first call's launch plan (the TMA kernel with the config's tiles),
        # without the launcher; a call without a plan runs the launcher
        assert launched == []
        (plan,) = [p for key, p in library.FUNCTION_PLANS.items() if key[0] == "linear"]
        assert plan.replay is not None, plan.replay_refused
        ((kernel, _, args, kwargs),) = plan.replay.launches((x, w, b, None, None))
        bound = dict(zip(kernel.arg_names, args), **kwargs)
        tiles = gemm_tma.TmaConfig(*cfg)
        assert kernel is gemm_tma._gemm_tma_kernel
        assert (bound["BLOCK_M"], bound["BLOCK_N"], bound["BLOCK_K"]) == cfg[:3]
        assert (bound["EPI_SPLIT"], bound["num_warps"]) == (tiles.epi_split, tiles.num_warps)
        library.clear_plans()
        out3 = vk.linear(x, w, b)
        assert launched == [tiles]
    oracle = reference.linear(x.double(), w.double(), b.double())
    for o in (out, out2, out3):
        assert_close(o, oracle, torch.nn.functional.linear(x, w, b))


def test_misaligned_input_is_its_own_signature(tmp_path):
    """A choice made on inputs whose data starts on a 16-byte boundary is not reused for a view of the same
    shape and strides at an offset (in memory nor from the cache file): the TMA GEMM cannot read it, and
    auto tunes that call on its own (TMA dropped, named) instead of raising."""
    from vit_kernels.triton import gemm_tma

    x = torch.randn(2, 8, 32, device=DEVICE).half()
    w = (torch.randn(96, 32, device=DEVICE) * 32**-0.5).half()
    xm = torch.empty(x.numel() + 1, dtype=x.dtype, device=DEVICE)[1:].view(x.shape)
    xm.copy_(x)
    assert xm.stride() == x.stride() and xm.data_ptr() % 16
    cfg = dataclasses.astuple(gemm_tma.configs_for(96, 32)[0])
    name = Candidate("triton", "tma", (("tma_config", cfg),)).name
    oracle = reference.linear(x.double(), w.double())
    for same_process in (True, False):  # the choice in memory; in the file, read by a new process
        path = str(tmp_path / f"tuning{same_process}.json")
        with tuning.use_tuner(make_tuner(FakeTimer({name: 0.1}), path, candidate_list=tma_only)) as t:
            vk.linear(x, w)
            assert vk.last_decision("linear").path == "tma"
            if not same_process:
                t = make_tuner(FakeTimer({name: 0.1}), path, candidate_list=tma_only)
            with tuning.use_tuner(t):
                out = vk.linear(xm, w)
        d = vk.last_decision("linear")
        assert d.backend == "torch" and "TMA needs a 16-byte aligned base address" in d.reasons["triton"]
        assert_close(out, oracle, torch.nn.functional.linear(x, w))
    assert "ptr%16=2" in d.tuned.signature and "(x contiguous ptr%16=2)" in d.tuned.label


def test_tma_config_fastest_mlp_and_qkv_attention():
    """The MLP (both GEMMs) and the split qkv_attention (its projection, LayerNorm folded) on the TMA
    GEMM when one of its configs measured fastest; each against the oracle."""
    from vit_kernels.triton import gemm_tma

    dtype = torch.float16
    x = torch.randn(1, 16, 32, device=DEVICE).to(dtype)
    nw = (1 + 0.1 * torch.randn(32, device=DEVICE)).to(dtype)
    nb = (0.1 * torch.randn(32, device=DEVICE)).to(dtype)
    w1 = (torch.randn(128, 32, device=DEVICE) * 32**-0.5).to(dtype)
    b1 = torch.randn(128, device=DEVICE).to(dtype)
    w2 = (torch.randn(32, 128, device=DEVICE) * 128**-0.5).to(dtype)
    b2 = torch.randn(32, device=DEVICE).to(dtype)
    cfg = dataclasses.astuple(gemm_tma.CONFIGS[3])
    timer = FakeTimer(
        {
            Candidate("triton", "tma", (("tma_config", cfg),)).name: 0.1,
            Candidate("triton", "split", (("tma_config", cfg),)).name: 0.1,
        }
    )
    with tuning.use_tuner(make_tuner(timer, candidate_list=tma_only)):
        out = vk.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, residual=x)
        d = vk.last_decision("layernorm_gelu_mlp")
        assert (d.backend, d.path, d.config) == ("triton", "tma", (("tma_config", cfg),))
        f64 = [t.double() for t in (x, nw, nb, w1, b1, w2, b2)]
        assert_close(
            out,
            reference.layernorm_gelu_mlp(*f64, residual=x.double()),
            vk.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, residual=x, backend="torch"),
        )
        wq = (torch.randn(96, 32, device=DEVICE) * 32**-0.5).to(dtype)
        out = vk.qkv_attention(x, wq, num_heads=2, norm_weight=nw, norm_bias=nb)
        d = vk.last_decision("qkv_attention")
        assert (d.backend, d.path, d.config) == ("triton", "split", (("tma_config", cfg),))
    assert_close(
        out,
        reference.qkv_attention(x.double(), wq.double(), num_heads=2, norm_weight=nw.double(), norm_bias=nb.double()),
        qkv_attention_torch(x, wq, None, num_heads=2, scale=16**-0.5, norm_weight=nw, norm_bias=nb, eps=1e-6),
    )


def test_layernorm_folded_tma_calls_are_replayed(monkeypatch):
    """The LayerNorm-folded TMA GEMM (the MLP's fc1, the split qkv_attention's projection) is replayed
    after the first call: the fold kernel is one of the replayed launches, so a parameter written in place,
    through ``.data`` too (no version bump), is folded as it is, and each replay flags its own LayerNorm route (last_ln_route); every
    result against the oracle."""
    from vit_kernels.triton import gemm_tma, layernorm

    launched = []
    real = gemm_tma.launch_gemm_tma
    monkeypatch.setattr(gemm_tma, "launch_gemm_tma", lambda *a, **k: launched.append(k["config"]) or real(*a, **k))
    dtype = torch.float16
    B, T, dim = 2, 40, 32
    x = torch.randn(B, T, dim, device=DEVICE).to(dtype)
    nw = (1 + 0.1 * torch.randn(dim, device=DEVICE)).to(dtype)
    nb = (0.1 * torch.randn(dim, device=DEVICE)).to(dtype)
    w1 = (torch.randn(128, dim, device=DEVICE) * dim**-0.5).to(dtype)
    b1 = torch.randn(128, device=DEVICE).to(dtype)
    w2 = (torch.randn(dim, 128, device=DEVICE) * 128**-0.5).to(dtype)
    b2 = torch.randn(dim, device=DEVICE).to(dtype)
    wq = (torch.randn(96, dim, device=DEVICE) * dim**-0.5).to(dtype)
    cfg = dataclasses.astuple(gemm_tma.CONFIGS[3])  # 64-row tiles: the 80 rows are 2 row tiles
    timer = FakeTimer(
        {
            Candidate("triton", "tma", (("tma_config", cfg),)).name: 0.1,
            Candidate("triton", "split", (("tma_config", cfg),)).name: 0.1,
        }
    )
    # a row whose mean is large against its spread (|mean| * rstd ~ 2000, past the threshold): its tile takes
    # the exact route
    x_far = x.clone()
    x_far[1, -1] = (1000 + torch.randn(dim, device=DEVICE) * 0.5).to(dtype)

    def mlp(x):
        return vk.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, residual=x)

    def mlp_oracle(x):
        f64 = [t.double() for t in (x, nw, nb, w1, b1, w2, b2)]
        base = vk.layernorm_gelu_mlp(x, nw, nb, w1, b1, w2, b2, residual=x, backend="torch")
        return reference.layernorm_gelu_mlp(*f64, residual=x.double()), base

    def qkv(x):
        return vk.qkv_attention(x, wq, num_heads=2, norm_weight=nw, norm_bias=nb)

    def qkv_oracle(x):
        f64 = dict(norm_weight=nw.double(), norm_bias=nb.double())
        base = qkv_attention_torch(x, wq, None, num_heads=2, scale=16**-0.5, norm_weight=nw, norm_bias=nb, eps=1e-6)
        return reference.qkv_attention(x.double(), wq.double(), num_heads=2, **f64), base

    with tuning.use_tuner(make_tuner(timer, candidate_list=tma_only)):
        for op, call, oracle in (("layernorm_gelu_mlp", mlp, mlp_oracle), ("qkv_attention", qkv, qkv_oracle)):
            call(x)  # tunes; the plan
            assert dict(vk.last_decision(op).config) == {"tma_config": cfg}
            (plan,) = [p for key, p in library.FUNCTION_PLANS.items() if key[0] == op]
            assert plan.replay is not None, plan.replay_refused
            # the fold is the plan's own launch (its allocations too), made again by every replay
            assert layernorm._ln_prologue_kernel in [kernel for kernel, _ in plan.replay.kernels]
            launched.clear()
            assert_close(call(x), *oracle(x))
            assert gemm_tma.last_ln_route() == "epilogue"
            assert_close(call(x_far), *oracle(x_far))
            assert gemm_tma.last_ln_route().startswith("exact: 1 of 2 row tiles"), gemm_tma.last_ln_route()
            nw.data.mul_(1.5)  # through .data (the version counter does not move): the replay folds the new weight
            nb.data.add_(0.25)
            assert_close(call(x), *oracle(x))
            assert launched == []  # every call above was a replay


def test_tma_attention_candidates_only_on_sm90_half_precision():
    """attention_tma's configs join on sm_90 for float16/bfloat16 at head_dim <= 128: flash_attention's
    triton candidates and qkv_attention's split path (alone, and paired with each TMA GEMM config of its
    projection); never on sm_80, for float32 or head_dim 256."""
    from vit_kernels.triton import attention_tma, gemm_tma

    for dtype in (torch.float16, torch.bfloat16):
        f = tuning.Facts(dtype, 90, head_dim=64)
        tma = [c for c in tuning.candidates("flash_attention", f, ["triton"], "cuda") if "attention_tma" in c.name]
        assert [dict(c.config)["attention_tma_config"] for c in tma] == list(attention_tma.CONFIGS)
        assert tma[0].name == "triton attention_tma_config=128,64,4,3,16" and tma[0].path == ""
        fq = tuning.Facts(dtype, 90, head_dim=80, tokens=197, gemms=((480, 160),))
        names = [c.name for c in tuning.candidates("qkv_attention", fq, ["triton"], "cuda")]
        assert sum(n.startswith("triton:split attention_tma_config=") for n in names) == len(attention_tma.CONFIGS)
        pairs = [n for n in names if n.startswith("triton:split tma_config=") and "attention_tma_config=" in n]
        assert len(pairs) == len(gemm_tma.configs_for(480, 160)) * len(attention_tma.CONFIGS), names
        assert "triton:split tma_config=128,256,64,8,3,4,1 attention_tma_config=128,64,4,3,16" in pairs
    for f in (
        tuning.Facts(torch.float16, 80, head_dim=64),
        tuning.Facts(torch.float32, 90, head_dim=64),
        tuning.Facts(torch.float16, 90, head_dim=256),
    ):
        assert not [c for c in tuning.candidates("flash_attention", f, ["triton"], "cuda") if "attention_tma" in c.name]


def attention_tma_only(op, facts, available, device_type):
    """torch, the TMA attention candidates and, of the (TMA GEMM, TMA attention) pairs, those with the
    TMA GEMM's last qkv config (the interpreter is slow)."""
    from vit_kernels.triton import gemm_tma

    last = ("tma_config", dataclasses.astuple(gemm_tma.configs_for(384, 128)[-1]))
    return [
        c
        for c in no_cuda(op, facts, available, device_type)
        if c == Candidate("torch")
        or (any(kw == "attention_tma_config" for kw, _ in c.config) and c.config[0] in (last, c.config[-1]))
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_tma_config_fastest_runs_the_tma_kernel(dtype, monkeypatch):
    """The tuner's TMA attention choice really launches attention_tma with that config: for flash_attention,
    and for qkv_attention's split path paired with a TMA GEMM config (both launched); each result against
    the oracle; a second call reuses the choice."""
    from vit_kernels.triton import attention_tma, gemm_tma

    launched, gemms = [], []
    real, real_gemm = attention_tma.launch, gemm_tma.launch_gemm_tma
    monkeypatch.setattr(attention_tma, "launch", lambda *a, **kw: launched.append(a[-1]) or real(*a, **kw))
    monkeypatch.setattr(gemm_tma, "launch_gemm_tma", lambda *a, **k: gemms.append(k["config"]) or real_gemm(*a, **k))
    q, k, v = qkv0 = tuple(torch.randn(1, 2, 70, 64, dtype=torch.float64, device=DEVICE).to(dtype) for _ in range(3))
    oracle_qkv = reference.flash_attention(*(t.double() for t in qkv0))
    cfg = attention_tma.CONFIGS[3]
    gcfg = dataclasses.astuple(gemm_tma.configs_for(384, 128)[-1])
    pair = (("tma_config", gcfg), ("attention_tma_config", cfg))
    timer = FakeTimer(
        {
            Candidate("triton", "", (("attention_tma_config", cfg),)).name: 0.1,
            Candidate("triton", "split", pair).name: 0.1,
        }
    )
    with tuning.use_tuner(make_tuner(timer, candidate_list=attention_tma_only)):
        out = vk.flash_attention(q, k, v)
        assert set(timer.calls) == {"torch"} | {
            Candidate("triton", "", (("attention_tma_config", c),)).name for c in attention_tma.CONFIGS
        }
        launched.clear()
        out2 = vk.flash_attention(q, k, v)  # replays the first call's launch plan: no launcher
        d = vk.last_decision("flash_attention")
        assert (d.backend, d.config) == ("triton", (("attention_tma_config", cfg),))
        assert launched == []
        library.clear_plans()
        vk.flash_attention(q, k, v)  # without a plan: the launcher, with the tuned tiles
        assert launched == [cfg]
        # a fused module's launch plan: the replay makes the TMA launch's tensor descriptors again on the
        # new tensors (the launcher is not called); fresh q, k, v so that a stale base would show
        store = library.PlanStore()
        with torch.no_grad(), library.plans(store):
            vk.flash_attention(q, k, v)
            launched.clear()
            q, k, v = (torch.randn_like(t, dtype=torch.float64).to(dtype) for t in (q, k, v))
            out3 = vk.flash_attention(q, k, v)
        (plan,) = store.values()
        assert plan.replay is not None and len(plan.replay.descs) >= 4, plan.replay_refused
        # the plan keeps the descriptors' shapes, strides and blocks, not the recorded call's tensors
        assert not any(isinstance(v, torch.Tensor) for _, fields in plan.replay.descs for v in fields.values())
        assert launched == []
        for o in (out, out2):
            assert_close(o, oracle_qkv, torch.nn.functional.scaled_dot_product_attention(*qkv0))
        x = torch.randn(2, 50, 128, device=DEVICE).to(dtype)
        w = (torch.randn(384, 128, device=DEVICE) * 128**-0.5).to(dtype)
        vk.qkv_attention(x, w, num_heads=2)  # tunes
        launched.clear()
        gemms.clear()
        out_qkv = vk.qkv_attention(x, w, num_heads=2)  # a replay of the TMA GEMM and the TMA attention
        d = vk.last_decision("qkv_attention")
        assert (d.backend, d.path, d.config) == ("triton", "split", pair)
        assert launched == [] and gemms == []
        (plan,) = [p for key, p in library.FUNCTION_PLANS.items() if key[0] == "qkv_attention"]
        kernels = [kernel for kernel, _ in plan.replay.kernels]
        assert kernels == [gemm_tma._gemm_tma_kernel, attention_tma._attn_fwd_tma_kernel]
        library.clear_plans()
        vk.qkv_attention(x, w, num_heads=2)
        assert launched == [cfg] and gemms == [gemm_tma.TmaConfig(*gcfg)]
    oracle = reference.flash_attention(q.double(), k.double(), v.double())
    assert_close(out3, oracle, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert_close(
        out_qkv,
        reference.qkv_attention(x.double(), w.double(), num_heads=2),
        qkv_attention_torch(x, w, None, num_heads=2, scale=64**-0.5, norm_weight=None, norm_bias=None, eps=1e-6),
    )


def test_tuned_configs_are_compiled_by_inspect():
    """Every config the tuner can launch is an AotSpec of `inspect` for that arch."""
    from vit_kernels.triton import attention, gemm
    from vit_kernels.triton.aot import ptr_type

    specs = gemm.aot_specs()
    compiled = {
        (
            s.kernel,
            s.signature["a_ptr"],
            (s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_K"], s.num_warps, s.num_stages),
            a,
        )
        for s in specs
        for a in s.archs
    }
    for arch in (80, 90):
        for dtype in gemm.DTYPES:
            p = ptr_type(dtype)
            for cfg in gemm.tune_configs(dtype, arch):
                for kernel in ("gemm_linear", "gemm_qkv", "gemm_fc1"):
                    assert (kernel, p, cfg, arch) in compiled
            for cfg in gemm.tune_configs(dtype, arch, patch=True):
                assert ("gemm_patch_embed_nchw", p, cfg, arch) in compiled
    att = {
        (
            s.signature["q_ptr"],
            s.constexprs["HEAD_DIM"],
            (s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps, s.num_stages),
            a,
        )
        for s in attention.aot_specs()
        for a in s.archs
    }
    for arch in (80, 90):
        for dtype in attention.DTYPES:
            for hd in attention.TUNE_HEAD_DIMS:  # each bucket and each two-chunk head dim (72, 80 -> 64 + 16)
                for cfg in attention.tune_configs(dtype, hd, arch):
                    assert (ptr_type(dtype), hd, cfg, arch) in att
    from vit_kernels.triton import gemm_tma

    tma = {(s.kernel, s.signature["a_ptr"], s.config.split(",")[0]) for s in gemm_tma.aot_specs() if 90 in s.archs}
    for cls, shape in gemm_tma.CLASS_SHAPES.items():
        for dtype in gemm_tma.DTYPES:
            cfgs = gemm_tma.tune_configs(dtype, 90, (shape(64),))
            assert cfgs
            same = {f"gemm_tma_{c}" for c in gemm_tma.EPILOGUES if gemm_tma.EPILOGUES[c] is gemm_tma.EPILOGUES[cls]}
            for cfg in cfgs:  # fc2 launches proj's epilogues: compiled once, under the first class
                assert any((k, ptr_type(dtype), gemm_tma.TmaConfig(*cfg).name) in tma for k in same)


def tiny_vit(backend="auto"):
    from vit_kernels.models import VisionTransformer

    return VisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10, backend=backend
    ).eval()


def test_tune_model_fused_faster_reports_both_and_the_parts():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    timer = FakeTimer({"triton": 0.2, "triton:split": 0.2, "model:fused": 1.0, "model:unfused": 2.0})
    with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
        result = vk.tune(model, images)
        with tuning.mode("cache-only"), torch.no_grad():
            out = model(images)
        printed = vk.tune_report(print_it=False)
    assert (result.fused_ms, result.unfused_ms, result.fell_back) == (1.0, 2.0, [])
    assert "2.00x faster" in str(result)
    assert {e.op for e in result.entries} == {"patch_embed", "qkv_attention", "linear", "layernorm_gelu_mlp"}
    assert len(printed) == 4 and all(e.winner.backend == "triton" for e in printed)
    assert vk.last_decision("qkv_attention").path == "split"
    report = str(vk.fuse_report(model))
    assert "tuned: qkv_attention: triton split, measured 5.00x the torch path" in report
    assert "tuned: layernorm_gelu_mlp: triton, measured 5.00x" in report
    oracle_model = vk.nn.set_backend(copy.deepcopy(model).double(), "reference")
    torch_model = vk.nn.set_backend(copy.deepcopy(model), "torch")
    with torch.no_grad():
        assert_close(out, oracle_model(images.double()), torch_model(images))


def test_tune_model_not_faster_falls_back_to_torch_unless_explicit():
    model = tiny_vit()
    model.blocks[1].mlp.backend = "triton"  # asked for explicitly: kept
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    timer = FakeTimer({"model:fused": 3.0, "model:unfused": 2.0})
    with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
        result = vk.tune(model, images)
    assert "NOT faster" in result.message and "3 ms" in result.message and "2 ms" in result.message
    assert "blocks.1.mlp (backend='triton')" in result.message
    assert model.blocks[0].attn.backend == "torch" and model.patch_embed.backend == "torch"
    assert model.blocks[1].mlp.backend == "triton"
    assert "blocks.1.mlp" not in result.fell_back and "blocks.0.attn" in result.fell_back
    assert "this part runs the torch path" in str(vk.fuse_report(model))
    timer.ms["model:fused"] = 1.0  # tuning again lets the parts compete again
    with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
        result = vk.tune(model, images)
    assert result.fell_back == [] and model.blocks[0].attn.backend == "auto"


def test_tune_again_keeps_a_backend_set_after_a_fallback():
    """A backend the user sets on a part after vk.tune sent it to the torch path is theirs: fuse_report
    no longer says the part runs the torch path, and the next vk.tune keeps it (never reset to auto)."""
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    timer = FakeTimer({"model:fused": 3.0, "model:unfused": 2.0})
    with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
        vk.tune(model, images)
        assert model.blocks[0].attn.backend == "torch"
        model.blocks[0].attn.backend = "triton"
        notes = {e.path: e.notes for e in vk.fuse_report(model).entries}
        assert not any("this part runs the torch path" in n for n in notes["blocks.0.attn"])
        assert any("this part runs the torch path" in n for n in notes["blocks.0.mlp"])
        result = vk.tune(model, images)
    assert model.blocks[0].attn.backend == "triton" and "blocks.0.attn" not in result.fell_back
    assert "kept as asked: blocks.0.attn (backend='triton')" in result.message


def test_bench_tuned_provider_tunes_and_keeps_the_table(monkeypatch):
    """The bench's `tuned` row: vk.tune on the benchmarked model, its summary and table in the row
    (the device check is lifted here: on a real CPU run the row is 'not measured')."""
    from vit_kernels.bench import throughput as tp

    monkeypatch.setattr(tp, "static_reason", lambda *a, **k: None)
    cfg = tp.BenchConfig(
        models=["vit_tiny_patch16_224"],
        providers=["tuned"],
        device=torch.device("cpu"),
        batch_size=1,
        img_size=32,
        depth=1,
        warmup=1,
        repeats=1,
    )
    timer = FakeTimer({"torch": 0.1, "model:fused": 1.0, "model:unfused": 2.0})
    with tuning.use_tuner(make_tuner(timer, candidate_list=paths_only)):
        row, step, _ = tp.prepare("vit_tiny_patch16_224", "tuned", "inference", cfg)
        assert step is not None and step().shape[0] == 1
    assert "fused is 2.00x faster" in row["note"] and row["status"] == "ok"
    entries = row["tuning_entries"]  # bench.json: the full signatures
    assert len(entries) == 4 and all(e["winner"]["backend"] == "torch" for e in entries)
    assert all(e["signature"].startswith(e["op"] + "|") and e["label"].startswith(e["op"] + " ") for e in entries)
    assert "qkv_attention: torch" in row["tuning"]
    table = row["tuning_rows"]  # what bench prints (a rich table on a terminal): one row per candidate
    assert sum(r["result"] == "chosen" for r in table) == 4
    assert all(r["candidate"] == "torch" for r in table if r["result"] == "chosen"), table
    from vit_kernels.bench import report

    text = report.format_table(table, tuning.TABLE_COLUMNS)
    assert "op signature / candidate" in text and "chosen" in text and "0.1000" in text, text


def test_bad_tune_argument_names_it():
    x, w, b, r = linear_args()
    with pytest.raises(ValueError, match=r"tune: expected one of \('on', 'off', 'cache-only'\), got 'maybe'"):
        vk.linear(x, w, b, tune="maybe")


CHILD = r"""
import os, sys, time, torch, vit_kernels as vk
from vit_kernels import tuning
timed = []
def timer(c, fn):
    timed.append(c.name)
    time.sleep(0.5)          # a slow timing: the other process arrives while this one tunes
    return 1.0 if c.backend == "torch" else 0.5
def cands(op, facts, available, device_type):
    return [tuning.Candidate("torch"), tuning.Candidate("triton")]
t = tuning.Tuner(timer=timer, tunable=lambda d: None, device_facts=lambda d: ("fake-gpu", 90),
                 versions={"vit_kernels": "test", "torch": torch.__version__, "triton": "test"},
                 path=sys.argv[1], candidate_list=cands)
torch.manual_seed(0)
x, w = torch.randn(2, 8, 32), torch.randn(48, 32)
open(sys.argv[2], "w").close()               # ready; start together when the parent says go
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
with tuning.use_tuner(t):
    vk.linear(x, w)
print("TIMED", len(timed), vk.last_decision("linear").backend)
"""


def test_two_processes_started_together_time_a_signature_once(tmp_path):
    """The file lock is held while a signature is tuned: the second process reads the first's choice."""
    import os
    import subprocess
    import sys

    path = str(tmp_path / "tuning.json")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    import time

    ready, go = [str(tmp_path / f"ready{i}") for i in range(2)], str(tmp_path / "go")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, path, ready[i], go],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 300
    while not all(os.path.exists(r) for r in ready) and time.time() < deadline:
        time.sleep(0.05)
    open(go, "w").close()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    lines = [next(line for line in out.splitlines() if line.startswith("TIMED")) for out, _ in outs]
    assert sorted(int(line.split()[1]) for line in lines) == [0, 2]
    assert all(line.split()[2] == "triton" for line in lines)
    assert len(json.load(open(path))["entries"]) == 1


def test_oracle_out_of_memory_keeps_only_the_torch_path():
    """Unchecked candidates are never kept: when the float64 oracle does not fit, only torch competes."""
    from vit_kernels.ops.linear import _launch

    x, w, b, r = linear_args()

    def run(d, *args):
        if d.backend == "reference":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return _launch(d, *args)

    timer = FakeTimer({"triton": 0.01})
    entry = make_tuner(timer).tune_signature(
        "linear", "sig", [Candidate("torch"), Candidate("triton")], run, (x, w, b, r, None)
    )
    assert entry.winner == Candidate("torch") and timer.calls == ["torch"]
    assert "float64 oracle ran out of memory" in entry.results[1].dropped
