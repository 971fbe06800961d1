"""HellaSwag, scored completion-style as the GPT-2 reproductions score it
(build-nanogpt, llm.c): each of an example's four endings is appended to its
context (the ending tokenized with a leading space) and scored by the log-
probabilities of its own tokens; ``acc`` picks the ending with the highest
sum, ``acc_norm`` the highest mean per token. Published figures with this
scoring on the validation set: GPT-2 124M acc_norm 0.2955, 1558M 0.4893.

The data is the dataset's own jsonl (``hellaswag_val.jsonl``: one example per
line with ``ctx``, ``endings`` and ``label``; other fields are ignored), or
the Hub's parquet copy of the validation split (:func:`hub_validation_file`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import tiktoken
import torch
from tqdm import tqdm

from gpt2fn.config import GPTConfig
from gpt2fn.errors import GPT2FnError, check_input
from gpt2fn.evaluation import scored_rows, token_logprobs
from gpt2fn.params import Params, params_device
from gpt2fn.tasks import Task
from gpt2fn.tokenizer import check_vocabulary

REFERENCE_ACC_NORM = {"gpt2": 0.2955, "gpt2-xl": 0.4893}  # validation set, this scoring (build-nanogpt)


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int  # index of the right ending


@dataclass(frozen=True)
class HellaSwagResult:
    acc: float  # the ending with the highest summed log-probability is right
    acc_norm: float  # the ending with the highest mean log-probability per token is right
    n: int


HUB_REPO, HUB_REVISION, HUB_VALIDATION = "Rowan/hellaswag", "refs/convert/parquet", "default/validation"


def hub_validation_file() -> Path:
    """The validation split from the Hub (the dataset's parquet conversion,
    downloaded once into huggingface_hub's cache; offline: from the cache)."""
    from gpt2fn.weights import hub_dataset_files

    return hub_dataset_files(HUB_REPO, HUB_VALIDATION, HUB_REVISION)[0]


def load_examples(path: str | os.PathLike, limit: Optional[int] = None) -> list[Example]:
    """The first ``limit`` (default: all) examples of a HellaSwag jsonl file
    (or the Hub's parquet copy); a line that is not an example is refused
    with its file and line number."""
    path = check_input(path, "HellaSwag file")
    if path.suffix == ".parquet":
        from gpt2fn.data import open_parquet

        rows = open_parquet(path, columns=("ctx", "endings", "label")).read(columns=["ctx", "endings", "label"]).to_pylist()
        return [_example(row, f"{path} row {i + 1}") for i, row in enumerate(rows[:limit])]
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(examples) == limit:
                break
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GPT2FnError(f"{where} is not JSON ({e.msg}); HellaSwag files hold one JSON object per line") from None
            examples.append(_example(row, where))
    if not examples:
        raise GPT2FnError(f"{path} holds no HellaSwag examples")
    return examples


def _example(row, where: str) -> Example:
    schema = "a HellaSwag example has ctx (text), endings (4 texts) and label (0-3)"
    if not isinstance(row, dict) or not {"ctx", "endings", "label"} <= set(row):
        missing = sorted({"ctx", "endings", "label"} - set(row)) if isinstance(row, dict) else ["everything"]
        raise GPT2FnError(f"{where} lacks {', '.join(missing)}: {schema}")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if isinstance(label, str) and label.isdigit():
        label = int(label)  # the Hub's copy stores labels as strings
    ok = isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
    ok = ok and all(isinstance(e, str) and e for e in endings) and isinstance(label, int) and 0 <= label < 4
    if not ok:
        raise GPT2FnError(f"{where} is not a HellaSwag example: {schema}")
    return Example(ctx, tuple(endings), label)


def ending_logprobs(
    params: Params, config: GPTConfig, tokenizer: tiktoken.Encoding, example: Example
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) over each ending's tokens of their log-probabilities after
    the context: two [4] tensors. The four rows run as one batch, right-
    padded; a row longer than the context keeps its last ``n_ctx`` tokens."""
    context = tokenizer.encode_ordinary(example.ctx)
    endings = [tokenizer.encode_ordinary(" " + e) for e in example.endings]
    tokens, scored = scored_rows([(context + e, len(e)) for e in endings], config.n_ctx, params_device(params))
    total = (token_logprobs(params, config, tokens) * scored).sum(1)  # [4, width - 1] masked to the endings
    return total, total / scored.sum(1)


@torch.inference_mode()
def evaluate_hellaswag(
    params: Params, config: GPTConfig, tokenizer: tiktoken.Encoding, examples: Sequence[Example], progress: bool = False
) -> HellaSwagResult:
    check_vocabulary(tokenizer, config.vocab_size)
    right = right_norm = 0
    for example in tqdm(examples, desc="hellaswag", unit="example", disable=not progress, leave=False):
        total, mean = ending_logprobs(params, config, tokenizer, example)
        right += int(total.argmax()) == example.label
        right_norm += int(mean.argmax()) == example.label
    return HellaSwagResult(right / len(examples), right_norm / len(examples), len(examples))


TASK = Task("HellaSwag", "examples", "HellaSwag jsonl (ctx, endings, label per line), e.g. hellaswag_val.jsonl; "
            "default: the validation split from the Hub (Rowan/hellaswag, needs pyarrow)", hub_validation_file,
            load_examples, evaluate_hellaswag, ("acc", "acc_norm"))  # fmt: skip
