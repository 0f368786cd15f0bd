"""What a trial writes to the store: each epoch's scores as Arrow tables (hidden states at the
milestones), the epoch's summary row, drops of stale epochs, and the trial's status row.

The tables are built here; where they go is the store's business (`Store.commit_epoch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raysweep.distributed import Group
from raysweep.lineage import lineage_fields
from raysweep.methods import METHODS
from raysweep.models import LoadedModel, model_source
from raysweep.resume import Progress
from raysweep.scoring import PAIR_0, PAIR_1, PROMPT, ScoreResult, score_examples
from raysweep.spec import ScoringConfig, TrialPlan
from raysweep.store import EPOCH_KINDS, INTERRUPT_ERRORS, EpochKey, EpochRecord, Store, TrialKey, hidden_schema
from raysweep.tasks import Example

Accuracies = dict[tuple[str, str], float]  # (eval task, split) -> accuracy


@dataclass(frozen=True)
class EpochReport:
    """One epoch's headline figures: the epochs table's row (less its timing) and what the
    scheduler shows in the live progress view."""

    trial_id: str
    phase: str
    epoch: int
    train_loss: float
    forget_train_acc: float
    forget_validation_acc: float
    forget_test_acc: float
    # Mean test accuracy over all evaluation tasks; NaN at an epoch the scoring schedule
    # scored the forget task alone (a mean over it would read as a mean over all).
    eval_test_acc: float

    @classmethod
    def of(cls, plan: TrialPlan, phase: str, epoch: int, train_loss: float, acc: Accuracies) -> "EpochReport":
        ft = plan.forget_task
        test_accs = [v for (_, split), v in acc.items() if split == "test"]
        if any((t, "test") not in acc for t in plan.eval_tasks if "test" in plan.scoring.splits):
            test_accs = [float("nan")]
        return cls(
            plan.trial_id,
            phase,
            epoch,
            train_loss,
            acc.get((ft, "train"), float("nan")),
            acc[(ft, "validation")],
            acc[(ft, "test")],
            float(np.mean(test_accs)),
        )


@dataclass
class EvalSlice:
    task: str
    split: str
    examples: list[Example]


def hidden_task(plan: TrialPlan) -> str | None:
    """The one task whose hidden states a trial keeps (`scoring.hidden_tasks: forget`), or
    None when it keeps every task's."""
    return plan.forget_task if plan.scoring.hidden_tasks == "forget" else None


def keeps_hidden(plan: TrialPlan, task: str) -> bool:
    """Whether a trial captures and keeps `task`'s hidden states."""
    return plan.scoring.hidden_states != "none" and hidden_task(plan) in (None, task)


def score_all(
    lm: LoadedModel, slices: list[EvalSlice], scoring: ScoringConfig, group: Group, only_hidden: str | None = None
) -> ScoreResult | None:
    """Every example of every slice scored; with several ranks each scores every world-th
    example (interleaved, so lengths balance) and rank 0 gathers the whole result. With
    `only_hidden` (a task), hidden states are captured for that task's examples alone: the
    others are scored without the positions their states would be read at, and their rows
    of `hidden` are zeros, never written."""
    flat = [(ex, sl.task) for sl in slices for ex in sl.examples]
    mine = flat[group.rank :: group.world]
    capture = scoring.hidden_states != "none"
    groups = [(np.arange(len(mine)), capture)]
    if capture and only_hidden is not None:
        wanted = np.array([task == only_hidden for _, task in mine], bool)
        groups = [(np.flatnonzero(wanted), True), (np.flatnonzero(~wanted), False)]
    parts = [
        (
            rows,
            score_examples(
                lm.model,
                lm.tokenizer,
                [mine[i][0] for i in rows],
                batch_size=scoring.batch_size,
                capture_hidden=hidden,
                layers=scoring.layers,
            ),
        )
        for rows, hidden in groups
        if rows.size or len(groups) == 1
    ]
    part = parts[0][1] if len(parts) == 1 else merge_rows(len(mine), parts)
    if group.world == 1:
        return part
    gathered = group.gather(part)
    if not group.is_main:
        return None
    return merge_rows(len(flat), [(np.arange(r, len(flat), group.world), p) for r, p in enumerate(gathered)])


def accuracies(slices: list[EvalSlice], res: ScoreResult) -> Accuracies:
    gold = np.array([ex.gold for sl in slices for ex in sl.examples])
    correct = res.prediction() == gold
    out, start = {}, 0
    for sl in slices:
        n = len(sl.examples)
        out[(sl.task, sl.split)] = float(correct[start : start + n].mean()) if n else float("nan")
        start += n
    return out


def epoch_tables(
    plan: TrialPlan, slices: list[EvalSlice], phase: str, epoch: int, res: ScoreResult, with_hidden: bool
) -> tuple[pa.Table, pa.Table | None]:
    """The scores table of one epoch (one row per scored example) and, when asked and
    captured, its hidden-states table."""
    flat = [ex for sl in slices for ex in sl.examples]
    n = len(flat)
    gold = np.array([ex.gold for ex in flat], dtype=np.int64)
    rows = np.arange(n)
    mean, total = res.ll_mean, res.ll_sum
    pred = res.prediction()
    common = {
        "sweep": pa.array([plan.sweep] * n, pa.string()),
        "trial_id": pa.array([plan.trial_id] * n, pa.string()),
        "phase": pa.array([phase] * n, pa.string()),
        "epoch": pa.array(np.full(n, epoch, dtype=np.int32)),
        "eval_task": pa.array([sl.task for sl in slices for _ in sl.examples], pa.string()),
        "split": pa.array([sl.split for sl in slices for _ in sl.examples], pa.string()),
        "example_idx": pa.array(np.array([ex.idx for ex in flat], dtype=np.int32)),
    }
    scores = pa.table(
        {
            **common,
            "gold": pa.array(gold.astype(np.int8)),
            "ll_sum_correct": pa.array(total[rows, gold].astype(np.float32)),
            "ll_sum_distractor": pa.array(total[rows, 1 - gold].astype(np.float32)),
            "ll_mean_correct": pa.array(mean[rows, gold].astype(np.float32)),
            "ll_mean_distractor": pa.array(mean[rows, 1 - gold].astype(np.float32)),
            "n_tokens_correct": pa.array(res.n_tokens[rows, gold].astype(np.int16)),
            "n_tokens_distractor": pa.array(res.n_tokens[rows, 1 - gold].astype(np.int16)),
            "confidence": pa.array(res.confidence(gold).astype(np.float32)),
            "prediction": pa.array(pred),
            "correct": pa.array(pred == gold),
            **_min_k_columns(res, rows, gold),
        }
    )
    hidden = None
    if with_hidden and res.hidden is not None:
        keep = np.flatnonzero(np.array([keeps_hidden(plan, sl.task) for sl in slices for _ in sl.examples], bool))
        hidden = _hidden_table(common, res, gold, keep)
    return scores, hidden


def trial_row(plan: TrialPlan) -> dict:
    key = TrialKey(plan.sweep, plan.trial_id, plan.model.name, plan.forget_task, plan.method, plan.size, plan.seed)
    return {
        **key.row(),
        "model_source": model_source(plan.model),
        "plan_json": plan.model_dump_json(),
        "ratio_formula": METHODS.get(plan.method).ratio_formula,
        # Where each write happens (the driver's pending row, then the trial's own process).
        **lineage_fields(plan),
    }


class TrialRecords:
    """The store writes of one trial (only its rank 0 makes them)."""

    def __init__(self, store: Store, plan: TrialPlan):
        self.store = store
        self.plan = plan

    def commit(
        self, slices: list[EvalSlice], report: EpochReport, res: ScoreResult, seconds: float, phase_end: bool
    ) -> None:
        """One epoch's scores, summary row and (by the spec's policy) hidden states, marker last."""
        p, phase, epoch = self.plan, report.phase, report.epoch
        policy = p.scoring.hidden_states
        with_hidden = policy == "every_epoch" or (policy == "phase_end" and phase_end)
        scores, hidden = epoch_tables(p, slices, phase, epoch, res, with_hidden)
        figures = ("train_loss", "forget_train_acc", "forget_validation_acc", "forget_test_acc")
        summary = pa.table(
            {
                "sweep": [p.sweep],
                "trial_id": [p.trial_id],
                "phase": [phase],
                "epoch": pa.array([epoch], pa.int32()),
                **{name: pa.array([getattr(report, name)], pa.float32()) for name in figures},
                "seconds": pa.array([seconds], pa.float32()),
            }
        )
        self.store.commit_epoch(EpochRecord(EpochKey(p.sweep, p.trial_id, phase, epoch), scores, summary, hidden))

    def add_best_hidden(self, slices: list[EvalSlice], epoch: int, res: ScoreResult | None) -> None:
        """The fine-tuned milestone is the best-validation epoch, known only when the phase
        ends: its hidden states are kept in memory until then and written beside its scores."""
        if self.plan.scoring.hidden_states != "phase_end" or res is None:
            return
        _, hidden = epoch_tables(self.plan, slices, "finetune", epoch, res, with_hidden=True)
        if hidden is not None:
            self.store.add_to_commit(EpochKey(self.plan.sweep, self.plan.trial_id, "finetune", epoch), "hidden", hidden)

    def extend_best(self, slices: list[EvalSlice], epoch: int, res: ScoreResult) -> None:
        """The slices the schedule skipped at the best fine-tuning epoch, scored with its
        weights when the phase ends, added to that epoch's committed scores."""
        scores, _ = epoch_tables(self.plan, slices, "finetune", epoch, res, with_hidden=False)
        self.store.extend_scores(EpochKey(self.plan.sweep, self.plan.trial_id, "finetune", epoch), scores)

    def drop_stale(self, phase: str, last: int, milestone: int | None) -> None:
        """Called when a phase ends at epoch `last`. An earlier attempt of this trial may have
        gone further (or kept hidden states of another epoch) before it died: a rerun that is
        not bit-identical (GPU kernels) can stop at a different epoch. Those rows belong to no
        trajectory, so they go; with deterministic reruns there is never anything to drop."""
        s, t = self.plan.sweep, self.plan.trial_id
        on_disk = set(self.store.committed_epochs(s, t).get(phase, []))
        for kind in EPOCH_KINDS:
            on_disk |= set(self.store.epoch_files(kind, s, t, phase))
        for e in sorted(e for e in on_disk if e > last):
            self.store.uncommit(EpochKey(s, t, phase, e))
        if self.plan.scoring.hidden_states == "phase_end":
            for e in self.store.epoch_files("hidden", s, t, phase):
                if e <= last and e != milestone:
                    self.store.uncommit(EpochKey(s, t, phase, e), kinds=("hidden",))

    def write_status(self, status: str, progress: Progress, attempts: int, error: str | None = None) -> None:
        """The trial's status row, with its milestones so far."""
        p = self.plan
        now = self.store.read_trial_row(p.sweep, p.trial_id)
        if now is not None and now["status"] == "superseded":
            # Another version of the sweep replaced this trial while it ran: its own status
            # would put it back among the current trials and pool the two versions. It stops
            # (a failure it cannot record is left unrecorded).
            if status == "failed":
                return
            raise RuntimeError(
                f"trial {p.trial_id} was superseded by another version of sweep {p.sweep!r}; it stops without recording {status!r}"
            )
        if status == "failed" and (error or "").startswith(INTERRUPT_ERRORS):
            status = "interrupted"  # stopped from outside (Ctrl+C, Tune stopping it): it resumes
        if status in ("failed", "interrupted") and now is not None and now["status"] == "interrupted":
            return  # the driver stopped the sweep and recorded why: a dying process adds nothing
        # Always the current attempt: a row without it would restart the count.
        self.store.write_trial_row(
            {
                **trial_row(p),
                "status": status,
                "error": error,
                "attempts": attempts,
                "best_finetune_epoch": progress.best_epoch,
                "last_forget_epoch": progress.last_forget_epoch,
                "last_relearn_epoch": progress.last_relearn_epoch,
            }
        )


def _hidden_table(common: dict[str, pa.Array], res: ScoreResult, gold: np.ndarray, rows: np.ndarray) -> pa.Table:
    """One row per (example of `rows`, layer), example-major; the pair states reordered from
    choice order to (correct, distractor)."""
    _, n_layers, _, d = res.hidden.shape
    gold = gold[rows]

    def vectors(states: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1).astype(np.float32)), d)

    take = np.repeat(rows, n_layers)
    columns = {k: v.take(pa.array(take)) for k, v in common.items()}
    columns["layer"] = pa.array(np.tile(np.array(res.layers, dtype=np.int16), len(rows)))
    columns["hidden"] = vectors(res.hidden[rows, :, PROMPT])
    columns["hidden_correct"] = vectors(res.hidden[rows, :, PAIR_0 + gold])
    columns["hidden_distractor"] = vectors(res.hidden[rows, :, PAIR_1 - gold])
    return pa.table(columns, schema=hidden_schema(d))


def _min_k_columns(res: ScoreResult, rows: np.ndarray, gold: np.ndarray) -> dict[str, pa.Array]:
    cols = {}
    for name, values in (("min_k", res.min_k), ("min_k_pp", res.min_k_pp)):
        if values is None:
            values = np.full((len(rows), 2), np.nan)
        for side, pick in (("correct", gold), ("distractor", 1 - gold)):
            v = values[rows, pick]
            cols[f"{name}_{side}"] = pa.array(v.astype(np.float32), mask=~np.isfinite(v))
    return cols


def concat_results(parts: list[ScoreResult]) -> ScoreResult:
    """Results of consecutive slices scored apart, as one (in the given order)."""
    if len(parts) == 1:
        return parts[0]
    ends = np.cumsum([len(p.ll_sum) for p in parts])
    return merge_rows(int(ends[-1]), [(np.arange(e - len(p.ll_sum), e), p) for p, e in zip(parts, ends)])


def merge_rows(n: int, parts: list[tuple[np.ndarray, ScoreResult]]) -> ScoreResult:
    """One result of n examples from parts that scored the examples at the given rows. Where
    some parts captured hidden states and others did not, the others' rows are zeros."""
    ll_sum = np.zeros((n, 2), dtype=np.float64)
    n_tokens = np.zeros((n, 2), dtype=np.int64)
    shaped = [p.hidden for _, p in parts if p.hidden is not None and p.hidden.ndim == 4]
    hidden = np.zeros((n, *shaped[0].shape[1:]), dtype=np.float32) if shaped and n else None
    min_k, min_k_pp = np.full((n, 2), np.nan), np.full((n, 2), np.nan)
    layers = next((p.layers for _, p in parts if p.hidden is not None), parts[0][1].layers)
    for rows, part in parts:
        ll_sum[rows] = part.ll_sum
        n_tokens[rows] = part.n_tokens
        if part.min_k is not None:
            min_k[rows], min_k_pp[rows] = part.min_k, part.min_k_pp
        if hidden is not None and part.hidden is not None and len(rows):
            hidden[rows] = part.hidden
    return ScoreResult(ll_sum, n_tokens, hidden, layers, min_k, min_k_pp)
