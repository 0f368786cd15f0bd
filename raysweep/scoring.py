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

from raysweep.reproducible import exact_sqrt
from raysweep.tasks.base import Example

HIDDEN_LAYER = -5  # the paper's "fifth to last layer"
# Min-K% and Min-K%++ average a continuation's lowest-scoring 20% of tokens (at least one):
# the k of Shi et al. (2024) and Zhang et al. (2025).
MIN_K_FRACTION = 0.2


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
    return tokenizer.encode(
        text, add_special_tokens=_adds_special_tokens(text, tokenizer.decode(_prefix_token(tokenizer)))
    )


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


class TokenStats:
    """Per continuation, from the log-softmax its tokens are scored with: the summed
    log-likelihood, and the per-token statistics Min-K% and Min-K%++ read. Min-K% is the mean
    log-probability of the continuation's lowest-scoring k% of tokens; Min-K%++ the mean of
    the lowest k% of (log p(x_t) - mu_t) / sigma_t, where mu_t and sigma_t^2 are the mean and
    variance of log p(z) under the model's own next-token distribution p at that position."""

    def __init__(self, n: int):
        self.sums = np.zeros(n, dtype=np.float64)
        self._owner: list[np.ndarray] = []
        self._logp: list[np.ndarray] = []
        self._z: list[np.ndarray] = []

    def add(self, logp: torch.Tensor, targets: torch.Tensor, owner: np.ndarray) -> None:
        """`logp`: (tokens, vocab) log-softmax at each continuation position; `targets` the
        token scored there; `owner` the continuation each position belongs to."""
        picked = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
        prob = logp.exp()
        # 0 * log 0 is 0: a vocabulary entry the model rules out (log p = -inf) adds nothing.
        finite = torch.where(prob > 0, logp, torch.zeros_like(logp))
        plogp = prob * finite
        mu = plogp.sum(-1)
        var = (plogp * finite).sum(-1) - mu * mu
        z = (picked - mu) / exact_sqrt(var.clamp_min(1e-12))
        lp = picked.double().cpu().numpy()
        np.add.at(self.sums, owner, lp)
        self._owner.append(owner)
        self._logp.append(lp)
        self._z.append(z.double().cpu().numpy())

    def min_k(self) -> tuple[np.ndarray, np.ndarray]:
        """(Min-K%, Min-K%++) of every continuation; NaN for one without tokens."""
        n = len(self.sums)
        if not self._owner:
            return np.full(n, np.nan), np.full(n, np.nan)
        owner, lp, z = (np.concatenate(x) for x in (self._owner, self._logp, self._z))
        count = np.bincount(owner, minlength=n)
        k = np.maximum(1, np.ceil(MIN_K_FRACTION * count)).astype(np.int64)
        out = []
        for values in (lp, z):
            order = np.lexsort((values, owner))  # by continuation, lowest value first
            first = np.searchsorted(owner[order], np.arange(n))
            rank = np.arange(len(order)) - first[owner[order]]
            keep = order[rank < k[owner[order]]]
            total = np.zeros(n)
            np.add.at(total, owner[keep], values[keep])
            with np.errstate(invalid="ignore", divide="ignore"):
                out.append(np.where(count > 0, total / np.minimum(k, np.maximum(count, 1)), np.nan))
        return out[0], out[1]


@dataclass
class ScoreResult:
    ll_sum: np.ndarray  # (n_examples, 2) float64
    n_tokens: np.ndarray  # (n_examples, 2) int
    hidden: np.ndarray | None  # (n_examples, n_layers, 3, d) float32: PROMPT, PAIR_0, PAIR_1
    layers: tuple[int, ...] = (HIDDEN_LAYER,)
    # (n_examples, 2) float64 each: Min-K% and Min-K%++ of each choice (see TokenStats)
    min_k: np.ndarray | None = None
    min_k_pp: np.ndarray | None = None

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
            raise ValueError(
                f"continuation of {len(pair.continuation)} tokens does not fit the model's {max_length}-token window"
            )
        full = (pair.context + pair.continuation)[-(max_length + 1) :]
        dropped = len(pair.context) + len(pair.continuation) - len(full)
        seqs.append(
            _Seq(input_ids=full, n_cont=len(pair.continuation), last_prompt_pos=len(pair.context) - 1 - dropped)
        )
    return seqs


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 32) -> list[float]:
    """Summed log-likelihood of each (context, continuation), exactly as lm-eval computes it."""
    max_length = model_max_length(model, tokenizer)
    windows = _windows([encode_pair(tokenizer, ctx, cont) for ctx, cont in requests], max_length)
    stats, _ = _run_windows(model, windows, batch_size, pad_id(tokenizer), [False] * len(requests), (), max_length)
    return [float(x) for x in stats.sums]


def _blocks(base, n_layers: int) -> torch.nn.ModuleList | None:
    """The base model's list of transformer blocks (Llama `layers`, GPT-2 / GPT-J `h`)."""
    found = [m for m in base.children() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    return found[0] if len(found) == 1 else None


class _Taps:
    """Hidden states at `layers` (indexed like `output_hidden_states`: entry 0 is the input
    of the first block, entry k the output of block k, the last entry the base model's
    normalised output), gathered at the positions `rows`, `cols` while the forward pass runs.

    A hook on each block asked for keeps (positions, d) of it instead of every block's full
    (batch, length, d) output, which `output_hidden_states` holds until the pass ends. A model
    whose blocks cannot be found falls back to `output_hidden_states`."""

    def __init__(self, base, layers: Sequence[int]):
        n = base.config.num_hidden_layers
        self.layers = [layer % (n + 1) for layer in layers]
        self.blocks = _blocks(base, n)
        self.handles: list = []
        self.got: dict[int, torch.Tensor] = {}
        self.rows = self.cols = None

    @property
    def fallback(self) -> bool:
        return self.blocks is None and bool(self.layers)

    def _keep(self, k: int, states: torch.Tensor) -> None:
        self.got[k] = states[self.rows, self.cols]

    def __enter__(self) -> _Taps:
        n = len(self.blocks) if self.blocks is not None else 0
        for k in set(self.layers) if self.blocks is not None else ():
            if k == 0:

                def pre(module, args, kwargs, k=k):
                    self._keep(k, args[0] if args else kwargs["hidden_states"])

                self.handles.append(self.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
            elif k < n:

                def post(module, args, output, k=k):
                    self._keep(k, output[0] if isinstance(output, tuple) else output)

                self.handles.append(self.blocks[k - 1].register_forward_hook(post))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def forward(self, base, rows: torch.Tensor, cols: torch.Tensor, **inputs):
        """Run `base` and return its output and the (len(rows), d) states of each layer."""
        self.rows, self.cols, self.got = rows, cols, {}
        out = base(**inputs, output_hidden_states=self.fallback, use_cache=False)
        n = base.config.num_hidden_layers
        if self.fallback:
            return out, [out.hidden_states[k][rows, cols] for k in self.layers]
        return out, [out.last_hidden_state[rows, cols] if k == n else self.got[k] for k in self.layers]


@torch.inference_mode()
def _run_windows(
    model,
    windows: Sequence[_Seq],
    batch_size: int,
    pad_id: int,
    want_hidden: Sequence[bool],
    layers: Sequence[int],
    max_length: int,
):
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
    stats = TokenStats(len(windows))
    hidden: dict[int, np.ndarray] = {}
    fed = [
        len(w.input_ids) - (0 if want and len(w.input_ids) <= max_length else 1)
        for w, want in zip(windows, want_hidden)
    ]
    late = [i for i in order if want_hidden[i] and fed[i] < len(windows[i].input_ids)]
    with _Taps(base, layers) as taps:
        _window_batches(
            base, head, taps, windows, order, fed, batch_size, pad_id, want_hidden, layers, device, stats, hidden
        )
        _late_states(base, taps, windows, late, batch_size, max_length, device, hidden)
    return stats, hidden


def _window_batches(
    base, head, taps, windows, order, fed, batch_size, pad_id, want_hidden, layers, device, stats, hidden
):
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
        reads = [(r, i) for r, i in enumerate(idx) if want_hidden[i]]
        read_r = torch.tensor([r for r, _ in reads for _ in (0, 1)], dtype=torch.long, device=device)
        read_c = torch.tensor(
            [c for _, i in reads for c in (max(windows[i].last_prompt_pos, 0), fed[i] - 1)],
            dtype=torch.long,
            device=device,
        )
        out, per_layer = taps.forward(base, read_r, read_c, input_ids=ids, attention_mask=mask)
        states = out.last_hidden_state[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logp = torch.log_softmax(head(states).float(), dim=-1)
        stats.add(logp, torch.tensor(targets, device=device), np.array(owner))
        if reads:
            got = torch.stack(per_layer, 1).float().cpu().numpy().reshape(len(reads), 2, len(layers), -1)
            for k, (_, i) in enumerate(reads):
                hidden[i] = got[k].transpose(1, 0, 2).copy()


def _late_states(base, taps, windows, late, batch_size, max_length, device, hidden):
    """The last token's states of windows already cut to the model's length: a second pass
    over each one's last `max_length` tokens."""
    for start in range(0, len(late), batch_size):
        idx = late[start : start + batch_size]
        ids = torch.tensor([windows[i].input_ids[-max_length:] for i in idx], device=device)
        rows_t = torch.arange(len(idx), device=device)
        _, per_layer = taps.forward(base, rows_t, torch.full_like(rows_t, ids.shape[1] - 1), input_ids=ids)
        for j, layer in enumerate(per_layer):
            got = layer.float().cpu().numpy()
            for r, i in enumerate(idx):
                hidden[i][j, 1] = got[r]


def _packed_mask_format(model) -> str | None:
    """How a custom 4D attention mask reaches this model's attention, or None where it
    cannot (flash attention takes no dense mask: those models score pairs separately)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return {"sdpa": "bool", "eager": "additive"}.get(impl)


def _pack_rows(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> list[tuple[int, list[list[int]]]]:
    """Batches of at most `batch_size` rows, each as wide as the longest example left (the
    first in `order`, longest first), each row holding examples end to end: first fit, so
    the room a long example leaves in its row takes shorter ones instead of padding."""
    remaining = list(order)
    batches = []
    while remaining:
        width = lengths[remaining[0]]
        rows: list[list[int]] = []
        room: list[int] = []
        left: list[int] = []
        most = 0  # the largest room in a row once the batch has all its rows
        for i in remaining:
            need = lengths[i]
            if len(rows) == batch_size and need > most:
                left.append(i)
                continue
            r = next((r for r, free in enumerate(room) if need <= free), None)
            if r is None:
                rows.append([i])
                room.append(width - need)
            else:
                rows[r].append(i)
                room[r] -= need
            if len(rows) == batch_size:
                most = max(room)
        batches.append((width, rows))
        remaining = left
    return batches


@torch.inference_mode()
def _run_packed(
    model,
    prompts: Sequence[list[int]],
    conts: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    layers: Sequence[int],
):
    """Prefix sharing in one forward pass: each example is laid out as its prompt once and
    then both choices side by side, [prompt][choice 0][choice 1], each choice's last token
    fed only when hidden states are asked for (`layers`): the pair probes read the state there.

    A block attention mask lets each choice see the prompt and its own earlier tokens, never
    the other choice, and both choices' positions continue from the prompt's end, so every
    continuation token is computed as in its own (prompt, choice) sequence. The prompt's last
    position predicts both first tokens and gives the prompt's hidden state. Against scoring
    the two sequences separately this skips one copy of the prompt, which is most of the work
    for the long prompts and short answers of these tasks; against a KV-cache second pass it
    saves a forward call and the cache copies.

    Examples are packed end to end into rows as wide as a batch's longest example, the mask
    keeping each one to itself: real prompt lengths vary enough (a passage, a one-line
    sentence) that padding every example to its batch's longest would waste a fifth of the
    positions, and each position costs the whole model.
    """
    base, head = _base_and_head(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    additive = _packed_mask_format(model) == "additive"
    capture = bool(layers)
    cut = 0 if capture else 1  # the last token of a choice is only a target unless its state is read
    n = len(prompts)
    lengths = [len(prompts[i]) + len(conts[i][0]) + len(conts[i][1]) - 2 * cut for i in range(n)]
    # Every example is packed, one-token answers too: plain right-padded rows would get the
    # fused causal kernel without a mask, but on real records (prompts of very different
    # lengths) their padding cost more than the kernel saved (BENCHMARKS.md).
    order = sorted(range(n), key=lambda i: -lengths[i])
    batches = [rows for _, rows in _pack_rows(lengths, order, batch_size)]
    stats = TokenStats(2 * n)  # continuation 2i + c: example i's choice c
    hidden = np.zeros((n, len(layers), 3, model.config.hidden_size), dtype=np.float32) if capture else None
    with _Taps(base, layers) as taps:
        for rows in batches:
            width = max(sum(lengths[i] for i in row) for row in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            # Per position: which example of its row (-1 padding), and 0 prompt / 1, 2 choice.
            example = torch.full((len(rows), width), -1, dtype=torch.int16)
            segment = torch.zeros((len(rows), width), dtype=torch.int8)
            positions = torch.zeros((len(rows), width), dtype=torch.long)
            sel_r, sel_c, sel_t, owner, read_r, read_c, members = [], [], [], [], [], [], []
            for r, row in enumerate(rows):
                at = 0
                for e, i in enumerate(row):
                    p, (c0, c1) = prompts[i], conts[i]
                    P, a, z = len(p), len(c0) - cut, len(c1) - cut
                    end = at + P + a + z
                    ids[r, at:end] = torch.tensor(p + c0[:a] + c1[:z])
                    example[r, at:end] = e
                    segment[r, at + P : at + P + a], segment[r, at + P + a : end] = 1, 2
                    positions[r, at : at + P + a] = torch.arange(P + a)
                    positions[r, at + P + a : end] = torch.arange(P, P + z)
                    read_r += [r, r, r]
                    read_c += [at + P - 1, at + P + a - 1, end - 1]
                    members.append(i)
                    for choice, (cont, first) in enumerate(((c0, at + P), (c1, at + P + a))):
                        for k, tok in enumerate(cont):
                            sel_r.append(r)
                            sel_c.append(at + P - 1 if k == 0 else first + k - 1)
                            sel_t.append(tok)
                            owner.append(2 * i + choice)
                    at = end
            mask = _block_mask(example.to(device), segment.to(device), dtype, additive)
            out, per_layer = taps.forward(
                base,
                torch.tensor(read_r, device=device),
                torch.tensor(read_c, device=device),
                input_ids=ids.to(device),
                attention_mask=mask,
                position_ids=positions.to(device),
            )
            states = out.last_hidden_state[torch.tensor(sel_r, device=device), torch.tensor(sel_c, device=device)]
            logp = torch.log_softmax(head(states).float(), dim=-1)
            stats.add(logp, torch.tensor(sel_t, device=device), np.array(owner))
            if capture:
                got = torch.stack(per_layer, 1).float().cpu().numpy()  # (3 * examples, n_layers, d)
                hidden[members] = got.reshape(len(members), 3, len(layers), -1).transpose(0, 2, 1, 3)
    return stats, hidden


def _block_mask(example: torch.Tensor, segment: torch.Tensor, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """(batch, 1, width, width): a position sees the earlier positions of its own example's
    prompt and of its own choice."""
    width = example.shape[1]
    qe, ke = example.unsqueeze(2), example.unsqueeze(1)
    qs, ks = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones((width, width), dtype=torch.bool, device=example.device).tril()
    allowed = causal & (ke == qe) & (ke >= 0) & ((ks == 0) | (ks == qs))
    # Padding rows attend to themselves only: a row with nothing to attend to gives NaN.
    allowed |= torch.eye(width, dtype=torch.bool, device=example.device) & (qe < 0)
    mask = allowed.unsqueeze(1)
    if additive:
        return torch.zeros(mask.shape, dtype=dtype, device=example.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


def score_examples(
    model,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int = 32,
    capture_hidden: bool = True,
    share_prefix: bool = True,
    layers: Sequence[int] = (HIDDEN_LAYER,),
) -> ScoreResult:
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
    min_k = np.full((n, 2), np.nan)
    min_k_pp = np.full((n, 2), np.nan)
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
        ok = (
            share_prefix and fits and p0.context == p1.context and len(p0.continuation) > 0 and len(p1.continuation) > 0
        )
        (shared if ok else separate).append(i)
    if shared:
        stats, hid = _run_packed(
            model,
            [pairs[i][0].context for i in shared],
            [(pairs[i][0].continuation, pairs[i][1].continuation) for i in shared],
            batch_size,
            pad,
            layers,
        )
        ll_sum[shared] = stats.sums.reshape(-1, 2)
        mk, mkpp = stats.min_k()
        min_k[shared], min_k_pp[shared] = mk.reshape(-1, 2), mkpp.reshape(-1, 2)
        if capture_hidden:
            hidden[shared] = hid
    if separate:
        windows = _windows([p for i in separate for p in pairs[i]], max_length)
        stats, hid = _run_windows(model, windows, batch_size, pad, [capture_hidden] * len(windows), layers, max_length)
        ll_sum[separate] = stats.sums.reshape(-1, 2)
        mk, mkpp = stats.min_k()
        min_k[separate], min_k_pp[separate] = mk.reshape(-1, 2), mkpp.reshape(-1, 2)
        if capture_hidden:
            for k, i in enumerate(separate):
                hidden[i, :, PROMPT] = hid[2 * k][:, 0]
                hidden[i, :, PAIR_0] = hid[2 * k][:, 1]
                hidden[i, :, PAIR_1] = hid[2 * k + 1][:, 1]
    return ScoreResult(
        ll_sum=ll_sum,
        n_tokens=n_tokens,
        hidden=hidden,
        layers=tuple(layers) or (HIDDEN_LAYER,),
        min_k=min_k,
        min_k_pp=min_k_pp,
    )
