"""`raysweep plan`: its counts against a real run's store, its CPU time against a real run's
wall clock, and its bad input."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from raysweep.cost import DEFAULT_EXPECTED_FRACTION
from raysweep.planning import parse_expected, plan_sweep
from raysweep.spec import load_spec, parse_spec
from raysweep.store import Store
from raysweep.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]
RAYSWEEP = str(Path(sys.executable).parent / "raysweep")

# Stop rules that never fire (train accuracy must exceed 1, test accuracy fall below 0.001),
# so the epochs are the budget and the plan's upper bound is what runs.
FIXED_EPOCHS = """
name: {name}
models:
  - name: plan-gpt2
    arch: gpt2
    tiny: {{layers: 5, hidden: 32, heads: 2, vocab: 512}}
    pretrain: {{steps: {pretrain}, batch_size: 16}}
tasks: [sentiment, word_order, compare]
forget_tasks: [sentiment, word_order]
methods: [random]
sizes: [20]
seeds: [0]
data: {{cap: 30}}
phases:
  finetune: {{optimizer: adamw, lr: 1.0e-3, batch_size: 8, max_epochs: {ft}, stop_train_acc: 1.0}}
  forget: {{optimizer: adamw, lr: 1.0e-3, batch_size: 8, max_epochs: {fg}, stop_test_acc: 0.001}}
scoring: {{batch_size: 64}}
resources: {{cpu: 1, gpu: 0}}
"""


def test_counts_equal_what_a_real_run_stored(tmp_path, ray_cluster):
    spec = parse_spec(FIXED_EPOCHS.format(name="plan-counts", pretrain=30, ft=2, fg=3))
    store = Store(tmp_path / "store")
    outcome = run_sweep(spec, "", store, dashboard=False)
    assert outcome.exit_code == 0
    # The plan reads the finished trials' epochs from the store (here: every epoch of the budget).
    result = plan_sweep(spec, store, gpu="h100")
    cost = result.cost
    assert "finished trials" in cost.epochs_from
    scores = store.read("scores")
    assert cost.total("rows", "expected") == scores.num_rows == cost.total("rows", "upper")

    examples = {(r["task"], r["split"], r["example_idx"]): r for r in store.read("examples").to_pylist()}
    from raysweep.models import load_model
    from raysweep.sweep import models_dir_for

    tok = load_model(spec.models[0], models_dir_for(store)).tokenizer
    for t in cost.trials:
        one_epoch = scores.filter(
            pc.and_(pc.equal(scores["trial_id"], t.plan.trial_id), pc.equal(scores["phase"], "pretrained"))
        )
        assert one_epoch.num_rows == t.rows_per_epoch
        stored_answers = (
            pc.sum(one_epoch["n_tokens_correct"]).as_py() + pc.sum(one_epoch["n_tokens_distractor"]).as_py()
        )
        assert sum(s.answer for s in t.slices) == stored_answers
        # Prompt tokens, from the stored prompts tokenized directly (the context ends before
        # its trailing space, which the answer carries), plus the stored answer tokens.
        prompts = sum(
            len(tok(examples[(r["eval_task"], r["split"], r["example_idx"])]["prompt"].rstrip())["input_ids"])
            for r in one_epoch.select(["eval_task", "split", "example_idx"]).to_pylist()
        )
        assert t.scored_per_epoch == prompts + stored_answers
        # Trained tokens: what the trainer's real batches hold for the gold targets.
        from raysweep.train import build_batches

        data = {ex.idx: ex for ex in _train_examples(store, t.plan)}
        model = load_model(spec.models[0], models_dir_for(store)).model
        batches = build_batches(tok, model, list(data.values()), [ex.gold for ex in data.values()], 8, random.Random(0))
        assert t.train.gold == int(sum(b.attention_mask.sum() for b in batches))
        assert cost.total("trained", "upper") > 0


def _train_examples(store: Store, plan):
    from raysweep.trial import prepare_tasks

    return prepare_tasks(plan, store)[plan.forget_task].split("train")[: plan.size]


def _env() -> dict:
    return {**os.environ, "RAYSWEEP_MODEL_CACHE": ""}  # each store builds its own model, as a first run does


def test_cpu_plan_measures_this_machine_and_writes_nothing(tmp_path):
    """Without --gpu the plan times the real scorer and trainer here (how close its wall
    time comes to a real run is a benchmark: scripts/bench_plan.py)."""
    spec_file = tmp_path / "timed.yaml"
    spec_file.write_text(FIXED_EPOCHS.format(name="plan-timed", pretrain=200, ft=4, fg=5))
    store = tmp_path / "store"
    plan = subprocess.run(
        [RAYSWEEP, "plan", str(spec_file), "--store", str(store), "--expect-epochs", "finetune=4,forget=5"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert plan.returncode == 0, plan.stderr
    assert not store.exists(), "planning wrote into the store"
    assert "tokens/s scored" in plan.stdout and "pretraining built-in model plan-gpt2 (not cached yet)" in plan.stdout
    line = next(ln for ln in plan.stdout.splitlines() if "wall-clock on this CPU" in ln)
    upper, expected = (_seconds(cell.strip()) for cell in line.split("│")[-3:-1])
    assert upper == expected > 0  # the expected epochs given are the budget


def _seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def test_expected_epochs_default_and_override_are_stated(tmp_path):
    spec = parse_spec(FIXED_EPOCHS.format(name="plan-defaults", pretrain=30, ft=10, fg=20))
    cost = plan_sweep(spec, Store(tmp_path / "none"), gpu="a100", gpus=2).cost
    assert cost.trials[0].epochs["expected"] == {
        "finetune": round(10 * DEFAULT_EXPECTED_FRACTION),
        "forget": round(20 * DEFAULT_EXPECTED_FRACTION),
    }
    assert "assumption" in cost.epochs_from
    cost = plan_sweep(spec, None, gpu="a100", expected=parse_expected("finetune=3,forget=50")).cost
    assert cost.trials[0].epochs["expected"] == {"finetune": 3, "forget": 20}  # never beyond the budget


def test_gguf_model_and_real_data_plan_counts_with_its_own_tokenizer(tmp_path):
    """The real SmolLM2 spec on the real task folders: tokens come from the GGUF tokenizer."""
    shared = REPO.parent / "shared" / "data" / "tasks"
    if not shared.exists():
        pytest.skip(f"no real task data at {shared}")
    from raysweep.tasks.sources import apply_data_root

    spec = apply_data_root(load_spec(REPO / "specs" / "real_smollm2.yaml"), shared)
    result = plan_sweep(spec, None, gpu="h100", gpus=8)
    shape = result.cost.trials[0].model
    assert (shape.layers, shape.hidden, shape.vocab) == (30, 576, 49152)
    assert 130e6 < shape.params < 140e6
    assert not result.missing
    assert result.cost.total("flops", "upper") > result.cost.total("flops", "expected") > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "tpu9"], "--gpu: unknown GPU 'tpu9'"),
        (["--gpu", "h100", "--gpus", "0"], "--gpus: need at least one GPU"),
        (["--gpu", "h100", "--mfu", "1.5"], "--mfu: must be in (0, 1]"),
        (["--gpu", "h100", "--expect-epochs", "warmup=3"], "--expect-epochs: 'warmup=3'"),
        (["--gpu", "h100", "--expect-epochs", "forget=0"], "--expect-epochs: 'forget=0'"),
    ],
)
def test_bad_plan_options_exit_2_with_one_line_and_write_nothing(tmp_path, args, message):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(FIXED_EPOCHS.format(name="plan-bad", pretrain=30, ft=2, fg=2))
    store = tmp_path / "store"
    out = subprocess.run(
        [RAYSWEEP, "plan", str(spec_file), "--store", str(store), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not store.exists()
