"""Fig 3.1: per forget task, accuracy pretrained -> finetuned -> forgotten on the task's own
evaluation split, the forget gap and the forget ratio, each with its 95% interval."""

from __future__ import annotations

from raysweep.analysis.common import all_cells, by_condition, diagonal, with_forgetting
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.measures import WITH_INTERVALS, cells_table
from raysweep.analysis.registry import AnalysisResult, Skip, register

COLUMNS = [
    "model", "method", "size", "forget_task", "n_trials", "n_seeds", "n_examples",
    *(f"{m}{x}" for m in WITH_INTERVALS for x in ("", "_lo", "_hi")),
    "headroom", "masked", "ratio_formula", "denominator", "interval",
]


@register("single_task", title="Single-task forgetting", figure="Fig 3.1")
def run(ctx: AnalysisContext) -> AnalysisResult:
    cells = diagonal(all_cells(ctx))
    if not cells:
        raise Skip("no trial evaluated its own forget task")
    cells = with_forgetting(cells)
    table = cells_table(cells, ctx.params.denominator).select(COLUMNS)
    n_cond = len(by_condition(cells))
    masked = sum(c.masked for c in cells)
    msg = f"{len(cells)} forget task(s) in {n_cond} condition(s), {ctx.params.split} split"
    if masked:
        msg += f"; {masked} forget ratio(s) masked (headroom below {ctx.params.min_headroom:g})"
    return AnalysisResult({"tasks": table}, msg)
