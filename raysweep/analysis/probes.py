"""Fig 6.1: is the skill still linearly decodable after forgetting?

For every trial and milestone (pretrained, finetuned, forgotten): an L2-regularised logistic
regression on the forget task's hidden states (last prompt token, fifth-to-last layer)
predicting the gold choice, trained on train, C chosen on validation, reported on test.
The store keeps prompt-token states only, so the probe decodes which of the two choices is
correct from the question's representation.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysweep.analysis.common import all_cells, require_trials
from raysweep.analysis.context import AnalysisContext, TrialInfo
from raysweep.analysis.predictors import hidden_matrix
from raysweep.analysis.registry import AnalysisResult, Skip, register

PROBE_MILESTONES = ("pretrained", "finetuned", "forgotten")


@dataclass(frozen=True)
class ProbeJob:
    sweep: str
    trial_id: str
    milestone: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    cs: tuple[float, ...]


@dataclass(frozen=True)
class ProbeFit:
    sweep: str
    trial_id: str
    milestone: str
    status: str
    n_train: int
    n_val: int
    n_test: int
    c: float | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    majority_test_acc: float | None = None


def fit_probe(job: ProbeJob) -> ProbeFit:
    """Deterministic given its inputs: lbfgs on one BLAS thread, so the local engine and a
    Ray worker (which gets one CPU) run the very same arithmetic."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    sizes = dict(n_train=len(job.y_train), n_val=len(job.y_val), n_test=len(job.y_test))
    base = dict(sweep=job.sweep, trial_id=job.trial_id, milestone=job.milestone, **sizes)
    if min(sizes.values()) == 0:
        missing = [k[2:] for k, v in sizes.items() if v == 0]
        return ProbeFit(status=f"skipped: no hidden states for {', '.join(missing)}", **base)
    if len(np.unique(job.y_train)) < 2:
        return ProbeFit(status="skipped: one class only in train", **base)
    majority = float(np.mean(job.y_test == np.bincount(job.y_train).argmax()))
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler = StandardScaler().fit(job.x_train)
        xtr, xva, xte = scaler.transform(job.x_train), scaler.transform(job.x_val), scaler.transform(job.x_test)
        best: tuple[float, float, LogisticRegression] | None = None
        for c in job.cs:
            clf = LogisticRegression(C=c, max_iter=2000).fit(xtr, job.y_train)
            val = float(np.mean(clf.predict(xva) == job.y_val))
            # Ties go to the smaller C (the stronger regularisation), tried first.
            if best is None or val > best[0]:
                best = (val, c, clf)
        assert best is not None
        test = float(np.mean(best[2].predict(xte) == job.y_test))
    return ProbeFit(status="ok", c=best[1], val_acc=best[0], test_acc=test, majority_test_acc=majority, **base)


FIT_SCHEMA = pa.schema(
    [("model", pa.string()), ("method", pa.string()), ("size", pa.int32()), ("forget_task", pa.string()),
     ("sweep", pa.string()), ("trial_id", pa.string()), ("seed", pa.int32()), ("milestone", pa.string()),
     ("status", pa.string()), ("n_train", pa.int64()), ("n_val", pa.int64()), ("n_test", pa.int64()),
     ("c", pa.float64()), ("val_acc", pa.float64()), ("test_acc", pa.float64()), ("majority_test_acc", pa.float64())]
)


def _jobs_for_chunk(ctx: AnalysisContext, trials: tuple[TrialInfo, ...]) -> list[ProbeJob]:
    hidden = ctx.hidden_rows(PROBE_MILESTONES, None, trials)
    if hidden.num_rows == 0:
        return []
    gold = ctx.forget_task_scores()
    keys = ["sweep", "trial_id", "phase", "epoch", "split", "example_idx"]
    # Join on the keys only (with a row number), then take: join payloads of list type
    # are not supported everywhere.
    k = hidden.select(keys).append_column("row", pa.array(np.arange(hidden.num_rows), pa.int64()))
    j = k.join(gold.select([*keys, "gold"]), keys=keys, join_type="inner").sort_by("row")
    x_all = hidden_matrix(hidden["hidden"].take(j["row"]))
    y_all = j["gold"].to_numpy().astype(np.int64)
    info = {(t.sweep, t.trial_id): t for t in trials}
    by_unit: dict[tuple[str, str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    cols = {c: j[c].to_pylist() for c in ("sweep", "trial_id", "phase", "epoch", "split")}
    for i in range(j.num_rows):
        t = info[(cols["sweep"][i], cols["trial_id"][i])]
        for m in PROBE_MILESTONES:
            ref = t.milestones.get(m)
            if ref is not None and ref.phase == cols["phase"][i] and ref.epoch == cols["epoch"][i]:
                by_unit[(t.sweep, t.trial_id, m)][cols["split"][i]].append(i)
    jobs = []
    for (sweep, tid, m) in sorted(by_unit, key=lambda u: (u[0], u[1], PROBE_MILESTONES.index(u[2]))):
        parts = by_unit[(sweep, tid, m)]
        idx = {split: np.array(parts.get(split, []), dtype=np.int64) for split in ("train", "validation", "test")}
        (xtr, ytr), (xva, yva), (xte, yte) = ((x_all[idx[s]], y_all[idx[s]]) for s in ("train", "validation", "test"))
        jobs.append(ProbeJob(sweep, tid, m, xtr, ytr, xva, yva, xte, yte, ctx.params.probe_cs))
    return jobs


@register("probes", title="Linear probes", figure="Fig 6.1")
def run(ctx: AnalysisContext) -> AnalysisResult:
    require_trials(ctx)
    fits: list[ProbeFit] = []
    # Chunk by chunk: the states of one chunk are released before the next is read.
    for chunk in ctx.hidden_chunks(PROBE_MILESTONES):
        fits.extend(ctx.engine.map(fit_probe, _jobs_for_chunk(ctx, chunk)))
    if not fits:
        raise Skip("no hidden states of the forget tasks at the milestones (scoring.hidden_states is 'none'?)")
    info = {(t.sweep, t.trial_id): t for t in ctx.index.trials}
    fit_rows = []
    for f in fits:
        t = info[(f.sweep, f.trial_id)]
        fit_rows.append({"model": t.model, "method": t.method, "size": t.size, "forget_task": t.forget_task, "seed": t.seed,
                         **{n: getattr(f, n) for n in ("sweep", "trial_id", "milestone", "status", "n_train", "n_val", "n_test",
                                                       "c", "val_acc", "test_acc", "majority_test_acc")}})
    fits_table = pa.Table.from_pylist(fit_rows, schema=FIT_SCHEMA)
    summary = summarize(fits_table, ctx)
    n_ok = int(pc.sum(pc.equal(fits_table["status"], "ok")).as_py() or 0)
    if n_ok == 0:
        raise Skip(f"no probe could be fitted ({fit_rows[0]['status']})")
    return AnalysisResult({"summary": summary, "fits": fits_table}, f"{n_ok} of {len(fits)} probe(s) fitted; test accuracy, C chosen on validation")


SUMMARY_SCHEMA = pa.schema(
    [("model", pa.string()), ("method", pa.string()), ("size", pa.int32()), ("forget_task", pa.string()), ("n_trials", pa.int32())]
    + [(f"probe_{m}", pa.float64()) for m in PROBE_MILESTONES]
    + [(f"acc_{m}", pa.float64()) for m in PROBE_MILESTONES]
)


def summarize(fits: pa.Table, ctx: AnalysisContext) -> pa.Table:
    """Mean probe test accuracy per task and milestone over the condition's trials, next to
    the model's own (behavioural) test accuracy at the same milestones."""
    behaviour = {}
    try:
        for c in all_cells(ctx):
            if c.eval_task == c.forget_task:
                behaviour[(c.model, c.method, c.size, c.forget_task)] = c
    except Skip:
        pass
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    trials: dict[tuple, set[tuple[str, str]]] = defaultdict(set)
    for r in fits.to_pylist():
        key = (r["model"], r["method"], r["size"], r["forget_task"])
        trials[key].add((r["sweep"], r["trial_id"]))
        if r["test_acc"] is not None:
            acc[key][r["milestone"]].append(r["test_acc"])
    rows = []
    for key in sorted(trials):
        row = {"model": key[0], "method": key[1], "size": key[2], "forget_task": key[3], "n_trials": len(trials[key])}
        for m in PROBE_MILESTONES:
            vals = acc[key].get(m)
            row[f"probe_{m}"] = float(np.mean(vals)) if vals else None
            cell = behaviour.get(key)
            row[f"acc_{m}"] = getattr(cell, f"acc_{m}") if cell is not None else None
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
