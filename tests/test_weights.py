"""Loading Hugging Face checkpoints (all the layouts the reference writes or
ships), the project's own format, the Hub cache, and every bad file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2fn import GPT2FnError, forward, init_params, load_params, load_pretrained, save_params
from gpt2fn.config import PRESETS, GPTConfig
from gpt2fn.params import flatten_params

from conftest import fake_hub_cache

SMALL_CFG = GPTConfig(vocab_size=50257, n_ctx=128, n_embd=64, n_layer=2, n_head=4)


def assert_same_params(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert torch.equal(fa[name], fb[name]), name


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_config_from_hf_config_json(small_ref):
    config = load_pretrained(small_ref.directory)[1]
    assert config == SMALL_CFG
    hf = json.loads((small_ref.directory / "config.json").read_text())
    assert GPTConfig.from_hf(hf) == SMALL_CFG


def test_presets_are_the_four_gpt2_sizes():
    expected = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
    assert {k: (c.n_layer, c.n_head, c.n_embd) for k, c in PRESETS.items()} == expected
    assert all(c.vocab_size == 50257 and c.n_ctx == 1024 and c.layer_norm_eps == 1e-5 for c in PRESETS.values())


def test_param_count_matches_reference(gpt2_ref):
    from gpt2fn import count_params

    params = init_params(PRESETS["gpt2"])
    # the reference counts the tied lm_head once, as we do
    assert count_params(params) == sum(p.numel() for p in gpt2_ref.model.parameters()) == 124_439_808
    assert count_params(params, include_position_embedding=False) == 124_439_808 - 1024 * 768


def test_checkpoint_variants_load_to_the_same_params(small_ref, tmp_path):
    """Real Hub files differ from save_pretrained's: no 'transformer.' prefix,
    the attn.bias / masked_bias buffers present, lm_head sometimes stored."""
    reference, _ = load_pretrained(small_ref.directory)
    state = load_file(small_ref.directory / "model.safetensors")
    n_ctx = SMALL_CFG.n_ctx
    variants = {
        "no_prefix": {k.removeprefix("transformer."): v for k, v in state.items()},
        "buffers": {
            **state,
            **{f"transformer.h.{i}.attn.bias": torch.tril(torch.ones(1, 1, n_ctx, n_ctx)) for i in range(2)},
            **{f"transformer.h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)},
        },
        "lm_head": {**state, "lm_head.weight": state["transformer.wte.weight"].clone()},
    }
    for name, variant in variants.items():
        d = tmp_path / name
        d.mkdir()
        shutil.copy(small_ref.directory / "config.json", d)
        save_file(variant, d / "model.safetensors", metadata={"format": "pt"})
        params, config = load_pretrained(d)
        assert config == SMALL_CFG
        assert_same_params(params, reference)
    # a single HF weights file works too, when its config.json is beside it
    assert_same_params(load_pretrained(tmp_path / "no_prefix" / "model.safetensors")[0], reference)


def test_sharded_checkpoint(small_ref, tmp_path):
    state = load_file(small_ref.directory / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(small_ref.directory / "config.json", tmp_path)
    assert_same_params(load_pretrained(tmp_path)[0], load_pretrained(small_ref.directory)[0])


def test_untied_lm_head_is_refused(small_ref, tmp_path):
    state = load_file(small_ref.directory / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"] + 1
    shutil.copy(small_ref.directory / "config.json", tmp_path)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(GPT2FnError, match="untied"):
        load_pretrained(tmp_path)


def test_dtype_and_device_on_load(small_ref):
    params, _ = load_pretrained(small_ref.directory, dtype=torch.bfloat16, device="cpu")
    assert {t.dtype for t in flatten_params(params).values()} == {torch.bfloat16}
    by_name, _ = load_pretrained(small_ref.directory, dtype="bfloat16")
    assert all(torch.equal(a, b) for a, b in zip(flatten_params(params).values(), flatten_params(by_name).values()))
    # int8 (by name or torch dtype) is the weight-only quantization, not a cast that truncates the weights
    from gpt2fn.quantize import quantize_int8

    quantized = flatten_params(quantize_int8(load_pretrained(small_ref.directory)[0]))
    for dtype in ("int8", torch.int8):
        loaded = flatten_params(load_pretrained(small_ref.directory, dtype=dtype)[0])
        assert loaded.keys() == quantized.keys() and all(torch.equal(loaded[n], quantized[n]) for n in loaded)
    with pytest.raises(GPT2FnError, match=r"^weights cannot be int32; use a floating dtype \(float32, bfloat16, "
                                          r"float16\) or int8$"):
        load_pretrained(small_ref.directory, dtype=torch.int32)


def test_load_device_by_name_and_one_line_for_a_device_there_is_not(small_ref):
    params, _ = load_pretrained(small_ref.directory, device="auto")  # auto: CUDA if present, else the CPU
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert {t.device.type for t in flatten_params(params).values()} == {want}
    with pytest.raises(GPT2FnError, match=r"^unknown device 'gpu'; use cpu, cuda, cuda:N or auto$"):
        load_pretrained(small_ref.directory, device="gpu")
    with pytest.raises(GPT2FnError, match=r"^device type 'meta' is not supported; use cpu or cuda$"):
        load_pretrained(small_ref.directory, device=torch.device("meta"))
    if not torch.cuda.is_available():
        with pytest.raises(GPT2FnError, match=r"CUDA is not available here .*; use the CPU \(--device cpu\)$"):
            load_pretrained(small_ref.directory, device="cuda")


def test_int8_params_are_not_saved_where_they_cannot_be_read_back(small_ref, tmp_path):
    params, config = load_pretrained(small_ref.directory, dtype="int8")
    with pytest.raises(GPT2FnError, match=r"^these params hold int8-quantized weights, which a saved model cannot "
                                          r"hold; save the float weights, and load them with dtype='int8'"):
        save_params(params, config, tmp_path / "q.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_own_format_round_trip(small_ref, tmp_path):
    params, config = load_pretrained(small_ref.directory)
    path = save_params(params, config, tmp_path / "sub" / "model.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left
    loaded, loaded_config = load_params(path)
    assert loaded_config == config
    assert_same_params(loaded, params)
    again, _ = load_pretrained(path)  # the one entry point recognises the format
    assert_same_params(again, params)
    tokens = torch.randint(0, 50257, (1, 10))
    assert torch.equal(forward(again, config, tokens), forward(params, config, tokens))


def test_a_training_checkpoint_loads_as_a_model(tmp_path, monkeypatch):
    """train.py's --out (.pt) is a model source: its weights at its last step,
    read by torch's weights-only loader, refused where that loader has known
    holes; a file that is not a checkpoint, or whose weights miss their
    config, gets one line."""
    import gpt2fn.weights
    from gpt2fn.quantize import quantize_int8
    from gpt2fn.training import TrainConfig, train

    config = GPTConfig(vocab_size=50257, n_ctx=32, n_embd=16, n_layer=1, n_head=2)
    tokens = torch.randint(0, 50257, (400,), generator=torch.Generator().manual_seed(0))
    trained, _ = train(init_params(config), config, TrainConfig(batch_size=2, block_size=16, max_steps=2, warmup_steps=1),
                       tokens, checkpoint_path=tmp_path / "c.pt")  # fmt: skip
    params, loaded_config = load_pretrained(tmp_path / "c.pt")
    assert loaded_config == config
    assert_same_params(params, trained)
    assert_same_params(load_pretrained(str(tmp_path / "c.pt"), dtype="int8")[0], quantize_int8(params))
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state["config"]["n_embd"] = 32
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(GPT2FnError, match=r"weight wte has shape \(50257, 16\) but the config needs \(50257, 32\)"):
        load_pretrained(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GPT2FnError, match="junk.pt is not a readable gpt2fn checkpoint"):
        load_pretrained(tmp_path / "junk.pt")
    monkeypatch.setattr(gpt2fn.weights, "SAFE_TORCH_LOAD", False)
    with pytest.raises(GPT2FnError, match=r"c.pt: torch .*'s weights-only loader has known holes that let a .pt file "
                                          r"run code \(fixed in torch 2.10\); upgrade torch, or export"):
        load_pretrained(tmp_path / "c.pt")


def test_a_hugging_face_checkpoint_written_here_is_transformers_own(small_ref, tmp_path):
    """save_hf_checkpoint: transformers' from_pretrained loads the model (head
    tied) and its tokenizer from the directory, and they compute and encode
    what gpt2fn does; load_pretrained reads it back bit for bit; int8 is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt2fn import get_tokenizer
    from gpt2fn.quantize import quantize_int8
    from gpt2fn.weights import save_hf_checkpoint

    params, config = load_pretrained(small_ref.directory)
    directory = save_hf_checkpoint(params, config, tmp_path / "hf")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    text = "ROMEO: O, she doth teach the torches to burn<|endoftext|> héllo 🙂\n\n  x"
    ids = AutoTokenizer.from_pretrained(directory)(text).input_ids
    assert ids == get_tokenizer().encode(text, allowed_special="all") and 50256 in ids
    with torch.no_grad():
        assert (model(torch.tensor([ids])).logits - forward(params, config, torch.tensor([ids]))).abs().max() <= 1e-5
    assert json.loads((directory / "config.json").read_text())["eos_token_id"] == 50256
    assert_same_params(load_pretrained(directory)[0], params)
    with pytest.raises(GPT2FnError, match="int8-quantized weights, which a checkpoint cannot hold"):
        save_hf_checkpoint(quantize_int8(params), config, tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    import gpt2fn.weights as weights

    path = tmp_path / "model.safetensors"
    original = init_params(SMALL_CFG, seed=0)
    save_params(original, SMALL_CFG, path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_params(init_params(SMALL_CFG, seed=1), SMALL_CFG, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a valid safetensors file"),
        (lambda p: p.write_bytes(b"\x00" * 8 + b"garbage" * 100), "not a valid safetensors file"),
        (lambda p: p.write_bytes(b""), "not a valid safetensors file"),
        (lambda p: p.unlink(), "has no model.safetensors"),
    ],
    ids=["truncated", "garbage", "empty", "missing"],
)
def test_bad_weights_files(small_ref, tmp_path, damage, message):
    d = copy_checkpoint(small_ref.directory, tmp_path / "ckpt")
    damage(d / "model.safetensors")
    with pytest.raises(GPT2FnError, match=message) as info:
        load_pretrained(d)
    assert "\n" not in str(info.value)


def test_shape_mismatch_between_config_and_weights(small_ref, tmp_path):
    d = copy_checkpoint(small_ref.directory, tmp_path / "ckpt")
    hf = json.loads((d / "config.json").read_text())
    hf["n_embd"], hf["n_head"] = 32, 4
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(GPT2FnError, match="has shape .* but the config needs"):
        load_pretrained(d)


def test_missing_weight(small_ref, tmp_path):
    d = copy_checkpoint(small_ref.directory, tmp_path / "ckpt")
    state = load_file(d / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(GPT2FnError, match=r"lacks 1 weights .*h\.1\.mlp\.c_fc\.bias"):
        load_pretrained(d)


def test_missing_or_corrupt_config(small_ref, tmp_path):
    d = copy_checkpoint(small_ref.directory, tmp_path / "ckpt")
    (d / "config.json").write_text("{not json")
    with pytest.raises(GPT2FnError, match="not valid JSON"):
        load_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(GPT2FnError, match="no config.json"):
        load_pretrained(d)


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(GPT2FnError, match="pickle"):
        load_pretrained(tmp_path)


def test_own_format_without_config_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(GPT2FnError, match="no config.json"):
        load_pretrained(tmp_path / "w.safetensors")


@pytest.mark.parametrize("name", ["gpt3", "gpt2-huge", "distilgpt2"])
def test_unknown_model_name(name):
    with pytest.raises(GPT2FnError, match=f"unknown model '{name}': use one of gpt2, gpt2-medium"):
        load_pretrained(name)


@pytest.mark.parametrize("name", ["./nowhere", "/no/such/dir", "no/such/path.safetensors", "model.safetensors",
                                  "runs/ckpt.pt"])
def test_missing_path(name):
    with pytest.raises(GPT2FnError, match="does not exist"):
        load_pretrained(name)


def test_a_revision_with_a_local_model_is_refused(small_ref):
    """A revision names a Hub snapshot: a local directory, file or bundled
    model has none, so asking for one is an error, not silently ignored."""
    cases = [(small_ref.directory, "directory"), (small_ref.directory / "model.safetensors", "file"),
             ("gpt2-shakespeare", "file")]  # fmt: skip
    for name, kind in cases:
        with pytest.raises(GPT2FnError, match=f"revision 'v1' picks a Hub snapshot, but .* is the local {kind} .*; "
                                              "drop the revision"):  # fmt: skip
            load_pretrained(name, revision="v1")
        load_pretrained(name)  # and without one it loads


def test_hub_name_loads_from_the_hf_cache_offline(small_ref, tmp_path, offline_hub):
    commit = fake_hub_cache(tmp_path, small_ref.directory, refs=("main", "v1"))
    expected, _ = load_pretrained(small_ref.directory)
    for revision in (None, "v1", commit):
        assert_same_params(load_pretrained("gpt2", revision=revision)[0], expected)
    with pytest.raises(GPT2FnError, match="at revision v2 is not in the local Hugging Face cache"):
        load_pretrained("gpt2", revision="v2")
    with pytest.raises(GPT2FnError, match="gpt2-medium is not in the local Hugging Face cache"):
        load_pretrained("gpt2-medium")


def test_a_cached_commit_loads_without_asking_the_hub(small_ref, tmp_path, monkeypatch):
    """A commit's files never change: online too, a cached commit is read from
    the cache and the Hub is not asked (whatever huggingface_hub's version)."""
    commit = fake_hub_cache(tmp_path, small_ref.directory)
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    expected, _ = load_pretrained(small_ref.directory)
    assert_same_params(load_pretrained("gpt2", revision=commit)[0], expected)
    with pytest.raises(AssertionError, match="the Hub was asked"):  # a branch may have moved: that asks the Hub
        load_pretrained("gpt2", revision="main")
