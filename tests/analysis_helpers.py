"""Hand-built stores whose analysis answers are known in advance.

Every score row is written through `Store.commit_epoch` in the store's own schemas. An
example's confidence decides everything else: correct = confidence > 0.5, gold alternates
with the example index, the log-likelihoods are consistent with the confidence.

The *rich* store (see `build_rich_store`):
- condition m1 / random / n=100, four forget tasks t0..t3, each trial evaluated on all four
  tasks. Test split of 16 examples: acc 0.5 pretrained (e0), 1.0 at the best finetune epoch
  (e2; e1 and e3 have 12/16 to catch a wrong milestone), and 16 - 8 * R[forget][eval]
  correct at the last forget epoch (e5; e1..e4 have 15/16), so the forget ratio matrix is R.
- the finetuned test confidence of trial t_i is FT_CONF[i] on every eval task.
- hidden states (forget task only, at every milestone, layer -5): at finetuned / forgotten
  the prompt state's column 0 is +-(1 + i) by gold, the rest 0 (so the total variance of the
  120 train states is 120 (1 + i)^2 / 119), and the pair states' column 1 is +1 for the
  correct answer and -1 for the distractor (a pair probe is perfect); pretrained states are
  gold-independent noise.
- relearn (epochs 1..5) for t0 and t1, whose train examples are all learned (0.9) at the
  finetuned milestone. t0's train examples i < 110 are forgotten at epoch 1 + i % 5 and
  learned at 5 - i % 5 (Spearman -1); i >= 110 are never forgotten (still 0.9 when relearning
  starts, so not relearnable either). t1 has only 50 examples both forgotten and learned.
- one trial each of m1 / flipped / n=100 (acc 0.75 -> 0.375: flipped ratio 0.75),
  m1 / random / n=1000 (1.0 -> 0.75: ratio 0.5) and m2 / random / n=100 (1.0 -> 1.0:
  ratio 0; hidden width 3 instead of 4), all forgetting t0 and evaluated on t0 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from raysweep.store import EPOCHS_SCHEMA, SCORES_SCHEMA, EpochKey, EpochRecord, Store, hidden_schema

SWEEP = "s1"
TASKS = ["t0", "t1", "t2", "t3"]
N = {"train": 120, "validation": 16, "test": 16}
R = np.array(
    [
        [0.25, 1.0, 1.0, 0.25],
        [1.0, 0.25, 0.0, 0.875],
        [0.25, 1.0, 1.0, 0.375],
        [0.75, 0.0, 0.25, 1.0],
    ]
)
# UPGMA orders of R worked out by hand: rows {t0,t2} merge at 0.125, {t1,t3} at 0.45;
# columns {t0,t3} at 0.31, {t1,t2} at 0.35.
ROW_ORDER = ["t0", "t2", "t1", "t3"]
COL_ORDER = ["t0", "t3", "t1", "t2"]
FT_CONF = [0.9, 0.7, 0.8, 0.6]
ORDER_KEPT = 110


def conf_k_of_n(k: int, n: int, hi: float = 0.8, lo: float = 0.3) -> list[float]:
    return [hi] * k + [lo] * (n - k)


def scores_table(key: EpochKey, rows: dict[tuple[str, str], list[float]]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in SCORES_SCHEMA}
    for (task, split), confs in sorted(rows.items()):
        for i, c in enumerate(confs):
            gold = i % 2
            correct = c > 0.5
            cols["sweep"].append(key.sweep)
            cols["trial_id"].append(key.trial_id)
            cols["phase"].append(key.phase)
            cols["epoch"].append(key.epoch)
            cols["eval_task"].append(task)
            cols["split"].append(split)
            cols["example_idx"].append(i)
            cols["gold"].append(gold)
            cols["ll_mean_correct"].append(math.log(c))
            cols["ll_mean_distractor"].append(math.log(1 - c))
            cols["ll_sum_correct"].append(3 * math.log(c))
            cols["ll_sum_distractor"].append(3 * math.log(1 - c))
            cols["n_tokens_correct"].append(3)
            cols["n_tokens_distractor"].append(3)
            cols["confidence"].append(c)
            cols["prediction"].append(gold if correct else 1 - gold)
            cols["correct"].append(correct)
            # Three tokens of log-probability log(c) each: Min-K% is log(c); Min-K%++ a
            # monotone function of it, as standardising against a fixed distribution would be.
            cols["min_k_correct"].append(math.log(c))
            cols["min_k_distractor"].append(math.log(1 - c))
            cols["min_k_pp_correct"].append(2 * math.log(c) + 1)
            cols["min_k_pp_distractor"].append(2 * math.log(1 - c) + 1)
    return pa.table(cols, schema=SCORES_SCHEMA)


@dataclass(frozen=True)
class SplitStates:
    """One split's states, (n, dim) each: last prompt token, and the last token of prompt +
    correct choice / prompt + distractor."""

    prompt: np.ndarray
    correct: np.ndarray
    distractor: np.ndarray


def hidden_table(key: EpochKey, task: str, states: dict[str, SplitStates], layers: tuple[int, ...] = (-5,)) -> pa.Table:
    dim = next(iter(states.values())).prompt.shape[1]
    names = ("sweep", "trial_id", "phase", "epoch", "eval_task", "split", "example_idx", "layer")
    rows: dict[str, list] = {n: [] for n in names}
    vecs: dict[str, list] = {"hidden": [], "hidden_correct": [], "hidden_distractor": []}
    for layer in layers:
        for split, x in sorted(states.items()):
            for i in range(x.prompt.shape[0]):
                for n, v in zip(names, (key.sweep, key.trial_id, key.phase, key.epoch, task, split, i, layer)):
                    rows[n].append(v)
                vecs["hidden"].append(x.prompt[i])
                vecs["hidden_correct"].append(x.correct[i])
                vecs["hidden_distractor"].append(x.distractor[i])
    arrays = {
        n: pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(v).astype(np.float32)), dim)
        for n, v in vecs.items()
    }
    return pa.table({**rows, **arrays}, schema=hidden_schema(dim))


@dataclass
class TrialSpec:
    trial_id: str
    model: str
    forget_task: str
    method: str = "random"
    size: int = 100
    seed: int = 0
    eval_tasks: list[str] = field(default_factory=lambda: list(TASKS))
    status: str = "done"


class TrialWriter:
    """Writes one trial epoch by epoch; unspecified (task, split) cells get half correct."""

    def __init__(
        self,
        store: Store,
        spec: TrialSpec,
        splits: tuple[str, ...] = ("train", "validation", "test"),
        sweep: str = SWEEP,
    ):
        self.store, self.spec, self.splits, self.sweep = store, spec, splits, sweep

    def epoch(
        self,
        phase: str,
        epoch: int,
        cells: dict[tuple[str, str], list[float]] | None = None,
        hidden: dict[str, SplitStates] | pa.Table | None = None,
    ) -> None:
        key = EpochKey(self.sweep, self.spec.trial_id, phase, epoch)
        rows = {(t, s): conf_k_of_n(N[s] // 2, N[s]) for t in self.spec.eval_tasks for s in self.splits}
        rows.update(cells or {})
        summary = pa.table(
            {
                "sweep": [self.sweep],
                "trial_id": [self.spec.trial_id],
                "phase": [phase],
                "epoch": [epoch],
                "train_loss": [0.0],
                "forget_train_acc": [0.5],
                "forget_validation_acc": [0.5],
                "forget_test_acc": [0.5],
                "seconds": [0.1],
            },
            schema=EPOCHS_SCHEMA,
        )
        h = hidden
        if hidden is not None and not isinstance(hidden, pa.Table):
            h = hidden_table(key, self.spec.forget_task, hidden)
        self.store.commit_epoch(EpochRecord(key=key, scores=scores_table(key, rows), epoch_summary=summary, hidden=h))

    def finish(self, best_finetune: int | None, last_forget: int | None, last_relearn: int | None = None) -> None:
        s = self.spec
        self.store.write_trial_row(
            dict(
                sweep=self.sweep,
                trial_id=s.trial_id,
                model=s.model,
                model_source="builtin",
                forget_task=s.forget_task,
                method=s.method,
                size=s.size,
                seed=s.seed,
                status=s.status,
                attempts=1,
                best_finetune_epoch=best_finetune,
                last_forget_epoch=last_forget,
                last_relearn_epoch=last_relearn,
            )
        )


def _states(task_index: int, dim: int, informative: bool, seed: int) -> dict[str, SplitStates]:
    """Informative: the prompt state's column 0 is +-(1 + i) by gold (the total variance is
    known), and the pair states' column 1 is +1 for the correct answer, -1 for the
    distractor (a pair probe is perfect). Otherwise every state is gold-independent noise."""
    out = {}
    rng = np.random.default_rng(seed)
    for split, n in N.items():
        gold = np.arange(n) % 2
        if informative:
            prompt, correct, distractor = np.zeros((n, dim)), np.zeros((n, dim)), np.zeros((n, dim))
            prompt[:, 0] = (2 * gold - 1) * (1 + task_index)
            correct[:, 1], distractor[:, 1] = 1.0, -1.0
        else:
            prompt, correct, distractor = (rng.normal(size=(n, dim)) for _ in range(3))
        out[split] = SplitStates(prompt, correct, distractor)
    return out


def expected_variance(task_index: int) -> float:
    return N["train"] * (1 + task_index) ** 2 / (N["train"] - 1)


def _order_confs(phase: str, epoch: int, n_kept: int) -> list[float]:
    out = []
    for i in range(N["train"]):
        if phase == "forget":
            if i >= n_kept:
                out.append(0.9)
            else:
                out.append(0.9 if epoch < 1 + i % 5 else 0.4)
        else:
            out.append(0.3 if epoch < 5 - i % 5 else 0.8)
    return out


def _write_forgetting_trial(
    store: Store,
    spec: TrialSpec,
    *,
    ft_test_k: int,
    ft_conf: float,
    forget_test_k: dict[str, int],
    dim: int,
    task_index: int,
    order_kept: int | None = None,
    hidden: bool = True,
    sweep: str = SWEEP,
) -> None:
    w = TrialWriter(store, spec, sweep=sweep)
    ft = spec.forget_task
    w.epoch(
        "pretrained",
        0,
        {(t, "test"): conf_k_of_n(8, 16) for t in spec.eval_tasks},
        hidden=_states(task_index, dim, False, seed=task_index) if hidden else None,
    )
    for e in (1, 2, 3):
        if e == 2:
            cells = {(t, "test"): conf_k_of_n(ft_test_k, 16, hi=ft_conf) for t in spec.eval_tasks}
            if order_kept is not None:
                # Every train example learned at the finetuned milestone: all may be forgotten.
                cells[(ft, "train")] = [0.9] * N["train"]
        else:
            cells = {(t, "test"): conf_k_of_n(12, 16) for t in spec.eval_tasks}
        w.epoch("finetune", e, cells, hidden=_states(task_index, dim, True, 0) if (hidden and e == 2) else None)
    for e in range(1, 6):
        if e == 5:
            cells = {(t, "test"): conf_k_of_n(forget_test_k[t], 16) for t in spec.eval_tasks}
        else:
            cells = {(t, "test"): conf_k_of_n(15, 16) for t in spec.eval_tasks}
        if order_kept is not None:
            cells[(ft, "train")] = _order_confs("forget", e, order_kept)
        w.epoch("forget", e, cells, hidden=_states(task_index, dim, True, 0) if (hidden and e == 5) else None)
    last_relearn = None
    if order_kept is not None:
        for e in range(1, 6):
            w.epoch("relearn", e, {(ft, "train"): _order_confs("relearn", e, order_kept)})
        last_relearn = 5
    w.finish(best_finetune=2, last_forget=5, last_relearn=last_relearn)


def build_rich_store(root: Path, sweeps: tuple[str, ...] = (SWEEP,)) -> Store:
    """The rich store; with several `sweeps`, every trial is written once into each (what
    overlapping specs leave behind: the same trial ids under several sweep names)."""
    store = Store(root)
    store.ensure()
    for sw in sweeps:
        for i, task in enumerate(TASKS):
            spec = TrialSpec(f"{task}-random-n100-s0", "m1", task)
            k = {t: int(16 - 8 * R[i][j]) for j, t in enumerate(TASKS)}
            kept = {0: ORDER_KEPT, 1: 50}.get(i)
            _write_forgetting_trial(
                store,
                spec,
                ft_test_k=16,
                ft_conf=FT_CONF[i],
                forget_test_k=k,
                dim=4,
                task_index=i,
                order_kept=kept,
                sweep=sw,
            )
        extras = [
            (TrialSpec("t0-flipped-n100-s0", "m1", "t0", method="flipped", eval_tasks=["t0"]), 12, 6, 4),
            (TrialSpec("t0-random-n1000-s0", "m1", "t0", size=1000, eval_tasks=["t0"]), 16, 12, 4),
            (TrialSpec("t0-random-n100-s0-m2", "m2", "t0", eval_tasks=["t0"]), 16, 16, 3),
        ]
        for spec, ft_k, fg_k, dim in extras:
            _write_forgetting_trial(
                store, spec, ft_test_k=ft_k, ft_conf=0.8, forget_test_k={"t0": fg_k}, dim=dim, task_index=0, sweep=sw
            )
        # A trial that never finished: analyses must ignore it.
        unfinished = TrialSpec("t1-random-n100-s9", "m1", "t1", seed=9, status="running")
        TrialWriter(store, unfinished, sweep=sw).finish(None, None)
    return store


def build_minimal_store(root: Path, *, with_forget: bool = True) -> Store:
    """One model, one size, random labels, the forget task evaluated alone, test split only,
    no hidden states, no relearn: most analyses have nothing to work with."""
    store = Store(root)
    store.ensure()
    spec = TrialSpec("t0-random-n100-s0", "m1", "t0", eval_tasks=["t0"])
    w = TrialWriter(store, spec, splits=("test",))
    w.epoch("pretrained", 0, {("t0", "test"): conf_k_of_n(8, 16)})
    w.epoch("finetune", 1, {("t0", "test"): conf_k_of_n(16, 16)})
    if with_forget:
        w.epoch("forget", 1, {("t0", "test"): conf_k_of_n(14, 16)})
    w.finish(best_finetune=1, last_forget=1 if with_forget else None)
    return store


def build_cross_store(root) -> Store:
    """Forget a or b, both evaluated on a and b. Fine-tuned accuracy on b is 17/32 (headroom
    1/32 < 0.05) in a's trial and 32/32 in b's own; on a it is 32/32 everywhere."""
    store = Store(root)
    store.ensure()
    ft = {("a", "a"): 32, ("a", "b"): 17, ("b", "a"): 32, ("b", "b"): 32}
    fg = {("a", "a"): 16, ("a", "b"): 16, ("b", "a"): 24, ("b", "b"): 16}
    for forget in ("a", "b"):
        w = TrialWriter(store, TrialSpec(f"{forget}-s0", "m1", forget, eval_tasks=["a", "b"]), splits=("test",))
        w.epoch("pretrained", 0, {(t, "test"): [0.8] * 16 + [0.3] * 16 for t in "ab"})
        w.epoch("finetune", 1, {(t, "test"): [0.8] * ft[(forget, t)] + [0.3] * (32 - ft[(forget, t)]) for t in "ab"})
        w.epoch("forget", 1, {(t, "test"): [0.8] * fg[(forget, t)] + [0.3] * (32 - fg[(forget, t)]) for t in "ab"})
        w.finish(best_finetune=1, last_forget=1)
    return store
