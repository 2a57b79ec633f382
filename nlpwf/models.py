"""The one place models and tokenizers are loaded from.

A training job names its model by `model.source`: a Python package that ships the weights
(`package:NAME`, whose `get_model_path()` gives the folder), a local folder, or a Hub id (the
local cache is tried before the network). The serving stages name a saved job's folder by
`stage.model_path`: the `model/` of a training job or the `model_int8/` of a quantize job.
"""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from nlpwf.errors import UserError
from nlpwf.runtime import network

PACKAGE_PREFIX = "package:"
# Files transformers' save_pretrained writes; one of the weight files must be there too.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
# Written by nlpwf's quantize stage into an INT8 folder (inference.int8): backend and origin.
QUANTIZED_MANIFEST = "nlpwf_quantized.json"
SAVED_MODEL_FIX = "point stage.model_path at a training job's model/ folder"


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


def _from_folder(loader, path: str, what: str, fix: str, **kwargs):
    try:
        return loader(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{path} does not hold a loadable {what} ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}): {fix}") from e


def _from_source(loader, source: str, what: str, **kwargs):
    path, from_hub = resolve_source(source)
    if not from_hub:
        return _from_folder(loader, path, what, "point model.source at a save_pretrained folder", **kwargs)
    # A Hub model may already be in the local cache; only go to the network if it is not.
    try:
        return loader(path, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not network.hub_reachable():
        raise UserError(
            f"the Hugging Face Hub is unreachable (offline) and {path} is not cached: "
            f"use model=minilm_l6 (ships with pip), or set model.source=DIR to a saved model"
        )
    return loader(path, **kwargs)


# ---- a model to train, from the `model` config group ---------------------------------------

# Set from the data (data.tasks.Task.model_config), never by hand.
HEAD_KEYS = ("num_labels", "id2label", "label2id", "problem_type")
# Settings that size a pretrained model's weights: changing one would leave them unloadable (or,
# with ignore_mismatched_sizes, silently re-initialised), so an override must equal the source's.
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
              "type_vocab_size", "embedding_size")


def model_config(cfg: DictConfig, **head):
    """The config a training job's model is built with: `model.config` over BERT's defaults
    with `model.random_init` (the architecture), otherwise over the source's config.json (for
    example hidden_dropout_prob), every key checked against what it goes over."""
    overrides = OmegaConf.to_container(cfg.config, resolve=True)
    base = BertConfig() if cfg.random_init else _from_source(AutoConfig.from_pretrained, cfg.source, "model config")
    known = base.to_dict()
    for key, value in overrides.items():
        if key in HEAD_KEYS:
            raise UserError(f"model.config.{key} is set from the data's labels: remove it "
                            f"(dataset.problem and the label column decide the head)")
        if key not in known:
            near = difflib.get_close_matches(key, [k for k in known if not k.startswith("_")], n=3, cutoff=0.5)
            raise UserError(f"model.config.{key} is not a setting of {cfg.name}'s {base.model_type} config: "
                            + (f"did you mean {' or '.join(near)}?" if near else "see its config.json for the keys"))
        if not cfg.random_init and key in SHAPE_KEYS and value != known[key]:
            raise UserError(f"model.config.{key}={value} would reshape {cfg.name}'s pretrained weights "
                            f"({key} is {known[key]}): remove it, or add model.random_init=true to train from scratch")
    base.update({**overrides, **head})
    return base


def max_positions(cfg: DictConfig) -> int:
    """The longest sequence the model can take, known before any weights are loaded."""
    return int(model_config(cfg).max_position_embeddings)


def load_tokenizer(cfg: DictConfig):
    return _from_source(AutoTokenizer.from_pretrained, cfg.tokenizer, "tokenizer")


def load_model(cfg: DictConfig, **head):
    """A sequence classifier with a new head. `head` is its config: id2label / label2id (or
    num_labels), problem_type and whatever else the model should remember (data.tasks.Task.
    model_config); it is saved in config.json with the weights. Without it: two labels."""
    config = model_config(cfg, **(head or {"num_labels": 2}))
    if cfg.random_init:
        return AutoModelForSequenceClassification.from_config(config)
    # A source that already has a head of another size (a model fine-tuned on another task)
    # gets a new one, as run_glue's ignore_mismatched_sizes does.
    return _from_source(AutoModelForSequenceClassification.from_pretrained, cfg.source, "model", config=config,
                        ignore_mismatched_sizes=True)


# ---- a saved job's model, named by `stage.model_path` ---------------------------------------

def is_quantized(folder: Path) -> bool:
    return (Path(folder) / QUANTIZED_MANIFEST).is_file()


def saved_model_dir(path: str | None, stage: str) -> Path:
    """The folder `stage.model_path` names, checked to be a saved model (fp32 or INT8)."""
    if not path:
        raise UserError(
            f"stage={stage} needs stage.model_path=DIR: the model/ folder of a training job "
            f"(e.g. outputs/DATE/TIME/model) or the model_int8/ folder of a quantize job"
        )
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"stage.model_path={path} is not a directory: {SAVED_MODEL_FIX}")
    if not (folder / "config.json").is_file():
        raise UserError(f"stage.model_path={path} is not a saved model (no config.json): {SAVED_MODEL_FIX}")
    if not is_quantized(folder) and not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"stage.model_path={path} has no weights ({' or '.join(WEIGHT_FILES[:2])}): {SAVED_MODEL_FIX}")
    return folder


def load_saved_tokenizer(folder: Path):
    return _from_folder(AutoTokenizer.from_pretrained, str(folder), "tokenizer",
                        "use a model/ folder saved by a training job, which includes it")


def load_saved_config(folder: Path):
    return _from_folder(AutoConfig.from_pretrained, str(folder), "model config", SAVED_MODEL_FIX)


def load_saved_model(folder: Path):
    return _from_folder(AutoModelForSequenceClassification.from_pretrained, str(folder), "model", SAVED_MODEL_FIX)
