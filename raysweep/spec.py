"""Sweep specs: YAML -> validated typed objects -> a plan of trials.

Nothing runs before a spec validates. Every default below is the paper's (its experimental
set-up) unless the comment says otherwise; a spec overrides any of them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from raysweep.constants import SPLITS
from raysweep.errors import BadInput

if TYPE_CHECKING:
    from raysweep.tasks import PreparedTask

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
# Names become directory names (the store's, Tune's, whose own paths add more): far below 255.
MAX_NAME = 100
# Seeds are stored as int32: a larger one would pass here and fail when its first row is written.
Seed = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Name = Annotated[str, Field(pattern=_NAME, max_length=MAX_NAME)]
MAX_SPEC_BYTES = 2**20

PositiveFloat = Annotated[float, Field(gt=0)]
# Counts with a ceiling: an absurd one (max_epochs: 1000000000000) validates as a positive int
# and then runs for ever or allocates without end; no real sweep comes near these.
Epochs = Annotated[int, Field(gt=0, le=10_000)]
BatchSize = Annotated[int, Field(gt=0, le=65_536)]
ExampleCount = Annotated[int, Field(gt=0, le=10_000_000)]


def _known_method(name: str) -> str:
    # Imported here, not above: the methods (and torch) import the training code, which
    # imports this module.
    from raysweep.methods import METHODS

    if name not in METHODS:
        raise ValueError(METHODS.unknown(name))
    return name


def resolve_method_args(name: str, given: dict | None) -> dict:
    """A method's arguments as its class validates them, defaults filled in."""
    from raysweep.methods import method_args

    return method_args(name, given)


# A forgetting method by its registered name: a new method is one class, not a spec edit too.
MethodName = Annotated[str, AfterValidator(_known_method)]


class _Strict(BaseModel):
    # Unknown keys are almost always typos of real ones; refusing them beats silently ignoring.
    # inf and nan pass "greater than 0" (or fail it with a puzzling message) and only surface
    # as a diverged trial after the store is written: no spec number may be either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def locate_gguf(ref: str) -> Path:
    """A GGUF file named as a path, or as `package/inside/file.gguf` within an installed
    package. The package is located, never imported: a model wheel's `__init__` may import
    dependencies that a model file does not need."""
    import importlib.util

    direct = Path(ref).expanduser()
    if direct.is_file():
        return direct.resolve()
    package, _, inside = ref.partition("/")
    try:
        found = importlib.util.find_spec(package) if package.isidentifier() and inside else None
    except (ImportError, ValueError):
        found = None
    for root in (found.submodule_search_locations or []) if found is not None else []:
        if (Path(root) / inside).is_file():
            return (Path(root) / inside).resolve()
    raise ValueError(f"{ref!r} is neither a file nor a file inside an installed package")


def _check_local_model_dir(path: str, trust_remote_code: bool) -> None:
    """A path that can only mean a local directory must be one, and must load without running
    code it carries unless the spec allows that; otherwise the trials would find out, each
    one after the store is written. Other strings are hub names, resolved when loaded."""
    if not path.startswith(("/", "./", "../", "~")):
        return
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ValueError(f"path: no such directory {path!r}")
    if not folder.is_dir():
        raise ValueError(f"path: {path!r} is not a directory (a local model is a folder with config.json)")
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue  # absent or unreadable: loading the model reports it with the model's name
        if isinstance(config, dict) and config.get("auto_map"):
            raise ValueError(
                f"path: {path!r} needs remote code ({name} has an auto_map); "
                "set trust_remote_code: true only if you trust it"
            )


class PretrainConfig(_Strict):
    """Short language-model pretraining of a built-in tiny model on a mixture of the
    built-in tasks, so that it starts with partial skill as a real pretrained model does."""

    steps: Annotated[int, Field(gt=0, le=10_000_000)] = 600
    lr: PositiveFloat = 3e-3
    batch_size: BatchSize = 32
    examples_per_task: ExampleCount = 400
    # Fraction of pretraining examples whose answer is replaced by the distractor: keeps the
    # pretrained model's skill partial, so fine-tuning has something to add.
    label_noise: Annotated[float, Field(ge=0, lt=0.5)] = 0.2
    # "cosine": linear warm-up, then cosine decay to zero. At a constant rate a small-batch
    # run's skills come and go from one few hundred steps to the next; a decayed run lands
    # on a settled model (the quickstart's). "constant" keeps the test models' recipe.
    lr_schedule: Literal["constant", "cosine"] = "constant"


class TinySize(_Strict):
    layers: Annotated[int, Field(ge=5, le=1024)] = 6  # >= 5 so the fifth-to-last layer is a real block
    hidden: Annotated[int, Field(gt=0, le=65_536)] = 64
    heads: Annotated[int, Field(gt=0, le=1024)] = 4
    vocab: Annotated[int, Field(ge=300, le=1_000_000)] = 1024
    # The position table is allocated up front: 10**12 positions would exhaust memory in a trial.
    max_positions: Annotated[int, Field(ge=64, le=1_000_000)] = 256

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinySize":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


class ModelSpec(_Strict):
    """A model axis value: a built-in tiny architecture, or a hub name / local directory."""

    name: Name
    arch: Literal["gpt2", "gptj", "llama"] | None = None
    path: str | None = None
    # A GGUF file: a local path, or `package/file.gguf` inside an installed Python package.
    # It is dequantised once into the store's model cache and then loads like any checkpoint.
    gguf: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    tiny: TinySize = TinySize()
    pretrain: PretrainConfig = PretrainConfig()

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if sum(x is not None for x in (self.arch, self.path, self.gguf)) != 1:
            raise ValueError(
                "give exactly one of 'arch' (built-in tiny model), 'path' (hub name or local directory) or 'gguf' (GGUF file)"
            )
        if self.gguf is not None:
            if not self.gguf.endswith(".gguf"):
                raise ValueError(f"gguf: {self.gguf!r} does not name a .gguf file")
            locate_gguf(self.gguf)  # found before anything runs, not inside a trial
        if self.path is not None:
            _check_local_model_dir(self.path, self.trust_remote_code)
        return self

    @property
    def builtin(self) -> bool:
        return self.arch is not None


class PhaseConfig(_Strict):
    lr: PositiveFloat
    optimizer: Literal["sgd", "adamw"] = "sgd"
    batch_size: BatchSize = 3
    max_epochs: Epochs = 100
    grad_clip: PositiveFloat | None = 1.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0


class FinetuneConfig(PhaseConfig):
    lr: PositiveFloat = 3e-3
    # Stop once train accuracy reaches this; the best-validation checkpoint is kept either way.
    stop_train_acc: Annotated[float, Field(gt=0, le=1)] = 0.99
    # Epochs without a new best validation accuracy before stopping; None runs to max_epochs.
    patience: Epochs | None = None


class ForgetConfig(PhaseConfig):
    lr: PositiveFloat = 1e-4
    # Methods that aim at chance (random labels, gradient ascent, NPO) stop once the forget
    # task's test accuracy drops below this. Flipped labels aim below chance, so a fixed 0.5
    # would decide the flipped forget ratio in advance: they stop at the mirror image of the
    # fine-tuned accuracy instead (see `forget_stop_threshold`), or run the epoch budget.
    stop_test_acc: Annotated[float, Field(gt=0, le=1)] = 0.5
    flipped_stop: Literal["mirror", "budget"] = "mirror"

    @model_validator(mode="before")
    @classmethod
    def _npo_beta_moved(cls, data):
        if isinstance(data, dict) and "npo_beta" in data:
            raise ValueError(
                f"npo_beta is NPO's own argument now: write `method_args: {{npo: {{beta: {data['npo_beta']}}}}}` "
                "at the top level of the spec"
            )
        return data


class RelearnConfig(PhaseConfig):
    enabled: bool = False
    lr: PositiveFloat = 3e-5
    stop_train_acc: Annotated[float, Field(gt=0, le=1)] = 0.99
    # A relearning attack: relearn on only the first k examples of the forgotten (trained)
    # set, with their true labels; None relearns on all of them. The stop rule still reads
    # the whole trained set, so with few examples the phase usually runs its max_epochs.
    examples: ExampleCount | None = None
    # Or relearn on another task's train split (true labels; its first `examples`, else
    # `size`): does training on other data bring the forgotten task back? Recovery is read on
    # the forget task's test split either way.
    task: str | None = None


class Phases(_Strict):
    finetune: FinetuneConfig = FinetuneConfig()
    forget: ForgetConfig = ForgetConfig()
    relearn: RelearnConfig = RelearnConfig()


class Resources(_Strict):
    # Per trial. A trial with several workers splits its CPUs evenly between them and gives
    # each worker one GPU.
    cpu: Annotated[float, Field(gt=0)] = 1
    gpu: Annotated[float, Field(ge=0)] = 0
    # Data-parallel processes per trial (Ray Train workers inside the Tune trial). Defaults
    # to one per GPU; set it to run several CPU workers (gloo).
    workers: Annotated[int, Field(gt=0, le=4096)] | None = None

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers is not None else max(1, int(self.gpu))

    @property
    def per_worker(self) -> tuple[float, float]:
        """(CPUs, GPUs) of each worker."""
        n = self.n_workers
        return self.cpu / n, (self.gpu / n if self.gpu else 0.0)

    @model_validator(mode="after")
    def _whole_gpus_per_worker(self) -> "Resources":
        if self.gpu > 1 and self.gpu != int(self.gpu):
            raise ValueError(f"gpu: a trial holding more than one GPU holds whole GPUs (got {self.gpu:g})")
        if self.workers is not None and self.gpu and self.gpu != self.workers and (self.workers > 1 or self.gpu > 1):
            raise ValueError(
                f"workers: each worker drives one GPU, so workers must equal gpu (workers {self.workers}, gpu {self.gpu:g})"
            )
        return self


class TrainEngine(_Strict):
    engine: Literal["torch", "deepspeed"] = "torch"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # ZeRO-3 partitions the parameters themselves, which the best-epoch snapshot and resume
    # points (full state dicts) do not handle yet.
    zero_stage: Literal[0, 1, 2] = 0
    # Resume points: "epoch" keeps the latest epoch's weights (and optimizer state, if asked)
    # so an interrupted trial restarts from its last completed epoch; "phase" only at phase
    # boundaries (for models whose per-epoch copies are too large to write every epoch).
    checkpoint: Literal["epoch", "phase", "none"] = "epoch"
    # Optimizer state in resume points (exact resume). "auto": only for models up to
    # 1B parameters; a 7B model's fp32 master weights and moments would add 28-84 GB to
    # every resume point, so large models resume from their weights alone by default.
    checkpoint_optimizer: bool | Literal["auto"] = "auto"


class ScoringConfig(_Strict):
    batch_size: BatchSize = 32
    splits: list[Literal["train", "validation", "test"]] = list(SPLITS)
    # Hidden states are wide (4096 floats for a 7B model): keep them at phase ends by default,
    # which is what the variance predictor and the probes read.
    hidden_states: Literal["phase_end", "every_epoch", "none"] = "phase_end"
    # Layers whose states are kept, indexed as Python indexes the model's hidden states
    # (embeddings first): -5 is the fifth-to-last, where the probes read; -2 the penultimate.
    layers: list[int] = [-5]
    # Whose hidden states are kept: every evaluation task's, or the forget task's alone (all
    # that the probes and the variance predictor read; a 7B model's other tasks would
    # otherwise be most of the store's bytes).
    hidden_tasks: Literal["all", "forget"] = "all"
    # When the evaluation tasks other than the forget task are scored within each phase:
    # every epoch, every k-th epoch (an integer k), at epochs 1, 2, 4, 8, ... ("log"), or at
    # the milestones only. The forget task is scored on all its splits every epoch (its stop
    # rules and the per-epoch analyses read it), and every task at every milestone: the
    # pretrained model, the best fine-tuning epoch, the last forget and relearn epochs.
    schedule: Literal["every_epoch", "log", "milestones"] | Annotated[int, Field(gt=0, le=100_000)] = "every_epoch"

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_known(cls, v):
        named = isinstance(v, str) and v in ("every_epoch", "log", "milestones")
        every_k = isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 100_000
        if not (named or every_k):
            raise ValueError(f"must be every_epoch, log, milestones or a number of epochs k >= 1 (got {v!r})")
        return "every_epoch" if v == 1 else v

    def scores_others_at(self, epoch: int) -> bool:
        """Whether the schedule scores the other evaluation tasks at this epoch of a phase
        (the milestones are scored whatever it says)."""
        s = self.schedule
        if s == "every_epoch":
            return True
        if s == "milestones":
            return False
        if s == "log":
            return epoch > 0 and epoch & (epoch - 1) == 0
        return epoch % s == 0

    @field_validator("splits", "layers")
    @classmethod
    def _nonempty_unique(cls, v: list, info) -> list:
        if not v:
            raise ValueError(f"must name at least one {info.field_name[:-1]}")
        if len(set(v)) != len(v):
            raise ValueError(f"{info.field_name} repeat")
        return v


class DataConfig(_Strict):
    # Each split is capped at this many examples by seeded subsampling (paper: 1000).
    cap: ExampleCount = 1000
    max_chars: Annotated[int, Field(gt=0, le=10_000_000)] = 2048
    # Seed of data preparation (distractor draw, subsampling): shared by all trials so that
    # every trial sees the same examples and rows line up across trials.
    seed: int = 1234
    # task name -> local folder of prepared Parquet/JSONL splits (see `raysweep tasks prepare`).
    sources: dict[str, str] = {}


class MlflowTracking(_Strict):
    # None: $MLFLOW_TRACKING_URI, checked before the sweep starts.
    tracking_uri: str | None = None
    # None: the sweep's name.
    experiment: str | None = Field(default=None, min_length=1, max_length=500)


class WandbTracking(_Strict):
    project: str = Field(min_length=1, max_length=128)
    mode: Literal["offline", "online"] = "offline"


class TrackingConfig(_Strict):
    """Where Ray Tune's logger callbacks send each trial's params and per-epoch metrics. Not
    part of any trial's identity: turning tracking on or off never renames a trial."""

    mlflow: MlflowTracking | None = None
    wandb: WandbTracking | None = None


class SweepSpec(_Strict):
    name: Name
    description: str = ""
    models: list[ModelSpec] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    forget_tasks: list[str] | None = None
    eval_tasks: list[str] | None = None
    methods: list[MethodName] = ["random"]
    # Each method's own arguments, by name (`method_args: {npo: {beta: 0.1}}`); a method not
    # named here runs with its defaults.
    method_args: dict[str, dict[str, Any]] = {}
    sizes: list[ExampleCount] = [1000]
    seeds: list[Seed] = [0]
    phases: Phases = Phases()
    train: TrainEngine = TrainEngine()
    scoring: ScoringConfig = ScoringConfig()
    data: DataConfig = DataConfig()
    resources: Resources = Resources()
    max_concurrent_trials: Annotated[int, Field(gt=0, le=100_000)] | None = None
    max_failures: Annotated[int, Field(ge=0)] = 1
    tracking: TrackingConfig | None = None

    @field_validator("models", "tasks", "methods", "sizes", "seeds", "forget_tasks", "eval_tasks")
    @classmethod
    def _axis_nonempty_unique(cls, v, info):
        if v is None:
            return v
        if len(v) == 0:
            raise ValueError("axis is empty")
        counts = Counter(m.name if isinstance(m, ModelSpec) else m for m in v)
        dup = sorted((k for k, n in counts.items() if n > 1), key=str)
        if dup and info.field_name == "models":
            raise ValueError(f"model name(s) {dup} used more than once: the name identifies a model in the store")
        if dup:
            raise ValueError(f"duplicate value(s) {dup}: each would repeat the same trials")
        return v

    @model_validator(mode="after")
    def _method_args_valid(self) -> "SweepSpec":
        for name, args in self.method_args.items():
            if name not in self.methods:
                raise ValueError(f"method_args: {name!r} is not one of the spec's methods {self.methods}")
            try:
                resolve_method_args(name, args)
            except ValueError as exc:
                raise ValueError(f"method_args.{name}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _relearn_examples_fit(self) -> "SweepSpec":
        k = self.phases.relearn.examples
        if k is not None and any(k > n for n in self.sizes):
            raise ValueError(
                f"phases.relearn.examples: {k} is more than the smallest size ({min(self.sizes)}): "
                "the attack relearns on part of the trained set"
            )
        return self

    @model_validator(mode="after")
    def _tasks_known(self) -> "SweepSpec":
        from raysweep.tasks import registered_tasks

        known = registered_tasks()
        for field in ("tasks", "forget_tasks", "eval_tasks"):
            for name in getattr(self, field) or []:
                if name not in known:
                    import difflib

                    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise ValueError(f"{field}: unknown task {name!r} ({hint}see `raysweep tasks list`)")
        for field in ("forget_tasks", "eval_tasks"):
            extra = [t for t in getattr(self, field) or [] if t not in self.tasks]
            if extra:
                raise ValueError(f"{field}: {extra} not listed under 'tasks'")
        relearn_task = self.phases.relearn.task
        if relearn_task is not None and relearn_task not in self.tasks:
            raise ValueError(f"phases.relearn.task: {relearn_task!r} is not listed under 'tasks'")
        for name in self.data.sources:
            if name not in self.tasks:
                raise ValueError(f"data.sources: {name!r} is not one of the spec's tasks")
        if self.train.engine == "deepspeed" and self.resources.gpu < 1 and self.train.precision != "fp32":
            # DeepSpeed runs on CPU (gloo) only in fp32: its fp16/bf16 paths need a GPU.
            raise ValueError(
                f"train.engine: deepspeed with precision {self.train.precision} needs resources.gpu >= 1 (on CPU use precision fp32)"
            )
        return self

    @property
    def forget_task_list(self) -> list[str]:
        return list(self.forget_tasks or self.tasks)

    @property
    def trained_task_list(self) -> list[str]:
        """The tasks whose train split some phase trains on: they must have one."""
        relearn = self.phases.relearn
        extra = [relearn.task] if relearn.enabled and relearn.task else []
        return list(dict.fromkeys([*self.forget_task_list, *extra]))

    @property
    def eval_task_list(self) -> list[str]:
        return list(self.eval_tasks or self.tasks)

    def trials(self, data: "Mapping[str, PreparedTask] | None" = None) -> list["TrialPlan"]:
        """The plan of trials; prepares the tasks unless given them (see `expand`)."""
        return expand(self, data)


_NPO_BETA_BEFORE_METHOD_ARGS = 0.1


class TrialPlan(_Strict):
    """One point of the sweep's grid: everything a trial needs, nothing it has to look up."""

    trial_id: str
    sweep: str
    model: ModelSpec
    forget_task: str
    method: str
    # The method's own arguments, its defaults filled in (`resolve_method_args`).
    method_args: dict[str, Any] = {}
    size: int
    seed: int
    eval_tasks: list[str]
    phases: Phases
    train: TrainEngine
    scoring: ScoringConfig
    data: DataConfig
    resources: Resources
    # task -> content hash of its prepared examples (`examples_digest`), for every task the
    # trial reads. Empty only in rows written before trials carried it.
    data_digest: dict[str, str] = {}

    def identity(self) -> dict:
        """The parameters that determine this trial's results, canonically ordered."""
        # How often a trial saves resume points, how many CPUs it gets and where its data
        # folder lives do not change what it computes: editing them must not rename the
        # trial. What the folder holds does (`data_digest`), and so does the number of
        # data-parallel workers (batches are split and gradients reduced across them) and
        # the kind of device (CPU and CUDA kernels round differently).
        ident = self.model_dump(
            mode="json",
            exclude={
                "trial_id": True,
                "sweep": True,
                "resources": True,
                "train": {"checkpoint", "checkpoint_optimizer"},
                "data": {"sources"},
            },
        )
        # Added after trial ids existed: hashed only when set, so every earlier trial keeps its id.
        for added in ("examples", "task"):
            if ident["phases"]["relearn"].get(added) is None:
                ident["phases"]["relearn"].pop(added, None)
        for added, default in (("schedule", "every_epoch"), ("hidden_tasks", "all")):
            if ident["scoring"].get(added) == default:
                ident["scoring"].pop(added)
        # NPO's beta was a forget-phase field, hashed into every trial, before methods had
        # arguments of their own. It is hashed there still (its old default for the other
        # methods), so that earlier trials keep their ids; other methods' arguments, when
        # they have any, are hashed as such.
        args = dict(ident.pop("method_args"))
        ident["phases"]["forget"]["npo_beta"] = (
            args.pop("beta") if self.method == "npo" else _NPO_BETA_BEFORE_METHOD_ARGS
        )
        if args:
            ident["method_args"] = args
        ident["world_size"] = self.resources.n_workers
        ident["device"] = "cuda" if self.resources.gpu > 0 else "cpu"
        return ident


def examples_digest(task: "PreparedTask") -> str:
    """Content hash of what a trial reads of a prepared task: every split's examples in
    order (index, prompt, choices, gold). The folder they came from is not part of it, so
    the same files moved elsewhere hash the same; other files under the same path do not."""
    h = hashlib.sha256()
    for split in SPLITS:
        for ex in task.splits.get(split, []):
            h.update(json.dumps([split, ex.idx, ex.prompt, list(ex.choices), ex.gold], ensure_ascii=False).encode())
            h.update(b"\n")
    return h.hexdigest()[:16]


def _trial_id(plan_fields: dict) -> str:
    canon = json.dumps(plan_fields, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha1(canon.encode()).hexdigest()[:10]
    readable = re.sub(
        r"[^A-Za-z0-9]+",
        "-",
        f"{plan_fields['forget_task']}-{plan_fields['method']}-n{plan_fields['size']}-s{plan_fields['seed']}",
    )
    return f"{readable}-{digest}"


def grid(spec: SweepSpec) -> list[tuple[ModelSpec, str, str, int, int]]:
    """(model, forget task, method, size, seed) of every trial, in the plan's stable order.
    Needs no data: what validates a spec without preparing its tasks."""
    return [
        (model, task, method, size, seed)
        for model in spec.models
        for task in spec.forget_task_list
        for method in spec.methods
        for size in spec.sizes
        for seed in spec.seeds
    ]


def expand(spec: SweepSpec, data: "Mapping[str, PreparedTask] | None" = None) -> list[TrialPlan]:
    """The grid models x forget tasks x methods x sizes x seeds, in a stable order.

    Trial ids hash the prepared examples, so the tasks are prepared here unless `data`
    (what `prepare_sweep_tasks(spec)` returns) is given."""
    if data is None:
        from raysweep.tasks.prepare import prepare_sweep_tasks

        data = prepare_sweep_tasks(spec)
    missing = [t for t in spec.tasks if t not in data]
    if missing:
        raise BadInput(f"spec: no prepared data for task(s) {missing}")
    digests = {name: examples_digest(data[name]) for name in spec.tasks}
    eval_tasks = spec.eval_task_list
    relearn = spec.phases.relearn
    relearn_data = [relearn.task] if relearn.enabled and relearn.task else []  # another task's, if any
    plans: list[TrialPlan] = []
    for model, task, method, size, seed in grid(spec):
        fields = dict(
            sweep=spec.name,
            model=model,
            forget_task=task,
            method=method,
            method_args=resolve_method_args(method, spec.method_args.get(method)),
            size=size,
            seed=seed,
            eval_tasks=eval_tasks,
            phases=spec.phases,
            train=spec.train,
            scoring=spec.scoring,
            data=spec.data,
            resources=spec.resources,
            data_digest={t: digests[t] for t in dict.fromkeys([task, *eval_tasks, *relearn_data])},
        )
        probe = TrialPlan(trial_id="x", **fields)
        plans.append(probe.model_copy(update={"trial_id": _trial_id(probe.identity())}))
    ids = [p.trial_id for p in plans]
    if len(set(ids)) != len(ids):  # pragma: no cover - guarded by the axis validators
        raise BadInput("spec: expands to duplicate trials")
    return plans


def plan_version(plans: list[TrialPlan]) -> str:
    """One name for a whole plan: equal exactly when the two plans hold the same trials."""
    return hashlib.sha1("\n".join(sorted(p.trial_id for p in plans)).encode()).hexdigest()[:12]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The spec class that holds the key at `loc` (list indices skipped), for suggestions."""
    import typing

    model: type[BaseModel] = SweepSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field_info = model.model_fields.get(str(part))
        if field_info is None:
            return None
        candidates = [field_info.annotation]
        found = None
        while candidates:
            t = candidates.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                found = t
                break
            candidates.extend(typing.get_args(t))
        if found is None:
            return None
        model = found
    return model


def _unknown_key_hint(loc: tuple) -> str:
    import difflib

    model = _model_at(loc)
    if model is None or not loc:
        return ""
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (allowed here: {', '.join(allowed)})"


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc_parts = tuple(first["loc"])
    loc = ".".join(str(p) for p in loc_parts)
    msg = first["msg"].removeprefix("Value error, ")
    kind = first["type"]
    value = first.get("input")
    if kind == "extra_forbidden":
        msg = "unknown key" + _unknown_key_hint(loc_parts)
    elif kind == "missing":
        msg = "required, but missing"
    elif kind == "too_short" and isinstance(value, list) and not value:
        msg = "axis is empty"
    elif kind == "string_too_long" and isinstance(value, str):
        msg = f"{msg} (got {len(value)} characters: {value[:20]!r}...)"
    elif kind == "string_pattern_mismatch":
        msg = f"{value!r} is not a valid name: use letters, digits, '_', '.' and '-', starting with a letter or digit"
    elif isinstance(value, (str, int, float, bool)) and not kind.startswith("value_error"):
        # Say what was given, not only what was expected: "Input should be greater than 0 (got -1)".
        msg = f"{msg} (got {value!r})"
    # A model-level check names its field inside the message; a field check gets its path.
    return f"{loc}: {msg}" if loc else msg


class _SafeNoDupLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe loader (no object construction, so a spec can never execute code) that also
    refuses duplicate keys, which plain YAML silently resolves to the last value. The C parser
    where PyYAML has it: the pure-Python one takes seconds over a long axis (100,000 seeds)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_SafeNoDupLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_spec(text: str, origin: str = "spec") -> SweepSpec:
    try:
        raw = yaml.load(text, Loader=_SafeNoDupLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        tag = re.search(r"constructor for the tag '(tag:yaml\.org,2002:)?([^']+)'", problem)
        if tag:
            problem = f"tag !!{tag.group(2)} is not allowed: a spec is plain data and never constructs objects"
        raise BadInput(f"{origin}:{where} invalid YAML: {problem}") from None
    if raw is None:
        raise BadInput(f"{origin}: the spec is empty; it needs at least name, models and tasks")
    if not isinstance(raw, dict):
        raise BadInput(
            f"{origin}: expected a mapping (name:, models:, tasks:, ...) at the top level, got a {type(raw).__name__}"
        )
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise BadInput(f"{origin}: {_format_validation_error(exc)}") from None


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"spec: {str(p)!r} is a directory, not a spec file")
    if not p.exists():
        raise BadInput(f"spec: no such file {str(p)!r}")
    if not p.is_file():
        # A device or a pipe: /dev/zero would be read forever.
        raise BadInput(f"spec: {str(p)!r} is not a regular file")
    size = p.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise BadInput(f"spec: {str(p)!r} is {size / 2**20:.1f} MB; a spec is a small YAML file (at most 1 MB)")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"spec: cannot read {str(p)!r}: {exc}") from None
    return parse_spec(text, origin=p.name)
