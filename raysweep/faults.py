"""Fault injection for reliability tests: `RAYSWEEP_FAULT` makes a trial fail on purpose.

Off unless the variable is set in the driver's environment (the driver hands it to every
trial, so it reaches workers on any cluster). The failures are real: `kill` sends SIGKILL to
the Ray worker process running the trial, exactly as the OOM killer or a lost node would;
`raise` and `oom` raise from inside the trial, as bad data or CUDA running out of memory do.

Format: one or more faults separated by ';', each a comma-separated list of key=value:

    action   kill | raise | oom                                   (required)
    phase    pretrained | finetune | forget | relearn             (required)
    epoch    the epoch number (the pretrained phase has epoch 0)  (required)
    point    commit: after the epoch's rows are committed, before its resume point is saved
             resume: after the resume point is saved (default)
    trial    only trials whose id contains this text (default: every trial)
    attempt  only on this attempt of the trial, counted across drivers and Tune retries
             (default 1, so a retried trial gets through); '*' for every attempt
    rank     which data-parallel rank of a multi-worker trial fails (default 0)

    RAYSWEEP_FAULT="action=kill,phase=finetune,epoch=2,point=commit,trial=sentiment"
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "RAYSWEEP_FAULT"
ACTIONS = ("kill", "raise", "oom")
POINTS = ("commit", "resume")


class InjectedFault(RuntimeError):
    """Raised by action=raise: stands for any error inside a trial (bad data, a bug)."""


@dataclass(frozen=True)
class Fault:
    action: str
    phase: str
    epoch: int
    point: str = "resume"
    trial: str = ""
    attempt: int | None = 1  # None: every attempt
    rank: int = 0

    def matches(self, trial_id: str, attempt: int, phase: str, epoch: int, point: str, rank: int = 0) -> bool:
        return (
            self.rank == rank
            and self.phase == phase
            and self.epoch == epoch
            and self.point == point
            and self.trial in trial_id
            and (self.attempt is None or self.attempt == attempt)
        )


def parse_faults(text: str | None) -> list[Fault]:
    """Parse the variable; a malformed one is an error, never silently ignored (a test
    that believes it injected a fault must not pass because nothing happened)."""
    faults: list[Fault] = []
    for chunk in (text or "").split(";"):
        if not chunk.strip():
            continue
        kv: dict[str, str] = {}
        for part in chunk.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"{ENV}: {part.strip()!r} is not key=value")
            kv[key.strip()] = value.strip()
        unknown = set(kv) - {"action", "phase", "epoch", "point", "trial", "attempt", "rank"}
        if unknown:
            raise ValueError(f"{ENV}: unknown key(s) {sorted(unknown)}")
        if kv.get("action") not in ACTIONS:
            raise ValueError(f"{ENV}: action must be one of {ACTIONS}")
        if kv.get("point", "resume") not in POINTS:
            raise ValueError(f"{ENV}: point must be one of {POINTS}")
        if "phase" not in kv or "epoch" not in kv:
            raise ValueError(f"{ENV}: phase and epoch are required")
        attempt = kv.get("attempt", "1")
        faults.append(
            Fault(
                action=kv["action"],
                phase=kv["phase"],
                epoch=int(kv["epoch"]),
                point=kv.get("point", "resume"),
                trial=kv.get("trial", ""),
                attempt=None if attempt == "*" else int(attempt),
                rank=int(kv.get("rank", "0")),
            )
        )
    return faults


def fire(fault: Fault, trial_id: str, attempt: int) -> None:
    where = f"{fault.phase} epoch {fault.epoch} ({fault.point}), attempt {attempt}"
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"injected by {ENV}: out of memory at {where}")
    raise InjectedFault(f"injected by {ENV}: failure at {where}")


class FaultPoints:
    """The faults injected into one trial process (from `text`, else the variable), fired
    where the trial's recipe names a point. Each is logged before it fires: a SIGKILL leaves
    no other trace, and the tests count real faults."""

    def __init__(self, text: str | None, trial_id: str, rank: int, log_dir: Path):
        self.faults = parse_faults(text if text is not None else os.environ.get(ENV))
        self.trial_id, self.rank, self.log = trial_id, rank, Path(log_dir) / "faults.log"
        self.attempt = 1

    def at(self, point: str, phase: str, epoch: int) -> None:
        for fault in self.faults:
            if fault.matches(self.trial_id, self.attempt, phase, epoch, point, self.rank):
                entry = {"pid": os.getpid(), "rank": self.rank, "attempt": self.attempt, "action": fault.action}
                entry |= {"phase": phase, "epoch": epoch, "point": point, "time": time.time()}
                with open(self.log, "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
                fire(fault, self.trial_id, self.attempt)
