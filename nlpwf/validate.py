"""Input checks that turn a would-be traceback into one line naming the problem and the fix.

- Types: Hydra takes `nodes=two` or `training.learning_rate=fast` as strings, and neither
  OmegaConf (the config is untyped) nor TrainingArguments (it accepts any value) objects; the
  run would fail much later inside torch. Checked here against nlpwf's numeric keys and the
  type annotations of TrainingArguments.
- Before Hydra writes anything (StartCheck, a Hydra callback in conf/config.yaml): the output dir
  (Hydra would report a file in the way or a read-only disk as a traceback), and secrets typed
  as overrides (Hydra would save them in the job dir and its launchers log them).
- Storage errors during a run (disk full, read-only): `storage_problem` words them.
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import re
import shutil
import sys
import types
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nlpwf.errors import UserError

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object

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
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
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


def output_dir_problem(path: str | Path) -> str | None:
    """Why nlpwf could not write a job into `path`, or None. Looks at the nearest part that exists."""
    target = Path(path).expanduser().absolute()
    for existing in (target, *target.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            return f"{existing} is a file, not a directory"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is not writable (read-only file system or no permission)"
        return None
    return None


# Keys whose values are credentials: ...password, ...secret, ...api_key, ...hub_token. Not
# pad_token_id or tokenizer: "token" counts only alone or after a word that makes it a credential.
_SECRET_KEY = re.compile(r"(^|_)(password|passwd|secret|credentials?|api_?key|access_?key|account_?key|connection_?string)$"
                         r"|(^|_)(hub|auth|access|api|bearer|sas|refresh)_token$|^token$")


def secret_override(overrides) -> str | None:
    """The key of the first override that sets a credential, or None."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1].lower()):
            return key
    return None


class StartCheck(Callback):
    """Hydra callback, run before Hydra creates the run or sweep dir or logs any override."""

    def _fail(self, message: str) -> None:
        print(f"nlpwf: error: {message}", file=sys.stderr, flush=True)
        sys.exit(UserError.exit_code)

    def _check(self, key: str, config: DictConfig) -> None:
        secret = secret_override(config.hydra.overrides.task)
        if secret:
            # Overrides are saved in the job dir, logged by launchers, sent as Azure ML job tags
            # and tracking-run tags: a credential must come from the environment instead.
            self._fail(f"{secret} looks like a credential, and command-line overrides are saved, logged and sent "
                       f"as job tags: remove it and set it in the environment (e.g. HF_TOKEN, WANDB_API_KEY)")
        path = OmegaConf.select(config, key)
        problem = output_dir_problem(str(path))
        if problem:
            self._fail(f"{key}={path}: {problem}: set {key} to a writable folder")

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.run.dir", config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check("hydra.sweep.dir", config)


_STORAGE_TEXT = ("No space left on device", "file write failed", "os error 28", "Disk quota exceeded", "Read-only file system")


def storage_problem(exc: BaseException, job_dir: Path | None) -> str | None:
    """One line for a write that failed because the disk is full or read-only, else None.
    torch.save reports a full disk without an errno ("file write failed", "unexpected pos",
    "iostream error"), so a failure on a disk with (almost) nothing left counts too."""
    where = Path(getattr(exc, "filename", None) or job_dir or ".")
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) and isinstance(exc, OSError):
        return f"cannot write {where}: {os.strerror(code)}: set hydra.run.dir to a writable folder"
    free = _free_bytes(job_dir or where)
    if code in (errno.ENOSPC, errno.EDQUOT) or any(t in text for t in _STORAGE_TEXT) or free < _ALMOST_FULL:
        return (f"the disk is full writing to {job_dir or where} ({free / 2**20:.1f} MiB free): free some space or "
                f"set hydra.run.dir to a bigger disk, then continue with training.resume=auto")
    return None


_ALMOST_FULL = 4 * 2**20


def _free_bytes(path: Path) -> float:
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return float("inf")
