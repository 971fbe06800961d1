"""Parameters as a plain nested dict of tensors, GPT-2's initialisation, and
helpers to walk the dict.

Layout (shapes for ``D = n_embd``, ``V = vocab_size``, ``T = n_ctx``)::

    {
      "wte": [V, D],            # token embedding, also the LM head (tied)
      "wpe": [T, D],            # position embedding
      "blocks": [               # one dict per layer
        {
          "ln_1": {"g": [D], "b": [D]},
          "attn": {"c_attn": {"w": [3D, D], "b": [3D]},
                   "c_proj": {"w": [D, D],  "b": [D]}},
          "ln_2": {"g": [D], "b": [D]},
          "mlp":  {"c_fc":   {"w": [4D, D], "b": [4D]},
                   "c_proj": {"w": [D, 4D], "b": [D]}},
        }, ...
      ],
      "ln_f": {"g": [D], "b": [D]},
    }

Linear weights are stored ``[out, in]`` (the ``torch.nn.functional.linear``
layout): each output is a dot product over a contiguous row, which suits the
matrix-vector products of batch-1 decoding. The Hugging Face checkpoints use
``Conv1D``'s ``[in, out]``; the loader transposes.

The LM head *is* ``wte``: there is no second tensor to drift out of sync, and
training updates both roles through one tensor, as in GPT-2.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from gpt2fn.config import GPTConfig

Params = dict[str, Any]  # nested dict / list of tensors, see the module docstring


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Dotted name -> shape of every parameter a config implies, in a fixed
    order (the layout in the module docstring, flattened)."""
    V, T, D = config.vocab_size, config.n_ctx, config.n_embd
    shapes: dict[str, tuple[int, ...]] = {"wte": (V, D), "wpe": (T, D)}
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        shapes.update({
            p + "ln_1.g": (D,), p + "ln_1.b": (D,),
            p + "attn.c_attn.w": (3 * D, D), p + "attn.c_attn.b": (3 * D,),
            p + "attn.c_proj.w": (D, D), p + "attn.c_proj.b": (D,),
            p + "ln_2.g": (D,), p + "ln_2.b": (D,),
            p + "mlp.c_fc.w": (4 * D, D), p + "mlp.c_fc.b": (4 * D,),
            p + "mlp.c_proj.w": (D, 4 * D), p + "mlp.c_proj.b": (D,),
        })  # fmt: skip
    shapes.update({"ln_f.g": (D,), "ln_f.b": (D,)})
    return shapes


def init_params(
    config: GPTConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Params:
    """GPT-2's initialisation: weights and embeddings N(0, 0.02), biases 0,
    LayerNorm gains 1, and the two projections that write into the residual
    stream (attention and MLP ``c_proj``) scaled by ``1/sqrt(2 * n_layer)`` so
    the residual variance does not grow with depth. Deterministic per ``seed``."""
    g = torch.Generator().manual_seed(seed)
    std = 0.02
    resid_std = std / math.sqrt(2 * config.n_layer)
    flat = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".g"):
            t = torch.ones(shape)
        elif name.endswith(".b"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * (resid_std if name.endswith("c_proj.w") else std)
        flat[name] = t.to(device=device, dtype=dtype)
    return unflatten_params(flat)


def map_params(fn: Callable[[torch.Tensor], torch.Tensor], params: Any) -> Any:
    """Apply ``fn`` to every tensor of a nested dict/list, keeping the structure."""
    if isinstance(params, dict):
        return {k: map_params(fn, v) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return type(params)(map_params(fn, v) for v in params)
    return fn(params)


def flatten_params(params: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"blocks.0.attn.c_attn.w": tensor, ...}``: the dotted names used in
    the project's own safetensors files."""
    if isinstance(params, dict):
        items = params.items()
    elif isinstance(params, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(params))
    else:
        return {prefix: params}
    flat: dict[str, torch.Tensor] = {}
    for key, value in items:
        flat.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def unflatten_params(flat: dict[str, torch.Tensor]) -> Params:
    """Inverse of :func:`flatten_params`: dotted names back to the nested dict,
    with ``blocks`` as a list in layer order."""
    root: dict = {}
    for name, tensor in flat.items():
        node = root
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    if "blocks" in root:
        root["blocks"] = [root["blocks"][str(i)] for i in range(len(root["blocks"]))]
    return root


def count_params(params: Params, *, include_position_embedding: bool = True) -> int:
    """Number of parameters; the tied LM head is counted once (it is ``wte``).

    124,439,808 for "gpt2". GPT-2's paper and nanoGPT sometimes quote the count
    without the position embedding: pass ``include_position_embedding=False``.
    """
    flat = flatten_params(params)
    return sum(t.numel() for name, t in flat.items() if include_position_embedding or name != "wpe")


def params_dtype(params: Params) -> torch.dtype:
    """The dtype activations (and the KV cache) are computed in. ``wpe`` is
    never quantized, so its dtype is that even for int8 weights."""
    return params["wpe"].dtype


def params_device(params: Params) -> torch.device:
    return params["wte"].device
