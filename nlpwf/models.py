"""Where a model's tokenizer and weights come from: a Python package that ships them
(`package:NAME`, whose `get_model_path()` gives the folder), a local folder, or a Hub id."""
from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from nlpwf import hub
from nlpwf.errors import UserError

PACKAGE_PREFIX = "package:"


def resolve_source(source: str) -> tuple[str, bool]:
    """Return (path or hub id, whether it must come from the Hub)."""
    if source.startswith(PACKAGE_PREFIX):
        name = source[len(PACKAGE_PREFIX):]
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"model source {source}: package {name} is not installed: pip install {name.replace('_', '-')}") from e
        return str(module.get_model_path()), False
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser()), False
    if Path(source).expanduser().exists():  # not a Hub id either: say so instead of trying the Hub
        raise UserError(f"model source {source} is a file, not a folder: point model.source at a save_pretrained folder")
    return source, True


def _from_pretrained(loader, source: str, what: str, **kwargs):
    path, from_hub = resolve_source(source)
    if not from_hub:
        try:
            return loader(path, local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} does not hold a saved {what} ({e.__class__.__name__}): point model.source at a save_pretrained folder") from e
    # A Hub model may already be in the local cache; only go to the network if it is not.
    try:
        return loader(path, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not hub.reachable():
        raise UserError(
            f"the Hugging Face Hub is unreachable (offline) and {path} is not cached: "
            f"use model=minilm_l6 (ships with pip), or set model.source=DIR to a saved model"
        )
    return loader(path, **kwargs)


def max_positions(cfg: DictConfig) -> int:
    """The longest sequence the model can take, known before any weights are loaded."""
    if cfg.random_init:
        return int(cfg.config.get("max_position_embeddings", 512))
    config = _from_pretrained(AutoConfig.from_pretrained, cfg.source, "model config")
    return int(config.max_position_embeddings)


def load_tokenizer(cfg: DictConfig):
    return _from_pretrained(AutoTokenizer.from_pretrained, cfg.tokenizer, "tokenizer")


def load_model(cfg: DictConfig, num_labels: int = 2):
    if cfg.random_init:
        config = BertConfig(num_labels=num_labels, **OmegaConf.to_container(cfg.config))
        return AutoModelForSequenceClassification.from_config(config)
    return _from_pretrained(AutoModelForSequenceClassification.from_pretrained, cfg.source, "model", num_labels=num_labels)
