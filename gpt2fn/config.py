"""Model hyper-parameters: a frozen dataclass, the four GPT-2 sizes, and
conversion from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

from gpt2fn.errors import GPT2FnError


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 model. Defaults are the 124M "gpt2"."""

    vocab_size: int = 50257
    n_ctx: int = 1024  # maximum sequence length (number of learned positions)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise GPT2FnError(f"config {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise GPT2FnError(
                f"config n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise GPT2FnError(f"unknown config fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "GPTConfig":
        """Build from a Hugging Face GPT-2 ``config.json`` (as a dict).

        Refuses configurations that describe a different architecture, rather
        than silently computing something else.
        """
        if hf.get("model_type", "gpt2") != "gpt2":
            raise GPT2FnError(f"config.json is for model_type {hf.get('model_type')!r}, not 'gpt2'")
        if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 768)):
            raise GPT2FnError("config.json sets n_inner != 4*n_embd, which gpt2fn does not support")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise GPT2FnError(
                f"config.json activation {hf.get('activation_function')!r} is not GPT-2's tanh GELU"
            )
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise GPT2FnError("config.json enables attention variants that gpt2fn does not support")
        if hf.get("tie_word_embeddings", True) is False:
            raise GPT2FnError("config.json unties the LM head; gpt2fn ties it to the token embedding")
        return cls(
            vocab_size=hf.get("vocab_size", 50257),
            n_ctx=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_embd=hf.get("n_embd", 768),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )


# The four released GPT-2 sizes, keyed by their Hugging Face names.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
