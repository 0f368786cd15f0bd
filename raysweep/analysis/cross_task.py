"""Fig 3.2: forget ratio of every eval task after forgetting every forget task, rows and
columns ordered by UPGMA (average-linkage) clustering, one matrix per condition. Cells whose
fine-tuned accuracy leaves less headroom than `min_headroom` are masked (empty, `masked`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from raysweep.analysis.common import all_cells, by_condition, with_forgetting
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.measures import Cell, cells_table, upgma_order
from raysweep.analysis.plotting import GREY, MAX_PANELS, cond_label, num, rows_by_condition
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome
from raysweep.store import trial_fields


@register("cross_task", title="Cross-task forgetting", figure="Fig 3.2")
def run(ctx: AnalysisContext) -> AnalysisResult:
    cells = with_forgetting(all_cells(ctx))
    groups = by_condition(cells)
    if all(len({c.eval_task for c in g}) < 2 for g in groups.values()):
        raise Skip("only the forget task itself was evaluated: a cross-task matrix needs more eval_tasks")
    long_parts, wide_rows, ordered_cols = [], [], []
    for (model, method, size), group in groups.items():
        mat = ratio_matrix(group)
        pos = {}
        for i, r in enumerate(mat.row_order):
            for j, c in enumerate(mat.col_order):
                pos[(mat.rows[r], mat.cols[c])] = (i, j)
        t = cells_table(group, ctx.params.denominator)
        rp = [pos[(c.forget_task, c.eval_task)][0] for c in group]
        cp = [pos[(c.forget_task, c.eval_task)][1] for c in group]
        t = t.append_column("row_pos", pa.array(rp, pa.int32())).append_column("col_pos", pa.array(cp, pa.int32()))
        long_parts.append(t.sort_by([("row_pos", "ascending"), ("col_pos", "ascending")]))
        col_names = [mat.cols[c] for c in mat.col_order]
        ordered_cols.extend(n for n in col_names if n not in ordered_cols)
        for r in mat.row_order:
            wide_rows.append(
                (
                    (model, method, size, mat.rows[r]),
                    {mat.cols[c]: _none(mat.values[r, c]) for c in range(len(mat.cols))},
                )
            )
    schema = pa.schema(
        [*trial_fields("model", "method", "size", "forget_task")] + [(c, pa.float64()) for c in ordered_cols]
    )
    wide = pa.Table.from_pylist(
        [
            {"model": k[0], "method": k[1], "size": k[2], "forget_task": k[3], **{c: vals.get(c) for c in ordered_cols}}
            for k, vals in wide_rows
        ],
        schema=schema,
    )
    n = len(groups)
    masked = sum(c.masked for c in cells)
    p = ctx.params
    msg = f"{n} condition(s); rows = forget task, columns = eval task, UPGMA-ordered; {p.split} split"
    msg += f"; {masked} of {len(cells)} cell(s) masked (headroom below {p.min_headroom:g}, {p.denominator} denominator)"
    return AnalysisResult({"matrix": wide, "cells": pa.concat_tables(long_parts)}, msg)


class RatioMatrix:
    def __init__(self, rows: list[str], cols: list[str], values: np.ndarray):
        self.rows, self.cols, self.values = rows, cols, values
        # Masked cells (no headroom) and missing runs stay NaN: the clustering's distance
        # skips them rather than reading them as "nothing forgotten".
        self.row_order, self.col_order = upgma_order(values)


def ratio_matrix(group: list[Cell]) -> RatioMatrix:
    rows = sorted({c.forget_task for c in group})
    cols = sorted({c.eval_task for c in group})
    m = np.full((len(rows), len(cols)), np.nan)
    for c in group:
        if c.forget_ratio is not None:
            m[rows.index(c.forget_task), cols.index(c.eval_task)] = c.forget_ratio
    return RatioMatrix(rows, cols, m)


def _none(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


@draws("cross_task")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    for _, rs in list(rows_by_condition(o.tables["cells"]).items())[:MAX_PANELS]:
        nr = max(r["row_pos"] for r in rs) + 1
        nc = max(r["col_pos"] for r in rs) + 1
        if nr * nc < 2:
            continue
        m = np.full((nr, nc), np.nan)
        rows, cols = [""] * nr, [""] * nc
        masked = []
        for r in rs:
            m[r["row_pos"], r["col_pos"]] = num(r["forget_ratio"])
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
                        ax.text(
                            j,
                            i,
                            f"{m[i, j]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if m[i, j] < 0.6 else "black",
                        )
        for i, j in masked:
            # Hatched: the ratio is undefined there (fine-tuned accuracy too close to chance).
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor=GREY, lw=0))
        fig.colorbar(im, ax=ax, label="forget ratio (clipped to [0, 1])", extend="both")
        note = f"; {len(masked)} hatched = masked, no headroom" if masked else ""
        ax.set_title(f"{cond_label(rs[0])} (UPGMA-ordered{note})")
        figs.append((f"cross-task forget ratios {cond_label(rs[0])}", fig))
    return figs
