"""Beam search against transformers' generate(num_beams=...): the same
hypotheses and scores, and its invariants (one beam is greedy, each ragged
prompt is itself alone, a score is its tokens' log-probability over its length)."""

from __future__ import annotations

import io

import pytest
import torch

from gpt2fn import GPT2FnError, generate_all, load_pretrained
from gpt2fn import steps
from gpt2fn.beam import beam_search
from gpt2fn.evaluation import token_logprobs

from conftest import load_script


@pytest.fixture(scope="module")
def small(small_ref):
    return load_pretrained(small_ref.directory)


def ids(batch, n, seed=0):
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


def liked_token(small_ref, prompt, rank):
    """The token the model ranks ``rank``-th (from 1) after ``prompt``: a stop token that some beams reach."""
    with torch.no_grad():
        return int(small_ref.model(prompt[None]).logits[0, -1].argsort(descending=True)[rank - 1])


@pytest.mark.parametrize(
    "settings, stop_rank, one_ends",
    [
        (dict(), None, False),
        (dict(length_penalty=0.5), 3, True),
        (dict(length_penalty=0.0), 2, True),
        (dict(length_penalty=-1.0), 2, True),
        (dict(length_penalty=0.5, early_stopping=True), 2, True),
        (dict(length_penalty=2.0, early_stopping="never"), 2, False),  # favours length: the best two run to the end
        (dict(no_repeat_ngram_size=2), None, False),
        (dict(repetition_penalty=1.3), 2, True),
    ],
)
def test_beams_and_scores_are_hugging_faces(small, small_ref, settings, stop_rank, one_ends):
    """The two best hypotheses of each of two prompts (4 beams, 20 new tokens):
    the same tokens as transformers (which pads an ended one with the stop
    token) and the same scores within 1e-5 of their size."""
    params, config = small
    prompts = ids(2, 6)
    stop = None if stop_rank is None else liked_token(small_ref, prompts[0], stop_rank)
    with torch.no_grad():
        hf = small_ref.model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20, num_beams=4, num_return_sequences=2,
            do_sample=False, pad_token_id=0, eos_token_id=stop, output_scores=True, return_dict_in_generate=True,
            **settings,
        )  # fmt: skip
    ours = beam_search(params, config, prompts, 20, 4, num_return_sequences=2, stop_token=stop, **settings)
    lengths = []
    for b in range(2):
        for r in range(2):
            beam, expected = ours[b][r], hf.sequences[2 * b + r, 6:].tolist()
            n = len(beam.tokens)
            assert beam.tokens == expected[:n] and expected[n:] == [0 if stop is None else stop] * (20 - n), (b, r)
            assert abs(beam.score - hf.sequences_scores[2 * b + r].item()) <= 1e-5 * max(1.0, abs(beam.score))
            assert n == 20 or beam.tokens[-1] == stop
            lengths.append(n)
    assert (min(lengths) < 20) == one_ends  # a best hypothesis ended at the stop token


@pytest.mark.parametrize("seed, min_new, length_penalty", [(0, 5, 0.5), (5, 3, 0.0)])
def test_min_new_tokens_beams_are_hugging_faces(small, small_ref, seed, min_new, length_penalty):
    """min_new_tokens in beam search, with a stop token the best beam without
    it has most often: the hypotheses and scores of transformers' (which
    pads an ended one with the stop token to the longest), none ending before
    ``min_new`` + 1 tokens, where without the rule one ends sooner."""
    params, config = small
    prompts = ids(2, 6, seed=seed)
    kw = dict(num_return_sequences=2, length_penalty=length_penalty)
    best = beam_search(params, config, prompts, 20, 4, **kw)[0][0].tokens
    stop = max(set(best), key=best.count)
    with torch.no_grad():
        hf = small_ref.model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20, num_beams=4, do_sample=False,
            pad_token_id=0, eos_token_id=stop, min_new_tokens=min_new, output_scores=True, return_dict_in_generate=True,
            **kw,
        )  # fmt: skip
    ours = beam_search(params, config, prompts, 20, 4, stop_token=stop, min_new_tokens=min_new, **kw)
    beams = [beam for row in ours for beam in row]
    for beam, expected, score in zip(beams, hf.sequences[:, 6:].tolist(), hf.sequences_scores.tolist()):
        assert len(beam.tokens) <= len(expected) and beam.tokens + [stop] * (len(expected) - len(beam.tokens)) == expected
        assert abs(beam.score - score) <= 1e-5 * max(1.0, abs(score))
    assert min(len(b.tokens) for b in beams) < 20 and all(len(b.tokens) > min_new for b in beams)
    plain = [beam for row in beam_search(params, config, prompts, 20, 4, stop_token=stop, **kw) for beam in row]
    assert any(len(b.tokens) <= min_new for b in plain)


def test_bad_words_beams_are_hugging_faces(small, small_ref):
    """bad_words_ids in beam search, words the best beams have without them
    (a token and a pair): transformers' hypotheses and scores."""
    params, config = small
    prompts = ids(2, 6, seed=1)
    best = [b[0].tokens for b in beam_search(params, config, prompts, 20, 4)]
    words = [[best[0][3]], best[1][5:7]]
    with torch.no_grad():
        hf = small_ref.model.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20, num_beams=4, num_return_sequences=2,
            do_sample=False, pad_token_id=0, bad_words_ids=words, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    ours = [beam for row in beam_search(params, config, prompts, 20, 4, num_return_sequences=2, bad_words_ids=words)
            for beam in row]  # fmt: skip
    assert [b.tokens for b in ours] == hf.sequences[:, 6:].tolist()
    assert all(abs(b.score - s) <= 1e-5 * max(1.0, abs(s)) for b, s in zip(ours, hf.sequences_scores.tolist()))
    assert [b.tokens for b in ours[::2]] != best


@pytest.mark.parametrize("seed, stop_rank, num_beams, length_penalty", [(123, 2, 3, 2.0), (127, 5, 3, 1.0)])
def test_a_prompt_that_can_no_longer_improve_takes_no_later_hypothesis(small, small_ref, seed, stop_rank, num_beams,
                                                                       length_penalty):  # fmt: skip
    """Two prompts, the first ends early: once its running beams cannot beat
    its finished ones, an ending candidate of its later steps is not taken,
    while the second prompt runs on (found by search over seeds: a search
    without that rule returns other hypotheses here). All hypotheses are
    transformers'."""
    params, config = small
    prompts = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(seed))
    stop = liked_token(small_ref, prompts[0], stop_rank)
    with torch.no_grad():
        hf = small_ref.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20,
                                      num_beams=num_beams, num_return_sequences=num_beams, do_sample=False, pad_token_id=0,
                                      eos_token_id=stop, length_penalty=length_penalty).tolist()  # fmt: skip
    ours = beam_search(params, config, prompts, 20, num_beams, num_return_sequences=num_beams, stop_token=stop,
                       length_penalty=length_penalty)  # fmt: skip
    padded = [[b.tokens + [stop] * (20 - len(b.tokens)) for b in row] for row in ours]  # as transformers pads
    assert padded == [[row[6:] for row in hf[i * num_beams : (i + 1) * num_beams]] for i in range(2)]
    assert max(len(b.tokens) for b in ours[0]) < 20 and all(len(b.tokens) == 20 for b in ours[1])


def test_one_beam_is_greedy_decoding(small, small_ref):
    params, config = small
    prompt = ids(1, 5, seed=3)
    greedy = generate_all(params, config, prompt, 30, temperature=0)[0][0].tolist()
    assert beam_search(params, config, prompt, 30, 1)[0][0].tokens == greedy
    stop = greedy[7]  # ends there, stop token included
    assert beam_search(params, config, prompt, 30, 1, stop_token=stop)[0][0].tokens == greedy[: greedy.index(stop) + 1]


def test_progress_shows_a_bar_of_the_steps_on_stderr(small, capsys):
    params, config = small
    quiet = beam_search(params, config, ids(1, 4), 9, 2)
    assert capsys.readouterr().err == ""
    assert beam_search(params, config, ids(1, 4), 9, 2, progress=True) == quiet
    err = capsys.readouterr().err
    assert "beam search:" in err and "/9 [" in err and "step/s" in err  # a bar of the 9 steps, cleared when done


def test_each_ragged_prompt_gets_the_beams_it_gets_alone(small):
    params, config = small
    prompts = [ids(1, n, seed=n)[0].tolist() for n in (2, 9, 5)]
    together = beam_search(params, config, prompts, 16, 3, num_return_sequences=3, no_repeat_ngram_size=3)
    for prompt, beams in zip(prompts, together):
        alone = beam_search(params, config, [prompt], 16, 3, num_return_sequences=3, no_repeat_ngram_size=3)[0]
        assert [b.tokens for b in beams] == [b.tokens for b in alone]
        assert [b.score for b in beams] == pytest.approx([b.score for b in alone], abs=1e-5)
        assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_a_score_is_the_summed_log_probability_over_the_length_to_the_penalty(small, length_penalty):
    """Checked against a forward over the whole text (not the search's own sums)."""
    params, config = small
    prompt = ids(1, 6, seed=4)
    for beam in beam_search(params, config, prompt, 12, 4, num_return_sequences=4, length_penalty=length_penalty)[0]:
        text = torch.cat([prompt[0], torch.tensor(beam.tokens)])[None]
        with torch.inference_mode():
            logprob = token_logprobs(params, config, text)[0, 5:].sum().item()
        assert beam.score == pytest.approx(logprob / len(beam.tokens) ** length_penalty, abs=1e-4)


def test_early_stopping_ends_the_search_once_every_beam_has_finished(small, small_ref, monkeypatch):
    """With early_stopping=True and a stop token the model likes, the search
    runs fewer steps than max_new_tokens (counted as calls of the model),
    and returns the hypotheses transformers does."""
    params, config = small
    prompt = ids(1, 6)
    stop = liked_token(small_ref, prompt[0], 2)
    calls = []
    step = steps.log_probs_step
    monkeypatch.setattr(steps, "log_probs_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    beams = beam_search(params, config, prompt, 40, 2, num_return_sequences=2, stop_token=stop, early_stopping=True)[0]
    assert len(calls) < 40 and all(b.tokens[-1] == stop for b in beams)
    with torch.no_grad():
        hf = small_ref.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, num_beams=2,
                                      num_return_sequences=2, do_sample=False, eos_token_id=stop, pad_token_id=0,
                                      early_stopping=True)  # fmt: skip
    assert [b.tokens for b in beams] == [row[6 : 6 + len(b.tokens)] for row, b in zip(hf.tolist(), beams)]


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_beam_search_finds_the_eager_beams_with_one_graph(small):
    """Its one-token step compiled: the same hypotheses, scores within 1e-5,
    one graph for every step, and none new for other prompts and lengths."""
    from torch._dynamo.utils import counters

    params, config = small
    prompts = [ids(1, 5)[0].tolist(), ids(1, 2, seed=1)[0].tolist()]
    eager = beam_search(params, config, prompts, 30, 3, num_return_sequences=3, no_repeat_ngram_size=2)
    compiled = beam_search(params, config, prompts, 30, 3, num_return_sequences=3, no_repeat_ngram_size=2, compile=True)
    assert [[b.tokens for b in row] for row in compiled] == [[b.tokens for b in row] for row in eager]
    assert [b.score for row in compiled for b in row] == pytest.approx([b.score for row in eager for b in row], abs=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    beam_search(params, config, [prompts[1], [5, 6, 7]], 60, 3, compile=True)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_beams=0), r"^num_beams must be an integer >= 1, got 0$"),
        (dict(num_return_sequences=5), r"^num_return_sequences \(5\) must be at most num_beams \(4\)$"),
        (dict(early_stopping="sometimes"), r"^early_stopping is False, True or 'never', got 'sometimes'$"),
        (dict(early_stopping=1), r"^early_stopping is False, True or 'never', got 1$"),
        (dict(length_penalty=float("nan")), r"^length_penalty must be a finite number .*, got nan$"),
        (dict(no_repeat_ngram_size=-1), r"^no_repeat_ngram_size must be an integer >= 0"),
        (dict(min_new_tokens=3), r"^min_new_tokens keeps the stop token from ending a row that soon; pass a stop_token"),
        (dict(max_new_tokens=0), r"^max_tokens must be an integer >= 1, got 0$"),
        (dict(max_new_tokens=125), r"^prompt \(6 tokens\) \+ max_tokens \(125\) exceeds the 128-token context"),
        (dict(prompts=[[1, 2], [3, 70000]]), r"^prompt 2 holds token 70000, outside the model's vocabulary"),
    ],
)
def test_bad_input_is_one_clear_line(small, kwargs, message):
    params, config = small
    args = dict(prompts=ids(1, 6), max_new_tokens=10, num_beams=4) | kwargs
    with pytest.raises(GPT2FnError, match=message):
        beam_search(params, config, args.pop("prompts"), args.pop("max_new_tokens"), args.pop("num_beams"), **args)


def test_the_cli_prints_the_best_beam_and_refuses_what_beam_search_does_not_take(small, small_ref, capsys, tmp_path,
                                                                                  monkeypatch):
    from gpt2fn import decode, encode, get_tokenizer

    cli = load_script("generate")
    text = "The meaning of life is"
    base = ["--prompt", text, "--model", str(small_ref.directory), "--max_tokens", "12", "--device", "cpu",
            "--num_beams", "3", "--no_repeat_ngram_size", "2"]  # fmt: skip
    assert cli.main(base) == 0
    out, err = capsys.readouterr()
    params, config = small
    tok = get_tokenizer()
    best = beam_search(params, config, [encode(tok, text)], 12, 3, stop_token=tok.eot_token, no_repeat_ngram_size=2)[0][0]
    assert out == text + decode(tok, best.tokens) + "\n"
    assert "beam search of 3 beams" in err and f"{best.score:.3f}" in err
    assert cli.main(base + ["--prompt", "Hello", "--jsonl", str(tmp_path / "rows.jsonl")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"--- [1/2] ---\n{text}{decode(tok, best.tokens)}\n--- [2/2] ---\nHello")
    assert (tmp_path / "rows.jsonl").read_text().count('"finish_reason": "length"') == 2
    assert cli.main(base + ["--prompt", "Hello", "--num_samples", "2", "--batch_size", "1"]) == 0  # 2 best of each
    out, err = capsys.readouterr()
    hello = beam_search(params, config, [encode(tok, "Hello")], 12, 3, stop_token=tok.eot_token, no_repeat_ngram_size=2,
                        num_return_sequences=2)[0]  # fmt: skip
    two = beam_search(params, config, [encode(tok, text)], 12, 3, stop_token=tok.eot_token, no_repeat_ngram_size=2,
                      num_return_sequences=2)[0]  # fmt: skip
    assert out == "".join(f"--- [prompt {i}/2, beam {j + 1}/2] ---\n{p}{decode(tok, b.tokens)}\n"
                          for i, (p, beams) in enumerate([(text, two), ("Hello", hello)], 1) for j, b in enumerate(beams))
    assert err.count("beam search of 3 beams") == 2  # --batch_size 1: a prompt (its 3 rows) at a time
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{text}\n\nHello\n"))
    assert cli.main([*base, "--interactive", "--compile"][2:]) == 0  # a line a prompt, one compiled step for both
    out, err = capsys.readouterr()
    assert out == f"{text}{decode(tok, best.tokens)}\nHello{decode(tok, hello[0].tokens)}\n"
    assert err.count("beam search of 3 beams, compiled") == 2
    for flags, message in [
        (["--temperature", "0.7"], "--num_beams runs beam search, which does not take --temperature; drop one of them"),
        (["--top_k", "5"], "--num_beams runs beam search, which does not take --top_k; drop one of them"),
        (["--typical_p", "0.9"], "--num_beams runs beam search, which does not take --typical_p; drop one of them"),
        (["--draft", "int8"], "--num_beams runs beam search, which does not take --draft; drop one of them"),
        (["--num_beams", "0"], "--num_beams must be an integer >= 1, got 0"),
        (["--num_samples", "4"], "--num_samples 4 prints that many of each prompt's best beams; there are --num_beams 3"),
        (["--num_beams", "1", "--early_stopping", "true"],
         "--early_stopping sets beam search; give --num_beams K (K > 1) too, or drop it"),
    ]:  # fmt: skip
        assert cli.main(base + flags) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
