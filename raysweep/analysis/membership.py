"""Beyond the paper: membership inference through the forget phase.

Can the examples a run was trained on (its forget task's train split, which the store holds
exactly: the `size` examples trained on) still be told apart from held-out examples of the
same task (its test split)? Per trial and step of the forget phase (step 0 = the finetuned
milestone the phase starts from, then each forget epoch), the AUC of a membership score that
is higher for members, for two attacks that need no reference model:

- `loss`: the mean log-likelihood per token of the correct response (minus the LOSS
  attack's average loss);
- `zlib`: the total log-likelihood of the correct response divided by the zlib-compressed
  size in bytes of prompt + correct response (Carlini et al.'s zlib ratio, on the response).

AUC 0.5: members look like held-out examples; near 1: the run still tells them apart. Ties
count one half (Mann-Whitney). Over seeds: the mean of per-seed AUCs with a t-interval; one
seed: a stratified bootstrap over members and held-out examples.

Unlike open-unlearning, the statistics are of the scored response only (the store holds
response log-likelihoods), and Min-K% / Min-K%++ (which need per-token log-probabilities,
not stored) are not computed.
"""

from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysweep.analysis.common import require_trials
from raysweep.analysis.context import AnalysisContext, TrialInfo
from raysweep.analysis.engine import Scan
from raysweep.analysis.intervals import BOOTSTRAP, SEEDS_T, percentile, rng_for, t_interval
from raysweep.analysis.reducers import CollectRows
from raysweep.analysis.registry import AnalysisResult, Skip, register

ATTACKS = ("loss", "zlib")
MEMBERS, HELD_OUT = "train", "test"
_COND = [("model", pa.string()), ("method", pa.string()), ("size", pa.int32()), ("forget_task", pa.string())]
RUN_SCHEMA = pa.schema(
    [("sweep", pa.string()), ("trial_id", pa.string())] + _COND
    + [("seed", pa.int32()), ("step", pa.int32()), ("attack", pa.string()), ("n_members", pa.int32()),
       ("n_held_out", pa.int32()), ("auc", pa.float64())]
)
SUMMARY_SCHEMA = pa.schema(
    _COND + [("step", pa.int32()), ("attack", pa.string()), ("n_trials", pa.int32()), ("n_members", pa.int64()),
             ("n_held_out", pa.int64()), ("auc", pa.float64()), ("auc_lo", pa.float64()), ("auc_hi", pa.float64()),
             ("n_seeds", pa.int32()), ("interval", pa.string())]
)


def auc(members: np.ndarray, held_out: np.ndarray) -> float | None:
    """P(member score > held-out score), ties one half."""
    if members.size == 0 or held_out.size == 0:
        return None
    values, inverse = np.unique(np.concatenate([members, held_out]), return_inverse=True)
    pos = np.bincount(inverse[: members.size], minlength=values.size).astype(np.float64)
    neg = np.bincount(inverse[members.size:], minlength=values.size).astype(np.float64)
    return float((pos * (np.cumsum(neg) - neg + 0.5 * neg)).sum() / (members.size * held_out.size))


def bootstrap_auc(members: np.ndarray, held_out: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float | None, float | None]:
    """Percentile bounds over stratified resamples. A resample of either group is a
    multinomial draw over the distinct scores, so each costs O(distinct scores), not a sort."""
    if members.size < 2 or held_out.size < 2:
        return None, None
    values, inverse = np.unique(np.concatenate([members, held_out]), return_inverse=True)
    p_pos = np.bincount(inverse[: members.size], minlength=values.size) / members.size
    p_neg = np.bincount(inverse[members.size:], minlength=values.size) / held_out.size
    pos = rng.multinomial(members.size, p_pos, size=resamples).astype(np.float64)
    neg = rng.multinomial(held_out.size, p_neg, size=resamples).astype(np.float64)
    below = np.cumsum(neg, axis=1) - neg
    draws = (pos * (below + 0.5 * neg)).sum(axis=1) / (members.size * held_out.size)
    return percentile(draws)


def _zlib_bytes(ctx: AnalysisContext, sweep: str, task: str) -> pa.Table:
    """(split, example_idx, zlib_bytes): the compressed size of prompt + correct response of
    each prepared example of one task; empty when the store holds no prepared examples."""
    key = ("membership_zlib", sweep, task)
    if key not in ctx._cache:
        ex = ctx.store.read("examples", sweep=sweep)
        ex = ex.filter(pc.equal(ex["task"], task)) if ex.num_rows else ex
        rows = []
        for r in ex.to_pylist():
            text = r["prompt"] + (r["choice_1"] if r["gold"] == 1 else r["choice_0"])
            rows.append({"split": r["split"], "example_idx": r["example_idx"], "zlib_bytes": len(zlib.compress(text.encode(), 9))})
        ctx._cache[key] = pa.Table.from_pylist(rows, schema=pa.schema([("split", pa.string()), ("example_idx", pa.int32()),
                                                                     ("zlib_bytes", pa.int32())]))
    return ctx._cache[key]


def trial_scores(ctx: AnalysisContext, t: TrialInfo) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """step -> attack -> {"train": member scores, "test": held-out scores} for one trial."""
    start = t.milestones.get("finetuned")
    files = [f for f in (t.scan_file(ctx.store.root, "scores", start) if start else None,) if f is not None]
    files += list(ctx.index.phase_files("scores", ("forget",), (t,)))
    if not files or not t.committed.get("forget"):
        return {}
    rows = ctx.engine.reduce(
        Scan(tuple(files), columns=("phase", "epoch", "split", "example_idx", "ll_sum_correct", "ll_mean_correct"),
             trial_task=((t.sweep, t.trial_id, t.forget_task),)),
        CollectRows(order=("phase", "epoch", "split", "example_idx")),
    )
    if rows.num_rows == 0:
        return {}
    rows = rows.filter(pc.is_in(rows["split"], pa.array([MEMBERS, HELD_OUT])))
    sizes = _zlib_bytes(ctx, t.sweep, t.forget_task)
    if sizes.num_rows:
        rows = rows.join(sizes, keys=["split", "example_idx"], join_type="left outer")
    out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    phase = rows["phase"].to_numpy(zero_copy_only=False)
    epoch = rows["epoch"].to_numpy()
    split = rows["split"].to_numpy(zero_copy_only=False)
    loss = rows["ll_mean_correct"].to_numpy(zero_copy_only=False).astype(np.float64)
    total = rows["ll_sum_correct"].to_numpy(zero_copy_only=False).astype(np.float64)
    zbytes = (rows["zlib_bytes"].to_numpy(zero_copy_only=False).astype(np.float64) if "zlib_bytes" in rows.column_names
              else np.full(rows.num_rows, np.nan))
    steps = [(0, (phase == start.phase) & (epoch == start.epoch))] if start else []
    steps += [(int(e), (phase == "forget") & (epoch == e)) for e in sorted(set(epoch[phase == "forget"].tolist()))]
    for step, here in steps:
        per: dict[str, dict[str, np.ndarray]] = {}
        for attack, score in (("loss", loss), ("zlib", total / zbytes)):
            per[attack] = {s: score[here & (split == s) & np.isfinite(score)] for s in (MEMBERS, HELD_OUT)}
        out[step] = per
    return out


@register("membership", title="Membership inference through the forget phase", figure="beyond: LOSS / zlib AUC")
def run(ctx: AnalysisContext) -> AnalysisResult:
    require_trials(ctx)
    resamples = ctx.params.bootstrap_resamples
    run_rows = []
    by_cell: dict[tuple, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    for t in ctx.index.trials:
        if t.milestones.get("finetuned") is None:
            continue
        for step, per in trial_scores(ctx, t).items():
            for attack, groups in per.items():
                m, h = groups[MEMBERS], groups[HELD_OUT]
                run_rows.append({"sweep": t.sweep, "trial_id": t.trial_id, "model": t.model, "method": t.method, "size": t.size,
                                 "forget_task": t.forget_task, "seed": t.seed, "step": step, "attack": attack,
                                 "n_members": int(m.size), "n_held_out": int(h.size), "auc": auc(m, h)})
                if m.size and h.size:
                    by_cell[(t.model, t.method, t.size, t.forget_task, step, attack)][t.seed] = (m, h)
    if not run_rows:
        raise Skip("no trial has a finetuned milestone and committed forget epochs")
    rows = []
    for key in sorted(by_cell, key=str):
        seeds = by_cell[key]
        row = dict(zip(("model", "method", "size", "forget_task", "step", "attack"), key))
        row.update(n_trials=len(seeds), n_members=sum(m.size for m, _ in seeds.values()),
                   n_held_out=sum(h.size for _, h in seeds.values()), n_seeds=len(seeds))
        if len(seeds) >= 2:
            est = t_interval([auc(m, h) for m, h in seeds.values()])
            row.update(auc=est.value, auc_lo=est.lo, auc_hi=est.hi, interval=SEEDS_T)
        else:
            (m, h), = seeds.values()
            lo, hi = bootstrap_auc(m, h, resamples, rng_for(*key))
            row.update(auc=auc(m, h), auc_lo=lo, auc_hi=hi, interval=BOOTSTRAP)
        rows.append(row)
    summary = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    runs = pa.Table.from_pylist(run_rows, schema=RUN_SCHEMA)
    loss = [v for v in summary.filter(pc.equal(summary["attack"], "loss"))["auc"].to_pylist() if v is not None]
    spread = f"; loss AUC {min(loss):.3f} to {max(loss):.3f} across conditions and steps" if loss else ""
    msg = (f"{runs.num_rows} (trial, step, attack) AUC(s); members = the forget task's trained examples ({MEMBERS} split), "
           f"held out = its {HELD_OUT} split; step 0 = finetuned milestone{spread}")
    notes = []
    if not np.isfinite([r["auc"] if r["auc"] is not None else np.nan for r in run_rows if r["attack"] == "zlib"]).any():
        notes.append("zlib AUC left empty: the store has no prepared examples to compress")
    return AnalysisResult({"summary": summary, "runs": runs}, msg, notes=notes)
