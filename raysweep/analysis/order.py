"""Fig 5.1: learning order vs forgetting order.

An example of a trial's forget task is forgotten at the first `forget` epoch with confidence
<= threshold and learned at the first `relearn` epoch with confidence >= threshold. Only
what was learned can be forgotten: an example counts as forgettable only if its confidence
was >= threshold at the finetuned milestone, and as relearnable only if it was below the
threshold when relearning starts (the last forget epoch); otherwise an example that never
left 0.5-0.6 would be "forgotten" at epoch 1 and tie with every other. Examples never
forgotten or never learned are left out; a task is reported only with more than
`order_min_examples` remaining examples (pooled over the condition's seeds), and the two
epochs are correlated (Spearman, with a 95% interval) per task.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from raysweep.analysis.common import require_trials
from raysweep.analysis.context import AnalysisContext, TrialInfo
from raysweep.analysis.intervals import correlation_estimates
from raysweep.analysis.plotting import BLUE, MAX_PANELS, ci
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome
from raysweep.store import trial_fields

_COND = [*trial_fields("model", "method", "size", "forget_task")]
TASK_SCHEMA = pa.schema(
    _COND
    + [
        ("n_trials", pa.int32()),
        ("n_forgotten", pa.int64()),
        ("n_learned", pa.int64()),
        ("n_examples", pa.int64()),
        ("spearman_r", pa.float64()),
        ("spearman_p", pa.float64()),
        ("spearman_r_lo", pa.float64()),
        ("spearman_r_hi", pa.float64()),
        ("n_seeds", pa.int32()),
        ("interval", pa.string()),
        ("status", pa.string()),
    ]
)
EXAMPLE_SCHEMA = pa.schema(
    _COND
    + [
        *trial_fields("sweep", "trial_id", "seed"),
        ("example_idx", pa.int32()),
        ("forget_epoch", pa.int32()),
        ("learn_epoch", pa.int32()),
    ]
)


def crossing_table(ctx: AnalysisContext, trials: tuple[TrialInfo, ...]) -> pa.Table:
    """Per (trial, example): first forget epoch (if it was learned at the finetuned milestone)
    and first learn epoch (if it was unlearned at the last forget epoch); either may be null."""
    x = ctx.first_crossings(trials)
    keys = ["sweep", "trial_id", "example_idx"]

    def kind(k: str, name: str) -> pa.Table:
        return x.filter(pc.equal(x["kind"], k)).select([*keys, "epoch"]).rename_columns([*keys, name])

    j = kind("forget", "forget_epoch").join(kind("learn", "learn_epoch"), keys=keys, join_type="full outer")
    j = j.join(_eligible(ctx), keys=keys, join_type="left outer")
    # float32, as the stored confidences and the crossing reducer compare them
    thr = pa.scalar(ctx.params.order_threshold, pa.float32())
    learned = pc.fill_null(pc.greater_equal(j["conf_finetuned"], thr), False)
    unlearned = pc.fill_null(pc.less(j["conf_relearn_start"], thr), False)
    null = pa.nulls(j.num_rows, pa.int32())
    j = j.set_column(
        j.schema.get_field_index("forget_epoch"),
        "forget_epoch",
        pc.if_else(learned, pc.cast(j["forget_epoch"], pa.int32()), null),
    )
    j = j.set_column(
        j.schema.get_field_index("learn_epoch"),
        "learn_epoch",
        pc.if_else(unlearned, pc.cast(j["learn_epoch"], pa.int32()), null),
    )
    j = j.join(ctx.index.trial_table(), keys=["sweep", "trial_id"], join_type="inner")
    return (
        j.select(EXAMPLE_SCHEMA.names)
        .cast(EXAMPLE_SCHEMA)
        .sort_by(
            [
                ("model", "ascending"),
                ("method", "ascending"),
                ("size", "ascending"),
                ("forget_task", "ascending"),
                ("sweep", "ascending"),
                ("trial_id", "ascending"),
                ("example_idx", "ascending"),
            ]
        )
    )


def _eligible(ctx: AnalysisContext) -> pa.Table:
    """Per (trial, example) of the order split: confidence at the finetuned milestone and at
    the forgotten one (the last forget epoch, where relearning starts)."""
    rows = ctx.forget_task_scores(ctx.params.order_split)
    keys = ["sweep", "trial_id", "example_idx"]
    schema = pa.schema(
        [
            *trial_fields("sweep", "trial_id"),
            ("example_idx", pa.int32()),
            ("conf_finetuned", pa.float32()),
            ("conf_relearn_start", pa.float32()),
        ]
    )
    if rows.num_rows == 0:
        return schema.empty_table()
    ms = ctx.index.milestone_table().select(["sweep", "trial_id", "phase", "epoch", "milestone"])
    tagged = rows.join(ms, keys=["sweep", "trial_id", "phase", "epoch"], join_type="inner")

    def at(milestone: str, name: str) -> pa.Table:
        t = tagged.filter(pc.equal(tagged["milestone"], milestone)).select([*keys, "confidence"])
        return t.rename_columns([*keys, name])

    j = at("finetuned", "conf_finetuned").join(at("forgotten", "conf_relearn_start"), keys=keys, join_type="full outer")
    return j.select(schema.names).cast(schema)


@register("order", title="Learning vs forgetting order", figure="Fig 5.1")
def run(ctx: AnalysisContext) -> AnalysisResult:
    require_trials(ctx)
    relearn = [t for t in ctx.index.trials if t.committed.get("relearn")]
    if not relearn:
        raise Skip("no relearn phase in the sweep (phases.relearn.enabled is false)")
    p = ctx.params
    allx = crossing_table(ctx, tuple(relearn))
    both = allx.filter(pc.and_(pc.is_valid(allx["forget_epoch"]), pc.is_valid(allx["learn_epoch"])))

    names = ("model", "method", "size", "forget_task", "trial_id", "seed", "forget_epoch", "learn_epoch")
    cols = {c: allx[c].to_pylist() for c in names}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(allx.num_rows):
        groups[(cols["model"][i], cols["method"][i], cols["size"][i], cols["forget_task"][i])].append(i)
    rows = []
    for key in sorted(groups):
        idx = groups[key]
        f = [cols["forget_epoch"][i] for i in idx]
        g = [cols["learn_epoch"][i] for i in idx]
        by_seed: dict[int, tuple[list, list]] = {}
        for i in idx:
            a, b = cols["forget_epoch"][i], cols["learn_epoch"][i]
            if a is not None and b is not None:
                xs, ys = by_seed.setdefault(cols["seed"][i], ([], []))
                xs.append(a)
                ys.append(b)
        n = sum(len(v[0]) for v in by_seed.values())
        row = {
            "model": key[0],
            "method": key[1],
            "size": key[2],
            "forget_task": key[3],
            "n_trials": len({cols["trial_id"][i] for i in idx}),
            "n_forgotten": sum(a is not None for a in f),
            "n_learned": sum(b is not None for b in g),
            "n_examples": n,
            "spearman_r": None,
            "spearman_p": None,
            "n_seeds": len(by_seed),
        }
        if n <= p.order_min_examples:
            row["status"] = f"skipped: {n} example(s) both forgotten and learned, need more than {p.order_min_examples}"
        else:
            est = correlation_estimates(by_seed, p.bootstrap_resamples, (*key, "order"))
            row.update({k: est[k] for k in ("spearman_r", "spearman_p", "spearman_r_lo", "spearman_r_hi", "interval")})
            row["status"] = "ok" if est["spearman_r"] is not None else "constant epochs: correlation undefined"
        rows.append(row)
    tasks = pa.Table.from_pylist(rows, schema=TASK_SCHEMA)
    kept = [r for r in rows if r["status"] == "ok"]
    if not kept:
        most = max((r["n_examples"] for r in rows), default=0)
        raise Skip(f"no task has more than {p.order_min_examples} examples both forgotten and learned (most: {most})")
    msg = (
        f"{len(kept)} of {len(rows)} task(s) with more than {p.order_min_examples} examples; "
        f"threshold {p.order_threshold}, {p.order_split} split"
    )
    return AnalysisResult({"tasks": tasks, "examples": both}, msg)


@draws("order")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    ok = [r for r in o.tables["tasks"].to_pylist() if r["status"] == "ok"][:MAX_PANELS]
    if not ok:
        return []
    ex = o.tables["examples"].to_pylist()
    cols = min(3, len(ok))
    nrows = (len(ok) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
    rng = np.random.default_rng(0)
    for ax, t in zip(axes, ok):
        pts = [
            (e["forget_epoch"], e["learn_epoch"])
            for e in ex
            if all(e[k] == t[k] for k in ("model", "method", "size", "forget_task"))
        ]
        f = np.array([p[0] for p in pts], float) + rng.uniform(-0.2, 0.2, len(pts))
        g = np.array([p[1] for p in pts], float) + rng.uniform(-0.2, 0.2, len(pts))
        ax.scatter(f, g, s=6, alpha=0.4, color=BLUE)
        ax.set_title(
            f"{t['forget_task']} ({t['model']}): rho={t['spearman_r']:.2f}{ci(t, 'spearman_r')}, n={t['n_examples']}",
            fontsize=9,
        )
        ax.set_xlabel("forget epoch")
        ax.set_ylabel("learn epoch")
    for ax in axes[len(ok) :]:
        ax.set_visible(False)
    return [("forgetting order vs learning order", fig)]
