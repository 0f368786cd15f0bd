"""`scoring.schedule`: the other evaluation tasks scored at the epochs it names and at every
milestone, the forget task every epoch; real trials of a real micro model, against the same
trial scored every epoch."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from raysweep.analysis import run_analyses
from raysweep.cost import scheduled_epochs
from raysweep.planning import plan_sweep
from raysweep.spec import ScoringConfig, parse_spec
from raysweep.store import Store
from raysweep.sweep import models_dir_for
from raysweep.trial import TrialRunner

# Forgetting's stop rule never fires and fine-tuning's barely can: the phases run (about)
# their budgets, so each has epochs on and off the schedule.
SPEC = """
name: {name}
models:
  - name: micro-gpt2
    arch: gpt2
    tiny: {{layers: 5, hidden: 32, heads: 2, vocab: 512}}
    pretrain: {{steps: 40, batch_size: 16}}
tasks: [sentiment, word_order]
forget_tasks: [sentiment]
sizes: [24]
data: {{cap: 24}}
phases:
  finetune: {{optimizer: adamw, lr: 3.0e-4, batch_size: 8, max_epochs: 5, stop_train_acc: 1.0}}
  forget: {{optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: 5, stop_test_acc: 0.001}}
  relearn: {{enabled: true, optimizer: adamw, lr: 3.0e-4, batch_size: 8, max_epochs: 3, stop_train_acc: 1.0}}
scoring: {{batch_size: 64{schedule}{hidden}}}
resources: {{cpu: 1, gpu: 0}}
"""


def _spec(name: str, schedule=None, hidden_tasks=None):
    return parse_spec(
        SPEC.format(
            name=name,
            schedule=f", schedule: {schedule}" if schedule is not None else "",
            hidden=f", hidden_tasks: {hidden_tasks}" if hidden_tasks is not None else "",
        )
    )


def _run(store: Store, spec):
    (plan,) = spec.trials()
    TrialRunner(plan, store, models_dir_for(store)).run()
    return plan


def _epochs_with(store: Store, plan, task: str) -> dict[str, list[int]]:
    scores = store.read("scores", sweep=plan.sweep)
    mine = scores.filter(pc.and_(pc.equal(scores["trial_id"], plan.trial_id), pc.equal(scores["eval_task"], task)))
    out: dict[str, set[int]] = {}
    for r in mine.select(["phase", "epoch"]).to_pylist():
        out.setdefault(r["phase"], set()).add(r["epoch"])
    return {ph: sorted(eps) for ph, eps in out.items()}


def _rows(store: Store, plan, phase: str, epoch: int, task: str) -> list[dict]:
    scores = store.read("scores", sweep=plan.sweep)
    keep = pc.and_(
        pc.and_(pc.equal(scores["trial_id"], plan.trial_id), pc.equal(scores["eval_task"], task)),
        pc.and_(pc.equal(scores["phase"], phase), pc.equal(scores["epoch"], epoch)),
    )
    cols = ["split", "example_idx", "ll_sum_correct", "ll_sum_distractor", "correct"]
    return scores.filter(keep).select(cols).sort_by([("split", "ascending"), ("example_idx", "ascending")]).to_pylist()


def test_schedules_name_the_epochs_and_the_default_keeps_trial_ids():
    at = {s: [e for e in range(1, 17) if ScoringConfig(schedule=s).scores_others_at(e)] for s in ("log", 4)}
    assert at == {"log": [1, 2, 4, 8, 16], 4: [4, 8, 12, 16]}
    assert not any(ScoringConfig(schedule="milestones").scores_others_at(e) for e in range(1, 50))
    assert ScoringConfig(schedule=1).schedule == "every_epoch"
    # Trials planned before the schedule existed keep their ids; a sparse schedule is another trial.
    default, named, sparse = (_spec("ids", s).trials()[0].trial_id for s in (None, "every_epoch", "milestones"))
    assert default == named != sparse
    # The other tasks are scored at the schedule's epochs and at the phase's milestone.
    assert scheduled_epochs(ScoringConfig(schedule=5), "forget", 10) == 2  # 5 and 10, the last
    assert scheduled_epochs(ScoringConfig(schedule=5), "forget", 12) == 3  # 5, 10 and 12
    assert scheduled_epochs(ScoringConfig(schedule="milestones"), "finetune", 7) == 1
    assert scheduled_epochs(ScoringConfig(), "finetune", 7) == 7


@pytest.mark.parametrize("schedule", ["milestones", "log"])
def test_other_tasks_are_scored_on_schedule_and_at_every_milestone(tmp_path, schedule):
    store = Store(tmp_path / "store")
    store.ensure()
    every = _run(store, _spec("every"))
    sparse = _run(store, _spec("sparse", schedule))
    row = store.read_trial_row(sparse.sweep, sparse.trial_id)
    assert row["status"] == "done"
    best, last_forget, last_relearn = row["best_finetune_epoch"], row["last_forget_epoch"], row["last_relearn_epoch"]
    ran = store.committed_epochs(sparse.sweep, sparse.trial_id)
    last_finetune = ran["finetune"][-1]
    assert last_forget == 5 and best < last_finetune  # the best epoch is not the last one
    # Training is the same whatever is scored: the two trials pick the same epochs.
    assert store.read_trial_row(every.sweep, every.trial_id)["best_finetune_epoch"] == best
    assert store.committed_epochs(every.sweep, every.trial_id) == ran

    forget_task = _epochs_with(store, sparse, "sentiment")
    assert forget_task == {"pretrained": [0], **ran}
    on = {"milestones": set(), "log": {1, 2, 4}}[schedule]
    assert _epochs_with(store, sparse, "word_order") == {
        "pretrained": [0],
        "finetune": sorted(on & set(ran["finetune"]) | {best}),
        "forget": sorted(on & set(ran["forget"]) | {last_forget}),
        "relearn": sorted(on & set(ran["relearn"]) | {last_relearn}),
    }
    # The best epoch's other-task rows, scored when fine-tuning ended from its kept weights,
    # are the ones the every-epoch trial scored at that epoch.
    got, want = (
        _rows(store, sparse, "finetune", best, "word_order"),
        _rows(store, every, "finetune", best, "word_order"),
    )
    assert len(got) == len(want) == 3 * 24  # word_order's three splits
    for g, w in zip(got, want):
        assert (g["split"], g["example_idx"], g["correct"]) == (w["split"], w["example_idx"], w["correct"])
        assert g["ll_sum_correct"] == pytest.approx(w["ll_sum_correct"], abs=1e-4)
    # The milestones' hidden states hold every task.
    hidden = store.read("hidden", sweep=sparse.sweep)
    at_best = hidden.filter(pc.and_(pc.equal(hidden["phase"], "finetune"), pc.equal(hidden["epoch"], best)))
    assert set(at_best["eval_task"].to_pylist()) == {"sentiment", "word_order"}

    # The plan counts exactly the rows stored (the best epoch off the schedule, as here, or not).
    cost = plan_sweep(_spec("sparse", schedule), store, gpu="h100").cost
    stored = store.read("scores", sweep=sparse.sweep).num_rows
    best_on = schedule == "log" and best in on
    assert cost.total("rows", "upper") == stored + (3 * 24 if best_on else 0)


def test_forgetting_events_leave_out_sequences_the_schedule_did_not_score_every_epoch(tmp_path):
    store = Store(tmp_path / "store")
    store.ensure()
    _run(store, _spec("sparse", "milestones"))
    (events,) = run_analyses(store, only=["forgetting_events"], engine="local", write=False)
    assert events.status == "ok", events.message
    ex = events.tables["examples"]
    assert set(ex["eval_task"].to_pylist()) == {"sentiment"}  # word_order: milestones only
    assert {(r["phase"], r["n_steps"]) for r in ex.select(["phase", "n_steps"]).to_pylist()} >= {("forget", 6)}
    assert "scoring.schedule milestones" in events.message


def test_hidden_states_of_the_forget_task_alone_when_asked(tmp_path):
    store = Store(tmp_path / "store")
    store.ensure()
    assert _spec("ids").trials()[0].trial_id == _spec("ids", hidden_tasks="all").trials()[0].trial_id
    plan = _run(store, _spec("forget-hidden", "milestones", hidden_tasks="forget"))
    hidden = store.read("hidden", sweep=plan.sweep)
    assert set(hidden["eval_task"].to_pylist()) == {"sentiment"}
    # Every milestone, all three splits of the forget task, one layer.
    milestones = {(r["phase"], r["epoch"]) for r in hidden.select(["phase", "epoch"]).to_pylist()}
    assert len(milestones) == 4 and hidden.num_rows == 4 * 3 * 24
    cost = plan_sweep(_spec("forget-hidden", "milestones", hidden_tasks="forget"), store, gpu="h100").cost
    assert cost.total("hidden_rows", "upper") == hidden.num_rows


def test_tasks_whose_states_are_not_kept_are_scored_without_them(tmp_path):
    """With `hidden_tasks: forget` the other tasks' examples are scored without the positions
    their states would be read at, and the sweep's pretrained cache holds no states for them;
    their scores are those of a trial that captured every task's states."""
    import numpy as np

    store = Store(tmp_path / "store")
    store.ensure()
    only = _run(store, _spec("only", hidden_tasks="forget"))
    every = _run(store, _spec("every", hidden_tasks="all"))
    scores = store.read("scores")
    keys = ["phase", "epoch", "eval_task", "split", "example_idx"]

    def of(plan):
        mine = scores.filter(pc.equal(scores["trial_id"], plan.trial_id))
        return mine.sort_by([(k, "ascending") for k in keys])

    a, b = of(only), of(every)
    assert a.num_rows == b.num_rows and a.select(keys).equals(b.select(keys))
    for col in ("ll_sum_correct", "ll_sum_distractor"):
        assert np.abs(a[col].to_numpy() - b[col].to_numpy()).max() < 1e-4
    assert a["correct"].equals(b["correct"])
    hidden = store.read("hidden")
    pair = []
    for plan in (only, every):
        h = hidden.filter(
            pc.and_(pc.equal(hidden["trial_id"], plan.trial_id), pc.equal(hidden["eval_task"], "sentiment"))
        )
        h = h.sort_by([(k, "ascending") for k in keys])
        pair.append(np.stack(h["hidden"].to_numpy(zero_copy_only=False)))
    assert pair[0].shape == pair[1].shape and np.abs(pair[0] - pair[1]).max() < 1e-4

    cached = {p.name: p for p in store.path("pretrained", only.sweep).rglob("*.npz")}
    assert cached and all(n.endswith("-nohidden.npz") == n.startswith("word_order") for n in cached)
    for name, path in cached.items():
        with np.load(path) as saved:
            assert ("hidden" in saved.files) == name.startswith("sentiment"), name
