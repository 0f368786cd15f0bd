"""The scheduler stage: run a spec's trials concurrently with Ray Tune.

The driver validates everything that can be validated before writing anything (spec, store
path, task data, cluster resources), records the plan in the store, builds the shared
built-in models once, then hands the pending trials to Tune. Trials resume from the store
on their own, so a Tune retry (FailureConfig) or a re-run of the whole sweep continues where
the last one stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray
from ray import tune

# Tune's own console reporter would interleave with raysweep's progress view: the legacy
# reporter at verbose=0 stays silent.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

from raysweep import tracking
from raysweep.distributed import Group
from raysweep.errors import BadInput, DiskFull
from raysweep.faults import parse_faults
from raysweep.models import ensure_model
from raysweep.records import trial_row
from raysweep.resume import lock_held
from raysweep.spec import SweepSpec, TrialPlan, plan_version
from raysweep.store import INTERRUPT_ERRORS, Store
from raysweep.tasks import PreparedTask
from raysweep.tasks.base import examples_table
from raysweep.tasks.prepare import prepare_sweep_tasks
from raysweep.tracking import report_metrics
from raysweep.trial import TrialRunner, failure_reason


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
    # The signal that stopped the sweep (SIGINT, SIGTERM), if one did.
    interrupted: str | None = None
    committed_epochs: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.interrupted else 0


ProgressSink = Callable[[dict[str, TrialView]], None]


def models_dir_for(store: Store) -> Path:
    """Built-in models are cached per store, or in $RAYSWEEP_MODEL_CACHE when set (so tests
    and repeated demos share one pretraining)."""
    env = os.environ.get("RAYSWEEP_MODEL_CACHE")
    return Path(env).absolute() if env else store.models_dir


def prepare_sweep_data(spec: SweepSpec) -> dict[str, PreparedTask]:
    """Load and prepare every task once in the driver: bad data fails here, before writes."""

    return prepare_sweep_tasks(spec)


def _check_sizes(spec: SweepSpec, data: dict[str, PreparedTask]) -> None:
    for task in spec.forget_task_list:
        n = len(data[task].split("train"))
        too_big = [s for s in spec.sizes if s > n]
        if too_big:
            raise BadInput(f"sizes: {too_big} exceed the {n} training examples task {task!r} has after preparation")


def _init_ray(address: str | None, dashboard: bool, dashboard_host: str = "127.0.0.1") -> str | None:
    import logging

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's INFO lines would come before a one-line error such as a resource check's.
    if address:
        ctx = ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        import torch

        # Token auth stays on unless the user turned it off: Ray turns it on for a local
        # cluster when RAY_AUTH_MODE is unset, and announces that in a warning line that
        # would come before any one-line error of ours (the dashboard line names the token).
        ensure_auth_token()
        # Ray serves Prometheus metrics on every interface without asking for the token (three
        # ports); nothing of ours reads them. RAY_enable_metrics_collection=1 brings them back.
        os.environ.setdefault("RAY_enable_metrics_collection", "0")
        announce = logging.getLogger("ray._private.authentication.authentication_token_setup")
        level = announce.level
        announce.setLevel(logging.ERROR)
        try:
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
        finally:
            announce.setLevel(level)
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def ensure_auth_token() -> None:
    """The token a new local cluster is started with, made once, first writer wins.

    Ray writes a missing ~/.ray/auth_token in place: two drivers starting at once (two
    sweeps, two users of one account) could each write their own, and the workers one cluster
    starts later would then present the other's token and be refused."""
    if (
        os.environ.get("RAY_AUTH_MODE", "token").lower() != "token"
        or os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        return
    path = Path.home() / ".ray" / "auth_token"
    if path.exists():
        return
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".auth_token.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))  # Ray's own format: 256 random bits in hex
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # atomic and never replaces: a token already there wins
    finally:
        tmp.unlink(missing_ok=True)


def auth_note() -> str:
    """How this driver's cluster checks who talks to it, for the line under the dashboard's."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        where = os.environ.get("RAY_AUTH_TOKEN_PATH") or (
            "$RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else "~/.ray/auth_token"
        )
        return f"token auth on (token in {where})"
    return "token auth OFF (RAY_AUTH_MODE=disabled): anyone who can reach this machine's Ray ports can run code"


@contextlib.contextmanager
def driver_lock(store: Store, sweep: str, version: str):
    """Held by the driver for its whole run: one store runs one version of a sweep at a
    time. Two versions at once would supersede each other's trials while both run, and
    their rows would end up pooled as one condition. The kernel drops the lock when its
    holder dies (SIGKILL included), so a killed driver never blocks the next one."""
    path = store.path("sweeps", sweep, "driver.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(_lock_refusal(sweep, version, os.pread(fd, 4096, 0))) from None
        except OSError:
            pass  # a filesystem without locks: run unguarded rather than not at all

        def claim() -> None:
            """Name the holder, for the refusal a second driver prints. Separate from taking
            the lock: a driver that finds its sweep finished leaves the store as it was."""
            holder = {"version": version, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)

        yield claim
    finally:
        os.close(fd)


def _lock_refusal(sweep: str, version: str, raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode() or "{}")
    except ValueError:
        holder = {}
    who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder.get("pid") else "another process"
    if not holder.get("version"):
        return f"sweep {sweep!r}: another driver is running this sweep on this store ({who}); wait for it to finish"
    if holder.get("version") == version:
        return (
            f"sweep {sweep!r}: this same version is already being run on this store ({who}); "
            "wait for that driver to finish (a second one would only race it)"
        )
    return (
        f"sweep {sweep!r}: another version of this sweep is running on this store ({who}); "
        "wait for it to finish, or run this version under another sweep name or store"
    )


def _check_resources(spec: SweepSpec) -> None:
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
        raise BadInput(
            f"resources.gpu: each trial asks for {r.gpu:g} GPU(s) ({r.n_workers} worker(s) of {gpu_each:g}); the cluster has {all_gpu:g}, the largest node has {best_gpu:g}"
        )
    if r.cpu > all_cpu or cpu_each > best_cpu:
        raise BadInput(
            f"resources.cpu: each trial asks for {r.cpu:g} CPU(s) ({r.n_workers} worker(s) of {cpu_each:g}); the cluster has {all_cpu:g}, the largest node has {best_cpu:g}"
        )


def _cluster_capacity(spec: SweepSpec) -> int:
    """How many trials the cluster can run at once: multi-worker trials hold no resources of
    their own in Tune (their workers do), so Tune must be told, or it would start trials
    whose workers then wait for a placement group."""
    total = ray.cluster_resources()
    r = spec.resources
    fits = [int(total.get("CPU", 0) // r.cpu)]
    if r.gpu:
        fits.append(int(total.get("GPU", 0) // r.gpu))
    return max(1, min(fits))


def _trainable(
    config: dict, plans: dict[str, str], store_root: str, models_dir: str, faults: str | None = None
) -> None:
    """Runs inside a Ray worker: one trial, resuming from the store if it ran before."""
    import torch

    plan = TrialPlan.model_validate_json(plans[config["trial_id"]])
    store = Store(store_root)
    prev = store.read("trials", sweep=plan.sweep, filter=None).to_pylist()
    attempts = next((r["attempts"] or 0 for r in prev if r["trial_id"] == plan.trial_id), 0)
    if plan.resources.n_workers > 1:
        _run_workers(plan, store, models_dir, faults, attempts + 1)
        return
    torch.set_num_threads(max(1, int(plan.resources.cpu)))
    runner = TrialRunner(
        plan, store, Path(models_dir), reporter=lambda rep: tune.report(report_metrics(rep)), faults=faults or ""
    )
    _log_attempt(runner.ckpt_dir, {"attempt": attempts + 1, "world": 1, "device": runner.device})
    try:
        runner.run(attempt=attempts + 1)
    except DiskFull as exc:
        # Recorded as failed; a retry on a full disk would only fail the same way, so the
        # trial ends normally and says how it ended in its last result (the live view's).

        tune.report({FAILED_KEY: failure_reason(exc)})


def _run_workers(plan: TrialPlan, store: Store, models_dir: str, faults: str | None, attempt: int) -> None:
    """A trial that holds several devices: Ray Train workers inside this Tune trial, one
    process per device. Ray Train places them (a placement group, shown on the dashboard),
    forms their process group on a rendezvous port it picks free on rank 0's node (so
    concurrent trials never collide), and relays rank 0's epoch reports to Tune. A failed
    worker fails the Train run and so this trial, which Tune retries from the resume point."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    r = plan.resources
    cpu_each, gpu_each = r.per_worker
    resources_per_worker = {"CPU": cpu_each, **({"GPU": gpu_each} if gpu_each else {})}
    trainer = TorchTrainer(
        _trial_worker,
        train_loop_config={
            "plan": plan.model_dump_json(),
            "store_root": str(store.root),
            "models_dir": models_dir,
            "faults": faults or "",
            "attempt": attempt,
        },
        torch_config=TorchConfig(backend="nccl" if gpu_each else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=r.n_workers, use_gpu=bool(gpu_each), resources_per_worker=resources_per_worker
        ),
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
        if row is not None and row["status"] not in ("failed", "superseded", "interrupted"):
            store.write_trial_row({**row, "status": "failed", "error": failure_reason(exc), "attempts": attempt})
        raise


def _trial_worker(config: dict) -> None:
    """One rank of a multi-worker trial (runs in a Ray Train worker)."""
    import ray.train
    import torch
    from ray.train.torch import get_device

    plan = TrialPlan.model_validate_json(config["plan"])
    group = Group.from_torch()
    torch.set_num_threads(max(1, int(plan.resources.per_worker[0])))
    device = get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = Store(config["store_root"])
    runner = TrialRunner(
        plan,
        store,
        Path(config["models_dir"]),
        reporter=lambda rep: ray.train.report(report_metrics(rep)),
        device=str(device),
        faults=config["faults"],
        group=group,
    )
    if group.is_main:
        master = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        _log_attempt(
            runner.ckpt_dir,
            {"attempt": config["attempt"], "world": group.world, "master": master, "device": str(device)},
        )
    runner.run(attempt=config["attempt"])


def _log_attempt(ckpt_dir: Path, info: dict) -> None:
    """One line per attempt in the trial's workers.jsonl: which node and process ran it, for the
    person reading a failed or retried trial's logs (Tune's records give a host and an IP,
    which several nodes on one machine share)."""
    info = {**info, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "time": time.time()}
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with open(ckpt_dir / "workers.jsonl", "a") as fh:
        fh.write(json.dumps(info) + "\n")


# A trial's last result carries this key when it ended failed without raising.
FAILED_KEY = "trial_failed"


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
        if FAILED_KEY in result:
            v.status = "failed"
            self._push()
            return
        v.status, v.phase, v.epoch = "running", result.get("phase", ""), result.get("epoch", 0)
        v.forget_train_acc = result.get("forget_train_acc")
        v.forget_test_acc = result.get("forget_test_acc")
        v.eval_test_acc = result.get("eval_test_acc")
        self._push()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.views[self._tid(trial)].status = "failed" if FAILED_KEY in (trial.last_result or {}) else "done"
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

    tracking.check_available(spec.tracking)
    Store.check_writable(store.root)
    data = prepare_sweep_data(spec)
    _check_sizes(spec, data)
    # Trial ids hash the examples just prepared: other data under the same spec is another
    # plan, whose trials supersede those that read the old examples.
    plans = spec.trials(data)
    version = plan_version(plans)
    faults = os.environ.get("RAYSWEEP_FAULT")
    if faults:
        try:
            parse_faults(faults)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    with contextlib.ExitStack() as held:
        claim = None
        existing: dict[str, dict] = {}
        if store.exists():
            claim = held.enter_context(driver_lock(store, spec.name, version))
            existing = {r["trial_id"]: r for r in store.trials(spec.name).to_pylist()}
        pending = [p for p in plans if existing.get(p.trial_id, {}).get("status") != "done"]
        recorded = store.current_plan(spec.name) if store.exists() else None
        if not pending and (recorded is None or recorded.get("version") == version):
            # A finished sweep needs no cluster: say so without starting one (reads only).
            if on_ready:
                on_ready(None, len(plans), 0)
            return SweepOutcome(sweep=spec.name, total=len(plans), already_done=len(plans), seconds=time.time() - t0)
        dashboard_url = None
        if pending:
            dashboard_url = _init_ray(address, dashboard, dashboard_host)
            _check_resources(spec)

        # Validation is over: from here on the store is written.
        try:
            store.ensure()
        except OSError as exc:
            raise BadInput(f"store: cannot create {str(store.root)!r} ({exc.strerror or exc})") from None
        if claim is None:
            claim = held.enter_context(driver_lock(store, spec.name, version))
        claim()
        existing = {r["trial_id"]: r for r in store.trials(spec.name).to_pylist()}
        _record_plan(store, spec, spec_text, data, plans, version, existing)
        pending = [p for p in plans if existing.get(p.trial_id, {}).get("status") != "done"]
        outcome = SweepOutcome(
            sweep=spec.name, total=len(plans), already_done=len(plans) - len(pending), dashboard_url=dashboard_url
        )
        if on_ready:
            on_ready(dashboard_url, len(plans), len(pending))
        if pending:
            _run_pending(spec, store, pending, faults, sink, outcome)
            if not outcome.interrupted:
                tracking.log_sweep(spec.tracking, store, spec.name)
        outcome.seconds = time.time() - t0
        return outcome


def _record_plan(
    store: Store,
    spec: SweepSpec,
    spec_text: str,
    data: dict[str, PreparedTask],
    plans: list[TrialPlan],
    version: str,
    existing: dict[str, dict],
) -> None:
    """Make `plans` the sweep's current version in the store (under the driver lock)."""

    current = {p.trial_id for p in plans}
    # Trials of an earlier version first, before the examples they read are replaced: their
    # rows stay in the store, but analyses read done trials of the current plan only.
    for tid, row in existing.items():
        if tid not in current and row["status"] != "superseded":
            store.write_trial_row({**row, "status": "superseded"})
    store.write_spec(spec.name, spec_text)
    for name, task in data.items():
        store.write_examples(spec.name, name, examples_table(task.name, task.splits))
        store.write_prep_report(spec.name, name, task.report.rows())
    for plan in plans:
        row = existing.get(plan.trial_id)
        if row is None:
            store.write_trial_row({**trial_row(plan), "status": "pending", "attempts": 0})
        elif row["status"] == "superseded":
            # Current again (the spec went back to this version): it resumes from its resume
            # point like any unfinished trial; a trial refuses to write over "superseded".
            store.write_trial_row({**row, **trial_row(plan), "status": "pending"})
    store.write_plan(spec.name, version, [p.trial_id for p in plans])


def _run_pending(
    spec: SweepSpec,
    store: Store,
    pending: list[TrialPlan],
    faults: str | None,
    sink: ProgressSink | None,
    outcome: SweepOutcome,
) -> None:
    with _StopSignals() as stop:
        try:
            _tune_pending(spec, store, pending, faults, sink, outcome)
        except KeyboardInterrupt:
            # Ignored from here on: the cleanup below takes seconds, and a second Ctrl+C in
            # the middle of it would leave trials marked running.
            stop.ignore()
            outcome.interrupted = stop.received or "SIGINT"
            _stop_trials(store, spec.name, pending, outcome.interrupted)
            final = {r["trial_id"]: r for r in store.trials(spec.name).to_pylist()}
            outcome.done = sum(final.get(p.trial_id, {}).get("status") == "done" for p in pending)
            outcome.committed_epochs = sum(
                len(e) for p in pending for e in store.committed_epochs(spec.name, p.trial_id).values()
            )


class _StopSignals:
    """SIGINT and SIGTERM stop the sweep the same way: a KeyboardInterrupt in the driver,
    out of Tune's loop. Tune's own SIGINT handling would first stop each trial's actor (the
    trials then record `SystemExit: 0` as their failure), and Ray's SIGTERM handler aborts the
    driver outright, leaving trials marked running."""

    def __init__(self):
        self.received: str | None = None
        self._saved: dict[int, object] = {}
        self._tune_env: str | None = None

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name
        raise KeyboardInterrupt

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._tune_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handler)
        return self

    def ignore(self) -> None:
        for sig in self._saved:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        if self._saved:
            if self._tune_env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._tune_env


def _interrupted_rows(store: Store, sweep: str, pending: list[TrialPlan], how: str) -> None:
    for p in pending:
        row = store.read_trial_row(sweep, p.trial_id)
        if row is None:
            continue
        by_interrupt = row["status"] == "failed" and (row["error"] or "").startswith(INTERRUPT_ERRORS)
        if row["status"] == "running" or by_interrupt:
            store.write_trial_row(
                {**row, "status": "interrupted", "error": f"interrupted by {how}; run the sweep again to resume"}
            )


def _stop_trials(store: Store, sweep: str, pending: list[TrialPlan], how: str, wait_s: float = 20.0) -> None:
    """Mark the trials that were running as interrupted, stop their workers and wait until
    each has let go of its trial (the kernel drops a trial's lock when its process dies)."""
    # First, so that a dying trial's own "failed" never lands on top (it refuses to
    # overwrite "interrupted"); again after the workers are gone, for any trial that was
    # just starting and wrote "running" in between.
    _interrupted_rows(store, sweep, pending, how)
    ray.shutdown()  # a local cluster stops; a joined one kills this driver's trial actors
    deadline = time.time() + wait_s
    for p in pending:
        lock = store.path("checkpoints", sweep, p.trial_id, "lock")
        if not lock.is_file():
            continue
        with open(lock, "a+") as fh:
            while time.time() < deadline:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    time.sleep(0.2)
                except OSError:
                    break
    _interrupted_rows(store, sweep, pending, how)


def _tune_pending(
    spec: SweepSpec,
    store: Store,
    pending: list[TrialPlan],
    faults: str | None,
    sink: ProgressSink | None,
    outcome: SweepOutcome,
) -> None:
    models_dir = models_dir_for(store)

    for model in spec.models:
        ensure_model(model, models_dir)

    views = {p.trial_id: TrialView(p.trial_id, p.forget_task, p.method) for p in pending}
    multi_worker = spec.resources.n_workers > 1
    # A multi-worker trial's own process only waits on its Ray Train workers, which hold the
    # trial's CPUs and GPUs; it asks for a token of memory because Tune needs some request.
    trial_resources = (
        {"cpu": 0, "memory": 1 << 20} if multi_worker else {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    )
    max_concurrent = spec.max_concurrent_trials or (_cluster_capacity(spec) if multi_worker else None)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trainable,
            plans={p.trial_id: p.model_dump_json() for p in pending},
            store_root=str(store.root),
            models_dir=str(models_dir),
            faults=faults,
        ),
        trial_resources,
    )

    # With tracking on, each trial's params ride in its Tune config for the loggers to record.
    tracked = tracking.enabled(spec.tracking)
    tuner = tune.Tuner(
        trainable,
        param_space=tracking.param_space(pending)
        if tracked
        else {"trial_id": tune.grid_search([p.trial_id for p in pending])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=max_concurrent,
            trial_dirname_creator=lambda t: t.config["trial_id"],
            trial_name_creator=lambda t: t.config["trial_id"],
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{int(time.time())}",
            storage_path=str(store.ray_dir),
            verbose=0,
            callbacks=[_ProgressCallback(views, sink), *tracking.callbacks(spec.tracking, store, spec.name)],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        ),
    )
    tuner.fit()
    _account(store, spec.name, pending, outcome)


def _account(store: Store, sweep: str, pending: list[TrialPlan], outcome: SweepOutcome) -> None:
    """How each trial this driver ran ended, from the trials table; a trial left `running`
    is marked failed, unless another live process holds it (a second driver on the same
    sweep, whose trial this one gave up waiting for): that row is the other process's."""

    final = {r["trial_id"]: r for r in store.trials(sweep).to_pylist()}
    for p in pending:
        row = final.get(p.trial_id, {})
        if row.get("status") == "running" and lock_held(store.path("checkpoints", sweep, p.trial_id)):
            outcome.failed[p.trial_id] = "being run by another process (another driver on this store); left to it"
        elif row.get("status") == "done":
            outcome.done += 1
        elif row.get("status") == "superseded":
            outcome.failed[p.trial_id] = "superseded by another version of this sweep while it ran"
        elif row.get("status") == "interrupted":
            outcome.failed[p.trial_id] = row.get("error") or "interrupted"
        else:
            reason = row.get("error") or "trial did not finish (see the Ray dashboard's logs)"
            outcome.failed[p.trial_id] = reason
            if row.get("status") != "failed":
                store.write_trial_row({**row, "status": "failed", "error": reason})
