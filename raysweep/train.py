"""The training loop: plain PyTorch, one epoch at a time, loss on response tokens only.

Deliberately small (nanoGPT-style): the phase logic that decides *what* to train on lives in
`trial`, and *how the loss is formed* lives in `methods`; this module only turns examples and
target choices into batches and takes optimizer steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from raysweep.scoring import encode_pair, model_max_length
from raysweep.spec import PhaseConfig
from raysweep.tasks.base import Example


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): next-token targets, -100 outside the response
    example_idx: torch.Tensor  # (B,) positions in the training list, for per-example state


def build_batches(tokenizer, model, examples: Sequence[Example], targets: Sequence[int], batch_size: int, rng: random.Random) -> list[TrainBatch]:
    """Shuffle, then lay out each (prompt, chosen response) exactly as scoring reads it, so
    what is trained is what is measured."""
    max_length = model_max_length(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = []
        for i in idx:
            ex = examples[i]
            pair = encode_pair(tokenizer, ex.prompt, ex.continuations[targets[i]])
            window = (pair.context + pair.continuation)[-(max_length + 1) :]
            inputs, labels = window[:-1], window[1:]
            n_prompt_targets = len(labels) - len(pair.continuation)
            labels = [-100] * n_prompt_targets + labels[n_prompt_targets:]
            seqs.append((inputs, labels))
        width = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for r, (inp, lbl) in enumerate(seqs):
            ids[r, : len(inp)] = torch.tensor(inp)
            mask[r, : len(inp)] = 1
            lab[r, : len(lbl)] = torch.tensor(lbl)
        batches.append(TrainBatch(ids, mask, lab, torch.tensor(idx)))
    return batches


def response_logprobs(model, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-probability of the response, and its token count."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits.float()
    labels = batch.labels.to(device)
    keep = labels != -100
    logp = torch.log_softmax(logits, dim=-1).gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(dim=1), keep.sum(dim=1)


def make_optimizer(model, cfg: PhaseConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


LossFn = Callable[[torch.nn.Module, TrainBatch], torch.Tensor]


def train_epoch(model, optimizer: torch.optim.Optimizer, batches: Sequence[TrainBatch], loss_fn: LossFn, grad_clip: float | None) -> float:
    """One pass over the batches; returns the mean batch loss."""
    model.train()
    total = 0.0
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += float(loss.detach())
    model.eval()
    return total / max(len(batches), 1)
