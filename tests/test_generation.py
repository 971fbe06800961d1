"""Generation: stopping rules, seeding, streaming stats, and bad input."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from gpt2fn import GPT2FnError, generate, generate_all, generation, load_pretrained
from gpt2fn.cache import cache_len
from gpt2fn.generation import Stream
from gpt2fn.steps import cached_steps, window_len


@pytest.fixture(scope="module")
def small(small_ref):
    return load_pretrained(small_ref.directory)


def prompt(n, seed=0):
    return torch.randint(0, 50257, (1, n), generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_tokens(small):
    params, config = small

    def run(seed, use_cache=True):
        g = torch.Generator().manual_seed(seed)
        return generate_all(params, config, prompt(5), 30, temperature=1.0, top_k=50, top_p=0.9, generator=g, use_cache=use_cache)[0]

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_stops_at_the_stop_token_and_yields_it(small):
    params, config = small
    greedy, _ = generate_all(params, config, prompt(4), 20, temperature=0)
    stop = int(greedy[0, 6])
    first = greedy[0].tolist().index(stop)  # the stop token may already appear earlier
    tokens, stats = generate_all(params, config, prompt(4), 20, temperature=0, stop_token=stop)
    assert tokens[0].tolist() == greedy[0, : first + 1].tolist()
    assert stats.n_new == first + 1


def test_streams_one_token_at_a_time_and_reports_timings(small, monkeypatch):
    params, config = small
    # The stream's clock, with the caller's pauses added to it: an hour
    # between tokens, which no decode step comes near, however loaded the machine.
    paused = 0.0
    monkeypatch.setattr(generation, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + paused))
    stream = generate(params, config, prompt(8), 10, temperature=0)
    seen = []
    for token in stream:
        with pytest.raises(GPT2FnError, match=r"^the stream has not run to its end yet: iterate it, close it, or call \.tokens\(\)"):
            stream.stats  # set when the stream ends
        seen.append(token)
        paused += 3600.0  # the caller's time between tokens is not the model's
    stats = stream.stats
    assert len(seen) == 10 and all(t.shape == (1,) for t in seen)
    assert stats.decode_s < 3600
    assert (stats.n_prompt, stats.n_new, stats.decode_tokens) == (8, 10, 9)
    assert stats.prefill_s > 0 and stats.decode_s > 0
    assert stats.decode_tokens_per_s == pytest.approx(9 / stats.decode_s)


def test_a_stream_closed_early_stops_and_counts_what_it_yielded(small):
    """close() (or leaving a with block) ends the generation where the caller
    stops, e.g. at a stop string: no more steps, stats over the tokens yielded."""
    params, config = small
    greedy, _ = generate_all(params, config, prompt(5), 10, temperature=0)
    stream = generate(params, config, prompt(5), 10, temperature=0)
    seen = [token for _, token in zip(range(4), stream)]
    stream.close()
    stats = stream.stats
    assert (stats.n_new, stats.decode_tokens) == (4, 3) and stats.decode_s > 0
    assert torch.equal(stream.tokens(), greedy[:, :4]) and torch.equal(torch.stack(seen, 1), greedy[:, :4])
    assert list(stream) == []  # nothing more runs
    with generate(params, config, prompt(5), 10, temperature=0) as stream:
        next(iter(stream))
    assert (stream.stats.n_new, stream.stats.decode_tokens) == (1, 0)
    with generate(params, config, prompt(5), 10, temperature=0, draft=(params, config), draft_tokens=3) as stream:
        seen = [token for _, token in zip(range(6), stream)]
    assert stream.stats.n_new == 6 and stream.stats.target_passes >= 2 and torch.equal(torch.stack(seen, 1), greedy[:, :6])


def test_zero_new_tokens(small):
    params, config = small
    tokens, stats = generate_all(params, config, prompt(3), 0)
    assert tokens.shape == (1, 0) and stats.n_new == 0


def test_fills_the_context_exactly(small):
    params, config = small
    n = config.n_ctx - 10
    for use_cache in (True, False):
        tokens, stats = generate_all(params, config, prompt(n), 10, temperature=0, use_cache=use_cache)
        assert tokens.shape == (1, 10)


@pytest.mark.parametrize(
    "n_prompt, n_new, message",
    [
        (0, 5, "the prompt is empty"),
        (129, 1, "the prompt is 129 tokens but the context holds 128"),
        (100, 29, r"exceeds the 128-token context; use max_tokens <= 28"),
        (5, 10_000, r"use max_tokens <= 123"),
        (5, -1, "max_tokens must be an integer >= 0, got -"),
    ],
)
def test_bad_lengths_are_refused(small, n_prompt, n_new, message):
    params, config = small
    with pytest.raises(GPT2FnError, match=message):
        generate_all(params, config, prompt(n_prompt), n_new)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[1, 2, 50257]], r"^prompt 1 holds token 50257, outside the model's vocabulary of 50257 \(ids 0 to 50256\); "
                          r"encode text with the tokenizer the model was trained with$"),
        ([[5], [1, -1]], r"^prompt 2 holds token -1, outside the model's vocabulary of 50257"),
        ([[1, 2.5]], r"^prompt 1 holds 2.5, which is not a token id; token ids are integers$"),
        ([[1, True]], r"^prompt 1 holds True, which is not a token id"),
        (torch.tensor([[1.0, 2.0]]), r"^prompt 1 holds 1.0, which is not a token id"),
        (torch.tensor([[1, 2], [3, 60000]]), r"^prompt 2 holds token 60000, outside"),
    ],
)
def test_prompts_that_are_not_token_ids_of_the_model_are_refused(small, prompts, message):
    params, config = small
    with pytest.raises(GPT2FnError, match=message):
        generate(params, config, prompts, 5)


@pytest.mark.parametrize(
    "prompts, message",
    [
        (torch.tensor([1, 2, 3]), r"^a prompt tensor is \[B, T\] token ids, got shape \[3\]; for one prompt pass ids\[None\]$"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"^a prompt tensor is \[B, T\] token ids, got shape \[1, 2, 3\]$"),
        (torch.zeros(0, 3, dtype=torch.long), r"got shape \[0, 3\]$"),
        ([1, 2, 3], r"^prompts are a \[B, T\] tensor or a list of token lists, got a list of token ids; for one prompt "
                    r"pass \[ids\]$"),
        ([[1, 2], 3], r"^prompts are a \[B, T\] tensor or a list of token lists, got int as prompt 2$"),
        ([[1, 2], torch.tensor([[3, 4]])], r"got a tensor of shape \[1, 2\] as prompt 2 \(a prompt in a list is 1-D\)$"),
        ([torch.tensor([1.0, 2.0])], r"^prompt 1 holds 1.0, which is not a token id; token ids are integers$"),
        ("ROMEO:", r"^prompts are a \[B, T\] tensor or a list of token lists, got str$"),
        ([[1, 2]], None),  # a float count: max_new_tokens below
    ],
)
def test_prompts_of_another_shape_are_refused(small, prompts, message):
    params, config = small
    with pytest.raises(GPT2FnError, match=message or r"^max_tokens must be an integer >= 0, got 2.5$"):
        generate(params, config, prompts, 5 if message else 2.5)


def test_a_list_of_1d_tensors_is_a_ragged_batch(small):
    params, config = small
    rows = [[5, 17, 900], [42], list(range(300, 308))]
    as_lists, _ = generate_all(params, config, rows, 6, temperature=0)
    as_tensors, _ = generate_all(params, config, [torch.tensor(r) for r in rows], 6, temperature=0)
    mixed, _ = generate_all(params, config, [rows[0], torch.tensor(rows[1]), tuple(rows[2])], 6, temperature=0)
    assert torch.equal(as_tensors, as_lists) and torch.equal(mixed, as_lists)


def test_perplexity_refuses_tokens_outside_the_vocabulary(small):
    from gpt2fn.evaluation import perplexity

    params, config = small
    with pytest.raises(GPT2FnError, match=r"^the text holds token 50300, outside the model's vocabulary of 50257"):
        perplexity(params, config, torch.tensor([1, 2, 50300, 3]))


def test_bad_sampling_parameters_are_refused_before_any_work(small):
    params, config = small
    with pytest.raises(GPT2FnError, match="top_p"):
        generate(params, config, prompt(3), 5, top_p=0)
    with pytest.raises(GPT2FnError, match="repetition_penalty must be a finite number > 0"):
        generate(params, config, prompt(3), 5, repetition_penalty=-1)
    with pytest.raises(GPT2FnError, match="no_repeat_ngram_size must be an integer >= 0"):
        generate(params, config, prompt(3), 5, no_repeat_ngram_size=1.5)
    with pytest.raises(GPT2FnError, match="^min_new_tokens keeps the stop token from ending a row that soon; pass a "
                                          "stop_token too, or drop min_new_tokens$"):  # fmt: skip
        generate(params, config, prompt(3), 5, min_new_tokens=2)
    with pytest.raises(GPT2FnError, match=r"^bad_words_ids holds \[\], which is not a non-empty list of token ids"):
        generate(params, config, prompt(3), 5, bad_words_ids=[[5], []])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens_per_call=0), r"tokens_per_call must be an integer >= 1, got 0$"),
        (dict(tokens_per_call=2.0), r"tokens_per_call must be an integer >= 1, got 2.0$"),
        (dict(tokens_per_call=True), r"tokens_per_call must be an integer >= 1, got True$"),
        (dict(tokens_per_call=4, use_cache=False), r"chains cached plain decode steps; drop it, or keep the KV cache on$"),
        (dict(tokens_per_call=4, draft_tokens=4), r"drop it, or the draft \(speculative rounds emit several tokens a call"),
    ],
)
def test_bad_tokens_per_call_is_refused_before_any_work(small, kwargs, message):
    params, config = small
    if "draft_tokens" in kwargs:
        kwargs["draft"] = small
    with pytest.raises(GPT2FnError, match=message):
        generate(params, config, prompt(3), 5, **kwargs)


def test_window_len_by_hand():
    assert [window_len(end, 45) for end in (1, 5, 16, 17, 32, 33, 45)] == [16, 16, 16, 32, 32, 45, 45]
    assert window_len(3, 2) == 2  # never past the cache


@pytest.mark.parametrize("per_call", [1, 4])
def test_each_call_gets_the_window_of_the_positions_it_touches(small, per_call):
    """Prompt 5 + 40 new tokens: the cache holds 45 positions; the prefill
    (positions 0..4) gets the first 16, and a decode call whose first
    position is p, touching p..p + per_call - 1, the first
    window_len(p + per_call) (capped at 45). The tokens are those of calls
    handed the whole cache."""
    params, config = small
    steps = cached_steps(config, tokens_per_call=per_call, temperature=0, top_k=0, top_p=1.0)
    seen = []

    def recorded(step):
        def run(params, tokens, pos, state, noise):
            seen.append((int(pos.max()), cache_len(state)))
            return step(params, tokens, pos, state, noise)

        return run

    def tokens(steps):
        return generation.Stream(params, steps, [prompt(5)[0].tolist()], [40], None, lambda batch, decode: None).tokens()

    windowed = tokens(steps._replace(prefill=recorded(steps.prefill), decode=recorded(steps.decode)))
    first = list(range(5, 44, per_call))  # each decode call's first position
    assert seen == [(4, 16)] + [(p, min(45, -(-(p + per_call) // 16) * 16)) for p in first]
    assert [n for _, n in seen[:3]] == [16, 16, 16] and seen[-1][1] == 45
    assert torch.equal(windowed, tokens(steps._replace(window=None)))
    assert torch.equal(windowed, generate_all(params, config, prompt(5), 40, temperature=0)[0])


def test_an_eager_generation_does_not_import_the_compiler():
    """torch._dynamo takes ~0.8 s to import, which the first eager prefill
    used to report as its own: the eager steps' fp32 products go through
    ``few_rows``' op, and an op made with ``@torch.library.custom_op``
    imports torch._dynamo at its first call (ours is registered by hand)."""
    code = """if True:
        import sys, torch
        from gpt2fn import GPTConfig, generate_all, init_params
        config = GPTConfig(vocab_size=50257, n_ctx=64, n_embd=32, n_layer=2, n_head=2)
        params = init_params(config, seed=0)
        assert params["wte"].dtype == torch.float32
        generate_all(params, config, [[1, 2, 3], [4]], 5, temperature=0)
        assert "torch._dynamo" not in sys.modules, "an eager generation imported torch._dynamo"
    """
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("per_call", [1, 3])
def test_the_loop_checks_for_the_stop_token_once_a_token(small, monkeypatch, per_call):
    """The stop check (every row done?) is the loop's one host sync on a GPU:
    it runs once for each token yielded, and not at all without a stop token."""
    params, config = small
    checks = []
    real = Stream._all_stopped
    monkeypatch.setattr(Stream, "_all_stopped", staticmethod(lambda done: checks.append(done is not None) or real(done)))
    for stop_token in (None, 50256):
        checks.clear()
        out = generate_all(params, config, [[1, 2, 3], [4]], 20, temperature=0, stop_token=stop_token, tokens_per_call=per_call)[0]
        assert out.shape == (2, 20) and len(checks) == 20 and all(checks) == (stop_token is not None)
