"""The quickstart demo's invariants that hold without running it: the spec it runs, and the
pretraining recipe that makes its built-in model start with settled, partial skills."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysweep import models
from raysweep.reproducible import CorrectlyRoundedAdamW
from raysweep.spec import ModelSpec, load_spec
from raysweep.tasks.builtin import BUILTIN_TASKS

QUICKSTART = Path(__file__).resolve().parent.parent / "specs" / "quickstart.yaml"


def test_quickstart_evaluates_every_forget_task_on_builtin_tasks_only():
    spec = load_spec(QUICKSTART)
    assert spec.forget_tasks and set(spec.forget_tasks) <= set(spec.tasks)
    # A cross-task matrix needs tasks besides the ones forgotten.
    assert len(set(spec.tasks) - set(spec.forget_tasks)) >= 1
    assert set(spec.tasks) <= set(BUILTIN_TASKS)
    assert all(m.builtin for m in spec.models)
    assert all(m.pretrain.lr_schedule == "cosine" for m in spec.models)


def test_pretraining_rate_warms_up_then_decays_to_zero():
    steps = 200
    factors = [models.pretrain_lr_factor(i, steps) for i in range(steps)]
    warm = factors.index(max(factors))
    assert 0 < warm < steps // 10 and factors[0] < 0.2
    assert max(factors) == pytest.approx(1.0, abs=0.01)
    assert all(a >= b for a, b in zip(factors[warm:], factors[warm + 1 :]))
    assert factors[-1] < 1e-3


def test_pretraining_takes_its_last_steps_at_a_vanishing_rate(tmp_path, monkeypatch):
    """The rate the optimizer actually used, step by step, in a real (small) pretraining."""
    seen: list[float] = []
    # CPU pretraining takes its steps with the correctly rounded AdamW (raysweep.reproducible).
    step = CorrectlyRoundedAdamW.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(CorrectlyRoundedAdamW, "step", recording)
    spec = ModelSpec(
        name="story",
        arch="gpt2",
        tiny={"layers": 5, "hidden": 32, "heads": 2, "vocab": 400},
        pretrain={"steps": 40, "batch_size": 4, "lr": 3e-3, "examples_per_task": 20, "lr_schedule": "cosine"},
    )
    tokenizer = models.train_tokenizer(spec.tiny.vocab, add_bos=False)
    models.pretrain_tiny(models.build_tiny(spec, tokenizer), tokenizer, spec)
    assert len(seen) == 40
    assert max(seen) == pytest.approx(3e-3, rel=0.01)
    assert seen[-1] < 3e-3 * 0.01 and seen[0] < seen[5]
