"""Shared fixtures: one Ray local cluster per session, one cache of built-in tiny models,
and small specs that run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Built-in models are pretrained once and reused by every test (and every later run).
os.environ.setdefault("RAYSWEEP_MODEL_CACHE", str(REPO / ".cache" / "test-models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's token auth stays on, as it is for users (the token is made once, see below).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# DeepSpeed JIT-builds a CPU communication op on first use (about a minute): build it once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

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


def tiny_spec_text(name: str = "tiny", forget_tasks=("sentiment",), methods=("random",), ft_epochs: int = 2, fg_epochs: int = 2, relearn: bool = False, max_failures: int = 1) -> str:
    return TINY_SPEC.format(
        name=name,
        forget_tasks="[" + ", ".join(forget_tasks) + "]",
        methods="[" + ", ".join(methods) + "]",
        ft_epochs=ft_epochs,
        fg_epochs=fg_epochs,
        relearn=str(relearn).lower(),
        max_failures=max_failures,
    )


@pytest.fixture
def tiny_spec_file(tmp_path):
    def make(**kwargs) -> Path:
        p = tmp_path / f"{kwargs.get('name', 'tiny')}.yaml"
        p.write_text(tiny_spec_text(**kwargs))
        return p

    return make


@pytest.fixture(scope="session", autouse=True)
def ray_auth_token():
    """One token before any cluster starts: tests start clusters in several processes."""
    from raysweep.sweep import ensure_auth_token

    ensure_auth_token()


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
