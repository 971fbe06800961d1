"""Every script answers bad input with one line on stderr and exit status 2,
before any work, and leaves the file system as it found it; a run that fails
midway (NaN loss, out of memory, disk full) says so in one line and keeps the
last good checkpoint intact. (scripts/generate.py: tests/test_cli.py.)"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import subprocess
import sys

import pytest
import torch

from gpt2fn import GPT2FnError, GPTConfig, init_params, save_params
from gpt2fn.data import load_split, prepare
from gpt2fn.params import flatten_params
from gpt2fn.training import TrainConfig, load_checkpoint, train

from conftest import ROOT, fake_hub_cache, load_script

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York;\n" * 40
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--n_ctx", "32", "--block_size", "16",
        "--batch_size", "2", "--max_steps", "4", "--warmup_steps", "1", "--eval_interval", "2", "--eval_batches", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    (d / "t.txt").write_text(TEXT)
    prepare([d / "t.txt"], d / "data")
    return d


@pytest.fixture(scope="module")
def scripts():
    names = ("train", "eval_ppl", "prepare_data", "visualize", "interventions", "benchmark_train")
    return {name: load_script(name) for name in names}


def refused(capsys, script, *args) -> str:
    """Run the script in-process; assert exit 2, one stderr line, nothing on stdout; return the line."""
    code = script.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert out == "", out
    return err


def failed_midway(capsys, script, *args) -> str:
    """Run the script in-process; assert exit 2, no traceback, and one error line after the progress bar."""
    code = script.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err, err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and err.count("error") == 1, err
    return last


def a_file(tmp_path):
    """A path whose parent is a file: no output can be created under it."""
    (tmp_path / "plain").write_text("x")
    return tmp_path / "plain" / "sub"


# ----------------------------------------------------------------------------- train.py

TRAIN_CASES = {  # extra args -> what the line says
    "zero batch": (["--batch_size", "0"], "batch_size must be an integer >= 1, got 0"),
    "zero steps": (["--max_steps", "0"], "max_steps must be an integer >= 1, got 0"),
    "zero accumulation": (["--grad_accum", "0"], "grad_accum must be an integer >= 1"),
    "zero interval": (["--eval_interval", "0"], "eval_interval must be an integer >= 1"),
    "zero stop_at": (["--stop_at", "0"], "stop_at must be an integer >= 1"),
    "stop_at past the end": (["--stop_at", "5"], "--stop_at must be past the run's step 0 and at most its max_steps 4, got 5"),
    "hellaswag_limit alone": (["--hellaswag_limit", "5"], "--hellaswag_limit cuts the --hellaswag evaluation; give "
                                                          "--hellaswag too"),
    "negative lr": (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    "nan lr": (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    "min_lr above lr": (["--min_lr", "1"], "min_lr must be a finite number in [0, 0.001], got 1.0"),
    "beta2 one": (["--beta2", "1"], "beta2 must be a finite number in [0, 1), got 1.0"),
    "negative clip": (["--grad_clip", "-0.5"], "grad_clip must be a finite number >= 0"),
    "warmup past the end": (["--warmup_steps", "9"], "warmup_steps 9 exceeds max_steps 4"),
    "window past the context": (["--block_size", "64"], "block_size 64 exceeds the model's context 32"),
    "heads do not divide": (["--n_head", "3"], "n_embd=16 is not divisible by n_head=3"),
    "export suffix": (["--export", "w.bin"], "must end in .safetensors"),
    "plot suffix": (["--plot", "loss.jpg"], "must end in .png"),
    "empty sample": (["--sample", ""], "--sample is empty; give the text whose continuation to print at every evaluation"),
    "zero sample_tokens": (["--sample", "Hi", "--sample_tokens", "0"], "--sample_tokens must be an integer >= 1, got 0"),
    "sample_tokens alone": (["--sample_tokens", "8"], "--sample_tokens sets the length of the --sample continuations; "
                                                      "give --sample TEXT too"),
    "sample past the context": (["--sample", " word" * 32], "--sample is 32 tokens but the model's context holds 32, "
                                                            "leaving no room to continue it; shorten it"),
    "revision alone": (["--revision", "v1"], "--revision picks the Hub snapshot of --from_model; give --from_model "
                                             "too, or drop it"),
    "export_dtype alone": (["--export_dtype", "float32"], "--export_dtype sets the dtype of --export, --export_hf, "
                                                          "--export_llmc and --snapshots; give one of them too, or drop it"),
    "export_llmc suffix": (["--export_llmc", "w.safetensors"], "--export_llmc file w.safetensors must end in .bin"),
    "export_llmc float16": (["--export_llmc", "w.bin", "--export_dtype", "float16"], "--export_llmc writes float32 or "
                            "bfloat16 (llm.c has no float16 model file); pass --export_dtype float32 or bfloat16"),
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_train_refuses_bad_numbers_and_names(scripts, capsys, data, tmp_path, name):
    extra, message = TRAIN_CASES[name]
    out = tmp_path / "run" / "ckpt.pt"
    err = refused(capsys, scripts["train"], "--data", data / "data", "--out", out, *TINY, *extra)
    assert message in err
    assert not (tmp_path / "run").exists()  # nothing written, not even the directory


def test_train_refuses_bad_paths(scripts, capsys, data, tmp_path):
    train_cli, base = scripts["train"], [*TINY]
    err = refused(capsys, train_cli, "--data", tmp_path / "none", "--out", tmp_path / "c.pt", *base)
    assert f"data directory {tmp_path / 'none'} does not exist" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.bin").write_bytes((data / "data" / "train_000000.bin").read_bytes())
    err = refused(capsys, train_cli, "--data", tmp_path / "half", "--out", tmp_path / "c.pt", *base)
    assert "val.bin does not exist" in err  # the format before shards: both files or neither
    err = refused(capsys, train_cli, "--data", data / "data", "--out", a_file(tmp_path) / "c.pt", *base)
    assert "cannot create checkpoint" in err and "is a file, not a directory" in err
    err = refused(capsys, train_cli, "--data", data / "data", "--out", tmp_path / "c.pt", "--resume", *base)
    assert "nothing to resume" in err
    err = refused(capsys, train_cli, "--data", data / "data", "--out", tmp_path / "c.pt", "--export",
                  a_file(tmp_path) / "w.safetensors", *base)  # fmt: skip
    assert "cannot create --export file" in err
    err = refused(capsys, train_cli, "--data", data / "data", "--out", tmp_path / "c.pt", "--snapshots",
                  tmp_path / "plain", *base)  # fmt: skip
    assert err == f"error: --snapshots directory {tmp_path / 'plain'} is a file, not a directory\n"
    err = refused(capsys, train_cli, "--data", data / "data", "--out", tmp_path / "c.pt", "--snapshots",
                  a_file(tmp_path) / "snaps", *base)  # fmt: skip
    assert "cannot create --snapshots directory" in err
    err = refused(capsys, train_cli, "--data", data / "data", "--out", tmp_path / "c.pt", "--export_hf",
                  a_file(tmp_path) / "hf", *base)  # fmt: skip
    assert "cannot create --export_hf directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "plain"]


def test_train_refuses_to_overwrite_a_checkpoint_and_leaves_it_untouched(scripts, capsys, data, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"a previous run's checkpoint")
    err = refused(capsys, scripts["train"], "--data", data / "data", "--out", ckpt, *TINY)
    assert "already exists; pass --resume" in err
    assert ckpt.read_bytes() == b"a previous run's checkpoint"
    err = refused(capsys, scripts["train"], "--data", data / "data", "--out", ckpt, "--resume", *TINY)
    assert "not a readable gpt2fn checkpoint" in err
    assert ckpt.read_bytes() == b"a previous run's checkpoint" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_resume_refuses_settings_it_would_ignore_and_from_model_a_shape(scripts, capsys, data, tmp_path, small_ref):
    """--resume continues with the run's saved settings: a setting the command
    line gives otherwise is refused, not ignored (the same command again
    passes); --from_model brings its own shape, so a shape option is refused."""
    train_cli, ckpt = scripts["train"], tmp_path / "ckpt.pt"
    assert train_cli.main(["--data", str(data / "data"), "--out", str(ckpt), *TINY, "--stop_at", "2"]) == 0
    capsys.readouterr()
    saved = ckpt.read_bytes()
    for extra, name, given, was in ((["--max_steps", "8"], "max_steps", "8", "4"), (["--n_embd", "32"], "n_embd", "32", "16"),
                                    (["--compile"], "compile", "True", "False"),
                                    (["--no-deterministic"], "deterministic", "False", "True"),
                                    (["--warmup_steps", "9"], "warmup_steps", "9", "1")):  # not "exceeds max_steps 4"  # fmt: skip
        err = refused(capsys, train_cli, "--data", data / "data", "--out", ckpt, *TINY, "--resume", *extra)
        assert err == (f"error: --resume continues the run with its saved settings, but --{name} {given} differs from "
                       f"its {was}; drop --{name}, or start a new run with another --out\n")  # fmt: skip
    err = refused(capsys, train_cli, "--data", data / "data", "--out", ckpt, "--resume", "--stop_at", "2")
    assert err == "error: --stop_at must be past the run's step 2 and at most its max_steps 4, got 2\n"
    assert ckpt.read_bytes() == saved
    assert train_cli.main(["--data", str(data / "data"), "--out", str(ckpt), *TINY, "--resume", "--stop_at", "3"]) == 0
    assert "done: step 3" in capsys.readouterr().out
    err = refused(capsys, train_cli, "--data", data / "data", "--out", tmp_path / "tuned.pt", "--from_model",
                  small_ref.directory, "--n_layer", "2", *TINY[8:])  # fmt: skip
    assert err == "error: --n_layer shapes a model trained from scratch; --from_model brings its own shape: drop --n_layer\n"
    assert not (tmp_path / "tuned.pt").exists()


def test_train_config_refuses_what_the_cli_refuses():
    for bad in (dict(batch_size=0), dict(lr=float("inf")), dict(beta1=-0.1), dict(eval_batches=0), dict(seed=-1),
                dict(deterministic="yes")):  # fmt: skip
        with pytest.raises(GPT2FnError):
            TrainConfig(**bad)


def test_nan_loss_stops_with_one_line_and_no_checkpoint(scripts, capsys, data, tmp_path):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32)
    params = init_params(config)
    params["ln_f"]["g"][0] = float("nan")  # every logit becomes NaN, so does the loss
    save_params(params, config, tmp_path / "nan.safetensors")
    err = failed_midway(capsys, scripts["train"], "--data", data / "data", "--out", tmp_path / "run" / "ckpt.pt",
                        "--from_model", tmp_path / "nan.safetensors", *TINY[8:])  # fmt: skip
    assert "the loss is nan" in err and "at step 1, so training stopped there without updating the weights" in err
    assert "no checkpoint was written yet" in err and err.endswith("and start again")
    assert not (tmp_path / "run" / "ckpt.pt").exists()


MIDWAY = TrainConfig(batch_size=2, block_size=16, max_steps=6, warmup_steps=1, eval_interval=2, eval_batches=1)
SMALL = GPTConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32)


def fail_on_call(n, error):
    """A stand-in for a function that works n - 1 times, then raises or returns NaN."""
    import gpt2fn.training as training

    real, calls = training.loss_fn, [0]

    def loss_fn(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        if calls[0] < n:
            return loss
        if error is None:
            return loss * float("nan")
        raise error

    return loss_fn


@pytest.mark.parametrize("error, message", [
    (None, "the loss is nan (gradient norm nan) at step 3"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory at step 3"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 GB"), "out of memory at step 3"),
])  # fmt: skip
def test_a_failure_midway_names_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, error, message):
    tokens = load_split(data / "data", "train")
    ckpt = tmp_path / "ckpt.pt"
    two_steps, _ = train(init_params(SMALL), SMALL, MIDWAY, tokens, stop_at=2)
    monkeypatch.setattr("gpt2fn.training.loss_fn", fail_on_call(3, error))
    with pytest.raises(GPT2FnError) as e:
        train(init_params(SMALL), SMALL, MIDWAY, tokens, checkpoint_path=ckpt)
    assert message in str(e.value) and f"the last good checkpoint is {ckpt} (step 2), intact" in str(e.value)
    assert "\n" not in str(e.value)
    state = load_checkpoint(ckpt)
    assert state["step"] == 2 and all(torch.equal(state["params"][k], t) for k, t in flatten_params(two_steps).items())


def test_a_full_disk_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    tokens = load_split(data / "data", "train")
    ckpt = tmp_path / "ckpt.pt"
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            with open(f, "wb") as partial:
                partial.write(b"PK\x03\x04 a few bytes, then the disk is full")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(GPT2FnError, match=r"cannot write the checkpoint at step 4 \(No space left on device\); "
                                          r"the last good checkpoint is .* \(step 2\), intact"):  # fmt: skip
        train(init_params(SMALL), SMALL, MIDWAY, tokens, checkpoint_path=ckpt)
    assert load_checkpoint(ckpt)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # the partial temporary is gone


# ----------------------------------------------------------------------------- the other scripts


def test_prepare_data_refuses_bad_input(scripts, capsys, data, tmp_path):
    cli, text, out = scripts["prepare_data"], data / "t.txt", tmp_path / "out"
    assert "val_fraction must be a finite number in (0, 1), got 1.5" in refused(
        capsys, cli, text, "--out", out, "--val_fraction", "1.5")
    assert "val_fraction must be a finite number in (0, 1), got nan" in refused(
        capsys, cli, text, "--out", out, "--val_fraction", "nan")
    assert "--val_tokens and --val_fraction both size the val split; give one" in refused(
        capsys, cli, text, "--out", out, "--val_fraction", "0.2", "--val_tokens", "100")
    assert f"input file {tmp_path / 'none.txt'} does not exist" in refused(capsys, cli, tmp_path / "none.txt", "--out", out)
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    assert "input directory" in refused(capsys, cli, tmp_path / "empty", "--out", out)  # a directory is its files
    assert "output directory" in refused(capsys, cli, text, "--out", a_file(tmp_path))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "as UTF-8 text" in failed_midway(capsys, cli, tmp_path / "latin1.txt", "--out", out)  # found while streaming
    (tmp_path / "tiny.txt").write_text("hi")
    assert "too little text" in failed_midway(capsys, cli, tmp_path / "tiny.txt", "--out", out)
    assert "--workers must be an integer >= 1, got 0" in refused(capsys, cli, text, "--out", out, "--workers", "0")
    assert "--shard_tokens must be an integer >= 2" in refused(capsys, cli, text, "--out", out, "--shard_tokens", "1")
    assert "give input files or --hf_dataset" in refused(capsys, cli, "--out", out)
    for option in ("--hf_revision", "--revision"):  # --revision: its first name, kept
        assert "--hf_revision picks a Hub snapshot of --hf_dataset; drop it for local files" in refused(
            capsys, cli, text, "--out", out, option, "v1")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    assert f"{tmp_path / 'bad.jsonl'} line 2 is not JSON" in failed_midway(capsys, cli, tmp_path / "bad.jsonl", "--out", out)
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    assert 'line 1 has no "text" field' in failed_midway(capsys, cli, tmp_path / "notext.jsonl", "--out", out)
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"content": ["a", "b"]}), tmp_path / "t.parquet")
    assert "has no text column (its columns: content)" in refused(capsys, cli, tmp_path / "t.parquet", "--out", out)
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    assert "is not a readable parquet file" in refused(capsys, cli, tmp_path / "fake.parquet", "--out", out)
    assert not out.exists()  # no shard directory left behind by any of these


def test_eval_ppl_refuses_bad_input(scripts, capsys, small_ref, data, tmp_path):
    cli, model, text = scripts["eval_ppl"], ["--model", small_ref.directory], data / "t.txt"
    assert "--context must be an integer >= 2, got 1" in refused(capsys, cli, *model, "--file", text, "--context", "1")
    assert "--stride must be an integer >= 1, got 0" in refused(capsys, cli, *model, "--file", text, "--stride", "0")
    assert "context must be between 2 and the model's 128, got 500" in refused(
        capsys, cli, *model, "--file", text, "--context", "500")
    assert "stride must be between 1 and the context (64)" in refused(
        capsys, cli, *model, "--file", text, "--context", "64", "--stride", "65")
    assert f"text file {tmp_path / 'no.txt'} does not exist" in refused(capsys, cli, *model, "--file", tmp_path / "no.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    assert "is not UTF-8 text" in refused(capsys, cli, *model, "--file", tmp_path / "bin.txt")
    (tmp_path / "one.txt").write_text("a")
    assert "perplexity needs at least 2" in refused(capsys, cli, *model, "--file", tmp_path / "one.txt")
    assert "unknown device 'tpu'" in refused(capsys, cli, *model, "--file", text, "--device", "tpu")
    assert "cannot create --json file" in refused(capsys, cli, *model, "--file", text, "--json", a_file(tmp_path) / "r.json")
    assert refused(capsys, cli, *model) == "error: give the text to score: --file FILE or --hf_dataset REPO (one of the two)\n"
    assert refused(capsys, cli, *model, "--file", text, "--hf_dataset", "a/b").startswith("error: give the text to score")
    for given in (["--hf_subset", "x"], ["--hf_split", "train"], ["--hf_revision", "v1"]):
        assert refused(capsys, cli, *model, "--file", text, *given) == (
            f"error: {given[0]} picks what of --hf_dataset to score; drop it with --file\n")


def test_visualize_refuses_bad_input(scripts, capsys, small_ref, tmp_path):
    cli, out = scripts["visualize"], tmp_path / "viz"
    base = ["--model", small_ref.directory, "--out", out]
    assert "--layers must be a comma-separated list of integers >= 0 (e.g. 0,5), got 'a,b'" in refused(
        capsys, cli, *base, "--layers", "a,b")
    assert "--layers must be between 0 and 1, got 0,5" in refused(capsys, cli, *base, "--layers", "0,5")
    assert "--columns must be a comma-separated list" in refused(capsys, cli, *base, "--columns", "-1")
    assert "--columns must be between 0 and 63" in refused(capsys, cli, *base, "--columns", "64")
    assert "no matrix named 'nope'" in refused(capsys, cli, *base, "--weight", "nope")
    assert "the prompt is empty" in refused(capsys, cli, *base, "--prompt", "")
    assert "--out directory" in refused(capsys, cli, "--model", small_ref.directory, "--out", a_file(tmp_path))
    assert "does not exist" in refused(capsys, cli, "--model", tmp_path / "none.safetensors", "--out", out)
    assert "unknown device 'tpu'" in refused(capsys, cli, *base, "--device", "tpu")
    assert not out.exists()


def test_interventions_refuse_bad_input(scripts, capsys, small_ref):
    cli, model = scripts["interventions"], ["--model", small_ref.directory]
    assert "--steer_tokens must be an integer >= 1, got 0" in refused(capsys, cli, *model, "--steer_tokens", "0")
    assert "--layer must be between 0 and 1, got 7" in refused(capsys, cli, *model, "--layer", "7")
    assert "unknown model 'gpt5'" in refused(capsys, cli, "--model", "gpt5")
    assert "the prompt needs at least two tokens" in refused(capsys, cli, *model, "--prompt", "a")
    assert "unknown device 'tpu'" in refused(capsys, cli, *model, "--device", "tpu")
    assert "patching needs the same length" in refused(capsys, cli, *model, "--source", "a much longer source prompt "
                                                                                     "than the default one, by far")


def test_benchmark_prepare_refuses_bad_input(capsys):
    cli = load_script("benchmark_prepare")
    assert "--workers must be a comma-separated list of integers >= 1 (e.g. 1,2), got '2,0'" in refused(
        capsys, cli, "--workers", "2,0")
    assert "--rounds must be an integer >= 1, got 0" in refused(capsys, cli, "--rounds", "0")
    assert "--throughput-mb must be an integer >= 1, got -1" in refused(capsys, cli, "--throughput-mb", "-1")


def other_vocab(tmp_path):
    config = GPTConfig(vocab_size=1000, n_ctx=64, n_embd=32, n_layer=1, n_head=2)
    return save_params(init_params(config), config, tmp_path / "other_vocab.safetensors")


def model_runs(data, tmp_path, out) -> dict:
    """Each script that reads a --model (train.py aside: --from_model), with
    the arguments it needs besides: reaching its model, it runs."""
    (tmp_path / "hellaswag.jsonl").write_text('{"ctx": "A man", "endings": ["runs.", "sits.", "is.", "was."], "label": 0}\n')
    (tmp_path / "lambada.jsonl").write_text('{"text": "He opened the door and saw his brother"}\n')
    return {
        "generate": ["--prompt", "Hello", "--max_tokens", "3"],
        "eval_ppl": ["--file", data / "t.txt"],
        "eval_hellaswag": ["--data", tmp_path / "hellaswag.jsonl"],
        "eval_lambada": ["--data", tmp_path / "lambada.jsonl"],
        "interventions": [],
        "visualize": ["--out", out],
    }


def test_a_model_narrower_than_its_tokenizer_is_refused_by_every_script(scripts, capsys, data, tmp_path):
    """A 1000-token model with GPT-2's tokenizer (50257 ids) would be handed
    ids it lacks: every script that feeds it text says so before any output."""
    model, out = other_vocab(tmp_path), tmp_path / "out"
    narrow = "error: the model's vocabulary holds 1000 tokens but its tokenizer has 50257, so the model would be handed ids it lacks"
    for name, args in model_runs(data, tmp_path, out).items():
        cli = scripts.get(name) or load_script(name)
        assert refused(capsys, cli, "--model", model, *args).startswith(narrow), name
    assert refused(capsys, scripts["train"], "--data", data / "data", "--out", out / "ck.pt", "--from_model", model,
                   *TINY[8:]) == ("error: the model's vocabulary holds 1000 tokens but the data's tokenizer (GPT-2's) "
                                  "has 50257, so the model would be handed ids it lacks; fine-tune a model with GPT-2's "
                                  "vocabulary\n")  # fmt: skip
    assert not out.exists()


def test_every_script_that_loads_a_model_takes_its_hub_revision(scripts, capsys, data, tmp_path, small_ref, offline_hub):
    """--revision reaches the Hub lookup in every script with a --model (train:
    --from_model; benchmark.py: below): v2 is not cached, so each says so; v1
    is, and loads."""
    fake_hub_cache(offline_hub.parent, small_ref.directory, refs=("main", "v1"))
    out = tmp_path / "out"
    missing = "error: openai-community/gpt2 at revision v2 is not in the local Hugging Face cache"
    for name, args in model_runs(data, tmp_path, out).items():
        cli = scripts.get(name) or load_script(name)
        assert refused(capsys, cli, "--model", "gpt2", "--revision", "v2", *args).startswith(missing), name
    train = ["--data", data / "data", "--out", out / "ck.pt", "--from_model", "gpt2", *TINY[8:]]
    assert refused(capsys, scripts["train"], *train, "--revision", "v2").startswith(missing)
    assert not out.exists()
    assert scripts["eval_ppl"].main(["--model", "gpt2", "--revision", "v1", "--file", str(data / "t.txt")]) == 0
    assert capsys.readouterr().out.startswith("gpt2 (float32) on t.txt: ")


def test_benchmark_refuses_bad_input_before_any_work(small_ref, tmp_path):
    """As a command (importing it would point inductor at a fresh cache for this whole process)."""
    cases = {
        "--new-tokens 0": "--new-tokens must be an integer >= 3, got 0",
        "--model gpt2-shakespeare --shape gpt2": "--shape sets the shape of random weights; --model brings its own: drop --shape",
        "--shape gpt2 --revision v1": "--revision picks the Hub snapshot of --model; give --model too, or drop it",
        "--revision v1": "revision 'v1' picks a Hub snapshot, but",  # reaches the model's lookup
        "--lengths abc": "--lengths must be a comma-separated list of integers >= 2 (e.g. 64,256), got 'abc'",
        "--rounds 0": "--rounds must be an integer >= 1, got 0",
        "--draft-tokens 4,0": "--draft-tokens must be a comma-separated list of integers >= 1 (e.g. 4,8), got '4,0'",
        "--tokens-per-call -1": "--tokens-per-call must be an integer >= 0, got -1",
        "--dtypes float32,float64": "unknown dtype 'float64' in --dtypes",
        f"--json {a_file(tmp_path)}/r.json": "cannot create --json file",
        "--plot bench.svg": "--plot file bench.svg must end in .png",
        "--device tpu": "unknown device 'tpu'",
        "--draft-vocab-from x.txt": "--draft-vocab-from needs --draft-vocab N",
        "--draft-vocab 9 --drafts=": "--draft-vocab cuts the speculative rows' drafts; give --drafts too",
        "--draft-vocab 9 --draft-vocab-from no/such.txt": "--draft-vocab-from: there is no file no/such.txt",
        "--draft-vocab 60000 --lengths 16 --new-tokens 8": "size must be between 1 and 50257, got 60000",
        "--drafts int8,nosuch --lengths 16 --new-tokens 8": "unknown model 'nosuch'",
        f"--drafts {other_vocab(tmp_path)} --lengths 16 --new-tokens 8": "has 1000 tokens and the target's 50257; a draft must share",
    }
    (tmp_path / "binary.txt").write_bytes(b"abc\xff\xfe")
    cases[f"--draft-vocab 9 --draft-vocab-from {tmp_path / 'binary.txt'} --lengths 16 --new-tokens 8"] = (
        f"--draft-vocab-from file {tmp_path / 'binary.txt'} is not UTF-8 text (invalid start byte at byte 3)")
    cases[f"--model {tmp_path / 'none'}"] = f"{tmp_path / 'none'} does not exist"
    argvs = [([] if "--model" in args or "--shape" in args else ["--model", str(small_ref.directory)]) + args.split()
             for args in cases]  # fmt: skip
    script = str(ROOT / "scripts" / "benchmark.py")
    run = subprocess.run([sys.executable, script, *argvs[0]], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr == f"error: {next(iter(cases.values()))}\n", run.stderr[-2000:]
    # the rest in one process (an import of torch each would take ~3 s): main(argv) as the command runs it
    driver = f"""if True:
        import contextlib, io, json, runpy, sys
        bench = runpy.run_path({script!r}, run_name="benchmark")
        results = []
        for argv in json.loads(sys.argv[1]):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = bench["run_cli"](bench["main"], argv)
            results.append((code, out.getvalue(), err.getvalue()))
        print(json.dumps(results))"""
    run = subprocess.run([sys.executable, "-c", driver, json.dumps(argvs[1:])], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.splitlines()[-1])
    assert len(results) == len(cases) - 1
    for (code, out, err), message in zip(results, list(cases.values())[1:]):
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (message, err)
        assert "gpt2fn benchmark" not in out


def test_benchmark_train_refuses_bad_input(scripts, capsys, tmp_path):
    cli = scripts["benchmark_train"]
    assert "--steps must be an integer >= 1, got 0" in refused(capsys, cli, "--steps", "0")
    assert "--batch_size must be an integer >= 1, got -2" in refused(capsys, cli, "--batch_size", "-2")
    assert "--block_size 512 exceeds the gpt2-shakespeare context 256" in refused(capsys, cli, "--block_size", "512")
    assert "cannot create --json file" in refused(capsys, cli, "--json", a_file(tmp_path) / "r.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so asking for it is not an error")
def test_train_on_cuda_where_there_is_none(scripts, capsys, data, tmp_path):
    err = refused(capsys, scripts["train"], "--data", data / "data", "--out", tmp_path / "c.pt", "--device", "cuda", *TINY)
    assert "CUDA is not available" in err and "--device cpu" in err
    assert list(tmp_path.iterdir()) == []


def test_a_batch_that_does_not_split_among_the_processes(data, monkeypatch):
    monkeypatch.setattr("gpt2fn.training.distributed_world", lambda: (4, 0))
    with pytest.raises(GPT2FnError, match="batch_size 2 is not divisible by the 4 processes; use a multiple of 4"):
        train(init_params(SMALL), SMALL, MIDWAY, load_split(data / "data", "train"))


def test_resume_with_other_data_is_refused(scripts, capsys, data, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    code = scripts["train"].main(["--data", str(data / "data"), "--out", str(ckpt), *TINY, "--stop_at", "2"])
    assert code == 0
    (tmp_path / "other.txt").write_text("Friends, Romans, countrymen, lend me your ears;\n" * 50)
    prepare([tmp_path / "other.txt"], tmp_path / "other")
    capsys.readouterr()
    before = ckpt.read_bytes()
    err = refused(capsys, scripts["train"], "--data", tmp_path / "other", "--out", ckpt, "--resume")
    assert "--resume with other data: the checkpoint trained on" in err and "resume with the data it was trained on" in err
    assert ckpt.read_bytes() == before


def test_every_script_takes_its_long_options_with_hyphens_or_underscores(scripts, capsys, data, tmp_path):
    """The scripts spell their options differently (--max_tokens, --new-tokens),
    so each takes either spelling: the option reaches its own check, not
    argparse's 'unrecognized arguments'."""
    text, out = data / "t.txt", tmp_path / "out"
    assert "val_fraction must be a finite number in (0, 1), got 1.5" in refused(
        capsys, scripts["prepare_data"], text, "--out", out, "--val-fraction", "1.5")
    assert "--batch_size must be an integer >= 1, got -2" in refused(capsys, scripts["benchmark_train"], "--batch-size=-2")
    assert "lr must be a finite number > 0, got -1.0" in refused(
        capsys, scripts["train"], "--data", data / "data", "--out", tmp_path / "c.pt", *TINY, "--lr", "-1", "--warmup-steps", "1")
    generate = load_script("generate").parse_args(
        ["--prompt", "x", "--max-tokens", "7", "--prompt_file", "f", "--draft-tokens=3", "--ignore-eot", "--no_kvcaching"])
    assert (generate.max_tokens, generate.prompt_file, generate.draft_tokens, generate.ignore_eot, generate.kvcaching) == (
        7, "f", 3, True, False)
    bench = load_script("benchmark").parse_args(["--new_tokens", "5", "--prompt_len=4", "--draft_vocab_from", "v.txt"])
    assert (bench.new_tokens, bench.prompt_len, bench.draft_vocab_from) == (5, 4, "v.txt")
    assert not out.exists()


def test_an_option_spelt_either_way_may_be_cut_short_as_argparse_allows():
    from gpt2fn.errors import ArgumentParser

    p = ArgumentParser(prog="t")
    p.add_argument("--max_tokens", type=int)
    p.add_argument("--max_len", type=int)
    p.add_argument("rest", nargs="*")
    assert p.parse_args(["--max-tok", "3"]).max_tokens == 3  # a prefix of one option only
    assert p.parse_args(["--max-len=4", "--max_tokens", "5"]).max_len == 4
    assert p.parse_args(["--", "--max-tokens"]).rest == ["--max-tokens"]  # after "--" a value, as it stands
    with pytest.raises(SystemExit):
        p.parse_args(["--max-", "3"])  # a prefix of both: argparse's own refusal


ALL_SCRIPTS = ("generate", "train", "eval_ppl", "eval_hellaswag", "eval_lambada", "prepare_data", "visualize",
               "interventions", "benchmark", "benchmark_train", "benchmark_prepare")  # fmt: skip


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_every_option_of_every_script_says_what_it_does_and_its_default(name, monkeypatch):
    from gpt2fn.errors import ArgumentParser

    assert {p.stem for p in (ROOT / "scripts").glob("*.py")} == set(ALL_SCRIPTS)
    parsers = []

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    script = load_script(name)
    monkeypatch.setattr(ArgumentParser, "parse_known_args", capture)
    with pytest.raises(SystemExit):
        script.parse_args([]) if hasattr(script, "parse_args") else script.main([])
    options = [a for a in parsers[0]._actions if a.option_strings and a.dest != "help"]
    assert [a.option_strings[0] for a in options if not a.help] == []
    monkeypatch.undo()
    text = one_line_help(script)
    text = text[text.index(" options: "):]
    starts, formatter = [0], parsers[0]._get_formatter()
    for a in options:  # where each entry begins, in order: "--top_k TOP_K keep ...", "--kvcaching, --no-kvcaching decode ..."
        starts.append(text.index(f" {formatter._format_action_invocation(a)} {a.help.split()[0]}", starts[-1]))
    starts = starts[1:] + [len(text)]
    for a, start, end in zip(options, starts, starts[1:]):  # each option's own help
        if a.default is not None and a.default is not False and a.default != []:
            assert "default" in text[start:end], text[start:end]
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text


def test_help_shows_the_defaults_in_one_form():
    text = one_line_help(load_script("train"))
    assert " --lr LR peak learning rate, after the warmup (default: 0.001) " in text
    assert " --seed SEED the initial weights (from scratch) and the order of the training windows (default: 0) " in text
    assert " --compile torch.compile the loss (the backward through AOTAutograd) --eval_interval" in text  # a flag: off
    assert " --export EXPORT write the final weights here (.safetensors) --export_dtype" in text  # None: nothing to say


def one_line_help(script) -> str:
    """A script's --help, its wrapped lines joined."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        script.main(["--help"])
    return " ".join(out.getvalue().split())

