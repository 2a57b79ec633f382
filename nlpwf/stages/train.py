"""stage=train: fine-tuning, top to bottom: data and its task, model, transformers' Trainer, then
metrics and model out.

The data decides the task (data.splits, data.tasks): one text or a pair, classes or a score.
The model gets a head for it (num_labels, problem_type, id2label saved in its config), the
Trainer the task's metrics (results.metrics), the job its main metric as `objective`.

A job of one process trains here. A job of several processes (nodes x processes_per_node)
that nobody started as ranks starts them as workers on this machine, each re-entering
`python -m nlpwf` with the job's resolved config (runtime.jobfile), exactly as Azure ML starts
them on its nodes. Each rank, however started, runs `train`; only rank 0 writes results.
"""
from __future__ import annotations

import logging
from pathlib import Path

import datasets
from omegaconf import DictConfig
from transformers import TrainerCallback, set_seed

from nlpwf import models
from nlpwf.config.checks import check_job
from nlpwf.data.splits import load_splits, test_file
from nlpwf.data.tasks import Task
from nlpwf.data.tokenize import tokenize
from nlpwf.errors import Interrupted
from nlpwf.inference import predictions
from nlpwf.inference.classifier import Classifier, SequenceLogits
from nlpwf.results import files, metrics, plots
from nlpwf.runtime import collective, contract, isa, jobfile, process, threads, workers
from nlpwf.runtime.peers import peer_loss
from nlpwf.training import addons, checkpoints, recorder, tracking
from nlpwf.training.trainer import build, check_model_limits, check_objective, final_eval, training_arguments

log = logging.getLogger(__name__)


def preflight(cfg: DictConfig) -> tuple[Task, datasets.DatasetDict]:
    """Everything that can reject the input, before any model is loaded; run once more before
    worker processes start, so a mistake is reported once and not by every rank."""
    check_job(cfg)
    check_model_limits(cfg)
    task, splits = load_splits(cfg.dataset)
    check_task(cfg, task)
    return task, splits


def check_task(cfg: DictConfig, task: Task) -> None:
    """What can only be checked once the task is known: the objective is one of its metrics, and
    the test file (read through, every row) has the texts the model will take."""
    check_objective(cfg.objective, task)
    path = test_file(cfg.dataset)
    if path is not None:
        with predictions.open_input(path, task, None, chunk_rows=4096) as reader:
            for _ in reader.chunks():
                pass


def run(cfg: DictConfig, job_dir: Path) -> dict | None:
    """Train in this process, or start the job's ranks here when it needs several."""
    if contract.from_env() is None and cfg.nodes * cfg.compute.processes_per_node > 1:
        return run_local_workers(cfg, job_dir)
    return train(cfg, job_dir)


def run_local_workers(cfg: DictConfig, job_dir: Path) -> dict:
    preflight(cfg)
    world = cfg.nodes * cfg.compute.processes_per_node
    # An Azure VM size emulated here keeps its process layout but not its thread count.
    configured = cfg.compute.threads_per_process if cfg.compute.name == "local" else None
    config_file = jobfile.write_job_config(cfg, job_dir / jobfile.JOB_CONFIG)
    code = workers.run_workers(jobfile.worker_command(config_file, job_dir), cfg.nodes, cfg.compute.processes_per_node,
                               threads=threads.threads_per_process(configured, world))
    workers.raise_for_exit(code, "a worker process", checkpoints.resume_hint(checkpoints.folder_of(cfg, job_dir), job_dir))
    metrics = files.read_metrics(job_dir)
    if metrics is None:
        raise RuntimeError(f"the workers finished but rank 0 wrote no {files.METRICS_FILE} in {job_dir}")
    return metrics


def train(cfg: DictConfig, job_dir: Path, callbacks: list[TrainerCallback] = ()) -> dict | None:
    """Train and evaluate in this process. Returns the metrics on rank 0, None on other ranks.
    `callbacks` go to the Trainer after nlpwf's own (benchmarks use them to observe steps)."""
    env = process.set_up(cfg)  # rank, threads and cores, allocator, process group, precision
    task, splits = preflight(cfg)
    tokenizer = models.load_tokenizer(cfg.model)
    encoded = tokenize(splits, tokenizer, cfg.dataset.max_seq_length, cfg.dataset.pad_to_max_length)

    args = training_arguments(cfg, job_dir, tracking.report_to(cfg.logger), env.precision)
    set_seed(args.seed)  # before the model, so a random-init or a new classifier head is reproducible
    trainer, sigterm = build(cfg, args, encoded, tokenizer, task, callbacks)
    checkpoint_dir = Path(args.output_dir)
    resume = checkpoints.resume_point(cfg.training.get("resume"), checkpoint_dir, env.rank.is_main)
    tracker = tracking.start(cfg, job_dir, env.rank.is_main)  # before train(): the integrations reuse its runs
    added = addons.attach(trainer, cfg.get("perf"))  # changes training: unpadding, the DDP comm hook
    record = recorder.attach(trainer, env)  # only observes it
    log.info("training %s on %s (%s): %d train / %d eval examples, world size %d, %s, %d thread(s) per process",
             cfg.model.name, cfg.dataset.name, describe(task), len(encoded["train"]), len(encoded["eval"]),
             env.rank.world_size, env.precision, env.threads)
    with peer_loss(env.rank, lambda: checkpoints.resume_hint(checkpoint_dir, job_dir)):  # a lost rank: one line, not a gloo stack
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    if sigterm.stopped_at is not None:  # not the end of training: nothing is evaluated or published
        raise Interrupted(f"training stopped by SIGTERM at step {sigterm.stopped_at} of {trainer.state.max_steps}; "
                          f"{checkpoints.resume_hint(checkpoint_dir, job_dir)}")
    eval_metrics = final_eval(trainer, encoded)

    digests = check_replicas(trainer.model)
    staged = files.staging_dir(job_dir / files.MODEL_DIR) if env.rank.is_main else None
    trainer.save_model(str(staged) if staged else None)  # only the main process writes
    if not env.rank.is_main:
        return None
    result = {**train_metrics, **eval_metrics, **job_record(cfg, env, task, encoded), "parameter_digests": digests,
              **record.report(), **added.report()}
    if test_file(cfg.dataset) is not None:
        result["test_predictions"] = str(predict_test_file(cfg, trainer.model, tokenizer, task, job_dir, env.precision))
    publish(result, trainer, staged, job_dir, tracker)
    log_result(result, task, encoded, job_dir)
    return result


def check_replicas(model) -> list[str]:
    """Every rank's parameter digest; DDP replicas that differ mean training was not synchronised."""
    digests = collective.parameter_digests(model)
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP replicas ended with different parameters (digests {digests}): training is not synchronised")
    return digests


def job_record(cfg: DictConfig, env: process.ProcessEnv, task: Task, encoded) -> dict:
    """What ran, for metrics.json: the job's shape, threads, backend, precision and CPUs, and its
    model, data and task."""
    return {
        "world_size": env.rank.world_size, "nodes": cfg.nodes, "processes_per_node": cfg.compute.processes_per_node,
        "threads_per_process": env.threads, "backend": env.backend or "none", "precision": env.precision,
        "precision_option": cfg.precision.name, "isa": isa.detect().as_dict(), "cpus": env.cpus,
        "model": cfg.model.name, "dataset": cfg.dataset.name, "eval_split": cfg.dataset.eval_split,
        "task": task.name, "problem_type": task.problem_type, "labels": list(task.labels) or ["score"],
        "objective": cfg.objective, "train_pairs": len(encoded["train"]), "eval_pairs": len(encoded["eval"]),
    }


def log_result(result: dict, task: Task, encoded, job_dir: Path) -> None:
    splits = ["eval"] + [name for name in encoded if name.startswith("eval_")]  # and eval_mismatched (MNLI)
    shown = [f"{split}_{name}" for split in splits for name in metrics.names(task.name, task.num_labels)]
    log.info("%s; model and metrics in %s", ", ".join(f"{k} {result[k]:.4f}" for k in shown if k in result), job_dir)


def describe(task: Task) -> str:
    texts = " + ".join(task.text_columns)
    return f"{texts} -> score" if task.regression else f"{texts} -> {len(task.labels)} classes"


def predict_test_file(cfg: DictConfig, model, tokenizer, task: Task, job_dir: Path, precision: str) -> Path:
    """dataset.test_file with the trained model's predictions, as stage=predict writes them."""
    classifier = Classifier(SequenceLogits(model).eval(), tokenizer, cfg.dataset.max_seq_length, precision, task=task)
    path = test_file(cfg.dataset)
    target = Path(job_dir) / f"test_predictions{path.suffix.lower()}"
    with predictions.open_input(path, task, None, chunk_rows=4096) as reader:
        rows = predictions.write_predictions(classifier, reader, target, cfg.training.per_device_eval_batch_size)
    log.info("predicted the %d rows of %s into %s", rows, path, target)
    return target


def publish(result: dict, trainer, staged_model: Path, job_dir: Path, tracker) -> None:
    """The model, train log, metrics and plot into the job dir (rank 0), then to the trackers."""
    files.publish_dir(staged_model, job_dir / files.MODEL_DIR)
    files.write_train_log(job_dir / files.TRAIN_LOG_FILE, trainer.state.log_history)
    files.write_json(job_dir / files.METRICS_FILE, result)
    curves = plots.training_curves(job_dir / files.TRAIN_LOG_FILE, job_dir / plots.RUN_PLOT)
    if tracker:
        tracker.finish(result, [job_dir / files.METRICS_FILE, job_dir / files.TRAIN_LOG_FILE, curves])
