"""The HTML report: built from a hand-made store, self-contained, and every figure decodes
in a real (headless Chromium) browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
from analysis_helpers import SWEEP, build_minimal_store, build_rich_store

from raysweep.analysis import outputs_dir, registered_analyses, run_analyses
from raysweep.report import fresh_outcomes, write_report

PAPER = ["single_task", "cross_task", "dataset_size", "flipped", "cross_model", "predictors", "order", "probes"]
# 4 single-task panels (one per condition), 1 cross-task heatmap (the other conditions have
# a single cell), one bar chart per comparison, 2 predictor plots, 1 order plot, 4 probe panels.
EXPECTED_IMAGES = {
    "single_task": 4,
    "cross_task": 1,
    "dataset_size": 1,
    "flipped": 1,
    "cross_model": 1,
    "predictors": 2,
    "order": 1,
    "probes": 4,
}
CHECK_SCRIPT = (
    "<script>window.addEventListener('load', () => { const im = [...document.images];"
    " document.body.setAttribute('data-figures', im.filter(i => i.complete && i.naturalWidth > 0).length + '/' + im.length); });"
    "</script>"
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


@pytest.fixture(scope="module")
def rich_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    store = build_rich_store(root / "store")
    return store, write_report(store, root / "out")


def test_report_runs_missing_analyses_and_is_self_contained(rich_report):
    store, path = rich_report
    assert path.name == "report.html" and path.is_file()
    for name in registered_analyses():
        # Computed for the page; storing outcomes is `analyze`'s job, not the report's.
        assert not (outputs_dir(store, None, name) / "outcome.json").exists()
    page = path.read_text()
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page
    assert "class=figure-error>" not in page
    for name in PAPER:
        section = page.split(f"<section id={name}>", 1)[1].split("</section>", 1)[0]
        assert section.count("<img") == EXPECTED_IMAGES[name], name
        assert "<table>" in section, name


def test_report_reuses_fresh_outputs_and_recomputes_stale_ones_without_storing_them(tmp_path, monkeypatch):
    import raysweep.report as report

    store = build_rich_store(tmp_path / "store")
    run_analyses(store, only=["single_task"], engine="local")
    meta = outputs_dir(store, None, "single_task") / "outcome.json"
    stored = meta.read_text()
    reran: list[list[str]] = []
    real = report.run_analyses
    monkeypatch.setattr(report, "run_analyses", lambda *a, **kw: reran.append(kw["only"]) or real(*a, **kw))
    # fresh_outcomes is what write_report uses to decide; it skips drawing the figures.
    fresh = {o.name: o for o in fresh_outcomes(store)}
    assert "single_task" not in reran[-1] and fresh["single_task"].status == "ok"
    # Rewriting a trial row (as a resumed sweep does) makes the outputs stale.
    trial = next((store.root / "trials" / SWEEP).glob("t0-random-n100-s0.parquet"))
    time.sleep(0.01)
    os.utime(trial)
    fresh = {o.name: o for o in fresh_outcomes(store, None)}
    assert "single_task" in reran[-1] and fresh["single_task"].fingerprint != json.loads(stored)["fingerprint"]
    assert meta.read_text() == stored


def test_report_lists_skipped_analyses(tmp_path):
    store = build_minimal_store(tmp_path / "min")
    page = write_report(store, tmp_path / "out", sweep=SWEEP).read_text()
    assert (tmp_path / "out" / f"report-{SWEEP}.html").is_file()
    skipped = re.findall(r"<li class=skipped><b>([^<]+)</b>", page)
    paper_skipped = [
        "Cross-task forgetting",
        "Dataset size",
        "Flipped vs random labels",
        "Other models",
        "Learning vs forgetting order",
        "Linear probes",
    ]
    assert [s for s in skipped if s in paper_skipped] == paper_skipped
    assert "one model only (m1): cross_model compares two or more models" in page
    assert "<section id=single_task>" in page


def test_every_figure_renders_in_headless_chromium(rich_report, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not found (apt-get install -y chromium)")
    _, path = rich_report
    checked = tmp_path / "checked.html"
    checked.write_text(path.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        checked.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'data-figures="(\d+)/(\d+)"', proc.stdout)
    assert found, f"no marker in the dumped DOM (rc={proc.returncode}): {proc.stderr[-2000:]}"
    n_images = checked.read_text().count("<img")
    assert n_images >= sum(EXPECTED_IMAGES.values())
    assert (int(found.group(1)), int(found.group(2))) == (n_images, n_images)


def test_masked_cells_are_hatched_and_intervals_drawn_as_error_bars(tmp_path):
    from analysis_helpers import build_cross_store
    from matplotlib.container import ErrorbarContainer

    from raysweep.analysis import run_analyses
    from raysweep.analysis.registry import figure_for

    store = build_cross_store(tmp_path / "s")
    out = {o.name: o for o in run_analyses(store, only=["cross_task", "single_task"], engine="local")}
    ((_, fig),) = figure_for("cross_task")(out["cross_task"])
    ax = fig.axes[0]
    hatched = [p for p in ax.patches if p.get_hatch() == "///"]
    assert len(hatched) == 1 and "1 hatched = masked" in ax.get_title()
    ((_, fig),) = figure_for("single_task")(out["single_task"])
    bars = [c for a in fig.axes for c in a.containers if isinstance(c, ErrorbarContainer)]
    assert bars, "the intervals are not drawn"
    ratio = next(a for a in fig.axes if a.get_title().startswith("forget ratio"))
    assert "bootstrap over examples" in ratio.get_title()
