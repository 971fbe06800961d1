#!/usr/bin/env python
"""Perplexity of a model over a text file or a Hub dataset's split (sliding window for long texts).

    python scripts/eval_ppl.py --model gpt2 --file ../shared/data/tinyshakespeare.txt --stride 512
    python scripts/eval_ppl.py --model gpt2-large --hf_dataset Salesforce/wikitext --hf_subset wikitext-2-raw-v1 \\
        --stride 512    # Hugging Face's perplexity guide: 16.45
"""

from __future__ import annotations

import sys

import torch

from gpt2fn.device import DEVICE_HELP, resolve_device
from gpt2fn.errors import ArgumentParser, GPT2FnError, check_input, check_int, check_output_file, read_utf8, run_cli
from gpt2fn.files import write_json
from gpt2fn.evaluation import hub_dataset_text, perplexity
from gpt2fn.quantize import DTYPE_HELP, WEIGHT_DTYPES
from gpt2fn.tokenizer import check_vocabulary, get_tokenizer
from gpt2fn.weights import MODEL_HELP, REVISION_HELP, load_pretrained, resolve_model


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help=MODEL_HELP)
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--file", default=None, help="UTF-8 text file to score (or --hf_dataset)")
    p.add_argument("--hf_dataset", default=None,
                   help="a Hub dataset of parquet files with a text column, its rows joined by a blank line, "
                        "e.g. Salesforce/wikitext (needs pyarrow)")
    p.add_argument("--hf_subset", default=None, help="its subset (a config of its card, or a folder), e.g. wikitext-2-raw-v1")
    p.add_argument("--hf_split", default="test", help="its split")
    p.add_argument("--hf_revision", default=None, help="Hub revision of --hf_dataset (default: main)")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, default=None, help="window step (default: the context)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES, help=f"{DTYPE_HELP}: what it costs")
    p.add_argument("--json", default=None, help="also write the result here (model, text, windows, tokens, nll, perplexity)")
    return run_cli(run, p.parse_args(argv))


def run(args) -> int:
    if args.context is not None:
        check_int("--context", args.context, low=2)
    if args.stride is not None:
        check_int("--stride", args.stride)
    if args.json:
        check_output_file(args.json, "--json file")
    if (args.file is None) == (args.hf_dataset is None):
        raise GPT2FnError("give the text to score: --file FILE or --hf_dataset REPO (one of the two)")
    given = [f"--{name}" for name in ("hf_subset", "hf_revision") if getattr(args, name) is not None]
    if args.file is not None and (given or args.hf_split != "test"):
        raise GPT2FnError(f"{(given or ['--hf_split'])[0]} picks what of --hf_dataset to score; drop it with --file")
    if args.file is not None:
        path = check_input(args.file, "text file")
        text, source = read_utf8(path, "text file"), path.name
    else:
        text = hub_dataset_text(args.hf_dataset, args.hf_subset, args.hf_split, args.hf_revision)
        source = " ".join(s for s in (args.hf_dataset, args.hf_subset, args.hf_split) if s)
    device = resolve_device(args.device)
    model_path = resolve_model(args.model, args.revision)
    tokenizer = get_tokenizer(model_path)
    tokens = torch.tensor(tokenizer.encode_ordinary(text), dtype=torch.int64)
    if len(tokens) < 2:
        raise GPT2FnError(f"{source} holds {len(tokens)} token(s); perplexity needs at least 2")
    params, config = load_pretrained(model_path, dtype=args.dtype, device=device)
    check_vocabulary(tokenizer, config.vocab_size)
    result = perplexity(params, config, tokens, args.context, args.stride, progress=True)
    print(f"{args.model} ({args.dtype}) on {source}: {result.n_tokens} tokens, NLL {result.nll:.4f} nats/token, "
          f"perplexity {result.perplexity:.2f}")  # fmt: skip
    if args.json:
        context = args.context or config.n_ctx
        write_json(args.json, {"model": args.model, "revision": args.revision, "dtype": args.dtype, "text": source,
                               "context": context, "stride": args.stride or context, "tokens": result.n_tokens,
                               "nll": result.nll, "perplexity": result.perplexity})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
