"""A trial's phases and stop rules, run in-process on a micro model."""

import pyarrow.compute as pc

from raysweep.spec import FinetuneConfig, ForgetConfig, RelearnConfig, parse_spec
from raysweep.store import Store
from raysweep.sweep import models_dir_for
from raysweep.trial import TrialRunner, finetune_should_stop, forget_should_stop, relearn_should_stop
from tests.spec_helpers import tiny_spec_text


def test_finetune_stop_rule():
    cfg = FinetuneConfig(max_epochs=10, stop_train_acc=0.99)
    assert finetune_should_stop(0.99, 3, 0, cfg)  # train accuracy reached
    assert not finetune_should_stop(0.98, 3, 5, cfg)  # no patience by default: keep going
    assert finetune_should_stop(0.5, 10, 0, cfg)  # epoch budget spent
    cfg = FinetuneConfig(max_epochs=10, patience=2)
    assert not finetune_should_stop(0.5, 4, 1, cfg) and finetune_should_stop(0.5, 4, 2, cfg)


def test_forget_and_relearn_stop_rules():
    cfg = ForgetConfig(max_epochs=5)
    assert forget_should_stop(0.49, 1, cfg) and not forget_should_stop(0.5, 1, cfg)
    assert forget_should_stop(0.9, 5, cfg)
    rcfg = RelearnConfig(max_epochs=4)
    assert (
        relearn_should_stop(0.99, 1, rcfg)
        and relearn_should_stop(0.2, 4, rcfg)
        and not relearn_should_stop(0.9, 3, rcfg)
    )


def test_flipped_labels_stop_at_the_mirror_of_the_finetuned_accuracy():
    """A 50% stop would fix the flipped forget ratio near 0.5 in advance: flipped labels go on
    until accuracy <= 1 - acc_finetuned (or the epoch budget), the others stop below 0.5."""
    cfg = ForgetConfig(max_epochs=10)
    assert forget_should_stop(0.45, 2, cfg, "random", 0.9)
    assert not forget_should_stop(0.45, 2, cfg, "flipped", 0.9)
    assert not forget_should_stop(0.11, 2, cfg, "flipped", 0.9) and forget_should_stop(0.10, 2, cfg, "flipped", 0.9)
    assert forget_should_stop(0.45, 10, cfg, "flipped", 0.9)  # the budget still ends it
    budget = ForgetConfig(max_epochs=10, flipped_stop="budget")
    assert not forget_should_stop(0.0, 9, budget, "flipped", 0.9) and forget_should_stop(
        0.0, 10, budget, "flipped", 0.9
    )


def test_flipped_trial_runs_past_chance(tmp_path):
    """End to end: the trial reads the fine-tuned milestone's test accuracy and stops on its
    mirror image, not on 0.5."""
    text = tiny_spec_text(ft_epochs=2, fg_epochs=5, methods=("flipped",))
    text = text.replace(
        "forget: {optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: 5}",
        "forget: {optimizer: adamw, lr: 1.0e-2, batch_size: 8, max_epochs: 5}",
    )
    store, plan, progress, reports = _run(tmp_path, text)
    forget = [r for r in reports if r.phase == "forget"]
    ft_test = [r for r in reports if r.phase == "finetune" and r.epoch == progress.best_epoch][0].forget_test_acc
    stop_at = 1.0 - ft_test
    # Every epoch but the last is above the mirror aim; the last reached it or spent the budget.
    assert all(r.forget_test_acc > stop_at for r in forget[:-1])
    assert forget[-1].forget_test_acc <= stop_at or forget[-1].epoch == 5


def _run(tmp_path, text):
    spec = parse_spec(text)
    store = Store(tmp_path / "store")
    store.ensure()
    reports = []
    plan = spec.trials()[0]
    progress = TrialRunner(plan, store, models_dir_for(store), reporter=reports.append).run()
    return store, plan, progress, reports


def test_phases_write_every_epoch_and_milestones(tmp_path):
    text = tiny_spec_text(ft_epochs=3, fg_epochs=2, relearn=True)
    # Impossible targets: every phase runs to its epoch budget.
    text = text.replace("max_epochs: 3}", "max_epochs: 3, stop_train_acc: 1.0}").replace(
        "forget: {optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: 2}",
        "forget: {optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: 2, stop_test_acc: 0.01}",
    )
    text = text.replace("relearn: {enabled: true,", "relearn: {enabled: true, stop_train_acc: 1.0,")
    store, plan, progress, reports = _run(tmp_path, text)
    assert [(r.phase, r.epoch) for r in reports] == [
        ("pretrained", 0),
        ("finetune", 1),
        ("finetune", 2),
        ("finetune", 3),
        ("forget", 1),
        ("forget", 2),
        ("relearn", 1),
        ("relearn", 2),
    ]
    scores = store.read("scores")
    # Every example of every eval task and split, every epoch: (24 train + val + test) x 2 tasks.
    per_epoch = scores.filter((pc.field("phase") == "forget") & (pc.field("epoch") == 1)).num_rows
    expected = sum(
        len(v)
        for t in ("sentiment", "word_order")
        for v in __import__("raysweep.tasks", fromlist=["x"])
        .prepare_task(t, seed=plan.data.seed, cap=24, max_chars=2048)
        .splits.values()
    )
    assert per_epoch == expected
    assert scores.num_rows == expected * len(reports)
    # The fine-tuned milestone is the best validation epoch (first one on ties).
    epochs = store.read("epochs").to_pylist()
    ft = [e for e in epochs if e["phase"] == "finetune"]
    best = max(ft, key=lambda e: (e["forget_validation_acc"], -e["epoch"]))
    row = store.trials().to_pylist()[0]
    assert row["status"] == "done" and row["best_finetune_epoch"] == best["epoch"] == progress.best_epoch
    assert row["last_forget_epoch"] == 2 and row["last_relearn_epoch"] == 2
    # Hidden states at the milestones only.
    hidden = store.read("hidden")
    assert sorted(set(zip(hidden.column("phase").to_pylist(), hidden.column("epoch").to_pylist()))) == sorted(
        [("finetune", best["epoch"]), ("forget", 2), ("pretrained", 0), ("relearn", 2)]
    )


def test_forget_stops_when_test_accuracy_drops_below_target(tmp_path):
    text = tiny_spec_text(ft_epochs=1, fg_epochs=6).replace("max_epochs: 6}", "max_epochs: 6, stop_test_acc: 1.0}")
    store, plan, progress, reports = _run(tmp_path, text)
    # Any accuracy is below 1.0, so forgetting stops after its first epoch.
    assert [r.epoch for r in reports if r.phase == "forget"] == [1]
    assert progress.last_forget_epoch == 1


def test_finetune_stops_when_train_accuracy_reached(tmp_path):
    text = tiny_spec_text(ft_epochs=5, fg_epochs=1).replace("max_epochs: 5}", "max_epochs: 5, stop_train_acc: 0.01}")
    _, _, _, reports = _run(tmp_path, text)
    assert [r.epoch for r in reports if r.phase == "finetune"] == [1]


def test_loss_is_on_response_tokens_only():
    import random

    from raysweep.models import build_tiny, train_tokenizer
    from raysweep.spec import ModelSpec
    from raysweep.tasks import prepare_task
    from raysweep.train import build_batches

    tok = train_tokenizer(400, add_bos=False)
    model = build_tiny(
        ModelSpec(name="x", arch="gpt2", tiny={"layers": 5, "hidden": 32, "heads": 2, "vocab": 400}), tok
    )
    exs = prepare_task("sentiment", seed=1, cap=4, max_chars=2048).split("train")
    (batch,) = build_batches(tok, model, exs, [e.gold for e in exs], 4, random.Random(0))
    for row, i in enumerate(batch.example_idx.tolist()):
        labelled = [t for t in batch.labels[row].tolist() if t != -100]
        answer = tok.encode(exs[i].prompt + exs[i].continuations[exs[i].gold])[len(tok.encode(exs[i].prompt)) :]
        assert labelled == answer


def test_optimizer_state_in_resume_points_follows_model_size_by_default(tmp_path, monkeypatch):
    import torch

    import raysweep.trial as trial_mod

    def optimizer_saved(sub: str, extra: str = "") -> bool:
        text = tiny_spec_text(ft_epochs=3, fg_epochs=1).replace("max_epochs: 3}", "max_epochs: 3, stop_train_acc: 1.0}")
        if extra:
            text += extra
        spec = parse_spec(text)
        store = Store(tmp_path / sub)
        store.ensure()
        plan = spec.trials()[0]
        runner = TrialRunner(plan, store, models_dir_for(store))
        # Stop after the first fine-tuning resume point, as a crash would.
        monkeypatch.setattr(
            runner,
            "fault_point",
            lambda point, phase, epoch: (
                (_ for _ in ()).throw(KeyboardInterrupt) if (phase, epoch, point) == ("finetune", 1, "resume") else None
            ),
        )
        try:
            runner.run()
        except KeyboardInterrupt:
            pass
        payload = torch.load(store.path("checkpoints", spec.name, plan.trial_id) / "latest.pt", weights_only=True)
        assert payload["progress"]["phase"] == "finetune" and payload["progress"]["epoch"] == 1
        return payload["optimizer"] is not None

    assert optimizer_saved("small")  # auto: a tiny model keeps it
    monkeypatch.setattr(trial_mod, "OPTIMIZER_STATE_MAX_PARAMS", 1000)
    assert not optimizer_saved("large")  # auto: past the threshold, weights only
    assert optimizer_saved("forced", "train: {checkpoint_optimizer: true}\n")
