"""The report types of :func:`vit_kernels.fuse`: one :class:`ReportEntry` per fusable part, the
:class:`FuseReport` that lists them, and the :class:`Candidate` an adapter offers (a module it can
replace, its entries and how to build the wrapper)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from torch import nn

if TYPE_CHECKING:
    from .wrapper import SwapWrapper

OPS = ("patch_embed", "attention", "mlp")


@dataclasses.dataclass
class ReportEntry:
    """One fusable part of a model. path: the module path of the part (e.g. ``blocks.0.attn``);
    op: "attention" | "mlp" | "patch_embed"; fused: whether it now runs fused ops; reason: why it
    was left (empty when fused); notes: what else a user should know (runtime fallbacks, ...)."""

    path: str
    op: str
    family: str
    fused: bool
    reason: str = ""
    notes: Tuple[str, ...] = ()

    def __str__(self) -> str:
        s = f"{self.path or '<root>'} [{self.op}] {'fused' if self.fused else 'left: ' + self.reason}"
        for n in self.notes:
            s += f"\n      note: {n}"
        return s


@dataclasses.dataclass
class FuseReport:
    """What :func:`vit_kernels.fuse` did (or would do) to a model."""

    entries: List[ReportEntry]
    backend: str = "auto"

    @property
    def fused(self) -> List[ReportEntry]:
        return [e for e in self.entries if e.fused]

    @property
    def left(self) -> List[ReportEntry]:
        return [e for e in self.entries if not e.fused]

    def __str__(self) -> str:
        fams = sorted({e.family for e in self.entries})
        head = (
            f"fuse report (backend={self.backend!r}, families: {', '.join(fams) or 'none found'}): "
            f"{len(self.fused)} fused, {len(self.left)} left"
        )
        fused = self.fused
        common = [n for n in (fused[0].notes if fused else ()) if all(n in e.notes for e in fused)]
        lines = [head]
        for e in self.entries:
            lines.append("  " + str(dataclasses.replace(e, notes=tuple(n for n in e.notes if n not in common))))
        lines += [f"  note (all fused parts): {n}" for n in common]
        return "\n".join(lines)


@dataclasses.dataclass
class Candidate:
    """A module an adapter can replace. entries: one per op it covers; build: makes the wrapper
    (None when none of its ops is fused)."""

    path: str
    module: nn.Module
    entries: List[ReportEntry]
    build: Optional[Callable[[], "SwapWrapper"]]


def block_candidate(
    path: str,
    block: nn.Module,
    family: str,
    ops_: tuple,
    base_why: Optional[str],
    attn_path: str,
    attention_reason: Callable[[], tuple],
    mlp_path: str,
    mlp_reason: Callable[[], tuple],
    wrapper: Callable,
    backend: str,
) -> "Candidate":
    """The candidate for one pre-norm encoder block (attention branch + MLP branch).

    base_why: why the whole block is left (None when it can be fused); attention_reason() ->
    (why, note) and mlp_reason() -> (why, approximate) judge each branch; wrapper(block, backend,
    entries) builds the fused block, whose ``approximate`` is set to the MLP's GELU flavour.
    """
    if "attention" not in ops_:
        why, note = "not requested (ops)", None
    else:
        why, note = (base_why, None) if base_why else attention_reason()
    entries = [
        ReportEntry(attn_path, "attention", family, why is None, why or "", (note,) if note and why is None else ())
    ]
    approx = None
    if "mlp" not in ops_:
        why = "not requested (ops)"
    else:
        why, approx = (base_why, None) if base_why else mlp_reason()
    entries.append(ReportEntry(mlp_path, "mlp", family, why is None, why or ""))
    build = None
    if any(e.fused for e in entries):

        def build():
            w = wrapper(block, backend, entries)
            w.approximate = approx
            return w

    return Candidate(path, block, entries, build)
