"""Fig 3.1: per forget task, accuracy pretrained -> finetuned -> forgotten on the task's own
evaluation split, the forget gap and the forget ratio, each with its 95% interval."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from raysweep.analysis.common import all_cells, by_condition, diagonal, with_forgetting
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.measures import WITH_INTERVALS, cells_table
from raysweep.analysis.plotting import (
    BLUE,
    GREY,
    MAX_PANELS,
    RED,
    cond_label,
    interval_label,
    num,
    rows_by_condition,
    yerr,
)
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome

COLUMNS = [
    "model",
    "method",
    "size",
    "forget_task",
    "n_trials",
    "n_seeds",
    "n_examples",
    *(f"{m}{x}" for m in WITH_INTERVALS for x in ("", "_lo", "_hi")),
    "headroom",
    "masked",
    "ratio_formula",
    "denominator",
    "interval",
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


@draws("single_task")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    for _, rs in list(rows_by_condition(o.tables["tasks"]).items())[:MAX_PANELS]:
        rs = sorted(rs, key=lambda r: num(r["acc_forgotten"]))
        x = np.arange(len(rs))
        fig = Figure(figsize=(max(6.0, 0.55 * len(rs) + 2), 6.2), layout="constrained")
        axes = fig.subplot_mosaic([["arrows", "arrows"], ["gap", "ratio"]], height_ratios=[1.4, 1])
        ax = axes["arrows"]
        for i, r in enumerate(rs):
            pre, ft, fg = num(r["acc_pretrained"]), num(r["acc_finetuned"]), num(r["acc_forgotten"])
            if np.isfinite(pre) and np.isfinite(ft):
                ax.annotate(
                    "", xy=(i - 0.12, ft), xytext=(i - 0.12, pre), arrowprops=dict(arrowstyle="->", color=BLUE, lw=2)
                )
            if np.isfinite(ft) and np.isfinite(fg):
                ax.annotate(
                    "", xy=(i + 0.12, fg), xytext=(i + 0.12, ft), arrowprops=dict(arrowstyle="->", color=RED, lw=2)
                )
            ax.plot([i - 0.12], [pre], "o", color=GREY, ms=4)
        ax.axhline(0.5, ls="--", color=GREY, lw=1)
        ax.set_xticks(x, [r["forget_task"] for r in rs], rotation=45, ha="right")
        ax.set_xlim(-0.6, len(rs) - 0.4)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{cond_label(rs[0])}: pretrained (grey) -> fine-tuned (blue) -> forgotten (red)")
        ax.errorbar(
            x + 0.12,
            [num(r["acc_forgotten"]) for r in rs],
            yerr=yerr(rs, "acc_forgotten"),
            fmt="none",
            ecolor="black",
            capsize=3,
            lw=1,
        )
        for key, col, label in (("gap", "forget_gap", "forget gap"), ("ratio", "forget_ratio", "forget ratio")):
            a = axes[key]
            a.bar(x, [num(r[col]) for r in rs], yerr=yerr(rs, col), capsize=3, color=RED if key == "ratio" else BLUE)
            # Two panels share a row: the interval's name goes on a second line to fit.
            label += f"\n({interval_label(rs)})" if interval_label(rs) else ""
            a.set_xticks(x, [r["forget_task"] for r in rs], rotation=45, ha="right", fontsize=8)
            a.axhline(0, color="black", lw=0.8)
            a.set_title(label, fontsize=9)
        figs.append((f"single-task forgetting {cond_label(rs[0])}", fig))
    return figs
