"""The batch-1 latency tail of a saved model in process, with no server: what the machine allows.

    python benchmarks/serve_tail.py --model DIR [--data dataset=paraphrase_sample] [--threads 1 2] [--rounds 2]

serve.py's p99 / p50 at concurrency 1 with single texts (target ≤ 1.5) holds the server's tail
and the machine's. This measures the machine's alone, so that a run of serve.py can be read
against it. Each thread count runs in a fresh process, and the processes alternate over
--rounds, so that load from elsewhere hits all of them alike. In each process, at batch 1:
- first pass: every item of the eval split through scoring.predictions (what the server's run()
  calls), split into the items whose token length the process had not seen yet and the rest: a
  worker's first request of a length builds kernels for its shapes;
- warm pass: the same items again, all lengths seen;
- fixed input: one item of median length through the model's forward alone (no tokenizer, no
  softmax), --calls times back to back: what remains is the model and the machine;
- minor page faults and involuntary context switches per call, read around every call.
Writes benchmarks/results/serve_tail.md with the CPU's ISA.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from serve import eval_pairs, quantile  # noqa: E402  (benchmarks/serve.py)

RESULTS = HERE / "results" / "serve_tail.md"


def timed(fn) -> tuple[float, int, int]:
    """(seconds, minor page faults, involuntary context switches) of one call."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return took, after.ru_minflt - before.ru_minflt, after.ru_nivcsw - before.ru_nivcsw


def stats(calls: list[tuple[float, int, int]]) -> dict | None:
    if not calls:  # e.g. every item of a short --items run had a length of its own
        return None
    seconds = [c[0] for c in calls]
    p50, p99 = statistics.median(seconds), quantile(seconds, 0.99)
    return {"calls": len(calls), "p10_ms": 1000 * quantile(seconds, 0.10), "p50_ms": 1000 * p50,
            "p90_ms": 1000 * quantile(seconds, 0.90), "p99_ms": 1000 * p99, "ratio": p99 / p50,
            "faults_per_call": sum(c[1] for c in calls) / len(calls), "switches_per_call": sum(c[2] for c in calls) / len(calls)}


def columns(items: list[tuple[str, str | None]]) -> tuple[list[str], ...]:
    """Items as the text columns Classifier takes: (texts,) or (texts, pairs)."""
    texts = [t for t, _ in items]
    return (texts,) if items[0][1] is None else (texts, [p for _, p in items])


def worker(args) -> dict:
    """The measurements of one process with `args.worker` torch threads."""
    import torch

    from nlpwf.inference import scoring
    from nlpwf.inference.load import load_classifier
    from nlpwf.runtime import threads

    threads.set_threads(args.worker)
    model = load_classifier(str(args.model), "benchmark", 128, "fp32", compile=True)
    items = eval_pairs(args.data, args.items)
    lengths = [len(ids) for ids in model.encode(*columns(items))["input_ids"]]
    scoring.predictions(model, items[:1], 16)  # the graph's first call (compilation) is not a length's first request
    seen, new, repeat = {lengths[0]}, [], []
    for item, length in zip(items, lengths):
        call = timed(lambda: scoring.predictions(model, [item], 16))
        (repeat if length in seen else new).append(call)
        seen.add(length)
    warm = [timed(lambda: scoring.predictions(model, [item], 16)) for item in items]
    median_item = items[sorted(range(len(items)), key=lengths.__getitem__)[len(items) // 2]]
    _, inputs = next(model.batches(*columns([median_item])))
    with torch.inference_mode():
        for _ in range(20):
            model.forward(*inputs)
        fixed = [timed(lambda: model.forward(*inputs)) for _ in range(args.calls)]
    return {"threads": args.worker, "new_lengths": stats(new), "seen_lengths": stats(repeat), "warm": stats(warm),
            "fixed": stats(fixed), "fixed_tokens": int(inputs[0].shape[1]), "backend": model.name}


def run_worker(args, n: int) -> dict:
    cmd = [sys.executable, __file__, "--model", str(args.model), "--data", *args.data, "--items", str(args.items),
           "--calls", str(args.calls), "--worker", str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {n}-thread process failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


ROWS = (("warm", "real items, every length seen"), ("seen_lengths", "first pass, lengths seen before"),
        ("new_lengths", "first pass, a length's first request"), ("fixed", "one input, forward alone"))


def write(results: list[dict], args) -> None:
    from nlpwf.runtime import isa

    head = ("| threads | round | what | calls | p10 ms | p50 ms | p90 ms | p99 ms | p99 / p50 | page faults / call | "
            "involuntary switches / call |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = []
    for i, r in enumerate(results):
        for key, what in ROWS:
            s = r[key]
            if s is None:
                continue
            lines.append(f"| {r['threads']} | {i // len(args.threads) + 1} | {what} | {s['calls']} | {s['p10_ms']:.2f} | "
                         f"{s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['p99_ms']:.2f} | **{s['ratio']:.2f}** | "
                         f"{s['faults_per_call']:.1f} | {s['switches_per_call']:.2f} |")
    text = "\n".join([
        "# The batch-1 tail in process, before any server", "",
        f"Produced by `python benchmarks/serve_tail.py --model {args.model} --data {' '.join(args.data)} --threads "
        f"{' '.join(map(str, args.threads))} --rounds {args.rounds} --items {args.items} --calls {args.calls}`.", "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; 1-minute load average at the start "
        f"{args.load:.1f}, at the end {os.getloadavg()[0]:.1f}",
        f"- CPU: {isa.detect().summary()}",
        f"- Model: {args.model} ({results[0]['backend']}); the fixed input has {results[0]['fixed_tokens']} tokens",
        "- serve.py's tail target (p99 / p50 ≤ 1.5 at concurrency 1, single texts) cannot be shown on a machine whose "
        "warm rows here are above it: the server only adds to them.", "", head, *lines, ""])
    RESULTS.write_text(text)
    print(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model/ or model_int8/ folder")
    parser.add_argument("--data", nargs="+", default=["dataset=paraphrase_sample"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--items", type=int, default=300, help="items of the eval split, each a batch-1 request")
    parser.add_argument("--calls", type=int, default=1000, help="calls of the fixed input")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # internal: one process's measurements
    args = parser.parse_args(argv)
    args.model = args.model.resolve()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.load = os.getloadavg()[0]
    results = [run_worker(args, n) for _ in range(args.rounds) for n in args.threads]
    write(results, args)


if __name__ == "__main__":
    main()
