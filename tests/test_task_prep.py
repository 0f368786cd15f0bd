"""`prepare_task`'s steps one at a time (on a stub task whose records the test controls),
the one-line errors for bad local sources, and the `prepare_to_folder` round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysweep.errors import BadInput, TaskLoadError
from raysweep.registry import Registry
from raysweep.tasks import base, get_task, prepare_task
from raysweep.tasks.base import EXAMPLES_SCHEMA, RawSplits, Task, binarise, examples_from_table
from raysweep.tasks.prepare import REPORT_FILE, prepare_to_folder

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
STUB = "stub_prep_task"


class StubTask(Task):
    """Records {"q", "choices", "gold"}; the prompt is the question."""

    name: ClassVar[str] = STUB
    description: ClassVar[str] = "test stub"

    def __init__(self, raw: RawSplits):
        self.raw = raw

    def render(self, record):
        return record["q"], list(record["choices"]), record["gold"]

    def load_records(self, source, seed):
        return {s: list(r) for s, r in self.raw.items()}, "stub"


@pytest.fixture
def stub(monkeypatch):
    """Register a stub task for one test only (the registry is global)."""

    def install(raw: RawSplits) -> str:
        scratch = Registry("task", field="task")
        for name, task in base.TASKS.items():
            scratch.add(name, task)
        scratch.add(STUB, StubTask(raw))
        monkeypatch.setattr(base, "TASKS", scratch)
        return STUB

    return install


def rec(q: str, choices=("no", "yes"), gold: int = 1) -> dict:
    return {"q": q, "choices": list(choices), "gold": gold}


def many(prefix: str, n: int, **kw) -> list[dict]:
    return [rec(f"{prefix} {i}?", **kw) for i in range(n)]


def prep(name: str, seed: int = 0, cap: int = 1000, max_chars: int = 2048, source=None):
    return prepare_task(name, seed=seed, cap=cap, max_chars=max_chars, source=source)


# -- binarisation ----------------------------------------------------------------------


def test_binarise_keeps_gold_and_one_other_choice_in_order():
    choices = ["a", "b", "c", "d", "e"]
    for gold in range(5):
        for i in range(30):
            pair, g = binarise("t", "train", i, choices, gold, seed=7)
            assert pair[g] == choices[gold]
            other = pair[1 - g]
            assert other in choices and other != choices[gold]
            assert choices.index(pair[0]) < choices.index(pair[1])  # original relative order


def test_binarise_is_seeded():
    choices = ["a", "b", "c", "d"]
    draw = lambda seed: [binarise("t", "train", i, choices, 0, seed) for i in range(40)]  # noqa: E731
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert len({p for p, _ in draw(1)}) == 3  # every distractor gets drawn


def test_binary_choices_pass_through_and_bad_gold_is_refused():
    assert binarise("t", "train", 0, ["x", "y"], 1, seed=0) == (("x", "y"), 1)
    with pytest.raises(BadInput, match="gold index 3 outside 3 choices"):
        binarise("t", "train", 0, ["x", "y", "z"], 3, seed=0)


def test_prepare_binarises_every_split(stub):
    name = stub(
        {
            "train": many("t", 10, choices=("a", "b", "c", "d"), gold=2),
            "validation": many("v", 5, choices=("a", "b", "c"), gold=0),
        }
    )
    prepared = prep(name)
    for split in ("train", "validation", "test"):
        for e in prepared.split(split):
            assert len(e.choices) == 2
    assert all(e.choices[e.gold] == "c" for e in prepared.split("train") + prepared.split("validation"))
    assert all(e.choices[e.gold] == "a" for e in prepared.split("test"))
    again = prep(name)
    assert again.splits == prepared.splits


# -- length filter -----------------------------------------------------------------------


def test_length_filter_at_2048_characters(stub):
    # what is measured is prompt + delimiter + choice, as the model reads it
    fits = rec("p" * 2046, choices=("a", "b"), gold=0)  # 2046 + 1 + 1 = 2048
    too_long = rec("q" * 2047, choices=("a", "b"), gold=0)  # 2049
    long_choice = rec("short?", choices=("a", "z" * 2048), gold=0)  # the longer choice counts
    name = stub(
        {
            "train": [fits, too_long, long_choice] + many("t", 10),
            "validation": [fits | {"q": "r" * 2046}, too_long | {"q": "s" * 2047}],
        }
    )
    prepared = prep(name, max_chars=2048)
    c = prepared.report.counts
    assert (c["train"].binarised, c["train"].after_length_filter) == (13, 11)
    assert (c["test"].binarised, c["test"].after_length_filter) == (2, 1)
    prompts = {e.prompt for s in prepared.splits.values() for e in s}
    assert "p" * 2046 in prompts and "r" * 2046 in prompts
    assert not any(p.startswith(("q", "s")) for p in prompts) and "short?" not in prompts


# -- decontamination -----------------------------------------------------------------------


def test_decontamination_drops_eval_examples_whose_prompt_is_in_train(stub):
    train = many("shared", 3) + many("train only", 10)
    val = many("shared", 2, gold=0) + many("val only", 4)  # same prompts, other label: still dropped
    test = many("shared", 1) + many("test only", 3)
    name = stub({"train": train, "validation": val, "test": test})
    prepared = prep(name)
    c = prepared.report.counts
    assert (c["validation"].after_length_filter, c["validation"].after_decontamination) == (6, 4)
    assert (c["test"].after_length_filter, c["test"].after_decontamination) == (4, 3)
    assert c["train"].after_decontamination == 13  # train itself is never decontaminated
    assert not any(e.prompt.startswith("shared") for s in ("validation", "test") for e in prepared.split(s))


# -- split fallback ------------------------------------------------------------------------


def test_split_fallback_without_labelled_test(stub):
    name = stub({"train": many("t", 50), "validation": many("v", 6)})
    prepared = prep(name, seed=4)
    assert prepared.report.split_fallback
    test_prompts = [e.prompt for e in prepared.split("test")]
    assert sorted(test_prompts) == sorted(f"v {i}?" for i in range(6))  # validation became test
    val = {e.prompt for e in prepared.split("validation")}
    train = {e.prompt for e in prepared.split("train")}
    assert len(val) == 6 and val <= {f"t {i}?" for i in range(50)} and not val & train
    assert len(train) == 44
    c = prepared.report.counts
    assert (c["train"].after_split_fallback, c["validation"].after_split_fallback, c["test"].after_split_fallback) == (
        44,
        6,
        6,
    )
    # the carved slice is seeded
    assert {e.prompt for e in prep(name, seed=4).split("validation")} == val
    assert {e.prompt for e in prep(name, seed=5).split("validation")} != val


def test_carved_validation_is_at_most_a_fifth_of_train(stub):
    name = stub({"train": many("t", 20), "validation": many("v", 10)})
    assert len(prep(name).split("validation")) == 4


def test_train_and_test_only_carves_validation(stub):
    name = stub({"train": many("t", 30), "test": many("x", 5)})
    prepared = prep(name)
    assert prepared.report.split_fallback
    assert [len(prepared.split(s)) for s in ("train", "validation", "test")] == [25, 5, 5]


def test_no_fallback_with_labelled_test(stub):
    name = stub({"train": many("t", 10), "validation": many("v", 3), "test": many("x", 4)})
    prepared = prep(name)
    assert not prepared.report.split_fallback
    assert [len(prepared.split(s)) for s in ("train", "validation", "test")] == [10, 3, 4]


# -- seeded cap ------------------------------------------------------------------------------


def test_cap_is_seeded_and_prefix_nested(stub):
    name = stub({"train": many("t", 60), "validation": many("v", 30), "test": many("x", 30)})
    big, small = prep(name, seed=9, cap=25), prep(name, seed=9, cap=10)
    for split in ("train", "validation", "test"):
        assert len(big.split(split)) == 25 and len(small.split(split)) == 10
        assert small.split(split) == big.split(split)[:10]  # idx, uid and content identical
        assert [e.idx for e in big.split(split)] == list(range(25))
        assert big.report.counts[split].final == 25
    assert prep(name, seed=9, cap=25).splits == big.splits
    other = prep(name, seed=10, cap=25)
    assert [e.prompt for e in other.split("train")] != [e.prompt for e in big.split("train")]
    assert big.report.counts["train"].after_split_fallback == 60


def test_uid_depends_on_content_not_position(stub):
    name = stub({"train": many("t", 40), "validation": many("v", 5), "test": many("x", 5)})
    a, b = prep(name, seed=1), prep(name, seed=2)
    uid_a = {e.prompt: e.uid for e in a.split("train")}
    uid_b = {e.prompt: e.uid for e in b.split("train")}
    assert uid_a == uid_b and len(set(uid_a.values())) == 40


# -- errors ----------------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def copy_fixture(task: str, dest: Path, drop: tuple[str, ...] = (), edit=None) -> Path:
    """The task's fixture folder, optionally without some split files or with records edited."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in (FIXTURES / task).glob("*.jsonl"):
        if path.stem in drop:
            continue
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if edit is not None:
            lines = [edit(path.stem, i, r) for i, r in enumerate(lines)]
        (dest / path.name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return dest


def test_unknown_task(tmp_path):
    with pytest.raises(BadInput) as err:
        prep("no_such_task")
    assert one_line(err) == "task: unknown task 'no_such_task' (see `raysweep tasks list`)"
    with pytest.raises(BadInput, match="unknown task 'nope'"):
        prepare_to_folder(["copa", "nope"], tmp_path / "out", seed=0, cap=10, max_chars=2048)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_local_folder_missing_split(tmp_path):
    folder = copy_fixture("rte", tmp_path / "rte", drop=("validation",))
    with pytest.raises(TaskLoadError) as err:
        prep("rte", source=str(folder))
    assert one_line(err) == (
        f"task rte: local source {str(folder)!r} has no validation split "
        "(looked for validation, dev, valid, val as .parquet/.jsonl/.json)"
    )
    folder = copy_fixture("arc_easy", tmp_path / "arc", drop=("test",))
    with pytest.raises(TaskLoadError, match=r"^task arc_easy: .* has no test split"):
        prep("arc_easy", source=str(folder))


def test_local_folder_not_a_directory(tmp_path):
    with pytest.raises(TaskLoadError) as err:
        prep("cola", source=str(tmp_path / "missing"))
    msg = one_line(err)
    assert msg.startswith("task cola: local source") and "raysweep tasks prepare cola --out DIR" in msg


@pytest.mark.parametrize(
    "label, problem",
    [
        (2, "has label 2, outside its 2 choices ['no', 'yes']"),  # not binary
        (-1, "has label -1, outside its 2 choices"),  # an unlabelled split
        ("yes", "cannot be rendered"),  # a string where an index belongs
        (0.5, "cannot be rendered"),
    ],
)
def test_local_folder_bad_labels(tmp_path, label, problem):
    folder = copy_fixture(
        "cola",
        tmp_path / "cola",
        edit=lambda split, i, r: r | {"label": label} if (split, i) == ("validation", 1) else r,
    )
    with pytest.raises(TaskLoadError) as err:
        prep("cola", source=str(folder))
    msg = one_line(err)
    assert msg.startswith(f"task cola: local:{folder} validation record 1 ") and problem in msg


def test_local_folder_wrong_schema(tmp_path):
    folder = copy_fixture(
        "boolq", tmp_path / "boolq", edit=lambda split, i, r: {k: v for k, v in r.items() if k != "passage"}
    )
    with pytest.raises(TaskLoadError) as err:
        prep("boolq", source=str(folder))
    assert one_line(err) == f"task boolq: local:{folder} train record 0 has no field 'passage'; is this boolq's schema?"


def test_unknown_answer_key_is_a_bad_label(tmp_path):
    folder = copy_fixture(
        "arc_easy", tmp_path / "arc", edit=lambda split, i, r: r | {"answerKey": "F"} if split == "test" else r
    )
    with pytest.raises(
        TaskLoadError, match=r"^task arc_easy: local:\S+ test record 0 cannot be rendered: 'F' is not in list$"
    ):
        prep("arc_easy", source=str(folder))


def test_unreadable_split_file(tmp_path):
    folder = copy_fixture("wic", tmp_path / "wic")
    (folder / "train.jsonl").write_text('{"word": "x",\n')
    with pytest.raises(TaskLoadError) as err:
        prep("wic", source=str(folder))
    assert one_line(err).startswith(f"task wic: cannot read {str(folder / 'train.jsonl')!r}:")


def test_creak_reads_json_lines_named_json(tmp_path):
    # CREAK ships data/creak/train.json and dev.json, JSON lines despite the suffix
    folder = tmp_path / "creak"
    folder.mkdir()
    for path in (FIXTURES / "creak").glob("*.jsonl"):
        (folder / f"{path.stem}.json").write_text(path.read_text())
    prepared = prep("creak", source=str(folder))
    assert len(prepared.split("test")) == 2


# -- prepare_to_folder round trip ---------------------------------------------------------------


SOURCES = {t: str(FIXTURES / t) for t in ("copa", "arc_easy", "toxigen", "mnli", "wsc")}


def test_prepare_to_folder_round_trip(tmp_path):
    names = list(SOURCES)
    written = prepare_to_folder(names, tmp_path, seed=5, cap=1000, max_chars=2048, sources=SOURCES)
    assert [w.task for w in written] == names
    for w in written:
        assert w.path == tmp_path / w.task
        assert sorted(p.name for p in w.path.iterdir()) == [
            REPORT_FILE,
            "test.parquet",
            "train.parquet",
            "validation.parquet",
        ]
        table = pq.read_table(w.path / "train.parquet")
        # The store's examples schema: a prepared split file reads back as the store's table would.
        assert table.schema.equals(EXAMPLES_SCHEMA) and set(table["split"].to_pylist()) == {"train"}
        assert (
            examples_from_table(table, get_task(w.task).delimiter)["train"]
            == prepare_task(w.task, seed=5, cap=1000, max_chars=2048, source=SOURCES[w.task]).splits["train"]
        )
        report = json.loads((w.path / REPORT_FILE).read_text())
        assert report["task"] == w.task and report["source"] == f"local:{FIXTURES / w.task}"
        assert (report["seed"], report["cap"], report["max_chars"]) == (5, 1000, 2048)
        assert report["counts"]["test"]["final"] == w.report.counts["test"].final

        direct = prepare_task(w.task, seed=5, cap=1000, max_chars=2048, source=SOURCES[w.task])
        reread = prepare_task(w.task, seed=5, cap=1000, max_chars=2048, source=str(w.path))
        assert reread.splits == direct.splits  # same examples, same order, same idx and uid
        assert not reread.report.split_fallback
        assert reread.report.source == f"local:{w.path}"


def test_prepared_folder_nests_smaller_caps_and_ignores_seed(tmp_path):
    [w] = prepare_to_folder(["arc_easy"], tmp_path, seed=5, cap=1000, max_chars=2048, sources=SOURCES)
    direct_small = prepare_task("arc_easy", seed=5, cap=3, max_chars=2048, source=SOURCES["arc_easy"])
    for seed in (5, 6):  # the folder's order was fixed when it was prepared
        reread_small = prepare_task("arc_easy", seed=seed, cap=3, max_chars=2048, source=str(w.path))
        assert reread_small.splits == direct_small.splits


@pytest.mark.parametrize("builtin", ["compare", "capital"])
def test_builtin_tasks_read_prepared_folders(tmp_path, builtin):
    # capital's decontamination key looks at the raw record's choices: prepared records skip it
    [w] = prepare_to_folder([builtin], tmp_path, seed=2, cap=50, max_chars=2048)
    direct = prepare_task(builtin, seed=2, cap=50, max_chars=2048)
    reread = prepare_task(builtin, seed=2, cap=50, max_chars=2048, source=str(w.path))
    assert reread.splits == direct.splits


def test_prepare_to_folder_replaces_an_old_folder(tmp_path):
    prepare_to_folder(["copa"], tmp_path, seed=0, cap=1000, max_chars=2048, sources=SOURCES)
    (tmp_path / "copa" / "stale.txt").write_text("old")
    prepare_to_folder(["copa"], tmp_path, seed=0, cap=2, max_chars=2048, sources=SOURCES)
    assert not (tmp_path / "copa" / "stale.txt").exists()
    assert pq.read_table(tmp_path / "copa" / "train.parquet").num_rows == 2
    assert [p.name for p in tmp_path.iterdir()] == ["copa"]  # no temporary folder left behind


def test_prepared_folder_with_bad_gold_or_missing_split(tmp_path):
    [w] = prepare_to_folder(["copa"], tmp_path, seed=0, cap=1000, max_chars=2048, sources=SOURCES)
    table = pq.read_table(w.path / "validation.parquet").to_pylist()
    table[0]["gold"] = 2
    pq.write_table(pa.Table.from_pylist(table), w.path / "validation.parquet")
    with pytest.raises(TaskLoadError) as err:
        prep("copa", source=str(w.path))
    assert (
        one_line(err)
        == f"task copa: local source {str(w.path)!r} validation record 0 has gold 2; a prepared record's gold must be 0 or 1"
    )
    (w.path / "validation.parquet").unlink()
    with pytest.raises(TaskLoadError) as err:
        prep("copa", source=str(w.path))
    assert one_line(err).startswith(f"task copa: prepared local source {str(w.path)!r} has no validation split")


def test_real_task_render_passes_prepared_records_through():
    record = {"idx": 0, "uid": "u", "prompt": "P", "choice_0": " a", "choice_1": " b", "gold": 1}
    assert get_task("wsc").render(record) == ("P", [" a", " b"], 1)


def test_a_choice_with_the_gold_text_is_never_the_distractor():
    from raysweep.tasks.base import binarise

    for i in range(50):
        pair, g = binarise("t", "train", i, ["4", "4", "5"], 0, seed=3)
        assert pair[g] == "4" and pair[1 - g] == "5"
    assert binarise("t", "train", 0, ["same", "same"], 1, seed=3) is None
