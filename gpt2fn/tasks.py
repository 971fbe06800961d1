"""The evaluation scripts' one command line: a benchmark (:class:`Task`)
scored on a model, its data from a file or the Hub, its metrics printed and
optionally written as JSON (``scripts/eval_hellaswag.py``,
``scripts/eval_lambada.py``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gpt2fn.device import DEVICE_HELP, resolve_device
from gpt2fn.errors import ArgumentParser, check_int, check_output_file, run_cli
from gpt2fn.files import write_json
from gpt2fn.quantize import DTYPE_HELP, WEIGHT_DTYPES
from gpt2fn.tokenizer import get_tokenizer
from gpt2fn.weights import MODEL_HELP, REVISION_HELP, load_pretrained, resolve_model


@dataclass(frozen=True)
class Task:
    name: str  # "HellaSwag"
    items: str  # what it scores, plural: "examples"
    data_help: str  # --data's help
    hub_file: Callable[[], Path]  # its data from the Hub, without --data
    load: Callable[..., list]  # (path, limit) -> items
    evaluate: Callable[..., Any]  # (params, config, tokenizer, items, progress=) -> a result with .n and the metrics
    metrics: tuple[str, ...]  # the result's fields to print, in order


def cli(task: Task, doc: str) -> Callable[..., int]:
    """A script's ``main(argv=None)``: its ``--help`` opens with the first paragraph of ``doc``."""
    return functools.partial(main, task, doc.split("\n\n")[0])


def main(task: Task, description: str, argv=None) -> int:
    p = ArgumentParser(description=description)
    p.add_argument("--model", default="gpt2", help=MODEL_HELP)
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES, help=f"{DTYPE_HELP}: what it costs")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--data", default=None, help=task.data_help)
    p.add_argument("--limit", type=int, default=None, help=f"score only the first N {task.items}")
    p.add_argument("--json", default=None, help=f"also write the result here (model, {task.items}, "
                                                f"{', '.join(task.metrics)})")  # fmt: skip
    return run_cli(run, task, p.parse_args(argv))


def run(task: Task, args) -> int:
    if args.limit is not None:
        check_int("--limit", args.limit)
    if args.json:
        check_output_file(args.json, "--json file")
    items = task.load(args.data or task.hub_file(), args.limit)
    device = resolve_device(args.device)
    path = resolve_model(args.model, args.revision)
    params, config = load_pretrained(path, dtype=args.dtype, device=device)
    result = task.evaluate(params, config, get_tokenizer(path), items, progress=True)
    scores = {metric: getattr(result, metric) for metric in task.metrics}
    print(f"{args.model} ({args.dtype}) on {result.n} {task.name} {task.items}: "
          + "  ".join(f"{metric} {value:.4f}" for metric, value in scores.items()))  # fmt: skip
    if args.json:
        write_json(args.json, {"model": args.model, "revision": args.revision, "dtype": args.dtype,
                               task.items: result.n, **scores})  # fmt: skip
    return 0
