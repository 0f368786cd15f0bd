"""Lineage columns in the trials table and `raysweep diff` between two real stores."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysweep.lineage import LINEAGE_FIELDS, diff_stores
from raysweep.spec import parse_spec
from raysweep.store import TRIALS_SCHEMA, Store
from raysweep.sweep import run_sweep
from tests.spec_helpers import REPO, tiny_spec_text

pytestmark = pytest.mark.slow


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "raysweep.cli", *args], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory, ray_cluster):
    """A: one trial. B: the same trial and one more (another forget task), run afresh."""
    root = tmp_path_factory.mktemp("lineage")
    out = {}
    for name, forget in (("a", ("sentiment",)), ("b", ("sentiment", "word_order"))):
        text = tiny_spec_text(name="lin", forget_tasks=forget, ft_epochs=2, fg_epochs=1)
        store = Store(root / name)
        outcome = run_sweep(parse_spec(text), text, store)
        assert outcome.exit_code == 0, outcome
        out[name] = store
    return out


def test_trials_rows_record_lineage(two_stores):
    import ray
    import torch

    store = two_stores["a"]
    (row,) = store.trials("lin").to_pylist()
    plan = parse_spec(tiny_spec_text(name="lin", ft_epochs=2, fg_epochs=1)).trials()[0]
    assert row["trial_id"] == plan.trial_id
    assert row["torch_version"] == torch.__version__ and row["ray_version"] == ray.__version__
    assert row["transformers_version"] == importlib.metadata.version("transformers")
    assert row["deepspeed_version"] == importlib.metadata.version("deepspeed")
    assert row["lm_eval_version"] == importlib.metadata.version("lm-eval")
    assert row["raysweep_version"] == importlib.metadata.version("raysweep")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert row["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert row["model_revision"].startswith("builtin:micro-gpt2-gpt2-")
    assert json.loads(row["data_digest"]) == plan.data_digest and set(plan.data_digest) == {"sentiment", "word_order"}
    assert (row["device"], row["dtype"], row["precision"], row["world_size"]) == ("cpu", "float32", "fp32", 1)


def test_diff_names_exactly_the_changed_field(two_stores):
    a, b = two_stores["a"], two_stores["b"]
    shared = a.trials("lin").column("trial_id")[0].as_py()
    same = diff_stores(a.root, b.root)
    assert [c.trial_id for c in same.common] == [shared]
    assert same.common[0].fields == {}
    assert same.only_a == [] and len(same.only_b) == 1 and same.only_b[0].startswith("word-order-")
    # Same trial, same code, same machine: the headline accuracies agree.
    deltas = same.common[0].deltas
    assert deltas["finetuned_test_acc"] == 0.0 and deltas["forgotten_test_acc"] == 0.0

    row = b.read_trial_row("lin", shared)
    b.write_trial_row({**row, "torch_version": "0.0.0+edited"})
    changed = diff_stores(a.root, b.root)
    assert changed.common[0].fields == {"torch_version": (row["torch_version"], "0.0.0+edited")}

    r = _cli("diff", str(a.root), str(b.root), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    assert data["common"][0]["fields"] == {"torch_version": [row["torch_version"], "0.0.0+edited"]}
    assert data["only_b"] == same.only_b
    table = _cli("diff", str(a.root), str(b.root))
    assert table.returncode == 0 and "torch_version" in table.stdout and f"only in B: {same.only_b[0]}" in table.stdout


def test_diff_bad_input_is_one_line_exit_2(tmp_path, two_stores):
    (tmp_path / "plain").mkdir()
    for other, words in ((tmp_path / "missing", "no such directory"), (tmp_path / "plain", "no raysweep store")):
        r = _cli("diff", str(two_stores["a"].root), str(other))
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    assert not (tmp_path / "missing").exists() and list((tmp_path / "plain").iterdir()) == []


def test_rows_without_lineage_columns_still_read(tmp_path):
    """A trials file written before the lineage columns sits beside a new one: both read,
    the old row's lineage as null, whichever file the dataset opens first."""
    store = Store(tmp_path / "s")
    store.ensure()
    old_schema = pa.schema([f for f in TRIALS_SCHEMA if f.name not in LINEAGE_FIELDS])
    base = {
        "sweep": "old",
        "model": "m",
        "model_source": "builtin:gpt2",
        "forget_task": "sentiment",
        "method": "random",
        "size": 1,
        "seed": 0,
        "status": "done",
    }
    path = store.path("trials", "old", "a-old.parquet")
    path.parent.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{**{f.name: None for f in old_schema}, **base, "trial_id": "a-old"}], schema=old_schema),
        path,
    )
    store.write_trial_row({**base, "trial_id": "b-new", "torch_version": "9.9"})
    rows = {r["trial_id"]: r for r in store.trials("old").to_pylist()}
    assert rows["a-old"]["torch_version"] is None and rows["b-new"]["torch_version"] == "9.9"
    assert set(LINEAGE_FIELDS) <= rows["a-old"].keys()
