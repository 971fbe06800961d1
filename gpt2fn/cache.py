"""The KV cache: an immutable tuple of preallocated tensors.

``make_cache`` allocates, once, one ``(k, v)`` pair per layer, each
``[batch, n_head, max_len, head_dim]``. Attention writes the keys and values
of new tokens into these tensors *in place* at the positions it is given
(``Tensor.index_copy_``); the tuple itself never changes, nothing is
reallocated or concatenated, so every decode step sees the same shapes and the
same storage (which is what a compiled graph, or a CUDA graph, needs).

Unwritten slots hold zeros and are masked out by position, never read as data.
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
) -> KVCache:
    """Preallocate a zeroed cache for ``batch`` sequences of up to ``max_len`` tokens."""
    if not 0 < max_len <= config.n_ctx:
        raise GPT2FnError(
            f"cache length {max_len} must be between 1 and the model's context of {config.n_ctx}"
        )
    shape = (batch, config.n_head, max_len, config.head_dim)
    return tuple(
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.n_layer)
    )


def cache_len(cache: KVCache) -> int:
    """How many positions the cache holds (its ``max_len``)."""
    return cache[0][0].shape[2]


def cache_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for kv in cache for t in kv)
