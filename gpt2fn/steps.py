"""The two step functions of generation, eager or compiled.

* ``prefill(params, tokens [B, T], cache, pos [T], noise) -> next token [B]``
* ``decode(params, token [B], cache, pos [1], noise) -> next token [B]``

Each is a pure function of its inputs (the cache is written in place): the
forward pass and the choice of the next token, sampling included, with its
randomness passed in as ``noise`` (see :func:`gpt2fn.sampling.choose_token`),
so a compiled step needs no host synchronisation and no generator object.

``compile_steps`` wraps them in ``torch.compile``:

* decode: ``fullgraph=True``. The position is a tensor and the cache length is
  marked dynamic, so ONE graph serves every step of every generation, whatever
  the prompt length. On CUDA the mode is "reduce-overhead" (CUDA graphs):
  params and cache are marked as static addresses so they are neither copied
  nor re-recorded, and the output token is cloned before the next replay
  overwrites it. (No GPU was available to us: that path follows PyTorch's
  documented requirements but has not been run.)
* prefill (only with ``compile_prefill=True``): dynamic prompt length, so
  prompts of any length share one graph (plus one for a single-token prompt,
  which the compiler specialises). Off by default: prefill is a few large
  matrix-matrix products that the eager library calls already run well; on the
  124M shape (2-core CPU) compiling it gained 2-14% (T = 1000 ... 8) for ~50 s
  of cold compilation. ``scripts/benchmark.py`` measures both.

Sampling settings (temperature, top-k, top-p) are constants of the graph:
changing them between generations compiles a new graph once.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch

from gpt2fn.cache import KVCache
from gpt2fn.config import GPTConfig
from gpt2fn.layers import AttentionBackend
from gpt2fn.model import decode_step, forward
from gpt2fn.params import Params, flatten_params
from gpt2fn.sampling import choose_token

Tensor = torch.Tensor
Step = Callable[[Params, Tensor, KVCache, Tensor, Optional[Tensor]], Tensor]

# Inductor options for the decode step. Batch-1 decoding is a chain of
# matrix-vector loops; by default inductor inlines the LayerNorm that feeds
# each one into its inner loop, recomputing the normalisation for every output
# row (2304 times for c_attn), which makes the bf16 and int8 loops compute-
# rather than memory-bound. These two thresholds make it store such inputs once
# instead (realize_acc_reads_threshold: a pointwise result reading more than 3
# buffers is materialised; realize_reads_threshold: one read more than once is).
# Measured on the 124M shape, 2-core CPU, per step: bf16 9.5 -> 8.2 ms,
# int8 5.7 -> 5.2 ms, fp32 unchanged. Lower values make it worse: at 2 the
# weight-times-activation product itself is materialised (bf16: 16 ms).
DECODE_OPTIONS = {"realize_reads_threshold": 1, "realize_acc_reads_threshold": 3}


class Steps(NamedTuple):
    prefill: Step
    decode: Step


def prefill_and_choose(
    params: Params, tokens: Tensor, cache: KVCache, pos: Tensor, noise: Optional[Tensor],
    *, config: GPTConfig, attention: AttentionBackend, temperature: float, top_k: int, top_p: float,
) -> Tensor:  # fmt: skip
    """Prompt tokens [B, T] at positions ``pos`` [T] -> the first new token [B]."""
    logits = forward(params, config, tokens, cache, pos, attention, last_only=True)[:, -1]
    return choose_token(logits, noise, temperature, top_k, top_p)


def decode_and_choose(
    params: Params, token: Tensor, cache: KVCache, pos: Tensor, noise: Optional[Tensor],
    *, config: GPTConfig, attention: AttentionBackend, temperature: float, top_k: int, top_p: float,
) -> Tensor:  # fmt: skip
    """The last token [B] at position ``pos`` [1] -> the next token [B]."""
    return choose_token(decode_step(params, config, token, cache, pos, attention), noise, temperature, top_k, top_p)


def resolve_attention(attention: str, compiled_decode: bool = False, device: torch.device | None = None) -> str:
    """"manual" and "sdpa" stay as they are. "auto" is SDPA, except in the
    compiled decode step on the CPU, where the spelled-out attention lets
    inductor fuse it with its neighbours: measured 8-10% faster per step
    (124M shape, fp32 and bf16, 2-core CPU) than the CPU flash-attention call."""
    if attention != "auto":
        return attention
    return "manual" if compiled_decode and (device is None or device.type == "cpu") else "sdpa"


def eager_steps(config: GPTConfig, attention: str = "auto", **sampling) -> Steps:
    """``sampling``: temperature, top_k, top_p."""
    attention = resolve_attention(attention)
    return Steps(
        functools.partial(prefill_and_choose, config=config, attention=attention, **sampling),
        functools.partial(decode_and_choose, config=config, attention=attention, **sampling),
    )


def compile_steps(
    config: GPTConfig, device: torch.device, attention: str = "auto", compile_prefill: bool = False, **sampling
) -> Steps:
    """The same steps under ``torch.compile`` (see the module docstring)."""
    prefill = eager_steps(config, attention, **sampling).prefill
    if compile_prefill:
        prefill = torch.compile(prefill, fullgraph=True, dynamic=True)
    decode = functools.partial(
        decode_and_choose, config=config, attention=resolve_attention(attention, True, device), **sampling
    )
    if device.type == "cuda":
        return Steps(prefill, _cloned(torch.compile(decode, fullgraph=True, mode="reduce-overhead")))
    return Steps(prefill, torch.compile(decode, fullgraph=True, options=DECODE_OPTIONS))


def _cloned(step: Step) -> Step:
    # A CUDA graph's outputs live in memory the next replay overwrites.
    @functools.wraps(step)
    def run(*args):
        return step(*args).clone()

    return run


def prepare_for_compiled_steps(params: Params, cache: KVCache) -> None:
    """Mark what the compiled steps need marked: the cache length as dynamic
    (one graph for every length) and, on CUDA, params and cache as static
    addresses (CUDA graphs then read them in place instead of copying)."""
    for kv in cache:
        for t in kv:
            torch._dynamo.mark_dynamic(t, 2)
            if t.is_cuda:
                torch._dynamo.mark_static_address(t)
    tensors = flatten_params(params).values()
    if any(t.is_cuda for t in tensors):
        for t in tensors:
            torch._dynamo.mark_static_address(t)
