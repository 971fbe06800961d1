"""Every Hugging Face ``GPT2Config`` field that changes what the model computes
is honoured exactly or refused, never ignored: each is set on a checkpoint
that transformers writes, and the loaded model either gives the reference's
logits or is refused with one line. A table classifies every field
``GPT2Config`` has, so a field a new transformers adds fails here until
someone decides what it means."""

from __future__ import annotations

import pytest
import torch

from gpt2fn import GPT2FnError, GPTConfig, forward, load_pretrained

from conftest import SMALL, make_reference

# (field, value): the loaded model must give the reference's logits
EXACT = [
    ("layer_norm_epsilon", 1e-3),
    ("n_inner", 4 * SMALL["n_embd"]),
    ("activation_function", "gelu_pytorch_tanh"), ("activation_function", "gelu"),  # tanh's GELU, the exact one
    ("reorder_and_upcast_attn", True),  # precision only: the reference upcasts to fp32, which is what we compute in
    ("resid_pdrop", 0.3), ("embd_pdrop", 0.3), ("attn_pdrop", 0.3),  # dropout acts in training only
    ("scale_attn_weights", True),
]  # fmt: skip
# field -> (value, what the refusal says)
REFUSED = {
    "scale_attn_weights": (False, "scale_attn_weights=false"),
    "n_inner": (2 * SMALL["n_embd"], "n_inner=128"),
    "activation_function": ("quick_gelu", "activation 'quick_gelu', not a GELU"),
    "scale_attn_by_inverse_layer_idx": (True, "scale_attn_by_inverse_layer_idx"),
    "add_cross_attention": (True, "cross-attention"),
    "tie_word_embeddings": (False, "unties the LM head"),
}
SHAPE = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head"}  # honoured; every test checks them
# do not change the logits of GPT2LMHeadModel: token ids, generation and output
# switches, initialisation, the double-heads model's summary_*, bookkeeping
NO_EFFECT = {
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "architectures", "id2label", "label2id", "problem_type", "dtype", "torch_dtype", "_name_or_path",
    "transformers_version", "model_type", "tie_encoder_decoder", "torchscript", "use_return_dict",
}  # fmt: skip


def test_every_field_of_gpt2config_is_classified():
    from transformers import GPT2Config

    fields = set(GPT2Config().to_dict())
    unclassified = fields - {field for field, _ in EXACT} - set(REFUSED) - SHAPE - NO_EFFECT
    assert not unclassified, f"decide whether these change the function, and test them: {sorted(unclassified)}"


@pytest.mark.parametrize("field, value", EXACT)
def test_fields_that_are_honoured_give_the_reference_logits(tmp_path, field, value):
    ref = make_reference(tmp_path, {**SMALL, field: value}, seed=3, weight_std=0.1)
    params, config = load_pretrained(ref.directory)
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.model(ids).logits
    assert (forward(params, config, ids) - expected).abs().max().item() <= 1e-5
    if field == "layer_norm_epsilon":
        assert config.layer_norm_eps == 1e-3
    if field == "activation_function":  # and the two GELUs differ enough that the test tells them apart
        assert config.gelu == {"gelu": "none", "gelu_pytorch_tanh": "tanh"}[value]
        other = GPTConfig(**{**config.to_dict(), "gelu": {"none": "tanh", "tanh": "none"}[config.gelu]})
        assert (forward(params, other, ids) - expected).abs().max().item() > 1e-4


@pytest.mark.parametrize("field", list(REFUSED))
def test_fields_that_would_compute_another_function_are_refused(tmp_path, field):
    value, message = REFUSED[field]
    ref = make_reference(tmp_path, {**SMALL, field: value}, seed=3)
    with pytest.raises(GPT2FnError, match=message) as e:
        load_pretrained(ref.directory)
    assert "\n" not in str(e.value)


def test_to_hf_is_the_inverse_of_from_hf_and_builds_the_same_model(tmp_path):
    from transformers import GPT2Config

    from gpt2fn.weights import transformers_model

    config = GPTConfig(vocab_size=50257, n_ctx=96, n_embd=48, n_layer=3, n_head=3, layer_norm_eps=1e-4, gelu="none")
    hf = GPT2Config(**config.to_hf())
    assert GPTConfig.from_hf(hf.to_dict()) == config
    ref = make_reference(tmp_path, {k: v for k, v in config.to_hf().items() if k != "model_type"}, seed=5, weight_std=0.1)
    params, loaded = load_pretrained(ref.directory)
    assert loaded == config
    model = transformers_model(params, config).eval()
    ids = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids).logits - forward(params, config, ids)).abs().max().item() <= 1e-5
