"""Training: data preparation, the loss against the reference, the optimizer
set-up, learning, exact resumption, checkpoints, and perplexity."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gpt2fn import GPT2FnError, GPTConfig, init_params, load_pretrained
from gpt2fn.data import load_split, load_tokens, prepare, random_windows
from gpt2fn.evaluation import perplexity, unigram_perplexity
from gpt2fn.params import flatten_params, map_params
from gpt2fn.tokenizer import ENDOFTEXT_ID, get_tokenizer
from gpt2fn.training import (
    TrainConfig, load_checkpoint, loss_fn, lr_at, make_optimizer, save_checkpoint, train, trainable,
)  # fmt: skip
from gpt2fn.weights import hf_state_dict, transformers_model

TINY = GPTConfig(vocab_size=50257, n_ctx=64, n_embd=32, n_layer=2, n_head=2)
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "a.txt").write_text(TEXT)
    (d / "b.txt").write_text("The slings and arrows of outrageous fortune,\n" * 30)
    counts = prepare([d / "a.txt", d / "b.txt"], d / "out", val_fraction=0.1)
    return d, counts


def test_prepare_splits_off_the_tail(data):
    d, counts = data
    t = get_tokenizer()
    expected = t.encode_ordinary(TEXT) + [ENDOFTEXT_ID] + t.encode_ordinary((d / "b.txt").read_text())
    train_tokens, val_tokens = load_split(d / "out", "train"), load_split(d / "out", "val")
    assert train_tokens.dtype == torch.uint16
    assert counts == {"train": len(train_tokens), "val": len(val_tokens), "train_shards": 1, "val_shards": 1}
    assert counts["val"] == int(len(expected) * 0.1)
    assert train_tokens.tolist() + val_tokens.tolist() == expected
    windows = random_windows(train_tokens, 5, 16, torch.Generator().manual_seed(0))
    assert windows.shape == (5, 17) and windows.dtype == torch.int64
    stream = train_tokens.tolist()
    for row in windows.tolist():  # each window is a contiguous piece of the stream
        starts = [i for i in range(len(stream) - 16) if stream[i : i + 17] == row]
        assert starts


def test_bad_data_inputs(tmp_path):
    with pytest.raises(GPT2FnError, match="does not exist"):
        load_tokens(tmp_path / "missing.bin")
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(GPT2FnError, match="too little text"):
        prepare([tmp_path / "tiny.txt"], tmp_path / "out")


def test_loss_matches_reference(small_ref):
    params, config = load_pretrained(small_ref.directory)
    windows = torch.randint(0, 50257, (3, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = small_ref.model(windows, labels=windows).loss  # the reference shifts internally
    assert abs(loss_fn(params, config, windows).item() - expected.item()) <= 1e-5


def test_gradients_match_the_reference(small_ref):
    """Every parameter's gradient of the loss equals the reference's, on the
    CPU through few_rows (oneDNN's products forward and backward on an AMD
    CPU, MKL's elsewhere) as through F.linear."""
    params, config = load_pretrained(small_ref.directory)
    params = trainable(params)
    windows = torch.randint(0, 50257, (3, 33), generator=torch.Generator().manual_seed(2))
    loss_fn(params, config, windows).backward()
    reference = transformers_model(load_pretrained(small_ref.directory)[0], config)
    reference(windows, labels=windows).loss.backward()
    expected = {name: t.grad for name, t in reference.named_parameters()}
    mine = hf_state_dict(map_params(lambda t: t.grad, params))  # the reference's names and [in, out] layout
    assert set(expected) <= set(mine)
    for name, grad in expected.items():
        assert torch.allclose(mine[name], grad, rtol=1e-4, atol=1e-6), name


def test_learning_rate_schedule():
    tc = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, tc) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine never rises
    assert lr_at(110, tc) == pytest.approx(1e-4) and lr_at(60, tc) == pytest.approx(5.5e-4)


def test_weight_decay_only_on_matrices():
    params = trainable(init_params(TINY))
    groups = make_optimizer(params, TrainConfig()).param_groups
    flat = flatten_params(params)
    decayed = {id(t) for t in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert {n for n, t in flat.items() if id(t) in decayed} == {n for n, t in flat.items() if t.ndim == 2}
    assert {"wte", "wpe", "blocks.0.attn.c_attn.w"} <= {n for n, t in flat.items() if id(t) in decayed}


def test_training_learns(data):
    d, _ = data
    tc = TrainConfig(batch_size=8, block_size=32, max_steps=60, lr=3e-3, warmup_steps=5, eval_interval=60, eval_batches=4)
    train_tokens, val_tokens = load_split(d / "out", "train"), load_split(d / "out", "val")
    _, history = train(init_params(TINY), TINY, tc, train_tokens, val_tokens)
    assert history[0]["loss"] > math.log(50257) - 1  # starts near uniform
    assert history[-1]["val_loss"] < 0.5 * history[0]["loss"]  # the repeated text is learnable


def test_resume_is_bit_identical(data, tmp_path):
    d, _ = data
    tokens = load_split(d / "out", "train")
    tc = TrainConfig(batch_size=4, block_size=16, max_steps=8, warmup_steps=2, eval_interval=4, grad_accum=2)
    straight, _ = train(init_params(TINY, seed=3), TINY, tc, tokens)
    ckpt = tmp_path / "ckpt.pt"
    train(init_params(TINY, seed=3), TINY, tc, tokens, checkpoint_path=ckpt, stop_at=4)
    state = load_checkpoint(ckpt)
    assert state["step"] == 4 and len(state["history"]) == 4
    resumed, history = train(None, state["config"], state["train_config"], tokens, resume=state)
    assert len(history) == 8
    a, b = flatten_params(straight), flatten_params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_gives_the_same_gradients():
    windows = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpoint in (False, True):
        params = trainable(init_params(TINY, seed=1))
        loss_fn(params, TINY, windows, checkpoint_blocks=checkpoint).backward()
        grads.append({k: t.grad for k, t in flatten_params(params).items()})
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_checkpoints_are_atomic_and_never_unpickled(tmp_path):
    params = trainable(init_params(TINY))
    opt = make_optimizer(params, TrainConfig())
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, params, TINY, opt, 1, torch.Generator(), TrainConfig(), [])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(GPT2FnError, match="may be corrupt"):
        load_checkpoint(path)

    class Evil:  # a pickle that would run code is refused by weights_only=True
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(GPT2FnError, match="not a gpt2fn checkpoint: it holds a pickled print, which gpt2fn "
                                          "never unpickles"):  # fmt: skip
        load_checkpoint(tmp_path / "evil.pt")


@dataclasses.dataclass
class OtherConfig:  # build-nanogpt saves its config class in its checkpoints
    n_layer: int = 1


def test_other_projects_checkpoints_are_one_line_each(tmp_path):
    """.pt files that are not train.py's, as training checkpoints (--resume):
    nanoGPT's ckpt.pt (whose weights load_pretrained reads: tests/test_nanogpt.py),
    build-nanogpt's (a pickled config class) and any other dict or object."""
    nanogpt = {"model": {"transformer.wte.weight": torch.zeros(3, 2)}, "optimizer": {}, "model_args": {"n_layer": 1},
               "iter_num": 5, "best_val_loss": torch.tensor(3.0), "config": {"batch_size": 12}}  # fmt: skip
    cases = {
        "nano.pt": (nanogpt, "it holds keys model, optimizer, model_args, iter_num, best_val_loss, config \\(nanoGPT's "
                             "checkpoint: --model and load_pretrained read its weights, but train.py resumes only"),
        "bng.pt": ({"model": {}, "config": OtherConfig()}, "it holds a pickled test_training.OtherConfig, which gpt2fn never"),
        "dict.pt": ({"x": 1}, "not a gpt2fn training checkpoint: it holds keys x, not params, config and train_config"),
        "list.pt": ([1, 2], "it holds list, not params"),
    }  # fmt: skip
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(GPT2FnError, match=message):
            load_checkpoint(tmp_path / name)


def reference_sliding_nll(model, tokens, context, stride):
    """Hugging Face's perplexity-guide loop, with the reference model."""
    nlls, counted, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + context, len(tokens))
        target_len = end - prev_end
        ids = tokens[None, begin:end]
        labels = ids.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(ids, labels=labels).loss
        valid = (labels[:, 1:] != -100).sum().item()
        nlls += loss.item() * valid
        counted += valid
        prev_end = end
        if end == len(tokens):
            break
    return nlls / counted, counted


@pytest.mark.parametrize("context, stride", [(128, 128), (128, 50), (64, 16)])
def test_perplexity_matches_reference(small_ref, context, stride):
    params, config = load_pretrained(small_ref.directory)
    tokens = torch.randint(0, 50257, (700,), generator=torch.Generator().manual_seed(4))
    ours = perplexity(params, config, tokens, context, stride)
    nll, n = reference_sliding_nll(small_ref.model, tokens, context, stride)
    assert ours.n_tokens == n
    assert n == 699 - (699 // context if stride == context else 0)  # disjoint windows skip their first token
    assert abs(ours.nll - nll) <= 1e-5 and ours.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_token_logprobs_are_float64s_log_softmax_on_a_trained_model():
    """On the bundled (trained, peaked) model the log-probabilities are within
    3e-4 of float64's log-softmax of the same logits: computed as
    cross_entropy over [B, V, T] (classes as dim 1), torch's CPU kernel was
    off by up to 1.4e-3 here."""
    from gpt2fn.evaluation import token_logprobs
    from gpt2fn.model import forward
    from gpt2fn.steps import eager_kernels

    params, config = load_pretrained("gpt2-shakespeare")
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n" * 30
    tokens = torch.tensor(get_tokenizer().encode_ordinary(text)[: 3 * 201]).view(3, 201)
    with torch.inference_mode():
        logits = forward(params, config, tokens[:, :-1], kernels=eager_kernels()).double()
        reference = logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        ours = token_logprobs(params, config, tokens)
    assert (ours.double() - reference).abs().max() <= 3e-4


def test_token_logprobs_are_the_references(small_ref):
    """Each token's log-probability after the ones before it, against the
    reference model's log-softmax, for a batch and for a full context plus
    its last target, and a continuation's (continuation_logprobs); other
    shapes are one line."""
    from gpt2fn.evaluation import continuation_logprobs, token_logprobs

    params, config = load_pretrained(small_ref.directory)
    tokens = torch.randint(0, 50257, (3, config.n_ctx + 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = small_ref.model(tokens[:, :-1]).logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        ours = token_logprobs(params, config, tokens)
        assert ours.shape == (3, config.n_ctx) and ours.dtype == torch.float32
        assert (ours - ref).abs().max() <= 1e-4
        prefix = token_logprobs(params, config, tokens[:1, :10])  # causal: a prefix's scores are its own
        assert (prefix - ours[:1, :9]).abs().max() <= 1e-5
    row = tokens[1].tolist()  # a continuation's tokens after its prompt's
    assert (torch.tensor(continuation_logprobs(params, config, row[:4], row[4:11])) - ref[1, 3:10]).abs().max() <= 1e-5
    assert continuation_logprobs(params, config, row[:4], []) == []
    for bad in (tokens[0], tokens[:, :1], torch.zeros(1, config.n_ctx + 2, dtype=torch.long)):
        with pytest.raises(GPT2FnError) as refused:
            token_logprobs(params, config, bad)
        assert str(refused.value) == ("tokens are [B, T] ids with 2 <= T <= 129 (the context + the last target), "
                                      f"got shape {list(bad.shape)}")


def test_perplexity_bad_arguments(small_ref):
    params, config = load_pretrained(small_ref.directory)
    with pytest.raises(GPT2FnError, match="stride"):
        perplexity(params, config, torch.arange(10), 64, 100)
    with pytest.raises(GPT2FnError, match="context"):
        perplexity(params, config, torch.arange(10), 1000)
    with pytest.raises(GPT2FnError, match=r"^tokens are one sequence \[N\], got shape \[1, 10\]; score tokens.flatten\(\)"):
        perplexity(params, config, torch.arange(10)[None])  # its len() is 1: it said "need at least 2 tokens"
    with pytest.raises(GPT2FnError, match=r"^tokens are integer ids, got torch.float32$"):
        perplexity(params, config, torch.arange(10.0))
    with pytest.raises(GPT2FnError, match="need at least 2 tokens"):
        perplexity(params, config, [])
    as_list = perplexity(params, config, list(range(100, 150)), 16, 8)
    assert as_list == perplexity(params, config, torch.arange(100, 150), 16, 8)


def test_unigram_baseline():
    train_tokens = torch.tensor([1, 1, 1, 2])
    ppl = unigram_perplexity(train_tokens, torch.tensor([1, 2]), vocab_size=4)
    # add-one counts: [1, 4, 2, 1] / 8
    assert ppl.nll == pytest.approx(-(math.log(4 / 8) + math.log(2 / 8)) / 2)


def test_train_script_fine_tunes_resumes_and_plots(small_ref, data, tmp_path):
    """scripts/train.py from a Hugging Face checkpoint: trains, writes the
    checkpoint, the exported weights and the loss curve; --resume continues."""
    import subprocess
    import sys

    from conftest import ROOT

    from gpt2fn.weights import load_params

    d, _ = data
    script = str(ROOT / "scripts" / "train.py")
    args = ["--data", str(d / "out"), "--out", str(tmp_path / "ckpt.pt"), "--block_size", "32", "--batch_size", "4",
            "--warmup_steps", "1", "--eval_interval", "2", "--eval_batches", "1"]  # fmt: skip
    first = subprocess.run([sys.executable, script, *args, "--from_model", str(small_ref.directory), "--max_steps", "4",
                            "--stop_at", "2"], capture_output=True, text=True)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    again = subprocess.run([sys.executable, script, *args, "--resume", "--export", str(tmp_path / "tuned.safetensors"),
                            "--export_dtype", "float32", "--plot", str(tmp_path / "loss.png")],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    tuned, config = load_params(tmp_path / "tuned.safetensors")
    original, original_config = load_pretrained(small_ref.directory)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert config == original_config and state["step"] == 4 and len(state["history"]) == 4
    assert not torch.equal(tuned["wte"], original["wte"])
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def tiny_run(data) -> list[str]:
    """train.py's arguments for a 4-step run of a tiny model, evaluating at steps 2 and 4."""
    return ["--data", str(data[0] / "out"), "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--n_ctx", "64",
            "--block_size", "32", "--batch_size", "4", "--max_steps", "4", "--warmup_steps", "1", "--eval_interval", "2",
            "--eval_batches", "1"]  # fmt: skip


def test_snapshots_are_the_weights_at_every_evaluation(data, tmp_path, capsys):
    """--snapshots DIR: DIR/stepN.safetensors at every evaluation, in
    --export_dtype: the last is the exported model (--export, --export_hf as
    a Hugging Face checkpoint, --export_llmc as llm.c's file), an earlier one the weights a run stopped
    there checkpointed; each loads as a model."""
    from conftest import load_script

    from gpt2fn.params import flatten_params
    from gpt2fn.weights import load_params

    cli, args, snaps = load_script("train"), [*tiny_run(data), "--export_dtype", "float32"], tmp_path / "snaps"
    assert cli.main([*args, "--out", str(tmp_path / "a.pt"), "--snapshots", str(snaps), "--export",
                     str(tmp_path / "final.safetensors"), "--export_hf", str(tmp_path / "hf"), "--export_llmc",
                     str(tmp_path / "final.bin")]) == 0  # fmt: skip
    assert sorted(p.name for p in snaps.iterdir()) == ["step2.safetensors", "step4.safetensors"]
    assert cli.main([*tiny_run(data), "--out", str(tmp_path / "b.pt"), "--stop_at", "2"]) == 0  # nothing to export
    capsys.readouterr()
    final = flatten_params(load_params(tmp_path / "final.safetensors")[0])
    hf = flatten_params(load_pretrained(tmp_path / "hf")[0])  # --export_hf: the same weights as a Hugging Face checkpoint
    assert hf.keys() == final.keys() and all(torch.equal(hf[k], final[k]) for k in hf)
    llmc = flatten_params(load_pretrained(tmp_path / "final.bin")[0])  # --export_llmc: the same, as llm.c's file
    assert llmc.keys() == final.keys() and all(torch.equal(llmc[k], final[k]) for k in llmc)
    for snapshot, expected in [("step4", load_params(tmp_path / "final.safetensors")[0]),
                               ("step2", load_pretrained(tmp_path / "b.pt")[0])]:  # fmt: skip
        got, want = flatten_params(load_pretrained(snaps / f"{snapshot}.safetensors")[0]), flatten_params(expected)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), snapshot
    assert not torch.equal(load_params(snaps / "step2.safetensors")[0]["wte"], load_params(snaps / "step4.safetensors")[0]["wte"])


def test_train_prints_and_logs_a_sample_at_every_evaluation(data, tmp_path, capsys):
    """--sample TEXT: each evaluation continues TEXT from the same seed, quoted
    under the step's line and in the --log record; the last is the library's
    continuation from the final checkpoint's weights, and sampling leaves the
    training itself as it was."""
    import json

    from conftest import load_script

    from gpt2fn.generation import generate_all

    cli, args = load_script("train"), tiny_run(data)
    assert cli.main([*args, "--out", str(tmp_path / "a.pt"), "--log", str(tmp_path / "a.jsonl"), "--sample", "ROMEO:",
                     "--sample_tokens", "12"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    sampled = {r["step"]: r["sample"] for r in records if "sample" in r}
    assert list(sampled) == [2, 4] and sampled[2] != sampled[4]
    for step, text in sampled.items():
        quoted = "\n".join(f"| {line}" for line in ("ROMEO:" + text).split("\n")) + "\n"
        assert f"step {step}: train " in out and quoted in out.split(f"step {step}: train ")[1]
    params, config = load_pretrained(tmp_path / "a.pt")
    tok = get_tokenizer()
    new = generate_all(params, config, [tok.encode_ordinary("ROMEO:")], 12, temperature=1.0, top_k=40,
                       generator=torch.Generator().manual_seed(0), stop_token=ENDOFTEXT_ID)[0][0].tolist()  # fmt: skip
    assert tok.decode(new[: new.index(ENDOFTEXT_ID) + 1] if ENDOFTEXT_ID in new else new) == sampled[4]
    assert cli.main([*args, "--out", str(tmp_path / "b.pt")]) == 0
    unsampled = load_checkpoint(tmp_path / "b.pt")["history"]
    assert unsampled == [{k: v for k, v in r.items() if k != "sample"} for r in load_checkpoint(tmp_path / "a.pt")["history"]]
    assert "| ROMEO:" not in capsys.readouterr().out


def test_eval_ppl_script_prints_the_library_figure(small_ref, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "t.txt").write_text(TEXT)
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_ppl.py"), "--model", str(small_ref.directory),
                          "--file", str(tmp_path / "t.txt"), "--stride", "64", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    params, config = load_pretrained(small_ref.directory)
    expected = perplexity(params, config, torch.tensor(get_tokenizer().encode_ordinary(TEXT)), stride=64)
    assert f"perplexity {expected.perplexity:.2f}" in run.stdout
    import json

    record = json.loads((tmp_path / "r.json").read_text())
    assert record == {"model": str(small_ref.directory), "revision": None, "dtype": "float32", "text": "t.txt",
                      "context": 128, "stride": 64, "tokens": expected.n_tokens, "nll": record["nll"],
                      "perplexity": record["perplexity"]}  # fmt: skip
    assert abs(record["nll"] - expected.nll) <= 1e-9 and abs(record["perplexity"] - expected.perplexity) <= 1e-6
    # --dtype int8: the perplexity of the weight-only quantized model, what the quantization costs
    from gpt2fn.quantize import quantize_int8

    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_ppl.py"), "--model", str(small_ref.directory),
                          "--file", str(tmp_path / "t.txt"), "--stride", "64", "--dtype", "int8"],
                         capture_output=True, text=True)  # fmt: skip
    quantized = perplexity(quantize_int8(params), config, torch.tensor(get_tokenizer().encode_ordinary(TEXT)), stride=64)
    assert run.returncode == 0 and "(int8) on t.txt: " in run.stdout and f"NLL {quantized.nll:.4f} " in run.stdout
    assert quantized.nll != expected.nll


WIKITEXT_CARD = """---
configs:
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
  - split: train
    path: wikitext-2-raw-v1/train-*
  - split: validation
    path: wikitext-2-raw-v1/validation-*
---
# wikitext
"""


def test_eval_ppl_scores_a_hub_datasets_split_as_the_perplexity_guide_does(small_ref, offline_hub, capsys):
    """--hf_dataset Salesforce/wikitext --hf_subset wikitext-2-raw-v1: the test
    split's rows (only its files) joined by a blank line, from huggingface_hub's
    cache laid out as it lays one out, scored by the guide's loop with the
    reference model."""
    import pyarrow
    import pyarrow.parquet

    from conftest import load_script

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    snapshot = offline_hub / "datasets--Salesforce--wikitext" / "snapshots" / commit
    (snapshot / "wikitext-2-raw-v1").mkdir(parents=True)
    (snapshot / "README.md").write_text(WIKITEXT_CARD)
    rows = {"test": ["", " = Valkyria Chronicles III = \n", "", " Senjo no Valkyria 3 : Unrecorded Chronicles " * 12 + "\n"],
            "train": [" = Robert Boulter = \n", " Robert Boulter is an English film actor . \n" * 20],
            "validation": [" = Homarus gammarus = \n"]}  # fmt: skip
    for split, texts in rows.items():
        pyarrow.parquet.write_table(pyarrow.table({"text": texts}), snapshot / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    cli = load_script("eval_ppl")
    assert cli.main(["--model", str(small_ref.directory), "--hf_dataset", "Salesforce/wikitext", "--hf_subset",
                     "wikitext-2-raw-v1", "--context", "64", "--stride", "32"]) == 0  # fmt: skip
    tokens = torch.tensor(get_tokenizer().encode_ordinary("\n\n".join(rows["test"])))
    nll, n = reference_sliding_nll(small_ref.model, tokens, 64, 32)
    out = capsys.readouterr().out
    assert out.startswith(f"{small_ref.directory} (float32) on Salesforce/wikitext wikitext-2-raw-v1 test: {n} tokens, "
                          f"NLL {nll:.4f} nats/token"), out  # fmt: skip
    assert cli.main(["--model", str(small_ref.directory), "--hf_dataset", "Salesforce/wikitext", "--hf_subset",
                     "wikitext-2-raw-v1", "--hf_split", "train"]) == 0  # fmt: skip
    tokens = torch.tensor(get_tokenizer().encode_ordinary("\n\n".join(rows["train"])))
    nll, n = reference_sliding_nll(small_ref.model, tokens, 128, 128)  # the model's context, disjoint windows
    assert f" train: {n} tokens, NLL {nll:.4f} " in capsys.readouterr().out
    assert cli.main(["--model", str(small_ref.directory), "--hf_dataset", "Salesforce/wikitext", "--hf_subset",
                     "wikitext-2-raw-v1", "--hf_split", "dev"]) == 2  # fmt: skip
    assert capsys.readouterr().err == ("error: the dataset's config wikitext-2-raw-v1 has no dev split; it has test, "
                                       "train, validation\n")  # fmt: skip


def test_compiled_loss_and_gradients_equal_eager():
    """torch.compile's fused kernels reorder fp32 sums (LayerNorm, softmax,
    the cross-entropy's log-sum-exp over 50257 logits), so equality is to
    fp32 rounding: the loss (~10.8) within 1e-5 (measured 1e-6), each
    gradient within 1e-5 of its own largest entry (measured 7e-7)."""
    windows = torch.randint(0, 50257, (4, 65), generator=torch.Generator().manual_seed(0))
    config = GPTConfig(vocab_size=50257, n_ctx=64, n_embd=32, n_layer=2, n_head=2)
    results = []
    for loss_of in (loss_fn, torch.compile(loss_fn)):
        params = trainable(init_params(config, seed=1))
        loss = loss_of(params, config, windows)
        loss.backward()
        results.append((loss.item(), {k: t.grad for k, t in flatten_params(params).items()}))
    (eager_loss, eager), (compiled_loss, compiled) = results
    assert abs(eager_loss - compiled_loss) <= 1e-5
    for name in eager:
        assert (eager[name] - compiled[name]).abs().max() <= 1e-5 * eager[name].abs().max(), name


def test_compiled_training_follows_eager_training(data):
    """Six optimizer steps with TrainConfig(compile=True) end where eager
    training ends, to the rounding above carried through AdamW: params and
    losses within 1e-4 (measured 1e-6; AdamW divides by sqrt(v), so a
    rounding difference in a near-zero gradient can move an update by up to
    lr, which is why the bound is not tighter)."""
    d, _ = data
    tokens = load_split(d / "out", "train")
    tc = TrainConfig(batch_size=4, block_size=16, max_steps=6, warmup_steps=1, eval_interval=6, grad_accum=2)
    eager, eager_history = train(init_params(TINY, seed=2), TINY, tc, tokens)
    compiled, compiled_history = train(init_params(TINY, seed=2), TINY, dataclasses.replace(tc, compile=True), tokens)
    a, b = flatten_params(eager), flatten_params(compiled)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    assert all(abs(x["loss"] - y["loss"]) <= 1e-4 for x, y in zip(eager_history, compiled_history))


def test_train_script_logs_every_step_and_scores_hellaswag(data, tmp_path):
    """--log: one JSON line per step with tokens/s (and val loss and HellaSwag
    at evaluations); a resumed run first drops what a killed run logged past
    its checkpoint, so the log ends with each step once."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    d, _ = data
    example = {"ctx": "To be, or not to be,", "endings": [" that is the question", "a cat", "the sea", "no"], "label": 0}
    (tmp_path / "h.jsonl").write_text((json.dumps(example) + "\n") * 3)
    log = tmp_path / "log.jsonl"
    args = [sys.executable, str(ROOT / "scripts" / "train.py"), "--data", str(d / "out"), "--out", str(tmp_path / "c.pt"),
            "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--n_ctx", "32", "--block_size", "16", "--batch_size", "2",
            "--max_steps", "4", "--warmup_steps", "1", "--eval_interval", "2", "--eval_batches", "1",
            "--hellaswag", str(tmp_path / "h.jsonl"), "--hellaswag_limit", "2", "--log", str(log), "--device", "cpu"]  # fmt: skip
    first = subprocess.run([*args, "--stop_at", "2"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(log, "a") as f:  # what a run killed after step 3 would have logged
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    again = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[2]["loss"] > 0
    assert all(r["tokens_per_s"] > 0 and "mfu" not in r for r in records)  # a CPU: no known peak, no MFU
    for r in records:
        assert ("val_loss" in r) == ("hellaswag_acc_norm" in r) == (r["step"] % 2 == 0)
        if "hellaswag_acc" in r:
            assert r["hellaswag_acc"] in (0.0, 0.5, 1.0)
    assert "hellaswag acc_norm" in again.stdout
    assert load_checkpoint(tmp_path / "c.pt")["history"][-1]["hellaswag_acc_norm"] == records[-1]["hellaswag_acc_norm"]


class FakeClock:
    """perf_counter for gpt2fn.training: each reading moves it 0.25 s on, and
    an evaluation (``spend``) 100 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.25
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def test_a_steps_time_leaves_out_its_evaluation_and_checkpoint(data, tmp_path, monkeypatch):
    """on_step gets each step's own time (two clock readings apart, whatever
    the evaluation at that step took); the history leaves it out."""
    import gpt2fn.training

    clock = FakeClock()
    monkeypatch.setattr(gpt2fn.training, "time", clock)
    d, _ = data
    tc = TrainConfig(batch_size=2, block_size=16, max_steps=4, warmup_steps=1, eval_interval=2, eval_batches=1)
    seen = []
    _, history = train(init_params(TINY), TINY, tc, load_split(d / "out", "train"), load_split(d / "out", "val"),
                       tmp_path / "c.pt", on_step=seen.append, evaluations=lambda params, step: clock.spend(100) or {})  # fmt: skip
    assert [r["step_s"] for r in seen] == [0.25] * 4
    assert history == [{k: v for k, v in r.items() if k != "step_s"} for r in seen]
    assert "val_loss" in seen[1] and "step_s" not in load_checkpoint(tmp_path / "c.pt")["history"][-1]


def test_train_scripts_tokens_per_s_and_mfu_are_the_steps_own(data, tmp_path, monkeypatch, capsys):
    """--log's tokens/s and MFU at an evaluation step are the step's, not the evaluation's (they read 10x low)."""
    import json

    import gpt2fn.training
    from gpt2fn.measure import training_flops_per_token

    from conftest import load_script

    clock = FakeClock()
    monkeypatch.setattr(gpt2fn.training, "time", clock)
    evaluate = gpt2fn.training.evaluate
    monkeypatch.setattr(gpt2fn.training, "evaluate", lambda *a: clock.spend(100) or evaluate(*a))
    d, _ = data
    log = tmp_path / "log.jsonl"
    code = load_script("train").main([
        "--data", str(d / "out"), "--out", str(tmp_path / "c.pt"), "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
        "--n_ctx", "32", "--block_size", "16", "--batch_size", "2", "--grad_accum", "3", "--max_steps", "4",
        "--warmup_steps", "1", "--eval_interval", "2", "--eval_batches", "1", "--log", str(log), "--device", "cpu",
        "--peak_flops", "1e9"])  # fmt: skip
    assert code == 0
    mfu = training_flops_per_token(GPTConfig(vocab_size=50257, n_ctx=32, n_embd=16, n_layer=1, n_head=2), 16) * 96 / 0.25 / 1e9
    assert f", 384 tokens/s (MFU {mfu:.1%}), val loss " in capsys.readouterr().out  # the closing line: steps 2-4
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [("val_loss" in r, r["tokens_per_s"]) for r in records] == [(False, 384), (True, 384), (False, 384), (True, 384)]
    config = GPTConfig(vocab_size=50257, n_ctx=32, n_embd=16, n_layer=1, n_head=2)
    assert all(r["mfu"] == pytest.approx(training_flops_per_token(config, 16) * 96 / 0.25 / 1e9) for r in records)
