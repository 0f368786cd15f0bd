"""Reliability defects found by a hostile pass over the CLI: each test sets up the condition
for real and fails on the code before its fix."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from scripts.reliability import kill_session

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_default_run_starts_its_own_cluster_despite_a_recorded_ray_start_cluster():
    # `ray start` records its address in <ray temp dir>/ray_current_cluster and a plain
    # ray.init() joins whatever that file names, even after the cluster died. RAY_TMPDIR moves
    # Ray's temp dir to one of our own, so the stale record cannot touch anyone else's cluster.
    # A short path: Ray's unix sockets live under it and socket paths are capped near 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="rsd", dir="/tmp"))
    try:
        (tmp / "ray").mkdir()
        dead = f"127.0.0.1:{_closed_port()}"
        (tmp / "ray" / "ray_current_cluster").write_text(dead)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="disabled")
        code = (
            "import ray\n"
            "from raysweep.sweep import _init_ray\n"
            "_init_ray(None, False)\n"
            "print('GCS', ray.get_runtime_context().gcs_address)\n"
            "ray.shutdown()\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        gcs = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("GCS "))
        assert gcs != dead
        # The new cluster's session lives in our temp dir: it was started here, not joined.
        assert list((tmp / "ray").glob("session_*")), list((tmp / "ray").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_joining_happens_only_with_an_address(monkeypatch):
    import ray

    import raysweep.sweep as sweep

    calls = []

    class Ctx:
        dashboard_url = None

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or Ctx())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sweep._init_ray(None, False)
    sweep._init_ray("10.0.0.1:6379", False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    sweep._init_ray(None, False)
    assert [c["address"] for c in calls] == ["local", "10.0.0.1:6379", "10.0.0.2:6379"]
    assert "num_cpus" in calls[0] and "num_cpus" not in calls[1]


def test_dry_run_of_a_large_plan_lists_every_trial_as_plain_lines(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import raysweep.cli as cli
    from raysweep.spec import load_spec

    spec = tmp_path / "seeds.yaml"
    spec.write_text("name: s\nmodels: [{name: m, arch: gpt2}]\ntasks: [sentiment]\nseeds: [0, 1, 2, 3, 4]\n")
    # A rich table costs about a millisecond a row, minutes for 100,000 trials; past the cap
    # the plan is tab-separated lines (the cap lowered here so that five trials cross it).
    monkeypatch.setattr(cli, "DRY_RUN_TABLE_MAX", 3)
    r = CliRunner().invoke(cli.app, ["run", str(spec), "--store", str(tmp_path / "st"), "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "s: 5 trials"
    assert lines[1].split("\t")[:6] == ["trial_id", "model", "forget task", "method", "n", "seed"]
    rows = [line.split("\t") for line in lines[2:]]
    assert [row[0] for row in rows] == [p.trial_id for p in load_spec(spec).trials()]
    assert [row[5] for row in rows] == ["0", "1", "2", "3", "4"]
    assert not (tmp_path / "st").exists()
    # Under the cap it stays a table.
    monkeypatch.setattr(cli, "DRY_RUN_TABLE_MAX", 500)
    r = CliRunner().invoke(cli.app, ["run", str(spec), "--store", str(tmp_path / "st"), "--dry-run"])
    assert r.exit_code == 0 and "┃ trial_id" in r.stdout and "\t" not in r.stdout


def _statuses(store: Path) -> dict[str, tuple[str, str | None]]:
    import pyarrow.parquet as pq

    rows = [pq.read_table(f).to_pylist()[0] for f in sorted((store / "trials" / "sig").glob("*.parquet"))]
    return {r["trial_id"]: (r["status"], r["error"]) for r in rows}


@pytest.mark.slow
def test_sigterm_and_sigint_stop_the_driver_mark_trials_interrupted_and_a_rerun_completes(tmp_path):
    from tests.spec_helpers import tiny_spec_text

    # Budgets that run out (no early stop), so each trial is mid-way when the signal comes.
    text = tiny_spec_text(name="sig", forget_tasks=("sentiment", "word_order"), ft_epochs=5, fg_epochs=4)
    text = text.replace("max_epochs: 5}", "max_epochs: 5, stop_train_acc: 1.0}").replace(
        "max_epochs: 4}", "max_epochs: 4, stop_test_acc: 0.01}"
    )
    spec = tmp_path / "sig.yaml"
    spec.write_text(text)
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "raysweep.cli", "run", str(spec), "--store", str(store), "--no-dashboard"]

    def commits() -> dict[str, int]:
        base = store / "commits" / "sig"
        return (
            {d.name: sum(1 for _ in d.rglob("e*.json")) for d in base.iterdir() if d.is_dir()} if base.is_dir() else {}
        )

    for sig in (signal.SIGTERM, signal.SIGINT):
        start = sum(commits().values())
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            deadline = time.time() + 300

            def ready() -> bool:
                now = commits()
                # The first signal waits for both trials to have started: one Tune had not yet
                # scheduled is rightly still "pending" afterwards, not "interrupted".
                return sum(now.values()) >= start + 3 and (
                    sig != signal.SIGTERM or (len(now) == 2 and min(now.values()) >= 1)
                )

            while not ready():
                assert proc.poll() is None, proc.communicate()
                assert time.time() < deadline
                time.sleep(0.1)
            os.kill(proc.pid, sig)
            t0 = time.time()
            out, err = proc.communicate(timeout=90)
            stopped_in = time.time() - t0
        finally:
            kill_session(proc.pid)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 1, (sig, proc.returncode, err[-3000:])
        assert stopped_in < 60, stopped_in
        last = [ln for ln in err.strip().splitlines() if ln.strip()][-1]
        assert (
            last.startswith(f"interrupted by {sig.name}: 0/2 trials done, ")
            and "run the same command again to resume" in last
        ), err[-3000:]
        states = _statuses(store)
        assert {s for s, _ in states.values()} == {"interrupted"}, states
        # A trial that had not started again before the second signal keeps the first reason.
        assert all(e.startswith(("interrupted by SIGTERM", "interrupted by SIGINT")) for _, e in states.values()), (
            states
        )
        assert any(e.startswith(f"interrupted by {sig.name}") for _, e in states.values()), states

    status = subprocess.run(
        [sys.executable, "-m", "raysweep.cli", "status", "--store", str(store)],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert status.returncode == 0 and "0/2 trials done" in status.stdout
    assert status.stderr.count("interrupted") >= 2

    rerun = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=600, start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {s for s, _ in _statuses(store).values()} == {"done"}
    import pyarrow.dataset as ds

    scores = ds.dataset(str(store / "scores" / "sig"), format="parquet").to_table(
        columns=["trial_id", "phase", "epoch", "eval_task", "split", "example_idx"]
    )
    keys = list(zip(*(scores[c].to_pylist() for c in scores.column_names)))
    assert len(keys) == len(set(keys)), "an interrupted epoch's rows were written twice"
    assert {(k[1], k[2]) for k in keys} >= {("finetune", 5), ("forget", 4)}
