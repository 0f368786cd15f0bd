"""Tracking through Ray Tune's MLflow and W&B callbacks: one real sweep logging to a real
MLflow file store and to an offline W&B directory, read back through MLflow's client and
through the records of W&B's own offline run file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysweep.spec import parse_spec
from raysweep.store import Store
from raysweep.sweep import run_sweep
from tests.spec_helpers import tiny_spec_text

pytestmark = pytest.mark.slow

SWEEP = "trk"


def _tracking_yaml(mlruns: Path) -> str:
    return f"""
tracking:
  mlflow: {{tracking_uri: "file://{mlruns}", experiment: trk-exp}}
  wandb: {{project: trk-project, mode: offline}}
"""


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("tracking")
    text = tiny_spec_text(name=SWEEP, ft_epochs=2, fg_epochs=2) + _tracking_yaml(root / "mlruns")
    store = Store(root / "store")
    with pytest.MonkeyPatch.context() as mp:
        # Nothing may reach the network: offline W&B, quiet, into the test's directory.
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(root / "wandb"))
        outcome = run_sweep(parse_spec(text), text, store)
    assert outcome.exit_code == 0 and outcome.done == 1, outcome
    epochs = sorted(store.read("epochs", sweep=SWEEP).to_pylist(), key=lambda r: (r["phase"], r["epoch"]))
    return {
        "root": root,
        "store": store,
        "epochs": epochs,
        "trial_id": store.trials(SWEEP).column("trial_id")[0].as_py(),
    }


def _phase(epochs: list[dict], phase: str) -> list[dict]:
    return sorted((e for e in epochs if e["phase"] == phase), key=lambda e: e["epoch"])


def test_tracking_is_not_part_of_trial_identity(tmp_path):
    plain = parse_spec(tiny_spec_text(name=SWEEP))
    with_tracking = parse_spec(tiny_spec_text(name=SWEEP) + _tracking_yaml(tmp_path / "mlruns"))
    assert with_tracking.tracking is not None and with_tracking.tracking.wandb.mode == "offline"
    assert [p.trial_id for p in plain.trials()] == [p.trial_id for p in with_tracking.trials()]


def test_mlflow_trial_run_has_params_and_per_epoch_metrics(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{tracked['root'] / 'mlruns'}")
    exp = client.get_experiment_by_name("trk-exp")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    trial_runs = [r for r in runs if r.data.tags.get("raysweep.kind") != "sweep"]
    assert len(trial_runs) == 1 and len(runs) == 2
    run = trial_runs[0]
    params = run.data.params
    assert params["trial_id"] == tracked["trial_id"]
    assert (params["model"], params["forget_task"], params["method"], params["size"], params["seed"]) == (
        "micro-gpt2",
        "sentiment",
        "random",
        "24",
        "0",
    )
    assert float(params["finetune_lr"]) == pytest.approx(2e-3) and params["finetune_optimizer"] == "adamw"

    epochs = tracked["epochs"]
    for phase in ("finetune", "forget"):
        stored = _phase(epochs, phase)
        assert stored, phase
        for metric in ("train_loss", "forget_test_acc", "forget_validation_acc", "forget_train_acc"):
            history = sorted(client.get_metric_history(run.info.run_id, f"{phase}/{metric}"), key=lambda m: m.step)
            assert [m.value for m in history] == pytest.approx([e[metric] for e in stored], abs=1e-6), (phase, metric)
        # One tracked step per reported epoch, in order.
        steps = [
            m.step for m in sorted(client.get_metric_history(run.info.run_id, f"{phase}/epoch"), key=lambda m: m.step)
        ]
        assert len(steps) == len(stored) and steps == sorted(set(steps))
    # The pretrained evaluation has no training loss; its accuracies are one point each.
    assert client.get_metric_history(run.info.run_id, "pretrained/train_loss") == []
    assert len(client.get_metric_history(run.info.run_id, "pretrained/eval_test_acc")) == 1
    assert run.info.status == "FINISHED"


def test_mlflow_sweep_run_carries_report_and_analysis_tables(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{tracked['root'] / 'mlruns'}")
    exp = client.get_experiment_by_name("trk-exp")
    sweep_runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("raysweep.kind") == "sweep"]
    assert len(sweep_runs) == 1 and sweep_runs[0].info.run_name == SWEEP
    run_id = sweep_runs[0].info.run_id
    store = tracked["store"]
    report = store.analysis_dir / "reports" / f"report-{SWEEP}.html"
    assert report.is_file()
    got = Path(client.download_artifacts(run_id, f"reports/{report.name}", str(tracked["root"] / "dl")))
    assert got.read_bytes() == report.read_bytes()
    tables = {a.path for a in client.list_artifacts(run_id, f"by-sweep/{SWEEP}/single_task")}
    assert f"by-sweep/{SWEEP}/single_task/tasks.parquet" in tables


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline `.wandb` file (a LevelDB-style log of 32 KiB
    blocks after a 7-byte header; records may span blocks: FIRST/MIDDLE/LAST pieces)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, off = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    out, pending = [], b""
    while off + 7 <= len(data):
        if block - off % block < 7:
            off += block - off % block
            continue
        length, kind = int.from_bytes(data[off + 4 : off + 6], "little"), data[off + 6]
        piece, off = data[off + 7 : off + 7 + length], off + 7 + length
        if kind == 0:
            continue
        pending += piece
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def _wandb_runs(root: Path) -> list[Path]:
    return sorted((root / "wandb" / "wandb").glob("offline-run-*"))


def test_wandb_offline_trial_run_has_config_and_history(tracked):
    runs = _wandb_runs(tracked["root"])
    assert len(runs) == 2
    by_kind = {}
    for run_dir in runs:
        records = _wandb_records(next(run_dir.glob("*.wandb")))
        config = {}
        for r in records:
            kind = r.WhichOneof("record_type")
            items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
            config.update({u.key: json.loads(u.value_json) for u in items})
        history = [
            {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        by_kind["trial" if "trial_id" in config else "sweep"] = (run_dir, config, history, records)
    _, config, history, records = by_kind["trial"]
    # Tune's own trial id (a result key) becomes W&B's run id and config entry; raysweep's
    # trial id names the run.
    names = [r.run.display_name for r in records if r.WhichOneof("record_type") == "run"]
    assert names == [tracked["trial_id"]]
    assert (config["model"], config["forget_task"], config["method"], config["size"], config["seed"]) == (
        "micro-gpt2",
        "sentiment",
        "random",
        24,
        0,
    )
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished
    epochs = tracked["epochs"]
    for phase in ("finetune", "forget"):
        logged = [h[f"{phase}/train_loss"] for h in history if f"{phase}/train_loss" in h]
        assert logged == pytest.approx([e["train_loss"] for e in _phase(epochs, phase)], abs=1e-6)
        accs = [h[f"{phase}/forget_test_acc"] for h in history if f"{phase}/forget_test_acc" in h]
        assert accs == pytest.approx([e["forget_test_acc"] for e in _phase(epochs, phase)], abs=1e-6)
    # The plain keys stay as they were: the live progress view reads them.
    assert all({"forget_test_acc", "forget_train_acc", "eval_test_acc", "epoch"} <= h.keys() for h in history)
    assert len(history) == len(epochs)


def test_wandb_offline_sweep_run_files_include_report_and_tables(tracked):
    sweep_dirs = [d for d in _wandb_runs(tracked["root"]) if (d / "files" / "reports").is_dir()]
    assert len(sweep_dirs) == 1
    files = sweep_dirs[0] / "files"
    report = tracked["store"].analysis_dir / "reports" / f"report-{SWEEP}.html"
    assert (files / "reports" / report.name).read_bytes() == report.read_bytes()
    assert (files / "by-sweep" / SWEEP / "single_task" / "tasks.parquet").is_file()


# An absent package, as the import system sees one: `import pkg` fails, find_spec says None.
_HIDE = """
import sys
sys.modules["{pkg}"] = None
from raysweep.cli import app
sys.argv = ["raysweep", "run", sys.argv[1], "--store", sys.argv[2]]
app()
"""


@pytest.mark.parametrize("pkg,section", [("mlflow", "tracking.mlflow"), ("wandb", "tracking.wandb")])
def test_missing_tracking_package_is_refused_before_anything_is_written(tmp_path, pkg, section):
    spec = tmp_path / "spec.yaml"
    spec.write_text(tiny_spec_text(name="miss") + _tracking_yaml(tmp_path / "mlruns"))
    store = tmp_path / "store"
    r = subprocess.run(
        [sys.executable, "-c", _HIDE.format(pkg=pkg), str(spec), str(store)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and section in lines[0] and f"raysweep[{pkg}]" in lines[0]
    assert not store.exists() and not (tmp_path / "mlruns").exists()
