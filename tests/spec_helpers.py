"""Small specs for the tests: a whole trial of TINY_SPEC takes seconds on one core."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A spec small enough that a whole trial takes seconds on one core: a small model with a
# short pretraining, two tasks, few examples and few epochs.
TINY_SPEC = """
name: {name}
models:
  - name: micro-gpt2
    arch: gpt2
    tiny: {{layers: 5, hidden: 32, heads: 2, vocab: 512}}
    pretrain: {{steps: 40, batch_size: 16}}
tasks: [sentiment, word_order]
forget_tasks: {forget_tasks}
methods: {methods}
sizes: [24]
seeds: [0]
data: {{cap: 24}}
phases:
  finetune: {{optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: {ft_epochs}}}
  forget: {{optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: {fg_epochs}}}
  relearn: {{enabled: {relearn}, optimizer: adamw, lr: 1.0e-3, batch_size: 8, max_epochs: 2}}
scoring: {{batch_size: 64}}
resources: {{cpu: 1, gpu: 0}}
max_failures: {max_failures}
"""


def tiny_spec_text(
    name: str = "tiny",
    forget_tasks=("sentiment",),
    methods=("random",),
    ft_epochs: int = 2,
    fg_epochs: int = 2,
    relearn: bool = False,
    max_failures: int = 1,
) -> str:
    return TINY_SPEC.format(
        name=name,
        forget_tasks="[" + ", ".join(forget_tasks) + "]",
        methods="[" + ", ".join(methods) + "]",
        ft_epochs=ft_epochs,
        fg_epochs=fg_epochs,
        relearn=str(relearn).lower(),
        max_failures=max_failures,
    )
