#!/usr/bin/env python
"""Perplexity of a model over a text file (sliding window for long texts).

    python scripts/eval_ppl.py --model gpt2 --file ../shared/data/tinyshakespeare.txt --stride 512
"""

from __future__ import annotations

import sys

import torch

from gpt2fn.device import DEVICE_HELP, resolve_device
from gpt2fn.errors import ArgumentParser, GPT2FnError, check_input, check_int, read_utf8, run_cli
from gpt2fn.evaluation import perplexity
from gpt2fn.quantize import DTYPE_HELP, WEIGHT_DTYPES
from gpt2fn.tokenizer import check_vocabulary, get_tokenizer
from gpt2fn.weights import MODEL_HELP, REVISION_HELP, load_pretrained, resolve_model


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help=MODEL_HELP)
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--file", required=True, help="UTF-8 text file")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: the context)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES, help=f"{DTYPE_HELP}: what it costs")
    return run_cli(run, p.parse_args(argv))


def run(args) -> int:
    if args.context is not None:
        check_int("--context", args.context, low=2)
    if args.stride is not None:
        check_int("--stride", args.stride)
    path = check_input(args.file, "text file")
    text = read_utf8(path, "text file")
    device = resolve_device(args.device)
    model_path = resolve_model(args.model, args.revision)
    tokenizer = get_tokenizer(model_path)
    tokens = torch.tensor(tokenizer.encode_ordinary(text), dtype=torch.int64)
    if len(tokens) < 2:
        raise GPT2FnError(f"{path} holds {len(tokens)} token(s); perplexity needs at least 2")
    params, config = load_pretrained(model_path, dtype=args.dtype, device=device)
    check_vocabulary(tokenizer, config.vocab_size)
    result = perplexity(params, config, tokens, args.context, args.stride, progress=True)
    print(f"{args.model} ({args.dtype}) on {path.name}: {result.n_tokens} tokens, NLL {result.nll:.4f} nats/token, "
          f"perplexity {result.perplexity:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
