"""The research toolkit: taps observe without changing anything, and each
intervention does exactly what it claims."""

from __future__ import annotations

import pytest
import torch

from gpt2fn import GPT2FnError, forward, load_pretrained
from gpt2fn.interp import MANUAL, ablate_head, logit_lens, patch, run_with_cache, zero_head_tap

TOL = 1e-5


@pytest.fixture(scope="module")
def model(small_ref):
    return load_pretrained(small_ref.directory)


def tokens(n=12, seed=0, batch=2):
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_recording_changes_nothing_and_records_everything(model):
    params, config = model
    x = tokens()
    logits, cache = run_with_cache(params, config, x)
    assert torch.equal(logits, forward(params, config, x, kernels=MANUAL))
    assert (logits - forward(params, config, x)).abs().max() <= TOL  # the default (SDPA) path
    B, T, D, H = 2, 12, config.n_embd, config.n_head
    for layer in range(config.n_layer):
        assert cache[("resid", layer)].shape == (B, T, D)
        assert cache[("attn_heads", layer)].shape == (B, T, H, D // H)
        assert cache[("attn_out", layer)].shape == (B, T, D)
        assert cache[("mlp_act", layer)].shape == (B, T, 4 * D)
        probs = cache[("attn_probs", layer)]
        assert probs.shape == (B, H, T, T)
        assert torch.allclose(probs.sum(-1), torch.ones(B, H, T))
        assert (probs.triu(diagonal=1) == 0).all()  # causal: nothing from the future


def test_logit_lens_on_the_last_layer_is_the_model(model):
    params, config = model
    logits, cache = run_with_cache(params, config, tokens())
    last = cache[("resid", config.n_layer - 1)]
    assert torch.equal(logit_lens(params, config, last), logits)
    early = logit_lens(params, config, cache[("resid", 0)])
    assert early.shape == logits.shape and not torch.allclose(early, logits)


@pytest.mark.parametrize("layer, head", [(0, 1), (1, 3)])
def test_ablating_a_head_removes_exactly_its_contribution(model, layer, head):
    params, config = model
    x = tokens(seed=1)
    _, clean = run_with_cache(params, config, x)
    _, ablated = run_with_cache(ablate_head(params, layer, head, config.n_head), config, x)
    hd = config.n_embd // config.n_head
    w = params["blocks"][layer]["attn"]["c_proj"]["w"][:, head * hd : (head + 1) * hd]
    contribution = clean[("attn_heads", layer)][:, :, head] @ w.T  # [B, T, D]
    delta = clean[("attn_out", layer)] - ablated[("attn_out", layer)]
    assert (delta - contribution).abs().max() <= TOL
    for earlier in range(layer):  # layers before it are untouched
        assert torch.equal(clean[("resid", earlier)], ablated[("resid", earlier)])
    # the params edit and the replacement function are the same intervention
    by_tap, _ = run_with_cache(params, config, x, tap=zero_head_tap(layer, head))
    assert (by_tap - forward(ablate_head(params, layer, head, config.n_head), config, x, kernels=MANUAL)).abs().max() <= TOL
    assert params["blocks"][layer]["attn"]["c_proj"]["w"][:, head * hd].abs().sum() > 0  # the original is intact


def test_patching_a_whole_layer_residual_reproduces_the_source_run(model):
    params, config = model
    source, target = tokens(seed=2), tokens(seed=3)
    source_logits, source_cache = run_with_cache(params, config, source)
    for layer in range(config.n_layer):
        patched = forward(params, config, target, tap=patch("resid", layer, source_cache[("resid", layer)]))
        assert (patched - source_logits).abs().max() <= TOL
    # patching one position only changes that position and the ones after it
    one = source_cache[("resid", 0)].clone()
    clean_target, target_cache = run_with_cache(params, config, target)
    mixed = target_cache[("resid", 0)].clone()
    mixed[:, 5] = one[:, 5]
    out = forward(params, config, target, tap=patch("resid", 0, mixed), kernels=MANUAL)
    assert torch.equal(out[:, :5], clean_target[:, :5]) and not torch.allclose(out[:, 5:], clean_target[:, 5:])


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_visualize_writes_the_four_kinds_of_picture(small_ref, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    from gpt2fn import encode, get_tokenizer

    prompt = "ROMEO: But soft, what light"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "visualize.py"), "--model", str(small_ref.directory),
                          "--prompt", prompt, "--out", str(tmp_path)], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    n = len(encode(get_tokenizer(), prompt))
    side = round(100 * 2 * max(3.0, 0.25 * n))  # 4 heads: a 2 x 2 grid of max(3, T/4)-inch panels at 100 dpi
    for layer in range(2):
        path = tmp_path / f"attention_layer{layer}.png"
        assert png_size(path) == (side + 100, side) and path.stat().st_size > 20_000  # + an inch for the colour bar
    assert png_size(tmp_path / "position_embedding.png") == (800, 450)
    assert png_size(tmp_path / "weight_blocks_0_attn_c_attn_w.png") == (800, 1600)  # [192, 64]: height capped at 2x
    assert (tmp_path / "weight_blocks_0_attn_c_attn_w.png").stat().st_size > 20_000
    assert png_size(tmp_path / "surprise.png") == (round(100 * max(6.0, 0.4 * n)), 450)  # a bar per token but the first
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "visualize.py"), "--model", str(small_ref.directory),
                          "--prompt", "Hi", "--out", str(tmp_path / "one")], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0 and len(encode(get_tokenizer(), "Hi")) == 1  # one token: nothing predicted, no bars
    assert (tmp_path / "one" / "position_embedding.png").exists() and not (tmp_path / "one" / "surprise.png").exists()


def test_interventions_example_runs_and_patching_reproduces_the_source(small_ref):
    import subprocess
    import sys

    from conftest import ROOT

    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "interventions.py"), "--model", str(small_ref.directory),
                          "--layer", "1"], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "1. Logit lens" in run.stdout and "head 3:" in run.stdout
    assert "max |logit difference| to the source run 0.0e+00" in run.stdout
    # 4. steering: the greedy continuation with the two prompts' mean layer-1 residual difference added
    from gpt2fn import encode, get_tokenizer
    from gpt2fn.generation import generate_all

    params, config = load_pretrained(small_ref.directory)
    tok = get_tokenizer()
    ids, src = (torch.tensor([encode(tok, text)]) for text in ("ROMEO: O, she doth teach the torches to burn",
                                                                "ROMEO: O, he doth teach the candles to weep"))  # fmt: skip
    direction = (run_with_cache(params, config, src)[1][("resid", 1)] - run_with_cache(params, config, ids)[1][("resid", 1)]).mean(1)[0]
    steered = generate_all(params, config, ids, 24, temperature=0,
                           tap=lambda name, i, t: t + direction if (name, i) == ("resid", 1) else t)[0][0]  # fmt: skip
    assert f"   steered: {tok.decode(steered.tolist())!r}\n" in run.stdout


def test_interventions_that_would_fire_nowhere_are_refused(model):
    """A typo in a tap point's name, or a layer or head the model lacks, would
    silently change nothing: each is one clear line instead."""
    from gpt2fn import GPT2FnError

    params, config = model
    with pytest.raises(GPT2FnError, match=r"^no tap point 'resdi'; the points are attn_probs, attn_heads, attn_out, "
                                          r"mlp_act, resid$"):
        patch("resdi", 1, torch.zeros(1))
    with pytest.raises(GPT2FnError, match=r"^layer must be an integer >= 0, got -1$"):
        patch("resid", -1, torch.zeros(1))
    for layer, head in ((0, 4), (0, -1), (2, 0)):  # 2 layers, 4 heads
        with pytest.raises(GPT2FnError, match=rf"^layer {layer}, head {head} is not in the model: its layers are 0 to 1, "
                                              r"its heads 0 to 3$"):
            ablate_head(params, layer, head, config.n_head)
    with pytest.raises(GPT2FnError, match=r"^head must be an integer >= 0, got -1$"):
        zero_head_tap(0, -1)


def test_a_tap_steers_generation_as_it_steers_the_recomputed_sequence(model):
    """generate(..., tap=...): a vector added to one layer's residual stream
    at every position gives, greedy, the tokens of recomputing the whole
    sequence with that tap at every step; a chain of steps (tokens_per_call)
    runs the tap too, and steering changed the text."""
    from gpt2fn.generation import generate_all

    params, config = model
    prompt, n = tokens(6, seed=3), 10
    v = torch.randn(config.n_embd, generator=torch.Generator().manual_seed(1))

    def steer(name, layer, t):
        return t + v if (name, layer) == ("resid", 0) else t

    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, forward(params, config, seq, tap=steer)[:, -1].argmax(-1, keepdim=True)], 1)
    steered = generate_all(params, config, prompt, n, temperature=0, tap=steer)[0]
    assert torch.equal(steered, seq[:, 6:])
    assert torch.equal(generate_all(params, config, prompt, n, temperature=0, tap=steer, tokens_per_call=3)[0], steered)
    assert not torch.equal(generate_all(params, config, prompt, n, temperature=0)[0], steered)


def test_a_head_zeroed_by_a_tap_while_generating_is_the_head_ablated_in_the_params(model):
    from gpt2fn.generation import generate_all

    params, config = model
    prompt = tokens(5, seed=4)
    by_params = generate_all(ablate_head(params, 1, 2, config.n_head), config, prompt, 12, temperature=0)[0]
    assert torch.equal(generate_all(params, config, prompt, 12, temperature=0, tap=zero_head_tap(1, 2))[0], by_params)


def test_a_tap_sees_the_prompt_then_each_new_token(model):
    """Recording while generating: each layer's point once a call, the
    prompt's [B, T, ...] first, then [B, 1, ...] per new token; attention
    over the cache's first positions (a multiple of 16, or all of them),
    nothing on the positions not yet written. Taps run in the eager cached steps only."""
    from gpt2fn.generation import generate, generate_all

    params, config = model
    prompt, n = tokens(5, seed=5), 20
    seen = []

    def record(name, layer, t):
        seen.append((name, layer, t.clone()))
        return t

    generate_all(params, config, prompt, n, temperature=0, attention="manual", tap=record)
    resid = [t for name, layer, t in seen if (name, layer) == ("resid", 1)]
    assert [tuple(t.shape) for t in resid] == [(2, 5, config.n_embd)] + [(2, 1, config.n_embd)] * (n - 1)
    probs = [t for name, layer, t in seen if (name, layer) == ("attn_probs", 0)]
    for i, p in enumerate(probs[1:]):  # the token at position 5 + i attends over positions 0 .. 5 + i
        assert p.shape == (2, config.n_head, 1, min(5 + n, -(-(6 + i) // 16) * 16))  # the cache: 5 + n positions
        assert torch.allclose(p.sum(-1), torch.ones(2, config.n_head, 1))
        assert (p[..., 6 + i :] == 0).all() and (p[..., : 6 + i] > 0).all()
    for kwargs, what in [(dict(compile=True), "compile"), (dict(use_cache=False), "use_cache=False")]:
        with pytest.raises(GPT2FnError, match=f"a tap runs in the eager cached steps: drop {what} to generate with it"):
            generate(params, config, prompt, 3, tap=record, **kwargs)
    with pytest.raises(GPT2FnError, match="a tap runs in the eager cached steps, not in speculative rounds"):
        generate(params, config, prompt, 3, tap=record, draft=(params, config))
