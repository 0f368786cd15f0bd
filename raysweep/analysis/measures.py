"""The paper's measures (PAPER.md section 4) on top of the per-milestone sums.

A *condition* is (model, method, size): trials that differ only in seed (or sweep) are
pooled by summing their counts, so a condition's accuracy is correct / evaluated over all
its seeds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa

from raysweep.analysis.reducers import from_fixed_point

def ratio_formula(method: str) -> str:
    """Flipped labels push accuracy towards 1 - acc_ft rather than chance: the paper's
    Appendix C baseline. Random labels, gradient ascent and NPO aim at chance (1/2). The
    method registry says which; a method it does not know (a store from a newer raysweep)
    is read with the random-label formula."""
    from raysweep.methods import registered_methods, get_method

    return get_method(method).ratio_formula if method in registered_methods() else "random"


def forget_ratio(acc_ft: float | None, acc_forget: float | None, method: str) -> float | None:
    """(acc_ft - acc_forget) / (acc_ft - baseline). Undefined (None) where fine-tuned
    accuracy is at or below chance: there is no above-chance skill to forget."""
    if acc_ft is None or acc_forget is None:
        return None
    baseline = 1.0 - acc_ft if ratio_formula(method) == "flipped" else 0.5
    denom = acc_ft - baseline
    if denom <= 0:
        return None
    return (acc_ft - acc_forget) / denom


@dataclass
class Cell:
    """One (condition, forget task, eval task): accuracies and mean confidences at the
    pretrained / finetuned / forgotten milestones, pooled over the condition's trials."""

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

    @property
    def forget_gap(self) -> float | None:
        return None if self.acc_forgotten is None else self.acc_forgotten - 0.5

    @property
    def forget_ratio(self) -> float | None:
        return forget_ratio(self.acc_finetuned, self.acc_forgotten, self.method)


CELL_SCHEMA = pa.schema(
    [
        ("model", pa.string()), ("method", pa.string()), ("size", pa.int32()), ("forget_task", pa.string()),
        ("eval_task", pa.string()), ("n_trials", pa.int32()), ("n_examples", pa.int64()),
        ("acc_pretrained", pa.float64()), ("acc_finetuned", pa.float64()), ("acc_forgotten", pa.float64()),
        ("conf_pretrained", pa.float64()), ("conf_finetuned", pa.float64()), ("conf_forgotten", pa.float64()),
        ("forget_gap", pa.float64()), ("forget_ratio", pa.float64()), ("ratio_formula", pa.string()),
    ]
)


def cells_from_sums(sums: pa.Table) -> list[Cell]:
    """Pool the milestone sums (from `AnalysisContext.accuracy_sums`) into cells."""
    acc: dict[tuple, dict[str, list[int]]] = {}
    for r in sums.select(["model", "method", "size", "forget_task", "eval_task", "milestone", "n", "n_correct", "conf_fx"]).to_pylist():
        key = (r["model"], r["method"], r["size"], r["forget_task"], r["eval_task"])
        tot = acc.setdefault(key, {}).setdefault(r["milestone"], [0, 0, 0, 0])
        tot[0] += r["n"]
        tot[1] += r["n_correct"]
        tot[2] += r["conf_fx"]
        tot[3] += 1
    cells = []
    for key in sorted(acc):
        c = Cell(*key)
        for m, (n, k, fx, trials) in acc[key].items():
            if n == 0:
                continue
            setattr(c, f"acc_{m}", k / n)
            setattr(c, f"conf_{m}", from_fixed_point(fx) / n)
            if m == "finetuned":
                c.n_trials, c.n_examples = trials, n
        cells.append(c)
    return cells


def cells_table(cells: list[Cell]) -> pa.Table:
    base = [f.name for f in fields(Cell)]
    rows = [{**{n: getattr(c, n) for n in base}, "forget_gap": c.forget_gap, "forget_ratio": c.forget_ratio, "ratio_formula": ratio_formula(c.method)} for c in cells]
    return pa.Table.from_pylist(rows, schema=CELL_SCHEMA)


def upgma_order(matrix: np.ndarray) -> tuple[list[int], list[int]]:
    """Row and column orders from average-linkage (UPGMA) clustering with Euclidean distance,
    rows clustered on their vectors over columns and vice versa (Fig 3.2)."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    def order(m: np.ndarray) -> list[int]:
        if m.shape[0] < 2:
            return list(range(m.shape[0]))
        return [int(i) for i in leaves_list(linkage(m, method="average", metric="euclidean"))]

    return order(matrix), order(matrix.T)


@dataclass(frozen=True)
class Correlation:
    n: int
    pearson_r: float | None
    pearson_p: float | None
    spearman_r: float | None
    spearman_p: float | None


def _clean(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def correlate(x: list[float | None] | np.ndarray, y: list[float | None] | np.ndarray) -> Correlation:
    """Pearson and Spearman with two-sided p-values over the pairs where both are defined;
    None where fewer than 3 pairs remain or one side is constant."""
    from scipy import stats

    xa = np.array([np.nan if v is None else v for v in x], dtype=np.float64)
    ya = np.array([np.nan if v is None else v for v in y], dtype=np.float64)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(ok.sum())
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return Correlation(n, None, None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(xa, ya)
        sr = stats.spearmanr(xa, ya)
    return Correlation(n, _clean(pr.statistic), _clean(pr.pvalue), _clean(sr.statistic), _clean(sr.pvalue))


CORRELATION_FIELDS = [
    ("n", pa.int64()), ("pearson_r", pa.float64()), ("pearson_p", pa.float64()),
    ("spearman_r", pa.float64()), ("spearman_p", pa.float64()),
]


def correlation_row(c: Correlation) -> dict[str, float | int | None]:
    return {"n": c.n, "pearson_r": c.pearson_r, "pearson_p": c.pearson_p, "spearman_r": c.spearman_r, "spearman_p": c.spearman_p}


def condition_key(model: str, method: str, size: int) -> str:
    return f"{model} / {method} / n={size}"
