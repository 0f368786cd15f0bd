"""Predicting which examples a forget run will hit (Jin and Ren 2024), from the association
matrix (see `raysweep.analysis.association`): M forget runs x N evaluation examples, each
cell the forgetting of that example by that run.

The question is practical: given a new forget run and a handful of examples measured after
it (k revealed cells), how well can the rest of its row be filled in from the runs already
in the store? Evaluation is leave-one-row-out: each run in turn is held out, k of its cells
are revealed (drawn without replacement, a new draw per run and seed), the predictors see
the other runs in full plus those k cells, and are scored on the hidden cells only. "The
other runs" leaves out every run that shares the held-out run's model and forget task
(another seed, size, method or sweep of it): those are near-copies of the answer.

- RMSE of the predicted cells;
- F1 of "forgotten" (cell > threshold) against the truth, pooled over every hidden cell.
  Undefined (empty) when neither the truth nor the prediction has a forgotten cell.

Predictors (each fitted once per held-out row, then applied to every seed's reveal):

- `additive`: grand mean + row effect + column effect. Column effects come from the other
  runs; the held-out row's effect is the mean residual of its revealed cells.
- `knn_rows`: the mean of the `neighbors` other runs closest to the held-out run on its
  revealed cells (root-mean-square distance); with nothing revealed, of all runs.
- `low_rank`: column means + the top `rank` right singular vectors of the other runs'
  column-centred matrix; the held-out row's coefficients are fitted to its revealed cells by
  least squares, shrunk towards zero under a Gaussian prior whose variances are the other
  runs' coefficient variances and whose noise is what the basis leaves unexplained in them
  (so an exactly low-rank matrix gets the plain least-squares fit). Other runs are complete
  (only examples every run evaluated are used), so a truncated SVD is the exact low-rank
  fit; no alternating least squares is needed.
- `confidence`: the baseline of Zhang, Choshen and Andreas (2024), who relate an example's
  forgetting to its confidence before forgetting. Forgetting with random labels pulls
  confidence towards chance, so the cell is taken as proportional to how far above chance
  the example stood at the end of fine-tuning: s * (confidence_finetuned - 0.5), with one
  scale s per run (its forgetting strength) fitted by least squares to the revealed cells,
  or pooled over the other runs when nothing is revealed. It uses no other run's view of
  the same example, which is exactly what the association-based predictors add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from raysweep.analysis.association import association_matrix, check_measure
from raysweep.analysis.context import AnalysisContext, AnalysisParams
from raysweep.analysis.plotting import num
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome, run_analyses
from raysweep.constants import SPLITS
from raysweep.errors import BadInput
from raysweep.store import Store, trial_fields

CHANCE = 0.5
DEFAULT_THRESHOLD = 0.1


# ---- the prediction problem ---------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOutRow:
    """What a predictor may see of the held-out run."""

    conf_before: np.ndarray  # (N,) its confidence at the finetuned milestone (known before forgetting)
    revealed: np.ndarray  # (k,) column indices
    revealed_values: np.ndarray  # (k,) the true cells there


class RowModel(Protocol):
    def predict(self, row: HeldOutRow) -> np.ndarray:
        """The whole row, (N,); only hidden cells are scored."""


class Predictor(Protocol):
    name: ClassVar[str]

    def fit(self, others: np.ndarray, others_conf_before: np.ndarray) -> RowModel:
        """Fit on the other runs' complete rows, (M-1, N)."""


@dataclass(frozen=True)
class _AdditiveModel:
    grand: float
    col_effect: np.ndarray

    def predict(self, row: HeldOutRow) -> np.ndarray:
        base = self.grand + self.col_effect
        row_effect = float(np.mean(row.revealed_values - base[row.revealed])) if row.revealed.size else 0.0
        return base + row_effect


@dataclass(frozen=True)
class Additive:
    name: ClassVar[str] = "additive"

    def fit(self, others: np.ndarray, others_conf_before: np.ndarray) -> RowModel:
        grand = float(others.mean())
        return _AdditiveModel(grand, others.mean(axis=0) - grand)


@dataclass(frozen=True)
class _NearestModel:
    others: np.ndarray
    neighbors: int

    def predict(self, row: HeldOutRow) -> np.ndarray:
        if row.revealed.size == 0:
            return self.others.mean(axis=0)
        d = np.sqrt(np.mean((self.others[:, row.revealed] - row.revealed_values) ** 2, axis=1))
        nearest = np.argsort(d, kind="stable")[: self.neighbors]
        return self.others[nearest].mean(axis=0)


@dataclass(frozen=True)
class NearestRows:
    neighbors: int = 5
    name: ClassVar[str] = "knn_rows"

    def fit(self, others: np.ndarray, others_conf_before: np.ndarray) -> RowModel:
        return _NearestModel(others, self.neighbors)


@dataclass(frozen=True)
class _LowRankModel:
    col_mean: np.ndarray  # (N,)
    basis: np.ndarray  # (N, r): top right singular vectors of the other runs
    prior_var: np.ndarray  # (r,): variance of the other runs' coefficients on each vector
    noise_var: float  # per-cell variance the basis leaves unexplained in the other runs

    def predict(self, row: HeldOutRow) -> np.ndarray:
        if row.revealed.size == 0 or self.basis.shape[1] == 0:
            return self.col_mean.copy()
        a = self.basis[row.revealed]
        y = row.revealed_values - self.col_mean[row.revealed]
        if self.noise_var <= 0:
            w, *_ = np.linalg.lstsq(a, y, rcond=None)
        else:
            # A few noisy cells would otherwise set r coefficients freely: shrink each towards
            # zero as much as the other runs say it varies (the MAP fit under a Gaussian prior).
            w = np.linalg.solve(a.T @ a + np.diag(self.noise_var / self.prior_var), a.T @ y)
        return self.col_mean + self.basis @ w


@dataclass(frozen=True)
class LowRank:
    rank: int = 3
    name: ClassVar[str] = "low_rank"

    def fit(self, others: np.ndarray, others_conf_before: np.ndarray) -> RowModel:
        mean = others.mean(axis=0)
        xc = others - mean
        # The SVD through the runs' Gram matrix: M^2 N multiply-adds and an M x M eigenproblem,
        # where LAPACK's SVD of a wide M x N matrix is ~20x slower at 100 runs x 21000 examples.
        gram = xc @ xc.T
        eig, u = np.linalg.eigh(gram)
        eig, u = np.clip(eig[::-1], 0.0, None), u[:, ::-1]
        # Directions with no variance (below the Gram's rounding) carry nothing but the
        # revealed cells' noise.
        keep = int(min(self.rank, int((eig > eig[:1].max(initial=0.0) * 1e-12).sum())))
        m, n = others.shape
        basis = xc.T @ u[:, :keep] / np.sqrt(eig[:keep])
        noise = max(float(np.trace(gram)) - float(eig[:keep].sum()), 0.0) / (m * n)
        return _LowRankModel(mean, basis, eig[:keep] / m, noise)


@dataclass(frozen=True)
class _ConfidenceModel:
    pooled_scale: float

    def predict(self, row: HeldOutRow) -> np.ndarray:
        above = row.conf_before - CHANCE
        x = above[row.revealed]
        denom = float(x @ x)
        scale = float(x @ row.revealed_values) / denom if row.revealed.size and denom > 0 else self.pooled_scale
        return scale * above


@dataclass(frozen=True)
class ConfidenceBaseline:
    name: ClassVar[str] = "confidence"

    def fit(self, others: np.ndarray, others_conf_before: np.ndarray) -> RowModel:
        x = (others_conf_before - CHANCE).ravel()
        denom = float(x @ x)
        return _ConfidenceModel(float(x @ others.ravel()) / denom if denom > 0 else 0.0)


# ---- scores -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confusion:
    """Counts of "forgotten" (cell > threshold): truth against prediction."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: "Confusion") -> "Confusion":
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def f1(self) -> float | None:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else None

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn


def confusion(truth: np.ndarray, pred: np.ndarray, threshold: float) -> Confusion:
    t, p = np.asarray(truth) > threshold, np.asarray(pred) > threshold
    return Confusion(int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum()), int((~t & ~p).sum()))


def f1_score(truth: np.ndarray, pred: np.ndarray, threshold: float) -> float | None:
    return confusion(truth, pred, threshold).f1


def reveal(n_cols: int, k: int, seed: int, row: int) -> np.ndarray:
    """The k revealed columns of one held-out row under one seed (sorted, distinct)."""
    rng = np.random.default_rng([seed, row])
    return np.sort(rng.choice(n_cols, size=k, replace=False))


@dataclass(frozen=True)
class RowScore:
    predictor: str
    seed: int
    row: int
    n_hidden: int
    sse: float
    confusion: Confusion

    @property
    def rmse(self) -> float:
        return float(np.sqrt(self.sse / self.n_hidden))


def leave_one_row_out(
    values: np.ndarray,
    conf_before: np.ndarray,
    predictors: Sequence[Predictor],
    *,
    k: int,
    seeds: Sequence[int],
    threshold: float,
    groups: Sequence[object] | None = None,
) -> list[RowScore]:
    """Each row held out in turn. With `groups`, every row of the held-out row's group leaves
    the training rows with it: a twin of the held-out run (the same model and forget task
    under another seed, size, method or sweep) would otherwise hand the predictors its answer."""
    values = np.asarray(values, dtype=np.float64)
    conf_before = np.asarray(conf_before, dtype=np.float64)
    m, n = values.shape
    if conf_before.shape != values.shape:
        raise BadInput(
            f"predict: confidence matrix {conf_before.shape} does not match the association matrix {values.shape}"
        )
    if m < 2:
        raise BadInput(f"predict: leave-one-row-out needs 2+ rows (have {m})")
    if not 0 <= k < n:
        raise BadInput(
            f"predict: k={k} must be in [0, {n - 1}] for a matrix of {n} columns (at least one cell stays hidden)"
        )
    if not (np.isfinite(values).all() and np.isfinite(conf_before).all()):
        raise BadInput("predict: the matrix has unobserved cells; keep the complete columns first")
    group = np.arange(m) if groups is None else _group_codes(groups)
    if len(group) != m:
        raise BadInput(f"predict: {len(group)} group label(s) for {m} rows")
    if len(set(group.tolist())) < 2:
        raise BadInput("predict: every row is in one group: no run is left to learn from when it is held out")
    out: list[RowScore] = []
    for i in range(m):
        train = group != group[i]
        others, others_before = values[train], conf_before[train]
        models = [(p.name, p.fit(others, others_before)) for p in predictors]
        for seed in seeds:
            rev = reveal(n, k, seed, i)
            hidden = np.ones(n, dtype=bool)
            hidden[rev] = False
            row = HeldOutRow(conf_before[i].copy(), rev, values[i, rev].copy())
            truth = values[i, hidden]
            for name, model in models:
                pred = np.asarray(model.predict(row), dtype=np.float64)[hidden]
                err = pred - truth
                out.append(
                    RowScore(name, seed, i, int(hidden.sum()), float(err @ err), confusion(truth, pred, threshold))
                )
    return out


def _group_codes(groups: Sequence[object]) -> np.ndarray:
    codes: dict[object, int] = {}
    return np.array([codes.setdefault(g, len(codes)) for g in groups], dtype=np.int64)


@dataclass(frozen=True)
class PooledScore:
    """Scores pooled over a set of (row, seed) draws: RMSE over all their hidden cells."""

    n_cells: int
    rmse: float
    confusion: Confusion


def pool(scores: Sequence[RowScore]) -> PooledScore:
    n = sum(s.n_hidden for s in scores)
    sse = sum(s.sse for s in scores)
    conf = sum((s.confusion for s in scores), Confusion())
    return PooledScore(n, float(np.sqrt(sse / n)) if n else float("nan"), conf)


# ---- over a store -------------------------------------------------------------------------------


PREDICTOR_NAMES = ("additive", "knn_rows", "low_rank", "confidence")


@dataclass(frozen=True)
class PredictParams:
    k: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    threshold: float = DEFAULT_THRESHOLD
    measure: str = "confidence"
    neighbors: int = 5
    rank: int = 3
    split: str = "test"
    predictors: tuple[str, ...] = PREDICTOR_NAMES

    def __post_init__(self) -> None:
        check_measure(self.measure)
        if self.split not in SPLITS:
            raise BadInput(f"predict: split {self.split!r} is not one of train, validation, test")
        if self.k < 0:
            raise BadInput(f"predict: k must be >= 0 (got {self.k})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise BadInput(f"predict: seeds must be distinct and at least one (got {list(self.seeds)})")
        if self.neighbors < 1 or self.rank < 1:
            raise BadInput("predict: neighbors and rank must be >= 1")
        unknown = [p for p in self.predictors if p not in PREDICTOR_NAMES]
        if unknown or not self.predictors:
            raise BadInput(f"predict: unknown predictor(s) {unknown} (known: {', '.join(PREDICTOR_NAMES)})")

    def build(self) -> tuple[Predictor, ...]:
        made = {
            "additive": Additive(),
            "knn_rows": NearestRows(self.neighbors),
            "low_rank": LowRank(self.rank),
            "confidence": ConfidenceBaseline(),
        }
        return tuple(made[p] for p in self.predictors)


SUMMARY_SCHEMA = pa.schema(
    [
        ("predictor", pa.string()),
        ("measure", pa.string()),
        ("k", pa.int32()),
        ("threshold", pa.float64()),
        ("n_seeds", pa.int32()),
        ("n_runs", pa.int32()),
        ("n_examples", pa.int32()),
        ("forgotten_rate", pa.float64()),
        ("rmse_mean", pa.float64()),
        ("rmse_std", pa.float64()),
        ("f1_mean", pa.float64()),
        ("f1_std", pa.float64()),
    ]
)
BY_SEED_SCHEMA = pa.schema(
    [
        ("predictor", pa.string()),
        ("seed", pa.int32()),
        ("n_cells", pa.int64()),
        ("rmse", pa.float64()),
        ("f1", pa.float64()),
        ("precision", pa.float64()),
        ("recall", pa.float64()),
        ("tp", pa.int64()),
        ("fp", pa.int64()),
        ("fn", pa.int64()),
        ("tn", pa.int64()),
    ]
)
BY_RUN_SCHEMA = pa.schema(
    [("predictor", pa.string()), *trial_fields(), ("n_cells", pa.int64()), ("rmse", pa.float64()), ("f1", pa.float64())]
)


def _mean_std(xs: list[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in xs if x is not None and np.isfinite(x)]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None


def predict_result(ctx: AnalysisContext, params: PredictParams) -> AnalysisResult:
    """Leave-one-row-out evaluation of every predictor over the store's association matrix
    (the analysis split of the context; `params.split` only chooses it in `run_prediction`)."""
    full = association_matrix(ctx, params.measure)
    mat = full.complete_columns()
    m, n = mat.shape
    if m < 3:
        raise Skip(f"needs 3+ forget runs with scores at both milestones (have {m})")
    if n <= params.k:
        raise Skip(f"needs more than k={params.k} examples evaluated by every run (have {n})")
    groups = [(r.model, r.forget_task) for r in mat.rows]
    if len(set(groups)) < 2:
        raise Skip(
            f"needs forget runs of 2+ (model, forget task) pairs: runs sharing one are held out together "
            f"(have {len(set(groups))})"
        )
    predictors = params.build()
    scores = leave_one_row_out(
        mat.values,
        mat.conf_before,
        predictors,
        k=params.k,
        seeds=params.seeds,
        threshold=params.threshold,
        groups=groups,
    )

    seed_rows, summary_rows, run_rows = [], [], []
    for p in predictors:
        mine = [s for s in scores if s.predictor == p.name]
        per_seed = {seed: pool([s for s in mine if s.seed == seed]) for seed in params.seeds}
        for seed, ps in per_seed.items():
            c = ps.confusion
            seed_rows.append(
                {
                    "predictor": p.name,
                    "seed": seed,
                    "n_cells": ps.n_cells,
                    "rmse": ps.rmse,
                    "f1": c.f1,
                    "precision": c.precision,
                    "recall": c.recall,
                    "tp": c.tp,
                    "fp": c.fp,
                    "fn": c.fn,
                    "tn": c.tn,
                }
            )
        rmse_mean, rmse_std = _mean_std([ps.rmse for ps in per_seed.values()])
        f1_mean, f1_std = _mean_std([ps.confusion.f1 for ps in per_seed.values()])
        everything = pool(mine).confusion
        summary_rows.append(
            {
                "predictor": p.name,
                "measure": params.measure,
                "k": params.k,
                "threshold": params.threshold,
                "n_seeds": len(params.seeds),
                "n_runs": m,
                "n_examples": n,
                "forgotten_rate": (everything.tp + everything.fn) / everything.n if everything.n else None,
                "rmse_mean": rmse_mean,
                "rmse_std": rmse_std,
                "f1_mean": f1_mean,
                "f1_std": f1_std,
            }
        )
        for i, run in enumerate(mat.rows):
            ps = pool([s for s in mine if s.row == i])
            run_rows.append(
                {"predictor": p.name, **vars(run), "n_cells": ps.n_cells, "rmse": ps.rmse, "f1": ps.confusion.f1}
            )
    dropped = full.shape[1] - n
    msg = (
        f"leave-one-run-out over {m} run(s) x {n} {ctx.params.split} example(s), {params.measure}, k={params.k} revealed, "
        f"{len(params.seeds)} seed(s), forgotten = cell > {params.threshold:g}; runs sharing the held-out run's "
        f"(model, forget task) held out with it ({len(set(groups))} group(s))"
    )
    if dropped:
        msg += f"; {dropped} example(s) not evaluated by every run left out"
    tables = {
        "summary": pa.Table.from_pylist(summary_rows, schema=SUMMARY_SCHEMA),
        "by_seed": pa.Table.from_pylist(seed_rows, schema=BY_SEED_SCHEMA),
        "by_run": pa.Table.from_pylist(run_rows, schema=BY_RUN_SCHEMA),
    }
    return AnalysisResult(tables, msg)


NAME = "predict"


@register(NAME, title="Predicting forgetting from a few revealed examples", figure="Beyond: Jin & Ren")
def run(ctx: AnalysisContext) -> AnalysisResult:
    # `raysweep predict` hands its own parameters; `raysweep analyze` runs the defaults.
    params = ctx.params.args.get(NAME) or PredictParams(split=ctx.params.split)
    return predict_result(ctx, params)


def run_prediction(
    store: Store, params: PredictParams | None = None, sweep: str | None = None, engine: str = "auto"
) -> AnalysisOutcome:
    """The `predict` analysis with these parameters, written where `raysweep analyze` writes
    it, so the report shows the last run's parameters as long as the store has not changed
    since. A skipped run (too few runs or examples for these parameters) writes nothing: the
    last good results stay."""
    params = params or PredictParams()
    analysis = AnalysisParams(split=params.split, args={NAME: params})
    return run_analyses(store, [NAME], engine, sweep, params=analysis, write_skipped=False)[0]


@draws(NAME)
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    rs = o.tables["summary"].to_pylist()
    if not rs:
        return []
    x = np.arange(len(rs))
    names = [r["predictor"] for r in rs]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in (
        (axes[0], "rmse", "RMSE on hidden cells (lower is better)"),
        (axes[1], "f1", "F1 of forgotten (higher is better)"),
    ):
        means = [num(r[f"{key}_mean"]) for r in rs]
        errs = [0.0 if r[f"{key}_std"] is None else r[f"{key}_std"] for r in rs]
        ax.bar(x, means, yerr=errs, capsize=4, color=[f"C{i}" for i in range(len(rs))])
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_title(label, fontsize=9)
    r0 = rs[0]
    if r0["forgotten_rate"] is not None:
        axes[1].axhline(
            2 * r0["forgotten_rate"] / (1 + r0["forgotten_rate"]), ls="--", color="grey", lw=1, label="all forgotten"
        )
        axes[1].legend(fontsize=7)
    axes[1].set_ylim(0, 1.02)
    fig.suptitle(
        f"{r0['measure']}, k={r0['k']} revealed per run, {r0['n_runs']} runs x {r0['n_examples']} examples, {r0['n_seeds']} seed(s)",
        fontsize=9,
    )
    return [("prediction scores by predictor", fig)]
