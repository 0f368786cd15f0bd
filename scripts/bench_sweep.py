#!/usr/bin/env python
"""Sweep scaling on this machine: the quickstart sweep with 1 and with 2 concurrent trials
(speed-up), and Ray Tune's own per-trial overhead (no-op trials, sequential).

    python scripts/bench_sweep.py [--spec specs/quickstart.yaml] [--out benchmarks_out/sweep.json]
    python scripts/bench_sweep.py --workers    # also: each trial as 2 data-parallel workers vs 1 process

The built-in model is pretrained once before timing (shared cache), so both runs time the
sweep itself: Tune scheduling, trials, scoring and the store writes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml


def run_once(spec_path: Path, concurrency: int, cache: Path, resources: dict | None = None) -> dict:
    import ray

    from raysweep.spec import parse_spec
    from raysweep.store import Store
    from raysweep.sweep import run_sweep

    raw = yaml.safe_load(spec_path.read_text())
    raw["max_concurrent_trials"] = concurrency
    if resources:
        raw["resources"] = resources
    text = yaml.safe_dump(raw)
    spec = parse_spec(text)
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "store")
        t = time.perf_counter()
        out = run_sweep(spec, text, store, dashboard=False)
        wall = time.perf_counter() - t
        epochs = store.read("epochs").to_pylist()
        in_trial = sum(e["seconds"] for e in epochs)
    ray.shutdown()
    return {
        "concurrency": concurrency,
        "resources": raw.get("resources"),
        "trials": out.total,
        "failed": len(out.failed),
        "wall_s": wall,
        "sum_epoch_seconds": in_trial,
    }


def tune_overhead(n: int) -> dict:
    import ray
    from ray import tune

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

    def noop(config):
        tune.report({"done": 1})

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        tune.Tuner(
            tune.with_resources(noop, {"cpu": 1}),
            param_space={"i": tune.grid_search(list(range(n)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=d, name="noop", verbose=0),
        ).fit()
        wall = time.perf_counter() - t
    ray.shutdown()
    return {"noop_trials": n, "wall_s": wall, "per_trial_overhead_s": wall / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="specs/quickstart.yaml")
    ap.add_argument("--out", default="benchmarks_out/sweep.json")
    ap.add_argument("--noop-trials", type=int, default=8)
    ap.add_argument(
        "--workers",
        action="store_true",
        help="also time 2-worker trials (Ray Train inside Tune) against 1-process trials",
    )
    args = ap.parse_args()
    cache = Path(os.environ.setdefault("RAYSWEEP_MODEL_CACHE", str(Path(".cache/bench-models").absolute())))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from raysweep.models import ensure_builtin
    from raysweep.spec import load_spec

    for m in load_spec(args.spec).models:
        if m.builtin:
            ensure_builtin(m, cache)
    seq = run_once(Path(args.spec), 1, cache)
    par = run_once(Path(args.spec), 2, cache)
    over = tune_overhead(args.noop_trials)
    res = {
        "machine": f"{os.cpu_count()} cores",
        "spec": args.spec,
        "sequential": seq,
        "concurrent_2": par,
        "speedup": seq["wall_s"] / par["wall_s"],
        "tune": over,
    }
    if args.workers:
        # The same CPUs either way: one process with 2 threads, or 2 gloo workers of 1 thread.
        one = run_once(Path(args.spec), 1, cache, {"cpu": 2, "gpu": 0})
        two = run_once(Path(args.spec), 1, cache, {"cpu": 2, "gpu": 0, "workers": 2})
        res["workers"] = {
            "one_process": one,
            "two_workers": two,
            "extra_s_per_trial": (two["wall_s"] - one["wall_s"]) / one["trials"],
        }
        print(
            f"| workers | 1 process {one['wall_s']:.1f} s | 2 workers {two['wall_s']:.1f} s | {(two['wall_s'] - one['wall_s']) / one['trials']:+.1f} s per trial |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(
        f"| {args.spec} | {res['machine']} | {seq['wall_s']:.1f} | {par['wall_s']:.1f} | {res['speedup']:.2f}x | {over['per_trial_overhead_s']:.2f} |"
    )


if __name__ == "__main__":
    main()
