"""Text tables: rich's on a terminal, plain text otherwise (logs, pipes and tests read that). Used by
the bench, the CLI commands and the tuner's report (``vk.tune_report()``), so it sits in the lowest
layer; rich is optional.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Dict, Optional, Sequence


def fmt(v, digits: int = 3) -> str:
    """A cell: None -> '-', floats to ``digits`` significant figures (no exponent below 1e6)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        mag = math.floor(math.log10(abs(v)))
        return f"{v:.{max(0, digits - 1 - mag)}f}" if abs(v) < 1e6 else f"{v:.3g}"
    return str(v)


def _numeric(rows: Sequence[Dict], key: str) -> bool:
    """Whether a column holds numbers (right-aligned); text columns are left-aligned."""
    values = [r.get(key) for r in rows if r.get(key) not in (None, "")]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def format_table(rows: Sequence[Dict], columns: Sequence[tuple]) -> str:
    """A plain text table. columns: (key, header) or (key, header, formatter). Numbers are
    right-aligned, text left-aligned."""
    cells = [[c[1] for c in columns]]
    for r in rows:
        cells.append([(c[2] if len(c) > 2 else fmt)(r.get(c[0])) for c in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    right = [_numeric(rows, c[0]) for c in columns]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(x.rjust(w) if r else x.ljust(w) for x, w, r in zip(row, widths, right)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rich_console(file=None):
    """A rich Console writing to ``file`` (stdout by default) when that is a terminal and rich is
    installed; else None, and the caller prints plain text (what logs, pipes and tests read)."""
    file = file or sys.stdout
    if not file.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=file)


def print_table(
    rows: Sequence[Dict],
    columns: Sequence[tuple],
    title: Optional[str] = None,
    file=None,
    styles: Optional[Dict[str, Dict[str, str]]] = None,
    group: Optional[Callable[[Dict], bool]] = None,
) -> None:
    """Print a table: rich's on a terminal (:func:`rich_console`), else :func:`format_table`'s plain
    text (with ``title`` on the line above). columns as for format_table; styles: column key ->
    {cell text: rich style} (e.g. {"status": {"FAIL": "red"}}), used on a terminal only; group(row):
    True for a row that heads a group of rows (on a terminal: bold, a gap before it)."""
    console = rich_console(file)
    if console is None:
        if title:
            print(title, file=file)
        print(format_table(rows, columns), file=file)
        return
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    texts = [[(c[2] if len(c) > 2 else fmt)(r.get(c[0])) for c in columns] for r in rows]
    table = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)
    widths = [max([len(c[1])] + [len(t[i]) for t in texts]) for i, c in enumerate(columns)]
    for i, c in enumerate(columns):  # every column as wide as its widest cell; the last one folds
        last = i == len(columns) - 1
        table.add_column(
            c[1],
            justify="right" if _numeric(rows, c[0]) else "left",
            no_wrap=not last,
            min_width=None if last else widths[i],
            overflow="fold",
        )
    # a terminal too narrow for the table: wider lines (the terminal wraps them) rather than cropped cells
    # (each column: one space of padding either side, one between columns, one at each edge)
    console.width = max(console.width, sum(widths[:-1]) + min(widths[-1], 40) + 3 * len(columns) + 1)
    for j, (r, t) in enumerate(zip(rows, texts)):
        head = group is not None and group(r)
        if head and j:
            table.add_section()
        cells = []
        for c, text in zip(columns, t):
            style = (styles or {}).get(c[0], {}).get(text)
            cells.append(f"[{style}]{escape(text)}[/{style}]" if style else escape(text))
        table.add_row(*cells, style="bold" if head else None)
    console.print(table)
