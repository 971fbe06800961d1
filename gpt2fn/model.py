"""The whole model as pure functions: ``hidden`` (embeddings and blocks: the
residual stream) and ``logits`` (final LayerNorm and the tied LM head).

Positions are always ``[B, T]``: row ``b``'s token ``t`` sits at ``pos[b, t]``.
Positions all rows share may be one row, ``[1, T]``, broadcast over the batch
(training and ``forward``: the position embedding's backward then sums over
the batch before the lookup, with no repeated index). With a cache, the new
tokens' keys and values are written into it at ``pos`` and attention reads the
whole cache; without one, ``pos`` is ``0..T-1`` (:func:`positions`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from gpt2fn.cache import KVCache, cache_len
from gpt2fn.config import GPTConfig
from gpt2fn.errors import check_context
from gpt2fn.layers import Kernels, LayerTap, block, causal_mask, embedding, layer_norm, linear
from gpt2fn.params import Params

Tensor = torch.Tensor
Tap = Callable[[str, int, Tensor], Tensor]  # (name, layer, tensor) -> tensor; see gpt2fn.interp


def positions(batch: int, length: int, device: torch.device | str = "cpu") -> Tensor:
    """``0..length-1`` in each of ``batch`` rows: [batch, length] int64."""
    return torch.arange(length, device=device).expand(batch, length)


def embed(params: Params, tokens: Tensor, pos: Tensor) -> Tensor:
    """Token plus position embeddings. tokens, pos: [B, T] -> [B, T, D].
    Both are lookups by ``F.embedding``, whose backward adds the rows of
    repeated indices in a fixed order (``wpe[pos]`` would add them with
    atomics, in arrival order: training would not repeat bit for bit)."""
    wpe = params["wpe"]
    return embedding(tokens, params["wte"], params.get("wte_scale"), wpe.dtype) + embedding(pos, wpe)


def hidden(
    params: Params, config: GPTConfig, tokens: Tensor, pos: Tensor, cache: Optional[KVCache] = None,
    tap: Optional[Tap] = None, kernels: Kernels = Kernels(), run_block: Callable = block,
) -> Tensor:  # fmt: skip
    """The residual stream after the last block. tokens: [B, T], pos: [B or 1, T] -> [B, T, D].
    ``tap`` is called at every named point of every layer and may replace
    what it sees (see :mod:`gpt2fn.interp`). ``run_block`` calls each block
    (training wraps :func:`~gpt2fn.layers.block` in activation checkpointing)."""
    check_context(tokens.shape[1], config.n_ctx)
    x = embed(params, tokens, pos)
    mask = causal_mask(pos, tokens.shape[1] if cache is None else cache_len(cache))
    for i, block_params in enumerate(params["blocks"]):
        x = run_block(
            x, **block_params, n_head=config.n_head, eps=config.layer_norm_eps, pos=pos, mask=mask,
            kv=None if cache is None else cache[i], approximate=config.gelu, kernels=kernels, tap=at_layer(tap, i),
        )  # fmt: skip
    return x


def at_layer(tap: Optional[Tap], layer: int) -> Optional[LayerTap]:
    """The model-wide tap with its layer index bound, as the layers call it."""
    return None if tap is None else (lambda name, t: tap(name, layer, t))


def logits(params: Params, config: GPTConfig, x: Tensor, linear=linear) -> Tensor:
    """Residual stream [..., D] -> logits [..., V]: the final LayerNorm, then
    the LM head, which is the token embedding (tied)."""
    x = layer_norm(x, **params["ln_f"], eps=config.layer_norm_eps)
    return linear(x, params["wte"], scale=params.get("wte_scale"))


def forward(
    params: Params, config: GPTConfig, tokens: Tensor, tap: Optional[Tap] = None, kernels: Kernels = Kernels()
) -> Tensor:
    """tokens [B, T] (a whole sequence, no cache) -> logits [B, T, V]."""
    x = hidden(params, config, tokens, positions(1, tokens.shape[1], device=tokens.device), None, tap, kernels)
    return logits(params, config, x, kernels.linear)
