"""Turning the user's device string into a torch device, with one clear line
when what was asked for is not there."""

from __future__ import annotations

import torch

from gpt2fn.errors import GPT2FnError

def resolve_device(name: str = "auto") -> torch.device:
    """"auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"."""
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
                "(no GPU, or a CPU-only torch build); use --device cpu"
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


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor as Linux names it ("GenuineIntel", "AuthenticAMD"), or "" where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""
