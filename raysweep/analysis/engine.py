"""Two ways to run the same reduction over the store's Parquet files.

An analysis never touches rows itself: it describes a `Scan` (which files, which columns,
which rows) and a `Reducer` (a per-batch `partial` that shrinks rows to a small table, and a
`combine` that merges partials). Both engines feed the same rows to the same two functions,
so they return the same table; reducers keep their arithmetic exact (integer sums, minima,
sorted row sets) so that how rows are cut into batches cannot change a single bit.

- `LocalEngine`: in this process; DuckDB's Parquet reader streams Arrow batches into the
  partials (DuckDB only reads; the arithmetic is the reducers', shared with Ray).
- `RayEngine`: one Ray Data job per scan: read_parquet -> select_columns -> filter(expr)
  -> map_batches(partial), partials fetched by reference and combined in the driver. No
  groupby: a Ray Data groupby shuffles through 200 partitions, seconds on any input.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from raysweep.errors import BadInput

ENGINES = ("auto", "local", "ray")
# Above this much score data a single process is the bottleneck; below it Ray's fixed
# start-up and per-job overhead (seconds) costs more than it saves.
RAY_THRESHOLD_BYTES = 2 * 1024**3

CHUNK_ROWS = 1 << 18
RAY_BLOCK_BYTES = 64 * 1024**2
# One read task per CPU measured ~10% faster than two on a 2-CPU node; RAY_BLOCK_BYTES
# still splits big scans finer.
RAY_BLOCKS_PER_CPU = 1

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
    equals: tuple[tuple[str, str | int], ...] = ()
    # When set: keep only rows whose eval_task is the one given for their (sweep, trial_id),
    # i.e. a trial's own forget task. Not expressible as one static predicate cheaply.
    trial_task: tuple[tuple[str, str, str], ...] | None = None

    def read_columns(self) -> list[str]:
        extra = [c for c, _ in self.equals] + (
            ["sweep", "trial_id", "eval_task"] if self.trial_task is not None else []
        )
        return list(dict.fromkeys([*self.columns, *extra]))


class Reducer(Protocol):
    """partial: rows -> small table; combine: partials -> result. A reducer may also have
    `partial_sql(source) -> str`, the same partial as a DuckDB query, which the local
    engine then prefers; it must produce exactly the table `partial` would."""

    def partial(self, batch: pa.Table) -> pa.Table: ...

    def combine(self, parts: list[pa.Table]) -> pa.Table: ...


def _task_lookup(scan: Scan) -> dict[tuple[str, str], str]:
    return {(s, t): task for s, t, task in scan.trial_task or ()}


def keep_trial_task_rows(batch: pa.Table, lookup: dict[tuple[str, str], str]) -> pa.Table:
    """Rows whose eval_task is their trial's entry in `lookup`, vectorised: each row's
    expected task is looked up by position of its trial in the lookup's key list."""
    if batch.num_rows == 0:
        return batch
    keys = list(lookup)
    tids = [t for _, t in keys]
    if len(set(tids)) == len(tids):
        # Trial ids are unique within this scan (the usual case): the id alone is the key.
        row_key = batch["trial_id"]
        value_set = pa.array(tids, pa.string())
    else:
        row_key = pc.binary_join_element_wise(batch["sweep"], batch["trial_id"], "\x00")
        value_set = pa.array([f"{s}\x00{t}" for s, t in keys], pa.string())
    pos = pc.index_in(row_key, value_set=value_set)
    expected = pc.take(pa.array([lookup[k] for k in keys], pa.string()), pos)
    return batch.filter(pc.fill_null(pc.equal(batch["eval_task"], expected), False))


def _partial_with_filter(
    batch: pa.Table, reducer: Reducer, lookup: dict[tuple[str, str], str] | None, columns: list[str]
) -> pa.Table:
    if lookup is not None:
        batch = keep_trial_task_rows(batch, lookup)
    return reducer.partial(batch.select(columns))


class Engine(Protocol):
    name: str

    def reduce(self, scan: Scan, reducer: Reducer) -> pa.Table: ...

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]: ...

    def close(self) -> None: ...


def _sql_str(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def _sql_value(v: str | int) -> str:
    # An integer column (the hidden states' layer) compared with a quoted string would make
    # DuckDB cast per row; an int literal keeps the predicate pushed into the scan.
    return str(int(v)) if isinstance(v, int) else _sql_str(v)


class LocalEngine:
    """In-process: DuckDB reads the files (its Parquet reader prunes columns, pushes the
    predicates into the scan and decodes on all cores, about twice as fast as a pyarrow
    dataset scan here) and streams Arrow batches into the reducer's partial, so memory
    stays at a few batches; combine runs as in the Ray engine."""

    name = "local"

    def reduce(self, scan: Scan, reducer: Reducer) -> pa.Table:
        import duckdb

        if not scan.files:
            return reducer.combine([])
        paths = sorted({str(f.path) for f in scan.files})
        con = duckdb.connect()
        try:
            where = " AND ".join(f"s.{c} = {_sql_value(v)}" for c, v in scan.equals) or "TRUE"
            join = ""
            if scan.trial_task is not None:
                keep = pa.table(
                    {k: [row[i] for row in scan.trial_task] for i, k in enumerate(("sweep", "trial_id", "eval_task"))}
                )
                con.register("keep", keep)
                join = "SEMI JOIN keep k ON s.sweep = k.sweep AND s.trial_id = k.trial_id AND s.eval_task = k.eval_task"
            cols = ", ".join(f"s.{c}" for c in scan.columns)
            files = "[" + ", ".join(_sql_str(p) for p in paths) + "]"
            sql = f"SELECT {cols} FROM read_parquet({files}) s {join} WHERE {where}"
            partial_sql = getattr(reducer, "partial_sql", None)
            if partial_sql is not None:
                # Aggregating inside DuckDB skips turning every row into Arrow strings, the
                # larger part of this scan's cost; the partial it returns is exact.
                return reducer.combine([con.sql(partial_sql(f"({sql})")).to_arrow_table()])
            parts: list[pa.Table] = []
            pending: list[pa.RecordBatch] = []
            rows = 0
            # DuckDB hands out about one batch per file and the store's files are small (one
            # epoch of one trial): gathering ~256k rows per partial keeps Python's per-call
            # overhead off the profile.
            for batch in con.sql(sql).to_arrow_reader(CHUNK_ROWS):
                pending.append(batch)
                rows += batch.num_rows
                if rows >= CHUNK_ROWS:
                    parts.append(reducer.partial(pa.Table.from_batches(pending)))
                    pending, rows = [], 0
            if rows:
                parts.append(reducer.partial(pa.Table.from_batches(pending)))
        finally:
            con.close()
        return reducer.combine(parts)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(x) for x in items]

    def close(self) -> None:
        pass


def _call_all(fn: Callable[[T], R], items: list[T]) -> list[R]:
    return [fn(x) for x in items]


class RayEngine:
    """Ray Data: one job per scan, partials reduced per block, combined in the driver."""

    name = "ray"

    def __init__(self, address: str | None = None):
        import ray

        self._started = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            if not address:
                # As for `run`: a cluster of its own, never whatever `ray start` last left
                # recorded on this machine, and token auth on unless the user turned it off.
                os.environ.setdefault("RAY_AUTH_MODE", "token")
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False)
            self._started = True
        import ray.data

        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = False
        # Each job logs its plan at INFO; a dozen of them drown the tables the CLI prints.
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    def reduce(self, scan: Scan, reducer: Reducer) -> pa.Table:
        import ray.data

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
        # Left to itself the reader makes two blocks per file, and the store's files are
        # small (one epoch of one trial): hundreds of tiny tasks cost 5-10x the reading
        # itself. A block per CPU, or one per RAY_BLOCK_BYTES of Parquet, instead.
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        total = sum(os.path.getsize(p) for p in paths)
        blocks = max(1, min(len(paths), max(RAY_BLOCKS_PER_CPU * cpus, math.ceil(total / RAY_BLOCK_BYTES))))
        dset = ray.data.read_parquet(paths, partitioning=None, override_num_blocks=blocks).select_columns(
            scan.read_columns()
        )
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
        """fn over items in Ray tasks, results in item order. Items go in a few batches per
        CPU: one task per item would pay Ray's per-task overhead hundreds of times."""
        import ray

        if not items:
            return []
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = min(len(items), 2 * cpus)
        batches = [list(items[i::n]) for i in range(n)]
        remote = ray.remote(num_cpus=1)(_call_all)
        done = ray.get([remote.remote(fn, b) for b in batches])
        out: list[R] = [None] * len(items)  # type: ignore[list-item]
        for i, results in enumerate(done):
            out[i::n] = results
        return out

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


@dataclass(frozen=True)
class EngineChoice:
    name: str
    reason: str


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
