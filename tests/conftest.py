"""Shared fixtures: one Ray local cluster per session, one cache of built-in tiny models,
and small specs that run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.spec_helpers import REPO, tiny_spec_text

# Built-in models are pretrained once and reused by every test (and every later run).
os.environ.setdefault("RAYSWEEP_MODEL_CACHE", str(REPO / ".cache" / "test-models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's token auth stays on, as it is for users (the token is made once, see below).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# DeepSpeed JIT-builds a CPU communication op on first use (about a minute): build it once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


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
