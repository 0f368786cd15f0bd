"""How fast a sweep's tokens go: model shapes and tokenizers for the plan, a GPU's peak at an
assumed MFU, or this CPU's measured rate from a short timed pass of the real scorer and
trainer on the sweep's own examples."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raysweep.cost import FLOAT_BYTES, ModelShape, SliceTokens, SweepCost, makespan, planned_trials, trial_slices
from raysweep.errors import BadInput, TaskLoadError
from raysweep.methods import nll_loss
from raysweep.models import (
    build_tiny,
    builtin_key,
    file_digest,
    find_gguf,
    gguf_cache_dir,
    load_model,
    pretrain_tiny,
    train_tokenizer,
)
from raysweep.reproducible import pin_cpu_numerics
from raysweep.scoring import model_max_length, score_examples
from raysweep.spec import ModelSpec, SweepSpec
from raysweep.tasks.base import PreparedTask, prepare_task
from raysweep.train import build_batches, make_optimizer, train_epoch

# Dense tensor-core peaks (TFLOP/s) from the vendors' data sheets: 16-bit, and TF32 for fp32 training.
GPU_PEAK_TFLOPS = {
    "h100": {"16bit": 989.0, "fp32": 494.0},
    "h200": {"16bit": 989.0, "fp32": 494.0},
    "a100": {"16bit": 312.0, "fp32": 156.0},
    "l40s": {"16bit": 362.0, "fp32": 183.0},
    "a10g": {"16bit": 70.0, "fp32": 35.0},
    "v100": {"16bit": 125.0, "fp32": 15.7},
}
# Shapes of the hub models the specs name, for planning on a machine that cannot reach the
# hub (the models' published configs): (layers, hidden, vocab, window, parameters, embedding parameters).
KNOWN_SHAPES = {
    "meta-llama/Llama-2-7b-hf": (32, 4096, 32000, 4096, 6_738_415_616, 2 * 32000 * 4096),
    "EleutherAI/gpt-j-6b": (28, 4096, 50400, 2048, 6_050_882_784, 2 * 50400 * 4096),
    "openai-community/gpt2": (12, 768, 50257, 1024, 124_439_808, 50257 * 768 + 1024 * 768),
}


def _meta_shape(name: str, config, weight_bytes: int, source: str) -> ModelShape:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    get = lambda *keys: next(int(getattr(config, k)) for k in keys if getattr(config, k, None))  # noqa: E731
    return ModelShape(
        name,
        params,
        embedding,
        get("num_hidden_layers", "n_layer"),
        get("hidden_size", "n_embd"),
        get("vocab_size"),
        get("max_position_embeddings", "n_positions", "n_ctx"),
        weight_bytes,
        source,
    )


def model_shape_and_tokenizer(spec: ModelSpec, stand_in_tokenizer: str | None = None):
    """(ModelShape, tokenizer) without loading weights or writing anything: built-in models
    from their config, GGUF files from their metadata, others from their config and
    tokenizer files (local or the hub cache), else the published shapes above with a stand-in tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    weight_bytes = FLOAT_BYTES[spec.dtype]
    if spec.builtin:
        tok = train_tokenizer(spec.tiny.vocab, add_bos=spec.arch == "llama")
        with torch.device("meta"):
            config = build_tiny(spec, tok).config
        return _meta_shape(spec.name, config, weight_bytes, "built-in config"), tok
    if spec.gguf is not None:
        path = find_gguf(spec.gguf)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return _meta_shape(spec.name, config, weight_bytes, f"GGUF {path.name}"), tok
    ref = str(spec.path)
    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=spec.trust_remote_code)
        shape = _meta_shape(spec.name, config, weight_bytes, "config")
    except (OSError, ValueError):
        if ref not in KNOWN_SHAPES:
            raise BadInput(
                f"model {spec.name}: cannot read the config of {ref!r} (no local copy, no hub access)"
            ) from None
        layers, hidden, vocab, window, params, emb = KNOWN_SHAPES[ref]
        shape = ModelShape(spec.name, params, emb, layers, hidden, vocab, window, weight_bytes, "published config")
    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError):
        if stand_in_tokenizer is None:
            raise BadInput(
                f"model {spec.name}: cannot load the tokenizer of {ref!r}; pass --tokenizer REF to count with a stand-in"
            ) from None
        tok = load_tokenizer_ref(stand_in_tokenizer)
        shape = ModelShape(**{**vars(shape), "source": f"{shape.source}; tokens counted with {stand_in_tokenizer}"})
    return shape, tok


def load_tokenizer_ref(ref: str):
    """A tokenizer by local directory, hub name, or GGUF reference (`package/file.gguf` or a path)."""
    from transformers import AutoTokenizer

    if ref.endswith(".gguf"):
        path = find_gguf(ref)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    try:
        return AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise BadInput(f"--tokenizer: cannot load {ref!r} ({str(exc).splitlines()[0][:200]})") from None


@dataclass(frozen=True)
class GpuRate:
    gpu: str
    gpus: int
    mfu: float

    def peak_flops(self, precision: str) -> float:
        return GPU_PEAK_TFLOPS[self.gpu]["fp32" if precision == "fp32" else "16bit"] * 1e12

    def trial_seconds(self, cost: SweepCost, bound: str) -> list[float]:
        return [
            sum(t.flops(bound).values()) / (self.peak_flops(t.plan.train.precision) * self.mfu) for t in cost.trials
        ]

    def wall_seconds(self, cost: SweepCost, bound: str) -> float:
        per_trial = max(1, int(round(cost.spec.resources.gpu)) or 1)
        return makespan(self.trial_seconds(cost, bound), self.gpus // per_trial)


def gpu_rate(gpu: str, gpus: int, mfu: float) -> GpuRate:
    key = gpu.lower().replace("-", "").replace(" ", "")
    if key not in GPU_PEAK_TFLOPS:
        raise BadInput(f"--gpu: unknown GPU {gpu!r} (known: {', '.join(sorted(GPU_PEAK_TFLOPS))})")
    if gpus < 1:
        raise BadInput(f"--gpus: need at least one GPU (got {gpus})")
    if not 0 < mfu <= 1:
        raise BadInput(f"--mfu: must be in (0, 1] (got {mfu})")
    return GpuRate(key, gpus, mfu)


@dataclass
class CpuRate:
    """Seconds per token trained and scored, measured on this machine with the trial's thread
    count, plus what each trial and the sweep pay before their first epoch."""

    train_s_per_token: dict[str, float]
    score_s_per_token: dict[str, float]
    trial_setup_s: float  # a Ray worker importing the trial code and loading model and data
    sweep_setup_s: dict[
        str, float
    ]  # the driver's imports, data and Ray start; pretraining built-in models not yet cached
    cpus: int

    def trial_seconds(self, cost: SweepCost, bound: str) -> list[float]:
        return [
            self.trial_setup_s
            + sum(t.trained_tokens(bound).values()) * self.train_s_per_token[t.model.name]
            + t.scored_tokens(bound) * self.score_s_per_token[t.model.name]
            for t in cost.trials
        ]

    def wall_seconds(self, cost: SweepCost, bound: str) -> float:
        slots = max(1, int(self.cpus // cost.spec.resources.cpu))
        return sum(self.sweep_setup_s.values()) + makespan(self.trial_seconds(cost, bound), slots)


_STARTUP_PROBE = """
import logging, time
t0 = time.perf_counter()
import ray, raysweep.sweep, raysweep.trial
t1 = time.perf_counter()
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
ray.shutdown()
print(t1 - t0, time.perf_counter() - t1)
"""


def _startup_seconds() -> tuple[float, float]:
    """A fresh process importing what a trial worker imports, then starting and stopping a
    local Ray cluster: the real start-up costs of a worker and of the driver, measured here."""
    out = subprocess.run([sys.executable, "-c", _STARTUP_PROBE], check=True, capture_output=True, text=True)
    imports, ray_start = (float(x) for x in out.stdout.split()[-2:])
    return imports, ray_start


def calibrate_cpu(
    spec: SweepSpec,
    data: dict[str, PreparedTask],
    models_dir: Path,
    sample: int = 48,
    batches: int = 4,
    data_seconds: float = 0.0,
) -> CpuRate:
    """Time the real scorer on a seeded sample of the first trial's scored examples and the
    real trainer on a few batches of its training set, per model, with the trial's threads."""

    pin_cpu_numerics()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    train_rate, score_rate, sweep_setup = {}, {}, {}
    load_s = 0.0
    try:
        plans = planned_trials(spec, data)
        for model_spec in spec.models:
            plan = next(p for p in plans if p.model.name == model_spec.name)
            t0 = time.perf_counter()
            cached = model_spec.builtin and (models_dir / builtin_key(model_spec) / "READY").exists()
            if model_spec.builtin and not cached:
                # Same architecture and speed as the pretrained one; pretraining is timed on a few steps.
                tok = train_tokenizer(model_spec.tiny.vocab, add_bos=model_spec.arch == "llama")
                model = build_tiny(model_spec, tok)
                steps = min(20, model_spec.pretrain.steps)
                short = model_spec.model_copy(
                    update={"pretrain": model_spec.pretrain.model_copy(update={"steps": steps})}
                )
                t1 = time.perf_counter()
                pretrain_tiny(model, tok, short)
                sweep_setup[model_spec.name] = (time.perf_counter() - t1) * model_spec.pretrain.steps / steps
            else:
                model, tok = _load_for_timing(model_spec, models_dir)
                load_s = max(load_s, time.perf_counter() - t0)
            flat = [ex for _, _, exs in trial_slices(plan, data) for ex in exs]
            picked = random.Random(0).sample(flat, min(sample, len(flat)))
            score_examples(
                model, tok, picked[:4], batch_size=plan.scoring.batch_size, layers=plan.scoring.layers
            )  # warm-up
            t0 = time.perf_counter()
            score_examples(
                model,
                tok,
                picked,
                batch_size=plan.scoring.batch_size,
                capture_hidden=plan.scoring.hidden_states != "none",
                layers=plan.scoring.layers,
            )
            seconds = time.perf_counter() - t0
            tokens = SliceTokens.count("sample", "all", picked, tok, model_max(model, tok)).scored
            score_rate[model_spec.name] = seconds / max(tokens, 1)

            cfg = plan.phases.finetune
            train_set = data[plan.forget_task].split("train")[: min(plan.size, batches * cfg.batch_size)]
            built = build_batches(
                tok, model, train_set, [ex.gold for ex in train_set], cfg.batch_size, random.Random(0)
            )
            opt = make_optimizer(model, cfg, None)
            train_epoch(model, opt, built[:1], nll_loss)  # warm-up
            t0 = time.perf_counter()
            train_epoch(model, opt, built, nll_loss)
            seconds = time.perf_counter() - t0
            train_rate[model_spec.name] = seconds / max(int(sum(b.attention_mask.sum() for b in built)), 1)
    finally:
        torch.set_num_threads(threads)

    imports, ray_start = _startup_seconds()
    sweep_setup["driver: imports, data, Ray start"] = imports + data_seconds + ray_start
    return CpuRate(train_rate, score_rate, imports + load_s, sweep_setup, os.cpu_count() or 1)


def _load_for_timing(spec: ModelSpec, models_dir: Path):
    """The model as trials load it; a GGUF file not yet dequantised into the cache is
    dequantised in memory only (planning writes nothing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.gguf is not None:
        path = find_gguf(spec.gguf)
        if not (gguf_cache_dir(path, file_digest(path), models_dir) / "READY").exists():
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return model, tok
    lm = load_model(spec, models_dir)
    return lm.model, lm.tokenizer


def model_max(model, tok) -> int:

    return model_max_length(model, tok)


def prepare_plan_data(spec: SweepSpec) -> tuple[dict[str, PreparedTask], dict[str, str]]:
    """Each task prepared as its trials would see it; a task whose data cannot be read here
    is left out with the reason (the plan estimates it from the others)."""

    trained = set(spec.trained_task_list)
    data, missing = {}, {}
    for name in spec.tasks:

        def prepare(need_train: bool) -> PreparedTask:
            return prepare_task(
                name,
                seed=spec.data.seed,
                cap=spec.data.cap,
                max_chars=spec.data.max_chars,
                source=spec.data.sources.get(name),
                need_train=need_train,
            )

        try:
            data[name] = prepare(name in trained)
        except (BadInput, TaskLoadError) as exc:
            reason = str(exc).splitlines()[0]
            try:  # a forget task whose train split is not here is still counted on its other splits
                data[name] = prepare(False)
                missing[name] = "no train split here: its training examples are sized from the other tasks"
            except (BadInput, TaskLoadError):
                missing[name] = reason[:160]
    return data, missing


def observed_epochs(store, models: list[str]) -> dict[str, float] | None:
    """Mean epochs per phase of the finished trials in `store` of these models, or None."""

    if store is None or not store.exists():
        return None
    trials = [r for r in store.trials().to_pylist() if r["status"] == "done" and r["model"] in models]
    if not trials:
        return None
    done = {r["trial_id"] for r in trials}
    per: dict[str, dict[str, int]] = {}
    for r in store.read("epochs", columns=["trial_id", "phase", "epoch"]).to_pylist():
        if r["trial_id"] in done and r["phase"] != "pretrained":
            per.setdefault(r["phase"], {})
            per[r["phase"]][r["trial_id"]] = max(per[r["phase"]].get(r["trial_id"], 0), r["epoch"])
    return {ph: float(np.mean(list(v.values()))) for ph, v in per.items()}
