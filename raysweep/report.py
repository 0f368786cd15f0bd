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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from raysweep.analysis import (
    AnalysisOutcome, AnalysisParams, load_outcomes, registered_analyses, run_analyses, store_fingerprint,
)
from raysweep.analysis.render import format_value
from raysweep.figures_beyond import BEYOND_FIGURES
from raysweep.store import Store, atomic_write_bytes

MAX_TABLE_ROWS = 100
MAX_PANELS = 6  # conditions / tasks drawn per analysis; the tables carry the rest

BLUE, RED, GREY = "#1f77b4", "#d62728", "#7f7f7f"
MILESTONE_COLORS = {"pretrained": "#9e9e9e", "finetuned": BLUE, "forgotten": RED}


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


def fresh_outcomes(store: Store, sweep: str | None = None,
                   params: AnalysisParams | None = None) -> list[AnalysisOutcome]:
    """Stored outcomes that still describe the store; the rest are rerun, in memory: a
    report writes only its page (the store may be read-only, or someone else's), and
    `raysweep analyze` is what stores outcomes. With `params` every analysis is rerun with
    them (stored outcomes may have used others)."""
    fp = store_fingerprint(store, sweep)
    have = {o.name: o for o in load_outcomes(store, sweep)}
    stale = [n for n in registered_analyses()
             if params is not None or n not in have or have[n].fingerprint != fp or have[n].status == "failed"]
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


def _cond_label(r: dict) -> str:
    return " / ".join(str(r[k]) for k in ("model", "method", "size") if k in r) if r else ""


def _by_condition(table: pa.Table) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in table.to_pylist():
        out[tuple(r.get(k) for k in ("model", "method", "size"))].append(r)
    return dict(sorted(out.items(), key=lambda kv: tuple(str(x) for x in kv[0])))


def _num(v: object) -> float:
    return float("nan") if v is None else float(v)  # type: ignore[arg-type]


def yerr(rs: list[dict], col: str, lo: str | None = None, hi: str | None = None) -> np.ndarray:
    """(2, n) error-bar lengths from the `<col>_lo` / `<col>_hi` columns (the 95% interval over
    seeds or the bootstrap over examples); none where a bound is missing."""
    lo, hi = lo or f"{col}_lo", hi or f"{col}_hi"
    v = np.array([_num(r.get(col)) for r in rs])
    low = np.array([_num(r.get(lo)) for r in rs])
    high = np.array([_num(r.get(hi)) for r in rs])
    err = np.vstack([v - low, high - v])
    return np.where(np.isfinite(err), np.clip(err, 0, None), 0.0)


def _interval_label(rs: list[dict]) -> str:
    kinds = sorted({str(r.get("interval")) for r in rs if r.get("interval")})
    names = {"seeds-t95": "t over seeds", "bootstrap95": "bootstrap over examples"}
    return "error bars: 95% " + " / ".join(names.get(k, k) for k in kinds) if kinds else ""


def fig_single_task(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    for _, rs in list(_by_condition(o.tables["tasks"]).items())[:MAX_PANELS]:
        rs = sorted(rs, key=lambda r: _num(r["acc_forgotten"]))
        x = np.arange(len(rs))
        fig = Figure(figsize=(max(6.0, 0.55 * len(rs) + 2), 6.2), layout="constrained")
        axes = fig.subplot_mosaic([["arrows", "arrows"], ["gap", "ratio"]], height_ratios=[1.4, 1])
        ax = axes["arrows"]
        for i, r in enumerate(rs):
            pre, ft, fg = _num(r["acc_pretrained"]), _num(r["acc_finetuned"]), _num(r["acc_forgotten"])
            if np.isfinite(pre) and np.isfinite(ft):
                ax.annotate("", xy=(i - 0.12, ft), xytext=(i - 0.12, pre), arrowprops=dict(arrowstyle="->", color=BLUE, lw=2))
            if np.isfinite(ft) and np.isfinite(fg):
                ax.annotate("", xy=(i + 0.12, fg), xytext=(i + 0.12, ft), arrowprops=dict(arrowstyle="->", color=RED, lw=2))
            ax.plot([i - 0.12], [pre], "o", color=GREY, ms=4)
        ax.axhline(0.5, ls="--", color=GREY, lw=1)
        ax.set_xticks(x, [r["forget_task"] for r in rs], rotation=45, ha="right")
        ax.set_xlim(-0.6, len(rs) - 0.4)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{_cond_label(rs[0])}: pretrained (grey) -> fine-tuned (blue) -> forgotten (red)")
        ax.errorbar(x + 0.12, [_num(r["acc_forgotten"]) for r in rs], yerr=yerr(rs, "acc_forgotten"), fmt="none",
                    ecolor="black", capsize=3, lw=1)
        for key, col, label in (("gap", "forget_gap", "forget gap"), ("ratio", "forget_ratio", "forget ratio")):
            a = axes[key]
            a.bar(x, [_num(r[col]) for r in rs], yerr=yerr(rs, col), capsize=3, color=RED if key == "ratio" else BLUE)
            # Two panels share a row: the interval's name goes on a second line to fit.
            label += f"\n({_interval_label(rs)})" if _interval_label(rs) else ""
            a.set_xticks(x, [r["forget_task"] for r in rs], rotation=45, ha="right", fontsize=8)
            a.axhline(0, color="black", lw=0.8)
            a.set_title(label, fontsize=9)
        figs.append((f"single-task forgetting {_cond_label(rs[0])}", fig))
    return figs


def fig_cross_task(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    for _, rs in list(_by_condition(o.tables["cells"]).items())[:MAX_PANELS]:
        nr = max(r["row_pos"] for r in rs) + 1
        nc = max(r["col_pos"] for r in rs) + 1
        if nr * nc < 2:
            continue
        m = np.full((nr, nc), np.nan)
        rows, cols = [""] * nr, [""] * nc
        masked = []
        for r in rs:
            m[r["row_pos"], r["col_pos"]] = _num(r["forget_ratio"])
            rows[r["row_pos"]], cols[r["col_pos"]] = r["forget_task"], r["eval_task"]
            if r.get("masked"):
                masked.append((r["row_pos"], r["col_pos"]))
        fig = Figure(figsize=(max(4.5, 0.45 * nc + 2.5), max(3.5, 0.4 * nr + 1.8)), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(nc), cols, rotation=60, ha="right")
        ax.set_yticks(range(nr), rows)
        ax.set_xlabel("evaluated on")
        ax.set_ylabel("forgotten")
        if nr * nc <= 400:
            for i in range(nr):
                for j in range(nc):
                    if np.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if m[i, j] < 0.6 else "black")
        for i, j in masked:
            # Hatched: the ratio is undefined there (fine-tuned accuracy too close to chance).
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor=GREY, lw=0))
        fig.colorbar(im, ax=ax, label="forget ratio (clipped to [0, 1])", extend="both")
        note = f"; {len(masked)} hatched = masked, no headroom" if masked else ""
        ax.set_title(f"{_cond_label(rs[0])} (UPGMA-ordered{note})")
        figs.append((f"cross-task forget ratios {_cond_label(rs[0])}", fig))
    return figs


def fig_compare(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    t = o.tables["summary"]
    values = [n[len("forget_ratio["):-1] for n in t.column_names if n.startswith("forget_ratio[")]
    held = [c for c in ("model", "method", "size") if c in t.column_names]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in t.to_pylist():
        groups[tuple(r[c] for c in held)].append(r)
    figs = []
    for key, rs in list(sorted(groups.items(), key=lambda kv: str(kv[0])))[:MAX_PANELS]:
        x = np.arange(len(rs))
        width = 0.8 / max(1, len(values))
        fig = Figure(figsize=(max(5.0, 0.6 * len(rs) + 2), 3.6), layout="constrained")
        ax = fig.subplots()
        for k, v in enumerate(values):
            err = yerr(rs, f"forget_ratio[{v}]", f"forget_ratio_lo[{v}]", f"forget_ratio_hi[{v}]")
            ax.bar(x + (k - (len(values) - 1) / 2) * width, [_num(r[f"forget_ratio[{v}]"]) for r in rs], width, label=v,
                   yerr=err, capsize=3)
        ax.set_xticks(x, [r["forget_task"] for r in rs], rotation=45, ha="right")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("forget ratio (own task)")
        ax.legend(title=next(a for a in ("model", "method", "size") if a not in held), fontsize=8)
        ax.set_title(" / ".join(f"{c}={v}" for c, v in zip(held, key)))
        figs.append((f"{o.title}: " + " / ".join(str(k) for k in key), fig))
    return figs


def fig_predictors(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    corr = {(r["model"], r["method"], r["size"], r["predictor"]): r for r in o.tables["correlations"].to_pylist()}
    labels = {"acc_finetuned": "fine-tuned accuracy", "total_variance": "total variance of hidden states", "conf_finetuned": "confidence before forgetting"}
    for cond, rs in list(_by_condition(o.tables["tasks"]).items())[:MAX_PANELS]:
        if len(rs) < 3:
            continue
        fig = Figure(figsize=(12, 3.8), layout="constrained")
        axes = fig.subplots(1, 3)
        y = [_num(r["forget_ratio"]) for r in rs]
        for ax, p in zip(axes, labels):
            x = [_num(r[p]) for r in rs]
            ax.scatter(x, y, color=BLUE)
            for xi, yi, r in zip(x, y, rs):
                if np.isfinite(xi) and np.isfinite(yi):
                    ax.annotate(r["forget_task"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
            c = corr.get((*cond, p))
            stat = "n/a"
            if c and c["pearson_r"] is not None:
                stat = f"r={c['pearson_r']:.2f}{_ci(c, 'pearson_r')} (p={c['pearson_p']:.2g})"
            ax.set_title(stat, fontsize=9)
            ax.set_xlabel(labels[p])
            ax.set_ylabel("forget ratio")
        fig.suptitle(_cond_label(rs[0]))
        figs.append((f"task-level predictors {_cond_label(rs[0])}", fig))
    ex = o.tables["examples"]
    if ex.num_rows:
        n = ex.num_rows
        take = np.sort(np.random.default_rng(0).choice(n, size=min(n, 5000), replace=False))
        sub = ex.take(pa.array(take))
        fig = Figure(figsize=(5, 4), layout="constrained")
        ax = fig.subplots()
        ax.scatter(sub["conf_before"].to_numpy(), sub["conf_after"].to_numpy(), s=6, alpha=0.4, color=BLUE)
        pooled = {r["target"]: r for r in o.tables["example_correlations"].to_pylist() if r["forget_task"] == "(all)"}
        parts = []
        after, flag = pooled.get("conf_after"), pooled.get("forgotten")
        if after and after["spearman_r"] is not None:
            parts.append(f"rho(after)={after['spearman_r']:.2f}{_ci(after, 'spearman_r')}")
        if flag and flag.get("auc") is not None:
            parts.append(f"AUC(forgotten)={flag['auc']:.2f}")
        if parts:
            ax.set_title(f"examples ({_cond_label(after or flag)}): " + ", ".join(parts), fontsize=8)
        ax.set_xlabel("confidence before forgetting")
        ax.set_ylabel("confidence after forgetting")
        figs.append(("example-level confidence before vs after", fig))
    return figs


def _ci(r: dict, col: str) -> str:
    lo, hi = r.get(f"{col}_lo"), r.get(f"{col}_hi")
    return "" if lo is None or hi is None else f" [{lo:.2f}, {hi:.2f}]"


def fig_order(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    ok = [r for r in o.tables["tasks"].to_pylist() if r["status"] == "ok"][:MAX_PANELS]
    if not ok:
        return []
    ex = o.tables["examples"].to_pylist()
    cols = min(3, len(ok))
    nrows = (len(ok) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
    rng = np.random.default_rng(0)
    for ax, t in zip(axes, ok):
        pts = [(e["forget_epoch"], e["learn_epoch"]) for e in ex if all(e[k] == t[k] for k in ("model", "method", "size", "forget_task"))]
        f = np.array([p[0] for p in pts], float) + rng.uniform(-0.2, 0.2, len(pts))
        g = np.array([p[1] for p in pts], float) + rng.uniform(-0.2, 0.2, len(pts))
        ax.scatter(f, g, s=6, alpha=0.4, color=BLUE)
        ax.set_title(f"{t['forget_task']} ({t['model']}): rho={t['spearman_r']:.2f}{_ci(t, 'spearman_r')}, "
                     f"n={t['n_examples']}", fontsize=9)
        ax.set_xlabel("forget epoch")
        ax.set_ylabel("learn epoch")
    for ax in axes[len(ok):]:
        ax.set_visible(False)
    return [("forgetting order vs learning order", fig)]


def fig_probes(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    ms = ("pretrained", "finetuned", "forgotten")
    for _, rs in list(_by_condition(o.tables["summary"]).items())[:MAX_PANELS]:
        x = np.arange(len(rs))
        fig = Figure(figsize=(max(5.0, 0.7 * len(rs) + 2), 3.6), layout="constrained")
        ax = fig.subplots()
        for k, m in enumerate(ms):
            ax.bar(x + (k - 1) * 0.27, [_num(r[f"probe_{m}"]) for r in rs], 0.27, label=f"probe, {m}",
                   color=MILESTONE_COLORS[m], yerr=yerr(rs, f"probe_{m}"), capsize=2)
        ax.plot(x + 0.27, [_num(r["acc_forgotten"]) for r in rs], "k_", ms=14, mew=2, label="model accuracy, forgotten")
        ax.axhline(0.5, ls="--", color=GREY, lw=1)
        ax.set_xticks(x, [r["forget_task"] for r in rs], rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("test pair accuracy (chance 0.5)")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{_cond_label(rs[0])}, layer {rs[0].get('layer')}; {_interval_label(rs)}", fontsize=9)
        figs.append((f"probe accuracy {_cond_label(rs[0])}", fig))
    return figs


FIGURES: dict[str, Callable[[AnalysisOutcome], list[tuple[str, Figure]]]] = {
    "single_task": fig_single_task,
    "cross_task": fig_cross_task,
    "dataset_size": fig_compare,
    "flipped": fig_compare,
    "cross_model": fig_compare,
    "predictors": fig_predictors,
    "order": fig_order,
    "probes": fig_probes,
    **BEYOND_FIGURES,
}


def build_section(o: AnalysisOutcome) -> Section:
    s = Section(o.name, o.title, o.figure, o.status, o.message)
    if o.status != "ok":
        return s
    draw = FIGURES.get(o.name)
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
            f"<td{' class=s' if c in strings else ''}>{html.escape(format_value(c, r[c]))}</td>" for c in table.column_names
        )
        body.append(f"<tr>{cells}</tr>")
    more = f"<p class=meta>{table.num_rows - max_rows} more row(s) in the Parquet file.</p>" if table.num_rows > max_rows else ""
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
            parts.append(f"<li class={s.status}><b>{html.escape(s.title)}</b> ({html.escape(s.figure)}): {s.status}: {html.escape(s.message)}</li>")
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
