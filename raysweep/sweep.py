"""The scheduler stage: run a spec's trials concurrently with Ray Tune.

The driver validates everything that can be validated before writing anything (spec, store
path, task data, cluster resources), records the plan in the store, builds the shared
built-in models once, then hands the pending trials to Tune. Trials resume from the store
on their own, so a Tune retry (FailureConfig) or a re-run of the whole sweep continues where
the last one stopped.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
from ray import tune

# Tune's own console reporter would interleave with raysweep's progress view: the legacy
# reporter at verbose=0 stays silent.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

from raysweep.errors import BadInput
from raysweep.spec import SweepSpec, TrialPlan
from raysweep.store import EXAMPLES_SCHEMA, Store
from raysweep.tasks import PreparedTask


@dataclass
class TrialView:
    """Live state of one trial, as the progress view shows it."""

    trial_id: str
    forget_task: str
    method: str
    status: str = "pending"
    phase: str = ""
    epoch: int = 0
    forget_train_acc: float | None = None
    forget_test_acc: float | None = None
    eval_test_acc: float | None = None
    error: str | None = None


@dataclass
class SweepOutcome:
    sweep: str
    total: int
    already_done: int
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    dashboard_url: str | None = None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


ProgressSink = Callable[[dict[str, TrialView]], None]


def models_dir_for(store: Store) -> Path:
    """Built-in models are cached per store, or in $RAYSWEEP_MODEL_CACHE when set (so tests
    and repeated demos share one pretraining)."""
    env = os.environ.get("RAYSWEEP_MODEL_CACHE")
    return Path(env).absolute() if env else store.models_dir


def prepare_sweep_data(spec: SweepSpec) -> dict[str, PreparedTask]:
    """Load and prepare every task once in the driver: bad data fails here, before writes."""
    from raysweep.tasks.prepare import prepare_sweep_tasks

    return prepare_sweep_tasks(spec)


def _examples_table(task: PreparedTask) -> pa.Table:
    rows = [
        {"task": task.name, "split": split, "example_idx": ex.idx, "uid": ex.uid, "prompt": ex.prompt, "choice_0": ex.choices[0], "choice_1": ex.choices[1], "gold": ex.gold}
        for split, exs in task.splits.items()
        for ex in exs
    ]
    return pa.Table.from_pylist(rows, schema=EXAMPLES_SCHEMA)


def _check_sizes(spec: SweepSpec, data: dict[str, PreparedTask]) -> None:
    for task in spec.forget_task_list:
        n = len(data[task].split("train"))
        too_big = [s for s in spec.sizes if s > n]
        if too_big:
            raise BadInput(f"sizes: {too_big} exceed the {n} training examples task {task!r} has after preparation")


def _init_ray(address: str | None, dashboard: bool, dashboard_host: str = "127.0.0.1") -> str | None:
    import logging

    import ray

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's INFO lines would come before a one-line error such as a resource check's.
    if address:
        ctx = ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        import torch

        ctx = ray.init(
            # "local" always starts a fresh cluster: without it Ray joins whatever `ray start`
            # last recorded in its temp dir, even a cluster that has since died.
            address="local",
            num_cpus=os.cpu_count(),
            num_gpus=torch.cuda.device_count(),
            include_dashboard=dashboard,
            dashboard_host=dashboard_host,  # 127.0.0.1 unless asked: never exposed beyond this machine by default
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def _check_resources(spec: SweepSpec) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    best_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    best_gpu = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    all_cpu = sum(n["Resources"].get("CPU", 0) for n in nodes)
    all_gpu = sum(n["Resources"].get("GPU", 0) for n in nodes)
    r = spec.resources
    # A multi-worker trial's workers may sit on different nodes, but each worker needs its
    # share on one node, and the cluster must hold all of them at once.
    cpu_each, gpu_each = r.per_worker
    if r.gpu > all_gpu or gpu_each > best_gpu:
        raise BadInput(f"resources.gpu: each trial asks for {r.gpu:g} GPU(s) ({r.n_workers} worker(s) of {gpu_each:g}); the cluster has {all_gpu:g}, the largest node has {best_gpu:g}")
    if r.cpu > all_cpu or cpu_each > best_cpu:
        raise BadInput(f"resources.cpu: each trial asks for {r.cpu:g} CPU(s) ({r.n_workers} worker(s) of {cpu_each:g}); the cluster has {all_cpu:g}, the largest node has {best_cpu:g}")


def _cluster_capacity(spec: SweepSpec) -> int:
    """How many trials the cluster can run at once: multi-worker trials hold no resources of
    their own in Tune (their workers do), so Tune must be told, or it would start trials
    whose workers then wait for a placement group."""
    import ray

    total = ray.cluster_resources()
    r = spec.resources
    fits = [int(total.get("CPU", 0) // r.cpu)]
    if r.gpu:
        fits.append(int(total.get("GPU", 0) // r.gpu))
    return max(1, min(fits))


def _trainable(config: dict, plans: dict[str, str], store_root: str, models_dir: str, faults: str | None = None) -> None:
    """Runs inside a Ray worker: one trial, resuming from the store if it ran before."""
    import torch

    from raysweep.trial import TrialRunner

    plan = TrialPlan.model_validate_json(plans[config["trial_id"]])
    store = Store(store_root)
    prev = store.read("trials", sweep=plan.sweep, filter=None).to_pylist()
    attempts = next((r["attempts"] or 0 for r in prev if r["trial_id"] == plan.trial_id), 0)
    if plan.resources.n_workers > 1:
        _run_workers(plan, store, models_dir, faults, attempts + 1)
        return
    torch.set_num_threads(max(1, int(plan.resources.cpu)))
    runner = TrialRunner(plan, store, Path(models_dir), reporter=lambda rep: tune.report(asdict(rep)), faults=faults or "")
    runner.run(attempt=attempts + 1)


def _run_workers(plan: TrialPlan, store: Store, models_dir: str, faults: str | None, attempt: int) -> None:
    """A trial that holds several devices: Ray Train workers inside this Tune trial, one
    process per device. Ray Train places them (a placement group, shown on the dashboard),
    forms their process group on a rendezvous port it picks free on rank 0's node (so
    concurrent trials never collide), and relays rank 0's epoch reports to Tune. A failed
    worker fails the Train run and so this trial, which Tune retries from the resume point."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysweep.trial import failure_reason

    r = plan.resources
    cpu_each, gpu_each = r.per_worker
    resources_per_worker = {"CPU": cpu_each, **({"GPU": gpu_each} if gpu_each else {})}
    trainer = TorchTrainer(
        _trial_worker,
        train_loop_config={"plan": plan.model_dump_json(), "store_root": str(store.root), "models_dir": models_dir, "faults": faults or "", "attempt": attempt},
        torch_config=TorchConfig(backend="nccl" if gpu_each else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.n_workers, use_gpu=bool(gpu_each), resources_per_worker=resources_per_worker),
        run_config=RunConfig(
            name=f"{plan.trial_id}-attempt{attempt}",
            storage_path=str(store.ray_dir / "train"),
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=0),  # retries are Tune's (spec.max_failures)
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        # Rank 0 records its own failure; a failure on another rank kills rank 0 mid-collective.
        row = next((x for x in store.trials(plan.sweep).to_pylist() if x["trial_id"] == plan.trial_id), None)
        if row is not None and row["status"] != "failed":
            store.write_trial_row({**row, "status": "failed", "error": failure_reason(exc), "attempts": attempt})
        raise


def _trial_worker(config: dict) -> None:
    """One rank of a multi-worker trial (runs in a Ray Train worker)."""
    import json

    import ray.train
    import torch
    from ray.train.torch import get_device

    from raysweep.distributed import Group
    from raysweep.trial import TrialRunner

    plan = TrialPlan.model_validate_json(config["plan"])
    group = Group.from_torch()
    torch.set_num_threads(max(1, int(plan.resources.per_worker[0])))
    device = get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = Store(config["store_root"])
    runner = TrialRunner(
        plan, store, Path(config["models_dir"]), reporter=lambda rep: ray.train.report(asdict(rep)), device=str(device), faults=config["faults"], group=group
    )
    if group.is_main:
        # Where each attempt's ranks ran, for the person reading a failed trial's logs.
        info = {"attempt": config["attempt"], "world": group.world, "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}", "device": str(device), "time": time.time()}
        runner.ckpt_dir.mkdir(parents=True, exist_ok=True)
        with open(runner.ckpt_dir / "workers.jsonl", "a") as fh:
            fh.write(json.dumps(info) + "\n")
    runner.run(attempt=config["attempt"])


class _ProgressCallback(tune.Callback):
    """Feeds Tune's events (which run in the driver) to the progress sink."""

    def __init__(self, views: dict[str, TrialView], sink: ProgressSink | None):
        self.views = views
        self.sink = sink

    def __getstate__(self):
        # Tune pickles callbacks with its experiment state; the sink (a live view) stays behind.
        return {"views": {}, "sink": None}

    def _tid(self, trial) -> str:
        return trial.config.get("trial_id", str(trial))

    def _push(self):
        if self.sink:
            self.sink(self.views)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.views[self._tid(trial)].status = "running"
        self._push()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = self.views[self._tid(trial)]
        v.status, v.phase, v.epoch = "running", result.get("phase", ""), result.get("epoch", 0)
        v.forget_train_acc = result.get("forget_train_acc")
        v.forget_test_acc = result.get("forget_test_acc")
        v.eval_test_acc = result.get("eval_test_acc")
        self._push()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.views[self._tid(trial)].status = "done"
        self._push()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.views[self._tid(trial)].status = "failed"
        self._push()


def run_sweep(
    spec: SweepSpec,
    spec_text: str,
    store: Store,
    *,
    address: str | None = None,
    dashboard: bool = True,
    sink: ProgressSink | None = None,
    on_ready: Callable[[str | None, int, int], None] | None = None,
    dashboard_host: str = "127.0.0.1",
) -> SweepOutcome:
    t0 = time.time()
    Store.check_writable(store.root)
    plans = spec.trials()
    data = prepare_sweep_data(spec)
    _check_sizes(spec, data)
    faults = os.environ.get("RAYSWEEP_FAULT")
    if faults:
        from raysweep.faults import parse_faults

        try:
            parse_faults(faults)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    if store.exists():
        # A finished sweep needs no cluster: say so without starting one (reads only).
        done = {r["trial_id"] for r in store.trials(spec.name).to_pylist() if r["status"] == "done"}
        if all(p.trial_id in done for p in plans):
            if on_ready:
                on_ready(None, len(plans), 0)
            return SweepOutcome(sweep=spec.name, total=len(plans), already_done=len(plans), seconds=time.time() - t0)
    dashboard_url = _init_ray(address, dashboard, dashboard_host)
    _check_resources(spec)

    # Validation is over: from here on the store is written.
    try:
        store.ensure()
    except OSError as exc:
        raise BadInput(f"store: cannot create {str(store.root)!r} ({exc.strerror or exc})") from None
    store.write_spec(spec.name, spec_text)
    for name, task in data.items():
        store.write_examples(spec.name, name, _examples_table(task))
        store.write_prep_report(spec.name, name, task.report.rows())
    existing = {r["trial_id"]: r for r in store.trials(spec.name).to_pylist()}
    from raysweep.trial import trial_row

    for plan in plans:
        if plan.trial_id not in existing:
            store.write_trial_row({**trial_row(plan), "status": "pending", "attempts": 0})
    current = {p.trial_id for p in plans}
    for tid, row in existing.items():
        if tid not in current and row["status"] != "superseded":
            # A trial of an earlier version of this spec: its rows stay in the store, but
            # analyses read done trials only, so it is never pooled with the current plan.
            store.write_trial_row({**row, "status": "superseded"})
    pending = [p for p in plans if existing.get(p.trial_id, {}).get("status") != "done"]
    outcome = SweepOutcome(sweep=spec.name, total=len(plans), already_done=len(plans) - len(pending), dashboard_url=dashboard_url)
    if on_ready:
        on_ready(dashboard_url, len(plans), len(pending))
    if not pending:
        outcome.seconds = time.time() - t0
        return outcome

    models_dir = models_dir_for(store)
    from raysweep.models import ensure_model

    for model in spec.models:
        ensure_model(model, models_dir)

    views = {p.trial_id: TrialView(p.trial_id, p.forget_task, p.method) for p in pending}
    multi_worker = spec.resources.n_workers > 1
    # A multi-worker trial's own process only waits on its Ray Train workers, which hold the
    # trial's CPUs and GPUs; it asks for a token of memory because Tune needs some request.
    trial_resources = {"cpu": 0, "memory": 1 << 20} if multi_worker else {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    max_concurrent = spec.max_concurrent_trials or (_cluster_capacity(spec) if multi_worker else None)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, plans={p.trial_id: p.model_dump_json() for p in pending}, store_root=str(store.root), models_dir=str(models_dir), faults=faults),
        trial_resources,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial_id": tune.grid_search([p.trial_id for p in pending])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent,
            trial_dirname_creator=lambda t: t.config["trial_id"],
            trial_name_creator=lambda t: t.config["trial_id"],
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{int(time.time())}",
            storage_path=str(store.ray_dir),
            verbose=0,
            callbacks=[_ProgressCallback(views, sink)],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        ),
    )
    tuner.fit()

    final = {r["trial_id"]: r for r in store.trials(spec.name).to_pylist()}
    for p in pending:
        row = final.get(p.trial_id, {})
        if row.get("status") == "done":
            outcome.done += 1
        else:
            reason = row.get("error") or "trial did not finish (see the Ray dashboard's logs)"
            outcome.failed[p.trial_id] = reason
            if row.get("status") != "failed":
                store.write_trial_row({**row, "status": "failed", "error": reason})
    outcome.seconds = time.time() - t0
    return outcome
