"""Pretrained scores computed once per sweep: real trials of a real micro model, the second
reusing what the first scored, and writing exactly the rows it would have computed."""

from __future__ import annotations

import pyarrow.compute as pc

from raysweep import records
from raysweep.spec import parse_spec
from raysweep.store import Store
from raysweep.sweep import models_dir_for
from raysweep.trial import TrialRunner
from tests.spec_helpers import tiny_spec_text

SPEC = tiny_spec_text(name="shared", forget_tasks=("sentiment", "word_order"), ft_epochs=1, fg_epochs=1)
SCORE_COLUMNS = [
    "eval_task",
    "split",
    "example_idx",
    "ll_sum_correct",
    "ll_sum_distractor",
    "confidence",
    "min_k_correct",
]


def _run(store: Store, plan) -> TrialRunner:
    runner = TrialRunner(plan, store, models_dir_for(store))
    runner.run()
    return runner


def _pretrained_rows(store: Store, plan):
    scores = store.read("scores", sweep=plan.sweep)
    mine = scores.filter(pc.and_(pc.equal(scores["trial_id"], plan.trial_id), pc.equal(scores["phase"], "pretrained")))
    return mine.select(SCORE_COLUMNS).sort_by([(c, "ascending") for c in SCORE_COLUMNS[:3]]).to_pylist()


def test_a_second_trial_of_the_model_reuses_the_first_trials_pretrained_scores(tmp_path, monkeypatch):
    first, second = parse_spec(SPEC).trials()
    assert first.model == second.model and first.forget_task != second.forget_task
    shared = Store(tmp_path / "shared")
    shared.ensure()
    calls: list[int] = []
    real = records.score_examples

    def counting(model, tokenizer, examples, *args, **kwargs):
        calls.append(len(examples))
        return real(model, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(records, "score_examples", counting)
    a = _run(shared, first)
    assert a.pretrained.reused == []  # the first trial scores every slice itself
    before = len(calls)
    b = _run(shared, second)
    # Both tasks are scored on all three splits with the same examples (size = cap): every
    # pretrained slice of the second trial was the first trial's.
    assert len(b.pretrained.reused) == len(b.slices) == 6
    n_epochs = len(shared.committed_epochs(second.sweep, second.trial_id)["finetune"]) + len(
        shared.committed_epochs(second.sweep, second.trial_id)["forget"]
    )
    assert len(calls) - before == n_epochs  # one scoring pass per trained epoch, none for pretrained

    # Alone in its own store, the second trial scores its pretrained model itself: the rows
    # are the same, value for value.
    monkeypatch.setattr(records, "score_examples", real)
    alone = Store(tmp_path / "alone")
    alone.ensure()
    c = _run(alone, second)
    assert c.pretrained.reused == []
    assert _pretrained_rows(shared, second) == _pretrained_rows(alone, second)
    assert len(_pretrained_rows(shared, second)) == sum(len(sl.examples) for sl in b.slices)


def test_a_damaged_shared_slice_is_scored_again_and_replaced(tmp_path):
    first, second = parse_spec(SPEC).trials()
    store = Store(tmp_path / "store")
    store.ensure()
    _run(store, first)
    files = sorted(store.path("pretrained", first.sweep).glob("*/*.npz"))
    assert len(files) == 6
    files[0].write_bytes(b"not an npz file")
    b = _run(store, second)
    assert len(b.pretrained.reused) == 5 and files[0].name not in b.pretrained.reused
    assert files[0].stat().st_size > 100  # rewritten whole


def test_the_plan_counts_each_pretrained_slice_once_per_model():
    from raysweep.planning import plan_sweep

    cost = plan_sweep(parse_spec(SPEC), None, gpu="h100").cost
    first, second = cost.trials
    assert first.pretrained_slices == first.slices and second.pretrained_slices == []
    for t in cost.trials:
        trained_epochs = t.scored_epochs("upper") - 1
        own = sum(s.scored for s in t.pretrained_slices)
        assert t.scored_tokens("upper") == trained_epochs * t.scored_per_epoch + own
    # Rows are still written for every trial and epoch.
    assert cost.total("rows", "upper") == sum(t.scored_epochs("upper") * t.rows_per_epoch for t in cost.trials)
