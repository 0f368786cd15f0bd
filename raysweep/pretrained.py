"""The pretrained model's scores, computed once per sweep and shared by its trials.

Every trial starts by scoring the model it starts from; the trials of one model in one sweep
start from the same weights and score the same prepared examples, so all but the first would
repeat it. Each (task, split, examples) slice is scored on its own batches, so its scores do
not depend on which trial scored it, or on what else that trial scored: a trial that reuses a
slice writes exactly the rows it would have computed. The slices live in the store under
`pretrained/<sweep>/<model key>/` until the sweep is removed; a lock makes concurrent trials
of one model wait for each other rather than score the same slice twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json

import numpy as np

from raysweep.distributed import Group
from raysweep.models import LoadedModel
from raysweep.records import EvalSlice, concat_results, hidden_task, keeps_hidden, score_all
from raysweep.scoring import ScoreResult
from raysweep.spec import TrialPlan
from raysweep.store import Store, replacing

_ARRAYS = ("ll_sum", "n_tokens", "hidden", "min_k", "min_k_pp")


def model_key(plan: TrialPlan, device: str) -> str:
    """What a slice's pretrained scores depend on besides its examples: the model as the spec
    builds or loads it, the device kind (kernels round differently) and what scoring keeps."""
    what = {
        "model": plan.model.model_dump(mode="json"),
        "device": device.split(":")[0],
        "hidden": plan.scoring.hidden_states != "none",
        "layers": list(plan.scoring.layers),
        "workers": plan.resources.n_workers,  # each rank scores its share in its own batches
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return f"{plan.model.name}-{digest}"


def slice_name(sl: EvalSlice, hidden: bool = True) -> str:
    """Where a slice's scores are kept; `hidden=False`: scored without hidden states (a task
    whose states no trial of this model keeps), which cannot stand in for the states."""
    uids = hashlib.sha256("\n".join(ex.uid for ex in sl.examples).encode()).hexdigest()[:16]
    return f"{sl.task}-{sl.split}-{len(sl.examples)}-{uids}{'' if hidden else '-nohidden'}.npz"


class PretrainedScores:
    def __init__(self, store: Store, plan: TrialPlan, device: str, group: Group):
        self.dir = store.path("pretrained", plan.sweep, model_key(plan, device))
        self.plan, self.group = plan, group
        self.reused: list[str] = []  # the slices this trial read instead of scoring (rank 0)

    def score(self, lm: LoadedModel, slices: list[EvalSlice]) -> ScoreResult | None:
        """The pretrained scores of `slices` in their order (rank 0; None elsewhere)."""
        main = self.group.is_main
        with self._lock() if main else contextlib.nullcontext():
            have = [self._load(sl) for sl in slices] if main else []
            missing = self.group.broadcast([i for i, r in enumerate(have) if r is None] if main else None)
            for i in missing:
                res = score_all(lm, [slices[i]], self.plan.scoring, self.group, hidden_task(self.plan))
                if main:
                    self._save(slices[i], res)
                    have[i] = res
            if not main:
                return None
            self.reused = [self._name(sl) for i, sl in enumerate(slices) if i not in missing]
            return concat_results(have)

    @contextlib.contextmanager
    def _lock(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _name(self, sl: EvalSlice) -> str:
        return slice_name(sl, hidden=keeps_hidden(self.plan, sl.task))

    def _load(self, sl: EvalSlice) -> ScoreResult | None:
        path = self.dir / self._name(sl)
        if not path.exists():
            return None
        try:
            with np.load(path) as saved:
                arrays = {name: saved[name] if name in saved.files else None for name in _ARRAYS}
                layers = tuple(int(k) for k in saved["layers"])
        except (OSError, ValueError, KeyError):
            return None  # unreadable: scored again, and replaced
        if arrays["ll_sum"].shape != (len(sl.examples), 2):
            return None
        return ScoreResult(**arrays, layers=layers)

    def _save(self, sl: EvalSlice, res: ScoreResult) -> None:
        arrays = {name: getattr(res, name) for name in _ARRAYS if getattr(res, name) is not None}
        with replacing(self.dir / self._name(sl)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, layers=np.array(res.layers), **arrays)
