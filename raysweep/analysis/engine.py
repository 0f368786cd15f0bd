"""Two ways to run the same reduction over the store's Parquet files.

An analysis never touches rows itself: it describes a `Scan` (which files, which columns,
which rows) and a `Reducer` (a per-batch `partial` that shrinks rows to a small table, and a
`combine` that merges partials). Both engines feed the same rows to the same two functions,
so they return the same table; reducers keep their arithmetic exact (integer sums, minima,
sorted row sets) so that how rows are cut into batches cannot change a single bit.

- `LocalEngine`: pyarrow datasets in this process, one thread per trial's files.
- `RayEngine`: one Ray Data job per scan: read_parquet -> select_columns -> filter(expr)
  -> map_batches(partial), partials fetched by reference and combined in the driver. No
  groupby: a Ray Data groupby shuffles through 200 partitions, seconds on any input.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from raysweep.errors import BadInput

ENGINES = ("auto", "local", "ray")
# Above this much score data a single process is the bottleneck; below it Ray's fixed
# start-up and per-job overhead (seconds) costs more than it saves.
RAY_THRESHOLD_BYTES = 2 * 1024**3

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ScanFile:
    """One Parquet file and the trial it belongs to (the store keeps one trial per file)."""

    path: Path
    sweep: str
    trial_id: str


@dataclass(frozen=True)
class Scan:
    files: tuple[ScanFile, ...]
    columns: tuple[str, ...]
    # column == value conditions, pushed down into the Parquet read by both engines.
    equals: tuple[tuple[str, str], ...] = ()
    # When set: keep only rows whose eval_task is the one given for their (sweep, trial_id),
    # i.e. a trial's own forget task. Not expressible as one static predicate cheaply.
    trial_task: tuple[tuple[str, str, str], ...] | None = None

    def read_columns(self) -> list[str]:
        extra = [c for c, _ in self.equals] + (["sweep", "trial_id", "eval_task"] if self.trial_task is not None else [])
        return list(dict.fromkeys([*self.columns, *extra]))


class Reducer(Protocol):
    def partial(self, batch: pa.Table) -> pa.Table: ...

    def combine(self, parts: list[pa.Table]) -> pa.Table: ...


def _task_lookup(scan: Scan) -> dict[tuple[str, str], str]:
    return {(s, t): task for s, t, task in scan.trial_task or ()}


def keep_trial_task_rows(batch: pa.Table, lookup: dict[tuple[str, str], str]) -> pa.Table:
    """Rows whose eval_task is their trial's entry in `lookup`; batches hold few trials, so a
    mask per distinct trial is cheaper than building a composite key per row."""
    if batch.num_rows == 0:
        return batch
    pairs = pa.table({"sweep": batch["sweep"], "trial_id": batch["trial_id"]}).group_by(["sweep", "trial_id"]).aggregate([])
    mask = None
    for s, t in zip(pairs["sweep"].to_pylist(), pairs["trial_id"].to_pylist()):
        task = lookup.get((s, t))
        if task is None:
            continue
        m = pc.and_(pc.and_(pc.equal(batch["sweep"], s), pc.equal(batch["trial_id"], t)), pc.equal(batch["eval_task"], task))
        mask = m if mask is None else pc.or_(mask, m)
    if mask is None:
        return batch.slice(0, 0)
    return batch.filter(mask)


def _partial_with_filter(batch: pa.Table, reducer: Reducer, lookup: dict[tuple[str, str], str] | None, columns: list[str]) -> pa.Table:
    if lookup is not None:
        batch = keep_trial_task_rows(batch, lookup)
    return reducer.partial(batch.select(columns))


class Engine(Protocol):
    name: str

    def reduce(self, scan: Scan, reducer: Reducer) -> pa.Table: ...

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]: ...

    def close(self) -> None: ...


def _arrow_filter(equals: Iterable[tuple[str, str]], extra: ds.Expression | None = None) -> ds.Expression | None:
    expr = extra
    for c, v in equals:
        e = ds.field(c) == v
        expr = e if expr is None else expr & e
    return expr


class LocalEngine:
    """In-process pyarrow. Files are grouped by trial so that a trial's own forget task can be
    pushed into the scan as a plain predicate; groups run on a thread pool (pyarrow releases
    the GIL while reading and aggregating)."""

    name = "local"

    def __init__(self, threads: int | None = None):
        self.threads = threads or max(1, os.cpu_count() or 1)

    def reduce(self, scan: Scan, reducer: Reducer) -> pa.Table:
        groups: dict[tuple[str, str], list[str]] = {}
        for f in scan.files:
            groups.setdefault((f.sweep, f.trial_id), []).append(str(f.path))
        lookup = _task_lookup(scan) if scan.trial_task is not None else None
        read_cols = scan.read_columns()
        out_cols = list(scan.columns)

        def run_group(key: tuple[str, str], paths: list[str]) -> list[pa.Table]:
            extra = None
            if lookup is not None:
                task = lookup.get(key)
                if task is None:
                    return []
                extra = ds.field("eval_task") == task
            dset = ds.dataset(paths, format="parquet")
            parts = []
            for batch in dset.to_batches(columns=read_cols, filter=_arrow_filter(scan.equals, extra), batch_size=1 << 20):
                if batch.num_rows:
                    parts.append(reducer.partial(pa.Table.from_batches([batch]).select(out_cols)))
            return parts

        parts: list[pa.Table] = []
        if self.threads == 1 or len(groups) <= 1:
            for key, paths in groups.items():
                parts.extend(run_group(key, paths))
        else:
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                for group_parts in pool.map(lambda kv: run_group(*kv), groups.items()):
                    parts.extend(group_parts)
        return reducer.combine(parts)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(x) for x in items]

    def close(self) -> None:
        pass


def _call(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


class RayEngine:
    """Ray Data: one job per scan, partials reduced per block, combined in the driver."""

    name = "ray"

    def __init__(self, address: str | None = None):
        import ray

        self._started = False
        if not ray.is_initialized():
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)
            self._started = True
        import ray.data

        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = False
        # Each job logs its plan at INFO; a dozen of them drown the tables the CLI prints.
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    def reduce(self, scan: Scan, reducer: Reducer) -> pa.Table:
        import ray
        import ray.data
        from ray.data.expressions import col

        if not scan.files:
            return reducer.combine([])
        dctx = ray.data.DataContext.get_current()
        saved = dctx.use_datasource_v2
        # The v2 Parquet datasource spends 1-3 s planning each read (file listing and size
        # sampling as separate tasks); v1 plans in the driver in well under a second, which
        # is most of the cost of a job over a small store. Rows and pushdowns are the same.
        dctx.use_datasource_v2 = False
        try:
            return self._reduce(scan, reducer)
        finally:
            dctx.use_datasource_v2 = saved

    def _reduce(self, scan: Scan, reducer: Reducer) -> pa.Table:
        import ray
        import ray.data
        from ray.data.expressions import col

        paths = sorted({str(f.path) for f in scan.files})
        dset = ray.data.read_parquet(paths, partitioning=None).select_columns(scan.read_columns())
        expr = None
        for c, v in scan.equals:
            e = col(c) == v
            expr = e if expr is None else expr & e
        lookup = _task_lookup(scan) if scan.trial_task is not None else None
        if lookup is not None:
            # A coarse predicate Ray can push into the read; the exact per-trial test follows.
            tasks = sorted(set(lookup.values()))
            e = col("eval_task").is_in(tasks)
            expr = e if expr is None else expr & e
        if expr is not None:
            dset = dset.filter(expr=expr)
        dset = dset.map_batches(
            _partial_with_filter,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"reducer": reducer, "lookup": lookup, "columns": list(scan.columns)},
        )
        parts = [p for p in ray.get(dset.to_arrow_refs()) if p.num_rows]
        return reducer.combine(parts)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        import ray

        if not items:
            return []
        remote = ray.remote(num_cpus=1)(_call)
        return ray.get([remote.remote(fn, x) for x in items])

    def close(self) -> None:
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False


def scores_bytes(root: Path) -> int:
    base = root / "scores"
    if not base.is_dir():
        return 0
    return sum(p.stat().st_size for p in base.rglob("*.parquet"))


@dataclass
class EngineChoice:
    name: str
    reason: str
    _engine: Engine | None = field(default=None, repr=False)


def choose_engine(requested: str, store_root: Path) -> EngineChoice:
    if requested not in ENGINES:
        raise BadInput(f"engine: {requested!r} is not one of {', '.join(ENGINES)}")
    if requested != "auto":
        return EngineChoice(requested, "requested")
    if os.environ.get("RAY_ADDRESS"):
        return EngineChoice("ray", "RAY_ADDRESS is set")
    size = scores_bytes(store_root)
    if size > RAY_THRESHOLD_BYTES:
        return EngineChoice("ray", f"{size / 1024**3:.1f} GB of scores")
    return EngineChoice("local", f"{size / 1024**2:.1f} MB of scores")


def make_engine(name: str) -> Engine:
    if name == "local":
        return LocalEngine()
    if name == "ray":
        return RayEngine()
    raise BadInput(f"engine: {name!r} is not one of local, ray")
