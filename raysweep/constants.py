"""Names every stage of the pipeline shares, defined once: a split, phase or milestone name
written here is a value in the store, so it is spelled the same from the spec to the report."""

from __future__ import annotations

# The splits of a prepared task, in the order a trial scores them.
SPLITS = ("train", "validation", "test")

# A trial's phases in the order it runs them; "pretrained" is the scoring of the model it
# starts from, before any training.
PHASES = ("pretrained", "finetune", "forget", "relearn")
TRAINED_PHASES = PHASES[1:]

# The points the analyses compare: the model a trial starts from, its best fine-tuning epoch
# and its last forgetting epoch.
MILESTONES = ("pretrained", "finetuned", "forgotten")
