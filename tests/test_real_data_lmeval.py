"""Every record of every real task folder (real_data_helpers.py) rendered by raysweep and by
lm-eval's own task code, built from its installed YAML, fed the very records raysweep read:
prompt, full choice list, gold and the scored request must agree. CREAK, which lm-eval does
not have, is checked against raysweep's documented template."""

from __future__ import annotations

import pytest
from real_data_helpers import jsonl_records, require_shared_tasks, split_files, task_folders

from raysweep.tasks import get_task

NOT_IN_LM_EVAL = {"creak"}
LM_EVAL_FOLDERS = [t for t in task_folders() if t not in NOT_IN_LM_EVAL] or [None]
_LM_SPLIT_KEYS = ("training_split", "validation_split", "test_split")


@pytest.fixture(scope="module")
def task_manager():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    return TaskManager()


def lm_eval_task(manager, name: str, records: dict[str, list[dict]]):
    """lm-eval's task `name` from its resolved config (`!function` preprocessors included),
    reading `records` (lm-eval split name -> records) instead of the hub. Splits the folder
    lacks are unset, so lm-eval neither loads nor samples from them; nothing else changes."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    cfg = manager._factory._load_full_config(manager.task_index[name])
    for key in _LM_SPLIT_KEYS:
        if cfg.get(key) not in records:
            cfg[key] = None

    class InMemory(ConfigurableTask):
        def download(self, dataset_kwargs=None, **kwargs):
            self.dataset = datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in records.items()})

    return InMemory(config=cfg)


def lm_eval_docs(task, split_name: str):
    """The split's documents as lm-eval evaluates them (after the config's process_docs)."""
    getter = dict(zip(_LM_SPLIT_KEYS, (task.training_docs, task.validation_docs, task.test_docs)))
    [key] = [k for k in _LM_SPLIT_KEYS if getattr(task.config, k) == split_name]
    return getter[key]()


@pytest.mark.parametrize("name", LM_EVAL_FOLDERS)
def test_every_record_renders_as_lm_eval_renders_it(name, task_manager):
    root = require_shared_tasks()
    ours = get_task(name)
    raw, _ = ours.load_records(str(root / name), seed=0)
    # lm-eval reads the same records under its own split names (validation_matched, ...)
    lm_records = {ours.hub.splits[s]: recs for s, recs in raw.items()}
    theirs = lm_eval_task(task_manager, name, lm_records)
    lm_scored = theirs.config.test_split or theirs.config.validation_split
    assert ours.hub.splits[ours.scored_split] == lm_scored  # the split we call test is the one lm-eval reports
    checked = 0
    for split, records in raw.items():
        docs = lm_eval_docs(theirs, ours.hub.splits[split])
        assert len(docs) == len(records), split
        for i, (rec, doc) in enumerate(zip(records, docs)):
            where = f"{name} {split} record {i}"
            prompt, choices, gold = ours.render(rec)
            context = theirs.fewshot_context(doc, 0)
            assert prompt == context, where
            lm_choices = theirs.doc_to_choice(doc)
            assert choices == lm_choices, where
            target = theirs.doc_to_target(doc)
            assert gold == (lm_choices.index(target) if isinstance(target, str) else int(target)), where
            requests = theirs.construct_requests(doc, context)
            assert [r.args for r in requests] == [(prompt, ours.delimiter + c) for c in choices], where
            checked += 1
    # every record of every split file the task reads was compared
    files = split_files(root / name)
    read = [next(files[n] for n in ours.hub.local_names()[s] if n in files) for s in raw]
    assert sorted(read) == sorted(files.values())  # no file of the folder is left out
    assert checked == sum(len(jsonl_records(path)) for path in read) > 0


def test_creak_renders_the_documented_template():
    root = require_shared_tasks()
    if not (root / "creak").is_dir():
        pytest.skip(f"no creak folder under {root}")
    raw, _ = get_task("creak").load_records(str(root / "creak"), seed=0)
    files = split_files(root / "creak")
    expected = {"train": len(jsonl_records(files["train"])), "validation": len(jsonl_records(files["dev"]))}
    assert {s: len(r) for s, r in raw.items()} == expected
    for split, records in raw.items():
        for i, rec in enumerate(records):
            prompt, choices, gold = get_task("creak").render(rec)
            assert prompt == f"Claim: {rec['sentence']}\nQuestion: Is this claim true or false?\nAnswer:", (split, i)
            assert choices == ["false", "true"]
            assert choices[gold] == rec["label"], (split, i)
