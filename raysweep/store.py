"""The Parquet store: the product of a sweep.

Layout under the store root (every `.parquet` file is complete: files land by atomic rename,
and an epoch counts as committed once its marker in `commits/` exists, which is written last):

    store.json                                   schema version
    sweeps/<sweep>/spec.yaml                     the spec as run
    sweeps/<sweep>/plan.json                     the current version: its plan's trial ids
    sweeps/<sweep>/driver.lock                   held by the one driver running the sweep
    trials/<sweep>/<trial_id>.parquet            one row per trial: parameters + status
    scores/<sweep>/<trial_id>/<phase>/e<NNNN>.parquet   one row per (eval task, split, example)
    hidden/<sweep>/<trial_id>/<phase>/e<NNNN>.parquet   last-prompt-token hidden states
    epochs/<sweep>/<trial_id>/<phase>/e<NNNN>.parquet   per-epoch summary (loss, forget-task accuracy)
    commits/<sweep>/<trial_id>/<phase>/e<NNNN>.json     the commit marker of that epoch
    examples/<sweep>/<task>.parquet              the prepared examples (prompt, choices, gold)
    prep/<sweep>/<task>.parquet                  per-task preparation report
    checkpoints/<sweep>/<trial_id>/latest.pt     the trial's resume point (see trial.py)
    models/<key>/                                cached built-in pretrained tiny models
    pretrained/<sweep>/<model key>/<slice>.npz   pretrained scores shared by a sweep's trials (pretrained.py)
    analysis/<name>.parquet                      analysis results
    ray/                                         Ray Tune's experiment storage

Every identifying column lives inside the files (no hive `key=value` directories), so
pandas, pyarrow, duckdb and `ray.data.read_parquet` all read the same columns with the
same types.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from raysweep.errors import BadInput, StoreError, is_no_space
from raysweep.tasks.base import EXAMPLES_SCHEMA

SCHEMA_VERSION = 3
# v2 stores read as v3 with the Min-K% columns null; v1 ones (prompt-token hidden states
# only, which the pair probes cannot read) are refused.
OLDEST_READABLE_VERSION = 2
# Errors a trial records when its process is stopped (Ctrl+C, Tune stopping its actor),
# not when the trial itself fails: such a trial is `interrupted` and resumes on the next run.
INTERRUPT_ERRORS = ("KeyboardInterrupt", "SystemExit")
# Files written per (trial, phase, epoch) and covered by that epoch's commit marker.
EPOCH_KINDS = ("scores", "epochs", "hidden")


@dataclass(frozen=True)
class TrialKey:
    """Which trial a row belongs to: the sweep and trial id that key every table of the store,
    and the grid point (model, forget task, method, size, seed) the analyses group trials by.
    Defined here once: the stored schemas, the analyses' run keys and the columns of their
    tables derive from it (`trial_fields`)."""

    sweep: str
    trial_id: str
    model: str
    forget_task: str
    method: str
    size: int
    seed: int

    @property
    def label(self) -> str:
        return f"{self.model}/{self.forget_task}/{self.method}/n{self.size}/s{self.seed}"

    def row(self) -> dict[str, object]:
        return {n: getattr(self, n) for n in TRIAL_KEY}


TRIAL_KEY = tuple(f.name for f in fields(TrialKey))
_TRIAL_TYPES = {
    "sweep": pa.string(),
    "trial_id": pa.string(),
    "model": pa.string(),
    "forget_task": pa.string(),
    "method": pa.string(),
    "size": pa.int32(),
    "seed": pa.int32(),
}


def trial_fields(*names: str) -> list[tuple[str, pa.DataType]]:
    """(name, stored type) of the named `TrialKey` fields in the order named; all of them, in
    TrialKey's order, when none are."""
    return [(n, _TRIAL_TYPES[n]) for n in (names or TRIAL_KEY)]


SCORES_SCHEMA = pa.schema(
    [
        *trial_fields("sweep", "trial_id"),
        ("phase", pa.string()),
        ("epoch", pa.int32()),
        ("eval_task", pa.string()),
        ("split", pa.string()),
        ("example_idx", pa.int32()),
        ("gold", pa.int8()),
        ("ll_sum_correct", pa.float32()),
        ("ll_sum_distractor", pa.float32()),
        ("ll_mean_correct", pa.float32()),
        ("ll_mean_distractor", pa.float32()),
        ("n_tokens_correct", pa.int16()),
        ("n_tokens_distractor", pa.int16()),
        ("confidence", pa.float32()),
        ("prediction", pa.int8()),
        ("correct", pa.bool_()),
        # Schema v3: Min-K% and Min-K%++ (k = 20%) of each response (scoring.TokenStats);
        # null in rows written by v2.
        ("min_k_correct", pa.float32()),
        ("min_k_distractor", pa.float32()),
        ("min_k_pp_correct", pa.float32()),
        ("min_k_pp_distractor", pa.float32()),
    ]
)

TRIALS_SCHEMA = pa.schema(
    [
        *trial_fields("sweep", "trial_id", "model"),
        ("model_source", pa.string()),
        *trial_fields("forget_task", "method", "size", "seed"),
        ("status", pa.string()),  # pending | running | done | failed | interrupted | superseded
        ("error", pa.string()),
        ("attempts", pa.int32()),
        ("best_finetune_epoch", pa.int32()),
        ("last_forget_epoch", pa.int32()),
        ("last_relearn_epoch", pa.int32()),
        ("updated_at", pa.float64()),
        ("plan_json", pa.string()),
        # The forget ratio's baseline the trial's method aims at (random: chance; flipped: the
        # mirror of the fine-tuned accuracy), so that analyses read it here and need no method
        # code. Rows written before it existed read it as null.
        ("ratio_formula", pa.string()),
        # Lineage: what produced the row's results besides its plan (see raysweep/lineage.py).
        # Rows written before these columns existed read them as null.
        ("raysweep_version", pa.string()),
        ("git_commit", pa.string()),
        ("torch_version", pa.string()),
        ("transformers_version", pa.string()),
        ("ray_version", pa.string()),
        ("deepspeed_version", pa.string()),
        ("lm_eval_version", pa.string()),
        ("model_revision", pa.string()),
        ("data_digest", pa.string()),  # JSON: task -> content hash of its prepared examples
        ("device", pa.string()),
        ("dtype", pa.string()),
        ("precision", pa.string()),
        ("world_size", pa.int32()),
    ]
)


def recorded_formula(method: str, recorded: str | None) -> str:
    """The forget ratio's baseline of a trial's method, as its trials row records it: chance
    (1/2) for random labels, gradient ascent and NPO; the mirror image of the fine-tuned
    accuracy for flipped labels (the paper's Appendix C). Rows written before the column
    existed: flipped labels were then the only method with another baseline."""
    return recorded or ("flipped" if method == "flipped" else "random")


EPOCHS_SCHEMA = pa.schema(
    [
        *trial_fields("sweep", "trial_id"),
        ("phase", pa.string()),
        ("epoch", pa.int32()),
        ("train_loss", pa.float32()),
        ("forget_train_acc", pa.float32()),
        ("forget_validation_acc", pa.float32()),
        ("forget_test_acc", pa.float32()),
        ("seconds", pa.float32()),
    ]
)


def hidden_schema(dim: int) -> pa.Schema:
    """One row per (example, layer). `hidden` is the last prompt token's state (what the
    variance predictor reads); `hidden_correct` / `hidden_distractor` are the states at the
    last token of prompt + correct choice and prompt + distractor (what the pair probes read).
    `layer` indexes the model's hidden states as Python does: -5 is the fifth-to-last."""
    vec = pa.list_(pa.float32(), dim)
    return pa.schema(
        [
            *trial_fields("sweep", "trial_id"),
            ("phase", pa.string()),
            ("epoch", pa.int32()),
            ("eval_task", pa.string()),
            ("split", pa.string()),
            ("example_idx", pa.int32()),
            ("layer", pa.int16()),
            ("hidden", vec),
            ("hidden_correct", vec),
            ("hidden_distractor", vec),
        ]
    )


def _can_create_in(directory: Path) -> bool:
    """os.access says yes to root everywhere, even on /proc or a read-only mount: only
    creating something proves a directory is writable. The probe is removed at once."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".raysweep-probe-", dir=directory))
    except OSError:
        return False
    return True


def _name_full_disk(exc: OSError, path: Path) -> OSError:
    """A full disk's error naming the file it failed to write (pyarrow's names none)."""
    if is_no_space(exc) and not exc.filename:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return exc


def _temp_beside(path: Path) -> Path:
    """A private name next to `path`: it starts with '_' and does not end in .parquet, so no
    reader's glob picks it up, and `remove_temp_files` knows it (`_*.tmp-*`)."""
    return path.parent / f"_{path.name}.tmp-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def replacing(path: Path):
    """Yield a temporary path beside `path`, then rename it over `path`: readers see the old
    file or the new one, never half of one. The temporary name starts with '_' and does not
    end in .parquet, so no reader's glob picks it up; a failed write (a full disk) leaves
    nothing behind, and its error names the store file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        named = _name_full_disk(exc, path)
        if named is exc:
            raise
        raise named from exc
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing_dir(target: Path, *, keep_existing: bool = False):
    """`replacing` for a folder: yield a private folder beside `target`, then rename it to
    `target`, so that no reader (or concurrent builder) sees half of one. An existing target
    is replaced, or with `keep_existing` kept (another builder won the race; its copy is as
    good) and the new one dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared folder.
    tmp = _temp_beside(target)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists() and not keep_existing:
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (keep_existing and target.exists()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    with replacing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())


@dataclass(frozen=True)
class EpochKey:
    sweep: str
    trial_id: str
    phase: str
    epoch: int

    @property
    def rel(self) -> Path:
        return Path(self.sweep) / self.trial_id / self.phase / f"e{self.epoch:04d}"

    def file(self, kind: str) -> Path:
        """The epoch's `kind` table (scores, epochs, hidden), relative to the store root."""
        return Path(kind) / f"{self.rel}.parquet"


@dataclass
class EpochRecord:
    """Everything one epoch of one trial writes: committed together, marker last."""

    key: EpochKey
    scores: pa.Table
    epoch_summary: pa.Table
    hidden: pa.Table | None = None


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    # ---- creation and validation -------------------------------------------------------

    @staticmethod
    def check_writable(root: str | Path) -> None:
        """Refuse a path that cannot hold a store, before anything is written anywhere."""
        p = Path(root).absolute()
        if p.exists() and not p.is_dir():
            raise BadInput(f"store: {str(p)!r} exists and is not a directory")
        probe = p
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK) or not _can_create_in(probe):
            raise BadInput(f"store: {str(p)!r} is not writable")
        meta = p / "store.json"
        if meta.is_file():
            Store(p).check_version()

    def check_version(self) -> None:
        meta = self.root / "store.json"
        if not meta.is_file():
            return
        try:
            version = int(json.loads(meta.read_text())["schema_version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"store: {meta} is unreadable ({exc})") from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store: {self.root} was written by a newer raysweep (schema v{version}); this one reads up to v{SCHEMA_VERSION}"
            )
        if version < OLDEST_READABLE_VERSION:
            raise StoreError(
                f"store: {self.root} has schema v{version} (hidden states without pair states); this raysweep writes "
                f"v{SCHEMA_VERSION}: run the sweep into a new store"
            )

    def ensure(self) -> None:
        self.check_version()
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "store.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps({"schema_version": SCHEMA_VERSION}).encode())

    def exists(self) -> bool:
        return (self.root / "store.json").is_file()

    # ---- paths -------------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    # ---- writes ------------------------------------------------------------------------

    def write_spec(self, sweep: str, text: str) -> None:
        atomic_write_bytes(self.path("sweeps", sweep, "spec.yaml"), text.encode())

    def write_trial_row(self, row: dict) -> None:
        row = {**{f.name: None for f in TRIALS_SCHEMA}, **row, "updated_at": time.time()}
        table = pa.Table.from_pylist([row], schema=TRIALS_SCHEMA)
        atomic_write_table(self.path("trials", row["sweep"], f"{row['trial_id']}.parquet"), table)

    def write_plan(self, sweep: str, version: str, trial_ids: list[str]) -> None:
        atomic_write_bytes(
            self.path("sweeps", sweep, "plan.json"), json.dumps({"version": version, "trial_ids": trial_ids}).encode()
        )

    def current_plan(self, sweep: str) -> dict | None:
        """{"version", "trial_ids"} of the sweep's current version, or None where no driver
        recorded one (stores written before plans were recorded, hand-made test stores)."""
        try:
            plan = json.loads(self.path("sweeps", sweep, "plan.json").read_text())
        except (OSError, ValueError):
            return None
        return plan if isinstance(plan, dict) and isinstance(plan.get("trial_ids"), list) else None

    def read_trial_row(self, sweep: str, trial_id: str) -> dict | None:
        """One trial's current row, or None if it has none (or none readable)."""
        try:
            rows = pq.read_table(self.path("trials", sweep, f"{trial_id}.parquet")).to_pylist()
        except Exception:  # noqa: BLE001 - absent or unreadable: the caller decides
            return None
        return rows[0] if rows else None

    def write_examples(self, sweep: str, task: str, table: pa.Table) -> None:
        atomic_write_table(self.path("examples", sweep, f"{task}.parquet"), table.cast(EXAMPLES_SCHEMA))

    def write_prep_report(self, sweep: str, task: str, rows: list[dict]) -> None:
        atomic_write_table(self.path("prep", sweep, f"{task}.parquet"), pa.Table.from_pylist(rows))

    def commit_epoch(self, rec: EpochRecord) -> None:
        """Data files first, marker last: an epoch without a marker is redone on resume,
        and rewriting its files by rename replaces them, so no row exists twice."""
        key = rec.key
        tables = {
            "scores": rec.scores.cast(SCORES_SCHEMA),
            "epochs": rec.epoch_summary.cast(EPOCHS_SCHEMA),
            "hidden": rec.hidden,
        }
        files = []
        for kind, table in tables.items():
            if table is not None:
                atomic_write_table(self.root / key.file(kind), table)
                files.append(key.file(kind).as_posix())
        marker = {
            "trial_id": key.trial_id,
            "phase": key.phase,
            "epoch": key.epoch,
            "rows": rec.scores.num_rows,
            "files": files,
        }
        atomic_write_bytes(self.path("commits", f"{key.rel}.json"), json.dumps(marker).encode())

    # ---- reads -------------------------------------------------------------------------

    def committed_epochs(self, sweep: str, trial_id: str) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        base = self.path("commits", sweep, trial_id)
        if not base.is_dir():
            return out
        for phase_dir in base.iterdir():
            eps = sorted(int(p.stem[1:]) for p in phase_dir.glob("e*.json"))
            if eps:
                out[phase_dir.name] = eps
        return out

    def files(self, kind: str, sweep: str | None = None, committed_only: bool = True) -> list[Path]:
        base = self.path(kind) if sweep is None else self.path(kind, sweep)
        if not base.is_dir():
            return []
        files = sorted(p for p in base.rglob("*.parquet") if not p.name.startswith(("_", ".")))
        if committed_only and kind in EPOCH_KINDS:
            # The marker is the commit: an epoch's files written before a crash, without their
            # marker, are invisible until the resumed trial rewrites and commits them.
            files = [f for f in files if (m := self._marker_for(f)) is None or m.exists()]
        return files

    def _marker_for(self, data_file: Path) -> Path | None:
        rel = data_file.relative_to(self.root)
        if len(rel.parts) != 5 or rel.parts[0] not in EPOCH_KINDS:
            return None
        return self.root / "commits" / Path(*rel.parts[1:]).with_suffix(".json")

    def is_committed(self, key: EpochKey) -> bool:
        """An epoch whose marker is there and reads back as this epoch's: an empty or
        garbled marker commits nothing (its epoch is recomputed)."""
        return marker_problem(self.path("commits", f"{key.rel}.json"), key) is None

    def uncommit(self, key: EpochKey, kinds: tuple[str, ...] = EPOCH_KINDS) -> None:
        """Remove an epoch (marker first, so a crash half-way leaves it uncommitted, never
        committed with files missing). With a subset of kinds, only those files go and the
        marker is rewritten without them."""
        marker = self.path("commits", f"{key.rel}.json")
        if set(kinds) >= set(EPOCH_KINDS):
            marker.unlink(missing_ok=True)
        elif marker.is_file():
            meta = json.loads(marker.read_text())
            meta["files"] = [f for f in meta.get("files", []) if f.split("/", 1)[0] not in kinds]
            atomic_write_bytes(marker, json.dumps(meta).encode())
        for kind in kinds:
            (self.root / key.file(kind)).unlink(missing_ok=True)

    def add_to_commit(self, key: EpochKey, kind: str, table: pa.Table) -> None:
        """Add a file to an epoch that is already committed (the best fine-tuning epoch's
        hidden states, known only when the phase ends): file first, then the marker's list."""
        atomic_write_table(self.root / key.file(kind), table)
        marker = self.path("commits", f"{key.rel}.json")
        if marker.is_file():
            meta = json.loads(marker.read_text())
            name = key.file(kind).as_posix()
            if name not in meta.get("files", []):
                meta["files"] = [*meta.get("files", []), name]
                atomic_write_bytes(marker, json.dumps(meta).encode())

    def extend_scores(self, key: EpochKey, table: pa.Table) -> None:
        """Add rows to a committed epoch's scores: the other evaluation tasks at the best
        fine-tuning epoch, scored when the phase ends under a sparse scoring schedule. Rows of
        the same (task, split) already there are replaced, so a rerun after a crash adds
        nothing twice; the file is replaced by rename, then the marker's row count."""
        path = self.root / key.file("scores")
        old = pq.read_table(path)
        added = {(t, s) for t, s in zip(table["eval_task"].to_pylist(), table["split"].to_pylist())}
        keep = [(t, s) not in added for t, s in zip(old["eval_task"].to_pylist(), old["split"].to_pylist())]
        merged = pa.concat_tables([old.filter(pa.array(keep, pa.bool_())), table.cast(SCORES_SCHEMA)])
        atomic_write_table(path, merged)
        marker = self.path("commits", f"{key.rel}.json")
        if marker.is_file():
            meta = json.loads(marker.read_text())
            meta["rows"] = merged.num_rows
            atomic_write_bytes(marker, json.dumps(meta).encode())

    def epoch_files(self, kind: str, sweep: str, trial_id: str, phase: str) -> dict[int, Path]:
        """Every data file of one trial's phase, committed or not, by epoch."""
        base = self.path(kind, sweep, trial_id, phase)
        if not base.is_dir():
            return {}
        return {int(f.stem[1:]): f for f in base.glob("e*.parquet")}

    def dataset(self, kind: str, sweep: str | None = None) -> ds.Dataset | None:
        files = self.files(kind, sweep)
        if not files:
            return None
        try:
            # Trials rows from before the lineage columns would otherwise set the schema
            # for all rows (a dataset takes its first file's) and drop those columns.
            schema = TRIALS_SCHEMA if kind == "trials" else None
            return ds.dataset([str(f) for f in files], format="parquet", schema=schema)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(
                f"store: cannot open {kind} files ({exc}); run `raysweep repair` to quarantine bad files"
            ) from None

    def read(
        self,
        kind: str,
        *,
        sweep: str | None = None,
        columns: list[str] | None = None,
        filter: ds.Expression | None = None,
    ) -> pa.Table:
        dset = self.dataset(kind, sweep)
        schema = {
            "scores": SCORES_SCHEMA,
            "trials": TRIALS_SCHEMA,
            "epochs": EPOCHS_SCHEMA,
            "examples": EXAMPLES_SCHEMA,
        }.get(kind)
        if dset is None:
            if schema is None:
                return pa.table({})
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        try:
            return dset.to_table(columns=columns, filter=filter)
        except (pa.ArrowInvalid, OSError) as exc:
            raise StoreError(
                f"store: cannot read {kind} ({exc}); run `raysweep repair` to quarantine bad files"
            ) from None

    def trials(self, sweep: str | None = None) -> pa.Table:
        return self.read("trials", sweep=sweep)

    def sweeps(self) -> list[str]:
        base = self.path("trials")
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


MARKER_KEYS = ("trial_id", "phase", "epoch", "files")


def marker_problem(path: Path, key: EpochKey | None = None) -> str | None:
    """Why the commit marker at `path` commits nothing (None: it is sound). Markers are a few
    hundred bytes, so reading one costs about what checking that it exists does."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return "no commit marker"
    except OSError as exc:
        return f"commit marker unreadable ({exc.strerror or exc})"
    if not raw.strip():
        return "commit marker is empty"
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        return f"commit marker is not JSON ({exc})"
    if not isinstance(meta, dict) or any(k not in meta for k in MARKER_KEYS) or not isinstance(meta["files"], list):
        return f"commit marker lacks {', '.join(k for k in MARKER_KEYS if not isinstance(meta, dict) or k not in meta) or 'a list of files'}"
    if key is not None and (meta["trial_id"], meta["phase"], meta["epoch"]) != (key.trial_id, key.phase, key.epoch):
        return f"commit marker names {meta['trial_id']}/{meta['phase']}/e{meta['epoch']}, not its own epoch"
    return None
