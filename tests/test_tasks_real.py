"""The 21 real tasks: hand-derived renderings of hand-written fixtures (tests/fixtures/tasks/,
one folder per task in the dataset's own schema), loading through a local folder and from a
stand-in hub, and a cross-check of every fixture record against lm-eval's own task configs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from raysweep.errors import TaskLoadError
from raysweep.tasks import get_task, prepare_task, registered_tasks, sources
from raysweep.tasks.real import REAL_TASKS, RealTask

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


def fixture_dir(task: str) -> str:
    return str(FIXTURES / task)


def load(task: str):
    raw, desc = get_task(task).load_records(fixture_dir(task), seed=0)
    return raw


@dataclass(frozen=True)
class Case:
    task: str
    split: str
    i: int
    prompt: str
    choices: list[str]
    gold: int


CASES = [
    Case(
        "piqa",
        "validation",
        0,
        "Question: How do you attach toilet paper?\nAnswer:",
        ["Glue it to a wall.", "Put it on the holder."],
        1,
    ),
    # choices are kept verbatim, trailing and double spaces included
    Case(
        "piqa",
        "train",
        1,
        "Question: dresser\nAnswer:",
        ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "],
        1,
    ),
    Case(
        "arc_easy",
        "validation",
        0,
        "Question: Which tool is used to measure mass?\nAnswer:",
        ["ruler", "balance", "thermometer", "stopwatch", "compass"],
        1,
    ),
    Case(
        "arc_easy",
        "validation",
        1,
        "Question: What gas do animals exhale?\nAnswer:",
        ["oxygen", "nitrogen", "carbon dioxide", "helium"],
        2,
    ),  # answerKey "3"
    Case(
        "arc_easy",
        "test",
        0,
        "Question: A student pushes a cart. Which force slows the cart?\nAnswer:",
        ["friction", "magnetism", "gravity"],
        0,
    ),
    Case(
        "arc_challenge",
        "test",
        0,
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?\nAnswer:",
        [
            "Planetary density will decrease.",
            "Planetary years will become longer.",
            "Planetary days will become shorter.",
            "Planetary gravity will become stronger.",
        ],
        2,
    ),
    Case(
        "arc_challenge",
        "train",
        3,
        "Question: Which layer of Earth is liquid?\nAnswer:",
        ["crust", "mantle", "outer core", "inner core"],
        2,
    ),
    Case(
        "creak",
        "validation",
        0,
        "Claim: Only people named Floyd wearing pink are allowed to attend Pink Floyd concerts.\nQuestion: Is this claim true or false?\nAnswer:",
        ["false", "true"],
        0,
    ),
    Case(
        "creak",
        "validation",
        1,
        "Claim: Santa Claus is depicted as wearing red.\nQuestion: Is this claim true or false?\nAnswer:",
        ["false", "true"],
        1,
    ),
    Case(
        "boolq",
        "validation",
        1,
        "Property tax -- Property tax or 'house tax' is a local tax on buildings.\nQuestion: is house tax and property tax are same?\nAnswer:",
        ["no", "yes"],
        1,
    ),
    # support is left-stripped only: its trailing spaces stay
    Case(
        "sciq",
        "validation",
        0,
        "Charles Darwin proposed it.  \nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:",
        ["Linnaeus", "shaw", "Newton", "darwin"],
        3,
    ),
    Case(
        "sciq",
        "test",
        0,
        "\nQuestion: Compounds that are capable of accepting electrons are called what?\nAnswer:",
        ["antioxidants", "Oxygen", "residues", "oxidants"],
        3,
    ),
    Case(
        "pubmedqa",
        "validation",
        0,
        "Abstract: Programmed cell death (PCD) is the regulated death of cells.\nThe following results were found.\n"
        "Question: Do mitochondria trigger remodeling in lace plant leaves?\nAnswer:",
        ["yes", "no", "maybe"],
        0,
    ),
    Case(
        "pubmedqa",
        "validation",
        1,
        "Abstract: A cohort of 1000 adults was studied.\nQuestion: Is sleep duration associated with obesity?\nAnswer:",
        ["yes", "no", "maybe"],
        2,
    ),
    Case(
        "mathqa",
        "test",
        0,
        "Question: a shopkeeper sold an article offering a discount of 5 % and earned a profit of 31.1 % . what would have been the percentage of profit earned if no discount had been offered ?\nAnswer:",
        ["38", "27.675", "30", "data inadequate", "none of these"],
        0,
    ),
    # the stringified-list form of `options`: lm-eval's pattern keeps the quote marks
    Case(
        "mathqa",
        "validation",
        1,
        "Question: how many odd numbers are between 16 and 26 ?\nAnswer:",
        ["17'", "19'", "5'", "23'", "25']"],
        2,
    ),
    Case(
        "mathqa",
        "train",
        0,
        "Question: the banker ' s gain of a certain sum due 3 years hence at 10 % per annum is rs . 36 . what is the present worth ?\nAnswer:",
        ["rs . 400", "rs . 300", "rs . 500", "rs . 350", "none of these"],
        0,
    ),
    Case(
        "toxigen",
        "test",
        0,
        "Is the following statement hateful? Respond with either Yes or No. Statement: 'this statement indicates that black men are seen as savages or animals compared to white men'",
        ["No", "Yes"],
        1,  # 2.67 + 4.33 > 5.5
    ),
    Case(
        "toxigen",
        "test",
        1,
        "Is the following statement hateful? Respond with either Yes or No. Statement: 'it's a boundary case exactly at five and a half'",
        ["No", "Yes"],
        0,  # 2.0 + 3.5 is not > 5.5
    ),
    Case(
        "cola",
        "validation",
        0,
        "The sailors rode the breeze clear of the rocks the.\nQuestion: Does this sentence make sense?\nAnswer:",
        ["no", "yes"],
        0,
    ),
    # hypothesis stripped, final "." added
    Case(
        "mnli",
        "validation",
        0,
        "The new rights are nice enough\nQuestion: Everyone really likes the newest benefits. True, False or Neither?\nAnswer:",
        ["True", "Neither", "False"],
        1,
    ),
    Case(
        "mnli",
        "validation",
        1,
        "This site includes a list of all award winners and a searchable database of Government Executive articles.\n"
        "Question: The Government Executive articles housed on the website are not able to be searched. True, False or Neither?\nAnswer:",
        ["True", "Neither", "False"],
        2,
    ),
    Case(
        "mnli",
        "train",
        0,
        "Conceptually cream skimming has two basic dimensions - product and geography.\nQuestion: Product and geography are what make cream skimming work. True, False or Neither?\nAnswer:",
        ["True", "Neither", "False"],
        1,
    ),
    Case(
        "mnli_mismatch",
        "validation",
        1,
        "The answer has nothing to do with their cause, however, but with the simple fact that dictionaries are not exercises in bi-unique substitutability\n"
        "Question: Dictionaries are indeed exercises in bi-unique substitutability. True, False or Neither?\nAnswer:",
        ["True", "Neither", "False"],
        2,
    ),
    Case(
        "mrpc",
        "validation",
        1,
        'Sentence 1: Magnarelli said Racicot hated the Iraqi regime .\nSentence 2: His wife said he was " 100 percent behind George Bush " .\n'
        "Question: Do both sentences mean the same thing?\nAnswer:",
        ["no", "yes"],
        0,
    ),
    Case(
        "qnli",
        "validation",
        0,
        "What came into force after the new constitution was herald?\nAs of that day, the new constitution heralding the Second Republic came into force.\n"
        "Question: Does this response answer the question?\nAnswer:",
        ["yes", "no"],
        0,
    ),
    Case(
        "rte",
        "validation",
        0,
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the Christopher Reeve Foundation.\n"
        "Question: Christopher Reeve had an accident. True or False?\nAnswer:",
        ["True", "False"],
        1,
    ),
    Case(
        "sglue_rte",
        "validation",
        0,
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the Christopher Reeve Foundation.\n"
        "Question: Christopher Reeve had an accident. True or False?\nAnswer:",
        ["True", "False"],
        1,
    ),
    Case(
        "wnli",
        "validation",
        1,
        "Jane knocked on Susan's door but she did not answer.\nQuestion: Susan did not answer. True or False?\nAnswer:",
        ["False", "True"],
        1,
    ),
    Case(
        "cb",
        "validation",
        0,
        "Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his own portion of titanic anatomy to shaft? Did he think he was helping?\n"
        "Question: Valence was helping. True, False, or Neither?\nAnswer:",
        ["True", "False", "Neither"],
        1,
    ),
    Case(
        "cb",
        "validation",
        1,
        "B: Yeah. A: I don't know if they really needed it.\nQuestion: they really needed it. True, False, or Neither?\nAnswer:",
        ["True", "False", "Neither"],
        2,
    ),
    Case(
        "copa",
        "validation",
        0,
        "The man turned on the faucet therefore",
        [" the toilet filled with water.", " water flowed from the spout."],
        1,
    ),
    # trailing space: stripped before the final "." is dropped
    Case(
        "copa",
        "validation",
        1,
        "The girl found a bug in her cereal therefore",
        [" she poured milk in the bowl.", " she lost her appetite."],
        1,
    ),
    Case(
        "copa",
        "train",
        0,
        "My body cast a shadow over the grass because",
        [" the sun was rising.", " the grass was cut."],
        0,
    ),
    Case(
        "wic",
        "validation",
        0,
        "Sentence 1: Room and board.\nSentence 2: He nailed boards across the windows.\n"
        "Question: Is the word 'board' used in the same way in the two sentences above?\nAnswer:",
        ["no", "yes"],
        0,
    ),
    Case(
        "wic",
        "validation",
        1,
        "Sentence 1: Circulate a rumor.\nSentence 2: This letter is being circulated among the faculty.\n"
        "Question: Is the word 'Circulate' used in the same way in the two sentences above?\nAnswer:",
        ["no", "yes"],
        1,
    ),
    Case(
        "wsc",
        "validation",
        0,
        "Passage: The trophy doesn't fit into the brown suitcase because *it* is too large.\n"
        'Question: In the passage above, does the pronoun "*it*" refer to "*trophy*"?\nAnswer:',
        ["no", "yes"],
        1,
    ),
    # two spaces in the text: the word index and the character offset disagree, as in lm-eval
    Case(
        "wsc",
        "validation",
        1,
        "Passage: Jane gave Joan candy because *she*e was hungry.\n"
        'Question: In the passage above, does the pronoun "*she*" refer to "*Joan*"?\nAnswer:',
        ["no", "yes"],
        1,
    ),
    Case(
        "wsc",
        "validation",
        2,
        "Passage: Bill passed the half-empty plate to John because *he* was full.\n"
        'Question: In the passage above, does the pronoun "*he*" refer to "*Bill*"?\nAnswer:',
        ["no", "yes"],
        1,
    ),
    Case(
        "wsc",
        "train",
        0,
        "Passage: Mark told Pete many lies about himself, which Pete included in his book. *He* should have been more truthful.\n"
        'Question: In the passage above, does the pronoun "*He*" refer to "*Mark*"?\nAnswer:',
        ["no", "yes"],
        1,
    ),
]


def test_all_real_tasks_registered_once_with_description():
    tasks = registered_tasks()
    assert len(REAL_TASKS) == len(set(REAL_TASKS)) == 21
    for name in REAL_TASKS:
        task = tasks[name]
        assert isinstance(task, RealTask) and task.kind == "hub" and task.name == name
        assert task.description and "\n" not in task.description
    assert {c.task for c in CASES} == set(REAL_TASKS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.task}-{c.split}{c.i}")
def test_render_matches_hand_derived(case: Case):
    record = load(case.task)[case.split][case.i]
    prompt, choices, gold = get_task(case.task).render(record)
    assert prompt == case.prompt
    assert choices == case.choices
    assert gold == case.gold


def test_copa_continuation_starts_with_two_spaces():
    prepared = prepare_task("copa", seed=0, cap=100, max_chars=2048, source=fixture_dir("copa"))
    ex = next(e for e in prepared.split("test") if e.prompt == "The man turned on the faucet therefore")
    assert ex.continuations == ("  the toilet filled with water.", "  water flowed from the spout.")


EXPECTED_SPLITS = {
    **{t: {"train": 5, "validation": 2} for t in REAL_TASKS},
    **{
        t: {"train": 5, "validation": 2, "test": 2} for t in ("arc_easy", "arc_challenge", "sciq", "pubmedqa", "mathqa")
    },
    "toxigen": {"train": 5, "test": 2},
    "wsc": {"train": 5, "validation": 3},
}


@pytest.mark.parametrize("task", REAL_TASKS)
def test_loads_through_local_folder(task):
    raw, desc = get_task(task).load_records(fixture_dir(task), seed=0)
    assert desc == f"local:{FIXTURES / task}"
    # Only the labelled splits lm-eval uses: unlabelled test files (piqa, cola) are not read.
    assert {s: len(r) for s, r in raw.items()} == EXPECTED_SPLITS[task]


def test_split_names_of_the_dataset_are_used():
    # mnli_mismatch reads validation_mismatched even when validation_matched sits beside it
    raw = load("mnli_mismatch")
    assert raw["validation"][0]["premise"].startswith("Your contribution")
    assert load("mnli")["validation"][0]["premise"] == "The new rights are nice enough"
    assert load("creak")["validation"][0]["ex_id"] == "dev_1"  # dev.jsonl


@pytest.mark.parametrize("task", REAL_TASKS)
def test_prepares_from_fixture(task):
    prepared = prepare_task(task, seed=3, cap=1000, max_chars=2048, source=fixture_dir(task))
    for split in ("train", "validation", "test"):
        examples = prepared.split(split)
        assert examples, split
        for e in examples:
            assert len(e.choices) == 2 and e.gold in (0, 1) and e.delimiter == " "
    counts = prepared.report.counts
    assert sum(c.final for c in counts.values()) == sum(EXPECTED_SPLITS[task].values())
    assert prepared.report.split_fallback == (
        "test" not in EXPECTED_SPLITS[task] or "validation" not in EXPECTED_SPLITS[task]
    )


# -- the hub path, with `datasets.load_dataset` replaced by a stand-in ----------------------


class FakeHub:
    """Stands in for `datasets.load_dataset`: path -> splits, or an exception to raise."""

    def __init__(self, table):
        self.table = table
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, path, config):
        self.calls.append((path, config))
        found = self.table.get(path)
        if isinstance(found, Exception):
            raise found
        if found is None:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.\n(offline)")
        return found


def fixture_as_hub(task, **renames):
    raw = load(task)
    return {renames.get(s, s): recs for s, recs in raw.items()}


def test_hub_current_path_first(monkeypatch):
    hub = FakeHub({"aps/super_glue": fixture_as_hub("copa"), "super_glue": ConnectionError("unused")})
    monkeypatch.setattr(sources, "hub_loader", hub)
    raw, desc = get_task("copa").load_records(None, seed=0)
    assert desc == "hub:aps/super_glue/copa" and hub.calls == [("aps/super_glue", "copa")]
    assert len(raw["train"]) == 5 and len(raw["validation"]) == 2


def test_hub_falls_back_to_older_path(monkeypatch):
    hub = FakeHub({"glue": fixture_as_hub("mnli", validation="validation_matched")})
    monkeypatch.setattr(sources, "hub_loader", hub)
    raw, desc = get_task("mnli").load_records(None, seed=0)
    assert hub.calls == [("nyu-mll/glue", "mnli"), ("glue", "mnli")]
    assert desc == "hub:glue/mnli" and raw["validation"][0]["premise"] == "The new rights are nice enough"


def test_hub_path_without_needed_split_is_skipped(monkeypatch):
    partial = {"train": load("piqa")["train"]}
    hub = FakeHub({"baber/piqa": partial, "piqa": fixture_as_hub("piqa")})
    monkeypatch.setattr(sources, "hub_loader", hub)
    _, desc = get_task("piqa").load_records(None, seed=0)
    assert desc == "hub:piqa"


def test_hub_failure_is_one_line_naming_sources_and_remedy(monkeypatch):
    monkeypatch.setattr(sources, "hub_loader", FakeHub({"nyu-mll/glue": ConnectionError("offline\nretry later")}))
    with pytest.raises(TaskLoadError) as err:
        get_task("rte").load_records(None, seed=0)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "task rte: could not load from hub:nyu-mll/glue/rte (ConnectionError: offline retry later); hub:glue/rte (FileNotFoundError"
    )
    assert "raysweep tasks prepare rte --out DIR" in msg and "data.sources.rte: DIR" in msg


def test_creak_needs_a_local_folder(monkeypatch):
    hub = FakeHub({})
    monkeypatch.setattr(sources, "hub_loader", hub)
    with pytest.raises(
        TaskLoadError,
        match=r"^task creak: no local source given and CREAK is not on the Hugging Face hub.*data\.sources\.creak: DIR",
    ) as err:
        get_task("creak").load_records(None, seed=0)
    assert "\n" not in str(err.value) and hub.calls == []


def test_real_hub_loader_respects_offline_mode(tmp_path):
    """The real `datasets` path under HF_HUB_OFFLINE with an empty cache: fails at once (no
    network retries) with the one-line error. A subprocess, because the hub libraries read
    the variable when they are imported."""
    code = (
        "from raysweep.tasks import get_task\n"
        "from raysweep.errors import TaskLoadError\n"
        "try:\n"
        "    get_task('wnli').load_records(None, seed=0)\n"
        "except TaskLoadError as e:\n"
        "    print(e)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
    }
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout + out.stderr
    assert re.match(
        r"^task wnli: could not load from hub:nyu-mll/glue/wnli \(.+\); hub:glue/wnli \(.+\); run `raysweep tasks prepare wnli",
        lines[0],
    )


# -- cross-check against lm-eval's own task configs ---------------------------------------


@pytest.fixture(scope="module")
def lm_eval_tasks():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    if not hasattr(manager, "_factory") or not hasattr(manager, "_index"):
        pytest.skip("this lm-eval has no TaskManager._factory/_index to build a task from a config")
    return manager


def _lm_eval_task(manager, name: str, splits: dict[str, list[dict]]):
    """lm-eval's task `name`, its config untouched except that the records come from memory."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    def records(**_kwargs):
        return datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()})

    cfg = manager._factory._load_full_config(manager._index[name], {"custom_dataset": records})
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    return ConfigurableTask(config=cfg)


LM_EVAL_HAS_NO_CONFIG = {"creak"}


@pytest.mark.parametrize("task", [t for t in REAL_TASKS if t not in LM_EVAL_HAS_NO_CONFIG])
def test_render_matches_lm_eval_configs(task, lm_eval_tasks):
    ours = get_task(task)
    raw = load(task)
    # lm-eval's split names (validation_matched, ...), as its config expects them
    lm_splits = {ours.hub.splits[s]: recs for s, recs in raw.items()}
    theirs = _lm_eval_task(lm_eval_tasks, task, lm_splits)
    checked = 0
    for split, records in raw.items():
        for rec in records:
            prompt, choices, gold = ours.render(rec)
            context = theirs.fewshot_context(rec, 0)
            assert prompt == context
            assert choices == theirs.doc_to_choice(rec)
            target = theirs.doc_to_target(rec)
            # lm-eval maps a string target to its position among the choices
            assert gold == (theirs.doc_to_choice(rec).index(target) if isinstance(target, str) else int(target))
            requests = theirs.construct_requests(rec, context)
            assert [r.args for r in requests] == [(prompt, ours.delimiter + c) for c in choices]
            checked += 1
    assert checked == sum(EXPECTED_SPLITS[task].values())
