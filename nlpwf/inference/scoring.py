"""The scoring contract of a served model: a JSON request in, a JSON answer out, every bad
request refused with one line that names the field.

Request and answer follow Hugging Face's text-classification inference convention:

    {"inputs": [{"text": "...", "text_pair": "..."}, "a single text", ...]}
    -> {"predictions": [{"label": "NAME", "probabilities": {"NAME": p, ...}}, ...]}   (classes)
    -> {"predictions": [{"score": x}, ...]}                                          (a regression head)

`inputs` may also be one string or one object (a batch of one). Predictions come back in input
order. A pair model needs `text_pair` on every item; a single-text model refuses one. The batch
holds 1 to `max_batch` items. A text longer than the model's token limit (`max_length`, with the
special tokens) is cut to it when `too_long` is "truncate" (the default: as pipeline() does), or
refused with 413 when it is "refuse".

The settings come from environment variables (`NLPWF_SERVE_*`), because that is how a managed
online deployment passes settings to its scoring script (the deployment's environment_variables);
`settings_env` writes them and `Settings.from_env` reads them back.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from nlpwf import models
from nlpwf.errors import UserError
from nlpwf.inference.classifier import Classifier

TRUNCATE, REFUSE = "truncate", "refuse"
ITEM_KEYS = ("text", "text_pair")
ENV_PREFIX = "NLPWF_SERVE_"


class BadRequest(Exception):
    """A request the contract refuses: HTTP `status`, the field at fault and one line saying why."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status

    def body(self) -> dict:
        # "message" is the key Azure's server uses for its own errors (404, 405, bad UTF-8): one key for clients.
        return {"message": str(self), "field": self.field}


@dataclass(frozen=True)
class Settings:
    max_batch: int = 64         # items per request
    max_length: int = 128       # tokens per item, special tokens included
    too_long: str = TRUNCATE    # or REFUSE
    precision: str = "fp32"     # an fp32 model: fp32, or bf16 (autocast); auto: bf16 where the CPU has it
    compile: bool = True        # INC INT8 models: inductor-compile the graph (warmed up in init)
    threads: int = 0            # torch threads per server worker; 0: the physical cores / workers
    workers: int = 1            # server worker processes on the instance (WORKER_COUNT)

    def check(self) -> Settings:
        if self.max_batch < 1:
            raise UserError(f"stage.max_batch={self.max_batch}: allow 1 or more items per request")
        if not 8 <= self.max_length <= 4096:
            raise UserError(f"stage.max_length={self.max_length}: use 8 to the model's position limit (e.g. 128)")
        if self.too_long not in (TRUNCATE, REFUSE):
            raise UserError(f"stage.too_long={self.too_long}: use {TRUNCATE} or {REFUSE}")
        if self.workers < 1 or self.threads < 0:
            raise UserError(f"stage.workers={self.workers}, stage.threads={self.threads}: use 1 or more workers, 0 or more threads")
        return self

    def env(self) -> dict[str, str]:
        """The settings as the scoring script's environment variables."""
        return {ENV_PREFIX + k.upper(): str(v).lower() if isinstance(v, bool) else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_env(cls, environ=os.environ) -> Settings:
        kwargs = {}
        for key, default in asdict(cls()).items():
            raw = environ.get(ENV_PREFIX + key.upper())
            if raw is not None:
                kwargs[key] = raw.lower() == "true" if isinstance(default, bool) else type(default)(raw)
        return cls(**kwargs).check()

    @classmethod
    def from_config(cls, stage) -> Settings:
        return cls(**{k: stage[k] for k in asdict(cls()) if stage.get(k) is not None}).check()


def find_model(model_dir: str | Path) -> Path:
    """The saved model under AZUREML_MODEL_DIR: that folder itself, or the one folder in it that holds a
    model (a registered folder model keeps its own name under NAME/VERSION, e.g. .../model or .../model_int8)."""
    root = Path(model_dir)
    if (root / "config.json").is_file():
        return root
    found = sorted(p for p in root.glob("*/config.json")) if root.is_dir() else []
    if len(found) != 1:
        held = ", ".join(sorted(p.name for p in root.iterdir())[:8]) if root.is_dir() else "nothing: not a folder"
        raise UserError(f"AZUREML_MODEL_DIR={root} should hold one saved model (config.json and weights) or one folder "
                        f"with it; it holds {held}: register a training job's model/ or a quantize job's model_int8/ folder")
    return found[0].parent


def describe(folder: Path) -> dict:
    """What the startup log says about a model folder: precision and INT8 backend, from its files alone."""
    if models.is_quantized(folder):
        manifest = json.loads((folder / models.QUANTIZED_MANIFEST).read_text())
        return {"precision": "int8", "backend": manifest.get("backend", "?")}
    return {"precision": "fp32", "backend": "fp32"}


# ---------------------------------------------------------------- the request

def parse_request(raw: str | bytes, pairs: bool, settings: Settings) -> list[tuple[str, str | None]]:
    """The request's items as (text, text_pair or None), in order; BadRequest for anything else."""
    if not raw or not raw.strip():
        # Azure's server hands run() the raw body only for a JSON (or unlabelled) content type; a form
        # post (curl -d without -H) reaches it empty.
        raise BadRequest("body", 'empty: POST a JSON object {"inputs": [...]} with Content-Type: application/json')
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest("body", f"not valid JSON ({getattr(e, 'msg', e)} at position {getattr(e, 'pos', 0)}): "
                                 'send {"inputs": [...]}') from None
    if not isinstance(body, dict):
        raise BadRequest("body", f"a JSON {_kind(body)}, not an object: send {{\"inputs\": [...]}}")
    unknown = sorted(set(body) - {"inputs"})
    if unknown:
        raise BadRequest(unknown[0], 'unknown field: a request holds only "inputs"')
    if "inputs" not in body:
        raise BadRequest("inputs", 'missing: send {"inputs": [...]}, one text or {"text": ..., "text_pair": ...} per item')
    inputs = body["inputs"]
    items = [inputs] if isinstance(inputs, (str, dict)) else inputs
    if not isinstance(items, list):
        raise BadRequest("inputs", f"a {_kind(inputs)}: give a list of texts or of {{\"text\", \"text_pair\"}} objects")
    if not items:
        raise BadRequest("inputs", "empty: give 1 or more items")
    if len(items) > settings.max_batch:
        raise BadRequest("inputs", f"{len(items)} items, over the limit of {settings.max_batch} per request: split the batch", 413)
    return [_item(item, f"inputs[{i}]" if isinstance(inputs, list) else "inputs", pairs) for i, item in enumerate(items)]


def _item(item, where: str, pairs: bool) -> tuple[str, str | None]:
    if isinstance(item, str):
        text, pair, field = item, None, where
    elif isinstance(item, dict):
        unknown = sorted(set(item) - set(ITEM_KEYS))
        if unknown:
            raise BadRequest(f"{where}.{unknown[0]}", 'unknown field: an item holds "text" and, for pairs, "text_pair"')
        if "text" not in item:
            raise BadRequest(f"{where}.text", "missing")
        text, pair, field = item["text"], item.get("text_pair"), f"{where}.text"
        if pair is not None and not isinstance(pair, str):
            raise BadRequest(f"{where}.text_pair", f"a {_kind(pair)}, not a string")
    else:
        raise BadRequest(where, f"a {_kind(item)}: give a string or {{\"text\": ..., \"text_pair\": ...}}")
    if not isinstance(text, str):
        raise BadRequest(field, f"a {_kind(text)}, not a string")
    if pairs and pair is None:
        raise BadRequest(f"{where}.text_pair", "missing: this model scores pairs; give {\"text\": ..., \"text_pair\": ...}")
    if not pairs and pair is not None:
        raise BadRequest(f"{where}.text_pair", "this model scores single texts: send only \"text\"")
    return text, pair


def _kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def check_lengths(classifier: Classifier, items: list[tuple[str, str | None]], settings: Settings) -> None:
    """With too_long=refuse: 413 naming the first item whose tokens exceed max_length."""
    if settings.too_long != REFUSE:
        return
    texts = [[t for t, _ in items]] + ([[p for _, p in items]] if items[0][1] is not None else [])
    lengths = [len(ids) for ids in classifier.tokenizer(*texts, truncation=False)["input_ids"]]
    for i, n in enumerate(lengths):
        if n > settings.max_length:
            raise BadRequest(f"inputs[{i}]", f"{n} tokens, over the limit of {settings.max_length}: shorten it "
                                             "(this server refuses long texts; too_long=truncate would cut them)", 413)


# ---------------------------------------------------------------- the answer

def predictions(classifier: Classifier, items: list[tuple[str, str | None]], batch_size: int) -> list[dict]:
    """One prediction per item, in input order: label and class probabilities, or a score."""
    texts = [[t for t, _ in items]] + ([[p for _, p in items]] if items[0][1] is not None else [])
    predicted, probs = classifier.predict(*texts, batch_size=batch_size)
    if probs is None:
        return [{"score": float(s)} for s in predicted]
    names = classifier.task.shown_labels()
    return [{"label": names[int(i)], "probabilities": {n: float(p) for n, p in zip(names, row)}}
            for i, row in zip(predicted, probs)]


def score(classifier: Classifier, raw: str | bytes, settings: Settings) -> dict:
    """The whole contract for one request: parse, check lengths, predict (BadRequest for a bad request)."""
    items = parse_request(raw, pairs=len(classifier.task.text_columns) == 2, settings=settings)
    check_lengths(classifier, items, settings)
    return {"predictions": predictions(classifier, items, batch_size=settings.max_batch)}
