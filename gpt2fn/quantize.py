"""Weight dtypes: casting params to fp32 / bf16 / fp16, and int8 weight-only
quantization.

int8 (``--dtype int8``): every matrix a decode step streams (the four linear
weights of each block and ``wte``, which is also the LM head) becomes int8
with one fp32 scale per output row, symmetric: ``w ~= w_int8 * scale[:, None]``
with ``scale = max|w_row| / 127``. Activations, biases, LayerNorm and ``wpe``
stay fp32, so the result is computed in fp32 from weights that are a quarter
of the bytes. The layout gains explicit entries, nothing hidden::

    linear:  {"w": int8 [out, in], "b": fp32 [out], "scale": fp32 [out]}
    top:     "wte": int8 [V, D], "wte_scale": fp32 [V]

Per-row scales bound each weight's error by ``scale / 2`` (half a step of its
own row), which keeps GPT-2's logits within a few hundredths (tested).
"""

from __future__ import annotations

import torch

from gpt2fn.errors import GPT2FnError
from gpt2fn.params import Params, map_params

WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "int8")
# What --dtype takes, in the scripts' --help.
DTYPE_HELP = "the weights' dtype: float32, bfloat16, float16, or int8 (weight-only, fp32 compute)"


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w [out, in] -> (int8 [out, in], fp32 scale [out])."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int8(params: Params) -> Params:
    """int8 weight-only copy of fp params (see the module docstring)."""
    if "wte_scale" in params:
        raise GPT2FnError("these params are already int8-quantized")
    params = map_params(lambda t: t.float(), params)
    wte, wte_scale = quantize_rows(params["wte"])

    def linear(p: dict) -> dict:
        w, scale = quantize_rows(p["w"])
        return {"w": w, "b": p["b"], "scale": scale}

    blocks = [
        {
            "ln_1": b["ln_1"],
            "attn": {"c_attn": linear(b["attn"]["c_attn"]), "c_proj": linear(b["attn"]["c_proj"])},
            "ln_2": b["ln_2"],
            "mlp": {"c_fc": linear(b["mlp"]["c_fc"]), "c_proj": linear(b["mlp"]["c_proj"])},
        }
        for b in params["blocks"]
    ]
    return {"wte": wte, "wte_scale": wte_scale, "wpe": params["wpe"], "blocks": blocks, "ln_f": params["ln_f"]}


def cast_params(params: Params, dtype: str) -> Params:
    """Params in one of :data:`WEIGHT_DTYPES` ("float32", "bfloat16", "float16", "int8")."""
    if dtype == "int8":
        return quantize_int8(params)
    if dtype not in WEIGHT_DTYPES:
        raise GPT2FnError(f"unknown dtype {dtype!r}; use one of {', '.join(WEIGHT_DTYPES)}")
    return map_params(lambda t: t.to(getattr(torch, dtype)), params)
