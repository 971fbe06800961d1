"""Speculative decoding: a cheap draft proposes ``k`` tokens, the target
checks them all in one pass over ``k + 1`` positions.

At batch 1 every decode step reads every weight once, so plain decoding is
capped by memory bandwidth. Here the target reads its weights once per
*round* and emits between 1 and ``k + 1`` tokens:

1. the draft decodes ``k`` tokens, each from the one before
   (a :func:`~gpt2fn.steps.chain` of :func:`draft_step` calls), starting
   from the last two emitted tokens;
2. the target runs the last emitted token and the ``k`` drafted ones at
   their positions (one pass, :func:`verify_step`), which gives its choice
   after each of them;
3. :func:`accept_greedy` / :func:`accept_sampled` keep the longest prefix the
   target agrees with, plus one token of the target's own (the correction, or
   a bonus when all ``k`` were accepted).

The draft is the target's own weights at another dtype (:func:`self_draft`:
int8 or bf16, nearly always the same choice) or another model with the same
vocabulary (``gpt2`` drafting for ``gpt2-xl``), either of them optionally
proposing only part of the vocabulary (:func:`draft_vocab`: a cheaper LM
head; the target still verifies over all of it), or no model at all
(:class:`PromptLookup`: what followed the text's last n-gram earlier in
it). Each model keeps its own
preallocated cache, written by position. A rejection rolls both back by
moving the position only: slots past it are hidden by the causal mask and
overwritten by the next round, never copied. When all ``k`` are accepted the
draft has not yet run its own last token; so the draft's first step of every
round runs the last two emitted tokens (writing the earlier one's slot again
when it had run it), and every round's chain has the same shape.

``k`` is fixed, or adaptive (:func:`next_k`): it moves along the levels
1, 2, 4, ... up to its maximum, one level up after a round that accepted
every drafted token, one down after a round that accepted fewer than half.

Compiled, the verify step is one graph for each round size ``k + 1`` (a
fixed ``k``: one; an adaptive one: one per level), for every prompt length
(its cache length marked dynamic, as for plain decoding). On the CPU it is
built as the plain decode step is, with the grouped loops of
:func:`~gpt2fn.layers.matvec` over its ``k + 1`` rows (past their limit,
:func:`~gpt2fn.layers.few_rows`) and its blocks compile regions: side by
side (124M shape, one pass), the grouped loops against oneDNN's products
over a symbolic token count: fp32 20.6 against 22.5 ms at 2 tokens, 27.1
against 34.0 at 5; int8 7.5 against 29.7 at 2, 17.0 against 38.6 at 5 and
27.8 against 42.8 at 9 (a plain int8 step: 6.5 ms). The draft
(:func:`~gpt2fn.steps.chains`) is, for a draft narrower than GPT-2 on the CPU, its
whole chain of ``k`` steps as one graph (one for each ``k``), calling its
step as one compile region; otherwise its step compiled (two graphs: the
round's first step over two tokens, and one token), its blocks compile
regions where the plain step's are (:func:`~gpt2fn.steps.decode_block`).

Greedy (temperature 0): the output is the target's greedy decoding, token
for token: every emitted token is the argmax of the target's logits given
the tokens before it. What it is checked against is the target's own
:func:`~gpt2fn.generation.generate` with the same engine (eager or
compiled). The verify pass computes ``k + 1`` rows with matrix-matrix
products where plain decoding uses matrix-vector ones (compiled on the CPU
both take the grouped loops, whose sums are each row's own bits, but the
code around them is generated for another row count), so the logits agree
to rounding (~1e-6 relative), not bit for bit: at a floating-point tie
between the two best tokens the two could pick differently. The tests check
identity over many prompts and 200+ tokens on three shapes, eager and
compiled.

A batch of prompts (ragged, as in plain batches) runs its rows together:
every round drafts and verifies ``k`` tokens for each row and advances all
of them by the fewest any row accepted, plus one (see
:func:`speculative_round` for why each row stays exact).

Sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023). A
drafted token ``x`` is accepted with probability ``min(1, p(x) / q(x))``; at
the first rejection the token is drawn from ``max(0, p - q)`` normalised.
Temperature, top-k, top-p, min-p and typical-p shape both ``p`` (target) and
``q`` (draft), and so do the rules that read the text so far (a repetition
penalty, an n-gram ban, ``min_new_tokens``: at each drafted position over
the text up to it, drafted tokens included), so every emitted token follows
the target's filtered distribution exactly (greedy: its argmax under the rules).
Each draw (a drafted token, the last token of a round) is one inverse-CDF
draw (:func:`~gpt2fn.sampling.draw`), so all the randomness of a round is
``2 (k + 1)`` uniform numbers from the caller's generator: a seed fixes the
result.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gpt2fn.cache import KVCache, cache_len
from gpt2fn.config import GPTConfig
from gpt2fn.errors import GPT2FnError, check_int
from gpt2fn.layers import Kernels, block, few_rows
from gpt2fn.model import hidden, logits
from gpt2fn.params import Params, map_params, params_device
from gpt2fn.quantize import quantize_int8
from gpt2fn.sampling import apply_history, draw, filtered_probs, reads_history
from gpt2fn.steps import (History, Steps, _cache, _marked_cache, chains, compiled_step, decode_block, decode_kernels,
                          eager_kernels, text_buffers)

Tensor = torch.Tensor
DRAFT_DTYPES = {"int8": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def self_draft(params: Params, dtype: str) -> Params:
    """The target's own weights as a draft: int8 (per-row, see
    :mod:`gpt2fn.quantize`), bfloat16 or float16."""
    if dtype not in DRAFT_DTYPES:
        raise GPT2FnError(f"unknown draft dtype {dtype!r}; choose one of {', '.join(DRAFT_DTYPES)} or a model name")
    if dtype == "int8":
        return quantize_int8(params)
    return map_params(lambda t: t.to(DRAFT_DTYPES[dtype]), params)


def draft_vocab(params: Params, vocab: Tensor) -> Params:
    """A draft that proposes only the tokens of ``vocab`` (distinct token ids
    [Vd], e.g. :func:`frequent_tokens`): ``params`` plus its LM head cut to
    those rows, ``head`` (and ``head_scale`` for int8: the same numbers, not
    requantized) and ``vocab``, which maps the head's rows back to token ids.
    The embedding stays whole, so the draft reads any token. At batch 1 the
    LM head is a third of GPT-2 124M's weights and 88% of the bundled model's;
    the target still verifies over the whole vocabulary, so the output is the
    same, and a token outside ``vocab`` costs only a rejection."""
    vocab = torch.as_tensor(vocab, dtype=torch.long, device=params["wte"].device)
    n = params["wte"].shape[0]
    if vocab.dim() != 1 or len(vocab) == 0 or int(vocab.min()) < 0 or int(vocab.max()) >= n:
        raise GPT2FnError(f"a draft vocabulary is a non-empty list of token ids in 0..{n - 1}")
    if len(vocab.unique()) != len(vocab):
        raise GPT2FnError("the draft vocabulary lists a token id more than once; give each token once")
    head = {"head": params["wte"][vocab], "vocab": vocab}
    if "wte_scale" in params:
        head["head_scale"] = params["wte_scale"][vocab]
    return {**params, **head}


def frequent_tokens(tokens: Tensor, n: int, vocab_size: int) -> Tensor:
    """The ``n`` most frequent ids in ``tokens`` (any integer tensor, e.g. a
    prepared dataset's uint16 tokens), most frequent first; ties and ids that
    never occur are filled in ascending id order (GPT-2's BPE numbers its
    tokens in merge order, common ones first)."""
    if not 1 <= n <= vocab_size:
        raise GPT2FnError(f"the draft vocabulary's size must be between 1 and {vocab_size}, got {n}")
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab_size)[:vocab_size]
    return torch.sort(counts, descending=True, stable=True).indices[:n]


@dataclass(frozen=True)
class PromptLookup:
    """Prompt lookup decoding's draft (Saxena, 2023; Hugging Face's
    ``prompt_lookup_num_tokens``): no model, the text itself. Each round it
    finds where the row's last ``ngram`` tokens occurred before (else its
    last ``ngram - 1``, ..., else its last token), the latest such place,
    and proposes the tokens that followed there (:func:`lookup`). Text that
    repeats what came before (a prompt quoted, code edited, greedy GPT-2's
    loops) is then verified several tokens a pass; drafting costs a few
    tensor operations over the tokens."""

    ngram: int = 2  # the longest n-gram matched: Hugging Face's max_matching_ngram_size


def lookup(tokens: Tensor, last: Tensor, k: int, ngram: int) -> tuple[Tensor, Tensor]:
    """Prompt lookup (:class:`PromptLookup`) over each row's tokens [B, L]
    up to its position ``last`` [B] -> (drafted [B, k], found [B] bool).

    For n = ``ngram``, ..., 1 (the longest that matches), the latest earlier
    occurrence of the row's last n tokens (ending before the row's last
    token), and the k tokens that followed it, going on past the row's last
    token by repeating the span from the match to it, as the text would if
    it kept repeating. Hugging Face's ``PromptLookupCandidateGenerator``
    takes the first occurrence instead and stops at the row's last token; on
    the bundled model's greedy text the latest was accepted more often (k =
    4, four prompts: 52-74% of drafted tokens against 24-58%). A row without
    a match proposes its last token, k times."""
    B, L = tokens.shape
    j = torch.arange(L, device=tokens.device)  # where an earlier occurrence ends
    match = (j < last[:, None]).expand(B, L)
    start = last.clone()  # where the proposed tokens are copied from: without a match, the last token
    found = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    for t in range(ngram):  # match: the row's last t + 1 tokens end at j as they end at last
        here = tokens.gather(1, (j - t).clamp(min=0).expand(B, L))
        there = tokens.gather(1, (last - t).clamp(min=0)[:, None])
        match = match & (here == there) & (j >= t)
        end = torch.where(match, j, -1).amax(1)  # the latest, or -1
        start = torch.where(end >= 0, end + 1, start)
        found = found | (end >= 0)
    period = last + 1 - start
    return tokens.gather(1, start[:, None] + torch.arange(k, device=tokens.device) % period[:, None]), found


def lookup_draft(
    params: Params, tokens: Tensor, pos: Tensor, state: History, noise: Optional[Tensor],
    *, k: int, ngram: int, vocab_size: int, sampling: bool,
) -> tuple[Tensor, ...]:  # fmt: skip
    """A :class:`PromptLookup` round's draft, called as a draft's chain is
    (``params`` and ``noise`` unused): writes tokens [B, T] at pos [B, T]
    into the state's token buffer, then the :func:`lookup` of ``k`` tokens
    after each row's last position, which it writes after it (the buffer
    then holds every emitted token at its position: the accepted drafted
    ones, and the next round writes its own first). -> (drafted [B, k],),
    or sampling (drafted, q [B, k, V]: the draft's distribution, all on the
    drafted token). When no row has a match it drafts nothing ([B, 0]): the
    round is then the target's pass over one token, a plain step. Reading
    whether any row has one is a host sync."""
    sequence = state.tokens.scatter_(1, pos, tokens)
    last = pos[:, -1]
    drafted, found = lookup(sequence, last, k, ngram)
    if not bool(found.any()):
        drafted = drafted[:, :0]
    after = (last[:, None] + 1 + torch.arange(drafted.shape[1], device=pos.device)).clamp(max=sequence.shape[1] - 1)
    sequence.scatter_(1, after, drafted)
    return (drafted, F.one_hot(drafted, vocab_size).float()) if sampling else (drafted,)


def draft_step(
    params: Params, tokens: Tensor, pos: Tensor, cache: KVCache | History, noise: Optional[Tensor],
    *, config: GPTConfig, kernels: Kernels, temperature: float, top_k: int, top_p: float, min_p: float = 0.0,
    typical_p: float = 1.0, run_block: Callable = block, **rules,
) -> tuple[Tensor, ...]:  # fmt: skip
    """One drafted token per row, and when sampling the distribution it was
    drawn from: tokens [B, T] at pos [B, T] -> (token [B],) greedy, or
    (token [B], q [B, V] fp32): a tuple of tensors, as
    :func:`~gpt2fn.steps.chain` calls its step.
    noise: [B] Uniform[0, 1) (one inverse-CDF draw from ``q``,
    :func:`~gpt2fn.sampling.draw`). ``run_block``: see
    :func:`~gpt2fn.steps.decode_block`. A draft with a vocabulary of its own
    (:func:`draft_vocab`) chooses among its ``Vd`` tokens; ``q`` is 0
    elsewhere. With ``rules`` (:func:`~gpt2fn.sampling.apply_history`'s)
    the cache comes in a :class:`~gpt2fn.steps.History`, whose tokens the
    step writes and reads as :func:`~gpt2fn.steps.cached_step` does (a cut
    vocabulary's logits placed in the whole one for them)."""
    history = reads_history(**rules)
    x = hidden(params, config, tokens, pos, cache.cache if history else cache, kernels=kernels, run_block=run_block)[:, -1]
    vocab = params.get("vocab")
    head = params if vocab is None else {**params, "wte": params["head"], "wte_scale": params.get("head_scale")}
    out = logits(head, config, x, kernels.linear)  # [B, V], or [B, Vd] over the draft's own vocabulary
    if history:
        whole = out if vocab is None else out.new_full((len(out), config.vocab_size), float("-inf")).index_copy(1, vocab, out)
        sequence = cache.tokens.scatter_(1, pos, tokens)
        whole = apply_history(whole, sequence, pos[:, -1], made=pos[:, -1] + 1 - cache.start, **rules)
        out = whole if vocab is None else whole[:, vocab]
    if temperature == 0:
        choice = out.argmax(-1)
        return (choice,) if vocab is None else (vocab[choice],)
    q = filtered_probs(out, temperature, top_k, top_p, min_p, typical_p)
    choice = draw(q, noise)
    if vocab is None:
        return choice, q
    return vocab[choice], q.new_zeros(q.shape[0], config.vocab_size).index_copy(1, vocab, q)


def verify_step(
    params: Params, tokens: Tensor, pos: Tensor, cache: KVCache | History,
    *, config: GPTConfig, kernels: Kernels, temperature: float, top_k: int, top_p: float, min_p: float = 0.0,
    typical_p: float = 1.0, run_block: Callable = block, **rules,
) -> Tensor:  # fmt: skip
    """The target after each of the last emitted token and the ``k`` drafted
    ones: tokens [B, k + 1] at pos [B, k + 1] -> its greedy choices
    [B, k + 1], or (sampling) its filtered distributions [B, k + 1, V] fp32.
    With ``rules`` the cache comes in a :class:`~gpt2fn.steps.History`: the
    tokens are written into it, and the choice after each position reads
    the row's tokens up to that position. (``run_block``: see
    :func:`~gpt2fn.steps.decode_block`.)"""
    history = reads_history(**rules)
    x = hidden(params, config, tokens, pos, cache.cache if history else cache, kernels=kernels, run_block=run_block)
    out = logits(params, config, x, kernels.linear)
    if history:  # one row a position, [B (k + 1), V], each reading the row's tokens up to it
        B, T, V = out.shape
        sequence = cache.tokens.scatter_(1, pos, tokens).repeat_interleave(T, 0)
        made = (pos + 1 - cache.start[:, None]).flatten()
        out = apply_history(out.flatten(0, 1), sequence, pos.flatten(), made=made, **rules).view(B, T, V)
    if temperature == 0:
        return out.argmax(-1)
    return filtered_probs(out, temperature, top_k, top_p, min_p, typical_p)


def accept_greedy(drafted: Tensor, chosen: Tensor) -> tuple[Tensor, Tensor]:
    """drafted [B, k], the target's choices [B, k + 1] -> (n [B]: how many
    drafted tokens the target agrees with, in a row; tokens [B, k + 1], whose
    first ``n + 1`` are emitted: the agreed ones, then the target's own)."""
    n = (drafted == chosen[:, :-1]).long().cumprod(-1).sum(-1)
    return n, chosen


def accept_sampled(drafted: Tensor, q: Tensor, p: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """The speculative sampling rule. drafted [B, k] drawn from q [B, k, V];
    the target's p [B, k + 1, V]; noise [B, k + 1, 2] Uniform[0, 1)
    (column 1 of rows 0..k-1 decides the acceptances, row k's column 0 draws
    the last token; column 0 of rows 0..k-1 drew the drafted tokens) ->
    (n [B], tokens [B, k + 1]), as :func:`accept_greedy`.

    Drafted token i is accepted when ``u_i q_i(x) < p_i(x)``, that is with
    probability ``min(1, p/q)``; the first rejection ends the run. The token
    after the ``n`` accepted ones is drawn from ``max(0, p_n - q_n)`` (with
    ``q_k = 0``: the target's own ``p_k`` when all were accepted), by the
    inverse CDF (:func:`~gpt2fn.sampling.draw`), which needs no normalisation."""
    B, k = drafted.shape
    p_x = p[:, :k].gather(-1, drafted[..., None])[..., 0]
    q_x = q.gather(-1, drafted[..., None])[..., 0]
    n = (noise[:, :k, 1] * q_x < p_x).long().cumprod(-1).sum(-1)  # [B]
    rows = torch.arange(B, device=p.device)
    p_n = p[rows, n]
    q_n = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], dim=1)[rows, n]
    residual = (p_n - q_n).clamp_(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)  # p == q: the rule never rejects
    last = draw(residual, noise[:, k, 0])
    tokens = torch.cat([drafted, last[:, None]], dim=1).scatter(1, n[:, None], last[:, None])
    return n, tokens


def k_levels(k_max: int) -> tuple[int, ...]:
    """The values an adaptive ``k`` takes: powers of two below ``k_max``, then
    ``k_max`` (8 -> (1, 2, 4, 8); 6 -> (1, 2, 4, 6))."""
    return tuple(2**i for i in range(k_max.bit_length()) if 2**i < k_max) + (k_max,)


def next_k(levels: tuple[int, ...], k: int, accepted: int) -> int:
    """The adaptive rule: one level up when all ``k`` drafted tokens were
    accepted, one down when fewer than half were, else stay."""
    i = levels.index(k)
    if accepted == k:
        return levels[min(i + 1, len(levels) - 1)]
    return levels[max(i - 1, 0)] if 2 * accepted < k else k


@dataclass
class Speculation:
    """The state of a speculative generation: both caches (a
    :class:`PromptLookup` draft has none), the token before the next
    round's, the ``k`` of the next round, where the generation ends and
    where each row stands, the counts its stats report, and with rules that
    read the text so far, or a lookup draft, its tokens (which both models'
    steps read, a lookup draft too: see :meth:`states`) and where each row's
    new ones start."""

    target: KVCache
    draft: Optional[KVCache]
    k: int
    end: int  # the generation's end: the longest row's last token sits at end - 1
    at: list[int]  # each row's position of the token the next round is fed (on the host)
    before: Tensor  # [B, 1]: the emitted token before the next round's first (the draft runs both, see speculative_round)
    counts: dict = field(default_factory=lambda: {"target_passes": 0, "drafted": 0, "accepted": 0, "drafted_past_end": 0})
    tokens: Optional[Tensor] = None  # [B, L]: each row's tokens at their positions, later slots stale (rules, lookup)
    start: Optional[Tensor] = None  # [B]: each row's first new position (with the tokens)
    rules: bool = False  # the steps apply rules that read the text so far

    def states(self) -> tuple:
        """(the target's state, the draft's): their caches, the target's in a
        :class:`~gpt2fn.steps.History` with the tokens when there are rules,
        the draft's whenever there are tokens."""
        target = History(self.target, self.tokens, self.start) if self.rules else self.target
        return target, self.draft if self.tokens is None else History(self.draft, self.tokens, self.start)


def speculative_round(
    params: Params, token: Tensor, pos: Tensor, state: Speculation, noise: Optional[Tensor],
    *, draft_params: Params, draft: Callable[[int], Callable], verify: Callable, accept: Callable,
    levels: Optional[tuple[int, ...]] = None,
) -> Tensor:  # fmt: skip
    """One round of ``state.k`` drafted tokens (a decode step of the
    :class:`~gpt2fn.steps.Steps` protocol that emits several tokens):
    token [B, 1] at pos [B, 1] -> the emitted tokens [B, m]. ``draft(k)``:
    a :func:`~gpt2fn.steps.chain` of ``k`` :func:`draft_step` calls. With
    ``levels`` (:func:`k_levels`) ``k`` is adaptive and the round sets the
    next one (:func:`next_k`, from the ``m - 1`` drafted tokens kept);
    without, it stays. ``noise``: [B, K + 1, 2] for any K >= k (see
    :func:`accept_sampled`), or None. One host synchronisation: reading
    each row's ``n`` (a lookup draft adds one, :func:`lookup_draft`, and may
    draft none: the round verifies what it drafted).

    A batch advances together: every row emits ``m = min(n) + 1`` tokens,
    the fewest drafted tokens any row accepted plus one. A row that accepted
    more emits its first ``m``: accepted drafted tokens, each distributed as
    the target's (greedy: its argmax), so its output is still the target's;
    its other accepted tokens are drafted again next round. A row whose
    accepted run reaches the generation's end (drafted tokens past it are
    verified and dropped) does not hold the others back.

    The draft's first step runs the token before ``token`` too, at ``pos -
    1``: after a round that accepted all ``k`` drafted tokens the draft has
    not run its own last one yet; otherwise it writes the same slot again.
    So every round's chain has one shape. Positions past the cache's last
    slot are clamped onto it: only tokens beyond the generation's end land
    there, and no kept token reads it."""
    length = cache_len(state.target)
    target, drafts = state.states()
    drafted, *q = draft(state.k)(draft_params, torch.cat([state.before, token], dim=1), torch.cat([pos - 1, pos], dim=1),
                                 drafts, None if noise is None else noise[:, : state.k, 0])  # fmt: skip
    k = drafted.shape[1]
    if noise is not None:
        noise = noise[:, : k + 1]
    verify_pos = (pos + torch.arange(k + 1, device=pos.device)).clamp(max=length - 1)
    out = verify(params, torch.cat([token, drafted], dim=1), verify_pos, target)
    n, tokens = accept(drafted, out) if noise is None else accept(drafted, q[0], out, noise)
    n = n.tolist()
    # Drafted tokens past the generation's end (verified, then dropped by the
    # loop) are counted apart: neither accepted nor rejected.
    inside = [min(k, max(0, state.end - 1 - at)) for at in state.at]
    m = min(n_row if n_row < within else k for n_row, within in zip(n, inside)) + 1
    state.at = [at + m for at in state.at]
    state.before = token if m == 1 else tokens[:, m - 2 : m - 1]
    state.counts["target_passes"] += 1
    state.counts["drafted"] += k * len(n)
    state.counts["accepted"] += sum(min(n_row, within) for n_row, within in zip(n, inside))
    state.counts["drafted_past_end"] += sum(k - within for within in inside)
    if levels is not None and k == state.k:
        state.k = next_k(levels, k, m - 1)
    return tokens[:, :m]


def speculative_steps(
    config: GPTConfig, draft: tuple[Params, GPTConfig] | PromptLookup, k: int,
    *, adaptive: bool = False, device: torch.device, compile: bool = False, attention: str = "auto",
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, typical_p: float = 1.0,
    batch: int = 1, **rules,
) -> Steps:  # fmt: skip
    """:class:`~gpt2fn.steps.Steps` whose decode step is one
    :func:`speculative_round`; the state is a :class:`Speculation`. The
    ``draft`` is a model, (params, config), or a :class:`PromptLookup`. ``k``
    drafted tokens per round, or with ``adaptive`` at most ``k`` (starting
    there; see :func:`next_k`). With ``compile`` the draft (see
    :func:`~gpt2fn.steps.chains`; ``batch`` picks its products, see
    :func:`~gpt2fn.steps.decode_kernels`) and the verify step are compiled as
    the plain decode step is (see the module docstring; CUDA graphs on CUDA).
    ``rules``: :func:`~gpt2fn.sampling.apply_history`'s, which both models'
    steps apply to the text so far (the state's tokens, drafted ones
    included up to each position), so a greedy round still emits the
    target's greedy tokens under them and a sampled one its distribution."""
    history = reads_history(**rules)
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p)
    sampling = dict(filters, **rules)
    eager = eager_kernels(attention)
    draft_kernels = decode_kernels(device, batch, attention) if compile else eager
    # compiled on the CPU: the plain step's products (matvec, which hands more rows than it sums to few_rows)
    verify_kernels = draft_kernels if compile and device.type == "cpu" else Kernels(few_rows, draft_kernels.attend)
    looks_up = isinstance(draft, PromptLookup)
    if looks_up:
        draft_params, draft_config = None, None
        chain = functools.partial(lookup_draft, ngram=draft.ngram, vocab_size=config.vocab_size, sampling=temperature > 0)
        drafts = lambda k: functools.partial(chain, k=k)  # noqa: E731
    else:
        draft_params, draft_config = draft
        drafts = chains(draft_step, draft_config, draft_kernels, device, compile, **sampling)
    if compile:
        verify = compiled_step(verify_step, device, config=config, kernels=verify_kernels,
                               run_block=decode_block(device, verify_kernels, config), **sampling)  # fmt: skip
    else:
        verify = functools.partial(verify_step, config=config, kernels=verify_kernels, **sampling)
    accept = accept_greedy if temperature == 0 else accept_sampled
    levels = k_levels(k) if adaptive else None
    new_cache = functools.partial(_marked_cache, graphs=device.type == "cuda") if compile else _cache

    def make_state(params: Params, batch: int, length: int) -> Speculation:
        target = new_cache(config, params, batch, length)
        draft_cache = None if looks_up else new_cache(draft_config, draft_params, batch, length)
        device = params_device(params)
        before = torch.zeros(batch, 1, dtype=torch.long, device=device)
        state = Speculation(target, draft_cache, k, length, [0] * batch, before=before, rules=history)
        if history or looks_up:
            state.tokens, state.start = text_buffers(batch, length, device, compile)
        return state

    def prefill(params: Params, tokens: Tensor, pos: Tensor, state: Speculation, noise: Optional[Tensor]) -> Tensor:
        if not looks_up:
            hidden(draft_params, draft_config, tokens, pos, state.draft, kernels=eager)  # fills the draft's cache
        state.before, state.at = tokens[:, -1:].clone(), (pos[:, -1] + 1).tolist()  # each chosen token: its prompt's end
        out = logits(params, config, hidden(params, config, tokens, pos, state.target, kernels=eager)[:, -1])
        if state.tokens is not None:
            state.tokens.scatter_(1, pos, tokens)
            state.start.copy_(pos[:, -1] + 1)
        if history:
            out = apply_history(out, state.tokens, pos[:, -1], made=0, **rules)
        return out.argmax(-1) if noise is None else draw(filtered_probs(out, **filters), noise[:, 0, 0])

    def decode(params: Params, token: Tensor, pos: Tensor, state: Speculation, noise: Optional[Tensor]) -> Tensor:
        return speculative_round(params, token, pos, state, noise, draft_params=draft_params, draft=drafts,
                                 verify=verify, accept=accept, levels=levels)  # fmt: skip

    return Steps(make_state, prefill, decode, compiled=compile, report=lambda state: dict(state.counts))


def check_draft(config: GPTConfig, draft: tuple[Params, GPTConfig] | PromptLookup, k: int, n_prompt: int,
                max_new_tokens: int) -> None:  # fmt: skip
    """One clear line for a draft that cannot serve this generation."""
    if not isinstance(k, int) or k < 1:
        raise GPT2FnError(f"draft_tokens must be an integer >= 1, got {k!r}")
    if isinstance(draft, PromptLookup):
        check_int("PromptLookup's ngram", draft.ngram)
        return
    if not (isinstance(draft, tuple) and len(draft) == 2 and isinstance(draft[1], GPTConfig)):
        raise GPT2FnError(f"a draft is (params, config), e.g. (self_draft(params, 'int8'), config), or PromptLookup(); "
                          f"got {type(draft).__name__}")  # fmt: skip
    draft_config = draft[1]
    if draft_config.vocab_size != config.vocab_size:
        raise GPT2FnError(f"the draft's vocabulary has {draft_config.vocab_size} tokens and the target's "
                          f"{config.vocab_size}; a draft must share the target's tokenizer")  # fmt: skip
    if n_prompt + max_new_tokens > draft_config.n_ctx:
        raise GPT2FnError(f"prompt ({n_prompt} tokens) + max_tokens ({max_new_tokens}) exceeds the draft's "
                          f"{draft_config.n_ctx}-token context; use max_tokens <= {draft_config.n_ctx - n_prompt} "
                          "or a draft with a longer context")  # fmt: skip
