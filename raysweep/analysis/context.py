"""What an analysis sees: the done trials, their milestone files, an engine, and parameters.

Scans shared by several analyses (the per-milestone accuracy sums above all) are cached on
the context, so `run_analyses` reads each file once however many analyses need it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from raysweep.analysis.engine import Engine, Scan, ScanFile, make_engine
from raysweep.analysis.reducers import AccuracySums, CollectRows, FirstCrossing, PairedCorrect
from raysweep.constants import MILESTONES, SPLITS
from raysweep.errors import BadInput
from raysweep.store import EpochKey, Store, TrialKey, recorded_formula, trial_fields

HIDDEN_CHUNK_BYTES = 256 * 1024**2
DENOMINATORS = ("trial", "own")


def milestones(store: Store, sweep: str | None = None) -> pa.Table:
    """(trial_id, milestone, phase, epoch) of the points the paper compares:
    pretrained, finetuned (best validation epoch), forgotten (last forget epoch),
    relearned (last relearn epoch). Only done trials of each sweep's current version:
    a trial of another version, whatever its row says, is never pooled with these."""
    t = store.trials(sweep).to_pylist()
    current: dict[str, set[str] | None] = {}
    rows = []
    for r in t:
        if r["status"] != "done":
            continue
        if r["sweep"] not in current:
            plan = store.current_plan(r["sweep"])
            current[r["sweep"]] = None if plan is None else set(plan["trial_ids"])
        if current[r["sweep"]] is not None and r["trial_id"] not in current[r["sweep"]]:
            continue
        rows.append({"trial_id": r["trial_id"], "milestone": "pretrained", "phase": "pretrained", "epoch": 0})
        if r["best_finetune_epoch"] is not None:
            rows.append(
                {
                    "trial_id": r["trial_id"],
                    "milestone": "finetuned",
                    "phase": "finetune",
                    "epoch": r["best_finetune_epoch"],
                }
            )
        if r["last_forget_epoch"] is not None:
            rows.append(
                {
                    "trial_id": r["trial_id"],
                    "milestone": "forgotten",
                    "phase": "forget",
                    "epoch": r["last_forget_epoch"],
                }
            )
        if r["last_relearn_epoch"] is not None:
            rows.append(
                {
                    "trial_id": r["trial_id"],
                    "milestone": "relearned",
                    "phase": "relearn",
                    "epoch": r["last_relearn_epoch"],
                }
            )
    schema = pa.schema(
        [("trial_id", pa.string()), ("milestone", pa.string()), ("phase", pa.string()), ("epoch", pa.int32())]
    )
    return pa.Table.from_pylist(rows, schema=schema)


@dataclass(frozen=True)
class AnalysisParams:
    # Split of the headline accuracies (forget ratio, cross-task matrix, predictors).
    split: str = "test"
    # Fig 5.1: the confidence that counts as learned (>=) / forgotten (<=).
    order_threshold: float = 0.6
    # Fig 5.1: a task is kept only with MORE than this many examples both forgotten and learned.
    order_min_examples: int = 100
    # Fig 5.1: the examples whose order is compared are those trained on.
    order_split: str = "train"
    # Fig 4.1: hidden states whose total variance predicts the forget ratio.
    variance_split: str = "train"
    # Fig 6.1: inverse regularisation strengths tried, chosen on the validation split.
    probe_cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    # Figs 4.1 and 6.1: the hidden-state layer read, a Python index into the model's hidden
    # states (-5: the fifth-to-last, the paper's).
    layer: int = -5
    # Forget ratios whose headroom (acc_ft - 0.5; flipped labels: 2 acc_ft - 1) is below
    # this are masked: a denominator near zero turns noise into ratios of +-10.
    min_headroom: float = 0.05
    # "trial": the forget run's own fine-tuned accuracy on the evaluated task; "own": the
    # evaluated task's fine-tuned accuracy in its diagonal run (the trial that forgot it).
    denominator: str = "trial"
    # Single-seed intervals: resamples of the examples (seeded per cell, so reproducible).
    bootstrap_resamples: int = 1000
    # An analysis's own parameters, by analysis name (`predict`: its `PredictParams`); an
    # analysis not named here runs with its defaults.
    args: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("split", "order_split", "variance_split"):
            if getattr(self, name) not in SPLITS:
                raise BadInput(f"analysis: {name} {getattr(self, name)!r} is not one of {', '.join(SPLITS)}")
        if not 0 < self.order_threshold < 1:
            raise BadInput(f"analysis: order_threshold {self.order_threshold} must be in (0, 1)")
        if self.order_min_examples < 0:
            raise BadInput("analysis: order_min_examples must be >= 0")
        if not self.probe_cs or any(c <= 0 for c in self.probe_cs):
            raise BadInput("analysis: probe_cs must be positive numbers")
        if not 0 <= self.min_headroom < 0.5:
            raise BadInput(f"analysis: min_headroom {self.min_headroom} must be in [0, 0.5)")
        if self.denominator not in DENOMINATORS:
            raise BadInput(f"analysis: denominator {self.denominator!r} is not one of {', '.join(DENOMINATORS)}")
        if self.bootstrap_resamples < 10:
            raise BadInput(f"analysis: bootstrap_resamples {self.bootstrap_resamples} must be >= 10")


@dataclass(frozen=True)
class EpochRef:
    phase: str
    epoch: int


@dataclass(frozen=True)
class TrialInfo(TrialKey):
    """A done trial as the analyses see it: its key, its milestones and what it committed."""

    ratio_formula: str  # the forget ratio's baseline of its method (see measures.recorded_formula)
    milestones: dict[str, EpochRef]
    # Committed epochs per phase (commit marker present): only these files are read.
    committed: dict[str, tuple[int, ...]]
    # When its other evaluation tasks were scored (`scoring.schedule`): "every_epoch", "log",
    # "milestones" or every k-th epoch ("5"). The forget task and the milestones always are.
    schedule: str = "every_epoch"

    def file(self, root: Path, kind: str, ref: EpochRef) -> Path:
        return root / EpochKey(self.sweep, self.trial_id, ref.phase, ref.epoch).file(kind)

    def scan_file(self, root: Path, kind: str, ref: EpochRef) -> ScanFile | None:
        if ref.epoch not in self.committed.get(ref.phase, ()):
            return None
        p = self.file(root, kind, ref)
        return ScanFile(p, self.sweep, self.trial_id) if p.is_file() else None


def _schedule(plan_json: str | None) -> str:
    scoring = (json.loads(plan_json) if plan_json else {}).get("scoring") or {}
    return str(scoring.get("schedule", "every_epoch"))


class _TrialsOnce(Store):
    """The store with `trials()` memoised: `milestones` reads the trial rows again on top of
    the read that gives the parameters, and with hundreds of trial files that second read
    costs as much as a small analysis."""

    def __init__(self, store: Store):
        super().__init__(store.root)
        self._trials: dict[str | None, pa.Table] = {}

    def trials(self, sweep: str | None = None) -> pa.Table:
        if sweep not in self._trials:
            self._trials[sweep] = super().trials(sweep)
        return self._trials[sweep]


@dataclass(frozen=True)
class SweepIndex:
    root: Path
    trials: tuple[TrialInfo, ...]
    # (trial_id, sweep) of copies left out: the same trial run in another sweep.
    dropped: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def build(store: Store, sweep: str | None) -> "SweepIndex":
        store = _TrialsOnce(store)
        sweeps = store.sweeps()
        if sweep is not None:
            if sweep not in sweeps:
                raise BadInput(f"sweep: {sweep!r} is not in the store (found: {', '.join(sweeps) or 'none'})")
            sweeps = [sweep]
        infos = []
        kept: dict[str, str] = {}
        dropped: list[tuple[str, str]] = []
        # Trial ids name the parameters, not the sweep, and the shipped specs overlap: the
        # same trial finished in two sweeps is one replicate, not two. The copy in the first
        # sweep by name is kept (sweeps() is sorted), so the choice never depends on timing.
        for sw in sweeps:
            rows = {r["trial_id"]: r for r in store.trials(sw).to_pylist()}
            ms: dict[str, dict[str, EpochRef]] = {}
            for m in milestones(store, sw).to_pylist():
                ms.setdefault(m["trial_id"], {})[m["milestone"]] = EpochRef(m["phase"], int(m["epoch"]))
            for tid in sorted(ms):
                if tid in kept:
                    dropped.append((tid, sw))
                    continue
                kept[tid] = sw
                r = rows[tid]
                committed = {ph: tuple(eps) for ph, eps in store.committed_epochs(sw, tid).items()}
                infos.append(
                    TrialInfo(
                        sweep=sw,
                        trial_id=tid,
                        model=r["model"] or "",
                        forget_task=r["forget_task"] or "",
                        method=r["method"] or "random",
                        size=int(r["size"] or 0),
                        seed=int(r["seed"] or 0),
                        ratio_formula=recorded_formula(r["method"] or "random", r.get("ratio_formula")),
                        milestones=ms[tid],
                        committed=committed,
                        schedule=_schedule(r.get("plan_json")),
                    )
                )
        return SweepIndex(store.root, tuple(infos), tuple(dropped))

    def schedule_note(self, reads: str) -> str:
        """One line when an analysis that reads the other evaluation tasks at every epoch
        meets trials whose schedule scored them at some epochs only."""
        sparse = sorted({t.schedule for t in self.trials if t.schedule != "every_epoch"})
        if reads != "every_epoch" or not sparse:
            return ""
        n = sum(t.schedule != "every_epoch" for t in self.trials)
        return (
            f"{n} trial(s) scored their other evaluation tasks on scoring.schedule {', '.join(sparse)}, not every "
            "epoch: their sequences with unscored epochs are left out"
        )

    def dropped_note(self) -> str:
        if not self.dropped:
            return ""
        sweeps = sorted({sw for _, sw in self.dropped})
        return (
            f"{len(self.dropped)} duplicate trial copy(ies) left out (same trial_id already in an earlier sweep; "
            f"from {', '.join(sweeps)})"
        )

    def milestone_table(self) -> pa.Table:
        """One row per (trial, milestone) with the trial's parameters: the join target that
        turns per-file sums into per-condition measures."""
        rows = []
        for t in self.trials:
            for name, ref in t.milestones.items():
                rows.append(
                    dict(
                        sweep=t.sweep,
                        trial_id=t.trial_id,
                        model=t.model,
                        forget_task=t.forget_task,
                        method=t.method,
                        size=t.size,
                        seed=t.seed,
                        ratio_formula=t.ratio_formula,
                        milestone=name,
                        phase=ref.phase,
                        epoch=ref.epoch,
                    )
                )
        schema = pa.schema(
            [
                *trial_fields(),
                ("ratio_formula", pa.string()),
                ("milestone", pa.string()),
                ("phase", pa.string()),
                ("epoch", pa.int32()),
            ]
        )
        return pa.Table.from_pylist(rows, schema=schema)

    def trial_table(self) -> pa.Table:
        schema = pa.schema(trial_fields())
        rows = [t.row() for t in self.trials]
        return pa.Table.from_pylist(rows, schema=schema)

    def milestone_files(
        self, kind: str, milestones: tuple[str, ...], trials: tuple[TrialInfo, ...] | None = None
    ) -> tuple[ScanFile, ...]:
        out = []
        for t in self.trials if trials is None else trials:
            for m in milestones:
                ref = t.milestones.get(m)
                if ref is None:
                    continue
                f = t.scan_file(self.root, kind, ref)
                if f is not None:
                    out.append(f)
        return tuple(out)

    def phase_files(
        self, kind: str, phases: tuple[str, ...], trials: tuple[TrialInfo, ...] | None = None
    ) -> tuple[ScanFile, ...]:
        out = []
        for t in self.trials if trials is None else trials:
            for ph in phases:
                for ep in t.committed.get(ph, ()):
                    f = t.scan_file(self.root, kind, EpochRef(ph, ep))
                    if f is not None:
                        out.append(f)
        return tuple(out)

    def forget_task_keys(self, trials: tuple[TrialInfo, ...] | None = None) -> tuple[tuple[str, str, str], ...]:
        return tuple((t.sweep, t.trial_id, t.forget_task) for t in (self.trials if trials is None else trials))


@dataclass
class AnalysisContext:
    store: Store
    sweep: str | None
    engine_name: str
    params: AnalysisParams
    index: SweepIndex
    _engine: Engine | None = field(default=None, repr=False)
    _cache: dict[tuple, pa.Table] = field(default_factory=dict, repr=False)
    _cells: dict[tuple, list] = field(default_factory=dict, repr=False)

    @property
    def engine(self) -> Engine:
        # Started on first use: a run whose analyses all skip never pays Ray's start-up.
        if self._engine is None:
            self._engine = make_engine(self.engine_name)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def memo(self, key: tuple, build: Callable[[], pa.Table]) -> pa.Table:
        """`build()` once per run: analyses that read the same rows share one scan."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def accuracy_sums(self, split: str | None = None) -> pa.Table:
        """Per (trial, phase, epoch, eval_task) sums at the pretrained/finetuned/forgotten
        milestones, on one split, joined with the trial's parameters and milestone name."""
        split = split or self.params.split
        key = ("accuracy_sums", split)
        if key not in self._cache:
            files = self.index.milestone_files("scores", MILESTONES)
            scan = Scan(
                files,
                columns=("sweep", "trial_id", "phase", "epoch", "eval_task", "split", "correct", "confidence"),
                equals=(("split", split),),
            )
            sums = self.engine.reduce(scan, AccuracySums())
            ms = self.index.milestone_table()
            self._cache[key] = sums.join(ms, keys=["sweep", "trial_id", "phase", "epoch"], join_type="inner").sort_by(
                [
                    ("sweep", "ascending"),
                    ("trial_id", "ascending"),
                    ("milestone", "ascending"),
                    ("eval_task", "ascending"),
                ]
            )
        return self._cache[key]

    def forget_task_scores(self, split: str | None = None) -> pa.Table:
        """Per-example rows of each trial's own forget task at the pretrained / finetuned /
        forgotten milestones, on one split or all (None): small (one task per trial), for the
        example-level predictors and the probes' labels."""
        if split is not None and ("forget_task_scores", None) in self._cache:
            every = self._cache[("forget_task_scores", None)]
            return every.filter(pc.equal(every["split"], split))
        key = ("forget_task_scores", split)
        if key not in self._cache:
            files = self.index.milestone_files("scores", MILESTONES)
            scan = Scan(
                files,
                columns=(
                    "sweep",
                    "trial_id",
                    "phase",
                    "epoch",
                    "split",
                    "example_idx",
                    "gold",
                    "confidence",
                    "correct",
                ),
                equals=(("split", split),) if split is not None else (),
                trial_task=self.index.forget_task_keys(),
            )
            self._cache[key] = self.engine.reduce(
                scan, CollectRows(order=("sweep", "trial_id", "phase", "epoch", "split", "example_idx"))
            )
        return self._cache[key]

    def first_crossings(self, trials: tuple[TrialInfo, ...]) -> pa.Table:
        """First forget / learn epochs per example of the given trials' own forget tasks."""
        key = (
            "first_crossings",
            self.params.order_threshold,
            self.params.order_split,
            tuple((t.sweep, t.trial_id) for t in trials),
        )
        if key not in self._cache:
            files = self.index.phase_files("scores", ("forget", "relearn"), trials)
            scan = Scan(
                files,
                columns=("sweep", "trial_id", "phase", "epoch", "example_idx", "confidence"),
                equals=(("split", self.params.order_split),),
                trial_task=self.index.forget_task_keys(trials),
            )
            self._cache[key] = self.engine.reduce(scan, FirstCrossing(threshold=self.params.order_threshold))
        return self._cache[key]

    def hidden_rows(
        self,
        milestones: tuple[str, ...],
        split: str | None,
        trials: tuple[TrialInfo, ...],
        columns: tuple[str, ...] = ("hidden",),
    ) -> pa.Table:
        """Hidden states (the given vector columns) at `params.layer` of the trials' own forget
        task (all splits when `split` is None). Callers pass trials of one model: the vector
        width is part of the file schema and differs between models, so one scan cannot mix them."""
        files = self.index.milestone_files("hidden", milestones, trials)
        if not files:
            return pa.table({})
        equals: tuple[tuple[str, str | int], ...] = (("layer", self.params.layer),)
        scan = Scan(
            files,
            columns=("sweep", "trial_id", "phase", "epoch", "split", "example_idx", *columns),
            equals=equals + ((("split", split),) if split is not None else ()),
            trial_task=self.index.forget_task_keys(trials),
        )
        return self.engine.reduce(
            scan, CollectRows(order=("sweep", "trial_id", "phase", "epoch", "split", "example_idx"))
        )

    def missing_layer(self, milestones: tuple[str, ...]) -> str | None:
        """One line when the hidden states at these milestones hold no row of `params.layer`
        (None when some do): a footer-and-column read of each file's `layer` column."""
        import pyarrow.parquet as pq

        layers: set[int] = set()
        for t in self.trials_with_hidden(milestones):
            for f in self.index.milestone_files("hidden", milestones, (t,)):
                found = set(pc.unique(pq.read_table(f.path, columns=["layer"])["layer"]).to_pylist())
                if self.params.layer in found:
                    return None
                layers |= found
        if not layers:
            return None
        have = ", ".join(str(x) for x in sorted(layers))
        return f"the store's hidden states hold layer(s) {have}, not layer {self.params.layer} (scoring.layers)"

    def paired_correct(self, split: str | None = None) -> pa.Table:
        """Per (sweep, trial_id, eval_task): examples scored at both the finetuned and the
        forgotten milestone, split by (correct at finetuned, correct at forgotten). These four
        counts are all a bootstrap over examples needs: resampling the examples is a
        multinomial draw over them, and it keeps each example's two milestones together."""
        split = split or self.params.split
        key = ("paired_correct", split)
        if key in self._cache:
            return self._cache[key]
        files = self.index.milestone_files("scores", ("finetuned", "forgotten"))
        marks = []
        for t in self.index.trials:
            for i, m in enumerate(("finetuned", "forgotten")):
                ref = t.milestones.get(m)
                if ref is not None:
                    marks.append((t.sweep, t.trial_id, ref.phase, ref.epoch, i))
        cols = ("sweep", "trial_id", "phase", "epoch", "eval_task", "example_idx", "correct")
        scan = Scan(files, columns=cols, equals=(("split", split),))
        self._cache[key] = self.engine.reduce(scan, PairedCorrect(tuple(marks)))
        return self._cache[key]

    def hidden_chunks(
        self, milestones: tuple[str, ...], budget_bytes: int = HIDDEN_CHUNK_BYTES
    ) -> list[tuple[TrialInfo, ...]]:
        """Trials grouped by model (one vector width per scan) and cut so that each group's
        hidden-state files stay under the budget: float32 states barely compress, so file
        size is close to what the rows take in memory, and a 7B model's states for a whole
        sweep would not fit the driver at once."""
        chunks: list[tuple[TrialInfo, ...]] = []
        by_model: dict[str, list[TrialInfo]] = {}
        for t in self.trials_with_hidden(milestones):
            by_model.setdefault(t.model, []).append(t)
        for model in sorted(by_model):
            cur: list[TrialInfo] = []
            used = 0
            for t in by_model[model]:
                size = sum(f.path.stat().st_size for f in self.index.milestone_files("hidden", milestones, (t,)))
                if cur and used + size > budget_bytes:
                    chunks.append(tuple(cur))
                    cur, used = [], 0
                cur.append(t)
                used += size
            if cur:
                chunks.append(tuple(cur))
        return chunks

    def trials_with_hidden(self, milestones: tuple[str, ...]) -> list[TrialInfo]:
        return [t for t in self.index.trials if self.index.milestone_files("hidden", milestones, (t,))]
