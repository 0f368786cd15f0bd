"""Lineage: what produced a trial's results besides its plan (code, library versions, model
files, data, device), recorded in its trials row; and `raysweep diff`, which compares two
stores' trials of the same id field by field and by their headline accuracies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raysweep.errors import BadInput
from raysweep.models import builtin_key, file_digest
from raysweep.spec import ModelSpec, TrialPlan, locate_gguf
from raysweep.store import Store
from raysweep.summary import summarize

# Distribution names whose versions a row records, by column.
PACKAGES = {
    "raysweep_version": "raysweep",
    "torch_version": "torch",
    "transformers_version": "transformers",
    "ray_version": "ray",
    "deepspeed_version": "deepspeed",
    "lm_eval_version": "lm-eval",
}
LINEAGE_FIELDS = (
    *PACKAGES,
    "git_commit",
    "model_revision",
    "data_digest",
    "device",
    "dtype",
    "precision",
    "world_size",
)
# Weight and config files whose names and sizes stand for a local model directory's content
# (hashing gigabytes of weights on every status write would cost more than the trial step).
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """HEAD of the checkout raysweep is imported from; None for an installed copy."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    # A site-packages copy inside some other repository is not a raysweep checkout.
    if (
        out.returncode != 0
        or len(lines) != 2
        or not here.is_relative_to(Path(lines[0]))
        or not (Path(lines[0]) / "pyproject.toml").is_file()
    ):
        return None
    return lines[1]


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str | None]:
    """Per process: versions do not change while it runs."""
    return {**{col: _version(dist) for col, dist in PACKAGES.items()}, "git_commit": _git_commit()}


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:

    return file_digest(Path(path))


def _dir_digest(folder: Path) -> str | None:
    cfg = folder / "config.json"
    try:
        commit = json.loads(cfg.read_text()).get("_commit_hash") if cfg.is_file() else None
    except (OSError, ValueError, AttributeError):
        commit = None
    if commit:
        return f"commit:{commit}"
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and (p.name in _MODEL_FILES or p.suffix in _WEIGHT_SUFFIXES)
    )
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
    return f"files:{h.hexdigest()[:16]}"


def model_revision(spec: ModelSpec) -> str | None:
    """What identifies the model's weights: the built-in recipe key, a GGUF file's sha256,
    a local directory's commit hash or file listing, a hub model's cached snapshot."""
    if spec.builtin:
        return f"builtin:{builtin_key(spec)}"
    if spec.gguf is not None:
        try:
            p = locate_gguf(spec.gguf)
            st = p.stat()
        except (OSError, ValueError):
            return None
        return f"sha256:{_file_sha256(str(p), st.st_size, st.st_mtime_ns)}"
    folder = Path(spec.path).expanduser()
    if folder.is_dir():
        return _dir_digest(folder)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.path, "config.json")
    except Exception:  # noqa: BLE001 - not a hub name, or no hub library: unknown
        return None
    if isinstance(cached, str) and "/snapshots/" in cached:
        return f"commit:{Path(cached).parent.name}"
    return None


def lineage_fields(plan: TrialPlan) -> dict:
    """The lineage columns of a trial's row, as the process writing it sees them."""
    import torch

    gpu = plan.resources.gpu > 0 and torch.cuda.is_available()
    return {
        **environment(),
        "model_revision": model_revision(plan.model),
        "data_digest": json.dumps(plan.data_digest, sort_keys=True) if plan.data_digest else None,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "dtype": plan.model.dtype,
        "precision": plan.train.precision,
        "world_size": plan.resources.n_workers,
    }


# ---- diff ---------------------------------------------------------------------------------

HEADLINES = ("finetuned_test_acc", "forgotten_test_acc", "forgotten_train_acc", "forget_ratio")


@dataclass
class TrialDiff:
    trial_id: str
    sweep: str
    status: tuple[str | None, str | None]
    # field -> (value in A, value in B), only for fields that differ
    fields: dict[str, tuple[object, object]] = field(default_factory=dict)
    # headline -> B - A (None where either side has none)
    deltas: dict[str, float | None] = field(default_factory=dict)
    values: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


@dataclass
class StoreDiff:
    a: str
    b: str
    common: list[TrialDiff]
    only_a: list[str]
    only_b: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def _open(root: Path):

    store = Store(root)
    if not store.root.exists():
        raise BadInput(f"store: no such directory {str(store.root)!r}")
    if not store.exists():
        raise BadInput(f"store: no raysweep store at {str(store.root)!r} (no store.json)")
    store.check_version()
    return store


def _headlines(store) -> dict[tuple[str, str], dict[str, float | None]]:

    out = {}
    for s in summarize(store):
        out[(s.model, s.trial_id)] = {h: _finite(getattr(s, h)) for h in HEADLINES}
    return out


def _finite(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def diff_stores(root_a: str | Path, root_b: str | Path) -> StoreDiff:
    """Trials with the same id in both stores: which lineage fields differ, and how far
    their headline accuracies moved (B minus A). Trials of superseded versions are left out."""
    a, b = _open(Path(root_a)), _open(Path(root_b))
    rows_a = {r["trial_id"]: r for r in a.trials().to_pylist() if r["status"] != "superseded"}
    rows_b = {r["trial_id"]: r for r in b.trials().to_pylist() if r["status"] != "superseded"}
    head_a = {tid: v for (_, tid), v in _headlines(a).items()}
    head_b = {tid: v for (_, tid), v in _headlines(b).items()}
    common = []
    for tid in sorted(rows_a.keys() & rows_b.keys()):
        ra, rb = rows_a[tid], rows_b[tid]
        d = TrialDiff(tid, ra["sweep"], (ra["status"], rb["status"]))
        for col in LINEAGE_FIELDS:
            va, vb = ra.get(col), rb.get(col)
            if va != vb:
                d.fields[col] = (va, vb)
        for h in HEADLINES:
            va, vb = head_a.get(tid, {}).get(h), head_b.get(tid, {}).get(h)
            d.values[h] = (va, vb)
            d.deltas[h] = None if va is None or vb is None else vb - va
        common.append(d)
    return StoreDiff(
        str(a.root), str(b.root), common, sorted(rows_a.keys() - rows_b.keys()), sorted(rows_b.keys() - rows_a.keys())
    )


def _cell(v: object) -> str:
    if v is None:
        return "-"
    s = str(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _delta(v: float | None) -> str:
    return "-" if v is None else f"{v:+.3f}"


def render_diff(d: StoreDiff) -> list:
    """A rich table of the shared trials, then one line per trial held by one store only."""
    from rich.table import Table

    t = Table(title=f"{len(d.common)} trial(s) in both stores · A {d.a} · B {d.b}", title_justify="left")
    for col in ("trial", "status A/B", "differs (A -> B)", *(f"Δ {h}" for h in HEADLINES)):
        t.add_column(col)
    for c in d.common:
        fields = (
            "\n".join(f"{k}: {_cell(a)} -> {_cell(b)}" for k, (a, b) in c.fields.items()) or "[green]no difference[/]"
        )
        t.add_row(c.trial_id, f"{c.status[0]}/{c.status[1]}", fields, *(_delta(c.deltas[h]) for h in HEADLINES))
    out: list = [t]
    out += [f"only in A: {tid}" for tid in d.only_a]
    out += [f"only in B: {tid}" for tid in d.only_b]
    return out
