#!/usr/bin/env python
"""Side-by-side decoding benchmark, in ONE process on the same weights.

    python scripts/benchmark.py                       # 124M shape, random weights
    python scripts/benchmark.py --model gpt2 --json results.json --plot tokens_per_s.png

Measures, interleaving the variants over several rounds (machines are noisy:
only ratios measured side by side mean anything):

1. the weight-streaming limit: the time to read every weight byte once
   (measured in every round, the best kept);
2. compile time of the decode step, cold (empty inductor cache) and warm
   (from the on-disk cache), and whether any step recompiles;
3. generation (prompt + N new tokens, greedy): eager and compiled, per dtype,
   a batch of ``--batch`` prompts decoded together (tokens/s over all rows),
   and transformers' ``generate()`` on the same weights when it is installed;
4. decode speed against sequence length up to the full context: eager and
   compiled, with and without the KV cache;
5. prefill time per prompt length, eager and compiled;
6. peak memory of each generation, above what the process held before it
   (weights already loaded: the cache, activations and workspace).

Prints tables of tokens/s and ratios (compiled/eager, cache/no-cache,
ours/transformers, ours/limit), writes JSON with ``--json`` and a PNG of
tokens/s against sequence length with ``--plot`` (needs matplotlib:
``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# A fresh inductor cache makes the first compilation truly cold. Set before torch
# is imported; --warm-cache keeps the user's cache instead.
if "--warm-cache" not in sys.argv:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt2fn-bench-inductor-")

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm

from gpt2fn.config import PRESETS
from gpt2fn.device import resolve_device
from gpt2fn.errors import GPT2FnError, check_int, check_output_file, parse_int_list, run_cli
from gpt2fn.files import atomic_write
from gpt2fn.generation import generate_all, generate_batch, recompute_and_choose
from gpt2fn.measure import (
    decode_step_time,
    memory_mb,
    peak_memory_mb,
    recompute_step_time,
    reset_peak_memory,
    streaming_limit_s,
    weight_bytes,
)
from gpt2fn.params import init_params
from gpt2fn.plotting import require_pyplot, save_figure
from gpt2fn.quantize import WEIGHT_DTYPES, cast_params
from gpt2fn.steps import compile_steps, eager_steps, resolve_attention
from gpt2fn.weights import load_pretrained, transformers_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="weights to load (default: random weights of --shape)")
    p.add_argument("--shape", default="gpt2", choices=sorted(PRESETS), help="preset shape for random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="float32,bfloat16,int8", help=f"comma-separated, from {WEIGHT_DTYPES}")
    p.add_argument("--attention", default="auto", choices=["auto", "manual", "sdpa"])
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="also decode this many prompts in one batch (1 = skip)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the generation runs (median)")
    p.add_argument("--lengths", default="64,256,512,1024", help="sequence lengths for the per-step sweep")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--warm-cache", action="store_true", help="keep the on-disk inductor cache (no cold compile)")
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument("--plot", default=None, help="write a PNG of tokens/s against sequence length here")
    return p.parse_args(argv)


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x == x else "-"


def check_args(args) -> tuple[list[str], list[int]]:
    """Refuse bad flags before any work; returns (dtypes, lengths)."""
    check_int("--prompt-len", args.prompt_len)
    check_int("--new-tokens", args.new_tokens, low=3)  # the compiled run spends its first step compiling
    check_int("--batch", args.batch)
    check_int("--rounds", args.rounds)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    dtypes, lengths = check_args(args)
    device = resolve_device(args.device)
    if args.model:
        params32, config = load_pretrained(args.model, device=device)
        model_name = args.model
    else:
        config = PRESETS[args.shape]
        params32 = init_params(config, seed=0, device=device)
        model_name = f"{args.shape} shape, random weights"
    if max(lengths) > config.n_ctx or args.prompt_len + args.new_tokens > config.n_ctx:
        raise GPT2FnError(f"lengths must fit the {config.n_ctx}-token context")
    params = {d: cast_params(params32, d) for d in dtypes}
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(device), "python": platform.python_version(),
        },
        "model": model_name, "config": config.to_dict(), "attention": args.attention,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
    }  # fmt: skip
    print(f"gpt2fn benchmark: {model_name}, batch 1, greedy, {args.attention} attention, "
          f"torch {torch.__version__}, {device} ({torch.get_num_threads()} threads)")  # fmt: skip


    # Compile: cold (fresh cache dir), then warm (dynamo reset, graph from disk).
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    compile_times = {}
    for d in tqdm(dtypes, desc="compile (cold, warm)", leave=False):
        torch._dynamo.reset()
        counters.clear()
        cold = generate_all(params[d], config, prompt, 3, temperature=0, attention=args.attention, compile=True)[1]
        torch._dynamo.reset()
        warm = generate_all(params[d], config, prompt, 3, temperature=0, attention=args.attention, compile=True)[1]
        compile_times[d] = {"cold_s": cold.compile_s, "warm_s": warm.compile_s}
    results["compile"] = compile_times

    # Generation, interleaved rounds.
    hf_model = None if args.no_transformers else transformers_model(params32, config)
    hf_model = hf_model.eval() if hf_model is not None else None
    runs: dict[str, list] = {}
    contenders = {}
    for d in dtypes:
        for compiled in (False, True):
            name = f"gpt2fn {'compiled' if compiled else 'eager'} {d}"
            contenders[name] = functools.partial(
                generate_all, params[d], config, prompt, args.new_tokens, temperature=0,
                attention=args.attention, compile=compiled,
            )  # fmt: skip
    if args.batch > 1:  # the same prompt length per row, so every row runs all steps
        prompts = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
        for d in dtypes[:1]:
            contenders[f"gpt2fn eager {d} batch {args.batch}"] = functools.partial(
                batch_tokens_per_s, params[d], config, prompts.tolist(), args.new_tokens, args.attention)
    if hf_model is not None:
        contenders["transformers generate float32"] = functools.partial(hf_generate, hf_model, prompt, args.new_tokens)
    for d in dtypes:  # put every compiled graph back in memory (warm, from disk) before timing
        generate_all(params[d], config, prompt, 3, temperature=0, attention=args.attention, compile=True)
        streaming_limit_s(weight_bytes(params[d]), device, repeats=1)
    counters.clear()
    # The limit (reading each dtype's weights once) is measured in every round,
    # beside the runs it bounds, and the best round kept.
    limit_s: dict[str, list[float]] = {d: [] for d in dtypes}
    with tqdm(total=args.rounds * len(contenders), desc="generation", leave=False) as bar:
        for _ in range(args.rounds):
            for d in dtypes:
                limit_s[d].append(streaming_limit_s(weight_bytes(params[d]), device)[0])
            for name, run in contenders.items():
                before = memory_mb(device)
                reset_peak_memory(device)
                outcome = run()
                tokens_per_s = outcome if isinstance(outcome, float) else outcome[1].decode_tokens_per_s
                runs.setdefault(name, []).append((tokens_per_s, peak_memory_mb(device) - before))
                bar.update()
    recompiles = counters["stats"]["unique_graphs"]  # graphs made during the timed runs: 0 = no recompile
    generation = {
        name: {"tokens_per_s": sorted(r[0] for r in rs)[len(rs) // 2], "all": [r[0] for r in rs],
               "peak_memory_mb": max(r[1] for r in rs)}
        for name, rs in runs.items()
    }  # fmt: skip
    results["generation"] = generation
    results["limit"] = {
        d: {"weight_mb": weight_bytes(params[d]) / 1e6, "seconds": min(limit_s[d]),
            "gb_per_s": weight_bytes(params[d]) / min(limit_s[d]) / 1e9, "tokens_per_s": 1 / min(limit_s[d])}
        for d in dtypes
    }  # fmt: skip
    results["graphs_compiled_during_timed_runs"] = recompiles

    # Per-step decode speed against sequence length (fp32, or the first dtype).
    d0 = dtypes[0]
    kw = dict(attention=args.attention, temperature=0, top_k=0, top_p=1.0)
    eager, compiled = eager_steps(config, **kw), compile_steps(config, device, **kw)
    recompute_eager = functools.partial(recompute_and_choose, config=config, **{**kw, "attention": resolve_attention(args.attention)})
    recompute_compiled = torch.compile(recompute_eager, fullgraph=True, dynamic=True)
    sweep: dict[str, dict[int, float]] = {}
    variants = {
        "eager, cache": lambda n: decode_step_time(params[d0], config, eager.decode, n, cache_len=config.n_ctx),
        "compiled, cache": lambda n: decode_step_time(params[d0], config, compiled.decode, n, cache_len=config.n_ctx),
        "eager, no cache": lambda n: recompute_step_time(params[d0], config, recompute_eager, n),
        "compiled, no cache": lambda n: recompute_step_time(params[d0], config, recompute_compiled, n),
    }
    for name, measure in tqdm(variants.items(), desc="sequence-length sweep", leave=False):
        sweep[name] = {n: 1 / measure(n) for n in lengths}
    results["sweep"] = {"dtype": d0, "tokens_per_s": sweep}

    # Prefill: the prompt's forward pass (eager vs the dynamic-shape compiled one).
    prefill = {}
    for n in lengths:
        prefill[n] = {"eager_ms": 1000 / sweep["eager, no cache"][n], "compiled_ms": 1000 / sweep["compiled, no cache"][n]}
    results["prefill"] = {"dtype": d0, "by_length": prefill}

    print_report(results, dtypes, lengths)
    if args.json:
        print(f"wrote {atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))}")
    if args.plot:
        plot(results, args.plot)
    return 0


def batch_tokens_per_s(params, config, prompts, n_new, attention) -> float:
    """Decode tokens/s over a whole batch (all rows), greedy, stop token off."""
    stats = generate_batch(params, config, prompts, n_new, temperature=0, attention=attention).stats
    return stats.decode_tokens * len(prompts) / stats.decode_s


def hf_generate(model, prompt, n_new) -> float:
    """Decode tokens/s of transformers' generate() (default dynamic cache), timed
    as ours: the first token (prefill) left out."""
    prompt = prompt.to(model.device)
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, **kwargs)
        total = time.perf_counter() - start
    return (n_new - 1) / (total - first)


def print_report(results, dtypes, lengths) -> None:
    gen, limit, comp = results["generation"], results["limit"], results["compile"]
    hf = gen.get("transformers generate float32", {}).get("tokens_per_s", float("nan"))
    print("\nWeight-streaming limit (time to read every weight byte once, best round):")
    for d in dtypes:
        L = limit[d]
        print(f"  {d:9s} {L['weight_mb']:7.0f} MB  {L['seconds'] * 1000:6.2f} ms  ({L['gb_per_s']:.0f} GB/s)  "
              f"= {L['tokens_per_s']:6.1f} tokens/s at most")  # fmt: skip
    print(f"\nGeneration: {results['prompt_len']}-token prompt + {results['new_tokens']} new tokens, decode tokens/s "
          f"(median of {len(next(iter(gen.values()))['all'])} interleaved rounds)")  # fmt: skip
    print(f"  {'variant':32s} {'tok/s':>8s} {'ms/tok':>8s} {'vs transformers':>16s} {'vs limit':>9s} {'+peak MB':>9s}")
    for name, g in gen.items():
        d = name.split()[2] if name.startswith("gpt2fn") else name.split()[-1]
        tps = g["tokens_per_s"]
        rows = int(name.split()[-1]) if " batch " in name else 1  # a batch reads each weight once for all rows
        of_limit = tps / (rows * limit[d]["tokens_per_s"]) if d in limit else float("nan")
        print(f"  {name:32s} {tps:8.1f} {1000 / tps:8.2f} {fmt_ratio(tps / hf):>16s} {of_limit:8.0%} {g['peak_memory_mb']:9.0f}")
    batch = [name for name in gen if " batch " in name]
    for name in batch:
        d = name.split()[2]
        single = gen[f"gpt2fn eager {d}"]["tokens_per_s"]
        print(f"\n  batch throughput: {name} / batch 1 = {fmt_ratio(gen[name]['tokens_per_s'] / single)} "
              f"(vs compiled batch 1: {fmt_ratio(gen[name]['tokens_per_s'] / gen[f'gpt2fn compiled {d}']['tokens_per_s'])})")
    print("\n  compiled / eager:  " + ", ".join(
        f"{d} {fmt_ratio(gen[f'gpt2fn compiled {d}']['tokens_per_s'] / gen[f'gpt2fn eager {d}']['tokens_per_s'])}" for d in dtypes))
    print(f"  graphs compiled during the timed runs: {results['graphs_compiled_during_timed_runs']} (0 = no recompilation)")
    print("  decode-step compile time: " + ", ".join(
        f"{d} cold {comp[d]['cold_s']:.1f} s / warm {comp[d]['warm_s']:.1f} s" for d in dtypes))
    sweep = results["sweep"]["tokens_per_s"]
    print(f"\nDecode tokens/s against sequence length ({results['sweep']['dtype']}, one step at that length):")
    print("  " + f"{'length':>8s}" + "".join(f"{name:>20s}" for name in sweep) + f"{'cache/no-cache':>22s}")
    for n in lengths:
        eager = sweep["eager, cache"][n] / sweep["eager, no cache"][n]
        compiled = sweep["compiled, cache"][n] / sweep["compiled, no cache"][n]
        ratios = f"{fmt_ratio(eager)} / {fmt_ratio(compiled)}"
        print("  " + f"{n:8d}" + "".join(f"{sweep[name][n]:20.1f}" for name in sweep) + f"{ratios:>22s}")
    print("  (cache/no-cache: eager / compiled)")
    print(f"\nPrefill ({results['prefill']['dtype']}), ms for a prompt of that length:")
    for n, p in results["prefill"]["by_length"].items():
        print(f"  {n:6d}: eager {p['eager_ms']:8.1f}   compiled {p['compiled_ms']:8.1f}   ({fmt_ratio(p['eager_ms'] / p['compiled_ms'])})")


def plot(results, path) -> None:
    plt = require_pyplot("--plot")
    sweep = results["sweep"]["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_len in sweep.items():
        lengths = sorted(int(n) for n in by_len)
        ax.plot(lengths, [by_len[n] for n in lengths], marker="o", label=name)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"gpt2fn decode speed, {results['model']}, {results['sweep']['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(run_cli(main))
