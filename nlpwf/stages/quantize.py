"""stage=quantize: a saved fp32 model -> an INT8 model in JOB_DIR/model_int8.

Calibration pairs come from the `dataset` group's train split, accuracy from its eval split.
The INT8 model is saved, loaded back and scored from disk, so the accuracy reported is the
accuracy of the folder that is published; a model that loses more than stage.tolerance
accuracy points is not published.
"""
from __future__ import annotations

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
from nlpwf.inference.load import load_fp32
from nlpwf.results import files
from nlpwf.stages.evaluate import score
from nlpwf.stages.serving import serving_threads

log = logging.getLogger(__name__)

INT8_DIR = "model_int8"
INC_BACKENDS = ("inc_static", "inc_dynamic")


def check(stage: DictConfig) -> None:
    int8.check_backend(stage.backend)
    if stage.calibration_samples < 1:
        raise UserError(f"stage.calibration_samples={stage.calibration_samples}: INT8 needs a calibration pass; "
                        "use 1 or more (256 is plenty)")
    if not 0 <= stage.tolerance <= 100:
        raise UserError(f"stage.tolerance={stage.tolerance}: give the accuracy points INT8 may lose, e.g. 1.0")
    if stage.tune and stage.backend not in INC_BACKENDS:
        raise UserError("stage.tune=true needs an INC backend (INC does the tuning): use stage.backend=inc_static or inc_dynamic")
    if stage.get("max_trials", 1) < 1:
        raise UserError(f"stage.max_trials={stage.max_trials}: use 1 or more")


def calibration_batches(classifier: Classifier, split, samples: int, batch_size: int) -> list:
    """A seeded sample of the train split, as model inputs. Random rather than the first rows:
    files are often sorted, and the scales should see the spread of real inputs."""
    sample = split.shuffle(seed=0).select(range(min(samples, len(split))))
    return [inputs for _, inputs in classifier.batches(sample["sentence1"], sample["sentence2"], batch_size)]


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
    source = models.saved_model_dir(stage.model_path, "quantize")
    if models.is_quantized(source):
        raise UserError(f"stage.model_path={stage.model_path} is already INT8: point it at a training job's fp32 model/ folder")
    fp32 = Classifier(load_fp32(source), models.load_saved_tokenizer(source), stage.max_length)
    splits = load_splits(cfg.dataset)
    pairs = splits["eval"]["sentence1"], splits["eval"]["sentence2"], splits["eval"]["label"]
    baseline = score(fp32, *pairs, stage.batch_size)
    calibration = calibration_batches(fp32, splits["train"], stage.calibration_samples, stage.batch_size)

    start = time.perf_counter()
    qmodel = _quantize(stage, fp32, calibration, pairs, baseline["eval_accuracy"])
    seconds = time.perf_counter() - start

    staged = files.staging_dir(job_dir / INT8_DIR)
    try:
        int8.save(qmodel, stage.backend, staged, calibration[0], source, fp32.tokenizer,
                  {"calibration_samples": stage.calibration_samples, "tuned": bool(stage.tune)})
        # Score what was written, not what is in memory: the published folder is what serves.
        forward, _ = int8.load(staged, compile=False)
        quantized = score(Classifier(forward, fp32.tokenizer, stage.max_length), *pairs, stage.batch_size)
    except BaseException:
        files.remove_dir(staged)
        raise
    result = _result(stage, baseline, quantized, seconds, source, staged)
    files.write_json(job_dir / files.METRICS_FILE, result)
    if result["accuracy_loss_points"] > stage.tolerance:
        files.remove_dir(staged)
        advice = ("try stage.backend=inc_static stage.tune=true, or raise stage.tolerance" if stage.backend == "torch_dynamic"
                  else "try stage.tune=true, more stage.calibration_samples, or stage.backend=torch_dynamic")
        raise UserError(
            f"{stage.backend} INT8 lost {result['accuracy_loss_points']:.2f} accuracy points (more than "
            f"stage.tolerance={stage.tolerance}); not published (metrics.json has the numbers): {advice}"
        )
    files.publish_dir(staged, job_dir / INT8_DIR)
    log.info("%s INT8: accuracy %.4f (fp32 %.4f), %.1f MB -> %.1f MB, in %s", stage.backend, result["eval_accuracy"],
             result["fp32_accuracy"], result["fp32_size_mb"], result["int8_size_mb"], job_dir / INT8_DIR)
    return result


def _quantize(stage: DictConfig, fp32: Classifier, calibration: list, pairs, baseline_accuracy: float):
    model = fp32.forward
    if not stage.tune:
        return int8.quantize(model, stage.backend, calibration)
    s1, s2, labels = pairs

    def accuracy(candidate) -> float:
        classifier = Classifier(candidate, fp32.tokenizer, stage.max_length)
        return score(classifier, s1, s2, labels, stage.batch_size)["eval_accuracy"]

    tolerable = int8.relative_tolerance(stage.tolerance, baseline_accuracy)
    tuned = int8.inc_tune(model, stage.backend, calibration, accuracy, tolerable, stage.max_trials)
    if tuned is None:  # INC returns a model only once one meets the goal or max_trials is reached
        raise UserError(
            f"INC's tuning found no {stage.backend} config within stage.tolerance={stage.tolerance} accuracy points: "
            f"raise stage.tolerance, add stage.calibration_samples, or use stage.backend=torch_dynamic"
        )
    return tuned


def _result(stage, baseline: dict, quantized: dict, seconds: float, source: Path, staged: Path) -> dict:
    return {
        **quantized,
        "fp32_accuracy": baseline["eval_accuracy"], "fp32_f1": baseline["eval_f1"],
        "fp32_confusion_matrix": baseline["eval_confusion_matrix"],
        "accuracy_loss_points": round(100 * (baseline["eval_accuracy"] - quantized["eval_accuracy"]), 4),
        "backend": stage.backend, "tuned": bool(stage.tune), "calibration_samples": stage.calibration_samples,
        "quantize_seconds": round(seconds, 2), "fp32_size_mb": round(weights_mb(source), 2),
        "int8_size_mb": round(weights_mb(staged), 2), "model": str(source), "torch": torch.__version__,
    }
