#!/usr/bin/env python
"""Side-by-side decoding benchmark, in ONE process on the same weights.

    python scripts/benchmark.py                       # 124M shape, random weights
    python scripts/benchmark.py --model gpt2 --json results.json --plot tokens_per_s.png

Measures, interleaving the variants over several rounds, in alternating
order (machines are noisy: only ratios measured side by side mean anything):

1. the weight-streaming limit: the time to read every weight byte once
   (measured in every round, the best kept);
2. compile time of the decode step, cold (empty inductor cache) and warm
   (from the on-disk cache), after inductor's one-off start-up (timed
   apart), and whether any step recompiles;
3. generation (prompt + N new tokens, greedy), all through the one decode
   loop of ``gpt2fn.generation``: eager and compiled, per dtype, and
   compiled with ``--tokens-per-call`` steps chained per call; a batch of
   ``--batch`` prompts decoded together, compiled for every dtype and eager
   for the first (tokens/s over all rows); and transformers' ``generate()``
   on the same weights (built by ``GPTConfig.to_hf``), with its default cache and, on CUDA, its static cache;
   and speculative decoding of the float32 model drafted by each of
   ``--drafts`` (compiled: its own weights at a dtype, another model with
   its vocabulary, e.g. ``gpt2`` for ``gpt2-xl``, or ``lookup``: prompt
   lookup, no model), for each ``k`` of ``--draft-tokens``
   and adaptive up to ``--adaptive-draft``, with the acceptance rate beside it
   (and with ``--draft-vocab N``, each again with the draft proposing only N
   tokens: :func:`gpt2fn.speculative.draft_vocab`), and for each whole draft
   at its largest ``k`` the batch of ``--batch`` prompts too;
4. decode speed against sequence length up to the full context: eager and
   compiled, with and without the KV cache;
5. prefill time per prompt length, eager and compiled;
6. with ``--beams K``, beam search over K beams (prompt + N new tokens,
   whole searches, interleaved rounds): gpt2fn eager for the first dtype and
   compiled for every dtype, against transformers' ``generate(num_beams=K)``
   on the float32 weights, and whether each found transformers' best beam;
7. peak memory of each generation, above what the process held before it
   (weights already loaded: the cache, activations and workspace).

Prints tables of tokens/s and ratios (compiled/eager, cache/no-cache,
ours/transformers, ours/limit), writes JSON with ``--json`` and with
``--plot`` a PNG of every generation row's tokens/s beside its limit and of
tokens/s against sequence length (needs matplotlib:
``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm

from gpt2fn.beam import beam_search
from gpt2fn.config import PRESETS
from gpt2fn.device import DEVICE_HELP, ONEDNN, ONEDNN_MIN_WEIGHT, ONEDNN_ROWS, resolve_device
from gpt2fn.errors import ArgumentParser, GPT2FnError, check_int, check_output_file, parse_int_list, read_utf8, run_cli
from gpt2fn.files import write_json
from gpt2fn.generation import generate_all
from gpt2fn.measure import (decode_step_time, memory_mb, peak_memory_mb, product_times, reset_peak_memory, streaming_limit_s,
                            weight_bytes)  # fmt: skip
from gpt2fn.params import init_params
from gpt2fn.plotting import require_pyplot, save_figure
from gpt2fn.quantize import WEIGHT_DTYPES, cast_params
from gpt2fn.speculative import DRAFT_DTYPES, PromptLookup, check_draft, draft_vocab, frequent_tokens, self_draft
from gpt2fn.steps import cached_steps, compiled_steps, uncached_steps
from gpt2fn.tokenizer import encode, get_tokenizer
from gpt2fn.weights import MODEL_HELP, REVISION_HELP, load_pretrained, transformers_model


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"weights to load: {MODEL_HELP} (default: random weights of --shape)")
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--shape", default=None, choices=sorted(PRESETS), help="preset shape for random weights (default gpt2)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--dtypes", default="float32,bfloat16,int8", help=f"comma-separated, from {', '.join(WEIGHT_DTYPES)}")
    p.add_argument("--attention", default="auto", choices=["auto", "manual", "sdpa"], help="as generate.py's --attention")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens of each generation")
    p.add_argument("--new-tokens", type=int, default=256, help="new tokens of each generation")
    p.add_argument("--batch", type=int, default=8,
                   help="also decode this many prompts in one batch: compiled for every dtype, eager for the first, "
                        "and speculative with each draft at its largest k (1 = skip)")
    p.add_argument("--tokens-per-call", type=int, default=0,
                   help="also compiled rows for every dtype with this many decode steps chained per call "
                        "(generate's tokens_per_call: one graph for models narrower than GPT-2 on the CPU, else "
                        "the same step as one a call; 0 or 1 = skip, default)")
    p.add_argument("--drafts", default="int8,bfloat16",
                   help="speculative decoding rows, compiled, for the float32 model drafted by each of these: "
                        f"its own weights at a dtype ({', '.join(DRAFT_DTYPES)}), another model with its "
                        "vocabulary (a name or path, as --model), or lookup (prompt lookup; empty = skip)")
    p.add_argument("--draft-tokens", default="4,8", help="comma-separated k: tokens each speculative round drafts")
    p.add_argument("--adaptive-draft", type=int, default=8,
                   help="also a speculative row with k adaptive up to this many (0 = skip)")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="also every speculative row with the draft proposing only this many tokens: the most "
                        "frequent in --draft-vocab-from, else the lowest ids (0 = skip, default)")
    p.add_argument("--draft-vocab-from", default=None, help="a text file whose most frequent tokens --draft-vocab keeps")
    p.add_argument("--beams", type=int, default=0,
                   help="also beam search over this many beams, against transformers' (0 = skip, default)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the generation runs (median)")
    p.add_argument("--lengths", default="64,256,512,1024", help="sequence lengths for the per-step sweep")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--warm-cache", action="store_true", help="keep the on-disk inductor cache (no cold compile)")
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument("--plot", default=None,
                   help="write a PNG here: every generation row beside its limit, and tokens/s against sequence length")
    return p.parse_args(argv)


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x == x else "-"


def check_args(args) -> tuple[list[str], list[int]]:
    """Refuse bad flags before any work; returns (dtypes, lengths)."""
    if args.model is not None and args.shape is not None:
        raise GPT2FnError("--shape sets the shape of random weights; --model brings its own: drop --shape")
    if args.revision is not None and args.model is None:
        raise GPT2FnError("--revision picks the Hub snapshot of --model; give --model too, or drop it")
    check_int("--prompt-len", args.prompt_len)
    check_int("--new-tokens", args.new_tokens, low=3)  # the compiled run spends its first step compiling
    check_int("--batch", args.batch)
    check_int("--rounds", args.rounds)
    draft_tokens(args)
    check_int("--adaptive-draft", args.adaptive_draft, low=0)
    check_int("--tokens-per-call", args.tokens_per_call, low=0)
    check_int("--draft-vocab", args.draft_vocab, low=0)
    check_int("--beams", args.beams, low=0)
    if args.draft_vocab_from is not None and not args.draft_vocab:
        raise GPT2FnError("--draft-vocab-from needs --draft-vocab N: how many of its most frequent tokens to keep")
    if args.draft_vocab and not args.drafts:
        raise GPT2FnError("--draft-vocab cuts the speculative rows' drafts; give --drafts too")
    if args.draft_vocab_from is not None and not os.path.isfile(args.draft_vocab_from):
        raise GPT2FnError(f"--draft-vocab-from: there is no file {args.draft_vocab_from}")
    lengths = parse_int_list("--lengths", args.lengths, low=2)
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in WEIGHT_DTYPES:
            raise GPT2FnError(f"unknown dtype {d!r} in --dtypes; use a comma-separated list from {', '.join(WEIGHT_DTYPES)}")
    if args.json:
        check_output_file(args.json, "--json file")
    if args.plot:
        check_output_file(args.plot, "--plot file", suffix=".png")
        require_pyplot("--plot")
    return dtypes, lengths


def draft_tokens(args) -> list[int]:
    """--draft-tokens as integers (refused with one line if it is not a list of them)."""
    return parse_int_list("--draft-tokens", args.draft_tokens, example="4,8")


@dataclass(frozen=True)
class Contender:
    """One generation run, measured as decode tokens/s over all its rows."""

    system: str  # "gpt2fn" or "transformers"
    mode: str  # gpt2fn: "eager" / "compiled"; transformers: "default" / "static cache"
    dtype: str
    batch: int
    run: Callable[[], float]
    notes: dict = field(default_factory=dict)  # what a run reports besides tokens/s (speculative: acceptance)

    @property
    def name(self) -> str:
        batch = f" batch {self.batch}" if self.batch > 1 else ""
        return f"{self.system} {self.mode} {self.dtype}{batch}"


def main(argv=None) -> int:
    args = parse_args(argv)
    dtypes, lengths = check_args(args)
    device = resolve_device(args.device)
    if not args.warm_cache:  # a fresh inductor cache (read at every compilation) makes the first one truly cold
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt2fn-bench-inductor-")
    if args.model:
        params32, config = load_pretrained(args.model, revision=args.revision, device=device)
        model_name = args.model
    else:
        shape = args.shape or "gpt2"
        config = PRESETS[shape]
        params32 = init_params(config, seed=0, device=device)
        model_name = f"{shape} shape, random weights"
    if max(lengths) > config.n_ctx or args.prompt_len + args.new_tokens > config.n_ctx:
        raise GPT2FnError(f"lengths must fit the {config.n_ctx}-token context")
    vocab = draft_vocabulary(args, config) if args.draft_vocab else None
    drafts = load_drafts(args, params32, config, device)
    params = {d: cast_params(params32, d) for d in dtypes}
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(device), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "command": " ".join(["python", "scripts/benchmark.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": model_name, "config": config.to_dict(), "attention": args.attention,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
    }  # fmt: skip
    print(f"gpt2fn benchmark: {model_name}, greedy, {args.attention} attention, "
          f"torch {torch.__version__}, {device} ({torch.get_num_threads()} threads)")  # fmt: skip
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    results["compile_startup_s"], results["compile"] = measure_compile(params, config, prompt, args.attention, device)
    contenders = make_contenders(args, params, params32, config, prompt, device, drafts, vocab)
    results.update(measure_generation(contenders, params, device, args.rounds))
    if args.beams:
        results["beams"] = measure_beams(args, params, params32, config, prompt)
    results["sweep"] = measure_sweep(params[dtypes[0]], config, device, dtypes[0], lengths, args.attention)
    if device.type == "cpu" and ONEDNN:  # what few_rows chooses between, for the float32 weights
        results["products"] = {n: product_times(params32, n) for n in tqdm(PRODUCT_ROWS, desc="few-row products", leave=False)}
    print_report(results)
    if args.json:
        print(f"wrote {write_json(args.json, results)}")
    if args.plot:
        plot(results, args.plot)
    return 0


PRODUCT_ROWS = (1, 2, 3, 4, 5, 8, 9, 12, 16, 17)


def measure_compile(params: dict, config, prompt, attention, device) -> tuple[float, dict]:
    """Inductor's start-up (its one-off work in a process, e.g. probing the
    CPU's features, timed on a one-line function), then the decode step's
    compile time per dtype: cold (fresh cache dir), then warm (dynamo reset,
    graph from the on-disk cache). Without the start-up apart, the first
    dtype's cold time carries it."""
    start = time.perf_counter()
    torch.compile(lambda x: x * 2, fullgraph=True)(torch.ones(16, device=device))
    startup_s = time.perf_counter() - start
    times = {}
    for d in tqdm(params, desc="compile (cold, warm)", leave=False):
        cold_warm = []
        for _ in range(2):
            torch._dynamo.reset()
            cold_warm.append(generate_all(params[d], config, prompt, 3, temperature=0, attention=attention, compile=True)[1].compile_s)
        times[d] = {"cold_s": cold_warm[0], "warm_s": cold_warm[1]}
    return startup_s, times


def make_contenders(args, params: dict, params32, config, prompt, device, drafts, cut_vocab) -> list[Contender]:
    def ours(d: str, compiled: bool, prompts, per_call: int = 1) -> Contender:
        def run() -> float:
            stats = generate_all(params[d], config, prompts, args.new_tokens, temperature=0,
                                 attention=args.attention, compile=compiled, tokens_per_call=per_call)[1]  # fmt: skip
            return stats.decode_tokens * stats.batch / stats.decode_s

        mode = ("compiled" if compiled else "eager") + (f", {per_call} a call" if per_call > 1 else "")
        return Contender("gpt2fn", mode, d, prompts.shape[0], run)

    def speculative(d: str, draft: tuple, prompts, k: int, adaptive: bool) -> Contender:
        notes = {}

        def run() -> float:
            stats = generate_all(params32, config, prompts, args.new_tokens, temperature=0, attention=args.attention,
                                 compile=True, draft=draft, draft_tokens=k, adaptive_draft=adaptive)[1]  # fmt: skip
            notes.setdefault("acceptance_rate", []).append(stats.acceptance_rate)
            notes.setdefault("tokens_per_pass", []).append(stats.tokens_per_pass)
            notes.setdefault("drafted_per_pass", []).append(stats.drafted_per_pass)
            return stats.decode_tokens * stats.batch / stats.decode_s

        name = f"speculative {d} k<={k} adaptive" if adaptive else f"speculative {d} k={k}"
        return Contender("gpt2fn", name, "float32", prompts.shape[0], run, notes)

    contenders = [ours(d, compiled, prompt) for d in params for compiled in (False, True)]
    if args.tokens_per_call > 1:
        contenders += [ours(d, True, prompt, args.tokens_per_call) for d in params]
    prompts = None
    if args.batch > 1:  # the same prompt length per row, so every row runs all steps
        prompts = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
        contenders += [ours(next(iter(params)), False, prompts)] + [ours(d, True, prompts) for d in params]
    ks = [(k, False) for k in draft_tokens(args)]
    ks += [(args.adaptive_draft, True)] if args.adaptive_draft else []
    vocabs = [None] if cut_vocab is None else [None, cut_vocab]  # whole, and cut to --draft-vocab tokens
    for (d, draft), vocab in itertools.product(drafts.items(), vocabs):
        if vocab is not None:
            if isinstance(draft, PromptLookup):  # no model: no head to cut
                continue
            draft, d = (draft_vocab(draft[0], vocab), draft[1]), f"{d} v{len(vocab)}"  # one copy serves every k
        contenders += [speculative(d, draft, prompt, k, adaptive) for k, adaptive in ks]
        if prompts is not None and vocab is None:  # the batch too, with each whole draft at its largest fixed k
            contenders.append(speculative(d, draft, prompts, max(draft_tokens(args)), False))
    model = None if args.no_transformers else transformers_model(params32, config)  # None: transformers is not installed
    if model is not None:
        modes = ("default", "static cache") if device.type == "cuda" else ("default",)
        for d in transformers_dtypes(params, device):
            hf = (model if d == "float32" else transformers_model(params32, config).to(getattr(torch, d))).eval()
            for mode in modes:
                run = functools.partial(hf_generate, hf, prompt, args.new_tokens, mode == "static cache")
                contenders.append(Contender("transformers", mode, d, 1, run))
    return contenders


def transformers_dtypes(params: dict, device) -> list[str]:
    """The dtypes transformers runs in: float32 (the baseline of every row),
    and on CUDA also each of ``--dtypes`` it has (bfloat16, float16: like
    against like); its int8 is another scheme, so int8 rows meet float32."""
    if device.type != "cuda":
        return ["float32"]
    return ["float32", *(d for d in params if d in ("bfloat16", "float16"))]


def load_drafts(args, params32, config, device) -> dict[str, tuple | PromptLookup]:
    """``--drafts``, by row name: (params, config) of the float32 model's own
    weights at a dtype, or of another model (loaded and checked before any
    work), or ``lookup``: prompt lookup (:class:`~gpt2fn.speculative.PromptLookup`)."""
    drafts = {}
    for d in filter(None, args.drafts.split(",")):
        if d in DRAFT_DTYPES:
            drafts[d] = self_draft(params32, d), config
        elif d == "lookup":
            drafts[d] = PromptLookup()
        else:
            draft = drafts[Path(d).stem] = load_pretrained(d, device=device)
            check_draft(config, draft, max(draft_tokens(args)), args.prompt_len, args.new_tokens)
    return drafts


def draft_vocabulary(args, config) -> torch.Tensor:
    """The ``--draft-vocab`` most frequent tokens of ``--draft-vocab-from`` (else the lowest ids)."""
    text = read_utf8(args.draft_vocab_from, "--draft-vocab-from file") if args.draft_vocab_from else ""
    tokens = torch.tensor(encode(get_tokenizer(), text), dtype=torch.long)
    return frequent_tokens(tokens, args.draft_vocab, config.vocab_size)


def measure_generation(contenders: list[Contender], params: dict, device, rounds: int) -> dict:
    """Every contender, interleaved over ``rounds`` in alternating order (median kept), beside the
    weight-streaming limit of each dtype, measured in every round (best kept)."""
    for c in contenders:  # compile every graph and put it back in memory before timing
        if c.mode.startswith(("compiled", "speculative")):
            c.run()
            c.notes.clear()
    for d in params:  # the limit's own compiled read, too
        streaming_limit_s(weight_bytes(params[d]), device, repeats=1)
    counters.clear()
    runs: dict[str, list] = {c.name: [] for c in contenders}
    limit_s: dict[str, list[float]] = {d: [] for d in params}
    with tqdm(total=rounds * len(contenders), desc="generation", leave=False) as bar:
        for r in range(rounds):
            for d in params:
                limit_s[d].append(streaming_limit_s(weight_bytes(params[d]), device)[0])
            for c in contenders if r % 2 == 0 else contenders[::-1]:  # no variant always runs after the same one
                before = memory_mb(device)
                reset_peak_memory(device)
                runs[c.name].append((c.run(), peak_memory_mb(device) - before))
                bar.update()
    generation = {
        c.name: {"system": c.system, "mode": c.mode, "dtype": c.dtype, "batch": c.batch,
                 "tokens_per_s": statistics.median(r[0] for r in runs[c.name]), "all": [r[0] for r in runs[c.name]],
                 "peak_memory_mb": max(r[1] for r in runs[c.name]),
                 **{k: statistics.median(v) for k, v in c.notes.items()}}
        for c in contenders
    }  # fmt: skip
    limit = {
        d: {"weight_mb": weight_bytes(params[d]) / 1e6, "seconds": min(limit_s[d]),
            "gb_per_s": weight_bytes(params[d]) / min(limit_s[d]) / 1e9, "tokens_per_s": 1 / min(limit_s[d])}
        for d in params
    }  # fmt: skip
    # graphs made during the timed runs: 0 = no recompilation
    return {"generation": generation, "limit": limit, "graphs_compiled_during_timed_runs": counters["stats"]["unique_graphs"]}


def measure_beams(args, params: dict, params32, config, prompt) -> dict:
    """Beam search of ``--beams`` beams over the prompt, ``--new-tokens`` new
    tokens: seconds per whole search (prompt included, the median of
    ``--rounds`` interleaved rounds, after one untimed run that compiles),
    gpt2fn eager (the first dtype) and compiled (each dtype), transformers on
    the float32 weights, and whether each variant's best beam is transformers'."""
    K, n = args.beams, args.new_tokens

    def ours(d: str, compiled: bool) -> Callable[[], list[int]]:
        return lambda: beam_search(params[d], config, prompt, n, K, compile=compiled)[0][0].tokens

    variants = {f"gpt2fn eager {next(iter(params))}": ours(next(iter(params)), False)}
    variants.update({f"gpt2fn compiled {d}": ours(d, True) for d in params})
    model = None if args.no_transformers else transformers_model(params32, config)
    if model is not None:

        def theirs() -> list[int]:
            with torch.inference_mode():
                out = model.generate(prompt.to(model.device), attention_mask=torch.ones_like(prompt).to(model.device),
                                     max_new_tokens=n, min_new_tokens=n, num_beams=K, do_sample=False, pad_token_id=0)
            return out[0, prompt.shape[1] :].tolist()  # fmt: skip

        variants["transformers float32"] = theirs
    best = {name: run() for name, run in tqdm(variants.items(), desc="beam search (untimed, compiles)", leave=False)}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with tqdm(total=args.rounds * len(variants), desc="beam search", leave=False) as bar:
        for r in range(args.rounds):
            for name in variants if r % 2 == 0 else list(variants)[::-1]:
                start = time.perf_counter()
                variants[name]()
                seconds[name].append(time.perf_counter() - start)
                bar.update()
    reference = best.get("transformers float32")
    return {
        "beams": K,
        "runs": {name: {"seconds": statistics.median(t), "all": t,
                        "same_best_beam": None if reference is None else best[name] == reference}
                 for name, t in seconds.items()},
    }  # fmt: skip


def measure_sweep(params, config, device, dtype: str, lengths: list[int], attention: str) -> dict:
    """Per-step decode speed against sequence length, with and without the
    cache, eager and compiled; the no-cache step at length n is also the
    prefill of an n-token prompt."""
    kw = dict(attention=attention, temperature=0, top_k=0, top_p=1.0)
    variants = {
        "eager, cache": cached_steps(config, **kw),
        "compiled, cache": compiled_steps(config, device, 1, **kw),
        "eager, no cache": uncached_steps(config, **kw),
        "compiled, no cache": uncached_steps(config, compile=True, **kw),
    }
    tokens_per_s = {}
    for name, steps in tqdm(variants.items(), desc="sequence-length sweep", leave=False):
        cache_len = config.n_ctx if "no cache" not in name else None
        tokens_per_s[name] = {n: 1 / decode_step_time(params, config, steps, n, 3, cache_len) for n in lengths}
    return {"dtype": dtype, "tokens_per_s": tokens_per_s}


class _Clock:
    """A transformers streamer that only notes the time: generate() calls
    put() with the prompt, then once per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model, prompt, n_new, static_cache: bool) -> float:
    """Decode tokens/s of transformers' generate() (its default dynamic cache,
    or its static cache), timed as ours: from the first new token to the last."""
    prompt = prompt.to(model.device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
    if static_cache:
        kwargs["cache_implementation"] = "static"
    clock = _Clock()
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, streamer=clock, **kwargs)
    return (n_new - 1) / (clock.times[-1] - clock.times[1])


SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}


def print_report(results) -> None:
    gen, limit, comp = results["generation"], results["limit"], results["compile"]
    print("\nWeight-streaming limit (time to read every weight byte once, best round):")
    for d, L in limit.items():
        print(f"  {d:9s} {L['weight_mb']:7.0f} MB  {L['seconds'] * 1000:6.2f} ms  ({L['gb_per_s']:.0f} GB/s)  "
              f"= {L['tokens_per_s']:6.1f} tokens/s at most")  # fmt: skip
    hf = {f"{g['mode']} {SHORT[g['dtype']]}": g["tokens_per_s"] for g in gen.values() if g["system"] == "transformers"}
    rounds = len(next(iter(gen.values()))["all"])
    print(f"\nGeneration: {results['prompt_len']}-token prompt + {results['new_tokens']} new tokens, decode tokens/s "
          f"over all rows (median of {rounds} interleaved rounds)")  # fmt: skip
    header = "".join(f"{'vs hf ' + m:>23s}" for m in hf)
    width = max(len(name) for name in gen)
    print(f"  {'variant':{width}s} {'tok/s':>8s} {'ms/step':>8s}{header} {'vs limit':>9s} {'+peak MB':>9s}")
    for name, g in gen.items():
        tps, batch = g["tokens_per_s"], g["batch"]
        of_limit = tps / (batch * limit[g["dtype"]]["tokens_per_s"]) if g["dtype"] in limit else float("nan")
        vs_hf = "".join(f"{fmt_ratio(tps / h):>23s}" for h in hf.values())
        print(f"  {name:{width}s} {tps:8.1f} {1000 * batch / tps:8.2f}{vs_hf} {of_limit:8.0%} {g['peak_memory_mb']:9.0f}")
    print("  (vs limit: a batch reads each weight once for all its rows, so its limit is batch x that of one row)")

    def tps(mode, dtype, batch=1):
        return next((g["tokens_per_s"] for g in gen.values()
                     if (g["system"], g["mode"], g["dtype"], g["batch"]) == ("gpt2fn", mode, dtype, batch)), float("nan"))  # fmt: skip

    for g in gen.values():
        if g["system"] == "gpt2fn" and g["batch"] > 1:
            print(f"\n  batch throughput: {g['mode']} {g['dtype']} batch {g['batch']} / {g['mode']} batch 1 = "
                  f"{fmt_ratio(g['tokens_per_s'] / tps(g['mode'], g['dtype']))}")  # fmt: skip
    for g in gen.values():
        if g["mode"].startswith("speculative"):
            batch = f" batch {g['batch']}" if g["batch"] > 1 else ""
            limit32 = g["batch"] * limit["float32"]["tokens_per_s"] if "float32" in limit else float("nan")
            print(f"\n  {g['mode']}{batch}: {fmt_ratio(g['tokens_per_s'] / tps('compiled', 'float32', g['batch']))} "
                  f"plain compiled float32{batch}, {fmt_ratio(g['tokens_per_s'] / limit32)} the float32 streaming limit"
                  f"{' (x batch)' if batch else ''}; acceptance {g['acceptance_rate']:.1%}, "
                  f"{g['drafted_per_pass']:.2f} drafted and {g['tokens_per_pass']:.2f} emitted per target pass")  # fmt: skip
    print("\n  compiled / eager:  " + ", ".join(f"{d} {fmt_ratio(tps('compiled', d) / tps('eager', d))}" for d in limit))
    chained = [g for g in gen.values() if g["mode"].startswith("compiled, ")]
    if chained:
        print(f"  {chained[0]['mode'].split(', ')[1]} / one a call, compiled:  " + ", ".join(
            f"{g['dtype']} {fmt_ratio(g['tokens_per_s'] / tps('compiled', g['dtype']))}" for g in chained))
    print(f"  graphs compiled during the timed runs: {results['graphs_compiled_during_timed_runs']} (0 = no recompilation)")
    print("  decode-step compile time: " + ", ".join(
        f"{d} cold {c['cold_s']:.1f} s / warm {c['warm_s']:.1f} s" for d, c in comp.items())
        + f" (after inductor's one-off start-up in this process, {results['compile_startup_s']:.1f} s)")
    if "beams" in results:
        runs = results["beams"]["runs"]
        hf = runs.get("transformers float32", {}).get("seconds", float("nan"))
        print(f"\nBeam search, {results['beams']['beams']} beams: {results['prompt_len']}-token prompt + "
              f"{results['new_tokens']} new tokens, seconds per search (median of {len(next(iter(runs.values()))['all'])} "
              f"interleaved rounds)")  # fmt: skip
        width = max(len(name) for name in runs)
        for name, r in runs.items():
            same = {None: "", True: "  same best beam as transformers", False: "  another best beam"}[r["same_best_beam"]]
            print(f"  {name:{width}s} {r['seconds']:8.2f} s  {fmt_ratio(hf / r['seconds']):>7s} vs transformers{same}")
    sweep = results["sweep"]["tokens_per_s"]
    lengths = list(next(iter(sweep.values())))
    print(f"\nDecode tokens/s against sequence length ({results['sweep']['dtype']}, one step at that length):")
    print("  " + f"{'length':>8s}" + "".join(f"{name:>20s}" for name in sweep) + f"{'cache/no-cache':>22s}")
    for n in lengths:
        eager = sweep["eager, cache"][n] / sweep["eager, no cache"][n]
        compiled = sweep["compiled, cache"][n] / sweep["compiled, no cache"][n]
        ratios = f"{fmt_ratio(eager)} / {fmt_ratio(compiled)}"
        print("  " + f"{n:8d}" + "".join(f"{sweep[name][n]:20.1f}" for name in sweep) + f"{ratios:>22s}")
    print("  (cache/no-cache: eager / compiled)")
    print(f"\nPrefill ({results['sweep']['dtype']}), ms for a prompt of that length (the no-cache step):")
    for n in lengths:
        e, c = 1000 / sweep["eager, no cache"][n], 1000 / sweep["compiled, no cache"][n]
        print(f"  {n:6d}: eager {e:8.1f}   compiled {c:8.1f}   ({fmt_ratio(e / c)})")
    if "products" in results:
        rule = ("every product" if ONEDNN_ROWS[0] == 1 and ONEDNN_MIN_WEIGHT == 0 else
                f"{ONEDNN_ROWS[0]}-{ONEDNN_ROWS[1]} rows with weights of at least {ONEDNN_MIN_WEIGHT} elements")  # fmt: skip
        print(f"\nfloat32 products over every weight matrix, ms, by the CPU library (few_rows takes oneDNN for {rule}):")
        for n, t in results["products"].items():
            print(f"  {n:3d} rows: MKL {1000 * t['mkl']:7.1f}   oneDNN {1000 * t['onednn']:7.1f}   "
                  f"(oneDNN {fmt_ratio(t['mkl'] / t['onednn'])} as fast)")  # fmt: skip


def plot(results, path) -> None:
    """Two panels: every generation row's tokens/s against its dtype's
    weight-streaming limit (times the batch), and the per-step sweep."""
    plt = require_pyplot("--plot")
    gen, limit, sweep = results["generation"], results["limit"], results["sweep"]["tokens_per_s"]
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 0.9 + 0.32 * len(gen)), gridspec_kw={"width_ratios": [3, 2]})
    names = list(gen)[::-1]  # the first row on top
    bars.barh(names, [gen[n]["tokens_per_s"] for n in names], color="tab:blue")
    for i, n in enumerate(names):
        if gen[n]["dtype"] in limit:
            at = gen[n]["batch"] * limit[gen[n]["dtype"]]["tokens_per_s"]
            bars.plot([at, at], [i - 0.45, i + 0.45], color="tab:red", linewidth=2)
    bars.plot([], [], color="tab:red", linewidth=2, label="weight-streaming limit of the row's dtype (x batch)")
    bars.set_xscale("log")
    bars.set_xlabel("decode tokens/s over all rows")
    bars.tick_params(axis="y", labelsize=8)
    bars.legend(loc="lower right", fontsize=8)
    bars.set_title(f"generation, {results['prompt_len']}-token prompt + {results['new_tokens']} new tokens")
    for name, by_len in sweep.items():
        by_len = {int(n): v for n, v in by_len.items()}  # int keys, or str once read back from the JSON
        lines.plot(sorted(by_len), [by_len[n] for n in sorted(by_len)], marker="o", label=name)
    lines.set_xlabel("sequence length (tokens)")
    lines.set_ylabel("decode tokens/s")
    lines.set_yscale("log")
    lines.set_title(f"one step at each length, {results['sweep']['dtype']}")
    lines.grid(True, which="both", alpha=0.3)
    lines.legend(fontsize=8)
    fig.suptitle(f"gpt2fn, {results['model']}")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(run_cli(main))
