"""Sentence-pair data: GLUE TSV folders, the Hugging Face Hub, and the shipped sample.

Every source ends as a `datasets.DatasetDict` with `train` and `eval` splits holding
`sentence1`, `sentence2`, `label`, so tokenisation and training never care where it came from.
"""
from __future__ import annotations

import csv
from pathlib import Path

import datasets
from omegaconf import DictConfig

from nlpwf import hub
from nlpwf.errors import UserError

SAMPLE_DIR = Path(__file__).parent / "resources"
# Split names as the Hub names them, and the GLUE file each is read from.
GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
GLUE_COLUMNS = {"label": "Quality", "sentence1": "#1 String", "sentence2": "#2 String"}


def read_glue_tsv(path: Path) -> dict[str, list]:
    """Read a GLUE paraphrase TSV exactly as GLUE writes it.

    GLUE's files are tab separated with no quoting (MRPC has stray `"` that a CSV reader
    would treat as quotes and silently merge rows) and start with a UTF-8 byte-order mark.
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if not header:
            raise UserError(f"{path} is empty: it needs a header line and at least one labelled pair")
        missing = [c for c in GLUE_COLUMNS.values() if c not in header]
        if missing:
            raise UserError(
                f"{path} has no column {', '.join(map(repr, missing))}: expected GLUE's header "
                f"'Quality, #1 ID, #2 ID, #1 String, #2 String' (GLUE's own test.tsv is unlabelled; "
                f"use a labelled file or dataset.eval_split=validation)"
            )
        index = {name: header.index(col) for name, col in GLUE_COLUMNS.items()}
        out: dict[str, list] = {"sentence1": [], "sentence2": [], "label": []}
        for lineno, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(
                    f"{path}:{lineno}: expected {len(header)} tab-separated columns, found {len(row)}: "
                    f"fix that line (GLUE files use tabs and no quoting)"
                )
            label = row[index["label"]].strip()
            if label not in ("0", "1"):
                raise UserError(f"{path}:{lineno}: label {label!r} is not 0 or 1: fix the Quality column")
            out["label"].append(int(label))
            out["sentence1"].append(row[index["sentence1"]])
            out["sentence2"].append(row[index["sentence2"]])
    if not out["label"]:
        raise UserError(f"{path} has no rows: an empty split cannot be trained or evaluated on")
    return out


def _from_folder(data_dir: Path, split: str) -> datasets.Dataset:
    if split not in GLUE_FILES:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(GLUE_FILES)}")
    path = data_dir / GLUE_FILES[split]
    if not path.is_file():
        raise UserError(f"{path} not found: dataset.data_dir must hold GLUE's {GLUE_FILES[split]}")
    return datasets.Dataset.from_dict(read_glue_tsv(path))


def _from_hub(hub_id: str, hub_config: str | None, split: str) -> datasets.Dataset:
    advice = "set dataset.data_dir=DIR (a GLUE folder with train.tsv and dev.tsv) or use dataset=paraphrase_sample"
    if not hub.reachable():
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


def tokenize(splits: datasets.DatasetDict, tokenizer, max_length: int, pad_to_max_length: bool) -> datasets.DatasetDict:
    """Sentence-pair encoding. Without `pad_to_max_length` each batch is padded later to
    its own longest pair by the collator, which is most of the speed on CPU."""

    def encode(batch):
        return tokenizer(
            batch["sentence1"], batch["sentence2"], truncation=True, max_length=max_length,
            padding="max_length" if pad_to_max_length else False,
        )

    encoded = splits.map(encode, batched=True, remove_columns=["sentence1", "sentence2"], desc="Tokenizing")
    return encoded.rename_column("label", "labels")
