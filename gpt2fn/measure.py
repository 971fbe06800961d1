"""Measuring decoding: the machine's weight-streaming limit, per-step decode
time at a given sequence length, and peak memory; and training's model FLOPs
utilisation (MFU). Used by the benchmarks and ``scripts/train.py``; every
function here returns numbers, none prints.

Batch-1 decoding reads every weight once per token and does two flops per
weight read, so it is bound by memory bandwidth: the time to stream the
weights once is the floor of a decode step, and tokens/s divided by
``1 / floor`` says how close a variant gets to the machine's limit.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional

import torch

from gpt2fn.config import GPTConfig
from gpt2fn.device import onednn_linear, synchronize
from gpt2fn.model import positions
from gpt2fn.params import Params, flatten_params, param_shapes, params_device
from gpt2fn.steps import Steps, window_len


def weight_bytes(params: Params) -> int:
    """Bytes a decode step must read: every tensor of the params, once."""
    return sum(t.numel() * t.element_size() for t in flatten_params(params).values())


def median_time(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def streaming_limit_s(n_bytes: int, device: torch.device, repeats: int = 7) -> tuple[float, float]:
    """(seconds, GB/s): the fastest we can read ``n_bytes`` of contiguous
    memory once, the floor under any decode step that reads that much.

    Best of three reads of one buffer: ``torch.sum`` over fp32, and a compiled
    row-sum over the buffer as fp32 and as int8 (the compiler's loop is what
    the compiled decode step uses; the library sum is the reference).
    """
    int8 = torch.ones(n_bytes // 16384 * 16384, dtype=torch.int8, device=device)  # whole fp32 rows of 4096
    fp32 = int8.view(torch.float32)
    row_sum = torch.compile(lambda x: x.view(-1, 4096).float().sum(-1), fullgraph=True)
    best = min(
        median_time(lambda: fp32.sum(), repeats, device),
        median_time(lambda: row_sum(fp32), repeats, device, warmup=2),
        median_time(lambda: row_sum(int8), repeats, device, warmup=2),
    )
    return best, n_bytes / best / 1e9


def decode_step_time(params: Params, config: GPTConfig, steps: Steps, seq_len: int, repeats: int = 5,
                     cache_len: Optional[int] = None) -> float:  # fmt: skip
    """Seconds per decode step (greedy) with ``seq_len - 1`` tokens already
    run: the step at position ``seq_len - 1``, cached or recomputing,
    whichever ``steps`` are. The state holds ``cache_len`` positions
    (default ``seq_len``); the step gets the window of it that the decode
    loop would hand it (``Steps.window``)."""
    device = params_device(params)
    length = cache_len or seq_len
    state = steps.make_state(params, 1, length)
    if steps.window is not None:
        state = steps.window(state, window_len(seq_len, length))
    tokens = torch.randint(0, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        steps.prefill(params, tokens[:, :-1], positions(1, seq_len - 1, device), state, None)
        token, pos = tokens[:, -1:].clone(), torch.tensor([[seq_len - 1]], device=device)
        return median_time(lambda: steps.decode(params, token, pos, state, None), repeats, device, warmup=2)


def product_times(params: Params, rows: int, repeats: int = 5) -> dict[str, float]:
    """Seconds for one pass over every fp32 weight matrix of the params (the
    products of a forward over ``rows`` tokens), by each CPU library:
    ``{"mkl": ..., "onednn": ...}`` (what :func:`~gpt2fn.layers.few_rows`
    chooses between). Inputs are random; only the time is kept."""
    mats = [w for name, w in flatten_params(params).items() if w.dim() == 2 and name != "wpe"]
    xs = {w.shape[1]: torch.randn(1, rows, w.shape[1]) for w in mats}
    device = params_device(params)
    return {
        "mkl": median_time(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in mats], repeats, device),
        "onednn": median_time(lambda: [onednn_linear(xs[w.shape[1]], w) for w in mats], repeats, device),
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (Linux resident set, or CUDA allocator)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # writing 5 to clear_refs resets the kernel's high-water mark, VmHWM
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return float("nan")


def memory_mb(device: torch.device) -> float:
    """Memory in use now: process RSS on CPU (Linux), allocated memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1e6
    return _proc_status_mb("VmRSS")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: process RSS on CPU (Linux),
    allocated memory on CUDA. NaN where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return _proc_status_mb("VmHWM")


# ----------------------------------------------------------------------------- training FLOPs

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from NVIDIA's data sheets,
# matched against torch.cuda.get_device_name(); the first key found in the name wins.
PEAK_BF16_FLOPS: dict[str, float] = {
    "B200": 2250e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak from :data:`PEAK_BF16_FLOPS`, or None
    (CPUs, unknown GPUs: pass the figure yourself, e.g. ``--peak_flops``)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def training_flops_per_token(config: GPTConfig, block_size: int) -> float:
    """FLOPs of one training token (forward + backward): 6 per parameter
    (the position embedding is a lookup, not counted; the token embedding is
    counted once, as the LM head's matrix), plus attention's scores and
    weighted sum, 12 x layers x width x context (PaLM's appendix B, as nanoGPT)."""
    n = sum(math.prod(shape) for name, shape in param_shapes(config).items() if name != "wpe")
    return 6 * n + 12 * config.n_layer * config.n_embd * block_size
