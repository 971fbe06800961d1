"""Autoregressive generation: prefill the prompt in one forward pass, then
one decode step per new token against the preallocated cache (or, for
comparison, recompute the whole sequence every step without a cache).

:func:`generate` is a Python generator: it yields each new token as soon as it
is chosen (streaming) and, when it finishes, returns a :class:`GenerationStats`
with prefill time, decode time and decode tokens/s. :func:`generate_all`
collects both.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Generator, Optional

import torch

from gpt2fn.cache import make_cache
from gpt2fn.config import GPTConfig
from gpt2fn.device import synchronize
from gpt2fn.errors import GPT2FnError
from gpt2fn.layers import AttentionBackend
from gpt2fn.model import check_sequence_fits, forward
from gpt2fn.params import Params, params_device, params_dtype
from gpt2fn.sampling import check_sampling_args, choose_token, noise_width, sample, uniform_noise
from gpt2fn.steps import compile_steps, eager_steps, prepare_for_compiled_steps, resolve_attention

Tensor = torch.Tensor


@dataclass(frozen=True)
class GenerationStats:
    n_prompt: int  # prompt tokens per sequence
    n_new: int  # tokens generated per sequence
    prefill_s: float  # prompt forward pass + choosing the first new token
    decode_s: float  # the timed decode steps, one new token each
    decode_tokens: int  # how many decode steps decode_s covers
    compile_s: float = 0.0  # with compile=True: the first decode step, which compiles (or loads) the graph

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def recompute_and_choose(
    params: Params, tokens: Tensor, noise: Optional[Tensor],
    *, config: GPTConfig, attention: AttentionBackend, temperature: float, top_k: int, top_p: float,
) -> Tensor:  # fmt: skip
    """The no-cache step: the whole sequence [B, T] -> the next token [B]."""
    logits = forward(params, config, tokens, attention=attention, last_only=True)[:, -1]
    return choose_token(logits, noise, temperature, top_k, top_p)


def generate(
    params: Params,
    config: GPTConfig,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    attention: str = "auto",
    stop_token: Optional[int] = None,
    compile: bool = False,
) -> Generator[Tensor, None, GenerationStats]:
    """Yield new tokens ([B] int64 each) for a batch of equal-length prompts
    ([B, T] int64), then return the timings.

    Stops after ``max_new_tokens``, or once every row has produced
    ``stop_token`` (which is yielded). Raises :class:`~gpt2fn.errors.GPT2FnError`
    if the prompt is empty or prompt + new tokens exceed the context.
    ``temperature=0`` is greedy. ``attention`` is "manual", "sdpa" or "auto"
    (see :func:`gpt2fn.steps.resolve_attention`). ``compile=True`` runs the decode step under
    ``torch.compile`` (see :mod:`gpt2fn.steps`); the first decode step, which
    compiles the graph (or loads it from the on-disk cache), is reported as
    ``compile_s`` and left out of ``decode_s``. Time spent by the caller
    between tokens is not counted.
    """
    check_sampling_args(temperature, top_k, top_p)
    B, T = prompt.shape
    check_sequence_fits(config, T, max_new_tokens)
    if max_new_tokens == 0:
        return GenerationStats(T, 0, 0.0, 0.0, 0)
    device = params_device(params)
    prompt = prompt.to(device)
    settings = dict(attention=attention, temperature=temperature, top_k=top_k, top_p=top_p)

    def noise() -> Optional[Tensor]:
        if temperature == 0:
            return None
        return uniform_noise((B, noise_width(config.vocab_size, top_k)), generator, device)

    if use_cache:
        steps = compile_steps(config, device, **settings) if compile else eager_steps(config, **settings)
        cache = make_cache(config, B, T + max_new_tokens, params_dtype(params), device)
        if compile:
            prepare_for_compiled_steps(params, cache)
    else:
        settings["attention"] = resolve_attention(attention)
        # The prompt's pass runs eager, as with the cache, so that compilation
        # happens in the first decode step and is reported as compile_s there.
        recompute_prompt = functools.partial(recompute_and_choose, config=config, **settings)
        recompute = torch.compile(recompute_prompt, fullgraph=True, dynamic=True) if compile else recompute_prompt
        sequence = prompt

    done = torch.zeros(B, dtype=torch.bool, device=device)

    def finished(token: Tensor) -> bool:
        nonlocal done
        if stop_token is None:
            return False
        done = done | (token == stop_token)
        return bool(done.all())

    # Prefill: the whole prompt in one pass; the last position's logits give token 1.
    start = time.perf_counter()
    with torch.inference_mode():
        if use_cache:
            token = steps.prefill(params, prompt, cache, torch.arange(T, device=device), noise())
        else:
            token = recompute_prompt(params, sequence, noise())
        synchronize(device)
    prefill_s = time.perf_counter() - start
    yield token
    n_new, decode_s, compile_s = 1, 0.0, 0.0
    stop = finished(token)

    while n_new < max_new_tokens and not stop:
        start = time.perf_counter()
        with torch.inference_mode():
            if use_cache:
                pos = torch.tensor([T + n_new - 1], device=device)
                token = steps.decode(params, token, cache, pos, noise())
            else:
                sequence = torch.cat([sequence, token[:, None]], dim=1)
                token = recompute(params, sequence, noise())
            synchronize(device)
        if compile and n_new == 1:  # the first compiled step pays for compiling
            compile_s = time.perf_counter() - start
        else:
            decode_s += time.perf_counter() - start
        n_new += 1
        yield token
        stop = finished(token)
    decode_tokens = n_new - 1 - (compile_s > 0)
    return GenerationStats(T, n_new, prefill_s, decode_s, decode_tokens, compile_s)


def generate_all(
    params: Params, config: GPTConfig, prompt: Tensor, max_new_tokens: int, **kwargs
) -> tuple[Tensor, GenerationStats]:
    """Run :func:`generate` to the end: (new tokens [B, n_new], stats)."""
    stream = generate(params, config, prompt, max_new_tokens, **kwargs)
    tokens = []
    while True:
        try:
            tokens.append(next(stream))
        except StopIteration as end:
            stats = end.value
            break
    if not tokens:
        return torch.empty(prompt.shape[0], 0, dtype=torch.long), stats
    return torch.stack(tokens, dim=1), stats


@dataclass(frozen=True)
class BatchResult:
    tokens: list[list[int]]  # new tokens per prompt (a stop token, when hit, is the last)
    stats: GenerationStats  # n_prompt: the longest prompt; n_new: steps run


def generate_batch(
    params: Params,
    config: GPTConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    attention: str = "auto",
    stop_token: Optional[int] = None,
) -> BatchResult:
    """Generate for prompts of different lengths in one batch, against one
    preallocated cache.

    Per-row positions, no left padding: prompts are right-padded to the
    longest and prefilled together at positions ``0..T-1``; row ``b``'s first
    new token comes from its own last prompt position, and its ``i``-th decode
    step writes and reads at position ``len_b + i``, so padding slots are
    overwritten before any query of that row can see them (the causal mask
    hides positions beyond the query's own). Nothing about a row depends on
    the others, so greedy rows equal generating each prompt alone.

    Each row stops on its own: at ``stop_token``, after ``max_new_tokens``, or
    when it reaches the context; the batch runs until every row has stopped
    (finished rows keep their fixed-shape slot, their further tokens dropped).
    """
    check_sampling_args(temperature, top_k, top_p)
    if not prompts:
        raise GPT2FnError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise GPT2FnError(f"prompt {i + 1} is empty; give at least one token of text")
        if len(p) > config.n_ctx:
            raise GPT2FnError(f"prompt {i + 1} is {len(p)} tokens but the context holds {config.n_ctx}; shorten it")
    if max_new_tokens < 0:
        raise GPT2FnError(f"max_tokens must be >= 0, got {max_new_tokens}")
    device = params_device(params)
    B, T = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    limits = [min(max_new_tokens, config.n_ctx - len(p)) for p in prompts]  # each row's own length limit
    out: list[list[int]] = [[] for _ in prompts]
    if max(limits) == 0:
        return BatchResult(out, GenerationStats(T, 0, 0.0, 0.0, 0))
    padded = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)
    cache = make_cache(config, B, min(config.n_ctx, T + max_new_tokens), params_dtype(params), device)
    backend = resolve_attention(attention)

    def choose(logits: Tensor) -> Tensor:
        return sample(logits, temperature, top_k, top_p, generator)

    def record(token: Tensor) -> bool:
        """Append each live row's token; True while any row is still going."""
        for b, t in enumerate(token.tolist()):
            if len(out[b]) < limits[b] and not (out[b] and out[b][-1] == stop_token):
                out[b].append(t)
        return any(len(o) < lim and not (o and o[-1] == stop_token) for o, lim in zip(out, limits))

    start = time.perf_counter()
    with torch.inference_mode():
        logits = forward(params, config, padded, cache, torch.arange(T, device=device), backend, out_index=lengths - 1)
        token = choose(logits[:, -1])
        going = record(token)
    prefill_s = time.perf_counter() - start
    steps, start = 1, time.perf_counter()
    with torch.inference_mode():
        while going:
            pos = (lengths + steps - 1)[:, None]  # [B, 1]: each row's own next position
            pos = pos.clamp(max=cache[0][0].shape[2] - 1)  # finished rows may run past their end; ignored
            token = choose(forward(params, config, token[:, None], cache, pos, backend)[:, -1])
            steps += 1
            going = record(token)
    decode_s = time.perf_counter() - start
    return BatchResult(out, GenerationStats(T, steps, prefill_s, decode_s, steps - 1))
