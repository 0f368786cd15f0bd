"""The store's health: which files cannot be read back, and moving them out of the way.

`raysweep status` and `analyze` check footers (quick), `raysweep repair` decodes every page and
quarantines what fails; a trial quarantines its own broken commit markers before resuming."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

import pyarrow.parquet as pq

from raysweep.store import EPOCH_KINDS, EpochKey, Store, marker_problem


def bad_markers(store: Store, sweep: str | None = None, trial_id: str | None = None) -> list[tuple[Path, str]]:
    """Commit markers that do not read back as their epoch's (empty, truncated, garbage)."""
    base = (
        store.path("commits")
        if sweep is None
        else store.path("commits", sweep)
        if trial_id is None
        else store.path("commits", sweep, trial_id)
    )
    if not base.is_dir():
        return []
    bad = []
    for m in sorted(base.rglob("e*.json")):
        rel = m.relative_to(store.root / "commits").parts
        key = EpochKey(rel[0], rel[1], rel[2], int(m.stem[1:])) if len(rel) == 4 and m.stem[1:].isdigit() else None
        problem = marker_problem(m, key)
        if problem is not None:
            bad.append((m, problem))
    return bad


def verify(store: Store, deep: bool = False) -> list[tuple[Path, str]]:
    """Every Parquet file that cannot be read back, with the reason.

    By default only each file's footer is read and checked against the file's size,
    which catches what a crash or a full disk leaves (truncated and half-written files)
    at a cost independent of the store's size, so `status` and `analyze` stay quick on
    big stores. `deep` decodes every page, as `repair` does, to catch damage inside a file."""
    bad = []
    for kind in ("trials", "scores", "hidden", "epochs", "examples", "prep"):
        for f in store.files(kind, committed_only=False):
            try:
                if deep:
                    pq.read_table(f)
                else:
                    check_footer(f)
            except Exception as exc:  # noqa: BLE001 - any failure to read makes the file bad
                bad.append((f, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    # A marker that does not parse would be taken for a commit by readers and crash the
    # trial that adds to it; a damaged resume point would fail every attempt to resume.
    bad += bad_markers(store)
    ckpts = store.path("checkpoints")
    for f in sorted(ckpts.rglob("*.pt")) if ckpts.is_dir() else []:
        if f.name.startswith(("_", ".")):
            continue
        problem = torch_file_problem(f, deep=deep)
        if problem is not None:
            bad.append((f, problem))
    return bad


def quarantine(store: Store, files: Iterable[Path], reopen: bool = True) -> list[Path]:
    """Move files to quarantine/. A data file or commit marker takes its epoch out of the
    store (and, with `reopen`, sends its trial back to be recomputed); a resume file only
    goes, since an unfinished trial falls back past a missing one on its own and a
    finished one never reads it again."""
    moved = []
    hit: set[tuple[str, str]] = set()
    for f in files:
        rel = Path(f).absolute().relative_to(store.root)
        dest = store.root / "quarantine" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The epoch's marker goes first, so no reader ever sees it committed without its file.
        if rel.parts[0] in EPOCH_KINDS:
            marker = store.root / "commits" / Path(*rel.parts[1:]).with_suffix(".json")
            marker.unlink(missing_ok=True)
            if len(rel.parts) == 5:
                hit.add((rel.parts[1], rel.parts[2]))
        elif rel.parts[0] == "commits" and len(rel.parts) == 5:
            hit.add((rel.parts[1], rel.parts[2]))
        os.replace(f, dest)
        moved.append(dest)
    for sweep, trial_id in sorted(hit) if reopen else []:
        reopen_trial(
            store, sweep, trial_id, "repair quarantined some of its epochs; run the sweep again to recompute them"
        )
    return moved


def reopen_trial(store: Store, sweep: str, trial_id: str, reason: str) -> None:
    """Make the next `raysweep run` recompute a trial that lost committed epochs.

    A resume point only knows how to go forward, and the lost epoch lies behind it: the
    resume point moves to quarantine too, so the trial reruns from its start and, being
    deterministic, rewrites every epoch (the intact ones with the same rows)."""
    ckpt = store.path("checkpoints", sweep, trial_id)
    if ckpt.is_dir():
        dest = store.root / "quarantine" / "checkpoints" / sweep / f"{trial_id}-{int(time.time())}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(ckpt, dest)
    row_file = store.path("trials", sweep, f"{trial_id}.parquet")
    try:
        row = pq.read_table(row_file).to_pylist()[0]
    except Exception:  # noqa: BLE001 - no readable row: the next run writes a pending one
        return
    store.write_trial_row({**row, "status": "pending", "error": reason})


def torch_file_problem(path: Path, deep: bool = False) -> str | None:
    """Why a resume file (torch's zip format) cannot be trusted, None if it can. Quick: the
    zip directory at the file's end is there and every member lies inside the file, which
    catches truncated and half-written files. Deep: every member's CRC-32 too, which catches
    damage inside a file that torch would otherwise load as wrong weights without a word."""
    import zipfile

    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"member {info.filename!r} ends past the end of the file"
            if deep:
                broken = zf.testzip()
                if broken is not None:
                    return f"member {broken!r} fails its CRC check (damaged)"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        # zipfile raises RuntimeError for some damaged headers, EOFError for cut members.
        return (
            f"not a readable torch file ({type(exc).__name__}: {exc})"
            if str(exc)
            else f"not a readable torch file ({type(exc).__name__})"
        )
    return None


def check_footer(path: Path) -> None:
    meta = pq.ParquetFile(path).metadata
    size = path.stat().st_size
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        for j in range(rg.num_columns):
            col = rg.column(j)
            start = (
                col.dictionary_page_offset
                if col.has_dictionary_page and col.dictionary_page_offset
                else col.data_page_offset
            )
            if start + col.total_compressed_size > size:
                raise OSError(f"column chunk {col.path_in_schema!r} of row group {i} ends past the end of the file")


def remove_temp_files(store: Store, sweep: str, trial_id: str) -> int:
    """Temporary files of writes that a killed process never renamed into place."""
    n = 0
    for kind in (*EPOCH_KINDS, "commits", "checkpoints"):
        base = store.path(kind, sweep, trial_id)
        if base.is_dir():
            for f in base.rglob("_*.tmp-*"):
                f.unlink(missing_ok=True)
                n += 1
    return n
