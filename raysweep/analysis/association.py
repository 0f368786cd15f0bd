"""Beyond the paper (Jin and Ren 2024): the association matrix between forget runs and
evaluation examples.

Rows are forget runs (one trial's forget phase: model x forget task x method x size x seed),
columns are evaluation examples (eval task, split, example index), and a cell is how much the
run made the model forget that example between the finetuned milestone (best fine-tuning
epoch) and the forgotten milestone (last forget epoch): the drop in confidence of the correct
response, or the rise in its average-token loss (-ll_mean_correct). Positive = forgotten.

Columns are identified by (eval task, split, index), which names the same example in every
trial of one sweep (all trials share the data preparation). Across sweeps it only does when
they prepared their data alike; the analysis checks this against the stored examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from raysweep.analysis.common import require_trials
from raysweep.analysis.context import AnalysisContext
from raysweep.analysis.engine import Scan
from raysweep.analysis.plotting import MAX_ROW_LABELS
from raysweep.analysis.reducers import CollectRows
from raysweep.analysis.registry import AnalysisResult, Skip, draws, register
from raysweep.analysis.runner import AnalysisOutcome
from raysweep.errors import BadInput
from raysweep.store import TrialKey, trial_fields

MEASURES = ("confidence", "loss")
# Average linkage needs all pairwise distances: N columns cost N^2/2 doubles, so a paper-scale
# matrix (21 tasks x 1000 examples) would need ~2 GB. Beyond this many columns the order is
# computed on a seeded sample, and only the sampled columns get a position in the heatmap.
MAX_CLUSTERED_COLUMNS = 2000
MAX_CLUSTERED_ROWS = 5000
RANKS = (1, 2, 3)

RUN_FIELDS = [
    *trial_fields(),
]
EXAMPLE_FIELDS = [("eval_task", pa.string()), ("split", pa.string()), ("example_idx", pa.int32())]

# One row per (run, example) observed at both milestones.
LONG_SCHEMA = pa.schema(
    RUN_FIELDS
    + EXAMPLE_FIELDS
    + [
        ("conf_finetuned", pa.float64()),
        ("conf_forgotten", pa.float64()),
        ("conf_drop", pa.float64()),
        ("loss_finetuned", pa.float64()),
        ("loss_forgotten", pa.float64()),
        ("loss_rise", pa.float64()),
    ]
)
CELLS_SCHEMA = pa.schema(list(LONG_SCHEMA) + [("row_pos", pa.int32()), ("col_pos", pa.int32())])
VALUE_COLUMN = {"confidence": "conf_drop", "loss": "loss_rise"}


def check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise BadInput(f"measure: {measure!r} is not one of {', '.join(MEASURES)}")
    return measure


@dataclass(frozen=True)
class ExampleKey:
    """A column: one evaluation example."""

    eval_task: str
    split: str
    example_idx: int


@dataclass
class AssociationMatrix:
    rows: tuple[TrialKey, ...]
    cols: tuple[ExampleKey, ...]
    measure: str
    values: np.ndarray  # (M, N) forgetting of each example by each run; NaN = not observed
    conf_before: np.ndarray  # (M, N) confidence at the finetuned milestone (the paper's predictor)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def complete_columns(self) -> "AssociationMatrix":
        """Only the examples every run evaluated: predictors compare rows cell by cell, and a
        sweep mixing evaluation sets would otherwise leave most pairs nothing in common."""
        keep = np.isfinite(self.values).all(axis=0) & np.isfinite(self.conf_before).all(axis=0)
        return AssociationMatrix(
            self.rows,
            tuple(c for c, k in zip(self.cols, keep) if k),
            self.measure,
            self.values[:, keep],
            self.conf_before[:, keep],
        )


def association_long(ctx: AnalysisContext) -> pa.Table:
    """Per (run, example) of the analysis split: confidence and loss of the correct response
    at the finetuned and forgotten milestones, and the forgetting between them."""
    require_trials(ctx)
    split = ctx.params.split
    # The association and prediction analyses read the same rows: one scan per run.
    return ctx.memo(("association_long", split), lambda: _read_long(ctx, split))


def _read_long(ctx: AnalysisContext, split: str) -> pa.Table:
    files = ctx.index.milestone_files("scores", ("finetuned", "forgotten"))
    if not files:
        return LONG_SCHEMA.empty_table()
    keys = ("sweep", "trial_id", "phase", "epoch", "eval_task", "split", "example_idx")
    scan = Scan(files, columns=(*keys, "confidence", "ll_mean_correct"), equals=(("split", split),))
    rows = ctx.engine.reduce(scan, CollectRows(order=keys))
    if rows.num_rows == 0:
        return LONG_SCHEMA.empty_table()
    ms = ctx.index.milestone_table().select(["sweep", "trial_id", "phase", "epoch", "milestone"])
    tagged = rows.join(ms, keys=["sweep", "trial_id", "phase", "epoch"], join_type="inner")
    ex_keys = ["sweep", "trial_id", "eval_task", "split", "example_idx"]

    def at(milestone: str, tag: str) -> pa.Table:
        t = tagged.filter(pc.equal(tagged["milestone"], milestone))
        return pa.table(
            {
                **{k: t[k] for k in ex_keys},
                f"conf_{tag}": pc.cast(t["confidence"], pa.float64()),
                # Loss is the negative average-token log-likelihood of the correct response.
                f"loss_{tag}": pc.negate(pc.cast(t["ll_mean_correct"], pa.float64())),
            }
        )

    j = at("finetuned", "finetuned").join(at("forgotten", "forgotten"), keys=ex_keys, join_type="inner")
    j = j.append_column("conf_drop", pc.subtract(j["conf_finetuned"], j["conf_forgotten"]))
    j = j.append_column("loss_rise", pc.subtract(j["loss_forgotten"], j["loss_finetuned"]))
    j = j.join(ctx.index.trial_table(), keys=["sweep", "trial_id"], join_type="inner")
    return (
        j.select(LONG_SCHEMA.names)
        .cast(LONG_SCHEMA)
        .sort_by([(n, "ascending") for n in ("sweep", "trial_id", "eval_task", "split", "example_idx")])
    )


@dataclass(frozen=True)
class LongIndex:
    """Where each row of a long table sits in the matrix."""

    rows: tuple[TrialKey, ...]
    cols: tuple[ExampleKey, ...]
    row_of: np.ndarray  # (n_long,) row index of each long row
    col_of: np.ndarray  # (n_long,) column index of each long row


def _sorted_codes(keys: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of `keys` in sorted key order, and the first long row of each code:
    dictionary-encoding in Arrow first, so only the distinct keys are sorted in Python."""
    enc = (
        pc.dictionary_encode(keys).combine_chunks() if isinstance(keys, pa.ChunkedArray) else pc.dictionary_encode(keys)
    )
    distinct = enc.dictionary.to_pylist()
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[np.argsort(np.array(distinct, dtype=object), kind="stable")] = np.arange(len(distinct))
    codes = rank[enc.indices.to_numpy(zero_copy_only=False)]
    first = np.full(len(distinct), -1, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]
    return codes, first


def index_long(long: pa.Table) -> LongIndex:
    sep = "\x1f"
    run_key = pc.binary_join_element_wise(long["sweep"], long["trial_id"], sep)
    # Zero-padded so that string order is (task, split, index) order.
    ex_key = pc.binary_join_element_wise(
        long["eval_task"], long["split"], pc.utf8_lpad(pc.cast(long["example_idx"], pa.string()), 10, "0"), sep
    )
    row_of, row_first = _sorted_codes(run_key)
    col_of, col_first = _sorted_codes(ex_key)
    run_cols = {n: long[n].take(pa.array(row_first)).to_pylist() for n, _ in RUN_FIELDS}
    ex_cols = {n: long[n].take(pa.array(col_first)).to_pylist() for n, _ in EXAMPLE_FIELDS}
    rows = tuple(TrialKey(**{n: run_cols[n][i] for n in run_cols}) for i in range(len(row_first)))
    cols = tuple(ExampleKey(**{n: ex_cols[n][j] for n in ex_cols}) for j in range(len(col_first)))
    return LongIndex(rows, cols, row_of, col_of)


def matrix_from_long(long: pa.Table, measure: str = "confidence", index: LongIndex | None = None) -> AssociationMatrix:
    """Pivot the long table into the M x N matrix; rows and columns in sorted key order."""
    check_measure(measure)
    ix = index or index_long(long)
    values = np.full((len(ix.rows), len(ix.cols)), np.nan)
    before = np.full((len(ix.rows), len(ix.cols)), np.nan)
    values[ix.row_of, ix.col_of] = long[VALUE_COLUMN[measure]].to_numpy(zero_copy_only=False)
    before[ix.row_of, ix.col_of] = long["conf_finetuned"].to_numpy(zero_copy_only=False)
    return AssociationMatrix(ix.rows, ix.cols, measure, values, before)


def association_matrix(ctx: AnalysisContext, measure: str = "confidence") -> AssociationMatrix:
    long = association_long(ctx)
    if long.num_rows == 0:
        raise Skip(
            f"no trial has scores on the {ctx.params.split!r} split at both the finetuned and the forgotten milestone"
        )
    return matrix_from_long(long, measure)


# ---- structure of the matrix --------------------------------------------------------------------


@dataclass(frozen=True)
class Structure:
    """How much of the matrix simple models explain (R^2 against the grand mean)."""

    r2_additive: float | None
    r2_rank: tuple[float | None, ...]  # column-centred truncated SVD, one per entry of RANKS


def structure(x: np.ndarray) -> Structure:
    """Jin and Ren's observation is that forgetting is largely additive (run effect + example
    effect) and low-rank; these R^2 values say how far that holds for this sweep."""
    m, n = x.shape
    if m < 2 or n < 2:
        return Structure(None, tuple(None for _ in RANKS))
    grand = x.mean()
    total = float(((x - grand) ** 2).sum())
    if total == 0:
        return Structure(None, tuple(None for _ in RANKS))
    additive = x.mean(axis=1, keepdims=True) + x.mean(axis=0, keepdims=True) - grand
    r2_add = 1 - float(((x - additive) ** 2).sum()) / total
    centred = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    resid = float((s**2).sum())
    r2 = []
    for r in RANKS:
        # At or beyond the centred matrix's full rank the fit is trivially perfect: not reported.
        r2.append(1 - (resid - float((s[:r] ** 2).sum())) / total if r < min(m - 1, n) else None)
    return Structure(r2_add, tuple(r2))


def _linkage_order(x: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage (UPGMA) clustering of the rows of x, Euclidean distance:
    the same clustering as the paper's cross-task matrix (`measures.upgma_order`)."""
    from scipy.cluster.hierarchy import leaves_list, linkage

    if x.shape[0] < 2:
        return np.arange(x.shape[0])
    return leaves_list(linkage(x, method="average", metric="euclidean"))


def _positions(n: int, limit: int, x_of: Callable[[np.ndarray], np.ndarray], seed: int) -> np.ndarray:
    """Position of each of n items in the clustered order; -1 for items left out of the
    seeded sample taken when n exceeds the limit."""
    chosen = np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    pos = np.full(n, -1, dtype=np.int64)
    pos[chosen[_linkage_order(x_of(chosen))]] = np.arange(len(chosen))
    return pos


def cluster_order(x: np.ndarray, seed: int = 0) -> tuple[list[int], list[int | None]]:
    """Average-linkage orders: a position per row (clustered on all columns), and per column
    (clustered on all rows; None for columns left out of the sample). Unobserved cells count
    as no forgetting, for the clustering only."""
    filled = np.nan_to_num(x, nan=0.0)
    m, n = filled.shape
    rows = _positions(m, MAX_CLUSTERED_ROWS, lambda r: filled[r], seed)
    # Rows past the sample still need a row of the heatmap: after the sample, in key order.
    missing = np.flatnonzero(rows < 0)
    rows[missing] = np.arange(m - len(missing), m)
    cols = _positions(n, MAX_CLUSTERED_COLUMNS, lambda c: filled[:, c].T, seed)
    return [int(p) for p in rows], [int(p) if p >= 0 else None for p in cols]


# ---- the registered analysis --------------------------------------------------------------------

SUMMARY_SCHEMA = pa.schema(
    [
        ("measure", pa.string()),
        ("n_runs", pa.int32()),
        ("n_examples", pa.int32()),
        ("n_complete_examples", pa.int32()),
        ("mean", pa.float64()),
        ("std", pa.float64()),
        ("frac_positive", pa.float64()),
        ("r2_additive", pa.float64()),
    ]
    + [(f"r2_rank{r}", pa.float64()) for r in RANKS]
)
RUNS_SCHEMA = pa.schema(
    [("row_pos", pa.int32())]
    + RUN_FIELDS
    + [("n_examples", pa.int32()), ("mean_conf_drop", pa.float64()), ("mean_loss_rise", pa.float64())]
)
EXAMPLES_SCHEMA = pa.schema(
    [("col_pos", pa.int32())]
    + EXAMPLE_FIELDS
    + [
        ("n_runs", pa.int32()),
        ("mean_conf_finetuned", pa.float64()),
        ("mean_conf_drop", pa.float64()),
        ("mean_loss_rise", pa.float64()),
    ]
)


def _none(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    n = np.isfinite(x).sum(axis=axis)
    return np.where(n > 0, np.nansum(x, axis=axis) / np.maximum(n, 1), np.nan)


def uid_conflicts(ctx: AnalysisContext, long: pa.Table) -> list[str]:
    """Sweeps whose (task, split, index) name different examples than the first sweep's."""
    sweeps = sorted(set(long["sweep"].to_pylist()))
    if len(sweeps) < 2:
        return []
    seen: dict[tuple[str, str, int], tuple[str, str]] = {}
    bad: set[tuple[str, str]] = set()
    for sw in sweeps:
        ex = ctx.store.read("examples", sweep=sw, columns=["task", "split", "example_idx", "uid"])
        for t, s, i, u in zip(*(ex[c].to_pylist() for c in ("task", "split", "example_idx", "uid"))):
            first = seen.setdefault((t, s, i), (sw, u))
            if first[1] != u:
                bad.add((first[0], sw))
    return [f"{a} and {b}" for a, b in sorted(bad)]


@register("association", title="Association matrix: which runs forget which examples", figure="Beyond: Jin & Ren")
def run(ctx: AnalysisContext) -> AnalysisResult:
    long = association_long(ctx)
    if long.num_rows == 0:
        raise Skip(
            f"no trial has scores on the {ctx.params.split!r} split at both the finetuned and the forgotten milestone"
        )
    ix = index_long(long)
    mats = {m: matrix_from_long(long, m, ix) for m in MEASURES}
    conf = mats["confidence"]
    m, n = conf.shape
    row_pos, col_pos = cluster_order(conf.values)

    summary = []
    for name, mat in mats.items():
        full = mat.complete_columns()
        st = structure(full.values)
        obs = mat.values[np.isfinite(mat.values)]
        summary.append(
            {
                "measure": name,
                "n_runs": m,
                "n_examples": n,
                "n_complete_examples": full.shape[1],
                "mean": _none(obs.mean()),
                "std": _none(obs.std()),
                "frac_positive": _none((obs > 0).mean()),
                "r2_additive": st.r2_additive,
                **{f"r2_rank{r}": v for r, v in zip(RANKS, st.r2_rank)},
            }
        )

    loss = mats["loss"].values
    row_obs = np.isfinite(conf.values).sum(axis=1)
    run_drop, run_rise = _nanmean(conf.values, 1), _nanmean(loss, 1)
    runs = [
        {
            "row_pos": row_pos[i],
            **vars(r),
            "n_examples": int(row_obs[i]),
            "mean_conf_drop": _none(run_drop[i]),
            "mean_loss_rise": _none(run_rise[i]),
        }
        for i, r in enumerate(conf.rows)
    ]
    col_obs = np.isfinite(conf.values).sum(axis=0)
    ex_before, ex_drop, ex_rise = _nanmean(conf.conf_before, 0), _nanmean(conf.values, 0), _nanmean(loss, 0)
    examples = [
        {
            "col_pos": col_pos[j],
            **vars(c),
            "n_runs": int(col_obs[j]),
            "mean_conf_finetuned": _none(ex_before[j]),
            "mean_conf_drop": _none(ex_drop[j]),
            "mean_loss_rise": _none(ex_rise[j]),
        }
        for j, c in enumerate(conf.cols)
    ]
    runs_t = pa.Table.from_pylist(runs, schema=RUNS_SCHEMA).sort_by("row_pos")
    ex_t = pa.Table.from_pylist(examples, schema=EXAMPLES_SCHEMA).sort_by(
        [("col_pos", "ascending"), ("eval_task", "ascending"), ("example_idx", "ascending")]
    )

    rp = np.asarray(row_pos, dtype=np.int64)[ix.row_of]
    cp = pa.array([col_pos[j] for j in range(n)], pa.int32()).take(pa.array(ix.col_of))
    cells = long.append_column("row_pos", pa.array(rp, pa.int32())).append_column("col_pos", cp)
    cells = cells.cast(CELLS_SCHEMA).sort_by(
        [("row_pos", "ascending"), ("col_pos", "ascending"), ("eval_task", "ascending"), ("example_idx", "ascending")]
    )

    notes = []
    if n > MAX_CLUSTERED_COLUMNS:
        notes.append(f"columns ordered on a seeded sample of {MAX_CLUSTERED_COLUMNS} (col_pos empty for the rest)")
    conflicts = uid_conflicts(ctx, long)
    if conflicts:
        notes.append(
            "WARNING: sweeps "
            + "; ".join(conflicts)
            + " hold different examples under the same index: analyse one sweep at a time (--sweep)"
        )
    msg = f"{m} forget run(s) x {n} {ctx.params.split} example(s); cell = drop in confidence (and rise in loss) from finetuned to forgotten; rows and columns average-linkage ordered"
    if notes:
        msg += "; " + "; ".join(notes)
    return AnalysisResult(
        {
            "summary": pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA),
            "runs": runs_t,
            "examples": ex_t,
            "cells": cells,
        },
        msg,
    )


def _heat_limit(m: np.ndarray) -> float:
    # Symmetric around zero (no change), robust to a few extreme cells.
    finite = np.abs(m[np.isfinite(m)])
    return max(float(np.quantile(finite, 0.98)) if finite.size else 0.0, 1e-6)


@draws("association")
def draw(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    cells = o.tables["cells"]
    cells = cells.filter(pc.is_valid(cells["col_pos"]))
    if cells.num_rows == 0:
        return []
    runs = o.tables["runs"].to_pylist()
    nr = max(r["row_pos"] for r in runs) + 1
    rp = cells["row_pos"].to_numpy()
    cp = cells["col_pos"].to_numpy()
    nc = int(cp.max()) + 1
    labels = [""] * nr
    for r in runs:
        labels[r["row_pos"]] = f"{r['model']}/{r['forget_task']}/{r['method']}/n{r['size']}/s{r['seed']}"
    col_task = [""] * nc
    for j, t in zip(cp.tolist(), cells["eval_task"].to_pylist()):
        col_task[j] = t
    tasks = sorted(set(col_task))
    strip = np.array([[tasks.index(t) for t in col_task]])
    palette = ListedColormap([f"C{i % 10}" for i in range(len(tasks))])

    fig = Figure(figsize=(11, max(4.5, 2 * (0.16 * min(nr, MAX_ROW_LABELS) + 1.2) + 1.0)), layout="constrained")
    axes = fig.subplots(3, 1, height_ratios=[0.6, 10, 10], sharex=True)
    axes[0].imshow(strip, aspect="auto", cmap=palette, vmin=-0.5, vmax=len(tasks) - 0.5, interpolation="nearest")
    axes[0].set_yticks([])
    axes[0].legend(
        handles=[Patch(color=f"C{i % 10}", label=t) for i, t in enumerate(tasks)],
        title="evaluation task",
        fontsize=7,
        title_fontsize=7,
        ncols=min(len(tasks), 8),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        frameon=False,
    )
    for ax, column, label in ((axes[1], "conf_drop", "drop in confidence"), (axes[2], "loss_rise", "rise in loss")):
        m = np.full((nr, nc), np.nan)
        m[rp, cp] = cells[column].to_numpy(zero_copy_only=False)
        lim = _heat_limit(m)
        im = ax.imshow(
            np.ma.masked_invalid(m), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest"
        )
        if nr <= MAX_ROW_LABELS:
            ax.set_yticks(range(nr), labels, fontsize=6)
        ax.set_ylabel("forget run")
        fig.colorbar(im, ax=ax, label=label, extend="both")
    axes[2].set_xticks([])  # positions in the clustered order mean nothing on their own
    axes[2].set_xlabel(f"evaluation examples ({nc}); red = forgotten, blue = gained")
    fig.suptitle(
        f"association matrix: {nr} forget runs x {nc} examples, rows and columns clustered (average linkage)",
        fontsize=10,
    )
    return [("association matrix heatmap", fig)]
