"""Exactness against the reference (transformers' GPT-2) and the internal
equivalences: cache vs no cache, manual vs SDPA attention."""

from __future__ import annotations

import pytest
import torch

from gpt2fn import forward, generate, generate_all, load_pretrained, make_cache
from gpt2fn.config import GPTConfig

from conftest import kernels, run_cached

TOL = 1e-5


def prompt_ids(config: GPTConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small(small_ref):
    return load_pretrained(small_ref.directory)


@pytest.fixture(scope="module")
def gpt2(gpt2_ref):
    return load_pretrained(gpt2_ref.directory)


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
@pytest.mark.parametrize("which", ["small", "gpt2"])
def test_logits_match_reference(which, attention, request):
    ref = request.getfixturevalue(f"{which}_ref")
    params, config = request.getfixturevalue(which)
    tokens = prompt_ids(config, batch=2, length=64 if which == "gpt2" else 100)
    with torch.no_grad():
        expected = ref.model(tokens).logits
    got = forward(params, config, tokens, kernels=kernels(attention))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL


def test_logits_match_reference_over_the_full_context(small, small_ref):
    params, config = small
    tokens = prompt_ids(config, batch=1, length=config.n_ctx, seed=3)
    with torch.no_grad():
        expected = small_ref.model(tokens).logits
    assert (forward(params, config, tokens) - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("which", ["small", "gpt2"])
def test_greedy_generation_is_token_identical_to_reference(which, request):
    ref = request.getfixturevalue(f"{which}_ref")
    params, config = request.getfixturevalue(which)
    prompt = prompt_ids(config, batch=1, length=7, seed=5)
    n_new = 64
    with torch.no_grad():
        expected = ref.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
            do_sample=False, pad_token_id=0,
        )[0, prompt.shape[1]:]  # fmt: skip
    for use_cache in (True, False):
        got, stats = generate_all(params, config, prompt, n_new, temperature=0, use_cache=use_cache)
        assert stats.n_new == n_new
        assert got[0].tolist() == expected.tolist()
    # the output must not be degenerate, or identity would prove little
    assert len(set(expected.tolist())) > 8


@pytest.mark.parametrize("penalty, ngram", [(1.3, 0), (0.8, 0), (1.0, 2), (1.0, 1), (1.2, 3)])
def test_greedy_generation_with_rules_on_the_text_so_far_is_the_references(small, small_ref, penalty, ngram):
    """generate(repetition_penalty=, no_repeat_ngram_size=) against
    transformers' generate with the same, greedy: the same tokens, with the
    KV cache, without it, and three steps a call; in a ragged batch each row
    is its prompt alone; and the rules change the text (a penalty above 1:
    more distinct tokens; an n-gram ban: no n-gram twice)."""
    params, config = small
    rules = dict(repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    start = prompt_ids(config, 1, 7, seed=5)
    looping = start[0].tolist() + generate_all(params, config, start, 12, temperature=0)[0][0].tolist()
    prompts = [looping, prompt_ids(config, 1, 3, seed=6)[0].tolist()]  # the first: what the model would repeat
    n_new = 40
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            expected = small_ref.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                pad_token_id=0, **rules,
            )[0, len(p):].tolist()  # fmt: skip
        for kw in (dict(), dict(use_cache=False), dict(tokens_per_call=3)):
            got = generate_all(params, config, ids, n_new, temperature=0, **rules, **kw)[0]
            assert got[0].tolist() == expected, kw
        plain = generate_all(params, config, ids, n_new, temperature=0)[0][0].tolist()
        assert plain != expected
        if penalty > 1:
            assert len(set(expected)) > len(set(plain))
        if ngram:  # no new token completes an n-gram the text had before it
            text = p + expected
            grams = [tuple(text[i + 1 - ngram : i + 1]) for i in range(ngram - 1, len(text))]  # the n-gram ending at i
            assert all(grams[i + 1 - ngram] not in grams[: i + 1 - ngram] for i in range(len(p), len(text)))
    rows = generate_all(params, config, prompts, n_new, temperature=0, **rules)[0]
    for p, row in zip(prompts, rows):
        assert torch.equal(row, generate_all(params, config, [p], n_new, temperature=0, **rules)[0][0])


def test_greedy_generation_with_bad_words_is_the_references(small, small_ref):
    """generate(bad_words_ids=) against transformers' generate(bad_words_ids=),
    greedy, with words the plain greedy text has (a token, a pair, a
    triple): the same tokens with the KV cache, without it and three steps a
    call; a ragged batch gives each row its prompt alone; none of the words
    appears in the new text."""
    params, config = small
    prompts = [prompt_ids(config, 1, 7, seed=8)[0].tolist(), prompt_ids(config, 1, 3, seed=6)[0].tolist()]
    plain = generate_all(params, config, prompts, 30, temperature=0)[0].tolist()
    words = [[plain[0][1]], plain[0][4:6], plain[1][2:5]]
    n_new = 30
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            expected.append(small_ref.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                                     min_new_tokens=n_new, do_sample=False, pad_token_id=0,
                                                     bad_words_ids=words)[0, len(p):].tolist())  # fmt: skip
    assert expected != plain
    for kw in (dict(), dict(use_cache=False), dict(tokens_per_call=3)):
        for p, row in zip(prompts, expected):
            assert generate_all(params, config, [p], n_new, temperature=0, bad_words_ids=words, **kw)[0][0].tolist() == row, kw
    assert generate_all(params, config, prompts, n_new, temperature=0, bad_words_ids=words)[0].tolist() == expected
    for p, row in zip(prompts, expected):
        text = p + row
        for w in words:
            assert not any(text[i : i + len(w)] == w for i in range(len(p) - len(w) + 1, len(text) - len(w) + 1))


@pytest.mark.parametrize("min_new, penalty", [(6, 1.0), (20, 1.0), (6, 1.3)])
def test_greedy_generation_with_min_new_tokens_is_the_references(small, small_ref, min_new, penalty):
    """generate(min_new_tokens=) against transformers' generate(min_new_tokens=,
    eos_token_id=), greedy, with a stop token the model picks as its 2nd new
    token (and often later): the same rows, cut at the stop token where it
    is finally chosen, with the KV cache, without it and three steps a call
    (with a repetition penalty too); a ragged batch gives each row its
    prompt alone; and without the rule the rows stop at the 2nd token."""
    params, config = small
    start = prompt_ids(config, 1, 7, seed=8)
    plain = generate_all(params, config, start, 40, temperature=0)[0][0].tolist()
    stop = plain[1]
    assert stop != plain[0] and plain.count(stop) >= 10  # the stop token comes early, and later again
    prompts = [start[0].tolist(), prompt_ids(config, 1, 3, seed=6)[0].tolist() + plain[:1]]
    rules = dict(min_new_tokens=min_new, repetition_penalty=penalty)
    n_new = 40
    expected = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = small_ref.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                                           eos_token_id=stop, pad_token_id=stop, **rules)[0, len(p):].tolist()  # fmt: skip
        expected.append(out[: out.index(stop) + 1] if stop in out else out)
    assert all(len(row) > min_new and stop not in row[:min_new] for row in expected)  # (2 of the 6 end at it later)
    for kw in (dict(), dict(use_cache=False), dict(tokens_per_call=3)):
        for p, row in zip(prompts, expected):
            assert generate(params, config, [p], n_new, temperature=0, stop_token=stop, **rules, **kw).rows() == [row], kw
    assert generate(params, config, prompts, n_new, temperature=0, stop_token=stop, **rules).rows() == expected
    assert generate(params, config, prompts[:1], n_new, temperature=0, stop_token=stop).rows() == [plain[:2]]


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
def test_cached_decode_equals_full_recompute_at_every_step(small, attention):
    params, config = small
    B, T, steps = 2, 9, 40
    tokens = prompt_ids(config, B, T + steps, seed=7)
    full = forward(params, config, tokens, kernels=kernels(attention))  # [B, T+steps, V], no cache
    cache = make_cache(config, B, T + steps)
    prefill = run_cached(params, config, tokens[:, :T], cache, 0, attention)
    assert (prefill - full[:, :T]).abs().max().item() <= TOL
    for t in range(T, T + steps):
        logits = run_cached(params, config, tokens[:, t : t + 1], cache, t, attention)[:, -1]
        assert (logits - full[:, t]).abs().max().item() <= TOL, f"step {t}"


def test_manual_and_sdpa_attention_agree(gpt2):
    params, config = gpt2
    tokens = prompt_ids(config, 1, 48, seed=11)
    manual = forward(params, config, tokens, kernels=kernels("manual"))
    sdpa = forward(params, config, tokens, kernels=kernels("sdpa"))
    assert (manual - sdpa).abs().max().item() <= TOL
    caches = [make_cache(config, 1, 64) for _ in range(2)]
    for cache, backend in zip(caches, ("manual", "sdpa")):
        run_cached(params, config, tokens, cache, 0, backend)
    outs = [run_cached(params, config, tokens[:, :1], c, 48, b)[:, -1] for c, b in zip(caches, ("manual", "sdpa"))]
    assert (outs[0] - outs[1]).abs().max().item() <= TOL


def test_cache_is_written_in_place_and_never_reallocated(small):
    params, config = small
    T, L = 5, 12
    cache = make_cache(config, 1, L)
    assert isinstance(cache, tuple) and len(cache) == config.n_layer
    assert all(isinstance(kv, tuple) and len(kv) == 2 for kv in cache)
    pointers = [t.data_ptr() for kv in cache for t in kv]
    tokens = prompt_ids(config, 1, T + 3, seed=13)
    run_cached(params, config, tokens[:, :T], cache, 0)
    for t in range(T, T + 3):
        run_cached(params, config, tokens[:, t : t + 1], cache, t)
    assert [t.data_ptr() for kv in cache for t in kv] == pointers
    for k, v in cache:
        assert k.shape == (1, config.n_head, L, config.head_dim)
        # positions 0..T+2 were written, the rest is untouched
        assert k[:, :, : T + 3].abs().sum() > 0 and v[:, :, : T + 3].abs().sum() > 0
        assert k[:, :, T + 3 :].abs().sum() == 0 and v[:, :, T + 3 :].abs().sum() == 0


def test_cache_holds_the_reference_keys_and_values(small, small_ref):
    params, config = small
    T = 6
    tokens = prompt_ids(config, 1, T, seed=17)
    cache = make_cache(config, 1, 8)
    run_cached(params, config, tokens, cache, 0)
    with torch.no_grad():
        past = small_ref.model(tokens, use_cache=True).past_key_values
    for layer, (k, v) in enumerate(cache):
        ref_k, ref_v = past.layers[layer].keys, past.layers[layer].values
        assert (k[:, :, :T] - ref_k).abs().max().item() <= TOL
        assert (v[:, :, :T] - ref_v).abs().max().item() <= TOL
