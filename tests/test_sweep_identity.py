"""Trial identity and sweep versions: a trial id names everything that changes its results,
and one store runs one version of a sweep at a time, never pooling two."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysweep.analysis.context import milestones
from raysweep.spec import parse_spec
from raysweep.store import Store
from raysweep.tasks.prepare import prepare_to_folder
from scripts.reliability import kill_session
from tests.spec_helpers import tiny_spec_text

REPO = Path(__file__).resolve().parents[1]


def _prepared_root(root: Path, seed: int) -> Path:
    """Prepared folders of the tiny spec's two tasks, as `raysweep tasks prepare` writes them.
    Another preparation seed draws other distractors and another subsample: other data."""
    prepare_to_folder(["sentiment", "word_order"], root, seed=seed, cap=24, max_chars=2048)
    return root


def _with_sources(text: str, root: Path) -> str:
    return text.replace(
        "data: {cap: 24}",
        f"data: {{cap: 24, sources: {{sentiment: {root / 'sentiment'}, word_order: {root / 'word_order'}}}}}",
    )


def _ids(text: str) -> list[str]:
    return [p.trial_id for p in parse_spec(text).trials()]


def test_trial_ids_follow_the_data_content_not_its_folder(tmp_path):
    a = _prepared_root(tmp_path / "a", seed=1234)
    shutil.copytree(a, tmp_path / "moved")
    other = _prepared_root(tmp_path / "other", seed=7)
    base = tiny_spec_text(name="ids")
    at_a = _ids(_with_sources(base, a))
    assert _ids(_with_sources(base, tmp_path / "moved")) == at_a  # the same files elsewhere
    assert set(_ids(_with_sources(base, other))).isdisjoint(at_a)  # other files
    # One changed gold in an evaluation-only split is enough.
    test_file = a / "word_order" / "test.parquet"
    rows = pq.read_table(test_file).to_pylist()
    rows[0]["choice_0"], rows[0]["choice_1"] = rows[0]["choice_1"], rows[0]["choice_0"]
    rows[0]["gold"] = 1 - rows[0]["gold"]
    pq.write_table(__import__("pyarrow").Table.from_pylist(rows, schema=pq.read_schema(test_file)), test_file)
    assert set(_ids(_with_sources(base, a))).isdisjoint(at_a)


def test_trial_ids_follow_the_world_size_and_device_not_cpu_counts():
    base = tiny_spec_text(name="ids")

    def with_resources(r: str) -> list[str]:
        return _ids(base.replace("resources: {cpu: 1, gpu: 0}", f"resources: {r}"))

    one = with_resources("{cpu: 1, gpu: 0}")
    assert with_resources("{cpu: 4, gpu: 0}") == one
    assert with_resources("{cpu: 1, gpu: 0, workers: 1}") == one
    two = with_resources("{cpu: 2, gpu: 0, workers: 2}")
    assert set(two).isdisjoint(one)
    assert with_resources("{cpu: 4, gpu: 0, workers: 2}") == two
    # Data-parallel width over GPUs is the same world size, whether written as gpu or workers.
    assert with_resources("{cpu: 2, gpu: 2}") == with_resources("{cpu: 2, gpu: 2, workers: 2}")
    assert set(with_resources("{cpu: 1, gpu: 1}")).isdisjoint(one)  # CUDA kernels round otherwise


def _examples(store: Store, sweep: str, task: str) -> list[tuple]:
    t = pq.read_table(store.path("examples", sweep, f"{task}.parquet")).to_pylist()
    return sorted((r["split"], r["example_idx"], r["prompt"], r["choice_0"], r["choice_1"], r["gold"]) for r in t)


def _folder_examples(root: Path, task: str) -> list[tuple]:
    out = []
    for split in ("train", "validation", "test"):
        for r in pq.read_table(root / task / f"{split}.parquet").to_pylist():
            out.append((split, r["example_idx"], r["prompt"], r["choice_0"], r["choice_1"], r["gold"]))
    return sorted(out)


@pytest.mark.slow
def test_rerun_with_other_data_supersedes_the_trials_that_read_the_old(tmp_path, ray_cluster):
    from raysweep.analysis.context import SweepIndex
    from raysweep.sweep import run_sweep

    a = _prepared_root(tmp_path / "a", seed=1234)
    shutil.copytree(a, tmp_path / "moved")
    other = _prepared_root(tmp_path / "other", seed=7)
    base = tiny_spec_text(name="data")
    store = Store(tmp_path / "store")

    def run(root: Path):
        text = _with_sources(base, root)
        return run_sweep(parse_spec(text), text, store, dashboard=False), _ids(text)

    first, (old_id,) = run(a)
    assert first.done == 1 and not first.failed
    moved, _ = run(tmp_path / "moved")
    assert moved.already_done == 1 and moved.done == 0  # same examples: nothing to redo

    again, (new_id,) = run(other)
    assert new_id != old_id
    assert again.done == 1 and again.already_done == 0 and not again.failed
    rows = {r["trial_id"]: r["status"] for r in store.trials("data").to_pylist()}
    assert rows == {old_id: "superseded", new_id: "done"}
    # The examples table is the new data's, and only the trial that read it is analysed.
    for task in ("sentiment", "word_order"):
        assert _examples(store, "data", task) == _folder_examples(other, task)
        assert _examples(store, "data", task) != _folder_examples(a, task)
    assert [t.trial_id for t in SweepIndex.build(store, None).trials] == [new_id]


def test_a_trial_never_writes_its_status_over_superseded(tmp_path):
    from raysweep.sweep import models_dir_for
    from raysweep.trial import TrialRunner, trial_row

    spec = parse_spec(tiny_spec_text(name="sup"))
    (plan,) = spec.trials()
    store = Store(tmp_path / "store")
    store.ensure()
    store.write_trial_row({**trial_row(plan), "status": "superseded", "attempts": 1})
    with pytest.raises(RuntimeError, match="superseded by another version"):
        TrialRunner(plan, store, models_dir_for(store)).run()
    row = store.read_trial_row("sup", plan.trial_id)
    assert row["status"] == "superseded" and row["attempts"] == 1
    assert not store.committed_epochs("sup", plan.trial_id)  # it stopped before its first epoch


def test_analyses_read_only_the_current_version(tmp_path):
    """Even a trial row that says done is left out once the sweep's current plan lacks it
    (a worker of a killed driver may still finish after the next version took over)."""
    from raysweep.trial import trial_row

    spec = parse_spec(tiny_spec_text(name="cur", forget_tasks=("sentiment", "word_order")))
    old, new = spec.trials()
    store = Store(tmp_path / "store")
    store.ensure()
    for plan in (old, new):
        store.write_trial_row(
            {**trial_row(plan), "status": "done", "attempts": 1, "best_finetune_epoch": 1, "last_forget_epoch": 1}
        )
    assert set(milestones(store, "cur").column("trial_id").to_pylist()) == {old.trial_id, new.trial_id}
    store.write_plan("cur", "v2", [new.trial_id])
    assert set(milestones(store, "cur").column("trial_id").to_pylist()) == {new.trial_id}


def _cli(*args: str) -> subprocess.Popen:
    # Its own session: the local Ray cluster a driver starts stays in it (see kill_session).
    return subprocess.Popen(
        [sys.executable, "-m", "raysweep.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        start_new_session=True,
    )


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.slow
def test_a_second_driver_of_another_version_refuses_while_the_first_runs(tmp_path):
    from raysweep.analysis.context import SweepIndex

    store = tmp_path / "store"
    base = tiny_spec_text(name="ver")
    v1 = tmp_path / "v1.yaml"
    # A fine-tuning rate too small to ever reach the stop accuracy: the first driver is still
    # running its only trial for minutes, whatever the machine's speed.
    v1.write_text(
        base.replace("lr: 2.0e-3, batch_size: 8, max_epochs: 2}", "lr: 1.0e-9, batch_size: 8, max_epochs: 500}", 1)
    )
    v2 = tmp_path / "v2.yaml"
    v2.write_text(base.replace("forget: {optimizer: adamw, lr: 2.0e-3", "forget: {optimizer: adamw, lr: 3.0e-3"))
    (v1_id,), (v2_id,) = _ids(v1.read_text()), _ids(v2.read_text())
    first = _cli("run", str(v1), "--store", str(store), "--no-dashboard")
    try:
        lock = store / "sweeps" / "ver" / "driver.lock"
        commits = store / "commits" / "ver" / v1_id / "finetune"
        deadline = time.time() + 240
        while not (commits.is_dir() and any(commits.iterdir())):
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first driver never got its trial going"
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid

        other = _cli("run", str(v2), "--store", str(store), "--no-dashboard")
        out, err = other.communicate(timeout=120)
        assert other.returncode == 2, (out, err)
        line = _one_line(err)
        assert "'ver'" in line and "another version of this sweep is running" in line and f"pid {first.pid}" in line
        same = _cli("run", str(v1), "--store", str(store), "--no-dashboard")
        out, err = same.communicate(timeout=120)
        assert same.returncode == 2 and "this same version is already being run" in _one_line(err), (out, err)
        assert first.poll() is None, "the refusals must not have stopped the first driver"
        # Nothing of the second version was written while the first ran.
        assert sorted(p.name for p in (store / "trials" / "ver").iterdir()) == [f"{v1_id}.parquet"]
        assert Store(store).current_plan("ver")["trial_ids"] == [v1_id]
    finally:
        # A crash of the first driver and its cluster: the kernel drops its lock.
        kill_session(first.pid)
        first.wait()

    later = _cli("run", str(v2), "--store", str(store), "--no-dashboard")
    out, err = later.communicate(timeout=600)
    assert later.returncode == 0, err[-2000:]
    st = Store(store)
    assert {r["trial_id"]: r["status"] for r in st.trials("ver").to_pylist()} == {v1_id: "superseded", v2_id: "done"}
    assert [t.trial_id for t in SweepIndex.build(st, None).trials] == [v2_id]
