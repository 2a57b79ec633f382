"""Fine-tuning, top to bottom: data, model, transformers' Trainer, then metrics and model out.

Runs in one process: a single-process job, or one rank of a distributed job started by the
local launcher, torchrun or Azure ML (see distributed.py). Only rank 0 writes results.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from nlpwf import data, distributed, metrics, models, outputs, perf
from nlpwf import checkpoints, faults, plots, progress, tracking, validate
from nlpwf.errors import Interrupted, UserError

log = logging.getLogger(__name__)


def check(cfg: DictConfig) -> None:
    """Checks that need no data or weights, done before any process starts or file is written."""
    validate.config_types(cfg)  # `nodes=two` would otherwise fail below as a TypeError
    if cfg.nodes < 1:
        raise UserError(f"nodes={cfg.nodes}: a job needs at least one node, e.g. nodes=1")
    if cfg.compute.processes_per_node < 1:
        raise UserError(f"compute.processes_per_node={cfg.compute.processes_per_node}: use 1 or more")
    if cfg.compute.threads_per_process is not None and cfg.compute.threads_per_process < 1:
        raise UserError(f"compute.threads_per_process={cfg.compute.threads_per_process}: use 1 or more, or null for cores / processes")
    if cfg.dataset.max_seq_length < 8:
        raise UserError(f"dataset.max_seq_length={cfg.dataset.max_seq_length} is too short for a sentence pair: use 64 to 512")
    if cfg.precision.name not in ("fp32", "bf16"):
        raise UserError(f"precision={cfg.precision.name} is not supported: use precision=fp32 or precision=bf16")


def check_model_limits(cfg: DictConfig) -> None:
    limit = models.max_positions(cfg.model)
    if cfg.dataset.max_seq_length > limit:
        raise UserError(
            f"dataset.max_seq_length={cfg.dataset.max_seq_length} is above {cfg.model.name}'s limit of {limit} "
            f"positions: set dataset.max_seq_length={min(limit, 512)} or lower"
        )


# Fields users remember from transformers 4.x, and what replaced them.
RENAMED = {
    "warmup_ratio": "use training.warmup_steps=0.1 (a float below 1 is a fraction of the steps)",
    "evaluation_strategy": "use training.eval_strategy",
    "group_by_length": "use training.train_sampling_strategy=group_by_length",
    "use_ipex": "IPEX is applied by nlpwf when installed; remove the key",
    "no_cuda": "remove it (nlpwf always trains on CPU)",
}


def preflight(cfg: DictConfig) -> None:
    """Everything that can reject the input, run once before worker processes start, so a
    mistake is reported once and not by every rank."""
    check(cfg)
    check_model_limits(cfg)
    data.load_splits(cfg.dataset)


def training_arguments(cfg: DictConfig, job_dir: Path) -> TrainingArguments:
    kwargs = OmegaConf.to_container(cfg.training, resolve=True)
    kwargs.pop("resume", None)  # nlpwf's own key (checkpoints.resume_point)
    kwargs.update(
        output_dir=str(job_dir / checkpoints.CHECKPOINT_DIR),
        save_total_limit=None,  # nlpwf rotates, counting complete checkpoints only (checkpoints.py)
        use_cpu=True,
        bf16=cfg.precision.name == "bf16",
        report_to=tracking.report_to(cfg.logger),
    )
    if kwargs.get("enable_jit_checkpoint"):
        raise UserError("training.enable_jit_checkpoint: nlpwf already checkpoints on SIGTERM (a checkpoint marked "
                        "complete, which training.resume=auto can use; transformers' would not be): remove the key")
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(TrainingArguments)})
    if unknown:
        name = unknown[0]
        hint = RENAMED.get(name) or validate.spelling_hint(name)
        raise UserError(f"training.{name} is not a TrainingArguments field in transformers {transformers.__version__}: {hint}")
    try:
        return TrainingArguments(**kwargs)
    except ValueError as e:
        raise UserError(f"invalid training settings: {str(e).splitlines()[0]}") from e


def run(cfg: DictConfig, job_dir: Path) -> dict | None:
    """Train and evaluate. Returns the metrics on rank 0, None on other ranks."""
    rank = distributed.from_env() or distributed.Rank()
    if not rank.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    threads = int(os.environ.get("OMP_NUM_THREADS") or distributed.threads_per_process(cfg.compute.threads_per_process, local_world))
    distributed.set_threads(threads)
    tuning = perf.setup_process(cfg.get("perf"), rank, local_world, threads)
    backend = distributed.init_process_group(rank, cfg.training.ddp_timeout) if rank.world_size > 1 else None

    check(cfg)
    check_model_limits(cfg)
    splits = data.load_splits(cfg.dataset)
    tokenizer = models.load_tokenizer(cfg.model)
    encoded = data.tokenize(splits, tokenizer, cfg.dataset.max_seq_length, cfg.dataset.pad_to_max_length)

    args = training_arguments(cfg, job_dir)
    set_seed(args.seed)  # before the model, so a random-init or a new classifier head is reproducible
    sigterm = checkpoints.StopOnSigterm()
    trainer = Trainer(
        model=models.load_model(cfg.model),
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["eval"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.dataset.get("pad_to_multiple_of")),
        compute_metrics=metrics.from_eval_prediction,
        callbacks=[checkpoints.CheckpointCallback(cfg.training.get("save_total_limit")), sigterm],
    )
    resume = checkpoints.resume_point(cfg.training.get("resume"), Path(args.output_dir), rank.is_main)
    progress.install(trainer)  # line-based progress in log files
    tracker = tracking.start(cfg, job_dir, rank.is_main)  # before train(): the integrations reuse its runs
    recorder = perf.attach(trainer, cfg.get("perf"), tuning, bf16=args.bf16)
    log.info("training %s on %s: %d train / %d eval pairs, world size %d, %s, %d thread(s) per process",
             cfg.model.name, cfg.dataset.name, len(encoded["train"]), len(encoded["eval"]), rank.world_size,
             cfg.precision.name, threads)
    with faults.peer_loss(rank, Path(args.output_dir), job_dir):  # a lost rank: one line, not a gloo stack
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    if sigterm.stopped_at is not None:  # not the end of training: nothing is evaluated or published
        raise Interrupted(f"training stopped by SIGTERM at step {sigterm.stopped_at} of {trainer.state.max_steps}; "
                          f"{faults.resume_hint(Path(args.output_dir), job_dir)}")
    eval_metrics = _final_eval(trainer)

    digests = distributed.parameter_digests(trainer.model)
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP replicas ended with different parameters (digests {digests}): training is not synchronised")
    staged = outputs.staging_dir(job_dir / outputs.MODEL_DIR) if rank.is_main else None
    trainer.save_model(str(staged) if staged else None)  # only the main process writes
    if not rank.is_main:
        return None
    result = {
        **train_metrics, **eval_metrics,
        "world_size": rank.world_size, "nodes": cfg.nodes, "processes_per_node": cfg.compute.processes_per_node,
        "threads_per_process": threads, "backend": backend or "none", "precision": cfg.precision.name,
        "model": cfg.model.name, "dataset": cfg.dataset.name, "eval_split": cfg.dataset.eval_split,
        "train_pairs": len(encoded["train"]), "eval_pairs": len(encoded["eval"]),
        "parameter_digests": digests, **recorder.report(),
    }
    outputs.publish_dir(staged, job_dir / outputs.MODEL_DIR)
    outputs.write_train_log(job_dir / outputs.TRAIN_LOG_FILE, trainer.state.log_history)
    outputs.write_json(job_dir / outputs.METRICS_FILE, result)
    curves = plots.training_curves(job_dir / outputs.TRAIN_LOG_FILE, job_dir / plots.RUN_PLOT)
    if tracker:
        tracker.finish(result, [job_dir / outputs.METRICS_FILE, job_dir / outputs.TRAIN_LOG_FILE, curves])
    log.info("eval_accuracy %.4f, eval_f1 %.4f; model and metrics in %s", result["eval_accuracy"], result["eval_f1"], job_dir)
    return result


def _final_eval(trainer: Trainer) -> dict:
    """The evaluation at the last step if the schedule already ran it, else a new one."""
    history = [h for h in trainer.state.log_history if "eval_loss" in h]
    if history and history[-1].get("step") == trainer.state.global_step:
        return {k: v for k, v in history[-1].items() if k.startswith("eval_")}
    return trainer.evaluate()
