#!/usr/bin/env python
"""Train a GPT-2 from scratch (GPT-2 init) or fine-tune any loadable model.

    python scripts/prepare_data.py ../shared/data/tinyshakespeare.txt --out data/shakespeare
    python scripts/train.py --data data/shakespeare --out runs/shk/ckpt.pt \\
        --n_layer 4 --n_head 4 --n_embd 128 --n_ctx 256 --block_size 256 --max_steps 600 \\
        --export weights/gpt2-shakespeare.safetensors --plot runs/shk/loss.png

Progress bar with loss and tokens/s; a checkpoint at every evaluation
(``--resume`` continues exactly); ``--export`` writes the final weights in the
project's format (16-bit), loadable by ``scripts/generate.py --model``.
Data parallel on several processes (gloo on CPU, nccl on CUDA), the same
command under torchrun; ``--batch_size`` is the global batch:

    torchrun --nproc_per_node 2 scripts/train.py --data data/shakespeare --out runs/ddp/ckpt.pt ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

# Strict conditional numerical reproducibility for MKL's matrix products
# (read once, before MKL's first call): their summation order then does not
# depend on threads or buffer alignment. It was added for an intermittent
# test_reproducible failure whose real cause turned out to be the per-tensor
# AdamW's sqrt (see gpt2fn.training.make_optimizer); it is kept as a guard
# that costs nothing measurable. A user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import torch
from tqdm import tqdm

from gpt2fn.config import GPTConfig
from gpt2fn.data import load_split
from gpt2fn.device import DEVICE_HELP, resolve_device
from gpt2fn.errors import (
    ArgumentParser, GPT2FnError, check_int, check_number, check_output_dir, check_output_file, run_cli,
)  # fmt: skip
from gpt2fn.files import atomic_write
from gpt2fn.generation import generate
from gpt2fn.hellaswag import evaluate_hellaswag, hub_validation_file, load_examples
from gpt2fn.measure import peak_flops, training_flops_per_token
from gpt2fn.params import init_params, map_params
from gpt2fn.plotting import require_pyplot, save_figure
from gpt2fn.training import (
    TrainConfig, check_fits, check_resume_data, distributed_world, load_checkpoint, resolve_for_device, train,
)  # fmt: skip
from gpt2fn.tokenizer import check_vocabulary, decode, encode, get_tokenizer
from gpt2fn.weights import (MODEL_HELP, REVISION_HELP, load_pretrained, resolve_model, save_hf_checkpoint, save_llmc,
                            save_params)


SHAPE = ("n_layer", "n_head", "n_embd", "n_ctx")  # the options that shape a model trained from scratch
HELP = {  # the shape's options and TrainConfig's fields, as --help shows them
    "n_layer": "blocks of a model trained from scratch",
    "n_head": "attention heads per block (they divide n_embd)",
    "n_embd": "width of the residual stream",
    "n_ctx": "the model's context: positions it has embeddings for (at least block_size)",
    "batch_size": "windows per micro-batch, over all processes when distributed",
    "block_size": "tokens per window",
    "grad_accum": "micro-batches per optimizer step (a step trains on batch_size x block_size x grad_accum tokens)",
    "max_steps": "optimizer steps of the run",
    "lr": "peak learning rate, after the warmup",
    "min_lr": "learning rate at max_steps, the end of the cosine",
    "warmup_steps": "steps of linear warmup up to lr (step i at lr x (i + 1) / warmup_steps)",
    "weight_decay": "AdamW's decoupled weight decay on the 2-D weights (matrices and embeddings; not biases or LayerNorms)",
    "beta1": "AdamW's beta1",
    "beta2": "AdamW's beta2",
    "grad_clip": "clip the global gradient norm to this (0 = off)",
    "autocast_bf16": "bf16 autocast for the forward and backward, weights in fp32 (default: on for CUDA, off for the CPU)",
    "checkpoint_activations": "recompute each block's activations in the backward: less memory, about a third "
                              "more compute",
    "compile": "torch.compile the loss (the backward through AOTAutograd)",
    "eval_interval": "steps between evaluations of the val loss, each with a checkpoint",
    "eval_batches": "val batches per evaluation (always the same windows)",
    "seed": "the initial weights (from scratch) and the order of the training windows",
    "deterministic": "bit-identical runs (default: on for the CPU, where it costs nothing measurable; off for CUDA, "
                     "where it costs speed)",
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a directory made by scripts/prepare_data.py (shards, or train.bin + val.bin), "
                   "or one of llm.c's or build-nanogpt's token shards (NAME_train_000001.bin / .npy, NAME_val_...)")
    p.add_argument("--out", required=True, help="checkpoint file (written at every evaluation)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out, with its own saved settings, to its max_steps "
                   "(a setting given otherwise is refused)")
    p.add_argument("--stop_at", type=int, default=None,
                   help="stop after this step (a checkpoint is written), to --resume later")
    p.add_argument("--from_model", default=None, help=f"fine-tune this model instead of training from scratch: {MODEL_HELP}")
    p.add_argument("--revision", default=None, help=REVISION_HELP.replace("a Hub model", "a Hub --from_model"))
    for name, default in zip(SHAPE, (4, 4, 128, 256)):
        p.add_argument(f"--{name}", type=int, default=default, help=HELP[name])
    for field in dataclasses.fields(TrainConfig):
        if field.default is None:  # a flag whose default depends on the device
            p.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=None, help=HELP[field.name])
        elif isinstance(field.default, bool):
            p.add_argument(f"--{field.name}", action="store_true", help=HELP[field.name])
        else:
            p.add_argument(f"--{field.name}", type=type(field.default), default=field.default, help=HELP[field.name])
    p.add_argument("--export", default=None, help="write the final weights here (.safetensors)")
    p.add_argument("--export_dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the exported weights")
    p.add_argument("--export_hf", default=None,
                   help="write the final weights (in --export_dtype) as a Hugging Face checkpoint directory: "
                        "config.json, model.safetensors and GPT-2's tokenizer, for transformers and the Hub")
    p.add_argument("--export_llmc", default=None, metavar="FILE",
                   help="write the final weights as llm.c's model file (.bin), which llm.c's train_gpt2.cu starts "
                        "from (-e FILE): float32, or bfloat16 with --export_dtype bfloat16")
    p.add_argument("--snapshots", default=None,
                   help="also write the weights at every evaluation to DIR/stepN.safetensors (in --export_dtype), "
                        "each a model for any --model: the run's models over its training")
    p.add_argument("--plot", default=None, help="write the loss curve PNG here (needs matplotlib)")
    p.add_argument("--hellaswag", nargs="?", const="", default=None, metavar="FILE",
                   help="HellaSwag's acc_norm at every evaluation, on a jsonl FILE (e.g. hellaswag_val.jsonl) or, "
                        "given alone, the validation split from the Hub (Rowan/hellaswag, needs pyarrow)")
    p.add_argument("--hellaswag_limit", type=int, default=None, help="score only the first N HellaSwag examples")
    p.add_argument("--sample", default=None,
                   help="at every evaluation, print (and --log) the model's continuation of this text: top-k 40 "
                        "sampling from the same seed each time, so that the samples show what training changed")
    p.add_argument("--sample_tokens", type=int, default=48, help="new tokens of each --sample (up to the context)")
    p.add_argument("--log", default=None, help="append one JSON line per step here (loss, lr, tokens/s, MFU, val loss)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP}; "
                   "under torchrun on CUDA each process takes cuda:LOCAL_RANK")
    p.add_argument("--peak_flops", type=float, default=None,
                   help="the device's peak FLOP/s for MFU (default: looked up for known GPUs; none for CPUs)")
    args = p.parse_args(argv)
    for action in p._actions:  # parsed again without defaults: which options the command line gives
        action.default = argparse.SUPPRESS
    args.given = set(vars(p.parse_args(argv)))
    return args


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    try:
        device = resolve_device(args.device)
        checked = check_args(args)
    except GPT2FnError:  # under torchrun every process of a machine checks the same flags against the same files:
        if int(os.environ.get("LOCAL_RANK", 0)) > 0:  # its first one says what is wrong, once
            return 2
        raise
    if "RANK" in os.environ:  # launched by torchrun: join the process group, one GPU per process
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train_and_export(args, device, checked)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Checked(NamedTuple):
    tc: TrainConfig
    resume: Optional[dict]  # the checkpoint to continue, or None
    config: Optional[GPTConfig]  # None until --from_model is loaded
    train_tokens: torch.Tensor  # memory-mapped
    val_tokens: torch.Tensor
    hellaswag: Optional[list]  # the examples to score at every evaluation


def check_args(args) -> Checked:
    """Everything that can be refused before any work (no weights loaded, no
    file written), and what those checks read."""
    if args.stop_at is not None:
        check_int("stop_at", args.stop_at)
    # a new run's settings validate themselves; a resumed run has its own (check_resume_settings)
    tc = None if args.resume else TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    train_tokens, val_tokens = load_split(args.data, "train"), load_split(args.data, "val")
    if args.export:
        check_output_file(args.export, "--export file", suffix=".safetensors")
    if args.snapshots:
        check_output_dir(args.snapshots, "--snapshots directory")
    if args.export_hf:
        check_output_dir(args.export_hf, "--export_hf directory")
    if args.export_llmc:
        check_output_file(args.export_llmc, "--export_llmc file", suffix=".bin")
        if llmc_dtype(args) == "float16":
            raise GPT2FnError("--export_llmc writes float32 or bfloat16 (llm.c has no float16 model file); pass "
                              "--export_dtype float32 or bfloat16")  # fmt: skip
    if "export_dtype" in args.given and not (args.export or args.export_hf or args.export_llmc or args.snapshots):
        raise GPT2FnError("--export_dtype sets the dtype of --export, --export_hf, --export_llmc and --snapshots; "
                          "give one of them too, or drop it")  # fmt: skip
    if args.revision is not None and not args.from_model:
        raise GPT2FnError("--revision picks the Hub snapshot of --from_model; give --from_model too, or drop it")
    if args.plot:
        check_output_file(args.plot, "--plot file", suffix=".png")
        require_pyplot("--plot")
    if args.log and check_output_file(args.log, "--log file").exists() and not args.resume:
        raise GPT2FnError(f"--log file {args.log} already exists; a new run needs a new log (or pass --resume)")
    if args.peak_flops is not None:
        check_number("--peak_flops", args.peak_flops, 0, low_open=True)
    if args.hellaswag_limit is not None:
        check_int("--hellaswag_limit", args.hellaswag_limit)
        if args.hellaswag is None:
            raise GPT2FnError("--hellaswag_limit cuts the --hellaswag evaluation; give --hellaswag too")
    hellaswag = None if args.hellaswag is None else load_examples(args.hellaswag or hub_validation_file(), args.hellaswag_limit)
    if args.sample == "":
        raise GPT2FnError("--sample is empty; give the text whose continuation to print at every evaluation")
    check_int("--sample_tokens", args.sample_tokens)
    if "sample_tokens" in args.given and args.sample is None:
        raise GPT2FnError("--sample_tokens sets the length of the --sample continuations; give --sample TEXT too")
    resume, config = None, None
    if args.resume:
        if not Path(args.out).exists():
            raise GPT2FnError(f"nothing to resume: checkpoint {args.out} does not exist (start the run without --resume)")
        resume = load_checkpoint(args.out)  # its own settings replace the command line's
        tc, config = resume["train_config"], resume["config"]
        check_resume_settings(args, tc, config)
        check_resume_data(resume, train_tokens, val_tokens)
    elif check_output_file(args.out, "checkpoint").exists():
        raise GPT2FnError(f"checkpoint {args.out} already exists; pass --resume to continue that run, "
                          "or choose another --out (a new run would overwrite it)")  # fmt: skip
    elif not args.from_model:
        config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, n_ctx=args.n_ctx)
    elif args.given & set(SHAPE):
        shape = next(name for name in SHAPE if name in args.given)
        raise GPT2FnError(f"--{shape} shapes a model trained from scratch; --from_model brings its own shape: drop --{shape}")
    if config is not None:
        check_fits(config, tc, train_tokens, val_tokens)
    first = resume["step"] if resume else 0
    if args.stop_at is not None and not first < args.stop_at <= tc.max_steps:
        raise GPT2FnError(f"--stop_at must be past the run's step {first} and at most its max_steps {tc.max_steps}, "
                          f"got {args.stop_at}")  # fmt: skip
    return Checked(tc, resume, config, train_tokens, val_tokens, hellaswag)


def check_resume_settings(args, tc: TrainConfig, config: GPTConfig) -> None:
    """``--resume`` continues a run with its saved settings: one that the
    command line gives otherwise would be ignored, so it is refused (the same
    command again with ``--resume`` passes)."""
    saved = {**dataclasses.asdict(tc), **{name: getattr(config, name) for name in SHAPE}}
    name = next((n for n in saved if n in args.given and getattr(args, n) != saved[n]), None)
    if name is not None:
        raise GPT2FnError(f"--resume continues the run with its saved settings, but --{name} {getattr(args, name)} "
                          f"differs from its {saved[name]}; drop --{name}, or start a new run with another --out")


def train_and_export(args, device: torch.device, checked: Checked) -> int:
    world, rank = distributed_world()
    tc, resume, config, train_tokens, val_tokens, hellaswag = checked
    params = None
    if resume is not None:
        print(f"resuming from {args.out} at step {resume['step']}")
    elif config is None:
        params, config = load_pretrained(args.from_model, revision=args.revision)
    else:
        params = init_params(config, seed=tc.seed)
    check_vocabulary(get_tokenizer(), config.vocab_size, "the data's tokenizer (GPT-2's)",
                     "fine-tune a model with GPT-2's vocabulary")
    sample = None if args.sample is None else sampler(args.sample, args.sample_tokens, config, tc.seed, device)
    resolved = resolve_for_device(tc, device)
    peak = args.peak_flops or peak_flops(device)
    tokens_per_step = tc.batch_size * tc.block_size * tc.grad_accum
    flops_per_step = training_flops_per_token(config, tc.block_size) * tokens_per_step
    if rank == 0:
        print(f"{device}{f' x {world} processes' if world > 1 else ''}, deterministic "
              f"{'on (bit-identical runs)' if resolved.deterministic else 'off'}, bf16 autocast "
              f"{'on' if resolved.autocast_bf16 else 'off'}{', compiled' if tc.compile else ''}")  # fmt: skip
    log = StepLog(args.log, resume["step"] if resume else 0) if args.log and rank == 0 else None
    bar = tqdm(total=tc.max_steps, initial=resume["step"] if resume else 0, desc="training", unit="step",
               disable=rank != 0)

    step_times = []  # this run's steps, for the closing line

    def on_step(record):  # tokens/s and MFU over the step itself, not its evaluation
        step_s = record.pop("step_s")
        step_times.append(step_s)
        record["tokens_per_s"] = tokens_per_step / step_s
        shown = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if peak:
            record["mfu"] = flops_per_step / step_s / (peak * world)
            shown["MFU"] = f"{record['mfu']:.1%}"
        if "val_loss" in record:
            shown["val"] = f"{record['val_loss']:.3f}"
            if rank == 0:
                hellaswag = f"  hellaswag acc_norm {record['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in record else ""
                tqdm.write(f"step {record['step']}: train {record['loss']:.4f}  val {record['val_loss']:.4f}  "
                           f"lr {record['lr']:.2e}{hellaswag}")  # fmt: skip
                if "sample" in record:  # quoted line by line, as a mail quotes
                    tqdm.write("\n".join(f"| {line}" for line in (args.sample + record["sample"]).split("\n")))
        if log is not None:
            log.write(record)
        bar.set_postfix(shown)
        bar.update()

    evaluations = []  # what every evaluation adds to the val loss
    if hellaswag:
        tokenizer = get_tokenizer(resolve_model(args.from_model, args.revision) if args.from_model else None)

        def evaluate(params, step):
            result = evaluate_hellaswag(params, config, tokenizer, hellaswag)
            return {"hellaswag_acc": result.acc, "hellaswag_acc_norm": result.acc_norm}

        evaluations.append(evaluate)
    if sample is not None:
        evaluations.append(sample)
    if args.snapshots and rank == 0:

        def snapshot(params, step):  # the weights as --export writes them, a model for every --model
            save_params(exported(params, args.export_dtype), config, Path(args.snapshots) / f"step{step}.safetensors")
            return {}

        evaluations.append(snapshot)

    start = time.perf_counter()
    try:
        params, history = train(params, config, tc, train_tokens, val_tokens, args.out, resume=resume,
                                stop_at=args.stop_at, on_step=on_step, device=device,
                                evaluations=lambda params, step: {k: v for f in evaluations for k, v in f(params, step).items()})
    finally:
        bar.close()
    evaluated = [record for record in history if "val_loss" in record]
    last_val = f", val loss {evaluated[-1]['val_loss']:.4f} at step {evaluated[-1]['step']}" if evaluated else ""
    timed = step_times[1:] or step_times  # the first step warms up (and compiles): left out when there are others
    rate = f", {tokens_per_step * len(timed) / sum(timed):,.0f} tokens/s" if timed else ""
    rate += f" (MFU {flops_per_step * len(timed) / sum(timed) / (peak * world):.1%})" if timed and peak else ""
    print(f"done: step {history[-1]['step']} in {time.perf_counter() - start:.0f} s{rate}{last_val}")
    if rank != 0:
        return 0
    final = exported(params, args.export_dtype) if args.export or args.export_hf else None
    if args.export:
        print(f"wrote {save_params(final, config, args.export)}")
    if args.export_hf:  # the data's tokenizer, GPT-2's, beside the weights
        print(f"wrote {save_hf_checkpoint(final, config, args.export_hf)}")
    if args.export_llmc:
        print(f"wrote {save_llmc(params, config, args.export_llmc, dtype=getattr(torch, llmc_dtype(args)))}")
    if args.plot:
        plot_losses(history, args.plot)
    return 0


def llmc_dtype(args) -> str:
    """--export_llmc's dtype: --export_dtype where given, else float32 (llm.c's files are float32 or bfloat16)."""
    return args.export_dtype if "export_dtype" in args.given else "float32"


def exported(params, dtype: str):
    """The weights as --export writes them: on the CPU, in ``dtype``."""
    return map_params(lambda t: t.detach().to(device="cpu", dtype=getattr(torch, dtype)), params)


def sampler(text: str, n_tokens: int, config: GPTConfig, seed: int, device: torch.device):
    """An evaluation: ``{"sample": the model's continuation of text}``, n_tokens
    (up to the context) drawn with top-k 40 from a generator seeded with the
    run's seed, so that every evaluation draws the same random numbers; it
    stops at <|endoftext|>, which it keeps."""
    tokenizer = get_tokenizer()  # the data's: GPT-2's
    prompt = encode(tokenizer, text)
    if len(prompt) >= config.n_ctx:
        raise GPT2FnError(f"--sample is {len(prompt)} tokens but the model's context holds {config.n_ctx}, leaving no "
                          "room to continue it; shorten it")  # fmt: skip

    def sample(params, step) -> dict:
        stream = generate(params, config, [prompt], n_tokens, temperature=1.0, top_k=40,
                          generator=torch.Generator(device).manual_seed(seed), stop_token=tokenizer.eot_token)  # fmt: skip
        return {"sample": decode(tokenizer, stream.rows()[0])}

    return sample


class StepLog:
    """One JSON line per step, appended and flushed as the run goes. A resumed
    run first drops the lines of steps after its checkpoint (a killed run had
    gone further), so the log is again one line per step."""

    def __init__(self, path: str, resumed_at: int):
        self.path = Path(path)
        if self.path.exists():
            try:
                kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resumed_at]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise GPT2FnError(f"--log file {path} is not a step log (one JSON record per line); choose another") from None
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(history, path) -> None:
    plt = require_pyplot("--plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train", alpha=0.6)
    val = [r for r in history if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
