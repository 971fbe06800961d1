#!/usr/bin/env python
"""Side-by-side training-step benchmark, in ONE process on the same batch.

    python scripts/benchmark_train.py                       # bundled-model shape, batch 8 x 256
    python scripts/benchmark_train.py --shape gpt2 --batch_size 4 --block_size 512 --json train.json

Times whole optimizer steps (forward, backward, clipping, AdamW) of:

* gpt2fn's ``train_step`` in deterministic mode (the CPU default),
* the same with the mode off (what determinism costs),
* transformers' ``GPT2LMHeadModel`` on the same weights and windows with
  ``torch.optim.AdamW`` (when transformers is installed),

interleaving the variants over several rounds (machines drift: only ratios
measured side by side mean anything) and reporting the median tokens/s of
each and its ratio to gpt2fn deterministic. ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt2fn.config import PRESETS, GPTConfig
from gpt2fn.device import resolve_device, synchronize
from gpt2fn.errors import GPT2FnError, check_int, check_output_file, run_cli
from gpt2fn.files import atomic_write
from gpt2fn.params import init_params
from gpt2fn.training import TrainConfig, deterministic_mode, make_optimizer, train_step, trainable
from gpt2fn.weights import hf_state_dict

SHAPES = {"gpt2-shakespeare": GPTConfig(n_layer=4, n_head=4, n_embd=128, n_ctx=256), **PRESETS}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gpt2-shakespeare", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--json", default=None, help="write all numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    for name in ("batch_size", "block_size", "steps", "rounds"):
        check_int(f"--{name}", getattr(args, name))
    if args.json:
        check_output_file(args.json, "--json file")
    config = SHAPES[args.shape]
    tc = TrainConfig(batch_size=args.batch_size, block_size=args.block_size, max_steps=10**6, warmup_steps=0)
    if args.block_size > config.n_ctx:
        raise GPT2FnError(f"--block_size {args.block_size} exceeds the {args.shape} context {config.n_ctx}")
    device = resolve_device(args.device)
    windows = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size + 1),
                            generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    params0 = init_params(config, seed=0, device=device)
    variants = {
        "gpt2fn deterministic": gpt2fn_step(params0, config, tc, windows, deterministic=True),
        "gpt2fn nondeterministic": gpt2fn_step(params0, config, tc, windows, deterministic=False),
    }
    hf = None if args.no_transformers else transformers_step(params0, config, tc, windows)
    if hf is not None:
        variants["transformers GPT2LMHeadModel"] = hf
    tokens_per_step = args.batch_size * args.block_size
    print(f"gpt2fn training-step benchmark: {args.shape} shape ({config.n_layer} layers, {config.n_embd} wide), "
          f"batch {args.batch_size} x {args.block_size}, fp32, torch {torch.__version__}, {device} "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    for step in variants.values():  # one untimed step each: allocations, optimizer state
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tqdm(total=args.rounds * len(variants), desc="rounds", leave=False) as bar:
        for _ in range(args.rounds):
            for name, step in variants.items():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                synchronize(device)
                times[name].append((time.perf_counter() - start) / args.steps)
                bar.update()
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": str(device)},
        "shape": args.shape, "config": config.to_dict(), "batch_size": args.batch_size, "block_size": args.block_size,
        "variants": {name: {"step_s": sorted(t)[len(t) // 2], "all_step_s": t,
                            "tokens_per_s": tokens_per_step / sorted(t)[len(t) // 2]} for name, t in times.items()},
    }  # fmt: skip
    base = results["variants"]["gpt2fn deterministic"]["tokens_per_s"]
    print(f"\n  {'variant':32s} {'tokens/s':>10s} {'ms/step':>9s} {'vs gpt2fn deterministic':>24s}")
    for name, v in results["variants"].items():
        print(f"  {name:32s} {v['tokens_per_s']:10.0f} {v['step_s'] * 1000:9.1f} {v['tokens_per_s'] / base:23.2f}x")
    print(f"  (median of {args.rounds} interleaved rounds of {args.steps} steps)")
    if args.json:
        print(f"wrote {atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))}")
    return 0


def gpt2fn_step(params0, config, tc, windows, deterministic: bool):
    params = trainable(params0)
    optimizer = make_optimizer(params, tc)

    def step():
        with deterministic_mode(deterministic):
            train_step(params, config, optimizer, [windows], tc.lr, tc)

    return step


def transformers_step(params0, config, tc, windows):
    """The same step with the reference model: same weights, same windows, same loss, AdamW, clipping."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed: skipping the baseline (pip install transformers)")
        return None
    model = GPT2LMHeadModel(GPT2Config(**config.to_hf())).to(windows.device).train()
    model.load_state_dict(hf_state_dict(params0), strict=False)
    model.tie_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)

    def step():
        logits = model(windows[:, :-1]).logits
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    sys.exit(main())
