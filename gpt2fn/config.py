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
    gelu: str = "tanh"  # GPT-2's tanh approximation, or "none": the exact erf GELU (nanoGPT's, Hugging Face's "gelu")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise GPT2FnError(f"config {name} must be a positive integer, got {value!r}")
        if self.gelu not in GELUS:
            raise GPT2FnError(f"config gelu must be one of {', '.join(GELUS)}, got {self.gelu!r}")
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

        Every ``GPT2Config`` field that changes what ``GPT2LMHeadModel``
        computes is either honoured exactly or refused, never ignored (each is
        tested against the reference): the five shape fields,
        ``layer_norm_epsilon`` and ``activation_function``, if it is GPT-2's
        tanh GELU or the exact one (``gelu``), are honoured; ``n_inner`` must
        be 4 x ``n_embd``, ``scale_attn_weights`` true, the LM head tied, and
        ``scale_attn_by_inverse_layer_idx`` and ``add_cross_attention`` off. ``reorder_and_upcast_attn`` only changes
        the precision the reference computes attention in (fp32 here anyway),
        and dropout acts only in training, so both are accepted. The rest
        (token ids, the double-heads model's ``summary_*``, output switches)
        do not change the logits.
        """
        def refuse(why: str) -> GPT2FnError:
            return GPT2FnError(f"config.json {why}, which gpt2fn does not support; it would compute another function")

        if hf.get("model_type", "gpt2") != "gpt2":
            raise GPT2FnError(f"config.json is for model_type {hf.get('model_type')!r}, not 'gpt2'")
        if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 768)):
            raise refuse(f"sets n_inner={hf['n_inner']} (GPT-2's MLP is 4 x n_embd wide)")
        if hf.get("activation_function", "gelu_new") not in HF_GELUS:
            raise refuse(f"uses activation {hf.get('activation_function')!r}, not a GELU (tanh's or the exact one)")
        if hf.get("scale_attn_weights", True) is not True:
            raise refuse("sets scale_attn_weights=false (attention scores without the 1/sqrt(head_dim) scale)")
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            raise refuse("sets scale_attn_by_inverse_layer_idx (attention scores divided by the layer number)")
        if hf.get("add_cross_attention", False):
            raise refuse("adds cross-attention layers (an encoder-decoder GPT-2)")
        if hf.get("tie_word_embeddings", True) is False:
            raise refuse("unties the LM head (gpt2fn's head is the token embedding)")
        return cls(
            vocab_size=hf.get("vocab_size", 50257),
            n_ctx=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_embd=hf.get("n_embd", 768),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            gelu=HF_GELUS[hf.get("activation_function", "gelu_new")],
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``GPT2Config`` fields of this model, for
        ``GPT2Config(**config.to_hf())``: the inverse of :meth:`from_hf`.
        Dropout is 0, as gpt2fn computes (and trains) without it."""
        return {
            "model_type": "gpt2", "vocab_size": self.vocab_size, "n_positions": self.n_ctx, "n_embd": self.n_embd,
            "n_layer": self.n_layer, "n_head": self.n_head, "layer_norm_epsilon": self.layer_norm_eps,
            "activation_function": "gelu_new" if self.gelu == "tanh" else "gelu",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
        }  # fmt: skip


GELUS = ("tanh", "none")  # GPTConfig.gelu: F.gelu's approximate=
# Hugging Face's activation_function names of them (ACT2FN): gelu_new spells the tanh formula out
HF_GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

# The four released GPT-2 sizes, keyed by their Hugging Face names.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
