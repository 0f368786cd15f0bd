"""Appendix C: flipped-label forgetting next to random-label forgetting. The forget ratio
of flipped trials uses the flipped baseline 1 - acc_finetuned (see measures.forget_ratio)."""

from __future__ import annotations

from raysweep.analysis.common import all_cells, with_forgetting
from raysweep.analysis.compare import Comparison, compare, draw_compare
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register


@register("flipped", title="Flipped vs random labels", figure="Appendix C")
def run(ctx: AnalysisContext) -> AnalysisResult:
    cells = with_forgetting(all_cells(ctx))
    if not any(c.method == "flipped" for c in cells):
        methods = ", ".join(sorted({c.method for c in cells}))
        raise Skip(f"no flipped trials (methods in the sweep: {methods})")
    cmp = Comparison("method", ("flipped", "random"), anchor="flipped")
    return compare(cells, cmp, "flipped labels", ctx.params.denominator, ctx.params.bootstrap_resamples)


draws("flipped")(draw_compare)
