"""Appendix D: the same forget measures for several models side by side."""

from __future__ import annotations

from raysweep.analysis.common import all_cells, with_forgetting
from raysweep.analysis.compare import Comparison, compare, draw_compare
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register


@register("cross_model", title="Other models", figure="Appendix D")
def run(ctx: AnalysisContext) -> AnalysisResult:
    cells = with_forgetting(all_cells(ctx))
    models = sorted({c.model for c in cells})
    if len(models) < 2:
        raise Skip(f"one model only ({models[0]}): cross_model compares two or more models")
    return compare(
        cells, Comparison("model", tuple(models)), "models", ctx.params.denominator, ctx.params.bootstrap_resamples
    )


draws("cross_model")(draw_compare)
