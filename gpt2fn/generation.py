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
from gpt2fn.layers import AttentionBackend
from gpt2fn.model import check_sequence_fits, forward
from gpt2fn.params import Params, params_device, params_dtype
from gpt2fn.sampling import check_sampling_args, choose_token, noise_width, uniform_noise
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
