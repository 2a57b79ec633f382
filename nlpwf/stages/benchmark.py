"""stage=benchmark: latency and throughput of one model under several backends, one run.

Every backend is built in this process from stage.model_path (INT8 ones quantized here, with
calibration), then timed on the same real pairs. The machine is shared and its load drifts,
so backends take turns: each round times every backend at every batch size, the order
rotating from round to round, and the table reports medians over all rounds. Ratios between
backends of one run are meaningful; absolute numbers depend on what else the machine ran.
"""
from __future__ import annotations

import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nlpwf import models
from nlpwf.data.splits import load_splits
from nlpwf.data.tasks import TEXT_FIELDS, Task
from nlpwf.errors import UserError
from nlpwf.inference import int8
from nlpwf.inference.classifier import Classifier, tensors
from nlpwf.inference.load import load_fp32, saved_task
from nlpwf.results import files, metrics
from nlpwf.stages.evaluate import examples_of, score
from nlpwf.stages.quantize import calibration_batches
from nlpwf.stages.serving import serving_threads

log = logging.getLogger(__name__)

FLOAT_BACKENDS = ("fp32", "bf16")
BACKENDS = FLOAT_BACKENDS + int8.BACKENDS
TABLE_FILE = "benchmark.md"


@dataclass
class Variant:
    name: str
    classifier: Classifier
    times: dict[int, list[float]] = field(default_factory=dict)  # batch size -> seconds per call


def check(stage: DictConfig) -> None:
    unknown = [b for b in stage.backends if b not in BACKENDS]
    if unknown or not stage.backends:
        raise UserError(f"stage.backends={list(stage.backends)}: choose from {', '.join(BACKENDS)}")
    if not stage.batch_sizes or min(stage.batch_sizes) < 1:
        raise UserError(f"stage.batch_sizes={list(stage.batch_sizes)}: give batch sizes of 1 or more, e.g. [1,16]")
    for key in ("rounds", "calls_per_round"):
        if stage[key] < 1:
            raise UserError(f"stage.{key}={stage[key]}: use 1 or more")
    if stage.seq_length is not None and stage.seq_length < 8:
        raise UserError(f"stage.seq_length={stage.seq_length}: use 8 to 512, or null for each batch's own longest pair")


def build(name: str, source: Path, tokenizer, stage: DictConfig, calibration: list, task: Task) -> Variant:
    fp32 = load_fp32(source)
    if name in FLOAT_BACKENDS:
        return Variant(name, Classifier(fp32, tokenizer, stage.max_length, precision=name, name=name, task=task))
    qmodel = int8.quantize(fp32, name, calibration)
    forward = int8.compile_graph(qmodel) if name != "torch_dynamic" and stage.compile else qmodel
    return Variant(name, Classifier(forward, tokenizer, stage.max_length, name=name, task=task))


def inputs(tokenizer, split, batch_size: int, count: int, seq_length: int | None, max_length: int) -> list[tuple]:
    """`count` batches of real examples (texts or pairs), taken in file order and reused cyclically."""
    need = batch_size * count
    rows = [i % len(split) for i in range(need)]
    columns = [split[name] for name in TEXT_FIELDS if name in split.column_names]
    texts = [[column[i] for i in rows] for column in columns]
    padding = {"padding": "max_length", "max_length": seq_length} if seq_length else {"padding": True, "max_length": max_length}
    out = []
    for start in range(0, need, batch_size):
        enc = tokenizer(*(t[start:start + batch_size] for t in texts), truncation=True, return_tensors="pt", **padding)
        out.append(tensors(enc))
    return out


def time_calls(variant: Variant, batches: list[tuple], calls: int, offset: int) -> list[float]:
    out = []
    with torch.inference_mode(), variant.classifier._autocast():
        for i in range(calls):
            batch = batches[(offset + i) % len(batches)]
            start = time.perf_counter()
            variant.classifier.forward(*batch)
            out.append(time.perf_counter() - start)
    return out


def run(cfg: DictConfig, job_dir: Path) -> dict:
    stage = cfg.stage
    check(stage)
    threads = serving_threads(cfg)
    source = models.saved_model_dir(stage.model_path, "benchmark")
    if models.is_quantized(source):
        raise UserError(f"stage.model_path={stage.model_path} is INT8: benchmark starts from a training job's fp32 model/ folder")
    tokenizer = models.load_saved_tokenizer(source)
    task = saved_task(source)
    data_task, splits = load_splits(cfg.dataset)
    examples = examples_of(splits["eval"], data_task, task)
    base = Classifier(load_fp32(source), tokenizer, stage.max_length, task=task)
    calibration = calibration_batches(base, splits["train"], stage.calibration_samples, stage.batch_size)
    workload = {bs: inputs(tokenizer, splits["eval"], bs, stage.calls_per_round, stage.seq_length, stage.max_length)
                for bs in stage.batch_sizes}

    variants = []
    for name in stage.backends:
        log.info("building %s", name)
        variant = build(name, source, tokenizer, stage, calibration, task)
        for bs, batches in workload.items():  # warm-up: compiles graphs, fills caches
            time_calls(variant, batches, max(1, stage.warmup_calls), 0)
        variants.append(variant)

    for round_index in range(stage.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            for bs, batches in workload.items():
                variant.times.setdefault(bs, []).extend(time_calls(variant, batches, stage.calls_per_round, round_index))
        log.info("round %d of %d done", round_index + 1, stage.rounds)

    # Each backend's score in the model task's main metric (accuracy; Matthews for CoLA, ...).
    metric = metrics.main_metric(task.name, task.num_labels)
    scored = {v.name: score(v.classifier, *examples, stage.batch_size)[f"eval_{metric}"] for v in variants} if stage.accuracy else {}
    rows = table_rows(variants, scored, metric)
    result = {"rows": rows, "threads": threads, "machine": machine(), "date": now(), "model": str(source),
              "metric": metric, "eval_pairs": len(examples[1]), "stage": OmegaConf.to_container(stage, resolve=True)}
    markdown = render(result)
    (Path(job_dir) / TABLE_FILE).write_text(markdown)
    files.write_json(Path(job_dir) / files.METRICS_FILE, result)
    print(markdown, flush=True)
    return result


def table_rows(variants: list[Variant], scored: dict[str, float], metric: str = "accuracy") -> list[dict]:
    fp32 = next((v for v in variants if v.name == "fp32"), None)
    rows = []
    for v in variants:
        for bs, times in v.times.items():
            median = statistics.median(times)
            row = {"backend": v.name, "batch_size": bs, "median_ms": round(1000 * median, 3),
                   "p90_ms": round(1000 * quantile(times, 0.9), 3), "pairs_per_second": round(bs / median, 2),
                   "calls": len(times)}
            if fp32 is not None:
                row["speedup_vs_fp32"] = round(statistics.median(fp32.times[bs]) / median, 3)
            if v.name in scored:
                row[metric] = round(scored[v.name], 4)
            rows.append(row)
    return rows


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render(result: dict) -> str:
    rows = result["rows"]
    metric = result.get("metric", "accuracy")
    has_acc = any(metric in r for r in rows)
    has_speedup = any("speedup_vs_fp32" in r for r in rows)
    head = ["backend", "batch", "median ms", "p90 ms", "pairs/s"] + (["× fp32"] if has_speedup else []) + ([metric] if has_acc else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["batch_size"], BACKENDS.index(r["backend"]))):
        cells = [r["backend"], str(r["batch_size"]), f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['pairs_per_second']:.1f}"]
        cells += [f"{r['speedup_vs_fp32']:.2f}"] if has_speedup else []
        if has_acc:
            value = r.get(metric)
            cells += ["" if value is None else f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    stage = result["stage"]
    note = (f"{result['date']}, {result['machine']}, {result['threads']} thread(s); {stage['rounds']} rounds x "
            f"{stage['calls_per_round']} calls per backend and batch size, alternating; inputs: real pairs, "
            f"{'padded to ' + str(stage['seq_length']) if stage['seq_length'] else 'each batch padded to its longest pair'}"
            + (f"; {metric} on {result['eval_pairs']} eval examples." if has_acc else "."))
    return "\n".join(lines) + "\n\n" + note + "\n"


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
