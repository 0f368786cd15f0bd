"""Where the real task records live for the tests: one folder per task, `<split>.jsonl` each.

They are kept outside the repository, next to it (`../shared/data/tasks`); the environment
variable RAYSWEEP_SHARED_DATA names another shared data folder (its `tasks/` is used), as for
the real-model tests. Where the folder is missing the tests that need it skip, saying so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_tasks_dir() -> Path:
    env = os.environ.get("RAYSWEEP_SHARED_DATA")
    return (Path(env).expanduser().resolve() if env else DEFAULT_SHARED_DATA) / "tasks"


def task_folders() -> list[str]:
    """Names of the task folders present (empty where the data is missing: the tests skip)."""
    root = shared_tasks_dir()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def require_shared_tasks() -> Path:
    root = shared_tasks_dir()
    if not root.is_dir():
        pytest.skip(f"real task data not found at {root} (set RAYSWEEP_SHARED_DATA to a folder holding tasks/<task>/)")
    return root


def jsonl_records(path: Path) -> list[dict]:
    """A JSON-lines file read independently of raysweep's reader: one record per "\\n" line."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def split_files(task_dir: Path) -> dict[str, Path]:
    """File stem -> path of each JSON-lines split in a task folder."""
    return {p.stem: p for p in sorted(task_dir.glob("*.jsonl"))}
