"""Side-by-side comparison of the forget measures along one axis of the sweep (size for
Appendix B, method for Appendix C, model for Appendix D), holding the other two fixed."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from raysweep.analysis.measures import CORRELATION_INTERVAL_FIELDS, Cell, agreement, cells_table, seed_value
from raysweep.analysis.plotting import MAX_PANELS, num, yerr
from raysweep.analysis.registry import AnalysisResult, Skip
from raysweep.analysis.runner import AnalysisOutcome

AXES = ("model", "method", "size")


@dataclass(frozen=True)
class Comparison:
    axis: str
    # Axis values in display order; others present in the sweep are left out.
    values: tuple[str, ...]
    # When set, a group qualifies by having this value alone (flipped trials are worth
    # showing without a random-label twin); otherwise it needs two values to compare.
    anchor: str | None = None

    def qualifies(self, present: set[str]) -> bool:
        return self.anchor in present if self.anchor is not None else len(present) >= 2

    @property
    def held(self) -> tuple[str, ...]:
        return tuple(a for a in AXES if a != self.axis)


def _axis_value(c: Cell, axis: str) -> str:
    return str(getattr(c, axis))


def compare(
    cells: list[Cell], cmp: Comparison, what: str, denominator: str = "trial", resamples: int = 1000
) -> AnalysisResult:
    groups: dict[tuple, dict[str, list[Cell]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        v = _axis_value(c, cmp.axis)
        if v in cmp.values:
            groups[tuple(getattr(c, a) for a in cmp.held)][v].append(c)
    groups = {k: g for k, g in groups.items() if cmp.qualifies(set(g))}
    if not groups:
        raise Skip(f"no two conditions differ only in {cmp.axis}: nothing to compare for {what}")

    present = [v for v in cmp.values if any(v in g for g in groups.values())]
    summary_rows, long_parts, agree_rows = [], [], []
    for key in sorted(groups):
        g = groups[key]
        tasks = sorted({c.forget_task for vals in g.values() for c in vals if c.eval_task == c.forget_task})
        for task in tasks:
            row: dict[str, object] = {a: key[i] for i, a in enumerate(cmp.held)}
            row["forget_task"] = task
            for v in present:
                diag = next((c for c in g.get(v, []) if c.forget_task == task and c.eval_task == task), None)
                row[f"acc_finetuned[{v}]"] = diag.acc_finetuned if diag else None
                row[f"acc_forgotten[{v}]"] = diag.acc_forgotten if diag else None
                row[f"forget_ratio[{v}]"] = diag.forget_ratio if diag else None
                lo, hi = diag.bounds.get("forget_ratio", (None, None)) if diag else (None, None)
                row[f"forget_ratio_lo[{v}]"], row[f"forget_ratio_hi[{v}]"] = lo, hi
                row[f"n_seeds[{v}]"] = diag.n_trials if diag else None
            summary_rows.append(row)
        for v in present:
            if v in g:
                t = cells_table(g[v], denominator)
                long_parts.append(t.append_column("compared", pa.array([v] * t.num_rows, pa.string())))
        for a, b in combinations([v for v in present if v in g], 2):
            est = agreement(g[a], g[b], seed_value("forget_ratio"), resamples, (*key, a, b))
            agree_rows.append({**{x: key[i] for i, x in enumerate(cmp.held)}, "a": a, "b": b, **est})

    held_types = {"model": pa.string(), "method": pa.string(), "size": pa.int32()}
    held_fields = [(a, held_types[a]) for a in cmp.held]
    summary_schema = pa.schema(
        held_fields
        + [("forget_task", pa.string())]
        + [
            (f"{m}[{v}]", pa.float64())
            for v in present
            for m in ("acc_finetuned", "acc_forgotten", "forget_ratio", "forget_ratio_lo", "forget_ratio_hi")
        ]
        + [(f"n_seeds[{v}]", pa.int32()) for v in present]
    )
    agree_schema = pa.schema(held_fields + [("a", pa.string()), ("b", pa.string())] + CORRELATION_INTERVAL_FIELDS)
    tables = {
        "summary": pa.Table.from_pylist(summary_rows, schema=summary_schema),
        "cells": pa.concat_tables(long_parts),
        "agreement": pa.Table.from_pylist(agree_rows, schema=agree_schema),
    }
    msg = f"{cmp.axis} {' vs '.join(present)} in {len(groups)} group(s); agreement = correlation of cross-task forget ratios"
    return AnalysisResult(tables, msg)


def draw_compare(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    t = o.tables["summary"]
    values = [n[len("forget_ratio[") : -1] for n in t.column_names if n.startswith("forget_ratio[")]
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
            ax.bar(
                x + (k - (len(values) - 1) / 2) * width,
                [num(r[f"forget_ratio[{v}]"]) for r in rs],
                width,
                label=v,
                yerr=err,
                capsize=3,
            )
        ax.set_xticks(x, [r["forget_task"] for r in rs], rotation=45, ha="right")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("forget ratio (own task)")
        ax.legend(title=next(a for a in ("model", "method", "size") if a not in held), fontsize=8)
        ax.set_title(" / ".join(f"{c}={v}" for c, v in zip(held, key)))
        figs.append((f"{o.title}: " + " / ".join(str(k) for k in key), fig))
    return figs
