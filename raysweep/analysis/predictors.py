"""Fig 4.1: what predicts the forget ratio.

Task level (one point per forget task and condition): fine-tuned accuracy, total variance
(trace of the covariance) of the forget task's hidden states at the finetuned milestone,
and mean confidence in the correct response before forgetting (finetuned milestone), each
against the forget ratio, with Pearson and Spearman r and p. Example level: each example's
confidence before forgetting against its drop in confidence after forgetting.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysweep.analysis.common import all_cells, by_condition, diagonal, with_forgetting
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.measures import CORRELATION_FIELDS, correlate, correlation_row
from raysweep.analysis.registry import AnalysisResult, Skip, register

PREDICTORS = ("acc_finetuned", "total_variance", "conf_finetuned")
ALL_TASKS = "(all)"

_COND = [("model", pa.string()), ("method", pa.string()), ("size", pa.int32())]


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
        starts = [0] + [i for i in range(1, len(trials)) if (sweeps[i], trials[i]) != (sweeps[i - 1], trials[i - 1])] + [len(trials)]
        for a, b in zip(starts[:-1], starts[1:]):
            v = total_variance(hidden_matrix(rows["hidden"].slice(a, b - a)))
            if v is not None:
                out[(sweeps[a], trials[a])] = v
    return out


@register("predictors", title="Predictors of the forget ratio", figure="Fig 4.1")
def run(ctx: AnalysisContext) -> AnalysisResult:
    cells = with_forgetting(diagonal(all_cells(ctx)))
    notes: list[str] = []

    variances = trial_variances(ctx)
    if not variances:
        notes.append("no hidden states at the finetuned milestone: total variance left empty")
    per_task_var: dict[tuple, list[float]] = defaultdict(list)
    for t in ctx.index.trials:
        v = variances.get((t.sweep, t.trial_id))
        if v is not None:
            per_task_var[(t.model, t.method, t.size, t.forget_task)].append(v)

    task_rows, corr_rows = [], []
    groups = by_condition(cells)
    for (model, method, size), group in groups.items():
        cond = {"model": model, "method": method, "size": size}
        vals: dict[str, list[float | None]] = {p: [] for p in PREDICTORS}
        ratios = []
        for c in sorted(group, key=lambda c: c.forget_task):
            tv = per_task_var.get((model, method, size, c.forget_task))
            var = float(np.mean(tv)) if tv else None
            task_rows.append({**cond, "forget_task": c.forget_task, "n_trials": c.n_trials, "forget_ratio": c.forget_ratio,
                              "acc_finetuned": c.acc_finetuned, "total_variance": var, "conf_finetuned": c.conf_finetuned})
            ratios.append(c.forget_ratio)
            vals["acc_finetuned"].append(c.acc_finetuned)
            vals["total_variance"].append(var)
            vals["conf_finetuned"].append(c.conf_finetuned)
        for p in PREDICTORS:
            corr_rows.append({**cond, "predictor": p, **correlation_row(correlate(vals[p], ratios))})
    most = max(len(g) for g in groups.values())
    if most < 3:
        notes.append(f"task-level correlations need 3+ forget tasks per condition (most: {most})")

    examples = example_table(ctx)
    ex_corr = example_correlations(examples)
    if most < 3 and examples.num_rows == 0:
        raise Skip(f"needs 3+ forget tasks per condition (most: {most}) or per-example scores at both milestones")

    task_schema = pa.schema(_COND + [("forget_task", pa.string()), ("n_trials", pa.int32()), ("forget_ratio", pa.float64())]
                            + [(p, pa.float64()) for p in PREDICTORS])
    corr_schema = pa.schema(_COND + [("predictor", pa.string())] + CORRELATION_FIELDS)
    tables = {
        "correlations": pa.Table.from_pylist(corr_rows, schema=corr_schema),
        "tasks": pa.Table.from_pylist(task_rows, schema=task_schema),
        "examples": examples,
        "example_correlations": ex_corr,
    }
    msg = f"{len(task_rows)} task(s) in {len(groups)} condition(s); {examples.num_rows} example(s)"
    if notes:
        msg += "; " + "; ".join(notes)
    return AnalysisResult(tables, msg)


EXAMPLE_SCHEMA = pa.schema(
    _COND + [("forget_task", pa.string()), ("sweep", pa.string()), ("trial_id", pa.string()), ("seed", pa.int32()),
             ("example_idx", pa.int32()), ("conf_before", pa.float64()), ("conf_after", pa.float64()), ("conf_drop", pa.float64())]
)


def example_table(ctx: AnalysisContext) -> pa.Table:
    """Per (trial, example) of the forget task: confidence at the finetuned and the forgotten
    milestones, and the drop between them."""
    rows = ctx.forget_task_scores(ctx.params.split)
    if rows.num_rows == 0:
        return EXAMPLE_SCHEMA.empty_table()
    ms = ctx.index.milestone_table().select(["sweep", "trial_id", "phase", "epoch", "milestone"])
    tagged = rows.join(ms, keys=["sweep", "trial_id", "phase", "epoch"], join_type="inner")
    keys = ["sweep", "trial_id", "example_idx"]

    def at(milestone: str, name: str) -> pa.Table:
        t = tagged.filter(pc.equal(tagged["milestone"], milestone)).select([*keys, "confidence"])
        return t.rename_columns([*keys, name])

    j = at("finetuned", "conf_before").join(at("forgotten", "conf_after"), keys=keys, join_type="inner")
    j = j.join(ctx.index.trial_table(), keys=["sweep", "trial_id"], join_type="inner")
    b = pc.cast(j["conf_before"], pa.float64())
    a = pc.cast(j["conf_after"], pa.float64())
    j = j.set_column(j.schema.get_field_index("conf_before"), "conf_before", b)
    j = j.set_column(j.schema.get_field_index("conf_after"), "conf_after", a)
    j = j.append_column("conf_drop", pc.subtract(b, a))
    return j.select(EXAMPLE_SCHEMA.names).cast(EXAMPLE_SCHEMA).sort_by(
        [("model", "ascending"), ("method", "ascending"), ("size", "ascending"), ("forget_task", "ascending"),
         ("sweep", "ascending"), ("trial_id", "ascending"), ("example_idx", "ascending")]
    )


def example_correlations(examples: pa.Table) -> pa.Table:
    schema = pa.schema(_COND + [("forget_task", pa.string())] + CORRELATION_FIELDS)
    rows = []
    if examples.num_rows:
        cols = {c: examples[c].to_pylist() for c in ("model", "method", "size", "forget_task", "conf_before", "conf_drop")}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in range(examples.num_rows):
            cond = (cols["model"][i], cols["method"][i], cols["size"][i])
            groups[(*cond, cols["forget_task"][i])].append(i)
            groups[(*cond, ALL_TASKS)].append(i)
        for key in sorted(groups):
            idx = groups[key]
            c = correlate([cols["conf_before"][i] for i in idx], [cols["conf_drop"][i] for i in idx])
            rows.append({"model": key[0], "method": key[1], "size": key[2], "forget_task": key[3], **correlation_row(c)})
    return pa.Table.from_pylist(rows, schema=schema)
