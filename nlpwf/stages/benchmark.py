"""stage=benchmark: latency and throughput of one model under several backends, one run.

Every backend is built in this process from stage.model_path (INT8 ones quantized here, with
calibration), then timed on the same real pairs. The machine is shared and its load drifts,
so backends take turns: each round times every backend at every batch size, the order
rotating from round to round, and the table reports medians over all rounds. Ratios between
backends of one run are meaningful; absolute numbers depend on what else the machine ran.

The report names the CPU and its ISA (VNNI, AMX, AVX512-BF16: what decides which backend is
fast) and, from the measured rows, the INT8 backend fastest on this machine at each batch size
and the one to use here (`recommended_int8_backend`, see `recommend`): measured, not assumed.
"""
from __future__ import annotations

import logging
import math
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
from nlpwf.inference.evaluation import examples_of, score
from nlpwf.inference.load import load_fp32, saved_task
from nlpwf.results import files, metrics
from nlpwf.runtime import isa
from nlpwf.runtime.threads import serving_threads

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
    if not 0 <= stage.get("tolerance", 1.0) <= 100:
        raise UserError(f"stage.tolerance={stage.tolerance}: give the points of the task's metric INT8 may lose, e.g. 1.0")
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
    calibration = int8.calibration_batches(base, splits["train"], stage.calibration_samples, stage.batch_size)
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
    cpu = isa.detect()
    result = {"rows": rows, "threads": threads, "machine": machine(), "date": now(), "model": str(source),
              "isa": cpu.as_dict(), "isa_summary": cpu.summary(),
              "metric": metric, "eval_pairs": len(examples[1]), "stage": OmegaConf.to_container(stage, resolve=True),
              **recommend(rows, metric, stage.get("tolerance", 1.0))}
    if result["recommended_int8_backend"]:
        log.info("fastest INT8 backend here: %s (%s)", result["recommended_int8_backend"], cpu.summary())
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


def recommend(rows: list[dict], metric: str = "accuracy", tolerance: float = 1.0) -> dict:
    """From measured rows: the fastest INT8 backend at each batch size, and the one INT8 backend
    to use on this machine (`recommended_int8_backend`). INT8 backends that lost more than
    `tolerance` points of the metric against fp32 (when both were scored) are left out, as
    stage=quantize would refuse them; among the rest, the recommendation is the backend fastest
    at every batch size if there is one, else the one whose median times are closest to the
    fastest (least geometric mean of its time over the fastest's, across batch sizes)."""
    fp32_score = next((r[metric] for r in rows if r["backend"] == "fp32" and metric in r), None)
    excluded = {}
    for r in rows:
        if r["backend"] in int8.BACKENDS and fp32_score is not None and metric in r:
            loss = round(100 * (fp32_score - r[metric]), 4)
            if loss > tolerance:
                excluded[r["backend"]] = loss
    candidates = [r for r in rows if r["backend"] in int8.BACKENDS and r["backend"] not in excluded]
    fastest = {}
    for r in candidates:
        best = fastest.get(r["batch_size"])
        if best is None or r["median_ms"] < best["median_ms"]:
            fastest[r["batch_size"]] = r
    ratios: dict[str, list[float]] = {}
    for r in candidates:
        ratios.setdefault(r["backend"], []).append(r["median_ms"] / fastest[r["batch_size"]]["median_ms"])
    # A backend measured at every batch size (all are, within one run) with the least geometric
    # mean ratio: 1.0 exactly when it is the fastest at each of them.
    slowdown = {b: math.fsum(math.log(x) for x in v) / len(v) for b, v in ratios.items() if len(v) == len(fastest)}
    recommended = min(slowdown, key=lambda b: (slowdown[b], b), default=None)
    per_batch = [{key: r[key] for key in ("batch_size", "backend", "median_ms", "pairs_per_second", "speedup_vs_fp32") if key in r}
                 for _, r in sorted(fastest.items())]
    return {"recommended_int8_backend": recommended, "fastest_int8": per_batch, "int8_excluded": excluded}


def recommendation_lines(result: dict) -> list[str]:
    """The report's sentences on INT8 for this machine."""
    lines = []
    metric = result.get("metric", "accuracy")
    tolerance = result["stage"].get("tolerance", 1.0)
    for backend, loss in sorted(result.get("int8_excluded", {}).items()):
        lines.append(f"{backend} is not considered: it lost {loss:.2f} points of {metric} against fp32 "
                     f"(more than stage.tolerance={tolerance}).")
    for best in result.get("fastest_int8", []):
        speed = f"{best['speedup_vs_fp32']:.2f}× fp32" if "speedup_vs_fp32" in best else f"{best['median_ms']:.2f} ms"
        line = f"Fastest INT8 backend here: {best['backend']}, {speed} at batch {best['batch_size']}"
        faster = [r["backend"] for r in result["rows"] if r["batch_size"] == best["batch_size"]
                  and r["backend"] in FLOAT_BACKENDS and r["median_ms"] < best["median_ms"]]
        lines.append(line + (f" ({' and '.join(faster)} faster still)." if faster else "."))
    uncompiled = [b for b in ("inc_static", "inc_dynamic") if b in result["stage"].get("backends", [])]
    if uncompiled and not result["stage"].get("compile", True):
        lines.append(f"{' and '.join(uncompiled)} ran uncompiled (stage.compile=false): their quantize/dequantize graphs "
                     "run in fp32, so these numbers understate them.")
    recommended = result.get("recommended_int8_backend")
    if recommended:
        lines.append(f"INT8 backend to use on this machine: {recommended} (stage=quantize stage.backend={recommended}).")
    elif any(r["backend"] in int8.BACKENDS for r in result["rows"]):
        lines.append("No INT8 backend measured here is within stage.tolerance: serve fp32 or bf16.")
    return lines


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
    cpu = f"CPU: {result['isa_summary']}." if "isa_summary" in result else ""
    advice = recommendation_lines(result)
    return "\n".join(lines) + "\n\n" + note + "\n" + (f"\n{cpu}\n" if cpu else "") + ("\n" + "\n".join(advice) + "\n" if advice else "")


def machine() -> str:
    return f"{isa.detect().cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
