"""A job's data: the `dataset` config to a Task and its splits, from wherever the data lives.

    dataset.train_file / eval_file   your own CSV, TSV, JSON Lines or Parquet files (files.py)
    dataset.data_dir (or a sample)   a GLUE folder as GLUE distributes it (glue.py)
    dataset.hub_id                   a Hugging Face Hub dataset

Every source ends as a `datasets.DatasetDict` with splits `train`, `eval` and, for MNLI, the
further eval splits (`eval_mismatched`), each of `sentence1` (and `sentence2`) and `label`, and
a `Task` that says what the label is (tasks.py). Tokenisation, training and the serving stages
never care where the data came from.
"""
from __future__ import annotations

from pathlib import Path

import datasets
from omegaconf import DictConfig

from nlpwf.data import files, glue
from nlpwf.data.tasks import Task, prepare
from nlpwf.errors import UserError
from nlpwf.runtime import network

SAMPLE_DIR = Path(__file__).parent / "resources"


def load_splits(cfg: DictConfig) -> tuple[Task, datasets.DatasetDict]:
    """`cfg` is the `dataset` node. Returns the task and its splits: `train`, `eval`, and one
    `eval_NAME` for each of `dataset.extra_eval_splits` (MNLI's mismatched dev set)."""
    glue_task = glue.task(cfg.task) if cfg.get("task") else None
    problem = cfg.get("problem")  # its value was checked with the config (config.checks.dataset_keys)
    if glue_task is not None and problem is not None and (problem == "regression") != glue_task.regression:
        raise UserError(f"dataset.problem={problem} does not fit GLUE's {glue_task.title}, whose label is "
                        f"{'a score' if glue_task.regression else 'a class'}: remove dataset.problem")
    wanted = {"train": cfg.train_split, "eval": cfg.eval_split,
              **{f"eval_{name}": split for name, split in (cfg.get("extra_eval_splits") or {}).items()}}
    folder = data_dir(cfg)

    if cfg.get("train_file"):  # your own files
        if not cfg.get("eval_file"):
            raise UserError("dataset.train_file needs dataset.eval_file too: a labelled file to evaluate on")
        paths = {"train": _path(folder, cfg.train_file), "eval": _path(folder, cfg.eval_file)}
        keys = {"train": "dataset.train_file", "eval": "dataset.eval_file"}
        raw = {split: files.read_file(path, keys[split]) for split, path in paths.items()}
        untyped = all(files.untyped(p) for p in paths.values())
        task, splits = prepare(raw, {s: str(p) for s, p in paths.items()}, _task_name(cfg, glue_task),
                               _text_columns(cfg, glue_task), cfg.get("label_column") or "label", problem, untyped)
    elif folder is not None:  # a GLUE folder: the task says how its files are laid out
        if glue_task is None:
            raise UserError(f"dataset.data_dir={cfg.data_dir} needs a GLUE task to read it (dataset=cola, sst2, mrpc, qqp, "
                            f"stsb, mnli, qnli, rte or wnli); for your own files use dataset=files with dataset.train_file")
        splits = {name: glue.read_split(glue_task, _glue_file(glue_task, folder, split)) for name, split in wanted.items()}
        task = glue_task.as_task()
    elif cfg.get("hub_id"):
        raw = {name: _from_hub(cfg.hub_id, cfg.get("hub_config"), split) for name, split in wanted.items()}
        where = {name: f"{cfg.hub_id}/{cfg.get('hub_config')} split {split!r}" for name, split in wanted.items()}
        task, splits = prepare(raw, where, _task_name(cfg, glue_task), _text_columns(cfg, glue_task),
                               cfg.get("label_column") or "label", problem, untyped=False)
    else:
        raise UserError(f"dataset {cfg.name} has no data: set dataset.data_dir=DIR (a GLUE folder), "
                        f"dataset.train_file and dataset.eval_file, or dataset.hub_id")

    for name, n in (("train", cfg.get("max_train_samples")), ("eval", cfg.get("max_eval_samples"))):
        if n is not None:  # the first n rows, as run_glue takes them
            splits[name] = splits[name].select(range(min(n, len(splits[name]))))
    return task, datasets.DatasetDict(splits)


def test_file(cfg: DictConfig) -> Path | None:
    """dataset.test_file (relative to dataset.data_dir when that is set), or None."""
    return _path(data_dir(cfg), cfg.test_file) if cfg.get("test_file") else None


def _task_name(cfg: DictConfig, glue_task: glue.GlueTask | None) -> str:
    """Saved as the model's finetuning_task: the GLUE task, whose metrics the serving stages then use."""
    return glue_task.name if glue_task else cfg.name


def _text_columns(cfg: DictConfig, glue_task: glue.GlueTask | None):
    configured = cfg.get("text_columns")
    if configured is None and glue_task is not None:
        return list(glue_task.texts)  # the Hub's names for the task's texts
    return list(configured) if configured is not None and not isinstance(configured, str) else configured


def _path(folder: Path | None, name: str) -> Path:
    """A file named relative to dataset.data_dir (or a sample's folder) when one is set."""
    path = Path(name).expanduser()
    return folder / path if folder is not None and not path.is_absolute() else path


def _glue_file(glue_task: glue.GlueTask, folder: Path, split: str) -> Path:
    path = glue.split_file(glue_task, folder, split)
    if not path.is_file():
        raise UserError(f"{path} not found: dataset.data_dir must hold GLUE's {glue_task.title} {path.name}")
    return path


def _from_hub(hub_id: str, hub_config: str | None, split: str) -> datasets.Dataset:
    advice = ("set dataset.data_dir=DIR (a GLUE folder with train.tsv and dev.tsv), use dataset=files with your own files, "
              "or use dataset=paraphrase_sample")
    if not network.hub_reachable():
        raise UserError(f"the Hugging Face Hub is unreachable (offline) so {hub_id} cannot be downloaded: {advice}")
    try:
        ds = datasets.load_dataset(hub_id, hub_config, split=split)
    except Exception as e:  # network, auth, unknown split: all fixed the same way
        raise UserError(f"could not load {hub_id}/{hub_config} split {split!r} from the Hub ({type(e).__name__}): {advice}") from e
    if len(ds) == 0:
        raise UserError(f"{hub_id}/{hub_config} split {split!r} is empty: choose another dataset.eval_split")
    return ds


def data_dir(cfg: DictConfig) -> Path | None:
    if cfg.get("sample"):
        return SAMPLE_DIR / cfg.sample
    if cfg.get("data_dir") is None:
        return None
    path = Path(cfg.data_dir).expanduser()
    if not path.is_dir():
        what = ("the folder of dataset.train_file and dataset.eval_file" if cfg.get("train_file")
                else "a folder with train.tsv and dev.tsv" if not cfg.get("task") or cfg.task != "mnli"
                else "a folder with train.tsv and dev_matched.tsv")
        raise UserError(f"dataset.data_dir={cfg.data_dir} is not a directory: point it at {what}")
    return path
