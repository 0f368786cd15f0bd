"""A full disk under the store: one line naming the store and "no space left on device",
trials marked failed with that reason, no temporary files left, and once space is freed a
rerun completes with nothing lost.

The space runs out for real: /dev/full (every write fails with ENOSPC) where a single write
path is tested, and a small tmpfs for a whole sweep through the command line and Ray (that
needs root to mount; it is skipped with the reason where there is none).
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
import typer

import raysweep.resume as resume
from raysweep.cli import _guard
from raysweep.errors import DiskFull, is_no_space
from raysweep.spec import parse_spec
from raysweep.store import EpochKey, Store
from raysweep.sweep import models_dir_for
from raysweep.trial import TrialRunner
from scripts.reliability import compare_stores, fill_disk, mount_tmpfs, raysweep
from tests.spec_helpers import tiny_spec_text

DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full on this system")


@needs_dev_full
def test_a_short_torch_write_is_reported_as_a_full_disk_naming_the_file(tmp_path):
    target = tmp_path / "latest.pt"
    with open(DEV_FULL, "wb", buffering=0) as fh, pytest.raises(OSError) as info:
        resume.torch_write({"w": torch.zeros(4096)}, fh, target)
    # torch alone says "RuntimeError: ... unexpected pos N vs M" and loses the errno.
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert is_no_space(info.value)


@needs_dev_full
def test_a_trial_that_runs_out_of_space_fails_with_the_reason_in_words(tmp_path, monkeypatch):
    """A real trial whose resume point write meets a real ENOSPC (/dev/full)."""

    def save_to_full_disk(obj, path: Path) -> None:
        with open(DEV_FULL, "wb") as fh:
            resume.torch_write(obj, fh, path)

    monkeypatch.setattr(resume, "atomic_torch_save", save_to_full_disk)
    store = Store(tmp_path / "store")
    store.ensure()
    plan = parse_spec(tiny_spec_text(name="df", ft_epochs=1, fg_epochs=1)).trials()[0]
    runner = TrialRunner(plan, store, models_dir_for(store))
    with pytest.raises(DiskFull) as info:
        runner.run(attempt=1)
    expected = f"store {store.root}: no space left on device (writing checkpoints/df/{plan.trial_id}/latest.pt)"
    assert str(info.value) == expected
    (row,) = store.trials().to_pylist()
    assert row["status"] == "failed" and row["error"] == f"DiskFull: {expected}"
    assert not list(store.root.rglob("_*.tmp-*"))
    assert store.is_committed(EpochKey("df", plan.trial_id, "pretrained", 0))  # what was committed stays


@needs_dev_full
def test_the_command_line_says_one_line_cleans_up_and_marks_running_trials_failed(tmp_path, capsys):
    store = Store(tmp_path / "store")
    store.ensure()
    temp = store.path("scores", "s", "t1", "finetune", f"_e0001.parquet.tmp-{uuid.uuid4().hex[:8]}")
    temp.parent.mkdir(parents=True)

    @_guard
    def command(store_root: Path, trials_started: bool) -> None:
        # What a driver does before a write fails: a trial it started is `running`, and a
        # write was half done when the space ran out.
        if trials_started:
            store.write_trial_row({"sweep": "s", "trial_id": "t1", "status": "running", "attempts": 1})
        temp.write_bytes(b"half a file")
        with open(DEV_FULL, "wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()

    for started, code in ((False, 2), (True, 1)):
        with pytest.raises(typer.Exit) as info:
            command(store_root=store.root, trials_started=started)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert info.value.exit_code == code
        assert len(lines) == 1 and f"store {store.root}: no space left on device" in lines[0], lines
        assert not temp.exists()
    (row,) = store.trials().to_pylist()
    assert row["status"] == "failed" and row["error"].startswith(
        f"DiskFull: store {store.root}: no space left on device"
    )


# ---- a whole sweep on a full tmpfs ---------------------------------------------------------

SPEC = tiny_spec_text(name="dfull", ft_epochs=2, fg_epochs=1)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    why = mount_tmpfs(mnt)
    if why:
        pytest.skip(why)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_sweep_on_a_full_disk_fails_cleanly_and_completes_once_space_is_freed(tmp_path, small_tmpfs):
    spec = tmp_path / "dfull.yaml"
    spec.write_text(SPEC)
    reference = tmp_path / "reference"
    r = raysweep("run", str(spec), "--store", str(reference), "--no-dashboard", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    root = small_tmpfs / "store"
    # Room for the plan, the examples and the pretrained epoch's rows, not for the resume
    # point after them (about 370 kB for this model).
    filler = fill_disk(small_tmpfs, 300 << 10)
    full = raysweep("run", str(spec), "--store", str(root), "--no-dashboard", timeout=600)
    reason = f"store {root.absolute()}: no space left on device"
    assert full.returncode == 1, (full.stdout[-2000:], full.stderr[-3000:])
    assert reason in full.stderr + full.stdout, full.stderr[-3000:]
    assert "unexpected pos" not in full.stderr + full.stdout
    rows = Store(root).trials("dfull").to_pylist()
    assert rows and all(r["status"] == "failed" and reason in (r["error"] or "") for r in rows), rows
    assert not [p for p in root.rglob("_*.tmp-*") if "ray" not in p.relative_to(root).parts[:1]]

    filler.unlink()
    again = raysweep("run", str(spec), "--store", str(root), "--no-dashboard", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    cmp = compare_stores(root, reference)
    assert cmp["lost"] == 0 and cmp["duplicated"] == 0 and cmp["extra"] == 0 and cmp["ok"], cmp


@pytest.mark.slow
def test_the_live_view_shows_a_trial_that_ran_out_of_space_as_failed(tmp_path, small_tmpfs):
    """The trial ends without raising (a retry would fail the same way), so Tune calls it
    complete: the live view must still say failed."""
    from raysweep.errors import DiskFull
    from raysweep.sweep import run_sweep

    root = small_tmpfs / "store"
    fill_disk(small_tmpfs, 300 << 10)
    spec = parse_spec(SPEC)
    seen: list[dict[str, str]] = []
    with contextlib.suppress(DiskFull):
        run_sweep(
            spec,
            SPEC,
            Store(root),
            dashboard=False,
            sink=lambda views: seen.append({k: v.status for k, v in views.items()}),
        )
    rows = Store(root).trials("dfull").to_pylist()
    assert rows and all(r["status"] == "failed" for r in rows), rows
    assert seen and set(seen[-1].values()) == {"failed"}, seen[-3:]
