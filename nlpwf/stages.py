"""What a job does, chosen by the `stage` config group. Each stage is `run(cfg, job_dir) -> metrics`."""
from __future__ import annotations

import importlib
from typing import Callable

from omegaconf import DictConfig

from nlpwf.errors import UserError

# Imported on demand: a stage's heavy dependencies (e.g. Neural Compressor) load only when used.
STAGES = {"train": "nlpwf.train", "evaluate": "nlpwf.evaluate", "predict": "nlpwf.predict",
          "quantize": "nlpwf.quantize", "benchmark": "nlpwf.latency"}


def get(name: str) -> Callable[[DictConfig, object], dict | None]:
    if name not in STAGES:
        raise UserError(f"stage={name} is unknown: use one of {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).run


def check(cfg: DictConfig) -> None:
    """Config checks that need no data or weights, run before anything starts."""
    from nlpwf import train

    train.check(cfg)
