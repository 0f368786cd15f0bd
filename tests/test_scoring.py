"""Batched scoring against a straightforward per-example reference computation."""

import numpy as np
import pytest
import torch

from raysweep.scoring import HIDDEN_LAYER, PAIR_0, PROMPT, encode_pair, score_examples
from raysweep.spec import ModelSpec
from raysweep.tasks import Example, prepare_task


@pytest.fixture(scope="module", params=["gpt2", "llama", "gptj"])
def lm(request):
    from raysweep.models import build_tiny, train_tokenizer

    spec = ModelSpec(
        name="x", arch=request.param, tiny={"layers": 5, "hidden": 32, "heads": 2, "vocab": 400, "max_positions": 64}
    )
    tok = train_tokenizer(400, add_bos=request.param == "llama")
    torch.manual_seed(1)
    model = build_tiny(spec, tok).eval()
    # Random weights with some scale so that mistakes in positions would change results.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, tok


def reference(model, tok, ex: Example, layers=(HIDDEN_LAYER,)):
    """One unbatched forward per choice, full logits, plain indexing. Hidden states: the last
    prompt token (from the scoring window) and the last token of each whole (prompt + choice)
    sequence, fed in full (its last `max_length` tokens)."""
    max_length = (
        model.config.max_position_embeddings
        if hasattr(model.config, "max_position_embeddings")
        else model.config.n_positions
    )
    lls, ns = [], []
    hidden = np.zeros((len(layers), 3, model.config.hidden_size), dtype=np.float32)
    for choice, cont in enumerate(ex.continuations):
        pair = encode_pair(tok, ex.prompt, cont)
        ids = (pair.context + pair.continuation)[-max_length - 1 :]
        with torch.no_grad():
            out = model(torch.tensor([ids[:-1]]), output_hidden_states=True)
            whole = model(torch.tensor([(pair.context + pair.continuation)[-max_length:]]), output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0].double(), -1)
        n = len(pair.continuation)
        lls.append(sum(float(logp[k - 1, ids[k]]) for k in range(len(ids) - n, len(ids))))
        ns.append(n)
        for j, layer in enumerate(layers):
            if choice == 0:
                pos = len(ids) - n - 1  # last prompt token: just before the continuation
                hidden[j, PROMPT] = out.hidden_states[layer][0, pos].numpy()
            hidden[j, PAIR_0 + choice] = whole.hidden_states[layer][0, -1].numpy()
    return np.array(lls), np.array(ns), hidden


def test_batched_equals_reference(lm):
    model, tok = lm
    exs = prepare_task("sentiment", seed=3, cap=6, max_chars=2048).split("test") + prepare_task(
        "capital", seed=3, cap=6, max_chars=2048
    ).split("test")
    # A prompt longer than the window exercises left truncation.
    exs.append(
        Example(
            idx=99,
            uid="long",
            prompt="Review: " + "the food was great and " * 30 + "\nAnswer:",
            choices=("no", "yes"),
            gold=1,
        )
    )
    res = score_examples(model, tok, exs, batch_size=4)
    for i, ex in enumerate(exs):
        ll, n, h = reference(model, tok, ex)
        np.testing.assert_allclose(res.ll_sum[i], ll, atol=1e-4)
        np.testing.assert_array_equal(res.n_tokens[i], n)
        np.testing.assert_allclose(res.hidden[i], h, atol=1e-4)
    gold = np.array([e.gold for e in exs])
    mean = res.ll_sum / res.n_tokens
    pc, pd = np.exp(mean[np.arange(len(exs)), gold]), np.exp(mean[np.arange(len(exs)), 1 - gold])
    np.testing.assert_allclose(res.confidence(gold), pc / (pc + pd), rtol=1e-6)
    np.testing.assert_array_equal(res.prediction(), (mean[:, 1] > mean[:, 0]).astype(int))


def test_batch_size_does_not_change_results(lm):
    model, tok = lm
    exs = prepare_task("compare", seed=3, cap=10, max_chars=2048).split("validation")
    a = score_examples(model, tok, exs, batch_size=1)
    b = score_examples(model, tok, exs, batch_size=7)
    np.testing.assert_allclose(a.ll_sum, b.ll_sum, atol=1e-5)
    np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-5)


def test_prefix_sharing_equals_separate_sequences(lm):
    model, tok = lm
    exs = []
    for t in ("capital", "sentiment", "same_word", "compare"):
        exs += prepare_task(t, seed=5, cap=8, max_chars=2048).split("test")
    # Multi-token choices of different lengths, and one that must be truncated (falls back).
    exs.append(
        Example(
            idx=90, uid="a", prompt="Question: which?\nAnswer:", choices=("a much longer answer here", "no"), gold=0
        )
    )
    exs.append(
        Example(idx=91, uid="b", prompt="Review: " + "great and " * 40 + "\nAnswer:", choices=("no", "yes"), gold=1)
    )
    shared = score_examples(model, tok, exs, batch_size=5, share_prefix=True)
    separate = score_examples(model, tok, exs, batch_size=5, share_prefix=False)
    np.testing.assert_allclose(shared.ll_sum, separate.ll_sum, atol=1e-4)
    np.testing.assert_array_equal(shared.n_tokens, separate.n_tokens)
    np.testing.assert_allclose(shared.hidden, separate.hidden, atol=1e-4)


def test_prefix_sharing_with_eager_attention_takes_an_additive_mask(lm):
    """The packed rows' block mask goes in as booleans for SDPA and as an additive float
    mask for the eager attention; both must equal scoring each pair separately."""
    model, tok = lm
    exs = prepare_task("capital", seed=7, cap=8, max_chars=2048).split("test")
    exs.append(
        Example(
            idx=90, uid="a", prompt="Question: which?\nAnswer:", choices=("a much longer answer here", "no"), gold=0
        )
    )
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        shared = score_examples(model, tok, exs, batch_size=3, share_prefix=True)
        separate = score_examples(model, tok, exs, batch_size=3, share_prefix=False)
    finally:
        model.set_attn_implementation(before)
    np.testing.assert_allclose(shared.ll_sum, separate.ll_sum, atol=1e-4)
    np.testing.assert_allclose(shared.hidden, separate.hidden, atol=1e-4)


def test_pair_states_at_several_layers_equal_whole_sequences(lm):
    """The pair probes read the state at the last token of (prompt + choice): the answer's
    final token must be fed, on the packed path and on the separate one, at every layer asked."""
    model, tok = lm
    exs = prepare_task("capital", seed=9, cap=5, max_chars=2048).split("test")
    exs.append(
        Example(
            idx=90, uid="a", prompt="Question: which?\nAnswer:", choices=("a much longer answer here", "no"), gold=0
        )
    )
    exs.append(
        Example(idx=91, uid="b", prompt="Review: " + "great and " * 40 + "\nAnswer:", choices=("no", "yes"), gold=1)
    )
    layers = (-5, -2, -1)
    for share in (True, False):
        res = score_examples(model, tok, exs, batch_size=3, share_prefix=share, layers=layers)
        assert res.hidden.shape == (len(exs), 3, 3, model.config.hidden_size) and res.layers == layers
        for i, ex in enumerate(exs):
            _, _, h = reference(model, tok, ex, layers)
            np.testing.assert_allclose(res.hidden[i], h, atol=1e-4)
        # The two choices' final states differ: a pair state is not a copy of the prompt's.
        assert np.abs(res.hidden[:, :, 1] - res.hidden[:, :, 2]).max() > 1e-3


def test_layers_out_of_range_are_refused(lm):
    model, tok = lm
    exs = prepare_task("capital", seed=9, cap=2, max_chars=2048).split("test")
    with pytest.raises(ValueError, match="out of range"):
        score_examples(model, tok, exs, layers=(-(model.config.num_hidden_layers + 2),))


def test_hooked_states_equal_output_hidden_states_at_every_layer(lm):
    """The states are gathered by hooks on the blocks, never by asking the model for every
    layer's output: at each index (embeddings 0, a middle block, the normalised last), they
    equal the model's own `output_hidden_states` at the same positions."""
    model, tok = lm
    exs = prepare_task("capital", seed=11, cap=6, max_chars=2048).split("test")
    n = model.config.num_hidden_layers
    layers = (0, 1, n // 2, -2, -1)
    base = getattr(model, model.base_model_prefix)
    asked = []
    real_forward = base.forward

    def spy(*args, **kwargs):
        asked.append(bool(kwargs.get("output_hidden_states")))
        return real_forward(*args, **kwargs)

    base.forward = spy
    try:
        res = score_examples(model, tok, exs, batch_size=4, layers=layers)
    finally:
        del base.forward
    assert asked and not any(asked)
    for i, ex in enumerate(exs):
        _, _, h = reference(model, tok, ex, layers)
        np.testing.assert_allclose(res.hidden[i], h, atol=1e-5)


def test_rows_pack_several_examples_without_changing_results(lm):
    """Short examples fill the room a long one leaves in its row; each still sees only
    itself, so results equal each example scored on its own."""
    from raysweep.scoring import _pack_rows

    lengths = [40, 12, 5, 30, 7, 9, 3, 35]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = _pack_rows(lengths, order, batch_size=2)
    placed = sorted(i for _, rows in batches for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(len(rows) <= 2 and all(sum(lengths[i] for i in row) <= width for row in rows) for width, rows in batches)
    assert batches[0][0] == 40 and any(len(row) > 1 for row in batches[0][1])
    # Fewer positions than one padded row per example.
    assert sum(width * len(rows) for width, rows in batches) < sum(
        lengths[order[k]] * len(order[k : k + 2]) for k in range(0, len(order), 2)
    )

    model, tok = lm
    exs = prepare_task("capital", seed=13, cap=6, max_chars=2048).split("test")
    exs.append(
        Example(
            idx=90,
            uid="a",
            prompt="Question: which one is it?\nAnswer:",
            choices=("a much longer answer here", "no"),
            gold=0,
        )
    )
    exs.append(Example(idx=91, uid="b", prompt="Q:", choices=("yes", "no"), gold=1))
    packed = score_examples(model, tok, exs, batch_size=2)
    for i, ex in enumerate(exs):
        ll, _, h = reference(model, tok, ex)
        np.testing.assert_allclose(packed.ll_sum[i], ll, atol=1e-4)
        np.testing.assert_allclose(packed.hidden[i], h, atol=1e-5)


def min_k_reference(model, tok, ex: Example, fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Min-K% and Min-K%++ of each choice from one unbatched forward in float64: the mean of
    the lowest ceil(k n) token log-probs, and of the lowest standardised ones, (log p(x) - mu)
    / sigma with mu, sigma^2 the mean and variance of log p(z) under p at that position."""
    max_length = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    out_k, out_pp = [], []
    for cont in ex.continuations:
        pair = encode_pair(tok, ex.prompt, cont)
        ids = (pair.context + pair.continuation)[-max_length - 1 :]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        n = len(pair.continuation)
        lp, z = [], []
        for k in range(len(ids) - n, len(ids)):
            row = logp[k - 1]
            mu = float((row.exp() * row).sum())
            sigma = float(((row.exp() * row * row).sum() - mu * mu).sqrt())
            lp.append(float(row[ids[k]]))
            z.append((float(row[ids[k]]) - mu) / sigma)
        keep = max(1, int(np.ceil(fraction * n)))
        out_k.append(np.mean(sorted(lp)[:keep]))
        out_pp.append(np.mean(sorted(z)[:keep]))
    return np.array(out_k), np.array(out_pp)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_min_k_statistics_equal_a_per_token_reference(lm, share_prefix):
    model, tok = lm
    # capital's answers are several tokens long (Min-K% then averages the lowest of them);
    # the long prompt is cut to the window, which only the separate path scores.
    exs = prepare_task("capital", seed=3, cap=6, max_chars=2048).split("test") + prepare_task(
        "sentiment", seed=3, cap=4, max_chars=2048
    ).split("test")
    exs.append(
        Example(
            idx=99, uid="long", prompt="Review: " + "so good and " * 40 + "\nAnswer:", choices=("no", "yes"), gold=1
        )
    )
    res = score_examples(model, tok, exs, batch_size=3, share_prefix=share_prefix)
    assert max(len(encode_pair(tok, ex.prompt, c).continuation) for ex in exs for c in ex.continuations) >= 5
    for i, ex in enumerate(exs):
        want_k, want_pp = min_k_reference(model, tok, ex)
        np.testing.assert_allclose(res.min_k[i], want_k, atol=1e-4)
        np.testing.assert_allclose(res.min_k_pp[i], want_pp, atol=1e-3)
    # Min-K% over at least one token is never above the continuation's mean log-prob.
    assert np.all(res.min_k <= res.ll_sum / res.n_tokens + 1e-6)
