"""What the analyses measure: pair probes at a named layer, one copy per trial, intervals
over seeds or examples, headroom masking, correlations with no built-in term, and learning
order over what was learned. Each store here is built so that the wrong measure gives a
visibly different answer from the right one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from analysis_helpers import SplitStates, TrialSpec, TrialWriter, build_cross_store, build_rich_store, hidden_table
from scipy import stats

from raysweep.analysis import AnalysisParams, run_analyses
from raysweep.analysis.measures import masked_distances, upgma_order
from raysweep.errors import BadInput
from raysweep.store import EpochKey, Store

SPLIT_N = {"train": 160, "validation": 60, "test": 200}


def _store(root) -> Store:
    store = Store(root)
    store.ensure()
    return store


def one(table: pa.Table, **where) -> dict:
    found = [r for r in table.to_pylist() if all(r[k] == v for k, v in where.items())]
    assert len(found) == 1, (where, found)
    return found[0]


# ---- Fig 6.1: pair probes -------------------------------------------------------------------


def _probe_states(kind: str, rng: np.random.Generator, dim: int = 6) -> dict[str, SplitStates]:
    out = {}
    for split, n in SPLIT_N.items():
        gold = np.arange(n) % 2
        prompt, correct, distractor = (0.1 * rng.normal(size=(n, dim)) for _ in range(3))
        # The prompt state always carries the gold position: a probe that reads it (the old
        # question-only probe) would look perfect whatever the pair states hold.
        prompt[:, 0] += 2 * gold - 1
        if kind == "pairs":
            correct[:, 1] += 1.0
            distractor[:, 1] -= 1.0
        elif kind == "position":
            # Slot 0's choice is +1, slot 1's -1: these states say where an answer sits, not
            # whether it is right.
            correct[:, 1] += np.where(gold == 0, 1.0, -1.0)
            distractor[:, 1] += np.where(gold == 0, -1.0, 1.0)
        out[split] = SplitStates(prompt, correct, distractor)
    return out


def build_probe_store(root, layers: dict[int, str]) -> Store:
    """One trial forgetting t0; at every milestone each layer in `layers` holds states of
    the given kind ("pairs" or "position")."""
    store = _store(root)
    spec = TrialSpec("t0-random-n100-s0", "m1", "t0", eval_tasks=["t0"])
    w = TrialWriter(store, spec)
    rng = np.random.default_rng(0)
    cells = {("t0", s): [0.8] * n for s, n in SPLIT_N.items()}
    for phase, epoch in (("pretrained", 0), ("finetune", 1), ("forget", 1)):
        key = EpochKey("s1", spec.trial_id, phase, epoch)
        h = pa.concat_tables(
            [hidden_table(key, "t0", _probe_states(kind, rng), layers=(layer,)) for layer, kind in layers.items()]
        )
        w.epoch(phase, epoch, cells, hidden=h)
    w.finish(best_finetune=1, last_forget=1)
    return store


def _probe_acc(store: Store, **params) -> dict:
    (o,) = run_analyses(store, only=["probes"], engine="local", params=AnalysisParams(**params))
    assert o.status == "ok", o.message
    return one(o.tables["summary"], forget_task="t0")


def test_probe_reads_correctness_from_the_pair_states(tmp_path):
    s = _probe_acc(build_probe_store(tmp_path / "s", {-5: "pairs"}))
    for m in ("pretrained", "finetuned", "forgotten"):
        assert s[f"probe_{m}"] >= 0.97
    assert s["layer"] == -5 and s["interval"] == "bootstrap95" and s["probe_forgotten_lo"] <= s["probe_forgotten"]


def test_probe_is_at_chance_when_only_the_answer_position_is_encoded(tmp_path):
    s = _probe_acc(build_probe_store(tmp_path / "s", {-5: "position"}))
    for m in ("pretrained", "finetuned", "forgotten"):
        assert 0.4 <= s[f"probe_{m}"] <= 0.6, (m, s[f"probe_{m}"])


def test_probe_reads_the_named_layer_and_says_when_it_is_missing(tmp_path):
    store = build_probe_store(tmp_path / "s", {-5: "position", -1: "pairs"})
    assert _probe_acc(store, layer=-1)["probe_finetuned"] >= 0.97
    assert _probe_acc(store, layer=-1)["layer"] == -1
    assert _probe_acc(store)["probe_finetuned"] <= 0.6
    (o,) = run_analyses(store, only=["probes"], engine="local", params=AnalysisParams(layer=-3))
    want = "the store's hidden states hold layer(s) -5, -1, not layer -3 (scoring.layers)"
    assert (o.status, o.message) == ("skipped", want)
    (o,) = run_analyses(store, only=["predictors"], engine="local", params=AnalysisParams(layer=-3))
    assert "not layer -3" in o.message and "total variance left empty" in o.message


# ---- one copy per trial ---------------------------------------------------------------------

EVERY = [
    "single_task",
    "cross_task",
    "dataset_size",
    "flipped",
    "cross_model",
    "predictors",
    "order",
    "probes",
    "association",
    "by_method",
    "predict",
    "forgetting_events",
    "membership",
    "relearning",
]


def test_a_sweep_stored_twice_analyses_as_once(tmp_path):
    once = {o.name: o for o in run_analyses(build_rich_store(tmp_path / "once"), only=EVERY, engine="local")}
    twice = {
        o.name: o
        for o in run_analyses(build_rich_store(tmp_path / "twice", sweeps=("s1", "s2")), only=EVERY, engine="local")
    }
    for name in EVERY:
        a, b = once[name], twice[name]
        assert (a.status, b.status) == ("ok", "ok"), (name, a.message, b.message)
        assert list(a.tables) == list(b.tables)
        for t in a.tables:
            assert a.tables[t].equals(b.tables[t]), (name, t)
        assert "7 duplicate trial copy(ies) left out" in b.message and "from s2" in b.message
        assert "duplicate" not in a.message


# ---- intervals ------------------------------------------------------------------------------


def _seeded_store(root, forgotten_k: dict[int, int], ft_k: int = 16) -> Store:
    """Forget task t0 evaluated on itself, one trial per seed; seed s keeps forgotten_k[s]
    of 16 test examples right after forgetting (all 16 right after fine-tuning)."""
    store = _store(root)
    for seed, k in forgotten_k.items():
        w = TrialWriter(store, TrialSpec(f"t0-s{seed}", "m1", "t0", seed=seed, eval_tasks=["t0"]), splits=("test",))
        w.epoch("pretrained", 0, {("t0", "test"): [0.8] * 8 + [0.3] * 8})
        w.epoch("finetune", 1, {("t0", "test"): [0.8] * ft_k + [0.3] * (16 - ft_k)})
        w.epoch("forget", 1, {("t0", "test"): [0.8] * k + [0.3] * (16 - k)})
        w.finish(best_finetune=1, last_forget=1)
    return store


def test_several_seeds_give_a_t_interval_over_seeds(tmp_path):
    ks = {0: 8, 1: 12, 2: 14}
    (o,) = run_analyses(_seeded_store(tmp_path / "s", ks), only=["single_task"], engine="local")
    r = one(o.tables["tasks"], forget_task="t0")
    ratios = [(1 - k / 16) / 0.5 for k in ks.values()]
    half = stats.t.ppf(0.975, 2) * np.std(ratios, ddof=1) / np.sqrt(3)
    assert (r["n_seeds"], r["interval"]) == (3, "seeds-t95")
    assert r["forget_ratio"] == pytest.approx(np.mean(ratios))
    want = (np.mean(ratios) - half, np.mean(ratios) + half)
    assert (r["forget_ratio_lo"], r["forget_ratio_hi"]) == pytest.approx(want)
    accs = [k / 16 for k in ks.values()]
    half = stats.t.ppf(0.975, 2) * np.std(accs, ddof=1) / np.sqrt(3)
    assert (r["acc_forgotten_lo"], r["acc_forgotten_hi"]) == pytest.approx((np.mean(accs) - half, np.mean(accs) + half))
    assert r["acc_finetuned_lo"] == r["acc_finetuned_hi"] == 1.0  # no spread over seeds


def test_one_seed_gives_a_seeded_bootstrap_over_examples(tmp_path):
    store = _seeded_store(tmp_path / "s", {0: 12})
    (a,) = run_analyses(store, only=["single_task"], engine="local")
    (b,) = run_analyses(store, only=["single_task"], engine="local")
    assert a.tables["tasks"].equals(b.tables["tasks"])
    r = one(a.tables["tasks"], forget_task="t0")
    assert (r["n_seeds"], r["interval"], r["forget_ratio"]) == (1, "bootstrap95", 0.5)
    # 12 of 16 right: a binomial bootstrap of the accuracy spans roughly +-0.2.
    assert 0.45 <= r["acc_forgotten_lo"] <= 0.65 and 0.85 <= r["acc_forgotten_hi"] <= 0.95
    assert r["forget_ratio_lo"] < 0.5 < r["forget_ratio_hi"]
    assert r["acc_pretrained_lo"] < 0.5 < r["acc_pretrained_hi"]


# ---- headroom -------------------------------------------------------------------------------


def test_cells_without_headroom_are_masked_and_counted(tmp_path):
    store = build_cross_store(tmp_path / "s")
    (o,) = run_analyses(store, only=["cross_task"], engine="local")
    cell = one(o.tables["cells"], forget_task="a", eval_task="b")
    assert cell["masked"] and cell["forget_ratio"] is None and cell["headroom"] == pytest.approx(1 / 32)
    assert "1 of 4 cell(s) masked (headroom below 0.05, trial denominator)" in o.message
    assert not one(o.tables["cells"], forget_task="b", eval_task="a")["masked"]
    (o,) = run_analyses(store, only=["cross_task"], engine="local", params=AnalysisParams(min_headroom=0.0))
    cell = one(o.tables["cells"], forget_task="a", eval_task="b")
    assert not cell["masked"] and cell["forget_ratio"] == pytest.approx((17 / 32 - 0.5) / (1 / 32))


def test_own_denominator_divides_by_the_diagonal_run(tmp_path):
    store = build_cross_store(tmp_path / "s")
    (o,) = run_analyses(store, only=["cross_task"], engine="local", params=AnalysisParams(denominator="own"))
    cell = one(o.tables["cells"], forget_task="a", eval_task="b")
    # b's own fine-tuned accuracy (1.0, in trial b) is the denominator: headroom 0.5.
    assert not cell["masked"] and cell["denominator"] == "own"
    assert cell["forget_ratio"] == pytest.approx((17 / 32 - 0.5) / 0.5)
    assert one(o.tables["cells"], forget_task="b", eval_task="a")["forget_ratio"] == pytest.approx(0.5)
    diag = one(o.tables["cells"], forget_task="a", eval_task="a")
    assert diag["forget_ratio_lo"] is not None
    assert diag["forget_ratio_lo"] <= diag["forget_ratio"] <= diag["forget_ratio_hi"]
    with pytest.raises(BadInput, match="denominator"):
        AnalysisParams(denominator="mean")


def test_upgma_distance_ignores_masked_cells():
    # Rows 0 and 1 agree wherever both are defined; row 1's masked cells read as 0 would put
    # it with rows 2 and 3 instead.
    from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
    from scipy.spatial.distance import pdist

    m = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, np.nan, np.nan], [0.0, 0.2, 0.0, 0.0], [0.1, 0.0, 0.0, 0.1]])
    d = masked_distances(m)
    assert d[0] == 0.0  # rows 0 and 1
    two = fcluster(linkage(d, method="average"), 2, criterion="maxclust")
    assert two[0] == two[1] != two[2] == two[3]
    zero = fcluster(linkage(pdist(np.nan_to_num(m)), method="average"), 2, criterion="maxclust")
    assert zero[1] == zero[2] != zero[0]
    # Complete rows: exactly the Euclidean distances.
    full = np.random.default_rng(0).normal(size=(5, 7))
    np.testing.assert_allclose(masked_distances(full), pdist(full))
    assert upgma_order(full)[0] == [int(i) for i in leaves_list(linkage(pdist(full), method="average"))]


# ---- Fig 4.1 example level ------------------------------------------------------------------


def test_forgetting_that_ignores_confidence_correlates_with_nothing(tmp_path):
    store = _store(tmp_path / "s")
    rng = np.random.default_rng(3)
    n = 600
    before = rng.uniform(0.55, 0.95, n).tolist()
    after = rng.uniform(0.05, 0.95, n).tolist()  # drawn without looking at `before`
    w = TrialWriter(store, TrialSpec("t0-s0", "m1", "t0", eval_tasks=["t0"]), splits=("test",))
    w.epoch("finetune", 1, {("t0", "test"): before})
    w.epoch("forget", 1, {("t0", "test"): after})
    w.finish(best_finetune=1, last_forget=1)
    (o,) = run_analyses(store, only=["predictors"], engine="local")
    ec = o.tables["example_correlations"]
    for target in ("conf_after", "forgotten"):
        r = one(ec, forget_task="t0", target=target)
        assert abs(r["pearson_r"]) < 0.1 and abs(r["spearman_r"]) < 0.1, r
        assert r["pearson_r_lo"] < 0 < r["pearson_r_hi"]
    assert abs(one(ec, forget_task="t0", target="forgotten")["auc"] - 0.5) < 0.06
    # The drop, by contrast, contains `before` and correlates with it however forgetting works.
    ex = o.tables["examples"]
    assert stats.pearsonr(ex["conf_before"].to_numpy(), ex["conf_drop"].to_numpy()).statistic > 0.3


# ---- Fig 5.1 ---------------------------------------------------------------------------------


def test_order_counts_only_what_was_learned(tmp_path):
    store = _store(tmp_path / "s")
    n = 120

    # i < 100: learned (0.9), forgotten at 1 + i % 4, relearned at 4 - i % 4.
    # 100 <= i < 110: never learned (0.55 until relearn epoch 2: <= 0.6 at forget epoch 1,
    # which counted them as forgotten there), learned in relearn epoch 2.
    # i >= 110: learned and never forgotten (0.9 at the last forget epoch: not relearnable,
    # though it passes 0.6 in relearn epoch 1).
    def conf(phase: str, e: int, i: int) -> float:
        if 100 <= i < 110:
            return 0.8 if phase == "relearn" and e >= 2 else 0.55
        if phase == "finetune" or i >= 110:
            return 0.9
        if phase == "forget":
            return 0.9 if e < 1 + i % 4 else 0.4
        return 0.3 if e < 4 - i % 4 else 0.8

    w = TrialWriter(store, TrialSpec("t0-s0", "m1", "t0", eval_tasks=["t0"]), splits=("train",))
    w.epoch("finetune", 1, {("t0", "train"): [conf("finetune", 1, i) for i in range(n)]})
    for phase in ("forget", "relearn"):
        for e in range(1, 5):
            w.epoch(phase, e, {("t0", "train"): [conf(phase, e, i) for i in range(n)]})
    w.finish(best_finetune=1, last_forget=4, last_relearn=4)
    (o,) = run_analyses(store, only=["order"], engine="local", params=AnalysisParams(order_min_examples=50))
    assert o.status == "ok", o.message
    t = one(o.tables["tasks"], forget_task="t0")
    assert (t["n_forgotten"], t["n_learned"], t["n_examples"]) == (100, 110, 100)
    assert t["spearman_r"] == pytest.approx(-1.0)
    ex = {r["example_idx"]: r for r in o.tables["examples"].to_pylist()}
    assert set(ex) == set(range(100))


def test_by_method_ratios_carry_a_t_interval_over_seeds(tmp_path):
    store = _store(tmp_path / "s")
    lost = {("random", 0): 8, ("random", 1): 4, ("gradient_ascent", 0): 2, ("gradient_ascent", 1): 2}
    for (method, seed), k in lost.items():
        spec = TrialSpec(f"t0-{method}-s{seed}", "m1", "t0", method=method, seed=seed, eval_tasks=["t0"])
        w = TrialWriter(store, spec, splits=("test",))
        w.epoch("finetune", 1, {("t0", "test"): [0.8] * 16})
        w.epoch("forget", 1, {("t0", "test"): [0.8] * (16 - k) + [0.3] * k})
        w.finish(best_finetune=1, last_forget=1)
    (o,) = run_analyses(store, only=["by_method"], engine="local")
    r = one(o.tables["methods"], method="random")
    per = [8 / 16 / 0.5, 4 / 16 / 0.5]
    half = stats.t.ppf(0.975, 1) * np.std(per, ddof=1) / np.sqrt(2)
    assert (r["n_seeds"], r["interval"]) == (2, "seeds-t95")
    assert r["ratio_own"] == pytest.approx(np.mean(per))
    assert (r["ratio_own_lo"], r["ratio_own_hi"]) == pytest.approx((np.mean(per) - half, np.mean(per) + half))
    g = one(o.tables["methods"], method="gradient_ascent")
    assert g["ratio_own"] == pytest.approx(0.25) and g["ratio_own_lo"] == pytest.approx(0.25)


def test_cli_analysis_options(tmp_path):
    from typer.testing import CliRunner

    from raysweep.cli import app

    store = build_cross_store(tmp_path / "s")
    res = CliRunner().invoke(
        app,
        [
            "analyze",
            "--store",
            str(store.root),
            "--only",
            "cross_task",
            "--engine",
            "local",
            "--min-headroom",
            "0",
            "--denominator",
            "own",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "0 of 4 cell(s) masked (headroom below 0, own denominator)" in " ".join(res.output.split())
    for bad in (["--denominator", "mean"], ["--min-headroom", "0.7"]):
        res = CliRunner().invoke(app, ["analyze", "--store", str(store.root), "--engine", "local", *bad])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert not (store.root / "analysis" / "single_task").exists()  # nothing written on bad input


@pytest.mark.slow
def test_ray_engine_agrees_on_copies_layers_and_intervals(tmp_path):
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cases = [
            (build_rich_store(tmp_path / "twice", sweeps=("s1", "s2")), EVERY, AnalysisParams()),
            (
                build_probe_store(tmp_path / "layers", {-5: "position", -1: "pairs"}),
                ["probes", "predictors"],
                AnalysisParams(layer=-1),
            ),
        ]
        for store, names, params in cases:
            local = run_analyses(store, only=names, engine="local", params=params)
            remote = run_analyses(store, only=names, engine="ray", params=params)
            for a, b in zip(local, remote):
                assert (a.name, a.status, a.message) == (b.name, b.status, b.message)
                for t in a.tables:
                    assert a.tables[t].equals(b.tables[t]), (a.name, t)
    finally:
        if started:
            ray.shutdown()


def test_paired_counts_do_not_depend_on_batching():
    from raysweep.analysis.reducers import PairedCorrect

    rng = np.random.default_rng(5)
    n = 3000
    phase = rng.choice(["finetune", "forget", "pretrained"], n)
    t = pa.table(
        {
            "sweep": ["s"] * n,
            "trial_id": rng.choice(["a", "b"], n).tolist(),
            "phase": phase.tolist(),
            "epoch": pa.array(np.where(phase == "finetune", 2, np.where(phase == "forget", 3, 0)), pa.int32()),
            "eval_task": rng.choice(["x", "y"], n).tolist(),
            "example_idx": pa.array(rng.integers(0, 5000, n), pa.int32()),
            "correct": pa.array(rng.random(n) > 0.5),
        }
    )
    # Each (trial, task, example, phase) once, as in a store.
    keep = {}
    for i, r in enumerate(t.select(["trial_id", "eval_task", "example_idx", "phase"]).to_pylist()):
        keep.setdefault(tuple(r.values()), i)
    t = t.take(pa.array(sorted(keep.values())))
    red = PairedCorrect(
        (
            ("s", "a", "finetune", 2, 0),
            ("s", "a", "forget", 3, 1),
            ("s", "b", "finetune", 2, 0),
            ("s", "b", "forget", 3, 1),
        )
    )
    whole = red.combine([red.partial(t)])
    pieces = red.combine([red.partial(t.slice(i, 211)) for i in range(0, t.num_rows, 211)][::-1])
    assert whole.equals(pieces)
    rows = t.to_pylist()
    ft = {(r["trial_id"], r["eval_task"], r["example_idx"]): r["correct"] for r in rows if r["phase"] == "finetune"}
    fg = {(r["trial_id"], r["eval_task"], r["example_idx"]): r["correct"] for r in rows if r["phase"] == "forget"}
    for r in whole.to_pylist():
        both = [k for k in ft if k in fg and k[:2] == (r["trial_id"], r["eval_task"])]
        assert r["n11"] == sum(ft[k] and fg[k] for k in both) and r["n10"] == sum(ft[k] and not fg[k] for k in both)
        assert r["n01"] == sum(fg[k] and not ft[k] for k in both)
        assert r["n00"] == sum(not (ft[k] or fg[k]) for k in both)
