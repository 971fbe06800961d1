"""Training: the loss as a pure function of (params, tokens), AdamW, a
warmup + cosine learning rate, gradient accumulation and clipping, bf16
autocast, activation checkpointing, evaluation, and atomic, exactly
resumable checkpoints.

Gradients flow through the very ``hidden``/``logits``/``block`` functions that
inference uses: there is no second model definition. The params dict's tensors are the trainable state
(fp32 leaves with ``requires_grad``); the optimizer updates them in place.

Weight decay (decoupled, AdamW) applies to the 2-D matrices only: the four
linear weights of each block and the two embeddings (``wte`` is also the LM
head, a matrix of the last product). Biases and LayerNorm gains/biases are not
decayed: shrinking them towards 0 has no regularising meaning. This is the
split of nanoGPT's GPT-2 recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from gpt2fn.config import GPTConfig
from gpt2fn.data import data_fingerprint, random_windows
from gpt2fn.device import synchronize
from gpt2fn.errors import GPT2FnError, check_int, check_number, is_out_of_memory
from gpt2fn.files import atomic_write, remove_stale_temporaries
from gpt2fn.layers import block
from gpt2fn.model import hidden, logits, positions
from gpt2fn.params import Params, flatten_params, params_device, unflatten_params
from gpt2fn.steps import eager_kernels

Tensor = torch.Tensor


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16  # windows per micro-batch, over all processes when distributed
    block_size: int = 128  # tokens per window
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # end of the cosine
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    # bf16 autocast for the forward/backward (weights stay fp32). None = the
    # device's default: on for CUDA, off for the CPU. train() records the value.
    autocast_bf16: Optional[bool] = None
    checkpoint_activations: bool = False
    compile: bool = False  # torch.compile the loss (forward; backward through AOTAutograd)
    eval_interval: int = 100
    eval_batches: int = 20
    seed: int = 0
    # Bit-identical results run to run (see deterministic_mode). None = the
    # device's default: on for the CPU (it costs nothing measurable there),
    # off for CUDA (where it costs speed). train() records the resolved value.
    deterministic: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_size", "grad_accum", "max_steps", "eval_interval", "eval_batches"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_int("seed", self.seed, low=0)
        if self.warmup_steps > self.max_steps:
            raise GPT2FnError(f"warmup_steps {self.warmup_steps} exceeds max_steps {self.max_steps}; "
                              f"use warmup_steps <= {self.max_steps}")  # fmt: skip
        check_number("lr", self.lr, 0, low_open=True)
        check_number("min_lr", self.min_lr, 0, self.lr)
        check_number("weight_decay", self.weight_decay, 0)
        check_number("beta1", self.beta1, 0, 1, high_open=True)
        check_number("beta2", self.beta2, 0, 1, high_open=True)
        check_number("grad_clip", self.grad_clip, 0)
        for name in ("deterministic", "autocast_bf16"):
            if getattr(self, name) not in (None, True, False):
                raise GPT2FnError(f"{name} must be True, False or None (the device's default), got {getattr(self, name)!r}")


def loss_fn(params: Params, config: GPTConfig, windows: Tensor, checkpoint_blocks: bool = False) -> Tensor:
    """Mean next-token cross-entropy. windows: [B, T + 1] int64 -> scalar.
    ``checkpoint_blocks`` (activation checkpointing) keeps only each block's
    input and recomputes the block in the backward pass: memory for compute."""
    tokens = windows[:, :-1]
    pos = positions(1, tokens.shape[1], device=tokens.device)  # shared by every row
    kernels = eager_kernels()  # few_rows: oneDNN's fp32 products where MKL's are slow, forward and backward
    run_block = checkpointed_block if checkpoint_blocks else block
    x = hidden(params, config, tokens, pos, kernels=kernels, run_block=run_block)
    out = logits(params, config, x, kernels.linear)
    return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), windows[:, 1:].reshape(-1))


def checkpointed_block(x: Tensor, **block_args) -> Tensor:
    """:func:`~gpt2fn.layers.block` keeping only its input: the rest is
    recomputed in the backward pass."""
    return torch.utils.checkpoint.checkpoint(functools.partial(block, **block_args), x, use_reentrant=False)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at ``max_steps``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def trainable(params: Params, device: torch.device | str | None = None) -> Params:
    """fp32 leaf copies with ``requires_grad`` (on ``device``, default: where
    they are): the state training updates. They are ``nn.Parameter``s (plain
    tensors to every function here) only so that DistributedDataParallel can
    register them."""
    flat = {name: torch.nn.Parameter(t.detach().to(device=device, dtype=torch.float32, copy=True))
            for name, t in flatten_params(params).items()}  # fmt: skip
    return unflatten_params(flat)


class _DistributedLoss(torch.nn.Module):
    """Training-only adapter: DistributedDataParallel wants a module whose
    parameters it all-reduces; this one holds the params dict's tensors (the
    same objects) and its forward is :func:`loss_fn`. Inference never sees it."""

    def __init__(self, params: Params, config: GPTConfig, checkpoint_blocks: bool):
        super().__init__()
        self.tree, self.config, self.checkpoint_blocks = params, config, checkpoint_blocks
        for i, t in enumerate(flatten_params(params).values()):
            self.register_parameter(f"p{i}", t)

    def forward(self, windows: Tensor) -> Tensor:
        return loss_fn(self.tree, self.config, windows, self.checkpoint_blocks)


def distributed_world() -> tuple[int, int]:
    """(world size, rank): (1, 0) unless torch.distributed is initialised (torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def make_optimizer(params: Params, tc: TrainConfig) -> torch.optim.AdamW:
    flat = flatten_params(params)
    decay = [t for t in flat.values() if t.ndim == 2]
    no_decay = [t for t in flat.values() if t.ndim != 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on every device: one kernel for the whole update, and on the CPU
    # the only AdamW whose sqrt is PyTorch's own (correctly rounded). The
    # per-tensor AdamW's sqrt goes through MKL's vector math library, which
    # now and then (about 1 process in 40, measured) returned a less precise
    # result on one thread's half of a large tensor, so two identical runs
    # differed from the first step on.
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)


class NonFiniteLoss(GPT2FnError):
    """The loss or the gradient norm was NaN or infinite: the step was not taken."""


def train_step(
    params: Params, config: GPTConfig, optimizer: torch.optim.Optimizer, micro_batches: list[Tensor], lr: float,
    tc: TrainConfig, compute_loss: Optional[Callable[[Tensor], Tensor]] = None,
    ddp: Optional[torch.nn.parallel.DistributedDataParallel] = None,
) -> tuple[float, float]:  # fmt: skip
    """One optimizer step over ``micro_batches`` (gradient accumulation):
    returns (mean loss, gradient norm before clipping). ``compute_loss``
    (windows -> loss) defaults to :func:`loss_fn` over ``params``; under data
    parallelism it is the (maybe compiled) DDP module, ``ddp`` that module
    itself: every micro-batch but the last runs under ``ddp.no_sync()``, so
    the gradients are all-reduced once per step, and the loss returned is the
    mean over all processes.

    A NaN or infinite loss or gradient norm raises :class:`NonFiniteLoss`
    before the optimizer moves, so the params stay those of the last good
    step (every process sees the same all-reduced values and stops together)."""
    compute_loss = compute_loss or functools.partial(loss_fn, params, config, checkpoint_blocks=tc.checkpoint_activations)
    device = micro_batches[0].device
    total = torch.zeros((), device=device)
    for i, windows in enumerate(micro_batches):
        accumulate_only = ddp is not None and i < len(micro_batches) - 1
        with ddp.no_sync() if accumulate_only else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(tc.autocast_bf16)):
                loss = compute_loss(windows)
            (loss / len(micro_batches)).backward()
        total += loss.detach().float()
    world, _ = distributed_world()
    if world > 1:  # report the global batch's loss, not this process's rows
        torch.distributed.all_reduce(total)
        total /= world
    tensors = list(flatten_params(params).values())
    norm = torch.nn.utils.clip_grad_norm_(tensors, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    mean_loss, norm = total.item() / len(micro_batches), float(norm)
    if not (math.isfinite(mean_loss) and math.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"the loss is {mean_loss} (gradient norm {norm})")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, norm


def to_device(windows: Tensor, device: torch.device) -> Tensor:
    """A batch drawn on the host, onto ``device``: through pinned memory and
    without waiting for the copy on CUDA."""
    if device.type != "cuda":
        return windows.to(device)
    return windows.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def evaluate(params: Params, config: GPTConfig, tokens: Tensor, tc: TrainConfig, seed: int = 1234) -> float:
    """Mean loss over ``eval_batches`` random windows, always the same ones
    (fixed seed), on the params' device, with the training's autocast."""
    g = torch.Generator().manual_seed(seed)
    device = params_device(params)
    total = torch.zeros((), device=device)
    for _ in range(tc.eval_batches):
        windows = to_device(random_windows(tokens, tc.batch_size, tc.block_size, g), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(tc.autocast_bf16)):
            total += loss_fn(params, config, windows).float()
    return total.item() / tc.eval_batches


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: str | os.PathLike, params: Params, config: GPTConfig, optimizer: torch.optim.Optimizer,
    step: int, data_generator: torch.Generator, tc: TrainConfig, history: list[dict], data: Optional[dict] = None,
) -> Path:  # fmt: skip
    """Everything needed to continue exactly: params, optimizer state, step,
    the data sampler's RNG, configs, the loss history and the data's
    fingerprint (:func:`gpt2fn.data.data_fingerprint`). Written to a
    temporary file in the same directory and renamed over the target, so a
    crash mid-write never destroys the last good checkpoint."""
    state = {
        "params": {k: t.detach() for k, t in flatten_params(params).items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data_rng": data_generator.get_state(),
        "config": config.to_dict(),
        "train_config": dataclasses.asdict(tc),
        "history": history,
        "data": data,
    }
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint without unpickling code (``weights_only=True``)."""
    return checkpoint_state(read_pt(path), path)


def read_pt(path: str | os.PathLike):
    """What a ``.pt`` file holds, read by ``torch.load(weights_only=True)``,
    which builds tensors and plain data only: never code."""
    path = Path(path)
    if not path.is_file():
        raise GPT2FnError(f"checkpoint {path} does not exist")
    allow = getattr(torch.serialization, "safe_globals", None)  # torch 2.5 and later
    try:
        with allow([BuildNanoGPTConfig]) if allow else contextlib.nullcontext():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong format, or a pickle that is not plain data
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:  # it would build an object of a class: run code
            raise GPT2FnError(f"{path} is not a gpt2fn checkpoint: it holds a pickled {found[1]}, which gpt2fn never "
                              "unpickles; save its weights as .safetensors with the code that wrote it") from None  # fmt: skip
        raise GPT2FnError(f"{path} is not a readable gpt2fn checkpoint ({type(e).__name__}); it may be corrupt") from None
    return state


def checkpoint_state(state, path: str | os.PathLike) -> dict:
    """A training checkpoint's state, as :func:`save_checkpoint` wrote it, its configs built."""
    if not isinstance(state, dict) or not {"params", "config", "train_config"} <= set(state):
        held = f"keys {', '.join(map(str, list(state)[:6]))}" if isinstance(state, dict) else type(state).__name__
        project = other_project(state)
        whose = f" ({project}'s checkpoint: --model and load_pretrained read its weights, but train.py resumes " \
            "only its own checkpoints)" if project else ""  # fmt: skip
        raise GPT2FnError(f"{path} is not a gpt2fn training checkpoint: it holds {held}{whose}, not params, config "
                          "and train_config; pass one that train.py wrote, or the weights as .safetensors")  # fmt: skip
    state["config"] = GPTConfig.from_dict(state["config"])
    state["train_config"] = TrainConfig(**state["train_config"])
    return state


class BuildNanoGPTConfig:
    """Stands in for build-nanogpt's ``GPTConfig`` dataclass, which its
    checkpoints pickle as ``__main__.GPTConfig`` (its train_gpt2.py runs as
    a script): the weights-only loader may build this one class, which runs
    no code and holds the attributes the file gives it."""


BuildNanoGPTConfig.__module__, BuildNanoGPTConfig.__qualname__ = "__main__", "GPTConfig"


def other_project(state) -> Optional[str]:
    """Whose checkpoint a .pt file holds, if another project's: "nanoGPT"
    (its train.py's ``ckpt.pt``: ``model`` and ``model_args``),
    "build-nanogpt" (``model`` and its pickled ``config``), else None."""
    if isinstance(state, dict) and "model" in state:
        if "model_args" in state:
            return "nanoGPT"
        if isinstance(state.get("config"), BuildNanoGPTConfig):
            return "build-nanogpt"
    return None


def check_fits(config: GPTConfig, tc: TrainConfig, train_tokens: Tensor, val_tokens: Optional[Tensor] = None) -> None:
    """The windows fit the model's context and each split holds at least one."""
    if config.n_ctx < tc.block_size:
        raise GPT2FnError(f"block_size {tc.block_size} exceeds the model's context {config.n_ctx}")
    for split, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if tokens is not None and len(tokens) < tc.block_size + 1:
            raise GPT2FnError(f"the {split} data holds {len(tokens)} tokens, less than one window of block_size + 1 = "
                              f"{tc.block_size + 1}; use a smaller block_size or more text")  # fmt: skip


def check_resume_data(resume: Optional[dict], train_tokens: Tensor, val_tokens: Optional[Tensor] = None) -> dict:
    """The data's fingerprint, after checking that a checkpoint to resume was
    trained on this same data (checkpoints from before fingerprints pass)."""
    data = data_fingerprint(train_tokens, val_tokens)
    if resume is not None and resume.get("data") not in (None, data):
        was = resume["data"]
        raise GPT2FnError(f"--resume with other data: the checkpoint trained on {was['train']['tokens']} train tokens "
                          f"(sha256 {was['train']['sha256']}), this data has {data['train']['tokens']} "
                          f"(sha256 {data['train']['sha256']}) or other val tokens; resume with the data it was "
                          "trained on, or start a new run")  # fmt: skip
    return data


# ----------------------------------------------------------------------------- determinism


def resolve_for_device(tc: TrainConfig, device: torch.device) -> TrainConfig:
    """``tc`` with the device's defaults filled in where it says None:
    deterministic on the CPU (free there) and not on CUDA (where it costs
    speed); bf16 autocast on CUDA and not on the CPU."""
    return dataclasses.replace(
        tc,
        deterministic=tc.deterministic if tc.deterministic is not None else device.type == "cpu",
        autocast_bf16=tc.autocast_bf16 if tc.autocast_bf16 is not None else device.type == "cuda",
    )


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """On CUDA, fp32 matrix products on the tensor cores (TF32: 10-bit
    mantissa inputs, fp32 accumulation), as every GPT-2 reproduction trains;
    it changes precision, not repeatability. Restored on exit; nothing on the CPU."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """Within the block, every kernel PyTorch runs is its deterministic
    variant, or raises if it has none (``torch.use_deterministic_algorithms``,
    strict); on CUDA also cuDNN's deterministic algorithms without autotuning,
    and the fixed cuBLAS workspace PyTorch's reproducibility notes require
    (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, set unless the user set it, before
    the first CUDA matmul of the run). The previous settings come back on exit.

    On the CPU the one nondeterministic kernel of training was the backward of
    ``wte[tokens]`` (a scatter-add with atomics across threads); the layers
    use ``F.embedding``, whose backward is ordered, so CPU training is
    repeatable even with this off; the mode guards what future ops may add.
    Disabled, the block runs with the settings it finds."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark)  # fmt: skip
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]


# ----------------------------------------------------------------------------- the loop


def train(
    params: Optional[Params],
    config: GPTConfig,
    tc: TrainConfig,
    train_tokens: Tensor,
    val_tokens: Optional[Tensor] = None,
    checkpoint_path: Optional[str | os.PathLike] = None,
    resume: Optional[dict] = None,
    stop_at: Optional[int] = None,
    on_step: Optional[Callable[[dict], None]] = None,
    device: torch.device | str | None = None,
    evaluations: Optional[Callable[[Params, int], dict]] = None,
) -> tuple[Params, list[dict]]:
    """Train from ``params`` (or from ``resume``, a loaded checkpoint) until
    ``tc.max_steps`` (or ``stop_at``, for a deliberate interruption), on
    ``device`` (default: where ``params`` are; the CPU when resuming).
    Evaluates every ``eval_interval`` steps and at the end (the val loss,
    and whatever ``evaluations(params, step)`` returns, e.g. HellaSwag
    accuracy, merged into that step's record), writes the checkpoint at each
    evaluation, and returns (params, history). After each step it calls
    ``on_step`` with that step's record plus ``step_s``, the step's own time
    (drawing the batch, forward, backward, update; not the evaluation or the
    checkpoint), which the history leaves out so that runs compare equal.

    ``tc``'s device defaults are resolved (:func:`resolve_for_device`) and
    recorded in the checkpoint; resuming restores them with the rest. Runs in
    :func:`deterministic_mode` when ``tc.deterministic`` says so, with TF32
    matmuls on CUDA. Under torchrun, each process trains its rows of the
    batch with DistributedDataParallel. A step whose loss is NaN or infinite,
    memory that runs out, or a checkpoint that cannot be written stops the run
    with one line naming the step and the last good checkpoint, which is intact."""
    check_fits(config, tc, train_tokens, val_tokens)
    if device is None:
        device = params_device(params) if resume is None else torch.device("cpu")
    device = torch.device(device)
    data_rng = torch.Generator().manual_seed(tc.seed)
    data = check_resume_data(resume, train_tokens, val_tokens)
    if resume is not None:
        params = trainable(resume["params"], device)
        optimizer = make_optimizer(params, tc)
        optimizer.load_state_dict(resume["optimizer"])
        data_rng.set_state(resume["data_rng"])
        step, history = resume["step"], list(resume["history"])
    else:
        params = trainable(params, device)
        optimizer = make_optimizer(params, tc)
        step, history = 0, []
    tc = resolve_for_device(tc, device)
    # Data parallel (under torchrun): every rank draws the same global batch
    # from the same RNG and reads only its own slice of rows; DDP averages the
    # gradients, so N ranks take exactly the step one process would take on
    # the whole batch.
    world, rank = distributed_world()
    if tc.batch_size % world:
        raise GPT2FnError(f"batch_size {tc.batch_size} is not divisible by the {world} processes; "
                          f"use a multiple of {world}")  # fmt: skip
    rows = slice(rank * tc.batch_size // world, (rank + 1) * tc.batch_size // world)
    ddp = None
    compute_loss = functools.partial(loss_fn, params, config, checkpoint_blocks=tc.checkpoint_activations)
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            _DistributedLoss(params, config, tc.checkpoint_activations),
            device_ids=[device.index] if device.type == "cuda" else None,
        )  # fmt: skip
        compute_loss = ddp
    if tc.compile:
        compute_loss = torch.compile(compute_loss)
    if checkpoint_path is not None and rank == 0:
        remove_stale_temporaries(checkpoint_path)  # left by a run killed mid-write
    saved_step = None if resume is None else resume["step"]

    def last_good() -> str:
        if checkpoint_path is None:
            return "no checkpoint path was given, so none was written"
        if saved_step is None:
            return f"no checkpoint was written yet (one is written every {tc.eval_interval} steps)"
        return f"the last good checkpoint is {checkpoint_path} (step {saved_step}), intact"

    end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
    with deterministic_mode(tc.deterministic), tf32_matmuls(device):
        while step < end:
            started = time.perf_counter()
            batches = [to_device(random_windows(train_tokens, tc.batch_size, tc.block_size, data_rng, rows), device)
                       for _ in range(tc.grad_accum)]  # fmt: skip
            lr = lr_at(step, tc)
            try:
                loss, norm = train_step(params, config, optimizer, batches, lr, tc, compute_loss, ddp)
            except NonFiniteLoss as e:
                again = "resume with --resume" if saved_step is not None else "start again"
                raise GPT2FnError(f"{e} at step {step + 1}, so training stopped there without updating the weights; "
                                  f"{last_good()}; lower the lr (or check the data) and {again}") from None  # fmt: skip
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                raise GPT2FnError(f"out of memory at step {step + 1}; {last_good()}: use a smaller batch_size "
                                  "(a larger grad_accum keeps the batch) or checkpoint_activations") from None  # fmt: skip
            synchronize(device)  # the optimizer's update, queued on CUDA, belongs to this step's time
            step_s = time.perf_counter() - started
            step += 1
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm}
            if step % tc.eval_interval == 0 or step == tc.max_steps:
                if val_tokens is not None:
                    record["val_loss"] = evaluate(params, config, val_tokens, tc)
                if evaluations is not None:
                    record.update(evaluations(params, step))
            history.append(record)
            if checkpoint_path is not None and rank == 0 and (step % tc.eval_interval == 0 or step == end):
                try:
                    save_checkpoint(checkpoint_path, params, config, optimizer, step, data_rng, tc, history, data)
                except OSError as e:
                    raise GPT2FnError(f"cannot write the checkpoint at step {step} ({e.strerror or e}); "
                                      f"{last_good()}") from None  # fmt: skip
                saved_step = step
            if on_step is not None:
                on_step({**record, "step_s": step_s})
    return params, history
