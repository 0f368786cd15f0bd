"""The Parquet store: round trip, schema, atomic commits, and every reader the README names."""

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysweep.analysis.context import milestones
from raysweep.errors import BadInput, StoreError
from raysweep.integrity import quarantine, verify
from raysweep.store import (
    EPOCHS_SCHEMA,
    SCHEMA_VERSION,
    SCORES_SCHEMA,
    EpochKey,
    EpochRecord,
    Store,
    atomic_write_table,
    hidden_schema,
)


def _scores(trial: str, phase: str, epoch: int, n: int = 5) -> pa.Table:
    rng = np.random.default_rng(epoch)
    conf = rng.random(n).astype(np.float32)
    return pa.table(
        {
            "sweep": ["s"] * n,
            "trial_id": [trial] * n,
            "phase": [phase] * n,
            "epoch": pa.array([epoch] * n, pa.int32()),
            "eval_task": ["compare"] * n,
            "split": ["test"] * n,
            "example_idx": pa.array(range(n), pa.int32()),
            "gold": pa.array([0] * n, pa.int8()),
            "ll_sum_correct": rng.random(n).astype(np.float32),
            "ll_sum_distractor": rng.random(n).astype(np.float32),
            "ll_mean_correct": rng.random(n).astype(np.float32),
            "ll_mean_distractor": rng.random(n).astype(np.float32),
            "n_tokens_correct": pa.array([1] * n, pa.int16()),
            "n_tokens_distractor": pa.array([1] * n, pa.int16()),
            "confidence": conf,
            "prediction": pa.array([0] * n, pa.int8()),
            "correct": conf > 0.5,
            **{
                f"min_k{pp}_{side}": rng.random(n).astype(np.float32)
                for pp in ("", "_pp")
                for side in ("correct", "distractor")
            },
        }
    )


def _summary(trial, phase, epoch):
    return pa.Table.from_pylist(
        [
            {
                "sweep": "s",
                "trial_id": trial,
                "phase": phase,
                "epoch": epoch,
                "train_loss": 0.5,
                "forget_train_acc": 1.0,
                "forget_validation_acc": 1.0,
                "forget_test_acc": 1.0,
                "seconds": 1.0,
            }
        ],
        schema=EPOCHS_SCHEMA,
    )


def _hidden(trial, phase, epoch, n=5, d=4):
    vals = pa.array(np.arange(n * d, dtype=np.float32))
    vec = pa.FixedSizeListArray.from_arrays(vals, d)
    return pa.table(
        {
            "sweep": ["s"] * n,
            "trial_id": [trial] * n,
            "phase": [phase] * n,
            "epoch": pa.array([epoch] * n, pa.int32()),
            "eval_task": ["compare"] * n,
            "split": ["test"] * n,
            "example_idx": pa.array(range(n), pa.int32()),
            "layer": pa.array([-5] * n, pa.int16()),
            "hidden": vec,
            "hidden_correct": vec,
            "hidden_distractor": vec,
        },
        schema=hidden_schema(d),
    )


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store")
    s.ensure()
    return s


def test_round_trip_schema_and_marker(store):
    rec = EpochRecord(
        EpochKey("s", "t1", "finetune", 3),
        _scores("t1", "finetune", 3),
        _summary("t1", "finetune", 3),
        _hidden("t1", "finetune", 3),
    )
    store.commit_epoch(rec)
    back = store.read("scores")
    assert back.schema == SCORES_SCHEMA
    assert back.equals(rec.scores)
    assert store.committed_epochs("s", "t1") == {"finetune": [3]}
    marker = json.loads((store.root / "commits/s/t1/finetune/e0003.json").read_text())
    assert marker["rows"] == 5 and "hidden/s/t1/finetune/e0003.parquet" in marker["files"]
    h = pq.read_table(store.root / "hidden/s/t1/finetune/e0003.parquet")
    assert h.column("hidden").type == pa.list_(pa.float32(), 4)


def test_recommitting_an_epoch_replaces_it_rows_exist_once(store):
    for _ in range(3):
        store.commit_epoch(
            EpochRecord(EpochKey("s", "t1", "forget", 1), _scores("t1", "forget", 1), _summary("t1", "forget", 1))
        )
    assert store.read("scores").num_rows == 5


def test_readers_pandas_pyarrow_duckdb_ray(store, ray_cluster):
    import duckdb
    import pandas as pd
    import ray

    for e in range(3):
        store.commit_epoch(
            EpochRecord(EpochKey("s", "t1", "forget", e), _scores("t1", "forget", e), _summary("t1", "forget", e))
        )
    root = store.root / "scores"
    assert len(pd.read_parquet(root)) == 15
    assert pq.read_table(root).num_rows == 15
    n = duckdb.sql(f"select count(*), count(distinct epoch) from read_parquet('{root}/**/*.parquet')").fetchall()[0]
    assert n == (15, 3)
    ds = ray.data.read_parquet(str(root))
    assert ds.count() == 15 and set(ds.schema().names) == set(SCORES_SCHEMA.names)


def test_atomic_write_leaves_no_partial_file_visible(store, monkeypatch):
    target = store.root / "scores" / "x.parquet"
    big = pa.table({"a": np.arange(2_000_000)})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("raysweep.store.pq.write_table", boom)
    with pytest.raises(OSError):
        atomic_write_table(target, big)
    assert not target.exists() and not list(target.parent.glob("*"))  # temp file cleaned up too


def test_concurrent_reader_sees_old_or_new_never_partial(store):
    target = store.root / "scores" / "s" / "t" / "x.parquet"
    small, large = pa.table({"a": np.arange(10)}), pa.table({"a": np.arange(3_000_000)})
    atomic_write_table(target, small)
    seen, errors, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                # Open once, read from that handle: the path may be renamed over meanwhile.
                with open(target, "rb") as fh:
                    seen.add(pq.read_table(fh).num_rows)
            except Exception as exc:  # noqa: BLE001 - any failure to read is the bug under test
                errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(3):
        atomic_write_table(target, large)
        atomic_write_table(target, small)
    stop.set()
    t.join()
    assert not errors and seen and seen <= {10, 3_000_000}


def test_newer_schema_is_refused(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "store.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(StoreError, match="newer raysweep"):
        Store(root).ensure()


def test_v1_store_without_pair_states_is_refused(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "store.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(StoreError, match="schema v1.*new store"):
        Store(root).ensure()


def test_store_path_checks(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BadInput, match="not a directory"):
        Store.check_writable(f)
    Store.check_writable(tmp_path / "new" / "nested")  # creatable: fine


def test_verify_and_quarantine_truncated_file(store):
    store.commit_epoch(
        EpochRecord(EpochKey("s", "t1", "forget", 1), _scores("t1", "forget", 1), _summary("t1", "forget", 1))
    )
    path = store.root / "scores/s/t1/forget/e0001.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    bad = verify(store)
    assert [p for p, _ in bad] == [path]
    quarantine(store, [path])
    assert not path.exists() and verify(store) == []
    assert store.committed_epochs("s", "t1") == {}  # its epoch will be recomputed on resume


def test_quick_verify_reads_footers_and_deep_verify_decodes_pages(store):
    store.commit_epoch(
        EpochRecord(EpochKey("s", "t1", "forget", 1), _scores("t1", "forget", 1), _summary("t1", "forget", 1))
    )
    path = store.root / "scores/s/t1/forget/e0001.parquet"
    assert verify(store) == [] and verify(store, deep=True) == []
    # Damage inside the data pages, footer intact: only decoding every page finds it.
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    start = col.data_page_offset
    data[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(data))
    assert verify(store) == []
    assert [p for p, _ in verify(store, deep=True)] == [path]


def test_milestones_from_trials_table(store):
    store.write_trial_row(
        {"sweep": "s", "trial_id": "t1", "status": "done", "best_finetune_epoch": 4, "last_forget_epoch": 7}
    )
    store.write_trial_row({"sweep": "s", "trial_id": "t2", "status": "running", "best_finetune_epoch": 2})
    m = {(r["milestone"], r["phase"], r["epoch"]) for r in milestones(store).to_pylist() if r["trial_id"] == "t1"}
    assert m == {("pretrained", "pretrained", 0), ("finetuned", "finetune", 4), ("forgotten", "forget", 7)}
    assert all(r["trial_id"] == "t1" for r in milestones(store).to_pylist())
