#!/usr/bin/env python
"""HellaSwag accuracy of a model, scored completion-style (see gpt2fn.hellaswag).

    python scripts/eval_hellaswag.py --model gpt2 --data hellaswag_val.jsonl
    python scripts/eval_hellaswag.py --model gpt2          # the validation split from the Hub
    python scripts/eval_hellaswag.py --model weights/my-model.safetensors --data hellaswag_val.jsonl --limit 500

Prints acc (highest summed log-probability) and acc_norm (highest mean per
token). GPT-2 124M scores acc_norm 0.2955 on the validation set, 1558M 0.4893.
"""

from __future__ import annotations

import sys

from gpt2fn.device import DEVICE_HELP, resolve_device
from gpt2fn.errors import ArgumentParser, check_int, check_output_file, run_cli
from gpt2fn.files import write_json
from gpt2fn.hellaswag import evaluate_hellaswag, hub_validation_file, load_examples
from gpt2fn.quantize import DTYPE_HELP, WEIGHT_DTYPES
from gpt2fn.tokenizer import get_tokenizer
from gpt2fn.weights import MODEL_HELP, REVISION_HELP, load_pretrained, resolve_model


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help=MODEL_HELP)
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES, help=f"{DTYPE_HELP}: what it costs")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--data", default=None, help="HellaSwag jsonl (ctx, endings, label per line), e.g. "
                   "hellaswag_val.jsonl; default: the validation split from the Hub (Rowan/hellaswag, needs pyarrow)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--json", default=None, help="also write the result here (model, examples, acc, acc_norm)")
    return run_cli(run, p.parse_args(argv))


def run(args) -> int:
    if args.limit is not None:
        check_int("--limit", args.limit)
    if args.json:
        check_output_file(args.json, "--json file")
    examples = load_examples(args.data or hub_validation_file(), args.limit)
    device = resolve_device(args.device)
    path = resolve_model(args.model, args.revision)
    params, config = load_pretrained(path, dtype=args.dtype, device=device)
    result = evaluate_hellaswag(params, config, get_tokenizer(path), examples, progress=True)
    print(f"{args.model} ({args.dtype}) on {result.n} HellaSwag examples: acc {result.acc:.4f}  acc_norm {result.acc_norm:.4f}")
    if args.json:
        write_json(args.json, {"model": args.model, "revision": args.revision, "dtype": args.dtype, "examples": result.n,
                               "acc": result.acc, "acc_norm": result.acc_norm})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
