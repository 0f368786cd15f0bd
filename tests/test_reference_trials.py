"""`methods: [none]`: a reference trial that fine-tunes as every forget run does and never
forgets, and the forget quality measured against it."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
import torch

from raysweep.analysis import run_analyses
from raysweep.spec import parse_spec
from raysweep.store import Store
from raysweep.sweep import models_dir_for
from raysweep.trial import TrialRunner
from tests.spec_helpers import tiny_spec_text

SPEC = tiny_spec_text(name="reference", methods=("random", "none"), ft_epochs=6, fg_epochs=3, relearn=True)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("reference") / "store")
    store.ensure()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plans = {p.method: p for p in parse_spec(SPEC).trials()}
        for plan in plans.values():
            TrialRunner(plan, store, models_dir_for(store)).run()
    finally:
        torch.set_num_threads(threads)
    return store, plans


def test_a_none_trial_fine_tunes_like_the_forget_run_and_stops_there(swept):
    store, plans = swept
    rows = {r["method"]: r for r in store.trials().to_pylist()}
    ref, run = rows["none"], rows["random"]
    assert ref["status"] == "done" and ref["last_forget_epoch"] is None and ref["last_relearn_epoch"] is None
    assert ref["best_finetune_epoch"] == run["best_finetune_epoch"] is not None
    scores = store.read("scores")
    phases = {
        m: set(scores.filter(pc.equal(scores["trial_id"], plans[m].trial_id))["phase"].to_pylist()) for m in plans
    }
    assert phases == {"none": {"pretrained", "finetune"}, "random": {"pretrained", "finetune", "forget", "relearn"}}

    # Same seed, same fine-tuning: every fine-tuning score of the two trials is the same.
    def finetuned(method):
        t = scores.filter(pc.equal(scores["trial_id"], plans[method].trial_id))
        t = t.filter(pc.equal(t["phase"], "finetune")).drop(["trial_id"])
        return t.sort_by([(c, "ascending") for c in ("epoch", "eval_task", "split", "example_idx")])

    assert finetuned("none").equals(finetuned("random"))


def test_forget_quality_against_the_never_forgotten_reference(swept):
    store, plans = swept
    out = {o.name: o for o in run_analyses(store, engine="local")}
    assert not {n: o.message for n, o in out.items() if o.status == "failed"}
    # The reference is no forget run: the forgetting analyses leave it out.
    assert {r["method"] for r in out["single_task"].tables["tasks"].to_pylist()} == {"random"}
    quality = {(r["milestone"], r["reference"]): r for r in out["membership"].tables["forget_quality"].to_pylist()}
    assert set(quality) == {(m, ref) for m in ("finetuned", "forgotten") for ref in ("pretrained", "none")}
    assert {r["trial_id"] for r in quality.values()} == {plans["random"].trial_id}
    # At the finetuned milestone the forget run is the reference: identical confidences.
    same = quality[("finetuned", "none")]
    assert same["ks_statistic"] == 0 and same["forget_quality"] == 1 and same["n"] == 24
    # Forgetting moved them away from it.
    assert quality[("forgotten", "none")]["ks_statistic"] > 0
    assert quality[("forgotten", "none")]["forget_quality"] < 1


def test_none_is_a_registered_method_the_spec_accepts_alone():
    plans = parse_spec(SPEC.replace("methods: [random, none]", "methods: [none]")).trials()
    assert [p.method for p in plans] == ["none"] and plans[0].method_args == {}


def test_the_plan_counts_no_forget_phase_for_a_reference(swept):
    from raysweep.planning import plan_sweep

    store, _ = swept
    cost = plan_sweep(parse_spec(SPEC), store, gpu="h100").cost
    by_method = {t.plan.method: t for t in cost.trials}
    assert "forget" not in by_method["none"].epochs["upper"] and "forget" in by_method["random"].epochs["upper"]
    assert cost.total("rows", "expected") == store.read("scores").num_rows
