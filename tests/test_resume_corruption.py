"""Damaged resume points and commit markers: a trial falls back past them, says so, and
ends with the store an uninterrupted run writes; `status` and `repair` see them.

Real trials of the built-in micro model, run in this process; every damaged store is
compared row for row with the store of an uninterrupted run of the same plan
(scripts/reliability.py `compare_stores`).
"""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from raysweep.cli import app
from raysweep.faults import InjectedFault
from raysweep.integrity import torch_file_problem, verify
from raysweep.spec import parse_spec
from raysweep.store import Store
from raysweep.sweep import models_dir_for
from raysweep.trial import TrialRunner
from scripts.reliability import compare_stores, damage_tensor_bytes
from tests.spec_helpers import tiny_spec_text

# Fine-tuning runs its 2 epochs (a train accuracy of 1.0 is out of reach), then one epoch of
# forgetting: an interruption after fine-tuning epoch 1 leaves a resume point and the best
# epoch's weights (epoch 1 is the best so far).
SPEC = tiny_spec_text(name="rc", ft_epochs=2, fg_epochs=1).replace(
    "max_epochs: 2}", "max_epochs: 2, stop_train_acc: 1.0}", 1
)
STOP_MID_FINETUNE = "action=raise,phase=finetune,epoch=1,point=resume"


def _plan():
    return parse_spec(SPEC).trials()[0]


def _run(store: Store, attempt: int = 1, faults: str = ""):
    return TrialRunner(_plan(), store, models_dir_for(store), faults=faults).run(attempt=attempt)


def _new_store(path) -> Store:
    store = Store(path)
    store.ensure()
    return store


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = _new_store(tmp_path_factory.mktemp("resume-corruption") / "reference")
    _run(store)
    return store


def _interrupted(tmp_path) -> tuple[Store, TrialRunner]:
    """A trial stopped by an error right after its fine-tuning epoch 2 resume point."""
    store = _new_store(tmp_path / "store")
    with pytest.raises(InjectedFault):
        _run(store, faults=STOP_MID_FINETUNE)
    return store, TrialRunner(_plan(), store, models_dir_for(store))


def _assert_equals_reference(store: Store, reference: Store) -> None:
    cmp = compare_stores(store.root, reference.root)
    assert cmp["lost"] == 0 and cmp["duplicated"] == 0 and cmp["extra"] == 0, cmp
    assert cmp["ok"], cmp


def _restarts(runner: TrialRunner) -> str:
    log = runner.ckpt_dir / "restarts.log"
    return log.read_text() if log.exists() else ""


def test_a_truncated_best_finetune_file_restarts_the_trial_and_says_so(tmp_path, reference):
    store, runner = _interrupted(tmp_path)
    (best,) = runner.ckpt_dir.glob("best_finetune-e*.pt")
    data = best.read_bytes()
    best.write_bytes(data[: len(data) // 2])

    _run(store, attempt=2)
    log = _restarts(runner)
    assert str(best) in log and "restarting it from the pretrained model" in log, log
    _assert_equals_reference(store, reference)


def test_damaged_weights_in_a_resume_point_are_never_trained_from(tmp_path, reference):
    store, runner = _interrupted(tmp_path)
    latest = runner.ckpt_dir / "latest.pt"
    damage_tensor_bytes(latest)
    # torch would load this file without a word; only the CRC of its members tells.
    assert torch_file_problem(latest) is None
    assert "CRC" in torch_file_problem(latest, deep=True)

    _run(store, attempt=2)
    _assert_equals_reference(store, reference)
    log = _restarts(runner)
    assert str(latest) in log and "CRC" in log, log


def test_an_empty_commit_marker_counts_as_uncommitted_and_is_recomputed(tmp_path, reference):
    store, runner = _interrupted(tmp_path)
    (best,) = runner.ckpt_dir.glob("best_finetune-e*.pt")
    marker = store.path("commits", "rc", runner.plan.trial_id, "finetune", f"e{int(best.stem.split('-e')[1]):04d}.json")
    marker.write_bytes(b"")
    assert (marker, "commit marker is empty") in verify(store)

    _run(store, attempt=2)
    log = _restarts(runner)
    assert f"{marker}: commit marker is empty" in log and "past uncommitted epoch" in log, log
    _assert_equals_reference(store, reference)
    assert verify(store, deep=True) == []


def test_status_and_repair_see_damaged_resume_files_and_markers(tmp_path, reference):
    root = tmp_path / "store"
    shutil.copytree(reference.root, root)
    store = Store(root)
    trial_dir = store.path("checkpoints", "rc", _plan().trial_id)
    latest = trial_dir / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    marker = store.path("commits", "rc", _plan().trial_id, "forget", "e0001.json")
    marker.write_bytes(b'{"trial_id": "rc')  # cut mid-write
    cli = CliRunner()

    status = cli.invoke(app, ["status", "--store", str(root)])
    assert status.exit_code == 2, (status.stdout, status.stderr)
    assert f"corrupt {latest}" in status.stderr and f"corrupt {marker}" in status.stderr

    repair = cli.invoke(app, ["repair", "--store", str(root)])
    assert repair.exit_code == 0 and "2 file(s) quarantined" in repair.stdout, repair.stdout
    assert (root / "quarantine" / "commits" / "rc" / _plan().trial_id / "forget" / "e0001.json").exists()
    assert cli.invoke(app, ["status", "--store", str(root)]).exit_code == 0
    assert store.trials().to_pylist()[0]["status"] == "pending"  # reopened: it lost an epoch

    _run(store, attempt=2)
    _assert_equals_reference(store, reference)
