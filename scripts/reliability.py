#!/usr/bin/env python
"""Reliability figures: inject real faults into real sweeps and check that nothing is lost.

    .venv/bin/python scripts/reliability.py                       # everything, writes RELIABILITY.md
    .venv/bin/python scripts/reliability.py --only driver-kill    # one scenario (repeatable)

Every scenario drives the `raysweep` command line in subprocesses, exactly as a user would,
on one small spec (a micro GPT-2, two forget tasks, fine-tune -> forget -> relearn). Each
store that a scenario leaves behind is compared with the store of an uninterrupted run of the
same spec (the reference): every (trial, phase, epoch, eval task, split, example) row must be
there exactly once (none lost, none duplicated, none extra) with the same confidences, and
the per-epoch summaries, hidden states and trial milestones must match.

Scenarios:
  worker-kill     SIGKILL of the Ray worker running a trial, at several points of the
                  trial's life (RAYSWEEP_FAULT, see raysweep/faults.py); Tune retries it.
  rank-kill       the same for trials run as 2 data-parallel workers (Ray Train inside the
                  Tune trial): SIGKILL of rank 0 (the writer) or rank 1; compared with an
                  uninterrupted 2-worker run.
  driver-kill     SIGKILL of the `raysweep run` process mid-sweep, several times; then
                  `raysweep run` again until the sweep completes.
  trial-error     exceptions inside trials (a simulated CUDA OOM on every attempt of one
                  trial, a one-off error in the other): exit code 1, the failure and its
                  reason in the trials table and `raysweep status`; a rerun completes it.
  corrupt-file    truncated / garbage Parquet files in a finished store: `status` and
                  `analyze` name them and refuse; `repair` quarantines; a rerun restores.
  driver-signal   SIGTERM, then SIGINT, to the `raysweep run` process mid-sweep: it stops within
                  seconds, marks the running trials interrupted, exit 1; a rerun completes.
  two-drivers     two `raysweep run` of one spec on one new store, started at the same moment:
                  one refuses in one line (or both finish); every row exactly once.
  two-versions    a second driver of the same sweep with another spec version (and one with
                  the same) while the first runs: refused with exit 2, the first undisturbed.
  edited-spec     a finished sweep rerun under its name with another learning rate: new trial
                  ids, the old trials superseded and their rows kept as they were.
  corrupt-resume  truncated weights and empty or cut commit markers of a trial's resume
                  point: it falls back (and logs why), or `repair` quarantines them.
  disk-full       the store on a small full tmpfs (root only): one line naming the store and
                  the cause, nothing half-committed; a rerun once space is freed completes.
  dead-node       scripts/cluster_check.sh: the worker node of a real two-node cluster is
                  killed mid-trial; the trial is retried on the head and resumes.
  network-exposure every TCP port a `raysweep run` opens, where it listens and what it
                  answers without the token.
  rerun-finished  `raysweep run` on a finished store: nothing to do, nothing written.
  bad-input       every malformed spec of tests/bad_specs/ plus bad stores and data folders:
                  exit code 2, one line naming the field, nothing written.

Results: JSON (--json) and a markdown table (--markdown).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SWEEP = "rel"
BAD_SPECS = ROOT / "tests" / "bad_specs"
KEY = ["sweep", "trial_id", "phase", "epoch", "eval_task", "split", "example_idx"]
KINDS = ("scores", "epochs", "hidden")

SPEC = """\
name: {name}
description: reliability scenarios (scripts/reliability.py)
models:
  - name: micro-gpt2
    arch: gpt2
    tiny: {{layers: 5, hidden: 32, heads: 2, vocab: 512}}
    pretrain: {{steps: 40, batch_size: 16}}
tasks: [sentiment, word_order]
forget_tasks: [sentiment, word_order]
methods: [random]
sizes: [24]
seeds: [0]
data: {{cap: 24}}
phases:
  finetune: {{optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: {ft}}}
  # stop_test_acc 0.01: forgetting runs its whole budget, so every phase has several epochs
  forget: {{optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: {fg}, stop_test_acc: 0.01}}
  relearn: {{enabled: {relearn}, optimizer: adamw, lr: 1.0e-3, batch_size: 8, max_epochs: 2}}
scoring: {{batch_size: 64}}
resources: {resources}
max_failures: {max_failures}
"""


def spec_text(
    name: str = SWEEP,
    ft: int = 3,
    fg: int = 3,
    relearn: bool = True,
    max_failures: int = 3,
    resources: str = "{cpu: 1, gpu: 0}",
) -> str:
    return SPEC.format(
        name=name, ft=ft, fg=fg, relearn=str(relearn).lower(), max_failures=max_failures, resources=resources
    )


# ---- running the command line ---------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("RAYSWEEP_MODEL_CACHE", str(ROOT / ".cache" / "test-models"))
    env.pop("RAYSWEEP_FAULT", None)
    return {**env, **(extra or {})}


def kill_session(sid: int) -> int:
    """SIGKILL every process of session `sid`: a driver started with start_new_session and
    the local Ray cluster it started (gcs, raylet, agents, workers all stay in its session).
    Only our own drivers' sessions are ever passed here."""
    killed = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if int(fields[3]) == sid and pid != os.getpid():  # fields[3]: session id
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def session_alive(sid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def stop_session(proc: subprocess.Popen) -> None:
    """Kill whatever the driver `proc` left in its session, then the driver if still alive."""
    kill_session(proc.pid)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def raysweep(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`raysweep ARGS` in its own session; whatever it leaves running is killed after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysweep.cli", *args],
        cwd=ROOT,
        env=_env(env),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)
        if proc.poll() is None:
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def commit_count(store: Path) -> int:
    base = store / "commits"
    return sum(1 for _ in base.rglob("e*.json")) if base.is_dir() else 0


def run_and_kill_driver(spec: Path, store: Path, after_commits: int, timeout: float = 900) -> dict:
    """Start `raysweep run`, SIGKILL the driver process (only it: its cluster is left to
    fend for itself, as after a real crash) once the store holds `after_commits` commit
    markers more than at the start; then clean up what the dead driver left running."""
    start = commit_count(store)
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysweep.cli", "run", str(spec), "--store", str(store), "--no-dashboard"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    t0 = time.time()
    killed = False
    try:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                break
            if commit_count(store) >= start + after_commits:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                break
            time.sleep(0.1)
        at_kill = commit_count(store)
        # Give the orphaned cluster a moment: its workers notice the driver is gone.
        time.sleep(1.0)
        leftovers = session_alive(proc.pid)
    finally:
        stop_session(proc)
    time.sleep(0.5)
    return {
        "killed": killed,
        "sid": proc.pid,
        "commits_before": start,
        "commits_at_kill": at_kill,
        "returncode": proc.returncode,
        "orphans_after_1s": len(leftovers),
        "left_running": len(session_alive(proc.pid)),
    }


# ---- reading and comparing stores -----------------------------------------------------------


def data_files(store: Path, kind: str) -> list[Path]:
    """Every data file a glob reader (duckdb, pandas) would pick up, committed or not:
    the strictest view for exactly-once."""
    base = store / kind
    return sorted(p for p in base.rglob("*.parquet") if not p.name.startswith(("_", "."))) if base.is_dir() else []


def _read(files: list[Path]) -> pa.Table | None:
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def store_facts(store: Path) -> dict:
    def marker_of(f: Path) -> Path:
        return store / "commits" / Path(*f.relative_to(store).parts[1:]).with_suffix(".json")

    uncommitted = [str(f) for kind in KINDS for f in data_files(store, kind) if not marker_of(f).is_file()]
    temp = [str(p) for p in store.rglob("_*.tmp-*") if "ray" not in p.relative_to(store).parts[:1]]
    return {"uncommitted_files": uncommitted, "temp_files": temp}


EPOCH_VALUES = ("train_loss", "forget_train_acc", "forget_validation_acc", "forget_test_acc")


def _num(col: str) -> str:
    # The pretrained epoch has no training loss (NaN), and NaN compares as the largest value.
    return f"(case when {col} is null or isnan({col}) then -1 else {col} end)"


def _only(table: pa.Table | None, trials: set[str] | None) -> pa.Table | None:
    if table is None or trials is None:
        return table
    return table.filter(pc.is_in(table.column("trial_id"), value_set=pa.array(sorted(trials), pa.string())))


def compare_stores(store: Path, reference: Path, atol: float = 1e-6, trials: set[str] | None = None) -> dict:
    """Exactly-once and equality of `store` against `reference`: counts of lost, duplicated
    and extra score rows, largest confidence / log-likelihood / hidden-state differences,
    and whether per-epoch summaries and trial milestones agree. With `trials`, only those
    trials' rows are compared, and their status is left out (a superseded trial's rows
    stay as they were)."""
    con = duckdb.connect()
    s, r = (_only(_read(data_files(root, "scores")), trials) for root in (store, reference))
    con.register("s", s if s is not None else pa.table({k: [] for k in KEY}))
    con.register("r", r)
    keys = ", ".join(KEY)
    one = lambda q: con.execute(q).fetchall()[0][0]  # noqa: E731
    out: dict = {
        "rows": one("select count(*) from s"),
        "reference_rows": one("select count(*) from r"),
        "duplicated": one(
            f"select coalesce(sum(c - 1), 0) from (select count(*) c from s group by {keys} having c > 1)"
        ),
        "lost": one(f"select count(*) from (select {keys} from r except select {keys} from s)"),
        "extra": one(f"select count(*) from (select {keys} from s except select {keys} from r)"),
    }
    diffs = con.execute(
        f"""select max(abs(s.confidence - r.confidence)), max(abs(s.ll_sum_correct - r.ll_sum_correct)),
                   max(abs(s.ll_sum_distractor - r.ll_sum_distractor)), count(*) filter (where s.correct != r.correct)
            from s join r using ({keys})"""
    ).fetchall()[0]
    out["max_confidence_diff"] = float(diffs[0] or 0.0)
    out["max_loglik_diff"] = float(max(diffs[1] or 0.0, diffs[2] or 0.0))
    out["prediction_mismatches"] = int(diffs[3] or 0)

    hs, hr = (_only(_read(data_files(root, "hidden")), trials) for root in (store, reference))
    if hr is None:
        out["hidden_equal"], out["max_hidden_diff"] = hs is None, 0.0
    elif hs is None or hs.num_rows != hr.num_rows:
        out["hidden_equal"], out["max_hidden_diff"] = False, float("inf")
    else:
        order = [(k, "ascending") for k in KEY]
        hs, hr = hs.sort_by(order), hr.sort_by(order)
        same_keys = all(hs.column(k).equals(hr.column(k)) for k in KEY)
        a = np.asarray(hs.column("hidden").combine_chunks().flatten(), dtype=np.float64)
        b = np.asarray(hr.column("hidden").combine_chunks().flatten(), dtype=np.float64)
        out["max_hidden_diff"] = float(np.max(np.abs(a - b))) if same_keys and a.shape == b.shape else float("inf")
        out["hidden_equal"] = same_keys and out["max_hidden_diff"] <= atol

    es, er = (_only(_read(data_files(root, "epochs")), trials) for root in (store, reference))
    con.register("es", es)
    con.register("er", er)
    ekeys = "sweep, trial_id, phase, epoch"
    out["epochs_equal"] = bool(
        one("select count(*) from es") == one("select count(*) from er")
        and one(f"select count(*) from (select {ekeys} from er except select {ekeys} from es)") == 0
        and (
            one(
                f"""select max(greatest({", ".join(f"abs({_num(f'es.{c}')} - {_num(f'er.{c}')})" for c in EPOCH_VALUES)}))
                from es join er using ({ekeys})"""
            )
            or 0.0
        )
        <= max(atol, 1e-5)
    )

    def milestones(root: Path) -> dict:
        t = _only(_read(data_files(root, "trials")), trials)
        cols = ("status",) * (trials is None) + ("best_finetune_epoch", "last_forget_epoch", "last_relearn_epoch")
        return {row["trial_id"]: tuple(row[c] for c in cols) for row in (t.to_pylist() if t is not None else [])}

    ms, mr = milestones(store), milestones(reference)
    statuses = {
        row["trial_id"]: row["status"]
        for row in (
            _only(_read(data_files(store, "trials")), trials) or pa.table({"trial_id": [], "status": []})
        ).to_pylist()
    }
    out["trials_done"] = sum(v == "done" for v in statuses.values())
    out["trials_equal"] = ms == mr
    facts = store_facts(store)
    out["uncommitted_files"] = len(facts["uncommitted_files"])
    out["temp_files"] = len(facts["temp_files"])
    out["ok"] = (
        out["lost"] == 0
        and out["duplicated"] == 0
        and out["extra"] == 0
        and out["rows"] == out["reference_rows"]
        and out["max_confidence_diff"] <= atol
        and out["max_loglik_diff"] <= max(atol, 1e-4)
        and out["prediction_mismatches"] == 0
        and out["hidden_equal"]
        and out["epochs_equal"]
        and out["trials_equal"]
        and out["uncommitted_files"] == 0
        and out["temp_files"] == 0
    )
    return out


def fault_log(store: Path) -> list[dict]:
    """The faults the trials really fired (each is logged just before it fires)."""
    out: list[dict] = []
    base = store / "checkpoints"
    for log in sorted(base.rglob("faults.log")) if base.is_dir() else []:
        out += [
            json.loads(line) | {"trial_id": log.parent.name} for line in log.read_text().splitlines() if line.strip()
        ]
    return out


def snapshot(store: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file()
    }


# ---- bad input ------------------------------------------------------------------------------


def expected_rejections() -> dict[str, dict[str, str]]:
    """tests/bad_specs/expected.tsv: file, stage (spec | data | cluster), the field the
    message must name, and a fragment of the problem it must state."""
    with open(BAD_SPECS / "expected.tsv", newline="") as fh:
        rows = [r for r in csv.DictReader((line for line in fh if not line.startswith("#")), delimiter="\t")]
    return {r["file"]: r for r in rows}


def one_error_line(stderr: str) -> str | None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 and lines[0].startswith("error: ") else None


def make_bad_inputs(work: Path) -> list[dict]:
    """Inputs that need a file system to be wrong in: (name, spec file, store, field, problem)."""
    work.mkdir(parents=True, exist_ok=True)
    good = work / "good.yaml"
    good.write_text(spec_text(name="badcase"))
    cases = []
    a_file = work / "store-is-a-file"
    a_file.write_text("not a directory\n")
    cases.append(
        {"name": "store_is_a_file", "spec": good, "store": a_file, "field": "store:", "problem": "not a directory"}
    )
    cases.append(
        {
            "name": "store_not_writable",
            "spec": good,
            "store": Path("/proc/raysweep-store"),
            "field": "store:",
            "problem": "not writable",
        }
    )
    cases.append(
        {
            "name": "store_below_a_file",
            "spec": good,
            "store": a_file / "store",
            "field": "store:",
            "problem": "not writable",
        }
    )
    newer = work / "newer-store"
    newer.mkdir(exist_ok=True)
    (newer / "store.json").write_text(json.dumps({"schema_version": 999}))
    cases.append(
        {"name": "store_newer_schema", "spec": good, "store": newer, "field": "store:", "problem": "newer raysweep"}
    )
    rows = [
        {"prompt": f"Review {i}: was it good?", "choice_0": "negative", "choice_1": "positive", "gold": i % 2}
        for i in range(30)
    ]
    missing = work / "data-missing-split"
    missing.mkdir(exist_ok=True)
    for split in ("train", "validation"):
        pq.write_table(pa.Table.from_pylist(rows), missing / f"{split}.parquet")
    nonbinary = work / "data-nonbinary"
    nonbinary.mkdir(exist_ok=True)
    for split in ("train", "validation", "test"):
        pq.write_table(
            pa.Table.from_pylist(
                [dict(r, gold=2 if split == "train" and i == 5 else r["gold"]) for i, r in enumerate(rows)]
            ),
            nonbinary / f"{split}.parquet",
        )
    for name, folder, problem in (
        ("data_missing_split", missing, "no test split"),
        ("data_nonbinary_labels", nonbinary, "gold 2"),
    ):
        spec = work / f"{name}.yaml"
        spec.write_text(
            spec_text(name="badcase").replace("data: {cap: 24}", f"data: {{cap: 24, sources: {{sentiment: {folder}}}}}")
        )
        cases.append(
            {
                "name": name,
                "spec": spec,
                "store": work / f"store-{name}",
                "field": "data.sources.sentiment",
                "problem": problem,
            }
        )
    # Spec files no corpus can hold: a device that never ends, and one too large to be a spec.
    cases.append(
        {
            "name": "spec_is_dev_zero",
            "spec": Path("/dev/zero"),
            "store": work / "store-dev-zero",
            "field": "spec:",
            "problem": "is not a regular file",
        }
    )
    huge = work / "huge.yaml"
    huge.write_text(spec_text(name="badcase") + "description: " + "x" * (50 << 20) + "\n")
    cases.append(
        {
            "name": "spec_too_large",
            "spec": huge,
            "store": work / "store-huge",
            "field": "spec:",
            "problem": "MB; a spec is a small YAML file",
        }
    )
    return cases


def read_only_view(src: Path, view: Path) -> Callable[[], None]:
    """Make `view` a read-only view of directory `src` (a read-only bind mount as root, who
    writes through permission bits; the permission bits otherwise); returns its undo."""
    if os.geteuid() != 0:
        src.chmod(0o555)
        view.symlink_to(src)
        return lambda: src.chmod(0o755)
    view.mkdir(parents=True, exist_ok=True)
    for cmd in (["mount", "--bind", str(src), str(view)], ["mount", "-o", "remount,ro,bind", str(view)]):
        subprocess.run(cmd, check=True, capture_output=True)
    return lambda: subprocess.run(["umount", "-l", str(view)], check=False)


def _bad_analysis_commands(work: Path, reference: Path | None, undo: list) -> list[dict]:
    """`analyze` and `report` on stores and outputs they cannot use: one line, exit 2, and the
    paths involved unchanged."""
    work.mkdir(parents=True, exist_ok=True)
    empty, missing, page = work / "empty-store", work / "no-store", work / "page.html"
    empty.mkdir(exist_ok=True)
    page.write_text("someone else's page\n")
    cases = [
        (
            "analyze_missing_store",
            ("analyze", "--store", str(missing), "--engine", "local"),
            "store:",
            "no raysweep store",
        ),
        ("analyze_empty_dir", ("analyze", "--store", str(empty), "--engine", "local"), "store:", "no raysweep store"),
        (
            "report_missing_store",
            ("report", "--store", str(missing), "--out", str(work / "out")),
            "store:",
            "no raysweep store",
        ),
        ("report_out_is_a_file", ("report", "--store", str(empty), "--out", str(page)), "--out:", "is a file"),
    ]
    if reference is not None:
        copy = work / "finished-store"
        if not copy.exists():
            shutil.copytree(reference, copy, ignore=shutil.ignore_patterns("ray"))
        undo.append(read_only_view(copy, work / "finished-store-ro"))
        cases.append(
            (
                "analyze_read_only_store",
                ("analyze", "--store", str(work / "finished-store-ro"), "--engine", "local"),
                "store:",
                "is not writable",
            )
        )
        # A store that can be read, so that the refusal is the output's.
        locked = work / "locked"
        locked.mkdir(exist_ok=True)
        undo.append(read_only_view(locked, work / "locked-ro"))
        cases.append(
            (
                "report_out_not_writable",
                ("report", "--store", str(copy), "--out", str(work / "locked-ro" / "rep")),
                "--out:",
                "cannot write the report",
            )
        )
    results = []
    for name, args, field_, problem in cases:
        before = (snapshot(work), page.read_text())
        r = raysweep(*args, timeout=300)
        line = one_error_line(r.stderr)
        same = (snapshot(work), page.read_text()) == before
        ok = (
            r.returncode == 2
            and line is not None
            and field_ in line
            and problem in line
            and same
            and not r.stdout.strip()
        )
        results.append(
            {
                "case": name,
                "returncode": r.returncode,
                "message": line or r.stderr.strip()[-300:],
                "nothing_written": same,
                "ok": ok,
            }
        )
    return results


def bad_input_scenario(work: Path, reference: Path | None = None) -> dict:
    t0 = time.time()
    undo: list[Callable[[], None]] = []
    try:
        return _bad_input_scenario(work, reference, undo, t0)
    finally:
        for u in reversed(undo):
            u()


def _bad_input_scenario(work: Path, reference: Path | None, undo: list, t0: float) -> dict:
    table = expected_rejections()
    cases = [
        {
            "name": f,
            "spec": BAD_SPECS / f,
            "store": work / f"store-{Path(f).stem}",
            "field": row["field"],
            "problem": row["problem"],
        }
        for f, row in sorted(table.items())
    ]
    cases += make_bad_inputs(work / "inputs")
    (work / "inputs" / "ro-dir").mkdir(parents=True, exist_ok=True)
    undo.append(read_only_view(work / "inputs" / "ro-dir", work / "inputs" / "ro-view"))
    cases.append(
        {
            "name": "store_in_read_only_dir",
            "spec": work / "inputs" / "good.yaml",
            "store": work / "inputs" / "ro-view" / "store",
            "field": "store:",
            "problem": "not writable",
        }
    )
    sentinel = Path("/tmp/raysweep-pwned-by-spec")
    sentinel.unlink(missing_ok=True)
    results = []
    for c in cases:
        store: Path = c["store"]
        before = snapshot(store) if store.is_dir() else ("file" if store.exists() else None)
        r = raysweep("run", str(c["spec"]), "--store", str(store), "--no-dashboard", timeout=300)
        line = one_error_line(r.stderr)
        after = snapshot(store) if store.is_dir() else ("file" if store.exists() else None)
        ok = (
            r.returncode == 2
            and line is not None
            and c["field"] in line
            and c["problem"] in line
            and before == after
            and not r.stdout.strip()
        )
        results.append(
            {
                "case": c["name"],
                "returncode": r.returncode,
                "message": line or r.stderr.strip()[-300:],
                "nothing_written": before == after,
                "ok": ok,
            }
        )
    results += _bad_analysis_commands(work / "analysis", reference, undo)
    return {
        "scenario": "bad-input",
        "seconds": round(time.time() - t0, 1),
        "specs": len(results),
        "rejected_correctly": sum(r["ok"] for r in results),
        "code_executed": sentinel.exists(),
        "failures": [r for r in results if not r["ok"]],
        "cases": results,
        "ok": all(r["ok"] for r in results) and not sentinel.exists(),
    }


# ---- the scenarios --------------------------------------------------------------------------


def _finish(
    name: str,
    store: Path,
    reference: Path,
    faults: int,
    t0: float,
    extra: dict | None = None,
    trials: set[str] | None = None,
) -> dict:
    cmp = compare_stores(store, reference, trials=trials)
    res = {"scenario": name, "faults_injected": faults, "seconds": round(time.time() - t0, 1), **cmp, **(extra or {})}
    res["ok"] = cmp["ok"] and all(v for k, v in (extra or {}).items() if k.startswith("check_"))
    return res


def worker_kill(work: Path, spec: Path, reference: Path) -> dict:
    t0 = time.time()
    store = work / "worker-kill"
    # A kill at every kind of point: before the first resume point, between an epoch's commit
    # and its resume point (the epoch is recomputed and its files replaced), right after a
    # resume point, at a phase's last epoch and in relearning; attempts 1..3 of one trial.
    faults = [
        "action=kill,phase=pretrained,epoch=0,point=commit,trial=sentiment,attempt=1",
        "action=kill,phase=finetune,epoch=2,point=commit,trial=sentiment,attempt=2",
        "action=kill,phase=forget,epoch=3,point=resume,trial=sentiment,attempt=3",
        "action=kill,phase=finetune,epoch=3,point=resume,trial=word,attempt=1",
        "action=kill,phase=forget,epoch=2,point=commit,trial=word,attempt=2",
        "action=kill,phase=relearn,epoch=1,point=commit,trial=word,attempt=3",
    ]
    return _run_with_kills("worker-kill", spec, store, reference, faults, t0)


def _run_with_kills(name: str, spec: Path, store: Path, reference: Path, faults: list[str], t0: float) -> dict:
    """One `raysweep run` with the given kills armed; every one of them must have fired."""
    r = raysweep("run", str(spec), "--store", str(store), "--no-dashboard", env={"RAYSWEEP_FAULT": ";".join(faults)})
    fired = fault_log(store)
    armed = sorted(int(dict(kv.split("=") for kv in f.split(",")).get("rank", 0)) for f in faults)
    return _finish(
        name,
        store,
        reference,
        len(fired),
        t0,
        {
            "returncode": r.returncode,
            "check_exit_0": r.returncode == 0,
            "check_all_kills_fired": len(fired) == len(faults)
            and all(f["action"] == "kill" for f in fired)
            and sorted(f.get("rank", 0) for f in fired) == armed,
            "killed_pids": sorted({f["pid"] for f in fired}),
        },
    )


def rank_kill(work: Path) -> dict:
    """Multi-worker trials need their own reference: two ranks draw dropout masks for their
    own shards, so their numbers differ (slightly) from a one-process run's."""
    t0 = time.time()
    spec = work / "spec-2-workers.yaml"
    spec.write_text(spec_text(resources="{cpu: 2, gpu: 0, workers: 2}"))
    reference = work / "reference-2-workers"
    r = raysweep("run", str(spec), "--store", str(reference), "--no-dashboard")
    if r.returncode != 0:
        return {"scenario": "rank-kill", "ok": False, "error": (r.stderr or r.stdout)[-2000:]}
    faults = [
        "action=kill,phase=finetune,epoch=2,point=commit,trial=sentiment,attempt=1,rank=1",
        "action=kill,phase=forget,epoch=1,point=resume,trial=sentiment,attempt=2,rank=0",
        "action=kill,phase=finetune,epoch=3,point=resume,trial=word,attempt=1,rank=0",
        "action=kill,phase=relearn,epoch=1,point=commit,trial=word,attempt=2,rank=1",
    ]
    return _run_with_kills("rank-kill", spec, work / "rank-kill", reference, faults, t0)


def driver_kill(work: Path, spec: Path, reference: Path, total_commits: int) -> dict:
    t0 = time.time()
    store = work / "driver-kill"
    kills = []
    for step in (2, 4, 5):  # commit markers to wait for after each (re)start
        if commit_count(store) + step >= total_commits:
            break
        kills.append(run_and_kill_driver(spec, store, step))
    r = raysweep("run", str(spec), "--store", str(store), "--no-dashboard")
    again = raysweep("run", str(spec), "--store", str(store), "--no-dashboard")
    return _finish(
        "driver-kill",
        store,
        reference,
        sum(k["killed"] for k in kills),
        t0,
        {
            "kills": kills,
            "returncode": r.returncode,
            "check_exit_0": r.returncode == 0,
            "check_all_killed_mid_sweep": all(k["killed"] for k in kills),
            "check_then_nothing_to_do": again.returncode == 0 and "nothing to do" in again.stdout,
        },
    )


def trial_error(work: Path, spec: Path, reference: Path) -> dict:
    t0 = time.time()
    store = work / "trial-error"
    faults = "action=oom,phase=forget,epoch=2,point=commit,trial=word,attempt=*;action=raise,phase=finetune,epoch=1,point=resume,trial=sentiment,attempt=1"
    first = raysweep("run", str(spec), "--store", str(store), "--no-dashboard", env={"RAYSWEEP_FAULT": faults})
    rows = {r["trial_id"]: r for r in _read(data_files(store, "trials")).to_pylist()}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    status = raysweep("status", "--store", str(store))
    fired = fault_log(store)
    second = raysweep("run", str(spec), "--store", str(store), "--no-dashboard")
    return _finish(
        "trial-error",
        store,
        reference,
        len(fired),
        t0,
        {
            "first_returncode": first.returncode,
            "check_exit_1": first.returncode == 1,
            "check_one_failed_with_reason": len(failed) == 1 and "OutOfMemoryError" in (failed[0]["error"] or ""),
            "check_other_done": sum(r["status"] == "done" for r in rows.values()) == 1,
            "check_status_shows_reason": "OutOfMemoryError" in status.stderr,
            "check_rerun_exit_0": second.returncode == 0,
            "failed_reason": failed[0]["error"] if failed else None,
        },
    )


def corrupt_file(work: Path, reference: Path) -> dict:
    t0 = time.time()
    store = work / "corrupt-file"
    shutil.copytree(reference, store, ignore=shutil.ignore_patterns("ray"))
    scores = data_files(store, "scores")
    epochs = data_files(store, "epochs")
    hidden = data_files(store, "hidden")
    targets = [scores[len(scores) // 2], epochs[1], hidden[-1]]
    data = targets[0].read_bytes()
    targets[0].write_bytes(data[: len(data) // 2])  # truncated, as by a crash without atomic writes
    targets[1].write_bytes(b"PAR1" + os.urandom(200))  # garbage
    data = targets[2].read_bytes()
    targets[2].write_bytes(data[:-20])  # footer cut
    status = raysweep("status", "--store", str(store))
    analyze = raysweep("analyze", "--store", str(store), "--engine", "local")
    named = lambda r: all(str(t) in r.stderr for t in targets)  # noqa: E731
    repair = raysweep("repair", "--store", str(store))
    status_after = raysweep("status", "--store", str(store))
    rerun = raysweep("run", str(work / "spec.yaml"), "--store", str(store), "--no-dashboard")
    return _finish(
        "corrupt-file",
        store,
        reference,
        len(targets),
        t0,
        {
            "check_status_refuses_and_names": status.returncode == 2 and named(status) and "done" not in status.stdout,
            "check_analyze_refuses_and_names": analyze.returncode == 2 and named(analyze),
            "check_repair_quarantines": repair.returncode == 0
            and f"{len(targets)} file(s) quarantined" in repair.stdout,
            "check_status_clean_after_repair": status_after.returncode == 0,
            "check_rerun_exit_0": rerun.returncode == 0,
            "quarantined": sorted(str(p.relative_to(store)) for p in (store / "quarantine").rglob("*.parquet")),
        },
    )


def damage_tensor_bytes(path: Path) -> None:
    """Flip the exponent bits of a few float32 values inside the largest tensor of a torch
    file, as a bad disk sector would: the zip structure stays intact."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    for k in range(8):
        data[start + 4 * k + 3] ^= 0x3F  # high byte of a little-endian float32
    path.write_bytes(bytes(data))


def corrupt_resume(work: Path, spec: Path, reference: Path) -> dict:
    """Damaged resume points and commit markers. An unfinished trial meets them on resume
    and falls back (a fresh start, logged in its restarts.log); in a finished store
    `status` names them, `repair` quarantines them and the next run recomputes."""
    t0 = time.time()
    store = work / "corrupt-resume"
    # The sentiment trial is killed on every attempt after fine-tuning epoch 1's resume point
    # (which names its best-epoch weights): it fails, with that resume point on disk.
    kills = "action=kill,phase=finetune,epoch=1,point=resume,trial=sentiment,attempt=1;action=kill,phase=finetune,epoch=2,point=commit,trial=sentiment,attempt=*"
    first = raysweep("run", str(spec), "--store", str(store), "--no-dashboard", env={"RAYSWEEP_FAULT": kills})
    ckpt = next((store / "checkpoints" / SWEEP).glob("sentiment-*"))
    best = next(ckpt.glob("best_finetune-e*.pt"))
    best.write_bytes(best.read_bytes()[:1000])  # truncated
    damage_tensor_bytes(ckpt / "latest.pt")  # weights of the last resume point: bits flipped, the zip intact
    marker = store / "commits" / SWEEP / ckpt.name / "pretrained" / "e0000.json"
    marker.write_bytes(b"")  # empty
    second = raysweep("run", str(spec), "--store", str(store), "--no-dashboard")
    log = (ckpt / "restarts.log").read_text() if (ckpt / "restarts.log").exists() else ""
    word = next((store / "checkpoints" / SWEEP).glob("word-*"))
    latest = word / "latest.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    garbage = store / "commits" / SWEEP / word.name / "forget" / "e0001.json"
    garbage.write_bytes(b'{"trial_id": "wo')  # cut mid-write
    status = raysweep("status", "--store", str(store))
    repair = raysweep("repair", "--store", str(store))
    status_after = raysweep("status", "--store", str(store))
    third = raysweep("run", str(spec), "--store", str(store), "--no-dashboard")
    return _finish(
        "corrupt-resume",
        store,
        reference,
        len(fault_log(store)) + 4,
        t0,
        {
            "check_first_run_failed_the_killed_trial": first.returncode == 1,
            # The marker is looked at first (quarantined, its epoch recomputed), then the resume
            # point, whose damaged weights only the CRC of its members shows: a fresh start.
            "check_trial_fell_back_and_said_so": (
                second.returncode == 0
                and f"{marker}: commit marker is empty" in log
                and "unreadable resume point" in log
                and "CRC" in log
                and "restarting it from the pretrained model" in log
            ),
            "check_status_names_resume_file_and_marker": status.returncode == 2
            and str(latest) in status.stderr
            and str(garbage) in status.stderr,
            "check_repair_quarantines": repair.returncode == 0
            and "2 file(s) quarantined" in repair.stdout
            and status_after.returncode == 0,
            "check_rerun_exit_0": third.returncode == 0,
            "restarts_log": log.strip().splitlines(),
        },
    )


def _signal_driver(spec: Path, store: Path, sig: signal.Signals, after_commits: int, timeout: float = 900) -> dict:
    """Start `raysweep run` and send `sig` to the driver process (only it, as `kill` or a
    scheduler's preemption does) once `after_commits` more epochs are committed; the driver
    must then stop by itself."""
    start = commit_count(store)
    out_file, err_file = store.parent / f"{store.name}-{sig.name}.out", store.parent / f"{store.name}-{sig.name}.err"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raysweep.cli", "run", str(spec), "--store", str(store), "--no-dashboard"],
            cwd=ROOT,
            env=_env(),
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    t0, sent_at = time.time(), None
    try:
        while time.time() - t0 < timeout and proc.poll() is None:
            if commit_count(store) >= start + after_commits:
                os.kill(proc.pid, sig)
                sent_at = time.time()
                break
            time.sleep(0.1)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        stopped_in = round(time.time() - sent_at, 1) if sent_at is not None and proc.poll() is not None else None
        left = len(session_alive(proc.pid))
    finally:
        stop_session(proc)
    lines = [ln for ln in err_file.read_text().splitlines() if ln.strip()]
    statuses = sorted(r["status"] for r in _read(data_files(store, "trials")).to_pylist())
    return {
        "signal": sig.name,
        "sent": sent_at is not None,
        "returncode": proc.returncode,
        "stopped_in_s": stopped_in,
        "last_line": lines[-1] if lines else "",
        "statuses": statuses,
        "left_running": left,
        "commits_at_signal": commit_count(store),
    }


def driver_signal(work: Path, spec: Path, reference: Path) -> dict:
    t0 = time.time()
    store = work / "driver-signal"
    stops = [_signal_driver(spec, store, signal.SIGTERM, 3), _signal_driver(spec, store, signal.SIGINT, 4)]
    r = raysweep("run", str(spec), "--store", str(store), "--no-dashboard")
    return _finish(
        "driver-signal",
        store,
        reference,
        sum(s["sent"] for s in stops),
        t0,
        {
            "stops": stops,
            "returncode": r.returncode,
            "check_all_sent_mid_sweep": all(s["sent"] for s in stops),
            "check_exit_1": all(s["returncode"] == 1 for s in stops),
            "check_stopped_within_30s": all(s["stopped_in_s"] is not None and s["stopped_in_s"] < 30 for s in stops),
            "check_one_line_says_rerun": all(
                s["last_line"].startswith(f"interrupted by {s['signal']}: ")
                and "run the same command again" in s["last_line"]
                for s in stops
            ),
            "check_trials_marked_interrupted": all(
                "interrupted" in s["statuses"] and set(s["statuses"]) <= {"interrupted", "done", "pending"}
                for s in stops
            ),
            "check_rerun_exit_0": r.returncode == 0,
        },
    )


def two_versions(work: Path, spec: Path, reference: Path) -> dict:
    """A second driver on the same store, with the same sweep name and another forget learning
    rate, while the first runs; then the same version again. Both are refused; the first runs
    on undisturbed and its store equals the reference (nothing of the other version in it)."""
    t0 = time.time()
    store = work / "two-versions"
    other = work / "spec-other-forget-lr.yaml"
    other.write_text(
        spec.read_text().replace("forget: {optimizer: adamw, lr: 2.0e-3", "forget: {optimizer: adamw, lr: 3.0e-3")
    )
    # The first run is kept going long enough for two more drivers to start beside it (each
    # takes seconds to import torch and Ray): its workers are killed once in relearning and
    # Tune retries them from their resume points, which leaves the rows as they were
    # (worker-kill); without this the 25-second sweep could end before they look.
    slow = "action=kill,phase=relearn,epoch=1,point=commit,trial=sentiment,attempt=1;action=kill,phase=relearn,epoch=1,point=commit,trial=word,attempt=1"
    lock = store / "sweeps" / SWEEP / "driver.lock"
    with open(work / "two-versions.err", "w") as err:
        first = subprocess.Popen(
            [sys.executable, "-m", "raysweep.cli", "run", str(spec), "--store", str(store), "--no-dashboard"],
            cwd=ROOT,
            env=_env({"RAYSWEEP_FAULT": slow}),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 600
        while not (lock.is_file() and lock.stat().st_size) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        # Both at once, as soon as the first holds the sweep.
        with ThreadPoolExecutor(2) as pool:
            runs = [
                pool.submit(raysweep, "run", str(path), "--store", str(store), "--no-dashboard", timeout=300)
                for path in (other, spec)
            ]
            second, same = (r.result() for r in runs)
        undisturbed = first.poll() is None
        first.wait(timeout=900)
    finally:
        stop_session(first)
    analyze = raysweep("analyze", "--store", str(store), "--engine", "local")
    refusal, again = one_error_line(second.stderr) or "", one_error_line(same.stderr) or ""
    return _finish(
        "two-versions",
        store,
        reference,
        2 + len(fault_log(store)),
        t0,
        {
            "refusal": refusal,
            "same_version_refusal": again,
            "first_returncode": first.returncode,
            "check_other_version_refused": second.returncode == 2
            and "another version of this sweep is running" in refusal,
            "check_same_version_refused": same.returncode == 2 and "this same version is already being run" in again,
            "check_first_undisturbed": undisturbed and first.returncode == 0,
            "check_analyze_exit_0": analyze.returncode == 0,
        },
    )


def rerun_finished(reference: Path, spec: Path) -> dict:
    t0 = time.time()
    before = snapshot(reference)
    r = raysweep("run", str(spec), "--store", str(reference), "--no-dashboard")
    return {
        "scenario": "rerun-finished",
        "faults_injected": 0,
        "seconds": round(time.time() - t0, 1),
        "returncode": r.returncode,
        "says_nothing_to_do": "nothing to do" in r.stdout,
        "store_unchanged": snapshot(reference) == before,
        "ok": r.returncode == 0 and "nothing to do" in r.stdout and snapshot(reference) == before,
    }


def two_drivers(work: Path, spec: Path, reference: Path) -> dict:
    """Two `raysweep run` of the same spec on one new store, started at the same moment: one
    takes the sweep, the other refuses in one line (or both finish); every row exactly once."""
    t0 = time.time()
    store = work / "two-drivers"
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(raysweep, "run", str(spec), "--store", str(store), "--no-dashboard") for _ in range(2)]
        results = [r.result() for r in runs]
    codes = sorted(r.returncode for r in results)
    lines = [one_error_line(r.stderr) or "" for r in results if r.returncode == 2]
    refused_cleanly = codes == [0, 2] and len(lines) == 1 and "already being run on this store" in lines[0]
    return _finish(
        "two-drivers",
        store,
        reference,
        1,
        t0,
        {
            "returncodes": codes,
            "refusal": lines[0] if lines else None,
            "check_one_refused_or_both_finished": refused_cleanly or codes == [0, 0],
        },
    )


def edited_spec(work: Path, spec: Path, reference: Path) -> dict:
    """The finished sweep rerun under the same name with another forget learning rate: the
    changed trials get new ids and run, the old ones stay, marked superseded, row for row as
    they were; `status` says so and the analyses read only the new version."""
    t0 = time.time()
    store, edited_ref = work / "edited-spec", work / "reference-edited"
    shutil.copytree(reference, store, ignore=shutil.ignore_patterns("ray"))
    edited = work / "spec-edited-forget-lr.yaml"
    edited.write_text(
        spec.read_text().replace("forget: {optimizer: adamw, lr: 2.0e-3", "forget: {optimizer: adamw, lr: 3.0e-3")
    )
    alone = raysweep("run", str(edited), "--store", str(edited_ref), "--no-dashboard")
    rerun = raysweep("run", str(edited), "--store", str(store), "--no-dashboard")
    status = raysweep("status", "--store", str(store))
    analyze = raysweep("analyze", "--store", str(store), "--engine", "local")
    statuses = trial_statuses(store)
    old_ids = {r["trial_id"] for r in _read(data_files(reference, "trials")).to_pylist()}
    new_ids = {r["trial_id"] for r in _read(data_files(edited_ref, "trials")).to_pylist()}
    old_kept = compare_stores(store, reference, trials=old_ids)
    res = _finish(
        "edited-spec",
        store,
        edited_ref,
        1,
        t0,
        {
            "returncode": rerun.returncode,
            "trial_statuses": statuses,
            "check_runs_alone_and_rerun_exit_0": alone.returncode == 0 and rerun.returncode == 0,
            "check_new_ids": bool(new_ids) and not (new_ids & old_ids),
            "check_old_superseded_new_done": all(statuses.get(t) == "superseded" for t in old_ids)
            and all(statuses.get(t) == "done" for t in new_ids),
            "check_old_rows_unchanged": old_kept["ok"],
            "check_status_says_superseded": status.returncode == 0 and "superseded" in status.stdout,
            "check_analyze_exit_0": analyze.returncode == 0,
        },
        trials=new_ids,
    )
    res["old_version_rows_checked"] = old_kept["rows"]
    return res


def _mount_reason() -> str | None:
    """None if this process can mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


def mount_tmpfs(where: Path, size: str = "20m") -> str | None:
    """Mount a tmpfs of `size` at `where`; None on success, else why it could not."""
    why = _mount_reason()
    if why:
        return why
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    return None if r.returncode == 0 else f"cannot mount a tmpfs here: {r.stderr.strip()}"


def fill_disk(mnt: Path, leave_bytes: int) -> Path:
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave_bytes))
    return filler


def disk_full(work: Path, spec: Path, reference: Path) -> dict:
    """The store on a 20 MB tmpfs filled to 300 kB free: room for the plan, the examples and
    the pretrained epoch, not for the first resume point (376 kB here). The trial fails with
    the store and the cause in one line, nothing half-committed; once the filler is deleted a
    rerun completes with nothing lost. One trial (the reference's sentiment trial, same id):
    two would race for the last bytes, and the loser's driver may find no room left even to
    record why it stopped."""
    t0 = time.time()
    one = work / "spec-one-trial.yaml"
    one.write_text(spec.read_text().replace("forget_tasks: [sentiment, word_order]", "forget_tasks: [sentiment]"))
    spec = one
    mnt = work / "tmpfs"
    why = mount_tmpfs(mnt)
    if why:
        return {"scenario": "disk-full", "skipped": why, "ok": True, "seconds": 0.0}
    try:
        root = mnt / "store"
        filler = fill_disk(mnt, 300 << 10)
        full = raysweep("run", str(spec), "--store", str(root), "--no-dashboard")
        reason = f"store {root.absolute()}: no space left on device"
        rows = _read(data_files(root, "trials"))
        failed_rows = rows.to_pylist() if rows is not None else []
        facts = store_facts(root)
        filler.unlink()
        again = raysweep("run", str(spec), "--store", str(root), "--no-dashboard")
        trial_ids = {r["trial_id"] for r in failed_rows}
        return _finish(
            "disk-full",
            root,
            reference,
            1,
            t0,
            {
                "returncode": full.returncode,
                "message": next((ln for ln in (full.stderr + full.stdout).splitlines() if reason in ln), None),
                "check_exit_1_naming_store_and_cause": full.returncode == 1 and reason in full.stderr + full.stdout,
                "check_trials_failed_with_reason": bool(failed_rows)
                and all(r["status"] == "failed" and reason in (r["error"] or "") for r in failed_rows),
                "check_nothing_half_committed": not facts["uncommitted_files"] and not facts["temp_files"],
                "check_rerun_exit_0": again.returncode == 0,
                "check_rerun_done": trial_statuses(root) == {t: "done" for t in trial_ids},
            },
            trials=trial_ids,
        )
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def trial_statuses(root: Path) -> dict[str, str]:
    table = _read(data_files(root, "trials"))
    return {r["trial_id"]: r["status"] for r in (table.to_pylist() if table is not None else [])}


def dead_node(work: Path) -> dict:
    """scripts/cluster_check.sh: a real two-node cluster, the worker node's raylet SIGKILLed
    while one of its trials runs; the trial is retried on the head and resumes."""
    t0 = time.time()
    out = work / "dead-node.json"
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "cluster_check.sh"), "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if not out.is_file():
        return {"scenario": "dead-node", "ok": False, "seconds": round(time.time() - t0, 1), "error": r.stderr[-2000:]}
    summary = json.loads(out.read_text())
    cmp = summary["compare"]
    return {
        "scenario": "dead-node",
        "faults_injected": int(bool(summary["killed_node"].get("killed"))),
        "seconds": round(time.time() - t0, 1),
        **{
            k: cmp[k]
            for k in ("rows", "reference_rows", "lost", "duplicated", "extra", "trials_done", "max_confidence_diff")
        },
        "killed_trial": summary["killed_node"].get("trial"),
        "killed_trial_attempts": summary["killed_node"].get("trial_attempts"),
        "checks": summary["checks"],
        "left_running": summary.get("cleanup"),
        "returncode": r.returncode,
        "ok": r.returncode == 0 and summary["ok"],
    }


# Ray 2.60's two Prometheus exporters that no setting turns off (RAY_enable_metrics_collection
# covers the others): the dashboard head's and the autoscaler monitor's, on fixed ports, bound
# to every interface because Ray maps a local node's 127.0.0.1 to the routable address.
RAY_METRICS_EXPORTERS = {44227: "dashboard.py", 44217: "monitor.py"}


def http_answer(url: str, token: str | None = None) -> tuple[int | str, bytes]:
    """The HTTP status `url` answers and the start of its body, or the name of the error when
    it is not HTTP at all."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(200)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except Exception as exc:  # noqa: BLE001 - a gRPC port answers HTTP with garbage: that is the point
        return type(exc).__name__, b""


def http_status(url: str, token: str | None = None) -> int | str:
    return http_answer(url, token)[0]


def anonymous_use(port: int, process: str, answer: int | str, body: bytes) -> str:
    """What an anonymous caller gets from a port: "nothing" (401, or not HTTP: gRPC, which
    refuses a call without the token), "metrics" (one of Ray's read-only Prometheus exporters
    that cannot be closed), or "OPEN"."""
    if answer == 401 or not isinstance(answer, int):
        return "nothing"
    if RAY_METRICS_EXPORTERS.get(port) == process and body.startswith(b"# HELP "):
        return "metrics"
    return "OPEN"


def listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket these processes listen on."""
    import psutil

    return sorted(
        {
            (c.laddr.ip, c.laddr.port, c.pid)
            for c in psutil.net_connections("tcp")
            if c.status == "LISTEN" and c.pid in pids
        }
    )


def process_name(pid: int) -> str:
    """The Ray component a pid is (raylet, gcs_server, dashboard agent, a worker...)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    script = next((Path(a).name for a in argv[1:] if a.endswith(".py")), None)
    return script or Path(argv[0]).name


def network_exposure(work: Path, spec: Path, reference: Path) -> dict:
    """`raysweep run` with its dashboard, as a user starts it: while it runs, every TCP port its
    processes listen on, where it listens and what it answers an anonymous request."""
    t0 = time.time()
    store = work / "network-exposure"
    shutil.rmtree(store, ignore_errors=True)  # a finished store has nothing to run, and so no ports
    out_file, err_file = work / "network-exposure.out", work / "network-exposure.err"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raysweep.cli", "run", str(spec), "--store", str(store)],
            cwd=ROOT,
            env=_env(),
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    ports: list[tuple[str, int, int]] = []
    url = None
    try:
        deadline = time.time() + 600
        while commit_count(store) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        url = next(
            (
                w
                for ln in out_file.read_text().splitlines()
                if ln.startswith("Ray dashboard: ")
                for w in ln.split()
                if w.startswith("http")
            ),
            None,
        )
        ports = listening(set(session_alive(proc.pid)))
        token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = token_file.read_text().strip() if token_file.is_file() else None
        dash_port = int(url.rsplit(":", 1)[1]) if url else None
        names = {pid: process_name(pid) for _, _, pid in ports}
        answers = {}
        for ip, port, pid in ports:
            if port != dash_port:
                status, body = http_answer(f"http://{'127.0.0.1' if ip in ('0.0.0.0', '::') else ip}:{port}/")
                answers[port] = (status, anonymous_use(port, names[pid], status, body))
        api = (http_status(url + "/api/version"), http_status(url + "/api/version", token)) if url else (None, None)
        proc.wait(timeout=900)
    finally:
        stop_session(proc)
    dash_addrs = sorted({ip for ip, port, _ in ports if port == dash_port})
    by_addr: dict[str, int] = {}
    for ip, _, _ in ports:
        by_addr[ip] = by_addr.get(ip, 0) + 1
    return _finish(
        "network-exposure",
        store,
        reference,
        0,
        t0,
        {
            "returncode": proc.returncode,
            "dashboard": url,
            "dashboard_addresses": dash_addrs,
            "ports": len(ports),
            "ports_by_address": by_addr,
            "anonymous_answers": sorted({str(v[0]) for v in answers.values()}),
            "port_table": [
                {
                    "address": ip,
                    "port": port,
                    "process": names.get(pid),
                    "answer": "dashboard" if port == dash_port else str(answers[port][0]),
                    "anonymous_use": "token" if port == dash_port else answers[port][1],
                }
                for ip, port, pid in ports
            ],
            "metrics_exporters": sorted(
                {(ip, port) for ip, port, _ in ports if answers.get(port, (0, ""))[1] == "metrics"}
            ),
            "api_without_token": api[0],
            "api_with_token": api[1],
            "check_exit_0": proc.returncode == 0,
            "check_dashboard_on_loopback_only": dash_addrs == ["127.0.0.1"],
            "check_dashboard_needs_token": api == (401, 200),
            # Ray binds its gRPC servers to the routable address (README: what the local cluster
            # exposes); none of them may answer an anonymous request, and nothing but Ray's two
            # read-only metrics exporters may serve one.
            "check_no_port_open_anonymously": bool(answers) and all(v[1] != "OPEN" for v in answers.values()),
        },
    )


# ---- report ---------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _table_row(s: dict) -> str:
    name = s["scenario"]
    if s.get("skipped"):
        return f"| {name} | — | — | — | — | — | — | — | skipped: {s['skipped']} |"
    if "error" in s and "rows" not in s:
        return f"| {name} | — | — | — | — | — | — | — | FAIL: {s['error'].strip().splitlines()[-1][:120]} |"
    verdict = "pass" if s["ok"] else "FAIL"
    if name == "bad-input":
        return f"| {name} | {s['specs']} bad inputs | — | — | — | — | — | — | {s['rejected_correctly']} of {s['specs']} refused (exit 2, one line, nothing written): {verdict} |"
    if name == "rerun-finished":
        return f"| {name} | 0 | — | — | — | — | — | — | nothing to do, store unchanged: {verdict} |"
    return (
        f"| {name} | {s['faults_injected']} | {s['trials_done']} | {s['rows']} | {s['lost']} | {s['duplicated']} | {s['extra']} | "
        f"{s['max_confidence_diff']:.1e} | {verdict} |"
    )


def where(context: str) -> str:
    """The commit the figures come from, and whether the working tree differed from it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    sha = git("rev-parse", "--short", "HEAD") or "an unknown commit"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return f"at commit {sha}{' with uncommitted changes' if dirty else ''}" + (f", {context}" if context else "")


def markdown(res: dict) -> str:
    """One row for every scenario that ran; the store columns for the scenarios that leave a store."""
    lines = [
        "| scenario | faults injected | trials completed | score rows checked | lost | duplicated | extra | max \\|Δ confidence\\| | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *(_table_row(s) for s in res["scenarios"]),
    ]
    t = res["totals"]
    lines += [
        f"| **total** | **{t['faults_injected']}** | **{t['trials_completed']}** | **{t['rows_checked']}** | **{t['rows_lost']}** | "
        f"**{t['rows_duplicated']}** | **{t['rows_extra']}** | | **{'pass' if t['all_ok'] else 'FAIL'}** |",
    ]
    return "\n".join(lines) + "\n"


def document(res: dict) -> str:
    """RELIABILITY.md: how the figures were made, the table, and what each scenario saw."""
    t = res["totals"]
    by = {s["scenario"]: s for s in res["scenarios"]}
    out = [
        "# Reliability: faults injected, rows lost or duplicated",
        "",
        f"Produced by `scripts/reliability.py` on {res['date']}, on {res['machine']}, in {t['seconds'] / 60:.1f} minutes, "
        f"{res.get('where', 'in a working tree')}. Rerun it with",
        "",
        "    .venv/bin/python scripts/reliability.py            # writes RELIABILITY.md and RELIABILITY.json",
        "",
        *(
            f"Rerun on {r['date']} ({r['where']}), replacing their rows: {', '.join(r['scenarios'])}."
            for r in res.get("rerun", [])
        ),
        *([""] if res.get("rerun") else []),
        "Each scenario runs the `raysweep` command line in subprocesses on one small spec (micro GPT-2, two forget",
        "tasks, fine-tune 3 epochs -> forget 3 -> relearn 2, every example of both tasks scored after every epoch; the",
        "spec is in RELIABILITY.json). The store a scenario leaves behind is compared with the store of an uninterrupted",
        "run of the same spec: every (trial, phase, epoch, eval task, split, example) row must exist exactly once, read",
        "with DuckDB from every Parquet file a glob reader would see (committed or not), with the same confidence and",
        "log-likelihoods, and the hidden states, per-epoch summaries and trial milestones must be the same too.",
        "rank-kill compares with an uninterrupted 2-worker run, edited-spec with a run of the edited spec, and dead-node",
        "with an uninterrupted run on its own two-node cluster. The rows without store figures refuse input or touch nothing.",
        "",
        markdown(res).rstrip(),
        "",
        "## The scenarios",
        "",
    ]
    if "worker-kill" in by:
        s = by["worker-kill"]
        out.append(
            f"- **worker-kill**: {s['faults_injected']} SIGKILLs of the Ray worker process running a trial (pids {', '.join(map(str, s['killed_pids']))}), "
            "through the test hook `RAYSWEEP_FAULT` (raysweep/faults.py): before the first resume point, between an epoch's commit and "
            "its resume point, right after a resume point, at a phase's last epoch and in relearning; attempts 1-3 of each trial. "
            f"Ray Tune retried each trial (FailureConfig), each retry resumed from its last resume point; exit code {s['returncode']}."
        )
    if "rank-kill" in by:
        s = by["rank-kill"]
        out.append(
            f"- **rank-kill**: the same spec with each trial run as 2 data-parallel workers (`resources: {{cpu: 2, workers: 2}}`, Ray Train "
            f"inside the Tune trial, gloo). {s['faults_injected']} SIGKILLs, two of rank 0 (the rank that writes) and two of rank 1 (pids "
            f"{', '.join(map(str, s.get('killed_pids', [])))}), after a commit and after a resume point. Ray Train took the surviving rank down, "
            "Tune retried the trial, and both ranks resumed from the last resume point, each with its own optimizer part. Compared with an "
            f"uninterrupted 2-worker run of the same spec (a run of its own: two ranks draw dropout masks for their own shards); exit code {s.get('returncode')}."
        )
    if "driver-kill" in by:
        s = by["driver-kill"]
        kills = "; ".join(
            f"at {k['commits_at_kill']} committed epochs of {res.get('reference_commits', '?')}, {k['orphans_after_1s']} processes of its cluster still running 1 s later"
            for k in s["kills"]
        )
        out.append(
            f"- **driver-kill**: the `raysweep run` process (only it) was killed with SIGKILL {s['faults_injected']} times, in its first run and "
            f"after each restart ({kills}); then `raysweep run` completed the sweep, and a further run said there was nothing to do. A dead driver's trial "
            "workers go on for a second or two and may commit the epoch they are in (a trial's lock keeps a restarted driver's attempt "
            "from running beside them), then exit; the dashboard and runtime-env agents of its local cluster stay until killed. The "
            "script kills what is left by session id after each kill (`ray stop` would also kill other people's clusters on a shared machine)."
        )
    if "trial-error" in by:
        s = by["trial-error"]
        out.append(
            f"- **trial-error**: {s['faults_injected']} exceptions raised inside trials: a simulated CUDA out-of-memory on every attempt of one "
            f"trial and a one-off error in the other. Exit code {s['first_returncode']}; the failed trial's reason in the trials table and in "
            f"`raysweep status` (`{s['failed_reason']}`); the other trial completed after its retry; a plain rerun completed the failed "
            "trial from its last resume point."
        )
    if "corrupt-file" in by:
        s = by["corrupt-file"]
        out.append(
            f"- **corrupt-file**: {s['faults_injected']} Parquet files of a finished store damaged (scores truncated, an epoch summary overwritten "
            "with garbage, hidden states with their footer cut). `raysweep status` and `raysweep analyze` named each file and refused "
            f"(exit 2); `raysweep repair` quarantined them ({', '.join(s['quarantined'])}) and reopened the trials that lost epochs; the "
            "next `raysweep run` recomputed those trials and the store equals the reference again."
        )
    if "driver-signal" in by:
        s = by["driver-signal"]
        stops = "; ".join(
            f"{st['signal']} at {st['commits_at_signal']} committed epochs, stopped in {st['stopped_in_s']} s, exit {st['returncode']}"
            for st in s["stops"]
        )
        out.append(
            f"- **driver-signal**: the `raysweep run` process (only it) was sent SIGTERM, and after a restart SIGINT, mid-sweep ({stops}). Each time "
            "the driver stopped its trials, marked them `interrupted` and said in one line what was committed and to rerun; "
            f"then `raysweep run` resumed them and completed the sweep (exit {s['returncode']})."
        )
    if "two-versions" in by:
        s = by["two-versions"]
        out.append(
            "- **two-versions**: while a `raysweep run` of the spec was running (its two trial workers SIGKILLed once each in relearning, "
            "to keep it going while the others start; Tune retried them), a second driver with the same sweep name and another "
            f"forget learning rate was refused (exit 2: `{s['refusal']}`), and so was a second driver of the same version; the first "
            f"ran on undisturbed (exit {s['first_returncode']}) and its store equals the reference: nothing of the other version in it."
        )
    if "two-drivers" in by:
        s = by["two-drivers"]
        out.append(
            "- **two-drivers**: two `raysweep run` of the spec on one new store, started at the same moment: exit codes "
            f"{s['returncodes']}"
            + (f"; the second refused in one line (`{s['refusal']}`)" if s.get("refusal") else "")
            + "; the store has every row exactly once and equals the reference."
        )
    if "edited-spec" in by:
        s = by["edited-spec"]
        out.append(
            "- **edited-spec**: the finished sweep rerun under the same name with another forget learning rate (exit "
            f"{s['returncode']}): the changed trials got new ids and ran, and their rows equal an uninterrupted run of the edited spec "
            f"({s['rows']} rows); the old trials are marked `superseded` and their {s.get('old_version_rows_checked', '?')} rows are "
            "exactly as they were; `raysweep status` says so and `raysweep analyze` reads only the new version."
        )
    if "corrupt-resume" in by:
        s = by["corrupt-resume"]
        out.append(
            "- **corrupt-resume**: one trial was SIGKILLed on every attempt mid-fine-tuning, then the weights of its last resume point "
            "(`latest.pt`) had bits flipped inside a tensor (the zip intact: torch alone would load it), its best-epoch weights were "
            "truncated and its pretrained commit marker emptied. The next `raysweep run` moved the empty marker to quarantine, found the "
            "resume point's damage by its CRC and restarted the trial from the pretrained model, each logged in the trial's "
            f"`restarts.log` ({' / '.join(s.get('restarts_log', []))}); it never trained from the damaged weights. Then a finished trial's `latest.pt` was truncated and a commit marker cut "
            "mid-write: `raysweep status` named both and refused (exit 2), `raysweep repair` quarantined both and reopened the trial, "
            "and the next run recomputed it."
        )
    if "disk-full" in by:
        s = by["disk-full"]
        if s.get("skipped"):
            out.append(
                f"- **disk-full**: skipped ({s['skipped']}); `tests/test_disk_full.py` runs the same with /dev/full where it can."
            )
        else:
            out.append(
                "- **disk-full**: the store on a 20 MB tmpfs filled to 300 kB free (room for the plan, the examples and the pretrained "
                f"epochs, not for a resume point): exit {s['returncode']}, `{s['message']}`; every trial marked failed with that reason, "
                "no uncommitted or temporary file left. After the filler was deleted a plain rerun completed, equal to the reference."
            )
    if "dead-node" in by:
        s = by["dead-node"]
        if "rows" in s:
            out.append(
                "- **dead-node**: `scripts/cluster_check.sh`: a real two-node cluster on this machine (`ray start --head` and `ray start "
                "--address`, 1 CPU each), a 4-trial sweep across both; the worker node's raylet SIGKILLed while trial "
                f"`{s['killed_trial']}` ran on it. Tune retried it on the head, where it resumed ({len(s.get('killed_trial_attempts') or [])} "
                f"attempts); the store equals an uninterrupted run's on the same cluster ({s['rows']} rows; its own spec, not the one above). "
                f"Checks: {', '.join(k for k, v in s['checks'].items() if v)}"
                + (
                    ""
                    if all(s["checks"].values())
                    else f"; FAILED: {', '.join(k for k, v in s['checks'].items() if not v)}"
                )
                + "."
            )
        else:
            out.append(f"- **dead-node**: FAILED: {s.get('error', '')[-300:]}")
    if "network-exposure" in by:
        s = by["network-exposure"]
        exporters = ", ".join(
            f"{port} ({RAY_METRICS_EXPORTERS.get(port)}, on {ip})" for ip, port in s.get("metrics_exporters", [])
        )
        out.append(
            f"- **network-exposure**: `raysweep run` with its dashboard, as a user starts it. While it ran, its processes listened on "
            f"{s['ports']} TCP ports ({', '.join(f'{n} on {ip}' for ip, n in sorted(s['ports_by_address'].items()))}). The dashboard "
            f"({s['dashboard']}) listened on {', '.join(s['dashboard_addresses'])} only, and its API answered {s['api_without_token']} "
            f"without the token and {s['api_with_token']} with it. Ray binds its gRPC servers to the machine's routable address even "
            "for a local cluster and cannot be told otherwise; they answer nothing without the token. "
            + (
                f"Two ports serve anonymous callers: Ray's Prometheus exporters {exporters}, read-only metrics (request timings, "
                "node counts) that no Ray setting turns off (the README says so)."
                if exporters
                else ""
            )
            + " Every port:"
        )
        out += [
            "",
            "  | address | port | process | anonymous HTTP GET | what an anonymous caller gets |",
            "  |---|---:|---|---|---|",
        ]
        out += [
            f"  | {p['address']} | {p['port']} | {p['process']} | {p['answer']} | {p['anonymous_use']} |"
            for p in s.get("port_table", [])
        ]
        out.append("")
    if "rerun-finished" in by:
        s = by["rerun-finished"]
        out.append(
            f"- **rerun-finished**: `raysweep run` on the finished reference store: exit {s['returncode']}, 'nothing to do', no file written or touched: {s['store_unchanged']}."
        )
    if "bad-input" in by:
        s = by["bad-input"]
        out.append(
            f"- **bad-input**: {s['specs']} bad inputs through `raysweep run` as subprocesses: the {len(expected_rejections())} specs of "
            "`tests/bad_specs/` (bad YAML, unknown keys, tasks and architectures, wrong types, zero or negative learning rates, sizes and "
            "epochs, absurd counts such as `max_epochs: 1000000000000`, `1e12`, `cap: 10**15` or 10**12 pretraining steps, sweep names "
            "with `../`, `/`, an emoji or control characters, a YAML alias bomb (billion laughs), empty axes, duplicate trials, `!!python` "
            "tags, a model folder whose config needs remote code, JSON lines with a malformed line or a label that is not 0/1, GPU and CPU "
            "requests the cluster cannot meet), spec paths that are a directory, `/dev/zero` or a 50 MB file, stores that are wrong on "
            "disk (a file, not writable, in a read-only directory, written by a newer schema), data folders missing a split or with a "
            "label of 2, and `analyze` / `report` on a missing, empty or read-only store or with an `--out` that is an existing file or "
            f"cannot be written. {s['rejected_correctly']} of {s['specs']} exited with code 2 and exactly one line naming the "
            "field and the problem, with nothing written; code executed by a spec: "
            + ("YES" if s["code_executed"] else "none")
            + "."
        )
        for f in s["failures"]:
            out.append(f"  - not as expected: {f['case']}: exit {f['returncode']}: {f['message']}")
    return "\n".join(out) + "\n"


SCENARIOS = (
    "worker-kill",
    "rank-kill",
    "driver-kill",
    "driver-signal",
    "two-drivers",
    "two-versions",
    "edited-spec",
    "trial-error",
    "corrupt-file",
    "corrupt-resume",
    "disk-full",
    "dead-node",
    "network-exposure",
    "rerun-finished",
    "bad-input",
)


def run_scenario(name: str, work: Path, spec: Path, reference: Path, total_commits: int) -> dict:
    runs = {
        "worker-kill": lambda: worker_kill(work, spec, reference),
        "rank-kill": lambda: rank_kill(work),
        "driver-kill": lambda: driver_kill(work, spec, reference, total_commits),
        "driver-signal": lambda: driver_signal(work, spec, reference),
        "two-drivers": lambda: two_drivers(work, spec, reference),
        "two-versions": lambda: two_versions(work, spec, reference),
        "edited-spec": lambda: edited_spec(work, spec, reference),
        "trial-error": lambda: trial_error(work, spec, reference),
        "corrupt-file": lambda: corrupt_file(work, reference),
        "corrupt-resume": lambda: corrupt_resume(work, spec, reference),
        "disk-full": lambda: disk_full(work, spec, reference),
        "dead-node": lambda: dead_node(work),
        "network-exposure": lambda: network_exposure(work, spec, reference),
        "rerun-finished": lambda: rerun_finished(reference, spec),
        "bad-input": lambda: bad_input_scenario(work / "bad-input", reference),
    }
    return runs[name]()


def totals_of(scenarios: list[dict], seconds: float) -> dict:
    store_runs = [s for s in scenarios if "rows" in s]
    return {
        "faults_injected": sum(s.get("faults_injected", 0) for s in store_runs),
        "trials_completed": sum(s["trials_done"] for s in store_runs),
        "rows_checked": sum(s["rows"] for s in store_runs),
        "rows_lost": sum(s["lost"] for s in store_runs),
        "rows_duplicated": sum(s["duplicated"] for s in store_runs),
        "rows_extra": sum(s["extra"] for s in store_runs),
        "specs_rejected": next(
            (f"{s['rejected_correctly']}/{s['specs']}" for s in scenarios if s["scenario"] == "bad-input"), None
        ),
        "all_ok": all(s["ok"] for s in scenarios),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", type=Path, help="Working directory for the stores (default: a temporary one, removed afterwards)."
    )
    ap.add_argument("--only", action="append", choices=SCENARIOS, help="Run only these scenarios (repeatable).")
    ap.add_argument("--json", type=Path, default=ROOT / "RELIABILITY.json")
    ap.add_argument(
        "--markdown",
        type=Path,
        default=ROOT / "RELIABILITY.md",
        help="The markdown document (table and scenario notes).",
    )
    ap.add_argument("--render", action="store_true", help="Only rewrite --markdown from the results already in --json.")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="Replace only the scenarios run now (--only) in the results already in --json.",
    )
    ap.add_argument(
        "--context",
        default="",
        help="Said after the commit in RELIABILITY.md, e.g. 'on a fresh clone, nothing else running'.",
    )
    args = ap.parse_args(argv)
    if args.render:
        args.markdown.write_text(document(json.loads(args.json.read_text())))
        return 0
    only = set(args.only or SCENARIOS)
    work = args.work or Path(tempfile.mkdtemp(prefix="raysweep-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = work / "spec.yaml"
    spec.write_text(spec_text())
    t0 = time.time()
    scenarios = []
    try:
        reference = work / "reference"
        if not (reference / "store.json").exists():
            r = raysweep("run", str(spec), "--store", str(reference), "--no-dashboard")
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                raise SystemExit("reference run failed")
        total = commit_count(reference)  # committed epochs of the whole sweep
        print(f"reference: {total} committed epochs", flush=True)
        for name in SCENARIOS:
            if name not in only:
                continue
            print(f"scenario {name} ...", flush=True)
            t1 = time.time()
            try:
                res = run_scenario(name, work, spec, reference, total)
            except Exception as exc:  # noqa: BLE001 - one scenario's crash is its result, not the run's end
                import traceback

                res = {
                    "scenario": name,
                    "ok": False,
                    "seconds": round(time.time() - t1, 1),
                    "error": "".join(traceback.format_exception(exc))[-3000:],
                }
            print(f"  {'ok' if res['ok'] else 'FAILED'} ({res.get('seconds', '')} s)", flush=True)
            scenarios.append(res)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "where": where(args.context),
        "spec": spec_text(),
        "reference_commits": total,
        "scenarios": scenarios,
    }
    if args.merge and args.json.is_file():
        old = json.loads(args.json.read_text())
        rerun = {s["scenario"] for s in scenarios}
        res = {
            **old,
            "rerun": [*old.get("rerun", []), {"date": res["date"], "where": res["where"], "scenarios": sorted(rerun)}],
            "scenarios": [next((n for n in scenarios if n["scenario"] == o["scenario"]), o) for o in old["scenarios"]]
            + [n for n in scenarios if n["scenario"] not in {o["scenario"] for o in old["scenarios"]}],
        }
    res["totals"] = totals_of(res["scenarios"], res["totals"]["seconds"] if "rerun" in res else time.time() - t0)
    args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    args.markdown.write_text(document(res))
    print(markdown(res))
    return 0 if res["totals"]["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
