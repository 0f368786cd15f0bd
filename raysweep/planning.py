"""`raysweep plan`: a sweep's cost (raysweep.cost) turned into time (raysweep.throughput) and
laid out for a person, before anything runs. Nothing is written: the store is only read,
for the epochs its finished trials took."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.table import Table

from raysweep.constants import TRAINED_PHASES
from raysweep.cost import SweepCost, estimate, human, human_bytes
from raysweep.errors import BadInput
from raysweep.spec import SweepSpec
from raysweep.throughput import (
    CpuRate,
    GpuRate,
    calibrate_cpu,
    gpu_rate,
    model_shape_and_tokenizer,
    observed_epochs,
    prepare_plan_data,
)


@dataclass
class PlanResult:
    cost: SweepCost
    rate: GpuRate | CpuRate
    missing: dict[str, str]


def parse_expected(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        phase, _, value = part.partition("=")
        phase = phase.strip()
        try:
            n = float(value)
        except ValueError:
            n = -1.0
        if phase not in TRAINED_PHASES or not n >= 1:
            raise BadInput(
                f"--expect-epochs: {part.strip()!r} is not PHASE=EPOCHS with PHASE one of {', '.join(TRAINED_PHASES)} and EPOCHS >= 1"
            )
        out[phase] = n
    return out


def plan_sweep(
    spec: SweepSpec,
    store=None,
    *,
    gpu: str | None = None,
    gpus: int = 1,
    mfu: float = 0.4,
    expected: dict[str, float] | None = None,
    tokenizer: str | None = None,
    sample: int = 48,
) -> PlanResult:
    rate_gpu = gpu_rate(gpu, gpus, mfu) if gpu else None  # bad options fail before any loading
    t0 = time.perf_counter()
    data, missing = prepare_plan_data(spec)
    data_seconds = time.perf_counter() - t0
    if set(spec.forget_task_list) <= set(missing):
        raise BadInput(f"plan: no forget task's data can be read here ({'; '.join(missing.values())})")
    shapes, toks = {}, {}
    for m in spec.models:
        shapes[m.name], toks[m.name] = model_shape_and_tokenizer(m, tokenizer)
    source = "--expect-epochs"
    if expected is None:
        expected = observed_epochs(store, [m.name for m in spec.models])
        source = f"mean of the finished trials in {store.root}" if expected else ""
    cost = estimate(spec, data, shapes, toks, expected, source)
    if rate_gpu is not None:
        return PlanResult(cost, rate_gpu, missing)
    from raysweep.sweep import models_dir_for

    if store is None:
        raise BadInput("plan: timing on this CPU needs a store (its model cache); or pass --gpu")
    return PlanResult(
        cost, calibrate_cpu(spec, data, models_dir_for(store), sample=sample, data_seconds=data_seconds), missing
    )


def _hours(seconds: float) -> str:
    return (
        f"{seconds / 3600:.3g} h"
        if seconds >= 3600
        else f"{seconds / 60:.3g} min"
        if seconds >= 120
        else f"{seconds:.0f} s"
    )


def render_plan(result: PlanResult) -> list:
    cost, rate = result.cost, result.rate
    spec = cost.spec
    out: list = [f"plan of sweep {spec.name}: {len(cost.trials)} trials"]
    for name in dict.fromkeys(t.model.name for t in cost.trials):
        m = next(t.model for t in cost.trials if t.model.name == name)
        out.append(
            f"model {name}: {human(m.params)} parameters, {m.layers} layers, hidden {m.hidden}, vocab {m.vocab} ({m.source})"
        )
    first = cost.trials[0]
    out.append(
        "epochs: upper bound = max_epochs ("
        + ", ".join(f"{p} {n:g}" for p, n in first.epochs["upper"].items())
        + "); expected = "
        + ", ".join(f"{p} {n:g}" for p, n in first.epochs["expected"].items())
        + f" ({cost.epochs_from})"
    )
    schedule = spec.scoring.schedule
    out.append(
        "scoring: the forget task on all its splits every epoch; the other evaluation tasks on "
        + ", ".join(spec.scoring.splits)
        + (
            " every epoch"
            if schedule == "every_epoch"
            else f" at the milestones and {'epochs 1, 2, 4, 8, ...' if schedule == 'log' else f'every {schedule} epochs'}"
            if schedule != "milestones"
            else " at the milestones only"
        )
        + " (per-epoch figures below are of an epoch that scores every task)"
    )
    for task, reason in result.missing.items():
        if reason.startswith("no train split"):
            out.append(f"data: {task}: {reason}")
        else:
            out.append(
                f"data: {task} cannot be read here: sized as {spec.data.cap} examples per split of the other tasks' mean length ({reason})"
            )

    per = Table(title="per trial and epoch (mean over trials)", title_justify="left")
    for col in (
        "rows scored",
        "tokens scored",
        "answer tokens",
        "tokens trained (fine-tune)",
        "tokens trained (forget, expected)",
    ):
        per.add_column(col, justify="right")
    n = len(cost.trials)
    per.add_row(
        human(sum(t.rows_per_epoch for t in cost.trials) / n),
        human(sum(t.scored_per_epoch for t in cost.trials) / n),
        human(sum(sum(s.answer for s in t.slices) for t in cost.trials) / n),
        human(sum(t.train.gold for t in cost.trials) / n),
        human(sum(t.train.for_targets(t.plan.method, "expected") for t in cost.trials) / n),
    )
    out.append(per)

    tot = Table(title="whole sweep", title_justify="left")
    tot.add_column("")
    tot.add_column("upper bound (max epochs)", justify="right")
    tot.add_column("expected", justify="right")
    rows = [
        ("tokens trained", lambda b: human(cost.total("trained", b))),
        ("tokens scored", lambda b: human(cost.total("scored", b))),
        ("FLOPs (train + score)", lambda b: human(cost.total("flops", b), "FLOP")),
        ("store: score rows", lambda b: human(cost.total("rows", b))),
        ("store: hidden-state rows", lambda b: human(cost.total("hidden_rows", b))),
        ("store: bytes", lambda b: human_bytes(cost.store_bytes(b))),
    ]
    if isinstance(rate, GpuRate):
        peak = rate.peak_flops(first.plan.train.precision) / 1e12
        rows.append(
            (
                f"GPU-hours on {rate.gpu} ({peak:g} TFLOP/s peak, MFU {rate.mfu:.0%})",
                lambda b: f"{sum(rate.trial_seconds(cost, b)) / 3600:.3g}",
            )
        )
        per_trial = max(1, int(round(spec.resources.gpu)) or 1)
        rows.append(
            (
                f"wall-clock on {rate.gpus} x {rate.gpu} ({per_trial} GPU per trial)",
                lambda b: _hours(rate.wall_seconds(cost, b)),
            )
        )
    else:
        rows.append(
            (
                f"wall-clock on this CPU ({rate.cpus} cores, {spec.resources.cpu:g} per trial)",
                lambda b: _hours(rate.wall_seconds(cost, b)),
            )
        )
    for label, fn in rows:
        tot.add_row(label, fn("upper"), fn("expected"))
    out.append(tot)

    ck = [t.checkpoint_bytes() for t in cost.trials]
    slots = _slots(spec, rate)
    peak = sum(sorted((c["peak"] for c in ck), reverse=True)[:slots])
    out.append(
        f"checkpoint disk: {human_bytes(peak)} at most while {slots} trial(s) run at once "
        f"(resume point + best fine-tune weights each), {human_bytes(sum(c['kept'] for c in ck))} kept after the sweep (one resume point per trial)"
    )
    if isinstance(rate, CpuRate):
        for name in rate.score_s_per_token:
            out.append(
                f"measured on this CPU, {name}: {1 / rate.score_s_per_token[name]:,.0f} tokens/s scored, "
                f"{1 / rate.train_s_per_token[name]:,.0f} tokens/s trained; {rate.trial_setup_s:.1f} s per trial to start"
            )
        for name, s in rate.sweep_setup_s.items():
            what = name if name.startswith("driver") else f"pretraining built-in model {name} (not cached yet)"
            out.append(f"before the first trial: {what}, about {s:.0f} s")
    return out


def _slots(spec: SweepSpec, rate) -> int:
    if isinstance(rate, GpuRate):
        return max(1, rate.gpus // max(1, int(round(spec.resources.gpu)) or 1))
    return max(1, int(rate.cpus // spec.resources.cpu))
