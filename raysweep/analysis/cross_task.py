"""Fig 3.2: forget ratio of every eval task after forgetting every forget task, rows and
columns ordered by UPGMA (average-linkage) clustering, one matrix per condition. Cells whose
fine-tuned accuracy leaves less headroom than `min_headroom` are masked (empty, `masked`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raysweep.analysis.common import all_cells, by_condition, with_forgetting
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.measures import Cell, cells_table, upgma_order
from raysweep.analysis.registry import AnalysisResult, Skip, register


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
            wide_rows.append(((model, method, size, mat.rows[r]), {mat.cols[c]: _none(mat.values[r, c]) for c in range(len(mat.cols))}))
    schema = pa.schema(
        [("model", pa.string()), ("method", pa.string()), ("size", pa.int32()), ("forget_task", pa.string())]
        + [(c, pa.float64()) for c in ordered_cols]
    )
    wide = pa.Table.from_pylist(
        [{"model": k[0], "method": k[1], "size": k[2], "forget_task": k[3], **{c: vals.get(c) for c in ordered_cols}} for k, vals in wide_rows],
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
