"""The machine: the user's device string as a torch device, with one clear
line when what was asked for is not there; and on the CPU, which library
computes an fp32 matrix product (the op behind :func:`gpt2fn.layers.few_rows`).

MKL's fp32 product (``F.linear``) repacks the weight on every call; oneDNN's
on the weight as stored is faster on an Intel CPU from 4 to 12 rows but for
small weights, and on an AMD CPU, where MKL runs slow code, always (forward
and backward: the gradients are products of the same op). Measured in the
README's Speed and Training sections.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from gpt2fn.errors import GPT2FnError

# What --device takes, in every script's --help (resolve_device).
DEVICE_HELP = "cpu, cuda, cuda:N, or auto: cuda if present"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N" (or
    such a torch.device); anything else, or a GPU this machine lacks, is one
    clear line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GPT2FnError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GPT2FnError(
                f"device {name!r} was asked for but CUDA is not available here "
                "(no GPU, or a CPU-only torch build); use the CPU (--device cpu)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GPT2FnError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise GPT2FnError(f"device type {device.type!r} is not supported; use cpu or cuda")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The value of the first ``name`` line of ``/proc/cpuinfo`` (its first CPU's), or "" where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(name)), "")
    except OSError:
        return ""


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor as Linux names it ("GenuineIntel", "AuthenticAMD"), or "" where it cannot be read."""
    return cpuinfo_field("vendor_id", cpuinfo)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    """The CPU's feature flags as Linux lists them ("avx512_bf16", "amx_bf16", ...), or none where they cannot be read."""
    return frozenset(cpuinfo_field("flags", cpuinfo).split())


# Whether this build has oneDNN; the row counts, and the smallest weight
# (elements), for which its fp32 matrix product beats MKL's: every one on AMD
# CPUs; elsewhere as measured on Intel's.
ONEDNN = torch.backends.mkldnn.is_available()
AMD = cpu_vendor() == "AuthenticAMD"
ONEDNN_ROWS, ONEDNN_MIN_WEIGHT = ((1, 2**62), 0) if AMD else ((4, 16), 2**20)

# How many int8 weights gpt2fn.layers.few_rows dequantizes at a time (a block
# of whole rows, 8 MB in fp32, which stays in cache for the product that reads
# it; the product of each block is, bit for bit, its rows' part of the whole
# matrix's, checked on every 124M shape from 1 to 64 rows). Side by side, the
# eager products of every 124M int8 matrix (2-core AMD EPYC, Zen 5): batch 1
# 49.9 ms whole, 18.0 / 12.3 / 10.5 / 11.0 / 14.6 ms in blocks of 2^19 ... 2^23
# weights; batch 8 55.7 ms, 24.8 / 19.2 / 17.2 / 16.8 / 20.8 ms. Whole, each
# call wrote, then read, a fresh fp32 copy of the matrix (the LM head's 154 MB).
DEQUANT_BLOCK = 2**21

# The groups gpt2fn.layers.matvec sums a weight's rows in (an accumulator
# each, fused in one loop), and for the LM head (16384 rows and more). Side by
# side, whole compiled 124M step: on Intel (int8) groups of 2, 3, 4, 6, 8 took
# 9.3, 8.1, 7.7, 7.7, 8.1 ms; on AMD (Zen 5) 2 against 4 and 8: batch 1 fp32
# 1.07x, bf16 1.00-1.02x, int8 1.01-1.03x; batch 8 1.02-1.09x (two runs).
MATVEC_GROUPS, MATVEC_HEAD_GROUPS = (2, 2) if AMD else (4, 8)

# The most rows of bf16 weights gpt2fn.layers.matvec sums itself; past them,
# oneDNN's bf16 product (F.linear) on a CPU that multiplies bf16 natively
# (AVX-512 BF16 or AMX), as for fp32 weights. Side by side on the AMD EPYC
# (Zen 5, AVX-512 BF16), 124M bf16, 8-token prompts, tokens/s of the
# generation loop against the grouped loop: batch 12 1.60x, 16 2.05-2.09x;
# batch 8 1.02-1.20x (the loop keeps it), the step alone at batch 4 0.78x.
# Without native bf16, oneDNN emulates it: the loop keeps every batch (16).
def matvec_bf16_max_rows(flags: frozenset, onednn: bool) -> int:
    """8 where oneDNN multiplies bf16 natively (its flags have ``avx512_bf16`` or ``amx_bf16``), else 16."""
    return 8 if onednn and {"avx512_bf16", "amx_bf16"} & flags else 16


MATVEC_BF16_MAX_ROWS = matvec_bf16_max_rows(cpu_flags(), ONEDNN)


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w.T + b`` by oneDNN's matrix product on the fp32 weight as stored (CPU builds with oneDNN)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def few_rows_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ w.T + b`` by oneDNN if ``x`` has :data:`ONEDNN_ROWS` rows and
    ``w`` at least :data:`ONEDNN_MIN_WEIGHT` elements, else by MKL (decided
    per call: under ``torch.compile`` the row count may be symbolic)."""
    rows = x.numel() // x.shape[-1]
    if ONEDNN_ROWS[0] <= rows <= ONEDNN_ROWS[1] and w.numel() >= ONEDNN_MIN_WEIGHT:
        return onednn_linear(x, w, b)
    return F.linear(x, w, b)


def _few_rows_backward(ctx, dy: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    """Each gradient a product by the same rule: dx = dy @ w, dw = (x^T @ dy)^T, db = the sum of dy's rows."""
    x, w = ctx.saved_tensors
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    dx = torch.ops.gpt2fn.few_rows_linear(dy, w.T, None) if ctx.needs_input_grad[0] else None
    dw = torch.ops.gpt2fn.few_rows_linear(x2.T, dy2.T, None).T if ctx.needs_input_grad[1] else None
    return dx, dw, dy2.sum(0) if ctx.needs_input_grad[2] else None


# few_rows_linear as an op, which inductor calls as it stands (its own oneDNN
# lowering needs frozen weights). Registered by hand: a @custom_op's first
# call imports torch._dynamo, 0.8 s that an eager generation's prefill paid.
LIBRARY = torch.library.Library("gpt2fn", "DEF")
LIBRARY.define("few_rows_linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
LIBRARY.impl("few_rows_linear", few_rows_linear, "CPU")
torch.library.register_fake("gpt2fn::few_rows_linear", lambda x, w, b: x.new_empty(*x.shape[:-1], w.shape[0]))
torch.library.register_autograd("gpt2fn::few_rows_linear", _few_rows_backward,
                                setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs[:2]))
