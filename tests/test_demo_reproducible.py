"""The built-in model comes out bit-identical whatever machine builds it: thread count, hash
seed and core count change nothing, and neither does the processor (emulated Intel and AMD)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raysweep.reproducible import PINNED_ENV

BUILD = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[2]))
from raysweep.models import ensure_builtin
from raysweep.spec import ModelSpec
spec = ModelSpec(name="repro", arch="gpt2", tiny={"layers": 5, "hidden": 32, "heads": 2, "vocab": 400},
                 pretrain={"steps": 25, "batch_size": 8, "examples_per_task": 40})
path = ensure_builtin(spec, Path(sys.argv[1]))
sys.path.insert(0, sys.argv[3])
from scripts.demo_fingerprint import fingerprint
f = fingerprint(path)
print(json.dumps({"weights": f["weights_sha256"], "tokenizer": f["tokenizer_sha256"], "loss": f["pretrain_loss"],
                  "threads_after": torch.get_num_threads(), "isa": torch.backends.cpu.get_cpu_capability()}))
"""
ROOT = Path(__file__).resolve().parent.parent


def _unpinned_env() -> dict:
    """This process's environment less the CPU pins and the shared model cache: each child
    must pin (and build) for itself, as a fresh machine would."""
    drop = {*PINNED_ENV, "RAYSWEEP_MODEL_CACHE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _build(folder, threads: int, hash_seed: str) -> dict:
    env = _unpinned_env()
    env.update(PYTHONHASHSEED=hash_seed, RAYON_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-c", BUILD, str(folder), str(threads), str(ROOT)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_builtin_model_is_identical_across_thread_counts_and_processes(tmp_path):
    one = _build(tmp_path / "a", threads=1, hash_seed="1")
    two = _build(tmp_path / "b", threads=2, hash_seed="2")
    assert one["tokenizer"] == two["tokenizer"]
    assert (one["weights"], one["loss"]) == (two["weights"], two["loss"])
    # The caller's thread setting is restored; the kernels are pinned below AVX-512.
    assert (one["threads_after"], two["threads_after"]) == (1, 2)
    assert one["isa"] in ("AVX2", "DEFAULT") and two["isa"] == one["isa"]


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (Debian's qemu-user) is not installed; .ci/run installs it")
def test_pipeline_is_identical_on_emulated_intel_and_amd_processors():
    # Each processor computes approximate instructions (reciprocal square roots) its own
    # way, and qemu computes them exactly: torch's float32 square root differs on all three,
    # so before Adam took exact roots the pretrained weights already differed after 20 steps.
    script = [sys.executable, str(ROOT / "scripts" / "cpu_fingerprint.py")]
    env = _unpinned_env()
    runs = {
        "native": subprocess.Popen(script, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True),
        **{
            cpu: subprocess.Popen(
                [QEMU, "-cpu", cpu, *script], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            for cpu in ("Haswell", "EPYC")
        },
    }
    prints = {
        name: json.loads(proc.communicate(timeout=900)[0].strip().splitlines()[-1]) for name, proc in runs.items()
    }
    assert prints["native"]["cpu_capability"] == "AVX2"
    assert prints["Haswell"] == prints["native"]
    assert prints["EPYC"] == prints["native"]


DEMO_MODEL = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from raysweep.models import ensure_builtin
from raysweep.spec import load_spec
from scripts.demo_fingerprint import fingerprint
spec = load_spec(Path(sys.argv[2]) / "specs" / "quickstart.yaml")
print(json.dumps(fingerprint(ensure_builtin(spec.models[0], Path(sys.argv[1])))))
"""


@pytest.mark.slow
def test_demo_model_has_the_fingerprint_the_readme_prints(tmp_path):
    readme = (ROOT / "README.md").read_text()
    documented = re.search(r"weights sha256 `([0-9a-f]{64})`", readme).group(1)
    env = _unpinned_env()
    cmd = [sys.executable, "-c", DEMO_MODEL, str(tmp_path), str(ROOT)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    built = json.loads(out.stdout.strip().splitlines()[-1])
    assert built["weights_sha256"] == documented
