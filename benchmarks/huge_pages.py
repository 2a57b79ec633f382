"""What `perf.huge_pages` does to a training step: glibc's heap on 2 MB pages (runtime/hugepages.py)
against 4 kB pages, MiniLM-L6 on MRPC, the unpadded model `experiment=mrpc_minilm` trains.

    python benchmarks/huge_pages.py                      # bf16, 6 pairs, about 8 minutes on 2 cores
    python benchmarks/huge_pages.py --dtypes fp32,bf16 --pairs 4

Each measurement is a fresh process set up as a training job is (runtime.allocator: glibc keeps
freed memory), which trains step_profile.py's step (autocast, backward, clipping, fused AdamW)
on the first `--batches` MRPC batches: a round to grow the heap, `--rounds` rounds timed
("before"), then `runtime.hugepages.back_heap` (as the training callback calls it after the
first step) or nothing, then `--rounds` rounds timed again ("after"); each side is its best
round. Why before and after in one process: the same code in two fresh processes differs by up
to 10% in step time on this shared VM (where its memory landed, the load of the minute), more
than the effect measured. So the figure is each process's after / before, and the effect is
the control processes' median of it divided by the treated ones' (above 1: huge pages faster).
The two kinds alternate in pairs, the order flipping each pair. Also recorded: the heap's size,
how much of it ended on huge pages, and the seconds the collapse took. Writes
results/huge_pages.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "mrpc"
KINDS = ("4 kB", "huge")


def one(kind: str, dtype: str, data: Path, batches: int, rounds: int, threads: int | None) -> dict:
    """In this process: set up, grow the heap, put it on huge pages or not, time `rounds` rounds."""
    import step_profile as sp  # benchmarks/ is on sys.path when a script here runs
    import torch

    from nlpwf.runtime import allocator, hugepages
    from nlpwf.runtime import threads as nthreads

    torch.set_num_threads(threads or nthreads.physical_cores())
    allocator.prepare(announce=False)  # as runtime.process sets a training process up
    inputs, (cfg, task) = sp.training_batches(data, batches)
    model, optimizer = sp.make_model(cfg, task, unpadded=True)
    bf16 = dtype == "bf16"
    def best_round() -> float:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for b in inputs:
                sp.train_step(model, optimizer, b, bf16)
            times.append((time.perf_counter() - t) / len(inputs))
        return min(times)

    for b in inputs:  # the heap grows to what every later round reuses
        sp.train_step(model, optimizer, b, bf16)
    before = best_round()
    heap = hugepages.HeapPages()
    if kind == "huge":
        hugepages.back_heap(heap)
    after = best_round()
    start, end = hugepages.heap_span() or (0, 0)
    return {"before_s": before, "after_s": after, "ratio": after / before, "heap_mb": (end - start) >> 20,
            "huge_mb": hugepages.huge_bytes(start, end) >> 20 if end else 0, "collapse_s": heap.seconds,
            "status": heap.status, "threads": torch.get_num_threads()}


def run(kind: str, dtype: str, args) -> dict:
    """`one` in a fresh process."""
    cmd = [sys.executable, __file__, "--one", kind, "--dtypes", dtype, "--data", str(args.data),
           "--batches", str(args.batches), "--rounds", str(args.rounds)] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {dtype} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def effect(pairs: list[dict]) -> float:
    """Control processes' median after/before over the treated ones': above 1, huge pages are faster."""
    return statistics.median(p["4 kB"]["ratio"] for p in pairs) / statistics.median(p["huge"]["ratio"] for p in pairs)


def render(res: dict) -> str:
    lines = [f"# Huge pages for the heap, {res['date']}", "",
             f"Machine: {res['isa']}, {res['threads']} threads, torch {res['torch']}, kernel {res['kernel']} (THP {res['thp']}). "
             f"Load average before/after: {res['load_before']} / {res['load_after']}. Command: `{res['command']}`.", "",
             "MiniLM-L6 on MRPC, the unpadded model, step_profile.py's step. Each process times its best round before "
             "and after a point where the treated processes put glibc's heap on huge pages (as `perf.huge_pages` does "
             "after the first step) and the control processes do nothing; after / before is each process's ratio, and "
             "the speedup is the controls' median ratio over the treated ones'.", "",
             "| dtype | pairs | control after / before (median) | treated after / before (median) | treated ratios | "
             "speedup | treated below every control? | s/step, treated after (median) | heap MB | on huge pages MB | collapse s |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    for dtype, pairs in res["runs"].items():
        control, treated = [p["4 kB"] for p in pairs], [p["huge"] for p in pairs]
        below = max(t["ratio"] for t in treated) < min(c["ratio"] for c in control)
        lines.append(
            f"| {dtype} | {len(pairs)} | {statistics.median(c['ratio'] for c in control):.3f} | "
            f"{statistics.median(t['ratio'] for t in treated):.3f} | "
            f"{min(t['ratio'] for t in treated):.3f}-{max(t['ratio'] for t in treated):.3f} | {effect(pairs):.3f}x | "
            f"{'yes' if below else 'no'} | {statistics.median(t['after_s'] for t in treated):.3f} | "
            f"{statistics.median(t['heap_mb'] for t in treated):.0f} | {statistics.median(t['huge_mb'] for t in treated):.0f} | "
            f"{statistics.median(t['collapse_s'] for t in treated):.1f} |")
    lines += ["", "Per pair, s/step before → after (control; treated):", ""]
    for dtype, pairs in res["runs"].items():
        lines.append(f"- {dtype}: " + "; ".join(
            f"{p['4 kB']['before_s']:.3f} → {p['4 kB']['after_s']:.3f}, {p['huge']['before_s']:.3f} → {p['huge']['after_s']:.3f}"
            for p in pairs))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GLUE MRPC folder")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    p.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)  # internal: one measurement, in this process
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import train_speed as ts

    os.environ.update(ts.OFFLINE_ENV)
    if args.one:
        print(json.dumps(one(args.one, args.dtypes, args.data, args.batches, args.rounds, args.threads)))
        return
    import torch

    from nlpwf.runtime import hugepages, isa

    res = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "isa": isa.detect().summary(),
           "torch": torch.__version__, "kernel": os.uname().release, "thp": hugepages.kernel_mode(),
           "command": "python benchmarks/huge_pages.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()), "runs": {}}
    for dtype in args.dtypes.split(","):
        pairs = []
        for i in range(args.pairs):
            order = KINDS if i % 2 == 0 else KINDS[::-1]
            pair = {kind: run(kind, dtype, args) for kind in order}
            print(f"{dtype} pair {i + 1}: control {pair['4 kB']['before_s']:.3f} -> {pair['4 kB']['after_s']:.3f} s, "
                  f"treated {pair['huge']['before_s']:.3f} -> {pair['huge']['after_s']:.3f} s ({pair['huge']['status']})", flush=True)
            pairs.append(pair)
        res["runs"][dtype] = pairs
        res["threads"] = pairs[0]["huge"]["threads"]
    res["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "huge_pages.json").write_text(json.dumps(res, indent=1))
    md = render(res)
    (args.out / "huge_pages.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
