"""llm.c's model files (karpathy/llm.c): read as the model transformers
computes, and written byte for byte as llm.c's own ``train_gpt2.py`` writes
them. The writer below is spelled from that script (``write_model``,
``write_tensors``, ``pad_vocab``), over a transformers ``GPT2LMHeadModel``;
it is the reference, not gpt2fn's code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2fn import GPT2FnError, load_pretrained
from gpt2fn.config import GPTConfig
from gpt2fn.params import flatten_params
from gpt2fn.weights import load_llmc, save_llmc

from conftest import load_script, randomise_

# GPT-2's vocabulary, so the file pads it (50257 -> 50304) as llm.c's does
SHAPE = dict(vocab_size=50257, n_positions=32, n_embd=64, n_layer=2, n_head=4)


def llmc_write_model(model, filename, dtype):
    """llm.c's train_gpt2.py ``write_model``: its GPT's parameters are
    transformers' with every Conv1D weight transposed to nn.Linear's [out, in]."""
    cfg = model.config
    params = {name: (p.T if p.dim() == 2 and ".h." in name else p).detach().cpu() for name, p in model.named_parameters()}
    V, C = params["transformer.wte.weight"].shape
    Vp = (V + 127) // 128 * 128
    params["transformer.wte.weight"] = F.pad(params["transformer.wte.weight"], (0, 0, 0, Vp - V), value=0)
    header = torch.zeros(256, dtype=torch.int32)
    header[:8] = torch.tensor([20240326, {"float32": 3, "bfloat16": 5}[dtype], cfg.n_positions, V, cfg.n_layer,
                               cfg.n_head, cfg.n_embd, Vp])  # fmt: skip
    order = ["transformer.wte.weight", "transformer.wpe.weight"]
    for leaf in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"):  # fmt: skip
        order += [f"transformer.h.{i}.{leaf}" for i in range(cfg.n_layer)]
    order += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    with open(filename, "wb") as f:
        f.write(header.numpy().tobytes())
        for name in order:
            t = params[name]
            f.write(t.numpy().tobytes() if dtype == "float32" else t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())


@pytest.fixture(scope="module")
def reference():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPE)).eval()
    randomise_(model, seed=3, weight_std=0.1)
    return model


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    d = tmp_path_factory.mktemp("llmc")
    for dtype in ("float32", "bfloat16"):
        llmc_write_model(reference, d / f"{dtype}.bin", dtype)
    return d


TOKENS = torch.tensor([[50256, 464, 3290, 318, 257, 1332, 13, 50000], [11, 50255, 0, 7, 7, 7, 99, 1000]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_llmc_file_computes_what_transformers_computes(reference, files, dtype):
    from gpt2fn import forward

    params, config = load_pretrained(files / f"{dtype}.bin")
    assert config == GPTConfig(vocab_size=50257, n_ctx=32, n_embd=64, n_layer=2, n_head=4)
    assert params["wte"].shape == (50257, 64)  # llm.c's padding rows dropped
    expected = reference
    if dtype == "bfloat16":  # a bf16 file holds every weight rounded to bf16, LayerNorms too
        expected = type(reference)(reference.config).eval()
        expected.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in reference.state_dict().items()})
        assert load_llmc(files / f"{dtype}.bin")[0]["wte"].dtype == torch.bfloat16
    with torch.no_grad():
        want = expected(TOKENS).logits
    got = forward(params, config, TOKENS)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_llmc_writes_the_bytes_llmc_writes_and_reads_them_back(reference, files, tmp_path, dtype):
    params, config = load_pretrained(files / "float32.bin")
    out = save_llmc(params, config, tmp_path / "m.bin", dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    assert out.read_bytes() == (files / f"{name}.bin").read_bytes()
    again, config_again = load_llmc(out)
    assert config_again == config
    for key, t in flatten_params(again).items():
        assert torch.equal(t, flatten_params(params)[key].to(dtype)), key


def test_bad_llmc_files_and_settings_are_one_line_each(files, tmp_path):
    good = (files / "float32.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[:-10])
    with pytest.raises(GPT2FnError, match=r"holds \d+ bytes, but the model its header describes .* truncated"):
        load_pretrained(tmp_path / "cut.bin")
    torch.save({"not": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # a pickle: never unpickled
    with pytest.raises(GPT2FnError, match="not an llm.c model file .* never a pickle such as pytorch_model.bin"):
        load_pretrained(tmp_path / "pytorch_model.bin")
    old = bytearray(good)
    old[4:8] = (2).to_bytes(4, "little")  # an early llm.c version, before the padded vocabulary
    (tmp_path / "old.bin").write_bytes(bytes(old))
    with pytest.raises(GPT2FnError, match="of version 2; gpt2fn reads versions 3 .fp32. and 5 .bf16."):
        load_pretrained(tmp_path / "old.bin")
    with pytest.raises(GPT2FnError, match=r"does not exist; pass .* llm.c model file \(.bin\)"):
        load_pretrained(tmp_path / "missing.bin")
    params, config = load_llmc(files / "float32.bin")
    with pytest.raises(GPT2FnError, match="float32 or bfloat16 weights, not float16"):
        save_llmc(params, config, tmp_path / "h.bin", dtype=torch.float16)
    for other, said in (({"layer_norm_eps": 1e-6}, "1e-06 and its GELU tanh's"), ({"gelu": "none"}, "1e-05 and its GELU the exact one")):
        with pytest.raises(GPT2FnError, match=f"LayerNorm eps is {said}; llm.c computes with eps 1e-5 and tanh's GELU"):
            save_llmc(params, GPTConfig(**{**config.to_dict(), **other}), tmp_path / "e.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.bin", "old.bin", "pytorch_model.bin"]  # nothing written


def test_generate_runs_an_llmc_file_as_the_same_model_in_safetensors(files, tmp_path, capsys):
    from gpt2fn import save_params

    save_params(*load_pretrained(files / "float32.bin"), tmp_path / "m.safetensors")
    generate = load_script("generate")
    texts = []
    for model in (files / "float32.bin", tmp_path / "m.safetensors"):
        assert generate.main(["--model", str(model), "--prompt", "Hello", "--max_tokens", "8", "--temperature", "0",
                              "--device", "cpu", "--ignore_eot"]) == 0  # fmt: skip
        texts.append(capsys.readouterr().out.split("---")[0])
    assert texts[0] == texts[1] and texts[0].startswith("Hello")
    assert generate.main(["--model", str(tmp_path / "nothing.bin"), "--prompt", "Hi"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
