"""How generation advances: the step protocol and its three implementations.

A step is a pure function of its inputs (its state is written in place)::

    step(params, tokens [B, T], pos [B, T], state, noise) -> next token [B]

(A decode step may also return several tokens per row, [B, m]: a
:func:`chain` of ``m`` steps, each token fed to the next, with
``tokens_per_call`` = m; the speculative steps of :mod:`gpt2fn.speculative`
emit one round at a time.)

It runs the new tokens at their positions and chooses each row's next token
from its last column, sampling included, with the randomness passed in as
``noise`` (see :func:`gpt2fn.sampling.choose_token`), so a compiled step needs
no host synchronisation and no generator object. A prompt is one step with
``T`` = its length; every later token is one step with ``T = 1``.

:class:`Steps` bundles ``make_state`` (what the steps carry) with the prefill
and decode steps, and ``window``: how to cut the state down to the positions
a call touches (the decode loop hands a call that touches positions < ``end``
the cache's first :func:`window_len` positions, so that attention reads the
keys written so far, not the whole preallocated cache):

* :func:`cached_steps`: the state is the preallocated KV cache (with a
  repetition penalty, an n-gram ban, banned words or a least number of new tokens, a
  :class:`History`: the cache and each row's tokens at their positions,
  written in place by each step as the cache is, and where its new tokens
  start, recorded by the prompt's step).
* :func:`uncached_steps`: the state is a :class:`History` without a cache;
  every step recomputes the whole sequence (kept for comparison).
* :func:`compiled_steps`: the cached steps under ``torch.compile``. The
  decode step is ``fullgraph=True``; the position is a tensor and the cache
  length (a window's) is marked dynamic, so ONE graph serves every step of
  every generation, whatever the prompt length. On CUDA the mode is
  "reduce-overhead" (CUDA graphs): params and cache are marked as static
  addresses (:func:`mark_static`) so the graph reads them in place (a new
  generation's cache records it again), and the output token is cloned
  before the next replay overwrites it. On the CPU the step is
  built with the :func:`~gpt2fn.layers.matvec` products up to batch 16 and
  the :func:`~gpt2fn.layers.few_rows` ones for larger batches, and (models 768 wide
  and up) each block is one nested compile region (:func:`decode_block`):
  compiled once, called for every layer. Each compiled step has a dynamo
  frame of its own for every batch size and params layout (:func:`compiled_step`).

Sampling settings (temperature, top-k, top-p, min-p, typical-p, the repetition
penalty, the n-gram ban, banned words, the least number of new tokens and
the stop token it holds back) are constants of a graph: changing them between
generations compiles a new graph once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from gpt2fn.cache import cache_len, make_cache, window
from gpt2fn.config import GPTConfig
from gpt2fn.errors import GPT2FnError
from gpt2fn.layers import ATTEND, MATVEC_MAX_ROWS, Kernels, block, few_rows, int8_sums, linear, matvec
from gpt2fn.model import Tap, hidden, logits, positions
from gpt2fn.params import Params, flatten_params, params_device, params_dtype
from gpt2fn.sampling import apply_history, choose_token, reads_history

Tensor = torch.Tensor
State = Any  # a KVCache, or a History (a KVCache or None, the tokens so far, where each row's new ones start)
Step = Callable[[Params, Tensor, Tensor, State, Optional[Tensor]], Tensor]

# Inductor options for the decode step. Batch-1 decoding is a chain of
# matrix-vector loops; by default inductor inlines the LayerNorm that feeds
# each one into its inner loop, recomputing the normalisation for every output
# row (2304 times for c_attn), which makes the bf16 and int8 loops compute-
# rather than memory-bound. These two thresholds make it store such inputs once
# instead (realize_acc_reads_threshold: a pointwise result reading more than 3
# buffers is materialised; realize_reads_threshold: one read more than once is).
# Measured on the 124M shape, 2-core CPU, per step: bf16 9.5 -> 8.2 ms,
# int8 5.7 -> 5.2 ms, fp32 unchanged. Lower values make it worse: at 2 the
# weight-times-activation product itself is materialised (bf16: 16 ms).
# size_asserts / alignment_asserts off: by default the generated wrapper checks
# every input's sizes and strides (~150 params) on every call, which dynamo's
# guards have already checked. Side by side (124M, 2-core CPU, per step):
# int8 12.2 -> 11.8 ms, bf16 18.6 -> 18.2 ms, fp32 unchanged (20.2 / 20.3).
DECODE_OPTIONS = {
    "realize_reads_threshold": 1, "realize_acc_reads_threshold": 3, "size_asserts": False, "alignment_asserts": False,
}  # fmt: skip
# Since torch 2.13 (not in 2.11) inductor computes a CPU LayerNorm of up to
# this option's many values (default 1024) in two passes, mean then variance,
# when a kernel has several rows, and in one (Welford's) for a single row: a
# row's bits at batch 8 were not its bits alone, and compiled bf16 rows of
# the 124M shape parted from their prompts alone after 104-182 tokens. At 0
# every batch size takes Welford's pass (batch 1's code is unchanged). Side
# by side (124M, 2-core CPU, cache of 144), a batch-8 step: fp32 0.996x the
# time, bf16 0.995x, int8 0.981x.
TWO_STEP_VARIANCE = "cpp.use_two_step_variance_threshold"


@functools.cache
def decode_options() -> dict:
    """The inductor options of a compiled CPU decode step:
    :data:`DECODE_OPTIONS`, and where this torch has it
    :data:`TWO_STEP_VARIANCE` = 0 (Welford's LayerNorm at every batch size),
    so that each row of a compiled step's batch is, bit for bit, that row
    run alone (``tests/test_compile.py``). Read at the first compilation:
    inductor's config module takes ~1 s to import."""
    import torch._inductor.config as inductor

    has_threshold = hasattr(inductor.cpp, TWO_STEP_VARIANCE.split(".")[1])
    return {**DECODE_OPTIONS, **({TWO_STEP_VARIANCE: 0} if has_threshold else {})}


# Whether this torch compiles a block that writes its inputs (the KV cache) as
# a nested compile region: regions that mutate their inputs are
# auto-functionalized from 2.12 (checked on 2.13). See decode_block.
REGIONS = torch.torch_version.TorchVersion(torch.__version__) >= "2.12"
# The narrowest model whose blocks are regions: every GPT-2 size (768 wide and
# up). A region call costs the wrapper ~0.05-0.08 ms of Python, 5-8% of a 124M
# step, but 30% of a step of the 128-wide bundled model (1.14 -> 1.50 ms).
REGION_MIN_WIDTH = 768


class Steps(NamedTuple):
    make_state: Callable[[Params, int, int], State]  # (params, batch, length) -> a fresh state
    prefill: Step
    decode: Step
    compiled: bool = False  # the first decode step compiles its graph
    report: Optional[Callable[[State], dict]] = None  # extra GenerationStats fields, read from the final state
    chained: int = 1  # plain steps a decode call runs (a chain), each drawing its own noise: [B, n, W] when > 1
    # (state, n) -> the state for a call that touches only positions < n (a
    # prefix of the cache, see window_len); None: every call gets the whole state
    window: Optional[Callable[[State, int], State]] = None


# The granularity of the cache prefixes calls attend over (window_len): a
# call touching positions < end attends over end rounded up to a multiple of
# WINDOW, so the decode loop makes a new prefix view every WINDOW tokens. An
# attention reading the whole preallocated cache reads on average twice the
# keys a generation has written. Side by side, compiled (124M shape, 2-core
# CPU, 8-token prompt): 768 new tokens, int8 10.26 -> 7.69 ms a step, fp32
# 23.14 -> 21.86; 256 new tokens, int8 1.08-1.12x, fp32 1.02x, bf16 0.97-1.00x
# (its keys are half the bytes). See the README's Speed section.
WINDOW = 16


def window_len(end: int, length: int) -> int:
    """How many cache positions a call that touches positions < ``end``
    attends over: ``end`` rounded up to a multiple of :data:`WINDOW`, at most
    the cache's ``length``."""
    return min(length, -(-end // WINDOW) * WINDOW)


class History(NamedTuple):
    """The state of cached steps whose choice reads the text so far (see :func:`cached_step`)."""

    cache: State  # the KV cache (or a window of it); None for the uncached steps
    tokens: Tensor  # [B, L] int64: each row's tokens at their positions, prompt and new (later slots: stale)
    start: Tensor  # [B] int64: each row's first new position (its prompt's length), recorded by the prompt's step


def cached_step(
    params: Params, tokens: Tensor, pos: Tensor, state: State, noise: Optional[Tensor],
    *, config: GPTConfig, kernels: Kernels, temperature: float, top_k: int, top_p: float, min_p: float = 0.0,
    typical_p: float = 1.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, min_new_tokens: int = 0,
    stop_token: Optional[int] = None, bad_words_ids: tuple = (), prompt: bool = False, run_block: Callable = block,
    tap: Optional[Tap] = None,
) -> Tensor:  # fmt: skip
    """Writes the tokens' keys/values into the cache; each row's last column
    chooses its next token. With a ``repetition_penalty`` (not 1), a
    ``no_repeat_ngram_size``, ``bad_words_ids`` or a ``min_new_tokens``
    (which holds ``stop_token`` back) the state is a :class:`History`: the step writes its
    tokens there too (the ``prompt``'s step also where each row's new tokens
    start), and the rules read them (:func:`~gpt2fn.sampling.apply_history`;
    a row's new tokens before this choice: its last position + 1 - its
    start); otherwise it is the cache.
    (``run_block``: see :func:`decode_block`; ``tap``:
    :func:`~gpt2fn.model.hidden`'s, for the eager steps.)"""
    rules = dict(repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                 min_new_tokens=min_new_tokens, stop_token=stop_token, bad_words_ids=bad_words_ids)  # fmt: skip
    history = reads_history(**rules)
    x = hidden(params, config, tokens, pos, state.cache if history else state, tap, kernels, run_block)[:, -1]  # [B, D]
    scores = logits(params, config, x, kernels.linear)
    if history:
        sequence = state.tokens.scatter_(1, pos, tokens)
        if prompt:
            state.start.copy_(pos[:, -1] + 1)
        scores = apply_history(scores, sequence, pos[:, -1], made=pos[:, -1] + 1 - state.start, **rules)
    return choose_token(scores, noise, temperature, top_k, top_p, min_p, typical_p)


def chain(
    params: Params, tokens: Tensor, pos: Tensor, cache: State, noise: Optional[Tensor], *, n: int, step: Callable
) -> tuple[Tensor, ...]:  # fmt: skip
    """``n`` steps, each one's token fed to the next: tokens [B, T] at pos
    [B, T] -> each of ``step``'s outputs stacked along dim 1, (tokens [B, n],
    ...). ``step(params, tokens, pos, cache, noise)`` returns a tuple of
    tensors whose first is the chosen token [B]: :func:`chain_step` for
    plain decoding, a speculative draft's step with its distributions. The
    first step runs all ``T`` tokens, each later one the token chosen before
    it at the next position, clamped onto the cache's last slot (only tokens
    past the generation's end land there, and no kept token reads it).
    noise: [B, n, ...], step ``i`` drawing from ``noise[:, i]``, or None."""
    length = cache_len(cache.cache if isinstance(cache, History) else cache)
    outs = []
    for i in range(n):
        out = step(params, tokens, pos, cache, None if noise is None else noise[:, i])
        outs.append(out)
        tokens, pos = out[0][:, None], (pos[:, -1:] + 1).clamp(max=length - 1)
    return tuple(torch.stack(column, dim=1) for column in zip(*outs))


def chain_step(params: Params, tokens: Tensor, pos: Tensor, cache: State, noise: Optional[Tensor], **settings) -> tuple[Tensor]:
    """:func:`cached_step` as :func:`chain` calls it: (token [B],)."""
    return (cached_step(params, tokens, pos, cache, noise, **settings),)


def recompute(
    params: Params, sequence: Tensor, last: Tensor, made: Tensor, noise: Optional[Tensor],
    *, config: GPTConfig, kernels: Kernels, temperature: float, top_k: int, top_p: float, min_p: float = 0.0,
    typical_p: float = 1.0, **rules,
) -> Tensor:  # fmt: skip
    """The whole sequence [B, S] without a cache; row b's next token comes
    from its position ``last[b]`` (the ``rules`` of
    :func:`~gpt2fn.sampling.apply_history` read its positions up to
    ``last[b]``, the last ``made[b]`` of them new tokens)."""
    x = hidden(params, config, sequence, positions(*sequence.shape, device=sequence.device), kernels=kernels)
    x = x[torch.arange(x.shape[0], device=x.device), last]  # [B, D]
    scores = apply_history(logits(params, config, x, kernels.linear), sequence, last, made=made, **rules)
    return choose_token(scores, noise, temperature, top_k, top_p, min_p, typical_p)


def uncached_step(
    params: Params, tokens: Tensor, pos: Tensor, state: History, noise: Optional[Tensor], *, recompute: Callable,
    prompt: bool = False,
) -> Tensor:  # fmt: skip
    """Writes the tokens into the state's token buffer [B, L] at ``pos``
    (the ``prompt``'s step also where each row's new tokens start), then
    recomputes every row's prefix. (Reading the prefix length is a host
    sync: this path exists for comparison.)"""
    sequence = state.tokens.scatter_(1, pos, tokens)
    if prompt:
        state.start.copy_(pos[:, -1] + 1)
    return recompute(params, sequence[:, : int(pos.max()) + 1], pos[:, -1], pos[:, -1] + 1 - state.start, noise)


def resolve_attention(attention: str, compiled_decode: bool = False, device: torch.device | None = None) -> str:
    """"manual" and "sdpa" stay as they are. "auto" is SDPA, except in the
    compiled decode step on the CPU, where the spelled-out attention lets
    inductor fuse it with its neighbours: measured 8-10% faster per step
    (124M shape, fp32 and bf16, 2-core CPU) than the CPU flash-attention call."""
    if attention not in (*ATTEND, "auto"):
        raise GPT2FnError(f"unknown attention {attention!r}; choose one of {', '.join(ATTEND)} or auto")
    if attention != "auto":
        return attention
    return "manual" if compiled_decode and (device is None or device.type == "cpu") else "sdpa"


def eager_kernels(attention: str = "auto") -> Kernels:
    """The kernels of the eager steps, training and evaluation:
    :func:`~gpt2fn.layers.few_rows`, which is :func:`~gpt2fn.layers.linear`
    (gradients too) but for fp32 products on the CPU that oneDNN runs faster
    than MKL (on an AMD CPU, every one; side by side there: a 124M eager step
    29.0 -> 13.6 ms, a 64-token prefill 95 -> 42 ms, a 124M training step of
    2 x 256 tokens 2.72 -> 1.66 s, the bundled model's perplexity over 60 kB
    of text 5.7 -> 4.0 s), and the ``attention`` named."""
    return Kernels(few_rows, ATTEND[resolve_attention(attention)])


def cached_steps(
    config: GPTConfig, attention: str = "auto", tokens_per_call: int = 1, tap: Optional[Tap] = None, **sampling
) -> Steps:  # fmt: skip
    """``sampling``: temperature, top_k, top_p, min_p, typical_p and the
    rules of :func:`with_history`. With ``tokens_per_call`` > 1
    a decode step is a :func:`chain` of that many steps, emitting [B, n].
    ``tap`` (see :mod:`gpt2fn.interp`) sees every call: the prompt's, then
    each new token's ([B, 1, ...]; attention over the cache's first positions,
    :attr:`Steps.window`)."""
    kernels, sampling = eager_kernels(attention), dict(sampling, tap=tap)
    step = functools.partial(cached_step, config=config, kernels=kernels, **sampling)
    decode = step if tokens_per_call == 1 else _tokens(chains(chain_step, config, kernels, None, False, **sampling)(tokens_per_call))
    prefill = functools.partial(step, prompt=True)
    steps = Steps(functools.partial(_cache, config, spare=True), prefill, decode, chained=tokens_per_call, window=window)
    return with_history(steps, **sampling)


def uncached_steps(config: GPTConfig, attention: str = "auto", compile: bool = False, **sampling) -> Steps:
    """With ``compile``, the recomputation runs under ``torch.compile`` with
    dynamic shapes (one graph for every sequence length)."""
    settings = dict(config=config, kernels=eager_kernels(attention), **sampling)
    run = functools.partial(recompute, **settings)
    step = functools.partial(uncached_step, recompute=compiled_dynamic(recompute, **settings) if compile else run)
    # The prompt's pass runs eagerly, so that compiling happens in the first decode step.
    prefill = functools.partial(uncached_step, recompute=run, prompt=True)
    return Steps(_token_buffer, prefill, step, compiled=compile)


def compiled_steps(
    config: GPTConfig, device: torch.device, batch: int = 1, attention: str = "auto", compile_prefill: bool = False,
    tokens_per_call: int = 1, **sampling,
) -> Steps:  # fmt: skip
    """The cached steps under ``torch.compile`` (see the module docstring).
    ``batch`` picks the products (see :func:`decode_kernels`). The prefill is compiled
    only with ``compile_prefill`` (dynamic prompt length); prefill is a few
    large matrix products that the eager library calls already run well (on
    the 124M shape, 2-core CPU, compiling it gained 2-14% for ~50 s of cold
    compilation). ``scripts/benchmark.py`` measures both. With
    ``tokens_per_call`` > 1 a decode step is a :func:`chain` of that many
    steps where it is one graph (:func:`chain_graph`: on CUDA, one CUDA
    graph replay a call). Elsewhere (GPT-2 sizes on the CPU) the step runs
    one token a call whatever ``tokens_per_call`` says: a chain of compiled
    one-token calls gained nothing there (124M shape, side by side: fp32
    0.95x, bf16 1.00x, int8 0.89x) and compiled a graph of its own.
    On the CPU a step that runs one token a call takes windows of its cache
    (``Steps.window``, see below why only there)."""
    prefill = cached_steps(config, attention, **sampling).prefill
    if compile_prefill:
        prefill = compiled_dynamic(cached_step, **prefill.keywords)
    kernels = decode_kernels(device, batch, attention)
    chained = tokens_per_call if chain_graph(config, device) else 1
    if chained > 1:
        decode = _tokens(chains(chain_step, config, kernels, device, True, **sampling)(chained))
    else:
        run_block = decode_block(device, kernels, config)
        decode = compiled_step(cached_step, device, config=config, kernels=kernels, run_block=run_block, **sampling)
    # Windows on the CPU for one token a call. On CUDA each window length would
    # record a CUDA graph of its own. A chain is one compile region called n
    # times, and torch 2.13 computes wrong tokens from a region call that
    # writes several positions into a cache that is not a whole buffer: a
    # speculative draft's chain does (its first step runs two tokens; the
    # compiled sampled run of tests/test_speculative.py parted from the eager
    # one), a plain chain's calls never do, but its caches stay whole too.
    steps = _compiled(config, device, prefill, decode, windowed=device.type == "cpu" and chained == 1, chained=chained)
    return with_history(steps, **sampling)


def _compiled(config: GPTConfig, device: torch.device, prefill: Step, decode: Step, windowed: bool, chained: int = 1) -> Steps:
    """Steps whose decode step is compiled: a marked cache (for CUDA graphs, of
    :func:`graph_cache_len` positions), cut into marked windows where ``windowed``."""
    make_state = functools.partial(_marked_cache, config, spare=windowed, graphs=device.type == "cuda")
    return Steps(make_state, prefill, decode, compiled=True, chained=chained, window=_marked_window if windowed else None)


def with_history(
    steps: Steps, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, min_new_tokens: int = 0,
    bad_words_ids: tuple = (), **sampling,
) -> Steps:  # fmt: skip
    """Cached ``steps`` as they run with rules that read the text so far
    (:func:`~gpt2fn.sampling.reads_history`): their state is then a
    :class:`History`, its cache the steps' own (cut by their window), its
    tokens as long as the cache (for compiled steps, the length marked
    dynamic, one graph for every length) and each row's first new position
    (on CUDA both static addresses, as the cache is), which the prompt's
    step records. Without such rules, ``steps`` unchanged."""
    if not reads_history(repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids=bad_words_ids):
        return steps

    def make_state(params: Params, batch: int, length: int) -> History:
        cache = steps.make_state(params, batch, length)
        return History(cache, *text_buffers(batch, cache_len(cache), params_device(params), steps.compiled))

    cut = steps.window
    window = None if cut is None else lambda s, n: s._replace(cache=cut(s.cache, n))
    return steps._replace(make_state=make_state, window=window)


def log_probs_step(
    params: Params, tokens: Tensor, pos: Tensor, cache: State, noise: Optional[Tensor],
    *, config: GPTConfig, kernels: Kernels, run_block: Callable = block,
) -> Tensor:  # fmt: skip
    """A step that scores instead of choosing (beam search, :mod:`gpt2fn.beam`):
    writes the tokens' keys/values into the cache and returns each row's
    log-probabilities of its next token, [B, V] fp32 (``noise`` unused)."""
    x = hidden(params, config, tokens, pos, cache, None, kernels, run_block)[:, -1]  # [B, D]
    return F.log_softmax(logits(params, config, x, kernels.linear).float(), dim=-1)


def scoring_steps(config: GPTConfig, device: torch.device, batch: int, attention: str = "auto", compile: bool = False) -> Steps:
    """Steps of :func:`log_probs_step` over a ``batch`` of rows: eager, or with
    ``compile`` the one-token step compiled as :func:`compiled_steps`
    compiles its own (one graph for every step and length; windows of the
    cache on the CPU, CUDA graphs on a GPU), the prompt's pass eager."""
    prefill = functools.partial(log_probs_step, config=config, kernels=eager_kernels(attention))
    if not compile:
        return Steps(functools.partial(_cache, config, spare=True), prefill, prefill, window=window)
    kernels = decode_kernels(device, batch, attention)
    decode = compiled_step(log_probs_step, device, config=config, kernels=kernels, run_block=decode_block(device, kernels, config))
    return _compiled(config, device, prefill, decode, windowed=device.type == "cpu")


def chain_graph(config: GPTConfig, device: torch.device) -> bool:
    """Whether a compiled :func:`chain` is one graph (see :func:`chains`): on
    CUDA (one CUDA graph replay a call), and on the CPU, with
    :data:`REGIONS`, for models narrower than :data:`REGION_MIN_WIDTH`."""
    return device.type == "cuda" or (device.type == "cpu" and REGIONS and config.n_embd < REGION_MIN_WIDTH)


def chains(
    step: Callable, config: GPTConfig, kernels: Kernels, device: Optional[torch.device], compile: bool, **sampling
) -> Callable[[int], Callable]:  # fmt: skip
    """``n`` -> a :func:`chain` of ``n`` calls of ``step`` (:func:`chain_step`,
    or a speculative draft's step) with its settings bound: eager, or with
    ``compile`` compiled. Compiled, where :func:`chain_graph` says so, it
    runs its whole chain as one graph, a graph for each ``n``. On the CPU (a
    model narrower than :data:`REGION_MIN_WIDTH`, with :data:`REGIONS`) its
    step is one nested compile region: built once and called ``n`` times,
    where the chain inlined would compile ``n`` copies. A step of such a
    model is mostly fixed cost (the call, its guards over ~80 tensors, the
    wrapper's allocations), which the chain pays once a call. Side by side
    on the bundled model: plain decoding, fp32, 1.53 -> 1.20 ms a token (n =
    8; int8 0.72 -> 0.55 ms); a speculative draft, 0.39 -> 0.24 ms a drafted
    token (int8 over 2048 tokens, n = 8; the chain compiles in 16 s, where 8
    inlined copies took 73). On CUDA the chain is one CUDA graph with its
    steps inlined (regions have not been run there): a call's fixed cost on
    the host (guards, the graph tree's checks, the output copy), which a
    small model's step on a GPU is mostly made of, is paid once for ``n``
    tokens, for a compilation that grows with ``n`` (not measured on a GPU
    yet: see ``.ci/gpu``). Elsewhere (wider models on the CPU, an older
    torch) the chain calls its compiled step once a token, its blocks
    regions as the plain step's are (:func:`decode_block`): what a
    speculative draft does there (a plain decode step then runs one token a
    call, see :func:`compiled_steps`). A GPT-2-wide chain took 38 s to
    compile, with its blocks inlined, for a step 10% faster (124M shape,
    a speculative draft, n = 8), and with its blocks regions inside the
    chain's region, 13% slower: a region inside a region is
    auto-functionalized, and the generated code copied every layer's whole
    K and V cache before each block wrote it."""
    settings = dict(config=config, kernels=kernels, **sampling)
    if not compile:
        bound = functools.partial(step, **settings)
    elif chain_graph(config, device):
        inner = _region(step, **settings) if device.type == "cpu" else _bound(step, **settings)
        return lambda n: compiled_step(chain, device, n=n, step=inner)
    else:
        bound = compiled_step(step, device, run_block=decode_block(device, kernels, config), **settings)
    return lambda n: functools.partial(chain, n=n, step=bound)


@functools.lru_cache(maxsize=None)
def _region(step: Callable, **settings) -> Callable:
    """``step`` with ``settings`` bound, as one nested compile region (made
    once per step and settings: a compiled chain reuses its region). The
    step returns tensors only: dynamo reuses a region's trace only then, and
    traced a region returning ``None`` again at every call (0.6-1 s each: a
    k = 16 draft chain took 22 s to compile instead of ~3)."""

    @torch.compiler.nested_compile_region
    def region(params: Params, tokens: Tensor, pos: Tensor, cache: State, noise: Optional[Tensor]):
        return step(params, tokens, pos, cache, noise, **settings)

    return region


@functools.lru_cache(maxsize=None)
def _bound(step: Callable, **settings) -> Callable:
    """``step`` with ``settings`` bound, made once per step and settings (a
    compiled chain's settings hold it: a new one would compile the chain again)."""
    return functools.partial(step, **settings)


def _tokens(chain: Callable) -> Step:
    """A chain as a decode step: its tokens [B, n]."""
    return lambda *args: chain(*args)[0]


def decode_kernels(device: torch.device, batch: int, attention: str) -> Kernels:
    """The kernels of a compiled decode step: on the CPU,
    :func:`~gpt2fn.layers.matvec` for a batch of up to
    :data:`~gpt2fn.layers.MATVEC_MAX_ROWS` rows (with fp32 weights, past
    :data:`~gpt2fn.layers.MATVEC_FP32_MAX_ROWS` rows, and bf16 ones past
    :data:`~gpt2fn.device.MATVEC_BF16_MAX_ROWS`, it hands them to
    :func:`~gpt2fn.layers.few_rows`) and :func:`~gpt2fn.layers.few_rows` for
    larger ones. On other devices the library's products, but for int8
    weights in a batch of up to :data:`~gpt2fn.layers.MATVEC_MAX_ROWS` rows:
    :func:`~gpt2fn.layers.int8_sums` (unmeasured on a GPU so far)."""
    if device.type == "cpu":
        products = matvec if batch <= MATVEC_MAX_ROWS else few_rows
    else:
        products = int8_sums if batch <= MATVEC_MAX_ROWS else linear
    return Kernels(products, ATTEND[resolve_attention(attention, True, device)])


@functools.lru_cache(maxsize=None)
def decode_block(device: torch.device, kernels: Kernels, config: GPTConfig) -> Callable:
    """How a compiled decode step runs each block. On the CPU (with
    :data:`REGIONS`), for a model at least :data:`REGION_MIN_WIDTH` wide:
    :func:`~gpt2fn.layers.block` with ``kernels`` bound, as
    one nested compile region (``torch.compiler.nested_compile_region``), so
    that the step is still one graph but inductor generates and builds one
    block and calls it for every layer, instead of a copy per layer. Measured
    on the 124M shape, 2-core CPU, side by side in one process: compilation
    bf16 20 -> 12 s, fp32 16 -> 10 s, int8 22 -> 9 s (fresh processes, cold:
    bf16 44 -> 27 s, fp32 32 -> 19 s, int8 37 -> 18 s); per step bf16 18.2 ->
    18.7 ms, fp32 20.3 -> 21.1 ms, int8 11.8 -> 12.8 ms (the wrapper calls
    each region from Python). The speculative draft and verify steps use it
    too: a k = 8 generation's first run (cold) 60 -> 44 s with the draft's.
    Elsewhere the plain block, inlined (CUDA too: regions have not
    been run there). It is called as ``hidden`` calls a block; the
    ``kernels`` it is handed are the ones bound here."""
    if device.type != "cpu" or not REGIONS or config.n_embd < REGION_MIN_WIDTH:
        return block

    @torch.compiler.nested_compile_region
    def region(x, ln_1, attn, ln_2, mlp, *, n_head, eps, pos, mask, kv, tap):  # a region takes tensors and numbers
        return block(x, ln_1, attn, ln_2, mlp, n_head=n_head, eps=eps, pos=pos, mask=mask, kv=kv,
                     approximate=config.gelu, kernels=kernels, tap=tap)  # fmt: skip

    return lambda x, ln_1, attn, ln_2, mlp, *, kernels, approximate, **inputs: region(x, ln_1, attn, ln_2, mlp, **inputs)


@functools.lru_cache(maxsize=None)
def compiled_step(step: Callable, device: torch.device, /, **settings) -> Callable:
    """A decode-sized ``step`` with ``settings`` bound (config, kernels,
    sampling, ...) under ``torch.compile``, as the module docstring says: on
    the CPU with :func:`decode_options`; on CUDA with CUDA graphs, its outputs
    copied out of the graph's memory. Made once per process for each step and
    settings, so that every generation with them runs its graphs.

    Each shape of its tokens (batch size and token count: a speculative
    round's verify pass has one per round size) and params layout it runs
    with (the dtype and shape of the params' top-level tensors: the weight
    dtype, a speculative draft's own vocabulary) gets a dynamo frame of its
    own (dynamo keeps its graphs, and its limit of 8 per frame, on the code
    object it starts from; one frame for every dtype and batch size of a
    model would fail past 8 of them; and a frame with two graphs checks the
    guards of one before it runs the other: a speculative generation on the
    bundled model ran 9% slower with a whole and a cut-vocabulary draft in
    one frame), and its shapes are static except the one marked dynamic, the
    cache length. Dynamo also guards on strides, a
    size-1 dim's too, so tokens and positions that are views of longer rows
    (``seq[:, -1:]``, stride = the row's length) are copied into fresh
    tensors first: one graph whatever they were cut from."""
    step = functools.partial(step, **settings)
    frames = {}  # (tokens' shape, params layout) -> the step compiled in a frame of its own

    def run(params: Params, tokens: Tensor, pos: Tensor, *rest):
        tokens, pos = _fresh(tokens), _fresh(pos)
        key = tokens.shape, *((name, t.dtype, t.shape) for name, t in params.items() if isinstance(t, Tensor))
        if key not in frames:
            frames[key] = _compile(_own_frame(step), device)
        return frames[key](params, tokens, pos, *rest)

    return run


@functools.lru_cache(maxsize=None)
def compiled_dynamic(step: Callable, **settings) -> Callable:
    """``step`` with ``settings`` bound under ``torch.compile`` with dynamic
    shapes (one graph for every length: the uncached recomputation, the
    compiled prefill), in a dynamo frame of its own per step and settings
    (see :func:`compiled_step`)."""
    return torch.compile(_own_frame(functools.partial(step, **settings)), fullgraph=True, dynamic=True)


def _compile(step: Callable, device: torch.device) -> Callable:
    if device.type == "cpu":
        return torch.compile(step, fullgraph=True, dynamic=False, options=decode_options())
    return _cloned(torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead"))


def _fresh(t: Tensor) -> Tensor:
    """``t`` [B, T] with the strides of a new tensor of its shape (a copy only if it has others)."""
    return t if t.stride() == (t.shape[1], 1) else t.clone(memory_format=torch.contiguous_format)


def _own_frame(step: Callable) -> Callable:
    def run(*args):
        return step(*args)

    run.__code__ = run.__code__.replace()  # a code object of its own (equal, not the same)
    return run


def _cache(config: GPTConfig, params: Params, batch: int, length: int, spare: bool = False) -> State:
    return make_cache(config, batch, length, params_dtype(params), params_device(params), spare)


def _token_buffer(params: Params, batch: int, length: int) -> History:
    return History(None, *text_buffers(batch, length, params_device(params)))


def text_buffers(batch: int, length: int, device: torch.device, compiled: bool = False) -> tuple[Tensor, Tensor]:
    """A :class:`History`'s tokens [B, L] and starts [B], zeros; for
    ``compiled`` steps the length marked dynamic (one graph for every
    length) and, on CUDA, both static addresses, as the cache is."""
    tokens = torch.zeros(batch, length, dtype=torch.long, device=device)
    start = torch.zeros(batch, dtype=torch.long, device=device)
    if compiled:
        torch._dynamo.mark_dynamic(tokens, 1)
        for t in (tokens, start) if tokens.is_cuda else ():
            mark_static(t)
    return tokens, start


# On CUDA a compiled step's cache holds the generation's length rounded up to
# a multiple of GRAPH_CACHE_STEP positions (at most the context). CUDA graph
# trees record a graph for every distinct cache length (torch warns past 8:
# `cudagraph_dynamic_shape_warn_limit`), and one for a cache at a new address;
# rounded, a process records at most n_ctx / 128 lengths per step, batch size
# and dtype (8 for GPT-2), and a new cache of a length seen before can take the
# block the last one freed, replaying its graph. The cost: attention over up
# to 127 masked positions a step. (Reasoned, not measured: no GPU so far;
# `.ci/gpu graphs` times 200 generations.)
GRAPH_CACHE_STEP = 128


def graph_cache_len(length: int, n_ctx: int) -> int:
    """The positions of a cache for CUDA graphs: ``length`` rounded up to a
    multiple of :data:`GRAPH_CACHE_STEP`, at most ``n_ctx`` (and at least ``length``)."""
    return max(length, min(n_ctx, -(-length // GRAPH_CACHE_STEP) * GRAPH_CACHE_STEP))


def _marked_cache(config: GPTConfig, params: Params, batch: int, length: int, spare: bool = False,
                  graphs: bool = False) -> State:  # fmt: skip
    """A cache marked as the compiled steps need (see :func:`prepare_for_compiled_steps`);
    with ``graphs`` (steps for CUDA graphs) of :func:`graph_cache_len` positions."""
    if graphs:
        length = graph_cache_len(length, config.n_ctx)
    cache = _cache(config, params, batch, length, spare)
    prepare_for_compiled_steps(params, cache)
    return cache


def _marked_window(cache: State, n: int) -> State:
    """:func:`~gpt2fn.cache.window` marked as its cache is (:func:`_mark_cache`): one graph for every ``n``."""
    views = window(cache, n)
    _mark_cache(views)
    return views


def _cloned(step: Step) -> Step:
    # A CUDA graph's outputs live in memory the next replay overwrites.
    # (A tensor, or a tuple of tensors: a step as a chain calls it.)
    @functools.wraps(step)
    def run(*args):
        out = step(*args)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    return run


def prepare_for_compiled_steps(params: Params, cache) -> None:
    """Mark what the compiled steps need marked: the cache length as dynamic
    (one graph for every length) and, on CUDA, params and cache as static
    addresses (CUDA graphs then read them in place instead of copying)."""
    _mark_cache(cache)
    tensors = flatten_params(params).values()
    if any(t.is_cuda for t in tensors):
        for t in tensors:
            mark_static(t)


def mark_static(t: Tensor) -> None:
    """Mark ``t`` as a static address (CUDA graphs read it in place instead
    of copying it) without a guard on it: a new cache, which every generation
    brings, re-records the CUDA graph instead of recompiling the step. (Until
    pytorch#162208, Sept. 2025, the default guarded the tensor's identity: every
    generation compiled its decode step again, the ninth in a process raised
    dynamo's FailOnRecompileLimitHit (the step is ``fullgraph``), and the
    guards kept every cache alive.)"""
    torch._dynamo.mark_static_address(t, guard=False)


def _mark_cache(cache: State) -> None:
    """The cache's length dynamic and, on CUDA, its tensors static addresses."""
    for kv in cache:
        for t in kv:
            torch._dynamo.mark_dynamic(t, 2)
            if t.is_cuda:
                mark_static(t)


def make_steps(
    config: GPTConfig, device: torch.device, batch: int, use_cache: bool = True, compile: bool = False,
    attention: str = "auto", tokens_per_call: int = 1, tap: Optional[Tap] = None, **sampling,
) -> Steps:  # fmt: skip
    """The steps ``generate`` runs: cached or uncached, eager or compiled,
    cached ones ``tokens_per_call`` tokens a decode call (a :func:`chain`);
    a ``tap`` runs in the eager cached steps only."""
    if tap is not None and (compile or not use_cache):
        raise GPT2FnError("a tap runs in the eager cached steps: drop " + ("compile" if compile else "use_cache=False")
                          + " to generate with it")  # fmt: skip
    if not use_cache:
        return uncached_steps(config, attention, compile, **sampling)
    if compile:
        return compiled_steps(config, device, batch, attention, tokens_per_call=tokens_per_call, **sampling)
    return cached_steps(config, attention, tokens_per_call, tap, **sampling)
