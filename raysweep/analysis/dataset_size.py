"""Appendix B: forgetting with different numbers of training examples."""

from __future__ import annotations

from raysweep.analysis.common import all_cells, with_forgetting
from raysweep.analysis.compare import Comparison, compare, draw_compare
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register


@register("dataset_size", title="Dataset size", figure="Appendix B")
def run(ctx: AnalysisContext) -> AnalysisResult:
    cells = with_forgetting(all_cells(ctx))
    sizes = sorted({c.size for c in cells})
    if len(sizes) < 2:
        raise Skip(f"one size only (n={sizes[0]}): dataset_size compares sweeps with two or more sizes")
    return compare(
        cells,
        Comparison("size", tuple(str(s) for s in sizes)),
        "dataset size",
        ctx.params.denominator,
        ctx.params.bootstrap_resamples,
    )


draws("dataset_size")(draw_compare)
