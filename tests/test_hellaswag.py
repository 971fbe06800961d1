"""HellaSwag scoring against the same scoring computed with transformers (one
ending at a time, no padding), the script's output, and refused files."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2fn import GPT2FnError, load_pretrained
from gpt2fn.hellaswag import ending_logprobs, evaluate_hellaswag, load_examples
from gpt2fn.tokenizer import get_tokenizer

from conftest import load_script

EXAMPLES = [
    {"ctx": "A man is sitting on a roof. he", "label": 3, "activity_label": "Roof shingle removal",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "The chef cracks two eggs into a bowl and", "label": "1",  # the Hub's copy has string labels
     "endings": ["flies to the moon.", "whisks them with a fork until smooth.", "paints the wall blue.", "sleeps."]},
    {"ctx": "A girl ties her shoes. She", "label": 0,
     "endings": ["runs out of the door to catch the bus.", "eats the shoes.", "becomes a shoe.", "is a car."]},
    {"ctx": "Two dogs chase a ball in the park, and then", "label": 2,
     "endings": ["the ball", "quantum chromodynamics explains why the sky is, in fact, a sandwich.",
                 "one dog catches it and runs back.", "they file taxes."]},
]  # fmt: skip


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


def reference_logprobs(model, tokenizer, example):
    """The same scoring with transformers, each ending alone: (sums, means)."""
    context = tokenizer.encode_ordinary(example["ctx"])
    sums, means = [], []
    for ending in example["endings"]:
        tail = tokenizer.encode_ordinary(" " + ending)
        ids = torch.tensor([context + tail])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].log_softmax(-1)
        picked = logprobs[torch.arange(len(context) - 1, ids.shape[1] - 1), ids[0, len(context):]]
        sums.append(picked.sum().item())
        means.append(picked.mean().item())
    return torch.tensor(sums), torch.tensor(means)


def test_scores_equal_the_reference(small_ref, jsonl):
    params, config = load_pretrained(small_ref.directory)
    tokenizer = get_tokenizer()
    examples = load_examples(jsonl)
    assert [e.label for e in examples] == [3, 1, 0, 2]
    right = right_norm = 0
    for raw, example in zip(EXAMPLES, examples):
        sums, means = ending_logprobs(params, config, tokenizer, example)
        ref_sums, ref_means = reference_logprobs(small_ref.model, tokenizer, raw)
        assert (sums - ref_sums).abs().max() <= 1e-4 and (means - ref_means).abs().max() <= 1e-5
        assert int(sums.argmax()) == int(ref_sums.argmax()) and int(means.argmax()) == int(ref_means.argmax())
        right += int(ref_sums.argmax()) == example.label
        right_norm += int(ref_means.argmax()) == example.label
    result = evaluate_hellaswag(params, config, tokenizer, examples)
    assert (result.acc, result.acc_norm, result.n) == (right / 4, right_norm / 4, 4)


def test_the_script_prints_acc_and_acc_norm(small_ref, jsonl, capsys, tmp_path):
    code = load_script("eval_hellaswag").main(["--model", str(small_ref.directory), "--data", str(jsonl), "--limit", "3",
                                               "--device", "cpu", "--json", str(tmp_path / "r.json")])  # fmt: skip
    out = capsys.readouterr().out
    params, config = load_pretrained(small_ref.directory)
    expected = evaluate_hellaswag(params, config, get_tokenizer(), load_examples(jsonl, limit=3))
    assert code == 0 and f"on 3 HellaSwag examples: acc {expected.acc:.4f}  acc_norm {expected.acc_norm:.4f}" in out
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "model": str(small_ref.directory), "revision": None, "dtype": "float32", "examples": 3, "acc": expected.acc,
        "acc_norm": expected.acc_norm}  # fmt: skip
    code = load_script("eval_hellaswag").main(["--model", str(small_ref.directory), "--data", str(jsonl), "--limit", "3",
                                               "--device", "cpu", "--dtype", "bfloat16"])  # fmt: skip
    bf16 = evaluate_hellaswag(load_pretrained(small_ref.directory, dtype="bfloat16")[0], config, get_tokenizer(),
                              load_examples(jsonl, limit=3))  # fmt: skip
    assert code == 0 and f"(bfloat16) on 3 HellaSwag examples: acc {bf16.acc:.4f}  acc_norm {bf16.acc_norm:.4f}" in \
        capsys.readouterr().out


@pytest.mark.parametrize("lines, message", [
    (['{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}', "{not json"], "line 2 is not JSON"),
    (['{"ctx": "a", "label": 0}'], "line 1 lacks endings: a HellaSwag example has ctx"),
    (['{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}'], "line 1 is not a HellaSwag example"),
    (['{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 7}'], "line 1 is not a HellaSwag example"),
    (['["a", "b"]'], "line 1 lacks everything"),
    ([], "holds no HellaSwag examples"),
])  # fmt: skip
def test_a_file_with_a_wrong_schema_is_refused_with_its_line(tmp_path, lines, message):
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(GPT2FnError, match=message) as e:
        load_examples(path)
    assert "\n" not in str(e.value)


def test_the_script_refuses_bad_input_in_one_line(small_ref, tmp_path, capsys):
    cli = load_script("eval_hellaswag")
    for args, message in ((["--data", str(tmp_path / "none.jsonl")], "does not exist"),
                          (["--data", str(tmp_path), "--limit", "0"], "--limit must be an integer >= 1")):  # fmt: skip
        code = cli.main(["--model", str(small_ref.directory), *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err


def hub_validation_split(offline_hub) -> None:
    """Rowan/hellaswag's parquet conversion of EXAMPLES, laid out in the cache as huggingface_hub lays it out."""
    import pyarrow
    import pyarrow.parquet

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = offline_hub / "datasets--Rowan--hellaswag"
    (repo / "snapshots" / commit / "default" / "validation").mkdir(parents=True)
    table = pyarrow.table({"ind": list(range(4)), "ctx": [e["ctx"] for e in EXAMPLES],
                           "endings": [e["endings"] for e in EXAMPLES], "label": [str(e["label"]) for e in EXAMPLES]})  # fmt: skip
    pyarrow.parquet.write_table(table, repo / "snapshots" / commit / "default" / "validation" / "0000.parquet")
    (repo / "refs" / "refs" / "convert").mkdir(parents=True)
    (repo / "refs" / "refs" / "convert" / "parquet").write_text(commit)


def test_the_validation_split_from_the_hub_cache(small_ref, jsonl, offline_hub, capsys):
    """Without --data: Rowan/hellaswag's parquet conversion (revision
    refs/convert/parquet), read from a cache laid out as huggingface_hub lays it out."""
    hub_validation_split(offline_hub)
    code = load_script("eval_hellaswag").main(["--model", str(small_ref.directory), "--device", "cpu"])
    out = capsys.readouterr().out
    params, config = load_pretrained(small_ref.directory)
    expected = evaluate_hellaswag(params, config, get_tokenizer(), load_examples(jsonl))
    assert code == 0 and f"on 4 HellaSwag examples: acc {expected.acc:.4f}  acc_norm {expected.acc_norm:.4f}" in out


def test_train_scores_the_hubs_validation_split_with_hellaswag_given_alone(small_ref, jsonl, offline_hub, tmp_path, capsys):
    """train.py --hellaswag (no file): the Hub's validation split at every
    evaluation, the scores the library gives the final weights."""
    from gpt2fn.data import prepare

    hub_validation_split(offline_hub)
    (tmp_path / "t.txt").write_text("Now is the winter of our discontent made glorious summer by this sun of York;\n" * 40)
    prepare([tmp_path / "t.txt"], tmp_path / "data")
    args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "ck.pt"), "--from_model", str(small_ref.directory),
            "--block_size", "16", "--batch_size", "2", "--max_steps", "2", "--warmup_steps", "1", "--eval_interval", "2",
            "--eval_batches", "1", "--hellaswag", "--hellaswag_limit", "3", "--device", "cpu"]  # fmt: skip
    assert load_script("train").main(args) == 0
    out = capsys.readouterr().out
    params, config = load_pretrained(tmp_path / "ck.pt")
    expected = evaluate_hellaswag(params, config, get_tokenizer(), load_examples(jsonl, 3))
    assert f"hellaswag acc_norm {expected.acc_norm:.4f}" in out
