"""Beyond the paper: forgetting events per example (Toneva et al., 2019).

Each phase is read as a sequence of correct / incorrect states of every scored example,
starting from the state the phase starts from: fine-tuning from the pretrained milestone,
forgetting from the finetuned milestone (the best fine-tuning epoch, whose weights it starts
from), relearning from the forgotten milestone (the last forget epoch). Then, per example:

- a forgetting event is a step from correct to incorrect, a learning event the reverse;
- `unforgettable`: correct at some step and never forgotten after (no forgetting event);
- `never_learned`: incorrect at every step.

"Correct" is the stored prediction (the higher log-likelihood response is the gold one).
Every evaluated task and split is counted, so the same held-out examples can be compared
across forget runs: the overlap table is the Jaccard index of two runs' unforgettable sets
in the forget phase, over the examples both scored, for runs that differ only in the forget
task or only in the method (same model, size and seed). Measures over seeds are the mean of
the per-seed values with a t-interval; a single seed is bootstrapped over its examples.

Toneva et al. count events over the epochs of one training run from a random start, and
treat never-learned examples as forgotten infinitely often; here each phase starts from a
trained model, and never-learned examples are reported on their own, not as events.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from raysweep.analysis.common import require_trials
from raysweep.analysis.context import AnalysisContext, TrialInfo
from raysweep.analysis.engine import Scan
from raysweep.analysis.intervals import BOOTSTRAP, SEEDS_T, percentile, resample_chunks, rng_for, t_interval
from raysweep.analysis.plotting import MAX_PANELS, num, yerr
from raysweep.analysis.reducers import CollectRows
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome
from raysweep.constants import SPLITS
from raysweep.store import trial_fields

# phase -> the milestone whose state the phase starts from
PHASE_START = {"finetune": "pretrained", "forget": "finetuned", "relearn": "forgotten"}
_TRIAL = [*trial_fields()]
_PLACE = [("phase", pa.string()), ("eval_task", pa.string()), ("split", pa.string())]
EXAMPLE_SCHEMA = pa.schema(
    _TRIAL
    + _PLACE
    + [
        ("example_idx", pa.int32()),
        ("n_steps", pa.int32()),
        ("forgetting_events", pa.int32()),
        ("learning_events", pa.int32()),
        ("start_correct", pa.bool_()),
        ("end_correct", pa.bool_()),
        ("unforgettable", pa.bool_()),
        ("never_learned", pa.bool_()),
    ]
)
_EST = [("n_seeds", pa.int32()), ("interval", pa.string())]
SUMMARY_SCHEMA = pa.schema(
    [*trial_fields("model", "method", "size", "forget_task")]
    + _PLACE
    + [
        ("own_task", pa.bool_()),
        ("n_trials", pa.int32()),
        ("n_examples", pa.int64()),
        ("mean_forgetting_events", pa.float64()),
        ("mean_forgetting_events_lo", pa.float64()),
        ("mean_forgetting_events_hi", pa.float64()),
        ("unforgettable_frac", pa.float64()),
        ("unforgettable_frac_lo", pa.float64()),
        ("unforgettable_frac_hi", pa.float64()),
        ("never_learned_frac", pa.float64()),
    ]
    + _EST
)
OVERLAP_SCHEMA = pa.schema(
    [
        *trial_fields("model", "size"),
        ("axis", pa.string()),
        ("fixed", pa.string()),
        ("a", pa.string()),
        ("b", pa.string()),
        ("eval_task", pa.string()),
        ("split", pa.string()),
        ("n_examples", pa.int64()),
        ("n_unforgettable_a", pa.int64()),
        ("n_unforgettable_b", pa.int64()),
        ("n_both", pa.int64()),
        ("jaccard", pa.float64()),
        ("jaccard_lo", pa.float64()),
        ("jaccard_hi", pa.float64()),
    ]
    + _EST
)


def trial_events(ctx: AnalysisContext, t: TrialInfo) -> pa.Table:
    """EXAMPLE_SCHEMA rows of one trial: every phase it has, every task and split it scored.
    One trial at a time, so memory is bounded by one trial's scores whatever the sweep size."""
    starts = {ph: t.milestones.get(m) for ph, m in PHASE_START.items() if t.committed.get(ph)}
    starts = {ph: ref for ph, ref in starts.items() if ref is not None}
    if not starts:
        return EXAMPLE_SCHEMA.empty_table()
    files = ctx.index.phase_files("scores", tuple(sorted({"pretrained", *starts})), (t,))
    rows = ctx.engine.reduce(
        Scan(files, columns=("phase", "epoch", "eval_task", "split", "example_idx", "correct")),
        CollectRows(order=("eval_task", "split", "example_idx", "phase", "epoch")),
    )
    if rows.num_rows == 0:
        return EXAMPLE_SCHEMA.empty_table()
    parts = []
    for phase, ref in sorted(starts.items()):
        # Step 0 is the state the phase starts from, then its epochs in order (1, 2, ...).
        first = rows.filter(pc.and_(pc.equal(rows["phase"], ref.phase), pc.equal(rows["epoch"], ref.epoch)))
        rest = rows.filter(pc.equal(rows["phase"], phase))
        for part, step in ((first, None), (rest, rest["epoch"])):
            steps = pa.array(np.zeros(part.num_rows, np.int32)) if step is None else pc.cast(step, pa.int32())
            parts.append(
                pa.table(
                    {
                        "phase": pa.array([phase] * part.num_rows, pa.string()),
                        "eval_task": part["eval_task"],
                        "split": part["split"],
                        "example_idx": pc.cast(part["example_idx"], pa.int32()),
                        "step": steps,
                        "correct": part["correct"],
                    }
                )
            )
    seq = _whole_sequences(pa.concat_tables(parts), t).sort_by(
        [(c, "ascending") for c in ("phase", "eval_task", "split", "example_idx", "step")]
    )
    if seq.num_rows == 0:
        return EXAMPLE_SCHEMA.empty_table()
    out = _count(seq)
    n = out.num_rows
    for name, typ in reversed(_TRIAL):
        out = out.add_column(0, name, pa.array([getattr(t, name)] * n, typ))
    return out.select(EXAMPLE_SCHEMA.names).cast(EXAMPLE_SCHEMA)


def _whole_sequences(seq: pa.Table, t: TrialInfo) -> pa.Table:
    """Only sequences scored at every step of their phase. A sparse scoring schedule
    (`scoring.schedule`) scores the other evaluation tasks at some epochs only: events counted
    over those would be fewer by construction, so such sequences are left out."""
    keys = ["phase", "eval_task", "split", "example_idx"]
    steps = {ph: len(t.committed.get(ph, ())) + 1 for ph in PHASE_START}
    counts = seq.group_by(keys).aggregate([("step", "count")])
    need = pa.array([steps[ph] for ph in counts["phase"].to_pylist()], pa.int64())
    whole = counts.filter(pc.greater_equal(counts["step_count"], need)).select(keys)
    return seq.join(whole, keys=keys, join_type="inner")


def _count(seq: pa.Table) -> pa.Table:
    """Per (phase, eval_task, split, example) of a sorted sequence table: its event counts."""
    keys = ("phase", "eval_task", "split", "example_idx")
    c = np.asarray(pc.fill_null(seq["correct"], False).to_numpy(zero_copy_only=False), dtype=np.int8)
    new = np.zeros(len(c), dtype=bool)
    new[0] = True
    for k in keys:
        col = seq[k].to_numpy(zero_copy_only=False)
        new[1:] |= col[1:] != col[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(c)) - 1
    prev = np.concatenate([[0], c[:-1]])
    forgot = ((prev == 1) & (c == 0) & ~new).astype(np.int32)
    learned = ((prev == 0) & (c == 1) & ~new).astype(np.int32)
    events = np.add.reduceat(forgot, starts)
    ever = np.maximum.reduceat(c, starts).astype(bool)
    step = seq["step"].to_numpy()
    start_correct = pa.array(c[starts].astype(bool), mask=step[starts] != 0)
    return pa.table(
        {
            **{k: seq[k].take(pa.array(starts)) for k in keys},
            "n_steps": pa.array(ends - starts + 1, pa.int32()),
            "forgetting_events": pa.array(events, pa.int32()),
            "learning_events": pa.array(np.add.reduceat(learned, starts), pa.int32()),
            "start_correct": start_correct,
            "end_correct": pa.array(c[ends].astype(bool)),
            "unforgettable": pa.array(ever & (events == 0)),
            "never_learned": pa.array(~ever),
        }
    )


def _mean_estimate(per_seed: dict[int, np.ndarray], resamples: int, key: tuple) -> dict[str, object]:
    """Mean of per-seed means with a t-interval over seeds; one seed: bootstrap of its examples."""
    if len(per_seed) >= 2:
        est = t_interval([float(v.mean()) for v in per_seed.values() if v.size])
        return {"value": est.value, "lo": est.lo, "hi": est.hi, "n_seeds": len(per_seed), "interval": SEEDS_T}
    (v,) = per_seed.values()
    if v.size < 2:
        return {
            "value": float(v.mean()) if v.size else None,
            "lo": None,
            "hi": None,
            "n_seeds": 1,
            "interval": BOOTSTRAP,
        }
    draws = np.concatenate([v[idx].mean(axis=1) for idx in resample_chunks(v.size, resamples, rng_for(*key))])
    lo, hi = percentile(draws)
    return {"value": float(v.mean()), "lo": lo, "hi": hi, "n_seeds": 1, "interval": BOOTSTRAP}


def summary_table(ex: pa.Table, resamples: int) -> pa.Table:
    cols = {
        c: ex[c].to_numpy(zero_copy_only=False)
        for c in (
            "model",
            "method",
            "size",
            "forget_task",
            "phase",
            "eval_task",
            "split",
            "seed",
            "trial_id",
            "forgetting_events",
            "unforgettable",
            "never_learned",
        )
    }
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(
        zip(*(cols[c] for c in ("model", "method", "size", "forget_task", "phase", "eval_task", "split")))
    ):
        groups[tuple(k.item() if hasattr(k, "item") else k for k in key)].append(i)
    rows = []
    for key in sorted(groups, key=str):
        idx = np.array(groups[key])
        seeds = cols["seed"][idx]
        row = dict(zip(("model", "method", "size", "forget_task", "phase", "eval_task", "split"), key))
        row.update(
            own_task=key[3] == key[5],
            n_trials=len(set(cols["trial_id"][idx].tolist())),
            n_examples=len(idx),
            never_learned_frac=float(cols["never_learned"][idx].mean()),
        )
        for name, col in (("mean_forgetting_events", "forgetting_events"), ("unforgettable_frac", "unforgettable")):
            per = {int(s): cols[col][idx[seeds == s]].astype(np.float64) for s in sorted(set(seeds.tolist()))}
            est = _mean_estimate(per, resamples, (*key, name))
            row.update(
                {
                    name: est["value"],
                    f"{name}_lo": est["lo"],
                    f"{name}_hi": est["hi"],
                    "n_seeds": est["n_seeds"],
                    "interval": est["interval"],
                }
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float | None:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else None


def _bootstrap_jaccard(
    a: np.ndarray, b: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[float | None, float | None]:
    draws = []
    for idx in resample_chunks(a.size, resamples, rng):
        both, either = (a[idx] & b[idx]).sum(axis=1), (a[idx] | b[idx]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            draws.append(np.where(either > 0, both / np.maximum(either, 1), np.nan))
    return percentile(np.concatenate(draws))


def overlap_table(ex: pa.Table, resamples: int) -> pa.Table:
    """Jaccard of unforgettable sets in the forget phase, per seed, for run pairs that differ
    in one factor (forget task, or method), on each (eval task, split) both scored."""
    fx = ex.filter(pc.equal(ex["phase"], "forget")).to_pylist()
    sets: dict[tuple, dict[int, bool]] = defaultdict(dict)
    for r in fx:
        sets[(r["model"], r["size"], r["seed"], r["forget_task"], r["method"], r["eval_task"], r["split"])][
            r["example_idx"]
        ] = r["unforgettable"]
    runs = sorted({k[:5] for k in sets}, key=str)
    pairs: dict[tuple, list[tuple]] = defaultdict(list)
    for (m1, s1, seed1, f1, me1), (m2, s2, seed2, f2, me2) in combinations(runs, 2):
        if (m1, s1, seed1) != (m2, s2, seed2):
            continue
        if me1 == me2 and f1 != f2:
            pairs[(m1, s1, "forget_task", me1, f1, f2)].append((seed1, (f1, me1), (f2, me2)))
        elif f1 == f2 and me1 != me2:
            pairs[(m1, s1, "method", f1, me1, me2)].append((seed1, (f1, me1), (f2, me2)))
    rows = []
    for (model, size, axis, fixed, a, b), matches in sorted(pairs.items(), key=str):
        places = sorted({k[5:] for k in sets if k[:2] == (model, size)}, key=str)
        for task, split in places:
            per_seed, counts = {}, [0, 0, 0, 0]
            for seed, ra, rb in matches:
                sa = sets.get((model, size, seed, *ra, task, split), {})
                sb = sets.get((model, size, seed, *rb, task, split), {})
                shared = sorted(set(sa) & set(sb))
                if not shared:
                    continue
                va = np.array([sa[i] for i in shared])
                vb = np.array([sb[i] for i in shared])
                per_seed[seed] = (va, vb)
                counts = [
                    counts[0] + len(shared),
                    counts[1] + int(va.sum()),
                    counts[2] + int(vb.sum()),
                    counts[3] + int((va & vb).sum()),
                ]
            if not per_seed:
                continue
            row = {
                "model": model,
                "size": size,
                "axis": axis,
                "fixed": fixed,
                "a": a,
                "b": b,
                "eval_task": task,
                "split": split,
                "n_examples": counts[0],
                "n_unforgettable_a": counts[1],
                "n_unforgettable_b": counts[2],
                "n_both": counts[3],
            }
            if len(per_seed) >= 2:
                est = t_interval([_jaccard(va, vb) for va, vb in per_seed.values()])
                row.update(
                    jaccard=est.value, jaccard_lo=est.lo, jaccard_hi=est.hi, n_seeds=len(per_seed), interval=SEEDS_T
                )
            else:
                ((va, vb),) = per_seed.values()
                lo, hi = _bootstrap_jaccard(va, vb, resamples, rng_for(model, size, axis, fixed, a, b, task, split))
                row.update(jaccard=_jaccard(va, vb), jaccard_lo=lo, jaccard_hi=hi, n_seeds=1, interval=BOOTSTRAP)
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=OVERLAP_SCHEMA)


@register(
    "forgetting_events",
    title="Forgetting events and unforgettable examples",
    figure="beyond: Toneva et al. 2019",
    reads="every_epoch",
)
def run(ctx: AnalysisContext) -> AnalysisResult:
    require_trials(ctx)
    parts = [trial_events(ctx, t) for t in ctx.index.trials]
    ex = pa.concat_tables(parts) if parts else EXAMPLE_SCHEMA.empty_table()
    if ex.num_rows == 0:
        raise Skip("no committed phase epochs with scores to count events over")
    resamples = ctx.params.bootstrap_resamples
    summary = summary_table(ex, resamples)
    overlap = overlap_table(ex, resamples)
    own = summary.filter(pc.and_(pc.equal(summary["own_task"], True), pc.equal(summary["phase"], "forget")))
    msg = (
        f"{ex.num_rows} (example, phase) sequences over {len(ctx.index.trials)} trial(s); forget phase, own task: "
        f"mean unforgettable fraction {pc.mean(own['unforgettable_frac']).as_py() or 0:.3f} over {own.num_rows} row(s); "
        f"{overlap.num_rows} overlap row(s)"
    )
    return AnalysisResult(
        {"summary": summary, "overlap": overlap, "examples": ex},
        msg,
        notes=[
            "phases start from the milestone their weights start from (pretrained, finetuned, forgotten)",
            "correct = stored prediction; unforgettable = correct at some step and never correct -> incorrect",
        ],
    )


@draws("forgetting_events")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    rows = [r for r in o.tables["summary"].to_pylist() if r["own_task"]]
    figs = []
    for model, size in sorted({(r["model"], r["size"]) for r in rows}, key=str)[:MAX_PANELS]:
        rs = [r for r in rows if (r["model"], r["size"]) == (model, size)]
        splits = [s for s in SPLITS if any(r["split"] == s for r in rs)]
        fig = Figure(figsize=(max(7.0, 3.6 * len(splits)), 3.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(splits), squeeze=False)[0])
        for ax, split in zip(axes, splits):
            here = [r for r in rs if r["split"] == split and r["phase"] == "forget"]
            tasks = sorted({r["forget_task"] for r in here})
            methods = sorted({r["method"] for r in here})
            width = 0.8 / max(1, len(methods))
            for k, method in enumerate(methods):
                got = {r["forget_task"]: r for r in here if r["method"] == method}
                ordered = [got.get(t) for t in tasks]
                x = np.arange(len(tasks)) + (k - (len(methods) - 1) / 2) * width
                present = [r for r in ordered if r is not None]
                ax.bar(
                    [xi for xi, r in zip(x, ordered) if r is not None],
                    [num(r["unforgettable_frac"]) for r in present],
                    width,
                    label=method,
                    yerr=yerr(present, "unforgettable_frac"),
                    capsize=3,
                )
            ax.set_xticks(np.arange(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_title(f"{split} split", fontsize=9)
            ax.set_ylabel("unforgettable fraction")
            ax.set_xlabel("forget task (its own examples)", fontsize=8)
        axes[0].legend(fontsize=8, title="method", title_fontsize=8)
        fig.suptitle(
            f"{model}, n={size}: forget-task examples never forgotten during the forget phase "
            "(correct at some step, never correct -> incorrect; from the finetuned milestone)",
            fontsize=9,
        )
        figs.append((f"forgetting_events_{model}_n{size}", fig))
    return figs
