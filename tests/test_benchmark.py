"""scripts/benchmark.py runs end to end (tiny model, few tokens) and writes
every number it promises, as JSON and as a plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT

from gpt2fn.device import ONEDNN, ONEDNN_ROWS


def test_benchmark_writes_json_and_plot(small_ref, tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", str(small_ref.directory),
         "--dtypes", "float32,int8", "--new-tokens", "12", "--batch", "3", "--rounds", "1", "--lengths", "16,64", "--tokens-per-call", "2",
         "--drafts", "int8,lookup", "--draft-tokens", "4", "--adaptive-draft", "4", "--draft-vocab", "300", "--beams", "3",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out_json.read_text())
    assert set(results["limit"]) == {"float32", "int8"}
    assert results["limit"]["int8"]["weight_mb"] < results["limit"]["float32"]["weight_mb"] / 3
    names = set(results["generation"])
    assert {"gpt2fn eager float32", "gpt2fn compiled float32", "gpt2fn compiled int8", "gpt2fn eager float32 batch 3",
            "gpt2fn compiled float32 batch 3", "gpt2fn compiled int8 batch 3", "transformers default float32"} <= names
    assert "gpt2fn eager int8 batch 3" not in names  # eager batches for the first dtype only
    assert {"gpt2fn compiled, 2 a call float32", "gpt2fn compiled, 2 a call int8"} <= names
    assert "2 a call / one a call, compiled:  float32 " in run.stdout
    batch = results["generation"]["gpt2fn compiled float32 batch 3"]
    assert (batch["system"], batch["mode"], batch["dtype"], batch["batch"]) == ("gpt2fn", "compiled", "float32", 3)
    assert "batch throughput: compiled int8 batch 3 / compiled batch 1 = " in run.stdout
    spec = results["generation"]["gpt2fn speculative int8 k=4 float32"]
    assert 0 <= spec["acceptance_rate"] <= 1 and 1 <= spec["tokens_per_pass"] <= 5
    assert "speculative int8 k=4: " in run.stdout and "the float32 streaming limit; acceptance" in run.stdout
    spec_batch = results["generation"]["gpt2fn speculative int8 k=4 float32 batch 3"]  # the whole draft, its largest k
    assert spec_batch["batch"] == 3 and 0 <= spec_batch["acceptance_rate"] <= 1 and spec_batch["drafted_per_pass"] == 4
    assert "speculative int8 k=4 batch 3: " in run.stdout and "plain compiled float32 batch 3" in run.stdout
    assert "gpt2fn speculative int8 v300 k=4 float32 batch 3" not in names
    adaptive = results["generation"]["gpt2fn speculative int8 k<=4 adaptive float32"]
    assert 1 <= adaptive["drafted_per_pass"] <= 4 and spec["drafted_per_pass"] == 4
    cut = results["generation"]["gpt2fn speculative int8 v300 k=4 float32"]  # the draft over ids 0..299
    assert 0 <= cut["acceptance_rate"] <= 1 and "gpt2fn speculative int8 v300 k<=4 adaptive float32" in names
    lookup = results["generation"]["gpt2fn speculative lookup k=4 float32"]  # prompt lookup: whole, adaptive, batch
    assert 0 <= lookup["acceptance_rate"] <= 1 and 1 <= lookup["drafted_per_pass"] <= 4
    assert {"gpt2fn speculative lookup k<=4 adaptive float32", "gpt2fn speculative lookup k=4 float32 batch 3"} <= names
    assert not any("lookup v300" in name for name in names)  # no model, no head to cut
    assert all(g["tokens_per_s"] > 0 for g in results["generation"].values())
    assert results["graphs_compiled_during_timed_runs"] == 0
    assert set(results["sweep"]["tokens_per_s"]) == {"eager, cache", "compiled, cache", "eager, no cache", "compiled, no cache"}
    assert all(c["cold_s"] > 0 and c["warm_s"] > 0 for c in results["compile"].values()) and results["compile_startup_s"] > 0
    assert "(after inductor's one-off start-up in this process, " in run.stdout
    if ONEDNN:  # the few-row products few_rows chooses between, both timed
        assert set(results["products"]) == {"1", "2", "3", "4", "5", "8", "9", "12", "16", "17"}
        assert all(t["mkl"] > 0 and t["onednn"] > 0 for t in results["products"].values())
        rule = "every product" if ONEDNN_ROWS[0] == 1 else "4-16 rows with weights of at least 1048576 elements"
        assert f"(few_rows takes oneDNN for {rule}):" in run.stdout
    assert "compiled / eager" in run.stdout and "vs hf default" in run.stdout
    beams = results["beams"]
    assert beams["beams"] == 3 and set(beams["runs"]) == {"gpt2fn eager float32", "gpt2fn compiled float32",
                                                           "gpt2fn compiled int8", "transformers float32"}
    assert all(r["seconds"] > 0 for r in beams["runs"].values())
    assert beams["runs"]["gpt2fn eager float32"]["same_best_beam"] and beams["runs"]["gpt2fn compiled float32"]["same_best_beam"]
    assert "Beam search, 3 beams: 8-token prompt + 12 new tokens, seconds per search" in run.stdout
    assert "x vs transformers  same best beam as transformers" in run.stdout
    assert results["command"].startswith("python scripts/benchmark.py --model")
    assert out_png.stat().st_size > 10_000 and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_alternates_the_order_of_its_runs_every_round():
    """A run timed right after another one can gain or lose a few percent
    from it, so no variant always follows the same one: the order reverses
    every round, and each variant's median is over its own runs."""
    from conftest import load_script

    bench = load_script("benchmark")
    order = []
    contenders = [bench.Contender("gpt2fn", mode, "float32", 1, lambda mode=mode: order.append(mode) or len(order))
                  for mode in ("eager", "compiled", "default")]  # fmt: skip
    results = bench.measure_generation(contenders, {}, torch.device("cpu"), rounds=3)
    assert order[0] == "compiled"  # compiled runs warm up once before the timed rounds
    assert order[1:] == ["eager", "compiled", "default", "default", "compiled", "eager", "eager", "compiled", "default"]
    assert results["generation"]["gpt2fn eager float32"]["all"] == [2, 7, 8]
    assert results["generation"]["gpt2fn compiled float32"]["tokens_per_s"] == 6  # the median of 3, 6, 9


def test_the_benchmark_points_inductor_at_a_fresh_cache_in_its_run_only():
    """A cold compile needs a fresh inductor cache, which main() sets (unless
    --warm-cache, spelt either way); importing the script sets nothing, or a
    test process importing it would compile everything cold afterwards."""
    from conftest import load_script

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    bench = load_script("benchmark")
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before
    assert bench.parse_args(["--warm_cache"]).warm_cache and not bench.parse_args([]).warm_cache


def test_benchmark_train_writes_json(tmp_path, capsys):
    from conftest import load_script

    out = tmp_path / "sub" / "train.json"
    code = load_script("benchmark_train").main(["--batch_size", "2", "--block_size", "16", "--steps", "1", "--rounds", "2",
                                                "--device", "cpu", "--json", str(out)])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["variants"]) == {"gpt2fn eager", "gpt2fn eager, deterministic off", "gpt2fn compiled",
                                        "transformers eager", "transformers compiled"}  # fmt: skip
    assert all(len(v["all_step_s"]) == 2 and v["tokens_per_s"] > 0 for v in results["variants"].values())
    assert results["peak_flops"] is None and all(v["mfu"] is None for v in results["variants"].values())  # a CPU
    # 6 x (4 blocks of 12 D^2 + 13 D, ln_f, wte) + 12 x layers x D x T; wpe not counted
    assert results["flops_per_token"] == 6 * (4 * 12 * 128**2 + 4 * 13 * 128 + 2 * 128 + 50257 * 128) + 12 * 4 * 128 * 16
    assert "vs gpt2fn eager" in stdout and "transformers compiled" in stdout


def test_benchmark_prepare_writes_json(tmp_path, capsys):
    from conftest import load_script

    out = tmp_path / "prepare.json"
    code = load_script("benchmark_prepare").main(["--throughput-mb", "1", "--memory-mb", "1", "--rounds", "1",
                                                  "--json", str(out)])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["throughput"]) == {"1", "2"}
    for r in results["throughput"].values():  # on 1 MB, start-up may outweigh tokenizing: then no rate is claimed
        assert r["run_s"] > 0 and r["startup_s"] > 0
        assert r["tokenizing_mb_per_s"] is None or r["tokenizing_mb_per_s"] > 0
        assert (r["tokenizing_mb_per_s"] is None) == (r["run_s"] <= 2 * r["startup_s"])
    assert 50 < results["memory"]["peak_pss_mb"] < 4000 and results["memory"]["workers"] == 2
    assert "vs first" in stdout and "peak memory of the process tree" in stdout
