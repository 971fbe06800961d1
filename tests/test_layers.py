"""Each layer on inputs small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2fn import GPT2FnError, forward, init_params
from gpt2fn.cache import cache_len, make_cache, window
from gpt2fn.config import GPTConfig
from gpt2fn.device import (
    MATVEC_BF16_MAX_ROWS, ONEDNN, ONEDNN_MIN_WEIGHT, ONEDNN_ROWS, cpu_flags, cpu_vendor, matvec_bf16_max_rows,
)
from gpt2fn.layers import (
    Kernels, attend_manual, attend_sdpa, attention, causal_mask, ffn, few_rows, gelu, layer_norm, linear, matvec,
)  # fmt: skip
from gpt2fn.model import at_layer, positions
from gpt2fn.training import loss_fn


def test_causal_mask_per_row_positions():
    pos = torch.tensor([[0, 1, 2], [3, 4, 4]])  # row 1: a ragged row's repeated last position
    mask = causal_mask(pos, 5)
    assert mask.shape == (2, 1, 3, 5)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_positions_are_equal_rows():
    assert positions(2, 3).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_linear_matvec_and_int8_scale_by_hand():
    x = torch.tensor([[1.0, 2.0]])
    w = torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.5, 0.5]])
    b = torch.tensor([0.0, 1.0, -1.0])
    assert linear(x, w, b).tolist() == [[1.0, 0.0, 0.5]]
    assert matvec(x, w, b).tolist() == [[1.0, 0.0, 0.5]]  # the same function, another spelling
    q, scale = torch.tensor([[2, 0], [1, -1]], dtype=torch.int8), torch.tensor([0.5, 3.0])
    assert linear(x, q, None, scale).tolist() == [[1.0, -3.0]]
    assert matvec(x, q, None, scale).tolist() == [[1.0, -3.0]]


def test_few_rows_by_hand_and_equal_to_linear_at_every_row_count():
    x = torch.tensor([[1.0, 2.0]]).expand(5, 2)  # 5 rows: oneDNN's side of ONEDNN_ROWS
    w = torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.5, 0.5]])
    b = torch.tensor([0.0, 1.0, -1.0])
    assert ONEDNN_ROWS[0] <= 5 <= ONEDNN_ROWS[1]
    assert few_rows(x, w, b).tolist() == [[1.0, 0.0, 0.5]] * 5  # a small weight: MKL (oneDNN on an AMD CPU)
    assert ONEDNN_MIN_WEIGHT <= 2**20
    big_w, big_b = torch.zeros(2**19, 2), torch.zeros(2**19)  # large enough: oneDNN
    big_w[:3], big_b[:3] = w, b
    assert few_rows(x, big_w, big_b)[:, :3].tolist() == [[1.0, 0.0, 0.5]] * 5 and few_rows(x, big_w, big_b)[:, 3:].abs().max() == 0
    q, scale = torch.tensor([[2, 0], [1, -1]], dtype=torch.int8), torch.tensor([0.5, 3.0])
    assert few_rows(x, q, None, scale).tolist() == [[1.0, -3.0]] * 5
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (2**20 // 96 + 1, 96), generator=gen, dtype=torch.int8)  # int8: the op's product of
    scale, b, x = torch.rand(len(q), generator=gen), torch.randn(len(q), generator=gen), torch.randn(5, 96, generator=gen)
    op = torch.ops.gpt2fn.few_rows_linear  # the dequantized fp32 weight (not MKL's, whose bits differ), then scaled
    assert torch.equal(few_rows(x, q, b, scale), op(x, q.float(), None) * scale + b if ONEDNN else linear(x, q, b, scale))
    w, b = torch.randn(2**20 // 96 + 1, 96, generator=gen), torch.randn(2**20 // 96 + 1, generator=gen)  # >= ONEDNN_MIN_WEIGHT
    compiled = torch.compile(few_rows, fullgraph=True, dynamic=True)  # the row count symbolic, as in a verify pass
    for rows in range(1, 20):  # both libraries, by the row count (MKL below 4 and above 16; oneDNN always on AMD)
        x = torch.randn(1, rows, 96, generator=gen)
        assert torch.allclose(few_rows(x, w, b), linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert torch.allclose(compiled(x, w, b), linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_few_rows_gradients_equal_linears_and_autocast_takes_linear():
    """few_rows's op has a backward of its own (its products by the same
    rule): x, w and b's gradients equal F.linear's, with and without a bias,
    over 3-D inputs, on both libraries' sides (a small weight and a few rows:
    MKL on an Intel CPU; many rows: oneDNN on an AMD one, MKL elsewhere);
    under bf16 autocast it is linear, in bf16, as F.linear is."""
    gen = torch.Generator().manual_seed(1)
    for rows, (out, d), bias in [(3, (7, 5), True), (300, (96, 64), True), (300, (50, 64), False)]:
        x = torch.randn(2, rows // 2 + 1, d, generator=gen)
        w, b = torch.randn(out, d, generator=gen), torch.randn(out, generator=gen) if bias else None
        dy = torch.randn(*x.shape[:-1], out, generator=gen)
        grads = []
        for product in (few_rows, linear):
            leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
            y = product(leaves[0], leaves[1], leaves[2] if bias else None)
            grads.append(torch.autograd.grad(y, leaves, dy))
        for mine, reference in zip(*grads):
            assert torch.allclose(mine, reference, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert few_rows(x, w).dtype == torch.bfloat16 and torch.equal(few_rows(x, w), linear(x, w))


def test_cpu_vendor_and_the_onednn_rule_it_picks(tmp_path):
    """few_rows's rule follows the CPU's vendor: oneDNN for every fp32 product
    on an AMD CPU, Intel's measured ranges elsewhere."""
    amd, other = tmp_path / "amd", tmp_path / "other"
    amd.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n")
    other.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # e.g. an ARM CPU: no vendor_id
    assert (cpu_vendor(amd), cpu_vendor(other), cpu_vendor(tmp_path / "missing")) == ("AuthenticAMD", "", "")
    if cpu_vendor() == "AuthenticAMD":
        assert ONEDNN_ROWS[0] == 1 and ONEDNN_ROWS[1] >= 2**31 and ONEDNN_MIN_WEIGHT == 0
    else:
        assert (ONEDNN_ROWS, ONEDNN_MIN_WEIGHT) == ((4, 16), 2**20)


def test_cpu_flags_and_the_bf16_rule_they_pick(tmp_path):
    """matvec hands bf16 products of more than 8 rows to oneDNN on a CPU
    that multiplies bf16 natively (AVX-512 BF16 or AMX), and keeps every
    batch it takes (16 rows) elsewhere."""
    zen5, old = tmp_path / "zen5", tmp_path / "old"
    zen5.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\nbugs\t\t: sysret_ss_attrs\n")
    old.write_text("processor\t: 0\nflags\t\t: fpu avx2\n")
    assert "avx512_bf16" in cpu_flags(zen5) and "sysret_ss_attrs" not in cpu_flags(zen5)
    assert (cpu_flags(old), cpu_flags(tmp_path / "missing")) == ({"fpu", "avx2"}, frozenset())
    amx = frozenset({"fpu", "amx_bf16", "amx_tile"})
    assert [matvec_bf16_max_rows(f, True) for f in (cpu_flags(zen5), amx, cpu_flags(old))] == [8, 8, 16]
    assert matvec_bf16_max_rows(cpu_flags(zen5), False) == 16  # no oneDNN in this build
    assert MATVEC_BF16_MAX_ROWS == matvec_bf16_max_rows(cpu_flags(), ONEDNN)  # this machine's


def test_layer_norm_and_gelu_by_hand():
    y = layer_norm(torch.tensor([[1.0, 3.0]]), torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.0]), eps=0.0)
    assert torch.allclose(y, torch.tensor([[-1.0, 2.0]]))  # (x - 2) / 1 * 2 + b
    x = torch.tensor([0.0, 1.0])
    expected = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert torch.allclose(gelu(x), expected)
    # the exact GELU (nanoGPT's): x times the standard normal's CDF, Phi(1) = 0.8413447
    assert torch.allclose(gelu(x, approximate="none"), torch.tensor([0.0, 0.8413447])) and gelu(x)[1] != 0.8413447


def test_ffn_with_identity_weights_is_gelu():
    eye = {"w": torch.eye(2), "b": torch.zeros(2)}
    x = torch.tensor([[[-1.0, 2.0]]])
    seen = []
    out = ffn(x, eye, eye, tap=lambda name, t: seen.append(name) or t)
    assert torch.allclose(out, gelu(x)) and seen == ["mlp_act"]


def test_attention_writes_each_rows_cache_at_its_positions_and_sees_only_the_past():
    """Width 2, one head, identity projections: queries = keys = values = x.
    Row 0 writes slots 0 and 1, row 1 writes slot 3 only."""
    config = GPTConfig(vocab_size=8, n_ctx=4, n_embd=2, n_layer=1, n_head=1)
    (kv,) = make_cache(config, 2, 4)
    c_attn = {"w": torch.cat([torch.eye(2)] * 3), "b": torch.zeros(6)}
    c_proj = {"w": torch.eye(2), "b": torch.zeros(2)}
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[5.0, 5.0], [5.0, 5.0]]])
    pos = torch.tensor([[0, 1], [3, 3]])
    for attend in (attend_manual, attend_sdpa):
        k, v = kv
        k.zero_(), v.zero_()
        out = attention(x, c_attn, c_proj, n_head=1, pos=pos, mask=causal_mask(pos, 4), kv=kv, kernels=Kernels(attend=attend))
        assert k[0, 0, :2].tolist() == [[1.0, 0.0], [0.0, 1.0]] and k[0, 0, 2:].abs().sum() == 0
        assert k[1, 0, 3].tolist() == [5.0, 5.0] and k[1, 0, :3].abs().sum() == 0
        assert torch.allclose(out[0, 0], torch.tensor([1.0, 0.0]))  # position 0 sees itself only
        w = torch.softmax(torch.tensor([0.0, 1.0]) / math.sqrt(2), 0)  # position 1: scores q.k / sqrt(2)
        assert torch.allclose(out[0, 1], w[0] * torch.tensor([1.0, 0.0]) + w[1] * torch.tensor([0.0, 1.0]))
        # row 1 at position 3 sees slots 0..3, three of them zero keys and values
        w = torch.softmax(torch.tensor([0.0, 0.0, 0.0, 50.0]) / math.sqrt(2), 0)
        assert torch.allclose(out[1, 0], w[3] * torch.tensor([5.0, 5.0]))


def test_a_window_is_the_caches_first_positions_laid_out_as_the_whole_cache():
    config = GPTConfig(vocab_size=8, n_ctx=8, n_embd=4, n_layer=2, n_head=2)
    assert make_cache(config, 3, 6)[0][0].is_contiguous()  # by default each tensor is a buffer of its own
    cache = make_cache(config, 3, 6, spare=True)
    views = window(cache, 4)
    assert len(views) == 2 and cache_len(cache) == 6 and cache_len(views) == 4
    assert all(t.shape == (3, 2, 4, 2) for kv in views for t in kv)
    views[1][1][2, 1, 3] = 7.0  # a write through the window lands in the cache
    assert cache[1][1][2, 1, 3].tolist() == [7.0, 7.0] and cache[1][1].abs().sum() == 14
    # spare: the same strides, whole or window (the whole cache is not a buffer of its own)
    assert all(w.stride() == c.stride() for wkv, ckv in zip(views, cache) for w, c in zip(wkv, ckv))
    assert not cache[0][0].is_contiguous() and cache[0][0].stride() == (2 * 7 * 2, 7 * 2, 2, 1)


def test_the_model_binds_the_layer_index_of_a_tap():
    seen = []
    tap = at_layer(lambda name, layer, t: seen.append((name, layer)) or t, 3)
    tap("resid", torch.zeros(1))
    assert seen == [("resid", 3)] and at_layer(None, 3) is None


def test_a_sequence_longer_than_the_context_is_one_clear_line():
    """forward over n_ctx tokens runs; one more is refused by name (not the
    position embedding's IndexError), in training's loss too."""
    config = GPTConfig(vocab_size=50, n_ctx=8, n_embd=16, n_layer=1, n_head=2)
    params = init_params(config, seed=0)
    assert forward(params, config, torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 50)
    message = (r"^the sequence is 9 tokens but the model's context holds 8; run it in windows of at most 8 tokens "
               r"\(gpt2fn.evaluation.perplexity does\)$")  # fmt: skip
    with pytest.raises(GPT2FnError, match=message):
        forward(params, config, torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(GPT2FnError, match=message):
        loss_fn(params, config, torch.zeros(2, 10, dtype=torch.long))


@pytest.mark.skipif(not ONEDNN, reason="without oneDNN few_rows is linear, which dequantizes the whole weight")
def test_few_rows_dequantizes_an_int8_weight_a_block_of_rows_at_a_time(monkeypatch):
    """With a block of 100 rows, a 1000-row weight is 10 products; their
    outputs, bit for bit, are those of the whole dequantized weight's product
    (1 to 17 rows, with and without a bias), and within 1e-5 of linear's."""
    import gpt2fn.layers as layers

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (1000, 768), generator=g, dtype=torch.int8)
    scale, b = torch.rand(1000, generator=g), torch.randn(1000, generator=g)
    shapes, original = [], layers.few_rows
    monkeypatch.setattr(layers, "DEQUANT_BLOCK", 100 * 768)
    monkeypatch.setattr(layers, "few_rows", lambda x, w, *rest: shapes.append(tuple(w.shape)) or original(x, w, *rest))
    for rows in (1, 4, 17):
        x = torch.randn(rows, 768, generator=g)
        for bias in (None, b):
            shapes.clear()
            y = original(x, w, bias, scale)
            assert shapes == [(100, 768)] * 10
            whole = original(x, w.float()) * scale
            assert torch.equal(y, whole if bias is None else whole + bias)
            assert (y - linear(x, w, bias, scale)).abs().max() <= 1e-5 * y.abs().max()
