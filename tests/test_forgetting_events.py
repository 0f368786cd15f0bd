"""Forgetting events (Toneva et al.) on hand-built stores whose counts are known: each
example's correct / incorrect sequence per phase is written out below, and the analysis must
count its events from the state the phase starts from."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from raysweep.analysis import run_analyses
from raysweep.store import Store
from tests.analysis_helpers import TrialSpec, TrialWriter

# Per example (rows), the forget task's test split: pretrained, finetune e1..e3 (best: e2).
FINETUNE = np.array(
    [
        [0, 1, 1, 0],
        [0, 0, 1, 0],  # the best epoch (e2) is correct, the last (e3) is not
        [0, 0, 0, 0],
        [1, 0, 0, 1],
        [1, 1, 1, 1],
        [0, 1, 1, 1],
    ]
)
# Forget epochs 1..4; the phase starts from FINETUNE[:, 2] (the best epoch).
FORGET = np.array(
    [
        [0, 1, 0, 0],  # from 1: 1 -> 0 -> 1 -> 0 -> 0: two forgetting events, one learning
        [1, 1, 1, 1],  # never forgotten (from e3 it would have a learning event)
        [0, 0, 0, 0],  # never learned
        [1, 1, 1, 1],  # learned at forget epoch 1, never forgotten after
        [0, 0, 0, 0],  # one event
        [1, 1, 1, 0],  # one event
    ]
)
FORGET_EVENTS = [2, 0, 0, 0, 1, 1]
FORGET_LEARNING = [1, 0, 0, 1, 0, 0]
UNFORGETTABLE = [False, True, False, True, False, False]
FINETUNE_EVENTS = [1, 1, 0, 1, 0, 0]  # e3 forgets example 1 (after the best epoch)


def _conf(bits) -> list[float]:
    return [0.8 if b else 0.3 for b in bits]


def _write(store: Store, trial_id: str, forget_task: str, method: str, seed: int, forget: np.ndarray) -> None:
    spec = TrialSpec(trial_id, "m1", forget_task, method=method, seed=seed, eval_tasks=["t0", "t1"])
    w = TrialWriter(store, spec, splits=("test",))
    w.epoch("pretrained", 0, {(t, "test"): _conf(FINETUNE[:, 0]) for t in spec.eval_tasks})
    for e in (1, 2, 3):
        w.epoch("finetune", e, {(t, "test"): _conf(FINETUNE[:, e]) for t in spec.eval_tasks})
    for e in range(1, 5):
        w.epoch("forget", e, {(t, "test"): _conf(forget[:, e - 1]) for t in spec.eval_tasks})
    w.finish(best_finetune=2, last_forget=4)


def _store(tmp_path, trials) -> Store:
    store = Store(tmp_path / "store")
    store.ensure()
    for t in trials:
        _write(store, *t)
    return store


def test_events_per_example_are_counted_from_the_state_each_phase_starts_from(tmp_path):
    store = _store(tmp_path, [("a", "t0", "random", 0, FORGET)])
    (o,) = run_analyses(store, only=["forgetting_events"], engine="local")
    assert o.status == "ok", o.message
    ex = o.tables["examples"]
    # Its labels are dictionary-encoded (one dictionary per trial); decoded, they sort.
    assert pa.types.is_dictionary(ex.schema.field("eval_task").type)
    ex = ex.cast(
        pa.schema([(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in ex.schema])
    )
    own = ex.filter(pc.equal(ex["eval_task"], "t0")).sort_by([("phase", "ascending"), ("example_idx", "ascending")])
    forget = own.filter(pc.equal(own["phase"], "forget")).to_pydict()
    assert forget["forgetting_events"] == FORGET_EVENTS
    assert forget["learning_events"] == FORGET_LEARNING
    assert forget["unforgettable"] == UNFORGETTABLE
    assert forget["never_learned"] == [False, False, True, False, False, False]
    assert forget["start_correct"] == [bool(b) for b in FINETUNE[:, 2]]
    assert forget["n_steps"] == [5] * 6
    finetune = own.filter(pc.equal(own["phase"], "finetune")).to_pydict()
    assert finetune["forgetting_events"] == FINETUNE_EVENTS
    assert finetune["start_correct"] == [bool(b) for b in FINETUNE[:, 0]]

    summary = (
        o.tables["summary"]
        .filter(
            pc.and_(pc.equal(o.tables["summary"]["phase"], "forget"), pc.equal(o.tables["summary"]["eval_task"], "t0"))
        )
        .to_pylist()
    )
    (row,) = summary
    assert row["own_task"] and row["n_examples"] == 6 and row["n_seeds"] == 1 and row["interval"] == "bootstrap95"
    assert row["mean_forgetting_events"] == pytest.approx(4 / 6)
    assert row["unforgettable_frac"] == pytest.approx(2 / 6) and row["never_learned_frac"] == pytest.approx(1 / 6)
    assert row["unforgettable_frac_lo"] <= 2 / 6 <= row["unforgettable_frac_hi"]


def test_seeds_are_replicates_and_overlap_is_the_jaccard_of_unforgettable_sets(tmp_path):
    flipped = FORGET.copy()
    flipped[1] = [1, 0, 0, 0]  # example 1 is forgotten under this method: sets {1, 3} vs {3}
    other_task = FORGET.copy()
    other_task[5] = [1, 1, 1, 1]  # example 5 survives: {1, 3, 5}
    store = _store(
        tmp_path,
        [
            ("a0", "t0", "random", 0, FORGET),
            ("a1", "t0", "random", 1, FORGET),
            ("f0", "t0", "flipped", 0, flipped),
            ("f1", "t0", "flipped", 1, FORGET),
            ("b0", "t1", "random", 0, other_task),
        ],
    )
    (o,) = run_analyses(store, only=["forgetting_events"], engine="local")
    assert o.status == "ok", o.message
    s = {(r["method"], r["forget_task"], r["eval_task"], r["phase"]): r for r in o.tables["summary"].to_pylist()}
    random_t0 = s[("random", "t0", "t0", "forget")]
    # Two seeds: the mean over seeds with a t-interval (both seeds equal here: zero width).
    assert random_t0["n_seeds"] == 2 and random_t0["interval"] == "seeds-t95" and random_t0["n_trials"] == 2
    assert random_t0["unforgettable_frac"] == pytest.approx(2 / 6)
    assert random_t0["unforgettable_frac_lo"] == pytest.approx(2 / 6) and random_t0[
        "unforgettable_frac_hi"
    ] == pytest.approx(2 / 6)
    mixed = s[("flipped", "t0", "t0", "forget")]
    assert (
        mixed["unforgettable_frac"] == pytest.approx((1 / 6 + 2 / 6) / 2)
        and mixed["unforgettable_frac_lo"] < mixed["unforgettable_frac"]
    )
    assert not s[("random", "t1", "t0", "forget")]["own_task"]

    ov = {(r["axis"], r["fixed"], r["a"], r["b"], r["eval_task"]): r for r in o.tables["overlap"].to_pylist()}
    by_method = ov[("method", "t0", "flipped", "random", "t0")]
    # seed 0: {3} vs {1, 3} -> 1/2; seed 1: identical -> 1; mean 3/4 over the two seeds.
    assert by_method["n_seeds"] == 2 and by_method["jaccard"] == pytest.approx(0.75)
    assert by_method["n_both"] == 1 + 2 and by_method["n_examples"] == 12
    by_task = ov[("forget_task", "random", "t0", "t1", "t0")]
    # Only seed 0 has both forget tasks: {1, 3} vs {1, 3, 5} -> 2/3, bootstrapped over examples.
    assert by_task["n_seeds"] == 1 and by_task["interval"] == "bootstrap95"
    assert by_task["jaccard"] == pytest.approx(2 / 3) and by_task["jaccard_lo"] <= 2 / 3 <= by_task["jaccard_hi"]


def test_engines_agree_and_a_store_without_phases_is_skipped(tmp_path):
    store = _store(tmp_path, [("a", "t0", "random", 0, FORGET), ("b", "t1", "random", 0, FORGET)])
    (local,) = run_analyses(store, only=["forgetting_events"], engine="local")
    (ray,) = run_analyses(store, only=["forgetting_events"], engine="ray")
    for name, table in local.tables.items():
        assert ray.tables[name].equals(table), name

    empty = Store(tmp_path / "empty")
    empty.ensure()
    (o,) = run_analyses(empty, only=["forgetting_events"], engine="local")
    assert o.status == "skipped"


def _examples_of(trial: dict, places: list[tuple[str, str, str]], rng: np.random.Generator, n: int) -> pa.Table:
    """An EXAMPLE_SCHEMA chunk as `trial_events` builds one: a trial's labels dictionary-encoded
    with a dictionary of its own (here in an order of its own, too)."""
    from raysweep.analysis.forgetting_events import EXAMPLE_SCHEMA

    rows = []
    for phase, task, split in places:
        events = rng.integers(0, 4, n)
        never = rng.random(n) < 0.1
        for i in range(n):
            rows.append(
                {
                    **trial,
                    "phase": phase,
                    "eval_task": task,
                    "split": split,
                    "example_idx": i,
                    "n_steps": 5,
                    "forgetting_events": int(events[i]),
                    "learning_events": 0,
                    "start_correct": True,
                    "end_correct": False,
                    "unforgettable": bool(events[i] == 0 and not never[i]),
                    "never_learned": bool(never[i]),
                }
            )
    plain = pa.schema(
        [(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in EXAMPLE_SCHEMA]
    )
    return pa.Table.from_pylist(rows[::-1], schema=plain).cast(EXAMPLE_SCHEMA)


def _trial(trial_id: str, forget_task: str, seed: int, method: str = "random") -> dict:
    return dict(sweep="s", trial_id=trial_id, model="m1", forget_task=forget_task, method=method, size=10, seed=seed)


def test_summary_and_overlap_over_per_trial_dictionaries_match_a_plain_computation():
    """The summary and the overlap read tens of millions of example rows through integer codes
    and resample counts, not examples: they must give what pooling the rows plainly gives."""
    from raysweep.analysis.forgetting_events import overlap_table, summary_table

    rng = np.random.default_rng(7)
    places = [("forget", "t1", "test"), ("forget", "t0", "test"), ("finetune", "t0", "train")]
    ex = pa.concat_tables(
        [
            _examples_of(_trial("a0", "t0", 0), places, rng, 40),
            _examples_of(_trial("a1", "t0", 1), places[::-1], rng, 40),
            _examples_of(_trial("b0", "t1", 0), places[:2], rng, 40),
        ]
    )
    assert ex["eval_task"].num_chunks == 3
    summary = {
        (r["forget_task"], r["phase"], r["eval_task"], r["split"]): r for r in summary_table(ex, 4000).to_pylist()
    }
    rows = ex.to_pylist()
    for key, got in summary.items():
        mine = [r for r in rows if (r["forget_task"], r["phase"], r["eval_task"], r["split"]) == key]
        assert got["n_examples"] == len(mine) and got["n_trials"] == len({r["trial_id"] for r in mine})
        assert got["never_learned_frac"] == pytest.approx(np.mean([r["never_learned"] for r in mine]))
        per_seed = {s: [r["forgetting_events"] for r in mine if r["seed"] == s] for s in {r["seed"] for r in mine}}
        if len(per_seed) == 2:  # t0's trials: the mean of the two seeds' means
            assert got["interval"] == "seeds-t95"
            assert got["mean_forgetting_events"] == pytest.approx(np.mean([np.mean(v) for v in per_seed.values()]))
        else:  # one seed: bootstrapped; the bounds of index resampling, within resampling noise
            (v,) = per_seed.values()
            v = np.array(v, float)
            idx = np.random.default_rng(0).integers(0, v.size, (4000, v.size))
            lo, hi = np.percentile(v[idx].mean(axis=1), [2.5, 97.5])
            assert got["interval"] == "bootstrap95" and got["mean_forgetting_events"] == pytest.approx(v.mean())
            assert got["mean_forgetting_events_lo"] == pytest.approx(lo, abs=0.05)
            assert got["mean_forgetting_events_hi"] == pytest.approx(hi, abs=0.05)
    assert len(summary) == 3 + 2

    overlap = {(r["eval_task"], r["split"]): r for r in overlap_table(ex, 4000).to_pylist()}
    assert set(overlap) == {("t0", "test"), ("t1", "test")}  # seed 0 forgot t0 and t1; t0/train only once
    for (task, split), got in overlap.items():

        def unforgettable(trial_id: str) -> set[int]:
            return {
                r["example_idx"]
                for r in rows
                if (r["trial_id"], r["phase"], r["eval_task"], r["split"]) == (trial_id, "forget", task, split)
                and r["unforgettable"]
            }

        a, b = unforgettable("a0"), unforgettable("b0")
        assert (got["axis"], got["a"], got["b"], got["n_examples"]) == ("forget_task", "t0", "t1", 40)
        assert (got["n_unforgettable_a"], got["n_unforgettable_b"], got["n_both"]) == (len(a), len(b), len(a & b))
        assert got["jaccard"] == pytest.approx(len(a & b) / len(a | b))
        assert got["jaccard_lo"] <= got["jaccard"] <= got["jaccard_hi"]
