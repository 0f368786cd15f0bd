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

The reference is the pretrained model, which trained on neither split: `auc_pretrained` is
its AUC, `privleak` = 100 (AUC - AUC_pretrained) / AUC_pretrained (open-unlearning's, with
this reference), and `forget_quality` is the p-value of a two-sample KS test of the members'
confidences at the finetuned and forgotten milestones against the pretrained model's, and
against a `methods: [none]` trial's (fine-tuned the same way, never forgotten) where the
sweep has one.

- `min_k`: Min-K% (Shi et al. 2024), the mean log-probability of the correct response's
  lowest-scoring 20% of tokens;
- `min_k_pp`: Min-K%++ (Zhang et al. 2025), the same over each token's log-probability
  standardised by the mean and standard deviation of log p under the model's next-token
  distribution at that position. Both are computed at scoring time (`scoring.TokenStats`)
  and stored from schema v3 on.

Unlike open-unlearning, the statistics are of the scored response only (the store holds the
response's, not the prompt's).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from raysweep.analysis.common import require_trials
from raysweep.analysis.context import AnalysisContext, TrialInfo
from raysweep.analysis.engine import Scan
from raysweep.analysis.intervals import BOOTSTRAP, SEEDS_T, percentile, rng_for, t_interval
from raysweep.analysis.plotting import epoch_axis, num, per_model
from raysweep.analysis.reducers import CollectRows
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome
from raysweep.store import trial_fields

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp")
# Min-K% / Min-K%++ of the correct response, stored from schema v3 on (scoring.TokenStats).
MIN_K_COLUMNS = ("min_k_correct", "min_k_pp_correct")
MEMBERS, HELD_OUT = "train", "test"
_COND = [*trial_fields("model", "method", "size", "forget_task")]
RUN_SCHEMA = pa.schema(
    [*trial_fields("sweep", "trial_id")]
    + _COND
    + [
        ("seed", pa.int32()),
        ("step", pa.int32()),
        ("attack", pa.string()),
        ("n_members", pa.int32()),
        ("n_held_out", pa.int32()),
        ("auc", pa.float64()),
        ("auc_pretrained", pa.float64()),
        ("privleak", pa.float64()),
    ]
)
SUMMARY_SCHEMA = pa.schema(
    _COND
    + [
        ("step", pa.int32()),
        ("attack", pa.string()),
        ("n_trials", pa.int32()),
        ("n_members", pa.int64()),
        ("n_held_out", pa.int64()),
        ("auc", pa.float64()),
        ("auc_lo", pa.float64()),
        ("auc_hi", pa.float64()),
        ("n_seeds", pa.int32()),
        ("interval", pa.string()),
        ("auc_pretrained", pa.float64()),
        ("privleak", pa.float64()),
    ]
)
QUALITY_SCHEMA = pa.schema(
    [*trial_fields("sweep", "trial_id")]
    + _COND
    + [
        ("seed", pa.int32()),
        ("milestone", pa.string()),
        ("reference", pa.string()),
        ("n", pa.int32()),
        ("ks_statistic", pa.float64()),
        ("forget_quality", pa.float64()),
    ]
)


def auc(members: np.ndarray, held_out: np.ndarray) -> float | None:
    """P(member score > held-out score), ties one half."""
    if members.size == 0 or held_out.size == 0:
        return None
    values, inverse = np.unique(np.concatenate([members, held_out]), return_inverse=True)
    pos = np.bincount(inverse[: members.size], minlength=values.size).astype(np.float64)
    neg = np.bincount(inverse[members.size :], minlength=values.size).astype(np.float64)
    return float((pos * (np.cumsum(neg) - neg + 0.5 * neg)).sum() / (members.size * held_out.size))


def bootstrap_auc(
    members: np.ndarray, held_out: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[float | None, float | None]:
    """Percentile bounds over stratified resamples. A resample of either group is a
    multinomial draw over the distinct scores, so each costs O(distinct scores), not a sort."""
    if members.size < 2 or held_out.size < 2:
        return None, None
    values, inverse = np.unique(np.concatenate([members, held_out]), return_inverse=True)
    p_pos = np.bincount(inverse[: members.size], minlength=values.size) / members.size
    p_neg = np.bincount(inverse[members.size :], minlength=values.size) / held_out.size
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
        every = ctx.memo(("examples", sweep), lambda: ctx.store.read("examples", sweep=sweep))
        ex = every.filter(pc.equal(every["task"], task)) if every.num_rows else every
        rows = []
        for r in ex.to_pylist():
            text = r["prompt"] + (r["choice_1"] if r["gold"] == 1 else r["choice_0"])
            rows.append(
                {
                    "split": r["split"],
                    "example_idx": r["example_idx"],
                    "zlib_bytes": len(zlib.compress(text.encode(), 9)),
                }
            )
        ctx._cache[key] = pa.Table.from_pylist(
            rows, schema=pa.schema([("split", pa.string()), ("example_idx", pa.int32()), ("zlib_bytes", pa.int32())])
        )
    return ctx._cache[key]


@dataclass
class TrialMembership:
    # step -> attack -> {"train": member scores, "test": held-out scores}
    steps: dict[int, dict[str, dict[str, np.ndarray]]]
    # the same at the pretrained milestone: a model that saw neither split (the reference)
    reference: dict[str, dict[str, np.ndarray]] | None
    # milestone -> members' confidence in the correct response (forget quality's samples)
    member_confidence: dict[str, np.ndarray]


def trial_scores(ctx: AnalysisContext, t: TrialInfo) -> TrialMembership | None:
    start, pre, last = (t.milestones.get(m) for m in ("finetuned", "pretrained", "forgotten"))
    if start is None or not t.committed.get("forget"):
        return None
    files = [
        f
        for f in (t.scan_file(ctx.store.root, "scores", ref) for ref in (pre, start) if ref is not None)
        if f is not None
    ]
    files += list(ctx.index.phase_files("scores", ("forget",), (t,)))
    # A store written before schema v3 has no Min-K% columns: those attacks stay empty.
    min_k = all(set(MIN_K_COLUMNS) <= set(pq.read_schema(f.path).names) for f in files)
    rows = ctx.engine.reduce(
        Scan(
            tuple(files),
            columns=("phase", "epoch", "split", "example_idx", "ll_sum_correct", "ll_mean_correct", "confidence")
            + (MIN_K_COLUMNS if min_k else ()),
            trial_task=((t.sweep, t.trial_id, t.forget_task),),
        ),
        CollectRows(order=("phase", "epoch", "split", "example_idx")),
    )
    if rows.num_rows == 0:
        return None
    rows = rows.filter(pc.is_in(rows["split"], pa.array([MEMBERS, HELD_OUT])))
    sizes = _zlib_bytes(ctx, t.sweep, t.forget_task)
    if sizes.num_rows:
        rows = rows.join(sizes, keys=["split", "example_idx"], join_type="left outer")
    phase = rows["phase"].to_numpy(zero_copy_only=False)
    epoch = rows["epoch"].to_numpy()
    split = rows["split"].to_numpy(zero_copy_only=False)
    loss = rows["ll_mean_correct"].to_numpy(zero_copy_only=False).astype(np.float64)
    total = rows["ll_sum_correct"].to_numpy(zero_copy_only=False).astype(np.float64)
    conf = rows["confidence"].to_numpy(zero_copy_only=False).astype(np.float64)
    zbytes = (
        rows["zlib_bytes"].to_numpy(zero_copy_only=False).astype(np.float64)
        if "zlib_bytes" in rows.column_names
        else np.full(rows.num_rows, np.nan)
    )

    def column(name: str) -> np.ndarray:
        if name not in rows.column_names:
            return np.full(rows.num_rows, np.nan)
        return rows[name].to_numpy(zero_copy_only=False).astype(np.float64)

    scores = (
        ("loss", loss),
        ("zlib", total / zbytes),
        ("min_k", column("min_k_correct")),
        ("min_k_pp", column("min_k_pp_correct")),
    )

    def at(ref) -> np.ndarray:
        return (phase == ref.phase) & (epoch == ref.epoch)

    def attacks(here: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        return {a: {s: v[here & (split == s) & np.isfinite(v)] for s in (MEMBERS, HELD_OUT)} for a, v in scores}

    steps = {0: attacks(at(start))}
    for e in sorted(set(epoch[phase == "forget"].tolist())):
        steps[int(e)] = attacks((phase == "forget") & (epoch == e))
    members = {
        name: conf[at(ref) & (split == MEMBERS)]
        for name, ref in (("pretrained", pre), ("finetuned", start), ("forgotten", last))
        if ref is not None
    }
    return TrialMembership(
        steps, attacks(at(pre)) if pre is not None else None, {k: v for k, v in members.items() if v.size}
    )


def privleak(auc_run: float | None, auc_reference: float | None) -> float | None:
    """open-unlearning's privleak: the relative gap in MIA AUC to the reference model, in %."""
    if auc_run is None or not auc_reference:
        return None
    return 100.0 * (auc_run - auc_reference) / auc_reference


def never_forgotten(ctx: AnalysisContext) -> dict[tuple, np.ndarray]:
    """(model, forget task, size, seed) -> the members' confidences at the finetuned milestone
    of a `none` trial: the same fine-tuning as the forget runs, never made to forget."""
    out: dict[tuple, np.ndarray] = {}
    for t in ctx.index.trials:
        ref = t.milestones.get("finetuned")
        f = t.scan_file(ctx.store.root, "scores", ref) if t.method == "none" and ref is not None else None
        if f is None:
            continue
        rows = ctx.engine.reduce(
            Scan((f,), columns=("split", "confidence"), trial_task=((t.sweep, t.trial_id, t.forget_task),)),
            CollectRows(order=("split",)),
        )
        conf = rows.filter(pc.equal(rows["split"], MEMBERS))["confidence"].to_numpy(zero_copy_only=False)
        out.setdefault((t.model, t.forget_task, t.size, t.seed), conf.astype(np.float64))
    return out


def forget_quality_rows(t: TrialInfo, tm: TrialMembership, never: dict[tuple, np.ndarray]) -> list[dict]:
    """Two-sample KS of the members' confidences at the finetuned and forgotten milestones
    against each reference on the same examples: the pretrained model (it never trained on
    them) and a `none` trial of the same model, task and size (fine-tuned, never forgotten;
    the same seed where the sweep has one). open-unlearning's forget quality is the p-value,
    high when the two are indistinguishable."""
    from scipy.stats import ks_2samp

    same = [
        v
        for (m, task, size, seed), v in sorted(never.items(), key=lambda kv: kv[0][3] != t.seed)
        if (m, task, size) == (t.model, t.forget_task, t.size)
    ]
    references = {"pretrained": tm.member_confidence.get("pretrained"), "none": same[0] if same else None}
    out = []
    for milestone in ("finetuned", "forgotten"):
        got = tm.member_confidence.get(milestone)
        for name, ref in references.items():
            if ref is None or got is None or not ref.size:
                continue
            ks = ks_2samp(got, ref)
            out.append(
                {
                    **{
                        k: getattr(t, k)
                        for k in ("sweep", "trial_id", "model", "method", "size", "forget_task", "seed")
                    },
                    "milestone": milestone,
                    "reference": name,
                    "n": int(got.size),
                    "ks_statistic": float(ks.statistic),
                    "forget_quality": float(ks.pvalue),
                }
            )
    return out


@register("membership", title="Membership inference through the forget phase", figure="beyond: LOSS / zlib AUC")
def run(ctx: AnalysisContext) -> AnalysisResult:
    require_trials(ctx)
    resamples = ctx.params.bootstrap_resamples
    run_rows: list[dict] = []
    quality: list[dict] = []
    by_cell: dict[tuple, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    leaks: dict[tuple, dict[int, tuple[float | None, float | None]]] = defaultdict(dict)
    never = never_forgotten(ctx)
    for t in ctx.index.trials:
        tm = trial_scores(ctx, t)
        if tm is None:
            continue
        quality += forget_quality_rows(t, tm, never)
        for step, per in tm.steps.items():
            for attack, groups in per.items():
                m, h = groups[MEMBERS], groups[HELD_OUT]
                ref = tm.reference[attack] if tm.reference is not None else None
                a, a_ref = auc(m, h), auc(ref[MEMBERS], ref[HELD_OUT]) if ref is not None else None
                run_rows.append(
                    {
                        "sweep": t.sweep,
                        "trial_id": t.trial_id,
                        "model": t.model,
                        "method": t.method,
                        "size": t.size,
                        "forget_task": t.forget_task,
                        "seed": t.seed,
                        "step": step,
                        "attack": attack,
                        "n_members": int(m.size),
                        "n_held_out": int(h.size),
                        "auc": a,
                        "auc_pretrained": a_ref,
                        "privleak": privleak(a, a_ref),
                    }
                )
                if m.size and h.size:
                    by_cell[(t.model, t.method, t.size, t.forget_task, step, attack)][t.seed] = (m, h)
                    leaks[(t.model, t.method, t.size, t.forget_task, step, attack)][t.seed] = (
                        a_ref,
                        privleak(a, a_ref),
                    )
    if not run_rows:
        raise Skip("no trial has a finetuned milestone and committed forget epochs")
    rows = []
    for key in sorted(by_cell, key=str):
        seeds = by_cell[key]
        row = dict(zip(("model", "method", "size", "forget_task", "step", "attack"), key))
        row.update(
            n_trials=len(seeds),
            n_members=sum(m.size for m, _ in seeds.values()),
            n_held_out=sum(h.size for _, h in seeds.values()),
            n_seeds=len(seeds),
            auc_pretrained=t_interval([r for r, _ in leaks[key].values()]).value,
            privleak=t_interval([v for _, v in leaks[key].values()]).value,
        )
        if len(seeds) >= 2:
            est = t_interval([auc(m, h) for m, h in seeds.values()])
            row.update(auc=est.value, auc_lo=est.lo, auc_hi=est.hi, interval=SEEDS_T)
        else:
            ((m, h),) = seeds.values()
            lo, hi = bootstrap_auc(m, h, resamples, rng_for(*key))
            row.update(auc=auc(m, h), auc_lo=lo, auc_hi=hi, interval=BOOTSTRAP)
        rows.append(row)
    summary = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    runs = pa.Table.from_pylist(run_rows, schema=RUN_SCHEMA)
    loss = [v for v in summary.filter(pc.equal(summary["attack"], "loss"))["auc"].to_pylist() if v is not None]
    spread = f"; loss AUC {min(loss):.3f} to {max(loss):.3f} across conditions and steps" if loss else ""
    msg = (
        f"{runs.num_rows} (trial, step, attack) AUC(s); members = the forget task's trained examples ({MEMBERS} split), "
        f"held out = its {HELD_OUT} split; step 0 = finetuned milestone{spread}"
    )
    notes = []
    if not np.isfinite([r["auc"] if r["auc"] is not None else np.nan for r in run_rows if r["attack"] == "zlib"]).any():
        notes.append("zlib AUC left empty: the store has no prepared examples to compress")
    if not any(r["auc"] is not None for r in run_rows if r["attack"] == "min_k"):
        notes.append("Min-K% / Min-K%++ AUCs left empty: the store's scores predate schema v3, which stores them")
    tables = {"summary": summary, "runs": runs, "forget_quality": pa.Table.from_pylist(quality, schema=QUALITY_SCHEMA)}
    return AnalysisResult(tables, msg, notes=notes)


@draws("membership")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    for model, size, rs in per_model(o.tables["summary"].to_pylist()):
        attacks = [a for a in ATTACKS if any(r["attack"] == a and r["auc"] is not None for r in rs)]
        fig = Figure(figsize=(4.5 * max(1, len(attacks)), 3.6), layout="constrained")
        for ax, attack in zip(np.atleast_1d(fig.subplots(1, max(1, len(attacks)))), attacks):
            for task, method in sorted({(r["forget_task"], r["method"]) for r in rs if r["attack"] == attack}):
                line = sorted(
                    (r for r in rs if (r["forget_task"], r["method"], r["attack"]) == (task, method, attack)),
                    key=lambda r: r["step"],
                )
                x = [r["step"] for r in line]
                ax.plot(x, [num(r["auc"]) for r in line], marker=".", label=f"{task} / {method}")
                ax.fill_between(x, [num(r["auc_lo"]) for r in line], [num(r["auc_hi"]) for r in line], alpha=0.2)
            epoch_axis(ax, "forget epoch (0 = finetuned milestone)", f"{attack} attack AUC")
        fig.axes[0].legend(fontsize=7, title="forget task / method", title_fontsize=7)
        fig.suptitle(
            f"{model}, n={size}: trained examples (train split) vs held-out (test split) of the forget task; "
            "0.5 = indistinguishable",
            fontsize=9,
        )
        figs.append((f"membership_{model}_n{size}", fig))
    return figs
