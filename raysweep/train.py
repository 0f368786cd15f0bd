"""The training loop: plain PyTorch, one epoch at a time, loss on response tokens only.

Deliberately small (nanoGPT-style): the phase logic that decides *what* to train on lives in
`trial`, and *how the loss is formed* lives in `methods`; this module only turns examples and
target choices into batches and takes optimizer steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from raysweep.distributed import SINGLE, Group
from raysweep.reproducible import adamw
from raysweep.scoring import encode_pair, model_max_length, pad_id
from raysweep.tasks.base import Example

if TYPE_CHECKING:
    # Annotations only: the spec names the registered methods, and methods build on this module.
    from raysweep.spec import PhaseConfig, TrainEngine


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): next-token targets, -100 outside the response
    example_idx: torch.Tensor  # (B,) positions in the training list, for per-example state

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: torch.Tensor | slice) -> "TrainBatch":
        return TrainBatch(
            self.input_ids[index], self.attention_mask[index], self.labels[index], self.example_idx[index]
        )

    def shard(self, rank: int, world: int) -> "TrainBatch":
        """This rank's rows of a global batch (every rank builds the same global batches)."""
        return self if world == 1 else self.rows(slice(rank, None, world))


@dataclass
class BatchLoss:
    """A loss as a sum over units (response tokens, or examples) and the number of units.
    Kept apart so that data-parallel ranks can divide by the *global* batch's count: each
    rank's gradient is then its exact share of the single-process gradient, whatever the
    shards' sizes."""

    total: torch.Tensor
    count: torch.Tensor

    def __neg__(self) -> "BatchLoss":
        return BatchLoss(-self.total, self.count)


def build_batches(
    tokenizer, model, examples: Sequence[Example], targets: Sequence[int], batch_size: int, rng: random.Random
) -> list[TrainBatch]:
    """Shuffle, then lay out each (prompt, chosen response) exactly as scoring reads it, so
    what is trained is what is measured."""
    max_length = model_max_length(model, tokenizer)
    pad = pad_id(tokenizer)
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


def _torch_optimizer(model, cfg: PhaseConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Stepper:
    """Plain PyTorch: backward, clip, step. The optimizer-like face (state_dict /
    load_state_dict) is what resume points save."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, grad_clip: float | None):
        self.model = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip

    @property
    def forward_model(self):
        return self.model

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def close(self) -> None:
        """End of phase: release what the stepper attached to the model."""


class DDPStepper(Stepper):
    """Plain PyTorch across several ranks: DistributedDataParallel averages the gradients
    (and, when it wraps the model, makes every rank start from rank 0's weights)."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, grad_clip: float | None):
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, optimizer, grad_clip)
        device = next(model.parameters()).device
        self.ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    @property
    def forward_model(self):
        return self.ddp

    def close(self) -> None:
        del self.ddp


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_process_group() -> None:
    """DeepSpeed wants a process group even for one process. Each trial picks its own free
    rendezvous port: concurrent trials on one node would otherwise all collide on 29500."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False)


def deepspeed_config(cfg: PhaseConfig, engine: TrainEngine, world: int = 1) -> dict:
    conf: dict = {
        # Each rank's share of the phase's batch: DeepSpeed derives the global batch size
        # (micro batch x ranks) and only checks it; the loss is normalised by the true global
        # count in `train_epoch`.
        "train_micro_batch_size_per_gpu": -(-cfg.batch_size // world),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": engine.zero_stage},
        # SGD is not one of DeepSpeed's own optimizers: it runs as a client (torch) optimizer.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip is not None:
        conf["gradient_clipping"] = cfg.grad_clip
    if engine.precision == "fp16":
        conf["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif engine.precision == "bf16":
        conf["bf16"] = {"enabled": True}
    return conf


class DeepSpeedStepper(Stepper):
    """DeepSpeed: fp16 with dynamic loss scaling (or bf16 / fp32), ZeRO stage from the spec,
    top-level gradient clipping, the phase's torch optimizer as DeepSpeed's client optimizer.
    One engine per phase: each phase starts a fresh optimizer, as in the paper."""

    def __init__(self, model, cfg: PhaseConfig, engine: TrainEngine, world: int = 1):
        import deepspeed

        ensure_single_process_group()
        optimizer = _torch_optimizer(model, cfg)
        # With several ranks, initialize() also broadcasts rank 0's weights to the others.
        self.engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, engine, world)
        )
        super().__init__(model, ds_optimizer, None)

    @property
    def forward_model(self):
        return self.engine

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # clips, unscales, skips the step on fp16 overflow

    def load_state_dict(self, state: dict) -> None:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if not isinstance(self.optimizer, DeepSpeedZeroOptimizer):
            self.optimizer.load_state_dict(state)
            return
        import torch.distributed as dist

        # ZeRO-1/2 load from a list of every rank's state and read their own entry: each rank
        # keeps only its own part (DeepSpeed's default rigid layout). The fp32 master
        # partition comes from that state too, not from the (possibly fp16) weights, so the
        # resumed run continues exactly.
        parts: list[dict | None] = [None] * dist.get_world_size()
        parts[dist.get_rank()] = state
        self.optimizer.load_state_dict(parts, load_from_fp32_weights=True)

    def close(self) -> None:
        # ZeRO registers gradient hooks on the model's parameters that only destroy() removes:
        # left in place, the previous phase's optimizer would keep consuming gradients.
        self.engine.destroy()

    @property
    def loss_scale(self) -> float | None:
        return getattr(self.engine.optimizer, "cur_scale", None)


def resume_safe_globals() -> list:
    """Classes a resume point may hold besides tensors and plain values: DeepSpeed's ZeRO
    optimizer state carries its loss scaler, stage enum and fragment addresses (plain data). Loading stays
    `weights_only`, so nothing else from a store can be unpickled."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def make_optimizer(model, cfg: PhaseConfig, engine: TrainEngine | None = None, group: Group = SINGLE) -> Stepper:
    if engine is not None and engine.engine == "deepspeed":
        return DeepSpeedStepper(model, cfg, engine, group.world)
    if group.world > 1:
        return DDPStepper(model, _torch_optimizer(model, cfg), cfg.grad_clip)
    return Stepper(model, _torch_optimizer(model, cfg), cfg.grad_clip)


LossFn = Callable[[torch.nn.Module, TrainBatch], BatchLoss]


def train_epoch(
    model, stepper: Stepper, batches: Sequence[TrainBatch], loss_fn: LossFn, group: Group = SINGLE
) -> float:
    """One pass over the batches; returns the mean batch loss. Each rank trains on its
    shard of every global batch; the ranks' gradients are averaged by DDP or DeepSpeed, so
    each rank's loss is scaled by world / global count to make that average the gradient of
    the global batch's loss."""
    model.train()
    total = 0.0
    for batch in batches:
        shard, weight = batch.shard(group.rank, group.world), 1.0
        if len(shard) == 0:
            # Fewer rows than ranks: this rank still joins the gradient all-reduce, with a
            # zero-weighted copy of one row.
            shard, weight = batch.rows(slice(0, 1)), 0.0
        terms = loss_fn(stepper.forward_model, shard)
        mine = torch.stack([terms.total.detach().double(), terms.count.detach().double()]) * weight
        batch_total, batch_count = group.sum(mine).tolist()
        loss = terms.total * (weight * group.world / max(batch_count, 1.0))
        stepper.step(loss)
        total += batch_total / max(batch_count, 1.0)
    model.eval()
    return total / max(len(batches), 1)
