"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

All functions are pure and work on a batch: logits [B, V] -> [B, V] or [B].
They are applied in the usual order (as in Hugging Face's ``generate``):
temperature, then top-k, then top-p, then a draw.

The draw uses the "exponential race": ``argmax(p / E)`` with ``E ~ Exp(1)``
picks index ``i`` with probability ``p_i``, exactly like ``torch.multinomial``,
but without a host synchronisation, so it can live inside a compiled step.
Randomness comes only from the ``torch.Generator`` passed in: the same seed
gives the same tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from gpt2fn.errors import GPT2FnError

Tensor = torch.Tensor


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise one clear line for impossible sampling parameters."""
    if not temperature >= 0:  # also catches NaN
        raise GPT2FnError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise GPT2FnError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GPT2FnError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the ``k`` largest logits per row (ties broken by index),
    set the rest to -inf. ``k = 0`` or ``k >= V`` leaves the logits unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose
    probability mass reaches ``p`` (always at least the most likely one),
    set the rest to -inf. ``p = 1`` leaves the logits unchanged."""
    if p >= 1.0:
        return logits
    sorted_logits, indices = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop = mass_before >= p  # the set had already reached p without this token
    drop[..., 0] = False  # never empty
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter(-1, indices, sorted_logits)


def filtered_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The distribution the sampler draws from: [B, V] fp32, rows sum to 1.
    ``temperature`` must be > 0 here (0 means greedy, handled by :func:`sample`)."""
    logits = logits.float() / temperature
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, dim=-1)


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pick one token per row. logits: [B, V] -> [B] int64.

    ``temperature == 0`` is greedy (argmax); otherwise draw from
    :func:`filtered_probs` with randomness from ``generator``.
    """
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / race, dim=-1)
