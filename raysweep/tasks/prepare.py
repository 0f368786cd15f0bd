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
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.tasks.base import SPLITS, Example, PreparedTask, PrepReport, get_task, prepare_task

REPORT_FILE = "report.json"

_SCHEMA = pa.schema(
    [
        ("idx", pa.int64()),
        ("uid", pa.string()),
        ("prompt", pa.string()),
        ("choice_0", pa.string()),
        ("choice_1", pa.string()),
        ("gold", pa.int64()),
    ]
)


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


def examples_table(examples: Sequence[Example]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"idx": e.idx, "uid": e.uid, "prompt": e.prompt, "choice_0": e.choices[0], "choice_1": e.choices[1], "gold": e.gold}
            for e in examples
        ],
        schema=_SCHEMA,
    )


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
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared folder.
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for split in SPLITS:
            pq.write_table(examples_table(prepared.splits[split]), tmp / f"{split}.parquet")
        (tmp / REPORT_FILE).write_text(_report_json(prepared.report, params), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def prepare_to_folder(
    names: Sequence[str],
    out_dir: str | os.PathLike,
    seed: int,
    cap: int,
    max_chars: int,
    sources: Mapping[str, str] | None = None,
) -> list[PreparedFolder]:
    """Prepare each task (from `sources[name]` if given, else its default source) into
    `out_dir/<name>/`. Unknown names fail before anything is loaded or written."""
    for name in names:
        get_task(name)
    sources = sources or {}
    params = PrepParams(seed=seed, cap=cap, max_chars=max_chars)
    out: list[PreparedFolder] = []
    for name in dict.fromkeys(names):
        prepared = prepare_task(name, seed=seed, cap=cap, max_chars=max_chars, source=sources.get(name))
        path = write_prepared(prepared, Path(out_dir) / name, params)
        out.append(PreparedFolder(task=name, path=path, report=prepared.report))
    return out

