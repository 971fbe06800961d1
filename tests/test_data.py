"""Sharded data preparation: the shards hold exactly the corpus's tokens
(text, jsonl and parquet inputs, one worker or two, any shard size), the val
split is the tail, an unfinished prepare is never mistaken for data, a
directory of shards reads as one sequence, training runs on it, and a Hub
dataset loads from a local cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pyarrow
import pyarrow.parquet
import pytest
import torch

from gpt2fn import GPT2FnError
from gpt2fn.data import TokenStream, encode_pieces, input_files, load_split, prepare, read_pieces
from gpt2fn.tokenizer import ENDOFTEXT_ID, get_tokenizer

from conftest import ROOT, load_script

WORDS = "the of and to in is that it was for on are with as his they be at one have this from or had by café naïve 日本 😀".split()


def corpus_text(seed: int, n_lines: int) -> str:
    """English-like lines with the whitespace that BPE cares about: double
    newlines, trailing spaces, indentation, punctuation, digits."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        lines.append(rng.choice(["", "  ", "\t"]) + words.capitalize() + rng.choice([".", ",", "!", " 42.", "'s", " "]))
        if i % 7 == 0:
            lines.append("")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(corpus_text(0, 400))
    (d / "b.jsonl").write_text("".join(json.dumps({"text": corpus_text(i, 20), "id": i}) + "\n" for i in range(1, 6)))
    pyarrow.parquet.write_table(pyarrow.table({"id": [7, 8], "text": [corpus_text(7, 30), corpus_text(8, 30)]}),
                                d / "c.parquet")  # fmt: skip
    tok = get_tokenizer()
    documents = [(d / "a.txt").read_text()] + [corpus_text(i, 20) for i in range(1, 6)] + [corpus_text(7, 30), corpus_text(8, 30)]
    expected = []
    for doc in documents:
        if expected:
            expected.append(ENDOFTEXT_ID)
        expected.extend(tok.encode_ordinary(doc))
    return d, [d / "a.txt", d / "b.jsonl", d / "c.parquet"], expected


def all_tokens(directory) -> list[int]:
    return load_split(directory, "train")[:].tolist() + load_split(directory, "val")[:].tolist()


def test_text_pieces_tokenize_exactly_like_the_whole_file(inputs):
    d, _, _ = inputs
    text = (d / "a.txt").read_text()
    pieces = list(read_pieces([d / "a.txt"], piece_bytes=300))
    assert len(pieces) > 10 and "".join(p for _, p, _ in pieces) == text
    assert [new for new, _, _ in pieces] == [True] + [False] * (len(pieces) - 1)
    tokens = torch.frombuffer(bytearray(encode_pieces([(False, p) for _, p, _ in pieces])), dtype=torch.uint16).tolist()
    assert tokens == get_tokenizer().encode_ordinary(text)


@pytest.mark.parametrize("workers, shard_tokens", [(1, 100_000_000), (1, 997), (2, 997)])
def test_shards_hold_exactly_the_corpus(inputs, tmp_path, workers, shard_tokens):
    _, paths, expected = inputs
    counts = prepare(paths, tmp_path / "out", shard_tokens=shard_tokens, workers=workers)
    assert all_tokens(tmp_path / "out") == expected
    assert counts["val"] == int(len(expected) * 0.1) and counts["train"] + counts["val"] == len(expected)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sizes = [n for _, n in manifest["train"]]
    assert all(n == shard_tokens for n in sizes[:-1]) and sum(sizes) == counts["train"]
    assert counts["train_shards"] == len(sizes) == -(-counts["train"] // shard_tokens)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(["manifest.json"] + [n for n, _ in manifest["train"] + manifest["val"]])  # no temporaries


def test_a_directory_is_every_file_under_it_in_sorted_order(inputs, tmp_path):
    """The corpus's three files in a folder tree, with hidden ones beside
    them: the same tokens as the files named one by one, in path order."""
    d, paths, expected = inputs
    tree = tmp_path / "tree"
    (tree / "b" / "c").mkdir(parents=True)
    shutil.copy(paths[0], tree / "a.txt")
    shutil.copy(paths[1], tree / "b" / "b.jsonl")
    shutil.copy(paths[2], tree / "b" / "c" / "c.parquet")
    (tree / ".notes.txt").write_text("hidden")
    (tree / ".git").mkdir()
    (tree / ".git" / "HEAD").write_text("ref: refs/heads/main")
    assert input_files([tree]) == [tree / "a.txt", tree / "b" / "b.jsonl", tree / "b" / "c" / "c.parquet"]
    prepare([tree], tmp_path / "out")
    assert all_tokens(tmp_path / "out") == expected
    assert input_files([tree / "b", paths[0]]) == [tree / "b" / "b.jsonl", tree / "b" / "c" / "c.parquet", paths[0]]
    (tmp_path / "empty" / ".cache").mkdir(parents=True)
    with pytest.raises(GPT2FnError, match=r"^input directory .*empty holds no files \(hidden ones are skipped\)$"):
        prepare([tmp_path / "empty"], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_val_tokens_takes_the_tail(inputs, tmp_path):
    _, paths, expected = inputs
    counts = prepare(paths[:1], tmp_path / "out", val_tokens=1500, shard_tokens=1000)
    val = load_split(tmp_path / "out", "val")
    assert counts["val"] == 1500 and counts["val_shards"] == 2 and isinstance(val, TokenStream)
    whole = get_tokenizer().encode_ordinary((paths[0]).read_text())
    assert val[:].tolist() == whole[-1500:] and load_split(tmp_path / "out", "train")[:].tolist() == whole[:-1500]


def test_a_token_stream_slices_like_one_tensor():
    shards = [torch.arange(0, 5), torch.arange(5, 12), torch.arange(12, 13), torch.arange(13, 20)]
    stream, whole = TokenStream(shards), torch.arange(20)
    assert len(stream) == 20
    for a in range(-20, 20):
        for b in range(-20, 21):
            assert torch.equal(stream[a:b], whole[a:b]), (a, b)


def test_an_unfinished_prepare_is_not_data_and_a_rerun_clears_it(inputs, tmp_path):
    _, paths, expected = inputs
    out = tmp_path / "out"
    prepare(paths, out, shard_tokens=997)
    (out / "manifest.json").unlink()  # as if killed before the manifest was written
    with pytest.raises(GPT2FnError, match="holds shards but no manifest.json: its prepare did not finish"):
        load_split(out, "train")
    prepare(paths, out, shard_tokens=2000)  # the stale shards are cleared, not mixed in
    assert all_tokens(out) == expected
    assert not any(p.name.startswith("train_") and int(p.stem[6:]) >= 5 for p in out.iterdir() if p.suffix == ".bin")
    with pytest.raises(GPT2FnError, match="already holds prepared data"):
        prepare(paths, out)
    (out / "train_000001.bin").write_bytes(b"\x00\x00")
    with pytest.raises(GPT2FnError, match="holds 1 tokens, the manifest says 2000; it is truncated"):
        load_split(out, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GPT2FnError, match="holds no prepared data"):
        load_split(empty, "train")


def llmc_write_datafile(filename, toks):
    """llm.c's dev/data/data_common.py ``write_datafile`` (GPT-2's version 1)."""
    import numpy as np

    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520  # magic
    header[1] = 1  # version
    header[2] = len(toks)
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(toks, dtype=np.uint16).tobytes())


def write_llmc_shards(directory, train, val, n_train_shards=2):
    """The tokens as llm.c's fineweb.py lays them out: the val shard first, then the train shards."""
    directory.mkdir()
    llmc_write_datafile(directory / "fineweb_val_000000.bin", val)
    size = -(-len(train) // n_train_shards)
    for i in range(n_train_shards):
        llmc_write_datafile(directory / f"fineweb_train_{i + 1:06d}.bin", train[i * size : (i + 1) * size])


def write_npy_shards(directory, train, val):
    """The tokens as build-nanogpt's fineweb.py saves them: np.save of uint16 arrays, the val shard first."""
    import numpy as np

    directory.mkdir()
    np.save(directory / "edufineweb_val_000000", np.array(val, dtype=np.uint16))
    half = len(train) // 2
    for i, part in enumerate((train[:half], train[half:])):
        np.save(directory / f"edufineweb_train_{i + 1:06d}", np.array(part, dtype=np.uint16))


def test_build_nanogpt_npy_shards_load_as_their_tokens_and_bad_ones_are_one_line(tmp_path):
    import numpy as np

    g = torch.Generator().manual_seed(1)
    train, val = torch.randint(0, 50257, (2001,), generator=g).tolist(), torch.randint(0, 50257, (300,), generator=g).tolist()
    write_npy_shards(tmp_path / "edu", train, val)
    assert load_split(tmp_path / "edu", "train")[:].tolist() == train
    assert load_split(tmp_path / "edu", "val")[:].tolist() == val
    np.save(tmp_path / "edu" / "edufineweb_val_000000", np.array(val, dtype=np.int32))
    with pytest.raises(GPT2FnError, match="is not a .npy file of GPT-2 tokens .one dimension of little-endian uint16"):
        load_split(tmp_path / "edu", "val")
    cut = tmp_path / "edu" / "edufineweb_train_000001.npy"
    cut.write_bytes(cut.read_bytes()[:-4])
    with pytest.raises(GPT2FnError, match=r"holds \d+ bytes, but its header's 1000 tokens take \d+: it is truncated"):
        load_split(tmp_path / "edu", "train")


def test_llmc_token_shards_load_as_their_tokens_and_bad_ones_are_one_line(tmp_path):
    g = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, 50257, (3001,), generator=g).tolist(), torch.randint(0, 50257, (500,), generator=g).tolist()
    write_llmc_shards(tmp_path / "fw", train, val, n_train_shards=3)
    (tmp_path / "fw" / "README.md").write_text("not a shard")
    assert load_split(tmp_path / "fw", "train")[:].tolist() == train
    assert load_split(tmp_path / "fw", "val")[:].tolist() == val
    llmc_write_datafile(tmp_path / "tiny_shakespeare_val.bin", val)  # llm.c's unsharded names
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny_shakespeare_val.bin").rename(tmp_path / "tiny" / "tiny_shakespeare_val.bin")
    assert load_split(tmp_path / "tiny", "val")[:].tolist() == val
    with pytest.raises(GPT2FnError, match="holds token shards but none of the train split"):
        load_split(tmp_path / "tiny", "train")
    cut = tmp_path / "fw" / "fineweb_train_000002.bin"
    cut.write_bytes(cut.read_bytes()[:-2])
    with pytest.raises(GPT2FnError, match=r"fineweb_train_000002.bin holds 3024 bytes, but its header's 1001 tokens "
                                          "take 3026: it is truncated"):  # fmt: skip
        load_split(tmp_path / "fw", "train")
    llama = bytearray((tmp_path / "fw" / "fineweb_val_000000.bin").read_bytes())
    llama[4:8] = (2).to_bytes(4, "little")
    (tmp_path / "fw" / "fineweb_val_000000.bin").write_bytes(bytes(llama))
    with pytest.raises(GPT2FnError, match="version 2, not 1 .GPT-2's uint16 tokens.: version 2 holds LLaMA 3's"):
        load_split(tmp_path / "fw", "val")


def test_training_reads_a_directory_of_shards(inputs, tmp_path):
    """scripts/train.py on several shards trains exactly as on the same
    tokens in one file (the old train.bin/val.bin layout), and as on llm.c's
    and build-nanogpt's shards of them."""
    _, paths, _ = inputs
    prepare(paths, tmp_path / "shards", shard_tokens=997)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for split in ("train", "val"):
        (legacy / f"{split}.bin").write_bytes(load_split(tmp_path / "shards", split)[:].numpy().tobytes())
    splits = [load_split(tmp_path / "shards", split)[:].tolist() for split in ("train", "val")]
    write_llmc_shards(tmp_path / "llmc", *splits)
    write_npy_shards(tmp_path / "npy", *splits)
    args = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--n_ctx", "32", "--block_size", "32",
            "--batch_size", "4", "--max_steps", "3", "--warmup_steps", "1", "--eval_interval", "3",
            "--eval_batches", "1", "--device", "cpu"]  # fmt: skip
    histories = []
    for name in ("shards", "legacy", "llmc", "npy"):
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--data", str(tmp_path / name),
                              "--out", str(tmp_path / f"{name}.pt"), *args], capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        histories.append(torch.load(tmp_path / f"{name}.pt", weights_only=True)["history"])
    assert histories[0] == histories[1] == histories[2] == histories[3]


def test_a_split_of_a_hub_folder_the_card_does_not_name(offline_hub):
    """A folder without a card config (the Hub's parquet conversion lays one
    out as CONFIG/SPLIT/NNNN.parquet; others name files SPLIT-*.parquet): the
    train split is every file in it, another split its own files."""
    from gpt2fn.weights import hub_dataset_files

    commit = "76543210fedcba9876543210fedcba9876543210"
    snapshot = offline_hub / "datasets--someone--converted" / "snapshots" / commit
    for name in ("plain/test/0000.parquet", "plain/validation/0000.parquet", "flat/test-00000-of-00001.parquet",
                 "flat/testing-00000.parquet", "flat/train-00000-of-00001.parquet"):  # fmt: skip
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        pyarrow.parquet.write_table(pyarrow.table({"text": [name]}), snapshot / name)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)

    def found(subset, split):
        return [p.relative_to(snapshot).as_posix() for p in hub_dataset_files("someone/converted", subset, split=split)]

    assert found("plain", "test") == ["plain/test/0000.parquet"]
    assert found("flat", "test") == ["flat/test-00000-of-00001.parquet"]
    assert found("flat", "train") == ["flat/test-00000-of-00001.parquet", "flat/testing-00000.parquet",
                                      "flat/train-00000-of-00001.parquet"]  # fmt: skip
    with pytest.raises(GPT2FnError, match="someone/converted subset plain has no train2 parquet files matching"):
        found("plain", "train2")


def test_a_hub_dataset_from_the_local_cache(inputs, tmp_path, offline_hub, capsys):
    """--hf_dataset REPO --hf_subset NAME: the subset's parquet files, found
    through the dataset card's configs, read from huggingface_hub's cache."""
    d, _, _ = inputs
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = offline_hub / "datasets--someone--web-edu" / "snapshots" / commit
    (snapshot / "sample" / "10BT").mkdir(parents=True)
    (snapshot / "data").mkdir()
    (snapshot / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                        "    path: data/*\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
                                        "    path: sample/10BT/*\n---\n# a card\n")  # fmt: skip
    texts = [corpus_text(20 + i, 15) for i in range(6)]
    for i in range(2):
        pyarrow.parquet.write_table(pyarrow.table({"text": texts[3 * i : 3 * i + 3]}), snapshot / "sample" / "10BT" / f"00{i}.parquet")
    shutil.copy(d / "c.parquet", snapshot / "data" / "000.parquet")  # another config's file: not read
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    cli = load_script("prepare_data")
    assert cli.main(["--hf_dataset", "someone/web-edu", "--hf_subset", "sample-10BT", "--out", str(tmp_path / "out")]) == 0
    tok = get_tokenizer()
    expected = []
    for text in texts:
        expected += ([ENDOFTEXT_ID] if expected else []) + tok.encode_ordinary(text)
    assert all_tokens(tmp_path / "out") == expected
    capsys.readouterr()
    assert cli.main(["--hf_dataset", "someone/other", "--out", str(tmp_path / "o2")]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
