"""Measured selection: ``backend="auto"`` times the candidates of each op call signature on the
device and keeps the fastest (as cuDNN's benchmark mode, TensorRT's tactics and Inductor's
max-autotune do).

Flow (``vit_kernels.backends.resolve`` calls :meth:`Tuner.decide` for every ``auto`` call):

1. The signature of the call: op, shapes, dtypes, layout class (contiguous / channels_last /
   strided, and whether the data starts on a 16-byte boundary) of every tensor argument, the op's
   scalars that change the kernels (``key_extra``), device name, compute capability, and the
   versions of vit_kernels, torch and triton.
2. In memory, then in the user cache file (:func:`cache_path`), a choice for that signature is
   reused: nothing is timed.
3. Otherwise every candidate (:func:`candidates`) is checked: each but the plain torch path runs
   once on a random draw of the call's signature (:func:`draw`: new tensors of the same shapes,
   strides, storage offsets, dtypes and device, new values), then every one once on the call's own
   inputs. One that fails to compile, launch or allocate, or whose result disagrees with the float64
   oracle beyond the tolerance rule (:mod:`vit_kernels.testing`, bound from the torch path's own
   error on the same inputs) on either, is dropped with its reason: the call's own inputs' first,
   else "... on a random draw of the call's signature". The call's own values alone can make the
   check vacuous, and the choice is then kept for every later call of the signature, whatever its
   values: all zeros or ones (``vk.tune(model, torch.zeros(...))``), samples all alike (a wrong batch
   stride that reads sample 0 for every sample is right there), zero activations (a GEMM whose K loop
   is broken returns just the bias). The others are timed on the call's own inputs
   (:func:`cuda_timer`: ``triton.testing.do_bench``, warm-up, L2 flushed before each repeat, the
   median) as a fused model runs them from the second call of a signature on (:func:`steady_call`: a
   Triton candidate's recorded launches replayed, as its launch plan does, not its launcher's host
   work), and the fastest is kept, in memory and in the cache file (written atomically under a file
   lock).

The correctness check's memory is bounded (:func:`check_plan`): its float64 working set (the
oracle's inputs, intermediates and output, the comparison's float64 copies), estimated from the
shapes, is at most :data:`CHECK_BYTES` (256 MiB) or the whole call is not checked at once: then the
oracle and the torch baseline run on the first and the last ``keep`` entries of dim 0 only (samples;
rows of a 2-D linear/MLP call; ``keep`` as many as fit the budget, at least 1), and each candidate's
full output is compared on the same entries. That dim is the one no op mixes (attention mixes the
tokens of one sample, the linear and the MLP are per row, the patch embedding per image), so the
check of a slice is the check of those entries of the whole call; its two ends hold the first and
the last tile of a candidate's grid, where a wrong batch stride, offset or last partial tile shows.
Where one entry alone is too big (attention over long sequences), the attention ops also keep the
first and the last heads only (heads never mix). The draw is checked on the same entries, first: its
tensors, oracle and baseline are freed before the call's own oracle runs, and each candidate's output
once compared. So it adds to the check's peak one copy of the call's tensor arguments (at their
dtypes; each over a storage as big as its view reaches), never a second oracle.

An out-of-memory error (``torch.cuda.OutOfMemoryError``, a RuntimeError "out of memory") in a
candidate's run, its check or its timing drops that candidate with that reason (in the tuning table
and the Decision's reasons) and logs a warning; the tuner goes on with the next. When the oracle or
the torch baseline themselves (the draw's or the call's) run out of memory, no candidate can be
checked and only the torch path competes (said in every other candidate's reason, and in a warning).
A choice made short of memory is kept for the process but not written to the cache file: the next
process tunes again.

Candidates per op: the torch path (for attention ops also each SDPA backend: flash, efficient,
cudnn), each Triton path (qkv_attention: ``split``, and ``single_kernel`` where it fits) with its
default tiles, each alternative Triton tile config of :data:`FAMILIES` (lists kept beside the
kernels; ``inspect`` compiles every one of them, see the launchers' ``aot_specs``), and the CUDA
backend. A new Triton kernel family with a config list is one more :class:`Family` entry. On
sm_90 with float16/bfloat16 the TMA GEMM (:mod:`vit_kernels.triton.gemm_tma`) adds its configs
for the call's (N, K) class (``gemm_tma.tune_configs``): path "tma" for linear and the MLP, the
split path's QKV projection for qkv_attention; and the tensor-descriptor flash attention
(:mod:`vit_kernels.triton.attention_tma`, ``attention_tma.tune_configs``) for flash_attention and the
split path's attention; qkv_attention also gets every pair of the two (projection and attention both
on their TMA kernels).

Control: ``tune="on" | "off" | "cache-only"`` on the ops, :func:`mode` as a context manager
(modules, fused models), or ``VIT_KERNELS_TUNE`` in the environment; default on. Tuning applies
to CUDA tensors only; "off" (and "cache-only" without a cached choice) uses the untimed rules of
:mod:`vit_kernels.backends`. For tests the device check, the timer and the candidate list are
parameters of :class:`Tuner` (:func:`use_tuner` installs one).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import os
import tempfile
import threading
import warnings
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import replay

logger = logging.getLogger("vit_kernels")

MODES = ("on", "off", "cache-only")
ENV_MODE = "VIT_KERNELS_TUNE"
FORMAT = 1  # the cache file's layout; a file of another format is ignored and rebuilt

OUT_OF_MEMORY = "out of memory"  # starts the reason of every candidate dropped because memory ran out
UNCHECKED = "not checked: "  # starts the reason of every candidate left unchecked (no oracle or baseline: memory)
CACHE_ONLY_MISS = "cache-only and no cached choice for this signature: untimed rules"

_MODE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("vit_kernels_tune", default=None)


def check_mode(tune: Optional[str], name: str = "tune") -> Optional[str]:
    if tune is not None and tune not in MODES:
        raise ValueError(f"{name}: expected one of {MODES}, got {tune!r}")
    return tune


def _env_mode() -> Optional[str]:
    """``os.environ.get(ENV_MODE)``. Read on every op call (a launch plan's key holds the mode), so
    without ``os.environ.get``'s KeyError round trip when the variable is unset (~0.7 us of the 15 us
    host budget): CPython's os.environ keeps the encoded variables in ``_data`` (kept current by
    ``os.environ[...] = ...``, ``del``, ``monkeypatch.setenv``); elsewhere the plain get."""
    data = getattr(os.environ, "_data", None)
    if data is None or _ENV_MODE_KEY is None:
        return os.environ.get(ENV_MODE)
    v = data.get(_ENV_MODE_KEY)
    return None if v is None else os.environ.decodevalue(v)


_ENV_MODE_KEY = os.environ.encodekey(ENV_MODE) if hasattr(os.environ, "encodekey") else None


def current_mode(tune: Optional[str] = None) -> str:
    """The tuning mode of a call: the ``tune`` argument, else the innermost :func:`mode` scope,
    else ``VIT_KERNELS_TUNE``, else "on"."""
    if tune is not None:
        return tune
    m = _MODE.get()
    if m is not None:
        return m
    env = _env_mode()
    if not env:
        return "on"
    if env not in MODES:
        raise ValueError(f"{ENV_MODE}: expected one of {MODES} in the environment, got {env!r}")
    return env


@contextlib.contextmanager
def mode(tune: str):
    """``with vit_kernels.tuning.mode("off"): model(x)``: the tuning mode of every op call inside
    (an op's own ``tune=`` argument still wins)."""
    check_mode(tune)
    token = _MODE.set(tune)
    try:
        yield
    finally:
        _MODE.reset(token)


# ---------------------------------------------------------------------------------------------
# Candidates


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run an op call. backend: "torch" | "triton" | "cuda"; path: op-specific
    ("split" / "single_kernel" for qkv_attention's Triton kernels, "sdpa_flash" / "sdpa_efficient"
    / "sdpa_cudnn" for a torch path pinned to one SDPA backend, "" for the default); config:
    (launcher keyword, tile config) pairs, () for the launcher's default tiles."""

    backend: str
    path: str = ""
    config: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()

    @property
    def name(self) -> str:
        s = self.backend + (f":{self.path}" if self.path else "")
        for kw, cfg in self.config:
            s += f" {kw}={','.join(map(str, cfg))}"
        return s

    def to_json(self) -> Dict[str, Any]:
        return {"backend": self.backend, "path": self.path, "config": [[k, list(v)] for k, v in self.config]}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Candidate":
        return Candidate(d["backend"], d.get("path", ""), tuple((k, tuple(v)) for k, v in d.get("config", ())))


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the candidate lists depend on, read from one call: dtype, compute capability (90 for
    sm_90), head_dim (attention ops), tokens (qkv_attention), the path the caller forced, and
    gemms: the (N, K) of each GEMM the op's Triton path runs (linear: one; layernorm_gelu_mlp: fc1
    and fc2; qkv_attention: the QKV projection), which picks gemm_tma's config class."""

    dtype: torch.dtype
    arch: int
    head_dim: int = 0
    tokens: int = 0
    path: Optional[str] = None
    gemms: Tuple[Tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Family:
    """Tile configs of one Triton kernel for one op: a candidate
    ``Candidate("triton", path, ((keyword, cfg),))`` for every cfg of ``configs(facts)`` (return
    () for an architecture the kernel does not run on). For the existing kernels the lists hold the
    alternatives only (the default tiles are the plain "triton" candidate). A new kernel family
    (e.g. an sm_90 GEMM) is one more entry with its own path, plus a branch on that path in the
    op's ``_launch`` that passes ``keyword=cfg`` to its launcher; its configs belong in its
    ``aot_specs`` so that ``inspect`` compiles them."""

    op: str
    path: str
    keyword: str
    configs: Callable[[Facts], Sequence[Tuple[int, ...]]]


def _gemm_configs(f: Facts):
    from .triton import gemm

    return gemm.tune_configs(f.dtype, f.arch)


def _patch_configs(f: Facts):
    from .triton import gemm

    return gemm.tune_configs(f.dtype, f.arch, patch=True)


def _tma_configs(f: Facts):
    from .triton import gemm_tma

    return gemm_tma.tune_configs(f.dtype, f.arch, f.gemms)


def _attention_configs(f: Facts):
    from .triton import attention

    return attention.tune_configs(f.dtype, f.head_dim, f.arch)


def _attention_tma_configs(f: Facts):
    from .triton import attention_tma

    return attention_tma.tune_configs(f.dtype, f.head_dim, f.arch)


FAMILIES: Tuple[Family, ...] = (
    Family("linear", "", "gemm_config", _gemm_configs),
    Family("layernorm_gelu_mlp", "", "gemm_config", _gemm_configs),
    Family("patch_embed", "", "gemm_config", _patch_configs),
    Family("flash_attention", "", "attention_config", _attention_configs),
    Family("qkv_attention", "split", "gemm_config", _gemm_configs),
    Family("qkv_attention", "split", "attention_config", _attention_configs),
    # sm_90's TMA GEMM (gemm_tma): its own path for linear and the MLP (both GEMMs on it); for
    # qkv_attention the split path with its QKV projection on it.
    Family("linear", "tma", "tma_config", _tma_configs),
    Family("layernorm_gelu_mlp", "tma", "tma_config", _tma_configs),
    Family("qkv_attention", "split", "tma_config", _tma_configs),
    # sm_90's tensor-descriptor flash attention (attention_tma): flash_attention and the split path's
    # attention, float16/bfloat16 (float32 keeps the pointer kernel).
    Family("flash_attention", "", "attention_tma_config", _attention_tma_configs),
    Family("qkv_attention", "split", "attention_tma_config", _attention_tma_configs),
)
ATTENTION_OPS = ("flash_attention", "qkv_attention")
# The path an op records for a candidate without one (qkv_attention's torch path says "torch"), set
# on the cached Decision so the op does not replace it on every call.
DECISION_PATHS = {("qkv_attention", "torch"): "torch", ("qkv_attention", "cuda"): "split"}
SDPA_PATHS = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn")


def unknown_candidate(op: str, c: Candidate) -> Optional[str]:
    """None when :func:`candidates` can make ``c`` for ``op`` (its backend, path and config keywords; a
    config's values are tuples of ints), else why not. Read back from a cache file, anything else would be
    launched as written (or reported as what ran while another path did)."""
    ops = {fam.op for fam in FAMILIES}
    if op not in ops:
        return f"op {op!r} is not one of {sorted(ops)}"
    if not (isinstance(c.backend, str) and isinstance(c.path, str)):
        return "backend and path are not strings"
    paths = {
        "torch": {""} | (set(SDPA_PATHS) if op in ATTENTION_OPS else set()),
        "triton": {""}
        | {f.path for f in FAMILIES if f.op == op}
        | ({"single_kernel"} if op == "qkv_attention" else set()),
        "cuda": {"split" if op == "qkv_attention" else ""},
    }
    if c.path not in paths.get(c.backend, ()):
        return f"backend {c.backend!r} with path {c.path!r} is not a candidate of {op}"
    keywords = {f.keyword for f in FAMILIES if f.op == op} if c.backend == "triton" else set()
    for kw, cfg in c.config:
        if kw not in keywords or not all(type(v) is int for v in cfg):
            return f"config {kw}={cfg!r} is not a tile config of {op}'s {c.backend} candidates"
    return None


def facts(op: str, tensors: Sequence[Optional[torch.Tensor]], key_extra: tuple, arch: int) -> Facts:
    """The :class:`Facts` of one call (tensors as the op passes them to resolve)."""
    t0 = tensors[0]
    if op == "flash_attention":
        return Facts(t0.dtype, arch, head_dim=t0.shape[-1])
    if op == "qkv_attention":
        num_heads, path = key_extra
        w = tensors[1]
        return Facts(
            t0.dtype,
            arch,
            head_dim=w.shape[0] // 3 // num_heads,
            tokens=t0.shape[1],
            path=path,
            gemms=(tuple(w.shape),),
        )
    if op == "linear":
        return Facts(t0.dtype, arch, gemms=(tuple(tensors[1].shape),))
    if op == "layernorm_gelu_mlp":  # (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, ...)
        return Facts(t0.dtype, arch, gemms=(tuple(tensors[3].shape), tuple(tensors[5].shape)))
    return Facts(t0.dtype, arch)


def candidates(op: str, f: Facts, available: Sequence[str], device_type: str) -> List[Candidate]:
    """Every candidate of ``op`` for a call with facts ``f``; ``available``: the backends that can
    run this call here (torch always)."""
    out = []
    if f.path in (None, "split") or op != "qkv_attention":
        out.append(Candidate("torch"))
        if op in ATTENTION_OPS and device_type == "cuda":
            out += [Candidate("torch", p) for p in SDPA_PATHS]
    if "triton" in available:
        if op == "qkv_attention":
            from .triton import qkv_attention as tq

            paths = [f.path] if f.path else ["split", "single_kernel"]
            for p in paths:
                if p == "split" or tq.single_kernel_fits(f.dtype, f.tokens, f.head_dim, f.arch):
                    out.append(Candidate("triton", p))
        else:
            out.append(Candidate("triton"))
        for fam in FAMILIES:
            if fam.op == op and (not fam.path or f.path in (None, fam.path)):
                out += [Candidate("triton", fam.path, ((fam.keyword, tuple(c)),)) for c in fam.configs(f)]
        if op == "qkv_attention" and f.path in (None, "split"):
            # sm_90: both halves of the split path on their TMA kernels, every pair (the kernels compile
            # once per config whatever the pairing, so the pairs cost timing only).
            out += [
                Candidate("triton", "split", (("tma_config", tuple(g)), ("attention_tma_config", tuple(a))))
                for g in _tma_configs(f)
                for a in _attention_tma_configs(f)
            ]
    if "cuda" in available and f.path in (None, "split"):
        out.append(Candidate("cuda", "split" if op == "qkv_attention" else ""))
    if not any(c.backend == "torch" for c in out):  # the caller forced a path torch does not have
        out.insert(0, Candidate("torch"))
    return out


# ---------------------------------------------------------------------------------------------
# Timing


def cuda_timer(candidate: Candidate, fn: Callable[[], Any]) -> float:
    """Median ms of ``fn()`` on the current CUDA device: ``triton.testing.do_bench`` (25 ms of
    warm-up, 100 ms of repeats, L2 flushed before each repeat by writing a 256 MB buffer, CUDA
    events), else ``torch.utils.benchmark`` (its own warm-up, median of blocked runs; no flush)."""
    try:
        from triton.testing import do_bench
    except Exception:  # pragma: no cover - triton is a torch dependency on Linux
        from torch.utils import benchmark

        return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def steady_call(run: "Runner", d, args: tuple, rec: "replay.Recording", out: Any) -> Callable[[], Any]:
    """The call the timer times for candidate Decision ``d``: ``run(d, *args)`` as a fused model's
    launch plan makes it on every call after a signature's first (vit_kernels.library). For a Triton
    candidate whose launches ``rec`` (recorded while ``run`` made ``out``) replay: the replay (fresh
    allocations, the launches; none of the checks and launcher host work that the first call alone
    pays, which at small batches would weigh on Triton's times and not on torch's); else ``run`` itself
    (a plan calls the launch as it is)."""
    if d.backend == "triton":
        tensors = tuple(a if isinstance(a, torch.Tensor) else None for a in args)
        r = replay.Replay.build(rec, tensors, out)
        if isinstance(r, replay.Replay):
            return lambda: r(tensors)
    return lambda: run(d, *args)


def cuda_tunable(device: torch.device) -> Optional[str]:
    """None when calls on ``device`` are tuned (CUDA devices), else why not."""
    if device.type != "cuda":
        return f"tensors are on {device.type}: timings need a CUDA device; the untimed rules apply"
    return None


def cuda_device_facts(device: torch.device) -> Tuple[str, int]:
    """(device name, compute capability as an int) of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), 10 * major + minor


def library_versions() -> Dict[str, str]:
    from . import __version__

    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = "none"
    return {"vit_kernels": __version__, "torch": torch.__version__, "triton": tv}


def cache_path() -> str:
    """The user cache file: $VIT_KERNELS_TUNE_CACHE, else tuning.json in $VIT_KERNELS_CACHE, else
    in ~/.cache/vit_kernels (the directory the CUDA extension's JIT build uses too)."""
    p = os.environ.get("VIT_KERNELS_TUNE_CACHE")
    if p:
        return p
    d = os.environ.get("VIT_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vit_kernels")
    return os.path.join(d, "tuning.json")


def layout_class(t: torch.Tensor) -> str:
    """ "contiguous", "channels_last" (4-D), or "strided:<strides>" for anything else; followed by
    " ptr%16=<r>" when the data does not start on a 16-byte boundary (a view at an offset): the TMA
    kernels cannot read it, so a choice made on aligned data is not one for it."""
    if t.is_contiguous():
        cls = "contiguous"
    elif t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        cls = "channels_last"
    else:
        cls = "strided:" + ",".join(map(str, t.stride()))
    r = t.data_ptr() & 15
    return f"{cls} ptr%16={r}" if r else cls


# ---------------------------------------------------------------------------------------------
# The correctness check: what part of a call it covers, what memory it takes

CHECK_BYTES = 256 << 20  # 256 MiB: the check's float64 working set up to which a whole call is checked

# op -> the positions, in the op's run arguments, of the tensors whose dim 0 is the op's independent
# dim (the samples; the rows of a 2-D linear or MLP call); the output's dim 0 is the same dim. No op
# mixes two entries of that dim: attention mixes the tokens of one sample (never two samples), the
# linear and the MLP are per row, the patch embedding per image. pos_embed and cls_token are shared by
# every image, the weights by every row: they are never sliced.
BATCHED_ARGS: Dict[str, Tuple[int, ...]] = {
    "linear": (0, 3),  # x, residual
    "layernorm_gelu_mlp": (0, 7),  # x, residual
    "qkv_attention": (0,),  # x
    "flash_attention": (0, 1, 2),  # q, k, v
    "patch_embed": (0,),  # images
}


def _costs(op: str, args: tuple) -> Optional[Tuple[int, int, int]]:
    """(shared, per_head, heads): the float64 elements the check holds at its peak per entry of dim 0
    (an upper estimate, see :func:`check_plan`) are shared + per_head * heads; heads = 0 for the ops
    without heads. None for an op this does not know (its whole call is checked)."""
    a = args[0]
    if op == "linear":  # x (n, ..., K), weight (O, K)
        rows, (O, K) = math.prod(a.shape[1:-1]), args[1].shape
        return rows * (K + 6 * O), 0, 0  # x; x @ w^T, + bias, * layer_scale, + residual (two alive at once)
    if op == "layernorm_gelu_mlp":  # x (n, ..., K), fc1_weight (Hd, K), fc2_weight (O, Hd)
        rows, K, Hd, O = math.prod(a.shape[1:-1]), a.shape[-1], args[3].shape[0], args[5].shape[0]
        return rows * (3 * K + 6 * Hd + 6 * O), 0, 0  # x, LayerNorm's temporaries; fc1 + bias, GELU's; fc2's
    if op == "qkv_attention":  # x (n, N, C), qkv_weight (3 H hd, C)
        N, C, H = a.shape[1], a.shape[2], args[5]
        hd = args[1].shape[0] // 3 // H
        return N * 3 * C, N * 12 * hd + 3 * N * N, H  # per head: q, k, v and copies; the (N, N) scores, scaled, softmax
    if op == "flash_attention":  # q (n, H, Nq, D), k and v (n, H, Nk, D)
        H, Nq, D, Nk = a.shape[1], a.shape[2], a.shape[3], args[1].shape[2]
        return 0, 4 * Nq * D + 4 * Nk * D + 3 * Nq * Nk, H
    if op == "patch_embed":  # images (n, C, Hi, Wi), weight (dim, C, p, p)
        dim, p = args[1].shape[0], args[5]
        T = (a.shape[2] // p) * (a.shape[3] // p) + (args[4] is not None)
        return 4 * math.prod(a.shape[1:]) + 6 * T * dim, 0, 0  # pixels converted, patches; tokens, cat, + pos
    return None


def _ends(t: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """The first and the last ``k`` entries of ``t`` along ``dim``."""
    n = t.shape[dim]
    return torch.cat([t.narrow(dim, 0, k), t.narrow(dim, n - k, k)], dim)


def _end_index(i: int, n: int, k: int) -> int:
    """The index in a dim of size n of entry i of its first and last k entries."""
    return i if i < k else n - 2 * k + i


@dataclasses.dataclass(frozen=True)
class CheckPlan:
    """What the tuner's correctness check of one call covers and what it takes.

    entries: the size of dim 0 of the op's batched arguments (:data:`BATCHED_ARGS`); keep: the check
    covers entries [0, keep) and [entries - keep, entries) of that dim (0: all); heads, keep_heads:
    for the attention ops, the call's heads and the first and the last keep_heads of them the check
    covers (0: all); both in the inputs the float64 oracle and the torch baseline see and in every
    candidate's output. full_bytes, bytes: the check's float64 working set for the whole call and
    for this plan (estimates, see :func:`check_plan`)."""

    op: str
    entries: int
    keep: int
    full_bytes: int
    bytes: int
    heads: int = 0
    keep_heads: int = 0
    head_dim: int = 0  # qkv_attention's (its output's columns are heads x head_dim)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The checked part of the op's output ``t`` (``t`` itself when the whole call is checked)."""
        if self.keep:
            t = _ends(t, 0, self.keep)
        if self.keep_heads and self.op == "flash_attention":  # (n, H, N, D)
            t = _ends(t, 1, self.keep_heads)
        elif self.keep_heads:  # qkv_attention: (n, N, H * head_dim), heads concatenated
            t = _ends(t.unflatten(-1, (self.heads, -1)), -2, self.keep_heads).flatten(-2)
        return t

    def inputs(self, args: tuple) -> tuple:
        """The op's run arguments cut to the checked part."""
        if self.keep:
            batched = BATCHED_ARGS[self.op]
            args = tuple(_ends(a, 0, self.keep) if i in batched and a is not None else a for i, a in enumerate(args))
        if self.keep_heads and self.op == "flash_attention":  # q, k, v: (n, H, N, D)
            args = tuple(_ends(a, 1, self.keep_heads) for a in args[:3]) + args[3:]
        elif self.keep_heads:  # qkv_attention: qkv_weight (3 H hd, C) and qkv_bias (3 H hd,), rows [q; k; v]
            w, b, H, k = args[1], args[2], self.heads, self.keep_heads
            w = _ends(w.unflatten(0, (3, H, -1)), 1, k).flatten(0, 2)
            b = None if b is None else _ends(b.unflatten(0, (3, H, -1)), 1, k).flatten()
            args = (args[0], w, b) + args[3:5] + (2 * k,) + args[6:]
        return args

    def where(self, index: tuple) -> tuple:
        """The index in the call's output of ``index`` in the checked part."""
        index = list(index)
        if self.keep and index:
            index[0] = _end_index(index[0], self.entries, self.keep)
        if self.keep_heads and self.op == "flash_attention" and len(index) > 1:
            index[1] = _end_index(index[1], self.heads, self.keep_heads)
        elif self.keep_heads and index:  # qkv_attention: the column, head_dim per head
            hd = self.head_dim
            index[-1] = _end_index(index[-1] // hd, self.heads, self.keep_heads) * hd + index[-1] % hd
        return tuple(index)

    @property
    def covers(self) -> str:
        """What the check covers, in words: "the whole call" or "entries 0-2 and 253-255 of 256 along
        dim 0", ", heads 0 and 11 of 12" for attention when the heads are cut too."""
        if not self.keep and not self.keep_heads:
            return "the whole call"
        parts = []
        if self.keep:
            parts.append(f"entries {_ends_text(self.entries, self.keep)} of {self.entries} along dim 0")
        else:
            parts.append("the only entry of dim 0" if self.entries == 1 else f"all {self.entries} entries of dim 0")
        if self.keep_heads:
            parts.append(f"heads {_ends_text(self.heads, self.keep_heads)} of {self.heads}")
        return ", ".join(parts)

    def __str__(self) -> str:
        s = f"{self.covers} ({self.bytes / 2**20:.3g} MiB of float64"
        return s + (f"; the whole call: {self.full_bytes / 2**20:.3g} MiB)" if self.bytes != self.full_bytes else ")")


def _ends_text(n: int, k: int) -> str:
    first = "0" if k == 1 else f"0-{k - 1}"
    last = f"{n - 1}" if k == 1 else f"{n - k}-{n - 1}"
    return f"{first} and {last}"


def check_plan(op: str, args: tuple, budget: int = CHECK_BYTES) -> CheckPlan:
    """The part of a call the tuner's check covers. The check's float64 working set is estimated
    from the shapes: the weights' float64 copies, plus per entry of dim 0 the inputs' copies, the
    largest intermediates alive at once in :mod:`vit_kernels.reference` (attention's (heads, tokens,
    tokens) scores and softmax, the MLP's hidden activations through GELU), the oracle's output and
    the float64 copies of a candidate's output and of the torch baseline that the comparison makes.
    Up to ``budget`` bytes the whole call is checked; above, the first and the last ``keep`` entries
    of dim 0, keep = max(1, the most that fit the budget): the first and the last tile of the batch
    (or rows) dim, where a wrong stride, offset or last partial tile shows. When that is still above
    the budget (attention over long sequences: one sample's scores are heads x tokens^2), the
    attention ops keep the first and the last ``keep_heads`` heads the same way (heads never mix).
    So the check takes at most max(budget, weights + 2 entries (of 2 heads for attention)) bytes,
    whatever the batch."""
    batched = BATCHED_ARGS.get(op)
    costs = _costs(op, args) if batched is not None and args[0].dim() >= 2 else None
    fixed = 8 * sum(
        a.numel() for i, a in enumerate(args) if isinstance(a, torch.Tensor) and (costs is None or i not in batched)
    )
    if costs is None:  # an op this does not know: the whole call (bytes: its inputs' float64 copies only)
        return CheckPlan(op, 0, 0, fixed, fixed)
    shared, per_head, H = costs
    hd = args[1].shape[0] // 3 // H if op == "qkv_attention" else 0
    per = shared + per_head * H
    n = args[0].shape[0]
    full = fixed + 8 * per * n
    if full <= budget:
        return CheckPlan(op, n, 0, full, full, H, 0, hd)
    keep = max(1, (budget - fixed) // (2 * 8 * per))
    if 2 * keep >= n:
        keep = 0
    m = 2 * keep if keep else n
    if fixed + 8 * per * m <= budget or H <= 2:
        return CheckPlan(op, n, keep, full, fixed + 8 * per * m, H, 0, hd)
    keep_heads = max(1, ((budget - fixed) // (8 * m) - shared) // (2 * per_head))
    if 2 * keep_heads >= H:
        return CheckPlan(op, n, keep, full, fixed + 8 * per * m, H, 0, hd)
    return CheckPlan(op, n, keep, full, fixed + 8 * m * (shared + 2 * keep_heads * per_head), H, keep_heads, hd)


# op -> the positions, in the op's run arguments, of its GEMM weights (out features, in features...):
# where one is all zeros its draw is scaled by 1 / sqrt(fan-in), see :func:`draw`
WEIGHT_ARGS: Dict[str, Tuple[int, ...]] = {
    "linear": (1,),  # weight (O, K)
    "layernorm_gelu_mlp": (3, 5),  # fc1_weight (Hd, K), fc2_weight (O, Hd)
    "qkv_attention": (1,),  # qkv_weight (3 H hd, C)
    "patch_embed": (1,),  # weight (dim, C, p, p)
}

DRAWN = "on a random draw of the call's signature"  # in the reason of a candidate that fails there


def draw(op: str, sig: str, args: tuple) -> tuple:
    """A random draw of the call's signature: the op's run arguments ``args`` with each tensor
    replaced by a new one of the same shape, strides, storage offset (so the same ``data_ptr() & 15``),
    dtype and device (everything the signature and the kernels' specialization read), over a fresh
    storage of its own just big enough for its view (an expanded, stride-0 view stays one: its
    repeated entries alike); the other arguments (scalars, patch_embed's pixel norm) as they are.

    The tuner checks every candidate on it as well as on the call's own inputs, whose values may not
    tell a wrong candidate from a right one: all zeros or ones (``vk.tune(model, torch.zeros(...))``),
    samples all alike (a wrong batch stride reads sample 0 for every sample and is right there), zero
    activations (a GEMM whose K loop is broken returns just the bias). A choice is cached for every
    later call of the signature, so it must be right for any values, and for arguments that do not
    alias each other (the signature does not say they do; here none do).

    Values: integer tensors (uint8 images) uniform over 0..255; floating ones normal, scaled to the
    tensor's own root mean square over its finite values (the call's magnitudes: a GEMM's output RMS
    is sqrt(K) times its inputs', what the call's own values give unless they are correlated); where
    that is 0 (all zeros; or no finite value, or its square overflows) a GEMM weight
    (:data:`WEIGHT_ARGS`) by 1 / sqrt(fan-in) and anything else by 1: then each GEMM's output (the
    MLP's hidden and its output at any K, 5120 included; the QKV projection) has an RMS about 1 and
    attention's logits (q . k times the op's scale, about head_dim^-1/2) too, far from float16's
    65504. The generator is the draw's own (torch's global one is left alone), seeded from the
    signature: tuning a signature is reproducible."""
    seed = zlib.crc32(sig.encode())
    weights = WEIGHT_ARGS.get(op, ())
    gens: Dict[torch.device, torch.Generator] = {}
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            g = gens.get(a.device)
            if g is None:
                g = gens[a.device] = torch.Generator(a.device).manual_seed(seed)
            a = _drawn_like(a, g, math.prod(a.shape[1:]) if i in weights else 1)
        out.append(a)
    return tuple(out)


def _drawn_like(t: torch.Tensor, g: torch.Generator, fan_in: int) -> torch.Tensor:
    """A random tensor with ``t``'s signature (see :func:`draw`), drawn from ``g``."""
    size = t.element_size()
    offset = t.storage_offset() + (t.untyped_storage().data_ptr() & 15) // size  # new storages are aligned
    n = offset + 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride())) if t.numel() else offset
    if t.is_floating_point():
        flat = torch.randn(n, generator=g, dtype=t.dtype, device=t.device).mul_(_draw_scale(t, fan_in))
    else:
        flat = torch.randint(0, 256, (n,), generator=g, dtype=t.dtype, device=t.device)
    return flat.as_strided(t.shape, t.stride(), offset)


def _draw_scale(t: torch.Tensor, fan_in: int) -> float:
    """The root mean square of ``t``'s finite values, or 1 / sqrt(fan_in) where that is 0 or overflows.
    Its temporaries (a float32 copy of ``t`` at most; a mask where ``t`` has a value not finite) live
    one tensor at a time, before the draw's oracle runs."""
    v, acc = t.detach(), torch.promote_types(t.dtype, torch.float32)
    rms = float(torch.linalg.vector_norm(v, dtype=acc)) / math.sqrt(max(v.numel(), 1))
    if not math.isfinite(rms):  # inf or nan among the values: the finite ones'
        finite = torch.isfinite(v)
        rms = float(torch.linalg.vector_norm(v.where(finite, 0), dtype=acc)) / math.sqrt(max(int(finite.sum()), 1))
    return rms if 0 < rms < math.inf else fan_in**-0.5


# ---------------------------------------------------------------------------------------------
# The tuner


@dataclasses.dataclass
class Result:
    """One candidate at one signature: ms (None when dropped) and why it was dropped."""

    candidate: Candidate
    ms: Optional[float]
    dropped: str = ""


@dataclasses.dataclass
class Entry:
    """The outcome of tuning one signature: every candidate's result and the winner."""

    op: str
    signature: str
    results: List[Result]
    winner: Candidate

    @property
    def torch_ms(self) -> Optional[float]:
        return next((r.ms for r in self.results if r.candidate == Candidate("torch")), None)

    @property
    def winner_ms(self) -> Optional[float]:
        return next((r.ms for r in self.results if r.candidate == self.winner), None)

    @property
    def speedup(self) -> Optional[float]:
        """torch path ms / winner ms (1.0 when torch won), None when not known."""
        t, w = self.torch_ms, self.winner_ms
        return t / w if t and w else None

    def to_json(self) -> Dict[str, Any]:
        return {
            "op": self.op,
            "winner": self.winner.to_json(),
            "results": [{**r.candidate.to_json(), "ms": r.ms, "dropped": r.dropped} for r in self.results],
        }

    @staticmethod
    def from_json(signature: str, d: Mapping[str, Any]) -> "Entry":
        """The entry a cache file holds for ``signature``. Raises ValueError (or KeyError / TypeError)
        when it is not one this version could have written: an op other than the signature's, a
        candidate :func:`unknown_candidate` refuses, a time that is not a number >= 0 or None, a winner
        that is not among the timed results."""
        op = d["op"]
        if not isinstance(op, str) or signature.split("|", 1)[0] != op:
            raise ValueError(f"op {op!r} is not the signature's")
        results = [Result(Candidate.from_json(r), r["ms"], r.get("dropped", "")) for r in d["results"]]
        winner = Candidate.from_json(d["winner"])
        for c in [r.candidate for r in results] + [winner]:
            why = unknown_candidate(op, c)
            if why:
                raise ValueError(f"candidate {c.name!r}: {why}")
        for r in results:
            ms_ok = r.ms is None or (type(r.ms) in (int, float) and 0 <= r.ms < float("inf"))
            if not ms_ok or not isinstance(r.dropped, str):
                raise ValueError(f"candidate {r.candidate.name!r}: ms {r.ms!r}, dropped {r.dropped!r}")
        if not any(r.candidate == winner and r.ms is not None for r in results):
            raise ValueError(f"the winner {winner.name!r} is not among the timed results")
        return Entry(op, signature, results, winner)

    @property
    def short_of_memory(self) -> bool:
        """True when a candidate was dropped, or none could be checked, because memory ran out: a
        choice of this moment's free memory, kept for this process but never written to the cache
        file (the next process tunes the signature again)."""
        return any(r.dropped.startswith((OUT_OF_MEMORY, UNCHECKED)) for r in self.results)

    def reasons(self) -> Dict[str, str]:
        """backend -> why it was not taken (its best time, or why all its candidates were dropped)."""
        out: Dict[str, str] = {}
        best = self.winner_ms
        for b in ("triton", "cuda", "torch"):
            if b == self.winner.backend:
                continue
            rs = [r for r in self.results if r.candidate.backend == b]
            timed = [r for r in rs if r.ms is not None]
            if timed:
                r = min(timed, key=lambda r: r.ms)
                out[b] = f"measured slower: {r.candidate.name} {r.ms:.4g} ms against {best:.4g} ms"
            elif rs:
                out[b] = "dropped when tuned: " + "; ".join(f"{r.candidate.name}: {r.dropped}" for r in rs)
        return out

    @property
    def label(self) -> str:
        """The signature in a few words (:func:`short_signature`), e.g. ``linear 256x197x768 @ 768x768
        bf16 +bias +residual``."""
        return short_signature(self.signature)

    def rows(self) -> List[Dict[str, Any]]:
        """This entry as rows of the tuning table (:data:`TABLE_COLUMNS`): a heading row (the short
        signature in column "row", empty "candidate"), then the candidates under it, fastest first
        ("row": the name indented). Every row has signature (the short one), key (the full signature),
        candidate, ms (None when dropped), vs_torch (the torch path's ms / this one's), result
        ("chosen", "dropped: why" or "")."""
        label = self.label
        head = {"row": label, "signature": label, "key": self.signature, "candidate": "", "ms": "", "vs_torch": ""}
        out = [{**head, "result": ""}]
        torch_ms = self.torch_ms
        for r in sorted(self.results, key=lambda r: (r.ms is None, r.ms or 0.0)):
            result = "chosen" if r.candidate == self.winner else (f"dropped: {r.dropped}" if r.ms is None else "")
            out.append(
                {
                    "row": "  " + r.candidate.name,
                    "signature": label,
                    "key": self.signature,
                    "candidate": r.candidate.name,
                    "ms": r.ms,
                    "vs_torch": torch_ms / r.ms if torch_ms and r.ms else None,
                    "result": result,
                }
            )
        return out

    def table(self) -> str:
        """This entry as plain text: the full signature, then the table's rows."""
        from .tables import format_table

        return f"{self.signature}\n{format_table(self.rows(), TABLE_COLUMNS)}"

    def summary(self) -> Dict[str, Any]:
        """This entry for a JSON report: the full signature, the short one, and :meth:`to_json`."""
        return {"signature": self.signature, "label": self.label, **self.to_json()}


def _cell(spec: str, unit: str = ""):
    """A tuning table cell: "" stays empty (a heading row), None is "-" (a dropped candidate)."""
    return lambda v: v if v == "" else "-" if v is None else format(v, spec) + unit


# The tuning table (vk.tune_report, the bench's tuned rows): Entry.rows' keys, headers, formats.
TABLE_COLUMNS = [
    ("row", "op signature / candidate"),
    ("ms", "ms", _cell(".4f")),
    ("vs_torch", "x torch", _cell(".2f", "x")),
    ("result", "result"),
]


def starts_group(row: Dict[str, Any]) -> bool:
    """True for a heading row of the tuning table (:meth:`Entry.rows`)."""
    return row.get("candidate") == ""


# How each op's signature reads in the tuning table: its tensors in the order the op passes them to
# resolve, each shown as a shape ("", shapes joined by " @ "), as a flag when present ("+bias"), or
# not at all (None).
LABELS: Dict[str, Tuple[Tuple[str, Optional[str]], ...]] = {
    "linear": (("x", ""), ("weight", ""), ("bias", "+bias"), ("residual", "+residual"), ("layer_scale", "+ls")),
    "qkv_attention": (
        ("x", ""),
        ("qkv_weight", ""),
        ("qkv_bias", "+bias"),
        ("norm_weight", "+ln"),
        ("norm_bias", None),
    ),
    "flash_attention": (("q", ""), ("k", ""), ("v", "")),
    "layernorm_gelu_mlp": (
        ("x", ""),
        ("norm_weight", "+ln"),
        ("norm_bias", None),
        ("fc1_weight", ""),
        ("fc1_bias", "+bias"),
        ("fc2_weight", ""),
        ("fc2_bias", "+bias"),
        ("residual", "+residual"),
        ("layer_scale", "+ls"),
    ),
    "patch_embed": (("images", ""), ("weight", ""), ("bias", "+bias"), ("pos_embed", "+pos"), ("cls_token", "+cls")),
}
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def short_signature(sig: str) -> str:
    """A signature key (``Tuner._signature``: op, key_extra, each tensor's shape:dtype:layout, device,
    versions) in a few words: the op, its main shapes (``@`` between operands, repeats once), the
    dtype(s), its numbers that change the kernels and the optional inputs present, e.g.
    ``qkv_attention 256x197x768 @ 2304x768 bf16 12 heads +bias +ln``; a tensor not contiguous gets
    its layout. A key it cannot read comes back cut to 60 characters."""
    import ast

    op, extra_text, tensors, _ = _split_signature(sig)
    names = LABELS.get(op)
    try:
        extra = ast.literal_eval(extra_text) if extra_text else ()
        if names is None or len(tensors) != len(names):
            raise ValueError(sig)
        shapes, dtypes, flags, layouts = [], [], [], []
        for (name, role), t in zip(names, tensors):
            if t is None or role is None:
                continue
            if role:
                flags.append(role)
                continue
            shape_text, rest = t.split("):", 1)
            dtype, layout = rest.split(":", 1)
            shape = "x".join(str(n) for n in ast.literal_eval(shape_text + ")")) or "scalar"
            if shape not in shapes:
                shapes.append(shape)
            dtypes.append(_DTYPE_NAMES.get(dtype, dtype))
            if layout != "contiguous":
                layouts.append(f"{name} {layout}")
    except (ValueError, SyntaxError, IndexError):
        return sig if len(sig) <= 60 else sig[:59] + "…"
    words = [op, " @ ".join(shapes), "/".join(dict.fromkeys(dtypes))]
    if op == "qkv_attention":
        words.append(f"{extra[0]} heads" + (f" path={extra[1]}" if extra[1] else ""))
    elif op == "layernorm_gelu_mlp" and extra and extra[0] != "none":
        words.append(f"gelu={extra[0]}")
    words += list(dict.fromkeys(flags))
    if layouts:
        words.append("(" + ", ".join(layouts) + ")")
    return " ".join(words)


def _split_signature(sig: str) -> Tuple[str, str, List[Optional[str]], str]:
    """(op, key_extra's repr, each tensor's "shape:dtype:layout" or None, "device:sm_NN") of a key."""
    parts = sig.split("|")
    extra = parts[1][len("extra=") :] if len(parts) > 1 and parts[1].startswith("extra=") else ""
    tensors: List[Optional[str]] = []
    i = 2
    while i < len(parts) and (parts[i] == "-" or parts[i].startswith("(")):
        tensors.append(None if parts[i] == "-" else parts[i])
        i += 1
    return parts[0], extra, tensors, parts[i] if i < len(parts) else ""


def table_rows(entries: Sequence["Entry"]) -> List[Dict[str, Any]]:
    """Every entry's :meth:`Entry.rows`, in order; where the entries come from several devices (a
    cache file shared between GPUs) each signature names its device."""
    devices = {_split_signature(e.signature)[3] for e in entries}
    out = []
    for e in entries:
        rows = e.rows()
        if len(devices) > 1:
            rows[0]["row"] += " on " + _split_signature(e.signature)[3]
        out += rows
    return out


Runner = Callable[..., Any]  # run(decision, *args) -> output tensor


class Tuner:
    """Chooses by measurement and remembers the choices.

    timer(candidate, fn) -> median ms; tunable(device) -> None or why calls there are not tuned;
    device_facts(device) -> (name, compute capability int); versions: library -> version string
    (part of every signature and of the cache file's header); path: the cache file (None: memory
    only); candidate_list(op, facts, available, device_type) -> candidates; check_bytes: the
    correctness check's float64 budget (:func:`check_plan`). The defaults are the real ones; tests
    pass fakes.
    """

    def __init__(
        self,
        *,
        timer: Callable[[Candidate, Callable[[], Any]], float] = cuda_timer,
        tunable: Callable[[torch.device], Optional[str]] = cuda_tunable,
        device_facts: Callable[[torch.device], Tuple[str, int]] = cuda_device_facts,
        versions: Optional[Mapping[str, str]] = None,
        path: Optional[str] = "default",
        candidate_list: Callable[..., List[Candidate]] = candidates,
        check_bytes: int = CHECK_BYTES,
    ):
        self.timer = timer
        self.tunable = tunable
        self.device_facts = device_facts
        self._versions = dict(versions) if versions is not None else None
        self.path = cache_path() if path == "default" else path
        self.candidate_list = candidate_list
        self.check_bytes = check_bytes
        self._mem: Dict[tuple, Tuple[Entry, Any]] = {}  # fast key -> (entry, Decision)
        self._entries: Dict[str, Entry] = {}  # signature -> entry (this process + file)
        self._file_loaded = False
        self._warned = False
        self._save_warned = False
        self._lock = threading.Lock()
        self._key_locks: Dict[tuple, threading.Lock] = {}
        self._misses: set = set()  # fast keys cache-only found no choice for (not looked up again)
        self._facts_cache: Dict[torch.device, Tuple[str, int]] = {}
        self.timed = 0  # candidates timed by this tuner (tests read it)
        self.generation = 0  # bumped whenever entries are added: launch plans made before are stale

    @property
    def versions(self) -> Dict[str, str]:
        if self._versions is None:
            self._versions = library_versions()
        return self._versions

    def plan_state(self, tune: Optional[str]) -> tuple:
        """What a launch plan (vit_kernels.library.plans) made under this tuner depends on: the
        tuner itself, the call's tuning mode, and the entries it knew (a cache-only miss planned
        before vk.tune ran is not replayed after)."""
        return (self, current_mode(tune), self.generation)

    # -- the per-call path -------------------------------------------------------------------
    def decide(
        self,
        op: str,
        device: torch.device,
        tensors: Sequence[Optional[torch.Tensor]],
        key_extra: tuple,
        tune: Optional[str],
        available: Callable[..., Sequence[str]],
        run: Runner,
        args: tuple,
        reasons: Dict[str, str],
    ):
        """The tuned Decision of this call, or None when nothing was timed nor cached (then
        ``reasons["tuning"]`` says why and the untimed rules apply). available(only=("triton", "cuda"))
        -> those of the backends ``only`` that can run this call here (asked when tuning, and for a
        choice's backend before it is used: :meth:`_runnable`)."""
        why = self.tunable(device)
        if why is not None:
            return None
        m = current_mode(tune)
        if m == "off":
            reasons["tuning"] = "off (tune='off' or VIT_KERNELS_TUNE=off): untimed rules"
            return None
        key = (
            op,
            device,
            key_extra,
            tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() & 15) for t in tensors),
        )
        hit = self._mem.get(key)
        if hit is not None:
            return hit[1]
        if m == "cache-only" and key in self._misses:  # looked up before: not in the cache
            reasons["tuning"] = CACHE_ONLY_MISS
            return None
        with self._lock:
            klock = self._key_locks.setdefault(key, threading.Lock())
        with klock:
            hit = self._mem.get(key)
            if hit is not None:
                return hit[1]
            sig, arch = self._signature(op, device, tensors, key_extra)
            f = facts(op, tensors, key_extra, arch)
            entry = self._offered(op, self._lookup(sig), f, device.type)
            if entry is None and m == "cache-only":
                self._misses.add(key)
                reasons["tuning"] = CACHE_ONLY_MISS
                return None
            if entry is None:
                entry = self._tune_and_save(op, sig, device, f, available(), run, args)
            d = self._runnable(op, entry, available)
            self._mem[key] = (entry, d)
            return d

    def _signature(self, op, device, tensors, key_extra) -> Tuple[str, int]:
        f = self._facts_cache.get(device)
        if f is None:
            f = self._facts_cache[device] = self.device_facts(device)
        name, arch = f
        parts = [op, "extra=" + repr(key_extra)]
        for t in tensors:
            parts.append(
                "-" if t is None else f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}:{layout_class(t)}"
            )
        parts.append(f"{name}:sm_{arch}")
        parts += [f"{k}={v}" for k, v in sorted(self.versions.items())]
        return "|".join(parts), arch

    def _runnable(self, op: str, entry: Entry, available: Callable[..., Sequence[str]]):
        """The Decision of ``entry`` for a call here: its winner, or where the winner's backend cannot run
        here (a cache file written where the CUDA extension was built, read where it is not, or the
        backend disabled since) the fastest timed candidate whose backend can (the torch path at least),
        with the reason; never a launch of a backend that is not available."""
        b = entry.winner.backend
        if b == "torch" or b in available((b,)):
            return self._decision(op, entry)
        others = sorted({r.candidate.backend for r in entry.results} - {"torch", b})
        ok = {"torch", *available(tuple(others))}
        timed = [r for r in entry.results if r.ms is not None and r.candidate.backend in ok]
        winner = min(timed, key=lambda r: r.ms).candidate if timed else Candidate("torch")
        d = self._decision(op, dataclasses.replace(entry, winner=winner))
        why = f"the cached choice {entry.winner.name} cannot run here: backend {b!r} is not available "
        why += f"(backend={b!r} says why)"
        return dataclasses.replace(d, reasons={**d.reasons, b: why})

    @staticmethod
    def _decision(op: str, entry: Entry):
        from .backends import Decision

        w = entry.winner
        path = w.path or DECISION_PATHS.get((op, w.backend), "")
        return Decision(op, w.backend, "auto", entry.reasons(), path, w.config, entry)

    # -- tuning ------------------------------------------------------------------------------
    def _offered(self, op: str, entry: Optional[Entry], f: Facts, device_type: str) -> Optional[Entry]:
        """``entry`` when its winner is a candidate this code offers for a call with facts ``f``, else None
        (the signature is tuned again, after one warning). A cache file written by another build of the
        same version (config lists changed since) or edited by hand can name tiles no launcher list has:
        launched as written, or refused by the launcher (an error from an auto call)."""
        if entry is None:
            return None
        w = entry.winner
        if w in self.candidate_list(op, f, [w.backend] if w.backend != "torch" else [], device_type):
            return entry
        self._warn(f"{self.path}: the choice for {entry.label}, {w.name}, is not one this code offers")
        return None

    def _tune_and_save(self, op, sig, device, f: Facts, available, run, args) -> Entry:
        lock = self._file_lock()
        with lock:
            if self.path is not None:
                self._load_file(force=True)  # another process may have tuned it meanwhile
                entry = self._offered(op, self._entries.get(sig), f, device.type)
                if entry is not None:
                    return entry
            entry = self.tune_signature(op, sig, self.candidate_list(op, f, available, device.type), run, args)
            self._entries[sig] = entry
            self.generation += 1
            self._save()
        logger.info("tuned %s", entry.table())
        return entry

    def tune_signature(self, op: str, sig: str, cands: Sequence[Candidate], run: Runner, args: tuple) -> Entry:
        """Run every candidate once on the call's inputs (and each but the torch path once on a
        :func:`draw` of its signature before), drop those that fail (an out-of-memory included) or
        disagree with the oracle on the entries :func:`check_plan` picks of either, time the rest on
        the call's inputs, keep the fastest.
        The candidates' runs are not the caller's op calls: they record no Decision (a timer runs
        each hundreds of times; see backends.unrecorded)."""
        from .backends import unrecorded

        gemm_tma = _gemm_tma()
        scratch = gemm_tma.tuning_state() if gemm_tma is not None else None
        entry = None
        try:
            with unrecorded():
                entry = self._tune_signature(op, sig, cands, run, args)
        finally:  # the TMA GEMM's last LayerNorm route is the caller's, not a candidate's
            if gemm_tma is not None:
                gemm_tma.restore_tuning_state(scratch)
        return entry

    def _tune_signature(self, op: str, sig: str, cands: Sequence[Candidate], run: Runner, args: tuple) -> Entry:
        from .backends import Decision

        sync = _synchronize(args)
        plan = check_plan(op, args, self.check_bytes)
        label = short_signature(sig)
        if plan.covers != "the whole call":
            logger.info("tuning %s: the check covers %s", label, plan)
        torch_c = Candidate("torch")
        checked = [c for c in cands if c != torch_c]
        oracle = baseline = None
        failed: Dict[Candidate, str] = {}
        wrong: Dict[Candidate, str] = {}
        unchecked = ""  # why no candidate but torch can be checked (then none but torch is kept)
        if checked:  # the draw first: its tensors, oracle and baseline are freed before the call's are made
            failed, wrong, unchecked = self._check_draw(op, sig, label, checked, run, args, plan, sync)
        if not unchecked:
            oracle, baseline, unchecked = self._references(op, run, args, plan, sync)
        if unchecked:
            logger.warning("vit_kernels tuning %s: %s; only the torch path competes", label, unchecked)
        results: List[Result] = []
        for c in cands:
            if unchecked and c != torch_c:
                results.append(Result(c, None, unchecked))
                continue
            if c in failed:  # its run or check raised on the draw
                results.append(Result(c, None, failed[c]))
                continue
            d = Decision(op, c.backend, "auto", {}, c.path, c.config)
            try:
                with replay.recording() as rec:
                    out = run(d, *args)
                sync()
                # wrong on the call's own inputs says so; else wrong on the draw (they could not tell)
                why = None if c == torch_c else self._disagrees(c, out, oracle, baseline, plan) or wrong.get(c)
                call = steady_call(run, d, args, rec, out) if why is None else None
                out = None
                if why is not None:
                    results.append(Result(c, None, why))
                    continue
                ms = float(self.timer(c, call))
                self.timed += 1
            except Exception as e:  # a failed compile, launch or allocation drops this candidate only
                out = None
                results.append(Result(c, None, self._dropped(label, c, e)))
                continue
            results.append(Result(c, ms))
        timed = [r for r in results if r.ms is not None]
        winner = min(timed, key=lambda r: r.ms).candidate if timed else torch_c
        return Entry(op, sig, results, winner)

    def _check_draw(
        self, op: str, sig: str, label: str, cands: Sequence[Candidate], run: Runner, args: tuple, plan, sync
    ) -> Tuple[Dict[Candidate, str], Dict[Candidate, str], str]:
        """The check of ``cands`` on :func:`draw` of the call's signature, on the entries ``plan``
        picks: (failed, wrong, unchecked): candidate -> why its run or check raised; candidate -> why
        its result disagrees with the oracle; why no candidate can be checked (the draw's oracle or
        baseline ran out of memory), else "". The drawn tensors and each output are freed once checked."""
        from .backends import Decision

        drawn = draw(op, sig, args)
        oracle, baseline, unchecked = self._references(op, run, drawn, plan, sync, f" {DRAWN}")
        failed: Dict[Candidate, str] = {}
        wrong: Dict[Candidate, str] = {}
        if unchecked:
            return failed, wrong, unchecked
        for c in cands:
            try:
                out = run(Decision(op, c.backend, "auto", {}, c.path, c.config), *drawn)
                sync()
                why = self._disagrees(c, out, oracle, baseline, plan, f" {DRAWN}, not on the call's own inputs")
            except Exception as e:  # as on the call's own inputs: this candidate only
                failed[c] = self._dropped(label, c, e)
                continue
            finally:
                out = None
            if why is not None:
                wrong[c] = why
        return failed, wrong, ""

    @staticmethod
    def _references(op: str, run: Runner, args: tuple, plan, sync, on: str = "") -> Tuple[Any, Any, str]:
        """(oracle, baseline, "") for the run arguments ``args`` (the call's, or the draw's: ``on`` says
        which in a reason): the float64 oracle on the entries ``plan`` picks, and the tolerance rule's
        baseline, the torch path at the call's dtype on the same entries. (None, None, why) when
        either runs out of memory (then no candidate can be checked)."""
        from .backends import Decision

        try:
            oracle = run(Decision(op, "reference", "auto"), *[_f64(a) for a in plan.inputs(args)])
            sync()
        except Exception as e:
            if not out_of_memory(e):
                raise
            return None, None, f"{UNCHECKED}the float64 oracle ran {OUT_OF_MEMORY} on {plan}{on} ({_first_line(e)})"
        try:
            baseline = plan.take(run(Decision(op, "torch", "auto"), *args))
            sync()
        except Exception as e:
            if not out_of_memory(e):
                raise
            why = f"{UNCHECKED}the torch path (the tolerance rule's baseline) ran {OUT_OF_MEMORY}{on}"
            return None, None, f"{why} ({_first_line(e)})"
        return oracle, baseline, ""

    @staticmethod
    def _disagrees(c: Candidate, out: torch.Tensor, oracle, baseline, plan, on: str = "") -> Optional[str]:
        """Why candidate ``c``'s output ``out`` (of the call, or of the draw: ``on`` says which) fails the
        tolerance rule on the entries ``plan`` picks, with the index in the call; None when it passes."""
        from .testing import compare

        cmp = compare(plan.take(out), oracle, baseline, name=c.name)
        if cmp.ok:
            return None
        why = "disagrees with the oracle beyond the tolerance rule" + on
        if plan.covers != "the whole call":  # the index in the call, not in the checked part
            cmp = dataclasses.replace(cmp, where=plan.where(cmp.where))
            why += f" (checked on {plan.covers})"
        return f"{why}: {cmp}"

    @staticmethod
    def _dropped(label: str, c: Candidate, e: BaseException) -> str:
        """Why candidate ``c`` is dropped after exception ``e``; an out-of-memory also logs a warning
        (the candidate might have won on a GPU with more free memory) and frees the allocator's cache."""
        if not out_of_memory(e):
            return f"failed: {type(e).__name__}: {_first_line(e)}"
        why = f"{OUT_OF_MEMORY}: {type(e).__name__}: {_first_line(e)}"
        logger.warning("vit_kernels tuning %s: %s dropped: %s", label, c.name, why)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return why

    # -- the cache file ----------------------------------------------------------------------
    def _lookup(self, sig: str) -> Optional[Entry]:
        e = self._entries.get(sig)
        if e is None and self.path is not None and not self._file_loaded:
            with self._file_lock():
                self._load_file()
            e = self._entries.get(sig)
        return e

    @contextlib.contextmanager
    def _file_lock(self):
        """Hold the cache file's lock (a file beside it) inside the block. Where its folder cannot be made
        or the lock cannot be taken (a regular file in the folder's place, a read-only folder): one warning,
        and from then on the choices are kept in this process only (``path`` None)."""
        if self.path is None:
            yield
            return
        from filelock import FileLock

        lock: Optional[FileLock] = FileLock(self.path + ".lock", timeout=600)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            lock.acquire()
        except OSError as e:  # filelock's Timeout too (a TimeoutError)
            lock = None
            self._memory_only(e)
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def _memory_only(self, e: BaseException) -> None:
        path, self.path = self.path, None
        if not self._save_warned:
            self._save_warned = True
            warnings.warn(
                f"vit_kernels tuning: cannot use {path} ({type(e).__name__}: {e}); the choices are kept in "
                f"this process only",
                RuntimeWarning,
                stacklevel=3,
            )

    def _load_file(self, force: bool = False) -> None:
        if self.path is None or (self._file_loaded and not force):
            return
        self._file_loaded = True
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            self._warn(f"{self.path} is not a readable tuning cache ({type(e).__name__}: {e})")
            return
        if (
            not isinstance(data, dict)
            or data.get("format") != FORMAT
            or data.get("versions") != self.versions
            or not isinstance(data.get("entries"), dict)
        ):
            head = data if isinstance(data, dict) else {}
            self._warn(
                f"{self.path} was written by another version (format {head.get('format')}, versions "
                f"{head.get('versions')}; this is format {FORMAT}, {self.versions})"
            )
            return
        bad = []  # (signature, why) of the entries this version could not have written: skipped, tuned again
        for sig, rec in data["entries"].items():
            if sig not in self._entries:
                try:
                    self._entries[sig] = Entry.from_json(sig, rec)
                    self.generation += 1
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    bad.append((sig, f"{type(e).__name__}: {e}"))
        if bad:
            self._warn(
                f"{self.path}: {len(bad)} malformed entr{'y' if len(bad) == 1 else 'ies'} (first: {bad[0][0]!r}, {bad[0][1]})"
            )

    def _warn(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"vit_kernels tuning: {what}; ignored, the choices are timed again and the file is rewritten",
                RuntimeWarning,
                stacklevel=2,
            )

    def _save(self) -> None:
        """Write every entry atomically (a temporary file, then os.replace); the caller holds the lock.
        An entry tuned short of memory (:attr:`Entry.short_of_memory`) stays out of the file."""
        if self.path is None:
            return
        data = {
            "format": FORMAT,
            "versions": self.versions,
            "entries": {s: e.to_json() for s, e in sorted(self._entries.items()) if not e.short_of_memory},
        }
        d = os.path.dirname(os.path.abspath(self.path))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tuning.", suffix=".tmp", dir=d)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as e:  # a folder in the file's place, a read-only disk, ...: the choices stay in memory
            with contextlib.suppress(OSError, TypeError):
                os.unlink(tmp)
            if not self._save_warned:
                self._save_warned = True
                warnings.warn(
                    f"vit_kernels tuning: cannot write {self.path} ({type(e).__name__}: {e}); the choices are "
                    f"kept in this process only",
                    RuntimeWarning,
                    stacklevel=2,
                )
        except BaseException:
            with contextlib.suppress(OSError, TypeError):
                os.unlink(tmp)
            raise

    # -- reports -----------------------------------------------------------------------------
    def entries(self) -> List[Entry]:
        """Every signature this process tuned or read from the cache file."""
        return [self._entries[s] for s in sorted(self._entries)]


def _gemm_tma():
    """vit_kernels.triton.gemm_tma, or None where triton cannot be imported."""
    try:
        from .triton import gemm_tma
    except ImportError:  # pragma: no cover - triton is a torch dependency on Linux
        return None
    return gemm_tma


def _f64(a):
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def _synchronize(args) -> Callable[[], None]:
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if dev is not None and dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def out_of_memory(e: BaseException) -> bool:
    """True when ``e`` says an allocation failed: torch.cuda.OutOfMemoryError, or a RuntimeError "out
    of memory" (CUDA, Triton's launches) / "not enough memory" (the CPU allocator)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else ""


_TUNER: Optional[Tuner] = None
_TUNER_LOCK = threading.Lock()


def get_tuner() -> Tuner:
    """The process's tuner (created on first use with the real timer and cache file)."""
    global _TUNER
    t = _TUNER
    if t is None:
        with _TUNER_LOCK:
            if _TUNER is None:
                _TUNER = Tuner()
            t = _TUNER
    return t


@contextlib.contextmanager
def use_tuner(tuner: Tuner):
    """Install ``tuner`` as the process's tuner inside the block (tests: fake timers, devices)."""
    global _TUNER
    old = _TUNER
    _TUNER = tuner
    try:
        yield tuner
    finally:
        _TUNER = old


def tune_report(file=None, *, print_it: bool = True) -> List[Entry]:
    """Print the tuning table: each tuned op signature in short (:func:`short_signature`; the full
    keys are in the cache file) with its candidates grouped under it, their times, speed-up over the
    torch path and the winner; a rich table on a terminal, plain text otherwise (the bench's table).
    Returns the entries (``Entry.results``, ``Entry.winner``, ``Entry.speedup``, ``Entry.signature``)."""
    entries = get_tuner().entries()
    if print_it:
        if not entries:
            print("no op signature tuned yet (tuning times op calls on CUDA tensors with backend='auto')", file=file)
        else:
            from .tables import print_table

            print_table(table_rows(entries), TABLE_COLUMNS, title="tuning table:", file=file, group=starts_group)
    return entries


# ---------------------------------------------------------------------------------------------
# Whole models

OP_PARTS = {
    "qkv_attention": "attention",
    "flash_attention": "attention",
    "linear": "attention",
    "layernorm_gelu_mlp": "mlp",
    "patch_embed": "patch_embed",
}


@dataclasses.dataclass
class ModelTuning:
    """What :func:`tune` did: fused_ms, unfused_ms (median ms per forward on the example inputs,
    None when nothing could be timed), the op entries it tuned, per fused part (module path) the
    decisions its op calls took, and whether the fused parts fell back to the torch path."""

    fused_ms: Optional[float]
    unfused_ms: Optional[float]
    entries: List[Entry]
    parts: Dict[str, List[Any]]
    fell_back: List[str]
    message: str

    @property
    def speedup(self) -> Optional[float]:
        return self.unfused_ms / self.fused_ms if self.fused_ms and self.unfused_ms else None

    def __str__(self) -> str:
        lines = [self.message]
        for path, ds in self.parts.items():
            lines.append(f"  {path}: " + "; ".join(decision_note(d) for d in ds))
        return "\n".join(lines)


def decision_note(d) -> str:
    """One line for a fused part's op call: backend, path, config, measured speed-up over torch."""
    s = f"{d.op}: {d.backend}" + (f" {d.path}" if d.path and d.path != d.backend else "")
    for kw, cfg in d.config:
        s += f" {kw}={','.join(map(str, cfg))}"
    e = d.tuned
    if e is not None and e.speedup:
        s += f", measured {e.speedup:.2f}x the torch path ({e.winner_ms:.4g} ms vs {e.torch_ms:.4g} ms)"
    elif e is None:
        why = d.reasons.get("tuning")
        s += f" (untimed{': ' + why if why else ''})"
    return s


def _fused_parts(model) -> Dict[str, Any]:
    from .nn import _Fused
    from .swap.wrapper import SwapWrapper

    return {
        p: m
        for p, m in model.named_modules()
        if isinstance(m, SwapWrapper) or (isinstance(m, _Fused) and not getattr(m, "vk_fuse_excluded", False))
    }


def tune(model, example_inputs, *, fallback: bool = True) -> ModelTuning:
    """Tune a fused model ahead of time: run it on ``example_inputs`` (a tensor or a tuple of
    positional inputs) with tuning on, so every fused op signature it meets is timed and cached;
    then time the whole fused model against the unfused computation (every fused part on the torch
    path: F.layer_norm, cuBLAS, SDPA) and report both. When the fused model is not faster it says
    so and (``fallback``) its fused parts with backend "auto" take the torch path (parts given a
    backend explicitly keep it). Returns a :class:`ModelTuning` (printable).
    Call it once per input shape the model will meet (batch size, image size)."""
    from . import backends

    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    parts = _fused_parts(model)
    if not parts:
        raise ValueError(f"model: no fused part found in {type(model).__name__}; call vit_kernels.fuse(model) first")
    for m in parts.values():  # a part an earlier tune call sent to the torch path competes again
        if m.__dict__.pop("vk_tune_note", None) is not None and m.backend == "torch":  # (not one set since)
            m.backend = "auto"
    tuner = get_tuner()
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    recorded: Dict[str, List[Any]] = {}

    def pre(path):
        def hook(module, args):
            recorded.setdefault(path, []).append(backends.start_recording())

        return hook

    def post(path):
        def hook(module, args, out):
            backends.stop_recording(recorded[path][-1])

        return hook

    handles = [
        h for p, m in parts.items() for h in (m.register_forward_pre_hook(pre(p)), m.register_forward_hook(post(p)))
    ]
    try:
        with torch.no_grad(), mode("on"):
            model(*inputs)
    finally:
        for calls in (c for lists in recorded.values() for c in lists):
            backends.stop_recording(calls)
        for h in handles:
            h.remove()
    recorded = {p: [d for calls in lists for d in calls] for p, lists in recorded.items()}
    for p, ds in recorded.items():
        parts[p].vk_decisions = tuple(ds)
    tuned = {d.tuned.signature for ds in recorded.values() for d in ds if d.tuned is not None}  # (a copy: _runnable)
    entries = [e for e in tuner.entries() if e.signature in tuned]
    why = tuner.tunable(device)
    if why is not None:
        return ModelTuning(None, None, entries, recorded, [], f"nothing timed: {why}")

    def forward():
        return model(*inputs)

    saved = {p: m.backend for p, m in parts.items()}
    with torch.no_grad(), mode("cache-only"), backends.unrecorded():  # the timer's runs are not the caller's calls
        fused_ms = float(tuner.timer(Candidate("model", "fused"), forward))
        try:
            for m in parts.values():
                m.backend = "torch"
            unfused_ms = float(tuner.timer(Candidate("model", "unfused"), forward))
        finally:
            for p, m in parts.items():
                m.backend = saved[p]
    fell_back: List[str] = []
    head = f"fused model {fused_ms:.4g} ms, unfused (torch path) {unfused_ms:.4g} ms per forward"
    if fused_ms < unfused_ms:
        msg = f"{head}: fused is {unfused_ms / fused_ms:.2f}x faster"
    else:
        msg = f"{head}: the fused model is NOT faster than the unfused one"
        if fallback:
            fell_back = [p for p, m in parts.items() if m.backend == "auto"]
            kept = [f"{p} (backend={m.backend!r})" for p, m in parts.items() if m.backend != "auto"]
            note = (
                f"vit_kernels.tune: the fused model measured {fused_ms:.4g} ms against {unfused_ms:.4g} ms "
                f"unfused; this part runs the torch path"
            )
            for p in fell_back:
                parts[p].backend = "torch"
                parts[p].vk_tune_note = note
            msg += f"; {len(fell_back)} fused parts now take the torch path"
            if kept:
                msg += f"; kept as asked: {', '.join(kept)}"
    logger.info("%s", msg)
    return ModelTuning(fused_ms, unfused_ms, entries, recorded, fell_back, msg)
