"""The whole model as one pure function, plus the single-token decode step.

``forward`` works in two modes, chosen by whether a cache is passed:

* no cache: ``tokens`` is the whole sequence so far; positions are ``0..T-1``.
  This is the recompute-everything path, kept for comparison and for training.
* with a cache: ``tokens`` are new tokens at positions ``pos``; their keys and
  values are written into the cache in place and attention reads the cache.
  A prompt is prefilled with ``pos = 0..T-1``; each later token is one call
  with ``T = 1`` and ``pos = [t]``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.utils.checkpoint

from gpt2fn.cache import KVCache, cache_len
from gpt2fn.config import GPTConfig
from gpt2fn.errors import GPT2FnError
from gpt2fn.layers import AttentionBackend, Tap, block, embedding, layer_norm, linear
from gpt2fn.params import Params

Tensor = torch.Tensor


def forward(
    params: Params,
    config: GPTConfig,
    tokens: Tensor,
    cache: Optional[KVCache] = None,
    pos: Optional[Tensor] = None,
    attention: AttentionBackend = "sdpa",
    last_only: bool = False,
    checkpoint_blocks: bool = False,
    out_index: Optional[Tensor] = None,
    tap: Optional[Tap] = None,
) -> Tensor:
    """tokens: [B, T] int64 -> logits [B, T, V] (in the params' dtype), or
    [B, 1, V] for the last position only with ``last_only`` (all that
    generation needs: it skips the LM head, the largest matrix, for the rest).

    ``pos`` ([T] int64, default ``0..T-1``) are the absolute positions of the
    tokens; with a ``cache`` they are also where the new keys/values are written.
    ``checkpoint_blocks`` recomputes each block's activations in the backward
    pass instead of storing them (training memory for compute).
    ``pos`` may also be [B, T], one row of positions per sequence (ragged
    batches); ``out_index`` ([B]) then picks the one position per row whose
    logits to return ([B, 1, V]), e.g. each prompt's last real token.
    ``tap`` (research, see :mod:`gpt2fn.interp`) is called with every
    intermediate ("resid", "attn_probs", "attn_heads", "attn_out", "mlp_act",
    with the layer index) and may replace it; with a tap the attention is
    the manual one, whose probabilities exist.
    """
    B, T = tokens.shape
    if tap is not None:
        attention = "manual"
    if pos is None:
        pos = torch.arange(T, device=tokens.device)
    wte, wte_scale = params["wte"], params.get("wte_scale")  # wte_scale: int8 weights only
    x = embedding(tokens, wte, wte_scale, params["wpe"].dtype) + params["wpe"][pos]  # [B, T, D]
    for i, block_params in enumerate(params["blocks"]):
        kv = None if cache is None else cache[i]
        run = functools.partial(
            block, **block_params, n_head=config.n_head, eps=config.layer_norm_eps, pos=pos, kv=kv,
            backend=attention, tap=tap, layer=i,
        )  # fmt: skip
        # activation checkpointing (training): keep only each block's input, recompute the rest in backward
        x = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False) if checkpoint_blocks else run(x)
    if last_only:
        x = x[:, -1:]
    elif out_index is not None:
        x = x[torch.arange(B, device=x.device), out_index][:, None]
    x = layer_norm(x, **params["ln_f"], eps=config.layer_norm_eps)
    return linear(x, wte, scale=wte_scale)  # the LM head is the token embedding (tied): [B, T, V]


def decode_step(
    params: Params,
    config: GPTConfig,
    token: Tensor,
    cache: KVCache,
    pos: Tensor,
    attention: AttentionBackend = "sdpa",
) -> Tensor:
    """One new token per sequence against the cache. token: [B] int64,
    pos: [1] int64 (a tensor, so one compiled graph serves every step)
    -> logits [B, V] for the next token. Writes the cache in place."""
    return forward(params, config, token[:, None], cache, pos, attention)[:, -1]


def check_sequence_fits(config: GPTConfig, n_prompt: int, max_new_tokens: int, cache: Optional[KVCache] = None) -> None:
    """Raise one clear line if a prompt plus the tokens to generate do not fit."""
    if n_prompt == 0:
        raise GPT2FnError("the prompt is empty; give at least one token of text")
    if max_new_tokens < 0:
        raise GPT2FnError(f"max_tokens must be >= 0, got {max_new_tokens}")
    limit = config.n_ctx if cache is None else min(config.n_ctx, cache_len(cache))
    if n_prompt > limit:
        raise GPT2FnError(
            f"the prompt is {n_prompt} tokens but the context holds {limit}; shorten the prompt"
        )
    if n_prompt + max_new_tokens > limit:
        raise GPT2FnError(
            f"prompt ({n_prompt} tokens) + max_tokens ({max_new_tokens}) exceeds the {limit}-token context; "
            f"use max_tokens <= {limit - n_prompt} or a shorter prompt"
        )
