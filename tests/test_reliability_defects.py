"""Reliability defects found by a hostile pass over the CLI: each test sets up the condition
for real and fails on the code before its fix."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO, env=env,
                           start_new_session=True)
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
