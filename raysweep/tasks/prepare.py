"""Materialise prepared tasks as folders that a spec's `data.sources.<task>` can point at.

`raysweep tasks prepare NAMES --out DIR` runs this on a machine with hub access; the folder
`DIR/<task>/` then holds the binary splits exactly as `prepare_task` produced them
(`train|validation|test.parquet` in the prepared schema, already in their seeded order) and
`report.json`, the per-split step counts. Re-reading the folder gives the same examples in
the same order, so a sweep run offline matches one run against the hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from raysweep.constants import SPLITS
from raysweep.errors import BadInput
from raysweep.store import replacing_dir
from raysweep.tasks.base import PreparedTask, PrepReport, examples_table, get_task, prepare_task
from raysweep.tasks.sources import data_root_sources

if TYPE_CHECKING:
    from raysweep.spec import SweepSpec

REPORT_FILE = "report.json"


@dataclass(frozen=True)
class PreparedFolder:
    task: str
    path: Path
    report: PrepReport


@dataclass(frozen=True)
class PrepParams:
    """What the folder was prepared with, recorded next to the counts."""

    seed: int
    cap: int
    max_chars: int


def _report_json(report: PrepReport, params: PrepParams) -> str:
    body = {
        "task": report.task,
        "source": report.source,
        "split_fallback": report.split_fallback,
        **asdict(params),
        "counts": {split: vars(c) for split, c in report.counts.items()},
    }
    return json.dumps(body, indent=2) + "\n"


def write_prepared(prepared: PreparedTask, folder: Path, params: PrepParams) -> Path:
    """Write into a sibling temporary folder, then swap it in: a half-written folder is never
    mistaken for a prepared one."""
    with replacing_dir(folder) as tmp:
        for split in SPLITS:
            pq.write_table(examples_table(prepared.name, {split: prepared.splits[split]}), tmp / f"{split}.parquet")
        (tmp / REPORT_FILE).write_text(_report_json(prepared.report, params), encoding="utf-8")
    return folder


def prepare_to_folder(
    names: Sequence[str],
    out_dir: str | os.PathLike,
    seed: int,
    cap: int,
    max_chars: int,
    sources: Mapping[str, str] | None = None,
    data_root: str | os.PathLike | None = None,
) -> list[PreparedFolder]:
    """Prepare each task (from `sources[name]` if given, else `data_root/<name>` where that
    folder exists, else its default source) into `out_dir/<name>/`. Every task is prepared
    before the first folder is written, so a bad name or bad data writes nothing."""
    for name in names:
        get_task(name)
    names = list(dict.fromkeys(names))
    sources = dict(sources or {})
    if data_root is not None:
        sources = data_root_sources(names, data_root, sources)
    params = PrepParams(seed=seed, cap=cap, max_chars=max_chars)
    prepared = [prepare_task(name, seed=seed, cap=cap, max_chars=max_chars, source=sources.get(name)) for name in names]
    out: list[PreparedFolder] = []
    for task in prepared:
        path = write_prepared(task, Path(out_dir) / task.name, params)
        out.append(PreparedFolder(task=task.name, path=path, report=task.report))
    return out


def prepare_sweep_tasks(spec: SweepSpec) -> dict[str, PreparedTask]:
    """Every task of `spec`, prepared once as its trials will see it. A task some phase trains
    on needs a train split; a task that is only evaluated does not. An error about a folder named
    under `data.sources` starts with that field, which is what the user edits."""
    trained = set(spec.trained_task_list)
    out: dict[str, PreparedTask] = {}
    for name in spec.tasks:
        source = spec.data.sources.get(name)
        try:
            out[name] = prepare_task(
                name,
                seed=spec.data.seed,
                cap=spec.data.cap,
                max_chars=spec.data.max_chars,
                source=source,
                need_train=name in trained,
            )
        except BadInput as exc:
            if source is None:
                raise
            raise type(exc)(f"data.sources.{name}: {str(exc).removeprefix(f'task {name}: ')}") from None
    return out
