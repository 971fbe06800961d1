"""Autoregressive generation: prefill the prompt in one forward pass, then
one decode step per new token against the preallocated cache (or, for
comparison, recompute the whole sequence every step without a cache).

:func:`generate` is a Python generator: it yields each new token as soon as it
is chosen (streaming) and, when it finishes, returns a :class:`GenerationStats`
with prefill time, decode time and decode tokens/s. :func:`generate_all`
collects both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generator, Optional

import torch

from gpt2fn.cache import make_cache
from gpt2fn.config import GPTConfig
from gpt2fn.device import synchronize
from gpt2fn.layers import AttentionBackend
from gpt2fn.model import check_sequence_fits, decode_step, forward
from gpt2fn.params import Params, params_device, params_dtype
from gpt2fn.sampling import check_sampling_args, sample

Tensor = torch.Tensor


@dataclass(frozen=True)
class GenerationStats:
    n_prompt: int  # prompt tokens per sequence
    n_new: int  # tokens generated per sequence
    prefill_s: float  # prompt forward pass + choosing the first new token
    decode_s: float  # all later tokens (one decode step each)

    @property
    def decode_tokens(self) -> int:
        """Tokens made by decode steps: every new token after the first."""
        return max(self.n_new - 1, 0)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


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
    attention: AttentionBackend = "sdpa",
    stop_token: Optional[int] = None,
) -> Generator[Tensor, None, GenerationStats]:
    """Yield new tokens ([B] int64 each) for a batch of equal-length prompts
    ([B, T] int64), then return the timings.

    Stops after ``max_new_tokens``, or once every row has produced
    ``stop_token`` (which is yielded). Raises :class:`~gpt2fn.errors.GPT2FnError`
    if the prompt is empty or prompt + new tokens exceed the context.
    ``temperature=0`` is greedy. Time spent by the caller between tokens is
    not counted.
    """
    check_sampling_args(temperature, top_k, top_p)
    B, T = prompt.shape
    check_sequence_fits(config, T, max_new_tokens)
    device = params_device(params)
    prompt = prompt.to(device)
    choose = lambda logits: sample(logits, temperature, top_k, top_p, generator)  # noqa: E731
    if max_new_tokens == 0:
        return GenerationStats(T, 0, 0.0, 0.0)
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
            cache = make_cache(config, B, T + max_new_tokens, params_dtype(params), device)
            logits = forward(params, config, prompt, cache, torch.arange(T, device=device), attention)
        else:
            sequence = prompt
            logits = forward(params, config, sequence, attention=attention)
        token = choose(logits[:, -1])
        synchronize(device)
    prefill_s = time.perf_counter() - start
    yield token
    n_new, decode_s = 1, 0.0
    stop = finished(token)

    while n_new < max_new_tokens and not stop:
        start = time.perf_counter()
        with torch.inference_mode():
            if use_cache:
                pos = torch.tensor([T + n_new - 1], device=device)
                logits = decode_step(params, config, token, cache, pos, attention)
            else:
                sequence = torch.cat([sequence, token[:, None]], dim=1)
                logits = forward(params, config, sequence, attention=attention)[:, -1]
            token = choose(logits)
            synchronize(device)
        decode_s += time.perf_counter() - start
        n_new += 1
        yield token
        stop = finished(token)
    return GenerationStats(T, n_new, prefill_s, decode_s)


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
