"""One trial: pretrained eval -> finetune -> forget -> (relearn), scoring after every epoch.

The trial is a small state machine over (phase, epoch). After each epoch it scores every
example of every evaluation task, commits the rows to the store (marker last), then saves a
resume point. Randomness is derived from (seed, phase, epoch), never carried across epochs,
so a trial resumed from its last resume point writes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from raysweep.methods import ForgetMethod, get_method, nll_loss
from raysweep.models import LoadedModel, load_model
from raysweep.scoring import ScoreResult, score_examples
from raysweep.spec import PhaseConfig, TrialPlan
from raysweep.store import EpochKey, EpochRecord, Store, hidden_schema
from raysweep.tasks import Example, PreparedTask, prepare_task
from raysweep.train import build_batches, make_optimizer, train_epoch


@dataclass(frozen=True)
class EpochReport:
    """What a trial tells the scheduler after each epoch (shown in the live progress view)."""

    trial_id: str
    phase: str
    epoch: int
    train_loss: float
    forget_train_acc: float
    forget_validation_acc: float
    forget_test_acc: float
    eval_test_acc: float  # mean test accuracy over all evaluation tasks


Reporter = Callable[[EpochReport], None]


@dataclass
class Progress:
    """The resume point's bookkeeping: where the trial is and what it has decided so far."""

    phase: str = "pretrained"
    epoch: int = -1  # last epoch whose weights this resume point holds
    phase_done: bool = False
    best_val_acc: float = -1.0
    best_epoch: int | None = None
    last_forget_epoch: int | None = None
    last_relearn_epoch: int | None = None
    npo_reference: dict[int, float] = field(default_factory=dict)


@dataclass
class EvalSlice:
    task: str
    split: str
    examples: list[Example]


def finetune_should_stop(train_acc: float, epoch: int, epochs_since_best: int, cfg) -> bool:
    """Paper: up to max_epochs, or once train accuracy reaches the target; optional patience."""
    return train_acc >= cfg.stop_train_acc or epoch >= cfg.max_epochs or (cfg.patience is not None and epochs_since_best >= cfg.patience)


def forget_should_stop(test_acc: float, epoch: int, cfg) -> bool:
    """Paper: up to max_epochs, or until the forget task's test accuracy drops below 50%."""
    return test_acc < cfg.stop_test_acc or epoch >= cfg.max_epochs


def relearn_should_stop(train_acc: float, epoch: int, cfg) -> bool:
    return train_acc >= cfg.stop_train_acc or epoch >= cfg.max_epochs


def _seed_for(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def prepare_tasks(plan: TrialPlan) -> dict[str, PreparedTask]:
    names = list(dict.fromkeys([plan.forget_task, *plan.eval_tasks]))
    return {n: prepare_task(n, seed=plan.data.seed, cap=plan.data.cap, max_chars=plan.data.max_chars, source=plan.data.sources.get(n)) for n in names}


class TrialRunner:
    def __init__(self, plan: TrialPlan, store: Store, models_dir: Path, reporter: Reporter | None = None, device: str | None = None):
        self.plan = plan
        self.store = store
        self.models_dir = Path(models_dir)
        self.reporter = reporter or (lambda r: None)
        self.device = device or ("cuda" if plan.resources.gpu > 0 and torch.cuda.is_available() else "cpu")
        self.ckpt_dir = store.path("checkpoints", plan.sweep, plan.trial_id)

    # ---- setup ---------------------------------------------------------------------------

    def _setup(self) -> None:
        p = self.plan
        self.tasks = prepare_tasks(p)
        forget = self.tasks[p.forget_task]
        self.train_set = forget.split("train")[: p.size]
        eval_names = list(dict.fromkeys([p.forget_task, *p.eval_tasks]))
        self.slices = [EvalSlice(t, s, self.tasks[t].split(s)) for t in eval_names for s in p.scoring.splits]
        if not any(s.task == p.forget_task and s.split == "test" for s in self.slices):
            # Stop rules read the forget task's validation and test accuracy: always score them.
            self.slices += [EvalSlice(p.forget_task, s, forget.split(s)) for s in ("train", "validation", "test") if s not in p.scoring.splits]
        self.flat = [ex for sl in self.slices for ex in sl.examples]
        self.lm: LoadedModel = load_model(p.model, self.models_dir, device=self.device)
        self.method: ForgetMethod = get_method(p.method, beta=p.phases.forget.npo_beta)

    # ---- scoring and commits -------------------------------------------------------------

    def _score(self) -> ScoreResult:
        return score_examples(self.lm.model, self.lm.tokenizer, self.flat, batch_size=self.plan.scoring.batch_size, capture_hidden=self.plan.scoring.hidden_states != "none")

    def _accuracies(self, res: ScoreResult) -> dict[tuple[str, str], float]:
        gold = np.array([ex.gold for ex in self.flat])
        correct = res.prediction() == gold
        out, start = {}, 0
        for sl in self.slices:
            n = len(sl.examples)
            out[(sl.task, sl.split)] = float(correct[start : start + n].mean()) if n else float("nan")
            start += n
        return out

    def _tables(self, phase: str, epoch: int, res: ScoreResult, with_hidden: bool) -> tuple[pa.Table, pa.Table | None]:
        p = self.plan
        n = len(self.flat)
        gold = np.array([ex.gold for ex in self.flat], dtype=np.int64)
        rows = np.arange(n)
        mean, total = res.ll_mean, res.ll_sum
        pred = res.prediction()
        task_col = [sl.task for sl in self.slices for _ in sl.examples]
        split_col = [sl.split for sl in self.slices for _ in sl.examples]
        idx_col = np.array([ex.idx for ex in self.flat], dtype=np.int32)
        common = {
            "sweep": pa.array([p.sweep] * n, pa.string()),
            "trial_id": pa.array([p.trial_id] * n, pa.string()),
            "phase": pa.array([phase] * n, pa.string()),
            "epoch": pa.array(np.full(n, epoch, dtype=np.int32)),
            "eval_task": pa.array(task_col, pa.string()),
            "split": pa.array(split_col, pa.string()),
            "example_idx": pa.array(idx_col),
        }
        scores = pa.table(
            {
                **common,
                "gold": pa.array(gold.astype(np.int8)),
                "ll_sum_correct": pa.array(total[rows, gold].astype(np.float32)),
                "ll_sum_distractor": pa.array(total[rows, 1 - gold].astype(np.float32)),
                "ll_mean_correct": pa.array(mean[rows, gold].astype(np.float32)),
                "ll_mean_distractor": pa.array(mean[rows, 1 - gold].astype(np.float32)),
                "n_tokens_correct": pa.array(res.n_tokens[rows, gold].astype(np.int16)),
                "n_tokens_distractor": pa.array(res.n_tokens[rows, 1 - gold].astype(np.int16)),
                "confidence": pa.array(res.confidence(gold).astype(np.float32)),
                "prediction": pa.array(pred),
                "correct": pa.array(pred == gold),
            }
        )
        hidden = None
        if with_hidden and res.hidden is not None:
            d = res.hidden.shape[1]
            flat_values = pa.array(res.hidden.reshape(-1).astype(np.float32))
            hidden = pa.table({**common, "hidden": pa.FixedSizeListArray.from_arrays(flat_values, d)}, schema=hidden_schema(d))
        return scores, hidden

    def _commit(self, phase: str, epoch: int, res: ScoreResult, train_loss: float, seconds: float, phase_end: bool) -> dict[tuple[str, str], float]:
        p = self.plan
        acc = self._accuracies(res)
        policy = p.scoring.hidden_states
        with_hidden = policy == "every_epoch" or (policy == "phase_end" and phase_end)
        scores, hidden = self._tables(phase, epoch, res, with_hidden)
        ft = p.forget_task
        summary = pa.table(
            {
                "sweep": [p.sweep],
                "trial_id": [p.trial_id],
                "phase": [phase],
                "epoch": pa.array([epoch], pa.int32()),
                "train_loss": pa.array([train_loss], pa.float32()),
                "forget_train_acc": pa.array([acc.get((ft, "train"), float("nan"))], pa.float32()),
                "forget_validation_acc": pa.array([acc[(ft, "validation")]], pa.float32()),
                "forget_test_acc": pa.array([acc[(ft, "test")]], pa.float32()),
                "seconds": pa.array([seconds], pa.float32()),
            }
        )
        self.store.commit_epoch(EpochRecord(EpochKey(p.sweep, p.trial_id, phase, epoch), scores, summary, hidden))
        test_accs = [v for (t, s), v in acc.items() if s == "test"]
        self.reporter(
            EpochReport(
                p.trial_id, phase, epoch, train_loss,
                acc.get((ft, "train"), float("nan")), acc[(ft, "validation")], acc[(ft, "test")],
                float(np.mean(test_accs)),
            )
        )
        return acc

    def _write_best_hidden(self, epoch: int, res: ScoreResult) -> None:
        """The fine-tuned milestone is the best-validation epoch, known only when the phase
        ends: its hidden states are kept in memory until then and written beside its scores."""
        if self.plan.scoring.hidden_states != "phase_end":
            return
        _, hidden = self._tables("finetune", epoch, res, with_hidden=True)
        if hidden is not None:
            from raysweep.store import atomic_write_table

            key = EpochKey(self.plan.sweep, self.plan.trial_id, "finetune", epoch)
            atomic_write_table(self.store.path("hidden", f"{key.rel}.parquet"), hidden)

    # ---- resume points -------------------------------------------------------------------

    def _save_resume(self, progress: Progress, optimizer: torch.optim.Optimizer | None, best_state: dict | None) -> None:
        policy = self.plan.train.checkpoint
        if policy == "none" or (policy == "phase" and not progress.phase_done):
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "progress": asdict(progress),
            "model": self.lm.model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None and self.plan.train.checkpoint_optimizer else None,
        }
        _atomic_torch_save(payload, self.ckpt_dir / "latest.pt")
        if best_state is not None:
            _atomic_torch_save(best_state, self.ckpt_dir / "best_finetune.pt")

    def _load_resume(self) -> tuple[Progress, dict | None]:
        path = self.ckpt_dir / "latest.pt"
        if not path.exists():
            return Progress(), None
        payload = torch.load(path, map_location=self.device, weights_only=False)
        self.lm.model.load_state_dict(payload["model"])
        return Progress(**payload["progress"]), payload.get("optimizer")

    # ---- the phases ----------------------------------------------------------------------

    def _epoch_batches(self, phase: str, epoch: int, targets: list[int], cfg: PhaseConfig):
        rng = random.Random(_seed_for(self.plan.seed, phase, epoch, "batches"))
        torch.manual_seed(_seed_for(self.plan.seed, phase, epoch, "torch"))
        return build_batches(self.lm.tokenizer, self.lm.model, self.train_set, targets, cfg.batch_size, rng)

    def _write_status(self, status: str, progress: Progress, error: str | None = None, attempts: int | None = None) -> None:
        p = self.plan
        self.store.write_trial_row(
            {
                **trial_row(p),
                "status": status,
                "error": error,
                "attempts": attempts,
                "best_finetune_epoch": progress.best_epoch,
                "last_forget_epoch": progress.last_forget_epoch,
                "last_relearn_epoch": progress.last_relearn_epoch,
            }
        )

    def run(self, attempt: int = 1) -> Progress:
        progress = Progress()
        try:
            self._setup()
            progress, opt_state = self._load_resume()
            self._write_status("running", progress, attempts=attempt)
            progress = self._run_phases(progress, opt_state)
            self._write_status("done", progress, attempts=attempt)
            return progress
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
            self._write_status("failed", progress, error=reason, attempts=attempt)
            (self.ckpt_dir).mkdir(parents=True, exist_ok=True)
            (self.ckpt_dir / f"error-{attempt}.txt").write_text(traceback.format_exc())
            raise

    def _run_phases(self, progress: Progress, opt_state: dict | None) -> Progress:
        p = self.plan
        model = self.lm.model

        if progress.phase == "pretrained" and progress.epoch < 0:
            t0 = time.time()
            self._commit("pretrained", 0, self._score(), float("nan"), time.time() - t0, phase_end=True)
            progress = Progress(phase="finetune", epoch=0)
            self._save_resume(progress, None, None)

        if progress.phase == "finetune" and not progress.phase_done:
            progress = self._finetune(progress, opt_state)
            opt_state = None

        if progress.phase == "finetune" and progress.phase_done:
            progress = Progress(**{**asdict(progress), "phase": "forget", "epoch": 0, "phase_done": False})
            self.method.prepare(model, self._epoch_batches("forget", 0, [ex.gold for ex in self.train_set], p.phases.forget))
            progress.npo_reference = dict(getattr(self.method, "_ref", {}))
        elif progress.phase in ("forget", "relearn") and progress.npo_reference and hasattr(self.method, "_ref"):
            self.method._ref = {int(k): v for k, v in progress.npo_reference.items()}

        if progress.phase == "forget" and not progress.phase_done:
            progress = self._forget(progress, opt_state)
            opt_state = None

        if p.phases.relearn.enabled and progress.phase == "forget" and progress.phase_done:
            progress = Progress(**{**asdict(progress), "phase": "relearn", "epoch": 0, "phase_done": False})
        if progress.phase == "relearn" and not progress.phase_done:
            progress = self._relearn(progress, opt_state)
        return progress

    def _finetune(self, progress: Progress, opt_state: dict | None) -> Progress:
        cfg = self.plan.phases.finetune
        ft = self.plan.forget_task
        model = self.lm.model
        opt = make_optimizer(model, cfg)
        if opt_state:
            opt.load_state_dict(opt_state)
        best_state = None
        best_res: ScoreResult | None = None
        best_path = self.ckpt_dir / "best_finetune.pt"
        if progress.best_epoch is not None and best_path.exists():
            best_state = torch.load(best_path, map_location="cpu", weights_only=False)
        since_best = 0 if progress.best_epoch is None else progress.epoch - progress.best_epoch
        gold = [ex.gold for ex in self.train_set]
        for epoch in range(progress.epoch + 1, cfg.max_epochs + 1):
            t0 = time.time()
            loss = train_epoch(model, opt, self._epoch_batches("finetune", epoch, gold, cfg), nll_loss, cfg.grad_clip)
            res = self._score()
            acc = self._commit("finetune", epoch, res, loss, time.time() - t0, phase_end=False)
            progress.epoch = epoch
            if acc[(ft, "validation")] > progress.best_val_acc:
                progress.best_val_acc, progress.best_epoch, since_best = acc[(ft, "validation")], epoch, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best_res = res
            else:
                since_best += 1
            if finetune_should_stop(acc[(ft, "train")], epoch, since_best, cfg):
                break
            self._save_resume(progress, opt, best_state if since_best == 0 else None)
        # Forgetting starts from the best-validation checkpoint, not the last epoch.
        model.load_state_dict(best_state)
        if best_res is None:
            best_res = self._score()  # resumed after the best epoch: recompute its hidden states
        self._write_best_hidden(progress.best_epoch, best_res)
        progress.phase_done = True
        self._save_resume(progress, None, None)
        self._write_status("running", progress)
        return progress

    def _forget(self, progress: Progress, opt_state: dict | None) -> Progress:
        cfg = self.plan.phases.forget
        ft = self.plan.forget_task
        model = self.lm.model
        opt = make_optimizer(model, cfg)
        if opt_state:
            opt.load_state_dict(opt_state)
        for epoch in range(progress.epoch + 1, cfg.max_epochs + 1):
            t0 = time.time()
            rng = random.Random(_seed_for(self.plan.seed, "forget", epoch, "labels"))
            targets = self.method.targets(self.train_set, epoch, rng)
            loss = train_epoch(model, opt, self._epoch_batches("forget", epoch, targets, cfg), self.method.loss, cfg.grad_clip)
            res = self._score()
            acc = self._accuracies(res)
            last = forget_should_stop(acc[(ft, "test")], epoch, cfg)
            self._commit("forget", epoch, res, loss, time.time() - t0, phase_end=last)
            progress.epoch = epoch
            progress.last_forget_epoch = epoch
            if last:
                break
            self._save_resume(progress, opt, None)
        progress.phase_done = True
        self._save_resume(progress, None, None)
        self._write_status("running", progress)
        return progress

    def _relearn(self, progress: Progress, opt_state: dict | None) -> Progress:
        cfg = self.plan.phases.relearn
        ft = self.plan.forget_task
        model = self.lm.model
        opt = make_optimizer(model, cfg)
        if opt_state:
            opt.load_state_dict(opt_state)
        gold = [ex.gold for ex in self.train_set]
        for epoch in range(progress.epoch + 1, cfg.max_epochs + 1):
            t0 = time.time()
            loss = train_epoch(model, opt, self._epoch_batches("relearn", epoch, gold, cfg), nll_loss, cfg.grad_clip)
            res = self._score()
            acc = self._accuracies(res)
            last = relearn_should_stop(acc[(ft, "train")], epoch, cfg)
            self._commit("relearn", epoch, res, loss, time.time() - t0, phase_end=last)
            progress.epoch = epoch
            progress.last_relearn_epoch = epoch
            if last:
                break
            self._save_resume(progress, opt, None)
        progress.phase_done = True
        self._save_resume(progress, None, None)
        return progress


def trial_row(plan: TrialPlan) -> dict:
    return {
        "sweep": plan.sweep,
        "trial_id": plan.trial_id,
        "model": plan.model.name,
        "model_source": f"builtin:{plan.model.arch}" if plan.model.builtin else plan.model.path,
        "forget_task": plan.forget_task,
        "method": plan.method,
        "size": plan.size,
        "seed": plan.seed,
        "plan_json": plan.model_dump_json(),
    }


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.parent / f"_{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
