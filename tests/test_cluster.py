"""A sweep on a real multi-node Ray cluster, and the files that run one elsewhere.

The slow test runs scripts/cluster_check.sh: two `ray start` nodes on this machine, a sweep
across both, the worker node's raylet SIGKILLed while one of its trials is mid-way. The
trial must be retried on the head and the store must equal an uninterrupted run's, row for
row; the script must leave none of its processes behind. The fast tests check the pieces
the script relies on and that the SLURM and KubeRay templates parse.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scripts.cluster_check import lock_holders
from scripts.reliability import session_alive

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cluster_check.sh"
SBATCH = ROOT / "scripts" / "slurm" / "raysweep.sbatch"
RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"


def test_cluster_check_refuses_unknown_arguments_before_starting_anything():
    before = set(Path("/tmp").glob("rsc.*"))
    r = subprocess.run(["bash", str(SCRIPT), "--nodes", "3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--nodes" in r.stderr
    assert r.stdout == ""
    assert set(Path("/tmp").glob("rsc.*")) == before


def test_lock_holders_names_the_process_that_holds_a_trial_lock(tmp_path):
    """The script finds the trial running on the node it is about to kill by the process
    holding that trial's lock: here a real flock taken by another process."""
    lock = tmp_path / "checkpoints" / "sw" / "trial-a" / "lock"
    lock.parent.mkdir(parents=True)
    (tmp_path / "checkpoints" / "sw" / "trial-b").mkdir()
    (tmp_path / "checkpoints" / "sw" / "trial-b" / "lock").touch()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; fh = open(sys.argv[1], 'a+'); fcntl.flock(fh, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_holders(tmp_path, "sw") == {"trial-a": holder.pid}
    finally:
        holder.kill()
        holder.wait()
    assert lock_holders(tmp_path, "sw") == {}


def test_sbatch_template_is_valid_bash_and_starts_head_workers_and_sweep():
    r = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = SBATCH.read_text()
    assert "#SBATCH --gpus-per-node" in text
    assert "ray start --head" in text and "srun" in text and "--address" in text
    assert "raysweep run" in text and "--store" in text
    assert "RAY_AUTH_MODE" in text


def test_rayjob_parses_with_gpu_workers_and_the_store_on_a_shared_claim():
    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    entry = job["spec"]["entrypoint"]
    assert entry.split()[:2] == ["raysweep", "run"]
    store = entry.split("--store", 1)[1].split()[0]
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        c = pod["spec"]["containers"][0]
        mounts = [m for m in c["volumeMounts"] if "persistentVolumeClaim" in vols[m["name"]]]
        assert any(vols[m["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"] for m in mounts)
        # Every pod sees the store at the same path the driver writes it to.
        assert any(store.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), (store, mounts)
    gpus = [
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for g in cluster["workerGroupSpecs"]
    ]
    assert all(int(g) >= 1 for g in gpus)


def _processes_naming(path: str) -> list[int]:
    """Live processes whose command line names `path` (gcs, raylets, agents of a node)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if path.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_check_stopped_by_a_signal_leaves_no_node_running():
    """The EXIT trap runs on SIGTERM too: the nodes it started go, the work dir with them."""
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    work, sessions, seen = None, [], []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("cluster_check: work dir "):
                work = line.split("work dir ", 1)[1].strip()
            if "both nodes up" in line:
                # The script goes on meanwhile and may already have recorded its sweep
                # driver's session too: the nodes are the sessions named head and worker.
                recorded = [x.split() for x in Path(work, "sessions").read_text().splitlines() if x.strip()]
                sessions = [int(sid) for role, sid in recorded if role in ("head", "worker")]
                break
        assert work and len(sessions) == 2, "the script never reported both nodes up:\n" + "".join(seen[-40:])
        assert all(session_alive(sid) for sid in sessions)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, rest = proc.communicate(timeout=120)
    assert proc.returncode != 0, rest
    assert all(session_alive(sid) == [] for sid in sessions)
    assert _processes_naming(work) == [] and not Path(work).exists()


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_node_cluster_loses_its_worker_node_mid_sweep_and_loses_no_row(tmp_path):
    out = tmp_path / "summary.json"
    # RAY_AUTH_MODE unset, as in a user's shell (the suite sets it): Ray alone would then turn
    # token auth on for the head node and off for the worker's join.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}, "PYTHON": sys.executable}
    t0 = time.time()
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=1300)
    except subprocess.TimeoutExpired:
        # SIGTERM to the script's group: its EXIT trap then kills the Ray nodes it started.
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert out.is_file(), r.stderr[-4000:]
    s = json.loads(out.read_text())
    # Failed checks first: pytest cuts a long message, and these say which part went wrong.
    failed = sorted(k for k, ok in (s.get("checks") or {}).items() if not ok)
    killed_trial = {k: v for k, v in (s.get("killed_node") or {}).items() if k.startswith("trial")}
    assert r.returncode == 0, (failed, killed_trial, s.get("gcs_error"), s.get("compare"), r.stderr[-3000:])

    nodes = {n["role"]: n for n in s["nodes"]}
    assert set(nodes) == {"head", "worker"} and nodes["head"]["node_id"] != nodes["worker"]["node_id"]
    # Trials ran on both nodes, in the uninterrupted run and in the one that lost a node.
    for run in ("reference_run", "killed_run"):
        assert s[run]["returncode"] == 0
        assert s[run]["trials_per_node"]["head"] >= 1 and s[run]["trials_per_node"]["worker"] >= 1, s[run]
    assert sum(s["reference_run"]["trials_per_node"].values()) == 4

    # The worker node died with a trial of its own mid-way; that trial resumed on the head.
    killed = s["killed_node"]
    assert killed["killed"] and killed["raylet_gone"] and killed["node_id"] == nodes["worker"]["node_id"]
    assert nodes["worker"]["alive_at_end"] is False and nodes["head"]["alive_at_end"] is True
    assert killed["commits_before_kill"] >= 1
    # Each attempt logged its own Ray node: the first ran on the worker, the last on the head.
    assert killed["trial_attempt_nodes"][0] == "worker" and killed["trial_attempt_nodes"][-1] == "head"
    log = killed["trial_attempt_log"]
    assert log[0]["pid"] == killed["trial_pid"] and log[0]["node_id"] == nodes["worker"]["node_id"]
    assert log[-1]["node_id"] == nodes["head"]["node_id"] and [a["attempt"] for a in log] == sorted(
        a["attempt"] for a in log
    )
    assert killed["trial_status"] == "done" and killed["trial_attempts_in_store"] >= 2

    # Nothing lost, nothing duplicated: the store equals the uninterrupted run's.
    assert s["rows_compared"] > 0 and s["rows_compared"] == s["compare"]["rows"]
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["compare"]["extra"] == 0
    assert s["compare"]["ok"], s["compare"]

    # None of its processes are left, and neither is its work dir (nodes' temp dirs, stores).
    clean = s["cleanup"]
    assert clean["ok"] and len(clean["sessions"]) == 4
    assert {nodes["head"]["session"], nodes["worker"]["session"]} <= set(clean["sessions"])
    assert all(session_alive(sid) == [] for sid in clean["sessions"])
    assert _processes_naming(clean["work_dir"]) == []
    assert not Path(clean["work_dir"]).exists()
    assert s["ok"] and time.time() - t0 < 1400
