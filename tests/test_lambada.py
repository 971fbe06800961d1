"""LAMBADA scoring against lm-evaluation-harness's lambada_openai scoring
spelled out with transformers (one passage at a time, no padding), the
script's output, the Hub's copy, and refused files."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from gpt2fn import GPT2FnError, load_pretrained
from gpt2fn.lambada import evaluate_lambada, load_passages
from gpt2fn.tokenizer import get_tokenizer

from conftest import load_script

CONTEXTS = ["The old sailor looked at the sea and said that the", "She put the key in the", "After the storm the village",
            "He could not remember where he had left his", "They walked for hours through the dark", "In the morning the",
            "Nobody in the room wanted to answer the", "The children ran to the", "Every night the dog barked at the",
            "The letter was signed by the"]  # fmt: skip


@pytest.fixture(scope="module")
def passages(small_ref):
    """Each context with the model's own greedy next word (where it is one
    plain word), and with a word it does not choose: the scoring is right on
    both."""
    tokenizer, out = get_tokenizer(), []
    for context in CONTEXTS:
        ids = torch.tensor([tokenizer.encode_ordinary(context)])
        with torch.no_grad():
            ranked = small_ref.model(ids).logits[0, -1].argsort(descending=True).tolist()
        words = [tokenizer.decode([t]) for t in ranked[:2000]]
        chosen = next((w for w in words if re.fullmatch(r" [A-Za-z]{2,}", w)), None)
        if chosen == words[0]:
            out.append(context + chosen)
        out.append(context + " elephant")
    assert 2 <= len(out) - len(CONTEXTS) < len(CONTEXTS)  # some greedy words, not all
    return out + [" ".join(CONTEXTS) * 3 + " sea"]  # longer than the model's 128 positions: cut on the left


def reference(model, tokenizer, texts):
    """lm-evaluation-harness's lambada_openai: context = the text before the
    last space, continuation = " " + the last word, its tokens those of the
    whole after the context's, the input cut to the model's last max_length
    tokens; is_greedy and the summed log-likelihood."""
    greedy, total = [], 0.0
    for text in texts:
        context, word = text.rsplit(" ", 1)
        context_enc = tokenizer.encode_ordinary(context)
        continuation = tokenizer.encode_ordinary(context + " " + word)[len(context_enc):]
        inp = torch.tensor([(context_enc + continuation)[-(model.config.n_positions + 1):][:-1]])
        with torch.no_grad():
            logprobs = model(inp).logits[0, -len(continuation):].log_softmax(-1)
        target = torch.tensor(continuation)
        greedy.append(bool((logprobs.argmax(-1) == target).all()))
        total += logprobs[torch.arange(len(continuation)), target].sum().item()
    return sum(greedy) / len(texts), math.exp(-total / len(texts))


def test_acc_and_ppl_equal_the_harness_scoring(small_ref, passages):
    params, config = load_pretrained(small_ref.directory)
    result = evaluate_lambada(params, config, get_tokenizer(), passages)
    acc, ppl = reference(small_ref.model, get_tokenizer(), passages)
    assert result.n == len(passages) and result.acc == acc and 0 < acc < 1
    assert abs(result.ppl - ppl) <= 1e-4 * ppl


def test_the_script_prints_acc_and_ppl_and_reads_the_hub_copy(small_ref, passages, tmp_path, offline_hub, capsys):
    import pyarrow
    import pyarrow.parquet

    jsonl = tmp_path / "lambada_test.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    params, config = load_pretrained(small_ref.directory)
    expected = evaluate_lambada(params, config, get_tokenizer(), passages[:5])
    code = load_script("eval_lambada").main(["--model", str(small_ref.directory), "--data", str(jsonl), "--limit", "5",
                                             "--device", "cpu", "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert code == 0 and f"on 5 LAMBADA passages: acc {expected.acc:.4f}  ppl {expected.ppl:.4f}" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "model": str(small_ref.directory), "revision": None, "dtype": "float32", "passages": 5, "acc": expected.acc,
        "ppl": expected.ppl}  # fmt: skip
    # without --data: EleutherAI/lambada_openai's parquet conversion, in a cache laid out as huggingface_hub lays it out
    commit, repo = "0123456789abcdef0123456789abcdef01234567", offline_hub / "datasets--EleutherAI--lambada_openai"
    (repo / "snapshots" / commit / "default" / "test").mkdir(parents=True)
    pyarrow.parquet.write_table(pyarrow.table({"text": passages}), repo / "snapshots" / commit / "default" / "test" / "0000.parquet")
    (repo / "refs" / "refs" / "convert").mkdir(parents=True)
    (repo / "refs" / "refs" / "convert" / "parquet").write_text(commit)
    everything = evaluate_lambada(params, config, get_tokenizer(), passages)
    assert load_script("eval_lambada").main(["--model", str(small_ref.directory), "--device", "cpu"]) == 0
    assert f"on {len(passages)} LAMBADA passages: acc {everything.acc:.4f}" in capsys.readouterr().out


BAD_FILES = {
    "line 2 is not JSON": ['{"text": "one two"}', "{not json"],
    "line 1 is not a LAMBADA passage": ['{"ctx": "a b"}'],
    'line 1 is not a LAMBADA passage: a LAMBADA line is {"text": "..."}, a text of at least two': ['{"text": "word"}'],
    "holds no LAMBADA passages": [],
}


def test_a_file_with_a_wrong_schema_is_refused_with_its_line(tmp_path):
    for message, lines in BAD_FILES.items():
        (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(GPT2FnError, match=re.escape(message)) as e:
            load_passages(tmp_path / "l.jsonl")
        assert "\n" not in str(e.value), message
