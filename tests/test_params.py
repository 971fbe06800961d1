"""init_params: GPT-2's initialisation, determinism, the tied head, and that
a freshly initialised model runs the same through every path."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2fn import count_params, forward, init_params
from gpt2fn.config import GPTConfig, PRESETS
from gpt2fn.errors import GPT2FnError
from gpt2fn.params import flatten_params, param_shapes, unflatten_params

CFG = GPTConfig(vocab_size=1000, n_ctx=64, n_embd=128, n_layer=4, n_head=4)


def test_shapes_follow_the_config():
    flat = flatten_params(init_params(CFG))
    assert {k: tuple(v.shape) for k, v in flat.items()} == param_shapes(CFG)
    assert flat["blocks.0.attn.c_attn.w"].shape == (3 * 128, 128)  # [out, in]


def test_gpt2_initialisation_statistics():
    flat = flatten_params(init_params(CFG, seed=0))
    resid = 0.02 / math.sqrt(2 * CFG.n_layer)
    for name, t in flat.items():
        if name.endswith(".g"):
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith(".b"):
            assert torch.equal(t, torch.zeros_like(t)), name
        else:
            expected = resid if name.endswith("c_proj.w") else 0.02
            assert t.mean().abs() < 3 * expected / math.sqrt(t.numel()) + 1e-4, name
            assert t.std().item() == pytest.approx(expected, rel=0.05), name


def test_deterministic_per_seed():
    a, b, c = (flatten_params(init_params(CFG, seed=s)) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wte"], c["wte"])


def test_lm_head_is_the_token_embedding():
    """Changing one row of wte changes that token's logit everywhere, even when
    the token is not in the input: the head reads the very same tensor."""
    params = init_params(CFG, seed=0)
    tokens = torch.tensor([[1, 2, 3]])
    before = forward(params, CFG, tokens)
    params["wte"][999] += 1.0
    after = forward(params, CFG, tokens)
    changed = (after - before).abs().amax(dim=(0, 1)) > 0
    assert changed.nonzero().flatten().tolist() == [999]
    assert "lm_head" not in params  # one tensor, not a copy to keep in sync


def test_unflatten_inverts_flatten():
    params = init_params(CFG)
    again = unflatten_params(flatten_params(params))
    assert flatten_params(again).keys() == flatten_params(params).keys()
    assert isinstance(again["blocks"], list) and len(again["blocks"]) == CFG.n_layer


def test_count_for_every_preset():
    # the published sizes: 124M, 355M, 774M, 1558M (with the position embedding)
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, config in PRESETS.items():
        shapes = param_shapes(config)
        assert sum(math.prod(s) for s in shapes.values()) == expected[name], name
    assert count_params(init_params(CFG)) == sum(math.prod(s) for s in param_shapes(CFG).values())


def test_bad_configs_are_refused():
    with pytest.raises(GPT2FnError, match="not divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(GPT2FnError, match="positive integer"):
        GPTConfig(n_layer=0)
