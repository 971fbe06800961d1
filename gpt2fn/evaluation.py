"""How likely a model finds a text: each token's log-probability
(:func:`token_logprobs`; a continuation's, :func:`continuation_logprobs`),
and the perplexity of a long token sequence.

Texts longer than the context are scored with a sliding window: windows of
``context`` tokens start every ``stride`` tokens, and each window scores only
the tokens no earlier window scored, each with between ``context - stride``
and ``context - 1`` tokens of history. ``stride = context`` is fastest
(disjoint windows; the first token of each window has no history inside it
and is not scored); a smaller stride gives every token more context at more
compute. This is the recipe of Hugging Face's perplexity guide, token for token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt2fn.config import GPTConfig
from gpt2fn.errors import GPT2FnError, check_token_ids
from gpt2fn.model import forward
from gpt2fn.params import Params, params_device
from gpt2fn.steps import eager_kernels


@dataclass(frozen=True)
class Perplexity:
    nll: float  # mean negative log-likelihood, nats per predicted token
    n_tokens: int  # tokens predicted

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def token_logprobs(params: Params, config: GPTConfig, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token t | the tokens before it) for every token but the first:
    tokens [B, T] int ids, 2 <= T <= n_ctx + 1 -> [B, T - 1] fp32. One
    forward over ``tokens[:, :-1]`` (eager kernels; wrap it in
    ``torch.inference_mode()`` when no gradient is wanted)."""
    if tokens.dim() != 2 or not 2 <= tokens.shape[1] <= config.n_ctx + 1:
        raise GPT2FnError(f"tokens are [B, T] ids with 2 <= T <= {config.n_ctx + 1} (the context + the last target), "
                          f"got shape {list(tokens.shape)}")  # fmt: skip
    logits = forward(params, config, tokens[:, :-1], kernels=eager_kernels()).float()  # [B, T - 1, V]
    # Rows of logits, [B * (T - 1), V]. With the classes as dim 1 of [B, V, T - 1] (a strided log-softmax),
    # torch 2.13's CPU kernel was off float64's by up to 1.6e-3 nats a token, +1.75e-4 on average (the bundled
    # model, 256-token windows of Tiny Shakespeare's tail: its NLL 4.97655 against 4.97671); as rows, within
    # 1e-4 (tests/test_training.py), and 3-4x faster.
    nll = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return -nll.view(tokens.shape[0], -1)


def scored_rows(rows: list[tuple[list[int], int]], n_ctx: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids, each scored on its last ``n`` tokens, as one batch:
    (tokens [B, W] right-padded with 0, each row cut to its last ``n_ctx`` +
    1 tokens; scored [B, W - 1], True at the targets ``tokens[:, 1:]`` that
    are a row's last ``n``). A continuation's scores in a batch of them."""
    rows = [(row[-n_ctx - 1 :], n) for row, n in rows]
    width = max(len(row) for row, _ in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.int64)
    scored = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for i, (row, n) in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        scored[i, len(row) - 1 - n : len(row) - 1] = True
    return tokens.to(device), scored.to(device)


@torch.inference_mode()
def continuation_logprobs(params: Params, config: GPTConfig, prompt: list[int], continuation: list[int]) -> list[float]:
    """log p(each token of ``continuation`` | the prompt and the tokens
    before it): the model's own distribution (before a sampler's
    temperature, filters or rules), by one forward over both
    (:func:`token_logprobs`). A generated row's scores: ``prompt`` (at least
    one token) and its new tokens, together within the context."""
    if not continuation:
        return []
    tokens = torch.tensor([prompt + continuation], device=params_device(params))
    return token_logprobs(params, config, tokens)[0, len(prompt) - 1 :].tolist()


@torch.inference_mode()
def perplexity(
    params: Params, config: GPTConfig, tokens: torch.Tensor, context: Optional[int] = None,
    stride: Optional[int] = None, progress: bool = False,
) -> Perplexity:  # fmt: skip
    """Mean NLL and perplexity of ``tokens`` (one sequence: [N] integer ids,
    a tensor or a list) under the model."""
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise GPT2FnError(f"tokens are one sequence [N], got shape {list(tokens.shape)}; score tokens.flatten(), "
                          "or each row on its own")  # fmt: skip
    if len(tokens) < 2:
        raise GPT2FnError("need at least 2 tokens to measure perplexity")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise GPT2FnError(f"tokens are integer ids, got {tokens.dtype}")
    context = context or config.n_ctx
    stride = stride or context
    if not 1 < context <= config.n_ctx:
        raise GPT2FnError(f"context must be between 2 and the model's {config.n_ctx}, got {context}")
    if not 0 < stride <= context:
        raise GPT2FnError(f"stride must be between 1 and the context ({context}), got {stride}")
    tokens = tokens.to(torch.int64).to(params_device(params))
    check_token_ids("the text", [int(tokens.min()), int(tokens.max())], config.vocab_size)
    total, count, scored_until = 0.0, 0, 1  # token 0 is never predicted
    starts = range(0, len(tokens) - 1, stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(begin + context, len(tokens))
        logprobs = token_logprobs(params, config, tokens[None, begin:end])[0]  # of tokens[begin + 1 : end]
        new = min(end - scored_until, end - begin - 1)  # targets no earlier window scored
        total, count, scored_until = total - logprobs[-new:].sum().item(), count + new, end
        if end == len(tokens):
            break
    return Perplexity(total / count, count)


def hub_dataset_text(repo_id: str, subset: Optional[str] = None, split: str = "test",
                     revision: Optional[str] = None) -> str:  # fmt: skip
    """A split of a Hub dataset (parquet files with a ``text`` column, read
    through huggingface_hub's cache) as one text: its rows joined by a blank
    line, as Hugging Face's perplexity guide joins WikiText-2's test split
    (``hub_dataset_text("Salesforce/wikitext", "wikitext-2-raw-v1")``)."""
    from gpt2fn.data import read_pieces
    from gpt2fn.weights import hub_dataset_files

    return "\n\n".join(text for _, text, _ in read_pieces(hub_dataset_files(repo_id, subset, revision, split)))


def unigram_perplexity(train_tokens: torch.Tensor, eval_tokens: torch.Tensor, vocab_size: int) -> Perplexity:
    """Baseline: a model that ignores context and predicts each token with its
    training-set frequency (add-one smoothed, so unseen tokens stay finite)."""
    counts = torch.bincount(train_tokens.to(torch.int64), minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    nll = -log_probs[eval_tokens.to(torch.int64)].mean().item()
    return Perplexity(nll, len(eval_tokens))
