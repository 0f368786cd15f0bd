"""One trial: pretrained eval -> finetune -> forget -> (relearn), scoring after every epoch.

The trial is a small state machine over (phase, epoch). After each epoch it scores every
example of the forget task and, at the epochs `scoring.schedule` names and at every milestone,
of the other evaluation tasks; commits the rows to the store (marker last), then saves a
resume point. Randomness is derived from (seed, phase, epoch), never carried across epochs,
so a trial resumed from its last resume point writes exactly what an uninterrupted one does.

The parts: resume points in `raysweep.resume`, the rows an epoch writes in
`raysweep.records`, the forgetting methods in `raysweep.methods`. This module is the recipe:
setup, the phases, the save after each epoch, and what happens when it fails.
"""

from __future__ import annotations

import contextlib
import random
import time
import traceback
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raysweep.distributed import SINGLE, Group
from raysweep.errors import DiskFull, is_no_space, no_space_where
from raysweep.faults import FaultPoints
from raysweep.integrity import remove_temp_files
from raysweep.methods import ForgetMethod, get_method, nll_loss
from raysweep.models import LoadedModel, load_model
from raysweep.pretrained import PretrainedScores
from raysweep.records import (
    Accuracies,
    EpochReport,
    EvalSlice,
    TrialRecords,
    accuracies,
    concat_results,
    hidden_task,
    score_all,
    trial_row,
)
from raysweep.resume import Progress, ResumePoints
from raysweep.scoring import ScoreResult
from raysweep.spec import PhaseConfig, TrialPlan
from raysweep.store import Store
from raysweep.tasks import Example, PreparedTask, get_task, prepare_task
from raysweep.tasks.base import PrepReport, derived_seed, examples_from_table
from raysweep.train import build_batches, make_optimizer, train_epoch

__all__ = [
    "EpochReport",
    "EvalSlice",
    "Progress",
    "TrialRunner",
    "failure_reason",
    "finetune_should_stop",
    "forget_should_stop",
    "prepare_tasks",
    "relearn_should_stop",
    "trial_row",
]

# checkpoint_optimizer: auto keeps optimizer state in resume points up to this model size.
OPTIMIZER_STATE_MAX_PARAMS = 1_000_000_000


Reporter = Callable[[EpochReport], None]


def finetune_should_stop(train_acc: float, epoch: int, epochs_since_best: int, cfg) -> bool:
    """Paper: up to max_epochs, or once train accuracy reaches the target; optional patience."""
    return (
        train_acc >= cfg.stop_train_acc
        or epoch >= cfg.max_epochs
        or (cfg.patience is not None and epochs_since_best >= cfg.patience)
    )


def forget_should_stop(
    test_acc: float, epoch: int, cfg, formula: str = "random", finetuned_acc: float | None = None
) -> bool:
    """Up to max_epochs, or until the forget task's test accuracy reaches the method's aim.

    Methods that aim at chance stop below `stop_test_acc` (the paper: 50%). Flipped labels aim
    at the mirror image of the fine-tuned accuracy: stopping them at 50% would cap their
    forget ratio near 0.5 by construction, so they stop once accuracy <= 1 - acc_finetuned
    (`flipped_stop: mirror`), or only at the epoch budget (`flipped_stop: budget`)."""
    if epoch >= cfg.max_epochs:
        return True
    if formula != "flipped":
        return test_acc < cfg.stop_test_acc
    if cfg.flipped_stop == "budget" or finetuned_acc is None:
        return False
    return test_acc <= 1.0 - finetuned_acc + 1e-9  # accuracies are fractions k/n: no float-order misses


def relearn_should_stop(train_acc: float, epoch: int, cfg) -> bool:
    return train_acc >= cfg.stop_train_acc or epoch >= cfg.max_epochs


def failure_reason(exc: BaseException) -> str:
    """The one line a trials row keeps of an error."""
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]


def prepare_tasks(plan: TrialPlan, store: Store | None = None) -> dict[str, PreparedTask]:
    """The examples the sweep's driver prepared and recorded in the store, so that every
    trial, on any node, scores the very examples the `examples` table describes and no trial
    reads 21 datasets again. Prepared afresh only where the store has none (a trial run on
    its own, outside a sweep)."""
    relearn = plan.phases.relearn.task if plan.phases.relearn.enabled else None
    names = list(dict.fromkeys([plan.forget_task, *plan.eval_tasks, *([relearn] if relearn else [])]))
    out: dict[str, PreparedTask] = {}
    for name in names:
        path = store.path("examples", plan.sweep, f"{name}.parquet") if store is not None else None
        if path is not None and path.exists():
            out[name] = _from_examples_table(name, pq.read_table(path), str(path))
        else:
            out[name] = prepare_task(
                name,
                seed=plan.data.seed,
                cap=plan.data.cap,
                max_chars=plan.data.max_chars,
                source=plan.data.sources.get(name),
                need_train=name in (plan.forget_task, relearn),
            )
    return out


def _from_examples_table(name: str, table: pa.Table, source: str) -> PreparedTask:
    splits = examples_from_table(table, get_task(name).delimiter)
    return PreparedTask(name=name, splits=splits, report=PrepReport(task=name, source=f"store:{source}"))


def _eval_slices(plan: TrialPlan, tasks: dict[str, PreparedTask], train_set: list[Example]) -> list[EvalSlice]:
    # The forget task is always scored on all three splits (its train, validation and test
    # accuracy drive the stop rules), and its train split is the examples actually trained
    # on: with size < cap, the rest of the capped split was never seen.
    forget_splits = list(dict.fromkeys([*plan.scoring.splits, "train", "validation", "test"]))
    return [
        EvalSlice(t, s, train_set if (t, s) == (plan.forget_task, "train") else tasks[t].split(s))
        for t in dict.fromkeys([plan.forget_task, *plan.eval_tasks])
        for s in (forget_splits if t == plan.forget_task else plan.scoring.splits)
    ]


class PhaseHook:
    """What one phase adds to the shared epoch loop of `TrialRunner.train_phase`. The default
    is forget's and relearn's: stop when `should_stop` says so, decided from the forget task's
    accuracies before the commit, so that the last epoch (the phase's milestone) carries every
    evaluation task whatever the schedule, and the milestone's hidden states."""

    def __init__(self, should_stop: Callable[[Accuracies, int], bool] | None = None):
        self.should_stop = should_stop
        self.last = False

    def ends_here(self, acc: Accuracies, epoch: int) -> bool:
        """Known before the commit: this epoch ends the phase."""
        self.last = self.should_stop(acc, epoch)
        return self.last

    def after_commit(self, progress: Progress, epoch: int, res: ScoreResult | None, acc: Accuracies) -> bool:
        """After the commit: whether the phase stops here."""
        if progress.phase == "forget":
            progress.last_forget_epoch = epoch
        elif progress.phase == "relearn":
            progress.last_relearn_epoch = epoch
        return self.last

    def best_state(self) -> dict | None:
        """Weights to keep beside this epoch's resume point."""
        return None

    def finish(self, runner: "TrialRunner", progress: Progress) -> int | None:
        """After the last epoch; returns the phase's milestone epoch."""
        return progress.epoch


class BestEpoch(PhaseHook):
    """Fine-tuning: keep the best-validation weights (rank 0 alone holds them; the others
    receive them when the phase ends), stop on train accuracy, budget or patience, and leave
    the model at the best epoch: forgetting starts from there, not from the last epoch."""

    def __init__(self, runner: "TrialRunner", progress: Progress):
        super().__init__()
        self.runner, self.cfg, self.ft = runner, runner.plan.phases.finetune, runner.plan.forget_task
        self.state = runner.resume.take_best() if progress.best_epoch is not None and runner.group.is_main else None
        self.res: ScoreResult | None = None
        self.scored = False  # the same on every rank, unlike `res`
        self.since_best = 0 if progress.best_epoch is None else progress.epoch - progress.best_epoch

    def ends_here(self, acc: Accuracies, epoch: int) -> bool:
        return False

    def after_commit(self, progress: Progress, epoch: int, res: ScoreResult | None, acc: Accuracies) -> bool:
        ft = self.ft
        if acc[(ft, "validation")] > progress.best_val_acc:
            progress.best_val_acc, progress.best_epoch, self.since_best = acc[(ft, "validation")], epoch, 0
            progress.finetuned_test_acc = acc[(ft, "test")]
            if self.runner.group.is_main:
                self.state = {k: v.detach().to("cpu", copy=True) for k, v in self.runner.lm.model.state_dict().items()}
            self.res, self.scored = res, True
        else:
            self.since_best += 1
        return finetune_should_stop(acc[(ft, "train")], epoch, self.since_best, self.cfg)

    def best_state(self) -> dict | None:
        return self.state if self.since_best == 0 else None

    def finish(self, runner: "TrialRunner", progress: Progress) -> int | None:
        model, best, main = runner.lm.model, progress.best_epoch, runner.group.is_main
        if main:
            model.load_state_dict(self.state)
        runner.group.sync_module(model)
        # What the schedule skipped at the best epoch (known only now) is scored with its
        # weights: every milestone holds every evaluation task.
        skipped = [] if runner.plan.scoring.scores_others_at(best) else runner.other_slices
        scored = runner.slices[: len(runner.slices) - len(skipped)]
        res = self.res
        if not self.scored and runner.plan.scoring.hidden_states == "phase_end":
            res = runner.score(scored)  # resumed after the best epoch: its states are gone
        if skipped:
            extra = runner.score(skipped)
            if main:
                runner.records.extend_best(skipped, best, extra)
                res = concat_results([res, extra]) if res is not None else None
        if main:
            runner.records.add_best_hidden(runner.slices, best, res)
        return best


class TrialRunner:
    """The recipe of one trial: `setup`, then `run` the phases (each epoch trained, scored,
    committed and saved as a resume point), recording the failure if one ends it."""

    def __init__(
        self,
        plan: TrialPlan,
        store: Store,
        models_dir: Path,
        reporter: Reporter | None = None,
        device: str | None = None,
        faults: str | None = None,
        group: Group = SINGLE,
    ):
        self.plan = plan
        # Data-parallel ranks all run this class; rank 0 alone writes (store, resume points,
        # status rows, fault log) and every rank reports the same epoch results.
        self.group = group
        self.store = store
        self.models_dir = Path(models_dir)
        self.reporter = reporter or (lambda r: None)
        self.device = device or ("cuda" if plan.resources.gpu > 0 and torch.cuda.is_available() else "cpu")
        self.resume = ResumePoints(store, plan.sweep, plan.trial_id, plan.train.checkpoint, group)
        self.ckpt_dir = self.resume.dir
        self.records = TrialRecords(store, plan)
        self.pretrained = PretrainedScores(store, plan, self.device, group)
        self.faults = FaultPoints(faults, plan.trial_id, group.rank, self.ckpt_dir)  # off unless asked for
        self.attempt = 1
        # Set by `setup`:
        self.train_set: list[Example] = []
        self.relearn_set: list[Example] = []  # what the relearning attack trains on
        self.slices: list[EvalSlice] = []  # the forget task's first, then the other tasks'
        self.other_slices: list[EvalSlice] = []
        self.lm: LoadedModel | None = None
        self.method: ForgetMethod | None = None

    def setup(self) -> None:
        p, relearn = self.plan, self.plan.phases.relearn
        tasks = prepare_tasks(p, self.store)
        self.train_set = tasks[p.forget_task].split("train")[: p.size]
        relearn_source = tasks[relearn.task].split("train") if relearn.enabled and relearn.task else self.train_set
        self.relearn_set = relearn_source[: relearn.examples or p.size]
        self.slices = _eval_slices(p, tasks, self.train_set)
        self.other_slices = [sl for sl in self.slices if sl.task != p.forget_task]
        self.lm = self._load_model()
        policy = p.train.checkpoint_optimizer
        n_params = sum(t.numel() for t in self.lm.model.parameters())
        self.resume.keep_optimizer = policy if isinstance(policy, bool) else n_params <= OPTIMIZER_STATE_MAX_PARAMS
        self.method = get_method(p.method, p.method_args)

    def _load_model(self) -> LoadedModel:
        return load_model(self.plan.model, self.models_dir, device=self.device)

    def run(self, attempt: int = 1) -> Progress:
        self.attempt = self.resume.attempt = self.faults.attempt = attempt
        # The lock comes first: if another live process still owns this trial (a retry racing
        # its predecessor's exit), fail here without touching that process's status row.
        main = self.group.is_main
        with self.resume.lock() if main else contextlib.nullcontext():
            progress = Progress()
            try:
                self.setup()
                if main:
                    remove_temp_files(self.store, self.plan.sweep, self.plan.trial_id)
                progress, opt_state, self.lm = self.resume.load(self.lm, self._load_model)
                self._write_status("running", progress)
                progress = self._run_phases(progress, opt_state)
                self._write_status("done", progress)
                return progress
            except BaseException as exc:
                failure = DiskFull(self.store.root, no_space_where(exc, self.store.root)) if is_no_space(exc) else exc
                self._record_failure(failure, progress, attempt)
                if failure is exc:
                    raise
                raise failure from exc  # the reason in words, not torch's

    def _run_phases(self, progress: Progress, opt_state: dict | None) -> Progress:
        p, gold = self.plan, [ex.gold for ex in self.train_set]
        if progress.phase == "pretrained" and progress.epoch < 0:
            t0 = time.time()
            res = self.pretrained.score(self.lm, self.slices)  # shared by the sweep's trials of this model
            acc = self.group.broadcast(accuracies(self.slices, res) if self.group.is_main else None)
            self._commit("pretrained", 0, res, acc, float("nan"), time.time() - t0, phase_end=True)
            progress = Progress(phase="finetune", epoch=0)
            self.save(progress, None, None)
            self.fault_point("resume", "pretrained", 0)
        if progress.phase == "finetune" and not progress.phase_done:
            hook = BestEpoch(self, progress)
            progress = self.train_phase(p.phases.finetune, progress, opt_state, lambda epoch: gold, nll_loss, hook)
            opt_state = None
        if progress.phase == "finetune" and progress.phase_done and not self.method.forgets:
            return progress  # a reference trial: fine-tuned, never forgotten
        if progress.phase == "finetune" and progress.phase_done:
            progress = _next_phase(progress, "forget")
            self.method.prepare(self.lm.model, self._epoch_batches("forget", 0, gold, p.phases.forget))
            progress.method_state = self.method.state_dict()
        elif progress.phase in ("forget", "relearn") and progress.method_state:
            self.method.load_state_dict(progress.method_state)
        if progress.phase == "forget" and not progress.phase_done:
            progress, opt_state = self._forget(progress, opt_state), None
        if p.phases.relearn.enabled and progress.phase == "forget" and progress.phase_done:
            progress = _next_phase(progress, "relearn")
        if progress.phase == "relearn" and not progress.phase_done:
            progress = self._relearn(progress, opt_state)
        return progress

    def _forget(self, progress: Progress, opt_state: dict | None) -> Progress:
        cfg, seed = self.plan.phases.forget, self.plan.seed

        def targets(epoch: int) -> list[int]:
            rng = random.Random(derived_seed(seed, "forget", epoch, "labels"))
            return self.method.targets(self.train_set, epoch, rng)

        def should_stop(acc: Accuracies, epoch: int) -> bool:
            test_acc = acc[(self.plan.forget_task, "test")]
            return forget_should_stop(test_acc, epoch, cfg, self.method.ratio_formula, progress.finetuned_test_acc)

        return self.train_phase(cfg, progress, opt_state, targets, self.method.loss, PhaseHook(should_stop))

    def _relearn(self, progress: Progress, opt_state: dict | None) -> Progress:
        # True labels of the attack's examples; the stop rule reads the whole forgotten set.
        cfg, gold = self.plan.phases.relearn, [ex.gold for ex in self.relearn_set]
        hook = PhaseHook(lambda acc, epoch: relearn_should_stop(acc[(self.plan.forget_task, "train")], epoch, cfg))
        return self.train_phase(cfg, progress, opt_state, lambda epoch: gold, nll_loss, hook)

    def train_phase(
        self, cfg: PhaseConfig, progress: Progress, opt_state: dict | None, targets, loss_fn, hook: PhaseHook
    ) -> Progress:
        """The one epoch loop: train towards `targets(epoch)`, score, commit, save a resume
        point, until the hook says the phase is over; then close the phase."""
        phase, model = progress.phase, self.lm.model
        opt = make_optimizer(model, cfg, self.plan.train, self.group)
        if opt_state:
            opt.load_state_dict(opt_state)
        for epoch in range(progress.epoch + 1, cfg.max_epochs + 1):
            t0 = time.time()
            loss = train_epoch(model, opt, self._epoch_batches(phase, epoch, targets(epoch), cfg), loss_fn, self.group)
            slices, res, acc, last = self._score_epoch(epoch, hook)
            self._commit(phase, epoch, res, acc, loss, time.time() - t0, phase_end=last, slices=slices)
            progress.epoch = epoch
            if hook.after_commit(progress, epoch, res, acc):
                break
            self.save(progress, opt, hook.best_state())
            self.fault_point("resume", phase, epoch)
        opt.close()
        milestone = hook.finish(self, progress)
        # Close the phase: drop what an earlier attempt left beyond its last epoch, then a
        # resume point that says the phase is done (after the commit of its last epoch).
        progress.phase_done = True
        progress.phase_epochs[phase] = progress.epoch
        if self.group.is_main:
            self.records.drop_stale(phase, progress.epoch, milestone)
        self.save(progress, None, None)
        self.fault_point("resume", phase, progress.epoch)
        if phase != "relearn":  # the trial's milestones so far, visible in `status`
            self._write_status("running", progress)
        return progress

    def save(self, progress: Progress, optimizer: torch.optim.Optimizer | None, best_state: dict | None) -> None:
        self.resume.save(progress, self.lm.model, optimizer, best_state)

    def _epoch_batches(self, phase: str, epoch: int, targets: list[int], cfg: PhaseConfig):
        rng = random.Random(derived_seed(self.plan.seed, phase, epoch, "batches"))
        torch.manual_seed(derived_seed(self.plan.seed, phase, epoch, "torch"))
        examples = self.relearn_set if phase == "relearn" else self.train_set
        return build_batches(self.lm.tokenizer, self.lm.model, examples, targets, cfg.batch_size, rng)

    def score(self, slices: list[EvalSlice]) -> ScoreResult | None:
        """Scores of the slices (rank 0 holds them)."""
        return score_all(self.lm, slices, self.plan.scoring, self.group, hidden_task(self.plan))

    def _accuracies(self, slices: list[EvalSlice], res: ScoreResult | None) -> Accuracies:
        # Every rank: they drive the stop rules.
        return self.group.broadcast(accuracies(slices, res) if self.group.is_main else None)

    def _score_epoch(self, epoch: int, hook: PhaseHook) -> tuple[list[EvalSlice], ScoreResult | None, Accuracies, bool]:
        """The slices scored this epoch, their scores and accuracies, and whether the epoch
        ends the phase. Off the schedule only the forget task is scored, unless its
        accuracies end the phase here: then the other tasks are too, as at every milestone."""
        on_schedule = self.plan.scoring.scores_others_at(epoch) or not self.other_slices
        slices = self.slices if on_schedule else self.slices[: len(self.slices) - len(self.other_slices)]
        res = self.score(slices)
        acc = self._accuracies(slices, res)
        last = hook.ends_here(acc, epoch)
        if last and not on_schedule:
            extra = self.score(self.other_slices)
            acc = {**acc, **self._accuracies(self.other_slices, extra)}
            res = concat_results([res, extra]) if self.group.is_main else None
            slices = self.slices
        return slices, res, acc, last

    def _commit(
        self, phase: str, epoch: int, res, acc: Accuracies, loss: float, seconds: float, phase_end: bool, slices=None
    ):
        report = EpochReport.of(self.plan, phase, epoch, loss, acc)
        if self.group.is_main:
            self.records.commit(slices or self.slices, report, res, seconds, phase_end)
        self.fault_point("commit", phase, epoch)
        self.reporter(report)

    def fault_point(self, point: str, phase: str, epoch: int) -> None:
        self.faults.at(point, phase, epoch)

    def _write_status(self, status: str, progress: Progress, error: str | None = None) -> None:
        if self.group.is_main:
            self.records.write_status(status, progress, self.attempt, error)

    def _record_failure(self, exc: BaseException, progress: Progress, attempt: int) -> None:
        full = isinstance(exc, DiskFull)
        # A full disk: the partial files go first (their space is what lets the failure be
        # recorded at all), and recording it may still fail.
        with contextlib.suppress(Exception) if full else contextlib.nullcontext():
            if full and self.group.is_main:
                remove_temp_files(self.store, self.plan.sweep, self.plan.trial_id)
            self._write_status("failed", progress, error=failure_reason(exc))
            self.resume.write_error(attempt, traceback.format_exc())


def _next_phase(progress: Progress, phase: str) -> Progress:
    return Progress.from_dict({**progress.to_dict(), "phase": phase, "epoch": 0, "phase_done": False})
