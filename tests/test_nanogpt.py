"""nanoGPT's ``ckpt.pt`` and build-nanogpt's ``model_NNNNN.pt``: read as the
models they compute. nanoGPT's GPT is GPT-2 with the exact GELU
(``nn.GELU()``), which transformers computes with
``activation_function="gelu"``; build-nanogpt's keeps GPT-2's tanh one. Those
transformers models are the references here. The checkpoints below are laid
out as nanoGPT's train.py saves one (``model``: its state dict,
``nn.Linear`` weights ``[out, in]``; ``model_args``; the optimizer and the
run's bookkeeping) and as build-nanogpt's train_gpt2.py does (``model``, its
``GPTConfig`` dataclass pickled from ``__main__``, ``step``, ``val_loss``)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from gpt2fn import GPT2FnError, forward, load_pretrained

from conftest import load_script, randomise_

SHAPE = dict(vocab_size=50304, n_positions=64, n_embd=64, n_layer=2, n_head=4)  # nanoGPT pads the vocabulary
IDS = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))


def reference(bias: bool, activation: str = "gelu"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPE, activation_function=activation)).eval()
    randomise_(model, seed=4, weight_std=0.1)
    if not bias:  # nanoGPT's bias=False: no LayerNorm or Linear bias, which zero ones compute
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
    return model


def nanogpt_state_dict(model, bias: bool, compiled: bool) -> dict:
    """nanoGPT's GPT's state dict of this model's weights (a compiled model's names after ``_orig_mod.``)."""
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith(".bias") and not bias:
            continue
        conv1d = name.startswith("transformer.h.") and name.endswith(".weight") and p.dim() == 2
        sd[("_orig_mod." if compiled else "") + name] = p.T.contiguous() if conv1d else p
    return sd


def nanogpt_checkpoint(model, bias: bool, compiled: bool) -> dict:
    """nanoGPT's train.py checkpoint of this model: its GPT's state dict, model_args and the rest."""
    sd = nanogpt_state_dict(model, bias, compiled)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    model_args = dict(n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"],
                      block_size=SHAPE["n_positions"], bias=bias, vocab_size=SHAPE["vocab_size"], dropout=0.0)  # fmt: skip
    return {"model": sd, "optimizer": optimizer, "model_args": model_args, "iter_num": 250,
            "best_val_loss": torch.tensor(3.1), "config": {"batch_size": 12, "dataset": "openwebtext"}}  # fmt: skip


@pytest.mark.parametrize("bias, compiled", [(True, True), (False, False)])
def test_a_nanogpt_checkpoint_computes_what_nanogpts_model_computes(tmp_path, bias, compiled):
    model = reference(bias)
    torch.save(nanogpt_checkpoint(model, bias, compiled), tmp_path / "ckpt.pt")
    params, config = load_pretrained(tmp_path / "ckpt.pt")
    assert (config.gelu, config.vocab_size, config.n_ctx) == ("none", 50304, 64)
    with torch.no_grad():
        expected = model(IDS).logits
    assert (forward(params, config, IDS) - expected).abs().max().item() <= 1e-5
    tanh = config.__class__(**{**config.to_dict(), "gelu": "tanh"})  # GPT-2's GELU computes another function here
    assert (forward(params, tanh, IDS) - expected).abs().max().item() > 1e-4


def test_generate_runs_it_compiled_as_eager_and_a_bad_one_is_one_line(tmp_path, capsys):
    torch.save(nanogpt_checkpoint(reference(True), True, False), tmp_path / "ckpt.pt")
    generate, texts = load_script("generate"), []
    for extra in ([], ["--compile"]):
        assert generate.main(["--model", str(tmp_path / "ckpt.pt"), "--prompt", "Hello", "--max_tokens", "12",
                              "--temperature", "0", "--device", "cpu", "--ignore_eot", *extra]) == 0  # fmt: skip
        texts.append(capsys.readouterr().out.split("---")[0])
    assert texts[0] == texts[1] and texts[0].startswith("Hello")
    broken = nanogpt_checkpoint(reference(True), True, False)
    del broken["model"]["transformer.h.1.mlp.c_fc.weight"]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(GPT2FnError, match=r"the checkpoint lacks 1 weights the config needs, e.g. \['h.1.mlp.c_fc.weight'\]"):
        load_pretrained(tmp_path / "broken.pt")


@dataclasses.dataclass
class GPTConfig:  # build-nanogpt's, pickled as __main__.GPTConfig: its train_gpt2.py runs as a script
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


def test_a_build_nanogpt_checkpoint_computes_gpt2s_function(tmp_path, monkeypatch):
    monkeypatch.setattr(GPTConfig, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "GPTConfig", GPTConfig, raising=False)
    model = reference(True, activation="gelu_new")
    config = GPTConfig(block_size=SHAPE["n_positions"], vocab_size=SHAPE["vocab_size"], n_layer=SHAPE["n_layer"],
                       n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"])  # fmt: skip
    torch.save({"model": nanogpt_state_dict(model, True, False), "config": config, "step": 19072, "val_loss": 3.07},
               tmp_path / "model_19072.pt")  # fmt: skip
    params, loaded = load_pretrained(tmp_path / "model_19072.pt")
    assert (loaded.gelu, loaded.vocab_size, loaded.n_ctx, loaded.n_layer) == ("tanh", 50304, 64, 2)
    with torch.no_grad():
        assert (forward(params, loaded, IDS) - model(IDS).logits).abs().max().item() <= 1e-5
