"""The task abstraction: a task is a data source + a prompt + choices + a gold index.

A task is declared once (a `Task` subclass registered by name, in the spirit of lm-eval's
task registry). `prepare_task` turns its raw records into the binary-choice splits every
trial of a sweep shares, counting what each preparation step kept.
"""

from __future__ import annotations

import hashlib
import operator
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

import pyarrow as pa

from raysweep.constants import SPLITS
from raysweep.errors import BadInput, TaskLoadError
from raysweep.registry import Registry

RawSplits = dict[str, list[dict]]

# A record already rendered and binarised (what `raysweep tasks prepare` writes): any task
# reads it back unchanged, so a prepared folder works as a source for every task.
PREPARED_FIELDS = ("prompt", "choice_0", "choice_1", "gold")


def is_prepared(record: dict) -> bool:
    return all(f in record for f in PREPARED_FIELDS)


@dataclass(frozen=True)
class Example:
    """One binarised example, as every stage after preparation sees it."""

    idx: int  # position in its prepared split; the store's `example_idx`
    uid: str  # content hash: stable across runs, independent of order
    prompt: str
    choices: tuple[str, str]
    gold: int  # 0 or 1
    delimiter: str = " "

    @property
    def continuations(self) -> tuple[str, str]:
        return (self.delimiter + self.choices[0], self.delimiter + self.choices[1])

    @property
    def distractor(self) -> int:
        return 1 - self.gold


@dataclass
class StepCounts:
    """How many examples of one split survived each preparation step (the per-task report)."""

    raw: int = 0
    rendered: int = 0
    binarised: int = 0
    after_length_filter: int = 0
    after_decontamination: int = 0
    after_split_fallback: int = 0
    final: int = 0


@dataclass
class PrepReport:
    task: str
    source: str
    split_fallback: bool = False
    counts: dict[str, StepCounts] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [
            {"task": self.task, "source": self.source, "split": split, "split_fallback": self.split_fallback, **vars(c)}
            for split, c in self.counts.items()
        ]


@dataclass
class PreparedTask:
    name: str
    splits: dict[str, list[Example]]
    report: PrepReport

    def split(self, name: str) -> list[Example]:
        return self.splits[name]


# A prepared task's examples as a table: the store's `examples` table and every split file of
# a prepared folder (`raysweep tasks prepare`) are written with it and read back through
# `examples_from_table`.
EXAMPLES_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("split", pa.string()),
        ("example_idx", pa.int32()),
        ("uid", pa.string()),
        ("prompt", pa.string()),
        ("choice_0", pa.string()),
        ("choice_1", pa.string()),
        ("gold", pa.int8()),
    ]
)


def examples_table(task: str, splits: Mapping[str, Sequence[Example]]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in EXAMPLES_SCHEMA}
    for split, examples in splits.items():
        for ex in examples:
            for name, value in (
                ("task", task),
                ("split", split),
                ("example_idx", ex.idx),
                ("uid", ex.uid),
                ("prompt", ex.prompt),
                ("choice_0", ex.choices[0]),
                ("choice_1", ex.choices[1]),
                ("gold", ex.gold),
            ):
                cols[name].append(value)
    return pa.table(cols, schema=EXAMPLES_SCHEMA)


def examples_from_table(table: pa.Table, delimiter: str) -> dict[str, list[Example]]:
    """Split -> examples in `example_idx` order, from a table `examples_table` wrote."""
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for r in sorted(table.to_pylist(), key=lambda r: (r["split"], r["example_idx"])):
        ex = Example(
            idx=r["example_idx"],
            uid=r["uid"],
            prompt=r["prompt"],
            choices=(r["choice_0"], r["choice_1"]),
            gold=r["gold"],
            delimiter=delimiter,
        )
        splits.setdefault(r["split"], []).append(ex)
    return splits


class Task(ABC):
    """Subclass, set `name`, implement `render` and `load_records`, decorate with @register."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    kind: ClassVar[str] = "hub"  # "builtin" tasks generate their own data; no source needed
    delimiter: ClassVar[str] = " "

    @abstractmethod
    def render(self, record: dict) -> tuple[str, list[str], int]:
        """lm-eval's 0-shot context, the full choice list (before binarisation), gold index."""

    @abstractmethod
    def load_records(self, source: str | None, seed: int) -> tuple[RawSplits, str]:
        """Raw records per split ('train', 'validation', and 'test' when it is labelled),
        and a description of the source they came from."""

    def question_key(self, record: dict, prompt: str) -> str:
        """What decontamination compares between evaluation and train examples."""
        return prompt


TASKS: Registry[Task] = Registry("task", field="task", hint="see `raysweep tasks list`")


def register(cls: type[Task]) -> type[Task]:
    TASKS.add(cls.name, cls())
    return cls


def registered_tasks() -> dict[str, Task]:
    return dict(TASKS.items())


def get_task(name: str) -> Task:
    return TASKS.get(name)


def derived_seed(*parts: object, sep: str = ":", nbytes: int = 4) -> int:
    """A seed that depends only on `parts`: every random draw of data preparation and of a
    trial (labels, batch order, torch) comes from one, so a resumed or repeated run draws the
    same. The separator and width are part of the value: data preparation uses ("\x1f", 8),
    trials (":", 4), as they always have."""
    return int.from_bytes(hashlib.sha256(sep.join(map(str, parts)).encode()).digest()[:nbytes], "little")


def _seeded_rng(*parts: object) -> random.Random:
    return random.Random(derived_seed(*parts, sep="\x1f", nbytes=8))


def _uid(task: str, prompt: str, choices: tuple[str, str]) -> str:
    return hashlib.sha1(f"{task}\x1f{prompt}\x1f{choices[0]}\x1f{choices[1]}".encode()).hexdigest()[:16]


def _label_index(value: object, where: str) -> int:
    """A record's gold label as a choice index. int() would read "1" as 1 and 0.5 as 0 without
    a word; a label of either kind means the wrong file or column, so it is refused instead."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TaskLoadError(f"{where} has label {value!r}; a label must be an integer choice index") from None


def binarise(
    task: str, split: str, i: int, choices: list[str], gold: int, seed: int
) -> tuple[tuple[str, str], int] | None:
    """Keep gold and one distractor drawn by a seeded draw, in their original relative order.
    A choice with the gold answer's very text is no distractor (MathQA and SciQ have some):
    both would score the same. None when no real distractor is left: the example is dropped."""
    if not 0 <= gold < len(choices):
        raise BadInput(f"task {task}: gold index {gold} outside {len(choices)} choices in {split} record {i}")
    others = [j for j in range(len(choices)) if j != gold and choices[j] != choices[gold]]
    if not others:
        return None
    if len(choices) == 2:
        return (choices[0], choices[1]), gold
    d = _seeded_rng(seed, task, split, i, "distractor").choice(others)
    lo, hi = sorted((gold, d))
    return (choices[lo], choices[hi]), 0 if gold == lo else 1


@dataclass
class _Rendered:
    prompt: str
    choices: tuple[str, str]
    gold: int
    key: str


def _carve_validation(train: list, n_eval: int, seed: int, name: str) -> tuple[list, list]:
    order = list(range(len(train)))
    _seeded_rng(seed, name, "fallback").shuffle(order)
    val_idx = set(order[: min(n_eval, len(train) // 5)])
    return [r for i, r in enumerate(train) if i not in val_idx], [train[i] for i in sorted(val_idx)]


def prepare_task(
    name: str, *, seed: int, cap: int, max_chars: int, source: str | None = None, need_train: bool = True
) -> PreparedTask:
    """render -> binarise -> length filter -> decontaminate -> split fallback -> cap.

    A task that is only evaluated (`need_train=False`) may lack a train split: it is then
    scored on its test split alone (train and validation stay empty). Whether a train split
    exists does not depend on the role, so a task's examples are the same in either role.
    """
    task = get_task(name)
    raw, source_desc = task.load_records(source, seed)
    if not raw.get("train"):
        if need_train:
            raise BadInput(
                f"task {name}: source {source_desc} has no labelled train split, which a forget task needs "
                "(it can still be an evaluation task)"
            )
        raw = {**raw, "train": []}
    if "validation" not in raw and "test" not in raw:
        raise BadInput(f"task {name}: source {source_desc} has neither a validation nor a test split")
    report = PrepReport(task=name, source=source_desc)
    prepared_source = all(is_prepared(r) for records in raw.values() for r in records)
    counts = {s: StepCounts(raw=len(raw.get(s, []))) for s in SPLITS if s in raw}

    rendered: dict[str, list[_Rendered]] = {}
    for split, records in raw.items():
        if split not in counts:
            continue
        out: list[_Rendered] = []
        for i, rec in enumerate(records):
            if is_prepared(rec):
                # Decontaminated when it was prepared; the full pair as key drops nothing more.
                pair = (str(rec["choice_0"]), str(rec["choice_1"]))
                prompt = str(rec["prompt"])
                gold = _label_index(rec["gold"], f"task {name}: {source_desc} {split} record {i}")
                out.append(_Rendered(prompt, pair, gold, "\x1f".join((prompt, *pair))))
                continue
            prompt, choices, gold = task.render(rec)
            gold = _label_index(gold, f"task {name}: {source_desc} {split} record {i}")
            binary = binarise(name, split, i, list(choices), gold, seed)
            out.append(
                None if binary is None else _Rendered(prompt, binary[0], binary[1], task.question_key(rec, prompt))
            )
        counts[split].rendered = len(out)
        out = [r for r in out if r is not None]
        counts[split].binarised = len(out)
        # lm-eval's context + target delimiter + choice is what the model reads.
        out = [r for r in out if max(len(r.prompt) + len(task.delimiter) + len(c) for c in r.choices) <= max_chars]
        counts[split].after_length_filter = len(out)
        rendered[split] = out

    train_keys = {r.key for r in rendered["train"]}
    for split in ("validation", "test"):
        if split in rendered:
            rendered[split] = [r for r in rendered[split] if r.key not in train_keys]
    for split, c in counts.items():
        c.after_decontamination = len(rendered[split])

    if "test" not in rendered:
        # No labelled test: validation becomes test, and a seeded slice of train validates.
        rendered["test"] = rendered.pop("validation")
        counts["test"] = counts.pop("validation")
    if "validation" not in rendered:
        report.split_fallback = True
        rendered["train"], rendered["validation"] = _carve_validation(
            rendered["train"], len(rendered["test"]), seed, name
        )
        # Train may hold the same question twice: the carved validation must not share one
        # with what stays in train, or early stopping would select on memorised answers.
        kept = {r.key for r in rendered["train"]}
        rendered["validation"] = [r for r in rendered["validation"] if r.key not in kept]
        counts["validation"] = StepCounts()
    for split in SPLITS:
        counts[split].after_split_fallback = len(rendered[split])

    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        items = rendered[split]
        order = list(range(len(items)))
        # Seeded permutation, then a prefix: a smaller cap (or trial size) is a subset of a larger.
        # A prepared source is stored in that permuted order already; keeping it makes a prepared
        # folder give the same examples, in the same order, as preparing from the raw data.
        if not prepared_source:
            _seeded_rng(seed, name, split, "cap").shuffle(order)
        chosen = [items[i] for i in order[:cap]]
        splits[split] = [
            Example(
                idx=j,
                uid=_uid(name, r.prompt, r.choices),
                prompt=r.prompt,
                choices=r.choices,
                gold=r.gold,
                delimiter=task.delimiter,
            )
            for j, r in enumerate(chosen)
        ]
        counts[split].final = len(chosen)
        if not chosen and (split == "test" or counts["train"].raw):
            raise BadInput(f"task {name}: split {split!r} is empty after preparation (source {source_desc})")
    report.counts = {s: counts[s] for s in SPLITS}
    return PreparedTask(name=name, splits=splits, report=report)
