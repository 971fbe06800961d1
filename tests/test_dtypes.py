"""Reduced-precision weights against fp32, eager and compiled.

Tolerances, on logits of these models (|logit| <= ~4.5, std ~0.6-0.8), set
about 3x above what we measured so that a real bug (a wrong scale, a dropped
bias, a transposed weight: errors of the order of the logits themselves)
fails while rounding does not:

* bfloat16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%): measured
  max |diff| 0.04-0.06, KL(fp32 || bf16) ~2e-5 nats.
* float16 keeps 11 bits: measured max |diff| ~0.005, KL ~6e-7.
* int8 weight-only, one scale per output row: each weight is off by at most
  half a step, max|w_row| / 254; measured max |diff| ~0.07, KL ~9e-5.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from gpt2fn import load_pretrained, make_cache
from gpt2fn.layers import Kernels, attend_manual, matvec
from gpt2fn.model import forward
from gpt2fn.params import flatten_params
from gpt2fn.quantize import cast_params, quantize_int8, quantize_rows
from gpt2fn.steps import decode_options

from conftest import run_cached
from test_compile import decode_logits

TOLERANCE = {  # dtype: (max |logit diff|, mean KL in nats)
    "bfloat16": (0.2, 1e-4),
    "float16": (0.02, 5e-6),
    "int8": (0.25, 5e-4),
}


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    return F.kl_div(other.float().log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()


@pytest.fixture(scope="module", params=["small", "gpt2"])
def model(request):
    return load_pretrained(request.getfixturevalue(f"{request.param}_ref").directory)


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_eager_logits_close_to_fp32(model, dtype):
    params, config = model
    tokens = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(0))
    reference = forward(params, config, tokens)
    out = forward(cast_params(params, dtype), config, tokens)
    max_diff, max_kl = TOLERANCE[dtype]
    assert (out.float() - reference).abs().max().item() <= max_diff
    assert kl(reference, out) <= max_kl
    assert (out.float().argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_compiled_decode_close_to_fp32(small_ref, dtype):
    torch._dynamo.reset()
    params, config = load_pretrained(small_ref.directory)
    low = cast_params(params, dtype)
    fast = Kernels(matvec, attend_manual)  # the compiled CPU decode's kernels
    step = torch.compile(functools.partial(decode_logits, config=config, kernels=fast), fullgraph=True, options=decode_options())
    tokens = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(1))
    cache32, cache_low = make_cache(config, 1, 12), make_cache(config, 1, 12, low["wpe"].dtype)
    with torch.inference_mode():
        run_cached(params, config, tokens[:, :8], cache32, 0)
        run_cached(low, config, tokens[:, :8], cache_low, 0)
        for t in range(8, 12):
            pos, token = torch.tensor([[t]]), tokens[:, t : t + 1].clone(memory_format=torch.contiguous_format)
            reference = run_cached(params, config, token, cache32, t)[:, -1]
            out = step(low, token, pos, cache_low)
            max_diff, max_kl = TOLERANCE[dtype]
            assert (out.float() - reference).abs().max().item() <= max_diff
            assert kl(reference, out) <= max_kl
    torch._dynamo.reset()


def test_int8_rows_are_within_half_a_step():
    w = torch.randn(300, 200) * torch.linspace(0.01, 3, 300)[:, None]  # rows of very different scale
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (300,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1) == 127).all()  # each row uses its whole range


def test_int8_layout(small_ref):
    params, _ = load_pretrained(small_ref.directory)
    q = quantize_int8(params)
    flat = flatten_params(q)
    assert flat["wte"].dtype == torch.int8 and flat["wte_scale"].dtype == torch.float32
    for name, t in flat.items():
        if name.endswith(".w"):
            assert t.dtype == torch.int8 and flat[name[:-1] + "scale"].shape == (t.shape[0],)
        elif name not in ("wte",):
            assert t.dtype == torch.float32, name
    # int8 weights are a quarter of the fp32 bytes they replace
    streamed = [n for n in flat if n.endswith(".w") or n == "wte"]
    assert sum(flat[n].numel() * flat[n].element_size() for n in streamed) * 4 == sum(
        flatten_params(params)[n].numel() * 4 for n in streamed
    )
