"""GPT-2's layers as pure functions.

Each function's signature names exactly the parameters it needs, so a block's
dict unpacks into it with ``**`` (as in picoGPT). Shapes: ``B`` batch, ``T``
new tokens, ``D`` model width, ``H`` heads, ``hd = D // H``, ``L`` cache length.

The only side effect anywhere is attention writing the new keys/values into the
preallocated KV cache it is handed (see :mod:`gpt2fn.cache`).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from gpt2fn.cache import LayerKV
from gpt2fn.errors import GPT2FnError

Tensor = torch.Tensor
AttentionBackend = Literal["manual", "sdpa"]
ATTENTION_BACKENDS: tuple[str, ...] = ("manual", "sdpa")


def gelu(x: Tensor) -> Tensor:
    """GPT-2's GELU, the tanh approximation:
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return F.gelu(x, approximate="tanh")


def layer_norm(x: Tensor, g: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * g + b`` over the last dim. x: [..., D]."""
    return F.layer_norm(x, (x.shape[-1],), g, b, eps)


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    """``x @ w.T + b``. x: [..., in], w: [out, in], b: [out] -> [..., out].

    ``scale`` ([out], fp32) marks an int8 weight-only quantized ``w``: the
    product is ``(x @ w.T) * scale`` (see :mod:`gpt2fn.quantize`).

    Inside ``torch.compile`` on the CPU, a single row (batch-1 decoding) takes
    a matrix-vector path spelled as a broadcast multiply and a sum: inductor
    turns that into one fused, vectorised, multi-threaded loop that reads each
    weight once, upcasts it in registers (bf16 or int8 -> fp32) and accumulates
    in fp32. On the 2-core CPU we measured it at ~35 GB/s on the 154 MB LM head,
    where the library matrix-vector call reaches ~13 GB/s; decoding is bound by
    exactly this weight traffic. Everywhere else (and on CUDA, where cuBLAS
    serves matrix-vector products well): ``F.linear``.
    """
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        y = (x.float()[..., None, :] * w.float()).sum(-1)
        if scale is not None:
            y = y * scale
        return (y if b is None else y + b.float()).to(x.dtype)
    if scale is not None:
        y = F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)
        return y if b is None else y + b
    return F.linear(x, w, b)


def embedding(tokens: Tensor, wte: Tensor, scale: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Rows of the token embedding. tokens: [B, T] -> [B, T, D]; an int8 ``wte``
    is dequantized with its per-row ``scale`` into ``dtype``."""
    rows = F.embedding(tokens, wte)  # its backward adds rows in a fixed order (deterministic)
    return rows if scale is None else rows.to(dtype) * scale[tokens][..., None].to(dtype)


# A tap sees intermediate tensors by name and layer and returns them, or a
# replacement (see gpt2fn.interp). None (the default) costs one `if` per point.
Tap = Callable[[str, int, Tensor], Tensor]


def mlp(x: Tensor, c_fc: dict, c_proj: dict, tap: Optional[Tap] = None, layer: int = 0) -> Tensor:
    """Position-wise feed-forward: [B, T, D] -> [B, T, 4D] -> [B, T, D].
    Tap point "mlp_act": the GELU output, [B, T, 4D]."""
    h = gelu(linear(x, **c_fc))
    if tap is not None:
        h = tap("mlp_act", layer, h)
    return linear(h, **c_proj)


# ``block`` receives the MLP's parameters as an argument named ``mlp`` (the key
# in the params dict), which shadows the function inside it; this alias reaches it.
_mlp = mlp


def causal_mask(pos: Tensor, n_keys: int) -> Tensor:
    """Boolean [T, n_keys] for shared positions ``pos`` [T], or [B, 1, T, n_keys]
    for per-row positions [B, T]: the query at position ``p`` may see key
    ``j`` iff ``j <= p``."""
    mask = torch.arange(n_keys, device=pos.device) <= pos[..., None]
    return mask if pos.dim() == 1 else mask[:, None]  # broadcast over heads


def attend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, backend: str, tap: Optional[Tap] = None, layer: int = 0
) -> Tensor:
    """Masked softmax attention. q: [B, H, T, hd]; k, v: [B, H, S, hd];
    mask: bool [T, S] (True = may attend) -> [B, H, T, hd].

    "manual" spells the computation out; "sdpa" hands it to PyTorch's fused
    ``scaled_dot_product_attention``. Both compute the same function. Tap
    point "attn_probs" ([B, H, T, S]) exists on the manual path only.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "manual":
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
        scores = scores.masked_fill(~mask, float("-inf"))
        # softmax in fp32: exp() of reduced-precision scores loses the small weights
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        if tap is not None:
            probs = tap("attn_probs", layer, probs)
        return probs @ v
    raise GPT2FnError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


def attention(
    x: Tensor,
    c_attn: dict,
    c_proj: dict,
    *,
    n_head: int,
    pos: Tensor,
    kv: Optional[LayerKV] = None,
    backend: AttentionBackend = "sdpa",
    tap: Optional[Tap] = None,
    layer: int = 0,
) -> Tensor:
    """Causal multi-head self-attention. x: [B, T, D] -> [B, T, D].

    ``pos`` ([T], int64) gives the absolute position of each of the T tokens;
    [B, T] gives every row its own positions (batches of ragged prompts).
    Without a cache (``kv=None``) the T tokens attend among themselves, so
    ``pos`` must be ``0..T-1``. With a cache, their keys/values are first
    written into ``kv`` at ``pos`` (in place), then the queries attend over the
    whole cache, masked to positions ``<= pos``; the shapes never depend on how
    much of the cache is filled.
    """
    B, T, D = x.shape
    hd = D // n_head
    q, k, v = linear(x, **c_attn).split(D, dim=-1)  # 3 x [B, T, D]
    q, k, v = (t.view(B, T, n_head, hd).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
    if kv is not None:
        k_cache, v_cache = kv
        if pos.dim() == 1:
            k_cache.index_copy_(2, pos, k)
            v_cache.index_copy_(2, pos, v)
        else:  # per-row positions: row b's tokens go to slots pos[b]
            index = pos[:, None, :, None].expand(B, n_head, T, hd)
            k_cache.scatter_(2, index, k)
            v_cache.scatter_(2, index, v)
        k, v = k_cache, v_cache  # [B, H, L, hd]
    y = attend(q, k, v, causal_mask(pos, k.shape[2]), backend, tap, layer).transpose(1, 2)  # [B, T, H, hd]
    if tap is not None:
        y = tap("attn_heads", layer, y)  # each head's output before the projection mixes them
    out = linear(y.reshape(B, T, D), **c_proj)
    return out if tap is None else tap("attn_out", layer, out)


def block(
    x: Tensor,
    ln_1: dict,
    attn: dict,
    ln_2: dict,
    mlp: dict,
    *,
    n_head: int,
    eps: float,
    pos: Tensor,
    kv: Optional[LayerKV] = None,
    backend: AttentionBackend = "sdpa",
    tap: Optional[Tap] = None,
    layer: int = 0,
) -> Tensor:
    """One pre-LayerNorm transformer block. x: [B, T, D] -> [B, T, D].
    Tap point "resid": the residual stream after the block."""
    x = x + attention(layer_norm(x, **ln_1, eps=eps), **attn, n_head=n_head, pos=pos, kv=kv, backend=backend,
                      tap=tap, layer=layer)  # fmt: skip
    x = x + _mlp(layer_norm(x, **ln_2, eps=eps), **mlp, tap=tap, layer=layer)
    return x if tap is None else tap("resid", layer, x)
