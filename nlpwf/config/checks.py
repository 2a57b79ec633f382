"""Config checks that turn a would-be traceback into one line naming the problem and the fix.

Hydra takes `nodes=two` or `training.learning_rate=fast` as strings, and neither OmegaConf
(the config is untyped) nor TrainingArguments (it accepts any value) objects; the run would
fail much later inside torch. Checked here against nlpwf's numeric keys and the type
annotations of TrainingArguments, with the job's shape (nodes, processes, threads), before
any process starts or any file is written.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing

from omegaconf import DictConfig, OmegaConf

from nlpwf.errors import UserError

# The `precision` options (conf/precision/): auto is decided per node by nlpwf.runtime.isa.
PRECISIONS = ("auto", "fp32", "bf16")


# nlpwf's own numeric keys (TrainingArguments fields are checked from their annotations).
# key: (type, may be null, an example for the message)
NUMERIC_KEYS = {
    "nodes": (int, False, 1), "compute.processes_per_node": (int, False, 2), "compute.threads_per_process": (int, True, 4),
    "dataset.max_seq_length": (int, False, 128), "dataset.max_train_samples": (int, True, 1000),
    "dataset.max_eval_samples": (int, True, 200), "dataset.pad_to_multiple_of": (int, True, 8),
}


POSITIVE = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
            "gradient_accumulation_steps", "save_steps", "eval_steps", "logging_steps")


def _kind(t: type) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false"}[t]


def _fits(value, t: type) -> bool:
    if isinstance(value, bool):
        return t is bool
    if t is float:
        return isinstance(value, (int, float))
    return isinstance(value, t)


def _check(key: str, value, t: type, nullable: bool, example) -> None:
    if value is None and nullable:
        return
    if value is None or not _fits(value, t):
        shown = "null" if value is None else repr(value) if isinstance(value, str) else value
        raise UserError(f"{key}={shown} must be {_kind(t)}{' or null' if nullable else ''}: e.g. {key}={example}")


def _scalar_type(annotation) -> tuple[type | None, bool]:
    """(int/float/bool, accepts None) for a simple annotation; (None, _) for anything else."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    args = typing.get_args(annotation) if union else (annotation,)
    nullable = type(None) in args
    scalars = [a for a in args if a in (int, float, bool)]
    if len(scalars) != 1 or any(a not in (int, float, bool, type(None)) for a in args):
        return None, nullable  # strings, enums, dicts: TrainingArguments checks those itself
    return scalars[0], nullable


def config_types(cfg: DictConfig) -> None:
    for key, (t, nullable, example) in NUMERIC_KEYS.items():
        if OmegaConf.select(cfg, key, default="__absent__") != "__absent__":
            _check(key, OmegaConf.select(cfg, key), t, nullable, example)
    training_types(OmegaConf.to_container(cfg.training, resolve=True))


def training_types(training: dict) -> None:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    for name, value in training.items():
        if name not in hints:
            continue  # unknown names are reported with a spelling hint by train.training_arguments
        t, nullable = _scalar_type(hints[name])
        if t is not None:
            example = defaults.get(name)
            if t is bool or example in (None, dataclasses.MISSING):
                example = "true" if t is bool else 1
            _check(f"training.{name}", value, t, nullable, example)
    # Zero or negative values TrainingArguments accepts and training then dies on (save_steps=0
    # divides by zero, a batch of 0 builds no batches).
    for name in POSITIVE:
        if training.get(name) is not None and training[name] <= 0:
            raise UserError(f"training.{name}={training[name]} must be above 0: e.g. training.{name}={defaults[name]}")
    if training.get("max_steps", -1) <= 0 and training.get("num_train_epochs", 1) <= 0:
        raise UserError(f"training.num_train_epochs={training['num_train_epochs']} trains nothing: use 1 or more")


def spelling_hint(name: str) -> str:
    from transformers import TrainingArguments

    close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(TrainingArguments)], n=1, cutoff=0.75)
    return f"did you mean training.{close[0]}?" if close else "check the spelling against transformers' TrainingArguments"


def check_layout(nodes: int, processes_per_node: int) -> None:
    """nodes x processes: the one check for local, emulated and Azure ML jobs."""
    if nodes < 1:
        raise UserError(f"nodes={nodes}: a job needs at least one node, e.g. nodes=1")
    if processes_per_node < 1:
        raise UserError(f"compute.processes_per_node={processes_per_node}: use 1 or more")


PROBLEMS = ("classification", "regression")


def dataset_keys(dataset: DictConfig) -> None:
    """The task keys of the `dataset` group, which no data is needed to check."""
    problem = dataset.get("problem")
    if problem is not None and problem not in PROBLEMS:
        raise UserError(f"dataset.problem={problem} is unknown: use classification, regression, or null to detect it from the labels")
    columns = dataset.get("text_columns")
    if columns is not None:
        columns = [columns] if isinstance(columns, str) else list(columns)
        if not 1 <= len(columns) <= 2 or not all(isinstance(c, str) and c for c in columns):
            raise UserError(f"dataset.text_columns={columns}: give one text column or two (a pair), "
                            f"e.g. dataset.text_columns=[text] or dataset.text_columns=[question,answer]")
    for key in ("train_file", "eval_file", "test_file", "label_column", "data_dir"):
        value = dataset.get(key)
        if value is not None and not isinstance(value, str):
            raise UserError(f"dataset.{key}={value} must be a path or name, e.g. dataset.{key}=train.csv")


def check_job(cfg: DictConfig) -> None:
    """Checks that need no data or weights, done before any process starts or file is written."""
    config_types(cfg)  # `nodes=two` would otherwise fail below as a TypeError
    check_layout(cfg.nodes, cfg.compute.processes_per_node)
    if cfg.compute.threads_per_process is not None and cfg.compute.threads_per_process < 1:
        raise UserError(f"compute.threads_per_process={cfg.compute.threads_per_process}: use 1 or more, or null for cores / processes")
    if cfg.dataset.max_seq_length < 8:
        raise UserError(f"dataset.max_seq_length={cfg.dataset.max_seq_length} tokens leaves almost no room for text after the "
                        f"model's special tokens: use 64 to 512")
    dataset_keys(cfg.dataset)
    if cfg.precision.name not in PRECISIONS:
        raise UserError(f"precision={cfg.precision.name} is not supported: use precision=auto (the default), fp32 or bf16")
