"""Experiment tracking through Ray Tune's own logger callbacks (MLflow, Weights & Biases).

Each trial is one tracked run: its parameters go into the Tune config (so the callbacks log
them as params) and each epoch's report carries phase-qualified metrics (`finetune/train_loss`,
`forget/forget_test_acc`, ...) beside the plain keys the live progress view reads. When the
sweep ends, the analyses and the HTML report are written into the store and attached to one
sweep-level run.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from raysweep.errors import BadInput
from raysweep.spec import TrackingConfig, TrialPlan

if TYPE_CHECKING:
    from raysweep.records import EpochReport
    from raysweep.store import Store

# The per-epoch values that are logged under `<phase>/<name>`.
PHASE_METRICS = ("train_loss", "forget_train_acc", "forget_validation_acc", "forget_test_acc", "eval_test_acc")


def check_available(tracking: TrackingConfig | None) -> None:
    """Refuse a tracking section whose package is missing, before anything is written."""
    if tracking is None:
        return
    if tracking.mlflow is not None:
        if importlib.util.find_spec("mlflow") is None:
            raise BadInput("tracking.mlflow: the mlflow package is not installed (pip install 'raysweep[mlflow]')")
        if not (tracking.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            raise BadInput("tracking.mlflow.tracking_uri: required (or set MLFLOW_TRACKING_URI)")
    if tracking.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise BadInput("tracking.wandb: the wandb package is not installed (pip install 'raysweep[wandb]')")


def enabled(tracking: TrackingConfig | None) -> bool:
    return tracking is not None and (tracking.mlflow is not None or tracking.wandb is not None)


def trial_params(plan: TrialPlan) -> dict[str, object]:
    """A flat dict of what distinguishes one trial from another, as tracked-run params."""
    ph = plan.phases
    out: dict[str, object] = {
        "sweep": plan.sweep,
        "model": plan.model.name,
        "forget_task": plan.forget_task,
        "method": plan.method,
        "size": plan.size,
        "seed": plan.seed,
        "eval_tasks": ",".join(plan.eval_tasks),
    }
    for name, cfg in (("finetune", ph.finetune), ("forget", ph.forget), ("relearn", ph.relearn)):
        out.update(
            {
                f"{name}_lr": cfg.lr,
                f"{name}_optimizer": cfg.optimizer,
                f"{name}_batch_size": cfg.batch_size,
                f"{name}_max_epochs": cfg.max_epochs,
            }
        )
    out.update(
        relearn_enabled=ph.relearn.enabled,
        engine=plan.train.engine,
        precision=plan.train.precision,
        dtype=plan.model.dtype,
        world_size=plan.resources.n_workers,
        data_cap=plan.data.cap,
        data_seed=plan.data.seed,
    )
    return out


def param_space(pending: list[TrialPlan]) -> dict:
    """Tune's search space: the grid over trial ids, with each trial's params resolved from
    its id (Tune resolves the grid first, then the functions that read it)."""
    from ray import tune

    table = {p.trial_id: trial_params(p) for p in pending}
    keys = list(next(iter(table.values())))
    space: dict = {"trial_id": tune.grid_search(list(table))}
    for key in keys:
        space[key] = tune.sample_from(lambda config, key=key: table[config["trial_id"]][key])
    return space


def report_metrics(rep: "EpochReport") -> dict:
    """An epoch report as Tune metrics: the plain keys plus `<phase>/<metric>` copies, so
    that one tracked metric's history holds one phase's epochs. Non-finite values (the
    pretrained evaluation has no train loss) are left out of the copies."""
    out = asdict(rep)
    for name in PHASE_METRICS:
        value = out[name]
        if value is not None and math.isfinite(value):
            out[f"{rep.phase}/{name}"] = value
    out[f"{rep.phase}/epoch"] = rep.epoch
    return out


def _is_file_store(uri: str) -> bool:
    return (
        uri.startswith("file:")
        or "://" not in uri
        and not uri.startswith(("databricks", "sqlite", "postgresql", "mysql", "mssql"))
    )


def _mlflow_uri(tracking: TrackingConfig) -> str:
    uri = tracking.mlflow.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    if _is_file_store(uri):
        # MLflow 3 refuses a file store unless this is set: a spec that names one asks for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def wandb_dir(store: "Store") -> Path:
    return Path(os.environ["WANDB_DIR"]).absolute() if os.environ.get("WANDB_DIR") else store.root / "wandb"


def callbacks(tracking: TrackingConfig | None, store: "Store", sweep: str) -> list:
    if not enabled(tracking):
        return []
    out: list = []
    if tracking.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(
            MLflowLoggerCallback(
                tracking_uri=_mlflow_uri(tracking),
                experiment_name=tracking.mlflow.experiment or sweep,
                tags={"raysweep.sweep": sweep},
            )
        )
    if tracking.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        folder = wandb_dir(store)
        folder.mkdir(parents=True, exist_ok=True)
        # The logging actors run in Ray workers, which do not see this process's later
        # environment: mode and directory go to wandb.init as arguments.
        out.append(
            WandbLoggerCallback(project=tracking.wandb.project, group=sweep, mode=tracking.wandb.mode, dir=str(folder))
        )
    return out


def sweep_artifacts(store: "Store", sweep: str) -> list[Path]:
    """Run the analyses and write the report for `sweep` into the store's usual places; the
    files to attach to the sweep-level run."""
    from raysweep.analysis.runner import outputs_dir, run_analyses
    from raysweep.report import write_report

    # What `raysweep analyze --sweep S` stores; the report then reuses those outcomes.
    outcomes = run_analyses(store, engine="local", sweep=sweep)
    report = write_report(store, store.analysis_dir / "reports", sweep=sweep)
    tables = sorted(
        p for o in outcomes for p in [*o.paths, outputs_dir(store, sweep, o.name) / "outcome.json"] if p.is_file()
    )
    return [report, *tables]


def log_sweep(tracking: TrackingConfig | None, store: "Store", sweep: str) -> list[Path]:
    """At the end of a sweep: the report and analysis tables as artifacts of a run named
    after the sweep (MLflow: in the trials' experiment; W&B: in the trials' project)."""
    if not enabled(tracking):
        return []
    files = sweep_artifacts(store, sweep)
    base = store.analysis_dir
    if tracking.mlflow is not None:
        _log_mlflow(tracking, sweep, files, base)
    if tracking.wandb is not None:
        _log_wandb(tracking, store, sweep, files, base)
    return files


def _log_mlflow(tracking: TrackingConfig, sweep: str, files: list[Path], base: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_mlflow_uri(tracking))
    name = tracking.mlflow.experiment or sweep
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    run = client.create_run(exp_id, run_name=sweep, tags={"raysweep.sweep": sweep, "raysweep.kind": "sweep"})
    try:
        for f in files:
            rel = f.relative_to(base).parent
            client.log_artifact(run.info.run_id, str(f), artifact_path=None if str(rel) == "." else str(rel))
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id)


def _log_wandb(tracking: TrackingConfig, store: "Store", sweep: str, files: list[Path], base: Path) -> None:
    import wandb

    run = wandb.init(
        project=tracking.wandb.project,
        group=sweep,
        name=sweep,
        job_type="sweep",
        mode=tracking.wandb.mode,
        dir=str(wandb_dir(store)),
        settings=wandb.Settings(silent=True),
    )
    try:
        for f in files:
            run.save(str(f), base_path=str(base), policy="now")
    finally:
        run.finish()
