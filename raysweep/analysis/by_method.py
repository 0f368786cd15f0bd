"""Beyond the paper: does forgetting generalise differently by method?

For every forgetting method of a (model, size), how much a forget run removes from its own
task against how much it takes from the other evaluated tasks: the forget ratio (each
method's own formula: random labels, gradient ascent and NPO aim at chance, flipped labels
at the mirror image, see `measures.forget_ratio`) and the drop in mean confidence of the
correct response, which stays defined where a task was never above chance. Ratios over
several cells are pooled (accuracy lost / headroom, see `pooled_ratio`). `spillover` is
other / own: 0 means forgetting stays on the forgotten task, 1 means it spreads evenly.
The agreement table asks whether two methods damage the same other tasks (correlation of
their off-diagonal cells).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from raysweep.analysis.common import all_cells, with_forgetting
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.intervals import BOOTSTRAP, SEEDS_T, percentile, rng_for, t_interval
from raysweep.analysis.measures import (
    CORRELATION_INTERVAL_FIELDS,
    Cell,
    agreement,
    draw_finetuned_forgotten,
    headroom,
    seed_value,
)
from raysweep.analysis.plotting import MAX_PANELS, OTHER, OWN, num, yerr
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome
from raysweep.store import trial_fields


def _conf_drop(c: Cell | dict) -> float | None:
    if isinstance(c, dict):
        ft, fg = c.get("conf_finetuned"), c.get("conf_forgotten")
    else:
        ft, fg = c.conf_finetuned, c.conf_forgotten
    if ft is None or fg is None:
        return None
    return ft - fg


def _acc_drop(c: Cell) -> float | None:
    if c.acc_finetuned is None or c.acc_forgotten is None:
        return None
    return c.acc_finetuned - c.acc_forgotten


def pooled_ratio(cells: list[Cell]) -> float | None:
    """Forget ratio of several cells taken together: total accuracy lost over total headroom
    above each cell's baseline. A mean of per-cell ratios would be ruled by tasks fine-tuned
    barely above chance, whose tiny denominators turn noise into ratios of +-10."""
    lost = headroom = 0.0
    for c in cells:
        if c.acc_finetuned is None or c.acc_forgotten is None:
            continue
        base = 1.0 - c.acc_finetuned if c.ratio_formula == "flipped" else 0.5
        if c.acc_finetuned - base > 0:
            lost += c.acc_finetuned - c.acc_forgotten
            headroom += c.acc_finetuned - base
    return lost / headroom if headroom > 0 else None


def ratio_estimate(cells: list[Cell], resamples: int, key: tuple) -> tuple[float | None, float | None, float | None]:
    """`pooled_ratio` with its 95% interval: with two or more seeds, pooled per seed and then
    the mean and t-interval over seeds; with one, that seed's examples resampled cell by cell
    and the pooled ratio recomputed on each resample."""
    seeds = sorted({s for c in cells for s in c.per_seed})
    if len(seeds) >= 2:
        per = []
        for s in seeds:
            lost = head = 0.0
            for c in cells:
                v = c.per_seed.get(s)
                if v is None or v["acc_finetuned"] is None or v["acc_forgotten"] is None:
                    continue
                h = headroom(v["acc_finetuned"], c.ratio_formula)
                if h is not None and h > 0:
                    lost += v["acc_finetuned"] - v["acc_forgotten"]
                    head += h
            per.append(lost / head if head > 0 else None)
        est = t_interval(per)
        return est.value, est.lo, est.hi
    value = pooled_ratio(cells)
    if value is None:
        return None, None, None
    rng = rng_for(*key)
    lost, head = np.zeros(resamples), np.zeros(resamples)
    for c in cells:
        if not c.trials or c.acc_finetuned is None or c.acc_forgotten is None:
            continue
        if (headroom(c.acc_finetuned, c.ratio_formula) or 0.0) <= 0:
            continue
        ft, fg = draw_finetuned_forgotten(c.trials[0], rng, resamples)
        if ft is None or fg is None:
            continue
        lost += ft - fg
        head += 2.0 * ft - 1.0 if c.ratio_formula == "flipped" else ft - 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = np.where(head > 0, lost / np.where(head > 0, head, 1.0), np.nan)
    lo, hi = percentile(draws)
    return value, lo, hi


def _mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def _ratio(other: float | None, own: float | None) -> float | None:
    return None if other is None or own is None or own <= 0 else other / own


@dataclass(frozen=True)
class Split:
    """A method's cells in one (model, size), cut into own-task and other-task cells."""

    own: list[Cell]
    other: list[Cell]


COND = [*trial_fields("model", "size")]
METHODS_SCHEMA = pa.schema(
    COND
    + [
        ("method", pa.string()),
        ("n_forget_tasks", pa.int32()),
        ("n_other_cells", pa.int32()),
        ("n_seeds", pa.int32()),
        ("interval", pa.string()),
        ("ratio_own", pa.float64()),
        ("ratio_own_lo", pa.float64()),
        ("ratio_own_hi", pa.float64()),
        ("ratio_other", pa.float64()),
        ("ratio_other_lo", pa.float64()),
        ("ratio_other_hi", pa.float64()),
        ("ratio_spillover", pa.float64()),
        ("acc_drop_own", pa.float64()),
        ("acc_drop_other", pa.float64()),
        ("conf_drop_own", pa.float64()),
        ("conf_drop_other", pa.float64()),
        ("conf_spillover", pa.float64()),
    ]
)
TASKS_SCHEMA = pa.schema(
    COND
    + [
        *trial_fields("method", "forget_task"),
        ("n_other", pa.int32()),
        ("ratio_own", pa.float64()),
        ("ratio_other", pa.float64()),
        ("conf_drop_own", pa.float64()),
        ("conf_drop_other", pa.float64()),
    ]
)
AGREEMENT_SCHEMA = pa.schema(
    COND + [("a", pa.string()), ("b", pa.string()), ("measure", pa.string())] + CORRELATION_INTERVAL_FIELDS
)


@register("by_method", title="Forgetting by method: own task vs other tasks", figure="Beyond: methods")
def run(ctx: AnalysisContext) -> AnalysisResult:
    cells = with_forgetting(all_cells(ctx))
    groups: dict[tuple[str, int], dict[str, Split]] = defaultdict(dict)
    for c in cells:
        s = groups[(c.model, c.size)].setdefault(c.method, Split([], []))
        (s.own if c.eval_task == c.forget_task else s.other).append(c)
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    if not groups:
        methods = ", ".join(sorted({c.method for c in cells}))
        raise Skip(f"no model and size was forgotten with two or more methods (methods in the sweep: {methods})")

    method_rows, task_rows, agree_rows = [], [], []
    for (model, size), by_method in sorted(groups.items()):
        cond = {"model": model, "size": size}
        for method in sorted(by_method):
            s = by_method[method]
            r = ctx.params.bootstrap_resamples
            own_ratio, own_lo, own_hi = ratio_estimate(s.own, r, (model, size, method, "own"))
            other_ratio, other_lo, other_hi = ratio_estimate(s.other, r, (model, size, method, "other"))
            n_seeds = len({x for c in s.own + s.other for x in c.per_seed})
            own_conf, other_conf = _mean([_conf_drop(c) for c in s.own]), _mean([_conf_drop(c) for c in s.other])
            method_rows.append(
                {
                    **cond,
                    "method": method,
                    "n_forget_tasks": len({c.forget_task for c in s.own + s.other}),
                    "n_other_cells": len(s.other),
                    "n_seeds": n_seeds,
                    "interval": SEEDS_T if n_seeds >= 2 else BOOTSTRAP,
                    "ratio_own": own_ratio,
                    "ratio_own_lo": own_lo,
                    "ratio_own_hi": own_hi,
                    "ratio_other": other_ratio,
                    "ratio_other_lo": other_lo,
                    "ratio_other_hi": other_hi,
                    "ratio_spillover": _ratio(other_ratio, own_ratio),
                    "acc_drop_own": _mean([_acc_drop(c) for c in s.own]),
                    "acc_drop_other": _mean([_acc_drop(c) for c in s.other]),
                    "conf_drop_own": own_conf,
                    "conf_drop_other": other_conf,
                    "conf_spillover": _ratio(other_conf, own_conf),
                }
            )
            for task in sorted({c.forget_task for c in s.own + s.other}):
                own = [c for c in s.own if c.forget_task == task]
                other = [c for c in s.other if c.forget_task == task]
                task_rows.append(
                    {
                        **cond,
                        "method": method,
                        "forget_task": task,
                        "n_other": len(other),
                        "ratio_own": pooled_ratio(own),
                        "ratio_other": pooled_ratio(other),
                        "conf_drop_own": _mean([_conf_drop(c) for c in own]),
                        "conf_drop_other": _mean([_conf_drop(c) for c in other]),
                    }
                )
        for a, b in combinations(sorted(by_method), 2):
            for measure, value in (("forget_ratio", seed_value("forget_ratio")), ("conf_drop", _conf_drop)):
                est = agreement(
                    by_method[a].other,
                    by_method[b].other,
                    value,
                    ctx.params.bootstrap_resamples,
                    (model, size, a, b, measure),
                )
                agree_rows.append({**cond, "a": a, "b": b, "measure": measure, **est})

    methods_t = pa.Table.from_pylist(method_rows, schema=METHODS_SCHEMA)
    first = [r for r in method_rows if (r["model"], r["size"]) == min(groups)]
    spill = ", ".join(f"{r['method']} {_fmt(r['conf_spillover'])}" for r in first)
    msg = (
        f"{len(groups)} model/size group(s) with 2+ methods; spillover = other-task / own-task forgetting "
        f"(confidence drop) in {first[0]['model']} n={first[0]['size']}: {spill}"
    )
    return AnalysisResult(
        {
            "methods": methods_t,
            "tasks": pa.Table.from_pylist(task_rows, schema=TASKS_SCHEMA),
            "agreement": pa.Table.from_pylist(agree_rows, schema=AGREEMENT_SCHEMA),
        },
        msg,
    )


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


@draws("by_method")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in o.tables["methods"].to_pylist():
        groups[(r["model"], r["size"])].append(r)
    figs = []
    for (model, size), rs in sorted(groups.items(), key=lambda kv: str(kv[0]))[:MAX_PANELS]:
        x = np.arange(len(rs))
        fig = Figure(figsize=(max(7.0, 1.6 * len(rs) + 3), 3.6), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, stem, label in ((axes[0], "ratio", "forget ratio"), (axes[1], "conf_drop", "drop in confidence")):
            err = {k: yerr(rs, f"{stem}_{k}") for k in ("own", "other")}
            ax.bar(
                x - 0.2,
                [num(r[f"{stem}_own"]) for r in rs],
                0.4,
                color=OWN,
                label="forgotten task",
                yerr=err["own"],
                capsize=3,
            )
            ax.bar(
                x + 0.2,
                [num(r[f"{stem}_other"]) for r in rs],
                0.4,
                color=OTHER,
                label="other tasks",
                yerr=err["other"],
                capsize=3,
            )
            ax.set_xticks(x, [r["method"] for r in rs])
            ax.axhline(0, color="black", lw=0.8)
            ax.set_title(label, fontsize=9)
        axes[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"{model} / n={size}: forgetting on the forgotten task vs the others, by method", fontsize=9)
        figs.append((f"forgetting by method {model} n={size}", fig))
    return figs
