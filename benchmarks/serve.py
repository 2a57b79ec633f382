"""Serving benchmark: Azure ML's inference server with nlpwf's scoring script, loaded over loopback.

    python benchmarks/serve.py --model DIR [--data dataset=mrpc dataset.data_dir=../shared/data/mrpc]
                               [--int8 DIR] [--work /tmp/nlpwf_serve] [--requests 300] [--seconds 60]

Steps, unattended:
- INT8: stage=quantize stage.backend=auto (the backend this CPU's ISA picks) on --model, unless --int8
  names a quantize job's model_int8/ already;
- accuracy: stage=evaluate on the fp32 and the INT8 folder (the dataset's eval split);
- load: for fp32 and INT8, one server (stage=serve's settings: 1 worker, batch limit 16, fp32 eager or
  the INT8 graph compiled and warmed up in init), then for batch-1 and batch-16 requests at
  concurrency 1, 4 and 16: requests until --requests are answered or --seconds have passed (a bounded
  loop), real pairs of the eval split; requests/s, texts/s, p50/p95/p99 latency;
- overhead: batch-16 requests to the server at concurrency 1 alternated, one by one, with the same
  batches scored in this process through inference/ (scoring.predictions, the function the server's
  run() calls), so that load from elsewhere hits both alike; the ratio of the two medians, and the
  split of each request's time read from the server's `x-ms-run-fn-exec-ms` (run() inside the worker)
  against the client's (the rest: connection, HTTP, Flask);
- tail floor: the batch-1 items of the concurrency-1 row scored back to back in this process, whose
  p99 / p50 is what the model and the machine give before any server is involved.
Writes benchmarks/results/serve.md (date, CPU and ISA, versions, the load average, the targets).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from nlpwf import models  # noqa: E402
from nlpwf.inference import scoring, server  # noqa: E402
from nlpwf.inference.load import load_classifier  # noqa: E402
from nlpwf.runtime import isa, threads  # noqa: E402

RESULTS = HERE / "results" / "serve.md"
MAX_BATCH = 16
GAP_S = 0.05  # idle time before every call, server or in-process, of the overhead measurement


def nlpwf(job: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "nlpwf", *overrides, f"hydra.run.dir={job}"]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"job failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads((job / "metrics.json").read_text())


def eval_pairs(data: list[str], n: int) -> list[tuple[str, str | None]]:
    """n items of the eval split (texts or pairs), read back from an evaluate job's own data loading."""
    from hydra import compose, initialize_config_dir

    from nlpwf import CONF_DIR
    from nlpwf.data.splits import load_splits

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=data)
    _, splits = load_splits(cfg.dataset)
    split = splits["eval"]
    pairs = "sentence2" in split.column_names
    rows = [split[i % len(split)] for i in range(n)]
    return [(r["sentence1"], r["sentence2"] if pairs else None) for r in rows]


def body(items: list[tuple[str, str | None]]) -> bytes:
    return json.dumps({"inputs": [{"text": t, "text_pair": p} if p is not None else t for t, p in items]}).encode()


def post(port: int, payload: bytes) -> tuple[float, float]:
    """(seconds the client waited, seconds run() took in the server's worker, as azmlinfsrv reports it)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(server.HOST, port, timeout=300)
    try:
        conn.request("POST", "/score", payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"server answered {response.status}")
    finally:
        conn.close()
    return time.perf_counter() - start, float(response.getheader("x-ms-run-fn-exec-ms") or "nan") / 1000


def load(port: int, payloads: list[bytes], concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """`concurrency` clients in a closed loop until max_requests are answered or max_seconds passed."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    counter = iter(range(max_requests))

    def client():
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            took, _ = post(port, payloads[i % len(payloads)])
            with lock:
                latencies.append(took)

    start = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"seconds": time.perf_counter() - start, "latencies": latencies}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(name: str, batch: int, concurrency: int, run: dict) -> dict:
    lat = run["latencies"]
    return {"model": name, "batch": batch, "concurrency": concurrency, "requests": len(lat),
            "requests_per_s": len(lat) / run["seconds"], "texts_per_s": batch * len(lat) / run["seconds"],
            "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * quantile(lat, 0.95), "p99_ms": 1000 * quantile(lat, 0.99)}


def serve_and_load(name: str, folder: Path, work: Path, items: list, args) -> tuple[list[dict], dict | None]:
    """The load rows of one server, and its overhead timings at batch 16 (None when batch 16 is not run)."""
    settings = scoring.Settings(max_batch=MAX_BATCH, precision="fp32", threads=args.threads)
    started = server.start(folder, 0, settings.env(), work / f"server_{name}.log")
    rows, timings = [], None
    try:
        server.wait_ready(started, 1800)
        for batch in args.batches:
            payloads = [body(items[i:i + batch]) for i in range(0, len(items) - batch + 1, batch)]
            for concurrency in args.concurrency:
                load(started.port, payloads, concurrency, max(4, concurrency), 30)  # warm: connections, caches
                rows.append(summary(name, batch, concurrency, load(started.port, payloads, concurrency, args.requests, args.seconds)))
                print(rows[-1], flush=True)
        if 16 in args.batches:
            timings = overhead(started.port, folder, items, 16, args)
    finally:
        server.stop(started)
    return rows, timings


def overhead(port: int, folder: Path, items: list, batch: int, args) -> dict:
    """The server's time per batch and scoring.predictions' in this process (what run() calls), in ms:
    medians of the same batches, server and in-process alternated one by one (and which goes first
    alternates too), so that load from elsewhere hits both alike. Every call, on either side, starts
    after the same idle gap: on 2 cores, what one side still does after answering (the server's
    logging, OpenMP threads spinning down) would otherwise land in the other side's time, and a call
    right after another of its own side would find warm caches and spinning threads the other lacks.
    Also the in-process batch-1 tail on the concurrency-1 row's items, back to back as that row is."""
    threads.set_threads(threads.threads_per_process(args.threads or None, 1))
    classifier = load_classifier(str(folder), "benchmark", 128, "fp32", compile=True)
    batches = [items[i:i + batch] for i in range(0, len(items) - batch + 1, batch)]
    for b in [items[:1], items[:2]] + batches[:4]:
        scoring.predictions(classifier, b, MAX_BATCH)

    def local(b) -> float:
        start = time.perf_counter()
        scoring.predictions(classifier, b, MAX_BATCH)
        return time.perf_counter() - start

    served, inside, here, deadline = [], [], [], time.monotonic() + 3 * args.seconds
    for i in range(args.requests):
        if time.monotonic() > deadline:
            break
        b = batches[i % len(batches)]
        for side in ("here", "server") if i % 2 else ("server", "here"):
            time.sleep(GAP_S)
            if side == "here":
                here.append(local(b))
            else:
                took, run_s = post(port, body(b))
                served.append(took)
                inside.append(run_s)
    single = [local(items[i % len(items):i % len(items) + 1]) for i in range(args.requests)]
    median = statistics.median
    times = {"server_ms": 1000 * median(served), "run_ms": 1000 * median(inside), "in_process_ms": 1000 * median(here),
             "outside_run_ms": 1000 * median([a - b for a, b in zip(served, inside)]), "batches": len(here),
             "single_p50_ms": 1000 * median(single), "single_p99_ms": 1000 * quantile(single, 0.99)}
    print(f"overhead: {times}", flush=True)
    return times


def versions() -> str:
    probe = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in ('azureml-inference-server-http', "
             "'gunicorn', 'torch', 'transformers', 'neural-compressor')))")
    out = subprocess.run([server.python_for_server(), "-c", probe], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    return f"{out} (the server's environment, .venv-serve); nlpwf {commit}"


def row(r: dict) -> str:
    return (f"| {r['model']} | {r['batch']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | "
            f"{r['texts_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} |")


def find(rows: list[dict], model: str, batch: int, concurrency: int) -> dict | None:
    return next((r for r in rows if (r["model"], r["batch"], r["concurrency"]) == (model, batch, concurrency)), None)


def targets(rows: list[dict], accuracy: dict, overheads: dict) -> list[str]:
    lines = []
    fp32, int8 = find(rows, "fp32", 16, 4), find(rows, "int8", 16, 4)
    if fp32 and int8:
        ratio, points = int8["texts_per_s"] / fp32["texts_per_s"], 100 * (accuracy["fp32"] - accuracy["int8"])
        lines.append(f"- INT8 / fp32 throughput, concurrency 4, batch-16 requests: **{ratio:.2f}×** (target ≥ 2×), "
                     f"accuracy {100 * accuracy['int8']:.2f}% vs {100 * accuracy['fp32']:.2f}% ({points:+.2f} points lost; target ≤ 1).")
    for name, t in overheads.items():
        share = t["server_ms"] / t["in_process_ms"] - 1
        lines.append(f"- Server overhead at batch 16, {name}: **{100 * share:+.1f}%** of in-process time (target ≤ 15%): "
                     f"{t['server_ms']:.1f} against {t['in_process_ms']:.1f} ms, medians over {t['batches']} batches, the same "
                     f"batches alternated one by one with {1000 * GAP_S:.0f} ms idle before each call. Per request, "
                     f"{t['outside_run_ms']:.1f} ms ({100 * t['outside_run_ms'] / t['in_process_ms']:.1f}%) is outside run() "
                     f"(connection, HTTP, Flask); run() in the worker took {t['run_ms']:.1f} ms.")
    for name in ("fp32", "int8"):
        r, t = find(rows, name, 1, 1), overheads.get(name)
        if r:
            floor = (f"; the same items in process, back to back: {t['single_p99_ms'] / t['single_p50_ms']:.2f} "
                     f"({t['single_p99_ms']:.1f} / {t['single_p50_ms']:.1f} ms)" if t else "")
            lines.append(f"- p99 / p50 at concurrency 1, batch-1 requests, {name}: **{r['p99_ms'] / r['p50_ms']:.2f}** "
                         f"(target ≤ 1.5){floor}.")
    return lines


def write(rows, accuracy, overheads, backend, args) -> None:
    cpu = isa.detect()
    head = ("| model | batch | concurrency | requests | requests/s | texts/s | p50 ms | p95 ms | p99 ms |\n"
            "|---|---|---|---|---|---|---|---|---|")
    text = "\n".join([
        "# Serving: Azure ML's inference server with nlpwf's scoring script",
        "", f"Produced by `python benchmarks/serve.py --model {args.model} --data {' '.join(args.data)} --threads {args.threads} "
        f"--requests {args.requests} --seconds {args.seconds:.0f}`.", "",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; 1-minute load average at the start "
        f"{args.load:.1f}, at the end {os.getloadavg()[0]:.1f} (other work on the machine slows every row)",
        f"- CPU: {cpu.summary()}; {threads.physical_cores()} physical cores, 1 server worker with "
        f"{args.threads or threads.physical_cores()} torch thread(s), the same in process",
        f"- Versions: {versions()}",
        f"- INT8: backend {backend} (stage.backend=auto on this ISA), inductor-compiled and warmed up in init(); fp32: eager",
        f"- Load: loopback, closed loop, a new connection per request (gunicorn's sync workers close them), up to "
        f"{args.requests} requests or {args.seconds:.0f} s per row, real pairs of the eval split; requests beyond the one "
        "in service wait in the server's listen queue, as on an instance with max_concurrent_requests_per_instance above 1",
        "", head, *[row(r) for r in rows], "", "## Targets", "", *targets(rows, accuracy, overheads), ""])
    RESULTS.write_text(text)
    print(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a training job's model/ folder")
    parser.add_argument("--int8", type=Path, help="a quantize job's model_int8/ (default: quantize --model here)")
    parser.add_argument("--data", nargs="+", default=["dataset=mrpc", "dataset.data_dir=../shared/data/mrpc"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/nlpwf_serve"))
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the server's worker (0: the physical cores)")
    args = parser.parse_args(argv)
    args.load = os.getloadavg()[0]
    args.model = args.model.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.int8 is None:
        nlpwf(args.work / "quantize", "stage=quantize", f"stage.model_path={args.model}", "stage.backend=auto", *args.data)
        args.int8 = args.work / "quantize" / "model_int8"
    folders = {"fp32": args.model, "int8": args.int8.resolve()}
    accuracy = {name: nlpwf(args.work / f"evaluate_{name}", "stage=evaluate", f"stage.model_path={folder}", "precision=fp32",
                            *args.data)["eval_accuracy"] for name, folder in folders.items()}
    items = eval_pairs(args.data, 16 * 32)
    rows, overheads = [], {}
    for name, folder in folders.items():
        served, timings = serve_and_load(name, folder, args.work, items, args)
        rows += served
        if timings is not None:
            overheads[name] = timings
    backend = scoring.describe(folders["int8"])["backend"] if models.is_quantized(folders["int8"]) else "?"
    write(rows, accuracy, overheads, backend, args)


if __name__ == "__main__":
    main()
