"""The paper's measures (forget gap, forget ratio, the clustered matrix) on top of the
per-milestone sums.

A *cell* is (model, method, size, forget task, eval task). Its trials differ only in seed
(copies of one trial in several sweeps were already dropped by the index): each seed is a
replicate, so a cell reports the mean over seeds and a 95% interval (`intervals.py`): a
t-interval over seeds with two or more, a bootstrap over the examples with one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raysweep.analysis.intervals import (
    BOOTSTRAP,
    SEEDS_T,
    Correlation,
    correlation_estimates,
    percentile,
    rng_for,
    t_interval,
)
from raysweep.analysis.reducers import from_fixed_point
from raysweep.constants import MILESTONES
from raysweep.store import recorded_formula, trial_fields

MILESTONE_ACC = ("acc_pretrained", "acc_finetuned", "acc_forgotten")
WITH_INTERVALS = (*MILESTONE_ACC, "forget_gap", "forget_ratio")


def headroom(acc_ft: float | None, formula: str) -> float | None:
    """acc_ft - baseline: acc_ft - 0.5, or for flipped labels acc_ft - (1 - acc_ft)."""
    if acc_ft is None:
        return None
    return 2.0 * acc_ft - 1.0 if formula == "flipped" else acc_ft - 0.5


def forget_ratio(
    acc_ft: float | None,
    acc_forget: float | None,
    formula: str,
    min_headroom: float = 0.0,
    denominator_acc: float | None = None,
) -> float | None:
    """(acc_ft - acc_forget) / (a - baseline(a)), a = acc_ft unless `denominator_acc` (the
    evaluated task's own fine-tuned accuracy) is given. Undefined (None) where the headroom
    is at or below zero or under `min_headroom`: no above-chance skill worth a ratio."""
    if acc_ft is None or acc_forget is None:
        return None
    h = headroom(acc_ft if denominator_acc is None else denominator_acc, formula)
    if h is None or h <= 0 or h < min_headroom:
        return None
    return (acc_ft - acc_forget) / h


@dataclass
class Cell:
    """One (condition, forget task, eval task): accuracies and mean confidences at the
    pretrained / finetuned / forgotten milestones, means over the condition's seeds."""

    model: str
    method: str
    size: int
    forget_task: str
    eval_task: str
    n_trials: int = 0
    n_examples: int = 0
    acc_pretrained: float | None = None
    acc_finetuned: float | None = None
    acc_forgotten: float | None = None
    conf_pretrained: float | None = None
    conf_finetuned: float | None = None
    conf_forgotten: float | None = None
    # The mean over seeds of each seed's ratio, set by `cells_from_sums`; a Cell built by
    # hand (ratio_from_seeds False) computes its ratio from its accuracies.
    ratio: float | None = None
    ratio_from_seeds: bool = False
    headroom: float | None = None
    # The ratio was left undefined: headroom under the floor (or no diagonal run to divide by).
    masked: bool = False
    interval: str = ""
    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    # seed -> that seed's measures (accuracies, gap, ratio, conf_finetuned): what
    # correlations over tasks are computed from, seed by seed.
    per_seed: dict[int, dict[str, float | None]] = field(default_factory=dict)
    # The trials themselves (counts per milestone), for measures pooled over several cells
    # that need their own bootstrap.
    trials: list = field(default_factory=list, repr=False)
    ratio_formula: str = "random"  # the method's baseline (`recorded_formula`)

    @property
    def forget_gap(self) -> float | None:
        return None if self.acc_forgotten is None else self.acc_forgotten - 0.5

    @property
    def forget_ratio(self) -> float | None:
        if self.ratio_from_seeds:
            return self.ratio
        return forget_ratio(self.acc_finetuned, self.acc_forgotten, self.ratio_formula)


def _interval_fields() -> list[tuple[str, pa.DataType]]:
    out: list[tuple[str, pa.DataType]] = []
    for m in WITH_INTERVALS:
        out += [(m, pa.float64()), (f"{m}_lo", pa.float64()), (f"{m}_hi", pa.float64())]
    return out


CELL_SCHEMA = pa.schema(
    [
        *trial_fields("model", "method", "size", "forget_task"),
        ("eval_task", pa.string()),
        ("n_trials", pa.int32()),
        ("n_seeds", pa.int32()),
        ("n_examples", pa.int64()),
        *_interval_fields(),
        ("conf_pretrained", pa.float64()),
        ("conf_finetuned", pa.float64()),
        ("conf_forgotten", pa.float64()),
        ("headroom", pa.float64()),
        ("masked", pa.bool_()),
        ("ratio_formula", pa.string()),
        ("denominator", pa.string()),
        ("interval", pa.string()),
    ]
)


@dataclass(frozen=True)
class _Trial:
    seed: int
    counts: dict[str, tuple[int, int, int]]  # milestone -> (n, n_correct, confidence fixed-point sum)
    pairs: tuple[int, int, int, int] | None  # (n11, n10, n01, n00): right at finetuned / forgotten

    def acc(self, m: str) -> float | None:
        n, k, _ = self.counts.get(m, (0, 0, 0))
        return k / n if n else None

    def conf(self, m: str) -> float | None:
        n, _, fx = self.counts.get(m, (0, 0, 0))
        return from_fixed_point(fx) / n if n else None


@dataclass(frozen=True)
class RatioRule:
    formula: str
    min_headroom: float
    denominator: str  # trial | own


def cells_from_sums(
    sums: pa.Table,
    pairs: pa.Table | None = None,
    *,
    min_headroom: float = 0.0,
    denominator: str = "trial",
    resamples: int = 1000,
) -> list[Cell]:
    """Cells from the milestone sums (`AnalysisContext.accuracy_sums`) and, for single-seed
    bootstrap intervals, the paired counts (`AnalysisContext.paired_correct`)."""
    per: dict[tuple, dict[tuple[str, str], dict]] = {}
    seed_of: dict[tuple[str, str], int] = {}
    cols = [
        "sweep",
        "trial_id",
        "seed",
        "model",
        "method",
        "size",
        "forget_task",
        "eval_task",
        "milestone",
        "n",
        "n_correct",
        "conf_fx",
    ]
    formula_of: dict[tuple, str] = {}
    has_formula = "ratio_formula" in sums.column_names
    for r in sums.select(cols + ["ratio_formula"] if has_formula else cols).to_pylist():
        key = (r["model"], r["method"], r["size"], r["forget_task"], r["eval_task"])
        formula_of[key] = recorded_formula(r["method"], r.get("ratio_formula"))
        tr = (r["sweep"], r["trial_id"])
        seed_of[tr] = int(r["seed"])
        per.setdefault(key, {}).setdefault(tr, {})[r["milestone"]] = (r["n"], r["n_correct"], r["conf_fx"])
    pair_of = {}
    if pairs is not None:
        for r in pairs.to_pylist():
            pair_of[(r["sweep"], r["trial_id"], r["eval_task"])] = (r["n11"], r["n10"], r["n01"], r["n00"])
    trials = {
        key: {tr: _Trial(seed_of[tr], ms, pair_of.get((*tr, key[4]))) for tr, ms in sorted(v.items())}
        for key, v in per.items()
    }
    # The diagonal runs, for the "own" denominator: (model, method, size, task, seed) -> trial.
    diag = {(*key[:3], key[3], t.seed): t for key, v in trials.items() if key[3] == key[4] for t in v.values()}
    cells = []
    for key in sorted(trials):
        rule = RatioRule(formula_of[key], min_headroom, denominator)
        own = {}
        if denominator == "own":
            own = {t.seed: diag.get((*key[:3], key[4], t.seed)) for t in trials[key].values()}
        cells.append(_cell(key, list(trials[key].values()), own, rule, resamples))
    return cells


def _seed_values(t: _Trial, own: _Trial | None, rule: RatioRule) -> dict[str, float | None]:
    v: dict[str, float | None] = {m: t.acc(m.removeprefix("acc_")) for m in MILESTONE_ACC}
    fg = v["acc_forgotten"]
    v["forget_gap"] = None if fg is None else fg - 0.5
    denom = None
    if rule.denominator == "own":
        denom = own.acc("finetuned") if own is not None else None
        v["headroom"] = headroom(denom, rule.formula)
        ratio = forget_ratio(v["acc_finetuned"], fg, rule.formula, rule.min_headroom, denom)
        v["forget_ratio"] = ratio if denom is not None else None
    else:
        v["headroom"] = headroom(v["acc_finetuned"], rule.formula)
        v["forget_ratio"] = forget_ratio(v["acc_finetuned"], fg, rule.formula, rule.min_headroom)
    return v


def _cell(key: tuple, trials: list[_Trial], own: dict[int, _Trial | None], rule: RatioRule, resamples: int) -> Cell:
    c = Cell(*key, ratio_formula=rule.formula)
    ft_trials = [t for t in trials if t.counts.get("finetuned", (0,))[0]]
    c.n_trials = len(ft_trials)
    c.n_examples = sum(t.counts["finetuned"][0] for t in ft_trials)
    values = [_seed_values(t, own.get(t.seed), rule) for t in trials]
    c.per_seed = {
        t.seed: {**v, "conf_finetuned": t.conf("finetuned"), "conf_forgotten": t.conf("forgotten")}
        for t, v in zip(trials, values)
    }
    c.trials = list(trials)
    for m in MILESTONES:
        confs = [x for x in (t.conf(m) for t in trials) if x is not None]
        setattr(c, f"conf_{m}", float(np.mean(confs)) if confs else None)
    hs = [v["headroom"] for v in values if v["headroom"] is not None]
    c.headroom = float(np.mean(hs)) if hs else None
    c.interval = SEEDS_T if len(trials) >= 2 else BOOTSTRAP
    for m in WITH_INTERVALS:
        est = t_interval([v[m] for v in values])
        if m == "forget_ratio":
            c.ratio, c.ratio_from_seeds = est.value, True
        elif m != "forget_gap":  # the gap is acc_forgotten - 0.5, so its mean follows the accuracy's
            setattr(c, m, est.value)
        c.bounds[m] = (est.lo, est.hi)
    c.masked = c.acc_finetuned is not None and c.acc_forgotten is not None and c.forget_ratio is None
    if len(trials) == 1:
        t = trials[0]
        o = own.get(t.seed)
        c.bounds = _bootstrap(t, o, rule, resamples, rng_for(*key))
    return c


def _bootstrap(t: _Trial, own: _Trial | None, rule: RatioRule, resamples: int, rng: np.random.Generator) -> dict:
    """Percentile bounds from resampling one trial's examples. Finetuned and forgotten
    correctness are drawn together (a multinomial over the paired counts), pretrained alone;
    another trial's accuracy (the "own" denominator) is drawn from its own examples."""
    b = resamples
    out: dict[str, tuple[float | None, float | None]] = {m: (None, None) for m in WITH_INTERVALS}

    def binom(m: str, trial: _Trial) -> np.ndarray | None:
        n, k, _ = trial.counts.get(m, (0, 0, 0))
        return rng.binomial(n, k / n, b) / n if n else None

    pre = binom("pretrained", t)
    ft, fg = draw_finetuned_forgotten(t, rng, b)
    denom = ft
    if rule.denominator == "own" and own is not t:
        # The diagonal run is the trial itself on its own task; otherwise another trial.
        denom = binom("finetuned", own) if own is not None else None
    for m, d in (("acc_pretrained", pre), ("acc_finetuned", ft), ("acc_forgotten", fg)):
        if d is not None:
            out[m] = percentile(d)
    if fg is not None:
        out["forget_gap"] = percentile(fg - 0.5)
    if ft is not None and fg is not None and denom is not None:
        h = 2.0 * denom - 1.0 if rule.formula == "flipped" else denom - 0.5
        ok = (h > 0) & (h >= rule.min_headroom)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(ok, (ft - fg) / np.where(ok, h, 1.0), np.nan)
        out["forget_ratio"] = percentile(ratio)
    return out


def draw_finetuned_forgotten(
    t: _Trial, rng: np.random.Generator, b: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """b resampled (finetuned, forgotten) accuracies of one trial's examples, drawn together
    from the paired counts where the store has them."""
    if t.pairs is not None and sum(t.pairs):
        n = sum(t.pairs)
        draw = rng.multinomial(n, np.array(t.pairs) / n, b)
        return (draw[:, 0] + draw[:, 1]) / n, (draw[:, 0] + draw[:, 2]) / n
    out = []
    for m in ("finetuned", "forgotten"):
        n, k, _ = t.counts.get(m, (0, 0, 0))
        out.append(rng.binomial(n, k / n, b) / n if n else None)
    return out[0], out[1]


def cells_table(cells: list[Cell], denominator: str = "trial") -> pa.Table:
    rows = []
    for c in cells:
        names = (
            "model",
            "method",
            "size",
            "forget_task",
            "eval_task",
            "n_trials",
            "n_examples",
            "conf_pretrained",
            "conf_finetuned",
            "conf_forgotten",
            "headroom",
            "masked",
            "interval",
        )
        row = {n: getattr(c, n) for n in names}
        for m in WITH_INTERVALS:
            lo, hi = c.bounds.get(m, (None, None))
            row.update({m: getattr(c, m), f"{m}_lo": lo, f"{m}_hi": hi})
        row.update(n_seeds=c.n_trials, ratio_formula=c.ratio_formula, denominator=denominator)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=CELL_SCHEMA)


def masked_distances(m: np.ndarray) -> np.ndarray:
    """Condensed Euclidean distances between the rows of m over the columns both rows have,
    scaled up to the full width (sqrt(d / shared * width)), so a masked cell neither pulls
    two rows together (as a zero would) nor apart. Rows sharing no column get the largest
    distance seen."""
    ok = np.isfinite(m)
    n, width = m.shape
    d = []
    for i in range(n):
        for j in range(i + 1, n):
            both = ok[i] & ok[j]
            k = int(both.sum())
            d.append(math.sqrt(float(((m[i, both] - m[j, both]) ** 2).sum()) * width / k) if k else math.nan)
    arr = np.array(d, dtype=np.float64)
    known = arr[np.isfinite(arr)]
    return np.where(np.isfinite(arr), arr, known.max() if known.size else 0.0)


def upgma_order(matrix: np.ndarray) -> tuple[list[int], list[int]]:
    """Row and column orders from average-linkage (UPGMA) clustering with Euclidean distance,
    rows clustered on their vectors over columns and vice versa (Fig 3.2); masked (NaN)
    cells are left out of each distance (see `masked_distances`)."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    def order(m: np.ndarray) -> list[int]:
        if m.shape[0] < 2:
            return list(range(m.shape[0]))
        return [int(i) for i in leaves_list(linkage(masked_distances(m), method="average"))]

    return order(matrix), order(matrix.T)


CORRELATION_FIELDS = [
    ("n", pa.int64()),
    ("pearson_r", pa.float64()),
    ("pearson_p", pa.float64()),
    ("spearman_r", pa.float64()),
    ("spearman_p", pa.float64()),
]


CORRELATION_INTERVAL_FIELDS = CORRELATION_FIELDS + [
    ("pearson_r_lo", pa.float64()),
    ("pearson_r_hi", pa.float64()),
    ("spearman_r_lo", pa.float64()),
    ("spearman_r_hi", pa.float64()),
    ("n_seeds", pa.int32()),
    ("interval", pa.string()),
]


def agreement(a: list[Cell], b: list[Cell], value, resamples: int, key: tuple) -> dict[str, object]:
    """Correlation of `value` over the (forget task, eval task) cells two groups share, with
    its interval: per seed when both have the same two or more seeds, else over the cells'
    means with a bootstrap over the cells. `value(cell_or_seed_values)` reads a Cell or one
    seed's measures (a dict)."""
    va = {(c.forget_task, c.eval_task): c for c in a}
    vb = {(c.forget_task, c.eval_task): c for c in b}
    shared = sorted(set(va) & set(vb))
    seeds = sorted({s for k in shared for s in va[k].per_seed} & {s for k in shared for s in vb[k].per_seed})
    by_seed: dict[object, tuple[list, list]] = {}
    if len(seeds) >= 2:
        for s in seeds:
            both = [k for k in shared if s in va[k].per_seed and s in vb[k].per_seed]
            pts = [(va[k].per_seed[s], vb[k].per_seed[s]) for k in both]
            by_seed[s] = ([value(x) for x, _ in pts], [value(y) for _, y in pts])
    else:
        by_seed["cells"] = ([value(va[k]) for k in shared], [value(vb[k]) for k in shared])
    return correlation_estimates(by_seed, resamples, key)


def seed_value(name: str):
    """Reads measure `name` from a Cell (attribute) or from one seed's measures (dict)."""
    return lambda x: x.get(name) if isinstance(x, dict) else getattr(x, name)


def correlation_row(c: Correlation) -> dict[str, float | int | None]:
    return {
        "n": c.n,
        "pearson_r": c.pearson_r,
        "pearson_p": c.pearson_p,
        "spearman_r": c.spearman_r,
        "spearman_p": c.spearman_p,
    }
