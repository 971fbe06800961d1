"""Training data: text, jsonl or parquet -> fixed-size uint16 token shards
(a train split and a val split), read back memory-mapped, and random
contiguous windows as batches.

GPT-2's vocabulary (50257) fits in 16 bits, so a token file is 2 bytes a
token, written with the standard library's ``array`` and mapped with
``torch.from_file``: no copy of the corpus in memory, no numpy.

:func:`prepare` streams: inputs are read in pieces, tokenized by worker
processes with tiktoken's batch encoder, and written shard by shard, so
memory stays bounded whatever the corpus size. Each shard is written to a
temporary name and renamed when complete, and ``manifest.json`` (the list of
shards) is written last: a directory without it is an unfinished prepare,
which :func:`load_split` refuses. A directory with the old ``train.bin`` /
``val.bin`` still loads, and so does one of llm.c's (or modded-nanogpt's)
token shards, ``fineweb_train_000001.bin`` ..., or of build-nanogpt's,
``edufineweb_train_000001.npy`` ...: the same tokens after a header
(:func:`load_llmc_tokens`, :func:`load_npy_tokens`).
"""

from __future__ import annotations

import array
import ast
import collections
import hashlib
import json
import multiprocessing
import os
import re
import struct
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from tqdm import tqdm

from gpt2fn.errors import GPT2FnError, check_input, check_int, check_number, check_output_dir
from gpt2fn.files import atomic_write
from gpt2fn.tokenizer import ENDOFTEXT_ID, get_tokenizer

MANIFEST = "manifest.json"
SHARD = re.compile(r"^(train|val)_\d{6}\.bin$")
# Other projects' token shards: NAME_train_000001.bin, NAME_val_000000.bin or NAME_train.bin (and .npy).
# llm.c's (dev/data/data_common.py's write_datafile; modded-nanogpt's too): a header of 256 little-endian int32
# (magic, version 1, the token count), then the tokens as uint16 (version 2 holds LLaMA 3's as uint32).
# build-nanogpt's (fineweb.py): np.save of the uint16 tokens, a .npy file.
FOREIGN_SHARD = re.compile(r"(?:.*_)?(train|val)(?:_\d+)?\.(bin|npy)")
LLMC_DATA_MAGIC = 20240520
LLMC_DATA_HEADER = 256 * 4
NPY_MAGIC = b"\x93NUMPY"
PIECE_BYTES = 1 << 20  # about 1 MB of text per piece
BATCH_CHARS = 4 << 20  # about 4 MB of text per job sent to a worker


# ----------------------------------------------------------------------------- reading inputs


def read_pieces(paths: Iterable[Path], piece_bytes: int = PIECE_BYTES) -> Iterator[tuple[bool, str, int]]:
    """(starts a new document, text, bytes of input consumed) for every piece
    of every input: a text file is one document, a jsonl line (its ``text``)
    one, a parquet row (its ``text`` column) one."""
    for path in paths:
        if path.suffix == ".jsonl":
            yield from _jsonl_pieces(path)
        elif path.suffix == ".parquet":
            yield from _parquet_pieces(path)
        else:
            yield from _text_pieces(path, piece_bytes)


def _safe_cut(data: bytes) -> int:
    """The last position just after a newline with an ASCII non-space byte on
    both sides, or 0. GPT-2's pre-tokenizer never joins across such a
    newline, so pieces cut there tokenize exactly like the whole text (and a
    cut next to ASCII bytes never splits a UTF-8 character)."""
    end = len(data) - 1
    while (i := data.rfind(b"\n", 1, end)) > 0:
        if 32 < data[i - 1] < 127 and 32 < data[i + 1] < 127:
            return i + 1
        end = i
    return 0


def _text_pieces(path: Path, piece_bytes: int) -> Iterator[tuple[bool, str, int]]:
    first, buffer, offset = True, b"", 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(piece_bytes)
            buffer += chunk
            cut = _safe_cut(buffer) if chunk else len(buffer)
            if cut or (first and not chunk):
                piece, buffer = buffer[:cut], buffer[cut:]
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise GPT2FnError(f"cannot read {path} as UTF-8 text ({e.reason} at byte {offset + e.start})") from None
                yield first, text, len(piece)
                first, offset = False, offset + len(piece)
            if not chunk:
                return


def _jsonl_pieces(path: Path) -> Iterator[tuple[bool, str, int]]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise GPT2FnError(f"{where} is not JSON ({getattr(e, 'msg', e)}); a .jsonl input holds one JSON object "
                                  'per line with a "text" field') from None  # fmt: skip
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise GPT2FnError(f'{where} has no "text" field holding a string; each line needs one')
            yield True, row["text"], len(line)


def open_parquet(path: Path, columns: tuple[str, ...] = ("text",)):
    """A ``pyarrow.parquet.ParquetFile`` with ``columns``, or one line saying what is wrong."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GPT2FnError(f'reading {path} needs pyarrow, which is not installed: pip install -e ".[data]"') from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types: not a parquet file, truncated
        raise GPT2FnError(f"{path} is not a readable parquet file ({type(e).__name__}: {str(e)[:200]})") from None
    have = table.schema_arrow.names
    missing = [c for c in columns if c not in have]
    if missing:
        raise GPT2FnError(f"{path} has no {' or '.join(missing)} column (its columns: {', '.join(have[:10])}); "
                          + ("the text must be in a column named text, as in FineWeb" if columns == ("text",) else
                             f"it needs {', '.join(columns)}"))  # fmt: skip
    return table


def _parquet_pieces(path: Path) -> Iterator[tuple[bool, str, int]]:
    table = open_parquet(path)
    per_row = path.stat().st_size / max(1, table.metadata.num_rows)
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield True, text or "", int(per_row)


# ----------------------------------------------------------------------------- tokenizing


def encode_pieces(pieces: list[tuple[bool, str]]) -> bytes:
    """Tokens of ``pieces`` as uint16 bytes, ``<|endoftext|>`` before each
    piece that starts a new document (text is encoded as ordinary text: a
    literal "<|endoftext|>" in the data is not the special token)."""
    tokens = array.array("H")
    encoded = get_tokenizer().encode_ordinary_batch([text for _, text in pieces], num_threads=1)
    for (new_document, _), ids in zip(pieces, encoded):
        if new_document:
            tokens.append(ENDOFTEXT_ID)
        tokens.extend(ids)
    return tokens.tobytes()


def _jobs(pieces: Iterator[tuple[bool, str, int]]) -> Iterator[tuple[list[tuple[bool, str]], int]]:
    """Pieces grouped into jobs of about BATCH_CHARS; the stream's very first
    document gets no separator before it."""
    job, chars, consumed, first = [], 0, 0, True
    for new_document, text, nbytes in pieces:
        job.append((new_document and not first, text))
        first = False
        chars += len(text)
        consumed += nbytes
        if chars >= BATCH_CHARS:
            yield job, consumed
            job, chars, consumed = [], 0, 0
    if job:
        yield job, consumed


def tokenized(pieces: Iterator[tuple[bool, str, int]], workers: int) -> Iterator[tuple[bytes, int]]:
    """(uint16 token bytes, input bytes consumed) per job, in input order;
    with several workers, at most 2 jobs per worker are in flight, so memory
    stays bounded however large the input."""
    if workers == 1:
        for job, consumed in _jobs(pieces):
            yield encode_pieces(job), consumed
        return
    # fork where there is one (Linux): workers start at once, with the tokenizer's module already loaded
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        in_flight: collections.deque = collections.deque()
        for job, consumed in _jobs(pieces):
            in_flight.append((pool.apply_async(encode_pieces, (job,)), consumed))
            if len(in_flight) >= 2 * workers:
                result, done = in_flight.popleft()
                yield result.get(), done
        while in_flight:
            result, done = in_flight.popleft()
            yield result.get(), done


# ----------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Token bytes in, ``SPLIT_000000.bin``-style shards of exactly
    ``shard_tokens`` tokens out (the last one shorter), each written atomically."""

    def __init__(self, out: Path, split: str, shard_tokens: int):
        self.out, self.split, self.size = out, split, shard_tokens * 2
        self.buffer = bytearray()
        self.shards: list[tuple[str, int]] = []  # (file name, tokens)

    def add(self, data: bytes | memoryview) -> None:
        self.buffer += data
        while len(self.buffer) >= self.size:
            self._write(self.size)
            del self.buffer[: self.size]

    def close(self) -> list[tuple[str, int]]:
        if self.buffer:
            self._write(len(self.buffer))
            self.buffer = bytearray()
        return self.shards

    def _write(self, nbytes: int) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        with memoryview(self.buffer) as view:  # no copy of the shard
            atomic_write(self.out / name, lambda tmp: Path(tmp).write_bytes(view[:nbytes]))
        self.shards.append((name, nbytes // 2))


def _split_off_val(out: Path, shards: list[tuple[str, int]], n_val: int, shard_tokens: int) -> tuple[list, list]:
    """Move the stream's last ``n_val`` tokens from the train shards into
    val shards, a shard at a time; returns (train shards, val shards)."""
    total = sum(n for _, n in shards)
    first, offset = divmod(total - n_val, shard_tokens)
    val = ShardWriter(out, "val", shard_tokens)
    for i in range(first, len(shards)):
        data = (out / shards[i][0]).read_bytes()
        val.add(memoryview(data)[2 * offset :] if i == first else data)
        if i == first and offset:
            atomic_write(out / shards[i][0], lambda tmp: Path(tmp).write_bytes(data[: 2 * offset]))
        else:
            (out / shards[i][0]).unlink()
    train = shards[:first] + ([(shards[first][0], offset)] if offset else [])
    return train, val.close()


def input_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files to read, in the order given: a file as it is, a directory
    as every file under it, recursively, in sorted path order (hidden files
    and folders, such as ``.git``, skipped)."""
    files = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_dir():
            files.append(check_input(path, "input file"))
            continue
        found = sorted(f for f in path.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))  # fmt: skip
        if not found:
            raise GPT2FnError(f"input directory {path} holds no files (hidden ones are skipped)")
        files += [check_input(f, "input file") for f in found]
    return files


def prepare(
    paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike, val_fraction: float = 0.1, *,
    val_tokens: Optional[int] = None, shard_tokens: int = 100_000_000, workers: int = 1, progress: bool = False,
) -> dict[str, int]:  # fmt: skip
    """Tokenize ``paths`` (text files, ``.jsonl`` with a ``text`` field,
    ``.parquet`` with a ``text`` column; a directory is every file under it,
    :func:`input_files`) into shards under ``out_dir``:
    ``<|endoftext|>`` between documents; the last ``val_tokens`` tokens (or
    the last ``val_fraction`` of them) form the val split, held out as one
    contiguous piece so no window straddles the two. Returns the token counts."""
    check_number("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
    if val_tokens is not None:
        check_int("val_tokens", val_tokens, low=2)
    check_int("shard_tokens", shard_tokens, low=2)
    check_int("workers", workers)
    paths = input_files(paths)
    for path in paths:
        if path.suffix == ".parquet":
            open_parquet(path)  # the schema, before any work
    out = check_output_dir(out_dir, "output directory")
    if (out / MANIFEST).exists():
        raise GPT2FnError(f"{out} already holds prepared data ({MANIFEST}); choose another --out or delete it")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    _remove_shards(out)  # left by an interrupted prepare
    writer = ShardWriter(out, "train", shard_tokens)
    total_bytes = sum(p.stat().st_size for p in paths)
    start = time.perf_counter()
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            tokens = 0
            for data, consumed in tokenized(read_pieces(paths), workers):
                writer.add(data)
                tokens += len(data) // 2
                bar.update(consumed)
                bar.set_postfix(tokens=f"{tokens / 1e6:.1f}M", tok_s=f"{tokens / (time.perf_counter() - start):.3g}")
        shards = writer.close()
        total = sum(n for _, n in shards)
        n_val = val_tokens if val_tokens is not None else int(total * val_fraction)
        if n_val < 2 or total - n_val < 2:
            raise GPT2FnError(f"only {total} tokens: too little text to split into train and val"
                              + (f" (val_tokens {val_tokens})" if val_tokens else ""))  # fmt: skip
        train_shards, val_shards = _split_off_val(out, shards, n_val, shard_tokens)
        manifest = {"format": "gpt2fn-shards-1", "tokenizer": "gpt2", "shard_tokens": shard_tokens,
                    "inputs": [str(p) for p in paths], "train": train_shards, "val": val_shards}  # fmt: skip
        atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
    except BaseException:  # refused, interrupted or failed: no shards left that look like data
        _remove_shards(out)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return {"train": total - n_val, "val": n_val, "train_shards": len(train_shards), "val_shards": len(val_shards)}


def _remove_shards(out: Path) -> None:
    for p in [p for p in out.iterdir() if SHARD.match(p.name)]:
        p.unlink()


# ----------------------------------------------------------------------------- reading shards


class TokenStream:
    """Several memory-mapped shards read as one sequence: ``len`` and
    slicing (``stream[a:b]``, negative bounds too) like a 1-D tensor."""

    def __init__(self, shards: list[torch.Tensor]):
        self.shards = shards
        self.starts = [0]
        for t in shards:
            self.starts.append(self.starts[-1] + len(t))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: slice) -> torch.Tensor:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("a TokenStream takes contiguous slices only")
        pieces = []
        for t, first in zip(self.shards, self.starts):
            lo, hi = max(start, first), min(stop, first + len(t))
            if lo < hi:
                pieces.append(t[lo - first : hi - first])
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat(pieces) if pieces else self.shards[0][:0]


def load_split(data_dir: str | os.PathLike, split: str) -> torch.Tensor | TokenStream:
    """The ``train`` or ``val`` tokens of a prepared directory, memory-mapped:
    its shards (listed in ``manifest.json``), or the old ``SPLIT.bin``."""
    d = check_input(data_dir, "data directory", directory=True)
    if (d / MANIFEST).is_file():
        try:
            listed = json.loads((d / MANIFEST).read_text())[split]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GPT2FnError(f"{d / MANIFEST} is not a gpt2fn manifest; run scripts/prepare_data.py again") from None
        shards = []
        for name, n in listed:
            tokens = load_tokens(d / name)
            if len(tokens) != n:
                raise GPT2FnError(f"shard {d / name} holds {len(tokens)} tokens, the manifest says {n}; it is "
                                  "truncated or from another run: run scripts/prepare_data.py again")  # fmt: skip
            shards.append(tokens)
        if not shards:
            raise GPT2FnError(f"{d} has no {split} shards; run scripts/prepare_data.py again")
        return shards[0] if len(shards) == 1 else TokenStream(shards)
    if (d / "train.bin").exists() or (d / "val.bin").exists():  # the format before shards
        return load_tokens(d / f"{split}.bin")
    foreign = sorted((p.name, m[1], p) for p in d.iterdir()
                     if (m := FOREIGN_SHARD.fullmatch(p.name)) and _foreign_magic(p))  # (name, split, path)
    if foreign:  # a directory of llm.c's or build-nanogpt's shards
        shards = [load_llmc_tokens(p) if p.suffix == ".bin" else load_npy_tokens(p)
                  for _, shard_split, p in foreign if shard_split == split]  # fmt: skip
        if not shards:
            raise GPT2FnError(f"{d} holds token shards but none of the {split} split (NAME_{split}_000000.bin or "
                              ".npy); add them, or prepare the data with scripts/prepare_data.py")  # fmt: skip
        return shards[0] if len(shards) == 1 else TokenStream(shards)
    if any(SHARD.match(p.name) for p in d.iterdir()):
        raise GPT2FnError(f"{d} holds shards but no {MANIFEST}: its prepare did not finish; run scripts/prepare_data.py again")
    raise GPT2FnError(f"{d} holds no prepared data (no {MANIFEST}, no train.bin, no llm.c shards); run "
                      "scripts/prepare_data.py first")  # fmt: skip


def _foreign_magic(path: Path) -> bool:
    """Whether the file begins as llm.c's shards (a .bin) or a .npy file do.
    gpt2fn's own shards never begin as llm.c's: their first token would be
    53992, past GPT-2's vocabulary."""
    with open(path, "rb") as f:
        head = f.read(6)
    return head == NPY_MAGIC if path.suffix == ".npy" else head[:4] == struct.pack("<i", LLMC_DATA_MAGIC)


def load_llmc_tokens(path: str | os.PathLike) -> torch.Tensor:
    """One of llm.c's token shards, memory-mapped past its header: uint16 [N],
    checked against the count its header gives."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(12)
    magic, version, n = struct.unpack("<3i", head) if len(head) == 12 else (None, None, -1)
    if magic != LLMC_DATA_MAGIC:
        raise GPT2FnError(f"{path} is not an llm.c token shard (it does not start with llm.c's magic number "
                          f"{LLMC_DATA_MAGIC})")  # fmt: skip
    if version != 1:
        raise GPT2FnError(f"{path} is an llm.c token shard of version {version}, not 1 (GPT-2's uint16 tokens): "
                          "version 2 holds LLaMA 3's tokens, which no GPT-2 reads")  # fmt: skip
    return _tokens_after_header(path, LLMC_DATA_HEADER, n, "llm.c token shard")


def load_npy_tokens(path: str | os.PathLike) -> torch.Tensor:
    """A ``.npy`` file of uint16 tokens (build-nanogpt's shards), memory-mapped
    past its header, which is read as a literal (``ast.literal_eval``), never
    unpickled: 1-D little-endian uint16, and the size it implies."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(12)
        width = 2 if head[6:7] == b"\x01" else 4  # the header's length: uint16 in format 1, uint32 in 2 and 3
        length = int.from_bytes(head[8 : 8 + width], "little")
        f.seek(8 + width)
        text = f.read(min(length, 1 << 16)) if head[:6] == NPY_MAGIC else b""
    try:
        meta = ast.literal_eval(text.decode("latin1"))
        n = meta["shape"][0]
        ok = meta["descr"] == "<u2" and len(meta["shape"]) == 1 and not meta["fortran_order"] and len(text) == length
    except (ValueError, SyntaxError, KeyError, TypeError, IndexError, MemoryError, RecursionError):
        ok = False
    if not ok:
        raise GPT2FnError(f"{path} is not a .npy file of GPT-2 tokens (one dimension of little-endian uint16, as "
                          "build-nanogpt's fineweb.py saves them)")  # fmt: skip
    return _tokens_after_header(path, 8 + width + length, n, "token file")


def _tokens_after_header(path: Path, header: int, n: int, what: str) -> torch.Tensor:
    """The ``n`` uint16 tokens after a file's ``header`` bytes, memory-mapped,
    once the file's size is the header's and theirs (an even header)."""
    if path.stat().st_size != header + 2 * n or header % 2:
        raise GPT2FnError(f"{what} {path} holds {path.stat().st_size} bytes, but its header's {n} tokens take "
                          f"{header + 2 * n}: it is truncated or corrupt; write or download it again")  # fmt: skip
    return torch.from_file(str(path), shared=True, size=header // 2 + n, dtype=torch.uint16)[header // 2 :]


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
