"""What a job does, chosen by the `stage` config group. Each stage is `run(cfg, job_dir) -> metrics`
and composes the layers below it (data, models, training, inference, results, runtime)."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from nlpwf.config.checks import check_job
from nlpwf.errors import UserError
from nlpwf.runtime import contract

# Imported on demand: a stage's heavy dependencies (e.g. Neural Compressor) load only when used.
STAGES = {"train": "nlpwf.stages.train", "evaluate": "nlpwf.stages.evaluate", "predict": "nlpwf.stages.predict",
          "quantize": "nlpwf.stages.quantize", "benchmark": "nlpwf.stages.benchmark",
          "serve": "nlpwf.stages.serve",
          # Drives Azure ML, which sits above the stages: named here, imported only when run (docs/development.md#layers).
          "deploy": "nlpwf.azureml.deploy"}


def get(name: str) -> Callable[[DictConfig, Path], dict | None]:
    if name not in STAGES:
        raise UserError(f"stage={name} is unknown: use one of {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).run


def run(cfg: DictConfig, job_dir: Path) -> dict | None:
    """Run the job's stage. The process the user started checks the config first, before any
    data, weights or worker processes; the ranks of a job were checked by whoever started them."""
    if contract.from_env() is None:
        check_job(cfg)  # before the stage's module: a config mistake should not wait for torch to import
    return get(cfg.stage.name)(cfg, Path(job_dir))
