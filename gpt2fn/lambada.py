"""LAMBADA, OpenAI's version of its test set (5153 passages, the one the
GPT-2 paper used), scored as lm-evaluation-harness's ``lambada_openai``
scores it: each passage's last word, with its leading space, is the
continuation of the rest; ``acc`` is the share of passages whose
continuation is, token for token, the model's greedy choice, and ``ppl`` is
exp of minus the mean over passages of the continuation's summed
log-probability. Published with this scoring (lm-evaluation-harness issue
#2159): GPT-2 124M acc 0.3256, ppl 40.06. The GPT-2 paper's 45.99 and 35.13
scored otherwise (the last BPE token rather than the word, and detokenized
text), with code that was never released.

The data is OpenAI's jsonl (``lambada_test.jsonl``: ``{"text": ...}`` a
line) or the Hub's parquet copy (:func:`hub_test_file`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import tiktoken
import torch
from tqdm import tqdm

from gpt2fn.config import GPTConfig
from gpt2fn.errors import GPT2FnError, check_input
from gpt2fn.evaluation import scored_rows
from gpt2fn.model import forward
from gpt2fn.params import Params, params_device
from gpt2fn.steps import eager_kernels
from gpt2fn.tasks import Task
from gpt2fn.tokenizer import check_vocabulary

REFERENCE = {"gpt2": {"acc": 0.3256, "ppl": 40.0554}}  # lm-evaluation-harness's lambada_openai, this scoring
HUB_REPO, HUB_REVISION, HUB_TEST = "EleutherAI/lambada_openai", "refs/convert/parquet", "default/test"
BATCH = 16  # passages a forward


@dataclass(frozen=True)
class LambadaResult:
    acc: float  # the last word is the model's greedy continuation, every token of it
    ppl: float  # exp(-mean over passages of the last word's summed log-probability)
    n: int


def hub_test_file() -> Path:
    """The test split from the Hub (EleutherAI/lambada_openai's parquet
    conversion, downloaded once into huggingface_hub's cache)."""
    from gpt2fn.weights import hub_dataset_files

    return hub_dataset_files(HUB_REPO, HUB_TEST, HUB_REVISION)[0]


def load_passages(path: str | os.PathLike, limit: Optional[int] = None) -> list[str]:
    """The first ``limit`` (default: all) passages of a LAMBADA jsonl file
    (or the Hub's parquet copy); a line that is not a passage of at least two
    words is refused with its file and line number."""
    path = check_input(path, "LAMBADA file")
    if path.suffix == ".parquet":
        from gpt2fn.data import open_parquet

        rows = open_parquet(path).read(columns=["text"]).to_pylist()[:limit]
        return [_passage(row, f"{path} row {i + 1}") for i, row in enumerate(rows)]
    passages = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if len(passages) == limit:
                break
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GPT2FnError(f"{path} line {number} is not JSON ({e.msg}); LAMBADA files hold one JSON "
                                      "object per line") from None  # fmt: skip
                passages.append(_passage(row, f"{path} line {number}"))
    if not passages:
        raise GPT2FnError(f"{path} holds no LAMBADA passages")
    return passages


def _passage(row, where: str) -> str:
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str) or len(text.split(" ")) < 2:
        raise GPT2FnError(f"{where} is not a LAMBADA passage: a LAMBADA line is {{\"text\": \"...\"}}, a text of at "
                          "least two words")  # fmt: skip
    return text


def split_passage(tokenizer: tiktoken.Encoding, text: str) -> tuple[list[int], list[int]]:
    """(context, last word) as tokens, as lm-evaluation-harness makes them:
    the context is the text before the last space, the word's tokens are
    those the whole text has after the context's."""
    context = text.rsplit(" ", 1)[0]
    whole, head = tokenizer.encode_ordinary(text), tokenizer.encode_ordinary(context)
    return head, whole[len(head) :]


@torch.inference_mode()
def last_word_scores(params: Params, config: GPTConfig, tokenizer: tiktoken.Encoding,
                     passages: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(the last word's summed log-probability, whether every token of it is
    the greedy choice): two [N] tensors, one forward over the passages,
    right-padded; a passage longer than the context keeps its last ``n_ctx``
    + 1 tokens."""
    rows = [(context + word, len(word)) for context, word in (split_passage(tokenizer, text) for text in passages)]
    tokens, scored = scored_rows(rows, config.n_ctx, params_device(params))  # scored: the last word's targets
    logprobs = forward(params, config, tokens[:, :-1], kernels=eager_kernels()).float().log_softmax(-1)
    targets = tokens[:, 1:]
    picked = logprobs.gather(-1, targets[..., None])[..., 0]
    greedy = (logprobs.argmax(-1) == targets) | ~scored
    return (picked * scored).sum(1), greedy.all(1)


def evaluate_lambada(params: Params, config: GPTConfig, tokenizer: tiktoken.Encoding, passages: Sequence[str],
                     progress: bool = False) -> LambadaResult:  # fmt: skip
    check_vocabulary(tokenizer, config.vocab_size)
    total, right = 0.0, 0
    for start in tqdm(range(0, len(passages), BATCH), desc="lambada", unit="batch", disable=not progress, leave=False):
        logprob, greedy = last_word_scores(params, config, tokenizer, passages[start : start + BATCH])
        total += logprob.sum().item()
        right += int(greedy.sum())
    return LambadaResult(right / len(passages), math.exp(-total / len(passages)), len(passages))


TASK = Task("LAMBADA", "passages", "LAMBADA jsonl ({\"text\": ...} per line), e.g. OpenAI's lambada_test.jsonl; "
            "default: the test split from the Hub (EleutherAI/lambada_openai, needs pyarrow)", hub_test_file,
            load_passages, evaluate_lambada, ("acc", "ppl"))  # fmt: skip
