"""Forgetting methods as a sweep axis: every method forgets on a real (micro) model, random
labels are redrawn every epoch, flipped labels are always the distractor, and the forget ratio
and the analyses treat gradient ascent and NPO like random labels (aiming at chance)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from raysweep.analysis import run_analyses
from raysweep.analysis.measures import forget_ratio
from raysweep.methods import FlippedLabels, RandomLabels, get_method, registered_methods
from raysweep.models import load_model
from raysweep.records import trial_row
from raysweep.spec import parse_spec
from raysweep.store import Store, recorded_formula
from raysweep.sweep import models_dir_for
from raysweep.tasks import prepare_task
from raysweep.train import build_batches
from raysweep.trial import TrialRunner

METHODS = ("random", "flipped", "gradient_ascent", "npo")
TASK = "sentiment"

# The conftest's micro GPT-2 (same model block, so the same cached weights) on one task it
# can learn in a few seconds: fine-tuning runs until train accuracy reaches 0.99, then each
# method forgets under the usual stop rule (forget-task test accuracy below 0.5).
SPEC = f"""
name: methods-test
models:
  - name: micro-gpt2
    arch: gpt2
    tiny: {{layers: 5, hidden: 32, heads: 2, vocab: 512}}
    pretrain: {{steps: 40, batch_size: 16}}
tasks: [{TASK}, word_order]
forget_tasks: [{TASK}]
methods: [{", ".join(METHODS)}]
sizes: [24]
seeds: [0]
data: {{cap: 24}}
phases:
  finetune: {{optimizer: adamw, lr: 3.0e-3, batch_size: 8, max_epochs: 20}}
  forget: {{optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: 4}}
scoring: {{batch_size: 64, hidden_states: none}}
resources: {{cpu: 1, gpu: 0}}
"""


class TargetLog:
    """Records the targets each method hands the forget phase, epoch by epoch."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[int], list[int]]] = []

    def wrap(self, cls):
        original = cls.targets

        def recording(method, examples, epoch, rng):
            out = original(method, examples, epoch, rng)
            self.calls.append((method.name, epoch, [ex.gold for ex in examples], list(out)))
            return out

        return recording


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory):
    """One in-process trial per method, all from the same fine-tuning."""
    store = Store(tmp_path_factory.mktemp("methods") / "store")
    store.ensure()
    spec = parse_spec(SPEC)
    log = TargetLog()
    mp = pytest.MonkeyPatch()
    for cls in (RandomLabels, FlippedLabels):
        mp.setattr(cls, "targets", log.wrap(cls))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared
    try:
        for plan in spec.trials():
            TrialRunner(plan, store, models_dir_for(store)).run()
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return store, log


def milestone_accs(store: Store) -> dict[str, tuple[float, float]]:
    """method -> (forget-task train accuracy at the finetuned milestone, at the forgotten one)."""
    epochs = {(r["trial_id"], r["phase"], r["epoch"]): r for r in store.read("epochs").to_pylist()}
    out = {}
    for t in store.trials().to_pylist():
        assert t["status"] == "done", t
        ft = epochs[(t["trial_id"], "finetune", t["best_finetune_epoch"])]["forget_train_acc"]
        fg = epochs[(t["trial_id"], "forget", t["last_forget_epoch"])]["forget_train_acc"]
        out[t["method"]] = (ft, fg)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_forget_train_accuracy(forgotten, method):
    accs = milestone_accs(forgotten[0])
    ft, fg = accs[method]
    assert ft >= 0.8, f"fine-tuning did not learn the task ({ft:.2f}): nothing to forget"
    assert fg <= ft - 0.2, f"{method}: train accuracy {ft:.2f} -> {fg:.2f}"


def test_all_methods_start_from_the_same_finetuned_model(forgotten):
    accs = milestone_accs(forgotten[0])
    assert len({ft for ft, _ in accs.values()}) == 1


def test_random_labels_are_redrawn_every_epoch(forgotten):
    _, log = forgotten
    per_epoch = {e: t for name, e, _, t in log.calls if name == "random"}
    assert len(per_epoch) >= 2, "random-label forgetting ran a single epoch"
    draws = list(per_epoch.values())
    assert all(set(d) == {0, 1} for d in draws)
    assert all(a != b for i, a in enumerate(draws) for b in draws[i + 1 :])


def test_random_labels_depend_only_on_the_rng():
    exs = prepare_task(TASK, seed=1, cap=64, max_chars=2048).split("train")
    m = RandomLabels()
    a = m.targets(exs, 1, random.Random(1))
    assert a == m.targets(exs, 1, random.Random(1))  # a resumed epoch draws the same labels
    assert a != m.targets(exs, 2, random.Random(2))
    # About half the labels disagree with gold: random, not a relabelling towards either answer.
    wrong = sum(t != ex.gold for t, ex in zip(a, exs)) / len(exs)
    assert 0.25 < wrong < 0.75


def test_flipped_always_picks_the_distractor(forgotten):
    _, log = forgotten
    calls = [(g, t) for name, _, g, t in log.calls if name == "flipped"]
    assert calls
    for gold, targets in calls:
        assert targets == [1 - g for g in gold]
        assert set(gold) == {0, 1}  # both positions occur, so this is not a constant answer


def test_flipped_batches_train_on_the_distractor_text(forgotten):
    store, _ = forgotten
    plan = parse_spec(SPEC).trials()[0]
    lm = load_model(plan.model, models_dir_for(store))
    exs = prepare_task(TASK, seed=plan.data.seed, cap=8, max_chars=2048).split("train")
    targets = FlippedLabels().targets(exs, 1, random.Random(0))
    for batch in build_batches(lm.tokenizer, lm.model, exs, targets, batch_size=4, rng=random.Random(0)):
        for row, i in enumerate(batch.example_idx.tolist()):
            labels = batch.labels[row]
            trained = lm.tokenizer.decode(labels[labels != -100].tolist())
            assert trained == exs[i].continuations[exs[i].distractor]


def test_each_trials_row_records_its_methods_ratio_formula():
    assert set(METHODS) <= set(registered_methods())
    for plan in parse_spec(SPEC).trials():
        assert trial_row(plan)["ratio_formula"] == get_method(plan.method).ratio_formula, plan.method
    # Gradient ascent and NPO aim at chance, like random labels.
    assert {name: get_method(name).ratio_formula for name in ("random", "flipped", "gradient_ascent", "npo")} == {
        "random": "random",
        "flipped": "flipped",
        "gradient_ascent": "random",
        "npo": "random",
    }
    # Rows written before the column existed read it as null: flipped was then the only
    # method with another baseline.
    assert [recorded_formula(m, None) for m in ("flipped", "npo", "random")] == ["flipped", "random", "random"]
    assert recorded_formula("random", "flipped") == "flipped"  # the row, not the name, decides
    assert forget_ratio(0.9, 0.7, "random") == pytest.approx(0.5)
    assert forget_ratio(0.9, 0.7, "flipped") == pytest.approx(0.25)


def test_analyses_work_for_every_method(forgotten):
    store, _ = forgotten
    outcomes = {o.name: o for o in run_analyses(store, engine="local")}
    failed = {n: o.message for n, o in outcomes.items() if o.status == "failed"}
    assert not failed
    single = {r["method"]: r for r in outcomes["single_task"].tables["tasks"].to_pylist()}
    assert set(single) == set(METHODS)
    for method, r in single.items():
        assert r["ratio_formula"] == ("flipped" if method == "flipped" else "random")
        assert r["acc_forgotten"] < r["acc_finetuned"]
    by_method = outcomes["by_method"]
    assert by_method.status == "ok", by_method.message
    rows = {r["method"]: r for r in by_method.tables["methods"].to_pylist()}
    assert list(rows) == sorted(METHODS)  # display order: by name
    for r in rows.values():
        assert r["conf_drop_own"] > 0 and r["n_other_cells"] == 1
    assoc = outcomes["association"]
    assert assoc.status == "ok"
    assert sorted(assoc.tables["runs"]["method"].to_pylist()) == sorted(METHODS)


def test_methods_spec_validates():
    spec = parse_spec((Path(__file__).resolve().parents[1] / "specs" / "methods.yaml").read_text())
    plans = spec.trials()
    assert {p.method for p in plans} == {*METHODS, "none"}  # and the never-forgotten reference
    assert len(plans) == len(spec.forget_task_list) * (len(METHODS) + 1)
    assert len(spec.forget_task_list) >= 2 and spec.eval_task_list == spec.tasks
    # Every method sees the same data, fine-tuning and forget hyperparameters.
    assert len({(p.forget_task, p.phases.model_dump_json(), p.data.model_dump_json()) for p in plans}) == len(
        spec.forget_task_list
    )


def test_pooled_forget_ratio_is_not_ruled_by_near_chance_tasks():
    from raysweep.analysis.by_method import pooled_ratio
    from raysweep.analysis.measures import Cell

    solid = Cell("m", "npo", 10, "a", "b", acc_finetuned=0.9, acc_forgotten=0.5)
    barely = Cell("m", "npo", 10, "a", "c", acc_finetuned=0.51, acc_forgotten=0.6)
    chance = Cell("m", "npo", 10, "a", "d", acc_finetuned=0.5, acc_forgotten=0.3)
    assert barely.forget_ratio == pytest.approx(-9.0)
    assert pooled_ratio([solid, barely, chance]) == pytest.approx((0.4 - 0.09) / (0.4 + 0.01))
    assert pooled_ratio([chance]) is None
    flipped = Cell("m", "flipped", 10, "a", "a", acc_finetuned=0.8, acc_forgotten=0.5, ratio_formula="flipped")
    assert pooled_ratio([flipped]) == pytest.approx(flipped.forget_ratio)


def test_method_args_reach_their_method_and_rename_only_its_trials(tmp_path):
    default = {p.method: p for p in parse_spec(SPEC).trials()}
    tuned = {p.method: p for p in parse_spec(SPEC + "method_args: {npo: {beta: 0.3}}\n").trials()}
    assert tuned["npo"].method_args == {"beta": 0.3} and default["npo"].method_args == {"beta": 0.1}
    assert all(tuned[m].method_args == {} for m in METHODS if m != "npo")
    # Beta changes what NPO computes, so its trial is a new one; the other methods' are not.
    assert tuned["npo"].trial_id != default["npo"].trial_id
    assert all(tuned[m].trial_id == default[m].trial_id for m in METHODS if m != "npo")
    store = Store(tmp_path / "store")
    runner = TrialRunner(tuned["npo"], store, models_dir_for(store))
    runner.setup()
    assert runner.method.beta == 0.3


def test_trial_ids_from_before_method_args_are_kept():
    # The ids specs/methods.yaml expanded to when NPO's beta was a forget-phase field: a
    # store written then is resumed, not rerun, by the same spec now.
    spec = parse_spec((Path(__file__).resolve().parents[1] / "specs" / "methods.yaml").read_text())
    assert [p.trial_id for p in spec.trials() if p.method != "none"] == [
        "compare-random-n100-s0-6e3ce9f8b1",
        "compare-flipped-n100-s0-9bb97a07eb",
        "compare-gradient-ascent-n100-s0-8f664fe710",
        "compare-npo-n100-s0-a044998b43",
        "word-order-random-n100-s0-af88d924be",
        "word-order-flipped-n100-s0-816321a016",
        "word-order-gradient-ascent-n100-s0-a4362551b4",
        "word-order-npo-n100-s0-d7fdd33b3c",
        "same-word-random-n100-s0-9cbe7a60c0",
        "same-word-flipped-n100-s0-4757864a35",
        "same-word-gradient-ascent-n100-s0-3aef47703e",
        "same-word-npo-n100-s0-8d9485ac1e",
    ]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (
            "method_args: {npo: {beta: -1}}",
            "method_args.npo: argument 'beta' of method 'npo': Input should be greater than 0",
        ),
        ("method_args: {npo: {gamma: 1}}", "argument 'gamma' of method 'npo'"),
        ("method_args: {random: {beta: 1}}", "argument 'beta' of method 'random'"),
        ("methods: [random]\nmethod_args: {npo: {beta: 1}}", "method_args: 'npo' is not one of the spec's methods"),
        ("npo_beta: 0.2", "phases.forget: npo_beta is NPO's own argument now: write `method_args: {npo: {beta: 0.2}}`"),
    ],
)
def test_bad_method_args_are_one_line_naming_the_argument(extra, fragment):
    from raysweep.errors import BadInput

    text = SPEC.replace(f"methods: [{', '.join(METHODS)}]\n", "") if extra.startswith("methods:") else SPEC
    if extra.startswith("npo_beta"):  # the field where it used to be
        text, extra = text.replace("max_epochs: 4}", f"max_epochs: 4, {extra}}}"), ""
    with pytest.raises(BadInput) as exc:
        parse_spec(text + extra + "\n")
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
