"""Report figures of the analyses beyond the paper: the association heatmap, the
prediction scores and the method comparison. Drawn from the analysis tables alone, like the
paper's figures in `raysweep.report`, which maps the analysis names to these functions."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
import pyarrow.compute as pc
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from raysweep.analysis.runner import AnalysisOutcome

MAX_PANELS = 6
MAX_ROW_LABELS = 60
OWN, OTHER = "#d62728", "#1f77b4"


def _num(v: object) -> float:
    return float("nan") if v is None else float(v)  # type: ignore[arg-type]


def _yerr(rs: list[dict], col: str) -> np.ndarray | None:
    """Error bars from `<col>_lo` / `<col>_hi` where the table has them (the ratios), else none."""
    if not rs or f"{col}_lo" not in rs[0]:
        return None
    v = np.array([_num(r[col]) for r in rs])
    lo = np.array([_num(r[f"{col}_lo"]) for r in rs])
    hi = np.array([_num(r[f"{col}_hi"]) for r in rs])
    err = np.vstack([v - lo, hi - v])
    return np.where(np.isfinite(err), np.clip(err, 0, None), 0.0)


def _heat_limit(m: np.ndarray) -> float:
    # Symmetric around zero (no change), robust to a few extreme cells.
    finite = np.abs(m[np.isfinite(m)])
    return max(float(np.quantile(finite, 0.98)) if finite.size else 0.0, 1e-6)


def fig_association(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
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
    axes[0].legend(handles=[Patch(color=f"C{i % 10}", label=t) for i, t in enumerate(tasks)], title="evaluation task",
                   fontsize=7, title_fontsize=7, ncols=min(len(tasks), 8), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    for ax, column, label in ((axes[1], "conf_drop", "drop in confidence"), (axes[2], "loss_rise", "rise in loss")):
        m = np.full((nr, nc), np.nan)
        m[rp, cp] = cells[column].to_numpy(zero_copy_only=False)
        lim = _heat_limit(m)
        im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        if nr <= MAX_ROW_LABELS:
            ax.set_yticks(range(nr), labels, fontsize=6)
        ax.set_ylabel("forget run")
        fig.colorbar(im, ax=ax, label=label, extend="both")
    axes[2].set_xticks([])  # positions in the clustered order mean nothing on their own
    axes[2].set_xlabel(f"evaluation examples ({nc}); red = forgotten, blue = gained")
    fig.suptitle(f"association matrix: {nr} forget runs x {nc} examples, rows and columns clustered (average linkage)", fontsize=10)
    return [("association matrix heatmap", fig)]


def fig_predict(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    rs = o.tables["summary"].to_pylist()
    if not rs:
        return []
    x = np.arange(len(rs))
    names = [r["predictor"] for r in rs]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "rmse", "RMSE on hidden cells (lower is better)"), (axes[1], "f1", "F1 of forgotten (higher is better)")):
        means = [_num(r[f"{key}_mean"]) for r in rs]
        errs = [0.0 if r[f"{key}_std"] is None else r[f"{key}_std"] for r in rs]
        ax.bar(x, means, yerr=errs, capsize=4, color=[f"C{i}" for i in range(len(rs))])
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_title(label, fontsize=9)
    r0 = rs[0]
    if r0["forgotten_rate"] is not None:
        axes[1].axhline(2 * r0["forgotten_rate"] / (1 + r0["forgotten_rate"]), ls="--", color="grey", lw=1, label="all forgotten")
        axes[1].legend(fontsize=7)
    axes[1].set_ylim(0, 1.02)
    fig.suptitle(f"{r0['measure']}, k={r0['k']} revealed per run, {r0['n_runs']} runs x {r0['n_examples']} examples, {r0['n_seeds']} seed(s)", fontsize=9)
    return [("prediction scores by predictor", fig)]


def fig_by_method(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in o.tables["methods"].to_pylist():
        groups[(r["model"], r["size"])].append(r)
    figs = []
    for (model, size), rs in sorted(groups.items(), key=lambda kv: str(kv[0]))[:MAX_PANELS]:
        x = np.arange(len(rs))
        fig = Figure(figsize=(max(7.0, 1.6 * len(rs) + 3), 3.6), layout="constrained")
        axes = fig.subplots(1, 2)
        for ax, stem, label in ((axes[0], "ratio", "forget ratio"), (axes[1], "conf_drop", "drop in confidence")):
            err = {k: _yerr(rs, f"{stem}_{k}") for k in ("own", "other")}
            ax.bar(x - 0.2, [_num(r[f"{stem}_own"]) for r in rs], 0.4, color=OWN, label="forgotten task",
                   yerr=err["own"], capsize=3)
            ax.bar(x + 0.2, [_num(r[f"{stem}_other"]) for r in rs], 0.4, color=OTHER, label="other tasks",
                   yerr=err["other"], capsize=3)
            ax.set_xticks(x, [r["method"] for r in rs])
            ax.axhline(0, color="black", lw=0.8)
            ax.set_title(label, fontsize=9)
        axes[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"{model} / n={size}: forgetting on the forgotten task vs the others, by method", fontsize=9)
        figs.append((f"forgetting by method {model} n={size}", fig))
    return figs


def fig_forgetting_events(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    rows = [r for r in o.tables["summary"].to_pylist() if r["own_task"]]
    figs = []
    for model, size in sorted({(r["model"], r["size"]) for r in rows}, key=str)[:MAX_PANELS]:
        rs = [r for r in rows if (r["model"], r["size"]) == (model, size)]
        splits = [s for s in ("train", "validation", "test") if any(r["split"] == s for r in rs)]
        fig = Figure(figsize=(max(7.0, 3.6 * len(splits)), 3.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(splits), squeeze=False)[0])
        for ax, split in zip(axes, splits):
            here = [r for r in rs if r["split"] == split and r["phase"] == "forget"]
            tasks = sorted({r["forget_task"] for r in here})
            methods = sorted({r["method"] for r in here})
            width = 0.8 / max(1, len(methods))
            for k, method in enumerate(methods):
                got = {r["forget_task"]: r for r in here if r["method"] == method}
                ordered = [got.get(t) for t in tasks]
                x = np.arange(len(tasks)) + (k - (len(methods) - 1) / 2) * width
                present = [r for r in ordered if r is not None]
                ax.bar([xi for xi, r in zip(x, ordered) if r is not None], [_num(r["unforgettable_frac"]) for r in present], width,
                       label=method, yerr=_yerr(present, "unforgettable_frac"), capsize=3)
            ax.set_xticks(np.arange(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_title(f"{split} split", fontsize=9)
            ax.set_ylabel("unforgettable fraction")
            ax.set_xlabel("forget task (its own examples)", fontsize=8)
        axes[0].legend(fontsize=8, title="method", title_fontsize=8)
        fig.suptitle(f"{model}, n={size}: forget-task examples never forgotten during the forget phase "
                     "(correct at some step, never correct -> incorrect; from the finetuned milestone)", fontsize=9)
        figs.append((f"forgetting_events_{model}_n{size}", fig))
    return figs


def _per_model(rows: list[dict]) -> list[tuple[str, int, list[dict]]]:
    """(model, size, its rows), at most MAX_PANELS of them: one figure each."""
    keys = sorted({(r["model"], r["size"]) for r in rows}, key=str)[:MAX_PANELS]
    return [(m, n, [r for r in rows if (r["model"], r["size"]) == (m, n)]) for m, n in keys]


def _epoch_axis(ax, xlabel: str, ylabel: str) -> None:
    """A curve over epochs of a quantity in [0, 1] whose chance level is 0.5."""
    ax.axhline(0.5, color="#888", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def fig_membership(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    for model, size, rs in _per_model(o.tables["summary"].to_pylist()):
        fig = Figure(figsize=(9.0, 3.6), layout="constrained")
        for ax, attack in zip(fig.subplots(1, 2), ("loss", "zlib")):
            for (task, method) in sorted({(r["forget_task"], r["method"]) for r in rs if r["attack"] == attack}):
                line = sorted((r for r in rs if (r["forget_task"], r["method"], r["attack"]) == (task, method, attack)),
                              key=lambda r: r["step"])
                x = [r["step"] for r in line]
                ax.plot(x, [_num(r["auc"]) for r in line], marker=".", label=f"{task} / {method}")
                ax.fill_between(x, [_num(r["auc_lo"]) for r in line], [_num(r["auc_hi"]) for r in line], alpha=0.2)
            _epoch_axis(ax, "forget epoch (0 = finetuned milestone)", f"{attack} attack AUC")
        fig.axes[0].legend(fontsize=7, title="forget task / method", title_fontsize=7)
        fig.suptitle(f"{model}, n={size}: trained examples (train split) vs held-out (test split) of the forget task; "
                     "0.5 = indistinguishable", fontsize=9)
        figs.append((f"membership_{model}_n{size}", fig))
    return figs


def fig_relearning(o: AnalysisOutcome) -> list[tuple[str, Figure]]:
    figs = []
    for model, size, rs in _per_model(o.tables["curves"].to_pylist()):
        fig = Figure(figsize=(7.0, 3.6), layout="constrained")
        ax = fig.subplots()
        for run in sorted({(r["forget_task"], r["method"], r["relearn_examples"], r["seed"]) for r in rs}, key=str):
            line = sorted((r for r in rs if (r["forget_task"], r["method"], r["relearn_examples"], r["seed"]) == run),
                          key=lambda r: r["step"])
            ax.plot([r["step"] for r in line], [_num(r["acc"]) for r in line], marker=".",
                    label=f"{run[0]} / {run[1]} / k={run[2]} / s{run[3]}")
        _epoch_axis(ax, "relearn epoch (0 = forgotten milestone)", "forget-task test accuracy")
        ax.legend(fontsize=7, title="forget task / method / relearn examples / seed", title_fontsize=7)
        fig.suptitle(f"{model}, n={size}: held-out accuracy while relearning on k trained examples", fontsize=9)
        figs.append((f"relearning_{model}_n{size}", fig))
    return figs


BEYOND_FIGURES: dict[str, Callable[[AnalysisOutcome], list[tuple[str, Figure]]]] = {
    "association": fig_association,
    "predict": fig_predict,
    "by_method": fig_by_method,
    "forgetting_events": fig_forgetting_events,
    "membership": fig_membership,
    "relearning": fig_relearning,
}

