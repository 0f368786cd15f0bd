"""One trial: pretrained eval -> finetune -> forget -> (relearn), scoring after every epoch.

The trial is a small state machine over (phase, epoch). After each epoch it scores every
example of every evaluation task, commits the rows to the store (marker last), then saves a
resume point. Randomness is derived from (seed, phase, epoch), never carried across epochs,
so a trial resumed from its last resume point writes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
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
import pyarrow.parquet as pq
import torch

from raysweep.distributed import SINGLE, Group
from raysweep.methods import ForgetMethod, get_method, nll_loss
from raysweep.models import LoadedModel, load_model, model_source
from raysweep.scoring import PAIR_0, PAIR_1, PROMPT, ScoreResult, score_examples
from raysweep.spec import PhaseConfig, TrialPlan
from raysweep.faults import parse_faults
from raysweep.faults import fire as fire_fault
from raysweep.errors import DiskFull, is_no_space, no_space_where
from raysweep.store import EPOCH_KINDS, INTERRUPT_ERRORS, EpochKey, EpochRecord, Store, hidden_schema, torch_file_problem
from raysweep.tasks import Example, PreparedTask, prepare_task
from raysweep.train import build_batches, make_optimizer, resume_safe_globals, train_epoch


# checkpoint_optimizer: auto keeps optimizer state in resume points up to this model size.
OPTIMIZER_STATE_MAX_PARAMS = 1_000_000_000


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
    # The forget task's test accuracy at the best fine-tune epoch: the flipped stop rule's aim.
    finetuned_test_acc: float | None = None
    npo_reference: dict[int, float] = field(default_factory=dict)
    # Last epoch of each finished phase: on resume, every epoch up to the resume point must
    # still be committed (see `_missing_epochs`).
    phase_epochs: dict[str, int] = field(default_factory=dict)


@dataclass
class EvalSlice:
    task: str
    split: str
    examples: list[Example]


def finetune_should_stop(train_acc: float, epoch: int, epochs_since_best: int, cfg) -> bool:
    """Paper: up to max_epochs, or once train accuracy reaches the target; optional patience."""
    return train_acc >= cfg.stop_train_acc or epoch >= cfg.max_epochs or (cfg.patience is not None and epochs_since_best >= cfg.patience)


def forget_should_stop(test_acc: float, epoch: int, cfg, formula: str = "random", finetuned_acc: float | None = None) -> bool:
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


def _seed_for(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def prepare_tasks(plan: TrialPlan, store: Store | None = None) -> dict[str, PreparedTask]:
    """The examples the sweep's driver prepared and recorded in the store, so that every
    trial, on any node, scores the very examples the `examples` table describes and no trial
    reads 21 datasets again. Prepared afresh only where the store has none (a trial run on
    its own, outside a sweep)."""
    names = list(dict.fromkeys([plan.forget_task, *plan.eval_tasks]))
    out: dict[str, PreparedTask] = {}
    for name in names:
        path = store.path("examples", plan.sweep, f"{name}.parquet") if store is not None else None
        if path is not None and path.exists():
            out[name] = _from_examples_table(name, pq.read_table(path), str(path))
        else:
            out[name] = prepare_task(
                name, seed=plan.data.seed, cap=plan.data.cap, max_chars=plan.data.max_chars,
                source=plan.data.sources.get(name), need_train=name == plan.forget_task,
            )
    return out


def _from_examples_table(name: str, table: pa.Table, source: str) -> PreparedTask:
    from raysweep.tasks import get_task
    from raysweep.tasks.base import PrepReport

    delimiter = get_task(name).delimiter
    splits: dict[str, list[Example]] = {s: [] for s in ("train", "validation", "test")}
    for r in sorted(table.to_pylist(), key=lambda r: (r["split"], r["example_idx"])):
        splits[r["split"]].append(Example(idx=r["example_idx"], uid=r["uid"], prompt=r["prompt"], choices=(r["choice_0"], r["choice_1"]), gold=r["gold"], delimiter=delimiter))
    return PreparedTask(name=name, splits=splits, report=PrepReport(task=name, source=f"store:{source}"))


class TrialRunner:
    def __init__(self, plan: TrialPlan, store: Store, models_dir: Path, reporter: Reporter | None = None, device: str | None = None, faults: str | None = None, group: Group = SINGLE):
        self.plan = plan
        # Data-parallel ranks all run this class; rank 0 alone writes (store, resume points,
        # status rows, fault log) and every rank reports the same epoch results.
        self.group = group
        self.store = store
        self.models_dir = Path(models_dir)
        self.reporter = reporter or (lambda r: None)
        self.device = device or ("cuda" if plan.resources.gpu > 0 and torch.cuda.is_available() else "cpu")
        self.ckpt_dir = store.path("checkpoints", plan.sweep, plan.trial_id)
        # Test hook (raysweep/faults.py): off unless RAYSWEEP_FAULT is set.
        self.faults = parse_faults(faults if faults is not None else os.environ.get("RAYSWEEP_FAULT"))
        self.attempt = 1
        self.lock_timeout = 120.0  # seconds to wait for another process still running this trial
        self._resumed_best: dict | None = None  # best fine-tuning weights `_read_resume` checked
        self._expect_parts: int | None = 0  # ranks whose optimizer parts the resume point names

    # ---- setup ---------------------------------------------------------------------------

    def _setup(self) -> None:
        p = self.plan
        self.tasks = prepare_tasks(p, self.store)
        forget = self.tasks[p.forget_task]
        self.train_set = forget.split("train")[: p.size]
        eval_names = list(dict.fromkeys([p.forget_task, *p.eval_tasks]))
        # The forget task is always scored on all three splits (its train, validation and test
        # accuracy drive the stop rules), and its train split is the examples actually trained
        # on: with size < cap, the rest of the capped split was never seen.
        forget_splits = list(dict.fromkeys([*p.scoring.splits, "train", "validation", "test"]))
        self.slices = [
            EvalSlice(t, s, self.train_set if (t, s) == (p.forget_task, "train") else self.tasks[t].split(s))
            for t in eval_names
            for s in (forget_splits if t == p.forget_task else p.scoring.splits)
        ]
        self.flat = [ex for sl in self.slices for ex in sl.examples]
        self.lm: LoadedModel = load_model(p.model, self.models_dir, device=self.device)
        policy = p.train.checkpoint_optimizer
        n_params = sum(t.numel() for t in self.lm.model.parameters())
        self.keep_optimizer = policy if isinstance(policy, bool) else n_params <= OPTIMIZER_STATE_MAX_PARAMS
        self.method: ForgetMethod = get_method(p.method, beta=p.phases.forget.npo_beta)

    # ---- scoring and commits -------------------------------------------------------------

    def _score(self) -> ScoreResult | None:
        """Every example scored; with several ranks each scores every world-th example
        (interleaved, so lengths balance) and rank 0 gathers the whole result."""
        g = self.group
        mine = self.flat[g.rank :: g.world]
        scoring = self.plan.scoring
        part = score_examples(
            self.lm.model, self.lm.tokenizer, mine, batch_size=scoring.batch_size,
            capture_hidden=scoring.hidden_states != "none", layers=scoring.layers,
        )
        if g.world == 1:
            return part
        parts = g.gather(part)
        return _interleave(parts, len(self.flat)) if g.is_main else None

    def _score_epoch(self) -> tuple[ScoreResult | None, dict[tuple[str, str], float]]:
        """Scores (rank 0) and accuracies (every rank: they drive the stop rules)."""
        res = self._score()
        return res, self.group.broadcast(self._accuracies(res) if self.group.is_main else None)

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
            hidden = _hidden_table(common, res, gold)
        return scores, hidden

    def _commit(self, phase: str, epoch: int, res: ScoreResult | None, acc: dict[tuple[str, str], float], train_loss: float, seconds: float, phase_end: bool) -> None:
        p = self.plan
        ft = p.forget_task
        if self.group.is_main:
            self._write_epoch(phase, epoch, res, acc, train_loss, seconds, phase_end)
        self._fault_point("commit", phase, epoch)
        test_accs = [v for (t, s), v in acc.items() if s == "test"]
        self.reporter(
            EpochReport(
                p.trial_id, phase, epoch, train_loss,
                acc.get((ft, "train"), float("nan")), acc[(ft, "validation")], acc[(ft, "test")],
                float(np.mean(test_accs)),
            )
        )

    def _write_epoch(self, phase: str, epoch: int, res: ScoreResult, acc: dict[tuple[str, str], float], train_loss: float, seconds: float, phase_end: bool) -> None:
        p = self.plan
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

    def _write_best_hidden(self, epoch: int, res: ScoreResult) -> None:
        """The fine-tuned milestone is the best-validation epoch, known only when the phase
        ends: its hidden states are kept in memory until then and written beside its scores."""
        if self.plan.scoring.hidden_states != "phase_end" or not self.group.is_main or res is None:
            return
        _, hidden = self._tables("finetune", epoch, res, with_hidden=True)
        if hidden is not None:
            self.store.add_to_commit(EpochKey(self.plan.sweep, self.plan.trial_id, "finetune", epoch), "hidden", hidden)

    def _drop_stale(self, phase: str, last: int, milestone: int | None) -> None:
        """Called when a phase ends at epoch `last`. An earlier attempt of this trial may have
        gone further (or kept hidden states of another epoch) before it died: a rerun that is
        not bit-identical (GPU kernels) can stop at a different epoch. Those rows belong to no
        trajectory, so they go; with deterministic reruns there is never anything to drop."""
        if not self.group.is_main:
            return
        s, t = self.plan.sweep, self.plan.trial_id
        on_disk = set(self.store.committed_epochs(s, t).get(phase, []))
        for kind in EPOCH_KINDS:
            on_disk |= set(self.store.epoch_files(kind, s, t, phase))
        for e in sorted(e for e in on_disk if e > last):
            self.store.uncommit(EpochKey(s, t, phase, e))
        if self.plan.scoring.hidden_states == "phase_end":
            for e in self.store.epoch_files("hidden", s, t, phase):
                if e <= last and e != milestone:
                    self.store.uncommit(EpochKey(s, t, phase, e), kinds=("hidden",))

    def _fault_point(self, point: str, phase: str, epoch: int) -> None:
        for f in self.faults:
            if f.matches(self.plan.trial_id, self.attempt, phase, epoch, point, self.group.rank):
                # Logged before firing (a SIGKILL leaves no other trace): tests count real faults.
                with open(self.ckpt_dir / "faults.log", "a") as fh:
                    fh.write(json.dumps({"pid": os.getpid(), "rank": self.group.rank, "attempt": self.attempt, "action": f.action, "phase": phase, "epoch": epoch, "point": point, "time": time.time()}) + "\n")
                fire_fault(f, self.plan.trial_id, self.attempt)

    # ---- resume points -------------------------------------------------------------------

    def _best_path(self, epoch: int) -> Path:
        # Named by epoch, so a resume point can never pair one epoch's number with another's weights.
        return self.ckpt_dir / f"best_finetune-e{epoch:04d}.pt"

    def _save_resume(self, progress: Progress, optimizer: torch.optim.Optimizer | None, best_state: dict | None) -> None:
        """One resume point per trial (latest.pt, replaced by rename each epoch, so older ones
        are pruned as the new one lands), plus the best fine-tuning weights while fine-tuning."""
        policy = self.plan.train.checkpoint
        if policy == "none" or (policy == "phase" and not progress.phase_done):
            return
        g = self.group
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if g.world > 1 and optimizer is not None and self.keep_optimizer:
            # ZeRO partitions optimizer state across ranks: each rank keeps its own part,
            # tagged with its epoch, and all are on disk before rank 0's resume point names
            # that epoch.
            state = {"tag": [progress.phase, progress.epoch], "world": g.world, "state": optimizer.state_dict()}
            _atomic_torch_save(state, self._rank_optimizer_path(g.rank))
            g.barrier()
        if not g.is_main:
            return
        if best_state is not None:
            # Before latest.pt: a resume point naming a best epoch must find its weights on disk.
            _atomic_torch_save(best_state, self._best_path(progress.best_epoch))
        payload = {
            "progress": asdict(progress),
            "model": self.lm.model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None and self.keep_optimizer and g.world == 1 else None,
            # With several ranks the optimizer state is in their own files: a resume without
            # them would go on from this point with fresh moments, another trajectory.
            "optimizer_parts": g.world if g.world > 1 and optimizer is not None and self.keep_optimizer else 0,
        }
        _atomic_torch_save(payload, self.ckpt_dir / "latest.pt")
        # Only the best epoch named by the resume point just written is still needed, and none
        # once fine-tuning is over (latest.pt then holds the best weights).
        keep = self._best_path(progress.best_epoch) if progress.phase == "finetune" and not progress.phase_done and progress.best_epoch is not None else None
        for old in self.ckpt_dir.glob("best_finetune*.pt"):
            if old != keep:
                old.unlink(missing_ok=True)

    def _rank_optimizer_path(self, rank: int) -> Path:
        return self.ckpt_dir / f"optimizer-rank{rank}.pt"

    def _load_resume(self) -> tuple[Progress, dict | None]:
        """Rank 0 reads the resume point and decides; the other ranks take its progress and
        weights, then their own optimizer part if every rank has one for that epoch."""
        g = self.group
        if g.world == 1:
            return self._read_resume()
        progress, _ = self._read_resume() if g.is_main else (None, None)
        info = g.broadcast({"progress": asdict(progress), "parts": self._expect_parts} if g.is_main else None)
        progress = Progress(**info["progress"])
        g.sync_module(self.lm.model)
        state, problem = None, None
        path = self._rank_optimizer_path(g.rank)
        # None: a resume point from before parts were recorded; its parts are used if there.
        if self.keep_optimizer and (info["parts"] or (info["parts"] is None and path.exists())):
            try:
                saved = _load_resume_file(path)
                if saved["tag"] == [progress.phase, progress.epoch] and saved["world"] == g.world:
                    state = saved["state"]
                else:
                    problem = f"{path} holds {saved['tag'][0]}/e{saved['tag'][1]} of {saved['world']} ranks"
            except Exception as exc:  # noqa: BLE001 - an unreadable part is one more way to lack it
                problem = str(exc)
        if not info["parts"] or g.all_true(state is not None):
            return progress, state
        # Some rank lacks its part of the optimizer state this resume point was saved with:
        # every rank starts over (the same decision on each), rather than go on with fresh
        # optimizer moments on some ranks and diverge from the uninterrupted trajectory.
        if g.is_main:
            self._fresh_start(f"optimizer state of some rank is missing or damaged ({problem or 'on another rank'})")
        self.lm = load_model(self.plan.model, self.models_dir, device=self.device)
        g.sync_module(self.lm.model)
        return Progress(), None

    def _read_resume(self) -> tuple[Progress, dict | None]:
        """The resume point, or a fresh start when there is none or it cannot be trusted
        (unreadable or damaged, its best fine-tuning weights unreadable, or epochs before it
        have lost their commit, e.g. quarantined by `raysweep repair` or left with an empty
        marker). A fresh start costs time, never rows: the trial is deterministic and every
        epoch it recommits replaces the files already there. Each fallback is one line on
        stderr (the worker's log) and in the trial's restarts.log."""
        self._resumed_best = None
        self._expect_parts = 0
        bad = self.store.bad_markers(self.plan.sweep, self.plan.trial_id)
        if bad:
            # Out of the way before anything counts commits: their epochs are recomputed.
            for (marker, problem), dest in zip(bad, self.store.quarantine([m for m, _ in bad], reopen=False)):
                self._log_recovery(f"{marker}: {problem}; its epoch counts as uncommitted and is recomputed (marker moved to {dest})")
        path = self.ckpt_dir / "latest.pt"
        if not path.exists():
            return Progress(), None
        try:
            payload = _load_resume_file(path)
            progress = Progress(**payload["progress"])
        except Exception as exc:  # noqa: BLE001 - any unreadable resume point is discarded alike
            return self._fresh_start(f"unreadable resume point ({exc})")
        missing = self._missing_epochs(progress)
        if missing:
            return self._fresh_start(f"resume point {progress.phase}/e{progress.epoch} is past uncommitted epoch(s) {missing[:5]}")
        if progress.phase == "finetune" and not progress.phase_done and progress.best_epoch is not None:
            best = self._best_path(progress.best_epoch)
            if not best.exists():
                return self._fresh_start(f"best fine-tuning weights of epoch {progress.best_epoch} are missing ({best})")
            try:
                # Read now, not when fine-tuning ends: a damaged file found there would fail
                # every attempt at the same place.
                self._resumed_best = _load_resume_file(best)
            except Exception as exc:  # noqa: BLE001
                return self._fresh_start(f"unreadable best fine-tuning weights ({exc})")
        try:
            self.lm.model.load_state_dict(payload["model"])
        except Exception as exc:  # noqa: BLE001
            self.lm = load_model(self.plan.model, self.models_dir, device=self.device)  # undo a partial load
            self._resumed_best = None
            return self._fresh_start(f"resume point {path} does not fit the model ({type(exc).__name__})")
        self._expect_parts = payload.get("optimizer_parts")
        return progress, payload.get("optimizer")

    def _missing_epochs(self, progress: Progress) -> list[tuple[str, int]]:
        need: dict[str, range] = {}
        if progress.phase != "pretrained":
            need["pretrained"] = range(0, 1)
        for phase, last in progress.phase_epochs.items():
            need[phase] = range(1, last + 1)
        if progress.best_epoch is not None and "finetune" not in progress.phase_epochs:
            need["finetune"] = range(1, progress.best_epoch + 1)
        if progress.phase != "pretrained":
            need[progress.phase] = range(1, max(progress.epoch, progress.phase_epochs.get(progress.phase, 0)) + 1)
        committed = self.store.committed_epochs(self.plan.sweep, self.plan.trial_id)
        return [(ph, e) for ph, eps in need.items() for e in eps if e not in committed.get(ph, [])]

    def _fresh_start(self, reason: str) -> tuple[Progress, None]:
        self._log_recovery(f"{reason}; restarting it from the pretrained model")
        for f in [self.ckpt_dir / "latest.pt", *self.ckpt_dir.glob("best_finetune*.pt")]:
            f.unlink(missing_ok=True)
        self._resumed_best = None
        self._expect_parts = 0
        return Progress(), None

    def _log_recovery(self, line: str) -> None:
        """What a trial did about a damaged or missing file: stderr (the worker's log) and
        the trial's restarts.log, which stay when the attempt itself goes well."""
        import sys

        print(f"raysweep: trial {self.plan.trial_id}: {line}", file=sys.stderr)
        try:
            with open(self.ckpt_dir / "restarts.log", "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} attempt {self.attempt}: {line}\n")
        except OSError:
            pass  # a full disk: the line on stderr is all there is room for

    @contextlib.contextmanager
    def _exclusive(self):
        """One process per trial. Tune never runs a trial twice at once, but a worker of a
        killed driver can outlive it for a moment, and two people can run one sweep on one
        store: two writers of one trial would race on its resume point. The kernel drops
        the lock when its holder dies, SIGKILL included."""
        import fcntl

        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        with open(self.ckpt_dir / "lock", "a+") as fh:
            deadline = time.time() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.time() > deadline:
                        raise RuntimeError(f"trial {self.plan.trial_id} is being run by another process (lock {self.ckpt_dir / 'lock'})") from None
                    time.sleep(0.5)
                except OSError:
                    break  # a filesystem without locks: go on unguarded rather than not at all
            yield

    # ---- the phases ----------------------------------------------------------------------

    def _epoch_batches(self, phase: str, epoch: int, targets: list[int], cfg: PhaseConfig):
        rng = random.Random(_seed_for(self.plan.seed, phase, epoch, "batches"))
        torch.manual_seed(_seed_for(self.plan.seed, phase, epoch, "torch"))
        return build_batches(self.lm.tokenizer, self.lm.model, self.train_set, targets, cfg.batch_size, rng)

    def _write_status(self, status: str, progress: Progress, error: str | None = None, attempts: int | None = None) -> None:
        if not self.group.is_main:
            return
        p = self.plan
        now = self.store.read_trial_row(p.sweep, p.trial_id)
        if now is not None and now["status"] == "superseded":
            # Another version of the sweep replaced this trial while it ran: its own status
            # would put it back among the current trials and pool the two versions. It stops
            # (a failure it cannot record is left unrecorded).
            if status == "failed":
                return
            raise RuntimeError(f"trial {p.trial_id} was superseded by another version of sweep {p.sweep!r}; it stops without recording {status!r}")
        if status == "failed" and (error or "").startswith(INTERRUPT_ERRORS):
            status = "interrupted"  # stopped from outside (Ctrl+C, Tune stopping it): it resumes
        if status in ("failed", "interrupted") and now is not None and now["status"] == "interrupted":
            return  # the driver stopped the sweep and recorded why: a dying process adds nothing
        self.store.write_trial_row(
            {
                **trial_row(p),
                "status": status,
                "error": error,
                # Always the current attempt: a row without it would restart the count.
                "attempts": attempts if attempts is not None else self.attempt,
                "best_finetune_epoch": progress.best_epoch,
                "last_forget_epoch": progress.last_forget_epoch,
                "last_relearn_epoch": progress.last_relearn_epoch,
            }
        )

    def run(self, attempt: int = 1) -> Progress:
        self.attempt = attempt
        # The lock comes first: if another live process still owns this trial (a retry racing
        # its predecessor's exit), fail here without touching that process's status row.
        main = self.group.is_main
        with self._exclusive() if main else contextlib.nullcontext():
            progress = Progress()
            try:
                self._setup()
                if main:
                    self.store.remove_temp_files(self.plan.sweep, self.plan.trial_id)
                progress, opt_state = self._load_resume()
                self._write_status("running", progress)
                progress = self._run_phases(progress, opt_state)
                self._write_status("done", progress)
                return progress
            except BaseException as exc:
                if not is_no_space(exc):
                    self._record_failure(exc, progress, attempt)
                    raise
                # A full disk: the partial files go first (their space is what lets the
                # failure be recorded at all), then the reason in words, not torch's.
                full = DiskFull(self.store.root, no_space_where(exc, self.store.root))
                if main:
                    with contextlib.suppress(OSError):
                        self.store.remove_temp_files(self.plan.sweep, self.plan.trial_id)
                with contextlib.suppress(Exception):
                    self._record_failure(full, progress, attempt)
                raise full from exc

    def _record_failure(self, exc: BaseException, progress: Progress, attempt: int) -> None:
        self._write_status("failed", progress, error=failure_reason(exc), attempts=attempt)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        rank = "" if self.group.is_main else f"-rank{self.group.rank}"
        (self.ckpt_dir / f"error-{attempt}{rank}.txt").write_text(traceback.format_exc())

    def _run_phases(self, progress: Progress, opt_state: dict | None) -> Progress:
        p = self.plan
        model = self.lm.model

        if progress.phase == "pretrained" and progress.epoch < 0:
            t0 = time.time()
            res, acc = self._score_epoch()
            self._commit("pretrained", 0, res, acc, float("nan"), time.time() - t0, phase_end=True)
            progress = Progress(phase="finetune", epoch=0)
            self._save_resume(progress, None, None)
            self._fault_point("resume", "pretrained", 0)

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
        main = self.group.is_main
        opt = make_optimizer(model, cfg, self.plan.train, self.group)
        if opt_state:
            opt.load_state_dict(opt_state)
        # Rank 0 alone keeps the best weights; the other ranks receive them when the phase ends.
        best_state = None
        best_res: ScoreResult | None = None
        best_scored = False  # the same on every rank, unlike best_res
        if progress.best_epoch is not None and main:  # resumed mid-phase: `_read_resume` read and checked the file
            best_state, self._resumed_best = self._resumed_best, None
        since_best = 0 if progress.best_epoch is None else progress.epoch - progress.best_epoch
        gold = [ex.gold for ex in self.train_set]
        for epoch in range(progress.epoch + 1, cfg.max_epochs + 1):
            t0 = time.time()
            loss = train_epoch(model, opt, self._epoch_batches("finetune", epoch, gold, cfg), nll_loss, self.group)
            res, acc = self._score_epoch()
            self._commit("finetune", epoch, res, acc, loss, time.time() - t0, phase_end=False)
            progress.epoch = epoch
            if acc[(ft, "validation")] > progress.best_val_acc:
                progress.best_val_acc, progress.best_epoch, since_best = acc[(ft, "validation")], epoch, 0
                progress.finetuned_test_acc = acc[(ft, "test")]
                if main:
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                best_res, best_scored = res, True
            else:
                since_best += 1
            if finetune_should_stop(acc[(ft, "train")], epoch, since_best, cfg):
                break
            self._save_resume(progress, opt, best_state if since_best == 0 else None)
            self._fault_point("resume", "finetune", epoch)
        opt.close()
        # Forgetting starts from the best-validation checkpoint, not the last epoch.
        if main:
            model.load_state_dict(best_state)
        self.group.sync_module(model)
        if not best_scored and self.plan.scoring.hidden_states == "phase_end":
            best_res = self._score()  # resumed after the best epoch: recompute its hidden states
        self._write_best_hidden(progress.best_epoch, best_res)
        return self._end_phase(progress, milestone=progress.best_epoch)

    def _end_phase(self, progress: Progress, milestone: int | None) -> Progress:
        """Close the phase: drop what an earlier attempt left beyond its last epoch, then a
        resume point that says the phase is done (after the commit of its last epoch, as always)."""
        progress.phase_done = True
        progress.phase_epochs[progress.phase] = progress.epoch
        self._drop_stale(progress.phase, progress.epoch, milestone)
        self._save_resume(progress, None, None)
        self._fault_point("resume", progress.phase, progress.epoch)
        if progress.phase != "relearn":  # the trial's milestones so far, visible in `status`
            self._write_status("running", progress)
        return progress

    def _forget(self, progress: Progress, opt_state: dict | None) -> Progress:
        cfg = self.plan.phases.forget

        def targets(epoch: int) -> list[int]:
            return self.method.targets(self.train_set, epoch, random.Random(_seed_for(self.plan.seed, "forget", epoch, "labels")))

        def should_stop(acc: dict[tuple[str, str], float], epoch: int) -> bool:
            test_acc = acc[(self.plan.forget_task, "test")]
            return forget_should_stop(test_acc, epoch, cfg, self.method.ratio_formula, progress.finetuned_test_acc)

        return self._train_phase("forget", cfg, progress, opt_state, targets, self.method.loss, should_stop)

    def _relearn(self, progress: Progress, opt_state: dict | None) -> Progress:
        cfg = self.plan.phases.relearn
        gold = [ex.gold for ex in self.train_set]
        return self._train_phase("relearn", cfg, progress, opt_state, lambda epoch: gold, nll_loss, lambda acc, epoch: relearn_should_stop(acc[(self.plan.forget_task, "train")], epoch, cfg))

    def _train_phase(self, phase: str, cfg: PhaseConfig, progress: Progress, opt_state: dict | None, targets, loss_fn, should_stop) -> Progress:
        """Forget and relearn: train towards `targets(epoch)`, score, commit, until `should_stop`.
        The stop decision comes before the commit: the last epoch carries the milestone's
        hidden states."""
        model = self.lm.model
        opt = make_optimizer(model, cfg, self.plan.train, self.group)
        if opt_state:
            opt.load_state_dict(opt_state)
        for epoch in range(progress.epoch + 1, cfg.max_epochs + 1):
            t0 = time.time()
            loss = train_epoch(model, opt, self._epoch_batches(phase, epoch, targets(epoch), cfg), loss_fn, self.group)
            res, acc = self._score_epoch()
            last = should_stop(acc, epoch)
            self._commit(phase, epoch, res, acc, loss, time.time() - t0, phase_end=last)
            progress.epoch = epoch
            setattr(progress, f"last_{phase}_epoch", epoch)
            if last:
                break
            self._save_resume(progress, opt, None)
            self._fault_point("resume", phase, epoch)
        opt.close()
        return self._end_phase(progress, milestone=progress.epoch)

def failure_reason(exc: BaseException) -> str:
    """The one line a trials row keeps of an error."""
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]


def _load_resume_file(path: Path):
    """A resume file's contents, or an error naming the file. Every member's CRC is checked
    first: torch itself loads a file with damaged tensor bytes and returns wrong weights."""
    problem = torch_file_problem(path, deep=True)
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
    try:
        # weights_only: a checkpoint is tensors and plain values; never unpickle code from the store.
        with torch.serialization.safe_globals(resume_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _hidden_table(common: dict[str, pa.Array], res: ScoreResult, gold: np.ndarray) -> pa.Table:
    """One row per (example, layer), example-major; the pair states reordered from choice
    order to (correct, distractor)."""
    n, n_layers, _, d = res.hidden.shape
    rows = np.arange(n)

    def vectors(states: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1).astype(np.float32)), d)

    take = np.repeat(rows, n_layers)
    columns = {k: v.take(pa.array(take)) for k, v in common.items()}
    columns["layer"] = pa.array(np.tile(np.array(res.layers, dtype=np.int16), n))
    columns["hidden"] = vectors(res.hidden[:, :, PROMPT])
    columns["hidden_correct"] = vectors(res.hidden[rows, :, PAIR_0 + gold])
    columns["hidden_distractor"] = vectors(res.hidden[rows, :, PAIR_1 - gold])
    return pa.table(columns, schema=hidden_schema(d))


def _interleave(parts: list[ScoreResult], n: int) -> ScoreResult:
    """Undo the interleaved split of `_score`: rank r scored examples r, r + world, ..."""
    world = len(parts)
    ll_sum = np.zeros((n, 2), dtype=np.float64)
    n_tokens = np.zeros((n, 2), dtype=np.int64)
    with_hidden = all(p.hidden is not None for p in parts)
    hidden = np.zeros((n, *parts[0].hidden.shape[1:]), dtype=np.float32) if with_hidden and n else None
    for rank, part in enumerate(parts):
        ll_sum[rank::world] = part.ll_sum
        n_tokens[rank::world] = part.n_tokens
        if hidden is not None:
            hidden[rank::world] = part.hidden
    return ScoreResult(ll_sum=ll_sum, n_tokens=n_tokens, hidden=hidden, layers=parts[0].layers)


def trial_row(plan: TrialPlan) -> dict:
    return {
        "sweep": plan.sweep,
        "trial_id": plan.trial_id,
        "model": plan.model.name,
        "model_source": model_source(plan.model),
        "forget_task": plan.forget_task,
        "method": plan.method,
        "size": plan.size,
        "seed": plan.seed,
        "plan_json": plan.model_dump_json(),
    }


class _WriteErrors:
    """A file torch writes through that keeps the OSError of a failed write: torch reports a
    short write as `RuntimeError: ... unexpected pos N vs M`, without its errno."""

    def __init__(self, fh):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _torch_write(obj, fh, path: Path) -> None:
    """torch.save into an open file; a full disk raises OSError(ENOSPC) naming `path`."""
    sink = _WriteErrors(fh)
    try:
        torch.save(obj, sink)
        fh.flush()
        os.fsync(fh.fileno())
    except Exception as exc:
        cause = sink.error or exc
        if is_no_space(cause) or is_no_space(exc):
            import errno

            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from cause
        if sink.error is not None:
            raise sink.error from exc
        raise


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.parent / f"_{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            _torch_write(obj, fh, path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
