"""Writers: the environment record, tables (rich on a terminal, plain text otherwise), CSV, JSON,
PNG plots, and a progress bar.

matplotlib and rich are optional: without matplotlib no PNG is written and the command says
so; without rich the progress is printed as plain lines and the tables as plain text.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ..tables import fmt, format_table, print_table, rich_console  # noqa: F401  (the writers' tables)


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def git_commit(path: Optional[Path] = None) -> Dict[str, object]:
    """The commit of the checkout that holds vit_kernels (and whether it has local changes)."""
    path = path or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def environment(device: torch.device) -> Dict[str, object]:
    """Device name, versions and commit: what a benchmark result must carry to be comparable."""
    from .. import __version__

    env: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "vit_kernels": __version__,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "torchvision": _version("torchvision"),
        "transformers": _version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"sm_{props.major}{props.minor}",
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
        )
    else:
        env.update(device_name=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    env.update(git_commit())
    return env


# ---------------------------------------------------------------------------------------------


# rich styles of the status column of the bench and attention tables
STATUS_STYLES = {"status": {"ok": "green", "error": "red", "fallback": "red", "not measured": "yellow"}}


def write_csv(path: Path, rows: Sequence[Dict], columns: Optional[Sequence[str]] = None) -> Path:
    """One row per result; the columns are the union of the rows' keys (first-seen order)."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def write_json(path: Path, payload: Dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
    return path


def matplotlib_missing() -> Optional[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG written"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(path: Path, rows: Sequence[Dict], title: str) -> Path:
    """Two panels: images/s per provider (bars at the median, error bars p20-p80) and, on its own
    panel, the speed-up over eager (error bars from the p20-p80 intervals), one group per
    (model as run: depth, image size, batch; mode). Rows without a timing are marked."""
    plt = _pyplot()

    def group(r):  # 'model\ndepth 2, 32 px, batch 2\nmode'
        return r["label"].replace(" depth", "\ndepth", 1) + "\n" + r["mode"]

    groups = unique(group(r) for r in rows)
    providers = unique(r["provider"] for r in rows)
    find = {(group(r), r["provider"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 3.2 * len(groups) * max(1, len(providers)) / 3), 4.8))
    n = max(1, len(providers))
    width = 0.8 / n
    for ax, key, ylabel in (
        (axes[0], "img_per_s", "images / s (median, p20-p80)"),
        (axes[1], "speedup", "speed-up over eager (x)"),
    ):
        for i, p in enumerate(providers):
            xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
            rs = [find.get((g, p), {}) for g in groups]
            ys = [r.get(key) or 0 for r in rs]
            lo = [max(0.0, (r.get(key) or 0) - (r.get(key + "_p20") or r.get(key) or 0)) for r in rs]
            hi = [max(0.0, (r.get(key + "_p80") or r.get(key) or 0) - (r.get(key) or 0)) for r in rs]
            bars = ax.bar(xs, ys, width, label=p, yerr=[lo, hi], capsize=3)
            for b, r in zip(bars, rs):
                if r.get(key) is None:
                    ax.text(
                        b.get_x() + b.get_width() / 2,
                        0,
                        "not measured",
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel(ylabel)
        if key == "speedup":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0].set_title("throughput", fontsize=9)
    axes[1].set_title("speed-up over eager (same model, mode)", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_lines(
    path: Path,
    x: Sequence[float],
    series: Dict[str, Sequence[Optional[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    hline: Optional[float] = None,
    hline_label: str = "",
    ranges: Optional[Dict[str, Sequence[Optional[tuple]]]] = None,
) -> Path:
    """Lines over x (log scale), one per provider; None points are left out and providers with
    no point at all are named under the plot as not measured. ranges: per provider, per point a
    (low, high) drawn as an error bar (the p20-p80 interval), or None."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ys in series.items():
        pts = [(a, b, r) for a, b, r in zip(x, ys, (ranges or {}).get(name) or [None] * len(ys)) if b is not None]
        if pts:
            lo = [max(0.0, p[1] - p[2][0]) if p[2] else 0.0 for p in pts]
            hi = [max(0.0, p[2][1] - p[1]) if p[2] else 0.0 for p in pts]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[lo, hi], marker="o", capsize=3, label=name)
    if hline:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=1, label=hline_label)
    ax.set_xscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels([str(int(v)) for v in x], fontsize=8)
    ax.minorticks_off()
    missing = [n for n, ys in series.items() if all(v is None for v in ys)]
    if missing:
        fig.text(0.01, 0.01, "not measured: " + ", ".join(missing), fontsize=7, color="gray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------------------------


class _NoProgress:
    def advance(self, label: str) -> None:
        pass

    def describe(self, label: str) -> None:
        pass


class _PlainProgress(_NoProgress):
    def __init__(self, total: int, stream):
        self.total, self.done, self.stream = total, 0, stream

    def advance(self, label: str) -> None:
        self.done += 1
        count = f"[{self.done}/{self.total}] " if self.total else ""
        print(f"{count}{label}", file=self.stream, flush=True)


class _RichProgress:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def describe(self, label: str) -> None:
        self.progress.update(self.task, description=label)

    def advance(self, label: str) -> None:
        self.progress.update(self.task, advance=1, description=label)


@contextlib.contextmanager
def progress(total: Optional[int], title: str, enabled: bool = True):
    """A progress bar on stderr while a command works: rich's (bar, count, elapsed time) when stderr
    is a terminal, a line per step there without rich, and nothing at all when stderr is not a
    terminal (a log, a pipe, a test's capture) or ``enabled`` is False. ``total`` None: a spinner
    without a count. Yields an object with describe(label) and advance(label)."""
    if not enabled or not sys.stderr.isatty():
        yield _NoProgress()
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        yield _PlainProgress(total, sys.stderr)
        return
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}")]
    columns += [BarColumn(), MofNCompleteColumn()] if total else []
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True), transient=True) as p:
        task = p.add_task(title, total=total)
        yield _RichProgress(p, task)


def write_all(out: Path, stem: str, rows: List[Dict], meta: Dict, extra: Optional[Dict] = None) -> List[Path]:
    """<stem>.csv and <stem>.json (rows + environment + anything in ``extra``) under ``out``."""
    paths = [write_csv(out / f"{stem}.csv", rows)]
    payload = {"environment": meta, "results": rows}
    payload.update(extra or {})
    paths.append(write_json(out / f"{stem}.json", payload))
    return paths


def unique(seq: Iterable) -> List:
    out: List = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out
