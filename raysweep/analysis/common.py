"""Helpers shared by the analysis modules: the cells, grouping by condition."""

from __future__ import annotations

from collections import defaultdict

from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.measures import Cell, cells_from_sums
from raysweep.analysis.registry import Skip

Condition = tuple[str, str, int]  # (model, method, size)


def require_trials(ctx: AnalysisContext) -> None:
    if not ctx.index.trials:
        where = f"sweep {ctx.sweep!r}" if ctx.sweep else "the store"
        raise Skip(f"no done trials in {where}")


def all_cells(ctx: AnalysisContext) -> list[Cell]:
    require_trials(ctx)
    key = ("cells", ctx.params.split)
    if key not in ctx._cells:
        p = ctx.params
        ctx._cells[key] = cells_from_sums(
            ctx.accuracy_sums(),
            ctx.paired_correct(),
            min_headroom=p.min_headroom,
            denominator=p.denominator,
            resamples=p.bootstrap_resamples,
        )
    cells = ctx._cells[key]
    if not cells:
        raise Skip(f"no committed scores on the {ctx.params.split!r} split at the milestones")
    return cells


def with_forgetting(cells: list[Cell]) -> list[Cell]:
    out = [c for c in cells if c.acc_finetuned is not None and c.acc_forgotten is not None]
    if not out:
        raise Skip("no trial has both a finetuned and a forgotten milestone (no committed forget epoch)")
    return out


def by_condition(cells: list[Cell]) -> dict[Condition, list[Cell]]:
    out: dict[Condition, list[Cell]] = defaultdict(list)
    for c in cells:
        out[(c.model, c.method, c.size)].append(c)
    return dict(sorted(out.items()))


def diagonal(cells: list[Cell]) -> list[Cell]:
    return [c for c in cells if c.eval_task == c.forget_task]
