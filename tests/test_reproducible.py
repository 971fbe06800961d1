"""Reproducible training, through scripts/train.py as a user runs it: the same
command twice gives bit-identical weights; a run killed with SIGKILL at
random moments (mid-checkpoint too) and resumed each time ends bit-identical
to an uninterrupted one; a checkpoint is never unreadable after a kill; the
checkpoint records the determinism setting and --resume restores it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from gpt2fn.data import prepare
from gpt2fn.layers import embedding
from gpt2fn.params import flatten_params
from gpt2fn.training import TrainConfig, deterministic_mode, load_checkpoint, resolve_for_device
from gpt2fn.weights import load_params

from conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "train.py")
MAX_STEPS = 24
ARGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--n_ctx", "32", "--block_size", "32", "--batch_size", "4",
        "--max_steps", str(MAX_STEPS), "--warmup_steps", "2", "--lr", "3e-3", "--eval_interval", "3",
        "--eval_batches", "1", "--export_dtype", "float32", "--device", "cpu"]  # fmt: skip
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("repro")
    (d / "t.txt").write_text(TEXT * 30)
    prepare([d / "t.txt"], d / "data")
    return d / "data"


def command(data, out, *extra) -> list[str]:
    return [sys.executable, SCRIPT, "--data", str(data), "--out", str(out), "--export", str(out.with_suffix(".safetensors")),
            *ARGS, *extra]  # fmt: skip


def run_to_end(data, out, *extra) -> subprocess.CompletedProcess:
    run = subprocess.run(command(data, out, *extra), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """One straight run per grad_accum, made when first asked for."""
    runs = {}

    def get(grad_accum: int):
        if grad_accum not in runs:
            out = tmp_path_factory.mktemp(f"straight{grad_accum}") / "ckpt.pt"
            runs[grad_accum] = (out, run_to_end(data, out, "--grad_accum", str(grad_accum)))
        return runs[grad_accum][0]

    return get


def assert_same_run(a, b) -> None:
    """Bit-identical exported weights and identical loss histories."""
    wa, _ = load_params(a.with_suffix(".safetensors"))
    wb, _ = load_params(b.with_suffix(".safetensors"))
    fa, fb = flatten_params(wa), flatten_params(wb)
    assert fa.keys() == fb.keys()
    different = [k for k in fa if not torch.equal(fa[k], fb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert load_checkpoint(a)["history"] == load_checkpoint(b)["history"]


def test_the_same_command_twice_gives_bit_identical_weights(data, uninterrupted, tmp_path):
    reference = uninterrupted(1)
    again = tmp_path / "ckpt.pt"
    run = run_to_end(data, again, "--grad_accum", "1")
    assert "deterministic on (bit-identical runs)" in run.stdout
    assert_same_run(reference, again)
    assert load_checkpoint(again)["train_config"].deterministic is True  # the CPU default, resolved and recorded


def stale_temporaries(ckpt):
    return [p for p in ckpt.parent.iterdir() if p.name.startswith(f".{ckpt.name}.") and p.name.endswith(".tmp")]


def kill_during_a_run(proc, ckpt, mid_checkpoint: bool, rng: random.Random, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as it starts writing a checkpoint (``mid_checkpoint``),
    or at a random moment within 0.4 s after its next checkpoint lands; False if it ended first."""
    start_mtime = ckpt.stat().st_mtime_ns if ckpt.exists() else None
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if mid_checkpoint and stale_temporaries(ckpt):
            break
        if not mid_checkpoint and ckpt.exists() and ckpt.stat().st_mtime_ns != start_mtime:
            time.sleep(rng.uniform(0, 0.4))
            break
        time.sleep(0.0005)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_killed_and_resumed_runs_end_bit_identical(data, uninterrupted, tmp_path, grad_accum):
    reference = uninterrupted(grad_accum)
    ckpt = tmp_path / "ckpt.pt"
    rng = random.Random(grad_accum)
    kills, steps, left_mid_write = 0, [], 0
    with open(tmp_path / "log.txt", "w") as log:
        while True:
            resume = ["--resume"] if ckpt.exists() else []
            proc = subprocess.Popen(command(data, ckpt, "--grad_accum", str(grad_accum), *resume), stdout=log, stderr=log)
            if kills < 4 and kill_during_a_run(proc, ckpt, mid_checkpoint=kills % 2 == 0, rng=rng):
                kills += 1
                left_mid_write += bool(stale_temporaries(ckpt))
                if ckpt.exists():  # never unreadable, whenever the kill came
                    steps.append(load_checkpoint(ckpt)["step"])
                continue
            assert proc.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-2000:]
            break
    assert kills >= 3 and left_mid_write >= 1, (kills, left_mid_write)
    assert steps == sorted(steps) and 0 < steps[0] and steps[-1] < MAX_STEPS, steps
    assert_same_run(reference, ckpt)
    assert not stale_temporaries(ckpt)  # the resumed run cleared what the kills left


def test_the_checkpoint_records_the_setting_and_resume_restores_it(data, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    first = subprocess.run(command(data, ckpt, "--no-deterministic", "--stop_at", "3"), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "deterministic off" in first.stdout and load_checkpoint(ckpt)["train_config"].deterministic is False
    resumed = subprocess.run(command(data, ckpt, "--resume", "--stop_at", "6"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "deterministic off" in resumed.stdout
    state = load_checkpoint(ckpt)
    assert state["step"] == 6 and state["train_config"].deterministic is False


def test_deterministic_mode_sets_and_restores_the_settings(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with deterministic_mode(False):
        assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark) == before  # fmt: skip
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark) == before  # fmt: skip


def test_the_device_defaults():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_for_device(TrainConfig(), cpu) == TrainConfig(deterministic=True, autocast_bf16=False)
    assert resolve_for_device(TrainConfig(), cuda) == TrainConfig(deterministic=False, autocast_bf16=True)
    explicit = TrainConfig(deterministic=True, autocast_bf16=False)
    assert resolve_for_device(explicit, cuda) == explicit
    assert resolve_for_device(TrainConfig(deterministic=False, autocast_bf16=True), cpu).deterministic is False


def test_the_embedding_backward_is_deterministic_without_the_mode():
    """The root cause: ``wte[tokens]``'s backward (index_put_ with accumulate)
    adds repeated rows with atomics across threads, in a varying order; the
    layer's F.embedding adds them in a fixed order. Repeated tokens, as in text."""
    assert not torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        tokens = torch.randint(0, 50, (16, 256), generator=torch.Generator().manual_seed(0))
        wte = torch.randn(50257, 64, requires_grad=True)
        upstream = torch.randn(16, 256, 64, generator=torch.Generator().manual_seed(1))
        grads = []
        for _ in range(6):
            (grad,) = torch.autograd.grad(embedding(tokens, wte), wte, upstream)
            grads.append(grad)
        assert all(torch.equal(grads[0], g) for g in grads[1:])
        assert torch.equal(embedding(tokens, wte), F.embedding(tokens, wte))
    finally:
        torch.set_num_threads(threads)


def test_compiled_training_is_bit_identical_run_to_run(data, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name / "ckpt.pt"
        run = run_to_end(data, out, "--compile", "--max_steps", "6", "--eval_interval", "3")
        assert "compiled" in run.stdout
        runs.append(out)
    assert_same_run(*runs)
