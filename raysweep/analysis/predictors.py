"""Fig 4.1: what predicts the forget ratio.

Task level (one point per forget task and condition): fine-tuned accuracy, total variance
(trace of the covariance) of the forget task's last-prompt-token hidden states at layer
`params.layer` on `params.variance_split` at the finetuned milestone, and mean confidence in
the correct response before forgetting (finetuned milestone), each against the forget
ratio, with Pearson and Spearman r and p and 95% intervals. Example level: each example's
confidence before forgetting against its confidence after forgetting, and (over the
examples right before forgetting) against being forgotten: point-biserial r and AUC.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from raysweep.analysis.common import all_cells, by_condition, diagonal, with_forgetting
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.intervals import correlation_estimates
from raysweep.analysis.measures import CORRELATION_INTERVAL_FIELDS
from raysweep.analysis.plotting import BLUE, MAX_PANELS, ci, cond_label, num, rows_by_condition
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome
from raysweep.store import trial_fields

PREDICTORS = ("acc_finetuned", "total_variance", "conf_finetuned")
ALL_TASKS = "(all)"

_COND = [*trial_fields("model", "method", "size")]


def hidden_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(rows, dim) float64 from the hidden column: a fixed-size list as written, or a plain
    list where a reader (DuckDB) drops the fixed size; then every row must have one width."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, 0))
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr)
        dim = int(pc.min(lengths).as_py())
        if dim != int(pc.max(lengths).as_py()):
            raise ValueError("hidden states of different widths in one scan")
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, dim)


def total_variance(x: np.ndarray) -> float | None:
    """Trace of the sample covariance: the sum of per-dimension variances (ddof=1)."""
    if x.shape[0] < 2:
        return None
    return float(np.var(x, axis=0, ddof=1).sum())


def trial_variances(ctx: AnalysisContext) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for chunk in ctx.hidden_chunks(("finetuned",)):
        rows = ctx.hidden_rows(("finetuned",), ctx.params.variance_split, chunk)
        if rows.num_rows == 0:
            continue
        sweeps, trials = rows["sweep"].to_pylist(), rows["trial_id"].to_pylist()
        # Rows arrive sorted by (sweep, trial): each trial is one contiguous run.
        starts = [0] + [i for i in range(1, len(trials)) if (sweeps[i], trials[i]) != (sweeps[i - 1], trials[i - 1])]
        starts.append(len(trials))
        for a, b in zip(starts[:-1], starts[1:]):
            v = total_variance(hidden_matrix(rows["hidden"].slice(a, b - a)))
            if v is not None:
                out[(sweeps[a], trials[a])] = v
    return out


@register("predictors", title="Predictors of the forget ratio", figure="Fig 4.1")
def run(ctx: AnalysisContext) -> AnalysisResult:
    cells = with_forgetting(diagonal(all_cells(ctx)))
    notes: list[str] = []
    p = ctx.params

    variances = trial_variances(ctx)
    if not variances:
        notes.append(ctx.missing_layer(("finetuned",)) or "no hidden states at the finetuned milestone")
        notes[-1] += ": total variance left empty"
    var_of: dict[tuple, float] = {}
    for t in ctx.index.trials:
        v = variances.get((t.sweep, t.trial_id))
        if v is not None:
            var_of[(t.model, t.method, t.size, t.forget_task, t.seed)] = v

    task_rows, corr_rows = [], []
    groups = by_condition(cells)
    for (model, method, size), group in groups.items():
        cond = {"model": model, "method": method, "size": size}
        # seed -> predictor -> (x, ratio) over the condition's forget tasks
        points: dict[str, dict[int, tuple[list, list]]] = {q: {} for q in PREDICTORS}
        for c in sorted(group, key=lambda c: c.forget_task):
            tv = [var_of[k] for k in var_of if k[:4] == (model, method, size, c.forget_task)]
            var = float(np.mean(tv)) if tv else None
            task_rows.append(
                {
                    **cond,
                    "forget_task": c.forget_task,
                    "n_trials": c.n_trials,
                    "layer": p.layer,
                    "forget_ratio": c.forget_ratio,
                    "acc_finetuned": c.acc_finetuned,
                    "total_variance": var,
                    "conf_finetuned": c.conf_finetuned,
                }
            )
            for seed, sv in c.per_seed.items():
                x_of = {
                    "acc_finetuned": sv["acc_finetuned"],
                    "conf_finetuned": sv["conf_finetuned"],
                    "total_variance": var_of.get((model, method, size, c.forget_task, seed)),
                }
                for q in PREDICTORS:
                    xs, ys = points[q].setdefault(seed, ([], []))
                    xs.append(x_of[q])
                    ys.append(sv["forget_ratio"])
        for q in PREDICTORS:
            est = correlation_estimates(points[q], p.bootstrap_resamples, (model, method, size, q))
            corr_rows.append({**cond, "predictor": q, "layer": p.layer if q == "total_variance" else None, **est})
    most = max(len(g) for g in groups.values())
    if most < 3:
        notes.append(f"task-level correlations need 3+ forget tasks per condition (most: {most})")

    examples = example_table(ctx)
    ex_corr = example_correlations(examples, p.bootstrap_resamples)
    if most < 3 and examples.num_rows == 0:
        raise Skip(f"needs 3+ forget tasks per condition (most: {most}) or per-example scores at both milestones")

    task_schema = pa.schema(
        _COND
        + [
            ("forget_task", pa.string()),
            ("n_trials", pa.int32()),
            ("layer", pa.int16()),
            ("forget_ratio", pa.float64()),
        ]
        + [(q, pa.float64()) for q in PREDICTORS]
    )
    corr_schema = pa.schema(_COND + [("predictor", pa.string()), ("layer", pa.int16())] + CORRELATION_INTERVAL_FIELDS)
    tables = {
        "correlations": pa.Table.from_pylist(corr_rows, schema=corr_schema),
        "tasks": pa.Table.from_pylist(task_rows, schema=task_schema),
        "examples": examples,
        "example_correlations": ex_corr,
    }
    msg = (
        f"{len(task_rows)} task(s) in {len(groups)} condition(s); {examples.num_rows} example(s); "
        f"total variance of layer {p.layer} on {p.variance_split}"
    )
    if notes:
        msg += "; " + "; ".join(notes)
    return AnalysisResult(tables, msg)


EXAMPLE_SCHEMA = pa.schema(
    _COND
    + [
        *trial_fields("forget_task", "sweep", "trial_id", "seed"),
        ("example_idx", pa.int32()),
        ("conf_before", pa.float64()),
        ("conf_after", pa.float64()),
        ("conf_drop", pa.float64()),
        ("correct_before", pa.bool_()),
        ("correct_after", pa.bool_()),
        ("forgotten", pa.bool_()),
    ]
)


def example_table(ctx: AnalysisContext) -> pa.Table:
    """Per (trial, example) of the forget task: confidence and correctness at the finetuned
    and the forgotten milestones; `forgotten` = right at the first, wrong at the second."""
    rows = ctx.forget_task_scores(ctx.params.split)
    if rows.num_rows == 0:
        return EXAMPLE_SCHEMA.empty_table()
    ms = ctx.index.milestone_table().select(["sweep", "trial_id", "phase", "epoch", "milestone"])
    tagged = rows.join(ms, keys=["sweep", "trial_id", "phase", "epoch"], join_type="inner")
    keys = ["sweep", "trial_id", "example_idx"]

    def at(milestone: str, tag: str) -> pa.Table:
        t = tagged.filter(pc.equal(tagged["milestone"], milestone)).select([*keys, "confidence", "correct"])
        return t.rename_columns([*keys, f"conf_{tag}", f"correct_{tag}"])

    j = at("finetuned", "before").join(at("forgotten", "after"), keys=keys, join_type="inner")
    j = j.join(ctx.index.trial_table(), keys=["sweep", "trial_id"], join_type="inner")
    b = pc.cast(j["conf_before"], pa.float64())
    a = pc.cast(j["conf_after"], pa.float64())
    j = j.set_column(j.schema.get_field_index("conf_before"), "conf_before", b)
    j = j.set_column(j.schema.get_field_index("conf_after"), "conf_after", a)
    j = j.append_column("conf_drop", pc.subtract(b, a))
    j = j.append_column("forgotten", pc.and_(j["correct_before"], pc.invert(j["correct_after"])))
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


# What the confidence before forgetting is correlated with, example by example. Not the drop
# (before - after): that contains `before` itself and correlates with it even when forgetting
# ignores confidence. `forgotten` is read over the examples right before forgetting only, so
# that being wrong already (low confidence) does not count as being forgotten.
EXAMPLE_TARGETS = ("conf_after", "forgotten")


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties half: the Mann-Whitney U / (n1 n0)."""
    from scipy.stats import rankdata

    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return None
    r = rankdata(scores)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def example_correlations(examples: pa.Table, resamples: int = 1000) -> pa.Table:
    schema = pa.schema(
        _COND
        + [("forget_task", pa.string()), ("target", pa.string())]
        + CORRELATION_INTERVAL_FIELDS
        + [("auc", pa.float64())]
    )
    rows = []
    if examples.num_rows:
        names = (
            "model",
            "method",
            "size",
            "forget_task",
            "seed",
            "conf_before",
            "conf_after",
            "correct_before",
            "forgotten",
        )
        cols = {c: examples[c].to_pylist() for c in names}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(examples.num_rows):
            cond = (cols["model"][i], cols["method"][i], cols["size"][i])
            groups[(*cond, cols["forget_task"][i])].append(i)
            groups[(*cond, ALL_TASKS)].append(i)
        for key in sorted(groups):
            for target in EXAMPLE_TARGETS:
                idx = groups[key] if target == "conf_after" else [i for i in groups[key] if cols["correct_before"][i]]
                by_seed: dict[int, tuple[list, list]] = {}
                for i in idx:
                    xs, ys = by_seed.setdefault(cols["seed"][i], ([], []))
                    xs.append(cols["conf_before"][i])
                    ys.append(float(cols[target][i]))
                est = correlation_estimates(by_seed, resamples, (*key, target)) if by_seed else _empty_estimate()
                a = None
                if target == "forgotten" and idx:
                    a = auc(
                        np.array([cols["conf_before"][i] for i in idx]), np.array([cols["forgotten"][i] for i in idx])
                    )
                rows.append(
                    {
                        "model": key[0],
                        "method": key[1],
                        "size": key[2],
                        "forget_task": key[3],
                        "target": target,
                        **est,
                        "auc": a,
                    }
                )
    return pa.Table.from_pylist(rows, schema=schema)


def _empty_estimate() -> dict[str, object]:
    return {"n": 0, "n_seeds": 0, "interval": None}


@draws("predictors")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    corr = {(r["model"], r["method"], r["size"], r["predictor"]): r for r in o.tables["correlations"].to_pylist()}
    labels = {
        "acc_finetuned": "fine-tuned accuracy",
        "total_variance": "total variance of hidden states",
        "conf_finetuned": "confidence before forgetting",
    }
    for cond, rs in list(rows_by_condition(o.tables["tasks"]).items())[:MAX_PANELS]:
        if len(rs) < 3:
            continue
        fig = Figure(figsize=(12, 3.8), layout="constrained")
        axes = fig.subplots(1, 3)
        y = [num(r["forget_ratio"]) for r in rs]
        for ax, p in zip(axes, labels):
            x = [num(r[p]) for r in rs]
            ax.scatter(x, y, color=BLUE)
            for xi, yi, r in zip(x, y, rs):
                if np.isfinite(xi) and np.isfinite(yi):
                    ax.annotate(r["forget_task"], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
            c = corr.get((*cond, p))
            stat = "n/a"
            if c and c["pearson_r"] is not None:
                stat = f"r={c['pearson_r']:.2f}{ci(c, 'pearson_r')} (p={c['pearson_p']:.2g})"
            ax.set_title(stat, fontsize=9)
            ax.set_xlabel(labels[p])
            ax.set_ylabel("forget ratio")
        fig.suptitle(cond_label(rs[0]))
        figs.append((f"task-level predictors {cond_label(rs[0])}", fig))
    ex = o.tables["examples"]
    if ex.num_rows:
        n = ex.num_rows
        take = np.sort(np.random.default_rng(0).choice(n, size=min(n, 5000), replace=False))
        sub = ex.take(pa.array(take))
        fig = Figure(figsize=(5, 4), layout="constrained")
        ax = fig.subplots()
        ax.scatter(sub["conf_before"].to_numpy(), sub["conf_after"].to_numpy(), s=6, alpha=0.4, color=BLUE)
        pooled = {r["target"]: r for r in o.tables["example_correlations"].to_pylist() if r["forget_task"] == "(all)"}
        parts = []
        after, flag = pooled.get("conf_after"), pooled.get("forgotten")
        if after and after["spearman_r"] is not None:
            parts.append(f"rho(after)={after['spearman_r']:.2f}{ci(after, 'spearman_r')}")
        if flag and flag.get("auc") is not None:
            parts.append(f"AUC(forgotten)={flag['auc']:.2f}")
        if parts:
            ax.set_title(f"examples ({cond_label(after or flag)}): " + ", ".join(parts), fontsize=8)
        ax.set_xlabel("confidence before forgetting")
        ax.set_ylabel("confidence after forgetting")
        figs.append(("example-level confidence before vs after", fig))
    return figs
