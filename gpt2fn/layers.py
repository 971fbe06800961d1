"""GPT-2's layers as pure functions.

Each signature names the parameters and inputs a layer uses, so a block's dict
unpacks into it with ``**`` (as in picoGPT). Shapes: ``B`` batch, ``T`` new
tokens, ``D`` width, ``H`` heads, ``hd = D // H``, ``S`` keys (the cache length,
or ``T`` without a cache). Positions are always ``[B, T]``.

The only side effect is attention writing new keys/values into the
preallocated cache it is handed (see :mod:`gpt2fn.cache`). How products and
attention are computed is a value, :class:`Kernels`: the same functions,
spelled for different machines; a compiled step picks its kernels explicitly.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from gpt2fn.cache import LayerKV
from gpt2fn.device import DEQUANT_BLOCK, MATVEC_BF16_MAX_ROWS, MATVEC_GROUPS, MATVEC_HEAD_GROUPS, ONEDNN

Tensor = torch.Tensor
# A tap sees a layer's intermediates by name and returns them, or a replacement
# (see gpt2fn.interp); the model binds the layer index. None costs one `if`.
LayerTap = Callable[[str, Tensor], Tensor]


def gelu(x: Tensor, approximate: str = "tanh") -> Tensor:
    """GPT-2's GELU, the tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi) (x +
    0.044715 x^3)))``; with ``approximate="none"``, the exact ``0.5 x (1 + erf(x / sqrt(2)))``."""
    return F.gelu(x, approximate=approximate)


def layer_norm(x: Tensor, g: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * g + b`` over the last dim. x: [..., D]."""
    return F.layer_norm(x, (x.shape[-1],), g, b, eps)


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    """``x @ w.T + b``. x: [..., in], w: [out, in], b: [out] -> [..., out].
    ``scale`` ([out], fp32) marks an int8 weight-only quantized ``w``: the
    product is ``(x @ w.T) * scale`` (see :mod:`gpt2fn.quantize`)."""
    if scale is None:
        return F.linear(x, w, b)
    y = F.linear(x, w.to(x.dtype)) * scale.to(x.dtype)
    return y if b is None else y + b


# The most rows (a compiled decode step's batch) matvec sums; of fp32 weights
# (of bf16 ones: MATVEC_BF16_MAX_ROWS, by the machine).
MATVEC_MAX_ROWS, MATVEC_FP32_MAX_ROWS = 16, 8


def matvec(x: Tensor, w: Tensor, b: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    """The same function as :func:`linear`, for ``torch.compile`` on the CPU
    with 1 to :data:`MATVEC_MAX_ROWS` rows (a decode step's batch; the count is
    static). The weights are summed in fp32 as ``(row * part).sum(-1)`` for
    each row of ``x`` and each of :func:`matvec_groups` groups of ``w``'s rows.
    Inductor fuses the sums into one loop that reads each weight once for all
    rows, upcasts a bf16, fp16 or int8 one in registers and keeps an
    accumulator per sum (one sum alone waits on one accumulator). Each row's
    sum is, bit for bit, the one a single sum over all of ``w`` computes.
    Past :data:`MATVEC_FP32_MAX_ROWS` rows fp32 weights, and past
    :data:`~gpt2fn.device.MATVEC_BF16_MAX_ROWS` bf16 ones, go to
    :func:`few_rows`. Eagerly the loop would materialise ``[out, in]`` per
    row: compiled steps only. Measured in the README's Speed section."""
    if x.numel() > matvec_max_rows(w.dtype) * x.shape[-1]:
        return few_rows(x, w, b, scale)
    per_group = -(-w.shape[0] // matvec_groups(w.shape[0]))
    rows = x.float().reshape(-1, 1, x.shape[-1])  # [R, 1, in]
    # one flat cat of the R * groups sums, each written in place into its slice
    y = torch.cat([(row * part.float()).sum(-1) for row in rows for part in w.split(per_group)])
    y = y.view(*x.shape[:-1], w.shape[0])
    if scale is not None:
        y = y * scale
    return (y if b is None else y + b.float()).to(x.dtype)


def matvec_max_rows(dtype: torch.dtype) -> int:
    """The most rows :func:`matvec` sums itself for weights of ``dtype`` (past them, :func:`few_rows`)."""
    return {torch.float32: MATVEC_FP32_MAX_ROWS, torch.bfloat16: MATVEC_BF16_MAX_ROWS}.get(dtype, MATVEC_MAX_ROWS)


def matvec_groups(rows: int) -> int:
    """The groups :func:`matvec` sums a weight's rows in, by the machine
    (:data:`~gpt2fn.device.MATVEC_GROUPS`; the LM head's from 16384 rows)."""
    return MATVEC_HEAD_GROUPS if rows >= 16384 else MATVEC_GROUPS


def int8_sums(x: Tensor, w: Tensor, b: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    """The same function as :func:`linear`, for ``torch.compile`` on a GPU: an
    int8 weight is upcast inside the sums ``(x * w).sum(-1)``, one reduction
    that inductor generates reading each weight byte once (:func:`linear`
    converts the whole matrix first: 1 byte a weight read, then 4 written and
    read again); other weights go to :func:`linear` (cuBLAS). Eagerly the
    sums would materialise ``[..., out, in]``: compiled steps only."""
    if scale is None:
        return linear(x, w, b)
    y = (x.float()[..., None, :] * w.float()).sum(-1) * scale
    return (y if b is None else y + b.float()).to(x.dtype)


def few_rows(x: Tensor, w: Tensor, b: Optional[Tensor] = None, scale: Optional[Tensor] = None) -> Tensor:
    """The same function as :func:`linear`, gradients included, for the eager
    steps, training, a speculative verify pass and compiled batches past
    matvec's rows, on the CPU: fp32 products go to the op
    ``gpt2fn::few_rows_linear``, which takes oneDNN's product or MKL's
    (``F.linear``) by :data:`~gpt2fn.device.ONEDNN_ROWS` (see
    :mod:`gpt2fn.device`), and so do int8 weights' (fp32 activations):
    :func:`linear`'s product of the dequantized weight, dequantized
    :data:`~gpt2fn.device.DEQUANT_BLOCK` weights at a time; other dtypes and
    devices, autocast and builds without oneDNN use :func:`linear`."""
    cpu_fp32 = x.dtype == torch.float32 and w.device.type == "cpu" and ONEDNN and not torch.is_autocast_enabled("cpu")
    if cpu_fp32 and scale is not None:
        y = torch.cat([few_rows(x, part.to(x.dtype)) for part in w.split(max(1, DEQUANT_BLOCK // w.shape[1]))], -1)
        return y * scale if b is None else y * scale + b
    if cpu_fp32 and w.dtype == torch.float32:
        return torch.ops.gpt2fn.few_rows_linear(x, w, b)
    return linear(x, w, b, scale)


def embedding(tokens: Tensor, wte: Tensor, scale: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Rows of the token embedding. tokens: [B, T] -> [B, T, D]; an int8 ``wte``
    is dequantized with its per-row ``scale`` into ``dtype``."""
    rows = F.embedding(tokens, wte)  # its backward adds rows in a fixed order (deterministic)
    return rows if scale is None else rows.to(dtype) * scale[tokens][..., None].to(dtype)


def ffn(x: Tensor, c_fc: dict, c_proj: dict, *, approximate="tanh", linear=linear, tap: Optional[LayerTap] = None) -> Tensor:
    """Position-wise feed-forward: [B, T, D] -> [B, T, 4D] -> [B, T, D].
    Tap point "mlp_act": the GELU output, [B, T, 4D]."""
    h = gelu(linear(x, **c_fc), approximate)
    if tap is not None:
        h = tap("mlp_act", h)
    return linear(h, **c_proj)


def causal_mask(pos: Tensor, n_keys: int) -> Tensor:
    """pos [B, T] -> bool [B, 1, T, n_keys]: the query at position ``p`` may
    see key ``j`` iff ``j <= p`` (broadcast over heads)."""
    return (torch.arange(n_keys, device=pos.device) <= pos[..., None])[:, None]


def attend_manual(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, tap: Optional[LayerTap] = None) -> Tensor:
    """Masked softmax attention, spelled out. q: [B, H, T, hd]; k, v:
    [B, H, S, hd]; mask: bool [B, 1, T, S] (True = may attend) -> [B, H, T, hd].
    Tap point "attn_probs" ([B, H, T, S]) exists here only."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    # softmax in fp32: exp() of reduced-precision scores loses the small weights
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    if tap is not None:
        probs = tap("attn_probs", probs)
    return probs @ v


def attend_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, tap: Optional[LayerTap] = None) -> Tensor:
    """The same function as :func:`attend_manual` by PyTorch's fused
    ``scaled_dot_product_attention`` (no "attn_probs": they never exist)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Kernels(NamedTuple):
    """How a block computes its products and its attention."""

    linear: Callable = linear
    attend: Callable = attend_sdpa


ATTEND = {"manual": attend_manual, "sdpa": attend_sdpa}  # the names of ``attention=`` / ``--attention``


def attention(
    x: Tensor, c_attn: dict, c_proj: dict, *, n_head: int, pos: Tensor, mask: Tensor,
    kv: Optional[LayerKV] = None, kernels: Kernels = Kernels(), tap: Optional[LayerTap] = None,
) -> Tensor:  # fmt: skip
    """Causal multi-head self-attention. x: [B, T, D] -> [B, T, D].

    Without a cache (``kv=None``) the T tokens attend among themselves. With
    one, their keys/values are first written into ``kv`` at ``pos`` [B, T]
    (in place; row b's token t goes to slot ``pos[b, t]``), then the queries
    attend over the whole cache under ``mask`` (:func:`causal_mask`): the
    shapes never depend on how much of the cache is filled.
    Tap points "attn_heads" ([B, T, H, hd], before ``c_proj`` mixes the heads)
    and "attn_out" ([B, T, D]).
    """
    B, T, D = x.shape
    hd = D // n_head
    q, k, v = (t.view(B, T, n_head, hd) for t in kernels.linear(x, **c_attn).split(D, dim=-1))  # 3 x [B, T, H, hd]
    if kv is not None:
        rows = torch.arange(B, device=pos.device)[:, None]  # [B, 1]
        kv[0][rows, :, pos], kv[1][rows, :, pos] = k, v  # row b's token t into slot pos[b, t]
        k, v = kv  # the whole cache, [B, H, S, hd]
    else:
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
    q = q.transpose(1, 2)  # [B, H, T, hd]
    y = kernels.attend(q, k, v, mask, tap).transpose(1, 2)  # [B, T, H, hd]
    if tap is not None:
        y = tap("attn_heads", y)
    out = kernels.linear(y.reshape(B, T, D), **c_proj)
    return out if tap is None else tap("attn_out", out)


def block(
    x: Tensor, ln_1: dict, attn: dict, ln_2: dict, mlp: dict, *, n_head: int, eps: float, pos: Tensor, mask: Tensor,
    kv: Optional[LayerKV] = None, approximate="tanh", kernels: Kernels = Kernels(), tap: Optional[LayerTap] = None,
) -> Tensor:  # fmt: skip
    """One pre-LayerNorm transformer block. x: [B, T, D] -> [B, T, D].
    Tap point "resid": the residual stream after the block."""
    x = x + attention(layer_norm(x, **ln_1, eps=eps), **attn, n_head=n_head, pos=pos, mask=mask, kv=kv,
                      kernels=kernels, tap=tap)  # fmt: skip
    x = x + ffn(layer_norm(x, **ln_2, eps=eps), **mlp, approximate=approximate, linear=kernels.linear, tap=tap)
    return x if tap is None else tap("resid", x)
