"""Data-parallel training through torchrun + gloo: two CPU processes with the
global batch split between them end with the same parameters as one process
with the whole batch, and the same two-process command twice ends bit-identical."""

from __future__ import annotations

import socket
import subprocess
import sys

import torch

from gpt2fn.data import prepare
from gpt2fn.params import flatten_params
from gpt2fn.weights import load_params

from conftest import ROOT

ARGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--n_ctx", "32", "--block_size", "16",
        "--batch_size", "8", "--max_steps", "4", "--warmup_steps", "1", "--eval_interval", "2",
        "--eval_batches", "1", "--export_dtype", "float32", "--grad_accum", "2", "--device", "cpu"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path):
    (tmp_path / "t.txt").write_text("Now is the winter of our discontent made glorious summer by this sun of York;\n" * 60)
    prepare([tmp_path / "t.txt"], tmp_path / "data")
    script = str(ROOT / "scripts" / "train.py")
    common = ["--data", str(tmp_path / "data"), *ARGS]
    single = subprocess.run([sys.executable, script, *common, "--out", str(tmp_path / "one.pt"),
                             "--export", str(tmp_path / "one.safetensors")], capture_output=True, text=True)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    for name in ("two", "two-again"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
        ddp = subprocess.run([*launcher, script, *common, "--out", str(tmp_path / f"{name}.pt"),
                              "--export", str(tmp_path / f"{name}.safetensors")], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, _ = load_params(tmp_path / "one.safetensors")
    two, _ = load_params(tmp_path / "two.safetensors")
    again, _ = load_params(tmp_path / "two-again.safetensors")
    a, b, c = flatten_params(one), flatten_params(two), flatten_params(again)
    start = flatten_params(load_params_init())
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # training changed the weights...
    assert diff <= 1e-5, diff  # ...and the same way in both set-ups (float reduction order aside)
    assert all(torch.equal(b[k], c[k]) for k in b)  # the same DDP command twice: bit-identical (gloo's order is fixed)


def load_params_init():
    from gpt2fn import GPTConfig, init_params

    return init_params(GPTConfig(n_layer=2, n_head=2, n_embd=32, n_ctx=32), seed=0)


def test_gradients_are_all_reduced_once_per_step_not_per_micro_batch(tmp_path):
    """Under DDP, every micro-batch but the last runs under no_sync: a comm
    hook sees one reduction per bucket per optimizer step."""
    import torch.distributed as dist

    from gpt2fn import GPTConfig, init_params
    from gpt2fn.training import TrainConfig, _DistributedLoss, make_optimizer, train_step, trainable

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        config = GPTConfig(n_layer=1, n_head=2, n_embd=16, n_ctx=32)
        params = trainable(init_params(config))
        ddp = torch.nn.parallel.DistributedDataParallel(_DistributedLoss(params, config, False))
        reductions = []

        def count(state, bucket):
            reductions.append(bucket.index())
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done

        ddp.register_comm_hook(None, count)
        tc = TrainConfig(batch_size=2, block_size=8, max_steps=2, warmup_steps=0)
        optimizer = make_optimizer(params, tc)
        micro_batches = [torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(3)]
        train_step(params, config, optimizer, micro_batches, 1e-3, tc, ddp, ddp)
        assert reductions == [0]  # one bucket (a small model), reduced once for three micro-batches
        reductions.clear()
        train_step(params, config, optimizer, micro_batches, 1e-3, tc, ddp)  # without the ddp handle: every time
        assert reductions == [0, 0, 0]
    finally:
        dist.destroy_process_group()


def test_a_bad_flag_under_torchrun_is_one_line_not_one_per_process(tmp_path):
    """Every process of a machine checks the same flags against the same
    files, so only its first (LOCAL_RANK 0) prints the error line (before, each
    process printed it)."""
    (tmp_path / "t.txt").write_text("Now is the winter of our discontent made glorious summer by this sun of York;\n" * 60)
    prepare([tmp_path / "t.txt"], tmp_path / "data")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip
    run = subprocess.run([*launcher, str(ROOT / "scripts" / "train.py"), "--data", str(tmp_path / "data"), *ARGS,
                          "--out", str(tmp_path / "x.pt"), "--lr", "-1"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode != 0
    assert run.stderr.count("error: lr must be a finite number > 0, got -1.0\n") == 1, run.stderr[-3000:]
    assert not (tmp_path / "x.pt").exists()
