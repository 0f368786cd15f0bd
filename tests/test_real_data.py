"""Every real task folder (real_data_helpers.py says where they live) through the project's own
preparation, in both roles a sweep gives a task; the JSON-lines reader on real abstracts; and
`--data-root` from source resolution to the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from real_data_helpers import jsonl_records, require_shared_tasks, split_files, task_folders
from typer.testing import CliRunner

from raysweep.cli import app
from raysweep.errors import BadInput, TaskLoadError
from raysweep.spec import parse_spec
from raysweep.tasks import get_task, prepare_task, registered_tasks
from raysweep.tasks.prepare import prepare_sweep_tasks
from raysweep.tasks.sources import _read_records, apply_data_root, data_root_sources

FOLDERS = task_folders() or [None]


def spec_for(tasks, forget, **data) -> str:
    return (
        "name: realdata\nmodels:\n  - name: tiny\n    arch: gpt2\n"
        f"tasks: [{', '.join(tasks)}]\nforget_tasks: [{', '.join(forget)}]\n"
        + (f"data: {json.dumps(data)}\n" if data else "")
    )


def expected_raw(task: str, folder: Path) -> dict[str, int]:
    """Records per split of the folder, counted independently of raysweep's reader, for the
    splits the task reads (the first file name that exists for each)."""
    files = split_files(folder)
    out = {}
    for split, names in get_task(task).hub.local_names().items():
        found = next((files[n] for n in names if n in files), None)
        if found is not None:
            out[split] = len(jsonl_records(found))
    return out


def check_examples(prepared) -> None:
    for split, examples in prepared.splits.items():
        for e in examples:
            assert isinstance(e.prompt, str) and e.prompt, (split, e.idx)
            assert len(e.choices) == 2 and e.choices[0] != e.choices[1] and e.gold in (0, 1)


def test_every_folder_is_a_registered_task():
    root = require_shared_tasks()
    names = task_folders()
    assert names, f"no task folders under {root}"
    unknown = [n for n in names if n not in registered_tasks()]
    assert not unknown, f"folders that no task reads: {unknown}"


@pytest.mark.parametrize("task", FOLDERS)
def test_folder_prepares_as_forget_task_or_names_the_missing_train_split(task):
    root = require_shared_tasks()
    folder = root / task
    spec = apply_data_root(parse_spec(spec_for([task], [task]), origin="t.yaml"), root)
    assert spec.data.sources == {task: str(folder)}
    raw = expected_raw(task, folder)
    if "train" not in raw:
        with pytest.raises(BadInput) as err:
            prepare_sweep_tasks(spec)
        assert str(err.value) == (
            f"data.sources.{task}: source local:{folder} has no labelled train split, which a forget task needs "
            "(it can still be an evaluation task)"
        )
        return
    prepared = prepare_sweep_tasks(spec)[task]
    counts = prepared.report.counts
    # every record of every split the task reads came through the reader (none split or lost)
    read = {"train": counts["train"].raw}
    if "test" in raw:
        read["test"] = counts["test"].raw
        if "validation" in raw:
            read["validation"] = counts["validation"].raw
    else:
        read["validation"] = counts["test"].raw  # no labelled test: validation became test
    assert read == raw
    assert prepared.report.source == f"local:{folder}"
    assert all(prepared.split(s) for s in ("train", "validation", "test"))
    check_examples(prepared)


@pytest.mark.parametrize("task", FOLDERS)
def test_folder_prepares_as_evaluation_task(task):
    root = require_shared_tasks()
    folder = root / task
    spec = apply_data_root(parse_spec(spec_for([task, "compare"], ["compare"]), origin="t.yaml"), root)
    prepared = prepare_sweep_tasks(spec)[task]
    raw = expected_raw(task, folder)
    scored = "test" if "test" in raw else "validation"
    assert prepared.report.counts["test"].raw == raw[scored]
    assert prepared.split("test")
    check_examples(prepared)
    if "train" not in raw:
        # nothing to train on, nothing to carve a validation split from: scored on test alone
        assert prepared.split("train") == [] and prepared.split("validation") == []
        assert prepared.report.counts["test"].final == min(1000, prepared.report.counts["test"].after_split_fallback)
    else:
        # a task's examples do not depend on its role in the sweep
        as_forget = prepare_task(task, seed=1234, cap=1000, max_chars=2048, source=str(folder))
        assert prepared.splits == as_forget.splits


def test_eval_only_task_without_train_refused_as_forget_task_by_prepare_task(tmp_path):
    folder = tmp_path / "wic"
    folder.mkdir()
    rec = {
        "word": "class",
        "sentence1": "An emerging professional class.",
        "sentence2": "It showed real class.",
        "start1": 25,
        "end1": 30,
        "start2": 16,
        "end2": 21,
        "idx": 0,
        "label": 0,
    }
    lines = [json.dumps(rec | {"idx": i, "label": i % 2}) + "\n" for i in range(6)]
    (folder / "validation.jsonl").write_text("".join(lines))
    with pytest.raises(BadInput, match=r"^task wic: source local:\S+ has no labelled train split, which a forget task"):
        prepare_task("wic", seed=0, cap=10, max_chars=2048, source=str(folder))
    prepared = prepare_task("wic", seed=0, cap=10, max_chars=2048, source=str(folder), need_train=False)
    assert [len(prepared.split(s)) for s in ("train", "validation", "test")] == [0, 0, 6]
    assert prepared.report.split_fallback


# -- PubMedQA: the JSON-lines reader on real abstracts ----------------------------------------


def test_json_lines_reader_splits_on_newline_only(tmp_path):
    # JSON allows these unescaped inside strings; str.splitlines() would cut the record there
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "g\x1cH\x1dI\x1eJ", "k\x0bl\x0cm"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"t": t}, ensure_ascii=False) + "\n" for t in texts) + "\r\n", encoding="utf-8")
    assert [r["t"] for r in _read_records(path)] == texts


def test_pubmedqa_folder_loads_with_its_bigbio_fields():
    root = require_shared_tasks()
    folder = root / "pubmedqa"
    if not folder.is_dir():
        pytest.skip(f"no pubmedqa folder under {root}")
    text = (folder / "train.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) > len(text.rstrip("\n").split("\n"))  # the separators the fix is about are there
    raw, desc = get_task("pubmedqa").load_records(str(folder), seed=0)
    assert desc == f"local:{folder}"
    assert {s: len(r) for s, r in raw.items()} == {"train": 500, "test": 500}
    prepared = prepare_task("pubmedqa", seed=1234, cap=1000, max_chars=100_000, source=str(folder))
    # test is the official 500; validation is carved from train, never from test
    assert prepared.report.split_fallback and len(prepared.split("test")) == 500
    assert len(prepared.split("train")) + len(prepared.split("validation")) == 500
    first = raw["test"][0]
    ex = next(e for e in prepared.split("test") if e.prompt.endswith(f"\nQuestion: {first['QUESTION']}\nAnswer:"))
    assert ex.prompt == "Abstract: " + "\n".join(first["CONTEXTS"]) + f"\nQuestion: {first['QUESTION']}\nAnswer:"
    assert ex.choices[ex.gold] == first["final_decision"]


# -- --data-root: source resolution ----------------------------------------------------------


def make_root(tmp_path: Path, tasks=("cola", "wic")) -> Path:
    root = tmp_path / "data"
    for t in tasks:
        (root / t).mkdir(parents=True)
    (root / "not_a_task.txt").write_text("x")
    return root


def test_data_root_sources_explicit_entries_win_and_missing_folders_keep_the_default(tmp_path):
    root = make_root(tmp_path)
    got = data_root_sources(["cola", "wic", "rte", "compare"], root, {"wic": "/elsewhere/wic"})
    assert got == {"cola": str((root / "cola").resolve()), "wic": "/elsewhere/wic"}


def test_data_root_is_made_absolute(tmp_path, monkeypatch):
    root = make_root(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert data_root_sources(["cola"], Path("data"), {}) == {"cola": str(root.resolve() / "cola")}


def test_data_root_missing_or_holding_no_task_is_bad_input(tmp_path):
    with pytest.raises(BadInput) as err:
        data_root_sources(["cola"], tmp_path / "missing", {})
    assert str(err.value) == f"--data-root: {str(tmp_path / 'missing')!r} is not a directory"
    (tmp_path / "empty").mkdir()
    no_task = r"^--data-root: '.*empty' holds no folder named after any of the tasks cola, rte$"
    with pytest.raises(BadInput, match=no_task):
        data_root_sources(["cola", "rte"], tmp_path / "empty", {})


def test_apply_data_root_changes_sources_not_trial_ids(tmp_path):
    text = spec_for(["cola", "wic", "compare"], ["cola", "compare"])
    spec = parse_spec(text, origin="t.yaml")
    a = apply_data_root(spec, make_root(tmp_path / "a"))
    b = apply_data_root(spec, make_root(tmp_path / "b", tasks=("cola",)))
    in_a = tmp_path / "a" / "data"
    assert a.data.sources == {"cola": str(in_a / "cola"), "wic": str(in_a / "wic")}
    assert b.data.sources == {"cola": str(tmp_path / "b" / "data" / "cola")}
    assert spec.data.sources == {}  # the original is untouched
    # Trial ids hash the prepared examples, not the folder: the same files under two roots.
    real, copy = require_shared_tasks(), tmp_path / "copy"
    for task in ("cola", "wic"):
        shutil.copytree(real / task, copy / task)
    ids = [p.trial_id for p in apply_data_root(spec, real).trials()]
    assert [p.trial_id for p in apply_data_root(spec, copy).trials()] == ids


# -- --data-root through the CLI ----------------------------------------------------------------


def one_line_error(result) -> str:
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_cli_run_dry_run_with_data_root(tmp_path):
    root = require_shared_tasks()
    spec = tmp_path / "s.yaml"
    # A dry run prepares the data (trial ids hash it): the spec's own folder must be real.
    mine = tmp_path / "mine" / "cola"
    shutil.copytree(root / "cola", mine)
    spec.write_text(spec_for(["cola", "wic", "compare"], ["cola"]) + f"data: {{sources: {{cola: {mine}}}}}\n")
    args = ["run", str(spec), "--dry-run", "--data-root", str(root), "--store", str(tmp_path / "st")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"data: cola <- {mine}" in result.output and f"data: wic <- {root / 'wic'}" in result.output
    assert "compare <-" not in result.output
    assert not (tmp_path / "st").exists()


def test_cli_missing_data_root_is_exit_2_and_writes_nothing(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_for(["cola"], ["cola"]))
    missing = tmp_path / "nope"
    commands = (
        ["run", str(spec), "--store", str(tmp_path / "st")],
        ["tasks", "prepare", "cola", "--out", str(tmp_path / "out")],
    )
    for args in commands:
        result = CliRunner().invoke(app, [*args, "--data-root", str(missing)])
        assert result.exit_code == 2
        assert one_line_error(result) == f"error: --data-root: {str(missing)!r} is not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_cli_tasks_prepare_reads_the_data_root(tmp_path):
    root = require_shared_tasks()
    for needed in ("cola", "pubmedqa"):
        if not (root / needed).is_dir():
            pytest.skip(f"no {needed} folder under {root}")
    out = tmp_path / "out"
    args = ["tasks", "prepare", "cola", "pubmedqa", "--cap", "20", "--out", str(out), "--data-root", str(root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'cola'}" in result.output
    for task in ("cola", "pubmedqa"):
        report = json.loads((out / task / "report.json").read_text())
        assert report["source"] == f"local:{root / task}"
        assert pq.read_table(out / task / "test.parquet").num_rows == 20
        direct = prepare_task(task, seed=1234, cap=20, max_chars=2048, source=str(root / task))
        assert prepare_task(task, seed=1234, cap=20, max_chars=2048, source=str(out / task)).splits == direct.splits


def test_cli_tasks_prepare_without_train_split_names_it_and_writes_nothing(tmp_path):
    root = require_shared_tasks()
    no_train = [t for t in task_folders() if not (root / t / "train.jsonl").exists()]
    if not no_train:
        pytest.skip(f"every folder under {root} has a train split")
    out = tmp_path / "out"
    args = ["tasks", "prepare", "cola", no_train[0], "--out", str(out), "--data-root", str(root)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    msg = one_line_error(result)
    assert msg.startswith(f"error: task {no_train[0]}: source local:{root / no_train[0]} has no labelled train split")
    assert not out.exists()  # cola, prepared first, was not written either


def test_copied_folder_prepares_identically(tmp_path):
    # moving the data elsewhere changes neither the examples nor (see above) the trial ids
    root = require_shared_tasks()
    if not (root / "cb").is_dir():
        pytest.skip(f"no cb folder under {root}")
    shutil.copytree(root / "cb", tmp_path / "cb")
    here = prepare_task("cb", seed=1234, cap=1000, max_chars=2048, source=str(root / "cb"))
    there = prepare_task("cb", seed=1234, cap=1000, max_chars=2048, source=str(tmp_path / "cb"))
    assert here.splits == there.splits


def test_unreadable_folder_error_names_the_spec_field(tmp_path):
    (tmp_path / "cola").mkdir()
    (tmp_path / "cola" / "train.jsonl").write_text('{"sentence": "x", "label": 1}\n{"sentence": \n')
    (tmp_path / "cola" / "validation.jsonl").write_text('{"sentence": "y", "label": 0}\n')
    spec = apply_data_root(parse_spec(spec_for(["cola"], ["cola"]), origin="t.yaml"), tmp_path)
    with pytest.raises(TaskLoadError, match=r"^data\.sources\.cola: cannot read '.*train\.jsonl': "):
        prepare_sweep_tasks(spec)


def test_data_root_through_a_symbolic_link_keeps_the_path_given(tmp_path):
    """The trials must read the path the user named (the one every node mounts), not where
    a link on the driver's machine happens to point."""
    link = tmp_path / "tasks-link"
    link.symlink_to(require_shared_tasks(), target_is_directory=True)
    got = data_root_sources(["cola"], link, {})
    assert got == {"cola": str(link / "cola")}
