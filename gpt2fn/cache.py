"""The KV cache: an immutable tuple of preallocated tensors.

``make_cache`` allocates, once, one ``(k, v)`` pair per layer, each
``[batch, n_head, max_len, head_dim]``. Attention writes the keys and values
of new tokens into these tensors *in place* at the positions it is given
(an indexed assignment, ``k[rows, :, pos] = ...``); the tuple itself never
changes, nothing is reallocated or concatenated, so every decode step sees
the same shapes and the same storage (which is what a compiled graph, or a
CUDA graph, needs).

Unwritten slots hold zeros and are masked out by position, never read as data.
A call that touches only the first ``n`` positions may be handed
``window(cache, n)``: views of those positions, so that attention reads ``n``
keys instead of ``max_len`` (what the decode loop does, see
:mod:`gpt2fn.generation`); its writes land in the cache. A cache made for
windows (``spare=True``) has each tensor the first ``max_len`` positions of
a buffer one position longer, never written, so that the whole cache and
every window of it have the same memory layout (a tensor that is its whole
buffer is contiguous, a window is not, and compiled code is specialised on
that: the whole cache and its windows would compile two graphs).
"""

from __future__ import annotations

import torch

from gpt2fn.config import GPTConfig
from gpt2fn.errors import GPT2FnError

LayerKV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [B, H, max_len, head_dim]
KVCache = tuple[LayerKV, ...]  # one entry per layer


def make_cache(
    config: GPTConfig,
    batch: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    spare: bool = False,
) -> KVCache:
    """Preallocate a zeroed cache for ``batch`` sequences of up to ``max_len``
    tokens; with ``spare``, laid out as its windows are (see the module docstring)."""
    if not 0 < max_len <= config.n_ctx:
        raise GPT2FnError(
            f"cache length {max_len} must be between 1 and the model's context of {config.n_ctx}"
        )
    shape = (batch, config.n_head, max_len + (1 if spare else 0), config.head_dim)
    return tuple(
        tuple(torch.zeros(shape, dtype=dtype, device=device)[:, :, :max_len] for _ in "kv") for _ in range(config.n_layer)
    )


def window(cache: KVCache, n: int) -> KVCache:
    """The first ``n`` positions of every layer: views ``[B, H, n, head_dim]``
    of the cache's tensors (the same storage)."""
    return tuple((k[:, :, :n], v[:, :, :n]) for k, v in cache)


def cache_len(cache: KVCache) -> int:
    """How many positions the cache holds (its ``max_len``; a window's ``n``)."""
    return cache[0][0].shape[2]


def cache_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for kv in cache for t in kv)
