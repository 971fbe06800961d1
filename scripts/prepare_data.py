#!/usr/bin/env python
"""Tokenize text files into train.bin / val.bin (uint16 GPT-2 tokens).

    python scripts/prepare_data.py ../shared/data/tinyshakespeare.txt --out data/shakespeare
"""

from __future__ import annotations

import argparse
import sys

from gpt2fn.data import prepare
from gpt2fn.errors import run_cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="UTF-8 text files")
    p.add_argument("--out", required=True, help="directory for train.bin and val.bin")
    p.add_argument("--val_fraction", type=float, default=0.1, help="the last fraction of the tokens (default 0.1)")
    return run_cli(run, p.parse_args(argv))


def run(args) -> int:
    counts = prepare(args.files, args.out, args.val_fraction)
    print(f"{counts['train']} train tokens, {counts['val']} val tokens -> {args.out}/train.bin, val.bin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
