"""The association matrix and the predictors of its held-out cells: matrices built to be
exactly additive / low-rank / proportional to the confidence, the leave-one-row-out
mechanics, F1, and the matrix read back from a hand-made store with known values."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from analysis_helpers import SWEEP, TrialSpec, TrialWriter, conf_k_of_n
from typer.testing import CliRunner

from raysweep.analysis import association, outputs_dir, run_analyses
from raysweep.analysis.association import ExampleKey, cluster_order, matrix_from_long, structure
from raysweep.analysis.measures import upgma_order
from raysweep.analysis.prediction import (
    Additive,
    ConfidenceBaseline,
    Confusion,
    HeldOutRow,
    LowRank,
    NearestRows,
    PredictParams,
    confusion,
    f1_score,
    leave_one_row_out,
    pool,
    reveal,
    run_prediction,
)
from raysweep.cli import app
from raysweep.errors import BadInput
from raysweep.report import write_report
from raysweep.store import Store

ALL = (Additive(), NearestRows(3), LowRank(3), ConfidenceBaseline())
M, N = 14, 60


def rmse_by_predictor(values, before, k=8, seeds=(0, 1), predictors=ALL) -> dict[str, float]:
    scores = leave_one_row_out(values, before, predictors, k=k, seeds=seeds, threshold=0.1)
    return {p.name: pool([s for s in scores if s.predictor == p.name]).rmse for p in predictors}


@pytest.fixture
def before():
    return np.random.default_rng(7).uniform(0.5, 1.0, size=(M, N))


# ---- the right predictor for each structure ------------------------------------------------------


def test_additive_matrix_is_predicted_exactly_by_the_additive_model(before):
    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.3, size=(M, 1)) + rng.normal(0, 0.2, size=(1, N))
    err = rmse_by_predictor(values, before)
    assert err["additive"] < 1e-12
    assert err["knn_rows"] > 0.05
    assert err["confidence"] > 0.05


def test_low_rank_matrix_is_predicted_exactly_by_the_low_rank_model(before):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(M, 3)) @ rng.normal(size=(3, N)) * 0.1
    err = rmse_by_predictor(values, before, k=8)
    assert err["low_rank"] < 1e-10
    assert err["additive"] > 0.05
    assert err["knn_rows"] > 0.05
    assert err["confidence"] > 0.05


def test_low_rank_fit_shrinks_when_noise_is_present(before):
    # Fewer revealed cells than coefficients plus noise: an unregularised fit would explode.
    rng = np.random.default_rng(2)
    values = rng.normal(size=(M, 3)) @ rng.normal(size=(3, N)) * 0.1 + rng.normal(0, 0.05, size=(M, N))
    err = rmse_by_predictor(values, before, k=2)
    assert err["low_rank"] < 2 * err["additive"]


def test_proportional_to_confidence_is_predicted_exactly_by_the_baseline(before):
    strength = np.random.default_rng(3).uniform(0.1, 1.0, size=(M, 1))
    values = strength * (before - 0.5)
    err = rmse_by_predictor(values, before, k=3)
    assert err["confidence"] < 1e-12
    assert err["additive"] > 0.02


def test_with_nothing_revealed_the_predictors_fall_back_to_the_other_runs(before):
    values = np.random.default_rng(4).normal(size=(M, N))
    others = values[1:]
    row = HeldOutRow(before[0], np.array([], dtype=int), np.array([]))
    col_mean = others.mean(axis=0)
    for p in (Additive(), NearestRows(3), LowRank(3)):
        np.testing.assert_allclose(p.fit(others, before[1:]).predict(row), col_mean, atol=1e-12)
    pooled = ConfidenceBaseline().fit(others, before[1:]).predict(row)
    x = (before[1:] - 0.5).ravel()
    np.testing.assert_allclose(pooled, (x @ others.ravel()) / (x @ x) * (before[0] - 0.5))


# ---- leave-one-row-out mechanics ---------------------------------------------------------------


class Oracle:
    """Knows the whole matrix: returns the truth on hidden cells and garbage on revealed ones,
    recording everything it was shown."""

    name = "oracle"

    def __init__(self, full: np.ndarray):
        self.full = full
        self.seen: list[tuple[int, HeldOutRow]] = []

    def fit(self, others, others_before):
        held = [i for i in range(len(self.full)) if not any(np.array_equal(self.full[i], o) for o in others)]
        assert len(held) == 1 and others.shape == (len(self.full) - 1, self.full.shape[1])
        np.testing.assert_array_equal(others, np.delete(self.full, held[0], axis=0))
        i = held[0]
        oracle = self

        class Model:
            def predict(self, row):
                oracle.seen.append((i, row))
                out = oracle.full[i].copy()
                out[row.revealed] += 1000.0
                return out

        return Model()


def test_k_cells_revealed_per_row_and_seed_and_never_scored(before):
    full = np.random.default_rng(5).normal(size=(6, 20))
    oracle = Oracle(full)
    k, seeds = 4, (0, 1, 2)
    scores = leave_one_row_out(full, before[:6, :20], [oracle], k=k, seeds=seeds, threshold=0.0)
    assert len(scores) == 6 * len(seeds)
    assert all(s.n_hidden == 20 - k and s.sse == 0.0 for s in scores)  # the +1000 cells were not scored
    draws = {}
    for i, row in oracle.seen:
        assert len(row.revealed) == k and len(set(row.revealed.tolist())) == k
        np.testing.assert_array_equal(row.revealed_values, full[i, row.revealed])
        np.testing.assert_array_equal(row.conf_before, before[i, :20])
        draws.setdefault(i, []).append(tuple(row.revealed.tolist()))
    assert sorted(draws) == list(range(6))
    # A new draw per row and per seed, reproducible from (seed, row).
    assert all(len(set(d)) == len(seeds) for d in draws.values())
    assert len({d[0] for d in draws.values()}) == 6
    assert draws[2][1] == tuple(reveal(20, k, seeds[1], 2).tolist())


def test_reveal_zero_and_bad_inputs(before):
    values = np.random.default_rng(6).normal(size=(4, 10))
    scores = leave_one_row_out(values, before[:4, :10], [Additive()], k=0, seeds=(0,), threshold=0.1)
    assert all(s.n_hidden == 10 for s in scores)
    with pytest.raises(BadInput, match="at least one cell stays hidden"):
        leave_one_row_out(values, before[:4, :10], [Additive()], k=10, seeds=(0,), threshold=0.1)
    values[0, 0] = np.nan
    with pytest.raises(BadInput, match="unobserved"):
        leave_one_row_out(values, before[:4, :10], [Additive()], k=1, seeds=(0,), threshold=0.1)
    with pytest.raises(BadInput):
        PredictParams(measure="accuracy")
    with pytest.raises(BadInput):
        PredictParams(seeds=(1, 1))


# ---- F1 ------------------------------------------------------------------------------------


def test_f1_of_forgotten_cells():
    truth = np.array([0.5, 0.2, 0.0, 0.3, -0.1, 0.1])
    pred = np.array([0.4, 0.0, 0.2, 0.05, -0.2, 0.1])
    c = confusion(truth, pred, threshold=0.1)
    # Forgotten = strictly above the threshold: the last cell (0.1 in both) is a true negative.
    assert c == Confusion(tp=1, fp=1, fn=2, tn=2)
    assert c.f1 == pytest.approx(2 / 5) and c.precision == pytest.approx(0.5) and c.recall == pytest.approx(1 / 3)
    assert f1_score(truth, pred, 0.1) == pytest.approx(0.4)
    assert f1_score(truth, truth, 0.1) == 1.0
    assert f1_score(np.zeros(3), np.zeros(3), 0.1) is None  # nothing forgotten, nothing predicted
    assert f1_score(np.ones(3), np.zeros(3), 0.1) == 0.0
    # Pooled over rows, counts add up before F1 is taken (not an average of per-row F1s).
    assert (Confusion(1, 0, 0, 0) + Confusion(0, 1, 1, 0)).f1 == pytest.approx(2 / 4)


# ---- the association matrix from a store --------------------------------------------------------

TASKS = ("t0", "t1")
NT = 16
FT_CONF = [0.6 + 0.02 * j for j in range(NT)]
# The designed drops: run r forgets example j of task t by D[r][t][j].
D = {
    "a": {"t0": [0.01 * j for j in range(NT)], "t1": [0.3 - 0.02 * j for j in range(NT)]},
    "b": {"t0": [0.2] * NT, "t1": [-0.05 + 0.01 * (j % 4) for j in range(NT)]},
    "c": {"t0": [0.15 - 0.01 * j for j in range(NT)]},
}
# (method, evaluated tasks, forget task): b and c share (m1, t0), so they leave the training
# rows together whenever either is held out.
RUNS = {"a": ("random", TASKS, "t1"), "b": ("gradient_ascent", TASKS, "t0"), "c": ("flipped", ("t0",), "t0")}


def build_known_store(root) -> Store:
    store = Store(root)
    store.ensure()
    for r, (method, evals, forget) in RUNS.items():
        spec = TrialSpec(f"{r}-trial", "m1", forget, method=method, eval_tasks=list(evals))
        w = TrialWriter(store, spec, splits=("validation", "test"))
        w.epoch("pretrained", 0)
        # Decoy epochs hold other confidences: reading the wrong milestone would show.
        w.epoch("finetune", 1, {(t, "test"): [0.55] * NT for t in evals})
        w.epoch("finetune", 2, {(t, "test"): FT_CONF for t in evals})
        w.epoch("finetune", 3, {(t, "test"): [0.51] * NT for t in evals})
        w.epoch("forget", 1, {(t, "test"): [0.52] * NT for t in evals})
        w.epoch("forget", 2, {(t, "test"): [f - d for f, d in zip(FT_CONF, D[r][t])] for t in evals})
        w.finish(best_finetune=2, last_forget=2)
    TrialWriter(store, TrialSpec("z-unfinished", "m1", "t1", status="running")).finish(None, None)
    return store


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    store = build_known_store(tmp_path_factory.mktemp("known") / "store")
    return store, {o.name: o for o in run_analyses(store, only=["association", "predict", "by_method"], engine="local")}


def test_association_matrix_holds_the_designed_drops(known):
    store, out = known
    assoc = out["association"]
    assert assoc.status == "ok", assoc.message
    cells = pq.read_table(outputs_dir(store, None, "association") / "cells.parquet")
    assert cells.num_rows == 16 * 5
    for measure in ("confidence", "loss"):
        mat = matrix_from_long(cells, measure)
        assert [r.trial_id for r in mat.rows] == ["a-trial", "b-trial", "c-trial"]
        assert mat.cols[:2] == (ExampleKey("t0", "test", 0), ExampleKey("t0", "test", 1)) and len(mat.cols) == 32
        for i, r in enumerate("abc"):
            for j, col in enumerate(mat.cols):
                if col.eval_task not in D[r]:
                    assert math.isnan(mat.values[i, j])
                    continue
                ft = FT_CONF[col.example_idx]
                fg = ft - D[r][col.eval_task][col.example_idx]
                # Stored in float32: compare at that precision.
                want = ft - fg if measure == "confidence" else math.log(ft) - math.log(fg)
                assert mat.values[i, j] == pytest.approx(want, abs=2e-6)
                assert mat.conf_before[i, j] == pytest.approx(ft, abs=1e-6)
        full = mat.complete_columns()
        assert full.shape == (3, 16) and {c.eval_task for c in full.cols} == {"t0"}


def test_association_rows_and_columns_are_clustered(known):
    store, out = known
    cells = out["association"].tables["cells"]
    mat = matrix_from_long(cells, "confidence")
    row_pos, col_pos = cluster_order(mat.values)
    assert sorted(row_pos) == [0, 1, 2] and sorted(col_pos) == list(range(32))
    got = {(r["trial_id"], r["eval_task"], r["example_idx"]): (r["row_pos"], r["col_pos"]) for r in cells.to_pylist()}
    for i, run in enumerate(mat.rows):
        for j, col in enumerate(mat.cols):
            if not math.isnan(mat.values[i, j]):
                assert got[(run.trial_id, col.eval_task, col.example_idx)] == (row_pos[i], col_pos[j])
    runs = out["association"].tables["runs"]
    assert runs["row_pos"].to_pylist() == [0, 1, 2] and set(runs["trial_id"].to_pylist()) == {
        "a-trial",
        "b-trial",
        "c-trial",
    }
    summary = {r["measure"]: r for r in out["association"].tables["summary"].to_pylist()}
    assert summary["confidence"]["n_runs"] == 3 and summary["confidence"]["n_complete_examples"] == 16


def test_cluster_order_is_upgma_and_samples_wide_matrices(monkeypatch):
    x = np.random.default_rng(9).normal(size=(7, 30))
    rows, cols = cluster_order(x)
    r, c = upgma_order(x)
    assert [rows[i] for i in r] == list(range(7)) and [cols[j] for j in c] == list(range(30))
    monkeypatch.setattr(association, "MAX_CLUSTERED_COLUMNS", 10)
    rows, cols = cluster_order(x)
    assert sorted(rows) == list(range(7))
    assert sum(p is None for p in cols) == 20 and sorted(p for p in cols if p is not None) == list(range(10))


def test_structure_of_exact_matrices():
    rng = np.random.default_rng(8)
    additive = rng.normal(size=(8, 1)) + rng.normal(size=(1, 30))
    st = structure(additive)
    assert st.r2_additive == pytest.approx(1.0) and st.r2_rank[0] == pytest.approx(1.0)
    rank2 = rng.normal(size=(8, 2)) @ rng.normal(size=(2, 30))
    st = structure(rank2)
    assert st.r2_additive < 0.9 and st.r2_rank[1] == pytest.approx(1.0)


def test_prediction_over_the_known_store(known, tmp_path):
    store, out = known
    pred = out["predict"]
    assert pred.status == "ok", pred.message
    summary = {r["predictor"]: r for r in pred.tables["summary"].to_pylist()}
    assert set(summary) == {"additive", "knn_rows", "low_rank", "confidence"}
    assert all(r["n_runs"] == 3 and r["n_examples"] == 16 and r["k"] == 10 for r in summary.values())
    assert "16 example(s) not evaluated by every run left out" in pred.message
    # The CLI's parameters replace the analysis defaults in the same place.
    res = CliRunner().invoke(
        app,
        [
            "predict",
            "--store",
            str(store.root),
            "--k",
            "3",
            "--seeds",
            "0,4",
            "--threshold",
            "0.05",
            "--measure",
            "loss",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "results written to" in res.output
    d = outputs_dir(store, None, "predict")
    t = pq.read_table(d / "summary.parquet").to_pylist()
    assert {r["k"] for r in t} == {3} and {r["measure"] for r in t} == {"loss"} and {r["n_seeds"] for r in t} == {2}
    assert json.loads((d / "outcome.json").read_text())["params"]["args"]["predict"]["seeds"] == [0, 4]
    by_seed = pq.read_table(d / "by_seed.parquet")
    assert sorted(set(by_seed["seed"].to_pylist())) == [0, 4]
    assert set(by_seed["n_cells"].to_pylist()) == {3 * (16 - 3)}
    # Asking for more revealed cells than there are examples: an error, the results stay.
    res = CliRunner().invoke(app, ["predict", "--store", str(store.root), "--k", "16"])
    assert res.exit_code == 1 and "needs more than k=16" in res.output
    assert {r["k"] for r in pq.read_table(d / "summary.parquet").to_pylist()} == {3}
    res = CliRunner().invoke(app, ["predict", "--store", str(store.root), "--measure", "accuracy"])
    assert res.exit_code == 2


def test_prediction_skips_with_too_few_runs(tmp_path):
    store = Store(tmp_path / "s")
    store.ensure()
    w = TrialWriter(store, TrialSpec("only", "m1", "t0", eval_tasks=["t0"]), splits=("test",))
    w.epoch("finetune", 1, {("t0", "test"): conf_k_of_n(16, 16)})
    w.epoch("forget", 1, {("t0", "test"): conf_k_of_n(8, 16)})
    w.finish(best_finetune=1, last_forget=1)
    out = run_prediction(store, PredictParams(k=2))
    assert out.status == "skipped" and "3+ forget runs" in out.message


def test_report_has_the_beyond_sections(known, tmp_path):
    store, _ = known
    page = write_report(store, tmp_path / "out", sweep=SWEEP).read_text()
    for name in ("association", "predict", "by_method"):
        section = page.split(f"<section id={name}>", 1)[1].split("</section>", 1)[0]
        assert "<img" in section and "<table>" in section, name
    assert "class=figure-error>" not in page


def test_by_method_on_the_known_store(known):
    # acc_finetuned is 1 everywhere; a (random, forgets t1) loses 6/16 of t1 and nothing of
    # t0, b (gradient ascent, forgets t0) 6/16 of t0 and nothing of t1, c (flipped, t0 only)
    # 2/16 of t0 against the flipped baseline 1 - 1 = 0.
    _, out = known
    bm = out["by_method"]
    assert bm.status == "ok", bm.message
    rows = {r["method"]: r for r in bm.tables["methods"].to_pylist()}
    assert list(rows) == ["flipped", "gradient_ascent", "random"]  # by name
    assert rows["random"]["ratio_own"] == pytest.approx(0.75) and rows["random"]["ratio_other"] == 0
    assert rows["random"]["ratio_spillover"] == 0
    assert rows["gradient_ascent"]["ratio_own"] == pytest.approx(0.75) and rows["gradient_ascent"]["ratio_other"] == 0
    assert rows["gradient_ascent"]["ratio_spillover"] == 0
    assert rows["flipped"]["ratio_own"] == pytest.approx(0.125) and rows["flipped"]["n_other_cells"] == 0
    assert rows["flipped"]["ratio_other"] is None
    assert rows["flipped"]["ratio_spillover"] is None  # no other task to spill onto
    # One seed: the interval resamples the examples (6 of 16 lost: the ratio's bounds straddle 0.75).
    ga = rows["gradient_ascent"]
    assert (ga["n_seeds"], ga["interval"]) == (1, "bootstrap95")
    assert ga["ratio_own_lo"] < 0.75 < ga["ratio_own_hi"] and ga["ratio_other_lo"] == ga["ratio_other_hi"] == 0


# ---- held-out groups ------------------------------------------------------------------------------


def test_twins_of_the_held_out_run_leave_the_training_rows_with_it(before):
    # Every run twice (another seed, another sweep): holding out one copy and training on
    # its twin reads the answer off the twin.
    rng = np.random.default_rng(11)
    base = rng.normal(0, 0.3, size=(M // 2, N))
    values = np.repeat(base, 2, axis=0)
    conf = np.repeat(before[: M // 2], 2, axis=0)
    groups = [("m1", f"task{i // 2}") for i in range(M)]
    leaky = rmse_by_predictor(values, conf, predictors=(NearestRows(1),))
    assert leaky["knn_rows"] < 1e-12  # without groups: a perfect score that means nothing
    scores = leave_one_row_out(values, conf, [NearestRows(1)], k=8, seeds=(0, 1), threshold=0.1, groups=groups)
    assert pool(scores).rmse > 0.2
    with pytest.raises(BadInput, match="one group"):
        leave_one_row_out(values, conf, [Additive()], k=2, seeds=(0,), threshold=0.1, groups=[("m1", "t")] * M)


def test_store_prediction_holds_out_the_model_and_forget_task_group(tmp_path):
    # Two seeds of one (model, forget task) forgetting exactly alike, and a third run.
    store = Store(tmp_path / "s")
    store.ensure()
    drops = {
        "twin-s0": [0.01 * j for j in range(NT)],
        "twin-s1": [0.01 * j for j in range(NT)],
        "other": [0.2 - 0.01 * j for j in range(NT)],
    }
    for i, (tid, d) in enumerate(drops.items()):
        forget = "t1" if tid == "other" else "t0"
        w = TrialWriter(store, TrialSpec(tid, "m1", forget, seed=i, eval_tasks=["t0"]), splits=("test",))
        w.epoch("finetune", 1, {("t0", "test"): FT_CONF})
        w.epoch("forget", 1, {("t0", "test"): [f - x for f, x in zip(FT_CONF, d)]})
        w.finish(best_finetune=1, last_forget=1)
    out = run_prediction(store, PredictParams(k=2, neighbors=1, predictors=("knn_rows",)))
    assert out.status == "ok", out.message
    assert "(2 group(s))" in out.message
    by_run = {r["trial_id"]: r for r in out.tables["by_run"].to_pylist()}
    # Trained on its twin it would be exact; held out with it, only `other` is left to copy.
    assert by_run["twin-s0"]["rmse"] > 0.05 and by_run["twin-s1"]["rmse"] > 0.05
