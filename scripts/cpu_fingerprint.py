"""What a built-in model's pipeline computes on this processor, as hashes: a short pretraining
(the demo model's recipe, fewer steps), one fine-tuning epoch with the trial's optimizer, and
the per-example scores of the tuned model. Two x86 machines that print different hashes would
print different demo summaries. Run it under an emulated processor to compare without one:

    qemu-x86_64 -cpu Haswell .venv/bin/python scripts/cpu_fingerprint.py   # Intel
    qemu-x86_64 -cpu EPYC .venv/bin/python scripts/cpu_fingerprint.py      # AMD

(qemu computes the hardware's approximate instructions exactly, so an approximate result
anywhere in the pipeline shows as a difference from the native run.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from raysweep.models import ensure_builtin, load_model  # noqa: E402  (pins the CPU paths before torch runs)
from raysweep.spec import FinetuneConfig, load_spec  # noqa: E402


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint(steps: int, examples: int) -> dict:
    import torch

    from raysweep.methods import nll_loss
    from raysweep.scoring import score_examples
    from raysweep.tasks.base import prepare_task
    from raysweep.train import build_batches, make_optimizer, train_epoch

    demo = load_spec(ROOT / "specs" / "quickstart.yaml").models[0]
    spec = demo.model_copy(update={"pretrain": demo.pretrain.model_copy(update={"steps": steps})})
    with tempfile.TemporaryDirectory() as models_dir:
        ensure_builtin(spec, Path(models_dir))
        loaded = load_model(spec, Path(models_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    pretrained = _digest(p.detach().numpy() for p in model.parameters())
    task = prepare_task("compare", seed=0, cap=examples, max_chars=2000)
    train = task.split("train")
    cfg = FinetuneConfig(optimizer="adamw", lr=1e-3, batch_size=8, max_epochs=1)
    torch.manual_seed(0)
    batches = build_batches(tokenizer, model, train, [ex.gold for ex in train], cfg.batch_size, random.Random(0))
    loss = train_epoch(model, make_optimizer(model, cfg), batches, nll_loss)
    scores = score_examples(model, tokenizer, task.split("test"), batch_size=16)
    return {
        "pretrained_weights": pretrained,
        "finetuned_weights": _digest(p.detach().numpy() for p in model.parameters()),
        "finetune_loss": loss,
        "test_loglikelihoods": _digest([scores.ll_sum, scores.min_k, scores.min_k_pp]),
        "test_hidden": _digest([scores.hidden]),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="pretraining steps")
    parser.add_argument("--examples", type=int, default=48, help="compare examples per split")
    args = parser.parse_args()
    print(json.dumps(fingerprint(args.steps, args.examples)))
