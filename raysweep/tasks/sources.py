"""Where raw task records come from: a local folder of splits, or the Hugging Face hub (and
with it the local datasets cache).

A local folder holds one file per split, Parquet or JSON lines (`<split>.parquet`,
`<split>.jsonl`, or `<split>.json` as CREAK ships it). Its records are either in the
dataset's own schema, or already prepared (`prompt, choice_0, choice_1, gold`, as
`raysweep tasks prepare` writes them), which every task reads back unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from raysweep.constants import SPLITS
from raysweep.errors import BadInput, TaskLoadError
from raysweep.tasks.base import PREPARED_FIELDS, RawSplits, is_prepared

if TYPE_CHECKING:
    from raysweep.spec import SweepSpec

_SPLIT_ALIASES = {"train": ["train"], "validation": ["validation", "dev", "valid", "val"], "test": ["test"]}
_SUFFIXES = (".parquet", ".jsonl", ".json")


def how_to_provide(task: str) -> str:
    return (
        f"run `raysweep tasks prepare {task} --out DIR` on a machine with hub access "
        f"(or put the raw splits in DIR), then set data.sources.{task}: DIR in the spec"
    )


def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON array rather than JSON lines
        return list(json.loads(text))
    # JSON lines end at "\n" only: str.splitlines() would also cut at U+2028, U+0085 and other
    # separators that JSON allows unescaped inside a string (real abstracts contain them).
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            # json counts within the one line it was given: name the file's line instead.
            raise ValueError(f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    return records


def _find_split_file(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        for suffix in _SUFFIXES:
            path = root / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def _read_splits(task: str, root: Path, names: Mapping[str, Sequence[str]]) -> RawSplits:
    splits: RawSplits = {}
    for split, candidates in names.items():
        path = _find_split_file(root, candidates)
        if path is None:
            continue
        try:
            splits[split] = _read_records(path)
        except (OSError, ValueError) as exc:  # pyarrow's and json's errors are ValueErrors
            raise TaskLoadError(f"task {task}: cannot read {str(path)!r}: {_one_line(exc)}") from None
    return splits


def _check_prepared(task: str, folder: str, splits: RawSplits) -> None:
    """A prepared folder is all-or-nothing: every split prepared, all three present, gold 0/1."""
    if not any(is_prepared(r) for recs in splits.values() for r in recs):
        return
    for split, recs in splits.items():
        for i, rec in enumerate(recs):
            if not is_prepared(rec):
                raise TaskLoadError(
                    f"task {task}: local source {folder!r} mixes prepared and raw records ({split} record {i} "
                    f"lacks {', '.join(f for f in PREPARED_FIELDS if f not in rec)}); re-create it with `raysweep tasks prepare {task} --out DIR`"
                )
            if rec["gold"] not in (0, 1) or isinstance(rec["gold"], bool):
                raise TaskLoadError(
                    f"task {task}: local source {folder!r} {split} record {i} has gold {rec['gold']!r}; a prepared record's gold must be 0 or 1"
                )
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise TaskLoadError(
            f"task {task}: prepared local source {folder!r} has no {'/'.join(missing)} split "
            f"(expected {missing[0]}.parquet); re-create it with `raysweep tasks prepare {task} --out DIR`"
        )


def load_local_folder(
    task: str,
    folder: str,
    split_names: Mapping[str, Sequence[str]] | None = None,
    required: Sequence[str] = ("train",),
) -> tuple[RawSplits, str]:
    """Records from `folder/<split>.{parquet,jsonl,json}`.

    `split_names` maps each split to the file names to look for, best first (default: the
    common names, validation also as `dev`); only those splits are read, so an unlabelled
    test file next to them is ignored. Every split in `required` must be there.
    """
    root = Path(folder)
    if not root.is_dir():
        raise TaskLoadError(f"task {task}: local source {folder!r} is not a directory; {how_to_provide(task)}")
    names = split_names if split_names is not None else _SPLIT_ALIASES
    splits = _read_splits(task, root, names)
    if splits and all(is_prepared(r) for recs in splits.values() for r in recs[:1]):
        # A prepared folder always has all three splits, whatever the raw dataset called them.
        rest = {s: a for s, a in _SPLIT_ALIASES.items() if s not in splits}
        splits.update(_read_splits(task, root, rest))
    _check_prepared(task, folder, splits)
    prepared = bool(splits) and all(is_prepared(r) for recs in splits.values() for r in recs)
    for split in required if not prepared else ():
        if split not in splits:
            looked = ", ".join(names.get(split, [split]))
            raise TaskLoadError(
                f"task {task}: local source {folder!r} has no {split} split (looked for {looked} as .parquet/.jsonl/.json)"
            )
    for split, recs in splits.items():
        if not recs:
            raise TaskLoadError(f"task {task}: local source {folder!r} has an empty {split} split")
    return splits, f"local:{root}"


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rows(dataset) -> list[dict]:
    return dataset.to_list() if hasattr(dataset, "to_list") else [dict(r) for r in dataset]


def _hub_load(path: str, config: str | None):
    # Imported late: `datasets` is slow to import and only needed when the hub is used.
    import datasets

    return datasets.load_dataset(path, config)


@dataclass(frozen=True)
class HubSource:
    """A task's dataset on the Hugging Face hub.

    `paths` are tried in order: the current name first, then older names from before the
    hub's renames. `splits` maps our split to the hub's split name, only for labelled
    splits that lm-eval uses (test only where it scores a labelled test split).
    """

    paths: tuple[str, ...]
    config: str | None = None
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation"})

    def local_names(self) -> dict[str, list[str]]:
        """File names a local folder may use for each split: the hub's name, then the usual ones."""
        out: dict[str, list[str]] = {}
        for split, hub_name in self.splits.items():
            out[split] = list(dict.fromkeys([hub_name, *_SPLIT_ALIASES[split]]))
        return out


# Replaced in tests, to exercise the hub path without a network.
hub_loader: Callable[[str, str | None], Mapping] = _hub_load


def load_from_hub(task: str, hub: HubSource) -> tuple[RawSplits, str]:
    """First of `hub.paths` that loads with every needed split; `datasets` itself handles
    the local cache and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE."""
    failures: list[str] = []
    for path in hub.paths:
        label = f"hub:{path}" + (f"/{hub.config}" if hub.config else "")
        try:
            dsd = hub_loader(path, hub.config)
        except Exception as exc:  # noqa: BLE001 - any failure means "try the next source"
            failures.append(f"{label} ({type(exc).__name__}: {_one_line(exc, 100)})")
            continue
        missing = [name for name in hub.splits.values() if name not in dsd]
        if missing:
            failures.append(f"{label} (no split {'/'.join(missing)})")
            continue
        return {split: _rows(dsd[name]) for split, name in hub.splits.items()}, label
    tried = "; ".join(failures) if failures else "no hub dataset"
    raise TaskLoadError(f"task {task}: could not load from {tried}; {how_to_provide(task)}")


def data_root_sources(tasks: Sequence[str], root: str | os.PathLike, explicit: Mapping[str, str]) -> dict[str, str]:
    """task -> local folder: `explicit` entries as given, then every other task that has a
    folder `root/<task>`; tasks with neither keep their default source (the hub).

    The root is made absolute: trials may run with another working directory, on another node.
    Symbolic links stay as given: the path the user named is the one every node must see.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise BadInput(f"--data-root: {str(root)!r} is not a directory")
    base = Path(os.path.abspath(base))
    found = {name: str(base / name) for name in tasks if (base / name).is_dir()}
    if not found:
        raise BadInput(f"--data-root: {str(root)!r} holds no folder named after any of the tasks {', '.join(tasks)}")
    return {name: explicit.get(name, found.get(name)) for name in tasks if name in explicit or name in found}


def apply_data_root(spec: SweepSpec, root: str | os.PathLike) -> SweepSpec:
    """`spec` with its tasks' folders under `root` added to `data.sources` (entries the spec
    names itself win). Trial ids do not change: where the data lives is not part of them."""
    sources = data_root_sources(spec.tasks, root, spec.data.sources)
    return spec.model_copy(update={"data": spec.data.model_copy(update={"sources": sources})})
