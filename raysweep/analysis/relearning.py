"""Beyond the paper: relearning attacks (Hu et al., 2024). After forgetting, the relearn
phase fine-tunes with true labels on all of the trained set, on its first k examples only
(`phases.relearn.examples: k`), or on another task's train split (`phases.relearn.task`):
how fast does the forget task's held-out accuracy come back? `relearn_data` names what was
relearned: "forget set" or the other task.

Per trial, on the forget task's test split (held out from every phase), step 0 being the
forgotten milestone the phase starts from and step e its e-th relearn epoch:

- `epochs_to_90`: the first relearn epoch whose test accuracy reaches 90% of the finetuned
  milestone's (None: never within the phase);
- the recovered fraction (acc_e - acc_forgotten) / (acc_finetuned - acc_forgotten), masked
  when that denominator is below `--min-headroom` (forgetting removed next to nothing);
- `recovery_auc`: the area under the recovered-fraction curve over steps 0..E (trapezoid),
  divided by E: 0 when nothing came back, 1 when all of it came back at once.

Per example: each test example wrong at the forgotten milestone, and the first relearn epoch
it is right again. Over seeds: the mean of per-seed values with a t-interval; one seed: a
bootstrap over the test examples (each resample redraws the whole curve).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from raysweep.analysis.common import require_trials
from raysweep.analysis.context import AnalysisContext, TrialInfo
from raysweep.analysis.engine import Scan
from raysweep.analysis.intervals import BOOTSTRAP, SEEDS_T, percentile, resample_chunks, rng_for, t_interval
from raysweep.analysis.plotting import epoch_axis, num, per_model
from raysweep.analysis.reducers import CollectRows
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome
from raysweep.store import trial_fields

SPLIT = "test"
RECOVER = 0.9
_COND = [
    *trial_fields("model", "method", "size", "forget_task"),
    ("relearn_data", pa.string()),
    ("relearn_examples", pa.int32()),
]
_COND_NAMES = [name for name, _ in _COND]
FORGET_SET = "forget set"
CURVE_SCHEMA = pa.schema(
    [*trial_fields("sweep", "trial_id")]
    + _COND
    + [("seed", pa.int32()), ("step", pa.int32()), ("acc", pa.float64()), ("recovered", pa.float64())]
)
TRIAL_SCHEMA = pa.schema(
    [*trial_fields("sweep", "trial_id")]
    + _COND
    + [
        ("seed", pa.int32()),
        ("n_examples", pa.int32()),
        ("acc_finetuned", pa.float64()),
        ("acc_forgotten", pa.float64()),
        ("acc_relearned", pa.float64()),
        ("relearn_epochs", pa.int32()),
        ("epochs_to_90", pa.int32()),
        ("recovery_auc", pa.float64()),
    ]
)
SUMMARY_SCHEMA = pa.schema(
    _COND
    + [
        ("n_trials", pa.int32()),
        ("n_recovered_90", pa.int32()),
        ("epochs_to_90", pa.float64()),
        ("recovery_auc", pa.float64()),
        ("recovery_auc_lo", pa.float64()),
        ("recovery_auc_hi", pa.float64()),
        ("n_seeds", pa.int32()),
        ("interval", pa.string()),
    ]
)
EXAMPLE_SCHEMA = pa.schema(
    [*trial_fields("sweep", "trial_id")]
    + _COND
    + [("seed", pa.int32()), ("example_idx", pa.int32()), ("first_correct_epoch", pa.int32())]
)


@dataclass
class Recovery:
    """One trial's test-split correctness: rows = examples, columns = finetuned, then steps
    0 (forgotten) .. E (last relearn epoch)."""

    example_idx: np.ndarray
    finetuned: np.ndarray  # (n,) bool
    steps: np.ndarray  # (n, E + 1) bool


def recovery_curve(r: Recovery, min_headroom: float) -> tuple[np.ndarray, np.ndarray | None]:
    acc = r.steps.mean(axis=0)
    gap = r.finetuned.mean() - acc[0]
    return acc, ((acc - acc[0]) / gap if gap >= max(min_headroom, 1e-12) else None)


def recovery_auc(recovered: np.ndarray | None) -> float | None:
    if recovered is None or recovered.size < 2:
        return None
    return float(((recovered[1:] + recovered[:-1]) / 2).sum() / (recovered.size - 1))


def epochs_to_recover(r: Recovery, fraction: float = RECOVER) -> int | None:
    acc = r.steps.mean(axis=0)
    hit = np.flatnonzero(acc[1:] >= fraction * r.finetuned.mean() - 1e-12)
    return int(hit[0]) + 1 if hit.size else None


def _bootstrap_auc(
    r: Recovery, min_headroom: float, resamples: int, rng: np.random.Generator
) -> tuple[float | None, float | None]:
    n = r.steps.shape[0]
    if n < 2:
        return None, None
    draws = []
    for idx in resample_chunks(n, resamples, rng):
        acc = r.steps[idx].mean(axis=1)  # (B, E + 1)
        gap = r.finetuned[idx].mean(axis=1) - acc[:, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            rec = np.where(gap[:, None] >= max(min_headroom, 1e-12), (acc - acc[:, :1]) / gap[:, None], np.nan)
        draws.append(((rec[:, 1:] + rec[:, :-1]) / 2).sum(axis=1) / (rec.shape[1] - 1))
    return percentile(np.concatenate(draws))


def _relearn_data(ctx: AnalysisContext, t: TrialInfo) -> tuple[str, int]:
    """What the trial relearned on, and how many examples (its plan, as the trial ran it)."""
    rows = ctx.memo(("relearn_plans", t.sweep), lambda: ctx.store.trials(t.sweep).select(["trial_id", "plan_json"]))
    hit = rows.filter(pc.equal(rows["trial_id"], t.trial_id))["plan_json"].to_pylist()
    plan = json.loads(hit[0]) if hit and hit[0] else {}
    relearn = (plan.get("phases") or {}).get("relearn") or {}
    k = relearn.get("examples")
    return relearn.get("task") or FORGET_SET, int(k) if k else t.size


def trial_recovery(ctx: AnalysisContext, t: TrialInfo) -> Recovery | None:
    ft, fg = t.milestones.get("finetuned"), t.milestones.get("forgotten")
    epochs = t.committed.get("relearn", ())
    if ft is None or fg is None or not epochs:
        return None
    files = [f for f in (t.scan_file(ctx.store.root, "scores", ref) for ref in (ft, fg)) if f is not None]
    files += list(ctx.index.phase_files("scores", ("relearn",), (t,)))
    rows = ctx.engine.reduce(
        Scan(
            tuple(files),
            columns=("phase", "epoch", "example_idx", "correct"),
            equals=(("split", SPLIT),),
            trial_task=((t.sweep, t.trial_id, t.forget_task),),
        ),
        CollectRows(order=("phase", "epoch", "example_idx")),
    )
    if rows.num_rows == 0:
        return None
    phase = rows["phase"].to_numpy(zero_copy_only=False)
    epoch = rows["epoch"].to_numpy()
    idx = rows["example_idx"].to_numpy()
    correct = pc.fill_null(rows["correct"], False).to_numpy(zero_copy_only=False).astype(bool)
    examples = np.unique(idx)  # sorted: an example's column index is its searchsorted position

    def column(here: np.ndarray) -> np.ndarray | None:
        out = np.full(examples.size, -1, dtype=np.int8)
        out[np.searchsorted(examples, idx[here])] = correct[here]
        return None if (out < 0).any() else out.astype(bool)

    cols = [column((phase == ref.phase) & (epoch == ref.epoch)) for ref in (ft, fg)]
    cols += [column((phase == "relearn") & (epoch == e)) for e in sorted(epochs)]
    if any(c is None for c in cols):
        return None  # an epoch that did not score every example: the curve would mix example sets
    return Recovery(examples.astype(np.int32), cols[0], np.stack(cols[1:], axis=1))


@register(
    "relearning", title="Relearning attacks: how fast forgotten accuracy returns", figure="beyond: Hu et al. 2024"
)
def run(ctx: AnalysisContext) -> AnalysisResult:
    require_trials(ctx)
    p = ctx.params
    curves, trials, examples = [], [], []
    groups: dict[tuple, dict[int, tuple[Recovery, dict]]] = defaultdict(dict)
    for t in ctx.index.trials:
        r = trial_recovery(ctx, t)
        if r is None:
            continue
        data, k = _relearn_data(ctx, t)
        base = {
            "sweep": t.sweep,
            "trial_id": t.trial_id,
            "model": t.model,
            "method": t.method,
            "size": t.size,
            "forget_task": t.forget_task,
            "relearn_data": data,
            "relearn_examples": k,
            "seed": t.seed,
        }
        acc, rec = recovery_curve(r, p.min_headroom)
        for step in range(acc.size):
            curves.append(
                {**base, "step": step, "acc": float(acc[step]), "recovered": None if rec is None else float(rec[step])}
            )
        row = {
            **base,
            "n_examples": int(r.steps.shape[0]),
            "acc_finetuned": float(r.finetuned.mean()),
            "acc_forgotten": float(acc[0]),
            "acc_relearned": float(acc[-1]),
            "relearn_epochs": int(acc.size - 1),
            "epochs_to_90": epochs_to_recover(r),
            "recovery_auc": recovery_auc(rec),
        }
        trials.append(row)
        wrong = ~r.steps[:, 0]
        first = np.where(r.steps[:, 1:].any(axis=1), r.steps[:, 1:].argmax(axis=1) + 1, -1)
        for i in np.flatnonzero(wrong):
            examples.append(
                {
                    **base,
                    "example_idx": int(r.example_idx[i]),
                    "first_correct_epoch": None if first[i] < 0 else int(first[i]),
                }
            )
        groups[tuple(base[name] for name in _COND_NAMES)][t.seed] = (r, row)
    if not trials:
        raise Skip("no trial has a relearn phase with scored epochs (phases.relearn.enabled is false)")
    summary = []
    for key in sorted(groups, key=str):
        seeds = groups[key]
        rows = [row for _, row in seeds.values()]
        reached = [row["epochs_to_90"] for row in rows if row["epochs_to_90"] is not None]
        out = dict(zip(_COND_NAMES, key))
        out.update(
            n_trials=len(rows),
            n_recovered_90=len(reached),
            epochs_to_90=float(np.mean(reached)) if reached else None,
            n_seeds=len(seeds),
        )
        if len(seeds) >= 2:
            est = t_interval([row["recovery_auc"] for row in rows])
            out.update(recovery_auc=est.value, recovery_auc_lo=est.lo, recovery_auc_hi=est.hi, interval=SEEDS_T)
        else:
            ((r, row),) = seeds.values()
            lo, hi = _bootstrap_auc(r, p.min_headroom, p.bootstrap_resamples, rng_for(*key))
            out.update(recovery_auc=row["recovery_auc"], recovery_auc_lo=lo, recovery_auc_hi=hi, interval=BOOTSTRAP)
        summary.append(out)
    msg = (
        f"{len(trials)} trial(s) with a relearn phase, {SPLIT} split of the forget task; epochs to 90% of the finetuned "
        f"accuracy reached in {sum(r['epochs_to_90'] is not None for r in trials)} of them"
    )
    return AnalysisResult(
        {
            "summary": pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA),
            "trials": pa.Table.from_pylist(trials, schema=TRIAL_SCHEMA),
            "curves": pa.Table.from_pylist(curves, schema=CURVE_SCHEMA),
            "examples": pa.Table.from_pylist(examples, schema=EXAMPLE_SCHEMA),
        },
        msg,
    )


def _run_of(row: dict) -> tuple:
    return row["forget_task"], row["method"], row["relearn_data"], row["relearn_examples"], row["seed"]


@draws("relearning")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    for model, size, rs in per_model(o.tables["curves"].to_pylist()):
        fig = Figure(figsize=(8.5, 3.8), layout="constrained")
        ax = fig.subplots()
        # One colour per (forget task, method); solid: relearned on forgotten examples,
        # dashed: on another task's; one line per seed.
        colours = {cond: f"C{i % 10}" for i, cond in enumerate(sorted({(r["forget_task"], r["method"]) for r in rs}))}
        for run in sorted({_run_of(r) for r in rs}, key=str):
            line = sorted((r for r in rs if _run_of(r) == run), key=lambda r: r["step"])
            task, method, data, k, seed = run
            on = f"{k} forgotten" if data == FORGET_SET else f"{k} of {data}"
            ax.plot(
                [r["step"] for r in line],
                [num(r["acc"]) for r in line],
                marker="o" if seed % 2 == 0 else "s",
                markersize=3,
                color=colours[(task, method)],
                linestyle="-" if data == FORGET_SET else "--",
                label=f"{task} / {method} / {on} / s{seed}",
            )
        epoch_axis(ax, "relearn epoch (0 = forgotten milestone)", "forget-task test accuracy")
        ax.legend(
            fontsize=7,
            title="forget task / method / relearned on / seed",
            title_fontsize=7,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
        )
        fig.suptitle(
            f"{model}, n={size}: forget task's test accuracy while relearning on k forgotten examples"
            " (or another task's)",
            fontsize=9,
        )
        figs.append((f"relearning_{model}_n{size}", fig))
    return figs
