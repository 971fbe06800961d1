"""The model that ships in weights/: loads by name, offline, generates, and
has learned Shakespeare (perplexity far below a unigram baseline on the
held-out last 10% of tinyshakespeare, when the data set is beside the repo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpt2fn import load_pretrained
from gpt2fn.data import load_split, prepare
from gpt2fn.evaluation import perplexity, unigram_perplexity
from gpt2fn.weights import BUNDLED_DIR

from conftest import ROOT

NAME = "gpt2-shakespeare"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def test_bundled_model_is_small_and_16_bit():
    path = BUNDLED_DIR / f"{NAME}.safetensors"
    assert path.stat().st_size <= 20 * 2**20
    params, config = load_pretrained(NAME, dtype=torch.float16)
    assert config.vocab_size == 50257
    assert (BUNDLED_DIR / f"{NAME}.md").is_file()  # its model card


def test_generates_offline_from_the_cli(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", NAME, "--prompt", "ROMEO:",
         "--max_tokens", "40", "--seed", "0", "--device", "cpu"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ROMEO:") and len(run.stdout) > 60 and "tokens/s" in run.stderr


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="tinyshakespeare.txt is not beside the repository")
def test_val_perplexity_far_below_unigram(tmp_path):
    prepare([SHAKESPEARE], tmp_path / "data")  # the split the model card describes: the last 10% is val
    train_ids, val_ids = load_split(tmp_path / "data", "train").to(torch.int64), load_split(tmp_path / "data", "val").to(torch.int64)
    params, config = load_pretrained(NAME)
    model = perplexity(params, config, val_ids[:8192], stride=config.n_ctx // 2)
    unigram = unigram_perplexity(train_ids, val_ids[:8192], config.vocab_size)
    assert model.perplexity < unigram.perplexity / 3
