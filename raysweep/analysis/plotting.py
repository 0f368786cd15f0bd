"""What the analyses' report figures share: colours, panel limits, error bars from an
interval's bounds and the labels of a condition. Each figure is drawn from its analysis's
tables alone, by the `draw` function registered next to the analysis (`registry.draws`)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
from matplotlib.ticker import MaxNLocator

MAX_PANELS = 6  # conditions / tasks drawn per analysis; the tables carry the rest
MAX_ROW_LABELS = 60

BLUE, RED, GREY = "#1f77b4", "#d62728", "#7f7f7f"
OWN, OTHER = RED, BLUE  # the forgotten task vs the other tasks
MILESTONE_COLORS = {"pretrained": "#9e9e9e", "finetuned": BLUE, "forgotten": RED}


def cond_label(r: dict) -> str:
    return " / ".join(str(r[k]) for k in ("model", "method", "size") if k in r) if r else ""


def rows_by_condition(table: pa.Table) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in table.to_pylist():
        out[tuple(r.get(k) for k in ("model", "method", "size"))].append(r)
    return dict(sorted(out.items(), key=lambda kv: tuple(str(x) for x in kv[0])))


def num(v: object) -> float:
    return float("nan") if v is None else float(v)  # type: ignore[arg-type]


def yerr(rs: list[dict], col: str, lo: str | None = None, hi: str | None = None) -> np.ndarray | None:
    """(2, n) error-bar lengths from the `<col>_lo` / `<col>_hi` columns (the 95% interval over
    seeds or the bootstrap over examples); zero where a bound is missing, None where the
    table has no bounds for `col`."""
    lo, hi = lo or f"{col}_lo", hi or f"{col}_hi"
    if not rs or lo not in rs[0]:
        return None
    v = np.array([num(r.get(col)) for r in rs])
    low = np.array([num(r.get(lo)) for r in rs])
    high = np.array([num(r.get(hi)) for r in rs])
    err = np.vstack([v - low, high - v])
    return np.where(np.isfinite(err), np.clip(err, 0, None), 0.0)


def interval_label(rs: list[dict]) -> str:
    kinds = sorted({str(r.get("interval")) for r in rs if r.get("interval")})
    names = {"seeds-t95": "t over seeds", "bootstrap95": "bootstrap over examples"}
    return "error bars: 95% " + " / ".join(names.get(k, k) for k in kinds) if kinds else ""


def ci(r: dict, col: str) -> str:
    lo, hi = r.get(f"{col}_lo"), r.get(f"{col}_hi")
    return "" if lo is None or hi is None else f" [{lo:.2f}, {hi:.2f}]"


def per_model(rows: list[dict]) -> list[tuple[str, int, list[dict]]]:
    """(model, size, its rows), at most MAX_PANELS of them: one figure each."""
    keys = sorted({(r["model"], r["size"]) for r in rows}, key=str)[:MAX_PANELS]
    return [(m, n, [r for r in rows if (r["model"], r["size"]) == (m, n)]) for m, n in keys]


def epoch_axis(ax, xlabel: str, ylabel: str) -> None:
    """A curve over epochs of a quantity in [0, 1] whose chance level is 0.5."""
    ax.axhline(0.5, color="#888", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
