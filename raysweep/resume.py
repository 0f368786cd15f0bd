"""A trial's resume points: save, load, check, prune, per-rank optimizer parts, the lock.

One resume point per trial (`latest.pt`, replaced by rename each epoch), plus the best
fine-tuning weights while fine-tuning runs. A resume point that cannot be trusted is never
used: the trial starts over from the pretrained model, which costs time, never rows.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from raysweep.distributed import Group
from raysweep.errors import is_no_space
from raysweep.integrity import bad_markers, quarantine, torch_file_problem
from raysweep.models import LoadedModel
from raysweep.store import Store, replacing
from raysweep.train import resume_safe_globals


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
    # The forgetting method's own state (`ForgetMethod.state_dict`), taken when forgetting starts.
    method_state: dict = field(default_factory=dict)
    # Last epoch of each finished phase: on resume, every epoch up to the resume point must
    # still be committed (see `ResumePoints.missing_epochs`).
    phase_epochs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, saved: dict) -> "Progress":
        """A saved progress, including one written before methods kept their own state
        (NPO's reference log-probs were then a field of their own)."""
        saved = dict(saved)
        reference = saved.pop("npo_reference", None)
        if reference and not saved.get("method_state"):
            saved["method_state"] = {"reference": reference}
        return cls(**saved)

    def to_dict(self) -> dict:
        return asdict(self)


class ResumePoints:
    """The resume points of one trial in `ckpt_dir`. Only rank 0 writes `latest.pt` and the
    best weights; with several ranks each keeps its own part of a partitioned optimizer."""

    def __init__(self, store: Store, sweep: str, trial_id: str, checkpoint: str, group: Group):
        self.store = store
        self.sweep = sweep
        self.trial_id = trial_id
        self.checkpoint = checkpoint  # the spec's train.checkpoint: epoch, phase or none
        self.group = group
        self.dir = store.path("checkpoints", sweep, trial_id)
        self.keep_optimizer = False  # whether optimizer state goes into resume points
        self.attempt = 1
        self.lock_timeout = 120.0  # seconds to wait for another process still running this trial
        self.resumed_best: dict | None = None  # best fine-tuning weights `read` checked
        self._expect_parts: int | None = 0  # ranks whose optimizer parts the resume point names

    def best_path(self, epoch: int) -> Path:
        # Named by epoch, so a resume point can never pair one epoch's number with another's weights.
        return self.dir / f"best_finetune-e{epoch:04d}.pt"

    def optimizer_path(self, rank: int) -> Path:
        return self.dir / f"optimizer-rank{rank}.pt"

    def save(
        self,
        progress: Progress,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        best_state: dict | None,
    ) -> None:
        """The resume point after an epoch (older ones are pruned as the new one lands), plus
        the best fine-tuning weights while fine-tuning."""
        if self.checkpoint == "none" or (self.checkpoint == "phase" and not progress.phase_done):
            return
        g = self.group
        self.dir.mkdir(parents=True, exist_ok=True)
        if g.world > 1 and optimizer is not None and self.keep_optimizer:
            # ZeRO partitions optimizer state across ranks: each rank keeps its own part,
            # tagged with its epoch, and all are on disk before rank 0's resume point names
            # that epoch.
            state = {"tag": [progress.phase, progress.epoch], "world": g.world, "state": optimizer.state_dict()}
            atomic_torch_save(state, self.optimizer_path(g.rank))
            g.barrier()
        if not g.is_main:
            return
        if best_state is not None:
            # Before latest.pt: a resume point naming a best epoch must find its weights on disk.
            atomic_torch_save(best_state, self.best_path(progress.best_epoch))
        payload = {
            "progress": progress.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict()
            if optimizer is not None and self.keep_optimizer and g.world == 1
            else None,
            # With several ranks the optimizer state is in their own files: a resume without
            # them would go on from this point with fresh moments, another trajectory.
            "optimizer_parts": g.world if g.world > 1 and optimizer is not None and self.keep_optimizer else 0,
        }
        atomic_torch_save(payload, self.dir / "latest.pt")
        # Only the best epoch named by the resume point just written is still needed, and none
        # once fine-tuning is over (latest.pt then holds the best weights).
        in_finetune = progress.phase == "finetune" and not progress.phase_done and progress.best_epoch is not None
        keep = self.best_path(progress.best_epoch) if in_finetune else None
        for old in self.dir.glob("best_finetune*.pt"):
            if old != keep:
                old.unlink(missing_ok=True)

    def load(self, lm: LoadedModel, reload: Callable[[], LoadedModel]) -> tuple[Progress, dict | None, LoadedModel]:
        """Progress, optimizer state and the model to go on with. Rank 0 reads the resume
        point and decides; the other ranks take its progress and weights, then their own
        optimizer part if every rank has one for that epoch. `reload` builds the pretrained
        model afresh (after a partial load, or when the trial starts over)."""
        g = self.group
        if g.world == 1:
            return self.read(lm, reload)
        progress, _, lm = self.read(lm, reload) if g.is_main else (None, None, lm)
        info = g.broadcast({"progress": progress.to_dict(), "parts": self._expect_parts} if g.is_main else None)
        progress = Progress.from_dict(info["progress"])
        g.sync_module(lm.model)
        state, problem = None, None
        path = self.optimizer_path(g.rank)
        # None: a resume point from before parts were recorded; its parts are used if there.
        if self.keep_optimizer and (info["parts"] or (info["parts"] is None and path.exists())):
            try:
                saved = load_checked(path)
                if saved["tag"] == [progress.phase, progress.epoch] and saved["world"] == g.world:
                    state = saved["state"]
                else:
                    problem = f"{path} holds {saved['tag'][0]}/e{saved['tag'][1]} of {saved['world']} ranks"
            except Exception as exc:  # noqa: BLE001 - an unreadable part is one more way to lack it
                problem = str(exc)
        if not info["parts"] or g.all_true(state is not None):
            return progress, state, lm
        # Some rank lacks its part of the optimizer state this resume point was saved with:
        # every rank starts over (the same decision on each), rather than go on with fresh
        # optimizer moments on some ranks and diverge from the uninterrupted trajectory.
        if g.is_main:
            self.fresh_start(f"optimizer state of some rank is missing or damaged ({problem or 'on another rank'})")
        lm = reload()
        g.sync_module(lm.model)
        return Progress(), None, lm

    def read(self, lm: LoadedModel, reload: Callable[[], LoadedModel]) -> tuple[Progress, dict | None, LoadedModel]:
        """The resume point, or a fresh start when there is none or it cannot be trusted
        (unreadable or damaged, its best fine-tuning weights unreadable, or epochs before it
        have lost their commit, e.g. quarantined by `raysweep repair` or left with an empty
        marker). A fresh start costs time, never rows: the trial is deterministic and every
        epoch it recommits replaces the files already there. Each fallback is one line on
        stderr (the worker's log) and in the trial's restarts.log."""
        self.resumed_best = None
        self._expect_parts = 0
        bad = bad_markers(self.store, self.sweep, self.trial_id)
        if bad:
            # Out of the way before anything counts commits: their epochs are recomputed.
            for (marker, problem), dest in zip(bad, quarantine(self.store, [m for m, _ in bad], reopen=False)):
                self.log(
                    f"{marker}: {problem}; its epoch counts as uncommitted and is recomputed (marker moved to {dest})"
                )
        path = self.dir / "latest.pt"
        if not path.exists():
            return Progress(), None, lm
        try:
            payload = load_checked(path)
            progress = Progress.from_dict(payload["progress"])
        except Exception as exc:  # noqa: BLE001 - any unreadable resume point is discarded alike
            return (*self.fresh_start(f"unreadable resume point ({exc})"), lm)
        missing = self.missing_epochs(progress)
        if missing:
            return (
                *self.fresh_start(
                    f"resume point {progress.phase}/e{progress.epoch} is past uncommitted epoch(s) {missing[:5]}"
                ),
                lm,
            )
        if progress.phase == "finetune" and not progress.phase_done and progress.best_epoch is not None:
            best = self.best_path(progress.best_epoch)
            if not best.exists():
                return (
                    *self.fresh_start(f"best fine-tuning weights of epoch {progress.best_epoch} are missing ({best})"),
                    lm,
                )
            try:
                # Read now, not when fine-tuning ends: a damaged file found there would fail
                # every attempt at the same place.
                self.resumed_best = load_checked(best)
            except Exception as exc:  # noqa: BLE001
                return (*self.fresh_start(f"unreadable best fine-tuning weights ({exc})"), lm)
        try:
            lm.model.load_state_dict(payload["model"])
        except Exception as exc:  # noqa: BLE001
            lm = reload()  # undo a partial load
            self.resumed_best = None
            return (*self.fresh_start(f"resume point {path} does not fit the model ({type(exc).__name__})"), lm)
        self._expect_parts = payload.get("optimizer_parts")
        return progress, payload.get("optimizer"), lm

    def take_best(self) -> dict | None:
        """The best fine-tuning weights `read` checked, handed over once."""
        best, self.resumed_best = self.resumed_best, None
        return best

    def missing_epochs(self, progress: Progress) -> list[tuple[str, int]]:
        """Epochs the resume point has gone past that are not committed in the store."""
        need: dict[str, range] = {}
        if progress.phase != "pretrained":
            need["pretrained"] = range(0, 1)
        for phase, last in progress.phase_epochs.items():
            need[phase] = range(1, last + 1)
        if progress.best_epoch is not None and "finetune" not in progress.phase_epochs:
            need["finetune"] = range(1, progress.best_epoch + 1)
        if progress.phase != "pretrained":
            need[progress.phase] = range(1, max(progress.epoch, progress.phase_epochs.get(progress.phase, 0)) + 1)
        committed = self.store.committed_epochs(self.sweep, self.trial_id)
        return [(ph, e) for ph, eps in need.items() for e in eps if e not in committed.get(ph, [])]

    def fresh_start(self, reason: str) -> tuple[Progress, None]:
        self.log(f"{reason}; restarting it from the pretrained model")
        for f in [self.dir / "latest.pt", *self.dir.glob("best_finetune*.pt")]:
            f.unlink(missing_ok=True)
        self.resumed_best = None
        self._expect_parts = 0
        return Progress(), None

    def log(self, line: str) -> None:
        """What a trial did about a damaged or missing file: stderr (the worker's log) and
        the trial's restarts.log, which stay when the attempt itself goes well."""
        print(f"raysweep: trial {self.trial_id}: {line}", file=sys.stderr)
        try:
            with open(self.dir / "restarts.log", "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} attempt {self.attempt}: {line}\n")
        except OSError:
            pass  # a full disk: the line on stderr is all there is room for

    def write_error(self, attempt: int, text: str) -> None:
        """The whole traceback of the failure that ended `attempt` (the trials row keeps one line)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        rank = "" if self.group.is_main else f"-rank{self.group.rank}"
        (self.dir / f"error-{attempt}{rank}.txt").write_text(text)

    @contextlib.contextmanager
    def lock(self):
        """One process per trial. Tune never runs a trial twice at once, but a worker of a
        killed driver can outlive it for a moment, and two people can run one sweep on one
        store: two writers of one trial would race on its resume point. The kernel drops
        the lock when its holder dies, SIGKILL included."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "a+") as fh:
            deadline = time.time() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.time() > deadline:
                        raise RuntimeError(
                            f"trial {self.trial_id} is being run by another process (lock {self.dir / 'lock'})"
                        ) from None
                    time.sleep(0.5)
                except OSError:
                    break  # a filesystem without locks: go on unguarded rather than not at all
            yield


def lock_held(trial_dir: Path) -> bool:
    """Whether a live process holds the trial lock in `trial_dir` (see `ResumePoints.lock`)."""
    path = trial_dir / "lock"
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False  # no locks on this filesystem: nothing can be known
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def load_checked(path: Path):
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


def torch_write(obj, fh, path: Path) -> None:
    """torch.save into an open file; a full disk raises OSError(ENOSPC) naming `path`."""
    sink = _WriteErrors(fh)
    try:
        torch.save(obj, sink)
        fh.flush()
        os.fsync(fh.fileno())
    except Exception as exc:
        cause = sink.error or exc
        if is_no_space(cause) or is_no_space(exc):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from cause
        if sink.error is not None:
            raise sink.error from exc
        raise


def atomic_torch_save(obj, path: Path) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        torch_write(obj, fh, path)
