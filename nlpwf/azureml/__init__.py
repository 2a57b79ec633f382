"""Azure ML jobs: nlpwf's side of the Azure ML launcher (launchers/hydra_plugins/nlpwf_azureml_launcher).

When that launcher runs a job, the task calls `run` instead of training: it validates the
job, writes the code snapshot and the job spec (job.py), then depending on the launcher's
settings stops there (dry run), runs the job here as Azure ML would (emulate.py), or hands
the launcher a `Submission` to send (submit.py). This module stays free of azure imports:
Hydra imports the CLI, and through it this, on every start.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig

log = logging.getLogger(__name__)

LAUNCHER_TARGET = "hydra_plugins.nlpwf_azureml_launcher.azureml_launcher.NlpwfAzureMLLauncher"


def settings() -> DictConfig | None:
    """The Azure ML launcher's settings when it is the job's launcher, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    launcher = HydraConfig.get().launcher
    return launcher if launcher.get("_target_") == LAUNCHER_TARGET else None


def selected() -> bool:
    return settings() is not None


@dataclass
class Submission:
    """A job built and validated here, for the launcher to submit with the rest of its batch."""

    name: str
    job_dir: Path
    job_yaml: Path
    objective: str | None
    cluster: dict
    vm_size: str | None
    nodes: int


def pending(runs: Iterable) -> list:
    """The runs of a batch whose task returned a Submission."""
    from hydra.core.utils import JobStatus

    return [r for r in runs if r.status == JobStatus.COMPLETED and isinstance(r._return_value, Submission)]


def run(cfg: DictConfig, job_dir: Path):
    """The task under the Azure ML launcher: None (dry run), the objective (emulate), or a
    Submission for the launcher to send with the rest of its batch."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from nlpwf.azureml import job as azjob

    launcher = settings()
    hydra_cfg = HydraConfig.get()
    spec = azjob.prepare(cfg, Path(job_dir), launcher, hydra_cfg)
    if launcher.dry_run:
        log.info("dry run: Azure ML job %s written to %s (nothing submitted)", spec.name, spec.job_yaml)
        return None
    if launcher.emulate:
        from nlpwf.azureml import emulate

        metrics = emulate.run(spec, launcher)
        return metrics.get(cfg.objective)
    submission = Submission(
        name=spec.name, job_dir=Path(job_dir), job_yaml=spec.job_yaml, objective=cfg.get("objective"),
        cluster=dict(spec.cluster), vm_size=cfg.compute.get("vm_size"), nodes=cfg.nodes,
    )
    if hydra_cfg.mode == RunMode.RUN:  # no launcher batch to join (hydra.mode=RUN set by hand)
        from nlpwf.azureml.submit import execute

        outcome = execute([submission], launcher)[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    return submission
