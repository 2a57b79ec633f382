"""What `perf.keep_freed_memory` does to a training step with glibc malloc: page faults, time and
peak memory per MiniLM-L6 step on MRPC, unpadded as nlpwf trains, glibc's defaults against
freed memory kept (nlpwf.runtime.allocator.keep_freed_memory).

    python benchmarks/malloc_reuse.py                  # 3 rounds, about 6 minutes on 2 cores
    python benchmarks/malloc_reuse.py --rounds 1 --dtype bf16

mallopt settings last for the life of a process, so each measurement is its own process; the two
settings alternate, round by round, so the machine's load hits both alike. Each process trains
3 warm-up batches and then times `--batches` more (the same batches, weights and RNG state in
every process). Prints a Markdown table; nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import step_profile as sp  # benchmarks/ is on sys.path when a script here runs
import train_speed as ts

WARMUP = 3


def one_process(mode: str, dtype: str, batches: int, threads: int) -> dict:
    """Runs in the child: train and measure, in this process, with `mode` malloc settings."""
    import torch

    from nlpwf.runtime import allocator

    kept = allocator.keep_freed_memory() if mode == "kept" else False
    torch.set_num_threads(threads)
    data, (cfg, task) = sp.training_batches(sp.DEFAULT_DATA, WARMUP + batches)
    model, optimizer = sp.make_model(cfg, task, unpadded=True)
    bf16 = dtype == "bf16"
    for inputs in data[:WARMUP]:
        sp.train_step(model, optimizer, inputs, bf16)
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for inputs in data[WARMUP:]:
        sp.train_step(model, optimizer, inputs, bf16)
    return {"mode": mode, "kept": kept, "s_per_step": (time.perf_counter() - start) / batches,
            "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / batches,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_process(args.child, args.dtype, args.batches, args.threads)))
        return
    env = {**os.environ, **ts.OFFLINE_ENV, "OMP_NUM_THREADS": str(args.threads)}
    runs = []
    for r in range(args.rounds):
        for mode in ("default", "kept"):
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, "--dtype", args.dtype,
                                  "--batches", str(args.batches), "--threads", str(args.threads)],
                                 capture_output=True, text=True, env=env, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {r + 1} {mode}: {runs[-1]['s_per_step'] * 1000:.0f} ms/step", file=sys.stderr, flush=True)
    print(f"MiniLM-L6, MRPC, batch 16, unpadded, {args.dtype}, {args.threads} threads, {args.batches} steps per process, "
          f"{args.rounds} rounds; load average after {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| glibc malloc | ms/step, each round | mean ms/step | page faults/step | peak RSS MB |")
    print("|---|---|---:|---:|---:|")
    mean = {}
    for mode in ("default", "kept"):
        mine = [x for x in runs if x["mode"] == mode]
        mean[mode] = sum(x["s_per_step"] for x in mine) / len(mine)
        each = ", ".join(f"{x['s_per_step'] * 1000:.0f}" for x in mine)
        print(f"| {mode} | {each} | {mean[mode] * 1000:.0f} | "
              f"{sum(x['faults_per_step'] for x in mine) / len(mine):,.0f} | {max(x['peak_rss_mb'] for x in mine):,.0f} |")
    print(f"\ndefault ÷ kept: {mean['default'] / mean['kept']:.2f}x")


if __name__ == "__main__":
    main()
