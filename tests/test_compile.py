"""The compiled decode step: one graph for every step and prompt, the same
tokens and logits as eager, and the same sampling distribution."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

import gpt2fn.layers
from gpt2fn import GPTConfig, generate, generate_all, init_params, load_pretrained, make_cache
from gpt2fn.cache import cache_len
from gpt2fn.generation import Stream
from gpt2fn.layers import (
    MATVEC_FP32_MAX_ROWS, MATVEC_MAX_ROWS, Kernels, attend_manual, block, few_rows, int8_sums, linear, matvec, matvec_groups,
    matvec_max_rows,
)
from gpt2fn.measure import decode_step_time
from gpt2fn.model import hidden, logits
from gpt2fn.quantize import cast_params, quantize_rows
from gpt2fn.sampling import choose_token, filtered_probs, noise_width, uniform_noise
from gpt2fn.steps import (
    REGION_MIN_WIDTH, REGIONS, compiled_steps, decode_block, decode_kernels, decode_options, graph_cache_len, mark_static,
    window_len,
)  # fmt: skip

from conftest import run_cached

LONG = GPTConfig(vocab_size=50257, n_ctx=1024, n_embd=32, n_layer=2, n_head=2)
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def prompt(n, seed=0):
    return torch.randint(0, 50257, (1, n), generator=torch.Generator().manual_seed(seed))


def test_one_graph_for_every_step_and_every_prompt_length():
    params = init_params(LONG, seed=0)
    first, stats = generate_all(params, LONG, prompt(5), 600, temperature=0, compile=True)
    assert stats.n_new == 600 and stats.decode_tokens == 598 and stats.compile_s > 0
    assert counters["stats"]["unique_graphs"] == 1
    # another prompt length, another cache length, another generation: no new graph
    generate_all(params, LONG, prompt(37, seed=1), 300, temperature=0, compile=True)
    generate_all(params, LONG, prompt(2, seed=2), 20, temperature=0, compile=True)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(first, generate_all(params, LONG, prompt(5), 600, temperature=0)[0])


def test_the_whole_cache_and_its_windows_run_one_graph():
    """A window (the cache's first n positions) is laid out as the whole
    cache, so a compiled step handed either runs the same graph, and the same
    tokens: the keys past the window are masked out anyway."""
    params = init_params(LONG, seed=0)
    steps = compiled_steps(LONG, torch.device("cpu"), 1, temperature=0, top_k=0, top_p=1.0)
    outs = []
    for n in (None, 30, 48, 64):  # positions up to 29
        state, tokens = steps.make_state(params, 1, 64), []
        with torch.inference_mode():
            tokens.append(steps.prefill(params, prompt(9), torch.arange(9)[None], state, None))
            for p in range(9, 30):
                view = state if n is None else steps.window(state, n)
                tokens.append(steps.decode(params, tokens[-1][:, None], torch.tensor([[p]]), view, None))
        outs.append(torch.cat(tokens).tolist())
    assert counters["stats"]["unique_graphs"] == 1
    assert outs[1:] == outs[:1] * 3


def test_a_new_cache_marked_static_as_on_cuda_runs_the_same_graph():
    """On CUDA the cache's tensors are marked static addresses (read in place
    by the CUDA graph), and every generation brings a new cache. Marked
    without a guard, a new cache runs the same graph (CUDA re-records it);
    with one (torch's old default), each compiled the step again."""
    params = init_params(LONG, seed=0)
    steps = compiled_steps(LONG, torch.device("cpu"), 1, temperature=0, top_k=0, top_p=1.0)
    tokens = []
    for _ in range(3):
        state = steps.make_state(params, 1, 64)
        for t in (t for kv in state for t in kv):
            mark_static(t)
        with torch.inference_mode():
            first = steps.prefill(params, prompt(9), torch.arange(9)[None], state, None)
            tokens.append(steps.decode(params, first[:, None], torch.tensor([[9]]), state, None).item())
    assert counters["stats"]["unique_graphs"] == 1
    assert tokens == tokens[:1] * 3


def test_the_steps_built_for_cuda_run_their_python_on_cpu_tensors():
    """No GPU here: the steps made for a CUDA device (the library's products,
    blocks inlined, the whole cache instead of windows, ``reduce-overhead``,
    outputs cloned) run on CPU params, where inductor leaves out the CUDA
    graphs. A ragged batch then gets eager's tokens, with one graph over two
    generations; what it cannot check is CUDA itself."""
    params, prompts = init_params(LONG, seed=0), [[1, 2, 3, 4, 5], [7, 8]]
    steps = compiled_steps(LONG, torch.device("cuda"), 2, temperature=0, top_k=0, top_p=1.0)
    assert steps.window is None and steps.chained == 1
    eager = generate_all(params, LONG, prompts, 20, temperature=0)[0]
    for n in (20, 140):  # caches of 25 and 145 positions, made 128 and 256 long
        assert torch.equal(Stream(params, steps, prompts, [n, n], None, lambda batch, decode: None).tokens()[:, :20], eager)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 1  # compiled for CUDA graphs, left out for CPU tensors


def test_int8_sums_compute_linear_and_the_steps_for_a_gpu_take_them_for_int8_weights():
    """A compiled step for a GPU takes the library's products (cuBLAS), but
    for int8 weights in a batch of up to MATVEC_MAX_ROWS rows int8_sums,
    which upcasts each weight inside the sums instead of converting the whole
    matrix first. Compiled (on CPU tensors), it is linear's function: int8
    weights within fp32 rounding, with and without a bias, 1 and 3 rows;
    other weights handed to linear as they are. Steps built for CUDA, on
    int8 params on CPU tensors, give eager's tokens."""
    gpu = torch.device("cuda")
    assert [decode_kernels(gpu, b, "auto").linear for b in (1, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 1)] == [int8_sums, int8_sums, linear]
    sums = torch.compile(int8_sums, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    w, scale = quantize_rows(torch.randn(200, 96, generator=g))
    w32, b = torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    with torch.inference_mode():
        for rows in (1, 3):
            x = torch.randn(rows, 1, 96, generator=g)
            for bias in (None, b):
                torch.testing.assert_close(sums(x, w, bias, scale), linear(x, w, bias, scale), rtol=1e-5, atol=1e-5)
            assert torch.equal(sums(x, w32, b), linear(x, w32, b))
    params, prompts = cast_params(init_params(LONG, seed=0), "int8"), [[1, 2, 3, 4, 5], [7, 8]]
    steps = compiled_steps(LONG, gpu, 2, temperature=0, top_k=0, top_p=1.0)
    eager = generate_all(params, LONG, prompts, 20, temperature=0)[0]
    assert torch.equal(Stream(params, steps, prompts, [20, 20], None, lambda batch, decode: None).tokens(), eager)


def test_a_cache_for_cuda_graphs_is_a_multiple_of_128_positions_within_the_context():
    """CUDA graph trees record a graph per cache length: a compiled step for
    CUDA makes its cache graph_cache_len long (its CPU twin the length asked)."""
    assert [graph_cache_len(n, 1024) for n in (1, 25, 128, 129, 1000, 1024)] == [128, 128, 128, 256, 1024, 1024]
    assert graph_cache_len(100, 120) == 120 and graph_cache_len(130, 120) == 130  # never past n_ctx, never short
    params = init_params(LONG, seed=0)
    for device, lengths in (("cuda", [128, 256, 1024]), ("cpu", [25, 145, 1000])):
        steps = compiled_steps(LONG, torch.device(device), 1, temperature=0, top_k=0, top_p=1.0)
        assert [cache_len(steps.make_state(params, 1, n)) for n in (25, 145, 1000)] == lengths


def test_a_chain_built_for_cuda_is_one_graph_and_runs_its_python_on_cpu_tensors():
    """On CUDA a chain of ``tokens_per_call`` steps is one graph (one CUDA
    graph replay a call), its steps inlined: on CPU tensors, a ragged batch
    gets eager's tokens with a stop token at no multiple of the chain, one
    graph over two generations, its CUDA graphs skipped."""
    params, prompts = init_params(LONG, seed=0), [[1, 2, 3, 4, 5], [7, 8]]
    steps = compiled_steps(LONG, torch.device("cuda"), 2, tokens_per_call=4, temperature=0, top_k=0, top_p=1.0)
    assert steps.window is None and steps.chained == 4
    eager = generate_all(params, LONG, prompts, 22, temperature=0)[0]
    for _ in range(2):
        assert torch.equal(Stream(params, steps, prompts, [22, 22], None, lambda batch, decode: None).tokens(), eager)
    stop = int(eager[0, 9])
    stopped = Stream(params, steps, prompts, [22, 22], stop, lambda batch, decode: None).rows()
    assert stopped == [row[: row.index(stop) + 1] if stop in row else row for row in eager.tolist()]
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 1


def test_a_token_cut_from_rows_of_any_length_runs_the_same_graph():
    """Dynamo guards on strides, a size-1 dim's too: a token cut out of a row
    (``seq[:, -1:]``, stride = the row's length) must not pick the graph.
    (The benchmark's per-length sweep hit dynamo's limit of 8 graphs so.)"""
    params = init_params(LONG, seed=0)
    steps = compiled_steps(LONG, torch.device("cpu"), 1, temperature=0, top_k=0, top_p=1.0)
    for n in (8, 16, 33, 64, 100):
        decode_step_time(params, LONG, steps, n, repeats=1, cache_len=128)  # the token: tokens[:, -1:].clone()
    rows = torch.arange(64).view(2, 32)  # [2, 32]: positions cut from it have stride 32, stride 1 for the fresh ones
    state = steps.make_state(params, 2, 64)
    with torch.inference_mode():
        cut = steps.decode(params, rows[:, 31:], torch.full((2, 32), 31)[:, -1:], state, None)
        fresh = steps.decode(params, rows[:, 31:].clone(), torch.full((2, 1), 31), state, None)
    assert torch.equal(cut, fresh)
    assert counters["stats"]["unique_graphs"] == 2  # batch 1 and batch 2: nothing from the strides


def decode_logits(params, token, pos, cache, *, config, kernels, run_block=block):
    x = hidden(params, config, token, pos, cache, kernels=kernels, run_block=run_block)[:, -1]
    return logits(params, config, x, kernels.linear)


@pytest.mark.parametrize("which", ["small", "gpt2"])
def test_compiled_decode_matches_eager_logits_and_greedy_tokens(which, request):
    """The compiled CPU decode (matvec products, spelled-out attention, blocks
    as decode_block runs them: a compile region on the 768-wide gpt2 shape,
    inlined on the small one), handed the windows of its cache that the
    decode loop hands it, against the eager library kernels on the whole
    cache, logits step by step."""
    params, config = load_pretrained(request.getfixturevalue(f"{which}_ref").directory)
    T, steps = 6, 24
    fast_kernels = Kernels(matvec, attend_manual)
    step = functools.partial(decode_logits, config=config, kernels=fast_kernels,
                             run_block=decode_block(torch.device("cpu"), fast_kernels, config))  # fmt: skip
    compiled = torch.compile(step, fullgraph=True, dynamic=False, options=decode_options())
    windows = compiled_steps(config, torch.device("cpu"), 1, temperature=0, top_k=0, top_p=1.0).window
    caches = [make_cache(config, 1, T + steps), make_cache(config, 1, T + steps, spare=True)]
    tokens = prompt(T, seed=3)
    with torch.inference_mode():
        for cache in caches:
            run_cached(params, config, tokens, cache, 0)
        token = tokens[:, -1:].clone(memory_format=torch.contiguous_format)  # strides as every later token
        for t in range(T, T + steps):
            pos = torch.tensor([[t]])
            eager = decode_logits(params, token, pos, caches[0], config=config, kernels=Kernels())
            fast = compiled(params, token, pos, windows(caches[1], window_len(t + 1, T + steps)))  # 16, then 30: all
            assert (eager - fast).abs().max().item() <= 1e-4, f"step {t}"
            assert torch.equal(eager.argmax(-1), fast.argmax(-1))
            token = eager.argmax(-1)[:, None]
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("groups", [(2, 2), (4, 8)])  # the AMD and the Intel rule (gpt2fn.device)
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.float32])
def test_compiled_matvec_sums_each_row_as_one_sum_does(dtype, groups, monkeypatch):
    """matvec sums each row of x, and each group of w's rows, on its own (an
    accumulator each) for speed: every output is the one a single sum over
    all of w's rows, for that row of x alone, computes, bit for bit. Row
    counts of w that do and do not divide into the groups (the last group
    shorter), fewer rows than groups, the LM head's groups; 1 and 3 rows
    of x (a batch; fp32 and bf16 weights too, up to MATVEC_FP32_MAX_ROWS
    and MATVEC_BF16_MAX_ROWS, past which they are few_rows's product)."""
    torch._dynamo.reset()  # static shapes: a graph for each
    monkeypatch.setattr(gpt2fn.layers, "MATVEC_GROUPS", groups[0])
    monkeypatch.setattr(gpt2fn.layers, "MATVEC_HEAD_GROUPS", groups[1])
    monkeypatch.setattr(gpt2fn.layers, "MATVEC_BF16_MAX_ROWS", 4)  # the rule on a CPU with native bf16 is 8 (gpt2fn.device)
    one_sum = lambda x, w: (x.float()[..., None, :] * w.float()).sum(-1)  # one row of x, all of w's rows
    grouped = torch.compile(lambda x, w: matvec(x, w), fullgraph=True, dynamic=False, options=decode_options())
    single = torch.compile(one_sum, fullgraph=True, dynamic=False, options=decode_options())
    assert (matvec_groups(2304), matvec_groups(16383), matvec_groups(16385)) == (groups[0], groups[0], groups[1])
    cpu = torch.device("cpu")  # the compiled CPU decode step takes matvec up to MATVEC_MAX_ROWS rows
    assert [decode_kernels(cpu, batch, "auto").linear for batch in (1, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 1)] == [matvec, matvec, few_rows]
    g = torch.Generator().manual_seed(0)
    assert MATVEC_FP32_MAX_ROWS >= 3
    for rows, batch in ((2304, 1), (2303, 1), (3, 1), (16385, 1), (2303, 3)):
        w = torch.randint(-127, 128, (rows, 96), generator=g).to(dtype)
        x = torch.randn(batch, 1, 96, generator=g).to(torch.float32 if dtype == torch.int8 else dtype)
        with torch.inference_mode():
            out = grouped(x, w)
            assert out.shape == (batch, 1, rows)
            for r in range(batch):
                assert torch.equal(out[r], single(x[r : r + 1], w)[0].to(x.dtype)), (rows, batch, r)
            rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 x rounds its output
            torch.testing.assert_close(out.float(), linear(x.float(), w.float()), rtol=rtol, atol=1e-3)
    assert [matvec_max_rows(d) for d in (torch.float32, torch.bfloat16, torch.int8)] == [MATVEC_FP32_MAX_ROWS, 4, MATVEC_MAX_ROWS]
    most = matvec_max_rows(dtype)
    if most < MATVEC_MAX_ROWS:  # past them, a library product (few_rows)
        w = torch.randn(2303, 96, generator=g).to(dtype)  # sums that round, so that the order shows
        x = torch.randn(most + 1, 1, 96, generator=g).to(dtype)
        calls = []  # which row counts matvec hands on (its route, whatever the sums round to)
        monkeypatch.setattr(gpt2fn.layers, "few_rows", lambda x, *rest: calls.append(len(x)) or few_rows(x, *rest))
        with torch.inference_mode():
            assert torch.equal(grouped(x, w), few_rows(x, w))
            matvec(x[:most], w), matvec(x, w)
        assert calls == [most + 1, most + 1]
    torch._dynamo.reset()


@pytest.mark.skipif(not REGIONS, reason="this torch inlines every block (regions that write their inputs need 2.12)")
def test_compiled_cpu_step_traces_one_block_region_and_calls_it_for_every_layer():
    config = GPTConfig(vocab_size=50257, n_ctx=64, n_embd=REGION_MIN_WIDTH, n_layer=3, n_head=12)
    params, cpu = init_params(config, seed=0), torch.device("cpu")
    kernels = decode_kernels(cpu, 1, "auto")
    assert decode_block(cpu, kernels, GPTConfig(n_embd=REGION_MIN_WIDTH // 2, n_head=6)) is block  # too narrow to pay
    graphs = []

    def record(gm, example_inputs):  # dynamo's graph, run as it stands
        graphs.append(gm)
        return gm.forward

    step = functools.partial(decode_logits, config=config, kernels=kernels, run_block=decode_block(cpu, kernels, config))
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=record)
    caches = [make_cache(config, 1, 16) for _ in range(2)]
    tokens = prompt(5, seed=4)
    with torch.inference_mode():
        for cache in caches:
            run_cached(params, config, tokens[:, :-1], cache, 0)
        pos = torch.tensor([[4]])
        eager = decode_logits(params, tokens[:, -1:], pos, caches[0], config=config, kernels=kernels)
        regional = compiled(params, tokens[:, -1:], pos, caches[1])
    calls = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(graphs) == 1 and len(calls) == config.n_layer
    assert len({n.args[0].target for n in calls}) == 1  # every layer calls the same subgraph
    assert (eager - regional).abs().max().item() <= 1e-5
    for (k0, v0), (k1, v1) in zip(*caches):  # the region wrote the new keys/values in place
        assert torch.allclose(k0, k1, atol=1e-6) and torch.allclose(v0, v1, atol=1e-6)


def test_models_of_other_widths_in_one_process_each_get_their_own_graphs():
    """Each compiled step has a dynamo frame of its own, with static shapes:
    a second model of another width neither turns the first one's sizes
    symbolic nor shares its recompile limit, and running the first again
    compiles nothing."""
    wide = GPTConfig(vocab_size=50257, n_ctx=64, n_embd=64, n_layer=2, n_head=4)
    narrow = GPTConfig(vocab_size=50257, n_ctx=96, n_embd=48, n_layer=3, n_head=3)
    models = [(init_params(c, seed=i), c) for i, c in enumerate((wide, narrow))]
    for params, config in models + models[:1]:
        for batch in (1, 3):
            prompts = [prompt(4 + row, seed=row)[0].tolist() for row in range(batch)]
            compiled = generate_all(params, config, prompts, 12, temperature=0, compile=True)[0]
            assert torch.equal(compiled, generate_all(params, config, prompts, 12, temperature=0)[0])
    assert counters["stats"]["unique_graphs"] == 4  # two models x two batch sizes; the third run reused its graphs


def test_every_batch_size_and_weight_dtype_gets_a_frame_of_its_own():
    """Dynamo allows a frame 8 graphs (here 1): one model run compiled at
    several batch sizes and weight dtypes in one process must not pile its
    graphs into one frame (the full benchmark failed so)."""
    params = init_params(LONG, seed=0)
    with torch._dynamo.config.patch(recompile_limit=1):
        for dtype in ("float32", "bfloat16", "int8"):
            for batch in (1, 2):
                prompts = [prompt(3 + row, seed=row)[0].tolist() for row in range(batch)]
                generate_all(cast_params(params, dtype), LONG, prompts, 4, temperature=0, compile=True)
    assert counters["stats"]["unique_graphs"] == 6


def test_the_dynamic_shape_compiled_paths_get_a_frame_per_model_and_settings():
    """The uncached recomputation and the compiled prefill compile with
    dynamic shapes; each model and sampling setting gets a dynamo frame of
    its own, so dynamo's limit per frame (here 1) is never shared."""
    other = GPTConfig(vocab_size=50257, n_ctx=64, n_embd=48, n_layer=1, n_head=3)
    with torch._dynamo.config.patch(recompile_limit=1):
        for config in (LONG, other):
            params = init_params(config, seed=0)
            for temperature in (0.0, 0.8):
                generate_all(params, config, prompt(3), 4, temperature=temperature, use_cache=False, compile=True,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
            steps = compiled_steps(config, torch.device("cpu"), compile_prefill=True, temperature=0, top_k=0, top_p=1.0)
            for n in (3, 9):  # prompt lengths: one dynamic graph
                with torch.inference_mode():
                    steps.prefill(params, prompt(n), torch.arange(n)[None], steps.make_state(params, 1, 16), None)
    assert counters["stats"]["unique_graphs"] == 6  # per model: two sampling settings + the prefill


@pytest.mark.parametrize("which, dtype", [("small", "float32"), ("small", "bfloat16"), ("small", "int8"), ("gpt2", "bfloat16")])
def test_each_row_of_a_compiled_batch_computes_the_bits_it_computes_alone(which, dtype, request):
    """The compiled CPU step at batch 4 and at batch 1, over the same cache
    rows at ragged positions, three steps: every layer's keys and values and
    every chosen token are equal bit for bit (decode_options: without them
    torch 2.13's inductor computes a LayerNorm in two passes at batch 4, in
    one at batch 1). The small model inlines its blocks, the gpt2 shape runs
    them as compile regions."""
    params, config = load_pretrained(request.getfixturevalue(f"{which}_ref").directory)
    params = cast_params(params, dtype)
    batch, alone = (compiled_steps(config, torch.device("cpu"), b, temperature=0, top_k=0, top_p=1.0) for b in (4, 1))
    g = torch.Generator().manual_seed(5)
    cache = batch.make_state(params, 4, 40)
    for t in (t for kv in cache for t in kv):  # keys and values written at positions 0-11
        t[:, :, :12] = torch.randn(t[:, :, :12].shape, generator=g).to(t.dtype)
    rows = [alone.make_state(params, 1, 40) for _ in range(4)]
    tokens, pos = torch.randint(0, 50257, (4, 1), generator=g), torch.tensor([[11], [3], [8], [0]])
    with torch.inference_mode():
        for r, row in enumerate(rows):
            for t_row, t in zip((t for kv in row for t in kv), (t for kv in cache for t in kv)):
                t_row.copy_(t[r : r + 1])
        for _ in range(3):
            out = batch.decode(params, tokens, pos, batch.window(cache, 16), None)
            for r, row in enumerate(rows):
                one = alone.decode(params, tokens[r : r + 1], pos[r : r + 1], alone.window(row, 16), None)
                assert torch.equal(out[r : r + 1], one)
                for layer, (kv, kv_row) in enumerate(zip(cache, row)):
                    assert all(torch.equal(t[r : r + 1], t_row) for t, t_row in zip(kv, kv_row)), (r, layer)
            tokens, pos = out[:, None], pos + 1


def test_compiled_ragged_batch_rows_equal_each_prompt_alone(small_ref):
    params, config = load_pretrained(small_ref.directory)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (3, 17, 1, 9)]
    rows = generate(params, config, prompts, 20, temperature=0, compile=True).rows()
    for p, row in zip(prompts, rows):
        assert row == generate_all(params, config, torch.tensor([p]), 20, temperature=0)[0][0].tolist()
    generate(params, config, prompts[::-1], 7, temperature=0, compile=True).rows()  # other lengths: the same graph
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_generation_equals_eager_greedy_and_seeded(small_ref):
    params, config = load_pretrained(small_ref.directory)
    greedy = generate_all(params, config, prompt(7), 64, temperature=0)[0]
    assert torch.equal(generate_all(params, config, prompt(7), 64, temperature=0, compile=True)[0], greedy)
    for top_k, top_p, min_p, typical_p in [(20, 0.9, 0.0, 1.0), (0, 0.8, 0.0, 1.0), (20, 1.0, 0.5, 1.0), (20, 1.0, 0.0, 0.8)]:
        runs = [
            generate_all(params, config, prompt(7), 40, temperature=0.9, top_k=top_k, top_p=top_p, min_p=min_p,
                         typical_p=typical_p, generator=torch.Generator().manual_seed(11), compile=c)[0]
            for c in (False, True)
        ]  # fmt: skip
        assert torch.equal(runs[0], runs[1]), (top_k, top_p, min_p, typical_p)


@pytest.mark.parametrize("per_call", [1, 3])
def test_rules_on_the_text_so_far_compile_into_one_graph_that_chooses_what_eager_chooses(small_ref, per_call):
    """A repetition penalty, an n-gram ban and bad words (a token and a pair
    the plain greedy text has), greedy and seeded, one token a
    call (windows of the cache) and a chain of three (one graph): the tokens
    of the eager steps, which are the reference's (tests/test_parity.py);
    one graph for every step, prompt and generation length."""
    params, config = load_pretrained(small_ref.directory)
    prompts = [prompt(9)[0].tolist(), prompt(4, seed=1)[0].tolist()]
    plain = generate_all(params, config, prompts, 40, temperature=0)[0].tolist()
    rules = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[plain[0][5]], plain[1][3:5]])
    for sampling in (dict(temperature=0), dict(temperature=0.9, top_k=20, min_p=0.05)):
        runs = [generate_all(params, config, prompts, 40, **rules, tokens_per_call=per_call, compile=c,
                             generator=torch.Generator().manual_seed(4), **sampling)[0] for c in (False, True)]  # fmt: skip
        assert torch.equal(runs[0], runs[1]), sampling
    assert not torch.equal(runs[1], generate_all(params, config, prompts, 40, tokens_per_call=per_call, compile=True,
                                                 generator=torch.Generator().manual_seed(4), **sampling)[0])  # fmt: skip
    counters.clear()
    generate_all(params, config, [prompts[1], prompts[0][:6]], 70, **rules, tokens_per_call=per_call, compile=True,
                 generator=torch.Generator().manual_seed(5), **sampling)  # fmt: skip
    assert counters["stats"]["unique_graphs"] == 0  # other prompts and lengths, another generation: the graph built


@pytest.mark.parametrize("per_call", [1, 3])
def test_min_new_tokens_compiles_into_one_graph_that_holds_the_stop_token_as_eager_does(small_ref, per_call):
    """min_new_tokens with a stop token the first prompt's greedy text has as
    its 2nd token (and later): compiled, greedy and seeded, one token a call
    and a chain of three, the rows of the eager steps (which are the
    reference's, tests/test_parity.py), which end at the stop token past the
    6 new tokens held, where without the rule they end at the 2nd; a row's
    count of new tokens is positional (its position less its start), so one
    graph serves every step, prompt and generation."""
    params, config = load_pretrained(small_ref.directory)
    prompts = [prompt(9, seed=1)[0].tolist(), prompt(4, seed=2)[0].tolist()]
    stop = generate_all(params, config, prompts[:1], 2, temperature=0)[0][0, 1].item()
    for sampling in (dict(temperature=0), dict(temperature=0.9, top_k=3)):
        runs = [generate(params, config, prompts, 30, min_new_tokens=6, stop_token=stop, tokens_per_call=per_call,
                         compile=c, generator=torch.Generator().manual_seed(4), **sampling).rows() for c in (False, True)]  # fmt: skip
        assert runs[0] == runs[1], sampling
        assert all(len(row) > 6 and stop not in row[:6] for row in runs[1])
        assert 6 < len(runs[1][0]) < 30 and runs[1][0][-1] == stop  # held for 6 tokens, then chosen
    plain = generate(params, config, prompts, 30, stop_token=stop, temperature=0, tokens_per_call=per_call).rows()
    assert len(plain[0]) == 2
    counters.clear()
    generate(params, config, [prompts[1], prompts[0][:6]], 50, min_new_tokens=6, stop_token=stop, temperature=0.9,
             top_k=3, tokens_per_call=per_call, compile=True, generator=torch.Generator().manual_seed(5)).rows()  # fmt: skip
    assert counters["stats"]["unique_graphs"] == 0  # other prompts and lengths, another generation: the graph built


@pytest.mark.parametrize("top_k, top_p, min_p, typical_p", [(0, 1.0, 0.0, 1.0), (3, 1.0, 0.0, 1.0), (0, 0.7, 0.0, 1.0),
                                                            (4, 0.8, 0.0, 1.0), (0, 1.0, 0.3, 1.0), (4, 1.0, 0.3, 1.0),
                                                            (0, 1.0, 0.0, 0.6), (4, 1.0, 0.0, 0.6)])  # fmt: skip
def test_compiled_sampler_follows_the_filtered_distribution(top_k, top_p, min_p, typical_p):
    """40,000 draws from the compiled sampler, one distribution: the empirical
    frequencies must sit within 4.5 binomial standard deviations."""
    V, n = 6, 40_000
    logits = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]])).expand(n, V)
    noise = uniform_noise((n, noise_width(V, top_k)), torch.Generator().manual_seed(5))
    sampler = torch.compile(functools.partial(choose_token, temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p,
                                              typical_p=typical_p), fullgraph=True)  # fmt: skip
    draws = sampler(logits, noise)
    assert torch.equal(draws, choose_token(logits, noise, 1.0, top_k, top_p, min_p, typical_p))  # compiled == eager
    probs = filtered_probs(logits[:1], 1.0, top_k, top_p, min_p, typical_p)[0].double()
    freq = torch.bincount(draws, minlength=V).double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 4.5 * sigma + 1e-12).all(), (freq, probs)
    assert (freq[probs == 0] == 0).all()


def test_compiled_no_cache_generation_equals_eager_and_reports_compile_apart(small_ref):
    params, config = load_pretrained(small_ref.directory)
    eager = generate_all(params, config, prompt(5), 12, temperature=0, use_cache=False)[0]
    tokens, stats = generate_all(params, config, prompt(5), 12, temperature=0, use_cache=False, compile=True)
    assert torch.equal(tokens, eager)
    assert stats.compile_s > 0 and stats.decode_tokens == 10
    rules = dict(repetition_penalty=1.3, no_repeat_ngram_size=2)  # read from the token buffer, ragged rows
    prompts = [prompt(5)[0].tolist(), prompt(2, seed=1)[0].tolist()]
    cached = generate_all(params, config, prompts, 24, temperature=0, **rules)[0]
    assert torch.equal(generate_all(params, config, prompts, 24, temperature=0, use_cache=False, compile=True, **rules)[0], cached)


def test_tokens_per_call_yields_the_tokens_of_one_step_a_call(small_ref):
    """A chain of n steps a call (eager and compiled) yields the tokens that
    one step a call yields, greedy and seeded, in a ragged batch whose rows
    stop at a stop token and at the context (n_ctx 128) at counts that are
    no multiple of n; compiled, the chain is one graph for every call and
    every prompt (the small model is narrower than REGION_MIN_WIDTH; with
    torch < 2.12, where a compiled chain is no graph, one token a call)."""
    params, config = load_pretrained(small_ref.directory)
    first_call = 5 if REGIONS else 1  # the tokens of the compiled first call, which compiles (not timed)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (3, 17, 121, 9)]
    greedy = generate(params, config, prompts, 23, temperature=0).rows()
    stop = greedy[0][6]
    outputs = []
    for kw in [dict(temperature=0), dict(temperature=0, stop_token=stop), dict(temperature=0.9, top_k=20, top_p=0.9)]:
        runs = [generate(params, config, prompts, 23, generator=torch.Generator().manual_seed(7), tokens_per_call=n,
                         compile=compile, **kw) for n, compile in [(1, False), (5, False), (5, True)]]  # fmt: skip
        rows = [r.rows() for r in runs]
        assert rows[0] == rows[1] == rows[2], kw
        assert len(rows[0][2]) == 7  # row 2 stops at the context
        assert [r.stats.decode_tokens for r in runs] == [runs[0].stats.n_new - 1] * 2 + [runs[0].stats.n_new - 1 - first_call]
        outputs.append(rows[0])
    assert outputs[0] == greedy and len(outputs[1][0]) == greedy[0].index(stop) + 1 < 23  # the stop token cut row 0
    assert outputs[2] != greedy
    generate(params, config, prompts[::-1], 11, temperature=0, tokens_per_call=5, compile=True).rows()
    # the chain's graph (greedy), and the seeded one: nothing for a second prompt
    assert counters["stats"]["unique_graphs"] == 2


def test_tokens_per_call_on_the_gpt2_width_runs_the_one_token_step(small_ref, monkeypatch):
    """Where a compiled chain would not be one graph (models at least
    REGION_MIN_WIDTH wide; here the small model, the width lowered), the
    step runs one token a call: the same tokens, and the graph of
    tokens_per_call=1, no other."""
    import gpt2fn.steps

    params, config = load_pretrained(small_ref.directory)
    monkeypatch.setattr(gpt2fn.steps, "REGION_MIN_WIDTH", config.n_embd)
    one = generate_all(params, config, prompt(7), 20, temperature=0)[0]
    assert torch.equal(generate_all(params, config, prompt(7), 20, temperature=0, tokens_per_call=3, compile=True)[0], one)
    assert torch.equal(generate_all(params, config, prompt(7), 20, temperature=0, compile=True)[0], one)
    assert counters["stats"]["unique_graphs"] == 1
    seeded = [generate_all(params, config, prompt(7), 20, temperature=0.9, top_k=20, tokens_per_call=n, compile=compile,
                           generator=torch.Generator().manual_seed(3))[0] for n, compile in [(1, False), (3, True)]]  # fmt: skip
    assert torch.equal(seeded[0], seeded[1])  # the one-token step draws one step's noise a call
