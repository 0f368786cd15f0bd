"""What identifies a built-in model's bits: sha256 of its weights (tensors in name order) and
of its tokenizer, and its pretraining loss. When `make demo` prints another summary on another
machine, compare these first: equal fingerprints put the difference in the trial (fine-tuning
or scoring), different ones in the pretraining.

    python scripts/demo_fingerprint.py storage/demo/models/tiny-gpt2-gpt2-<key>
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def fingerprint(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    return {
        "weights_sha256": hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest(),
        "tokenizer_sha256": hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest(),
        "pretrain_loss": json.loads((model_dir / "READY").read_text())["pretrain_loss"],
    }


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "model.safetensors").is_file():
        print("usage: demo_fingerprint.py MODEL_DIR (a folder holding model.safetensors)", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(fingerprint(Path(sys.argv[1]))))
