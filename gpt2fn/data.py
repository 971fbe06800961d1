"""Training data: text files -> one uint16 token file per split, read back
memory-mapped, and random contiguous windows as batches.

GPT-2's vocabulary (50257) fits in 16 bits, so a token file is 2 bytes a
token, written with the standard library's ``array`` and mapped with
``torch.from_file``: no copy of the whole corpus in memory, no numpy.
"""

from __future__ import annotations

import array
import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
from tqdm import tqdm

from gpt2fn.errors import GPT2FnError, check_input, check_number, check_output_dir
from gpt2fn.files import atomic_write
from gpt2fn.tokenizer import ENDOFTEXT_ID, get_tokenizer


def tokenize_files(paths: Iterable[str | os.PathLike]) -> list[int]:
    """All files' tokens, ``<|endoftext|>`` between files (text is encoded as
    ordinary text: a literal "<|endoftext|>" in a file is not the special token)."""
    tokenizer = get_tokenizer()
    ids: list[int] = []
    paths = [Path(p) for p in paths]
    for path in tqdm(paths, desc="tokenizing", unit="file", disable=len(paths) < 2):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GPT2FnError(f"cannot read {path} as UTF-8 text ({e})") from None
        if ids:
            ids.append(ENDOFTEXT_ID)
        ids.extend(tokenizer.encode_ordinary(text))
    return ids


def write_tokens(ids: list[int], path: str | os.PathLike) -> Path:
    """uint16 token file, written to a temporary name and renamed into place."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            array.array("H", ids).tofile(f)

    return atomic_write(path, write)


def prepare(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike, val_fraction: float = 0.1) -> dict[str, int]:
    """Tokenize text files into ``out_dir/train.bin`` and ``out_dir/val.bin``:
    the last ``val_fraction`` of the tokens is the validation split (held out
    as one contiguous piece, so no window straddles the two)."""
    check_number("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
    paths = [check_input(p, "text file") for p in paths]
    out = check_output_dir(out_dir, "output directory")
    ids = tokenize_files(paths)
    n_val = int(len(ids) * val_fraction)
    if n_val < 2 or len(ids) - n_val < 2:
        raise GPT2FnError(f"only {len(ids)} tokens: too little text to split into train and val")
    write_tokens(ids[: len(ids) - n_val], out / "train.bin")
    write_tokens(ids[len(ids) - n_val :], out / "val.bin")
    return {"train": len(ids) - n_val, "val": n_val}


def load_tokens(path: str | os.PathLike) -> torch.Tensor:
    """A token file, memory-mapped: uint16 [N]."""
    path = Path(path)
    if not path.is_file():
        raise GPT2FnError(f"token file {path} does not exist; run scripts/prepare_data.py first")
    n = path.stat().st_size // 2
    if n == 0:
        raise GPT2FnError(f"token file {path} is empty; run scripts/prepare_data.py again")
    return torch.from_file(str(path), shared=True, size=n, dtype=torch.uint16)


def random_windows(tokens: torch.Tensor, batch: int, length: int, generator: torch.Generator,
                   rows: slice = slice(None)) -> torch.Tensor:  # fmt: skip
    """``batch`` random contiguous windows of ``length + 1`` tokens: [B, length + 1]
    int64 (inputs are ``[:, :-1]``, targets ``[:, 1:]``). With ``rows``, only
    those rows of the same draw are read (a data-parallel process's share);
    the generator advances the same either way."""
    if len(tokens) < length + 1:
        raise GPT2FnError(f"{len(tokens)} tokens cannot fill a window of {length + 1}")
    starts = torch.randint(0, len(tokens) - length, (batch,), generator=generator)[rows]
    return torch.stack([tokens[s : s + length + 1].to(torch.int64) for s in starts.tolist()])


def data_fingerprint(train_tokens: torch.Tensor, val_tokens: Optional[torch.Tensor] = None) -> dict:
    """What identifies a training set cheaply: each split's length and a
    sha256 of its first and last 64K tokens. A checkpoint records it, so that
    resuming on other data is refused rather than silently mixing corpora."""
    def digest(tokens: torch.Tensor) -> str:
        sample = torch.cat([tokens[:65536], tokens[-65536:]]).to(torch.int64).tolist()
        return hashlib.sha256(array.array("H", sample).tobytes()).hexdigest()[:16]

    splits = {"train": train_tokens} if val_tokens is None else {"train": train_tokens, "val": val_tokens}
    return {name: {"tokens": len(t), "sha256": digest(t)} for name, t in splits.items()}
