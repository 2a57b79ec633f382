"""stage=quantize: a saved fp32 model -> an INT8 model in JOB_DIR/model_int8.

Calibration examples come from the `dataset` group's train split, the score from its eval
split, measured with the model task's main metric (accuracy; CoLA's Matthews correlation,
STS-B's Spearman, ...). The INT8 model is saved, loaded back and scored from disk, so the
score reported is the score of the folder that is published; a model that loses more than
stage.tolerance points of that metric (hundredths, as percentage points are of accuracy) is
not published. The INT8 folder keeps the model's config, so its labels and task.

stage.backend=auto (the default) picks the backend for this CPU's ISA (`int8.choose_backend`:
inc_static with VNNI or AMX-INT8, torch_dynamic without), or, given stage.benchmark (a
stage=benchmark job from a CPU with the same ISA), the INT8 backend that job measured fastest;
it logs the choice and why in one line and records both with the ISA in metrics.json.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from nlpwf import models
from nlpwf.data.splits import load_splits
from nlpwf.errors import UserError
from nlpwf.inference import int8
from nlpwf.inference.classifier import Classifier
from nlpwf.inference.evaluation import examples_of, score
from nlpwf.inference.load import load_fp32, saved_task
from nlpwf.results import files, metrics
from nlpwf.runtime import isa
from nlpwf.runtime.threads import serving_threads

log = logging.getLogger(__name__)

INT8_DIR = "model_int8"
INC_BACKENDS = ("inc_static", "inc_dynamic")


def check(stage: DictConfig) -> None:
    int8.check_backend(stage.backend, auto=True)
    if stage.calibration_samples < 1:
        raise UserError(f"stage.calibration_samples={stage.calibration_samples}: INT8 needs a calibration pass; "
                        "use 1 or more (256 is plenty)")
    if not 0 <= stage.tolerance <= 100:
        raise UserError(f"stage.tolerance={stage.tolerance}: give the points of the task's metric INT8 may lose, e.g. 1.0")
    if stage.tune and stage.backend not in (int8.AUTO, *INC_BACKENDS):
        raise UserError("stage.tune=true needs an INC backend (INC does the tuning): use stage.backend=inc_static or inc_dynamic")
    if stage.get("max_trials", 1) < 1:
        raise UserError(f"stage.max_trials={stage.max_trials}: use 1 or more")


def read_benchmark(path: str | None) -> tuple[dict | None, str]:
    """A stage=benchmark job's metrics.json (given as the job dir or the file) and its path."""
    if not path:
        return None, ""
    file = Path(path) / files.METRICS_FILE if Path(path).is_dir() else Path(path)
    try:
        result = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"stage.benchmark={path}: no readable {files.METRICS_FILE} of a stage=benchmark job there ({error})") from None
    if "recommended_int8_backend" not in result or "isa" not in result:
        raise UserError(f"stage.benchmark={path}: {file} is not a stage=benchmark job's metrics.json "
                        "(no recommended_int8_backend or isa): run stage=benchmark on this kind of machine")
    return result, str(file)


def resolve_backend(stage: DictConfig, found: isa.Isa, benchmark: dict | None = None, source: str = "") -> tuple[str, str]:
    """The backend this job uses and why: an explicit stage.backend as given; `auto` from a
    benchmark measured on a CPU with this ISA if one is given, else by the ISA rule; with
    stage.tune=true always inc_static (tuning is INC's)."""
    if stage.backend != int8.AUTO:
        return stage.backend, f"stage.backend={stage.backend}"
    if stage.tune:
        return "inc_static", "stage.backend=auto with stage.tune=true (tuning is INC's)"
    backend, why = int8.choose_backend(found)
    rule = f"stage.backend=auto on {found.summary()}: {why}"
    if benchmark is None:
        return backend, rule
    if benchmark["isa"] != found.as_dict():
        return backend, f"{rule} (stage.benchmark was measured on another CPU: {benchmark.get('isa_summary')})"
    if benchmark["recommended_int8_backend"] not in int8.BACKENDS:
        return backend, f"{rule} (stage.benchmark found no INT8 backend within its tolerance)"
    chosen = benchmark["recommended_int8_backend"]
    return chosen, f"stage.backend=auto on {found.summary()}: fastest INT8 backend measured by {source}"


def weights_mb(folder: Path) -> float:
    """Size of the weight files alone (not the tokenizer or config)."""
    names = set(models.WEIGHT_FILES) | {int8.TORCH_WEIGHTS}
    files = [f for f in Path(folder).rglob("*") if f.is_file() and (f.name in names or f.parent.name == int8.INC_DIR)]
    return sum(f.stat().st_size for f in files if f.name != "qconfig.json") / 2**20


def run(cfg: DictConfig, job_dir: Path) -> dict:
    stage = cfg.stage
    check(stage)
    serving_threads(cfg)
    job_dir = Path(job_dir)
    cpu = isa.detect()
    backend, why = resolve_backend(stage, cpu, *read_benchmark(stage.get("benchmark")))
    # Warn when auto fell back on the no-VNNI rule (an assumption), not when a benchmark decided.
    if stage.backend == int8.AUTO and not cpu.int8_dot_product and "measured by" not in why:
        log.warning("INT8 backend %s (%s)", backend, why)
    else:
        log.info("INT8 backend %s (%s)", backend, why)
    source = models.saved_model_dir(stage.model_path, "quantize")
    if models.is_quantized(source):
        raise UserError(f"stage.model_path={stage.model_path} is already INT8: point it at a training job's fp32 model/ folder")
    task = saved_task(source)
    fp32 = Classifier(load_fp32(source), models.load_saved_tokenizer(source), stage.max_length, task=task)
    data_task, splits = load_splits(cfg.dataset)
    examples = examples_of(splits["eval"], data_task, task)
    gate = f"eval_{metrics.main_metric(task.name, task.num_labels)}"
    baseline = score(fp32, *examples, stage.batch_size)
    calibration = int8.calibration_batches(fp32, splits["train"], stage.calibration_samples, stage.batch_size)

    start = time.perf_counter()
    qmodel = _quantize(stage, backend, fp32, calibration, examples, gate, baseline[gate])
    seconds = time.perf_counter() - start

    staged = files.staging_dir(job_dir / INT8_DIR)
    try:
        int8.save(qmodel, backend, staged, calibration[0], source, fp32.tokenizer,
                  {"calibration_samples": stage.calibration_samples, "tuned": bool(stage.tune)})
        # Score what was written, not what is in memory: the published folder is what serves.
        forward, _ = int8.load(staged, compile=False)
        quantized = score(Classifier(forward, fp32.tokenizer, stage.max_length, task=saved_task(staged)), *examples, stage.batch_size)
    except BaseException:
        files.remove_dir(staged)
        raise
    result = _result(stage, backend, why, cpu, gate, baseline, quantized, seconds, source, staged)
    files.write_json(job_dir / files.METRICS_FILE, result)
    if result["loss_points"] > stage.tolerance:
        files.remove_dir(staged)
        advice = ("try stage.backend=inc_static stage.tune=true, or raise stage.tolerance" if backend == "torch_dynamic"
                  else "try stage.tune=true, more stage.calibration_samples, or stage.backend=torch_dynamic")
        raise UserError(
            f"{backend} INT8 lost {result['loss_points']:.2f} points of {gate[5:]} (more than "
            f"stage.tolerance={stage.tolerance}); not published (metrics.json has the numbers): {advice}"
        )
    files.publish_dir(staged, job_dir / INT8_DIR)
    log.info("%s INT8: %s %.4f (fp32 %.4f), %.1f MB -> %.1f MB, in %s", backend, gate[5:], result[gate],
             baseline[gate], result["fp32_size_mb"], result["int8_size_mb"], job_dir / INT8_DIR)
    return result


def _quantize(stage: DictConfig, backend: str, fp32: Classifier, calibration: list, examples, gate: str, baseline_score: float):
    model = fp32.forward
    if not stage.tune:
        return int8.quantize(model, backend, calibration)
    texts, labels = examples

    def measured(candidate) -> float:
        classifier = Classifier(candidate, fp32.tokenizer, stage.max_length, task=fp32.task)
        return score(classifier, texts, labels, stage.batch_size)[gate]

    tolerable = int8.relative_tolerance(stage.tolerance, baseline_score)
    tuned = int8.inc_tune(model, backend, calibration, measured, tolerable, stage.max_trials)
    if tuned is None:  # INC returns a model only once one meets the goal or max_trials is reached
        raise UserError(
            f"INC's tuning found no {backend} config within stage.tolerance={stage.tolerance} points of {gate[5:]}: "
            f"raise stage.tolerance, add stage.calibration_samples, or use stage.backend=torch_dynamic"
        )
    return tuned


def _result(stage, backend: str, why: str, cpu: isa.Isa, gate: str, baseline: dict, quantized: dict, seconds: float,
            source: Path, staged: Path) -> dict:
    loss = round(100 * (baseline[gate] - quantized[gate]), 4)
    result = {
        **quantized,
        # The fp32 model's numbers beside the INT8 model's: fp32_accuracy, fp32_f1, ...
        **{f"fp32_{k[5:]}": v for k, v in baseline.items() if k.startswith("eval_") and k != "eval_pairs"},
        "gate_metric": gate, "loss_points": loss,
        "backend": backend, "backend_requested": stage.backend, "backend_reason": why,
        "isa": cpu.as_dict(), "isa_summary": cpu.summary(), "tuned": bool(stage.tune), "calibration_samples": stage.calibration_samples,
        "quantize_seconds": round(seconds, 2), "fp32_size_mb": round(weights_mb(source), 2),
        "int8_size_mb": round(weights_mb(staged), 2), "model": str(source), "torch": torch.__version__,
    }
    if "eval_accuracy" in baseline:  # the name the gate had when it was always accuracy
        result["accuracy_loss_points"] = round(100 * (baseline["eval_accuracy"] - quantized["eval_accuracy"]), 4)
    return result
