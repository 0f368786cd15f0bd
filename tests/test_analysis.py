"""Analyses against hand-built stores with known answers (see analysis_helpers.py), and the
two engines against each other."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from analysis_helpers import (
    COL_ORDER,
    FT_CONF,
    ORDER_KEPT,
    ROW_ORDER,
    SWEEP,
    TASKS,
    R,
    build_minimal_store,
    build_rich_store,
    expected_variance,
)
from rich.console import Console
from scipy import stats

from raysweep.analysis import (
    AnalysisParams,
    choose_engine,
    load_outcomes,
    outcome_table,
    outputs_dir,
    registered_analyses,
    registry,
    run_analyses,
)
from raysweep.analysis.measures import forget_ratio, upgma_order
from raysweep.analysis.reducers import AccuracySums, FirstCrossing
from raysweep.errors import BadInput
from raysweep.registry import Registry

ALL = ["single_task", "cross_task", "dataset_size", "flipped", "cross_model", "predictors", "order", "probes"]


@pytest.fixture(scope="module")
def rich_store(tmp_path_factory):
    return build_rich_store(tmp_path_factory.mktemp("rich") / "store")


@pytest.fixture(scope="module")
def local(rich_store):
    return {o.name: o for o in run_analyses(rich_store, only=ALL, engine="local")}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def rows(table: pa.Table, **where) -> list[dict]:
    return [r for r in table.to_pylist() if all(r[k] == v for k, v in where.items())]


def one(table: pa.Table, **where) -> dict:
    found = rows(table, **where)
    assert len(found) == 1, (where, found)
    return found[0]


MAIN = dict(model="m1", method="random", size=100)


# ---- registry and API -------------------------------------------------------------------


def test_registry_lists_every_analysis_once():
    # The paper's analyses first, in figure order; others may be registered after them.
    names = registered_analyses()
    assert names[: len(ALL)] == ALL and len(set(names)) == len(names)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("single_task", title="x", figure="y")(lambda ctx: None)


def test_all_ok_on_rich_store(local):
    assert {n: o.status for n, o in local.items()} == {n: "ok" for n in ALL}
    for o in local.values():
        assert "\n" not in o.message and o.paths and all(p.is_file() for p in o.paths)


# ---- Fig 3.1 / formulas -----------------------------------------------------------------


def test_single_task_forget_ratio_is_a_quarter(local):
    t = local["single_task"].tables["tasks"]
    r = one(t, forget_task="t0", **MAIN)
    assert (r["acc_pretrained"], r["acc_finetuned"], r["acc_forgotten"]) == (0.5, 1.0, 0.875)
    assert r["forget_gap"] == 0.375
    assert r["forget_ratio"] == 0.25
    assert r["n_trials"] == 1  # the unfinished seed-9 trial of t1 is not counted
    assert one(t, forget_task="t1", **MAIN)["n_trials"] == 1


def test_forget_ratio_formulas():
    assert forget_ratio(0.75, 0.375, "random") == 1.5
    assert forget_ratio(0.75, 0.375, "flipped") == 0.75  # (0.75 - 0.375) / (0.75 - 0.25)
    assert forget_ratio(0.5, 0.4, "random") is None  # nothing above chance to forget
    assert forget_ratio(0.5, 0.4, "flipped") is None
    assert forget_ratio(None, 0.4, "random") is None


def test_flipped_trials_use_the_flipped_baseline(local):
    r = one(local["single_task"].tables["tasks"], method="flipped", forget_task="t0")
    assert (r["acc_finetuned"], r["acc_forgotten"], r["forget_ratio"], r["ratio_formula"]) == (
        0.75,
        0.375,
        0.75,
        "flipped",
    )
    s = one(local["flipped"].tables["summary"], model="m1", size=100, forget_task="t0")
    assert s["forget_ratio[flipped]"] == 0.75
    assert s["forget_ratio[random]"] == 0.25


# ---- Fig 3.2 ------------------------------------------------------------------------------


def test_upgma_order_of_the_designed_matrix():
    rows_idx, cols_idx = upgma_order(R)
    assert [TASKS[i] for i in rows_idx] == ROW_ORDER
    assert [TASKS[i] for i in cols_idx] == COL_ORDER


def test_cross_task_matrix_is_upgma_ordered(local):
    out = local["cross_task"].tables
    m = rows(out["matrix"], **MAIN)
    assert [r["forget_task"] for r in m] == ROW_ORDER
    assert out["matrix"].column_names[4:] == COL_ORDER
    for r in m:
        i = TASKS.index(r["forget_task"])
        assert [r[c] for c in TASKS] == [R[i][j] for j in range(4)]
    cells = rows(out["cells"], **MAIN)
    assert len(cells) == 16
    for c in cells:
        assert ROW_ORDER[c["row_pos"]] == c["forget_task"] and COL_ORDER[c["col_pos"]] == c["eval_task"]


# ---- Appendices B, C, D --------------------------------------------------------------------


def test_dataset_size_and_cross_model_side_by_side(local):
    s = one(local["dataset_size"].tables["summary"], model="m1", method="random", forget_task="t0")
    assert (s["forget_ratio[100]"], s["forget_ratio[1000]"], s["acc_forgotten[1000]"]) == (0.25, 0.5, 0.75)
    m = one(local["cross_model"].tables["summary"], method="random", size=100, forget_task="t0")
    assert (m["forget_ratio[m1]"], m["forget_ratio[m2]"]) == (0.25, 0.0)
    agree = one(local["cross_model"].tables["agreement"], method="random", size=100)
    assert (agree["a"], agree["b"], agree["n"], agree["pearson_r"]) == ("m1", "m2", 1, None)


# ---- Fig 4.1 -------------------------------------------------------------------------------


def test_predictors_task_level(local):
    t = rows(local["predictors"].tables["tasks"], **MAIN)
    assert [r["forget_task"] for r in t] == TASKS
    ratio = [r["forget_ratio"] for r in t]
    assert ratio == [R[i][i] for i in range(4)]
    conf = [r["conf_finetuned"] for r in t]
    assert conf == pytest.approx(FT_CONF, abs=1e-6)  # stored as float32
    var = [r["total_variance"] for r in t]
    assert var == pytest.approx([expected_variance(i) for i in range(4)], rel=1e-12)
    corr = {r["predictor"]: r for r in rows(local["predictors"].tables["correlations"], **MAIN)}
    assert corr["acc_finetuned"]["pearson_r"] is None  # fine-tuned accuracy is 1.0 everywhere
    for name, x in (("total_variance", var), ("conf_finetuned", conf)):
        p, s = stats.pearsonr(x, ratio), stats.spearmanr(x, ratio)
        got = corr[name]
        assert got["n"] == 4
        assert got["pearson_r"] == pytest.approx(p.statistic) and got["pearson_p"] == pytest.approx(p.pvalue)
        assert got["spearman_r"] == pytest.approx(s.statistic) and got["spearman_p"] == pytest.approx(s.pvalue)


def test_predictors_example_level(local):
    ex = local["predictors"].tables["examples"]
    t0 = rows(ex, forget_task="t0", **MAIN)
    assert len(t0) == 16
    assert all(r["conf_before"] == pytest.approx(0.9, abs=1e-6) for r in t0)
    # 14 of 16 correct (0.8) after forgetting, the rest at 0.3.
    assert [round(r["conf_after"], 6) for r in t0] == [0.8] * 14 + [0.3] * 2
    assert all(r["conf_drop"] == pytest.approx(r["conf_before"] - r["conf_after"]) for r in t0)
    assert [r["forgotten"] for r in t0] == [False] * 14 + [True] * 2
    pooled = rows(ex, **MAIN)
    ec = local["predictors"].tables["example_correlations"]
    got = one(ec, forget_task="(all)", target="conf_after", **MAIN)
    ref = stats.spearmanr([r["conf_before"] for r in pooled], [r["conf_after"] for r in pooled])
    assert got["n"] == 64 and got["spearman_r"] == pytest.approx(ref.statistic)
    assert got["interval"] == "bootstrap95" and got["spearman_r_lo"] <= got["spearman_r"] <= got["spearman_r_hi"]
    learned = [r for r in pooled if r["correct_before"]]
    flag = one(ec, forget_task="(all)", target="forgotten", **MAIN)
    ref = stats.pearsonr([r["conf_before"] for r in learned], [float(r["forgotten"]) for r in learned])
    assert flag["n"] == len(learned) and flag["pearson_r"] == pytest.approx(ref.statistic)
    forgot = [r["conf_before"] for r in learned if r["forgotten"]]
    kept = [r["conf_before"] for r in learned if not r["forgotten"]]
    want_auc = np.mean([(a > b) + 0.5 * (a == b) for a in forgot for b in kept])
    assert flag["auc"] == pytest.approx(want_auc)
    # Within one task the confidence before forgetting is constant: no correlation.
    assert one(ec, forget_task="t0", target="conf_after", **MAIN)["spearman_r"] is None


# ---- Fig 5.1 -------------------------------------------------------------------------------


def test_order_known_spearman(local):
    tasks = local["order"].tables["tasks"]
    t0 = one(tasks, forget_task="t0", **MAIN)
    # Examples i >= ORDER_KEPT stay at 0.9 through forgetting: not relearnable, so not counted as learned.
    got = (t0["n_examples"], t0["n_forgotten"], t0["n_learned"], t0["status"])
    assert got == (ORDER_KEPT, ORDER_KEPT, ORDER_KEPT, "ok")
    assert t0["spearman_r"] == pytest.approx(-1.0) and t0["interval"] == "bootstrap95"
    t1 = one(tasks, forget_task="t1", **MAIN)
    assert t1["n_examples"] == 50 and t1["status"].startswith("skipped") and t1["spearman_r"] is None
    ex = rows(local["order"].tables["examples"], forget_task="t0")
    assert [(r["forget_epoch"], r["learn_epoch"]) for r in ex] == [(1 + i % 5, 5 - i % 5) for i in range(ORDER_KEPT)]


def test_order_min_examples_is_a_parameter(rich_store):
    (o,) = run_analyses(
        rich_store, only=["order"], engine="local", params=AnalysisParams(order_min_examples=ORDER_KEPT)
    )
    assert o.status == "skipped"
    assert o.message == f"no task has more than {ORDER_KEPT} examples both forgotten and learned (most: {ORDER_KEPT})"
    (o,) = run_analyses(rich_store, only=["order"], engine="local", params=AnalysisParams(order_min_examples=40))
    assert o.status == "ok"
    assert [r["status"] for r in o.tables["tasks"].to_pylist()] == ["ok", "ok"]
    run_analyses(rich_store, only=["order"], engine="local")  # leave the default outputs behind


# ---- Fig 6.1 -------------------------------------------------------------------------------


def test_probes_decode_separable_states(local):
    fits = local["probes"].tables["fits"]
    assert fits.num_rows == 7 * 3
    assert set(fits["status"].to_pylist()) == {"ok"}
    for r in fits.to_pylist():
        if r["milestone"] in ("finetuned", "forgotten"):
            assert r["test_acc"] == 1.0 and r["val_acc"] == 1.0
        assert (r["n_train"], r["n_val"], r["n_test"]) == (120, 16, 16)
    s = one(local["probes"].tables["summary"], forget_task="t2", **MAIN)
    # Behaviour forgotten (accuracy back to 0.5), skill still decodable.
    assert (s["acc_forgotten"], s["probe_forgotten"]) == (0.5, 1.0)


# ---- skipped / failed ------------------------------------------------------------------------


def test_skipped_analyses_say_why(tmp_path):
    store = build_minimal_store(tmp_path / "min")
    out = {o.name: o for o in run_analyses(store, only=ALL, engine="local")}
    assert out["single_task"].status == "ok"
    assert one(out["single_task"].tables["tasks"], forget_task="t0")["forget_ratio"] == 0.25
    expected = {
        "cross_task": "only the forget task itself was evaluated: a cross-task matrix needs more eval_tasks",
        "dataset_size": "one size only (n=100): dataset_size compares sweeps with two or more sizes",
        "flipped": "no flipped trials (methods in the sweep: random)",
        "cross_model": "one model only (m1): cross_model compares two or more models",
        "order": "no relearn phase in the sweep (phases.relearn.enabled is false)",
        "probes": "no hidden states of the forget tasks at the milestones (scoring.hidden_states is 'none'?)",
    }
    for name, msg in expected.items():
        assert (out[name].status, out[name].message) == ("skipped", msg)
        assert out[name].tables == {} and out[name].paths == []
    # One task: example-level predictors only, and it says what is missing.
    assert out["predictors"].status == "ok"
    assert "3+ forget tasks" in out["predictors"].message and "no hidden states" in out["predictors"].message


def test_skipped_without_forgetting_or_trials(tmp_path):
    store = build_minimal_store(tmp_path / "noforget", with_forget=False)
    out = {o.name: o for o in run_analyses(store, only=["single_task", "cross_task"], engine="local")}
    msg = "no trial has both a finetuned and a forgotten milestone (no committed forget epoch)"
    assert (out["single_task"].status, out["single_task"].message) == ("skipped", msg)
    empty = build_minimal_store(tmp_path / "empty")
    for p in (empty.root / "trials" / SWEEP).glob("*.parquet"):
        p.unlink()
    (o,) = run_analyses(empty, only=["probes"], engine="local")
    assert (o.status, o.message) == ("skipped", "no done trials in the store")


def test_a_failing_analysis_does_not_stop_the_others(rich_store, monkeypatch):
    def boom(ctx):
        raise RuntimeError("kaput\nsecond line")

    # A registry of this test's own: the process-wide one keeps only the real analyses.
    scratch = Registry("analysis", field="analysis")
    for name, entry in registry.ANALYSES.items():
        scratch.add(name, entry)
    scratch.add("boom", registry.Analysis("boom", "Boom", "-", boom))
    monkeypatch.setattr(registry, "ANALYSES", scratch)
    out = run_analyses(rich_store, only=["boom", "single_task"], engine="local")
    assert [(o.name, o.status) for o in out] == [("single_task", "ok"), ("boom", "failed")]
    assert out[1].message == "RuntimeError: kaput second line"
    meta = json.loads((outputs_dir(rich_store, None, "boom") / "outcome.json").read_text())
    assert meta["status"] == "failed"


# ---- outputs, engines, rendering ------------------------------------------------------------


def test_outputs_round_trip_and_sweep_scope(rich_store, local):
    loaded = {o.name: o for o in load_outcomes(rich_store)}
    assert set(loaded) >= set(ALL)
    for name in ALL:
        assert loaded[name].status == local[name].status
        for t, table in local[name].tables.items():
            assert loaded[name].tables[t].equals(table)
    (o,) = run_analyses(rich_store, only=["single_task"], engine="local", sweep=SWEEP)
    assert o.paths[0] == rich_store.analysis_dir / "by-sweep" / SWEEP / "single_task" / "tasks.parquet"
    with pytest.raises(BadInput, match="sweep: 'nope' is not in the store"):
        run_analyses(rich_store, sweep="nope")
    with pytest.raises(BadInput, match="unknown name"):
        run_analyses(rich_store, only=["nope"])
    with pytest.raises(BadInput, match="engine"):
        run_analyses(rich_store, engine="spark")


def test_engine_auto_choice(rich_store, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_engine("auto", rich_store.root).name == "local"
    monkeypatch.setattr("raysweep.analysis.engine.RAY_THRESHOLD_BYTES", 10)
    assert choose_engine("auto", rich_store.root).name == "ray"
    monkeypatch.undo()
    monkeypatch.setenv("RAY_ADDRESS", "ray://example:10001")
    assert choose_engine("auto", rich_store.root).name == "ray"
    assert choose_engine("local", rich_store.root).name == "local"


def test_reducers_do_not_depend_on_batching():
    rng = np.random.default_rng(0)
    n = 5000
    t = pa.table(
        {
            "sweep": ["s"] * n,
            "trial_id": rng.choice(["a", "b"], n).tolist(),
            "phase": rng.choice(["forget", "relearn"], n).tolist(),
            "epoch": pa.array(rng.integers(1, 9, n), pa.int32()),
            "eval_task": ["t"] * n,
            "split": ["test"] * n,
            "example_idx": pa.array(rng.integers(0, 50, n), pa.int32()),
            "confidence": pa.array(rng.random(n), pa.float32()),
            "correct": pa.array(rng.random(n) > 0.5),
        }
    )
    for red in (AccuracySums(), FirstCrossing()):
        whole = red.combine([red.partial(t)])
        pieces = red.combine([red.partial(t.slice(i, 337)) for i in range(0, n, 337)][::-1])
        assert whole.equals(pieces)


def test_duckdb_partial_matches_the_arrow_partial():
    """The local engine aggregates inside DuckDB; its partial must be the very same integers,
    tiny confidences (below 2**-17, where the fixed point rounds) included."""
    import duckdb

    rng = np.random.default_rng(1)
    n = 4000
    conf = np.concatenate([rng.random(n - 6), [0.0, 1.0, 0.6, 2.0**-30, 3.0 * 2.0**-42, 1e-9]]).astype(np.float32)
    t = pa.table(
        {
            "sweep": ["s"] * n,
            "trial_id": rng.choice(["a", "b", "c"], n).tolist(),
            "phase": ["forget"] * n,
            "epoch": pa.array(rng.integers(1, 4, n), pa.int32()),
            "eval_task": rng.choice(["x", "y"], n).tolist(),
            "split": ["test"] * n,
            "confidence": pa.array(conf),
            "correct": pa.array(rng.random(n) > 0.5),
        }
    )
    red = AccuracySums()
    con = duckdb.connect()
    con.register("rows_t", t)
    via_sql = red.combine([con.sql(red.partial_sql("rows_t")).to_arrow_table()])
    assert via_sql.equals(red.combine([red.partial(t)]))


def test_outcome_table_renders(local):
    console = Console(record=True, width=400)
    console.print(outcome_table(local["flipped"]))
    text = console.export_text()
    assert "forget_ratio[flipped]" in text and "0.750" in text
    skipped = registry.get("order")
    from raysweep.analysis import AnalysisOutcome

    console.print(outcome_table(AnalysisOutcome(skipped.name, "skipped", "no relearn phase [x]")))
    assert "no relearn phase [x]" in console.export_text()


@pytest.mark.slow
def test_ray_engine_gives_identical_results(rich_store, local, ray_cluster):
    ray_out = {o.name: o for o in run_analyses(rich_store, only=ALL, engine="ray")}
    for name in ALL:
        a, b = local[name], ray_out[name]
        assert (b.engine, b.status, b.message) == ("ray", a.status, a.message)
        assert list(a.tables) == list(b.tables)
        for t in a.tables:
            assert a.tables[t].equals(b.tables[t]), (name, t)


def test_the_forget_ratio_baseline_is_the_one_the_trials_row_records_and_needs_no_method_code(tmp_path):
    """A method this raysweep does not know, recorded as aiming at the mirror of the
    fine-tuned accuracy: the analyses read the row, in a process that never imports torch."""
    import subprocess
    import sys

    from analysis_helpers import TrialSpec, TrialWriter

    from raysweep.store import Store

    store = Store(tmp_path / "store")
    store.ensure()
    spec = TrialSpec("x", "m1", "t0", method="mirror_method", eval_tasks=["t0"])
    w = TrialWriter(store, spec, splits=("test",))
    for phase, epoch, p in (("pretrained", 0, 0.5), ("finetune", 1, 0.75), ("forget", 1, 0.375)):
        w.epoch(phase, epoch, {("t0", "test"): [0.8] * int(p * 8) + [0.3] * (8 - int(p * 8))})
    w.finish(best_finetune=1, last_forget=1)
    store.write_trial_row({**store.read_trial_row(w.sweep, "x"), "ratio_formula": "flipped"})
    code = (
        "import json, sys\n"
        "from raysweep.analysis import run_analyses\n"
        "from raysweep.store import Store\n"
        f"(o,) = run_analyses(Store({str(store.root)!r}), only=['single_task'], engine='local')\n"
        "r = o.tables['tasks'].to_pylist()[0]\n"
        "print(json.dumps([r['forget_ratio'], r['ratio_formula'], 'torch' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # (0.75 - 0.375) / (0.75 - 0.25): the flipped baseline, not (0.75 - 0.375) / (0.75 - 0.5).
    assert json.loads(out.splitlines()[-1]) == [0.75, "flipped", False]
