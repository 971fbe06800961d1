#!/usr/bin/env python
"""Tokenize a corpus into uint16 GPT-2 token shards (train + val) for scripts/train.py.

    python scripts/prepare_data.py ../shared/data/tinyshakespeare.txt --out data/shakespeare
    python scripts/prepare_data.py corpus/*.jsonl --out data/web --workers 8 --val_tokens 10000000
    python scripts/prepare_data.py --hf_dataset HuggingFaceFW/fineweb-edu --hf_subset sample-10BT \\
        --out data/edu10B --workers 16 --val_tokens 100000000

Inputs: text files (one document each), .jsonl (one document per line, its
"text" field) and .parquet (a "text" column, FineWeb's format; needs
pyarrow: pip install -e ".[data]"), or directories of them: every file
under one, recursively, in sorted path order (hidden ones skipped). Streams: memory stays bounded whatever
the corpus size. Shards are --shard_tokens tokens each, written atomically,
and manifest.json is written last, so an interrupted run leaves nothing that
looks complete. The last --val_tokens tokens (or --val_fraction of them) are
the val split.
"""

from __future__ import annotations

import sys

from gpt2fn.data import prepare
from gpt2fn.errors import ArgumentParser, GPT2FnError, check_int, run_cli


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*",
                   help="text, .jsonl or .parquet files, or directories of them (every file under one, in sorted order)")
    p.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    p.add_argument("--val_fraction", type=float, default=None, help="the last fraction of the tokens (default 0.1)")
    p.add_argument("--val_tokens", type=int, default=None, help="the last N tokens instead (e.g. 100000000 at scale)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (default 100M: 200 MB)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--hf_dataset", default=None, help="a Hub dataset of parquet files, e.g. HuggingFaceFW/fineweb-edu")
    p.add_argument("--hf_subset", default=None, help="its subset (a folder of parquet files), e.g. sample-10BT")
    p.add_argument("--hf_revision", "--revision", dest="revision", default=None,
                   help="Hub revision of --hf_dataset (default: main)")
    return run_cli(run, p.parse_args(argv))


def run(args) -> int:
    check_int("--workers", args.workers)
    check_int("--shard_tokens", args.shard_tokens, low=2)
    if args.val_tokens is not None:
        check_int("--val_tokens", args.val_tokens, low=2)
        if args.val_fraction is not None:
            raise GPT2FnError("--val_tokens and --val_fraction both size the val split; give one")
    if bool(args.files) == bool(args.hf_dataset):
        raise GPT2FnError("give input files or --hf_dataset REPO (one of the two)")
    if args.hf_subset and not args.hf_dataset:
        raise GPT2FnError("--hf_subset needs --hf_dataset")
    if args.revision and not args.hf_dataset:
        raise GPT2FnError("--hf_revision picks a Hub snapshot of --hf_dataset; drop it for local files")
    files = args.files
    if args.hf_dataset:
        from gpt2fn.weights import hub_dataset_files

        files = hub_dataset_files(args.hf_dataset, args.hf_subset, args.revision)
    val_fraction = 0.1 if args.val_fraction is None else args.val_fraction
    counts = prepare(files, args.out, val_fraction, val_tokens=args.val_tokens, shard_tokens=args.shard_tokens,
                     workers=args.workers, progress=True)  # fmt: skip
    print(f"{counts['train']} train tokens in {counts['train_shards']} shard(s), {counts['val']} val tokens in "
          f"{counts['val_shards']} -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
