"""Forgetting methods, each a small registered unit (in the spirit of open-unlearning).

A method decides two things for the `forget` phase: which response each training example is
trained towards in a given epoch, and the loss formed from the model's response
log-probabilities. Adding a method is one class with @register_method; any state it keeps
across epochs is its own (`state_dict` / `load_state_dict`, saved in the trial's resume points).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, PositiveFloat, ValidationError

from raysweep.registry import Registry
from raysweep.tasks.base import Example
from raysweep.train import BatchLoss, TrainBatch, response_logprobs


def nll_loss(model, batch: TrainBatch) -> BatchLoss:
    """Negative log-likelihood per response token, averaged over the batch's tokens."""
    lp, n = response_logprobs(model, batch)
    return BatchLoss(-lp.sum(), n.sum())


class NoArgs(BaseModel):
    """A method's own arguments (a spec's `method_args: {method: {...}}`); this one has none."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ForgetMethod(ABC):
    name: ClassVar[str]
    Args: ClassVar[type[BaseModel]] = NoArgs
    # The forget ratio's denominator: random-label methods aim at chance (1/2); flipped labels
    # aim at the mirror image of the fine-tuned accuracy.
    ratio_formula: ClassVar[str] = "random"
    # False for a reference that fine-tunes and stops there: its trial has no forget phase.
    forgets: ClassVar[bool] = True

    def __init__(self, args: BaseModel | None = None):
        self.args = args if args is not None else self.Args()

    @abstractmethod
    def targets(self, examples: Sequence[Example], epoch: int, rng: random.Random) -> list[int]:
        """Index of the response (0/1) each example is trained on this epoch."""

    def prepare(self, model, batches_of_gold: Sequence[TrainBatch]) -> None:
        """Hook run once at the start of the phase, before any update (NPO's reference)."""

    def loss(self, model, batch: TrainBatch) -> BatchLoss:
        return nll_loss(model, batch)

    def state_dict(self) -> dict:
        """What the method must carry across a resume (plain values, saved with the weights)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


METHODS: Registry[type[ForgetMethod]] = Registry("forgetting method", field="methods")


def register_method(cls: type[ForgetMethod]) -> type[ForgetMethod]:
    return METHODS.add(cls.name, cls)


def method_args(name: str, given: Mapping | None = None) -> dict:
    """The method's arguments with its defaults filled in; ValueError names a bad one."""
    return _validated_args(name, given).model_dump()


def _validated_args(name: str, given: Mapping | None) -> BaseModel:
    try:
        return METHODS.get(name).Args.model_validate(dict(given or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"argument {where!r} of method {name!r}: {err['msg']}") from None


def get_method(name: str, args: Mapping | None = None) -> ForgetMethod:
    return METHODS.get(name)(_validated_args(name, args))


def registered_methods() -> list[str]:
    return sorted(METHODS)


@register_method
class RandomLabels(ForgetMethod):
    """Each example's label redrawn uniformly at random every epoch (the paper's method)."""

    name = "random"

    def targets(self, examples, epoch, rng):
        return [rng.randrange(2) for _ in examples]


@register_method
class FlippedLabels(ForgetMethod):
    """Always train towards the distractor."""

    name = "flipped"
    ratio_formula = "flipped"

    def targets(self, examples, epoch, rng):
        return [ex.distractor for ex in examples]


@register_method
class GradientAscent(ForgetMethod):
    """Maximise the loss of the true response."""

    name = "gradient_ascent"

    def targets(self, examples, epoch, rng):
        return [ex.gold for ex in examples]

    def loss(self, model, batch):
        return -nll_loss(model, batch)


@register_method
class NPO(ForgetMethod):
    """Negative preference optimisation (Zhang et al. 2024): push the true response's
    likelihood below the fine-tuned reference's, with a loss that saturates instead of
    diverging like gradient ascent: (2/beta) * E[-log sigmoid(-beta * (log p - log p_ref))]."""

    name = "npo"

    class Args(NoArgs):
        beta: PositiveFloat = 0.1  # inverse temperature of the preference term

    def __init__(self, args: BaseModel | None = None):
        super().__init__(args)
        self.beta = self.args.beta
        self._ref: dict[int, float] = {}

    def targets(self, examples, epoch, rng):
        return [ex.gold for ex in examples]

    @torch.no_grad()
    def prepare(self, model, batches_of_gold):
        # The reference is the model at the start of forgetting; caching its log-probs once
        # avoids holding a second copy of the model.
        model.eval()
        for b in batches_of_gold:
            lp, _ = response_logprobs(model, b)
            for i, v in zip(b.example_idx.tolist(), lp.tolist()):
                self._ref[i] = v

    def loss(self, model, batch):
        lp, _ = response_logprobs(model, batch)
        ref = torch.tensor([self._ref[i] for i in batch.example_idx.tolist()], device=lp.device)
        per_example = (2.0 / self.beta) * -F.logsigmoid(-self.beta * (lp - ref))
        return BatchLoss(per_example.sum(), torch.tensor(float(len(per_example)), device=lp.device))

    def state_dict(self) -> dict:
        # The reference log-probs, taken once from the fine-tuned model: a resumed forget
        # phase no longer has that model to take them again.
        return {"reference": dict(self._ref)}

    def load_state_dict(self, state: dict) -> None:
        self._ref = {int(k): v for k, v in state.get("reference", {}).items()}


@register_method
class NoForgetting(ForgetMethod):
    """A reference, not a forgetting method: the trial fine-tunes as every other does and stops
    there (no forget or relearn phase). Forget quality compares forget runs against it."""

    name = "none"
    forgets = False

    def targets(self, examples, epoch, rng):
        raise RuntimeError("method 'none' has no forget phase")
