"""Run registered analyses over a store and persist their outcomes.

Outputs of a run over every sweep go to `analysis/<name>/`, of one sweep to
`analysis/by-sweep/<sweep>/<name>/` (analysis names are identifiers, so `by-sweep` cannot
collide with one): a Parquet file per table plus `outcome.json` with the status, the
one-line message and a fingerprint of the trials it saw, which tells a later reader
(the report) whether the outputs still describe the store.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import raysweep.analysis.registry as registry
from raysweep.analysis.context import AnalysisContext, AnalysisParams, SweepIndex
from raysweep.analysis.engine import choose_engine
from raysweep.errors import BadInput
from raysweep.store import Store, atomic_write_bytes, atomic_write_table

STATUSES = ("ok", "skipped", "failed")


@dataclass
class AnalysisOutcome:
    name: str
    status: str  # ok | skipped | failed
    message: str  # one line
    tables: dict[str, pa.Table] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)
    engine: str = ""
    seconds: float = 0.0
    fingerprint: str = ""

    @property
    def title(self) -> str:
        try:
            return registry.get(self.name).title
        except KeyError:
            return self.name

    @property
    def figure(self) -> str:
        try:
            return registry.get(self.name).figure
        except KeyError:
            return ""

    @property
    def main_table(self) -> pa.Table | None:
        return next(iter(self.tables.values()), None)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def outputs_dir(store: Store, sweep: str | None, name: str) -> Path:
    base = store.analysis_dir if sweep is None else store.analysis_dir / "by-sweep" / sweep
    return base / name


def store_fingerprint(store: Store, sweep: str | None) -> str:
    """Changes whenever a trial row is rewritten (status, milestones): done trials' scores
    never change afterwards, so this is enough to tell stale outputs from fresh ones."""
    base = store.path("trials") if sweep is None else store.path("trials", sweep)
    h = hashlib.sha1()
    if base.is_dir():
        for p in sorted(base.rglob("*.parquet")):
            if p.name.startswith(("_", ".")):
                continue
            st = p.stat()
            h.update(f"{p.relative_to(store.root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _check_names(only: list[str] | None) -> list[str]:
    known = registry.names()
    if only is None:
        return known
    unknown = [n for n in only if n not in known]
    if unknown:
        raise BadInput(f"analysis: unknown name(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return [n for n in known if n in set(only)]


def run_analyses(
    store: Store,
    only: list[str] | None = None,
    engine: str = "auto",
    sweep: str | None = None,
    *,
    params: AnalysisParams | None = None,
    write: bool = True,
    write_skipped: bool = True,
) -> list[AnalysisOutcome]:
    """Run the registered analyses (all, or those named in `only`, in registry order) and,
    with `write`, put their tables under the store's analysis directory. An analysis whose
    inputs the sweep lacks is 'skipped', one that raises is 'failed'; either way the others
    still run. Without `write_skipped`, a skipped analysis leaves its last results in place."""
    names = _check_names(only)
    if not store.root.is_dir():
        raise BadInput(f"store: {str(store.root)!r} does not exist")
    store.check_version()
    choice = choose_engine(engine, store.root)
    index = SweepIndex.build(store, sweep)
    fingerprint = store_fingerprint(store, sweep)
    ctx = AnalysisContext(
        store=store, sweep=sweep, engine_name=choice.name, params=params or AnalysisParams(), index=index
    )
    outcomes = []
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                analysis = registry.get(name)
                result = analysis.run(ctx)
                notes = (*result.notes, index.schedule_note(analysis.reads), index.dropped_note())
                msg = "; ".join(m for m in (result.message, *notes) if m)
                out = AnalysisOutcome(name, "ok", one_line(msg), dict(result.tables))
            except registry.Skip as exc:
                out = AnalysisOutcome(name, "skipped", one_line(str(exc)))
            except Exception as exc:  # noqa: BLE001 - one broken analysis must not stop the rest
                out = AnalysisOutcome(name, "failed", one_line(f"{type(exc).__name__}: {exc}"))
            out.engine, out.seconds, out.fingerprint = choice.name, time.perf_counter() - t0, fingerprint
            out.paths = (
                _write(store, sweep, out, ctx.params) if write and (write_skipped or out.status != "skipped") else []
            )
            outcomes.append(out)
    finally:
        ctx.close()
    return outcomes


def _write(store: Store, sweep: str | None, out: AnalysisOutcome, params: AnalysisParams) -> list[Path]:
    d = outputs_dir(store, sweep, out.name)
    d.mkdir(parents=True, exist_ok=True)
    # Tables of an earlier run that this one did not produce would read as current.
    for old in d.glob("*.parquet"):
        if old.stem not in out.tables:
            old.unlink()
    paths = []
    for tname, table in out.tables.items():
        p = d / f"{tname}.parquet"
        atomic_write_table(p, table)
        paths.append(p)
    meta = {
        "name": out.name,
        "status": out.status,
        "message": out.message,
        "tables": list(out.tables),
        "engine": out.engine,
        "seconds": round(out.seconds, 3),
        "fingerprint": out.fingerprint,
        "sweep": sweep,
        "params": asdict(params),
        "written_at": time.time(),
    }
    atomic_write_bytes(d / "outcome.json", json.dumps(meta, indent=1).encode())
    return paths


def load_outcomes(store: Store, sweep: str | None = None, only: list[str] | None = None) -> list[AnalysisOutcome]:
    """Outcomes written by earlier runs, in registry order; analyses never run are absent."""
    out = []
    for name in _check_names(only):
        d = outputs_dir(store, sweep, name)
        meta_path = d / "outcome.json"
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        tables, paths = {}, []
        missing = False
        for tname in meta.get("tables", []):
            p = d / f"{tname}.parquet"
            if not p.is_file():
                missing = True
                break
            tables[tname] = pq.read_table(p)
            paths.append(p)
        if missing or meta.get("status") not in STATUSES:
            continue
        out.append(
            AnalysisOutcome(
                name=name,
                status=meta["status"],
                message=meta.get("message", ""),
                tables=tables,
                paths=paths,
                engine=meta.get("engine", ""),
                seconds=float(meta.get("seconds", 0.0)),
                fingerprint=meta.get("fingerprint", ""),
            )
        )
    return out
