#!/usr/bin/env python
"""Side-by-side training-step benchmark, in ONE process on the same batch.

    python scripts/benchmark_train.py                       # bundled-model shape, batch 8 x 256
    python scripts/benchmark_train.py --shape gpt2 --batch_size 16 --block_size 1024 --device cuda --json train.json

Times whole optimizer steps (forward, backward, clipping, AdamW) of:

* gpt2fn's ``train_step``, eager, with the device's default determinism
  (on for the CPU), and with determinism off (what determinism costs);
* the same step with the loss under ``torch.compile``;
* transformers' ``GPT2LMHeadModel`` on the same weights and windows with
  ``torch.optim.AdamW``, eager and under ``torch.compile`` (when
  transformers is installed),

all with the device's default bf16 autocast (on for CUDA), interleaving the
variants over several rounds (machines drift: only ratios measured side by
side mean anything), and reports the median tokens/s of each, its ratio to
gpt2fn eager, and MFU where the device's peak is known (GPUs in
``gpt2fn.measure.PEAK_BF16_FLOPS``, or ``--peak_flops``). ``--json`` writes
every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt2fn.config import PRESETS, GPTConfig
from gpt2fn.device import DEVICE_HELP, resolve_device, synchronize
from gpt2fn.errors import ArgumentParser, GPT2FnError, check_int, check_number, check_output_file, run_cli
from gpt2fn.files import write_json
from gpt2fn.measure import peak_flops, training_flops_per_token
from gpt2fn.params import init_params
from gpt2fn.training import (
    TrainConfig, deterministic_mode, loss_fn, make_optimizer, resolve_for_device, tf32_matmuls, train_step, trainable,
)  # fmt: skip
from gpt2fn.weights import transformers_model

SHAPES = {"gpt2-shakespeare": GPTConfig(n_layer=4, n_head=4, n_embd=128, n_ctx=256), **PRESETS}


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gpt2-shakespeare", choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per step")
    p.add_argument("--block_size", type=int, default=256, help="tokens per window")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--peak_flops", type=float, default=None, help="the device's peak FLOP/s for MFU (default: known GPUs)")
    p.add_argument("--autocast_bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for every variant (default: the device's, on for CUDA, off for the CPU)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--json", default=None, help="write all numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    for name in ("batch_size", "block_size", "steps", "rounds"):
        check_int(f"--{name}", getattr(args, name))
    if args.peak_flops is not None:
        check_number("--peak_flops", args.peak_flops, 0, low_open=True)
    if args.json:
        check_output_file(args.json, "--json file")
    config = SHAPES[args.shape]
    if args.block_size > config.n_ctx:
        raise GPT2FnError(f"--block_size {args.block_size} exceeds the {args.shape} context {config.n_ctx}")
    device = resolve_device(args.device)
    tc = resolve_for_device(TrainConfig(batch_size=args.batch_size, block_size=args.block_size, max_steps=10**6,
                                        warmup_steps=0, autocast_bf16=args.autocast_bf16), device)  # fmt: skip
    windows = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size + 1),
                            generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    params0 = init_params(config, seed=0, device=device)
    variants = {
        "gpt2fn eager": gpt2fn_step(params0, config, tc, windows),
        f"gpt2fn eager, deterministic {'off' if tc.deterministic else 'on'}": gpt2fn_step(
            params0, config, dataclasses.replace(tc, deterministic=not tc.deterministic), windows),
        "gpt2fn compiled": gpt2fn_step(params0, config, dataclasses.replace(tc, compile=True), windows),
    }
    if not args.no_transformers:
        for compiled in (False, True):
            step = transformers_step(params0, config, tc, windows, compiled)
            if step is not None:
                variants[f"transformers {'compiled' if compiled else 'eager'}"] = step
    tokens_per_step = args.batch_size * args.block_size
    peak = args.peak_flops or peak_flops(device)
    print(f"gpt2fn training-step benchmark: {args.shape} shape ({config.n_layer} layers, {config.n_embd} wide), "
          f"batch {args.batch_size} x {args.block_size}, {'bf16 autocast' if tc.autocast_bf16 else 'fp32'}, "
          f"torch {torch.__version__}, {device} ({torch.get_num_threads()} threads)")  # fmt: skip
    compile_s = {}
    for name, step in tqdm(variants.items(), desc="first step (compiles)", leave=False):
        synchronize(device)
        start = time.perf_counter()
        step()  # untimed: allocations, optimizer state, compilation
        synchronize(device)
        compile_s[name] = time.perf_counter() - start
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
    flops_per_token = training_flops_per_token(config, args.block_size)
    records = {}
    for name, t in times.items():
        step_s = sorted(t)[len(t) // 2]
        records[name] = {"step_s": step_s, "all_step_s": t, "first_step_s": compile_s[name],
                         "tokens_per_s": tokens_per_step / step_s,
                         "mfu": tokens_per_step / step_s * flops_per_token / peak if peak else None}  # fmt: skip
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "shape": args.shape, "config": config.to_dict(), "batch_size": args.batch_size, "block_size": args.block_size,
        "autocast_bf16": tc.autocast_bf16, "peak_flops": peak, "flops_per_token": flops_per_token, "variants": records,
    }  # fmt: skip
    base = records["gpt2fn eager"]["tokens_per_s"]
    print(f"\n  {'variant':34s} {'tokens/s':>10s} {'ms/step':>9s} {'vs gpt2fn eager':>16s} {'MFU':>6s} {'1st step':>9s}")
    for name, r in records.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"  {name:34s} {r['tokens_per_s']:10.0f} {r['step_s'] * 1000:9.1f} {r['tokens_per_s'] / base:15.2f}x "
              f"{mfu:>6s} {r['first_step_s']:8.1f}s")  # fmt: skip
    print(f"  (median of {args.rounds} interleaved rounds of {args.steps} steps; MFU: "
          f"{flops_per_token / 1e6:.0f} MFLOP/token over {'a peak of %.0f TFLOP/s' % (peak / 1e12) if peak else 'no known peak: pass --peak_flops'};"
          " 1st step: untimed, includes compilation)")  # fmt: skip
    if args.json:
        print(f"wrote {write_json(args.json, results)}")
    return 0


def gpt2fn_step(params0, config, tc, windows):
    """One optimizer step of gpt2fn's own train_step, under tc's determinism and compile settings."""
    params = trainable(params0)
    optimizer = make_optimizer(params, tc)
    compute_loss = functools.partial(loss_fn, params, config)
    compute_loss = torch.compile(compute_loss) if tc.compile else compute_loss

    def step():
        with deterministic_mode(tc.deterministic), tf32_matmuls(windows.device):
            train_step(params, config, optimizer, [windows], tc.lr, tc, compute_loss)

    return step


def transformers_step(params0, config, tc, windows, compiled: bool):
    """The same step with the reference model: same weights, same windows, same loss, AdamW, clipping, autocast."""
    model = transformers_model(params0, config)
    if model is None:
        return None
    model.train()
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay,
                                  fused=True)  # as make_optimizer  # fmt: skip

    def step():
        with torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=tc.autocast_bf16), tf32_matmuls(windows.device):
            logits = forward(windows[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    sys.exit(main())
