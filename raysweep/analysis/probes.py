"""Fig 6.1: is the skill still linearly decodable after forgetting?

For every trial and milestone (pretrained, finetuned, forgotten): a linear probe that tells
correct (question, answer) pairs from incorrect ones given the model's hidden state at the
pair's last token (`hidden_correct` for prompt + correct choice, label 1; `hidden_distractor`
for prompt + distractor, label 0), at the layer `params.layer`. L2-regularised logistic
regression, trained on the train split's pairs, C chosen on validation, reported on test.

Accuracy is *pair* accuracy: per example, the choice the probe scores higher wins (a tie
counts half). Chance is 0.5 whatever the gold positions, so a probe cannot score by reading
which slot the answer sits in, only by telling right answers from wrong ones.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from raysweep.analysis.common import all_cells, require_trials
from raysweep.analysis.context import AnalysisContext, TrialInfo
from raysweep.analysis.intervals import BOOTSTRAP, SEEDS_T, percentile, rng_for, t_interval
from raysweep.analysis.plotting import (
    GREY,
    MAX_PANELS,
    MILESTONE_COLORS,
    cond_label,
    interval_label,
    num,
    rows_by_condition,
    yerr,
)
from raysweep.analysis.predictors import hidden_matrix
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome
from raysweep.constants import MILESTONES, SPLITS
from raysweep.store import trial_fields

PROBE_MILESTONES = MILESTONES
PAIR_COLUMNS = ("hidden_correct", "hidden_distractor")


@dataclass(frozen=True)
class Pairs:
    """One split's pairs: row i of `correct` and of `distractor` are the same example."""

    correct: np.ndarray
    distractor: np.ndarray

    def __len__(self) -> int:
        return len(self.correct)


@dataclass(frozen=True)
class ProbeJob:
    sweep: str
    trial_id: str
    milestone: str
    train: Pairs
    val: Pairs
    test: Pairs
    cs: tuple[float, ...]
    resamples: int = 1000


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
    # Bootstrap over the test examples (used where the condition has a single seed).
    test_lo: float | None = None
    test_hi: float | None = None


def pair_wins(clf, scaler, pairs: Pairs) -> np.ndarray:
    """Per example 1 if the correct choice scores higher, 0 if lower, 0.5 on a tie."""
    sc = clf.decision_function(scaler.transform(pairs.correct))
    sd = clf.decision_function(scaler.transform(pairs.distractor))
    return (sc > sd).astype(np.float64) + 0.5 * (sc == sd)


def fit_probe(job: ProbeJob) -> ProbeFit:
    """Deterministic given its inputs: lbfgs on one BLAS thread, so the local engine and a
    Ray worker (which gets one CPU) run the very same arithmetic."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    sizes = dict(n_train=len(job.train), n_val=len(job.val), n_test=len(job.test))
    base = dict(sweep=job.sweep, trial_id=job.trial_id, milestone=job.milestone, **sizes)
    if min(sizes.values()) == 0:
        missing = [k[2:] for k, v in sizes.items() if v == 0]
        return ProbeFit(status=f"skipped: no hidden states for {', '.join(missing)}", **base)
    x = np.vstack([job.train.correct, job.train.distractor])
    y = np.concatenate([np.ones(len(job.train), np.int64), np.zeros(len(job.train), np.int64)])
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaler = StandardScaler().fit(x)
        xs = scaler.transform(x)
        best = None
        for c in job.cs:
            clf = LogisticRegression(C=c, max_iter=2000).fit(xs, y)
            val = float(pair_wins(clf, scaler, job.val).mean())
            # Ties go to the smaller C (the stronger regularisation), tried first.
            if best is None or val > best[0]:
                best = (val, c, clf)
        assert best is not None
        wins = pair_wins(best[2], scaler, job.test)
    rng = rng_for(job.sweep, job.trial_id, job.milestone, "probe")
    draws = wins[rng.integers(0, len(wins), size=(job.resamples, len(wins)))].mean(axis=1)
    lo, hi = percentile(draws)
    acc = float(wins.mean())
    return ProbeFit(status="ok", c=best[1], val_acc=best[0], test_acc=acc, test_lo=lo, test_hi=hi, **base)


FIT_SCHEMA = pa.schema(
    [
        *trial_fields("model", "method", "size", "forget_task", "sweep", "trial_id", "seed"),
        ("milestone", pa.string()),
        ("layer", pa.int16()),
        ("status", pa.string()),
        ("n_train", pa.int64()),
        ("n_val", pa.int64()),
        ("n_test", pa.int64()),
        ("c", pa.float64()),
        ("val_acc", pa.float64()),
        ("test_acc", pa.float64()),
        ("test_lo", pa.float64()),
        ("test_hi", pa.float64()),
    ]
)


def _jobs_for_chunk(ctx: AnalysisContext, trials: tuple[TrialInfo, ...]) -> list[ProbeJob]:
    hidden = ctx.hidden_rows(PROBE_MILESTONES, None, trials, columns=PAIR_COLUMNS)
    if hidden.num_rows == 0:
        return []
    xc, xd = hidden_matrix(hidden["hidden_correct"]), hidden_matrix(hidden["hidden_distractor"])
    info = {(t.sweep, t.trial_id): t for t in trials}
    by_unit: dict[tuple[str, str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    cols = {c: hidden[c].to_pylist() for c in ("sweep", "trial_id", "phase", "epoch", "split")}
    for i in range(hidden.num_rows):
        t = info[(cols["sweep"][i], cols["trial_id"][i])]
        for m in PROBE_MILESTONES:
            ref = t.milestones.get(m)
            if ref is not None and ref.phase == cols["phase"][i] and ref.epoch == cols["epoch"][i]:
                by_unit[(t.sweep, t.trial_id, m)][cols["split"][i]].append(i)
    jobs = []
    p = ctx.params
    for sweep, tid, m in sorted(by_unit, key=lambda u: (u[0], u[1], PROBE_MILESTONES.index(u[2]))):
        parts = by_unit[(sweep, tid, m)]
        idx = {s: np.array(parts.get(s, []), dtype=np.int64) for s in SPLITS}
        tr, va, te = (Pairs(xc[idx[s]], xd[idx[s]]) for s in SPLITS)
        jobs.append(ProbeJob(sweep, tid, m, tr, va, te, p.probe_cs, p.bootstrap_resamples))
    return jobs


@register("probes", title="Linear probes", figure="Fig 6.1")
def run(ctx: AnalysisContext) -> AnalysisResult:
    require_trials(ctx)
    fits: list[ProbeFit] = []
    # Chunk by chunk: the states of one chunk are released before the next is read.
    for chunk in ctx.hidden_chunks(PROBE_MILESTONES):
        fits.extend(ctx.engine.map(fit_probe, _jobs_for_chunk(ctx, chunk)))
    if not fits:
        missing = ctx.missing_layer(PROBE_MILESTONES)
        if missing:
            raise Skip(missing)
        raise Skip("no hidden states of the forget tasks at the milestones (scoring.hidden_states is 'none'?)")
    info = {(t.sweep, t.trial_id): t for t in ctx.index.trials}
    fit_rows = []
    names = (
        "sweep",
        "trial_id",
        "milestone",
        "status",
        "n_train",
        "n_val",
        "n_test",
        "c",
        "val_acc",
        "test_acc",
        "test_lo",
        "test_hi",
    )
    for f in fits:
        t = info[(f.sweep, f.trial_id)]
        fit_rows.append(
            {
                "model": t.model,
                "method": t.method,
                "size": t.size,
                "forget_task": t.forget_task,
                "seed": t.seed,
                "layer": ctx.params.layer,
                **{n: getattr(f, n) for n in names},
            }
        )
    fits_table = pa.Table.from_pylist(fit_rows, schema=FIT_SCHEMA)
    summary = summarize(fits_table, ctx)
    n_ok = int(pc.sum(pc.equal(fits_table["status"], "ok")).as_py() or 0)
    if n_ok == 0:
        raise Skip(f"no probe could be fitted ({fit_rows[0]['status']})")
    msg = (
        f"{n_ok} of {len(fits)} probe(s) fitted on layer {ctx.params.layer}; test pair accuracy "
        f"(correct vs distractor answer, chance 0.5), C chosen on validation"
    )
    return AnalysisResult({"summary": summary, "fits": fits_table}, msg)


def _triple(name: str) -> list[tuple[str, pa.DataType]]:
    return [(name, pa.float64()), (f"{name}_lo", pa.float64()), (f"{name}_hi", pa.float64())]


SUMMARY_SCHEMA = pa.schema(
    [
        *trial_fields("model", "method", "size", "forget_task"),
        ("layer", pa.int16()),
        ("n_trials", pa.int32()),
        ("n_seeds", pa.int32()),
        ("interval", pa.string()),
    ]
    + [f for m in PROBE_MILESTONES for f in _triple(f"probe_{m}")]
    + [f for m in PROBE_MILESTONES for f in _triple(f"acc_{m}")]
)


def summarize(fits: pa.Table, ctx: AnalysisContext) -> pa.Table:
    """Probe test pair accuracy per task and milestone (mean over seeds with a t-interval, or
    one seed's bootstrap over test examples), next to the model's own (behavioural) test
    accuracy at the same milestones."""
    behaviour = {}
    try:
        for c in all_cells(ctx):
            if c.eval_task == c.forget_task:
                behaviour[(c.model, c.method, c.size, c.forget_task)] = c
    except Skip:
        pass
    acc: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    trials: dict[tuple, set[tuple[str, str]]] = defaultdict(set)
    for r in fits.to_pylist():
        key = (r["model"], r["method"], r["size"], r["forget_task"])
        trials[key].add((r["sweep"], r["trial_id"]))
        if r["test_acc"] is not None:
            acc[key][r["milestone"]].append(r)
    rows = []
    for key in sorted(trials):
        n = len(trials[key])
        row = {
            "model": key[0],
            "method": key[1],
            "size": key[2],
            "forget_task": key[3],
            "layer": ctx.params.layer,
            "n_trials": n,
            "n_seeds": n,
            "interval": SEEDS_T if n >= 2 else BOOTSTRAP,
        }
        cell = behaviour.get(key)
        for m in PROBE_MILESTONES:
            got = acc[key].get(m, [])
            if len(got) >= 2:
                est = t_interval([g["test_acc"] for g in got])
                row.update({f"probe_{m}": est.value, f"probe_{m}_lo": est.lo, f"probe_{m}_hi": est.hi})
            elif got:
                row.update(
                    {
                        f"probe_{m}": got[0]["test_acc"],
                        f"probe_{m}_lo": got[0]["test_lo"],
                        f"probe_{m}_hi": got[0]["test_hi"],
                    }
                )
            lo, hi = cell.bounds.get(f"acc_{m}", (None, None)) if cell is not None else (None, None)
            row.update(
                {
                    f"acc_{m}": getattr(cell, f"acc_{m}") if cell is not None else None,
                    f"acc_{m}_lo": lo,
                    f"acc_{m}_hi": hi,
                }
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


@draws("probes")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    ms = MILESTONES
    for _, rs in list(rows_by_condition(o.tables["summary"]).items())[:MAX_PANELS]:
        x = np.arange(len(rs))
        fig = Figure(figsize=(max(5.0, 0.7 * len(rs) + 2), 3.6), layout="constrained")
        ax = fig.subplots()
        for k, m in enumerate(ms):
            ax.bar(
                x + (k - 1) * 0.27,
                [num(r[f"probe_{m}"]) for r in rs],
                0.27,
                label=f"probe, {m}",
                color=MILESTONE_COLORS[m],
                yerr=yerr(rs, f"probe_{m}"),
                capsize=2,
            )
        ax.plot(x + 0.27, [num(r["acc_forgotten"]) for r in rs], "k_", ms=14, mew=2, label="model accuracy, forgotten")
        ax.axhline(0.5, ls="--", color=GREY, lw=1)
        ax.set_xticks(x, [r["forget_task"] for r in rs], rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("test pair accuracy (chance 0.5)")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{cond_label(rs[0])}, layer {rs[0].get('layer')}; {interval_label(rs)}", fontsize=9)
        figs.append((f"probe accuracy {cond_label(rs[0])}", fig))
    return figs
