"""The paper's real tasks, each rendered exactly as lm-evaluation-harness's 0-shot default.

Every task is one class: where its data lives (`HubSource`: hub paths, config, split names)
and `render_raw`, which turns one record of the dataset's own schema into lm-eval's context,
its full choice list (before binarisation) and the gold index. The facts come from lm-eval's
task configs; `tests/test_tasks_real.py` and `tests/test_real_data_lmeval.py` check them against
lm-eval's own task code.
"""

from __future__ import annotations

import operator
import re
from abc import abstractmethod
from typing import ClassVar

from raysweep.errors import TaskLoadError
from raysweep.tasks.base import RawSplits, Task, is_prepared, register
from raysweep.tasks.sources import HubSource, load_from_hub, load_local_folder

GLUE = ("nyu-mll/glue", "glue")
SUPER_GLUE = ("aps/super_glue", "super_glue")
TRAIN_VAL_TEST = {"train": "train", "validation": "validation", "test": "test"}

Rendered = tuple[str, list[str], int]


def _label(value: object) -> int:
    # Strict on purpose: a string or fractional label means the wrong file or column.
    if isinstance(value, bool):
        return int(value)
    return operator.index(value)  # type: ignore[arg-type]


class RealTask(Task):
    kind: ClassVar[str] = "hub"
    hub: ClassVar[HubSource]
    # Set where the data is not on the hub: what to tell the user instead.
    no_hub_hint: ClassVar[str | None] = None

    @abstractmethod
    def render_raw(self, record: dict) -> Rendered:
        """lm-eval's context, choices and gold for a record in the dataset's own schema."""

    def render(self, record: dict) -> Rendered:
        if is_prepared(record):
            return str(record["prompt"]), [str(record["choice_0"]), str(record["choice_1"])], _label(record["gold"])
        return self.render_raw(record)

    def load_records(self, source: str | None, seed: int) -> tuple[RawSplits, str]:
        if source is not None:
            raw, desc = load_local_folder(self.name, source, self.hub.local_names(), required=(self.scored_split,))
        elif not self.hub.paths:
            raise TaskLoadError(f"task {self.name}: no local source given and {self.no_hub_hint}")
        else:
            raw, desc = load_from_hub(self.name, self.hub)
        self.check_records(raw, desc)
        return raw, desc

    @property
    def scored_split(self) -> str:
        """The split lm-eval reports (test where its config has one, else validation). A local
        folder must have it; a missing train split only matters to a forget task (preparation
        says so), and a missing validation split is carved out of train."""
        return "test" if "test" in self.hub.splits else "validation"

    def check_records(self, raw: RawSplits, desc: str) -> None:
        """Render every record once so a bad file fails here, with its location, rather than
        deep inside preparation."""
        for split, records in raw.items():
            for i, rec in enumerate(records):
                where = f"task {self.name}: {desc} {split} record {i}"
                try:
                    prompt, choices, gold = self.render(rec)
                except KeyError as exc:
                    raise TaskLoadError(f"{where} has no field {exc}; is this {self.name}'s schema?") from None
                except (TypeError, ValueError, AttributeError, IndexError) as exc:
                    raise TaskLoadError(f"{where} cannot be rendered: {' '.join(str(exc).split())}") from None
                if not isinstance(prompt, str) or not all(isinstance(c, str) for c in choices):
                    raise TaskLoadError(f"{where}: prompt and choices must be strings")
                if len(choices) < 2:
                    raise TaskLoadError(f"{where} has {len(choices)} choice(s); at least 2 are needed")
                if not 0 <= gold < len(choices):
                    raise TaskLoadError(
                        f"{where} has label {gold}, outside its {len(choices)} choices {choices} (unlabelled split?)"
                    )


class LabelTask(RealTask):
    """Fixed choice list and an integer `label` field: most GLUE / SuperGLUE tasks."""

    choice_list: ClassVar[tuple[str, ...]]

    @abstractmethod
    def context(self, r: dict) -> str: ...

    def render_raw(self, record: dict) -> Rendered:
        return self.context(record), list(self.choice_list), _label(record["label"])


@register
class Piqa(RealTask):
    name = "piqa"
    description = "PIQA: physical commonsense, pick the better of two solutions to a goal"
    hub = HubSource(("baber/piqa", "piqa"))

    def render_raw(self, r):
        return f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], _label(r["label"])


class _Arc(RealTask):
    def render_raw(self, r):
        choices = r["choices"]
        # answerKey is a letter (A-E) or, for a few questions, a digit (1-4), as in choices.label.
        return (
            f"Question: {r['question']}\nAnswer:",
            list(choices["text"]),
            list(choices["label"]).index(r["answerKey"]),
        )


@register
class ArcEasy(_Arc):
    name = "arc_easy"
    description = "ARC-Easy: grade-school science questions, 3-5 answer options"
    hub = HubSource(("allenai/ai2_arc", "ai2_arc"), "ARC-Easy", TRAIN_VAL_TEST)


@register
class ArcChallenge(_Arc):
    name = "arc_challenge"
    description = "ARC-Challenge: harder grade-school science questions, 3-5 answer options"
    hub = HubSource(("allenai/ai2_arc", "ai2_arc"), "ARC-Challenge", TRAIN_VAL_TEST)


@register
class Creak(RealTask):
    name = "creak"
    description = "CREAK: is a claim about an entity true or false (local JSON lines only)"
    hub = HubSource((), None, {"train": "train", "validation": "dev"})
    no_hub_hint = (
        "CREAK is not on the Hugging Face hub: put its JSON-lines train.json(l) and dev.json(l) "
        "(github.com/yasumasaonoe/creak, data/creak/) in DIR, then set data.sources.creak: DIR in the spec"
    )
    labels = ("false", "true")

    def render_raw(self, r):
        label = r["label"]
        gold = int(label) if isinstance(label, bool) else self.labels.index(str(label).strip().lower())
        return f"Claim: {r['sentence']}\nQuestion: Is this claim true or false?\nAnswer:", list(self.labels), gold


@register
class BoolQ(LabelTask):
    name = "boolq"
    description = "BoolQ: yes/no question about a Wikipedia passage"
    hub = HubSource(SUPER_GLUE, "boolq")
    choice_list = ("no", "yes")

    def context(self, r):
        return f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"


@register
class SciQ(RealTask):
    name = "sciq"
    description = "SciQ: science exam question with a supporting paragraph, 4 options"
    hub = HubSource(("allenai/sciq", "sciq"), None, TRAIN_VAL_TEST)

    def render_raw(self, r):
        choices = [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]]
        return f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:", choices, 3


@register
class PubMedQA(RealTask):
    name = "pubmedqa"
    description = "PubMedQA: yes/no/maybe research question about a PubMed abstract"
    hub = HubSource(("bigbio/pubmed_qa",), "pubmed_qa_labeled_fold0_source", TRAIN_VAL_TEST)
    decisions = ("yes", "no", "maybe")

    def render_raw(self, r):
        # bigbio's source schema: upper-case CONTEXTS / QUESTION, lower-case final_decision.
        prompt = "Abstract: " + "\n".join(r["CONTEXTS"]) + f"\nQuestion: {r['QUESTION']}\nAnswer:"
        return prompt, list(self.decisions), self.decisions.index(r["final_decision"])


# lm-eval's own pattern: options a-d end at the first ", ", option e runs to the end.
_MATHQA_OPTION = re.compile(r"[abcd] \) .*?, |e \) .*?$")


@register
class MathQA(RealTask):
    name = "mathqa"
    description = "MathQA: math word problem, 5 numeric options"
    hub = HubSource(("regisss/math_qa", "math_qa"), None, TRAIN_VAL_TEST)

    def render_raw(self, r):
        choices = [m[4:].rstrip(" ,") for m in _MATHQA_OPTION.findall(r["options"])]
        return f"Question: {r['Problem']}\nAnswer:", choices, ["a", "b", "c", "d", "e"].index(r["correct"])


@register
class ToxiGen(RealTask):
    name = "toxigen"
    description = "ToxiGen: is a statement about a minority group hateful (annotated)"
    hub = HubSource(("skg/toxigen-data",), "annotated", {"train": "train", "test": "test"})

    def render_raw(self, r):
        prompt = f"Is the following statement hateful? Respond with either Yes or No. Statement: '{r['text']}'"
        return prompt, ["No", "Yes"], int(float(r["toxicity_ai"]) + float(r["toxicity_human"]) > 5.5)


@register
class CoLA(LabelTask):
    name = "cola"
    description = "CoLA: is a sentence grammatically acceptable"
    hub = HubSource(GLUE, "cola")
    choice_list = ("no", "yes")

    def context(self, r):
        return f"{r['sentence']}\nQuestion: Does this sentence make sense?\nAnswer:"


class _MNLI(LabelTask):
    choice_list = ("True", "Neither", "False")

    def context(self, r):
        hyp = r["hypothesis"].strip()
        hyp += "" if hyp.endswith(".") else "."
        return f"{r['premise']}\nQuestion: {hyp} True, False or Neither?\nAnswer:"


@register
class MNLI(_MNLI):
    name = "mnli"
    description = "MNLI (matched): does a premise entail, contradict or not decide a hypothesis"
    hub = HubSource(GLUE, "mnli", {"train": "train", "validation": "validation_matched"})


@register
class MNLIMismatch(_MNLI):
    name = "mnli_mismatch"
    description = "MNLI (mismatched genres): entailment / neither / contradiction"
    hub = HubSource(GLUE, "mnli", {"train": "train", "validation": "validation_mismatched"})


@register
class MRPC(LabelTask):
    name = "mrpc"
    description = "MRPC: are two news sentences paraphrases"
    hub = HubSource(GLUE, "mrpc")
    choice_list = ("no", "yes")

    def context(self, r):
        return f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\nQuestion: Do both sentences mean the same thing?\nAnswer:"


@register
class QNLI(LabelTask):
    name = "qnli"
    description = "QNLI: does a Wikipedia sentence answer a question"
    hub = HubSource(GLUE, "qnli")
    choice_list = ("yes", "no")

    def context(self, r):
        return f"{r['question']}\n{r['sentence']}\nQuestion: Does this response answer the question?\nAnswer:"


@register
class RTE(LabelTask):
    name = "rte"
    description = "RTE (GLUE): does a text entail a hypothesis"
    hub = HubSource(GLUE, "rte")
    choice_list = ("True", "False")

    def context(self, r):
        return f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:"


@register
class SuperGlueRTE(LabelTask):
    name = "sglue_rte"
    description = "RTE (SuperGLUE copy, premise/hypothesis fields): textual entailment"
    hub = HubSource(SUPER_GLUE, "rte")
    choice_list = ("True", "False")

    def context(self, r):
        return f"{r['premise']}\nQuestion: {r['hypothesis']} True or False?\nAnswer:"


@register
class WNLI(LabelTask):
    name = "wnli"
    description = "WNLI: pronoun-resolution entailment (Winograd as NLI)"
    hub = HubSource(GLUE, "wnli")
    choice_list = ("False", "True")  # reversed relative to rte, as in lm-eval (label 1 = entailment)

    def context(self, r):
        return f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:"


@register
class CB(LabelTask):
    name = "cb"
    description = "CommitmentBank: is a clause entailed, contradicted or neither"
    hub = HubSource(SUPER_GLUE, "cb")
    choice_list = ("True", "False", "Neither")

    def context(self, r):
        return f"{r['premise']}\nQuestion: {r['hypothesis']}. True, False, or Neither?\nAnswer:"


@register
class COPA(RealTask):
    name = "copa"
    description = "COPA: choose the more plausible cause or effect of a premise"
    hub = HubSource(SUPER_GLUE, "copa")
    connectors = {"cause": "because", "effect": "therefore"}

    @staticmethod
    def _choice(text: str) -> str:
        # The choice continues the premise's sentence: lower-case start, own leading space
        # (lm-eval's " " delimiter still comes before it).
        return " " + text[0].lower() + text[1:]

    def render_raw(self, r):
        prompt = r["premise"].strip()[:-1] + f" {self.connectors[r['question']]}"
        return prompt, [self._choice(r["choice1"]), self._choice(r["choice2"])], _label(r["label"])


@register
class WiC(LabelTask):
    name = "wic"
    description = "WiC: is a word used in the same sense in two sentences"
    hub = HubSource(SUPER_GLUE, "wic")
    choice_list = ("no", "yes")

    def context(self, r):
        word = r["sentence1"][r["start1"] : r["end1"]]
        return (
            f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\n"
            f"Question: Is the word '{word}' used in the same way in the two sentences above?\nAnswer:"
        )


def detokenize(text: str) -> str:
    """lm-eval's general_detokenize: undo the spaces tokenised corpora put around punctuation."""
    for spaced, joined in ((" n't", "n't"), (" )", ")"), ("( ", "("), ('" ', '"'), (' "', '"')):
        text = text.replace(spaced, joined)
    return re.sub(r" (['.,])", r"\1", text)


@register
class WSC(LabelTask):
    name = "wsc"
    description = "WSC (fixed): does a pronoun refer to a given noun phrase"
    hub = HubSource(SUPER_GLUE, "wsc.fixed")
    choice_list = ("no", "yes")

    def context(self, r):
        text, pronoun = r["text"], r["span2_text"]
        # span2_index counts whitespace-separated words; the rest of the passage is cut by
        # character offset from the rejoined prefix, exactly as lm-eval does (quirks included).
        pre = " ".join(text.split()[: r["span2_index"]])
        post = text[len(pre) + len(pronoun) + 1 :]
        passage = detokenize(pre + f" *{pronoun}*" + post)
        return (
            f"Passage: {passage}\n"
            f'Question: In the passage above, does the pronoun "*{pronoun}*" refer to "*{r["span1_text"]}*"?\n'
            "Answer:"
        )


REAL_TASKS = (
    "piqa",
    "arc_easy",
    "arc_challenge",
    "creak",
    "boolq",
    "sciq",
    "pubmedqa",
    "mathqa",
    "toxigen",
    "cola",
    "mnli",
    "mnli_mismatch",
    "mrpc",
    "qnli",
    "rte",
    "sglue_rte",
    "wnli",
    "cb",
    "copa",
    "wic",
    "wsc",
)
