"""Membership inference on hand-built stores whose answer is known: members drawn from the
same distribution as held-out examples give AUC about 0.5, memorised members AUC near 1, and
a forget phase that returns them to the held-out distribution brings it back to 0.5."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from raysweep.analysis import run_analyses
from raysweep.analysis.membership import auc, bootstrap_auc
from raysweep.store import EXAMPLES_SCHEMA, Store
from tests.analysis_helpers import SWEEP, TrialSpec, TrialWriter

N_MEMBERS, N_HELD_OUT = 300, 200


def _prompt(split: str, i: int) -> str:
    # Lengths vary, so the zlib score is not a monotone copy of the loss score.
    return f"Question {split} {i}: " + "is this right? " * (1 + (i * 7) % 5)


def _write(
    store: Store,
    trial_id: str,
    seed: int,
    member_conf,
    held_conf,
    forget_member_conf,
    size: int = 100,
    pretrained_member_conf=None,
) -> None:
    spec = TrialSpec(trial_id, "m1", "t0", seed=seed, size=size, eval_tasks=["t0"])
    w = TrialWriter(store, spec, splits=("train", "test"))
    pre = (
        np.random.default_rng(seed + 100).uniform(0.3, 0.8, N_MEMBERS)
        if pretrained_member_conf is None
        else pretrained_member_conf
    )
    w.epoch("pretrained", 0, {("t0", "train"): list(pre), ("t0", "test"): list(held_conf)})
    w.epoch("finetune", 1, {("t0", "train"): list(member_conf), ("t0", "test"): list(held_conf)})
    for e, conf in enumerate(forget_member_conf, start=1):
        w.epoch("forget", e, {("t0", "train"): list(conf), ("t0", "test"): list(held_conf)})
    w.finish(best_finetune=1, last_forget=len(forget_member_conf))


def _examples(store: Store) -> None:
    rows = [
        {
            "task": "t0",
            "split": s,
            "example_idx": i,
            "uid": f"{s}-{i}",
            "prompt": _prompt(s, i),
            "choice_0": " no",
            "choice_1": " yes",
            "gold": i % 2,
        }
        for s, n in (("train", N_MEMBERS), ("test", N_HELD_OUT))
        for i in range(n)
    ]
    store.write_examples(SWEEP, "t0", pa.Table.from_pylist(rows, schema=EXAMPLES_SCHEMA))


def _store(tmp_path, name: str) -> Store:
    store = Store(tmp_path / name)
    store.ensure()
    _examples(store)
    return store


def test_auc_matches_sklearn_with_ties_and_the_bootstrap_brackets_it():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 8, 120).astype(float)
    h = rng.integers(0, 6, 90).astype(float)
    labels = np.r_[np.ones(m.size), np.zeros(h.size)]
    assert auc(m, h) == pytest.approx(roc_auc_score(labels, np.r_[m, h]), abs=1e-12)
    lo, hi = bootstrap_auc(m, h, 2000, np.random.default_rng(1))
    assert lo < auc(m, h) < hi and hi - lo < 0.3
    assert auc(np.array([]), h) is None


def test_same_distribution_gives_half_memorised_gives_one_and_forgetting_brings_it_back(tmp_path):
    rng = np.random.default_rng(7)
    store = _store(tmp_path, "store")
    held = rng.uniform(0.3, 0.8, N_HELD_OUT)
    memorised = rng.uniform(0.9, 0.99, N_MEMBERS)
    # Forgetting drags the members down into the held-out distribution by the last epoch.
    forget = [0.5 * memorised + 0.5 * rng.uniform(0.3, 0.8, N_MEMBERS), rng.uniform(0.3, 0.8, N_MEMBERS)]
    pre = rng.uniform(0.3, 0.8, N_MEMBERS)
    _write(store, "memorised", 0, memorised, held, forget, pretrained_member_conf=pre)
    same = rng.uniform(0.3, 0.8, N_MEMBERS)
    _write(store, "same", 0, same, held, [rng.uniform(0.3, 0.8, N_MEMBERS)], size=200)
    (o,) = run_analyses(store, only=["membership"], engine="local")
    assert o.status == "ok", o.message
    runs = {(r["trial_id"], r["step"], r["attack"]): r for r in o.tables["runs"].to_pylist()}
    assert runs[("memorised", 0, "loss")]["auc"] == pytest.approx(1.0)
    assert (
        runs[("memorised", 0, "loss")]["n_members"] == N_MEMBERS
        and runs[("memorised", 0, "loss")]["n_held_out"] == N_HELD_OUT
    )
    assert 0.5 < runs[("memorised", 1, "loss")]["auc"] < 1.0
    assert abs(runs[("memorised", 2, "loss")]["auc"] - 0.5) < 0.08
    assert abs(runs[("same", 0, "loss")]["auc"] - 0.5) < 0.08
    # Min-K% and Min-K%++ read the stored per-token statistics: here monotone in the
    # confidence, so they rank members exactly as the loss does.
    for attack in ("min_k", "min_k_pp"):
        for key in (("memorised", 0), ("memorised", 2), ("same", 0)):
            assert runs[(*key, attack)]["auc"] == pytest.approx(runs[(*key, "loss")]["auc"], abs=1e-9), (key, attack)
    assert runs[("memorised", 0, "min_k")]["auc"] == pytest.approx(1.0)

    # zlib: the same AUC as computed here from the stored log-likelihoods and the prompts.
    sizes = {
        (s, i): len(zlib.compress((_prompt(s, i) + (" yes" if i % 2 else " no")).encode(), 9))
        for s, n in (("train", N_MEMBERS), ("test", N_HELD_OUT))
        for i in range(n)
    }
    score_m = [3 * math.log(np.float32(c)) / sizes[("train", i)] for i, c in enumerate(memorised)]
    score_h = [3 * math.log(np.float32(c)) / sizes[("test", i)] for i, c in enumerate(held)]
    want = roc_auc_score(np.r_[np.ones(N_MEMBERS), np.zeros(N_HELD_OUT)], np.r_[score_m, score_h])
    assert runs[("memorised", 0, "zlib")]["auc"] == pytest.approx(want, abs=1e-3)

    # privleak against the pretrained model (which trained on neither split).
    first = runs[("memorised", 0, "loss")]
    ref = roc_auc_score(np.r_[np.ones(N_MEMBERS), np.zeros(N_HELD_OUT)], np.log(np.r_[pre, held].astype(np.float32)))
    assert first["auc_pretrained"] == pytest.approx(ref, abs=1e-6)
    assert first["privleak"] == pytest.approx(100 * (1.0 - ref) / ref, abs=1e-4)
    # Forget quality: KS of the members' confidences against the pretrained model's.
    fq = {r["milestone"]: r for r in o.tables["forget_quality"].to_pylist() if r["trial_id"] == "memorised"}
    for milestone, conf in (("finetuned", memorised), ("forgotten", forget[-1])):
        want_ks = ks_2samp(conf.astype(np.float32), pre.astype(np.float32))
        assert fq[milestone]["ks_statistic"] == pytest.approx(want_ks.statistic, abs=1e-6)
        assert fq[milestone]["forget_quality"] == pytest.approx(want_ks.pvalue, rel=1e-6)
    assert fq["finetuned"]["forget_quality"] < 1e-10 < fq["forgotten"]["forget_quality"]
    assert fq["forgotten"]["ks_statistic"] < 0.15

    # One seed per condition: bootstrap intervals, which contain the estimate.
    s = {(r["step"], r["attack"]): r for r in o.tables["summary"].to_pylist() if r["size"] == 100}
    assert all(r["interval"] == "bootstrap95" for r in s.values())
    for r in s.values():
        assert r["auc_lo"] <= r["auc"] <= r["auc_hi"]


def test_seeds_give_a_t_interval_and_no_forget_phase_is_skipped(tmp_path):
    rng = np.random.default_rng(3)
    store = _store(tmp_path, "store")
    held = rng.uniform(0.3, 0.8, N_HELD_OUT)
    for seed in (0, 1, 2):
        _write(store, f"s{seed}", seed, rng.uniform(0.6, 0.95, N_MEMBERS), held, [rng.uniform(0.3, 0.8, N_MEMBERS)])
    (o,) = run_analyses(store, only=["membership"], engine="local")
    (row,) = [r for r in o.tables["summary"].to_pylist() if r["step"] == 0 and r["attack"] == "loss"]
    per_seed = [r["auc"] for r in o.tables["runs"].to_pylist() if r["step"] == 0 and r["attack"] == "loss"]
    assert row["n_seeds"] == 3 and row["interval"] == "seeds-t95" and row["n_trials"] == 3
    assert row["auc"] == pytest.approx(np.mean(per_seed)) and row["auc_lo"] < row["auc"] < row["auc_hi"]

    bare = Store(tmp_path / "bare")
    bare.ensure()
    w = TrialWriter(bare, TrialSpec("x", "m1", "t0", eval_tasks=["t0"]), splits=("train", "test"))
    w.epoch("pretrained", 0)
    w.epoch("finetune", 1)
    w.finish(best_finetune=1, last_forget=None)
    (o,) = run_analyses(bare, only=["membership"], engine="local")
    assert o.status == "skipped" and "forget" in o.message


def test_a_store_without_min_k_columns_leaves_those_attacks_empty_and_says_why(tmp_path):
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    store = _store(tmp_path, "v2")
    held = rng.uniform(0.3, 0.8, N_HELD_OUT)
    _write(store, "old", 0, rng.uniform(0.9, 0.99, N_MEMBERS), held, [rng.uniform(0.3, 0.8, N_MEMBERS)])
    # Score files as schema v2 wrote them: no Min-K% columns.
    for f in (store.root / "scores").rglob("*.parquet"):
        t = pq.read_table(f)
        pq.write_table(t.drop([c for c in t.column_names if c.startswith("min_k")]), f)
    (o,) = run_analyses(store, only=["membership"], engine="local")
    assert o.status == "ok", o.message
    runs = {(r["step"], r["attack"]): r for r in o.tables["runs"].to_pylist()}
    assert runs[(0, "loss")]["auc"] == pytest.approx(1.0)
    assert runs[(0, "min_k")]["auc"] is None and runs[(0, "min_k_pp")]["auc"] is None
    # The analysis's notes reach its one-line message (what `analyze` prints and the report shows).
    assert "Min-K% / Min-K%++ AUCs left empty: the store's scores predate schema v3" in o.message
