#!/usr/bin/env python
"""Generate text with GPT-2, streaming it as it is made, then report timings.

    python scripts/generate.py --prompt "Hello, I'm a language model," --max_tokens 50

Prints the prompt and the continuation on stdout; prefill time, decode time
and decode tokens/s on stderr. Bad input gets one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import NamedTuple, Optional, TextIO

import torch

from gpt2fn.beam import beam_search
from gpt2fn.device import DEVICE_HELP, resolve_device
from gpt2fn.errors import ArgumentParser, GPT2FnError, check_int, check_output_file, is_out_of_memory, read_utf8, run_cli
from gpt2fn.evaluation import continuation_logprobs
from gpt2fn.files import atomic_write
from gpt2fn.generation import generate
from gpt2fn.layers import ATTEND
from gpt2fn.quantize import DTYPE_HELP, WEIGHT_DTYPES, cast_params
from gpt2fn.sampling import check_sampling_args
from gpt2fn.speculative import DRAFT_DTYPES, PromptLookup, draft_vocab, frequent_tokens, self_draft
from gpt2fn.tokenizer import TextStream, check_vocabulary, encode, get_tokenizer
from gpt2fn.weights import MODEL_HELP, REVISION_HELP, load_pretrained, resolve_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", default=[],
                   help="text to continue; repeat it for several prompts, generated together in one batch")
    p.add_argument("--prompt-file", dest="prompt_file", default=None,
                   help="a file of prompts, one per line (blank lines skipped; - reads standard input), generated in one "
                        "batch; a .jsonl file holds a JSON object a line whose \"prompt\" is the text (newlines "
                        "included), as --jsonl writes them")
    p.add_argument("--model", default="gpt2", help=MODEL_HELP)
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--kvcaching", action=argparse.BooleanOptionalAction, default=True,
                   help="decode against the preallocated KV cache (default: on; --no-kvcaching recomputes "
                        "the whole sequence every step)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES,
                   help=f"{DTYPE_HELP}; int8 is fastest with --compile")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (one graph for every step; the first run compiles)")
    p.add_argument("--attention", default="auto", choices=("auto", *ATTEND),
                   help="sdpa (PyTorch's fused kernel), manual (softmax(QK^T/sqrt(d))V spelled out), or auto "
                        "(default: sdpa, but manual in the compiled CPU decode step, where it is faster)")
    p.add_argument("--draft", default=None,
                   help="speculative decoding: int8, bfloat16 or float16 (the model's own weights at that dtype "
                        "draft for it), another model with the same tokenizer (e.g. gpt2 for gpt2-xl), or lookup "
                        "(prompt lookup: no model, it drafts what followed the last n-gram earlier in the text)")
    p.add_argument("--draft_tokens", type=int, default=None, help="tokens the draft proposes per target pass (default 4)")
    p.add_argument("--adaptive_draft", action="store_true",
                   help="adapt the drafted tokens per pass to the acceptance (1, 2, 4, ... up to --draft_tokens)")
    p.add_argument("--draft_vocab", type=int, default=None,
                   help="the draft proposes only N tokens (a cheaper LM head; the output is the same): the N most "
                        "frequent in --draft_vocab_from, or without it the N lowest ids (GPT-2 numbers its tokens "
                        "in merge order, common ones first)")
    p.add_argument("--draft_vocab_from", default=None,
                   help="a text file like the text you generate: --draft_vocab keeps its N most frequent tokens")
    p.add_argument("--lookup_ngram", type=int, default=None,
                   help="--draft lookup: the longest n-gram it matches, then shorter ones (default 2)")
    p.add_argument("--tokens_per_call", type=int, default=1,
                   help="decode steps per call of the step, each token fed to the next: the same text, "
                        "printed in bursts; with --compile they run as one graph (on CUDA, one CUDA graph replay) "
                        "where they can: on CUDA, and on the CPU for a model narrower than GPT-2 (the bundled model: "
                        "1.1-1.4x faster at 8); compiled GPT-2 sizes on the CPU run one a call anyway")
    p.add_argument("--max_tokens", type=int, default=50, help="new tokens to generate")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy) (default: 1.0)")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus: the smallest set with mass >= p (1 = off)")
    p.add_argument("--min_p", type=float, default=0.0,
                   help="drop the tokens less likely than min_p times the most likely one (0 = off)")
    p.add_argument("--typical_p", type=float, default=1.0,
                   help="locally typical sampling: keep the tokens whose surprisal is nearest the entropy, up to this "
                        "mass, as Hugging Face's typical_p (1 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="make every token the text already has (prompt included) less likely, greedy too, as "
                        "Hugging Face's repetition_penalty does: 1 = off, 1.2 a usual setting")
    p.add_argument("--no_repeat_ngram_size", type=int, default=0,
                   help="never repeat an n-gram of this many tokens that the text already has (prompt included), "
                        "greedy too, as Hugging Face's no_repeat_ngram_size does: 0 = off")
    p.add_argument("--ban", action="append", default=[],
                   help="never write this text, as a word on its own or after a space (Hugging Face's bad_words_ids "
                        "of both its tokenizations); repeat it for several")
    p.add_argument("--min_tokens", type=int, default=0, help="at least this many new tokens before <|endoftext|> may "
                   "end a row, as Hugging Face's min_new_tokens (a --stop string still ends it): 0 = off")
    p.add_argument("--num_beams", type=int, default=1,
                   help="beam search over this many beams (Hugging Face's num_beams): the most likely continuation "
                        "it finds, printed when done; no sampling (1 = off); --compile compiles its step")
    p.add_argument("--length_penalty", type=float, default=None,
                   help="beam search: a finished beam scores its log-probability / length ** this (above 0 "
                        "favours longer ones) (default: 1.0)")
    p.add_argument("--early_stopping", default=None, choices=("false", "true", "never"),
                   help="beam search: end when no running beam can beat the finished ones (false), as soon as there "
                        "are --num_beams finished (true), or only where none could at any length (never) "
                        "(default: false)")
    p.add_argument("--num_samples", type=int, default=1,
                   help="continue each prompt this many times, each row drawing its own tokens, in one "
                        "batch (with --num_beams: print this many of each prompt's best beams, best "
                        "first)")
    p.add_argument("--batch_size", type=int, default=16,
                   help="rows generated at once (prompts x --num_samples): more run in batches of this many, one "
                        "after another, each printed when it is done (with --compile, a last smaller batch compiles "
                        "a step of its own; with --num_beams, prompts at once, each --num_beams rows)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed at the end)")
    p.add_argument("--ignore_eot", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--stop", action="append", default=[],
                   help="end a prompt's text where this text appears (it is left out); repeat it for several")
    p.add_argument("--jsonl", default=None,
                   help="also write every row as a JSON line here: prompt, completion, finish_reason (stop: a --stop "
                        "string, eot: <|endoftext|>, length: --max_tokens or the context) and tokens (new tokens); "
                        "the file appears when the run ends")
    p.add_argument("--logprobs", action="store_true",
                   help="with --jsonl: each row also holds token_ids (its new tokens) and logprobs (each one's "
                        "log-probability under the model given all before it, before temperature, filters and rules)")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from standard input, one a line, and continue each as it comes: the model "
                        "loads (and --compile compiles) once; Ctrl-C stops a generation, Ctrl-D ends")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input prints one ``error: ...`` line and returns 2."""
    return run_cli(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    # Check everything that is cheap to check before loading any weights.
    check_beam_args(args)
    args.temperature = 1.0 if args.temperature is None else args.temperature
    check_int("--min_tokens", args.min_tokens, 0)
    if args.min_tokens and args.ignore_eot:
        raise GPT2FnError("--min_tokens keeps <|endoftext|> from ending a row that soon, and with --ignore_eot it ends "
                          "none; drop one of them")  # fmt: skip
    check_sampling_args(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty,
                        args.no_repeat_ngram_size, typical_p=args.typical_p)  # fmt: skip
    prompts = list(args.prompt) + read_prompt_file(args.prompt_file)
    if args.interactive and prompts:
        raise GPT2FnError("--interactive reads its prompts from standard input, one a line; drop --prompt and "
                          "--prompt-file")  # fmt: skip
    if not prompts and not args.interactive:
        raise GPT2FnError("no prompt given; pass --prompt TEXT (repeatable), --prompt-file FILE or --interactive")
    if any(not p for p in prompts):
        raise GPT2FnError("the prompt is empty; pass some text with --prompt")
    check_int("--num_samples", args.num_samples)
    check_int("--batch_size", args.batch_size)
    if args.num_samples > 1 and args.temperature == 0:
        raise GPT2FnError("--num_samples draws several continuations, but --temperature 0 (greedy) makes them all the "
                          "same; sample (--temperature > 0) or drop --num_samples")  # fmt: skip
    if "" in args.stop:
        raise GPT2FnError("--stop is empty; give the text to stop at (at least one character)")
    if "" in args.ban:
        raise GPT2FnError("--ban is empty; give the text never to write (at least one character)")
    if args.jsonl is not None:
        if args.interactive:
            raise GPT2FnError("--jsonl writes the rows of one run of prompts; drop it with --interactive")
        check_output_file(args.jsonl, "--jsonl file")
    elif args.logprobs:
        raise GPT2FnError("--logprobs adds each token's log-probability to the --jsonl rows; give --jsonl FILE too")
    if args.draft is not None:
        args.draft_tokens = 4 if args.draft_tokens is None else args.draft_tokens
        if not args.kvcaching:
            raise GPT2FnError("--draft needs the KV cache; drop --no-kvcaching")
        if args.draft_tokens < 1:
            raise GPT2FnError(f"--draft_tokens must be >= 1, got {args.draft_tokens}")
    elif args.adaptive_draft:
        raise GPT2FnError("--adaptive_draft adapts speculative decoding; give a --draft too")
    elif args.draft_vocab is not None:
        raise GPT2FnError("--draft_vocab cuts the draft of speculative decoding; give a --draft too")
    elif args.draft_tokens is not None:
        raise GPT2FnError("--draft_tokens sets how many tokens a round of speculative decoding drafts; give a --draft too")
    if args.draft == "lookup":
        args.lookup_ngram = 2 if args.lookup_ngram is None else args.lookup_ngram
        check_int("--lookup_ngram", args.lookup_ngram)
        if args.draft_vocab is not None:
            raise GPT2FnError("--draft_vocab cuts a draft model's vocabulary; --draft lookup has no model, drop one")
    elif args.lookup_ngram is not None:
        raise GPT2FnError("--lookup_ngram sets prompt lookup's n-grams; give --draft lookup too, or drop it")
    check_int("--tokens_per_call", args.tokens_per_call)
    if args.tokens_per_call > 1 and (args.draft is not None or not args.kvcaching):
        raise GPT2FnError("--tokens_per_call chains cached plain decode steps; drop it, or "
                          + ("--draft (speculative rounds emit several tokens a call already)" if args.draft is not None
                             else "--no-kvcaching"))  # fmt: skip
    if args.draft_vocab_from is not None and args.draft_vocab is None:
        raise GPT2FnError("--draft_vocab_from needs --draft_vocab N: how many of its most frequent tokens to keep")
    if args.draft_vocab is not None and args.draft_vocab < 1:
        raise GPT2FnError(f"--draft_vocab must be >= 1, got {args.draft_vocab}")
    vocab_text = read_utf8(args.draft_vocab_from, "--draft_vocab_from file") if args.draft_vocab_from else ""
    device = resolve_device(args.device)
    seed = args.seed if args.seed is not None else random.randrange(2**31)

    model_path = resolve_model(args.model, args.revision)
    tokenizer = get_tokenizer(model_path)
    args.bad_words_ids = ban_lists(args.ban, tokenizer)  # tokenized once, for every batch
    params, config = load_pretrained(model_path, device=device)
    check_vocabulary(tokenizer, config.vocab_size)
    draft = None
    if args.draft in DRAFT_DTYPES:
        draft = self_draft(params, args.draft), config
    elif args.draft == "lookup":
        draft = PromptLookup(args.lookup_ngram)
    elif args.draft is not None:
        draft = load_pretrained(resolve_model(args.draft), device=device)
    if args.draft_vocab is not None:
        vocab = frequent_tokens(torch.tensor(encode(tokenizer, vocab_text), dtype=torch.long), args.draft_vocab,
                                config.vocab_size)  # fmt: skip
        draft = draft_vocab(draft[0], vocab), draft[1]
    params = cast_params(params, args.dtype)
    compiled = set()  # the batch sizes whose step has compiled
    if not args.interactive:
        if args.jsonl is None:
            complete(args, prompts, params, config, tokenizer, draft, device, seed, compiled)
            return 0

        def to_file(tmp: str) -> None:  # written beside its name as the batches end, renamed onto it at the end
            with open(tmp, "w", encoding="utf-8") as out:
                complete(args, prompts, params, config, tokenizer, draft, device, seed, compiled, out)

        atomic_write(args.jsonl, to_file)
        return 0
    for line in input_lines():  # a bad prompt (say, too long) is one error line, and the session goes on
        try:
            complete(args, [line], params, config, tokenizer, draft, device, seed, compiled)
        except GPT2FnError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C ends this generation; at the "> " it ends the session
            print(file=sys.stderr)
    return 0


def check_beam_args(args: argparse.Namespace) -> None:
    """One clear line for beam search flags without it, and for what it does not take."""
    check_int("--num_beams", args.num_beams)
    if args.num_beams == 1:
        for flag in ("length_penalty", "early_stopping"):
            if getattr(args, flag) is not None:
                raise GPT2FnError(f"--{flag} sets beam search; give --num_beams K (K > 1) too, or drop it")
        return
    given = [flag for flag, given in [
        ("--temperature", args.temperature is not None), ("--top_k", args.top_k != 0), ("--top_p", args.top_p != 1),
        ("--min_p", args.min_p != 0), ("--typical_p", args.typical_p != 1), ("--draft", args.draft is not None), ("--no-kvcaching", not args.kvcaching),
        ("--tokens_per_call", args.tokens_per_call != 1),
    ] if given]  # fmt: skip
    if given:
        raise GPT2FnError(f"--num_beams runs beam search, which does not take {given[0]}; drop one of them")
    if isinstance(args.num_samples, int) and args.num_samples > args.num_beams:
        raise GPT2FnError(f"--num_samples {args.num_samples} prints that many of each prompt's best beams; there are "
                          f"--num_beams {args.num_beams}")  # fmt: skip


def complete(args: argparse.Namespace, prompts: list[str], params, config, tokenizer, draft, device, seed: int,
             compiled: set[int], out: Optional[TextIO] = None) -> None:  # fmt: skip
    """Generate from ``prompts``, each ``--num_samples`` times, ``--batch_size``
    rows at a time, all drawing from one generator: one row streams as it is
    made, a batch prints when it is done; a report after each. ``compiled``:
    the batch sizes whose step an earlier batch compiled (this adds to it);
    ``out``: a file to write each row to as a JSON line."""
    rows = [p for p in prompts for _ in range(args.num_samples)]  # each prompt's samples (or best beams) together
    n, beams = args.num_samples, args.num_beams > 1
    labels = [f"{i + 1}/{len(rows)}" if n == 1 else
              f"prompt {i // n + 1}/{len(prompts)}, {'beam' if beams else 'sample'} {i % n + 1}/{n}"
              for i in range(len(rows))]  # fmt: skip
    generator = torch.Generator(device).manual_seed(seed)
    per_batch = args.batch_size * n if beams else args.batch_size  # beam search: --batch_size prompts, n rows of each
    for start in range(0, len(rows), per_batch):
        batch = rows[start : start + per_batch]
        try:
            if beams:
                closing, made = run_beams(args, batch[::n], len(rows) == 1, params, config, tokenizer, device)
            else:
                stream, made = run_batch(args, batch, len(rows) == 1, params, config, tokenizer, draft, generator)
                closing = report(args, device, seed, stream, warm=len(batch) in compiled)
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            at_once = len(batch) // n * args.num_beams if beams else len(batch)
            raise GPT2FnError(f"out of memory generating {at_once} rows at once; use a smaller --batch_size, a smaller "
                              "--max_tokens or --dtype bfloat16") from None  # fmt: skip
        for label, prompt, row in zip(labels[start:], batch, made if len(rows) > 1 else []):
            print(f"--- [{label}] ---\n{prompt}{row.completion}")
        for prompt, row in zip(batch, made if out is not None else []):
            line = {"prompt": prompt, "completion": row.completion, "finish_reason": row.finish_reason, "tokens": len(row.ids)}
            if args.logprobs:
                line.update(token_ids=row.ids, logprobs=continuation_logprobs(params, config, encode(tokenizer, prompt), row.ids))
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
        print(closing, file=sys.stderr)
        if args.compile:
            compiled.add(len(batch))


class Row(NamedTuple):
    completion: str  # the new text, up to a stop string (left out)
    finish_reason: str  # stop (a --stop string), eot (<|endoftext|>, kept) or length (--max_tokens or the context)
    ids: list[int]  # the new tokens, up to the one that ended the row


def run_batch(args: argparse.Namespace, prompts: list[str], streamed: bool, params, config, tokenizer, draft,
              generator: torch.Generator):  # fmt: skip
    """One generation: (its stream, each row's :class:`Row`); ``streamed``
    writes the one row's text as it is made."""
    ids = [encode(tokenizer, p) for p in prompts]
    stream = generate(  # one prompt (a tensor) must fit with its continuation; in a batch each row stops at the context
        params, config, torch.tensor(ids) if len(set(prompts)) == 1 else ids, args.max_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, typical_p=args.typical_p,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        min_new_tokens=args.min_tokens, bad_words_ids=args.bad_words_ids, generator=generator,
        use_cache=args.kvcaching, attention=args.attention,
        stop_token=None if args.ignore_eot else tokenizer.eot_token, compile=args.compile,
        draft=draft, draft_tokens=args.draft_tokens, adaptive_draft=args.adaptive_draft,
        tokens_per_call=args.tokens_per_call,
    )  # fmt: skip
    texts = [TextStream(tokenizer, args.stop) for _ in prompts]
    pieces = [[] for _ in prompts]  # each row's new text so far
    ended = [None] * len(prompts)  # (finish_reason, tokens) once a row has ended
    if streamed:
        write(prompts[0])
    for n, tokens in enumerate(stream, 1):
        for i, token in enumerate(tokens.tolist()):
            if ended[i] is None:
                pieces[i].append(texts[i].push(token))
                if texts[i].stopped or stream.is_last(i, n, token):
                    ended[i] = "stop" if texts[i].stopped else "eot" if token == stream.stop_token else "length", n
        if streamed:
            write(pieces[0][-1])
        if all(ended):  # at stop strings the generation ends here; else the stream was ending anyway
            stream.close()
    for row, text in zip(pieces, texts):
        row.append(text.finish())
    if streamed:
        write(pieces[0][-1] + "\n")
    ends = [end or ("length", 0) for end in ended]  # (none: 0 new tokens asked)
    return stream, [Row("".join(row), reason, ids[:n]) for row, ids, (reason, n) in zip(pieces, stream.tokens().tolist(), ends)]


def run_beams(args: argparse.Namespace, prompts: list[str], printed: bool, params, config, tokenizer,
              device) -> tuple[str, list[Row]]:  # fmt: skip
    """Beam search over ``prompts`` (each prompt's ``--num_beams`` rows in one
    batch): (the closing report, each prompt's ``--num_samples`` best beams as
    :class:`Row` s); ``printed``: print the one row's text here, when its search is done."""
    early = {None: False, "false": False, "true": True, "never": "never"}[args.early_stopping]
    stop_token = None if args.ignore_eot else tokenizer.eot_token
    start = time.perf_counter()
    best = beam_search(params, config, [encode(tokenizer, p) for p in prompts], args.max_tokens, args.num_beams,
                       length_penalty=1.0 if args.length_penalty is None else args.length_penalty, early_stopping=early,
                       stop_token=stop_token, repetition_penalty=args.repetition_penalty,
                       no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_tokens,
                       bad_words_ids=args.bad_words_ids, attention=args.attention,
                       compile=args.compile, progress=True, num_return_sequences=args.num_samples)  # fmt: skip
    seconds = time.perf_counter() - start
    made = []
    for beam in (beam for beams in best for beam in beams):  # each prompt's best first
        text = TextStream(tokenizer, args.stop)
        completion = "".join(text.push(t) for t in beam.tokens) + text.finish()
        ended = "stop" if text.stopped else "eot" if beam.tokens[-1:] == [stop_token] else "length"
        made.append(Row(completion, ended, beam.tokens))
    if printed:
        write(prompts[0] + made[0].completion + "\n")
    generated = sum(len(beams[0].tokens) for beams in best)
    mode = f"beam search of {args.num_beams} beams{', compiled' if args.compile else ''}"
    return (f"[{args.model} {args.dtype} on {device}, {mode}, {args.attention} attention"
            f"{f', {len(prompts)} prompts' if len(prompts) > 1 else ''}] generated {generated} tokens "
            f"(best beams, scores {', '.join(f'{beams[0].score:.3f}' for beams in best)}) in {seconds:.2f} s"), made  # fmt: skip


def report(args: argparse.Namespace, device: torch.device, seed: int, stream, warm: bool = False) -> str:
    """The closing lines on stderr; ``warm``: an earlier batch compiled the step."""
    stats = stream.stats
    mode = ("kv-cache" if args.kvcaching else "no cache") + (", compiled" if args.compile else "")
    mode += f", {stream.steps.chained} tokens a call" if stream.steps.chained > 1 else ""  # what ran (see --tokens_per_call)
    batch = f", batch of {stats.batch}" if stats.batch > 1 else ""
    made = sum(len(row) for row in stream.rows())
    compiled = ("" if not args.compile or not stats.compile_s else
                f"first decode step: {stats.compile_s * 1000:.1f} ms (compiled for an earlier prompt)\n" if warm else
                f"compile: {stats.compile_s:.1f} s (first decode step)\n")  # fmt: skip
    steps, speculative = ("" if args.draft else f" in {stats.n_new} steps"), ""
    if args.draft is not None:
        per_round = f"{args.draft_tokens} tokens per round"
        if args.adaptive_draft:
            mean = f"{stats.drafted_per_pass:.2f} " if stats.target_passes else ""
            per_round = f"{mean}tokens per round (adaptive, at most {args.draft_tokens})"
        cut = "" if args.draft_vocab is None else f" over {args.draft_vocab} tokens"
        cut += f" (n-grams up to {args.lookup_ngram})" if args.draft == "lookup" else ""
        judged = stats.drafted > stats.drafted_past_end  # a lookup draft drafts nothing where no n-gram repeats
        rounds = (f"{f'acceptance {stats.acceptance_rate:.1%}' if judged else 'nothing drafted'}, "
                  f"{stats.tokens_per_pass:.2f} tokens per target pass ({stats.target_passes} passes)"
                  if stats.target_passes else "no round ran")  # fmt: skip
        speculative = f"\nspeculative: draft {args.draft}{cut}, {per_round}: {rounds}"
    drawn = "greedy" if args.temperature == 0 else f"seed {seed}"  # greedy draws nothing: no seed to repeat it with
    return (
        f"[{args.model} {args.dtype} on {device}, {mode}, {args.attention} attention{batch}, {drawn}] "
        f"prompt {stats.n_prompt} tokens{' (longest)' if batch else ''}, generated {made}{steps}\n"
        f"{compiled}prefill: {stats.prefill_s * 1000:.1f} ms ({per_second(stats.n_prompt * stats.batch, stats.prefill_s)} tokens/s)\n"
        f"decode:  {stats.decode_s * 1000:.1f} ms for {stats.decode_tokens} {'tokens' if args.draft else 'steps'} "
        f"({per_second(stats.decode_tokens * stats.batch, stats.decode_s)} tokens/s{' over the batch' if batch else ''})"
        f"{speculative}"
    )


def ban_lists(texts: list[str], tokenizer) -> Optional[list[list[int]]]:
    """``--ban``'s texts as the token lists generation must never complete:
    each text's tokens alone and after a space (GPT-2 spells " word" and
    "word" with other tokens), or None without any."""
    words = {tuple(encode(tokenizer, spelling)) for text in texts for spelling in (text, " " + text)}
    return [list(word) for word in sorted(words)] or None


def read_prompt_file(path: str | None) -> list[str]:
    """The file's non-blank lines; ``-`` reads standard input. A ``.jsonl``
    file's lines are JSON objects whose "prompt" is the text (which may hold
    newlines): the rows ``--jsonl`` writes read back."""
    if path is None:
        return []
    if path == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise GPT2FnError("standard input (--prompt-file -) is not UTF-8 text") from None
    else:
        text = read_utf8(path, "prompt file")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    return [jsonl_prompt(line, f"{path}, line {n}") for n, line in lines] if path.endswith(".jsonl") else [s for _, s in lines]


def jsonl_prompt(line: str, where: str) -> str:
    """The "prompt" of one line of a .jsonl prompt file, or one clear line saying what is wrong there."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise GPT2FnError(f"{where} is not JSON ({e.msg}); a .jsonl prompt file holds one object a line, "
                          '{"prompt": "text"}') from None  # fmt: skip
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise GPT2FnError(f'{where} has no "prompt" text; a .jsonl prompt file holds one object a line, {{"prompt": "text"}}')
    return row["prompt"]


def input_lines():
    """Standard input's non-blank lines, each as it is typed (a "> " on
    stderr asks for it at a terminal), until end of input."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError:
            raise GPT2FnError("standard input (--interactive) is not UTF-8 text") from None
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def per_second(count: int, seconds: float) -> str:
    return f"{count / seconds:.1f}" if count > 0 and seconds > 0 else "-"


if __name__ == "__main__":
    sys.exit(main())
