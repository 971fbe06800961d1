"""scripts/generate.py: the flags, the streamed output and timings, and one
clear line (exit 2) for every kind of bad input."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2fn import GPTConfig, decode, encode, generate_all, get_tokenizer, init_params, load_pretrained, save_params
from gpt2fn.beam import beam_search
from gpt2fn.steps import REGIONS
from gpt2fn.weights import load_params

from conftest import ROOT


def run_cli(cli, capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_output_is_the_library_greedy_continuation(generate_cli, capsys, small_ref):
    text = "The meaning of life is"
    code, out, err = run_cli(generate_cli, capsys, "--prompt", text, "--model", str(small_ref.directory),
                             "--max_tokens", "20", "--temperature", "0", "--ignore_eot", "--device", "cpu")
    assert code == 0
    params, config = load_pretrained(small_ref.directory)
    t = get_tokenizer()
    ids, _ = generate_all(params, config, torch.tensor([encode(t, text)]), 20, temperature=0)
    assert out == text + decode(t, ids[0].tolist()) + "\n"
    assert "prefill:" in err and "decode:" in err and "tokens/s" in err and "generated 20" in err


@pytest.mark.parametrize("flag, value, message", [
    ("min_p", 0.5, "min_p must be in [0, 1] (0 = off), got 1.5"),
    ("typical_p", 0.5, "typical_p must be in (0, 1] (1 = off), got 1.5"),
])  # fmt: skip
def test_min_p_and_typical_p_sample_as_the_library_does(generate_cli, capsys, small_ref, flag, value, message):
    base = ["--prompt", "Once upon a time", "--model", str(small_ref.directory), "--max_tokens", "12", "--ignore_eot",
            "--device", "cpu", "--seed", "2"]  # fmt: skip
    code, out, err = run_cli(generate_cli, capsys, *base, f"--{flag}", str(value), "--temperature", "0.8")
    assert code == 0, err
    params, config = load_pretrained(small_ref.directory)
    t = get_tokenizer()
    new, _ = generate_all(params, config, torch.tensor([encode(t, "Once upon a time")]), 12, temperature=0.8,
                          generator=torch.Generator().manual_seed(2), **{flag: value})  # fmt: skip
    assert out == "Once upon a time" + decode(t, new[0].tolist()) + "\n"
    assert out != run_cli(generate_cli, capsys, *base, "--temperature", "0.8")[1]
    code, out, err = run_cli(generate_cli, capsys, *base, f"--{flag}", "1.5")
    assert code == 2 and err == f"error: {message}\n"


def test_repetition_penalty_and_no_repeat_ngram_size_generate_as_the_library_does(generate_cli, capsys, small_ref):
    text = "the the the the the"
    base = ["--prompt", text, "--model", str(small_ref.directory), "--max_tokens", "16", "--ignore_eot", "--device", "cpu",
            "--temperature", "0"]  # fmt: skip
    code, out, err = run_cli(generate_cli, capsys, *base, "--repetition_penalty", "1.5")
    assert code == 0, err
    params, config = load_pretrained(small_ref.directory)
    t = get_tokenizer()
    new, _ = generate_all(params, config, torch.tensor([encode(t, text)]), 16, temperature=0, repetition_penalty=1.5)
    assert out == text + decode(t, new[0].tolist()) + "\n"
    assert out != run_cli(generate_cli, capsys, *base)[1]
    code, out, err = run_cli(generate_cli, capsys, *base, "--repetition_penalty", "0")
    assert code == 2 and err == ("error: repetition_penalty must be a finite number > 0 (1 = off; above 1 discourages "
                                 "repeats), got 0.0\n")  # fmt: skip
    code, out, err = run_cli(generate_cli, capsys, *base, "--no_repeat_ngram_size", "2")
    assert code == 0, err
    new, _ = generate_all(params, config, torch.tensor([encode(t, text)]), 16, temperature=0, no_repeat_ngram_size=2)
    assert out == text + decode(t, new[0].tolist()) + "\n"
    code, out, err = run_cli(generate_cli, capsys, *base, "--no_repeat_ngram_size", "-2")
    assert code == 2 and err == "error: no_repeat_ngram_size must be an integer >= 0 (0 = off), got -2\n"
    for rule in (["--repetition_penalty", "1.5"], ["--no_repeat_ngram_size", "2"]):  # speculative rounds apply them too
        assert run_cli(generate_cli, capsys, *base, *rule, "--draft", "int8")[1] == run_cli(generate_cli, capsys, *base, *rule)[1]


def eot_model(small_ref, directory) -> Path:
    """The small model made to say <|endoftext|> whatever came before: its
    final LayerNorm outputs its bias, 3.0 everywhere, so every logit is 3 x
    its embedding row's sum, and <|endoftext|>'s row is all 3.0 (9 x width;
    the others' sums are near 0). Saved as a .safetensors file in ``directory``."""
    params, config = load_pretrained(small_ref.directory)
    eot = {**params, "ln_f": {"g": torch.zeros_like(params["ln_f"]["g"]), "b": torch.full_like(params["ln_f"]["b"], 3.0)}}
    eot["wte"] = params["wte"].clone()
    eot["wte"][50256] = 3.0
    return save_params(eot, config, Path(directory) / "eot.safetensors")


def test_min_tokens_holds_endoftext_back_that_many_tokens(generate_cli, capsys, small_ref, tmp_path):
    """--min_tokens N on a model that says <|endoftext|> at once: N times the
    token it likes next (the largest embedding row sum but <|endoftext|>'s),
    then <|endoftext|>, greedy, sampled, in beam search and speculative; and
    one clear line for a bad count and for --ignore_eot."""
    import json

    model = eot_model(small_ref, tmp_path)
    sums = load_params(model)[0]["wte"].sum(1)
    next_best = int(sums[:50256].argmax())
    t = get_tokenizer()
    base = ["--prompt", "Hi", "--model", str(model), "--max_tokens", "12", "--device", "cpu", "--min_tokens", "5"]
    for extra in (["--temperature", "0"], ["--seed", "3", "--top_k", "1"], ["--num_beams", "2"], ["--draft", "int8", "--top_k", "1"]):
        code, out, err = run_cli(generate_cli, capsys, *base, *extra, "--jsonl", str(tmp_path / "rows.jsonl"))
        assert code == 0, err
        assert json.loads((tmp_path / "rows.jsonl").read_text()) == {
            "prompt": "Hi", "completion": decode(t, [next_best] * 5) + "<|endoftext|>", "finish_reason": "eot",
            "tokens": 6}, extra  # fmt: skip
    for extra, message in [
        (["--min_tokens", "-1"], "--min_tokens must be an integer >= 0, got -1"),
        (["--ignore_eot"], "--min_tokens keeps <|endoftext|> from ending a row that soon, and with --ignore_eot it ends "
                           "none; drop one of them"),
    ]:  # fmt: skip
        code, out, err = run_cli(generate_cli, capsys, *base, *extra)
        assert code == 2 and err == f"error: {message}\n" and out == "", extra


def test_ban_never_writes_a_text_and_generates_as_the_library_does(generate_cli, capsys, small_ref):
    """--ban TEXT: the library's generation with bad_words_ids of the text's
    tokens alone and after a space, greedy and in beam search; a word the
    plain greedy text has is then not in it; an empty --ban is one line."""
    params, config = load_pretrained(small_ref.directory)
    t = get_tokenizer()
    text = "The meaning of life is"
    plain = generate_all(params, config, torch.tensor([encode(t, text)]), 12, temperature=0)[0][0].tolist()
    word = decode(t, plain[2:3]).strip()
    assert word and word in decode(t, plain)
    base = ["--prompt", text, "--model", str(small_ref.directory), "--max_tokens", "12", "--ignore_eot", "--device", "cpu",
            "--temperature", "0", "--ban", word]  # fmt: skip
    words = [encode(t, word), encode(t, " " + word)]
    code, out, err = run_cli(generate_cli, capsys, *base)
    assert code == 0, err
    new = generate_all(params, config, torch.tensor([encode(t, text)]), 12, temperature=0, bad_words_ids=words)[0][0]
    assert out == text + decode(t, new.tolist()) + "\n" and word not in out[len(text) :]
    code, out, err = run_cli(generate_cli, capsys, *base[:-4], "--num_beams", "2", "--ban", word)
    best = beam_search(params, config, [encode(t, text)], 12, 2, bad_words_ids=words)[0][0].tokens
    assert code == 0 and out == text + decode(t, best) + "\n", err
    code, out, err = run_cli(generate_cli, capsys, *base, "--ban", "")
    assert code == 2 and err == "error: --ban is empty; give the text never to write (at least one character)\n"


def test_jsonl_holds_each_rows_completion_and_why_it_ended(generate_cli, capsys, small_ref, tmp_path):
    """--jsonl FILE: a JSON line a row (prompt, completion, finish_reason,
    tokens): a --stop string ("stop", cut before it), --max_tokens
    ("length"), <|endoftext|> ("eot", kept), on a model made to say it."""
    import json

    params, config = load_pretrained(small_ref.directory)
    t = get_tokenizer()
    prompts = ["The meaning of life is", "Once upon a time"]
    greedy = [decode(t, generate_all(params, config, torch.tensor([encode(t, p)]), 12, temperature=0)[0][0].tolist())
              for p in prompts]  # fmt: skip
    stop = greedy[0][8:11]
    assert stop not in greedy[1]
    base = ["--model", str(small_ref.directory), "--max_tokens", "12", "--temperature", "0", "--device", "cpu"]
    code, out, err = run_cli(generate_cli, capsys, "--prompt", prompts[0], "--prompt", prompts[1], "--stop", stop,
                             "--jsonl", str(tmp_path / "rows.jsonl"), "--ignore_eot", *base)  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    made = next(k for k in range(1, 13) if stop in decode(t, t.encode_ordinary(greedy[0])[:k]))
    assert rows == [
        {"prompt": prompts[0], "completion": greedy[0][: greedy[0].index(stop)], "finish_reason": "stop", "tokens": made},
        {"prompt": prompts[1], "completion": greedy[1], "finish_reason": "length", "tokens": 12},
    ]  # fmt: skip
    code, out, err = run_cli(generate_cli, capsys, "--prompt", "Hi", "--jsonl", str(tmp_path / "eot.jsonl"),
                             *base[2:], "--model", str(eot_model(small_ref, tmp_path)))  # fmt: skip
    assert code == 0 and json.loads((tmp_path / "eot.jsonl").read_text()) == {
        "prompt": "Hi", "completion": "<|endoftext|>", "finish_reason": "eot", "tokens": 1}
    code, out, err = run_cli(generate_cli, capsys, "--interactive", "--jsonl", str(tmp_path / "x.jsonl"), *base)
    assert code == 2 and err == "error: --jsonl writes the rows of one run of prompts; drop it with --interactive\n"
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli(generate_cli, capsys, "--prompt", "Hi", "--jsonl", str(tmp_path / "file" / "x.jsonl"), *base)
    assert code == 2 and "cannot create --jsonl file" in err and out == ""


def test_logprobs_give_each_jsonl_row_its_tokens_and_their_log_probabilities(generate_cli, capsys, small_ref, tmp_path):
    """--logprobs with --jsonl: each row's token_ids (the library's rows:
    greedy, seeded with top-k, beam search) and logprobs, each the log-softmax
    of transformers' logits given the prompt and the tokens before it (within
    1e-5); a beam's sum to its score x its length. Without --jsonl, one line."""
    import json

    params, config = load_pretrained(small_ref.directory)
    t = get_tokenizer()
    prompts = ["The meaning of life is", "Once"]
    base = ["--prompt", prompts[0], "--prompt", prompts[1], "--model", str(small_ref.directory), "--max_tokens", "8",
            "--ignore_eot", "--device", "cpu", "--jsonl", str(tmp_path / "rows.jsonl"), "--logprobs"]  # fmt: skip
    ids = [encode(t, p) for p in prompts]
    runs = {
        "greedy": (["--temperature", "0"], generate_all(params, config, ids, 8, temperature=0)[0].tolist()),
        "sampled": (["--seed", "5", "--top_k", "5"],
                    generate_all(params, config, ids, 8, top_k=5, generator=torch.Generator().manual_seed(5))[0].tolist()),
        "beams": (["--num_beams", "2"], [b[0].tokens for b in beam_search(params, config, ids, 8, 2)]),
    }  # fmt: skip
    for name, (extra, expected) in runs.items():
        code, out, err = run_cli(generate_cli, capsys, *base, *extra)
        assert code == 0, err
        rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
        assert [row["token_ids"] for row in rows] == expected, name
        for p, row in zip(ids, rows):
            with torch.no_grad():
                logits = small_ref.model(torch.tensor([p + row["token_ids"]])).logits[0, len(p) - 1 : -1]
            reference = logits.log_softmax(-1).gather(1, torch.tensor(row["token_ids"])[:, None])[:, 0]
            assert len(row["logprobs"]) == row["tokens"] == 8
            assert torch.allclose(torch.tensor(row["logprobs"]), reference, atol=1e-5, rtol=0), name
    best = beam_search(params, config, ids, 8, 2)
    assert [sum(row["logprobs"]) for row in rows] == pytest.approx([b[0].score * 8 for b in best], abs=1e-4)
    code, out, err = run_cli(generate_cli, capsys, *base[:-3], "--logprobs")
    assert code == 2 and err == "error: --logprobs adds each token's log-probability to the --jsonl rows; give --jsonl FILE too\n"


def test_num_samples_continues_each_prompt_that_many_times(generate_cli, capsys, small_ref):
    """--num_samples N: each prompt N times in one batch (its rows together),
    each row drawing its own tokens: the library's batch with that seed."""
    base = ["--model", str(small_ref.directory), "--max_tokens", "6", "--ignore_eot", "--device", "cpu", "--seed", "7",
            "--top_k", "50"]  # fmt: skip
    prompts = ["The meaning of life is", "Once"]
    code, out, err = run_cli(generate_cli, capsys, "--prompt", prompts[0], "--prompt", prompts[1], "--num_samples", "3", *base)
    assert code == 0, err
    params, config = load_pretrained(small_ref.directory)
    t = get_tokenizer()
    rows = [encode(t, p) for p in prompts for _ in range(3)]
    new, _ = generate_all(params, config, rows, 6, top_k=50, generator=torch.Generator().manual_seed(7))
    texts = [p + decode(t, row.tolist()) for p, row in zip([p for p in prompts for _ in range(3)], new)]
    assert out == "".join(f"--- [prompt {i // 3 + 1}/2, sample {i % 3 + 1}/3] ---\n{text}\n" for i, text in enumerate(texts))
    assert len(set(texts[:3])) == 3 and "batch of 6" in err
    code, out, err = run_cli(generate_cli, capsys, "--prompt", prompts[0], "--num_samples", "2", *base)
    assert code == 0 and out.count("--- [prompt 1/1, sample ") == 2
    for args, message in [(["--num_samples", "0"], "--num_samples must be an integer >= 1, got 0"),
                          (["--num_samples", "2", "--temperature", "0"], "--num_samples draws several continuations, "
                           "but --temperature 0 (greedy) makes them all the same")]:  # fmt: skip
        code, out, err = run_cli(generate_cli, capsys, "--prompt", "Hi", *base, *args)
        assert code == 2 and out == "" and err.startswith(f"error: {message}"), err


def test_batch_size_runs_the_rows_in_batches_from_one_generator(generate_cli, capsys, small_ref, monkeypatch):
    """--batch_size B: B rows at a time, one after another, each batch printed
    and reported when done, all drawing from one seeded generator (so a later
    batch does not repeat an earlier one's draws); running out of memory is
    one line that says what to lower."""
    base = ["--model", str(small_ref.directory), "--max_tokens", "5", "--ignore_eot", "--device", "cpu", "--seed", "3"]
    prompts = ["The meaning of life is", "Once upon a time", "Hello"]
    code, out, err = run_cli(generate_cli, capsys, *[a for p in prompts for a in ("--prompt", p)], "--batch_size", "2", *base)
    assert code == 0, err
    params, config = load_pretrained(small_ref.directory)
    t = get_tokenizer()
    generator = torch.Generator().manual_seed(3)
    texts = []
    for batch in (prompts[:2], prompts[2:]):
        new, _ = generate_all(params, config, [encode(t, p) for p in batch], 5, generator=generator)
        texts += [p + decode(t, row.tolist()) for p, row in zip(batch, new)]
    assert out == "".join(f"--- [{i + 1}/3] ---\n{text}\n" for i, text in enumerate(texts))
    assert err.count("prefill:") == 2 and "batch of 2" in err
    code, out, err = run_cli(generate_cli, capsys, "--prompt", "Hi", "--num_samples", "4", "--batch_size", "2", *base)
    samples = out.split("---\n")[1:]
    assert code == 0 and len(samples) == 4 and samples[2] != samples[0] and samples[3] != samples[1]
    code, out, err = run_cli(generate_cli, capsys, "--prompt", "Hi", "--batch_size", "0", *base)
    assert code == 2 and err == "error: --batch_size must be an integer >= 1, got 0\n"

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 99999999999 bytes")  # fmt: skip

    monkeypatch.setattr(generate_cli, "generate", out_of_memory)
    code, out, err = run_cli(generate_cli, capsys, *[a for p in prompts for a in ("--prompt", p)], *base)
    assert code == 2 and out == "" and err == ("error: out of memory generating 3 rows at once; use a smaller "
                                               "--batch_size, a smaller --max_tokens or --dtype bfloat16\n")  # fmt: skip


def test_a_training_checkpoint_generates_as_its_weights_do(generate_cli, capsys, tmp_path):
    """--model runs/ckpt.pt: the run's weights at its last step (nanoGPT's sample.py habit)."""
    from gpt2fn.training import TrainConfig, train

    config = GPTConfig(vocab_size=50257, n_ctx=32, n_embd=16, n_layer=1, n_head=2)
    tokens = torch.randint(0, 50257, (400,), generator=torch.Generator().manual_seed(0))
    params, _ = train(init_params(config), config, TrainConfig(batch_size=2, block_size=16, max_steps=2, warmup_steps=1),
                      tokens, checkpoint_path=tmp_path / "ckpt.pt")  # fmt: skip
    code, out, err = run_cli(generate_cli, capsys, "--prompt", "To be", "--model", str(tmp_path / "ckpt.pt"),
                             "--max_tokens", "8", "--temperature", "0", "--ignore_eot", "--device", "cpu")
    assert code == 0, err
    t = get_tokenizer()
    with torch.no_grad():
        ids, _ = generate_all(params, config, torch.tensor([encode(t, "To be")]), 8, temperature=0)
    assert out == "To be" + decode(t, ids[0].tolist()) + "\n"


def test_stop_strings_end_the_text_and_the_generation(generate_cli, capsys, small_ref):
    """--stop: one prompt streams up to the first stop string (left out) and
    generation ends there; in a batch each row is cut at its own, and the
    batch ends when every row has stopped."""
    t = get_tokenizer()
    params, config = load_pretrained(small_ref.directory)
    base = ["--model", str(small_ref.directory), "--max_tokens", "40", "--temperature", "0", "--ignore_eot", "--device", "cpu"]
    prompts = ["The meaning of life is", "Once upon a time"]
    ids = [generate_all(params, config, torch.tensor([encode(t, p)]), 40, temperature=0)[0][0].tolist() for p in prompts]
    texts = [decode(t, row) for row in ids]
    stop = texts[0][10:13]  # text the first continuation holds, maybe across tokens
    code, out, err = run_cli(generate_cli, capsys, "--prompt", prompts[0], *base, "--stop", stop, "--stop", "\x00")
    assert code == 0 and out == prompts[0] + texts[0][: texts[0].index(stop)] + "\n"
    made = next(k for k in range(1, 41) if stop in decode(t, ids[0][:k]))  # the token that completes the stop string
    assert f"generated {made} in {made} steps" in err and made < 40
    stops = [texts[0][10:13], texts[1][5:8]]
    code, out, err = run_cli(generate_cli, capsys, *[a for p in prompts for a in ("--prompt", p)], *base,
                             *[a for s in stops for a in ("--stop", s)])  # fmt: skip
    rows = [p + x[: min(x.find(s) for s in stops if s in x)] for p, x in zip(prompts, texts)]
    assert code == 0 and out == "".join(f"--- [{i + 1}/2] ---\n{row}\n" for i, row in enumerate(rows))
    assert "generated 80 in 40 steps" not in err  # every row stopped before max_tokens: the batch ended early


def test_interactive_continues_each_line_and_goes_on_past_a_bad_one(generate_cli, capsys, small_ref, monkeypatch):
    """--interactive: each non-blank line of standard input is a prompt, continued as the same flags would
    continue it alone; one too long for the context is one error line, and the next line still runs."""
    base = ["--model", str(small_ref.directory), "--max_tokens", "12", "--temperature", "0", "--ignore_eot", "--device", "cpu"]
    alone = []
    for prompt in ("The meaning of life is", "Once upon a time"):
        alone.append(run_cli(generate_cli, capsys, "--prompt", prompt, *base)[1])
    monkeypatch.setattr(sys, "stdin", io.StringIO("The meaning of life is\n\n" + "word " * 200 + "\nOnce upon a time\n"))
    code, out, err = run_cli(generate_cli, capsys, "--interactive", *base)
    assert code == 0 and out == "".join(alone)
    assert err.count("error: ") == 1 and "error: the prompt is 201 tokens but the context holds 128; shorten the prompt\n" in err
    assert err.count("generated 12 in 12 steps") == 2
    generate, calls = generate_cli.generate, []

    def interrupted_once(*args, **kwargs):  # Ctrl-C during the first generation: the next line still runs
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(generate_cli, "generate", interrupted_once)
    monkeypatch.setattr(sys, "stdin", io.StringIO("The meaning of life is\nOnce upon a time\n"))
    code, out, err = run_cli(generate_cli, capsys, "--interactive", *base)
    assert code == 0 and out == alone[1] and err.count("generated 12") == 1
    code, out, err = run_cli(generate_cli, capsys, "--interactive", "--prompt", "Hi", *base)
    assert code == 2 and err == "error: --interactive reads its prompts from standard input, one a line; drop --prompt and --prompt-file\n"
    monkeypatch.setattr(generate_cli, "generate", generate)  # --compile: the first prompt compiles, the next reuse it
    monkeypatch.setattr(sys, "stdin", io.StringIO("The meaning of life is\nOnce upon a time\nHello\n"))
    code, out, err = run_cli(generate_cli, capsys, "--interactive", "--compile", *base)
    assert code == 0 and out.startswith("".join(alone))
    assert err.count("compile: ") == 1 and err.count("(compiled for an earlier prompt)") == 2, err
    assert err.index("compile: ") < err.index("(compiled for an earlier prompt)")


def test_cache_flags_and_attention_backends_agree(generate_cli, capsys, small_ref):
    base = ["--prompt", "Once upon a time", "--model", str(small_ref.directory), "--max_tokens", "15",
            "--temperature", "0", "--ignore_eot"]
    outputs = set()
    for extra in (["--kvcaching"], ["--no-kvcaching"], ["--attention", "manual"], ["--attention", "manual", "--no-kvcaching"]):
        code, out, err = run_cli(generate_cli, capsys, *base, *extra)
        assert code == 0, err
        assert ("no cache" in err) == ("--no-kvcaching" in extra)
        outputs.add(out)
    assert len(outputs) == 1


def test_seeded_sampling_is_reproducible(generate_cli, capsys, small_ref):
    args = ["--prompt", "Hello", "--model", str(small_ref.directory), "--max_tokens", "25", "--top_k", "40",
            "--top_p", "0.9", "--temperature", "0.8", "--ignore_eot"]
    a = run_cli(generate_cli, capsys, *args, "--seed", "3")[1]
    b = run_cli(generate_cli, capsys, *args, "--seed", "3")[1]
    c = run_cli(generate_cli, capsys, *args, "--seed", "4")[1]
    assert a == b and a != c


def test_the_printed_seed_repeats_a_sampled_run_and_greedy_prints_none(generate_cli, capsys, small_ref):
    import re

    args = ["--prompt", "Hello", "--model", str(small_ref.directory), "--max_tokens", "25", "--ignore_eot"]
    _, out, err = run_cli(generate_cli, capsys, *args)
    seed = re.search(r", seed (\d+)\] prompt", err).group(1)
    assert run_cli(generate_cli, capsys, *args, "--seed", seed)[1] == out
    _, _, err = run_cli(generate_cli, capsys, *args, "--temperature", "0", "--seed", seed)
    assert ", greedy] prompt 1 tokens, generated 25" in err and "seed" not in err


@pytest.fixture
def truncated_checkpoint(small_ref, tmp_path):
    d = tmp_path / "truncated"
    shutil.copytree(small_ref.directory, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    return d


BAD_INPUTS = {
    "empty prompt": (["--prompt", ""], "the prompt is empty"),
    "prompt too long": (["--prompt", "word " * 200], "the context holds 128; shorten the prompt"),
    "max_tokens beyond context": (["--max_tokens", "500"], "exceeds the 128-token context; use max_tokens <= "),
    "negative max_tokens": (["--max_tokens", "-3"], "max_tokens must be an integer >= 0, got -"),
    "unknown model": (["--model", "gpt5"], "unknown model 'gpt5'"),
    "missing file": (["--model", "/nonexistent/dir/model.safetensors"], "does not exist"),
    "top_p zero": (["--top_p", "0"], "top_p must be in (0, 1]"),
    "top_p above one": (["--top_p", "1.5"], "top_p must be in (0, 1]"),
    "negative temperature": (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    "negative top_k": (["--top_k", "-2"], "top_k must be an integer >= 0"),
    "bad device": (["--device", "tpu"], "unknown device 'tpu'"),
    "tokens_per_call zero": (["--tokens_per_call", "0"], "--tokens_per_call must be an integer >= 1, got 0"),
    "tokens_per_call without cache": (["--tokens_per_call", "4", "--no-kvcaching"], "drop it, or --no-kvcaching"),
    "tokens_per_call with a draft": (["--tokens_per_call", "4", "--draft", "int8"], "drop it, or --draft (speculative"),
    "empty stop string": (["--stop", "\n", "--stop", ""], "--stop is empty; give the text to stop at"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_line(generate_cli, capsys, small_ref, name):
    extra, message = BAD_INPUTS[name]
    args = ([] if "--prompt" in extra else ["--prompt", "Hi"]) + ["--model", str(small_ref.directory), "--device", "cpu"]
    code, out, err = run_cli(generate_cli, capsys, *args, *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert out == ""


def test_truncated_weights_get_one_clear_line(generate_cli, capsys, truncated_checkpoint):
    code, out, err = run_cli(generate_cli, capsys, "--prompt", "Hi", "--model", str(truncated_checkpoint))
    assert code == 2 and err.count("\n") == 1 and "truncated or corrupt" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so asking for it is not an error")
def test_cuda_where_there_is_none(generate_cli, capsys, small_ref):
    code, out, err = run_cli(generate_cli, capsys, "--prompt", "Hi", "--model", str(small_ref.directory), "--device", "cuda")
    assert code == 2 and err.count("\n") == 1 and "CUDA is not available" in err and "--device cpu" in err


def test_as_a_command(small_ref, tmp_path):
    """The script runs as users run it: a subprocess, with an error path and a success path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    script = str(ROOT / "scripts" / "generate.py")
    bad = subprocess.run([sys.executable, script, "--prompt", "Hi", "--top_p", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and bad.stdout == ""
    offline = subprocess.run([sys.executable, script, "--prompt", "Hi"], capture_output=True, text=True, env=env)
    assert offline.returncode == 2 and "not in the local Hugging Face cache" in offline.stderr
    assert offline.stderr.strip().count("\n") == 0
    ok = subprocess.run([sys.executable, script, "--prompt", "Hi", "--model", str(small_ref.directory),
                         "--max_tokens", "5", "--seed", "0"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Hi") and "tokens/s" in ok.stderr
    # a reader that goes away (| head): a quiet stop with SIGPIPE's status, as Unix tools give, not an error
    gone = subprocess.Popen([sys.executable, script, "--prompt", "Hi", "--model", str(small_ref.directory)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    gone.stdout.close()
    assert gone.wait(timeout=120) == 141 and gone.stderr.read() == b""
    gone.stderr.close()
    # a broken pipe elsewhere is still an error: one line, status 2
    from gpt2fn.errors import run_cli as run_script

    def fails():
        raise BrokenPipeError(32, "Broken pipe")

    assert run_script(fails) == 2


def test_ids_past_the_tokenizer_print_visibly(generate_cli, capsys, tmp_path):
    """A padded vocabulary (nanoGPT's 50304): the model below always chooses
    50300, which the tokenizer lacks (its final LayerNorm adds 1 everywhere
    and that token's embedding is all 10s: a logit of ~10 x 32)."""
    config = GPTConfig(vocab_size=50304, n_ctx=64, n_embd=32, n_layer=1, n_head=2)
    params = init_params(config)
    params["ln_f"]["b"] += 1
    params["wte"][50300] = 10
    model = save_params(params, config, tmp_path / "padded.safetensors")
    code, out, err = run_cli(generate_cli, capsys, "--model", str(model), "--prompt", "Hello world", "--max_tokens", "3",
                             "--temperature", "0")  # fmt: skip
    assert code == 0, err
    assert out == "Hello world<|token 50300|><|token 50300|><|token 50300|>\n"


def test_zero_new_tokens_prints_the_prompt_and_no_rates(generate_cli, capsys, small_ref):
    code, out, err = run_cli(generate_cli, capsys, "--prompt", "Hi", "--model", str(small_ref.directory), "--max_tokens", "0")
    assert code == 0 and out == "Hi\n" and "generated 0" in err and "(- tokens/s)" in err


def test_one_new_token_reports_no_decode_rate_and_no_round(generate_cli, capsys, small_ref):
    """One token is the prompt's step alone: no decode rate, no compile line, no speculative round (not nan)."""
    base = ["--prompt", "Hi", "--model", str(small_ref.directory), "--max_tokens", "1", "--temperature", "0"]
    for extra in ([], ["--compile"], ["--draft", "int8"], ["--draft", "int8", "--adaptive_draft"]):
        code, out, err = run_cli(generate_cli, capsys, *base, *extra)
        assert code == 0 and "generated 1" in err and "for 0 " in err and "(- tokens/s)" in err, err
        assert "nan" not in err and "compile:" not in err, err
        assert ("speculative: draft int8, " in err) == ("--draft" in extra) and ("no round ran" in err) == ("--draft" in extra)


def test_several_prompts_run_as_one_batch(generate_cli, capsys, small_ref, tmp_path):
    from gpt2fn.generation import generate

    (tmp_path / "prompts.txt").write_text("Second prompt\n\n   \nThird, longer prompt here\n")
    code, out, err = run_cli(generate_cli, capsys, "--prompt", "First", "--prompt-file", str(tmp_path / "prompts.txt"),
                             "--model", str(small_ref.directory), "--max_tokens", "12", "--temperature", "0", "--ignore_eot")
    assert code == 0, err
    texts = ["First", "Second prompt", "Third, longer prompt here"]
    params, config = load_pretrained(small_ref.directory)
    t = get_tokenizer()
    rows = generate(params, config, [encode(t, x) for x in texts], 12, temperature=0).rows()
    expected = "".join(f"--- [{i + 1}/3] ---\n{x}{decode(t, toks)}\n" for i, (x, toks) in enumerate(zip(texts, rows)))
    assert out == expected
    assert "batch of 3" in err and "tokens/s over the batch" in err


def test_several_prompts_compile_and_recompute_like_the_eager_batch(generate_cli, capsys, small_ref):
    base = ["--prompt", "a", "--prompt", "The longest of the three prompts", "--prompt", "Hello there",
            "--model", str(small_ref.directory), "--max_tokens", "10", "--temperature", "0", "--ignore_eot"]
    outputs = []
    for flags in ([], ["--compile"], ["--no-kvcaching"]):
        code, out, err = run_cli(generate_cli, capsys, *base, *flags)
        assert code == 0 and "batch of 3" in err, err
        outputs.append(out)
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0].count("--- [") == 3


def test_tokens_per_call_prints_the_same_text_one_prompt_and_a_batch(generate_cli, capsys, small_ref):
    """Chains of 4 steps (eager, and compiled: one graph) print what one step
    a call prints, streamed for one prompt and at the end for a batch."""
    model = ["--model", str(small_ref.directory), "--max_tokens", "18", "--temperature", "0", "--ignore_eot"]
    for prompts in (["--prompt", "Hello there"], ["--prompt", "a", "--prompt", "The longest of the prompts"]):
        outputs = set()
        for flags in ([], ["--tokens_per_call", "4"], ["--tokens_per_call", "4", "--compile"]):
            code, out, err = run_cli(generate_cli, capsys, *prompts, *model, *flags)
            chained = bool(flags) and (REGIONS or "--compile" not in flags)  # compiled chains on the CPU need 2.12
            assert code == 0 and ("4 tokens a call" in err) == chained, err
            outputs.add(out)
        assert len(outputs) == 1


def test_missing_prompt_and_unreadable_prompt_file(generate_cli, capsys, small_ref, tmp_path):
    code, out, err = run_cli(generate_cli, capsys, "--model", str(small_ref.directory))
    assert code == 2 and "no prompt given" in err
    code, out, err = run_cli(generate_cli, capsys, "--prompt-file", str(tmp_path / "none.txt"))
    assert code == 2 and "cannot read prompt file" in err and err.count("\n") == 1


def test_a_jsonl_prompt_file_holds_prompts_with_newlines_and_reads_back_jsonl_rows(generate_cli, capsys, small_ref,
                                                                                  tmp_path):  # fmt: skip
    """--prompt-file FILE.jsonl: each line's "prompt" (newlines, quotes and
    other fields allowed), the batch those texts give as --prompt; the rows
    --jsonl writes read back as the same prompts; a bad line is one line
    naming it."""
    import json

    texts = ['ROMEO:\nBut soft, "what" light', "Hi"]
    (tmp_path / "prompts.jsonl").write_text(f'{json.dumps({"prompt": texts[0], "id": 7})}\n\n{json.dumps({"prompt": texts[1]})}\n')
    args = ["--model", str(small_ref.directory), "--max_tokens", "6", "--temperature", "0", "--ignore_eot"]
    code, from_file, err = run_cli(generate_cli, capsys, *args, "--prompt-file", str(tmp_path / "prompts.jsonl"),
                                   "--jsonl", str(tmp_path / "rows.jsonl"))  # fmt: skip
    assert code == 0 and "batch of 2" in err, err
    code, from_flags, err = run_cli(generate_cli, capsys, *args, "--prompt", texts[0], "--prompt", texts[1])
    assert code == 0 and from_file == from_flags and from_file.startswith("--- [1/2] ---\nROMEO:\nBut soft,"), err
    code, again, err = run_cli(generate_cli, capsys, *args, "--prompt-file", str(tmp_path / "rows.jsonl"))
    assert code == 0 and again == from_file, err
    for line, message in [
        ('{"prompt": "a"', "is not JSON (Expecting ',' delimiter)"),
        ('["a"]', 'has no "prompt" text'),
        ('{"text": "a"}', 'has no "prompt" text'),
        ('{"prompt": 3}', 'has no "prompt" text'),
    ]:  # fmt: skip
        (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n' + line + "\n")
        code, out, err = run_cli(generate_cli, capsys, *args, "--prompt-file", str(tmp_path / "bad.jsonl"))
        assert code == 2 and out == "" and err.startswith(f"error: {tmp_path / 'bad.jsonl'}, line 2 {message}"), err
        assert err.endswith('; a .jsonl prompt file holds one object a line, {"prompt": "text"}\n') and err.count("\n") == 1


def test_prompts_from_standard_input(generate_cli, capsys, small_ref, monkeypatch, tmp_path):
    """--prompt-file - reads standard input: the batch a file of the same lines gives; bytes that are not UTF-8 get one line."""
    lines = "Second prompt\n\n   \nThird, longer prompt here\n"
    (tmp_path / "prompts.txt").write_text(lines)
    args = ["--prompt", "First", "--model", str(small_ref.directory), "--max_tokens", "12", "--temperature", "0"]
    code, from_file, err = run_cli(generate_cli, capsys, *args, "--prompt-file", str(tmp_path / "prompts.txt"))
    assert code == 0 and "batch of 3" in err, err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines.encode())))
    code, from_stdin, err = run_cli(generate_cli, capsys, *args, "--prompt-file", "-")
    assert code == 0 and from_stdin == from_file, err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe")))
    code, out, err = run_cli(generate_cli, capsys, *args, "--prompt-file", "-")
    assert code == 2 and out == "" and err == "error: standard input (--prompt-file -) is not UTF-8 text\n"
