#!/usr/bin/env python
"""Data-preparation benchmark: throughput by number of workers, side by side,
and peak memory on a large synthetic corpus.

    python scripts/benchmark_prepare.py                  # 64 MB for throughput, 1024 MB for memory
    python scripts/benchmark_prepare.py --workers 1,2,4 --memory-mb 4096 --json prepare.json

Writes a synthetic English-like corpus (random words from a small vocabulary,
in files of 64 MB), runs ``scripts/prepare_data.py`` on it as a user would,
once per worker count per round (the rounds interleaved: only ratios measured
side by side mean anything), and samples the memory of the whole process tree (the script and its
worker processes: their proportional set sizes, summed) every 20 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt2fn.errors import ArgumentParser, check_int, check_output_file, parse_int_list, run_cli
from gpt2fn.files import write_json

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is that it was for on are with as his they be at one have this from or had by not but what "
         "all were when we there can an your which their said if do will each about how up out them then she many "
         "some so these would other into has more her two like him see time could no make than first been its who "
         "now people my made over did down only way find use may water long little very after words called just").split()  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--throughput-mb", type=int, default=256, help="corpus size for the throughput rounds")
    p.add_argument("--memory-mb", type=int, default=1024, help="corpus size for the memory run (0 = skip)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the median is reported)")
    p.add_argument("--json", default=None, help="write all numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


def run(args) -> int:
    workers = parse_int_list("--workers", args.workers, example="1,2")
    check_int("--throughput-mb", args.throughput_mb)
    check_int("--memory-mb", args.memory_mb, low=0)
    check_int("--rounds", args.rounds)
    if args.json:
        check_output_file(args.json, "--json file")
    results: dict = {"cpus": os.cpu_count(), "throughput": {}, "memory": None}
    with tempfile.TemporaryDirectory(prefix="gpt2fn-bench-prepare-") as tmp:
        tmp = Path(tmp)
        small, tiny = write_corpus(tmp / "small", args.throughput_mb), write_corpus(tmp / "tiny", 0)
        times: dict[int, list[float]] = {w: [] for w in workers}
        startup: dict[int, list[float]] = {w: [] for w in workers}
        for r in range(args.rounds):
            for w in workers:
                times[w].append(run_prepare(small, tmp / f"out-{r}-{w}", w)[0])
                startup[w].append(run_prepare(tiny, tmp / f"tiny-{r}-{w}", w)[0])  # the same command on 4 KB
        median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print(f"prepare on {args.throughput_mb} MB of synthetic text, {os.cpu_count()} CPUs, median of {args.rounds} "
              "interleaved rounds (tokenizing: the run's time less the same command's on 4 KB, i.e. start-up):")  # fmt: skip
        print(f"  {'workers':>8s} {'run s':>7s} {'start-up s':>11s} {'MB/s':>7s} {'vs first':>9s} {'run vs first':>13s}")
        first = None
        for w in workers:
            run_s, start_s = median(times[w]), median(startup[w])
            # tokenizing must be most of the run for the difference to mean anything
            rate = args.throughput_mb / (run_s - start_s) if run_s > 2 * start_s else None
            first = first or (rate, run_s)
            results["throughput"][w] = {"run_s": run_s, "all_run_s": times[w], "startup_s": start_s,
                                        "all_startup_s": startup[w], "tokenizing_mb_per_s": rate}  # fmt: skip
            shown = f"{rate:7.1f} {rate / first[0]:8.2f}x" if rate and first[0] else f"{'-':>7s} {'-':>9s}"
            print(f"  {w:8d} {run_s:7.1f} {start_s:11.1f} {shown} {first[1] / run_s:12.2f}x")
        if any(r["tokenizing_mb_per_s"] is None for r in results["throughput"].values()):
            print("  (-: the corpus is too small for tokenizing to outweigh start-up; use a larger --throughput-mb)")
        if args.memory_mb:
            big = write_corpus(tmp / "big", args.memory_mb)
            seconds, peak = run_prepare(big, tmp / "out-big", workers[-1])
            results["memory"] = {"mb": args.memory_mb, "workers": workers[-1], "seconds": seconds, "peak_pss_mb": peak}
            print(f"  {args.memory_mb} MB with {workers[-1]} worker(s): {seconds:.0f} s, peak memory of the process tree "
                  f"{peak:.0f} MB (PSS: pages the forked workers share with the script counted once)")  # fmt: skip
    if args.json:
        print(f"wrote {write_json(args.json, results)}")
    return 0


def write_corpus(directory: Path, mb: int) -> list[Path]:
    """``mb`` MB of text in 64 MB files, from 16 different random 1 MB blocks
    (``mb`` = 0: one file of 4 KB)."""
    directory.mkdir()
    if mb == 0:
        (directory / "tiny.txt").write_text(("The first words of a tiny corpus.\n" * 120)[:4096])
        return [directory / "tiny.txt"]
    rng = random.Random(0)
    blocks = []
    for _ in range(16):
        lines, size = [], 0
        while size < 1 << 20:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))).capitalize() + rng.choice(".,;!?")
            lines.append(line)
            size += len(line) + 1
        blocks.append("\n".join(lines) + "\n\n")
    files = []
    for i in range(0, mb, 64):
        path = directory / f"part{i // 64:04d}.txt"
        with open(path, "w") as f:
            for _ in range(min(64, mb - i)):
                f.write(rng.choice(blocks))
        files.append(path)
    return files


def run_prepare(files: list[Path], out: Path, workers: int) -> tuple[float, float]:
    """(seconds, peak MB resident of the process tree) of one scripts/prepare_data.py run."""
    command = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *map(str, files), "--out", str(out),
               "--workers", str(workers), "--val_tokens", "100"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"prepare_data.py failed: {proc.stderr.read()[-2000:]}")
    return seconds, peak


def tree_rss_mb(pid: int) -> float:
    """Memory of ``pid`` and all its descendants, from /proc (Linux): their
    proportional set sizes (PSS) summed, so pages that forked workers share
    with their parent count once, not once per process."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [c for c, p in parents.items() if p == frontier[-1]]
        frontier.pop()
        tree.update(children)
        frontier.extend(children)
    total = 0.0
    for p in tree:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
        except (OSError, StopIteration):
            continue
    return total


if __name__ == "__main__":
    sys.exit(main())
