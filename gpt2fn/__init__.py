"""gpt2fn: GPT-2 as pure functions over a plain dict of tensors.

The public surface, one module per concern::

    config      GPTConfig, PRESETS
    params      init_params, count_params, flatten_params, map_params
    layers      gelu, layer_norm, linear, matvec, attention, ffn, block, Kernels
    cache       make_cache (immutable tuple of preallocated K/V tensors)
    model       hidden, logits, forward, positions
    steps       cached_steps, uncached_steps, compiled_steps (the Steps protocol)
    sampling    sample, apply_history, top_k_filter, top_p_filter, min_p_filter, typical_filter, filtered_probs
    generation  generate (a Stream: tokens as they come, then stats), generate_all
    beam        beam_search (Hugging Face's beam search: each prompt's best Beam(tokens, score))
    speculative self_draft, draft_vocab, frequent_tokens, PromptLookup, speculative_steps (generate(..., draft=...))
    weights     load_pretrained, save_params, load_params, save_hf_checkpoint, load_llmc, save_llmc
    tokenizer   get_tokenizer, encode, decode
"""

from gpt2fn.cache import KVCache, make_cache
from gpt2fn.config import PRESETS, GPTConfig
from gpt2fn.errors import GPT2FnError
from gpt2fn.generation import GenerationStats, Stream, generate, generate_all
from gpt2fn.model import forward, hidden, logits, positions
from gpt2fn.params import count_params, init_params
from gpt2fn.sampling import sample
from gpt2fn.tokenizer import ENDOFTEXT_ID, decode, encode, get_tokenizer
from gpt2fn.weights import load_params, load_pretrained, save_params

__all__ = [
    "GPTConfig", "PRESETS", "GPT2FnError", "KVCache", "make_cache", "init_params", "count_params",
    "hidden", "logits", "forward", "positions", "sample", "generate", "generate_all", "Stream", "GenerationStats",
    "load_pretrained", "load_params", "save_params", "get_tokenizer", "encode", "decode", "ENDOFTEXT_ID",
]  # fmt: skip
