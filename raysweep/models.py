"""Models: built-in tiny GPT-2 / GPT-J / Llama for CPU runs, or any hub name / local directory.

A built-in model is a real transformers model built from a config, with a byte-level BPE
tokenizer trained locally on the built-in tasks' text, then given a short LM pretraining on
a mixture of those tasks (with some answers flipped) so that it starts with partial skill,
as a real pretrained model does. The result is cached under the store's models/ directory,
keyed by everything that determines it, and every trial loads the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTJConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from raysweep.errors import BadInput
from raysweep.reproducible import adamw, pin_cpu_numerics
from raysweep.spec import ModelSpec, locate_gguf
from raysweep.store import replacing_dir

# Bump when the tokenizer recipe, tiny configs or pretraining recipe change: it keys the cache.
BUILTIN_RECIPE = 6
# Fraction of the pretraining steps over which the learning rate warms up before its cosine decay.
_PRETRAIN_WARMUP = 0.05
# Above this size the built-in pretraining may use a GPU (and its weights depend on the machine).
_CPU_PRETRAIN_MAX_PARAMS = 20_000_000
EOS = "<|endoftext|>"
BOS = "<s>"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def builtin_key(spec: ModelSpec) -> str:
    ident = {
        "recipe": BUILTIN_RECIPE,
        "arch": spec.arch,
        "tiny": spec.tiny.model_dump(),
        "pretrain": spec.pretrain.model_dump(),
    }
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    return f"{spec.name}-{spec.arch}-{digest}"


def _builtin_corpus(seed: int) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Plain sentences and (prompt, right answer, wrong answer) triples of the built-in tasks."""
    from raysweep.tasks import get_task
    from raysweep.tasks.base import binarise
    from raysweep.tasks.builtin import BUILTIN_TASKS

    texts: list[str] = []
    triples: list[tuple[str, str, str]] = []
    for name in BUILTIN_TASKS:
        task = get_task(name)
        texts.extend(task.pretraining_text(random.Random(seed)))
        for split, records in task.generate(seed).items():
            for i, rec in enumerate(records):
                prompt, choices, gold = task.render(rec)
                binary = binarise(name, split, i, choices, gold, seed)
                if binary is not None:
                    (pair, g) = binary
                    triples.append((prompt, pair[g], pair[1 - g]))
    return texts, triples


def train_tokenizer(vocab_size: int, add_bos: bool, seed: int = 0) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts, triples = _builtin_corpus(seed)
    corpus = texts + [f"{p} {a}" for p, a, _ in triples] + [f"{p} {b}" for p, _, b in triples]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if add_bos:
        # Llama-style tokenizers prepend BOS by default; scoring must see the same.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=BOS, pad_token=EOS, unk_token=None, model_max_length=100_000
    )


def build_tiny(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    t = spec.tiny
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.arch == "gpt2":
        cfg = GPT2Config(n_layer=t.layers, n_embd=t.hidden, n_head=t.heads, n_positions=t.max_positions, **ids)
    elif spec.arch == "gptj":
        cfg = GPTJConfig(
            n_layer=t.layers,
            n_embd=t.hidden,
            n_head=t.heads,
            n_positions=t.max_positions,
            rotary_dim=t.hidden // t.heads // 2 * 2,
            **ids,
        )
    elif spec.arch == "llama":
        cfg = LlamaConfig(
            num_hidden_layers=t.layers,
            hidden_size=t.hidden,
            intermediate_size=t.hidden * 8 // 3 // 8 * 8 or 8,
            num_attention_heads=t.heads,
            num_key_value_heads=t.heads,
            max_position_embeddings=t.max_positions,
            tie_word_embeddings=True,
            **ids,
        )
    else:  # pragma: no cover - the spec's Literal guards this
        raise BadInput(f"model {spec.name}: unknown arch {spec.arch!r}")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def pretrain_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, seed: int = 0) -> float:
    """Short causal-LM pretraining on a noisy mixture of the built-in tasks. Returns final loss."""
    cfg = spec.pretrain
    rng = random.Random(f"pretrain:{seed}")
    texts, triples = _builtin_corpus(seed + 7919)  # a different draw than any sweep's data seed
    rng.shuffle(triples)
    # (text, number of leading characters that carry no loss): the task answers carry the
    # signal, so the templated prompts are not where a few hundred steps should go.
    docs: list[tuple[str, int]] = []
    for prompt, right, wrong in triples[: cfg.examples_per_task * 6]:
        answer = wrong if rng.random() < cfg.label_noise else right
        docs.append((f"{prompt} {answer}{EOS}", len(prompt)))
    docs += [(t + EOS, 0) for t in texts]
    # Small models train on one CPU thread: the cache key names no device or machine, so the
    # weights must come out bit-identical everywhere (GPU kernels and thread counts each sum
    # in their own order). A GPT-2-sized "tiny" model (the GPU check) would take minutes on a
    # CPU, and goes to the GPU where there is one.
    large = sum(p.numel() for p in model.parameters()) > _CPU_PRETRAIN_MAX_PARAMS
    device = "cuda" if large and torch.cuda.is_available() else "cpu"
    model.to(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_loop(model, tokenizer, docs, cfg, rng, device, seed)
    finally:
        torch.set_num_threads(threads)
        model.to("cpu")
        model.eval()


def _pretrain_loop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    docs: list[tuple[str, int]],
    cfg,
    rng: random.Random,
    device: str,
    seed: int,
) -> float:
    torch.manual_seed(seed)
    opt = adamw(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    # At a constant rate the skills a batch-8 run has just picked up come and go from one
    # few hundred steps to the next (sentiment 0.54, 0.99, 0.59 at steps 600, 900, 1200), and
    # a skill caught on its way up is one the first fine-tuning epochs knock over again.
    # `lr_schedule: cosine` decays to zero and lands on a settled model.
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda i: pretrain_lr_factor(i, cfg.steps))
        if cfg.lr_schedule == "cosine"
        else None
    )
    model.train()
    loss_val = float("nan")
    for step in range(cfg.steps):
        batch = [docs[rng.randrange(len(docs))] for _ in range(cfg.batch_size)]
        enc = tokenizer([d for d, _ in batch], return_tensors="pt", padding=True, return_offsets_mapping=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        # Mask tokens that end inside the unweighted prefix.
        labels = labels.masked_fill(
            enc["offset_mapping"][..., 1] <= torch.tensor([n for _, n in batch]).unsqueeze(1), -100
        )
        out = model(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            labels=labels.to(device),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = float(out.loss.detach())
    return loss_val


def pretrain_lr_factor(step: int, steps: int) -> float:
    """Multiplier of the pretraining learning rate at `step` (0-based): linear warm-up, then cosine to zero."""
    warm = max(1, int(steps * _PRETRAIN_WARMUP))
    return min(1.0, (step + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def ensure_builtin(spec: ModelSpec, models_dir: Path) -> Path:
    """Build, pretrain and cache a built-in model once; later calls return the cached path."""
    # Every process that trains or scores a built-in model comes through here (trials via
    # load_model) before its first tensor arithmetic.
    pin_cpu_numerics()
    target = Path(models_dir) / builtin_key(spec)
    if (target / "READY").exists():
        return target
    tokenizer = train_tokenizer(spec.tiny.vocab, add_bos=spec.arch == "llama")
    model = build_tiny(spec, tokenizer)
    loss = pretrain_tiny(model, tokenizer, spec)
    return _publish(model, tokenizer, target, {"pretrain_loss": loss})


def _publish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, ready: dict) -> Path:
    """Save into a private folder, then rename it to `target`, so that concurrent builders
    never see half a model; READY (with `ready` in it) is written last."""
    with replacing_dir(target, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "READY").write_text(json.dumps(ready))
    return target


def find_gguf(ref: str) -> Path:
    try:
        return locate_gguf(ref)
    except ValueError as exc:
        raise BadInput(f"gguf: {exc}") from None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_cache_dir(source: Path, digest: str, models_dir: Path) -> Path:
    """Where a GGUF file's dequantised copy lives: keyed by content, not by path."""
    return Path(models_dir) / f"gguf-{source.stem}-{digest[:12]}"


def ensure_gguf(spec: ModelSpec, models_dir: Path) -> Path:
    """Dequantise a GGUF model once into a float32 checkpoint under the store's models/,
    keyed by the file's content hash: transformers spends most of a minute dequantising a
    135M-parameter file, which every trial would otherwise repeat."""
    source = find_gguf(spec.gguf)
    digest = file_digest(source)
    target = gguf_cache_dir(source, digest, models_dir)
    if (target / "READY").exists():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as exc:
        raise BadInput(f"model {spec.name}: cannot load GGUF file {str(source)!r} ({_first_line(exc)})") from None
    # The weights are plain floats now; the quantisation record would make transformers refuse to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return _publish(model, tokenizer, target, {"gguf": str(source), "sha256": digest})


def ensure_model(spec: ModelSpec, models_dir: Path) -> None:
    """Everything a trial would otherwise build on first use, done once by the driver."""
    if spec.builtin:
        ensure_builtin(spec, models_dir)
    elif spec.gguf is not None:
        ensure_gguf(spec, models_dir)


def resolve_path(spec: ModelSpec, models_dir: Path) -> str:
    if spec.builtin:
        return str(ensure_builtin(spec, models_dir))
    if spec.gguf is not None:
        return str(ensure_gguf(spec, models_dir))
    return str(spec.path)


def model_source(spec: ModelSpec) -> str:
    if spec.builtin:
        return f"builtin:{spec.arch}"
    return f"gguf:{spec.gguf}" if spec.gguf is not None else str(spec.path)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load_model(spec: ModelSpec, models_dir: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model + tokenizer. Built-in ones come from the cache (built on first use), GGUF
    files from their dequantised copy; others by hub name or local path with
    AutoModelForCausalLM / AutoTokenizer. Remote code stays off unless the spec turns it on."""
    path = resolve_path(spec, models_dir)
    dtype = DTYPES[spec.dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BadInput(
            f"model {spec.name}: cannot load {path!r} ({_first_line(exc)}); give a local directory, or a hub name with "
            "network access (set HF_HUB_OFFLINE=1 to use only the local cache)"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec.name)
