"""Sweeps through a real Ray Tune run: in-process and through the `raysweep` command."""

import json
import os
import subprocess
import sys

import pyarrow.compute as pc
import pytest

from raysweep.spec import parse_spec
from raysweep.store import Store
from raysweep.sweep import run_sweep
from tests.spec_helpers import tiny_spec_text

pytestmark = pytest.mark.slow


def test_two_trials_run_concurrently_under_tune_and_rerun_is_a_no_op(tmp_path, ray_cluster):
    text = tiny_spec_text(name="pair", forget_tasks=("sentiment", "word_order"))
    spec = parse_spec(text)
    store = Store(tmp_path / "store")
    snapshots = []
    outcome = run_sweep(
        spec, text, store, sink=lambda views: snapshots.append({k: (v.status, v.phase) for k, v in views.items()})
    )
    assert outcome.exit_code == 0 and outcome.done == 2 and not outcome.failed
    # Both trials were seen running at the same time (1 CPU each on a 2-CPU cluster).
    assert any(sum(s == "running" for s, _ in snap.values()) == 2 for snap in snapshots)
    trials = store.trials("pair").to_pylist()
    assert {t["status"] for t in trials} == {"done"} and len(trials) == 2
    scores = store.read("scores", sweep="pair")
    for t in trials:
        mine = scores.filter(pc.field("trial_id") == t["trial_id"])
        assert set(mine.column("eval_task").to_pylist()) == {"sentiment", "word_order"}
        assert set(mine.column("phase").to_pylist()) == {"pretrained", "finetune", "forget"}
    # Tune kept its experiment state under the store.
    assert any((store.root / "ray").iterdir())
    # Each trial logged the Ray node and process of its one attempt (what tells the nodes of a
    # retried trial apart where several share a host).
    node_ids = {n["NodeID"] for n in ray_cluster.nodes() if n["Alive"]}
    for t in trials:
        log = [
            json.loads(x)
            for x in (store.root / "checkpoints" / "pair" / t["trial_id"] / "workers.jsonl").read_text().splitlines()
        ]
        assert [a["attempt"] for a in log] == [1] and log[0]["node_id"] in node_ids and log[0]["pid"] != os.getpid()

    again = run_sweep(spec, text, store)
    assert again.already_done == 2 and again.done == 0
    assert store.read("scores", sweep="pair").num_rows == scores.num_rows


def _cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "raysweep.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_cli_run_status_analyze(tmp_path):
    spec = tmp_path / "cli.yaml"
    spec.write_text(tiny_spec_text(name="cli"))
    store = tmp_path / "store"

    dry = _cli("run", str(spec), "--store", str(store), "--dry-run")
    assert dry.returncode == 0 and "sentiment-random-n24-s0-" in dry.stdout and not store.exists()

    run = _cli("run", str(spec), "--store", str(store))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Ray dashboard: http://127.0.0.1:" in run.stdout
    assert "1 trials ran" in run.stdout

    status = _cli("status", "--store", str(store))
    assert status.returncode == 0 and "sentiment" in status.stdout and "1/1 trials done" in status.stdout

    analyze = _cli("analyze", "--store", str(store), "--engine", "local")
    assert analyze.returncode == 0, analyze.stderr[-2000:]
    assert (store / "analysis").is_dir() and any((store / "analysis").rglob("*.parquet"))

    rerun = _cli("run", str(spec), "--store", str(store), "--no-dashboard")
    assert rerun.returncode == 0 and "nothing to do" in rerun.stdout


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(tiny_spec_text(name="bad").replace("lr: 2.0e-3", "lr: -1", 1))
    store = tmp_path / "store"
    r = _cli("run", str(spec), "--store", str(store))
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "phases.finetune.lr" in lines[0]
    assert not store.exists()


def test_trials_score_the_examples_the_driver_recorded(tmp_path):
    """A trial reads its examples from the store's `examples` table (what the driver prepared),
    so the rows it writes join that table exactly."""
    import pyarrow.parquet as pq

    from raysweep.sweep import prepare_sweep_data
    from raysweep.tasks.base import examples_table
    from raysweep.trial import prepare_tasks

    spec = parse_spec(tiny_spec_text(name="ex"))
    store = Store(tmp_path / "store")
    store.ensure()
    data = prepare_sweep_data(spec)
    # Tamper with one recorded prompt: the trial must see the store's version, not re-prepare.
    table = examples_table("sentiment", data["sentiment"].splits).to_pylist()
    table[0]["prompt"] = "RECORDED " + table[0]["prompt"]
    store.write_examples("ex", "sentiment", __import__("pyarrow").Table.from_pylist(table))
    store.write_examples("ex", "word_order", examples_table("word_order", data["word_order"].splits))
    tasks = prepare_tasks(spec.trials()[0], store)
    first = [e for e in tasks["sentiment"].split(table[0]["split"]) if e.idx == table[0]["example_idx"]][0]
    assert first.prompt.startswith("RECORDED ")
    assert {s: len(v) for s, v in tasks["word_order"].splits.items()} == {
        s: len(v) for s, v in data["word_order"].splits.items()
    }
    assert tasks["word_order"].split("test") == data["word_order"].split("test")
    assert pq.read_table(store.path("examples", "ex", "sentiment.parquet")).num_rows == sum(
        len(v) for v in data["sentiment"].splits.values()
    )
