"""A small research toolkit on the pure forward: record intermediates, edit
params, replace activations.

Everything goes through ``hidden(..., tap=...)`` (or ``forward``): a tap is
a function ``(name, layer, tensor) -> tensor`` called at each named point of
each layer:

==============  ===================  ==========================================
name            shape                what
==============  ===================  ==========================================
"attn_probs"    [B, H, T, S]         attention probabilities per head
"attn_heads"    [B, T, H, hd]        each head's output, before ``c_proj``
"attn_out"      [B, T, D]            the attention block's output
"mlp_act"       [B, T, 4D]           the MLP's GELU activations
"resid"         [B, T, D]            the residual stream after the block
==============  ===================  ==========================================

Returning the tensor unchanged observes; returning another one intervenes.
Without a tap (the default) the forward and the compiled step are unchanged.
"attn_probs" exists only with the spelled-out attention
(``kernels=MANUAL``, which :func:`run_with_cache` uses); the fused SDPA
kernel never forms the probabilities.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from gpt2fn.config import GPTConfig
from gpt2fn.errors import GPT2FnError, check_int
from gpt2fn.layers import Kernels, attend_manual
from gpt2fn.model import Tap, forward, logits
from gpt2fn.params import Params

Tensor = torch.Tensor
MANUAL = Kernels(attend=attend_manual)  # the kernels whose attention probabilities exist
POINTS = ("attn_probs", "attn_heads", "attn_out", "mlp_act", "resid")  # the names a tap sees


def check_point(name: str, layer: int) -> None:
    """One clear line for a tap point that never fires: a name not in
    :data:`POINTS` (a typo would intervene nowhere) or a negative layer."""
    if name not in POINTS:
        raise GPT2FnError(f"no tap point {name!r}; the points are {', '.join(POINTS)}")
    check_int("layer", layer, low=0)


def run_with_cache(params: Params, config: GPTConfig, tokens: Tensor, tap: Optional[Tap] = None) -> tuple[Tensor, dict]:
    """Logits plus every intermediate: ``(logits, {(name, layer): tensor})``.
    An extra ``tap`` may also intervene; what is recorded is what it returned."""
    recorded: dict[tuple[str, int], Tensor] = {}

    def record(name: str, layer: int, t: Tensor) -> Tensor:
        t = tap(name, layer, t) if tap is not None else t
        recorded[(name, layer)] = t.detach()
        return t

    return forward(params, config, tokens, tap=record, kernels=MANUAL), recorded


def ablate_head(params: Params, layer: int, head: int, n_head: int) -> Params:
    """Params in which head ``head`` of ``layer`` contributes nothing: the
    input columns of that layer's attention output projection that read the
    head are zeroed. Copy-on-write: only that one tensor is copied."""
    if not 0 <= layer < len(params["blocks"]) or not 0 <= head < n_head:
        raise GPT2FnError(f"layer {layer}, head {head} is not in the model: its layers are 0 to "
                          f"{len(params['blocks']) - 1}, its heads 0 to {n_head - 1}")  # fmt: skip
    c_proj = params["blocks"][layer]["attn"]["c_proj"]
    hd = c_proj["w"].shape[1] // n_head
    w = c_proj["w"].clone()
    w[:, head * hd : (head + 1) * hd] = 0
    blocks = list(params["blocks"])
    attn = {**blocks[layer]["attn"], "c_proj": {**c_proj, "w": w}}
    blocks[layer] = {**blocks[layer], "attn": attn}
    return {**params, "blocks": blocks}


def zero_head_tap(layer: int, head: int) -> Tap:
    """The same ablation as a replacement function: zero that head's output."""
    check_int("layer", layer, low=0)
    check_int("head", head, low=0)

    def tap(name: str, i: int, t: Tensor) -> Tensor:
        if name == "attn_heads" and i == layer:
            t = t.clone()
            t[:, :, head] = 0
        return t

    return tap


def patch(name: str, layer: int, replacement: Tensor | Callable[[Tensor], Tensor]) -> Tap:
    """Replace one intermediate (e.g. another prompt's "resid" at ``layer``).
    ("attn_probs" fires only with ``kernels=MANUAL``.)"""
    check_point(name, layer)

    def tap(n: str, i: int, t: Tensor) -> Tensor:
        if n == name and i == layer:
            return replacement(t) if callable(replacement) else replacement
        return t

    return tap


def logit_lens(params: Params, config: GPTConfig, resid: Tensor) -> Tensor:
    """Read a residual stream ([..., D]) as if it were the last layer's: the
    final LayerNorm and the LM head applied to it -> logits [..., V]."""
    return logits(params, config, resid)
