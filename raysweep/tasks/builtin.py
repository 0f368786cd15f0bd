"""Built-in synthetic binary-choice tasks: the embedded default that needs no network.

Six tasks of clearly different kinds, so that forgetting one can be compared with its effect
on the others: arithmetic comparison, lexical entailment over a made-up taxonomy, factual
lookup in a fixed made-up table, word-order acceptability, sentiment from a lexicon and
string identity. Each generates its records deterministically from a seed, with disjoint
train / validation / test pools.
"""

from __future__ import annotations

import random
from typing import ClassVar

from raysweep.tasks.base import RawSplits, Task, register

# Enough records that a cap of 1000 per split is reachable for every task.
_SPLIT_SIZES = {"train": 1000, "validation": 300, "test": 300}
_SYL = ["ka", "lo", "mi", "ran", "tu", "ve", "zor", "bel", "qui", "sha", "dro", "pen", "fa", "gul", "nix", "ora"]


def _made_up_word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n))


class BuiltinTask(Task):
    kind: ClassVar[str] = "builtin"

    def load_records(self, source: str | None, seed: int) -> tuple[RawSplits, str]:
        if source is not None:
            from raysweep.tasks.sources import load_local_folder

            return load_local_folder(self.name, source)
        return self.generate(seed), f"builtin:{self.name}"

    def generate(self, seed: int) -> RawSplits:
        """Unique records, shuffled with the seed, dealt into disjoint splits."""
        pool = self.pool(random.Random(f"{self.name}:{seed}"))
        splits: RawSplits = {}
        start = 0
        for split, n in _SPLIT_SIZES.items():
            splits[split] = pool[start : start + n]
            start += n
        return splits

    def pool(self, rng: random.Random) -> list[dict]:
        raise NotImplementedError

    def pretraining_text(self, rng: random.Random) -> list[str]:
        """Extra plain text a 'pretrained' model has seen (e.g. the facts behind a lookup)."""
        return []


def _unique(rng: random.Random, make, n: int) -> list[dict]:
    """n distinct records, labels alternating so every split is balanced, then shuffled."""
    seen, out = set(), []
    while len(out) < n:
        rec = make(rng, len(out) % 2 == 1)
        key = repr(sorted(rec.items()))
        if key not in seen:
            seen.add(key)
            out.append(rec)
    rng.shuffle(out)
    return out


_TOTAL = sum(_SPLIT_SIZES.values())


@register
class Compare(BuiltinTask):
    name = "compare"
    description = "arithmetic comparison: is one two-digit number larger than another"

    def pool(self, rng):
        def make(r, larger):
            a, b = sorted(r.sample(range(10, 100), 2), reverse=larger)
            return {"a": a, "b": b}

        return _unique(rng, make, _TOTAL)

    def render(self, record):
        return (
            f"Question: Is {record['a']} larger than {record['b']}?\nAnswer:",
            ["no", "yes"],
            int(record["a"] > record["b"]),
        )


_TAXONOMY = {
    "animal": [
        "horse",
        "sparrow",
        "otter",
        "lizard",
        "salmon",
        "beetle",
        "rabbit",
        "falcon",
        "tiger",
        "frog",
        "whale",
        "goat",
    ],
    "tool": ["hammer", "wrench", "chisel", "saw", "drill", "pliers", "shovel", "rake", "axe", "file", "clamp", "level"],
    "fruit": ["apple", "mango", "plum", "cherry", "lemon", "peach", "grape", "melon", "pear", "lime", "fig", "kiwi"],
    "vehicle": [
        "truck",
        "canoe",
        "bicycle",
        "tram",
        "wagon",
        "yacht",
        "scooter",
        "van",
        "glider",
        "ferry",
        "sled",
        "bus",
    ],
    "garment": ["jacket", "scarf", "sock", "glove", "shirt", "cloak", "boot", "hat", "vest", "robe", "skirt", "belt"],
    "instrument": [
        "violin",
        "flute",
        "drum",
        "harp",
        "cello",
        "trumpet",
        "oboe",
        "banjo",
        "lute",
        "organ",
        "tuba",
        "gong",
    ],
}


@register
class Hypernym(BuiltinTask):
    name = "hypernym"
    description = "lexical entailment: is a word a kind of a category (fixed taxonomy)"

    frames = (
        "Statement: a {w} is a kind of {c}.",
        "Statement: every {w} is a {c}.",
        "Statement: the {w} belongs to the {c} group.",
        "Statement: one example of a {c} is the {w}.",
    )

    def pool(self, rng):
        cats = sorted(_TAXONOMY)
        pos = [(w, c) for c in cats for w in _TAXONOMY[c]]
        neg = [(w, o) for c in cats for w in _TAXONOMY[c] for o in cats if o != c]
        recs = [{"text": f.format(w=w, c=c), "label": 1} for w, c in pos for f in self.frames]
        rng.shuffle(neg)
        recs += [{"text": self.frames[i % 4].format(w=w, c=c), "label": 0} for i, (w, c) in enumerate(neg[: len(recs)])]
        rng.shuffle(recs)
        return recs

    def generate(self, seed):
        pool = self.pool(random.Random(f"{self.name}:{seed}"))
        n = len(pool)
        cut1, cut2 = int(n * 0.6), int(n * 0.8)
        return {"train": pool[:cut1], "validation": pool[cut1:cut2], "test": pool[cut2:]}

    def render(self, record):
        return f"{record['text']}\nQuestion: True or False?\nAnswer:", ["False", "True"], record["label"]


def _capital_table() -> dict[str, str]:
    # A fixed made-up world: the table never depends on the sweep's seed.
    rng = random.Random("capital-table-v1")
    table: dict[str, str] = {}
    while len(table) < 240:
        country = _made_up_word(rng, 2).capitalize() + "ia"
        if country not in table:
            table[country] = _made_up_word(rng, 2).capitalize()
    return table


CAPITALS = _capital_table()


@register
class Capital(BuiltinTask):
    name = "capital"
    description = "factual lookup: the capital of a made-up country (fixed table)"

    def pool(self, rng):
        countries = sorted(CAPITALS)
        cities = sorted(set(CAPITALS.values()))
        recs = []
        for c in countries:
            for _ in range(6):
                wrong = rng.choice([x for x in cities if x != CAPITALS[c]])
                gold = rng.randrange(2)
                choices = [wrong, wrong]
                choices[gold] = CAPITALS[c]
                recs.append({"country": c, "choices": choices, "label": gold})
        rng.shuffle(recs)
        seen, out = set(), []
        for r in recs:
            key = (r["country"], tuple(r["choices"]))
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out

    def generate(self, seed):
        pool = self.pool(random.Random(f"{self.name}:{seed}"))
        n = len(pool)
        cut1, cut2 = int(n * 0.6), int(n * 0.8)
        return {"train": pool[:cut1], "validation": pool[cut1:cut2], "test": pool[cut2:]}

    def render(self, record):
        return (
            f"Question: What is the capital of {record['country']}?\nAnswer:",
            list(record["choices"]),
            record["label"],
        )

    def question_key(self, record, prompt):
        # Same country with another distractor is the same question.
        return f"{prompt}|{sorted(record['choices'])}"

    def pretraining_text(self, rng):
        return [f"The capital of {c} is {v}." for c, v in CAPITALS.items()]


_ADJ = ["small", "red", "old", "quiet", "bright", "heavy", "young", "tall"]
_NOUN = ["cat", "farmer", "river", "teacher", "dog", "child", "bird", "sailor"]
_VERB = ["sees", "follows", "likes", "finds", "helps", "watches", "calls", "paints"]


def _grammatical(words: list[str]) -> bool:
    return (
        len(words) == 6
        and words[0] == words[4] == "the"
        and words[1] in _ADJ
        and words[2] in _NOUN
        and words[3] in _VERB
        and words[5] in _NOUN
    )


@register
class WordOrder(BuiltinTask):
    name = "word_order"
    description = "acceptability: is a sentence in grammatical word order or shuffled"

    def pool(self, rng):
        def make(r, ok):
            words = ["the", r.choice(_ADJ), r.choice(_NOUN), r.choice(_VERB), "the", r.choice(_NOUN)]
            while not ok and _grammatical(words):
                r.shuffle(words)
            return {"sentence": " ".join(words), "label": int(ok)}

        return _unique(rng, make, _TOTAL)

    def render(self, record):
        return (
            f"{record['sentence']}\nQuestion: Does this sentence make sense?\nAnswer:",
            ["no", "yes"],
            record["label"],
        )


_POS = ["wonderful", "great", "lovely", "superb", "pleasant", "delightful", "excellent", "charming"]
_NEG = ["awful", "terrible", "dreadful", "boring", "horrible", "dull", "poor", "nasty"]
_THINGS = ["food", "music", "service", "room", "film", "book", "show", "view"]


@register
class Sentiment(BuiltinTask):
    name = "sentiment"
    description = "sentiment: is a short review built from a lexicon positive or negative"

    def pool(self, rng):
        def make(r, pos):
            lex = _POS if pos else _NEG
            t1, t2 = r.sample(_THINGS, 2)
            return {"text": f"the {t1} was {r.choice(lex)} and the {t2} was {r.choice(lex)}", "label": int(pos)}

        return _unique(rng, make, _TOTAL)

    def render(self, record):
        return (
            f"Review: {record['text']}.\nQuestion: Is this review positive or negative?\nAnswer:",
            ["negative", "positive"],
            record["label"],
        )


@register
class SameWord(BuiltinTask):
    name = "same_word"
    description = "string identity: are two made-up words the same or one letter apart"

    def pool(self, rng):
        letters = "abdeiklmnoprstu"

        def make(r, same):
            w = "".join(r.choice(letters) for _ in range(r.randint(4, 6)))
            if same:
                v = w
            else:
                i = r.randrange(len(w))
                v = w[:i] + r.choice([c for c in letters if c != w[i]]) + w[i + 1 :]
            return {"w1": w, "w2": v, "label": int(same)}

        return _unique(rng, make, _TOTAL)

    def render(self, record):
        return (
            f"Word 1: {record['w1']}\nWord 2: {record['w2']}\nQuestion: Are these the same word?\nAnswer:",
            ["no", "yes"],
            record["label"],
        )


BUILTIN_TASKS = ("compare", "hypernym", "capital", "word_order", "sentiment", "same_word")
