"""Batched generation of ragged prompts: every row equals generating its
prompt alone, rows stop on their own, sampling is reproducible per seed."""

from __future__ import annotations

import pytest
import torch

from gpt2fn import GPT2FnError, generate, generate_all, load_pretrained


@pytest.fixture(scope="module")
def small(small_ref):
    return load_pretrained(small_ref.directory)


def ragged(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]


def alone(params, config, prompt, n, **kw):
    return generate_all(params, config, torch.tensor([prompt]), n, **kw)[0][0].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_rows_equal_each_prompt_alone(small, use_cache):
    params, config = small
    prompts = ragged([3, 17, 1, 9, 30])
    rows = generate(params, config, prompts, 25, temperature=0, use_cache=use_cache).rows()
    assert [len(t) for t in rows] == [25] * 5
    for prompt, tokens in zip(prompts, rows):
        assert tokens == alone(params, config, prompt, 25, temperature=0)


def test_rows_stop_on_their_own(small):
    params, config = small
    prompts = ragged([4, 11, 6], seed=1)
    first = alone(params, config, prompts[0], 20, temperature=0)
    stop = first[5]  # a token row 0 makes early
    stream = generate(params, config, prompts, 20, temperature=0, stop_token=stop)
    rows = stream.rows()
    for prompt, tokens in zip(prompts, rows):
        expected = alone(params, config, prompt, 20, temperature=0)
        if stop in expected:
            expected = expected[: expected.index(stop) + 1]
        assert tokens == expected
    assert len(rows[0]) <= 6 < 20
    assert stream.stats.n_new == max(len(t) for t in rows)
    for i, row in enumerate(rows):  # the rule the CLI reads as tokens come: each row's last token is its one last
        assert [stream.is_last(i, n, t) for n, t in enumerate(row, 1)] == [False] * (len(row) - 1) + [True]


def test_each_row_has_its_own_context_limit(small):
    params, config = small  # n_ctx = 128
    prompts = ragged([120, 5], seed=2)
    rows = generate(params, config, prompts, 30, temperature=0).rows()
    assert [len(t) for t in rows] == [8, 30]
    assert rows[0] == alone(params, config, prompts[0], 8, temperature=0)


def test_sampling_is_reproducible_per_seed(small):
    params, config = small
    prompts = ragged([2, 8, 5], seed=3)

    def run(seed):
        return generate(params, config, prompts, 15, temperature=0.9, top_k=40,
                        generator=torch.Generator().manual_seed(seed)).rows()  # fmt: skip

    assert run(7) == run(7) and run(7) != run(8)


@pytest.mark.parametrize(
    "prompts, message",
    [([], "no prompts"), ([[1, 2], []], "prompt 2 is empty"), ([[1] * 129], "prompt 1 is 129 tokens")],
)
def test_bad_batches_are_refused(small, prompts, message):
    params, config = small
    with pytest.raises(GPT2FnError, match=message):
        generate(params, config, prompts, 5)
