"""Sampling: each filter does exactly what it claims, the draw follows the
filtered distribution, and a seed fixes the result."""

from __future__ import annotations

import pytest
import torch

from gpt2fn import GPT2FnError, sample
from gpt2fn.sampling import (
    apply_history, banned_words, check_bad_words, check_sampling_args, choose_token, draw, filtered_probs, hold_stop, min_p_filter, penalize_repeats,
    repeated_ngrams, seen_tokens, top_k_filter, top_p_filter, typical_filter,
)  # fmt: skip


def random_logits(batch=4, vocab=1000, seed=0, scale=3.0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("k", [1, 2, 7, 50, 999])
def test_top_k_keeps_exactly_k_candidates(k):
    logits = random_logits()
    out = top_k_filter(logits, k)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == k).all()
    # the kept ones are the k largest, unchanged
    expected = torch.zeros_like(kept).scatter(-1, logits.topk(k, dim=-1).indices, True)
    assert torch.equal(kept, expected)
    assert torch.equal(out[kept], logits[kept])


def test_top_k_with_ties_still_keeps_exactly_k():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    assert torch.isfinite(top_k_filter(logits, 2)).sum() == 2


def test_top_k_off_or_larger_than_vocab_is_a_no_op():
    logits = random_logits()
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 5000), logits)


def smallest_nucleus(probs_row: list[float], p: float) -> set[int]:
    """Plain-Python reference: take tokens most likely first until the mass reaches p."""
    order = sorted(range(len(probs_row)), key=lambda i: -probs_row[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs_row[i]
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = random_logits(batch=3, vocab=200, seed=1, scale=2.0)
    out = top_p_filter(logits, p)
    probs = torch.softmax(logits.double(), -1)
    for row in range(logits.shape[0]):
        kept = set(torch.isfinite(out[row]).nonzero().flatten().tolist())
        assert kept == smallest_nucleus(probs[row].tolist(), p)
        assert len(kept) >= 1
        assert probs[row, list(kept)].sum() >= p - 1e-6


def test_top_p_one_is_a_no_op():
    logits = random_logits()
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_filters_apply_in_order_temperature_top_k_top_p():
    logits = random_logits(batch=1, vocab=100, seed=2)
    probs = filtered_probs(logits, temperature=0.7, top_k=10, top_p=0.8)
    assert torch.allclose(probs.sum(-1), torch.ones(1))
    scaled = logits / 0.7
    top10 = scaled.topk(10).indices[0].tolist()
    p10 = torch.softmax(scaled[0, top10].double(), -1).tolist()
    nucleus = {top10[i] for i in smallest_nucleus(p10, 0.8)}
    assert set(probs[0].nonzero().flatten().tolist()) == nucleus


@pytest.mark.parametrize("p", [0.0, 1e-4, 0.05, 0.3, 0.9, 1.0])
def test_min_p_is_hugging_faces_min_p(p):
    """min_p_filter against transformers' MinPLogitsWarper: the same logits
    dropped, the most likely always kept; 0 is a no-op."""
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = random_logits(batch=6, vocab=2000, seed=5)
    ours = min_p_filter(logits, p)
    if p == 0:
        assert torch.equal(ours, logits)
        return
    assert torch.equal(ours, MinPLogitsWarper(p)(None, logits.clone()))
    assert torch.isfinite(ours.gather(-1, logits.argmax(-1, keepdim=True))).all()


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_the_repetition_penalty_is_hugging_faces(penalty):
    """penalize_repeats against transformers' RepetitionPenaltyLogitsProcessor
    on token histories with repeats: every seen logit divided (positive) or
    multiplied (negative) once, however often it was seen; the rest unchanged."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = random_logits(batch=3, vocab=500, seed=8)
    logits[0, 7] = 0.0  # a zero logit stays zero
    history = torch.tensor([[7, 7, 3, 499, 3, 12], [0, 1, 2, 3, 4, 5], [9, 9, 9, 9, 9, 9]])
    stale = torch.tensor([[400, 401], [402, 403], [404, 405]])  # slots past each row's last position: not had
    seen = seen_tokens(torch.cat([history, stale], 1), torch.full((3,), 5), 500)
    assert seen.sum(1).tolist() == [4, 6, 1]
    ours = penalize_repeats(logits, seen, penalty)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    assert torch.equal(ours, expected)
    assert torch.equal(apply_history(logits, torch.cat([history, stale], 1), torch.full((3,), 5), penalty), expected)
    assert torch.equal(ours[~seen], logits[~seen]) and ours[0, 7] == 0
    assert (ours[seen] != logits[seen]).sum() == 10  # every other seen logit moved
    assert penalize_repeats(logits, seen, 1.0) is logits


def random_histories(seed: int, longest: int):
    """50 batches of 4 random histories over 6 tokens (many repeats) of 1 to
    ``longest - 1`` tokens: (rows [4, S], last [4]), each row as long as the
    batch's longest + 3, past its own last position filled with stale tokens."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        lengths = torch.randint(1, longest, (4,), generator=g)
        yield torch.randint(0, 6, (4, int(lengths.max()) + 3), generator=g), lengths - 1


def hf_bans(processor, rows, last) -> torch.Tensor:
    """What a transformers logits processor sets to -inf after each row up to its last position: [4, 6] bool."""
    return torch.stack([processor(row[None, : n + 1], torch.zeros(1, 6))[0] == float("-inf")
                        for row, n in zip(rows, last.tolist())])  # fmt: skip


def test_banned_words_are_hugging_faces_bad_words():
    """banned_words against transformers' NoBadWordsLogitsProcessor on 200
    random histories over 6 tokens, rows as long as the longest, past their
    own last position filled with stale tokens, which it ignores: words of
    one, two and three tokens, two sharing a prefix; and through apply_history."""
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    words = ((4,), (1, 2), (1, 3), (2, 2, 5), (0, 1, 2))
    banned = 0
    for rows, last in random_histories(seed=3, longest=12):
        ours = banned_words(rows, last, words, 6)
        assert torch.equal(ours, hf_bans(NoBadWordsLogitsProcessor([list(w) for w in words]), rows, last))
        banned += int(ours[:, :4].sum()) + int(ours[:, 5].sum())  # beyond the one-token word
        assert torch.equal(apply_history(torch.zeros(4, 6), rows, last, bad_words_ids=words) == float("-inf"), ours)
    assert banned > 20


def test_bad_words_are_checked_and_the_stop_token_alone_is_dropped():
    assert check_bad_words([[5], (6, 7)], 10) == ((5,), (6, 7))
    assert check_bad_words([[5], [9], [9, 5]], 10, stop_token=9) == ((5,), (9, 5))  # as Hugging Face drops it
    fix = "; give a list of token lists, each a word never to complete, e.g. [[1110], [4252, 2650]]"
    for bad, message in [
        ("no", "bad_words_ids must be a list of token lists, got 'no'" + fix),
        ([[1], []], "bad_words_ids holds [], which is not a non-empty list of token ids" + fix),
        ([[1], 2], "bad_words_ids holds 2, which is not a non-empty list of token ids" + fix),
        ([[1], [2, 10]], "bad_words_ids holds token 10, outside the model's vocabulary of 10"),
        ([[1.0]], "bad_words_ids holds 1.0, which is not a token id"),
    ]:  # fmt: skip
        with pytest.raises(GPT2FnError) as refused:
            check_bad_words(bad, 10)
        assert str(refused.value).startswith(message), str(refused.value)


def test_holding_the_stop_token_is_hugging_faces_min_new_tokens():
    """hold_stop against transformers' MinNewTokensLengthLogitsProcessor
    (4 prompt tokens, at least 3 new, stop token 7) after 0 to 5 new tokens,
    the count a [1] tensor (the steps' state) or an int (beam search's):
    the stop token's logit -inf in every row while fewer than 3 are made,
    every logit unchanged from then on; and through apply_history."""
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    logits = random_logits(batch=3, vocab=50, seed=2)
    rule = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=4, min_new_tokens=3, eos_token_id=7)
    for made in range(6):
        expected = rule(torch.zeros(3, 4 + made, dtype=torch.long), logits.clone())
        assert torch.equal(hold_stop(logits, torch.tensor([made]), 3, 7), expected)
        assert torch.equal(hold_stop(logits, made, 3, 7), expected)
        sequence, last = torch.zeros(3, 9, dtype=torch.long), torch.full((3,), 3 + made)
        assert torch.equal(apply_history(logits, sequence, last, min_new_tokens=3, stop_token=7, made=made), expected)
        assert (expected[:, 7] == float("-inf")).all() == (made < 3)
        assert torch.equal(expected[:, :7], logits[:, :7]) and torch.equal(expected[:, 8:], logits[:, 8:])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_the_repeated_ngrams_are_hugging_faces(n):
    """repeated_ngrams against transformers' NoRepeatNGramLogitsProcessor on
    200 random histories over 6 tokens (many repeats) of 1 to 29 tokens,
    rows of one batch as long as the longest, past their own last position
    filled with stale tokens, which it ignores."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    banned = 0
    for rows, last in random_histories(seed=n, longest=30):
        ours = repeated_ngrams(rows, last, n, 6)
        assert torch.equal(ours, hf_bans(NoRepeatNGramLogitsProcessor(n), rows, last)), n
        banned += int(ours.sum())
        assert torch.equal(apply_history(torch.zeros(4, 6), rows, last, no_repeat_ngram_size=n) == float("-inf"), ours)
    assert banned > 10  # the rule bit (n = 4: 13 tokens of 200 rows)


@pytest.mark.parametrize("mass", [0.05, 0.2, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_typical_p_is_hugging_faces_typical_p(mass):
    """typical_filter against transformers' TypicalLogitsWarper on 300
    batches of random logits of varied sharpness, a third with tokens
    filtered already (-inf): the same logits dropped, at least one kept; 1 is a no-op."""
    from transformers.generation.logits_process import TypicalLogitsWarper

    g = torch.Generator().manual_seed(0)
    kept = []
    for trial in range(300):
        logits = torch.randn(4, 300, generator=g) * (0.5 + 4 * torch.rand(1, generator=g))
        if trial % 3 == 0:
            logits[:, :5] = float("-inf")
        ours = typical_filter(logits, mass)
        if mass == 1:
            assert ours is logits
            return
        assert torch.equal(ours, TypicalLogitsWarper(mass)(None, logits.clone()))
        kept += torch.isfinite(ours).sum(-1).tolist()
    assert 1 <= min(kept) < max(kept) < 300  # every row keeps a token, some more than others, none all 300


@pytest.mark.parametrize("top_k, top_p, min_p, typical_p", [(0, 1.0, 0.1, 1.0), (50, 1.0, 0.2, 1.0), (50, 0.9, 0.05, 1.0),
                                                            (0, 0.8, 0.3, 1.0), (0, 1.0, 0.0, 0.5), (50, 0.9, 0.02, 0.7)])  # fmt: skip
def test_filters_chain_as_hugging_faces_warpers(top_k, top_p, min_p, typical_p):
    """filtered_probs = transformers' temperature, top-k, top-p, min-p and
    typical-p warpers in that order, then softmax; the compiled step's sampler
    (choose_token, top-k among the candidates only) draws only from its support."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
        TypicalLogitsWarper,
    )  # fmt: skip

    logits = random_logits(batch=4, vocab=3000, seed=6)
    warpers = [TemperatureLogitsWarper(0.8)] + ([TopKLogitsWarper(top_k)] if top_k else [])
    warpers += ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + [MinPLogitsWarper(min_p)]
    warpers += [TypicalLogitsWarper(typical_p)] if typical_p < 1 else []
    reference = torch.softmax(LogitsProcessorList(warpers)(None, logits.clone()), -1)
    ours = filtered_probs(logits, 0.8, top_k, top_p, min_p, typical_p)
    assert torch.equal(ours > 0, reference > 0) and torch.allclose(ours, reference, atol=1e-7)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        chosen = choose_token(logits, torch.rand(4, top_k or 3000, generator=g), 0.8, top_k, top_p, min_p, typical_p)
        assert (reference.gather(-1, chosen[:, None]) > 0).all()


def test_greedy_and_temperature_to_zero():
    logits = random_logits(batch=8, vocab=500, seed=3)
    greedy = sample(logits, temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample(logits, temperature=1e-4, generator=g), greedy)


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = random_logits(batch=16, vocab=50257, seed=4, scale=1.0)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample(logits, 1.0, 40, 0.95, g) for _ in range(10)])

    assert torch.equal(draws(123), draws(123))
    assert not torch.equal(draws(123), draws(124))


def test_draws_follow_the_filtered_distribution():
    """The exponential race picks i with probability p_i: compare empirical
    frequencies with the distribution over 40,000 draws (fixed seed)."""
    logits = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))
    n = 40_000
    g = torch.Generator().manual_seed(7)
    for top_k, top_p, min_p, typical in [(0, 1.0, 0.0, 1.0), (3, 1.0, 0.0, 1.0), (0, 0.7, 0.0, 1.0), (0, 1.0, 0.3, 1.0),
                                         (4, 1.0, 0.3, 1.0), (0, 1.0, 0.0, 0.6), (4, 1.0, 0.0, 0.6)]:  # fmt: skip
        probs = filtered_probs(logits, 1.0, top_k, top_p, min_p, typical)[0]
        draws = sample(logits.expand(n, -1), 1.0, top_k, top_p, g, min_p=min_p, typical_p=typical)
        freq = torch.bincount(draws, minlength=6).double() / n
        # 4.5 standard deviations of a binomial proportion: a real bias fails, noise does not
        sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
        assert ((freq - probs.double()).abs() <= 4.5 * sigma + 1e-12).all(), (top_k, top_p, freq, probs)
        assert (freq[probs == 0] == 0).all()


def test_inverse_cdf_draw_by_hand():
    """weights [0, 1, 0, 3]: cumulative [0, 1, 1, 4]; u times 4 picks the
    first index whose cumulative weight exceeds it, never a zero weight."""
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0]]).expand(6, -1)
    u = torch.tensor([0.0, 0.1, 0.2499, 0.25, 0.9999, 1.0])  # 1.0: what rounding can make of u x total
    assert draw(weights, u).tolist() == [1, 1, 1, 3, 3, 3]
    tail = torch.tensor([[2.0, 0.0, 0.0]])  # the last weights zero: u = 1 still draws index 0
    assert draw(tail, torch.tensor([1.0])).tolist() == [0]


def test_inverse_cdf_draws_follow_the_weights():
    weights = torch.tensor([0.8, 0.0, 0.5, 0.3, 0.0, 0.4])  # not normalised
    probs = weights / weights.sum()
    n = 40_000
    draws = draw(weights.expand(n, -1), torch.rand(n, generator=torch.Generator().manual_seed(8)))
    freq = torch.bincount(draws, minlength=6).double() / n
    sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 4.5 * sigma + 1e-12).all(), (freq, probs)
    assert (freq[probs == 0] == 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(temperature=None), "temperature must be a finite number >= 0 \\(0 = greedy\\), got None"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_k=True), "top_k must be an integer >= 0"),
        (dict(top_p=None), r"top_p must be in \(0, 1\] \(1 = off\), got None"),
        (dict(top_p="0.9"), r"top_p must be in \(0, 1\]"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=-0.1), r"top_p must be in \(0, 1\]"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\] \(0 = off\), got -0.1"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(min_p=None), r"min_p must be in \[0, 1\]"),
        (dict(typical_p=0.0), r"typical_p must be in \(0, 1\] \(1 = off\), got 0.0$"),
        (dict(typical_p=1.5), r"typical_p must be in \(0, 1\] \(1 = off\), got 1.5$"),
        (dict(typical_p=None), r"typical_p must be in \(0, 1\] \(1 = off\), got None$"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be a finite number > 0 \(1 = off; above 1 discourages "
                                       r"repeats\), got 0.0$"),  # fmt: skip
        (dict(repetition_penalty=-1.2), r"repetition_penalty must be a finite number > 0 .*, got -1.2$"),
        (dict(repetition_penalty=float("inf")), r"repetition_penalty must be a finite number > 0 .*, got inf$"),
        (dict(repetition_penalty=float("nan")), r"repetition_penalty must be a finite number > 0 .*, got nan$"),
        (dict(repetition_penalty=None), r"repetition_penalty must be a finite number > 0 .*, got None$"),
        (dict(no_repeat_ngram_size=-1), r"no_repeat_ngram_size must be an integer >= 0 \(0 = off\), got -1$"),
        (dict(no_repeat_ngram_size=2.0), r"no_repeat_ngram_size must be an integer >= 0 \(0 = off\), got 2.0$"),
        (dict(no_repeat_ngram_size=True), r"no_repeat_ngram_size must be an integer >= 0 \(0 = off\), got True$"),
        (dict(min_new_tokens=-1, stop_token=3), r"min_new_tokens must be an integer >= 0 \(0 = off\), got -1$"),
        (dict(min_new_tokens=2.0, stop_token=3), r"min_new_tokens must be an integer >= 0 \(0 = off\), got 2.0$"),
        (dict(min_new_tokens=4), r"min_new_tokens keeps the stop token from ending a row that soon; pass a stop_token too, "
                                 r"or drop min_new_tokens$"),  # fmt: skip
    ],
)
def test_impossible_parameters_are_refused(kwargs, message):
    args = dict(temperature=1.0, top_k=0, top_p=1.0) | kwargs
    with pytest.raises(GPT2FnError, match=message):
        check_sampling_args(**args)
    if {"repetition_penalty", "no_repeat_ngram_size", "min_new_tokens"} & set(kwargs):  # the one-shot sampler reads no history
        return
    with pytest.raises(GPT2FnError, match=message):  # the library's one-shot sampler checks them too
        sample(torch.randn(2, 10), **args)
