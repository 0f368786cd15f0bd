"""`raysweep`: the command line. Thin: parse, call a stage, print, map errors to exit codes.

Exit codes: 0 success, 1 a trial or command failed, 2 bad input (one line naming it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from raysweep.constants import SPLITS
from raysweep.errors import BadInput, StoreError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Parallel sweeps of forgetting experiments on language models."
)
tasks_app = typer.Typer(no_args_is_help=True, help="The task registry.")
app.add_typer(tasks_app, name="tasks")
# Piped output (CI logs, files) is read later, not on an 80-column terminal: don't wrap tables.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 400)

STORE_OPT = typer.Option("storage", "--store", help="Store root directory.")
# Beyond this many trials `run --dry-run` prints plain tab-separated lines instead of a table.
DRY_RUN_TABLE_MAX = 500
DATA_ROOT_OPT = typer.Option(
    None,
    "--data-root",
    help="Folder of task folders: each task with a folder DIR/<task> reads it (data.sources entries win).",
)


def _fail(code: int, message: str) -> None:
    from rich.markup import escape

    # Messages quote user input and install hints (`raysweep[mlflow]`): never markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guard(fn):
    """Map the project's error types onto exit codes with one clear line."""
    import functools
    import time

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.time()
        try:
            return fn(*args, **kwargs)
        except (BadInput, StoreError) as exc:
            _fail(2, str(exc))
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _fail(1, "interrupted; run the same command again to resume")
        except Exception as exc:
            root = kwargs.get("store_root")
            if root is None or not _out_of_space(exc, Path(root)):
                raise
            code, message = _after_disk_full(Path(root), started, exc)
            _fail(code, message)

    return wrapper


# Below this much free space an error that hides its errno is taken for a full disk: torch
# reports a short write as "unexpected pos", Ray reads back its own half-written files as
# EOFError, and neither says ENOSPC.
NEARLY_FULL_BYTES = 1 << 20


def _out_of_space(exc: BaseException, root: Path) -> bool:
    from raysweep.errors import is_no_space

    if is_no_space(exc):
        return True
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < NEARLY_FULL_BYTES


def _after_disk_full(root: Path, started: float, exc: BaseException) -> tuple[int, str]:
    """Clean up after a command the store's full disk stopped: temporary files go, trials
    this run left `running` are marked failed with the reason. Exit code 1 if trials had
    started, 2 if it stopped before any trial started."""
    import contextlib

    from raysweep.errors import DiskFull, no_space_where
    from raysweep.store import Store

    store = Store(root)
    full = DiskFull(store.root, no_space_where(exc, store.root))
    for kind in (
        "scores",
        "hidden",
        "epochs",
        "commits",
        "checkpoints",
        "trials",
        "sweeps",
        "examples",
        "prep",
        "analysis",
    ):
        base = store.path(kind)
        for tmp in base.rglob("_*.tmp-*") if base.is_dir() else []:
            with contextlib.suppress(OSError):
                tmp.unlink()
    ran = False
    with contextlib.suppress(Exception):
        ray_dir = store.ray_dir
        ran = ray_dir.is_dir() and any(p.stat().st_mtime >= started for p in ray_dir.iterdir())
        for row in store.trials().to_pylist():
            if (row["updated_at"] or 0) < started or row["status"] not in ("running", "failed", "done"):
                continue
            ran = True
            if row["status"] == "running":
                with contextlib.suppress(Exception):
                    store.write_trial_row({**row, "status": "failed", "error": f"DiskFull: {full}"})
    return (1 if ran else 2), f"{full}; free some space and run the same command again (committed epochs are kept)"


def _fmt(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


def _progress_table(views: dict) -> Table:
    counts = {s: sum(v.status == s for v in views.values()) for s in ("done", "running", "failed", "pending")}
    t = Table(
        title=f"trials: {counts['done']} done · {counts['running']} running · {counts['failed']} failed · {counts['pending']} pending",
        title_justify="left",
    )
    for col in ("trial", "status", "phase", "epoch", "forget train acc", "forget test acc", "all tasks test acc"):
        t.add_column(col)
    style = {"done": "green", "running": "cyan", "failed": "red", "pending": "dim"}
    for v in views.values():
        t.add_row(
            v.trial_id,
            f"[{style[v.status]}]{v.status}[/]",
            v.phase,
            str(v.epoch) if v.phase else "",
            _fmt(v.forget_train_acc),
            _fmt(v.forget_test_acc),
            _fmt(v.eval_test_acc),
        )
    return t


def _summary_table(rows, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in (
        "model",
        "forget task",
        "method",
        "n",
        "seed",
        "status",
        "pretrained",
        "finetuned",
        "forgotten (test)",
        "forgotten (train)",
        "forget ratio",
    ):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r.model,
            r.forget_task,
            r.method,
            str(r.size),
            str(r.seed),
            r.status,
            _fmt(r.pretrained_test_acc),
            _fmt(r.finetuned_test_acc),
            _fmt(r.forgotten_test_acc),
            _fmt(r.forgotten_train_acc),
            _fmt(r.forget_ratio),
        )
    return t


@app.command()
@_guard
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="YAML sweep spec."),
    store_root: Path = STORE_OPT,
    address: Optional[str] = typer.Option(
        None, "--address", help="Join this Ray cluster (default: $RAY_ADDRESS, else start a local one)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the trial plan; run nothing."),
    dashboard: bool = typer.Option(
        True, "--dashboard/--no-dashboard", help="Start the Ray dashboard (local clusters)."
    ),
    dashboard_host: str = typer.Option(
        "127.0.0.1",
        "--dashboard-host",
        help="Interface the dashboard listens on (local clusters); 0.0.0.0 exposes it to the network.",
    ),
    data_root: Optional[Path] = DATA_ROOT_OPT,
) -> None:
    """Run a sweep: every trial of SPEC that the store does not already hold."""
    from raysweep.spec import load_spec
    from raysweep.store import Store

    spec = load_spec(spec_path)
    if data_root is not None:
        from raysweep.tasks.sources import apply_data_root

        spec = apply_data_root(spec, data_root)
    if dry_run:
        plans = spec.trials()
        cols = ("trial_id", "model", "forget task", "method", "n", "seed", "eval tasks", "cpu", "gpu", "workers")
        rows = (
            (
                p.trial_id,
                p.model.name,
                p.forget_task,
                p.method,
                str(p.size),
                str(p.seed),
                str(len(p.eval_tasks)),
                f"{p.resources.cpu:g}",
                f"{p.resources.gpu:g}",
                str(p.resources.n_workers),
            )
            for p in plans
        )
        if len(plans) > DRY_RUN_TABLE_MAX:
            # Laying out a rich table costs about a millisecond a row: 100,000 trials took minutes.
            # Tab-separated lines list every trial just as well, and scripts can read them.
            console.print(f"{spec.name}: {len(plans)} trials", highlight=False)
            sys.stdout.write("\t".join(cols) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
            sys.stdout.flush()
        else:
            t = Table(title=f"{spec.name}: {len(plans)} trials", title_justify="left")
            for col in cols:
                t.add_column(col)
            for r in rows:
                t.add_row(*r)
            console.print(t)
        for name, folder in spec.data.sources.items():
            console.print(f"data: {name} <- {folder}", highlight=False)
        return
    from rich.live import Live

    from raysweep.summary import summarize
    from raysweep.sweep import run_sweep

    store = Store(store_root)
    live: Live | None = None

    def ready(url, total, pending):
        nonlocal live
        console.print(f"sweep [bold]{spec.name}[/]: {total} trials, {pending} to run · store {store.root}")
        if url:
            from raysweep.sweep import auth_note

            console.print(f"Ray dashboard: {url} · {auth_note()}")
        if pending == 0:
            console.print("nothing to do: every trial of this sweep is already complete in the store")

    def sink(views):
        nonlocal live
        if live is None:
            live = Live(_progress_table(views), console=console, refresh_per_second=4, transient=False)
            live.start()
        live.update(_progress_table(views))

    from transformers.utils import logging as hf_logging

    # The driver builds built-in models: their save progress bars and config notes are noise.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        outcome = run_sweep(
            spec,
            spec_path.read_text(),
            store,
            address=address,
            dashboard=dashboard,
            sink=sink,
            on_ready=ready,
            dashboard_host=dashboard_host,
        )
    finally:
        if live is not None:
            live.stop()
            console.print()
    if outcome.interrupted:
        done = outcome.already_done + outcome.done
        err.print(
            f"interrupted by {outcome.interrupted}: {done}/{outcome.total} trials done, {outcome.committed_epochs} epoch(s) of the "
            "unfinished ones committed and kept in the store; run the same command again to resume",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    console.print(
        _summary_table(summarize(store, spec.name), f"{spec.name}: accuracy on each forget task's test split")
    )
    console.print(
        f"{outcome.done} trials ran, {outcome.already_done} were already complete, {len(outcome.failed)} failed · {outcome.seconds:.0f} s"
    )
    for tid, reason in outcome.failed.items():
        err.print(f"[red]failed[/] {tid}: {reason}", highlight=False)
    raise typer.Exit(outcome.exit_code)


@app.command()
@_guard
def plan(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="YAML sweep spec."),
    gpu: Optional[str] = typer.Option(
        None,
        "--gpu",
        help="Estimate time on this GPU kind (h100, h200, a100, l40s, a10g, v100); default: this CPU, calibrated by a short timed pass.",
    ),
    gpus: int = typer.Option(1, "--gpus", help="GPUs in the cluster (with --gpu)."),
    mfu: float = typer.Option(0.4, "--mfu", help="Model FLOPs utilisation assumed on the GPU."),
    expect_epochs: Optional[str] = typer.Option(
        None,
        "--expect-epochs",
        help="Expected epochs per phase, e.g. finetune=40,forget=40 (default: the store's finished trials, else 40% of max_epochs).",
    ),
    store_root: Path = STORE_OPT,
    data_root: Optional[Path] = DATA_ROOT_OPT,
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", help="Count tokens with this tokenizer where a model's own cannot be loaded here."
    ),
) -> None:
    """Say what SPEC will cost before anything runs: trials, tokens, FLOPs, time, store and checkpoint disk."""
    from raysweep.planning import parse_expected, plan_sweep, render_plan
    from raysweep.spec import load_spec
    from raysweep.store import Store

    spec = load_spec(spec_path)
    if data_root is not None:
        from raysweep.tasks.sources import apply_data_root

        spec = apply_data_root(spec, data_root)
    result = plan_sweep(
        spec,
        Store(store_root),
        gpu=gpu,
        gpus=gpus,
        mfu=mfu,
        expected=parse_expected(expect_epochs),
        tokenizer=tokenizer,
    )
    for line in render_plan(result):
        console.print(line, highlight=False)


@app.command()
@_guard
def status(store_root: Path = STORE_OPT, sweep: Optional[str] = typer.Option(None, help="Only this sweep.")) -> None:
    """What the store holds: each trial's status, progress and headline accuracies."""
    from raysweep.integrity import verify
    from raysweep.store import Store
    from raysweep.summary import summarize

    store = Store(store_root)
    if not store.exists():
        raise BadInput(f"store: no raysweep store at {str(store.root)!r}")
    store.check_version()
    bad = verify(store)
    if bad:
        # No figures computed next to (or from) files that cannot be read back.
        for path, reason in bad:
            err.print(f"[red]corrupt[/] {path}: {reason}", highlight=False)
        raise StoreError(
            f"store: {len(bad)} corrupt file(s); refusing to summarise (`raysweep repair` quarantines them)"
        )
    sweeps = [sweep] if sweep else store.sweeps()
    for name in sweeps:
        rows = summarize(store, name)
        # The sweep as it is now: trials of its earlier versions are counted, not listed.
        plan = store.current_plan(name)
        current = [
            r for r in rows if (r.trial_id in plan["trial_ids"] if plan is not None else r.status != "superseded")
        ]
        console.print(
            _summary_table(
                current, f"sweep {name}: {sum(r.status == 'done' for r in current)}/{len(current)} trials done"
            )
        )
        if len(rows) > len(current):
            console.print(
                f"{len(rows) - len(current)} trial(s) of earlier versions of this sweep are kept in the store (superseded); analyses leave them out",
                highlight=False,
            )
        for r in current:
            if r.status in ("failed", "interrupted"):
                err.print(f"[red]{r.status}[/] {r.trial_id}: {r.error}", highlight=False)


@app.command()
@_guard
def analyze(
    store_root: Path = STORE_OPT,
    only: Optional[list[str]] = typer.Option(None, "--only", help="Run only these analyses (repeatable)."),
    engine: str = typer.Option("auto", "--engine", help="ray | local | auto"),
    sweep: Optional[str] = typer.Option(None, help="Only this sweep."),
    layer: int = typer.Option(-5, "--layer", help="Hidden-state layer the probes and the variance predictor read."),
    min_headroom: float = typer.Option(0.05, "--min-headroom", help="Mask forget ratios with less headroom than this."),
    denominator: str = typer.Option("trial", "--denominator", help="trial | own: accuracy that divides the ratio."),
) -> None:
    """Run the analyses over the store; results land as Parquet under the store's analysis/."""
    from raysweep.analysis import AnalysisParams, registered_analyses, render_outcome, run_analyses
    from raysweep.integrity import verify
    from raysweep.store import Store

    params = AnalysisParams(layer=layer, min_headroom=min_headroom, denominator=denominator)

    if engine not in ("ray", "local", "auto"):
        raise BadInput(f"--engine: {engine!r} is not one of ray, local, auto")
    for name in only or []:
        if name not in registered_analyses():
            raise BadInput(f"--only: unknown analysis {name!r} (known: {', '.join(registered_analyses())})")
    store = Store(store_root)
    if not store.exists():
        raise BadInput(f"store: no raysweep store at {str(store.root)!r}")
    results = store.root / "analysis"
    if not os.access(results if results.is_dir() else store.root, os.W_OK):
        raise BadInput(
            f"store: {str(results)!r} is not writable; `analyze` stores its results there (`raysweep report --out DIR` writes only to DIR)"
        )
    bad = verify(store)
    if bad:
        for path, reason in bad:
            err.print(f"[red]corrupt[/] {path}: {reason}", highlight=False)
        raise StoreError(f"store: {len(bad)} corrupt file(s); refusing to analyse (`raysweep repair` quarantines them)")
    failed = False
    for outcome in run_analyses(store, only=only, engine=engine, sweep=sweep, params=params):
        if outcome.status == "ok":
            console.print(render_outcome(outcome))
        else:
            failed |= outcome.status == "failed"
            console.print(f"[yellow]{outcome.name}[/]: {outcome.status}: {outcome.message}", highlight=False)
    raise typer.Exit(1 if failed else 0)


@app.command()
@_guard
def predict(
    store_root: Path = STORE_OPT,
    k: Optional[int] = typer.Option(None, "--k", help="Cells revealed of each held-out run (default 10)."),
    seeds: Optional[list[str]] = typer.Option(
        None, "--seeds", help="Seeds of the reveal draws, repeatable or comma-separated (default 0,1,2)."
    ),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="A cell above this counts as forgotten, for F1 (default 0.1)."
    ),
    measure: Optional[str] = typer.Option(
        None, "--measure", help="confidence (drop in confidence) | loss (rise in loss)."
    ),
    split: Optional[str] = typer.Option(None, "--split", help="Evaluation split of the matrix (default test)."),
    sweep: Optional[str] = typer.Option(None, help="Only this sweep."),
    engine: str = typer.Option("auto", "--engine", help="ray | local | auto"),
) -> None:
    """Predict which examples a forget run hits from k revealed ones, leave-one-run-out over
    the association matrix; results land under the store's analysis/predict/."""
    from raysweep.analysis import outcome_table
    from raysweep.analysis.prediction import PredictParams, run_prediction
    from raysweep.store import Store

    store = Store(store_root)
    if not store.exists():
        raise BadInput(f"store: no raysweep store at {str(store.root)!r}")
    given: dict[str, object] = {"k": k, "threshold": threshold, "measure": measure, "split": split}
    if seeds:
        parts = [s.strip() for arg in seeds for s in arg.split(",") if s.strip()]
        try:
            given["seeds"] = tuple(int(s) for s in parts)
        except ValueError:
            raise BadInput(f"--seeds: {', '.join(parts)!r} are not all integers") from None
    params = PredictParams(**{name: v for name, v in given.items() if v is not None})  # type: ignore[arg-type]
    outcome = run_prediction(store, params, sweep=sweep, engine=engine)
    if outcome.status != "ok":
        _fail(1, f"predict: {outcome.status}: {outcome.message}")
    console.print(outcome_table(outcome))
    console.print(f"results written to {outcome.paths[0].parent}", highlight=False)


@app.command()
@_guard
def report(
    store_root: Path = STORE_OPT,
    out: Path = typer.Option(..., "--out", help="Directory for the HTML report."),
    sweep: Optional[str] = typer.Option(None),
    layer: Optional[int] = typer.Option(None, "--layer", help="Rerun the analyses reading this hidden-state layer."),
    min_headroom: Optional[float] = typer.Option(None, "--min-headroom", help="Rerun them with this headroom floor."),
    denominator: Optional[str] = typer.Option(None, "--denominator", help="Rerun them with this ratio denominator."),
) -> None:
    """Write one self-contained HTML page with every figure and table. With any analysis
    option the analyses are rerun with it; otherwise fresh outputs of `analyze` are reused."""
    from raysweep.analysis import AnalysisParams
    from raysweep.report import write_report
    from raysweep.store import Store

    given = {"layer": layer, "min_headroom": min_headroom, "denominator": denominator}
    params = (
        AnalysisParams(**{k: v for k, v in given.items() if v is not None})
        if any(v is not None for v in given.values())
        else None
    )

    if out.exists() and not out.is_dir():
        raise BadInput(f"--out: {str(out)!r} is a file; --out names the directory the report goes into")
    store = Store(store_root)
    if not store.exists():
        raise BadInput(f"store: no raysweep store at {str(store.root)!r}")
    try:
        path = write_report(store, out, sweep=sweep, params=params)
    except OSError as exc:
        where, target = Path(exc.filename or "/").absolute(), out.absolute()
        if where != target and where not in target.parents and target not in where.parents:
            raise  # not about --out
        raise BadInput(f"--out: cannot write the report into {str(out)!r} ({exc.strerror or exc})") from None
    console.print(f"report written to {path}")


@app.command()
@_guard
def repair(store_root: Path = STORE_OPT) -> None:
    """Move unreadable Parquet files, commit markers and resume files to the store's
    quarantine/; the epochs they held rerun on resume."""
    from raysweep.integrity import quarantine, verify
    from raysweep.store import Store

    store = Store(store_root)
    if not store.exists():
        raise BadInput(f"store: no raysweep store at {str(store.root)!r}")
    bad = verify(store, deep=True)
    moved = quarantine(store, [p for p, _ in bad])
    for src, dest in zip(bad, moved):
        console.print(f"quarantined {src[0]} -> {dest} ({src[1]})", highlight=False)
    console.print(
        f"{len(moved)} file(s) quarantined"
        + ("; trials that lost epochs rerun them with the next `raysweep run`" if moved else "")
    )


@app.command()
@_guard
def diff(
    store_a: Path = typer.Argument(..., metavar="STORE_A", help="First store root."),
    store_b: Path = typer.Argument(..., metavar="STORE_B", help="Second store root."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
) -> None:
    """Compare two stores' trials of the same id: lineage fields that differ, and how far the
    headline accuracies moved (B minus A)."""
    import json

    from raysweep.lineage import diff_stores, render_diff

    result = diff_stores(store_a, store_b)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=1, default=str) + "\n")
        return
    for item in render_diff(result):
        console.print(item, highlight=False)


@tasks_app.command("list")
@_guard
def tasks_list() -> None:
    """Every registered task."""
    from raysweep.tasks import registered_tasks

    t = Table()
    for col in ("task", "kind", "description"):
        t.add_column(col)
    for name, task in sorted(registered_tasks().items(), key=lambda kv: (kv[1].kind, kv[0])):
        t.add_row(name, task.kind, task.description)
    console.print(t)


@tasks_app.command("show")
@_guard
def tasks_show(
    name: str,
    n: int = typer.Option(3, "-n", help="Examples to show."),
    source: Optional[str] = typer.Option(None, "--source", help="Local folder of the task's splits."),
    split: str = typer.Option("train", "--split"),
) -> None:
    """A few rendered, binarised examples of a task."""
    from raysweep.tasks import prepare_task

    if split not in SPLITS:
        raise BadInput(f"--split: {split!r} is not one of train, validation, test")
    task = prepare_task(name, seed=1234, cap=max(n, 1), max_chars=2048, source=source)
    for ex in task.split(split)[:n]:
        console.rule(f"{name} · {split} · #{ex.idx}")
        console.print(ex.prompt, markup=False, highlight=False)
        for i, c in enumerate(ex.continuations):
            console.print(f"  {'✓' if i == ex.gold else '✗'} {c!r}", markup=False, highlight=False)
    r = task.report
    console.print(f"source: {r.source}; split fallback: {r.split_fallback}", highlight=False)


@tasks_app.command("prepare")
@_guard
def tasks_prepare(
    names: list[str] = typer.Argument(..., help="Tasks to prepare."),
    out: Path = typer.Option(..., "--out", help="Directory to write <task>/<split>.parquet into."),
    cap: int = typer.Option(1000, "--cap"),
    seed: int = typer.Option(1234, "--seed"),
    max_chars: int = typer.Option(2048, "--max-chars"),
    data_root: Optional[Path] = DATA_ROOT_OPT,
) -> None:
    """Materialise prepared splits as Parquet, for clusters without hub access."""
    from raysweep.tasks.prepare import prepare_to_folder

    written = prepare_to_folder(names, out, seed=seed, cap=cap, max_chars=max_chars, data_root=data_root)
    for folder in written:
        console.print(f"wrote {folder.path}", highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
