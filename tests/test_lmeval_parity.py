"""`raysweep.scoring.loglikelihoods` against lm-eval's HFLM, on tiny local models.

Both a GPT-2 (its tokenizer adds no BOS) and a Llama (its tokenizer prepends BOS, as real
Llama tokenizers do) are built from configs with byte-level BPE tokenizers trained here, in
float32, with large random weights so that each token's log-probability differs clearly from
its neighbours' (near-uniform predictions would hide an off-by-one). The requests are every
choice of every record of the 21 task fixtures, exactly as lm-eval builds them
(context = prompt, continuation = " " + choice), plus inputs longer than the model's
window, continuations near the window's size, and contexts ending in whitespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from raysweep.scoring import loglikelihoods  # noqa: E402
from raysweep.tasks import get_task  # noqa: E402
from raysweep.tasks.real import REAL_TASKS  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
MAX_LENGTH = 128  # model window, in tokens: dozens of fixture requests are longer
TOL = 1e-4


def close(ours: float, theirs: float) -> bool:
    # lm-eval sums a continuation's log-probabilities in float32, so its own rounding grows
    # with the sum: allow float32's relative precision on top of the absolute 1e-4.
    return abs(ours - theirs) <= TOL + 2e-7 * abs(theirs)


def fixture_texts() -> list[str]:
    return [line for path in sorted(FIXTURES.glob("*/*.jsonl")) for line in path.read_text().splitlines()]


def train_tokenizer(llama_style: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"] if llama_style else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(fixture_texts(), trainer)
    if llama_style:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@dataclass
class Tiny:
    arch: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast


def build(arch: str) -> Tiny:
    tok = train_tokenizer(llama_style=arch == "llama")
    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.5
    )
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_LENGTH,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=MAX_LENGTH,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        model = GPT2LMHeadModel(cfg)
    return Tiny(arch, model.float().eval(), tok)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request) -> Tiny:
    return build(request.param)


def task_requests() -> list[tuple[str, str]]:
    """Every choice of every fixture record of the 21 tasks, as lm-eval requests it."""
    out = []
    for name in REAL_TASKS:
        task = get_task(name)
        raw, _ = task.load_records(str(FIXTURES / name), seed=0)
        for records in raw.values():
            for rec in records:
                prompt, choices, _ = task.render(rec)
                out += [(prompt, task.delimiter + c) for c in choices]
    return out


def edge_requests() -> list[tuple[str, str]]:
    long_context = "\n".join(p for p, _ in task_requests()[::7])  # thousands of characters
    return [
        (long_context, " yes"),
        (long_context, "  the sun was rising."),  # COPA-style, cut from the left
        (long_context, " " + "no " * 60),  # continuation close to the window: context cut to a few tokens
        ("Answer:", " " + "no " * 60),
        ("Question: Is water wet?\nAnswer: ", "yes"),  # trailing space moves to the continuation
        ("Question: Is water wet?\nAnswer:\n\n", " yes"),
        ("Sentence 1: x\nSentence 2: y\nQuestion: same?\nAnswer:", " no"),
    ]


def lm_eval_loglikelihoods(tiny: Tiny, requests, batch_size: int) -> list[float]:
    lm = HFLM(pretrained=tiny.model, tokenizer=tiny.tokenizer, batch_size=batch_size)
    assert lm.max_length == MAX_LENGTH
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    return [ll for ll, _greedy in lm.loglikelihood(instances, disable_tqdm=True)]


def test_tokenizers_follow_their_families(tiny):
    ids = tiny.tokenizer("Question: a")["input_ids"]
    if tiny.arch == "llama":
        assert ids[0] == tiny.tokenizer.bos_token_id
    else:
        assert tiny.tokenizer.bos_token_id not in ids


def test_model_is_sharp_enough_to_catch_misalignment(tiny):
    ids = tiny.tokenizer(
        "Question: How do you attach toilet paper?\nAnswer: Put it on the holder.", return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(ids).logits[0, :-1], dim=-1)
    per_token = logp.gather(1, ids[0, 1:, None]).squeeze(1)
    assert per_token.std() > 1.0  # a one-position shift would change sums far beyond TOL


def test_requests_cover_truncation_and_copa(tiny):
    requests = task_requests() + edge_requests()
    lengths = [len(tiny.tokenizer(c + x)["input_ids"]) for c, x in requests]
    assert sum(n > MAX_LENGTH + 1 for n in lengths) >= 5
    assert any(x.startswith("  ") and not x.startswith("   ") for _, x in task_requests())


def test_loglikelihoods_match_lm_eval_on_all_task_fixtures(tiny):
    requests = task_requests()
    assert len(requests) > 300
    theirs = lm_eval_loglikelihoods(tiny, requests, batch_size=8)
    ours = loglikelihoods(tiny.model, tiny.tokenizer, requests, batch_size=5)
    assert len(ours) == len(theirs)
    bad = [(r, a, b) for r, a, b in zip(requests, ours, theirs) if not close(a, b)]
    assert not bad, f"{len(bad)} of {len(requests)} differ, first: {bad[0]}"


def test_loglikelihoods_match_lm_eval_on_edge_requests(tiny):
    requests = edge_requests()
    theirs = lm_eval_loglikelihoods(tiny, requests, batch_size=3)
    for batch_size in (1, 4):
        ours = loglikelihoods(tiny.model, tiny.tokenizer, requests, batch_size=batch_size)
        for r, a, b in zip(requests, ours, theirs):
            assert close(a, b), (r[0][-40:], r[1][:40], a, b)


# Rules of lm-eval that no task here exercises: contexts are never empty and never start with
# the BOS text, but a user's own task may do either.
def test_context_starting_with_bos_text_llama():
    tiny = build("llama")
    requests = [("<s>Question: a\nAnswer:", " no")]
    theirs = lm_eval_loglikelihoods(tiny, requests, batch_size=1)
    ours = loglikelihoods(tiny.model, tiny.tokenizer, requests, batch_size=1)
    assert close(ours[0], theirs[0])


def test_empty_context_llama():
    tiny = build("llama")
    requests = [("", " no")]
    theirs = lm_eval_loglikelihoods(tiny, requests, batch_size=1)
    ours = loglikelihoods(tiny.model, tiny.tokenizer, requests, batch_size=1)
    assert close(ours[0], theirs[0])
