"""Scoring: log-likelihood of each choice given the prompt, with lm-eval's rules.

One forward pass per (example, choice) sequence answers everything the store needs: the
summed and per-token log-likelihood of the continuation, and the hidden state of the last
prompt token at the fifth-to-last layer. The request encoding follows lm-evaluation-harness
exactly (see TASKS.md): trailing context whitespace moves to the continuation, the pair is
encoded jointly, BOS as the tokenizer adds it, left truncation that never cuts the
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


def _encode(tokenizer, text: str) -> list[int]:
    # A string that already starts with the BOS text gets no second BOS (lm-eval's tok_encode).
    bos_text = tokenizer.decode(_prefix_token(tokenizer))
    if bos_text and text.startswith(bos_text):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str, context_ids: list[int] | None = None) -> EncodedPair:
    if context == "":
        # lm-eval conditions an empty context on the BOS (else EOS) token, unless the
        # continuation already starts with it.
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token(tokenizer)
        if cont and cont[0] == prefix:
            return EncodedPair(cont[:1], cont[1:])
        return EncodedPair([prefix], cont)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
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


@dataclass
class ScoreResult:
    ll_sum: np.ndarray  # (n_examples, 2) float64
    n_tokens: np.ndarray  # (n_examples, 2) int
    hidden: np.ndarray | None  # (n_examples, d) float32

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
    windows = _windows([encode_pair(tokenizer, ctx, cont) for ctx, cont in requests], model_max_length(model, tokenizer))
    sums, _ = _run_windows(model, windows, batch_size, pad_id(tokenizer), want_hidden=[False] * len(requests))
    return [float(x) for x in sums]


@torch.inference_mode()
def _run_windows(model, windows: Sequence[_Seq], batch_size: int, pad_id: int, want_hidden: Sequence[bool]):
    """Summed continuation log-likelihood of each window (and hidden states where asked).

    Sorted by length so a batch carries little padding; right padding with an attention
    mask leaves every real position unchanged under causal attention. The LM head runs only
    at continuation positions: full-vocabulary logits at every prompt position would cost
    more memory than the forward pass itself.
    """
    base, head = _base_and_head(model)
    device = next(model.parameters()).device
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))
    sums = np.zeros(len(windows), dtype=np.float64)
    hidden: dict[int, np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = len(windows[idx[0]].input_ids) - 1
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for r, i in enumerate(idx):
            w = windows[i].input_ids
            n = len(w) - 1
            ids[r, :n] = torch.tensor(w[:-1])
            mask[r, :n] = 1
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
            layer = out.hidden_states[HIDDEN_LAYER]
            for r, i in enumerate(idx):
                if want_hidden[i]:
                    hidden[i] = layer[r, max(windows[i].last_prompt_pos, 0)].float().cpu().numpy()
    return sums, hidden


@torch.inference_mode()
def _run_shared(model, prompts: Sequence[list[int]], conts: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int, capture_hidden: bool):
    """Prefix sharing: each prompt is encoded once, and its keys/values serve both choices.

    Pass 1 runs the prompts (sorted by length, right-padded); the last prompt position's
    logits score each choice's first token and give the hidden state. Pass 2 runs both
    choices' remaining tokens against the cached prompt, with the padded cache slots masked
    out and positions continuing from each prompt's true length. For the long prompts and
    one- or two-token answers of these tasks this roughly halves the work of scoring the
    two (prompt, choice) sequences separately.
    """
    base, head = _base_and_head(model)
    device = next(model.parameters()).device
    n = len(prompts)
    order = sorted(range(n), key=lambda i: -len(prompts[i]))
    sums = np.zeros((n, 2), dtype=np.float64)
    hidden = np.zeros((n, model.config.hidden_size), dtype=np.float32) if capture_hidden else None
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        b = len(idx)
        plen = torch.tensor([len(prompts[i]) for i in idx])
        width = int(plen.max())
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : plen[r]] = torch.tensor(prompts[i])
            mask[r, : plen[r]] = 1
        ids, mask, plen_d = ids.to(device), mask.to(device), plen.to(device)
        # Keys/values are only worth keeping when some choice has tokens after its first.
        multi = any(len(conts[i][c]) > 1 for i in idx for c in (0, 1))
        out = base(input_ids=ids, attention_mask=mask, use_cache=multi, output_hidden_states=capture_hidden)
        rows = torch.arange(b, device=device)
        last = out.last_hidden_state[rows, plen_d - 1]
        first_logp = torch.log_softmax(head(last).float(), dim=-1)
        first_tok = torch.tensor([[conts[i][c][0] for c in (0, 1)] for i in idx], device=device)
        sums[idx] += first_logp.gather(1, first_tok).double().cpu().numpy()
        if capture_hidden:
            hidden[idx] = out.hidden_states[HIDDEN_LAYER][rows, plen_d - 1].float().cpu().numpy()

        # Pass 2: both choices of each prompt, interleaved (row 2r = choice 0, 2r+1 = choice 1).
        rest = [conts[i][c][:-1] for i in idx for c in (0, 1)]
        targets = [conts[i][c][1:] for i in idx for c in (0, 1)]
        if not multi:
            continue  # every choice is a single token: pass 1 scored everything
        kwidth = max(len(x) for x in rest)
        cache = out.past_key_values
        cache.batch_repeat_interleave(2)
        cids = torch.full((2 * b, kwidth), pad_id, dtype=torch.long)
        cmask = torch.zeros((2 * b, kwidth), dtype=torch.long)
        for r, x in enumerate(rest):
            if x:
                cids[r, : len(x)] = torch.tensor(x)
                cmask[r, : len(x)] = 1
        cids, cmask = cids.to(device), cmask.to(device)
        full_mask = torch.cat([mask.repeat_interleave(2, dim=0), cmask], dim=1)
        positions = plen_d.repeat_interleave(2).unsqueeze(1) + torch.arange(kwidth, device=device).unsqueeze(0)
        out2 = base(input_ids=cids, attention_mask=full_mask, position_ids=positions, past_key_values=cache, use_cache=False)
        sel_r, sel_c, sel_t, owner = [], [], [], []
        for r, t in enumerate(targets):
            for k, tok in enumerate(t):
                sel_r.append(r)
                sel_c.append(k)
                sel_t.append(tok)
                owner.append(r)
        if not sel_r:
            continue
        states = out2.last_hidden_state[torch.tensor(sel_r, device=device), torch.tensor(sel_c, device=device)]
        logp = torch.log_softmax(head(states).float(), dim=-1)
        picked = logp.gather(1, torch.tensor(sel_t, device=device).unsqueeze(1)).squeeze(1).double().cpu().numpy()
        flat = np.zeros(2 * b, dtype=np.float64)
        np.add.at(flat, np.array(owner), picked)
        sums[idx] += flat.reshape(b, 2)
    return sums, hidden


def score_examples(model, tokenizer, examples: Sequence[Example], batch_size: int = 32, capture_hidden: bool = True, share_prefix: bool = True) -> ScoreResult:
    """Both choices of every example, batched, with lm-eval's encoding. With `share_prefix`
    the prompt is encoded once per example; examples whose window must be truncated (where
    the two choices see different prompt tokens) are scored as separate sequences."""
    max_length = model_max_length(model, tokenizer)
    pad = pad_id(tokenizer)
    n = len(examples)
    ll_sum = np.zeros((n, 2), dtype=np.float64)
    n_tokens = np.zeros((n, 2), dtype=np.int64)
    hidden = np.zeros((n, model.config.hidden_size), dtype=np.float32) if capture_hidden and n else None
    shared, separate = [], []
    pairs = []
    for i, ex in enumerate(examples):
        p0, p1 = encode_choices(tokenizer, ex.prompt, ex.continuations)
        pairs.append((p0, p1))
        n_tokens[i] = (len(p0.continuation), len(p1.continuation))
        fits = max(len(p0.context) + len(p0.continuation), len(p1.context) + len(p1.continuation)) <= max_length + 1
        ok = share_prefix and fits and p0.context == p1.context and len(p0.continuation) > 0 and len(p1.continuation) > 0
        (shared if ok else separate).append(i)
    if shared:
        sums, hid = _run_shared(model, [pairs[i][0].context for i in shared], [(pairs[i][0].continuation, pairs[i][1].continuation) for i in shared], batch_size, pad, capture_hidden)
        ll_sum[shared] = sums
        if capture_hidden:
            hidden[shared] = hid
    if separate:
        windows = _windows([p for i in separate for p in pairs[i]], max_length)
        sums, hid = _run_windows(model, windows, batch_size, pad, [capture_hidden, False] * len(separate))
        ll_sum[separate] = sums.reshape(-1, 2)
        if capture_hidden:
            hidden[separate] = np.stack([hid[2 * k] for k in range(len(separate))])
    return ScoreResult(ll_sum=ll_sum, n_tokens=n_tokens, hidden=hidden)
