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
from raysweep.analysis.intervals import (
    BOOTSTRAP,
    SEEDS_T,
    bootstrap_mean_of_counts,
    percentile,
    rng_for,
    t_interval,
)
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
# A paper-scale sweep has tens of millions of (example, phase) rows: their strings, the same
# few per trial, are stored once per trial as a dictionary.
_LABEL = pa.dictionary(pa.int32(), pa.string())


def _labelled(fields: list[tuple[str, pa.DataType]]) -> list[tuple[str, pa.DataType]]:
    return [(n, _LABEL if typ == pa.string() else typ) for n, typ in fields]


EXAMPLE_SCHEMA = pa.schema(
    _labelled(_TRIAL)
    + _labelled(_PLACE)
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
        value = getattr(t, name)
        if typ == pa.string():
            column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value], typ))
        else:
            column = pa.array(np.full(n, value), typ)
        out = out.add_column(0, name, column)
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


def _group_codes(table: pa.Table, columns: tuple[str, ...]) -> tuple[np.ndarray, list[tuple]]:
    """Per row, the index of its distinct combination of `columns`, and those combinations in
    sorted order. Dictionary columns are read through their indices: the examples table holds
    tens of millions of rows, whose strings are never materialised here."""
    codes, levels = [], []
    for c in columns:
        col = table[c]
        if pa.types.is_dictionary(col.type):
            chunks = col.unify_dictionaries().chunks if col.num_chunks else []
            idx = np.concatenate([ch.indices.to_numpy(zero_copy_only=False) for ch in chunks]) if chunks else []
            names = chunks[0].dictionary.to_pylist() if chunks else []
            order = np.argsort(np.array(names, dtype=object), kind="stable") if names else np.array([], np.int64)
            rank = np.empty(len(names), np.int64)
            rank[order] = np.arange(len(names))
            codes.append(rank[np.asarray(idx, np.int64)] if len(names) else np.zeros(0, np.int64))
            levels.append([names[i] for i in order])
        else:
            uniq, inv = np.unique(col.to_numpy(zero_copy_only=False), return_inverse=True)
            codes.append(inv.astype(np.int64))
            levels.append([u.item() if hasattr(u, "item") else u for u in uniq])
    combined = np.zeros(table.num_rows, np.int64)
    for code, level in zip(codes, levels):
        combined = combined * max(1, len(level)) + code
    uniq, inverse = np.unique(combined, return_inverse=True)
    keys = []
    for u in uniq.tolist():
        parts = []
        for level in reversed(levels):
            u, r = divmod(u, max(1, len(level)))
            parts.append(level[r])
        keys.append(tuple(reversed(parts)))
    return inverse.astype(np.int64), keys


def _seed_estimate(per_seed: dict[int, tuple[np.ndarray, np.ndarray]], resamples: int, key: tuple) -> dict:
    """Mean of per-seed means with a t-interval over seeds; one seed: bootstrap of its
    examples. Each seed's examples come as (distinct values, how many examples have each)."""
    means = {s: float(v @ c / c.sum()) for s, (v, c) in per_seed.items() if c.sum()}
    if len(per_seed) >= 2:
        est = t_interval(list(means.values()))
        return {"value": est.value, "lo": est.lo, "hi": est.hi, "n_seeds": len(per_seed), "interval": SEEDS_T}
    ((seed, (values, counts)),) = per_seed.items()
    lo, hi = bootstrap_mean_of_counts(values, counts, resamples, rng_for(*key))
    return {"value": means.get(seed), "lo": lo, "hi": hi, "n_seeds": 1, "interval": BOOTSTRAP}


SUMMARY_KEYS = ("model", "method", "size", "forget_task", "phase", "eval_task", "split")


def summary_table(ex: pa.Table, resamples: int) -> pa.Table:
    """Per condition (model, method, size, forget task) and (phase, eval task, split): mean
    forgetting events and the unforgettable fraction over its examples, with intervals."""
    if ex.num_rows == 0:
        return SUMMARY_SCHEMA.empty_table()
    group, keys = _group_codes(ex, SUMMARY_KEYS)
    seed_code, seeds = _group_codes(ex, ("seed",))
    trial_code, _ = _group_codes(ex, ("trial_id",))
    events = ex["forgetting_events"].to_numpy(zero_copy_only=False).astype(np.int64)
    unforgettable = ex["unforgettable"].to_numpy(zero_copy_only=False).astype(np.int64)
    never = ex["never_learned"].to_numpy(zero_copy_only=False).astype(np.int64)
    n_groups = len(keys)
    n_examples = np.bincount(group, minlength=n_groups)
    never_sum = np.bincount(group, weights=never, minlength=n_groups)
    n_trials = np.bincount(
        np.unique(group * (trial_code.max() + 1) + trial_code) // (trial_code.max() + 1), minlength=n_groups
    )
    # (group, seed, value) -> how many examples: all a bootstrap of a mean of these needs
    hist: dict[str, dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]] = {}
    for name, values in (("mean_forgetting_events", events), ("unforgettable_frac", unforgettable)):
        span = values.max() + 1
        gs = group * len(seeds) + seed_code
        cell, count = np.unique(gs * span + values, return_counts=True)
        per: dict[int, dict[int, tuple[list, list]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
        for c, k in zip(cell.tolist(), count.tolist()):
            gs_i, value = divmod(c, span)
            g, s = divmod(gs_i, len(seeds))
            per[g][s][0].append(value)
            per[g][s][1].append(k)
        hist[name] = {
            g: {int(seeds[s][0]): (np.array(v, np.float64), np.array(k, np.int64)) for s, (v, k) in by_seed.items()}
            for g, by_seed in per.items()
        }
    rows = []
    for g, key in sorted(enumerate(keys), key=lambda gk: str(gk[1])):
        row = dict(zip(SUMMARY_KEYS, key))
        row.update(
            own_task=key[3] == key[5],
            n_trials=int(n_trials[g]),
            n_examples=int(n_examples[g]),
            never_learned_frac=float(never_sum[g] / n_examples[g]),
        )
        for name in ("mean_forgetting_events", "unforgettable_frac"):
            est = _seed_estimate(dict(sorted(hist[name][g].items())), resamples, (*key, name))
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


def _jaccard(both: int, either: int) -> float | None:
    return both / either if either else None


def _bootstrap_jaccard(va: np.ndarray, vb: np.ndarray, resamples: int, rng: np.random.Generator):
    """Percentile bounds of the Jaccard index over resampled examples. Each example is one of
    four kinds (in both sets, in a only, in b only, in neither), so a resample is a
    multinomial draw over the four counts."""
    n = va.size
    kinds = np.array([(va & vb).sum(), (va & ~vb).sum(), (~va & vb).sum(), (~va & ~vb).sum()], np.float64)
    draw = rng.multinomial(n, kinds / n, size=resamples).astype(np.float64)
    either = draw[:, :3].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return percentile(np.where(either > 0, draw[:, 0] / np.maximum(either, 1), np.nan))


RUN_KEYS = ("model", "size", "seed", "forget_task", "method")


def _unforgettable_sets(ex: pa.Table) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """(model, size, seed, forget task, method, eval task, split) -> (example indices sorted,
    unforgettable in the forget phase). Where two trials share the key, the later one's
    value of an example is kept."""
    phase, phases = _group_codes(ex, ("phase",))
    if ("forget",) not in phases:
        return {}
    fx = ex.filter(pa.array(phase == phases.index(("forget",))))
    if fx.num_rows == 0:
        return {}
    group, keys = _group_codes(fx, (*RUN_KEYS, "eval_task", "split"))
    idx = fx["example_idx"].to_numpy(zero_copy_only=False).astype(np.int64)
    flag = fx["unforgettable"].to_numpy(zero_copy_only=False)
    order = np.lexsort((idx, group))  # stable: equal keys stay in table order
    group, idx, flag = group[order], idx[order], flag[order]
    last = np.ones(group.size, bool)
    last[:-1] = (group[1:] != group[:-1]) | (idx[1:] != idx[:-1])
    group, idx, flag = group[last], idx[last], flag[last]
    bounds = np.flatnonzero(np.diff(group)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [group.size]])
    return {keys[group[a]]: (idx[a:b], flag[a:b]) for a, b in zip(starts, ends)}


def overlap_table(ex: pa.Table, resamples: int) -> pa.Table:
    """Jaccard of unforgettable sets in the forget phase, per seed, for run pairs that differ
    in one factor (forget task, or method), on each (eval task, split) both scored."""
    sets = _unforgettable_sets(ex)
    runs = sorted({k[:5] for k in sets}, key=str)
    pairs: dict[tuple, list[tuple]] = defaultdict(list)
    for (m1, s1, seed1, f1, me1), (m2, s2, seed2, f2, me2) in combinations(runs, 2):
        if (m1, s1, seed1) != (m2, s2, seed2):
            continue
        if me1 == me2 and f1 != f2:
            pairs[(m1, s1, "forget_task", me1, f1, f2)].append((seed1, (f1, me1), (f2, me2)))
        elif f1 == f2 and me1 != me2:
            pairs[(m1, s1, "method", f1, me1, me2)].append((seed1, (f1, me1), (f2, me2)))
    places_of: dict[tuple, set[tuple]] = defaultdict(set)
    for k in sets:
        places_of[k[:2]].add(k[5:])
    rows = []
    for (model, size, axis, fixed, a, b), matches in sorted(pairs.items(), key=str):
        for task, split in sorted(places_of[(model, size)], key=str):
            per_seed, counts = {}, [0, 0, 0, 0]
            for seed, ra, rb in matches:
                sa = sets.get((model, size, seed, *ra, task, split))
                sb = sets.get((model, size, seed, *rb, task, split))
                if sa is None or sb is None:
                    continue
                _, ia, ib = np.intersect1d(sa[0], sb[0], assume_unique=True, return_indices=True)
                if not ia.size:
                    continue
                va, vb = sa[1][ia], sb[1][ib]
                per_seed[seed] = (va, vb)
                counts = [
                    counts[0] + ia.size,
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
            jac = {s: _jaccard(int((va & vb).sum()), int((va | vb).sum())) for s, (va, vb) in per_seed.items()}
            if len(per_seed) >= 2:
                est = t_interval(list(jac.values()))
                row.update(
                    jaccard=est.value, jaccard_lo=est.lo, jaccard_hi=est.hi, n_seeds=len(per_seed), interval=SEEDS_T
                )
            else:
                ((seed, (va, vb)),) = per_seed.items()
                lo, hi = _bootstrap_jaccard(va, vb, resamples, rng_for(model, size, axis, fixed, a, b, task, split))
                row.update(jaccard=jac[seed], jaccard_lo=lo, jaccard_hi=hi, n_seeds=1, interval=BOOTSTRAP)
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
