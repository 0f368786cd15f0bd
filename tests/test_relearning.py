"""Relearning attacks: the relearn phase on k examples of the forgotten set (a real trial on
a real micro model), and the recovery measures on a hand-built store whose curve is known."""

from __future__ import annotations

import random

import pyarrow.compute as pc
import pytest

from raysweep import trial as trial_module
from raysweep.analysis import run_analyses
from raysweep.errors import BadInput
from raysweep.planning import plan_sweep
from raysweep.spec import parse_spec
from raysweep.store import Store
from raysweep.sweep import models_dir_for
from raysweep.train import build_batches
from raysweep.trial import TrialRunner
from tests.analysis_helpers import TrialSpec, TrialWriter
from tests.spec_helpers import tiny_spec_text

N = 10
# Test-split correct counts: finetuned 10/10, forgotten 2/10, then relearn epochs 1..3.
RELEARN_CORRECT = [5, 8, 10]


def _k_of_n(k: int) -> list[float]:
    return [0.8] * k + [0.3] * (N - k)


def _write(store: Store, trial_id: str, seed: int, relearn=RELEARN_CORRECT) -> None:
    spec = TrialSpec(trial_id, "m1", "t0", seed=seed, eval_tasks=["t0"])
    w = TrialWriter(store, spec, splits=("test",))
    w.epoch("pretrained", 0, {("t0", "test"): _k_of_n(5)})
    w.epoch("finetune", 1, {("t0", "test"): _k_of_n(N)})
    w.epoch("forget", 1, {("t0", "test"): _k_of_n(2)})
    for e, k in enumerate(relearn, start=1):
        w.epoch("relearn", e, {("t0", "test"): _k_of_n(k)})
    w.finish(best_finetune=1, last_forget=1, last_relearn=len(relearn))


def test_recovery_curve_epochs_to_90_and_area_on_a_known_store(tmp_path):
    store = Store(tmp_path / "store")
    store.ensure()
    _write(store, "a", 0)
    (o,) = run_analyses(store, only=["relearning"], engine="local")
    assert o.status == "ok", o.message
    (t,) = o.tables["trials"].to_pylist()
    assert (t["acc_finetuned"], t["acc_forgotten"], t["acc_relearned"]) == (1.0, 0.2, 1.0)
    # 90% of the finetuned 1.0 is 0.9: epoch 2 has 0.8, epoch 3 has 1.0.
    assert t["epochs_to_90"] == 3 and t["relearn_epochs"] == 3 and t["relearn_examples"] == 100
    # Recovered fraction 0, 3/8, 6/8, 1: trapezoid area over 3 steps.
    assert t["recovery_auc"] == pytest.approx(((0 + 0.375) / 2 + (0.375 + 0.75) / 2 + (0.75 + 1) / 2) / 3)
    curve = [r["recovered"] for r in o.tables["curves"].to_pylist()]
    assert curve == pytest.approx([0.0, 0.375, 0.75, 1.0])
    # Examples 2..9 were wrong when relearning started; example i is right from the first
    # epoch whose correct count exceeds i.
    first = {r["example_idx"]: r["first_correct_epoch"] for r in o.tables["examples"].to_pylist()}
    assert first == {2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 8: 3, 9: 3}
    (s,) = o.tables["summary"].to_pylist()
    assert s["interval"] == "bootstrap95" and s["recovery_auc_lo"] <= s["recovery_auc"] <= s["recovery_auc_hi"]


def test_seeds_average_and_a_run_that_never_recovers_has_no_epoch(tmp_path):
    store = Store(tmp_path / "store")
    store.ensure()
    _write(store, "a", 0)
    _write(store, "b", 1, relearn=[3, 4, 6])  # never reaches 0.9
    (o,) = run_analyses(store, only=["relearning"], engine="local")
    trials = {r["trial_id"]: r for r in o.tables["trials"].to_pylist()}
    assert trials["b"]["epochs_to_90"] is None
    (s,) = o.tables["summary"].to_pylist()
    assert s["n_seeds"] == 2 and s["interval"] == "seeds-t95" and s["n_recovered_90"] == 1 and s["epochs_to_90"] == 3.0
    assert s["recovery_auc"] == pytest.approx((trials["a"]["recovery_auc"] + trials["b"]["recovery_auc"]) / 2)


def _attack_spec(k: int | None) -> str:
    text = tiny_spec_text(ft_epochs=2, fg_epochs=1, relearn=True)
    extra = "" if k is None else f" examples: {k},"
    return text.replace("relearn: {enabled: true,", f"relearn: {{enabled: true, stop_train_acc: 1.0,{extra}")


def _run_recording_batches(tmp_path, monkeypatch, spec_text: str):
    """Run the spec's first trial for real, recording the examples of every batch build."""
    seen: list[tuple[str, ...]] = []
    real = trial_module.build_batches

    def recording(tokenizer, model, examples, *args, **kwargs):
        seen.append(tuple(e.uid for e in examples))
        return real(tokenizer, model, examples, *args, **kwargs)

    monkeypatch.setattr(trial_module, "build_batches", recording)
    spec = parse_spec(spec_text)
    plan = spec.trials()[0]
    store = Store(tmp_path / "store")
    store.ensure()
    runner = TrialRunner(plan, store, models_dir_for(store))
    runner.run()
    return spec, store, runner, seen


def test_relearn_examples_train_on_the_first_k_trained_examples_only(tmp_path, monkeypatch):
    _, store, runner, seen = _run_recording_batches(tmp_path, monkeypatch, _attack_spec(3))
    trained = tuple(e.uid for e in runner.train_set)
    assert len(trained) == 24 and runner.relearn_set == runner.train_set[:3]
    # Fine-tuning and forgetting train on all 24, each of the 2 relearn epochs on the first 3.
    assert seen[-2:] == [trained[:3], trained[:3]] and all(s == trained for s in seen[:-2])
    relearn = store.read("epochs").filter(pc.equal(pc.field("phase"), "relearn"))
    assert relearn.num_rows == 2
    (o,) = run_analyses(store, only=["relearning"], engine="local")
    assert o.status == "ok" and {r["relearn_examples"] for r in o.tables["trials"].to_pylist()} == {3}


def test_relearn_examples_leave_other_trial_ids_alone_and_must_fit_the_sizes():
    plain, attacked = parse_spec(_attack_spec(None)).trials()[0], parse_spec(_attack_spec(3)).trials()[0]
    assert "examples" not in plain.identity()["phases"]["relearn"]
    assert attacked.identity()["phases"]["relearn"]["examples"] == 3 and attacked.trial_id != plain.trial_id
    with pytest.raises(BadInput, match=r"phases.relearn.examples: 30 is more than the smallest size \(24\)"):
        parse_spec(_attack_spec(30))


def _other_task_spec(task: str = "word_order", k: int = 5) -> str:
    return _attack_spec(None).replace(
        "relearn: {enabled: true,", f"relearn: {{enabled: true, task: {task}, examples: {k},"
    )


def test_relearn_on_another_task_trains_on_its_train_split_and_is_reported_as_such(tmp_path, monkeypatch):
    spec, store, runner, seen = _run_recording_batches(tmp_path, monkeypatch, _other_task_spec())
    plan = runner.plan
    assert plan.forget_task == "sentiment" and plan.phases.relearn.task == "word_order"
    other = tuple(e.uid for e in trial_module.prepare_tasks(plan, store)["word_order"].split("train")[:5])
    assert tuple(e.uid for e in runner.relearn_set) == other
    assert not set(other) & {e.uid for e in runner.train_set}
    # Fine-tuning and forgetting train on the 24 forgotten examples, both relearn epochs on
    # the other task's first 5.
    assert seen[-2:] == [other, other] and all(s == tuple(e.uid for e in runner.train_set) for s in seen[:-2])
    (o,) = run_analyses(store, only=["relearning"], engine="local")
    assert o.status == "ok", o.message
    (t,) = o.tables["trials"].to_pylist()
    assert (t["forget_task"], t["relearn_data"], t["relearn_examples"], t["relearn_epochs"]) == (
        "sentiment",
        "word_order",
        5,
        2,
    )
    # The plan counts the relearn phase's tokens on what it really trains on.
    cost = plan_sweep(spec, store, gpu="h100").cost
    batches = build_batches(
        runner.lm.tokenizer,
        runner.lm.model,
        runner.relearn_set,
        [e.gold for e in runner.relearn_set],
        8,
        random.Random(0),
    )
    assert cost.trials[0].relearn.gold == int(sum(b.attention_mask.sum() for b in batches))


def test_relearn_task_must_be_a_listed_task_and_leaves_other_trial_ids_alone():
    plain = parse_spec(_attack_spec(None)).trials()[0]
    assert "task" not in plain.identity()["phases"]["relearn"]
    other = parse_spec(_other_task_spec()).trials()[0]
    assert other.identity()["phases"]["relearn"]["task"] == "word_order" and other.trial_id != plain.trial_id
    with pytest.raises(BadInput, match=r"phases.relearn.task: 'compare' is not listed under 'tasks'"):
        parse_spec(_other_task_spec("compare"))
