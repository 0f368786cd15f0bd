"""Terminal rendering of an outcome's main table (the CLI's `raysweep analyze` prints these)."""

from __future__ import annotations

import math

import pyarrow as pa
from rich.markup import escape
from rich.table import Table

from raysweep.analysis.runner import AnalysisOutcome

STATUS_STYLE = {"ok": "green", "skipped": "yellow", "failed": "red"}


def format_value(column: str, v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        # p-values live on a log scale; three decimals would show most of them as 0.000.
        if column.endswith("_p"):
            return f"{v:.2g}"
        if abs(v) >= 1000:
            return f"{v:.4g}"
        return f"{v:.3f}"
    return str(v)


def outcome_table(outcome: AnalysisOutcome, max_rows: int = 40, table: str | None = None) -> Table:
    """A rich Table of the outcome's main table (or the named one); for a skipped or failed
    analysis, a one-row table carrying its status and reason."""
    title = f"{outcome.title} ({outcome.figure})" if outcome.figure else outcome.title
    style = STATUS_STYLE.get(outcome.status, "")
    data = outcome.tables.get(table) if table else outcome.main_table
    if outcome.status != "ok" or data is None:
        t = Table(title=f"{escape(title)}: [{style}]{outcome.status}[/{style}]", show_header=False)
        t.add_column("message")
        t.add_row(escape(outcome.message or "(no output)"))
        return t
    t = Table(title=f"{escape(title)} [{style}]{outcome.status}[/{style}]", caption=escape(outcome.message))
    numeric = {f.name for f in data.schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)}
    for name in data.column_names:
        t.add_column(escape(name), justify="right" if name in numeric else "left", overflow="fold")
    for row in data.slice(0, max_rows).to_pylist():
        t.add_row(*(escape(format_value(c, row[c])) for c in data.column_names))
    if data.num_rows > max_rows:
        t.add_row(*([f"... {data.num_rows - max_rows} more"] + [""] * (len(data.column_names) - 1)))
    return t
