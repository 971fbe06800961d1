"""Choosing the next token from logits: rules that read the text so far (a
repetition penalty, no repeated n-grams, banned words, a least number of new
tokens before the stop token), greedy, temperature, top-k, top-p, min-p, typical-p.

All functions are pure and work on a batch: logits [B, V] -> [B, V] or [B].
They are applied in the usual order (as in Hugging Face's ``generate``): the
rules that read the text so far (:func:`apply_history`, which greedy decoding
takes too), then temperature, top-k, top-p, min-p and typical-p, then a draw.

The draw uses the "exponential race": ``argmax(p / E)`` with ``E = -log U``,
``U ~ Uniform[0, 1)`` picks index ``i`` with probability ``p_i``, exactly like
``torch.multinomial``, but without a host synchronisation, so it can live
inside a compiled step. The uniform noise is drawn outside (from the
``torch.Generator`` passed in) and handed over: the same seed gives the same
tokens, eager or compiled.

With top-k the work happens among the k candidates only (``topk`` returns
them sorted, so top-p needs no sort of the vocabulary and the draw needs k
random numbers, not V). Top-p or typical-p alone sorts the whole vocabulary
(~4 ms for 50257 on the 2-core CPU): pair it with a top-k to make it cheap.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from gpt2fn.errors import GPT2FnError, check_token_ids, is_real

Tensor = torch.Tensor


def check_sampling_args(
    temperature: float, top_k: int, top_p: float, min_p: float = 0.0, repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0, min_new_tokens: int = 0, stop_token: Optional[int] = None, typical_p: float = 1.0,
) -> None:  # fmt: skip
    """Raise one clear line for impossible sampling parameters (a value that
    is not a number, such as None, included; a ``min_new_tokens`` without
    the ``stop_token`` it holds back)."""
    if not (is_real(temperature) and 0 <= temperature < math.inf):  # NaN fails every comparison
        raise GPT2FnError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    for name, count in (("top_k", top_k), ("no_repeat_ngram_size", no_repeat_ngram_size), ("min_new_tokens", min_new_tokens)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise GPT2FnError(f"{name} must be an integer >= 0 (0 = off), got {count}")
    if not (is_real(top_p) and 0 < top_p <= 1):
        raise GPT2FnError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not (is_real(min_p) and 0 <= min_p <= 1):
        raise GPT2FnError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
    if not (is_real(typical_p) and 0 < typical_p <= 1):
        raise GPT2FnError(f"typical_p must be in (0, 1] (1 = off), got {typical_p}")
    if not (is_real(repetition_penalty) and 0 < repetition_penalty < math.inf):
        raise GPT2FnError(f"repetition_penalty must be a finite number > 0 (1 = off; above 1 discourages repeats), "
                          f"got {repetition_penalty}")  # fmt: skip
    if min_new_tokens > 0 and stop_token is None:
        raise GPT2FnError("min_new_tokens keeps the stop token from ending a row that soon; pass a stop_token too, or "
                          "drop min_new_tokens")  # fmt: skip


def penalize_repeats(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """The repetition penalty of CTRL (Keskar et al., 2019), as Hugging
    Face's ``RepetitionPenaltyLogitsProcessor`` applies it: the logit of each
    token a row has had (``seen``) is divided by ``penalty`` where it is
    positive and multiplied by it where it is negative, so above 1 every
    repeat becomes less likely, however often it occurred. logits [B, V],
    seen [B, V] bool -> [B, V] fp32. ``penalty = 1`` leaves the logits unchanged."""
    if penalty == 1:
        return logits
    logits = logits.float()
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def seen_tokens(sequence: Tensor, last: Tensor, vocab_size: int) -> Tensor:
    """Which tokens each row has had: sequence [B, S] up to position last [B]
    (later positions are ignored) -> [B, V] bool."""
    pos = torch.arange(sequence.shape[1], device=sequence.device)
    had = torch.where(pos <= last[:, None], sequence, sequence[:, :1])  # later positions: a token it had
    return torch.zeros(len(sequence), vocab_size, dtype=torch.bool, device=sequence.device).scatter_(1, had, True)


def repeated_ngrams(sequence: Tensor, last: Tensor, n: int, vocab_size: int) -> Tensor:
    """The tokens that would repeat an ``n``-gram, as Hugging Face's
    ``NoRepeatNGramLogitsProcessor`` bans them: each token that follows an
    earlier occurrence of the row's last ``n - 1`` tokens (with ``n = 1``,
    every token the row has had). sequence [B, S] up to position last [B]
    (later positions are ignored) -> [B, V] bool."""
    B, S = sequence.shape
    if S < n:  # no n-gram fits
        return torch.zeros(B, vocab_size, dtype=torch.bool, device=sequence.device)
    grams = sequence.unfold(1, n, 1)  # [B, S - n + 1, n]: the n-gram that starts at each position
    tail = (last[:, None] - n + 2 + torch.arange(n - 1, device=sequence.device)).clamp(min=0)  # the last n - 1
    starts = torch.arange(S - n + 1, device=sequence.device)
    match = (grams[..., :-1] == sequence.gather(1, tail)[:, None]).all(-1) & (starts <= last[:, None] - n + 1)
    # a sum of 0s and 1s a token (one n-gram may end in the token of another): exact in any order
    hits = torch.zeros(B, vocab_size, device=sequence.device).scatter_add_(1, grams[..., -1], match.float())
    return hits > 0


def banned_words(sequence: Tensor, last: Tensor, words: tuple[tuple[int, ...], ...], vocab_size: int) -> Tensor:
    """The tokens that would complete one of ``words`` (token sequences), as
    Hugging Face's ``NoBadWordsLogitsProcessor`` bans them: a one-token word
    always, a longer one's last token where the row's last tokens are the
    rest of it. sequence [B, S] up to position last [B] (later positions are
    ignored) -> [B, V] bool."""
    device, hits = sequence.device, []
    for word in words:
        n = len(word) - 1  # the tokens before the banned one
        at = last[:, None] - n + 1 + torch.arange(n, device=device)  # [B, n]: the row's last n positions
        match = (sequence.gather(1, at.clamp(min=0)) == torch.tensor(word[:-1], device=device)).all(-1)
        hits.append(match & (at >= 0).all(-1))  # [B] (a row with fewer than n tokens has no match)
    columns = torch.tensor([word[-1] for word in words], device=device).expand(len(sequence), -1)
    # a sum of 0s and 1s a token (two words may end in one token): exact in any order
    return torch.zeros(len(sequence), vocab_size, device=device).scatter_add_(1, columns, torch.stack(hits, 1).float()) > 0


def hold_stop(logits: Tensor, made: Tensor | int, min_new_tokens: int, stop_token: int) -> Tensor:
    """Hugging Face's ``min_new_tokens`` (its ``MinNewTokensLengthLogitsProcessor``):
    the stop token at -inf in each row that has made fewer than
    ``min_new_tokens`` new tokens before this choice (``made``: [B], or an
    int for every row). logits [B, V] -> [B, V]."""
    held = (torch.arange(logits.shape[-1], device=logits.device) == stop_token) & (torch.as_tensor(made) < min_new_tokens)[..., None]
    return logits.masked_fill(held, float("-inf"))


def apply_history(
    logits: Tensor, sequence: Tensor, last: Tensor, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
    min_new_tokens: int = 0, stop_token: Optional[int] = None, bad_words_ids: tuple = (), made: Tensor | int = 0,
) -> Tensor:  # fmt: skip
    """The rules that read each row's text so far (sequence [B, S] up to
    position last [B]; the last ``made`` of it new tokens: [B], or an int for every row):
    :func:`penalize_repeats`, with a ``no_repeat_ngram_size`` -inf for the
    tokens :func:`repeated_ngrams` names, with ``bad_words_ids`` (a tuple of
    token tuples) -inf for those :func:`banned_words` names, and with
    ``min_new_tokens`` :func:`hold_stop`. logits [B, V] -> [B, V]; unchanged
    with all four off."""
    V = logits.shape[-1]
    if repetition_penalty != 1:
        logits = penalize_repeats(logits, seen_tokens(sequence, last, V), repetition_penalty)
    if no_repeat_ngram_size > 0:
        logits = logits.masked_fill(repeated_ngrams(sequence, last, no_repeat_ngram_size, V), float("-inf"))
    if bad_words_ids:
        logits = logits.masked_fill(banned_words(sequence, last, bad_words_ids, V), float("-inf"))
    if min_new_tokens > 0:
        logits = hold_stop(logits, made, min_new_tokens, stop_token)
    return logits


def reads_history(
    repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, min_new_tokens: int = 0,
    stop_token: Optional[int] = None, bad_words_ids: tuple = (),
) -> bool:  # fmt: skip
    """Whether these settings (:func:`apply_history`'s) make the choice read the text so far."""
    return repetition_penalty != 1 or no_repeat_ngram_size > 0 or min_new_tokens > 0 or len(bad_words_ids) > 0


def check_bad_words(bad_words_ids, vocab_size: int, stop_token: Optional[int] = None) -> tuple[tuple[int, ...], ...]:
    """``bad_words_ids`` (token sequences, each one a word never to complete)
    as a tuple of tuples, without the word that is the stop token alone
    (as Hugging Face drops it), or one clear line for anything else."""
    fix = "give a list of token lists, each a word never to complete, e.g. [[1110], [4252, 2650]]"
    if isinstance(bad_words_ids, (str, bytes)) or not isinstance(bad_words_ids, (list, tuple)):
        raise GPT2FnError(f"bad_words_ids must be a list of token lists, got {bad_words_ids!r}; {fix}")
    for word in bad_words_ids:
        if isinstance(word, (str, bytes)) or not isinstance(word, (list, tuple)) or len(word) == 0:
            raise GPT2FnError(f"bad_words_ids holds {word!r}, which is not a non-empty list of token ids; {fix}")
        check_token_ids("bad_words_ids", list(word), vocab_size)
    return tuple(tuple(word) for word in bad_words_ids if list(word) != [stop_token])


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the ``k`` largest logits per row (ties broken by index),
    set the rest to -inf. ``k = 0`` or ``k >= V`` leaves the logits unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def _nucleus(sorted_logits: Tensor, p: float) -> Tensor:
    """Top-p on logits sorted in descending order: -inf past the smallest
    prefix whose probability mass reaches ``p`` (never empty)."""
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop = mass_before >= p  # the set had already reached p without this token
    drop[..., 0] = False
    return sorted_logits.masked_fill(drop, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose
    probability mass reaches ``p`` (always at least the most likely one),
    set the rest to -inf. ``p = 1`` leaves the logits unchanged."""
    if p >= 1.0:
        return logits
    sorted_logits, indices = torch.sort(logits, dim=-1, descending=True)
    return torch.empty_like(logits).scatter(-1, indices, _nucleus(sorted_logits, p))


def min_p_filter(logits: Tensor, p: float) -> Tensor:
    """Min-p: set to -inf every logit whose probability is below ``p`` times
    its row's largest (so the most likely token always stays), as Hugging
    Face's ``MinPLogitsWarper`` does. ``p = 0`` leaves the logits unchanged."""
    if p <= 0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    return logits.masked_fill(probs < p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def typical_filter(logits: Tensor, mass: float) -> Tensor:
    """Locally typical sampling (Meister et al., 2022), as Hugging Face's
    ``TypicalLogitsWarper`` applies it: rank the tokens by how far their
    surprisal ``-log p`` is from the row's entropy, nearest first, and keep
    the smallest such set whose probability mass reaches ``mass`` (at least
    one token, and every token as near as the last kept); the rest -inf.
    ``mass = 1`` leaves the logits unchanged."""
    if mass >= 1.0:
        return logits
    logits = logits.float()
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p * log_p.exp()).nansum(-1, keepdim=True)  # (a filtered token: -inf x 0 = nan, left out)
    distance, order = torch.sort((-log_p - entropy).abs(), dim=-1)
    mass_so_far = torch.softmax(logits.gather(-1, order), dim=-1).cumsum(dim=-1)
    last = (mass_so_far < mass).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)  # the last kept, in order
    drop = distance > distance.gather(-1, last)
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def filtered_probs(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
    typical_p: float = 1.0,
) -> Tensor:  # fmt: skip
    """The distribution the sampler draws from: [B, V] fp32, rows sum to 1.
    ``temperature`` must be > 0 here (0 means greedy, handled by :func:`sample`)."""
    logits = logits.float() / temperature
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    logits = min_p_filter(logits, min_p)
    logits = typical_filter(logits, typical_p)
    return torch.softmax(logits, dim=-1)


def noise_width(vocab_size: int, top_k: int) -> int:
    """How many random numbers one draw needs per row: the candidates."""
    return top_k if 0 < top_k < vocab_size else vocab_size


def uniform_noise(shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device | str = "cpu") -> Tensor:
    """The random input of one draw: i.i.d. Uniform[0, 1), fp32, from ``generator``.
    Drawn outside a compiled step and passed in, so the step itself is a pure
    function of its inputs and the seed alone fixes the result. (Uniform, not
    exponential, because CPU ``exponential_`` costs 0.8 ms for 50257 numbers
    and ``uniform_`` 0.1 ms; ``-log`` happens inside the step.)"""
    return torch.empty(shape, dtype=torch.float32, device=device).uniform_(generator=generator)


def draw(weights: Tensor, u: Tensor) -> Tensor:
    """One index per row, with probability proportional to ``weights``, by
    the inverse CDF: weights [B, V] >= 0 (not necessarily normalised), u [B]
    Uniform[0, 1) -> [B] int64, the first index whose cumulative weight
    exceeds ``u`` times the total. One random number per draw, where the
    exponential race of :func:`choose_token` takes one per candidate: the
    speculative steps, which draw ``k + 1`` times a round over the whole
    vocabulary, use this. A zero weight is never drawn (when rounding puts
    ``u`` times the total on the total itself, the draw is the index where
    the cumulative weight reaches it). Unlike the race, a draw that lands
    within rounding of a boundary picks the neighbouring token when the
    weights move in their last bits (compiled against eager), so over a wide
    support the two can part; plain steps keep the race for that reason."""
    cdf = weights.float().cumsum(-1)
    index = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
    return torch.minimum(index, cdf.argmax(-1))


def choose_token(
    logits: Tensor,
    noise: Optional[Tensor],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
) -> Tensor:
    """Pick one token per row, deterministically given ``noise``.
    logits: [B, V]; noise: [B, noise_width(V, top_k)] Uniform[0, 1) (unused
    when greedy) -> [B] int64.

    Draws from :func:`filtered_probs` by the exponential race: each
    ``-log(U_i) / p_i`` is Exp(p_i), and the smallest of independent
    exponentials is ``i`` with probability ``p_i / sum p``. (``U = 0`` gives an
    infinite ``E``, a score of 0: a filtered token, whose score is 0 too,
    still never wins over a candidate.)
    """
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    race = -torch.log(noise)
    if 0 < top_k < logits.shape[-1]:
        values, indices = torch.topk(logits.float() / temperature, top_k, dim=-1)  # sorted, descending
        if top_p < 1.0:
            values = _nucleus(values, top_p)
        values = typical_filter(min_p_filter(values, min_p), typical_p)
        choice = torch.argmax(torch.softmax(values, dim=-1) / race, dim=-1, keepdim=True)
        return indices.gather(-1, choice)[:, 0]
    probs = filtered_probs(logits, temperature, 0, top_p, min_p, typical_p)
    return torch.argmax(probs / race, dim=-1)


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    min_p: float = 0.0,
    typical_p: float = 1.0,
) -> Tensor:
    """Pick one token per row. logits: [B, V] -> [B] int64.

    ``temperature == 0`` is greedy (argmax); otherwise draw from
    :func:`filtered_probs` with randomness from ``generator``. Impossible
    settings raise one clear line (:func:`check_sampling_args`).
    """
    check_sampling_args(temperature, top_k, top_p, min_p, typical_p=typical_p)
    B, V = logits.shape
    noise = None if temperature == 0 else uniform_noise((B, noise_width(V, top_k)), generator, logits.device)
    return choose_token(logits, noise, temperature, top_k, top_p, min_p, typical_p)
