"""Beyond the paper (Jin and Ren 2024): how well the association matrix predicts which
examples a held-out forget run hits. The logic lives in `raysweep.predict`; this entry
point runs it with the default parameters (`raysweep predict` runs it with others and
writes to the same place)."""

from __future__ import annotations

from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.registry import AnalysisResult, register
from raysweep.predict import NAME, PredictParams, predict_result


@register(NAME, title="Predicting forgetting from a few revealed examples", figure="Beyond: Jin & Ren")
def run(ctx: AnalysisContext) -> AnalysisResult:
    return predict_result(ctx, PredictParams(split=ctx.params.split))
