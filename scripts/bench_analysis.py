#!/usr/bin/env python
"""Benchmark the analyses: local engine vs Ray engine vs a hand-written DuckDB query of the
same computation, on a synthetic store in the real schema.

    .venv/bin/python scripts/bench_analysis.py                  # 10 million score rows
    .venv/bin/python scripts/bench_analysis.py --rows 1000000   # a quick check

The store is written under --dir (default: a temporary directory, removed afterwards unless
--keep) through `Store.commit_epoch`, like a sweep writes it: one file per (trial, phase,
epoch) holding every eval task x split x example. The sweep has four conditions so that no
analysis skips: m1/random/n=1000, m1/flipped/n=1000, m2/random/n=1000, m1/random/n=100,
each forgetting every task, with relearning and milestone hidden states of the forget task.

Each analysis is timed on its own (a fresh context, so shared scans are not reused), after
one untimed pass that warms the page cache; engines take turns, --repeat times, and the
fastest run counts. Peak memory, sampled every 50 ms while an analysis runs: for Ray the
resident sets of this process plus all its descendants (the cluster started here, workers
included); for the in-process engines, this process. Results: JSON (--out) and a markdown
table. The DuckDB column is a hand-written SQL version of each computation (aggregation in
SQL; clustering, p-values and probe fitting stay in scipy / scikit-learn, as in the engines).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raysweep.analysis import AnalysisParams, registered_analyses, run_analyses  # noqa: E402
from raysweep.analysis.context import SweepIndex  # noqa: E402
from raysweep.analysis.measures import upgma_order  # noqa: E402
from raysweep.analysis.probes import PROBE_MILESTONES, Pairs, ProbeJob, fit_probe  # noqa: E402
from raysweep.constants import PHASES, SPLITS  # noqa: E402
from raysweep.store import EPOCHS_SCHEMA, SCORES_SCHEMA, EpochKey, EpochRecord, Store, hidden_schema  # noqa: E402

SWEEP = "bench"
# The paper's analyses, each with a DuckDB reference below; others run without one.
PAPER_ANALYSES = (
    "single_task",
    "cross_task",
    "dataset_size",
    "flipped",
    "cross_model",
    "predictors",
    "order",
    "probes",
)
CONDITIONS = (("m1", "random", 1000), ("m1", "flipped", 1000), ("m2", "random", 1000), ("m1", "random", 100))


# ---- synthetic store ------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthConfig:
    rows: int
    tasks: int
    epochs: int  # per trial: 1 pretrained + the rest split over finetune / forget / relearn
    hidden_dim: int
    seed: int = 0

    @property
    def trials(self) -> int:
        return self.tasks * len(CONDITIONS)

    @property
    def per_split(self) -> int:
        return max(8, round(self.rows / (self.trials * self.epochs * self.tasks * len(SPLITS))))

    @property
    def phase_epochs(self) -> dict[str, int]:
        rest = self.epochs - 1
        ft = max(1, rest // 3)
        fg = max(1, (rest - ft) // 2)
        return {"pretrained": 1, "finetune": ft, "forget": fg, "relearn": max(1, rest - ft - fg)}


@dataclass
class GenStats:
    rows: int = 0
    files: int = 0
    score_bytes: int = 0
    seconds: float = 0.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate(root: Path, cfg: SynthConfig) -> GenStats:
    """Confidence trajectories with the paper's shape: partial skill when pretrained, a
    rise while fine-tuning, a task-dependent fall while forgetting (other tasks fall less),
    and a rise again while relearning, with per-example offsets so examples cross 0.6 at
    different epochs."""
    t0 = time.perf_counter()
    store = Store(root)
    store.ensure()
    rng = np.random.default_rng(cfg.seed)
    n = cfg.per_split
    tasks = [f"task{i:02d}" for i in range(cfg.tasks)]
    cols_per_file = cfg.tasks * len(SPLITS) * n
    eval_col = pa.array(np.repeat(np.array(tasks), len(SPLITS) * n))
    split_col = pa.array(np.tile(np.repeat(np.array(SPLITS), n), cfg.tasks))
    idx_col = pa.array(np.tile(np.arange(n, dtype=np.int32), cfg.tasks * len(SPLITS)))
    gold = rng.integers(0, 2, cols_per_file).astype(np.int8)
    base = rng.normal(0, 1, cols_per_file)  # example difficulty, shared by all trials
    resist = rng.uniform(0.2, 1.0, cfg.tasks)  # how hard each task is to forget
    stats = GenStats()
    pe = cfg.phase_epochs
    for model, method, size in CONDITIONS:
        for ti, task in enumerate(tasks):
            trial_id = f"{task}-{method}-n{size}-{model}"
            own = np.repeat(np.arange(cfg.tasks) == ti, len(SPLITS) * n)
            slope = rng.normal(1.0, 0.3, cols_per_file)
            best_ft = max(1, pe["finetune"] - 1)

            def confidence(phase: str, e: int) -> np.ndarray:
                if phase == "pretrained":
                    z = 0.3 + base
                elif phase == "finetune":
                    z = 0.3 + base + 0.8 * e * np.where(own, 1.0, 0.3)
                else:
                    top = 0.3 + base + 0.8 * best_ft * np.where(own, 1.0, 0.3)
                    ep = e if phase == "forget" else pe["forget"]
                    frac = np.minimum(1.0, ep / pe["forget"] * slope * np.where(own, 1.3 - resist[ti], 0.1))
                    # Random labels pull towards chance (z -> 0), flipped labels past it.
                    z = top * (1.0 - (2.0 if method == "flipped" else 1.0) * frac)
                    if phase == "relearn":
                        z = z + 0.7 * e * np.abs(2.0 - slope) * np.where(own, 1.0, 0.3)
                return _sigmoid(z + rng.normal(0, 0.05, cols_per_file)).astype(np.float32)

            milestones = {
                ("pretrained", 0),
                ("finetune", best_ft),
                ("forget", pe["forget"]),
                ("relearn", pe["relearn"]),
            }
            for phase in PHASES:
                epochs = [0] if phase == "pretrained" else list(range(1, pe[phase] + 1))
                for e in epochs:
                    conf = confidence(phase, e)
                    key = EpochKey(SWEEP, trial_id, phase, e)
                    scores = _scores(key, eval_col, split_col, idx_col, gold, conf)
                    hidden = (
                        _hidden(key, task, n, gold[own], cfg.hidden_dim, resist[ti], rng, phase)
                        if (phase, e) in milestones
                        else None
                    )
                    summary = pa.table(
                        {
                            "sweep": [SWEEP],
                            "trial_id": [trial_id],
                            "phase": [phase],
                            "epoch": [e],
                            "train_loss": [0.5],
                            "forget_train_acc": [0.5],
                            "forget_validation_acc": [0.5],
                            "forget_test_acc": [0.5],
                            "seconds": [1.0],
                        },
                        schema=EPOCHS_SCHEMA,
                    )
                    store.commit_epoch(EpochRecord(key=key, scores=scores, epoch_summary=summary, hidden=hidden))
                    stats.rows += scores.num_rows
                    stats.files += 1
            store.write_trial_row(
                dict(
                    sweep=SWEEP,
                    trial_id=trial_id,
                    model=model,
                    model_source="synthetic",
                    forget_task=task,
                    method=method,
                    size=size,
                    seed=0,
                    status="done",
                    attempts=1,
                    best_finetune_epoch=best_ft,
                    last_forget_epoch=pe["forget"],
                    last_relearn_epoch=pe["relearn"],
                )
            )
    stats.score_bytes = sum(p.stat().st_size for p in (root / "scores").rglob("*.parquet"))
    stats.seconds = time.perf_counter() - t0
    return stats


def _scores(key: EpochKey, eval_col, split_col, idx_col, gold: np.ndarray, conf: np.ndarray) -> pa.Table:
    n = len(conf)
    correct = conf > 0.5
    ll_c = np.log(conf)
    ll_d = np.log1p(-conf)
    return pa.table(
        {
            "sweep": pa.array([key.sweep] * n),
            "trial_id": pa.array([key.trial_id] * n),
            "phase": pa.array([key.phase] * n),
            "epoch": pa.array(np.full(n, key.epoch, np.int32)),
            "eval_task": eval_col,
            "split": split_col,
            "example_idx": idx_col,
            "gold": pa.array(gold),
            "ll_sum_correct": pa.array((5 * ll_c).astype(np.float32)),
            "ll_sum_distractor": pa.array((5 * ll_d).astype(np.float32)),
            "ll_mean_correct": pa.array(ll_c.astype(np.float32)),
            "ll_mean_distractor": pa.array(ll_d.astype(np.float32)),
            "n_tokens_correct": pa.array(np.full(n, 5, np.int16)),
            "n_tokens_distractor": pa.array(np.full(n, 5, np.int16)),
            "confidence": pa.array(conf),
            "prediction": pa.array(np.where(correct, gold, 1 - gold).astype(np.int8)),
            "correct": pa.array(correct),
            "min_k_correct": pa.array((ll_c * 1.5).astype(np.float32)),
            "min_k_distractor": pa.array((ll_d * 1.5).astype(np.float32)),
            "min_k_pp_correct": pa.array((ll_c + 1).astype(np.float32)),
            "min_k_pp_distractor": pa.array((ll_d + 1).astype(np.float32)),
        },
        schema=SCORES_SCHEMA,
    )


# The layer the analyses read by default, and one more that they must filter out.
PROBE_LAYER = AnalysisParams().layer
OTHER_LAYER = -2


def _hidden(key: EpochKey, task: str, n: int, gold: np.ndarray, dim: int, resist: float, rng, phase: str) -> pa.Table:
    """The forget task's states only (what the analyses read), as scoring writes them: one row
    per (example, layer). At the probed layer the correct answer's state leans along a direction
    that the distractor's does not, and stays so after forgetting; the last prompt token's state
    has a task-dependent spread for the variance predictor. The other layer is noise, so an
    analysis that mixes layers disagrees with the reference."""
    m = len(gold)
    signal = 0.0 if phase == "pretrained" else 1.0

    def vec(x: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), dim)

    parts = []
    for layer in (PROBE_LAYER, OTHER_LAYER):
        spread = 0.5 + resist if layer == PROBE_LAYER else 3.0
        prompt = rng.normal(0, spread, (m, dim))
        correct, distractor = prompt + rng.normal(0, 0.5, (m, dim)), prompt + rng.normal(0, 0.5, (m, dim))
        if layer == PROBE_LAYER:
            correct[:, 0] += signal
            distractor[:, 0] -= signal
        parts.append(
            pa.table(
                {
                    "sweep": [key.sweep] * m,
                    "trial_id": [key.trial_id] * m,
                    "phase": [key.phase] * m,
                    "epoch": pa.array(np.full(m, key.epoch, np.int32)),
                    "eval_task": [task] * m,
                    "split": np.repeat(np.array(SPLITS), n),
                    "example_idx": pa.array(np.tile(np.arange(n, dtype=np.int32), len(SPLITS))),
                    "layer": pa.array(np.full(m, layer, np.int16)),
                    "hidden": vec(prompt),
                    "hidden_correct": vec(correct),
                    "hidden_distractor": vec(distractor),
                },
                schema=hidden_schema(dim),
            )
        )
    return pa.concat_tables(parts)


# ---- measurement ---------------------------------------------------------------------------


class MemorySampler:
    """Peak RSS of this process and of this process plus its descendants (Ray's raylet,
    GCS and workers when the cluster was started here). RSS counts shared pages (the Ray
    object store) once per process that maps them, so the tree figure is an upper bound."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_tree = 0
        self.peak_self = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # pragma: no cover - psutil ships with ray
            self._proc = None

    def _sample(self) -> None:
        if self._proc is None:
            import resource

            self.peak_self = max(self.peak_self, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            self.peak_tree = max(self.peak_tree, self.peak_self)
            return
        own = self._proc.memory_info().rss
        total = own
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # noqa: BLE001 - a worker may exit between listing and reading
                pass
        self.peak_self = max(self.peak_self, own)
        self.peak_tree = max(self.peak_tree, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


@dataclass
class Timing:
    analysis: str
    engine: str
    seconds: float
    # Ray: this process and all its descendants (the cluster); local, duckdb: this process.
    peak_tree_mb: float
    peak_self_mb: float
    status: str
    check: str = ""


@dataclass
class Result:
    config: dict
    generated: dict
    machine: dict
    ray_init_seconds: float | None = None
    timings: list[Timing] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)


def measure(fn) -> tuple[float, MemorySampler, object]:
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - t0
    return secs, mem, out


# ---- the DuckDB reference: the same computations as hand-written SQL -----------------------------


def _files_sql(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


RATIO_SQL = """
CASE WHEN acc_finetuned - (CASE WHEN method = 'flipped' THEN 1 - acc_finetuned ELSE 0.5 END) > 0
     THEN (acc_finetuned - acc_forgotten) / (acc_finetuned - (CASE WHEN method = 'flipped' THEN 1 - acc_finetuned ELSE 0.5 END))
END
"""


class DuckRef:
    def __init__(self, store: Store, params: AnalysisParams):
        import duckdb

        self.store, self.params = store, params
        self.index = SweepIndex.build(store, None)
        self.con = duckdb.connect()
        self.con.register("ms", self.index.milestone_table())
        self.con.register("trials", self.index.trial_table())

    def cells(self) -> pa.Table:
        files = [f.path for f in self.index.milestone_files("scores", ("pretrained", "finetuned", "forgotten"))]
        acc = ",\n".join(
            f"sum(k) FILTER (WHERE milestone = '{m}') / sum(n) FILTER (WHERE milestone = '{m}') AS acc_{m},\n"
            f"sum(c) FILTER (WHERE milestone = '{m}') / sum(n) FILTER (WHERE milestone = '{m}') AS conf_{m}"
            for m in ("pretrained", "finetuned", "forgotten")
        )
        sql = f"""
        WITH s AS (
            SELECT sweep, trial_id, phase, epoch, eval_task, count(*) AS n, sum(correct::INTEGER) AS k, sum(confidence::DOUBLE) AS c
            FROM read_parquet({_files_sql(files)}) WHERE split = '{self.params.split}' GROUP BY ALL),
        j AS (
            SELECT ms.model, ms.method, ms.size, ms.forget_task, s.eval_task, ms.milestone, s.n, s.k, s.c
            FROM s JOIN ms USING (sweep, trial_id, phase, epoch)),
        cells AS (SELECT model, method, size, forget_task, eval_task, {acc} FROM j GROUP BY ALL)
        SELECT *, acc_forgotten - 0.5 AS forget_gap, {RATIO_SQL} AS forget_ratio FROM cells
        ORDER BY model, method, size, forget_task, eval_task
        """
        return self._q(sql)

    def _q(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()

    def single_task(self) -> pa.Table:
        self.con.register("cells_t", self.cells())
        return self._q("SELECT * FROM cells_t WHERE eval_task = forget_task ORDER BY model, method, size, forget_task")

    def cross_task(self) -> pa.Table:
        cells = self.cells()
        # The clustering is scipy's in both pipelines; only the aggregation is SQL here.
        keys = sorted(
            {(r["model"], r["method"], r["size"]) for r in cells.select(["model", "method", "size"]).to_pylist()}
        )
        for k in keys:
            rs = [
                r
                for r in cells.to_pylist()
                if (r["model"], r["method"], r["size"]) == k and r["acc_forgotten"] is not None
            ]
            rows = sorted({r["forget_task"] for r in rs})
            cols = sorted({r["eval_task"] for r in rs})
            m = np.zeros((len(rows), len(cols)))
            for r in rs:
                if r["forget_ratio"] is not None:
                    m[rows.index(r["forget_task"]), cols.index(r["eval_task"])] = r["forget_ratio"]
            upgma_order(m)
        return cells

    def _compare(self, axis: str, values: list[str] | None = None) -> pa.Table:
        self.con.register("cells_t", self.cells())
        held = [a for a in ("model", "method", "size") if a != axis]
        where = "" if values is None else "AND " + axis + " IN (" + ", ".join(f"'{v}'" for v in values) + ")"
        # Only groups that have something to compare: two axis values, or the anchor value.
        have = "bool_or(method = 'flipped')" if axis == "method" else f"count(DISTINCT {axis}) >= 2"
        where += f" AND ({', '.join(held)}) IN (SELECT ({', '.join(held)}) FROM cells_t WHERE 1=1 {where} GROUP BY ALL HAVING {have})"
        summary = self._q(
            f"PIVOT (SELECT {', '.join(held)}, forget_task, {axis}::VARCHAR AS v, forget_ratio FROM cells_t "
            f"WHERE eval_task = forget_task {where}) ON v USING first(forget_ratio) GROUP BY {', '.join(held)}, forget_task "
            f"ORDER BY {', '.join(held)}, forget_task"
        )
        self._q(
            f"SELECT {', '.join('a.' + h for h in held)}, a.{axis} AS a, b.{axis} AS b, count(*) AS n, corr(a.forget_ratio, b.forget_ratio) AS r "
            f"FROM cells_t a JOIN cells_t b USING ({', '.join(held)}, forget_task, eval_task) WHERE a.{axis}::VARCHAR < b.{axis}::VARCHAR GROUP BY ALL"
        )
        return summary

    def dataset_size(self) -> pa.Table:
        return self._compare("size")

    def flipped(self) -> pa.Table:
        return self._compare("method", ["flipped", "random"])

    def cross_model(self) -> pa.Table:
        return self._compare("model")

    def predictors(self) -> pa.Table:
        self.con.register("cells_t", self.cells())
        hidden = [f.path for f in self.index.milestone_files("hidden", ("finetuned",))]
        var = {}
        h = self._q(
            f"SELECT h.sweep, h.trial_id, h.hidden FROM read_parquet({_files_sql(hidden)}, union_by_name = true) h "
            f"JOIN trials t ON h.sweep = t.sweep AND h.trial_id = t.trial_id AND h.eval_task = t.forget_task "
            f"WHERE h.split = '{self.params.variance_split}' AND h.layer = {self.params.layer} "
            f"ORDER BY h.sweep, h.trial_id, h.example_idx"
        )
        tids = h["trial_id"].to_pylist()
        starts = [0] + [i for i in range(1, len(tids)) if tids[i] != tids[i - 1]] + [len(tids)]
        for a, b in zip(starts[:-1], starts[1:]):
            x = np.array(h["hidden"].slice(a, b - a).to_pylist(), dtype=np.float64)
            var[tids[a]] = float(np.var(x, axis=0, ddof=1).sum())
        scores = [f.path for f in self.index.milestone_files("scores", ("finetuned", "forgotten"))]
        self._q(
            f"""WITH x AS (
                SELECT s.sweep, s.trial_id, s.example_idx, ms.milestone, s.confidence::DOUBLE AS c, t.model, t.method, t.size, t.forget_task
                FROM read_parquet({_files_sql(scores)}) s JOIN ms USING (sweep, trial_id, phase, epoch)
                JOIN trials t ON s.sweep = t.sweep AND s.trial_id = t.trial_id AND s.eval_task = t.forget_task
                WHERE s.split = '{self.params.split}'),
            e AS (SELECT model, method, size, forget_task, sweep, trial_id, example_idx,
                         first(c) FILTER (WHERE milestone = 'finetuned') AS before,
                         first(c) FILTER (WHERE milestone = 'finetuned') - first(c) FILTER (WHERE milestone = 'forgotten') AS drop
                  FROM x GROUP BY ALL)
            SELECT model, method, size, forget_task, count(*) AS n, corr(before, drop) AS r FROM e GROUP BY ALL"""
        )
        tasks = self._q(
            "SELECT model, method, size, forget_task, forget_ratio, acc_finetuned, conf_finetuned FROM cells_t WHERE eval_task = forget_task"
        )
        tv = pa.array(
            [
                np.mean(
                    [
                        var[t]
                        for t in var
                        if t.startswith(r["forget_task"] + "-" + r["method"] + "-n" + str(r["size"]) + "-" + r["model"])
                    ]
                    or [np.nan]
                )
                for r in tasks.to_pylist()
            ]
        )
        return tasks.append_column("total_variance", tv)

    def order(self) -> pa.Table:
        files = [
            f.path for t in self.index.trials for f in self.index.phase_files("scores", ("forget", "relearn"), (t,))
        ]
        finetuned = [f.path for f in self.index.milestone_files("scores", ("finetuned",), self.index.trials)]
        thr = self.params.order_threshold
        # Only what was learned can be forgotten: forgettable if >= thr at the finetuned
        # milestone, relearnable if < thr at the last forget epoch (the forgotten milestone).
        return self._q(
            f"""WITH x AS (
                SELECT s.sweep, s.trial_id, s.example_idx, s.phase, s.epoch, s.confidence
                FROM read_parquet({_files_sql(files + finetuned)}) s
                JOIN trials t ON s.sweep = t.sweep AND s.trial_id = t.trial_id AND s.eval_task = t.forget_task
                WHERE s.split = '{self.params.order_split}'),
            st AS (SELECT x.sweep, x.trial_id, x.example_idx,
                          max(x.confidence) FILTER (WHERE ms.milestone = 'finetuned') AS c_ft,
                          max(x.confidence) FILTER (WHERE ms.milestone = 'forgotten') AS c_fg
                   FROM x JOIN ms ON x.sweep = ms.sweep AND x.trial_id = ms.trial_id
                                 AND x.phase = ms.phase AND x.epoch = ms.epoch
                   GROUP BY ALL),
            f AS (SELECT sweep, trial_id, example_idx,
                         min(epoch) FILTER (WHERE phase = 'forget' AND confidence <= {thr}::FLOAT) AS fe,
                         min(epoch) FILTER (WHERE phase = 'relearn' AND confidence >= {thr}::FLOAT) AS le
                  FROM x GROUP BY ALL),
            e AS (SELECT f.sweep, f.trial_id,
                         CASE WHEN st.c_ft >= {thr}::FLOAT THEN fe END AS fe,
                         CASE WHEN st.c_fg < {thr}::FLOAT THEN le END AS le
                  FROM f JOIN st USING (sweep, trial_id, example_idx)),
            k AS (SELECT t.model, t.method, t.size, t.forget_task, fe, le,
                         row_number() OVER (PARTITION BY t.model, t.method, t.size, t.forget_task ORDER BY fe) AS rf,
                         row_number() OVER (PARTITION BY t.model, t.method, t.size, t.forget_task ORDER BY le) AS rl
                  FROM e JOIN trials t USING (sweep, trial_id) WHERE fe IS NOT NULL AND le IS NOT NULL),
            r AS (SELECT *, avg(rf) OVER (PARTITION BY model, method, size, forget_task, fe) AS af,
                            avg(rl) OVER (PARTITION BY model, method, size, forget_task, le) AS al FROM k)
            SELECT model, method, size, forget_task, count(*) AS n_examples,
                   CASE WHEN count(*) > {self.params.order_min_examples} THEN corr(af, al) END AS spearman_r
            FROM r GROUP BY ALL ORDER BY model, method, size, forget_task"""
        )

    def probes(self) -> pa.Table:
        out = []
        by_model: dict[str, list] = {}
        for t in self.index.trials:
            by_model.setdefault(t.model, []).append(t)
        for model, trials in sorted(by_model.items()):
            hidden = [f.path for f in self.index.milestone_files("hidden", PROBE_MILESTONES, tuple(trials))]
            t = self._q(
                f"""SELECT h.sweep, h.trial_id, ms.milestone, h.split, h.example_idx,
                       h.hidden_correct, h.hidden_distractor
                FROM read_parquet({_files_sql(hidden)}) h
                JOIN trials t ON h.sweep = t.sweep AND h.trial_id = t.trial_id AND h.eval_task = t.forget_task
                JOIN ms ON h.sweep = ms.sweep AND h.trial_id = ms.trial_id AND h.phase = ms.phase AND h.epoch = ms.epoch
                WHERE h.layer = {self.params.layer}
                ORDER BY h.sweep, h.trial_id, ms.milestone, h.split, h.example_idx"""
            )

            def matrix(col: str) -> np.ndarray:
                arr = t[col].combine_chunks()
                return arr.flatten().to_numpy().reshape(len(arr), -1).astype(np.float64)

            xc, xd = matrix("hidden_correct"), matrix("hidden_distractor")
            keys = list(zip(t["trial_id"].to_pylist(), t["milestone"].to_pylist(), t["split"].to_pylist()))
            groups: dict[tuple, list[int]] = {}
            for i, k in enumerate(keys):
                groups.setdefault(k, []).append(i)
            for tr in trials:
                for m in PROBE_MILESTONES:
                    parts = {s: np.array(groups.get((tr.trial_id, m, s), []), dtype=np.int64) for s in SPLITS}
                    pairs = [Pairs(xc[parts[s]], xd[parts[s]]) for s in ("train", "validation", "test")]
                    job = ProbeJob(
                        tr.sweep, tr.trial_id, m, *pairs, self.params.probe_cs, self.params.bootstrap_resamples
                    )
                    out.append(fit_probe(job))
        return pa.Table.from_pylist([asdict(f) for f in out])


# ---- agreement checks between the DuckDB reference and the engines' outputs --------------------


def _max_diff(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if (
            x is None
            or y is None
            or (isinstance(x, float) and math.isnan(x))
            or (isinstance(y, float) and math.isnan(y))
        ):
            if not (
                (x is None or (isinstance(x, float) and math.isnan(x)))
                and (y is None or (isinstance(y, float) and math.isnan(y)))
            ):
                return math.inf
            continue
        worst = max(worst, abs(x - y))
    return worst if len(a) == len(b) else math.inf


def check(name: str, ref: pa.Table, tables: dict[str, pa.Table]) -> str:
    try:
        if name in ("single_task",):
            d = _max_diff(ref["forget_ratio"].to_pylist(), tables["tasks"]["forget_ratio"].to_pylist())
        elif name == "cross_task":
            c = tables["cells"].sort_by(
                [
                    ("model", "ascending"),
                    ("method", "ascending"),
                    ("size", "ascending"),
                    ("forget_task", "ascending"),
                    ("eval_task", "ascending"),
                ]
            )
            d = _max_diff(ref["forget_ratio"].to_pylist(), c["forget_ratio"].to_pylist())
        elif name in ("dataset_size", "flipped", "cross_model"):
            s = tables["summary"]
            cols = [c for c in s.column_names if c.startswith("forget_ratio[")]
            d = max(_max_diff(ref[c[len("forget_ratio[") : -1]].to_pylist(), s[c].to_pylist()) for c in cols)
        elif name == "predictors":
            t = tables["tasks"]
            d = max(
                _max_diff(ref["total_variance"].to_pylist(), t["total_variance"].to_pylist()),
                _max_diff(ref["conf_finetuned"].to_pylist(), t["conf_finetuned"].to_pylist()),
            )
        elif name == "order":
            t = tables["tasks"]
            d = _max_diff(ref["spearman_r"].to_pylist(), t["spearman_r"].to_pylist())
        elif name == "probes":
            f = tables["fits"].sort_by([("sweep", "ascending"), ("trial_id", "ascending"), ("milestone", "ascending")])
            r = ref.sort_by([("sweep", "ascending"), ("trial_id", "ascending"), ("milestone", "ascending")])
            d = _max_diff(r["test_acc"].to_pylist(), f["test_acc"].to_pylist())
        else:
            return "n/a"
    except Exception as exc:  # noqa: BLE001 - a mismatch of shapes is a failed check, not a crash
        return f"error: {type(exc).__name__}"
    return "agree" if d < 1e-6 else f"differs by {d:.3g}"


# ---- one (analysis, engine) per process -------------------------------------------------------


@dataclass
class ChildRun:
    """What a child process measured: `peak_self`/`peak_tree` as `MemorySampler` has them."""

    peak_self: int
    peak_tree: int
    ray_init_seconds: float | None = None


def _tables_dir(args: argparse.Namespace, name: str, engine: str) -> Path:
    return Path(args.dir or tempfile.gettempdir()) / "bench-tables" / name / engine


def run_child(args: argparse.Namespace, store: Store, name: str, engine: str) -> None:
    """Run one analysis on one engine in this (fresh) process; its tables go to parquet for
    the parent to compare, its measurement to stdout as one JSON line."""
    import pyarrow.parquet as pq

    out_dir = _tables_dir(args, name, engine)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    ray_init = None
    if engine == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus or None, include_dashboard=False, log_to_driver=False)
        # Start the workers before the clock does, as the in-process mode's warm-up job does.
        ray.data.range(64, override_num_blocks=8).map_batches(lambda b: b).materialize()
        ray_init = time.perf_counter() - t0
    if engine == "duckdb":
        secs, mem, ref = measure(lambda: getattr(DuckRef(store, AnalysisParams()), name)())
        pq.write_table(ref, out_dir / "reference.parquet")
        status = "ok"
    else:
        secs, mem, outs = measure(lambda: run_analyses(store, only=[name], engine=engine))
        for tname, table in outs[0].tables.items():
            pq.write_table(table, out_dir / f"{tname}.parquet")
        status = outs[0].status
    print(
        json.dumps(
            {
                "seconds": secs,
                "peak_self": mem.peak_self,
                "peak_tree": mem.peak_tree,
                "status": status,
                "ray_init_seconds": ray_init,
            }
        )
    )


def isolated(args: argparse.Namespace, engine: str, name: str) -> tuple[float, ChildRun, object]:
    import subprocess

    import pyarrow.parquet as pq

    cmd = [sys.executable, __file__, "--child", "--analyses", name, "--engines", engine]
    cmd += ["--rows", str(args.rows), "--tasks", str(args.tasks), "--epochs", str(args.epochs)]
    cmd += ["--hidden-dim", str(args.hidden_dim), "--dir", str(args.dir), "--ray-cpus", str(args.ray_cpus)]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    out_dir = _tables_dir(args, name, engine)
    tables = {p.stem: pq.read_table(p) for p in sorted(out_dir.glob("*.parquet"))}

    # What the comparisons read of an AnalysisOutcome: its status and tables.
    out = tables["reference"] if engine == "duckdb" else [SimpleNamespace(status=got["status"], tables=tables)]
    return got["seconds"], ChildRun(got["peak_self"], got["peak_tree"], got["ray_init_seconds"]), out


# ---- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Result:
    names = args.analyses.split(",") if args.analyses else [n for n in registered_analyses() if n in PAPER_ANALYSES]
    # local first: the other engines are checked against its tables.
    engines = sorted(args.engines.split(","), key=lambda e: ("local", "duckdb", "ray").index(e))
    cfg = SynthConfig(rows=args.rows, tasks=args.tasks, epochs=args.epochs, hidden_dim=args.hidden_dim)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-analysis-"))
    root = base / "store"
    marker = base / "config.json"
    if root.exists() and marker.is_file() and json.loads(marker.read_text()) == asdict(cfg):
        gen = GenStats(**json.loads((base / "generated.json").read_text()))
        print(f"reusing {root}", file=sys.stderr)
    else:
        if root.exists():
            shutil.rmtree(root)
        print(
            f"generating {cfg.rows:,} rows ({cfg.trials} trials x {cfg.epochs} epochs x {cfg.tasks} tasks x 3 splits x {cfg.per_split}) in {root}",
            file=sys.stderr,
        )
        gen = generate(root, cfg)
        marker.write_text(json.dumps(asdict(cfg)))
        (base / "generated.json").write_text(json.dumps(asdict(gen)))
    print(
        f"store: {gen.rows:,} rows in {gen.files} files, {gen.score_bytes / 1e6:.0f} MB of scores (generated in {gen.seconds:.0f} s)",
        file=sys.stderr,
    )
    store = Store(root)
    if args.child:
        return run_child(args, store, names[0], engines[0])
    if args.isolate:
        # Each (analysis, engine) runs in a process of its own, so its peak is its own and
        # not what an earlier analysis left resident. Only the page cache is warmed here.
        for f in sorted(root.rglob("*.parquet")):
            f.read_bytes()
    else:
        # One untimed pass: the page cache, lazy imports (scipy, sklearn) and first-call
        # costs would otherwise land on whichever engine is timed first.
        run_analyses(store, only=names, engine="local")

    import duckdb
    import ray

    res = Result(
        config=asdict(cfg),
        generated=asdict(gen),
        machine={
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "ray": ray.__version__,
            "duckdb": duckdb.__version__,
            "pyarrow": pa.__version__,
            "load_avg_at_start": os.getloadavg(),
        },
    )
    params = AnalysisParams()
    local_tables: dict[str, dict[str, pa.Table]] = {}
    if "ray" in engines and not args.isolate:
        t0 = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus or None, include_dashboard=False, log_to_driver=False)
        res.ray_init_seconds = time.perf_counter() - t0
        # Likewise for Ray: its first job starts the worker processes and imports.
        run_analyses(store, only=names[:1], engine="ray")

    def once(engine: str, name: str) -> tuple[float, MemorySampler, object]:
        if args.isolate:
            return isolated(args, engine, name)
        if engine == "duckdb":
            # The query needs the milestones too: reading them is part of its time.
            return measure(lambda: getattr(DuckRef(store, params), name)())
        return measure(lambda: run_analyses(store, only=[name], engine=engine))

    # Engines take turns within each repetition, so that load from other processes on a
    # shared machine falls on all of them alike; the fastest repetition is reported.
    for name in names:
        runs: dict[str, list[tuple[float, MemorySampler, object]]] = {e: [] for e in engines}
        mine = [e for e in engines if e != "duckdb" or hasattr(DuckRef, name)]
        for _ in range(max(1, args.repeat)):
            for engine in mine:
                runs[engine].append(once(engine, name))
                if isinstance(runs[engine][-1][1], ChildRun) and runs[engine][-1][1].ray_init_seconds:
                    res.ray_init_seconds = runs[engine][-1][1].ray_init_seconds
        for engine in mine:
            secs, _, out = min(runs[engine], key=lambda r: r[0])
            tree = max(r[1].peak_tree for r in runs[engine])
            own = max(r[1].peak_self for r in runs[engine])
            if engine == "duckdb":
                status = "ok"
                chk = check(name, out, local_tables[name]) if name in local_tables else ""
            else:
                o = out[0]
                status, chk = o.status, ""
                if engine == "local":
                    local_tables[name] = o.tables
                elif name in local_tables:
                    same = list(o.tables) == list(local_tables[name]) and all(
                        o.tables[t].equals(local_tables[name][t]) for t in o.tables
                    )
                    chk = "identical to local" if same else "DIFFERENT from local"
            # In-process engines: this process only (the idle Ray cluster is not theirs).
            peak = tree if engine == "ray" else own
            t = Timing(name, engine, round(secs, 3), round(peak / 1e6, 1), round(own / 1e6, 1), status, chk)
            res.timings.append(t)
            print(
                f"  {engine:6s} {name:13s} {secs:7.2f} s  peak {t.peak_tree_mb:7.0f} MB  {status} {chk}",
                file=sys.stderr,
            )
    by = {(t.analysis, t.engine): t for t in res.timings}
    for name in names:
        row: dict = {"analysis": name}
        for e in engines:
            if (name, e) in by:
                row[f"{e}_s"] = by[(name, e)].seconds
                row[f"{e}_peak_mb"] = by[(name, e)].peak_tree_mb
        if "duckdb" in engines:
            for e in ("local", "ray"):
                if f"{e}_s" in row and row.get("duckdb_s"):
                    row[f"{e}_vs_duckdb"] = round(row[f"{e}_s"] / row["duckdb_s"], 2)
        res.summary.append(row)
    if "ray" in engines and not args.isolate:
        ray.shutdown()
    if not args.dir and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return res


def markdown(res: Result) -> str:
    g = res.generated
    lines = [
        f"{g['rows']:,} score rows in {g['files']} files ({g['score_bytes'] / 1e6:.0f} MB), {res.machine['cpus']} CPUs, "
        f"ray.init {res.ray_init_seconds or 0:.1f} s (not counted)",
        "",
        "| analysis | local s | ray s | duckdb s | local/duckdb | ray/duckdb | peak MB local | peak MB ray | peak MB duckdb |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v: object) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    tot = {"local": 0.0, "ray": 0.0, "duckdb": 0.0}
    for r in res.summary:
        for e in tot:
            tot[e] += r.get(f"{e}_s") or 0.0
        lines.append(
            f"| {r['analysis']} | {f(r.get('local_s'))} | {f(r.get('ray_s'))} | {f(r.get('duckdb_s'))} | {f(r.get('local_vs_duckdb'))} | "
            f"{f(r.get('ray_vs_duckdb'))} | {f(r.get('local_peak_mb'))} | {f(r.get('ray_peak_mb'))} | {f(r.get('duckdb_peak_mb'))} |"
        )
    if tot["duckdb"]:
        lines.append(
            f"| **all** | {tot['local']:.2f} | {tot['ray']:.2f} | {tot['duckdb']:.2f} | {tot['local'] / tot['duckdb']:.2f} | "
            f"{tot['ray'] / tot['duckdb']:.2f} | | | |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="score rows to generate (approximately)")
    ap.add_argument("--tasks", type=int, default=12, help="tasks (each is a forget task and an eval task)")
    ap.add_argument("--epochs", type=int, default=12, help="epochs per trial over all phases")
    ap.add_argument("--hidden-dim", type=int, default=64)
    ap.add_argument("--dir", help="where to write (and reuse) the synthetic store; default: a temporary directory")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    ap.add_argument("--engines", default="local,duckdb,ray")
    ap.add_argument("--analyses", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per (analysis, engine); the fastest is reported")
    ap.add_argument("--ray-cpus", type=int, default=0, help="num_cpus for ray.init (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks_out" / "analysis.json"))
    ap.add_argument(
        "--isolate",
        action="store_true",
        help="run each (analysis, engine) in a fresh process (needs --dir): peaks are then each analysis's own",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.isolate and not args.dir:
        ap.error("--isolate needs --dir: the child processes read the store written there")
    res = run(args)
    if args.child:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(res), indent=1))
    print(markdown(res))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
