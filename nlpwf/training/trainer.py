"""transformers' Trainer, assembled from the config: arguments, collator, metrics and nlpwf's
callbacks (complete checkpoints, stop on SIGTERM, line progress)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from nlpwf import models
from nlpwf.config.checks import spelling_hint
from nlpwf.data.tasks import Task
from nlpwf.errors import UserError
from nlpwf.results import metrics
from nlpwf.training import checkpoints, progress
from nlpwf.training.sigterm import StopOnSigterm

# Fields users remember from transformers 4.x, and what replaced them.
RENAMED = {
    "warmup_ratio": "use training.warmup_steps=0.1 (a float below 1 is a fraction of the steps)",
    "evaluation_strategy": "use training.eval_strategy",
    "group_by_length": "use training.train_sampling_strategy=group_by_length",
    "use_ipex": "remove it (IPEX is retired; its CPU kernels are in PyTorch itself: docs/performance.md)",
    "no_cuda": "remove it (nlpwf always trains on CPU)",
}


def check_model_limits(cfg: DictConfig) -> None:
    limit = models.max_positions(cfg.model)
    if cfg.dataset.max_seq_length > limit:
        raise UserError(
            f"dataset.max_seq_length={cfg.dataset.max_seq_length} is above {cfg.model.name}'s limit of {limit} "
            f"positions: set dataset.max_seq_length={min(limit, 512)} or lower"
        )


def training_arguments(cfg: DictConfig, job_dir: Path, report_to: list[str], precision: str) -> TrainingArguments:
    """`precision`: fp32 or bf16, as resolved for this node (runtime.isa.resolve), never auto."""
    kwargs = OmegaConf.to_container(cfg.training, resolve=True)
    kwargs.pop("resume", None)  # nlpwf's own key (checkpoints.resume_point)
    kwargs.update(
        output_dir=str(checkpoints.folder_of(cfg, job_dir)),
        save_total_limit=None,  # nlpwf rotates, counting complete checkpoints only (checkpoints.py)
        use_cpu=True,
        bf16=precision == "bf16",
        report_to=report_to,
    )
    if kwargs.get("enable_jit_checkpoint"):
        raise UserError("training.enable_jit_checkpoint: nlpwf already checkpoints on SIGTERM (a checkpoint marked "
                        "complete, which training.resume=auto can use; transformers' would not be): remove the key")
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(TrainingArguments)})
    if unknown:
        name = unknown[0]
        hint = RENAMED.get(name) or spelling_hint(name)
        raise UserError(f"training.{name} is not a TrainingArguments field in transformers {transformers.__version__}: {hint}")
    try:
        return TrainingArguments(**kwargs)
    except ValueError as e:
        raise UserError(f"invalid training settings: {str(e).splitlines()[0]}") from e


class ObservedTrainer(Trainer):
    """Trainer that shows each training batch to the callbacks that define `on_train_batch(inputs)`
    (transformers' callback events carry no batch). Called where Trainer hands the batch to the
    model, outside any region torch.compile captures, so it also works for compiled models."""

    def training_step(self, model, inputs, *args, **kwargs):
        for callback in self.callback_handler.callbacks:
            observe = getattr(callback, "on_train_batch", None)
            if observe is not None:
                observe(inputs)
        return super().training_step(model, inputs, *args, **kwargs)


def build(cfg: DictConfig, args: TrainingArguments, encoded, tokenizer, task: Task,
          callbacks: list[TrainerCallback] = ()) -> tuple[Trainer, StopOnSigterm]:
    """The Trainer for `encoded` (splits `train` and `eval`), and its SIGTERM watcher. The model
    is created here, after the caller seeded the RNGs, with a head for `task` (its labels, or one
    output for a score). `callbacks` are added after nlpwf's own."""
    sigterm = StopOnSigterm()
    trainer = ObservedTrainer(
        model=models.load_model(cfg.model, **task.model_config()),
        args=args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["eval"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.dataset.get("pad_to_multiple_of")),
        compute_metrics=metrics.for_trainer(task.name, task.num_labels),
        callbacks=[checkpoints.CheckpointCallback(cfg.training.get("save_total_limit")), sigterm, *callbacks],
    )
    progress.install(trainer)  # line-based progress in log files
    return trainer, sigterm


def check_objective(objective: str | None, task: Task) -> None:
    """The job's objective must be a metric the task reports, or a sweep would optimise nothing
    (Optuna gets no value back) after every trial has trained."""
    reported = [f"eval_{name}" for name in metrics.names(task.name, task.num_labels)] + ["eval_loss"]
    if objective not in reported:
        kind = "score (regression)" if task.regression else f"{task.num_labels}-class"
        main = reported[0]
        raise UserError(f"objective={objective} is not a metric of this {kind} task, which reports {', '.join(reported)}: "
                        f"set dataset.objective={main} (or objective={main})")


def final_eval(trainer: Trainer, encoded) -> dict:
    """The evaluation at the last step if the schedule already ran it, else a new one; then each
    further eval split (`eval_NAME`, MNLI's mismatched) with its metrics named eval_NAME_*."""
    history = [h for h in trainer.state.log_history if "eval_loss" in h]
    if history and history[-1].get("step") == trainer.state.global_step:
        result = {k: v for k, v in history[-1].items() if k.startswith("eval_")}
    else:
        result = trainer.evaluate()
    for split in encoded:
        if split.startswith("eval_"):
            result.update(trainer.evaluate(encoded[split], metric_key_prefix=split))
    return result
