"""Fig 3.1: per forget task, accuracy pretrained -> finetuned -> forgotten on the task's own
evaluation split, the forget gap and the forget ratio."""

from __future__ import annotations

from raysweep.analysis.common import all_cells, by_condition, diagonal, with_forgetting
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.measures import cells_table
from raysweep.analysis.registry import AnalysisResult, Skip, register

COLUMNS = [
    "model", "method", "size", "forget_task", "n_trials", "n_examples", "acc_pretrained", "acc_finetuned",
    "acc_forgotten", "forget_gap", "forget_ratio", "ratio_formula",
]


@register("single_task", title="Single-task forgetting", figure="Fig 3.1")
def run(ctx: AnalysisContext) -> AnalysisResult:
    cells = diagonal(all_cells(ctx))
    if not cells:
        raise Skip("no trial evaluated its own forget task")
    cells = with_forgetting(cells)
    table = cells_table(cells).select(COLUMNS)
    n_cond = len(by_condition(cells))
    return AnalysisResult({"tasks": table}, f"{len(cells)} forget task(s) in {n_cond} condition(s), {ctx.params.split} split")
