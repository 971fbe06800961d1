"""CUDA: what only a GPU runs. Skipped where there is none (CI has none); a
session with a GPU runs this file first (``.ci/gpu``).

The CPU tests run the CUDA path's Python on CPU tensors
(``test_the_steps_built_for_cuda_run_their_python_on_cpu_tensors``); these
check CUDA itself: cuBLAS and SDPA against the reference, CUDA graphs
(``reduce-overhead``) against eager decoding, one dynamo graph over many
generations whose caches are new static addresses, no host synchronisation in
a decode step, and training on the device.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from gpt2fn import GPTConfig, forward, generate, generate_all, init_params, load_pretrained
from gpt2fn.params import flatten_params
from gpt2fn.quantize import cast_params
from gpt2fn.speculative import self_draft
from gpt2fn.steps import compiled_steps
from gpt2fn.training import TrainConfig, loss_fn, train, trainable

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
              pytest.mark.usefixtures("fresh_dynamo")]
GPU = torch.device("cuda")
LONG = GPTConfig(vocab_size=50257, n_ctx=1024, n_embd=64, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def small(small_ref):
    return load_pretrained(small_ref.directory, device=GPU)


@pytest.fixture(scope="module")
def gpt2(gpt2_ref):
    return load_pretrained(gpt2_ref.directory, device=GPU)


def ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


def ragged(lengths, seed=0) -> list[list[int]]:
    return [ids(n, seed + i)[0].tolist() for i, n in enumerate(lengths)]


@pytest.mark.parametrize("attention", ["manual", "sdpa"])
@pytest.mark.parametrize("which", ["small", "gpt2"])
def test_logits_on_cuda_match_the_reference(which, attention, request):
    """fp32 on the GPU (cuBLAS without TF32, SDPA's kernels) against
    transformers on the CPU: within 1e-4 (the CPU's own parity is 1e-5;
    the GPU sums in other orders)."""
    from gpt2fn.layers import ATTEND, Kernels

    ref, (params, config) = request.getfixturevalue(f"{which}_ref"), request.getfixturevalue(which)
    tokens = ids(64, batch=2)
    with torch.no_grad():
        expected = ref.model(tokens).logits
    got = forward(params, config, tokens.to(GPU), kernels=Kernels(attend=ATTEND[attention]))
    assert got.device.type == "cuda"
    assert (got.cpu() - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("which", ["small", "gpt2"])
def test_cuda_greedy_decoding_equals_the_cpus(which, request):
    """Cached eager decoding on the GPU gives the CPU's greedy tokens."""
    params, config = request.getfixturevalue(which)
    cpu_params = load_pretrained(request.getfixturevalue(f"{which}_ref").directory)[0]
    prompt = ids(7)
    on_gpu = generate_all(params, config, prompt, 40, temperature=0)[0]
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), generate_all(cpu_params, config, prompt, 40, temperature=0)[0])


def test_a_steering_tap_on_cuda_generates_the_cpus_tokens(small, small_ref):
    """generate(..., tap=...) on the GPU: a vector added to a layer's residual
    stream (on the GPU, in the tap) steers as it does on the CPU."""
    params, config = small
    cpu_params = load_pretrained(small_ref.directory)[0]
    v = torch.randn(config.n_embd, generator=torch.Generator().manual_seed(1))

    def steering(vector):
        return lambda name, layer, t: t + vector if (name, layer) == ("resid", 0) else t

    prompt = ragged([4, 9])
    on_gpu = generate_all(params, config, prompt, 24, temperature=0, tap=steering(v.to(GPU)))[0]
    on_cpu = generate_all(cpu_params, config, prompt, 24, temperature=0, tap=steering(v))[0]
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)
    assert not torch.equal(on_cpu, generate_all(cpu_params, config, prompt, 24, temperature=0)[0])


@pytest.mark.parametrize("which", ["small", "gpt2"])
def test_cuda_graphs_give_eagers_greedy_tokens_in_a_ragged_batch(which, request):
    """The compiled decode step (CUDA graphs) against eager, both on the GPU,
    a ragged batch of three prompts; each row is also its prompt alone."""
    params, config = request.getfixturevalue(which)
    prompts = ragged((9, 3, 5))
    eager = generate_all(params, config, prompts, 48, temperature=0)[0]
    compiled = generate_all(params, config, prompts, 48, temperature=0, compile=True)[0]
    assert torch.equal(compiled, eager)
    alone = generate_all(params, config, prompts[1:2], 48, temperature=0, compile=True)[0]
    assert torch.equal(alone[0], eager[1])


def test_a_chain_of_steps_is_one_cuda_graph_with_eagers_tokens(small):
    """``tokens_per_call=4``: each call replays one CUDA graph of four steps;
    a ragged batch, with a stop token, gets the tokens of one step a call."""
    params, config = small
    prompts = ragged((9, 3))
    eager = generate(params, config, prompts, 30, temperature=0, stop_token=50256).rows()
    stream = generate(params, config, prompts, 30, temperature=0, stop_token=50256, compile=True, tokens_per_call=4)
    assert stream.rows() == eager and stream.steps.chained == 4
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_cuda_graphs_with_reduced_weights_give_eagers_greedy_tokens(small, dtype):
    """bf16 and int8 weights, compiled against eager on the GPU (the small
    model's logits are peaked, so rounding does not flip its argmax)."""
    params, config = small
    low = cast_params(params, dtype)
    eager = generate_all(low, config, ids(6), 32, temperature=0)[0]
    assert torch.equal(generate_all(low, config, ids(6), 32, temperature=0, compile=True)[0], eager)


def test_many_generations_run_one_graph():
    """Every generation brings a new cache, marked as static addresses
    without a guard (steps.mark_static): twelve generations of three cache
    lengths (more than dynamo's 8 recompilations; 35, 47 and 170 positions,
    made 128 and 256 long) run one dynamo graph, each with eager's tokens."""
    params = init_params(LONG, seed=0, device=GPU)
    for i in range(12):
        prompt = ids((5, 17, 140)[i % 3], seed=i)
        compiled = generate_all(params, LONG, prompt, 30, temperature=0, compile=True)[0]
        assert torch.equal(compiled, generate_all(params, LONG, prompt, 30, temperature=0)[0]), i
    assert counters["stats"]["unique_graphs"] == 1


def syncs(run) -> int:
    """How many synchronising CUDA calls ``run()`` makes (torch's sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_a_compiled_decode_step_never_waits_for_the_gpu():
    """Past the first calls (compiling, recording the CUDA graph), a decode
    call queues its work and returns: the position is a tensor, the
    randomness comes in as ``noise``, and the token stays on the device."""
    params = init_params(LONG, seed=0, device=GPU)
    for sampling, noise in ((dict(temperature=0, top_k=0, top_p=1.0), None),
                            (dict(temperature=0.8, top_k=40, top_p=0.9), torch.rand(2, 40, device=GPU))):  # fmt: skip
        steps = compiled_steps(LONG, GPU, 2, **sampling)
        state = steps.make_state(params, 2, 64)
        with torch.inference_mode():
            token = steps.prefill(params, ids(4, batch=2).to(GPU), torch.arange(4, device=GPU).repeat(2, 1), state, noise)
        pos = torch.full((2, 1), 4, device=GPU)

        def decode(n):
            nonlocal token, pos
            for _ in range(n):
                with torch.inference_mode():
                    token = steps.decode(params, token[:, None], pos, state, noise)
                    pos = pos + 1

        decode(3)  # compiles, warms up and records
        assert syncs(lambda: decode(20)) == 0


@pytest.mark.parametrize("stop_token", [None, 50256])
def test_the_decode_loop_syncs_once_a_token_for_its_stop_check_only(small, stop_token):
    """The loop over those steps: no host round trip per token without a
    stop token, one (``done.all()``) with it."""
    params, config = small
    stream = iter(generate(params, config, ids(5), 40, temperature=0, compile=True, stop_token=stop_token))
    for _ in range(5):  # prefill, compiling, recording
        next(stream)
    n = syncs(lambda: [next(stream) for _ in range(20)])
    assert n == (0 if stop_token is None else 20)


def test_compiled_speculative_decoding_on_cuda_keeps_the_targets_greedy_tokens(small):
    """The draft's chain of 4 one CUDA graph, the verify step another."""
    params, config = small
    prompt = ids(8)
    plain = generate_all(params, config, prompt, 40, temperature=0)[0]
    for compile in (False, True):
        out, stats = generate_all(params, config, prompt, 40, temperature=0, compile=compile,
                                  draft=(self_draft(params, "int8"), config), draft_tokens=4)  # fmt: skip
        assert torch.equal(out, plain) and stats.target_passes < 40


@pytest.mark.parametrize("min_p, rules", [(0.0, {}), (0.2, {}), (0.0, dict(repetition_penalty=1.3, no_repeat_ngram_size=2))])
def test_sampling_on_cuda_is_reproducible_and_compiled_draws_what_eager_draws(small, min_p, rules):
    params, config = small
    runs = [generate_all(params, config, ids(5), 30, temperature=0.9, top_k=50, top_p=0.95, min_p=min_p, compile=compile,
                         generator=torch.Generator(GPU).manual_seed(3), **rules)[0]
            for compile in (False, False, True)]  # fmt: skip
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("per_call", [1, 4])
def test_rules_on_the_text_so_far_on_cuda_give_the_cpus_greedy_tokens_eager_and_compiled(small, small_ref, per_call):
    """A repetition penalty and an n-gram ban, the text so far on the GPU (a
    static address of the CUDA graphs, written in place); a second
    generation of another length records no new graph."""
    params, config = small
    rules = dict(repetition_penalty=1.3, no_repeat_ngram_size=2)
    cpu_params = load_pretrained(small_ref.directory)[0]
    cpu = generate_all(cpu_params, config, ids(6), 40, temperature=0, **rules)[0]
    assert not torch.equal(cpu, generate_all(cpu_params, config, ids(6), 40, temperature=0)[0])
    for compile in (False, True):
        out = generate_all(params, config, ids(6), 40, temperature=0, compile=compile, tokens_per_call=per_call, **rules)[0]
        assert torch.equal(out.cpu(), cpu), compile
    graphs = counters["stats"]["unique_graphs"]
    generate_all(params, config, ids(9, seed=1), 60, temperature=0, compile=True, tokens_per_call=per_call, **rules)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("per_call", [1, 4])
def test_min_new_tokens_on_cuda_gives_the_cpus_rows_eager_and_compiled(small, small_ref, per_call):
    """min_new_tokens, its count of new tokens on the GPU (a static address
    of the CUDA graphs, added to in place): the CPU's greedy rows, which
    end at the stop token past the 6 held (tests/test_compile.py's case);
    a second generation records no new graph."""
    params, config = small
    prompts = [ids(9, seed=1)[0].tolist(), ids(4, seed=2)[0].tolist()]
    cpu_params = load_pretrained(small_ref.directory)[0]
    stop = generate_all(cpu_params, config, prompts[:1], 2, temperature=0)[0][0, 1].item()
    rule = dict(min_new_tokens=6, stop_token=stop, temperature=0)
    cpu = generate(cpu_params, config, prompts, 30, **rule).rows()
    assert 6 < len(cpu[0]) < 30 and cpu[0][-1] == stop
    for compile in (False, True):
        assert generate(params, config, prompts, 30, compile=compile, tokens_per_call=per_call, **rule).rows() == cpu
    graphs = counters["stats"]["unique_graphs"]
    generate(params, config, prompts[::-1], 50, compile=True, tokens_per_call=per_call, **rule).rows()
    assert counters["stats"]["unique_graphs"] == graphs


def test_speculative_rounds_with_rules_on_cuda_give_the_cpus_greedy_rows(small, small_ref):
    """The four rules on the text so far in speculative rounds on the GPU
    (the token buffer and each row's start static addresses of the CUDA
    graphs): the CPU's plain greedy rows with them, eager and compiled."""
    params, config = small
    prompts = [ids(9, seed=1)[0].tolist(), ids(4, seed=2)[0].tolist()]
    cpu_params = load_pretrained(small_ref.directory)[0]
    stop = generate_all(cpu_params, config, prompts[:1], 2, temperature=0)[0][0, 1].item()
    unruled = generate(cpu_params, config, prompts, 30, temperature=0).rows()
    rules = dict(repetition_penalty=1.2, no_repeat_ngram_size=3, min_new_tokens=6, stop_token=stop, temperature=0,
                 bad_words_ids=[[unruled[0][3]], unruled[1][4:6]])  # fmt: skip
    cpu = generate(cpu_params, config, prompts, 30, **rules).rows()
    for compile in (False, True):
        draft = self_draft(params, "int8"), config
        assert generate(params, config, prompts, 30, draft=draft, compile=compile, **rules).rows() == cpu, compile


def test_prompt_lookup_on_cuda_gives_the_cpus_greedy_rows(small, small_ref):
    """Prompt lookup on the GPU (the lookup's tensor operations on the
    device, the verify step a CUDA graph), eager and compiled, with and
    without rules: the CPU's plain greedy rows; the prompts repeat
    themselves, so drafted tokens are accepted."""
    from gpt2fn.speculative import PromptLookup

    params, config = small
    prompts = [ids(9, seed=1)[0].tolist() * 2, ids(4, seed=2)[0].tolist() * 3]
    cpu_params = load_pretrained(small_ref.directory)[0]
    for rules in (dict(), dict(repetition_penalty=1.2, no_repeat_ngram_size=3)):
        cpu = generate(cpu_params, config, prompts, 40, temperature=0, **rules).rows()
        for compile in (False, True):
            stream = generate(params, config, prompts, 40, temperature=0, draft=PromptLookup(), compile=compile, **rules)
            assert stream.rows() == cpu, (rules, compile)
            assert stream.stats.accepted > 0


def test_loss_and_gradients_on_cuda_match_the_cpus():
    """fp32, no TF32: the loss within 1e-5, each gradient within 1e-4 of its largest entry."""
    config = GPTConfig(vocab_size=50257, n_ctx=64, n_embd=32, n_layer=2, n_head=2)
    windows = ids(65, batch=4)
    results = []
    for device in (torch.device("cpu"), GPU):
        params = trainable(init_params(config, seed=1), device)
        loss = loss_fn(params, config, windows.to(device))
        loss.backward()
        results.append((loss.item(), {k: t.grad.cpu() for k, t in flatten_params(params).items()}))
    (cpu_loss, cpu), (gpu_loss, gpu) = results
    assert abs(cpu_loss - gpu_loss) <= 1e-5
    for name in cpu:
        assert (cpu[name] - gpu[name]).abs().max() <= 1e-4 * cpu[name].abs().max(), name


def test_training_on_cuda_learns_and_deterministic_runs_repeat_bit_for_bit():
    """Training's CUDA defaults (bf16 autocast, TF32) lower the loss; with
    ``deterministic=True`` two runs end on the same bits."""
    config = GPTConfig(vocab_size=50257, n_ctx=32, n_embd=32, n_layer=2, n_head=2)
    tokens = torch.randint(0, 200, (4000,), generator=torch.Generator().manual_seed(0))
    tc = TrainConfig(batch_size=8, block_size=32, max_steps=40, warmup_steps=4, eval_interval=40, lr=3e-3)
    _, history = train(init_params(config, seed=2, device=GPU), config, tc, tokens)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    exact = dataclasses.replace(tc, max_steps=6, eval_interval=6, deterministic=True)
    a, b = (flatten_params(train(init_params(config, seed=2, device=GPU), config, exact, tokens)[0]) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("compile", [False, True])
def test_beam_search_on_cuda_finds_the_cpus_beams(small, small_ref, compile):
    """Eager, and compiled (CUDA graphs over a cache whose rows are copied in place between replays)."""
    from gpt2fn.beam import beam_search

    params, config = small
    cpu_params = load_pretrained(small_ref.directory)[0]
    prompts = ragged((3, 8))
    on_gpu = beam_search(params, config, prompts, 24, 4, num_return_sequences=2, no_repeat_ngram_size=2, compile=compile)
    on_cpu = beam_search(cpu_params, config, prompts, 24, 4, num_return_sequences=2, no_repeat_ngram_size=2)
    assert [[b.tokens for b in row] for row in on_gpu] == [[b.tokens for b in row] for row in on_cpu]
    assert [b.score for row in on_gpu for b in row] == pytest.approx([b.score for row in on_cpu for b in row], abs=1e-4)
