"""Shared fixtures: Hugging Face checkpoints written by ``transformers`` itself
(the test-only reference), with every parameter randomised so that no bias is
zero and no LayerNorm gain is one (those would hide layout mistakes)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)


@dataclass
class Reference:
    directory: Path  # config.json + model.safetensors, as save_pretrained writes them
    model: "torch.nn.Module"  # transformers.GPT2LMHeadModel in eval mode, fp32


def randomise_(model: torch.nn.Module, seed: int, weight_std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias") or ".ln_" in name:
                p.copy_(0.02 * noise)
            else:
                p.copy_(weight_std * noise)


def make_reference(directory: Path, shape: dict, seed: int = 0, weight_std: float = 0.02) -> Reference:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**shape)).eval()
    randomise_(model, seed, weight_std)
    model.save_pretrained(directory)  # safetensors, tied lm_head omitted: the real format
    return Reference(directory, model)


@pytest.fixture(scope="session")
def small_ref(tmp_path_factory) -> Reference:
    # wider weights than GPT-2's 0.02 so that 2 layers make peaked, input-dependent logits
    return make_reference(tmp_path_factory.mktemp("small"), SMALL, seed=1, weight_std=0.1)


@pytest.fixture(scope="session")
def gpt2_ref(tmp_path_factory) -> Reference:
    return make_reference(tmp_path_factory.mktemp("gpt2_124m"), GPT2_124M, seed=2, weight_std=0.02)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's graphs and counters cleared before and after a test (tests count graphs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package), to call its main(argv) in-process."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}_cli"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def generate_cli():
    return load_script("generate")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache directory (HF_HOME/hub) in offline mode:
    tests lay out repositories in it as huggingface_hub does."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub


def kernels(attention: str = "sdpa"):
    """The eager kernels with the named attention ("manual" or "sdpa")."""
    from gpt2fn.layers import ATTEND, Kernels

    return Kernels(attend=ATTEND[attention])


def run_cached(params, config, tokens, cache, start: int, attention: str = "sdpa"):
    """Logits [B, T, V] of tokens [B, T] at positions ``start..start+T-1``,
    written into and attending over ``cache``."""
    from gpt2fn.model import hidden, logits, positions

    pos = positions(*tokens.shape) + start
    return logits(params, config, hidden(params, config, tokens, pos, cache, kernels=kernels(attention)))


def fake_hub_cache(hf_home, checkpoint_dir, repo="openai-community/gpt2", refs=("main",)):
    """The on-disk layout huggingface_hub keeps in HF_HOME/hub."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(checkpoint_dir, root / "snapshots" / commit)
    (root / "refs").mkdir()
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return commit
