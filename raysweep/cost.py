"""What a sweep will cost, before it runs: tokens trained and scored, FLOPs, store rows and
bytes, checkpoint disk; turned into time by `raysweep.throughput` (a GPU's peak at an assumed
MFU, or this CPU's rate from a short timed pass).

Counts follow what the trial does (raysweep.trial): every epoch scores the forget task on
its trained examples, validation and test, and the other evaluation tasks on the spec's
splits at the epochs `scoring.schedule` names and at every milestone; the scorer reads each example as one packed row (prompt once, then both answers);
training feeds prompt + target answer, cut to the model's window.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.constants import SPLITS
from raysweep.errors import BadInput
from raysweep.methods import METHODS
from raysweep.scoring import encode_examples
from raysweep.spec import ScoringConfig, SweepSpec, TrialPlan
from raysweep.store import SCORES_SCHEMA
from raysweep.tasks.base import Example, PreparedTask, PrepReport

# Without observed epochs or --expect-epochs, a phase is expected to stop at this fraction of
# its epoch budget: the paper's stop rules (train accuracy 0.99, test accuracy below 0.5) end
# most phases well before 100 epochs. It is printed with every plan that uses it.
DEFAULT_EXPECTED_FRACTION = 0.4
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What FLOPs and disk need of a model."""

    name: str
    params: int
    embedding_params: int
    layers: int
    hidden: int
    vocab: int
    max_length: int
    weight_bytes: int  # per parameter, as trained and checkpointed
    source: str  # where the shape came from ("config" or a named fallback)

    @property
    def body_params(self) -> int:
        return self.params - self.embedding_params


@dataclass(frozen=True)
class SliceTokens:
    """Token counts of one (task, split) as the trial scores it."""

    task: str
    split: str
    examples: int
    scored: int  # tokens fed to the scorer: prompt once plus both answers
    answer: int  # answer tokens of both choices (the store's n_tokens_correct + n_tokens_distractor)
    squared: int  # sum of squared row lengths: attention cost grows with it

    @classmethod
    def count(cls, task: str, split: str, examples: list[Example], tokenizer, max_length: int) -> "SliceTokens":
        if not examples:
            return cls(task, split, 0, 0, 0, 0)
        lengths, answer = [], 0
        for p0, p1 in encode_examples(tokenizer, examples):
            lengths.append(min(len(p0.context) + len(p0.continuation) + len(p1.continuation), 2 * (max_length + 1)))
            answer += len(p0.continuation) + len(p1.continuation)
        arr = np.array(lengths, dtype=np.int64)
        return cls(task, split, len(examples), int(arr.sum()), answer, int((arr**2).sum()))


@dataclass(frozen=True)
class TrainTokens:
    """Tokens one training epoch feeds the model (inputs: prompt + target answer, cut to the
    window, less the last token), for gold targets, distractor targets and the larger of the two."""

    examples: int
    gold: int
    distractor: int
    upper: int
    squared: int

    @classmethod
    def count(cls, examples: list[Example], tokenizer, max_length: int) -> "TrainTokens":
        gold = distractor = upper = squared = 0
        for ex, pairs in zip(examples, encode_examples(tokenizer, examples)):
            n = [min(len(p.context) + len(p.continuation), max_length + 1) - 1 for p in pairs]
            gold += n[ex.gold]
            distractor += n[1 - ex.gold]
            upper += max(n)
            squared += max(n) ** 2
        return cls(len(examples), gold, distractor, upper, squared)

    def for_targets(self, method: str, bound: str) -> float:
        """Tokens of an epoch whose targets the method draws: gold for the fine-tune and
        relearn phases and the gold-label methods, the distractor for flipped labels, and
        either with equal chance for random labels."""
        if bound == "upper":
            return float(self.upper)
        return {"flipped": float(self.distractor), "random": (self.gold + self.distractor) / 2}.get(
            method, float(self.gold)
        )


@dataclass
class TrialCost:
    plan: TrialPlan
    slices: list[SliceTokens]
    train: TrainTokens
    epochs: dict[str, dict[str, float]]  # "upper" / "expected" -> phase -> epochs
    model: ModelShape
    # What the relearning attack trains on, when not the whole trained set: part of it
    # (phases.relearn.examples) or another task's train split (phases.relearn.task).
    relearn: TrainTokens | None = None
    # The slices whose pretrained scores this trial computes: the sweep's earlier trials of
    # its model already scored the rest (raysweep/pretrained.py). None: all of them.
    pretrained: list[SliceTokens] | None = None

    @property
    def rows_per_epoch(self) -> int:
        """Rows of an epoch that scores every evaluation task (every epoch, by default)."""
        return sum(s.examples for s in self.slices)

    @property
    def scored_per_epoch(self) -> int:
        return sum(s.scored for s in self.slices)

    def scored_epochs(self, bound: str) -> float:
        """Epochs scored: the pretrained model once, then every trained epoch."""
        return 1 + sum(self.epochs[bound].values())

    def passes(self, s: SliceTokens, bound: str) -> float:
        """Trained epochs at which the slice is scored: every one for the forget task, the
        schedule's epochs plus the phase's milestone for the other tasks."""
        if s.task == self.plan.forget_task:
            return sum(self.epochs[bound].values())
        return sum(scheduled_epochs(self.plan.scoring, ph, n) for ph, n in self.epochs[bound].items())

    def rows(self, bound: str) -> float:
        return sum(s.examples * (1 + self.passes(s, bound)) for s in self.slices)

    def trained_tokens(self, bound: str) -> dict[str, float]:
        out = {}
        for phase, n in self.epochs[bound].items():
            method = self.plan.method if phase == "forget" else "gold"
            tokens = self.relearn if phase == "relearn" and self.relearn is not None else self.train
            out[phase] = n * tokens.for_targets(method, bound)
        if self.plan.method == "npo" and "forget" in out:
            out["forget"] += self.train.gold  # the reference model's one pass over the forget set
        return out

    @property
    def pretrained_slices(self) -> list[SliceTokens]:
        return self.slices if self.pretrained is None else self.pretrained

    def scored_tokens(self, bound: str) -> float:
        """Tokens this trial puts through the model to score (its rows hold more: the
        pretrained slices it reuses)."""
        trained = sum(s.scored * self.passes(s, bound) for s in self.slices)
        return trained + sum(s.scored for s in self.pretrained_slices)

    def flops(self, bound: str) -> dict[str, float]:
        """Training: forward + backward = 3 forwards with the LM head over every position.
        Scoring: one forward; the LM head only at answer positions (as the scorer does).
        Attention adds 2 * layers * hidden * length per token (causal)."""
        m = self.model
        head = 2 * m.hidden * m.vocab
        trained = sum(self.trained_tokens(bound).values())
        mean_sq = self.train.squared / max(self.train.upper, 1)  # tokens-weighted mean length
        train_flops = 3 * trained * (2 * m.body_params + head + 2 * m.layers * m.hidden * mean_sq)

        def score_flops(slices: list[SliceTokens]) -> float:
            return sum(
                2 * m.body_params * s.scored + head * s.answer + 2 * m.layers * m.hidden * s.squared for s in slices
            )

        trained_scoring = sum(score_flops([s]) * self.passes(s, bound) for s in self.slices)
        return {"train": train_flops, "score": trained_scoring + score_flops(self.pretrained_slices)}

    def hidden_rows(self, bound: str) -> float:
        policy = self.plan.scoring.hidden_states
        if policy == "none":
            return 0.0
        kept = self.slices
        if self.plan.scoring.hidden_tasks == "forget":
            kept = [s for s in self.slices if s.task == self.plan.forget_task]
        if policy == "every_epoch":
            rows = sum(s.examples * (1 + self.passes(s, bound)) for s in kept)
        else:
            rows = (1 + len(self.epochs[bound])) * sum(s.examples for s in kept)
        return rows * len(self.plan.scoring.layers)

    def checkpoint_bytes(self) -> dict[str, int]:
        """A trial's resume point (weights, plus optimizer state when kept) and, while it
        fine-tunes, the best epoch's weights beside it."""
        m, p = self.model, self.plan
        weights = m.params * m.weight_bytes
        keep = p.train.checkpoint_optimizer
        keep = (m.params <= 1_000_000_000) if keep == "auto" else keep
        optimizer = 0
        if keep:
            moments = 8 if "adamw" in (p.phases.finetune.optimizer, p.phases.forget.optimizer) else 0
            master = 4 if p.train.precision in ("fp16", "bf16") and p.train.engine == "deepspeed" else 0
            optimizer = m.params * (moments + master)
        if p.train.checkpoint == "none":
            return {"peak": 0, "kept": 0}
        return {"peak": 2 * weights + optimizer, "kept": weights + optimizer}


@dataclass
class SweepCost:
    spec: SweepSpec
    trials: list[TrialCost]
    epochs_from: str
    store_row_bytes: float
    hidden_row_bytes: dict[str, float] = field(default_factory=dict)
    estimated_tasks: list[str] = field(default_factory=list)  # no data here: sized from the others

    def total(self, what: str, bound: str) -> float:
        if what == "trained":
            return sum(sum(t.trained_tokens(bound).values()) for t in self.trials)
        if what == "scored":
            return sum(t.scored_tokens(bound) for t in self.trials)
        if what == "rows":
            return sum(t.rows(bound) for t in self.trials)
        if what == "hidden_rows":
            return sum(t.hidden_rows(bound) for t in self.trials)
        if what == "flops":
            return sum(sum(t.flops(bound).values()) for t in self.trials)
        raise KeyError(what)

    def store_bytes(self, bound: str) -> float:
        hidden = sum(t.hidden_rows(bound) * self.hidden_row_bytes[t.model.name] for t in self.trials)
        return self.total("rows", bound) * self.store_row_bytes + hidden


def scheduled_epochs(scoring: ScoringConfig, phase: str, epochs: float) -> float:
    """Epochs of a phase of `epochs` epochs at which the other evaluation tasks are scored:
    those on the schedule, and the phase's milestone when it is not one of them. Forget and
    relearn end at their milestone; fine-tuning's (the best-validation epoch) is known only
    when it ends, so it counts as off the schedule unless every epoch is on it."""
    n = math.ceil(epochs)
    if n == 0:
        return 0.0
    on = sum(scoring.scores_others_at(e) for e in range(1, n + 1))
    milestone_on = on == n if phase == "finetune" else scoring.scores_others_at(n)
    return float(on + (0 if milestone_on else 1))


def phase_epochs(plan: TrialPlan, expected: dict[str, float] | None) -> dict[str, dict[str, float]]:
    phases = {"finetune": plan.phases.finetune}
    if METHODS.get(plan.method).forgets:  # a reference (`none`) stops after fine-tuning
        phases["forget"] = plan.phases.forget
        if plan.phases.relearn.enabled:
            phases["relearn"] = plan.phases.relearn
    upper = {ph: float(cfg.max_epochs) for ph, cfg in phases.items()}
    exp = {
        ph: min(upper[ph], (expected or {}).get(ph, max(1.0, round(DEFAULT_EXPECTED_FRACTION * upper[ph]))))
        for ph in phases
    }
    return {"upper": upper, "expected": exp}


def trial_slices(plan: TrialPlan, data: dict[str, PreparedTask]) -> list[tuple[str, str, list[Example]]]:
    """(task, split, examples) in the order the trial scores them."""
    train_set = data[plan.forget_task].split("train")[: plan.size] if plan.forget_task in data else []
    forget_splits = list(dict.fromkeys([*plan.scoring.splits, "train", "validation", "test"]))
    out = []
    for task in dict.fromkeys([plan.forget_task, *plan.eval_tasks]):
        for split in forget_splits if task == plan.forget_task else plan.scoring.splits:
            examples = (
                train_set
                if (task, split) == (plan.forget_task, "train")
                else data[task].splits.get(split, [])
                if task in data
                else []
            )
            out.append((task, split, examples))
    return out


def planned_trials(spec: SweepSpec, data: dict[str, PreparedTask]) -> list[TrialPlan]:
    """The spec's trials; a task whose data cannot be read here stands in as an empty one
    (only its trials' ids are then not the ones a run would give)."""
    empty = {t: PreparedTask(t, {}, PrepReport(t, "not readable here")) for t in spec.tasks if t not in data}
    return spec.trials({**data, **empty})


def estimate(
    spec: SweepSpec,
    data: dict[str, PreparedTask],
    shapes: dict[str, ModelShape],
    tokenizers: dict,
    expected: dict[str, float] | None = None,
    epochs_from: str = "",
) -> SweepCost:
    """Count every trial of `spec` on its prepared data; each (model, task, split) is
    tokenized once however many trials read it."""
    missing = [t for t in spec.tasks if t not in data]
    no_train = {t for t in spec.trained_task_list if t in data and not data[t].splits.get("train")}
    plans = planned_trials(spec, data)

    def sized_from_others(plan: TrialPlan, task: str, split: str) -> bool:
        trained = (plan.forget_task, plan.phases.relearn.task if plan.phases.relearn.enabled else None)
        return task in missing or (split == "train" and task in no_train and task in trained)

    slice_cache: dict[tuple, SliceTokens] = {}
    train_cache: dict[tuple, TrainTokens] = {}
    for plan in plans:  # what can be counted first: the rest is sized from it
        shape, tok = shapes[plan.model.name], tokenizers[plan.model.name]
        for task, split, examples in trial_slices(plan, data):
            key = (plan.model.name, task, split, len(examples))
            if key not in slice_cache and not sized_from_others(plan, task, split):
                slice_cache[key] = SliceTokens.count(task, split, examples, tok, shape.max_length)
        tkey = (plan.model.name, plan.forget_task, plan.size)
        if tkey not in train_cache and not sized_from_others(plan, plan.forget_task, "train"):
            train_cache[tkey] = TrainTokens.count(
                data[plan.forget_task].split("train")[: plan.size], tok, shape.max_length
            )
    trials = []
    pretrained_done: set[tuple] = set()  # (model, task, split, examples) scored by an earlier trial
    for plan in plans:
        counted = [v for k, v in slice_cache.items() if k[0] == plan.model.name]
        slices, pretrained = [], []
        for task, split, examples in trial_slices(plan, data):
            key = (plan.model.name, task, split, len(examples))
            if sized_from_others(plan, task, split):
                n = plan.size if (task, split) == (plan.forget_task, "train") else spec.data.cap
                slices.append(_stand_in_slice(task, split, n, counted))
                key = (plan.model.name, task, split, n)
            else:
                slices.append(slice_cache[key])
            if key not in pretrained_done:
                pretrained_done.add(key)
                pretrained.append(slices[-1])
        tkey = (plan.model.name, plan.forget_task, plan.size)
        if tkey not in train_cache:
            train_cache[tkey] = _stand_in_train(
                plan.size, [v for k, v in train_cache.items() if k[0] == plan.model.name]
            )
        relearn, r = None, plan.phases.relearn
        source, k = r.task or plan.forget_task, r.examples or plan.size
        if r.enabled and (source != plan.forget_task or k < plan.size):
            rkey = (plan.model.name, source, k)
            if rkey not in train_cache:
                train_cache[rkey] = (
                    _stand_in_train(k, [train_cache[tkey]])
                    if sized_from_others(plan, source, "train")
                    else TrainTokens.count(
                        data[source].split("train")[:k],
                        tokenizers[plan.model.name],
                        shapes[plan.model.name].max_length,
                    )
                )
            relearn = train_cache[rkey]
        trials.append(
            TrialCost(
                plan,
                slices,
                train_cache[tkey],
                phase_epochs(plan, expected),
                shapes[plan.model.name],
                relearn,
                pretrained,
            )
        )
    hidden_bytes = {name: hidden_row_bytes(s.hidden) for name, s in shapes.items()}
    return SweepCost(
        spec,
        trials,
        epochs_from or f"{DEFAULT_EXPECTED_FRACTION:.0%} of each phase's max_epochs (an assumption)",
        scores_row_bytes(),
        hidden_bytes,
        sorted({*missing, *no_train}),
    )


def _per_example(counted: list, n: int, fields: tuple[str, ...]) -> dict[str, int]:
    total = sum(c.examples for c in counted)
    if not total:
        raise BadInput("plan: no task's data could be read, so nothing to estimate the missing tasks from")
    return {f: int(round(sum(getattr(c, f) for c in counted) / total * n)) for f in fields}


def _stand_in_slice(task: str, split: str, n: int, counted: list[SliceTokens]) -> SliceTokens:
    """A task whose data is not reachable here: `n` examples of the loaded tasks' mean size."""
    return SliceTokens(task, split, n, **_per_example(counted, n, ("scored", "answer", "squared")))


def _stand_in_train(n: int, counted: list[TrainTokens]) -> TrainTokens:
    return TrainTokens(n, **_per_example(counted, n, ("gold", "distractor", "upper", "squared")))


def _parquet_bytes_per_row(table: pa.Table) -> float:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.tell() / table.num_rows


def scores_row_bytes(rows: int = 20_000) -> float:
    """Bytes per score row as the store writes them, measured on one epoch-shaped table
    (sorted keys, varied floats): compression depends on the values, so it is written, not guessed."""
    rng = np.random.default_rng(0)
    ll = rng.normal(-20, 8, size=(rows, 4)).astype(np.float32)
    gold = rng.integers(0, 2, rows).astype(np.int8)
    cols = {
        "sweep": pa.array(["sweep"] * rows),
        "trial_id": pa.array(["task-random-n1000-s0-0123456789"] * rows),
        "phase": pa.array(["forget"] * rows),
        "epoch": pa.array(np.full(rows, 7, np.int32)),
        "eval_task": pa.array([f"task{i * 21 // rows}" for i in range(rows)]),
        "split": pa.array([SPLITS[i * 3 // rows] for i in range(rows)]),
        "example_idx": pa.array(np.arange(rows, dtype=np.int32) % 1000),
        "gold": pa.array(gold),
        "ll_sum_correct": pa.array(ll[:, 0]),
        "ll_sum_distractor": pa.array(ll[:, 1]),
        "ll_mean_correct": pa.array(ll[:, 2] / 5),
        "ll_mean_distractor": pa.array(ll[:, 3] / 5),
        "n_tokens_correct": pa.array(rng.integers(1, 12, rows).astype(np.int16)),
        "n_tokens_distractor": pa.array(rng.integers(1, 12, rows).astype(np.int16)),
        "confidence": pa.array(rng.random(rows).astype(np.float32)),
        "prediction": pa.array(rng.integers(0, 2, rows).astype(np.int8)),
        "correct": pa.array(rng.random(rows) < 0.7),
        **{
            f"min_k{pp}_{side}": pa.array(-rng.exponential(3.0, rows).astype(np.float32))
            for pp in ("", "_pp")
            for side in ("correct", "distractor")
        },
    }
    return _parquet_bytes_per_row(pa.table(cols, schema=SCORES_SCHEMA))


def hidden_row_bytes(dim: int) -> float:
    """Three float32 vectors per (example, layer) row: random states do not compress, nor do real ones much."""
    return 3 * 4 * dim + 40


def makespan(durations: list[float], slots: int) -> float:
    """Wall time of running `durations` on `slots` parallel slots, longest first (what a
    scheduler that starts the next trial as one ends achieves within 4/3 of the best)."""
    if not durations:
        return 0.0
    loads = [0.0] * max(1, slots)
    for d in sorted(durations, reverse=True):
        i = int(np.argmin(loads))
        loads[i] += d
    return max(loads)


def human(n: float, unit: str = "") -> str:
    if n == 0:
        return f"0{unit}"
    prefixes = ["", "k", "M", "G", "T", "P", "E"]
    k = min(len(prefixes) - 1, max(0, int(math.log10(abs(n)) // 3)))
    return f"{n / 1000**k:.3g} {prefixes[k]}{unit}".rstrip()


def human_bytes(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    k = min(len(units) - 1, max(0, int(math.log(max(n, 1), 1024))))
    return f"{n / 1024**k:.3g} {units[k]}"
