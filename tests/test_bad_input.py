"""Bad input is refused with exit code 2, one line naming the field and the problem, and
nothing written to the store; specs, stores and models never run code they carry.

The corpus is tests/bad_specs/*.yaml with its table of expected messages, expected.tsv.
Most cases go through the real CLI in-process (typer's CliRunner); a handful go through
`raysweep run` as a subprocess, including the one refused only once a Ray cluster is up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from raysweep.cli import app
from raysweep.errors import BadInput
from raysweep.spec import ModelSpec, load_spec, parse_spec
from scripts.reliability import expected_rejections, make_bad_inputs, one_error_line, snapshot
from tests.spec_helpers import tiny_spec_text

BAD = Path(__file__).parent / "bad_specs"
TABLE = expected_rejections()
REPO = Path(__file__).resolve().parents[1]


def _state(store: Path):
    return snapshot(store) if store.is_dir() else ("file" if store.exists() else None)


def _cli_in_process(*args: str):
    return CliRunner().invoke(app, list(args))


def _cli_subprocess(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysweep.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _assert_refused(code: int, stdout: str, stderr: str, field: str, problem: str) -> str:
    line = one_error_line(stderr)
    assert code == 2, (code, stdout[-500:], stderr[-1500:])
    assert line is not None, f"not exactly one error line: {stderr!r}"
    assert field in line and problem in line, line
    assert not stdout.strip(), stdout
    return line


def test_corpus_is_large_and_every_file_has_an_expected_message():
    files = {p.name for p in BAD.glob("*.yaml")}
    assert len(files) >= 30
    assert files == set(TABLE), files ^ set(TABLE)
    assert {r["stage"] for r in TABLE.values()} == {"spec", "data", "cluster"}


@pytest.mark.parametrize("name", sorted(n for n, r in TABLE.items() if r["stage"] == "spec"))
def test_malformed_spec_is_refused_by_the_parser_naming_the_field(name, monkeypatch):
    monkeypatch.chdir(REPO)  # a few cases name folders of the corpus relative to the repository
    with pytest.raises(BadInput) as exc:
        load_spec(BAD / name)
    msg = str(exc.value)
    assert "\n" not in msg and TABLE[name]["field"] in msg and TABLE[name]["problem"] in msg, msg


@pytest.mark.parametrize("name", sorted(n for n, r in TABLE.items() if r["stage"] in ("spec", "data")))
def test_malformed_spec_through_the_cli_exits_2_with_one_line_and_writes_nothing(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    store = tmp_path / "store"
    r = _cli_in_process("run", str(BAD / name), "--store", str(store), "--no-dashboard")
    _assert_refused(r.exit_code, r.stdout, r.stderr, TABLE[name]["field"], TABLE[name]["problem"])
    assert not store.exists()


@pytest.mark.parametrize(
    "case",
    [
        "store_is_a_file",
        "store_not_writable",
        "store_below_a_file",
        "store_newer_schema",
        "data_missing_split",
        "data_nonbinary_labels",
    ],
)
def test_bad_store_or_data_folder_exits_2_with_one_line_and_writes_nothing(case, tmp_path):
    c = next(c for c in make_bad_inputs(tmp_path) if c["name"] == case)
    before = _state(c["store"])
    r = _cli_in_process("run", str(c["spec"]), "--store", str(c["store"]), "--no-dashboard")
    _assert_refused(r.exit_code, r.stdout, r.stderr, c["field"], c["problem"])
    assert _state(c["store"]) == before


def test_store_that_exists_but_cannot_be_written_is_refused_even_for_root(tmp_path):
    # os.access() answers yes to root for any directory; the check must really try.
    from raysweep.store import Store

    with pytest.raises(BadInput, match="not writable"):
        Store.check_writable("/proc/raysweep-store")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BadInput, match="not writable"):
            Store.check_writable(locked / "store")


# ---- through `raysweep run` as a real subprocess --------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "yaml_unclosed_bracket.yaml",
        "unknown_phase_key.yaml",
        "lr_negative.yaml",
        "duplicate_seeds.yaml",
        "sizes_exceed_data.yaml",
        "data_source_missing_folder.yaml",
    ],
)
def test_subprocess_run_refuses_bad_spec(name, tmp_path):
    store = tmp_path / "store"
    r = _cli_subprocess("run", str(BAD / name), "--store", str(store))
    _assert_refused(r.returncode, r.stdout, r.stderr, TABLE[name]["field"], TABLE[name]["problem"])
    assert not store.exists()


def test_subprocess_python_object_spec_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f'!!python/object/apply:os.system ["touch {sentinel}"]\n')
    also = tmp_path / "evil2.yaml"
    also.write_text(
        tiny_spec_text(name="x").replace(
            "name: x", f'name: !!python/object/apply:subprocess.check_call [["touch", "{sentinel}"]]'
        )
    )
    for path in (spec, also):
        r = _cli_subprocess("run", str(path), "--store", str(tmp_path / "store"))
        _assert_refused(r.returncode, r.stdout, r.stderr, "invalid YAML", "is not allowed")
    assert not sentinel.exists() and not (tmp_path / "store").exists()


def test_subprocess_newer_store_schema_is_refused_by_run_and_status(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "store.json").write_text(json.dumps({"schema_version": 99}))
    spec = tmp_path / "s.yaml"
    spec.write_text(tiny_spec_text(name="s"))
    before = snapshot(store)
    for args in (("run", str(spec), "--store", str(store)), ("status", "--store", str(store))):
        r = _cli_subprocess(*args)
        _assert_refused(r.returncode, r.stdout, r.stderr, "store:", "newer raysweep (schema v99)")
    assert snapshot(store) == before


@pytest.mark.slow
def test_subprocess_unmeetable_gpu_request_is_refused_after_ray_starts_and_writes_nothing(tmp_path):
    name = "resources_gpu_unmeetable.yaml"
    store = tmp_path / "store"
    # As a user runs it: no RAY_AUTH_MODE, so Ray's token auth is on by default, and still the
    # refusal is the only line (Ray announces default token auth in a warning of its own).
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run(
        [sys.executable, "-m", "raysweep.cli", "run", str(BAD / name), "--store", str(store), "--no-dashboard"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    _assert_refused(r.returncode, r.stdout, r.stderr, TABLE[name]["field"], TABLE[name]["problem"])
    assert not store.exists()


# ---- safety -----------------------------------------------------------------------------


def test_remote_code_in_a_model_folder_is_not_run_unless_the_spec_says_so(tmp_path, monkeypatch):
    from raysweep.models import load_model, train_tokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    train_tokenizer(300, add_bos=False).save_pretrained(folder)
    sentinel = tmp_path / "remote-code-ran"
    # A model whose class exists only in code shipped with it: loading needs that code run.
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "raysweep_remote",
                "auto_map": {"AutoConfig": "remote.Cfg", "AutoModelForCausalLM": "remote.Model"},
            }
        )
    )
    (folder / "remote.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    # The spec refuses it before anything runs (the trials would only find out one by one).
    with pytest.raises(ValidationError, match="needs remote code"):
        ModelSpec(name="remote", path=str(folder))
    refused = _spec_with_model(tmp_path, f"{{name: remote, path: {folder}}}")
    r = _cli_in_process("run", str(refused), "--store", str(tmp_path / "st"))
    _assert_refused(r.exit_code, r.stdout, r.stderr, "models.0", "needs remote code (config.json has an auto_map)")
    assert not (tmp_path / "st").exists()
    # The loader's own guard still holds for a spec built past validation (model_copy does not validate).
    trusted = ModelSpec(name="remote", path=str(folder), trust_remote_code=True)
    spec = trusted.model_copy(update={"trust_remote_code": False})
    with pytest.raises(BadInput, match="custom code"):
        load_model(spec, tmp_path / "models")
    assert not sentinel.exists()

    # Turned on explicitly, the flag reaches both loaders (recorded, not executed here).
    import raysweep.models as models

    seen = []

    class Stop(Exception):
        pass

    def record(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise Stop

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", record)
    with pytest.raises(Stop):
        load_model(spec.model_copy(update={"trust_remote_code": True}), tmp_path / "models")
    with pytest.raises(Stop):
        load_model(spec, tmp_path / "models")
    assert seen == [True, False]
    parsed = parse_spec(f"name: t\nmodels: [{{name: m, path: {tmp_path}}}]\ntasks: [sentiment]\n")
    assert parsed.models[0].trust_remote_code is False


def _spec_with_model(tmp_path: Path, model: str) -> Path:
    spec = tmp_path / "model.yaml"
    spec.write_text(f"name: t\nmodels: [{model}]\ntasks: [sentiment]\n")
    return spec


def test_model_paths_that_can_only_be_local_must_exist_while_hub_names_wait_for_loading(tmp_path):
    for path in ("/nonexistent/raysweep-model", "./no-such-model", "../no-such-model", "~/no-such-model"):
        with pytest.raises(BadInput, match=f"models.0: path: no such directory '{re.escape(path)}'"):
            parse_spec(_spec_with_model(tmp_path, f"{{name: m, path: '{path}'}}").read_text())
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(BadInput, match="is not a directory"):
        parse_spec(_spec_with_model(tmp_path, f"{{name: m, path: {a_file}}}").read_text())
    # A hub name is resolved by the loader (cache, network); an existing directory is accepted.
    hub = parse_spec(_spec_with_model(tmp_path, "{name: m, path: meta-llama/Llama-2-7b-hf}").read_text())
    assert hub.models[0].path == "meta-llama/Llama-2-7b-hf"
    local = parse_spec(_spec_with_model(tmp_path, f"{{name: m, path: {tmp_path}}}").read_text())
    assert local.models[0].path == str(tmp_path)
    # A folder whose config needs remote code: refused, unless the spec allows it.
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "remote.Cfg"}}))
    with pytest.raises(BadInput, match="needs remote code"):
        parse_spec(_spec_with_model(tmp_path, f"{{name: m, path: {tmp_path}}}").read_text())
    parse_spec(_spec_with_model(tmp_path, f"{{name: m, path: {tmp_path}, trust_remote_code: true}}").read_text())


def test_spec_path_that_is_not_a_small_regular_file_says_what_it_is(tmp_path):
    with pytest.raises(BadInput, match="is a directory"):
        load_spec(tmp_path)
    with pytest.raises(BadInput, match="'/dev/zero' is not a regular file"):
        load_spec("/dev/zero")
    with pytest.raises(BadInput, match="no such file"):
        load_spec(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_text(tiny_spec_text(name="big") + "description: " + "x" * 2**21 + "\n")
    with pytest.raises(BadInput, match=r"is 2\.\d MB; a spec is a small YAML file"):
        load_spec(big)
    for path in ("/dev/zero", str(big)):
        r = _cli_in_process("run", path, "--store", str(tmp_path / "st"), "--no-dashboard")
        problem = "is not a regular file" if path == "/dev/zero" else "MB; a spec is a small YAML file"
        _assert_refused(r.exit_code, r.stdout, r.stderr, "spec:", problem)
    assert not (tmp_path / "st").exists()


def test_a_hundred_thousand_seeds_validate_in_linear_time():
    import time

    from raysweep.spec import SweepSpec

    raw = {
        "name": "s",
        "models": [{"name": "m", "arch": "gpt2"}],
        "tasks": ["sentiment"],
        "seeds": list(range(100_000)),
    }
    t0 = time.perf_counter()
    SweepSpec.model_validate(raw)
    # The quadratic duplicate check took minutes here; linear takes well under a second.
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ValidationError, match=r"duplicate value\(s\) \[7\]"):
        SweepSpec.model_validate({**raw, "seeds": [*range(100_000), 7]})


def test_dashboard_binds_to_localhost_unless_told_otherwise(monkeypatch, tmp_path):
    import ray

    import raysweep.sweep as sweep

    calls = []

    class Ctx:
        dashboard_url = "127.0.0.1:8265"

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or Ctx())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sweep._init_ray(None, True)
    sweep._init_ray(None, True, dashboard_host="0.0.0.0")
    assert [c["dashboard_host"] for c in calls] == ["127.0.0.1", "0.0.0.0"]

    # The CLI's default and its --dashboard-host option reach run_sweep.
    got = []

    def fake_run_sweep(spec, text, store, **kw):
        got.append(kw["dashboard_host"])
        raise BadInput("stop here")

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    spec = tmp_path / "s.yaml"
    spec.write_text(tiny_spec_text(name="s"))
    _cli_in_process("run", str(spec), "--store", str(tmp_path / "st"))
    _cli_in_process("run", str(spec), "--store", str(tmp_path / "st"), "--dashboard-host", "0.0.0.0")
    assert got == ["127.0.0.1", "0.0.0.0"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoints_load_without_unpickling_code(tmp_path):
    """A resume point is read with weights_only: a store cannot smuggle code into a worker."""
    import pickle

    from raysweep.store import Store
    from raysweep.sweep import models_dir_for
    from raysweep.trial import TrialRunner

    spec = parse_spec(tiny_spec_text(name="w"))
    store = Store(tmp_path / "store")
    store.ensure()
    runner = TrialRunner(spec.trials()[0], store, models_dir_for(store))
    runner.ckpt_dir.mkdir(parents=True)
    sentinel = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    with open(runner.ckpt_dir / "latest.pt", "wb") as fh:
        pickle.dump({"progress": Payload()}, fh)
    # No model: the payload is refused before any weights are touched.
    progress, opt, _ = runner.resume.load(None, reload=lambda: None)
    assert progress.phase == "pretrained" and opt is None and not sentinel.exists()
    assert not (runner.ckpt_dir / "latest.pt").exists()
    assert "unreadable resume point" in (runner.ckpt_dir / "restarts.log").read_text()


# ---- analyze and report on stores they may not write -------------------------------------


@pytest.fixture
def read_only(tmp_path):
    """A read-only view of a directory: a read-only bind mount as root (root writes through
    permission bits), the permission bits otherwise."""
    made: list[tuple[str, Path]] = []

    def make(src: Path) -> Path:
        if os.geteuid() != 0:
            for p in [src, *src.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
            made.append(("chmod", src))
            return src
        view = tmp_path / f"ro-{src.name}"
        view.mkdir()
        for cmd in (["mount", "--bind", str(src), str(view)], ["mount", "-o", "remount,ro,bind", str(view)]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot make a read-only bind mount here: {r.stderr.strip()}")
        made.append(("mount", view))
        return view

    yield make
    for kind, p in made:
        if kind == "mount":
            subprocess.run(["umount", "-l", str(p)], check=False)
        else:
            for q in [p, *p.rglob("*")]:
                if q.is_dir():
                    q.chmod(0o755)


def test_analyze_refuses_a_read_only_store_in_one_line(tmp_path, read_only):
    from tests.analysis_helpers import build_minimal_store

    src = build_minimal_store(tmp_path / "store").root
    before = snapshot(src)
    r = _cli_in_process("analyze", "--store", str(read_only(src)), "--engine", "local")
    _assert_refused(r.exit_code, r.stdout, r.stderr, "store:", "is not writable")
    assert snapshot(src) == before


def test_report_writes_only_its_page_even_on_a_read_only_store(tmp_path, read_only):
    from tests.analysis_helpers import build_minimal_store

    src = build_minimal_store(tmp_path / "store").root
    before = snapshot(src)
    out = tmp_path / "out"
    r = _cli_in_process("report", "--store", str(read_only(src)), "--out", str(out))
    assert r.exit_code == 0, r.output[-2000:]
    assert [p.name for p in out.iterdir()] == ["report.html"]
    assert snapshot(src) == before  # analyses the store lacked were computed for the page only


def test_report_refuses_an_out_that_is_a_file_or_cannot_be_written(tmp_path, read_only):
    from tests.analysis_helpers import build_minimal_store

    store = build_minimal_store(tmp_path / "store").root
    before = snapshot(store)
    existing = tmp_path / "report.html"
    existing.write_text("someone's page")
    r = _cli_in_process("report", "--store", str(store), "--out", str(existing))
    _assert_refused(r.exit_code, r.stdout, r.stderr, "--out:", "is a file")
    assert existing.read_text() == "someone's page"
    locked = tmp_path / "locked"
    locked.mkdir()
    view = read_only(locked)
    r = _cli_in_process("report", "--store", str(store), "--out", str(view / "rep"))
    _assert_refused(r.exit_code, r.stdout, r.stderr, "--out:", "cannot write the report")
    assert not list(locked.iterdir()) and snapshot(store) == before
