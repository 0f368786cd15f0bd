#!/usr/bin/env python
"""How well `raysweep plan` predicts a sweep's wall time on this CPU: plan it (the short timed
pass), then run it with `raysweep run` in a fresh process and a fresh store and model cache,
as a first-time user would, and compare.

    python scripts/bench_plan.py [--spec FILE] [--out benchmarks/plan_cpu.json]

The default spec's stop rules never fire (train accuracy must exceed 1, test accuracy fall
below 0.001), so the epochs run are the budget the plan is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """
name: plan-bench
models:
  - name: plan-gpt2
    arch: gpt2
    tiny: {layers: 5, hidden: 32, heads: 2, vocab: 512}
    pretrain: {steps: 200, batch_size: 16}
tasks: [sentiment, word_order, compare]
forget_tasks: [sentiment, word_order, compare]
methods: [random]
sizes: [20]
seeds: [0, 1]
data: {cap: 30}
phases:
  finetune: {optimizer: adamw, lr: 1.0e-3, batch_size: 8, max_epochs: 4, stop_train_acc: 1.0}
  forget: {optimizer: adamw, lr: 1.0e-3, batch_size: 8, max_epochs: 5, stop_test_acc: 0.001}
scoring: {batch_size: 64}
resources: {cpu: 1, gpu: 0}
"""
EXPECT = "finetune=4,forget=5"


def _seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", type=Path, default=None)
    ap.add_argument("--expect-epochs", default=EXPECT)
    ap.add_argument("--out", default="benchmarks/plan_cpu.json")
    args = ap.parse_args()
    raysweep = str(Path(sys.executable).parent / "raysweep")
    env = {k: v for k, v in os.environ.items() if k != "RAYSWEEP_MODEL_CACHE"}
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.spec or Path(tmp) / "spec.yaml"
        if args.spec is None:
            spec.write_text(SPEC)
        store = Path(tmp) / "store"
        t0 = time.perf_counter()
        plan = subprocess.run(
            [raysweep, "plan", str(spec), "--store", str(store), "--expect-epochs", args.expect_epochs],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        plan_seconds = time.perf_counter() - t0
        line = next(ln for ln in plan.stdout.splitlines() if "wall-clock on this CPU" in ln)
        predicted = _seconds(line.split("│")[-2].strip())
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        subprocess.run(
            [raysweep, "run", str(spec), "--store", str(store), "--no-dashboard"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        measured = time.perf_counter() - t0
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(["python", "scripts/bench_plan.py", *sys.argv[1:]]),
        "load_average_before_run": load_before,
        "plan_seconds": round(plan_seconds, 1),
        "predicted_wall_s": predicted,
        "measured_wall_s": round(measured, 1),
        "relative_error": round((predicted - measured) / measured, 3),
        "plan_output": plan.stdout,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "plan_output"}, indent=2))


if __name__ == "__main__":
    main()
