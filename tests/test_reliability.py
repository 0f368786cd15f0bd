"""A sweep survives killed workers, a killed driver, failing trials and corrupt files, and
loses nothing: every store below is compared with the store of an uninterrupted run of the
same spec, row for row (scripts/reliability.py `compare_stores`: no score row lost,
duplicated or extra; identical confidences, hidden states, epoch summaries, milestones).

The faults are real. A worker is killed with SIGKILL by the test hook RAYSWEEP_FAULT
(raysweep/faults.py: the trial process sends SIGKILL to itself at a given epoch, on its
first attempt); the driver, a `raysweep run` subprocess, is killed with SIGKILL from here.
"""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from raysweep.cli import app
from raysweep.faults import Fault, parse_faults
from raysweep.spec import parse_spec
from raysweep.store import EpochKey, EpochRecord, Store
from scripts.reliability import (
    commit_count,
    compare_stores,
    data_files,
    fault_log,
    raysweep,
    run_and_kill_driver,
    snapshot,
)
from tests.spec_helpers import tiny_spec_text

SPEC = tiny_spec_text(name="rel", forget_tasks=("sentiment", "word_order"), ft_epochs=2, fg_epochs=2, max_failures=1)


def _run(spec, store, env=None):
    return raysweep("run", str(spec), "--store", str(store), "--no-dashboard", env=env, timeout=600)


def _trials(store):
    return {r["trial_id"].split("-random")[0]: r for r in Store(store).trials("rel").to_pylist()}


def _assert_same_as_reference(store, reference):
    cmp = compare_stores(store, reference)
    assert cmp["lost"] == 0 and cmp["duplicated"] == 0 and cmp["extra"] == 0, cmp
    assert cmp["ok"], cmp
    return cmp


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("reliability")
    spec = work / "rel.yaml"
    spec.write_text(SPEC)
    store = work / "reference"
    r = _run(spec, store)
    assert r.returncode == 0, r.stderr[-3000:]
    return spec, store


# ---- fast: no cluster -----------------------------------------------------------------------


def test_fault_hook_parses_and_refuses_nonsense():
    (f,) = parse_faults("action=kill,phase=finetune,epoch=2,point=commit,trial=sentiment")
    assert f == Fault("kill", "finetune", 2, "commit", "sentiment", 1)
    assert f.matches("sentiment-random-x", 1, "finetune", 2, "commit") and not f.matches(
        "sentiment-random-x", 2, "finetune", 2, "commit"
    )
    (g,) = parse_faults("action=oom,phase=forget,epoch=1,attempt=*")
    assert g.attempt is None and g.point == "resume" and g.matches("any", 7, "forget", 1, "resume")
    for bad in (
        "action=explode,phase=forget,epoch=1",
        "phase=forget,epoch=1",
        "action=kill,phase=forget",
        "action=kill,phase=forget,epoch=1,when=now",
        "kill",
    ):
        with pytest.raises(ValueError, match="RAYSWEEP_FAULT"):
            parse_faults(bad)
    assert parse_faults("") == [] and parse_faults(None) == []


def test_best_weights_land_before_the_resume_point_that_names_them(tmp_path, monkeypatch):
    """A resume point saying "best epoch 3" must never be on disk before epoch 3's weights,
    else a crash between the two writes resumes forgetting from the wrong model."""
    import raysweep.resume as resume
    from raysweep.resume import Progress
    from raysweep.sweep import models_dir_for
    from raysweep.trial import TrialRunner

    store = Store(tmp_path / "store")
    runner = TrialRunner(parse_spec(SPEC).trials()[0], store, models_dir_for(store))
    order = []
    monkeypatch.setattr(
        resume, "atomic_torch_save", lambda obj, path: (order.append(path.name), path.write_bytes(b"x"))
    )
    model = torch.nn.Linear(2, 2)
    runner.resume.save(Progress(phase="finetune", epoch=3, best_epoch=3), model, None, {"w": 1})
    assert order == ["best_finetune-e0003.pt", "latest.pt"]
    runner.resume.save(Progress(phase="finetune", epoch=4, best_epoch=4), model, None, {"w": 2})
    assert sorted(p.name for p in runner.ckpt_dir.glob("best_*")) == ["best_finetune-e0004.pt"]  # older best pruned
    runner.resume.save(Progress(phase="finetune", epoch=5, best_epoch=4, phase_done=True), model, None, None)
    assert not list(runner.ckpt_dir.glob("best_*"))  # latest.pt holds the best weights from here on


def test_interrupted_trial_resumes_drops_stale_epochs_and_temp_files(tmp_path):
    """In-process: a trial fails right after committing forget epoch 1 (before its resume
    point), then an earlier attempt's leftovers are planted: a committed epoch beyond where
    forgetting will stop and an orphaned temporary file. The second attempt recomputes forget
    epoch 1, stops where the spec says, and leaves only the real trajectory."""
    from raysweep.faults import InjectedFault
    from raysweep.sweep import models_dir_for
    from raysweep.trial import TrialRunner

    text = tiny_spec_text(name="rel", ft_epochs=1, fg_epochs=2).replace(
        "max_epochs: 2}", "max_epochs: 2, stop_test_acc: 0.01}", 1
    )
    plan = parse_spec(text).trials()[0]
    store = Store(tmp_path / "store")
    store.ensure()
    fault = "action=raise,phase=forget,epoch=1,point=commit"
    with pytest.raises(InjectedFault):
        TrialRunner(plan, store, models_dir_for(store), faults=fault).run(attempt=1)
    assert _trials_in(store)[plan.trial_id]["status"] == "failed"
    first = pq.read_table(store.path("scores", "rel", plan.trial_id, "forget", "e0001.parquet"))

    stale = EpochKey("rel", plan.trial_id, "forget", 9)
    store.commit_epoch(
        EpochRecord(stale, first, pq.read_table(store.path("epochs", "rel", plan.trial_id, "forget", "e0001.parquet")))
    )
    orphan = store.path("scores", "rel", plan.trial_id, "forget", "_e0002.parquet.tmp-deadbeef")
    orphan.write_bytes(b"half a file")

    progress = TrialRunner(plan, store, models_dir_for(store), faults=fault).run(
        attempt=2
    )  # attempt 2: the fault stays quiet
    assert progress.last_forget_epoch == 2
    assert store.committed_epochs("rel", plan.trial_id) == {"pretrained": [0], "finetune": [1], "forget": [1, 2]}
    assert (
        not store.is_committed(stale)
        and not store.path("scores", f"{stale.rel}.parquet").exists()
        and not orphan.exists()
    )
    again = pq.read_table(store.path("scores", "rel", plan.trial_id, "forget", "e0001.parquet"))
    assert again.column("confidence").equals(first.column("confidence"))  # recomputed, same rows
    row = _trials_in(store)[plan.trial_id]
    assert row["status"] == "done" and row["attempts"] == 2
    log = [
        json.loads(line)
        for line in (store.path("checkpoints", "rel", plan.trial_id, "faults.log")).read_text().splitlines()
    ]
    assert [(f["attempt"], f["action"], f["phase"], f["epoch"]) for f in log] == [(1, "raise", "forget", 1)]


def test_a_trial_runs_in_one_process_at_a_time(tmp_path):
    """A second process on the same trial (a dead driver's worker still finishing its epoch,
    or a second `raysweep run` on the same store) waits for the first, then gives up without
    touching the trial's status row, which belongs to the process that holds the lock."""
    import fcntl

    from raysweep.sweep import models_dir_for
    from raysweep.trial import TrialRunner

    store = Store(tmp_path / "store")
    store.ensure()
    runner = TrialRunner(parse_spec(SPEC).trials()[0], store, models_dir_for(store))
    runner.resume.lock_timeout = 1.0
    runner.ckpt_dir.mkdir(parents=True)
    store.write_trial_row(
        {"sweep": runner.plan.sweep, "trial_id": runner.plan.trial_id, "status": "running", "attempts": 1}
    )
    with open(runner.ckpt_dir / "lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="being run by another process"):
            runner.run(attempt=2)
    row = _trials_in(store)[runner.plan.trial_id]
    assert row["status"] == "running" and row["attempts"] == 1 and row["error"] is None


def _trials_in(store):
    return {r["trial_id"]: r for r in store.trials().to_pylist()}


# ---- slow: real sweeps through the command line --------------------------------------------


@pytest.mark.slow
def test_finished_sweep_rerun_does_nothing_and_says_so(reference):
    spec, store = reference
    before = snapshot(store)
    r = _run(spec, store)
    assert r.returncode == 0 and "nothing to do" in r.stdout and "0 trials ran, 2 were already complete" in r.stdout
    assert snapshot(store) == before


@pytest.mark.slow
def test_worker_sigkill_is_retried_and_resumed_and_a_raising_trial_fails_alone(reference, tmp_path):
    spec, ref = reference
    store = tmp_path / "store"
    faults = (
        # SIGKILL right after finetune epoch 2 is committed, before its resume point: the retry
        # resumes from epoch 1 (weights + AdamW state) and recomputes epoch 2, replacing its files.
        "action=kill,phase=finetune,epoch=2,point=commit,trial=sentiment;"
        # A simulated CUDA OOM in the other trial, on every attempt.
        "action=oom,phase=forget,epoch=1,point=commit,trial=word-order,attempt=*"
    )
    r = _run(spec, store, env={"RAYSWEEP_FAULT": faults})
    assert r.returncode == 1, r.stderr[-3000:]
    rows = _trials(store)
    assert rows["sentiment"]["status"] == "done" and rows["sentiment"]["attempts"] == 2
    assert rows["word-order"]["status"] == "failed" and rows["word-order"]["attempts"] == 2
    assert rows["word-order"]["error"].startswith("OutOfMemoryError: injected by RAYSWEEP_FAULT")
    assert "failed word-order-random" in r.stderr and "OutOfMemoryError" in r.stderr

    fired = fault_log(store)
    kills = [f for f in fired if f["action"] == "kill"]
    assert [(f["attempt"], f["phase"], f["epoch"]) for f in kills] == [(1, "finetune", 2)]
    sentiment_dir = next(store.glob("checkpoints/rel/sentiment-*"))
    # SIGKILL leaves no Python traceback behind (error-N.txt is written by the exception
    # handler); Ray Tune saw the very worker process the hook logged die under it.
    assert not list(sentiment_dir.glob("error-*.txt"))
    tune_error = next(store.glob("ray/*/sentiment-*/error.txt")).read_text()
    assert "actor died unexpectedly" in tune_error and f"pid: {kills[0]['pid']}" in tune_error
    assert sorted(f["attempt"] for f in fired if f["action"] == "oom") == [1, 2]

    status = CliRunner().invoke(app, ["status", "--store", str(store)])
    assert (
        status.exit_code == 0 and "OutOfMemoryError: injected" in status.stderr and "1/2 trials done" in status.stdout
    )

    # Every row written so far is right; a plain rerun finishes the failed trial from its
    # last resume point (the end of fine-tuning) and the store equals the reference.
    cmp = compare_stores(store, ref)
    # Missing are exactly the reference's rows past the failed trial's last commit (forget
    # epoch 1 commits, then raises, on every attempt); nothing else differs.
    ref_scores = Store(ref).read("scores").to_pylist()
    after_failure = sum(
        r["trial_id"].startswith("word-order") and r["phase"] == "forget" and r["epoch"] >= 2 for r in ref_scores
    )
    assert (
        cmp["lost"] == after_failure
        and cmp["duplicated"] == 0
        and cmp["extra"] == 0
        and cmp["max_confidence_diff"] == 0.0
    ), cmp
    again = _run(spec, store)
    assert again.returncode == 0 and "2 trials, 1 to run" in again.stdout, again.stderr[-3000:]
    _assert_same_as_reference(store, ref)
    assert _trials(store)["word-order"]["attempts"] == 3


@pytest.mark.slow
def test_driver_sigkill_mid_sweep_then_restart_completes_exactly_once(reference, tmp_path):
    spec, ref = reference
    total = commit_count(ref)
    store = tmp_path / "store"
    kill = run_and_kill_driver(spec, store, after_commits=3)
    assert kill["killed"] and 3 <= kill["commits_at_kill"] < total, kill
    trial_rows = Store(store).trials("rel").to_pylist()
    assert trial_rows and not all(t["status"] == "done" for t in trial_rows)
    r = _run(spec, store)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 trials, " in r.stdout and "0 failed" in r.stdout
    _assert_same_as_reference(store, ref)
    assert kill["left_running"] == 0  # what the dead driver left behind was cleaned up


@pytest.mark.slow
def test_corrupt_files_are_named_refused_quarantined_and_recomputed(reference, tmp_path):
    spec, ref = reference
    store = tmp_path / "store"
    shutil.copytree(ref, store, ignore=shutil.ignore_patterns("ray"))
    victim = next(p for p in data_files(store, "scores") if "/sentiment-" in str(p) and "/finetune/" in str(p))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    garbage = next(p for p in data_files(store, "epochs") if "/sentiment-" in str(p) and "/forget/" in str(p))
    garbage.write_bytes(b"PAR1" + bytes(range(200)))
    cli = CliRunner()

    for args in (["status", "--store", str(store)], ["analyze", "--store", str(store), "--engine", "local"]):
        r = cli.invoke(app, args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert str(victim) in r.stderr and str(garbage) in r.stderr and "refusing" in r.stderr
        assert "trials done" not in r.stdout and not (store / "analysis").exists()

    r = cli.invoke(app, ["repair", "--store", str(store)])
    assert r.exit_code == 0 and "2 file(s) quarantined" in r.stdout
    assert {p.name for p in (store / "quarantine").rglob("*.parquet")} == {victim.name, garbage.name}
    status = cli.invoke(app, ["status", "--store", str(store)])
    assert status.exit_code == 0 and "1/2 trials done" in status.stdout

    again = _run(spec, store)
    assert again.returncode == 0 and "2 trials, 1 to run" in again.stdout, again.stderr[-3000:]
    _assert_same_as_reference(store, ref)


def test_a_driver_leaves_a_trial_another_live_process_holds_to_it(tmp_path):
    """A second driver on the same sweep gives up waiting for a trial the first is running:
    its end-of-sweep accounting must not mark that trial failed under the first's feet."""
    import fcntl

    from raysweep.sweep import SweepOutcome, _account

    store = Store(tmp_path / "store")
    store.ensure()
    plan = parse_spec(SPEC).trials()[0]
    row = {"sweep": plan.sweep, "trial_id": plan.trial_id, "status": "running", "attempts": 1}
    store.write_trial_row(row)
    lock = store.path("checkpoints", plan.sweep, plan.trial_id, "lock")
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first driver's trial, alive
        outcome = SweepOutcome(sweep=plan.sweep, total=1, already_done=0)
        _account(store, plan.sweep, [plan], outcome)
        assert _trials_in(store)[plan.trial_id]["status"] == "running"
        assert "another process" in outcome.failed[plan.trial_id] and outcome.exit_code == 1
    # Once nobody holds it, a trial left `running` did not finish: it is marked failed.
    outcome = SweepOutcome(sweep=plan.sweep, total=1, already_done=0)
    _account(store, plan.sweep, [plan], outcome)
    assert _trials_in(store)[plan.trial_id]["status"] == "failed"
