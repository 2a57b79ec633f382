"""Quantize-and-serve benchmark on MRPC: accuracy and latency of every backend, predict at scale.

    python benchmarks/quantize.py --model DIR --data-dir ../shared/data/mrpc [--work /tmp/nlpwf_q] [--steps ...]

Steps (all by default), each a `python -m nlpwf` job under --work:
- quantize: stage=quantize for each INT8 backend -> fp32 and INT8 accuracy on MRPC dev;
- latency: stage=benchmark -> latency/throughput of fp32, bf16 and the INT8 backends at batch 1
  and 16 in one run, backends alternating;
- predict: a file of --pairs pairs (MRPC train pairs repeated, written under --work, never in the
  repo) through stage=predict with the torch_dynamic model -> pairs/s and peak RSS.
Writes benchmarks/results/quantize.md from the jobs' metrics.json files.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "quantize.md"
INT8_BACKENDS = ("inc_static", "inc_dynamic", "torch_dynamic")


def nlpwf(job: Path, *overrides: str) -> dict:
    """One job; its metrics.json (or the error it printed, failing this script)."""
    cmd = [sys.executable, "-m", "nlpwf", *overrides, f"hydra.run.dir={job}"]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 2) or not (job / "metrics.json").is_file():
        sys.exit(f"job failed ({proc.returncode}): {proc.stderr[-3000:]}")
    metrics = json.loads((job / "metrics.json").read_text())
    if proc.returncode == 2:  # e.g. the INT8 model lost more than the tolerance: still reported
        metrics["error"] = [line for line in proc.stderr.splitlines() if line.startswith("nlpwf: error:")][-1]
    return metrics


def data_overrides(args) -> list[str]:
    return ["dataset=mrpc", f"dataset.data_dir={args.data_dir}"]


def step_quantize(args) -> dict:
    out = {}
    for backend in INT8_BACKENDS:
        out[backend] = nlpwf(args.work / f"quantize_{backend}", "stage=quantize", f"stage.model_path={args.model}",
                             f"stage.backend={backend}", *data_overrides(args))
    return out


def step_latency(args) -> dict:
    return nlpwf(args.work / "latency", "stage=benchmark", f"stage.model_path={args.model}", "stage.accuracy=false",
                 *data_overrides(args), *args.latency_overrides)


def make_pairs(path: Path, n: int, data_dir: Path) -> Path:
    with (data_dir / "train.tsv").open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    with path.open("w", encoding="utf-8") as f:
        f.write("id\tsentence1\tsentence2\n")
        for i in range(n):
            row = rows[i % len(rows)]
            f.write(f"{i}\t{row[3]}\t{row[4]}\n")
    return path


def step_predict(args) -> dict:
    model = args.work / "quantize_torch_dynamic" / "model_int8"
    if not model.is_dir():
        model = args.model
    source = make_pairs(args.work / f"pairs_{args.pairs}.tsv", args.pairs, args.data_dir)
    return nlpwf(args.work / "predict", "stage=predict", f"stage.model_path={model}", f"stage.input={source}")


def render(results: dict, notes: list[str]) -> str:
    lines = ["# Quantize and serve: MiniLM-L6 fine-tuned on MRPC", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.node()}; produced by `benchmarks/quantize.py`.", ""]
    if "quantize" in results:
        lines += ["## Accuracy on MRPC dev (408 pairs)", "",
                  "| backend | accuracy | F1 | loss (points) | weights MB | note |", "|---|---|---|---|---|---|"]
        first = next(iter(results["quantize"].values()))
        lines.append(f"| fp32 | {100 * first['fp32_accuracy']:.2f}% | {100 * first['fp32_f1']:.2f}% | | {first['fp32_size_mb']:.1f} | |")
        for backend, m in results["quantize"].items():
            lines.append(f"| {backend} | {100 * m['eval_accuracy']:.2f}% | {100 * m['eval_f1']:.2f}% | {m['accuracy_loss_points']:.2f} | "
                         f"{m['int8_size_mb']:.1f} | {m.get('error', '')} |")
        lines.append("")
    if "latency" in results:
        table = results["latency"].get("table") or ""
        lines += ["## Latency and throughput", "", table, ""]
    if "predict" in results:
        p = results["predict"]
        lines += ["## predict at scale", "",
                  f"{p['predict_pairs']:,} pairs ({p['backend']} model, chunks of {p['chunk_rows']} rows): "
                  f"{p['pairs_per_second']:.1f} pairs/s, peak RSS {p['peak_rss_mb']:.0f} MB, {p['predict_seconds']:.0f} s.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a training job's model/ folder (MiniLM fine-tuned on MRPC)")
    parser.add_argument("--data-dir", type=Path, required=True, help="GLUE MRPC folder (train.tsv, dev.tsv)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nlpwf_quantize_bench"))
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--note", action="append", default=[], help="a line for the Notes section (repeatable)")
    parser.add_argument("--latency-overrides", nargs="*", default=[],
                        help="extra overrides for the latency job, e.g. 'stage.backends=[fp32,bf16,inc_static]'")
    parser.add_argument("--steps", nargs="*", default=["quantize", "latency", "predict"], choices=["quantize", "latency", "predict"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    steps = {"quantize": step_quantize, "latency": step_latency, "predict": step_predict}
    for name in args.steps:
        results[name] = steps[name](args)
        if name == "latency":
            results[name]["table"] = (args.work / "latency" / "benchmark.md").read_text()
        saved.write_text(json.dumps(results, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(render(results, args.note))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
