"""Per-trial summaries read back from the store: what `run` prints at the end and `status` shows."""

from __future__ import annotations

from dataclasses import dataclass

from raysweep.constants import PHASES
from raysweep.store import TRIAL_KEY, Store, TrialKey, recorded_formula


@dataclass(frozen=True)
class TrialSummary(TrialKey):
    status: str
    error: str | None
    epochs_committed: int
    last_phase: str | None
    pretrained_test_acc: float | None
    finetuned_test_acc: float | None
    forgotten_test_acc: float | None
    forgotten_train_acc: float | None
    ratio_formula: str

    @property
    def forget_ratio(self) -> float | None:
        """The analyses' ratio, masked as they mask it (headroom below the default floor)."""
        from raysweep.analysis.context import AnalysisParams
        from raysweep.analysis.measures import forget_ratio

        floor = AnalysisParams().min_headroom
        return forget_ratio(self.finetuned_test_acc, self.forgotten_test_acc, self.ratio_formula, floor)


def summarize(store: Store, sweep: str | None = None) -> list[TrialSummary]:
    trials = store.trials(sweep).to_pylist()
    epochs = store.read("epochs", sweep=sweep).to_pylist()
    by_key = {(e["trial_id"], e["phase"], e["epoch"]): e for e in epochs}
    counts: dict[str, int] = {}
    last_phase: dict[str, tuple[int, str]] = {}
    order = {phase: i for i, phase in enumerate(PHASES)}
    for e in epochs:
        counts[e["trial_id"]] = counts.get(e["trial_id"], 0) + 1
        rank = (order.get(e["phase"], 9), e["epoch"])
        if rank > last_phase.get(e["trial_id"], ((-1, -1), ""))[0]:
            last_phase[e["trial_id"]] = (rank, e["phase"])

    def get(tid, phase, epoch, col):
        row = by_key.get((tid, phase, epoch)) if epoch is not None else None
        return None if row is None else row[col]

    out = []
    for t in sorted(trials, key=lambda r: (r["model"], r["forget_task"], r["method"], r["size"], r["seed"])):
        tid = t["trial_id"]
        out.append(
            TrialSummary(
                **{k: t[k] for k in TRIAL_KEY},
                status=t["status"],
                error=t["error"],
                epochs_committed=counts.get(tid, 0),
                last_phase=last_phase.get(tid, (None, None))[1],
                pretrained_test_acc=get(tid, "pretrained", 0, "forget_test_acc"),
                finetuned_test_acc=get(tid, "finetune", t["best_finetune_epoch"], "forget_test_acc"),
                forgotten_test_acc=get(tid, "forget", t["last_forget_epoch"], "forget_test_acc"),
                forgotten_train_acc=get(tid, "forget", t["last_forget_epoch"], "forget_train_acc"),
                ratio_formula=recorded_formula(t["method"], t.get("ratio_formula")),
            )
        )
    return out
