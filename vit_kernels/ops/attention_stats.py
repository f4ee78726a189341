"""Attention statistics beside the output of the fused attention ops: what a request asks for, what
comes back, the checks, the plain PyTorch path, and the recording context.

A :class:`StatsRequest` passed as ``stats=`` to :func:`vit_kernels.ops.flash_attention` or
:func:`vit_kernels.ops.qkv_attention` makes the op return ``(out, AttentionStats)``:

- ``rows``: the attention probabilities of chosen query rows (the class token, row 0, by default),
  (batch, heads, len(rows), kv_tokens) in the inputs' dtype;
- ``distance``: the ViT paper's mean attention distance per head, (batch, heads) float32, pixels
  (asked for by giving the patch ``grid``; see :func:`vit_kernels.reference.mean_attention_distance`);
- ``weights``: the full probabilities (batch, heads, q_tokens, kv_tokens), when ``weights=True``
  (HF's ``output_attentions``).

On the triton and cuda backends these come from kernels that recompute exp(S - LSE) from the row
log-sum-exp the flash kernel keeps (:mod:`vit_kernels.triton.attention_stats`, csrc/attention/stats.cu);
rows and distance never write the tokens x tokens matrix. The torch backend computes them from the
full softmax.

Without a request the ops run exactly as before. :func:`recording` collects statistics from every
attention op call in a block (in the calling thread), which is how :mod:`vit_kernels.analysis` reads
them out of fused models of any family without changing their forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class StatsRequest:
    """What to return beside the attention output.

    rows: query rows whose probabilities are returned (default: the class token, row 0); None or ()
    for none. grid: (grid_h, grid_w) of the patch grid: asks for the mean attention distance; the
    tokens must be prefix_tokens + grid_h * grid_w. patch_size: pixels per patch (the distance unit).
    prefix_tokens: class token and registers in front of the patches (left out of the distance).
    weights: also return the full (batch, heads, q_tokens, kv_tokens) probabilities.
    """

    rows: Optional[Tuple[int, ...]] = (0,)
    grid: Optional[Tuple[int, int]] = None
    patch_size: float = 1.0
    prefix_tokens: int = 1
    weights: bool = False


@dataclasses.dataclass
class AttentionStats:
    """rows: (batch, heads, len(request.rows), kv_tokens) or None; distance: (batch, heads) float32
    or None; weights: (batch, heads, q_tokens, kv_tokens) or None."""

    rows: Optional[Tensor] = None
    distance: Optional[Tensor] = None
    weights: Optional[Tensor] = None


def check_request(request: StatsRequest, q_tokens: int, kv_tokens: int) -> Optional[Tuple[int, ...]]:
    """Validate ``request`` for attention of q_tokens x kv_tokens; returns the rows (None for none)."""
    if not isinstance(request, StatsRequest):
        raise TypeError(f"stats: expected a vit_kernels.ops.StatsRequest or None, got {type(request).__name__}")
    if request.rows is not None and not isinstance(request.rows, (tuple, list, range)):
        raise TypeError(f"stats.rows: expected a sequence of query row indices or None, got {request.rows!r}")
    rows = tuple(request.rows) if request.rows is not None else ()
    bad = [r for r in rows if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < q_tokens]
    if bad:
        raise ValueError(f"stats.rows: expected query row indices in [0, {q_tokens}), got {bad[:4]}")
    if request.grid is not None:
        g = tuple(request.grid)
        if len(g) != 2 or any(not isinstance(v, int) or v < 1 for v in g):
            raise ValueError(f"stats.grid: expected (grid_h, grid_w), two integers >= 1, got {request.grid!r}")
        if not isinstance(request.prefix_tokens, int) or request.prefix_tokens < 0:
            raise ValueError(f"stats.prefix_tokens: expected an integer >= 0, got {request.prefix_tokens!r}")
        want = request.prefix_tokens + g[0] * g[1]
        if q_tokens != want or kv_tokens != want:
            raise ValueError(
                f"stats.grid: expected {want} tokens ({request.prefix_tokens} prefix + {g[0]}x{g[1]} "
                f"patches) as queries and keys, got {q_tokens} and {kv_tokens}"
            )
        if (
            isinstance(request.patch_size, bool)
            or not isinstance(request.patch_size, (int, float))
            or not request.patch_size > 0
        ):
            raise ValueError(f"stats.patch_size: expected a positive number of pixels, got {request.patch_size!r}")
    return rows or None


def attention_stats_torch(q: Tensor, k: Tensor, scale: float, request: StatsRequest) -> AttentionStats:
    """The plain PyTorch path: the full softmax (float32 for half inputs), then the statistics.

    q: (batch, heads, q_tokens, head_dim); k: (batch, heads, kv_tokens, head_dim)."""
    from .. import reference

    rows = check_request(request, q.shape[2], k.shape[2])
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = reference.attention_probs(q.to(work), k.to(work), scale=scale)
    st = AttentionStats()
    if rows is not None:
        st.rows = p[:, :, list(rows)].to(q.dtype)
    if request.grid is not None:
        n = request.prefix_tokens
        d = reference.patch_distances(request.grid, request.patch_size, work, q.device)
        st.distance = (p[..., n:, n:] * d).sum(-1).mean(-1).to(torch.float32)
    if request.weights:
        st.weights = p.to(q.dtype)
    return st


# ----------------------------------------------------------------------------- recording context
_LOCAL = threading.local()


@contextlib.contextmanager
def recording(request: StatsRequest) -> Iterator[List[AttentionStats]]:
    """Within the block, every flash_attention / qkv_attention call in this thread that was given no
    ``stats=`` of its own computes ``request`` and appends its AttentionStats to the yielded list
    (call order: layer order in a ViT). The ops still return only their output."""
    if not isinstance(request, StatsRequest):
        raise TypeError(f"request: expected a vit_kernels.ops.StatsRequest, got {type(request).__name__}")
    previous = getattr(_LOCAL, "active", None)
    records: List[AttentionStats] = []
    _LOCAL.active = (request, records)
    try:
        yield records
    finally:
        _LOCAL.active = previous


def active_request() -> Optional[StatsRequest]:
    """The request of the innermost :func:`recording` block of this thread, or None (always None
    while torch.compile traces: recording is for eager calls)."""
    if torch.compiler.is_compiling():
        return None
    active = _LOCAL.__dict__.get("active")  # (a missing thread-local attribute costs ~1 us; a dict look-up does not)
    return active[0] if active is not None else None


def record(stats: AttentionStats) -> None:
    _LOCAL.active[1].append(stats)
