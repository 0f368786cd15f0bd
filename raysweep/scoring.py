"""Scoring: log-likelihood of each choice given the prompt, with lm-eval's rules.

One forward pass per example (its prompt once, both choices packed after it) answers
everything the store needs: the summed and per-token log-likelihood of each continuation,
and, at the chosen layers (default the fifth-to-last), the hidden state of the last prompt
token and of the last token of each (prompt + choice) pair. The request encoding follows
lm-evaluation-harness exactly: trailing context whitespace moves to the continuation, the
pair is encoded jointly, BOS as the tokenizer adds it, left truncation that never cuts the
continuation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from raysweep.tasks.base import Example

HIDDEN_LAYER = -5  # the paper's "fifth to last layer"


@dataclass(frozen=True)
class EncodedPair:
    context: list[int]
    continuation: list[int]


def _prefix_token(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _adds_special_tokens(text: str, bos_text: str) -> bool:
    # A string that already starts with the BOS text gets no second BOS (lm-eval's tok_encode).
    return not (bos_text and text.startswith(bos_text))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=_adds_special_tokens(text, tokenizer.decode(_prefix_token(tokenizer))))


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves the context's trailing whitespace to the front of the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str, context_ids: list[int] | None = None) -> EncodedPair:
    if context == "":
        # lm-eval conditions an empty context on the BOS (else EOS) token, unless the
        # continuation already starts with it.
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token(tokenizer)
        if cont and cont[0] == prefix:
            return EncodedPair(cont[:1], cont[1:])
        return EncodedPair([prefix], cont)
    context, continuation = _move_trailing_space(context, continuation)
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context) if context_ids is None else context_ids
    return EncodedPair(ctx, whole[len(ctx) :])


def encode_choices(tokenizer, prompt: str, continuations: tuple[str, str]) -> tuple[EncodedPair, EncodedPair]:
    """Both choices of one example; the context is encoded once when both move the same
    trailing whitespace (always, since it depends on the prompt alone)."""
    p0 = encode_pair(tokenizer, prompt, continuations[0])
    if prompt.rstrip() == "":
        return p0, encode_pair(tokenizer, prompt, continuations[1])
    return p0, encode_pair(tokenizer, prompt, continuations[1], context_ids=p0.context)


def encode_examples(tokenizer, examples: Sequence[Example]) -> list[tuple[EncodedPair, EncodedPair]]:
    """`encode_choices` for many examples with one tokenizer call per kind of string: the
    per-call overhead of a fast tokenizer is most of the cost of encoding short prompts."""
    bos_text = tokenizer.decode(_prefix_token(tokenizer))
    texts: dict[str, None] = {}
    split: list[tuple[str, str, str] | None] = []
    for ex in examples:
        if ex.prompt.rstrip() == "":
            split.append(None)  # empty context: the BOS rules of encode_pair
            continue
        context, cont0 = _move_trailing_space(ex.prompt, ex.continuations[0])
        _, cont1 = _move_trailing_space(ex.prompt, ex.continuations[1])
        split.append((context, context + cont0, context + cont1))
        texts.update(dict.fromkeys(split[-1]))
    ids = _encode_many(tokenizer, list(texts), bos_text)
    out = []
    for ex, parts in zip(examples, split):
        if parts is None:
            out.append(encode_choices(tokenizer, ex.prompt, ex.continuations))
            continue
        ctx = ids[parts[0]]
        out.append((EncodedPair(ctx, ids[parts[1]][len(ctx) :]), EncodedPair(ctx, ids[parts[2]][len(ctx) :])))
    return out


def _encode_many(tokenizer, texts: list[str], bos_text: str) -> dict[str, list[int]]:
    """`_encode` of each text, batched."""
    out: dict[str, list[int]] = {}
    for add in (True, False):
        group = [t for t in texts if _adds_special_tokens(t, bos_text) == add]
        if group:
            out.update(zip(group, tokenizer(group, add_special_tokens=add)["input_ids"]))
    return out


def model_max_length(model, tokenizer=None) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(model.config, attr, None)
        if v:
            return int(v)
    if tokenizer is not None and getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1e9:
        return int(tokenizer.model_max_length)
    return 2048


@dataclass(frozen=True)
class _Seq:
    """One (context, continuation) request as a token window: the model reads all but the
    last token, and the last n_cont tokens are the continuation's targets."""

    input_ids: list[int]  # at most max_length + 1 tokens, cut from the left
    n_cont: int
    last_prompt_pos: int  # position of the last context token (-1 if truncated away)


# Rows of `ScoreResult.hidden[:, layer]`: the last prompt token, then the last token of
# (prompt + choice 0) and of (prompt + choice 1).
PROMPT, PAIR_0, PAIR_1 = 0, 1, 2


@dataclass
class ScoreResult:
    ll_sum: np.ndarray  # (n_examples, 2) float64
    n_tokens: np.ndarray  # (n_examples, 2) int
    hidden: np.ndarray | None  # (n_examples, n_layers, 3, d) float32: PROMPT, PAIR_0, PAIR_1
    layers: tuple[int, ...] = (HIDDEN_LAYER,)

    @property
    def ll_mean(self) -> np.ndarray:
        return self.ll_sum / np.maximum(self.n_tokens, 1)

    def confidence(self, gold: np.ndarray) -> np.ndarray:
        """p_c / (p_c + p_d) with p = exp(average-token log-likelihood)."""
        m = self.ll_mean
        rows = np.arange(len(gold))
        diff = m[rows, gold] - m[rows, 1 - gold]
        return 1.0 / (1.0 + np.exp(-diff))

    def prediction(self) -> np.ndarray:
        m = self.ll_mean
        return (m[:, 1] > m[:, 0]).astype(np.int8)


def _base_and_head(model):
    base = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if base is None or head is None:  # pragma: no cover - every causal LM in transformers has both
        raise TypeError(f"{type(model).__name__}: cannot split into base model and LM head")
    return base, head


def pad_id(tokenizer) -> int:
    """Padding never reaches a score (masked, or past the last real token): any id will do."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def check_layers(model, layers: Sequence[int]) -> tuple[int, ...]:
    """The model's hidden states are the embeddings plus one entry per block."""
    n = model.config.num_hidden_layers + 1
    bad = [layer for layer in layers if not -n <= layer < n]
    if bad:
        raise ValueError(f"scoring.layers {bad} out of range for a model with {n - 1} layers (use -{n} .. {n - 1})")
    return tuple(layers)


def _windows(pairs: Sequence[EncodedPair], max_length: int) -> list[_Seq]:
    seqs = []
    for pair in pairs:
        if len(pair.continuation) > max_length:
            raise ValueError(f"continuation of {len(pair.continuation)} tokens does not fit the model's {max_length}-token window")
        full = (pair.context + pair.continuation)[-(max_length + 1) :]
        dropped = len(pair.context) + len(pair.continuation) - len(full)
        seqs.append(_Seq(input_ids=full, n_cont=len(pair.continuation), last_prompt_pos=len(pair.context) - 1 - dropped))
    return seqs


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """Summed log-likelihood of each (context, continuation), exactly as lm-eval computes it."""
    max_length = model_max_length(model, tokenizer)
    windows = _windows([encode_pair(tokenizer, ctx, cont) for ctx, cont in requests], max_length)
    sums, _ = _run_windows(model, windows, batch_size, pad_id(tokenizer), [False] * len(requests), (), max_length)
    return [float(x) for x in sums]


def _layer_states(out, layers: Sequence[int]) -> list[torch.Tensor]:
    return [out.hidden_states[layer] for layer in layers]


@torch.inference_mode()
def _run_windows(model, windows: Sequence[_Seq], batch_size: int, pad_id: int, want_hidden: Sequence[bool],
                 layers: Sequence[int], max_length: int):
    """Summed continuation log-likelihood of each window, and where asked its hidden states
    at `layers`: (n_layers, 2, d) of the last prompt token and of the last token of the
    whole (prompt + continuation) sequence.

    Sorted by length so a batch carries little padding; right padding with an attention
    mask leaves every real position unchanged under causal attention. The LM head runs only
    at continuation positions: full-vocabulary logits at every prompt position would cost
    more memory than the forward pass itself. The continuation's last token is fed as well
    when its state is wanted; a window already cut to the model's length gets that state
    from a second pass over its last `max_length` tokens.
    """
    base, head = _base_and_head(model)
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))
    sums = np.zeros(len(windows), dtype=np.float64)
    hidden: dict[int, np.ndarray] = {}
    fed = [len(w.input_ids) - (0 if want and len(w.input_ids) <= max_length else 1) for w, want in zip(windows, want_hidden)]
    late = [i for i in order if want_hidden[i] and fed[i] < len(windows[i].input_ids)]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(fed[i] for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for r, i in enumerate(idx):
            w = windows[i].input_ids
            n = len(w) - 1
            ids[r, : fed[i]] = torch.tensor(w[: fed[i]])
            mask[r, : fed[i]] = 1
            for k in range(n - windows[i].n_cont, n):
                rows.append(r)
                cols.append(k)
                targets.append(w[k + 1])
                owner.append(i)
        ids, mask = ids.to(device), mask.to(device)
        need_hidden = any(want_hidden[i] for i in idx)
        out = base(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden, use_cache=False)
        states = out.last_hidden_state[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logp = torch.log_softmax(head(states).float(), dim=-1)
        picked = logp.gather(1, torch.tensor(targets, device=device).unsqueeze(1)).squeeze(1).double().cpu().numpy()
        np.add.at(sums, np.array(owner), picked)
        if need_hidden:
            per_layer = _layer_states(out, layers)
            for r, i in enumerate(idx):
                if want_hidden[i]:
                    h = np.zeros((len(layers), 2, per_layer[0].shape[-1]), dtype=np.float32)
                    for j, layer in enumerate(per_layer):
                        h[j, 0] = layer[r, max(windows[i].last_prompt_pos, 0)].float().cpu().numpy()
                        h[j, 1] = layer[r, fed[i] - 1].float().cpu().numpy()
                    hidden[i] = h
    for start in range(0, len(late), batch_size):
        idx = late[start : start + batch_size]
        ids = torch.tensor([windows[i].input_ids[-max_length:] for i in idx], device=device)
        per_layer = _layer_states(base(input_ids=ids, output_hidden_states=True, use_cache=False), layers)
        for r, i in enumerate(idx):
            for j, layer in enumerate(per_layer):
                hidden[i][j, 1] = layer[r, -1].float().cpu().numpy()
    return sums, hidden


def _packed_mask_format(model) -> str | None:
    """How a custom 4D attention mask reaches this model's attention, or None where it
    cannot (flash attention takes no dense mask: those models score pairs separately)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return {"sdpa": "bool", "eager": "additive"}.get(impl)


@torch.inference_mode()
def _run_packed(model, prompts: Sequence[list[int]], conts: Sequence[tuple[list[int], list[int]]], batch_size: int,
                pad_id: int, layers: Sequence[int]):
    """Prefix sharing in one forward pass: each row holds the prompt once and then both
    choices side by side, [prompt][choice 0][choice 1], each choice's last token fed only
    when hidden states are asked for (`layers`): the pair probes read the state there.

    A block attention mask lets each choice see the prompt and its own earlier tokens, never
    the other choice, and both choices' positions continue from the prompt's end, so every
    continuation token is computed as in its own (prompt, choice) sequence. The prompt's last
    position predicts both first tokens and gives the prompt's hidden state. Against scoring
    the two sequences separately this skips one copy of the prompt, which is most of the work
    for the long prompts and short answers of these tasks; against a KV-cache second pass it
    saves a forward call and the cache copies.
    """
    base, head = _base_and_head(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    additive = _packed_mask_format(model) == "additive"
    capture = bool(layers)
    cut = 0 if capture else 1  # the last token of a choice is only a target unless its state is read
    n = len(prompts)
    lengths = [len(prompts[i]) + len(conts[i][0]) + len(conts[i][1]) - 2 * cut for i in range(n)]
    # Without hidden states, examples whose choices are one token each form batches of their
    # own: their rows are plain prompts, right-padded, which need no mask at all (padding
    # comes after every position that is read) and so get the fused causal attention kernel.
    single = [not capture and len(conts[i][0]) == 1 and len(conts[i][1]) == 1 for i in range(n)]
    order = sorted(range(n), key=lambda i: (single[i], -lengths[i]))
    sums = np.zeros((n, 2), dtype=np.float64)
    hidden = np.zeros((n, len(layers), 3, model.config.hidden_size), dtype=np.float32) if capture else None
    n_multi = n - sum(single)
    batches = [order[i : min(i + batch_size, n_multi)] for i in range(0, n_multi, batch_size)]
    batches += [order[i : i + batch_size] for i in range(n_multi, n, batch_size)]
    # Unmasked rows' padding is never read, but transformers warns about any pad id it sees
    # without a mask: fill it with another token.
    unread = pad_id if pad_id != model.config.pad_token_id else (pad_id + 1) % model.config.vocab_size
    for idx in batches:
        b, width = len(idx), lengths[idx[0]]
        ids = torch.full((b, width), unread if single[idx[0]] else pad_id, dtype=torch.long)
        segment = torch.full((b, width), -1, dtype=torch.int8)  # 0 prompt, 1 / 2 choice 0 / 1, -1 padding
        positions = torch.zeros((b, width), dtype=torch.long)
        read_at = torch.zeros((b, 3), dtype=torch.long)  # PROMPT, PAIR_0, PAIR_1 positions
        sel_r, sel_c, sel_t, owner = [], [], [], []
        for r, i in enumerate(idx):
            p, (c0, c1) = prompts[i], conts[i]
            P, a, z = len(p), len(c0) - cut, len(c1) - cut
            row = p + c0[: a] + c1[: z]
            ids[r, : len(row)] = torch.tensor(row)
            segment[r, :P], segment[r, P : P + a], segment[r, P + a : len(row)] = 0, 1, 2
            positions[r, : P + a] = torch.arange(P + a)
            positions[r, P + a : len(row)] = torch.arange(P, P + z)
            read_at[r] = torch.tensor([P - 1, P + a - 1, len(row) - 1])
            for choice, (cont, first) in enumerate(((c0, P), (c1, P + a))):
                for k, tok in enumerate(cont):
                    sel_r.append(r)
                    sel_c.append(P - 1 if k == 0 else first + k - 1)
                    sel_t.append(tok)
                    owner.append(2 * r + choice)
        mask = None
        if not single[idx[0]]:
            seg = segment.to(device)
            q, k = seg.unsqueeze(2), seg.unsqueeze(1)
            causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
            allowed = causal & (k >= 0) & ((k == 0) | (k == q))
            # Padding rows attend to themselves only: a row with nothing to attend to gives NaN.
            allowed |= torch.eye(width, dtype=torch.bool, device=device) & (q < 0)
            mask = allowed.unsqueeze(1)
            if additive:
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
        out = base(input_ids=ids.to(device), attention_mask=mask, position_ids=positions.to(device),
                   output_hidden_states=capture, use_cache=False)
        states = out.last_hidden_state[torch.tensor(sel_r, device=device), torch.tensor(sel_c, device=device)]
        logp = torch.log_softmax(head(states).float(), dim=-1)
        picked = logp.gather(1, torch.tensor(sel_t, device=device).unsqueeze(1)).squeeze(1).double().cpu().numpy()
        flat = np.zeros(2 * b, dtype=np.float64)
        np.add.at(flat, np.array(owner), picked)
        sums[idx] += flat.reshape(b, 2)
        if capture:
            rows = torch.arange(b, device=device).unsqueeze(1)
            at = read_at.to(device)
            for j, layer in enumerate(_layer_states(out, layers)):
                hidden[idx, j] = layer[rows, at].float().cpu().numpy()
    return sums, hidden


def score_examples(model, tokenizer, examples: Sequence[Example], batch_size: int = 32, capture_hidden: bool = True,
                   share_prefix: bool = True, layers: Sequence[int] = (HIDDEN_LAYER,)) -> ScoreResult:
    """Both choices of every example, batched, with lm-eval's encoding. With `share_prefix`
    the prompt is encoded once per example; examples whose window must be truncated (where
    the two choices see different prompt tokens) are scored as separate sequences. With
    `capture_hidden`, the states at `layers` of the last prompt token and of the last token of
    each (prompt + choice) come from the same forward pass."""
    max_length = model_max_length(model, tokenizer)
    pad = pad_id(tokenizer)
    layers = check_layers(model, layers) if capture_hidden else ()
    n = len(examples)
    ll_sum = np.zeros((n, 2), dtype=np.float64)
    n_tokens = np.zeros((n, 2), dtype=np.int64)
    hidden = np.zeros((n, len(layers), 3, model.config.hidden_size), dtype=np.float32) if capture_hidden and n else None
    shared, separate = [], []
    pairs = encode_examples(tokenizer, examples)
    share_prefix = share_prefix and _packed_mask_format(model) is not None
    # A packed row feeds each choice's last token when its state is read: one position more.
    room = max_length if capture_hidden else max_length + 1
    for i, (p0, p1) in enumerate(pairs):
        n_tokens[i] = (len(p0.continuation), len(p1.continuation))
        fits = max(len(p0.context) + len(p0.continuation), len(p1.context) + len(p1.continuation)) <= room
        ok = share_prefix and fits and p0.context == p1.context and len(p0.continuation) > 0 and len(p1.continuation) > 0
        (shared if ok else separate).append(i)
    if shared:
        sums, hid = _run_packed(model, [pairs[i][0].context for i in shared],
                                [(pairs[i][0].continuation, pairs[i][1].continuation) for i in shared], batch_size, pad, layers)
        ll_sum[shared] = sums
        if capture_hidden:
            hidden[shared] = hid
    if separate:
        windows = _windows([p for i in separate for p in pairs[i]], max_length)
        sums, hid = _run_windows(model, windows, batch_size, pad, [capture_hidden] * len(windows), layers, max_length)
        ll_sum[separate] = sums.reshape(-1, 2)
        if capture_hidden:
            for k, i in enumerate(separate):
                hidden[i, :, PROMPT] = hid[2 * k][:, 0]
                hidden[i, :, PAIR_0] = hid[2 * k][:, 1]
                hidden[i, :, PAIR_1] = hid[2 * k + 1][:, 1]
    return ScoreResult(ll_sum=ll_sum, n_tokens=n_tokens, hidden=hidden, layers=tuple(layers) or (HIDDEN_LAYER,))
