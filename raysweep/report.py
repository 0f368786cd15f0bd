"""One self-contained HTML page of a store's analyses: the paper's figures redrawn from the
analysis tables (matplotlib, PNGs embedded as base64 data URIs), each with its table, and a
line for every analysis that was skipped or failed.

Analyses whose outputs are missing, failed, or older than the store's trials are (re)run
with the local engine first.
"""

from __future__ import annotations

import base64
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from matplotlib.figure import Figure

from raysweep.analysis import (
    AnalysisOutcome,
    AnalysisParams,
    load_outcomes,
    registered_analyses,
    run_analyses,
    store_fingerprint,
)
from raysweep.analysis.registry import figure_for
from raysweep.analysis.render import format_value
from raysweep.store import Store, atomic_write_bytes

MAX_TABLE_ROWS = 100


@dataclass
class Section:
    name: str
    title: str
    figure: str
    status: str
    message: str
    images: list[tuple[str, str]] = field(default_factory=list)  # (alt text, data URI)
    tables: list[tuple[str, pa.Table]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def fresh_outcomes(
    store: Store, sweep: str | None = None, params: AnalysisParams | None = None
) -> list[AnalysisOutcome]:
    """Stored outcomes that still describe the store; the rest are rerun, in memory: a
    report writes only its page (the store may be read-only, or someone else's), and
    `raysweep analyze` is what stores outcomes. With `params` every analysis is rerun with
    them (stored outcomes may have used others)."""
    fp = store_fingerprint(store, sweep)
    have = {o.name: o for o in load_outcomes(store, sweep)}
    stale = [
        n
        for n in registered_analyses()
        if params is not None or n not in have or have[n].fingerprint != fp or have[n].status == "failed"
    ]
    if stale:
        for o in run_analyses(store, only=stale, engine="local", sweep=sweep, params=params, write=False):
            have[o.name] = o
    return [have[n] for n in registered_analyses() if n in have]


def write_report(store: Store, out_dir: Path, sweep: str | None = None, params: AnalysisParams | None = None) -> Path:
    """Write `report.html` (or `report-<sweep>.html`) under out_dir and return its path."""
    outcomes = fresh_outcomes(store, sweep, params)
    sections = [build_section(o) for o in outcomes]
    page = render_page(store, sweep, sections)
    out_dir = Path(out_dir)
    path = out_dir / ("report.html" if sweep is None else f"report-{sweep}.html")
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


# ---- figures ----------------------------------------------------------------------------------


def png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_section(o: AnalysisOutcome) -> Section:
    s = Section(o.name, o.title, o.figure, o.status, o.message)
    if o.status != "ok":
        return s
    draw = figure_for(o.name)
    if draw is not None:
        try:
            for alt, fig in draw(o):
                s.images.append((alt, png_uri(fig)))
        except Exception as exc:  # noqa: BLE001 - a broken figure must not lose the tables
            s.errors.append(f"figure failed: {type(exc).__name__}: {exc}")
    s.tables = list(o.tables.items())
    return s


# ---- HTML -------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta, .msg { color: #555; } .skipped { color: #8a6d00; } .failed, .figure-error { color: #b00020; }
img { max-width: 100%; display: block; margin: 1em 0; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f4f4f4; } td.s { text-align: left; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #333; }
"""


def table_html(table: pa.Table, max_rows: int = MAX_TABLE_ROWS) -> str:
    strings = {f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.column_names)
    body = []
    for r in table.slice(0, max_rows).to_pylist():
        cells = "".join(
            f"<td{' class=s' if c in strings else ''}>{html.escape(format_value(c, r[c]))}</td>"
            for c in table.column_names
        )
        body.append(f"<tr>{cells}</tr>")
    more = (
        f"<p class=meta>{table.num_rows - max_rows} more row(s) in the Parquet file.</p>"
        if table.num_rows > max_rows
        else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def render_page(store: Store, sweep: str | None, sections: list[Section]) -> str:
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>raysweep report: {html.escape(sweep or store.root.name)}</title><style>{CSS}</style></head><body>",
        "<h1>Forgetting analyses</h1>",
        f"<p class=meta>store {html.escape(str(store.root))}; sweep {html.escape(sweep or 'all')}; "
        f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
    ]
    off = [s for s in sections if s.status != "ok"]
    if off:
        parts.append("<ul>")
        for s in off:
            parts.append(
                f"<li class={s.status}><b>{html.escape(s.title)}</b> ({html.escape(s.figure)}): {s.status}: {html.escape(s.message)}</li>"
            )
        parts.append("</ul>")
    for s in sections:
        if s.status != "ok":
            continue
        parts.append(f"<section id={s.name}><h2>{html.escape(s.title)} <small>({html.escape(s.figure)})</small></h2>")
        parts.append(f"<p class=msg>{html.escape(s.message)}</p>")
        for e in s.errors:
            parts.append(f"<p class=figure-error>{html.escape(e)}</p>")
        for alt, uri in s.images:
            parts.append(f'<img class=figure alt="{html.escape(alt)}" src="{uri}">')
        for i, (name, t) in enumerate(s.tables):
            inner = table_html(t)
            if i == 0:
                parts.append(f"<h3>{html.escape(name)}</h3>{inner}")
            else:
                parts.append(f"<details><summary>{html.escape(name)} ({t.num_rows} rows)</summary>{inner}</details>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
