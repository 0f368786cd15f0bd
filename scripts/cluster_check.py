#!/usr/bin/env python
"""The Python half of scripts/cluster_check.sh: everything that reads /proc, Ray's per-node
temp dirs, Tune's records or the stores. Each subcommand is one step of the shell script.

    ports N                       N free TCP ports on 127.0.0.1
    node --temp-dir D             the raylet of the node whose temp dir is D: pid, node id, session
    kill-worker ...               wait until a trial on the worker node is mid-way, SIGKILL its raylet
    summary ...                   trials per node from Tune's records, the comparison, the verdict
    cleanup --work W              SIGKILL every process of the sessions the script recorded

Nodes on one host share an IP (Ray maps 127.0.0.1 to the host's address) and a hostname, so
Tune's `node_ip`/`hostname` cannot tell them apart. The pid can: each node writes a log file
for every worker process it starts, named with that process's pid, under its own temp dir.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.reliability import compare_stores, kill_session, session_alive  # noqa: E402

ROLES = ("head", "worker")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def naming(path: Path) -> list[int]:
    """Live processes other than this one whose command line names `path`."""
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != os.getpid() and needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _sid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def find_raylet(temp_dir: Path) -> dict | None:
    """The raylet started with this temp dir. Its own command line names the temp dir and the
    node id; worker processes rename themselves (ray::...) and cannot be found that way."""
    flag = f"--temp_dir={temp_dir}"
    for entry in Path("/proc").glob("[0-9]*"):
        args = _cmdline(int(entry.name))
        if not args or not args[0].endswith("/raylet") or flag not in args:
            continue
        node_id = next((a.split("=", 1)[1] for a in args if a.startswith("--node_id=")), None)
        return {"raylet_pid": int(entry.name), "node_id": node_id, "sid": _sid(int(entry.name))}
    return None


def worker_pids(temp_dir: Path) -> set[int]:
    """Pids of every worker process this node started: its logs dir holds
    worker-<worker id>-<job id>-<pid>.out for each, kept after the process is gone."""
    pids = set()
    for f in temp_dir.glob("session_*/logs/worker-*.out"):
        m = re.search(r"-(\d+)\.out$", f.name)
        if m:
            pids.add(int(m.group(1)))
    return pids


def tune_results(store: Path) -> dict[str, list[dict]]:
    """Each trial's reported results, as Tune's driver recorded them (result.json)."""
    out: dict[str, list[dict]] = {}
    for f in sorted((store / "ray").glob("*/*/result.json")):
        if f.parent.parent.name == "train":
            continue
        rows = []
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line the driver was writing as we read
        out.setdefault(f.parent.name, []).extend(rows)
    return out


def placement(store: Path, temps: dict[str, Path], seen: dict[str, int] | None = None) -> dict:
    """Which node ran each trial, attempt by attempt (a retried trial moves). `seen`: trial
    id -> pid of an attempt seen running that may have died before Tune heard from it."""
    by_node = {role: worker_pids(d) for role, d in temps.items()}
    trials = {}
    results = tune_results(store)
    for tid, pid in (seen or {}).items():
        if not any(r.get("pid") == pid for r in results.get(tid, [])):
            results[tid] = [{"pid": pid, "seen_only": True}, *results.get(tid, [])]
    for tid, rows in results.items():
        attempts: list[dict] = []
        for r in rows:
            pid = r.get("pid")
            node = next((role for role, pids in by_node.items() if pid in pids), "unknown")
            if not attempts or attempts[-1]["pid"] != pid:
                attempts.append(
                    {"pid": pid, "node": node, "node_ip": r.get("node_ip"), "hostname": r.get("hostname"), "results": 0}
                )
            attempts[-1]["results"] += 0 if r.get("seen_only") else 1
        trials[tid] = attempts
    per_node = {role: sorted(t for t, a in trials.items() if any(x["node"] == role for x in a)) for role in ROLES}
    return {
        "trials": trials,
        "trials_per_node": {role: len(v) for role, v in per_node.items()},
        "trial_ids_per_node": per_node,
    }


def cmd_node(args) -> int:
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        info = find_raylet(Path(args.temp_dir))
        if info and info["node_id"]:
            print(json.dumps(info))
            return 0
        time.sleep(0.5)
    print(f"cluster_check: no raylet with temp dir {args.temp_dir} within {args.timeout:.0f} s", file=sys.stderr)
    return 1


def lock_holders(store: Path, sweep: str) -> dict[str, int]:
    """trial id -> pid of the process holding that trial's lock now (from /proc/locks). A
    trial takes its lock before anything else and keeps it to the end: the holder is the
    process running it, known the moment it starts, unlike Tune's results, which reach the
    driver (and result.json) late when the machine is busy."""
    by_inode = {}
    for lock in (store / "checkpoints" / sweep).glob("*/lock"):
        try:
            by_inode[lock.stat().st_ino] = lock.parent.name
        except OSError:
            continue
    holders = {}
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return holders
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:56789 0 EOF"; blocked waiters carry a "->".
        if len(parts) < 6 or parts[1] != "FLOCK" or "->" in parts:
            continue
        try:
            pid, inode = int(parts[4]), int(parts[5].rsplit(":", 1)[1])
        except (ValueError, IndexError):
            continue
        if inode in by_inode:
            holders[by_inode[inode]] = pid
    return holders


def committed(store: Path, sweep: str, trial_id: str) -> int:
    base = store / "commits" / sweep / trial_id
    return sum(1 for _ in base.glob("*/e*.json")) if base.is_dir() else 0


def cmd_kill_worker(args) -> int:
    """SIGKILL the worker node once a trial running there has committed `after_commits`
    epochs, so that the node dies mid-trial, with work left to resume. The whole node goes
    at once, as when a machine dies: its raylet first (so it starts nothing new), then every
    other process of its session. A trial process left to notice its raylet's death on its
    own can outlive it long enough to finish a tiny trial, leaving nothing to retry."""
    worker_temp = Path(args.worker_temp)
    node = json.loads(Path(args.worker_node).read_text())
    store = Path(args.store)
    deadline = time.time() + args.timeout
    out = {"killed": False, "node": "worker", "node_id": node["node_id"], "raylet_pid": node["raylet_pid"]}
    while time.time() < deadline and not out["killed"]:
        if args.driver_pid and not Path(f"/proc/{args.driver_pid}").exists():
            out["error"] = "the sweep ended before a trial on the worker node was mid-way"
            break
        holders = lock_holders(store, args.sweep)
        on_worker = worker_pids(worker_temp) if holders else set()
        for tid, pid in holders.items():
            n = committed(store, args.sweep, tid)
            if pid in on_worker and n >= args.after_commits:
                os.kill(node["raylet_pid"], signal.SIGKILL)
                killed = kill_session(node["sid"])
                out.update(killed=True, trial=tid, trial_pid=pid, commits_before_kill=n, at=time.time())
                out["node_processes_killed"] = killed
                break
        time.sleep(0.1)
    if not out["killed"] and "error" not in out:
        out["error"] = f"no trial on the worker node committed {args.after_commits} epochs within {args.timeout:.0f} s"
    if out["killed"]:
        # The raylet's death must be real before the sweep goes on without it.
        t0 = time.time()
        while _state(node["raylet_pid"]) not in ("", "Z") and time.time() - t0 < 10:
            time.sleep(0.1)
        out["raylet_gone"] = _state(node["raylet_pid"]) in ("", "Z")
        # Its trial process must be gone too, or it would go on writing next to the retry
        # (which would wait on its lock).
        t0 = time.time()
        while _state(out["trial_pid"]) not in ("", "Z") and time.time() - t0 < 60:
            time.sleep(0.2)
        out["trial_process_exited_after_s"] = (
            round(time.time() - t0, 1) if _state(out["trial_pid"]) in ("", "Z") else None
        )
    Path(args.out).write_text(json.dumps(out))
    print(json.dumps(out))
    return 0 if out["killed"] else 1


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _alive_nodes(address: str, dead_node: str, wait_s: float = 90.0) -> dict[str, bool]:
    """node id -> alive, as the cluster's GCS sees it, once it has marked `dead_node` dead or
    after `wait_s`. The GCS marks a node dead only when its health checks have failed several
    times in a row (tens of seconds), and a sweep on tiny models can finish sooner than that."""
    import logging

    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        deadline = time.time() + wait_s
        while True:
            alive = {n["NodeID"]: bool(n["Alive"]) for n in ray.nodes()}
            if alive.get(dead_node) is False or time.time() > deadline:
                return alive
            time.sleep(1.0)
    finally:
        ray.shutdown()


def _attempt_log(store: Path, sweep: str, trial_id: str) -> list[dict]:
    """The trial's workers.jsonl: one line per attempt, written by the attempt as it starts."""
    f = store / "checkpoints" / sweep / trial_id / "workers.jsonl"
    rows = []
    for line in f.read_text().splitlines() if f.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by the node's death
    return rows


def cmd_summary(args) -> int:
    work = Path(args.work)
    temps = {"head": Path(args.head_temp), "worker": Path(args.worker_temp)}
    nodes = {role: json.loads((work / f"{role}.json").read_text()) for role in ROLES}
    kill = json.loads((work / "kill.json").read_text()) if (work / "kill.json").is_file() else {"killed": False}
    reference, killed_store = Path(args.reference), Path(args.store)
    moved = kill.get("trial")
    ref_place = placement(reference, temps)
    kill_place = placement(killed_store, temps, {moved: kill["trial_pid"]} if moved else None)
    cmp = compare_stores(killed_store, reference)
    alive = {}
    try:
        alive = _alive_nodes(args.address, nodes["worker"]["node_id"])
    except Exception as exc:  # the verdict below needs it; say why it is missing
        alive = {"error": repr(exc)}
    moved_attempts = kill_place["trials"].get(moved, []) if moved else []
    # Where each attempt ran, as the attempt itself logged it (its Ray node id): exact, unlike
    # a pid looked up in the nodes' worker logs from Tune's records, which reach the driver late.
    role_of = {nodes[role]["node_id"]: role for role in ROLES}
    attempt_log = _attempt_log(killed_store, args.sweep, moved) if moved else []
    logged_nodes = [role_of.get(a.get("node_id"), "unknown") for a in attempt_log]
    from raysweep.store import Store

    rows = {r["trial_id"]: r for r in Store(killed_store).trials(args.sweep).to_pylist()}
    moved_row = rows.get(moved, {})
    summary = {
        "nodes": [
            {
                "role": role,
                "node_id": nodes[role]["node_id"],
                "resource": f"rsc_{role}",
                "raylet_pid": nodes[role]["raylet_pid"],
                "session": nodes[role]["sid"],
                "alive_at_end": alive.get(nodes[role]["node_id"]) if "error" not in alive else None,
            }
            for role in ROLES
        ],
        "reference_run": {
            "returncode": args.reference_rc,
            **{k: ref_place[k] for k in ("trials_per_node", "trial_ids_per_node")},
        },
        "killed_run": {
            "returncode": args.store_rc,
            **{k: kill_place[k] for k in ("trials_per_node", "trial_ids_per_node")},
            "attempts": kill_place["trials"],
        },
        "killed_node": {
            **kill,
            "trial_attempts": moved_attempts,
            "trial_attempt_nodes": logged_nodes,
            "trial_attempt_log": attempt_log,
            "trial_status": moved_row.get("status"),
            "trial_attempts_in_store": moved_row.get("attempts"),
        },
        "compare": {
            k: cmp[k]
            for k in (
                "rows",
                "reference_rows",
                "lost",
                "duplicated",
                "extra",
                "trials_done",
                "trials_equal",
                "hidden_equal",
                "epochs_equal",
                "max_confidence_diff",
                "uncommitted_files",
                "temp_files",
                "ok",
            )
        },
        "rows_compared": cmp["reference_rows"],
        "lost": cmp["lost"],
        "duplicated": cmp["duplicated"],
    }
    if "error" in alive:
        summary["gcs_error"] = alive["error"]
    checks = {
        "reference_on_both_nodes": all(ref_place["trials_per_node"][r] > 0 for r in ROLES),
        "killed_run_on_both_nodes": all(kill_place["trials_per_node"][r] > 0 for r in ROLES),
        "worker_raylet_killed": bool(kill.get("killed")) and bool(kill.get("raylet_gone")),
        "gcs_saw_worker_die": alive.get(nodes["worker"]["node_id"]) is False
        and alive.get(nodes["head"]["node_id"]) is True,
        # Tune retried it: a second attempt, on the head, from where the first one stopped.
        "killed_trial_finished_on_head": (
            len(logged_nodes) >= 2
            and logged_nodes[0] == "worker"
            and logged_nodes[-1] == "head"
            and attempt_log[0].get("pid") == kill.get("trial_pid")
            and moved_row.get("status") == "done"
            and (moved_row.get("attempts") or 0) >= 2
        ),
        "both_runs_exit_0": args.reference_rc == 0 and args.store_rc == 0,
        "store_matches_reference": bool(cmp["ok"]),
    }
    summary["checks"] = checks
    summary["ok"] = all(checks.values())
    Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


def cmd_cleanup(args) -> int:
    """Only our own sessions: `ray start` under setsid puts each node's processes (gcs,
    raylet, agents, every worker it forks) in one session, which they keep when re-parented."""
    work = Path(args.work)
    recorded = (
        {int(line.split()[1]) for line in (work / "sessions").read_text().splitlines() if line.strip()}
        if (work / "sessions").is_file()
        else set()
    )
    # A process started just before a signal may not have made it into the list: whatever
    # names the work dir (a fresh mktemp path) on its command line is ours too.
    own = os.getsid(0)
    for pid in naming(work):
        sid = _sid(pid)
        if sid is not None and sid != own:
            recorded.add(sid)
    sids = sorted(recorded)
    for _ in range(3):
        for sid in sids:
            kill_session(sid)
        deadline = time.time() + 10
        while time.time() < deadline and any(session_alive(s) for s in sids):
            time.sleep(0.2)
        if not any(session_alive(s) for s in sids):
            break
    left = {s: session_alive(s) for s in sids if session_alive(s)}
    if left:
        print(f"cluster_check: processes still alive in sessions {left}", file=sys.stderr)
    summary = Path(args.summary) if args.summary else None
    if summary is not None and summary.is_file():
        data = json.loads(summary.read_text())
        data["cleanup"] = {
            "sessions": sids,
            "left_running": {str(k): v for k, v in left.items()},
            "ok": not left,
            "work_dir": str(work),
        }
        data["ok"] = bool(data.get("ok")) and not left
        summary.write_text(json.dumps(data, indent=2))
    return 1 if left else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ports")
    p.add_argument("n", type=int)
    p = sub.add_parser("node")
    p.add_argument("--temp-dir", required=True)
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("kill-worker")
    for opt in ("--worker-temp", "--worker-node", "--store", "--out"):
        p.add_argument(opt, required=True)
    p.add_argument("--driver-pid", type=int)
    p.add_argument("--sweep", default="cluster")
    p.add_argument("--after-commits", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600)
    p = sub.add_parser("summary")
    for opt in ("--work", "--head-temp", "--worker-temp", "--reference", "--store", "--address", "--out"):
        p.add_argument(opt, required=True)
    p.add_argument("--sweep", default="cluster")
    p.add_argument("--reference-rc", type=int, required=True)
    p.add_argument("--store-rc", type=int, required=True)
    p = sub.add_parser("cleanup")
    p.add_argument("--work", required=True)
    p.add_argument("--summary", help="add what cleanup found to this summary JSON")
    args = ap.parse_args(argv)
    if args.cmd == "ports":
        print(" ".join(map(str, free_ports(args.n))))
        return 0
    return {"node": cmd_node, "kill-worker": cmd_kill_worker, "summary": cmd_summary, "cleanup": cmd_cleanup}[args.cmd](
        args
    )


if __name__ == "__main__":
    sys.exit(main())
