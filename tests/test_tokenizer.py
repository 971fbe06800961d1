"""The offline tiktoken GPT-2 BPE against the reference tokenizer
(transformers' GPT2TokenizerFast on the same files)."""

from __future__ import annotations

import shutil

import pytest

from gpt2fn import GPT2FnError, decode, encode, get_tokenizer
from gpt2fn import tokenizer as tok
from gpt2fn.tokenizer import ENDOFTEXT_ID, TextStream, decode_stream

SAMPLES = [
    "Hello, world!",
    "It's, I'm, you're, we've, they'd, she'll, don't",
    "The  quick   brown\tfox\n\n\njumps    over\r\nthe lazy dog.  ",
    "   leading and trailing spaces   ",
    "\n\n\n\n",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 and ✨ sparkles",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != 0: pass",
    "Numbers: 3.14159, 1,000,000, 2024-11-21, 0x1F, 1e-5, 123456789012345",
    "<|endoftext|>The end.<|endoftext|>",
    "URLs https://example.com/path?q=1&r=2 and e-mail a.b@c.org",
    "",
    " ",
    "a" * 300,
    "Mixed CASE and ALLCAPS and camelCase and snake_case_words",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The reference tokenizer on the very same files, laid out as a Hub snapshot."""
    from transformers import GPT2TokenizerFast

    vocab, merges = tok._packaged_files()
    d = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(vocab, d / "vocab.json")
    shutil.copy(merges, d / "merges.txt")
    reference = GPT2TokenizerFast.from_pretrained(d)
    assert len(reference) == 50257
    return reference


@pytest.mark.parametrize("text", SAMPLES)
def test_ids_match_reference_and_round_trip(text, reference):
    t = get_tokenizer()
    ids = encode(t, text)
    assert ids == reference(text)["input_ids"]
    assert decode(t, ids) == text


def test_vocabulary():
    t = get_tokenizer()
    assert t.n_vocab == 50257
    assert t.eot_token == ENDOFTEXT_ID == 50256
    assert encode(t, "<|endoftext|>") == [50256]


def test_snapshot_files_are_used_and_agree(tmp_path):
    vocab, merges = tok._packaged_files()
    shutil.copy(vocab, tmp_path / "vocab.json")
    shutil.copy(merges, tmp_path / "merges.txt")
    snapshot = get_tokenizer(tmp_path)
    assert snapshot is not get_tokenizer()  # built from the snapshot's own files
    for text in SAMPLES:
        assert encode(snapshot, text) == encode(get_tokenizer(), text)


def test_packaged_files_are_hash_checked(tmp_path, monkeypatch):
    vocab, merges = tok._packaged_files()
    shutil.copy(vocab, tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_bytes(merges.read_bytes().replace(b"\xc4\xa0 t", b"\xc4\xa0 a", 1))
    monkeypatch.setattr(tok, "_packaged_files", lambda: (tmp_path / "encoder.json", tmp_path / "vocab.bpe"))
    tok._encoding.cache_clear()
    try:
        with pytest.raises(GPT2FnError, match="sha256 mismatch"):
            get_tokenizer()
    finally:
        tok._encoding.cache_clear()


def test_mismatched_vocab_and_merges_are_refused(tmp_path):
    vocab, merges = tok._packaged_files()
    shutil.copy(vocab, tmp_path / "vocab.json")
    lines = merges.read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # swap two merges: ranks no longer line up
    (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(GPT2FnError, match="do not belong together"):
        get_tokenizer(tmp_path)


def test_streaming_decode_never_splits_a_character():
    t = get_tokenizer()
    text = "emoji 😀👍🏽 日本語 café"
    ids = encode(t, text)
    pieces = list(decode_stream(t, ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # at least one emoji spans several tokens, so holding bytes back mattered
    assert len(pieces) < len(ids)


def test_text_stream_stops_at_the_first_stop_string_and_holds_back_what_may_begin_one():
    t = get_tokenizer()

    def run(pieces, stops):
        """Push each piece's tokens; return the text released per piece, finish()'s, and stopped."""
        text = TextStream(t, stops)
        out = ["".join(text.push(token) for token in encode(t, p)) for p in pieces]
        return out, text.finish(), text.stopped

    assert [len(encode(t, p)) for p in (" the", "\n", " end")] == [1, 1, 1]
    assert run([" the", "\n", "\n", " end"], ["\n\n"]) == ([" the", "", "", ""], "", True)  # the first "\n" waits
    assert run([" the", "\n", " end"], ["\n\n"]) == ([" the", "", "\n end"], "", False)  # released once it is not one
    assert run([" the", " end"], ["nd"]) == ([" the", " e"], "", True)  # a stop inside a token, cut there
    assert run([" the", " end"], ["he e", "end"]) == ([" t", ""], "", True)  # the earlier of two, across tokens
    assert run([" the", " e"], [" end"]) == ([" the", ""], " e", False)  # held at the end, released by finish()
    assert run(["😀", " x"], ["x"]) == (["😀", " "], "", True)  # a character over two tokens waits for its last byte
    assert run(["😀"], [])[0] == ["😀"] and len(encode(t, "😀")) == 2
    with pytest.raises(GPT2FnError, match="a stop string is empty"):
        TextStream(t, ["\n", ""])


def test_ids_past_the_tokenizer_decode_visibly():
    """A model with a padded vocabulary (nanoGPT's 50304) may choose an id the
    tokenizer lacks: it reads <|token N|>, in a whole decode and a stream."""
    t = get_tokenizer()
    ids = encode(t, "Hi 😀") + [50300] + encode(t, " there")
    assert decode(t, ids) == "Hi 😀<|token 50300|> there"
    assert "".join(decode_stream(t, ids)) == "Hi 😀<|token 50300|> there"
    assert decode(t, [50256, 50257]) == "<|endoftext|><|token 50257|>"  # the last id the tokenizer has, then the first it lacks
    # bytes cut mid-character still decode as tiktoken does, with a replacement character
    assert decode(t, encode(t, "😀")[:1]) == t.decode(encode(t, "😀")[:1]) == "\ufffd"


def test_a_model_narrower_than_its_tokenizer_is_refused():
    t = get_tokenizer()
    with pytest.raises(GPT2FnError, match=r"^the model's vocabulary holds 1000 tokens but its tokenizer has 50257, so "
                                          r"the model would be handed ids it lacks; use the model with the tokenizer"):
        tok.check_vocabulary(t, 1000)
    tok.check_vocabulary(t, 50257)
    tok.check_vocabulary(t, 50304)  # padded: wider is fine


def test_a_tokenizer_json_alone_is_read(reference, tmp_path):
    """transformers 5 saves a GPT-2 tokenizer as tokenizer.json alone (no
    vocab.json, no merges.txt): it is read, the same ids as the reference; a
    tokenizer of another kind is refused rather than replaced by GPT-2's."""
    import json

    (tmp_path / "new").mkdir()
    reference.backend_tokenizer.save(str(tmp_path / "new" / "tokenizer.json"))
    t = get_tokenizer(tmp_path / "new")
    assert t.n_vocab == 50257 and t.eot_token == ENDOFTEXT_ID
    for text in SAMPLES:
        assert encode(t, text) == reference(text)["input_ids"]
    spec = json.loads((tmp_path / "new" / "tokenizer.json").read_text())
    # merges spelt "a b" (older tokenizers files) read the same
    spec["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer.json").write_text(json.dumps(spec))
    old = get_tokenizer(tmp_path / "old")
    assert old.n_vocab == 50257 and all(encode(old, text) == encode(t, text) for text in SAMPLES)
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GPT2FnError, match=r"tokenizer.json is not a GPT-2 tokenizer \(byte-level BPE with GPT-2's "
                                          r"pre-tokenizer\); gpt2fn reads only those"):
        get_tokenizer(tmp_path / "other")
