"""Sentence-pair data: GLUE TSV folders, the Hugging Face Hub, and the shipped sample.

Every source ends as a `datasets.DatasetDict` with `train` and `eval` splits holding
`sentence1`, `sentence2`, `label`, so tokenisation and training never care where it came from.
"""
from __future__ import annotations

from pathlib import Path

import datasets
from omegaconf import DictConfig

from nlpwf.data.glue import GLUE_FILES, read_glue_tsv
from nlpwf.errors import UserError
from nlpwf.runtime import network

SAMPLE_DIR = Path(__file__).parent / "resources"


def _from_folder(data_dir: Path, split: str) -> datasets.Dataset:
    if split not in GLUE_FILES:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(GLUE_FILES)}")
    path = data_dir / GLUE_FILES[split]
    if not path.is_file():
        raise UserError(f"{path} not found: dataset.data_dir must hold GLUE's {GLUE_FILES[split]}")
    return datasets.Dataset.from_dict(read_glue_tsv(path))


def _from_hub(hub_id: str, hub_config: str | None, split: str) -> datasets.Dataset:
    advice = "set dataset.data_dir=DIR (a GLUE folder with train.tsv and dev.tsv) or use dataset=paraphrase_sample"
    if not network.hub_reachable():
        raise UserError(f"the Hugging Face Hub is unreachable (offline) so {hub_id} cannot be downloaded: {advice}")
    try:
        ds = datasets.load_dataset(hub_id, hub_config, split=split)
    except Exception as e:  # network, auth, unknown split: all fixed the same way
        raise UserError(f"could not load {hub_id}/{hub_config} split {split!r} from the Hub ({type(e).__name__}): {advice}") from e
    if len(ds) == 0:
        raise UserError(f"{hub_id}/{hub_config} split {split!r} is empty: choose another dataset.eval_split")
    labels = set(ds.unique("label"))
    if not labels <= {0, 1}:
        raise UserError(f"{hub_id}/{hub_config} split {split!r} has labels {sorted(labels)} (unlabelled?): choose a labelled split")
    return ds.select_columns(["sentence1", "sentence2", "label"])


def data_dir(cfg: DictConfig) -> Path | None:
    if cfg.get("sample"):
        return SAMPLE_DIR / cfg.sample
    if cfg.data_dir is None:
        return None
    path = Path(cfg.data_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"dataset.data_dir={cfg.data_dir} is not a directory: point it at a folder with train.tsv and dev.tsv")
    return path


def load_splits(cfg: DictConfig) -> datasets.DatasetDict:
    """`cfg` is the `dataset` node; returns splits `train` and `eval`."""
    folder = data_dir(cfg)
    if folder is None and not cfg.get("hub_id"):
        raise UserError(f"dataset {cfg.name} has neither data_dir nor hub_id: set dataset.data_dir=DIR")
    load = (lambda split: _from_folder(folder, split)) if folder else (lambda split: _from_hub(cfg.hub_id, cfg.hub_config, split))
    splits = {"train": load(cfg.train_split), "eval": load(cfg.eval_split)}
    for name, n in (("train", cfg.get("max_train_samples")), ("eval", cfg.get("max_eval_samples"))):
        if n is not None:
            splits[name] = splits[name].select(range(min(n, len(splits[name]))))
    return datasets.DatasetDict(splits)
